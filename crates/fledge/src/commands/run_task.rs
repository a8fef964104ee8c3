//! `fledge run-task` (being built; see the issue tracker).

/// Arguments of `fledge run-task`.
#[derive(clap::Args)]
pub struct Args {}

/// Runs the subcommand.
pub async fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`fledge run-task` is not built yet")
}
