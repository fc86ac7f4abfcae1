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
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // Nothing useful to do if the terminal is gone.
        let _ = termios::tcsetattr(&self.fd, SetArg::TCSANOW, &self.saved);
    }
}
