//! The SQLite metadata store: the embedded default. WAL mode, created on first start, its
//! own migrations under `migrations/sqlite`. Ids are UUID text; timestamps fixed-width
//! RFC 3339 text; JSON as text.

use std::str::FromStr as _;
use std::time::Duration;

use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{FromRow as _, Row as _, SqlitePool};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::*;
use crate::timefmt;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// A chunk row waiting for the group commit, and where its outcome goes.
type ChunkJob = (Uuid, ChunkRow, oneshot::Sender<Result<ChunkOutcome>>);

/// Most chunk rows committed in one transaction.
const CHUNK_BATCH: usize = 256;

pub struct SqliteMeta {
    /// Readers (WAL: they never wait for the writer).
    pool: SqlitePool,
    /// One connection: writers queue here in order instead of sleeping in SQLite's busy
    /// handler, which made the tail latency of concurrent uploads explode.
    write: SqlitePool,
    /// Chunk rows go through one task that commits whatever has queued up in a single
    /// transaction (group commit): one fsync for many acknowledged uploads.
    chunks: mpsc::Sender<ChunkJob>,
}

const UPSERT_CHUNK: &str = "INSERT INTO session_recording_chunks \
     (session_id, chunk_index, bytes, sha256, last_event_time) \
     SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS \
     (SELECT 1 FROM session_recordings WHERE id = ?1 AND status = 'active') \
     ON CONFLICT (session_id, chunk_index) DO UPDATE SET bytes = excluded.bytes, \
     sha256 = excluded.sha256, last_event_time = excluded.last_event_time";

/// Writes a recording's chunk rows into its `metadata.chunks` too (index order), so that the
/// column says what the contract says it holds, for whoever reads the database itself. Run in
/// the write transaction that changed the rows.
const MIRROR_CHUNKS: &str =
    "UPDATE session_recordings SET metadata = json_set(metadata, '$.chunks', \
     json((SELECT json_group_array(json_object('index', chunk_index, 'bytes', bytes, \
     'sha256', sha256) ORDER BY chunk_index) FROM session_recording_chunks \
     WHERE session_id = ?1))) WHERE id = ?1";

/// [`MIRROR_CHUNKS`] for one chunk just stored: appended when it comes after the last one
/// listed (an agent sends them in order), else the list is rebuilt from the rows.
const MIRROR_CHUNK: &str = "UPDATE session_recordings SET metadata = CASE \
     WHEN json_type(metadata, '$.chunks') = 'array' \
      AND coalesce(json_extract(metadata, '$.chunks[#-1].index'), -1) < ?2 \
     THEN json_set(metadata, '$.chunks[#]', json_object('index', ?2, 'bytes', ?3, 'sha256', ?4)) \
     ELSE json_set(metadata, '$.chunks', json((SELECT json_group_array(json_object('index', \
      chunk_index, 'bytes', bytes, 'sha256', sha256) ORDER BY chunk_index) \
      FROM session_recording_chunks WHERE session_id = ?1))) END WHERE id = ?1";

/// A write transaction that takes the database's write lock at once. A deferred one that
/// reads first fails (SQLITE_BUSY_SNAPSHOT, not retried by the busy timeout) when another
/// process (an `admin` command beside `serve`) commits between its read and its write.
///
/// When SQLite rolls a transaction back by itself (it may on SQLITE_FULL or SQLITE_IOERR),
/// sqlx does not notice: its ROLLBACK then fails, and it goes on counting the transaction open
/// on the connection, refusing every later BEGIN on it. That connection is then closed here
/// and the pool opens a fresh one: a disk that was full must not stop writes for good.
async fn begin_write(pool: &SqlitePool) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
    match pool.begin_with("BEGIN IMMEDIATE").await {
        Err(sqlx::Error::InvalidSavePointStatement) => {
            tracing::warn!(
                "a write connection was left inside a transaction SQLite had ended: replaced"
            );
            pool.acquire().await?.close().await?;
            Ok(pool.begin_with("BEGIN IMMEDIATE").await?)
        }
        r => Ok(r?),
    }
}

async fn write_chunk_batch(write: &SqlitePool, jobs: &[ChunkJob]) -> Result<Vec<ChunkOutcome>> {
    let mut tx = begin_write(write).await?;
    let mut out = Vec::with_capacity(jobs.len());
    for (session, c, _) in jobs {
        let r = sqlx::query(UPSERT_CHUNK)
            .bind(session.to_string())
            .bind(c.index)
            .bind(c.bytes)
            .bind(&c.sha256)
            .bind(c.last_event_time)
            .execute(&mut *tx)
            .await;
        let outcome = match r {
            Ok(r) if r.rows_affected() > 0 => ChunkOutcome::Stored,
            Ok(_) => {
                let exists = sqlx::query("SELECT 1 FROM session_recordings WHERE id = ?")
                    .bind(session.to_string())
                    .fetch_optional(&mut *tx)
                    .await?;
                if exists.is_some() {
                    ChunkOutcome::NotActive
                } else {
                    ChunkOutcome::Gone
                }
            }
            // A failed statement leaves the transaction usable in SQLite.
            Err(e) if is_fk_violation(&e) => ChunkOutcome::Gone,
            Err(e) => return Err(e.into()),
        };
        out.push(outcome);
    }
    for ((session, c, _), o) in jobs.iter().zip(&out) {
        if matches!(o, ChunkOutcome::Stored) {
            sqlx::query(MIRROR_CHUNK)
                .bind(session.to_string())
                .bind(c.index)
                .bind(c.bytes)
                .bind(&c.sha256)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(out)
}

async fn chunk_writer(write: SqlitePool, mut rx: mpsc::Receiver<ChunkJob>) {
    let mut jobs: Vec<ChunkJob> = Vec::with_capacity(CHUNK_BATCH);
    while let Some(first) = rx.recv().await {
        jobs.push(first);
        while jobs.len() < CHUNK_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        match write_chunk_batch(&write, &jobs).await {
            Ok(outcomes) => {
                for ((_, _, reply), o) in jobs.drain(..).zip(outcomes) {
                    let _ = reply.send(Ok(o));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, rows = jobs.len(), "chunk batch failed");
                let msg = e.to_string();
                for (_, _, reply) in jobs.drain(..) {
                    let _ = reply.send(Err(MetaError::Batch(msg.clone())));
                }
            }
        }
    }
}

fn uuid_col(row: &SqliteRow, col: &str) -> Result<Uuid> {
    let s: String = row.try_get(col)?;
    Uuid::parse_str(&s).map_err(|_| MetaError::Corrupt(format!("{col} is not a UUID")))
}

fn opt_uuid_col(row: &SqliteRow, col: &str) -> Result<Option<Uuid>> {
    let s: Option<String> = row.try_get(col)?;
    s.map(|s| Uuid::parse_str(&s).map_err(|_| MetaError::Corrupt(format!("{col} is not a UUID"))))
        .transpose()
}

fn ts_col(row: &SqliteRow, col: &str) -> Result<Option<OffsetDateTime>> {
    let s: Option<String> = row.try_get(col)?;
    s.map(|s| timefmt::parse(&s).ok_or_else(|| MetaError::Corrupt(format!("{col} is not a time"))))
        .transpose()
}

/// A NOT NULL time column, normalised to the form every listing uses.
fn listed_time(row: &SqliteRow, col: &str) -> Result<String> {
    ts_col(row, col)?
        .map(timefmt::format)
        .ok_or_else(|| MetaError::Corrupt(format!("{col} is null")))
}

/// The column's `metadata.chunks` mirror is left in the database: a reader takes the list
/// from the chunk rows, and parsing thousands of entries per row only to drop them made
/// `list` and every upload cost as much as the recording's chunk count.
const RECORDING_COLUMNS: &str = "r.id, r.org_id, r.machine_id, r.user_id, r.session_type, \
     r.status, r.started_at, r.ended_at, r.duration_seconds, \
     json_remove(r.metadata, '$.chunks') AS metadata, r.r2_key, m.name AS machine_name";

fn metadata_col(row: &SqliteRow) -> Result<Value> {
    let metadata: String = row.try_get("metadata")?;
    serde_json::from_str(&metadata).map_err(|e| MetaError::Corrupt(format!("metadata: {e}")))
}

fn recording_from_row(row: &SqliteRow) -> Result<Recording> {
    let metadata = metadata_col(row)?;
    Ok(Recording {
        id: uuid_col(row, "id")?,
        org_id: uuid_col(row, "org_id")?,
        machine_id: opt_uuid_col(row, "machine_id")?,
        user_id: uuid_col(row, "user_id")?,
        session_type: row.try_get("session_type")?,
        status: row.try_get("status")?,
        started_at: ts_col(row, "started_at")?
            .ok_or_else(|| MetaError::Corrupt("started_at is null".into()))?,
        ended_at: ts_col(row, "ended_at")?,
        duration_seconds: row.try_get("duration_seconds")?,
        metadata: metadata_object(metadata),
        r2_key: row.try_get("r2_key")?,
        machine_name: row.try_get("machine_name")?,
        chunks: Vec::new(),
    })
}

impl SqliteMeta {
    pub async fn open(url: &str, max_connections: u32) -> Result<SqliteMeta> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before we answer 200.
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30));
        // "Created on first start" holds for a path of the user's choosing too, not only for
        // the default one in the data directory (which `App::open` creates). In-memory URLs
        // never get here (`check_url` refuses them).
        if let Some(dir) = opts.get_filename().parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| super::MetaError::Connect {
                    url: url.to_string(),
                    source: sqlx::Error::Io(e),
                })?;
            }
        }
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts.clone())
            .await
            .map_err(|source| super::MetaError::Connect {
                url: url.to_string(),
                source,
            })?;
        MIGRATOR.run(&write).await?;
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(opts)
            .await?;
        let (tx, rx) = mpsc::channel(4 * CHUNK_BATCH);
        tokio::spawn(chunk_writer(write.clone(), rx));
        Ok(SqliteMeta {
            pool,
            write,
            chunks: tx,
        })
    }

    async fn chunks_of(&self, ids: &[Uuid]) -> Result<Vec<(Uuid, ChunkRow)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "SELECT session_id, chunk_index, bytes, sha256, last_event_time \
             FROM session_recording_chunks WHERE session_id IN (",
        );
        let mut sep = qb.separated(", ");
        for id in ids {
            sep.push_bind(id.to_string());
        }
        qb.push(") ORDER BY session_id, chunk_index");
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok((uuid_col(r, "session_id")?, ChunkRow::from_row(r)?)))
            .collect()
    }
}

#[async_trait::async_trait]
impl MetadataStore for SqliteMeta {
    async fn create_org(&self, id: Uuid, name: &str, feature: bool) -> Result<()> {
        let mut tx = begin_write(&self.write).await?;
        sqlx::query(
            "INSERT INTO orgs (id, name, feature_session_recording, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(name)
        .bind(feature)
        .bind(timefmt::format(timefmt::now()))
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO org_settings (org_id) VALUES (?)")
            .bind(id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_feature(&self, org: Uuid, enabled: bool) -> Result<bool> {
        let r = sqlx::query("UPDATE orgs SET feature_session_recording = ? WHERE id = ?")
            .bind(enabled)
            .bind(org.to_string())
            .execute(&self.write)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn create_user(
        &self,
        org: Uuid,
        new_id: Uuid,
        email: &str,
        role: Role,
    ) -> Result<std::result::Result<UserAdded, AdminRefusal>> {
        let mut tx = begin_write(&self.write).await?;
        let exists = sqlx::query("SELECT 1 FROM orgs WHERE id = ?")
            .bind(org.to_string())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Ok(Err(AdminRefusal::NoSuchOrg));
        }
        let found = sqlx::query("SELECT id FROM users WHERE lower(email) = lower(?) LIMIT 1")
            .bind(email)
            .fetch_optional(&mut *tx)
            .await?;
        let (user, existed) = match found {
            Some(row) => (uuid_col(&row, "id")?, true),
            None => {
                sqlx::query("INSERT INTO users (id, email, created_at) VALUES (?, ?, ?)")
                    .bind(new_id.to_string())
                    .bind(email)
                    .bind(timefmt::format(timefmt::now()))
                    .execute(&mut *tx)
                    .await?;
                (new_id, false)
            }
        };
        let previous_role =
            sqlx::query("SELECT role FROM org_members WHERE org_id = ? AND user_id = ?")
                .bind(org.to_string())
                .bind(user.to_string())
                .fetch_optional(&mut *tx)
                .await?
                .and_then(|r| r.try_get::<String, _>("role").ok())
                .and_then(|r| Role::parse(&r));
        sqlx::query(
            "INSERT INTO org_members (org_id, user_id, role) VALUES (?, ?, ?) \
             ON CONFLICT (org_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(org.to_string())
        .bind(user.to_string())
        .bind(role.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(UserAdded {
            id: user,
            existed,
            previous_role,
        }))
    }

    async fn user_exists(&self, user: Uuid) -> Result<bool> {
        Ok(sqlx::query("SELECT 1 FROM users WHERE id = ?")
            .bind(user.to_string())
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    async fn register_machine(
        &self,
        id: Uuid,
        org: Uuid,
        name: &str,
        owner: Uuid,
        node_key_hash: &str,
    ) -> Result<std::result::Result<(), AdminRefusal>> {
        let mut tx = begin_write(&self.write).await?;
        if sqlx::query("SELECT 1 FROM orgs WHERE id = ?")
            .bind(org.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Ok(Err(AdminRefusal::NoSuchOrg));
        }
        if sqlx::query("SELECT 1 FROM org_members WHERE org_id = ? AND user_id = ?")
            .bind(org.to_string())
            .bind(owner.to_string())
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Ok(Err(AdminRefusal::NotAMember));
        }
        sqlx::query(
            "INSERT INTO machines (id, org_id, owner_id, name, node_key_hash, created_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(id.to_string())
        .bind(org.to_string())
        .bind(owner.to_string())
        .bind(name)
        .bind(node_key_hash)
        .bind(timefmt::format(timefmt::now()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    async fn delete_machine(&self, id: Uuid) -> Result<bool> {
        let r = sqlx::query("DELETE FROM machines WHERE id = ?")
            .bind(id.to_string())
            .execute(&self.write)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn access(&self, org: Uuid, user: Uuid) -> Result<Option<Access>> {
        let row = sqlx::query(
            "SELECT m.role, o.feature_session_recording FROM org_members m \
             JOIN orgs o ON o.id = m.org_id WHERE m.org_id = ? AND m.user_id = ?",
        )
        .bind(org.to_string())
        .bind(user.to_string())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let role: String = row.try_get("role")?;
        let role = Role::parse(&role).ok_or_else(|| MetaError::Corrupt("role".into()))?;
        Ok(Some(Access {
            role,
            feature_enabled: row.try_get("feature_session_recording")?,
        }))
    }

    async fn machine_by_key_hash(&self, hash: &str) -> Result<Option<MachineAuth>> {
        let row = sqlx::query(
            "SELECT m.id, m.org_id, m.owner_id, m.name, o.feature_session_recording \
             FROM machines m JOIN orgs o ON o.id = m.org_id WHERE m.node_key_hash = ?",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(MachineAuth {
            id: uuid_col(&row, "id")?,
            org_id: uuid_col(&row, "org_id")?,
            owner_id: uuid_col(&row, "owner_id")?,
            name: row.try_get("name")?,
            feature_enabled: row.try_get("feature_session_recording")?,
        }))
    }

    async fn orgs(&self) -> Result<Vec<OrgEntry>> {
        let rows = sqlx::query(
            "SELECT id, name, feature_session_recording, created_at FROM orgs \
             ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OrgEntry {
                    org_id: uuid_col(r, "id")?,
                    name: r.try_get("name")?,
                    session_recording: r.try_get("feature_session_recording")?,
                    created_at: listed_time(r, "created_at")?,
                })
            })
            .collect()
    }

    async fn members(&self, org: Uuid) -> Result<Vec<MemberEntry>> {
        let rows = sqlx::query(
            "SELECT u.id, u.email, m.role FROM org_members m JOIN users u ON u.id = m.user_id \
             WHERE m.org_id = ? ORDER BY u.email, u.id",
        )
        .bind(org.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(MemberEntry {
                    user_id: uuid_col(r, "id")?,
                    email: r.try_get("email")?,
                    role: r.try_get("role")?,
                })
            })
            .collect()
    }

    async fn machines(&self, org: Uuid) -> Result<Vec<MachineEntry>> {
        let rows = sqlx::query(
            "SELECT id, name, owner_id, created_at FROM machines WHERE org_id = ? \
             ORDER BY created_at, id",
        )
        .bind(org.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(MachineEntry {
                    machine_id: uuid_col(r, "id")?,
                    name: r.try_get("name")?,
                    owner_id: uuid_col(r, "owner_id")?,
                    created_at: listed_time(r, "created_at")?,
                })
            })
            .collect()
    }

    async fn machine_name(&self, org: Uuid, machine: Uuid) -> Result<Option<String>> {
        let row = sqlx::query("SELECT name FROM machines WHERE id = ? AND org_id = ?")
            .bind(machine.to_string())
            .bind(org.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("name").map_err(MetaError::from))
            .transpose()
    }

    async fn settings(&self, org: Uuid) -> Result<Option<Settings>> {
        let row = sqlx::query(
            "SELECT recording_enabled, recording_retention_days, recording_storage_mode \
             FROM org_settings WHERE org_id = ?",
        )
        .bind(org.to_string())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(Settings {
            recording_enabled: row.try_get("recording_enabled")?,
            retention_days: row.try_get("recording_retention_days")?,
            storage_mode: row.try_get("recording_storage_mode")?,
        }))
    }

    async fn update_settings(&self, org: Uuid, u: &SettingsUpdate) -> Result<()> {
        sqlx::query("INSERT INTO org_settings (org_id) VALUES (?) ON CONFLICT (org_id) DO NOTHING")
            .bind(org.to_string())
            .execute(&self.write)
            .await?;
        sqlx::query(
            "UPDATE org_settings SET \
             recording_enabled = COALESCE(?, recording_enabled), \
             recording_retention_days = COALESCE(?, recording_retention_days), \
             recording_storage_mode = COALESCE(?, recording_storage_mode) \
             WHERE org_id = ?",
        )
        .bind(u.recording_enabled)
        .bind(u.retention_days)
        .bind(u.storage_mode.as_deref())
        .bind(org.to_string())
        .execute(&self.write)
        .await?;
        Ok(())
    }

    async fn insert_recording(&self, rec: &Recording) -> Result<bool> {
        let mut tx = begin_write(&self.write).await?;
        let inserted = sqlx::query(
            "INSERT INTO session_recordings (id, org_id, machine_id, user_id, session_type, \
             status, started_at, ended_at, duration_seconds, metadata, r2_key) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        )
        .bind(rec.id.to_string())
        .bind(rec.org_id.to_string())
        .bind(rec.machine_id.map(|m| m.to_string()))
        .bind(rec.user_id.to_string())
        .bind(&rec.session_type)
        .bind(&rec.status)
        .bind(timefmt::format(rec.started_at))
        .bind(rec.ended_at.map(timefmt::format))
        .bind(rec.duration_seconds)
        .bind(Value::Object(rec.metadata.clone()).to_string())
        .bind(rec.r2_key.as_deref())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !inserted {
            return Ok(false);
        }
        for c in &rec.chunks {
            sqlx::query(
                "INSERT INTO session_recording_chunks \
                 (session_id, chunk_index, bytes, sha256, last_event_time) VALUES (?, ?, ?, ?, ?)",
            )
            .bind(rec.id.to_string())
            .bind(c.index)
            .bind(c.bytes)
            .bind(&c.sha256)
            .bind(c.last_event_time)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(MIRROR_CHUNKS)
            .bind(rec.id.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn recording(&self, org: Uuid, id: Uuid, with_chunks: bool) -> Result<Option<Recording>> {
        let row = sqlx::query(&format!(
            "SELECT {RECORDING_COLUMNS} FROM session_recordings r \
             LEFT JOIN machines m ON m.id = r.machine_id WHERE r.id = ? AND r.org_id = ?"
        ))
        .bind(id.to_string())
        .bind(org.to_string())
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut rec = recording_from_row(&row)?;
        if !with_chunks {
            return Ok(Some(rec));
        }
        rec.chunks = self
            .chunks_of(&[id])
            .await?
            .into_iter()
            .map(|(_, c)| c)
            .collect();
        Ok(Some(rec))
    }

    async fn put_chunk(
        &self,
        session: Uuid,
        c: &ChunkRow,
        write: ObjectWrite<'_>,
    ) -> Result<ChunkOutcome> {
        // The object first, outside the write lock: holding SQLite's one write lock through
        // an fsync would make every upload wait for every other. One process orders an upload
        // with a `complete` by its own locks (`api::recording::Locks`).
        write.await?;
        // One statement per chunk (status check and upsert together), many per commit.
        let (reply, answer) = oneshot::channel();
        self.chunks
            .send((session, c.clone(), reply))
            .await
            .map_err(|_| MetaError::Batch("chunk writer stopped".into()))?;
        answer
            .await
            .map_err(|_| MetaError::Batch("chunk writer stopped".into()))?
    }

    async fn complete(&self, id: Uuid, summarize: Summarize<'_>) -> Result<CompleteOutcome> {
        // A shallow merge, as PostgreSQL's `||` does: each given key replaces the stored value
        // (`json_patch` would merge objects deeply and delete keys given as null). The
        // transaction holds the write lock: nothing writes between the read and the update.
        let mut tx = begin_write(&self.write).await?;
        let row = sqlx::query(
            "SELECT metadata FROM session_recordings WHERE id = ? AND status = 'active'",
        )
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(CompleteOutcome::NotActive);
        };
        // Chunk rows are written under the same write lock: what is here now is all there is.
        let now: Vec<ChunkRow> = sqlx::query_as(
            "SELECT chunk_index, bytes, sha256, last_event_time FROM session_recording_chunks \
             WHERE session_id = ? ORDER BY chunk_index",
        )
        .bind(id.to_string())
        .fetch_all(&mut *tx)
        .await?;
        let (c, write) = summarize(&now);
        // Under the write lock (a `complete` is rare; an upload does not wait for its fsync
        // long): a `complete` that lost to another, in this process or another on the same
        // file, never writes its summary over the winner's.
        write.await?;
        let mut metadata = metadata_object(metadata_col(&row)?);
        metadata.extend(c.metadata_merge.clone());
        sqlx::query(
            "UPDATE session_recordings SET status = 'completed', ended_at = ?, \
             duration_seconds = ?, r2_key = ?, metadata = ? WHERE id = ?",
        )
        .bind(timefmt::format(c.ended_at))
        .bind(c.duration_seconds)
        .bind(&c.r2_key)
        .bind(Value::Object(metadata).to_string())
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(CompleteOutcome::Done)
    }

    async fn list(&self, org: Uuid, q: &ListQuery) -> Result<ListPage> {
        // Only the filters given go into the SQL, so each shape uses its index.
        let filters = |qb: &mut sqlx::QueryBuilder<'_, sqlx::Sqlite>, prefix: &str| {
            qb.push(format!(" WHERE {prefix}org_id = "))
                .push_bind(org.to_string());
            if let Some(m) = q.machine_id {
                qb.push(format!(" AND {prefix}machine_id = "))
                    .push_bind(m.to_string());
            }
            if let Some(s) = &q.status {
                qb.push(format!(" AND {prefix}status = "))
                    .push_bind(s.clone());
            }
        };
        // The index is named: without ANALYZE statistics (nobody runs it on an embedded
        // database) SQLite may otherwise scan and sort the whole org.
        let (list_index, stats_index) = match (q.machine_id, &q.status) {
            (Some(_), _) => (
                "session_recordings_machine",
                "session_recordings_org_machine_status",
            ),
            (None, Some(_)) => (
                "session_recordings_org_status_started",
                "session_recordings_org_status",
            ),
            (None, None) => (
                "session_recordings_org_started",
                "session_recordings_org_status",
            ),
        };
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!(
            "SELECT {RECORDING_COLUMNS} FROM session_recordings r INDEXED BY {list_index} \
             LEFT JOIN machines m ON m.id = r.machine_id"
        ));
        filters(&mut qb, "r.");
        qb.push(" ORDER BY r.started_at DESC, r.id DESC LIMIT ")
            .push_bind(q.limit)
            .push(" OFFSET ")
            .push_bind(q.offset);
        let rows = qb.build().fetch_all(&self.pool).await?;
        let recordings = rows
            .iter()
            .map(recording_from_row)
            .collect::<Result<Vec<_>>>()?;
        let ids: Vec<Uuid> = recordings.iter().map(|r| r.id).collect();
        let chunks = self.chunks_of(&ids).await?;
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!(
            "SELECT status, COUNT(*) AS n, COALESCE(SUM(duration_seconds), 0) AS d \
             FROM session_recordings INDEXED BY {stats_index}"
        ));
        filters(&mut qb, "");
        qb.push(" GROUP BY status ORDER BY status DESC");
        let stats = qb
            .build_query_as::<StatusStats>()
            .fetch_all(&self.pool)
            .await?;
        Ok(ListPage::assemble(recordings, chunks, stats))
    }

    async fn delete_recording(&self, org: Uuid, id: Uuid, objects: &Objects) -> Result<bool> {
        let exists = sqlx::query("SELECT 1 FROM session_recordings WHERE id = ? AND org_id = ?")
            .bind(id.to_string())
            .bind(org.to_string())
            .fetch_optional(&self.pool)
            .await?;
        if exists.is_none() {
            return Ok(false);
        }
        objects
            .delete_recording(&org.to_string(), &id.to_string())
            .await?;
        let r = sqlx::query("DELETE FROM session_recordings WHERE id = ? AND org_id = ?")
            .bind(id.to_string())
            .bind(org.to_string())
            .execute(&self.write)
            .await?;
        if r.rows_affected() == 0 {
            return Ok(false);
        }
        // An upload whose chunk row went in between the two deletes left its object: once the
        // row is gone, later uploads remove their own (`ChunkOutcome::Gone`).
        objects
            .delete_recording(&org.to_string(), &id.to_string())
            .await?;
        Ok(true)
    }

    async fn sweep_org(&self, org: Uuid, cutoff: OffsetDateTime, objects: &Objects) -> Result<u64> {
        // SQLite has one writer at a time and no row locks; a recording deleted by a
        // concurrent sweep simply counts for the one whose DELETE removed the row.
        let mut deleted = 0;
        loop {
            let rows = sqlx::query(
                "SELECT id FROM session_recordings WHERE org_id = ? AND started_at < ? \
                 ORDER BY started_at LIMIT ?",
            )
            .bind(org.to_string())
            .bind(timefmt::format(cutoff))
            .bind(SWEEP_BATCH)
            .fetch_all(&self.pool)
            .await?;
            if rows.is_empty() {
                return Ok(deleted);
            }
            for row in &rows {
                let id = uuid_col(row, "id")?;
                objects
                    .delete_recording(&org.to_string(), &id.to_string())
                    .await?;
                let r = sqlx::query("DELETE FROM session_recordings WHERE id = ?")
                    .bind(id.to_string())
                    .execute(&self.write)
                    .await?;
                deleted += r.rows_affected();
            }
        }
    }

    async fn newest_chunks(
        &self,
        org: Uuid,
        since: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<(Uuid, u64)>> {
        let rows = sqlx::query(
            "SELECT r.id, (SELECT MIN(c.chunk_index) FROM session_recording_chunks c \
                 WHERE c.session_id = r.id) AS first FROM session_recordings r \
                 WHERE r.org_id = ? AND r.started_at >= ? AND EXISTS (SELECT 1 FROM session_recording_chunks c \
                 WHERE c.session_id = r.id) \
                 AND EXISTS (SELECT 1 FROM session_recordings o WHERE o.org_id = r.org_id \
                 AND o.started_at < ?) ORDER BY r.started_at DESC, r.id DESC LIMIT ?",
        )
        .bind(org.to_string())
        .bind(timefmt::format(since))
        .bind(timefmt::format(since))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    uuid_col(r, "id")?,
                    r.try_get::<i64, _>("first")?.max(0) as u64,
                ))
            })
            .collect()
    }

    async fn retention_by_org(&self) -> Result<Vec<(Uuid, i64)>> {
        let rows = sqlx::query("SELECT org_id, recording_retention_days FROM org_settings")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    uuid_col(r, "org_id")?,
                    r.try_get("recording_retention_days")?,
                ))
            })
            .collect()
    }
}
