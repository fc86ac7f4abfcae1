#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The server over real HTTP, started on port 0. Every scenario runs twice: on SQLite + a
//! local directory, and on PostgreSQL (a fresh database per run, from ZTNA_TEST_PG_URL) +
//! S3 (a fresh bucket per run on the server at ZTNA_TEST_S3_ENDPOINT). Missing services make
//! the PostgreSQL runs fail, never skip.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use ztna_recorder_server::{App, Config, Role, S3Config, SettingsUpdate};

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Backend {
    Sqlite,
    PgS3,
}

fn env_required(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests with scripts/test.sh (it starts PostgreSQL and an S3 server)")
    })
}

struct S3Test {
    endpoint: String,
    bucket: String,
    access_key: String,
    secret_key: String,
    region: String,
}

impl S3Test {
    async fn fresh() -> S3Test {
        let endpoint = env_required("ZTNA_TEST_S3_ENDPOINT");
        let bucket = format!("ztna-test-{}", uuid::Uuid::new_v4().simple());
        // moto accepts an unsigned bucket creation.
        let r = reqwest::Client::new()
            .put(format!("{endpoint}/{bucket}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("S3 server at {endpoint} unreachable: {e}"));
        assert!(
            r.status().is_success(),
            "cannot create bucket: {}",
            r.status()
        );
        S3Test {
            endpoint,
            bucket,
            access_key: std::env::var("ZTNA_TEST_S3_ACCESS_KEY").unwrap_or_else(|_| "test".into()),
            secret_key: std::env::var("ZTNA_TEST_S3_SECRET_KEY").unwrap_or_else(|_| "test".into()),
            region: std::env::var("ZTNA_TEST_S3_REGION").unwrap_or_else(|_| "us-east-1".into()),
        }
    }
}

/// Creates a fresh PostgreSQL database; returns its URL.
async fn fresh_pg_database() -> String {
    let admin_url = env_required("ZTNA_TEST_PG_URL");
    let name = format!("ztna_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at ZTNA_TEST_PG_URL unreachable: {e}"));
    sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
        .await
        .unwrap();
    let (base, _) = admin_url
        .rsplit_once('/')
        .expect("ZTNA_TEST_PG_URL has a database path");
    format!("{base}/{name}")
}

/// Where a test's server keeps its data.
struct Stores {
    dir: tempfile::TempDir,
    database_url: Option<String>,
    s3: Option<S3Test>,
}

impl Stores {
    async fn new(backend: Backend) -> Stores {
        let dir = tempfile::tempdir().unwrap();
        match backend {
            Backend::Sqlite => Stores {
                dir,
                database_url: None,
                s3: None,
            },
            Backend::PgS3 => Stores {
                dir,
                database_url: Some(fresh_pg_database().await),
                s3: Some(S3Test::fresh().await),
            },
        }
    }

    /// Drops the run's PostgreSQL database (closing what still holds it).
    async fn drop_database(&self) {
        if let Some(url) = &self.database_url {
            let (_, name) = url.rsplit_once('/').unwrap();
            let admin_url = env_required("ZTNA_TEST_PG_URL");
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
                .await
                .unwrap();
            sqlx::Executor::execute(
                &mut conn,
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str(),
            )
            .await
            .unwrap();
        }
    }

    fn config(&self) -> Config {
        let mut c = Config::with_data_dir(self.dir.path());
        c.database_url = self.database_url.clone();
        // Short, so the stalled-body test does not wait the default 30 s.
        c.request_idle_timeout = std::time::Duration::from_secs(3);
        if let Some(s3) = &self.s3 {
            c.store_url = Some(format!("s3://{}", s3.bucket));
            c.s3 = S3Config {
                endpoint: Some(s3.endpoint.clone()),
                access_key: Some(s3.access_key.clone()),
                secret_key: Some(s3.secret_key.clone()),
                region: Some(s3.region.clone()),
            };
        }
        c
    }

    /// The flags that point the binary at the same stores.
    fn cli_args(&self) -> Vec<String> {
        let mut a = vec![
            "--data-dir".to_string(),
            self.dir.path().display().to_string(),
        ];
        if let Some(db) = &self.database_url {
            a.extend(["--database".to_string(), db.clone()]);
        }
        if let Some(s3) = &self.s3 {
            a.extend([
                "--store".to_string(),
                format!("s3://{}", s3.bucket),
                "--s3-endpoint".to_string(),
                s3.endpoint.clone(),
                "--s3-access-key".to_string(),
                s3.access_key.clone(),
                "--s3-secret-key".to_string(),
                s3.secret_key.clone(),
                "--s3-region".to_string(),
                s3.region.clone(),
            ]);
        }
        a
    }

    fn local_object_path(&self, key: &str) -> PathBuf {
        self.dir.path().join("objects").join(key)
    }

    /// The bucket, through the same client library the server uses (moto refuses unsigned
    /// object requests).
    fn bucket(&self) -> Option<object_store::aws::AmazonS3> {
        self.s3.as_ref().map(|s3| {
            object_store::aws::AmazonS3Builder::new()
                .with_bucket_name(&s3.bucket)
                .with_endpoint(&s3.endpoint)
                .with_access_key_id(&s3.access_key)
                .with_secret_access_key(&s3.secret_key)
                .with_region(&s3.region)
                .with_allow_http(true)
                .build()
                .unwrap()
        })
    }

    async fn get_object(&self, key: &str) -> Option<Vec<u8>> {
        use object_store::ObjectStore as _;
        match self.bucket() {
            None => std::fs::read(self.local_object_path(key)).ok(),
            Some(b) => match b.get(&object_store::path::Path::from(key)).await {
                Ok(r) => Some(r.bytes().await.unwrap().to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("GET {key}: {e}"),
            },
        }
    }

    async fn put_object(&self, key: &str, data: &[u8]) {
        use object_store::ObjectStore as _;
        match self.bucket() {
            None => std::fs::write(self.local_object_path(key), data).unwrap(),
            Some(b) => {
                b.put(&object_store::path::Path::from(key), data.to_vec().into())
                    .await
                    .unwrap();
            }
        }
    }

    async fn delete_object(&self, key: &str) {
        use object_store::ObjectStore as _;
        match self.bucket() {
            None => std::fs::remove_file(self.local_object_path(key)).unwrap(),
            Some(b) => b
                .delete(&object_store::path::Path::from(key))
                .await
                .unwrap(),
        }
    }

    /// Moves a recording's start back by `days` (the API cannot, retention tests need it).
    async fn backdate(&self, session: &str, days: i64) {
        match &self.database_url {
            None => {
                let url = format!(
                    "sqlite://{}",
                    self.dir.path().join("recordings.db").display()
                );
                let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
                // As a person would with the sqlite3 shell: SQLite's own time format
                // (`2026-03-17 10:00:00`), which the server must read back.
                sqlx::query(
                    "UPDATE session_recordings SET started_at = datetime(started_at, ?) WHERE id = ?",
                )
                .bind(format!("-{days} days"))
                .bind(session)
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
            }
            Some(url) => {
                let pool = sqlx::PgPool::connect(url).await.unwrap();
                sqlx::query(
                    "UPDATE session_recordings SET started_at = started_at - make_interval(days => $1) WHERE id = $2::uuid",
                )
                .bind(days as i32)
                .bind(session)
                .execute(&pool)
                .await
                .unwrap();
                pool.close().await;
            }
        }
    }
    /// Runs one SQL statement on the server's database, as an operator at its shell would.
    async fn sql(&self, statement: &str) {
        match &self.database_url {
            None => {
                let url = format!(
                    "sqlite://{}",
                    self.dir.path().join("recordings.db").display()
                );
                let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
                sqlx::raw_sql(statement).execute(&pool).await.unwrap();
                pool.close().await;
            }
            Some(url) => {
                let pool = sqlx::PgPool::connect(url).await.unwrap();
                sqlx::raw_sql(statement).execute(&pool).await.unwrap();
                pool.close().await;
            }
        }
    }

    /// A recording's `metadata` column as the database holds it.
    async fn metadata_column(&self, session: &str) -> Value {
        match &self.database_url {
            None => {
                let url = format!(
                    "sqlite://{}",
                    self.dir.path().join("recordings.db").display()
                );
                let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
                let text: String =
                    sqlx::query_scalar("SELECT metadata FROM session_recordings WHERE id = ?")
                        .bind(session)
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                pool.close().await;
                serde_json::from_str(&text).unwrap()
            }
            Some(url) => {
                let pool = sqlx::PgPool::connect(url).await.unwrap();
                let v: Value = sqlx::query_scalar(
                    "SELECT metadata FROM session_recordings WHERE id = $1::uuid",
                )
                .bind(session)
                .fetch_one(&pool)
                .await
                .unwrap();
                pool.close().await;
                v
            }
        }
    }

    /// Every object key under `prefix`.
    async fn object_keys(&self, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt as _;
        use object_store::ObjectStore as _;
        match self.bucket() {
            None => {
                let root = self.dir.path().join("objects");
                let mut keys = Vec::new();
                let mut dirs = vec![root.join(prefix)];
                while let Some(d) = dirs.pop() {
                    let Ok(entries) = std::fs::read_dir(&d) else {
                        continue;
                    };
                    for e in entries {
                        let p = e.unwrap().path();
                        if p.is_dir() {
                            dirs.push(p);
                        } else {
                            keys.push(p.strip_prefix(&root).unwrap().display().to_string());
                        }
                    }
                }
                keys
            }
            Some(b) => b
                .list(Some(&object_store::path::Path::from(prefix)))
                .map_ok(|m| m.location.to_string())
                .try_collect()
                .await
                .unwrap(),
        }
    }
}

/// A server running in-process on port 0, with an org ready to record.
struct Server {
    stores: Stores,
    app: App,
    base: String,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    fx: Fixture,
}

/// org (feature on, recording on), an admin, a member, the member's machine "Linux-C".
struct Fixture {
    org: String,
    admin: String,
    admin_token: String,
    member: String,
    member_token: String,
    machine: String,
    node_key: String,
}

impl Server {
    async fn start(backend: Backend) -> Server {
        Server::start_with(Stores::new(backend).await).await
    }

    async fn start_with(stores: Stores) -> Server {
        Server::start_config(stores, |_| {}).await
    }

    /// As `start_with`, with the configuration changed by `tweak` first.
    async fn start_config(stores: Stores, tweak: impl FnOnce(&mut Config)) -> Server {
        let mut config = stores.config();
        tweak(&mut config);
        let app = App::open(config).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(ztna_recorder_server::serve(listener, app.clone(), async {
            let _ = stopped.await;
        }));
        let fx = make_fixture(&app, "acme").await;
        Server {
            stores,
            app,
            base,
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
            fx,
        }
    }

    async fn user(&self, token: Option<&str>, body: Value) -> (u16, Value) {
        self.raw_user(token, body.to_string().into_bytes()).await
    }

    async fn raw_agent(&self, body: Vec<u8>) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/api/session-recording-agent", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    async fn raw_user(&self, token: Option<&str>, body: Vec<u8>) -> (u16, Value) {
        let mut r = self
            .http
            .post(format!("{}/api/session-recording", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    async fn admin(&self, body: Value) -> (u16, Value) {
        let t = self.fx.admin_token.clone();
        self.user(Some(&t), body).await
    }

    async fn member(&self, body: Value) -> (u16, Value) {
        let t = self.fx.member_token.clone();
        self.user(Some(&t), body).await
    }

    async fn agent(&self, body: Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}/api/session-recording-agent", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    /// Starts a recording on the fixture's machine as the member; returns its id.
    async fn start_recording(&self) -> String {
        let (s, b) = self
            .member(json!({"action": "start", "org_id": self.fx.org, "machine_id": self.fx.machine, "session_type": "ssh"}))
            .await;
        assert_eq!(s, 201, "{b}");
        b["data"]["session_id"].as_str().unwrap().to_string()
    }

    async fn get(&self, session: &str) -> Value {
        let (s, b) = self
            .admin(json!({"action": "get", "org_id": self.fx.org, "session_id": session}))
            .await;
        assert_eq!(s, 200, "{b}");
        b["data"].clone()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
        drop(self.app);
        self.stores.drop_database().await;
    }
}

async fn make_fixture(app: &App, name: &str) -> Fixture {
    let org = app.create_org(name, true).await.unwrap();
    let admin = app
        .create_user(org, &format!("admin@{name}-{org}.test"), Role::Admin)
        .await
        .unwrap();
    let member = app
        .create_user(org, &format!("member@{name}-{org}.test"), Role::Member)
        .await
        .unwrap();
    let (machine, node_key) = app.register_machine(org, "Linux-C", member).await.unwrap();
    app.update_settings(
        org,
        SettingsUpdate {
            recording_enabled: Some(true),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    Fixture {
        org: org.to_string(),
        admin: admin.to_string(),
        admin_token: app.issue_token(admin, 3600).await.unwrap(),
        member: member.to_string(),
        member_token: app.issue_token(member, 3600).await.unwrap(),
        machine: machine.to_string(),
        node_key,
    }
}

fn code(b: &Value) -> &str {
    b["error"]["code"].as_str().unwrap_or("<none>")
}

#[track_caller]
fn assert_err(r: (u16, Value), status: u16, c: &str) {
    assert_eq!(r.0, status, "{}", r.1);
    assert_eq!(r.1["success"], false, "{}", r.1);
    assert_eq!(r.1["data"], Value::Null, "{}", r.1);
    assert_eq!(code(&r.1), c, "{}", r.1);
    assert!(r.1["error"]["message"].is_string());
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// Runs a scenario on both backends.
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite_files() {
                let s = super::Server::start(super::Backend::Sqlite).await;
                super::scenarios::$name(&s).await;
                s.stop().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_s3() {
                let s = super::Server::start(super::Backend::PgS3).await;
                super::scenarios::$name(&s).await;
                s.stop().await;
            }
        }
    };
}

both!(st1_settings);
both!(st2_start_complete);
both!(st3_upload_chunks);
both!(st4_list);
both!(st5_agent_report);
both!(agent_lifecycle);
both!(agent_start_sent_again);
both!(a_refused_report_leaves_no_objects);
both!(error_codes_and_order);
both!(auth_failures);
both!(cross_org);
both!(roles);
both!(machine_deletion);
both!(concurrent_chunks);
both!(delete_and_cleanup);
both!(a_sweep_on_the_wrong_store_deletes_nothing);
both!(integrity);
both!(admin_cli);
both!(races);
both!(complete_races);
both!(hostile_values);
both!(agent_times);
both!(strict_input);

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

mod scenarios {
    use super::*;

    pub async fn st1_settings(s: &Server) {
        let org = &s.fx.org;
        // A fresh org: the defaults (the fixture switched recording on; use a new org).
        let org2 = s.app.create_org("fresh", true).await.unwrap();
        let admin2 = s
            .app
            .create_user(org2, &format!("a@{org2}.test"), Role::Admin)
            .await
            .unwrap();
        let t2 = s.app.issue_token(admin2, 600).await.unwrap();
        let (st, b) = s
            .user(
                Some(&t2),
                json!({"action": "get_settings", "org_id": org2.to_string()}),
            )
            .await;
        assert_eq!(st, 200);
        assert_eq!(
            b,
            json!({"success": true, "data": {"recording_enabled": false, "retention_days": 90, "storage_mode": "platform"}, "error": null})
        );
        let (st, b) = s
            .user(
                Some(&t2),
                json!({"action": "update_settings", "org_id": org2.to_string(), "recording_enabled": true, "retention_days": 30, "storage_mode": "platform"}),
            )
            .await;
        assert_eq!((st, &b["data"]), (200, &json!({"updated": true})));
        let (_, b) = s
            .user(
                Some(&t2),
                json!({"action": "get_settings", "org_id": org2.to_string()}),
            )
            .await;
        assert_eq!(
            b["data"],
            json!({"recording_enabled": true, "retention_days": 30, "storage_mode": "platform"})
        );
        // Clamp.
        for (given, kept) in [(0, 1), (400, 365), (-5, 1), (365, 365), (1, 1)] {
            let (st, _) = s
                .admin(json!({"action": "update_settings", "org_id": org, "retention_days": given}))
                .await;
            assert_eq!(st, 200);
            let (_, b) = s
                .member(json!({"action": "get_settings", "org_id": org}))
                .await;
            assert_eq!(b["data"]["retention_days"], kept, "retention {given}");
        }
        // Partial update keeps the rest; custom storage mode.
        s.admin(json!({"action": "update_settings", "org_id": org, "storage_mode": "custom"}))
            .await;
        let (_, b) = s
            .member(json!({"action": "get_settings", "org_id": org}))
            .await;
        assert_eq!(
            b["data"],
            json!({"recording_enabled": true, "retention_days": 1, "storage_mode": "custom"})
        );
        // Members read, only admins write; bad values are INVALID_FIELD and change nothing.
        assert_err(
            s.member(json!({"action": "update_settings", "org_id": org, "retention_days": 5}))
                .await,
            403,
            "FORBIDDEN",
        );
        assert_err(
            s.admin(json!({"action": "update_settings", "org_id": org, "storage_mode": "mars"}))
                .await,
            400,
            "INVALID_FIELD",
        );
        assert_err(
            s.admin(
                json!({"action": "update_settings", "org_id": org, "recording_enabled": "yes"}),
            )
            .await,
            400,
            "INVALID_FIELD",
        );
        assert_err(
            s.admin(json!({"action": "update_settings", "org_id": org, "retention_days": "ten"}))
                .await,
            400,
            "INVALID_FIELD",
        );
        let (_, b) = s
            .member(json!({"action": "get_settings", "org_id": org}))
            .await;
        assert_eq!(b["data"]["storage_mode"], "custom");
    }

    pub async fn st2_start_complete(s: &Server) {
        let org = &s.fx.org;
        let id = s.start_recording().await;
        let (st, b) = s
            .member(json!({"action": "complete", "org_id": org, "session_id": id, "duration_seconds": 120, "recording_url": "https://example.com/recording.cast", "transcript_lines": 42}))
            .await;
        assert_eq!(st, 200, "{b}");
        assert_eq!(
            b,
            json!({"success": true, "data": {"completed": id}, "error": null})
        );
        let d = s.get(&id).await;
        let r = &d["recording"];
        assert_eq!(r["id"], id.as_str());
        assert_eq!(r["status"], "completed");
        assert_eq!(r["duration_seconds"], 120);
        let key = format!("session-recordings/{org}/{id}/recording.json");
        assert_eq!(r["r2_key"], key.as_str());
        assert_eq!(r["machine_name"], "Linux-C");
        assert_eq!(r["machine_id"], s.fx.machine.as_str());
        assert_eq!(r["user_id"], s.fx.member.as_str());
        assert_eq!(r["org_id"], org.as_str());
        assert_eq!(r["session_type"], "ssh");
        assert!(r["ended_at"].as_str().unwrap().ends_with('Z'));
        for col in [
            "id",
            "org_id",
            "machine_id",
            "user_id",
            "session_type",
            "status",
            "started_at",
            "ended_at",
            "duration_seconds",
            "metadata",
            "r2_key",
            "machine_name",
        ] {
            assert!(r.get(col).is_some(), "column {col} missing");
        }
        let r2 = &d["r2_data"];
        assert_eq!(r2["session_id"], id.as_str());
        assert_eq!(r2["duration_seconds"], 120);
        assert_eq!(r2["recording_url"], "https://example.com/recording.cast");
        assert_eq!(r2["transcript_lines"], 42);
        let completed_at = r2["completed_at"].as_str().unwrap();
        assert!(time::OffsetDateTime::parse(
            completed_at,
            &time::format_description::well_known::Rfc3339
        )
        .is_ok());
        // The summary really is in the store.
        let stored: Value =
            serde_json::from_slice(&s.stores.get_object(&key).await.unwrap()).unwrap();
        assert_eq!(stored["session_id"], id.as_str());
        assert_eq!(stored["chunks"], json!([]));
        // Completing twice, or a chunk after completion, is a CONFLICT.
        assert_err(
            s.member(json!({"action": "complete", "org_id": org, "session_id": id, "duration_seconds": 1}))
                .await,
            409,
            "CONFLICT",
        );
        assert_err(
            s.member(json!({"action": "upload_chunk", "org_id": org, "session_id": id, "chunk_data": "[0, \"o\", \"x\"]"}))
                .await,
            409,
            "CONFLICT",
        );
        // complete needs duration_seconds.
        let id2 = s.start_recording().await;
        assert_err(
            s.member(json!({"action": "complete", "org_id": org, "session_id": id2}))
                .await,
            400,
            "MISSING_FIELDS",
        );
        for bad in [json!(-1), json!(12.5), json!("12")] {
            assert_err(
                s.member(json!({"action": "complete", "org_id": org, "session_id": id2, "duration_seconds": bad}))
                    .await,
                400,
                "INVALID_FIELD",
            );
        }
        // An admin may complete a member's recording.
        let (st, _) = s
            .admin(json!({"action": "complete", "org_id": org, "session_id": id2, "duration_seconds": 5}))
            .await;
        assert_eq!(st, 200);
        // Unknown machine, machine id not a UUID.
        assert_err(
            s.member(json!({"action": "start", "org_id": org, "machine_id": uuid::Uuid::new_v4().to_string(), "session_type": "ssh"}))
                .await,
            404,
            "NOT_FOUND",
        );
        assert_err(
            s.member(json!({"action": "start", "org_id": org, "machine_id": "linux-c", "session_type": "ssh"}))
                .await,
            400,
            "INVALID_FIELD",
        );
    }

    pub async fn st3_upload_chunks(s: &Server) {
        let org = &s.fx.org;
        let id = s.start_recording().await;
        // chunk_index defaults to 0.
        let (st, b) = s
            .member(json!({"action": "upload_chunk", "org_id": org, "session_id": id, "chunk_data": "[0, \"o\", \"$ \"]"}))
            .await;
        assert_eq!(st, 200, "{b}");
        let k0 = format!("recordings/{org}/{id}/chunk-0.cast");
        assert_eq!(
            b,
            json!({"success": true, "data": {"stored": k0, "chunk_index": 0}, "error": null})
        );
        let (st, b) = s
            .member(json!({"action": "upload_chunk", "org_id": org, "session_id": id, "chunk_index": 1, "chunk_data": "[1.2, \"o\", \"hello\\n\"]"}))
            .await;
        assert_eq!(st, 200);
        let k1 = format!("recordings/{org}/{id}/chunk-1.cast");
        assert_eq!(b["data"]["stored"], k1.as_str());
        assert_eq!(b["data"]["chunk_index"], 1);
        // Objects hold the event lines, each ending in \n.
        let o0 = s.stores.get_object(&k0).await.unwrap();
        assert_eq!(o0, b"[0, \"o\", \"$ \"]\n");
        let o1 = s.stores.get_object(&k1).await.unwrap();
        assert_eq!(o1, b"[1.2, \"o\", \"hello\\n\"]\n");
        let d = s.get(&id).await;
        assert_eq!(
            d["recording"]["metadata"]["chunks"],
            json!([
                {"index": 0, "bytes": o0.len(), "sha256": sha_hex(&o0)},
                {"index": 1, "bytes": o1.len(), "sha256": sha_hex(&o1)},
            ])
        );
        assert_eq!(d["integrity"], "ok");
        // The same index again replaces the chunk.
        let (st, _) = s
            .member(json!({"action": "upload_chunk", "org_id": org, "session_id": id, "chunk_index": 1, "chunk_data": "[1.5, \"o\", \"bye\"]\n[2.5, \"o\", \"!\"]\n"}))
            .await;
        assert_eq!(st, 200);
        let o1 = s.stores.get_object(&k1).await.unwrap();
        assert_eq!(o1, b"[1.5, \"o\", \"bye\"]\n[2.5, \"o\", \"!\"]\n");
        let d = s.get(&id).await;
        let chunks = d["recording"]["metadata"]["chunks"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[1]["sha256"], sha_hex(&o1).as_str());
        // Stored as one event a line: blank lines and every bare \r go (one between a line's
        // tokens is JSON whitespace, but Python's asciinema takes it for the end of a line).
        let (st, b) = s
            .member(json!({"action": "upload_chunk", "org_id": org, "session_id": id, "chunk_index": 1, "chunk_data": "[1.5,\r\"o\", \"a\\r\"]\r\r\n\n \t\r\n[2.5, \"o\", \"b\"]\r\t"}))
            .await;
        assert_eq!(st, 200, "{b}");
        let o1 = s.stores.get_object(&k1).await.unwrap();
        assert_eq!(o1, b"[1.5,\"o\", \"a\\r\"]\n[2.5, \"o\", \"b\"]\t\n");
        // Bad chunks.
        for (body, status, c) in [
            (json!({"chunk_data": null}), 400, "MISSING_FIELDS"),
            (json!({}), 400, "MISSING_FIELDS"),
            (json!({"chunk_data": 5}), 400, "INVALID_FIELD"),
            (
                json!({"chunk_data": "[0, \"o\", \"x\"]", "chunk_index": -1}),
                400,
                "INVALID_FIELD",
            ),
            (
                json!({"chunk_data": "[0, \"o\", \"x\"]", "chunk_index": 1.5}),
                400,
                "INVALID_FIELD",
            ),
            (
                json!({"chunk_data": "[0, \"o\", \"x\"]", "chunk_index": "2"}),
                400,
                "INVALID_FIELD",
            ),
            (json!({"chunk_data": "hello world"}), 400, "INVALID_CHUNK"),
            // A line of Unicode (not JSON) whitespace is not blank: it is no event.
            (
                json!({"chunk_data": "[0, \"o\", \"a\"]\n\u{a0}\n[1, \"o\", \"b\"]\n"}),
                400,
                "INVALID_CHUNK",
            ),
            (
                json!({"chunk_data": "[0, \"x\", \"a\"]"}),
                400,
                "INVALID_CHUNK",
            ),
            (
                json!({"chunk_data": "[-1, \"o\", \"a\"]"}),
                400,
                "INVALID_CHUNK",
            ),
            // A resize is "COLSxROWS".
            (
                json!({"chunk_data": "[1, \"r\", \"abc\"]"}),
                400,
                "INVALID_CHUNK",
            ),
            (
                json!({"chunk_data": "[1, \"r\", \"80x0\"]"}),
                400,
                "INVALID_CHUNK",
            ),
            (
                json!({"chunk_data": "{\"version\": 2, \"width\": 80, \"height\": 24}\n[0, \"o\", \"a\"]"}),
                400,
                "INVALID_CHUNK",
            ),
        ] {
            let mut body = body;
            body["action"] = json!("upload_chunk");
            body["org_id"] = json!(org);
            body["session_id"] = json!(id);
            assert_err(s.member(body.clone()).await, status, c);
        }
        // chunk_data over 8 MiB (body under 16 MiB): 413 in the envelope.
        let big = format!("[0, \"o\", \"{}\"]", "a".repeat(8 * 1024 * 1024));
        assert_err(
            s.member(json!({"action": "upload_chunk", "org_id": org, "session_id": id, "chunk_index": 7, "chunk_data": big}))
                .await,
            413,
            "PAYLOAD_TOO_LARGE",
        );
        // Just under the limit is fine.
        let ok = format!("[0, \"o\", \"{}\"]", "a".repeat(8 * 1024 * 1024 - 20));
        let (st, b) = s
            .member(json!({"action": "upload_chunk", "org_id": org, "session_id": id, "chunk_index": 7, "chunk_data": ok}))
            .await;
        assert_eq!(st, 200, "{b}");
        // Nothing of the refused uploads changed the recording.
        let d = s.get(&id).await;
        let idx: Vec<i64> = d["recording"]["metadata"]["chunks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["index"].as_i64().unwrap())
            .collect();
        assert_eq!(idx, vec![0, 1, 7]);
        // A session that does not exist.
        assert_err(
            s.member(json!({"action": "upload_chunk", "org_id": org, "session_id": uuid::Uuid::new_v4().to_string(), "chunk_data": "[0, \"o\", \"x\"]"}))
                .await,
            404,
            "NOT_FOUND",
        );
    }

    pub async fn st4_list(s: &Server) {
        let org = &s.fx.org;
        let completed = s.start_recording().await;
        s.member(json!({"action": "complete", "org_id": org, "session_id": completed, "duration_seconds": 120}))
            .await;
        let active = s.start_recording().await;
        // A second machine with one recording.
        let (m2, _) = s
            .app
            .register_machine(
                org.parse().unwrap(),
                "Linux-D",
                s.fx.member.parse().unwrap(),
            )
            .await
            .unwrap();
        let (st, b) = s
            .member(json!({"action": "start", "org_id": org, "machine_id": m2.to_string(), "session_type": "ssh"}))
            .await;
        assert_eq!(st, 201);
        let on_d = b["data"]["session_id"].as_str().unwrap().to_string();

        let (st, b) = s
            .admin(json!({"action": "list", "org_id": org, "limit": 20, "offset": 0}))
            .await;
        assert_eq!(st, 200, "{b}");
        let d = &b["data"];
        let ids: Vec<&str> = d["recordings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            vec![on_d.as_str(), active.as_str(), completed.as_str()]
        );
        assert_eq!(d["total"], 3);
        let mut stats = d["stats"].as_array().unwrap().clone();
        stats.sort_by_key(|s| s["status"].as_str().unwrap().to_string());
        assert_eq!(
            stats,
            vec![
                json!({"status": "active", "count": 2, "total_duration": 0}),
                json!({"status": "completed", "count": 1, "total_duration": 120}),
            ]
        );
        let first = &d["recordings"][2];
        assert_eq!(first["machine_name"], "Linux-C");
        assert_eq!(first["duration_seconds"], 120);
        assert_eq!(first["session_type"], "ssh");
        assert!(first["started_at"].is_string());
        assert!(first["metadata"]["chunks"].is_array());
        // Started-at descending, then id descending, page by page.
        let mut paged = Vec::new();
        for off in 0..3 {
            let (_, b) = s
                .admin(json!({"action": "list", "org_id": org, "limit": 1, "offset": off}))
                .await;
            assert_eq!(b["data"]["recordings"].as_array().unwrap().len(), 1);
            assert_eq!(b["data"]["total"], 3);
            paged.push(
                b["data"]["recordings"][0]["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        assert_eq!(paged, ids);
        // Filters: machine, status; stats and total follow them.
        let (_, b) = s
            .admin(json!({"action": "list", "org_id": org, "machine_id": s.fx.machine}))
            .await;
        let recs = b["data"]["recordings"].as_array().unwrap();
        assert_eq!(recs.len(), 2);
        assert!(recs.iter().all(|r| r["machine_name"] == "Linux-C"));
        assert_eq!(b["data"]["total"], 2);
        let (_, b) = s
            .admin(json!({"action": "list", "org_id": org, "status": "completed"}))
            .await;
        let recs = b["data"]["recordings"].as_array().unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0]["id"], completed.as_str());
        assert_eq!(
            b["data"]["stats"],
            json!([{"status": "completed", "count": 1, "total_duration": 120}])
        );
        assert_eq!(b["data"]["total"], 1);
        let (_, b) = s
            .admin(json!({"action": "list", "org_id": org, "status": "completed", "machine_id": m2.to_string()}))
            .await;
        assert_eq!(b["data"]["recordings"], json!([]));
        assert_eq!(b["data"]["stats"], json!([]));
        assert_eq!(b["data"]["total"], 0);
        // Clamp: limit 0 → 1, limit 1000 → 200 (all 3 here); default 50.
        let (_, b) = s
            .admin(json!({"action": "list", "org_id": org, "limit": 0}))
            .await;
        assert_eq!(b["data"]["recordings"].as_array().unwrap().len(), 1);
        let (_, b) = s
            .admin(json!({"action": "list", "org_id": org, "limit": 1000}))
            .await;
        assert_eq!(b["data"]["recordings"].as_array().unwrap().len(), 3);
        let (_, b) = s
            .admin(json!({"action": "list", "org_id": org, "limit": -3}))
            .await;
        assert_eq!(b["data"]["recordings"].as_array().unwrap().len(), 1);
        let (_, b) = s
            .admin(json!({"action": "list", "org_id": org, "offset": 10}))
            .await;
        assert_eq!(b["data"]["recordings"], json!([]));
        assert_eq!(b["data"]["total"], 3);
        assert_err(
            s.admin(json!({"action": "list", "org_id": org, "offset": -1}))
                .await,
            400,
            "INVALID_FIELD",
        );
        assert_err(
            s.admin(json!({"action": "list", "org_id": org, "machine_id": "x"}))
                .await,
            400,
            "INVALID_FIELD",
        );
        assert_err(
            s.admin(json!({"action": "list", "org_id": org, "limit": "ten"}))
                .await,
            400,
            "INVALID_FIELD",
        );
        // `session_type`: up to 64 characters, whatever their size in UTF-8.
        let start = |t: String| json!({"action": "start", "org_id": org, "machine_id": s.fx.machine, "session_type": t});
        let (st, b) = s.member(start("ü".repeat(64))).await;
        assert_eq!(st, 201, "{b}");
        assert_err(s.member(start("ü".repeat(65))).await, 400, "INVALID_FIELD");
    }

    pub async fn st5_agent_report(s: &Server) {
        let org = &s.fx.org;
        let (st, b) = s
            .agent(json!({
                "node_key": s.fx.node_key,
                "session_type": "ssh",
                "session_data": {
                    "transcript": "[0, \"o\", \"$ uname\\n\"]\n[0.5, \"o\", \"Linux linux-c\\n\"]",
                    "duration_seconds": 30
                }
            }))
            .await;
        assert_eq!(st, 201, "{b}");
        assert_eq!(b["success"], true);
        assert_eq!(b["error"], Value::Null);
        assert_eq!(b["data"]["status"], "completed");
        let id = b["data"]["session_id"].as_str().unwrap().to_string();
        let (_, b) = s.admin(json!({"action": "list", "org_id": org})).await;
        let r = b["data"]["recordings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id.as_str())
            .unwrap()
            .clone();
        assert_eq!(r["status"], "completed");
        assert_eq!(r["duration_seconds"], 30);
        // It ran for its duration up to the report (it used to start when it ended).
        let at = |k: &str| {
            time::OffsetDateTime::parse(
                r[k].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
        };
        assert_eq!(
            at("ended_at") - at("started_at"),
            time::Duration::seconds(30)
        );
        // A duration longer than an agent's times are believed for (30 days) starts it at the
        // report, or the next retention sweep would delete it at once.
        let (st, b) = s
            .agent(json!({"node_key": s.fx.node_key, "session_type": "ssh", "session_data": {"transcript": "[0, \"o\", \"x\"]", "duration_seconds": 2147483647}}))
            .await;
        assert_eq!(st, 201, "{b}");
        let long = s.get(b["data"]["session_id"].as_str().unwrap()).await["recording"].clone();
        assert_eq!(long["started_at"], long["ended_at"], "{long}");
        let (st, b) = s
            .admin(json!({"action": "cleanup", "org_id": s.fx.org}))
            .await;
        assert_eq!((st, &b["data"]), (200, &json!({"deleted": 0})), "{b}");
        assert_eq!(r["metadata"]["reported_by_agent"], true);
        assert_eq!(r["metadata"]["machine_name"], "Linux-C");
        assert_eq!(r["user_id"], s.fx.member.as_str());
        assert_eq!(r["machine_id"], s.fx.machine.as_str());
        // The events are chunk 0.
        let k0 = format!("recordings/{org}/{id}/chunk-0.cast");
        let o0 = s.stores.get_object(&k0).await.unwrap();
        assert_eq!(
            o0,
            b"[0, \"o\", \"$ uname\\n\"]\n[0.5, \"o\", \"Linux linux-c\\n\"]\n"
        );
        assert_eq!(r["metadata"]["chunks"][0]["sha256"], sha_hex(&o0).as_str());
        let d = s.get(&id).await;
        assert_eq!(d["r2_data"]["session_id"], id.as_str());
        assert_eq!(d["integrity"], "ok");

        // With a header and no duration: the last event's time, rounded up; header kept.
        let (st, b) = s
            .agent(json!({
                "action": "report",
                "node_key": s.fx.node_key,
                "session_type": "ssh",
                "session_data": {"transcript": "{\"version\": 2, \"width\": 80, \"height\": 24}\n[0.1, \"o\", \"a\"]\n[2.25, \"o\", \"b\"]\n"}
            }))
            .await;
        assert_eq!(st, 201, "{b}");
        let d = s.get(b["data"]["session_id"].as_str().unwrap()).await;
        assert_eq!(d["recording"]["duration_seconds"], 3);
        assert_eq!(d["recording"]["metadata"]["header"]["width"], 80);
        // No event at all: duration 0.
        let (st, b) = s
            .agent(json!({"node_key": s.fx.node_key, "session_type": "ssh", "session_data": {"transcript": ""}}))
            .await;
        assert_eq!(st, 201, "{b}");
        let d = s.get(b["data"]["session_id"].as_str().unwrap()).await;
        assert_eq!(d["recording"]["duration_seconds"], 0);
        // Bad transcripts and keys.
        assert_err(
            s.agent(json!({"node_key": s.fx.node_key, "session_type": "ssh", "session_data": {"transcript": "not a cast"}}))
                .await,
            400,
            "INVALID_CHUNK",
        );
        assert_err(
            s.agent(json!({"node_key": s.fx.node_key, "session_type": "ssh", "session_data": {}}))
                .await,
            400,
            "MISSING_FIELDS",
        );
        assert_err(
            s.agent(json!({"node_key": s.fx.node_key, "session_type": "ssh"}))
                .await,
            400,
            "MISSING_FIELDS",
        );
        assert_err(
            s.agent(json!({"node_key": "00".repeat(64), "session_type": "ssh", "session_data": {"transcript": ""}}))
                .await,
            401,
            "UNAUTHORIZED",
        );
        assert_err(
            s.agent(json!({"session_type": "ssh", "session_data": {"transcript": ""}}))
                .await,
            401,
            "UNAUTHORIZED",
        );
    }

    pub async fn agent_lifecycle(s: &Server) {
        let org = &s.fx.org;
        let key = &s.fx.node_key;
        let (st, b) = s.agent(json!({"action": "config", "node_key": key})).await;
        assert_eq!(st, 200);
        assert_eq!(
            b["data"],
            json!({"org_id": org, "machine_id": s.fx.machine, "recording_enabled": true, "retention_days": 90, "storage_mode": "platform"})
        );
        let header = json!({"version": 2, "width": 100, "height": 30, "timestamp": 1});
        let (st, b) = s
            .agent(json!({"action": "start", "node_key": key, "session_type": "ssh", "header": header, "metadata": {"user": "alice", "kind": "interactive", "tty": "/dev/pts/1", "ssh": {"port": 22, "addr": "192.0.2.1"}, "machine_name": "spoofed"}}))
            .await;
        assert_eq!(st, 201, "{b}");
        assert_eq!(b["data"]["status"], "active");
        let id = b["data"]["session_id"].as_str().unwrap().to_string();
        for (i, data) in [
            (0, "[0.5, \"o\", \"a\"]\n"),
            (2, "[7.2, \"o\", \"c\"]\n"),
            (1, "[3.0, \"o\", \"b\"]\n"),
        ] {
            let (st, b) = s
                .agent(json!({"action": "upload_chunk", "node_key": key, "session_id": id, "chunk_index": i, "chunk_data": data}))
                .await;
            assert_eq!(st, 200, "{b}");
            assert_eq!(
                b["data"]["stored"],
                format!("recordings/{org}/{id}/chunk-{i}.cast").as_str()
            );
        }
        assert_err(
            s.agent(json!({"action": "upload_chunk", "node_key": key, "session_id": id, "chunk_data": "[0, \"o\", \"a\"]"}))
                .await,
            400,
            "MISSING_FIELDS",
        );
        // Without duration: last event of the highest-index chunk, rounded up (7.2 → 8).
        let (st, b) = s
            .agent(json!({"action": "complete", "node_key": key, "session_id": id, "metadata": {
                "exit_status": 0, "tty": null, "ssh": {"port": 2222},
                "header": {"version": 2, "width": 1, "height": 1}, "machine_name": "spoofed", "reported_by_agent": true}}))
            .await;
        assert_eq!(st, 200, "{b}");
        assert_eq!(b["data"]["completed"], id.as_str());
        let d = s.get(&id).await;
        let r = &d["recording"];
        assert_eq!(r["duration_seconds"], 8);
        // The metadata merge is shallow on both backends: a key given replaces the stored
        // value (null included); the keys the server owns are not the agent's to write.
        assert_eq!(r["metadata"]["header"], header);
        assert_eq!(r["metadata"]["machine_name"], r["machine_name"]);
        assert!(r["metadata"].get("reported_by_agent").is_none(), "{r}");
        assert_eq!(r["metadata"]["user"], "alice");
        assert_eq!(r["metadata"]["exit_status"], 0);
        assert_eq!(r["metadata"]["tty"], Value::Null);
        assert!(r["metadata"].as_object().unwrap().contains_key("tty"));
        assert_eq!(r["metadata"]["ssh"], json!({"port": 2222}));
        assert_eq!(r["user_id"], s.fx.member.as_str());
        assert_eq!(r["metadata"]["chunks"].as_array().unwrap().len(), 3);
        assert_eq!(d["r2_data"]["chunks"].as_array().unwrap().len(), 3);
        assert_err(
            s.agent(json!({"action": "complete", "node_key": key, "session_id": id}))
                .await,
            409,
            "CONFLICT",
        );
        // Another machine of the same org cannot touch it.
        let (_, key2) = s
            .app
            .register_machine(org.parse().unwrap(), "other", s.fx.member.parse().unwrap())
            .await
            .unwrap();
        let (_, b) = s
            .agent(json!({"action": "start", "node_key": key, "session_type": "ssh", "header": header}))
            .await;
        let id2 = b["data"]["session_id"].as_str().unwrap().to_string();
        assert_err(
            s.agent(json!({"action": "upload_chunk", "node_key": key2, "session_id": id2, "chunk_index": 0, "chunk_data": "[0, \"o\", \"x\"]"}))
                .await,
            404,
            "NOT_FOUND",
        );
        assert_err(
            s.agent(json!({"action": "complete", "node_key": key2, "session_id": id2, "duration_seconds": 1}))
                .await,
            404,
            "NOT_FOUND",
        );
        // A JWT-started recording of another machine is not the agent's either.
        let jwt_rec = s.start_recording().await;
        assert_err(
            s.agent(json!({"action": "complete", "node_key": key2, "session_id": jwt_rec}))
                .await,
            404,
            "NOT_FOUND",
        );
        // Recording switched off: start and report refused, config answers, the active one
        // still gets its chunks and completes.
        s.admin(json!({"action": "update_settings", "org_id": org, "recording_enabled": false}))
            .await;
        assert_err(
            s.agent(json!({"action": "start", "node_key": key, "session_type": "ssh", "header": header}))
                .await,
            403,
            "RECORDING_DISABLED",
        );
        assert_err(
            s.agent(
                json!({"node_key": key, "session_type": "ssh", "session_data": {"transcript": ""}}),
            )
            .await,
            403,
            "RECORDING_DISABLED",
        );
        assert_err(
            s.member(json!({"action": "start", "org_id": org, "machine_id": s.fx.machine, "session_type": "ssh"}))
                .await,
            403,
            "RECORDING_DISABLED",
        );
        let (st, b) = s.agent(json!({"action": "config", "node_key": key})).await;
        assert_eq!(st, 200);
        assert_eq!(b["data"]["recording_enabled"], false);
        let (st, _) = s
            .agent(json!({"action": "upload_chunk", "node_key": key, "session_id": id2, "chunk_index": 0, "chunk_data": "[0, \"o\", \"x\"]"}))
            .await;
        assert_eq!(st, 200);
        let (st, _) = s
            .agent(json!({"action": "complete", "node_key": key, "session_id": id2, "duration_seconds": 4}))
            .await;
        assert_eq!(st, 200);
        // Agent field checks.
        assert_err(
            s.agent(json!({"action": "start", "node_key": key, "session_type": "ssh"}))
                .await,
            400,
            "MISSING_FIELDS",
        );
        assert_err(
            s.agent(
                json!({"action": "start", "node_key": key, "session_type": "ssh", "header": "v2"}),
            )
            .await,
            400,
            "INVALID_FIELD",
        );
        assert_err(
            s.agent(json!({"action": "upload_chunk", "node_key": key, "session_id": "nope", "chunk_index": 0, "chunk_data": "x"}))
                .await,
            400,
            "INVALID_FIELD",
        );
        assert_err(
            s.agent(json!({"action": "dance", "node_key": key})).await,
            400,
            "UNKNOWN_ACTION",
        );
        assert_err(
            s.agent(json!({"action": "config", "node_key": "nope"}))
                .await,
            401,
            "UNAUTHORIZED",
        );
        // Feature off: FEATURE_DISABLED on the agent route too.
        s.app
            .set_feature(org.parse().unwrap(), "session_recording", false)
            .await
            .unwrap();
        assert_err(
            s.agent(
                json!({"node_key": key, "session_type": "ssh", "session_data": {"transcript": ""}}),
            )
            .await,
            403,
            "FEATURE_DISABLED",
        );
        // …but `config` always answers, and says not to record.
        let (st, b) = s.agent(json!({"action": "config", "node_key": key})).await;
        assert_eq!(st, 200, "{b}");
        assert_eq!(b["data"]["recording_enabled"], false);
        assert_eq!(b["data"]["org_id"], org.as_str());
    }

    /// A `start` sent again with the same `agent_session_id` (its answer lost) answers the
    /// recording the first one made; another machine's same id is another recording.
    pub async fn agent_start_sent_again(s: &Server) {
        let org = &s.fx.org;
        let key = &s.fx.node_key;
        let header = json!({"version": 2, "width": 80, "height": 24, "timestamp": 1});
        let total = || async {
            let (_, b) = s.admin(json!({"action": "list", "org_id": org})).await;
            b["data"]["total"].as_i64().unwrap()
        };
        let start = |key: String, local: String| {
            let header = header.clone();
            async move {
                s.agent(json!({"action": "start", "node_key": key, "session_type": "ssh", "header": header, "agent_session_id": local}))
                    .await
            }
        };
        let local = uuid::Uuid::new_v4().to_string();
        let (st, b) = start(key.clone(), local.clone()).await;
        assert_eq!(st, 201, "{b}");
        let id = b["data"]["session_id"].as_str().unwrap().to_string();
        assert_ne!(id, local, "the backend's id is its own");
        let (st, b) = start(key.clone(), local.clone()).await;
        assert_eq!(
            (st, &b["data"]),
            (201, &json!({"session_id": id, "status": "active"}))
        );
        assert_eq!(total().await, 1);
        // Without one, or with another one, a start is a new recording.
        let (_, b) = s
            .agent(json!({"action": "start", "node_key": key, "session_type": "ssh", "header": header}))
            .await;
        assert_ne!(b["data"]["session_id"], id.as_str());
        assert_eq!(total().await, 2);
        // Another machine with the same local id gets a recording of its own, and cannot
        // reach the first machine's.
        let (_, key2) = s
            .app
            .register_machine(org.parse().unwrap(), "second", s.fx.member.parse().unwrap())
            .await
            .unwrap();
        let (st, b) = start(key2.clone(), local.clone()).await;
        assert_eq!(st, 201, "{b}");
        let id2 = b["data"]["session_id"].as_str().unwrap().to_string();
        assert_ne!(id2, id);
        assert_eq!(s.get(&id2).await["recording"]["machine_name"], "second");
        assert_eq!(total().await, 3);
        // Recording switched off: the start sent again still finds its active recording, which
        // takes its chunks and completes; a new one is refused.
        s.admin(json!({"action": "update_settings", "org_id": org, "recording_enabled": false}))
            .await;
        let (st, b) = start(key.clone(), local.clone()).await;
        assert_eq!(
            (st, &b["data"]),
            (201, &json!({"session_id": id, "status": "active"}))
        );
        assert_err(
            start(key.clone(), uuid::Uuid::new_v4().to_string()).await,
            403,
            "RECORDING_DISABLED",
        );
        let (st, _) = s
            .agent(json!({"action": "upload_chunk", "node_key": key, "session_id": id, "chunk_index": 0, "chunk_data": "[0.5, \"o\", \"x\"]\n"}))
            .await;
        assert_eq!(st, 200);
        let (st, _) = s
            .agent(json!({"action": "complete", "node_key": key, "session_id": id}))
            .await;
        assert_eq!(st, 200);
        let (st, b) = start(key.clone(), local.clone()).await;
        assert_eq!(
            (st, &b["data"]),
            (201, &json!({"session_id": id, "status": "completed"}))
        );
        assert_eq!(s.get(&id).await["recording"]["duration_seconds"], 1);
        assert_eq!(total().await, 3);
        assert_err(
            start(key.clone(), "nope".into()).await,
            400,
            "INVALID_FIELD",
        );
    }

    /// A `report` the database refuses (full, or here a trigger) answers 500 and leaves no
    /// object behind: no row would ever lead `delete` or retention to it.
    pub async fn a_refused_report_leaves_no_objects(s: &Server) {
        let org = &s.fx.org;
        let report = json!({"node_key": s.fx.node_key, "session_type": "ssh",
            "session_data": {"transcript": "{\"version\": 2, \"width\": 80, \"height\": 24}\n[0.5, \"o\", \"TOP-SECRET\"]\n"}});
        s.stores
            .sql(match s.stores.database_url {
                None => {
                    "CREATE TRIGGER refuse BEFORE INSERT ON session_recordings \
                         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;"
                }
                Some(_) => {
                    "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
                            $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$; \
                            CREATE TRIGGER refuse BEFORE INSERT ON session_recordings \
                            FOR EACH ROW EXECUTE FUNCTION refuse();"
                }
            })
            .await;
        assert_err(s.agent(report.clone()).await, 500, "INTERNAL_ERROR");
        // Taken back in the background (the answer does not wait for a failing store).
        let t0 = std::time::Instant::now();
        for prefix in [
            format!("recordings/{org}"),
            format!("session-recordings/{org}"),
        ] {
            loop {
                let left = s.stores.object_keys(&prefix).await;
                if left.is_empty() {
                    break;
                }
                assert!(
                    t0.elapsed() < std::time::Duration::from_secs(10),
                    "{left:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        let (_, b) = s.admin(json!({"action": "list", "org_id": org})).await;
        assert_eq!(b["data"]["total"], 0, "{b}");
        // The same report once the database takes it again: all of it is there.
        s.stores
            .sql(match s.stores.database_url {
                None => "DROP TRIGGER refuse",
                Some(_) => "DROP TRIGGER refuse ON session_recordings",
            })
            .await;
        let (st, b) = s.agent(report).await;
        assert_eq!(st, 201, "{b}");
        let id = b["data"]["session_id"].as_str().unwrap();
        assert_eq!(
            s.stores.object_keys(&format!("recordings/{org}")).await,
            [format!("recordings/{org}/{id}/chunk-0.cast")]
        );
        let d = s.get(id).await;
        assert_eq!(d["integrity"], "ok");
        let column = s.stores.metadata_column(id).await;
        assert_eq!(column["chunks"], d["recording"]["metadata"]["chunks"]);
        assert_eq!(column["chunks"].as_array().unwrap().len(), 1, "{column}");
    }

    pub async fn error_codes_and_order(s: &Server) {
        let org = &s.fx.org;
        let t = s.fx.admin_token.clone();
        // INVALID_JSON: not JSON, not an object.
        assert_err(
            s.raw_user(Some(&t), b"{oops".to_vec()).await,
            400,
            "INVALID_JSON",
        );
        assert_err(
            s.raw_user(Some(&t), b"[1,2]".to_vec()).await,
            400,
            "INVALID_JSON",
        );
        assert_err(s.raw_user(None, b"".to_vec()).await, 400, "INVALID_JSON");
        // UNKNOWN_ACTION before anything about fields or the token.
        assert_err(
            s.user(None, json!({"org_id": "x"})).await,
            400,
            "UNKNOWN_ACTION",
        );
        assert_err(
            s.user(None, json!({"action": "fly"})).await,
            400,
            "UNKNOWN_ACTION",
        );
        assert_err(
            s.user(None, json!({"action": 3})).await,
            400,
            "UNKNOWN_ACTION",
        );
        // MISSING_FIELDS before INVALID_FIELD before UNAUTHORIZED.
        assert_err(
            s.user(None, json!({"action": "get_settings"})).await,
            400,
            "MISSING_FIELDS",
        );
        assert_err(
            s.user(None, json!({"action": "get_settings", "org_id": null}))
                .await,
            400,
            "MISSING_FIELDS",
        );
        assert_err(
            s.user(None, json!({"action": "start", "org_id": "not-a-uuid"}))
                .await,
            400,
            "MISSING_FIELDS",
        );
        assert_err(
            s.user(
                None,
                json!({"action": "get_settings", "org_id": "not-a-uuid"}),
            )
            .await,
            400,
            "INVALID_FIELD",
        );
        assert_err(
            s.user(None, json!({"action": "get_settings", "org_id": 12}))
                .await,
            400,
            "INVALID_FIELD",
        );
        assert_err(
            s.user(
                None,
                json!({"action": "get", "org_id": org, "session_id": "../../etc/passwd"}),
            )
            .await,
            400,
            "INVALID_FIELD",
        );
        assert_err(
            s.user(None, json!({"action": "get_settings", "org_id": org}))
                .await,
            401,
            "UNAUTHORIZED",
        );
        // UNAUTHORIZED before FORBIDDEN: a bad token on an org that does not exist.
        assert_err(
            s.user(
                Some("garbage"),
                json!({"action": "get_settings", "org_id": uuid::Uuid::new_v4().to_string()}),
            )
            .await,
            401,
            "UNAUTHORIZED",
        );
        // FORBIDDEN: an org that does not exist answers like one you are not in.
        assert_err(
            s.admin(json!({"action": "get_settings", "org_id": uuid::Uuid::new_v4().to_string()}))
                .await,
            403,
            "FORBIDDEN",
        );
        // FORBIDDEN (role) before FEATURE_DISABLED; FEATURE_DISABLED before action checks.
        s.app
            .set_feature(org.parse().unwrap(), "session_recording", false)
            .await
            .unwrap();
        assert_err(
            s.member(json!({"action": "list", "org_id": org})).await,
            403,
            "FORBIDDEN",
        );
        assert_err(
            s.member(json!({"action": "get_settings", "org_id": org}))
                .await,
            403,
            "FEATURE_DISABLED",
        );
        assert_err(
            s.admin(json!({"action": "get", "org_id": org, "session_id": uuid::Uuid::new_v4().to_string()}))
                .await,
            403,
            "FEATURE_DISABLED",
        );
        s.app
            .set_feature(org.parse().unwrap(), "session_recording", true)
            .await
            .unwrap();
        assert_err(
            s.admin(json!({"action": "get", "org_id": org, "session_id": uuid::Uuid::new_v4().to_string()}))
                .await,
            404,
            "NOT_FOUND",
        );
        // Body over 16 MiB: 413 in the envelope.
        let big = vec![b' '; 16 * 1024 * 1024 + 10];
        assert_err(s.raw_user(Some(&t), big).await, 413, "PAYLOAD_TOO_LARGE");
        // Agent route: same envelope.
        let resp = s
            .http
            .post(format!("{}/api/session-recording-agent", s.base))
            .body("nope")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);
        let b: Value = resp.json().await.unwrap();
        assert_eq!(code(&b), "INVALID_JSON");
    }

    pub async fn auth_failures(s: &Server) {
        use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
        let org = &s.fx.org;
        let body = json!({"action": "get_settings", "org_id": org});
        let secret = std::fs::read_to_string(s.stores.dir.path().join("jwt-secret")).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let sign = |alg, exp: u64, key: &[u8]| {
            encode(
                &Header::new(alg),
                &json!({"sub": s.fx.admin, "exp": exp}),
                &EncodingKey::from_secret(key),
            )
            .unwrap()
        };
        // A token we sign ourselves with the server's secret works, with only the contract's
        // `sub` and `exp`, or with more claims than ours carry…
        let good = sign(Algorithm::HS256, now + 60, secret.as_bytes());
        assert_eq!(s.user(Some(&good), body.clone()).await.0, 200);
        let more = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": s.fx.admin, "exp": now + 60, "iat": now, "aud": "ztna", "iss": "tests"}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        assert_eq!(s.user(Some(&more), body.clone()).await.0, 200);
        // …expired (no leeway), wrong secret, other algorithm, alg none, malformed: 401.
        for bad in [
            sign(Algorithm::HS256, now - 1, secret.as_bytes()),
            sign(Algorithm::HS256, now + 60, b"not the secret"),
            sign(Algorithm::HS512, now + 60, secret.as_bytes()),
            format!(
                "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
                good.split('.').nth(1).unwrap()
            ),
            "a.b.c".to_string(),
            String::new(),
        ] {
            assert_err(s.user(Some(&bad), body.clone()).await, 401, "UNAUTHORIZED");
        }
        // Not "Bearer".
        let resp = s
            .http
            .post(format!("{}/api/session-recording", s.base))
            .header("authorization", format!("Basic {good}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401);
        // An issued token that has run out.
        let short = s
            .app
            .issue_token(s.fx.admin.parse().unwrap(), 1)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_err(
            s.user(Some(&short), body.clone()).await,
            401,
            "UNAUTHORIZED",
        );
        // A valid token of a user that is not a member: FORBIDDEN.
        let other_org = s.app.create_org("other", true).await.unwrap();
        let stranger = s
            .app
            .create_user(other_org, &format!("x@{other_org}.test"), Role::Admin)
            .await
            .unwrap();
        let st = s.app.issue_token(stranger, 60).await.unwrap();
        assert_err(s.user(Some(&st), body.clone()).await, 403, "FORBIDDEN");
        // A well-signed token whose user does not exist names nobody: UNAUTHORIZED.
        let nobody = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": uuid::Uuid::new_v4().to_string(), "exp": now + 60}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        assert_err(
            s.user(Some(&nobody), body.clone()).await,
            401,
            "UNAUTHORIZED",
        );
        // No answer carries the node key or the secret.
        let (_, b) = s
            .agent(json!({"action": "config", "node_key": s.fx.node_key}))
            .await;
        assert!(!b.to_string().contains(&s.fx.node_key));
        assert!(!b.to_string().contains(secret.trim()));
    }

    pub async fn cross_org(s: &Server) {
        let org = &s.fx.org;
        let rec = s.start_recording().await;
        let other = make_fixture(&s.app, "globex").await;
        let their = |body: Value| {
            let t = other.admin_token.clone();
            async move { s.user(Some(&t), body).await }
        };
        // Their admin, our org: FORBIDDEN (not a member).
        assert_err(
            their(json!({"action": "get", "org_id": org, "session_id": rec})).await,
            403,
            "FORBIDDEN",
        );
        assert_err(
            their(json!({"action": "list", "org_id": org})).await,
            403,
            "FORBIDDEN",
        );
        // Their admin, their org, our recording: NOT_FOUND for every action.
        for action in ["get", "delete"] {
            assert_err(
                their(json!({"action": action, "org_id": other.org, "session_id": rec})).await,
                404,
                "NOT_FOUND",
            );
        }
        assert_err(
            their(json!({"action": "complete", "org_id": other.org, "session_id": rec, "duration_seconds": 1}))
                .await,
            404,
            "NOT_FOUND",
        );
        assert_err(
            their(json!({"action": "upload_chunk", "org_id": other.org, "session_id": rec, "chunk_data": "[0, \"o\", \"x\"]"}))
                .await,
            404,
            "NOT_FOUND",
        );
        // Our machine in their org: NOT_FOUND.
        assert_err(
            their(json!({"action": "start", "org_id": other.org, "machine_id": s.fx.machine, "session_type": "ssh"}))
                .await,
            404,
            "NOT_FOUND",
        );
        // Their agent cannot reach our recording.
        assert_err(
            s.agent(json!({"action": "upload_chunk", "node_key": other.node_key, "session_id": rec, "chunk_index": 0, "chunk_data": "[0, \"o\", \"x\"]"}))
                .await,
            404,
            "NOT_FOUND",
        );
        // Their list does not show ours; cleanup in theirs leaves ours.
        let (_, b) = their(json!({"action": "list", "org_id": other.org})).await;
        assert_eq!(b["data"]["total"], 0);
        s.stores.backdate(&rec, 400).await;
        let (st, b) = their(json!({"action": "cleanup", "org_id": other.org})).await;
        assert_eq!((st, &b["data"]["deleted"]), (200, &json!(0)));
        let d = s.get(&rec).await;
        assert_eq!(d["recording"]["status"], "active");
    }

    pub async fn roles(s: &Server) {
        let org = &s.fx.org;
        let mine = s.start_recording().await;
        // A second member, with their own recording.
        let m2 = s
            .app
            .create_user(
                org.parse().unwrap(),
                &format!("m2@{org}.test"),
                Role::Member,
            )
            .await
            .unwrap();
        let t2 = s.app.issue_token(m2, 600).await.unwrap();
        let (st, b) = s
            .user(Some(&t2), json!({"action": "start", "org_id": org, "machine_id": s.fx.machine, "session_type": "ssh"}))
            .await;
        assert_eq!(st, 201);
        let theirs = b["data"]["session_id"].as_str().unwrap().to_string();
        // Admin-only actions.
        for body in [
            json!({"action": "list", "org_id": org}),
            json!({"action": "delete", "org_id": org, "session_id": mine}),
            json!({"action": "cleanup", "org_id": org}),
            json!({"action": "update_settings", "org_id": org, "recording_enabled": false}),
        ] {
            assert_err(s.member(body).await, 403, "FORBIDDEN");
        }
        // Members touch only their own recordings.
        let (st, _) = s
            .member(json!({"action": "get", "org_id": org, "session_id": mine}))
            .await;
        assert_eq!(st, 200);
        for body in [
            json!({"action": "get", "org_id": org, "session_id": theirs}),
            json!({"action": "upload_chunk", "org_id": org, "session_id": theirs, "chunk_data": "[0, \"o\", \"x\"]"}),
            // The role comes before the action's own checks: not INVALID_CHUNK.
            json!({"action": "upload_chunk", "org_id": org, "session_id": theirs, "chunk_data": "not a cast"}),
            json!({"action": "complete", "org_id": org, "session_id": theirs, "duration_seconds": 1}),
        ] {
            assert_err(s.member(body).await, 403, "FORBIDDEN");
        }
        // Admins touch every recording of the org.
        let (st, _) = s
            .admin(json!({"action": "upload_chunk", "org_id": org, "session_id": theirs, "chunk_data": "[0, \"o\", \"x\"]"}))
            .await;
        assert_eq!(st, 200);
        let (st, _) = s
            .admin(json!({"action": "get", "org_id": org, "session_id": theirs}))
            .await;
        assert_eq!(st, 200);
        // The untouched recording of the other member is still active.
        let (_, b) = s
            .user(
                Some(&t2),
                json!({"action": "get", "org_id": org, "session_id": theirs}),
            )
            .await;
        assert_eq!(b["data"]["recording"]["status"], "active");
    }

    pub async fn machine_deletion(s: &Server) {
        let org = &s.fx.org;
        let rec = s.start_recording().await;
        s.member(json!({"action": "upload_chunk", "org_id": org, "session_id": rec, "chunk_data": "[0, \"o\", \"x\"]"}))
            .await;
        s.app
            .delete_machine(s.fx.machine.parse().unwrap())
            .await
            .unwrap();
        let d = s.get(&rec).await;
        assert_eq!(d["recording"]["machine_name"], Value::Null);
        assert_eq!(d["recording"]["machine_id"], Value::Null);
        assert_eq!(
            d["recording"]["metadata"]["chunks"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        let (_, b) = s.admin(json!({"action": "list", "org_id": org})).await;
        assert_eq!(b["data"]["total"], 1);
        assert_eq!(b["data"]["recordings"][0]["machine_name"], Value::Null);
        // The deleted machine's key no longer works; the recording can still complete.
        assert_err(
            s.agent(json!({"action": "config", "node_key": s.fx.node_key}))
                .await,
            401,
            "UNAUTHORIZED",
        );
        let (st, _) = s
            .member(json!({"action": "complete", "org_id": org, "session_id": rec, "duration_seconds": 3}))
            .await;
        assert_eq!(st, 200);
        // Starting on the deleted machine: NOT_FOUND.
        assert_err(
            s.member(json!({"action": "start", "org_id": org, "machine_id": s.fx.machine, "session_type": "ssh"}))
                .await,
            404,
            "NOT_FOUND",
        );
    }

    pub async fn concurrent_chunks(s: &Server) {
        let org = s.fx.org.clone();
        let rec = s.start_recording().await;
        let mut tasks = Vec::new();
        for i in 0..40 {
            let http = s.http.clone();
            let url = format!("{}/api/session-recording", s.base);
            let token = s.fx.member_token.clone();
            let body = json!({"action": "upload_chunk", "org_id": org, "session_id": rec, "chunk_index": i, "chunk_data": format!("[{i}.5, \"o\", \"chunk {i}\\r\\n\"]\n")});
            tasks.push(tokio::spawn(async move {
                let r = http
                    .post(url)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                r.status().as_u16()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200);
        }
        let d = s.get(&rec).await;
        let chunks = d["recording"]["metadata"]["chunks"].as_array().unwrap();
        let idx: Vec<i64> = chunks
            .iter()
            .map(|c| c["index"].as_i64().unwrap())
            .collect();
        assert_eq!(idx, (0..40).collect::<Vec<_>>());
        assert_eq!(d["integrity"], "ok");
        // The row's own metadata column holds the same list, for whoever reads the database.
        assert_eq!(
            s.stores.metadata_column(&rec).await["chunks"],
            d["recording"]["metadata"]["chunks"]
        );
        // Complete without duration from the agent: last event of chunk 39 (39.5 → 40).
        let (st, _) = s
            .agent(json!({"action": "complete", "node_key": s.fx.node_key, "session_id": rec}))
            .await;
        assert_eq!(st, 200);
        let d = s.get(&rec).await;
        assert_eq!(d["recording"]["duration_seconds"], 40);
        assert_eq!(
            s.stores.metadata_column(&rec).await["chunks"],
            d["recording"]["metadata"]["chunks"]
        );
        // Different bodies sent for one index at once: whichever is stored, the row describes
        // it (integrity compares each chunk's size and SHA-256 with its object).
        for trial in 0..8 {
            let rec = agent_start(s).await;
            let uploads: Vec<_> = (0..6)
                .map(|n| {
                    let data = format!("[{n}.5, \"o\", \"{}\"]\n", "y".repeat(1 + n * 40_000));
                    agent_task(
                        s,
                        json!({"action": "upload_chunk", "node_key": s.fx.node_key, "session_id": rec, "chunk_index": 0, "chunk_data": data}),
                    )
                })
                .collect();
            for u in uploads {
                let (st, b) = u.await.unwrap();
                assert_eq!(st, 200, "{b}");
            }
            let d = s.get(&rec).await;
            assert_eq!(d["integrity"], "ok", "trial {trial}: {d}");
            assert_eq!(
                s.stores.metadata_column(&rec).await["chunks"],
                d["recording"]["metadata"]["chunks"],
                "trial {trial}"
            );
        }
    }

    /// Posts `body` to the agent route on its own task.
    fn agent_task(s: &Server, body: Value) -> tokio::task::JoinHandle<(u16, Value)> {
        let http = s.http.clone();
        let url = format!("{}/api/session-recording-agent", s.base);
        tokio::spawn(async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            let st = r.status().as_u16();
            (st, r.json().await.unwrap())
        })
    }

    /// Starts a recording on the agent route; returns its id.
    async fn agent_start(s: &Server) -> String {
        let (st, b) = s
            .agent(json!({"action": "start", "node_key": s.fx.node_key, "session_type": "ssh", "header": {"version": 2, "width": 80, "height": 24}}))
            .await;
        assert_eq!(st, 201, "{b}");
        b["data"]["session_id"].as_str().unwrap().to_string()
    }

    /// Uploads racing a `complete` or a `delete`: each upload is either in the recording (and
    /// its summary, and its duration) or refused, and a deleted recording leaves no object.
    pub async fn races(s: &Server) {
        let org = &s.fx.org;
        // One address given at once in two cases is one user (addresses are compared without
        // case; on PostgreSQL two creates used to insert one row each).
        let o: uuid::Uuid = org.parse().unwrap();
        for i in 0..6 {
            let (x, y) = (format!("Race{i}@acme.test"), format!("race{i}@ACME.test"));
            let (a, b) = tokio::join!(
                s.app.create_user(o, &x, Role::Member),
                s.app.create_user(o, &y, Role::Member),
            );
            assert_eq!(a.unwrap(), b.unwrap(), "race{i}");
        }
        let upload = |rec: &str, i: u64| json!({"action": "upload_chunk", "node_key": s.fx.node_key, "session_id": rec, "chunk_index": i, "chunk_data": format!("[{}.5, \"o\", \"{}\"]\n", i * 10, "x".repeat(20_000))});
        for trial in 0..8 {
            let rec = agent_start(s).await;
            assert_eq!(s.agent(upload(&rec, 0)).await.0, 200);
            let uploads: Vec<_> = (1..8).map(|i| agent_task(s, upload(&rec, i))).collect();
            let done = agent_task(
                s,
                json!({"action": "complete", "node_key": s.fx.node_key, "session_id": rec}),
            );
            let (st, b) = done.await.unwrap();
            assert_eq!(st, 200, "{b}");
            let mut accepted = vec![0];
            for (i, u) in uploads.into_iter().enumerate() {
                let (st, b) = u.await.unwrap();
                match st {
                    200 => accepted.push(i as i64 + 1),
                    409 => assert_eq!(code(&b), "CONFLICT"),
                    _ => panic!("trial {trial}: upload answered {st}: {b}"),
                }
            }
            let d = s.get(&rec).await;
            let listed = |v: &Value| -> Vec<i64> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["index"].as_i64().unwrap())
                    .collect()
            };
            let mut rows = listed(&d["recording"]["metadata"]["chunks"]);
            assert_eq!(
                rows,
                listed(&d["r2_data"]["chunks"]),
                "trial {trial}: {d:#}"
            );
            rows.sort();
            accepted.sort();
            assert_eq!(rows, accepted, "trial {trial}");
            let last = *rows.last().unwrap();
            assert_eq!(
                d["recording"]["duration_seconds"],
                last * 10 + 1,
                "trial {trial}"
            );
            assert_eq!(d["r2_data"]["duration_seconds"], last * 10 + 1);
            assert_eq!(d["integrity"], "ok");
        }
        for trial in 0..8 {
            let rec = agent_start(s).await;
            assert_eq!(s.agent(upload(&rec, 0)).await.0, 200);
            let uploads: Vec<_> = (1..8).map(|i| agent_task(s, upload(&rec, i))).collect();
            let (st, b) = s
                .admin(json!({"action": "delete", "org_id": org, "session_id": rec}))
                .await;
            assert_eq!(st, 200, "{b}");
            for u in uploads {
                let (st, b) = u.await.unwrap();
                assert!(
                    st == 200 || st == 404,
                    "trial {trial}: upload answered {st}: {b}"
                );
            }
            for i in 0..8 {
                let k = format!("recordings/{org}/{rec}/chunk-{i}.cast");
                assert!(
                    s.stores.get_object(&k).await.is_none(),
                    "trial {trial}: {k} outlived its recording"
                );
            }
        }
    }

    /// Values a careless or hostile client sends: refused with the contract's codes, the same
    /// on both backends, or clamped where the contract clamps.
    /// Two `complete`s at once: one wins, and the summary object is the winner's. An upload
    /// that loses to a `complete` leaves the chunk as it was. A `complete` that loses to a
    /// `delete` says NOT_FOUND.
    pub async fn complete_races(s: &Server) {
        let nk = &s.fx.node_key;
        for trial in 0..10 {
            let rec = agent_start(s).await;
            let up = |data: &str| json!({"action": "upload_chunk", "node_key": nk, "session_id": rec, "chunk_index": 0, "chunk_data": data});
            assert_eq!(s.agent(up("[0.5, \"o\", \"v1\"]\n")).await.0, 200);
            let late = agent_task(
                s,
                up(&format!("[0.5, \"o\", \"{}\"]\n", "v2".repeat(30_000))),
            );
            let done: Vec<_> = [5, 7]
                .iter()
                .map(|d| {
                    agent_task(
                        s,
                        json!({"action": "complete", "node_key": nk, "session_id": rec, "duration_seconds": d}),
                    )
                })
                .collect();
            let mut won = Vec::new();
            for (d, t) in [5, 7].into_iter().zip(done) {
                let (st, b) = t.await.unwrap();
                match st {
                    200 => won.push(d),
                    409 => assert_eq!(code(&b), "CONFLICT"),
                    _ => panic!("trial {trial}: complete answered {st}: {b}"),
                }
            }
            assert_eq!(won.len(), 1, "trial {trial}: {won:?}");
            let (st, b) = late.await.unwrap();
            assert!(st == 200 || st == 409, "trial {trial}: {st} {b}");
            let d = s.get(&rec).await;
            assert_eq!(d["recording"]["duration_seconds"], won[0], "trial {trial}");
            assert_eq!(
                d["r2_data"]["duration_seconds"], won[0],
                "trial {trial}: {d:#}"
            );
            assert_eq!(
                d["r2_data"]["chunks"], d["recording"]["metadata"]["chunks"],
                "trial {trial}"
            );
            assert_eq!(d["integrity"], "ok", "trial {trial}: {d:#}");

            let rec = agent_start(s).await;
            let done = agent_task(
                s,
                json!({"action": "complete", "node_key": nk, "session_id": rec}),
            );
            let (st, b) = s
                .admin(json!({"action": "delete", "org_id": s.fx.org, "session_id": rec}))
                .await;
            assert_eq!(st, 200, "{b}");
            let (st, b) = done.await.unwrap();
            assert!(
                st == 200 || (st, code(&b)) == (404, "NOT_FOUND"),
                "trial {trial}: {st} {b}"
            );
        }
    }

    pub async fn hostile_values(s: &Server) {
        let org = &s.fx.org;
        let nk = &s.fx.node_key;
        // A last event past 68 years would make a duration, and the org's sum of them, overflow.
        let (st, b) = s
            .agent(json!({"node_key": nk, "session_type": "ssh", "session_data": {"transcript": "[1e300, \"o\", \"x\"]"}}))
            .await;
        assert_eq!((st, code(&b)), (400, "INVALID_CHUNK"), "{b}");
        let (st, b) = s
            .agent(json!({"node_key": nk, "session_type": "ssh", "session_data": {"transcript": "[0, \"o\", \"x\"]", "duration_seconds": 9e15}}))
            .await;
        assert_eq!((st, code(&b)), (400, "INVALID_FIELD"), "{b}");
        let rec = agent_start(s).await;
        let (st, b) = s
            .agent(json!({"action": "upload_chunk", "node_key": nk, "session_id": rec, "chunk_index": 0, "chunk_data": "[2147483648, \"o\", \"x\"]"}))
            .await;
        assert_eq!((st, code(&b)), (400, "INVALID_CHUNK"), "{b}");
        let (st, _) = s
            .agent(json!({"node_key": nk, "session_type": "ssh", "session_data": {"transcript": "[2147483647, \"o\", \"x\"]"}}))
            .await;
        assert_eq!(st, 201);
        let (st, b) = s.admin(json!({"action": "list", "org_id": org})).await;
        assert_eq!(st, 200, "{b}");

        // U+0000: PostgreSQL's jsonb has no room for it; refused on both.
        let header = json!({"version": 2, "width": 80, "height": 24});
        for (field, header, metadata) in [
            ("metadata", header.clone(), json!({"user": "a\u{0}b"})),
            ("metadata", header.clone(), json!({"a\u{0}": 1})),
            (
                "header",
                json!({"version": 2, "width": 80, "height": 24, "env": {"TERM": "x\u{0}"}}),
                json!({}),
            ),
        ] {
            let (st, b) = s
                .agent(json!({"action": "start", "node_key": nk, "session_type": "ssh", "header": header, "metadata": metadata}))
                .await;
            assert_eq!((st, code(&b)), (400, "INVALID_FIELD"), "{b}");
            assert!(
                b["error"]["message"].as_str().unwrap().contains(field),
                "{b}"
            );
        }
        let (st, b) = s
            .agent(json!({"action": "complete", "node_key": nk, "session_id": rec, "metadata": {"note": ["\u{0}"]}}))
            .await;
        assert_eq!((st, code(&b)), (400, "INVALID_FIELD"), "{b}");
        let (st, b) = s
            .agent(json!({"node_key": nk, "session_type": "ssh", "session_data": {"transcript": "{\"version\": 2, \"width\": 80, \"height\": 24, \"title\": \"\\u0000\"}\n[0, \"o\", \"x\"]"}}))
            .await;
        // The header is a line of the transcript: a bad one is a bad transcript.
        assert_eq!((st, code(&b)), (400, "INVALID_CHUNK"), "{b}");
        // NUL in terminal output is fine: it is in the chunk, not in a JSON column.
        let (st, b) = s
            .agent(json!({"action": "upload_chunk", "node_key": nk, "session_id": rec, "chunk_index": 0, "chunk_data": "[0.5, \"o\", \"a\\u0000b\"]"}))
            .await;
        assert_eq!(st, 200, "{b}");

        // A negative zero reads back the same on both backends (jsonb has none).
        let (st, b) = s
            .agent(json!({"action": "start", "node_key": nk, "session_type": "ssh", "header": header, "metadata": {"z": -0.0, "deep": [{"z": -0.0}]}}))
            .await;
        assert_eq!(st, 201, "{b}");
        let d = s.get(b["data"]["session_id"].as_str().unwrap()).await;
        let m = &d["recording"]["metadata"];
        assert_eq!(
            (m["z"].to_string(), m["deep"][0]["z"].to_string()),
            ("0.0".into(), "0.0".into()),
            "{m}"
        );

        // Numbers past 64 bits clamp like any other out-of-range value.
        for (v, want) in [
            ("9223372036854775808", 365),
            ("1e20", 365),
            ("18446744073709551616", 365),
            ("-1e30", 1),
        ] {
            let body = format!(
                "{{\"action\": \"update_settings\", \"org_id\": \"{org}\", \"retention_days\": {v}}}"
            );
            let (st, b) = s.raw_user(Some(&s.fx.admin_token), body.into_bytes()).await;
            assert_eq!(st, 200, "{v}: {b}");
            let (_, b) = s
                .admin(json!({"action": "get_settings", "org_id": org}))
                .await;
            assert_eq!(b["data"]["retention_days"], want, "{v}");
        }
        let body = format!(
            "{{\"action\": \"list\", \"org_id\": \"{org}\", \"limit\": 18446744073709551616}}"
        );
        let (st, b) = s.raw_user(Some(&s.fx.admin_token), body.into_bytes()).await;
        assert_eq!(st, 200, "{b}");
    }

    /// An agent says when a session that waited in its spool really started and ended;
    /// the backend believes it within 30 days, never in the future, never before the start.
    /// Input that would mean two things, or that players and `list` pages trust, is refused
    /// and changes nothing; so is a method other than POST, and a body that stops arriving.
    pub async fn strict_input(s: &Server) {
        let org = &s.fx.org;
        let nk = &s.fx.node_key;
        // Arrays and objects cost tens of bytes each once parsed: a body of over 100,000 is
        // refused before parsing (16 MiB of `[0,0,…]` took 270 MiB).
        let many = format!(
            "{{\"action\": \"config\", \"node_key\": \"x\", \"pad\": [{}0]}}",
            "0,".repeat(100_000)
        );
        assert_err(s.raw_agent(many.into_bytes()).await, 400, "INVALID_JSON");
        // Deeper than the parser goes: refused, and said why (it said "not valid JSON").
        let deep = format!(
            "{{\"action\": \"config\", \"node_key\": \"x\", \"pad\": {}{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        let (st, b) = s.raw_agent(deep.into_bytes()).await;
        assert_eq!((st, code(&b)), (400, "INVALID_JSON"), "{b}");
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("128 levels"),
            "{b}"
        );
        // Commas and brackets inside strings are text, not values.
        let text = format!("[0, \"o\", \"{}\"]", "[{,:".repeat(60_000));
        let (st, b) = s
            .agent(json!({"action": "report", "node_key": nk, "session_type": "ssh", "session_data": {"transcript": text}}))
            .await;
        assert_eq!(st, 201, "{b}");
        // HTTP/2 (without TLS) is not spoken: hyper times no HTTP/2 request head, and a
        // client that sent only the preface held its connection for ever.
        {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let addr = s.base.trim_start_matches("http://").to_string();
            let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
            c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
                .await
                .unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut answer))
                .await
                .expect("an HTTP/2 preface ends its connection")
                .ok();
        }
        // A node key that is not a string is a malformed field, checked before credentials.
        assert_err(
            s.agent(json!({"action": "config", "node_key": 5})).await,
            400,
            "INVALID_FIELD",
        );
        // A query parameter given twice on the cast endpoint, as a key twice in a body.
        let rec = s.start_recording().await;
        let r = s
            .http
            .get(format!(
                "{}/api/session-recording/cast?org_id={org}&session_id={rec}&org_id={}",
                s.base,
                uuid::Uuid::new_v4()
            ))
            .bearer_auth(&s.fx.admin_token)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        assert_err((status, r.json().await.unwrap()), 400, "INVALID_FIELD");
        // A key given twice: a proxy reading the first would see another action than ours.
        let old = s.agent(json!({"node_key": nk, "session_type": "ssh", "session_data": {"transcript": "[0, \"o\", \"x\"]"}})).await;
        assert_eq!(old.0, 201);
        s.app
            .update_settings(
                org.parse().unwrap(),
                ztna_recorder_server::SettingsUpdate {
                    recording_enabled: None,
                    retention_days: Some(1),
                    storage_mode: None,
                },
            )
            .await
            .unwrap();
        let t = s.fx.admin_token.clone();
        let (st, b) = s
            .raw_user(
                Some(&t),
                format!(r#"{{"action": "get_settings", "action": "cleanup", "org_id": "{org}"}}"#)
                    .into_bytes(),
            )
            .await;
        assert_eq!((st, code(&b)), (400, "INVALID_JSON"), "{b}");
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("\"action\" is given twice"),
            "{b}"
        );
        let (st, b) = s
            .raw_user(
                Some(&t),
                format!(r#"{{"action": "get_settings", "org_id": "{org}", "org_id": "{org}"}}"#)
                    .into_bytes(),
            )
            .await;
        assert_eq!((st, code(&b)), (400, "INVALID_JSON"), "{b}");
        // Keys inside values are the caller's own business; one key each at the top is fine.
        let (st, b) = s
            .raw_user(
                Some(&t),
                format!(r#"{{"action": "get_settings", "org_id": "{org}"}}"#).into_bytes(),
            )
            .await;
        assert_eq!(st, 200, "{b}");

        // Any method but POST: 405 with the envelope and `Allow: POST`.
        for route in ["/api/session-recording", "/api/session-recording-agent"] {
            for method in [
                reqwest::Method::GET,
                reqwest::Method::PUT,
                reqwest::Method::DELETE,
            ] {
                let r = s
                    .http
                    .request(method.clone(), format!("{}{route}", s.base))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 405, "{method} {route}");
                assert_eq!(r.headers()["allow"], "POST");
                let b: Value = r.json().await.unwrap();
                assert_eq!(b["success"], false);
                assert_eq!(code(&b), "METHOD_NOT_ALLOWED", "{b}");
            }
        }
        // The GET routes answer other methods the same way, with `Allow: GET, HEAD`.
        for route in [
            "/",
            "/healthz",
            "/metrics",
            "/api/session-recording/cast?org_id=x&session_id=y",
        ] {
            let r = s
                .http
                .post(format!("{}{route}", s.base))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 405, "POST {route}");
            assert_eq!(r.headers()["allow"], "GET, HEAD");
            let b: Value = r.json().await.unwrap();
            assert_eq!(code(&b), "METHOD_NOT_ALLOWED", "{b}");
        }

        // Headers: what asciicast v2 says of each known key.
        let start = |header: Value| json!({"action": "start", "node_key": nk, "session_type": "ssh", "header": header});
        let before =
            s.admin(json!({"action": "list", "org_id": org})).await.1["data"]["total"].clone();
        for bad in [
            json!({"version": 2}),
            json!({"version": 2, "width": -1, "height": 24}),
            json!({"version": 2, "width": 80, "height": 1e9}),
            json!({"version": 2, "width": 0, "height": 24}),
            json!({"version": 2, "width": "wide", "height": 24}),
            json!({"version": 2, "width": 80.5, "height": 24}),
            json!({"version": 2, "width": 80, "height": 24, "timestamp": "yesterday"}),
            json!({"version": 2, "width": 80, "height": 24, "env": 5}),
            json!({"version": 2, "width": 80, "height": 24, "env": {"TERM": 5}}),
            json!({"version": 2, "width": 80, "height": 24, "idle_time_limit": -5}),
            json!({"version": 2, "width": 80, "height": 24, "title": ["x"]}),
            json!({"version": 2, "width": 80, "height": 24, "theme": "dark"}),
            json!({"version": 2, "width": 80, "height": 24, "title": "t".repeat(70_000)}),
        ] {
            let (st, b) = s.agent(start(bad.clone())).await;
            assert_eq!((st, code(&b)), (400, "INVALID_FIELD"), "{bad}: {b}");
            let (st, b) = s
                .agent(json!({"node_key": nk, "session_type": "ssh", "session_data": {"transcript": format!("{bad}\n[0, \"o\", \"x\"]")}}))
                .await;
            assert_eq!((st, code(&b)), (400, "INVALID_CHUNK"), "{bad}: {b}");
        }
        // Optional keys may be null (asciinema 2 writes an unset variable as null), and keys
        // asciicast does not know are kept.
        let fine = json!({"version": 2, "width": 80, "height": 24, "timestamp": null,
            "env": {"SHELL": "/bin/bash", "TERM": null}, "idle_time_limit": 2.5, "x-ours": [1]});
        let (st, b) = s.agent(start(fine.clone())).await;
        assert_eq!(st, 201, "{b}");
        let rec = b["data"]["session_id"].as_str().unwrap().to_string();
        let got = s
            .admin(json!({"action": "get", "org_id": org, "session_id": rec}))
            .await
            .1;
        assert_eq!(got["data"]["recording"]["metadata"]["header"], fine);

        // Metadata: 64 KiB as JSON at most, on start and on complete.
        let (st, b) = s
            .agent(
                json!({"action": "start", "node_key": nk, "session_type": "ssh",
                "header": {"version": 2, "width": 80, "height": 24},
                "metadata": {"x": "a".repeat(70_000)}}),
            )
            .await;
        assert_eq!((st, code(&b)), (400, "INVALID_FIELD"), "{b}");
        let (st, b) = s
            .agent(
                json!({"action": "start", "node_key": nk, "session_type": "ssh",
                "header": {"version": 2, "width": 80, "height": 24},
                "metadata": {"x": "a".repeat(60_000)}}),
            )
            .await;
        assert_eq!(st, 201, "{b}");
        let (st, b) = s
            .agent(
                json!({"action": "complete", "node_key": nk, "session_id": rec,
                "metadata": {"x": "a".repeat(70_000)}}),
            )
            .await;
        assert_eq!((st, code(&b)), (400, "INVALID_FIELD"), "{b}");
        let after = s
            .admin(json!({"action": "list", "org_id": org, "status": "completed"}))
            .await
            .1;
        assert!(
            after["data"]["recordings"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["id"] != rec.as_str()),
            "a refused complete completed it"
        );
        let total =
            s.admin(json!({"action": "list", "org_id": org})).await.1["data"]["total"].clone();
        assert_eq!(
            total.as_i64().unwrap(),
            before.as_i64().unwrap() + 2,
            "only the two good starts made recordings"
        );

        // Event times in order within a chunk (equal is fine); the duration is the last one's.
        let chunk = |data: &str| json!({"action": "upload_chunk", "node_key": nk, "session_id": rec, "chunk_index": 0, "chunk_data": data});
        let (st, b) = s
            .agent(chunk("[5, \"o\", \"a\"]\n[2, \"o\", \"b\"]\n"))
            .await;
        assert_eq!((st, code(&b)), (400, "INVALID_CHUNK"), "{b}");
        assert!(
            b["error"]["message"].as_str().unwrap().contains("line 2"),
            "{b}"
        );
        let (st, b) = s
            .agent(json!({"node_key": nk, "session_type": "ssh", "session_data": {"transcript": "[5, \"o\", \"a\"]\n[2, \"o\", \"b\"]"}}))
            .await;
        assert_eq!((st, code(&b)), (400, "INVALID_CHUNK"), "{b}");
        let (st, b) = s
            .agent(chunk(
                "[1.5, \"o\", \"a\"]\n[1.5, \"o\", \"b\"]\n[2.25, \"r\", \"100x30\"]\n",
            ))
            .await;
        assert_eq!(st, 200, "{b}");
        let (st, b) = s
            .agent(json!({"action": "complete", "node_key": nk, "session_id": rec}))
            .await;
        assert_eq!(st, 200, "{b}");
        let got = s
            .admin(json!({"action": "get", "org_id": org, "session_id": rec}))
            .await
            .1;
        assert_eq!(got["data"]["recording"]["duration_seconds"], 3);

        // A body that stops arriving is answered (after the idle timeout, 3 s in these tests)
        // and its connection closed, not held for ever.
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let addr = s.base.trim_start_matches("http://").to_string();
        // A request head that stops arriving, or never starts: the connection is closed, with
        // no answer.
        let heads: [&[u8]; 2] = [
            b"POST /api/session-recording-agent HTTP/1.1\r\nHost: x\r\nX-A: ",
            b"",
        ];
        for head in heads {
            let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
            c.write_all(head).await.unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(
                std::time::Duration::from_secs(20),
                c.read_to_end(&mut answer),
            )
            .await
            .expect("a stalled request head ends its connection")
            .ok();
        }
        for (length, status) in [("100", "400"), ("99999999", "413")] {
            let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
            c.write_all(format!("POST /api/session-recording-agent HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{").as_bytes())
                .await
                .unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(
                std::time::Duration::from_secs(20),
                c.read_to_end(&mut answer),
            )
            .await
            .expect("a stalled body is answered and closed")
            .unwrap();
            let answer = String::from_utf8_lossy(&answer);
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status}")),
                "{answer}"
            );
        }
    }

    pub async fn agent_times(s: &Server) {
        let nk = &s.fx.node_key;
        let now = time::OffsetDateTime::now_utc();
        let fmt = |t: time::OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap()
        };
        let parse = |v: &Value| {
            time::OffsetDateTime::parse(
                v.as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
        };
        let header = json!({"version": 2, "width": 80, "height": 24});
        let start = |at: Option<String>| {
            let mut b =
                json!({"action": "start", "node_key": nk, "session_type": "ssh", "header": header});
            if let Some(t) = at {
                b["started_at"] = json!(t);
            }
            b
        };
        let two_days = now - time::Duration::days(2);
        let (st, b) = s.agent(start(Some(fmt(two_days)))).await;
        assert_eq!(st, 201, "{b}");
        let rec = b["data"]["session_id"].as_str().unwrap().to_string();
        let ended = two_days + time::Duration::minutes(5);
        let (st, b) = s
            .agent(json!({"action": "complete", "node_key": nk, "session_id": rec, "duration_seconds": 300, "ended_at": fmt(ended)}))
            .await;
        assert_eq!(st, 200, "{b}");
        let r = &s.get(&rec).await["recording"];
        let close = |a: time::OffsetDateTime, b: time::OffsetDateTime| {
            (a - b).abs() < time::Duration::seconds(1)
        };
        assert!(close(parse(&r["started_at"]), two_days), "{r}");
        assert!(close(parse(&r["ended_at"]), ended), "{r}");
        // Not believed: in the future, 60 days back, an end before the start.
        for at in [
            now + time::Duration::hours(1),
            now - time::Duration::days(60),
        ] {
            let (_, b) = s.agent(start(Some(fmt(at)))).await;
            let rec = b["data"]["session_id"].as_str().unwrap();
            let r = &s.get(rec).await["recording"];
            assert!(
                (parse(&r["started_at"]) - now).abs() < time::Duration::minutes(1),
                "{r}"
            );
            let (st, _) = s
                .agent(json!({"action": "complete", "node_key": nk, "session_id": rec, "ended_at": fmt(now - time::Duration::days(1))}))
                .await;
            assert_eq!(st, 200);
            let r = &s.get(rec).await["recording"];
            assert!(parse(&r["ended_at"]) >= parse(&r["started_at"]), "{r}");
        }
        let (st, b) = s.agent(start(Some("yesterday".into()))).await;
        assert_eq!((st, code(&b)), (400, "INVALID_FIELD"), "{b}");
    }

    pub async fn delete_and_cleanup(s: &Server) {
        let org = &s.fx.org;
        // delete: the row and every object.
        let rec = s.start_recording().await;
        s.member(json!({"action": "upload_chunk", "org_id": org, "session_id": rec, "chunk_data": "[0, \"o\", \"x\"]"}))
            .await;
        s.member(
            json!({"action": "complete", "org_id": org, "session_id": rec, "duration_seconds": 1}),
        )
        .await;
        let k0 = format!("recordings/{org}/{rec}/chunk-0.cast");
        let ks = format!("session-recordings/{org}/{rec}/recording.json");
        assert!(s.stores.get_object(&k0).await.is_some());
        assert!(s.stores.get_object(&ks).await.is_some());
        let (st, b) = s
            .admin(json!({"action": "delete", "org_id": org, "session_id": rec}))
            .await;
        assert_eq!(st, 200);
        assert_eq!(b["data"], json!({"deleted": rec}));
        assert!(s.stores.get_object(&k0).await.is_none());
        assert!(s.stores.get_object(&ks).await.is_none());
        assert_err(
            s.admin(json!({"action": "get", "org_id": org, "session_id": rec}))
                .await,
            404,
            "NOT_FOUND",
        );
        assert_err(
            s.admin(json!({"action": "delete", "org_id": org, "session_id": rec}))
                .await,
            404,
            "NOT_FOUND",
        );
        // cleanup: everything older than the retention, whatever its status.
        s.admin(json!({"action": "update_settings", "org_id": org, "retention_days": 30}))
            .await;
        let old_active = s.start_recording().await;
        let old_done = s.start_recording().await;
        let young = s.start_recording().await;
        for r in [&old_active, &old_done, &young] {
            s.member(json!({"action": "upload_chunk", "org_id": org, "session_id": r, "chunk_data": "[0, \"o\", \"x\"]"}))
                .await;
        }
        s.member(json!({"action": "complete", "org_id": org, "session_id": old_done, "duration_seconds": 1}))
            .await;
        s.stores.backdate(&old_active, 31).await;
        s.stores.backdate(&old_done, 45).await;
        s.stores.backdate(&young, 29).await;
        let (st, b) = s.admin(json!({"action": "cleanup", "org_id": org})).await;
        assert_eq!(st, 200, "{b}");
        assert_eq!(b["data"], json!({"deleted": 2}));
        for r in [&old_active, &old_done] {
            assert!(s
                .stores
                .get_object(&format!("recordings/{org}/{r}/chunk-0.cast"))
                .await
                .is_none());
            assert_err(
                s.admin(json!({"action": "get", "org_id": org, "session_id": r}))
                    .await,
                404,
                "NOT_FOUND",
            );
        }
        assert!(s
            .stores
            .get_object(&format!(
                "session-recordings/{org}/{old_done}/recording.json"
            ))
            .await
            .is_none());
        assert_eq!(s.get(&young).await["recording"]["status"], "active");
        let (_, b) = s.admin(json!({"action": "cleanup", "org_id": org})).await;
        assert_eq!(b["data"], json!({"deleted": 0}));
        // A sweep that finds its objects already gone (a half-done earlier sweep) finishes.
        s.stores.backdate(&young, 10).await;
        s.stores
            .delete_object(&format!("recordings/{org}/{young}/chunk-0.cast"))
            .await;
        assert_eq!(s.app.sweep().await.unwrap(), 1);
        assert_err(
            s.admin(json!({"action": "get", "org_id": org, "session_id": young}))
                .await,
            404,
            "NOT_FOUND",
        );

        // A row an upload holds (locked as a PostgreSQL server process locks it while it
        // writes a chunk's object) is waited for, not skipped.
        if let Some(url) = &s.stores.database_url {
            let held = s.start_recording().await;
            s.stores.backdate(&held, 40).await;
            let mut holder = <sqlx::PgConnection as sqlx::Connection>::connect(url)
                .await
                .unwrap();
            sqlx::raw_sql("BEGIN").execute(&mut holder).await.unwrap();
            sqlx::query(
                "SELECT status FROM session_recordings WHERE id = $1::uuid FOR NO KEY UPDATE",
            )
            .bind(&held)
            .execute(&mut holder)
            .await
            .unwrap();
            let probe = sqlx::PgPool::connect(url).await.unwrap();
            let cleanup = s.admin(json!({"action": "cleanup", "org_id": org}));
            tokio::pin!(cleanup);
            let mut released = false;
            let (st, b) = loop {
                tokio::select! {
                    r = &mut cleanup => break r,
                    () = tokio::time::sleep(Duration::from_millis(20)), if !released => {
                        let waiting: i64 = sqlx::query_scalar(
                            "SELECT count(*) FROM pg_stat_activity \
                             WHERE datname = current_database() AND wait_event_type = 'Lock'",
                        )
                        .fetch_one(&probe)
                        .await
                        .unwrap();
                        if waiting > 0 {
                            sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
                            released = true;
                        }
                    }
                }
            };
            assert_eq!(st, 200, "{b}");
            assert_eq!(b["data"], json!({"deleted": 1}), "released: {released}");
            assert!(released);
            probe.close().await;
        }
    }

    /// A sweep through a store that is not the one the recordings went to (a mistyped
    /// `STORE_URL`, a `--store` left out) deletes nothing: deleting the rows would leave their
    /// objects in the right store for good, listed nowhere.
    pub async fn a_sweep_on_the_wrong_store_deletes_nothing(s: &Server) {
        let org = &s.fx.org;
        let old = s.start_recording().await;
        let young = s.start_recording().await;
        for r in [&old, &young] {
            let (st, b) = s
                .member(json!({"action": "upload_chunk", "org_id": org, "session_id": r, "chunk_data": "[0, \"o\", \"x\"]"}))
                .await;
            assert_eq!(st, 200, "{b}");
        }
        let old_key = format!("recordings/{org}/{old}/chunk-0.cast");

        // The same database, an empty store beside it.
        let wrong = tempfile::tempdir().unwrap();
        let wrong_url = format!("file://{}", wrong.path().join("objects").display());
        let mut config = s.stores.config();
        config.store_url = Some(wrong_url.clone());
        let elsewhere = App::open(config).await.unwrap();
        // Nothing to sweep yet: nothing looked for, nothing refused.
        assert_eq!(elsewhere.sweep().await.unwrap(), 0);
        s.stores.backdate(&old, 400).await;
        let e = elsewhere.sweep().await.unwrap_err().to_string();
        assert!(
            e.contains("STORE_URL") && e.contains("Nothing was deleted") && e.contains(&young),
            "{e}"
        );
        drop(elsewhere);
        // The CLI says so on stderr, prints nothing and fails.
        let mut args = s.stores.cli_args();
        match args.iter().position(|a| a == "--store") {
            Some(i) => args[i + 1] = wrong_url.clone(),
            None => args.extend(["--store".to_string(), wrong_url.clone()]),
        }
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ztna-recorder-server"))
            .args(["admin", "sweep"])
            .args(&args)
            .env_remove("DATABASE_URL")
            .env_remove("STORE_URL")
            .output()
            .await
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && out.stdout.is_empty(), "{err}");
        assert!(err.contains("STORE_URL"), "{err}");
        // Nothing went: the row, and its object in the right store.
        assert_eq!(s.get(&old).await["recording"]["status"], "active");
        assert!(s.stores.get_object(&old_key).await.is_some());

        // Through the right store the sweep deletes as before.
        assert_eq!(s.app.sweep().await.unwrap(), 1);
        assert!(s.stores.get_object(&old_key).await.is_none());
        assert_eq!(s.get(&young).await["recording"]["status"], "active");
    }

    pub async fn integrity(s: &Server) {
        let org = &s.fx.org;
        let rec = s.start_recording().await;
        for i in 0..3 {
            s.member(json!({"action": "upload_chunk", "org_id": org, "session_id": rec, "chunk_index": i, "chunk_data": "[0, \"o\", \"x\"]"}))
                .await;
        }
        assert_eq!(s.get(&rec).await["integrity"], "ok");
        let k1 = format!("recordings/{org}/{rec}/chunk-1.cast");
        s.stores.put_object(&k1, b"[0, \"o\", \"y\"]\n").await;
        assert_eq!(s.get(&rec).await["integrity"], "mismatch");
        s.stores.delete_object(&k1).await;
        assert_eq!(s.get(&rec).await["integrity"], "missing");
        // Re-sending the chunk repairs it.
        s.member(json!({"action": "upload_chunk", "org_id": org, "session_id": rec, "chunk_index": 1, "chunk_data": "[0, \"o\", \"x\"]"}))
            .await;
        assert_eq!(s.get(&rec).await["integrity"], "ok");

        // Past 64 MiB a `get` reads no more chunks whole: the rest are checked by their size.
        let big = s.start_recording().await;
        let line = format!("[0, \"o\", \"{}\"]\n", "z".repeat(7_500_000));
        for i in 0..9 {
            let (st, b) = s.member(json!({"action": "upload_chunk", "org_id": org, "session_id": big, "chunk_index": i, "chunk_data": line})).await;
            assert_eq!(st, 200, "{b}");
        }
        assert_eq!(s.get(&big).await["integrity"], "sizes_ok");
        // Within the first 64 MiB a change of the same size is still found.
        let k0 = format!("recordings/{org}/{big}/chunk-0.cast");
        let mut changed = line.clone().into_bytes();
        changed[20] = b'q';
        s.stores.put_object(&k0, &changed).await;
        assert_eq!(s.get(&big).await["integrity"], "mismatch");
        s.stores.put_object(&k0, line.as_bytes()).await;
        assert_eq!(s.get(&big).await["integrity"], "sizes_ok");
        let k8 = format!("recordings/{org}/{big}/chunk-8.cast");
        s.stores.put_object(&k8, b"[0, \"o\", \"y\"]\n").await;
        assert_eq!(s.get(&big).await["integrity"], "mismatch");
        s.stores.delete_object(&k8).await;
        assert_eq!(s.get(&big).await["integrity"], "missing");
    }

    /// The admin commands of the binary, against the same stores as the running server.
    pub async fn admin_cli(s: &Server) {
        let bin = env!("CARGO_BIN_EXE_ztna-recorder-server");
        let base_args = s.stores.cli_args();
        let run = |args: &[&str]| {
            let mut all: Vec<String> = vec!["admin".into()];
            all.extend(args.iter().map(|a| a.to_string()));
            all.extend(base_args.iter().cloned());
            let out = std::process::Command::new(bin)
                .args(&all)
                .env_remove("DATABASE_URL")
                .env_remove("STORE_URL")
                .env_remove("JWT_SECRET")
                .output()
                .unwrap();
            let stdout = String::from_utf8(out.stdout).unwrap();
            (
                out.status.success(),
                stdout,
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        };
        let one_json = |(ok, out, err): (bool, String, String)| -> Value {
            assert!(ok, "admin failed: {err}");
            assert_eq!(out.lines().count(), 1, "exactly one line: {out:?}");
            let v: Value = serde_json::from_str(&out).unwrap();
            assert!(v.is_object());
            v
        };
        // A name is one line of a listing: no newline (it would forge one), not empty.
        for bad in ["Initech\nEvil", " ", "\u{7}bell"] {
            let (ok, out, err) = run(&["org", "create", "--name", bad]);
            assert!(
                !ok && out.is_empty() && err.contains("name"),
                "{bad:?}: {err}"
            );
        }
        let v = one_json(run(&["org", "create", "--name", "Initech"]));
        let org = v["org_id"].as_str().unwrap().to_string();
        assert_eq!(v.as_object().unwrap().len(), 1);
        let v = one_json(run(&[
            "user",
            "create",
            "--org",
            &org,
            "--email",
            "boss@initech.test",
            "--role",
            "admin",
        ]));
        let user = v["user_id"].as_str().unwrap().to_string();
        let v = one_json(run(&["token", "--user", &user, "--ttl-secs", "600"]));
        let token = v["token"].as_str().unwrap().to_string();
        // Feature off at creation without --feature.
        assert_err(
            s.user(
                Some(&token),
                json!({"action": "get_settings", "org_id": org}),
            )
            .await,
            403,
            "FEATURE_DISABLED",
        );
        let v = one_json(run(&[
            "feature",
            "enable",
            "--org",
            &org,
            "--name",
            "session_recording",
        ]));
        assert_eq!(
            v,
            json!({"org_id": org, "feature": "session_recording", "enabled": true})
        );
        let (st, b) = s
            .user(
                Some(&token),
                json!({"action": "get_settings", "org_id": org}),
            )
            .await;
        assert_eq!(st, 200, "{b}");
        let v = one_json(run(&[
            "machine", "register", "--org", &org, "--name", "Linux-C", "--owner", &user,
        ]));
        let machine = v["machine_id"].as_str().unwrap().to_string();
        let key = v["node_key"].as_str().unwrap().to_string();
        assert_eq!(key.len(), 128);
        assert!(key.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')));
        let (st, b) = s.agent(json!({"action": "config", "node_key": key})).await;
        assert_eq!(st, 200);
        assert_eq!(b["data"]["machine_id"], machine.as_str());
        // The lists show what was made, and never a node key.
        let v = one_json(run(&["machine", "list", "--org", &org]));
        assert_eq!(
            v,
            json!({"org_id": org, "machines": [{"machine_id": machine, "name": "Linux-C",
                "owner_id": user, "created_at": v["machines"][0]["created_at"]}]})
        );
        assert!(v["machines"][0]["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
        assert!(!v.to_string().contains(&key));
        let v = one_json(run(&["user", "list", "--org", &org]));
        assert_eq!(
            v,
            json!({"org_id": org, "users": [{"user_id": user, "email": "boss@initech.test",
                "role": "admin"}]})
        );
        let v = one_json(run(&["org", "list"]));
        let listed: Vec<&Value> = v["orgs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["org_id"] == org.as_str())
            .collect();
        assert_eq!(listed.len(), 1, "{v}");
        assert_eq!(listed[0]["name"], "Initech");
        assert_eq!(listed[0]["session_recording"], true);
        // A mistyped org is an error, not an empty list.
        let (ok, out, err) = run(&["user", "list", "--org", &uuid::Uuid::new_v4().to_string()]);
        assert!(
            !ok && out.is_empty() && err.contains("no such org"),
            "{err}"
        );
        let v = one_json(run(&["machine", "delete", "--machine", &machine]));
        assert_eq!(v, json!({"deleted": machine}));
        let v = one_json(run(&["machine", "list", "--org", &org]));
        assert_eq!(v["machines"], json!([]));
        let v = one_json(run(&[
            "feature",
            "disable",
            "--org",
            &org,
            "--name",
            "session_recording",
        ]));
        assert_eq!(v["enabled"], false);
        assert_err(
            s.user(
                Some(&token),
                json!({"action": "get_settings", "org_id": org}),
            )
            .await,
            403,
            "FEATURE_DISABLED",
        );
        // --feature at creation.
        let v = one_json(run(&[
            "org",
            "create",
            "--name",
            "Hooli",
            "--feature",
            "session_recording",
        ]));
        let org2 = v["org_id"].as_str().unwrap().to_string();
        let v = one_json(run(&[
            "user",
            "create",
            "--org",
            &org2,
            "--email",
            "gavin@hooli.test",
            "--role",
            "member",
        ]));
        // The same address again (in any case): the same account, and what changed is said.
        let gavin = v["user_id"].clone();
        let again = run(&[
            "user",
            "create",
            "--org",
            &org2,
            "--email",
            "Gavin@Hooli.test",
            "--role",
            "admin",
        ]);
        let said = again.2.clone();
        assert_eq!(one_json(again)["user_id"], gavin);
        assert!(
            said.contains("already had an account")
                && said.contains("changed from member to admin"),
            "{said}"
        );
        let again = run(&[
            "user",
            "create",
            "--org",
            &org2,
            "--email",
            "gavin@hooli.test",
            "--role",
            "admin",
        ]);
        let said = again.2.clone();
        assert_eq!(one_json(again)["user_id"], gavin);
        assert!(said.contains("was already admin"), "{said}");
        let again = run(&[
            "user",
            "create",
            "--org",
            &org,
            "--email",
            "gavin@hooli.test",
            "--role",
            "member",
        ]);
        assert!(
            again
                .2
                .contains(&format!("now a member of org {org} too, as member")),
            "{}",
            again.2
        );
        let again = run(&[
            "user",
            "create",
            "--org",
            &org2,
            "--email",
            "gavin@hooli.test",
            "--role",
            "member",
        ]);
        assert!(
            again.2.contains("changed from admin to member"),
            "{}",
            again.2
        );
        let t = one_json(run(&["token", "--user", v["user_id"].as_str().unwrap()]))["token"]
            .as_str()
            .unwrap()
            .to_string();
        let (st, b) = s
            .user(Some(&t), json!({"action": "get_settings", "org_id": org2}))
            .await;
        assert_eq!(st, 200, "{b}");
        assert_eq!(b["data"]["retention_days"], 90);
        // Errors: non-zero exit, a message naming the problem, nothing on stdout.
        let (ok, out, err) = run(&[
            "user",
            "create",
            "--org",
            &uuid::Uuid::new_v4().to_string(),
            "--email",
            "x@y",
            "--role",
            "admin",
        ]);
        assert!(
            !ok && out.is_empty() && err.contains("no such org"),
            "{err}"
        );
        for email in ["notanemail", "a b@c.test", "@c.test", "a@"] {
            let (ok, out, err) = run(&[
                "user", "create", "--org", &org, "--email", email, "--role", "member",
            ]);
            assert!(
                !ok && out.is_empty() && err.contains("email"),
                "{email}: {err}"
            );
        }
        let (ok, _, _) = run(&["token", "--user", "not-a-uuid"]);
        assert!(!ok);
        let (ok, _, err) = run(&["feature", "enable", "--org", &org, "--name", "teleport"]);
        assert!(!ok && err.contains("teleport"), "{err}");
        let (ok, _, _) = run(&["machine", "delete", "--machine", &machine]);
        assert!(!ok);
    }
}

// ---------------------------------------------------------------------------------------
// Whole-process tests
// ---------------------------------------------------------------------------------------

/// A TCP proxy to the S3 server that can be switched off: while off, it closes every
/// connection, those it already relays and new ones (a store that went away).
struct Toggle {
    url: String,
    up: Arc<std::sync::atomic::AtomicBool>,
    /// While set, connections are taken and held, with nothing relayed (a store that hangs).
    stalled: Arc<std::sync::atomic::AtomicBool>,
    relays: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Toggle {
    async fn start(target: &str) -> Toggle {
        let target = target.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let relays = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (u, st, r) = (up.clone(), stalled.clone(), relays.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !u.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                if st.load(std::sync::atomic::Ordering::SeqCst) {
                    r.lock().unwrap().push(tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(600)).await;
                        drop(client);
                    }));
                    continue;
                }
                let target = target.clone();
                r.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }));
            }
        });
        Toggle {
            url,
            up,
            stalled,
            relays,
        }
    }

    /// Holds new connections without relaying them; `false` closes those held, and relays
    /// again.
    fn stall(&self, on: bool) {
        self.stalled.store(on, std::sync::atomic::Ordering::SeqCst);
        if !on {
            for relay in self.relays.lock().unwrap().drain(..) {
                relay.abort();
            }
        }
    }

    fn set(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            for relay in self.relays.lock().unwrap().drain(..) {
                relay.abort();
            }
        }
    }
}

/// The object store unreachable mid-recording: an upload and a `complete` answer
/// INTERNAL_ERROR and change nothing (no chunk row, the recording still active); once the store
/// is back, the same calls go through, and what was acknowledged before is all there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_object_store_refuses_and_loses_nothing() {
    let mut stores = Stores::new(Backend::PgS3).await;
    let s3 = stores.s3.as_mut().unwrap();
    let proxy = Toggle::start(&s3.endpoint).await;
    s3.endpoint = proxy.url.clone();
    let s = Server::start_with(stores).await;
    let org = s.fx.org.clone();
    let session = s.start_recording().await;
    let upload = |i: u64| {
        json!({"action": "upload_chunk", "org_id": org, "session_id": session,
               "chunk_index": i, "chunk_data": format!("[{i}, \"o\", \"chunk {i}\"]\n")})
    };
    let complete =
        json!({"action": "complete", "org_id": org, "session_id": session, "duration_seconds": 2});
    let (st, b) = s.member(upload(0)).await;
    assert_eq!(st, 200, "{b}");

    proxy.set(false);
    assert_err(s.member(upload(1)).await, 500, "INTERNAL_ERROR");
    assert_err(s.member(complete.clone()).await, 500, "INTERNAL_ERROR");
    // The cast is refused with a status, not a 200 cut short after its header line.
    let r = s
        .http
        .get(format!(
            "{}/api/session-recording/cast?org_id={org}&session_id={session}",
            s.base
        ))
        .bearer_auth(&s.fx.member_token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_err((status, r.json().await.unwrap()), 500, "INTERNAL_ERROR");
    let d = s.get(&session).await;
    assert_eq!(d["recording"]["status"], "active", "{d}");
    let indexes: Vec<&Value> = d["recording"]["metadata"]["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["index"])
        .collect();
    assert_eq!(indexes, [&json!(0)], "{d}");
    assert_eq!(d["integrity"], "unknown", "{d}");

    proxy.set(true);
    let (st, b) = s.member(upload(1)).await;
    assert_eq!(st, 200, "{b}");
    let (st, b) = s.member(complete).await;
    assert_eq!(st, 200, "{b}");
    let d = s.get(&session).await;
    assert_eq!(d["recording"]["status"], "completed", "{d}");
    assert_eq!(d["integrity"], "ok", "{d}");
    assert_eq!(d["r2_data"]["chunks"].as_array().unwrap().len(), 2, "{d}");
    let all: Vec<u8> = [
        s.stores
            .get_object(&format!("recordings/{org}/{session}/chunk-0.cast"))
            .await
            .unwrap(),
        s.stores
            .get_object(&format!("recordings/{org}/{session}/chunk-1.cast"))
            .await
            .unwrap(),
    ]
    .concat();
    assert_eq!(all, b"[0, \"o\", \"chunk 0\"]\n[1, \"o\", \"chunk 1\"]\n");
    s.stop().await;
}

/// A refused `report` whose objects cannot be taken back at once (the store went away while
/// the database was refusing the row) has them taken back once the store is back: nothing is
/// left where no row leads to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_report_is_taken_back_once_the_store_is_back() {
    let mut stores = Stores::new(Backend::PgS3).await;
    let s3 = stores.s3.as_mut().unwrap();
    let proxy = Toggle::start(&s3.endpoint).await;
    s3.endpoint = proxy.url.clone();
    let s = Server::start_with(stores).await;
    let org = s.fx.org.clone();
    // The row is refused a second after the objects were written.
    s.stores
        .sql(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(1); RAISE EXCEPTION 'refused by the test'; END $$; \
             CREATE TRIGGER refuse BEFORE INSERT ON session_recordings \
             FOR EACH ROW EXECUTE FUNCTION refuse();",
        )
        .await;
    let report = json!({"node_key": s.fx.node_key, "session_type": "ssh",
        "session_data": {"transcript": "[0.5, \"o\", \"TOP-SECRET\"]\n"}});
    let answer = tokio::spawn({
        let (http, url) = (
            s.http.clone(),
            format!("{}/api/session-recording-agent", s.base),
        );
        async move {
            http.post(url)
                .json(&report)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let prefix = format!("recordings/{org}");
    let t0 = std::time::Instant::now();
    while s.stores.object_keys(&prefix).await.is_empty() {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    proxy.set(false);
    assert_eq!(answer.await.unwrap(), 500);
    // (Not listed meanwhile: the test reaches the bucket through the same proxy.)
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    proxy.set(true);
    let t0 = std::time::Instant::now();
    loop {
        let left = [
            s.stores.object_keys(&prefix).await,
            s.stores
                .object_keys(&format!("session-recordings/{org}"))
                .await,
        ]
        .concat();
        if left.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "{left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    s.stop().await;
}

/// An object store that hangs holds up only the uploads and `complete`s waiting on it: they
/// get fewer database connections than the pool has, so settings, `list` and `/healthz` still
/// answer (they used to wait out the pool's 30 s with every connection held by an upload).
/// Once the store answers again, every upload answered 200 is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_object_store_holds_up_only_uploads() {
    let mut stores = Stores::new(Backend::PgS3).await;
    let s3 = stores.s3.as_mut().unwrap();
    let proxy = Toggle::start(&s3.endpoint).await;
    s3.endpoint = proxy.url.clone();
    let s = Arc::new(Server::start_config(stores, |c| c.max_db_connections = 6).await);
    let org = s.fx.org.clone();
    let session = s.start_recording().await;
    let rec = session.clone();
    let upload = move |i: u64| {
        json!({"action": "upload_chunk", "org_id": org, "session_id": rec,
               "chunk_index": i, "chunk_data": format!("[{i}, \"o\", \"chunk {i}\"]\n")})
    };
    let (st, b) = s.member(upload(0)).await;
    assert_eq!(st, 200, "{b}");
    // Deletes (and the retention sweep) remove objects under the rows' locks too.
    let mut doomed = Vec::new();
    for _ in 0..4 {
        let rec = s.start_recording().await;
        let (st, b) = s.member(json!({"action": "upload_chunk", "org_id": s.fx.org, "session_id": rec, "chunk_data": "[0, \"o\", \"x\"]"})).await;
        assert_eq!(st, 200, "{b}");
        doomed.push(rec);
    }
    proxy.stall(true);
    let mut uploads = Vec::new();
    for i in 1..=8 {
        let (s, body) = (s.clone(), upload(i));
        uploads.push(tokio::spawn(async move { s.member(body).await }));
    }
    let mut deletes = Vec::new();
    for rec in doomed {
        let s = s.clone();
        deletes.push(tokio::spawn(async move {
            s.admin(json!({"action": "delete", "org_id": s.fx.org, "session_id": rec}))
                .await
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let org = s.fx.org.clone();
    for action in ["get_settings", "list"] {
        let (st, b) = tokio::time::timeout(
            Duration::from_secs(5),
            s.admin(json!({"action": action, "org_id": org})),
        )
        .await
        .unwrap_or_else(|_| panic!("{action}: no answer within 5 s while the store hangs"));
        assert_eq!(st, 200, "{b}");
    }
    let health = tokio::time::timeout(
        Duration::from_secs(5),
        s.http.get(format!("{}/healthz", s.base)).send(),
    )
    .await
    .expect("/healthz: no answer within 5 s while the store hangs")
    .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    proxy.stall(false);
    for d in deletes {
        let (st, b) = d.await.unwrap();
        assert!(st == 200 || st == 500, "{st} {b}");
    }
    let mut stored = vec![0];
    for (i, u) in uploads.into_iter().enumerate() {
        let (st, b) = u.await.unwrap();
        match st {
            200 => stored.push(i as i64 + 1),
            500 => assert_eq!(code(&b), "INTERNAL_ERROR", "{b}"),
            _ => panic!("{st} {b}"),
        }
    }
    let d = s.get(&session).await;
    let indexes: Vec<i64> = d["recording"]["metadata"]["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_i64().unwrap())
        .collect();
    for i in &stored {
        assert!(indexes.contains(i), "chunk {i} was acknowledged: {d}");
    }
    match Arc::try_unwrap(s) {
        Ok(s) => s.stop().await,
        Err(_) => panic!("the server is still shared"),
    }
}

/// Request bodies are held within the process's budget: a body that finds no room for 30 s
/// (3 s here) is answered 503 SERVER_BUSY (its rest read and dropped: a client still writing
/// gets the answer, not a reset), small requests still get in past a large one waiting, and
/// room comes back when a body's connection goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_share_a_memory_budget() {
    use tokio::io::AsyncWriteExt as _;
    const MIB: usize = 1024 * 1024;
    let s = Server::start_config(Stores::new(Backend::Sqlite).await, |c| {
        c.max_body_memory = 16 * MIB;
    })
    .await;
    let addr = s.base.trim_start_matches("http://").to_string();
    // One client announces almost all of the budget and sends over half of it (room is taken
    // by doubling), then a byte a second: it holds its room and is never idle for 3 s.
    let mut hog = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let declared = 16 * MIB - 64 * 1024;
    hog.write_all(format!("POST /api/session-recording-agent HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n{{\"pad\": \"").as_bytes())
        .await
        .unwrap();
    hog.write_all(&vec![b'x'; 9 * MIB]).await.unwrap();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let trickle = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if hog.write_all(b"x").await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let org = s.fx.org.clone();
    let big = json!({"action": "get_settings", "org_id": org, "pad": "y".repeat(3_000_000)});
    let t0 = std::time::Instant::now();
    assert_err(s.admin(big.clone()).await, 503, "SERVER_BUSY");
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    let (st, b) = s
        .admin(json!({"action": "get_settings", "org_id": org}))
        .await;
    assert_eq!(st, 200, "a small request past the large one: {b}");
    let _ = stop.send(());
    trickle.await.unwrap();
    // The hog's connection is gone: its room is back.
    let mut answered = None;
    for _ in 0..50 {
        let (st, b) = s.admin(big.clone()).await;
        if st == 200 {
            answered = Some(b);
            break;
        }
        assert_err((st, b), 503, "SERVER_BUSY");
    }
    assert!(answered.is_some(), "room never came back");
    s.stop().await;
}

/// A `serve` process of the real binary on port 0.
struct Proc {
    child: tokio::process::Child,
    base: String,
}

async fn spawn_serve(stores: &Stores, secret: &str) -> Proc {
    use tokio::io::AsyncBufReadExt as _;
    let bin = env!("CARGO_BIN_EXE_ztna-recorder-server");
    let mut child = tokio::process::Command::new(bin)
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(stores.cli_args())
        .env("JWT_SECRET", secret)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("serve did not report its address")
        .unwrap()
        .expect("serve exited before listening");
    let v: Value = serde_json::from_str(&line).unwrap();
    let base = format!("http://{}", v["listening"].as_str().unwrap());
    Proc { child, base }
}

impl Proc {
    async fn post(&self, http: &reqwest::Client, token: &str, body: &Value) -> (u16, Value) {
        let r = http
            .post(format!("{}/api/session-recording", self.base))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        (st, r.json().await.unwrap())
    }

    /// SIGTERM: the process drains and exits 0.
    async fn terminate(mut self) {
        let pid = self.child.id().unwrap();
        let st = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "serve exited with {status}");
    }
}

/// Two servers on one SQLite file (as `serve` and an `admin` command, or two `serve`s, would
/// be): recordings completed on one while chunks land through the other. `complete` reads
/// the metadata, then writes it: begun as a plain (deferred) transaction, it failed with
/// SQLITE_BUSY_SNAPSHOT, without waiting, whenever the other server committed in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_one_sqlite_file() {
    let s = Server::start(Backend::Sqlite).await;
    let second = App::open(s.stores.config()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(ztna_recorder_server::serve(listener, second, async {
        let _ = stopped.await;
    }));
    let streaming = s.start_recording().await;
    let mut done = Vec::new();
    for _ in 0..30 {
        done.push(s.start_recording().await);
    }
    let send = |base: &str, body: Value| {
        let req = s
            .http
            .post(format!("{base}/api/session-recording-agent"))
            .json(&body);
        tokio::spawn(async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        })
    };
    let mut tasks = Vec::new();
    for i in 0..60 {
        tasks.push(send(
            &other,
            json!({"action": "upload_chunk", "node_key": s.fx.node_key,
            "session_id": streaming, "chunk_index": i,
            "chunk_data": format!("[{i}.5, \"o\", \"chunk {i}\"]\n")}),
        ));
        if let Some(rec) = done.get(i / 2).filter(|_| i % 2 == 0) {
            tasks.push(send(
                &s.base,
                json!({"action": "complete", "node_key": s.fx.node_key,
                "session_id": rec, "duration_seconds": 1, "metadata": {"exit_status": 0}}),
            ));
        }
    }
    for t in tasks {
        let (status, body) = t.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let d = s.get(&streaming).await;
    assert_eq!(
        d["recording"]["metadata"]["chunks"]
            .as_array()
            .unwrap()
            .len(),
        60
    );
    for rec in &done {
        let d = s.get(rec).await;
        assert_eq!(d["recording"]["status"], "completed");
        assert_eq!(d["recording"]["metadata"]["exit_status"], 0);
    }
    let _ = stop.send(());
    task.await.unwrap().unwrap();
    s.stop().await;
}

/// On PostgreSQL, a recording whose row another request holds (an upload stuck behind a store
/// that does not answer; here a transaction of our own) answers its next upload and its
/// `complete` with a retryable 503 `SERVER_BUSY` after a bounded wait, and changes nothing:
/// queued requests each waited out the one before (the fourth failed after 200 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_held_locked_answers_busy_in_bounded_time() {
    let s = Server::start(Backend::PgS3).await;
    let org = s.fx.org.clone();
    let rec = s.start_recording().await;
    let url = s.stores.database_url.clone().unwrap();
    let mut holder = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "BEGIN; SELECT 1 FROM session_recordings WHERE id = '{rec}' FOR UPDATE"
    ))
    .execute(&mut holder)
    .await
    .unwrap();
    let t0 = std::time::Instant::now();
    let upload = json!({"action": "upload_chunk", "org_id": org, "session_id": rec, "chunk_index": 0, "chunk_data": "[0, \"o\", \"x\"]"});
    let complete =
        json!({"action": "complete", "org_id": org, "session_id": rec, "duration_seconds": 1});
    let (u, c) = tokio::join!(s.member(upload.clone()), s.member(complete.clone()));
    let waited = t0.elapsed();
    assert_err(u, 503, "SERVER_BUSY");
    assert_err(c, 503, "SERVER_BUSY");
    // The complete waits behind the upload in this process, then for the row: 2 x 20 s.
    assert!(waited < Duration::from_secs(60), "{waited:?}");
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    let d = s.get(&rec).await;
    assert_eq!(d["recording"]["status"], "active", "{d}");
    assert_eq!(d["recording"]["metadata"]["chunks"], json!([]), "{d}");
    // Free again: both go through.
    let (st, b) = s.member(upload).await;
    assert_eq!(st, 200, "{b}");
    let (st, b) = s.member(complete).await;
    assert_eq!(st, 200, "{b}");
    s.stop().await;
}

/// `serve` on a bucket that does not exist stops at once and says so (it used to start and
/// fail every upload); the same store with the bucket there is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_named_at_start() {
    let stores = Stores::new(Backend::PgS3).await;
    let app = App::open(stores.config()).await.unwrap();
    app.check_store().await.unwrap();
    let mut config = stores.config();
    let missing = format!("ztna-missing-{}", uuid::Uuid::new_v4().simple());
    config.store_url = Some(format!("s3://{missing}"));
    let app = App::open(config).await.unwrap();
    let e = app.check_store().await.unwrap_err().to_string();
    assert!(e.contains(&missing) && e.contains("does not exist"), "{e}");
    let mut args = stores.cli_args();
    let i = args.iter().position(|a| a == "--store").unwrap();
    args[i + 1] = format!("s3://{missing}");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_ztna-recorder-server"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0"])
        .args(&args)
        .env("JWT_SECRET", "missing-bucket-test-secret")
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    assert!(out.stdout.is_empty(), "it never listened");
    stores.drop_database().await;
}

/// Fresh PostgreSQL + S3 stores, a fixture org named `org` in them, and two `serve` processes
/// of the binary on them.
async fn two_serve_processes(org: &str) -> (Stores, App, Fixture, Proc, Proc) {
    let stores = Stores::new(Backend::PgS3).await;
    let secret = "two-process-test-secret";
    let mut config = stores.config();
    config.jwt_secret = Some(secret.into());
    let app = App::open(config).await.unwrap();
    let fx = make_fixture(&app, org).await;
    let a = spawn_serve(&stores, secret).await;
    let b = spawn_serve(&stores, secret).await;
    (stores, app, fx, a, b)
}

/// Two `serve` processes on one PostgreSQL and one bucket: chunks alternately to both, then a
/// retention sweep on each at once. Nothing lost, nothing deleted twice, no error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_processes_share_postgres_and_s3() {
    let (stores, app, fx, a, b) = two_serve_processes("shared").await;
    let http = reqwest::Client::new();
    let org = fx.org.clone();
    let t = fx.admin_token.clone();

    let mut recs = Vec::new();
    for i in 0..6 {
        let p = if i % 2 == 0 { &a } else { &b };
        let (st, body) = p
            .post(&http, &t, &json!({"action": "start", "org_id": org, "machine_id": fx.machine, "session_type": "ssh"}))
            .await;
        assert_eq!(st, 201, "{body}");
        recs.push(body["data"]["session_id"].as_str().unwrap().to_string());
    }
    // 20 chunks per recording, alternately to both processes, all at once.
    let mut uploads = Vec::new();
    for rec in &recs {
        for i in 0..20 {
            let base = if i % 2 == 0 {
                a.base.clone()
            } else {
                b.base.clone()
            };
            let http = http.clone();
            let t = t.clone();
            let body = json!({"action": "upload_chunk", "org_id": org, "session_id": rec, "chunk_index": i, "chunk_data": format!("[{i}, \"o\", \"x\"]")});
            uploads.push(tokio::spawn(async move {
                let r = http
                    .post(format!("{base}/api/session-recording"))
                    .bearer_auth(t)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                r.status().as_u16()
            }));
        }
    }
    for u in uploads {
        assert_eq!(u.await.unwrap(), 200);
    }
    for (n, rec) in recs.iter().enumerate() {
        let p = if n % 2 == 0 { &b } else { &a };
        let (st, body) = p
            .post(
                &http,
                &t,
                &json!({"action": "get", "org_id": org, "session_id": rec}),
            )
            .await;
        assert_eq!(st, 200);
        assert_eq!(
            body["data"]["recording"]["metadata"]["chunks"]
                .as_array()
                .unwrap()
                .len(),
            20
        );
        assert_eq!(body["data"]["integrity"], "ok");
    }
    // Everything expired; one sweep on each process at the same moment.
    for rec in &recs {
        stores.backdate(rec, 200).await;
    }
    let sweep = |p: &Proc| {
        let http = http.clone();
        let base = p.base.clone();
        let t = t.clone();
        let org = org.clone();
        tokio::spawn(async move {
            let r = http
                .post(format!("{base}/api/session-recording"))
                .bearer_auth(t)
                .json(&json!({"action": "cleanup", "org_id": org}))
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            let v: Value = r.json().await.unwrap();
            (st, v)
        })
    };
    let (ra, rb) = tokio::join!(sweep(&a), sweep(&b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.0, 200, "{}", ra.1);
    assert_eq!(rb.0, 200, "{}", rb.1);
    let total =
        ra.1["data"]["deleted"].as_u64().unwrap() + rb.1["data"]["deleted"].as_u64().unwrap();
    assert_eq!(
        total, 6,
        "each recording deleted exactly once: {} + {}",
        ra.1, rb.1
    );
    for rec in &recs {
        for i in 0..20 {
            assert!(stores
                .get_object(&format!("recordings/{org}/{rec}/chunk-{i}.cast"))
                .await
                .is_none());
        }
    }
    let (_, body) = a
        .post(&http, &t, &json!({"action": "list", "org_id": org}))
        .await;
    assert_eq!(body["data"]["total"], 0);
    a.terminate().await;
    b.terminate().await;
    drop(app);
    stores.drop_database().await;
}

/// Two `serve` processes on one PostgreSQL and one bucket, racing on one recording: two bodies
/// for one chunk index, an upload against a `complete`, two `complete`s. Whatever wins, the
/// objects are what the rows say (a losing `complete` used to write its summary over the
/// winner's: 19 times in 20).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_processes_racing_on_one_recording_keep_objects_and_rows_agreeing() {
    let (stores, app, fx, a, b) = two_serve_processes("races").await;
    let http = reqwest::Client::new();
    let t = fx.admin_token.clone();
    let org = fx.org.clone();
    for trial in 0..12i64 {
        let (st, body) = a
            .post(&http, &t, &json!({"action": "start", "org_id": org, "machine_id": fx.machine, "session_type": "ssh"}))
            .await;
        assert_eq!(st, 201, "{body}");
        let rec = body["data"]["session_id"].as_str().unwrap().to_string();
        let upload = |p: &'static str, data: String| {
            let (proc_, body) = (
                if p == "a" { &a } else { &b },
                json!({"action": "upload_chunk", "org_id": org, "session_id": rec, "chunk_index": 0, "chunk_data": data}),
            );
            let (http, t) = (&http, &t);
            async move { proc_.post(http, t, &body).await.0 }
        };
        // Two bodies for chunk 0 at once, one through each process.
        let (sa, sb) = tokio::join!(
            upload("a", format!("[0.5, \"o\", \"from a {trial}\"]")),
            upload(
                "b",
                format!("[0.7, \"o\", \"from b {trial} {}\"]", "b".repeat(3000))
            )
        );
        assert_eq!((sa, sb), (200, 200), "trial {trial}");
        // An upload of chunk 1 against a `complete`, then a second `complete`, each pair on
        // both processes at once.
        let complete = |p: &'static str, d: i64| {
            let (proc_, body) = (
                if p == "a" { &a } else { &b },
                json!({"action": "complete", "org_id": org, "session_id": rec, "duration_seconds": d}),
            );
            let (http, t) = (&http, &t);
            async move { proc_.post(http, t, &body).await.0 }
        };
        let late = json!({"action": "upload_chunk", "org_id": org, "session_id": rec, "chunk_index": 1, "chunk_data": format!("[1.5, \"o\", \"late {trial}\"]")});
        let (su, sa, sb) = tokio::join!(
            async { b.post(&http, &t, &late).await.0 },
            complete("a", 1000 + trial),
            complete("b", 2000 + trial)
        );
        assert!(su == 200 || su == 409, "trial {trial}: upload {su}");
        let mut codes = [sa, sb];
        codes.sort();
        assert_eq!(codes, [200, 409], "trial {trial}");
        let (st, body) = a
            .post(
                &http,
                &t,
                &json!({"action": "get", "org_id": org, "session_id": rec}),
            )
            .await;
        assert_eq!(st, 200);
        let d = &body["data"];
        assert_eq!(d["integrity"], "ok", "trial {trial}: {d:#}");
        assert_eq!(
            d["r2_data"]["duration_seconds"], d["recording"]["duration_seconds"],
            "trial {trial}: the summary is the winner's: {d:#}"
        );
        assert_eq!(
            d["r2_data"]["chunks"].as_array().map(Vec::len),
            d["recording"]["metadata"]["chunks"]
                .as_array()
                .map(Vec::len),
            "trial {trial}: {d:#}"
        );
    }
    a.terminate().await;
    b.terminate().await;
    drop(app);
    stores.drop_database().await;
}

/// The binary on embedded defaults: data dir created, secret file 0600, SIGTERM drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_on_defaults_and_sigterm() {
    use std::os::unix::fs::PermissionsExt as _;
    let stores = Stores::new(Backend::Sqlite).await;
    let data = stores.dir.path().join("nested/data");
    let bin = env!("CARGO_BIN_EXE_ztna-recorder-server");
    // Settings go before or after the command (`--listen` included).
    let mut child = tokio::process::Command::new(bin)
        .args(["--listen", "localhost:0", "serve"])
        .env("ZTNA_DATA_DIR", &data)
        .env_remove("DATABASE_URL")
        .env_remove("STORE_URL")
        .env_remove("JWT_SECRET")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().unwrap();
    assert!(line.contains("listening"));
    assert!(data.join("recordings.db").exists());
    assert!(data.join("objects").is_dir());
    let mode = std::fs::metadata(data.join("jwt-secret"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    Proc {
        child,
        base: String::new(),
    }
    .terminate()
    .await;
    // Flags win over the environment.
    let out = std::process::Command::new(bin)
        .args(["admin", "org", "create", "--name", "x", "--data-dir"])
        .arg(stores.dir.path().join("flag"))
        .env("ZTNA_DATA_DIR", stores.dir.path().join("env"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(stores.dir.path().join("flag/recordings.db").exists());
    assert!(!stores.dir.path().join("env").exists());
    // A relative data directory is taken from the working directory, objects included.
    let out = std::process::Command::new(bin)
        .args([
            "admin",
            "org",
            "create",
            "--name",
            "x",
            "--data-dir",
            "rel/data",
        ])
        .current_dir(stores.dir.path())
        .env_remove("DATABASE_URL")
        .env_remove("STORE_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stores.dir.path().join("rel/data/recordings.db").exists());
    assert!(stores.dir.path().join("rel/data/objects").is_dir());
    // A database of the user's choosing, in a directory that is not there yet: created too.
    let db = stores.dir.path().join("elsewhere/meta/r.db");
    let out = std::process::Command::new(bin)
        .args(["admin", "org", "create", "--name", "x", "--data-dir"])
        .arg(stores.dir.path().join("d2"))
        .arg("--database")
        .arg(format!("sqlite://{}", db.display()))
        .env_remove("STORE_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(db.exists());
    // A bad setting names what is wrong.
    let out = std::process::Command::new(bin)
        .args([
            "admin",
            "org",
            "create",
            "--name",
            "x",
            "--database",
            "mysql://x",
        ])
        .arg("--data-dir")
        .arg(stores.dir.path().join("mysql"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mysql://x"));
    // ... and creates nothing: no data directory, no database, no generated secret.
    assert!(!stores.dir.path().join("mysql").exists());
    let out = std::process::Command::new(bin)
        .args(["admin", "org", "create", "--name", "x", "--data-dir"])
        .arg(stores.dir.path().join("ftp"))
        .env("STORE_URL", "ftp://x")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ftp://x"));
    assert!(!stores.dir.path().join("ftp").exists());
    // A port in use stops `serve` before it creates anything.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = std::process::Command::new(bin)
        .args(["serve", "--listen"])
        .arg(taken.local_addr().unwrap().to_string())
        .arg("--data-dir")
        .arg(stores.dir.path().join("busy"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen"));
    assert!(!stores.dir.path().join("busy").exists());
    // The listen address matters to `serve` only: a bad one stops `serve` before it creates
    // anything, and leaves `admin` working.
    let out = std::process::Command::new(bin)
        .args(["admin", "org", "create", "--name", "x", "--data-dir"])
        .arg(stores.dir.path().join("flag"))
        .env("ZTNA_LISTEN", "no-port-here")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(bin)
        .args(["serve", "--listen", "no-port-here", "--data-dir"])
        .arg(stores.dir.path().join("never"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-port-here"));
    assert!(!stores.dir.path().join("never").exists());
}

/// `serve` runs the retention sweep by itself every `sweep_interval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_sweeps_periodically() {
    let stores = Stores::new(Backend::Sqlite).await;
    let mut config = stores.config();
    config.sweep_interval = Duration::from_secs(1);
    let app = App::open(config).await.unwrap();
    let fx = make_fixture(&app, "sweepy").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(ztna_recorder_server::serve(listener, app.clone(), async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let post = |body: Value| {
        let http = http.clone();
        let url = format!("{base}/api/session-recording");
        let t = fx.admin_token.clone();
        async move {
            let r = http
                .post(url)
                .bearer_auth(t)
                .json(&body)
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            (st, r.json::<Value>().await.unwrap())
        }
    };
    let (st, b) = post(json!({"action": "start", "org_id": fx.org, "machine_id": fx.machine, "session_type": "ssh"})).await;
    assert_eq!(st, 201);
    let old = b["data"]["session_id"].as_str().unwrap().to_string();
    let (_, b) = post(json!({"action": "start", "org_id": fx.org, "machine_id": fx.machine, "session_type": "ssh"})).await;
    let young = b["data"]["session_id"].as_str().unwrap().to_string();
    stores.backdate(&old, 91).await;
    // Poll for the sweep's effect (at most 30 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (st, _) = post(json!({"action": "get", "org_id": fx.org, "session_id": old})).await;
        if st == 404 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the periodic sweep never ran"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (st, _) = post(json!({"action": "get", "org_id": fx.org, "session_id": young})).await;
    assert_eq!(st, 200);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
