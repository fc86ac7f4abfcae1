//! The PostgreSQL metadata store, for scale: several `serve` processes may share it. Its own
//! migrations under `migrations/postgres` (sqlx takes an advisory lock while migrating, so
//! processes starting together are fine). The retention sweep locks the rows it deletes with
//! `FOR UPDATE`, so two sweeps never act on the same recording.

use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::{FromRow as _, Row as _};
use time::OffsetDateTime;
use uuid::Uuid;

use super::*;
use crate::timefmt;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
/// The first key of the advisory locks that serialise `create_user` per address (a key space
/// apart from the chunks' one-key locks).
const EMAIL_LOCK_CLASS: i32 = 0x7a75;

pub struct PgMeta {
    pool: PgPool,
}

/// The column's `metadata.chunks` mirror is left in the database: a reader takes the list
/// from the chunk rows, and parsing thousands of entries per row only to drop them made
/// `list` and every upload cost as much as the recording's chunk count.
const RECORDING_COLUMNS: &str = "r.id, r.org_id, r.machine_id, r.user_id, r.session_type, \
     r.status, r.started_at, r.ended_at, r.duration_seconds, \
     r.metadata - 'chunks' AS metadata, r.r2_key, m.name AS machine_name";

fn recording_from_row(row: &PgRow) -> Result<Recording> {
    let metadata: Value = row.try_get("metadata")?;
    Ok(Recording {
        id: row.try_get("id")?,
        org_id: row.try_get("org_id")?,
        machine_id: row.try_get("machine_id")?,
        user_id: row.try_get("user_id")?,
        session_type: row.try_get("session_type")?,
        status: row.try_get("status")?,
        started_at: row.try_get("started_at")?,
        ended_at: row.try_get("ended_at")?,
        duration_seconds: row.try_get("duration_seconds")?,
        metadata: metadata_object(metadata),
        r2_key: row.try_get("r2_key")?,
        machine_name: row.try_get("machine_name")?,
        chunks: Vec::new(),
    })
}

impl PgMeta {
    pub async fn open(url: &str, max_connections: u32) -> Result<PgMeta> {
        let failed = |source| MetaError::Connect {
            url: crate::config::redact_url(url),
            source,
        };
        // One direct attempt first: a pool that never gets a connection retries for its whole
        // acquire timeout and then says only that it timed out, where this says why at once
        // (refused, authentication, unknown host or database). systemd restarts `serve`.
        {
            use sqlx::Connection as _;
            let probe = sqlx::PgConnection::connect(url).await.map_err(failed)?;
            let _ = probe.close().await;
        }
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .connect(url)
            .await
            .map_err(failed)?;
        MIGRATOR.run(&pool).await?;
        Ok(PgMeta { pool })
    }

    async fn chunks_of(&self, ids: &[Uuid]) -> Result<Vec<(Uuid, ChunkRow)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(
            "SELECT session_id, chunk_index, bytes, sha256, last_event_time \
             FROM session_recording_chunks WHERE session_id = ANY($1) \
             ORDER BY session_id, chunk_index",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get::<Uuid, _>("session_id")?, ChunkRow::from_row(r)?)))
            .collect()
    }
}

/// Writes a recording's chunk rows into its `metadata.chunks` too (index order), so that the
/// column says what the contract says it holds, for whoever reads the database itself. Run in
/// the transaction that changed the rows, with the recording's row locked.
const MIRROR_CHUNKS: &str =
    "UPDATE session_recordings SET metadata = jsonb_set(metadata, '{chunks}', \
     (SELECT COALESCE(jsonb_agg(jsonb_build_object('index', chunk_index, 'bytes', bytes, \
     'sha256', sha256) ORDER BY chunk_index), '[]'::jsonb) \
     FROM session_recording_chunks WHERE session_id = $1)) WHERE id = $1";

/// [`MIRROR_CHUNKS`] for one chunk just stored: appended when it comes after the last one
/// listed (an agent sends them in order), else the list is rebuilt from the rows.
const MIRROR_CHUNK: &str = "UPDATE session_recordings SET metadata = CASE \
     WHEN jsonb_typeof(metadata->'chunks') = 'array' \
      AND coalesce((metadata->'chunks'->-1->>'index')::bigint, -1) < $2 \
     THEN jsonb_set(metadata, '{chunks}', (metadata->'chunks') || jsonb_build_array( \
      jsonb_build_object('index', $2::bigint, 'bytes', $3::bigint, 'sha256', $4::text))) \
     ELSE jsonb_set(metadata, '{chunks}', (SELECT COALESCE(jsonb_agg(jsonb_build_object( \
      'index', chunk_index, 'bytes', bytes, 'sha256', sha256) ORDER BY chunk_index), '[]'::jsonb) \
      FROM session_recording_chunks WHERE session_id = $1)) END WHERE id = $1";

/// Bounds how long this transaction waits for a row lock (see [`super::ROW_LOCK_WAIT`]).
async fn bound_lock_wait(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> Result<()> {
    sqlx::query(&format!(
        "SET LOCAL lock_timeout = '{}ms'",
        super::ROW_LOCK_WAIT.as_millis()
    ))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A row lock not had in time is [`MetaError::Busy`](super::MetaError::Busy).
fn lock_wait(e: sqlx::Error) -> super::MetaError {
    if super::is_lock_timeout(&e) {
        super::MetaError::Busy
    } else {
        e.into()
    }
}

#[async_trait::async_trait]
impl MetadataStore for PgMeta {
    async fn create_org(&self, id: Uuid, name: &str, feature: bool) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO orgs (id, name, feature_session_recording) VALUES ($1, $2, $3)")
            .bind(id)
            .bind(name)
            .bind(feature)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO org_settings (org_id) VALUES ($1)")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_feature(&self, org: Uuid, enabled: bool) -> Result<bool> {
        let r = sqlx::query("UPDATE orgs SET feature_session_recording = $1 WHERE id = $2")
            .bind(enabled)
            .bind(org)
            .execute(&self.pool)
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
        let mut tx = self.pool.begin().await?;
        let exists = sqlx::query("SELECT 1 FROM orgs WHERE id = $1")
            .bind(org)
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Ok(Err(AdminRefusal::NoSuchOrg));
        }
        // Two `user create` for one new address at once take turns (addresses are compared
        // without case, which the column's unique constraint does not do): the second finds
        // the first's row.
        sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext(lower($2)))")
            .bind(EMAIL_LOCK_CLASS)
            .bind(email)
            .execute(&mut *tx)
            .await?;
        let found: Option<Uuid> =
            sqlx::query("SELECT id FROM users WHERE lower(email) = lower($1) LIMIT 1")
                .bind(email)
                .fetch_optional(&mut *tx)
                .await?
                .map(|r| r.try_get("id"))
                .transpose()?;
        let (user, existed) = match found {
            Some(id) => (id, true),
            None => {
                sqlx::query(
                    "INSERT INTO users (id, email) VALUES ($1, $2) ON CONFLICT (email) DO NOTHING",
                )
                .bind(new_id)
                .bind(email)
                .execute(&mut *tx)
                .await?;
                let id: Uuid = sqlx::query("SELECT id FROM users WHERE email = $1")
                    .bind(email)
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("id")?;
                (id, id != new_id)
            }
        };
        let previous_role = sqlx::query(
            "SELECT role FROM org_members WHERE org_id = $1 AND user_id = $2 FOR UPDATE",
        )
        .bind(org)
        .bind(user)
        .fetch_optional(&mut *tx)
        .await?
        .and_then(|r| r.try_get::<String, _>("role").ok())
        .and_then(|r| Role::parse(&r));
        sqlx::query(
            "INSERT INTO org_members (org_id, user_id, role) VALUES ($1, $2, $3) \
             ON CONFLICT (org_id, user_id) DO UPDATE SET role = excluded.role",
        )
        .bind(org)
        .bind(user)
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
        Ok(sqlx::query("SELECT 1 FROM users WHERE id = $1")
            .bind(user)
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
        let mut tx = self.pool.begin().await?;
        if sqlx::query("SELECT 1 FROM orgs WHERE id = $1")
            .bind(org)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Ok(Err(AdminRefusal::NoSuchOrg));
        }
        if sqlx::query("SELECT 1 FROM org_members WHERE org_id = $1 AND user_id = $2")
            .bind(org)
            .bind(owner)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Ok(Err(AdminRefusal::NotAMember));
        }
        sqlx::query(
            "INSERT INTO machines (id, org_id, owner_id, name, node_key_hash) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(org)
        .bind(owner)
        .bind(name)
        .bind(node_key_hash)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ok(()))
    }

    async fn delete_machine(&self, id: Uuid) -> Result<bool> {
        let r = sqlx::query("DELETE FROM machines WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn access(&self, org: Uuid, user: Uuid) -> Result<Option<Access>> {
        let row = sqlx::query(
            "SELECT m.role, o.feature_session_recording FROM org_members m \
             JOIN orgs o ON o.id = m.org_id WHERE m.org_id = $1 AND m.user_id = $2",
        )
        .bind(org)
        .bind(user)
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
             FROM machines m JOIN orgs o ON o.id = m.org_id WHERE m.node_key_hash = $1",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(MachineAuth {
            id: row.try_get("id")?,
            org_id: row.try_get("org_id")?,
            owner_id: row.try_get("owner_id")?,
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
                    org_id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    session_recording: r.try_get("feature_session_recording")?,
                    created_at: timefmt::format(r.try_get("created_at")?),
                })
            })
            .collect()
    }

    async fn members(&self, org: Uuid) -> Result<Vec<MemberEntry>> {
        let rows = sqlx::query(
            "SELECT u.id, u.email, m.role FROM org_members m JOIN users u ON u.id = m.user_id \
             WHERE m.org_id = $1 ORDER BY u.email, u.id",
        )
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(MemberEntry {
                    user_id: r.try_get("id")?,
                    email: r.try_get("email")?,
                    role: r.try_get("role")?,
                })
            })
            .collect()
    }

    async fn machines(&self, org: Uuid) -> Result<Vec<MachineEntry>> {
        let rows = sqlx::query(
            "SELECT id, name, owner_id, created_at FROM machines WHERE org_id = $1 \
             ORDER BY created_at, id",
        )
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(MachineEntry {
                    machine_id: r.try_get("id")?,
                    name: r.try_get("name")?,
                    owner_id: r.try_get("owner_id")?,
                    created_at: timefmt::format(r.try_get("created_at")?),
                })
            })
            .collect()
    }

    async fn machine_name(&self, org: Uuid, machine: Uuid) -> Result<Option<String>> {
        let row = sqlx::query("SELECT name FROM machines WHERE id = $1 AND org_id = $2")
            .bind(machine)
            .bind(org)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| r.try_get("name").map_err(MetaError::from))
            .transpose()
    }

    async fn settings(&self, org: Uuid) -> Result<Option<Settings>> {
        let row = sqlx::query(
            "SELECT recording_enabled, recording_retention_days::bigint AS days, \
             recording_storage_mode FROM org_settings WHERE org_id = $1",
        )
        .bind(org)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(Settings {
            recording_enabled: row.try_get("recording_enabled")?,
            retention_days: row.try_get("days")?,
            storage_mode: row.try_get("recording_storage_mode")?,
        }))
    }

    async fn update_settings(&self, org: Uuid, u: &SettingsUpdate) -> Result<()> {
        sqlx::query(
            "INSERT INTO org_settings (org_id, recording_enabled, recording_retention_days, \
             recording_storage_mode) \
             VALUES ($1, COALESCE($2, FALSE), COALESCE($3::int, 90), COALESCE($4, 'platform')) \
             ON CONFLICT (org_id) DO UPDATE SET \
             recording_enabled = COALESCE($2, org_settings.recording_enabled), \
             recording_retention_days = COALESCE($3::int, org_settings.recording_retention_days), \
             recording_storage_mode = COALESCE($4, org_settings.recording_storage_mode)",
        )
        .bind(org)
        .bind(u.recording_enabled)
        .bind(u.retention_days)
        .bind(u.storage_mode.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn insert_recording(&self, rec: &Recording) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO session_recordings (id, org_id, machine_id, user_id, session_type, \
             status, started_at, ended_at, duration_seconds, metadata, r2_key) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (id) DO NOTHING",
        )
        .bind(rec.id)
        .bind(rec.org_id)
        .bind(rec.machine_id)
        .bind(rec.user_id)
        .bind(&rec.session_type)
        .bind(&rec.status)
        .bind(rec.started_at)
        .bind(rec.ended_at)
        .bind(rec.duration_seconds)
        .bind(Value::Object(rec.metadata.clone()))
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
                 (session_id, chunk_index, bytes, sha256, last_event_time) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(rec.id)
            .bind(c.index)
            .bind(c.bytes)
            .bind(&c.sha256)
            .bind(c.last_event_time)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(MIRROR_CHUNKS)
            .bind(rec.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn recording(&self, org: Uuid, id: Uuid, with_chunks: bool) -> Result<Option<Recording>> {
        let row = sqlx::query(&format!(
            "SELECT {RECORDING_COLUMNS} FROM session_recordings r \
             LEFT JOIN machines m ON m.id = r.machine_id WHERE r.id = $1 AND r.org_id = $2"
        ))
        .bind(id)
        .bind(org)
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
        // The recording's row is locked until the chunk is in: a `complete` (which locks it
        // for update) sees every chunk stored before it, and none comes after, in whichever
        // server process each runs. The object is written under that lock: a recording that
        // is no longer active keeps its objects as its rows describe them. The lock is
        // exclusive (not a share lock) because the row's `metadata.chunks` is rewritten, so
        // uploads to one recording take turns, as an agent sends them anyway, and two bodies
        // for one index never write its object at once.
        let mut tx = self.pool.begin().await?;
        bound_lock_wait(&mut tx).await?;
        let status: Option<String> = sqlx::query_scalar(
            "SELECT status FROM session_recordings WHERE id = $1 FOR NO KEY UPDATE",
        )
        .bind(session)
        .fetch_optional(&mut *tx)
        .await
        .map_err(lock_wait)?;
        match status.as_deref() {
            None => return Ok(ChunkOutcome::Gone),
            Some("active") => {}
            Some(_) => return Ok(ChunkOutcome::NotActive),
        }
        write.await?;
        let r = sqlx::query(
            "INSERT INTO session_recording_chunks \
             (session_id, chunk_index, bytes, sha256, last_event_time) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (session_id, chunk_index) DO UPDATE SET bytes = excluded.bytes, \
             sha256 = excluded.sha256, last_event_time = excluded.last_event_time",
        )
        .bind(session)
        .bind(c.index)
        .bind(c.bytes)
        .bind(&c.sha256)
        .bind(c.last_event_time)
        .execute(&mut *tx)
        .await;
        match r {
            Ok(_) => {}
            Err(e) if is_fk_violation(&e) => return Ok(ChunkOutcome::Gone),
            Err(e) => return Err(e.into()),
        }
        sqlx::query(MIRROR_CHUNK)
            .bind(session)
            .bind(c.index)
            .bind(c.bytes)
            .bind(&c.sha256)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(ChunkOutcome::Stored)
    }

    async fn complete(&self, id: Uuid, summarize: Summarize<'_>) -> Result<CompleteOutcome> {
        // Locked for update: uploads in flight (row locks) finish first, later ones find
        // the recording completed; of two completes, the second finds it completed before it
        // writes its summary over the first's.
        let mut tx = self.pool.begin().await?;
        bound_lock_wait(&mut tx).await?;
        let active = sqlx::query(
            "SELECT 1 FROM session_recordings WHERE id = $1 AND status = 'active' FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(lock_wait)?;
        if active.is_none() {
            return Ok(CompleteOutcome::NotActive);
        }
        let now: Vec<ChunkRow> = sqlx::query_as(
            "SELECT chunk_index, bytes, sha256, last_event_time FROM session_recording_chunks \
             WHERE session_id = $1 ORDER BY chunk_index",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        let (c, write) = summarize(&now);
        write.await?;
        sqlx::query(
            "UPDATE session_recordings SET status = 'completed', ended_at = $1, \
             duration_seconds = $2, r2_key = $3, metadata = metadata || $4::jsonb \
             WHERE id = $5",
        )
        .bind(c.ended_at)
        .bind(c.duration_seconds)
        .bind(&c.r2_key)
        .bind(Value::Object(c.metadata_merge.clone()))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(CompleteOutcome::Done)
    }

    async fn list(&self, org: Uuid, q: &ListQuery) -> Result<ListPage> {
        // Only the filters given go into the SQL, so each shape uses its index.
        let filters = |qb: &mut sqlx::QueryBuilder<'_, sqlx::Postgres>, prefix: &str| {
            qb.push(format!(" WHERE {prefix}org_id = ")).push_bind(org);
            if let Some(m) = q.machine_id {
                qb.push(format!(" AND {prefix}machine_id = ")).push_bind(m);
            }
            if let Some(s) = &q.status {
                qb.push(format!(" AND {prefix}status = "))
                    .push_bind(s.clone());
            }
        };
        let mut qb = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
            "SELECT {RECORDING_COLUMNS} FROM session_recordings r \
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
        let mut qb = sqlx::QueryBuilder::<sqlx::Postgres>::new(
            "SELECT status, COUNT(*)::bigint AS n, \
             COALESCE(SUM(duration_seconds), 0)::bigint AS d FROM session_recordings",
        );
        filters(&mut qb, "");
        qb.push(" GROUP BY status ORDER BY status DESC");
        let stats = qb
            .build_query_as::<StatusStats>()
            .fetch_all(&self.pool)
            .await?;
        Ok(ListPage::assemble(recordings, chunks, stats))
    }

    async fn delete_recording(&self, org: Uuid, id: Uuid, objects: &Objects) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let locked = sqlx::query(
            "SELECT id FROM session_recordings WHERE id = $1 AND org_id = $2 FOR UPDATE",
        )
        .bind(id)
        .bind(org)
        .fetch_optional(&mut *tx)
        .await?;
        if locked.is_none() {
            return Ok(false);
        }
        objects
            .delete_recording(&org.to_string(), &id.to_string())
            .await?;
        let r = sqlx::query("DELETE FROM session_recordings WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(r.rows_affected() > 0)
    }

    async fn sweep_org(&self, org: Uuid, cutoff: OffsetDateTime, objects: &Objects) -> Result<u64> {
        let mut deleted = 0;
        loop {
            // A locked row is waited for, not skipped: the holder may be an upload, which
            // deletes nothing (and it is brief), and one that another sweep deleted meanwhile
            // is passed over once its lock goes. Rows are locked in one order for every
            // sweep, so two never wait on each other.
            let mut tx = self.pool.begin().await?;
            let ids: Vec<Uuid> = sqlx::query(
                "SELECT id FROM session_recordings WHERE org_id = $1 AND started_at < $2 \
                 ORDER BY started_at, id LIMIT $3 FOR UPDATE",
            )
            .bind(org)
            .bind(cutoff)
            .bind(SWEEP_BATCH)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<std::result::Result<_, _>>()?;
            if ids.is_empty() {
                return Ok(deleted);
            }
            // Objects first: if this fails the rows stay (the transaction rolls back) and
            // the next sweep deletes what is left, then the rows.
            for id in &ids {
                objects
                    .delete_recording(&org.to_string(), &id.to_string())
                    .await?;
            }
            let r = sqlx::query("DELETE FROM session_recordings WHERE id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            deleted += r.rows_affected();
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
                 WHERE r.org_id = $1 AND r.started_at >= $2 AND EXISTS (SELECT 1 FROM session_recording_chunks c \
                 WHERE c.session_id = r.id) \
                 AND EXISTS (SELECT 1 FROM session_recordings o WHERE o.org_id = r.org_id \
                 AND o.started_at < $2) ORDER BY r.started_at DESC, r.id DESC LIMIT $3",
        )
        .bind(org)
        .bind(since)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("id")?,
                    r.try_get::<i64, _>("first")?.max(0) as u64,
                ))
            })
            .collect()
    }

    async fn retention_by_org(&self) -> Result<Vec<(Uuid, i64)>> {
        let rows = sqlx::query(
            "SELECT org_id, recording_retention_days::bigint AS days FROM org_settings",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("org_id")?, r.try_get("days")?)))
            .collect()
    }
}
