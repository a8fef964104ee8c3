//! `fledgelet`: the agent inside each Fledge worker.
//!
//! It subscribes to the notifier for its task, waits for START, fetches the task's config and
//! code with its task key, runs the role's entrypoint as a child process, reports `running`,
//! heartbeats and the final state with the tail of the log, and stops the child on STOP or
//! SIGTERM. Every flag can also come from a `FLEDGE_*` variable (the task key preferably does,
//! so it does not show up in `ps`). Exit code: 0 when the task completed, 1 otherwise, 64 for
//! bad usage. See `fledge_agent::fledgelet` for the loop itself.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use fledge_agent::api::{Backoff, TaskApi};
use fledge_agent::bundle::Limits;
use fledge_agent::deployer::sibling_or_path;
use fledge_agent::entrypoint::Tools;
use fledge_agent::fledgelet;
use fledge_agent::supervisor::{SupervisorOptions, TaskEnv};
use fledge_types::{JobId, TaskId, TaskState};

/// Runs one Fledge task: waits for its start event, then fetches, unpacks and runs its code.
#[derive(Debug, Parser)]
#[command(name = "fledgelet", version)]
struct Args {
    /// The task to run.
    #[arg(long, env = "FLEDGE_TASK_ID")]
    task_id: String,
    /// The task's key (authenticates this agent; prefer the environment variable).
    #[arg(long, env = "FLEDGE_TASK_KEY", hide_env_values = true)]
    task_key: String,
    /// The task's job.
    #[arg(long, env = "FLEDGE_JOB_ID")]
    job_id: String,
    /// Apiserver base URL, e.g. http://127.0.0.1:10100.
    #[arg(long, env = "FLEDGE_APISERVER")]
    apiserver: String,
    /// Notifier URL, e.g. http://127.0.0.1:10101.
    #[arg(long, env = "FLEDGE_NOTIFIER")]
    notifier: String,
    /// Private work dir for the task's code, config and log (created if missing).
    #[arg(long, env = "FLEDGE_WORK_DIR")]
    work_dir: PathBuf,
    /// The `fledge` binary that runs built-in roles [default: `fledge` next to this
    /// executable, else on PATH].
    #[arg(long, env = "FLEDGE_BIN")]
    fledge_bin: Option<PathBuf>,
    /// Python interpreter for `main.py` roles.
    #[arg(long, env = "FLEDGE_PYTHON", default_value = "python3")]
    python: PathBuf,
    /// Seconds between heartbeats while the task runs.
    #[arg(long, env = "FLEDGE_HEARTBEAT_INTERVAL", default_value_t = 2.0, value_parser = seconds)]
    heartbeat_interval: f64,
    /// Seconds between SIGTERM and SIGKILL when stopping the task's code.
    #[arg(long, env = "FLEDGE_STOP_GRACE", default_value_t = 10.0, value_parser = seconds)]
    stop_grace: f64,
    /// Seconds to keep retrying a status report or a fetch while the control plane is down.
    #[arg(long, env = "FLEDGE_REPORT_TIMEOUT", default_value_t = 300.0, value_parser = seconds)]
    report_timeout: f64,
    /// Largest code bundle accepted, in bytes once unpacked.
    #[arg(long, env = "FLEDGE_MAX_CODE_BYTES", default_value_t = 256 * 1024 * 1024)]
    max_code_bytes: u64,
}

fn seconds(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(value.is_finite() && value > 0.0 && value < 1e9) {
        return Err(format!("{text} must be a positive number of seconds"));
    }
    Ok(value)
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(err) => {
            let usage = err.use_stderr();
            let _ = err.print();
            return if usage { ExitCode::from(64) } else { ExitCode::SUCCESS };
        }
    };
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(TaskState::Completed) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(64)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<TaskState> {
    let task_id = TaskId::new(args.task_id);
    let job_id = JobId::new(args.job_id);
    let client = fledge_client::TaskClient::new(&args.apiserver, task_id.clone(), &args.task_key)
        .context("invalid --apiserver or --task-key")?;
    let api: Arc<dyn TaskApi> = Arc::new(client);
    let tools = Tools {
        python: args.python,
        fledge_bin: args.fledge_bin.unwrap_or_else(|| sibling_or_path("fledge")),
    };
    let env = TaskEnv {
        task_id: task_id.clone(),
        task_key: args.task_key.clone(),
        job_id: job_id.clone(),
        apiserver: args.apiserver.clone(),
    };
    let mut opts = SupervisorOptions::new(args.work_dir, env, tools);
    opts.heartbeat_interval = Duration::from_secs_f64(args.heartbeat_interval);
    opts.stop_grace = Duration::from_secs_f64(args.stop_grace);
    let backoff =
        Backoff { max_elapsed: Duration::from_secs_f64(args.report_timeout), ..Backoff::default() };
    opts.report_backoff = backoff;
    opts.fetch_backoff = backoff;
    opts.bundle_limits = Limits { max_total_bytes: args.max_code_bytes, ..Limits::default() };

    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone())?;
    let events = fledge_client::subscribe_task(&args.notifier, &job_id, &task_id, &args.task_key);
    let span = tracing::info_span!("task", %job_id, %task_id);
    let outcome = fledgelet::run(&opts, api, events, shutdown).instrument(span).await;
    tracing::info!(state = %outcome.state, reported = outcome.reported, "fledgelet done");
    Ok(outcome.state)
}

/// SIGTERM and SIGINT stop the task (like a STOP event).
fn spawn_signal_handler(shutdown: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
    Ok(())
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FLEDGE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if std::env::var("FLEDGE_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
