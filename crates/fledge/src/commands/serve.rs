//! `fledge serve` (being built; see the issue tracker).

/// Arguments of `fledge serve`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs the subcommand.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`fledge serve` is not built yet")
}
