//! `tracing` to stderr for the agent's commands. `ZTNA_RECORDER_LOG` (or `RUST_LOG`) filters,
//! as a default level with per-target overrides (`info`, `ztna_recorder=debug,warn`):
//! `Targets` rather than `EnvFilter`, which would link a regex engine into every session's
//! process for span filters nobody here uses.

use std::str::FromStr as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

pub fn init(default: &str) {
    let spec = std::env::var("ZTNA_RECORDER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_string());
    let (filter, bad) = match Targets::from_str(&spec) {
        Ok(t) => (t, None),
        Err(e) => (
            Targets::from_str(default).unwrap_or_default(),
            Some(format!("ignoring the log filter {spec:?}: {e}")),
        ),
    };
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour codes only for a person at a terminal, not in files or the journal.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_filter(filter),
        )
        .try_init();
    if let Some(msg) = bad {
        tracing::warn!("{msg}");
    }
}

/// `{x:#}` (an error with its causes) with line breaks folded, for messages that must stay on
/// one line (`config check`'s problems, a refused login).
pub fn one_line(x: impl std::fmt::Display) -> String {
    format!("{x:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
