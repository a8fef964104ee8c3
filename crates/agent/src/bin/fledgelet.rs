//! `fledgelet`: the agent inside each Fledge worker.
//!
//! It subscribes to the notifier for its task, waits for START, fetches the task's config and
//! code with its task key, runs the role's entrypoint as a child process, reports `running`,
//! heartbeats and the final state with the tail of the log, and stops the child on STOP or
//! SIGTERM. Every flag can also come from a `FLEDGE_*` variable (the task key preferably does,
//! so it does not show up in `ps`). Exit code: 0 when the task completed, 1 otherwise, 64 for
//! bad usage (flags, or a task key or task the apiserver refuses), 2 when it cannot start at
//! all (no runtime, no signal handler, the apiserver unreachable). The flags, the loop and the
//! exit codes live in `fledge_agent::cli`, so `fledge fledgelet ...` runs the same agent and
//! exits the same way.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use fledge_agent::cli::{self, FledgeletArgs};

/// Runs one Fledge task: waits for its start event, then fetches, unpacks and runs its code.
#[derive(Debug, Parser)]
#[command(name = "fledgelet", version)]
struct Cli {
    #[command(flatten)]
    args: FledgeletArgs,
    /// Print the effective configuration (TOML, without the task key) and exit.
    #[arg(long)]
    dump_config: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let usage = err.use_stderr();
            let _ = err.print();
            return if usage { ExitCode::from(cli::EX_USAGE) } else { ExitCode::SUCCESS };
        }
    };
    if cli.dump_config {
        print!("{}", cli.args.dump());
        return ExitCode::SUCCESS;
    }
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(cli::EX_CANNOT_START);
        }
    };
    match runtime.block_on(run(cli.args)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(cli::error_exit_code(&err))
        }
    }
}

async fn run(args: FledgeletArgs) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    cli::stop_on_signal(shutdown.clone()).context("cannot watch SIGTERM and SIGINT")?;
    let outcome = cli::run(args, shutdown).await?;
    Ok(cli::exit_code(outcome.state))
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FLEDGE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("FLEDGE_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
