//! Starting the program on the PTY's slave side, as its session leader with the PTY as its
//! controlling terminal.
//!
//! portable-pty opens the PTY; the program is started here instead of by its `spawn_command`,
//! which closes every descriptor in the child before `exec`, std's exec-error pipe included
//! (wezterm/wezterm#7893): any failed `exec` (a binary whose ELF loader is missing, a busy
//! text file, a `noexec` mount) then aborted the child with a Rust "fatal runtime error" on
//! the user's terminal while the spawn reported success. (A file the kernel cannot run at all
//! is handed to `/bin/sh` by glibc's `execvp`, as a shell would.) Here descriptors are only marked
//! close-on-exec, so they are gone in the program all the same, and `spawn` returns the error.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};

/// Opens the slave side named `tty` (without making it our controlling terminal), gives it
/// the user's terminal `modes` when there is one, and starts `cmd` on it. `cmd` is consumed so
/// that no copy of the slave side stays open here: the program's last close of it is what
/// ends the output.
pub(super) fn spawn_on(
    tty: &Path,
    modes: Option<&nix::sys::termios::Termios>,
    mut cmd: Command,
) -> io::Result<Child> {
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY)
        .open(tty)?;
    if let Some(m) = modes {
        // As `script` does: the user's erase and interrupt keys, and `iutf8` (without it, a
        // backspace in a cooked-mode prompt removes one byte of a multi-byte character).
        nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, m)?;
    }
    cmd.stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave);
    prepare_child(&mut cmd);
    cmd.spawn()
}

// The one unsafe block of the crate's relay: `pre_exec` runs between fork and exec, where
// only async-signal-safe calls are allowed. Everything below is a plain system call on
// values computed before the fork; nothing allocates or takes a lock.
#[allow(unsafe_code)]
fn prepare_child(cmd: &mut Command) {
    use nix::libc;
    fn check(r: libc::c_int) -> io::Result<()> {
        if r == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
    // SAFETY: see above; the closure touches no memory of the parent's other threads.
    unsafe {
        cmd.pre_exec(|| {
            // Dispositions the recorder set (std already resets the signal mask and SIGPIPE);
            // handlers would be reset by `exec` anyway, an ignored signal would not.
            for sig in [
                libc::SIGCHLD,
                libc::SIGHUP,
                libc::SIGINT,
                libc::SIGQUIT,
                libc::SIGTERM,
                libc::SIGALRM,
            ] {
                libc::signal(sig, libc::SIG_DFL);
            }
            check(libc::setsid())?;
            // The PTY becomes the program's controlling terminal: job control, SIGWINCH
            // and the hang-up on close all depend on it.
            check(libc::ioctl(0, libc::TIOCSCTTY as _, 0))?;
            // Nothing of the recorder's may reach the program (a descriptor inherited from
            // whoever started us included). Marked, not closed: std's exec-error pipe must
            // survive until `exec` succeeds.
            let first: libc::c_uint = 3;
            if libc::syscall(
                libc::SYS_close_range,
                first,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) == -1
            {
                // Kernels before 5.11: one fcntl per possible descriptor.
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                    lim.rlim_cur.min(1 << 16) as libc::c_int
                } else {
                    1024
                };
                for fd in 3..max {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_program_gets_the_pty_and_no_other_descriptor() {
        let pair = portable_pty::native_pty_system()
            .openpty(portable_pty::PtySize::default())
            .expect("openpty");
        let tty = pair.master.tty_name().expect("tty name");
        // A descriptor without close-on-exec, as a parent shell's `exec 7>file` leaves.
        let leak = File::open("/dev/null").expect("open");
        let fd = nix::unistd::dup(leak.as_raw_fd()).expect("dup");
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(format!(
            "test -t 0 && tty && if [ -e /proc/self/fd/{fd} ]; then echo leaked; else echo closed; fi"
        ));
        let mut child = spawn_on(&tty, None, cmd).expect("spawn");
        drop(pair.slave);
        let mut out = Vec::new();
        let mut reader = pair.master.try_clone_reader().expect("reader");
        let _ = reader.read_to_end(&mut out); // EIO at the end of a PTY's output
        let out = String::from_utf8_lossy(&out);
        assert!(child.wait().expect("wait").success(), "{out}");
        let _ = nix::unistd::close(fd);
        assert!(out.contains(&tty.display().to_string()), "{out}");
        assert!(out.contains("closed") && !out.contains("leaked"), "{out}");
    }
}
