//! The sink trait: where a session's events go, and what happens when one fails.

use super::event::Event;
use std::io;
use std::time::Duration;
use ztna_common::asciicast::Header;

/// A destination for a session's events. Called from one thread at a time (the session's
/// recorder thread once the program runs), in order: [`start`](Sink::start) once, [`event`](Sink::event) for each event (the last one is
/// [`EventKind::Exit`](super::EventKind::Exit)) or [`not_started`](Sink::not_started) once,
/// then [`finish`](Sink::finish) once.
///
/// A sink that blocks slows the session down (bounded memory, nothing dropped); a sink that
/// returns an error is dropped from the session and reported in
/// [`Outcome::sink_failures`](super::Outcome::sink_failures); no more calls reach it.
pub trait Sink: Send {
    /// A short name for error reports ("file /tmp/x.cast", "daemon").
    fn name(&self) -> String {
        String::from("sink")
    }

    /// Before any event, with the recording's header.
    fn start(&mut self, header: &Header) -> io::Result<()>;

    /// One event. `event.asciicast_line()` is its encoded line.
    fn event(&mut self, event: &Event<'_>) -> io::Result<()>;

    /// The longest event line this sink takes, if it has a limit: the session then hands out
    /// longer output as several events of the same time, to every sink alike (so a file and
    /// a chunk directory of one session still hold the same lines).
    fn max_line(&self) -> Option<usize> {
        None
    }

    /// The session time at which this sink wants [`tick`](Sink::tick) called even if no event
    /// arrives (a chunk to close on time), if any.
    fn next_deadline(&self) -> Option<Duration> {
        None
    }

    /// Called once `next_deadline` has passed, with the current session time.
    fn tick(&mut self, _now: Duration) -> io::Result<()> {
        Ok(())
    }

    /// After each batch of events the recorder handled at once (up to tens of KiB of output,
    /// or what came within a few milliseconds): a sink that buffers hands it on here, so that
    /// bulk output costs one write per batch, not one per read.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// The relay stopped showing output at the session's request
    /// ([`Control::hold`](super::Control::hold)): every event shown so far has reached this
    /// sink.
    fn held(&mut self, _now: Duration) -> io::Result<()> {
        Ok(())
    }

    /// Instead of any event, when the program could not be started (`reason` says why,
    /// `status` is a shell's exit status for it: 127 or 126); [`finish`](Sink::finish) follows.
    fn not_started(&mut self, _reason: &str, _status: u8) -> io::Result<()> {
        Ok(())
    }

    /// After the last event: flush and make durable.
    fn finish(&mut self) -> io::Result<()>;
}

impl<S: Sink + ?Sized> Sink for Box<S> {
    fn name(&self) -> String {
        (**self).name()
    }
    fn start(&mut self, header: &Header) -> io::Result<()> {
        (**self).start(header)
    }
    fn event(&mut self, event: &Event<'_>) -> io::Result<()> {
        (**self).event(event)
    }
    fn max_line(&self) -> Option<usize> {
        (**self).max_line()
    }
    fn next_deadline(&self) -> Option<Duration> {
        (**self).next_deadline()
    }
    fn tick(&mut self, now: Duration) -> io::Result<()> {
        (**self).tick(now)
    }
    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
    }
    fn held(&mut self, now: Duration) -> io::Result<()> {
        (**self).held(now)
    }
    fn not_started(&mut self, reason: &str, status: u8) -> io::Result<()> {
        (**self).not_started(reason, status)
    }
    fn finish(&mut self) -> io::Result<()> {
        (**self).finish()
    }
}

/// What a session does when a sink fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SinkPolicy {
    /// Keep the session going without that sink (the default).
    #[default]
    FailOpen,
    /// A sink that fails to start refuses the session (the program is never started); a sink
    /// that fails later hangs up on the program.
    FailClosed,
    /// A sink that fails to start refuses the session, as under `FailClosed`; one that fails
    /// later is dropped and reported, as under `FailOpen`: for a recording asked for by hand,
    /// where not starting loses nothing but ending the program would.
    RefuseAtStart,
}

/// A sink that failed, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkFailure {
    /// The sink's [`Sink::name`].
    pub sink: String,
    /// Which call failed: "start", "event", "flush", "tick", "held" or "finish".
    pub during: &'static str,
    pub error: String,
    /// Session time of the failure.
    pub at: Duration,
}

impl std::fmt::Display for SinkFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed during {} at {:.3}s: {}",
            self.sink,
            self.during,
            self.at.as_secs_f64(),
            self.error
        )
    }
}
