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
    let result = axum::serve(
        listener,
        api::router(app.clone())
            .merge(metrics::router(app.clone()))
            .merge(web::router(app)),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await;
    let _ = sweeper.await;
    result
}
