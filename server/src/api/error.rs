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
            e => {
                tracing::error!(error = %e, "metadata store failed");
                Failure::internal()
            }
        }
    }
}

impl From<ObjectError> for Failure {
    fn from(e: ObjectError) -> Self {
        tracing::error!(error = %e, "object store failed");
        Failure::internal()
    }
}
