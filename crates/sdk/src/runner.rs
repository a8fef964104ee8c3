//! Running tasks: one from its config ([`run_task`]), or a whole job in one process
//! ([`simulate`]).
//!
//! [`run_task`] joins every channel of the config's role, picks the role program from the
//! function tags ([`RoleKind::infer`], or [`RunOptions::role`]), builds the registry and the
//! metrics reporter, runs the program and returns what happened. `maxRunTime` (seconds, 0 for
//! none) bounds the whole run.
//!
//! [`simulate`] generates the task configs of a two- or three-tier job ([`JobPlan`]) on the
//! `local` backend with a private hub and runs every task concurrently in this process. The
//! same generator with the `mqtt` backend gives the configs of a multi-process run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use fledge_channel::{BackendEnv, ChannelManager, LocalHub};
use fledge_types::{
    Backend, BrokerSpec, ChannelSpec, DatasetRef, GroupBy, JobRef, MetricRecord, RegistrySpec,
    Sort, TaskConfig,
};
use tokio::task::JoinSet;

use crate::app::AppFactory;
use crate::metrics::Reporter;
use crate::registry;
use crate::roles::aggregator::{self, AggregatorCtx, Tier};
use crate::roles::trainer::{self, TrainerCtx};
use crate::roles::{RoleKind, tags};
use crate::{Error, Result, Weights};

/// Process-level settings of a run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Relative registry paths are resolved here.
    pub workdir: PathBuf,
    /// The task key (bearer for metrics), from `FLEDGE_TASK_KEY`.
    pub task_key: Option<String>,
    /// Channel backend settings (local hub, MQTT tuning).
    pub backend_env: BackendEnv,
    /// Run this role program instead of inferring it from the function tags.
    pub role: Option<RoleKind>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            workdir: PathBuf::from("."),
            task_key: None,
            backend_env: BackendEnv::default(),
            role: None,
        }
    }
}

impl RunOptions {
    /// Options for a worker process: the current directory and `FLEDGE_TASK_KEY`.
    pub fn from_env() -> RunOptions {
        RunOptions {
            workdir: std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
            task_key: std::env::var("FLEDGE_TASK_KEY").ok().filter(|k| !k.is_empty()),
            ..RunOptions::default()
        }
    }
}

/// What a finished task did.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// The role program that ran.
    pub kind: RoleKind,
    /// Rounds completed.
    pub rounds: u64,
    /// One record per round.
    pub history: Vec<MetricRecord>,
    /// The final global model (aggregators).
    pub final_model: Option<Weights>,
}

/// Runs the task `config` with user code from `factory` and options from the environment.
pub async fn run_task(config: TaskConfig, factory: Arc<dyn AppFactory>) -> Result<RunSummary> {
    run_task_with(config, factory, RunOptions::from_env()).await
}

/// Runs the task `config` with explicit options.
pub async fn run_task_with(
    config: TaskConfig,
    factory: Arc<dyn AppFactory>,
    opts: RunOptions,
) -> Result<RunSummary> {
    bounded(config.max_run_time, run_inner(config, factory, opts)).await
}

/// Runs `role` within the task's `maxRunTime` in seconds (0: no limit); every role's entry
/// point goes through here.
pub(crate) async fn bounded<F>(max_run_time: u64, role: F) -> Result<RunSummary>
where
    F: std::future::Future<Output = Result<RunSummary>>,
{
    if max_run_time == 0 {
        return role.await;
    }
    tokio::time::timeout(std::time::Duration::from_secs(max_run_time), role)
        .await
        .map_err(|_| Error::Timeout(max_run_time))?
}

/// The task's metrics reporter: to the control plane when the config names one, else none.
pub(crate) fn reporter_for(config: &TaskConfig, opts: &RunOptions) -> Reporter {
    match &config.control_plane {
        Some(cp) => Reporter::start(&cp.apiserver, &config.task_id, opts.task_key.clone()),
        None => Reporter::disabled(),
    }
}

/// What every role's entry point opens before its program runs: the task's metrics reporter,
/// its registry ([`registry::for_task`]) and its channels, joined.
pub(crate) struct TaskIo {
    pub(crate) reporter: Reporter,
    pub(crate) registry: Arc<dyn registry::Registry>,
    pub(crate) channels: ChannelManager,
}

impl TaskIo {
    /// Opens the reporter and the registry, then joins every channel of `config`.
    pub(crate) async fn open(config: &TaskConfig, opts: &RunOptions) -> Result<TaskIo> {
        let reporter = reporter_for(config, opts);
        let registry = registry::for_task(config, &opts.workdir)?;
        let channels = ChannelManager::join_all(config, &opts.backend_env).await?;
        Ok(TaskIo { reporter, registry, channels })
    }
}

/// Ends a task's I/O once its program is done. With `linger`, first gives the transport a
/// moment to deliver what was just sent (the end of training) before the connection goes;
/// then closes every channel and flushes the metrics reporter.
pub(crate) async fn close_io(
    channels: &ChannelManager,
    reporter: Option<Reporter>,
    linger: bool,
) -> Result<()> {
    if linger {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    channels.close().await?;
    if let Some(reporter) = reporter {
        reporter.shutdown(std::time::Duration::from_secs(5)).await;
    }
    Ok(())
}

async fn run_inner(
    config: TaskConfig,
    factory: Arc<dyn AppFactory>,
    opts: RunOptions,
) -> Result<RunSummary> {
    let kind = match opts.role {
        Some(kind) => kind,
        None => RoleKind::infer(&config)?,
    };
    let span = tracing::info_span!("task", task_id = %config.task_id, role = %config.role, job_id = %config.job.id);
    let _guard = span.enter();
    drop(_guard);
    match kind {
        RoleKind::Trainer => {
            let app =
                factory.trainer(&config).map_err(|source| Error::App { step: "create", source })?;
            let TaskIo { reporter, channels, .. } = TaskIo::open(&config, &opts).await?;
            let mut ctx = TrainerCtx::new(config, channels, app, reporter)?;
            trainer::program().run(&mut ctx).await?;
            Ok(RunSummary { kind, rounds: ctx.round, history: ctx.history, final_model: None })
        }
        RoleKind::TopAggregator | RoleKind::MiddleAggregator => {
            let tier = if kind == RoleKind::TopAggregator { Tier::Top } else { Tier::Middle };
            let evaluator = factory
                .evaluator(&config)
                .map_err(|source| Error::App { step: "create", source })?;
            let TaskIo { reporter, registry, channels } = TaskIo::open(&config, &opts).await?;
            let mut ctx =
                AggregatorCtx::new(config, tier, channels, registry, evaluator, reporter)?;
            let program = match tier {
                Tier::Top => aggregator::top_program(),
                Tier::Middle => aggregator::middle_program(),
            };
            program.run(&mut ctx).await?;
            Ok(RunSummary {
                kind,
                rounds: ctx.round,
                history: ctx.history,
                final_model: ctx.global,
            })
        }
    }
}

/// A whole job to generate task configs for.
#[derive(Clone, Debug)]
pub struct JobPlan {
    /// Job id (scopes channels and the registry).
    pub job_id: String,
    /// One dataset URL per trainer (their number is the number of trainers).
    pub datasets: Vec<String>,
    /// Middle aggregators (0: two-tier). Trainers are spread over them round-robin.
    pub middle: usize,
    /// Hyperparameters of every task.
    pub hyperparameters: serde_json::Map<String, serde_json::Value>,
    /// Server optimizer.
    pub optimizer: Sort,
    /// Selector.
    pub selector: Sort,
    /// Backend of every channel.
    pub backend: Backend,
    /// MQTT brokers (`host:port`).
    pub brokers: Vec<String>,
    /// Registry directory (empty: `./registry`).
    pub registry_uri: String,
}

impl JobPlan {
    /// A two-tier local plan with defaults.
    pub fn local(job_id: &str, datasets: Vec<String>) -> JobPlan {
        JobPlan {
            job_id: job_id.to_owned(),
            datasets,
            middle: 0,
            hyperparameters: serde_json::Map::new(),
            optimizer: Sort::fedavg(),
            selector: Sort::default_selector(),
            backend: Backend::Local,
            brokers: Vec::new(),
            registry_uri: String::new(),
        }
    }

    fn channel(name: &str, upper: &str, lower: &str, groups: Option<Vec<String>>) -> ChannelSpec {
        ChannelSpec {
            name: name.to_owned(),
            description: String::new(),
            pair: vec![upper.to_owned(), lower.to_owned()],
            group_by: groups.map(|value| GroupBy { kind: "tag".to_owned(), value }),
            func_tags: BTreeMap::from([
                (upper.to_owned(), vec![tags::DISTRIBUTE.to_owned(), tags::AGGREGATE.to_owned()]),
                (lower.to_owned(), vec![tags::FETCH.to_owned(), tags::UPLOAD.to_owned()]),
            ]),
            backend: None,
            broker_host: None,
        }
    }

    /// The task configs: the top aggregator first, then middle aggregators, then trainers.
    pub fn configs(&self) -> Result<Vec<TaskConfig>> {
        if self.datasets.is_empty() {
            return Err(Error::Config("a job needs at least one trainer".to_owned()));
        }
        if self.middle > self.datasets.len() {
            return Err(Error::Config(format!(
                "{} middle aggregators for {} trainers: each needs at least one",
                self.middle,
                self.datasets.len()
            )));
        }
        let base = TaskConfig {
            version: fledge_types::task_config::TASK_CONFIG_VERSION,
            task_id: "".into(),
            role: String::new(),
            task_index: 0,
            job: JobRef { id: self.job_id.as_str().into(), name: self.job_id.clone() },
            backend: self.backend,
            brokers: self
                .brokers
                .iter()
                .map(|host| BrokerSpec { sort: "mqtt".to_owned(), host: host.clone() })
                .collect(),
            registry: RegistrySpec { sort: "local".to_owned(), uri: self.registry_uri.clone() },
            channels: Vec::new(),
            group_association: BTreeMap::new(),
            hyperparameters: self.hyperparameters.clone(),
            optimizer: self.optimizer.clone(),
            selector: self.selector.clone(),
            base_model: Default::default(),
            dataset: None,
            max_run_time: 0,
            control_plane: None,
            metaserver: None,
        };
        let task = |role: &str,
                    index: usize,
                    channels: Vec<ChannelSpec>,
                    groups: BTreeMap<String, String>| {
            let mut c = base.clone();
            c.task_id = format!("{}-{role}-{index}", self.job_id).into();
            c.role = role.to_owned();
            c.task_index = index as u32;
            c.channels = channels;
            c.group_association = groups;
            c
        };
        let mut res = Vec::new();
        let n = self.datasets.len();
        let dataset = |i: usize| DatasetRef {
            id: format!("{}-data-{i}", self.job_id).into(),
            name: format!("shard {i}"),
            url: self.datasets[i].clone(),
            data_format: String::new(),
        };
        if self.middle == 0 {
            let param = Self::channel("param-channel", "aggregator", "trainer", None);
            let mut top = task("aggregator", 0, vec![param.clone()], BTreeMap::new());
            set_children(&mut top, n);
            res.push(top);
            for i in 0..n {
                let mut t = task("trainer", i, vec![param.clone()], BTreeMap::new());
                t.dataset = Some(dataset(i));
                res.push(t);
            }
        } else {
            let groups: Vec<String> = (0..self.middle).map(|g| format!("g{g}")).collect();
            let global =
                Self::channel("global-channel", "top-aggregator", "middle-aggregator", None);
            let param = Self::channel(
                "param-channel",
                "middle-aggregator",
                "trainer",
                Some(groups.clone()),
            );
            let mut top = task("top-aggregator", 0, vec![global.clone()], BTreeMap::new());
            set_children(&mut top, self.middle);
            res.push(top);
            for (m, group) in groups.iter().enumerate() {
                let mut mid = task(
                    "middle-aggregator",
                    m,
                    vec![global.clone(), param.clone()],
                    BTreeMap::from([("param-channel".to_owned(), group.clone())]),
                );
                let mine = (0..n).filter(|i| i % self.middle == m).count();
                set_children(&mut mid, mine);
                res.push(mid);
            }
            for i in 0..n {
                let mut t = task(
                    "trainer",
                    i,
                    vec![param.clone()],
                    BTreeMap::from([("param-channel".to_owned(), groups[i % self.middle].clone())]),
                );
                t.dataset = Some(dataset(i));
                res.push(t);
            }
        }
        Ok(res)
    }
}

/// Sets `expectedTrainers` to the aggregator's number of children and clamps `minTrainers`
/// to it (the job-wide value counts trainers, which an aggregator above middle aggregators
/// does not see).
fn set_children(config: &mut TaskConfig, children: usize) {
    let h = &mut config.hyperparameters;
    h.insert("expectedTrainers".to_owned(), serde_json::Value::from(children));
    let min = h.get("minTrainers").and_then(serde_json::Value::as_u64).unwrap_or(1);
    h.insert("minTrainers".to_owned(), serde_json::Value::from(min.min(children as u64).max(1)));
}

/// Result of a simulation.
#[derive(Clone, Debug)]
pub struct SimReport {
    /// The top aggregator's run.
    pub top: RunSummary,
    /// Every other task's run, by task id (absent when it failed).
    pub others: BTreeMap<String, Result<RunSummary, String>>,
}

/// Runs every task of `plan` concurrently in this process over a private local hub.
///
/// The job succeeds when the top aggregator does; failures of other tasks are reported in
/// [`SimReport::others`] (a dead trainer is dropped by the quorum rule, not fatal).
pub async fn simulate(
    plan: &JobPlan,
    factory: Arc<dyn AppFactory>,
    workdir: PathBuf,
) -> Result<SimReport> {
    let mut plan = plan.clone();
    plan.backend = Backend::Local;
    let opts = RunOptions {
        workdir,
        task_key: None,
        backend_env: BackendEnv { local_hub: LocalHub::new(), ..BackendEnv::default() },
        role: None,
    };
    simulate_with(&plan, factory, opts).await
}

/// Runs every task of `plan` concurrently in this process on the plan's own backend (e.g.
/// MQTT through a broker the caller started), with `opts` for every task.
pub async fn simulate_with(
    plan: &JobPlan,
    factory: Arc<dyn AppFactory>,
    opts: RunOptions,
) -> Result<SimReport> {
    let configs = plan.configs()?;
    let mut set = JoinSet::new();
    for config in configs {
        let (factory, opts) = (factory.clone(), opts.clone());
        set.spawn(async move {
            let id = config.task_id.as_str().to_owned();
            let res = run_task_with(config, factory, opts).await;
            (id, res)
        });
    }
    let top_id = format!(
        "{}-{}-0",
        plan.job_id,
        if plan.middle == 0 { "aggregator" } else { "top-aggregator" }
    );
    let mut top = None;
    let mut others = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        let (id, res) = joined?;
        if id == top_id {
            top = Some(res);
        } else {
            if let Err(e) = &res {
                tracing::warn!(task_id = %id, error = %crate::runner::error_chain(e), "simulated task failed");
            }
            others.insert(id, res.map_err(|e| error_chain(&e)));
        }
    }
    let top = top.expect("the plan always has a top aggregator")?;
    Ok(SimReport { top, others })
}

/// `e` and its sources, joined with `: `.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut res = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        res.push_str(": ");
        res.push_str(&s.to_string());
        source = s.source();
    }
    res
}
