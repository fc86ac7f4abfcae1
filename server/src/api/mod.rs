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
        .route(USER_ROUTE, post(user_route).fallback(method_not_allowed))
        .route(AGENT_ROUTE, post(agent_route).fallback(method_not_allowed))
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

/// The API routes take POST only; any other method gets the envelope too, and `Allow`.
async fn method_not_allowed() -> Response {
    wrong_method("POST", "this route takes POST with a JSON body")
}

/// A route's refusal of a method it does not take: the envelope, and `Allow`.
pub(crate) fn wrong_method(allow: &'static str, message: &str) -> Response {
    let mut r = failure_response(Failure::new(ErrorCode::MethodNotAllowed, message));
    r.headers_mut().insert(
        axum::http::header::ALLOW,
        axum::http::HeaderValue::from_static(allow),
    );
    r
}

/// The refusal for the GET routes (the dashboard, the cast, `/healthz`, `/metrics`).
pub(crate) async fn get_only() -> Response {
    wrong_method("GET, HEAD", "this route takes GET")
}

/// The body's top-level object, each key given once: `{"action": "get", "action": "delete"}`
/// would mean one thing to a proxy or log that reads the first and another to us.
struct UniqueKeys(Map<String, Value>);

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut m = Map::new();
                while let Some(k) = a.next_key::<String>()? {
                    if m.contains_key(&k) {
                        return Err(serde::de::Error::custom(format!(
                            "the key {k:?} is given twice"
                        )));
                    }
                    let mut v: Value = a.next_value()?;
                    unsign_zeros(&mut v);
                    m.insert(k, v);
                }
                Ok(UniqueKeys(m))
            }
        }
        d.deserialize_map(Keys)
    }
}

/// `-0` becomes `0.0`: PostgreSQL's `jsonb` has no negative zero and SQLite's text keeps it, so
/// what a recording's metadata reads back as would otherwise depend on the backend.
fn unsign_zeros(v: &mut Value) {
    match v {
        Value::Number(n) if n.as_f64().is_some_and(|f| f == 0.0 && f.is_sign_negative()) => {
            *v = Value::from(0.0);
        }
        Value::Array(a) => a.iter_mut().for_each(unsign_zeros),
        Value::Object(m) => m.values_mut().for_each(unsign_zeros),
        _ => {}
    }
}

/// The longest a request body may take to arrive, however steadily.
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

/// How much of an oversized body we read and throw away before answering 413, so that a
/// client still writing gets the answer instead of a broken pipe. Past this we just close.
const DRAIN_LIMIT: usize = 4 * MAX_BODY_BYTES;

/// The largest body that takes no room in the budget (see `read_object`).
const SMALL_BODY_BYTES: usize = 64 * 1024;

/// The most arrays, objects and elements a body may hold. Parsed, each costs tens of bytes
/// where its text may take two: 16 MiB of `[0,0,…]` took 270 MiB. Text is what our callers
/// send in bulk (chunks, transcripts), and a header or metadata is at most 64 KiB.
const MAX_JSON_VALUES: usize = 100_000;

/// Whether `body` holds more than `limit` arrays, objects, members and elements, counted
/// outside strings: each `[` and `{`, each member's `:`, and each `,` between an array's
/// elements (a member's `,` is not counted again). Checked before parsing, in one pass.
fn json_values_over(body: &[u8], limit: usize) -> bool {
    // Whether each open container is an object. Deeper than this the parser refuses the body
    // anyway (128 levels), so a comma there is counted whatever holds it.
    let mut objects = [false; 256];
    let mut depth = 0usize;
    let mut n = 0usize;
    let mut i = 0;
    while let Some(&b) = body.get(i) {
        i += 1;
        let counted = match b {
            // A string is skipped to its closing quote, escapes and all, by memchr: bulk text
            // (a chunk, a transcript) is one long string, and a byte-at-a-time walk over it
            // was the largest cost of an upload here.
            b'"' => loop {
                let Some(k) = body.get(i..).and_then(|r| memchr::memchr2(b'"', b'\\', r)) else {
                    // Unterminated: the parser refuses it.
                    return false;
                };
                i += k + 1;
                if body[i - 1] == b'"' {
                    break false;
                }
                // The escaped byte, whatever it is, is part of the string.
                i += 1;
            },
            b'[' | b'{' => {
                if let Some(o) = objects.get_mut(depth) {
                    *o = b == b'{';
                }
                depth += 1;
                true
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                false
            }
            b':' => true,
            b',' => !depth
                .checked_sub(1)
                .and_then(|d| objects.get(d))
                .is_some_and(|&o| o),
            _ => false,
        };
        if counted {
            n += 1;
            if n > limit {
                return true;
            }
        }
    }
    false
}

/// Room for `n` more bytes of request bodies in the process's budget, waiting up to `patience`
/// for it. Not first come, first served: a large body waiting for room must not hold up the
/// small requests behind it.
async fn body_room(
    app: &App,
    n: usize,
    patience: std::time::Duration,
) -> Result<tokio::sync::OwnedSemaphorePermit, Failure> {
    let until = tokio::time::Instant::now() + patience;
    let n = u32::try_from(n).map_err(|_| Failure::too_large("request body is over 16 MiB"))?;
    loop {
        match app.inner.body_budget.clone().try_acquire_many_owned(n) {
            Ok(p) => return Ok(p),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(Failure::internal()),
            Err(tokio::sync::TryAcquireError::NoPermits) => {}
        }
        if tokio::time::Instant::now() >= until {
            tracing::warn!(
                bytes = n,
                "request body refused: the body memory budget is taken"
            );
            return Err(Failure::new(
                ErrorCode::ServerBusy,
                "the server is receiving as many request bodies as it can hold; try again",
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Reads the body up to 16 MiB (413 past that) and parses it as a JSON object, holding room
/// for it in the process's body budget (returned: kept until the request is answered).
/// A client that announced a body and stops sending is answered after `idle` without data:
/// it would otherwise hold its connection (and our buffer) for ever.
async fn read_object(
    app: &App,
    headers: &HeaderMap,
    body: Body,
) -> Result<
    (
        Map<String, Value>,
        Option<tokio::sync::OwnedSemaphorePermit>,
    ),
    Failure,
> {
    let idle = app.inner.request_idle_timeout;
    use http_body_util::BodyExt as _;
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut too_large = declared.is_some_and(|n| n > MAX_BODY_BYTES as u64);
    let mut buf: Vec<u8> = Vec::new();
    // Room taken in the budget; the buffer never grows past it (no doubling behind its back).
    let mut room: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut seen = 0usize;
    // No room came in time: the rest is read and dropped, as for an oversized body, so that
    // a client still writing gets the answer instead of a reset.
    let mut refused: Option<Failure> = None;
    let mut body = body;
    // A byte now and then would reset the idle timer for ever: the whole body has a deadline
    // too (16 MiB in it is 28 KiB/s).
    let until = tokio::time::Instant::now() + BODY_DEADLINE;
    loop {
        let wait = idle.min(until.saturating_duration_since(tokio::time::Instant::now()));
        let frame = match tokio::time::timeout(wait, body.frame()).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            // An oversized body is answered as such, whether or not the rest came.
            Err(_) if too_large || refused.is_some() => break,
            Err(_) if tokio::time::Instant::now() >= until => {
                return Err(Failure::invalid_json(format!(
                    "the request body took over {} s",
                    BODY_DEADLINE.as_secs()
                )))
            }
            Err(_) => {
                return Err(Failure::invalid_json(format!(
                    "the request body stopped arriving ({} s without data)",
                    idle.as_secs()
                )))
            }
        };
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
            buf = Vec::new();
        }
        if too_large || refused.is_some() {
            if seen > DRAIN_LIMIT {
                break;
            }
            continue;
        }
        let need = buf.len() + data.len();
        if need > buf.capacity() {
            // Doubling, up to what was announced: room is taken as bytes arrive, so holding
            // much of the budget takes sending about half as much.
            let cap = declared
                .and_then(|d| usize::try_from(d).ok())
                .filter(|&d| d >= need)
                .unwrap_or(MAX_BODY_BYTES)
                .max(need);
            let target = need
                .next_power_of_two()
                .max(SMALL_BODY_BYTES)
                .clamp(need, cap);
            // Small bodies (settings, list, start, complete…) take no room: a budget held by
            // large ones must not stop them.
            if target > SMALL_BODY_BYTES {
                let have = room.as_ref().map_or(0, |r| r.num_permits());
                let more = match body_room(app, target.saturating_sub(have), idle).await {
                    Ok(more) => more,
                    Err(f) => {
                        refused = Some(f);
                        (buf, room) = (Vec::new(), None);
                        continue;
                    }
                };
                match room.as_mut() {
                    Some(r) => r.merge(more),
                    None => room = Some(more),
                }
            }
            buf.reserve_exact(target - buf.len());
        }
        buf.extend_from_slice(&data);
    }
    if too_large {
        return Err(Failure::too_large("request body is over 16 MiB"));
    }
    if let Some(f) = refused {
        return Err(f);
    }
    if json_values_over(&buf, MAX_JSON_VALUES) {
        return Err(Failure::invalid_json(format!(
            "the body holds over {MAX_JSON_VALUES} JSON values"
        )));
    }
    match serde_json::from_slice::<UniqueKeys>(&buf) {
        Ok(UniqueKeys(m)) => Ok((m, room)),
        Err(e) if e.is_data() => {
            let m = e.to_string();
            Err(Failure::invalid_json(match m.find("is given twice") {
                // The message without serde's " at line 1 column 40".
                Some(_) => m.split(" at line ").next().unwrap_or(&m).to_string(),
                None => String::from("the body must be a JSON object"),
            }))
        }
        // Valid JSON, but deeper than the parser goes: said as such, not as "not JSON".
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => Err(
            Failure::invalid_json("the body nests arrays and objects over 128 levels deep"),
        ),
        Err(_) => Err(Failure::invalid_json("the body is not valid JSON")),
    }
}

async fn user_route(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let mut action = None;
    let r = match read_object(&app, &headers, body).await {
        Ok((obj, _room)) => {
            action = action_of(&obj);
            user::handle(&app, &headers, obj).await
        }
        Err(f) => Err(f),
    };
    answer(&app, USER_ROUTE, action.as_deref(), r)
}

async fn agent_route(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let mut action = None;
    let r = match read_object(&app, &headers, body).await {
        Ok((obj, _room)) => {
            action = action_of(&obj).or_else(|| Some(String::from("report")));
            agent::handle(&app, obj).await
        }
        Err(f) => Err(f),
    };
    answer(&app, AGENT_ROUTE, action.as_deref(), r)
}

#[cfg(test)]
mod tests {
    use super::json_values_over;

    /// A byte-at-a-time walk with the same counting rule: the memchr skipping of strings must
    /// not change what is counted.
    fn reference(body: &[u8], limit: usize) -> bool {
        let (mut n, mut in_string, mut escaped) = (0usize, false, false);
        let mut open: Vec<u8> = Vec::new();
        for &b in body {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    open.push(b);
                    n += 1;
                }
                b']' | b'}' => {
                    open.pop();
                }
                b':' => n += 1,
                b',' if open.last() != Some(&b'{') => n += 1,
                _ => {}
            }
            if n > limit {
                return true;
            }
        }
        false
    }

    #[test]
    fn values_counted_as_the_reference_walk_counts_them() {
        let bodies: &[&[u8]] = &[
            b"",
            b"{}",
            br#"{"a": [1, 2, 3], "b": {"c": 4}}"#,
            br#"{"s": "[{,:", "t": [1,2]}"#,
            br#"{"s": "a\"[,]\\", "t": [1,2]}"#,
            br#"{"s": "\\\\\"", "x": [,,,]}"#,
            br#"{"s": "ends in a backslash\"#,
            br#"{"s": "unterminated [,,,"#,
            br#"[1,2,"\\"],[3]"#,
            b"\"\\",
            b"\"",
            b",,,,\"\\\",,,\",,,",
        ];
        for body in bodies {
            for limit in 0..12 {
                assert_eq!(
                    json_values_over(body, limit),
                    reference(body, limit),
                    "{} with limit {limit}",
                    String::from_utf8_lossy(body)
                );
            }
        }
        // A member is one value, its `,` and `:` are not two.
        let members = br#"{"a": 0, "b": [1, 2], "c": {"d": 0}}"#;
        // {, a, b, [, 2, c, {, d: eight values.
        assert!(!json_values_over(members, 8));
        assert!(json_values_over(members, 7));
        // Every byte string of up to 5 bytes over the alphabet that matters.
        let alphabet = b"\"\\[{,:}]";
        let mut body = Vec::new();
        for len in 0..=5u32 {
            for mut k in 0..alphabet.len().pow(len) {
                body.clear();
                for _ in 0..len {
                    body.push(alphabet[k % alphabet.len()]);
                    k /= alphabet.len();
                }
                for limit in 0..4 {
                    assert_eq!(json_values_over(&body, limit), reference(&body, limit));
                }
            }
        }
    }
}
