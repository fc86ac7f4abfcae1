//! Metadata behind one trait: orgs, users, memberships, machines, settings and recordings.
//! Two implementations, each with its own migrations (run on open): SQLite (embedded
//! default, WAL) and PostgreSQL. [`open`] picks one from the URL scheme; nothing above this
//! module looks at which.
//!
//! A recording's `metadata.chunks` comes from `session_recording_chunks`: each chunk is a row
//! (one upsert per upload, so concurrent uploads cannot lose one another) and the list is
//! assembled when a recording is read. The JSON column keeps a mirror of it for whoever reads
//! the database itself; reads leave that mirror out.

mod postgres;
mod sqlite;

use std::sync::Arc;

use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::objects::{ObjectError, Objects};

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("unsupported database URL {0:?}: expected sqlite://PATH or postgres://…")]
    BadUrl(String),
    #[error("database URL {0:?} names no file (an in-memory database keeps nothing, and each connection would have its own): expected sqlite://PATH")]
    InMemory(String),
    /// A recording's row stayed locked past [`ROW_LOCK_WAIT`] (an upload of it held up by a
    /// store that does not answer): retryable.
    #[error("the recording is busy: another request on it has held it for over {} s", ROW_LOCK_WAIT.as_secs())]
    Busy,
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("cannot connect to the database at {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: {0}")]
    Batch(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    Objects(#[from] ObjectError),
    /// The store answers but holds none of the newest chunks the database lists: most likely
    /// `STORE_URL` names another store than the one this database's recordings went to. A
    /// sweep then deletes nothing, since deleting rows whose objects it cannot see would leave
    /// those objects behind in the right store for good.
    #[error("the object store {store} holds none of the newest chunks this database lists for org {org} (not found: {missing}); is STORE_URL right? Nothing was deleted")]
    StoreMismatch {
        store: String,
        org: Uuid,
        missing: String,
    },
}

pub type Result<T> = std::result::Result<T, MetaError>;

/// An object write handed to a store method, which awaits it where it is ordered with the
/// rows: inside the transaction that locks the recording, where the backend holds such locks
/// across processes (PostgreSQL), so that several servers on one database and bucket never
/// leave an object that its row does not describe.
pub type ObjectWrite<'a> = futures::future::BoxFuture<'a, std::result::Result<(), ObjectError>>;

/// A member's role in an org.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }
}

/// What a user may do in an org.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub role: Role,
    pub feature_enabled: bool,
}

/// A machine found by its node key.
#[derive(Debug, Clone)]
pub struct MachineAuth {
    pub id: Uuid,
    pub org_id: Uuid,
    pub owner_id: Uuid,
    pub name: String,
    pub feature_enabled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub recording_enabled: bool,
    pub retention_days: i64,
    pub storage_mode: String,
}

#[derive(Debug, Clone, Default)]
pub struct SettingsUpdate {
    pub recording_enabled: Option<bool>,
    /// Already clamped to 1..=365.
    pub retention_days: Option<i64>,
    pub storage_mode: Option<String>,
}

/// One stored chunk of a recording.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ChunkRow {
    #[sqlx(rename = "chunk_index")]
    pub index: i64,
    pub bytes: i64,
    pub sha256: String,
    /// Timestamp of the chunk's last event, for a `complete` without a duration.
    pub last_event_time: Option<f64>,
}

/// A row of `session_recordings` with its machine's name and its chunks. Inserting one writes
/// the row and its chunks; `machine_name` is read from the machine (a join), never written.
#[derive(Debug, Clone)]
pub struct Recording {
    pub id: Uuid,
    pub org_id: Uuid,
    pub machine_id: Option<Uuid>,
    pub user_id: Uuid,
    pub session_type: String,
    pub status: String,
    pub started_at: OffsetDateTime,
    pub ended_at: Option<OffsetDateTime>,
    pub duration_seconds: Option<i64>,
    pub metadata: Map<String, Value>,
    pub r2_key: Option<String>,
    pub machine_name: Option<String>,
    pub chunks: Vec<ChunkRow>,
}

impl Recording {
    /// What `start` inserts: a new id, active, started now, no chunk yet.
    pub fn started(
        org_id: Uuid,
        machine_id: Uuid,
        user_id: Uuid,
        session_type: String,
        metadata: Map<String, Value>,
    ) -> Recording {
        Recording {
            id: Uuid::new_v4(),
            org_id,
            machine_id: Some(machine_id),
            user_id,
            session_type,
            status: "active".into(),
            started_at: crate::timefmt::now(),
            ended_at: None,
            duration_seconds: None,
            metadata,
            r2_key: None,
            machine_name: None,
            chunks: Vec::new(),
        }
    }
}

/// What `complete` writes.
#[derive(Debug, Clone)]
pub struct Completion {
    pub ended_at: OffsetDateTime,
    pub duration_seconds: i64,
    pub r2_key: String,
    /// Keys merged into `metadata`.
    pub metadata_merge: Map<String, Value>,
}

#[derive(Debug, Clone)]
pub struct ListQuery {
    pub limit: i64,
    pub offset: i64,
    pub machine_id: Option<Uuid>,
    pub status: Option<String>,
}

/// One row of the list's per-status totals (`SELECT status, COUNT(*) AS n, SUM(…) AS d`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StatusStats {
    pub status: String,
    #[sqlx(rename = "n")]
    pub count: i64,
    #[sqlx(rename = "d")]
    pub total_duration: i64,
}

#[derive(Debug, Clone)]
pub struct ListPage {
    pub recordings: Vec<Recording>,
    pub stats: Vec<StatusStats>,
    pub total: i64,
}

impl ListPage {
    /// A page from what both stores query: the recordings, their chunks (any order) and the
    /// per-status totals (whose sum is the total).
    fn assemble(
        mut recordings: Vec<Recording>,
        chunks: Vec<(Uuid, ChunkRow)>,
        stats: Vec<StatusStats>,
    ) -> ListPage {
        let mut by_session: std::collections::HashMap<Uuid, Vec<ChunkRow>> =
            std::collections::HashMap::new();
        for (session, c) in chunks {
            by_session.entry(session).or_default().push(c);
        }
        for rec in &mut recordings {
            rec.chunks = by_session.remove(&rec.id).unwrap_or_default();
        }
        let total = stats.iter().map(|s| s.count).sum();
        ListPage {
            recordings,
            stats,
            total,
        }
    }
}

/// What became of a chunk row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkOutcome {
    Stored,
    /// The recording exists but is no longer `active`.
    NotActive,
    /// The recording was deleted meanwhile (by `delete` or a sweep).
    Gone,
}

/// What became of a `complete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompleteOutcome {
    Done,
    /// The recording is not `active` (completed, or gone).
    NotActive,
}

/// Builds a `complete` from the recording's chunks as the store holds them once it has locked
/// the recording: the row's new values and the write of its summary object.
pub type Summarize<'a> = Box<dyn FnOnce(&[ChunkRow]) -> (Completion, ObjectWrite<'a>) + Send + 'a>;

/// A foreign-key violation: the parent row went away under us.
/// How long an upload or a `complete` waits for its recording's row (PostgreSQL): behind an
/// upload held up by a stalled store, requests would otherwise queue, each waiting out the one
/// before (the tenth failed after ten store timeouts), holding database connections meanwhile.
pub const ROW_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// PostgreSQL's `lock_not_available` (a `lock_timeout` passed).
fn is_lock_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("55P03"))
}

fn is_fk_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_foreign_key_violation())
}

/// What `create_user` did: the user's id, whether an account with that address already
/// existed, and its role in the org before (None: it was not a member).
#[derive(Debug, Clone, Copy)]
pub struct UserAdded {
    pub id: Uuid,
    pub existed: bool,
    pub previous_role: Option<Role>,
}

/// An org as `admin org list` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OrgEntry {
    pub org_id: Uuid,
    pub name: String,
    pub session_recording: bool,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// A member of an org as `admin user list` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberEntry {
    pub user_id: Uuid,
    pub email: String,
    pub role: String,
}

/// A machine as `admin machine list` prints it (never its node key, which is kept hashed).
#[derive(Debug, Clone, serde::Serialize)]
pub struct MachineEntry {
    pub machine_id: Uuid,
    pub name: String,
    pub owner_id: Uuid,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// Why `register_machine` or `create_user` refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusal {
    NoSuchOrg,
    NotAMember,
}

#[async_trait::async_trait]
pub trait MetadataStore: Send + Sync {
    async fn create_org(&self, id: Uuid, name: &str, feature: bool) -> Result<()>;
    /// `false` when there is no such org.
    async fn set_feature(&self, org: Uuid, enabled: bool) -> Result<bool>;
    /// Creates the user (or reuses the one with this email, compared without case) and makes
    /// it a member with `role`.
    async fn create_user(
        &self,
        org: Uuid,
        new_id: Uuid,
        email: &str,
        role: Role,
    ) -> Result<std::result::Result<UserAdded, AdminRefusal>>;
    async fn user_exists(&self, user: Uuid) -> Result<bool>;
    async fn register_machine(
        &self,
        id: Uuid,
        org: Uuid,
        name: &str,
        owner: Uuid,
        node_key_hash: &str,
    ) -> Result<std::result::Result<(), AdminRefusal>>;
    /// `false` when there is no such machine.
    async fn delete_machine(&self, id: Uuid) -> Result<bool>;

    /// Every org, oldest first.
    async fn orgs(&self) -> Result<Vec<OrgEntry>>;
    /// An org's members by email (empty also when there is no such org).
    async fn members(&self, org: Uuid) -> Result<Vec<MemberEntry>>;
    /// An org's machines, oldest first (empty also when there is no such org).
    async fn machines(&self, org: Uuid) -> Result<Vec<MachineEntry>>;

    /// `None` when the org does not exist or the user is not a member.
    async fn access(&self, org: Uuid, user: Uuid) -> Result<Option<Access>>;
    async fn machine_by_key_hash(&self, hash: &str) -> Result<Option<MachineAuth>>;
    /// The machine's name when it belongs to `org`.
    async fn machine_name(&self, org: Uuid, machine: Uuid) -> Result<Option<String>>;

    /// `None` when the org has no settings row (it does not exist).
    async fn settings(&self, org: Uuid) -> Result<Option<Settings>>;
    async fn update_settings(&self, org: Uuid, update: &SettingsUpdate) -> Result<()>;

    /// `false` when a recording with this id exists already: nothing is written then.
    async fn insert_recording(&self, rec: &Recording) -> Result<bool>;
    /// The recording with this id in this org; its `chunks` only when `with_chunks` (an
    /// upload does not need them, and a long recording has many).
    async fn recording(&self, org: Uuid, id: Uuid, with_chunks: bool) -> Result<Option<Recording>>;
    /// Writes the chunk's object (`write`) and inserts or replaces its row, only while the
    /// recording is `active`. With `Gone` the object may have been written: the caller takes
    /// it back.
    async fn put_chunk(
        &self,
        session: Uuid,
        chunk: &ChunkRow,
        write: ObjectWrite<'_>,
    ) -> Result<ChunkOutcome>;
    /// Marks an `active` recording completed. The recording is locked first, so no upload
    /// lands meanwhile and of two `complete`s one wins; `summarize` then gets its chunks, and
    /// only the winner's summary object is written, before its row.
    async fn complete(&self, id: Uuid, summarize: Summarize<'_>) -> Result<CompleteOutcome>;
    async fn list(&self, org: Uuid, q: &ListQuery) -> Result<ListPage>;

    /// Deletes every object of the recording, then its row. `false` when there is none.
    async fn delete_recording(&self, org: Uuid, id: Uuid, objects: &Objects) -> Result<bool>;
    /// Deletes the org's recordings started before `cutoff` (objects first, then rows, so a
    /// sweep that fails half-way is finished by the next). Returns how many rows went.
    async fn sweep_org(&self, org: Uuid, cutoff: OffsetDateTime, objects: &Objects) -> Result<u64>;
    /// Every org with its retention in days.
    async fn retention_by_org(&self) -> Result<Vec<(Uuid, i64)>>;
    /// The first chunk (recording id, chunk index) of each of the org's `limit` newest
    /// recordings started at or after `since` that have any: what a sweep looks for in the
    /// store before it deletes what started before `since`. None when nothing in the org
    /// started before `since` (the sweep has nothing to delete, so nothing to look for).
    async fn newest_chunks(
        &self,
        org: Uuid,
        since: OffsetDateTime,
        limit: i64,
    ) -> Result<Vec<(Uuid, u64)>>;
}

/// The backends, by URL scheme.
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn of(url: &str) -> Result<Backend> {
        if let Some(rest) = url.strip_prefix("sqlite:") {
            // A database in memory is one per connection of the pool, and gone with the
            // process: every request would fail (no tables), and nothing would be kept.
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty()
                || path == ":memory:"
                || query.split('&').any(|kv| kv == "mode=memory")
            {
                return Err(MetaError::InMemory(url.to_string()));
            }
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else {
            Err(MetaError::BadUrl(crate::config::redact_url(url)))
        }
    }
}

/// Whether `url` names a backend [`open`] knows, without connecting.
pub fn check_url(url: &str) -> Result<()> {
    Backend::of(url).map(|_| ())
}

/// Opens (creating and migrating) the metadata store named by `url`.
pub async fn open(url: &str, max_connections: u32) -> Result<Arc<dyn MetadataStore>> {
    Ok(match Backend::of(url)? {
        Backend::Sqlite => Arc::new(sqlite::SqliteMeta::open(url, max_connections).await?),
        Backend::Postgres => Arc::new(postgres::PgMeta::open(url, max_connections).await?),
    })
}

/// Rows deleted per sweep transaction.
const SWEEP_BATCH: i64 = 100;

/// Stored metadata must be a JSON object; anything else is replaced by an empty one.
fn metadata_object(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_url_names_a_backend_and_a_file() {
        for url in [
            "sqlite:",
            "sqlite://",
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite://x.db?mode=memory",
        ] {
            assert!(
                matches!(check_url(url), Err(MetaError::InMemory(_))),
                "{url}"
            );
        }
        for url in [
            "sqlite:///var/lib/x/recordings.db",
            "sqlite://recordings.db?mode=rwc",
            "postgres://u@h/db",
        ] {
            assert!(check_url(url).is_ok(), "{url}");
        }
        assert!(matches!(
            check_url("mysql://h/db"),
            Err(MetaError::BadUrl(_))
        ));
    }

    /// A file that cannot be opened is said with the URL that names it. (A directory that is
    /// not there yet is created: this one cannot be, its parent is a device file.)
    #[tokio::test]
    async fn an_unopenable_sqlite_file_is_named() {
        let url = "sqlite:///dev/null/sub/recordings.db";
        match open(url, 1).await {
            Err(e) => assert!(e.to_string().contains("/dev/null/sub"), "{e}"),
            Ok(_) => panic!("opened {url}"),
        }
    }
}
