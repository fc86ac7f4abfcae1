//! `ztna-recorder daemon`, the systemd service: takes sessions from `shell` over a Unix socket
//! ([`socket`]), spools them ([`spool`]), uploads them ([`uploader`]) as the spool watcher
//! ([`watcher`]) finds work, and on start completes what an earlier run left behind
//! ([`recovery`]).

pub mod loggate;
pub mod pacing;
pub mod recovery;
pub mod socket;
pub mod spool;
pub mod uploader;
pub mod watcher;

use crate::client::AgentClient;
use crate::config::{Config, ConfigArgs};
use crate::ipc::{LiveSession, StatusReply};
use anyhow::Context;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify, Semaphore};

/// Arguments of `ztna-recorder daemon`.
#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The Unix socket `shell` connects to (config key `socket`).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Where sessions wait for upload (config key `spool_dir`).
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// The backend's base URL (config key `server_url`).
    #[arg(long, value_name = "URL")]
    pub server_url: Option<String>,
    /// A file holding the node key (config key `node_key_file`).
    #[arg(long, value_name = "FILE")]
    pub node_key_file: Option<PathBuf>,
}

impl DaemonArgs {
    fn flags(&self) -> Vec<(&'static str, String)> {
        let mut f = Vec::new();
        if let Some(s) = &self.socket {
            f.push(("socket", s.display().to_string()));
        }
        if let Some(s) = &self.spool_dir {
            f.push(("spool_dir", s.display().to_string()));
        }
        if let Some(s) = &self.server_url {
            f.push(("server_url", s.clone()));
        }
        if let Some(s) = &self.node_key_file {
            f.push(("node_key_file", s.display().to_string()));
        }
        f
    }
}

pub fn run(args: DaemonArgs) -> anyhow::Result<u8> {
    crate::logging::init("info");
    let loaded = Config::load(args.config.config.as_deref(), args.flags())?;
    for w in loaded.notices() {
        tracing::warn!("{w}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Chunk fsyncs run on blocking threads; a few are enough (more would wait their turn,
        // the sessions' ingest does not), and each thread costs memory.
        .max_blocking_threads(4)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        // SIGHUP's default would end the daemon at once, without letting its sessions go to
        // the next one (what SIGTERM does): what was in flight would be lost.
        let mut hup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::warn!(
                    "SIGHUP ignored: the configuration is read at start; restart the daemon to apply a change"
                );
            }
        });
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
            }
        };
        serve(loaded.config, shutdown).await
    })?;
    Ok(0)
}

/// Counters and last events shown by `status`.
#[derive(Debug, Default)]
pub struct Counters {
    pub last_upload_error: Option<String>,
    pub last_upload_error_at: Option<String>,
    /// An upload went through since the last error.
    pub last_upload_error_resolved: bool,
    pub last_upload_at: Option<String>,
    pub backend_last_answer_at: Option<String>,
    pub chunks_uploaded: u64,
    pub sessions_completed: u64,
}

/// What the backend acknowledged, for [`Shared::uploaded`].
#[derive(Debug, Clone, Copy)]
pub enum Uploaded {
    Chunk,
    Session,
}

/// What every task of the daemon shares.
pub struct Shared {
    pub config: Config,
    pub spool: spool::Spool,
    pub client: AgentClient,
    pub counters: Mutex<Counters>,
    /// Sessions with a live `shell` connection, by spool id.
    pub live: Mutex<HashMap<String, LiveSession>>,
    /// Sessions with an upload task; the flag says "look again before you stop".
    pub uploading: Mutex<HashMap<String, bool>>,
    /// Wakes the scheduler: there is new work in the spool.
    pub wake: Notify,
    /// The backend's last `config` answer: recording enabled, and when it was learned.
    pub recording_enabled: Mutex<Option<(bool, Instant)>>,
    pub upload_slots: Semaphore,
    /// Set while uploads fail; the first one that gets through again clears it and wakes the
    /// sessions waiting out their backoff (they wait for the same backend), so a spool filled
    /// during an outage starts draining at once, not up to `retry_max_secs` later.
    pub uploads_failing: AtomicBool,
    pub backend_back: Notify,
    /// Turns true when the daemon stops taking sessions.
    pub stopping: watch::Receiver<bool>,
    /// End marks the spool's disk refused (full), by spool id: the uploader writes each once
    /// the session's uploaded chunks have freed their space.
    pub unwritten_ends: Mutex<HashMap<String, spool::EndMark>>,
    /// The live sessions' output rate: uploads give way to bulk output.
    pub ingest: pacing::Ingest,
    /// Upload tasks waiting for bulk output to calm, for `status`.
    pub deferring: AtomicUsize,
    /// Open socket connections by the peer's uid (see `socket::MAX_CONNECTIONS_PER_USER`).
    pub connections: Mutex<HashMap<u32, usize>>,
    /// Bytes of frames being received, by the peer's uid (see `socket::FRAME_BUDGET`).
    pub frame_budgets: Mutex<HashMap<u32, Arc<Semaphore>>>,
    /// Sessions an orderly stop let go (this run's, and the previous run's from
    /// [`CONTINUABLE`]): spool id → (uid, unix time). A new session's `continues` must name
    /// one of its own user's, else it is dropped.
    pub continuable: Mutex<HashMap<String, (u32, i64)>>,
    /// Budgets the log lines each user's connections can cause.
    pub log_gate: loggate::LogGate,
}

/// The sessions an orderly stop let go, kept in the spool for the next run (a day at most).
const CONTINUABLE: &str = "continuable.json";

fn load_continuable(spool: &spool::Spool) -> HashMap<String, (u32, i64)> {
    let path = spool.root().join(CONTINUABLE);
    let map: HashMap<String, (u32, i64)> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    let day_ago = time::OffsetDateTime::now_utc().unix_timestamp() - 86_400;
    map.into_iter().filter(|(_, (_, t))| *t > day_ago).collect()
}

/// How many sessions upload at once: each upload holds its chunk and request body (2+ MiB),
/// which bounds the daemon's memory; four keep the bundled backend at its ingest rate.
pub const UPLOAD_CONCURRENCY: usize = 4;

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Locks a mutex, recovering the data when a task panicked while holding it.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn is_live(&self, id: &str) -> bool {
        lock(&self.live).contains_key(id)
    }

    pub fn backend_answered(&self) {
        lock(&self.counters).backend_last_answer_at = Some(now_rfc3339());
    }

    pub fn upload_error(&self, e: &str) {
        let mut c = lock(&self.counters);
        c.last_upload_error = Some(e.to_string());
        c.last_upload_error_at = Some(now_rfc3339());
        c.last_upload_error_resolved = false;
    }

    /// A chunk, or a session's `complete`, was acknowledged: an earlier error is history.
    pub fn uploaded(&self, what: Uploaded) {
        let mut c = lock(&self.counters);
        match what {
            Uploaded::Chunk => c.chunks_uploaded += 1,
            Uploaded::Session => c.sessions_completed += 1,
        }
        c.last_upload_at = Some(now_rfc3339());
        c.last_upload_error_resolved = c.last_upload_error.is_some();
    }

    pub fn status(&self) -> StatusReply {
        let usage = self.spool.usage().unwrap_or_default();
        let c = lock(&self.counters);
        let mut live: Vec<LiveSession> = lock(&self.live).values().cloned().collect();
        live.sort_by(|a, b| a.started_at.cmp(&b.started_at));
        // (An uploader may still be finishing a wait its last session's output began.)
        let deferred = self.deferring.load(Ordering::Relaxed) > 0 && !live.is_empty();
        StatusReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            server_url: self.config.server_url.clone(),
            spool_dir: self.config.spool_dir.display().to_string(),
            sessions_live: live,
            chunks_waiting: usage.chunks_waiting,
            sessions_spooled: usage.sessions,
            bytes_spooled: usage.bytes,
            session_folders_bytes: usage.footprint(None),
            spool_max_bytes: self.config.spool_max_bytes,
            sessions_failed: usage.failed,
            recording_enabled: lock(&self.recording_enabled).map(|(e, _)| e),
            last_upload_error: c.last_upload_error.clone(),
            last_upload_error_at: c.last_upload_error_at.clone(),
            last_upload_error_resolved: c.last_upload_error_resolved,
            last_upload_at: c.last_upload_at.clone(),
            backend_last_answer_at: c.backend_last_answer_at.clone(),
            chunks_uploaded: c.chunks_uploaded,
            sessions_completed: c.sessions_completed,
            uploads_deferred: deferred,
        }
    }
}

/// Runs the daemon until `shutdown` resolves: recovers the spool, listens, uploads; then
/// stops taking sessions, seals what live sessions sent, uploads for up to `drain_secs` and
/// returns.
pub async fn serve(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let server_url = config.server_url.clone().context(
        "server_url is not configured (set it in the config file or ZTNA_RECORDER_SERVER_URL)",
    )?;
    // What `config check` calls a problem stops the daemon too: a share smaller than a chunk
    // would refuse every user's session (and, under enforce, every login but root's).
    match config.share_check() {
        crate::config::ShareCheck::TooSmall(why) => anyhow::bail!(why),
        crate::config::ShareCheck::NoLimit(why) => tracing::warn!("{why}"),
        crate::config::ShareCheck::Fine => {}
    }
    let node_key = config.read_node_key().context("reading the node key")?;
    if let Some(w) = config.node_key_file_exposed() {
        tracing::warn!("{w}");
    }
    let client = AgentClient::new(&server_url, node_key)?;
    let spool = spool::Spool::open(&config.spool_dir)
        .with_context(|| format!("spool_dir {}", config.spool_dir.display()))?;
    // Held until this returns: before recovery, which would take another daemon's live
    // sessions for dead ones.
    let _spool_lock = spool
        .lock()
        .with_context(|| format!("spool_dir {}", config.spool_dir.display()))?;
    let cut = recovery::recover(&spool).context("recovering the spool")?;
    let mut continuable = load_continuable(&spool);
    // Sessions a crash cut off: their `shell`s wait for a daemon (without enforce), and the
    // rest of each is recorded as a continuation of the first part.
    for c in cut {
        continuable.entry(c.id).or_insert((c.uid, c.at));
    }

    let listener = socket::bind(&config.socket)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        config,
        spool,
        client,
        counters: Mutex::new(Counters::default()),
        live: Mutex::new(HashMap::new()),
        uploading: Mutex::new(HashMap::new()),
        wake: Notify::new(),
        recording_enabled: Mutex::new(None),
        upload_slots: Semaphore::new(UPLOAD_CONCURRENCY),
        uploads_failing: AtomicBool::new(false),
        backend_back: Notify::new(),
        stopping: stop_rx,
        unwritten_ends: Mutex::new(HashMap::new()),
        ingest: pacing::Ingest::default(),
        deferring: AtomicUsize::new(0),
        connections: Mutex::new(HashMap::new()),
        frame_budgets: Mutex::new(HashMap::new()),
        continuable: Mutex::new(continuable),
        log_gate: loggate::LogGate::default(),
    });
    tracing::info!(
        socket = %shared.config.socket.display(),
        spool = %shared.config.spool_dir.display(),
        server = %server_url,
        "daemon ready"
    );
    // Type=notify: systemd starts sshd's users on us only once the socket exists. Outside
    // systemd there is no NOTIFY_SOCKET and this does nothing.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not tell systemd we are ready");
    }

    let config_task = tokio::spawn(uploader::refresh_config_loop(shared.clone()));
    let scheduler = tokio::spawn(watcher::run(shared.clone()));
    let accept = tokio::spawn(socket::accept_loop(shared.clone(), listener));

    shutdown.await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    accept.abort();
    let _ = std::fs::remove_file(&shared.config.socket);
    config_task.abort();
    // Live connections seal their open chunk and leave; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(1);
    while !lock(&shared.live).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Upload what is closed, for a bounded time, unless the backend is not answering: what
    // waits is durable in the spool, and the next start sends it.
    shared.wake.notify_one();
    let drain = Instant::now() + Duration::from_secs(shared.config.drain_secs);
    loop {
        let busy = !lock(&shared.uploading).is_empty();
        let failing = shared.uploads_failing.load(Ordering::SeqCst);
        if !busy || failing || Instant::now() >= drain {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    scheduler.abort();
    tracing::info!("daemon stopped");
    Ok(())
}

/// Notes that an orderly stop let `id` (of `uid`) go, and keeps the list for the next run at
/// once: a stop cut short (SIGKILL soon after SIGTERM, a stop timeout) would otherwise lose it,
/// and with it the link of the session's continuation to its first recording.
pub(crate) fn let_go(shared: &Shared, id: &str, uid: u32) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut known = lock(&shared.continuable);
    if known.contains_key(id) {
        // Told first, let go later: the earlier time stands (and is already kept).
        return;
    }
    known.insert(id.to_string(), (uid, now));
    let written = serde_json::to_vec(&*known)
        .map_err(std::io::Error::other)
        .and_then(|b| spool::write_atomic(&shared.spool.root().join(CONTINUABLE), &b));
    if let Err(e) = written {
        tracing::warn!("cannot keep the list of sessions to continue: {e}");
    }
}
