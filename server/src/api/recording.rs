//! What both routes do to a recording: store a chunk (object first, durable, then its row),
//! complete (summary object, then the row; the metadata store orders both with its locks),
//! render it as JSON, check its chunks' integrity.

use bytes::Bytes;
use serde_json::{json, Map, Value};
use sha2::{Digest as _, Sha256};
use ztna_common::api::{chunk_key, summary_key};
use ztna_common::asciicast;

use super::error::Failure;
use crate::app::App;
use crate::meta::{
    ChunkOutcome, ChunkRow, CompleteOutcome, Completion, ObjectWrite, Recording, Summarize,
};
use crate::timefmt;

/// Validates `chunk_data` (asciicast v2 event lines, at least one) and normalises it to what
/// is stored: one event a line, each ending in `\n` (the text itself when it already is).
/// Both routes' `upload_chunk` take this.
pub fn chunk_events(text: String) -> Result<(String, asciicast::EventsSummary), Failure> {
    let (events, summary) = asciicast::normalise_events_owned(text)
        .map_err(|e| Failure::invalid_chunk(format!("not asciicast v2 event lines: {e}")))?;
    if summary.events == 0 {
        return Err(Failure::invalid_chunk("chunk_data holds no event"));
    }
    Ok((events, summary))
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Stores chunk `index` of an active recording; the same index again replaces it.
pub async fn store_chunk(
    app: &App,
    rec: &Recording,
    index: i64,
    events: String,
    last_event_time: Option<f64>,
) -> Result<Value, Failure> {
    if rec.status != "active" {
        return Err(Failure::conflict(format!(
            "recording is {}, chunks go only to active recordings",
            rec.status
        )));
    }
    let _locked = app.inner.locks.upload(rec.id, index).await;
    // `rec` was read before the lock: a `complete` may have finished since.
    still_active(app, rec).await?;
    let org = rec.org_id.to_string();
    let session = rec.id.to_string();
    // `index` is checked to be in 0..=1e9 by the field parser.
    let key = chunk_key(&org, &session, index.unsigned_abs());
    let row = ChunkRow {
        index,
        bytes: events.len() as i64,
        sha256: sha256_hex(events.as_bytes()),
        last_event_time,
    };
    let write = Box::pin(app.inner.objects.put(&key, Bytes::from(events)));
    let _slot = app.object_write_slot().await;
    match app.inner.meta.put_chunk(rec.id, &row, write).await? {
        ChunkOutcome::Stored => {}
        ChunkOutcome::NotActive => {
            return Err(Failure::conflict("recording is no longer active"));
        }
        ChunkOutcome::Gone => {
            // Deleted while we wrote: take our object back so nothing is orphaned.
            if let Err(e) = app.inner.objects.delete(&key).await {
                tracing::warn!(error = %e, key, "could not remove the chunk of a deleted recording");
            }
            return Err(Failure::not_found("recording"));
        }
    }
    app.inner.metrics.chunk_stored(row.bytes.unsigned_abs());
    Ok(json!({"stored": key, "chunk_index": index}))
}

/// Striped locks, so that what one server process does to a recording's objects and rows
/// happens in an order the rows can describe (different recordings and chunks hash apart and go
/// in parallel):
/// - `recordings`: uploads share it, `complete` holds it alone. An upload refused because the
///   recording completed must not have replaced the chunk's object first, and a `complete` that
///   loses to another must not have written its summary over the winner's.
/// - `chunks`: uploads of one chunk index take turns (object of one, row of the other would
///   leave a row whose SHA-256 is not the stored object's).
///
/// They cover one process. Several processes sharing PostgreSQL and a bucket are ordered by the
/// database, which writes the objects under its own locks (see `MetadataStore::put_chunk`).
pub struct Locks {
    recordings: Vec<tokio::sync::RwLock<()>>,
    chunks: Vec<tokio::sync::Mutex<()>>,
}

const STRIPES: usize = 64;

impl Default for Locks {
    fn default() -> Self {
        Locks {
            recordings: (0..STRIPES).map(|_| tokio::sync::RwLock::new(())).collect(),
            chunks: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }
}

fn stripe(key: impl std::hash::Hash) -> usize {
    use std::hash::Hasher as _;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    // The modulo keeps it in range; STRIPES fits any usize.
    (h.finish() % STRIPES as u64) as usize
}

impl Locks {
    pub async fn upload(
        &self,
        session: uuid::Uuid,
        index: i64,
    ) -> (
        tokio::sync::RwLockReadGuard<'_, ()>,
        tokio::sync::MutexGuard<'_, ()>,
    ) {
        let r = self.recordings[stripe(session)].read().await;
        let c = self.chunks[stripe((session, index))].lock().await;
        (r, c)
    }

    pub async fn complete(&self, session: uuid::Uuid) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        self.recordings[stripe(session)].write().await
    }
}

/// `Ok` while the recording is still there and `active`; else the answer to give.
async fn still_active(app: &App, rec: &Recording) -> Result<(), Failure> {
    match app.inner.meta.recording(rec.org_id, rec.id, false).await? {
        None => Err(Failure::not_found("recording")),
        Some(r) if r.status != "active" => Err(Failure::conflict(format!(
            "recording is already {}",
            r.status
        ))),
        Some(_) => Ok(()),
    }
}

/// The `metadata.chunks` list.
pub fn chunks_json(chunks: &[ChunkRow]) -> Value {
    Value::Array(
        chunks
            .iter()
            .map(|c| json!({"index": c.index, "bytes": c.bytes, "sha256": c.sha256}))
            .collect(),
    )
}

/// The summary object `complete` (and an agent `report`) writes.
pub fn summary_json(
    session: &str,
    duration: i64,
    recording_url: Option<&str>,
    transcript_lines: Option<i64>,
    completed_at: time::OffsetDateTime,
    chunks: &[ChunkRow],
) -> Value {
    json!({
        "session_id": session,
        "duration_seconds": duration,
        "recording_url": recording_url,
        "transcript_lines": transcript_lines,
        "completed_at": timefmt::format(completed_at),
        "chunks": chunks_json(chunks),
    })
}

/// How far back an agent's `started_at` is believed: a spool rarely waits longer, and a clock
/// that is far off must not date a recording (retention deletes by it).
pub(super) const AGENT_CLOCK_BACK: time::Duration = time::Duration::days(30);

/// The agent's time if it is believable (not after `latest`, not more than
/// [`AGENT_CLOCK_BACK`] before it, not before `earliest`), else `latest`.
pub fn agent_time(
    given: Option<time::OffsetDateTime>,
    earliest: Option<time::OffsetDateTime>,
    latest: time::OffsetDateTime,
) -> time::OffsetDateTime {
    match given {
        Some(t)
            if t <= latest && t >= latest - AGENT_CLOCK_BACK && earliest.is_none_or(|e| t >= e) =>
        {
            // Microseconds, as both databases keep them.
            t.replace_nanosecond(t.nanosecond() / 1000 * 1000)
                .unwrap_or(t)
        }
        _ => latest,
    }
}

/// Completes an active recording: with the recording locked against uploads and other
/// `complete`s, writes its summary object from the chunks stored, then marks the row. Without a
/// `duration`, it is the last event's time in the highest-index chunk, rounded up.
pub async fn complete(
    app: &App,
    rec: &Recording,
    duration: Option<i64>,
    recording_url: Option<&str>,
    transcript_lines: Option<i64>,
    metadata_merge: Map<String, Value>,
    ended_at: Option<time::OffsetDateTime>,
) -> Result<Value, Failure> {
    if rec.status != "active" {
        return Err(Failure::conflict(format!(
            "recording is already {}",
            rec.status
        )));
    }
    let _alone = app.inner.locks.complete(rec.id).await;
    still_active(app, rec).await?;
    let org = rec.org_id.to_string();
    let session = rec.id.to_string();
    let key = summary_key(&org, &session);
    let objects = &app.inner.objects;
    let summarize: Summarize<'_> = Box::new(|chunks: &[ChunkRow]| {
        let duration = duration.unwrap_or_else(|| {
            asciicast::duration_secs(chunks.last().and_then(|c| c.last_event_time))
        });
        let now = timefmt::now();
        let summary = summary_json(
            &session,
            duration,
            recording_url,
            transcript_lines,
            now,
            chunks,
        );
        let completion = Completion {
            ended_at: agent_time(ended_at, Some(rec.started_at), now),
            duration_seconds: duration,
            r2_key: key.clone(),
            metadata_merge,
        };
        let write = Box::pin(objects.put(&key, Bytes::from(summary.to_string())));
        (completion, write as ObjectWrite<'_>)
    });
    let _slot = app.object_write_slot().await;
    match app.inner.meta.complete(rec.id, summarize).await? {
        CompleteOutcome::Done => Ok(json!({"completed": session})),
        // Completed or deleted by another server meanwhile.
        CompleteOutcome::NotActive => Err(still_active(app, rec)
            .await
            .err()
            .unwrap_or_else(|| Failure::conflict("recording is already completed"))),
    }
}

/// A recording as the API shows it: every column, `metadata.chunks`, and `machine_name`.
pub fn recording_json(rec: &Recording) -> Value {
    let mut metadata = rec.metadata.clone();
    metadata.insert("chunks".into(), chunks_json(&rec.chunks));
    json!({
        "id": rec.id.to_string(),
        "org_id": rec.org_id.to_string(),
        "machine_id": rec.machine_id.map(|m| m.to_string()),
        "user_id": rec.user_id.to_string(),
        "session_type": rec.session_type,
        "status": rec.status,
        "started_at": timefmt::format(rec.started_at),
        "ended_at": rec.ended_at.map(timefmt::format),
        "duration_seconds": rec.duration_seconds,
        "metadata": Value::Object(metadata),
        "r2_key": rec.r2_key,
        "machine_name": rec.machine_name,
    })
}

/// How many chunks `integrity` reads at once: a store's round trip, not its bandwidth, is
/// most of a small chunk's read, and at most this many chunks (8 MiB each at worst) are held.
const INTEGRITY_READS: usize = 4;

/// The most chunk bytes one `get` reads to check their SHA-256: past this, chunks are checked
/// by their size only (a large recording would otherwise be read whole on every `get`, which
/// any member may repeat at will).
const INTEGRITY_READ_BYTES: i64 = 64 * 1024 * 1024;
/// The most chunks one `get` reads whole (a request each), however small.
const INTEGRITY_READ_CHUNKS: usize = 256;

/// `"ok"` when every chunk's object is there with its recorded SHA-256, `"sizes_ok"` when the
/// recording is over [`INTEGRITY_READ_BYTES`] or [`INTEGRITY_READ_CHUNKS`] and every chunk is
/// there with its recorded size (the SHA-256 of those within the limits checked), `"missing"`
/// when one is gone, `"mismatch"` when one differs.
pub async fn integrity(app: &App, rec: &Recording) -> Result<&'static str, Failure> {
    use futures::{StreamExt as _, TryStreamExt as _};
    let org = rec.org_id.to_string();
    let session = rec.id.to_string();
    let mut read = 0i64;
    let mut by_size = Vec::new();
    // Built first: a stream that maps with a closure borrowing `app` is not `Send` to axum.
    let mut reads = Vec::new();
    for c in &rec.chunks {
        let key = chunk_key(&org, &session, c.index.unsigned_abs());
        read = read.saturating_add(c.bytes);
        if read <= INTEGRITY_READ_BYTES && reads.len() < INTEGRITY_READ_CHUNKS {
            reads.push(check_chunk(app, key, c));
        } else {
            by_size.push((key, c.bytes));
        }
    }
    let mut verdicts: Vec<&'static str> = futures::stream::iter(reads)
        .buffer_unordered(INTEGRITY_READS)
        .try_collect()
        .await?;
    if !by_size.is_empty() {
        let sizes = app
            .inner
            .objects
            .sizes(&ztna_common::api::chunk_prefix(&org, &session))
            .await?;
        verdicts.extend(by_size.iter().map(|(key, bytes)| match sizes.get(key) {
            None => "missing",
            Some(&n) if i64::try_from(n).ok() != Some(*bytes) => "mismatch",
            Some(_) => "sizes_ok",
        }));
    }
    Ok(["missing", "mismatch", "sizes_ok"]
        .into_iter()
        .find(|v| verdicts.contains(v))
        .unwrap_or("ok"))
}

async fn check_chunk(app: &App, key: String, c: &ChunkRow) -> Result<&'static str, Failure> {
    Ok(match app.inner.objects.get(&key).await? {
        None => "missing",
        Some(data) if data.len() as i64 != c.bytes || sha256_hex(&data) != c.sha256 => "mismatch",
        Some(_) => "ok",
    })
}

/// `get`'s answer: the recording, the summary object (or null) and the integrity verdict.
pub async fn get_json(app: &App, rec: &Recording) -> Result<Value, Failure> {
    // The row is the answer; what the object store adds is best-effort, so a store that is
    // down costs `r2_data` (null) and the verdict ("unknown"), not the whole `get`.
    let r2_data = match &rec.r2_key {
        Some(key) => match app.inner.objects.get(key).await {
            Ok(Some(bytes)) => serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null),
            Ok(None) => Value::Null,
            Err(e) => {
                tracing::warn!(error = %e, key, "cannot read a recording's summary");
                Value::Null
            }
        },
        None => Value::Null,
    };
    let verdict = match integrity(app, rec).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = ?e, session = %rec.id, "cannot check a recording's chunks");
            "unknown"
        }
    };
    Ok(json!({
        "recording": recording_json(rec),
        "r2_data": r2_data,
        "integrity": verdict,
    }))
}
