//! `POST /api/session-recording-agent`, the node-key route. The machine found by the key's
//! SHA-256 fixes the org, the machine and the user of everything the agent does; it can
//! reach no other recording than its own machine's.

use bytes::Bytes;
use serde_json::{json, Map, Value};
use uuid::Uuid;
use ztna_common::api::{chunk_key, summary_key, ErrorCode};
use ztna_common::asciicast;

use super::error::Failure;
use super::fields::{self, Fields};
use super::recording;
use super::Success;
use crate::app::App;
use crate::auth;
use crate::meta::{ChunkRow, MachineAuth, Recording};
use crate::timefmt;

#[derive(Debug)]
enum Action {
    Report {
        session_type: String,
        transcript: String,
        duration_seconds: Option<i64>,
    },
    Config,
    Start {
        session_type: String,
        header: Map<String, Value>,
        metadata: Map<String, Value>,
        /// When the session really started (ours: one that waited in the agent's spool).
        started_at: Option<time::OffsetDateTime>,
        /// The agent's own id for the session: a `start` sent again with it (its answer was
        /// lost) gets the recording the first one made, not a second one.
        agent_session_id: Option<Uuid>,
    },
    UploadChunk {
        session_id: Uuid,
        chunk_index: i64,
        chunk_data: String,
    },
    Complete {
        session_id: Uuid,
        duration_seconds: Option<i64>,
        transcript_lines: Option<i64>,
        metadata: Map<String, Value>,
        ended_at: Option<time::OffsetDateTime>,
    },
}

fn unknown_action() -> Failure {
    Failure::new(
        ErrorCode::UnknownAction,
        "action must be absent or one of report, config, start, upload_chunk, complete",
    )
}

/// Keys of a recording's metadata that only the server writes.
const SERVER_KEYS: [&str; 4] = ["chunks", "header", "machine_name", "reported_by_agent"];

/// Caller-supplied metadata, minus the keys the server owns.
fn caller_metadata(m: Option<&Map<String, Value>>) -> Map<String, Value> {
    let mut m = m.cloned().unwrap_or_default();
    for k in SERVER_KEYS {
        m.remove(k);
    }
    m
}

fn parse(body: &Map<String, Value>) -> Result<Action, Failure> {
    let f = Fields(body);
    let name = match body.get("action") {
        None | Some(Value::Null) => "report",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(unknown_action()),
    };
    Ok(match name {
        "report" => {
            f.require(&["session_type", "session_data"])?;
            let data = f
                .opt_object("session_data")?
                .ok_or_else(|| Failure::new(ErrorCode::MissingFields, "missing session_data"))?;
            let d = Fields(data);
            d.require(&["transcript"]).map_err(|_| {
                Failure::new(ErrorCode::MissingFields, "missing session_data.transcript")
            })?;
            Action::Report {
                session_type: fields::session_type(&f)?,
                transcript: fields::chunk_text(&d, "transcript")?.to_string(),
                duration_seconds: d.opt_seconds("duration_seconds")?,
            }
        }
        "config" => Action::Config,
        "start" => {
            f.require(&["session_type", "header"])?;
            let header = fields::header(&f)?;
            let metadata = fields::metadata(&f)?;
            Action::Start {
                session_type: fields::session_type(&f)?,
                header: header.clone(),
                metadata: caller_metadata(metadata),
                started_at: f.opt_time("started_at")?,
                agent_session_id: f.opt_uuid("agent_session_id")?,
            }
        }
        "upload_chunk" => {
            f.require(&["session_id", "chunk_index", "chunk_data"])?;
            Action::UploadChunk {
                session_id: f.uuid("session_id")?,
                chunk_index: fields::chunk_index(&f)?.unwrap_or(0),
                chunk_data: fields::chunk_text(&f, "chunk_data")?.to_string(),
            }
        }
        "complete" => {
            f.require(&["session_id"])?;
            let metadata = fields::metadata(&f)?;
            Action::Complete {
                session_id: f.uuid("session_id")?,
                duration_seconds: f.opt_seconds("duration_seconds")?,
                transcript_lines: f.opt_count("transcript_lines")?,
                metadata: caller_metadata(metadata),
                ended_at: f.opt_time("ended_at")?,
            }
        }
        _ => return Err(unknown_action()),
    })
}

pub async fn handle(app: &App, body: Map<String, Value>) -> Result<Success, Failure> {
    let action = parse(&body)?;
    // Never logged, never echoed: only its hash is looked up.
    let node_key = match body.get("node_key") {
        Some(Value::String(k)) if !k.is_empty() => auth::node_key_hash(k),
        // Missing or empty is no key (the contract's UNAUTHORIZED); another type is a
        // malformed field, which is checked before credentials.
        None | Some(Value::Null) | Some(Value::String(_)) => return Err(Failure::unauthorized()),
        Some(_) => return Err(Failure::invalid_field("node_key", "must be a string")),
    };
    drop(body);
    let machine = app
        .inner
        .meta
        .machine_by_key_hash(&node_key)
        .await?
        .ok_or_else(Failure::unauthorized)?;
    // `config` always answers (the contract): an agent whose org has the feature off learns
    // that it should not record, instead of an error it would retry.
    if !machine.feature_enabled && !matches!(action, Action::Config) {
        return Err(Failure::feature_disabled());
    }
    apply(app, &machine, action).await
}

/// A recording of the calling machine; anything else is NOT_FOUND.
async fn machine_recording(
    app: &App,
    machine: &MachineAuth,
    id: Uuid,
    with_chunks: bool,
) -> Result<Recording, Failure> {
    match app
        .inner
        .meta
        .recording(machine.org_id, id, with_chunks)
        .await?
    {
        Some(r) if r.machine_id == Some(machine.id) => Ok(r),
        _ => Err(Failure::not_found("recording")),
    }
}

async fn recording_enabled(app: &App, machine: &MachineAuth) -> Result<bool, Failure> {
    Ok(app
        .inner
        .meta
        .settings(machine.org_id)
        .await?
        .is_some_and(|s| s.recording_enabled))
}

async fn apply(app: &App, machine: &MachineAuth, action: Action) -> Result<Success, Failure> {
    let meta = &app.inner.meta;
    match action {
        Action::Config => {
            let s = meta
                .settings(machine.org_id)
                .await?
                .ok_or_else(Failure::unauthorized)?;
            Ok(Success::ok(json!({
                "org_id": machine.org_id.to_string(),
                "machine_id": machine.id.to_string(),
                "recording_enabled": s.recording_enabled && machine.feature_enabled,
                "retention_days": s.retention_days,
                "storage_mode": s.storage_mode,
            })))
        }
        Action::Report {
            session_type,
            transcript,
            duration_seconds,
        } => {
            if !recording_enabled(app, machine).await? {
                return Err(Failure::recording_disabled());
            }
            let t = asciicast::parse_transcript(&transcript).map_err(|e| {
                Failure::invalid_chunk(format!("transcript is not asciicast v2: {e}"))
            })?;
            drop(transcript);
            // The header is part of the transcript, so a U+0000 in it (which `jsonb` cannot
            // hold) makes the transcript unusable like any other bad line.
            if t.header.as_ref().is_some_and(fields::has_nul) {
                return Err(Failure::invalid_chunk(
                    "transcript is not asciicast v2: its header must not contain U+0000",
                ));
            }
            let duration =
                duration_seconds.unwrap_or_else(|| asciicast::duration_secs(t.summary.last_time));
            let id = Uuid::new_v4();
            let org = machine.org_id.to_string();
            let session = id.to_string();
            let now = timefmt::now();
            let chunk = chunk_key(&org, &session, 0);
            let key = summary_key(&org, &session);
            // The objects go first and the row last, so that a recording is never listed
            // without its objects; a refused report takes back what it wrote (a full database,
            // a store that failed half way), or it would stay where no row leads to it.
            // The keys a put was tried for (a failed one may still land in the store).
            let mut tried: Vec<String> = Vec::new();
            let written = async {
                let chunks: Vec<ChunkRow> = if t.summary.events > 0 {
                    let row = ChunkRow {
                        index: 0,
                        bytes: t.events_text.len() as i64,
                        sha256: recording::sha256_hex(t.events_text.as_bytes()),
                        last_event_time: t.summary.last_time,
                    };
                    tried.push(chunk.clone());
                    app.inner
                        .objects
                        .put(&chunk, Bytes::from(t.events_text))
                        .await?;
                    vec![row]
                } else {
                    Vec::new()
                };
                let summary = recording::summary_json(
                    &session,
                    duration,
                    None,
                    Some(t.summary.events as i64),
                    now,
                    &chunks,
                );
                tried.push(key.clone());
                app.inner
                    .objects
                    .put(&key, Bytes::from(summary.to_string()))
                    .await?;
                let mut metadata = Map::new();
                if let Some(h) = t.header {
                    metadata.insert("header".into(), h);
                }
                metadata.insert("reported_by_agent".into(), Value::Bool(true));
                metadata.insert("machine_name".into(), Value::String(machine.name.clone()));
                meta.insert_recording(&Recording {
                    id,
                    org_id: machine.org_id,
                    machine_id: Some(machine.id),
                    user_id: machine.owner_id,
                    session_type,
                    status: "completed".into(),
                    // The session ran for `duration` up to now (retention and `list` go by
                    // `started_at`), believed like an agent's own start time: a duration
                    // beyond that would have the next sweep delete the report at once.
                    started_at: Some(time::Duration::seconds(duration))
                        .filter(|&d| d <= recording::AGENT_CLOCK_BACK)
                        .and_then(|d| now.checked_sub(d))
                        .unwrap_or(now),
                    ended_at: Some(now),
                    duration_seconds: Some(duration),
                    metadata,
                    r2_key: Some(key.clone()),
                    machine_name: None,
                    chunks,
                })
                .await?;
                Ok::<(), Failure>(())
            }
            .await;
            if let Err(e) = written {
                // Only once the row is known not to be there: a commit whose answer was lost
                // may have made it, and its objects must stay then.
                if matches!(meta.recording(machine.org_id, id, false).await, Ok(None)) {
                    take_back(app.inner.objects.clone(), tried);
                }
                return Err(e);
            }
            Ok(Success::created(
                json!({"session_id": session, "status": "completed"}),
            ))
        }
        Action::Start {
            session_type,
            header,
            mut metadata,
            started_at,
            agent_session_id,
        } => {
            let id = agent_session_id.map(|a| agent_recording_id(machine.id, a));
            // A start sent again finds its recording even after recording was switched off:
            // one already active may still get its chunks and complete.
            if let Some(found) = earlier_start(app, machine, id).await? {
                return Ok(found);
            }
            if !recording_enabled(app, machine).await? {
                return Err(Failure::recording_disabled());
            }
            metadata.insert("header".into(), Value::Object(header));
            // As with `report`: the recording says which machine reported it, even after the
            // machine is deleted and its row's `machine_name` goes null.
            metadata.insert("machine_name".into(), Value::String(machine.name.clone()));
            let mut rec = Recording::started(
                machine.org_id,
                machine.id,
                machine.owner_id,
                session_type,
                metadata,
            );
            rec.id = id.unwrap_or(rec.id);
            rec.started_at = recording::agent_time(started_at, None, rec.started_at);
            if !meta.insert_recording(&rec).await? {
                // The same start, twice at once: the other one made it.
                return earlier_start(app, machine, id)
                    .await?
                    .ok_or_else(|| Failure::conflict("this agent_session_id is taken"));
            }
            Ok(Success::created(
                json!({"session_id": rec.id.to_string(), "status": "active"}),
            ))
        }
        Action::UploadChunk {
            session_id,
            chunk_index,
            chunk_data,
        } => {
            let (events, summary) = recording::chunk_events(chunk_data)?;
            let rec = machine_recording(app, machine, session_id, false).await?;
            let data =
                recording::store_chunk(app, &rec, chunk_index, events, summary.last_time).await?;
            Ok(Success::ok(data))
        }
        Action::Complete {
            session_id,
            duration_seconds,
            transcript_lines,
            metadata,
            ended_at,
        } => {
            let rec = machine_recording(app, machine, session_id, true).await?;
            let data = recording::complete(
                app,
                &rec,
                duration_seconds,
                None,
                transcript_lines,
                metadata,
                ended_at,
            )
            .await?;
            Ok(Success::ok(data))
        }
    }
}

/// Deletes the objects of a refused `report`, in the background so that the answer does not
/// wait for a store that is failing: tried at once, then again with a growing pause for about
/// ten minutes (a store that was down comes back), since no row leads `delete` or retention
/// to them.
fn take_back(objects: crate::objects::Objects, keys: Vec<String>) {
    if keys.is_empty() {
        return;
    }
    tokio::spawn(async move {
        let mut left = keys;
        let mut pause = std::time::Duration::from_secs(1);
        for _ in 0..12 {
            let mut failed = Vec::new();
            for k in left {
                if let Err(e) = objects.delete(&k).await {
                    tracing::warn!(error = %e, key = k, "could not take back an object of a refused report yet");
                    failed.push(k);
                }
            }
            if failed.is_empty() {
                return;
            }
            left = failed;
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(120));
        }
        tracing::error!(keys = ?left, "gave up taking back the objects of a refused report: delete them by hand");
    });
}

/// The backend's id for an agent's own session id: the same pair always gives the same id,
/// and no machine can pick one that another machine's sessions map to.
fn agent_recording_id(machine: Uuid, agent_session: Uuid) -> Uuid {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    h.update(b"ztna-recorder agent session\0");
    h.update(machine.as_bytes());
    h.update(agent_session.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&h.finalize()[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// The answer a `start` got the first time, when the recording with this id is this
/// machine's.
async fn earlier_start(
    app: &App,
    machine: &MachineAuth,
    id: Option<Uuid>,
) -> Result<Option<Success>, Failure> {
    let Some(id) = id else { return Ok(None) };
    Ok(app
        .inner
        .meta
        .recording(machine.org_id, id, false)
        .await?
        .filter(|r| r.machine_id == Some(machine.id))
        .map(|r| Success::created(json!({"session_id": r.id.to_string(), "status": r.status}))))
}
