//! The controller: expands jobs into tasks and drives each job's state machine.
//!
//! Shape (`docs/conventions.md`, "Components"): [`Options`] → [`Controller::build`] →
//! [`Controller::run`], with a cheap [`Handle`] that wakes the controller when a job changed. The decisions live in the pure
//! [`decide::decide`]; this module only loads state from the store, executes the effects in
//! order (a state transition is persisted by compare-and-set before anything acts on it) and
//! schedules the next look at each job.
//!
//! Reconciling is level-triggered: on startup and every `resync_interval` the controller lists
//! every non-final job and reconciles it, so a lost wake-up or a restart only delays work. What
//! the controller sent (deploy, stop, revoke) is remembered in memory only, so a restarted
//! controller re-sends them; deployers and agents treat duplicates idempotently. Ending a job
//! marks its remaining tasks terminated last, so a job that ended in the last day with live
//! tasks has an unfinished cleanup, which a starting controller finishes.

pub mod decide;
mod keys;

pub use keys::TaskKeys;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use fledge_proto::{DeployEventKind, TaskDeployment, TaskEventKind};
use fledge_types::{ComputeId, Dataset, Job, JobId, JobState, Task, TaskState};

use crate::notifier;
use crate::store::{self, JobFilter, NewTask, Store};
use decide::{Action, Effect, Memory, Policy};

/// How far back a starting controller looks for ended jobs whose cleanup may be unfinished.
const ENDED_LOOKBACK: chrono::Duration = chrono::Duration::hours(24);

/// Errors of the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The options are invalid.
    #[error("invalid controller option {field}: {reason}")]
    InvalidOption {
        /// The option's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The store failed.
    #[error("store call failed while reconciling job {job}")]
    Store {
        /// The job being reconciled.
        job: JobId,
        /// The cause.
        #[source]
        source: store::Error,
    },
}

/// Result of controller calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A cheap handle to wake the controller when a job may need work.
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::Sender<JobId>,
}

impl Handle {
    /// Creates a handle and the receiver the controller reads (used by the controller's builder;
    /// a process without a controller may drop the receiver: wake-ups are then no-ops).
    pub fn channel(capacity: usize) -> (Handle, mpsc::Receiver<JobId>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Handle { tx }, rx)
    }

    /// Tells the controller that `job` changed (state requested, a task reported, ...).
    /// Never blocks: when the queue is full the controller's periodic resync picks the job up.
    pub fn job_changed(&self, job: JobId) {
        if let Err(err) = self.tx.try_send(job) {
            tracing::debug!(%err, "controller queue full or closed; periodic resync will handle the job");
        }
    }
}

/// Controller options (durations in seconds in config files).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields, default)]
pub struct Options {
    /// Longest time between two looks at a non-final job, in seconds (default 5).
    pub resync_interval_secs: f64,
    /// A running task without a heartbeat for this long is failed as "agent lost", in seconds
    /// (default 90; 0 disables). Agents beat every few seconds.
    pub heartbeat_timeout_secs: f64,
    /// How long a stopping job waits for its tasks before marking them terminated, in seconds
    /// (default 30).
    pub stop_grace_secs: f64,
    /// Wake-ups queued before extra ones are dropped (the resync covers them; default 1024).
    pub queue_capacity: usize,
    /// A deploying job with a managed task whose worker never came up (its agent never beat)
    /// after this long fails, naming the computes without a working deployer, in seconds
    /// (default 600; 0 disables). Waiting for participant-run tasks is bounded by maxRunTime.
    pub deploy_timeout_secs: f64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            resync_interval_secs: 5.0,
            heartbeat_timeout_secs: 90.0,
            stop_grace_secs: 30.0,
            queue_capacity: 1024,
            deploy_timeout_secs: 600.0,
        }
    }
}

fn secs(field: &'static str, value: f64, min: f64) -> Result<Duration> {
    if !value.is_finite() || value < min {
        return Err(Error::InvalidOption {
            field,
            reason: format!("must be a number of seconds >= {min}, got {value}"),
        });
    }
    Ok(Duration::from_secs_f64(value))
}

impl Options {
    /// The state machine's timers, checked.
    pub fn policy(&self) -> Result<Policy> {
        Ok(Policy {
            resync_interval: secs("resync_interval_secs", self.resync_interval_secs, 0.01)?,
            heartbeat_timeout: secs("heartbeat_timeout_secs", self.heartbeat_timeout_secs, 0.0)?,
            stop_grace: secs("stop_grace_secs", self.stop_grace_secs, 0.0)?,
            deploy_timeout: secs("deploy_timeout_secs", self.deploy_timeout_secs, 0.0)?,
        })
    }

    /// Checks the options.
    pub fn validate(&self) -> Result<()> {
        self.policy()?;
        if self.queue_capacity == 0 {
            return Err(Error::InvalidOption {
                field: "queue_capacity",
                reason: "must be at least 1".to_owned(),
            });
        }
        Ok(())
    }
}

/// Where workers reach the control plane; passed on in deploy events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Endpoints {
    /// Apiserver base URL, e.g. `http://127.0.0.1:10100`.
    pub apiserver: String,
    /// Notifier endpoint, e.g. `http://127.0.0.1:10101`.
    pub notifier: String,
}

/// The controller service: build with [`Controller::build`], then [`Controller::run`].
pub struct Controller {
    store: Arc<dyn Store>,
    notifier: notifier::Handle,
    endpoints: Endpoints,
    keys: TaskKeys,
    policy: Policy,
    handle: Handle,
    rx: mpsc::Receiver<JobId>,
    memory: HashMap<JobId, Memory>,
    /// When each job is due for its next reconcile.
    due: HashMap<JobId, Instant>,
    /// Consecutive failed reconciles per job, for the backoff.
    failures: HashMap<JobId, (u32, backon::ExponentialBackoff)>,
    /// When this controller started: it heard no heartbeat before, so a task's silence counts
    /// from then at the earliest (agents that outlived a crashed control plane get a full
    /// heartbeat timeout to reach the new one).
    started: chrono::DateTime<chrono::Utc>,
    metrics: Metrics,
    /// When each job this controller moved to `deploying` did so (for the deploy latency).
    deploying_since: HashMap<JobId, Instant>,
}

/// `state` label of a job transition's target.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ToLabel {
    to: &'static str,
}

/// The controller's operator metrics.
#[derive(Clone)]
struct Metrics {
    transitions: prometheus_client::metrics::family::Family<
        ToLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    restarts: prometheus_client::metrics::counter::Counter,
    deploy_seconds: prometheus_client::metrics::histogram::Histogram,
    reconcile_seconds: prometheus_client::metrics::histogram::Histogram,
    reconcile_errors: prometheus_client::metrics::counter::Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            transitions: Default::default(),
            restarts: Default::default(),
            deploy_seconds: crate::telemetry::seconds_histogram(),
            reconcile_seconds: crate::telemetry::seconds_histogram(),
            reconcile_errors: Default::default(),
        }
    }
}

/// The outcome of running a decision's effects.
enum Executed {
    /// Every effect ran.
    Done,
    /// A compare-and-set lost: the job changed under us; look again now.
    Raced,
}

impl Controller {
    /// Builds the controller over `store`, publishing through `notifier`; task keys derive
    /// from `keys` (the same secret after a restart gives the same keys).
    pub fn build(
        options: Options,
        store: Arc<dyn Store>,
        notifier: notifier::Handle,
        endpoints: Endpoints,
        keys: TaskKeys,
    ) -> Result<Controller> {
        options.validate()?;
        let policy = options.policy()?;
        let (handle, rx) = Handle::channel(options.queue_capacity);
        Ok(Controller {
            store,
            notifier,
            endpoints,
            keys,
            policy,
            handle,
            rx,
            memory: HashMap::new(),
            due: HashMap::new(),
            failures: HashMap::new(),
            started: chrono::Utc::now(),
            metrics: Metrics::default(),
            deploying_since: HashMap::new(),
        })
    }

    /// Registers the controller's series into `telemetry`: job transitions by target state,
    /// task restarts, deploy latency (a job's `deploying` to `running`, as this controller saw
    /// it), reconcile time and failed reconciles.
    pub fn register_metrics(&self, telemetry: &crate::telemetry::Telemetry) {
        let m = self.metrics.clone();
        telemetry.register(|registry| {
            let r = registry.sub_registry_with_prefix("controller");
            r.register("job_transitions", "Job state changes, by target state", m.transitions);
            r.register("task_restarts", "Failed tasks put back to ready to run again", m.restarts);
            r.register(
                "job_deploy_duration_seconds",
                "From a job entering deploying to every task running (the job entering running)",
                m.deploy_seconds,
            );
            r.register(
                "reconcile_duration_seconds",
                "Time of one reconcile of one job",
                m.reconcile_seconds,
            );
            r.register(
                "reconcile_errors",
                "Reconciles that failed and were retried",
                m.reconcile_errors,
            );
        });
    }

    /// A handle to wake the controller.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Runs until `shutdown` is cancelled: resumes every non-final job from the store, then
    /// reconciles jobs as they are woken, come due, or at every resync.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(?self.policy, "controller started");
        self.resume_ended().await;
        let mut resync = tokio::time::interval(self.policy.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_due = self.due.values().min().copied();
            let sleep = async {
                match next_due {
                    Some(when) => tokio::time::sleep_until(when).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                // The first tick fires at once: that is the startup resume.
                _ = resync.tick() => self.resync().await,
                Some(job) = self.rx.recv() => {
                    self.due.insert(job, Instant::now());
                }
                () = sleep => {}
            }
            self.reconcile_due().await;
        }
        tracing::info!("controller stopped");
        Ok(())
    }

    /// At startup: marks jobs that ended within [`ENDED_LOOKBACK`] due, so that a cleanup an
    /// earlier controller did not finish (stop, revoke, mark tasks) is finished; jobs whose
    /// tasks are all final need nothing.
    async fn resume_ended(&mut self) {
        let filter = JobFilter {
            owner: None,
            states: vec![JobState::Completed, JobState::Failed, JobState::Terminated],
        };
        let since = chrono::Utc::now() - ENDED_LOOKBACK;
        match self.store.list_jobs(&filter).await {
            Ok(jobs) => {
                let now = Instant::now();
                for job in jobs.into_iter().filter(|j| j.ended_at.is_none_or(|t| t >= since)) {
                    self.due.entry(job.id).or_insert(now);
                }
            }
            Err(err) => tracing::warn!(error = %err, "controller failed to list ended jobs"),
        }
    }

    /// Marks every non-final, started job due now.
    async fn resync(&mut self) {
        let filter = JobFilter {
            owner: None,
            states: vec![
                JobState::Starting,
                JobState::Deploying,
                JobState::Running,
                JobState::Stopping,
            ],
        };
        match self.store.list_jobs(&filter).await {
            Ok(jobs) => {
                let now = Instant::now();
                for job in jobs {
                    self.due.entry(job.id).or_insert(now);
                }
            }
            Err(err) => tracing::warn!(error = %err, "controller resync failed to list jobs"),
        }
    }

    /// Reconciles every job whose time has come.
    async fn reconcile_due(&mut self) {
        let now = Instant::now();
        let ready: Vec<JobId> =
            self.due.iter().filter(|(_, when)| **when <= now).map(|(job, _)| job.clone()).collect();
        for job_id in ready {
            self.due.remove(&job_id);
            let span = tracing::info_span!("reconcile", job_id = %job_id);
            let start = Instant::now();
            let result = self.reconcile(&job_id).instrument(span.clone()).await;
            self.metrics.reconcile_seconds.observe(start.elapsed().as_secs_f64());
            let action = match result {
                Ok(action) => {
                    self.failures.remove(&job_id);
                    action
                }
                Err(err) => {
                    self.metrics.reconcile_errors.inc();
                    span.in_scope(|| self.error_policy(&job_id, &err))
                }
            };
            if let Action::Requeue(wait) = action {
                self.due.insert(job_id, Instant::now() + wait);
            }
        }
    }

    /// Backoff after a failed reconcile: doubling from 0.5 s, capped at the resync interval,
    /// with "equal jitter" (uniform in `[d/2, d)`) so that many failing jobs do not retry in
    /// lockstep. A success forgets the job's failures.
    fn error_policy(&mut self, job: &JobId, err: &Error) -> Action {
        let resync = self.policy.resync_interval;
        let (attempts, backoff) = self.failures.entry(job.clone()).or_insert_with(|| {
            let min = Duration::from_millis(250).min(resync / 2).max(Duration::from_millis(1));
            let backoff = backon::BackoffBuilder::build(
                backon::ExponentialBuilder::default()
                    .with_min_delay(min)
                    .with_max_delay((resync / 2).max(min))
                    .with_factor(2.0)
                    .with_jitter()
                    .without_max_times(),
            );
            (0, backoff)
        });
        *attempts = attempts.saturating_add(1);
        // Without a cap on attempts the iterator never ends; the resync interval is the fallback.
        let wait = backoff.next().unwrap_or(resync);
        tracing::warn!(error = %anyhow_chain(err), attempts = *attempts, ?wait, "reconcile failed; retrying");
        Action::Requeue(wait)
    }

    async fn reconcile(&mut self, job_id: &JobId) -> Result<Action> {
        let store_err = |source| Error::Store { job: job_id.clone(), source };
        let job = match self.store.get_job(None, job_id).await {
            Ok(job) => job,
            Err(store::Error::NotFound { .. }) => {
                // Deleted: nothing to drive.
                self.memory.remove(job_id);
                return Ok(Action::AwaitChange);
            }
            Err(err) => return Err(store_err(err)),
        };
        let mut tasks = self.store.list_tasks(job_id).await.map_err(store_err)?;
        for task in &mut tasks {
            if task.last_heartbeat.is_some_and(|beat| beat < self.started) {
                task.last_heartbeat = Some(self.started);
            }
        }
        let memory = self.memory.get(job_id).copied().unwrap_or_default();
        let decision = decide::decide(&job, &tasks, memory, &self.policy, chrono::Utc::now());
        if !decision.effects.is_empty() {
            tracing::debug!(state = %job.state, effects = ?decision.effects, "reconciling");
        }
        match self.execute(&job, decision.effects).await? {
            Executed::Done => Ok(decision.action),
            Executed::Raced => Ok(Action::Requeue(Duration::ZERO)),
        }
    }

    async fn execute(&mut self, job: &Job, effects: Vec<Effect>) -> Result<Executed> {
        let store_err = |source| Error::Store { job: job.id.clone(), source };
        for effect in effects {
            match effect {
                Effect::Expand => {
                    if let Err(reason) = self.expand(job).await? {
                        // The job cannot run as specified: fail it with every problem named.
                        tracing::warn!(%reason, "job expansion failed");
                        return self
                            .transition(job, JobState::Starting, JobState::Failed, Some(reason))
                            .await;
                    }
                }
                Effect::Transition { from, to, reason } => {
                    if let Executed::Raced = self.transition(job, from, to, reason).await? {
                        return Ok(Executed::Raced);
                    }
                }
                Effect::Deploy => {
                    let tasks = self.store.list_tasks(&job.id).await.map_err(store_err)?;
                    self.deploy(job, &tasks);
                    self.memory.entry(job.id.clone()).or_default().deployed = true;
                }
                Effect::Start => {
                    let tasks = self.store.list_tasks(&job.id).await.map_err(store_err)?;
                    let ready: Vec<&Task> =
                        tasks.iter().filter(|t| t.state == TaskState::Ready).collect();
                    for task in &ready {
                        self.notifier.publish_task(&job.id, &task.task_id, TaskEventKind::Start);
                    }
                    tracing::info!(n_tasks = ready.len(), "start events sent");
                    self.memory.entry(job.id.clone()).or_default().started = true;
                }
                Effect::Restart(restarts) => {
                    for r in &restarts {
                        match self.store.restart_task(&job.id, &r.task, r.restarts, &r.log).await {
                            Ok(task) => {
                                self.metrics.restarts.inc();
                                self.notifier.reset_task(&r.task);
                                tracing::warn!(task_id = %r.task, restarts = task.restarts, log = %r.log, "task restarted");
                            }
                            // Restarted by an earlier pass, or changed meanwhile.
                            Err(store::Error::Conflict { .. }) => return Ok(Executed::Raced),
                            Err(err) => return Err(store_err(err)),
                        }
                    }
                }
                Effect::StartTasks(tasks) => {
                    for task in &tasks {
                        self.notifier.publish_task(&job.id, task, TaskEventKind::Start);
                    }
                    tracing::info!(n_tasks = tasks.len(), "start events sent to restarted tasks");
                }
                Effect::Note { state, reason } => {
                    match self.store.set_job_reason(&job.id, state, &reason).await {
                        Ok(()) => tracing::info!(%reason, "job waits"),
                        Err(store::Error::Conflict { .. }) => return Ok(Executed::Raced),
                        Err(err) => return Err(store_err(err)),
                    }
                }
                Effect::Stop(tasks) => {
                    for task in &tasks {
                        self.notifier.publish_task(&job.id, task, TaskEventKind::Stop);
                    }
                    if !tasks.is_empty() {
                        tracing::info!(n_tasks = tasks.len(), "stop events sent");
                    }
                }
                Effect::Revoke => {
                    let tasks = self.store.list_tasks(&job.id).await.map_err(store_err)?;
                    self.revoke(job, &tasks);
                    self.memory.entry(job.id.clone()).or_default().revoked = true;
                }
                Effect::MarkTasks { tasks, state, log } => {
                    for task in &tasks {
                        match self.store.set_task_state(&job.id, task, state, Some(&log)).await {
                            Ok(_) => tracing::info!(task_id = %task, %state, %log, "task marked"),
                            // The agent reported a final state meanwhile: that one stands.
                            Err(store::Error::Conflict { .. }) => {}
                            Err(err) => return Err(store_err(err)),
                        }
                    }
                }
                Effect::Forget => {
                    self.notifier.forget_job(&job.id);
                    self.memory.remove(&job.id);
                }
            }
        }
        Ok(Executed::Done)
    }

    async fn transition(
        &mut self,
        job: &Job,
        from: JobState,
        to: JobState,
        reason: Option<String>,
    ) -> Result<Executed> {
        match self.store.set_job_state(&job.id, &[from], to, reason.as_deref()).await {
            Ok(_) => {
                tracing::info!(%from, %to, reason = reason.as_deref().unwrap_or(""), "job state changed");
                self.metrics.transitions.get_or_create(&ToLabel { to: to.as_str() }).inc();
                match to {
                    JobState::Deploying => {
                        self.deploying_since.insert(job.id.clone(), Instant::now());
                    }
                    JobState::Running => {
                        if let Some(since) = self.deploying_since.remove(&job.id) {
                            self.metrics.deploy_seconds.observe(since.elapsed().as_secs_f64());
                        }
                    }
                    _ if to.is_final() => {
                        self.deploying_since.remove(&job.id);
                    }
                    _ => {}
                }
                Ok(Executed::Done)
            }
            Err(store::Error::Conflict { actual, .. }) => {
                tracing::debug!(%from, %to, %actual, "job changed meanwhile; reconciling again");
                Ok(Executed::Raced)
            }
            Err(source) => Err(Error::Store { job: job.id.clone(), source }),
        }
    }

    /// Expands `job` and stores its tasks with fresh keys. `Ok(Err(reason))` when the job's
    /// own spec (or what it references) cannot be expanded.
    async fn expand(&self, job: &Job) -> Result<std::result::Result<(), String>> {
        let store_err = |source| Error::Store { job: job.id.clone(), source };
        let design = &job.spec.design_id;
        let schema = match self.store.get_schema(None, design, Some(&job.schema_version)).await {
            Ok((_, schema)) => schema,
            Err(store::Error::NotFound { kind, id }) => {
                return Ok(Err(format!(
                    "expansion failed: {kind} {id} of design {design} not found"
                )));
            }
            Err(err) => return Err(store_err(err)),
        };
        let mut datasets: Vec<Dataset> = Vec::new();
        for id in
            job.spec.data_spec.iter().flat_map(|entry| entry.dataset_groups.values().flatten())
        {
            if datasets.iter().any(|d| &d.id == id) {
                continue;
            }
            match self.store.get_dataset(Some(&job.owner), id).await {
                Ok(dataset) => datasets.push(dataset),
                // Reported by the expansion with a path to the field.
                Err(store::Error::NotFound { .. }) => {}
                Err(err) => return Err(store_err(err)),
            }
        }
        let computes = self.store.list_computes().await.map_err(store_err)?;
        let tasks =
            match fledge_types::expand::expand(&job.id, &job.spec, &schema, &datasets, &computes) {
                Ok(tasks) => tasks,
                Err(details) => {
                    let problems: Vec<String> =
                        details.iter().map(|d| format!("{}: {}", d.path, d.message)).collect();
                    return Ok(Err(format!("expansion failed: {}", problems.join("; "))));
                }
            };
        let new_tasks: Vec<NewTask> = tasks
            .into_iter()
            .map(|task| NewTask {
                key_sha256: crate::api::secret_hash(&self.keys.key(&task.task_id)),
                task,
            })
            .collect();
        self.store.insert_tasks(&new_tasks).await.map_err(store_err)?;
        tracing::info!(n_tasks = new_tasks.len(), "job expanded into tasks");
        Ok(Ok(()))
    }

    /// One deploy event per compute for its managed `ready` tasks (participant-run tasks are
    /// never deployed: their data owners start their agents).
    fn deploy(&self, job: &Job, tasks: &[Task]) {
        let mut per_compute: BTreeMap<&ComputeId, Vec<TaskDeployment>> = BTreeMap::new();
        for task in tasks.iter().filter(|t| t.managed && t.state == TaskState::Ready) {
            per_compute.entry(&task.compute_id).or_default().push(TaskDeployment {
                task_id: task.task_id.to_string(),
                role: task.role.clone(),
                attempt: task.restarts,
            });
        }
        for (compute, deployments) in per_compute {
            if !self.notifier.is_compute_connected(compute) {
                tracing::warn!(compute_id = %compute, "no deployer connected; the deploy event waits for it");
            }
            let n_tasks = deployments.len();
            let event = notifier::deploy_event(
                DeployEventKind::Deploy,
                &job.id,
                deployments,
                &self.endpoints.apiserver,
                &self.endpoints.notifier,
            );
            self.notifier.publish_deploy(compute, event);
            tracing::info!(compute_id = %compute, n_tasks, "deploy event sent");
        }
    }

    /// A revoke event (all of the job's workers) to every compute hosting managed tasks.
    fn revoke(&self, job: &Job, tasks: &[Task]) {
        let mut computes: Vec<&ComputeId> =
            tasks.iter().filter(|t| t.managed).map(|t| &t.compute_id).collect();
        computes.sort();
        computes.dedup();
        for compute in computes {
            let event = notifier::deploy_event(
                DeployEventKind::Revoke,
                &job.id,
                Vec::new(),
                &self.endpoints.apiserver,
                &self.endpoints.notifier,
            );
            self.notifier.publish_deploy(compute, event);
            tracing::info!(compute_id = %compute, "revoke event sent");
        }
    }
}

/// `err` with its causes, `: `-separated.
fn anyhow_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut res = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        res.push_str(": ");
        res.push_str(&cause.to_string());
        source = cause.source();
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_reject_bad_durations() {
        let err = Options { resync_interval_secs: 0.0, ..Options::default() }
            .validate()
            .expect_err("zero resync must be rejected");
        assert!(err.to_string().contains("resync_interval_secs"), "{err}");
        let err = Options { stop_grace_secs: f64::NAN, ..Options::default() }
            .validate()
            .expect_err("NaN must be rejected");
        assert!(err.to_string().contains("stop_grace_secs"), "{err}");
        Options::default().validate().expect("defaults are valid");
    }
}
