//! The PTY path: the recorder core runs the program in a new PTY and a sink sends its events
//! to the daemon; the sink follows the daemon through a restart.

use super::backlog::{self, Backlog};
use super::resume::{retry_for, Resume, Resumed, ENFORCE_GRACE};
use super::*;

/// Events to the daemon over the session's socket (PTY sessions).
///
/// When the daemon stops in order (a restart, a package upgrade) the session goes on, and the
/// sink reconnects to the next daemon as soon as it answers: the rest of the session becomes
/// a new recording whose `continues` names the first one's `agent_session`, with the output
/// of the gap kept (up to [`super::resume::GAP_MAX_BYTES`]).
struct DaemonSink {
    link: Link,
    buf: Vec<u8>,
    /// Set once End is sent: the daemon closing after that is no loss.
    ended: Arc<AtomicBool>,
    /// What a watch thread needs, for the link of a resumed recording.
    watch: WatchCtx,
    socket: PathBuf,
    /// The Start of the session, resent (with `continues`) to resume.
    start: StartMsg,
    size: TtySize,
    /// Session time that is time zero of the current recording (zero until a resume).
    rebase: Duration,
    /// Reconnecting after an orderly stop.
    resume: Option<Resume>,
    /// The daemon stopped in order and will not record the rest (recording switched off).
    given_up: bool,
    /// An event line re-encoded against `rebase`.
    line: Vec<u8>,
    /// What a daemon that stopped taking output (but is still there) has not taken yet (see
    /// [`Backlog`]).
    backlog: Option<Backlog>,
    /// The latest session time the sink was told of (an event's or a tick's).
    now: Duration,
}

/// One connection to the daemon, and what its watch thread tells about it.
struct Link {
    stream: UnixStream,
    /// The daemon's local id of the recording.
    session: Option<String>,
    /// The daemon's answer to End, read by the watch thread.
    acks: mpsc::Receiver<Result<(), String>>,
    /// Set by the watch thread when the daemon stopped in order: events go to the gap buffer
    /// until a daemon takes the session again, whatever the enforce policy.
    orderly: Arc<AtomicBool>,
    /// Set with `orderly` under enforce: the relay is held, and this daemon still gets what was
    /// shown until the relay says it stopped ([`DaemonSink::held`]).
    drain: Arc<AtomicBool>,
    /// Our side is closed: the daemon has all it gets from this link.
    let_go: bool,
    /// When the sink first saw `drain` (session time): the relay of a silent program never
    /// says it stopped, so the daemon is let go after [`DRAIN_WAIT`] all the same.
    drain_seen: Option<Duration>,
    /// Set by the watch thread when the daemon stopped recording this session (its spool is
    /// full) or went away: events are no longer sent, only the End (for the exit status).
    stopped: Arc<AtomicBool>,
}

/// Shared by every watch thread of a session.
#[derive(Clone)]
struct WatchCtx {
    control: recorder::Control,
    ended: Arc<AtomicBool>,
    lost: Arc<Mutex<Option<String>>>,
    enforce: bool,
}

impl Link {
    /// Starts the thread that reads what the daemon says before our End: anything (an Error
    /// frame, end of file) means it is gone or stopped recording. Under enforce the session
    /// ends then, even if the program is silent and no write would notice.
    fn open(stream: UnixStream, session: Option<String>, ctx: &WatchCtx) -> io::Result<Link> {
        let orderly = Arc::new(AtomicBool::new(false));
        let drain = Arc::new(AtomicBool::new(false));
        let stopped = Arc::new(AtomicBool::new(false));
        let (ack_tx, acks) = mpsc::channel();
        let mut watch = stream.try_clone()?;
        let ctx = ctx.clone();
        let (o, d, s) = (orderly.clone(), drain.clone(), stopped.clone());
        std::thread::Builder::new()
            .name("daemon-watch".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let (r, stopping) = match daemon_word(&mut watch) {
                    DaemonWord::Ack => (Ok(()), false),
                    DaemonWord::Stopping(why) => (Err(why), true),
                    DaemonWord::SpoolFull(why) => (Err(why), false),
                    // A daemon killed outright (a crash, the OOM killer) comes back too, under
                    // systemd's `Restart=`: without enforce, the session waits for it as for
                    // one that stopped in order, and the rest is recorded. Under enforce it
                    // ends, since what was in flight is lost.
                    DaemonWord::Gone(why) => (Err(why), !ctx.enforce),
                };
                if let Err(why) = &r {
                    if stopping {
                        // An orderly stop (upgrade, restart) keeps users' sessions running.
                        // Closing our side tells the daemon that what we sent is all it gets;
                        // the rest waits for the next daemon. Under enforce nothing is shown
                        // meanwhile: output shown but kept only in our memory would be lost
                        // if no daemon came back, so the relay is held, and the sink closes
                        // our side once what was shown has reached this daemon.
                        if ctx.enforce {
                            d.store(true, Ordering::SeqCst);
                            ctx.control.hold();
                        } else {
                            let _ = watch.shutdown(std::net::Shutdown::Write);
                        }
                        o.store(true, Ordering::SeqCst);
                        syslog_warn(&format!("recording paused until the daemon is back: {why}"));
                    } else if !ctx.ended.load(Ordering::SeqCst) {
                        s.store(true, Ordering::SeqCst);
                        if let Ok(mut l) = ctx.lost.lock() {
                            *l = Some(why.clone());
                        }
                        if ctx.enforce {
                            ctx.control.terminate();
                        } else {
                            syslog_warn(&format!(
                                "recording stopped, session goes on unrecorded: {why}"
                            ));
                        }
                    }
                }
                let _ = ack_tx.send(r);
            })?;
        Ok(Link {
            stream,
            session,
            acks,
            orderly,
            drain,
            let_go: false,
            drain_seen: None,
            stopped,
        })
    }
}

impl DaemonSink {
    /// A failed write is no failure if the daemon said it is stopping (its Error frame may
    /// reach the watch thread just after our write noticed the closed socket).
    fn tolerate(&self, e: io::Error) -> io::Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(300) {
            if self.link.orderly.load(Ordering::SeqCst) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(e)
    }

    /// Whether the daemon stopped in order and still gets what was shown (under enforce, until
    /// the relay is held).
    fn draining(&self) -> bool {
        self.link.drain.load(Ordering::SeqCst) && !self.link.let_go
    }

    /// Whether the current link no longer records (the daemon stopped in order): from then on
    /// events wait in the gap buffer for the next daemon.
    fn paused(&mut self, now: Duration) -> bool {
        if self.given_up {
            return true;
        }
        if self.resume.is_none() && self.link.orderly.load(Ordering::SeqCst) && !self.draining() {
            let mut r = Resume::new(self.link.session.clone(), now);
            // The frame the stopping daemon did not take waits with the rest.
            let unsent = std::mem::take(&mut self.buf);
            let lines = unsent.get(ipc::HEAD_BYTES..).unwrap_or_default();
            for (i, l) in String::from_utf8_lossy(lines).lines().enumerate() {
                if let Ok(e) = ztna_common::asciicast::parse_event_line(l, i + 1) {
                    let t = self.rebase + Duration::from_secs_f64(e.time);
                    r.keep(t, e.code, &e.data);
                }
            }
            self.resume = Some(r);
        }
        self.resume.is_some()
    }

    /// Tries to hand the rest of the session to a daemon (one attempt, when one is due).
    fn try_resume(&mut self, now: Duration, force: bool) {
        let Some(r) = self.resume.as_mut() else {
            return;
        };
        if !r.due(now, force) {
            return;
        }
        let (stream, session) = match r.ask(&self.socket, &self.start, self.size, now) {
            Resumed::Record(s, id) => (s, id),
            Resumed::Off => {
                // Recording is switched off: the rest runs unrecorded, whatever enforce says.
                self.resume = None;
                self.given_up = true;
                self.watch.control.release();
                return;
            }
            Resumed::Later => return,
        };
        let Ok(link) = Link::open(stream, session, &self.watch) else {
            return;
        };
        let Some(r) = self.resume.take() else { return };
        self.link = link;
        self.rebase = r.base(now);
        for (t, code, data) in &r.gap {
            if self.queue_event(*t, *code, data).is_err() {
                break;
            }
        }
        // What the relay holds is in the gap: it may be shown now.
        self.watch.control.release();
    }

    /// Under enforce, once the relay is held (or the session ends): lets the stopping daemon go
    /// with everything shown, and waits for the next one.
    fn let_go(&mut self, now: Duration) {
        if !self.draining() {
            return;
        }
        // A failed send is the daemon already gone: the frame stays, for the next one.
        let _ = self.send_pending();
        let _ = self.link.stream.shutdown(std::net::Shutdown::Write);
        self.link.let_go = true;
        self.paused(now);
    }

    /// Keeps an event for the next daemon.
    fn keep(&mut self, ev: &Event<'_>) {
        if let (Some(r), Some((code, data))) = (self.resume.as_mut(), code_and_data(&ev.kind)) {
            r.keep(ev.time, code, &data);
        }
    }

    /// Under enforce, ends the session once the daemon's absence outlasts what it may.
    fn enforce_grace(&mut self, now: Duration) {
        if !self.watch.enforce {
            return;
        }
        if self.resume.as_ref().and_then(|r| r.overdue(now)).is_none() {
            return;
        }
        // One last try: a daemon that came back since the last one ends nothing.
        self.try_resume(now, true);
        let Some(why) = self.resume.as_ref().and_then(|r| r.overdue(now)) else {
            return;
        };
        if let Ok(mut l) = self.watch.lost.lock() {
            *l = Some(why.clone());
        }
        syslog_warn(&format!("session ended (enforce = true): {why}"));
        self.resume = None;
        self.given_up = true;
        self.watch.control.terminate();
    }

    /// Queues one event re-encoded against `rebase`.
    fn queue_event(&mut self, t: Duration, code: EventCode, data: &str) -> io::Result<()> {
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        encode_event(
            &mut line,
            t.saturating_sub(self.rebase).as_secs_f64(),
            code,
            data,
        );
        let r = self.queue_line(&line);
        self.line = line;
        r
    }
}

/// An asciicast event's code and data (`None` for the exit).
fn code_and_data<'a>(kind: &EventKind<'a>) -> Option<(EventCode, std::borrow::Cow<'a, str>)> {
    Some(match kind {
        EventKind::Output(s) => (EventCode::Output, (*s).into()),
        EventKind::Input(s) => (EventCode::Input, (*s).into()),
        EventKind::Marker(s) => (EventCode::Marker, (*s).into()),
        EventKind::Resize(size) => (EventCode::Resize, size.to_string().into()),
        EventKind::Exit(_) => return None,
    })
}

/// How long a stopping daemon is sent what was shown when the relay does not say it stopped
/// (a silent program): the daemon waits 0.5 s for a session to close its side.
const DRAIN_WAIT: Duration = Duration::from_millis(450);

/// The size at which the Events frame being built is sent without waiting for the batch's end.
const FRAME_TARGET: usize = 32 * 1024;

/// How often what waits for a daemon that took no output is offered again.
const BACKLOG_RETRY: Duration = Duration::from_millis(50);

impl DaemonSink {
    /// Adds one event line to the Events frame being built (a frame carries any number of
    /// lines: one write and one wake-up of the daemon per batch, not per read), sending the
    /// frame first if the line would take it over the limit.
    fn queue_line(&mut self, line: &[u8]) -> io::Result<()> {
        if line.len() > ipc::MAX_FRAME_BYTES {
            // One event can never be this large (reads are 16 KiB); refuse rather than split.
            return Err(io::Error::other("event over the frame limit"));
        }
        if !self.buf.is_empty()
            && self.buf.len() - ipc::HEAD_BYTES + line.len() > ipc::MAX_FRAME_BYTES
        {
            self.send_pending()?;
        }
        if self.buf.is_empty() {
            // The head is written once the payload's length is known (send_pending).
            self.buf.extend_from_slice(&[0; ipc::HEAD_BYTES]);
        }
        self.buf.extend_from_slice(line);
        if self.buf.len() >= FRAME_TARGET {
            // Frames this size already amortise the write and the daemon's wake-up; larger
            // ones would only grow what the daemon holds per live session.
            self.send_pending()?;
        }
        Ok(())
    }

    /// Sends the Events frame being built, if any (behind what waits in the backlog).
    fn send_pending(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return self.drain_backlog();
        }
        let head = ipc::head(Kind::Events, self.buf.len() - ipc::HEAD_BYTES).map_err(frame_io)?;
        self.buf[..ipc::HEAD_BYTES].copy_from_slice(&head);
        if self.backlog.is_some() {
            self.push_backlog();
            return self.drain_backlog();
        }
        match backlog::send(&self.link.stream, &self.buf, !self.watch.enforce) {
            Ok(waiting) => {
                self.backlog = waiting;
                self.buf.clear();
                Ok(())
            }
            // Kept when the daemon stopped in order: the frame goes to the next one.
            Err(e) => self.tolerate(e).inspect_err(|_| self.buf.clear()),
        }
    }

    /// Puts the frame being built behind what waits (or drops it behind the marker).
    fn push_backlog(&mut self) {
        if let Some(b) = self.backlog.as_mut() {
            // At the time of the latest event.
            b.push(
                &self.buf,
                self.now.saturating_sub(self.rebase).as_secs_f64(),
            );
        }
        self.buf.clear();
    }

    /// Hands the daemon what it takes of the backlog now, without waiting; once it has taken
    /// all, frames are sent as before.
    fn drain_backlog(&mut self) -> io::Result<()> {
        let Some(b) = self.backlog.as_mut() else {
            return Ok(());
        };
        match b.offer(&self.link.stream) {
            Ok(false) => return Ok(()),
            Ok(true) => {}
            Err(e) => {
                // Gone after all: what waited is lost with the link, and the session follows
                // the daemon's going as without a backlog.
                self.backlog = None;
                return self.tolerate(e);
            }
        }
        self.backlog = None;
        Ok(())
    }

    /// Before the End: what waits is sent, waiting for the daemon as for any frame.
    fn finish_backlog(&mut self) -> io::Result<()> {
        match self.backlog.take() {
            Some(b) => b.finish(&self.link.stream),
            None => Ok(()),
        }
    }
}

fn frame_io(e: FrameError) -> io::Error {
    match e {
        FrameError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl DaemonSink {
    /// Tells the daemon how the session ended and waits until it has taken that.
    fn end(&mut self, code: i32, metadata: Map<String, Value>) -> io::Result<()> {
        self.ended.store(true, Ordering::SeqCst);
        let end = EndMsg {
            exit_status: Some(code),
            metadata,
        };
        let f = Frame::json(Kind::End, &end).map_err(io::Error::other)?;
        ipc::write_frame(&mut self.link.stream, f.kind, &f.payload).map_err(frame_io)?;
        match self.link.acks.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io::Error::other(e)),
            Err(_) => Err(io::Error::other("no answer from the recording daemon")),
        }
    }
}

impl Sink for DaemonSink {
    fn name(&self) -> String {
        "recording daemon".into()
    }

    fn start(&mut self, header: &Header) -> io::Result<()> {
        self.size = header.size();
        Ok(())
    }

    fn event(&mut self, event: &Event<'_>) -> io::Result<()> {
        self.now = self.now.max(event.time);
        if let EventKind::Resize(s) = event.kind {
            self.size = s;
        }
        if let EventKind::Exit(_) = event.kind {
            self.let_go(event.time);
        }
        if self.paused(event.time) {
            match event.kind {
                EventKind::Exit(_) => {
                    // Output waits for a daemon: give it a moment to come back.
                    let patience = self
                        .resume
                        .as_ref()
                        .map_or(Duration::ZERO, Resume::patience);
                    retry_for(patience, || {
                        self.try_resume(event.time, true);
                        self.resume.is_none()
                    });
                    if self.given_up || self.resume.is_some() {
                        return Ok(());
                    }
                }
                _ => {
                    // The daemon is asked before the event is kept: once it is back, the
                    // event is recorded, even when the gap is full (it would be dropped).
                    self.try_resume(event.time, false);
                    if self.paused(event.time) {
                        self.keep(event);
                        self.enforce_grace(event.time);
                        return Ok(());
                    }
                }
            }
        }
        match event.kind {
            EventKind::Exit(status) => {
                self.send_pending()?;
                self.finish_backlog()?;
                if self.link.orderly.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let mut meta = Map::new();
                let code = exit_metadata(status, &mut meta);
                self.end(code, meta)
            }
            // Under enforce the events of a session being ended are still sent: output shown
            // before the shell heard of the cut is among them, and the daemon spools it.
            _ if self.link.stopped.load(Ordering::Relaxed) && !self.watch.enforce => Ok(()),
            _ if self.rebase.is_zero() => match event.asciicast_line() {
                Some(line) => self.queue_line(line),
                None => Ok(()),
            },
            ref k => match code_and_data(k) {
                Some((code, data)) => self.queue_event(event.time, code, &data),
                None => Ok(()),
            },
        }
    }

    /// As the piped path says it: a shell's exit status (127 or 126) and why, not a session
    /// that was cut off.
    fn not_started(&mut self, reason: &str, status: u8) -> io::Result<()> {
        let mut meta = Map::new();
        meta.insert("error".into(), Value::from(reason));
        self.end(i32::from(status), meta)
    }

    fn next_deadline(&self) -> Option<Duration> {
        if self.backlog.is_some() {
            // A silent program sends nothing that would push the backlog on.
            return Some(self.now + BACKLOG_RETRY);
        }
        if self.draining() {
            return Some(
                self.link
                    .drain_seen
                    .map_or(Duration::ZERO, |t| t + DRAIN_WAIT),
            );
        }
        let r = self.resume.as_ref()?;
        Some(if self.watch.enforce {
            r.next_try.min(r.since + ENFORCE_GRACE)
        } else {
            r.next_try
        })
    }

    fn tick(&mut self, now: Duration) -> io::Result<()> {
        self.now = self.now.max(now);
        self.drain_backlog()?;
        if self.draining() {
            match self.link.drain_seen {
                None => self.link.drain_seen = Some(now),
                // Everything shown reached the daemon meanwhile, unless the relay is still
                // writing it to a slow client (then it waits for the next daemon).
                Some(t) if now >= t + DRAIN_WAIT => self.let_go(now),
                Some(_) => {}
            }
        }
        self.try_resume(now, false);
        self.enforce_grace(now);
        Ok(())
    }

    fn held(&mut self, now: Duration) -> io::Result<()> {
        self.let_go(now);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.link.orderly.load(Ordering::Relaxed)
            && self.resume.is_none()
            && !self.given_up
            && !self.draining()
        {
            // Held for the next daemon (see `paused`).
            return Ok(());
        }
        let stopped = self.link.stopped.load(Ordering::Relaxed) && !self.watch.enforce;
        if self.resume.is_some() || self.given_up || stopped {
            self.buf.clear();
            return Ok(());
        }
        self.send_pending()
    }

    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub(super) fn run_pty(
    cfg: &Config,
    stream: UnixStream,
    session_id: Option<String>,
    start: &StartMsg,
    acct: &Account,
    command: Option<&std::ffi::OsStr>,
) -> anyhow::Result<u8> {
    let cmd = match command {
        Some(c) => Command::shell_command(&acct.shell, c),
        None => {
            let mut c = Command::login_shell();
            c.env("SHELL", &acct.shell);
            c
        }
    };
    let mut sc = SessionConfig::new(cmd);
    sc.header_command = command.map(|c| c.to_string_lossy().into_owned());
    sc.capture_input = cfg.capture_input;
    sc.sink_policy = if cfg.enforce {
        SinkPolicy::FailClosed
    } else {
        SinkPolicy::FailOpen
    };
    let session = Session::new(sc);
    let ended = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(Mutex::new(None::<String>));
    let watch = WatchCtx {
        control: session.control(),
        ended: ended.clone(),
        lost: lost.clone(),
        enforce: cfg.enforce,
    };
    let link = Link::open(stream, session_id, &watch)?;
    let sink = DaemonSink {
        link,
        buf: Vec::with_capacity(32 * 1024),
        ended,
        watch,
        socket: cfg.socket.clone(),
        start: start.clone(),
        size: start.header.size(),
        rebase: Duration::ZERO,
        resume: None,
        given_up: false,
        line: Vec::new(),
        backlog: None,
        now: Duration::ZERO,
    };
    let outcome = match session.run(vec![Box::new(sink)]) {
        Ok(o) => o,
        Err(recorder::Error::SinkStart(f)) => return Ok(refuse(&f.error)),
        Err(e @ recorder::Error::Spawn { status, .. }) => {
            eprintln!("ztna-recorder: {e}");
            return Ok(status);
        }
        Err(e) => return Err(e.into()),
    };
    let lost = lost.lock().ok().and_then(|l| l.clone());
    if lost.is_none() {
        for f in &outcome.sink_failures {
            syslog_warn(&format!(
                "recording stopped, session went on unrecorded: {f}"
            ));
        }
    }
    let closed =
        cfg.enforce && (lost.is_some() || outcome.termination == Some(Termination::SinkFailed));
    if closed {
        let why = lost
            .or_else(|| outcome.sink_failures.first().map(|f| f.error.clone()))
            .unwrap_or_else(|| "recording failed".into());
        // The terminal is back in its own mode by now: a newline is a new line.
        eprintln!("\nztna-recorder: the recording stopped ({why}); session ended.");
        return Ok(1);
    }
    Ok(outcome.status.code())
}
