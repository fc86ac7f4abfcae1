//! `POST /api/session-recording`, the JWT route. Checks run in the contract's order: body,
//! action, required fields, well-formed fields, JWT, membership and role, feature flag, then
//! the action's own checks.

use axum::http::HeaderMap;
use serde_json::{json, Map, Value};
use uuid::Uuid;
use ztna_common::api::ErrorCode;

use super::error::Failure;
use super::fields::{self, Fields};
use super::recording;
use super::Success;
use crate::app::App;
use crate::meta::{ListQuery, Recording, Role, SettingsUpdate};

/// A request of the JWT route, parsed and validated.
#[derive(Debug)]
enum Action {
    GetSettings,
    UpdateSettings(SettingsUpdate),
    Start {
        machine_id: Uuid,
        session_type: String,
    },
    UploadChunk {
        session_id: Uuid,
        chunk_index: i64,
        chunk_data: String,
    },
    Complete {
        session_id: Uuid,
        duration_seconds: i64,
        recording_url: Option<String>,
        transcript_lines: Option<i64>,
    },
    Get {
        session_id: Uuid,
    },
    List(ListQuery),
    Delete {
        session_id: Uuid,
    },
    Cleanup,
}

/// Who may call an action.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Needs {
    Member,
    /// A member, and then the recording's owner or an admin (checked on the recording).
    OwnerOrAdmin,
    Admin,
}

const ACTIONS: &[(&str, &[&str])] = &[
    ("get_settings", &["org_id"]),
    ("update_settings", &["org_id"]),
    ("start", &["org_id", "machine_id", "session_type"]),
    ("upload_chunk", &["org_id", "session_id", "chunk_data"]),
    ("complete", &["org_id", "session_id", "duration_seconds"]),
    ("get", &["org_id", "session_id"]),
    ("list", &["org_id"]),
    ("delete", &["org_id", "session_id"]),
    ("cleanup", &["org_id"]),
];

fn parse(body: &Map<String, Value>) -> Result<(Uuid, Action), Failure> {
    let f = Fields(body);
    let name = match body.get("action") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(unknown_action()),
    };
    let required = ACTIONS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, r)| *r)
        .ok_or_else(unknown_action)?;
    f.require(required)?;
    let org = f.uuid("org_id")?;
    let action = match name {
        "get_settings" => Action::GetSettings,
        "update_settings" => {
            let storage_mode = f.opt_str("storage_mode")?;
            if let Some(m) = storage_mode {
                if m != "platform" && m != "custom" {
                    return Err(Failure::invalid_field(
                        "storage_mode",
                        "must be platform or custom",
                    ));
                }
            }
            Action::UpdateSettings(SettingsUpdate {
                recording_enabled: f.opt_bool("recording_enabled")?,
                retention_days: f.opt_int("retention_days")?.map(|d| d.clamp(1, 365)),
                storage_mode: storage_mode.map(str::to_string),
            })
        }
        "start" => Action::Start {
            machine_id: f.uuid("machine_id")?,
            session_type: fields::session_type(&f)?,
        },
        "upload_chunk" => Action::UploadChunk {
            session_id: f.uuid("session_id")?,
            chunk_index: fields::chunk_index(&f)?.unwrap_or(0),
            chunk_data: fields::chunk_text(&f, "chunk_data")?.to_string(),
        },
        "complete" => Action::Complete {
            session_id: f.uuid("session_id")?,
            duration_seconds: f.opt_seconds("duration_seconds")?.unwrap_or(0),
            recording_url: f.opt_str("recording_url")?.map(str::to_string),
            transcript_lines: f.opt_count("transcript_lines")?,
        },
        "get" => Action::Get {
            session_id: f.uuid("session_id")?,
        },
        "list" => {
            let status = f.opt_str("status")?;
            if let Some(s) = status {
                if s != "active" && s != "completed" {
                    return Err(Failure::invalid_field(
                        "status",
                        "must be active or completed",
                    ));
                }
            }
            Action::List(ListQuery {
                limit: f.opt_int("limit")?.unwrap_or(50).clamp(1, 200),
                offset: f.opt_count("offset")?.unwrap_or(0),
                machine_id: f.opt_uuid("machine_id")?,
                status: status.map(str::to_string),
            })
        }
        "delete" => Action::Delete {
            session_id: f.uuid("session_id")?,
        },
        "cleanup" => Action::Cleanup,
        _ => return Err(unknown_action()),
    };
    Ok((org, action))
}

fn unknown_action() -> Failure {
    Failure::new(
        ErrorCode::UnknownAction,
        "action must be one of get_settings, update_settings, start, upload_chunk, complete, \
         get, list, delete, cleanup",
    )
}

impl Action {
    fn needs(&self) -> Needs {
        match self {
            Action::GetSettings | Action::Start { .. } => Needs::Member,
            Action::UploadChunk { .. } | Action::Complete { .. } | Action::Get { .. } => {
                Needs::OwnerOrAdmin
            }
            Action::UpdateSettings(_)
            | Action::List(_)
            | Action::Delete { .. }
            | Action::Cleanup => Needs::Admin,
        }
    }
}

/// The caller's membership of `org`. A token whose user does not exist (any more) is
/// UNAUTHORIZED: it names nobody. An org that does not exist answers like one the caller is not
/// a member of (FORBIDDEN).
pub(crate) async fn member_access(
    app: &App,
    org: Uuid,
    user: Uuid,
) -> Result<crate::meta::Access, Failure> {
    if let Some(a) = app.inner.meta.access(org, user).await? {
        return Ok(a);
    }
    if !app.inner.meta.user_exists(user).await? {
        return Err(Failure::unauthorized());
    }
    Err(Failure::forbidden("not a member of this org"))
}

/// The token of an `Authorization: Bearer …` header; the cast endpoint checks it the same way.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The caller, checked against the org.
struct Caller {
    user: Uuid,
    role: Role,
}

pub async fn handle(
    app: &App,
    headers: &HeaderMap,
    body: Map<String, Value>,
) -> Result<Success, Failure> {
    let (org, action) = parse(&body)?;
    drop(body);
    let user = bearer(headers)
        .and_then(|t| app.inner.jwt.verify(t))
        .ok_or_else(Failure::unauthorized)?;
    let access = member_access(app, org, user).await?;
    if action.needs() == Needs::Admin && access.role != Role::Admin {
        return Err(Failure::forbidden("this action needs the admin role"));
    }
    if !access.feature_enabled {
        return Err(Failure::feature_disabled());
    }
    let caller = Caller {
        user,
        role: access.role,
    };
    apply(app, org, &caller, action).await
}

/// The recording `id` of `org` that the caller may touch: another org's is NOT_FOUND; a
/// member who is not its owner is FORBIDDEN.
async fn own_recording(
    app: &App,
    org: Uuid,
    caller: &Caller,
    id: Uuid,
    with_chunks: bool,
) -> Result<Recording, Failure> {
    let rec = app
        .inner
        .meta
        .recording(org, id, with_chunks)
        .await?
        .ok_or_else(|| Failure::not_found("recording"))?;
    if caller.role != Role::Admin && rec.user_id != caller.user {
        return Err(Failure::forbidden(
            "only the recording's owner or an org admin may do this",
        ));
    }
    Ok(rec)
}

async fn apply(app: &App, org: Uuid, caller: &Caller, action: Action) -> Result<Success, Failure> {
    let meta = &app.inner.meta;
    match action {
        Action::GetSettings => {
            let s = meta
                .settings(org)
                .await?
                .ok_or_else(|| Failure::forbidden("not a member of this org"))?;
            Ok(Success::ok(json!({
                "recording_enabled": s.recording_enabled,
                "retention_days": s.retention_days,
                "storage_mode": s.storage_mode,
            })))
        }
        Action::UpdateSettings(u) => {
            meta.update_settings(org, &u).await?;
            Ok(Success::ok(json!({"updated": true})))
        }
        Action::Start {
            machine_id,
            session_type,
        } => {
            let settings = meta
                .settings(org)
                .await?
                .ok_or_else(|| Failure::forbidden("not a member of this org"))?;
            if !settings.recording_enabled {
                return Err(Failure::recording_disabled());
            }
            if meta.machine_name(org, machine_id).await?.is_none() {
                return Err(Failure::not_found("machine"));
            }
            let rec = Recording::started(org, machine_id, caller.user, session_type, Map::new());
            meta.insert_recording(&rec).await?;
            Ok(Success::created(
                json!({"session_id": rec.id.to_string(), "status": "active"}),
            ))
        }
        Action::UploadChunk {
            session_id,
            chunk_index,
            chunk_data,
        } => {
            // Who may touch the recording is settled before what is sent to it: the contract
            // puts the role (owner or admin) before the action's own checks.
            let rec = own_recording(app, org, caller, session_id, false).await?;
            let (events, summary) = recording::chunk_events(chunk_data)?;
            let data =
                recording::store_chunk(app, &rec, chunk_index, events, summary.last_time).await?;
            Ok(Success::ok(data))
        }
        Action::Complete {
            session_id,
            duration_seconds,
            recording_url,
            transcript_lines,
        } => {
            let rec = own_recording(app, org, caller, session_id, true).await?;
            let data = recording::complete(
                app,
                &rec,
                Some(duration_seconds),
                recording_url.as_deref(),
                transcript_lines,
                Map::new(),
                None,
            )
            .await?;
            Ok(Success::ok(data))
        }
        Action::Get { session_id } => {
            let rec = own_recording(app, org, caller, session_id, true).await?;
            Ok(Success::ok(recording::get_json(app, &rec).await?))
        }
        Action::List(q) => {
            let page = meta.list(org, &q).await?;
            let recordings: Vec<Value> = page
                .recordings
                .iter()
                .map(recording::recording_json)
                .collect();
            let stats: Vec<Value> = page
                .stats
                .iter()
                .map(|s| {
                    json!({"status": s.status, "count": s.count, "total_duration": s.total_duration})
                })
                .collect();
            Ok(Success::ok(json!({
                "recordings": recordings,
                "stats": stats,
                "total": page.total,
            })))
        }
        Action::Delete { session_id } => {
            // Objects are deleted under the recording's row lock: a connection held meanwhile.
            let _slot = app.object_write_slot().await;
            if !meta
                .delete_recording(org, session_id, &app.inner.objects)
                .await?
            {
                return Err(Failure::not_found("recording"));
            }
            Ok(Success::ok(json!({"deleted": session_id.to_string()})))
        }
        Action::Cleanup => {
            let days = meta
                .settings(org)
                .await?
                .map(|s| s.retention_days)
                .unwrap_or(90);
            let deleted = app.sweep_org(org, days).await?;
            Ok(Success::ok(json!({"deleted": deleted})))
        }
    }
}
