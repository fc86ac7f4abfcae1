#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The recorder core and `ztna-recorder record`, on real PTYs: the binary runs inside a PTY
//! this test owns (as under sshd), every recording is read back by the asciinema CLI and by
//! our parser.

use portable_pty::{native_pty_system, Child, CommandBuilder, MasterPty, PtySize};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use ztna_common::asciicast::{parse_event_line, parse_transcript, Event, EventCode};
use ztna_recorder::recorder::{
    ChunkLimits, ChunkSink, ChunkWriter, Command, EventKind, ExitStatus, FileSink, Session,
    SessionConfig, Sink, SinkPolicy, Terminal, TtySize,
};

const BIN: &str = env!("CARGO_BIN_EXE_ztna-recorder");
// portable-pty's termios comes from another nix version: compare raw bits.
const ECHO: u32 = nix::sys::termios::LocalFlags::ECHO.bits();
const ICANON: u32 = nix::sys::termios::LocalFlags::ICANON.bits();
const LONG: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Reading recordings: the asciinema CLI and our parser must both accept every file.

fn asciinema() -> String {
    let bin = std::env::var("ZTNA_TEST_ASCIINEMA").expect(
        "ZTNA_TEST_ASCIINEMA is not set: it must name the asciinema CLI (scripts/test.sh sets it)",
    );
    // asciinema 2 saves an install id in its config folder on its first run, and two first
    // runs at once race to create that folder: one run, alone, first.
    static FIRST_RUN: std::sync::Once = std::sync::Once::new();
    FIRST_RUN.call_once(|| {
        let out = StdCommand::new(&bin)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .expect("cannot run the asciinema CLI");
        assert!(out.status.success(), "{bin} --version failed: {out:?}");
    });
    bin
}

struct Cast {
    header: serde_json::Value,
    events: Vec<Event>,
    /// What `asciinema cat` printed.
    played: Vec<u8>,
}

impl Cast {
    fn output(&self) -> String {
        self.data(EventCode::Output)
    }
    fn data(&self, code: EventCode) -> String {
        self.events
            .iter()
            .filter(|e| e.code == code)
            .map(|e| e.data.as_str())
            .collect()
    }
    fn count(&self, code: EventCode) -> usize {
        self.events.iter().filter(|e| e.code == code).count()
    }
}

fn parse_cast_text(text: &str) -> (serde_json::Value, Vec<Event>) {
    let t = parse_transcript(text).unwrap_or_else(|e| panic!("our parser rejects the cast: {e}"));
    let header = t.header.expect("the cast has no header line");
    let events: Vec<Event> = t
        .events_text
        .lines()
        .enumerate()
        .map(|(i, l)| parse_event_line(l, i + 2).unwrap())
        .collect();
    let mut prev = 0.0;
    for e in &events {
        assert!(
            e.time >= prev,
            "event times go back: {} after {prev}",
            e.time
        );
        prev = e.time;
    }
    (header, events)
}

fn read_cast(path: &Path) -> Cast {
    let text = std::fs::read_to_string(path).unwrap();
    let (header, events) = parse_cast_text(&text);
    assert_eq!(header["version"], 2);
    let out = StdCommand::new(asciinema())
        .arg("cat")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run the asciinema CLI");
    assert!(
        out.status.success(),
        "asciinema cat {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Cast {
        header,
        events,
        played: out.stdout,
    }
}

// ---------------------------------------------------------------------------------------
// Running the binary inside a PTY we own.

struct Captured {
    buf: Mutex<Vec<u8>>,
    cond: Condvar,
    done: Mutex<bool>,
}

struct PtyRun {
    master: Box<dyn MasterPty + Send>,
    child: Box<dyn Child + Send + Sync>,
    writer: Box<dyn Write + Send>,
    captured: Arc<Captured>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl PtyRun {
    fn start(args: &[&str], dir: &Path, size: TtySize) -> PtyRun {
        PtyRun::start_with_env(args, dir, size, &[])
    }

    fn start_with_env(args: &[&str], dir: &Path, size: TtySize, env: &[(&str, &str)]) -> PtyRun {
        PtyRun::start_program(BIN, args, dir, size, env)
    }

    fn start_program(
        program: &str,
        args: &[&str],
        dir: &Path,
        size: TtySize,
        env: &[(&str, &str)],
    ) -> PtyRun {
        let pair = native_pty_system()
            .openpty(PtySize {
                rows: size.rows,
                cols: size.cols,
                pixel_width: 0,
                pixel_height: 0,
            })
            .unwrap();
        let mut cmd = CommandBuilder::new(program);
        cmd.args(args);
        cmd.cwd(dir);
        cmd.env("TERM", "xterm-256color");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = pair.slave.spawn_command(cmd).unwrap();
        drop(pair.slave);
        let mut reader = pair.master.try_clone_reader().unwrap();
        let writer = pair.master.take_writer().unwrap();
        let captured = Arc::new(Captured {
            buf: Mutex::new(Vec::new()),
            cond: Condvar::new(),
            done: Mutex::new(false),
        });
        let c = captured.clone();
        let reader = std::thread::spawn(move || {
            let mut b = vec![0u8; 65536];
            loop {
                match reader.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        c.buf.lock().unwrap().extend_from_slice(&b[..n]);
                        c.cond.notify_all();
                    }
                }
            }
            *c.done.lock().unwrap() = true;
            c.cond.notify_all();
        });
        PtyRun {
            master: pair.master,
            child,
            writer,
            captured,
            reader: Some(reader),
        }
    }

    fn pid(&self) -> i32 {
        self.child.process_id().unwrap() as i32
    }

    /// Waits until the terminal has shown `needle`.
    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + LONG;
        let mut buf = self.captured.buf.lock().unwrap();
        // Only look at what is new since the last look (the output may be large).
        let mut from = 0;
        loop {
            if find(&buf[from..], needle.as_bytes()) {
                return;
            }
            from = buf.len().saturating_sub(needle.len());
            let now = Instant::now();
            assert!(
                now < deadline,
                "timed out waiting for {needle:?}; terminal so far ends with: {:?}",
                String::from_utf8_lossy(&buf[buf.len().saturating_sub(2000)..])
            );
            buf = self
                .captured
                .cond
                .wait_timeout(buf, deadline - now)
                .unwrap()
                .0;
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
        self.writer.flush().unwrap();
    }

    fn resize(&self, size: TtySize) {
        self.master
            .resize(PtySize {
                rows: size.rows,
                cols: size.cols,
                pixel_width: 0,
                pixel_height: 0,
            })
            .unwrap();
    }

    /// Waits for the recorder to exit; returns its exit code and everything the terminal got.
    fn finish(mut self) -> (u32, Vec<u8>) {
        let deadline = Instant::now() + LONG;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the recorder did not exit");
            std::thread::sleep(Duration::from_millis(5));
        };
        // Everything the recorder wrote is in the PTY; our reader ends when its slave closes.
        let deadline = Instant::now() + Duration::from_secs(10);
        {
            let mut done = self.captured.done.lock().unwrap();
            while !*done && Instant::now() < deadline {
                done = self
                    .captured
                    .cond
                    .wait_timeout(done, Duration::from_millis(50))
                    .unwrap()
                    .0;
            }
        }
        if let Some(r) = self.reader.take() {
            if r.is_finished() {
                r.join().unwrap();
            }
        }
        let out = std::mem::take(&mut *self.captured.buf.lock().unwrap());
        (status.exit_code(), out)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

fn size(cols: u16, rows: u16) -> TtySize {
    TtySize { cols, rows }
}

/// `record -q -c CMD FILE` with no terminal at all.
fn record_headless(dir: &Path, extra: &[&str], cmd: &str) -> (i32, PathBuf, String) {
    let file = dir.join("out.cast");
    let out = StdCommand::new(BIN)
        .arg("record")
        .args(extra)
        .arg("-c")
        .arg(cmd)
        .arg(&file)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), file, stderr)
}

fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------

#[test]
fn known_bytes_round_trip_and_split_utf8() {
    let dir = tempfile::tempdir().unwrap();
    // Part 1 ends in the middle of 🙂 (F0 9F | 99 82), part 2 starts with its rest.
    let part1: Vec<u8> =
        b"nul\0 esc \x1b[1;31mred\x1b[0m crlf\r\nemoji \xf0\x9f\x98\x80 cjk \xe6\xbc\xa2\xe5\xad\x97 split \xf0\x9f"
            .to_vec();
    let part2: Vec<u8> = b"\x99\x82 done\n\ttab \x7f del \x08 bs \"quote\" \\ back\n".to_vec();
    std::fs::write(dir.path().join("p1"), &part1).unwrap();
    std::fs::write(dir.path().join("p2"), &part2).unwrap();
    // -opost: the program's bytes reach the PTY master unchanged, so we can compare exactly.
    let run = PtyRun::start(
        &[
            "record",
            "-q",
            "-c",
            "stty -opost; cat p1; sleep 0.3; cat p2",
            "out.cast",
        ],
        dir.path(),
        size(80, 24),
    );
    let (code, terminal) = {
        run.wait_for("back");
        run.finish()
    };
    assert_eq!(code, 0);
    let expected: Vec<u8> = [part1.as_slice(), part2.as_slice()].concat();
    assert_eq!(
        terminal, expected,
        "the user's terminal must get exactly the program's bytes"
    );
    let cast = read_cast(&dir.path().join("out.cast"));
    let text = String::from_utf8(expected.clone()).unwrap();
    assert_eq!(cast.output(), text);
    assert_eq!(cast.played, expected, "asciinema cat plays back the bytes");
    assert!(
        cast.events.iter().any(|e| e.data.starts_with("🙂")),
        "the split emoji is recorded whole, in the second read's event: {:?}",
        cast.events
    );
    assert!(!cast.output().contains('\u{FFFD}'));
    assert_eq!(cast.header["width"], 80);
    assert_eq!(cast.header["height"], 24);
    assert_eq!(
        cast.header["command"],
        "stty -opost; cat p1; sleep 0.3; cat p2"
    );
    assert_eq!(cast.header["env"]["TERM"], "xterm-256color");
    assert!(cast.header["timestamp"].as_i64().unwrap() > 1_600_000_000);
}

#[test]
fn binary_noise_is_replaced_in_the_recording_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = noise(300_000, 42);
    std::fs::write(dir.path().join("noise"), &data).unwrap();
    let run = PtyRun::start(
        &[
            "record",
            "-q",
            "-c",
            "stty -opost; cat noise; printf END",
            "out.cast",
        ],
        dir.path(),
        size(80, 24),
    );
    run.wait_for("END");
    let (code, terminal) = run.finish();
    assert_eq!(code, 0);
    let mut expected = data.clone();
    expected.extend_from_slice(b"END");
    assert!(terminal == expected, "the user gets the exact bytes");
    let cast = read_cast(&dir.path().join("out.cast"));
    assert_eq!(cast.output(), String::from_utf8_lossy(&expected));
}

#[test]
fn fifty_mib_of_output_with_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut block = String::new();
    let mut i = 0;
    while block.len() < 1 << 20 {
        block.push_str(&format!(
            "\x1b[3{}mline {i} héllo wörld 漢字 🙂\x1b[0m\n",
            i % 8
        ));
        i += 1;
    }
    std::fs::write(dir.path().join("block"), &block).unwrap();
    let total = block.len() * 50;
    let run = PtyRun::start(
        &[
            "record",
            "-q",
            "-c",
            "stty -opost; for i in $(seq 50); do cat block; done; printf FIN",
            "out.cast",
        ],
        dir.path(),
        size(120, 40),
    );
    // Watch the recorder's resident memory while it relays.
    let pid = run.pid();
    let captured = run.captured.clone();
    let watcher = std::thread::spawn(move || {
        let mut peak_kib = 0u64;
        while let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(l) = s.lines().find(|l| l.starts_with("VmRSS:")) {
                let kib: u64 = l.split_whitespace().nth(1).unwrap().parse().unwrap();
                peak_kib = peak_kib.max(kib);
            }
            if *captured.done.lock().unwrap() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peak_kib
    });
    run.wait_for("FIN");
    let (code, terminal) = run.finish();
    let peak_kib = watcher.join().unwrap();
    assert_eq!(code, 0);
    assert_eq!(terminal.len(), total + 3);
    assert!(terminal.starts_with(block.as_bytes()));
    let cast = read_cast(&dir.path().join("out.cast"));
    let out = cast.output();
    assert_eq!(out.len(), total + 3);
    assert!(out == format!("{}FIN", block.repeat(50)));
    assert_eq!(cast.played.len(), total + 3);
    // Unbounded buffering would show tens of MiB here; the relay holds at most its pool.
    assert!(
        peak_kib < 24 * 1024,
        "recorder RSS peaked at {peak_kib} KiB while relaying 50 MiB"
    );
}

#[test]
fn resize_during_a_session_is_followed_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let script = "trap 'echo size=$(stty size)' WINCH; echo ready; \
                  i=0; while [ $i -lt 400 ] && [ ! -e stop ]; do sleep 0.05; i=$((i+1)); done; echo bye";
    let run = PtyRun::start(
        &["record", "-q", "-c", script, "out.cast"],
        dir.path(),
        size(80, 24),
    );
    run.wait_for("ready");
    run.resize(size(100, 30));
    run.wait_for("size=30 100");
    run.resize(size(132, 43));
    run.wait_for("size=43 132");
    std::fs::write(dir.path().join("stop"), b"").unwrap();
    run.wait_for("bye");
    let (code, _) = run.finish();
    assert_eq!(code, 0);
    let cast = read_cast(&dir.path().join("out.cast"));
    assert_eq!(cast.header["width"], 80);
    assert_eq!(cast.header["height"], 24);
    let resizes: Vec<&str> = cast
        .events
        .iter()
        .filter(|e| e.code == EventCode::Resize)
        .map(|e| e.data.as_str())
        .collect();
    assert_eq!(resizes, ["100x30", "132x43"]);
    assert!(cast.output().contains("size=30 100"));
}

#[test]
fn exit_codes_and_signals() {
    let dir = tempfile::tempdir().unwrap();
    for (cmd, want) in [
        ("exit 0", 0),
        ("exit 7", 7),
        ("kill -TERM $$", 143),
        ("kill -KILL $$", 137),
        ("kill -INT $$", 130),
    ] {
        let (code, file, stderr) = record_headless(dir.path(), &["-q", "--overwrite"], cmd);
        assert_eq!(code, want, "{cmd}: {stderr}");
        read_cast(&file);
    }
    // The same through a terminal.
    let run = PtyRun::start(
        &["record", "-q", "-c", "echo hi; exit 42", "t.cast"],
        dir.path(),
        size(80, 24),
    );
    run.wait_for("hi");
    assert_eq!(run.finish().0, 42);
    assert!(read_cast(&dir.path().join("t.cast"))
        .output()
        .contains("hi"));
    // A program that cannot be started.
    let (code, _, stderr) = record_headless(
        dir.path(),
        &["-q", "--overwrite"],
        "exec /nonexistent/program",
    );
    assert_eq!(code, 127, "{stderr}");
}

#[test]
fn hangup_reaches_a_child_that_ignores_it_and_the_terminal_is_restored() {
    let dir = tempfile::tempdir().unwrap();
    let run = PtyRun::start(
        &[
            "record",
            "-q",
            "-c",
            "trap '' HUP; echo ready; sleep 30",
            "out.cast",
        ],
        dir.path(),
        size(80, 24),
    );
    run.wait_for("ready");
    let before = run.master.get_termios().unwrap();
    assert_eq!(
        before.local_flags.bits() & ECHO,
        0,
        "raw mode while recording"
    );
    let t0 = Instant::now();
    // What sshd's hang-up does to the session: SIGHUP.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let after = {
        // Wait for the exit without consuming `run`, to inspect the terminal afterwards.
        let deadline = Instant::now() + LONG;
        let mut run = run;
        let status = loop {
            if let Some(s) = run.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(10));
        };
        let t = run.master.get_termios().unwrap();
        assert_eq!(status.exit_code(), 128 + 9, "killed after the grace period");
        t
    };
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert_eq!(
        after.local_flags.bits() & (ECHO | ICANON),
        ECHO | ICANON,
        "the terminal's mode is restored"
    );
    let cast = read_cast(&dir.path().join("out.cast"));
    assert!(cast.output().contains("ready"));

    // Any other signal whose default would end the recorder is passed on the same way (they
    // killed it, with the terminal left raw and the last line of the file cut): SIGUSR1 ends
    // `sleep`, SIGXCPU (the recorder's CPU limit) hangs up on a shell that ignores it.
    use nix::sys::signal::Signal::{SIGUSR1, SIGXCPU};
    for (sig, script, code) in [
        (SIGUSR1, "echo ready; sleep 30", 128 + 10),
        (SIGXCPU, "trap '' HUP XCPU; echo ready; sleep 30", 128 + 9),
    ] {
        let mut run = PtyRun::start(
            &["record", "-q", "--overwrite", "-c", script, "out.cast"],
            dir.path(),
            size(80, 24),
        );
        run.wait_for("ready");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.pid()), sig).unwrap();
        let deadline = Instant::now() + LONG;
        let status = loop {
            if let Some(s) = run.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "{sig}");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(status.exit_code(), code, "{sig}");
        let t = run.master.get_termios().unwrap();
        assert_eq!(
            t.local_flags.bits() & (ECHO | ICANON),
            ECHO | ICANON,
            "{sig}"
        );
        let cast = read_cast(&dir.path().join("out.cast"));
        assert!(cast.output().contains("ready"), "{sig}");
    }
}

/// Stopped from outside and continued (`kill -TSTP`, then `fg`: the user's shell puts its own
/// modes back on the terminal meanwhile), the recorder puts the terminal in raw mode again.
/// It stayed in the shell's modes: lines echoed twice, ^C to the recorder, ^D ending input.
#[test]
fn a_recorder_stopped_and_continued_takes_raw_mode_back() {
    use nix::sys::signal::{kill, Signal};
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let run = PtyRun::start(
        &["record", "-q", "-c", "echo ready; sleep 30", "out.cast"],
        dir.path(),
        size(80, 24),
    );
    run.wait_for("ready");
    let pid = nix::unistd::Pid::from_raw(run.pid());
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY)
        .open(run.master.tty_name().unwrap())
        .unwrap();
    let lflags = || tcgetattr(&tty).unwrap().local_flags;
    assert!(!lflags().contains(LocalFlags::ECHO), "raw while recording");
    // SIGSTOP: a session leader's SIGTSTP from outside is discarded (an orphaned group).
    kill(pid, Signal::SIGSTOP).unwrap();
    let stopped = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        stat.rsplit(") ").next().is_some_and(|r| r.starts_with('T'))
    };
    let deadline = Instant::now() + LONG;
    while !stopped() {
        assert!(Instant::now() < deadline, "not stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
    // What the shell does when it takes the terminal back.
    let mut cooked = tcgetattr(&tty).unwrap();
    cooked.local_flags |= LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::ISIG;
    tcsetattr(&tty, SetArg::TCSANOW, &cooked).unwrap();
    kill(pid, Signal::SIGCONT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while lflags().intersects(LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::ISIG) {
        assert!(Instant::now() < deadline, "still {:?}", lflags());
        std::thread::sleep(Duration::from_millis(10));
    }
    kill(pid, Signal::SIGHUP).unwrap();
}

#[test]
fn a_background_job_holding_the_pty_does_not_keep_the_recorder_alive() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    // The job ignores SIGHUP and keeps the PTY open after the shell has exited.
    let (code, file, stderr) = record_headless(
        dir.path(),
        &["-q"],
        "(trap '' HUP; exec sleep 8) & echo started",
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(t0.elapsed() < Duration::from_secs(6), "{:?}", t0.elapsed());
    assert!(read_cast(&file).output().contains("started"));
}

/// The program's last output reaches a slow reader whole, however long that takes, and is
/// recorded: the recorder used to wait 200 ms after the program's exit and end, and what the
/// relay had not yet written (blocked on a full pipe) was neither shown nor recorded.
#[test]
fn a_slow_reader_still_gets_the_end_of_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("slow.cast");
    let mut child = StdCommand::new(BIN)
        .args(["record", "-q", "-c", "seq 1 12000; exit 3"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Nothing is read for a while: the pipe fills, and the program exits meanwhile.
    std::thread::sleep(Duration::from_millis(1500));
    let mut shown = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut shown)
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(3));
    let expected: String = (1..=12000).map(|i| format!("{i}\r\n")).collect();
    assert_eq!(shown.len(), expected.len(), "bytes shown");
    assert!(shown == expected.as_bytes());
    assert_eq!(read_cast(&file).output(), expected);
}

#[test]
fn record_without_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let (code, file, stderr) = record_headless(
        dir.path(),
        &["-q", "--cols", "100", "--rows", "30"],
        "stty size",
    );
    assert_eq!(code, 0, "{stderr}");
    let cast = read_cast(&file);
    assert_eq!(cast.header["width"], 100);
    assert_eq!(cast.header["height"], 30);
    assert_eq!(cast.output(), "30 100\r\n");

    let (code, file, _) = record_headless(dir.path(), &["-q", "--overwrite"], "stty size");
    assert_eq!(code, 0);
    let cast = read_cast(&file);
    assert_eq!(
        (cast.header["width"].clone(), cast.header["height"].clone()),
        (80.into(), 24.into())
    );
    assert_eq!(cast.output(), "24 80\r\n");

    // A program in character mode that is not reading gets no end-of-file characters piled
    // up as keys (one a second reached it, each echoed as `^D` into the output). The end of
    // its input (at once: /dev/null) is passed on before it leaves line mode.
    let (code, file, stderr) = record_headless(
        dir.path(),
        &["-q", "--overwrite"],
        "sleep 0.5; stty raw; sleep 2.5; stty sane; echo done",
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(read_cast(&file).output(), "done\r\n");

    // Piped input reaches the program, and its end ends a program that reads to the end.
    let file = dir.path().join("piped.cast");
    let mut child = StdCommand::new(BIN)
        .args([
            "record",
            "-q",
            "-c",
            "while read l; do echo \"got:$l\"; done; echo eof",
        ])
        .arg(&file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"one\ntwo\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("got:one") && stdout.contains("got:two") && stdout.contains("eof"),
        "{stdout}"
    );
    let cast = read_cast(&file);
    assert!(
        cast.output().contains("got:two\r\neof"),
        "{:?}",
        cast.output()
    );
    assert_eq!(cast.played, out.stdout);

    // Input whose last line has no newline still ends (it used to hang there for good).
    let mut child = StdCommand::new(BIN)
        .args(["record", "-q", "--overwrite", "-c", "wc -c"])
        .arg(&file)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"a\nb").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(LONG)
        .expect("the program never saw the end of its input")
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains('3'),
        "{out:?}"
    );

    // The default shell (an interactive bash, which switches to readline after start-up)
    // ends with its input: at once with none, after the piped commands with some. Both
    // waited for ever: the one end-of-file sent before readline reached it as a NUL.
    for input in [&b""[..], b"echo one\necho two\n"] {
        let mut child = StdCommand::new(BIN)
            .args(["record", "-q", "--overwrite"])
            .arg(&file)
            .env("SHELL", "/bin/bash")
            .env("HOME", dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = rx
            .recv_timeout(LONG)
            .unwrap_or_else(|_| {
                // Not left behind holding the test's stderr.
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                panic!("the shell never saw the end of its input")
            })
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !input.is_empty() {
            assert!(
                stdout.contains("one\r\n") && stdout.contains("two\r\n"),
                "{stdout:?}"
            );
        }
    }
}

/// A run refused before the program starts changes nothing: an earlier recording (FILE or
/// `--chunk-dir`) is left as it was under --overwrite, and no new chunk directory is made.
/// Each case used to cost something: the old FILE (SHELL a folder), the old chunks (FILE
/// in a folder that is not there), an empty chunk directory (FILE already there).
#[test]
fn a_refused_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = StdCommand::new(BIN);
        c.arg("record")
            .args(args)
            .current_dir(d)
            .stdin(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = run(
        &["-q", "--chunk-dir", "old", "-c", "echo old", "old.cast"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let snapshot = || {
        let mut files: Vec<(String, Vec<u8>)> = walk(d)
            .into_iter()
            .map(|p| {
                let data = std::fs::read(&p).unwrap();
                (p.strip_prefix(d).unwrap().display().to_string(), data)
            })
            .collect();
        files.sort();
        files
    };
    let before = snapshot();

    let out = run(&["-q", "--overwrite", "old.cast"], &[("SHELL", "/tmp")]);
    assert!(before == snapshot(), "{out:?}: {:?}", snapshot());
    assert_eq!(out.status.code(), Some(126), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("directory"),
        "{out:?}"
    );
    let out = run(
        &[
            "-q",
            "--overwrite",
            "--chunk-dir",
            "old",
            "-c",
            "echo new",
            "gone/new.cast",
        ],
        &[],
    );
    assert!(before == snapshot(), "{out:?}: {:?}", snapshot());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("gone/new.cast"),
        "{out:?}"
    );
    let out = run(
        &["-q", "--chunk-dir", "new", "-c", "echo new", "old.cast"],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{out:?}"
    );
    assert!(!d.join("new").exists());
    assert!(before == snapshot(), "{:?}", snapshot());
    // FILE may still go into the chunk directory the run makes (next to its files).
    let out = run(
        &["-q", "--chunk-dir", "fresh", "-c", "true", "fresh/in.cast"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(d.join("fresh/in.cast").exists() && d.join("fresh/header.json").exists());
}

/// `--chunk-dir` takes its limits from the agent's configuration unless given as flags (the
/// configuration's `chunk_max_bytes` was ignored).
#[test]
fn chunk_limits_come_from_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = |name: &str, flags: &[&str]| {
        let out = StdCommand::new(BIN)
            .args(["record", "-q", "--chunk-dir", name])
            .args(flags)
            .args(["-c", "seq 1 300", &format!("{name}.cast")])
            .current_dir(dir.path())
            .env("ZTNA_RECORDER_CHUNK_MAX_BYTES", "200")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        let sizes: Vec<u64> = walk(&dir.path().join(name))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "cast"))
            .map(|p| std::fs::metadata(p).unwrap().len())
            .collect();
        sizes
    };
    let small = chunks("config", &[]);
    assert!(
        small.len() > 5 && small.iter().all(|&n| n <= 200),
        "{small:?}"
    );
    let big = chunks("flag", &["--chunk-max-bytes", "100000"]);
    assert_eq!(big.len(), 1, "{big:?}");
}

/// The header's `env` is what the program saw, also when SHELL was not set (portable-pty
/// sets it for the program; the header used to leave it out).
#[test]
fn the_header_says_the_shell_the_program_saw() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("env.cast");
    let out = StdCommand::new(BIN)
        .args(["record", "-q", "-c", "printf '%s' \"$SHELL\""])
        .arg(&file)
        .env_remove("SHELL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let cast = read_cast(&file);
    let seen = cast.output();
    assert!(!seen.is_empty());
    assert_eq!(
        cast.header["env"]["SHELL"],
        seen.as_str(),
        "{}",
        cast.header
    );
}

/// What `record` leaves when things go wrong, and what it picks when nothing is said.
#[test]
fn failures_leave_nothing_in_the_way() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str], env: &[(&str, &str)], stdin: &[u8]| {
        let mut c = StdCommand::new(BIN);
        c.arg("record")
            .args(args)
            .current_dir(d)
            .env("ZTNA_RECORDER_CONFIG", d.join("empty.toml"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            err,
        )
    };
    std::fs::write(d.join("empty.toml"), "").unwrap();

    // A program that cannot start: 127, as from a shell, and no recording of nothing (which
    // would stand in the way of the next attempt).
    let (code, _, err) = run(&["-q", "a.cast"], &[("SHELL", "/nonexistent")], b"");
    assert_eq!(code, Some(127), "{err}");
    assert!(err.contains("/nonexistent"), "{err}");
    assert!(!d.join("a.cast").exists());
    // Nor does --overwrite replace an earlier recording for a program that cannot start.
    std::fs::write(d.join("kept.cast"), "an earlier recording\n").unwrap();
    let (code, _, err) = run(
        &["-q", "--overwrite", "kept.cast"],
        &[("SHELL", "/nonexistent")],
        b"",
    );
    assert_eq!(code, Some(127), "{err}");
    assert_eq!(
        std::fs::read_to_string(d.join("kept.cast")).unwrap(),
        "an earlier recording\n"
    );

    // A chunk age no deadline can be that far ahead of is refused (it panicked at the first
    // event, and what followed went unrecorded).
    let (code, _, err) = run(
        &[
            "-q",
            "--chunk-dir",
            "far",
            "--chunk-max-secs",
            "1e19",
            "-c",
            "true",
            "c.cast",
        ],
        &[],
        b"",
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("ten years"), "{err}");
    assert!(!d.join("c.cast").exists() && !d.join("far").exists());

    // FILE named as one of the chunk directory's files: both wrote it at once, and the
    // result was neither recording.
    for (dir, file) in [("cd", "cd/chunk-0.cast"), (".", "header.json")] {
        let (code, _, err) = run(
            &["-q", "--chunk-dir", dir, "-c", "touch ran", file],
            &[],
            b"",
        );
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains("name FILE otherwise"), "{err}");
        assert!(!d.join("ran").exists() && !d.join(file).exists());
    }
    assert!(!d.join("cd").exists());

    // A recording that cannot begin (a full disk: /dev/full takes no byte) runs nothing (the
    // command ran unrecorded, and an empty FILE was left), and a device is not removed.
    let (code, _, err) = run(
        &["-q", "--overwrite", "-c", "touch ran", "/dev/full"],
        &[],
        b"",
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("No space left") && err.contains("not run"),
        "{err}"
    );
    assert!(!d.join("ran").exists());
    assert!(Path::new("/dev/full").exists());

    // An unusable chunk directory is refused before FILE is created.
    std::fs::write(d.join("not-a-dir"), "").unwrap();
    let (code, _, err) = run(
        &["-q", "--chunk-dir", "not-a-dir", "-c", "true", "b.cast"],
        &[],
        b"",
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("not-a-dir"), "{err}");
    assert!(!d.join("b.cast").exists());

    // A chunk directory holding a recording: kept unless --overwrite, which replaces it whole
    // (leftover chunks used to join the new recording).
    // Six events, each past the chunk limit: a chunk each.
    let six = "for i in 1 2 3 4 5 6; do printf 'line %s %0120d\\n' $i 0; sleep 0.05; done";
    let many = [
        "-q",
        "--chunk-dir",
        "ch",
        "--chunk-max-bytes",
        "100",
        "-c",
        six,
    ];
    let (code, _, err) = run(&[&many[..], &["one.cast"]].concat(), &[], b"");
    assert_eq!(code, Some(0), "{err}");
    assert!(d.join("ch/chunk-3.cast").exists());
    let (code, _, err) = run(
        &["-q", "--chunk-dir", "ch", "-c", "echo two", "two.cast"],
        &[],
        b"",
    );
    assert_ne!(code, Some(0));
    assert!(err.contains("--overwrite"), "{err}");
    assert!(!d.join("two.cast").exists());
    let (code, _, err) = run(
        &[
            "-q",
            "--overwrite",
            "--chunk-dir",
            "ch",
            "-c",
            "echo two",
            "two.cast",
        ],
        &[],
        b"",
    );
    assert_eq!(code, Some(0), "{err}");
    let mut rebuilt = std::fs::read_to_string(d.join("ch/header.json")).unwrap();
    rebuilt.push_str(&std::fs::read_to_string(d.join("ch/chunk-0.cast")).unwrap());
    assert!(!d.join("ch/chunk-1.cast").exists());
    assert_eq!(
        rebuilt,
        std::fs::read_to_string(d.join("two.cast")).unwrap()
    );

    // No FILE: a new name each time, even within one second.
    let sub = d.join("names");
    std::fs::create_dir(&sub).unwrap();
    for _ in 0..2 {
        let out = StdCommand::new(BIN)
            .args(["record", "-q", "-c", "true"])
            .current_dir(&sub)
            .env("ZTNA_RECORDER_CONFIG", d.join("empty.toml"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(std::fs::read_dir(&sub).unwrap().count(), 2);

    // No SHELL: the user's shell from the password database, not /bin/sh.
    let shell = nix::unistd::User::from_uid(nix::unistd::getuid())
        .unwrap()
        .unwrap()
        .shell;
    let mut c = StdCommand::new(BIN);
    c.args(["record", "-q", "shell.cast"])
        .current_dir(d)
        .env("ZTNA_RECORDER_CONFIG", d.join("empty.toml"))
        .env_remove("SHELL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"echo \"running:$0\"; exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("running:{}", shell.display())),
        "{text}"
    );

    // --upload that fails: the command's exit status all the same (the contract), the error on
    // stderr, the file kept.
    std::fs::write(d.join("node.key"), "ab".repeat(64)).unwrap();
    std::fs::write(
        d.join("upload.toml"),
        format!(
            "server_url = \"http://127.0.0.1:9\"\nnode_key_file = \"{}\"\nupload_patience_secs = 1\n",
            d.join("node.key").display()
        ),
    )
    .unwrap();
    let upload_cfg = d.join("upload.toml");
    let (code, _, err) = run(
        &[
            "-q",
            "--upload",
            "--config",
            upload_cfg.to_str().unwrap(),
            "-c",
            "exit 4",
            "up.cast",
        ],
        &[],
        b"",
    );
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains("cannot upload"), "{err}");
    read_cast(&d.join("up.cast"));
}

#[test]
fn overwrite_quiet_and_command() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.cast");
    std::fs::write(&file, "precious").unwrap();
    // An existing file is kept and nothing runs.
    let (code, _, stderr) = record_headless(dir.path(), &[], "touch ran");
    assert_ne!(code, 0);
    assert!(
        stderr.contains("already exists") && stderr.contains("--overwrite"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
    assert!(!dir.path().join("ran").exists());
    // --overwrite replaces it; without -q we say what we do, on stderr.
    let (code, _, stderr) = record_headless(dir.path(), &["--overwrite"], "touch ran; echo hello");
    assert_eq!(code, 0);
    assert!(stderr.contains("out.cast"), "{stderr}");
    assert!(dir.path().join("ran").exists());
    let cast = read_cast(&file);
    assert_eq!(cast.output(), "hello\r\n");
    assert_eq!(cast.header["command"], "touch ran; echo hello");
    // -q prints nothing of its own.
    let out = StdCommand::new(BIN)
        .args(["record", "-q", "--overwrite", "-c", "echo quiet"])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"quiet\r\n");
    read_cast(&file);
    // A command that is not UTF-8 (a Latin-1 file name) runs as given; the recording shows
    // U+FFFD for the byte, in its header as in its output (it was refused as an argument).
    let out = StdCommand::new(BIN)
        .args(["record", "-q", "--overwrite", "-c"])
        .arg(std::ffi::OsStr::from_bytes(b"echo caf\xe9"))
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"caf\xe9\r\n");
    let cast = read_cast(&file);
    assert_eq!(cast.output(), "caf\u{fffd}\r\n");
    assert_eq!(cast.header["command"], "echo caf\u{fffd}");
    // A bad argument names what is wrong.
    let out = StdCommand::new(BIN)
        .args(["record", "--cols", "zero", "x.cast"])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cols"));
    // A bad ZTNA_RECORDER_* value is the user's own: refused, naming it (see
    // `a_bad_environment_value_is_refused`; only a system file this user cannot use is skipped)…
    let out = StdCommand::new(BIN)
        .args(["record", "--overwrite", "-c", "echo still"])
        .arg(&file)
        .env("ZTNA_RECORDER_CHUNK_MAX_SECS", "soon")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CHUNK_MAX_SECS"), "{err}");
    // …and a configuration named with --config must load.
    let out = StdCommand::new(BIN)
        .args([
            "record",
            "-q",
            "--overwrite",
            "--config",
            "/nonexistent/agent.toml",
            "-c",
            "echo no",
        ])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml"));
}

/// What the recorder has handled is in the file while the session runs, so a recorder killed
/// mid-session (SIGKILL, the OOM killer) leaves a playable recording of it, and the file can
/// be followed. It used to reach the file only when a buffer filled or the session ended.
#[test]
fn the_file_holds_the_session_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("live.cast");
    let go = dir.path().join("go");
    let cmd = format!(
        "echo output-$((6*7)); while [ ! -e '{}' ]; do sleep 0.05; done",
        go.display()
    );
    let mut child = StdCommand::new(BIN)
        .args(["record", "-q", "-c", &cmd])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + LONG;
    // (Not the command's own text: the header holds that from the start.)
    while !std::fs::read(&file).is_ok_and(|b| find(&b, b"output-42")) {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the output never reached the file");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::write(&go, "").unwrap();
    assert!(read_cast(&file).output().contains("output-42"));
}

#[test]
fn input_is_recorded_only_with_capture_input() {
    // Off by default; on by the flag, the environment (any of the config's true words) or
    // the configuration file, as for `shell`.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], bool);
    // (An empty file for "default": the machine's own /etc/ztna-recorder/config.toml is not
    // the test's.)
    // `--no-capture-input` turns it off over the configuration; the last of the two flags wins.
    let cases: [Case; 8] = [
        (&["--config", "empty.toml"], &[], false),
        (&["--capture-input"], &[], true),
        (&[], &[("ZTNA_RECORDER_CAPTURE_INPUT", "1")], true),
        (&["--config", "on.toml"], &[], true),
        (&["--config", "off.toml"], &[], false),
        (&["--config", "on.toml", "--no-capture-input"], &[], false),
        (&["--no-capture-input", "--capture-input"], &[], true),
        (&["--capture-input", "--no-capture-input"], &[], false),
    ];
    for (extra, env, capture) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("on.toml"), "capture_input = true\n").unwrap();
        std::fs::write(dir.path().join("off.toml"), "capture_input = false\n").unwrap();
        std::fs::write(dir.path().join("empty.toml"), "").unwrap();
        let mut args = vec!["record", "-q"];
        args.extend(extra);
        args.extend([
            "-c",
            "echo ready; read line; echo \"got:$line\"",
            "out.cast",
        ]);
        let mut run = PtyRun::start_with_env(&args, dir.path(), size(80, 24), env);
        run.wait_for("ready");
        run.write(b"s3cret\r");
        run.wait_for("got:s3cret");
        assert_eq!(run.finish().0, 0);
        let cast = read_cast(&dir.path().join("out.cast"));
        assert!(cast.output().contains("got:s3cret"));
        if capture {
            assert_eq!(cast.data(EventCode::Input), "s3cret\r", "{extra:?} {env:?}");
        } else {
            assert_eq!(cast.count(EventCode::Input), 0, "{extra:?} {env:?}");
        }
    }
}

#[test]
fn type_ahead_is_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    // Typed before the recorder has even started: must reach the program.
    let mut run = PtyRun::start(
        &[
            "record",
            "-q",
            "-c",
            "sleep 0.5; read line; echo \"got:$line\"",
            "out.cast",
        ],
        dir.path(),
        size(80, 24),
    );
    run.write(b"early\r");
    run.wait_for("got:early");
    assert_eq!(run.finish().0, 0);
    read_cast(&dir.path().join("out.cast"));
}

/// The program's PTY starts with the user's terminal modes, as under `script`: their erase
/// and interrupt keys, and `iutf8` (without it, a backspace in a cooked-mode prompt takes one
/// byte of a multi-byte character and leaves the rest).
#[test]
fn the_program_gets_the_users_terminal_modes() {
    let dir = tempfile::tempdir().unwrap();
    let script =
        format!("stty iutf8 erase ^H intr ^G; exec '{BIN}' record -q -c 'stty -a' out.cast");
    let run = PtyRun::start_program("bash", &["-c", &script], dir.path(), size(80, 24), &[]);
    assert_eq!(run.finish().0, 0);
    let said = read_cast(&dir.path().join("out.cast")).output();
    assert!(said.contains("erase = ^H"), "{said}");
    assert!(said.contains("intr = ^G"), "{said}");
    assert!(
        said.contains(" iutf8") && !said.contains("-iutf8"),
        "{said}"
    );
}

/// A bad `ZTNA_RECORDER_*` value is the user's own mistake: refused, naming it, and nothing
/// runs (it used to drop the whole agent configuration silently, with the system's file).
#[test]
fn a_bad_environment_value_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = StdCommand::new(BIN)
        .args(["record", "-q", "-c", "touch ran", "x.cast"])
        .current_dir(dir.path())
        .env_remove("ZTNA_RECORDER_CONFIG")
        .env("ZTNA_RECORDER_CAPTURE_INPUT", "maybe")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("ZTNA_RECORDER_CAPTURE_INPUT"), "{err}");
    assert!(!dir.path().join("ran").exists());
    assert!(!dir.path().join("x.cast").exists());
}

/// A terminal left non-blocking by an earlier program (the file description is shared): the
/// relay waits where a read or write would block. It used to stop at the first `EAGAIN`, so
/// typed keys never reached the program and output stopped reaching the user.
#[test]
fn a_non_blocking_terminal_still_gets_every_byte_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let set_nonblock = "import fcntl, os, sys; \
        fcntl.fcntl(0, fcntl.F_SETFL, fcntl.fcntl(0, fcntl.F_GETFL) | os.O_NONBLOCK); \
        os.execv(sys.argv[1], sys.argv[1:])";
    let mut run = PtyRun::start_program(
        "python3",
        &[
            "-c",
            set_nonblock,
            BIN,
            "record",
            "-q",
            "-c",
            "echo READY; read x; echo got:$x; head -c 300000 /dev/zero | tr '\\0' z; echo; echo END",
            "out.cast",
        ],
        dir.path(),
        size(80, 24),
        &[],
    );
    run.wait_for("READY");
    run.write(b"typed\r");
    run.wait_for("got:typed");
    {
        // The terminal stops reading for a while: the PTY fills and writes to it would block.
        let _stall = run.captured.buf.lock().unwrap();
        std::thread::sleep(Duration::from_millis(700));
    }
    run.wait_for("END");
    let (code, out) = run.finish();
    assert_eq!(code, 0);
    assert_eq!(out.iter().filter(|&&b| b == b'z').count(), 300_000);
    let cast = read_cast(&dir.path().join("out.cast"));
    assert_eq!(cast.output().matches('z').count(), 300_000);
}

#[test]
fn chunks_rebuild_the_single_file_and_honour_both_limits() {
    let dir = tempfile::tempdir().unwrap();
    let chunks = dir.path().join("chunks");
    let max_bytes = 3000usize;
    let max_secs = 0.4;
    // Bursts of output over about two seconds.
    let (code, file, stderr) = record_headless(
        dir.path(),
        &[
            "-q",
            "--chunk-dir",
            chunks.to_str().unwrap(),
            "--chunk-max-bytes",
            &max_bytes.to_string(),
            "--chunk-max-secs",
            &max_secs.to_string(),
        ],
        // Then one burst whose reads are each bigger than a chunk (4 KiB of text without a
        // newline, and colour codes that take six bytes each as JSON).
        "for i in 1 2 3 4 5 6 7 8; do seq -f \"line $i.%g héllo\" 1 150; sleep 0.25; done; \
         printf 'é%.0s' $(seq 8000); printf '\\033[1m%.0s' $(seq 1500)",
    );
    assert_eq!(code, 0, "{stderr}");
    let whole = std::fs::read_to_string(&file).unwrap();
    let mut rebuilt = std::fs::read_to_string(chunks.join("header.json")).unwrap();
    let mut n = 0;
    loop {
        let p = chunks.join(format!("chunk-{n}.cast"));
        if !p.exists() {
            break;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let summary = ztna_common::asciicast::validate_events(&text).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            text.len() <= max_bytes,
            "chunk {n} has {} bytes",
            text.len()
        );
        let first = parse_event_line(lines[0], 1).unwrap().time;
        let last = summary.last_time.unwrap();
        assert!(last - first < max_secs, "chunk {n} spans {first}..{last}");
        // Each chunk is playable with the header in front of it.
        let alone = dir.path().join(format!("alone-{n}.cast"));
        std::fs::write(
            &alone,
            format!(
                "{}{}",
                std::fs::read_to_string(chunks.join("header.json")).unwrap(),
                text
            ),
        )
        .unwrap();
        read_cast(&alone);
        rebuilt.push_str(&text);
        n += 1;
    }
    assert!(n >= 6, "only {n} chunks");
    let leftovers: Vec<_> = std::fs::read_dir(&chunks)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        rebuilt, whole,
        "header + chunks == the single-file recording"
    );
    let cast = read_cast(&file);
    assert!(cast.output().contains("line 8.150 héllo"));
    let burst = format!("{}{}", "é".repeat(8000), "\u{1b}[1m".repeat(1500));
    assert!(cast.output().ends_with(&burst));
}

#[test]
fn our_parser_reads_casts_made_by_asciinema() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("asciinema.cast");
    let out = StdCommand::new(asciinema())
        .args([
            "rec",
            "-q",
            "-c",
            "printf 'from asciinema \\360\\237\\231\\202\\n'",
        ])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cast = read_cast(&file);
    assert!(
        cast.output().contains("from asciinema 🙂"),
        "{:?}",
        cast.output()
    );
    assert!(cast.header["width"].as_u64().unwrap() > 0);
}

// ---------------------------------------------------------------------------------------
// The library API, as `shell` uses it: the caller's own sinks, failures, markers.

struct FailingSink {
    after: usize,
    seen: usize,
}

impl Sink for FailingSink {
    fn name(&self) -> String {
        "failing".into()
    }
    fn start(&mut self, _: &ztna_recorder::recorder::Header) -> std::io::Result<()> {
        if self.after == 0 {
            return Err(std::io::Error::other("refused at start"));
        }
        Ok(())
    }
    fn event(&mut self, _: &ztna_recorder::recorder::Event<'_>) -> std::io::Result<()> {
        self.seen += 1;
        if self.seen >= self.after {
            return Err(std::io::Error::other("disk full"));
        }
        Ok(())
    }
    fn finish(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Collects every event as the caller's own sink would see it.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<String>>>);

impl Sink for Collect {
    fn start(&mut self, h: &ztna_recorder::recorder::Header) -> std::io::Result<()> {
        self.0.lock().unwrap().push(h.to_line());
        Ok(())
    }
    fn event(&mut self, e: &ztna_recorder::recorder::Event<'_>) -> std::io::Result<()> {
        let s = match (e.kind, e.asciicast_line()) {
            (EventKind::Exit(st), _) => format!("exit {}", st.code()),
            (_, Some(line)) => String::from_utf8(line.to_vec()).unwrap(),
            _ => unreachable!(),
        };
        self.0.lock().unwrap().push(s);
        Ok(())
    }
    fn not_started(&mut self, reason: &str, status: u8) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap()
            .push(format!("not started ({status}): {reason}"));
        Ok(())
    }
    fn held(&mut self, _now: std::time::Duration) -> std::io::Result<()> {
        self.0.lock().unwrap().push("held".into());
        Ok(())
    }
    fn finish(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap().push("finish".into());
        Ok(())
    }
}

/// A writer the test can read back.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);
impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn custom_config(script: &str, out: &Shared) -> SessionConfig {
    let mut c = SessionConfig::new(Command::shell_command("/bin/sh", script));
    c.terminal = Terminal::Custom {
        input: None,
        output: Box::new(out.clone()),
    };
    c.size = Some(size(90, 20));
    c
}

#[test]
fn a_failing_sink_never_breaks_the_session_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = Shared::default();
    let collect = Collect::default();
    let path = dir.path().join("lib.cast");
    let sinks: Vec<Box<dyn Sink>> = vec![
        Box::new(FailingSink { after: 1, seen: 0 }),
        Box::new(FileSink::create(&path, false).unwrap()),
        Box::new(collect.clone()),
    ];
    let session = Session::new(custom_config(
        "stty -opost; for i in $(seq 200); do echo line $i; done; exit 5",
        &out,
    ));
    let control = session.control();
    assert!(control.marker("start"));
    let outcome = session.run(sinks).unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(5));
    assert_eq!(outcome.status.code(), 5);
    assert_eq!(
        outcome.sink_failures.len(),
        1,
        "{:?}",
        outcome.sink_failures
    );
    assert_eq!(outcome.sink_failures[0].sink, "failing");
    assert!(outcome.sink_failures[0].error.contains("disk full"));
    assert!(outcome.termination.is_none());
    let expected: String = (1..=200).map(|i| format!("line {i}\n")).collect();
    assert_eq!(
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap(),
        expected
    );
    let cast = read_cast(&path);
    assert_eq!(cast.output(), expected);
    assert_eq!(cast.header["width"], 90);
    assert_eq!(cast.count(EventCode::Marker), 1);
    assert_eq!(outcome.output_bytes, expected.len() as u64);
    assert!((outcome.duration.as_secs_f64() - cast.events.last().unwrap().time).abs() < 1e-5);
    let seen = collect.0.lock().unwrap().clone();
    assert!(seen[0].starts_with("{\"version\":2"));
    assert_eq!(seen[seen.len() - 2], "exit 5");
    assert_eq!(seen[seen.len() - 1], "finish");
    // The caller's sink saw exactly the lines of the file.
    let file_text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(seen[..seen.len() - 2].concat(), file_text);
}

/// While held, output is recorded but not shown; the sinks hear when the relay stopped, and
/// release shows what was held.
#[test]
fn held_output_is_recorded_first_and_shown_on_release() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let out = Shared::default();
    let collect = Collect::default();
    let session = Session::new(custom_config(
        &format!(
            "stty -opost; echo one; while [ ! -e {} ]; do sleep 0.05; done; echo two; exit 4",
            go.display()
        ),
        &out,
    ));
    let control = session.control();
    let sinks: Vec<Box<dyn Sink>> = vec![Box::new(collect.clone())];
    let run = std::thread::spawn(move || session.run(sinks).unwrap());
    let shown = || String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let until = |what: &str, cond: &dyn Fn() -> bool| {
        let t0 = std::time::Instant::now();
        while !cond() {
            assert!(t0.elapsed() < std::time::Duration::from_secs(20), "{what}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    until("one shown", &|| shown() == "one\n");
    control.hold();
    std::fs::write(&go, "").unwrap();
    until("held", &|| {
        collect.0.lock().unwrap().iter().any(|l| l == "held")
    });
    let seen = collect.0.lock().unwrap().clone();
    let at = seen.iter().position(|l| l == "held").unwrap();
    assert!(seen[at - 1].ends_with(", \"o\", \"two\\n\"]\n"), "{seen:?}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(shown(), "one\n", "shown while held");
    control.release();
    let outcome = run.join().unwrap();
    assert_eq!(outcome.status, ExitStatus::Code(4));
    assert_eq!(shown(), "one\ntwo\n");
}

#[test]
fn fail_closed_refuses_or_ends_the_session() {
    // A sink that cannot start: nothing runs.
    let dir = tempfile::tempdir().unwrap();
    let out = Shared::default();
    let mut c = custom_config(&format!("touch {}/ran", dir.path().display()), &out);
    c.sink_policy = SinkPolicy::FailClosed;
    let err = Session::new(c)
        .run(vec![Box::new(FailingSink { after: 0, seen: 0 })])
        .unwrap_err();
    assert!(err.to_string().contains("refused at start"), "{err}");
    assert!(!dir.path().join("ran").exists());

    // A sink that fails later: the program is hung up on, and what it prints after that
    // (it ignores the hang-up) no longer reaches the user.
    let mut c = custom_config(
        "trap '' HUP; echo one; sleep 0.1; echo after-the-failure; sleep 30",
        &out,
    );
    c.sink_policy = SinkPolicy::FailClosed;
    c.hangup_grace = Duration::from_millis(300);
    let t0 = Instant::now();
    let outcome = Session::new(c)
        .run(vec![Box::new(FailingSink { after: 1, seen: 0 })])
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert_eq!(outcome.status, ExitStatus::Signal(9));
    assert_eq!(
        outcome.termination,
        Some(ztna_recorder::recorder::Termination::SinkFailed)
    );
    let shown = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    assert!(
        shown.contains("one") && !shown.contains("after-the-failure"),
        "{shown:?}"
    );
}

/// A login shell for a user whose home directory does not exist starts in `/`, as sshd
/// starts one: it used to fail ("cannot start login shell: No such file or directory"), so
/// such a user could not log in at all.
#[test]
fn a_login_shell_without_a_home_directory_starts_in_the_root() {
    let out = Shared::default();
    let mut command = Command::login_shell();
    command
        .env("HOME", "/nonexistent/home")
        .env("SHELL", "/bin/sh");
    let mut c = SessionConfig::new(command);
    c.terminal = Terminal::Custom {
        input: Some(Box::new(std::io::Cursor::new(b"pwd; exit 3\n".to_vec()))),
        output: Box::new(out.clone()),
    };
    c.size = Some(size(90, 20));
    let outcome = Session::new(c).run(Vec::new()).unwrap();
    let shown = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    assert_eq!(outcome.status, ExitStatus::Code(3), "{shown:?}");
    // (After the shell's prompt and the echoed input: `pwd` printed the root.)
    assert!(shown.contains("/\r\n"), "{shown:?}");
}

/// A program that cannot be executed is not started, the spawn says why, and the sinks hear
/// it. A script whose interpreter is gone is refused before the spawn, with the reason. A
/// binary whose ELF loader is missing (built for another distribution) fails in `exec`: with
/// portable-pty's spawn the child aborted with "fatal runtime error" on the user's terminal
/// while the spawn reported success, as portable-pty closed std's exec-error pipe in the child.
#[test]
fn a_program_that_cannot_be_executed_is_not_started() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("old.py");
    std::fs::write(&script, "#!/nonexistent/python2\nprint 1\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // `true` with its loader's name changed in its program interpreter (PT_INTERP).
    let mut elf = std::fs::read("/bin/true").unwrap();
    let at = elf
        .windows(8)
        .position(|w| w == b"ld-linux")
        .expect("a dynamically linked /bin/true");
    elf[at..at + 8].copy_from_slice(b"ld-gone-");
    let loaderless = dir.path().join("loaderless");
    std::fs::write(&loaderless, elf).unwrap();
    std::fs::set_permissions(
        &loaderless,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let login_shell = {
        let mut c = Command::login_shell();
        c.env("SHELL", &script);
        c
    };
    // There, but not executable: 126 (as from bash), where the others are 127.
    let unrunnable = dir.path().join("unrunnable");
    std::fs::write(&unrunnable, "#!/bin/sh\n").unwrap();
    for (command, why, status) in [
        (
            Command::new(&script),
            "bad interpreter /nonexistent/python2",
            127,
        ),
        (login_shell, "bad interpreter /nonexistent/python2", 127),
        (
            Command::new(&loaderless),
            "required file not found (the program is there",
            127,
        ),
        (Command::new(&unrunnable), "Permission denied", 126),
    ] {
        let out = Shared::default();
        let mut c = SessionConfig::new(command);
        c.terminal = Terminal::Custom {
            input: None,
            output: Box::new(out.clone()),
        };
        c.size = Some(size(80, 24));
        let seen = Collect::default();
        let err = match Session::new(c).run(vec![Box::new(seen.clone())]) {
            Err(e) => e.to_string(),
            Ok(o) => panic!(
                "{o:?}: {:?}",
                String::from_utf8_lossy(&out.0.lock().unwrap())
            ),
        };
        assert!(
            err.starts_with("cannot start ") && err.contains(why),
            "{err}"
        );
        let seen = seen.0.lock().unwrap();
        assert_eq!(seen.len(), 3, "{seen:?}"); // header, why, finish
        assert!(
            seen[1].starts_with(&format!("not started ({status}): ")) && seen[1].contains(why),
            "{seen:?}"
        );
        assert_eq!(seen[2], "finish");
        assert!(
            out.0.lock().unwrap().is_empty(),
            "nothing reaches the terminal"
        );
    }
}

#[test]
fn chunk_sink_in_a_library_session() {
    let dir = tempfile::tempdir().unwrap();
    let out = Shared::default();
    let closed = Arc::new(Mutex::new(Vec::new()));
    let c2 = closed.clone();
    let writer = ChunkWriter::new(
        dir.path().join("spool"),
        ChunkLimits {
            max_bytes: 1 << 20,
            max_age: Duration::from_millis(300),
        },
    )
    .unwrap()
    .on_close(move |c| c2.lock().unwrap().push(c.clone()));
    let session = Session::new(custom_config("echo a; sleep 1; echo b", &out));
    let outcome = session.run(vec![Box::new(ChunkSink::new(writer))]).unwrap();
    assert!(outcome.status.success());
    let closed = closed.lock().unwrap();
    // "a" is closed on time while the program sleeps; "b" at the end.
    assert_eq!(closed.len(), 2, "{closed:?}");
    assert_eq!(closed[0].index, 0);
    assert!(std::fs::read_to_string(&closed[0].path)
        .unwrap()
        .contains("\"a\\r\\n\""));
    assert!(std::fs::read_to_string(&closed[1].path)
        .unwrap()
        .contains("\"b\\r\\n\""));
}

// ---------------------------------------------------------------------------------------
// `record --upload` against the real backend, served in-process on a loopback port.

/// The backend `record --upload` talks to (not yet serving), and a node key for it.
struct UploadBackend {
    dir: tempfile::TempDir,
    app: ztna_recorder_server::App,
    org: uuid::Uuid,
    token: String,
    key_file: PathBuf,
}

impl UploadBackend {
    async fn new() -> UploadBackend {
        use ztna_recorder_server::{App, Config as ServerConfig, Seed};
        let dir = tempfile::tempdir().unwrap();
        let app = App::open(ServerConfig::with_data_dir(dir.path().join("server")))
            .await
            .unwrap();
        let Seed {
            org,
            token,
            node_key,
            ..
        } = app.seed("acme", "Linux-C", true).await.unwrap();
        let key_file = dir.path().join("node.key");
        std::fs::write(&key_file, &node_key).unwrap();
        UploadBackend {
            dir,
            app,
            org,
            token,
            key_file,
        }
    }

    /// Serves on `listener` until the returned task is aborted.
    fn serve(
        &self,
        listener: tokio::net::TcpListener,
    ) -> tokio::task::JoinHandle<std::io::Result<()>> {
        tokio::spawn(ztna_recorder_server::serve(
            listener,
            self.app.clone(),
            std::future::pending::<()>(),
        ))
    }

    /// An agent configuration `name` for the backend at `addr`, with `extra` keys.
    fn config(&self, name: &str, addr: std::net::SocketAddr, extra: &str) -> PathBuf {
        let config = self.dir.path().join(name);
        std::fs::write(
            &config,
            format!(
                "server_url = \"http://{addr}\"\nnode_key_file = \"{}\"\n{extra}",
                self.key_file.display()
            ),
        )
        .unwrap();
        config
    }

    async fn recordings(&self, addr: std::net::SocketAddr) -> Vec<serde_json::Value> {
        let list: serde_json::Value = reqwest::Client::new()
            .post(format!("http://{addr}/api/session-recording"))
            .bearer_auth(&self.token)
            .json(&serde_json::json!({"action": "list", "org_id": self.org.to_string()}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["data"]["recordings"].as_array().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_ships_the_recording_to_the_backend() {
    let backend = UploadBackend::new().await;
    let dir = &backend.dir;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = backend.serve(listener);
    let config = backend.config("config.toml", addr, "chunk_max_bytes = 80\n");
    let cast = dir.path().join("up.cast");
    let (cfg, cast2) = (config.clone(), cast.clone());
    let before = time::OffsetDateTime::now_utc();
    let out = tokio::task::spawn_blocking(move || {
        StdCommand::new(BIN)
            .args(["record", "-q", "--upload", "--config"])
            .arg(&cfg)
            .args([
                "-c",
                "for i in $(seq 8); do echo line $i; sleep 0.03; done; printf '%0300d\\n' 7; exit 3",
            ])
            .arg(&cast2)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let local = read_cast(&cast);

    let recs = backend.recordings(addr).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    let rec = &recs[0];
    assert_eq!(rec["status"], "completed");
    assert_eq!(rec["session_type"], "record");
    let last = local.events.last().unwrap().time;
    assert_eq!(rec["duration_seconds"], last.ceil() as i64);
    // When it was recorded (eight lines 30 ms apart), not when it was uploaded.
    let at = |k: &str| {
        time::OffsetDateTime::parse(
            rec[k].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert!(at("started_at") >= before, "{rec}");
    assert!(
        at("ended_at") - at("started_at") >= time::Duration::milliseconds(200),
        "{rec}"
    );
    assert_eq!(rec["metadata"]["header"]["width"], local.header["width"]);
    // The session metadata of the contract, as for an SSH session.
    assert_eq!(rec["metadata"]["kind"], "exec");
    assert_eq!(rec["metadata"]["uid"], nix::unistd::getuid().as_raw());
    assert!(
        rec["metadata"]["user"]
            .as_str()
            .is_some_and(|u| !u.is_empty()),
        "{rec}"
    );
    assert!(rec["metadata"]["hostname"].is_string(), "{rec}");
    assert!(rec["metadata"]["command"].is_string(), "{rec}");
    let chunks = rec["metadata"]["chunks"].as_array().unwrap();
    assert!(chunks.len() > 1, "chunk_max_bytes is honoured: {chunks:?}");
    let mut text = String::new();
    for c in chunks {
        let key = format!(
            "recordings/{}/{}/chunk-{}.cast",
            rec["org_id"].as_str().unwrap(),
            rec["id"].as_str().unwrap(),
            c["index"]
        );
        let chunk =
            std::fs::read_to_string(dir.path().join("server").join("objects").join(key)).unwrap();
        assert!(chunk.len() <= 80, "{chunk:?}");
        text.push_str(&chunk);
    }
    // The whole cast; its line of 300 digits as events of at most 80 bytes.
    let mut uploaded = String::new();
    for line in text.lines() {
        let ev = parse_event_line(line, 1).unwrap();
        assert!(ev.time <= last);
        if ev.code == EventCode::Output {
            uploaded.push_str(&ev.data);
        }
    }
    assert_eq!(uploaded, local.output(), "the backend has the whole cast");
    assert!(local.output().contains(&format!("{:0300}", 7)));

    // A large recording is sent a chunk at a time: the process never holds all of it (it
    // used to read the file whole and build every chunk first, 3.5 times its size).
    let big_config = backend.config("big.toml", addr, "");
    let measure = format!(
        "import resource, subprocess, sys\n\
         r = subprocess.run(['{BIN}', 'record', '-q', '--upload', '--config', '{}', '-c', \
         'yes 0123456789abcdef0123456789abcdef | head -c 32M', '{}'], stdin=subprocess.DEVNULL, \
         stdout=subprocess.DEVNULL)\n\
         print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n",
        big_config.display(),
        dir.path().join("big.cast").display()
    );
    let out = tokio::task::spawn_blocking(move || {
        StdCommand::new("python3")
            .args(["-c", &measure])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    let (status, kib) = said.trim().split_once(' ').unwrap();
    assert_eq!(
        status,
        "0",
        "{said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kib: u64 = kib.parse().unwrap();
    assert!(kib < 24 * 1024, "peak RSS {kib} KiB for 32 MiB uploaded");

    // Without a server to upload to, nothing runs.
    let bad = dir.path().join("empty.toml");
    std::fs::write(&bad, "").unwrap();
    let out = StdCommand::new(BIN)
        .args(["record", "-q", "--upload", "--config"])
        .arg(&bad)
        .args(["-c", "touch ran"])
        .arg(dir.path().join("never.cast"))
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server_url"));
    assert!(!dir.path().join("ran").exists());
    server.abort();
}

/// `record --upload` with the backend away when the recording ends: it keeps trying (each
/// request may be sent again) and ships it whole once the backend is up, rather than leave
/// nothing, or a partial recording `active` for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_waits_for_a_backend_that_is_briefly_away() {
    let backend = UploadBackend::new().await;
    let dir = &backend.dir;
    // A port nobody serves yet.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = backend.config("config.toml", addr, "chunk_max_bytes = 80\n");
    let cast = dir.path().join("later.cast");
    let (cfg, cast2) = (config.clone(), cast.clone());
    let run = tokio::task::spawn_blocking(move || {
        StdCommand::new(BIN)
            .args(["record", "-q", "--upload", "--config"])
            .arg(&cfg)
            .args(["-c", "for i in $(seq 6); do echo line $i; done; exit 4"])
            .arg(&cast2)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let server = backend.serve(tokio::net::TcpListener::bind(addr).await.unwrap());
    let out = run.await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(!err.contains("cannot upload"), "{err}");
    let recs = backend.recordings(addr).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["status"], "completed");
    assert_eq!(recs[0]["metadata"]["exit_status"], 4);
    let file = std::fs::read_to_string(&cast).unwrap();
    let events = file.lines().count() - 1;
    assert_eq!(
        recs[0]["metadata"]["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["bytes"].as_u64().unwrap())
            .sum::<u64>(),
        (file.len() - file.lines().next().unwrap().len() - 1) as u64,
        "{events} events"
    );
    server.abort();
}

/// Every file under `dir`, recursively.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
