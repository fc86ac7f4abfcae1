//! `ztna-recorder daemon` (not built yet).

/// Arguments of `ztna-recorder daemon`.
#[derive(clap::Args, Debug)]
pub struct DaemonArgs {}

pub fn run(_args: DaemonArgs) -> anyhow::Result<u8> {
    anyhow::bail!("`daemon` is not available in this build yet")
}
