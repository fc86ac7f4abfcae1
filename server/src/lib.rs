//! `ztna-recorder-server`: the bundled session-recording backend, as a library so that tests
//! (this crate's and the agent's) can run it in-process.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use ztna_recorder_server::{App, Config, Role};
//! let dir = tempfile::tempdir()?;                       // SQLite + local files in here
//! let app = App::open(Config::with_data_dir(dir.path())).await?;
//! let org = app.create_org("acme", true).await?;        // feature session_recording on
//! let admin = app.create_user(org, "a@acme.test", Role::Admin).await?;
//! let token = app.issue_token(admin, 3600).await?;      // Bearer token for the JWT route
//! let (machine, node_key) = app.register_machine(org, "Linux-C", admin).await?;
//! app.update_settings(org, ztna_recorder_server::SettingsUpdate {
//!     recording_enabled: Some(true), ..Default::default() }).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let base = format!("http://{}", listener.local_addr()?);
//! let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! let server = tokio::spawn(ztna_recorder_server::serve(listener, app.clone(), async {
//!     let _ = stopped.await;
//! }));
//! // … POST {base}/api/session-recording and {base}/api/session-recording-agent …
//! let _ = stop.send(());
//! server.await??;
//! # let _ = (machine, node_key, token, base); Ok(()) }
//! ```
//!
//! For PostgreSQL + S3 set `config.database_url = Some("postgres://…")`,
//! `config.store_url = Some("s3://BUCKET")` and `config.s3`.
//!
//! Entry points (the `admin` commands call the same functions):
//!
//! | call | what |
//! |---|---|
//! | [`App::open`] | opens/creates data dir, database (migrated), object store, JWT secret |
//! | [`serve`] | the HTTP API on a listener until a shutdown future completes; runs the sweep |
//! | [`App::create_org`] | an org with default settings, feature flag on or off |
//! | [`App::set_feature`] | switch `session_recording` on or off |
//! | [`App::create_user`] | a user (reused by email) made admin or member of an org |
//! | [`App::issue_token`] | an HS256 JWT for a user |
//! | [`App::register_machine`] | a machine of an org owned by a member: `(machine_id, node_key)` |
//! | [`App::seed`] | all of the above at once: an org, its admin and token, one machine |
//! | [`App::delete_machine`] | delete a machine (its recordings stay, `machine_id` null) |
//! | [`App::settings`], [`App::update_settings`] | an org's recording settings |
//! | [`App::sweep`] | one retention sweep over every org now |
#![forbid(unsafe_code)]

mod api;
mod app;
mod auth;
pub mod config;
mod meta;
mod metrics;
mod objects;
mod timefmt;
mod web;

use std::future::Future;

pub use app::{AdminError, App, OpenError, Seed, FEATURE_SESSION_RECORDING};
pub use auth::node_key_hash;
pub use config::{Config, S3Config};
pub use meta::{MachineEntry, MemberEntry, OrgEntry, Role, Settings, SettingsUpdate};

/// Serves the API on `listener` until `shutdown` completes, then finishes the requests in
/// flight and returns. Also runs the retention sweep every `config.sweep_interval`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let sweeper = {
        let app = app.clone();
        let period = app
            .inner
            .sweep_interval
            .max(std::time::Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let swept = app.sweep().await;
                        app.inner.metrics.sweep(swept.as_ref().map(|n| *n).map_err(|_| ()));
                        match swept {
                            Ok(0) => tracing::debug!("retention sweep: nothing to delete"),
                            Ok(n) => tracing::info!(deleted = n, "retention sweep"),
                            Err(e) => tracing::error!(error = %e, "retention sweep failed; the next one retries"),
                        }
                    }
                    _ = stop_rx.changed() => break,
                }
            }
        })
    };
    let idle = app.inner.request_idle_timeout;
    let router = api::router(app.clone())
        .merge(metrics::router(app.clone()))
        .merge(web::router(app));
    accept_loop(listener, router, idle, shutdown).await;
    let _ = stop_tx.send(true);
    let _ = sweeper.await;
    Ok(())
}

/// Serves `router` on each connection `listener` accepts until `shutdown` completes, then lets
/// the connections finish what they are answering and returns. As `axum::serve` does, with
/// hyper's header read timeout on (it needs a timer, which axum does not give it): a
/// connection that takes longer than `header_timeout` to send a request's head (its line
/// and headers), from its start or the previous response, is closed. One that sends half a
/// line would otherwise hold a socket for ever (bodies are timed in `api`).
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    header_timeout: std::time::Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    // Every connection task holds a receiver: when the last is dropped, all have finished.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: what axum::serve does, wait and go on.
                    tracing::error!("accepting a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            // hyper's timer starts with a request's first byte: a connection that sends none
            // at all is timed here.
            let mut first = [0u8; 1];
            tokio::select! {
                r = tokio::time::timeout(header_timeout, stream.peek(&mut first)) => match r {
                    Ok(Ok(n)) if n > 0 => {}
                    // Silent past the timeout, closed, or broken: nothing to serve.
                    _ => return,
                },
                // Stopping: a connection that has asked nothing yet is not waited for.
                _ = stop.wait_for(|s| *s) => return,
            }
            // HTTP/1 only: hyper has no header timeout for HTTP/2, where a client that sent
            // the preface and nothing more held its connection for ever (and browsers speak
            // HTTP/2 only over TLS, which a proxy in front of us ends).
            let mut builder = Builder::new(TokioExecutor::new()).http1_only();
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("connection: {e}");
                    }
                    return;
                }
                _ = stop.wait_for(|s| *s) => {}
            }
            conn.as_mut().graceful_shutdown();
            if let Err(e) = conn.await {
                tracing::debug!("connection: {e}");
            }
            drop(stop);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(stop_rx);
    // A client that reads nothing (a cast it never takes) or trickles a body would hold the
    // stop for ever: past this, what is left is dropped (nothing unanswered was acknowledged)
    // well within systemd's 30 s.
    if tokio::time::timeout(SHUTDOWN_GRACE, stop_tx.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            "shutting down: connections still open after {} s are dropped",
            SHUTDOWN_GRACE.as_secs()
        );
    }
}

/// How long a stop waits for requests in flight.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(20);
