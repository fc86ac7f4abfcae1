//! `ztna-recorder shell`, sshd's `ForceCommand`: runs the user's login shell or
//! `SSH_ORIGINAL_COMMAND` as sshd would have, recorded through the daemon.
//!
//! - A terminal on stdin (the client asked for a PTY): the recorder core runs the program in
//!   a new PTY and its events go to the daemon ([`DaemonSink`]).
//! - No terminal (`ssh host cmd`, pipes): the program's stdin/stdout/stderr are relayed
//!   byte-exact through pipes; its output is recorded as `o` events.
//! - A file transfer (`internal-sftp`, `sftp-server`, `scp -t/-f`, `rsync --server`): the real
//!   server program runs, its bytes untouched; only metadata (command, bytes each way, exit
//!   status) is recorded.
//!
//! When the daemon cannot record (unreachable, spool full, gone mid-session) the `enforce`
//! policy decides: fail open (run unrecorded, warn to syslog) or fail closed (a one-line
//! message, exit status 1). When the org switched recording off the session runs unrecorded.

use crate::config::{Config, ConfigArgs};
use crate::ipc::{self, DecisionMsg, EndMsg, Frame, FrameError, Kind, Mode, StartMsg};
use crate::recorder::{
    self, Command, Event, EventKind, ExitStatus, Session, SessionConfig, Sink, SinkPolicy,
    Termination, Utf8Repair,
};
use serde_json::{Map, Value};
use std::ffi::OsString;
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use ztna_common::asciicast::{encode_event, EventCode, Header, TtySize};

/// Arguments of `ztna-recorder shell`.
#[derive(clap::Args, Debug)]
pub struct ShellArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// What kind of session this is (`metadata.kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    Interactive,
    Exec,
    FileTransfer,
}

impl SessionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::Interactive => "interactive",
            SessionKind::Exec => "exec",
            SessionKind::FileTransfer => "file_transfer",
        }
    }
}

/// Where OpenSSH's sftp server usually lives, for `internal-sftp`.
const SFTP_SERVERS: &[&str] = &[
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/lib/sftp-server",
];

/// Where a file transfer's program may come from when the command names it without a path.
const TRUSTED_DIRS: &[&str] = &["/usr/bin", "/bin", "/usr/local/bin"];

/// How a remote command is classified.
pub fn classify(command: Option<&str>) -> SessionKind {
    match command {
        None => SessionKind::Interactive,
        Some(c) if c.trim().is_empty() => SessionKind::Interactive,
        Some(c) if transfer_program(c).is_some() => SessionKind::FileTransfer,
        Some(_) => SessionKind::Exec,
    }
}

/// The system program a file-transfer command runs, when `cmd` is exactly one: an sftp server,
/// `scp -t`/`-f` or `rsync --server`, as the clients send them. A transfer's contents are not
/// recorded, so nothing else may pass for one: no shell syntax at all (`scp -f x; bash -i`
/// would otherwise be an unrecorded shell), and the program is the system's, never one the
/// user put first in a path or defined in their shell's startup files. The program is run
/// directly, without the user's shell. Anything else is an ordinary command, recorded.
fn transfer_program(cmd: &str) -> Option<PathBuf> {
    transfer_program_in(cmd, &|p| p.is_file())
}

/// [`transfer_program`] with `present` saying which programs the system has.
fn transfer_program_in(cmd: &str, present: &dyn Fn(&Path) -> bool) -> Option<PathBuf> {
    let plain = |c: char| c.is_ascii_alphanumeric() || " \t_-./:,=+@%".contains(c);
    if !cmd.chars().all(plain) {
        return None;
    }
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let first = *words.first()?;
    let name = Path::new(first).file_name()?.to_str()?;
    let transfer = match name {
        "internal-sftp" => first == name,
        "sftp-server" => true,
        "scp" => words[1..]
            .iter()
            .take_while(|w| w.starts_with('-'))
            .any(|w| w.contains('t') || w.contains('f')),
        "rsync" => words.get(1) == Some(&"--server"),
        _ => false,
    };
    if !transfer {
        return None;
    }
    let candidates: Vec<PathBuf> = if name == "internal-sftp" || name == "sftp-server" {
        SFTP_SERVERS.iter().map(PathBuf::from).collect()
    } else {
        TRUSTED_DIRS
            .iter()
            .map(|d| Path::new(d).join(name))
            .collect()
    };
    let found = |p: &PathBuf| present(p);
    if first.contains('/') {
        // A path: only one of the system's own.
        let p = PathBuf::from(first);
        return candidates.contains(&p).then_some(p).filter(found);
    }
    candidates.into_iter().find(found)
}

/// The user the session runs as.
struct Account {
    name: String,
    uid: u32,
    shell: String,
}

fn account() -> Account {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => Account {
            name: u.name,
            uid: uid.as_raw(),
            shell: u.shell.to_string_lossy().into_owned(),
        },
        _ => Account {
            name: std::env::var("USER").unwrap_or_else(|_| uid.to_string()),
            uid: uid.as_raw(),
            shell: std::env::var("SHELL").unwrap_or_else(|_| "/bin/sh".into()),
        },
    }
    .with_default_shell()
}

impl Account {
    fn with_default_shell(mut self) -> Self {
        if self.shell.trim().is_empty() {
            self.shell = "/bin/sh".into();
        }
        self
    }
}

/// The contract's session metadata of a session of this process's user (`record --upload`
/// uses it too).
pub(crate) fn session_metadata(
    kind: SessionKind,
    command: Option<&str>,
    tty: bool,
) -> Map<String, Value> {
    metadata(&account(), kind, command, tty)
}

/// The session metadata of the contract, from the environment sshd gives us.
fn metadata(
    acct: &Account,
    kind: SessionKind,
    command: Option<&str>,
    tty: bool,
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("user".into(), Value::from(acct.name.clone()));
    m.insert("uid".into(), Value::from(acct.uid));
    if let Ok(conn) = std::env::var("SSH_CONNECTION") {
        let parts: Vec<&str> = conn.split_whitespace().collect();
        if let Some(a) = parts.first() {
            m.insert("remote_addr".into(), Value::from(*a));
        }
        if let Some(p) = parts.get(1).and_then(|p| p.parse::<u16>().ok()) {
            m.insert("remote_port".into(), Value::from(p));
        }
    }
    if let Ok(h) = nix::unistd::gethostname() {
        m.insert(
            "hostname".into(),
            Value::from(h.to_string_lossy().into_owned()),
        );
    }
    if tty {
        let name = std::env::var("SSH_TTY").ok().or_else(|| {
            nix::unistd::ttyname(io::stdin())
                .ok()
                .map(|p| p.display().to_string())
        });
        if let Some(t) = name {
            m.insert("tty".into(), Value::from(t));
        }
    }
    if let Some(c) = command {
        m.insert("command".into(), Value::from(c));
    }
    m.insert("kind".into(), Value::from(kind.as_str()));
    m.insert("shell".into(), Value::from(acct.shell.clone()));
    m
}

/// Logs a warning for the administrator to syslog (journald takes it from `/dev/log`).
/// Without a syslog socket it is dropped, as sshd's own messages are: stderr is the user's
/// session (their terminal, or the stream `ssh host cmd` hands back), and the relay must not
/// add to it.
pub fn syslog_warn(msg: &str) {
    tracing::warn!("{msg}");
    // facility user (1), severity warning (4): <12>
    let line = format!("<12>ztna-recorder[{}]: {msg}", std::process::id());
    let _ = std::os::unix::net::UnixDatagram::unbound()
        .and_then(|s| s.send_to(line.as_bytes(), "/dev/log"));
}

/// Connects to the daemon, announces the session and reads its decision.
fn open_session(cfg: &Config, start: &StartMsg) -> Result<(UnixStream, DecisionMsg), String> {
    let mut s = UnixStream::connect(&cfg.socket).map_err(|e| {
        format!(
            "recording daemon unreachable at {}: {e}",
            cfg.socket.display()
        )
    })?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    let f = Frame::json(Kind::Start, start).map_err(|e| e.to_string())?;
    ipc::write_frame(&mut s, f.kind, &f.payload).map_err(|e| format!("recording daemon: {e}"))?;
    let reply = ipc::read_frame(&mut s).map_err(|e| format!("recording daemon: {e}"))?;
    let d = match reply.kind {
        Kind::Decision => reply.parse::<DecisionMsg>().map_err(|e| e.to_string())?,
        Kind::Error => {
            let m: ipc::ErrorMsg = reply.parse().map_err(|e| e.to_string())?;
            return Err(format!("recording daemon: {}", m.message));
        }
        k => return Err(format!("recording daemon answered {k:?}")),
    };
    let _ = s.set_read_timeout(None);
    Ok((s, d))
}

/// Whether to record, run unrecorded, or refuse.
enum Plan {
    Record(UnixStream),
    Unrecorded,
    Refuse(String),
}

fn plan(cfg: &Config, start: &StartMsg) -> Plan {
    match open_session(cfg, start) {
        Ok((s, d)) => match d.mode {
            Mode::Record => Plan::Record(s),
            Mode::Unrecorded => Plan::Unrecorded,
            Mode::Refused => unrecordable(cfg, &d.reason),
        },
        Err(e) => unrecordable(cfg, &e),
    }
}

fn unrecordable(cfg: &Config, why: &str) -> Plan {
    if cfg.enforce {
        // The user sees the refusal itself; syslog gets the reason.
        syslog_warn(&format!("session refused (enforce = true): {why}"));
        Plan::Refuse(why.to_string())
    } else {
        syslog_warn(&format!("session runs unrecorded: {why}"));
        Plan::Unrecorded
    }
}

/// The one line a refused user sees.
fn refuse(why: &str) -> u8 {
    eprintln!(
        "ztna-recorder: this session must be recorded and cannot be ({why}); access refused."
    );
    1
}

pub fn run(args: ShellArgs) -> anyhow::Result<u8> {
    crate::logging::init("off");
    let cfg = match Config::load(args.config.config.as_deref(), Vec::new()) {
        Ok(l) => {
            for w in l.notices() {
                syslog_warn(&w);
            }
            l.config
        }
        // Without a configuration nobody can say whether recording is optional.
        Err(e) => return Ok(refuse(&format!("configuration: {e:#}"))),
    };
    let acct = account();
    // Run byte for byte as sent (a file name may be Latin-1); the recording's metadata and
    // header are JSON, so they carry it with U+FFFD for what is not UTF-8.
    let raw_command = std::env::var_os("SSH_ORIGINAL_COMMAND");
    let command = raw_command
        .as_ref()
        .map(|c| c.to_string_lossy().into_owned());
    let kind = classify(command.as_deref());
    let tty = io::stdin().is_terminal();
    let meta = metadata(&acct, kind, command.as_deref(), tty);
    let size = if tty {
        recorder::terminal_size(io::stdin()).unwrap_or_default()
    } else {
        TtySize::default()
    };
    let mut header = Header::new(size, Some(unix_now()));
    let mut env = std::collections::BTreeMap::new();
    env.insert("SHELL".to_string(), acct.shell.clone());
    if let Ok(t) = std::env::var("TERM") {
        env.insert("TERM".to_string(), t);
    }
    header.env = Some(env);
    header.command = command.clone();
    let start = StartMsg {
        session_type: "ssh".into(),
        header,
        metadata: meta,
    };

    let program = program_for(&acct, kind, raw_command.as_deref());
    match plan(&cfg, &start) {
        Plan::Refuse(why) => Ok(refuse(&why)),
        Plan::Unrecorded => Err(exec_unrecorded(&acct, &program)),
        Plan::Record(stream) => match (kind, tty) {
            (SessionKind::FileTransfer, _) => run_piped(&cfg, stream, &program, false),
            (_, true) => run_pty(&cfg, stream, &acct, raw_command.as_deref()),
            (_, false) => run_piped(&cfg, stream, &program, true),
        },
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What to run: argv[0] (as the program sees it), the program path and its arguments.
struct Program {
    path: OsString,
    arg0: OsString,
    args: Vec<OsString>,
}

fn program_for(acct: &Account, kind: SessionKind, command: Option<&std::ffi::OsStr>) -> Program {
    match command {
        None => {
            let base = Path::new(&acct.shell)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "sh".into());
            Program {
                path: acct.shell.clone().into(),
                arg0: format!("-{base}").into(),
                args: Vec::new(),
            }
        }
        Some(raw) => {
            // A transfer runs its system program directly (`internal-sftp` only exists inside
            // sshd: the standalone server stands in for it). Its command is plain ASCII.
            if let (SessionKind::FileTransfer, Some(c)) = (kind, raw.to_str()) {
                if let Some(path) = transfer_program(c) {
                    let mut words = c.split_whitespace();
                    let first = words.next().unwrap_or_default();
                    let arg0 = if first == "internal-sftp" {
                        path.clone().into_os_string()
                    } else {
                        first.into()
                    };
                    return Program {
                        path: path.into_os_string(),
                        arg0,
                        args: words.map(OsString::from).collect(),
                    };
                }
            }
            Program {
                path: acct.shell.clone().into(),
                arg0: acct.shell.clone().into(),
                args: vec!["-c".into(), raw.to_owned()],
            }
        }
    }
}

/// Replaces this process with the program (nothing to record): returns only on failure.
fn exec_unrecorded(_acct: &Account, p: &Program) -> anyhow::Error {
    let err = std::process::Command::new(&p.path)
        .arg0(&p.arg0)
        .args(&p.args)
        .exec();
    anyhow::anyhow!("cannot run {}: {err}", Path::new(&p.path).display())
}

/// Events to the daemon over the session's socket (PTY sessions).
struct DaemonSink {
    stream: UnixStream,
    buf: Vec<u8>,
    end_meta: Map<String, Value>,
    /// The daemon's answer to End, read by the watch thread.
    acks: mpsc::Receiver<Result<(), String>>,
    /// Set once End is sent: the daemon closing after that is no loss.
    ended: Arc<AtomicBool>,
    /// Set by the watch thread when the daemon stopped in order: from then on events are
    /// dropped without failing the session, whatever the enforce policy.
    orderly: Arc<AtomicBool>,
    /// Set by the watch thread when the daemon stopped recording this session (its spool is
    /// full) or went away: events are no longer sent, only the End (for the exit status).
    stopped: Arc<AtomicBool>,
}

impl DaemonSink {
    /// A failed write is no failure if the daemon said it is stopping (its Error frame may
    /// reach the watch thread just after our write noticed the closed socket).
    fn tolerate(&self, e: io::Error) -> io::Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(300) {
            if self.orderly.load(Ordering::SeqCst) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(e)
    }
}

/// The size at which the Events frame being built is sent without waiting for the batch's end.
const FRAME_TARGET: usize = 32 * 1024;

impl DaemonSink {
    /// Adds one event line to the Events frame being built (a frame carries any number of
    /// lines: one write and one wake-up of the daemon per batch, not per read), sending the
    /// frame first if the line would take it over the limit.
    fn queue_line(&mut self, line: &str) -> io::Result<()> {
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
        self.buf.extend_from_slice(line.as_bytes());
        if self.buf.len() >= FRAME_TARGET {
            // Frames this size already amortise the write and the daemon's wake-up; larger
            // ones would only grow what the daemon holds per live session.
            self.send_pending()?;
        }
        Ok(())
    }

    /// Sends the Events frame being built, if any.
    fn send_pending(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let head = ipc::head(Kind::Events, self.buf.len() - ipc::HEAD_BYTES).map_err(frame_io)?;
        self.buf[..ipc::HEAD_BYTES].copy_from_slice(&head);
        let sent = self.stream.write_all(&self.buf);
        self.buf.clear();
        match sent {
            Ok(()) => Ok(()),
            Err(e) => self.tolerate(e),
        }
    }
}

fn frame_io(e: FrameError) -> io::Error {
    match e {
        FrameError::Io(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

fn exit_metadata(status: ExitStatus, m: &mut Map<String, Value>) -> i32 {
    if let ExitStatus::Signal(n) = status {
        m.insert("exit_signal".into(), Value::from(n));
    }
    i32::from(status.code())
}

impl Sink for DaemonSink {
    fn name(&self) -> String {
        "recording daemon".into()
    }

    fn start(&mut self, _header: &Header) -> io::Result<()> {
        Ok(())
    }

    fn event(&mut self, event: &Event<'_>) -> io::Result<()> {
        match event.kind {
            EventKind::Exit(_) if self.orderly.load(Ordering::SeqCst) => Ok(()),
            EventKind::Exit(status) => {
                self.send_pending()?;
                if self.orderly.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let mut meta = std::mem::take(&mut self.end_meta);
                let code = exit_metadata(status, &mut meta);
                self.ended.store(true, Ordering::SeqCst);
                let end = EndMsg {
                    exit_status: Some(code),
                    metadata: meta,
                };
                let f = Frame::json(Kind::End, &end).map_err(io::Error::other)?;
                ipc::write_frame(&mut self.stream, f.kind, &f.payload).map_err(frame_io)?;
                match self.acks.recv_timeout(Duration::from_secs(10)) {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(io::Error::other(e)),
                    Err(_) => Err(io::Error::other("no answer from the recording daemon")),
                }
            }
            _ if self.orderly.load(Ordering::Relaxed) || self.stopped.load(Ordering::Relaxed) => {
                Ok(())
            }
            _ => match event.asciicast_line() {
                Some(line) => self.queue_line(line),
                None => Ok(()),
            },
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.orderly.load(Ordering::Relaxed) || self.stopped.load(Ordering::Relaxed) {
            self.buf.clear();
            return Ok(());
        }
        self.send_pending()
    }

    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn run_pty(
    cfg: &Config,
    stream: UnixStream,
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
    let control = session.control();
    let ended = Arc::new(AtomicBool::new(false));
    let orderly = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(Mutex::new(None::<String>));
    let (ack_tx, acks) = mpsc::channel();
    {
        // The daemon says nothing until our End: anything before (an Error frame, end of
        // file) means it is gone or stopped recording. Under enforce the session ends then,
        // even if the program is silent and no write would notice.
        let mut watch = stream.try_clone()?;
        let ended = ended.clone();
        let orderly = orderly.clone();
        let stopped = stopped.clone();
        let lost = lost.clone();
        let enforce = cfg.enforce;
        std::thread::Builder::new()
            .name("daemon-watch".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut stopping = false;
                let r = match ipc::read_frame_when_readable(&mut watch) {
                    Ok(f) if f.kind == Kind::Ack => Ok(()),
                    Ok(f) if f.kind == Kind::Error => Err(match f.parse::<ipc::ErrorMsg>() {
                        Ok(m) => {
                            stopping = m.code == ipc::ERROR_STOPPING;
                            m.message
                        }
                        Err(e) => e.to_string(),
                    }),
                    Ok(f) => Err(format!("unexpected {:?} frame", f.kind)),
                    Err(e) => Err(format!("recording daemon: {e}")),
                };
                if let Err(why) = &r {
                    if stopping {
                        // An orderly stop (upgrade, restart) keeps users' sessions running.
                        orderly.store(true, Ordering::SeqCst);
                        syslog_warn(&format!(
                            "recording stopped, session goes on unrecorded: {why}"
                        ));
                    } else if !ended.load(Ordering::SeqCst) {
                        stopped.store(true, Ordering::SeqCst);
                        if let Ok(mut l) = lost.lock() {
                            *l = Some(why.clone());
                        }
                        if enforce {
                            control.terminate();
                        } else {
                            syslog_warn(&format!(
                                "recording stopped, session goes on unrecorded: {why}"
                            ));
                        }
                    }
                }
                let _ = ack_tx.send(r);
            })?;
    }
    let sink = DaemonSink {
        stream,
        buf: Vec::with_capacity(32 * 1024),
        end_meta: Map::new(),
        acks,
        ended,
        orderly: orderly.clone(),
        stopped,
    };
    let outcome = match session.run(vec![Box::new(sink)]) {
        Ok(o) => o,
        Err(recorder::Error::SinkStart(f)) => return Ok(refuse(&f.error)),
        Err(e) => return Err(e.into()),
    };
    let lost = lost.lock().ok().and_then(|l| l.clone());
    if lost.is_none() && !orderly.load(Ordering::SeqCst) {
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
        eprintln!("\r\nztna-recorder: the recording stopped ({why}); session ended.\r");
        return Ok(1);
    }
    Ok(outcome.status.code())
}

/// Shared by the relay threads of a piped session: the daemon connection and the clock.
struct Recording {
    stream: Mutex<Option<UnixStream>>,
    started: Instant,
    /// Set when the daemon is gone.
    lost: AtomicBool,
    lost_why: Mutex<String>,
    /// The daemon said it was stopping (not a failure: the session keeps running).
    stopped_orderly: AtomicBool,
    /// Under enforce, the recording was lost: the relays stop showing output at once (the
    /// program is ended meanwhile).
    cut: AtomicBool,
    /// The daemon stopped recording this session (its spool is full) but still listens: it
    /// gets the End, for the exit status.
    listening: AtomicBool,
    last_time: Mutex<f64>,
}

impl Recording {
    /// Sends output as one `o` event (or nothing when recording stopped).
    fn output(&self, text: &str, line: &mut String, frame: &mut Vec<u8>) {
        if text.is_empty() || self.lost.load(Ordering::Relaxed) {
            return;
        }
        let mut guard = match self.stream.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        let Some(s) = guard.as_mut() else { return };
        // Under the lock, so times never go backwards between the stdout and stderr threads.
        let mut last = match self.last_time.lock() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        let t = self.started.elapsed().as_secs_f64().max(*last);
        *last = t;
        drop(last);
        line.clear();
        encode_event(line, t, EventCode::Output, text);
        let Ok(head) = ipc::head(Kind::Events, line.len()) else {
            return;
        };
        frame.clear();
        frame.extend_from_slice(&head);
        frame.extend_from_slice(line.as_bytes());
        if let Err(e) = s.write_all(frame) {
            self.mark_lost(&format!("recording daemon: {e}"));
        }
    }

    fn mark_lost(&self, why: &str) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            if let Ok(mut w) = self.lost_why.lock() {
                *w = why.to_string();
            }
        }
    }
}

/// Runs the program with pipes: bytes relayed untouched; output recorded as `o` events when
/// `record_output`, else only counted (file transfers).
fn run_piped(
    cfg: &Config,
    stream: UnixStream,
    p: &Program,
    record_output: bool,
) -> anyhow::Result<u8> {
    let watch = stream.try_clone()?;
    let rec = Arc::new(Recording {
        stream: Mutex::new(Some(stream)),
        started: Instant::now(),
        lost: AtomicBool::new(false),
        lost_why: Mutex::new(String::new()),
        stopped_orderly: AtomicBool::new(false),
        cut: AtomicBool::new(false),
        listening: AtomicBool::new(false),
        last_time: Mutex::new(0.0),
    });
    let mut child = match std::process::Command::new(&p.path)
        .arg0(&p.arg0)
        .args(&p.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "ztna-recorder: cannot run {}: {e}",
                Path::new(&p.path).display()
            );
            let mut meta = Map::new();
            meta.insert("error".into(), Value::from(e.to_string()));
            finish_piped(&rec, 127, meta);
            return Ok(127);
        }
    };
    let bytes_in = Arc::new(AtomicU64::new(0));
    let bytes_out = Arc::new(AtomicU64::new(0));

    // The daemon sends nothing until our End: anything it says before (or end of file) means
    // it is gone or stopped recording.
    let (lost_tx, lost_rx) = mpsc::channel::<String>();
    {
        let rec = rec.clone();
        let mut watch = watch;
        let enforce = cfg.enforce;
        std::thread::Builder::new()
            .name("daemon-watch".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut stopping = false;
                let why = match ipc::read_frame_when_readable(&mut watch) {
                    Ok(f) if f.kind == Kind::Error => match f.parse::<ipc::ErrorMsg>() {
                        Ok(m) => {
                            stopping = m.code == ipc::ERROR_STOPPING;
                            if m.code == ipc::ERROR_SPOOL_FULL {
                                rec.listening.store(true, Ordering::SeqCst);
                            }
                            m.message
                        }
                        Err(e) => e.to_string(),
                    },
                    Ok(f) if f.kind == Kind::Ack => return,
                    Ok(f) => format!("unexpected {:?} frame", f.kind),
                    Err(e) => format!("recording daemon: {e}"),
                };
                // (A relay's write may have found the daemon gone first: the decision is
                // made here either way.)
                if stopping {
                    // An orderly stop (upgrade, restart) keeps users' sessions running.
                    rec.stopped_orderly.store(true, Ordering::SeqCst);
                } else if enforce {
                    rec.cut.store(true, Ordering::SeqCst);
                }
                rec.mark_lost(&why);
                if !stopping {
                    let _ = lost_tx.send(why);
                }
            })?;
    }

    let mut threads = Vec::new();
    if let Some(mut cin) = child.stdin.take() {
        let n = bytes_in.clone();
        threads.push(
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut stdin = io::stdin().lock();
                    loop {
                        match stdin.read(&mut buf) {
                            Ok(0) => break,
                            Ok(k) => {
                                n.fetch_add(k as u64, Ordering::Relaxed);
                                if cin.write_all(&buf[..k]).is_err() {
                                    break;
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(_) => break,
                        }
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
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if cfg.enforce {
            if let Ok(why) = lost_rx.try_recv() {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                std::thread::sleep(Duration::from_millis(500));
                let _ = child.kill();
                let _ = child.wait();
                eprintln!("ztna-recorder: the recording stopped ({why}); session ended.");
                return Ok(1);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    for t in out_threads {
        let _ = t.join();
    }
    // The stdin thread may be blocked reading our stdin: it is not waited for.
    drop(threads);

    let status = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(c), _) => ExitStatus::Code(c),
        (None, Some(s)) => ExitStatus::Signal(s),
        _ => ExitStatus::Code(1),
    };
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
    if rec.lost.load(Ordering::SeqCst) {
        let why = rec.lost_why.lock().map(|w| w.clone()).unwrap_or_default();
        if cfg.enforce && !rec.stopped_orderly.load(Ordering::SeqCst) {
            eprintln!("ztna-recorder: the recording stopped ({why}); session ended.");
            return Ok(1);
        }
        syslog_warn(&format!(
            "recording stopped, session went on unrecorded: {why}"
        ));
        if rec.listening.load(Ordering::SeqCst) {
            finish_piped(&rec, code, meta);
        }
    } else {
        finish_piped(&rec, code, meta);
    }
    Ok(status.code())
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
        if let Err(e) = ipc::write_frame(&mut s, f.kind, &f.payload) {
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
            let mut line = String::with_capacity(8 * 1024);
            let mut frame = Vec::with_capacity(8 * 1024);
            loop {
                let k = match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(k) => k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                counter.fetch_add(k as u64, Ordering::Relaxed);
                if rec.cut.load(Ordering::Relaxed) {
                    // Under enforce with the recording lost: nothing more reaches the client
                    // (closing the pipe stops the program, as the session is being ended).
                    break;
                }
                let delivered = to.write_all(&buf[..k]).and_then(|_| to.flush()).is_ok();
                if record_output {
                    let text = utf8.push(&buf[..k]);
                    rec.output(text, &mut line, &mut frame);
                }
                if !delivered {
                    // The client went away: close the pipe so the program gets EPIPE/SIGPIPE, as
                    // it would without us.
                    break;
                }
            }
            if record_output {
                let rest = utf8.finish().to_string();
                rec.output(&rest, &mut line, &mut frame);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_transfers() {
        assert_eq!(classify(None), SessionKind::Interactive);
        assert_eq!(classify(Some("internal-sftp")), SessionKind::FileTransfer);
        assert_eq!(
            classify(Some("/usr/lib/openssh/sftp-server -l INFO")),
            SessionKind::FileTransfer
        );
        assert_eq!(classify(Some("scp -t /tmp/x")), SessionKind::FileTransfer);
        assert_eq!(
            classify(Some("scp -v -f /tmp/x")),
            SessionKind::FileTransfer
        );
        assert_eq!(
            classify(Some("rsync --server -vlogDtpre.iLsfxCIvu . /tmp")),
            SessionKind::FileTransfer
        );
        assert_eq!(classify(Some("printf hi")), SessionKind::Exec);
        assert_eq!(classify(Some("rsync -a a b")), SessionKind::Exec);
    }

    /// Only the exact commands the clients send, with the system's programs, pass for a
    /// transfer (whose contents are not recorded); everything else is recorded.
    #[test]
    fn nothing_else_passes_for_a_transfer() {
        let system = |p: &Path| {
            [
                "/usr/bin/scp",
                "/usr/bin/rsync",
                "/usr/lib/openssh/sftp-server",
            ]
            .contains(&p.to_str().unwrap_or_default())
        };
        let t = |c: &str| transfer_program_in(c, &system);
        assert_eq!(t("scp -t /tmp/x"), Some("/usr/bin/scp".into()));
        assert_eq!(t("/usr/bin/scp -f a.txt"), Some("/usr/bin/scp".into()));
        assert_eq!(
            t("rsync --server -logDtpre.iLsfxCIvu . d/"),
            Some("/usr/bin/rsync".into())
        );
        assert_eq!(
            t("internal-sftp"),
            Some("/usr/lib/openssh/sftp-server".into())
        );
        assert_eq!(
            t("/usr/lib/openssh/sftp-server -l INFO"),
            Some("/usr/lib/openssh/sftp-server".into())
        );
        for evasion in [
            "rsync --server --version >/dev/null; exec bash -i",
            "scp -f /etc/hostname; echo x",
            "scp -t /tmp/x$(touch /tmp/y)",
            "scp -t /tmp/`id`",
            "scp -t\necho x",
            "sftp-server -h; echo x",
            "scp -t a && bash",
            "scp -t a | bash",
            "scp -t '/tmp/a b'",
            // Programs of the user's, not the system's.
            "/home/u/bin/scp -t x",
            "./sftp-server",
            "/tmp/internal-sftp",
            "/usr/bin/../../home/u/scp -t x",
        ] {
            assert_eq!(t(evasion), None, "{evasion:?}");
        }
        assert_eq!(classify(Some("scp -f x; bash -i")), SessionKind::Exec);
    }
}
