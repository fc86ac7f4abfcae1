//! The recorder core: runs a program in a PTY, relays it byte-exact between the user's terminal
//! and the program, and turns what passes into typed [`Event`]s for the [`Sink`]s (asciicast
//! file, chunked spool, or the caller's own).
//!
//! # Shape
//!
//! ```text
//!  stdin ──(input thread)──────────────────────────────▶ PTY master ──▶ program
//!  stdout ◀─(output thread: read, write, timestamp)──── PTY master ◀── program
//!                 │ bounded batch queue (woken per batch, not per read)
//!                 ▼
//!        recorder thread: UTF-8 repair → asciicast line encoded once → every sink
//! ```
//!
//! * The relay threads never allocate per read: they append to a bounded queue whose buffers
//!   are reused, so memory is bounded whatever the session's length. A sink that is slow applies back-pressure (nothing is dropped); a sink
//!   that *fails* is removed and reported, and the session goes on ([`SinkPolicy::FailOpen`]),
//!   or the program is hung up on ([`SinkPolicy::FailClosed`]).
//! * While the program streams output, the output thread runs under `SCHED_BATCH`, so the
//!   program's writes do not each preempt it and it reads fuller pieces; a small read (typing)
//!   puts it back to the normal policy. The recorder thread is a batch thread throughout.
//! * Raw mode, `SIGWINCH` and the hang-up signals are handled at the edge
//!   ([`Terminal::Stdio`]); [`Terminal::Custom`] runs the same relay over any reader/writer.
//!
//! # Example
//!
//! ```no_run
//! use ztna_recorder::recorder::{Command, FileSink, Session, SessionConfig, Sink};
//! # fn main() -> anyhow::Result<()> {
//! let mut config = SessionConfig::new(Command::shell_command("/bin/sh", "ls -l"));
//! config.header_command = Some("ls -l".into());
//! let sinks: Vec<Box<dyn Sink>> = vec![Box::new(FileSink::create("ls.cast".as_ref(), false)?)];
//! let outcome = Session::new(config).run(sinks)?;
//! std::process::exit(outcome.status.code().into());
//! # }
//! ```

mod chunk;
mod event;
mod file;
mod pace;
mod queue;
mod session;
mod sink;
mod spawn;
mod term;
mod utf8;

pub use chunk::{ChunkLimits, ChunkSink, ChunkWriter, ClosedChunk, CHUNK_HEADER_FILE};
pub use event::{Event, EventKind, ExitStatus};
pub use file::FileSink;
pub use session::{
    check_interpreter, exec_failure, user_shell, Command, Control, Error, Outcome, Session,
    SessionConfig, Terminal, Termination, PASSED_ON,
};
pub use sink::{Sink, SinkFailure, SinkPolicy};
pub use term::{stdin_is_tty, terminal_size};
pub use utf8::Utf8Repair;
pub use ztna_common::asciicast::{Header, TtySize};
