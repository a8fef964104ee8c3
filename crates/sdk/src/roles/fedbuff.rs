//! The asynchronous (FedBuff) top aggregator, built-in name `async-aggregator`, and the
//! straggler wrapper used to show why it matters.
//!
//! Program ([`program`]):
//!
//! ```text
//! load_state, await_trainers, init_model,
//! loop until `rounds` server steps { collect, aggregate, evaluate, checkpoint, report },
//! finish
//! ```
//!
//! `collect` keeps `concurrency` trainers busy (the optimizer's kwarg): every idle trainer
//! gets the current global model at once, and every update that arrives is folded into the
//! FedBuff buffer and its sender immediately gets the newest model again. Nobody waits for
//! the slowest trainer. Once `aggGoal` updates are buffered, `aggregate` steps the global
//! model (one "round" is one server step, i.e. one model version).
//!
//! Trainers are the standard [`crate::roles::trainer`] role and upload their full local
//! weights. FedBuff needs deltas for stale updates, so the aggregator keeps every model
//! version that some busy trainer is still training on (at most `concurrency` + 1 models)
//! and computes `delta = local − sent model` itself; the staleness is the number of server
//! steps since that model was sent. The header's `model_version` is checked against the
//! version the aggregator recorded for the trainer.
//!
//! At the end, idle trainers get end-of-training with the final model at once; busy ones get
//! it as soon as their last (discarded) update arrives, so no trainer fails uploading to an
//! aggregator that has gone.
//!
//! **Three tiers** ([`middle_program`], built-in `async-middle-aggregator`): a middle
//! aggregator is this aggregator with a link up. To the top (this program over middle
//! aggregators) it looks like a trainer; towards its trainers it is FedBuff with the top's
//! newest model as the global one:
//!
//! ```text
//! join_up, await_trainers,
//! loop until the top's end-of-training { fetch, collect, upload, report },
//! finish
//! ```
//!
//! `fetch` takes the top's next model (answering its `init_model` by asking a trainer);
//! `collect` keeps `concurrency` trainers busy with it and buffers `aggGoal` updates, stale
//! ones (staleness in top model versions) weighted down; `upload` applies the buffer to the
//! top's model and sends the result with the summed sample count, and the top takes the
//! delta against the model it sent. Trainers that are still busy keep training while the
//! middle aggregator waits for the top; their updates go into the next buffer. Replicas of a
//! middle aggregator in one group share its trainers through
//! [`crate::roles::follow::follow_sender`] (built-in trainer `async-trainer`): each trainer
//! trains for whichever replica sent it a model, least recently served first.
//!
//! [`StragglerFactory`] wraps any [`AppFactory`] so that the trainers named in the
//! hyperparameter `slowTrainers` (`{"<taskIndex>": factor}`) take `factor` times as long to
//! train (they sleep `(factor − 1) ×` the measured training time): a reproducible straggler
//! for comparing asynchronous and synchronous aggregation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fledge_algorithms::{Optimizer, OptimizerKind, Round};
use fledge_channel::{Channel, Kind, Message};
use fledge_types::{MetricRecord, TaskConfig, TaskId};
use serde_json::Value;
use tokio::time::Instant;

use crate::app::{
    AppFactory, AppNeed, Evaluator, FeatureApp, LabelApp, TrainOutcome, TrainerApp, UserApp,
};
use crate::composer::{Composer, Context, async_tasklet, boxed};
use crate::convert::{tensors_to_weights, weights_message};
use crate::hyper::{self, names};
use crate::metrics::{GLOBAL, RoundMetrics, TRAINER_MEAN};
use crate::protocol::{Command, Model, Update, await_parent, parent_left, peer_left};
use crate::registry::ResumeState;
use crate::role::{Role, RoleCtx, Start, TaskIo};
use crate::roles::trainer::TrainerCtx;
use crate::roles::{Common, RoleKind, aggregator, tags};
use crate::{Error, Result, Weights};

/// The built-in name of the asynchronous aggregator.
pub const BUILTIN_NAME: &str = "async-aggregator";

/// The built-in name of the asynchronous middle aggregator ([`middle_program`]).
pub const MIDDLE_BUILTIN_NAME: &str = "async-middle-aggregator";

/// The built-in name of the standard trainer role whose user code is wrapped in a
/// [`StragglerFactory`].
pub const STRAGGLER_TRAINER: &str = "straggler-trainer";

/// Hyperparameter naming the slow trainers: `{"<taskIndex>": factor}`, factor ≥ 1.
pub const SLOW_TRAINERS: &str = "slowTrainers";

/// How often a waiting aggregator re-checks which trainers are still alive.
const LIVENESS_POLL: Duration = Duration::from_millis(500);

/// Statistics of the buffer being filled.
#[derive(Default)]
struct BufferStats {
    samples: u64,
    staleness_sum: u64,
    staleness_max: u64,
    rejected: usize,
    trainer_metrics: BTreeMap<String, (f64, f64)>,
}

/// A middle aggregator's side towards the top aggregator.
struct Upward {
    fetch: Channel,
    upload: Channel,
    top: Option<TaskId>,
    /// The round of the top's last model (echoed in the update).
    top_round: u64,
    /// Updates sent to the top so far (the middle's record numbers).
    uploads: u64,
}

/// State of an asynchronous aggregator task.
pub struct AsyncAggregatorCtx {
    /// The task's I/O.
    pub io: TaskIo,
    common: Common,
    distribute: Channel,
    aggregate: Channel,
    /// A middle aggregator's link to the top ([`middle_program`]); `None` at the top.
    up: Option<Upward>,
    /// The global model (a middle aggregator's: the newest model the top sent it).
    pub global: Option<Weights>,
    /// Server steps taken so far (the model version); in a middle aggregator, the version
    /// of the top's model it holds.
    pub model_version: u64,
    /// Server steps to take.
    pub rounds: u64,
    /// The loop is over.
    pub done: bool,
    optimizer: Option<Optimizer>,
    concurrency: usize,
    min_trainers: usize,
    expected_trainers: usize,
    /// Busy trainers and the model version each trains on.
    in_flight: BTreeMap<TaskId, u64>,
    /// Models some busy trainer started from, by version.
    versions: BTreeMap<u64, Arc<Weights>>,
    /// The current model as a message, encoded once per version.
    current_message: Option<(u64, Message)>,
    /// Models handed out per trainer (idle trainers with fewer go first).
    dispatched: BTreeMap<TaskId, u64>,
    buffer: Option<Round>,
    stats: BufferStats,
    evaluator: Option<Arc<Mutex<Box<dyn Evaluator>>>>,
    started: Instant,
}

impl Context for AsyncAggregatorCtx {
    fn record_time(&mut self, alias: &str, seconds: f64) {
        self.io.record_time(alias, seconds);
    }
}

impl RoleCtx for AsyncAggregatorCtx {
    fn io(&mut self) -> &mut TaskIo {
        &mut self.io
    }

    /// Server steps at the top; updates sent up in a middle aggregator.
    fn rounds(&mut self) -> u64 {
        self.up.as_ref().map_or(self.model_version, |up| up.uploads)
    }

    fn final_model(&mut self) -> Option<Weights> {
        self.global.take()
    }
}

/// The FedBuff top aggregator (see the module docs).
pub struct AsyncAggregator;

impl Role for AsyncAggregator {
    type Ctx = AsyncAggregatorCtx;
    const KIND: RoleKind = RoleKind::AsyncAggregator;
    const APP: AppNeed = AppNeed::Evaluator;

    fn build(io: TaskIo, app: UserApp) -> Result<AsyncAggregatorCtx> {
        AsyncAggregatorCtx::new(io, app.evaluator()?)
    }

    fn program(_ctx: &AsyncAggregatorCtx) -> Result<Composer<AsyncAggregatorCtx>> {
        Ok(program())
    }
}

/// The FedBuff middle aggregator (see the module docs).
pub struct AsyncMiddleAggregator;

impl Role for AsyncMiddleAggregator {
    type Ctx = AsyncAggregatorCtx;
    const KIND: RoleKind = RoleKind::AsyncMiddleAggregator;
    const APP: AppNeed = AppNeed::None;

    fn build(io: TaskIo, _app: UserApp) -> Result<AsyncAggregatorCtx> {
        AsyncAggregatorCtx::new_middle(io)
    }

    fn program(_ctx: &AsyncAggregatorCtx) -> Result<Composer<AsyncAggregatorCtx>> {
        Ok(middle_program())
    }
}

impl AsyncAggregatorCtx {
    /// An asynchronous aggregator over the task's `io`; the job's optimizer must be
    /// `fedbuff`.
    pub fn new(io: TaskIo, evaluator: Option<Box<dyn Evaluator>>) -> Result<AsyncAggregatorCtx> {
        let config = &io.config;
        let channels = &io.channels;
        let common = Common::from_config(config)?;
        let h = &config.hyperparameters;
        let rounds = hyper::uint(h, names::ROUNDS, 1, 1)?;
        let min_trainers = hyper::uint(h, names::MIN_TRAINERS, 1, 1)? as usize;
        let expected_trainers =
            hyper::uint(h, names::EXPECTED_TRAINERS, min_trainers as u64, 1)? as usize;
        let optimizer = Optimizer::from_config(
            &serde_json::to_value(&config.optimizer).expect("sort serialises"),
        )?;
        let OptimizerKind::FedBuff { concurrency, .. } = *optimizer.kind() else {
            return Err(Error::Config(format!(
                "the async aggregator needs optimizer sort \"fedbuff\", not {:?}",
                optimizer.sort()
            )));
        };
        let distribute = channels.by_tag(tags::DISTRIBUTE)?.clone();
        let aggregate = channels.by_tag(tags::AGGREGATE)?.clone();
        Ok(AsyncAggregatorCtx {
            io,
            common,
            distribute,
            aggregate,
            up: None,
            global: None,
            model_version: 0,
            rounds,
            done: false,
            optimizer: Some(optimizer),
            concurrency,
            min_trainers,
            expected_trainers,
            in_flight: BTreeMap::new(),
            versions: BTreeMap::new(),
            current_message: None,
            dispatched: BTreeMap::new(),
            buffer: None,
            stats: BufferStats::default(),
            evaluator: evaluator.map(|e| Arc::new(Mutex::new(e))),
            started: Instant::now(),
        })
    }

    /// An asynchronous middle aggregator ([`middle_program`]): a trainer towards the top
    /// on its `fetch`/`upload` channels, a FedBuff buffer towards its trainers.
    pub fn new_middle(io: TaskIo) -> Result<AsyncAggregatorCtx> {
        let fetch = io.channels.by_tag(tags::FETCH)?.clone();
        let upload = io.channels.by_tag(tags::UPLOAD)?.clone();
        let mut ctx = AsyncAggregatorCtx::new(io, None)?;
        ctx.up = Some(Upward { fetch, upload, top: None, top_round: 0, uploads: 0 });
        Ok(ctx)
    }

    fn global(&self) -> Result<&Weights> {
        self.global.as_ref().ok_or_else(|| {
            Error::Config("async aggregator has no global model at this step".to_owned())
        })
    }

    /// Forgets busy trainers that left, and model versions nobody trains on any more.
    fn prune(&mut self) {
        let alive: BTreeSet<TaskId> = self.distribute.ends().into_iter().collect();
        let before = self.in_flight.len();
        let distribute = &self.distribute;
        self.in_flight.retain(|end, version| {
            // Gone, restarted, or our model to it may be lost (we reconnected to the broker).
            let keep = alive.contains(end) && distribute.can_answer(end);
            if !keep {
                tracing::warn!(%end, version = *version, "busy trainer left or may have lost its model; its update is lost");
            }
            keep
        });
        if before != self.in_flight.len() {
            self.io.metrics.add("trainersDropped", (before - self.in_flight.len()) as f64);
        }
        let used: BTreeSet<u64> = self.in_flight.values().copied().collect();
        let current = self.model_version;
        self.versions.retain(|v, _| *v == current || used.contains(v));
    }

    /// Sends the current model to idle trainers until `concurrency` are busy.
    async fn dispatch(&mut self) -> Result<()> {
        self.prune();
        let free = self.concurrency.saturating_sub(self.in_flight.len());
        if free == 0 {
            return Ok(());
        }
        let mut idle: Vec<TaskId> = self
            .distribute
            .ends()
            .into_iter()
            .filter(|e| !self.in_flight.contains_key(e))
            .collect();
        if idle.is_empty() {
            return Ok(());
        }
        idle.sort_by_key(|e| self.dispatched.get(e).copied().unwrap_or(0));
        let version = self.model_version;
        let message = match &self.current_message {
            Some((v, m)) if *v == version => m.clone(),
            _ => {
                let global = self.global()?.clone();
                let header = Model { round: version + 1, model_version: version, upload_grants: 0 };
                let m = tokio::task::spawn_blocking(move || {
                    weights_message(Kind::Weights, 0, 0, &global).map(|m| header.encode(m))
                })
                .await??;
                self.current_message = Some((version, m.clone()));
                m
            }
        };
        if !self.versions.contains_key(&version) {
            self.versions.insert(version, Arc::new(self.global()?.clone()));
        }
        for end in idle.into_iter().take(free) {
            match self.distribute.send(&end, message.clone()).await {
                Ok(()) => {
                    self.in_flight.insert(end.clone(), version);
                    *self.dispatched.entry(end).or_default() += 1;
                }
                Err(fledge_channel::Error::UnknownEnd { .. }) => {
                    tracing::warn!(%end, "trainer left before dispatch");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The next message on the aggregate channel, or `None` after [`LIVENESS_POLL`].
    async fn next_message(&self) -> Result<Option<(TaskId, Message)>> {
        match tokio::time::timeout(LIVENESS_POLL, self.aggregate.recv_any()).await {
            Ok(res) => Ok(Some(res?)),
            Err(_) => Ok(None),
        }
    }

    /// Folds one update into the buffer (or rejects it with a warning).
    async fn fold(&mut self, end: TaskId, message: Message) -> Result<()> {
        if message.kind != Kind::Update {
            tracing::warn!(%end, kind = ?message.kind, "unexpected message ignored");
            return Ok(());
        }
        let Some(base_version) = self.in_flight.remove(&end) else {
            tracing::warn!(%end, "update from a trainer that was not sent a model ignored");
            return Ok(());
        };
        if message.model_version != base_version {
            // Trained from another model than the one recorded for this trainer (one sent
            // by this aggregator's run before a restart): its delta cannot be computed.
            tracing::warn!(%end, header = message.model_version, sent = base_version, "update names another model version than was sent; rejected");
            self.stats.rejected += 1;
            return Ok(());
        }
        let update = match Update::decode(&end, &message) {
            Ok(update) => update,
            Err(e) => {
                tracing::warn!(%end, error = %e, "update rejected");
                self.stats.rejected += 1;
                return Ok(());
            }
        };
        let num_samples = update.num_samples;
        let base = self
            .versions
            .get(&base_version)
            .cloned()
            .expect("the model of every busy trainer is kept until its update arrives");
        let staleness = self.model_version - base_version;
        for (k, v) in &update.metrics {
            let e = self.stats.trainer_metrics.entry(k.clone()).or_default();
            e.0 += v * num_samples as f64;
            e.1 += num_samples as f64;
        }
        let mut buffer = self.buffer.take().expect("a buffer is open while collecting");
        let (back, res) = tokio::task::spawn_blocking(move || {
            let res = tensors_to_weights(&message.tensors).and_then(|w| {
                drop(message);
                let delta = w.delta_from(&base)?;
                buffer
                    .add_delta(&delta, num_samples, u32::try_from(staleness).unwrap_or(u32::MAX))
                    .map_err(Error::from)
            });
            (buffer, res)
        })
        .await?;
        self.buffer = Some(back);
        match res {
            Ok(()) => {
                self.stats.samples = self.stats.samples.saturating_add(num_samples);
                self.stats.staleness_sum += staleness;
                self.stats.staleness_max = self.stats.staleness_max.max(staleness);
            }
            Err(e) => {
                self.stats.rejected += 1;
                tracing::warn!(%end, error = %e, "update rejected");
            }
        }
        self.prune();
        Ok(())
    }
}

/// Resumes from the state this task saved after its last server step, if it ran before
/// (restarted after a failure); otherwise loads the job's base model, if any. Updates in
/// flight to the failed run are lost: every trainer is idle for the resumed one, gets the
/// saved model, and an update trained on another model version is rejected.
async fn load_state(ctx: &mut AsyncAggregatorCtx) -> Result<()> {
    let state = match ctx.io.start_state().await? {
        Start::Fresh(base) => {
            ctx.global = base;
            return Ok(());
        }
        Start::Resume(state) => *state,
    };
    if let Some(server) = state.server {
        let optimizer = ctx.optimizer.as_mut().expect("optimizer present between steps");
        optimizer.restore_server_state(server, &state.global)?;
    }
    ctx.model_version = state.model_version;
    ctx.global = Some(state.global);
    ctx.done = ctx.model_version >= ctx.rounds;
    Ok(())
}

/// Saves what a restart needs after a server step (the step's commit point).
async fn save_resume(ctx: &mut AsyncAggregatorCtx, record: &MetricRecord) -> Result<()> {
    let global = ctx.global()?.clone();
    let optimizer = ctx.optimizer.as_ref().expect("optimizer present between steps");
    let state = ResumeState {
        round: ctx.model_version,
        model_version: ctx.model_version,
        server: optimizer.server_state(&global)?,
        global,
        selector: serde_json::json!({"inFlight": [], "stats": {}}),
        record: Some(record.clone()),
        privacy: None,
    };
    let (registry, job, task) =
        (ctx.io.registry.clone(), ctx.io.config.job.id.clone(), ctx.io.config.task_id.clone());
    tokio::task::spawn_blocking(move || registry.save_resume(&job, &task, &state)).await?
}

async fn await_trainers(ctx: &mut AsyncAggregatorCtx) -> Result<()> {
    aggregator::await_children(
        &ctx.distribute,
        ctx.expected_trainers,
        ctx.min_trainers,
        ctx.common.join_timeout,
    )
    .await
}

async fn request_model(ctx: &AsyncAggregatorCtx) -> Result<Weights> {
    aggregator::request_initial_model(&ctx.distribute, &ctx.aggregate, ctx.distribute.ends()).await
}

async fn init_model(ctx: &mut AsyncAggregatorCtx) -> Result<()> {
    if ctx.global.is_none() {
        ctx.global = Some(request_model(ctx).await?);
    }
    let global = ctx.global()?;
    ctx.buffer = Some(ctx.optimizer.as_ref().expect("optimizer present").begin_round(global));
    ctx.io.metrics = RoundMetrics::start(ctx.io.traffic());
    ctx.started = Instant::now();
    Ok(())
}

async fn collect(ctx: &mut AsyncAggregatorCtx) -> Result<()> {
    let mut idle_since = Instant::now();
    while !ctx.buffer.as_ref().is_some_and(Round::is_ready) {
        ctx.dispatch().await?;
        if ctx.in_flight.is_empty() {
            // Nobody to wait for: every trainer left.
            if idle_since.elapsed() > ctx.common.join_timeout {
                return Err(Error::Quorum {
                    round: ctx.model_version + 1,
                    got: ctx.buffer.as_ref().map_or(0, Round::len),
                    need: ctx.optimizer.as_ref().and_then(Optimizer::agg_goal).unwrap_or(1),
                });
            }
            tokio::time::sleep(LIVENESS_POLL).await;
            continue;
        }
        idle_since = Instant::now();
        if let Some((end, message)) = ctx.next_message().await? {
            ctx.fold(end, message).await?;
        }
    }
    Ok(())
}

async fn aggregate(ctx: &mut AsyncAggregatorCtx) -> Result<()> {
    let buffer = ctx.buffer.take().expect("collect leaves a full buffer");
    let updates = buffer.len();
    let mut optimizer = ctx.optimizer.take().expect("optimizer present between steps");
    let global = ctx.global.take().expect("global model present between steps");
    let (optimizer, res) = tokio::task::spawn_blocking(move || {
        let mut global = global;
        let res = optimizer.finish_round(buffer, &mut global).map(|()| global);
        (optimizer, res)
    })
    .await?;
    let global = res?;
    ctx.buffer = Some(optimizer.begin_round(&global));
    ctx.optimizer = Some(optimizer);
    ctx.global = Some(global);
    ctx.model_version += 1;
    let stats = std::mem::take(&mut ctx.stats);
    let m = &mut ctx.io.metrics;
    m.set("updates", updates as f64);
    m.set("numSamples", stats.samples as f64);
    m.set("updatesRejected", stats.rejected as f64);
    m.set("staleness.mean", stats.staleness_sum as f64 / updates.max(1) as f64);
    m.set("staleness.max", stats.staleness_max as f64);
    m.set("modelVersion", ctx.model_version as f64);
    m.set("elapsedSeconds", ctx.started.elapsed().as_secs_f64());
    for (k, (sum, weight)) in stats.trainer_metrics {
        if weight > 0.0 {
            m.set(format!("{TRAINER_MEAN}{k}"), sum / weight);
        }
    }
    ctx.prune();
    Ok(())
}

async fn evaluate(ctx: &mut AsyncAggregatorCtx) -> Result<()> {
    let Some(evaluator) = ctx.evaluator.clone() else {
        return Ok(());
    };
    let global = ctx.global()?.clone();
    let metrics = tokio::task::spawn_blocking(move || {
        let mut e = evaluator.lock().unwrap_or_else(|e| e.into_inner());
        e.evaluate(&global)
    })
    .await?
    .map_err(|source| Error::App { step: "evaluate", source })?;
    ctx.io.metrics.extend(GLOBAL, &metrics);
    Ok(())
}

async fn checkpoint(ctx: &mut AsyncAggregatorCtx) -> Result<()> {
    let global = ctx.global()?.clone();
    let (registry, job, round) =
        (ctx.io.registry.clone(), ctx.io.config.job.id.clone(), ctx.model_version);
    tokio::task::spawn_blocking(move || registry.save_round(&job, round, &global).map(|_| ()))
        .await?
}

async fn report(ctx: &mut AsyncAggregatorCtx) -> Result<()> {
    let traffic = ctx.io.traffic();
    let next = RoundMetrics::start(traffic.clone());
    // A middle aggregator numbers its records by uploads; the top by server steps.
    let round = ctx.up.as_ref().map_or(ctx.model_version, |up| up.uploads);
    let record = std::mem::replace(&mut ctx.io.metrics, next).finish(
        &ctx.io.config.task_id,
        &ctx.io.config.role,
        round,
        traffic,
    );
    tracing::info!(
        task_id = %ctx.io.config.task_id,
        round,
        staleness = record.metrics.get("staleness.mean").copied(),
        global_accuracy = record.metrics.get("global.accuracy").copied(),
        trainers_accuracy = record.metrics.get("trainer.afterTraining.accuracy").copied(),
        "server step"
    );
    if ctx.up.is_none() {
        save_resume(ctx, &record).await?;
        let (registry, job, rec) =
            (ctx.io.registry.clone(), ctx.io.config.job.id.clone(), record.clone());
        tokio::task::spawn_blocking(move || registry.append_metrics(&job, &[rec])).await??;
        ctx.done = ctx.model_version >= ctx.rounds;
    }
    ctx.io.report(record);
    Ok(())
}

async fn finish(ctx: &mut AsyncAggregatorCtx) -> Result<()> {
    let global = ctx.global()?.clone();
    let mut end = Message::new(Kind::EndOfTraining, ctx.model_version);
    end.model_version = ctx.model_version;
    end.tensors = crate::convert::weights_to_tensors(&global)?;
    if ctx.up.is_none() {
        let (registry, job) = (ctx.io.registry.clone(), ctx.io.config.job.id.clone());
        let path =
            tokio::task::spawn_blocking(move || registry.save_final(&job, &global)).await??;
        tracing::info!(path = %path.display(), "final model saved");
    }
    // Idle trainers stop now; busy ones once their last update (discarded) arrives.
    for trainer in ctx.distribute.ends() {
        if !ctx.in_flight.contains_key(&trainer) {
            let _ = ctx.distribute.send(&trainer, end.clone()).await;
        }
    }
    let deadline = Instant::now() + ctx.common.join_timeout;
    while !ctx.in_flight.is_empty() && Instant::now() < deadline {
        ctx.prune();
        if let Some((trainer, _)) = ctx.next_message().await?
            && ctx.in_flight.remove(&trainer).is_some()
        {
            let _ = ctx.distribute.send(&trainer, end.clone()).await;
        }
    }
    Ok(())
}

/// The asynchronous aggregator program.
pub fn program() -> Composer<AsyncAggregatorCtx> {
    Composer::new()
        .tasklet("load_state", async_tasklet(|c| boxed(load_state(c))))
        .tasklet("await_trainers", async_tasklet(|c| boxed(await_trainers(c))))
        .tasklet("init_model", async_tasklet(|c| boxed(init_model(c))))
        .loop_until(
            "rounds",
            |c: &AsyncAggregatorCtx| c.done,
            Composer::new()
                .tasklet("collect", async_tasklet(|c| boxed(collect(c))))
                .tasklet("aggregate", async_tasklet(|c| boxed(aggregate(c))))
                .tasklet("evaluate", async_tasklet(|c| boxed(evaluate(c))))
                .tasklet("checkpoint", async_tasklet(|c| boxed(checkpoint(c))))
                .tasklet("report", async_tasklet(|c| boxed(report(c)))),
        )
        .tasklet("finish", async_tasklet(|c| boxed(finish(c))))
}

fn upward(ctx: &mut AsyncAggregatorCtx) -> Result<&mut Upward> {
    ctx.up
        .as_mut()
        .ok_or_else(|| Error::Config("async aggregator has no upward channels".to_owned()))
}

async fn join_up(ctx: &mut AsyncAggregatorCtx) -> Result<()> {
    let timeout = ctx.common.join_timeout;
    let up = upward(ctx)?;
    up.top = up.fetch.await_join(timeout).await?.into_iter().next();
    Ok(())
}

/// Waits for the top's next model (answering its `init_model` request on the way), or its
/// end-of-training.
async fn fetch_up(ctx: &mut AsyncAggregatorCtx) -> Result<()> {
    let up = upward(ctx)?;
    let (fetch, upload) = (up.fetch.clone(), up.upload.clone());
    let top = up.top.clone().ok_or_else(|| Error::Config("no top aggregator joined".to_owned()))?;
    loop {
        let received = fetch.recv(&top).await.map_err(peer_left);
        if parent_left(&received, &top) {
            await_parent(&fetch, &top, ctx.common.rejoin_timeout).await?;
            continue;
        }
        let message = received?;
        match message.kind {
            Kind::Control if Command::InitModel.is(&message) => {
                let weights = request_model(ctx).await?;
                let reply = weights_message(Kind::Weights, 0, 0, &weights)?;
                let sent = upload.send(&top, reply).await.map_err(peer_left);
                if !parent_left(&sent, &top) {
                    sent?;
                }
            }
            Kind::Weights => {
                let model = Model::decode(&top, &message)?;
                let global = tensors_to_weights(&message.tensors)?;
                if ctx.buffer.is_none() {
                    let optimizer = ctx.optimizer.as_ref().expect("optimizer present");
                    ctx.buffer = Some(optimizer.begin_round(&global));
                    ctx.started = Instant::now();
                }
                ctx.global = Some(global);
                ctx.model_version = model.model_version;
                upward(ctx)?.top_round = model.round;
                return Ok(());
            }
            Kind::EndOfTraining => {
                if !message.tensors.is_empty() {
                    ctx.global = Some(tensors_to_weights(&message.tensors)?);
                }
                ctx.model_version = message.model_version;
                ctx.done = true;
                return Ok(());
            }
            other => tracing::warn!(kind = ?other, "unexpected message from top ignored"),
        }
    }
}

/// Applies the full buffer to the top's model and sends the result up as this middle
/// aggregator's update; the top computes the delta against the model it sent.
async fn upload_up(ctx: &mut AsyncAggregatorCtx) -> Result<()> {
    let buffer = ctx.buffer.take().expect("collect leaves a full buffer");
    let updates = buffer.len();
    let mut optimizer = ctx.optimizer.take().expect("optimizer present between steps");
    let global = ctx.global()?.clone();
    let (optimizer, res) = tokio::task::spawn_blocking(move || {
        let mut model = global;
        let res = optimizer.finish_round(buffer, &mut model).map(|()| model);
        (optimizer, res)
    })
    .await?;
    let model = res?;
    ctx.buffer = Some(optimizer.begin_round(&model));
    ctx.optimizer = Some(optimizer);
    let stats = std::mem::take(&mut ctx.stats);
    let mut trainer_metrics = BTreeMap::new();
    let m = &mut ctx.io.metrics;
    m.set("updates", updates as f64);
    m.set("numSamples", stats.samples as f64);
    m.set("updatesRejected", stats.rejected as f64);
    m.set("staleness.mean", stats.staleness_sum as f64 / updates.max(1) as f64);
    m.set("staleness.max", stats.staleness_max as f64);
    m.set("modelVersion", ctx.model_version as f64);
    m.set("elapsedSeconds", ctx.started.elapsed().as_secs_f64());
    for (k, (sum, weight)) in stats.trainer_metrics {
        if weight > 0.0 {
            m.set(format!("{TRAINER_MEAN}{k}"), sum / weight);
            trainer_metrics.insert(k, sum / weight);
        }
    }
    let version = ctx.model_version;
    let up = upward(ctx)?;
    up.uploads += 1;
    let top = up.top.clone().ok_or_else(|| Error::Config("no top aggregator joined".to_owned()))?;
    let (upload, round) = (up.upload.clone(), up.top_round);
    let header = Update {
        round,
        model_version: version,
        num_samples: stats.samples,
        metrics: trainer_metrics,
    };
    let message =
        tokio::task::spawn_blocking(move || weights_message(Kind::Update, 0, 0, &model)).await??;
    let message = header.encode(message);
    let sent = upload.send(&top, message).await.map_err(peer_left);
    if parent_left(&sent, &top) {
        // Lost with the top aggregator; the next fetch waits for it to come back.
        tracing::warn!(%top, "top aggregator left before the update was sent");
    } else {
        sent?;
    }
    ctx.prune();
    Ok(())
}

/// The asynchronous middle aggregator program.
pub fn middle_program() -> Composer<AsyncAggregatorCtx> {
    Composer::new()
        .tasklet("join_up", async_tasklet(|c| boxed(join_up(c))))
        .tasklet("await_trainers", async_tasklet(|c| boxed(await_trainers(c))))
        .loop_until(
            "rounds",
            |c: &AsyncAggregatorCtx| c.done,
            Composer::new()
                .tasklet("fetch", async_tasklet(|c| boxed(fetch_up(c))))
                .tasklet("collect", async_tasklet(|c| boxed(collect(c))))
                .tasklet("upload", async_tasklet(|c| boxed(upload_up(c))))
                .tasklet("report", async_tasklet(|c| boxed(report(c)))),
        )
        .tasklet("finish", async_tasklet(|c| boxed(finish(c))))
}

/// The slow-down factor of the trainer task `config` from [`SLOW_TRAINERS`] (1 when absent).
pub fn slow_factor(config: &TaskConfig) -> Result<f64> {
    let bad = |reason: String| Error::Hyperparameter { name: SLOW_TRAINERS.to_owned(), reason };
    let map = match config.hyperparameters.get(SLOW_TRAINERS) {
        None | Some(Value::Null) => return Ok(1.0),
        Some(Value::Object(map)) => map,
        Some(v) => return Err(bad(format!("{v} is not an object of taskIndex → factor"))),
    };
    let mut res = 1.0;
    for (key, value) in map {
        let index: u32 =
            key.parse().map_err(|_| bad(format!("key {key:?} is not a task index")))?;
        let factor = value
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 1.0)
            .ok_or_else(|| bad(format!("factor {value} of trainer {key} is not a number ≥ 1")))?;
        if index == config.task_index {
            res = factor;
        }
    }
    Ok(res)
}

/// The trainer whose task index [`SLOW_TRAINERS`] may name: then it trains `factor` times
/// slower (an artificial straggler); otherwise it is the standard trainer.
pub struct StragglerTrainer;

impl Role for StragglerTrainer {
    type Ctx = TrainerCtx;
    const KIND: RoleKind = RoleKind::StragglerTrainer;
    const APP: AppNeed = AppNeed::Trainer;
    const LINGER: bool = false;

    fn build(io: TaskIo, app: UserApp) -> Result<TrainerCtx> {
        let app = straggler(&io.config, app.trainer()?)?;
        TrainerCtx::new(io, app)
    }

    fn program(_ctx: &TrainerCtx) -> Result<Composer<TrainerCtx>> {
        Ok(crate::roles::trainer::program())
    }
}

/// `app`, slowed down when [`SLOW_TRAINERS`] names `config`'s task index.
fn straggler(config: &TaskConfig, app: Box<dyn TrainerApp>) -> Result<Box<dyn TrainerApp>> {
    let factor = slow_factor(config)?;
    if factor > 1.0 {
        tracing::info!(task_id = %config.task_id, factor, "this trainer is an artificial straggler");
        return Ok(Box::new(Straggler { inner: app, factor }));
    }
    Ok(app)
}

/// An [`AppFactory`] whose trainers named in [`SLOW_TRAINERS`] train `factor` times slower.
pub struct StragglerFactory {
    inner: Arc<dyn AppFactory>,
}

impl StragglerFactory {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn AppFactory>) -> StragglerFactory {
        StragglerFactory { inner }
    }
}

impl AppFactory for StragglerFactory {
    fn trainer(&self, config: &TaskConfig) -> anyhow::Result<Box<dyn TrainerApp>> {
        Ok(straggler(config, self.inner.trainer(config)?)?)
    }

    fn evaluator(&self, config: &TaskConfig) -> anyhow::Result<Option<Box<dyn Evaluator>>> {
        self.inner.evaluator(config)
    }

    fn feature_party(&self, config: &TaskConfig) -> anyhow::Result<Box<dyn FeatureApp>> {
        self.inner.feature_party(config)
    }

    fn label_party(&self, config: &TaskConfig) -> anyhow::Result<Box<dyn LabelApp>> {
        self.inner.label_party(config)
    }
}

/// A trainer app that takes `factor` times as long to train.
struct Straggler {
    inner: Box<dyn TrainerApp>,
    factor: f64,
}

impl TrainerApp for Straggler {
    fn initialize(&mut self, config: &TaskConfig) -> anyhow::Result<()> {
        self.inner.initialize(config)
    }

    fn load_data(&mut self) -> anyhow::Result<()> {
        self.inner.load_data()
    }

    fn train(&mut self, round: u64) -> anyhow::Result<TrainOutcome> {
        // Runs on a blocking thread (the trainer role's contract), so sleeping here is fine.
        let started = std::time::Instant::now();
        let res = self.inner.train(round)?;
        std::thread::sleep(started.elapsed().mul_f64(self.factor - 1.0));
        Ok(res)
    }

    fn evaluate(&mut self) -> anyhow::Result<BTreeMap<String, f64>> {
        self.inner.evaluate()
    }

    fn get_weights(&self) -> anyhow::Result<Weights> {
        self.inner.get_weights()
    }

    fn set_weights(&mut self, weights: &Weights) -> anyhow::Result<()> {
        self.inner.set_weights(weights)
    }
}

#[cfg(test)]
mod tests {
    use fledge_channel::{BackendEnv, LocalHub};
    use fledge_types::Sort;
    use serde_json::json;

    use super::*;
    use crate::plan::JobPlan;
    use crate::role::{RunOptions, RunSummary, run};
    use crate::roles::ring::tests::MeanFactory;
    use crate::roles::trainer::Trainer;

    fn fedbuff_plan(job: &str, sort: &str) -> JobPlan {
        let mut plan = JobPlan::local(job, vec!["1:10".into(), "3:10".into(), "8:20".into()]);
        plan.optimizer = Sort {
            sort: sort.to_owned(),
            kwargs: match sort {
                "fedbuff" => {
                    json!({"aggGoal": 2, "concurrency": 3}).as_object().cloned().expect("object")
                }
                _ => serde_json::Map::new(),
            },
        };
        plan.hyperparameters = json!({"rounds": 5, "joinTimeout": 20, "slowTrainers": {"2": 4}})
            .as_object()
            .cloned()
            .expect("object");
        plan
    }

    fn opts(hub: &LocalHub, dir: &std::path::Path) -> RunOptions {
        RunOptions {
            workdir: dir.to_owned(),
            task_key: None,
            backend_env: BackendEnv { local_hub: hub.clone(), ..BackendEnv::default() },
            role: None,
            observer: None,
        }
    }

    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn steps_every_agg_goal_updates_and_every_trainer_ends_cleanly() {
        let dir = tempfile::tempdir().expect("tmp");
        let hub = LocalHub::new();
        let factory: Arc<dyn AppFactory> =
            Arc::new(StragglerFactory::new(Arc::new(MeanFactory::default())));
        let mut configs = fedbuff_plan("async", "fedbuff").configs().expect("configs");
        let aggregator = configs.remove(0);
        let mut trainers = tokio::task::JoinSet::new();
        for config in configs {
            trainers.spawn(run::<Trainer>(config, factory.clone(), opts(&hub, dir.path())));
        }
        let summary = run::<AsyncAggregator>(aggregator, factory.clone(), opts(&hub, dir.path()))
            .await
            .expect("aggregator runs");
        while let Some(res) = trainers.join_next().await {
            res.expect("join").expect("every trainer gets end-of-training and completes");
        }
        assert_eq!(summary.rounds, 5);
        assert_eq!(summary.history.len(), 5);
        for (i, r) in summary.history.iter().enumerate() {
            assert_eq!(r.round, i as u64 + 1);
            assert_eq!(r.metrics["updates"], 2.0);
            assert_eq!(r.metrics["modelVersion"], i as f64 + 1.0);
            assert!(
                r.metrics.contains_key("staleness.mean")
                    && r.metrics.contains_key("trainer.afterTraining.w")
            );
        }
        // Every step moves the model towards the targets (1, 3 and 8), never past them.
        let w = summary.final_model.as_ref().expect("final").get("w").expect("w").data()[0];
        assert!(w > 0.5 && w < 8.0, "final w {w}");
        let job = dir.path().join("registry/jobs/async");
        assert!(
            job.join("final.safetensors").is_file()
                && job.join("rounds/round-00005.safetensors").is_file()
        );
    }

    /// What a three-tier run did: the top's summary, the middle aggregators' uploads (the
    /// surviving ones), and the trainer rounds delivered.
    struct ThreeTiers {
        top: RunSummary,
        uploads: Vec<u64>,
        served: u64,
    }

    /// Three tiers: the FedBuff top aggregator (6 steps) over two asynchronous middle
    /// aggregators that share one group of four trainers (which follow whichever middle
    /// aggregator sent them a model), trainer 3 4× slower. With `kill_after`, middle
    /// aggregator 1 is aborted (its channels vanish as in a crash) once the trainers have
    /// trained that many times.
    async fn three_tiers(job: &str, kill_after: Option<u64>) -> ThreeTiers {
        use crate::roles::coordinated::tests::{chan, opts as hub_opts, task};
        let dir = tempfile::tempdir().expect("tmp");
        let hub = LocalHub::new();
        let mean = MeanFactory::default();
        let trained = mean.trained.clone();
        let factory: Arc<dyn AppFactory> = Arc::new(StragglerFactory::new(Arc::new(mean)));
        let all = vec![
            chan(
                "global-channel",
                "top-aggregator",
                &["distribute", "aggregate"],
                "middle-aggregator",
                &["fetch", "upload"],
            ),
            chan(
                "param-channel",
                "middle-aggregator",
                &["distribute", "aggregate"],
                "trainer",
                &["fetch", "upload"],
            ),
        ];
        let h = json!({"rounds": 6, "joinTimeout": 20, "slowTrainers": {"3": 4}});
        let fedbuff = Sort {
            sort: "fedbuff".to_owned(),
            kwargs: json!({"aggGoal": 2, "concurrency": 4}).as_object().cloned().expect("object"),
        };
        let mut trainers = tokio::task::JoinSet::new();
        for (i, data) in ["1:10", "2:10", "3:20", "4:20"].into_iter().enumerate() {
            let mut t = task(job, "trainer", i as u32, &all, Some(data), &h);
            t.optimizer = fedbuff.clone();
            trainers.spawn(run::<crate::roles::follow::AsyncTrainer>(
                t,
                factory.clone(),
                hub_opts(&hub, dir.path()),
            ));
        }
        let middle = |i: u32| {
            let mut m = task(job, "middle-aggregator", i, &all, None, &h);
            m.optimizer = fedbuff.clone();
            run::<AsyncMiddleAggregator>(m, factory.clone(), hub_opts(&hub, dir.path()))
        };
        let mut middles = tokio::task::JoinSet::new();
        middles.spawn(middle(0));
        let victim = tokio::spawn(middle(1));
        let mut top = task(job, "top-aggregator", 0, &all, None, &h);
        top.optimizer = fedbuff.clone();
        // Both middle aggregators are present before the first step.
        top.hyperparameters.insert("expectedTrainers".into(), json!(2));
        let top =
            tokio::spawn(run::<AsyncAggregator>(top, factory.clone(), hub_opts(&hub, dir.path())));
        if let Some(n) = kill_after {
            while trained.load(std::sync::atomic::Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            victim.abort();
        } else {
            middles.spawn(async move { victim.await.expect("join") });
        }
        let top = top.await.expect("join").expect("the top aggregator completes");
        let mut uploads = Vec::new();
        while let Some(res) = middles.join_next().await {
            let middle = res.expect("join").expect("every middle aggregator ends cleanly");
            assert_eq!(middle.kind, RoleKind::AsyncMiddleAggregator);
            uploads.push(middle.rounds);
            for r in &middle.history {
                assert_eq!(r.metrics["updates"], 2.0, "{r:?}");
                assert!(
                    r.metrics.contains_key("staleness.max")
                        && r.metrics.contains_key("trainer.afterTraining.w")
                );
            }
        }
        let mut served = 0;
        while let Some(res) = trainers.join_next().await {
            served += res.expect("join").expect("every trainer gets end-of-training").rounds;
        }
        assert_eq!(top.rounds, 6);
        assert!(top.history.iter().all(|r| r.metrics["updates"] == 2.0));
        let w = top.final_model.as_ref().expect("final").get("w").expect("w").data()[0];
        assert!(w > 0.5 && w < 4.0, "final w {w}");
        ThreeTiers { top, uploads, served }
    }

    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn three_tiers_step_asynchronously_and_replicated_middles_share_the_trainers() {
        let run = three_tiers("async3", None).await;
        // 6 steps × 2 middle updates; each middle update folds 2 trainer updates.
        assert!(run.uploads.iter().sum::<u64>() >= 12, "{:?}", run.uploads);
        assert!(run.uploads.iter().all(|n| *n >= 1), "both replicas take part: {:?}", run.uploads);
        assert!(run.served >= 24, "{} trainer rounds", run.served);
        assert!(run.top.history.iter().any(|r| r.metrics["staleness.max"] >= 1.0));
    }

    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn a_crashed_replica_leaves_its_trainers_to_the_other_and_the_job_completes() {
        // Round trips of the 4 trainers: the crash lands after the first steps.
        let run = three_tiers("async3-crash", Some(10)).await;
        assert_eq!(run.uploads.len(), 1, "only the survivor reports back");
        assert!(run.uploads[0] >= 6, "the survivor carries the rest: {:?}", run.uploads);
    }

    #[tokio::test]
    async fn a_synchronous_optimizer_is_rejected_with_its_name() {
        let dir = tempfile::tempdir().expect("tmp");
        let config = fedbuff_plan("sync", "fedavg").configs().expect("configs").remove(0);
        let err = run::<AsyncAggregator>(
            config,
            Arc::new(MeanFactory::default()),
            opts(&LocalHub::new(), dir.path()),
        )
        .await
        .expect_err("fedavg is not asynchronous");
        assert!(
            err.to_string().contains("\"fedbuff\"") && err.to_string().contains("fedavg"),
            "{err}"
        );
    }

    #[test]
    fn slow_factor_reads_the_task_index_and_rejects_bad_values() {
        let plan = JobPlan::local("j", vec!["/a".into(), "/b".into()]);
        let mut trainer = plan.configs().expect("configs")[2].clone();
        assert_eq!(trainer.task_index, 1);
        assert_eq!(slow_factor(&trainer).expect("absent"), 1.0);
        trainer.hyperparameters.insert(SLOW_TRAINERS.into(), json!({"1": 5, "0": 2}));
        assert_eq!(slow_factor(&trainer).expect("set"), 5.0);
        for bad in [json!({"x": 2}), json!({"1": 0.5}), json!([1])] {
            trainer.hyperparameters.insert(SLOW_TRAINERS.into(), bad);
            let err = slow_factor(&trainer).unwrap_err().to_string();
            assert!(err.contains(SLOW_TRAINERS), "{err}");
        }
    }
}
