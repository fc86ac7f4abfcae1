//! The backend client: the node-key route `/api/session-recording-agent` (`config`, `start`,
//! `upload_chunk`, `complete`), over reqwest with rustls. The node key goes only into request
//! bodies, never into a log line or an error message.

use crate::config::Secret;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use std::time::Duration;
use ztna_common::api::{
    AgentConfig, ApiError, ChunkStored, Completed, Envelope, ErrorCode, Started, AGENT_ROUTE,
    MAX_METADATA_BYTES,
};
use ztna_common::asciicast::{self, push_json_string};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection, or it broke: refused, no route, reset.
    #[error("backend unreachable: {0}")]
    Transport(String),
    /// Connected (or trying to), but no answer within the client's time limit: a backend
    /// that is overloaded or stuck, not one that is gone.
    #[error("backend did not answer in time: {0}")]
    Timeout(String),
    /// The backend answered with an error envelope (or a bare HTTP error).
    #[error("backend answered {status} {}: {message}", code.map(|c| c.as_str()).unwrap_or_default())]
    Api {
        status: u16,
        code: Option<ErrorCode>,
        message: String,
    },
    /// The backend answered something that is not the contract's envelope.
    #[error("unexpected answer from the backend ({status}): {reason}")]
    Decode { status: u16, reason: String },
}

impl ClientError {
    /// Whether retrying the same request later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport(_) | ClientError::Timeout(_) => true,
            ClientError::Decode { .. } => true,
            ClientError::Api { status, code, .. } => {
                *status >= 500
                    || *status == 408
                    || *status == 429
                    || code.is_some_and(ErrorCode::is_retryable)
            }
        }
    }

    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { code, .. } => *code,
            _ => None,
        }
    }

    /// Whether the backend itself answered: its envelope, with one of the contract's codes.
    /// A bare HTTP error or a page that is not the envelope comes from something in front of
    /// it (a proxy's 502 while the backend is down), and says nothing of the backend.
    pub fn backend_answered(&self) -> bool {
        matches!(self, ClientError::Api { code: Some(_), .. })
    }
}

/// A request that got no answer. The URL is left out: it is known, and one with a key in it
/// must not reach a log line.
fn no_answer(e: reqwest::Error) -> ClientError {
    // A connection that could not be made in time is a backend out of reach, like a refusal.
    let timeout = e.is_timeout() && !e.is_connect();
    let why = e.without_url().to_string();
    if timeout {
        ClientError::Timeout(why)
    } else {
        ClientError::Transport(why)
    }
}

/// A client of the node-key route.
#[derive(Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    url: String,
    node_key: Secret,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("url", &self.url)
            .field("node_key", &self.node_key)
            .finish()
    }
}

impl AgentClient {
    pub fn new(server_url: &str, node_key: Secret) -> anyhow::Result<Self> {
        Self::with_timeout(server_url, node_key, Duration::from_secs(60))
    }

    /// As [`new`](Self::new), waiting at most `timeout` for each answer.
    pub fn with_timeout(
        server_url: &str,
        node_key: Secret,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let url = format!("{}{}", server_url.trim_end_matches('/'), AGENT_ROUTE);
        // Checked here, where the client is made (the daemon's start, `record --upload`,
        // `config check`): a URL no request can be made of (a space, an unclosed `[`) is a
        // configuration error, not a backend that never answers.
        if let Err(e) = reqwest::Url::parse(&url) {
            anyhow::bail!("server_url {server_url:?} is not a usable URL: {e}");
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .timeout(timeout)
            .user_agent(concat!("ztna-recorder/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(AgentClient {
            http,
            url,
            node_key,
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        action: &str,
        mut body: Map<String, Value>,
    ) -> Result<T, ClientError> {
        body.insert("action".into(), Value::String(action.into()));
        body.insert(
            "node_key".into(),
            Value::String(self.node_key.expose().to_string()),
        );
        let bytes = serde_json::to_vec(&body).map_err(|e| ClientError::Decode {
            status: 0,
            reason: e.to_string(),
        })?;
        self.post(bytes).await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        body: impl Into<reqwest::Body>,
    ) -> Result<T, ClientError> {
        let resp = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(no_answer)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(no_answer)?;
        let env: Envelope<Value> = match serde_json::from_slice(&bytes) {
            Ok(e) => e,
            Err(e) if status >= 400 => {
                return Err(ClientError::Api {
                    status,
                    code: None,
                    message: format!("non-envelope body ({e})"),
                })
            }
            Err(e) => {
                return Err(ClientError::Decode {
                    status,
                    reason: e.to_string(),
                })
            }
        };
        if !env.success || status >= 400 {
            let (code, message) = match env.error {
                Some(ApiError { code, message }) => (Some(code), message),
                None => (None, String::from("error without details")),
            };
            return Err(ClientError::Api {
                status,
                code,
                message,
            });
        }
        let data = env.data.unwrap_or(Value::Null);
        serde_json::from_value(data).map_err(|e| ClientError::Decode {
            status,
            reason: e.to_string(),
        })
    }

    pub async fn config(&self) -> Result<AgentConfig, ClientError> {
        self.call("config", Map::new()).await
    }

    /// `start`. `started_at` (RFC 3339) is when the session really started, for one that
    /// waited in the spool (the bundled backend takes it within 30 days; others ignore it).
    /// `agent_session_id`, the spool's own id for the session, makes a start sent again (its
    /// answer lost) answer the recording the first one made, on the bundled backend.
    pub async fn start(
        &self,
        session_type: &str,
        header: &Value,
        metadata: &Value,
        started_at: Option<&str>,
        agent_session_id: Option<&str>,
    ) -> Result<Started, ClientError> {
        // What the user chose (a long `ssh host '…'` command, a `TERM`) is cut to what the
        // backend takes, rather than the session refused for it.
        let (mut header, mut metadata) = (header.clone(), metadata.clone());
        asciicast::clip_to_fit(&mut header, asciicast::MAX_HEADER_BYTES);
        asciicast::clip_to_fit(&mut metadata, MAX_METADATA_BYTES);
        let mut body =
            json!({"session_type": session_type, "header": header, "metadata": metadata});
        if let Some(m) = body.as_object_mut() {
            if let Some(t) = started_at {
                m.insert("started_at".into(), json!(t));
            }
            if let Some(id) = agent_session_id {
                m.insert("agent_session_id".into(), json!(id));
            }
        }
        self.call("start", obj(body)).await
    }

    /// `upload_chunk`, in two halves so the uploader can build the next chunk's body (a
    /// blocking read and an escape of up to 8 MiB) while this one is on the wire.
    pub fn chunk_body(&self, session_id: &str, chunk_index: u64, chunk_data: &str) -> Vec<u8> {
        self.chunk_body_into(Vec::new(), session_id, chunk_index, chunk_data)
    }

    /// [`chunk_body`](Self::chunk_body) written into `buf` (cleared first), to reuse its memory.
    pub fn chunk_body_into(
        &self,
        buf: Vec<u8>,
        session_id: &str,
        chunk_index: u64,
        chunk_data: &str,
    ) -> Vec<u8> {
        upload_chunk_body(
            buf,
            self.node_key.expose(),
            session_id,
            chunk_index,
            chunk_data,
        )
    }

    pub async fn post_chunk(
        &self,
        body: impl Into<reqwest::Body>,
    ) -> Result<ChunkStored, ClientError> {
        self.post(body).await
    }

    /// `complete`. `ended_at` (RFC 3339) is when the session really ended (see `start`).
    pub async fn complete(
        &self,
        session_id: &str,
        duration_seconds: Option<i64>,
        transcript_lines: Option<u64>,
        metadata: &Value,
        ended_at: Option<&str>,
    ) -> Result<Completed, ClientError> {
        let mut metadata = metadata.clone();
        asciicast::clip_to_fit(&mut metadata, MAX_METADATA_BYTES);
        let mut body = json!({"session_id": session_id, "metadata": metadata});
        if let Some(m) = body.as_object_mut() {
            if let Some(d) = duration_seconds {
                m.insert("duration_seconds".into(), json!(d));
            }
            if let Some(n) = transcript_lines {
                m.insert("transcript_lines".into(), json!(n));
            }
            if let Some(t) = ended_at {
                m.insert("ended_at".into(), json!(t));
            }
        }
        self.call("complete", obj(body)).await
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// The `upload_chunk` request body, written into `body` (cleared first, its capacity reused).
/// Written by hand around the chunk: it is nearly all of the body (up to 8 MiB), and common's
/// SIMD escaper takes 16 or 32 bytes a step where serde_json looks at every byte; this was
/// the daemon's main cost per uploaded MiB.
fn upload_chunk_body(
    mut body: Vec<u8>,
    node_key: &str,
    session_id: &str,
    chunk_index: u64,
    chunk_data: &str,
) -> Vec<u8> {
    body.clear();
    body.extend_from_slice(b"{\"action\":\"upload_chunk\",\"node_key\":");
    push_json_string(&mut body, node_key);
    body.extend_from_slice(b",\"session_id\":");
    push_json_string(&mut body, session_id);
    body.extend_from_slice(format!(",\"chunk_index\":{chunk_index},\"chunk_data\":").as_bytes());
    push_json_string(&mut body, chunk_data);
    body.push(b'}');
    body
}

#[cfg(test)]
mod body_tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn upload_chunk_body_is_the_json_serde_would_write() {
        let data = "[0.5, \"o\", \"a\\u001b[1m\\\"q\\\" \\\\ \\r\\n é 漢 🙂\"]\n\u{7f}\t\u{0}";
        let body = super::upload_chunk_body(b"left over".to_vec(), "k\"ey", "s-1", 7, data);
        let got: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            got,
            serde_json::json!({
                "action": "upload_chunk",
                "node_key": "k\"ey",
                "session_id": "s-1",
                "chunk_index": 7,
                "chunk_data": data,
            })
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_backends_envelope_is_an_answer_from_it() {
        let api = |status, code| ClientError::Api {
            status,
            code,
            message: String::new(),
        };
        assert!(api(403, Some(ErrorCode::RecordingDisabled)).backend_answered());
        assert!(api(503, Some(ErrorCode::ServerBusy)).backend_answered());
        for e in [
            api(502, None),
            ClientError::Decode {
                status: 200,
                reason: "HTML".into(),
            },
            ClientError::Transport("connection refused".into()),
            ClientError::Timeout("operation timed out".into()),
        ] {
            assert!(!e.backend_answered(), "{e}");
        }
    }

    /// A backend that takes the connection and never answers is told apart from one that is
    /// not there (both were "unreachable"); both are retried.
    #[tokio::test]
    async fn no_answer_in_time_is_not_unreachable() {
        let key = Secret::new("k".repeat(32));
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", silent.local_addr().unwrap());
        let client =
            AgentClient::with_timeout(&url, key.clone(), Duration::from_millis(300)).unwrap();
        let e = client.config().await.unwrap_err();
        assert!(matches!(e, ClientError::Timeout(_)), "{e:?}");
        assert!(e.to_string().contains("did not answer in time"), "{e}");
        assert!(e.is_retryable());

        // A port nobody listens on.
        drop(silent);
        let client = AgentClient::with_timeout(&url, key, Duration::from_millis(300)).unwrap();
        let e = client.config().await.unwrap_err();
        assert!(matches!(e, ClientError::Transport(_)), "{e:?}");
        assert!(e.is_retryable());
    }
}
