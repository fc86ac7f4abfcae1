//! `ztna-recorder`, the agent binary: parses arguments and hands over to the library.
#![forbid(unsafe_code)]

use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "ztna-recorder", version, about = "SSH session recorder agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Record a command in a new PTY to an asciicast v2 file.
    Record(ztna_recorder::record::RecordArgs),
    /// sshd's ForceCommand: run the user's session, recorded.
    Shell(ztna_recorder::shell::ShellArgs),
    /// The systemd service: spool and upload sessions.
    Daemon(ztna_recorder::daemon::DaemonArgs),
    /// Show the daemon's state.
    Status(ztna_recorder::status::StatusArgs),
    /// Check the configuration (`config check`).
    Config {
        #[command(subcommand)]
        command: ztna_recorder::check::ConfigCommand,
    },
    #[command(flatten)]
    Docs(ztna_common::cli_docs::DocsCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Record(a) => ztna_recorder::record::run(a),
        Command::Shell(a) => ztna_recorder::shell::run(a),
        Command::Daemon(a) => ztna_recorder::daemon::run(a),
        Command::Status(a) => ztna_recorder::status::run(a),
        Command::Config { command } => ztna_recorder::check::run(command),
        Command::Docs(d) => ztna_common::cli_docs::run(&d, Cli::command())
            .map(|()| 0)
            .map_err(Into::into),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ztna-recorder: {e:#}");
            ExitCode::from(1)
        }
    }
}
