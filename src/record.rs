//! `ztna-recorder record` (not built yet).

/// Arguments of `ztna-recorder record`.
#[derive(clap::Args, Debug)]
pub struct RecordArgs {}

pub fn run(_args: RecordArgs) -> anyhow::Result<u8> {
    anyhow::bail!("`record` is not available in this build yet")
}
