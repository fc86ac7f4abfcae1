//! The spool: where a session's pieces wait until the backend has acknowledged them.
//!
//! ```text
//! SPOOL/                      0700, root
//!   sessions/ID/              0700: one folder per session (ID is the daemon's own UUID)
//!     header.json             the asciicast header
//!     metadata.json           the session metadata sent with `start`
//!     remote.json             {"session_id"} once the backend's `start` answered
//!     chunk-N.cast.part       the chunk being written (at most one)
//!     chunk-N.cast            closed chunks, deleted one by one as the backend acks them
//!     end.json                the end mark: how the session ended
//!   failed/ID/                sessions the backend refused for good, kept for an operator
//! ```
//!
//! Small files are written whole (temp file, fsync, rename, fsync of the folder), so a crash
//! leaves either the old or the new version. A chunk is fsynced before it loses its `.part`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PART_SUFFIX: &str = ".cast.part";
const CHUNK_SUFFIX: &str = ".cast";
/// Space each session sets aside when it is created, for its small files (the backend's id,
/// the end mark) on a disk that has filled up since: given back a block at a time, just
/// before such a file is written again. Not counted as spooled bytes.
const RESERVE: &str = "reserve";
/// When the daemon took the session, to the microsecond (a header's timestamp is whole seconds).
const STARTED: &str = "started_at";
const RESERVE_BYTES: usize = 8192;
const RESERVE_STEP: u64 = 4096;

#[derive(Debug, Clone)]
pub struct Spool {
    root: PathBuf,
    size: Arc<SizeEstimate>,
}

/// How often [`Spool::bytes_estimate`] walks the spool at most.
const WALK_EVERY: Duration = Duration::from_secs(1);

/// The spool's size between walks: the full check runs at every chunk close, and walking a
/// spool that holds a thousand chunks (the backend down for a while) at each one would cost
/// the ingest more than its writes.
#[derive(Debug, Default)]
struct SizeEstimate {
    /// The last walk, and when it was taken.
    walked: Mutex<Option<(Instant, Walked)>>,
    /// Bytes this daemon spooled since that walk.
    added: AtomicU64,
    /// The same, by the uid whose session spooled them.
    added_by_uid: Mutex<HashMap<u32, u64>>,
    /// Room kept for live sessions' late output ([`Hold`]), not yet spooled.
    held: AtomicU64,
    /// The same, by the uid of sessions whose user has a share of their own.
    held_by_uid: Mutex<HashMap<u32, u64>>,
    /// Bytes claimed for writes in progress ([`Claim`]), not yet noted.
    pending: AtomicU64,
    /// Makes a claim's check and its count one step: two sessions writing at once cannot
    /// both take the last room. Holds the disk's free bytes as last read, and when.
    claiming: Mutex<Option<(Instant, u64)>>,
}

/// Far from full, a claim reads the disk's free space at most this often...
const DISK_EVERY: Duration = Duration::from_millis(50);
/// ...and every time once less than this is left beyond what it needs (more than the
/// daemon writes between two reads).
const DISK_MARGIN: u64 = 64 * 1024 * 1024;

/// Which limit refused a [`Claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Spool,
    Share,
}

/// Room claimed for one write under the spool's limit; counted until dropped (by then the
/// write is noted, or failed).
#[derive(Debug)]
pub struct Claim {
    size: Arc<SizeEstimate>,
    n: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.size.pending.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// Room a live session keeps in the spool for what it has in flight when a limit cuts it;
/// given back as it is spooled ([`spend`](Self::spend)), and the rest when dropped.
#[derive(Debug)]
pub struct Hold {
    size: Arc<SizeEstimate>,
    left: u64,
    /// Also kept in this user's share.
    uid: Option<u32>,
}

impl Hold {
    pub fn left(&self) -> u64 {
        self.left
    }

    /// `n` bytes of the room were spooled (they now count as spooled bytes instead).
    pub fn spend(&mut self, n: u64) {
        let n = n.min(self.left);
        if n == 0 {
            return;
        }
        self.left -= n;
        self.size.held.fetch_sub(n, Ordering::Relaxed);
        if let Some(uid) = self.uid {
            let mut by_uid = super::lock(&self.size.held_by_uid);
            if let Some(h) = by_uid.get_mut(&uid) {
                *h = h.saturating_sub(n);
                if *h == 0 {
                    by_uid.remove(&uid);
                }
            }
        }
    }

    /// Gives the rest back.
    pub fn release(&mut self) {
        self.spend(self.left);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.release();
    }
}

/// What a walk of the spool counted.
#[derive(Debug, Default)]
struct Walked {
    bytes: u64,
    /// By the uid in each session's metadata (sessions without one count only in `bytes`).
    by_uid: HashMap<u32, u64>,
}

/// What a session's folder takes on disk besides its chunks, as a new session's room is
/// judged: the folder and its small files (header, metadata, start time, end mark, the
/// backend's id) a block each, and the reserve. Bytes spooled do not count it, so without it
/// sessions with little or no output (a local user opening them in a loop while the backend
/// is down) would fill the disk some 70 times past `spool_max_bytes`.
pub const SESSION_FOOTPRINT: u64 = 32 * 1024;

/// What the spool holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub chunks_waiting: u64,
    pub sessions: u64,
    /// Sessions by the uid they record.
    pub sessions_by_uid: HashMap<u32, u64>,
    pub failed: u64,
}

impl Usage {
    /// [`SESSION_FOOTPRINT`] for every session in the spool, or `uid`'s.
    pub fn footprint(&self, uid: Option<u32>) -> u64 {
        let n = match uid {
            None => self.sessions,
            Some(uid) => self.sessions_by_uid.get(&uid).copied().unwrap_or(0),
        };
        n.saturating_mul(SESSION_FOOTPRINT)
    }
}

/// `end.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct EndMark {
    pub exit_status: Option<i32>,
    #[serde(default)]
    pub interrupted: bool,
    pub duration_seconds: Option<i64>,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    /// When the session's end reached the daemon (RFC 3339); none for an interrupted one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// Event lines spooled; none for an interrupted session (its count is not known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transcript_lines: Option<u64>,
}

impl EndMark {
    /// The end mark of a session whose recorder went away without an `End`: completed with
    /// what it holds, `metadata.interrupted = true`.
    pub fn interrupted() -> EndMark {
        let mut metadata = Map::new();
        metadata.insert("interrupted".into(), Value::Bool(true));
        // Named, as `null`: the contract's `complete` adds `exit_status`, and here it is not
        // known. A reader sees that it is unknown, not that it was forgotten.
        metadata.insert("exit_status".into(), Value::Null);
        EndMark {
            exit_status: None,
            interrupted: true,
            duration_seconds: None,
            metadata,
            ended_at: None,
            transcript_lines: None,
        }
    }
}

/// Held while a daemon uses a spool: an advisory lock on the spool folder itself, which the
/// kernel drops with the process, however it ends. (A lock file could be deleted under a
/// running daemon, letting a second one in; the folder cannot be, while it holds the spool.)
#[derive(Debug)]
pub struct SpoolLock {
    _held: nix::fcntl::Flock<fs::File>,
}

/// Makes `dir` this daemon's, as its mode is: its owner could otherwise move what waits in
/// it away, or in. A daemon that may not (not root) refuses a folder someone else owns.
fn take_ownership(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    let owner = fs::metadata(dir)?.uid();
    if owner == uid.as_raw() {
        return Ok(());
    }
    std::os::unix::fs::chown(dir, Some(uid.as_raw()), Some(gid.as_raw())).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{} is owned by uid {owner}, not by this daemon (uid {uid}), and cannot be taken: {e}",
                dir.display()
            ),
        )
    })?;
    tracing::warn!(
        "{} was owned by uid {owner}: now this daemon's (uid {uid})",
        dir.display()
    );
    Ok(())
}

impl Spool {
    /// Takes the spool for this daemon. A second daemon on the same spool (another socket,
    /// the same `spool_dir`) would recover the first one's live sessions as interrupted and
    /// upload every session twice: it is refused instead.
    pub fn lock(&self) -> io::Result<SpoolLock> {
        let path = &self.root;
        let f = fs::File::open(path)?;
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(held) => Ok(SpoolLock { _held: held }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!(
                    "another daemon is using this spool ({} is locked by it)",
                    path.display()
                ),
            )),
            Err((_, e)) => Err(e.into()),
        }
    }

    /// Opens (creating when needed) the spool at `root`, owner-only.
    pub fn open(root: &Path) -> io::Result<Spool> {
        let s = Spool {
            root: root.to_path_buf(),
            size: Arc::default(),
        };
        for d in [root.to_path_buf(), s.sessions_dir(), s.failed_dir()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)?;
            fs::set_permissions(&d, fs::Permissions::from_mode(0o700))?;
            take_ownership(&d)?;
        }
        s.set_aside_sessions_not_ours()?;
        Ok(s)
    }

    /// Moves the session folders this daemon did not make (see
    /// [`list_sessions`](Self::list_sessions)) out of the way, to `failed/ID.not-ours`. Only
    /// moved: nothing is written into such a folder nor its modes changed, since whoever owns
    /// it may have put links there. One that cannot be moved stays, never listed.
    fn set_aside_sessions_not_ours(&self) -> io::Result<()> {
        for id in self.session_folders()?.1 {
            let to = self.failed_dir().join(format!("{id}.not-ours"));
            match fs::rename(self.session(&id).path, &to) {
                Ok(()) => tracing::warn!(
                    "session folder {id} was not made by a daemon (another user's, or open to \
                     others): moved to {}, never uploaded",
                    to.display()
                ),
                Err(e) => tracing::warn!(
                    "session folder {id} was not made by a daemon (another user's, or open to \
                     others): never uploaded; it cannot be moved out of the way ({e})"
                ),
            }
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn sessions_dir(&self) -> PathBuf {
        self.root.join("sessions")
    }

    pub fn failed_dir(&self) -> PathBuf {
        self.root.join("failed")
    }

    pub fn session(&self, id: &str) -> SessionDir {
        SessionDir {
            path: self.sessions_dir().join(id),
        }
    }

    /// Creates a session's folder with its header and metadata.
    pub fn create_session(
        &self,
        id: &str,
        header: &Value,
        metadata: &Value,
        started_at: &str,
    ) -> io::Result<SessionDir> {
        // Built under a name the scanner ignores, then renamed: the uploader never sees a
        // session without its header and metadata.
        let dir = self.session(id);
        let tmp = self.sessions_dir().join(format!(".new-{id}"));
        fs::DirBuilder::new().mode(0o700).create(&tmp)?;
        let built = write_atomic(&tmp.join("header.json"), &serde_json::to_vec(header)?)
            .and_then(|()| write_atomic(&tmp.join("metadata.json"), &serde_json::to_vec(metadata)?))
            .and_then(|()| fs::write(tmp.join(RESERVE), [0u8; RESERVE_BYTES]))
            // Not synced: the header's whole second stands in for it when a crash loses it.
            .and_then(|()| fs::write(tmp.join(STARTED), started_at))
            .and_then(|()| fs::rename(&tmp, &dir.path));
        if let Err(e) = built {
            // Recovery would remove it at the next start; the disk may be full now.
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        sync_dir(&self.sessions_dir())?;
        Ok(dir)
    }

    /// Bytes free for the spool on its filesystem (for an unprivileged writer).
    pub fn disk_free(&self) -> io::Result<u64> {
        let st = nix::sys::statvfs::statvfs(&self.root).map_err(io::Error::from)?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }

    /// The ids of the sessions in the spool: the folders with a session's name that a daemon
    /// made (this daemon's user's, mode 0700). One that another user owns, or that is open to
    /// others, was not: a spool someone else created or could write may hold one planted as a
    /// recording. It is never listed, so never recovered, counted or uploaded.
    pub fn list_sessions(&self) -> io::Result<Vec<String>> {
        Ok(self.session_folders()?.0)
    }

    /// The session-named folders: sorted, the daemon's own; and the others.
    fn session_folders(&self) -> io::Result<(Vec<String>, Vec<String>)> {
        use std::os::unix::fs::MetadataExt;
        let me = nix::unistd::geteuid().as_raw();
        let (mut ours, mut others) = (Vec::new(), Vec::new());
        for e in fs::read_dir(self.sessions_dir())? {
            let e = e?;
            let Some(name) = e
                .file_name()
                .to_str()
                .filter(|n| valid_id(n))
                .map(String::from)
            else {
                continue;
            };
            // Not followed: a link is no folder of ours. (Gone meanwhile: skipped.)
            let Ok(m) = e.metadata() else { continue };
            if !m.is_dir() {
                continue;
            }
            if m.uid() == me && m.mode() & 0o077 == 0 {
                ours.push(name);
            } else {
                others.push(name);
            }
        }
        ours.sort();
        Ok((ours, others))
    }

    /// Walks the whole spool (which also refreshes [`bytes_estimate`](Self::bytes_estimate)).
    pub fn usage(&self) -> io::Result<Usage> {
        // Bytes noted before the walk are in what it finds (a note follows its write); those
        // noted while it runs stay counted, maybe twice: the estimate errs on full.
        let noted = self.size.added.load(Ordering::Relaxed);
        let noted_by_uid = super::lock(&self.size.added_by_uid).clone();
        let mut u = Usage::default();
        let mut by_uid = HashMap::new();
        for id in self.list_sessions()? {
            u.sessions += 1;
            let dir = self.session(&id);
            let Ok(rd) = fs::read_dir(&dir.path) else {
                continue; // removed meanwhile
            };
            let before = u.bytes;
            for e in rd.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name == RESERVE {
                    continue;
                }
                if parse_index(&name, CHUNK_SUFFIX).is_some() {
                    u.chunks_waiting += 1;
                }
                u.bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
            if let Some(uid) = dir.uid() {
                *by_uid.entry(uid).or_insert(0) += u.bytes - before;
                *u.sessions_by_uid.entry(uid).or_insert(0) += 1;
            }
        }
        if let Ok(rd) = fs::read_dir(self.failed_dir()) {
            u.failed = rd.flatten().count() as u64;
        }
        let mut walked = self.walked();
        *walked = Some((
            Instant::now(),
            Walked {
                bytes: u.bytes,
                by_uid,
            },
        ));
        let _ = self
            .size
            .added
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                Some(a.saturating_sub(noted))
            });
        let mut added = super::lock(&self.size.added_by_uid);
        for (uid, n) in noted_by_uid {
            if let Some(a) = added.get_mut(&uid) {
                *a = a.saturating_sub(n);
            }
        }
        added.retain(|_, a| *a > 0);
        drop(added);
        drop(walked);
        Ok(u)
    }

    /// Counts bytes a session of `uid` just wrote to a chunk towards
    /// [`bytes_estimate`](Self::bytes_estimate) and [`bytes_of_uid`](Self::bytes_of_uid).
    pub fn note_spooled(&self, uid: u32, bytes: u64) {
        // The per-uid note first: a walk that sees the global one has seen this one too.
        *super::lock(&self.size.added_by_uid).entry(uid).or_insert(0) += bytes;
        self.size.added.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Claims room for writing `n` bytes, if the spool, the room live sessions keep and the
    /// writes in progress leave that much under `max`; and, for a user with a share of their
    /// own (`share`: uid, limit), the same within it. Refused: which limit it was.
    pub fn claim(&self, n: u64, max: u64, share: Option<(u32, u64)>) -> Result<Claim, Limit> {
        let mut disk = super::lock(&self.size.claiming);
        // Writes in progress are counted whole against both limits: it errs on full.
        let pending = self.size.pending.load(Ordering::Relaxed);
        if self.bytes_estimate() + self.held() + pending + n > max {
            return Err(Limit::Spool);
        }
        // The disk may fill first (a small filesystem, other files on it). The room live
        // sessions keep must be on the disk too: what they send before they hear of a cut was
        // shown to their users, and is spooled in it.
        let need = self.held() + pending + n;
        let fresh = match *disk {
            Some((at, free)) => at.elapsed() < DISK_EVERY && free > need + DISK_MARGIN,
            None => false,
        };
        if !fresh {
            *disk = self.disk_free().ok().map(|free| (Instant::now(), free));
        }
        if disk.is_some_and(|(_, free)| need > free) {
            return Err(Limit::Spool);
        }
        if let Some((uid, cap)) = share {
            if self.bytes_of_uid(uid) + self.held_of_uid(uid) + pending + n > cap {
                return Err(Limit::Share);
            }
        }
        self.size.pending.fetch_add(n, Ordering::Relaxed);
        Ok(Claim {
            size: self.size.clone(),
            n,
        })
    }

    /// Keeps `n` bytes of room for a live session ([`Hold`]), in the user's share too when
    /// `uid` is given.
    pub fn hold(&self, n: u64, uid: Option<u32>) -> Hold {
        self.size.held.fetch_add(n, Ordering::Relaxed);
        if let Some(uid) = uid {
            *super::lock(&self.size.held_by_uid).entry(uid).or_insert(0) += n;
        }
        Hold {
            size: self.size.clone(),
            left: n,
            uid,
        }
    }

    /// The room the live sessions of `uid` keep in their user's share, not yet spooled.
    pub fn held_of_uid(&self, uid: u32) -> u64 {
        super::lock(&self.size.held_by_uid)
            .get(&uid)
            .copied()
            .unwrap_or(0)
    }

    /// The room live sessions keep, not yet spooled.
    pub fn held(&self) -> u64 {
        self.size.held.load(Ordering::Relaxed)
    }

    /// What sessions of `uid` hold in the spool, estimated as [`bytes_estimate`] is.
    ///
    /// [`bytes_estimate`]: Self::bytes_estimate
    pub fn bytes_of_uid(&self, uid: u32) -> u64 {
        let fresh = matches!(*self.walked(), Some((at, _)) if at.elapsed() < WALK_EVERY);
        if !fresh {
            let _ = self.usage();
        }
        let walked = self
            .walked()
            .as_ref()
            .and_then(|(_, w)| w.by_uid.get(&uid).copied())
            .unwrap_or(0);
        walked
            + super::lock(&self.size.added_by_uid)
                .get(&uid)
                .copied()
                .unwrap_or(0)
    }

    /// The spool's size for the full check: the last walk (at most [`WALK_EVERY`] old) plus
    /// what was spooled since. Uploads since the walk are not subtracted, so it errs on full.
    pub fn bytes_estimate(&self) -> u64 {
        let walked = self.walked().as_ref().map(|(at, w)| (*at, w.bytes));
        match walked {
            Some((at, bytes)) if at.elapsed() < WALK_EVERY => {
                bytes + self.size.added.load(Ordering::Relaxed)
            }
            _ => self.usage().map(|u| u.bytes).unwrap_or_default(),
        }
    }

    fn walked(&self) -> std::sync::MutexGuard<'_, Option<(Instant, Walked)>> {
        super::lock(&self.size.walked)
    }

    /// Keeps `failed/` within `max_bytes` and `max_entries` by deleting its oldest entries.
    /// What lands there the backend refused for good, and it does not count towards
    /// `spool_max_bytes`: unbounded, a user whose sessions the backend refuses (or a backend
    /// refusing everything) would fill the disk, and every later session would be refused.
    /// Folders set aside as not ours (`.not-ours`) are left alone, for an operator. Returns
    /// what was deleted.
    pub fn trim_failed(&self, max_bytes: u64, max_entries: usize) -> io::Result<Vec<String>> {
        use std::os::unix::fs::MetadataExt;
        let mut entries = Vec::new();
        for e in fs::read_dir(self.failed_dir())?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".not-ours") {
                continue;
            }
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            let mut bytes = m.len();
            if m.is_dir() {
                for f in fs::read_dir(e.path()).into_iter().flatten().flatten() {
                    bytes += f.path().symlink_metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
            entries.push((m.mtime(), name, bytes, m.is_dir()));
        }
        entries.sort();
        let mut total: u64 = entries.iter().map(|e| e.2).sum();
        let mut count = entries.len();
        let mut deleted = Vec::new();
        for (_, name, bytes, is_dir) in entries {
            if total <= max_bytes && count <= max_entries {
                break;
            }
            let path = self.failed_dir().join(&name);
            let removed = if is_dir {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            // One that cannot be removed must not keep the rest over the limits.
            if let Err(e) = removed {
                tracing::error!("cannot delete failed/{name}: {e}");
                continue;
            }
            total -= bytes;
            count -= 1;
            deleted.push(name);
        }
        if !deleted.is_empty() {
            sync_dir(&self.failed_dir())?;
        }
        Ok(deleted)
    }

    /// Moves a session the backend will never take to `failed/`, with the reason.
    pub fn quarantine(&self, id: &str, reason: &str) -> io::Result<()> {
        let from = self.session(id).path;
        let to = self.failed_dir().join(id);
        // The reason first: whoever finds the session in failed/ (an operator, a crash
        // between the two steps) finds why with it. In the folder it leaves, it is a file no
        // reader of sessions looks at.
        write_atomic(&from.join("failed-reason.txt"), reason.as_bytes())?;
        fs::rename(&from, &to)?;
        sync_dir(&self.sessions_dir())?;
        sync_dir(&self.failed_dir())
    }

    /// Moves one chunk the backend will never take to `failed/ID-chunk-N.cast`; the session's
    /// recording says so (`chunks_set_aside`).
    pub fn quarantine_chunk(&self, id: &str, index: u64) -> io::Result<()> {
        let dir = self.session(id);
        dir.note(|n| {
            let list = n
                .entry("chunks_set_aside")
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(a) = list {
                a.push(Value::from(index));
            }
        })?;
        fs::rename(
            dir.chunk_path(index),
            self.failed_dir().join(format!("{id}-chunk-{index}.cast")),
        )?;
        sync_dir(&self.failed_dir())
    }
}

/// Session ids are the daemon's UUIDs; anything else in the folder is not ours.
pub fn valid_id(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok()
}

fn parse_index(name: &str, suffix: &str) -> Option<u64> {
    let n = name.strip_prefix("chunk-")?.strip_suffix(suffix)?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// A session folder's chunk files by index.
#[derive(Debug, Default)]
pub struct Chunks {
    /// Durable and in place: the uploader may take them.
    pub closed: Vec<u64>,
    /// Being written, or left by a close that failed or a crash.
    pub parts: Vec<u64>,
}

/// One session's folder.
#[derive(Debug, Clone)]
pub struct SessionDir {
    pub path: PathBuf,
}

impl SessionDir {
    pub fn id(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    pub fn exists(&self) -> bool {
        self.path.is_dir()
    }

    pub fn chunk_path(&self, index: u64) -> PathBuf {
        self.path.join(format!("chunk-{index}{CHUNK_SUFFIX}"))
    }

    pub fn part_path(&self, index: u64) -> PathBuf {
        self.path.join(format!("chunk-{index}{PART_SUFFIX}"))
    }

    /// The closed chunks and the part files, each lowest index first, from one listing.
    pub fn chunks(&self) -> io::Result<Chunks> {
        let mut c = Chunks::default();
        for e in fs::read_dir(&self.path)? {
            let name = e?.file_name();
            let name = name.to_string_lossy();
            if let Some(i) = parse_index(&name, CHUNK_SUFFIX) {
                c.closed.push(i);
            } else if let Some(i) = parse_index(&name, PART_SUFFIX) {
                c.parts.push(i);
            }
        }
        c.closed.sort_unstable();
        c.parts.sort_unstable();
        Ok(c)
    }

    /// The header and metadata the backend's `start` gets. One damaged on disk (no longer
    /// JSON) is replaced by a stand-in, and the metadata names it in `damaged_files`: the
    /// chunks are still worth having.
    pub fn start_info(&self) -> io::Result<(Value, Value)> {
        let mut damaged_files = Vec::new();
        // Damaged: not JSON, cut short, gone, or not the object it must be.
        let mut read = |name: &'static str, stand_in: Value, fits: &dyn Fn(&Value) -> bool| {
            match read_json(&self.path.join(name)) {
                Ok(v) if fits(&v) => Ok(v),
                Ok(_) => Err(io::Error::from(io::ErrorKind::InvalidData)),
                Err(e) => Err(e),
            }
            .or_else(|e| {
                if !damaged(&e) && e.kind() != io::ErrorKind::NotFound {
                    return Err(e);
                }
                tracing::error!(file = %self.path.join(name).display(), "damaged ({e}): a stand-in is used");
                damaged_files.push(Value::from(name));
                Ok(stand_in)
            })
        };
        let header = read(
            "header.json",
            serde_json::json!({"version": 2, "width": 80, "height": 24}),
            &|h| h.get("version").and_then(Value::as_u64) == Some(2),
        )?;
        let mut metadata = read(
            "metadata.json",
            Value::Object(Map::new()),
            &Value::is_object,
        )?;
        if !damaged_files.is_empty() {
            if let Value::Object(m) = &mut metadata {
                m.insert("damaged_files".into(), Value::Array(damaged_files));
            }
        }
        Ok((header, metadata))
    }

    /// The uid whose session this is (the daemon wrote it from the kernel's word), if its
    /// metadata can be read.
    pub fn uid(&self) -> Option<u32> {
        read_json(&self.path.join("metadata.json"))
            .ok()?
            .get("uid")?
            .as_u64()
            .and_then(|u| u32::try_from(u).ok())
    }

    /// The backend's id of the recording, once it has one. A damaged file counts as none: the
    /// recording is started again and gets every chunk still here.
    pub fn remote(&self) -> io::Result<Option<String>> {
        match read_json(&self.path.join("remote.json")) {
            Ok(v) => Ok(v
                .get("session_id")
                .and_then(Value::as_str)
                .map(str::to_string)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) if damaged(&e) => {
                tracing::error!(session = %self.id(), "remote.json damaged ({e}): the recording is started again");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// What the uploader noted about the session (chunks set aside, damaged lines dropped),
    /// added to the recording's metadata when it is completed.
    pub fn notes(&self) -> io::Result<Map<String, Value>> {
        match read_json(&self.path.join(NOTES)) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => Ok(Map::new()),
            Err(e) if e.kind() == io::ErrorKind::NotFound || damaged(&e) => Ok(Map::new()),
            Err(e) => Err(e),
        }
    }

    fn note(&self, f: impl FnOnce(&mut Map<String, Value>)) -> io::Result<()> {
        let mut n = self.notes()?;
        f(&mut n);
        self.write_small(NOTES, &serde_json::to_vec(&n)?)
    }

    /// Rewrites closed chunk `index` with only the lines the backend can take (whole asciicast
    /// event lines in time order, UTF-8 repaired), after the backend refused it: a damaged line (a bad disk
    /// block, an edit) costs that line, not the chunk. Returns how many lines went or were
    /// repaired (0: none, the refusal was for something else); a chunk left with no event is
    /// removed.
    pub fn repair_chunk(&self, index: u64) -> io::Result<u64> {
        let path = self.chunk_path(index);
        let data = fs::read(&path)?;
        let text = String::from_utf8_lossy(&data);
        // Bytes that were not UTF-8 became U+FFFD: a line holding one counts as repaired.
        let lossy = matches!(text, std::borrow::Cow::Owned(_));
        let mut kept = String::with_capacity(text.len());
        let mut damaged_lines = 0u64;
        let mut last: Option<f64> = None;
        for (i, line) in text.split_terminator('\n').enumerate() {
            match ztna_common::asciicast::parse_event_line(line, i + 1) {
                // An event that goes back in time (the backend refuses the chunk for it, since
                // the last event's time is the duration) costs that line too.
                Ok(ev) if last.is_some_and(|t| ev.time < t) => damaged_lines += 1,
                Ok(ev) => {
                    last = Some(ev.time);
                    kept.push_str(line);
                    kept.push('\n');
                    damaged_lines += u64::from(lossy && line.contains(char::REPLACEMENT_CHARACTER));
                }
                Err(_) => damaged_lines += 1,
            }
        }
        if damaged_lines == 0 {
            return Ok(0);
        }
        if kept.is_empty() {
            fs::remove_file(&path)?;
        } else {
            write_atomic(&path, kept.as_bytes())?;
        }
        self.note(|n| {
            let before = n.get("damaged_lines").and_then(Value::as_u64).unwrap_or(0);
            n.insert("damaged_lines".into(), Value::from(before + damaged_lines));
        })?;
        Ok(damaged_lines)
    }

    pub fn set_remote(&self, session_id: &str) -> io::Result<()> {
        let body = serde_json::to_vec(&serde_json::json!({ "session_id": session_id }))?;
        self.write_small("remote.json", &body)
    }

    /// When the daemon took the session (RFC 3339), if that was kept.
    pub fn started_at(&self) -> Option<String> {
        fs::read_to_string(self.path.join(STARTED)).ok()
    }

    pub fn end(&self) -> io::Result<Option<EndMark>> {
        match fs::read(self.path.join("end.json")) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b)?)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn set_end(&self, end: &EndMark) -> io::Result<()> {
        self.write_small("end.json", &serde_json::to_vec(end)?)
    }

    /// Writes one of the session's small files durably; when that fails (a full disk), once
    /// more after giving back a block of the session's reserve.
    fn write_small(&self, name: &str, data: &[u8]) -> io::Result<()> {
        let path = self.path.join(name);
        match write_atomic(&path, data) {
            Err(e) if self.release_reserve() => {
                tracing::info!(
                    file = name,
                    "disk full ({e}): written in the session's reserve"
                );
                write_atomic(&path, data)
            }
            r => r,
        }
    }

    /// Gives a block of the reserve back to the filesystem; false when none is left.
    fn release_reserve(&self) -> bool {
        let Ok(f) = fs::OpenOptions::new()
            .write(true)
            .open(self.path.join(RESERVE))
        else {
            return false;
        };
        match f.metadata() {
            Ok(m) if m.len() > 0 => f.set_len(m.len().saturating_sub(RESERVE_STEP)).is_ok(),
            _ => false,
        }
    }

    /// Turns every `.part` (left by a crash, or by a close that failed) into a closed chunk: the
    /// torn last line (bytes after the last `\n`) is cut off, every whole line kept; a part with
    /// no whole line is removed. In place, so that a full disk does not stop it: cutting frees
    /// space and renaming takes none.
    pub fn seal_parts(&self) -> io::Result<()> {
        for i in self.chunks()?.parts {
            let part = self.part_path(i);
            let data = fs::read(&part)?;
            let keep = data.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            if keep == 0 {
                fs::remove_file(&part)?;
                continue;
            }
            if std::str::from_utf8(&data[..keep]).is_err() {
                // Whole lines we wrote are UTF-8: only a damaged disk gets here. Keep what can
                // be read, with the bad bytes replaced.
                let text = String::from_utf8_lossy(&data[..keep]).into_owned();
                write_atomic(&self.chunk_path(i), text.as_bytes())?;
                fs::remove_file(&part)?;
                continue;
            }
            let f = fs::OpenOptions::new().write(true).open(&part)?;
            if keep < data.len() {
                f.set_len(keep as u64)?;
            }
            f.sync_all()?;
            fs::rename(&part, self.chunk_path(i))?;
        }
        sync_dir(&self.path)
    }

    pub fn remove(&self) -> io::Result<()> {
        match fs::remove_dir_all(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Whether an error reading one of our JSON files means the file is damaged (not JSON, cut
/// short) rather than unreadable.
pub fn damaged(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
    )
}

/// The uploader's notes about a session (see [`SessionDir::notes`]).
const NOTES: &str = "notes.json";

fn read_json(p: &Path) -> io::Result<Value> {
    Ok(serde_json::from_slice(&fs::read(p)?)?)
}

/// Writes `data` to `path` so that a crash leaves the old file or the whole new one.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Appends event lines to the session's current chunk and closes it at the size or age
/// limit. Writes go straight to the file (no user-space buffer), so a daemon killed with
/// SIGKILL loses nothing it has written.
#[derive(Debug)]
pub struct ChunkWriter {
    dir: SessionDir,
    index: u64,
    file: Option<fs::File>,
    bytes: u64,
    opened_at: Option<Instant>,
    max_bytes: u64,
    max_age: std::time::Duration,
    /// Time of the last event written, seconds since the start of the recording.
    pub last_time: Option<f64>,
}

impl ChunkWriter {
    pub fn new(dir: SessionDir, max_bytes: u64, max_secs: u64) -> Self {
        ChunkWriter {
            dir,
            index: 0,
            file: None,
            bytes: 0,
            opened_at: None,
            max_bytes,
            max_age: std::time::Duration::from_secs(max_secs),
            last_time: None,
        }
    }

    /// Appends as many of `lines` (whole event lines) to the open chunk as fit under the size
    /// limit, opening a chunk if needed; a line longer than the limit gets a chunk of its own.
    /// Returns how many bytes it took, and true when the chunk is full and should be
    /// [taken](Self::take) out; the caller then writes the rest into the next one.
    pub fn write(&mut self, lines: &[u8]) -> io::Result<(usize, bool)> {
        if lines.is_empty() {
            return Ok((0, false));
        }
        let room = usize::try_from(self.max_bytes.saturating_sub(self.bytes)).unwrap_or(usize::MAX);
        let take = if lines.len() <= room {
            lines.len()
        } else {
            match memchr::memrchr(b'\n', &lines[..room]) {
                Some(i) => i + 1,
                // The next line alone is over what is left: it starts the next chunk, or,
                // in an empty one, has it to itself.
                None if self.file.is_some() && self.bytes > 0 => return Ok((0, true)),
                None => memchr::memchr(b'\n', lines).map_or(lines.len(), |i| i + 1),
            }
        };
        if self.file.is_none() {
            let f = fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(self.dir.part_path(self.index))?;
            self.file = Some(f);
            self.opened_at = Some(Instant::now());
            self.bytes = 0;
        }
        if let Some(f) = self.file.as_mut() {
            if let Err(e) = f.write_all(&lines[..take]) {
                // Lines written in part (the disk filled up) would leave a torn line in the
                // chunk: cut it off, so the chunk still ends on a whole event line.
                let _ = f.set_len(self.bytes);
                return Err(e);
            }
        }
        self.bytes += take as u64;
        Ok((take, take < lines.len() || self.bytes >= self.max_bytes))
    }

    /// When the open chunk must be closed by age.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened_at.and_then(|t| t.checked_add(self.max_age))
    }

    /// Takes the open chunk out, if there is one: the next write opens the next chunk at once,
    /// while the caller makes this one durable ([`ClosingChunk::finish`]) elsewhere, so a
    /// session's output is never held up by an fsync.
    pub fn take(&mut self) -> Option<ClosingChunk> {
        let file = self.file.take()?;
        if self.bytes == 0 {
            // Only a failed first write (a full disk) leaves an open chunk empty: an empty
            // chunk is not a chunk the backend takes, so there is nothing to close.
            drop(file);
            let _ = fs::remove_file(self.dir.part_path(self.index));
            self.opened_at = None;
            return None;
        }
        let closing = ClosingChunk {
            file,
            part: self.dir.part_path(self.index),
            chunk: self.dir.chunk_path(self.index),
            dir: self.dir.path.clone(),
        };
        self.index += 1;
        self.opened_at = None;
        self.bytes = 0;
        Some(closing)
    }

    /// Closes the open chunk (fsync, then rename); returns whether there was one.
    pub fn close(&mut self) -> io::Result<bool> {
        match self.take() {
            Some(c) => c.finish().map(|()| true),
            None => Ok(false),
        }
    }
}

/// A chunk taken out of its [`ChunkWriter`], not yet in place: until [`finish`](Self::finish)
/// it is a part file, which recovery treats like any other after a crash.
#[derive(Debug)]
pub struct ClosingChunk {
    file: fs::File,
    part: PathBuf,
    chunk: PathBuf,
    dir: PathBuf,
}

impl ClosingChunk {
    /// fsync, rename into place, fsync the folder: from then on the uploader may take it.
    pub fn finish(self) -> io::Result<()> {
        self.file.sync_all()?;
        drop(self.file);
        fs::rename(&self.part, &self.chunk)?;
        sync_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// `failed/` is trimmed oldest first to its limits of bytes and entries; a folder set
    /// aside as not ours stays.
    #[test]
    fn trim_failed_deletes_the_oldest_entries_until_within_limits() {
        let t = tempfile::tempdir().unwrap();
        let spool = Spool::open(t.path()).unwrap();
        let failed = spool.failed_dir();
        let at = |age: u64| std::time::SystemTime::now() - Duration::from_secs(age);
        for (name, age) in [("old", 300), ("mid", 200), ("new", 100)] {
            let dir = failed.join(name);
            fs::create_dir(&dir).unwrap();
            fs::write(dir.join("chunk-0.cast"), vec![b'x'; 1000]).unwrap();
            fs::File::open(&dir).unwrap().set_modified(at(age)).unwrap();
        }
        let chunk = failed.join("s-chunk-3.cast");
        fs::write(&chunk, vec![b'x'; 1000]).unwrap();
        fs::File::options()
            .write(true)
            .open(&chunk)
            .unwrap()
            .set_modified(at(250))
            .unwrap();
        fs::create_dir(failed.join("x.not-ours")).unwrap();
        fs::File::open(failed.join("x.not-ours"))
            .unwrap()
            .set_modified(at(900))
            .unwrap();

        assert!(spool.trim_failed(1 << 20, 10).unwrap().is_empty());
        // Four entries of about 1 KB (folders a block more): the byte limit takes the two
        // oldest.
        assert_eq!(
            spool.trim_failed(2 * 1000 + 2 * 4096, 10).unwrap(),
            ["old", "s-chunk-3.cast"]
        );
        assert_eq!(spool.trim_failed(1 << 20, 1).unwrap(), ["mid"]);
        let mut left: Vec<String> = fs::read_dir(&failed)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["new", "x.not-ours"]);
    }

    /// A spool in a temporary folder holding one new session.
    fn spool_with_session() -> (tempfile::TempDir, Spool, SessionDir) {
        let t = tempfile::tempdir().unwrap();
        let spool = Spool::open(t.path()).unwrap();
        let id = uuid::Uuid::new_v4().to_string();
        let dir = spool
            .create_session(
                &id,
                &serde_json::json!({"version": 2}),
                &serde_json::json!({}),
                &crate::daemon::now_rfc3339(),
            )
            .unwrap();
        (t, spool, dir)
    }

    #[test]
    fn torn_last_line_is_dropped_whole_lines_kept() {
        let (_t, spool, dir) = spool_with_session();
        let mut w = ChunkWriter::new(dir.clone(), 32, 10);
        // As the daemon's ingest does: write until full, take the chunk out, finish it apart.
        assert_eq!(w.write(b"[0.1, \"o\", \"a\"]\n").unwrap(), (16, false));
        assert_eq!(w.write(b"[0.2, \"o\", \"b\"]\n").unwrap(), (16, true));
        let closing = w.take().unwrap();
        // The next chunk opens while the full one is still being made durable.
        w.write(b"[0.3, \"o\", \"c\"]\n").unwrap();
        assert_eq!(dir.chunks().unwrap().closed, Vec::<u64>::new());
        closing.finish().unwrap();
        assert_eq!(dir.chunks().unwrap().closed, vec![0]);
        // simulate a crash mid-line
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(dir.part_path(1))
            .unwrap();
        f.write_all(b"[0.4, \"o\", \"d").unwrap();
        drop(w);
        let inode = fs::metadata(dir.part_path(1)).unwrap().ino();
        dir.seal_parts().unwrap();
        assert_eq!(dir.chunks().unwrap().closed, vec![0, 1]);
        // Sealed in place (cut and renamed, not copied): a full disk cannot stop it.
        assert_eq!(fs::metadata(dir.chunk_path(1)).unwrap().ino(), inode);
        assert_eq!(
            fs::read_to_string(dir.chunk_path(1)).unwrap(),
            "[0.3, \"o\", \"c\"]\n"
        );
        assert!(dir.chunks().unwrap().parts.is_empty());
        let u = spool.usage().unwrap();
        assert_eq!(u.chunks_waiting, 2);
        assert_eq!(u.sessions, 1);
        let mode = fs::metadata(&dir.path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    /// A spool folder someone else owns (a user could move what waits in it) is taken, as its
    /// mode is. (Set up as root, as CI runs; otherwise only our own folder can be made.)
    #[test]
    fn a_spool_owned_by_someone_else_is_taken() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("spool");
        // With a session folder its owner made (mode 700, as a daemon would).
        let planted = uuid::Uuid::new_v4().to_string();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root.join("sessions").join(&planted))
            .unwrap();
        let me = nix::unistd::geteuid().as_raw();
        if me == 0 {
            for d in [
                &root,
                &root.join("sessions"),
                &root.join("sessions").join(&planted),
            ] {
                std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap();
            }
        }
        let spool = Spool::open(&root).unwrap();
        for d in [&root, &root.join("sessions"), &root.join("failed")] {
            assert_eq!(fs::metadata(d).unwrap().uid(), me, "{}", d.display());
        }
        if me == 0 {
            assert!(spool.list_sessions().unwrap().is_empty());
            assert!(root
                .join("failed")
                .join(format!("{planted}.not-ours"))
                .is_dir());
        }
    }

    #[test]
    fn chunks_are_cut_at_line_boundaries_under_the_limit() {
        let (_t, _spool, dir) = spool_with_session();
        let mut w = ChunkWriter::new(dir.clone(), 40, 10);
        let line = b"[0.1, \"o\", \"a\"]\n"; // 16 bytes
        let frame = line.repeat(4);
        // Two lines fit; the frame's other two go to the next chunk.
        assert_eq!(w.write(&frame).unwrap(), (32, true));
        w.take().unwrap().finish().unwrap();
        assert_eq!(w.write(&frame[32..]).unwrap(), (32, false));
        // A line longer than the limit closes the chunk it does not fit in, then has one of
        // its own.
        let long = format!("[0.2, \"o\", \"{}\"]\n", "x".repeat(40));
        assert_eq!(w.write(long.as_bytes()).unwrap(), (0, true));
        w.take().unwrap().finish().unwrap();
        assert_eq!(w.write(long.as_bytes()).unwrap(), (long.len(), true));
        w.take().unwrap().finish().unwrap();
        assert_eq!(dir.chunks().unwrap().closed, vec![0, 1, 2]);
        for (i, want) in [
            (0, line.repeat(2)),
            (1, line.repeat(2)),
            (2, long.into_bytes()),
        ] {
            assert_eq!(fs::read(dir.chunk_path(i)).unwrap(), want);
        }
    }

    #[test]
    fn size_estimate_counts_writes_since_the_walk() {
        let (_t, spool, dir) = spool_with_session();
        let walked = spool.usage().unwrap().bytes;
        assert_eq!(spool.bytes_estimate(), walked);
        let mut w = ChunkWriter::new(dir, 1 << 20, 10);
        let line = b"[0.1, \"o\", \"a\"]\n";
        w.write(line).unwrap();
        spool.note_spooled(1000, line.len() as u64);
        assert_eq!(spool.bytes_estimate(), walked + line.len() as u64);
        // A walk counts the file itself and starts the count of notes again.
        assert_eq!(spool.usage().unwrap().bytes, walked + line.len() as u64);
        assert_eq!(spool.bytes_estimate(), walked + line.len() as u64);
    }

    #[test]
    fn one_daemon_at_a_time_per_spool() {
        let (_t, spool, _dir) = spool_with_session();
        let held = spool.lock().unwrap();
        let e = spool.lock().unwrap_err();
        assert!(e.to_string().contains("another daemon"), "{e}");
        drop(held);
        spool.lock().unwrap();
    }

    #[test]
    fn claims_leave_the_room_sessions_hold_and_never_pass_the_limits() {
        let t = tempfile::tempdir().unwrap();
        let spool = Spool::open(t.path()).unwrap();
        let mut a = spool.hold(300, Some(1000));
        let b = spool.hold(200, None);
        assert_eq!((spool.held(), spool.held_of_uid(1000)), (500, 300));
        // 1000 bytes of spool: 500 held, so 500 to claim; a claim counts until dropped.
        let c = spool.claim(400, 1000, None).unwrap();
        assert_eq!(spool.claim(101, 1000, None).unwrap_err(), Limit::Spool);
        drop(c);
        assert!(spool.claim(500, 1000, None).is_ok());
        // A share of 700 for uid 1000, which holds 300 of it.
        assert_eq!(
            spool.claim(401, 10_000, Some((1000, 700))).unwrap_err(),
            Limit::Share
        );
        assert!(spool.claim(400, 10_000, Some((1000, 700))).is_ok());
        // Spooling into the room gives it back as it goes; dropping gives back the rest.
        a.spend(100);
        assert_eq!(
            (a.left(), spool.held(), spool.held_of_uid(1000)),
            (200, 400, 200)
        );
        drop(a);
        drop(b);
        assert_eq!((spool.held(), spool.held_of_uid(1000)), (0, 0));
    }

    #[test]
    fn a_session_folder_open_to_others_is_set_aside() {
        let t = tempfile::tempdir().unwrap();
        let spool = Spool::open(t.path()).unwrap();
        let (ours, planted) = (
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
        );
        for id in [&ours, &planted] {
            spool
                .create_session(
                    id,
                    &serde_json::json!({"version": 2}),
                    &serde_json::json!({}),
                    &crate::daemon::now_rfc3339(),
                )
                .unwrap();
        }
        // Its owner's links, where a daemon that wrote into it would follow them.
        let victim = t.path().join("victim");
        fs::write(&victim, "root's").unwrap();
        let planted_dir = spool.session(&planted).path;
        for name in ["failed-reason.tmp", "failed-reason.txt", "header.json"] {
            let _ = fs::remove_file(planted_dir.join(name));
            std::os::unix::fs::symlink(&victim, planted_dir.join(name)).unwrap();
        }
        fs::set_permissions(&planted_dir, fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(spool.list_sessions().unwrap(), vec![ours.clone()]);
        let spool = Spool::open(t.path()).unwrap();
        assert_eq!(spool.list_sessions().unwrap(), vec![ours.clone()]);
        let aside = spool.failed_dir().join(format!("{planted}.not-ours"));
        assert!(aside.is_dir() && !planted_dir.exists());
        assert_eq!(fs::read_to_string(&victim).unwrap(), "root's");
        assert_eq!(
            fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // One that cannot be moved (`failed/` holds its name, not empty) stays, never listed,
        // and the daemon starts.
        fs::create_dir(&planted_dir).unwrap();
        fs::set_permissions(&planted_dir, fs::Permissions::from_mode(0o770)).unwrap();
        let spool = Spool::open(t.path()).unwrap();
        assert!(planted_dir.is_dir());
        assert_eq!(spool.list_sessions().unwrap(), vec![ours]);
    }

    #[test]
    fn size_by_uid_comes_from_each_sessions_metadata() {
        let t = tempfile::tempdir().unwrap();
        let spool = Spool::open(t.path()).unwrap();
        let line = b"[0.1, \"o\", \"a\"]\n";
        let mut held = Vec::new();
        for uid in [1000, 1000, 1001] {
            let id = uuid::Uuid::new_v4().to_string();
            let meta = serde_json::json!({ "uid": uid });
            let dir = spool
                .create_session(
                    &id,
                    &serde_json::json!({"version": 2}),
                    &meta,
                    &crate::daemon::now_rfc3339(),
                )
                .unwrap();
            let mut w = ChunkWriter::new(dir, 1 << 20, 10);
            w.write(line).unwrap();
            spool.note_spooled(uid, line.len() as u64);
            held.push(w);
        }
        // What was noted, on top of the walk made before the writes; then what a walk finds
        // (header and metadata files count too).
        assert!(spool.bytes_of_uid(1000) >= 2 * line.len() as u64);
        assert_eq!(spool.bytes_of_uid(1002), 0);
        let walked = spool.usage().unwrap().bytes;
        let (a, b) = (spool.bytes_of_uid(1000), spool.bytes_of_uid(1001));
        assert_eq!(a + b, walked);
        assert!(a > b && b > line.len() as u64, "{a} {b}");
        // A second walk without new writes counts the same.
        spool.usage().unwrap();
        assert_eq!(spool.bytes_of_uid(1000), a);
    }
}
