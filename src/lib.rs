//! The ztna-recorder agent: the recorder core (PTY relay → events → sinks) and the commands
//! built on it (`record`, `shell`, `daemon`, `status`).

pub mod check;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod ipc;
pub mod logging;
pub mod record;
pub mod recorder;
pub mod shell;
pub mod status;
