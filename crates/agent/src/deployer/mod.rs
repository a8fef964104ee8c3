//! The `process` deployer: one per compute, it turns DEPLOY/REVOKE events into `fledgelet`
//! child processes and reports what happened to each.
//!
//! - DEPLOY starts one `fledgelet` per listed task, in `work_root/<job>/<task>`, with the task
//!   key in its environment (never on its command line, where `ps` would show it). Events carry
//!   no key (a compute's stream is replayed to any subscriber holding the compute key): the
//!   deployer claims each attempt's key once over REST, and a worker whose key it cannot claim
//!   is reported `failed` with the reason. A task whose
//!   worker runs or waits already is not started twice. At most `max_workers` run at once; the
//!   rest wait in a FIFO queue. A task whose worker already ran is not started again either
//!   (its state is final), until the whole job is revoked.
//! - Each worker is reported `deployed`, or `failed` with the reason if it could not start.
//! - A worker that exits without having reported its final state (killed, crashed: its
//!   `final-state` marker is missing) is reported `failed` with its exit status, as soon as it
//!   is reaped.
//! - REVOKE stops the listed workers (all of the job's when the list is empty): SIGTERM to the
//!   process group, SIGKILL after the grace period; they are reported `revoked`.
//! - Shutdown stops every worker the same way and waits for them: no orphans. A crash is not a
//!   shutdown: each worker leads its own process group that does not die with the deployer,
//!   and a deployer started again on the same work root re-adopts the workers still running
//!   (`adopt`), so a `kill -9` of `fledge standalone` costs no job.
//!
//! With [`DeployerOptions::docker`] the same rules run workers as containers on the local
//! Docker Engine instead ([`docker`]): one per task, removed when it ends, a network per job,
//! and no re-adoption (a docker deployer removes what a crashed run left when it starts).
//! With [`DeployerOptions::k8s`] they run as Pods in a Kubernetes namespace instead ([`k8s`]):
//! one per task, its key in a Secret the Pod owns, watched until it ends, deleted then; the
//! same rules, the same reports, no re-adoption either.
//!
//! The rules live in a pure state machine (`plan::Plan::step`: inputs in, effects out); the
//! event loop here only does the I/O. Reports go out in order through one background reporter that retries while the control
//! plane is unavailable, so the event loop never waits on the network for them (only a
//! worker start waits for its key claim, retried for at most 10 s).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use fledge_client::ComputeClient;
use fledge_proto::{DeployEvent, DeployEventKind};
use fledge_types::{ComputeId, JobId, TaskId};

use crate::api::{Backoff, DeploymentApi, DeploymentState, retry};
use crate::process;
use crate::supervisor::{REPORTED_MARKER, chain};

mod adopt;
pub mod docker;
pub mod k8s;
mod plan;

use docker::{DockerOptions, DockerRuntime};
use k8s::{K8sOptions, K8sRuntime};
use plan::{Effect, Ended, Input, Pending, Plan};

/// Name of the file, in a worker's work dir, holding the fledgelet's own output.
pub const WORKER_LOG_FILE: &str = "fledgelet.log";

/// How long a worker start retries claiming its key while the control plane is unavailable.
const CLAIM_RETRY_BUDGET: Duration = Duration::from_secs(10);

/// Errors of the deployer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option is invalid.
    #[error("invalid deployer option {option}: {message}")]
    InvalidOption {
        /// The option's name.
        option: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The notifier subscription ended for good.
    #[error("the deployer's notifier subscription ended")]
    Subscription(#[source] fledge_client::Error),
    /// The control-plane client could not be built.
    #[error("invalid deployer endpoint or key")]
    Client(#[source] fledge_client::Error),
    /// The notifier subscription closed without a reason.
    #[error("the deployer's notifier subscription closed")]
    SubscriptionClosed,
    /// The Docker Engine of a `docker` deployer cannot be used.
    #[error("{0}")]
    Docker(String),
    /// The Kubernetes API of a `kubernetes` deployer cannot be used.
    #[error("{0}")]
    Kubernetes(String),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to run a deployer.
#[derive(Clone, Debug)]
pub struct DeployerOptions {
    /// The compute this deployer serves.
    pub compute_id: ComputeId,
    /// The compute's API key (authenticates the deployer).
    pub api_key: String,
    /// Apiserver base URL, e.g. `http://127.0.0.1:10100`.
    pub apiserver: String,
    /// Notifier URL, e.g. `http://127.0.0.1:10101`.
    pub notifier: String,
    /// Root of the workers' work dirs (`<work_root>/<job>/<task>`).
    pub work_root: PathBuf,
    /// The `fledgelet` binary (see [`default_fledgelet_bin`]).
    pub fledgelet_bin: PathBuf,
    /// The `fledge` binary workers use for built-in roles, passed as `FLEDGE_BIN`
    /// (default: none, each fledgelet finds its own).
    pub fledge_bin: Option<PathBuf>,
    /// The control plane's CA (PEM file) that the deployer trusts for https URLs and passes on
    /// to every fledgelet (`--ca-file`). Default none: plain http, or the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Maximum number of workers running at once; more wait in a queue (default 64).
    pub max_workers: usize,
    /// Time between SIGTERM and SIGKILL when revoking a worker (default 15 s; the fledgelet
    /// itself gives its child 10 s).
    pub stop_grace: Duration,
    /// Retry policy of deployment reports (default: up to 300 s each).
    pub report_backoff: Backoff,
    /// Reconnect policy of the notifier subscription.
    pub reconnect: fledge_client::Reconnect,
    /// Arguments before the fledgelet's own flags, e.g. `["fledgelet"]` when `fledgelet_bin`
    /// is a binary that embeds the agent as a subcommand (see [`crate::cli`]). Default none.
    pub fledgelet_prefix_args: Vec<String>,
    /// Extra arguments after the fledgelet's own flags (e.g. `--heartbeat-interval 1`).
    pub fledgelet_args: Vec<String>,
    /// Extra environment for every fledgelet.
    pub fledgelet_env: Vec<(String, String)>,
    /// Run each worker in a container on the local Docker Engine instead of as a child process
    /// (see [`docker`]); `fledgelet_bin`, its prefix arguments and `fledge_bin` are then the
    /// image's. Default none.
    pub docker: Option<DockerOptions>,
    /// Run each worker as a Pod in a Kubernetes namespace instead (see [`k8s`]); as with
    /// `docker`, the fledgelet is the image's. Not with `docker`. Default none.
    pub k8s: Option<K8sOptions>,
    /// How each worker confines its task's code ([`crate::sandbox`]); the work root is always
    /// protected. Process workers only: a container is its own confinement.
    pub sandbox: crate::sandbox::Policy,
}

impl DeployerOptions {
    /// Options with defaults for everything but identity, endpoints and paths.
    pub fn new(
        compute_id: ComputeId,
        api_key: impl Into<String>,
        apiserver: impl Into<String>,
        notifier: impl Into<String>,
        work_root: PathBuf,
        fledgelet_bin: PathBuf,
    ) -> Self {
        Self {
            compute_id,
            api_key: api_key.into(),
            apiserver: apiserver.into(),
            notifier: notifier.into(),
            work_root,
            fledgelet_bin,
            fledge_bin: None,
            ca_file: None,
            max_workers: 64,
            stop_grace: Duration::from_secs(15),
            report_backoff: Backoff::default(),
            reconnect: fledge_client::Reconnect::default(),
            fledgelet_prefix_args: Vec::new(),
            fledgelet_args: Vec::new(),
            fledgelet_env: Vec::new(),
            docker: None,
            k8s: None,
            sandbox: crate::sandbox::Policy::default(),
        }
    }

    /// Checks the options and builds a deployer that reports to the apiserver with the API key.
    pub fn build(self) -> Result<Deployer> {
        self.validate()?;
        let ca = self.trusted_ca()?;
        let client = ComputeClient::new(&self.apiserver, self.compute_id.clone(), &self.api_key)
            .and_then(|client| client.with_ca(ca.as_ref()))
            .map_err(Error::Client)?;
        self.build_with(Arc::new(client))
    }

    /// Checks the options and builds a deployer that reports through `api`.
    pub fn build_with(mut self, api: Arc<dyn DeploymentApi>) -> Result<Deployer> {
        self.validate()?;
        let ca = self.trusted_ca()?;
        // Absolute, since fledgelets run in their own work dirs.
        if let Some(path) = &self.ca_file {
            self.ca_file = Some(std::path::absolute(path).unwrap_or_else(|_| path.clone()));
        }
        Ok(Deployer { opts: self, api, ca, metrics: Metrics::default() })
    }

    /// The CA of `ca_file`, read and checked.
    fn trusted_ca(&self) -> Result<Option<fledge_client::Ca>> {
        self.ca_file
            .as_ref()
            .map(|path| fledge_client::trust::load_ca(&self.apiserver, path).map_err(Error::Client))
            .transpose()
    }

    fn validate(&self) -> Result<()> {
        let invalid = |option, message: &str| {
            Err(Error::InvalidOption { option, message: message.to_owned() })
        };
        if self.compute_id.as_str().is_empty() {
            return invalid("compute_id", "must not be empty");
        }
        if self.max_workers == 0 {
            return invalid("max_workers", "must be at least 1");
        }
        if self.apiserver.is_empty() {
            return invalid("apiserver", "must not be empty");
        }
        if self.notifier.is_empty() {
            return invalid("notifier", "must not be empty");
        }
        if self.fledgelet_bin.as_os_str().is_empty() && self.docker.is_none() && self.k8s.is_none()
        {
            return invalid("fledgelet_bin", "must not be empty");
        }
        if let Some(docker) = &self.docker {
            if let Err((option, message)) = docker.validate() {
                return invalid(option, &message);
            }
            check_path_segment(self.compute_id.as_str())
                .or_else(|why| invalid("compute_id", why))?;
        }
        if let Some(k8s) = &self.k8s {
            if self.docker.is_some() {
                return invalid("k8s", "a deployer runs workers on docker or kubernetes, not both");
            }
            if let Err((option, message)) = k8s.validate() {
                return invalid(option, &message);
            }
            check_path_segment(self.compute_id.as_str())
                .or_else(|why| invalid("compute_id", why))?;
        }
        Ok(())
    }
}

/// The `fledgelet` next to the running executable if there is one, else `fledgelet` (on PATH).
pub fn default_fledgelet_bin() -> PathBuf {
    sibling_or_path("fledgelet")
}

/// `name` next to the running executable if it exists there, else `name` (looked up on PATH).
pub fn sibling_or_path(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The compute's notifier events, as `fledge_client::subscribe_compute` yields them.
pub type DeployEvents = BoxStream<'static, fledge_client::Result<DeployEvent>>;

/// A running deployer; see the module docs.
pub struct Deployer {
    opts: DeployerOptions,
    api: Arc<dyn DeploymentApi>,
    ca: Option<fledge_client::Ca>,
    metrics: Metrics,
}

/// `result` label of a worker start.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct StartLabel {
    platform: &'static str,
    result: &'static str,
}

/// `platform` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PlatformLabel {
    platform: &'static str,
}

type Counters<L> =
    prometheus_client::metrics::family::Family<L, prometheus_client::metrics::counter::Counter>;
type Histograms<L> = prometheus_client::metrics::family::Family<
    L,
    prometheus_client::metrics::histogram::Histogram,
    fn() -> prometheus_client::metrics::histogram::Histogram,
>;

/// The deployer's operator metrics.
#[derive(Clone)]
struct Metrics {
    starts: Counters<StartLabel>,
    start_seconds: Histograms<PlatformLabel>,
    exits: Counters<PlatformLabel>,
    workers: prometheus_client::metrics::gauge::Gauge,
    adopted: prometheus_client::metrics::counter::Counter,
}

fn start_histogram() -> prometheus_client::metrics::histogram::Histogram {
    // 1 ms .. ~65 s: a process spawn to a container create and start.
    prometheus_client::metrics::histogram::Histogram::new(
        prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 17),
    )
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            starts: Counters::default(),
            start_seconds: Histograms::new_with_constructor(start_histogram),
            exits: Counters::default(),
            workers: Default::default(),
            adopted: Default::default(),
        }
    }
}

/// One report to the control plane.
struct Report {
    job: JobId,
    task: TaskId,
    attempt: u32,
    state: DeploymentState,
    message: String,
}

/// A reaped worker, as its watcher returns it.
struct Exit {
    job: JobId,
    task: TaskId,
    ended: Ended,
}

/// What the event loop owns besides the [`Plan`]: the live workers and the report queue.
struct Runtime {
    /// Kill switches of the live workers.
    workers: HashMap<TaskId, CancellationToken>,
    waiters: JoinSet<Exit>,
    reports: mpsc::UnboundedSender<Report>,
    /// The Docker Engine, for a `docker` deployer.
    docker: Option<DockerRuntime>,
    /// The Kubernetes API, for a `kubernetes` deployer.
    k8s: Option<K8sRuntime>,
}

impl Deployer {
    /// Registers the deployer's series into `registry` (give it a `deployer` prefix): worker
    /// starts by platform and result, time to start a worker (work dir, then process spawn or
    /// container create and start), workers that ended, workers live now, workers adopted
    /// from an earlier run.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        let m = self.metrics.clone();
        registry.register("worker_starts", "Worker starts, by platform and result", m.starts);
        registry.register(
            "worker_start_duration_seconds",
            "Time to start one worker (prepare its work dir, spawn or create and start)",
            m.start_seconds,
        );
        registry.register("worker_exits", "Workers that ended, by platform", m.exits);
        registry.register("workers", "Workers this deployer runs now", m.workers);
        registry.register("workers_adopted", "Workers adopted from an earlier run", m.adopted);
    }

    fn platform(&self) -> &'static str {
        if self.opts.docker.is_some() {
            "docker"
        } else if self.opts.k8s.is_some() {
            "kubernetes"
        } else {
            "process"
        }
    }

    /// Subscribes to the notifier as this compute and runs until `shutdown`, then stops every
    /// worker. Fails if the notifier refuses the subscription for good (e.g. a bad API key or a
    /// compute that is not registered yet: register it before starting its deployer).
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let events = fledge_client::notifier::subscribe_compute_with(
            &self.opts.notifier,
            self.ca.as_ref(),
            &self.opts.compute_id,
            &self.opts.api_key,
            self.opts.reconnect,
        );
        self.run_with_events(events, shutdown).await
    }

    /// Runs on the given event source (tests use a channel instead of the notifier).
    pub async fn run_with_events(
        self,
        mut events: DeployEvents,
        shutdown: CancellationToken,
    ) -> Result<()> {
        let compute = self.opts.compute_id.clone();
        // A docker deployer connects first (and clears what an earlier run left behind).
        let docker = match &self.opts.docker {
            Some(opts) => Some(
                DockerRuntime::connect(opts.clone(), compute.clone(), &self.opts.work_root)
                    .await
                    .map_err(Error::Docker)?,
            ),
            None => None,
        };
        // So does a kubernetes deployer (its Pods).
        let k8s = match &self.opts.k8s {
            Some(opts) => Some(
                K8sRuntime::connect(opts.clone(), compute.clone(), self.opts.ca_file.as_deref())
                    .await
                    .map_err(Error::Kubernetes)?,
            ),
            None => None,
        };
        let platform = self.platform();
        tracing::info!(%compute, platform, max_workers = self.opts.max_workers, "deployer running");
        if docker.is_none() && k8s.is_none() {
            let support = crate::sandbox::probe();
            match (self.opts.sandbox.mode, support.abi) {
                (crate::sandbox::Mode::Off, _) => tracing::warn!(
                    "sandbox off (--sandbox off): task code runs with this deployer's user's file access"
                ),
                (crate::sandbox::Mode::Required, None) => {
                    return Err(Error::InvalidOption {
                        option: "sandbox",
                        message: format!("required, but {support}"),
                    });
                }
                (mode, Some(_)) => tracing::info!(%mode, "sandbox: {support}"),
                (mode, None) => tracing::warn!(%mode, "sandbox: {support}"),
            }
        }
        // Unbounded: at most a few reports per task, and the loop must never wait on the network.
        let (reports, report_rx) = mpsc::unbounded_channel();
        let reporter =
            tokio::spawn(report_loop(self.api.clone(), report_rx, self.opts.report_backoff));
        let mut plan = Plan::new(self.opts.max_workers);
        let mut rt =
            Runtime { workers: HashMap::new(), waiters: JoinSet::new(), reports, docker, k8s };
        if rt.docker.is_none() && rt.k8s.is_none() {
            // Process workers outlive a crashed deployer and are re-adopted; a docker
            // deployer removed what a crashed run left when it connected.
            self.adopt(&mut plan, &mut rt);
        }
        let res = loop {
            let input = tokio::select! {
                event = events.next() => match event {
                    Some(Ok(event)) => match self.input_of(event) {
                        Some(input) => input,
                        None => continue,
                    },
                    Some(Err(err)) => break Err(Error::Subscription(err)),
                    None => break Err(Error::SubscriptionClosed),
                },
                Some(joined) = rt.waiters.join_next(), if !rt.waiters.is_empty() => match joined {
                    Ok(exit) => {
                        rt.workers.remove(&exit.task);
                        self.metrics.exits.get_or_create(&PlatformLabel { platform: self.platform() }).inc();
                        if let Some(docker) = &mut rt.docker {
                            docker.ended(&exit.job).await;
                        }
                        log_exit(&exit);
                        Input::Exited { job: exit.job, task: exit.task, ended: exit.ended }
                    }
                    Err(err) => {
                        tracing::error!(%err, "worker watcher failed");
                        continue;
                    }
                },
                () = shutdown.cancelled() => break Ok(()),
            };
            self.execute(&mut plan, &mut rt, input).await;
            self.metrics.workers.set(i64::try_from(rt.workers.len()).unwrap_or(i64::MAX));
        };

        // Stop everything and wait: no worker outlives the deployer.
        tracing::info!(workers = plan.active(), "deployer stopping its workers");
        for kill in rt.workers.values() {
            kill.cancel();
        }
        while let Some(joined) = rt.waiters.join_next().await {
            if let Ok(exit) = joined {
                tracing::info!(task = %exit.task, "worker stopped");
            }
        }
        if let Some(docker) = &rt.docker {
            // Job networks, and anything a failed removal left.
            docker.remove_all().await;
        }
        if let Some(k8s) = &rt.k8s
            && let Err(err) = k8s.remove_all().await
        {
            tracing::warn!(%err, "cannot delete what is left of this compute's pods");
        }
        drop(rt);
        // Give queued reports a moment to go out, but do not hang shutdown on a dead server.
        if tokio::time::timeout(Duration::from_secs(5), reporter).await.is_err() {
            tracing::warn!("dropping unsent deployment reports at shutdown");
        }
        res
    }

    /// Takes back the workers a previous run of this deployer left running (see [`adopt`]).
    fn adopt(&self, plan: &mut Plan, rt: &mut Runtime) {
        for (record, work_dir) in adopt::scan(&self.opts.work_root) {
            let (job, task) = (JobId::new(record.job.clone()), TaskId::new(record.task.clone()));
            tracing::info!(%job, %task, pid = record.pid, attempt = record.attempt, "worker adopted");
            self.metrics.adopted.inc();
            plan.step(Input::Adopted { job, task: task.clone(), attempt: record.attempt });
            let kill = CancellationToken::new();
            rt.waiters.spawn(adopt::watch(record, kill.clone(), self.opts.stop_grace, work_dir));
            rt.workers.insert(task, kill);
        }
    }

    /// The plan's input for a notifier event (`None`: ignored).
    fn input_of(&self, event: DeployEvent) -> Option<Input> {
        let job = JobId::new(event.job_id.clone());
        match DeployEventKind::try_from(event.kind) {
            Ok(DeployEventKind::Deploy) => {
                let apiserver = non_empty_or(&event.apiserver, &self.opts.apiserver);
                let notifier = non_empty_or(&event.notifier, &self.opts.notifier);
                let tasks = event
                    .tasks
                    .into_iter()
                    .map(|task| Pending {
                        job: job.clone(),
                        task,
                        apiserver: apiserver.clone(),
                        notifier: notifier.clone(),
                    })
                    .collect();
                Some(Input::Deploy(tasks))
            }
            Ok(DeployEventKind::Revoke) => {
                let tasks = event.tasks.into_iter().map(|t| TaskId::new(t.task_id)).collect();
                Some(Input::Revoke { job, tasks })
            }
            Ok(DeployEventKind::Unspecified) | Err(_) => {
                tracing::warn!(kind = event.kind, %job, "ignoring an unknown deploy event");
                None
            }
        }
    }

    /// Feeds `input` to the plan and carries out its effects (starting a worker feeds back
    /// `Started` or `StartFailed`).
    async fn execute(&self, plan: &mut Plan, rt: &mut Runtime, input: Input) {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            for effect in plan.step(input) {
                match effect {
                    Effect::Start(pending) => inputs.push_back(self.start(rt, pending).await),
                    Effect::Kill(task) => {
                        if let Some(kill) = rt.workers.get(&task) {
                            tracing::info!(%task, "revoking worker");
                            kill.cancel();
                        }
                    }
                    Effect::Report { job, task, attempt, state, message } => {
                        let report = Report { job, task, attempt, state, message };
                        if rt.reports.send(report).is_err() {
                            tracing::error!("deployment reporter is gone");
                        }
                    }
                }
            }
        }
    }

    /// Starts one fledgelet; returns `Started` or `StartFailed` for the plan.
    async fn start(&self, rt: &mut Runtime, pending: Pending) -> Input {
        let job = pending.job.clone();
        let task = pending.task_id();
        let started = tokio::time::Instant::now();
        let result = self.spawn_worker(rt, &pending).await;
        let platform = self.platform();
        self.metrics
            .start_seconds
            .get_or_create(&PlatformLabel { platform })
            .observe(started.elapsed().as_secs_f64());
        let outcome = if result.is_ok() { "started" } else { "failed" };
        self.metrics.starts.get_or_create(&StartLabel { platform, result: outcome }).inc();
        match result {
            Ok(()) => Input::Started { job, task },
            Err(message) => {
                tracing::warn!(%job, %task, message, "worker not started");
                Input::StartFailed { job, task, message }
            }
        }
    }

    async fn spawn_worker(&self, rt: &mut Runtime, pending: &Pending) -> Result<(), String> {
        let job = &pending.job;
        let task = pending.task_id();
        check_path_segment(job.as_str())
            .and(check_path_segment(task.as_str()))
            .map_err(|why| format!("cannot deploy task {task:?} of job {job:?}: {why}"))?;
        let task_key = self.claim_key(pending).await?;
        let work_dir = self.opts.work_root.join(job.as_str()).join(task.as_str());
        let log_path = work_dir.join(WORKER_LOG_FILE);
        let prepared = async {
            tokio::fs::create_dir_all(&work_dir).await?;
            match tokio::fs::remove_file(work_dir.join(REPORTED_MARKER)).await {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
            std::fs::File::create(&log_path)
        }
        .await;
        let log_file = prepared
            .map_err(|err| format!("cannot prepare work dir {}: {err}", work_dir.display()))?;
        if rt.docker.is_some() {
            return self.start_container(rt, pending, &task_key, work_dir, log_file).await;
        }
        if rt.k8s.is_some() {
            return self.start_pod(rt, pending, &task_key, work_dir, log_file).await;
        }
        let stderr = match log_file.try_clone() {
            Ok(file) => Stdio::from(file),
            Err(_) => Stdio::null(),
        };

        let mut command = Command::new(&self.opts.fledgelet_bin);
        // Nothing of the deployer's environment (its compute key, the operator's tokens)
        // reaches the worker but the allowlist and what is set below.
        process::worker_env(&mut command, &work_dir)
            .map_err(|err| format!("cannot prepare work dir {}: {err}", work_dir.display()))?;
        command
            .args(&self.opts.fledgelet_prefix_args)
            .arg("--task-id")
            .arg(task.as_str())
            .arg("--job-id")
            .arg(job.as_str())
            .arg("--apiserver")
            .arg(&pending.apiserver)
            .arg("--notifier")
            .arg(&pending.notifier)
            .arg("--work-dir")
            .arg(&work_dir)
            .args(&self.opts.fledgelet_args)
            .args(self.sandbox_policy().to_args())
            .env("FLEDGE_TASK_KEY", &task_key)
            .envs(self.opts.fledgelet_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(stderr);
        if let Some(fledge_bin) = &self.opts.fledge_bin {
            command.env("FLEDGE_BIN", fledge_bin);
        }
        if let Some(ca_file) = &self.opts.ca_file {
            command.env("FLEDGE_CA_FILE", ca_file);
        }
        // The worker outlives a crash of this deployer; a restarted one adopts it.
        process::detach(&mut command);
        let child = command.spawn().map_err(|err| {
            format!("failed to start {}: {err}", self.opts.fledgelet_bin.display())
        })?;
        tracing::info!(%job, %task, pid = ?child.id(), role = %pending.task.role, "worker started");
        let record = child.id().and_then(|pid| {
            Some(adopt::WorkerRecord {
                pid,
                start_ticks: adopt::start_ticks(pid)?,
                job: job.to_string(),
                task: task.to_string(),
                attempt: pending.attempt(),
            })
        });
        match record.map(|record| adopt::write(&work_dir, &record)) {
            Some(Ok(())) => {}
            Some(Err(err)) => {
                tracing::warn!(%job, %task, %err, "worker record not written; a restarted deployer will not adopt it")
            }
            None => tracing::warn!(%job, %task, "worker exited at once; no record written"),
        }
        let kill = CancellationToken::new();
        rt.waiters.spawn(watch(
            child,
            kill.clone(),
            self.opts.stop_grace,
            job.clone(),
            task.clone(),
            work_dir,
        ));
        rt.workers.insert(task, kill);
        Ok(())
    }
}

impl Deployer {
    /// Claims the key of the pending worker's attempt from the control plane (deploy events
    /// carry none). Transient failures are retried briefly (the event loop waits on this);
    /// a refusal (the attempt was claimed already, or is no longer the task's current one)
    /// fails the start with the reason, and the controller's restart policy decides on a
    /// next attempt.
    async fn claim_key(&self, pending: &Pending) -> Result<String, String> {
        let (job, task, attempt) = (&pending.job, pending.task_id(), pending.attempt());
        let backoff = Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(2),
            max_elapsed: CLAIM_RETRY_BUDGET,
        };
        retry(backoff, "claim task key", || self.api.claim_key(job, &task, attempt))
            .await
            .map_err(|err| format!("cannot claim the key of attempt {attempt}: {}", chain(&err)))
    }

    /// The workers' sandbox policy: the operator's, with the work root protected.
    fn sandbox_policy(&self) -> crate::sandbox::Policy {
        let mut policy = self.opts.sandbox.clone();
        policy.protected.push(self.opts.work_root.clone());
        if let Some(home) = std::env::var_os("HOME") {
            policy.protected.push(PathBuf::from(home).join(".fledge"));
        }
        policy
    }

    /// Starts the task's container and its watcher.
    async fn start_container(
        &self,
        rt: &mut Runtime,
        pending: &Pending,
        task_key: &str,
        work_dir: PathBuf,
        log_file: std::fs::File,
    ) -> Result<(), String> {
        let Some(docker) = rt.docker.as_mut() else {
            return Err("no Docker Engine".to_owned());
        };
        let job = pending.job.clone();
        let task = pending.task_id();
        let launch = docker::Launch {
            job: &job,
            task: &task,
            role: &pending.task.role,
            task_key,
            apiserver: &pending.apiserver,
            notifier: &pending.notifier,
            work_dir: &work_dir,
            ca_file: self.opts.ca_file.as_deref(),
            fledgelet_args: &self.opts.fledgelet_args,
            fledgelet_env: &self.opts.fledgelet_env,
        };
        let started = docker.start(&launch).await?;
        tracing::info!(%job, %task, container = started.name, role = %pending.task.role, "worker container started");
        let kill = CancellationToken::new();
        let grace = self.opts.stop_grace;
        let token = kill.clone();
        rt.waiters.spawn(async move {
            let (status, killed) = docker::watch(started, token, grace, log_file).await;
            finish(job, task, &work_dir, status, killed).await
        });
        rt.workers.insert(pending.task_id(), kill);
        Ok(())
    }
}

impl Deployer {
    /// Creates the task's Pod and starts its watcher.
    async fn start_pod(
        &self,
        rt: &mut Runtime,
        pending: &Pending,
        task_key: &str,
        work_dir: PathBuf,
        log_file: std::fs::File,
    ) -> Result<(), String> {
        let Some(k8s) = rt.k8s.as_ref() else {
            return Err("no Kubernetes API".to_owned());
        };
        let job = pending.job.clone();
        let task = pending.task_id();
        let launch = k8s::Launch {
            job: &job,
            task: &task,
            role: &pending.task.role,
            attempt: pending.attempt(),
            task_key,
            apiserver: &pending.apiserver,
            notifier: &pending.notifier,
            fledgelet_args: &self.opts.fledgelet_args,
            fledgelet_env: &self.opts.fledgelet_env,
        };
        let started = k8s.start(&launch).await?;
        tracing::info!(%job, %task, pod = started.name, role = %pending.task.role, "worker pod created");
        let kill = CancellationToken::new();
        let grace = self.opts.stop_grace;
        let token = kill.clone();
        let marker = work_dir.join(REPORTED_MARKER);
        rt.waiters.spawn(async move {
            let (status, killed) = k8s::watch(started, token, grace, log_file, marker).await;
            finish(job, task, &work_dir, status, killed).await
        });
        rt.workers.insert(pending.task_id(), kill);
        Ok(())
    }
}

fn log_exit(exit: &Exit) {
    let (job, task, ended) = (&exit.job, &exit.task, &exit.ended);
    if ended.killed {
        tracing::info!(%job, %task, status = ended.status, "worker revoked");
    } else if ended.reported {
        tracing::info!(%job, %task, status = ended.status, "worker finished");
    } else {
        tracing::warn!(%job, %task, status = ended.status, "worker died before reporting");
    }
}

/// Waits for a worker to exit, or stops it when `kill` fires.
async fn watch(
    mut child: Child,
    kill: CancellationToken,
    grace: Duration,
    job: JobId,
    task: TaskId,
    work_dir: PathBuf,
) -> Exit {
    let pid = child.id();
    let (status, killed) = tokio::select! {
        status = child.wait() => (status, false),
        () = kill.cancelled() => (process::stop_group(&mut child, grace).await, true),
    };
    if let Some(pid) = pid {
        // The fledgelet is gone; so must be anything left in its group.
        let _ = process::signal_group_id(pid, nix::sys::signal::Signal::SIGKILL);
    }
    let status = match status {
        Ok(status) => process::describe(status),
        Err(err) => format!("an unknown status ({err})"),
    };
    finish(job, task, &work_dir, status, killed).await
}

/// How a worker ended, from its exit status and its work dir (the final-state marker, the log).
async fn finish(job: JobId, task: TaskId, work_dir: &Path, status: String, killed: bool) -> Exit {
    let reported = tokio::fs::try_exists(work_dir.join(REPORTED_MARKER)).await.unwrap_or(false);
    let log_tail = if reported || killed {
        String::new()
    } else {
        read_tail(&work_dir.join(WORKER_LOG_FILE)).await
    };
    Exit { job, task, ended: Ended { status, reported, killed, log_tail } }
}

/// Sends reports in order, each retried while the control plane is unavailable.
async fn report_loop(
    api: Arc<dyn DeploymentApi>,
    mut reports: mpsc::UnboundedReceiver<Report>,
    backoff: Backoff,
) {
    while let Some(report) = reports.recv().await {
        let res = retry(backoff, "report deployment", || {
            api.report(&report.job, &report.task, report.attempt, report.state, &report.message)
        })
        .await;
        if let Err(err) = res {
            tracing::error!(job = %report.job, task = %report.task, state = ?report.state, error = %chain(&err), "deployment report lost");
        }
    }
}

/// The last 20 lines (at most 4 KiB) of a file; empty if unreadable.
async fn read_tail(path: &Path) -> String {
    let Ok(bytes) = tokio::fs::read(path).await else {
        return String::new();
    };
    let mut tail = crate::logtail::LogTail::new(4096, 20);
    tail.push(&bytes);
    tail.render().trim_end().to_owned()
}

fn non_empty_or(value: &str, fallback: &str) -> String {
    if value.is_empty() { fallback.to_owned() } else { value.to_owned() }
}

/// Ids become directory names: only plain, short names are accepted.
fn check_path_segment(id: &str) -> std::result::Result<(), &'static str> {
    if id.is_empty() {
        return Err("empty id");
    }
    if id.len() > 128 {
        return Err("id longer than 128 characters");
    }
    if id == "." || id == ".." {
        return Err("id is a relative path");
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err("id may only contain letters, digits, '-', '_' and '.'");
    }
    Ok(())
}
