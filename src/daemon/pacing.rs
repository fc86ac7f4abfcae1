//! Uploads give way to bulk output. While live sessions stream more than [`BULK_PER_SEC`]
//! between them, the uploader waits for a lull, at most `upload_defer_secs` and only while the
//! spool is less than half full, before it reads, escapes and sends the chunks already spooled.
//!
//! Why: relaying a PTY is a chain of short wake-ups (child, recorder, sshd, network), and any
//! other work on the machine's cores lengthens it, whatever its priority. Measured with
//! `bench/agent_bench.py` on 2 cores, a recorded `ssh -tt` streaming 200 MiB ran at 0.54–0.60
//! of plain sshd while its chunks were uploaded during the session, and at 0.68–0.77 with no
//! upload until it ended; running the uploads on their own threads at nice 10, or even the
//! uploads and the backend at `SCHED_IDLE`, still gave 0.57–0.60. What is spooled is durable
//! on local disk either way, so waiting costs only how soon the backend has it; interactive
//! sessions stay far below the threshold and upload at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Output rate of all live sessions together above which they count as bulk.
const BULK_PER_SEC: u64 = 1 << 20;
const WINDOW: Duration = Duration::from_millis(250);
/// How often a waiting uploader looks again.
const POLL: Duration = Duration::from_millis(100);

/// The live sessions' output rate, in fixed windows of [`WINDOW`].
#[derive(Debug)]
pub struct Ingest {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window_start: Instant,
    bytes: u64,
    /// Bulk until then: one window past the last one over the threshold, so that the check
    /// does not flicker at a window's start.
    busy_until: Option<Instant>,
}

impl Default for Ingest {
    fn default() -> Self {
        Ingest {
            state: Mutex::new(State {
                window_start: Instant::now(),
                bytes: 0,
                busy_until: None,
            }),
        }
    }
}

impl Ingest {
    /// Counts bytes a live session just sent.
    pub fn note(&self, bytes: u64) {
        self.note_at(bytes, Instant::now());
    }

    fn note_at(&self, bytes: u64, now: Instant) {
        let mut s = super::lock(&self.state);
        if now.saturating_duration_since(s.window_start) >= WINDOW {
            s.window_start = now;
            s.bytes = 0;
        }
        s.bytes += bytes;
        let per_window = BULK_PER_SEC * WINDOW.as_millis() as u64 / 1000;
        if s.bytes >= per_window {
            s.busy_until = Some(s.window_start + 2 * WINDOW);
        }
    }

    pub fn busy(&self) -> bool {
        self.busy_at(Instant::now())
    }

    fn busy_at(&self, now: Instant) -> bool {
        super::lock(&self.state).busy_until.is_some_and(|t| now < t)
    }
}

/// Whether uploads give way now: live sessions stream bulk output, the daemon is not
/// stopping, and the spool is less than half full (of what it takes before it cuts sessions:
/// the room live sessions keep is not for output). Past half, the uploads run alongside the
/// output: a long burst must never fill the spool because uploads waited, or the session's
/// recording would be cut short.
pub fn yield_now(shared: &super::Shared) -> bool {
    // The rate lingers for a moment after the last session ended: with none live, there is
    // no output to give way to.
    shared.ingest.busy()
        && !super::lock(&shared.live).is_empty()
        && !*shared.stopping.borrow()
        && shared.spool.bytes_estimate()
            < shared
                .config
                .spool_max_bytes
                .saturating_sub(shared.spool.held())
                / 2
}

/// Counts an uploader as waiting (for `status`) while it lives, so the count stays right even
/// if the waiting task is dropped mid-sleep.
pub struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    pub fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One uploader's wait: how long to wait before its next request, given whether sessions
/// stream bulk output now. `since` is when this uploader began to wait; it is cleared by a
/// lull, so each burst of output gets at most `cap` of waiting, and then the uploads run
/// alongside it until the spool is caught up.
pub fn wait_for(
    busy: bool,
    since: &mut Option<Instant>,
    now: Instant,
    cap: Duration,
) -> Option<Duration> {
    if !busy || cap.is_zero() {
        *since = None;
        return None;
    }
    let start = *since.get_or_insert(now);
    let left = cap.saturating_sub(now.saturating_duration_since(start));
    (!left.is_zero()).then(|| left.min(POLL))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn bulk_output_is_busy_a_trickle_is_not() {
        let t0 = Instant::now();
        let ingest = Ingest::default();
        // An interactive session: a few KiB every 50 ms.
        for i in 0..40 {
            ingest.note_at(4096, t0 + Duration::from_millis(50 * i));
            assert!(!ingest.busy_at(t0 + Duration::from_millis(50 * i)));
        }
        // Bulk: 64 KiB every 10 ms (6.4 MiB/s).
        let t1 = t0 + Duration::from_secs(3);
        for i in 0..30 {
            ingest.note_at(64 << 10, t1 + Duration::from_millis(10 * i));
        }
        let end = t1 + Duration::from_millis(290);
        assert!(ingest.busy_at(end));
        // Quiet again: no longer busy once a whole window has passed without bulk.
        assert!(!ingest.busy_at(end + 2 * WINDOW));
    }

    #[test]
    fn an_uploader_waits_at_most_the_cap_per_burst() {
        let cap = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut since = None;
        assert_eq!(wait_for(true, &mut since, t0, cap), Some(POLL));
        assert_eq!(
            wait_for(true, &mut since, t0 + Duration::from_secs(10), cap),
            Some(POLL)
        );
        assert_eq!(
            wait_for(true, &mut since, t0 + Duration::from_millis(29_950), cap),
            Some(Duration::from_millis(50))
        );
        // The cap is spent: upload alongside the output.
        assert_eq!(wait_for(true, &mut since, t0 + cap, cap), None);
        assert_eq!(wait_for(true, &mut since, t0 + cap * 2, cap), None);
        // A lull resets it.
        assert_eq!(wait_for(false, &mut since, t0 + cap * 2, cap), None);
        assert_eq!(since, None);
        assert_eq!(wait_for(true, &mut since, t0 + cap * 3, cap), Some(POLL));
        // Switched off.
        let mut since = None;
        assert_eq!(wait_for(true, &mut since, t0, Duration::ZERO), None);
    }
}
