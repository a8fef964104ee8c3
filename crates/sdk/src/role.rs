//! One way to write a role: the [`Role`] trait, the I/O every role shares ([`TaskIo`]) and
//! the one generic runner ([`run`]).
//!
//! A role is a type implementing [`Role`]: it names itself ([`Role::KIND`]), says which user
//! code it drives ([`Role::APP`]), builds its context from the task's I/O and that user code
//! ([`Role::build`]), and gives its program ([`Role::program`]), a
//! [`crate::composer::Composer`] over the context. Everything else is [`run`]'s job, the same
//! for every role: open the I/O, bound the run by `maxRunTime`, run the program, and close the
//! I/O the same way whether the program succeeded or failed.
//!
//! The context keeps only what is the role's own (its channels by function tag, its round
//! state); what every role has (the task config, the joined channels, the registry, the
//! metrics reporter and the round log) is its [`TaskIo`]. `docs/writing-a-role.md` walks
//! through a real role.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fledge_channel::{BackendEnv, ChannelManager};
use fledge_types::{MetricRecord, TaskConfig};
use tokio::time::Instant;
use tracing::Instrument;

use crate::app::{AppFactory, AppNeed, UserApp};
use crate::composer::{Composer, Context};
use crate::hyper::{self, names};
use crate::metrics::{Reporter, RoundMetrics, Traffic};
use crate::registry::{self, Registry};
use crate::roles::RoleKind;
use crate::{Error, Result, Weights};

/// How long a role that just sent its last message (the end of training) gives the
/// transport to deliver it before the connection goes ([`Role::LINGER`]).
const LINGER: Duration = Duration::from_millis(200);

/// How long closing waits for the metrics reporter to flush.
const REPORTER_FLUSH: Duration = Duration::from_secs(5);

/// Process-level settings of a run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Relative registry paths are resolved here.
    pub workdir: PathBuf,
    /// The task key (bearer for metrics), from `FLEDGE_TASK_KEY`.
    pub task_key: Option<String>,
    /// Channel backend settings (local hub, MQTT and p2p tuning). [`run`] applies the task's
    /// channel hyperparameters (`livenessTimeout`) to them for every backend.
    pub backend_env: BackendEnv,
    /// Run this role instead of inferring it from the function tags
    /// ([`crate::runner::run_task_with`]).
    pub role: Option<RoleKind>,
    /// Sees every record the task reports, one per round (progress for a user watching).
    pub observer: Option<RecordObserver>,
}

/// A function that sees every [`MetricRecord`] a task reports, as it reports it (one per
/// round), on the runtime thread that runs the role: it must return quickly.
#[derive(Clone)]
pub struct RecordObserver(pub Arc<dyn Fn(&MetricRecord) + Send + Sync>);

impl std::fmt::Debug for RecordObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordObserver")
    }
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            workdir: PathBuf::from("."),
            task_key: None,
            backend_env: BackendEnv::default(),
            role: None,
            observer: None,
        }
    }
}

impl RunOptions {
    /// Options for a worker process: the current directory, `FLEDGE_TASK_KEY`, and where its
    /// p2p ends listen and what they advertise (`FLEDGE_P2P_LISTEN_HOST`,
    /// `FLEDGE_P2P_ADVERTISE_HOST`; an invalid value is an error naming the variable).
    pub fn from_env() -> Result<RunOptions> {
        let mut opts = RunOptions {
            workdir: std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
            task_key: std::env::var("FLEDGE_TASK_KEY").ok().filter(|k| !k.is_empty()),
            ..RunOptions::default()
        };
        opts.backend_env.p2p.apply_host_env(|name| std::env::var(name).ok())?;
        Ok(opts)
    }

    /// Applies the channel settings `config`'s hyperparameters set to every backend:
    /// `livenessTimeout` (seconds) is how long a silent peer counts as alive, over MQTT and
    /// p2p alike. Unset, the backends keep what these options say (10 s by default).
    pub fn apply_channel_settings(&mut self, config: &TaskConfig) -> Result<()> {
        if config.hyperparameters.get(names::LIVENESS_TIMEOUT).is_some_and(|v| !v.is_null()) {
            let secs = hyper::uint(&config.hyperparameters, names::LIVENESS_TIMEOUT, 10, 1)?;
            self.backend_env.set_liveness_timeout(Duration::from_secs(secs));
        }
        Ok(())
    }
}

/// What a finished task did.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// The role that ran.
    pub kind: RoleKind,
    /// Rounds completed.
    pub rounds: u64,
    /// One record per round.
    pub history: Vec<MetricRecord>,
    /// The final global model (aggregators, the ring and hybrid trainers).
    pub final_model: Option<Weights>,
}

/// The I/O every role shares: the task config, the joined channels, the registry, the
/// metrics reporter and the round log.
pub struct TaskIo {
    /// The task config.
    pub config: TaskConfig,
    /// Every channel of the task's role, joined.
    pub channels: ChannelManager,
    /// Where checkpoints, metrics and the final model go.
    pub registry: Arc<dyn Registry>,
    /// Posts metric records to the control plane (or nowhere).
    reporter: Reporter,
    /// The round being measured: user metrics, tasklet timings (`seconds.<alias>`), the
    /// traffic counters at its start.
    pub metrics: RoundMetrics,
    /// Every finished round's record.
    pub history: Vec<MetricRecord>,
    /// Sees each record as it is reported ([`RunOptions::observer`]).
    observer: Option<RecordObserver>,
}

/// Where an aggregating task starts.
pub enum Start {
    /// The state it saved before it was restarted (its last round's record is sent again).
    Resume(Box<registry::ResumeState>),
    /// Its first run: the job's base model, if the job names one.
    Fresh(Option<Weights>),
}

impl TaskIo {
    /// The state this task saved after its last round if it ran before (the controller
    /// restarted it), else the job's base model. On resume the saved round's record goes to
    /// the registry and the control plane again: it may have been lost with the failed run,
    /// and both keep a record sent twice once.
    pub async fn start_state(&mut self) -> Result<Start> {
        match self.resume_state(true).await? {
            Some(state) => Ok(Start::Resume(Box::new(state))),
            None => {
                let base =
                    registry::load_base_model(self.registry.clone(), &self.config.base_model);
                Ok(Start::Fresh(base.await?))
            }
        }
    }

    /// The state this task saved after its last round if it ran before, else `None` (its
    /// first run). On resume the records the failed run may have lost go to the control plane
    /// again (its recent ones the registry holds, then the saved round's), and the saved
    /// round's also to the registry when `to_registry` (roles that keep their records there);
    /// both keep a record sent twice once.
    pub async fn resume_state(
        &mut self,
        to_registry: bool,
    ) -> Result<Option<registry::ResumeState>> {
        let (reg, job, task) =
            (self.registry.clone(), self.config.job.id.clone(), self.config.task_id.clone());
        let saved = tokio::task::spawn_blocking(move || reg.load_resume(&job, &task)).await??;
        let Some(state) = saved else {
            return Ok(None);
        };
        tracing::warn!(task_id = %self.config.task_id, round = state.round,
            model_version = state.model_version, "resuming after a restart from the last saved round");
        // Records still queued for the control plane died with the failed run: the recent
        // ones the registry holds go again, then the saved round's (which may not have reached
        // the registry either). Both the registry and the store keep a record once.
        let (reg, job, task) =
            (self.registry.clone(), self.config.job.id.clone(), self.config.task_id.clone());
        let recent = tokio::task::spawn_blocking(move || reg.recent_metrics(&job, &task)).await??;
        let last = state.record.clone();
        for record in recent {
            if Some(&record) != last.as_ref() {
                self.report(record);
            }
        }
        if let Some(record) = last {
            if to_registry {
                let (reg, job, rec) =
                    (self.registry.clone(), self.config.job.id.clone(), record.clone());
                tokio::task::spawn_blocking(move || reg.append_metrics(&job, &[rec])).await??;
            }
            self.report(record);
        }
        Ok(Some(state))
    }

    /// Opens the reporter and the registry of `config`, then joins every channel of its role.
    pub async fn open(config: TaskConfig, opts: &RunOptions) -> Result<TaskIo> {
        let reporter = match &config.control_plane {
            Some(cp) => Reporter::start(
                &cp.apiserver,
                &config.task_id,
                opts.task_key.clone(),
                config.control_plane_ca.as_deref(),
            ),
            None => Reporter::disabled(),
        };
        let registry = registry::for_task(&config, &opts.workdir)?;
        // The task key also authenticates this task's ends to the metaserver (p2p channels).
        let mut backend_env = opts.backend_env.clone();
        if backend_env.p2p.task_key.is_none() {
            backend_env.p2p.task_key = opts.task_key.clone().map(fledge_channel::p2p::TaskKey);
        }
        let channels = ChannelManager::join_all(&config, &backend_env).await?;
        Ok(TaskIo {
            config,
            channels,
            registry,
            reporter,
            metrics: RoundMetrics::default(),
            history: Vec::new(),
            observer: opts.observer.clone(),
        })
    }

    /// The traffic of every channel so far.
    pub fn traffic(&self) -> Traffic {
        Traffic {
            channels: self
                .channels
                .channels()
                .map(|c| (c.name().to_owned(), c.metrics().snapshot()))
                .collect(),
        }
    }

    /// Starts measuring a new round from the traffic counters as they are now.
    pub fn start_round(&mut self) {
        self.metrics = RoundMetrics::start(self.traffic());
    }

    /// Adds a tasklet's wall time to the round (`seconds.<alias>`).
    pub fn record_time(&mut self, alias: &str, seconds: f64) {
        self.metrics.add(format!("seconds.{alias}"), seconds);
    }

    /// Closes the round being measured as `round`'s record (with the traffic since its start),
    /// reports it and keeps it in the history; returns it. A new round starts.
    pub fn finish_round(&mut self, round: u64) -> MetricRecord {
        let metrics = std::mem::take(&mut self.metrics);
        let record = metrics.finish(&self.config.task_id, &self.config.role, round, self.traffic());
        self.report(record.clone());
        record
    }

    /// Reports a record built elsewhere and keeps it in the history.
    pub fn report(&mut self, record: MetricRecord) {
        if let Some(observer) = &self.observer {
            (observer.0)(&record);
        }
        self.reporter.report(record.clone());
        self.history.push(record);
    }
}

/// A built-in or user-defined role: see the module docs.
pub trait Role: 'static {
    /// The role's state, including its [`TaskIo`].
    type Ctx: RoleCtx;
    /// Which role this is (its name, and `RunSummary::kind`).
    const KIND: RoleKind;
    /// The user code it drives.
    const APP: AppNeed;
    /// Whether the program's last act is a message others wait for (the end of training), so
    /// the transport gets a short linger (200 ms) to deliver it before the channels close.
    const LINGER: bool = true;

    /// Adjusts the run options before the channels are joined (e.g. an end property). Runs
    /// before anything is opened.
    fn prepare(_config: &TaskConfig, _opts: &mut RunOptions) -> Result<()> {
        Ok(())
    }

    /// The context over `io` with `app` (of the kind [`Role::APP`] names).
    fn build(io: TaskIo, app: UserApp) -> Result<Self::Ctx>;

    /// The program to run over the context.
    fn program(ctx: &Self::Ctx) -> Result<Composer<Self::Ctx>>;

    /// Rounds completed, for the summary (by default the context's count).
    fn rounds(ctx: &mut Self::Ctx) -> u64 {
        ctx.rounds()
    }
}

/// What [`run`] needs of a role's context besides being a composer context.
pub trait RoleCtx: Context + Send + 'static {
    /// The task's I/O.
    fn io(&mut self) -> &mut TaskIo;
    /// Rounds completed (by default, the rounds recorded).
    fn rounds(&mut self) -> u64 {
        self.io().history.len() as u64
    }
    /// The model the role ends with, if it has one to return.
    fn final_model(&mut self) -> Option<Weights> {
        None
    }
}

/// Runs role `R` for the task `config` with user code from `factory`.
///
/// Builds the user code, applies the task's channel settings, opens the task's I/O, builds
/// the context and runs the program, all within `maxRunTime` (0: no limit); then closes the
/// I/O (channels left, reporter flushed, registry finished) whatever happened. The whole run
/// is inside the `task` tracing span.
pub async fn run<R: Role>(
    config: TaskConfig,
    factory: Arc<dyn AppFactory>,
    opts: RunOptions,
) -> Result<RunSummary> {
    let span = tracing::info_span!(
        "task",
        task_id = %config.task_id,
        role = %config.role,
        kind = R::KIND.name(),
        job_id = %config.job.id
    );
    run_inner::<R>(config, factory, opts).instrument(span).await
}

async fn run_inner<R: Role>(
    config: TaskConfig,
    factory: Arc<dyn AppFactory>,
    mut opts: RunOptions,
) -> Result<RunSummary> {
    let max_run_time = config.max_run_time;
    let deadline = (max_run_time > 0).then(|| Instant::now() + Duration::from_secs(max_run_time));
    opts.apply_channel_settings(&config)?;
    if config.secure_aggregation.is_some() && !crate::roles::secagg::supported(R::KIND) {
        return Err(Error::Config(format!(
            "modelSpec.secureAggregation: the {} role does not carry secure aggregation (the \
             trainer, top-aggregator and middle-aggregator roles do; docs/privacy.md)",
            R::KIND.name()
        )));
    }
    R::prepare(&config, &mut opts)?;
    let app = R::APP.create(factory.as_ref(), &config)?;
    let io = within(deadline, max_run_time, TaskIo::open(config, &opts)).await?;
    // The runner's own handles: the context may be gone (failed build, timeout) when the
    // I/O has to close.
    let channels = io.channels.clone();
    let registry = io.registry.clone();
    let mut io = io;
    let reporter = io.reporter.take_flusher();
    let mut ctx = None;
    let res = within(deadline, max_run_time, async {
        let c = ctx.insert(R::build(io, app)?);
        let program = R::program(c)?;
        program.run(c).await
    })
    .await;
    let summary = match (res, ctx) {
        (Ok(()), Some(mut ctx)) => {
            if R::LINGER {
                tokio::time::sleep(LINGER).await;
            }
            Ok(RunSummary {
                kind: R::KIND,
                rounds: R::rounds(&mut ctx),
                final_model: ctx.final_model(),
                history: std::mem::take(&mut ctx.io().history),
            })
        }
        (Ok(()), None) => unreachable!("a program ran, so its context was built"),
        (Err(e), _) => Err(e),
    };
    // Same close on success and failure: leave the channels, flush the reporter, and let
    // the registry finish (a remote one uploads what it still holds and ends its runs).
    let closed = channels.close().await;
    reporter.shutdown(REPORTER_FLUSH).await;
    let succeeded = summary.is_ok();
    let finished = tokio::task::spawn_blocking(move || registry.finish(succeeded)).await;
    let summary = summary?;
    closed?;
    finished??;
    Ok(summary)
}

/// Runs `fut` until `deadline` (none: no limit); past it, `maxRunTime` was exceeded.
async fn within<T>(
    deadline: Option<Instant>,
    max_run_time: u64,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match deadline {
        None => fut.await,
        Some(at) => {
            tokio::time::timeout_at(at, fut).await.map_err(|_| Error::Timeout(max_run_time))?
        }
    }
}

#[cfg(test)]
mod tests {
    use fledge_channel::LocalHub;

    use super::*;
    use crate::composer::{async_tasklet, boxed};
    use crate::plan::JobPlan;
    use crate::roles::tags;

    /// A role whose program fails after joining: the runner must still leave its channels.
    struct Failing;

    struct FailingCtx {
        io: TaskIo,
    }

    impl Context for FailingCtx {}

    impl RoleCtx for FailingCtx {
        fn io(&mut self) -> &mut TaskIo {
            &mut self.io
        }
    }

    async fn fail(ctx: &mut FailingCtx) -> Result<()> {
        let peer = ctx.io.channels.by_tag(tags::FETCH)?.await_join(Duration::from_secs(30)).await?;
        Err(Error::Protocol { peer: peer[0].clone(), reason: "test failure".to_owned() })
    }

    impl Role for Failing {
        type Ctx = FailingCtx;
        const KIND: RoleKind = RoleKind::Trainer;
        const APP: AppNeed = AppNeed::None;

        fn build(io: TaskIo, _app: UserApp) -> Result<FailingCtx> {
            Ok(FailingCtx { io })
        }

        fn program(_ctx: &FailingCtx) -> Result<Composer<FailingCtx>> {
            Ok(Composer::new().tasklet("fail", async_tasklet(|c| boxed(fail(c)))))
        }
    }

    struct NoApps;

    impl AppFactory for NoApps {
        fn trainer(&self, _: &TaskConfig) -> anyhow::Result<Box<dyn crate::TrainerApp>> {
            anyhow::bail!("none")
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_program_still_leaves_its_channels() {
        let dir = tempfile::tempdir().expect("tmp");
        let hub = LocalHub::new();
        let opts = RunOptions {
            workdir: dir.path().to_owned(),
            backend_env: BackendEnv { local_hub: hub.clone(), ..BackendEnv::default() },
            ..RunOptions::default()
        };
        let configs = JobPlan::local("fail", vec!["d".to_owned()]).configs().expect("configs");
        let aggregator =
            ChannelManager::join_all(&configs[0], &opts.backend_env).await.expect("join");
        let distribute = aggregator.by_tag(tags::DISTRIBUTE).expect("tag").clone();
        let err = run::<Failing>(configs[1].clone(), Arc::new(NoApps), opts).await.unwrap_err();
        assert!(err.to_string().contains("test failure"), "{err}");
        // The trainer's end is gone for its peer (waiting at most 10 s for the news).
        for _ in 0..1000 {
            if distribute.ends().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(distribute.ends().is_empty(), "{:?}", distribute.ends());
    }

    #[test]
    fn liveness_timeout_applies_to_every_backend_when_set() {
        let mut config = JobPlan::local("j", vec!["d".to_owned()]).configs().expect("c").remove(1);
        let mut opts = RunOptions::default();
        opts.backend_env.set_liveness_timeout(Duration::from_secs(3));
        opts.apply_channel_settings(&config).expect("unset is fine");
        assert_eq!(opts.backend_env.p2p.liveness_timeout, Duration::from_secs(3), "kept");
        config.hyperparameters.insert(names::LIVENESS_TIMEOUT.to_owned(), 25.into());
        opts.apply_channel_settings(&config).expect("valid");
        assert_eq!(opts.backend_env.mqtt.liveness_timeout, Duration::from_secs(25));
        assert_eq!(opts.backend_env.p2p.liveness_timeout, Duration::from_secs(25));
        config.hyperparameters.insert(names::LIVENESS_TIMEOUT.to_owned(), "soon".into());
        let err = opts.apply_channel_settings(&config).unwrap_err().to_string();
        assert!(err.contains("livenessTimeout"), "{err}");
    }
}
