//! `ztna-recorder shell` (not built yet).

/// Arguments of `ztna-recorder shell`.
#[derive(clap::Args, Debug)]
pub struct ShellArgs {}

pub fn run(_args: ShellArgs) -> anyhow::Result<u8> {
    anyhow::bail!("`shell` is not available in this build yet")
}
