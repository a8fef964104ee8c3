//! `fledge fledgelet`: the worker agent, exactly as the `fledgelet` binary runs it.
//!
//! Deployers started by this binary (`standalone`, `serve --services deployer`) launch their
//! workers as `<this executable> fledgelet ...`, so one `fledge` binary is all a machine needs:
//! the agent, the built-in roles (`run-task`) and the services come from the same build. The
//! separate `fledgelet` binary (crate `fledge-agent`) is the same agent for images that ship
//! only the agent.

use std::path::PathBuf;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use fledge_types::TaskState;

use super::Exit;

/// Arguments of `fledge fledgelet` (each also read from its `FLEDGE_*` variable).
pub type Args = fledge_agent::cli::FledgeletArgs;

/// Runs one task's agent; exits like the `fledgelet` binary: 0 when the task completed, 1
/// otherwise, 64 for bad usage, 2 when it cannot start ([`fledge_agent::cli::error_exit_code`]).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let outcome = match start(args, shutdown).await {
        Ok(outcome) => outcome,
        Err(err) => {
            eprintln!("error: {err:#}");
            return Err(Exit(fledge_agent::cli::error_exit_code(&err)).into());
        }
    };
    match outcome.state {
        TaskState::Completed => Ok(()),
        _ => Err(Exit(fledge_agent::cli::EX_TASK_FAILED).into()),
    }
}

async fn start(
    args: Args,
    shutdown: CancellationToken,
) -> anyhow::Result<fledge_agent::supervisor::Outcome> {
    fledge_agent::cli::stop_on_signal(shutdown.clone())
        .context("cannot watch SIGTERM and SIGINT")?;
    Ok(fledge_agent::cli::run(args, shutdown).await?)
}

/// The program and leading arguments that start an agent: this executable's `fledgelet`
/// subcommand.
pub fn agent_command() -> anyhow::Result<(PathBuf, Vec<String>)> {
    let exe = std::env::current_exe().context("cannot locate the running fledge executable")?;
    Ok((exe, vec!["fledgelet".to_owned()]))
}
