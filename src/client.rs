//! The backend client: the node-key route `/api/session-recording-agent` (`config`, `start`,
//! `upload_chunk`, `complete`), over reqwest with rustls. The node key goes only into request
//! bodies, never into a log line or an error message.

use crate::config::Secret;
use bytes::Bytes;
use http_body::Frame;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use std::io::Read as _;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
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

    /// An `upload_chunk` body for chunk text already in memory (`record --upload`); the
    /// daemon streams its spooled chunks instead ([`post_chunk_file`](Self::post_chunk_file)).
    pub fn chunk_body(&self, session_id: &str, chunk_index: u64, chunk_data: &str) -> Vec<u8> {
        upload_chunk_body(
            Vec::new(),
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

    /// `upload_chunk` of a spooled chunk file, its body streamed: the file is read and escaped
    /// a piece at a time as the connection takes it, so an upload holds a few pieces, not the
    /// chunk and its body (about a MiB each). Also says what reading the file came to: only a
    /// body read to its end ([`ChunkRead::Whole`]) can have been stored; a file that is not
    /// UTF-8 or could not be read cuts the request short, so nothing is stored.
    pub async fn post_chunk_file(
        &self,
        session_id: &str,
        chunk_index: u64,
        file: std::fs::File,
    ) -> (Result<ChunkStored, ClientError>, Option<ChunkRead>) {
        let mut head = Vec::with_capacity(256);
        upload_chunk_body_head(&mut head, self.node_key.expose(), session_id, chunk_index);
        let read = Arc::new(OnceLock::new());
        let body = ChunkBody::new(head, file, PIECE, read.clone());
        let answer = self.post(reqwest::Body::wrap(body)).await;
        // Set before the body's last frame (or its error) went out: before any answer to a
        // whole body, and before the backend could see a cut-short one. Unset when the request
        // ended before the file did (no connection, or an answer before the body's end).
        (answer, read.get().copied())
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
    upload_chunk_body_head(&mut body, node_key, session_id, chunk_index);
    push_json_string(&mut body, chunk_data);
    body.push(b'}');
    body
}

/// An `upload_chunk` body up to the value of `chunk_data`.
fn upload_chunk_body_head(body: &mut Vec<u8>, node_key: &str, session_id: &str, chunk_index: u64) {
    body.extend_from_slice(b"{\"action\":\"upload_chunk\",\"node_key\":");
    push_json_string(body, node_key);
    body.extend_from_slice(b",\"session_id\":");
    push_json_string(body, session_id);
    body.extend_from_slice(format!(",\"chunk_index\":{chunk_index},\"chunk_data\":").as_bytes());
}

/// How much of a chunk file is read and escaped at a time.
const PIECE: usize = 32 * 1024;

/// What reading a chunk file for its streamed body came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRead {
    /// Read to its end: this many bytes of text, all sent.
    Whole(usize),
    /// Not UTF-8 (a damaged disk): the request was cut short.
    NotUtf8,
    /// The read failed: the request was cut short.
    Failed(std::io::ErrorKind),
}

/// The streamed `upload_chunk` body of a chunk file: the head given, then `"`, the file's text
/// escaped as [`push_json_string`] would escape the whole of it, and `"}`. A character cut
/// between two reads is carried over to the next. The file is read on the runtime's thread, as
/// the uploader's other spool work is: a chunk is read back soon after it was written, from
/// the page cache, and through tokio's blocking pool each piece cost a round trip to it, which
/// made the upload's CPU per MiB 1.7 times as much (bench/README.md, "Upload bodies streamed").
struct ChunkBody {
    head: Option<Bytes>,
    file: std::fs::File,
    buf: Vec<u8>,
    /// Bytes of a character cut by the last read, at the start of `buf`.
    held: usize,
    total: usize,
    /// One piece's escape, quotes included; what goes out is copied from it at its own size.
    escaped: Vec<u8>,
    read: Arc<OnceLock<ChunkRead>>,
}

impl ChunkBody {
    fn new(
        mut head: Vec<u8>,
        file: std::fs::File,
        piece: usize,
        read: Arc<OnceLock<ChunkRead>>,
    ) -> Self {
        head.push(b'"');
        ChunkBody {
            head: Some(Bytes::from(head)),
            file,
            // Room for a cut character (at most 3 bytes held) and at least one more byte.
            buf: vec![0; piece.max(4)],
            held: 0,
            total: 0,
            escaped: Vec::new(),
            read,
        }
    }

    fn end(&mut self, how: ChunkRead) -> Option<Result<Frame<Bytes>, std::io::Error>> {
        let _ = self.read.set(how);
        match how {
            ChunkRead::Whole(_) => Some(Ok(Frame::data(Bytes::from_static(b"\"}")))),
            ChunkRead::NotUtf8 => Some(Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "chunk file is not UTF-8",
            ))),
            ChunkRead::Failed(kind) => Some(Err(std::io::Error::new(
                kind,
                "reading the chunk file failed",
            ))),
        }
    }
}

impl http_body::Body for ChunkBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(head) = this.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        if this.read.get().is_some() {
            return Poll::Ready(None);
        }
        loop {
            let n = match this.file.read(&mut this.buf[this.held..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Poll::Ready(this.end(ChunkRead::Failed(e.kind()))),
            };
            if n == 0 {
                let how = if this.held > 0 {
                    ChunkRead::NotUtf8
                } else {
                    ChunkRead::Whole(this.total)
                };
                return Poll::Ready(this.end(how));
            }
            let filled = this.held + n;
            let text = match simdutf8::compat::from_utf8(&this.buf[..filled]) {
                Ok(text) => text,
                // Only a character cut by the read's end waits for the next read.
                Err(e) if e.error_len().is_none() => {
                    match simdutf8::basic::from_utf8(&this.buf[..e.valid_up_to()]) {
                        Ok(text) => text,
                        Err(_) => return Poll::Ready(this.end(ChunkRead::NotUtf8)),
                    }
                }
                Err(_) => return Poll::Ready(this.end(ChunkRead::NotUtf8)),
            };
            let used = text.len();
            this.escaped.clear();
            push_json_string(&mut this.escaped, text);
            this.total += used;
            this.buf.copy_within(used..filled, 0);
            this.held = filled - used;
            if used > 0 {
                let quoted = &this.escaped[1..this.escaped.len() - 1];
                return Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(quoted)))));
            }
        }
    }
}

#[cfg(test)]
mod body_tests {
    #![allow(clippy::unwrap_used)]
    use super::{ChunkBody, ChunkRead};
    use http_body::Body as _;
    use std::io::Write;
    use std::pin::Pin;
    use std::sync::{Arc, OnceLock};

    /// Streams `data` from a file through [`ChunkBody`] read `piece` bytes at a time; what went
    /// out, whether the stream ended in an error, and what the read came to.
    async fn stream(data: &[u8], piece: usize) -> (Vec<u8>, bool, Option<ChunkRead>) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(data).unwrap();
        let file = std::fs::File::open(f.path()).unwrap();
        let mut head = Vec::new();
        super::upload_chunk_body_head(&mut head, "k", "s-1", 3);
        let read = Arc::new(OnceLock::new());
        let mut body = ChunkBody::new(head, file, piece, read.clone());
        let mut out = Vec::new();
        let failed = loop {
            match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                None => break false,
                Some(Ok(frame)) => out.extend_from_slice(&frame.into_data().unwrap()),
                Some(Err(_)) => break true,
            }
        };
        (out, failed, read.get().copied())
    }

    #[tokio::test]
    async fn a_chunk_file_streams_as_the_body_of_its_whole_text() {
        // Lines with one- to four-byte characters and every kind of escape, long enough to
        // span pieces of every size tried, so that characters are cut at every offset.
        let line = "[0.5, \"o\", \"a\\u001b[1m\\\"q\\\" é 漢 🙂\"]\n\u{7f}\t\u{0}\r";
        let text = line.repeat(2 * super::PIECE / line.len() + 3);
        let want = super::upload_chunk_body(Vec::new(), "k", "s-1", 3, &text);
        for piece in [4, 5, 9, 13, 4096, super::PIECE] {
            let (got, failed, read) = stream(text.as_bytes(), piece).await;
            assert!(!failed, "piece {piece}");
            assert_eq!(read, Some(ChunkRead::Whole(text.len())), "piece {piece}");
            assert!(got == want, "piece {piece}: bodies differ");
        }
        let (got, failed, read) = stream(b"", 9).await;
        assert!(!failed);
        assert_eq!(read, Some(ChunkRead::Whole(0)));
        assert_eq!(got, super::upload_chunk_body(Vec::new(), "k", "s-1", 3, ""));
    }

    #[tokio::test]
    async fn a_chunk_file_that_is_not_utf8_cuts_its_body_short() {
        for bad in [
            &b"ok \xff ok"[..],
            b"cut at the end \xe6\xbc",
            b"\xc3",
            b"\xed\xa0\x80",
        ] {
            for piece in [4, 5, 64] {
                let (got, failed, read) = stream(bad, piece).await;
                assert!(failed, "{bad:?}, piece {piece}");
                assert_eq!(read, Some(ChunkRead::NotUtf8), "{bad:?}");
                // Never the closing quote: the backend cannot take it for a whole body.
                assert!(!got.ends_with(b"\"}"), "{bad:?}");
            }
        }
    }

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
