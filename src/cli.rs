//! The agent's command line, shared by its two binaries.
//!
//! `ztna-recorder` is what sshd starts for every login (`shell`) and what users run by hand
//! (`record`, `status`): it links only the PTY relay, the recorder and the Unix-socket client,
//! so a session's process stays small (a few MiB resident) and starts in a few milliseconds.
//! Everything that needs the async runtime and the HTTP/TLS stack — `daemon`, `config check`,
//! `record --upload` and the packaging-time `man`/`completions` — lives in the companion
//! binary `ztna-recorderd`, which `ztna-recorder` replaces itself with (`exec`: same process,
//! arguments, environment and file descriptors, so systemd's `Type=notify` and the exit status
//! are unaffected). Both parse the same [`Cli`], so `--help` is identical.

use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

#[derive(Parser, Debug)]
#[command(
    name = "ztna-recorder",
    version,
    propagate_version = true,
    about = "SSH session recorder agent",
    after_long_help = crate::config::CONFIG_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Record a command in a new PTY to an asciicast v2 file.
    Record(crate::record::RecordArgs),
    /// sshd's ForceCommand: run the user's session, recorded.
    Shell(crate::shell::ShellArgs),
    /// The systemd service: spool and upload sessions.
    Daemon(crate::daemon::DaemonArgs),
    /// Show the daemon's state.
    Status(crate::status::StatusArgs),
    /// Check the configuration (`config check`).
    Config {
        #[command(subcommand)]
        command: crate::check::ConfigCommand,
    },
    #[command(flatten)]
    Docs(ztna_common::cli_docs::DocsCommand),
}

/// The companion binary's file name.
pub const COMPANION: &str = "ztna-recorderd";
/// Where the packages install it (it is no command of its own for users).
pub const COMPANION_INSTALLED: &str = "/usr/libexec/ztna-recorder/ztna-recorderd";

/// Where the companion may be, in order: next to this executable (a build tree, an unpacked
/// tarball), in the `libexec` of the same prefix (`/usr/bin` → `/usr/libexec/ztna-recorder`,
/// also under a package's scratch root or `/usr/local`), and where the packages put it.
fn companion_candidates() -> Vec<PathBuf> {
    let dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let mut all: Vec<PathBuf> = dir
        .iter()
        .flat_map(|d| {
            [
                d.join(COMPANION),
                d.join("../libexec/ztna-recorder").join(COMPANION),
            ]
        })
        .collect();
    all.push(PathBuf::from(COMPANION_INSTALLED));
    all
}

/// glibc's allocator settings for the daemon, unless the administrator set their own. The
/// daemon handles MiB-sized buffers (chunks, request bodies) for as long as the machine runs:
/// with a fixed mmap threshold they go back to the kernel when freed (glibc's default raises
/// the threshold after the first such free and keeps them in its heap for good), and two
/// arenas are enough for its two worker threads.
const DAEMON_MALLOC: &str = "glibc.malloc.mmap_threshold=131072:glibc.malloc.arena_max=2";

/// Replaces this process with the companion, passing the arguments on unchanged. Returns only
/// when that is impossible. `daemon` also gets [`DAEMON_MALLOC`].
pub fn exec_companion(daemon: bool) -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let candidates = companion_candidates();
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        return anyhow::anyhow!(
            "this command needs {COMPANION} (part of the ztna-recorder package), which is not \
             in any of: {}",
            looked.join(", ")
        );
    };
    let mut args = std::env::args_os();
    let arg0 = args
        .next()
        .unwrap_or_else(|| OsString::from("ztna-recorder"));
    let mut cmd = std::process::Command::new(path);
    if daemon && std::env::var_os("GLIBC_TUNABLES").is_none() {
        cmd.env("GLIBC_TUNABLES", DAEMON_MALLOC);
    }
    let err = cmd.arg0(arg0).args(args).exec();
    anyhow::anyhow!(
        "this command needs {} (part of the ztna-recorder package): {err}",
        path.display()
    )
}

/// Prints an error the way both binaries do and turns the result into the exit status.
pub fn exit(result: anyhow::Result<u8>) -> std::process::ExitCode {
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("ztna-recorder: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
