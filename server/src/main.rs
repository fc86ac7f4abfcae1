//! `ztna-recorder-server`: parses arguments (flags win over the environment) and calls the
//! library: `serve`, or one `admin` command that prints one JSON object.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::json;
use uuid::Uuid;
use ztna_recorder_server::{config, App, Config, Role, S3Config, SettingsUpdate};

#[derive(Parser, Debug)]
#[command(
    name = "ztna-recorder-server",
    version,
    propagate_version = true,
    about = "The session-recording backend of ztna-recorder: metadata in SQLite or PostgreSQL, \
             recordings on local disk or any S3-compatible store"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct Global {
    /// Directory for the SQLite database, the objects and the JWT secret (defaults).
    #[arg(long, env = "ZTNA_DATA_DIR", global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Metadata database: sqlite://PATH or postgres://… [default: sqlite://<data-dir>/recordings.db]
    #[arg(
        long,
        env = "DATABASE_URL",
        global = true,
        value_name = "URL",
        hide_env_values = true
    )]
    database: Option<String>,
    /// Object store: file://DIR or s3://BUCKET [default: file://<data-dir>/objects]
    #[arg(long, env = "STORE_URL", global = true, value_name = "URL")]
    store: Option<String>,
    /// HS256 secret for JWTs [default: generated once in <data-dir>/jwt-secret, mode 0600]
    #[arg(
        long,
        env = "JWT_SECRET",
        global = true,
        hide_env_values = true,
        value_name = "SECRET"
    )]
    jwt_secret: Option<String>,
    /// S3 endpoint (R2, MinIO, Garage…); http:// is allowed for loopback test servers.
    #[arg(long, env = "S3_ENDPOINT", global = true, value_name = "URL")]
    s3_endpoint: Option<String>,
    #[arg(
        long,
        env = "S3_ACCESS_KEY",
        global = true,
        hide_env_values = true,
        value_name = "KEY"
    )]
    s3_access_key: Option<String>,
    #[arg(
        long,
        env = "S3_SECRET_KEY",
        global = true,
        hide_env_values = true,
        value_name = "KEY"
    )]
    s3_secret_key: Option<String>,
    /// S3 region [default: auto]
    #[arg(long, env = "S3_REGION", global = true, value_name = "REGION")]
    s3_region: Option<String>,
    /// Address to listen on (`serve`): HOST:PORT, the host a name or an IP address.
    // A string, resolved only by `serve`: a stray ZTNA_LISTEN in the environment must not
    // stop `admin` commands, which listen on nothing.
    #[arg(long, env = "ZTNA_LISTEN", global = true, default_value = config::DEFAULT_LISTEN,
          value_name = "HOST:PORT")]
    listen: String,
    /// The most database connections this process opens. On PostgreSQL an upload holds one
    /// while its object is written, so this also bounds the uploads in flight.
    #[arg(long, env = "ZTNA_MAX_DB_CONNECTIONS", global = true, default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=10_000), value_name = "N")]
    max_db_connections: u32,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the HTTP API until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Administration; prints exactly one JSON object on stdout.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Hidden `man` and `completions` (the packages' man page and shell completions).
    #[command(flatten)]
    Docs(ztna_common::cli_docs::DocsCommand),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Seconds between retention sweeps.
    #[arg(long, env = "ZTNA_SWEEP_INTERVAL_SECS", default_value_t = config::DEFAULT_SWEEP_SECS,
          value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    sweep_interval_secs: u64,
    /// MiB of request bodies held at once, at most (at least 16: one whole body). A body waits
    /// for room as it arrives; one that waits too long is answered 503 `SERVER_BUSY`.
    #[arg(long, env = "ZTNA_MAX_BODY_MEMORY_MIB", default_value_t = 256,
          value_parser = clap::value_parser!(u64).range(16..=1_048_576), value_name = "MIB")]
    max_body_memory_mib: u64,
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Organisations.
    Org {
        #[command(subcommand)]
        command: OrgCommand,
    },
    /// Switch an org's feature flag.
    Feature {
        #[command(subcommand)]
        command: FeatureCommand,
    },
    /// Users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Issue a JWT for a user.
    Token {
        #[arg(long, value_name = "USER")]
        user: Uuid,
        /// Lifetime in seconds, at most ten years (a token that never expires in practice
        /// cannot be taken back short of changing the secret).
        #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=315_360_000))]
        ttl_secs: u64,
    },
    /// Machines.
    Machine {
        #[command(subcommand)]
        command: MachineCommand,
    },
    /// An org's recording settings.
    Settings {
        #[command(subcommand)]
        command: SettingsCommand,
    },
    /// Run one retention sweep over every org now.
    Sweep,
}

#[derive(Subcommand, Debug)]
enum OrgCommand {
    /// Create an org (with default settings).
    Create {
        #[arg(long)]
        name: String,
        /// Enable this feature at creation (only session_recording exists).
        #[arg(long, value_name = "FEATURE")]
        feature: Vec<String>,
    },
    /// Every org, oldest first: {"orgs": [{org_id, name, session_recording, created_at}]}.
    List,
}

#[derive(Args, Debug)]
struct FeatureArgs {
    #[arg(long, value_name = "ORG")]
    org: Uuid,
    /// The feature: session_recording.
    #[arg(long)]
    name: String,
}

#[derive(Subcommand, Debug)]
enum FeatureCommand {
    Enable(FeatureArgs),
    Disable(FeatureArgs),
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum RoleArg {
    Admin,
    Member,
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Create a user (or reuse the one with this email) as a member of an org, with this role
    /// (an existing member's role is set to it).
    Create {
        #[arg(long, value_name = "ORG")]
        org: Uuid,
        #[arg(long)]
        email: String,
        #[arg(long, value_enum)]
        role: RoleArg,
    },
    /// An org's members by email: {"org_id", "users": [{user_id, email, role}]}.
    List {
        #[arg(long, value_name = "ORG")]
        org: Uuid,
    },
}

#[derive(Subcommand, Debug)]
enum MachineCommand {
    /// Register a machine; prints its node key (shown only this once).
    Register {
        #[arg(long, value_name = "ORG")]
        org: Uuid,
        #[arg(long)]
        name: String,
        #[arg(long, value_name = "USER")]
        owner: Uuid,
    },
    /// Delete a machine; its recordings are kept with machine_id null.
    Delete {
        #[arg(long, value_name = "MACHINE")]
        machine: Uuid,
    },
    /// An org's machines, oldest first: {"org_id", "machines": [{machine_id, name, owner_id,
    /// created_at}]} (node keys are kept only hashed and never shown again).
    List {
        #[arg(long, value_name = "ORG")]
        org: Uuid,
    },
}

#[derive(Subcommand, Debug)]
enum SettingsCommand {
    /// Show an org's settings.
    Get {
        #[arg(long, value_name = "ORG")]
        org: Uuid,
    },
    /// Change an org's settings (retention is clamped to 1..=365).
    Set {
        #[arg(long, value_name = "ORG")]
        org: Uuid,
        #[arg(long)]
        recording_enabled: Option<bool>,
        #[arg(long)]
        retention_days: Option<i64>,
        #[arg(long, value_parser = ["platform", "custom"])]
        storage_mode: Option<String>,
    },
}

fn build_config(g: &Global) -> Result<Config, String> {
    let data_dir = match &g.data_dir {
        // Absolute, so the default `file://<data-dir>/objects` is a valid URL and a relative
        // directory means the same to every part of the server.
        Some(d) => std::path::absolute(d)
            .map_err(|e| format!("bad data directory {}: {e}", d.display()))?,
        None => Config::default_data_dir().ok_or_else(|| {
            "cannot find the platform data directory (no home directory?): pass --data-dir"
                .to_string()
        })?,
    };
    let mut c = Config::with_data_dir(data_dir);
    c.database_url = g.database.clone();
    c.store_url = g.store.clone();
    c.jwt_secret = g.jwt_secret.clone();
    c.listen = g.listen.clone();
    c.max_db_connections = g.max_db_connections;
    c.s3 = S3Config {
        endpoint: g.s3_endpoint.clone(),
        access_key: g.s3_access_key.clone(),
        secret_key: g.s3_secret_key.clone(),
        region: g.s3_region.clone(),
    };
    Ok(c)
}

fn init_tracing(default: &str) {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (before
/// we announce that we listen), so a signal sent right after the announcement is not lost.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot handle SIGTERM: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot handle SIGINT: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down: finishing requests in flight");
    })
}

async fn run(cli: Cli) -> Result<(), String> {
    let mut config = build_config(&cli.global)?;
    match cli.command {
        Command::Serve(args) => {
            init_tracing("info");
            config.sweep_interval = Duration::from_secs(args.sweep_interval_secs);
            config.max_body_memory =
                usize::try_from(args.max_body_memory_mib.saturating_mul(1024 * 1024))
                    .unwrap_or(usize::MAX);
            tracing::info!(?config, "starting");
            // Resolved before anything is opened, so a bad address creates no data directory.
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host(config.listen.as_str())
                .await
                .map_err(|e| format!("bad --listen / ZTNA_LISTEN {:?}: {e}", config.listen))?
                .collect();
            // Bound first: a port in use leaves no database or secret behind.
            let listener = tokio::net::TcpListener::bind(addrs.as_slice())
                .await
                .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
            let app = App::open(config.clone()).await.map_err(|e| e.to_string())?;
            // Only `serve` needs the store at once: `admin` commands work without it.
            app.check_store()
                .await
                .map_err(|e| format!("cannot open the object store: {e}"))?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            let shutdown = shutdown_signal()?;
            tracing::info!(%addr, "listening");
            // One machine-readable line, for whoever started us on port 0.
            // Whoever reads it may be gone by now; the log has the address too.
            let _ = ztna_common::print_out(json!({ "listening": addr.to_string() }));
            ztna_recorder_server::serve(listener, app, shutdown)
                .await
                .map_err(|e| format!("server error: {e}"))
        }
        Command::Admin { command } => {
            init_tracing("warn");
            let app = App::open(config).await.map_err(|e| e.to_string())?;
            let out = admin(&app, command).await.map_err(|e| e.to_string())?;
            // The change is made: a reader gone from stdout does not undo it.
            ztna_common::print_out(out).map_err(|e| format!("cannot print the result: {e}"))
        }
        Command::Docs(d) => {
            ztna_common::cli_docs::run(&d, <Cli as clap::CommandFactory>::command())
                .map_err(|e| e.to_string())
        }
    }
}

async fn admin(
    app: &App,
    command: AdminCommand,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    Ok(match command {
        AdminCommand::Org {
            command: OrgCommand::Create { name, feature },
        } => {
            let mut session_recording = false;
            for f in &feature {
                if f != ztna_recorder_server::FEATURE_SESSION_RECORDING {
                    return Err(format!(
                        "unknown feature {f:?} (the only feature is session_recording)"
                    )
                    .into());
                }
                session_recording = true;
            }
            let id = app.create_org(&name, session_recording).await?;
            json!({ "org_id": id })
        }
        AdminCommand::Org {
            command: OrgCommand::List,
        } => json!({ "orgs": app.orgs().await? }),
        AdminCommand::User {
            command: UserCommand::List { org },
        } => json!({ "org_id": org, "users": app.members(org).await? }),
        AdminCommand::Feature { command } => {
            let (args, enabled) = match command {
                FeatureCommand::Enable(a) => (a, true),
                FeatureCommand::Disable(a) => (a, false),
            };
            app.set_feature(args.org, &args.name, enabled).await?;
            json!({ "org_id": args.org, "feature": args.name, "enabled": enabled })
        }
        AdminCommand::User {
            command: UserCommand::Create { org, email, role },
        } => {
            let role = match role {
                RoleArg::Admin => Role::Admin,
                RoleArg::Member => Role::Member,
            };
            let added = app.add_user(org, &email, role).await?;
            // stdout is the contract's one object; what else happened goes to stderr, so that
            // re-running the command never changes an account unseen.
            if added.existed {
                eprintln!(
                    "note: {email} already had an account ({}): it is reused",
                    added.id
                );
            }
            match added.previous_role {
                Some(old) if old != role => eprintln!(
                    "note: its role in org {org} changed from {} to {}",
                    old.as_str(),
                    role.as_str()
                ),
                Some(_) => eprintln!("note: its role in org {org} was already {}", role.as_str()),
                None if added.existed => {
                    eprintln!(
                        "note: it is now a member of org {org} too, as {}",
                        role.as_str()
                    )
                }
                None => {}
            }
            json!({ "user_id": added.id })
        }
        AdminCommand::Token { user, ttl_secs } => {
            json!({ "token": app.issue_token(user, ttl_secs).await? })
        }
        AdminCommand::Machine { command } => match command {
            MachineCommand::Register { org, name, owner } => {
                let (id, key) = app.register_machine(org, &name, owner).await?;
                json!({ "machine_id": id, "node_key": key })
            }
            MachineCommand::Delete { machine } => {
                app.delete_machine(machine).await?;
                json!({ "deleted": machine })
            }
            MachineCommand::List { org } => {
                json!({ "org_id": org, "machines": app.machines(org).await? })
            }
        },
        AdminCommand::Settings { command } => {
            let org = match command {
                SettingsCommand::Get { org } => org,
                SettingsCommand::Set {
                    org,
                    recording_enabled,
                    retention_days,
                    storage_mode,
                } => {
                    app.update_settings(
                        org,
                        SettingsUpdate {
                            recording_enabled,
                            retention_days,
                            storage_mode,
                        },
                    )
                    .await?;
                    org
                }
            };
            let s = app.settings(org).await?;
            json!({
                "org_id": org,
                "recording_enabled": s.recording_enabled,
                "retention_days": s.retention_days,
                "storage_mode": s.storage_mode,
            })
        }
        AdminCommand::Sweep => json!({ "deleted": app.sweep().await? }),
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Recordings are what users typed and saw: whatever the server creates (data dir, database,
    // objects) is for its own user only, also when run by hand outside systemd (whose unit sets
    // the same UMask).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    // Docs need no data directory (packaging runs them in a bare build environment).
    if let Command::Docs(d) = &cli.command {
        return match ztna_common::cli_docs::run(d, <Cli as clap::CommandFactory>::command()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ztna-recorder-server: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ztna-recorder-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztna-recorder-server: {e}");
            ExitCode::FAILURE
        }
    }
}
