//! The operational endpoints of a running server: `/healthz` and the Prometheus `/metrics`
//! (requests by route, action and status; chunk bytes stored; retention sweeps).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use std::time::Duration;
use ztna_recorder_server::{App, Config, Seed};

async fn get(url: &str) -> (u16, String, String) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, ct, r.text().await.unwrap())
}

fn uuid_of_zeros() -> &'static str {
    "00000000-0000-0000-0000-000000000000"
}

/// The value of the sample `name{labels}` (or bare `name`) in a Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_metrics_count_what_happened() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path());
    config.sweep_interval = Duration::from_secs(1);
    let app = App::open(config).await.unwrap();
    let Seed { node_key, .. } = app.seed("acme", "Linux-C", true).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ztna_recorder_server::serve(listener, app, async {
        let _ = stopped.await;
    }));

    let (status, _, body) = get(&format!("{base}/healthz")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );

    let http = reqwest::Client::new();
    let agent = format!("{base}/api/session-recording-agent");
    let post = |body: Value| {
        let http = http.clone();
        let agent = agent.clone();
        async move {
            let r = http.post(&agent).json(&body).send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap())
        }
    };
    let (s, v) = post(
        json!({"action": "start", "node_key": node_key, "session_type": "ssh",
        "header": {"version": 2, "width": 80, "height": 24}}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let session = v["data"]["session_id"].as_str().unwrap().to_string();
    let chunk = "[0.5, \"o\", \"hello\"]\n";
    for _ in 0..2 {
        let (s, v) = post(json!({"action": "upload_chunk", "node_key": node_key,
            "session_id": session, "chunk_index": 0, "chunk_data": chunk}))
        .await;
        assert_eq!(s, 200, "{v}");
    }
    let (s, _) = post(json!({"action": "config", "node_key": "00"})).await;
    assert_eq!(s, 401);
    let (s, _) = post(json!({"action": "no-such-action", "node_key": node_key})).await;
    assert_eq!(s, 400);

    // The dashboard's cast download is counted too (here refused: no token).
    let (s, _, _) = get(&format!(
        "{base}/api/session-recording/cast?org_id={}&session_id={session}",
        uuid_of_zeros()
    ))
    .await;
    assert_eq!(s, 401);

    // Let at least one periodic sweep run (every second here).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, ct, page) = get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let route = "route=\"/api/session-recording-agent\"";
    let req = |action: &str, status: u16| {
        sample(
            &page,
            &format!("ztna_http_requests_total{{{route},action=\"{action}\",status=\"{status}\"}}"),
        )
    };
    assert_eq!(req("start", 201), Some(1.0), "{page}");
    assert_eq!(req("upload_chunk", 200), Some(2.0), "{page}");
    assert_eq!(req("config", 401), Some(1.0), "{page}");
    assert_eq!(req("other", 400), Some(1.0), "{page}");
    assert!(!page.contains("no-such-action"), "{page}");
    assert_eq!(
        sample(
            &page,
            "ztna_http_requests_total{route=\"/api/session-recording/cast\",action=\"none\",status=\"401\"}"
        ),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "ztna_chunk_bytes_stored_total"),
        Some((2 * chunk.len()) as f64),
        "{page}"
    );
    assert_eq!(
        sample(&page, "ztna_chunks_stored_total"),
        Some(2.0),
        "{page}"
    );
    assert!(
        sample(&page, "ztna_sweep_runs_total").unwrap() >= 1.0,
        "{page}"
    );
    assert_eq!(
        sample(&page, "ztna_sweep_failures_total"),
        Some(0.0),
        "{page}"
    );
    assert_eq!(
        sample(&page, "ztna_sweep_deleted_recordings_total"),
        Some(0.0),
        "{page}"
    );
    // Every sample line is `name{labels} value` or `name value`; comments are HELP/TYPE.
    for l in page.lines() {
        assert!(
            l.starts_with("# HELP ztna_")
                || l.starts_with("# TYPE ztna_")
                || (l.starts_with("ztna_") && l.rsplit(' ').next().unwrap().parse::<f64>().is_ok()),
            "bad line {l:?}"
        );
    }

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// A full disk fails writes while it is full, and only then: once there is room again the
/// server writes as before, without a restart. (After SQLite rolled a transaction back by
/// itself on SQLITE_FULL, sqlx still counted it open on the one write connection, and every
/// later write failed with "begin_with at non-zero transaction depth" until a restart.)
/// Needs root, to mount a 2 MiB tmpfs as the data directory (CI runs as root).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_only_while_it_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(
        mount.success(),
        "this test mounts a small tmpfs and needs root (CI runs as root)"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(data.clone());

    let app = App::open(Config::with_data_dir(&data)).await.unwrap();
    let Seed { node_key, .. } = app.seed("acme", "Linux-C", true).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = format!(
        "http://{}/api/session-recording-agent",
        listener.local_addr().unwrap()
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ztna_recorder_server::serve(listener, app, async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let post = |body: Value| {
        let http = http.clone();
        let agent = agent.clone();
        async move {
            let r = http.post(&agent).json(&body).send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap())
        }
    };
    let start = json!({"action": "start", "node_key": node_key, "session_type": "ssh",
        "header": {"version": 2, "width": 80, "height": 24}});
    let (s, v) = post(start.clone()).await;
    assert_eq!(s, 201, "{v}");

    // Fill the disk to the last byte.
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&block[..1]).is_ok() {}
    }
    let mut refused = 0;
    for _ in 0..3 {
        let (s, v) = post(start.clone()).await;
        if s != 201 {
            assert_eq!(s, 500, "{v}");
            refused += 1;
        }
    }
    assert!(refused > 0, "a full disk refused nothing");

    std::fs::remove_file(&filler).unwrap();
    for _ in 0..3 {
        let (s, v) = post(start.clone()).await;
        assert_eq!(s, 201, "room again, yet: {v}");
        let session = v["data"]["session_id"].as_str().unwrap().to_string();
        let (s, v) = post(json!({"action": "upload_chunk", "node_key": node_key,
            "session_id": session, "chunk_index": 0, "chunk_data": "[0.5, \"o\", \"hi\"]\n"}))
        .await;
        assert_eq!(s, 200, "{v}");
        let (s, v) = post(json!({"action": "complete", "node_key": node_key,
            "session_id": session, "duration_seconds": 1}))
        .await;
        assert_eq!(s, 200, "{v}");
    }
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
