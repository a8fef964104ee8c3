//! `fledge quickstart` (being built; see the issue tracker).

/// Arguments of `fledge quickstart`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs the subcommand.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`fledge quickstart` is not built yet")
}
