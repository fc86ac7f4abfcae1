//! `ztna-recorder shell`, sshd's `ForceCommand`: runs the user's login shell or
//! `SSH_ORIGINAL_COMMAND` as sshd would have, recorded through the daemon.
//!
//! - A terminal on stdin (the client asked for a PTY): the recorder core runs the program in
//!   a new PTY and its events go to the daemon ([`pty`]).
//! - No terminal (`ssh host cmd`, pipes): the program's stdin/stdout/stderr are relayed
//!   byte-exact through pipes; its output is recorded as `o` events.
//! - A file transfer (`internal-sftp`, `sftp-server`, `scp -t/-f`, `rsync --server`): the real
//!   server program runs, its bytes untouched; only metadata (command, bytes each way, exit
//!   status) is recorded.
//!
//! When the daemon cannot record (unreachable, spool full, gone mid-session) the `enforce`
//! policy decides: fail open (run unrecorded, warn to syslog) or fail closed (a one-line
//! message, exit status 1). When the org switched recording off the session runs unrecorded.
//! When the daemon stops in order (a restart) the session goes on and the next daemon records
//! the rest ([`resume`]); under `enforce` its output is held meanwhile, shown once a daemon
//! has it.

use crate::config::Config;
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

mod backlog;
mod piped;
mod pty;
mod resume;

use piped::run_piped;
use pty::run_pty;

/// Arguments of `ztna-recorder shell`.
#[derive(clap::Args, Debug)]
pub struct ShellArgs {
    /// The configuration file [default: /etc/ztna-recorder/config.toml]. Unlike the other
    /// commands, the shell ignores ZTNA_RECORDER_CONFIG and ZTNA_RECORDER_SOCKET (the user's
    /// environment could name any file); of the other ZTNA_RECORDER_* variables it takes only
    /// those that make recording stricter (ENFORCE, CAPTURE_INPUT on).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
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

/// What the sshd drop-in's `SetEnv` sets (`packaging/sshd/50-ztna-recorder.conf`, which says
/// why): sshd runs the ForceCommand through the user's shell, and these keep that shell (and
/// the loader) from running anything of the user's before the recorder starts.
pub const SSHD_SETENV: [(&str, &str); 11] = [
    ("SHLVL", "1"),
    ("BASH_ENV", ""),
    ("ENV", ""),
    ("SHELLOPTS", ""),
    ("BASHOPTS", ""),
    ("PS4", ""),
    ("LD_PRELOAD", ""),
    ("LD_LIBRARY_PATH", ""),
    ("LD_AUDIT", ""),
    ("GCONV_PATH", ""),
    ("LOCPATH", ""),
];

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
        "scp" => scp_server_mode(&words[1..]),
        "rsync" => rsync_server_mode(&words[1..]),
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

/// Exactly what an OpenSSH client sends for the remote end of a copy: `scp [-v] [-r] [-p]
/// [-d] -t|-f [--] PATH…`, each flag a word of its own. Any other option is client mode, where
/// scp starts ssh, which runs what `-oProxyCommand=…` or `-S` names: a shell, unrecorded.
fn scp_server_mode(args: &[&str]) -> bool {
    let mut mode = 0;
    let mut rest = args;
    while let Some((w, more)) = rest.split_first() {
        match *w {
            "-t" | "-f" => mode += 1,
            "-v" | "-r" | "-p" | "-d" => {}
            "--" => {
                rest = more;
                break;
            }
            w if w.starts_with('-') => return false,
            _ => break,
        }
        rest = more;
    }
    mode == 1 && !rest.is_empty()
}

/// `rsync --server …`, as the client sends it, and none of the modes that run what the user
/// chooses: the single-use daemon (`--daemon`, `--config`) reads the user's own rsyncd.conf,
/// whose `pre-xfer exec` runs any command, and secluded (protected) arguments (`-s`,
/// `--secluded-args`, `--protect-args`) are read from the connection, where `--daemon` can
/// come after all.
fn rsync_server_mode(args: &[&str]) -> bool {
    if args.first() != Some(&"--server") {
        return false;
    }
    !args.iter().any(|w| match w.strip_prefix("--") {
        Some(long) => ["daemon", "config", "secluded-args", "protect-args"]
            .iter()
            .any(|bad| long.starts_with(bad)),
        // A cluster of short options: `-e` takes the rest of the word as its value (the
        // protocol's compatibility letters, where an `s` means something else).
        None => w
            .strip_prefix('-')
            .is_some_and(|cluster| cluster.split('e').next().is_some_and(|o| o.contains('s'))),
    })
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

/// Cuts what the user chose (the command, `TERM`) in a session's header and metadata to what
/// the backend keeps of each (64 KiB as JSON, where a control character takes six bytes):
/// the Start is one frame of at most 1 MiB, and one over that would leave the session
/// unrecorded (or, under enforce, refused). The program still gets the whole command.
fn fit_start(start: &mut StartMsg) {
    use ztna_common::asciicast::{clip_to_fit, MAX_HEADER_BYTES};
    let mut meta = Value::Object(std::mem::take(&mut start.metadata));
    clip_to_fit(&mut meta, ztna_common::api::MAX_METADATA_BYTES);
    if let Value::Object(m) = meta {
        start.metadata = m;
    }
    if let Ok(mut h) = serde_json::to_value(&start.header) {
        if clip_to_fit(&mut h, MAX_HEADER_BYTES) {
            if let Ok(h) = serde_json::from_value(h) {
                start.header = h;
            }
        }
    }
}

/// How long a write to the daemon may wait (its socket's send timeout).
const DAEMON_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A failed write to the daemon, said plainly: the socket's timeout means the daemon took
/// nothing for that long (it is stuck, or this user's frames wait behind their own others).
pub(super) fn daemon_write_error(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the recording daemon took no output for {} s",
                DAEMON_WRITE_TIMEOUT.as_secs()
            ),
        ),
        _ => e,
    }
}

/// Connects to the daemon, announces the session and reads its decision.
fn open_session(socket: &Path, start: &StartMsg) -> Result<(UnixStream, DecisionMsg), String> {
    let s = UnixStream::connect(socket)
        .map_err(|e| format!("recording daemon unreachable at {}: {e}", socket.display()))?;
    start_session(s, start)
}

/// Sends the Start on a connection to the daemon and reads its decision.
fn start_session(mut s: UnixStream, start: &StartMsg) -> Result<(UnixStream, DecisionMsg), String> {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(DAEMON_WRITE_TIMEOUT));
    let f = Frame::json(Kind::Start, start).map_err(|e| e.to_string())?;
    let sent = ipc::write_frame(&mut s, f.kind, &f.payload);
    // A daemon refusing a user over their connection limit answers without reading the
    // Start and closes: the write may then fail, and the refusal is still there to read. Were
    // it taken for "daemon unreachable", the user could retry until a session ran unrecorded.
    let reply = ipc::read_frame(&mut s).map_err(|e| match &sent {
        Err(w) => format!("recording daemon: {w}"),
        Ok(()) => format!("recording daemon: {e}"),
    })?;
    if let Err(w) = sent {
        let refused = reply.kind == Kind::Decision
            && reply
                .parse::<DecisionMsg>()
                .is_ok_and(|d| d.mode == Mode::Refused);
        if !refused {
            return Err(format!("recording daemon: {w}"));
        }
    }
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

/// What the daemon says on a session's socket: nothing until the session's End (then Ack),
/// unless it stops recording the session first.
enum DaemonWord {
    /// The End was taken.
    Ack,
    /// It is stopping in order (a restart): the next daemon may take the session.
    Stopping(String),
    /// It stopped recording this session (its spool is full) but waits for the End.
    SpoolFull(String),
    /// It went away, or said something it should not have.
    Gone(String),
}

/// Waits for the daemon's next word on a session's socket.
fn daemon_word(s: &mut UnixStream) -> DaemonWord {
    word_of(ipc::read_frame_when_readable(s))
}

/// What a frame from the daemon (or the failure to read one) says.
fn word_of(frame: Result<Frame, FrameError>) -> DaemonWord {
    match frame {
        Ok(f) if f.kind == Kind::Ack => DaemonWord::Ack,
        Ok(f) if f.kind == Kind::Error => match f.parse::<ipc::ErrorMsg>() {
            Ok(m) if m.code == ipc::ERROR_STOPPING => DaemonWord::Stopping(m.message),
            Ok(m) if m.code == ipc::ERROR_SPOOL_FULL => DaemonWord::SpoolFull(m.message),
            Ok(m) => DaemonWord::Gone(m.message),
            Err(e) => DaemonWord::Gone(e.to_string()),
        },
        Ok(f) => DaemonWord::Gone(format!("unexpected {:?} frame", f.kind)),
        Err(e) => DaemonWord::Gone(format!("recording daemon: {e}")),
    }
}

/// Whether the daemon has already said, unread yet, that it stopped recording this session for
/// good (its spool is full, or it is gone; an orderly stop is not that). Under enforce a relay
/// asks before each frame: it then shows nothing more at once, instead of until the watch
/// thread gets the CPU (on a busy machine, several more frames, shown and never recorded).
/// One non-blocking peek; the watch thread still reads the word and acts on it.
fn cut_pending(s: &UnixStream) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd as _;
    // An Error frame is a few hundred bytes.
    let mut buf = [0u8; 1024];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    let n = match recv(s.as_raw_fd(), &mut buf, flags) {
        Ok(0) => return true,
        Ok(n) => n,
        Err(_) => return false,
    };
    match ipc::read_frame(&mut &buf[..n]) {
        Ok(f) => matches!(
            word_of(Ok(f)),
            DaemonWord::SpoolFull(_) | DaemonWord::Gone(_)
        ),
        // Not whole yet: the watch thread decides.
        Err(_) => false,
    }
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
            // Whatever enforce says: it is in the user's hands (see `own_limit`).
            Mode::Refused if d.own_limit => {
                syslog_warn(&format!(
                    "session refused (the user's own limit): {}",
                    d.reason
                ));
                Plan::Refuse(d.reason)
            }
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
    // The user's terminal gets one line (a TOML error spans several).
    let why = crate::logging::one_line(why);
    eprintln!(
        "ztna-recorder: this session must be recorded and cannot be ({why}); access refused."
    );
    1
}

/// A session refused because the configuration cannot be used: nobody can say whether
/// recording is optional, whatever `enforce` may say in it.
fn refuse_unconfigured(e: &anyhow::Error) -> u8 {
    let why = crate::logging::one_line(e);
    eprintln!("ztna-recorder: the recording configuration cannot be used ({why}); access refused.");
    1
}

/// Makes sshd's terminal the recorder's alone, first thing. It is the user's, so any of their
/// processes could open it and talk to the client past the recorder (after stopping it with
/// SIGSTOP, say). In exclusive mode nobody but root can open it again (we keep the
/// descriptors we have). One that opened it before, in the moment between sshd handing it to
/// the user and now (a process left by an earlier session can watch /dev/pts), is looked
/// for among the processes we can see (the user's own, unless one made itself undumpable):
/// returns their pids.
fn claim_terminal() -> Vec<u32> {
    if let Err(e) = rustix::termios::ioctl_tiocexcl(io::stdin()) {
        syslog_warn(&format!("cannot make the terminal exclusive: {e}"));
    }
    other_holders()
}

/// The processes besides ours that have our terminal (stdin) open.
fn other_holders() -> Vec<u32> {
    let Ok(tty) = std::fs::read_link("/proc/self/fd/0") else {
        return Vec::new();
    };
    // Ours, and our parents' (sshd, and a shell that ran us without exec), hold it rightly.
    terminal_holders(&tty, &with_ancestors(std::process::id()))
}

/// Whether the holders [`claim_terminal`] found are gone within a moment of their SIGKILL (a
/// process closes its descriptors as it exits, not when the signal is sent).
fn terminal_freed() -> bool {
    for _ in 0..50 {
        if other_holders().is_empty() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

/// `pid` and its ancestors, up to (not including) init.
pub(crate) fn with_ancestors(pid: u32) -> Vec<u32> {
    let mut ours = vec![pid];
    while let Some(parent) = ours.last().and_then(|&p| parent_of(p)) {
        if parent <= 1 || ours.contains(&parent) {
            break;
        }
        ours.push(parent);
    }
    ours
}

/// The processes other than `ours` that have `tty` open, among those whose descriptors this
/// process may read (as root: all of them).
pub(crate) fn terminal_holders(tty: &Path, ours: &[u32]) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<u32>().ok()?;
            if ours.contains(&pid) {
                return None;
            }
            std::fs::read_dir(e.path().join("fd"))
                .ok()?
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == tty))
                .then_some(pid)
        })
        .collect()
}

/// Where `shell`'s configuration comes from. It runs as the user, and its environment is the
/// user's to set (~/.pam_environment, `SendEnv`): a `ZTNA_RECORDER_*` variable may only make
/// recording stricter (`enforce`, `capture_input` on). Anything else it says is ignored, and
/// syslog says so. `--config`, from sshd's ForceCommand line, is the administrator's.
fn shell_sources(flag: Option<PathBuf>) -> anyhow::Result<crate::config::Sources> {
    let file = flag;
    let mut env = Vec::new();
    for (name, val) in crate::config::our_env()? {
        let key = &name[crate::config::ENV_PREFIX.len()..];
        // Not CONFIG nor SOCKET: whatever file or socket they name, even root's (an empty
        // TOML file is every default, enforce off; /dev/log is no daemon), they could only
        // make this session unrecordable, and then, without enforce, unrecorded.
        let kept = match key {
            "ENFORCE" | "CAPTURE_INPUT" => {
                matches!(
                    val.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            }
            "LOG" => continue,
            _ => false,
        };
        if kept {
            env.push((name, val));
        } else {
            syslog_warn(&format!(
                "{name} ignored: `shell` takes from the environment only what makes recording \
                 stricter (the ForceCommand's --config names another file)"
            ));
        }
    }
    Ok(crate::config::Sources {
        file,
        env,
        flags: Vec::new(),
    })
}

/// A process's parent, from `/proc/PID/stat` (the field after the command's closing paren).
fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

pub fn run(args: ShellArgs) -> anyhow::Result<u8> {
    crate::logging::init("off");
    // We run as the user: without this, the user's own programs could ptrace us, or read our
    // file descriptors in /proc, and write past the recording. (`execve` of the user's
    // program makes it dumpable again.)
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        syslog_warn(&format!("cannot make the recorder undumpable: {e}"));
    }
    let holders = if io::stdin().is_terminal() {
        claim_terminal()
    } else {
        Vec::new()
    };
    let cfg = match shell_sources(args.config).and_then(Config::load_from) {
        Ok(l) => {
            for w in l.notices() {
                syslog_warn(&w);
            }
            l.config
        }
        // Without a configuration nobody can say whether recording is optional.
        Err(e) => return Ok(refuse_unconfigured(&e)),
    };
    if let Some(pid) = holders.first() {
        let why = format!("another process (pid {pid}) holds this session's terminal");
        // It could talk to the client past the recording (after stopping us: it is the
        // user's, as we are). Nothing has a right to a terminal sshd has just made, and in
        // exclusive mode it cannot be opened again: ending these leaves it the recorder's,
        // and the session is recorded, saying so (a refusal would leave no trace of it).
        for &p in &holders {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if cfg.enforce && !terminal_freed() {
            syslog_warn(&format!(
                "session refused (enforce = true): {why}, and it is still there after SIGKILL"
            ));
            return Ok(refuse(&why));
        }
        syslog_warn(&format!(
            "{why}: killed it (and {} more) so that nothing reaches the client past the recording",
            holders.len() - 1
        ));
    }
    let acct = account();
    // Run byte for byte as sent (a file name may be Latin-1); the recording's metadata and
    // header are JSON, so they carry it with U+FFFD for what is not UTF-8.
    let raw_command = std::env::var_os("SSH_ORIGINAL_COMMAND");
    // Plain sshd sets it only for a forced command: the user's program sees what it would see
    // without us. (No other thread runs yet.) Likewise what the drop-in's `SetEnv` sets so
    // that the shell sshd runs us through runs nothing of the user's first (see
    // [`SSHD_SETENV`]): the user's own shell then counts from 1, as under plain sshd.
    std::env::remove_var("SSH_ORIGINAL_COMMAND");
    for (name, _) in SSHD_SETENV {
        if name == "SHLVL" || std::env::var_os(name).is_some_and(|v| v.is_empty()) {
            std::env::remove_var(name);
        }
    }
    let command = raw_command
        .as_ref()
        .map(|c| c.to_string_lossy().into_owned());
    let kind = classify(command.as_deref());
    let tty = io::stdin().is_terminal();
    let mut meta = metadata(&acct, kind, command.as_deref(), tty);
    if let Some(&pid) = holders.first() {
        meta.insert("terminal_held_by_pid".into(), Value::from(pid));
        meta.insert(
            "terminal_holders_killed".into(),
            Value::from(holders[..holders.len().min(crate::ipc::MAX_LISTED_HOLDERS)].to_vec()),
        );
    }
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
    let mut start = StartMsg {
        session_type: "ssh".into(),
        header,
        metadata: meta,
    };
    fit_start(&mut start);

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
            // As sshd runs a command: argv[0] is the shell's name (`bash`, so `$0` is too).
            let name = Path::new(&acct.shell)
                .file_name()
                .map_or_else(|| acct.shell.clone().into(), |n| n.to_owned());
            Program {
                path: acct.shell.clone().into(),
                arg0: name,
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

fn exit_metadata(status: ExitStatus, m: &mut Map<String, Value>) -> i32 {
    if let ExitStatus::Signal(n) = status {
        m.insert("exit_signal".into(), Value::from(n));
    }
    i32::from(status.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The daemon's refusal of a user over their connection limit, written and closed before
    /// the Start is: the Start's write fails, and the session is still refused, not taken for
    /// a daemon that is unreachable (which runs unrecorded without `enforce`).
    #[test]
    fn a_refusal_sent_before_the_start_was_read_is_a_refusal() {
        let (client, mut daemon) = UnixStream::pair().unwrap();
        let refusal = DecisionMsg {
            mode: Mode::Refused,
            reason: "this user already has 256 sessions with the recording daemon".into(),
            session: None,
            own_limit: true,
        };
        let f = Frame::json(Kind::Decision, &refusal).unwrap();
        ipc::write_frame(&mut daemon, f.kind, &f.payload).unwrap();
        drop(daemon);
        let start = StartMsg {
            session_type: "ssh".into(),
            header: ztna_common::Header::new(TtySize { cols: 80, rows: 24 }, Some(0)),
            metadata: serde_json::Map::new(),
        };
        let (_, d) = start_session(client, &start).unwrap();
        assert_eq!(d, refusal);
        // A daemon that went away without a word is still an error.
        let (client, daemon) = UnixStream::pair().unwrap();
        drop(daemon);
        assert!(start_session(client, &start).is_err());
    }

    #[test]
    fn the_drop_in_sets_what_shell_removes() {
        let dropin = include_str!("../../packaging/sshd/50-ztna-recorder.conf");
        let line = dropin
            .lines()
            .find(|l| l.starts_with("SetEnv "))
            .expect("a SetEnv line");
        let expected: Vec<String> = SSHD_SETENV
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(line, format!("SetEnv {}", expected.join(" ")));
    }

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
            t("rsync --server --sender -vlogDtpre.iLsfxCIvu . x"),
            Some("/usr/bin/rsync".into())
        );
        assert_eq!(
            t("scp -v -r -p -d -t -- /tmp/x"),
            Some("/usr/bin/scp".into())
        );
        assert_eq!(t("scp -f -- -dashed"), Some("/usr/bin/scp".into()));
        assert_eq!(
            t("internal-sftp"),
            Some("/usr/lib/openssh/sftp-server".into())
        );
        assert_eq!(
            t("/usr/lib/openssh/sftp-server -l INFO"),
            Some("/usr/lib/openssh/sftp-server".into())
        );
        for evasion in [
            "rsync --server --daemon .",
            "rsync --server --daemon --config=rsyncd.conf .",
            // Arguments read from the connection, where --daemon may come.
            "rsync --server -se.LsfxCIvu",
            "rsync --server -vse.LsfxCIvu . d/",
            "rsync --server --secluded-args -e.LsfxCIvu . d/",
            "rsync --server --protect-args . d/",
            "rsync --sender --server . x",
            // scp's client mode: ssh runs a ProxyCommand (or -S's program) as the user.
            "scp -oProxyCommand=/home/u/p.sh /etc/hostname x:y",
            "scp -S /home/u/fake-ssh -t x",
            "scp -tf x",
            "scp -t -f x",
            "scp -t",
            "scp -3 -t x",
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
