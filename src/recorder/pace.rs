//! How the output relay thread is scheduled: as an interactive thread while the program's
//! output comes in small pieces (typing, prompts), as a batch thread while it streams.
//!
//! Each write the program makes to the PTY wakes the relay. As a normal thread, that wake-up
//! may preempt the program (or whatever else runs on that CPU) at once, so the relay reads the
//! output in as many small pieces as there were writes, paying a read, a write to the user's
//! terminal and two context switches for each. Under `SCHED_BATCH` the kernel keeps the
//! weight (the thread gets the same share of the CPU) but does not preempt for its wake-ups:
//! the program runs on until its time slice ends or the PTY's buffer is full, and the relay
//! reads fuller pieces. With another busy process on the same CPU that took bulk output from
//! 0.57–0.69x of a bare PTY to 0.73–0.86x (`bench/README.md`, "the relay's scheduling"); on a
//! quiet CPU it changes nothing measurable.
//!
//! A keystroke's echo must not wait for another thread's time slice, so a read smaller than
//! [`TYPED`] puts the thread back to the normal policy; only a read of [`BULK`] or more, which
//! no typist produces, sets batch. A switch is one system call, made only when the kind of
//! output changes. The recorder thread runs as a batch thread throughout ([`batch_thread`]).

use std::io;

/// A read at least this large means the program is streaming output.
pub(super) const BULK: usize = 1024;
/// A read smaller than this is typing, a prompt or a short answer.
pub(super) const TYPED: usize = 256;

/// The relay thread's policy, switched by the size of what it reads.
#[derive(Debug, Default)]
pub(super) struct Pace {
    batch: bool,
    /// The kernel refused a switch (a seccomp filter, say): stop trying, stay as started.
    off: bool,
}

impl Pace {
    /// Called by the relay thread itself after each read of `n` bytes.
    pub(super) fn after_read(&mut self, n: usize) {
        let want = if n >= BULK {
            true
        } else if n < TYPED {
            false
        } else {
            return;
        };
        if self.off || want == self.batch {
            return;
        }
        match set_batch(want) {
            Ok(()) => self.batch = want,
            Err(_) => self.off = true,
        }
    }

    #[cfg(test)]
    fn is_batch(&self) -> bool {
        self.batch
    }
}

/// Puts the calling thread under `SCHED_BATCH` for good: for the recorder thread, whose
/// latency nothing waits on (the user has each byte before it sees it), so that its wake-ups,
/// one per batch, never preempt the relay chain. A refusal changes nothing.
pub(super) fn batch_thread() {
    let _ = set_batch(true);
}

/// Sets the calling thread's policy to `SCHED_BATCH` or back to `SCHED_OTHER`. Both have
/// static priority 0 and keep the thread's nice value, so an unprivileged process may switch
/// either way (sched(7)).
#[allow(unsafe_code)]
fn set_batch(batch: bool) -> io::Result<()> {
    use nix::libc;
    let policy = if batch {
        libc::SCHED_BATCH
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid `sched_param` that outlives the call, which only reads it;
    // pid 0 is the calling thread (Linux schedules threads, not processes).
    let r = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn policy() -> i32 {
        #[allow(unsafe_code)]
        // SAFETY: reads the calling thread's policy, no memory involved.
        unsafe {
            nix::libc::sched_getscheduler(0)
        }
    }

    #[test]
    fn bulk_reads_set_batch_and_typing_sets_it_back() {
        // On a thread of its own: the policy belongs to the thread that sets it.
        std::thread::spawn(|| {
            let mut pace = Pace::default();
            pace.after_read(1);
            assert_eq!(policy(), nix::libc::SCHED_OTHER);
            pace.after_read(BULK);
            assert!(pace.is_batch());
            assert_eq!(policy(), nix::libc::SCHED_BATCH);
            // In between: no switch either way.
            pace.after_read(TYPED);
            assert_eq!(policy(), nix::libc::SCHED_BATCH);
            pace.after_read(TYPED - 1);
            assert!(!pace.is_batch());
            assert_eq!(policy(), nix::libc::SCHED_OTHER);
            pace.after_read(TYPED);
            assert_eq!(policy(), nix::libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }
}
