#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Load benchmark of `ztna-recorder-server`, run in-process over real HTTP on loopback:
//!
//! - `upload_chunk` with 4 KiB chunks from 32 concurrent clients (each on its own
//!   recording): calls/s, p50, p99; against a baseline measured in the same run, the
//!   cheapest authenticated call (`get_settings`) with the same 32 clients;
//! - `list` latency (limit 50) with 100,000 recordings in the org.
//!
//! For SQLite + local files (a temp dir) and for PostgreSQL + S3 (a fresh database on
//! ZTNA_TEST_PG_URL, a fresh bucket on ZTNA_TEST_S3_ENDPOINT).
//!
//! ```sh
//! bench/server-load.sh            # starts moto, runs both backends (release build)
//! cargo bench -p ztna-recorder-server --bench server_load -- --backend sqlite --seconds 10
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ztna_recorder_server::{App, Config, Role, S3Config, Seed};

const CLIENTS: usize = 32;
const CHUNK_BYTES: usize = 4096;

struct Args {
    backends: Vec<String>,
    seconds: u64,
    recordings: i64,
}

fn parse_args() -> Args {
    let mut a = Args {
        backends: vec!["sqlite".into(), "pg".into()],
        seconds: 10,
        recordings: 100_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--backend" => {
                let b = it.next().expect("--backend sqlite|pg|both");
                a.backends = match b.as_str() {
                    "both" => vec!["sqlite".into(), "pg".into()],
                    other => vec![other.to_string()],
                };
            }
            "--seconds" => a.seconds = it.next().unwrap().parse().unwrap(),
            "--recordings" => a.recordings = it.next().unwrap().parse().unwrap(),
            // cargo bench passes --bench
            _ => {}
        }
    }
    a
}

fn env_required(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set (bench/server-load.sh sets it)"))
}

struct Stats {
    n: usize,
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

fn stats(mut lat: Vec<Duration>, elapsed: Duration) -> Stats {
    lat.sort();
    let pick = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Stats {
        n: lat.len(),
        per_sec: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: pick(0.50),
        p99: pick(0.99),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// 4 KiB of asciicast event lines.
fn chunk_text() -> String {
    let mut s = String::with_capacity(CHUNK_BYTES);
    let mut t = 0.0f64;
    while s.len() < CHUNK_BYTES - 120 {
        t += 0.013;
        s.push_str(&format!(
            "[{t:.6}, \"o\", \"{}\\r\\n\"]\n",
            "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
        ));
    }
    while s.len() < CHUNK_BYTES - 1 {
        s.insert(s.len() - 8, 'x');
    }
    s
}

struct Target {
    name: &'static str,
    config: Config,
    _dir: tempfile::TempDir,
    db_url: String,
}

async fn target(name: &str) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::with_data_dir(dir.path());
    config.max_db_connections = 16;
    match name {
        "sqlite" => Target {
            name: "SQLite + local files",
            db_url: config.database_url(),
            config,
            _dir: dir,
        },
        "pg" => {
            let admin = env_required("ZTNA_TEST_PG_URL");
            let db = format!("ztna_bench_{}", uuid::Uuid::new_v4().simple());
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
                .await
                .unwrap();
            sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {db}").as_str())
                .await
                .unwrap();
            let (base, _) = admin.rsplit_once('/').unwrap();
            let url = format!("{base}/{db}");
            let endpoint = env_required("ZTNA_TEST_S3_ENDPOINT");
            let bucket = format!("ztna-bench-{}", uuid::Uuid::new_v4().simple());
            let r = reqwest::Client::new()
                .put(format!("{endpoint}/{bucket}"))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success());
            config.database_url = Some(url.clone());
            config.store_url = Some(format!("s3://{bucket}"));
            config.s3 = S3Config {
                endpoint: Some(endpoint),
                access_key: Some(std::env::var("ZTNA_TEST_S3_ACCESS_KEY").unwrap_or("test".into())),
                secret_key: Some(std::env::var("ZTNA_TEST_S3_SECRET_KEY").unwrap_or("test".into())),
                region: Some(std::env::var("ZTNA_TEST_S3_REGION").unwrap_or("us-east-1".into())),
            };
            Target {
                name: "PostgreSQL + S3 (moto)",
                db_url: url,
                config,
                _dir: dir,
            }
        }
        other => panic!("unknown backend {other}"),
    }
}

/// Runs `CLIENTS` loops of `make(client, i)` for `secs`; returns every latency.
async fn load<F>(http: &reqwest::Client, url: &str, token: &str, secs: u64, make: F) -> Stats
where
    F: Fn(usize, usize) -> Value + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (http, url, token, make) = (
            http.clone(),
            url.to_string(),
            token.to_string(),
            make.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0;
            while Instant::now() < end {
                let body = make(c, i).to_string();
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let st = r.status();
                let _ = r.bytes().await.unwrap();
                assert!(st.is_success(), "status {st}");
                lat.push(t.elapsed());
                i += 1;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    stats(all, start.elapsed())
}

/// Inserts `n` recordings into the org straight through SQL (the API would take minutes).
async fn seed(db_url: &str, org: &str, machine: &str, user: &str, n: i64) {
    if db_url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(db_url).await.unwrap();
        sqlx::query(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?1) \
             INSERT INTO session_recordings (id, org_id, machine_id, user_id, session_type, status, \
             started_at, ended_at, duration_seconds, metadata, r2_key) \
             SELECT lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || \
             substr(hex(randomblob(2)), 2) || '-a' || substr(hex(randomblob(2)), 2) || '-' || \
             hex(randomblob(6))), ?2, ?3, ?4, 'ssh', \
             CASE WHEN i % 10 = 0 THEN 'active' ELSE 'completed' END, \
             strftime('%Y-%m-%dT%H:%M:%f', 'now', '-' || i || ' seconds') || '000Z', \
             NULL, CASE WHEN i % 10 = 0 THEN NULL ELSE i % 600 END, '{}', NULL FROM s",
        )
        .bind(n)
        .bind(org)
        .bind(machine)
        .bind(user)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE").execute(&pool).await.unwrap();
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(db_url).await.unwrap();
        sqlx::query(
            "INSERT INTO session_recordings (id, org_id, machine_id, user_id, session_type, status, \
             started_at, duration_seconds) \
             SELECT gen_random_uuid(), $2::uuid, $3::uuid, $4::uuid, 'ssh', \
             CASE WHEN i % 10 = 0 THEN 'active' ELSE 'completed' END, \
             now() - make_interval(secs => i), CASE WHEN i % 10 = 0 THEN NULL ELSE i % 600 END \
             FROM generate_series(1, $1) AS i",
        )
        .bind(n)
        .bind(org)
        .bind(machine)
        .bind(user)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("ANALYZE").execute(&pool).await.unwrap();
        pool.close().await;
    }
}

/// One call's JSON answer.
async fn call(http: &reqwest::Client, url: &str, token: &str, body: &Value) -> Value {
    http.post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn run(name: &str, args: &Args) -> Vec<String> {
    let t = target(name).await;
    let app = App::open(t.config.clone()).await.unwrap();
    let Seed {
        org,
        admin,
        token,
        machine,
        ..
    } = app.seed("bench", "bench-host", true).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/api/session-recording",
        listener.local_addr().unwrap()
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(ztna_recorder_server::serve(listener, app.clone(), async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()
        .unwrap();
    let org_s = org.to_string();

    // Baseline: the cheapest authenticated call.
    let o = org_s.clone();
    let base = load(
        &http,
        &url,
        &token,
        args.seconds,
        move |_, _| json!({"action": "get_settings", "org_id": o}),
    )
    .await;

    // One recording per client.
    let mut sessions = Vec::new();
    for _ in 0..CLIENTS {
        let r: Value = call(&http, &url, &token, &json!({"action": "start", "org_id": org_s, "machine_id": machine.to_string(), "session_type": "ssh"})).await;
        sessions.push(r["data"]["session_id"].as_str().unwrap().to_string());
    }
    let chunk = chunk_text();
    let o = org_s.clone();
    let first = sessions[0].clone();
    let up = load(&http, &url, &token, args.seconds, move |c, i| {
        json!({"action": "upload_chunk", "org_id": o, "session_id": sessions[c], "chunk_index": i, "chunk_data": chunk})
    })
    .await;

    // `get` of one of those recordings: the row, and every chunk read back for its integrity.
    let mut lat = Vec::new();
    let mut chunks = 0;
    let start = Instant::now();
    for _ in 0..20 {
        let t0 = Instant::now();
        let r: Value = call(
            &http,
            &url,
            &token,
            &json!({"action": "get", "org_id": org_s, "session_id": first}),
        )
        .await;
        lat.push(t0.elapsed());
        assert_eq!(r["data"]["integrity"], "ok", "{r}");
        chunks = r["data"]["recording"]["metadata"]["chunks"]
            .as_array()
            .map_or(0, Vec::len);
    }
    let get = stats(lat, start.elapsed());

    // list at N recordings, in an org of its own (the upload recordings above have hundreds
    // of chunks each, which every list page would carry in metadata.chunks).
    let org = app.create_org("listing", true).await.unwrap();
    let org_s = org.to_string();
    app.create_user(org, "admin@bench.test", Role::Admin)
        .await
        .unwrap();
    let (machine, _) = app
        .register_machine(org, "bench-host", admin)
        .await
        .unwrap();
    seed(
        &t.db_url,
        &org_s,
        &machine.to_string(),
        &admin.to_string(),
        args.recordings,
    )
    .await;
    let mut list_rows = Vec::new();
    for (label, extra) in [
        ("list (limit 50)", json!({})),
        ("list status=completed", json!({"status": "completed"})),
        (
            "list machine_id",
            json!({"machine_id": machine.to_string()}),
        ),
        ("list offset 5000", json!({"offset": 5000})),
    ] {
        let mut lat = Vec::new();
        let start = Instant::now();
        for _ in 0..100 {
            let mut body = json!({"action": "list", "org_id": org_s, "limit": 50});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let t0 = Instant::now();
            let r: Value = call(&http, &url, &token, &body).await;
            lat.push(t0.elapsed());
            assert_eq!(r["data"]["recordings"].as_array().unwrap().len(), 50);
        }
        let s = stats(lat, start.elapsed());
        list_rows.push(format!(
            "| {} | {label} at {} recordings | {} | – | {} | {} |",
            t.name,
            args.recordings,
            s.n,
            ms(s.p50),
            ms(s.p99)
        ));
    }
    let _ = stop.send(());
    server.await.unwrap().unwrap();

    let mut rows = vec![
        format!(
            "| {} | baseline: get_settings, {CLIENTS} clients | {} | {:.0}/s | {} | {} |",
            t.name,
            base.n,
            base.per_sec,
            ms(base.p50),
            ms(base.p99)
        ),
        format!(
            "| {} | upload_chunk 4 KiB, {CLIENTS} clients | {} | {:.0}/s ({:.2}x baseline) | {} | {} |",
            t.name,
            up.n,
            up.per_sec,
            up.per_sec / base.per_sec,
            ms(up.p50),
            ms(up.p99)
        ),
        format!(
            "| {} | get (integrity of {chunks} chunks of 4 KiB), 1 client | {} | – | {} | {} |",
            t.name,
            get.n,
            ms(get.p50),
            ms(get.p99)
        ),
    ];
    rows.extend(list_rows);
    if name == "pg" {
        drop(app);
        let admin = env_required("ZTNA_TEST_PG_URL");
        let (_, db) = t.db_url.rsplit_once('/').unwrap();
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
            .await
            .unwrap();
        let _ = sqlx::Executor::execute(
            &mut conn,
            format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str(),
        )
        .await;
    }
    rows
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for b in &args.backends {
        eprintln!("benchmarking {b} …");
        rows.extend(rt.block_on(run(b, &args)));
    }
    println!("| backend | what | requests | throughput | p50 | p99 |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}
