//! The user's terminal: raw mode (set without flushing type-ahead, restored on drop) and its
//! size.

use nix::sys::termios::{self, SetArg, Termios};
use std::io::{self, IsTerminal};
use std::os::fd::{AsFd, OwnedFd};
use ztna_common::asciicast::TtySize;

/// Whether the process's stdin is a terminal.
pub fn stdin_is_tty() -> bool {
    io::stdin().is_terminal()
}

/// The size of the terminal `fd` is, if it is one and reports a size.
pub fn terminal_size(fd: impl AsFd) -> Option<TtySize> {
    let ws = rustix::termios::tcgetwinsize(fd).ok()?;
    if ws.ws_col == 0 || ws.ws_row == 0 {
        return None;
    }
    Some(TtySize {
        cols: ws.ws_col,
        rows: ws.ws_row,
    })
}

/// Puts a terminal in raw mode and restores its previous mode when dropped (normal return,
/// error or panic unwinding; signals are turned into a normal return by the session).
pub(crate) struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    pub(crate) fn enable(fd: impl AsFd) -> io::Result<Self> {
        let fd = fd.as_fd().try_clone_to_owned()?;
        let saved = termios::tcgetattr(&fd)?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        // TCSANOW, not TCSAFLUSH: input already typed (a paste, `ssh -tt host <<EOF`) must
        // reach the program, not be discarded.
        termios::tcsetattr(&fd, SetArg::TCSANOW, &raw)?;
        Ok(RawMode { fd, saved })
    }

    /// The terminal's modes from before: what the program's PTY starts with.
    pub(crate) fn saved(&self) -> &Termios {
        &self.saved
    }

    /// Raw mode again, after the recorder was stopped and continued: the user's shell put its
    /// own modes back meanwhile (`kill -TSTP`, then `fg`).
    pub(crate) fn reapply(&self) {
        let mut raw = self.saved.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(&self.fd, SetArg::TCSANOW, &raw);
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing useful to do if the terminal is gone.
        let _ = termios::tcsetattr(&self.fd, SetArg::TCSANOW, &self.saved);
    }
}

/// The user's stdin or stdout, waited on when it is non-blocking. The file description is
/// shared with whatever else uses the terminal, and a program that left it `O_NONBLOCK` made
/// the relay stop at its first `EAGAIN`: typed keys never reached the program, and output
/// stopped reaching the user. A read or write that would block waits in `poll` instead (a
/// blocking descriptor never gets there, so the relay's fast path is unchanged).
pub(crate) struct Waiting(pub(crate) std::fs::File);

impl Waiting {
    fn wait(&self, events: nix::poll::PollFlags) {
        use nix::poll::{poll, PollFd, PollTimeout};
        // An error (EINTR) just means: try the call again.
        let _ = poll(
            &mut [PollFd::new(self.0.as_fd(), events)],
            PollTimeout::NONE,
        );
    }
}

impl io::Read for Waiting {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(nix::poll::PollFlags::POLLIN)
                }
                r => return r,
            }
        }
    }
}

impl io::Write for Waiting {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.0.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(nix::poll::PollFlags::POLLOUT)
                }
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}
