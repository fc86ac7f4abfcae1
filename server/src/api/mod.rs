//! The HTTP API: the two routes, the envelope, the body limit. Each route parses the body
//! into a typed action (`user`, `agent`), authenticates, then applies it; what both routes do
//! to a recording (store a chunk, complete, render) lives in `recording`.

pub mod agent;
pub mod error;
pub mod fields;
pub mod recording;
pub mod user;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Map, Value};
use ztna_common::api::{Envelope, ErrorCode, AGENT_ROUTE, MAX_BODY_BYTES, USER_ROUTE};

use crate::app::App;
use error::Failure;

/// What an action answers on success: 200 or 201, and `data`.
pub struct Success {
    pub status: StatusCode,
    pub data: Value,
}

impl Success {
    pub fn ok(data: Value) -> Self {
        Success {
            status: StatusCode::OK,
            data,
        }
    }
    pub fn created(data: Value) -> Self {
        Success {
            status: StatusCode::CREATED,
            data,
        }
    }
}

pub fn router(app: App) -> Router {
    Router::new()
        .route(USER_ROUTE, post(user_route))
        .route(AGENT_ROUTE, post(agent_route))
        .fallback(fallback)
        .with_state(app)
}

fn failure_response(f: Failure) -> Response {
    let status =
        StatusCode::from_u16(f.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(Envelope::err(f.code, f.message))).into_response()
}

fn answer(
    app: &App,
    route: &'static str,
    action: Option<&str>,
    r: Result<Success, Failure>,
) -> Response {
    let response = match r {
        Ok(s) => {
            tracing::debug!(route, status = s.status.as_u16(), "answered");
            (s.status, Json(Envelope::ok(s.data))).into_response()
        }
        Err(f) => {
            tracing::debug!(route, code = ?f.code, message = %f.message, "refused");
            failure_response(f)
        }
    };
    app.inner
        .metrics
        .request(route, action, response.status().as_u16());
    response
}

/// The body's `action`, for the request counters (the actions parse it themselves).
fn action_of(obj: &Map<String, Value>) -> Option<String> {
    obj.get("action")
        .and_then(Value::as_str)
        .map(str::to_string)
}

async fn fallback() -> Response {
    failure_response(Failure::new(ErrorCode::NotFound, "no such route"))
}

/// How much of an oversized body we read and throw away before answering 413, so that a
/// client still writing gets the answer instead of a broken pipe. Past this we just close.
const DRAIN_LIMIT: usize = 4 * MAX_BODY_BYTES;

/// Reads the body up to 16 MiB (413 past that) and parses it as a JSON object.
async fn read_object(headers: &HeaderMap, body: Body) -> Result<Map<String, Value>, Failure> {
    use http_body_util::BodyExt as _;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut too_large = declared.is_some_and(|n| n > MAX_BODY_BYTES as u64);
    let mut buf = bytes::BytesMut::new();
    let mut seen = 0usize;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(_) => return Err(Failure::invalid_json("could not read the request body")),
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen > MAX_BODY_BYTES {
            too_large = true;
            buf = bytes::BytesMut::new();
        }
        if too_large {
            if seen > DRAIN_LIMIT {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&data);
    }
    if too_large {
        return Err(Failure::too_large("request body is over 16 MiB"));
    }
    match serde_json::from_slice::<Value>(&buf) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Failure::invalid_json("the body must be a JSON object")),
        Err(_) => Err(Failure::invalid_json("the body is not valid JSON")),
    }
}

async fn user_route(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let mut action = None;
    let r = match read_object(&headers, body).await {
        Ok(obj) => {
            action = action_of(&obj);
            user::handle(&app, &headers, obj).await
        }
        Err(f) => Err(f),
    };
    answer(&app, USER_ROUTE, action.as_deref(), r)
}

async fn agent_route(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let mut action = None;
    let r = match read_object(&headers, body).await {
        Ok(obj) => {
            action = action_of(&obj).or_else(|| Some(String::from("report")));
            agent::handle(&app, obj).await
        }
        Err(f) => Err(f),
    };
    answer(&app, AGENT_ROUTE, action.as_deref(), r)
}
