//! The bounded queue between the relay threads and the recorder thread.
//!
//! Bytes are appended to one shared buffer under a mutex (an uncontended lock, no syscall) and
//! the recorder thread is woken only when a batch is worth handling: when it reaches
//! [`WAKE_BYTES`], when something other than bytes arrives, or [`FLUSH_DELAY`] after the first
//! item of a quiet batch. A wake-up per read would cost two context switches per 4 KiB on a
//! busy CPU. Producers block when [`MAX_BYTES`] or [`MAX_ITEMS`] are pending: memory stays
//! bounded whatever the session's length, and nothing is dropped. The two batches (the one
//! filling, the one being encoded) are allocated once at their final size: they are most of
//! the relay's heap, and growing them by doubling would leave twice that resident.

use super::event::ExitStatus;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use ztna_common::asciicast::TtySize;

pub(crate) const WAKE_BYTES: usize = 32 * 1024;
pub(crate) const MAX_BYTES: usize = 64 * 1024;
pub(crate) const MAX_ITEMS: usize = 1024;
/// The largest single push (a relay thread's read buffer), which may overshoot
/// [`MAX_BYTES`] once.
pub(crate) const MAX_PUSH: usize = 16 * 1024;
pub(crate) const FLUSH_DELAY: Duration = Duration::from_millis(20);

#[derive(Debug)]
pub(crate) enum Item {
    /// `bytes[start..end]` of the batch.
    Output {
        start: usize,
        end: usize,
        time: Duration,
    },
    Input {
        start: usize,
        end: usize,
        time: Duration,
    },
    Resize {
        size: TtySize,
        time: Duration,
    },
    Marker {
        label: String,
        time: Duration,
    },
    Finish {
        status: ExitStatus,
        time: Duration,
    },
    /// The relay stopped showing output (see `Control::hold`): everything it showed is queued
    /// before this.
    Held {
        time: Duration,
    },
    /// Nothing: the recorder thread looks at its sinks' timers again (a sink's state changed
    /// from another thread).
    Wake,
}

#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) bytes: Vec<u8>,
    pub(crate) items: Vec<Item>,
}

impl Batch {
    /// A batch that never needs to grow: bytes up to one push past [`MAX_BYTES`]. Items start
    /// small (bulk output is a few large reads; only typing-speed traffic makes many).
    pub(crate) fn with_full_capacity() -> Self {
        Batch {
            bytes: Vec::with_capacity(MAX_BYTES + MAX_PUSH),
            items: Vec::with_capacity(64),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    batch: Batch,
    /// When the first item of the pending batch arrived.
    first_at: Option<Instant>,
    /// Something that should not wait for more (resize, marker, finish).
    urgent: bool,
    /// The consumer has finished: producers stop recording.
    closed: bool,
    /// The consumer sleeps with no timeout: the first item of a batch must wake it. While
    /// output flows it lingers with a timeout instead, so bulk output wakes it once per
    /// [`WAKE_BYTES`], not twice.
    parked: bool,
}

#[derive(Debug)]
pub(crate) struct Queue {
    state: Mutex<State>,
    to_consumer: Condvar,
    to_producer: Condvar,
}

#[derive(Clone, Copy)]
pub(crate) enum BytesKind {
    Output,
    Input,
}

impl Queue {
    pub(crate) fn new() -> Self {
        Queue {
            state: Mutex::new(State {
                batch: Batch::with_full_capacity(),
                ..State::default()
            }),
            to_consumer: Condvar::new(),
            to_producer: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not stop the relay: the state stays usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends bytes; blocks while the queue is full. False once the consumer is gone.
    pub(crate) fn push_bytes(&self, kind: BytesKind, data: &[u8], time: Duration) -> bool {
        let mut s = self.lock();
        while !s.closed && (s.batch.bytes.len() >= MAX_BYTES || s.batch.items.len() >= MAX_ITEMS) {
            s = self.to_producer.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.closed {
            return false;
        }
        let was_empty = s.batch.items.is_empty();
        if was_empty {
            s.first_at = Some(Instant::now());
        }
        let start = s.batch.bytes.len();
        s.batch.bytes.extend_from_slice(data);
        let end = s.batch.bytes.len();
        s.batch.items.push(match kind {
            BytesKind::Output => Item::Output { start, end, time },
            BytesKind::Input => Item::Input { start, end, time },
        });
        let wake = (was_empty && s.parked) || (end >= WAKE_BYTES && end - data.len() < WAKE_BYTES);
        drop(s);
        if wake {
            self.to_consumer.notify_one();
        }
        true
    }

    /// Appends a non-byte item and wakes the consumer at once.
    pub(crate) fn push(&self, item: Item) -> bool {
        let mut s = self.lock();
        if s.closed {
            return false;
        }
        if s.batch.items.is_empty() {
            s.first_at = Some(Instant::now());
        }
        s.batch.items.push(item);
        s.urgent = true;
        drop(s);
        self.to_consumer.notify_one();
        true
    }

    /// Waits for a batch worth handling, or until `deadline` (a sink's timer), and swaps it
    /// into `out` (which must be empty; its capacity is reused).
    pub(crate) fn take(&self, out: &mut Batch, deadline: Option<Instant>) {
        let mut s = self.lock();
        let mut linger = Some(Instant::now() + FLUSH_DELAY);
        loop {
            if s.urgent || s.batch.bytes.len() >= WAKE_BYTES {
                break;
            }
            let flush_at = s.first_at.map(|t| t + FLUSH_DELAY);
            let wake = [flush_at, deadline, linger].into_iter().flatten().min();
            match wake {
                None => {
                    s.parked = true;
                    s = self.to_consumer.wait(s).unwrap_or_else(|e| e.into_inner());
                    s.parked = false;
                }
                Some(w) => {
                    let now = Instant::now();
                    if now >= w {
                        if s.batch.items.is_empty() && deadline.is_none_or(|d| now < d) {
                            // Nothing came while lingering: sleep until something does.
                            linger = None;
                            continue;
                        }
                        break;
                    }
                    s = self
                        .to_consumer
                        .wait_timeout(s, w - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
        let was_full = s.batch.bytes.len() >= MAX_BYTES || s.batch.items.len() >= MAX_ITEMS;
        std::mem::swap(&mut s.batch, out);
        s.first_at = None;
        s.urgent = false;
        drop(s);
        if was_full {
            self.to_producer.notify_all();
        }
    }

    /// The consumer is done: later pushes are refused, blocked producers released.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.to_producer.notify_all();
    }
}
