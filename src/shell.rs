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
fn open_session(socket: &Path, start: &StartMsg) -> Result<(UnixStream, DecisionMsg), String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("recording daemon unreachable at {}: {e}", socket.display()))?;
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
    /// The connection, and the daemon's local id of the recording.
    Record(UnixStream, Option<String>),
    Unrecorded,
    Refuse(String),
}

fn plan(cfg: &Config, start: &StartMsg) -> Plan {
    match open_session(&cfg.socket, start) {
        Ok((s, d)) => match d.mode {
            Mode::Record => Plan::Record(s, d.session),
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
    // We run as the user: without this, the user's own programs could ptrace us, or read our
    // file descriptors in /proc, and write past the recording. (`execve` of the user's
    // program makes it dumpable again.)
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        syslog_warn(&format!("cannot make the recorder undumpable: {e}"));
    }
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
        Plan::Record(stream, id) => match (kind, tty) {
            (SessionKind::FileTransfer, _) => run_piped(&cfg, stream, id, &start, &program, false),
            (_, true) => run_pty(&cfg, stream, id, &start, &acct, raw_command.as_deref()),
            (_, false) => run_piped(&cfg, stream, id, &start, &program, true),
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
///
/// When the daemon stops in order (a restart, a package upgrade) the session goes on, and the
/// sink reconnects to the next daemon as soon as it answers: the rest of the session becomes
/// a new recording whose `continues` names the first one's `agent_session`, with the output
/// of the gap kept (up to [`GAP_MAX_BYTES`]).
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
    line: String,
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

/// Output kept while no daemon records the session, at most this much.
const GAP_MAX_BYTES: usize = 1024 * 1024;
/// How long the exit waits for a daemon that stopped in order, when output is waiting for it.
const RESUME_AT_EXIT: Duration = Duration::from_secs(2);
/// Under enforce, how long a session runs while no daemon records it after an orderly stop (a
/// restart takes a second or two); past this, or past [`GAP_MAX_BYTES`] of output, it ends.
const ENFORCE_GRACE: Duration = Duration::from_secs(10);

/// Reconnecting to the daemon after it stopped in order: when to try next, and the output
/// kept meanwhile for the recording that continues the session.
struct Resume {
    /// Previous recording's local id.
    continues: Option<String>,
    /// When the daemon stopped (session time).
    since: Duration,
    next_try: Duration,
    wait: Duration,
    gap: Vec<(Duration, EventCode, String)>,
    gap_bytes: usize,
    dropped_bytes: u64,
}

/// Calls `attempt` (at least once) every 100 ms until it succeeds or `patience` has passed.
fn retry_for(patience: Duration, mut attempt: impl FnMut() -> bool) {
    let until = Instant::now() + patience;
    while !attempt() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a daemon said to a resumed session.
enum Resumed {
    Record(UnixStream, Option<String>),
    /// Recording is switched off: the rest of the session goes unrecorded.
    Off,
    /// No daemon yet, or it refused (stopping again, spool full): try later.
    Later,
}

impl Resume {
    fn new(continues: Option<String>, now: Duration) -> Resume {
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
    /// (100 ms, doubling, at most 5 s apart: a restart takes a second or two).
    fn due(&mut self, now: Duration, force: bool) -> bool {
        if !force && now < self.next_try {
            return false;
        }
        self.next_try = now + self.wait;
        self.wait = (self.wait * 2).min(Duration::from_secs(5));
        true
    }

    fn keep(&mut self, t: Duration, code: EventCode, data: &str) {
        if self.gap_bytes + data.len() > GAP_MAX_BYTES {
            self.dropped_bytes += data.len() as u64;
        } else {
            self.gap_bytes += data.len();
            self.gap.push((t, code, data.to_owned()));
        }
    }

    /// Under enforce: why the session must end now (no daemon came back in time, or more
    /// output than the gap holds), if it must.
    fn overdue(&self, now: Duration) -> Option<String> {
        if self.dropped_bytes > 0 {
            Some("the recording daemon stopped, and more output came than can wait for it".into())
        } else if now >= self.since + ENFORCE_GRACE {
            Some("the recording daemon stopped and did not come back".into())
        } else {
            None
        }
    }

    /// How long the session's end waits for a daemon: a moment when output waits for one.
    fn patience(&self) -> Duration {
        if self.gap.is_empty() {
            Duration::ZERO
        } else {
            RESUME_AT_EXIT
        }
    }

    /// Time zero of the recording that continues the session: its first event, or now.
    fn base(&self, now: Duration) -> Duration {
        self.gap.first().map(|g| g.0).unwrap_or(now)
    }

    /// Asks the daemon at `socket` to record the rest of the session: the session's Start,
    /// with a header from time zero `base` (the wall clock of that moment, the current size)
    /// and `continues` naming the previous recording.
    fn ask(&self, socket: &Path, start: &StartMsg, size: TtySize, now: Duration) -> Resumed {
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

impl Link {
    /// Starts the thread that reads what the daemon says before our End: anything (an Error
    /// frame, end of file) means it is gone or stopped recording. Under enforce the session
    /// ends then, even if the program is silent and no write would notice.
    fn open(stream: UnixStream, session: Option<String>, ctx: &WatchCtx) -> io::Result<Link> {
        let orderly = Arc::new(AtomicBool::new(false));
        let stopped = Arc::new(AtomicBool::new(false));
        let (ack_tx, acks) = mpsc::channel();
        let mut watch = stream.try_clone()?;
        let ctx = ctx.clone();
        let (o, s) = (orderly.clone(), stopped.clone());
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
                        // Closing our side tells the daemon that what we sent is all it gets;
                        // the rest waits for the next daemon.
                        let _ = watch.shutdown(std::net::Shutdown::Write);
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

    /// Whether the current link no longer records (the daemon stopped in order): from then on
    /// events wait in the gap buffer for the next daemon.
    fn paused(&mut self, now: Duration) -> bool {
        if self.given_up {
            return true;
        }
        if self.resume.is_none() && self.link.orderly.load(Ordering::SeqCst) {
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
                self.resume = None;
                self.given_up = true;
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
        let sent = self.link.stream.write_all(&self.buf);
        match sent {
            Ok(()) => {
                self.buf.clear();
                Ok(())
            }
            // Kept when the daemon stopped in order: the frame goes to the next one.
            Err(e) => self.tolerate(e).inspect_err(|_| self.buf.clear()),
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

    fn start(&mut self, header: &Header) -> io::Result<()> {
        self.size = header.size();
        Ok(())
    }

    fn event(&mut self, event: &Event<'_>) -> io::Result<()> {
        if let EventKind::Resize(s) = event.kind {
            self.size = s;
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
                    self.keep(event);
                    self.try_resume(event.time, false);
                    self.enforce_grace(event.time);
                    return Ok(());
                }
            }
        }
        match event.kind {
            EventKind::Exit(status) => {
                self.send_pending()?;
                if self.link.orderly.load(Ordering::SeqCst) {
                    return Ok(());
                }
                let mut meta = Map::new();
                let code = exit_metadata(status, &mut meta);
                self.ended.store(true, Ordering::SeqCst);
                let end = EndMsg {
                    exit_status: Some(code),
                    metadata: meta,
                };
                let f = Frame::json(Kind::End, &end).map_err(io::Error::other)?;
                ipc::write_frame(&mut self.link.stream, f.kind, &f.payload).map_err(frame_io)?;
                match self.link.acks.recv_timeout(Duration::from_secs(10)) {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(io::Error::other(e)),
                    Err(_) => Err(io::Error::other("no answer from the recording daemon")),
                }
            }
            _ if self.link.stopped.load(Ordering::Relaxed) => Ok(()),
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

    fn next_deadline(&self) -> Option<Duration> {
        let r = self.resume.as_ref()?;
        Some(if self.watch.enforce {
            r.next_try.min(r.since + ENFORCE_GRACE)
        } else {
            r.next_try
        })
    }

    fn tick(&mut self, now: Duration) -> io::Result<()> {
        self.try_resume(now, false);
        self.enforce_grace(now);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.link.orderly.load(Ordering::Relaxed) && self.resume.is_none() && !self.given_up {
            // Held for the next daemon (see `paused`).
            return Ok(());
        }
        if self.resume.is_some() || self.given_up || self.link.stopped.load(Ordering::Relaxed) {
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
    // sshd's terminal is the user's, and any of the user's processes could open it and talk
    // to the client past the recorder (after stopping it with SIGSTOP, say). In exclusive mode
    // nobody but root can open it again; we keep the descriptors we have.
    if let Err(e) = rustix::termios::ioctl_tiocexcl(io::stdin()) {
        syslog_warn(&format!("cannot make the terminal exclusive: {e}"));
    }
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
        line: String::new(),
    };
    let outcome = match session.run(vec![Box::new(sink)]) {
        Ok(o) => o,
        Err(recorder::Error::SinkStart(f)) => return Ok(refuse(&f.error)),
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
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(e) => e.into_inner(),
    }
}

impl Recording {
    /// Sends output as one `o` event (or keeps it for a daemon that stopped in order).
    fn output(self: &Arc<Self>, text: &str, line: &mut String, frame: &mut Vec<u8>) {
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
        if self.lost.load(Ordering::Relaxed) {
            self.pause_and_resume(&mut guard, Some(text), now, false);
            return;
        }
        let Some(s) = guard.as_mut() else { return };
        line.clear();
        encode_event(
            line,
            now.saturating_sub(base).as_secs_f64(),
            EventCode::Output,
            text,
        );
        let Ok(head) = ipc::head(Kind::Events, line.len()) else {
            return;
        };
        frame.clear();
        frame.extend_from_slice(&head);
        frame.extend_from_slice(line.as_bytes());
        if let Err(e) = s.write_all(frame) {
            self.mark_lost(&format!("recording daemon: {e}"));
            // The daemon may have stopped in order (its watch thread is about to say so):
            // the output waits for the next one.
            self.pause_and_resume(&mut guard, Some(text), now, false);
        }
    }

    fn mark_lost(&self, why: &str) {
        if !self.lost.swap(true, Ordering::SeqCst) {
            if let Ok(mut w) = self.lost_why.lock() {
                *w = why.to_string();
            }
        }
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
        text: Option<&str>,
        now: Duration,
        force: bool,
    ) {
        let mut st = locked(&self.resume);
        let (session, resume, off) = &mut *st;
        if *off {
            return;
        }
        let r = resume.get_or_insert_with(|| Resume::new(session.clone(), now));
        if let Some(t) = text {
            r.keep(now, EventCode::Output, t);
            if self.enforce && r.dropped_bytes > 0 {
                // Output that can be neither recorded nor kept is not shown (the session
                // ends: see `overdue`).
                self.cut.store(true, Ordering::SeqCst);
            }
        }
        if !self.stopped_orderly.load(Ordering::SeqCst) || !r.due(now, force) {
            return;
        }
        let (new, id) = match r.ask(&self.socket, &self.start, TtySize::default(), now) {
            Resumed::Record(s, id) => (s, id),
            Resumed::Off => {
                *off = true;
                *resume = None;
                return;
            }
            Resumed::Later => return,
        };
        let Ok(watch) = new.try_clone() else { return };
        let base = r.base(now);
        let mut body = String::new();
        for (t, code, data) in &r.gap {
            encode_event(&mut body, t.saturating_sub(base).as_secs_f64(), *code, data);
        }
        *resume = None;
        *session = id;
        drop(st);
        locked(&self.clock).1 = base;
        let mut new = new;
        // The gap in frames under the limit (it holds at most 1 MiB, whole lines).
        let mut rest = body.as_str();
        while !rest.is_empty() {
            let mut cut = rest.len().min(ipc::MAX_FRAME_BYTES);
            if cut < rest.len() {
                cut = rest[..cut].rfind('\n').map(|i| i + 1).unwrap_or(cut);
            }
            if ipc::write_frame(&mut new, Kind::Events, &rest.as_bytes()[..cut]).is_err() {
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
fn run_piped(
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

    rec.watch(watch)?;

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
            if let Some(why) = lost_rx.try_recv().ok().or_else(|| rec.overdue()) {
                rec.cut.store(true, Ordering::SeqCst);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                std::thread::sleep(Duration::from_millis(500));
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
    // The program may have ended because its output was cut (SIGPIPE) while the daemon that
    // stopped was away. (A daemon lost otherwise is dealt with below.)
    if let Some(why) = rec.overdue() {
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
