//! `fledge standalone` (being built; see the issue tracker).

/// Arguments of `fledge standalone`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs the subcommand.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`fledge standalone` is not built yet")
}
