//! `tracing` to stderr for the agent's commands. `ZTNA_RECORDER_LOG` (or `RUST_LOG`) filters,
//! as a default level with per-target overrides (`info`, `ztna_recorder=debug,warn`):
//! `Targets` rather than `EnvFilter`, which would link a regex engine into every session's
//! process for span filters nobody here uses. A directive without `=` must be a level:
//! `Targets` would take any other word (`verbose`) as a target to log alone, silencing the rest
//! without a word; a target's every level is `target=trace`.

use std::str::FromStr as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

pub fn init(default: &str) {
    let spec = std::env::var("ZTNA_RECORDER_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_string());
    let (filter, bad) = match parse(&spec) {
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

const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

fn parse(spec: &str) -> Result<Targets, String> {
    for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !d.contains('=') && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(d)) {
            return Err(format!(
                "{d:?} is not a level (one of {}); a target's every level is {d}=trace",
                LEVELS.join(", ")
            ));
        }
    }
    Targets::from_str(spec).map_err(|e| e.to_string())
}

/// `{x:#}` (an error with its causes) with line breaks folded, for messages that must stay on
/// one line (`config check`'s problems, a refused login).
pub fn one_line(x: impl std::fmt::Display) -> String {
    format!("{x:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn a_bare_word_must_be_a_level() {
        let t = parse("info").unwrap();
        assert!(t.would_enable("ztna_recorder::daemon", &Level::INFO));
        assert!(!t.would_enable("ztna_recorder::daemon", &Level::DEBUG));
        let t = parse("ztna_recorder=debug,WARN").unwrap();
        assert!(t.would_enable("ztna_recorder", &Level::DEBUG));
        assert!(t.would_enable("hyper", &Level::WARN));
        let t = parse("ztna_recorder=trace").unwrap();
        assert!(t.would_enable("ztna_recorder", &Level::TRACE));
        // `verbose` would log a target named so and nothing else.
        let e = parse("verbose").unwrap_err();
        assert!(e.contains("not a level"), "{e}");
        assert!(parse("info,ztna_recorder").is_err());
        assert!(parse("ztna_recorder=loud").is_err());
    }
}
