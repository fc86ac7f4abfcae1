//! The piped path (`ssh host cmd`, file transfers): the program's stdin, stdout and stderr
//! relayed byte-exact through pipes, its output sent to the daemon as `o` events (or only
//! counted, for a transfer).

use super::backlog::{self, Backlog};
use super::resume::{retry_for, Resume, Resumed};
use super::*;

/// Shared by the relay threads of a piped session: the daemon connection and the clock.
struct Recording {
    stream: Mutex<Option<UnixStream>>,
    started: Instant,
    /// Set when the daemon is gone.
    lost: AtomicBool,
    lost_why: Mutex<String>,
    /// The daemon said it was stopping (not a failure: the session keeps running, and a
    /// daemon that comes back records the rest).
    stopped_orderly: AtomicBool,
    /// Under enforce, the recording was lost: the relays stop showing output at once (the
    /// program is ended meanwhile).
    cut: AtomicBool,
    /// The daemon stopped recording this session (its spool is full) but still listens: it
    /// gets the End, for the exit status.
    listening: AtomicBool,
    /// Time of the last event (since `started`), and time zero of the current recording.
    clock: Mutex<(Duration, Duration)>,
    /// What resuming after an orderly stop needs.
    socket: PathBuf,
    start: StartMsg,
    enforce: bool,
    lost_tx: mpsc::Sender<String>,
    /// The current recording's local id; the resume in progress, if any; and whether the
    /// daemon said the rest is not to be recorded.
    resume: Mutex<(Option<String>, Option<Resume>, bool)>,
    /// Output a daemon that is still there but took none in time has not taken yet (see
    /// [`Backlog`]). Locked after `stream`.
    backlog: Mutex<Option<Backlog>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    }
}

impl Recording {
    /// Sends output (or captured input) as one event, or keeps it for a daemon that stopped in
    /// order.
    fn event(
        self: &Arc<Self>,
        code: EventCode,
        text: &str,
        line: &mut Vec<u8>,
        frame: &mut Vec<u8>,
    ) {
        if text.is_empty() {
            return;
        }
        let mut guard = locked(&self.stream);
        // Under the lock, so times never go backwards between the stdout and stderr threads.
        let (now, base) = {
            let mut clock = locked(&self.clock);
            clock.0 = clock.0.max(self.started.elapsed());
            *clock
        };
        // Acquire: a relay that sees `lost` then sees the `cut` set before it (and shows
        // nothing it could not send).
        if self.lost.load(Ordering::Acquire) {
            self.pause_and_resume(&mut guard, Some((code, text)), now, false);
            self.hold(&mut guard);
            return;
        }
        let Some(s) = guard.as_mut() else { return };
        if self.enforce && cut_pending(s) {
            // Not sent, so not shown: the session is being ended (see `cut_pending`).
            self.cut.store(true, Ordering::SeqCst);
            return;
        }
        line.clear();
        encode_event(line, now.saturating_sub(base).as_secs_f64(), code, text);
        let Ok(head) = ipc::head(Kind::Events, line.len()) else {
            return;
        };
        frame.clear();
        frame.extend_from_slice(&head);
        frame.extend_from_slice(line);
        let mut backlog = locked(&self.backlog);
        let sent = match backlog.as_mut() {
            Some(b) => {
                // Behind what waits, in order.
                b.push(frame, now.saturating_sub(base).as_secs_f64());
                let taken = b.offer(s);
                if matches!(taken, Ok(true)) {
                    *backlog = None;
                }
                taken.map(drop)
            }
            // What waits is offered again as events come, and every 10 ms (`offer_backlog`).
            None => backlog::send(s, frame, !self.enforce).map(|waiting| *backlog = waiting),
        };
        if let Err(e) = sent {
            // Gone: what waited for it is lost with the connection.
            *backlog = None;
            drop(backlog);
            if self.enforce && e.kind() == io::ErrorKind::TimedOut {
                // (Without enforce the output would wait in a backlog.) Still there
                // but taking nothing, so it will neither say it stops nor close the socket.
                // Nothing is kept for a next daemon, and the session ends as when the daemon
                // is gone; not shown, since it was not recorded.
                self.cut.store(true, Ordering::SeqCst);
                self.mark_lost(&e.to_string());
                self.give_up_resume();
                let _ = self.lost_tx.send(e.to_string());
                return;
            }
            self.mark_lost(&format!("recording daemon: {e}"));
            // The daemon may have stopped in order (its watch thread is about to say so):
            // the output waits for the next one.
            self.pause_and_resume(&mut guard, Some((code, text)), now, false);
            self.hold(&mut guard);
        }
    }

    /// Offers what waits for a daemon that took no output in time, when nothing else holds
    /// the connection (a silent program sends no event that would).
    fn offer_backlog(&self) {
        let Ok(guard) = self.stream.try_lock() else {
            return;
        };
        let mut backlog = locked(&self.backlog);
        let (Some(b), Some(s)) = (backlog.as_mut(), guard.as_ref()) else {
            return;
        };
        match b.offer(s) {
            Ok(false) => {}
            Ok(true) => *backlog = None,
            Err(e) => {
                *backlog = None;
                self.mark_lost(&format!("recording daemon: {e}"));
            }
        }
    }

    /// Under enforce, with the recording lost: shows nothing until a daemon records the
    /// session again (what was kept for it is sent first), recording is switched off, or the
    /// session is being ended (`cut`: never shown). Output shown while only our memory held
    /// it would be lost if no daemon came back. Called with the stream's lock held: the other
    /// relays wait too.
    fn hold(self: &Arc<Self>, stream: &mut Option<UnixStream>) {
        if !self.enforce {
            return;
        }
        while self.lost.load(Ordering::SeqCst)
            && !self.cut.load(Ordering::SeqCst)
            && !locked(&self.resume).2
        {
            if self.overdue().is_some() {
                // One last try: a daemon that came back since the last one ends nothing.
                self.pause_and_resume(stream, None, self.started.elapsed(), true);
                if self.overdue().is_some() {
                    // The program may have ended already, with no one else to look.
                    self.cut.store(true, Ordering::SeqCst);
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
            self.pause_and_resume(stream, None, self.started.elapsed(), false);
        }
    }

    fn mark_lost(&self, why: &str) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            if let Ok(mut w) = self.lost_why.lock() {
                *w = why.to_string();
            }
        }
    }

    /// Gives the rest of the session to a daemon that came back after an orderly stop, on the
    /// resume's schedule, also while the program is silent: a relay tries only as output
    /// comes, and without enforce nothing else would until then.
    fn resume_when_due(self: &Arc<Self>) {
        if !self.lost.load(Ordering::SeqCst) || !self.stopped_orderly.load(Ordering::SeqCst) {
            return;
        }
        // A relay that holds the stream tries itself.
        if let Ok(mut guard) = self.stream.try_lock() {
            self.pause_and_resume(&mut guard, None, self.started.elapsed(), false);
        }
    }

    /// As [`overdue`](Self::overdue), after one last try to give the session to a daemon (unless
    /// a relay holds the stream: it tries itself).
    fn overdue_after_trying(self: &Arc<Self>) -> Option<String> {
        self.overdue()?;
        if let Ok(mut guard) = self.stream.try_lock() {
            self.pause_and_resume(&mut guard, None, self.started.elapsed(), true);
        }
        self.overdue()
    }

    /// Under enforce: why the session must end now, while the daemon that stopped in order is
    /// away (see [`Resume::overdue`]).
    fn overdue(&self) -> Option<String> {
        if !self.enforce || !self.stopped_orderly.load(Ordering::SeqCst) {
            return None;
        }
        let st = locked(&self.resume);
        st.1.as_ref()?.overdue(self.started.elapsed())
    }

    /// The daemon went away without stopping in order: nothing is resumed, and nothing is
    /// kept for it.
    fn give_up_resume(&self) {
        let mut st = locked(&self.resume);
        st.1 = None;
        st.2 = true;
    }

    /// With the recording lost: keeps `text` for a daemon that stopped in order, and tries
    /// (when due, or `force`) to give the rest of the session to the next daemon. Called with
    /// the stream's lock held.
    fn pause_and_resume(
        self: &Arc<Self>,
        stream: &mut Option<UnixStream>,
        text: Option<(EventCode, &str)>,
        now: Duration,
        force: bool,
    ) {
        let mut st = locked(&self.resume);
        let (session, resume, off) = &mut *st;
        if *off {
            return;
        }
        let r = resume.get_or_insert_with(|| Resume::new(session.clone(), now));
        // The daemon is asked before `text` is kept: output that comes once it is back is
        // recorded, even when the gap is full (it would be counted as dropped).
        let asked = (self.stopped_orderly.load(Ordering::SeqCst) && r.due(now, force))
            .then(|| r.ask(&self.socket, &self.start, TtySize::default(), now));
        let (new, id) = match asked {
            Some(Resumed::Record(s, id)) => (s, id),
            Some(Resumed::Off) => {
                *off = true;
                *resume = None;
                return;
            }
            Some(Resumed::Later) | None => {
                if let Some((code, t)) = text {
                    r.keep(now, code, t);
                    if self.enforce && r.dropped_bytes > 0 {
                        // Output that can be neither recorded nor kept is not shown (the
                        // session ends: see `overdue`).
                        self.cut.store(true, Ordering::SeqCst);
                    }
                }
                return;
            }
        };
        let Ok(watch) = new.try_clone() else { return };
        let base = r.base(now);
        let mut body = Vec::new();
        for (t, code, data) in &r.gap {
            encode_event(&mut body, t.saturating_sub(base).as_secs_f64(), *code, data);
        }
        if let Some((code, t)) = text {
            encode_event(&mut body, now.saturating_sub(base).as_secs_f64(), code, t);
        }
        *resume = None;
        *session = id;
        drop(st);
        locked(&self.clock).1 = base;
        let mut new = new;
        // The gap in frames under the limit (it holds at most 1 MiB, whole lines).
        // Cut at a line's end, in bytes: escapes make the body up to six times the gap, and a
        // cut at the limit may fall inside a character.
        let mut rest = body.as_slice();
        while !rest.is_empty() {
            let mut cut = rest.len().min(ipc::MAX_FRAME_BYTES);
            if cut < rest.len() {
                cut = memchr::memrchr(b'\n', &rest[..cut]).map_or(cut, |i| i + 1);
            }
            if ipc::write_frame(&mut new, Kind::Events, &rest[..cut]).is_err() {
                return;
            }
            rest = &rest[cut..];
        }
        *stream = Some(new);
        self.stopped_orderly.store(false, Ordering::SeqCst);
        self.listening.store(false, Ordering::SeqCst);
        self.lost.store(false, Ordering::SeqCst);
        let _ = self.watch(watch);
    }

    /// Starts the thread that reads what the daemon says before our End: anything it says
    /// before (or end of file) means it is gone or stopped recording.
    fn watch(self: &Arc<Self>, mut watch: UnixStream) -> io::Result<()> {
        let rec = self.clone();
        let lost_tx = self.lost_tx.clone();
        std::thread::Builder::new()
            .name("daemon-watch".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let (why, stopping) = match daemon_word(&mut watch) {
                    DaemonWord::Ack => return,
                    DaemonWord::Stopping(why) => (why, true),
                    DaemonWord::SpoolFull(why) => {
                        rec.listening.store(true, Ordering::SeqCst);
                        (why, false)
                    }
                    // Killed outright: without enforce, waited for as after an orderly stop
                    // (see `pty`); under enforce the session ends.
                    DaemonWord::Gone(why) => (why, !rec.enforce),
                };
                // (A relay's write may have found the daemon gone first: the decision is
                // made here either way.)
                if stopping {
                    // An orderly stop (upgrade, restart) keeps users' sessions running.
                    let _ = watch.shutdown(std::net::Shutdown::Write);
                    {
                        // From now on the session waits for a daemon to come back.
                        let now = rec.started.elapsed();
                        let mut st = locked(&rec.resume);
                        let (session, resume, _) = &mut *st;
                        resume.get_or_insert_with(|| Resume::new(session.clone(), now));
                    }
                    rec.stopped_orderly.store(true, Ordering::SeqCst);
                    syslog_warn(&format!("recording paused until the daemon is back: {why}"));
                } else if rec.enforce {
                    rec.cut.store(true, Ordering::SeqCst);
                }
                rec.mark_lost(&why);
                if !stopping {
                    rec.give_up_resume();
                    let _ = lost_tx.send(why);
                }
            })
            .map(|_| ())
    }
}

/// Runs the program with pipes: bytes relayed untouched; output recorded as `o` events when
/// `record_output`, else only counted (file transfers).
pub(super) fn run_piped(
    cfg: &Config,
    stream: UnixStream,
    session_id: Option<String>,
    start: &StartMsg,
    p: &Program,
    record_output: bool,
) -> anyhow::Result<u8> {
    let watch = stream.try_clone()?;
    let (lost_tx, lost_rx) = mpsc::channel::<String>();
    let rec = Arc::new(Recording {
        stream: Mutex::new(Some(stream)),
        started: Instant::now(),
        lost: AtomicBool::new(false),
        lost_why: Mutex::new(String::new()),
        stopped_orderly: AtomicBool::new(false),
        cut: AtomicBool::new(false),
        listening: AtomicBool::new(false),
        clock: Mutex::new((Duration::ZERO, Duration::ZERO)),
        socket: cfg.socket.clone(),
        start: start.clone(),
        enforce: cfg.enforce,
        lost_tx,
        resume: Mutex::new((session_id, None, false)),
        backlog: Mutex::new(None),
    });
    // Signals sent to us (a shutdown's SIGTERM) go to the program, as the PTY path passes
    // them on: it ends of them, and the recording ends with how it did, instead of us ending
    // at once with the recording cut and the program left running. Caught from before the
    // spawn (the program starts with default handlers: `exec` resets caught signals).
    let mut signals = signal_hook::iterator::Signals::new(recorder::PASSED_ON)?;
    let program = Path::new(&p.path);
    let spawned = recorder::check_interpreter(program).and_then(|()| {
        std::process::Command::new(&p.path)
            .arg0(&p.arg0)
            .args(&p.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A process group of its own (there is no terminal, so no job control to
            // disturb): what it started goes with it when the session is ended or signalled.
            .process_group(0)
            .spawn()
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let (why, status) = recorder::exec_failure(program, &e);
            eprintln!("ztna-recorder: cannot run {}: {why}", program.display());
            let mut meta = Map::new();
            meta.insert("error".into(), Value::from(why));
            finish_piped(&rec, i32::from(status), meta);
            return Ok(status);
        }
    };
    let bytes_in = Arc::new(AtomicU64::new(0));
    let bytes_out = Arc::new(AtomicU64::new(0));

    rec.watch(watch)?;

    let mut threads = Vec::new();
    if let Some(mut cin) = child.stdin.take() {
        let n = bytes_in.clone();
        // Never a file transfer's contents.
        let capture = (cfg.capture_input && record_output).then(|| rec.clone());
        threads.push(
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut stdin = io::stdin().lock();
                    let mut utf8 = Utf8Repair::new();
                    let (mut line, mut frame) = (Vec::new(), Vec::new());
                    loop {
                        match stdin.read(&mut buf) {
                            Ok(0) => break,
                            Ok(k) => {
                                n.fetch_add(k as u64, Ordering::Relaxed);
                                // Recorded before the program gets it, as output is before
                                // it is shown.
                                if let Some(rec) = &capture {
                                    let text = utf8.push(&buf[..k]);
                                    rec.event(EventCode::Input, text, &mut line, &mut frame);
                                }
                                if cin.write_all(&buf[..k]).is_err() {
                                    break;
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(_) => break,
                        }
                    }
                    if let Some(rec) = &capture {
                        let rest = utf8.finish().to_string();
                        rec.event(EventCode::Input, &rest, &mut line, &mut frame);
                    }
                    // Dropping `cin` closes the program's stdin: end of input passes on.
                })?,
        );
    }
    let mut out_threads = Vec::new();
    if let Some(cout) = child.stdout.take() {
        // Unbuffered writes straight to fd 1: one syscall per read, no line splitting.
        let out =
            std::fs::File::from(std::os::fd::AsFd::as_fd(&io::stdout()).try_clone_to_owned()?);
        out_threads.push(relay_out(
            cout,
            out,
            rec.clone(),
            bytes_out.clone(),
            record_output,
        )?);
    }
    if let Some(cerr) = child.stderr.take() {
        let err =
            std::fs::File::from(std::os::fd::AsFd::as_fd(&io::stderr()).try_clone_to_owned()?);
        out_threads.push(relay_out(
            cerr,
            err,
            rec.clone(),
            bytes_out.clone(),
            record_output,
        )?);
    }

    // Wait for the program, or for the daemon to go away under enforce.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let status = loop {
        for sig in signals.pending() {
            if let Ok(sig) = nix::sys::signal::Signal::try_from(sig) {
                let _ = nix::sys::signal::killpg(pid, sig);
            }
        }
        if let Some(s) = child.try_wait()? {
            break s;
        }
        rec.offer_backlog();
        rec.resume_when_due();
        if cfg.enforce {
            if let Some(why) = lost_rx
                .try_recv()
                .ok()
                .or_else(|| rec.overdue_after_trying())
            {
                rec.cut.store(true, Ordering::SeqCst);
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGTERM);
                std::thread::sleep(Duration::from_millis(500));
                // The whole group: a background job that ignores SIGTERM would go on
                // unrecorded in a session that was ended because it could not be recorded.
                let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
                let ended = child.wait();
                eprintln!("ztna-recorder: the recording stopped ({why}); session ended.");
                if rec.listening.load(Ordering::SeqCst) {
                    // The daemon stopped recording (its spool is full) but waits for the end:
                    // the truncated recording gets how the program ended.
                    let mut meta = Map::new();
                    let code = ended
                        .map(|s| exit_metadata(program_status(s), &mut meta))
                        .unwrap_or(1);
                    finish_piped(&rec, code, meta);
                }
                return Ok(1);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    for t in out_threads {
        let _ = t.join();
    }
    if rec.cut.load(Ordering::SeqCst) {
        // A relay saw the daemon's word before the watch thread read it (`cut_pending`), and
        // the program may have ended of the closed pipe: the word decides how the session
        // ends, so it is waited for (it is already there).
        retry_for(Duration::from_secs(2), || rec.lost.load(Ordering::SeqCst));
    }
    // The program may have ended because its output was cut (SIGPIPE) while the daemon that
    // stopped was away. (A daemon lost otherwise is dealt with below.)
    if let Some(why) = rec.overdue_after_trying() {
        eprintln!("ztna-recorder: the recording stopped ({why}); session ended.");
        return Ok(1);
    }
    // The stdin thread may be blocked reading our stdin: it is not waited for.
    drop(threads);

    let status = program_status(status);
    let mut meta = Map::new();
    let code = exit_metadata(status, &mut meta);
    if !record_output {
        meta.insert(
            "bytes_in".into(),
            Value::from(bytes_in.load(Ordering::Relaxed)),
        );
        meta.insert(
            "bytes_out".into(),
            Value::from(bytes_out.load(Ordering::Relaxed)),
        );
        meta.insert("file_contents_recorded".into(), Value::Bool(false));
    }
    if rec.stopped_orderly.load(Ordering::SeqCst) {
        // The daemon stopped in order: the next one, if it is back (or comes back within a
        // moment, when output is waiting for it), records the rest and the exit status.
        let patience = locked(&rec.resume)
            .1
            .as_ref()
            .map_or(Duration::ZERO, Resume::patience);
        retry_for(patience, || {
            let mut guard = locked(&rec.stream);
            rec.pause_and_resume(&mut guard, None, rec.started.elapsed(), true);
            !rec.lost.load(Ordering::SeqCst)
        });
    }
    if rec.lost.load(Ordering::SeqCst) {
        let why = rec.lost_why.lock().map(|w| w.clone()).unwrap_or_default();
        // A daemon that stopped recording (its spool is full) still takes the end.
        if rec.listening.load(Ordering::SeqCst) {
            finish_piped(&rec, code, meta);
        }
        if cfg.enforce && !rec.stopped_orderly.load(Ordering::SeqCst) {
            eprintln!("ztna-recorder: the recording stopped ({why}); session ended.");
            return Ok(1);
        }
        syslog_warn(&format!(
            "recording stopped, session went on unrecorded: {why}"
        ));
    } else {
        finish_piped(&rec, code, meta);
    }
    Ok(status.code())
}

/// How a piped program ended, as the recorder says it.
fn program_status(s: std::process::ExitStatus) -> ExitStatus {
    match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
        (Some(c), _) => ExitStatus::Code(c),
        (None, Some(n)) => ExitStatus::Signal(n),
        _ => ExitStatus::Code(1),
    }
}

fn finish_piped(rec: &Recording, code: i32, meta: Map<String, Value>) {
    let mut guard = match rec.stream.lock() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    };
    if let Some(mut s) = guard.take() {
        let end = EndMsg {
            exit_status: Some(code),
            metadata: meta,
        };
        // The watch thread reads the Ack; a failure here is the daemon being gone.
        let f = match Frame::json(Kind::End, &end) {
            Ok(f) => f,
            Err(_) => return,
        };
        // What still waits for a daemon that took no output goes first.
        let waiting = locked(&rec.backlog).take().map_or(Ok(()), |b| b.finish(&s));
        if let Err(e) = waiting.and_then(|()| {
            ipc::write_frame(&mut s, f.kind, &f.payload)
                .map_err(|e| io::Error::other(e.to_string()))
        }) {
            syslog_warn(&format!(
                "recording daemon: end of session not delivered: {e}"
            ));
            return;
        }
        // Let the daemon seal the session before we go (it answers Ack).
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink);
    }
}

fn relay_out<R: Read + Send + 'static, W: Write + Send + 'static>(
    mut from: R,
    mut to: W,
    rec: Arc<Recording>,
    counter: Arc<AtomicU64>,
    record_output: bool,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("relay".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut utf8 = Utf8Repair::new();
            let mut line = Vec::new();
            let mut frame = Vec::with_capacity(8 * 1024);
            loop {
                let k = match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                counter.fetch_add(k as u64, Ordering::Relaxed);
                // Recorded before it is shown: a recorder killed between the two leaves
                // output recorded and not shown, never the other way round.
                if record_output {
                    let text = utf8.push(&buf[..k]);
                    rec.event(EventCode::Output, text, &mut line, &mut frame);
                }
                if rec.cut.load(Ordering::Relaxed) {
                    // Under enforce with the recording lost: nothing more reaches the client
                    // (closing the pipe stops the program, as the session is being ended).
                    break;
                }
                let delivered = to.write_all(&buf[..k]).and_then(|_| to.flush()).is_ok();
                if !delivered {
                    // The client went away: close the pipe so the program gets EPIPE/SIGPIPE, as
                    // it would without us.
                    break;
                }
            }
            if record_output {
                let rest = utf8.finish().to_string();
                rec.event(EventCode::Output, &rest, &mut line, &mut frame);
            }
        })
}
