//! `ztna-recorder-server`: the bundled backend.
#![forbid(unsafe_code)]

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "ztna-recorder-server",
    version,
    about = "Session-recording backend"
)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
