//! `ztna-recorder status` (not built yet).

/// Arguments of `ztna-recorder status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {}

pub fn run(_args: StatusArgs) -> anyhow::Result<u8> {
    anyhow::bail!("`status` is not available in this build yet")
}
