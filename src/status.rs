//! `ztna-recorder status [--json]`: asks the daemon over its socket for its state (live
//! sessions, chunks waiting, bytes spooled, the last upload error, when the backend last
//! answered) and prints it.

use crate::config::{Config, ConfigArgs};
use crate::ipc::{self, Kind, StatusReply};
use anyhow::Context;
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
    ipc::write_frame(&mut s, Kind::StatusRequest, b"{}")?;
    let f = ipc::read_frame(&mut s)?;
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
    let cfg = Config::load(args.config.config.as_deref(), flags)?.config;
    let st = match query(&cfg.socket) {
        Ok(st) => st,
        Err(e) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"running": false, "socket": cfg.socket.display().to_string(), "error": format!("{e:#}")})
                );
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
        println!("{v}");
        return Ok(0);
    }
    let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "never".into());
    println!(
        "daemon:            running (pid {}, version {})",
        st.pid, st.version
    );
    println!(
        "backend:           {}",
        st.server_url.as_deref().unwrap_or("-")
    );
    println!(
        "recording:         {}",
        match st.recording_enabled {
            Some(true) => "enabled",
            Some(false) => "switched off for this organisation",
            None => "unknown (no answer from the backend yet)",
        }
    );
    println!("sessions live:     {}", st.sessions_live.len());
    for s in &st.sessions_live {
        println!(
            "  {}  {} (uid {})  {}  since {}",
            s.session, s.user, s.uid, s.kind, s.started_at
        );
    }
    println!("sessions spooled:  {}", st.sessions_spooled);
    println!("chunks waiting:    {}", st.chunks_waiting);
    println!(
        "bytes spooled:     {} of {}",
        st.bytes_spooled, st.spool_max_bytes
    );
    println!("sessions failed:   {}", st.sessions_failed);
    println!("chunks uploaded:   {}", st.chunks_uploaded);
    if st.uploads_deferred {
        println!("uploads:           waiting for the live sessions' bulk output to calm");
    }
    println!("backend answered:  {}", opt(&st.backend_last_answer_at));
    match &st.last_upload_error {
        Some(e) => println!(
            "last upload error: {} ({})",
            e,
            st.last_upload_error_at.as_deref().unwrap_or("?")
        ),
        None => println!("last upload error: none"),
    }
    Ok(0)
}
