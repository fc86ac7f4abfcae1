//! The typed events a session produces, and the program's exit status.

use std::time::Duration;
use ztna_common::asciicast::TtySize;

/// How the recorded program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal number.
    Signal(i32),
}

impl ExitStatus {
    /// The status a shell would report: the exit code, or 128+N for signal N.
    pub fn code(self) -> u8 {
        match self {
            ExitStatus::Code(c) => (c & 0xff) as u8,
            ExitStatus::Signal(n) => (128 + (n & 0x7f)) as u8,
        }
    }

    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(n) => write!(f, "killed by signal {n}"),
        }
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EventKind<'a> {
    /// The program wrote this (UTF-8 repaired: a character split across reads comes whole,
    /// invalid bytes are U+FFFD; the user's terminal got the exact bytes).
    Output(&'a str),
    /// The user typed this (only when input capture is on).
    Input(&'a str),
    /// The terminal was resized.
    Resize(TtySize),
    /// A marker (see [`super::Control::marker`]).
    Marker(&'a str),
    /// The program ended. Always the last event; not an asciicast event.
    Exit(ExitStatus),
}

/// One event, borrowed for the duration of a [`super::Sink::event`] call (no allocation per
/// event). The asciicast line is encoded once for all sinks.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// Time since the start of the recording.
    pub time: Duration,
    pub kind: EventKind<'a>,
    pub(crate) line: &'a [u8],
}

impl<'a> Event<'a> {
    /// Builds an event; `line` must be the asciicast encoding of it (empty for `Exit`).
    pub fn new(time: Duration, kind: EventKind<'a>, line: &'a [u8]) -> Self {
        Event { time, kind, line }
    }

    /// The asciicast v2 event line, `[time, code, data]` ending in `\n` (UTF-8, as bytes: what
    /// sinks write); `None` for `Exit`.
    pub fn asciicast_line(&self) -> Option<&'a [u8]> {
        match self.kind {
            EventKind::Exit(_) => None,
            _ => Some(self.line),
        }
    }

    /// Seconds since the start, as written in the recording.
    pub fn secs(&self) -> f64 {
        self.time.as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(ExitStatus::Code(3).code(), 3);
        assert_eq!(ExitStatus::Signal(9).code(), 137);
        assert!(ExitStatus::Code(0).success());
    }
}
