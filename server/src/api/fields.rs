//! Reading a request body's fields with the contract's errors: absent or `null` is
//! `MISSING_FIELDS` (checked for all required fields first), a wrong type or value is
//! `INVALID_FIELD`. Ids must be hyphenated UUIDs before they go anywhere near SQL or a key.

use serde_json::{Map, Value};
use uuid::Uuid;
use ztna_common::api::ErrorCode;
use ztna_common::asciicast;

use super::error::Failure;

pub struct Fields<'a>(pub &'a Map<String, Value>);

/// A hyphenated UUID, nothing else (no braces, no URN, no bare hex).
pub fn parse_uuid(s: &str) -> Option<Uuid> {
    if s.len() != 36 {
        return None;
    }
    Uuid::parse_str(s).ok()
}

impl<'a> Fields<'a> {
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    /// `MISSING_FIELDS` naming every required field that is absent or `null`.
    pub fn require(&self, keys: &[&str]) -> Result<(), Failure> {
        let missing: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| self.get(k).is_none())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Failure::new(
                ErrorCode::MissingFields,
                format!("missing required field(s): {}", missing.join(", ")),
            ))
        }
    }

    pub fn opt_uuid(&self, k: &str) -> Result<Option<Uuid>, Failure> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => parse_uuid(s)
                .map(Some)
                .ok_or_else(|| Failure::invalid_field(k, "must be a UUID")),
            Some(_) => Err(Failure::invalid_field(k, "must be a UUID string")),
        }
    }

    pub fn uuid(&self, k: &str) -> Result<Uuid, Failure> {
        self.opt_uuid(k)?
            .ok_or_else(|| Failure::new(ErrorCode::MissingFields, format!("missing {k}")))
    }

    pub fn opt_str(&self, k: &str) -> Result<Option<&'a str>, Failure> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(Failure::invalid_field(k, "must be a string")),
        }
    }

    pub fn str(&self, k: &str) -> Result<&'a str, Failure> {
        self.opt_str(k)?
            .ok_or_else(|| Failure::new(ErrorCode::MissingFields, format!("missing {k}")))
    }

    pub fn opt_bool(&self, k: &str) -> Result<Option<bool>, Failure> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(Failure::invalid_field(k, "must be a boolean")),
        }
    }

    /// A whole number (`30` or `30.0`).
    pub fn opt_int(&self, k: &str) -> Result<Option<i64>, Failure> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    Ok(Some(i))
                } else if let Some(f) = n.as_f64().filter(|f| f.is_finite() && f.fract() == 0.0) {
                    // Past the 64-bit range (`1e20`, 2^64): the nearest end of it, for the
                    // fields that clamp (`limit`, `retention_days`) to clamp as for any other.
                    Ok(Some(f as i64))
                } else {
                    Err(Failure::invalid_field(k, "must be a whole number"))
                }
            }
            Some(_) => Err(Failure::invalid_field(k, "must be a number")),
        }
    }

    /// A whole number `>= 0`.
    pub fn opt_count(&self, k: &str) -> Result<Option<i64>, Failure> {
        match self.opt_int(k)? {
            Some(i) if i < 0 => Err(Failure::invalid_field(k, "must not be negative")),
            v => Ok(v),
        }
    }

    /// A duration in seconds: a whole number `>= 0`.
    pub fn opt_seconds(&self, k: &str) -> Result<Option<i64>, Failure> {
        match self.get(k) {
            None => Ok(None),
            // The contract: `duration_seconds` is a whole number (`12.0` is one, `12.5` not).
            Some(Value::Number(n)) => match n.as_f64() {
                Some(f) if (0.0..=asciicast::MAX_EVENT_TIME).contains(&f) && f.fract() == 0.0 => {
                    Ok(Some(f as i64))
                }
                _ => Err(Failure::invalid_field(
                    k,
                    "must be a whole number of seconds from 0 to 2147483647",
                )),
            },
            Some(_) => Err(Failure::invalid_field(k, "must be a number")),
        }
    }

    /// An RFC 3339 time.
    pub fn opt_time(&self, k: &str) -> Result<Option<time::OffsetDateTime>, Failure> {
        match self.opt_str(k)? {
            None => Ok(None),
            Some(s) => crate::timefmt::parse(s)
                .map(Some)
                .ok_or_else(|| Failure::invalid_field(k, "must be an RFC 3339 time")),
        }
    }

    pub fn opt_object(&self, k: &str) -> Result<Option<&'a Map<String, Value>>, Failure> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(_) => Err(Failure::invalid_field(k, "must be an object")),
        }
    }
}

/// Refuses a U+0000 anywhere in `v` (keys too): PostgreSQL's `jsonb` cannot hold one, and the
/// answer must not depend on the backend.
pub fn no_nul(k: &str, v: &Value) -> Result<(), Failure> {
    if has_nul(v) {
        return Err(Failure::invalid_field(k, "must not contain U+0000"));
    }
    Ok(())
}

pub use ztna_common::api::has_nul;

/// A caller's `metadata` object: at most [`MAX_METADATA_BYTES`] as JSON, no U+0000.
///
/// [`MAX_METADATA_BYTES`]: ztna_common::api::MAX_METADATA_BYTES
pub fn metadata<'a>(f: &Fields<'a>) -> Result<Option<&'a Map<String, Value>>, Failure> {
    let m = f.opt_object("metadata")?;
    if let Some(v) = f.get("metadata") {
        no_nul("metadata", v)?;
        if asciicast::json_len(v) > ztna_common::api::MAX_METADATA_BYTES {
            return Err(Failure::invalid_field(
                "metadata",
                "must be at most 64 KiB as JSON",
            ));
        }
    }
    Ok(m)
}

/// An asciicast v2 `header` object (see [`asciicast::check_header`]), no U+0000.
pub fn header<'a>(f: &Fields<'a>) -> Result<&'a Map<String, Value>, Failure> {
    let h = f
        .opt_object("header")?
        .ok_or_else(|| Failure::new(ErrorCode::MissingFields, "missing header"))?;
    if let Some(v) = f.get("header") {
        asciicast::check_header(v).map_err(|reason| {
            Failure::invalid_field(
                "header",
                &format!("is not an asciicast v2 header: {reason}"),
            )
        })?;
        no_nul("header", v)?;
    }
    Ok(h)
}

/// A `session_type`: a short, non-empty name.
pub fn session_type(f: &Fields<'_>) -> Result<String, Failure> {
    let s = f.str("session_type")?;
    ztna_common::api::check_session_type(s)
        .map_err(|why| Failure::invalid_field("session_type", why))?;
    Ok(s.to_string())
}

/// A `chunk_index`: a whole number in 0..=1_000_000_000.
pub fn chunk_index(f: &Fields<'_>) -> Result<Option<i64>, Failure> {
    match f.opt_count("chunk_index")? {
        Some(i) if i > 1_000_000_000 => Err(Failure::invalid_field(
            "chunk_index",
            "must be at most 1000000000",
        )),
        v => Ok(v),
    }
}

/// `chunk_data`/`transcript`: a string of at most 8 MiB.
pub fn chunk_text<'a>(f: &Fields<'a>, k: &str) -> Result<&'a str, Failure> {
    let s = f.str(k)?;
    if s.len() > ztna_common::api::MAX_CHUNK_BYTES {
        return Err(Failure::too_large(format!("{k} is over 8 MiB")));
    }
    Ok(s)
}
