//! The opened server: metadata store, object store and JWT keys, plus the admin operations
//! (the `admin` commands call these, and so can other crates' tests).

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use uuid::Uuid;

use crate::auth::{self, JwtKeys};
use crate::config::{self, Config};
use crate::meta::{
    self, AdminRefusal, MachineEntry, MemberEntry, MetadataStore, OrgEntry, Role, Settings,
    SettingsUpdate, UserAdded,
};
use crate::objects::Objects;

/// Why the server could not open its stores.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Secret(#[from] config::SecretError),
    #[error("cannot open the metadata store: {0}")]
    Meta(#[from] meta::MetaError),
    #[error("cannot open the object store: {0}")]
    Objects(#[from] crate::objects::ObjectError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Why an admin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("no such org: {0}")]
    NoSuchOrg(Uuid),
    #[error("no such user: {0}")]
    NoSuchUser(Uuid),
    #[error("no such machine: {0}")]
    NoSuchMachine(Uuid),
    #[error("user {user} is not a member of org {org}")]
    NotAMember { user: Uuid, org: Uuid },
    #[error("unknown feature {0:?} (the only feature is session_recording)")]
    UnknownFeature(String),
    #[error("invalid {field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error("{0}")]
    Meta(#[from] meta::MetaError),
    #[error("{0}")]
    Token(#[from] auth::TokenError),
}

/// An org's or machine's name: shown in lists and the dashboard, so not empty and without
/// control characters (a newline would forge a line of its own in a listing).
fn check_name(name: &str) -> Result<(), AdminError> {
    let why = if name.trim().is_empty() {
        "must not be empty"
    } else if name.chars().any(char::is_control) {
        "must not contain control characters"
    } else if name.len() > 200 {
        "must be at most 200 bytes"
    } else {
        return Ok(());
    };
    Err(AdminError::Invalid {
        field: "name",
        why: why.into(),
    })
}

/// The one feature flag this server knows.
pub const FEATURE_SESSION_RECORDING: &str = "session_recording";

pub(crate) struct Inner {
    pub meta: Arc<dyn MetadataStore>,
    pub objects: Objects,
    pub jwt: JwtKeys,
    pub sweep_interval: Duration,
    pub request_idle_timeout: Duration,
    pub metrics: crate::metrics::Metrics,
    pub locks: crate::api::recording::Locks,
    /// Bytes of request bodies that may be held at once (see `Config::max_body_memory`).
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// Object writes and deletes made under a database transaction (uploads, completes,
    /// deletes, retention sweeps), fewer than the pool's connections: a stalled object store
    /// then holds only some of them, and every other request (and `/healthz`) still gets one.
    /// Never closed.
    pub object_writes: tokio::sync::Semaphore,
}

/// Database connections kept for requests other than object writes (see `object_writes`).
const CONNECTIONS_KEPT: u32 = 4;

/// How many of an org's newest recordings a sweep looks for in the store first.
const STORE_PROBES: i64 = 3;

/// What [`App::seed`] made.
#[derive(Debug, Clone)]
pub struct Seed {
    pub org: Uuid,
    pub admin: Uuid,
    /// The admin's bearer token, valid for a day.
    pub token: String,
    pub machine: Uuid,
    pub node_key: String,
}

/// The opened server. Cheap to clone; every clone shares the same stores.
#[derive(Clone)]
pub struct App {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("objects", &self.inner.objects)
            .finish_non_exhaustive()
    }
}

impl App {
    /// Opens (creating on first start) the data dir, the metadata store (migrated), the
    /// object store and the JWT secret named by `config`.
    pub async fn open(config: Config) -> Result<App, OpenError> {
        // In the order that leaves least behind when one is refused: a URL with a typo creates
        // nothing, and a secret is generated only once the database has answered.
        let (database, store) = (config.database_url(), config.store_url());
        meta::check_url(&database)?;
        Objects::check_url(&store)?;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| OpenError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let meta = meta::open(&database, config.max_db_connections).await?;
        let objects = Objects::open(&store, &config.s3)?;
        let secret = config::load_or_create_secret(&config)?;
        Ok(App {
            inner: Arc::new(Inner {
                meta,
                objects,
                jwt: JwtKeys::new(&secret),
                sweep_interval: config.sweep_interval,
                request_idle_timeout: config.request_idle_timeout,
                metrics: crate::metrics::Metrics::default(),
                locks: crate::api::recording::Locks::default(),
                body_budget: Arc::new(tokio::sync::Semaphore::new(config.max_body_memory.clamp(
                    ztna_common::api::MAX_BODY_BYTES,
                    tokio::sync::Semaphore::MAX_PERMITS,
                ))),
                object_writes: tokio::sync::Semaphore::new(
                    config
                        .max_db_connections
                        .saturating_sub(CONNECTIONS_KEPT)
                        .max(config.max_db_connections / 2)
                        .max(1) as usize,
                ),
            }),
        })
    }

    /// Whether the object store can be used (a bucket that exists, credentials it takes).
    pub async fn check_store(&self) -> Result<(), crate::objects::ObjectError> {
        self.inner.objects.check().await
    }

    /// Creates an org (with its default settings); `session_recording` sets the feature flag.
    pub async fn create_org(
        &self,
        name: &str,
        session_recording: bool,
    ) -> Result<Uuid, AdminError> {
        check_name(name)?;
        let id = Uuid::new_v4();
        self.inner
            .meta
            .create_org(id, name, session_recording)
            .await?;
        Ok(id)
    }

    /// Switches a feature flag of an org.
    pub async fn set_feature(
        &self,
        org: Uuid,
        feature: &str,
        enabled: bool,
    ) -> Result<(), AdminError> {
        if feature != FEATURE_SESSION_RECORDING {
            return Err(AdminError::UnknownFeature(feature.to_string()));
        }
        if self.inner.meta.set_feature(org, enabled).await? {
            Ok(())
        } else {
            Err(AdminError::NoSuchOrg(org))
        }
    }

    /// Creates a user (or takes the one with this email) and makes it a member of `org`.
    pub async fn create_user(
        &self,
        org: Uuid,
        email: &str,
        role: Role,
    ) -> Result<Uuid, AdminError> {
        Ok(self.add_user(org, email, role).await?.id)
    }

    /// [`create_user`](Self::create_user), saying whether the account existed and its role in
    /// the org before.
    pub async fn add_user(
        &self,
        org: Uuid,
        email: &str,
        role: Role,
    ) -> Result<UserAdded, AdminError> {
        // The address is how people find each other's accounts, so a typo should not become
        // one: the shape only (LOCAL@DOMAIN, no spaces); whether it receives mail is not ours.
        let shaped = match email.split_once('@') {
            Some((local, domain)) => {
                !local.is_empty()
                    && !domain.is_empty()
                    && !domain.contains('@')
                    && !email.chars().any(char::is_whitespace)
            }
            None => false,
        };
        if !shaped {
            return Err(AdminError::Invalid {
                field: "email",
                why: format!("{email:?} is not an address (LOCAL@DOMAIN)"),
            });
        }
        match self
            .inner
            .meta
            .create_user(org, Uuid::new_v4(), email, role)
            .await?
        {
            Ok(added) => Ok(added),
            Err(_) => Err(AdminError::NoSuchOrg(org)),
        }
    }

    /// An HS256 JWT for `user`, valid for `ttl_secs`.
    pub async fn issue_token(&self, user: Uuid, ttl_secs: u64) -> Result<String, AdminError> {
        if !self.inner.meta.user_exists(user).await? {
            return Err(AdminError::NoSuchUser(user));
        }
        Ok(self.inner.jwt.issue(user, ttl_secs)?)
    }

    /// Registers a machine owned by `owner` (a member of `org`). Returns its id and its node
    /// key; only the key's SHA-256 is stored, so this is the only time it is seen.
    pub async fn register_machine(
        &self,
        org: Uuid,
        name: &str,
        owner: Uuid,
    ) -> Result<(Uuid, String), AdminError> {
        check_name(name)?;
        let id = Uuid::new_v4();
        let key = auth::new_node_key();
        match self
            .inner
            .meta
            .register_machine(id, org, name, owner, &auth::node_key_hash(&key))
            .await?
        {
            Ok(()) => Ok((id, key)),
            Err(AdminRefusal::NoSuchOrg) => Err(AdminError::NoSuchOrg(org)),
            Err(AdminRefusal::NotAMember) => Err(AdminError::NotAMember { user: owner, org }),
        }
    }

    /// An org (feature on) with one admin, `admin@ORG.test`, who owns one machine, and the
    /// org's recording switched on or off: the set-up every test and benchmark starts from.
    pub async fn seed(
        &self,
        org_name: &str,
        machine_name: &str,
        recording_enabled: bool,
    ) -> Result<Seed, AdminError> {
        let org = self.create_org(org_name, true).await?;
        let admin = self
            .create_user(org, &format!("admin@{org_name}.test"), Role::Admin)
            .await?;
        let token = self.issue_token(admin, 86_400).await?;
        let (machine, node_key) = self.register_machine(org, machine_name, admin).await?;
        self.update_settings(
            org,
            SettingsUpdate {
                recording_enabled: Some(recording_enabled),
                ..Default::default()
            },
        )
        .await?;
        Ok(Seed {
            org,
            admin,
            token,
            machine,
            node_key,
        })
    }

    /// Deletes a machine; its recordings stay, with `machine_id` null.
    pub async fn delete_machine(&self, machine: Uuid) -> Result<(), AdminError> {
        if self.inner.meta.delete_machine(machine).await? {
            Ok(())
        } else {
            Err(AdminError::NoSuchMachine(machine))
        }
    }

    /// Every org, oldest first.
    pub async fn orgs(&self) -> Result<Vec<OrgEntry>, AdminError> {
        Ok(self.inner.meta.orgs().await?)
    }

    /// An org's members by email.
    pub async fn members(&self, org: Uuid) -> Result<Vec<MemberEntry>, AdminError> {
        // A mistyped org id is an error, not an empty list.
        self.settings(org).await?;
        Ok(self.inner.meta.members(org).await?)
    }

    /// An org's machines, oldest first.
    pub async fn machines(&self, org: Uuid) -> Result<Vec<MachineEntry>, AdminError> {
        self.settings(org).await?;
        Ok(self.inner.meta.machines(org).await?)
    }

    /// An org's recording settings.
    pub async fn settings(&self, org: Uuid) -> Result<Settings, AdminError> {
        self.inner
            .meta
            .settings(org)
            .await?
            .ok_or(AdminError::NoSuchOrg(org))
    }

    /// Changes an org's recording settings (retention is clamped to 1..=365 here too).
    pub async fn update_settings(
        &self,
        org: Uuid,
        mut update: SettingsUpdate,
    ) -> Result<(), AdminError> {
        self.settings(org).await?;
        update.retention_days = update.retention_days.map(|d| d.clamp(1, 365));
        if let Some(m) = &update.storage_mode {
            if m != "platform" && m != "custom" {
                return Err(AdminError::Invalid {
                    field: "storage_mode",
                    why: "must be platform or custom".into(),
                });
            }
        }
        self.inner.meta.update_settings(org, &update).await?;
        Ok(())
    }

    /// One retention sweep over every org: deletes recordings (rows and objects) started
    /// before their org's retention. Returns how many were deleted.
    pub async fn sweep(&self) -> Result<u64, meta::MetaError> {
        let mut deleted = 0;
        for (org, days) in self.inner.meta.retention_by_org().await? {
            deleted += self.sweep_org(org, days).await?;
        }
        Ok(deleted)
    }

    pub(crate) async fn sweep_org(
        &self,
        org: Uuid,
        retention_days: i64,
    ) -> Result<u64, meta::MetaError> {
        let cutoff = OffsetDateTime::now_utc() - time::Duration::days(retention_days.clamp(1, 365));
        self.check_store_holds(org, cutoff).await?;
        // Objects are deleted under the rows' locks: a connection held meanwhile.
        let _slot = self.object_write_slot().await;
        self.inner
            .meta
            .sweep_org(org, cutoff, &self.inner.objects)
            .await
    }

    /// Refuses ([`meta::MetaError::StoreMismatch`]) when the store holds none of the first
    /// chunks of the org's newest recordings that a sweep to `cutoff` keeps. A chunk's row is
    /// committed only after its object is durable, so they are all missing only when the store
    /// is not the one the rows were written with, or lost them. Recordings the sweep deletes
    /// are not looked at: an earlier sweep that failed half-way may have deleted their objects
    /// already. Several are looked for because a recording being deleted right now (objects
    /// first, then rows) has its objects gone for a moment. An org with no such recording
    /// cannot be checked and is swept as before; one with nothing to sweep is not looked at.
    async fn check_store_holds(
        &self,
        org: Uuid,
        cutoff: OffsetDateTime,
    ) -> Result<(), meta::MetaError> {
        let chunks = self
            .inner
            .meta
            .newest_chunks(org, cutoff, STORE_PROBES)
            .await?;
        let objects = &self.inner.objects;
        let org_s = org.to_string();
        let mut missing = Vec::new();
        for (session, index) in &chunks {
            let key = ztna_common::api::chunk_key(&org_s, &session.to_string(), *index);
            if objects.exists(&key).await? {
                return Ok(());
            }
            missing.push(key);
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(meta::MetaError::StoreMismatch {
            store: objects.describe().to_string(),
            org,
            missing: missing.join(", "),
        })
    }

    /// One of the object writes that may hold a database connection at once (see
    /// `Inner::object_writes`).
    /// (`None` only if the semaphore were closed, which nothing does.)
    pub(crate) async fn object_write_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.inner.object_writes.acquire().await.ok()
    }
}
