//! `ztna-recorder config check`: loads the configuration the way the daemon does, then asks
//! the backend for this machine's settings with the node key (the agent route's `config`
//! action). Every problem is one line on stderr, and the exit status is non-zero when there is
//! one, so an administrator (or a package's post-install hint) can run it before reloading
//! sshd. The node key never appears in the output.

use crate::client::{AgentClient, ClientError};
use crate::config::{Config, ConfigArgs, Loaded, ShareCheck, CONFIG_ENV, DEFAULT_CONFIG_FILE};
use crate::logging::one_line;
use std::path::{Path, PathBuf};
use ztna_common::api::ErrorCode;

/// `ztna-recorder config …`
#[derive(clap::Subcommand, Debug)]
pub enum ConfigCommand {
    /// Validate the configuration and check that the backend accepts this machine's node key.
    Check(CheckArgs),
}

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Only validate the configuration; do not contact the backend.
    #[arg(long)]
    pub offline: bool,
}

/// A node key is 64 random bytes written as hex (contract: "admin machine register").
const NODE_KEY_HEX_LEN: usize = 128;

/// What a check found: problems make it fail, warnings do not.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    pub warnings: Vec<String>,
    /// The one-line summary printed when there is no problem.
    pub ok: Option<String>,
}

pub fn run(cmd: ConfigCommand) -> anyhow::Result<u8> {
    let ConfigCommand::Check(args) = cmd;
    let report = check(args.config.config.as_deref(), !args.offline);
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    for p in &report.problems {
        eprintln!("error: {p}");
    }
    match (&report.ok, report.problems.is_empty()) {
        (Some(ok), true) => {
            ztna_common::print_out(format_args!("OK: {ok}"))?;
            Ok(0)
        }
        _ => Ok(1),
    }
}

/// Runs every check for the configuration file `file` (None: `ZTNA_RECORDER_CONFIG` was not
/// set and no `--config` given, so the default file, which may be absent).
pub fn check(file: Option<&Path>, reach_backend: bool) -> Report {
    let mut r = Report::default();
    let shown = file
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE));
    let loaded = match Config::load(file, Vec::new()) {
        Ok(l) => l,
        Err(e) => {
            match e.downcast_ref::<crate::config::BadValues>() {
                Some(bad) => r.problems.extend(bad.0.iter().cloned()),
                None => r.problems.push(load_error(&shown, &e)),
            }
            return r;
        }
    };
    let Loaded {
        config,
        unknown_keys,
        warnings,
        file: used,
    } = loaded;
    // The commands only warn about an unknown key; a check fails on one: it is most likely a
    // typo of a key that then keeps its default (`enfroce = true` leaves enforcement off).
    r.problems.extend(unknown_keys);
    r.warnings.extend(warnings);
    if let Some(p) = &used {
        if let Some(why) = unreadable_by_users(p) {
            r.problems.push(format!(
                "{}: {why}: `shell` reads it as the user who logs in, so every login would be \
                 refused (chmod 0644; keep the node key in node_key_file)",
                p.display()
            ));
        }
    }
    let source = match &used {
        Some(p) => p.display().to_string(),
        None => {
            r.warnings.push(format!(
                "{} does not exist: using defaults and {CONFIG_ENV}/ZTNA_RECORDER_* variables only",
                shown.display()
            ));
            String::from("defaults and environment")
        }
    };
    // Where a problem with these keys came from: an environment variable wins over the file.
    let from = |keys: &[&str]| -> String {
        let set: Vec<String> = keys
            .iter()
            .map(|k| format!("ZTNA_RECORDER_{}", k.to_ascii_uppercase()))
            .filter(|v| std::env::var_os(v).is_some())
            .collect();
        if set.is_empty() {
            source.clone()
        } else {
            format!("{source} with {}", set.join(", "))
        }
    };

    let url = match &config.server_url {
        Some(u) => Some(u.clone()),
        None => {
            r.problems.push(format!(
                "{source}: server_url is not set (the backend's base URL, e.g. https://recordings.example.com)"
            ));
            None
        }
    };
    let key = match config.read_node_key() {
        Ok(k) if k.expose().len() != NODE_KEY_HEX_LEN => {
            r.problems.push(format!(
                "{src}: the node key is {} hex characters long, expected {NODE_KEY_HEX_LEN} (as printed by `ztna-recorder-server admin machine register`)",
                k.expose().len(),
                src = from(&["node_key_file", "node_key"])
            ));
            None
        }
        Ok(k) => {
            r.warnings.extend(config.node_key_file_exposed());
            Some(k)
        }
        Err(e) => {
            r.problems.push(format!(
                "{src}: cannot read the node key: {}",
                one_line(&e),
                src = from(&["node_key_file", "node_key"])
            ));
            None
        }
    };
    if config.spool_dir.exists() && !config.spool_dir.is_dir() {
        r.problems.push(format!(
            "{src}: spool_dir {} exists and is not a directory",
            config.spool_dir.display(),
            src = from(&["spool_dir"])
        ));
    }
    if let Some(why) = uncreatable(&config.spool_dir) {
        r.problems.push(format!(
            "{src}: spool_dir {} cannot be created: {why}",
            config.spool_dir.display(),
            src = from(&["spool_dir"])
        ));
    }
    if let Some(why) = crate::daemon::socket::not_a_socket(&config.socket) {
        r.problems
            .push(format!("{src}: {why}", src = from(&["socket"])));
    }
    if config.spool_max_bytes < config.chunk_max_bytes {
        r.problems.push(format!(
            "{src}: spool_max_bytes ({}) is smaller than chunk_max_bytes ({}): no chunk would fit",
            config.spool_max_bytes,
            config.chunk_max_bytes,
            src = from(&["spool_max_bytes", "chunk_max_bytes"])
        ));
    }
    // Under enforce, the room each session keeps for its output in flight (see
    // `config::late_room`) should hold what a bulk session has in flight.
    let small = |limit: u64| {
        config.enforce && crate::config::late_room(limit) < crate::config::LATE_MAX_BYTES
    };
    for (key, limit) in [
        ("spool_max_bytes", Some(config.spool_max_bytes)),
        ("spool_max_bytes_per_user", config.spool_max_bytes_per_user),
    ] {
        if limit.is_some_and(small) {
            r.warnings.push(format!(
                "{src}: with enforce, a {key} under {} keeps less than {} KiB per session for the output it has in flight when the limit is reached: a session streaming bulk output may then show some that is not recorded",
                16 * crate::config::LATE_MAX_BYTES,
                crate::config::LATE_MAX_BYTES / 1024,
                src = from(&[key, "enforce"])
            ));
        }
    }
    match config.share_check() {
        ShareCheck::TooSmall(why) => r.problems.push(format!(
            "{}: {why}",
            from(&["spool_max_bytes_per_user", "chunk_max_bytes"])
        )),
        ShareCheck::NoLimit(why) => r.warnings.push(format!(
            "{}: {why}",
            from(&["spool_max_bytes_per_user", "spool_max_bytes"])
        )),
        ShareCheck::Fine => {}
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let zshenv = std::fs::read_to_string("/etc/zsh/zshenv").unwrap_or_default();
    r.warnings
        .extend(shells_read_user_files_first(&passwd, &zshenv));

    let (Some(url), Some(key)) = (url, key) else {
        return r;
    };
    if !r.problems.is_empty() {
        return r;
    }
    if !reach_backend {
        r.ok = Some(format!("{source} is valid (backend not contacted)"));
        return r;
    }
    let answer = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(async {
            let client = AgentClient::new(&url, key)?;
            Ok::<_, anyhow::Error>(client.config().await)
        }),
        Err(e) => Err(e.into()),
    };
    match answer {
        Ok(Ok(c)) => {
            if !c.recording_enabled {
                r.warnings.push(format!(
                    "the backend has recording switched off for org {} (its session_recording feature or its recording_enabled setting is off): sessions are not recorded until an admin turns both on",
                    c.org_id
                ));
            }
            r.ok = Some(format!(
                "{source} is valid; backend {url} accepts the node key (org {}, machine {}, recording {}, retention {} days)",
                c.org_id,
                c.machine_id,
                if c.recording_enabled { "enabled" } else { "disabled" },
                c.retention_days
            ));
        }
        Ok(Err(e)) => r.problems.push(backend_error(&url, &e)),
        Err(e) => r
            .problems
            .push(format!("cannot set up the HTTP client: {}", one_line(&e))),
    }
    r
}

/// Local accounts whose login shell runs files the user owns before the `ForceCommand` (sshd
/// runs it through `SHELL -c`), so that they could run commands unrecorded: fish, tcsh and csh
/// always, zsh unless `/etc/zsh/zshenv` has the README's guard. bash is handled by the
/// drop-in's `SHLVL`. Accounts that cannot log in (nologin, false) are skipped.
fn shells_read_user_files_first(passwd: &str, zshenv: &str) -> Option<String> {
    let zsh_guarded = zshenv
        .lines()
        .any(|l| l.contains("ZSH_EXECUTION_STRING") && l.contains("no_rcs"));
    let found: Vec<String> = passwd
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let (user, shell) = (fields.first()?, fields.get(6)?);
            let name = shell.rsplit('/').next()?;
            let exposed = match name {
                "fish" | "tcsh" | "csh" => true,
                "zsh" => !zsh_guarded,
                _ => false,
            };
            exposed.then(|| format!("{user} ({name})"))
        })
        .collect();
    if found.is_empty() {
        return None;
    }
    Some(format!(
        "local accounts whose login shell reads their own files before the recorder starts, so that they could run commands unrecorded: {} (see the README, \"Users whose shell reads their own files first\")",
        found.join(", ")
    ))
}

fn backend_error(url: &str, e: &ClientError) -> String {
    match e {
        ClientError::Transport(why) => {
            format!("cannot reach the backend at {url}: {}", diagnose(url, why))
        }
        ClientError::Api {
            code: Some(ErrorCode::Unauthorized),
            ..
        } => format!(
            "the backend at {url} rejected the node key (UNAUTHORIZED): the machine is not registered there, or the key is wrong"
        ),
        ClientError::Api {
            status, message, ..
        } if *status == 404 || *status == 405 => format!(
            "{url} answered {status} ({message}): is server_url the backend's base URL?"
        ),
        other => format!("the backend at {url} refused the check: {other}"),
    }
}

/// Why a request got no answer, in the words of the layer that failed: the HTTP client's
/// message alone ("error sending request") does not tell a refused port from a wrong name.
fn diagnose(url: &str, why: &str) -> String {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return why.to_string();
    };
    let host = parsed.host_str().unwrap_or_default().to_string();
    let addrs = match parsed.socket_addrs(|| None) {
        Ok(a) if !a.is_empty() => a,
        Ok(_) => return format!("{host} resolves to no address"),
        Err(e) => return format!("cannot resolve {host}: {e}"),
    };
    let mut last = None;
    for addr in &addrs {
        match std::net::TcpStream::connect_timeout(addr, std::time::Duration::from_secs(5)) {
            Ok(_) => return format!("{addr} accepts connections, but the request failed: {why}"),
            Err(e) => last = Some(format!("connecting to {addr}: {e}")),
        }
    }
    last.unwrap_or_else(|| why.to_string())
}

/// A loader error as one line: TOML syntax errors become `line L, column C: message`.
fn load_error(file: &Path, e: &anyhow::Error) -> String {
    if let Some(te) = e.chain().find_map(|c| c.downcast_ref::<toml::de::Error>()) {
        let at = te
            .span()
            .and_then(|span| {
                let text = std::fs::read_to_string(file).ok()?;
                let before = text.get(..span.start)?;
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                Some(format!(" at line {line}, column {col}"))
            })
            .unwrap_or_default();
        let message: Vec<&str> = te.message().lines().map(str::trim).collect();
        return format!(
            "{}: not valid TOML{at}: {}",
            file.display(),
            message.join("; ")
        );
    }
    one_line(e)
}

/// Why other users could not read `file` (the file's or a folder's mode), if they could not.
fn unreadable_by_users(file: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode()).ok();
    if mode(file).is_some_and(|m| m & 0o004 == 0) {
        return Some("other users cannot read it".into());
    }
    let abs = std::path::absolute(file).ok()?;
    abs.ancestors()
        .skip(1)
        .find(|d| mode(d).is_some_and(|m| m & 0o001 == 0))
        .map(|d| format!("other users cannot enter {}", d.display()))
}

/// Why the daemon could not create `dir` (missing) at its start, if it could not: the nearest
/// existing folder above it is a file, or (checked as root, as the daemon runs) is on a
/// read-only filesystem or otherwise refuses a new entry.
fn uncreatable(dir: &Path) -> Option<String> {
    if dir.exists() {
        return None;
    }
    let mut up = dir.parent();
    while let Some(p) = up {
        let p = if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        };
        if p.exists() {
            if !p.is_dir() {
                return Some(format!("{} is not a directory", p.display()));
            }
            if nix::unistd::geteuid().is_root() {
                let w = nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK;
                if let Err(e) = nix::unistd::access(p, w) {
                    return Some(format!("{} takes no new folder ({e})", p.display()));
                }
            }
            return None;
        }
        up = p.parent();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shells_that_read_user_files_first_are_named() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      daemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n\
                      alice:x:1000:1000::/home/alice:/usr/bin/zsh\n\
                      bob:x:1001:1001::/home/bob:/usr/bin/fish\n\
                      carol:x:1002:1002::/home/carol:/bin/sh\n\
                      broken line\n";
        let w = shells_read_user_files_first(passwd, "").expect("a warning");
        assert!(w.contains("alice (zsh), bob (fish)"), "{w}");
        assert!(!w.contains("root") && !w.contains("carol"), "{w}");
        // The README's zshenv guard makes zsh safe; fish has none.
        let guard =
            "[[ $ZSH_EXECUTION_STRING == /usr/bin/ztna-recorder\\ shell* ]] && setopt no_rcs\n";
        let w = shells_read_user_files_first(passwd, guard).expect("a warning");
        assert!(w.contains(": bob (fish) (see"), "{w}");
        assert_eq!(
            shells_read_user_files_first("root:x:0:0:root:/root:/bin/bash\n", ""),
            None
        );
    }
}
