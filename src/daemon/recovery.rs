//! Recovery on start: sessions an earlier run left behind. Every `.part` is sealed (a torn
//! last line dropped) and a session without an end mark (its recorder died: no live
//! connection can exist before the socket is bound) gets one with `interrupted: true`, so the
//! uploader completes it with what it holds. One session's trouble (a damaged file, a folder
//! that cannot be read) never stops the daemon from starting.

use super::spool::{damaged, EndMark, Spool};

/// A session an earlier run was cut from: its user's `shell` may still be running, waiting
/// to give the rest of it to this run (see [`super::let_go`]).
pub struct Cut {
    pub id: String,
    pub uid: u32,
    /// When the spool last heard of it (unix seconds).
    pub at: i64,
}

/// Returns the sessions that were marked interrupted.
pub fn recover(spool: &Spool) -> std::io::Result<Vec<Cut>> {
    let mut interrupted = Vec::new();
    // Half-created sessions (a crash between mkdir and rename) hold no events.
    if let Ok(rd) = std::fs::read_dir(spool.sessions_dir()) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".new-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    for id in spool.list_sessions()? {
        let dir = spool.session(&id);
        // Before sealing, which writes.
        let heard = last_write(&dir.path);
        let recovered = (|| {
            dir.seal_parts()?;
            let end = match dir.end() {
                Err(e) if damaged(&e) => {
                    tracing::error!(session = %id, "end.json damaged ({e}): the session is completed as interrupted");
                    None
                }
                r => r?,
            };
            if end.is_none() {
                let mut mark = EndMark::interrupted();
                // Its end was not seen: the last the spool heard of it is the best guess (the
                // backend would otherwise take now, which may be hours after the crash).
                let at = heard
                    .as_deref()
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .map_or_else(
                        || time::OffsetDateTime::now_utc().unix_timestamp(),
                        time::OffsetDateTime::unix_timestamp,
                    );
                mark.ended_at = heard;
                dir.set_end(&mark)?;
                let uid = dir.start_info().ok().and_then(|(_, m)| {
                    m.get("uid")
                        .and_then(serde_json::Value::as_u64)
                        .and_then(|u| u32::try_from(u).ok())
                });
                if let Some(uid) = uid {
                    interrupted.push(Cut {
                        id: id.clone(),
                        uid,
                        at,
                    });
                }
                tracing::warn!(session = %id, "session left by an earlier run: completing it as interrupted");
            }
            std::io::Result::Ok(())
        })();
        if let Err(e) = recovered {
            // The uploader tries it again (and says why) while everything else goes on.
            tracing::error!(session = %id, "recovering the session: {e}");
        }
    }
    Ok(interrupted)
}

/// When anything in a session's folder last changed (a chunk written, or one removed after its
/// upload), as RFC 3339.
fn last_write(dir: &std::path::Path) -> Option<String> {
    let mut last = std::fs::metadata(dir).and_then(|m| m.modified()).ok()?;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        if let Ok(t) = e.metadata().and_then(|m| m.modified()) {
            last = last.max(t);
        }
    }
    time::OffsetDateTime::from(last)
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}
