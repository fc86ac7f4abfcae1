//! What the agent and the server both speak: the asciicast v2 format (header, events, the
//! line encoder and parser) and the HTTP API's envelope, error codes and agent-route types.
//! Deliberately free of HTTP, database and runtime dependencies.
#![forbid(unsafe_code)]

pub mod api;
pub mod asciicast;
#[cfg(feature = "cli-docs")]
pub mod cli_docs;

pub use asciicast::{Event, EventCode, Header, TtySize};
