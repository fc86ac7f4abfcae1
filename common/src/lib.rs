//! What the agent and the server both speak: the asciicast v2 format (header, events, the
//! line encoder and parser) and the HTTP API's envelope, error codes and agent-route types.
//! Deliberately free of HTTP, database and runtime dependencies.
#![forbid(unsafe_code)]

pub mod api;
pub mod asciicast;
#[cfg(feature = "cli-docs")]
pub mod cli_docs;

pub use asciicast::{Event, EventCode, Header, TtySize};

/// Prints a command's result and a newline on stdout. A reader that went away (`| head -1`,
/// `| true`) is not an error: nobody is left to read it, and `println!` would panic. Other
/// errors are the caller's.
pub fn print_out(text: impl std::fmt::Display) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}
