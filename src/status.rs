//! `ztna-recorder status [--json]`: asks the daemon over its socket for its state (live
//! sessions, chunks waiting, bytes spooled, the last upload error, when the backend last
//! answered) and prints it.

use crate::config::{Config, ConfigArgs};
use crate::ipc::{self, Kind, StatusReply};
use anyhow::Context;
use std::io::ErrorKind;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Arguments of `ztna-recorder status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// The daemon's socket (config key `socket`).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

/// Asks the daemon listening on `socket` for its state.
pub fn query(socket: &Path) -> anyhow::Result<StatusReply> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "the daemon is not running (no answer on {})",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let f = ipc::write_frame(&mut s, Kind::StatusRequest, b"{}")
        .and_then(|()| ipc::read_frame(&mut s))
        .map_err(|e| match e {
            // A daemon that took the connection but is stopped or starved.
            ipc::FrameError::Io(e)
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                anyhow::anyhow!(
                    "the daemon on {} did not answer within 10 s (stopped or overloaded?)",
                    socket.display()
                )
            }
            e => e.into(),
        })?;
    if f.kind != Kind::StatusReply {
        anyhow::bail!("the daemon answered {:?}", f.kind);
    }
    Ok(f.parse()?)
}

pub fn run(args: StatusArgs) -> anyhow::Result<u8> {
    let mut flags = Vec::new();
    if let Some(s) = &args.socket {
        flags.push(("socket", s.display().to_string()));
    }
    let loaded = Config::load(args.config.config.as_deref(), flags)?;
    // As the daemon and `record` say them (on stderr: stdout may be JSON).
    for w in loaded.notices() {
        eprintln!("ztna-recorder: {w}");
    }
    let cfg = loaded.config;
    let st = match query(&cfg.socket) {
        Ok(st) => st,
        Err(e) => {
            if args.json {
                ztna_common::print_out(
                    serde_json::json!({"running": false, "socket": cfg.socket.display().to_string(), "error": format!("{e:#}")}),
                )?;
            } else {
                eprintln!("ztna-recorder: {e:#}");
            }
            return Ok(1);
        }
    };
    if args.json {
        let mut v = serde_json::to_value(&st)?;
        if let Some(m) = v.as_object_mut() {
            m.insert("running".into(), serde_json::Value::Bool(true));
        }
        ztna_common::print_out(v)?;
        return Ok(0);
    }
    ztna_common::print_out(text(&st)?.trim_end())?;
    Ok(0)
}

/// The daemon's state as `status` prints it without `--json`.
fn text(st: &StatusReply) -> Result<String, std::fmt::Error> {
    use std::fmt::Write as _;
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "never".into());
    let mut t = String::new();
    writeln!(
        t,
        "daemon:            running (pid {}, version {})",
        st.pid, st.version
    )?;
    writeln!(
        t,
        "backend:           {}",
        st.server_url.as_deref().unwrap_or("-")
    )?;
    writeln!(
        t,
        "recording:         {}",
        match st.recording_enabled {
            Some(true) => "enabled",
            Some(false) => "switched off for this organisation",
            None => "unknown (no answer from the backend yet)",
        }
    )?;
    // The daemon shows others only their own sessions.
    let whose = if nix::unistd::getuid().is_root() {
        ""
    } else {
        " (yours; root sees everyone's)"
    };
    writeln!(t, "sessions live:     {}{whose}", st.sessions_live.len())?;
    for s in &st.sessions_live {
        writeln!(
            t,
            "  {}  {} (uid {})  {}  since {}",
            s.session, s.user, s.uid, s.kind, s.started_at
        )?;
    }
    writeln!(t, "sessions spooled:  {}", st.sessions_spooled)?;
    writeln!(t, "chunks waiting:    {}", st.chunks_waiting)?;
    writeln!(
        t,
        "bytes spooled:     {} (+ {} counted for the session folders) of {}",
        st.bytes_spooled, st.session_folders_bytes, st.spool_max_bytes
    )?;
    writeln!(t, "sessions failed:   {}", st.sessions_failed)?;
    writeln!(t, "chunks uploaded:   {}", st.chunks_uploaded)?;
    if st.uploads_deferred {
        writeln!(
            t,
            "uploads:           waiting for the live sessions' bulk output to calm"
        )?;
    }
    writeln!(t, "backend answered:  {}", opt(&st.backend_last_answer_at))?;
    writeln!(t, "last upload:       {}", opt(&st.last_upload_at))?;
    match &st.last_upload_error {
        Some(e) => writeln!(
            t,
            "last upload error: {} ({}{})",
            e,
            st.last_upload_error_at.as_deref().unwrap_or("?"),
            if st.last_upload_error_resolved {
                "; uploads have gone through since"
            } else {
                ""
            }
        )?,
        None => writeln!(t, "last upload error: none")?,
    }
    Ok(t)
}
