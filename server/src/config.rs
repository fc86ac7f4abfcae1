//! Server settings: what `serve` and `admin` need to find the metadata, the objects and the
//! JWT secret. Flags and environment are merged in main.rs (clap, flags win); this module
//! resolves the defaults that hang off the data directory and keeps the secret file.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where an S3-compatible store is and how to sign for it.
#[derive(Clone, Default)]
pub struct S3Config {
    /// `S3_ENDPOINT`, e.g. `https://ACCOUNT.r2.cloudflarestorage.com` or `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    /// `S3_REGION`, `auto` when unset.
    pub region: Option<String>,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("access_key", &self.access_key)
            .field(
                "secret_key",
                &self.secret_key.as_ref().map(|_| "<redacted>"),
            )
            .field("region", &self.region)
            .finish()
    }
}

/// Everything the server needs. Build with [`Config::with_data_dir`] and adjust fields.
#[derive(Clone)]
pub struct Config {
    /// `--listen` / `ZTNA_LISTEN` (`HOST:PORT`), used by the binary's `serve` (library
    /// callers pass a listener).
    pub listen: String,
    /// `--data-dir` / `ZTNA_DATA_DIR`: holds the SQLite file, the objects and the JWT secret
    /// unless those are configured elsewhere.
    pub data_dir: PathBuf,
    /// `--database` / `DATABASE_URL`: `sqlite://PATH` or `postgres://…`.
    /// `None` means `sqlite://<data-dir>/recordings.db`.
    pub database_url: Option<String>,
    /// `--store` / `STORE_URL`: `file://DIR` or `s3://BUCKET`. `None` means
    /// `file://<data-dir>/objects`.
    pub store_url: Option<String>,
    /// `--jwt-secret` / `JWT_SECRET`. `None` means the one kept in `<data-dir>/jwt-secret`
    /// (generated on first use, mode 0600).
    pub jwt_secret: Option<String>,
    pub s3: S3Config,
    /// How often `serve` runs the retention sweep.
    pub sweep_interval: Duration,
    /// Most connections to the metadata database from this process.
    pub max_db_connections: u32,
    /// How long a client may take to send a request's head (the connection is then closed),
    /// or leave its body without a byte arriving (it is then answered `INVALID_JSON` and its
    /// connection closed).
    pub request_idle_timeout: Duration,
    /// Most bytes of request bodies this process holds at once (at least one body's 16 MiB):
    /// a body waits for room as it arrives, and is answered `SERVER_BUSY` after
    /// `request_idle_timeout` without any.
    pub max_body_memory: usize,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("store_url", &self.store_url)
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("s3", &self.s3)
            .field("sweep_interval", &self.sweep_interval)
            .field("request_idle_timeout", &self.request_idle_timeout)
            .field("max_body_memory", &self.max_body_memory)
            .field("max_db_connections", &self.max_db_connections)
            .finish()
    }
}

/// Hides a password in `scheme://user:password@host/…` and in query parameters such as
/// `?password=…` or `sslpassword=…`.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match base.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
                None => base.to_string(),
            },
            None => base.to_string(),
        },
        None => base.to_string(),
    };
    if let Some(q) = query {
        let pairs: Vec<String> = q
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if secret_param(k) => format!("{k}=<redacted>"),
                _ => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

fn secret_param(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "token", "key"]
        .iter()
        .any(|s| k.contains(s))
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_SWEEP_SECS: u64 = 3600;
/// See [`Config::max_body_memory`].
pub const DEFAULT_MAX_BODY_MEMORY: usize = 256 * 1024 * 1024;
const SECRET_FILE: &str = "jwt-secret";

impl Config {
    /// Defaults for everything, with `data_dir` as given.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            listen: DEFAULT_LISTEN.to_string(),
            data_dir: data_dir.into(),
            database_url: None,
            store_url: None,
            jwt_secret: None,
            s3: S3Config::default(),
            sweep_interval: Duration::from_secs(DEFAULT_SWEEP_SECS),
            max_db_connections: 16,
            request_idle_timeout: Duration::from_secs(30),
            max_body_memory: DEFAULT_MAX_BODY_MEMORY,
        }
    }

    /// The platform data directory (`directories`), e.g. `~/.local/share/ztna-recorder-server`.
    pub fn default_data_dir() -> Option<PathBuf> {
        directories::ProjectDirs::from("", "", "ztna-recorder-server")
            .map(|d| d.data_dir().to_path_buf())
    }

    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(u) => u.clone(),
            None => format!("sqlite://{}", self.data_dir.join("recordings.db").display()),
        }
    }

    pub fn store_url(&self) -> String {
        match &self.store_url {
            Some(u) => u.clone(),
            None => format!("file://{}", self.data_dir.join("objects").display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read or write the JWT secret file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the JWT secret file {0} is empty")]
    Empty(PathBuf),
    #[error("the JWT secret is empty")]
    EmptyGiven,
}

/// The JWT secret: the configured one, else the one in `<data-dir>/jwt-secret`, generated
/// once. Two processes starting together agree on one file: it is written under a temporary
/// name and hard-linked into place, which fails if another process got there first.
pub fn load_or_create_secret(config: &Config) -> Result<String, SecretError> {
    if let Some(s) = &config.jwt_secret {
        if s.trim().is_empty() {
            return Err(SecretError::EmptyGiven);
        }
        if s.len() < 32 {
            tracing::warn!(
                bytes = s.len(),
                "the JWT secret given is short: anyone who guesses it can sign tokens (use 32 random bytes or more)"
            );
        }
        return Ok(s.clone());
    }
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir).map_err(|source| SecretError::DataDir {
        path: dir.clone(),
        source,
    })?;
    let path = dir.join(SECRET_FILE);
    let io = |source| SecretError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            use std::os::unix::fs::PermissionsExt as _;
            if let Ok(m) = std::fs::metadata(&path) {
                if m.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        path = %path.display(),
                        mode = format!("{:o}", m.permissions().mode() & 0o777),
                        "the JWT secret file can be read by other users: anyone who reads it can sign tokens (chmod 600)"
                    );
                }
            }
            return non_empty(s, &path);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut bytes = [0u8; 64];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut bytes[..]);
    let secret = hex::encode(bytes);
    let tmp = dir.join(format!(".{SECRET_FILE}.{}", uuid::Uuid::new_v4()));
    write_private(&tmp, secret.as_bytes()).map_err(io)?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(dir).map_err(io)?;
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            non_empty(std::fs::read_to_string(&path).map_err(io)?, &path)
        }
        Err(e) => Err(io(e)),
    }
}

fn non_empty(s: String, path: &Path) -> Result<String, SecretError> {
    let s = s.trim().to_string();
    if s.is_empty() {
        Err(SecretError::Empty(path.to_path_buf()))
    } else {
        Ok(s)
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn secret_is_generated_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let c = Config::with_data_dir(dir.path());
        let a = load_or_create_secret(&c).unwrap();
        let b = load_or_create_secret(&c).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 128);
        let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn debug_redacts_secrets() {
        let mut c = Config::with_data_dir("/x");
        c.jwt_secret = Some("supersecret".into());
        c.database_url = Some("postgres://u:pw@h/db".into());
        c.s3.secret_key = Some("s3secret".into());
        let d = format!("{c:?}");
        assert!(!d.contains("supersecret") && !d.contains("pw@") && !d.contains("s3secret"));
    }

    #[test]
    fn urls_lose_passwords_in_userinfo_and_query() {
        assert_eq!(
            redact_url("postgres://u@h:5432/db?sslmode=require&password=S3CRET"),
            "postgres://u@h:5432/db?sslmode=require&password=<redacted>"
        );
        assert_eq!(
            redact_url("postgres://u:pw@h/db?PassWord=x"),
            "postgres://u:<redacted>@h/db?PassWord=<redacted>"
        );
        assert_eq!(redact_url("sqlite:///x/db"), "sqlite:///x/db");
    }
}
