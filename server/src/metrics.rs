//! Operational figures: `GET /metrics` in the Prometheus text format (requests by route,
//! action and status; chunk bytes stored; retention sweep runs, failures and deletions) and
//! `GET /healthz` (the metadata store answers). Counters live in the process: each `serve`
//! process reports its own, which is what Prometheus expects from several replicas.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::app::App;

/// The actions a request can be counted under; anything else is `other`, so that a client
/// cannot grow the label set (and the server's memory) by sending made-up actions.
const KNOWN_ACTIONS: &[&str] = &[
    "get_settings",
    "update_settings",
    "start",
    "upload_chunk",
    "complete",
    "get",
    "list",
    "delete",
    "cleanup",
    "report",
    "config",
];

#[derive(Debug, Default)]
pub struct Metrics {
    /// (route, action, HTTP status) -> requests answered.
    requests: Mutex<BTreeMap<(&'static str, &'static str, u16), u64>>,
    chunks_stored: AtomicU64,
    chunk_bytes_stored: AtomicU64,
    sweep_runs: AtomicU64,
    sweep_failures: AtomicU64,
    sweep_deleted: AtomicU64,
}

impl Metrics {
    /// Counts one answered API request. `action` is the body's `action` as sent (None when
    /// absent or the body did not parse).
    pub fn request(&self, route: &'static str, action: Option<&str>, status: u16) {
        let action = match action {
            None => "none",
            Some(a) => KNOWN_ACTIONS
                .iter()
                .copied()
                .find(|k| *k == a)
                .unwrap_or("other"),
        };
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route, action, status)).or_insert(0) += 1;
    }

    /// Counts one chunk object written (a replaced chunk counts again).
    pub fn chunk_stored(&self, bytes: u64) {
        self.chunks_stored.fetch_add(1, Ordering::Relaxed);
        self.chunk_bytes_stored.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts one retention sweep over every org: `Ok(deleted)` or a failure.
    pub fn sweep(&self, result: Result<u64, ()>) {
        self.sweep_runs.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(n) => {
                self.sweep_deleted.fetch_add(n, Ordering::Relaxed);
            }
            Err(()) => {
                self.sweep_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP ztna_http_requests_total API requests answered, by route, action and HTTP status.\n");
        out.push_str("# TYPE ztna_http_requests_total counter\n");
        {
            let m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            for ((route, action, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "ztna_http_requests_total{{route=\"{route}\",action=\"{action}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let counters = [
            (
                "ztna_chunks_stored_total",
                "Chunk objects stored (upload_chunk and agent reports).",
                &self.chunks_stored,
            ),
            (
                "ztna_chunk_bytes_stored_total",
                "Bytes of chunk objects stored.",
                &self.chunk_bytes_stored,
            ),
            (
                "ztna_sweep_runs_total",
                "Retention sweeps run (periodic and admin).",
                &self.sweep_runs,
            ),
            (
                "ztna_sweep_failures_total",
                "Retention sweeps that failed (the next one retries).",
                &self.sweep_failures,
            ),
            (
                "ztna_sweep_deleted_recordings_total",
                "Recordings deleted by retention sweeps.",
                &self.sweep_deleted,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        out
    }
}

pub fn router(app: App) -> Router {
    Router::new()
        .route("/metrics", get(metrics).fallback(crate::api::get_only))
        .route("/healthz", get(healthz).fallback(crate::api::get_only))
        .with_state(app)
}

async fn metrics(State(app): State<App>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.inner.metrics.render(),
    )
        .into_response()
}

/// 200 when the metadata store answers a query, 503 otherwise (for load balancers and
/// systemd/Kubernetes probes). Says nothing about any org.
async fn healthz(State(app): State<App>) -> Response {
    // A probe wants an answer in time, not one after the pool's own 30 s wait.
    let answered = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        app.inner.meta.settings(uuid::Uuid::nil()),
    )
    .await;
    match answered {
        Ok(Ok(_)) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        failed => {
            let e = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => String::from("no answer within 5 s"),
            };
            tracing::warn!(error = %e, "health check: the metadata store does not answer");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "error": "metadata store"})),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn renders_counters_and_bounds_the_action_label() {
        let m = Metrics::default();
        m.request("/api/session-recording-agent", Some("upload_chunk"), 200);
        m.request("/api/session-recording-agent", Some("upload_chunk"), 200);
        m.request("/api/session-recording", Some("made-up-action"), 400);
        m.request("/api/session-recording", None, 400);
        m.chunk_stored(10);
        m.chunk_stored(5);
        m.sweep(Ok(3));
        m.sweep(Err(()));
        let t = m.render();
        assert!(t.contains("ztna_http_requests_total{route=\"/api/session-recording-agent\",action=\"upload_chunk\",status=\"200\"} 2\n"), "{t}");
        assert!(t.contains("action=\"other\",status=\"400\"} 1\n"), "{t}");
        assert!(t.contains("action=\"none\",status=\"400\"} 1\n"), "{t}");
        assert!(!t.contains("made-up"), "{t}");
        assert!(t.contains("ztna_chunk_bytes_stored_total 15\n"), "{t}");
        assert!(t.contains("ztna_chunks_stored_total 2\n"), "{t}");
        assert!(t.contains("ztna_sweep_runs_total 2\n"), "{t}");
        assert!(t.contains("ztna_sweep_failures_total 1\n"), "{t}");
        assert!(t.contains("ztna_sweep_deleted_recordings_total 3\n"), "{t}");
    }
}
