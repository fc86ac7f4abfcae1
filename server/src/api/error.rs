//! The one place where failures become answers: a contract error code with a short message.
//! Internal errors are logged in full here and answered with a generic message.

use ztna_common::api::ErrorCode;

use crate::meta::MetaError;
use crate::objects::ObjectError;

/// An answer other than success.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }

    pub fn invalid_json(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidJson, m)
    }
    pub fn invalid_field(field: &str, why: &str) -> Self {
        Self::new(ErrorCode::InvalidField, format!("{field}: {why}"))
    }
    pub fn invalid_chunk(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidChunk, m)
    }
    pub fn unauthorized() -> Self {
        Self::new(ErrorCode::Unauthorized, "missing or invalid credentials")
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, m)
    }
    pub fn feature_disabled() -> Self {
        Self::new(
            ErrorCode::FeatureDisabled,
            "the session_recording feature is not enabled for this org",
        )
    }
    pub fn recording_disabled() -> Self {
        Self::new(
            ErrorCode::RecordingDisabled,
            "session recording is disabled in this org's settings",
        )
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{what} not found"))
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, m)
    }
    pub fn too_large(m: impl Into<String>) -> Self {
        Self::new(ErrorCode::PayloadTooLarge, m)
    }
    pub fn internal() -> Self {
        Self::new(ErrorCode::InternalError, "internal error")
    }
}

impl From<MetaError> for Failure {
    fn from(e: MetaError) -> Self {
        match e {
            // Written under the store's locks, but the object store is what failed.
            MetaError::Objects(e) => e.into(),
            e @ MetaError::StoreMismatch { .. } => {
                tracing::error!(error = %e, "cleanup refused");
                Failure::new(
                    ErrorCode::InternalError,
                    "the object store does not hold this org's recordings; nothing was deleted",
                )
            }
            MetaError::Busy => {
                tracing::warn!("{}", MetaError::Busy);
                Failure::new(
                    ErrorCode::ServerBusy,
                    "the recording is busy with another request; try again",
                )
            }
            e => {
                tracing::error!(error = %e, "metadata store failed");
                internal_or_full(&e)
            }
        }
    }
}

impl From<ObjectError> for Failure {
    fn from(e: ObjectError) -> Self {
        tracing::error!(error = %e, "object store failed");
        internal_or_full(&e)
    }
}

/// A full disk is said as such (the client, or its operator, can do something about it);
/// any other internal failure stays "internal error".
fn internal_or_full(e: &(dyn std::error::Error + 'static)) -> Failure {
    if storage_full(e) {
        Failure::new(
            ErrorCode::InternalError,
            "the server's storage is full; nothing was changed",
        )
    } else {
        Failure::internal()
    }
}

fn storage_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // ENOSPC, EDQUOT
            if io.kind() == std::io::ErrorKind::StorageFull
                || matches!(io.raw_os_error(), Some(28) | Some(122))
            {
                return true;
            }
        }
        // SQLite's SQLITE_FULL comes as a database error with this text.
        if e.to_string().contains("database or disk is full") {
            return true;
        }
        cur = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn a_full_disk_is_said_as_such() {
        let full = ObjectError::Io {
            key: "recordings/o/s/chunk-0.cast".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        let f = Failure::from(MetaError::Objects(full));
        assert_eq!(f.code, ErrorCode::InternalError);
        assert!(f.message.contains("storage is full"), "{}", f.message);
        let sqlite = MetaError::Batch(
            "error returned from database: (code: 13) database or disk is full".into(),
        );
        assert!(Failure::from(sqlite).message.contains("storage is full"));
        let other = ObjectError::Io {
            key: "k".into(),
            source: std::io::Error::from_raw_os_error(5),
        };
        assert_eq!(Failure::from(other), Failure::internal());
    }
}
