//! A recorded session: the PTY and the program in it, the relay threads, the recorder thread
//! that feeds the sinks, and the edge (raw mode, signals, window size).

use super::event::{Event, EventKind, ExitStatus};
use super::pace::Pace;
use super::queue::{Batch, BytesKind, Item, Queue};
use super::sink::{Sink, SinkFailure, SinkPolicy};
use super::spawn;
use super::term::{self, RawMode};
use super::utf8::Utf8Repair;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use portable_pty::{MasterPty, PtySize};
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, IsTerminal, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use ztna_common::asciicast::{encode_event, split_event_data, EventCode, Header, TtySize};

/// One read from the PTY (the kernel hands out at most 4 KiB at a time; pipes may give more).
const BUF_SIZE: usize = super::queue::MAX_PUSH;
/// The event line's buffer, allocated once: the escaper reserves six bytes for each byte of a
/// read (the most an escape takes) before it writes, so a smaller buffer would be grown, and
/// the old one's pages left resident, at the first full read. Pages it never writes cost
/// nothing.
const LINE_CAPACITY: usize = BUF_SIZE * 6 + 256;
const SMALL_STACK: usize = 64 * 1024;
const RECORDER_STACK: usize = 512 * 1024;

/// The program to run: argv, environment changes and working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Empty for the user's login shell.
    argv: Vec<OsString>,
    /// What the program sees as its name, when not `argv[0]`.
    arg0: Option<OsString>,
    /// `Some` sets, `None` removes; applied in order over the recorder's own environment.
    env: Vec<(OsString, Option<OsString>)>,
    cwd: Option<PathBuf>,
}

impl Command {
    /// Runs `program` (looked up in `PATH`), in the current directory unless [`cwd`](Self::cwd).
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Command {
            argv: vec![program.as_ref().to_owned()],
            arg0: None,
            env: Vec::new(),
            cwd: None,
        }
    }

    /// The user's login shell (`$SHELL`, else the passwd entry), as a login shell (`-bash`),
    /// in the home directory unless [`cwd`](Self::cwd).
    pub fn login_shell() -> Self {
        Command {
            argv: Vec::new(),
            arg0: None,
            env: Vec::new(),
            cwd: None,
        }
    }

    /// `shell -c command`, as sshd runs a remote command: `$0` is the shell's name (`bash`).
    pub fn shell_command(shell: impl AsRef<OsStr>, command: impl AsRef<OsStr>) -> Self {
        let shell = shell.as_ref();
        let mut c = Command::new(shell);
        c.arg0 = Path::new(shell).file_name().map(OsStr::to_owned);
        c.arg("-c").arg(command);
        c
    }

    pub fn arg(&mut self, arg: impl AsRef<OsStr>) -> &mut Self {
        if self.argv.is_empty() {
            // A login shell takes no arguments; make it an explicit program instead.
            self.argv.push(user_shell());
        }
        self.argv.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        for a in args {
            self.arg(a);
        }
        self
    }

    pub fn env(&mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> &mut Self {
        self.env
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    pub fn env_remove(&mut self, key: impl AsRef<OsStr>) -> &mut Self {
        self.env.push((key.as_ref().to_owned(), None));
        self
    }

    pub fn cwd(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.cwd = Some(dir.into());
        self
    }

    pub fn is_login_shell(&self) -> bool {
        self.argv.is_empty()
    }

    /// The argv (empty for a login shell).
    pub fn argv(&self) -> &[OsString] {
        &self.argv
    }

    /// The value the program will see for `key`.
    pub fn env_value(&self, key: &str) -> Option<OsString> {
        let mut v = std::env::var_os(key);
        for (k, val) in &self.env {
            if k == key {
                v = val.clone();
            }
        }
        v
    }

    /// The program as std starts it. `program` is its [`program_path`](Self::program_path),
    /// `tty` the name of the PTY it runs on.
    fn std_command(&self, program: &Path, tty: &Path) -> io::Result<std::process::Command> {
        use std::os::unix::process::CommandExt;
        // The environment: ours, then the changes in order.
        let mut env: BTreeMap<OsString, OsString> = std::env::vars_os().collect();
        for (k, v) in &self.env {
            match v {
                Some(v) => env.insert(k.clone(), v.clone()),
                None => env.remove(k),
            };
        }
        // Set here, the same way the header's is found, so that the recording says what the
        // program saw.
        if !env.contains_key(OsStr::new("SHELL")) {
            env.insert("SHELL".into(), user_shell());
        }
        // sshd's `SSH_TTY` names its terminal, not the program's: writing there would bypass
        // the recording, and under `shell`, which makes it exclusive (TIOCEXCL), fails with
        // EBUSY (`echo > $SSH_TTY`, `GPG_TTY=$SSH_TTY` for pinentry).
        if let Some(v) = env.get_mut(OsStr::new("SSH_TTY")) {
            *v = tty.as_os_str().to_owned();
        }
        check_interpreter(program)?;
        let mut cmd = std::process::Command::new(program);
        match self.argv.split_first() {
            Some((first, args)) => {
                cmd.arg0(self.arg0.as_ref().unwrap_or(first)).args(args);
            }
            None => {
                // A login shell: `-bash`, as login(1) and sshd start it.
                let mut arg0 = OsString::from("-");
                arg0.push(program.file_name().unwrap_or(program.as_os_str()));
                cmd.arg0(arg0);
            }
        }
        cmd.env_clear().envs(env);
        match &self.cwd {
            Some(dir) => {
                cmd.current_dir(dir);
            }
            // A command runs where it was asked from (the default).
            None if !self.argv.is_empty() => {}
            // A login shell starts at home, and in `/` when there is none, as sshd does
            // ("Could not chdir to home directory").
            None => {
                match self.env_value("HOME").filter(|h| Path::new(h).is_dir()) {
                    Some(home) => cmd.current_dir(home),
                    None => cmd.current_dir("/"),
                };
            }
        }
        Ok(cmd)
    }

    /// The file that will be executed: the login shell's `SHELL`, a path as given, or the first
    /// executable of that name in `PATH` (else the name, for `exec` to say it was not found).
    fn program_path(&self) -> PathBuf {
        let Some(first) = self.argv.first() else {
            return self.env_value("SHELL").unwrap_or_else(user_shell).into();
        };
        let p = Path::new(first);
        if p.components().count() > 1 {
            return p.to_path_buf();
        }
        let path = self.env_value("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|d| d.join(p))
            .find(|c| nix::unistd::access(c, nix::unistd::AccessFlags::X_OK).is_ok())
            .unwrap_or_else(|| p.to_path_buf())
    }

    /// Whether the program can be started, checked before anything is created for its
    /// recording (a `record --overwrite` whose shell is missing must not have replaced the
    /// file first): the error a spawn would give.
    pub fn preflight(&self) -> Result<(), Error> {
        let program = self.program_path();
        nix::unistd::access(&program, nix::unistd::AccessFlags::X_OK)
            .map_err(io::Error::from)
            // A folder passes X_OK; `exec` refuses it (SHELL=/tmp).
            .and_then(|()| match std::fs::metadata(&program) {
                Ok(m) if m.is_dir() => Err(io::Error::from_raw_os_error(nix::libc::EISDIR)),
                _ => Ok(()),
            })
            .and_then(|()| check_interpreter(&program))
            .map_err(|e| {
                let (reason, status) = exec_failure(&program, &e);
                Error::Spawn {
                    program: self.display(&program),
                    reason,
                    status,
                }
            })
    }

    /// What to call it in a message; `program` is its [`program_path`](Self::program_path).
    fn display(&self, program: &Path) -> String {
        if self.argv.is_empty() {
            return format!("login shell {}", program.display());
        }
        self.argv[0].to_string_lossy().into_owned()
    }
}

/// Why `program` could not be started, and a shell's exit status for it: 127 when something
/// is not found, 126 when it is there and cannot be run (as bash answers). An ENOENT for a
/// program that is there means what it names is missing: its ELF loader or interpreter.
pub fn exec_failure(program: &Path, e: &io::Error) -> (String, u8) {
    let status = if e.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    if e.raw_os_error() == Some(nix::libc::ENOENT) && program.is_file() {
        return (
            "cannot execute: required file not found (the program is there; the loader or \
             interpreter it names is not)"
                .into(),
            status,
        );
    }
    (e.to_string(), status)
}

/// The user's shell: `SHELL`, else the password database's, else `/bin/sh`.
pub fn user_shell() -> OsString {
    if let Some(s) = std::env::var_os("SHELL").filter(|s| !s.is_empty()) {
        return s;
    }
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.shell.into_os_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/bin/sh".into())
}

/// A script whose interpreter cannot be run, found before the spawn: `exec` would fail with
/// ENOENT, which names neither the script nor what is missing ("No such file or directory"
/// for a script that is there, `#!/usr/bin/python` where only python3 is installed).
pub fn check_interpreter(program: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    // Not ours to judge otherwise: the spawn says what is wrong. (A FIFO would block open.)
    if !std::fs::metadata(program).is_ok_and(|m| m.is_file()) {
        return Ok(());
    }
    let mut head = [0u8; 256];
    let Ok(n) = File::open(program).and_then(|mut f| f.read(&mut head)) else {
        return Ok(());
    };
    let Some(line) = head[..n].strip_prefix(b"#!") else {
        return Ok(());
    };
    let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    let Some(interp) = line
        .split(|&b| b == b' ' || b == b'\t')
        .find(|w| !w.is_empty())
    else {
        return Ok(());
    };
    let interp = Path::new(OsStr::from_bytes(interp));
    if !interp.is_absolute() {
        return Ok(()); // the kernel would look in the program's working directory
    }
    nix::unistd::access(interp, nix::unistd::AccessFlags::X_OK).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!(
                "{}: bad interpreter {}: {}",
                program.display(),
                interp.display(),
                e.desc()
            ),
        )
    })
}

/// Where the session's user is.
pub enum Terminal {
    /// The process's own stdin/stdout. When stdin is a terminal it is put in raw mode (and
    /// restored), its size is the PTY's and `SIGWINCH` is followed. `SIGTERM`, `SIGHUP`,
    /// `SIGXCPU`, `SIGINT`, `SIGQUIT` and the other signals whose default would end the
    /// recorder (`SIGUSR1`, `SIGALRM`…) are forwarded to the program (the first three, if it
    /// does not end within [`SessionConfig::hangup_grace`], are followed by `SIGKILL`).
    /// Without a terminal on stdin, end of input is passed on as an end-of-file character.
    Stdio,
    /// Any reader and writer (tests, embedding). No raw mode, no signal handling; resize
    /// with [`Control::resize`]. `input: None` sends nothing to the program.
    Custom {
        input: Option<Box<dyn Read + Send>>,
        output: Box<dyn Write + Send>,
    },
}

impl std::fmt::Debug for Terminal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Terminal::Stdio => f.write_str("Stdio"),
            Terminal::Custom { .. } => f.write_str("Custom"),
        }
    }
}

/// Everything about a session but its sinks.
#[derive(Debug)]
pub struct SessionConfig {
    pub command: Command,
    pub terminal: Terminal,
    /// The PTY's size. `None`: the terminal's, else 80x24.
    pub size: Option<TtySize>,
    /// Record what the user types (`i` events). Off by default.
    pub capture_input: bool,
    /// The header's `command` (`None` for a login shell).
    pub header_command: Option<String>,
    /// The header's `title`.
    pub title: Option<String>,
    pub sink_policy: SinkPolicy,
    /// How long a program has to end after `SIGTERM`/`SIGHUP` before it is killed.
    pub hangup_grace: Duration,
    /// After the program has exited, how long to wait for the rest of its output while
    /// something else (a background job) still holds the PTY open. What the program itself
    /// wrote is relayed whatever it takes (a slow terminal or pipe), unless the session is
    /// hung up.
    pub drain_timeout: Duration,
}

impl SessionConfig {
    /// Defaults: the process's terminal, its size, no input capture, fail open, 2 s grace,
    /// 200 ms drain.
    pub fn new(command: Command) -> Self {
        SessionConfig {
            command,
            terminal: Terminal::Stdio,
            size: None,
            capture_input: false,
            header_command: None,
            title: None,
            sink_policy: SinkPolicy::FailOpen,
            hangup_grace: Duration::from_secs(2),
            drain_timeout: Duration::from_millis(200),
        }
    }
}

/// Why the session ended the program rather than the program ending by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// The recorder received this signal and forwarded it.
    Signal(i32),
    /// A sink failed under [`SinkPolicy::FailClosed`].
    SinkFailed,
    /// [`Control::terminate`] was called.
    Requested,
}

/// How a session went.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: ExitStatus,
    pub header: Header,
    /// The time of the last asciicast event (the recording's duration).
    pub duration: Duration,
    /// Asciicast events recorded.
    pub events: u64,
    /// Bytes the program wrote.
    pub output_bytes: u64,
    /// Sinks that failed (and were dropped) along the way, in order.
    pub sink_failures: Vec<SinkFailure>,
    pub termination: Option<Termination>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open a PTY: {0}")]
    Pty(String),
    #[error("cannot start {program}: {reason}")]
    Spawn {
        program: String,
        reason: String,
        /// A shell's exit status for it: 127 not found, 126 found but not runnable.
        status: u8,
    },
    #[error("terminal: {0}")]
    Io(#[from] io::Error),
    #[error("recording refused: {0}")]
    SinkStart(SinkFailure),
}

/// Messages to the session's control loop.
enum Ctl {
    ChildExited(ExitStatus),
    OutputEof,
    /// End of input; whether it stopped in the middle of a line.
    InputEof(Box<dyn Write + Send>, bool),
    Signal(i32),
    Resize(TtySize),
    Marker(String),
    Terminate,
    SinkFailed,
}

/// Drives a running (or not yet started) session from another thread.
#[derive(Clone)]
pub struct Control {
    tx: Sender<Ctl>,
    cut: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
    queue: Arc<Queue>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Control")
    }
}

impl Control {
    /// Records an `m` event. False once the session is over.
    pub fn marker(&self, label: impl Into<String>) -> bool {
        self.tx.send(Ctl::Marker(label.into())).is_ok()
    }

    /// Resizes the PTY (and records an `r` event if the size changed).
    pub fn resize(&self, size: TtySize) -> bool {
        self.tx.send(Ctl::Resize(size)).is_ok()
    }

    /// Hangs up on the program (`SIGHUP`, then `SIGKILL` after the grace period). What it
    /// prints from now on reaches no one, as after a terminal's hang-up: a session ended
    /// because it can no longer be recorded must not go on showing output meanwhile.
    pub fn terminate(&self) -> bool {
        self.cut.store(true, Ordering::SeqCst);
        self.tx.send(Ctl::Terminate).is_ok()
    }

    /// Stops showing the program's output until [`release`](Self::release) (or the session is
    /// cut): what the relay reads from then on is recorded first and shown after, and the
    /// program blocks once the PTY's buffer fills. The sinks get [`Sink::held`] once the relay
    /// stops, when everything it showed has reached them. For a recording that must show
    /// nothing it does not have yet (under enforce, while the daemon restarts).
    pub fn hold(&self) {
        self.hold.store(true, Ordering::SeqCst);
        // A relay blocked on a silent program says nothing: the sinks' timers are looked at
        // again, so that one can act on the hold without output.
        self.queue.push(Item::Wake);
    }

    /// Shows output again after [`hold`](Self::hold).
    pub fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
    }
}

/// A session to run. See the module docs.
pub struct Session {
    config: SessionConfig,
    ctl_tx: Sender<Ctl>,
    ctl_rx: Receiver<Ctl>,
    /// Set once the session is being hung up: the relay stops showing output.
    cut: Arc<AtomicBool>,
    /// Set while output is held (see [`Control::hold`]).
    hold: Arc<AtomicBool>,
    queue: Arc<Queue>,
}

impl Session {
    pub fn new(config: SessionConfig) -> Self {
        let (ctl_tx, ctl_rx) = mpsc::channel();
        Session {
            config,
            ctl_tx,
            ctl_rx,
            cut: Arc::new(AtomicBool::new(false)),
            hold: Arc::new(AtomicBool::new(false)),
            queue: Arc::new(Queue::new()),
        }
    }

    /// A handle to add markers, resize or terminate while [`run`](Self::run) blocks.
    pub fn control(&self) -> Control {
        Control {
            tx: self.ctl_tx.clone(),
            cut: self.cut.clone(),
            hold: self.hold.clone(),
            queue: self.queue.clone(),
        }
    }

    /// Runs the program to its end, relaying and recording. Blocks. Sinks get `start` before
    /// the program is started; under [`SinkPolicy::FailClosed`] and
    /// [`SinkPolicy::RefuseAtStart`] a sink that cannot start refuses the session
    /// ([`Error::SinkStart`]) and nothing is run.
    pub fn run(self, sinks: Vec<Box<dyn Sink>>) -> Result<Outcome, Error> {
        let Session {
            config,
            ctl_tx,
            ctl_rx,
            cut,
            hold,
            queue,
        } = self;
        let SessionConfig {
            command,
            terminal,
            size,
            capture_input,
            header_command,
            title,
            sink_policy,
            hangup_grace,
            drain_timeout,
        } = config;

        let (input, output, stdin_tty): (Option<Box<dyn Read + Send>>, Box<dyn Write + Send>, _) =
            match terminal {
                Terminal::Stdio => {
                    let stdin = io::stdin();
                    let tty = stdin.is_terminal();
                    let inp = term::Waiting(File::from(stdin.as_fd().try_clone_to_owned()?));
                    // Unbuffered: every read is written through at once.
                    let out = term::Waiting(File::from(io::stdout().as_fd().try_clone_to_owned()?));
                    (Some(Box::new(inp)), Box::new(out), Some(tty))
                }
                Terminal::Custom { input, output } => (input, output, None),
            };
        let stdio = stdin_tty.is_some();
        let tty = stdin_tty == Some(true);

        // Signals first: a SIGTERM during start-up must still restore the terminal.
        let signals = if stdio {
            Some(SignalThread::start(ctl_tx.clone())?)
        } else {
            None
        };

        let size = size
            .or_else(|| {
                if stdio {
                    term::terminal_size(io::stdin()).or_else(|| term::terminal_size(io::stdout()))
                } else {
                    None
                }
            })
            .unwrap_or_default();
        let header = make_header(&command, size, header_command, title);

        let mut live: Vec<Box<dyn Sink>> = Vec::with_capacity(sinks.len());
        let mut failures = Vec::new();
        for mut sink in sinks {
            match sink.start(&header) {
                Ok(()) => live.push(sink),
                Err(e) => {
                    let f = SinkFailure {
                        sink: sink.name(),
                        during: "start",
                        error: e.to_string(),
                        at: Duration::ZERO,
                    };
                    if matches!(
                        sink_policy,
                        SinkPolicy::FailClosed | SinkPolicy::RefuseAtStart
                    ) {
                        return Err(Error::SinkStart(f));
                    }
                    failures.push(f);
                }
            }
        }

        let pair = portable_pty::native_pty_system()
            .openpty(PtySize {
                rows: size.rows,
                cols: size.cols,
                pixel_width: 0,
                pixel_height: 0,
            })
            .map_err(|e| Error::Pty(format!("{e:#}")))?;
        let reader = pair
            .master
            .try_clone_reader()
            .map_err(|e| Error::Pty(format!("{e:#}")))?;
        let writer = pair
            .master
            .take_writer()
            .map_err(|e| Error::Pty(format!("{e:#}")))?;

        let raw = if tty {
            Some(RawMode::enable(io::stdin())?)
        } else {
            None
        };

        let start = Instant::now();
        let program = command.program_path();
        let spawn_err = |e: io::Error| {
            let (reason, status) = exec_failure(&program, &e);
            Error::Spawn {
                program: command.display(&program),
                reason,
                status,
            }
        };
        let spawned = pair
            .master
            .tty_name()
            .ok_or_else(|| Error::Pty("the PTY has no name".into()))
            .and_then(|tty| {
                let cmd = command.std_command(&program, &tty).map_err(spawn_err)?;
                spawn::spawn_on(&tty, raw.as_ref().map(RawMode::saved), cmd).map_err(spawn_err)
            });
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                // The sinks have a header and no events: close them properly.
                let reason = e.to_string();
                let status = match &e {
                    Error::Spawn { status, .. } => *status,
                    _ => 126,
                };
                for mut sink in live {
                    let _ = sink.not_started(&reason, status);
                    let _ = sink.finish();
                }
                return Err(e);
            }
        };
        // Only the program may hold the slave side: its last close is our end-of-output.
        drop(pair.slave);
        let pid = Pid::from_raw(child.id() as i32);

        let max_line = live
            .iter()
            .filter_map(|s| s.max_line())
            .min()
            .unwrap_or(usize::MAX);
        let recorder = Recorder {
            max_line,
            sinks: live,
            failures,
            policy: sink_policy,
            ctl: ctl_tx.clone(),
            line: Vec::with_capacity(LINE_CAPACITY),
            last: Duration::ZERO,
            last_event: Duration::ZERO,
            events: 0,
            output_bytes: 0,
            start,
            cut: cut.clone(),
        };
        let q = queue.clone();
        let recorder = spawn("ztna-recorder", RECORDER_STACK, move || recorder.run(&q))?;

        let relayed = Arc::new(Relayed::default());
        let out_thread = {
            let q = queue.clone();
            let ctl = ctl_tx.clone();
            let buf = vec![0u8; BUF_SIZE];
            let (cut, hold, relayed) = (cut.clone(), hold.clone(), relayed.clone());
            spawn("ztna-pty-out", SMALL_STACK, move || {
                output_loop(reader, output, buf, q, ctl, start, &cut, &hold, &relayed)
            })?
        };
        if let Some(input) = input {
            let rec = capture_input.then(|| queue.clone());
            let ctl = ctl_tx.clone();
            let buf = vec![0u8; 4096];
            // Detached: it may stay blocked reading the user's terminal after the session.
            spawn("ztna-pty-in", SMALL_STACK, move || {
                input_loop(input, writer, buf, rec, ctl, start)
            })?;
        } else {
            let _ = ctl_tx.send(Ctl::InputEof(writer, false));
        }
        {
            let ctl = ctl_tx.clone();
            spawn("ztna-wait", SMALL_STACK, move || wait_loop(pid, ctl))?;
        }

        let mut lp = ControlLoop {
            master: pair.master,
            pid,
            size,
            rec: queue.clone(),
            start,
            tty,
            stdio,
            kill_at: None,
            hangup_grace,
            termination: None,
            held_writer: None,
            eof_sent_in: None,
            eof_sent_at: None,
            eof_resends: 0,
            eof_check_at: None,
            cut,
            hold,
            relayed,
            owed: None,
            raw,
        };
        let (status, output_eof) = lp.run(&ctl_rx, drain_timeout);

        // The program is gone and its output relayed: give the user their terminal back first.
        drop(lp.raw.take());
        lp.rec.push(Item::Finish {
            status,
            time: start.elapsed(),
        });
        let report = recorder.join().unwrap_or_else(|_| Report::panicked());
        if output_eof {
            let _ = out_thread.join();
        }
        if let Some(s) = signals {
            s.stop();
        }
        drop(child);
        Ok(Outcome {
            status,
            header,
            duration: report.last_event,
            events: report.events,
            output_bytes: report.output_bytes,
            sink_failures: report.failures,
            termination: lp.termination,
        })
    }
}

fn make_header(
    command: &Command,
    size: TtySize,
    header_command: Option<String>,
    title: Option<String>,
) -> Header {
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .ok();
    let mut header = Header::new(size, ts);
    let mut env = BTreeMap::new();
    for key in ["SHELL", "TERM"] {
        let value = command
            .env_value(key)
            .or_else(|| (key == "SHELL").then(user_shell));
        if let Some(v) = value {
            env.insert(key.to_string(), v.to_string_lossy().into_owned());
        }
    }
    header.env = Some(env);
    header.command = header_command;
    header.title = title;
    header
}

fn spawn<T: Send + 'static>(
    name: &str,
    stack: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<thread::JoinHandle<T>> {
    thread::Builder::new()
        .name(name.into())
        .stack_size(stack)
        .spawn(f)
}

struct ControlLoop {
    master: Box<dyn MasterPty + Send>,
    pid: Pid,
    size: TtySize,
    rec: Arc<Queue>,
    start: Instant,
    tty: bool,
    stdio: bool,
    kill_at: Option<Instant>,
    hangup_grace: Duration,
    termination: Option<Termination>,
    /// The PTY writer once input has ended: dropping it writes an end-of-file to the PTY, so
    /// it is kept until the session is over.
    held_writer: Option<Box<dyn Write + Send>>,
    /// Input without a terminal has ended: the PTY's mode when the last end-of-file was sent,
    /// and when.
    eof_sent_in: Option<EofMode>,
    eof_sent_at: Option<Instant>,
    eof_resends: u32,
    eof_check_at: Option<Instant>,
    cut: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
    relayed: Arc<Relayed>,
    /// The user's terminal in raw mode, while the session runs.
    raw: Option<RawMode>,
    /// Once the program has exited: the most output the relay may still pass on, in bytes
    /// handled since the start (see [`ControlLoop::still_owed`]).
    owed: Option<u64>,
}

/// What the PTY may hold beyond what `FIONREAD` counts when the program exits: the line
/// discipline takes 4 KiB at a time, and the rest waits in the tty layer's buffers (up to
/// 640 KiB), invisible until the line discipline has room again.
const PTY_UNSEEN: u64 = 1 << 20;

/// How far the output relay has got, in bytes since the start.
#[derive(Default)]
struct Relayed {
    /// Read from the PTY.
    read: AtomicU64,
    /// Shown to the user (or given up on) and handed to the recording.
    handled: AtomicU64,
}

/// The PTY's input mode, as far as an end-of-file is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EofMode {
    /// Lines (canonical mode): the end-of-file character ends a read.
    Lines,
    /// Characters: the program reads the end-of-file character itself (readline's ^D).
    Chars,
}

/// How often, once input has ended, the PTY's mode is looked at again (see
/// [`ControlLoop::follow_eof`]), and how many more end-of-files are sent at most.
const EOF_CHECK: Duration = Duration::from_millis(50);
const EOF_RESENDS: u32 = 64;
/// How long a program in character mode may run on after an end-of-file before it gets
/// another.
const EOF_AGAIN: Duration = Duration::from_secs(1);

impl ControlLoop {
    /// Until the program has exited and its output is drained. Returns its status and
    /// whether the output reached its end (else something still holds the PTY open).
    fn run(&mut self, ctl: &Receiver<Ctl>, drain_timeout: Duration) -> (ExitStatus, bool) {
        let mut status: Option<ExitStatus> = None;
        let mut output_eof = false;
        let mut drain_until: Option<Instant> = None;
        let mut was_held = false;
        loop {
            if let Some(st) = status {
                if output_eof {
                    return (st, output_eof);
                }
                if drain_until.is_some_and(|d| Instant::now() >= d) {
                    if self.output_held() {
                        // Held output is shown (or the session cut) before the session ends,
                        // and then drained as any other.
                        drain_until = Some(Instant::now() + HOLD_POLL);
                        was_held = true;
                    } else if self.still_owed() {
                        // The relay is still passing on what the program wrote (to a slow
                        // terminal or pipe): that is waited for, not cut off.
                        drain_until = Some(Instant::now() + drain_timeout);
                    } else if was_held {
                        drain_until = Some(Instant::now() + drain_timeout);
                        was_held = false;
                    } else {
                        return (st, output_eof);
                    }
                }
            }
            let deadline = [self.kill_at, drain_until, self.eof_check_at]
                .into_iter()
                .flatten()
                .min();
            let msg = match deadline {
                Some(d) => match ctl.recv_timeout(d.saturating_duration_since(Instant::now())) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    // We hold a sender, so this cannot happen; end as if the program had.
                    Err(RecvTimeoutError::Disconnected) => {
                        return (status.unwrap_or(ExitStatus::Code(1)), output_eof)
                    }
                },
                None => match ctl.recv() {
                    Ok(m) => Some(m),
                    Err(_) => return (status.unwrap_or(ExitStatus::Code(1)), output_eof),
                },
            };
            match msg {
                None => {
                    if self.eof_check_at.is_some_and(|t| Instant::now() >= t) {
                        self.follow_eof(status.is_none());
                    }
                    if self.kill_at.is_some_and(|k| Instant::now() >= k) {
                        self.kill_at = None;
                        if status.is_none() {
                            self.signal_program(Signal::SIGKILL);
                        }
                    }
                }
                Some(Ctl::ChildExited(st)) => {
                    status = Some(st);
                    self.kill_at = None;
                    // What the relay has read, what waits in the PTY, and what the tty
                    // layer may still hold unseen: beyond that it is a background job's
                    // output, which the drain does not wait for.
                    let read = self.relayed.read.load(Ordering::SeqCst);
                    self.owed = Some(read + self.output_waiting().unwrap_or(0) + PTY_UNSEEN);
                    drain_until = Some(Instant::now() + drain_timeout);
                }
                Some(Ctl::OutputEof) => output_eof = true,
                Some(Ctl::InputEof(mut w, mid_line)) => {
                    if !self.tty && self.stdio && status.is_none() {
                        self.eof_sent_in = self.send_eof(&mut w, if mid_line { 2 } else { 1 });
                        self.eof_sent_at = Some(Instant::now());
                        self.eof_check_at = Some(Instant::now() + EOF_CHECK);
                    }
                    self.held_writer = Some(w);
                }
                Some(Ctl::Signal(sig)) if sig == signal_hook::consts::SIGCONT => {
                    // Stopped from outside (SIGTSTP, SIGSTOP) and continued: the shell that
                    // took the terminal meanwhile left it in its own modes, and its size may
                    // have changed.
                    if let Some(raw) = &self.raw {
                        raw.reapply();
                    }
                    self.follow_terminal_size();
                }
                Some(Ctl::Signal(sig)) if sig == signal_hook::consts::SIGWINCH => {
                    self.follow_terminal_size();
                }
                Some(Ctl::Signal(sig)) => {
                    use signal_hook::consts::{SIGHUP, SIGTERM, SIGXCPU};
                    if status.is_some() && [SIGTERM, SIGHUP, SIGXCPU].contains(&sig) {
                        // Told to go while output was still being passed on: stop waiting.
                        self.owed = None;
                        self.cut.store(true, Ordering::SeqCst);
                    }
                    if status.is_none() {
                        self.termination.get_or_insert(Termination::Signal(sig));
                        if let Ok(s) = Signal::try_from(sig) {
                            self.signal_program(s);
                        }
                        // SIGXCPU: the recorder's own CPU limit, SIGKILL follows soon.
                        let hangup = [SIGTERM, SIGHUP, SIGXCPU].contains(&sig);
                        if hangup && self.kill_at.is_none() {
                            self.kill_at = Some(Instant::now() + self.hangup_grace);
                        }
                    }
                }
                Some(Ctl::Resize(size)) => self.resize(size),
                Some(Ctl::Marker(label)) => {
                    self.rec.push(Item::Marker {
                        label,
                        time: self.start.elapsed(),
                    });
                }
                Some(Ctl::Terminate) => self.hang_up(status.is_none(), Termination::Requested),
                Some(Ctl::SinkFailed) => {
                    self.hang_up(status.is_none(), Termination::SinkFailed);
                }
            }
        }
    }

    /// Whether the relay may have yet to pass on output the program wrote before it exited:
    /// it holds bytes it has not handled (blocked on a slow terminal or pipe), or the PTY has
    /// bytes waiting. A count taken at the exit would not do: `FIONREAD` misses what the tty
    /// layer has not yet handed to the line discipline, which the relay may read a moment
    /// later and then wait to write. A background job that keeps writing faster than the
    /// relay can pass it on holds the session for at most [`PTY_UNSEEN`] more; one that
    /// writes now and then does not hold it.
    fn still_owed(&self) -> bool {
        let handled = self.relayed.handled.load(Ordering::SeqCst);
        self.owed.is_some_and(|limit| handled < limit)
            && !self.cut.load(Ordering::SeqCst)
            && (self.relayed.read.load(Ordering::SeqCst) > handled
                || self.output_waiting().is_some_and(|n| n > 0))
    }

    /// Bytes of output waiting in the PTY for the relay to read.
    fn output_waiting(&self) -> Option<u64> {
        let fd = self.master.as_raw_fd()?;
        // SAFETY: the descriptor is the PTY master's, which `self.master` keeps open for as
        // long as this borrow (one ioctl) lasts. portable-pty lends it only as a raw fd.
        #[allow(unsafe_code)]
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        rustix::io::ioctl_fionread(fd).ok()
    }

    fn output_held(&self) -> bool {
        self.hold.load(Ordering::SeqCst) && !self.cut.load(Ordering::SeqCst)
    }

    fn hang_up(&mut self, running: bool, why: Termination) {
        if !running {
            return;
        }
        self.termination.get_or_insert(why);
        self.cut.store(true, Ordering::SeqCst);
        self.signal_program(Signal::SIGHUP);
        if self.kill_at.is_none() {
            self.kill_at = Some(Instant::now() + self.hangup_grace);
        }
    }

    /// Signals the program's process group and the PTY's foreground process group (a job the
    /// shell started), as a terminal hang-up reaches both.
    fn signal_program(&self, sig: Signal) {
        let _ = killpg(self.pid, sig);
        if let Some(fg) = self.master.process_group_leader() {
            if fg != self.pid.as_raw() {
                let _ = killpg(Pid::from_raw(fg), sig);
            }
        }
    }

    /// The user's terminal's size (on stdin, else stdout), passed on to the PTY.
    fn follow_terminal_size(&mut self) {
        let size = term::terminal_size(io::stdin()).or_else(|| term::terminal_size(io::stdout()));
        if let Some(size) = size {
            self.resize(size);
        }
    }

    fn resize(&mut self, size: TtySize) {
        if size == self.size {
            return;
        }
        let ok = self
            .master
            .resize(PtySize {
                rows: size.rows,
                cols: size.cols,
                pixel_width: 0,
                pixel_height: 0,
            })
            .is_ok();
        if ok {
            self.size = size;
            self.rec.push(Item::Resize {
                size,
                time: self.start.elapsed(),
            });
        }
    }

    /// End of input without a terminal: passed on as the PTY's end-of-file character, as at a
    /// keyboard. In canonical mode it ends a read; after a last line with no newline it takes
    /// two, the first handing the program that line (with one, `printf 'a' | record -c 'wc -c'`
    /// never ended). In character mode the program reads it (readline takes ^D on an empty
    /// line as the end). Returns the mode it was sent in.
    fn send_eof(&self, w: &mut Box<dyn Write + Send>, count: usize) -> Option<EofMode> {
        let (mode, veof) = self.pty_mode()?;
        if veof != 0 {
            let _ = w.write_all(&[veof, veof][..count.min(2)]);
        }
        Some(mode)
    }

    /// Bytes the program has not read yet from its terminal, when that can be told (a brief
    /// open of the PTY's slave side: keeping one open would hide the program's last close,
    /// which ends the session's output).
    fn input_pending(&self) -> Option<u64> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let flags = nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_NONBLOCK;
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags.bits())
            .open(self.master.tty_name()?)
            .ok()?;
        rustix::io::ioctl_fionread(&slave).ok()
    }

    /// The PTY's input mode and its end-of-file character.
    fn pty_mode(&self) -> Option<(EofMode, u8)> {
        use nix::sys::termios::{LocalFlags, SpecialCharacterIndices};
        let t = self.master.get_termios()?;
        // portable-pty speaks another nix version: compare the raw flag bits.
        let mode = if t.local_flags.bits() & LocalFlags::ICANON.bits() != 0 {
            EofMode::Lines
        } else {
            EofMode::Chars
        };
        Some((
            mode,
            t.control_chars[SpecialCharacterIndices::VEOF as usize],
        ))
    }

    /// Once input has ended, each time the program switches the PTY's mode it gets another
    /// end-of-file: one sent in canonical mode that a program then reads in character mode
    /// arrives as a NUL (bash, switching to readline after start-up, read that and waited
    /// for ever with `record FILE </dev/null`), and a shell reading lines between commands
    /// must find its input ended too.
    fn follow_eof(&mut self, running: bool) {
        self.eof_check_at = None;
        if !running || self.eof_resends >= EOF_RESENDS {
            return;
        }
        let Some(mut w) = self.held_writer.take() else {
            return;
        };
        let now = self.pty_mode().map(|(mode, _)| mode);
        // In character mode one may also be lost without a mode change seen here: the line
        // discipline takes a write in whatever mode it is in when it gets to it, a moment
        // later, and the program may switch in between. Bash's readline once waited for ever
        // that way (`record` with piped input, in CI, under load): while the program runs on
        // in character mode, another follows every second.
        let again = now == Some(EofMode::Chars)
            && self.eof_sent_at.is_some_and(|t| t.elapsed() >= EOF_AGAIN);
        // Only to a program that has read everything it was given, so waits for input: one
        // that is not reading (`stty raw; sleep 9`, a pager busy drawing) would later take a
        // pile of them as keys, each echoed as `^D` into its output.
        let waiting = now == Some(EofMode::Lines) || self.input_pending().is_none_or(|n| n == 0);
        if now.is_some() && (now != self.eof_sent_in || again) && waiting {
            self.eof_sent_in = self.send_eof(&mut w, 1);
            self.eof_sent_at = Some(Instant::now());
            self.eof_resends += 1;
        }
        self.held_writer = Some(w);
        self.eof_check_at = Some(Instant::now() + EOF_CHECK);
    }
}

/// How often a held relay looks whether it may show output again.
const HOLD_POLL: Duration = Duration::from_millis(10);

#[allow(clippy::too_many_arguments)]
fn output_loop(
    mut reader: Box<dyn Read + Send>,
    mut out: Box<dyn Write + Send>,
    mut buf: Vec<u8>,
    queue: Arc<Queue>,
    ctl: Sender<Ctl>,
    start: Instant,
    cut: &AtomicBool,
    hold: &AtomicBool,
    relayed: &Relayed,
) {
    let mut out_ok = true;
    let mut recording = true;
    let mut pace = Pace::default();
    loop {
        let n = loop {
            match reader.read(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // portable-pty turns EIO (the slave side closed) into Ok(0).
                r => break r.unwrap_or(0),
            }
        };
        if n == 0 {
            break;
        }
        relayed.read.fetch_add(n as u64, Ordering::Relaxed);
        pace.after_read(n);
        let time = start.elapsed();
        if hold.load(Ordering::Relaxed) {
            // Recorded first, shown once released (or never, if the session is cut).
            if recording {
                recording = queue.push_bytes(BytesKind::Output, &buf[..n], time)
                    && queue.push(Item::Held { time });
            }
            while hold.load(Ordering::SeqCst) && !cut.load(Ordering::SeqCst) {
                thread::sleep(HOLD_POLL);
            }
            if out_ok && (cut.load(Ordering::SeqCst) || out.write_all(&buf[..n]).is_err()) {
                out_ok = false;
            }
            relayed.handled.fetch_add(n as u64, Ordering::Relaxed);
            continue;
        }
        // The user gets the bytes first; a terminal that went away stops the relay to it,
        // not the recording. So does a hang-up (one relaxed load per read).
        if out_ok && cut.load(Ordering::Relaxed) {
            out_ok = false;
        }
        if out_ok && out.write_all(&buf[..n]).is_err() {
            out_ok = false;
        }
        if recording {
            recording = queue.push_bytes(BytesKind::Output, &buf[..n], time);
        }
        relayed.handled.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = out.flush();
    let _ = ctl.send(Ctl::OutputEof);
}

fn input_loop(
    mut input: Box<dyn Read + Send>,
    mut pty: Box<dyn Write + Send>,
    mut buf: Vec<u8>,
    rec: Option<Arc<Queue>>,
    ctl: Sender<Ctl>,
    start: Instant,
) {
    let mut mid_line = false;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        // Recorded before it is delivered: once the program has it, it may answer and exit,
        // and the session's end may close the queue before a push made after the write (the
        // last keys typed were lost that way when this thread was preempted in between).
        if let Some(rec) = &rec {
            rec.push_bytes(BytesKind::Input, &buf[..n], start.elapsed());
        }
        if pty.write_all(&buf[..n]).is_err() {
            break;
        }
        mid_line = buf[n - 1] != b'\n';
    }
    let _ = ctl.send(Ctl::InputEof(pty, mid_line));
}

fn wait_loop(pid: Pid, ctl: Sender<Ctl>) {
    let status = loop {
        match waitpid(pid, None) {
            Ok(WaitStatus::Exited(_, code)) => break ExitStatus::Code(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => break ExitStatus::Signal(sig as i32),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            // Reaped by someone else: we cannot know how it ended.
            Err(_) => break ExitStatus::Code(255),
        }
    };
    let _ = ctl.send(Ctl::ChildExited(status));
}

/// The signals the recorder passes on to its program: every one whose default would end the
/// recorder at once, leaving the terminal raw and the recording cut mid-line (real-time ones
/// aside: nothing sends those to a terminal program).
pub const PASSED_ON: &[i32] = {
    use signal_hook::consts::*;
    &[
        SIGTERM,
        SIGHUP,
        SIGINT,
        SIGQUIT,
        SIGUSR1,
        SIGUSR2,
        SIGALRM,
        SIGVTALRM,
        SIGPROF,
        SIGXCPU,
        nix::libc::SIGPWR,
        SIGIO,
    ]
};

struct SignalThread {
    handle: signal_hook::iterator::Handle,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for SignalThread {
    /// On an early error return too: the thread ends instead of lingering.
    fn drop(&mut self) {
        self.handle.close();
    }
}

impl SignalThread {
    fn start(ctl: Sender<Ctl>) -> io::Result<Self> {
        use signal_hook::consts::{SIGCONT, SIGWINCH, SIGXFSZ};
        let mut signals = signal_hook::iterator::Signals::new(
            [SIGWINCH, SIGCONT]
                .into_iter()
                .chain(PASSED_ON.iter().copied()),
        )?;
        // A file-size limit (`ulimit -f`) reached by the recording would kill the recorder
        // (SIGXFSZ's default), leaving the terminal raw and the file cut mid-line: with a
        // handler, the write fails with EFBIG instead, as on a full disk. Handlers do not
        // survive `exec`, so the program keeps the default.
        signal_hook::flag::register(SIGXFSZ, Arc::new(AtomicBool::new(false)))?;
        let handle = signals.handle();
        let thread = spawn("ztna-signals", SMALL_STACK, move || {
            for sig in signals.forever() {
                if ctl.send(Ctl::Signal(sig)).is_err() {
                    break;
                }
            }
        })?;
        Ok(SignalThread {
            handle,
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Report {
    failures: Vec<SinkFailure>,
    last_event: Duration,
    events: u64,
    output_bytes: u64,
}

impl Report {
    fn panicked() -> Self {
        Report {
            failures: vec![SinkFailure {
                sink: String::from("recorder"),
                during: "event",
                error: String::from("the recorder thread panicked"),
                at: Duration::ZERO,
            }],
            last_event: Duration::ZERO,
            events: 0,
            output_bytes: 0,
        }
    }
}

/// Owns the sinks: repairs UTF-8, encodes each event once, hands it to every sink.
struct Recorder {
    sinks: Vec<Box<dyn Sink>>,
    failures: Vec<SinkFailure>,
    policy: SinkPolicy,
    ctl: Sender<Ctl>,
    line: Vec<u8>,
    /// The longest event line a sink takes ([`Sink::max_line`]): longer output or input is
    /// handed out as several events of the same time, the same for every sink.
    max_line: usize,
    /// Time of the latest event handed out: events from different threads are kept in order.
    last: Duration,
    last_event: Duration,
    events: u64,
    output_bytes: u64,
    start: Instant,
    cut: Arc<AtomicBool>,
}

impl Recorder {
    fn run(mut self, queue: &Queue) -> Report {
        super::pace::batch_thread();
        let mut out_utf8 = Utf8Repair::new();
        let mut in_utf8 = Utf8Repair::new();
        let mut batch = Batch::with_full_capacity();
        'session: loop {
            let deadline = self
                .sinks
                .iter()
                .filter_map(|s| s.next_deadline())
                .min()
                .and_then(|d| self.start.checked_add(d));
            queue.take(&mut batch, deadline);
            for item in batch.items.drain(..) {
                match item {
                    Item::Output { start, end, time } => {
                        self.output_bytes += (end - start) as u64;
                        let text = out_utf8.push(&batch.bytes[start..end]);
                        if !text.is_empty() {
                            self.emit(time, EventKind::Output(text));
                        }
                    }
                    Item::Input { start, end, time } => {
                        let text = in_utf8.push(&batch.bytes[start..end]);
                        if !text.is_empty() {
                            self.emit(time, EventKind::Input(text));
                        }
                    }
                    Item::Resize { size, time } => self.emit(time, EventKind::Resize(size)),
                    Item::Marker { label, time } => self.emit(time, EventKind::Marker(&label)),
                    Item::Held { time } => self.held(time.max(self.last)),
                    Item::Wake => {}
                    Item::Finish { status, time } => {
                        let tail = out_utf8.finish();
                        if !tail.is_empty() {
                            self.emit(self.last, EventKind::Output(tail));
                        }
                        let tail = in_utf8.finish();
                        if !tail.is_empty() {
                            self.emit(self.last, EventKind::Input(tail));
                        }
                        self.emit(time, EventKind::Exit(status));
                        self.finish_sinks();
                        break 'session;
                    }
                }
            }
            batch.bytes.clear();
            self.flush();
            self.tick(self.start.elapsed());
        }
        queue.close();
        Report {
            failures: self.failures,
            last_event: self.last_event,
            events: self.events,
            output_bytes: self.output_bytes,
        }
    }

    fn emit(&mut self, time: Duration, kind: EventKind<'_>) {
        let (code, text) = match kind {
            EventKind::Output(s) => (EventCode::Output, s),
            EventKind::Input(s) => (EventCode::Input, s),
            _ => return self.emit_one(time, kind),
        };
        // Only text that could make a line over the limit is measured (escapes take at most
        // six bytes a byte); the rest, nearly always all of it, is encoded once as it comes.
        if text.len().saturating_mul(6).saturating_add(64) <= self.max_line {
            return self.emit_one(time, kind);
        }
        self.line.clear();
        encode_event(&mut self.line, time.max(self.last).as_secs_f64(), code, "");
        let overhead = self.line.len();
        for piece in split_event_data(text, overhead, self.max_line) {
            let kind = match code {
                EventCode::Input => EventKind::Input(piece),
                _ => EventKind::Output(piece),
            };
            self.emit_one(time, kind);
        }
    }

    fn emit_one(&mut self, time: Duration, kind: EventKind<'_>) {
        let time = time.max(self.last);
        self.last = time;
        self.line.clear();
        let secs = time.as_secs_f64();
        match kind {
            EventKind::Output(s) => encode_event(&mut self.line, secs, EventCode::Output, s),
            EventKind::Input(s) => encode_event(&mut self.line, secs, EventCode::Input, s),
            EventKind::Resize(size) => {
                encode_event(&mut self.line, secs, EventCode::Resize, &size.to_string())
            }
            EventKind::Marker(s) => encode_event(&mut self.line, secs, EventCode::Marker, s),
            EventKind::Exit(_) => {}
        }
        if !matches!(kind, EventKind::Exit(_)) {
            self.events += 1;
            self.last_event = time;
        }
        let ev = Event::new(time, kind, &self.line);
        let mut i = 0;
        while i < self.sinks.len() {
            match self.sinks[i].event(&ev) {
                Ok(()) => i += 1,
                Err(e) => {
                    let sink = self.sinks.remove(i);
                    self.failures.push(SinkFailure {
                        sink: sink.name(),
                        during: "event",
                        error: e.to_string(),
                        at: time,
                    });
                    if self.policy == SinkPolicy::FailClosed {
                        let _ = self.ctl.send(Ctl::SinkFailed);
                    }
                }
            }
        }
    }

    fn flush(&mut self) {
        let mut i = 0;
        while i < self.sinks.len() {
            match self.sinks[i].flush() {
                Ok(()) => i += 1,
                Err(e) => {
                    let sink = self.sinks.remove(i);
                    self.fail(sink.name(), "flush", e, self.last);
                }
            }
        }
    }

    fn tick(&mut self, now: Duration) {
        let mut i = 0;
        while i < self.sinks.len() {
            let due = self.sinks[i].next_deadline().is_some_and(|d| d <= now);
            match if due { self.sinks[i].tick(now) } else { Ok(()) } {
                Ok(()) => i += 1,
                Err(e) => {
                    let sink = self.sinks.remove(i);
                    self.fail(sink.name(), "tick", e, now);
                }
            }
        }
    }

    fn held(&mut self, now: Duration) {
        let mut i = 0;
        while i < self.sinks.len() {
            match self.sinks[i].held(now) {
                Ok(()) => i += 1,
                Err(e) => {
                    let sink = self.sinks.remove(i);
                    self.fail(sink.name(), "held", e, now);
                }
            }
        }
    }

    fn finish_sinks(&mut self) {
        let at = self.last;
        for mut sink in std::mem::take(&mut self.sinks) {
            if let Err(e) = sink.finish() {
                self.fail(sink.name(), "finish", e, at);
            }
        }
    }

    fn fail(&mut self, sink: String, during: &'static str, e: io::Error, at: Duration) {
        self.failures.push(SinkFailure {
            sink,
            during,
            error: e.to_string(),
            at,
        });
        if self.policy == SinkPolicy::FailClosed {
            // No more output for the user of a session that can no longer be recorded.
            self.cut.store(true, Ordering::SeqCst);
            let _ = self.ctl.send(Ctl::SinkFailed);
        }
    }
}
