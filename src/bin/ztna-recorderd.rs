//! `ztna-recorderd`: the agent's commands that need the async runtime and the HTTP/TLS stack
//! (`daemon`, `config check`, `record --upload`, `man`, `completions`). `ztna-recorder` execs it
//! for those; it accepts every command of `ztna-recorder`, with the same arguments.
#![forbid(unsafe_code)]

use clap::{CommandFactory, Parser};
use ztna_recorder::cli::{exit, Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    exit(match cli.command {
        Command::Record(a) => ztna_recorder::record::run_and_upload(a),
        Command::Shell(a) => ztna_recorder::shell::run(a),
        Command::Daemon(a) => ztna_recorder::daemon::run(a),
        Command::Status(a) => ztna_recorder::status::run(a),
        Command::Config { command } => ztna_recorder::check::run(command),
        Command::Docs(d) => ztna_common::cli_docs::run(&d, Cli::command())
            .map(|()| 0)
            .map_err(Into::into),
    })
}
