//! Output that waits for a daemon that took none for [`super::DAEMON_WRITE_TIMEOUT`] but did
//! not go away (stopped with SIGSTOP, stuck on its disk). Without enforce the session goes on
//! and its frames wait here, the first possibly begun, up to [`GAP_MAX_BYTES`]; past that,
//! frames are dropped behind one marker until the daemon has taken what waits. Both the PTY
//! and the piped path keep one; under enforce the session ends instead, as when the daemon
//! is gone.

use super::resume::GAP_MAX_BYTES;
use crate::ipc::{self, Kind};
use std::io::{self, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use ztna_common::asciicast::{encode_event, EventCode};

/// The marker (`m` event) where output stops being kept for a daemon that took none.
pub(super) const BACKLOG_CUT_MARKER: &str =
    "ztna-recorder: output from here until the recording daemon took output again was not recorded";

pub(super) struct Backlog {
    out: Vec<u8>,
    /// How much of `out` the daemon has taken.
    sent: usize,
    /// Event bytes dropped since the marker.
    dropped: u64,
}

impl Backlog {
    /// Starts with what is left of a frame the daemon did not take in time.
    pub(super) fn new(rest: &[u8]) -> Self {
        Backlog {
            out: rest.to_vec(),
            sent: 0,
            dropped: 0,
        }
    }

    /// Puts a whole Events frame behind what waits, or drops it (behind one marker at
    /// recording time `marker_at`) once the backlog holds all it may.
    pub(super) fn push(&mut self, frame: &[u8], marker_at: f64) {
        if self.sent > self.out.len() / 2 {
            // What was taken goes (a daemon that takes a little at a time would otherwise
            // grow this without end); only once it is over half, so copies stay cheap.
            self.out.drain(..self.sent);
            self.sent = 0;
        }
        if self.dropped == 0 && self.out.len() + frame.len() <= GAP_MAX_BYTES {
            self.out.extend_from_slice(frame);
            return;
        }
        if self.dropped == 0 {
            // After every line kept, before any sent once the daemon is back.
            let mut line = Vec::new();
            encode_event(&mut line, marker_at, EventCode::Marker, BACKLOG_CUT_MARKER);
            if let Ok(head) = ipc::head(Kind::Events, line.len()) {
                self.out.extend_from_slice(&head);
                self.out.extend_from_slice(&line);
            }
        }
        self.dropped += frame.len().saturating_sub(ipc::HEAD_BYTES) as u64;
    }

    /// Hands the daemon what it takes now, without waiting. `Ok(true)` once it has taken all
    /// (frames are then sent as before); an error is the daemon gone after all.
    pub(super) fn offer(&mut self, stream: &UnixStream) -> io::Result<bool> {
        use nix::sys::socket::{send, MsgFlags};
        use std::os::fd::AsRawFd as _;
        while self.sent < self.out.len() {
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            match send(stream.as_raw_fd(), &self.out[self.sent..], flags) {
                Ok(n) => self.sent += n,
                Err(nix::errno::Errno::EAGAIN) => return Ok(false),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.dropped > 0 {
            super::syslog_warn(&format!(
                "the recording daemon takes output again; {} bytes of the recording were dropped meanwhile",
                self.dropped
            ));
        }
        Ok(true)
    }

    /// Before the End: what waits is sent, waiting for the daemon as for any frame.
    pub(super) fn finish(self, mut stream: &UnixStream) -> io::Result<()> {
        stream
            .write_all(&self.out[self.sent..])
            .map_err(super::daemon_write_error)
    }

    /// Event bytes dropped behind the marker.
    #[cfg(test)]
    fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// A write that returned short after this long waited out the socket's timeout.
const STALLED_AFTER: Duration =
    super::DAEMON_WRITE_TIMEOUT.saturating_sub(Duration::from_millis(500));

/// Writes one whole frame to the daemon. `Ok(None)` once it is sent; `Ok(Some(backlog))` when
/// the daemon took nothing for [`super::DAEMON_WRITE_TIMEOUT`] and `keep` (no enforce): the
/// rest of the frame waits in the backlog returned. An error is the daemon gone (or, under
/// enforce, stuck).
pub(super) fn send(
    mut stream: &UnixStream,
    frame: &[u8],
    keep: bool,
) -> io::Result<Option<Backlog>> {
    let mut written = 0;
    let sent = loop {
        let began = Instant::now();
        match stream.write(&frame[written..]) {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(n) if written + n == frame.len() => break Ok(()),
            // Part of the frame went, then the daemon took nothing until the socket's timeout
            // (a write returns short only then, or on a signal): a stall already, not the
            // start of another wait as long.
            Ok(n) if began.elapsed() >= STALLED_AFTER => {
                written += n;
                break Err(super::daemon_write_error(io::ErrorKind::TimedOut.into()));
            }
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(super::daemon_write_error(e)),
        }
    };
    match sent {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::TimedOut && keep => {
            // Still there, taking nothing: the session goes on, its output waits (the rest of
            // this frame, then whole frames) rather than being lost with the connection.
            super::syslog_warn(&format!(
                "{e}: the session goes on, its output waits for it (up to {} KiB)",
                GAP_MAX_BYTES / 1024
            ));
            Ok(Some(Backlog::new(&frame[written..])))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_up_to_the_limit_then_one_marker() {
        let frame = |n: usize| {
            let body = vec![b'x'; n];
            let mut f = ipc::head(Kind::Events, n).unwrap().to_vec();
            f.extend_from_slice(&body);
            f
        };
        let mut b = Backlog::new(b"rest");
        b.push(&frame(GAP_MAX_BYTES - 100), 1.0);
        assert_eq!(b.dropped(), 0);
        let kept = b.out.len();
        b.push(&frame(200), 2.0);
        b.push(&frame(300), 3.0);
        assert_eq!(b.dropped(), 500);
        let tail = String::from_utf8_lossy(&b.out[kept..]).into_owned();
        assert_eq!(tail.matches(BACKLOG_CUT_MARKER).count(), 1, "{tail}");
        assert!(tail.contains("[2.000000, \"m\""), "{tail}");
    }
}
