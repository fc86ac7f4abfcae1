//! Finds work in the spool: a `notify` watch on `sessions/` wakes the scheduler at once, and
//! a periodic rescan catches whatever an event missed (or a watch that could not be set up).
//! The scheduler starts one upload task per session that has none.
//!
//! The watch is on `sessions/` itself, not recursive: chunks are closed by this daemon, which
//! wakes the scheduler directly (`Shared::wake`), while a recursive watch would have the kernel
//! queue an event for every write into every open chunk (measured: about 7% of the daemon's
//! CPU while a session streams, plus the watcher thread's own reads).

use super::{lock, uploader, Shared};
use notify::{RecursiveMode, Watcher};
use std::sync::Arc;
use std::time::Duration;

pub async fn run(shared: Arc<Shared>) {
    let wake = Arc::new(tokio::sync::Notify::new());
    let w2 = wake.clone();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Only what means new work: a session folder appearing (renamed into place).
        if let Ok(ev) = res {
            if matches!(
                ev.kind,
                notify::EventKind::Create(_)
                    | notify::EventKind::Modify(notify::event::ModifyKind::Name(_))
            ) {
                w2.notify_one();
            }
        }
    });
    let _watcher = match watcher {
        Ok(mut w) => match w.watch(&shared.spool.sessions_dir(), RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "cannot watch the spool ({e}): rescanning every {} s only",
                    shared.config.rescan_secs
                );
                None
            }
        },
        Err(e) => {
            tracing::warn!(
                "no filesystem watcher ({e}): rescanning every {} s only",
                shared.config.rescan_secs
            );
            None
        }
    };
    let every = Duration::from_secs(shared.config.rescan_secs);
    loop {
        scan(&shared);
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = wake.notified() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Starts an upload task for every spooled session without one, and tells running tasks to
/// look again.
pub fn scan(shared: &Arc<Shared>) {
    let ids = match shared.spool.list_sessions() {
        Ok(ids) => ids,
        Err(e) => {
            tracing::error!("listing the spool: {e}");
            return;
        }
    };
    let mut up = lock(&shared.uploading);
    for id in ids {
        if let Some(dirty) = up.get_mut(&id) {
            *dirty = true;
            continue;
        }
        up.insert(id.clone(), false);
        tokio::spawn(uploader::run_session(shared.clone(), id));
    }
}
