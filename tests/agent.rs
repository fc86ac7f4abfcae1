#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The agent end to end: the real backend (in-process, SQLite + local files, port 0), the real
//! `ztna-recorder daemon` binary, and clients that speak the frame protocol (a raw frame client
//! and the real `ztna-recorder shell` binary). The tests that need OpenSSH's sshd are in the
//! `sshd` module below.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use ztna_recorder::ipc::{self, DecisionMsg, EndMsg, Frame, Kind, Mode, StartMsg, StatusReply};
use ztna_recorder_server::{App, Config as ServerConfig, Seed};

const BIN: &str = env!("CARGO_BIN_EXE_ztna-recorder");

// ---------------------------------------------------------------------------------------
// The backend

struct Backend {
    dir: TempDir,
    app: App,
    addr: Option<std::net::SocketAddr>,
    org: uuid::Uuid,
    token: String,
    machine: uuid::Uuid,
    node_key: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    http: reqwest::Client,
}

impl Backend {
    async fn new(recording_enabled: bool) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let app = App::open(ServerConfig::with_data_dir(dir.path()))
            .await
            .unwrap();
        let Seed {
            org,
            token,
            machine,
            node_key,
            ..
        } = app
            .seed("acme", "Linux-C", recording_enabled)
            .await
            .unwrap();
        let mut b = Backend {
            dir,
            app,
            addr: None,
            org,
            token,
            machine,
            node_key,
            stop: None,
            task: None,
            http: reqwest::Client::new(),
        };
        b.start().await;
        b
    }

    /// Picks a port without serving on it (the backend is "down" until `start`).
    async fn new_down(recording_enabled: bool) -> Backend {
        let mut b = Backend::new(recording_enabled).await;
        b.stop().await;
        b
    }

    fn base(&self) -> String {
        format!("http://{}", self.addr.unwrap())
    }

    async fn start(&mut self) {
        let listener = match self.addr {
            None => tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            Some(a) => {
                let t0 = Instant::now();
                loop {
                    match tokio::net::TcpListener::bind(a).await {
                        Ok(l) => break l,
                        Err(e) if t0.elapsed() < Duration::from_secs(10) => {
                            let _ = e;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => panic!("rebinding {a}: {e}"),
                    }
                }
            }
        };
        self.addr = Some(listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let app = self.app.clone();
        self.task = Some(tokio::spawn(ztna_recorder_server::serve(
            listener,
            app,
            async move {
                let _ = rx.await;
            },
        )));
        self.stop = Some(tx);
    }

    async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }

    async fn user_api(&self, mut body: Value) -> Value {
        body["org_id"] = json!(self.org.to_string());
        let r = self
            .http
            .post(format!("{}/api/session-recording", self.base()))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        r.json().await.unwrap()
    }

    async fn recordings(&self) -> Vec<Value> {
        let v = self.user_api(json!({"action": "list", "limit": 200})).await;
        assert_eq!(v["success"], true, "{v}");
        v["data"]["recordings"].as_array().unwrap().clone()
    }

    /// Waits until `n` recordings are completed; returns them.
    async fn wait_completed(&self, n: usize, within: Duration) -> Vec<Value> {
        let t0 = Instant::now();
        loop {
            let recs = self.recordings().await;
            let done: Vec<Value> = recs
                .iter()
                .filter(|r| r["status"] == "completed")
                .cloned()
                .collect();
            if done.len() >= n {
                return done;
            }
            if t0.elapsed() > within {
                panic!("{n} completed recordings expected within {within:?}, have {recs:#?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The recording's event lines: its chunks, read from the object store, in index order.
    fn events_text(&self, rec: &Value) -> String {
        let chunks = rec["metadata"]["chunks"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut out = String::new();
        for c in &chunks {
            let key = format!(
                "recordings/{}/{}/chunk-{}.cast",
                rec["org_id"].as_str().unwrap(),
                rec["id"].as_str().unwrap(),
                c["index"]
            );
            out.push_str(
                &std::fs::read_to_string(self.dir.path().join("objects").join(key)).unwrap(),
            );
        }
        out
    }
}

fn find_bytes(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn chunk_indexes(rec: &Value) -> Vec<u64> {
    rec["metadata"]["chunks"]
        .as_array()
        .map(|a| a.iter().map(|c| c["index"].as_u64().unwrap()).collect())
        .unwrap_or_default()
}

/// `shell` running `cmd` as for `ssh host CMD` (no PTY, stdin empty), and a tail of what it
/// shows.
fn piped(agent: &Agent, cmd: &str) -> (std::process::Child, Tail) {
    let mut child = agent
        .shell_command(Some(cmd), None)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let tail = Tail::new(child.stdout.take().unwrap());
    (child, tail)
}

/// Files that let a scripted program go on, step by step: `wait(n)` is the shell code that
/// waits for step `n`, `go(n)` lets it go.
struct Steps(PathBuf);

impl Steps {
    fn new(agent: &Agent) -> Steps {
        Steps(agent.dir.path().to_path_buf())
    }

    fn wait(&self, n: u8) -> String {
        format!(
            "while [ ! -e {}/go{n} ]; do sleep 0.05; done",
            self.0.display()
        )
    }

    fn go(&self, n: u8) {
        std::fs::write(self.0.join(format!("go{n}")), "").unwrap();
    }
}

/// The `o` data of a recording's events, concatenated.
fn output_of(events: &str) -> String {
    let mut s = String::new();
    for line in events.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if v[1] == "o" {
            s.push_str(v[2].as_str().unwrap());
        }
    }
    s
}

// ---------------------------------------------------------------------------------------
// The daemon (the real binary)

struct Agent {
    dir: TempDir,
}

impl Agent {
    fn new(backend: &Backend, extra: &str) -> Agent {
        Agent::with_url(backend, &backend.base(), extra)
    }

    /// As [`Agent::new`], reaching the backend at `url` (a proxy in front of it).
    fn with_url(backend: &Backend, url: &str, extra: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("node.key"),
            format!("{}\n", backend.node_key),
        )
        .unwrap();
        // Short waits, unless the test sets its own.
        let quick: String = [("drain_secs", "1"), ("config_refresh_secs", "1")]
            .iter()
            .filter(|(k, _)| !extra.contains(k))
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect();
        let cfg = format!(
            "server_url = \"{}\"\nnode_key_file = \"{}\"\nspool_dir = \"{}\"\nsocket = \"{}\"\nrescan_secs = 1\nretry_max_secs = 1\n{quick}{extra}\n",
            url,
            dir.path().join("node.key").display(),
            dir.path().join("spool").display(),
            dir.path().join("run/recorder.sock").display(),
        );
        std::fs::write(dir.path().join("config.toml"), cfg).unwrap();
        Agent { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// A second config on the same socket with `enforce = true`.
    fn strict_config(&self) -> PathBuf {
        let strict = self.dir.path().join("strict.toml");
        std::fs::write(
            &strict,
            format!("socket = \"{}\"\nenforce = true\n", self.socket().display()),
        )
        .unwrap();
        strict
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("run/recorder.sock")
    }

    fn spool(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// Starts the daemon and waits until it answers a status request.
    fn daemon(&self) -> DaemonProc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let mut child = Command::new(BIN)
            .args(["daemon", "--config"])
            .arg(self.config())
            .env("ZTNA_RECORDER_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        loop {
            if ztna_recorder::status::query(&self.socket()).is_ok() {
                return DaemonProc(child);
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!("daemon exited ({st}): {}", self.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "daemon not ready: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    fn status(&self) -> StatusReply {
        ztna_recorder::status::query(&self.socket()).unwrap()
    }

    /// `ztna-recorder shell` as sshd runs it for `ssh host CMD` (no terminal).
    fn shell(
        &self,
        command: Option<&str>,
        stdin: &[u8],
        config: Option<&Path>,
    ) -> std::process::Output {
        let mut child = self.shell_command(command, config).spawn().unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    /// The command [`Agent::shell`] runs, every stream piped.
    fn shell_command(&self, command: Option<&str>, config: Option<&Path>) -> Command {
        let mut c = Command::new(BIN);
        c.arg("shell")
            .arg("--config")
            .arg(config.unwrap_or(&self.config()))
            .env("SSH_CONNECTION", "192.0.2.7 50123 127.0.0.1 22")
            .env_remove("ZTNA_RECORDER_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match command {
            Some(cmd) => c.env("SSH_ORIGINAL_COMMAND", cmd),
            None => c.env_remove("SSH_ORIGINAL_COMMAND"),
        };
        c
    }
}

/// The daemon's process; killed when a test ends early (a failed assertion).
struct DaemonProc(Child);

impl std::ops::Deref for DaemonProc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for DaemonProc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The end of a test: the daemon stopped as systemd stops it, then the backend.
async fn stop_all(daemon: &mut DaemonProc, backend: &mut Backend) {
    kill(daemon, nix::sys::signal::Signal::SIGTERM);
    daemon.wait().unwrap();
    backend.stop().await;
}

fn kill(child: &mut Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

// ---------------------------------------------------------------------------------------
// A raw frame client

struct FrameClient {
    s: UnixStream,
}

impl FrameClient {
    fn start(socket: &Path) -> (FrameClient, DecisionMsg) {
        Self::start_with(socket, |_| {})
    }

    /// As [`start`](Self::start), with the Start changed by `change` first.
    fn start_with(socket: &Path, change: impl FnOnce(&mut StartMsg)) -> (FrameClient, DecisionMsg) {
        let mut s = Self::send_start_with(socket, change);
        let d = ipc::read_frame(&mut s).unwrap();
        assert_eq!(d.kind, Kind::Decision);
        let d: DecisionMsg = d.parse().unwrap();
        (FrameClient { s }, d)
    }

    /// Connects and sends a Start; the decision is left unread.
    fn send_start(socket: &Path) -> UnixStream {
        Self::send_start_with(socket, |_| {})
    }

    fn send_start_with(socket: &Path, change: impl FnOnce(&mut StartMsg)) -> UnixStream {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut metadata = serde_json::Map::new();
        metadata.insert("user".into(), json!("mallory-claims-root"));
        metadata.insert("uid".into(), json!(0xdead));
        metadata.insert("kind".into(), json!("interactive"));
        metadata.insert("hostname".into(), json!("linux-c"));
        // Not a session of ours that a restart cut.
        metadata.insert(
            "continues".into(),
            json!("2f1f0a4e-0000-4000-8000-000000000000"),
        );
        let mut start = StartMsg {
            session_type: "ssh".into(),
            header: ztna_common::Header::new(
                ztna_common::TtySize {
                    cols: 100,
                    rows: 30,
                },
                // Now, as a real recorder's: the backend believes a start time within 30 days.
                Some(time::OffsetDateTime::now_utc().unix_timestamp()),
            ),
            metadata,
        };
        change(&mut start);
        let f = Frame::json(Kind::Start, &start).unwrap();
        ipc::write_frame(&mut s, f.kind, &f.payload).unwrap();
        s
    }

    fn events(&mut self, lines: &str) {
        ipc::write_frame(&mut self.s, Kind::Events, lines.as_bytes()).unwrap();
    }

    /// The end, with metadata a client may add (`bytes_in`) and some only the daemon may set
    /// (who the user is, and how the session ended), which it must drop.
    fn end(mut self, code: i32) {
        let metadata = json!({"bytes_in": 7, "user": "mallory-claims-root", "uid": 0xdead,
                              "exit_status": 99, "interrupted": false, "hostname": "linux-c",
                              // Checked at the start, or the daemon's own notes: not the End's.
                              "continues": "2f1f0a4e-0000-4000-8000-000000000000",
                              "terminal_held_by_pid": 1, "terminal_holders_killed": [1],
                              "gap_dropped_bytes": 123, "damaged_lines": 7,
                              "chunks_set_aside": [0]});
        let f = Frame::json(
            Kind::End,
            &EndMsg {
                exit_status: Some(code),
                metadata: metadata.as_object().unwrap().clone(),
            },
        )
        .unwrap();
        ipc::write_frame(&mut self.s, f.kind, &f.payload).unwrap();
        let ack = ipc::read_frame(&mut self.s).unwrap();
        assert_eq!(ack.kind, Kind::Ack);
    }
}

fn event_line(t: f64, data: &str) -> String {
    let mut line = Vec::new();
    ztna_common::asciicast::encode_event(&mut line, t, ztna_common::EventCode::Output, data);
    String::from_utf8(line).unwrap()
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// Tests without sshd

/// A Start the backend would refuse for good (a header no player can use, a bad session
/// type, metadata of thousands of values or with U+0000) is refused by the daemon, so nothing
/// is spooled that would end in `failed/` (a user could fill the disk so, straight through
/// the socket). A long string is cut to fit instead, and an End's metadata the backend would
/// refuse is dropped while the recording completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_the_backend_would_refuse_are_refused_and_nothing_lands_in_failed() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    let socket = agent.socket();
    let many: Vec<Value> = (0..2000).map(|_| json!([])).collect();
    type Change = Box<dyn FnOnce(&mut StartMsg) + Send>;
    let bad: Vec<(&str, Change)> = vec![
        ("width 0", Box::new(|s| s.header.width = 0)),
        ("empty session_type", Box::new(|s| s.session_type.clear())),
        (
            "control character in session_type",
            Box::new(|s| s.session_type = "ss\nh".into()),
        ),
        (
            "2000 values",
            Box::new(move |s| {
                s.metadata.insert("junk".into(), Value::Array(many));
            }),
        ),
        (
            "U+0000",
            Box::new(|s| {
                s.metadata.insert("x\0".into(), json!(1));
            }),
        ),
        (
            "an uncuttable 60 KiB key",
            Box::new(|s| {
                s.metadata.insert("k".repeat(60 * 1024), json!(1));
            }),
        ),
    ];
    let (socket2, decisions) = tokio::task::spawn_blocking(move || {
        let decisions: Vec<(&str, DecisionMsg)> = bad
            .into_iter()
            .map(|(what, change)| (what, FrameClient::start_with(&socket, change).1))
            .collect();
        // A frame of another protocol version, or a Start that is not JSON, is answered with
        // an Error saying so (not a bare reset).
        let mut other_version = vec![ipc::VERSION + 1, Kind::Start as u8, 0, 0, 0, 2];
        other_version.extend_from_slice(b"{}");
        let mut not_json = vec![ipc::VERSION, Kind::Start as u8, 0, 0, 0, 3];
        not_json.extend_from_slice(b"{x}");
        for (what, bytes) in [("version", other_version), ("payload", not_json)] {
            let mut s = UnixStream::connect(&socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            std::io::Write::write_all(&mut s, &bytes).unwrap();
            let f = ipc::read_frame(&mut s).unwrap();
            assert_eq!(f.kind, Kind::Error, "{what}");
            let e: ipc::ErrorMsg = f.parse().unwrap();
            assert_eq!(e.code, ipc::ERROR_PROTOCOL, "{what}: {e:?}");
            assert!(e.message.contains(what), "{what}: {e:?}");
        }
        // A user who keeps sending bad frames is still answered, but cannot flood the log.
        for _ in 0..60 {
            let mut s = UnixStream::connect(&socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            std::io::Write::write_all(&mut s, &[ipc::VERSION + 1, Kind::Start as u8, 0, 0, 0, 0])
                .unwrap();
            assert_eq!(ipc::read_frame(&mut s).unwrap().kind, Kind::Error);
        }
        (socket, decisions)
    })
    .await
    .unwrap();
    for (what, d) in &decisions {
        assert_eq!(d.mode, Mode::Refused, "{what}: {d:?}");
        assert!(d.reason.contains("not valid"), "{what}: {d:?}");
    }
    let t0 = Instant::now();
    while !agent.log().contains("no more lines about them") {
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", agent.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logged = agent
        .log()
        .lines()
        .filter(|l| l.contains("socket: connection: ") || l.contains("Start is not valid"))
        .count();
    assert_eq!(logged, 20, "{}", agent.log());
    // A long command is cut, as `shell` cuts it; an End's metadata of thousands of values is
    // dropped, its exit status kept.
    tokio::task::spawn_blocking(move || {
        let (mut c, d) = FrameClient::start_with(&socket2, |s| {
            s.metadata
                .insert("command".into(), json!("c".repeat(200 * 1024)));
        });
        assert_eq!(d.mode, Mode::Record, "{d:?}");
        c.events(&event_line(0.5, "hello\r\n"));
        let f = Frame::json(
            Kind::End,
            &EndMsg {
                exit_status: Some(3),
                metadata: json!({"bytes_in": 1, "junk": (0..2000).collect::<Vec<u32>>()})
                    .as_object()
                    .unwrap()
                    .clone(),
            },
        )
        .unwrap();
        ipc::write_frame(&mut c.s, f.kind, &f.payload).unwrap();
        assert_eq!(ipc::read_frame(&mut c.s).unwrap().kind, Kind::Ack);
    })
    .await
    .unwrap();
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    assert_eq!(recs.len(), 1, "{}", agent.log());
    let meta = &recs[0]["metadata"];
    let cmd = meta["command"].as_str().unwrap();
    assert!(
        cmd.starts_with("ccc") && cmd.ends_with('…') && cmd.len() < 64 * 1024,
        "{}",
        cmd.len()
    );
    assert_eq!(meta["exit_status"], 3);
    assert!(
        meta.get("junk").is_none() && meta.get("bytes_in").is_none(),
        "{meta:#}"
    );
    assert_eq!(backend.events_text(&recs[0]), event_line(0.5, "hello\r\n"));
    // The End's warning counts against the same budget, used up above within the minute.
    assert!(!agent.log().contains("End is not valid"), "{}", agent.log());
    assert_eq!(
        std::fs::read_dir(agent.spool().join("failed"))
            .unwrap()
            .count(),
        0,
        "{}",
        agent.log()
    );
    stop_all(&mut daemon, &mut backend).await;
}

/// The backend is down for the whole session and comes back: every chunk arrives, in order,
/// once, and the peer's real uid replaces what the client claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_then_back_every_chunk_once_in_order() {
    let mut backend = Backend::new_down(true).await;
    let agent = Agent::new(&backend, "chunk_max_bytes = 100\n");
    let mut daemon = agent.daemon();

    let (mut c, d) = FrameClient::start(&agent.socket());
    assert_eq!(d.mode, Mode::Record, "{d:?}");
    let mut sent = String::new();
    for i in 0..12 {
        // Each frame is over half the limit: one chunk per frame.
        let l = event_line(
            i as f64 * 0.25,
            &format!("line {i:02} {}\r\n", "x".repeat(50)),
        );
        assert!(l.len() > 50 && l.len() <= 100, "{}", l.len());
        c.events(&l);
        sent.push_str(&l);
    }
    // One frame of six short lines (22 bytes each) is cut at a line boundary under the
    // limit: a chunk of four lines and one of two.
    let short: String = (0..6)
        .map(|k| event_line(3.125 + k as f64 * 0.125, "ab"))
        .collect();
    assert_eq!(short.len(), 132);
    c.events(&short);
    sent.push_str(&short);
    c.end(0);
    let spool = agent.spool();
    tokio::task::spawn_blocking({
        let socket = agent.socket();
        move || {
            wait_until(
                "an upload error while the backend is down",
                Duration::from_secs(20),
                || {
                    ztna_recorder::status::query(&socket)
                        .map(|s| s.last_upload_error.is_some() && s.chunks_waiting == 14)
                        .unwrap_or(false)
                },
            )
        }
    })
    .await
    .unwrap();
    backend.start().await;
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    assert_eq!(recs.len(), 1);
    // The outage is history in `status`: its error is kept, marked as gone through since.
    let socket = agent.socket();
    let st = tokio::task::spawn_blocking(move || ztna_recorder::status::query(&socket).unwrap())
        .await
        .unwrap();
    assert!(st.last_upload_error.is_some(), "{st:?}");
    assert!(st.last_upload_error_resolved, "{st:?}");
    assert!(st.last_upload_at.is_some(), "{st:?}");
    let rec = &recs[0];
    assert_eq!(chunk_indexes(rec), (0..14).collect::<Vec<u64>>());
    let bytes: Vec<u64> = rec["metadata"]["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["bytes"].as_u64().unwrap())
        .collect();
    assert_eq!((bytes[12], bytes[13]), (88, 44), "{bytes:?}");
    assert_eq!(bytes[12] + bytes[13], short.len() as u64);
    assert_eq!(backend.events_text(rec), sent);
    assert_eq!(rec["duration_seconds"], 4); // last event at 3.75 s
    assert_eq!(rec["metadata"]["exit_status"], 0);
    let got = backend
        .user_api(json!({"action": "get", "session_id": rec["id"]}))
        .await;
    assert_eq!(got["data"]["r2_data"]["transcript_lines"], 18, "{got:#}");
    // Who and where come from the kernel and this machine, not from the client's start or end
    // (the end's metadata used to overwrite them).
    assert_eq!(rec["metadata"]["uid"], nix::unistd::getuid().as_raw());
    assert_ne!(rec["metadata"]["user"], "mallory-claims-root");
    for k in [
        "continues",
        "terminal_held_by_pid",
        "terminal_holders_killed",
        "gap_dropped_bytes",
        "damaged_lines",
        "chunks_set_aside",
    ] {
        assert!(rec["metadata"].get(k).is_none(), "{k}: {rec:#}");
    }
    assert_eq!(
        rec["metadata"]["hostname"].as_str(),
        nix::unistd::gethostname().unwrap().to_str()
    );
    assert_eq!(rec["metadata"]["bytes_in"], 7);
    assert_eq!(rec["machine_id"], backend.machine.to_string());
    // Nothing left in the spool once the backend has everything.
    wait_until("an empty spool", Duration::from_secs(10), || {
        std::fs::read_dir(spool.join("sessions")).unwrap().count() == 0
    });
    let st = agent.status();
    assert_eq!(st.chunks_waiting, 0);
    assert!(st.backend_last_answer_at.is_some());
    kill(&mut daemon, nix::sys::signal::Signal::SIGTERM);
    let t0 = Instant::now();
    let status = daemon.wait().unwrap();
    assert!(status.success(), "{}", agent.log());
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(
        !agent.log().contains(&backend.node_key),
        "the node key reached the log"
    );
    backend.stop().await;
}

/// One read of the program can be bigger than `chunk_max_bytes` (the piped path reads up to
/// 64 KiB at a time): the daemon cuts such a line into events of the same time that fit, so
/// every chunk on the backend is within the limit and the output is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_longer_than_a_chunk_is_cut_into_events_that_fit() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "chunk_max_bytes = 1000\n");
    let mut daemon = agent.daemon();
    let (mut c, d) = FrameClient::start(&agent.socket());
    assert_eq!(d.mode, Mode::Record, "{d:?}");
    let data = "text \u{1b}[1;31mé😀日本\"q\"\\ \u{7}\r\n".repeat(400);
    let small = event_line(0.5, "before\r\n");
    let big = event_line(1.25, &data);
    assert!(big.len() > 10_000);
    c.events(&format!("{small}{big}"));
    c.events(&event_line(2.0, "after\r\n"));
    c.end(0);
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    let rec = &recs[0];
    let chunks = rec["metadata"]["chunks"].as_array().unwrap();
    assert!(chunks.len() > 10, "{chunks:?}");
    for ch in chunks {
        assert!(ch["bytes"].as_u64().unwrap() <= 1000, "{ch}");
    }
    let text = backend.events_text(rec);
    assert_eq!(output_of(&text), format!("before\r\n{data}after\r\n"));
    let times: Vec<f64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()[0]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(times.first(), Some(&0.5));
    assert_eq!(times.last(), Some(&2.0));
    assert!(
        times[1..times.len() - 1].iter().all(|&t| t == 1.25),
        "{times:?}"
    );
    assert_eq!(rec["duration_seconds"], 2);
    stop_all(&mut daemon, &mut backend).await;
}

/// An HTTP/1 proxy to `target` that answers every request but the first `start`: that one
/// reaches the backend, which acts on it, and its answer is lost (the connection closed), as
/// when a network drops or the daemon is killed while it waits. Returns its address and how
/// many `start`s it saw.
async fn proxy_losing_the_first_start(
    target: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let starts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = starts.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let starts = counter.clone();
            tokio::spawn(async move {
                let mut client = BufReader::new(client);
                loop {
                    // One request: its head (less any Connection header), then its body.
                    // A chunked body (the daemon streams chunk files) goes on with its length.
                    let mut head = String::new();
                    let mut length = 0usize;
                    let mut chunked = false;
                    loop {
                        let mut line = String::new();
                        if client.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        let lower = line.to_ascii_lowercase();
                        if let Some(v) = lower.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                        if lower.starts_with("transfer-encoding:") {
                            chunked = lower.contains("chunked");
                        } else if !lower.starts_with("connection:") {
                            head.push_str(&line);
                        }
                    }
                    let mut body = vec![0u8; length];
                    client.read_exact(&mut body).await.unwrap();
                    while chunked {
                        let mut size = String::new();
                        if client.read_line(&mut size).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let n = usize::from_str_radix(size.trim(), 16).unwrap();
                        let mut data = vec![0u8; n + 2];
                        client.read_exact(&mut data).await.unwrap();
                        body.extend_from_slice(&data[..n]);
                        chunked = n > 0;
                    }
                    if !head.to_ascii_lowercase().contains("content-length:") {
                        head.push_str(&format!("content-length: {}\r\n", body.len()));
                    }
                    let mut upstream = tokio::net::TcpStream::connect(target).await.unwrap();
                    upstream
                        .write_all(format!("{head}connection: close\r\n\r\n").as_bytes())
                        .await
                        .unwrap();
                    upstream.write_all(&body).await.unwrap();
                    let mut answer = Vec::new();
                    upstream.read_to_end(&mut answer).await.unwrap();
                    let start = String::from_utf8_lossy(&body).contains("\"action\":\"start\"");
                    if start && starts.fetch_add(1, Ordering::SeqCst) == 0 {
                        return;
                    }
                    if client.get_mut().write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, starts)
}

/// The backend started a recording but its answer never reached the daemon: the daemon asks
/// again with the same session id and gets the same recording, not a second one left active
/// and empty forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_answer_was_lost_makes_one_recording() {
    let mut backend = Backend::new(true).await;
    let (proxy, starts) = proxy_losing_the_first_start(backend.addr.unwrap()).await;
    let agent = Agent::with_url(&backend, &format!("http://{proxy}"), "");
    let mut daemon = agent.daemon();
    let (mut c, d) = FrameClient::start(&agent.socket());
    assert_eq!(d.mode, Mode::Record, "{d:?}");
    let line = event_line(0.5, "after a lost answer\r\n");
    c.events(&line);
    c.end(0);
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    // The first start's answer lost, the second's delivered.
    assert_eq!(
        starts.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "{}",
        agent.log()
    );
    let all = backend.recordings().await;
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(backend.events_text(&recs[0]), line);
    stop_all(&mut daemon, &mut backend).await;
}

/// Files in the spool damaged while the daemon was down (a bad disk block, a careless edit)
/// cost what is damaged, nothing more: the daemon starts, a damaged line is dropped from its
/// chunk (not the chunk), bytes that are not UTF-8 are repaired, a damaged end mark or header
/// still gets the session completed, and each recording says what was damaged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_spool_files_cost_only_what_is_damaged() {
    let mut backend = Backend::new_down(true).await;
    let agent = Agent::new(&backend, "chunk_max_bytes = 100\n");
    let mut daemon = agent.daemon();
    let sessions = agent.spool().join("sessions");
    let mut ids = Vec::new();
    let mut sent = Vec::new();
    for code in [0, 2, 4, 6] {
        let (mut c, d) = FrameClient::start(&agent.socket());
        let mut text = String::new();
        for i in 0..3 {
            // Over half the limit each: one chunk a line.
            let l = event_line(i as f64, &format!("s{code} line {i} {}", "y".repeat(50)));
            c.events(&l);
            text.push_str(&l);
        }
        c.end(code);
        ids.push(d.session.unwrap());
        sent.push(text);
    }
    kill(&mut daemon, nix::sys::signal::Signal::SIGTERM);
    assert!(daemon.wait().unwrap().success());
    let (a, b, c) = (
        sessions.join(&ids[0]),
        sessions.join(&ids[1]),
        sessions.join(&ids[2]),
    );
    // A: chunk 1 gets a torn line after its own, chunk 2 a byte that is not UTF-8.
    let mut chunk1 = std::fs::read(a.join("chunk-1.cast")).unwrap();
    chunk1.extend_from_slice(b"[1.5, \"o\", \"torn\n");
    std::fs::write(a.join("chunk-1.cast"), &chunk1).unwrap();
    let mut chunk2 = std::fs::read(a.join("chunk-2.cast")).unwrap();
    let y = chunk2.iter().position(|&x| x == b'y').unwrap();
    chunk2[y] = 0xff;
    std::fs::write(a.join("chunk-2.cast"), &chunk2).unwrap();
    // B: its end mark cut short, and a line going back in time after chunk 1's own.
    // C: its header (and the start time kept beside it).
    std::fs::write(b.join("end.json"), b"{\"exit_status\": 2, \"interr").unwrap();
    let mut chunk1 = std::fs::read(b.join("chunk-1.cast")).unwrap();
    chunk1.extend_from_slice(b"[0.5, \"o\", \"backwards\"]\n");
    std::fs::write(b.join("chunk-1.cast"), &chunk1).unwrap();
    std::fs::write(c.join("header.json"), b"{\"version\": 2, \"wid").unwrap();
    std::fs::remove_file(c.join("started_at")).unwrap();
    // D: its header gone, its metadata JSON but not an object.
    let d = sessions.join(&ids[3]);
    std::fs::remove_file(d.join("header.json")).unwrap();
    std::fs::write(d.join("metadata.json"), b"[]").unwrap();

    let mut daemon = agent.daemon();
    backend.start().await;
    let recs = backend.wait_completed(4, Duration::from_secs(30)).await;
    let by_id = |id: &str| {
        recs.iter()
            .find(|r| r["metadata"]["agent_session"] == id)
            .unwrap_or_else(|| panic!("{id} not on the backend: {recs:#?}"))
    };
    let ra = by_id(&ids[0]);
    let mut lines: Vec<String> = sent[0].lines().map(|l| format!("{l}\n")).collect();
    lines[2] = lines[2].replacen('y', "\u{fffd}", 1);
    assert_eq!(backend.events_text(ra), lines.concat(), "{ra:#}");
    assert_eq!(ra["metadata"]["damaged_lines"], 2, "{ra:#}");
    assert_eq!(chunk_indexes(ra), vec![0, 1, 2]);
    assert_eq!(ra["metadata"]["exit_status"], 0);
    let rb = by_id(&ids[1]);
    assert_eq!(rb["metadata"]["interrupted"], true, "{rb:#}");
    assert_eq!(backend.events_text(rb), sent[1]);
    assert_eq!(rb["metadata"]["damaged_lines"], 1, "{rb:#}");
    assert_eq!(chunk_indexes(rb), vec![0, 1, 2]);
    let rc = by_id(&ids[2]);
    assert_eq!(
        rc["metadata"]["damaged_files"],
        json!(["header.json"]),
        "{rc:#}"
    );
    assert_eq!(rc["metadata"]["exit_status"], 4);
    assert_eq!(backend.events_text(rc), sent[2]);
    // Without its header, its start is when it ended less how long it ran (2 s).
    let at = |k: &str| {
        time::OffsetDateTime::parse(
            rc[k].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert_eq!(
        at("ended_at") - at("started_at"),
        time::Duration::seconds(2),
        "{rc:#}"
    );
    let rd = recs
        .iter()
        .find(|r| r["metadata"]["damaged_files"] == json!(["header.json", "metadata.json"]))
        .unwrap_or_else(|| panic!("{recs:#?}"));
    assert_eq!(rd["metadata"]["exit_status"], 6);
    assert_eq!(backend.events_text(rd), sent[3]);
    stop_all(&mut daemon, &mut backend).await;
}

/// A local user cannot grow the daemon (root, shared by everyone) by announcing big frames and
/// never finishing them: what one user's connections are receiving at once is bounded (8 MiB),
/// and the daemon goes on serving meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_frames_do_not_grow_the_daemon() {
    let mut backend = Backend::new_down(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    let pid = daemon.id();
    let rss_kib = move || {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap()
    };
    let before = rss_kib();
    let body = vec![b'x'; ipc::MAX_FRAME_BYTES - 1];
    let mut conns = Vec::new();
    for _ in 0..48 {
        let mut s = UnixStream::connect(agent.socket()).unwrap();
        s.write_all(&ipc::head(Kind::Start, ipc::MAX_FRAME_BYTES).unwrap())
            .unwrap();
        s.set_nonblocking(true).unwrap();
        conns.push((s, 0usize));
    }
    tokio::task::block_in_place(|| {
        // Everything but each frame's last byte, as fast as the daemon takes it.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            for (s, sent) in conns.iter_mut() {
                while *sent < body.len() {
                    match s.write(&body[*sent..]) {
                        Ok(n) => *sent += n,
                        Err(_) => break,
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 20, "the daemon grew by {grown_mib} MiB");
    let t0 = Instant::now();
    assert!(agent.status().sessions_live.is_empty());
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    drop(conns);
    stop_all(&mut daemon, &mut backend).await;
}

/// SIGTERM while the backend is down: the daemon does not wait out `drain_secs` for uploads
/// that cannot get through; what it spooled stays for the next start. (SIGHUP before it
/// changes nothing: by default it would have ended the daemon at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_backend_down_does_not_wait_for_the_drain() {
    let backend = Backend::new_down(true).await;
    let agent = Agent::new(&backend, "drain_secs = 60\n");
    let mut daemon = agent.daemon();
    let (mut c, d) = FrameClient::start(&agent.socket());
    assert_eq!(d.mode, Mode::Record);
    kill(&mut daemon, nix::sys::signal::Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(200));
    assert!(daemon.0.try_wait().unwrap().is_none(), "{}", agent.log());
    c.events(&event_line(0.5, "kept"));
    c.end(0);
    let socket = agent.socket();
    tokio::task::spawn_blocking(move || {
        wait_until("an upload error", Duration::from_secs(20), || {
            ztna_recorder::status::query(&socket)
                .map(|s| s.last_upload_error.is_some())
                .unwrap_or(false)
        })
    })
    .await
    .unwrap();
    kill(&mut daemon, nix::sys::signal::Signal::SIGTERM);
    let t0 = Instant::now();
    assert!(daemon.wait().unwrap().success(), "{}", agent.log());
    // Far below the 60 s drain it would otherwise wait out.
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    let sessions = std::fs::read_dir(agent.spool().join("sessions"))
        .unwrap()
        .count();
    assert_eq!(sessions, 1, "the session stays spooled");
}

/// A session that gave up waiting for a stopped daemon (and ran unrecorded, or was refused)
/// is not recorded once the daemon gets to it: it used to become an empty recording marked
/// `interrupted`, for a session that ended normally or never ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_gave_up_waiting_is_not_recorded() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    kill(&mut daemon, nix::sys::signal::Signal::SIGSTOP);
    drop(FrameClient::send_start(&agent.socket()));
    // `status` says what is wrong with a daemon that does not answer.
    let out = tokio::task::block_in_place(|| {
        Command::new(BIN)
            .args(["status", "--config"])
            .arg(agent.config())
            .output()
            .unwrap()
    });
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("did not answer within 10 s"), "{err}");
    kill(&mut daemon, nix::sys::signal::Signal::SIGCONT);
    // Then one that is recorded: the daemon has taken the first by then.
    let (mut c, d) = FrameClient::start(&agent.socket());
    assert_eq!(d.mode, Mode::Record);
    c.events(&event_line(0.1, "recorded"));
    c.end(0);
    let recs = backend.wait_completed(1, Duration::from_secs(20)).await;
    // Time for the uploader to have completed an orphan (rescans every second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = backend.recordings().await;
    assert_eq!(all.len(), 1, "{all:#?}\n{}", agent.log());
    assert_eq!(all[0]["id"], recs[0]["id"]);
    // Stopped for the 10 s `status` waits, the daemon finds on waking both the first
    // client's frame and its own 10 s deadline for it: either way that client is let go.
    let log = agent.log();
    assert!(
        log.contains("gave up waiting") || log.contains("no first frame within 10 s"),
        "{log}"
    );
    stop_all(&mut daemon, &mut backend).await;
}

/// A daemon that takes no output for over 10 s (stopped, stuck on its disk) but does not go
/// away: the session goes on, its output waits for the daemon (up to 1 MiB, then a marker), and
/// once the daemon takes output again the rest is recorded, in the same recording. It was taken
/// for lost: the rest of the session went unrecorded, and the recording ended `interrupted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_takes_no_output_for_a_while_loses_the_rest_of_no_session() {
    daemon_that_takes_no_output_for_a_while(true).await;
}

/// As above, without a PTY (`ssh host cmd`), where the same stall also cost the rest of the
/// recording.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_that_takes_no_output_for_a_while_loses_no_piped_session() {
    daemon_that_takes_no_output_for_a_while(false).await;
}

async fn daemon_that_takes_no_output_for_a_while(pty: bool) {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    let (go, done) = (agent.dir.path().join("go"), agent.dir.path().join("done"));
    let script = format!(
        "echo ready; while [ ! -e {go} ]; do sleep 0.05; done; \
         head -c 3000000 /dev/zero | tr '\\0' x | fold -w 100; echo stalled-output-end; \
         while [ ! -e {done} ]; do sleep 0.05; done; echo final; exit 3",
        go = go.display(),
        done = done.display()
    );
    let (mut child, seen, _, reader) =
        shell_on_a_terminal(agent.shell_command(Some(&script), None), pty);
    tokio::task::block_in_place(|| {
        wait_until(
            "the session to start",
            Duration::from_secs(60),
            shows(&seen, "ready"),
        );
        kill(&mut daemon, nix::sys::signal::Signal::SIGSTOP);
        std::fs::write(&go, "").unwrap();
        // Past the 10 s the daemon has to take output, the session goes on.
        wait_until(
            "the output to get through",
            Duration::from_secs(60),
            shows(&seen, "stalled-output-end"),
        );
        kill(&mut daemon, nix::sys::signal::Signal::SIGCONT);
    });
    // Once the daemon has what waited (the marker ends it), output is sent as before.
    const MARKER: &str = "until the recording daemon took output again";
    let t0 = Instant::now();
    loop {
        let spooled = walk_files(&agent.spool().join("sessions")).iter().any(|f| {
            String::from_utf8_lossy(&std::fs::read(f).unwrap_or_default()).contains(MARKER)
        });
        let recs = backend.recordings().await;
        if spooled || recs.iter().any(|r| backend.events_text(r).contains(MARKER)) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", agent.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(&done, "").unwrap();
    let status = tokio::task::block_in_place(|| child.wait().unwrap());
    reader.join().unwrap();
    assert_eq!(status.code(), Some(3), "{}", agent.log());
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    assert_eq!(backend.recordings().await.len(), 1);
    let m = &recs[0]["metadata"];
    assert_ne!(m["interrupted"], true, "{m}\n{}", agent.log());
    assert_eq!(m["exit_status"], 3, "{m}");
    let text = backend.events_text(&recs[0]);
    let out = output_of(&text);
    let eol = if pty { "\r\n" } else { "\n" };
    assert!(
        out.starts_with(&format!("ready{eol}")),
        "{}",
        &out[..out.len().min(200)]
    );
    assert!(
        out.ends_with(&format!("final{eol}")),
        "{}",
        &out[out.len().saturating_sub(200)..]
    );
    // Up to the marker, the output as it was shown: an unbroken stretch of it.
    let cut = text
        .find(MARKER)
        .expect("the marker where output stopped being kept");
    let kept = output_of(&text[..text[..cut].rfind('\n').unwrap() + 1]);
    // (Line ends as either terminal made them.)
    let shown = String::from_utf8_lossy(&seen.lock().unwrap()).replace('\r', "");
    assert!(
        shown.starts_with(&kept.replace('\r', "")),
        "{} bytes kept",
        kept.len()
    );
    assert!(kept.len() > 500_000, "{} bytes kept", kept.len());
    stop_all(&mut daemon, &mut backend).await;
}

/// What a terminal (or a pipe) showed so far.
type Shown = Arc<Mutex<Vec<u8>>>;

/// Starts `shell` on a PTY of its own (`pty`) or on pipes, with stdin closed: returns the child,
/// what its terminal (or stdout) and its stderr (none with a PTY) showed so far, and the thread
/// that reads them all along (a full terminal would stop the program).
fn shell_on_a_terminal(
    mut c: Command,
    pty: bool,
) -> (Child, Shown, Shown, std::thread::JoinHandle<()>) {
    let (seen, errors) = (Shown::default(), Shown::default());
    let (child, outputs): (_, Vec<(Box<dyn Read + Send>, &Shown)>) = if pty {
        let pty = nix::pty::openpty(None, None).unwrap();
        c.stdin(pty.slave.try_clone().unwrap())
            .stdout(pty.slave.try_clone().unwrap())
            .stderr(pty.slave.try_clone().unwrap());
        let child = c.spawn().unwrap();
        drop(c); // it holds copies of the slave side
        drop(pty.slave);
        (
            child,
            vec![(Box::new(std::fs::File::from(pty.master)), &seen)],
        )
    } else {
        c.stdin(Stdio::null());
        let mut child = c.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        (
            child,
            vec![(Box::new(out), &seen), (Box::new(err), &errors)],
        )
    };
    let readers: Vec<_> = outputs
        .into_iter()
        .map(|(mut output, seen)| {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = output.read(&mut buf) {
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        })
        .collect();
    let reader = std::thread::spawn(move || readers.into_iter().for_each(|r| r.join().unwrap()));
    (child, seen, errors, reader)
}

/// Whether a terminal (or pipe) has shown `what` so far, for [`wait_until`].
fn shows(seen: &Shown, what: &'static str) -> impl FnMut() -> bool {
    let seen = seen.clone();
    move || {
        let seen = seen.lock().unwrap();
        seen.windows(what.len()).any(|w| w == what.as_bytes())
    }
}

/// Under enforce, a daemon that takes no output for 10 s but does not go away ends the
/// session with a message and status 1, as one that is gone does; what it took before is
/// completed as `interrupted`. Without a PTY the session used to wait for it for good (and
/// `shell` then ignored SIGTERM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_enforce_a_daemon_that_takes_no_output_ends_a_piped_session() {
    enforced_daemon_that_takes_no_output(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_enforce_a_daemon_that_takes_no_output_ends_a_pty_session() {
    enforced_daemon_that_takes_no_output(true).await;
}

/// Under enforce, a piped session ended because its daemon went away takes its whole process
/// group with it: a background job that ignores SIGTERM, SIGHUP and SIGPIPE used to go on,
/// unrecorded, after the session was ended for want of a recording.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_enforce_an_ended_piped_session_leaves_no_background_job() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "enforce = true\n");
    let mut daemon = agent.daemon();
    let pidfile = agent.dir.path().join("job.pid");
    let cmd = format!(
        "sh -c 'trap \"\" TERM HUP PIPE; echo $$ > {}; while :; do sleep 0.1; done' & echo ready; wait",
        pidfile.display()
    );
    let (mut child, tail) = piped(&agent, &cmd);
    let (status, job) = tokio::task::block_in_place(|| {
        tail.wait_for("ready\n");
        let mut job = 0i32;
        wait_until("the job's pid", Duration::from_secs(10), || {
            job = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            job > 0
        });
        kill(&mut daemon, nix::sys::signal::Signal::SIGKILL);
        daemon.wait().unwrap();
        (child.wait().unwrap(), job)
    });
    assert_eq!(status.code(), Some(1));
    let gone = || {
        !Path::new(&format!("/proc/{job}")).exists()
            || std::fs::read_to_string(format!("/proc/{job}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z'))
            })
    };
    tokio::task::block_in_place(|| {
        wait_until(
            "the background job to be gone",
            Duration::from_secs(5),
            gone,
        )
    });
    daemon = agent.daemon();
    stop_all(&mut daemon, &mut backend).await;
}

async fn enforced_daemon_that_takes_no_output(pty: bool) {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "enforce = true\n");
    let mut daemon = agent.daemon();
    let go = agent.dir.path().join("go");
    let script = format!(
        // NULs: six bytes each as JSON, so a frame is larger than the socket's buffer and the
        // stall comes part-way through one.
        "echo ready; while [ ! -e {go} ]; do sleep 0.05; done; exec cat /dev/zero",
        go = go.display()
    );
    let (mut child, seen, errors, reader) =
        shell_on_a_terminal(agent.shell_command(Some(&script), None), pty);
    let status = tokio::task::block_in_place(|| {
        wait_until(
            "the session to start",
            Duration::from_secs(60),
            shows(&seen, "ready"),
        );
        kill(&mut daemon, nix::sys::signal::Signal::SIGSTOP);
        std::fs::write(&go, "").unwrap();
        let t0 = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                // Ten seconds without output taken, not two such waits (a write that took
                // part of a frame before the stall used to start a second one).
                assert!(t0.elapsed() < Duration::from_secs(18), "{:?}", t0.elapsed());
                break status;
            }
            if t0.elapsed() > Duration::from_secs(40) {
                let _ = child.kill();
                kill(&mut daemon, nix::sys::signal::Signal::SIGCONT);
                panic!("the session did not end");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    kill(&mut daemon, nix::sys::signal::Signal::SIGCONT);
    reader.join().unwrap();
    assert_eq!(status.code(), Some(1));
    let shown = [&seen, &errors]
        .map(|s| String::from_utf8_lossy(&s.lock().unwrap()).into_owned())
        .concat();
    assert!(
        shown.contains("took no output for 10 s") && shown.contains("session ended"),
        "{}",
        &shown[shown.len().saturating_sub(300)..]
    );
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    let m = &recs[0]["metadata"];
    assert_eq!(m["interrupted"], true, "{m}\n{}", agent.log());
    let out = output_of(&backend.events_text(&recs[0]));
    assert!(out.starts_with("ready"), "{}", &out[..out.len().min(200)]);
    stop_all(&mut daemon, &mut backend).await;
}

/// Starts a recorded session on the daemon and streams 16 KiB output lines into it, one every
/// `every`, for `length` (on a blocking thread: the frames are written synchronously); then
/// ends it, which asserts the daemon's acknowledgement (a session cut short gets none).
/// `tick` is called after each line with the time since the first. Returns what was sent.
async fn stream_bulk(
    agent: &Agent,
    every: Duration,
    length: Duration,
    mut tick: impl FnMut(Duration) + Send + 'static,
) -> String {
    let (mut c, d) = FrameClient::start(&agent.socket());
    assert_eq!(d.mode, Mode::Record, "{d:?}");
    tokio::task::spawn_blocking(move || {
        let mut sent = String::new();
        let t0 = Instant::now();
        let mut i = 0;
        while t0.elapsed() < length {
            let l = event_line(
                i as f64 * every.as_secs_f64(),
                &format!("{i:06} {}\r\n", "b".repeat(16 << 10)),
            );
            c.events(&l);
            sent.push_str(&l);
            i += 1;
            tick(t0.elapsed());
            std::thread::sleep(every);
        }
        c.end(0);
        sent
    })
    .await
    .unwrap()
}

/// While a live session streams bulk output, the chunks it closes wait on disk instead of being
/// uploaded alongside (`upload_defer_secs`); once it ends, every one of them arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_wait_while_a_session_streams_bulk_output() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(
        &backend,
        "chunk_max_bytes = 65536\nupload_defer_secs = 600\n",
    );
    let mut daemon = agent.daemon();
    let socket = agent.socket();
    let mid = Arc::new(Mutex::new(None));
    let seen = mid.clone();
    // About 4 MiB/s for 1.5 s: four times the bulk threshold, 64 KiB chunks.
    let sent = stream_bulk(
        &agent,
        Duration::from_millis(4),
        Duration::from_millis(1500),
        move |t| {
            let mut seen = seen.lock().unwrap();
            if seen.is_none() && t > Duration::from_secs(1) {
                *seen = Some(ztna_recorder::status::query(&socket).unwrap());
            }
        },
    )
    .await;
    let mid = mid.lock().unwrap().take().unwrap();
    // A chunk or two may go before the rate is known; the rest waits.
    assert!(mid.chunks_waiting >= 20, "{mid:?}");
    assert!(mid.chunks_uploaded <= 6, "uploads did not wait: {mid:?}");
    assert!(mid.uploads_deferred, "{mid:?}");
    let recs = backend.wait_completed(1, Duration::from_secs(60)).await;
    let rec = &recs[0];
    let n = chunk_indexes(rec).len() as u64;
    assert_eq!(chunk_indexes(rec), (0..n).collect::<Vec<u64>>());
    assert_eq!(backend.events_text(rec), sent);
    stop_all(&mut daemon, &mut backend).await;
}

/// Uploads wait for bulk output only while the spool is less than half full: a burst longer
/// than the spool holds is still recorded whole, as the uploads run alongside it past half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_uploads_never_fill_the_spool() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(
        &backend,
        "chunk_max_bytes = 65536\nspool_max_bytes = 4194304\nupload_defer_secs = 600\n",
    );
    let mut daemon = agent.daemon();
    // About 1 MiB/s for 6 s: half again as much as the spool holds, so uploads must drain
    // 0.5 MiB/s past half (at 2 MiB/s for 3 s, twice that was too close under a loaded CI
    // run). Acknowledged at the end: the daemon did not cut the session short (spool full).
    let sent = stream_bulk(
        &agent,
        Duration::from_millis(16),
        Duration::from_secs(6),
        |_| {},
    )
    .await;
    assert!(sent.len() > 9 << 19, "sent only {} bytes", sent.len());
    let recs = backend.wait_completed(1, Duration::from_secs(60)).await;
    let rec = &recs[0];
    assert_eq!(rec["metadata"]["truncated"], Value::Null, "{rec:#}");
    assert_eq!(backend.events_text(rec), sent);
    stop_all(&mut daemon, &mut backend).await;
}

/// The daemon is killed with SIGKILL mid-session and restarted: everything it spooled
/// reaches the backend, the session is completed with `interrupted: true`, and a torn last
/// line left by the crash is dropped while every whole line is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_killed_mid_session_is_recovered_as_interrupted() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "chunk_max_bytes = 200\n");
    let mut daemon = agent.daemon();
    let (mut c, d) = FrameClient::start(&agent.socket());
    assert_eq!(d.mode, Mode::Record);
    let mut sent = String::new();
    for i in 0..9 {
        let l = event_line(1.0 + i as f64, &format!("out {i} {}\n", "y".repeat(40)));
        c.events(&l);
        sent.push_str(&l);
    }
    // Wait until the daemon has written the last frame, then kill it.
    // Spooled, or already uploaded (then deleted from the spool).
    let dirs = [agent.spool(), backend.dir.path().join("objects")];
    let expected = sent.len() as u64;
    tokio::task::spawn_blocking(move || {
        wait_until(
            "the daemon to spool every line",
            Duration::from_secs(20),
            || dirs.iter().map(|d| chunk_bytes(d)).sum::<u64>() >= expected,
        )
    })
    .await
    .unwrap();
    kill(&mut daemon, nix::sys::signal::Signal::SIGKILL);
    daemon.wait().unwrap();
    drop(c);
    // A crash mid-write leaves a torn line in the open chunk.
    let sessions: Vec<PathBuf> = std::fs::read_dir(agent.spool().join("sessions"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(sessions.len(), 1);
    let part = std::fs::read_dir(&sessions[0])
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().ends_with(".cast.part"));
    let torn = "[12.5, \"o\", \"torn";
    match part {
        Some(p) => {
            let mut f = std::fs::OpenOptions::new().append(true).open(p).unwrap();
            f.write_all(torn.as_bytes()).unwrap();
        }
        None => {
            std::fs::write(sessions[0].join("chunk-99.cast.part"), torn).unwrap();
        }
    }

    // Restarted a while later: the recording ends when the spool last heard of it, not then.
    let restarted = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut daemon = agent.daemon();
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    let rec = &recs[0];
    assert_eq!(rec["metadata"]["interrupted"], true, "{rec:#}");
    // Its exit status is not known: named, as null.
    assert_eq!(
        rec["metadata"].get("exit_status"),
        Some(&Value::Null),
        "{rec:#}"
    );
    let got = backend.events_text(rec);
    assert_eq!(got, sent, "every whole line, in order, no torn line");
    assert_eq!(rec["duration_seconds"], 9); // last event at 9.0 s
    let ended = time::OffsetDateTime::parse(
        rec["ended_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(ended <= restarted, "{rec:#}");
    stop_all(&mut daemon, &mut backend).await;
}

/// The last chunk cannot be put in place when the session ends (its rename is refused): the
/// daemon keeps it as a part file, seals and uploads it once that works again, without a
/// restart, and the chunks still reach the backend whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_whose_close_failed_is_sealed_without_a_restart() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "chunk_max_bytes = 130\n");
    let mut daemon = agent.daemon();
    let (mut c, d) = FrameClient::start(&agent.socket());
    assert_eq!(d.mode, Mode::Record);
    let dir = agent.spool().join("sessions").join(d.session.unwrap());
    // A folder holds chunk 1's name, so renaming its part file into place fails.
    let blocker = dir.join("chunk-1.cast");
    std::fs::create_dir(&blocker).unwrap();
    let lines: Vec<String> = (0..3)
        .map(|i| event_line(0.5 + i as f64, &format!("line {i} {}\r\n", "z".repeat(30))))
        .collect();
    assert!(lines.iter().all(|l| l.len() == 61));
    for l in &lines {
        c.events(l); // two lines fill chunk 0; the third does not fit and opens chunk 1
    }
    c.end(0);
    let socket = agent.socket();
    let part = dir.join("chunk-1.cast.part");
    tokio::task::spawn_blocking(move || {
        // Ended, and the uploader has met the blocked chunk.
        wait_until("an upload error", Duration::from_secs(20), || {
            ztna_recorder::status::query(&socket)
                .map(|s| s.sessions_live.is_empty() && s.last_upload_error.is_some())
                .unwrap_or(false)
        })
    })
    .await
    .unwrap();
    assert!(part.exists(), "{}", agent.log());
    assert!(
        agent.log().contains("closing the last chunk"),
        "{}",
        agent.log()
    );
    assert_ne!(backend.recordings().await[0]["status"], "completed");

    std::fs::remove_dir(&blocker).unwrap();
    let recs = backend.wait_completed(1, Duration::from_secs(20)).await;
    let rec = &recs[0];
    assert_eq!(chunk_indexes(rec), vec![0, 1]);
    assert_eq!(backend.events_text(rec), lines.concat());
    assert_eq!(rec["metadata"]["exit_status"], 0);
    assert_ne!(rec["metadata"]["interrupted"], true, "{rec:#}");
    wait_until("an empty spool", Duration::from_secs(10), || !dir.exists());
    stop_all(&mut daemon, &mut backend).await;
}

/// Every file under `dir`, at any depth.
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() {
                walk_files(&p)
            } else {
                vec![p]
            }
        })
        .collect()
}

/// Bytes of the `chunk-*` files under `dir` (spooled, open, or stored by the backend).
fn chunk_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                chunk_bytes(&p)
            } else if e.file_name().to_string_lossy().starts_with("chunk-") {
                e.metadata().map(|m| m.len()).unwrap_or(0)
            } else {
                0
            }
        })
        .sum()
}

/// `capture_input` records what a piped session's program reads, as `i` events (an `ssh -T`
/// login types its commands into a shell that echoes nothing): it used to hold output only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_input_records_a_piped_sessions_input() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "capture_input = true\n");
    let mut daemon = agent.daemon();
    let out = {
        let agent = &agent;
        tokio::task::block_in_place(|| {
            agent.shell(
                None,
                b"echo visible\nrm -f /nonexistent/evidence\nexit 3\n",
                None,
            )
        })
    };
    assert_eq!(
        out.stdout,
        b"visible\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(3));
    let recs = backend.wait_completed(1, Duration::from_secs(20)).await;
    let events = backend.events_text(&recs[0]);
    let input: String = events
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e[1] == "i")
        .map(|e| e[2].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        input, "echo visible\nrm -f /nonexistent/evidence\nexit 3\n",
        "{events}"
    );
    assert_eq!(output_of(&events), "visible\n");
    stop_all(&mut daemon, &mut backend).await;
}

/// SIGTERM to a piped session's recorder (a shutdown; here the program's own `kill $PPID`)
/// goes to the program, as on the PTY path: the session ends with how the program did, and
/// the recording has everything and that status. It used to end the recorder at once: no
/// output, `interrupted`, and the program left running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_a_piped_session_ends_the_program_and_the_recording_says_so() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    let cmd = "echo before; kill -TERM $PPID; while :; do :; done";
    let out = {
        let agent = &agent;
        tokio::task::block_in_place(|| agent.shell(Some(cmd), b"", None))
    };
    assert_eq!(
        out.stdout,
        b"before\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(143));
    let recs = backend.wait_completed(1, Duration::from_secs(20)).await;
    let m = &recs[0]["metadata"];
    assert_eq!(m["exit_status"], 143, "{m}");
    assert_eq!(m["exit_signal"], 15, "{m}");
    assert_ne!(m["interrupted"], true, "{m}");
    assert_eq!(output_of(&backend.events_text(&recs[0])), "before\n");
    stop_all(&mut daemon, &mut backend).await;
}

/// `ssh host 'printf …'` without a PTY, through the real `shell` binary: stdout byte-exact,
/// stderr and exit status passed on, the output recorded with the contract's metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_without_pty_is_byte_exact_and_recorded() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    let cmd = r"printf 'a\000b\377c\r\n\303\251t\303\251\n'; echo err >&2; cat; exit 7";
    let out = {
        let agent = &agent;
        tokio::task::block_in_place(|| agent.shell(Some(cmd), b"from-stdin", None))
    };
    let mut expected = b"a\x00b\xffc\r\n\xc3\xa9t\xc3\xa9\n".to_vec();
    expected.extend_from_slice(b"from-stdin");
    assert_eq!(
        out.stdout,
        expected,
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.status.code(), Some(7));
    let recs = backend.wait_completed(1, Duration::from_secs(20)).await;
    let rec = &recs[0];
    let m = &rec["metadata"];
    assert_eq!(m["kind"], "exec");
    assert_eq!(m["command"], cmd);
    assert_eq!(m["exit_status"], 7);
    assert_eq!(m["remote_addr"], "192.0.2.7");
    assert_eq!(m["remote_port"], 50123);
    assert_eq!(m["uid"], nix::unistd::getuid().as_raw());
    assert!(m["hostname"].is_string());
    assert!(m.get("tty").is_none() || m["tty"].is_null());
    let text = output_of(&backend.events_text(rec));
    // stdout and stderr are separate pipes: "err\n" may land anywhere between stdout reads.
    assert!(text.contains("err\n"), "{text:?}");
    let stdout_part = text.replacen("err\n", "", 1);
    assert_eq!(stdout_part, "a\u{0}b\u{fffd}c\r\nété\nfrom-stdin");

    // Bytes that are not UTF-8 in the command (a Latin-1 file name) and in a variable the
    // client sent (Debian's sshd has `AcceptEnv LANG LC_*`): run as sent, recorded with
    // U+FFFD. Reading the environment used to panic on them.
    use std::os::unix::ffi::OsStrExt as _;
    let out = tokio::task::block_in_place(|| {
        Command::new(BIN)
            .args(["shell", "--config"])
            .arg(agent.config())
            .env(
                "SSH_ORIGINAL_COMMAND",
                std::ffi::OsStr::from_bytes(b"printf '%s' 'caf\xe9'"),
            )
            .env("LC_FOO", std::ffi::OsStr::from_bytes(b"\xe9t\xe9"))
            .env_remove("ZTNA_RECORDER_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    });
    assert_eq!(
        out.stdout,
        b"caf\xe9",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
    let recs = backend.wait_completed(2, Duration::from_secs(20)).await;
    let rec = recs
        .iter()
        .find(|r| r["metadata"]["command"] == "printf '%s' 'caf\u{fffd}'")
        .expect("the Latin-1 command's recording");
    assert_eq!(output_of(&backend.events_text(rec)), "caf\u{fffd}");

    // A command longer than the backend keeps in a recording's metadata and header (a whole
    // script as `ssh host '…'`): run whole, recorded, its text cut to fit.
    // Control characters take six bytes each as JSON: these 100,000 took the Start frame past
    // its 1 MiB limit, and the session went unrecorded.
    let long = format!(": '{}'; echo long-done", "\u{1b}".repeat(100_000));
    let out = tokio::task::block_in_place(|| agent.shell(Some(&long), b"", None));
    assert_eq!(
        out.stdout,
        b"long-done\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = backend.wait_completed(3, Duration::from_secs(20)).await;
    let rec = recs
        .iter()
        .find(|r| {
            r["metadata"]["command"]
                .as_str()
                .is_some_and(|c| c.starts_with(": '\u{1b}\u{1b}"))
        })
        .expect("the long command's recording");
    for kept in [
        &rec["metadata"]["command"],
        &rec["metadata"]["header"]["command"],
    ] {
        let kept = kept.as_str().unwrap_or_else(|| panic!("{rec:#}"));
        assert!(kept.ends_with('…') && kept.len() < 20_000, "{}", kept.len());
    }
    assert_eq!(output_of(&backend.events_text(rec)), "long-done\n");
    stop_all(&mut daemon, &mut backend).await;
}

/// Recording switched off for the org: the session runs, nothing is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_disabled_runs_unrecorded() {
    let mut backend = Backend::new(false).await;
    // The daemon's periodic refresh of the org's settings never comes in this test.
    let agent = Agent::new(&backend, "enforce = true\nconfig_refresh_secs = 3600\n");
    let mut daemon = agent.daemon();
    let sock = agent.socket();
    tokio::task::spawn_blocking(move || {
        wait_until(
            "the daemon to learn the org's settings",
            Duration::from_secs(10),
            || {
                ztna_recorder::status::query(&sock)
                    .map(|s| s.recording_enabled == Some(false))
                    .unwrap_or(false)
            },
        )
    })
    .await
    .unwrap();
    let (_c, d) = FrameClient::start(&agent.socket());
    assert_eq!(d.mode, Mode::Unrecorded);
    let out = tokio::task::block_in_place(|| agent.shell(Some("printf unrecorded"), b"", None));
    assert_eq!(out.stdout, b"unrecorded");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(backend.recordings().await.is_empty());
    assert_eq!(
        std::fs::read_dir(agent.spool().join("sessions"))
            .unwrap()
            .count(),
        0
    );

    // Switched back on: the next session is recorded, not only those after the next refresh
    // (a cached "off" is asked again when a session starts).
    backend
        .app
        .update_settings(
            backend.org,
            ztna_recorder_server::SettingsUpdate {
                recording_enabled: Some(true),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let out = tokio::task::block_in_place(|| agent.shell(Some("printf recorded"), b"", None));
    assert_eq!(out.stdout, b"recorded");
    let recs = backend.wait_completed(1, Duration::from_secs(20)).await;
    assert_eq!(output_of(&backend.events_text(&recs[0])), "recorded");
    stop_all(&mut daemon, &mut backend).await;
}

/// Recording switched off after the daemon last asked: a session that begins before it asks
/// again is refused by the backend at `start`. It is kept on the machine (failed/), never sent:
/// retried, it was uploaded once recording was switched back on, a recording of a time it was
/// off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_begun_after_recording_was_switched_off_is_never_sent() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "config_refresh_secs = 3600\n");
    let mut daemon = agent.daemon();
    let sock = agent.socket();
    let enabled = move |want: bool| {
        let sock = sock.clone();
        move || {
            ztna_recorder::status::query(&sock)
                .map(|s| s.recording_enabled == Some(want))
                .unwrap_or(false)
        }
    };
    let learnt = enabled(true);
    tokio::task::block_in_place(|| {
        wait_until(
            "the daemon to learn the org's settings",
            Duration::from_secs(20),
            learnt,
        )
    });
    let switch = |on: bool| {
        backend.app.update_settings(
            backend.org,
            ztna_recorder_server::SettingsUpdate {
                recording_enabled: Some(on),
                ..Default::default()
            },
        )
    };
    switch(false).await.unwrap();
    let out = tokio::task::block_in_place(|| agent.shell(Some("printf while-off"), b"", None));
    assert_eq!(out.stdout, b"while-off");
    assert_eq!(out.status.code(), Some(0));
    let failed = agent.spool().join("failed");
    let sessions = agent.spool().join("sessions");
    let count = |d: &Path| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    tokio::task::block_in_place(|| {
        wait_until(
            "the session to be set aside",
            Duration::from_secs(20),
            || count(&failed) == 1 && count(&sessions) == 0,
        )
    });
    let entry = std::fs::read_dir(&failed).unwrap().next().unwrap().unwrap();
    let reason = std::fs::read_to_string(entry.path().join("failed-reason.txt")).unwrap();
    assert!(reason.contains("RECORDING_DISABLED"), "{reason}");
    // The daemon now knows: it said so in its status.
    let off = enabled(false);
    assert!(off());

    // Switched back on: the next session is recorded; the one of the time it was off is not.
    switch(true).await.unwrap();
    // A cached "off" is asked again by a session's start once it is a second old.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let out = tokio::task::block_in_place(|| agent.shell(Some("printf back-on"), b"", None));
    assert_eq!(out.stdout, b"back-on");
    let recs = backend.wait_completed(1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = backend.recordings().await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(output_of(&backend.events_text(&recs[0])), "back-on");
    assert_eq!(count(&failed), 1);
    stop_all(&mut daemon, &mut backend).await;
}

/// No daemon: `enforce = true` refuses the session with one line and status 1;
/// `enforce = false` runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_daemon_follows_the_enforce_policy() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let strict = agent.strict_config();
    let out = tokio::task::block_in_place(|| {
        agent.shell(Some("echo should-not-run"), b"", Some(&strict))
    });
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    // One line, ended as a line (no stray carriage return without a terminal).
    assert!(err.ends_with(".\n") && err.lines().count() == 1, "{err:?}");
    assert!(err.contains("refused"), "{err}");

    let lax = agent.dir.path().join("lax.toml");
    std::fs::write(
        &lax,
        format!(
            "socket = \"{}\"\nenforce = false\n",
            agent.socket().display()
        ),
    )
    .unwrap();
    // The user sets `shell`'s environment (~/.pam_environment, SendEnv): it decides nothing.
    let out = tokio::task::block_in_place(|| {
        let mut c = agent.shell_command(Some("echo should-not-run"), Some(&strict));
        c.env("ZTNA_RECORDER_ENFORCE", "false")
            .env("ZTNA_RECORDER_SOCKET", "/nonexistent/recorder.sock")
            .env("ZTNA_RECORDER_CONFIG", &lax)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    });
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty());
    // The same as the user sshd runs it as: the environment may make recording stricter,
    // never looser.
    sshd::ensure_user();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in [&strict, &lax] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    // `shell --config CONFIG` running COMMAND, as the test user, with one variable set.
    let as_user = |config: &Path, command: &str, var: &str, val: &str| {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid",
            sshd::USER,
            "--regid",
            sshd::USER,
            "--clear-groups",
            "--",
            BIN,
        ])
        .args(["shell", "--config"])
        .arg(config)
        .env("SSH_ORIGINAL_COMMAND", command)
        .env(var, val)
        .stdin(Stdio::null());
        tokio::task::block_in_place(|| c.output().unwrap())
    };
    let enforce = "ZTNA_RECORDER_ENFORCE";
    let out = as_user(&strict, "echo ran", enforce, "false");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = as_user(&lax, "echo ran", enforce, "true");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = as_user(&lax, "echo ran", enforce, "false");
    assert_eq!(
        (out.status.code(), &out.stdout[..]),
        (Some(0), &b"ran\n"[..]),
        "{out:?}"
    );
    let out = tokio::task::block_in_place(|| agent.shell(Some("echo runs"), b"", Some(&lax)));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, b"runs\n");
    // Nor may the environment name another socket or file, even root's: without enforce that
    // ran the session unrecorded (a root-owned file in a root-owned folder passed as "only
    // root could have set it").
    let mut daemon = agent.daemon();
    for (var, val) in [
        ("ZTNA_RECORDER_SOCKET", "/etc/passwd"),
        ("ZTNA_RECORDER_CONFIG", "/dev/null"),
    ] {
        let out = as_user(&lax, &format!("echo recorded-{var}"), var, val);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
    }
    let recs = backend.wait_completed(2, Duration::from_secs(20)).await;
    for var in ["ZTNA_RECORDER_SOCKET", "ZTNA_RECORDER_CONFIG"] {
        assert!(
            recs.iter()
                .any(|r| r["metadata"]["command"] == format!("echo recorded-{var}")),
            "{var}: {recs:#?}"
        );
    }
    kill(&mut daemon, nix::sys::signal::Signal::SIGTERM);
    let _ = daemon.wait();
    // The warning is for syslog: the user's streams carry only the program's bytes (this
    // machine may have no /dev/log at all).
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    // A configuration that cannot be read refuses (nobody can say recording is optional),
    // in one line that says so, not that enforce asked for it.
    let broken = agent.dir.path().join("broken.toml");
    std::fs::write(&broken, "enforce = \"perhaps\"\n[[[\n").unwrap();
    let out = tokio::task::block_in_place(|| agent.shell(Some("echo nope"), b"", Some(&broken)));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.ends_with(".\n") && err.lines().count() == 1, "{err:?}");
    assert!(err.contains("configuration cannot be used"), "{err}");
    backend.stop().await;
}

/// The spool at `spool_max_bytes`: the live session stops being recorded (the shell is told),
/// new sessions are refused (the shell then follows its enforce policy), and nothing already
/// spooled is dropped. The limit holds while the session's chunk is still open (it was only
/// checked when a chunk closed full, so chunks closed by time went past it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_full_refuses_new_sessions_and_keeps_what_it_has() {
    let mut backend = Backend::new_down(true).await;
    let agent = Agent::new(
        &backend,
        "chunk_max_bytes = 100000\nchunk_max_secs = 1\nspool_max_bytes = 900\n",
    );
    let mut daemon = agent.daemon();
    let (mut c, d) = FrameClient::start(&agent.socket());
    assert_eq!(d.mode, Mode::Record);
    let (sent, f) = fill_until_stopped(&mut c, 40, 50);
    assert_eq!(f.kind, Kind::Error);
    assert!(f.parse::<ipc::ErrorMsg>().unwrap().message.contains("full"));
    // Sessions are cut short of the limit; what they had sent by then goes in the room kept
    // past the cut point, never past the limit itself.
    let spooled = chunk_bytes(&agent.spool());
    assert!(spooled > 0 && spooled <= 900, "{spooled} bytes spooled");
    // The session goes on unrecorded; its end still reaches the daemon, for the exit status.
    c.end(3);
    let (_c2, d2) = FrameClient::start(&agent.socket());
    assert_eq!(d2.mode, Mode::Refused, "{d2:?}");
    assert!(d2.reason.contains("full"));

    backend.start().await;
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    let rec = &recs[0];
    assert_eq!(rec["metadata"]["truncated"], true, "{rec:#}");
    assert_eq!(rec["metadata"]["exit_status"], 3, "{rec:#}");
    let got = backend.events_text(rec);
    assert!(
        !got.is_empty() && sent.starts_with(&got),
        "what was spooled arrives, in order"
    );
    stop_all(&mut daemon, &mut backend).await;
}

/// Sessions with no output, opened in a loop while the backend is down (as any local user
/// can through the socket), fill the spool too: each counts what its folder takes on disk.
/// Only their few bytes counted, and a 1 MiB spool took some 30 MB of disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_sessions_count_what_their_folders_take() {
    let mut backend = Backend::new_down(true).await;
    let agent = Agent::new(
        &backend,
        "chunk_max_bytes = 65536\nspool_max_bytes = 1048576\n",
    );
    let mut daemon = agent.daemon();
    let socket = agent.socket();
    let admitted = tokio::task::block_in_place(|| {
        for n in 0..300 {
            let (c, d) = FrameClient::start(&socket);
            if d.mode != Mode::Record {
                assert_eq!(d.mode, Mode::Refused, "{d:?}");
                assert!(d.reason.contains("spool is full"), "{d:?}");
                return n;
            }
            c.end(0);
        }
        panic!("300 empty sessions admitted into a 1 MiB spool");
    });
    let footprint = ztna_recorder::daemon::spool::SESSION_FOOTPRINT;
    assert!(
        admitted > 0 && admitted <= 1_048_576 / footprint,
        "{admitted} sessions admitted"
    );
    // `status` shows what filled the spool.
    let st = agent.status();
    assert_eq!(st.sessions_spooled, admitted);
    assert_eq!(st.session_folders_bytes, admitted * footprint);
    stop_all(&mut daemon, &mut backend).await;
}

/// Under enforce, several piped sessions cut by the full spool at the same moment: each one's
/// recording holds all its user saw, since each keeps its own room for what it has in flight
/// (one room shared by all used to run out: all of 8 such sessions showed more than was
/// recorded), and the spool stays under its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_cuts_of_many_sessions_at_once_show_nothing_unrecorded() {
    const MAX: u64 = 8_000_000;
    let backend = Backend::new_down(true).await;
    let agent = Agent::new(
        &backend,
        &format!("enforce = true\nspool_max_bytes = {MAX}\n"),
    );
    let daemon = agent.daemon();
    cut_at_once(backend, &agent, daemon, 8, MAX, |cmd| {
        agent.shell_command(Some(cmd), None).spawn().unwrap()
    })
    .await;
}

/// The same for one user's sessions cut at once by `spool_max_bytes_per_user`, through sshd:
/// each keeps its room in the user's share too (the share's one room used to run out: 6 of 6
/// sessions showed more than was recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_enforce_cuts_of_one_users_sessions_at_once_show_nothing_unrecorded() {
    const SHARE: u64 = 8_000_000;
    let backend = Backend::new_down(true).await;
    let agent = Agent::new(
        &backend,
        &format!(
            "enforce = true\nspool_max_bytes = 64000000\nspool_max_bytes_per_user = {SHARE}\n"
        ),
    );
    let daemon = agent.daemon();
    let s = sshd::Sshd::start(&agent.config());
    cut_at_once(backend, &agent, daemon, 6, SHARE, |cmd| {
        s.ssh()
            .arg(s.target())
            .arg(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    })
    .await;
}

/// Starts `sessions` piped sessions (`spawn`), lets them stream bulk output all at once with
/// the backend down until the spool cuts them, and checks that each ended as enforce says,
/// that no more than `max` bytes were spooled, and that each recording holds all its client
/// was shown.
async fn cut_at_once(
    mut backend: Backend,
    agent: &Agent,
    mut daemon: DaemonProc,
    sessions: usize,
    max: u64,
    spawn: impl Fn(&str) -> Child,
) {
    // Where the sessions (maybe another user's) wait for the word to start.
    let gate_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        gate_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let gate = gate_dir.path().join("go");
    let cmd = format!(
        "while [ ! -e {} ]; do sleep 0.01; done; yes S$$-abcdefghijklmnopqrstuvwxyz | head -c 40000000",
        gate.display()
    );
    let children: Vec<Child> = (0..sessions).map(|_| spawn(&cmd)).collect();
    wait_until("the sessions live", Duration::from_secs(30), || {
        agent.status().sessions_live.len() == sessions
    });
    std::fs::write(&gate, "").unwrap();
    // Every session's output read at once, as each client would (one read after another
    // would hold all but one back).
    let readers: Vec<_> = children
        .into_iter()
        .map(|c| std::thread::spawn(move || c.wait_with_output().unwrap()))
        .collect();
    let outs: Vec<std::process::Output> =
        tokio::task::block_in_place(|| readers.into_iter().map(|r| r.join().unwrap()).collect());
    // (Only these sessions are in the spool: with a share, all of it is that user's.)
    let spooled = agent.status().bytes_spooled;
    assert!(spooled <= max, "{spooled} bytes spooled");
    backend.start().await;
    let recs = backend
        .wait_completed(sessions, Duration::from_secs(60))
        .await;
    let recorded: Vec<String> = recs
        .iter()
        .map(|r| output_of(&backend.events_text(r)))
        .collect();
    for out in &outs {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        let first = out.stdout.split(|&b| b == b'\n').next().unwrap();
        let mine = recorded
            .iter()
            .find(|r| r.as_bytes().starts_with(first))
            .expect("the session's recording");
        assert!(
            mine.as_bytes().starts_with(&out.stdout),
            "{} bytes shown, {} recorded; the daemon: {:?}",
            out.stdout.len(),
            mine.len(),
            agent
                .log()
                .lines()
                .filter(|l| l.contains("late output"))
                .collect::<Vec<_>>()
        );
    }
    stop_all(&mut daemon, &mut backend).await;
}

/// A session cut by a full spool that goes on unrecorded (no enforce) has its last chunk
/// sealed, ready to upload, within seconds of the cut, not when the session ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_session_that_goes_on_has_its_last_chunk_sealed() {
    let mut backend = Backend::new_down(true).await;
    let agent = Agent::new(
        &backend,
        "chunk_max_bytes = 100000\nchunk_max_secs = 600\nspool_max_bytes = 9000\n",
    );
    let mut daemon = agent.daemon();
    let (mut c, d) = FrameClient::start(&agent.socket());
    let (_, f) = fill_until_stopped(&mut c, 400, 50);
    assert_eq!(f.kind, Kind::Error);
    let dir = agent
        .spool()
        .join("sessions")
        .join(d.session.as_deref().unwrap());
    let names = || -> Vec<String> {
        std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("chunk-"))
            .collect()
    };
    wait_until("the last chunk sealed", Duration::from_secs(10), || {
        let n = names();
        !n.is_empty() && n.iter().all(|n| n.ends_with(".cast"))
    });
    c.end(0);
    stop_all(&mut daemon, &mut backend).await;
}

/// Under enforce, a session whose recording stops part-way (here the spool fills up) is
/// ended, and what the program prints meanwhile does not reach the user (all of 3 MB used to,
/// while the program was being stopped), nor does any output go unrecorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_ends_a_session_whose_recording_stops_without_showing_more() {
    let mut backend = Backend::new_down(true).await;
    // Cut at 7 MB (room is kept up to the limit for what the session had sent by then).
    let agent = Agent::new(&backend, "enforce = true\nspool_max_bytes = 8000000\n");
    let mut daemon = agent.daemon();
    let cmd = "echo first; sleep 0.5; head -c 16000000 /dev/zero | tr '\\0' d; echo; exit 3";
    let out = tokio::task::block_in_place(|| agent.shell(Some(cmd), b"", None));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("session ended"), "{err}");
    assert!(
        out.stdout.starts_with(b"first\n") && out.stdout.len() < 10_000_000,
        "{} bytes reached the user",
        out.stdout.len()
    );
    // The truncated recording still says how the program ended (it was ended for us).
    backend.start().await;
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    // Nothing reached the user unrecorded: what was in flight at the cut is spooled in the room
    // kept for it (it used to be dropped: 401,414 bytes shown, 270,342 recorded).
    let recorded = output_of(&backend.events_text(&recs[0]));
    assert!(
        recorded.as_bytes().starts_with(&out.stdout),
        "{} bytes shown, {} recorded",
        out.stdout.len(),
        recorded.len()
    );
    let m = &recs[0]["metadata"];
    assert_eq!(m["truncated"], true, "{m}");
    assert!(m["exit_status"].is_i64(), "{m}");
    stop_all(&mut daemon, &mut backend).await;
}

/// Without enforce, a session whose spool fills up runs to its end unrecorded from there, and
/// its recording (truncated) still gets its exit status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_past_a_full_spool_keeps_its_exit_status() {
    let mut backend = Backend::new_down(true).await;
    let agent = Agent::new(&backend, "spool_max_bytes = 300000\n");
    let mut daemon = agent.daemon();
    let cmd = "head -c 600000 /dev/zero | tr '\\0' e; exit 5";
    let out = tokio::task::block_in_place(|| agent.shell(Some(cmd), b"", None));
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(out.stdout.len(), 600_000);
    backend.start().await;
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    let m = &recs[0]["metadata"];
    assert_eq!(m["truncated"], true, "{m}");
    assert_eq!(m["exit_status"], 5, "{m}");
    stop_all(&mut daemon, &mut backend).await;
}

/// What a child wrote so far, read on a thread: a test waits for text in it.
struct Tail(Arc<Mutex<Vec<u8>>>, Option<std::thread::JoinHandle<()>>);

impl Tail {
    fn new(mut r: impl Read + Send + 'static) -> Tail {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = r.read(&mut buf) {
                s.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Tail(seen, Some(reader))
    }

    /// Everything the child wrote, once it closed its end (the child having exited is not
    /// enough: its last bytes may still be on their way to the reader).
    fn all(&mut self) -> Vec<u8> {
        if let Some(r) = self.1.take() {
            let _ = r.join();
        }
        self.0.lock().unwrap().clone()
    }

    /// What the child wrote until now.
    fn so_far(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }

    fn wait_for(&self, text: &str) {
        let seen = self.0.clone();
        wait_until(text, Duration::from_secs(20), || {
            find_bytes(&seen.lock().unwrap(), text.as_bytes())
        });
    }
}

/// The two recordings of a session the daemon's restart cut in two: (the first, the one that
/// continues it).
fn continued_pair(recs: &[Value]) -> (&Value, &Value) {
    let second = recs
        .iter()
        .find(|r| r["metadata"]["continues"].is_string())
        .unwrap_or_else(|| panic!("no continuation: {recs:#?}"));
    let first = recs
        .iter()
        .find(|r| r["metadata"]["agent_session"] == second["metadata"]["continues"])
        .unwrap_or_else(|| panic!("continues names no recording: {recs:#?}"));
    (first, second)
}

/// The daemon restarted (SIGTERM, as a package upgrade does) under a piped session: the
/// session goes on, and the next daemon records the rest, the output of the gap included, in
/// a recording that names the first in `continues` and gets the exit status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_restart_mid_session_records_the_rest_as_a_continuation() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    let go = Steps::new(&agent);
    let cmd = format!(
        "echo one; {}; echo two; {}; echo three; exit 3",
        go.wait(1),
        go.wait(2)
    );
    let (mut child, mut tail) = piped(&agent, &cmd);
    let mut restarted = time::OffsetDateTime::now_utc();
    let status = tokio::task::block_in_place(|| {
        tail.wait_for("one\n");
        kill(&mut daemon, nix::sys::signal::Signal::SIGTERM);
        assert!(daemon.wait().unwrap().success(), "{}", agent.log());
        // Output while no daemon runs waits for the next one.
        go.go(1);
        tail.wait_for("two\n");
        // The continuation starts when "two" was shown, not when a daemon took it.
        std::thread::sleep(Duration::from_millis(1500));
        restarted = time::OffsetDateTime::now_utc();
        daemon = agent.daemon();
        go.go(2);
        tail.wait_for("three\n");
        child.wait().unwrap()
    });
    assert_eq!(status.code(), Some(3));
    assert_eq!(tail.all(), b"one\ntwo\nthree\n");
    let recs = backend.wait_completed(2, Duration::from_secs(30)).await;
    let (first, second) = continued_pair(&recs);
    assert_eq!(first["metadata"]["interrupted"], true, "{first:#}");
    // What the stopping daemon did not take ("one", if it came just then) is in the second.
    let (a, b) = (
        output_of(&backend.events_text(first)),
        output_of(&backend.events_text(second)),
    );
    assert_eq!(a.clone() + &b, "one\ntwo\nthree\n");
    assert!(b.ends_with("two\nthree\n"), "{b:?}");
    let at = |r: &Value| {
        time::OffsetDateTime::parse(
            r["started_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    assert!(
        // (The header's whole seconds: up to two early.)
        at(second) <= restarted - time::Duration::milliseconds(500)
            && at(second) >= at(first) - time::Duration::seconds(2),
        "the continuation's start {} is when its first output was shown, before the restart at {restarted}",
        second["started_at"]
    );
    let m = &second["metadata"];
    assert_eq!(m["exit_status"], 3, "{m}");
    assert_eq!(m["command"], cmd.as_str());
    assert_eq!(m["kind"], "exec");
    assert!(
        m.get("interrupted").is_none() || m["interrupted"] == false,
        "{m}"
    );
    stop_all(&mut daemon, &mut backend).await;
}

/// A piped session whose gap overflowed (more than 1 MiB shown while no daemon ran) and whose
/// program is then silent: the shell gives the session to the daemon that came back on its
/// own schedule, not only when output comes, and output shown after that is recorded. (It
/// reconnected only with the next output, and counted that output as dropped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piped_session_is_taken_back_by_the_daemon_while_silent_after_an_overflowed_gap() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    let go = Steps::new(&agent);
    let cmd = format!(
        "echo one; {}; head -c 1500000 /dev/zero | tr '\\0' x; echo; echo two; {}; echo after; exit 4",
        go.wait(1),
        go.wait(2)
    );
    let (mut child, mut tail) = piped(&agent, &cmd);
    let status = tokio::task::block_in_place(|| {
        tail.wait_for("one\n");
        kill(&mut daemon, nix::sys::signal::Signal::SIGTERM);
        assert!(daemon.wait().unwrap().success(), "{}", agent.log());
        go.go(1);
        tail.wait_for("two\n");
        daemon = agent.daemon();
        // The program prints nothing until the session is live again.
        wait_until(
            "the silent session taken back",
            Duration::from_secs(10),
            || !agent.status().sessions_live.is_empty(),
        );
        go.go(2);
        tail.wait_for("after\n");
        child.wait().unwrap()
    });
    assert_eq!(status.code(), Some(4));
    let recs = backend.wait_completed(2, Duration::from_secs(30)).await;
    let (_, second) = continued_pair(&recs);
    let events = backend.events_text(second);
    let out = output_of(&events);
    assert!(
        out.ends_with("after\n"),
        "{:?}",
        &out[out.len().saturating_sub(200)..]
    );
    assert!(
        events.contains("output from here until recording resumed was not recorded"),
        "no marker where the kept part stops"
    );
    let dropped = second["metadata"]["gap_dropped_bytes"].as_u64().unwrap();
    // The whole of the first recording, the kept part and what was dropped are what was shown.
    let first_out = output_of(&backend.events_text(continued_pair(&recs).0));
    assert_eq!(
        (first_out.len() + out.len()) as u64 + dropped,
        tail.all().len() as u64,
        "{}",
        second["metadata"]
    );
    stop_all(&mut daemon, &mut backend).await;
}

/// The daemon killed outright (a crash, the OOM killer) and started again, as systemd does:
/// without enforce the session waits for it, and the rest (what was shown meanwhile included)
/// is recorded as a continuation of the first part, which is completed as interrupted. (The
/// rest used to go unrecorded for as long as the session ran.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_session_records_the_rest_once_it_is_back() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "chunk_max_secs = 1\n");
    let mut daemon = agent.daemon();
    let go = Steps::new(&agent);
    let cmd = format!(
        "echo one; {}; echo two; {}; echo three; exit 3",
        go.wait(1),
        go.wait(2)
    );
    let (mut child, mut tail) = piped(&agent, &cmd);
    let spool = agent.spool();
    let status = tokio::task::block_in_place(|| {
        tail.wait_for("one\n");
        wait_until("\"one\" spooled", Duration::from_secs(10), || {
            tree_contains(&spool.join("sessions"), b"one")
        });
        kill(&mut daemon, nix::sys::signal::Signal::SIGKILL);
        daemon.wait().unwrap();
        go.go(1);
        tail.wait_for("two\n");
        std::thread::sleep(Duration::from_millis(1000));
        daemon = agent.daemon();
        go.go(2);
        tail.wait_for("three\n");
        child.wait().unwrap()
    });
    assert_eq!(status.code(), Some(3));
    assert_eq!(tail.all(), b"one\ntwo\nthree\n");
    let recs = backend.wait_completed(2, Duration::from_secs(30)).await;
    let (first, second) = continued_pair(&recs);
    assert_eq!(first["metadata"]["interrupted"], true, "{first:#}");
    assert_eq!(output_of(&backend.events_text(first)), "one\n");
    assert_eq!(output_of(&backend.events_text(second)), "two\nthree\n");
    assert_eq!(second["metadata"]["exit_status"], 3, "{second:#}");
    assert_eq!(first["metadata"]["uid"], second["metadata"]["uid"]);
    stop_all(&mut daemon, &mut backend).await;
}

/// A stop cut short (SIGKILL soon after SIGTERM, as a stop timeout does) writes no list of the
/// sessions it let go: the next daemon still takes the rest of a session as the continuation
/// of the first recording (its `continues` used to be dropped), from the same user only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_cut_short_by_sigkill_still_links_the_continuation() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    let go = agent.dir.path().join("go");
    let cmd = format!(
        "echo one; while [ ! -e {} ]; do sleep 0.05; done; echo two; exit 3",
        go.display()
    );
    let (mut child, mut tail) = piped(&agent, &cmd);
    let status = tokio::task::block_in_place(|| {
        tail.wait_for("one\n");
        kill(&mut daemon, nix::sys::signal::Signal::SIGTERM);
        // Killed as soon as it has let the session go, before its stop is over.
        wait_until("the session let go", Duration::from_secs(10), || {
            agent.log().contains("session sealed, left for recovery")
        });
        kill(&mut daemon, nix::sys::signal::Signal::SIGKILL);
        let _ = daemon.wait();
        std::fs::write(&go, "").unwrap();
        tail.wait_for("two\n");
        daemon = agent.daemon();
        child.wait().unwrap()
    });
    assert_eq!(status.code(), Some(3));
    assert_eq!(tail.all(), b"one\ntwo\n");
    let recs = backend.wait_completed(2, Duration::from_secs(30)).await;
    let (first, second) = continued_pair(&recs);
    assert_eq!(first["metadata"]["interrupted"], true, "{first:#}");
    assert_eq!(second["metadata"]["exit_status"], 3, "{second:#}");
    stop_all(&mut daemon, &mut backend).await;
}

/// Under `enforce`, a piped session whose daemon stopped goes on while a daemon may come back
/// for it, but shows nothing the next daemon has not got: output kept only in the session's
/// memory would be lost if none came back. One that does gets what was held, which is then
/// shown (and the exit status); after 10 s without a daemon the session ends, with nothing
/// of what was held shown, however much the program wrote meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_shows_nothing_a_stopped_daemon_has_not_got() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let strict = agent.strict_config();
    let go = agent.dir.path().join("go");
    let wait = format!("while [ ! -e {} ]; do sleep 0.05; done", go.display());
    // A daemon back after 1.5 s; one back late in the 10 s (the shell used to ask at 6.3 s,
    // then at 11.3 s, and ended the session at 10 s with a daemon there); none.
    for (back, cmd) in [
        (
            Some(Duration::from_millis(1500)),
            format!("echo one; {wait}; echo two; exit 3"),
        ),
        (
            Some(Duration::from_millis(7500)),
            format!("echo one; {wait}; echo late; exit 5"),
        ),
        (
            None,
            format!("echo one; {wait}; head -c 3000000 /dev/zero | tr '\\0' z; echo never"),
        ),
    ] {
        let _ = std::fs::remove_file(&go);
        let mut daemon = agent.daemon();
        let mut child = agent
            .shell_command(Some(&cmd), Some(&strict))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut tail = Tail::new(child.stdout.take().unwrap());
        let (status, took) = tokio::task::block_in_place(|| {
            tail.wait_for("one\n");
            kill(&mut daemon, nix::sys::signal::Signal::SIGTERM);
            let t0 = Instant::now();
            assert!(daemon.wait().unwrap().success(), "{}", agent.log());
            std::fs::write(&go, "").unwrap();
            if let Some(after) = back {
                std::thread::sleep(after.saturating_sub(t0.elapsed()));
                assert_eq!(tail.so_far(), b"one\n", "shown while no daemon had it");
                daemon = agent.daemon();
                tail.wait_for(if after.as_secs() > 5 {
                    "late\n"
                } else {
                    "two\n"
                });
            }
            (child.wait().unwrap(), t0.elapsed())
        });
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        match back {
            Some(after) => {
                let (code, out): (i32, &[u8]) = if after.as_secs() > 5 {
                    (5, b"one\nlate\n")
                } else {
                    (3, b"one\ntwo\n")
                };
                assert_eq!(status.code(), Some(code), "{err}");
                assert_eq!(tail.all(), out);
                kill(&mut daemon, nix::sys::signal::Signal::SIGTERM);
                let _ = daemon.wait();
            }
            None => {
                assert_eq!(status.code(), Some(1), "{err}");
                assert!(err.contains("did not come back"), "{err}");
                assert_eq!(tail.all(), b"one\n");
                assert!(took >= Duration::from_secs(9), "{took:?}");
            }
        }
    }
    // Each continuation holds what was held while no daemon ran, and the exit status.
    let mut daemon = agent.daemon();
    let recs = backend.wait_completed(5, Duration::from_secs(30)).await;
    let mut held: Vec<(String, Value)> = recs
        .iter()
        .filter(|r| r["metadata"]["continues"].is_string())
        .map(|r| {
            (
                output_of(&backend.events_text(r)),
                r["metadata"]["exit_status"].clone(),
            )
        })
        .collect();
    held.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        held,
        [
            ("late\n".to_string(), json!(5)),
            ("two\n".to_string(), json!(3))
        ]
    );
    stop_all(&mut daemon, &mut backend).await;
}

/// Sends event lines of `width` bytes of text, up to `max`, until the daemon says something
/// (it stops recording); returns what was sent and that frame.
fn fill_until_stopped(c: &mut FrameClient, max: usize, width: usize) -> (String, Frame) {
    let mut sent = String::new();
    for i in 0..max {
        let l = event_line(
            i as f64 * 0.1,
            &format!("fill {i:04} {}\n", "z".repeat(width)),
        );
        if ipc::write_frame(&mut c.s, Kind::Events, l.as_bytes()).is_err() {
            break;
        }
        sent.push_str(&l);
        // Only a readable socket is read (a frame whole, blocking): a non-blocking read
        // could take half a frame and lose its place in the stream.
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&c.s),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap() > 0 {
            return (sent, ipc::read_frame(&mut c.s).unwrap());
        }
    }
    let f = ipc::read_frame(&mut c.s).unwrap();
    (sent, f)
}

/// A tmpfs of a fixed size mounted over a folder, unmounted when dropped (needs root, as the
/// sshd tests do).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mounting a tmpfs on {} (root needed)",
            at.display()
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `record` on a disk that fills up (a 64 KiB tmpfs): the session runs to its end and keeps
/// its exit status, and the file stops at the last whole line, so it still plays. A write
/// cut short by the full disk used to leave half a line.
#[test]
fn record_on_a_full_disk_keeps_a_playable_file() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let _disk = Tmpfs::mount(&disk, "64k");
    let file = disk.join("full.cast");
    let out = Command::new(BIN)
        .args([
            "record",
            "-q",
            "-c",
            "seq -f 'line %g of a session that fills the disk' 1 5000; exit 5",
        ])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(
        !out.stderr.is_empty(),
        "the recorder says the recording is incomplete"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.len() > 30_000 && text.ends_with('\n'),
        "{} bytes",
        text.len()
    );
    let cast = ztna_common::asciicast::parse_transcript(&text).unwrap();
    assert!(cast.header.is_some());
    assert!(cast.events_text.contains("line 1 of a session"));
}

/// `record --chunk-dir` on a disk that fills up: the chunk being written when the disk filled
/// is closed with the whole lines that reached it (it used to stay a `.part` ending mid-line),
/// so header + chunks are still the start of the recording, and FILE, on another disk, holds
/// the whole session.
#[test]
fn record_chunks_on_a_full_disk_end_at_a_whole_line() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    std::fs::create_dir(&disk).unwrap();
    let _disk = Tmpfs::mount(&disk, "64k");
    let chunks = disk.join("chunks");
    let file = dir.path().join("whole.cast");
    let out = Command::new(BIN)
        .args(["record", "-q", "--chunk-max-bytes", "15000", "--chunk-dir"])
        .arg(&chunks)
        .args([
            "-c",
            "seq -f 'line %g of a session that fills the disk' 1 5000; exit 5",
        ])
        .arg(&file)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("recording incomplete"),
        "{out:?}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&chunks)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(!names.iter().any(|n| n.ends_with(".part")), "{names:?}");
    let mut joined = std::fs::read_to_string(chunks.join("header.json")).unwrap();
    let count = names.iter().filter(|n| n.starts_with("chunk-")).count();
    for i in 0..count {
        let chunk = std::fs::read_to_string(chunks.join(format!("chunk-{i}.cast"))).unwrap();
        assert!(
            chunk.ends_with('\n'),
            "chunk {i} of {names:?} ends mid-line"
        );
        joined.push_str(&chunk);
    }
    let whole = std::fs::read_to_string(&file).unwrap();
    assert!(
        joined.len() > 40_000 && joined.len() < whole.len(),
        "{} of {} bytes in {names:?}",
        joined.len(),
        whole.len()
    );
    assert!(whole.starts_with(&joined), "{names:?}");
    assert!(whole.contains("line 5000 of a session"));
}

/// A file-size limit (`ulimit -f`) is a full disk to the recorder: the recording stops at
/// its last whole line and the program's exit status comes back (SIGXFSZ used to kill the
/// recorder, leaving the terminal raw and the file cut mid-line).
#[test]
fn record_past_a_file_size_limit_keeps_a_playable_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("limited.cast");
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -f 100; exec '{BIN}' record -q -c \"seq -f 'line %g of a session past the limit' 1 10000; exit 5\" '{}'",
            file.display()
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        !out.stderr.is_empty(),
        "the recorder says the recording is incomplete"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.len() > 50_000 && text.len() <= 102_400 && text.ends_with('\n'),
        "{} bytes",
        text.len()
    );
    let cast = ztna_common::asciicast::parse_transcript(&text).unwrap();
    assert!(cast.header.is_some());
    assert!(cast.events_text.contains("line 1 of a session"));
}

/// The spool's disk full (a 1 MiB tmpfs, the spool limit above it): the live session is
/// told and stops being recorded while the disk still holds the room it keeps for what it
/// sends before it hears (256 KiB here, more than a socket's buffer), a new session is
/// refused, and once the backend is back everything the session sent arrives, whole lines in
/// order, and the session is completed as truncated. (The disk used to be filled to the last
/// byte, and what was in flight then, already shown to the user, was lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_disk_full_keeps_what_it_has() {
    let mut backend = Backend::new_down(true).await;
    let agent = Agent::new(
        &backend,
        "chunk_max_bytes = 4096
spool_max_bytes = 4194304
",
    );
    let _disk = Tmpfs::mount(&agent.spool(), "1m");
    let mut daemon = agent.daemon();
    let (mut c, d) = FrameClient::start(&agent.socket());
    assert_eq!(d.mode, Mode::Record);
    let (sent, f) = fill_until_stopped(&mut c, 10_000, 500);
    assert_eq!(f.kind, Kind::Error, "{f:?}");
    let msg = f.parse::<ipc::ErrorMsg>().unwrap().message;
    assert!(msg.contains("spool"), "{msg}");
    let (_c2, d2) = FrameClient::start(&agent.socket());
    assert_eq!(d2.mode, Mode::Refused, "{d2:?}");
    assert!(d2.reason.contains("spool"), "{d2:?}");
    assert!(
        agent.status().chunks_waiting > 0,
        "the daemon survives a full disk"
    );
    // The session ends (it went on unrecorded). Its end mark is on the full disk at once (in
    // the space the session set aside), so it would survive a restart of the daemon; the
    // backend is still down.
    c.end(4);
    let end = agent
        .spool()
        .join("sessions")
        .join(d.session.as_deref().unwrap())
        .join("end.json");
    wait_until("the end mark on disk", Duration::from_secs(10), || {
        end.exists()
    });
    let mark: Value = serde_json::from_slice(&std::fs::read(&end).unwrap()).unwrap();
    assert_eq!(mark["metadata"]["truncated"], true, "{mark}");
    assert_eq!(mark["metadata"]["exit_status"], 4, "{mark}");

    backend.start().await;
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    let rec = &recs[0];
    let m = &rec["metadata"];
    assert_eq!(m["truncated"], true, "{rec:#}");
    let reason = m["truncated_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("spool full"), "{reason}");
    let got = backend.events_text(rec);
    assert!(
        got.len() > 16 * 1024 && got == sent,
        "everything the session sent arrives, whole lines in order ({} of {} bytes)",
        got.len(),
        sent.len()
    );
    assert_eq!(
        agent.status().sessions_failed,
        0,
        "no chunk set aside: {}",
        agent.log()
    );
    stop_all(&mut daemon, &mut backend).await;
}

/// A bad config names what is wrong; `status --json` prints one JSON object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_and_bad_config() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    // A live session of root's: root sees it; another user sees the totals, not who is
    // logged in (the socket is open to everyone).
    let (_live, d) = FrameClient::start(&agent.socket());
    assert_eq!(d.mode, Mode::Record);
    let status_as = |user: Option<&str>| {
        let mut c = match user {
            None => Command::new(BIN),
            Some(u) => {
                let mut c = Command::new("setpriv");
                c.args(["--reuid", u, "--regid", u, "--clear-groups", "--", BIN]);
                c
            }
        };
        let out = c
            .args(["status", "--json", "--config"])
            .arg(agent.config())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let v = status_as(None);
    assert_eq!(v["running"], true);
    assert_eq!(v["sessions_live"].as_array().unwrap().len(), 1, "{v}");
    assert!(v["chunks_waiting"].is_u64());
    sshd::ensure_user();
    let socket = agent.socket();
    for p in [agent.dir.path(), socket.parent().unwrap()] {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(
        agent.config(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let v = status_as(Some(sshd::USER));
    assert_eq!(v["running"], true, "{v}");
    assert_eq!(v["sessions_live"].as_array().unwrap().len(), 0, "{v}");
    kill(&mut daemon, nix::sys::signal::Signal::SIGTERM);
    daemon.wait().unwrap();

    let bad = agent.dir.path().join("bad.toml");
    std::fs::write(&bad, "chunk_max_secs = \"soon\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["daemon", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chunk_max_secs"));
    backend.stop().await;
}

/// Under systemd (`Type=notify`) the daemon says READY=1 only once its socket accepts
/// sessions, and STOPPING=1 when it is told to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_notifies_systemd_when_ready_and_stopping() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let notify_path = agent.dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut daemon = DaemonProc(
        Command::new(BIN)
            .args(["daemon", "--config"])
            .arg(agent.config())
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("no READY=1 from the daemon");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    // Ready means ready: the socket answers at once.
    ztna_recorder::status::query(&agent.socket()).unwrap();
    kill(&mut daemon, nix::sys::signal::Signal::SIGTERM);
    let n = notify
        .recv(&mut buf)
        .expect("no STOPPING=1 from the daemon");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(daemon.wait().unwrap().success());
    backend.stop().await;
}

// ---------------------------------------------------------------------------------------
// With OpenSSH: a real sshd on a loopback port whose ForceCommand is our `shell`, and the
// real ssh, scp and sftp clients.

mod sshd {
    use super::*;

    pub const USER: &str = "ztnatest";

    fn run(cmd: &mut Command) -> std::process::Output {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The test user, with a usable (not locked) account: sshd without PAM refuses locked ones.
    pub fn ensure_user() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            ensure_account(USER, "/bin/bash");
            // A user's attempt to run commands before the recorder starts: sshd runs the
            // ForceCommand through `bash -c`, and Debian's bash may read ~/.bashrc there. Only
            // commands carrying the marker are affected (anything else is tests' business).
            let home = nix::unistd::User::from_name(USER).unwrap().unwrap().dir;
            let rc = home.join(".bashrc");
            let old = std::fs::read_to_string(&rc).unwrap_or_default();
            let trick = format!(
                "case \"$BASH_EXECUTION_STRING/$SSH_ORIGINAL_COMMAND\" in\n\
                 *ztna-recorder*/*{BASHRC_BYPASS}*) eval \"$SSH_ORIGINAL_COMMAND\"; exit 77 ;;\n\
                 esac\n"
            );
            if !old.contains(BASHRC_BYPASS) {
                std::fs::write(&rc, trick.clone() + &old).unwrap();
            }
            // The same from a file the client names in BASH_ENV (SendEnv, ~/.pam_environment).
            std::fs::write(home.join(BASH_ENV_BYPASS), trick).unwrap();
        });
    }

    /// Marks the commands the test user's `~/.bashrc` tries to run unrecorded.
    pub const BASHRC_BYPASS: &str = "bashrc-bypass";
    /// In the test user's home: the same trick, for `BASH_ENV`.
    pub const BASH_ENV_BYPASS: &str = ".ztna-bash-env-bypass";

    /// A second user whose login shell is an executable file that cannot start: its
    /// interpreter does not exist. (sshd runs even the ForceCommand through the user's shell,
    /// so this user never gets past sshd; `shell` is run directly as them.)
    pub const BROKEN_SHELL_USER: &str = "ztnabadsh";
    const BROKEN_SHELL: &str = "/usr/local/libexec/ztna-test-broken-shell";

    pub fn ensure_broken_shell_user() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            std::fs::create_dir_all(Path::new(BROKEN_SHELL).parent().unwrap()).unwrap();
            std::fs::write(BROKEN_SHELL, "#!/nonexistent/interpreter\n").unwrap();
            chmod(Path::new(BROKEN_SHELL), 0o755);
            ensure_account(BROKEN_SHELL_USER, BROKEN_SHELL);
        });
    }

    fn ensure_account(name: &str, shell: &str) {
        let exists = Command::new("id")
            .arg("-u")
            .arg(name)
            .output()
            .unwrap()
            .status
            .success();
        if !exists {
            run(Command::new("useradd").args(["-m", "-s", shell, name]));
        }
        run(Command::new("usermod").args(["-p", "*", name]));
    }

    pub fn uid() -> u32 {
        nix::unistd::User::from_name(USER)
            .unwrap()
            .unwrap()
            .uid
            .as_raw()
    }

    /// The shipped sshd drop-in's `SetEnv` lines: what they are there for is tested with them.
    fn dropin_setenv() -> String {
        let dropin = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/packaging/sshd/50-ztna-recorder.conf"
        );
        let text = std::fs::read_to_string(dropin).unwrap();
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("SetEnv ")).collect();
        assert!(!lines.is_empty(), "{dropin} sets no environment");
        lines.join("\n") + "\n"
    }

    pub struct Sshd {
        pub dir: TempDir,
        pub port: u16,
        child: Child,
    }

    impl Drop for Sshd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Sshd {
        /// sshd with `ForceCommand = ztna-recorder shell --config CONFIG`.
        pub fn start(config: &Path) -> Sshd {
            Sshd::start_with(config, "")
        }

        /// [`Sshd::start`] with `before` in the ForceCommand line, ahead of the recorder.
        pub fn start_with(config: &Path, before: &str) -> Sshd {
            let sshd = std::env::var("ZTNA_TEST_SSHD").unwrap_or_else(|_| "/usr/sbin/sshd".into());
            assert!(
                Path::new(&sshd).exists(),
                "OpenSSH's sshd is needed at {sshd} (ZTNA_TEST_SSHD); scripts/test.sh installs it"
            );
            ensure_user();
            std::fs::create_dir_all("/run/sshd").unwrap();
            let dir = tempfile::tempdir().unwrap();
            chmod(dir.path(), 0o755);
            // The agent's folder holds the config the user's `shell` reads.
            if let Some(p) = config.parent() {
                chmod(p, 0o755);
            }
            chmod(config, 0o644);
            let d = dir.path();
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join("hostkey")));
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join("clientkey")));
            std::fs::copy(d.join("clientkey.pub"), d.join("authorized_keys")).unwrap();
            chmod(&d.join("authorized_keys"), 0o644);
            let port = free_port();
            let conf = format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nUsePAM no\nStrictModes no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 PermitRootLogin no\nAllowUsers {USER}\nSubsystem sftp internal-sftp\n\
                 ForceCommand {before}{BIN} shell --config {cfg}\nLogLevel ERROR\n{setenv}\
                 AcceptEnv BASH_ENV\n",
                d = d.display(),
                cfg = config.display(),
                setenv = dropin_setenv(),
            );
            std::fs::write(d.join("sshd_config"), conf).unwrap();
            let log = std::fs::File::create(d.join("sshd.log")).unwrap();
            let child = Command::new(&sshd)
                .args(["-D", "-e", "-f"])
                .arg(d.join("sshd_config"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let mut s = Sshd { dir, port, child };
            let t0 = Instant::now();
            while !speaks_ssh(port) {
                if let Ok(Some(st)) = s.child.try_wait() {
                    panic!("sshd exited ({st}): {}", s.log());
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "sshd did not listen: {}",
                    s.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            s
        }

        pub fn log(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
        }

        fn opts(&self, c: &mut Command, port_flag: &str) {
            c.arg(port_flag)
                .arg(self.port.to_string())
                .arg("-i")
                .arg(self.dir.path().join("clientkey"))
                .args([
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "LogLevel=ERROR",
                ]);
        }

        pub fn ssh(&self) -> Command {
            let mut c = Command::new("ssh");
            self.opts(&mut c, "-p");
            c
        }

        pub fn scp(&self) -> Command {
            let mut c = Command::new("scp");
            self.opts(&mut c, "-P");
            c
        }

        pub fn sftp(&self) -> Command {
            let mut c = Command::new("sftp");
            self.opts(&mut c, "-P");
            c
        }

        pub fn target(&self) -> String {
            format!("{USER}@127.0.0.1")
        }

        /// `ssh -tt host CMD` (the PTY path) with nothing on stdin, run to its end.
        pub fn exec_tt(&self, cmd: &str) -> std::process::Output {
            tokio::task::block_in_place(|| {
                self.ssh()
                    .arg("-tt")
                    .arg(self.target())
                    .arg(cmd)
                    .stdin(Stdio::null())
                    .output()
                    .unwrap()
            })
        }

        /// An interactive login (`ssh -tt host`), every stream piped.
        pub fn login(&self) -> Child {
            self.ssh()
                .arg("-tt")
                .arg(self.target())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        }
    }

    pub fn chmod(p: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// A free port outside the kernel's ephemeral range, so that a backend stopped and
    /// restarted on its port-0 address (or any client socket) never collides with sshd.
    fn free_port() -> u16 {
        loop {
            let p = rand::Rng::gen_range(&mut rand::thread_rng(), 20_000..30_000);
            if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
                return p;
            }
        }
    }

    /// Whether what listens on `port` is an SSH server.
    fn speaks_ssh(port: u16) -> bool {
        use std::io::Read;
        let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
        let mut b = [0u8; 8];
        c.read_exact(&mut b).is_ok() && &b == b"SSH-2.0-"
    }

    /// A world-writable folder for transfers (the test user writes, root reads).
    pub fn drop_dir() -> TempDir {
        let d = tempfile::tempdir().unwrap();
        chmod(d.path(), 0o1777);
        d
    }

    /// `ssh -tt host` with commands typed ahead on stdin; returns (exit code, output).
    pub fn interactive(s: &Sshd, typed: &[&str], pause: Duration) -> (Option<i32>, String) {
        let mut child = s.login();
        let mut stdin = child.stdin.take().unwrap();
        for t in typed {
            stdin.write_all(t.as_bytes()).unwrap();
            stdin.flush().unwrap();
            std::thread::sleep(pause);
        }
        let out = child.wait_with_output().unwrap();
        drop(stdin);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }
}

/// `ssh -tt`: commands typed ahead reach the shell; the recording holds the output, the
/// user, the TTY, the exit status and a duration from its last event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_interactive_session_is_recorded() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    let s = sshd::Sshd::start(&agent.config());
    let (code, text) = tokio::task::block_in_place(|| {
        sshd::interactive(
            &s,
            &[
                "echo hello-$((6*7))\n",
                // SSH_TTY names the terminal the shell is on, which it can write to.
                "echo via-tty-$((5*5)) > $SSH_TTY\n",
                "[ \"$SSH_TTY\" = \"$(tty)\" ] && echo tty-$((2*3))-same\n",
                "exit 3\n",
            ],
            Duration::from_millis(0),
        )
    });
    assert_eq!(code, Some(3), "{text}\n{}\n{}", s.log(), agent.log());
    for shown in ["hello-42", "via-tty-25", "tty-6-same"] {
        assert!(text.contains(shown), "{shown}: {text}");
    }
    let recs = backend.wait_completed(1, Duration::from_secs(20)).await;
    let rec = &recs[0];
    let m = &rec["metadata"];
    assert_eq!(m["kind"], "interactive", "{rec:#}");
    assert_eq!(m["user"], sshd::USER);
    assert_eq!(m["uid"], sshd::uid());
    assert_eq!(m["exit_status"], 3);
    assert_eq!(m["remote_addr"], "127.0.0.1");
    assert!(m["remote_port"].as_u64().unwrap() > 0);
    assert!(m["tty"].as_str().unwrap().starts_with("/dev/pts/"), "{m}");
    assert!(m.get("command").is_none() || m["command"].is_null());
    assert_eq!(rec["machine_name"], "Linux-C");
    assert_eq!(m["machine_name"], "Linux-C");
    let events = backend.events_text(rec);
    assert!(output_of(&events).contains("hello-42"));
    assert!(output_of(&events).contains("via-tty-25"), "{events}");
    let last: Value = serde_json::from_str(events.lines().last().unwrap()).unwrap();
    assert_eq!(
        rec["duration_seconds"],
        last[0].as_f64().unwrap().ceil() as i64
    );
    stop_all(&mut daemon, &mut backend).await;
}

/// `ssh -tt` across a daemon restart: the session goes on, and what is typed and shown after
/// (while no daemon runs, then with the next one) is in the recording that continues it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_pty_session_is_recorded_across_a_daemon_restart() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    let s = sshd::Sshd::start(&agent.config());
    let mut child = s.login();
    let mut stdin = child.stdin.take().unwrap();
    let tail = Tail::new(child.stdout.take().unwrap());
    let status = tokio::task::block_in_place(|| {
        stdin.write_all(b"echo one-$((1+1))\n").unwrap();
        tail.wait_for("one-2");
        kill(&mut daemon, nix::sys::signal::Signal::SIGTERM);
        assert!(daemon.wait().unwrap().success(), "{}", agent.log());
        stdin.write_all(b"echo two-$((2+2))\n").unwrap();
        tail.wait_for("two-4");
        daemon = agent.daemon();
        stdin.write_all(b"echo three-$((3+3))\n").unwrap();
        tail.wait_for("three-6");
        stdin.write_all(b"exit 5\n").unwrap();
        child.wait().unwrap()
    });
    assert_eq!(status.code(), Some(5), "{}\n{}", s.log(), agent.log());
    let recs = backend.wait_completed(2, Duration::from_secs(30)).await;
    let (first, second) = continued_pair(&recs);
    assert_eq!(first["metadata"]["interrupted"], true, "{first:#}");
    let out = output_of(&backend.events_text(second));
    assert!(out.contains("two-4") && out.contains("three-6"), "{out:?}");
    // Once: in the first, or (if the daemon stopped before it was sent) in the second.
    let both = output_of(&backend.events_text(first)) + &out;
    assert_eq!(both.matches("one-2").count(), 1, "{both:?}");
    let m = &second["metadata"];
    assert_eq!(m["exit_status"], 5, "{m}");
    assert_eq!(m["kind"], "interactive");
    assert_eq!(m["user"], sshd::USER);
    assert!(m["tty"].as_str().unwrap().starts_with("/dev/pts/"), "{m}");
    stop_all(&mut daemon, &mut backend).await;
}

/// The `ztna-recorder shell` processes of the test user run with `config` (tests run side by
/// side): (pid, what its stdin is).
fn recorder_shells(config: &Path) -> Vec<(u32, PathBuf)> {
    let uid = sshd::uid();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        // (Its /proc files are root's: it is not dumpable.)
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let owner = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next()?.parse::<u32>().ok());
        if owner == Some(uid)
            && cmdline.starts_with(format!("{BIN}\0shell\0").as_bytes())
            && find_bytes(&cmdline, config.as_os_str().as_encoded_bytes())
        {
            if let Ok(tty) = std::fs::read_link(e.path().join("fd/0")) {
                found.push((pid, tty));
            }
        }
    }
    found
}

/// Under `enforce`, a session whose daemon stopped and stays away ends (10 s of grace, for a
/// restart), showing nothing meanwhile. Meanwhile the user's own processes can neither open sshd's terminal behind the
/// recorder's back nor look at its file descriptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_enforce_ends_a_session_whose_daemon_stays_away_and_the_terminal_is_the_recorders() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    let strict = agent.strict_config();
    let s = sshd::Sshd::start(&strict);
    let mut child = s.login();
    let mut stdin = child.stdin.take().unwrap();
    let mut tail = Tail::new(child.stdout.take().unwrap());
    let user = sshd::USER;
    let (status, took) = tokio::task::block_in_place(|| {
        stdin.write_all(b"echo one-$((1+1))\n").unwrap();
        tail.wait_for("one-2");
        let shells = recorder_shells(&strict);
        assert_eq!(shells.len(), 1, "{shells:?}");
        let (pid, tty) = &shells[0];
        assert!(tty.starts_with("/dev/pts/"), "{tty:?}");
        let try_as_user = |script: String| {
            Command::new("setpriv")
                .args(["--reuid", user, "--regid", user, "--clear-groups", "--"])
                .args(["sh", "-c", &script])
                .output()
                .unwrap()
        };
        let open = try_as_user(format!("exec 3<>{}", tty.display()));
        assert!(!open.status.success(), "the user opened sshd's terminal");
        assert!(
            String::from_utf8_lossy(&open.stderr).contains("busy"),
            "{}",
            String::from_utf8_lossy(&open.stderr)
        );
        let fds = try_as_user(format!("ls /proc/{pid}/fd"));
        assert!(
            !fds.status.success(),
            "the user listed the recorder's descriptors"
        );

        kill(&mut daemon, nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        assert!(daemon.wait().unwrap().success(), "{}", agent.log());
        // Silent for 6 s: the grace runs from the stop, not from the first output after it.
        // Then the program ends while its output is held: the session still ends as one
        // that could not be recorded, not with the program's status.
        std::thread::sleep(Duration::from_secs(6));
        stdin.write_all(b"echo two-$((2+2)); exit 4\n").unwrap();
        let status = child.wait().unwrap();
        (status, t0.elapsed())
    });
    let seen = String::from_utf8_lossy(&tail.all()).into_owned();
    assert_eq!(status.code(), Some(1), "{seen}");
    assert!(seen.contains("did not come back"), "{seen}");
    // Not even the terminal's echo of what was typed.
    assert!(
        !seen.contains("two-"),
        "shown while no daemon had it: {seen}"
    );
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(14),
        "{took:?}"
    );
    backend.stop().await;
}

/// A process that opened sshd's terminal before the recorder claimed it (here one started
/// ahead of it, as one left by an earlier session could) could talk to the client past the
/// recording: it is killed, with or without `enforce`, and the session is recorded and says
/// so. (It used to go on beside the recorder, which one could then stop, driving the client's
/// terminal unrecorded; and under `enforce` the login used to be refused, leaving no trace.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_a_terminal_held_by_another_process() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    let before = "sleep 30 & exec ";
    // Gone (or a zombie: nothing open), not sleeping on with the terminal.
    let gone = |pid: u64| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        matches!(state, None | Some("Z"))
    };
    for (n, config) in [(1, agent.strict_config()), (2, agent.config())] {
        let s = sshd::Sshd::start_with(&config, before);
        let exit = format!("exit {}\n", n + 1);
        let (code, text) = tokio::task::block_in_place(|| {
            sshd::interactive(&s, &["echo in-$((2+2))\n", &exit], Duration::ZERO)
        });
        assert_eq!(code, Some(n + 1), "{text}");
        assert!(text.contains("in-4"), "{text}");
        let recs = backend
            .wait_completed(n as usize, Duration::from_secs(20))
            .await;
        let rec = recs
            .iter()
            .find(|r| r["metadata"]["exit_status"] == n + 1)
            .unwrap_or_else(|| panic!("{recs:#?}"));
        let pid = rec["metadata"]["terminal_held_by_pid"]
            .as_u64()
            .unwrap_or_else(|| panic!("{rec:#}"));
        assert_eq!(
            rec["metadata"]["terminal_holders_killed"],
            json!([pid]),
            "{rec:#}"
        );
        assert!(gone(pid));
        drop(s);
    }
    // One that made itself undumpable hides its descriptors from `shell` (the user's): the
    // daemon (root) finds it. It used to go on writing to the client, unrecorded.
    let hidden =
        "python3 -c 'import ctypes,time; ctypes.CDLL(None).prctl(4, 0); time.sleep(30)' & \
                  sleep 0.5; exec ";
    let s = sshd::Sshd::start_with(&agent.config(), hidden);
    let (code, text) = tokio::task::block_in_place(|| {
        sshd::interactive(&s, &["echo in-$((3+3))\n", "exit 4\n"], Duration::ZERO)
    });
    assert_eq!(code, Some(4), "{text}");
    let recs = backend.wait_completed(3, Duration::from_secs(20)).await;
    let rec = recs
        .iter()
        .find(|r| r["metadata"]["exit_status"] == 4)
        .unwrap_or_else(|| panic!("{recs:#?}"));
    let pids = rec["metadata"]["terminal_holders_killed"]
        .as_array()
        .unwrap_or_else(|| panic!("{rec:#}"));
    assert_eq!(pids.len(), 1, "{rec:#}");
    assert!(gone(pids[0].as_u64().unwrap()), "{rec:#}");
    stop_all(&mut daemon, &mut backend).await;
}

/// A login shell that cannot start (an executable file whose interpreter is gone), with and
/// without a PTY: `shell` says why and exits 127, and the recording says so too, not that the
/// recorder was cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shell_that_cannot_start_is_recorded_as_such() {
    use std::os::unix::process::CommandExt;
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    sshd::ensure_broken_shell_user();
    let user = nix::unistd::User::from_name(sshd::BROKEN_SHELL_USER)
        .unwrap()
        .unwrap();
    // The user reads the config (the daemon's socket is 0666).
    sshd::chmod(agent.dir.path(), 0o755);
    sshd::chmod(&agent.config(), 0o644);
    let agent_ref = &agent;
    tokio::task::block_in_place(|| {
        for tty in [true, false] {
            let agent = agent_ref;
            let mut c = agent.shell_command(Some("echo never-$((1+1))"), None);
            c.uid(user.uid.as_raw()).gid(user.gid.as_raw());
            let pty = tty.then(|| nix::pty::openpty(None, None).unwrap());
            if let Some(p) = &pty {
                c.stdin(p.slave.try_clone().unwrap())
                    .stdout(p.slave.try_clone().unwrap())
                    .stderr(p.slave.try_clone().unwrap());
            }
            let mut child = c.spawn().unwrap();
            drop(c); // it holds copies of the slave side
            let mut text = Vec::new();
            if let Some(p) = pty {
                drop(p.slave);
                // Until the last writer has gone (EIO).
                let _ = std::fs::File::from(p.master).read_to_end(&mut text);
            } else {
                drop(child.stdin.take());
                child.stderr.take().unwrap().read_to_end(&mut text).unwrap();
            }
            let status = child.wait().unwrap();
            let text = String::from_utf8_lossy(&text);
            assert_eq!(
                status.code(),
                Some(127),
                "tty {tty}: {text}\n{}",
                agent.log()
            );
            assert!(text.contains("No such file"), "tty {tty}: {text}");
            assert!(!text.contains("never-2"), "{text}");
        }
    });
    let recs = backend.wait_completed(2, Duration::from_secs(20)).await;
    for rec in &recs {
        let m = &rec["metadata"];
        assert_eq!(m["exit_status"], 127, "{rec:#}");
        assert!(m["error"].as_str().unwrap().contains("No such file"), "{m}");
        assert_ne!(m["interrupted"], true, "{m}");
        assert_eq!(m["user"], sshd::BROKEN_SHELL_USER);
    }
    stop_all(&mut daemon, &mut backend).await;
}

/// `ssh host 'printf …'` without a PTY: output byte-exact to the client, recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_exec_without_pty_is_byte_exact() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    let s = sshd::Sshd::start(&agent.config());
    // The program's environment is plain sshd's: no SSH_ORIGINAL_COMMAND (that is for forced
    // commands, and ours is not the user's).
    // (And `$0` is the shell's name, as sshd sets it.)
    let cmd = r#"printf 'x\000y\377\r\n%s %s %s' "$((40+2))" "${SSH_ORIGINAL_COMMAND-unset}" "$0""#;
    let out = tokio::task::block_in_place(|| s.ssh().arg(s.target()).arg(cmd).output().unwrap());
    assert_eq!(
        out.stdout,
        b"x\x00y\xff\r\n42 unset bash",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0));
    let recs = backend.wait_completed(1, Duration::from_secs(20)).await;
    let rec = &recs[0];
    assert_eq!(rec["metadata"]["kind"], "exec");
    assert_eq!(rec["metadata"]["command"], cmd);
    assert_eq!(
        output_of(&backend.events_text(rec)),
        "x\u{0}y\u{fffd}\r\n42 unset bash"
    );
    // The user's ~/.bashrc cannot run a command before the recorder starts (sshd runs us
    // through `bash -c`, where Debian's bash reads it, unless the drop-in's SHLVL says no), and
    // the user's own shell counts its level from 1, as under plain sshd.
    // Nor can a BASH_ENV the client sends (AcceptEnv BASH_ENV here; Debian's PAM reads one
    // from ~/.pam_environment too): the drop-in sets it empty.
    let home = nix::unistd::User::from_name(sshd::USER)
        .unwrap()
        .unwrap()
        .dir;
    let bash_env = format!(
        "SetEnv=BASH_ENV={}",
        home.join(sshd::BASH_ENV_BYPASS).display()
    );
    for (tty, via_env) in [(false, false), (true, false), (false, true)] {
        let cmd = format!("echo {}-$((3*4)) level-$SHLVL", sshd::BASHRC_BYPASS);
        let out = tokio::task::block_in_place(|| {
            let mut c = s.ssh();
            if tty {
                c.arg("-tt");
            }
            if via_env {
                c.arg("-o").arg(&bash_env);
            }
            c.arg(s.target())
                .arg(&cmd)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        });
        assert_eq!(
            out.status.code(),
            Some(0),
            "tty {tty}, BASH_ENV {via_env}: {out:?}"
        );
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(
            shown.contains(&format!("{}-12 level-1", sshd::BASHRC_BYPASS)),
            "tty {tty}: {out:?}"
        );
    }
    // With a PTY too, `$0` is the shell's name.
    let out = tokio::task::block_in_place(|| {
        s.ssh()
            .arg("-tt")
            .arg(s.target())
            .arg(r#"printf '[%s]' "$0""#)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    });
    assert_eq!(out.stdout, b"[bash]", "{out:?}");
    // A program killed by a signal: the client gets 128+N, as from `record` and a shell
    // (plain sshd sends an `exit-signal`, for which ssh says 255: less telling, and the same
    // as a failed connection), with a PTY and without; the recordings say which signal.
    for tty in [false, true] {
        let out = tokio::task::block_in_place(|| {
            let mut c = s.ssh();
            if tty {
                c.arg("-tt");
            }
            c.arg(s.target())
                .arg("kill -9 $$")
                .stdin(Stdio::null())
                .output()
                .unwrap()
        });
        assert_eq!(out.status.code(), Some(137), "tty {tty}: {out:?}");
    }
    let recs = backend.wait_completed(7, Duration::from_secs(20)).await;
    let killed: Vec<_> = recs
        .iter()
        .filter(|r| r["metadata"]["command"] == "kill -9 $$")
        .collect();
    assert_eq!(killed.len(), 2, "{recs:#?}");
    for r in killed {
        assert_eq!(r["metadata"]["exit_signal"], 9, "{r:#}");
        assert_eq!(r["metadata"]["exit_status"], 137, "{r:#}");
    }

    // A command that only starts like a file transfer (whose contents are not recorded) is an
    // ordinary command: recorded. It used to run unrecorded, a whole shell included.
    let sneaky = "scp -f /etc/hostname; echo after-$((6*7))";
    let out = tokio::task::block_in_place(|| s.ssh().arg(s.target()).arg(sneaky).output().unwrap());
    assert!(
        find_bytes(&out.stdout, b"after-42"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = backend.wait_completed(8, Duration::from_secs(20)).await;
    let bypass: Vec<_> = recs
        .iter()
        .filter(|r| {
            r["metadata"]["command"]
                .as_str()
                .is_some_and(|c| c.contains(sshd::BASHRC_BYPASS))
        })
        .collect();
    assert_eq!(bypass.len(), 3, "{recs:#?}");
    for r in bypass {
        assert!(
            output_of(&backend.events_text(r)).contains("-12 level-1"),
            "{r:#}"
        );
    }
    let rec = recs
        .iter()
        .find(|r| r["metadata"]["command"] == sneaky)
        .expect("the sneaky command's recording");
    assert_eq!(rec["metadata"]["kind"], "exec");
    assert!(output_of(&backend.events_text(rec)).contains("after-42"));
    stop_all(&mut daemon, &mut backend).await;
}

/// sftp and scp (SFTP and legacy protocol) of a 10 MiB random file: identical on arrival;
/// the recordings hold metadata only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_file_transfers_pass_untouched_and_record_metadata_only() {
    let mut backend = Backend::new(true).await;
    let agent = Agent::new(&backend, "");
    let mut daemon = agent.daemon();
    let s = sshd::Sshd::start(&agent.config());
    let src_dir = tempfile::tempdir().unwrap();
    let src = src_dir.path().join("random.bin");
    let mut data = vec![0u8; 10 * 1024 * 1024];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut data);
    std::fs::write(&src, &data).unwrap();
    let drop = sshd::drop_dir();
    tokio::task::block_in_place(|| {
        // scp over the SFTP protocol (the default), then the legacy protocol (`scp -t`).
        for (flag, name) in [(None, "via-sftp.bin"), (Some("-O"), "via-scp.bin")] {
            let mut c = s.scp();
            if let Some(f) = flag {
                c.arg(f);
            }
            let out = c
                .arg(&src)
                .arg(format!(
                    "{}:{}",
                    s.target(),
                    drop.path().join(name).display()
                ))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "scp {flag:?}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                s.log()
            );
            assert!(
                std::fs::read(drop.path().join(name)).unwrap() == data,
                "{name} differs"
            );
        }
        // sftp, downloading it back.
        let back = src_dir.path().join("back.bin");
        let batch = src_dir.path().join("batch");
        std::fs::write(
            &batch,
            format!(
                "get {} {}\n",
                drop.path().join("via-scp.bin").display(),
                back.display()
            ),
        )
        .unwrap();
        let out = s
            .sftp()
            .arg("-b")
            .arg(&batch)
            .arg(s.target())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "sftp: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            std::fs::read(&back).unwrap() == data,
            "sftp download differs"
        );
    });
    let recs = backend.wait_completed(3, Duration::from_secs(30)).await;
    assert_eq!(recs.len(), 3);
    for rec in &recs {
        let m = &rec["metadata"];
        assert_eq!(m["kind"], "file_transfer", "{rec:#}");
        assert_eq!(m["exit_status"], 0);
        let moved = m["bytes_in"]
            .as_u64()
            .unwrap()
            .max(m["bytes_out"].as_u64().unwrap());
        assert!(moved >= 10 * 1024 * 1024, "{m}");
        // No frames: the duration is the transfer's own (it was 0), rounded up.
        assert!(rec["duration_seconds"].as_i64().unwrap() >= 1, "{rec:#}");
        assert!(
            chunk_indexes(rec).is_empty(),
            "file contents were recorded: {m}"
        );
    }
    stop_all(&mut daemon, &mut backend).await;
}

/// `enforce = true` with no daemon: the login is refused with the message; `enforce =
/// false`: it works. Recording switched off: the session runs, nothing is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_enforce_policy_and_recording_disabled() {
    let mut backend = Backend::new(false).await;
    let agent = Agent::new(&backend, "");
    let strict = agent.strict_config();
    let s = sshd::Sshd::start(&strict);
    let (code, text) = tokio::task::block_in_place(|| {
        sshd::interactive(&s, &["echo in\n", "exit\n"], Duration::ZERO)
    });
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("access refused"), "{text}");
    assert!(!text.contains("\nin"), "{text}");
    drop(s);

    let lax = agent.dir.path().join("lax.toml");
    std::fs::write(
        &lax,
        format!(
            "socket = \"{}\"\nenforce = false\n",
            agent.socket().display()
        ),
    )
    .unwrap();
    let s = sshd::Sshd::start(&lax);
    let out =
        tokio::task::block_in_place(|| s.ssh().arg(s.target()).arg("echo works").output().unwrap());
    assert_eq!(out.stdout, b"works\n");
    drop(s);

    // Now with a daemon, but the org switched recording off (enforce stays on).
    let mut daemon = agent.daemon();
    let sock = agent.socket();
    tokio::task::spawn_blocking(move || {
        wait_until("the org's settings", Duration::from_secs(10), || {
            ztna_recorder::status::query(&sock)
                .map(|s| s.recording_enabled == Some(false))
                .unwrap_or(false)
        })
    })
    .await
    .unwrap();
    let s = sshd::Sshd::start(&strict);
    let (code, text) = tokio::task::block_in_place(|| {
        sshd::interactive(&s, &["echo off-$((1+1))\n", "exit 4\n"], Duration::ZERO)
    });
    assert_eq!(code, Some(4), "{text}");
    assert!(text.contains("off-2"), "{text}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(backend.recordings().await.is_empty());
    stop_all(&mut daemon, &mut backend).await;
}

/// The backend down for the whole SSH session, then back: every chunk arrives, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_backend_down_then_back() {
    let mut backend = Backend::new_down(true).await;
    let agent = Agent::new(&backend, "chunk_max_bytes = 256\n");
    let mut daemon = agent.daemon();
    let s = sshd::Sshd::start(&agent.config());
    let cmd = "for i in $(seq 1 200); do echo line-$i; sleep 0.005; done";
    let before = time::OffsetDateTime::now_utc();
    let out = tokio::task::block_in_place(|| s.ssh().arg(s.target()).arg(cmd).output().unwrap());
    let after = time::OffsetDateTime::now_utc();
    assert!(out.status.success());
    let st = agent.status();
    assert!(st.chunks_waiting > 1, "{st:?}");
    // The upload comes well after the session: its times must still be the session's.
    tokio::time::sleep(Duration::from_secs(3)).await;
    backend.start().await;
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    let rec = &recs[0];
    let idx = chunk_indexes(rec);
    assert_eq!(idx, (0..idx.len() as u64).collect::<Vec<_>>());
    for c in rec["metadata"]["chunks"].as_array().unwrap() {
        assert!(c["bytes"].as_u64().unwrap() <= 256, "{c}");
    }
    let expected: String = (1..=200).map(|i| format!("line-{i}\n")).collect();
    assert_eq!(output_of(&backend.events_text(rec)), expected);
    let at = |k: &str| {
        time::OffsetDateTime::parse(
            rec[k].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    // To the microsecond, not the header's whole second (a session that started at 12:00:00.9
    // showed 12:00:00, and a 0.1 s session ended over a second after it started).
    assert!(
        at("started_at") >= before && at("started_at") <= after,
        "{before} {after} {rec:#}"
    );
    assert!(
        at("ended_at") >= at("started_at") && at("ended_at") <= after,
        "{after} {rec:#}"
    );
    stop_all(&mut daemon, &mut backend).await;
}

/// `ssh -tt` (the PTY path) past a full spool, without enforce: the session runs to its end,
/// and its truncated recording keeps the exit status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_pty_session_past_a_full_spool_keeps_its_exit_status() {
    let mut backend = Backend::new_down(true).await;
    let agent = Agent::new(&backend, "spool_max_bytes = 300000\n");
    let mut daemon = agent.daemon();
    let s = sshd::Sshd::start(&agent.config());
    let cmd = "head -c 600000 /dev/zero | tr '\\0' e; echo; exit 5";
    let out = s.exec_tt(cmd);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.len() >= 600_000, "{} bytes", out.stdout.len());
    backend.start().await;
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    let m = &recs[0]["metadata"];
    assert_eq!(m["truncated"], true, "{m}");
    assert_eq!(m["exit_status"], 5, "{m}");
    stop_all(&mut daemon, &mut backend).await;
}

/// Under enforce, a PTY session cut by a full spool ends, and all it showed the user before
/// the shell heard of the cut is on the recording (the relay shows output before it is
/// queued: what was queued and in flight used to be dropped, 486,051 bytes shown and 269,016
/// recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_enforce_cut_pty_session_shows_nothing_unrecorded() {
    let mut backend = Backend::new_down(true).await;
    let agent = Agent::new(&backend, "enforce = true\nspool_max_bytes = 8000000\n");
    let mut daemon = agent.daemon();
    let s = sshd::Sshd::start(&agent.config());
    let cmd = "echo first; sleep 0.5; head -c 16000000 /dev/zero | tr '\\0' d; echo; exit 3";
    let out = s.exec_tt(cmd);
    let all = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{all:.300}");
    // The shell's message starts on a new line ("\r\n", which the terminal, restored by then,
    // turns into "\r\r\n"): that is not the program's.
    let shown = &all[..all
        .find("ztna-recorder: the recording stopped")
        .expect("the shell's message")];
    let shown = shown.strip_suffix("\r\n").unwrap_or(shown);
    let shown = shown.strip_suffix('\r').unwrap_or(shown);
    assert!(
        shown.starts_with("first\r\n") && shown.len() < 10_000_000,
        "{} bytes shown",
        shown.len()
    );
    backend.start().await;
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    assert_eq!(recs[0]["metadata"]["truncated"], true, "{:#}", recs[0]);
    let recorded = output_of(&backend.events_text(&recs[0]));
    let at = shown
        .bytes()
        .zip(recorded.bytes())
        .position(|(a, b)| a != b)
        .unwrap_or(shown.len().min(recorded.len()));
    assert!(
        recorded.starts_with(shown),
        "{} bytes shown, {} recorded, first difference at {at}: shown {:?}, recorded {:?}",
        shown.len(),
        recorded.len(),
        &shown[at.saturating_sub(20)..(at + 40).min(shown.len())],
        &recorded[at.saturating_sub(20)..(at + 40).min(recorded.len())],
    );
    stop_all(&mut daemon, &mut backend).await;
}

/// With `spool_max_bytes_per_user`, one user streaming through a backend outage fills only
/// their own share: their session is cut, while another user's (here root's) is still recorded
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_one_user_fills_only_their_share_of_the_spool() {
    let mut backend = Backend::new_down(true).await;
    let agent = Agent::new(
        &backend,
        "spool_max_bytes = 3000000\nspool_max_bytes_per_user = 300000\nchunk_max_bytes = 65536\n",
    );
    let mut daemon = agent.daemon();
    let s = sshd::Sshd::start(&agent.config());
    let exec = |cmd: &str| {
        tokio::task::block_in_place(|| {
            s.ssh()
                .arg(s.target())
                .arg(cmd)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        })
    };
    let out = exec("head -c 600000 /dev/zero | tr '\\0' e; exit 4");
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(out.stdout.len(), 600_000);
    let spooled = chunk_bytes(&agent.spool());
    assert!(spooled <= 300_000, "{spooled} bytes spooled for one user");
    // Their next session is refused, without enforce too: a share a user can fill at will
    // (straight through the socket) must not be a way to go unrecorded. It used to run
    // unrecorded.
    let out = exec("echo should-not-run");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("share of the recording spool is full"),
        "{out:?}"
    );
    // Another user's session is still recorded, past that user's share.
    let (mut c, d) = FrameClient::start(&agent.socket());
    assert_eq!(d.mode, Mode::Record, "{d:?}");
    let line = "r".repeat(1000);
    let mut sent = String::new();
    for i in 0..400 {
        let l = event_line(f64::from(i) / 100.0, &line);
        c.events(&l);
        sent.push_str(&l);
    }
    c.end(0);

    backend.start().await;
    let recs = backend.wait_completed(2, Duration::from_secs(60)).await;
    let mine = recs
        .iter()
        .find(|r| r["metadata"]["uid"] == 0)
        .expect("root's recording");
    assert_eq!(mine["metadata"]["truncated"], Value::Null, "{mine:#}");
    let got = backend.events_text(mine);
    assert!(
        got == sent,
        "{} of {} bytes: {mine:#}",
        got.len(),
        sent.len()
    );
    let theirs = recs
        .iter()
        .find(|r| r["metadata"]["uid"] != 0)
        .expect("the test user's recording");
    assert_eq!(theirs["metadata"]["truncated"], true, "{theirs:#}");
    assert_eq!(
        theirs["metadata"]["truncated_reason"], "user's spool share full",
        "{theirs:#}"
    );
    assert_eq!(theirs["metadata"]["exit_status"], 4, "{theirs:#}");
    stop_all(&mut daemon, &mut backend).await;
}

/// An interactive SSH login through the agent, once its first command's output
/// (`echo WORD-$((2*21))`) is spooled: where the tests of a daemon failing mid-session begin.
struct SpooledLogin {
    backend: Backend,
    agent: Agent,
    daemon: DaemonProc,
    _sshd: sshd::Sshd,
    child: Child,
    stdin: std::process::ChildStdin,
}

impl SpooledLogin {
    async fn start(extra_config: &str, word: &str) -> SpooledLogin {
        let backend = Backend::new(true).await;
        let agent = Agent::new(&backend, extra_config);
        let daemon = agent.daemon();
        let sshd = sshd::Sshd::start(&agent.config());
        let mut child = sshd.login();
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(format!("echo {word}-$((2*21))\n").as_bytes())
            .unwrap();
        let needle = format!("{word}-42").into_bytes();
        wait_spooled(&agent, &backend, needle).await;
        SpooledLogin {
            backend,
            agent,
            daemon,
            _sshd: sshd,
            child,
            stdin,
        }
    }

    /// Types `lines`, then waits for the login to end: its exit status and all it printed.
    fn finish(self, lines: &[&str]) -> (Option<i32>, String, Backend, Agent) {
        let SpooledLogin {
            backend,
            agent,
            child,
            mut stdin,
            ..
        } = self;
        for l in lines {
            stdin.write_all(l.as_bytes()).unwrap();
        }
        // stdin stays open until the login ends: an EOF from the user would end it too.
        let out = tokio::task::block_in_place(|| child.wait_with_output().unwrap());
        drop(stdin);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text, backend, agent)
    }
}

/// The daemon back after a failure: the session is completed as interrupted, with `needle` in
/// what was recorded.
async fn restart_and_expect_interrupted(agent: &Agent, mut backend: Backend, needle: &str) {
    let mut daemon = agent.daemon();
    let recs = backend.wait_completed(1, Duration::from_secs(30)).await;
    let rec = &recs[0];
    assert_eq!(rec["metadata"]["interrupted"], true, "{rec:#}");
    assert!(output_of(&backend.events_text(rec)).contains(needle));
    stop_all(&mut daemon, &mut backend).await;
}

/// As above through sshd with a terminal: the daemon SIGKILLed, started again, and the rest
/// of the login (typed while it was down and after) recorded as the continuation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_daemon_killed_and_back_records_the_rest() {
    let SpooledLogin {
        mut backend,
        agent,
        mut daemon,
        _sshd,
        mut child,
        mut stdin,
    } = SpooledLogin::start("chunk_max_secs = 1\n", "crash").await;
    let mut tail = Tail::new(child.stdout.take().unwrap());
    let status = tokio::task::block_in_place(|| {
        tail.wait_for("crash-42");
        kill(&mut daemon, nix::sys::signal::Signal::SIGKILL);
        daemon.wait().unwrap();
        stdin.write_all(b"echo gap-$((2*4))\n").unwrap();
        tail.wait_for("gap-8");
        std::thread::sleep(Duration::from_millis(1000));
        daemon = agent.daemon();
        std::thread::sleep(Duration::from_millis(1500));
        stdin.write_all(b"echo back-$((5*5)); exit 4\n").unwrap();
        tail.wait_for("back-25");
        child.wait().unwrap()
    });
    let seen = String::from_utf8_lossy(&tail.all()).into_owned();
    assert_eq!(status.code(), Some(4), "{seen}");
    let recs = backend.wait_completed(2, Duration::from_secs(30)).await;
    let (first, second) = continued_pair(&recs);
    assert_eq!(first["metadata"]["interrupted"], true, "{first:#}");
    assert!(output_of(&backend.events_text(first)).contains("crash-42"));
    let rest = output_of(&backend.events_text(second));
    assert!(rest.contains("gap-8") && rest.contains("back-25"), "{rest}");
    assert_eq!(second["metadata"]["exit_status"], 4, "{second:#}");
    stop_all(&mut daemon, &mut backend).await;
}

/// The daemon SIGKILLed mid-session and restarted: what it spooled before the kill is on the
/// backend, the session completed with `interrupted: true`; the user's session went on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_daemon_killed_mid_session() {
    let mut l = SpooledLogin::start("chunk_max_secs = 1\n", "before").await;
    kill(&mut l.daemon, nix::sys::signal::Signal::SIGKILL);
    l.daemon.wait().unwrap();
    let (code, text, backend, agent) = l.finish(&["echo after-$((3*3))\n", "exit 5\n"]);
    assert_eq!(code, Some(5), "{text}");
    assert!(text.contains("after-9"), "the session went on: {text}");
    restart_and_expect_interrupted(&agent, backend, "before-42").await;
}

/// Waits until `needle` is in the spool or, uploaded already, among the backend's objects.
async fn wait_spooled(agent: &Agent, backend: &Backend, needle: Vec<u8>) {
    let dirs = [agent.spool(), backend.dir.path().join("objects")];
    tokio::task::spawn_blocking(move || {
        wait_until("the output in the spool", Duration::from_secs(20), || {
            dirs.iter().any(|d| tree_contains(d, &needle))
        })
    })
    .await
    .unwrap();
}

/// Whether any file under `dir` contains `needle`.
fn tree_contains(dir: &Path, needle: &[u8]) -> bool {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return false;
    };
    rd.flatten().any(|e| {
        let p = e.path();
        if p.is_dir() {
            tree_contains(&p, needle)
        } else {
            std::fs::read(&p)
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        }
    })
}

/// `enforce = true` and the daemon SIGKILLed mid-session: the session ends with a message and
/// exit status 1; what was spooled is completed as interrupted once the daemon is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_daemon_killed_mid_session_under_enforce_ends_it() {
    let mut l = SpooledLogin::start("chunk_max_secs = 1\nenforce = true\n", "strict").await;
    kill(&mut l.daemon, nix::sys::signal::Signal::SIGKILL);
    l.daemon.wait().unwrap();
    // The user types nothing more: the session must end by itself.
    let (code, text, backend, agent) = l.finish(&[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("session ended"), "{text}");
    restart_and_expect_interrupted(&agent, backend, "strict-42").await;
}

/// SIGTERM (an upgrade, a restart) with `enforce = true`: the daemon exits within seconds and
/// the user's session keeps running. Until the next daemon takes the session, nothing more is
/// shown (output held only in the session's memory would be lost if none came back); then what
/// was held is shown, and recorded as the continuation of the first recording, which is
/// completed as interrupted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sshd_daemon_sigterm_keeps_sessions_running() {
    let SpooledLogin {
        mut backend,
        agent,
        mut daemon,
        _sshd,
        mut child,
        mut stdin,
    } = SpooledLogin::start("chunk_max_secs = 1\nenforce = true\n", "term").await;
    let mut tail = Tail::new(child.stdout.take().unwrap());
    let status = tokio::task::block_in_place(|| {
        tail.wait_for("term-42");
        kill(&mut daemon, nix::sys::signal::Signal::SIGTERM);
        let t0 = Instant::now();
        assert!(daemon.wait().unwrap().success());
        assert!(t0.elapsed() < Duration::from_secs(5));
        // The program even ends while its output is held: it is shown once a daemon has it.
        stdin.write_all(b"echo still-$((3*3)); exit 6\n").unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        let seen = String::from_utf8_lossy(&tail.so_far()).into_owned();
        assert!(
            !seen.contains("still-"),
            "shown while no daemon had it: {seen}"
        );
        daemon = agent.daemon();
        tail.wait_for("still-9");
        child.wait().unwrap()
    });
    let seen = String::from_utf8_lossy(&tail.all()).into_owned();
    assert_eq!(status.code(), Some(6), "{seen}");
    let recs = backend.wait_completed(2, Duration::from_secs(30)).await;
    let (first, second) = continued_pair(&recs);
    assert_eq!(first["metadata"]["interrupted"], true, "{first:#}");
    assert!(output_of(&backend.events_text(first)).contains("term-42"));
    assert!(output_of(&backend.events_text(second)).contains("still-9"));
    assert_eq!(second["metadata"]["exit_status"], 6, "{second:#}");
    stop_all(&mut daemon, &mut backend).await;
}
