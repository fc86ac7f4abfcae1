//! The HTTP API's shared vocabulary: the response envelope, the contract's error codes with
//! their HTTP statuses, object keys, and the agent route's request and response bodies.

use serde::{Deserialize, Serialize};

/// The JWT route.
pub const USER_ROUTE: &str = "/api/session-recording";
/// The node-key route.
pub const AGENT_ROUTE: &str = "/api/session-recording-agent";
/// Largest request body the server accepts.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Largest `chunk_data` the server accepts.
pub const MAX_CHUNK_BYTES: usize = 8 * 1024 * 1024;
/// Largest `metadata` object an agent's `start` or `complete` may carry, as JSON: each
/// recording's row is sent whole in every `list` page, so what a caller adds stays small.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// Whether a U+0000 is anywhere in `v`, keys included: PostgreSQL's `jsonb` cannot hold one,
/// so the server refuses it in a header or metadata (and an agent does not send it).
pub fn has_nul(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(m) => m.iter().any(|(key, x)| key.contains('\0') || has_nul(x)),
        _ => false,
    }
}

/// How many JSON values `v` holds, itself included.
pub fn count_values(v: &serde_json::Value) -> usize {
    use serde_json::Value;
    match v {
        Value::Array(a) => 1 + a.iter().map(count_values).sum::<usize>(),
        Value::Object(m) => 1 + m.values().map(count_values).sum::<usize>(),
        _ => 1,
    }
}

/// A `session_type` the server takes: 1 to 64 characters, none of them a control character.
pub fn check_session_type(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.chars().count() > 64 || s.chars().any(char::is_control) {
        return Err("must be 1 to 64 printable characters");
    }
    Ok(())
}

/// `{"success", "data", "error"}`, the envelope of every answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub success: bool,
    pub data: Option<T>,
    pub error: Option<ApiError>,
}

impl<T> Envelope<T> {
    pub fn ok(data: T) -> Self {
        Envelope {
            success: true,
            data: Some(data),
            error: None,
        }
    }
}

impl Envelope<()> {
    pub fn err(code: ErrorCode, message: impl Into<String>) -> Self {
        Envelope {
            success: false,
            data: None,
            error: Some(ApiError {
                code,
                message: message.into(),
            }),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

/// The contract's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    InvalidJson,
    UnknownAction,
    MissingFields,
    InvalidField,
    InvalidChunk,
    Unauthorized,
    Forbidden,
    FeatureDisabled,
    RecordingDisabled,
    NotFound,
    Conflict,
    PayloadTooLarge,
    /// Not the contract's: a route asked with another method than POST (405).
    MethodNotAllowed,
    /// Not the contract's: the server holds as many request bodies as its memory budget
    /// allows, and this one waited too long for room (503; retry later).
    ServerBusy,
    InternalError,
}

impl ErrorCode {
    /// The code as it is on the wire (`RECORDING_DISABLED`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "INVALID_JSON",
            ErrorCode::UnknownAction => "UNKNOWN_ACTION",
            ErrorCode::MissingFields => "MISSING_FIELDS",
            ErrorCode::InvalidField => "INVALID_FIELD",
            ErrorCode::InvalidChunk => "INVALID_CHUNK",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::FeatureDisabled => "FEATURE_DISABLED",
            ErrorCode::RecordingDisabled => "RECORDING_DISABLED",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::ServerBusy => "SERVER_BUSY",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// The HTTP status that goes with the code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidJson
            | ErrorCode::UnknownAction
            | ErrorCode::MissingFields
            | ErrorCode::InvalidField
            | ErrorCode::InvalidChunk => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden | ErrorCode::FeatureDisabled | ErrorCode::RecordingDisabled => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::ServerBusy => 503,
            ErrorCode::InternalError => 500,
        }
    }

    /// Whether an agent should retry a request that got this answer (the backend may recover),
    /// or give the request up (retrying would get the same answer).
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorCode::InternalError | ErrorCode::ServerBusy)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `recordings/ORG/SESSION/chunk-N.cast`
pub fn chunk_key(org: &str, session: &str, index: u64) -> String {
    format!("recordings/{org}/{session}/chunk-{index}.cast")
}

/// `recordings/ORG/SESSION/`: every chunk of a recording lives under it.
pub fn chunk_prefix(org: &str, session: &str) -> String {
    format!("recordings/{org}/{session}/")
}

/// `session-recordings/ORG/SESSION/recording.json`
pub fn summary_key(org: &str, session: &str) -> String {
    format!("session-recordings/{org}/{session}/recording.json")
}

/// `data` of the agent `config` action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentConfig {
    pub org_id: String,
    pub machine_id: String,
    pub recording_enabled: bool,
    pub retention_days: i64,
    pub storage_mode: String,
}

/// `data` of a `start` (either route) or an agent `report`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Started {
    pub session_id: String,
    pub status: String,
}

/// `data` of `upload_chunk`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkStored {
    pub stored: String,
    pub chunk_index: u64,
}

/// `data` of `complete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completed {
    pub completed: String,
}

/// One entry of a recording's `metadata.chunks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkInfo {
    pub index: u64,
    pub bytes: u64,
    pub sha256: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialise_as_the_contract_spells_them() {
        let s = serde_json::to_string(&ErrorCode::FeatureDisabled).unwrap();
        assert_eq!(s, "\"FEATURE_DISABLED\"");
        assert_eq!(ErrorCode::PayloadTooLarge.http_status(), 413);
        let e = serde_json::to_value(Envelope::err(ErrorCode::NotFound, "no")).unwrap();
        assert_eq!(e["success"], false);
        assert_eq!(e["data"], serde_json::Value::Null);
        assert_eq!(e["error"]["code"], "NOT_FOUND");
        // `as_str` (messages) spells every code as serde does (the wire).
        use ErrorCode::*;
        for c in [
            InvalidJson,
            UnknownAction,
            MissingFields,
            InvalidField,
            InvalidChunk,
            Unauthorized,
            Forbidden,
            FeatureDisabled,
            RecordingDisabled,
            NotFound,
            Conflict,
            PayloadTooLarge,
            MethodNotAllowed,
            ServerBusy,
            InternalError,
        ] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
    }
}
