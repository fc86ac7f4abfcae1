//! The agent's configuration: built-in defaults, then one TOML file
//! (`/etc/ztna-recorder/config.toml`, or `--config FILE` / `ZTNA_RECORDER_CONFIG`), then
//! `ZTNA_RECORDER_<KEY>` environment variables, then command-line flags; later wins.
//! Unknown keys are warned about, never fatal; secrets never appear in `Debug` output.

use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where the configuration file is looked for when neither `--config` nor
/// `ZTNA_RECORDER_CONFIG` names one.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/ztna-recorder/config.toml";
/// The environment variable naming another configuration file.
pub const CONFIG_ENV: &str = "ZTNA_RECORDER_CONFIG";
/// Prefix of the per-key environment variables.
pub const ENV_PREFIX: &str = "ZTNA_RECORDER_";

/// A value that must never reach a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// The agent configuration (contract: "Agent: configuration"), plus a few tuning knobs.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The backend's base URL.
    pub server_url: Option<String>,
    /// A file holding the node key.
    pub node_key_file: Option<PathBuf>,
    /// The node key itself (discouraged: prefer `node_key_file`).
    pub node_key: Option<Secret>,
    pub spool_dir: PathBuf,
    pub socket: PathBuf,
    pub enforce: bool,
    pub capture_input: bool,
    pub chunk_max_bytes: u64,
    pub chunk_max_secs: u64,
    pub spool_max_bytes: u64,
    /// The most one user's sessions may hold in the spool (root's are bounded only by
    /// `spool_max_bytes`); unset: no limit of its own.
    pub spool_max_bytes_per_user: Option<u64>,
    /// Cap of the upload retry backoff.
    pub retry_max_secs: u64,
    /// How often the spool is rescanned even without a filesystem event.
    pub rescan_secs: u64,
    /// How long the backend's `config` answer is trusted.
    pub config_refresh_secs: u64,
    /// On SIGTERM, how long the daemon keeps uploading before it exits.
    pub drain_secs: u64,
    /// While live sessions stream bulk output, how long uploads may wait for a lull (0: never).
    pub upload_defer_secs: u64,
    /// How long `record --upload` sends one request again while the backend is away or busy.
    pub upload_patience_secs: u64,
    /// The command that prints `{"node_key": …}` when `node_key_file` is unset.
    pub status_command: String,
}

/// What a session cut by a spool limit may have sent before it heard of the cut: its queue, a
/// frame, the socket's buffers (a few hundred KiB; more when binary output is JSON-escaped).
/// That output may already be on the user's screen, so room is kept for it.
pub const LATE_MAX_BYTES: u64 = 512 * 1024;

/// The room a limit of `limit` bytes (`spool_max_bytes`, a user's share) keeps for each live
/// session's late output (see [`LATE_MAX_BYTES`]): a sixteenth of it, at most
/// [`LATE_MAX_BYTES`]. Sessions are cut that much (times the sessions live) short of the
/// limit, which is never passed.
pub fn late_room(limit: u64) -> u64 {
    (limit / 16).min(LATE_MAX_BYTES)
}

/// What is wrong with `spool_max_bytes_per_user`, as `config check` and the daemon say it.
pub enum ShareCheck {
    Fine,
    /// A problem: no chunk would fit, so every non-root session would be refused.
    TooSmall(String),
    /// A warning: it limits nothing.
    NoLimit(String),
}

impl Config {
    pub fn share_check(&self) -> ShareCheck {
        match self.spool_max_bytes_per_user {
            Some(n) if n - late_room(n) < self.chunk_max_bytes => ShareCheck::TooSmall(format!(
                "spool_max_bytes_per_user ({n}) is too small for chunk_max_bytes ({}): sessions are cut at {} (room is kept for what a cut session had sent), so no chunk would fit",
                self.chunk_max_bytes,
                n - late_room(n)
            )),
            Some(n) if n >= self.spool_max_bytes => ShareCheck::NoLimit(format!(
                "spool_max_bytes_per_user ({n}) is not below spool_max_bytes ({}): it limits nothing",
                self.spool_max_bytes
            )),
            _ => ShareCheck::Fine,
        }
    }

    /// The most sessions of `uid` may hold in the spool.
    pub fn spool_share(&self, uid: u32) -> u64 {
        match self.spool_max_bytes_per_user {
            Some(n) if uid != 0 => n.min(self.spool_max_bytes),
            _ => self.spool_max_bytes,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server_url: None,
            node_key_file: None,
            node_key: None,
            spool_dir: PathBuf::from("/var/lib/ztna-recorder/spool"),
            socket: PathBuf::from("/run/ztna-recorder/recorder.sock"),
            enforce: false,
            capture_input: false,
            chunk_max_bytes: 1_048_576,
            chunk_max_secs: 10,
            spool_max_bytes: 1_073_741_824,
            spool_max_bytes_per_user: None,
            retry_max_secs: 30,
            rescan_secs: 5,
            config_refresh_secs: 60,
            drain_secs: 3,
            upload_defer_secs: 30,
            upload_patience_secs: 60,
            status_command: String::from("ztna status --json"),
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Path,
    Bool,
    U64,
}

const KEYS: &[(&str, Kind)] = &[
    ("server_url", Kind::Str),
    ("node_key_file", Kind::Path),
    ("node_key", Kind::Str),
    ("spool_dir", Kind::Path),
    ("socket", Kind::Path),
    ("enforce", Kind::Bool),
    ("capture_input", Kind::Bool),
    ("chunk_max_bytes", Kind::U64),
    ("chunk_max_secs", Kind::U64),
    ("spool_max_bytes", Kind::U64),
    ("spool_max_bytes_per_user", Kind::U64),
    ("retry_max_secs", Kind::U64),
    ("rescan_secs", Kind::U64),
    ("config_refresh_secs", Kind::U64),
    ("drain_secs", Kind::U64),
    ("upload_defer_secs", Kind::U64),
    ("upload_patience_secs", Kind::U64),
    ("status_command", Kind::Str),
];

/// The most any `*_secs` key may be: ten years.
pub const MAX_SECS: u64 = 10 * 365 * 24 * 3600;

/// The configuration keys as `--help` and the man page list them (a test keeps it in step
/// with [`KEYS`] and the defaults).
pub const CONFIG_HELP: &str = "\
CONFIGURATION
  Built-in defaults, then the file (/etc/ztna-recorder/config.toml, or --config FILE, or
  ZTNA_RECORDER_CONFIG), then ZTNA_RECORDER_<KEY> environment variables, then flags. Unknown
  keys are warned about. `ztna-recorder config check` validates a file and reaches the backend.

  server_url                the backend's base URL (required)
  node_key_file             a file holding the machine's node key (mode 0600); when unset,
                            the key comes from `status_command`
  node_key                  the node key itself (prefer node_key_file)
  spool_dir                 where sessions wait for the backend [/var/lib/ztna-recorder/spool]
  socket                    where `shell` finds the daemon [/run/ztna-recorder/recorder.sock]
  enforce                   fail closed: refuse (or end) a session that cannot be recorded
                            [false]
  capture_input             also record keystrokes (`i` events) [false]
  chunk_max_bytes           a chunk is closed at this size... [1048576]
  chunk_max_secs            ...or this many seconds after its first event [10]
  spool_max_bytes           the most the spool holds; each live session keeps room in it for
                            what it has in flight (a sixteenth, at most 512 KiB): sessions are
                            cut that far short of it [1073741824]
  spool_max_bytes_per_user  the most one user's sessions hold, room kept likewise (root is
                            exempt) [no limit]
  retry_max_secs            the longest wait between upload retries [30]
  rescan_secs               how often the spool is rescanned besides notify [5]
  config_refresh_secs       how long the backend's `config` answer is trusted [60]
  drain_secs                on SIGTERM, how long the daemon keeps uploading [3]
  upload_defer_secs         how long uploads may wait while sessions stream bulk output
                            (0: never) [30]
  upload_patience_secs      how long `record --upload` retries a request [60]
  status_command            prints {\"node_key\": ...} when node_key_file is unset
                            [ztna status --json]

  `shell` runs as the user: there, environment variables may only make recording stricter.
  ZTNA_RECORDER_LOG sets the log filter (e.g. debug).";

/// Environment variables with the prefix that are not configuration keys (`FORCE_REMOVE` is
/// the package scripts').
const NON_KEY_ENV: &[&str] = &["CONFIG", "LOG", "FORCE_REMOVE"];

/// `--config FILE`, shared by the agent's subcommands.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// The configuration file [default: /etc/ztna-recorder/config.toml].
    #[arg(long, value_name = "FILE", env = CONFIG_ENV)]
    pub config: Option<PathBuf>,
}

/// Where configuration comes from, before the flags of a subcommand.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// An explicit file (`--config` or `ZTNA_RECORDER_CONFIG`): it must exist.
    pub file: Option<PathBuf>,
    /// The environment, as `(name, value)` pairs.
    pub env: Vec<(String, String)>,
    /// Flag overrides, by key.
    pub flags: Vec<(&'static str, String)>,
}

/// What loading found worth a warning, for the caller to log once logging is up.
#[derive(Debug, Default)]
pub struct Loaded {
    pub config: Config,
    /// Keys the agent does not know (a typo of `enforce` would silently fail open): warned
    /// about by the commands, errors for `config check`.
    pub unknown_keys: Vec<String>,
    pub warnings: Vec<String>,
    pub file: Option<PathBuf>,
}

impl Loaded {
    /// Everything worth a warning, for the commands that go on regardless (an unknown key is
    /// ignored by them; `config check` reports `unknown_keys` as errors).
    pub fn notices(&self) -> impl Iterator<Item = String> + '_ {
        self.unknown_keys
            .iter()
            .map(|k| format!("{k} (ignored)"))
            .chain(self.warnings.iter().cloned())
    }
}

/// A config file that is not TOML, said without the parser's quote of the line: that line
/// may hold the node key, and this message goes to logs and to users' terminals.
#[derive(Debug)]
pub struct TomlSyntax {
    pub path: PathBuf,
    /// Line and column (from 1) where the parser stopped, when it says.
    pub at: Option<(usize, usize)>,
    pub message: String,
}

impl TomlSyntax {
    fn new(path: &Path, text: &str, e: &toml::de::Error) -> TomlSyntax {
        let at = e.span().and_then(|span| {
            let before = text.get(..span.start)?;
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            Some((line, col))
        });
        let message: Vec<&str> = e.message().lines().map(str::trim).collect();
        TomlSyntax {
            path: path.to_path_buf(),
            at,
            message: message.join("; "),
        }
    }

    /// `not valid TOML at line L, column C: why`.
    pub fn what(&self) -> String {
        match self.at {
            Some((l, c)) => format!("not valid TOML at line {l}, column {c}: {}", self.message),
            None => format!("not valid TOML: {}", self.message),
        }
    }
}

impl fmt::Display for TomlSyntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config file {}: {}", self.path.display(), self.what())
    }
}

impl std::error::Error for TomlSyntax {}

fn readable_by_others(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o044 != 0)
}

/// The `ZTNA_RECORDER_*` variables. Only ours are read: any other variable may hold bytes that
/// are not UTF-8 (an SSH client may send a Latin-1 `LANG` or `LC_*`), and `std::env::vars`
/// panics on those.
pub(crate) fn our_env() -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (name, val) in std::env::vars_os() {
        let Some(name) = name.to_str().filter(|n| n.starts_with(ENV_PREFIX)) else {
            continue;
        };
        let Some(val) = val.to_str() else {
            bail!("environment variable {name}: the value is not valid UTF-8");
        };
        out.push((name.to_string(), val.to_string()));
    }
    Ok(out)
}

/// Every value that cannot be used, each named by where it was set. Shown on one line (a
/// refused login says why in one); `config check` gives each its own.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct BadValues(pub Vec<String>);

impl Config {
    /// Loads from the process environment, the given explicit file and flags.
    pub fn load(file: Option<&Path>, flags: Vec<(&'static str, String)>) -> anyhow::Result<Loaded> {
        Self::load_from(Sources {
            file: file.map(Path::to_path_buf),
            env: our_env()?,
            flags,
        })
    }

    pub fn load_from(src: Sources) -> anyhow::Result<Loaded> {
        let mut warnings = Vec::new();
        let mut unknown_keys = Vec::new();
        let mut bad = Vec::new();
        // Each key's value, and where it came from (for the messages).
        let mut values: BTreeMap<&'static str, (toml::Value, String)> = BTreeMap::new();

        let (path, must_exist) = match &src.file {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_FILE), false),
        };
        let mut used_file = None;
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let table: toml::Table =
                    toml::from_str(&text).map_err(|e| TomlSyntax::new(&path, &text, &e))?;
                // The file is world-readable by design (`shell` reads it as the user): a key in
                // it is everybody's.
                if table.contains_key("node_key") && readable_by_others(&path) {
                    warnings.push(format!(
                        "config file {}: `node_key` in a file other users can read; put the key \
                         in `node_key_file` (mode 0600) instead",
                        path.display()
                    ));
                }
                for (k, v) in table {
                    match KEYS.iter().find(|(name, _)| *name == k) {
                        Some((name, _)) => {
                            values.insert(name, (v, format!("config file {}", path.display())));
                        }
                        None => unknown_keys
                            .push(format!("config file {}: unknown key `{k}`", path.display())),
                    }
                }
                used_file = Some(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
                "config file {}: {e} (`shell` reads it as the user who logs in: it must be \
                 readable by everyone, mode 0644)",
                path.display()
            ),
            Err(e) => bail!("config file {}: {e}", path.display()),
        }

        for (name, val) in &src.env {
            let Some(key) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            if NON_KEY_ENV.contains(&key) {
                continue;
            }
            let lower = key.to_ascii_lowercase();
            match KEYS.iter().find(|(k, _)| *k == lower) {
                Some((k, kind)) => match parse_text(k, *kind, val, name) {
                    Ok(v) => {
                        values.insert(k, (v, format!("environment variable {name}")));
                    }
                    Err(e) => bad.push(format!("{e:#}")),
                },
                None => unknown_keys.push(format!("environment variable {name}: unknown key")),
            }
        }
        for (k, val) in &src.flags {
            let (k, kind) = KEYS
                .iter()
                .find(|(name, _)| name == k)
                .with_context(|| format!("internal: flag for unknown key {k}"))?;
            let flag = format!("--{}", k.replace('_', "-"));
            match parse_text(k, *kind, val, &flag) {
                Ok(v) => {
                    values.insert(k, (v, flag));
                }
                Err(e) => bad.push(format!("{e:#}")),
            }
        }

        let mut c = Config::default();
        for (k, (v, from)) in &values {
            if let Err(e) = apply(&mut c, k, v.clone()) {
                bad.push(format!("{from}: {e}"));
            }
        }
        for (key, why) in c.validate() {
            // Named by where the key was set (the built-in default is always valid).
            match values.get(key) {
                Some((_, from)) => bad.push(format!("{from}: {why}")),
                None => bad.push(why),
            }
        }
        if !bad.is_empty() {
            return Err(BadValues(bad).into());
        }
        Ok(Loaded {
            config: c,
            unknown_keys,
            warnings,
            file: used_file,
        })
    }

    /// Every key whose value cannot be used, and why.
    fn validate(&self) -> Vec<(&'static str, String)> {
        let mut bad = Vec::new();
        if self.chunk_max_bytes == 0 {
            bad.push((
                "chunk_max_bytes",
                "chunk_max_bytes must be at least 1".into(),
            ));
        }
        // The backend refuses chunks over 8 MiB (and bodies over 16 MiB, which escaping can
        // reach first): keep a frame's worth of margin.
        let limit = (ztna_common::api::MAX_CHUNK_BYTES - crate::ipc::MAX_FRAME_BYTES) as u64;
        if self.chunk_max_bytes > limit {
            bad.push((
                "chunk_max_bytes",
                format!(
                    "chunk_max_bytes must be at most {limit} (the backend takes chunks up to 8 MiB)"
                ),
            ));
        }
        if self.chunk_max_secs == 0 {
            bad.push(("chunk_max_secs", "chunk_max_secs must be at least 1".into()));
        }
        // Each becomes a deadline, an instant that far ahead: past this it would not exist.
        for (key, secs) in [
            ("chunk_max_secs", self.chunk_max_secs),
            ("retry_max_secs", self.retry_max_secs),
            ("rescan_secs", self.rescan_secs),
            ("config_refresh_secs", self.config_refresh_secs),
            ("drain_secs", self.drain_secs),
            ("upload_defer_secs", self.upload_defer_secs),
            ("upload_patience_secs", self.upload_patience_secs),
        ] {
            if secs > MAX_SECS {
                bad.push((key, format!("{key} must be at most {MAX_SECS} (ten years)")));
            }
        }
        if self.rescan_secs == 0 {
            bad.push(("rescan_secs", "rescan_secs must be at least 1".into()));
        }
        if let Some(u) = &self.server_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                bad.push((
                    "server_url",
                    format!("server_url must start with http:// or https://, got {u:?}"),
                ));
            }
        }
        bad
    }

    /// A warning when `node_key_file` is readable by users other than its owner.
    pub fn node_key_file_exposed(&self) -> Option<String> {
        use std::os::unix::fs::PermissionsExt as _;
        let p = self.node_key_file.as_ref()?;
        let mode = std::fs::metadata(p).ok()?.permissions().mode() & 0o777;
        (mode & 0o077 != 0).then(|| {
            format!(
                "node_key_file {} has mode {mode:o}: other users can read the node key and report sessions as this machine (chmod 600)",
                p.display()
            )
        })
    }

    /// The node key: `node_key`, else the contents of `node_key_file`, else `.node_key` of
    /// what `status_command` prints.
    pub fn read_node_key(&self) -> anyhow::Result<Secret> {
        let raw = if let Some(k) = &self.node_key {
            k.expose().to_string()
        } else if let Some(f) = &self.node_key_file {
            std::fs::read_to_string(f).with_context(|| format!("node_key_file {}", f.display()))?
        } else {
            let mut parts = self.status_command.split_whitespace();
            let prog = parts.next().context("status_command is empty")?;
            let out = std::process::Command::new(prog)
                .args(parts)
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .output()
                .with_context(|| {
                    format!(
                        "no node_key_file configured and `{}` could not run",
                        self.status_command
                    )
                })?;
            if !out.status.success() {
                bail!("`{}` failed ({})", self.status_command, out.status);
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .with_context(|| format!("`{}` did not print JSON", self.status_command))?;
            v.get("node_key")
                .and_then(|k| k.as_str())
                .map(str::to_string)
                .with_context(|| format!("`{}` printed no .node_key", self.status_command))?
        };
        let key = raw.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("the node key is not hexadecimal text");
        }
        Ok(Secret::new(key.to_ascii_lowercase()))
    }
}

fn parse_text(key: &str, kind: Kind, val: &str, from: &str) -> anyhow::Result<toml::Value> {
    Ok(match kind {
        Kind::Str | Kind::Path => toml::Value::String(val.to_string()),
        Kind::Bool => match val.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => toml::Value::Boolean(true),
            "0" | "false" | "no" | "off" | "" => toml::Value::Boolean(false),
            _ => bail!("{from}: `{key}` must be true or false, got {val:?}"),
        },
        Kind::U64 => {
            let n: u64 = val
                .trim()
                .parse()
                .with_context(|| format!("{from}: `{key}` must be a whole number, got {val:?}"))?;
            toml::Value::Integer(i64::try_from(n).with_context(|| format!("{from}: too large"))?)
        }
    })
}

fn apply(c: &mut Config, key: &str, v: toml::Value) -> anyhow::Result<()> {
    fn s(key: &str, v: toml::Value) -> anyhow::Result<String> {
        match v {
            toml::Value::String(s) => Ok(s),
            other => bail!("`{key}` must be a string, got {}", other.type_str()),
        }
    }
    fn b(key: &str, v: toml::Value) -> anyhow::Result<bool> {
        match v {
            toml::Value::Boolean(b) => Ok(b),
            other => bail!("`{key}` must be true or false, got {}", other.type_str()),
        }
    }
    fn n(key: &str, v: toml::Value) -> anyhow::Result<u64> {
        match v {
            toml::Value::Integer(i) if i >= 0 => Ok(i as u64),
            other => bail!("`{key}` must be a whole number >= 0, got {other}"),
        }
    }
    // Absolute: `shell` runs in the user's home directory and the daemon in `/`, so a
    // relative path would name two different places (and an empty one none).
    fn p(key: &str, v: toml::Value) -> anyhow::Result<PathBuf> {
        let text = s(key, v)?;
        if !text.starts_with('/') {
            bail!("`{key}` must be an absolute path, got {text:?}");
        }
        Ok(PathBuf::from(text))
    }
    match key {
        "server_url" => c.server_url = Some(s(key, v)?.trim_end_matches('/').to_string()),
        "node_key_file" => c.node_key_file = Some(p(key, v)?),
        "node_key" => c.node_key = Some(Secret::new(s(key, v)?)),
        "spool_dir" => c.spool_dir = p(key, v)?,
        "socket" => c.socket = p(key, v)?,
        "enforce" => c.enforce = b(key, v)?,
        "capture_input" => c.capture_input = b(key, v)?,
        "chunk_max_bytes" => c.chunk_max_bytes = n(key, v)?,
        "chunk_max_secs" => c.chunk_max_secs = n(key, v)?,
        "spool_max_bytes" => c.spool_max_bytes = n(key, v)?,
        "spool_max_bytes_per_user" => c.spool_max_bytes_per_user = Some(n(key, v)?),
        "retry_max_secs" => c.retry_max_secs = n(key, v)?,
        "rescan_secs" => c.rescan_secs = n(key, v)?,
        "config_refresh_secs" => c.config_refresh_secs = n(key, v)?,
        "drain_secs" => c.drain_secs = n(key, v)?,
        "upload_defer_secs" => c.upload_defer_secs = n(key, v)?,
        "upload_patience_secs" => c.upload_patience_secs = n(key, v)?,
        "status_command" => c.status_command = s(key, v)?,
        _ => bail!("internal: unknown key {key}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn the_help_lists_every_key_with_its_default() {
        let d = Config::default();
        // Each key's entry: its line and the continuation lines under it.
        let mut entries: Vec<(String, String)> = Vec::new();
        for l in CONFIG_HELP.lines() {
            if let Some(rest) = l.strip_prefix("  ") {
                if rest.starts_with(' ') {
                    if let Some(e) = entries.last_mut() {
                        e.1.push_str(rest.trim());
                    }
                    continue;
                }
                let key = rest.split(' ').next().unwrap_or_default().to_string();
                entries.push((key, rest.to_string()));
            }
        }
        let line = |key: &str| -> String {
            entries
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, t)| t.clone())
                .unwrap_or_else(|| panic!("{key} is not in CONFIG_HELP"))
        };
        for (key, _) in KEYS {
            line(key);
        }
        for (key, v) in [
            ("chunk_max_bytes", d.chunk_max_bytes),
            ("chunk_max_secs", d.chunk_max_secs),
            ("spool_max_bytes", d.spool_max_bytes),
            ("retry_max_secs", d.retry_max_secs),
            ("rescan_secs", d.rescan_secs),
            ("config_refresh_secs", d.config_refresh_secs),
            ("drain_secs", d.drain_secs),
            ("upload_defer_secs", d.upload_defer_secs),
            ("upload_patience_secs", d.upload_patience_secs),
        ] {
            let l = line(key);
            assert!(l.contains(&format!("[{v}]")), "{key}: {l:?}");
        }
        assert!(line("spool_dir").contains(&format!("[{}]", d.spool_dir.display())));
        assert!(line("socket").contains(&format!("[{}]", d.socket.display())));
        assert!(line("status_command").contains(&format!("[{}]", d.status_command)));
        assert!(line("enforce").contains(&format!("[{}]", d.enforce)));
    }

    #[test]
    fn layers_apply_in_order_and_unknown_keys_warn() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "server_url = \"http://a/\"\nenforce = true\nchunk_max_secs = 3\nbogus = 1\nnode_key = \"abcd\"\n",
        )
        .unwrap();
        let l = Config::load_from(Sources {
            file: Some(f),
            env: vec![
                ("ZTNA_RECORDER_CHUNK_MAX_SECS".into(), "4".into()),
                ("ZTNA_RECORDER_ENFORCE".into(), "false".into()),
                ("ZTNA_RECORDER_NOPE".into(), "1".into()),
                ("ZTNA_RECORDER_CONFIG".into(), "x".into()),
            ],
            flags: vec![("chunk_max_secs", "5".into())],
        })
        .unwrap();
        assert_eq!(l.config.server_url.as_deref(), Some("http://a"));
        assert!(!l.config.enforce);
        assert_eq!(l.config.chunk_max_secs, 5);
        assert_eq!(l.unknown_keys.len(), 2, "{:?}", l.unknown_keys); // bogus, NOPE
        assert!(l.unknown_keys[0].contains("bogus"), "{:?}", l.unknown_keys);
        // The key in a file others can read.
        assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
        assert!(l.warnings[0].contains("node_key_file"));
        let dbg = format!("{:?}", l.config);
        assert!(!dbg.contains("abcd"), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn a_key_in_a_private_file_is_not_warned_about() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "node_key = \"abcd\"\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let l = Config::load_from(Sources {
            file: Some(f),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(l.notices().count(), 0, "{:?}", l.warnings);
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = Config::load_from(Sources {
            file: None,
            env: vec![("ZTNA_RECORDER_ENFORCE".into(), "maybe".into())],
            flags: vec![],
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("enforce"));
        let e = Config::load_from(Sources {
            file: Some("/nonexistent/x.toml".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/x.toml"));
        // Every bad value is named, not only the first.
        let e = Config::load_from(Sources {
            file: None,
            env: vec![
                ("ZTNA_RECORDER_ENFORCE".into(), "maybe".into()),
                ("ZTNA_RECORDER_CHUNK_MAX_SECS".into(), "0".into()),
                ("ZTNA_RECORDER_SPOOL_MAX_BYTES".into(), "-5".into()),
            ],
            flags: vec![],
        })
        .unwrap_err();
        let bad = &e.downcast_ref::<BadValues>().unwrap().0;
        assert_eq!(bad.len(), 3, "{bad:?}");
        for k in ["ENFORCE", "CHUNK_MAX_SECS", "SPOOL_MAX_BYTES"] {
            assert!(bad.iter().any(|l| l.contains(k)), "{k}: {bad:?}");
        }
        // Paths must be absolute (an empty socket used to pass `config check`).
        for (k, v) in [
            ("SOCKET", ""),
            ("SPOOL_DIR", "spool"),
            ("NODE_KEY_FILE", "key"),
        ] {
            let e = Config::load_from(Sources {
                file: None,
                env: vec![(format!("ZTNA_RECORDER_{k}"), v.into())],
                flags: vec![],
            })
            .unwrap_err();
            let e = format!("{e:#}");
            assert!(
                e.contains(&k.to_ascii_lowercase()) && e.contains("absolute"),
                "{e}"
            );
        }
    }
}
