//! Running one task: fetch its manifest, unpack its code, run the entrypoint as a child
//! process, report `running`, heartbeats and the final state with the tail of the log.
//!
//! [`run`] is the whole life of one task and returns its [`Outcome`]; it is driven by a stop
//! token (a STOP event or a signal to the agent) and talks to the control plane only through
//! [`TaskApi`], so tests drive it with a fake. The final report is retried while the control
//! plane is unavailable (bounded by [`SupervisorOptions::report_backoff`]), so a control-plane
//! restart in the middle of a job does not lose the task's final state.
//!
//! Work dir layout: `code/` (the unpacked role folder, the child's cwd), `config.json`,
//! `task.log` (everything the child wrote) and `final-state` (written once the final state was
//! accepted; the deployer reads it to tell a clean exit from a crash).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use fledge_types::{ControlPlaneRef, JobId, TaskId, TaskState};

use crate::api::{self, Backoff, TaskApi, retry};
use crate::bundle::{self, Limits};
use crate::entrypoint::{self, CommandLine, Entrypoint, Tools};
use crate::logtail::{self, LogTail};
use crate::process;
use crate::sandbox;

/// File, in the work dir, written once the final state was accepted by the control plane.
pub const REPORTED_MARKER: &str = "final-state";
/// File, in the work dir, holding the child's whole output.
pub const LOG_FILE: &str = "task.log";
/// File, in the work dir, holding the task config passed to the child.
pub const CONFIG_FILE: &str = "config.json";
/// Directory, in the work dir, holding the unpacked role folder.
pub const CODE_DIR: &str = "code";

/// Errors while preparing a task (everything before its code runs).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Fetching from the control plane failed.
    #[error("failed to fetch the task's {what}")]
    Fetch {
        /// `config` or `code`.
        what: &'static str,
        /// Cause.
        #[source]
        source: api::Error,
    },
    /// The code bundle was rejected.
    #[error("failed to unpack the task's code")]
    Bundle(#[source] bundle::Error),
    /// The role folder has no usable entrypoint.
    #[error("cannot run the task's code")]
    Entrypoint(#[source] entrypoint::Error),
    /// Local file system trouble.
    #[error("failed to {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The task's code cannot be confined as the sandbox policy asks.
    #[error("cannot sandbox the task's code")]
    Sandbox(#[source] sandbox::Error),
    /// The entrypoint's program could not be started.
    #[error("failed to start {program}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Identity and endpoints of the task, passed to its child as `FLEDGE_*` variables.
#[derive(Clone, Debug)]
pub struct TaskEnv {
    /// `FLEDGE_TASK_ID`.
    pub task_id: TaskId,
    /// `FLEDGE_TASK_KEY`.
    pub task_key: String,
    /// `FLEDGE_JOB_ID`.
    pub job_id: JobId,
    /// `FLEDGE_APISERVER`.
    pub apiserver: String,
    /// The control plane's CA (PEM) the agent trusts; written into the task config as
    /// `controlPlaneCa` when the apiserver sent none, so the role's own connections trust it.
    pub ca_pem: Option<String>,
}

/// How to run a task.
#[derive(Clone, Debug)]
pub struct SupervisorOptions {
    /// The task's private work dir (created with mode 0700).
    pub work_dir: PathBuf,
    /// The task's identity, passed to the child.
    pub task: TaskEnv,
    /// Interpreters and binaries the entrypoint may need.
    pub tools: Tools,
    /// Time between heartbeats while the child runs (default 2 s).
    pub heartbeat_interval: Duration,
    /// Time between SIGTERM and SIGKILL when stopping (default 10 s).
    pub stop_grace: Duration,
    /// Retry policy of status reports (default: up to 300 s).
    pub report_backoff: Backoff,
    /// Retry policy of the config and code fetch (default: up to 300 s).
    pub fetch_backoff: Backoff,
    /// Bounds of the code bundle.
    pub bundle_limits: Limits,
    /// Bytes of log tail reported with the final state (default 64 KiB).
    pub tail_max_bytes: usize,
    /// Lines of log tail reported with the final state (default 200).
    pub tail_max_lines: usize,
    /// Time between posts of the new log lines while the child runs (default 1 s); the last
    /// ones are posted before the final state is reported.
    pub log_interval: Duration,
    /// The task is participant-run: its data owner started this agent and may restart it, so
    /// a local shutdown leaves the task without a final state (see [`run_or_leave`]).
    pub participant_run: bool,
    /// How the task's code is confined ([`sandbox`]; default: Landlock where the kernel has it).
    pub sandbox: sandbox::Policy,
    /// Variables the task's process gets besides its identity: where its p2p ends listen and
    /// what they advertise (`FLEDGE_P2P_LISTEN_HOST`, `FLEDGE_P2P_ADVERTISE_HOST`).
    pub worker_env: Vec<(String, String)>,
}

impl SupervisorOptions {
    /// Options with the defaults for everything but the work dir, identity and tools.
    pub fn new(work_dir: PathBuf, task: TaskEnv, tools: Tools) -> Self {
        Self {
            work_dir,
            task,
            tools,
            heartbeat_interval: Duration::from_secs(2),
            stop_grace: Duration::from_secs(10),
            report_backoff: Backoff::default(),
            fetch_backoff: Backoff::default(),
            bundle_limits: Limits::default(),
            tail_max_bytes: logtail::DEFAULT_MAX_BYTES,
            tail_max_lines: logtail::DEFAULT_MAX_LINES,
            log_interval: Duration::from_secs(1),
            participant_run: false,
            sandbox: sandbox::Policy::default(),
            worker_env: Vec::new(),
        }
    }
}

/// How a task ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The final state.
    pub state: TaskState,
    /// The log tail reported with it.
    pub log: String,
    /// Whether the control plane accepted the report.
    pub reported: bool,
}

/// Runs the task to its end: prepare, run, report. Never panics on bad input; every failure
/// becomes a `failed` outcome whose log says what went wrong.
pub async fn run(
    opts: &SupervisorOptions,
    api: Arc<dyn TaskApi>,
    stop: CancellationToken,
) -> Outcome {
    run_or_leave(opts, api, stop, CancellationToken::new()).await
}

/// [`run`], except that a stop while `leave` is cancelled (a participant-run task's agent shut
/// down by its data owner) ends the code without a final state: the task stays `running`,
/// the log says so, and an agent started again with the same key rejoins it. If none does,
/// the controller fails the task once its heartbeats have been missing for its timeout.
pub async fn run_or_leave(
    opts: &SupervisorOptions,
    api: Arc<dyn TaskApi>,
    stop: CancellationToken,
    leave: CancellationToken,
) -> Outcome {
    let mut tail = LogTail::new(opts.tail_max_bytes, opts.tail_max_lines);
    let prepared = tokio::select! {
        res = prepare(opts, api.as_ref()) => res,
        () = stop.cancelled() => {
            tail.push_line("[fledgelet] stopped before the task's code started".to_owned());
            if leave.is_cancelled() {
                return left(api.as_ref(), tail.render()).await;
            }
            return finish(opts, api.as_ref(), TaskState::Terminated, tail.render()).await;
        }
    };
    let (command_line, confined) = match prepared {
        Ok(prepared) => prepared,
        Err(err) => {
            tracing::warn!(error = %chain(&err), "task preparation failed");
            tail.push_line(format!("[fledgelet] {}", chain(&err)));
            return finish(opts, api.as_ref(), TaskState::Failed, tail.render()).await;
        }
    };
    for line in &confined.summary {
        tail.push_line(format!("[fledgelet] {line}"));
    }
    execute(opts, api, stop, leave, command_line, confined, tail).await
}

/// The agent leaves a participant-run task that keeps running: the log (reported with state
/// `running`, best effort) says how to rejoin.
async fn left(api: &dyn TaskApi, log: String) -> Outcome {
    let mut log = log;
    if !log.is_empty() && !log.ends_with('\n') {
        log.push('\n');
    }
    log.push_str(
        "[fledgelet] the agent was shut down by its data owner; the task stays running: start \
         the agent again with the same task id and key to rejoin\n",
    );
    let res = api.set_status(TaskState::Running, &log).await;
    if let Err(err) = &res {
        tracing::warn!(error = %chain(err), "the leave was not reported");
    }
    tracing::info!("left the participant-run task; it can be rejoined with the same key");
    Outcome { state: TaskState::Running, log, reported: res.is_ok() }
}

/// Reports a final state without running anything (e.g. STOP before START).
pub async fn finish(
    opts: &SupervisorOptions,
    api: &dyn TaskApi,
    state: TaskState,
    log: String,
) -> Outcome {
    let res =
        retry(opts.report_backoff, "report final state", || api.set_status(state, &log)).await;
    let reported = match res {
        Ok(()) => {
            let marker = opts.work_dir.join(REPORTED_MARKER);
            if let Err(err) = tokio::fs::write(&marker, state.to_string()).await {
                tracing::warn!(path = %marker.display(), %err, "failed to write the reported marker");
            }
            true
        }
        Err(err) => {
            tracing::error!(?state, error = %chain(&err), "final state not reported");
            false
        }
    };
    Outcome { state, log, reported }
}

/// Fetches config and code, unpacks, resolves the entrypoint and prepares its sandbox.
async fn prepare(
    opts: &SupervisorOptions,
    api: &dyn TaskApi,
) -> Result<(CommandLine, sandbox::Prepared)> {
    let work_dir = &opts.work_dir;
    create_private_dir(work_dir).await?;

    let mut config = retry(opts.fetch_backoff, "fetch config", || api.config())
        .await
        .map_err(|source| Error::Fetch { what: "config", source })?;
    if config.control_plane.is_none() {
        config.control_plane = Some(ControlPlaneRef { apiserver: opts.task.apiserver.clone() });
    }
    if config.control_plane_ca.is_none() {
        config.control_plane_ca = opts.task.ca_pem.clone();
    }
    let zip = retry(opts.fetch_backoff, "fetch code", || api.code())
        .await
        .map_err(|source| Error::Fetch { what: "code", source })?;

    let code_dir = work_dir.join(CODE_DIR);
    let limits = opts.bundle_limits;
    let dir = code_dir.clone();
    let files = tokio::task::spawn_blocking(move || {
        if dir.exists() {
            // Left over from an earlier attempt: start from the bundle alone.
            std::fs::remove_dir_all(&dir).map_err(|source| {
                Error::Bundle(bundle::Error::Write { path: dir.clone(), source })
            })?;
        }
        bundle::extract(&zip, &dir, limits).map_err(Error::Bundle)
    })
    .await
    .expect("bundle extraction does not panic")?;
    tracing::debug!(files, dir = %code_dir.display(), "code unpacked");

    let config_path = work_dir.join(CONFIG_FILE);
    let json = serde_json::to_vec_pretty(&config).expect("a TaskConfig always serializes");
    tokio::fs::write(&config_path, json).await.map_err(|source| Error::Io {
        what: "write",
        path: config_path.clone(),
        source,
    })?;

    let entrypoint = Entrypoint::resolve(&code_dir).map_err(Error::Entrypoint)?;
    let command_line = entrypoint.command_line(&config_path, &opts.tools);
    let confined = confine(opts, &config, &command_line, &code_dir)?;
    Ok((command_line, confined))
}

/// The sandbox of the task's code: its grants under the compute's policy, as a ruleset ready
/// to apply.
fn confine(
    opts: &SupervisorOptions,
    config: &fledge_types::TaskConfig,
    command_line: &CommandLine,
    code_dir: &Path,
) -> Result<sandbox::Prepared> {
    if opts.sandbox.mode == sandbox::Mode::Off {
        return sandbox::prepare(sandbox::Mode::Off, &sandbox::Grants::default())
            .map_err(Error::Sandbox);
    }
    let path_var = std::env::var("PATH").ok();
    let python_paths = ["VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"]
        .iter()
        .filter_map(std::env::var_os)
        .flat_map(|value| std::env::split_paths(&value).collect::<Vec<_>>())
        .filter(|path| path.is_absolute())
        .collect();
    let registry_root = match config.registry.sort.as_str() {
        "" | "local" | fledge_types::DUMMY_REGISTRY => {
            let uri = config.registry.uri.strip_prefix("file://").unwrap_or(&config.registry.uri);
            (!uri.is_empty()).then(|| code_dir.join(uri))
        }
        _ => None,
    };
    let mut datasets = Vec::new();
    if let Some(dataset) = &config.dataset {
        datasets.extend(sandbox::local_path(&dataset.url));
    }
    if let Some(serde_json::Value::String(url)) = config.hyperparameters.get("evalDataset") {
        datasets.extend(sandbox::local_path(url));
    }
    let request = sandbox::Request {
        work_dir: &opts.work_dir,
        programs: [&command_line.program, &opts.tools.python, &opts.tools.fledge_bin]
            .into_iter()
            .cloned()
            .chain(std::env::var_os("FLEDGE_BIN").map(PathBuf::from))
            .collect(),
        cwd: code_dir,
        path_var: path_var.as_deref(),
        python_paths,
        registry_root,
        job: config.job.id.as_str(),
        datasets,
    };
    let grants = opts.sandbox.grants(&request).map_err(Error::Sandbox)?;
    sandbox::prepare(opts.sandbox.mode, &grants).map_err(Error::Sandbox)
}

/// Runs the child to its end and reports.
async fn execute(
    opts: &SupervisorOptions,
    api: Arc<dyn TaskApi>,
    stop: CancellationToken,
    leave: CancellationToken,
    command_line: CommandLine,
    confined: sandbox::Prepared,
    tail: LogTail,
) -> Outcome {
    let tail = Arc::new(Mutex::new(tail));
    let code_dir = opts.work_dir.join(CODE_DIR);
    let log_path = opts.work_dir.join(LOG_FILE);
    let shown = format!("{} {}", command_line.program.display(), command_line.args.join(" "));
    push_line(&tail, format!("[fledgelet] running {shown}"));

    let mut command = Command::new(&command_line.program);
    // The task code sees the allowlist, its own HOME and TMPDIR, and its task's variables
    // below: nothing else of the fledgelet's environment.
    if let Err(source) = process::worker_env(&mut command, &opts.work_dir) {
        let err = Error::Spawn { program: command_line.program.clone(), source };
        push_line(&tail, format!("[fledgelet] {}", chain(&err)));
        let log = render(&tail);
        return finish(opts, api.as_ref(), TaskState::Failed, log).await;
    }
    if let Ok(bin) = std::env::var("FLEDGE_BIN") {
        // Built-in roles run this binary.
        command.env("FLEDGE_BIN", bin);
    }
    command
        .args(&command_line.args)
        .current_dir(&code_dir)
        .env("FLEDGE_TASK_ID", opts.task.task_id.as_str())
        .env("FLEDGE_TASK_KEY", &opts.task.task_key)
        .env("FLEDGE_JOB_ID", opts.task.job_id.as_str())
        .env("FLEDGE_APISERVER", &opts.task.apiserver)
        // Its output goes to a log file and the status report, not a terminal.
        .env("NO_COLOR", "1")
        .envs(command_line.env.iter().map(|(k, v)| (k, v)))
        .envs(opts.worker_env.iter().map(|(k, v)| (k, v)))
        // Registry credentials go to Fledge's own roles only, never to user code.
        .envs(process::registry_env(command_line.builtin, |name| std::env::var(name).ok()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    process::isolate(&mut command);
    confined.apply(&mut command);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(source) => {
            let err = Error::Spawn { program: command_line.program.clone(), source };
            tracing::warn!(error = %chain(&err), "task code did not start");
            push_line(&tail, format!("[fledgelet] {}", chain(&err)));
            let log = render(&tail);
            return finish(opts, api.as_ref(), TaskState::Failed, log).await;
        }
    };
    let pid = child.id();
    tracing::info!(?pid, command = %shown, "task code started");

    let mut pumps = tokio::task::JoinSet::new();
    if let Some(stdout) = child.stdout.take() {
        pumps.spawn(pump(stdout, log_path.clone(), tail.clone()));
    }
    if let Some(stderr) = child.stderr.take() {
        pumps.spawn(pump(stderr, log_path.clone(), tail.clone()));
    }

    // The output streams to the control plane as it comes (`fledgectl logs -f`).
    let log_stream = LogStream::new(api.clone(), tail.clone());
    let streaming = {
        let log_stream = log_stream.clone();
        let interval = opts.log_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                if !log_stream.flush().await {
                    break;
                }
            }
        })
    };

    // `running` and heartbeats go on beside the child; neither may delay the final report.
    let running = {
        let api = api.clone();
        let backoff = opts.report_backoff;
        tokio::spawn(async move {
            if let Err(err) =
                retry(backoff, "report running", || api.set_status(TaskState::Running, "")).await
            {
                tracing::warn!(error = %chain(&err), "state running not reported");
            }
        })
    };
    let heartbeat = {
        let api = api.clone();
        let interval = opts.heartbeat_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                if let Err(err) = api.heartbeat().await {
                    tracing::debug!(error = %chain(&err), "heartbeat failed");
                }
            }
        })
    };

    let mut stopped = false;
    let waited = tokio::select! {
        res = child.wait() => res,
        () = stop.cancelled() => {
            stopped = true;
            tracing::info!(?pid, grace = ?opts.stop_grace, "stopping task code");
            process::stop_group(&mut child, opts.stop_grace).await
        }
    };
    heartbeat.abort();
    if let Some(pid) = pid {
        // Helpers the code forked must not outlive it (and hold its pipes open).
        if let Err(err) = process::signal_group_id(pid, nix::sys::signal::Signal::SIGKILL) {
            tracing::debug!(%err, "cleaning up the process group");
        }
    }
    if tokio::time::timeout(Duration::from_secs(2), async {
        while pumps.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        pumps.abort_all();
    }
    // Keep `running` before the final state when it is about to land; never wait long for it.
    let mut running = running;
    if tokio::time::timeout(Duration::from_secs(1), &mut running).await.is_err() {
        running.abort();
    }
    streaming.abort();

    if stopped && leave.is_cancelled() {
        if let Ok(status) = &waited {
            push_line(
                &tail,
                format!("[fledgelet] {shown} stopped, {}", process::describe(*status)),
            );
        }
        log_stream.flush_last().await;
        let log = render(&tail);
        return left(api.as_ref(), log).await;
    }
    let (state, line) = match waited {
        Ok(status) if stopped => (
            TaskState::Terminated,
            format!(
                "[fledgelet] stopped on request; {shown} ended with {}",
                process::describe(status)
            ),
        ),
        Ok(status) if status.success() => (
            TaskState::Completed,
            format!("[fledgelet] {shown} exited with {}", process::describe(status)),
        ),
        Ok(status) => (
            TaskState::Failed,
            format!("[fledgelet] {shown} exited with {}", process::describe(status)),
        ),
        Err(err) => (TaskState::Failed, format!("[fledgelet] lost track of {shown}: {err}")),
    };
    tracing::info!(%state, "task code ended");
    push_line(&tail, line);
    log_stream.flush_last().await;
    let log = render(&tail);
    finish(opts, api.as_ref(), state, log).await
}

/// Most bytes of log lines in one post.
const LOG_POST_BYTES: usize = 256 * 1024;

/// Streams the lines of a task's [`LogTail`] that are not sent yet, numbered within this
/// agent run (its stream id).
#[derive(Clone)]
struct LogStream {
    api: Arc<dyn TaskApi>,
    tail: Arc<Mutex<LogTail>>,
    id: String,
    /// Set when the control plane refused a post (e.g. it has no such route): no more tries.
    refused: Arc<std::sync::atomic::AtomicBool>,
}

impl LogStream {
    fn new(api: Arc<dyn TaskApi>, tail: Arc<Mutex<LogTail>>) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let id = format!("{:x}-{nanos:x}", std::process::id());
        Self { api, tail, id, refused: Arc::default() }
    }

    /// Streams the last lines before the final state is reported, so a reader that sees the
    /// final state has seen every line; bounded, as the final report must not wait long.
    async fn flush_last(&self) {
        if tokio::time::timeout(Duration::from_secs(5), self.flush()).await.is_err() {
            tracing::debug!("the last log lines were not streamed in time");
        }
    }

    /// Posts every unsent line, in bounded batches. Returns `false` once streaming is given up
    /// (the control plane refused it); a transient failure leaves the lines for the next try.
    async fn flush(&self) -> bool {
        use std::sync::atomic::Ordering;
        loop {
            if self.refused.load(Ordering::Relaxed) {
                return false;
            }
            let (first, lines) =
                self.tail.lock().unwrap_or_else(PoisonError::into_inner).unsent(LOG_POST_BYTES);
            if lines.is_empty() {
                return true;
            }
            match self.api.append_log(&self.id, first, &lines).await {
                Ok(()) => self
                    .tail
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .mark_sent(first + lines.len() as u64),
                Err(err) if err.is_transient() => {
                    tracing::debug!(error = %chain(&err), "log lines not streamed; retrying");
                    return true;
                }
                Err(err) => {
                    tracing::info!(error = %chain(&err), "log streaming refused; the log is reported with the final state");
                    self.refused.store(true, Ordering::Relaxed);
                    return false;
                }
            }
        }
    }
}

/// Copies a child stream into the log file and the tail.
async fn pump(mut stream: impl AsyncRead + Unpin, log_path: PathBuf, tail: Arc<Mutex<LogTail>>) {
    let mut file =
        match tokio::fs::OpenOptions::new().create(true).append(true).open(&log_path).await {
            Ok(file) => Some(file),
            Err(err) => {
                tracing::warn!(path = %log_path.display(), %err, "cannot open the log file");
                None
            }
        };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        tail.lock().unwrap_or_else(PoisonError::into_inner).push(&buf[..n]);
        if let Some(f) = file.as_mut()
            && let Err(err) = f.write_all(&buf[..n]).await
        {
            tracing::warn!(path = %log_path.display(), %err, "log file write failed; keeping the tail only");
            file = None;
        }
    }
    if let Some(mut f) = file {
        let _ = f.flush().await;
    }
}

fn push_line(tail: &Mutex<LogTail>, line: String) {
    tail.lock().unwrap_or_else(PoisonError::into_inner).push_line(line);
}

fn render(tail: &Mutex<LogTail>) -> String {
    tail.lock().unwrap_or_else(PoisonError::into_inner).render()
}

async fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let io = |what, source| Error::Io { what, path: dir.to_owned(), source };
    tokio::fs::create_dir_all(dir).await.map_err(|source| io("create", source))?;
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .await
        .map_err(|source| io("restrict permissions of", source))
}

/// An error and its causes on one line: `a: b: c`.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut res = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        res.push_str(": ");
        res.push_str(&cause.to_string());
        source = cause.source();
    }
    res
}
