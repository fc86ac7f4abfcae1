//! Going on after the daemon stopped in order (a restart, an upgrade): when to ask the next
//! daemon, what to send it (the session's Start, with `continues`), and the output kept for
//! it meanwhile.

use super::*;

/// Output kept while no daemon records the session, at most this much.
pub(super) const GAP_MAX_BYTES: usize = 1024 * 1024;
/// The marker (`m` event) where the kept output stops, the rest of the gap not recorded
/// (`gap_dropped_bytes` says how much).
pub(super) const GAP_CUT_MARKER: &str =
    "ztna-recorder: output from here until recording resumed was not recorded";
/// How long the exit waits for a daemon that stopped in order, when output is waiting for it.
pub(super) const RESUME_AT_EXIT: Duration = Duration::from_secs(2);
/// Under enforce, how long a session runs while no daemon records it after an orderly stop (a
/// restart takes a second or two), its output held; past this it ends (or past
/// [`GAP_MAX_BYTES`] kept, which the hold leaves to what was in flight).
pub(super) const ENFORCE_GRACE: Duration = Duration::from_secs(10);

/// Reconnecting to the daemon after it stopped in order: when to try next, and the output
/// kept meanwhile for the recording that continues the session.
pub(super) struct Resume {
    /// Previous recording's local id.
    pub(super) continues: Option<String>,
    /// When the daemon stopped (session time).
    pub(super) since: Duration,
    pub(super) next_try: Duration,
    pub(super) wait: Duration,
    pub(super) gap: Vec<(Duration, EventCode, String)>,
    pub(super) gap_bytes: usize,
    pub(super) dropped_bytes: u64,
}

/// Calls `attempt` (at least once) every 100 ms until it succeeds or `patience` has passed.
pub(super) fn retry_for(patience: Duration, mut attempt: impl FnMut() -> bool) {
    let until = Instant::now() + patience;
    while !attempt() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a daemon said to a resumed session.
pub(super) enum Resumed {
    Record(UnixStream, Option<String>),
    /// Recording is switched off: the rest of the session goes unrecorded.
    Off,
    /// No daemon yet, or it refused (stopping again, spool full): try later.
    Later,
}

impl Resume {
    pub(super) fn new(continues: Option<String>, now: Duration) -> Resume {
        Resume {
            continues,
            since: now,
            next_try: now,
            wait: Duration::from_millis(100),
            gap: Vec::new(),
            gap_bytes: 0,
            dropped_bytes: 0,
        }
    }

    /// Whether an attempt is due (always when `force`); if so, the next one is scheduled
    /// (100 ms, doubling, at most 1 s apart: a restart takes a second or two, and under
    /// enforce a daemon back late in the grace must still be asked in time).
    pub(super) fn due(&mut self, now: Duration, force: bool) -> bool {
        if !force && now < self.next_try {
            return false;
        }
        self.next_try = now + self.wait;
        self.wait = (self.wait * 2).min(Duration::from_secs(1));
        true
    }

    pub(super) fn keep(&mut self, t: Duration, code: EventCode, data: &str) {
        // What an event costs beside its data, so that many tiny ones stay bounded too.
        const EVENT_COST: usize = 64;
        // Once one event did not fit, none after it is kept either: the continuation holds an
        // unbroken stretch of what was shown, then a marker where it stops, never later
        // pieces that happened to fit (which joined lines into ones nobody saw).
        if self.dropped_bytes > 0 {
            self.dropped_bytes += data.len() as u64;
        } else if self.gap_bytes + data.len() + EVENT_COST > GAP_MAX_BYTES {
            self.dropped_bytes += data.len() as u64;
            self.gap
                .push((t, EventCode::Marker, GAP_CUT_MARKER.to_owned()));
        } else {
            self.gap_bytes += data.len() + EVENT_COST;
            self.gap.push((t, code, data.to_owned()));
        }
    }

    /// Under enforce: why the session must end now (no daemon came back in time, or more
    /// output than the gap holds), if it must.
    pub(super) fn overdue(&self, now: Duration) -> Option<String> {
        if self.dropped_bytes > 0 {
            Some("the recording daemon stopped, and more output came than can wait for it".into())
        } else if now >= self.since + ENFORCE_GRACE {
            Some("the recording daemon stopped and did not come back".into())
        } else {
            None
        }
    }

    /// How long the session's end waits for a daemon: a moment when output waits for one.
    pub(super) fn patience(&self) -> Duration {
        if self.gap.is_empty() {
            Duration::ZERO
        } else {
            RESUME_AT_EXIT
        }
    }

    /// Time zero of the recording that continues the session: its first event, or now.
    pub(super) fn base(&self, now: Duration) -> Duration {
        self.gap.first().map(|g| g.0).unwrap_or(now)
    }

    /// Asks the daemon at `socket` to record the rest of the session: the session's Start,
    /// with a header from time zero `base` (the wall clock of that moment, the current size)
    /// and `continues` naming the previous recording.
    pub(super) fn ask(
        &self,
        socket: &Path,
        start: &StartMsg,
        size: TtySize,
        now: Duration,
    ) -> Resumed {
        let mut start = start.clone();
        let mut header = Header::new(size, None);
        header.env = start.header.env.take();
        header.command = start.header.command.take();
        let ago = now.saturating_sub(self.base(now)).as_secs() as i64;
        header.timestamp = Some(unix_now() - ago);
        start.header = header;
        if let Some(c) = &self.continues {
            start
                .metadata
                .insert("continues".into(), Value::from(c.clone()));
        }
        if self.dropped_bytes > 0 {
            start
                .metadata
                .insert("gap_dropped_bytes".into(), Value::from(self.dropped_bytes));
        }
        match open_session(socket, &start) {
            Ok((s, d)) => match d.mode {
                Mode::Record => {
                    syslog_warn(&format!(
                        "recording resumed after the daemon's restart ({} bytes of output lost meanwhile)",
                        self.dropped_bytes
                    ));
                    Resumed::Record(s, d.session)
                }
                Mode::Unrecorded => Resumed::Off,
                Mode::Refused => Resumed::Later,
            },
            Err(_) => Resumed::Later,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the limit nothing more is kept, even what would still fit: an unbroken stretch,
    /// then the marker.
    #[test]
    fn the_gap_keeps_an_unbroken_stretch_then_a_marker() {
        let mut r = Resume::new(None, Duration::ZERO);
        let line = "x".repeat(1000);
        let mut shown = 0u64;
        let mut i = 0u64;
        while r.dropped_bytes == 0 {
            r.keep(Duration::from_millis(i), EventCode::Output, &line);
            shown += line.len() as u64;
            i += 1;
        }
        r.keep(Duration::from_millis(i), EventCode::Output, "y");
        shown += 1;
        let kept: u64 = r
            .gap
            .iter()
            .filter(|e| e.1 == EventCode::Output)
            .map(|e| e.2.len() as u64)
            .sum();
        assert!(r.gap.iter().all(|e| e.2 != "y"), "a later piece was kept");
        let last = r.gap.last().unwrap();
        assert_eq!(
            (last.1, last.2.as_str()),
            (EventCode::Marker, GAP_CUT_MARKER)
        );
        assert_eq!(kept + r.dropped_bytes, shown);
        assert!(r.gap_bytes <= GAP_MAX_BYTES);
    }
}
