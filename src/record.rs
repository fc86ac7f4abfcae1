//! `ztna-recorder record`: records a command (default: the user's shell) in a new PTY to an
//! asciicast v2 file, and optionally to a directory of chunks as the daemon spools them.

use crate::recorder::{
    ChunkLimits, ChunkSink, ChunkWriter, Command, FileSink, Session, SessionConfig, Sink, TtySize,
};
use anyhow::Context as _;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Arguments of `ztna-recorder record`.
#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    /// The command to record, run with `sh -c` [default: your shell, $SHELL].
    #[arg(short = 'c', long = "command", value_name = "CMD")]
    pub command: Option<std::ffi::OsString>,

    /// Where to write the recording [default: ztna-<unix time>.cast in the current directory].
    #[arg(value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Replace FILE if it exists (otherwise an existing FILE is kept and nothing is run).
    #[arg(long)]
    pub overwrite: bool,

    /// Print nothing of our own (the command's output still shows).
    #[arg(short = 'q', long)]
    pub quiet: bool,

    /// Terminal columns [default: the terminal's, else 80].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub cols: Option<u16>,

    /// Terminal rows [default: the terminal's, else 24].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub rows: Option<u16>,

    /// Also record what is typed (`i` events) [default: `capture_input` of the agent's
    /// configuration, false].
    #[arg(short = 'I', long, overrides_with = "no_capture_input")]
    pub capture_input: bool,

    /// Do not record what is typed, whatever the agent's configuration says.
    #[arg(long, overrides_with = "capture_input")]
    pub no_capture_input: bool,

    /// The recording's title.
    #[arg(short = 't', long)]
    pub title: Option<String>,

    /// Also write the recording as chunks (header.json, chunk-N.cast) into DIR.
    #[arg(long, value_name = "DIR")]
    pub chunk_dir: Option<PathBuf>,

    /// With --chunk-dir: close a chunk at this many bytes [default: the agent's
    /// configuration, 1048576].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), requires = "chunk_dir")]
    pub chunk_max_bytes: Option<u64>,

    /// With --chunk-dir: close a chunk this many seconds after its first event [default: the
    /// agent's configuration, 10].
    #[arg(long, value_parser = positive_secs, requires = "chunk_dir")]
    pub chunk_max_secs: Option<f64>,

    /// Also ship the recording to the backend (`server_url` and the node key from the agent's
    /// configuration).
    #[arg(long)]
    pub upload: bool,

    #[command(flatten)]
    pub config: crate::config::ConfigArgs,
}

/// Records without uploading (`ztna-recorder` routes `--upload` to the companion binary, which
/// runs [`run_and_upload`]).
pub fn run(args: RecordArgs) -> anyhow::Result<u8> {
    if args.upload {
        anyhow::bail!("--upload is handled by ztna-recorderd");
    }
    let config = load_config(&args)?;
    Ok(match record(&args, &config)? {
        Ok((_, outcome)) => outcome.status.code(),
        Err(not_started) => not_started,
    })
}

/// The agent's configuration (defaults, file, `ZTNA_RECORDER_*`), `--[no-]capture-input` on
/// top: `record` follows `capture_input` as `shell` does. A local recording needs nothing else
/// from it, so a system configuration this user cannot use does not stop one; `--upload`
/// needs it, and a file named with `--config` must load either way.
fn load_config(args: &RecordArgs) -> anyhow::Result<crate::config::Config> {
    // clap keeps only the last of the two flags.
    let flags = match (args.capture_input, args.no_capture_input) {
        (true, _) => vec![("capture_input", "true".to_string())],
        (_, true) => vec![("capture_input", "false".to_string())],
        _ => Vec::new(),
    };
    let loaded = match crate::config::Config::load(args.config.config.as_deref(), flags.clone()) {
        Ok(l) => l,
        Err(e) if !args.upload && args.config.config.is_none() => {
            // The system's file may be one this user cannot use; the environment
            // (`ZTNA_RECORDER_*`) and the flags are the user's own, and a bad value there is
            // an error, not silently dropped with the rest.
            let own = crate::config::Config::load_from(crate::config::Sources {
                file: Some(PathBuf::from("/dev/null")),
                env: crate::config::our_env()?,
                flags,
            })?;
            if !args.quiet {
                eprintln!("ztna-recorder: ignoring the agent configuration file: {e:#}");
            }
            return Ok(own.config);
        }
        Err(e) => return Err(e),
    };
    if !args.quiet {
        for w in loaded.notices() {
            eprintln!("ztna-recorder: {w}");
        }
    }
    Ok(loaded.config)
}

/// When a recording began and ended (wall clock).
#[derive(Clone, Copy)]
struct Span {
    began: time::OffsetDateTime,
    ended: time::OffsetDateTime,
}

/// Records, then with `--upload` ships the recording to the backend.
pub fn run_and_upload(args: RecordArgs) -> anyhow::Result<u8> {
    let config = load_config(&args)?;
    // With --upload, a missing server or key is an error before anything runs.
    let uploader = if args.upload {
        Some(Uploader::from_config(&config)?)
    } else {
        None
    };
    let began = time::OffsetDateTime::now_utc();
    let (file, outcome) = match record(&args, &config)? {
        Ok(done) => done,
        Err(not_started) => return Ok(not_started),
    };
    // When it happened, not when it was uploaded: the backend lists and ages it by these.
    let when = Span {
        began,
        ended: time::OffsetDateTime::now_utc(),
    };
    if let Some(up) = uploader {
        // The command's exit status stays ours whatever the upload does (the contract); a
        // failed upload is said on stderr, and the file is there to send again.
        match up.upload(&file, &args, &outcome, when) {
            Ok(session) if !args.quiet => eprintln!("ztna-recorder: uploaded as session {session}"),
            Ok(_) => {}
            Err(e) => eprintln!(
                "ztna-recorder: cannot upload {} (the file is kept): {e:#}",
                file.display()
            ),
        }
    }
    Ok(outcome.status.code())
}

/// Sends a request again, with capped full-jitter backoff, while the backend is unreachable
/// or busy (its retryable answers), for at most `patience`.
async fn patiently<T, F, Fut>(
    patience: Duration,
    mut call: F,
) -> Result<T, crate::client::ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::client::ClientError>>,
{
    let t0 = std::time::Instant::now();
    let mut attempt = 0;
    loop {
        match call().await {
            Err(e) if e.is_retryable() && t0.elapsed() < patience => {
                tracing::warn!("upload: {e}; trying again");
                let wait = crate::daemon::uploader::backoff(attempt, Duration::from_secs(5));
                attempt += 1;
                tokio::time::sleep(wait).await;
            }
            r => return r,
        }
    }
}

/// CMD as the recording shows it.
fn command_text(args: &RecordArgs) -> Option<String> {
    args.command
        .as_ref()
        .map(|c| c.to_string_lossy().into_owned())
}

fn positive_secs(s: &str) -> Result<f64, String> {
    let max = crate::config::MAX_SECS as f64;
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 && x <= max => Ok(x),
        Ok(x) if x > max => Err(format!("{s:?} is more than {max} seconds (ten years)")),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

/// Records to FILE (and `--chunk-dir`). `Err(status)` when the command could not be started
/// (a shell's exit status for it, 127 or 126): the error is said, and no recording is left
/// behind.
fn record(
    args: &RecordArgs,
    agent: &crate::config::Config,
) -> anyhow::Result<Result<(PathBuf, crate::recorder::Outcome), u8>> {
    let command = match &args.command {
        Some(cmd) => Command::shell_command("/bin/sh", cmd),
        None => Command::new(crate::recorder::user_shell()),
    };
    // Nothing is created, or replaced under --overwrite, for a program that cannot start.
    if let Err(e @ crate::recorder::Error::Spawn { status, .. }) = command.preflight() {
        eprintln!("ztna-recorder: {e}");
        return Ok(Err(status));
    }
    if let (Some(file), Some(dir)) = (&args.file, &args.chunk_dir) {
        if file_in_chunk_dir(file, dir) {
            anyhow::bail!(
                "{} is a name of --chunk-dir's own files (header.json, chunk-N.cast): \
                 name FILE otherwise",
                file.display()
            );
        }
    }
    // FILE is checked before the chunk directory is touched, and created after it: when
    // either cannot be used, neither an earlier recording nor a new empty one is left changed.
    check_file(args)?;
    let chunks = match &args.chunk_dir {
        Some(dir) => {
            clear_chunk_dir(dir, args.overwrite)?;
            let limits = ChunkLimits {
                max_bytes: args.chunk_max_bytes.unwrap_or(agent.chunk_max_bytes),
                max_age: match args.chunk_max_secs {
                    Some(secs) => Duration::from_secs_f64(secs),
                    None => Duration::from_secs(agent.chunk_max_secs),
                },
            };
            let writer = ChunkWriter::new(dir, limits)
                .with_context(|| format!("cannot use chunk directory {}", dir.display()))?;
            Some(ChunkSink::new(writer))
        }
        None => None,
    };
    let (file, file_sink) = create_file(args)?;
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(file_sink)];
    if let Some(c) = chunks {
        sinks.push(Box::new(c));
    }

    let mut config = SessionConfig::new(command);
    // The recording's text is UTF-8: bytes that are not become U+FFFD there (the program still
    // gets them as given), as for output.
    config.header_command = command_text(args);
    config.title = args.title.clone();
    config.capture_input = agent.capture_input;
    config.size = match (args.cols, args.rows) {
        (None, None) => None,
        (cols, rows) => {
            // As for the whole size: the terminal on stdin, else on stdout.
            let term = crate::recorder::terminal_size(std::io::stdin())
                .or_else(|| crate::recorder::terminal_size(std::io::stdout()))
                .unwrap_or_default();
            Some(TtySize {
                cols: cols.unwrap_or(term.cols),
                rows: rows.unwrap_or(term.rows),
            })
        }
    };

    if !args.quiet {
        eprintln!(
            "ztna-recorder: recording to {}; exit the command to finish",
            file.display()
        );
    }
    // A recording that cannot even begin (a full disk, FILE being /dev/full) runs nothing: the
    // user asked for a recording, and would otherwise learn only at the end there is none.
    // Failures later leave the program running, and are reported at the end.
    config.sink_policy = crate::recorder::SinkPolicy::RefuseAtStart;
    let outcome = match Session::new(config).run(sinks) {
        Ok(o) => o,
        Err(e) => {
            // Nothing ran: no recording of nothing is left in the way of the next attempt.
            // Only a file: FILE may be a device (`/dev/null` under --overwrite).
            if std::fs::symlink_metadata(&file).is_ok_and(|m| m.is_file()) {
                let _ = std::fs::remove_file(&file);
            }
            if let Some(dir) = &args.chunk_dir {
                let _ = clear_chunk_dir(dir, true);
            }
            return match e {
                crate::recorder::Error::Spawn { status, .. } => {
                    eprintln!("ztna-recorder: {e}");
                    Ok(Err(status))
                }
                crate::recorder::Error::SinkStart(f) => Err(anyhow::anyhow!(
                    "cannot write the recording ({}: {}): the command was not run",
                    f.sink,
                    f.error
                )),
                e => Err(e.into()),
            };
        }
    };
    for failure in &outcome.sink_failures {
        eprintln!("ztna-recorder: recording incomplete: {failure}");
    }
    if !args.quiet {
        eprintln!("ztna-recorder: recording finished: {}", file.display());
    }
    Ok(Ok((file, outcome)))
}

/// Creates FILE, or with no FILE given a new `ztna-SECONDS.cast` in the working directory
/// (`-N` added while one of that name exists: two recordings started in the same second must
/// not collide).
fn create_file(args: &RecordArgs) -> anyhow::Result<(PathBuf, FileSink)> {
    // Like `script` and asciinema: written through to the kernel, not fsynced (that would
    // cost milliseconds per recording); the daemon's chunks are fsynced.
    if let Some(file) = &args.file {
        return match FileSink::create(file, args.overwrite) {
            Ok(s) => Ok((file.clone(), s.durable(false))),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => anyhow::bail!(
                "{} already exists; pass --overwrite to replace it",
                file.display()
            ),
            Err(e) => Err(e).with_context(|| format!("cannot create {}", file.display())),
        };
    }
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    for n in 1..1000 {
        let file = PathBuf::from(match n {
            1 => format!("ztna-{ts}.cast"),
            n => format!("ztna-{ts}-{n}.cast"),
        });
        match FileSink::create(&file, false) {
            Ok(s) => return Ok((file, s.durable(false))),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", file.display())),
        }
    }
    anyhow::bail!("cannot find a free name for the recording: name one (FILE)")
}

/// What can be told wrong with FILE before anything is created or removed: it exists
/// (without --overwrite), or its folder cannot take it.
fn check_file(args: &RecordArgs) -> anyhow::Result<()> {
    let Some(file) = &args.file else {
        return Ok(());
    };
    if !args.overwrite && std::fs::symlink_metadata(file).is_ok() {
        anyhow::bail!(
            "{} already exists; pass --overwrite to replace it",
            file.display()
        );
    }
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // A folder that --chunk-dir will make (FILE inside it, or beside it in a new parent).
    let made = |dir: &PathBuf| {
        let abs = |p: &Path| std::path::absolute(p).ok();
        abs(dir)
            .zip(abs(parent))
            .is_some_and(|(d, p)| d.starts_with(p))
    };
    if !parent.exists() && args.chunk_dir.as_ref().is_some_and(made) {
        return Ok(());
    }
    let usable = std::fs::metadata(parent).and_then(|m| {
        if m.is_dir() {
            let rw = nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK;
            nix::unistd::access(parent, rw).map_err(std::io::Error::from)
        } else {
            Err(std::io::Error::from_raw_os_error(nix::libc::ENOTDIR))
        }
    });
    usable.with_context(|| format!("cannot create {}", file.display()))
}

/// A name the chunk writer uses (or used) in its directory.
fn chunk_dir_name(name: &str) -> bool {
    name.starts_with(crate::recorder::CHUNK_HEADER_FILE)
        || (name.starts_with("chunk-") && (name.ends_with(".cast") || name.ends_with(".part")))
}

/// FILE named as one of the chunk directory's own files: both would write it at once.
fn file_in_chunk_dir(file: &Path, dir: &Path) -> bool {
    let name = file.file_name().map(|n| n.to_string_lossy());
    if !name.is_some_and(|n| chunk_dir_name(&n)) {
        return false;
    }
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // Resolved when both exist (a symlink, `..`), else as written: the chunk directory is
    // created before FILE.
    match (parent.canonicalize(), dir.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => std::path::absolute(parent).ok() == std::path::absolute(dir).ok(),
    }
}

/// A chunk directory holding an earlier recording's header or chunks: an error, unless
/// `overwrite`, which removes them (leftover chunks would join the new recording's).
fn clear_chunk_dir(dir: &std::path::Path, overwrite: bool) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot use chunk directory {}", dir.display()))
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !chunk_dir_name(&name.to_string_lossy()) {
            continue;
        }
        if !overwrite {
            anyhow::bail!(
                "chunk directory {} already holds a recording; pass --overwrite to replace it",
                dir.display()
            );
        }
        std::fs::remove_file(entry.path())
            .with_context(|| format!("cannot remove {}", entry.path().display()))?;
    }
    Ok(())
}

/// `--upload`: the finished recording goes to the backend's agent route as one session:
/// `start` with its header, its event lines in chunks, `complete`.
struct Uploader {
    client: crate::client::AgentClient,
    chunk_max_bytes: usize,
    /// How long one request is sent again while the backend is away (`upload_patience_secs`).
    patience: Duration,
}

impl Uploader {
    fn from_config(config: &crate::config::Config) -> anyhow::Result<Self> {
        let url = config
            .server_url
            .clone()
            .context("--upload needs `server_url` in the agent configuration")?;
        let key = config
            .read_node_key()
            .context("--upload needs the node key")?;
        let max = ztna_common::api::MAX_CHUNK_BYTES as u64;
        Ok(Uploader {
            client: crate::client::AgentClient::new(&url, key)?,
            chunk_max_bytes: config.chunk_max_bytes.clamp(1, max) as usize,
            patience: Duration::from_secs(config.upload_patience_secs),
        })
    }

    fn upload(
        &self,
        file: &std::path::Path,
        args: &RecordArgs,
        outcome: &crate::recorder::Outcome,
        when: Span,
    ) -> anyhow::Result<String> {
        let rfc3339 = |t: time::OffsetDateTime| {
            t.format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default()
        };
        let (began, ended) = (rfc3339(when.began), rfc3339(when.ended));
        // Read a line at a time and sent a chunk at a time: the process holds one chunk, not
        // the recording (which may be gigabytes).
        use std::io::BufRead as _;
        let mut lines = std::io::BufReader::new(std::fs::File::open(file)?);
        let mut first = String::new();
        lines.read_line(&mut first)?;
        let header: serde_json::Value = serde_json::from_str(first.trim_end())
            .with_context(|| format!("{}: the header line", file.display()))?;
        ztna_common::asciicast::check_header(&header)
            .map_err(|e| anyhow::anyhow!("{}: the header line: {e}", file.display()))?;
        // The same metadata as an SSH session's (user, uid, hostname, tty…), so the backend
        // lists a manual recording like any other.
        let kind = match args.command {
            Some(_) => crate::shell::SessionKind::Exec,
            None => crate::shell::SessionKind::Interactive,
        };
        let tty = crate::recorder::stdin_is_tty();
        let command = command_text(args);
        let mut metadata = crate::shell::session_metadata(kind, command.as_deref(), tty);
        metadata.insert("recorded_by".into(), "ztna-recorder record".into());
        let metadata = serde_json::Value::Object(metadata);
        let done = serde_json::json!({"exit_status": outcome.status.code()});
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = &self.client;
        // Every request may be sent again (a start by this id, a chunk by its index), so a
        // backend that is briefly away or busy costs a wait, not the upload.
        let local_id = uuid::Uuid::new_v4().to_string();
        rt.block_on(async {
            let started = patiently(self.patience, || {
                client.start("record", &header, &metadata, Some(&began), Some(&local_id))
            })
            .await?;
            let session = started.session_id;
            let (mut chunk, mut index, mut events) = (String::new(), 0u64, 0u64);
            let mut last_time: Option<f64> = None;
            let (mut line, mut pieces) = (String::new(), Vec::new());
            let mut number = 1;
            loop {
                line.clear();
                number += 1;
                if lines.read_line(&mut line)? == 0 {
                    break;
                }
                let text = line.trim_end_matches(['\n', '\r']);
                if text.trim().is_empty() {
                    continue;
                }
                let ev = ztna_common::asciicast::parse_event_line(text, number)
                    .with_context(|| format!("{}: line {number}", file.display()))?;
                if last_time.is_some_and(|t| ev.time < t) {
                    anyhow::bail!("{}: line {number} goes back in time", file.display());
                }
                last_time = Some(ev.time);
                // A line over the limit goes as several events of its time, each in bounds.
                pieces.clear();
                let whole = format!("{text}\n");
                if !ztna_common::asciicast::split_event_line(
                    &whole,
                    self.chunk_max_bytes,
                    &mut pieces,
                ) {
                    pieces.extend_from_slice(whole.as_bytes());
                }
                // The encoder's own output: valid UTF-8.
                for piece in std::str::from_utf8(&pieces)?.split_inclusive('\n') {
                    events += 1;
                    if !chunk.is_empty() && chunk.len() + piece.len() > self.chunk_max_bytes {
                        patiently(self.patience, || {
                            client.post_chunk(client.chunk_body(&session, index, &chunk))
                        })
                        .await?;
                        index += 1;
                        chunk.clear();
                    }
                    chunk.push_str(piece);
                }
            }
            if !chunk.is_empty() {
                patiently(self.patience, || {
                    client.post_chunk(client.chunk_body(&session, index, &chunk))
                })
                .await?;
            }
            let duration = ztna_common::asciicast::duration_secs(last_time);
            let completed = patiently(self.patience, || {
                client.complete(&session, Some(duration), Some(events), &done, Some(&ended))
            })
            .await;
            match completed {
                // Sent again after an answer was lost: the first one got through.
                Err(e) if e.code() == Some(ztna_common::api::ErrorCode::Conflict) => {}
                r => {
                    r?;
                }
            }
            Ok::<_, anyhow::Error>(session)
        })
    }
}
