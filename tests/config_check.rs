//! `ztna-recorder config check` (the real binary) against the bundled backend running
//! in-process on a loopback port: a good config says OK; a wrong node key, an unreachable URL
//! and a malformed file each give their own one-line error and a non-zero exit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Output;
use ztna_recorder_server::{App, Config, Seed};

struct Backend {
    url: String,
    node_key: String,
    org: String,
    machine: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Backend {
    async fn start(recording_enabled: bool) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let app = App::open(Config::with_data_dir(dir.path())).await.unwrap();
        let Seed {
            org,
            machine,
            node_key,
            ..
        } = app
            .seed("acme", "Linux-C", recording_enabled)
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(ztna_recorder_server::serve(listener, app, async {
            let _ = stopped.await;
        }));
        Backend {
            url,
            node_key,
            org: org.to_string(),
            machine: machine.to_string(),
            stop: Some(stop),
            _dir: dir,
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A folder for a config, readable by every user as `/etc/ztna-recorder` is (`shell` reads
/// the config as the user who logs in, and `config check` says so when it could not).
fn config_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Writes `config.toml` (and the node key file, when given) into `dir`.
fn write_config(dir: &Path, server_url: &str, node_key: Option<&str>) -> PathBuf {
    let mut text = format!("server_url = \"{server_url}\"\n");
    if let Some(k) = node_key {
        let kf = dir.join("node-key");
        std::fs::write(&kf, format!("{k}\n")).unwrap();
        set_mode(&kf, 0o600);
        text.push_str(&format!("node_key_file = \"{}\"\n", kf.display()));
    }
    let f = dir.join("config.toml");
    std::fs::write(&f, text).unwrap();
    f
}

async fn check(config: &Path) -> Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_ztna-recorder"));
    cmd.args(["config", "check", "--config"]).arg(config);
    for (k, _) in std::env::vars() {
        if k.starts_with("ZTNA_RECORDER_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().await.unwrap()
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The run failed with exactly one line on stderr, which contains `needle`.
fn assert_one_error(out: &Output, needle: &str) -> String {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout {stdout:?} stderr {stderr:?}"
    );
    assert!(stdout.is_empty(), "stdout {stdout:?}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{stderr:?}");
    assert!(lines[0].contains(needle), "{needle:?} not in {stderr:?}");
    lines[0].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_config_says_ok_and_never_prints_the_key() {
    let b = Backend::start(true).await;
    let dir = config_dir();
    let f = write_config(dir.path(), &b.url, Some(&b.node_key));
    let out = check(&f).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout {stdout:?} stderr {stderr:?}"
    );
    assert!(stderr.is_empty(), "{stderr:?}");
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    assert!(stdout.starts_with("OK: "), "{stdout:?}");
    assert!(
        stdout.contains(&b.org) && stdout.contains(&b.machine),
        "{stdout:?}"
    );
    assert!(stdout.contains("recording enabled"), "{stdout:?}");
    assert!(!stdout.contains(&b.node_key) && !stderr.contains(&b.node_key));
    // A node key other users can read still works, with a warning.
    set_mode(&dir.path().join("node-key"), 0o644);
    let out = check(&f).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr:?}");
    assert!(
        stderr.starts_with("warning: ") && stderr.contains("mode 644"),
        "{stderr:?}"
    );
    assert!(!stderr.contains(&b.node_key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_switched_off_is_ok_with_a_warning() {
    let b = Backend::start(false).await;
    let dir = config_dir();
    let f = write_config(dir.path(), &b.url, Some(&b.node_key));
    let out = check(&f).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr:?}");
    assert!(text(&out.stdout).contains("recording disabled"));
    assert_eq!(stderr.lines().count(), 1, "{stderr:?}");
    assert!(stderr.starts_with("warning: ") && stderr.contains("recording_enabled setting"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_node_key_is_one_line() {
    let b = Backend::start(true).await;
    let dir = config_dir();
    let wrong = "0".repeat(128);
    let f = write_config(dir.path(), &b.url, Some(&wrong));
    let line = assert_one_error(&check(&f).await, "rejected the node key (UNAUTHORIZED)");
    assert!(line.contains(&b.url), "{line}");
    assert!(!line.contains(&wrong));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_url_is_one_line() {
    let b = Backend::start(true).await;
    // A loopback port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let dir = config_dir();
    let f = write_config(dir.path(), &url, Some(&b.node_key));
    let line = assert_one_error(&check(&f).await, "cannot reach the backend at");
    assert!(line.contains(&url), "{line}");
    assert!(!line.contains(&b.node_key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_file_is_one_line_with_its_position() {
    let dir = config_dir();
    let f = dir.path().join("config.toml");
    std::fs::write(&f, "server_url = \"http://127.0.0.1:1\"\nenforce = \n").unwrap();
    let line = assert_one_error(&check(&f).await, "not valid TOML at line 2");
    assert!(line.contains(&f.display().to_string()), "{line}");
}

/// A TOML error on the node key's own line (its quotes forgotten): no command says the key,
/// although the parser's own message quotes the line (it went to the journal from `daemon`,
/// and to the user's terminal from `shell`).
#[test]
fn a_syntax_error_on_the_node_keys_line_never_shows_the_key() {
    let dir = config_dir();
    let f = dir.path().join("config.toml");
    let key = "ab".repeat(32);
    for line in [format!("node_key = {key}"), format!("node_key = \"{key}")] {
        std::fs::write(&f, format!("server_url = \"http://127.0.0.1:1\"\n{line}\n")).unwrap();
        for args in [
            vec!["daemon", "--config"],
            vec!["status", "--config"],
            vec!["config", "check", "--config"],
        ] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_ztna-recorder"))
                .args(&args)
                .arg(&f)
                .env("ZTNA_RECORDER_LOG", "trace")
                .output()
                .unwrap();
            let all = text(&out.stdout) + &text(&out.stderr);
            assert!(!out.status.success(), "{args:?}: {all}");
            assert!(all.contains("not valid TOML at line 2"), "{args:?}: {all}");
            assert!(!all.contains(&key[..16]), "{args:?} shows the key: {all}");
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ztna-recorder"))
            .args(["shell", "--config"])
            .arg(&f)
            .env("SSH_ORIGINAL_COMMAND", "true")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let all = text(&out.stdout) + &text(&out.stderr);
        assert!(!all.contains(&key[..16]), "shell shows the key: {all}");
    }
}

/// A `server_url` no request can be made of stops the daemon at its start with a message
/// naming it (it ran, and logged "builder error" at every upload).
#[test]
fn a_server_url_that_is_no_url_stops_the_daemon() {
    let dir = config_dir();
    for url in ["http://exa mple", "https://[::1"] {
        let f = write_config(dir.path(), url, Some(&"ab".repeat(32)));
        let mut conf = std::fs::read_to_string(&f).unwrap();
        conf.push_str(&format!(
            "spool_dir = \"{}\"\nsocket = \"{}\"\n",
            dir.path().join("spool").display(),
            dir.path().join("sock").display()
        ));
        std::fs::write(&f, conf).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ztna-recorder"))
            .args(["daemon", "--config"])
            .arg(&f)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A daemon that took the URL runs on: that is the failure, not a hang.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > until {
                let _ = child.kill();
                panic!("{url}: the daemon started");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{url}: {err}");
        assert!(
            err.contains("is not a usable URL") && err.contains(url),
            "{url}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_problem_gets_its_own_line() {
    let dir = config_dir();
    let f = dir.path().join("config.toml");
    // No server_url (a misspelt key instead) and a missing node key file: three independent
    // problems (a wrongly typed value is caught by the loader first).
    std::fs::write(
        &f,
        format!(
            "node_key_file = \"{}\"\nserver_urll = \"http://x\"\n",
            dir.path().join("absent").display()
        ),
    )
    .unwrap();
    let out = check(&f).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr:?}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(errors.len(), 3, "{stderr:?}");
    assert!(
        errors
            .iter()
            .any(|l| l.contains("unknown key `server_urll`")),
        "{stderr:?}"
    );
    assert!(
        errors.iter().any(|l| l.contains("server_url is not set")),
        "{stderr:?}"
    );
    assert!(
        errors
            .iter()
            .any(|l| l.contains("cannot read the node key")),
        "{stderr:?}"
    );
    assert!(warnings.is_empty(), "{stderr:?}");
    // A wrong type is the loader's one error, naming the key.
    std::fs::write(&f, "server_url = \"http://x\"\nchunk_max_secs = \"ten\"\n").unwrap();
    let line = assert_one_error(&check(&f).await, "chunk_max_secs");
    // Each names the file the value came from, as every other message does.
    let file = f.display().to_string();
    assert!(line.contains(&file), "{line}");
    // A duration no deadline can be that far ahead of (the daemon panicked on its first
    // chunk with it).
    for bad in [
        "enforce = \"yes\"",
        "chunk_max_bytes = 0",
        "chunk_max_secs = 9000000000000000000",
        "drain_secs = 315360001",
    ] {
        std::fs::write(&f, format!("server_url = \"http://x\"\n{bad}\n")).unwrap();
        let key = bad.split(' ').next().unwrap();
        let line = assert_one_error(&check(&f).await, key);
        assert!(line.contains(&file), "{line}");
    }
    // Several bad values in one file: each its own line, not only the first.
    std::fs::write(
        &f,
        "server_url = \"http://x\"\nchunk_max_bytes = \"big\"\nenforce = \"yes\"\nspool_max_bytes = -5\nchunk_max_secs = 0\n",
    )
    .unwrap();
    let out = check(&f).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr:?}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 4, "{stderr:?}");
    for key in [
        "chunk_max_bytes",
        "enforce",
        "spool_max_bytes",
        "chunk_max_secs",
    ] {
        assert!(
            errors.iter().any(|l| l.contains(key) && l.contains(&file)),
            "{key}: {stderr:?}"
        );
    }
}

/// `status` whose reader went away (`| head -1`, `| true`) exits as it would have, quietly:
/// it used to panic ("failed printing to stdout: Broken pipe", exit 101).
#[test]
fn status_into_a_closed_pipe_does_not_panic() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ztna-recorder"))
        .args(["status", "--json", "--socket", "/nonexistent/recorder.sock"])
        .env_remove("ZTNA_RECORDER_CONFIG")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr:?}");
    assert!(!stderr.contains("panicked"), "{stderr:?}");
}

/// Under enforce, limits too small to keep 512 KiB per session for its output in flight are
/// warned about, each by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_with_small_spool_limits_is_warned_about() {
    let dir = config_dir();
    let f = write_config(dir.path(), "http://127.0.0.1:9", Some(&"a".repeat(128)));
    let mut conf = std::fs::read_to_string(&f).unwrap();
    conf.push_str("enforce = true\nspool_max_bytes = 4000000\nspool_max_bytes_per_user = 2000000\nchunk_max_bytes = 65536\n");
    std::fs::write(&f, conf).unwrap();
    let stderr = text(&check(&f).await.stderr);
    for key in ["spool_max_bytes under", "spool_max_bytes_per_user under"] {
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with("warning: ") && l.contains(key)),
            "{key}: {stderr}"
        );
    }
}

/// A spool_dir the daemon could not create at its start is found now, not when it fails.
/// A `socket` that names something other than a socket (here, by a slip, the node key): the
/// daemon used to delete it as a stale socket, silently. Now `config check` and the daemon
/// refuse, and the file stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_path_that_is_not_a_socket_is_left_alone() {
    let dir = config_dir();
    let f = write_config(dir.path(), "http://127.0.0.1:9", Some(&"a".repeat(128)));
    let key = dir.path().join("node-key");
    let mut conf = std::fs::read_to_string(&f).unwrap();
    conf.push_str(&format!(
        "socket = \"{}\"\nspool_dir = \"{}\"\n",
        key.display(),
        dir.path().join("spool").display()
    ));
    std::fs::write(&f, conf).unwrap();
    assert_one_error(&check(&f).await, "is not a socket");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ztna-recorder"))
        .args(["daemon", "--config"])
        .arg(&f)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("is not a socket"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        format!("{}\n", "a".repeat(128))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_dir_that_cannot_be_created_is_an_error() {
    let dir = config_dir();
    let f = write_config(dir.path(), "http://127.0.0.1:9", Some(&"a".repeat(128)));
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let mut text = std::fs::read_to_string(&f).unwrap();
    text.push_str(&format!("spool_dir = \"{}/spool\"\n", file.display()));
    std::fs::write(&f, text).unwrap();
    let line = assert_one_error(&check(&f).await, "cannot be created");
    assert!(line.contains("is not a directory"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_other_users_cannot_read_is_an_error() {
    use std::os::unix::fs::PermissionsExt as _;
    let b = Backend::start(true).await;
    let dir = config_dir();
    let f = write_config(dir.path(), &b.url, Some(&b.node_key));
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_one_error(&check(&f).await, "other users cannot read it");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let line = assert_one_error(&check(&f).await, "other users cannot enter");
    assert!(line.contains(&dir.path().display().to_string()), "{line}");
}
