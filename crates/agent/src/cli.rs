//! The `fledgelet` command line as a library, so the `fledge` binary can embed it as a
//! subcommand (`fledge fledgelet ...`) as well as the standalone `fledgelet` binary.
//!
//! [`FledgeletArgs`] are the flags (each also read from a `FLEDGE_*` variable); [`run`] turns
//! them into a task client, a notifier subscription and [`SupervisorOptions`], and runs
//! [`fledgelet::run`] until the task ended. Signals and logging belong to the caller.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use fledge_types::{JobId, TaskId, TaskState};

use crate::api::{Backoff, TaskApi, retry};
use crate::bundle::Limits;
use crate::deployer::sibling_or_path;
use crate::entrypoint::Tools;
use crate::fledgelet;
use crate::sandbox;
use crate::supervisor::{Outcome, SupervisorOptions, TaskEnv};

/// Errors before the task could be run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The apiserver URL, the CA or the task key is unusable (a CA fingerprint mismatch too).
    #[error("invalid --apiserver, --ca-file/--ca-fingerprint or --task-key")]
    Client(#[source] fledge_client::Error),
    /// The apiserver refused to let this agent join its task (a wrong key, most often).
    #[error("the apiserver refused task {task} with this key")]
    Refused {
        /// The task.
        task: TaskId,
        /// The apiserver's answer.
        #[source]
        source: anyhow::Error,
    },
    /// The apiserver could not be reached while joining.
    #[error("cannot reach the apiserver to join task {task}")]
    Unreachable {
        /// The task.
        task: TaskId,
        /// The last failure.
        #[source]
        source: anyhow::Error,
    },
    /// The flags contradict what the apiserver says, or something needed is missing.
    #[error("cannot run task {task}: {reason}")]
    Join {
        /// The task.
        task: TaskId,
        /// What is wrong.
        reason: String,
    },
}

/// Flags of `fledgelet` (each also read from its `FLEDGE_*` variable).
#[derive(Clone, Debug, clap::Args, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FledgeletArgs {
    /// The task to run.
    #[arg(long, env = "FLEDGE_TASK_ID")]
    pub task_id: String,
    /// The task's key (authenticates this agent; prefer the environment variable or
    /// --task-key-file).
    #[arg(
        long,
        env = "FLEDGE_TASK_KEY",
        hide_env_values = true,
        required_unless_present = "task_key_file",
        conflicts_with = "task_key_file"
    )]
    #[serde(skip_serializing)]
    pub task_key: Option<String>,
    /// A file holding the task's key (e.g. a secret a container runtime mounts); read once at
    /// start, surrounding whitespace ignored.
    #[arg(long, env = "FLEDGE_TASK_KEY_FILE")]
    pub task_key_file: Option<PathBuf>,
    /// The task's job [default: as the apiserver says].
    #[arg(long, env = "FLEDGE_JOB_ID")]
    pub job_id: Option<String>,
    /// Apiserver base URL, e.g. https://127.0.0.1:10100.
    #[arg(long, env = "FLEDGE_APISERVER")]
    pub apiserver: String,
    /// The control plane's CA (PEM file) to trust for https URLs.
    #[arg(long, env = "FLEDGE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// The control plane CA's fingerprint (sha256:...): the CA is fetched from the apiserver
    /// and trusted only if it matches (what a printed join command carries).
    #[arg(long, env = "FLEDGE_CA_FINGERPRINT")]
    pub ca_fingerprint: Option<String>,
    /// Notifier URL, e.g. http://127.0.0.1:10101 [default: as the apiserver says].
    #[arg(long, env = "FLEDGE_NOTIFIER")]
    pub notifier: Option<String>,
    /// Private work dir for the task's code, config and log (created if missing).
    #[arg(long, env = "FLEDGE_WORK_DIR")]
    pub work_dir: PathBuf,
    /// The `fledge` binary that runs built-in roles [default: `fledge` next to this
    /// executable, else on PATH].
    #[arg(long, env = "FLEDGE_BIN")]
    pub fledge_bin: Option<PathBuf>,
    /// Python interpreter for `main.py` roles.
    #[arg(long, env = "FLEDGE_PYTHON", default_value = "python3")]
    pub python: PathBuf,
    /// Seconds between heartbeats while the task runs.
    #[arg(long, env = "FLEDGE_HEARTBEAT_INTERVAL", default_value_t = 2.0, value_parser = seconds)]
    pub heartbeat_interval: f64,
    /// Seconds between SIGTERM and SIGKILL when stopping the task's code.
    #[arg(long, env = "FLEDGE_STOP_GRACE", default_value_t = 10.0, value_parser = seconds)]
    pub stop_grace: f64,
    /// Seconds to keep retrying a status report or a fetch while the control plane is down.
    #[arg(long, env = "FLEDGE_REPORT_TIMEOUT", default_value_t = 300.0, value_parser = seconds)]
    pub report_timeout: f64,
    /// Largest code bundle accepted, in bytes once unpacked.
    #[arg(long, env = "FLEDGE_MAX_CODE_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_code_bytes: u64,
    /// Confinement of the task's code with Landlock: `auto` (what the kernel supports, and
    /// the task's log says what is in force), `required` (refuse to run unconfined code) or
    /// `off`.
    #[arg(long, env = "FLEDGE_SANDBOX", value_enum, default_value_t = sandbox::Mode::Auto)]
    pub sandbox: sandbox::Mode,
    /// A path the task's code may never be granted, e.g. the control plane's data dir
    /// (repeatable; the CLI config dir of this agent's user is always one).
    #[arg(long = "sandbox-protect", value_name = "PATH")]
    pub sandbox_protect: Vec<PathBuf>,
    /// A directory datasets must lie in (repeatable) [default: anywhere but protected paths].
    #[arg(long = "sandbox-data-root", value_name = "DIR")]
    pub sandbox_data_root: Vec<PathBuf>,
    /// A path the task's code may read and execute besides the system's runtime and the
    /// program's installation (repeatable).
    #[arg(long = "sandbox-read", value_name = "PATH")]
    pub sandbox_read: Vec<PathBuf>,
    /// The IP address the task's p2p ends listen on, e.g. `0.0.0.0` in a container whose
    /// peers are elsewhere [default: 127.0.0.1].
    #[arg(long, env = "FLEDGE_P2P_LISTEN_HOST", value_name = "IP")]
    pub p2p_listen_host: Option<std::net::IpAddr>,
    /// The host name or IP address the task's peers reach its p2p ends at (advertised to the
    /// metaserver) [default: the listen address].
    #[arg(long, env = "FLEDGE_P2P_ADVERTISE_HOST", value_name = "HOST", value_parser = dialable_host)]
    pub p2p_advertise_host: Option<String>,
}

fn dialable_host(text: &str) -> Result<String, String> {
    fledge_types::validate::dialable_host(text.trim())
}

fn seconds(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(value.is_finite() && value > 0.0 && value < 1e9) {
        return Err(format!("{text} must be a positive number of seconds"));
    }
    Ok(value)
}

/// Largest task key file accepted (keys are a few dozen bytes).
const MAX_TASK_KEY_FILE_BYTES: u64 = 4096;

impl FledgeletArgs {
    /// The task key: `--task-key`, or the contents of `--task-key-file` (which then also fills
    /// `task_key`). A missing, oversized, non-UTF-8 or blank file is an error naming the file.
    pub fn resolve_task_key(&mut self) -> Result<String, Error> {
        if let Some(key) = &self.task_key {
            return Ok(key.clone());
        }
        let task = TaskId::new(self.task_id.clone());
        let Some(path) = &self.task_key_file else {
            return Err(Error::Join {
                task,
                reason: "no --task-key or --task-key-file".to_owned(),
            });
        };
        let bad = |why: String| Error::Join {
            task: task.clone(),
            reason: format!("--task-key-file {}: {why}", path.display()),
        };
        let mut text = String::new();
        let file = std::fs::File::open(path).map_err(|err| bad(err.to_string()))?;
        let read = std::io::Read::read_to_string(
            &mut std::io::Read::take(file, MAX_TASK_KEY_FILE_BYTES + 1),
            &mut text,
        )
        .map_err(|err| bad(err.to_string()))?;
        if read as u64 > MAX_TASK_KEY_FILE_BYTES {
            return Err(bad(format!("larger than {MAX_TASK_KEY_FILE_BYTES} bytes")));
        }
        let key = text.trim();
        if key.is_empty() {
            return Err(bad("empty".to_owned()));
        }
        if key.chars().any(char::is_whitespace) {
            return Err(bad("a key has no whitespace inside".to_owned()));
        }
        self.task_key = Some(key.to_owned());
        Ok(key.to_owned())
    }

    /// The effective configuration as TOML, without the task key (for `--dump-config`).
    pub fn dump(&self) -> String {
        toml::to_string(self).expect("flags always serialize to TOML")
    }

    /// The supervisor options these flags describe, for a task of job `job_id`.
    pub fn supervisor_options(&self, job_id: JobId) -> SupervisorOptions {
        let tools = Tools {
            python: self.python.clone(),
            fledge_bin: self.fledge_bin.clone().unwrap_or_else(|| sibling_or_path("fledge")),
        };
        let env = TaskEnv {
            task_id: TaskId::new(self.task_id.clone()),
            task_key: self.task_key.clone().unwrap_or_default(),
            job_id,
            apiserver: self.apiserver.clone(),
            ca_pem: None,
        };
        // Absolute: the child runs in the code dir and is handed paths inside the work dir
        // (a data owner typically passes a relative one).
        let work_dir =
            std::path::absolute(&self.work_dir).unwrap_or_else(|_| self.work_dir.clone());
        let mut opts = SupervisorOptions::new(work_dir, env, tools);
        opts.heartbeat_interval = Duration::from_secs_f64(self.heartbeat_interval);
        opts.stop_grace = Duration::from_secs_f64(self.stop_grace);
        let backoff = Backoff {
            max_elapsed: Duration::from_secs_f64(self.report_timeout),
            ..Backoff::default()
        };
        opts.report_backoff = backoff;
        opts.fetch_backoff = backoff;
        opts.bundle_limits = Limits { max_total_bytes: self.max_code_bytes, ..Limits::default() };
        let mut protected = self.sandbox_protect.clone();
        if let Some(home) = std::env::var_os("HOME") {
            protected.push(PathBuf::from(home).join(".fledge"));
        }
        if let Some(ip) = self.p2p_listen_host {
            opts.worker_env.push(("FLEDGE_P2P_LISTEN_HOST".to_owned(), ip.to_string()));
        }
        if let Some(host) = &self.p2p_advertise_host {
            opts.worker_env.push(("FLEDGE_P2P_ADVERTISE_HOST".to_owned(), host.clone()));
        }
        opts.sandbox = sandbox::Policy {
            mode: self.sandbox,
            protected,
            data_roots: self.sandbox_data_root.clone(),
            read: self.sandbox_read.clone(),
        };
        opts
    }
}

/// Runs the agent for one task until the task ended; `shutdown` (wire it to SIGTERM/SIGINT)
/// stops the task like a STOP event.
///
/// The agent first joins (`GET /tasks/{taskId}`): a wrong key fails here, before anything
/// waits (a participant-run task takes only the key its job's owner minted with `fledgectl job
/// join`); the job id and the notifier URL come from the apiserver unless given.
pub async fn run(mut args: FledgeletArgs, shutdown: CancellationToken) -> Result<Outcome, Error> {
    let task_id = TaskId::new(args.task_id.clone());
    let task_key = args.resolve_task_key()?;
    let ca = trusted_ca(&args).await?;
    let client = fledge_client::TaskClient::new(&args.apiserver, task_id.clone(), &task_key)
        .and_then(|client| client.with_ca(ca.as_ref()))
        .map_err(Error::Client)?;
    let join_backoff =
        Backoff { max_elapsed: Duration::from_secs_f64(args.report_timeout), ..Backoff::default() };
    let joined = tokio::select! {
        res = retry(join_backoff, "join", || async {
            client.join().await.map_err(crate::api::Error::from)
        }) => res,
        () = shutdown.cancelled() => {
            return Err(Error::Join { task: task_id, reason: "shut down while joining".to_owned() });
        }
    };
    let joined = match joined {
        Ok(joined) => joined,
        Err(err) if err.is_transient() => {
            return Err(Error::Unreachable { task: task_id, source: err.into() });
        }
        Err(err) => return Err(Error::Refused { task: task_id, source: err.into() }),
    };
    let task = joined.task;
    let job_id = match &args.job_id {
        Some(given) if given != task.job_id.as_str() => {
            return Err(Error::Join {
                task: task_id,
                reason: format!("it belongs to job {}, not to --job-id {given}", task.job_id),
            });
        }
        _ => task.job_id.clone(),
    };
    if task.state.is_final() {
        return Err(Error::Join {
            task: task_id,
            reason: format!("it is {} already (job {job_id})", task.state),
        });
    }
    let Some(notifier) = args.notifier.clone().or(joined.notifier) else {
        return Err(Error::Join {
            task: task_id,
            reason: "the apiserver does not say where its notifier is; pass --notifier".to_owned(),
        });
    };
    if !task.managed {
        tracing::info!(%task_id, %job_id, role = %task.role, "joined participant-run task");
    }
    let mut opts = args.supervisor_options(job_id.clone());
    opts.participant_run = !task.managed;
    opts.task.ca_pem = ca.as_ref().map(|ca| ca.pem().to_owned());
    let api: Arc<dyn TaskApi> = Arc::new(client);
    let events =
        fledge_client::subscribe_task(&notifier, ca.as_ref(), &job_id, &task_id, &task_key);
    let span = tracing::info_span!("task", %job_id, %task_id);
    let outcome = fledgelet::run(&opts, api, events, shutdown).instrument(span).await;
    tracing::info!(state = %outcome.state, reported = outcome.reported, "fledgelet done");
    Ok(outcome)
}

/// The CA the flags name: `--ca-file` (checked against `--ca-fingerprint` when both are
/// given), else the apiserver's CA checked against `--ca-fingerprint`; `None` (system roots,
/// or plain http) without either.
async fn trusted_ca(args: &FledgeletArgs) -> Result<Option<fledge_client::Ca>, Error> {
    let tls = |source| {
        Error::Client(fledge_client::Error::Tls { endpoint: args.apiserver.clone(), source })
    };
    let fingerprint = args
        .ca_fingerprint
        .as_deref()
        .map(str::parse::<fledge_client::Fingerprint>)
        .transpose()
        .map_err(tls)?;
    match (&args.ca_file, fingerprint) {
        (Some(path), fingerprint) => {
            let ca = fledge_client::trust::load_ca(&args.apiserver, path).map_err(Error::Client)?;
            if let Some(fingerprint) = fingerprint {
                ca.verify_fingerprint(&fingerprint).map_err(tls)?;
            }
            Ok(Some(ca))
        }
        (None, Some(fingerprint)) => fledge_client::fetch_ca(&args.apiserver, &fingerprint)
            .await
            .map(Some)
            .map_err(Error::Client),
        (None, None) => Ok(None),
    }
}

/// Exit code of an agent whose task did not complete.
pub const EX_TASK_FAILED: u8 = 1;
/// Exit code of an agent that cannot start at all (no runtime, no signal handler, the
/// apiserver unreachable while joining).
pub const EX_CANNOT_START: u8 = 2;
/// Exit code for bad usage (`EX_USAGE`): flags, or a task key or task the apiserver refuses.
pub const EX_USAGE: u8 = 64;

impl Error {
    /// The process exit code this error ends the agent with.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Client(_) | Error::Refused { .. } | Error::Join { .. } => EX_USAGE,
            Error::Unreachable { .. } => EX_CANNOT_START,
        }
    }
}

/// The process exit code for an error of [`run`] or of setting it up: the [`Error`]'s when it
/// is one, [`EX_CANNOT_START`] otherwise. The `fledgelet` binary and `fledge fledgelet` both
/// use it, so they exit alike.
pub fn error_exit_code(err: &anyhow::Error) -> u8 {
    err.chain().find_map(|e| e.downcast_ref::<Error>()).map_or(EX_CANNOT_START, Error::exit_code)
}

/// The process exit code for a task's final state: 0 when completed, 1 otherwise.
pub fn exit_code(state: TaskState) -> ExitCode {
    if state == TaskState::Completed { ExitCode::SUCCESS } else { ExitCode::from(EX_TASK_FAILED) }
}

/// Cancels `shutdown` on SIGTERM or SIGINT, so a signal stops the task as a STOP event does.
/// Call it from inside the runtime that runs the agent.
pub fn stop_on_signal(shutdown: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    #[test]
    fn exit_codes_say_usage_or_cannot_start() {
        let task = TaskId::from("t1");
        let usage = Error::Join { task: task.clone(), reason: "no".to_owned() };
        let down = Error::Unreachable { task, source: anyhow::anyhow!("refused") };
        assert_eq!(error_exit_code(&anyhow::Error::new(usage)), EX_USAGE);
        let wrapped = anyhow::Error::new(down).context("joining");
        assert_eq!(error_exit_code(&wrapped), EX_CANNOT_START);
        assert_eq!(error_exit_code(&anyhow::anyhow!("no signal handler")), EX_CANNOT_START);
    }

    use super::*;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: FledgeletArgs,
    }

    const REQUIRED: [&str; 13] = [
        "fledgelet",
        "--task-id",
        "t1",
        "--task-key",
        "k",
        "--job-id",
        "j1",
        "--apiserver",
        "http://127.0.0.1:1",
        "--notifier",
        "http://127.0.0.1:2",
        "--work-dir",
        "/w",
    ];

    #[test]
    fn flags_become_supervisor_options_with_defaults() {
        let mut argv = REQUIRED.to_vec();
        argv.extend(["--heartbeat-interval", "0.5", "--fledge-bin", "/opt/fledge"]);
        let cli = Cli::try_parse_from(argv).expect("valid flags");
        let opts = cli.args.supervisor_options(JobId::new("j1"));
        assert_eq!(opts.task.task_id.as_str(), "t1");
        assert_eq!(opts.task.task_key, "k");
        assert_eq!(opts.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(opts.stop_grace, Duration::from_secs(10));
        assert_eq!(opts.tools.fledge_bin, PathBuf::from("/opt/fledge"));
        assert_eq!(opts.tools.python, PathBuf::from("python3"));
        let mut relative = cli.args.clone();
        relative.work_dir = PathBuf::from("work");
        let opts = relative.supervisor_options(JobId::new("j1"));
        assert!(opts.work_dir.is_absolute() && opts.work_dir.ends_with("work"), "{opts:?}");
        assert_eq!(opts.report_backoff.max_elapsed, Duration::from_secs(300));
        let dump = cli.args.dump();
        assert!(
            dump.contains("task-id = \"t1\"") && dump.contains("heartbeat-interval = 0.5"),
            "{dump}"
        );
        assert!(!dump.contains("task-key"), "{dump}");
    }

    #[test]
    fn the_key_comes_from_a_file_when_asked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, "s3cret\n").expect("write key");
        let mut argv: Vec<&str> =
            REQUIRED.iter().copied().filter(|a| *a != "--task-key" && *a != "k").collect();
        let file = path.to_str().expect("utf-8 path");
        argv.extend(["--task-key-file", file]);
        let mut args = Cli::try_parse_from(&argv).expect("a key file suffices").args;
        assert_eq!(args.resolve_task_key().expect("readable"), "s3cret");
        assert_eq!(args.supervisor_options(JobId::new("j1")).task.task_key, "s3cret");

        for (content, why) in [("  \n", "empty"), ("a b", "whitespace")] {
            std::fs::write(&path, content).expect("write");
            let mut args = Cli::try_parse_from(&argv).expect("flags").args;
            let err = args.resolve_task_key().expect_err(why).to_string();
            assert!(err.contains("--task-key-file") && err.contains(why), "{err}");
        }
        std::fs::write(&path, "k".repeat(5000)).expect("write");
        let err = Cli::try_parse_from(&argv).expect("flags").args.resolve_task_key();
        assert!(err.expect_err("too big").to_string().contains("larger than"));
        let missing = dir.path().join("nope");
        let mut argv2 = argv.clone();
        let last = argv2.len() - 1;
        let missing = missing.to_str().expect("utf-8 path").to_owned();
        argv2[last] = &missing;
        let err = Cli::try_parse_from(&argv2).expect("flags").args.resolve_task_key();
        assert!(err.expect_err("missing").to_string().contains("nope"));

        let mut both = REQUIRED.to_vec();
        both.extend(["--task-key-file", file]);
        assert!(Cli::try_parse_from(both).is_err(), "a key and a key file conflict");
        let neither: Vec<&str> = argv[..argv.len() - 2].to_vec();
        assert!(Cli::try_parse_from(neither).is_err(), "a key is required");
    }

    #[test]
    fn bad_flags_are_named() {
        let mut argv = REQUIRED.to_vec();
        argv.extend(["--stop-grace=0"]);
        let err = Cli::try_parse_from(argv).err().expect("negative grace");
        assert!(err.to_string().contains("--stop-grace"), "{err}");
        let err = Cli::try_parse_from(&REQUIRED[..11]).err().expect("no work dir");
        assert!(err.to_string().contains("--work-dir"), "{err}");
    }
}
