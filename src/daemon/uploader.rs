//! Ships spooled sessions to the backend: `start` once, then `upload_chunk` for each closed
//! chunk in index order, one at a time; a chunk file is deleted only after the backend's 200;
//! `complete` only once the end mark is there and every chunk is acknowledged. Failures the
//! backend may recover from are retried with capped full-jitter backoff; answers that will
//! never change set the session (or the chunk) aside in `failed/`.

use super::spool::{Chunks, EndMark, SessionDir};
use super::{lock, pacing, Shared, Uploaded};
use crate::client::{ChunkRead, ClientError};
use rand::Rng;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ztna_common::api::ErrorCode;

/// The first retry waits up to this long; each further one doubles the bound.
const BACKOFF_BASE: Duration = Duration::from_millis(250);

/// Full jitter: a uniform wait in `[0, min(cap, base·2^attempt)]`.
pub fn backoff(attempt: u32, cap: Duration) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(20));
    let bound = exp.min(cap).max(Duration::from_millis(1));
    let ms = rand::thread_rng().gen_range(0..=bound.as_millis() as u64);
    Duration::from_millis(ms)
}

enum Step {
    /// Something was done: look again at once.
    Progress,
    /// Nothing to do until the session writes more.
    Idle,
    /// The session is gone from the spool (completed or set aside).
    Done,
}

#[derive(Debug)]
enum StepError {
    Retry(String),
    /// Local trouble (unreadable file): retry too, but say so.
    Local(std::io::Error),
}

impl From<std::io::Error> for StepError {
    fn from(e: std::io::Error) -> Self {
        StepError::Local(e)
    }
}

/// What to do with a request the backend refused.
enum Disposition {
    Retry,
    /// The session can never be delivered: set it aside.
    Quarantine,
}

fn disposition(e: &ClientError) -> Disposition {
    if e.is_retryable() {
        return Disposition::Retry;
    }
    match e.code() {
        // Configuration on the backend (machine re-registered, feature or recording switched
        // back on) can fix these: keep the data and keep trying, slowly.
        Some(ErrorCode::Unauthorized)
        | Some(ErrorCode::Forbidden)
        | Some(ErrorCode::FeatureDisabled)
        | Some(ErrorCode::RecordingDisabled) => Disposition::Retry,
        // Not the backend's own answer: something in front of it (a proxy's 404 page, its
        // 413 for a body limit, a route that takes no POST) that configuration can fix.
        None | Some(ErrorCode::MethodNotAllowed) => Disposition::Retry,
        Some(_) => Disposition::Quarantine,
    }
}

/// How many chunks a session uploads back to back before it lets another session have its
/// upload slot.
const MAX_STREAK: u32 = 8;

/// Uploads one session until nothing is left to do; at most one task per session runs.
pub async fn run_session(shared: Arc<Shared>, id: String) {
    let dir = shared.spool.session(&id);
    let cap = Duration::from_secs(shared.config.retry_max_secs.max(1));
    let mut attempt: u32 = 0;
    // The backend's id for this session when `remote.json` could not be written (a full
    // disk): without it every retry would start another recording on the backend.
    let mut remote_unsaved: Option<String> = None;
    let mut permit = None;
    let mut streak = 0;
    let defer = Duration::from_secs(shared.config.upload_defer_secs);
    let mut deferred_since = None;
    loop {
        // Bulk output on the live sessions goes first (see `pacing`); what waits is on disk.
        let busy = pacing::yield_now(&shared);
        if let Some(wait) = pacing::wait_for(busy, &mut deferred_since, Instant::now(), defer) {
            permit = None;
            {
                let _counted = pacing::Waiting::new(&shared.deferring);
                tokio::time::sleep(wait).await;
            }
            if !dir.exists() {
                finish(&shared, &id);
                return;
            }
            continue;
        }
        // A slot per run of requests, not per task: a session waiting out its backoff, or
        // for a slot, holds none. A slot given up after a run goes to a waiting session first
        // (the semaphore is fair); when none waits it is taken straight back.
        if permit.is_none() {
            let Ok(p) = shared.upload_slots.acquire().await else {
                finish(&shared, &id);
                return;
            };
            permit = Some(p);
            streak = 0;
        }
        let result = step(&shared, &dir, &id, &mut remote_unsaved).await;
        streak += 1;
        // Requests go back to back while they get through, up to a fair share of the slot.
        if !matches!(result, Ok(Step::Progress)) || streak >= MAX_STREAK {
            permit = None;
        }
        // Any step that got an answer through (a chunk, a completion, a refusal that settles
        // the session) means uploads are not failing any more.
        if matches!(result, Ok(Step::Progress | Step::Done))
            && shared.uploads_failing.swap(false, Ordering::SeqCst)
        {
            shared.backend_back.notify_waiters();
        }
        match result {
            Ok(Step::Progress) => attempt = 0,
            Ok(Step::Done) => {
                finish(&shared, &id);
                return;
            }
            Ok(Step::Idle) => {
                // Stop unless someone asked for a look while we were busy.
                let mut up = lock(&shared.uploading);
                if up.get(&id).copied().unwrap_or(false) {
                    up.insert(id.clone(), false);
                } else {
                    drop(up);
                    stop_uploading(&shared, &id);
                    return;
                }
            }
            Err(e) => {
                let msg = match &e {
                    StepError::Retry(m) => m.clone(),
                    StepError::Local(io) => format!("spool: {io}"),
                };
                shared.upload_error(&msg);
                let wait = backoff(attempt, cap);
                attempt = attempt.saturating_add(1);
                tracing::warn!(session = %id, attempt, wait_ms = wait.as_millis() as u64, "upload failed: {msg}");
                shared.uploads_failing.store(true, Ordering::SeqCst);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shared.backend_back.notified() => {}
                }
                if !dir.exists() {
                    finish(&shared, &id);
                    return;
                }
            }
        }
    }
}

fn finish(shared: &Shared, id: &str) {
    stop_uploading(shared, id);
    // A session completed, dropped or set aside needs no held end mark any more.
    lock(&shared.unwritten_ends).remove(id);
}

/// This session's uploads are done for now.
fn stop_uploading(shared: &Shared, id: &str) {
    lock(&shared.uploading).remove(id);
}

async fn step(
    shared: &Shared,
    dir: &SessionDir,
    id: &str,
    remote_unsaved: &mut Option<String>,
) -> Result<Step, StepError> {
    if !dir.exists() {
        return Ok(Step::Done);
    }
    let client = &shared.client;
    let remote = match (dir.remote()?, remote_unsaved.take()) {
        (Some(r), _) => r,
        (None, Some(r)) => {
            // Saved as soon as the disk has room again (each acknowledged chunk frees some).
            if dir.set_remote(&r).is_err() {
                *remote_unsaved = Some(r.clone());
            }
            r
        }
        (None, None) => {
            let (header, metadata) = dir.start_info()?;
            // When the session started: it may have waited in the spool for days. (With its
            // header damaged, its end says: when it ended, less how long it ran.)
            let started_at = dir
                .started_at()
                .and_then(|t| parse_time(t.trim()))
                .or_else(|| header_time(&header))
                .or_else(|| {
                    let end = dir.end().ok()??;
                    let ended = parse_time(end.ended_at.as_deref()?)?;
                    Some(ended - time::Duration::seconds(end.duration_seconds?))
                });
            match client
                .start(
                    "ssh",
                    &header,
                    &metadata,
                    started_at.map(format_time).as_deref(),
                    Some(id),
                )
                .await
            {
                Ok(s) => {
                    shared.backend_answered();
                    tracing::info!(session = %id, remote = %s.session_id, "recording started on the backend");
                    if let Err(e) = dir.set_remote(&s.session_id) {
                        tracing::warn!(session = %id, "cannot save the backend's id yet ({e}): kept in memory");
                        *remote_unsaved = Some(s.session_id);
                    }
                    return Ok(Step::Progress);
                }
                Err(e) => return refused(shared, id, e, "start"),
            }
        }
    };

    let Chunks { closed, parts } = dir.chunks()?;
    if !parts.is_empty() && !shared.is_live(id) {
        // The session is over, yet a chunk is still a part file: its close failed (fsync or
        // rename refused, a full disk). Seal it now as the next start's recovery would, not
        // leave the session waiting for a restart.
        match dir.seal_parts() {
            Ok(()) => {
                tracing::info!(session = %id, "part files left by a failed close sealed");
                return Ok(Step::Progress);
            }
            // Uploading the chunks before it frees space: those go first, then it is retried.
            Err(e) if closed.first().is_some_and(|c| Some(c) < parts.first()) => {
                tracing::warn!(session = %id, "sealing part files: {e}; uploading the chunks before them first");
            }
            Err(e) => return Err(e.into()),
        }
    }
    // A closed chunk above a part file (the session still writing it, or sealing it failed)
    // waits for it: chunks go to the backend in index order.
    let chunks: &[u64] = match parts.first() {
        Some(&p) => &closed[..closed.partition_point(|&i| i < p)],
        None => &closed,
    };
    if let Some(&index) = chunks.first() {
        let path = dir.chunk_path(index);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            // The session was removed meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Step::Progress),
            Err(e) => return Err(e.into()),
        };
        let t0 = Instant::now();
        let (result, read) = client.post_chunk_file(&remote, index, file).await;
        match read {
            Some(ChunkRead::NotUtf8) => {
                // Only a damaged disk gets here: what can be read is kept.
                let n = dir.repair_chunk(index)?;
                tracing::error!(session = %id, index, damaged_lines = n, "chunk was not UTF-8: repaired");
                return Ok(Step::Progress);
            }
            Some(ChunkRead::Failed(kind)) => {
                return Err(std::io::Error::new(kind, format!("reading chunk {index}")).into())
            }
            Some(ChunkRead::Whole(_)) | None => {}
        }
        match result {
            Ok(_) => {
                shared.backend_answered();
                std::fs::remove_file(&path)?;
                shared.uploaded(Uploaded::Chunk);
                let bytes = match read {
                    Some(ChunkRead::Whole(n)) => n,
                    _ => 0,
                };
                tracing::debug!(session = %id, index, bytes, ms = t0.elapsed().as_millis() as u64, "chunk acknowledged");
                return Ok(Step::Progress);
            }
            Err(e) => {
                if e.backend_answered() {
                    shared.backend_answered();
                }
                if e.code() == Some(ErrorCode::InvalidChunk) {
                    // A damaged line costs that line, not the chunk.
                    let n = dir.repair_chunk(index)?;
                    if n > 0 {
                        tracing::error!(session = %id, index, damaged_lines = n, "backend refused a damaged chunk ({e}): its damaged lines dropped, the rest sent again");
                        return Ok(Step::Progress);
                    }
                }
                if matches!(
                    e.code(),
                    Some(ErrorCode::InvalidChunk) | Some(ErrorCode::PayloadTooLarge)
                ) {
                    tracing::error!(session = %id, index, "backend refuses this chunk for good ({e}): set aside");
                    shared.spool.quarantine_chunk(id, index)?;
                    trim_failed(shared);
                    return Ok(Step::Progress);
                }
                return refused(shared, id, e, "upload_chunk");
            }
        }
    }
    if !parts.is_empty() || shared.is_live(id) {
        return Ok(Step::Idle);
    }
    let Some(end) = dir.end()? else {
        // Ended without an end mark on disk: the one the disk refused (full; the uploads above
        // have freed space since), or none at all (the connection went away, or the daemon is
        // stopping): then interrupted, as the next start's recovery would mark it.
        let held = lock(&shared.unwritten_ends).remove(id);
        let was_held = held.is_some();
        let mark = held.unwrap_or_else(EndMark::interrupted);
        if let Err(e) = dir.set_end(&mark) {
            if was_held {
                lock(&shared.unwritten_ends).insert(id.to_string(), mark);
            }
            return Err(e.into());
        }
        tracing::info!(session = %id, interrupted = mark.interrupted, "end mark written by the uploader");
        return Ok(Step::Progress);
    };
    let mut metadata = end.metadata.clone();
    metadata.extend(dir.notes()?);
    // An interrupted session's end was not seen: when it started, plus how long it ran.
    let ended_at = end.ended_at.clone().or_else(|| {
        let (header, _) = dir.start_info().ok()?;
        let d = end.duration_seconds?;
        Some(format_time(
            header_time(&header)? + time::Duration::seconds(d),
        ))
    });
    let metadata = Value::Object(metadata);
    match client
        .complete(
            &remote,
            end.duration_seconds,
            end.transcript_lines,
            &metadata,
            ended_at.as_deref(),
        )
        .await
    {
        Ok(_) => {}
        // Already completed: an earlier `complete` got through but its answer did not.
        Err(e) if e.code() == Some(ErrorCode::Conflict) => {
            tracing::info!(session = %id, "backend says the recording is already completed");
        }
        Err(e) => return refused(shared, id, e, "complete"),
    }
    shared.backend_answered();
    dir.remove()?;
    shared.uploaded(Uploaded::Session);
    tracing::info!(session = %id, remote = %remote, interrupted = end.interrupted, "recording completed on the backend");
    Ok(Step::Done)
}

/// When a session started, from its asciicast header.
fn header_time(header: &Value) -> Option<time::OffsetDateTime> {
    let t = header.get("timestamp").and_then(Value::as_i64)?;
    time::OffsetDateTime::from_unix_timestamp(t).ok()
}

fn parse_time(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

fn format_time(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn refused(shared: &Shared, id: &str, e: ClientError, action: &str) -> Result<Step, StepError> {
    if e.backend_answered() {
        shared.backend_answered();
    }
    let mut verdict = disposition(&e);
    if e.code() == Some(ErrorCode::RecordingDisabled) {
        *lock(&shared.recording_enabled) = Some((false, Instant::now()));
        // The org switched recording off before the backend heard of this session (it began
        // while the daemon's copy of the settings was older than the switch, or the backend
        // was away): retried, it would be uploaded the day recording is switched back on, a
        // recording of a time it was off. Kept on this machine, never sent by itself.
        if action == "start" {
            verdict = Disposition::Quarantine;
        }
    }
    match verdict {
        Disposition::Retry => Err(StepError::Retry(format!("{action}: {e}"))),
        // A live session is still writing into its folder: decide once it has ended.
        _ if shared.is_live(id) => Err(StepError::Retry(format!("{action}: {e}"))),
        Disposition::Quarantine => {
            tracing::error!(session = %id, "{action}: {e}: the backend will never take this session: moved to failed/");
            shared.upload_error(&format!("{action}: {e}"));
            shared.spool.quarantine(id, &format!("{action}: {e}"))?;
            trim_failed(shared);
            Ok(Step::Done)
        }
    }
}

/// The most entries `failed/` keeps (each a session's folder, or a chunk).
const FAILED_MAX_ENTRIES: usize = 1000;

/// Keeps `failed/` to an eighth of `spool_max_bytes` and [`FAILED_MAX_ENTRIES`], the oldest
/// deleted first (see [`Spool::trim_failed`](super::spool::Spool::trim_failed)).
fn trim_failed(shared: &Shared) {
    let max_bytes = shared.config.spool_max_bytes / 8;
    match shared.spool.trim_failed(max_bytes, FAILED_MAX_ENTRIES) {
        Ok(deleted) if deleted.is_empty() => {}
        Ok(deleted) => tracing::warn!(
            deleted = ?deleted,
            "failed/ is over {max_bytes} bytes or {FAILED_MAX_ENTRIES} entries: its oldest deleted"
        ),
        Err(e) => tracing::error!("cannot keep failed/ within its limits: {e}"),
    }
}

/// Keeps the backend's `config` answer fresh (recording switched on or off).
pub async fn refresh_config_loop(shared: Arc<Shared>) {
    let every = Duration::from_secs(shared.config.config_refresh_secs.max(1));
    let mut attempt = 0;
    loop {
        match shared.client.config().await {
            Ok(c) => {
                shared.backend_answered();
                let before = lock(&shared.recording_enabled).map(|(e, _)| e);
                *lock(&shared.recording_enabled) = Some((c.recording_enabled, Instant::now()));
                if before != Some(c.recording_enabled) {
                    tracing::info!(recording_enabled = c.recording_enabled, machine = %c.machine_id, "backend config");
                }
                attempt = 0;
                tokio::time::sleep(every).await;
            }
            Err(e) => {
                if e.backend_answered() {
                    shared.backend_answered();
                }
                tracing::warn!("backend config: {e}");
                let wait = backoff(attempt, every);
                attempt += 1;
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_backends_own_refusals_set_a_session_aside() {
        let api = |status, code| ClientError::Api {
            status,
            code,
            message: String::new(),
        };
        // Recording switched off, a proxy's HTML page: kept, tried again later.
        for e in [
            api(403, Some(ErrorCode::RecordingDisabled)),
            api(404, None),
            api(413, None),
            api(401, Some(ErrorCode::Unauthorized)),
        ] {
            assert!(matches!(disposition(&e), Disposition::Retry), "{e}");
        }
        for e in [
            api(400, Some(ErrorCode::InvalidField)),
            api(404, Some(ErrorCode::NotFound)),
        ] {
            assert!(matches!(disposition(&e), Disposition::Quarantine), "{e}");
        }
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let cap = Duration::from_secs(2);
        for a in 0..40 {
            assert!(backoff(a, cap) <= cap);
        }
        assert!(backoff(0, cap) <= BACKOFF_BASE);
    }
}
