//! `fledge image build`: the default worker image of the `docker` deployer, built on the local
//! Docker Engine from this very executable and the shared libraries it links, `FROM scratch`:
//! nothing is pulled, so it works without any registry.

use std::path::PathBuf;

use anyhow::Context as _;

use super::UsageError;

/// Arguments of `fledge image`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(clap::Subcommand, Debug)]
enum ImageCommand {
    /// Build the worker image (`/usr/local/bin/fledge` and its libraries) from this executable.
    Build(BuildArgs),
}

/// Arguments of `fledge image build`.
#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// The image's tag (what a compute's `deployer.docker_image` names).
    #[arg(long, value_name = "NAME:TAG", default_value = "fledge-worker:latest")]
    tag: String,
    /// The Docker Engine's API socket.
    #[arg(long, value_name = "PATH", default_value = "/var/run/docker.sock")]
    docker_socket: PathBuf,
    /// Print the engine's build output.
    #[arg(long)]
    verbose: bool,
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let ImageCommand::Build(args) = args.command;
    if args.tag.trim().is_empty() || args.tag.chars().any(char::is_whitespace) {
        return Err(UsageError(format!("--tag {:?} is not an image tag", args.tag)).into());
    }
    let exe = std::env::current_exe().context("cannot locate the running fledge executable")?;
    let output =
        fledge_agent::deployer::docker::build_worker_image(&args.docker_socket, &args.tag, &exe)
            .await
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("cannot build the worker image {}", args.tag))?;
    #[allow(clippy::print_stdout)]
    {
        if args.verbose {
            print!("{output}");
        }
        println!("built {}", args.tag);
    }
    Ok(())
}
