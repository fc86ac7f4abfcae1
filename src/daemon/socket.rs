//! The Unix socket `shell` and `status` connect to. Who connected comes from the kernel
//! (`SO_PEERCRED`, via tokio's `peer_cred`), never from what the client says: the `uid` and
//! `user` of a session's metadata are the peer's, whatever the client sends (see [`OWNED_KEYS`]).

use super::loggate::client_warn;
use super::spool::{ChunkWriter, ClosingChunk, EndMark, Limit};
use super::{lock, now_rfc3339, Shared};
use crate::config::late_room;
use crate::ipc::{
    self, AckMsg, DecisionMsg, EndMsg, ErrorMsg, Frame, FrameError, Kind, LiveSession, Mode,
    StartMsg,
};
use anyhow::Context;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::unix::UCred;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Why `path` cannot be taken for the socket: something other than a socket is there (a
/// typo in `socket` naming the node key, say, which replacing it would delete).
pub fn not_a_socket(path: &Path) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let m = std::fs::symlink_metadata(path).ok()?;
    (!m.file_type().is_socket()).then(|| {
        format!(
            "socket {} exists and is not a socket: it is left alone (check `socket`)",
            path.display()
        )
    })
}

/// What is unsafe about the socket's folder, if anything: another user who may write in it can
/// put a socket of their own in the daemon's place, and take (and drop) the sessions sent to
/// it. A sticky folder such as /tmp is safe: there only the socket's owner may rename or
/// remove it. Warned about, not refused: the socket's mode is set without following its path
/// (see [`open_to_everyone`]), so the folder cannot be used to open other files.
fn folder_risk(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(dir).ok()?;
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != 0 && m.uid() != me {
        return Some(format!(
            "the socket's folder {} belongs to uid {}: that user could replace the daemon's socket with their own (make it root's)",
            dir.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 && m.mode() & 0o1000 == 0 {
        return Some(format!(
            "the socket's folder {} is writable by other users and not sticky (mode {:o}): they could replace the daemon's socket with their own (chmod go-w, or +t)",
            dir.display(),
            m.mode() & 0o7777
        ));
    }
    None
}

/// Gives the socket just bound mode 0666 through a descriptor of the file itself. By its path,
/// the chmod (as root) would follow a symlink another user swapped in meanwhile and open the
/// file it names to everyone.
fn open_to_everyone(path: &Path) -> anyhow::Result<()> {
    use rustix::fs::{FileType, Mode, OFlags};
    use std::os::fd::AsRawFd as _;
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("opening {}", path.display()))?;
    let st = rustix::fs::fstat(&fd).with_context(|| format!("reading {}", path.display()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
        anyhow::bail!(
            "{} was replaced as it was bound: not a socket any more",
            path.display()
        );
    }
    // An O_PATH descriptor takes no fchmod; its /proc link reaches the very file it holds.
    std::fs::set_permissions(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        std::fs::Permissions::from_mode(0o666),
    )
    .with_context(|| format!("setting the mode of {}", path.display()))
}

/// Binds the socket with mode 0666 (any local user may record; who they are comes from the
/// kernel). A stale socket file is replaced; a live daemon on it is an error, and so is
/// anything else in its place.
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating the socket's folder {}", parent.display()))?;
        if let Some(why) = folder_risk(parent) {
            tracing::warn!("{why}");
        }
    }
    if let Some(why) = not_a_socket(path) {
        anyhow::bail!(why);
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another daemon is listening on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    open_to_everyone(path)?;
    Ok(l)
}

pub async fn accept_loop(shared: Arc<Shared>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    let cred = match stream.peer_cred() {
                        Ok(c) => c,
                        Err(e) => return tracing::warn!("connection: SO_PEERCRED: {e}"),
                    };
                    let uid = cred.uid();
                    if let Err(e) = handle(shared.clone(), stream, cred).await {
                        client_warn!(shared.log_gate, uid, uid, "connection: {e:#}");
                    }
                });
            }
            Err(e) => {
                tracing::error!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn send_json<T: serde::Serialize>(
    w: &mut tokio::net::unix::OwnedWriteHalf,
    kind: Kind,
    v: &T,
) -> Result<(), FrameError> {
    let f = Frame::json(kind, v)?;
    ipc::write_frame_async(w, f.kind, &f.payload).await
}

/// A cached "recording is off" older than this is asked again when a session starts.
const RECHECK_OFF: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a session's start waits for that answer before it goes with the cached one (a
/// backend that does not answer delays a login by this much, at most once per
/// [`RECHECK_OFF`]).
const RECHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether the org has switched recording off. Switching off takes effect at once anyway (the
/// backend refuses `start`), but switching back on must reach the next session, not only those
/// after the next periodic refresh: while the cached answer is "off", a session's start asks
/// again (at most once per [`RECHECK_OFF`]).
async fn recording_off(shared: &Shared) -> bool {
    let cached = *lock(&shared.recording_enabled);
    match cached {
        Some((false, at)) if at.elapsed() >= RECHECK_OFF => {
            let answer = tokio::time::timeout(RECHECK_TIMEOUT, shared.client.config()).await;
            let enabled = match answer {
                Ok(Ok(c)) => {
                    shared.backend_answered();
                    c.recording_enabled
                }
                // No answer: still off, and not asked again for a while.
                _ => false,
            };
            *lock(&shared.recording_enabled) = Some((enabled, std::time::Instant::now()));
            !enabled
        }
        Some((enabled, _)) => !enabled,
        None => false,
    }
}

/// The most JSON values a `Start`'s (or an `End`'s) metadata may hold. `shell` sends a dozen;
/// each costs the daemon memory while the session starts, and the backend space in every
/// `list` page.
const MAX_CLIENT_VALUES: usize = 1024;

/// What an `End`'s metadata may take as JSON (`shell` sends byte counts, an exit signal, an
/// error message), and what a `Start`'s may: the backend keeps 64 KiB of metadata in all,
/// which must also hold what the daemon adds (who, where, its notes; about 1 KiB).
const END_METADATA_BYTES: usize = 6 * 1024;
const START_METADATA_BYTES: usize =
    ztna_common::api::MAX_METADATA_BYTES - END_METADATA_BYTES - 2 * 1024;

/// Fits a client's metadata in `max` bytes as JSON by cutting its longest strings (as `shell`
/// cuts a long command); what cannot be cut so, or holds what the backend refuses, is an
/// error.
fn fit_client_metadata(m: &mut serde_json::Map<String, Value>, max: usize) -> Result<(), String> {
    use ztna_common::{api, asciicast};
    if m.iter().any(|(k, v)| k.contains('\0') || api::has_nul(v)) {
        return Err("its metadata contains U+0000".into());
    }
    let values = 1 + m.values().map(api::count_values).sum::<usize>();
    if values > MAX_CLIENT_VALUES {
        return Err(format!(
            "its metadata holds {values} JSON values (at most {MAX_CLIENT_VALUES})"
        ));
    }
    if asciicast::json_len(m) > max {
        let mut v = Value::Object(std::mem::take(m));
        asciicast::clip_to_fit(&mut v, max);
        if let Value::Object(clipped) = v {
            *m = clipped;
        }
        if asciicast::json_len(m) > max {
            return Err(format!(
                "its metadata takes over {} KiB as JSON",
                max / 1024
            ));
        }
    }
    Ok(())
}

/// Whether the backend will take a session that starts so. A `Start` that `shell` would never
/// send is refused here: accepted, the backend would refuse the session for good, and it
/// would be set aside in `failed/`, so a user sending such Starts straight to the socket could
/// fill the disk with sessions no one reads. Long strings in the metadata are cut to fit.
fn check_start(start: &mut StartMsg, header: &Value) -> Result<(), String> {
    use ztna_common::{api, asciicast};
    api::check_session_type(&start.session_type).map_err(|why| format!("session_type {why}"))?;
    asciicast::check_header(header).map_err(|why| format!("the header {why}"))?;
    if api::has_nul(header) {
        return Err("its header contains U+0000".into());
    }
    fit_client_metadata(&mut start.metadata, START_METADATA_BYTES)
}

/// Metadata the daemon sets itself, from what it knows (the peer's credentials, this machine,
/// how the session ended): a client's values for them are dropped, at the start and at the
/// end (an `End` frame's metadata is merged into the recording's).
const OWNED_KEYS: &[&str] = &[
    "uid",
    "user",
    "hostname",
    "exit_status",
    "interrupted",
    "truncated",
    "truncated_reason",
    "agent_session",
];

fn drop_owned(m: &mut serde_json::Map<String, Value>) {
    for k in OWNED_KEYS {
        m.remove(*k);
    }
}

/// Metadata that is checked or completed when a session starts (a `continues` must name a
/// session of this user that was let go; the terminal's holders are added to), or that the
/// daemon notes while it uploads: an `End` cannot set them afterwards, past those checks.
const START_OR_DAEMON_KEYS: &[&str] = &[
    "continues",
    "gap_dropped_bytes",
    "terminal_held_by_pid",
    "terminal_holders_killed",
    "damaged_lines",
    "chunks_set_aside",
];

/// Processes of `uid` other than the session's `shell` (`peer`) and its ancestors that have
/// the terminal `shell` got from sshd open: killed, and returned. `shell` does the same before
/// it connects, but cannot see a process that made itself undumpable; root can. Only the
/// user's own: anyone else's (root's) is not ours to end, and a client could name any of its
/// terminals. Nothing when `shell` has no terminal, or the client is not `ztna-recorder` (a
/// test's client, whose terminal is a developer's).
fn kill_terminal_holders(peer: i32, uid: u32) -> Vec<u32> {
    let Ok(peer) = u32::try_from(peer) else {
        return Vec::new();
    };
    let is_shell = std::fs::read_link(format!("/proc/{peer}/exe")).is_ok_and(|exe| {
        exe.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n == "ztna-recorder" || n.starts_with("ztna-recorder "))
    });
    if !is_shell {
        return Vec::new();
    }
    let Ok(tty) = std::fs::read_link(format!("/proc/{peer}/fd/0")) else {
        return Vec::new();
    };
    if !tty.starts_with("/dev/pts/") {
        return Vec::new();
    }
    let ours = crate::shell::with_ancestors(peer);
    let real_uid = |pid: u32| -> Option<u32> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("Uid:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let holders: Vec<u32> = crate::shell::terminal_holders(&tty, &ours)
        .into_iter()
        .filter(|&p| real_uid(p) == Some(uid))
        .collect();
    for &p in &holders {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    holders
}

fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// Checks that an `Events` payload is whole asciicast event lines (`[time, "c", …]`, one a
/// line); returns the time of the last one. A structural check, not a full JSON parse: this
/// is the hot path, and the backend validates every chunk again (`INVALID_CHUNK`), so a
/// client that lies only spoils its own recording. Times must not go back, from `after` (the
/// session's last event) on: the backend refuses a chunk whose times do. Also returns how
/// many lines there are, and the longest's length (with its newline).
fn check_events(payload: &[u8], after: Option<f64>) -> anyhow::Result<(Option<f64>, u64, usize)> {
    let text = simdutf8::basic::from_utf8(payload)
        .ok()
        .context("events are not UTF-8")?;
    if !text.is_empty() && !text.ends_with('\n') {
        anyhow::bail!("events frame does not end with a newline");
    }
    let mut last = after;
    let mut lines = 0;
    let mut longest = 0;
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', payload) {
        // A newline byte is always a character boundary.
        let line = &text[start..end];
        longest = longest.max(end + 1 - start);
        start = end + 1;
        let inner = line
            .strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
            .context("an event line must be a JSON array")?;
        let (time, rest) = inner
            .split_once(',')
            .context("an event line needs a time")?;
        let t: f64 = time
            .trim()
            .parse()
            .ok()
            .filter(|t| (0.0..=ztna_common::asciicast::MAX_EVENT_TIME).contains(t))
            .context("event time must be a number from 0 to 2^31-1")?;
        if last.is_some_and(|l| t < l) {
            anyhow::bail!("event time goes backwards");
        }
        let rest = rest.trim_start();
        let code_ok = ["\"o\"", "\"i\"", "\"r\"", "\"m\""]
            .iter()
            .any(|c| rest.starts_with(c) && rest[c.len()..].trim_start().starts_with(','));
        if !code_ok || !rest.ends_with('"') {
            anyhow::bail!("not an asciicast event line");
        }
        last = Some(t);
        lines += 1;
    }
    // With no line, `last` is still `after`: "no event in this payload" stays `None`.
    Ok((if lines == 0 { None } else { last }, lines, longest))
}

/// A checked `Events` payload whose longest line is `longest` bytes, with every `o`/`i` line
/// longer than `max` (`chunk_max_bytes`) cut into lines of the same time that fit, and the
/// new count of lines; `None` when no line is too long. The shell sends what one read of the
/// program gave as one event (up to 64 KiB on the piped path): cut here, it still makes
/// chunks under the limit.
fn fit_lines(payload: &[u8], longest: usize, max: u64) -> Option<(Vec<u8>, u64)> {
    let max = usize::try_from(max).unwrap_or(usize::MAX);
    if longest <= max {
        return None;
    }
    let text = std::str::from_utf8(payload).ok()?;
    let mut out = Vec::with_capacity(payload.len() + payload.len() / 8);
    for line in text.split_inclusive('\n') {
        if !ztna_common::asciicast::split_event_line(line, max, &mut out) {
            out.extend_from_slice(line.as_bytes());
        }
    }
    let lines = memchr::memchr_iter(b'\n', &out).count() as u64;
    Some((out, lines))
}

/// The most connections one user (root aside) may hold open at once: each may hold a frame
/// being received, so without a bound a local user could grow the daemon (root, shared by
/// everyone) without end. A user with this many SSH sessions at once is refused the next.
pub const MAX_CONNECTIONS_PER_USER: usize = 256;

/// The most bytes of large frames one user's connections may be receiving at once (more
/// waits): frames a client announced but has not finished sending are held in memory. Frames
/// up to [`SMALL_FRAME`] (a Start, a status request, a keystroke's echo) never wait: with at
/// most [`MAX_CONNECTIONS_PER_USER`] connections they hold at most 1 MiB.
pub const FRAME_BUDGET: usize = 8 * 1024 * 1024;
const SMALL_FRAME: usize = 4 * 1024;

/// Reads one frame from a connection of `uid`, within the user's [`FRAME_BUDGET`].
async fn read_frame_budgeted(
    shared: &Shared,
    uid: u32,
    rd: &mut tokio::net::unix::OwnedReadHalf,
) -> Result<Frame, FrameError> {
    let (kind, len) = ipc::read_head_async(rd).await?;
    if len <= SMALL_FRAME {
        return ipc::read_body_async(rd, kind, len).await;
    }
    let budget = lock(&shared.frame_budgets)
        .entry(uid)
        .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(FRAME_BUDGET)))
        .clone();
    // `len` is at most MAX_FRAME_BYTES (the head was checked), well under the budget.
    let _permit = budget
        .acquire_many(len as u32)
        .await
        .map_err(|e| FrameError::Io(std::io::Error::other(e)))?;
    ipc::read_body_async(rd, kind, len).await
}

/// One open connection of a user, counted until dropped.
struct Counted<'a> {
    shared: &'a Shared,
    uid: u32,
}

impl<'a> Counted<'a> {
    fn new(shared: &'a Shared, uid: u32) -> Option<Counted<'a>> {
        let mut c = lock(&shared.connections);
        let n = c.entry(uid).or_insert(0);
        if uid != 0 && *n >= MAX_CONNECTIONS_PER_USER {
            return None;
        }
        *n += 1;
        Some(Counted { shared, uid })
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let mut c = lock(&self.shared.connections);
        if let Some(n) = c.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.uid);
            }
        }
    }
}

/// Whether a client has hung up while waiting for its decision (it sends nothing before).
fn gave_up(rd: &tokio::net::unix::OwnedReadHalf) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 1];
    matches!(
        recv(
            rd.as_ref().as_raw_fd(),
            &mut b,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
        ),
        Ok(0)
    )
}

/// Tells the client what was wrong with its frame (best effort: it may be gone), and returns
/// the error for the connection's log line.
async fn protocol_error(wr: &mut tokio::net::unix::OwnedWriteHalf, e: FrameError) -> anyhow::Error {
    let msg = ErrorMsg {
        message: e.to_string(),
        code: ipc::ERROR_PROTOCOL.into(),
    };
    let _ = send_json(wr, Kind::Error, &msg).await;
    e.into()
}

async fn handle(shared: Arc<Shared>, stream: UnixStream, cred: UCred) -> anyhow::Result<()> {
    let Some(_counted) = Counted::new(&shared, cred.uid()) else {
        client_warn!(
            shared.log_gate,
            cred.uid(),
            uid = cred.uid(),
            "too many connections from this user: refused"
        );
        let (_, mut wr) = stream.into_split();
        let _ = send_json(
            &mut wr,
            Kind::Decision,
            &DecisionMsg {
                mode: Mode::Refused,
                reason: format!(
                    "this user already has {MAX_CONNECTIONS_PER_USER} sessions with the recording daemon"
                ),
                session: None,
                own_limit: true,
            },
        )
        .await;
        return Ok(());
    };
    let (mut rd, mut wr) = stream.into_split();
    let first = tokio::time::timeout(
        Duration::from_secs(10),
        read_frame_budgeted(&shared, cred.uid(), &mut rd),
    )
    .await
    .context("no first frame within 10 s")?;
    let first = match first {
        Ok(f) => f,
        // A client of another version (or not ours) is told why before the connection
        // closes, as the protocol promises, rather than seeing a reset.
        Err(
            e @ (FrameError::Version(_) | FrameError::UnknownKind(_) | FrameError::TooLarge(_)),
        ) => return Err(protocol_error(&mut wr, e).await),
        Err(e) => return Err(e.into()),
    };
    match first.kind {
        Kind::StatusRequest => {
            let mut st = shared.status();
            // The socket is open to every user: who else is logged in, and as what, is for
            // root to see. Others see their own sessions and the totals.
            if cred.uid() != 0 {
                st.sessions_live.retain(|s| s.uid == cred.uid());
            }
            send_json(&mut wr, Kind::StatusReply, &st).await?;
            return Ok(());
        }
        Kind::Start => {}
        other => {
            let msg = ErrorMsg {
                message: format!("expected Start, got {other:?}"),
                code: ipc::ERROR_PROTOCOL.into(),
            };
            let _ = send_json(&mut wr, Kind::Error, &msg).await;
            return Ok(());
        }
    }
    let mut start: StartMsg = match first.parse() {
        Ok(s) => s,
        Err(e) => return Err(protocol_error(&mut wr, e).await),
    };
    // Up to a frame's 1 MiB: not kept while the session runs.
    drop(first);
    let uid = cred.uid();
    let user = user_name(uid).unwrap_or_else(|| uid.to_string());
    let header = serde_json::to_value(&start.header)?;
    if let Err(why) = check_start(&mut start, &header) {
        client_warn!(shared.log_gate, uid, %user, uid, "a session's Start is not valid ({why}): refused");
        let decision = DecisionMsg {
            mode: Mode::Refused,
            reason: format!("the session's start is not valid: {why}"),
            session: None,
            own_limit: false,
        };
        send_json(&mut wr, Kind::Decision, &decision).await?;
        return Ok(());
    }

    let decide = |mode, reason: &str| DecisionMsg {
        mode,
        reason: reason.to_string(),
        session: None,
        own_limit: false,
    };
    if *shared.stopping.borrow() {
        send_json(
            &mut wr,
            Kind::Decision,
            &decide(Mode::Refused, "the daemon is stopping"),
        )
        .await?;
        return Ok(());
    }
    if recording_off(&shared).await {
        tracing::info!(%user, "recording is switched off for this org: session runs unrecorded");
        send_json(
            &mut wr,
            Kind::Decision,
            &decide(
                Mode::Unrecorded,
                "recording is switched off for this organisation",
            ),
        )
        .await?;
        return Ok(());
    }
    let usage = shared.spool.usage().unwrap_or_default();
    // The disk itself may be full before the spool reaches its limit: a session whose room
    // and first chunk are not on it, besides the room live sessions keep, would be cut at
    // once, so it is refused as well.
    let disk_free = shared.spool.disk_free().unwrap_or(u64::MAX);
    let share = shared.config.spool_share(uid);
    let has_share = share < shared.config.spool_max_bytes;
    // Each session in the spool also counts what its folder takes on disk.
    let users = if has_share {
        shared.spool.bytes_of_uid(uid) + shared.spool.held_of_uid(uid) + usage.footprint(Some(uid))
    } else {
        0
    };
    // The room this session will keep for its output in flight, in the spool and in its
    // user's share. The room live sessions keep is not for output: a session admitted with
    // less than that (and, in a share, a chunk) left would be cut at once.
    let room = if has_share {
        late_room(shared.config.spool_max_bytes).min(late_room(share))
    } else {
        late_room(shared.config.spool_max_bytes)
    };
    let full = if usage.bytes + usage.footprint(None) + shared.spool.held() + room
        >= shared.config.spool_max_bytes
        || disk_free < shared.spool.held() + room + shared.config.chunk_max_bytes
    {
        Some(("the recording spool is full", false))
    } else if has_share && users + room + shared.config.chunk_max_bytes > share {
        // Less than a chunk left: the session would be cut at once (under enforce, ended
        // after showing its first output); refused instead, as the disk-free rule does.
        Some(("this user's share of the recording spool is full", true))
    } else {
        None
    };
    if let Some((why, own_limit)) = full {
        tracing::warn!(bytes = usage.bytes, held = shared.spool.held(), max = shared.config.spool_max_bytes, user_bytes = users, user_max = share, disk_free, %user, "{why}: refusing to record a new session");
        let decision = DecisionMsg {
            own_limit,
            ..decide(Mode::Refused, why)
        };
        send_json(&mut wr, Kind::Decision, &decision).await?;
        return Ok(());
    }

    if gave_up(&rd) {
        // It waited longer than it would (this daemon was stopped or starved) and went on
        // without us: unrecorded, or refused under enforce. A recording now would claim a
        // session that was cut off, or one that never ran.
        client_warn!(shared.log_gate, uid, %user, "a session gave up waiting for this daemon before it was taken: not recorded");
        return Ok(());
    }
    let hold = shared.spool.hold(room, has_share.then_some(uid));
    let id = uuid::Uuid::new_v4().to_string();
    let mut metadata = start.metadata;
    drop_owned(&mut metadata);
    if let Some(peer) = cred.pid() {
        let killed = tokio::task::spawn_blocking(move || kill_terminal_holders(peer, uid))
            .await
            .unwrap_or_default();
        if !killed.is_empty() {
            tracing::warn!(%user, pids = ?killed, "processes of the user's held the session's terminal (hidden from `shell`): killed");
            let mut all: Vec<Value> = metadata
                .get("terminal_holders_killed")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            // `shell` may have killed some a moment ago (SIGKILL takes effect asynchronously).
            for &p in &killed {
                if !all.contains(&Value::from(p)) {
                    all.push(Value::from(p));
                }
            }
            all.truncate(ipc::MAX_LISTED_HOLDERS);
            metadata.insert("terminal_holders_killed".into(), Value::Array(all));
            metadata
                .entry("terminal_held_by_pid")
                .or_insert(Value::from(killed[0]));
        }
    }
    metadata.insert("uid".into(), Value::from(uid));
    metadata.insert("user".into(), Value::from(user.clone()));
    // The local id: a session whose daemon restarted under it goes on in a new recording
    // whose `continues` names this one.
    metadata.insert("agent_session".into(), Value::from(id.clone()));
    // When the daemon let go of the session this one continues (unix seconds).
    let mut let_go = None;
    if let Some(c) = metadata.remove("continues") {
        // Only a session of this user that an orderly stop let go can be continued.
        let_go = c.as_str().and_then(|c| {
            let mut known = lock(&shared.continuable);
            match known.get(c) {
                Some(&(owner, at)) if owner == uid => {
                    known.remove(c);
                    Some(at)
                }
                _ => None,
            }
        });
        if let_go.is_some() {
            metadata.insert("continues".into(), c);
        } else {
            client_warn!(shared.log_gate, uid, %user, continues = %c, "`continues` names no session of this user that was let go: dropped");
        }
    }
    if let Some(h) = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
    {
        metadata.insert("hostname".into(), Value::from(h));
    }
    let kind = metadata
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("interactive")
        .to_string();
    let metadata_only = kind == "file_transfer";
    let meta_v = Value::Object(metadata);
    // Live before its folder appears: the uploader completes a session that is neither live
    // nor marked ended as interrupted.
    lock(&shared.live).insert(
        id.clone(),
        LiveSession {
            session: id.clone(),
            user: user.clone(),
            uid,
            pid: cred.pid(),
            kind,
            started_at: now_rfc3339(),
        },
    );
    // A continuation starts at its first event, which the user saw while no daemon ran: its
    // header says when. Believed from the moment the last daemon let the session go.
    let started_at = match (let_go, start.header.timestamp) {
        (Some(from), Some(t))
            if t >= from - 1 && t <= time::OffsetDateTime::now_utc().unix_timestamp() =>
        {
            time::OffsetDateTime::from_unix_timestamp(t)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_else(now_rfc3339)
        }
        _ => now_rfc3339(),
    };
    let dir = match shared
        .spool
        .create_session(&id, &header, &meta_v, &started_at)
    {
        Ok(dir) => dir,
        Err(e) => {
            lock(&shared.live).remove(&id);
            tracing::error!(%user, "cannot create the session's spool folder: {e}");
            send_json(
                &mut wr,
                Kind::Decision,
                &decide(
                    Mode::Refused,
                    &format!("the recording spool cannot be written: {e}"),
                ),
            )
            .await?;
            return Ok(());
        }
    };
    // Written to the folder: not kept while the session runs.
    drop((header, meta_v));
    shared.wake.notify_one();
    tracing::info!(session = %id, %user, uid, "session started");

    let result = record(&shared, &dir, &id, uid, metadata_only, hold, rd, &mut wr).await;
    lock(&shared.live).remove(&id);
    shared.wake.notify_one();
    result
}

/// How a recorded connection ended.
enum Outcome {
    Ended(EndMsg),
    Lost(String),
    /// Recording stops here; the session goes on (or is ended under enforce). With the frame
    /// that found the limit, still to be spooled.
    SpoolFull(Cut, Option<Frame>),
    Stopping,
}

/// Why a session's recording was cut.
#[derive(Debug)]
enum Cut {
    /// At `spool_max_bytes`.
    Spool,
    /// At the user's `spool_max_bytes_per_user`.
    Share,
    /// The spool's disk refused a write (the reason).
    Write(String),
}

impl Cut {
    /// What the session's `shell` is told (and its user, under enforce).
    fn message(&self) -> String {
        match self {
            Cut::Spool => "the recording spool is full".to_string(),
            Cut::Share => "this user's share of the recording spool is full".to_string(),
            Cut::Write(e) => format!("the recording spool cannot be written: {e}"),
        }
    }

    /// The recording's `truncated_reason`.
    fn reason(&self) -> String {
        match self {
            Cut::Spool => "spool full".to_string(),
            Cut::Share => "user's spool share full".to_string(),
            Cut::Write(e) => format!("spool write failed: {e}"),
        }
    }
}

/// Makes a full chunk durable and puts it in place off this task: an fsync takes milliseconds,
/// and the session's frames must keep flowing meanwhile (else its recorder, then its relay,
/// waits). One chunk at a time per session, so chunks land in index order.
async fn hand_off(
    shared: &Arc<Shared>,
    closing: &mut Option<JoinHandle<std::io::Result<()>>>,
    chunk: ClosingChunk,
) -> anyhow::Result<()> {
    if let Some(prev) = closing.take() {
        prev.await??;
    }
    let shared = shared.clone();
    *closing = Some(tokio::task::spawn_blocking(move || {
        chunk.finish()?;
        shared.wake.notify_one();
        Ok(())
    }));
    Ok(())
}

/// `metadata_only`: a file transfer, which sends no frames; its duration is the time from
/// here to its end instead of the last frame's.
#[allow(clippy::too_many_arguments)]
async fn record(
    shared: &Arc<Shared>,
    dir: &super::spool::SessionDir,
    id: &str,
    uid: u32,
    metadata_only: bool,
    mut hold: super::spool::Hold,
    mut rd: tokio::net::unix::OwnedReadHalf,
    wr: &mut tokio::net::unix::OwnedWriteHalf,
) -> anyhow::Result<()> {
    let cfg = &shared.config;
    let began = std::time::Instant::now();
    send_json(
        wr,
        Kind::Decision,
        &DecisionMsg {
            mode: Mode::Record,
            reason: String::new(),
            session: Some(id.to_string()),
            own_limit: false,
        },
    )
    .await?;

    // Frames are read by their own task: reading is not cancel-safe, the chunk timer is. One
    // frame of slack: a frame is a whole batch of the recorder (tens of KiB), and with many
    // live sessions more would be the daemon's largest use of memory.
    let (tx, mut rx) = mpsc::channel::<Result<Frame, FrameError>>(1);
    // Stopped whichever way this function returns (a full spool reads on to the session's
    // end, further down).
    let reading = shared.clone();
    let _reader = AbortOnDrop(tokio::spawn(async move {
        loop {
            let f = read_frame_budgeted(&reading, uid, &mut rd).await;
            let stop = f.is_err() || matches!(&f, Ok(fr) if fr.kind == Kind::End);
            if tx.send(f).await.is_err() || stop {
                break;
            }
        }
    }));

    let mut w = ChunkWriter::new(dir.clone(), cfg.chunk_max_bytes, cfg.chunk_max_secs);
    let share = cfg.spool_share(uid);
    // The chunk being made durable on a blocking thread, while this loop goes on reading.
    let mut closing: Option<JoinHandle<std::io::Result<()>>> = None;
    let mut stopping = shared.stopping.clone();
    // Once the daemon is stopping: the session was told, and what it had already sent is
    // still read and spooled, until it closes its side (or this passes).
    let mut draining: Option<std::time::Instant> = None;
    // Event lines spooled, for the backend's `transcript_lines`.
    let mut transcript_lines = 0u64;
    let mut outcome = loop {
        let deadline = w.deadline();
        tokio::select! {
            f = rx.recv() => match f {
                Some(Ok(mut f)) if f.kind == Kind::Events => {
                    let (last, mut lines, longest) = match check_events(&f.payload, w.last_time) {
                        Ok(x) => x,
                        Err(e) => break Outcome::Lost(format!("bad events: {e:#}")),
                    };
                    if let Some((fit, n)) = fit_lines(&f.payload, longest, cfg.chunk_max_bytes) {
                        (f.payload, lines) = (fit, n);
                    }
                    // Before every frame, not only when a chunk closes: a chunk open for
                    // seconds may hold megabytes.
                    let adds = f.payload.len() as u64;
                    // The room live sessions keep (this one's too) is not for output.
                    let limits = (share < cfg.spool_max_bytes).then_some((uid, share));
                    let claim = match shared.spool.claim(adds, cfg.spool_max_bytes, limits) {
                        Ok(c) => c,
                        // This frame, like any the session sent before it hears of the cut,
                        // may already be on the user's screen: it is spooled in the room the
                        // session kept (see `spool_late`).
                        Err(Limit::Spool) => break Outcome::SpoolFull(Cut::Spool, Some(f)),
                        Err(Limit::Share) => break Outcome::SpoolFull(Cut::Share, Some(f)),
                    };
                    let (n, failed) = spool_lines(shared, uid, &mut w, &mut closing, &f.payload, last, lines).await;
                    drop(claim);
                    transcript_lines += n;
                    if let Some(e) = failed {
                        break Outcome::SpoolFull(Cut::Write(e), None);
                    }
                }
                Some(Ok(f)) if f.kind == Kind::End => match f.parse::<EndMsg>() {
                    Ok(end) => break Outcome::Ended(end),
                    Err(e) => break Outcome::Lost(e.to_string()),
                },
                Some(Ok(f)) => break Outcome::Lost(format!("unexpected {:?} frame", f.kind)),
                // (A frame the session was writing when it closed its side is cut short: it
                // keeps that one for the next daemon.)
                Some(Err(_)) | None if draining.is_some() => break Outcome::Stopping,
                Some(Err(FrameError::Closed)) | None => break Outcome::Lost("connection closed".into()),
                Some(Err(e)) => break Outcome::Lost(e.to_string()),
            },
            _ = sleep_until_opt(deadline) => {
                if let Some(c) = w.take() {
                    if let Err(e) = hand_off(shared, &mut closing, c).await {
                        break Outcome::SpoolFull(Cut::Write(format!("{e:#}")), None);
                    }
                }
            }
            _ = stopping.changed(), if draining.is_none() => {
                let _ = send_json(
                    wr,
                    Kind::Error,
                    &ErrorMsg {
                        message: "the recording daemon is stopping".into(),
                        code: ipc::ERROR_STOPPING.into(),
                    },
                )
                .await;
                // Continuable from now: a SIGKILL during the drain (a stop timeout) must not
                // lose the link of the session's next recording to this one.
                super::let_go(shared, id, uid);
                draining = Some(std::time::Instant::now() + STOP_DRAIN);
            }
            _ = sleep_until_opt(draining), if draining.is_some() => break Outcome::Stopping,
        }
    };
    // A cut session is told first: it follows its enforce policy whether or not what comes
    // next can be written. What it sent before it heard is then spooled, and its End read.
    let mut late_end = None;
    if let Outcome::SpoolFull(cut, first) = &mut outcome {
        let _ = send_json(
            wr,
            Kind::Error,
            &ErrorMsg {
                message: cut.message(),
                code: ipc::ERROR_SPOOL_FULL.into(),
            },
        )
        .await;
        if matches!(cut, Cut::Write(_)) {
            // After a refused write the disk takes nothing more from this session.
            hold.release();
        }
        let late = Late {
            w: &mut w,
            closing: &mut closing,
            hold: &mut hold,
        };
        let (end, lines) =
            spool_late(shared, uid, late, first.take(), &mut rx, &mut stopping).await;
        transcript_lines += lines;
        late_end = end;
    }
    // What was written is kept whatever happens next: a chunk that cannot be made durable now
    // stays a part file, which recovery seals at the next start.
    if let Some(prev) = closing.take() {
        match prev.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(session = %id, "closing a chunk: {e}"),
            Err(e) => tracing::error!(session = %id, "closing a chunk: {e}"),
        }
    }
    match w.close() {
        Ok(true) => shared.wake.notify_one(),
        Ok(false) => {}
        Err(e) => tracing::error!(session = %id, "closing the last chunk: {e}"),
    }
    let duration = match w.last_time {
        None if metadata_only => Some(began.elapsed().as_secs_f64()),
        t => t,
    }
    .map(|t| ztna_common::asciicast::duration_secs(Some(t)));
    match outcome {
        Outcome::Ended(end) => {
            let (exit_status, metadata) = end_metadata(shared, uid, id, end);
            set_end_or_hold(
                shared,
                dir,
                id,
                EndMark {
                    exit_status,
                    interrupted: false,
                    duration_seconds: Some(duration.unwrap_or(0)),
                    metadata,
                    ended_at: Some(now_rfc3339()),
                    transcript_lines: Some(transcript_lines),
                },
            );
            send_json(wr, Kind::Ack, &AckMsg { spooled: true }).await?;
            tracing::info!(session = %id, ?exit_status, "session ended");
        }
        Outcome::Lost(why) => {
            // It ended (as far as anyone will know) now.
            let mut mark = EndMark::interrupted();
            mark.ended_at = Some(now_rfc3339());
            set_end_or_hold(shared, dir, id, mark);
            tracing::warn!(session = %id, "recorder connection lost ({why}): session completed as interrupted");
        }
        Outcome::SpoolFull(cut, _) => {
            let mut metadata = serde_json::Map::new();
            metadata.insert("truncated".into(), Value::Bool(true));
            let reason = cut.reason();
            tracing::warn!(session = %id, ?cut, "{reason}: recording of this session stops here");
            metadata.insert("truncated_reason".into(), Value::from(reason));
            // The session goes on (unrecorded, or being ended under enforce), and its exit
            // status still belongs on the recording.
            let end = late_end;
            let ended = end.is_some();
            let (exit_status, end_meta) = end
                .map(|end| end_metadata(shared, uid, id, end))
                .unwrap_or_default();
            metadata.extend(end_meta);
            set_end_or_hold(
                shared,
                dir,
                id,
                EndMark {
                    exit_status,
                    interrupted: false,
                    duration_seconds: duration,
                    metadata,
                    ended_at: ended.then(now_rfc3339),
                    transcript_lines: Some(transcript_lines),
                },
            );
            if ended {
                let _ = send_json(wr, Kind::Ack, &AckMsg { spooled: true }).await;
            }
        }
        Outcome::Stopping => {
            // No end mark: the next start completes it as interrupted with what it holds
            // (the session goes on in a new recording if it reconnects).
            super::let_go(shared, id, uid);
            tracing::info!(session = %id, "daemon stopping: session sealed, left for recovery");
        }
    }
    shared.wake.notify_one();
    Ok(())
}

/// How long a live session gets, once the daemon is stopping, to stop sending (what it sent
/// before it heard is spooled; the rest it keeps for the next daemon).
const STOP_DRAIN: Duration = Duration::from_millis(500);

/// A task aborted when its handle is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What an `End` adds to the recording's metadata: the client's own keys and the exit status.
/// Metadata that cannot be fitted (see [`fit_client_metadata`]) is dropped whole: the backend
/// would refuse the `complete`, and the session would never be completed.
/// Its warning counts against the user's log budget (see `loggate`): any user may send Ends.
fn end_metadata(
    shared: &Shared,
    uid: u32,
    id: &str,
    end: EndMsg,
) -> (Option<i32>, serde_json::Map<String, Value>) {
    let mut metadata = end.metadata;
    drop_owned(&mut metadata);
    for k in START_OR_DAEMON_KEYS {
        metadata.remove(*k);
    }
    if let Err(why) = fit_client_metadata(&mut metadata, END_METADATA_BYTES) {
        client_warn!(shared.log_gate, uid, session = %id, uid, "a session's End is not valid ({why}): its metadata is dropped");
        metadata.clear();
    }
    if let Some(s) = end.exit_status {
        metadata.insert("exit_status".into(), Value::from(s));
    }
    (end.exit_status, metadata)
}

/// Where a cut session's late frames go.
struct Late<'a> {
    w: &'a mut ChunkWriter,
    closing: &'a mut Option<JoinHandle<std::io::Result<()>>>,
    /// The room it kept: what it may still spool.
    hold: &'a mut super::spool::Hold,
}

/// Writes one Events frame's lines into the session's chunks, handing full chunks off to be
/// made durable. Returns the lines written and, when the disk refused, why (what was written
/// before stays).
async fn spool_lines(
    shared: &Arc<Shared>,
    uid: u32,
    w: &mut ChunkWriter,
    closing: &mut Option<JoinHandle<std::io::Result<()>>>,
    payload: &[u8],
    last: Option<f64>,
    lines: u64,
) -> (u64, Option<String>) {
    // A frame may fill a chunk part-way: the rest goes into the next one, so no chunk passes
    // `chunk_max_bytes` (lines longer than it were cut by `fit_lines`; only a single character
    // under a tiny limit still makes a line that does not fit).
    let mut rest = payload;
    let mut stop = None;
    while !rest.is_empty() {
        let (took, full) = match w.write(rest) {
            Ok(x) => x,
            Err(e) => {
                stop = Some(e.to_string());
                break;
            }
        };
        rest = &rest[took..];
        shared.spool.note_spooled(uid, took as u64);
        shared.ingest.note(took as u64);
        if full {
            if let Some(c) = w.take() {
                if let Err(e) = hand_off(shared, closing, c).await {
                    stop = Some(format!("{e:#}"));
                    break;
                }
            }
        }
    }
    // The time of the last event written (a stop may leave part unwritten).
    let written = &payload[..payload.len() - rest.len()];
    let (last, lines) = if rest.is_empty() {
        (last, lines)
    } else {
        let (last, lines, _) = check_events(written, None).unwrap_or_default();
        (last, lines)
    };
    if last.is_some() {
        w.last_time = last;
    }
    (lines, stop)
}

/// How long after a cut a session's frames may still be spooled: it hears of the cut within
/// milliseconds, and what it sends after that was never shown.
const LATE_WINDOW: Duration = Duration::from_secs(2);

/// After a cut: spools the frames the session sent before it heard (in the room it kept, within
/// [`LATE_WINDOW`]), drops the rest, and reads on to its End. Returns the End (`None` when the connection closed first or the daemon stops)
/// and the lines spooled.
async fn spool_late(
    shared: &Arc<Shared>,
    uid: u32,
    late: Late<'_>,
    first: Option<Frame>,
    rx: &mut mpsc::Receiver<Result<Frame, FrameError>>,
    stopping: &mut tokio::sync::watch::Receiver<bool>,
) -> (Option<EndMsg>, u64) {
    let mut next = first.map(Ok);
    // Event lines spooled here; bytes dropped.
    let mut spooled = 0;
    let mut dropped = 0u64;
    let window = tokio::time::sleep(LATE_WINDOW);
    tokio::pin!(window);
    loop {
        if late.hold.left() == 0 && late.w.deadline().is_some() {
            // Nothing more goes in: the last chunk is closed now, not when a session that goes
            // on unrecorded ends, hours later maybe.
            if let Some(c) = late.w.take() {
                if hand_off(shared, late.closing, c).await.is_err() {
                    // Left a part file, which recovery seals.
                    tracing::warn!("closing a cut session's last chunk failed");
                }
            }
        }
        let f = match next.take() {
            Some(f) => Some(f),
            None => tokio::select! {
                f = rx.recv() => f,
                _ = &mut window, if late.hold.left() > 0 => {
                    late.hold.release();
                    continue;
                }
                _ = stopping.changed() => return (None, spooled),
            },
        };
        match f {
            Some(Ok(f)) if f.kind == Kind::End => return (f.parse::<EndMsg>().ok(), spooled),
            Some(Ok(f)) if f.kind == Kind::Events => {
                // The session's own room was counted in every claim made under the limits
                // (the spool's, and its user's share) while it lived: spooling into it passes
                // neither. Once one frame is dropped nothing after it is spooled: no gaps.
                let mut f = f;
                let checked = check_events(&f.payload, late.w.last_time).ok().map(
                    |(last, mut lines, longest)| {
                        let max = shared.config.chunk_max_bytes;
                        if let Some((fit, n)) = fit_lines(&f.payload, longest, max) {
                            (f.payload, lines) = (fit, n);
                        }
                        (last, lines)
                    },
                );
                let n = f.payload.len() as u64;
                let fits = n <= late.hold.left();
                let Some((last, lines)) = checked.filter(|_| fits) else {
                    if late.hold.left() > 0 || dropped == 0 {
                        // The first dropped: the user may have seen it (under enforce).
                        tracing::warn!(bytes = n, room_left = late.hold.left(), "late output of a cut session dropped: its room is used up or its window over");
                    }
                    dropped += n;
                    late.hold.release();
                    continue;
                };
                let (lines, failed) =
                    spool_lines(shared, uid, late.w, late.closing, &f.payload, last, lines).await;
                late.hold.spend(n);
                spooled += lines;
                if failed.is_some() {
                    late.hold.release();
                }
            }
            Some(Ok(_)) => late.hold.release(),
            _ => return (None, spooled),
        }
    }
}

/// Writes the session's end mark, or, when the disk refuses it (full), holds it for the
/// uploader, which writes it once the session's uploaded chunks have freed their space. What
/// the session spooled is durable either way.
fn set_end_or_hold(shared: &Shared, dir: &super::spool::SessionDir, id: &str, mark: EndMark) {
    if let Err(e) = dir.set_end(&mark) {
        tracing::warn!(session = %id, "cannot write the end mark yet ({e}): held until the disk has room");
        lock(&shared.unwritten_ends).insert(id.to_string(), mark);
    }
}

async fn sleep_until_opt(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::check_events;

    #[test]
    fn a_socket_folder_others_could_write_is_warned_about_and_no_symlink_is_followed() {
        use std::os::unix::fs::PermissionsExt as _;
        let d = tempfile::tempdir().unwrap();
        let set = |mode| std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(mode));
        for (mode, safe) in [
            (0o700, true),
            (0o755, true),
            (0o1777, true),
            (0o777, false),
            (0o770, false),
        ] {
            set(mode).unwrap();
            assert_eq!(
                super::folder_risk(d.path()).is_none(),
                safe,
                "mode {mode:o}"
            );
        }
        // Bound even there, the socket is open to every user (who they are comes from the
        // kernel).
        set(0o777).unwrap();
        let sock = d.path().join("s.sock");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _l = rt.block_on(async { super::bind(&sock) }).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666);
        // A symlink swapped in for the socket is not followed: its target keeps its mode.
        let target = d.path().join("secret");
        std::fs::write(&target, "x").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = d.path().join("t.sock");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = super::open_to_everyone(&link).unwrap_err();
        assert!(format!("{e:#}").contains("not a socket"), "{e:#}");
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn event_lines_are_checked() {
        let two = b"[0.5, \"o\", \"a\"]\n[1.25, \"r\", \"80x24\"]\n";
        assert_eq!(
            check_events(two, None).unwrap_or_default(),
            (Some(1.25), 2, 21)
        );
        // Equal times are fine; a time before the session's last event is not.
        assert_eq!(
            check_events(two, Some(0.5)).unwrap_or_default(),
            (Some(1.25), 2, 21)
        );
        assert!(check_events(two, Some(0.75)).is_err());
        assert_eq!(
            check_events(b"", Some(3.0)).unwrap_or_default(),
            (None, 0, 0)
        );
        for bad in [
            &b"[0.5, \"o\", \"a\"]"[..],
            b"{\"a\": 1}\n",
            b"[-1, \"o\", \"a\"]\n",
            b"[1, \"x\", \"a\"]\n",
            b"[1, \"o\", 3]\n",
            b"[nan, \"o\", \"a\"]\n",
            b"[2, \"o\", \"a\"]\n[1, \"o\", \"b\"]\n",
        ] {
            assert!(
                check_events(bad, None).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
