//! `fledge bench` (being built; see the issue tracker).

/// Arguments of `fledge bench`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs the subcommand.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`fledge bench` is not built yet")
}
