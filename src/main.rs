//! `ztna-recorder`: parses arguments and runs the PTY-side commands (`record`, `shell`,
//! `status`) in this small binary; the rest goes to `ztna-recorderd` (see `cli`).
#![forbid(unsafe_code)]

use clap::Parser;
use ztna_recorder::cli::{exec_companion, exit, Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    exit(match cli.command {
        Command::Record(a) if !a.upload => ztna_recorder::record::run(a),
        Command::Shell(a) => ztna_recorder::shell::run(a),
        Command::Status(a) => ztna_recorder::status::run(a),
        Command::Daemon(_) => Err(exec_companion(true)),
        Command::Record(_) | Command::Config { .. } | Command::Docs(_) => {
            Err(exec_companion(false))
        }
    })
}
