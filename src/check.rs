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
    r.warnings.extend(sshd_lets_users_run_code_first());

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

/// When sshd forces our recorder: what lets a user run code before it starts, in the shell sshd
/// runs the ForceCommand through (see the drop-in and the README): the environment sshd lets
/// through, and accounts whose shell reads their own files for `-c`. Needs root (`sshd -T`
/// reads the host keys); says nothing when sshd is not there or does not force the recorder
/// (yet): these are warnings about recorded logins.
fn sshd_lets_users_run_code_first() -> Vec<String> {
    if !nix::unistd::geteuid().is_root() {
        return Vec::new();
    }
    let Some(sshd) = ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        return Vec::new();
    };
    // sshd's effective settings for a login by `user` (Match blocks applied).
    let settings_for = |user: &str| -> Option<String> {
        let out = std::process::Command::new(sshd)
            .args(["-T", "-C"])
            .arg(format!("user={user},host=localhost,addr=127.0.0.1"))
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // A user no Match block names: what an ordinary recorded login gets.
    let Some(sshd_t) = settings_for("ztna-recorder-check") else {
        return Vec::new();
    };
    if !forces_the_recorder(&sshd_t) {
        return Vec::new();
    }
    let pam = std::fs::read_to_string("/etc/pam.d/sshd").unwrap_or_default();
    let mut w = sshd_environment_warnings(&sshd_t, &pam);
    let everyone = forwarding_left_on(&sshd_t);
    w.extend(everyone.clone());
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    // A Match block may turn forwarding back on for some of them: each account that can log
    // in, as sshd would treat it (a few hundred at most).
    let mut by_user = Vec::new();
    for user in login_accounts(&passwd).into_iter().take(500) {
        if let Some(t) = settings_for(user) {
            if forces_the_recorder(&t) {
                match forwarding_left_on(&t) {
                    // Said once above for every login.
                    Some(on) if Some(&on) != everyone.as_ref() => {
                        by_user.push(format!("{user}: {on}"))
                    }
                    _ => {}
                }
            }
        }
    }
    if !by_user.is_empty() {
        w.push(format!(
            "for some accounts (a Match block): {}",
            by_user.join("; ")
        ));
    }
    let zshenv = std::fs::read_to_string("/etc/zsh/zshenv").unwrap_or_default();
    w.extend(shells_read_user_files_first(&passwd, &zshenv));
    let yama = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").ok();
    w.extend(ptrace_open_to_users(yama.as_deref()));
    w
}

/// Without Yama's `ptrace_scope` at 1 or more, any process a user left running (from an
/// earlier, recorded session) may trace the user's next login before the recorder starts
/// (sshd's `bash -c` is traceable until it execs us), and change what it runs.
fn ptrace_open_to_users(scope: Option<&str>) -> Option<String> {
    let scope = scope.map(str::trim);
    if scope
        .and_then(|s| s.parse::<u8>().ok())
        .is_some_and(|s| s >= 1)
    {
        return None;
    }
    Some(format!(
        "{}: a process a user left running can trace (ptrace) their next login before the recorder starts and make it run something else, unrecorded; set kernel.yama.ptrace_scope = 1 (or more) in /etc/sysctl.d/",
        match scope {
            Some(s) => format!("kernel.yama.ptrace_scope is {s}"),
            None => "this kernel has no Yama ptrace_scope".into(),
        }
    ))
}

/// The accounts of `/etc/passwd` that have a shell to log in with.
fn login_accounts(passwd: &str) -> Vec<&str> {
    passwd
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            let (user, shell) = (*fields.first()?, *fields.get(6)?);
            let name = shell.rsplit('/').next()?;
            let can_log_in = !shell.is_empty() && !matches!(name, "nologin" | "false" | "sync");
            (can_log_in && !user.is_empty()).then_some(user)
        })
        .collect()
}

/// Forwarding a recorded login still has (`sshd -T`'s output): each carries traffic that
/// never passes through the recorder. An agent forwarded to the host is a channel both ways
/// (keys and their comments added and listed), so a program left on the host can take
/// commands and return output through it, unrecorded.
fn forwarding_left_on(sshd_t: &str) -> Option<String> {
    let on: Vec<&str> = sshd_t
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, v)| {
            let k = k.to_ascii_lowercase();
            [
                "allowagentforwarding",
                "allowtcpforwarding",
                "allowstreamlocalforwarding",
                "x11forwarding",
                "permittunnel",
            ]
            .contains(&k.as_str())
                && v.trim() != "no"
        })
        .map(|(k, _)| k)
        .collect();
    // DisableForwarding overrides them all (except tunnels, which it leaves to PermitTunnel).
    let disabled = sshd_t
        .lines()
        .any(|l| l.eq_ignore_ascii_case("disableforwarding yes"));
    let on: Vec<&str> = on
        .into_iter()
        .filter(|k| !disabled || k.eq_ignore_ascii_case("permittunnel"))
        .collect();
    (!on.is_empty()).then(|| {
        format!(
            "sshd lets recorded logins use {}: that traffic never passes through the recorder (an agent forwarded with `ssh -A` can carry commands and their output); the drop-in sets each to no, unless an earlier setting wins",
            on.join(", ")
        )
    })
}

/// Whether `sshd -T`'s output forces our recorder.
fn forces_the_recorder(sshd_t: &str) -> bool {
    sshd_t.lines().any(|l| {
        l.split_once(' ').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("forcecommand") && v.contains("ztna-recorder")
        })
    })
}

/// [`sshd_lets_users_run_code_first`] on `sshd -T`'s output and `/etc/pam.d/sshd`.
fn sshd_environment_warnings(sshd_t: &str, pam_sshd: &str) -> Vec<String> {
    let settings: Vec<(String, &str)> = sshd_t
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim()))
        .collect();
    let values = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| *v)
            .collect()
    };
    if !forces_the_recorder(sshd_t) {
        return Vec::new();
    }
    let mut w = Vec::new();
    let set: Vec<&str> = values("setenv");
    let missing: Vec<String> = crate::shell::SSHD_SETENV
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .filter(|kv| !set.contains(&kv.as_str()))
        .collect();
    if !missing.is_empty() {
        w.push(format!(
            "sshd forces the recorder but does not set {} (the drop-in's SetEnv line): sshd keeps only the first SetEnv it reads, so an earlier one hides it; without it a user's ~/.bashrc or BASH_ENV runs before the recorder, unrecorded (add these to that earlier line)",
            missing.join(" ")
        ));
    }
    if values("permituserenvironment").iter().any(|v| *v != "no") {
        w.push(
            "sshd's PermitUserEnvironment is not `no`: a user's ~/.ssh/environment reaches the shell sshd runs the recorder through, with variables the drop-in does not neutralise".into(),
        );
    }
    // Names no SetEnv of ours covers that still run code in bash or the loader.
    let probes = ["LD_BIND_NOT", "BASH_FUNC_f%%", "GLIBC_TUNABLES", "ZDOTDIR"];
    let broad: Vec<&str> = values("acceptenv")
        .into_iter()
        .flat_map(str::split_whitespace)
        .filter(|pat| probes.iter().any(|p| glob_match(pat, p)))
        .collect();
    if !broad.is_empty() {
        w.push(format!(
            "sshd's AcceptEnv {} lets the client send variables the drop-in does not neutralise to the shell sshd runs the recorder through; accept only names such as LANG and LC_*",
            broad.join(" ")
        ));
    }
    let readenv = pam_sshd.lines().any(|l| {
        let l = l.trim_start();
        !l.starts_with('#') && l.contains("pam_env.so") && l.contains("user_readenv=1")
    });
    if readenv && values("usepam").contains(&"yes") {
        w.push(
            "/etc/pam.d/sshd reads each user's ~/.pam_environment (pam_env user_readenv=1, Debian's default): its variables reach the shell sshd runs the recorder through, and the drop-in neutralises only those known to run code; set user_readenv=0".into(),
        );
    }
    w
}

/// sshd's `AcceptEnv` patterns: `*` any run, `?` one character.
fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some((b'?', rest)) => !n.is_empty() && go(rest, &n[1..]),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
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
        ClientError::Timeout(why) => format!(
            "the backend at {url} took the connection but did not answer in time ({why}): is it overloaded, or is something in front of it holding requests?"
        ),
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
    if let Some(te) = e
        .chain()
        .find_map(|c| c.downcast_ref::<crate::config::TomlSyntax>())
    {
        return format!("{}: {}", file.display(), te.what());
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
    fn sshd_settings_that_let_the_environment_through_are_named() {
        let ours = crate::shell::SSHD_SETENV
            .iter()
            .map(|(k, v)| format!("setenv {k}={v}\n"))
            .collect::<String>();
        let forced = "forcecommand /usr/bin/ztna-recorder shell\nusepam yes\n\
                      permituserenvironment no\nacceptenv LANG\nacceptenv LC_*\n";
        let pam_quiet = "session required pam_env.so # [1]\n\
                         #session required pam_env.so user_readenv=1\n";
        let pam_readenv =
            "session required pam_env.so user_readenv=1 envfile=/etc/default/locale\n";
        // As shipped, on a PAM that reads no user file: nothing to say.
        assert!(sshd_environment_warnings(&format!("{forced}{ours}"), pam_quiet).is_empty());
        // Recording not forced (yet): nothing to check.
        let plain = format!("forcecommand none\nusepam yes\n{ours}");
        assert!(sshd_environment_warnings(&plain, pam_readenv).is_empty());
        // An earlier SetEnv hid ours; PAM reads ~/.pam_environment; PermitUserEnvironment;
        // AcceptEnv *.
        let bad = "forcecommand /usr/bin/ztna-recorder shell\nusepam yes\n\
                   permituserenvironment yes\nacceptenv LANG\nacceptenv *\nsetenv LANG=C\n";
        let w = sshd_environment_warnings(bad, pam_readenv);
        assert_eq!(w.len(), 4, "{w:#?}");
        assert!(w[0].contains("SHLVL=1 BASH_ENV= ") && w[0].contains("first SetEnv"));
        assert!(w[1].contains("PermitUserEnvironment"));
        assert!(w[2].starts_with("sshd's AcceptEnv * lets"), "{}", w[2]);
        assert!(w[3].contains("user_readenv=0"));
        assert!(glob_match("LC_*", "LC_ALL") && !glob_match("LC_*", "LD_PRELOAD"));
        assert!(glob_match("LD_??ND*", "LD_BIND_NOT") && !glob_match("LANG", "LANGUAGE"));
    }

    #[test]
    fn accounts_that_can_log_in() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nbin:x:2:2:bin:/bin:/usr/sbin/nologin\n\
                      sync:x:4:65534:sync:/bin:/bin/sync\nalice:x:1000:1000::/home/alice:/bin/zsh\n\
                      svc:x:999:999::/:/bin/false\nbad line\n";
        assert_eq!(login_accounts(passwd), ["root", "alice"]);
    }

    #[test]
    fn forwarding_left_on_is_named() {
        let off = "allowagentforwarding no\nallowtcpforwarding no\n\
                   allowstreamlocalforwarding no\nx11forwarding no\npermittunnel no\n";
        assert_eq!(forwarding_left_on(off), None);
        let agent = off.replace("allowagentforwarding no", "allowagentforwarding yes");
        let w = forwarding_left_on(&agent).unwrap();
        assert!(w.contains("use allowagentforwarding:"), "{w}");
        let two = agent.replace("allowtcpforwarding no", "allowtcpforwarding local");
        assert!(forwarding_left_on(&two)
            .unwrap()
            .contains("allowagentforwarding, allowtcpforwarding"));
        assert_eq!(
            forwarding_left_on(&format!("{two}disableforwarding yes\n")),
            None
        );
    }

    #[test]
    fn ptrace_must_be_limited() {
        assert!(ptrace_open_to_users(Some("1\n")).is_none());
        assert!(ptrace_open_to_users(Some("3")).is_none());
        assert!(ptrace_open_to_users(Some("0\n")).is_some_and(|w| w.contains("is 0")));
        assert!(ptrace_open_to_users(None).is_some_and(|w| w.contains("no Yama")));
    }

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
