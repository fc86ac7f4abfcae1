//! The web dashboard and the cast endpoint.
//!
//! The dashboard is static files (server/web/) embedded in the binary: no web server to run
//! beside us and nothing to build at run time. It talks only to the JWT route and to
//! `GET /api/session-recording/cast?org_id=…&session_id=…`, which streams a recording's whole
//! asciicast (header line, then its chunks in index order) with the same auth rules as `get`:
//! the recording's owner or an org admin. Chunks are read one object at a time, so memory
//! does not grow with the recording. `&from_chunk=N` gives only the chunks from index N on,
//! which is how the dashboard follows a live recording.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use serde_json::{Map, Value};
use uuid::Uuid;
use ztna_common::api::{chunk_key, Envelope, ErrorCode};

use crate::api::error::Failure;
use crate::api::fields::parse_uuid;
use crate::app::App;
use crate::meta::{Recording, Role};
use crate::objects::ObjectError;

/// The path of the cast endpoint.
pub const CAST_ROUTE: &str = "/api/session-recording/cast";

/// What the browser may load: our own files and the player's inlined wasm; styles inline
/// because the player sizes its terminal with style attributes. Data is never markup, but
/// this keeps an injected tag inert if a bug ever let one through.
const CSP: &str = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; \
                   style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../web/index.html"),
    },
    Asset {
        path: "/index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../web/index.html"),
    },
    Asset {
        path: "/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../web/app.js"),
    },
    Asset {
        path: "/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../web/style.css"),
    },
    Asset {
        path: "/vendor/asciinema-player/asciinema-player.min.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../web/vendor/asciinema-player/asciinema-player.min.js"),
    },
    Asset {
        path: "/vendor/asciinema-player/asciinema-player.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../web/vendor/asciinema-player/asciinema-player.css"),
    },
    Asset {
        path: "/vendor/asciinema-player/LICENSE",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("../web/vendor/asciinema-player/LICENSE"),
    },
];

/// The dashboard's files and the cast endpoint, to merge into the API router.
pub fn router(app: App) -> Router {
    let mut r = Router::new();
    for a in ASSETS {
        let (content_type, body) = (a.content_type, a.body);
        r = r.route(
            a.path,
            get(move || async move { asset(content_type, body) }).fallback(crate::api::get_only),
        );
    }
    r.route(CAST_ROUTE, get(cast).fallback(crate::api::get_only))
        .with_state(app)
}

fn asset(content_type: &'static str, body: &'static [u8]) -> Response {
    let mut res = Response::new(Body::from(Bytes::from_static(body)));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Embedded files change only with the binary; revalidating is cheap and never stale.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

fn failure(f: Failure) -> Response {
    tracing::debug!(route = CAST_ROUTE, code = ?f.code, message = %f.message, "refused");
    let status =
        StatusCode::from_u16(f.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(Envelope::err(f.code, f.message))).into_response()
}

async fn cast(
    State(app): State<App>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    let response = match authorize(&app, &headers, query).await {
        Ok((rec, from_chunk)) => stream_cast(&app, rec, from_chunk).await,
        Err(f) => failure(f),
    };
    app.inner.metrics.request(
        "/api/session-recording/cast",
        None,
        response.status().as_u16(),
    );
    response
}

/// The largest chunk index the API accepts.
const MAX_CHUNK_INDEX: i64 = 1_000_000_000;

/// The contract's order: required fields, well-formed fields, JWT, membership, feature flag,
/// then the recording (another org's is NOT_FOUND) and owner-or-admin. Also returns the
/// optional `from_chunk`.
async fn authorize(
    app: &App,
    headers: &HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<(Recording, Option<i64>), Failure> {
    let Query(pairs) =
        query.map_err(|_| Failure::invalid_field("query", "not a valid query string"))?;
    // Each parameter once: `org_id=A&org_id=B` would mean one org to a proxy or log that
    // reads the first and another to us.
    let mut q = HashMap::new();
    for (k, v) in pairs {
        if q.contains_key(&k) {
            return Err(Failure::invalid_field(&k, "given twice"));
        }
        q.insert(k, v);
    }
    let present = |k: &str| q.get(k).filter(|v| !v.is_empty());
    let missing: Vec<&str> = ["org_id", "session_id"]
        .into_iter()
        .filter(|k| present(k).is_none())
        .collect();
    if !missing.is_empty() {
        return Err(Failure::new(
            ErrorCode::MissingFields,
            format!("missing required field(s): {}", missing.join(", ")),
        ));
    }
    let uuid = |k: &str| -> Result<Uuid, Failure> {
        present(k)
            .and_then(|v| parse_uuid(v))
            .ok_or_else(|| Failure::invalid_field(k, "must be a UUID"))
    };
    let org = uuid("org_id")?;
    let session = uuid("session_id")?;
    let from_chunk = match q.get("from_chunk") {
        None => None,
        Some(v) => Some(
            v.parse::<i64>()
                .ok()
                .filter(|i| (0..=MAX_CHUNK_INDEX).contains(i))
                .ok_or_else(|| {
                    Failure::invalid_field(
                        "from_chunk",
                        "must be a whole number from 0 to 1000000000",
                    )
                })?,
        ),
    };
    let user = crate::api::user::bearer(headers)
        .and_then(|t| app.inner.jwt.verify(t))
        .ok_or_else(Failure::unauthorized)?;
    let access = crate::api::user::member_access(app, org, user).await?;
    if !access.feature_enabled {
        return Err(Failure::feature_disabled());
    }
    let rec = app
        .inner
        .meta
        .recording(org, session, true)
        .await?
        .ok_or_else(|| Failure::not_found("recording"))?;
    if access.role != Role::Admin && rec.user_id != user {
        return Err(Failure::forbidden(
            "only the recording's owner or an org admin may do this",
        ));
    }
    Ok((rec, from_chunk))
}

/// The recording's asciicast header line: `metadata.header` as the agent sent it (a missing
/// or unusable size becomes 80x24), else a default 80x24 header stamped with the start time.
fn header_line(rec: &Recording) -> String {
    let mut h = match rec.metadata.get("header") {
        Some(Value::Object(m)) => m.clone(),
        _ => {
            let mut m = Map::new();
            m.insert(
                "timestamp".into(),
                Value::from(rec.started_at.unix_timestamp()),
            );
            m
        }
    };
    h.insert("version".into(), Value::from(2));
    for (k, default) in [("width", 80u64), ("height", 24u64)] {
        let ok = h
            .get(k)
            .and_then(Value::as_u64)
            .is_some_and(|n| (1..=u64::from(u16::MAX)).contains(&n));
        if !ok {
            h.insert(k.into(), Value::from(default));
        }
    }
    let mut line = Value::Object(h).to_string();
    line.push('\n');
    line
}

fn read_error(e: ObjectError) -> std::io::Error {
    tracing::error!(error = %e, "cast: cannot read a chunk; response cut short");
    std::io::Error::other(e.to_string())
}

/// The whole cast, or with `from_chunk` only the chunks from that index on (no header): what
/// a viewer following a live recording fetches. The `X-Recording-*` headers tell it the
/// recording's status, how many chunks it has, how many this answer carries and the index
/// to ask from next.
async fn stream_cast(app: &App, rec: Recording, from_chunk: Option<i64>) -> Response {
    let org = rec.org_id.to_string();
    let session = rec.id.to_string();
    let mut chunks: Vec<i64> = rec.chunks.iter().map(|c| c.index).collect();
    chunks.sort_unstable();
    chunks.dedup();
    let total = chunks.len();
    let next = chunks.last().map_or(0, |i| i + 1);
    let keys: Vec<String> = chunks
        .into_iter()
        .filter(|i| from_chunk.is_none_or(|from| *i >= from))
        .map(|i| chunk_key(&org, &session, i.unsigned_abs()))
        .collect();
    let sent = keys.len();
    let objects = app.inner.objects.clone();
    let mut keys = keys.into_iter();
    // The first chunk is opened before the answer starts: a store that cannot be read is
    // refused with a status and the envelope, not a 200 cut short after the header.
    let first = match keys.next() {
        None => None,
        Some(key) => match objects.get_stream(&key).await {
            Ok(Some(pieces)) => Some(Ok(pieces.map_err(read_error as fn(_) -> _))),
            Ok(None) => {
                tracing::error!(%key, "cast: chunk object is missing");
                return failure(Failure::new(
                    ErrorCode::InternalError,
                    "a chunk of this recording is missing from the object store",
                ));
            }
            Err(e) => return failure(e.into()),
        },
    };
    let header = match from_chunk {
        None => Bytes::from(header_line(&rec)),
        Some(_) => Bytes::new(),
    };
    let head = futures::stream::once(futures::future::ready(Ok::<Bytes, std::io::Error>(header)));
    // `then` polls one future at a time: one chunk open, in index order, and of it only the
    // piece being sent in memory (a client that reads slowly holds no more).
    let rest = futures::stream::iter(keys).then(move |key| {
        let objects = objects.clone();
        async move {
            match objects.get_stream(&key).await {
                Ok(Some(pieces)) => Ok(pieces.map_err(read_error as fn(_) -> _)),
                Ok(None) => {
                    tracing::error!(%key, "cast: chunk object is missing; response cut short");
                    Err(std::io::Error::other(format!("chunk {key} is missing")))
                }
                Err(e) => {
                    tracing::error!(%key, error = %e, "cast: cannot read chunk; response cut short");
                    Err(std::io::Error::other(e.to_string()))
                }
            }
        }
    });
    let body = futures::stream::iter(first).chain(rest);
    let mut res = Response::new(Body::from_stream(head.chain(body.try_flatten())));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-asciicast"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("inline; filename=\"{session}.cast\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    for (name, value) in [
        ("x-recording-status", rec.status.clone()),
        ("x-recording-chunks", total.to_string()),
        ("x-recording-chunks-sent", sent.to_string()),
        ("x-recording-next-chunk", next.to_string()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recording(metadata: Map<String, Value>) -> Recording {
        Recording {
            id: Uuid::new_v4(),
            org_id: Uuid::new_v4(),
            machine_id: None,
            user_id: Uuid::new_v4(),
            session_type: "ssh".into(),
            status: "active".into(),
            started_at: time::macros::datetime!(2026-01-02 03:04:05 UTC),
            ended_at: None,
            duration_seconds: None,
            metadata,
            r2_key: None,
            machine_name: None,
            chunks: Vec::new(),
        }
    }

    fn parse(line: &str) -> Value {
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn header_is_the_agents_or_a_default() {
        let rec = recording(Map::new());
        assert_eq!(
            parse(&header_line(&rec)),
            serde_json::json!({"version": 2, "width": 80, "height": 24, "timestamp": 1767323045})
        );

        let mut md = Map::new();
        let h = serde_json::json!({"version": 2, "width": 132, "height": 43,
            "timestamp": 5, "env": {"TERM": "xterm"}, "title": "<b>x</b>"});
        md.insert("header".into(), h.clone());
        assert_eq!(parse(&header_line(&recording(md))), h);

        // an unusable size is repaired, everything else kept
        let mut md = Map::new();
        md.insert(
            "header".into(),
            serde_json::json!({"version": 2, "width": 0, "height": "x", "env": {}}),
        );
        assert_eq!(
            parse(&header_line(&recording(md))),
            serde_json::json!({"version": 2, "width": 80, "height": 24, "env": {}})
        );
    }

    #[test]
    fn assets_are_embedded() {
        for a in ASSETS {
            assert!(!a.body.is_empty(), "{} is empty", a.path);
        }
        let index = std::str::from_utf8(ASSETS[0].body).unwrap();
        assert!(index.contains("/app.js") && index.contains("asciinema-player.min.js"));
        let app =
            std::str::from_utf8(ASSETS.iter().find(|a| a.path == "/app.js").unwrap().body).unwrap();
        // the dashboard never renders API data as markup
        assert!(!app.contains("innerHTML") && !app.contains("insertAdjacentHTML"));
        assert!(!app.contains("localStorage.setItem"));
    }
}
