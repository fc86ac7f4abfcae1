//! The frames `shell` (and `status`) and `daemon` exchange over the Unix socket.
//!
//! Every frame is a 6-byte head followed by its payload:
//!
//! ```text
//! +---------+------+----------------------+-------------------+
//! | version | kind | length (u32, big-end) | payload (length)  |
//! |   u8    |  u8  |                      |                   |
//! +---------+------+----------------------+-------------------+
//! ```
//!
//! - `version` is [`VERSION`]; a peer that reads another version answers with an `Error`
//!   frame (when it can) and closes the connection, so an old `shell` and a new `daemon` fail
//!   loudly rather than misread each other.
//! - `length` is at most [`MAX_FRAME_BYTES`]; a larger length closes the connection before
//!   anything is allocated.
//! - Payloads are JSON objects, except `Events`, whose payload is asciicast v2 event lines
//!   (UTF-8, each ending in `\n`, whole lines only: a line never spans two frames).
//!
//! A recorded session, `shell` → `daemon` unless marked ←:
//!
//! ```text
//! Start {header, metadata, session_type}
//!                     ← Decision {mode: record|unrecorded|refused, reason}
//! Events "…\n…\n"     (any number)
//! End {exit_status, metadata}
//!                     ← Ack {spooled: true}        (the session's end is durable)
//! ```
//!
//! The daemon may send `Error {message, code}` at any time after `Decision`; `shell` then
//! follows its enforce policy. After `spool_full` the daemon reads on to the `End` (for the exit
//! status) and spools the `Events` that were already on their way, up to a bound: they may be
//! on the user's screen. After `stopping` it spools what comes until `shell` closes its side.
//! A `status` client sends `StatusRequest {}` and reads one `StatusReply`.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{Read, Write};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// The largest payload of one frame.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Bytes before the payload.
pub const HEAD_BYTES: usize = 6;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Start = 1,
    Decision = 2,
    Events = 3,
    End = 4,
    Ack = 5,
    StatusRequest = 6,
    StatusReply = 7,
    Error = 8,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Start,
            2 => Kind::Decision,
            3 => Kind::Events,
            4 => Kind::End,
            5 => Kind::Ack,
            6 => Kind::StatusRequest,
            7 => Kind::StatusReply,
            8 => Kind::Error,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    // Transparent: with "i/o: {0}" and a source, `{:#}` said the error twice.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("peer speaks protocol version {0}, this build speaks {VERSION}")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame of {0} bytes is over the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("bad {kind:?} payload: {reason}")]
    Payload { kind: Kind, reason: String },
}

/// One frame read off the socket.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn json<T: Serialize>(kind: Kind, value: &T) -> Result<Frame, FrameError> {
        let payload = serde_json::to_vec(value).map_err(|e| FrameError::Payload {
            kind,
            reason: e.to_string(),
        })?;
        Ok(Frame { kind, payload })
    }

    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        serde_json::from_slice(&self.payload).map_err(|e| FrameError::Payload {
            kind: self.kind,
            reason: e.to_string(),
        })
    }
}

/// The head of a frame whose payload is `len` bytes (for writers that build frames in place).
pub fn head(kind: Kind, len: usize) -> Result<[u8; HEAD_BYTES], FrameError> {
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let l = (len as u32).to_be_bytes();
    Ok([VERSION, kind as u8, l[0], l[1], l[2], l[3]])
}

fn check_head(h: &[u8; HEAD_BYTES]) -> Result<(Kind, usize), FrameError> {
    if h[0] != VERSION {
        return Err(FrameError::Version(h[0]));
    }
    let kind = Kind::from_u8(h[1]).ok_or(FrameError::UnknownKind(h[1]))?;
    let len = u32::from_be_bytes([h[2], h[3], h[4], h[5]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok((kind, len))
}

/// Writes one frame (blocking).
pub fn write_frame<W: Write>(w: &mut W, kind: Kind, payload: &[u8]) -> Result<(), FrameError> {
    w.write_all(&head(kind, payload.len())?)?;
    w.write_all(payload)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame (blocking).
pub fn read_frame<R: Read>(r: &mut R) -> Result<Frame, FrameError> {
    let mut h = [0u8; HEAD_BYTES];
    match r.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let (kind, len) = check_head(&h)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Frame { kind, payload })
}

/// Waits until `s` has input (or is closed), then reads one frame. For a thread that only
/// listens on a socket another thread writes: a reader blocked in `read` shares the socket's
/// one wait queue with the writer's side, so it was woken each time the daemon drained a
/// frame (thousands of useless wake-ups in a session of bulk output), while
/// `poll` for input is woken by input only.
pub fn read_frame_when_readable(
    s: &mut std::os::unix::net::UnixStream,
) -> Result<Frame, FrameError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd as _;
    loop {
        let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
    }
    read_frame(s)
}

/// Writes one frame (async).
pub async fn write_frame_async<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: Kind,
    payload: &[u8],
) -> Result<(), FrameError> {
    w.write_all(&head(kind, payload.len())?).await?;
    w.write_all(payload).await?;
    w.flush().await?;
    Ok(())
}

/// How long the rest of a frame may take once its head has arrived: a client writes a frame
/// whole, so one that stalls half-way is stuck or hostile, and its buffer is let go.
pub const FRAME_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads one frame (async, on a runtime with a clock). Cancel-safe only between frames:
/// callers must not drop the future mid-frame and reuse the stream. The payload's memory
/// follows what arrived, not what the head announced.
pub async fn read_frame_async<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, FrameError> {
    let (kind, len) = read_head_async(r).await?;
    read_body_async(r, kind, len).await
}

/// Reads a frame's head (async): its kind and the length of its payload.
pub async fn read_head_async<R: AsyncRead + Unpin>(r: &mut R) -> Result<(Kind, usize), FrameError> {
    let mut h = [0u8; HEAD_BYTES];
    match r.read_exact(&mut h).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    check_head(&h)
}

/// Reads the payload of a frame whose head said `kind` and `len` (async; see
/// [`read_frame_async`]).
pub async fn read_body_async<R: AsyncRead + Unpin>(
    r: &mut R,
    kind: Kind,
    len: usize,
) -> Result<Frame, FrameError> {
    let mut payload = Vec::with_capacity(len.min(64 * 1024));
    let mut body = (&mut *r).take(len as u64);
    match tokio::time::timeout(FRAME_BODY_TIMEOUT, body.read_to_end(&mut payload)).await {
        Ok(Ok(n)) if n == len => Ok(Frame { kind, payload }),
        Ok(Ok(_)) => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "frame not completed in time",
        )
        .into()),
    }
}

/// The most killed holders of a session's terminal (`terminal_holders_killed`) its metadata
/// lists: a user could start thousands, and the backend keeps 64 KiB of metadata.
pub const MAX_LISTED_HOLDERS: usize = 64;

/// `Start`: the asciicast header and the session's metadata (contract: "Agent: session
/// metadata"). `uid` and `user` are overwritten by the daemon from the socket's peer
/// credentials.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StartMsg {
    pub session_type: String,
    pub header: ztna_common::Header,
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// What the daemon decided for a new session.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Send events: they are spooled and uploaded.
    Record,
    /// The org switched recording off: run the session, record nothing.
    Unrecorded,
    /// The session cannot be recorded (spool full…): follow the enforce policy.
    Refused,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DecisionMsg {
    pub mode: Mode,
    #[serde(default)]
    pub reason: String,
    /// The daemon's local id of the session (its spool folder), when recording.
    #[serde(default)]
    pub session: Option<String>,
    /// `Refused` for a limit of the user's own (their connections, their spool share): the
    /// session is refused whatever `enforce` says, or a user could go unrecorded at will by
    /// filling them (straight through the socket).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub own_limit: bool,
}

/// `End`: how the session ended; `metadata` is merged into the recording's metadata.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct EndMsg {
    pub exit_status: Option<i32>,
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AckMsg {
    pub spooled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorMsg {
    pub message: String,
    /// What happened, for the shell to act on: [`ERROR_STOPPING`], [`ERROR_SPOOL_FULL`] or
    /// [`ERROR_PROTOCOL`].
    #[serde(default)]
    pub code: String,
}

/// The daemon is stopping (SIGTERM): sessions keep running, unrecorded from here on.
pub const ERROR_STOPPING: &str = "stopping";
/// The spool is full: the session follows the enforce policy.
pub const ERROR_SPOOL_FULL: &str = "spool_full";
/// The peer broke the protocol.
pub const ERROR_PROTOCOL: &str = "protocol";

/// The daemon's state, as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct StatusReply {
    pub version: String,
    pub pid: u32,
    pub server_url: Option<String>,
    pub spool_dir: String,
    pub sessions_live: Vec<LiveSession>,
    /// Closed chunks waiting for the backend's acknowledgement.
    pub chunks_waiting: u64,
    /// Sessions in the spool (live or waiting for upload/complete).
    pub sessions_spooled: u64,
    pub bytes_spooled: u64,
    /// What the sessions' folders count against `spool_max_bytes` besides their bytes (a new
    /// session is admitted only while both fit).
    #[serde(default)]
    pub session_folders_bytes: u64,
    pub spool_max_bytes: u64,
    /// Sessions set aside because the backend refused them for good.
    pub sessions_failed: u64,
    pub recording_enabled: Option<bool>,
    pub last_upload_error: Option<String>,
    pub last_upload_error_at: Option<String>,
    /// A chunk or a session's `complete` went through since that error.
    #[serde(default)]
    pub last_upload_error_resolved: bool,
    /// When the backend last acknowledged a chunk or a `complete`, RFC 3339.
    #[serde(default)]
    pub last_upload_at: Option<String>,
    /// When the backend last answered (any answer), RFC 3339.
    pub backend_last_answer_at: Option<String>,
    pub chunks_uploaded: u64,
    pub sessions_completed: u64,
    /// Uploads are waiting for the live sessions' bulk output to calm (`upload_defer_secs`).
    #[serde(default)]
    pub uploads_deferred: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LiveSession {
    pub session: String,
    pub user: String,
    pub uid: u32,
    pub pid: Option<i32>,
    pub kind: String,
    pub started_at: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn roundtrip_and_limits() {
        let mut buf = Vec::new();
        write_frame(&mut buf, Kind::Events, b"[0.1, \"o\", \"x\"]\n").unwrap();
        let f = Frame::json(
            Kind::End,
            &EndMsg {
                exit_status: Some(3),
                metadata: Default::default(),
            },
        )
        .unwrap();
        write_frame(&mut buf, f.kind, &f.payload).unwrap();
        let mut r = &buf[..];
        let a = read_frame(&mut r).unwrap();
        assert_eq!(a.kind, Kind::Events);
        let b = read_frame(&mut r).unwrap();
        assert_eq!(b.parse::<EndMsg>().unwrap().exit_status, Some(3));
        assert!(matches!(read_frame(&mut r), Err(FrameError::Closed)));

        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert!(matches!(
            write_frame(&mut Vec::new(), Kind::Events, &big),
            Err(FrameError::TooLarge(_))
        ));
        let mut bad = vec![VERSION, 3];
        bad.extend_from_slice(&(u32::MAX).to_be_bytes());
        assert!(matches!(
            read_frame(&mut &bad[..]),
            Err(FrameError::TooLarge(_))
        ));
        let other = [9u8, 3, 0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut &other[..]),
            Err(FrameError::Version(9))
        ));
        let kind = [VERSION, 99, 0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut &kind[..]),
            Err(FrameError::UnknownKind(99))
        ));
    }
}
