//! The aggregator roles: top (root of the tree) and middle (inner node of a three-tier job).
//!
//! Top program ([`top_program`]):
//!
//! ```text
//! load_state, await_trainers, init_model,
//! loop rounds until done { select, distribute, aggregate, evaluate, checkpoint, report },
//! finish
//! ```
//!
//! Middle program ([`middle_program`]): a trainer towards the top, an aggregator towards its
//! own trainers:
//!
//! ```text
//! join_up, await_trainers,
//! loop rounds until end-of-training { fetch, select, distribute, aggregate, upload, report },
//! finish
//! ```
//!
//! Rounds are synchronous. Each update is folded into the optimizer's accumulator as it
//! arrives (FedAvg/FedOpt memory is one model, whatever the number of trainers), read in place
//! from the received message's bytes (no decoded copy); the message is dropped right after.
//! Messages carrying the global model share it instead of copying it. Under a rule that
//! replaces the global model (FedAvg, FedProx, median, trimmed mean, Krum) the previous one is
//! freed once aggregation begins (it was distributed, and from round 2 on it is the previous
//! round's checkpoint), so a round holds the accumulator and the updates in flight, not the old model as well; the
//! server optimizers (FedAdam, FedYogi, FedAdaGrad) keep it, since they step from it.
//!
//! A round waits for every selected trainer, except that a trainer
//! that leaves the channel (`ends()`; over MQTT after the liveness timeout) is dropped: the
//! round then finishes with the others if at least `minTrainers` answered, and fails
//! otherwise. Updates for another round, without `num_samples` or with a wrong layout are
//! rejected with a warning and do not count.
//!
//! Upload grants bound the updates in flight: the aggregator announces `uploadGrants` = k
//! with each round's model; with k > 0, trainers send a small `ready` control message after
//! training and upload only when granted; at most k grants are outstanding, and a granted
//! trainer that dies frees its grant. With k = 0 every selected trainer uploads as soon as it
//! is done. k is hyperparameter `maxConcurrentUploads` when set (0: no limit); unset, it is
//! picked each round from the model size so that the updates in flight fit in
//! [`DEFAULT_UPLOAD_BUDGET_BYTES`] (at least 1), and 0 when that covers every selected trainer
//! (small models pay no grant round trips; large ones keep the aggregator's memory flat).
//!
//! With secure aggregation (`modelSpec.secureAggregation`, [`crate::roles::secagg`]) an
//! aggregator whose selected children are trainers runs each round's SecAgg+ stages with them
//! after distributing the model, and folds the unmasked weighted mean of their deltas (plus
//! the round's model) into the optimizer as one update weighing the survivors' total weight,
//! the same path as plain FedAvg. A top aggregator over middle aggregators aggregates their
//! group means in clear: each middle aggregator masks within its own group. No upload grants
//! are used (masked inputs are summed as they arrive). After every secure round it reports
//! `secagg.survivors`, `secagg.dropped.{keys,shares,input,unmask}` and
//! `secagg.quantizationStep`.
//!
//! A middle aggregator always averages its trainers with FedAvg and forwards the mean with
//! the summed sample count, so that the job's server optimizer (FedAdam, ...) runs once, at
//! the top.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fledge_algorithms::privacy::{CentralDp, DpConfig, DpMode, SecAggConfig};
use fledge_algorithms::{EndReport, Optimizer, Selector};
use fledge_channel::{Channel, Kind, Message};
use fledge_types::{MetricRecord, TaskId};
use futures::StreamExt;

use crate::app::{AppNeed, Evaluator, UserApp};
use crate::composer::{Composer, Context, async_tasklet, boxed};
use crate::convert::{tensors_to_weights, weights_message};
use crate::hyper::{self, names};
use crate::metrics::{GLOBAL, RoundMetrics, TRAINER_MEAN};
use crate::protocol::{
    Command, Model, Update, await_parent, await_upload_permit, parent_left, peer_left,
};
use crate::registry::ResumeState;
use crate::role::{Role, RoleCtx, RunOptions, Start, TaskIo};
use crate::roles::secagg::{self, StageTimeouts};
use crate::roles::{Common, RoleKind, tags};
use crate::{Error, Result, Weights};

/// Which aggregator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// The root.
    Top,
    /// An inner node.
    Middle,
}

/// State of an aggregator task.
pub struct AggregatorCtx {
    /// The task's I/O.
    pub io: TaskIo,
    tier: Tier,
    common: Common,
    distribute: Channel,
    aggregate: Channel,
    up: Option<(Channel, Channel)>,
    top: Option<TaskId>,
    /// The global model.
    pub global: Option<Weights>,
    /// Current round (0 before the first).
    pub round: u64,
    /// Model version (rounds aggregated so far at the top).
    pub model_version: u64,
    /// Rounds to run (top only).
    pub rounds: u64,
    /// The loop is over.
    pub done: bool,
    optimizer: Option<Optimizer>,
    selector: Selector,
    min_trainers: usize,
    expected_trainers: usize,
    /// `maxConcurrentUploads` when set.
    max_uploads: Option<usize>,
    /// The grants of the current round (0: none), announced with its model.
    round_grants: usize,
    /// The grants the top announced with the model this middle aggregator averages for.
    up_grants: u64,
    selected: Vec<TaskId>,
    round_samples: u64,
    evaluator: Option<Arc<Mutex<Box<dyn Evaluator>>>>,
    /// Central differential privacy (top aggregator, `differentialPrivacy.mode` `central`).
    dp: Option<CentralDp>,
    /// Secure aggregation (`modelSpec.secureAggregation`).
    secagg: Option<SecAggConfig>,
    /// Its stage timeouts.
    secagg_timeouts: StageTimeouts,
}

impl Context for AggregatorCtx {
    fn record_time(&mut self, alias: &str, seconds: f64) {
        self.io.record_time(alias, seconds);
    }

    fn round(&self) -> Option<u64> {
        Some(self.round)
    }
}

impl RoleCtx for AggregatorCtx {
    fn io(&mut self) -> &mut TaskIo {
        &mut self.io
    }

    fn rounds(&mut self) -> u64 {
        match self.tier {
            Tier::Top => self.round,
            // A middle aggregator counts the rounds it aggregated.
            Tier::Middle => self.io.history.len() as u64,
        }
    }

    fn final_model(&mut self) -> Option<Weights> {
        self.global.take()
    }
}

/// The synchronous top aggregator (see the module docs).
pub struct TopAggregator;

impl Role for TopAggregator {
    type Ctx = AggregatorCtx;
    const KIND: RoleKind = RoleKind::TopAggregator;
    const APP: AppNeed = AppNeed::Evaluator;

    fn build(io: TaskIo, app: UserApp) -> Result<AggregatorCtx> {
        AggregatorCtx::new(io, Tier::Top, app.evaluator()?)
    }

    fn program(_ctx: &AggregatorCtx) -> Result<Composer<AggregatorCtx>> {
        Ok(top_program())
    }
}

/// The synchronous middle aggregator of a three-tier topology (see the module docs).
pub struct MiddleAggregator;

impl Role for MiddleAggregator {
    type Ctx = AggregatorCtx;
    const KIND: RoleKind = RoleKind::MiddleAggregator;
    const APP: AppNeed = AppNeed::None;

    fn prepare(config: &fledge_types::TaskConfig, opts: &mut RunOptions) -> Result<()> {
        if secagg::config_of(config)?.is_some() {
            opts.backend_env.props.insert(secagg::PROP.to_owned(), secagg::PROP_GROUP.into());
        }
        Ok(())
    }

    fn build(io: TaskIo, _app: UserApp) -> Result<AggregatorCtx> {
        AggregatorCtx::new(io, Tier::Middle, None)
    }

    fn program(_ctx: &AggregatorCtx) -> Result<Composer<AggregatorCtx>> {
        Ok(middle_program())
    }
}

/// Unwraps an `Option` field that a previous tasklet must have set.
fn needs<'a, T>(value: &'a Option<T>, what: &str) -> Result<&'a T> {
    value
        .as_ref()
        .ok_or_else(|| Error::Config(format!("aggregator program has no {what} at this step")))
}

impl AggregatorCtx {
    /// An aggregator of `tier` over joined `channels`.
    pub fn new(
        io: TaskIo,
        tier: Tier,
        evaluator: Option<Box<dyn Evaluator>>,
    ) -> Result<AggregatorCtx> {
        let config = &io.config;
        let channels = &io.channels;
        let common = Common::from_config(config)?;
        let h = &config.hyperparameters;
        let rounds = hyper::uint(h, names::ROUNDS, 1, 1)?;
        let min_trainers = hyper::uint(h, names::MIN_TRAINERS, 1, 1)? as usize;
        let expected_trainers =
            hyper::uint(h, names::EXPECTED_TRAINERS, min_trainers as u64, 1)? as usize;
        let max_uploads = match h.get(names::MAX_CONCURRENT_UPLOADS) {
            None => None,
            Some(_) => Some(hyper::uint(h, names::MAX_CONCURRENT_UPLOADS, 0, 0)? as usize),
        };
        let optimizer = match tier {
            Tier::Top => Optimizer::from_config(
                &serde_json::to_value(&config.optimizer).expect("sort serialises"),
            )?,
            Tier::Middle => Optimizer::default(),
        };
        if optimizer.is_async() {
            return Err(Error::Config(format!(
                "optimizer {} is asynchronous; the synchronous aggregators cannot run it",
                optimizer.sort()
            )));
        }
        let selector = Selector::from_config(
            &serde_json::to_value(&config.selector).expect("sort serialises"),
        )?;
        let dp = match (tier, &config.differential_privacy) {
            (Tier::Top, Some(value)) => central_dp(value, &optimizer)?,
            _ => None,
        };
        let secagg = secagg::config_of(config)?;
        let secagg_timeouts = StageTimeouts::from_config(config)?;
        let distribute = channels.by_tag(tags::DISTRIBUTE)?.clone();
        let aggregate = channels.by_tag(tags::AGGREGATE)?.clone();
        let up = match tier {
            Tier::Top => None,
            Tier::Middle => Some((
                channels.by_tag(tags::FETCH)?.clone(),
                channels.by_tag(tags::UPLOAD)?.clone(),
            )),
        };
        Ok(AggregatorCtx {
            io,
            tier,
            common,
            distribute,
            aggregate,
            up,
            top: None,
            global: None,
            round: 0,
            model_version: 0,
            rounds,
            done: false,
            optimizer: Some(optimizer),
            selector,
            min_trainers,
            expected_trainers,
            max_uploads,
            round_grants: 0,
            up_grants: 0,
            selected: Vec::new(),
            round_samples: 0,
            evaluator: evaluator.map(|e| Arc::new(Mutex::new(e))),
            dp,
            secagg,
            secagg_timeouts,
        })
    }

    /// The children selected for the current round.
    pub fn selected(&self) -> &[TaskId] {
        &self.selected
    }

    /// Replaces the current round's selection (a coordinator's plan or assignment) and
    /// records its size as `trainersSelected`.
    pub(crate) fn set_selected(&mut self, selected: Vec<TaskId>) {
        self.io.metrics.set("trainersSelected", selected.len() as f64);
        self.selected = selected;
    }

    /// The channel to the children (trainers, or middle aggregators at the top).
    pub(crate) fn children(&self) -> &Channel {
        &self.distribute
    }

    /// Sets the sample count a middle aggregator reports up for this round.
    pub(crate) fn set_round_samples(&mut self, samples: u64) {
        self.round_samples = samples;
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        tokio::task::spawn_blocking(f).await?
    }
}

/// Resumes from the state this task saved after its last round, if it ran before (the
/// controller restarted it after a failure); otherwise loads the job's base model, if any.
/// The central DP of a job's `differentialPrivacy` section (`None` for local DP, which the
/// trainers apply). Central DP averages clipped deltas itself, so it runs with `fedavg` only.
fn central_dp(value: &serde_json::Value, optimizer: &Optimizer) -> Result<Option<CentralDp>> {
    let cfg = DpConfig::from_json(value)
        .map_err(|e| Error::Config(format!("modelSpec.{}: {}", e.field, e.reason)))?;
    if cfg.mode != DpMode::Central {
        return Ok(None);
    }
    if optimizer.sort() != "fedavg" {
        return Err(Error::Config(format!(
            "modelSpec.differentialPrivacy: central DP averages clipped updates itself and runs \
             with the fedavg optimizer only, not {}",
            optimizer.sort()
        )));
    }
    CentralDp::new(cfg).map(Some).map_err(|e| Error::Config(format!("differentialPrivacy: {e}")))
}

/// A round's accumulator: the optimizer's, or central DP's sum of clipped deltas from the
/// round's global model.
enum Acc {
    Plain(fledge_algorithms::Round),
    Private(fledge_algorithms::privacy::dp::CentralDpRound, Arc<Weights>),
}

impl Acc {
    fn fold(&mut self, tensors: &fledge_channel::Tensors, num_samples: u64) -> Result<()> {
        match self {
            Acc::Plain(acc) => fold_update(acc, tensors, num_samples),
            Acc::Private(round, global) => {
                let delta = tensors_to_weights(tensors)?.delta_from(global)?;
                round.add(&delta).map(|_| ()).map_err(|e| Error::Privacy(e.to_string()))
            }
        }
    }
}

async fn load_state(ctx: &mut AggregatorCtx) -> Result<()> {
    let state = match ctx.io.start_state().await? {
        Start::Fresh(base) => {
            ctx.global = base;
            return Ok(());
        }
        Start::Resume(state) => *state,
    };
    let optimizer = ctx.optimizer.as_mut().expect("optimizer present between rounds");
    if let Some(server) = state.server {
        optimizer.restore_server_state(server, &state.global)?;
    }
    ctx.selector.restore(&state.selector)?;
    if let (Some(dp), Some(saved)) = (ctx.dp.as_mut(), &state.privacy) {
        let rounds = saved["rounds"].as_u64();
        let norm = saved["clippingNorm"].as_f64();
        let (Some(rounds), Some(norm)) = (rounds, norm) else {
            return Err(Error::Privacy(format!("unreadable saved DP state {saved}")));
        };
        dp.restore(rounds, norm).map_err(|e| Error::Privacy(e.to_string()))?;
    }
    ctx.round = state.round;
    ctx.model_version = state.model_version;
    ctx.global = Some(state.global);
    ctx.done = ctx.round >= ctx.rounds;
    Ok(())
}

async fn await_trainers(ctx: &mut AggregatorCtx) -> Result<()> {
    await_children(
        &ctx.distribute,
        ctx.expected_trainers,
        ctx.min_trainers,
        ctx.common.join_timeout,
    )
    .await
}

/// Waits until `expected` children (at least `min`) joined `distribute`; past `join_timeout`
/// it starts with those present if they are at least `min`, and fails the quorum otherwise.
/// Every aggregator (synchronous or FedBuff, top or middle) starts this way.
pub(crate) async fn await_children(
    distribute: &Channel,
    expected: usize,
    min: usize,
    join_timeout: Duration,
) -> Result<()> {
    let want = expected.max(min);
    match distribute.await_ends(want, join_timeout).await {
        Ok(ends) => {
            tracing::info!(task_id = %distribute.me(), trainers = ends.len(), "trainers joined");
            Ok(())
        }
        Err(fledge_channel::Error::JoinTimeout { .. }) => {
            let have = distribute.ends().len();
            if have >= min {
                tracing::warn!(have, want, "join timeout; starting with the trainers present");
                Ok(())
            } else {
                Err(Error::Quorum { round: 0, got: have, need: min })
            }
        }
        Err(e) => Err(e.into()),
    }
}

async fn request_model(ctx: &AggregatorCtx) -> Result<Weights> {
    // A coordinated round selects before the model exists: ask only the selected children,
    // the others may be listening to someone else.
    let ends = if ctx.selected.is_empty() { ctx.distribute.ends() } else { ctx.selected.clone() };
    request_initial_model(&ctx.distribute, &ctx.aggregate, ends).await
}

/// Asks `ends`, one at a time, for their initial weights (on `distribute`, the reply on
/// `aggregate`): the first that answers gives the model. Other messages from an end are
/// ignored while it is asked; an end that leaves is skipped.
pub(crate) async fn request_initial_model(
    distribute: &Channel,
    aggregate: &Channel,
    ends: Vec<TaskId>,
) -> Result<Weights> {
    for end in ends {
        let request = Command::InitModel.message(0);
        if let Err(e) = distribute.send(&end, request).await {
            tracing::warn!(%end, error = %e, "cannot ask trainer for the initial model");
            continue;
        }
        loop {
            match aggregate.recv(&end).await {
                Ok(m) if m.kind == Kind::Weights && m.round == 0 => {
                    tracing::info!(%end, "initial model received from trainer");
                    return tensors_to_weights(&m.tensors);
                }
                Ok(m) => {
                    tracing::warn!(%end, kind = ?m.kind, "ignored while waiting for the initial model")
                }
                Err(e) => {
                    tracing::warn!(%end, error = %e, "trainer left before sending the initial model");
                    break;
                }
            }
        }
    }
    Err(Error::Quorum { round: 0, got: 0, need: 1 })
}

async fn init_model(ctx: &mut AggregatorCtx) -> Result<()> {
    if ctx.global.is_none() {
        ctx.global = Some(request_model(ctx).await?);
    }
    Ok(())
}

async fn select(ctx: &mut AggregatorCtx) -> Result<()> {
    if ctx.tier == Tier::Top {
        ctx.round += 1;
        let metrics = RoundMetrics::start(ctx.io.traffic());
        ctx.io.metrics = metrics;
    }
    let ends = ctx.distribute.ends();
    let names: Vec<&str> = ends.iter().map(TaskId::as_str).collect();
    ctx.selected = ctx.selector.select(&names, ctx.round).into_iter().map(TaskId::from).collect();
    if ctx.selected.len() < ctx.min_trainers {
        return Err(Error::Quorum {
            round: ctx.round,
            got: ctx.selected.len(),
            need: ctx.min_trainers,
        });
    }
    ctx.io.metrics.set("trainersAlive", ends.len() as f64);
    ctx.io.metrics.set("trainersSelected", ctx.selected.len() as f64);
    Ok(())
}

/// One tensor of a shared global model, as the values of a wire tensor: a message carrying
/// the model borrows it instead of copying it.
struct GlobalTensor(Arc<Weights>, usize);

impl AsRef<[f32]> for GlobalTensor {
    fn as_ref(&self) -> &[f32] {
        self.0.tensors()[self.1].data()
    }
}

/// A message of `kind` carrying `global` without copying it (see [`GlobalTensor`]).
fn shared_weights_message(
    kind: Kind,
    round: u64,
    model_version: u64,
    global: &Arc<Weights>,
) -> Result<Message> {
    let mut message = Message::new(kind, round);
    message.model_version = model_version;
    for (i, t) in global.tensors().iter().enumerate() {
        let tensor = fledge_channel::Tensor::from_f32_owner(
            t.shape().to_vec(),
            GlobalTensor(global.clone(), i),
        )
        .map_err(|e| Error::Tensors(format!("tensor {}: {e}", t.name())))?;
        message.tensors.insert(t.name(), tensor);
    }
    Ok(message)
}

/// The global model back from sharing. Messages sent over `mqtt` release it once encoded;
/// over `local`, receivers may still hold it, and then it is copied.
fn unshare(global: Arc<Weights>) -> Weights {
    Arc::try_unwrap(global).unwrap_or_else(|shared| (*shared).clone())
}

async fn distribute(ctx: &mut AggregatorCtx) -> Result<()> {
    // The message shares the global model (no wire copy of it); the backend copies it once,
    // into its chunks.
    let global = Arc::new(ctx.global.take().ok_or_else(|| {
        Error::Config("aggregator program has no global model at this step".to_owned())
    })?);
    let res = distribute_shared(ctx, &global).await;
    ctx.global = Some(unshare(global));
    res
}

/// Bytes of updates an aggregator lets be in flight at once when `maxConcurrentUploads` is
/// not set (see the module docs).
pub const DEFAULT_UPLOAD_BUDGET_BYTES: usize = 64 << 20;

/// The upload grants of a round: `maxConcurrentUploads` when set, else as many model-sized
/// updates as fit in the budget (at least 1); 0 (no grants) when that covers every trainer.
fn round_grants(max_uploads: Option<usize>, model_bytes: usize, selected: usize) -> usize {
    let limit = match max_uploads {
        Some(limit) => limit,
        None => (DEFAULT_UPLOAD_BUDGET_BYTES / model_bytes.max(1)).max(1),
    };
    if limit >= selected { 0 } else { limit }
}

async fn distribute_shared(ctx: &mut AggregatorCtx, global: &Arc<Weights>) -> Result<()> {
    let round = ctx.round;
    ctx.round_grants = if ctx.secagg.is_some() {
        // Masked inputs are summed as they arrive; grants would stall the round's stages.
        0
    } else {
        round_grants(ctx.max_uploads, global.num_params() * 4, ctx.selected.len())
    };
    let header =
        Model { round, model_version: ctx.model_version, upload_grants: ctx.round_grants as u64 };
    let message = header.encode(shared_weights_message(Kind::Weights, 0, 0, global)?);
    let all = ctx.distribute.ends();
    if all == ctx.selected {
        ctx.distribute.broadcast(message).await?;
        return Ok(());
    }
    let mut reached = Vec::with_capacity(ctx.selected.len());
    for end in std::mem::take(&mut ctx.selected) {
        match ctx.distribute.send(&end, message.clone()).await {
            Ok(()) => reached.push(end),
            Err(fledge_channel::Error::UnknownEnd { .. }) => {
                tracing::warn!(%end, round, "selected trainer left before distribution; dropped");
            }
            Err(e) => return Err(e.into()),
        }
    }
    ctx.selected = reached;
    Ok(())
}

/// Folds a received update into the round straight from the message's bytes: `F32`
/// tensors are read in place (no decoded copy of the update); other float dtypes are
/// converted first. The message was checksummed whole when it was decoded, and the round
/// checks layout and finiteness before folding anything, so a rejected update leaves the
/// round untouched.
fn fold_update(
    acc: &mut fledge_algorithms::Round,
    tensors: &fledge_channel::Tensors,
    num_samples: u64,
) -> Result<()> {
    if tensors.iter().any(|(_, t)| t.dtype() != fledge_channel::Dtype::F32) {
        let weights = tensors_to_weights(tensors)?;
        return acc.add(&weights, num_samples, 0).map_err(Error::from);
    }
    let mut view = fledge_algorithms::WeightsView::new();
    for (name, t) in tensors.iter() {
        let tensor = fledge_algorithms::TensorView::from_le_bytes(name, t.shape(), t.data())
            .map_err(|e| Error::Tensors(format!("tensor {name}: {e}")))?;
        view.push(tensor).map_err(|e| Error::Tensors(format!("tensor {name}: {e}")))?;
    }
    acc.add_view(&view, num_samples, 0).map_err(Error::from)
}

/// Whether this round's selected children run the SecAgg+ client (trainers): `false` when
/// they are middle aggregators that mask within their own groups. Children that mix the two,
/// or do not announce either, are refused: their updates would arrive in clear.
fn secure_children(ctx: &AggregatorCtx) -> Result<bool> {
    let mut clients = Vec::new();
    let mut groups = Vec::new();
    let mut other = Vec::new();
    for end in &ctx.selected {
        let Some(props) = ctx.distribute.end_props(end) else {
            continue; // left already: it drops out of the round either way
        };
        match props.props.get(secagg::PROP).and_then(serde_json::Value::as_str) {
            Some(secagg::PROP_CLIENT) => clients.push(end.as_str()),
            Some(secagg::PROP_GROUP) => groups.push(end.as_str()),
            _ => other.push(end.as_str()),
        }
    }
    if other.is_empty() && (clients.is_empty() || groups.is_empty()) {
        return Ok(groups.is_empty());
    }
    Err(Error::Config(format!(
        "modelSpec.secureAggregation: round {} has children that run the SecAgg+ client {clients:?}, \
         middle aggregators {groups:?} and children that run neither {other:?}; every child must \
         be a trainer of this job or every child a middle aggregator of it",
        ctx.round
    )))
}

/// A round under secure aggregation with this aggregator's trainers (see the module docs).
async fn aggregate_secure(ctx: &mut AggregatorCtx, config: SecAggConfig) -> Result<()> {
    let global = ctx.global.take().ok_or_else(|| {
        Error::Config("aggregator program has no global model at this step".to_owned())
    })?;
    let round = ctx.round;
    let ends = ctx.selected.clone();
    let outcome = secagg::server_round(
        &ctx.distribute,
        &ctx.aggregate,
        &ends,
        &config,
        round,
        global.num_params(),
        ctx.secagg_timeouts,
        &mut |_: &TaskId, _: &Message| {},
    )
    .await;
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => {
            ctx.global = Some(global);
            tracing::error!(round, error = %e, "secure aggregation round failed");
            return Err(e);
        }
    };
    let alive: BTreeSet<TaskId> = ctx.aggregate.ends().into_iter().collect();
    for end in &outcome.missing {
        tracing::warn!(%end, round, "trainer dropped out of the secure round");
        if !alive.contains(end) {
            ctx.selector.remove(end.as_str());
        }
    }
    let survivors = outcome.contributors.len();
    if survivors < ctx.min_trainers {
        ctx.global = Some(global);
        return Err(Error::Quorum { round, got: survivors, need: ctx.min_trainers });
    }
    let total_weight = outcome.result.total_weight;
    let m = &mut ctx.io.metrics;
    m.set("secagg.survivors", survivors as f64);
    for (stage, dropped) in secagg::STAGES.iter().zip(outcome.dropped) {
        m.set(format!("secagg.dropped.{stage}"), dropped as f64);
    }
    m.set("secagg.quantizationStep", outcome.result.quantization_step);
    m.set("updates", survivors as f64);
    m.set("trainersDropped", outcome.missing.len() as f64);
    m.set("numSamples", total_weight as f64);
    // The round's update: its model plus the survivors' mean delta, weighing their total
    // weight, folded like a plain FedAvg update.
    let mut update = global.clone();
    let mut offset = 0;
    for t in update.tensors_mut() {
        let data = t.data_mut();
        let mean = outcome.result.mean.get(offset..offset + data.len()).ok_or_else(|| {
            Error::Privacy(format!(
                "secure aggregation returned {} values for a model of {}",
                outcome.result.mean.len(),
                global.num_params()
            ))
        })?;
        for (w, d) in data.iter_mut().zip(mean) {
            *w += d;
        }
        offset += data.len();
    }
    let mut optimizer = ctx.optimizer.take().expect("optimizer present between rounds");
    let (optimizer, new_global) = tokio::task::spawn_blocking(move || {
        let res = (|| {
            let mut acc = optimizer.begin_round(&global);
            acc.add(&update, total_weight.max(1), 0)?;
            drop(update);
            if optimizer.replaces_global() {
                optimizer.finish_round_replacing(acc)
            } else {
                let mut global = global;
                optimizer.finish_round(acc, &mut global).map(|()| global)
            }
        })();
        (optimizer, res)
    })
    .await?;
    ctx.optimizer = Some(optimizer);
    ctx.global = Some(new_global?);
    if ctx.tier == Tier::Top {
        ctx.model_version += 1;
    }
    ctx.round_samples = total_weight;
    Ok(())
}

/// Weighted sums of the metrics trainers sent with their updates.
#[derive(Default)]
struct TrainerMetrics {
    sums: BTreeMap<String, (f64, f64)>,
}

impl TrainerMetrics {
    fn add(&mut self, update: &Update) {
        let weight = update.num_samples as f64;
        for (k, v) in &update.metrics {
            let e = self.sums.entry(k.clone()).or_default();
            e.0 += v * weight;
            e.1 += weight;
        }
    }
}

async fn aggregate(ctx: &mut AggregatorCtx) -> Result<()> {
    if let Some(config) = ctx.secagg.clone()
        && secure_children(ctx)?
    {
        return aggregate_secure(ctx, config).await;
    }
    // Taken out (not cloned) to keep one copy of the model; put back after the round.
    let global = ctx.global.take().ok_or_else(|| {
        Error::Config("aggregator program has no global model at this step".to_owned())
    })?;
    let optimizer = ctx.optimizer.as_ref().expect("optimizer is put back after every round");
    let (mut acc, global) = match &ctx.dp {
        // Central DP clips each update's delta from this round's model: it is kept.
        Some(dp) => {
            let round = match dp.begin_round(&global) {
                Ok(round) => round,
                Err(e) => {
                    ctx.global = Some(global);
                    return Err(Error::Privacy(e.to_string()));
                }
            };
            let global = Arc::new(global);
            (Acc::Private(round, global.clone()), Some(unshare(global)))
        }
        // A rule that replaces the global model (FedAvg, FedProx, robust rules) builds the
        // new one from the accumulator alone, and the previous one was already distributed
        // (and, from round 2 on at the top, checkpointed): it is freed now, a model-sized
        // buffer less while updates arrive. FedAdam/FedYogi/FedAdaGrad step from it, so they
        // keep it. A round that misses its quorum fails the task either way: nothing reads
        // the previous model after that error.
        None if optimizer.replaces_global() => (Acc::Plain(optimizer.begin_round(&global)), None),
        None => (Acc::Plain(optimizer.begin_round(&global)), Some(global)),
    };
    let mut pending: BTreeSet<TaskId> = ctx.selected.iter().cloned().collect();
    let mut received = 0usize;
    let mut samples = 0u64;
    let mut rejected = 0usize;
    let mut trainer_metrics = TrainerMetrics::default();
    let round = ctx.round;
    // Upload grants (with maxConcurrentUploads): ends granted and not yet uploaded, and
    // ends ready and waiting for a grant.
    let mut granted: BTreeSet<TaskId> = BTreeSet::new();
    let mut waiting: VecDeque<TaskId> = VecDeque::new();
    while !pending.is_empty() {
        if ctx.round_grants > 0 {
            // A granted end that died frees its slot.
            let alive: BTreeSet<TaskId> = ctx.aggregate.ends().into_iter().collect();
            granted.retain(|e| alive.contains(e));
            while granted.len() < ctx.round_grants
                && let Some(next) = waiting.pop_front()
            {
                let grant = Command::GrantUpload.message(round);
                if ctx.distribute.send(&next, grant).await.is_ok() {
                    granted.insert(next);
                }
            }
        }
        let ends: Vec<TaskId> = pending.iter().cloned().collect();
        let mut stream = Box::pin(ctx.aggregate.recv_fifo(&ends, 1));
        let next = if ctx.round_grants > 0 {
            // Wake up now and then to notice granted ends that died.
            match tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
                Ok(next) => next,
                Err(_) => continue,
            }
        } else {
            stream.next().await
        };
        let Some(item) = next else {
            // Every trainer still pending has left the channel.
            break;
        };
        let (end, message) = item?;
        if message.round == round && Command::Ready.is(&message) {
            waiting.push_back(end);
            continue;
        }
        if message.kind != Kind::Update || message.round != round {
            tracing::warn!(%end, kind = ?message.kind, got = message.round, round, "stale or unexpected message ignored");
            continue;
        }
        granted.remove(&end);
        pending.remove(&end);
        let num_samples = match Update::decode(&end, &message) {
            Ok(update) => {
                trainer_metrics.add(&update);
                update.num_samples
            }
            Err(e) => {
                tracing::warn!(%end, round, error = %e, "update rejected");
                rejected += 1;
                continue;
            }
        };
        let started = tokio::time::Instant::now();
        let (back, res) = tokio::task::spawn_blocking(move || {
            let res = acc.fold(&message.tensors, num_samples);
            (acc, res)
        })
        .await?;
        acc = back;
        match res {
            Ok(()) => {
                received += 1;
                samples = samples.saturating_add(num_samples);
                let report = EndReport {
                    num_samples,
                    mean_squared_loss: 0.0,
                    duration_secs: started.elapsed().as_secs_f64(),
                };
                ctx.selector.report(end.as_str(), &report);
            }
            Err(e) => {
                rejected += 1;
                tracing::warn!(%end, round, error = %e, "update rejected");
            }
        }
    }
    for end in &pending {
        tracing::warn!(%end, round, "trainer left during the round; dropped");
        ctx.selector.remove(end.as_str());
    }
    if received < ctx.min_trainers {
        ctx.global = global;
        return Err(Error::Quorum { round, got: received, need: ctx.min_trainers });
    }
    let new_global = match acc {
        Acc::Plain(acc) => {
            let mut optimizer = ctx.optimizer.take().expect("optimizer present between rounds");
            let (optimizer, new_global) = tokio::task::spawn_blocking(move || {
                let res = match global {
                    Some(mut global) => optimizer.finish_round(acc, &mut global).map(|()| global),
                    None => optimizer.finish_round_replacing(acc),
                };
                (optimizer, res)
            })
            .await?;
            ctx.optimizer = Some(optimizer);
            new_global?
        }
        Acc::Private(round, shared) => {
            drop(shared);
            let mut global = global.expect("central DP keeps the round's model");
            let dp = ctx.dp.as_mut().expect("a private round has central DP");
            let (mean_delta, report) = match dp.finish_round(round) {
                Ok(done) => done,
                Err(e) => {
                    ctx.global = Some(global);
                    return Err(Error::Privacy(e.to_string()));
                }
            };
            global.add_scaled(&mean_delta, 1.0)?;
            ctx.io.metrics.set_privacy(&report);
            global
        }
    };
    ctx.global = Some(new_global);
    if ctx.tier == Tier::Top {
        ctx.model_version += 1;
    }
    ctx.round_samples = samples;
    ctx.io.metrics.set("updates", received as f64);
    ctx.io.metrics.set("trainersDropped", pending.len() as f64);
    ctx.io.metrics.set("updatesRejected", rejected as f64);
    ctx.io.metrics.set("numSamples", samples as f64);
    for (k, (sum, weight)) in trainer_metrics.sums {
        if weight > 0.0 {
            ctx.io.metrics.set(format!("{TRAINER_MEAN}{k}"), sum / weight);
        }
    }
    Ok(())
}

async fn evaluate(ctx: &mut AggregatorCtx) -> Result<()> {
    let Some(evaluator) = ctx.evaluator.clone() else {
        return Ok(());
    };
    let global = needs(&ctx.global, "global model")?.clone();
    let metrics = tokio::task::spawn_blocking(move || {
        let mut e = evaluator.lock().unwrap_or_else(|e| e.into_inner());
        e.evaluate(&global)
    })
    .await?
    .map_err(|source| Error::App { step: "evaluate", source })?;
    ctx.io.metrics.extend(GLOBAL, &metrics);
    Ok(())
}

async fn checkpoint(ctx: &mut AggregatorCtx) -> Result<()> {
    // Shared with the blocking writer, not copied.
    let global = Arc::new(ctx.global.take().ok_or_else(|| {
        Error::Config("aggregator program has no global model at this step".to_owned())
    })?);
    let (registry, job, round) = (ctx.io.registry.clone(), ctx.io.config.job.id.clone(), ctx.round);
    let shared = global.clone();
    let res = ctx.blocking(move || registry.save_round(&job, round, &shared).map(|_| ())).await;
    ctx.global = Some(unshare(global));
    res
}

async fn report(ctx: &mut AggregatorCtx) -> Result<()> {
    let record = std::mem::take(&mut ctx.io.metrics).finish(
        &ctx.io.config.task_id,
        &ctx.io.config.role,
        ctx.round,
        ctx.io.traffic(),
    );
    tracing::info!(
        task_id = %ctx.io.config.task_id,
        round = ctx.round,
        updates = record.metrics.get("updates").copied().unwrap_or(0.0),
        global_accuracy = record.metrics.get("global.accuracy").copied(),
        trainers_accuracy = record.metrics.get("trainer.afterTraining.accuracy").copied(),
        "round aggregated"
    );
    if ctx.tier == Tier::Top {
        save_resume(ctx, &record).await?;
        let (registry, job, rec) =
            (ctx.io.registry.clone(), ctx.io.config.job.id.clone(), record.clone());
        ctx.blocking(move || registry.append_metrics(&job, &[rec])).await?;
        ctx.done = ctx.round >= ctx.rounds;
    }
    ctx.io.report(record);
    Ok(())
}

/// Saves what a restart of this task needs to go on after the round just finished: the
/// commit point of a round (before it, a restart redoes the round; after it, it goes on with
/// the next and sends `record` again).
async fn save_resume(ctx: &mut AggregatorCtx, record: &MetricRecord) -> Result<()> {
    let global = ctx.global.take().ok_or_else(|| {
        Error::Config("aggregator program has no global model at this step".to_owned())
    })?;
    let optimizer = ctx.optimizer.as_ref().expect("optimizer present between rounds");
    let state = optimizer.server_state(&global).map(|server| ResumeState {
        round: ctx.round,
        model_version: ctx.model_version,
        global,
        server,
        selector: ctx.selector.state(),
        record: Some(record.clone()),
        privacy: ctx.dp.as_ref().map(|dp| {
            let (rounds, clipping_norm) = dp.state();
            serde_json::json!({"rounds": rounds, "clippingNorm": clipping_norm})
        }),
    });
    let state = match state {
        Ok(state) => state,
        Err(e) => return Err(e.into()),
    };
    let (registry, job, task) =
        (ctx.io.registry.clone(), ctx.io.config.job.id.clone(), ctx.io.config.task_id.clone());
    let (state, res) = ctx
        .blocking(move || {
            let res = registry.save_resume(&job, &task, &state);
            Ok((state, res))
        })
        .await?;
    ctx.global = Some(state.global);
    res
}

async fn finish(ctx: &mut AggregatorCtx) -> Result<()> {
    let global = ctx.global.take().map(Arc::new);
    let res = finish_shared(ctx, global.as_ref()).await;
    ctx.global = global.map(unshare);
    res?;
    Ok(())
}

/// Saves (top) and broadcasts the final model, shared rather than copied.
async fn finish_shared(ctx: &mut AggregatorCtx, global: Option<&Arc<Weights>>) -> Result<()> {
    let end = match global {
        Some(global) => {
            if ctx.tier == Tier::Top {
                let (registry, job, global) =
                    (ctx.io.registry.clone(), ctx.io.config.job.id.clone(), global.clone());
                let path = ctx.blocking(move || registry.save_final(&job, &global)).await?;
                tracing::info!(path = %path.display(), "final model saved");
            }
            shared_weights_message(Kind::EndOfTraining, ctx.round, ctx.model_version, global)?
        }
        None => {
            let mut end = Message::new(Kind::EndOfTraining, ctx.round);
            end.model_version = ctx.model_version;
            end
        }
    };
    if !ctx.distribute.ends().is_empty() {
        ctx.distribute.broadcast(end).await?;
    }
    Ok(())
}

async fn join_up(ctx: &mut AggregatorCtx) -> Result<()> {
    let (fetch, _) = needs(&ctx.up, "upward channels")?;
    let ends = fetch.await_join(ctx.common.join_timeout).await?;
    ctx.top = ends.into_iter().next();
    Ok(())
}

async fn fetch_up(ctx: &mut AggregatorCtx) -> Result<()> {
    let (fetch, upload) = needs(&ctx.up, "upward channels")?.clone();
    let top = needs(&ctx.top, "top aggregator")?.clone();
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
                ctx.global = Some(tensors_to_weights(&message.tensors)?);
                ctx.round = model.round;
                ctx.model_version = model.model_version;
                ctx.up_grants = model.upload_grants;
                let mut metrics = RoundMetrics::start(ctx.io.traffic());
                metrics.values = std::mem::take(&mut ctx.io.metrics.values);
                ctx.io.metrics = metrics;
                return Ok(());
            }
            Kind::EndOfTraining => {
                if !message.tensors.is_empty() {
                    ctx.global = Some(tensors_to_weights(&message.tensors)?);
                }
                ctx.round = message.round;
                ctx.model_version = message.model_version;
                ctx.done = true;
                return Ok(());
            }
            other => tracing::warn!(kind = ?other, "unexpected message from top ignored"),
        }
    }
}

async fn upload_up(ctx: &mut AggregatorCtx) -> Result<()> {
    let top = needs(&ctx.top, "top aggregator")?.clone();
    let res = upload_mean(ctx, &top).await;
    if parent_left(&res, &top) {
        // Lost with the top aggregator, which redoes the round once restarted.
        tracing::warn!(%top, round = ctx.round, "top aggregator left before the group's update was sent; waiting for its next model");
        return Ok(());
    }
    res
}

async fn upload_mean(ctx: &mut AggregatorCtx, top: &TaskId) -> Result<()> {
    let (_, upload) = needs(&ctx.up, "upward channels")?.clone();
    let top = top.clone();
    needs(&ctx.global, "global model")?;
    let (fetch, _) = needs(&ctx.up, "upward channels")?.clone();
    await_upload_permit(ctx.up_grants, &fetch, &upload, &top, ctx.round).await?;
    let mut metrics = BTreeMap::new();
    for (k, v) in &ctx.io.metrics.values {
        if let Some(name) = k.strip_prefix(TRAINER_MEAN) {
            metrics.insert(name.to_owned(), *v);
        }
    }
    let header = Update {
        round: ctx.round,
        model_version: ctx.model_version,
        num_samples: ctx.round_samples,
        metrics,
    };
    // The round's mean is sent shared, not copied (see `distribute`).
    let global = Arc::new(ctx.global.take().expect("checked above"));
    let message = shared_weights_message(Kind::Update, 0, 0, &global).map(|m| header.encode(m));
    let res = match message {
        Ok(message) => upload.send(&top, message).await.map_err(peer_left),
        Err(e) => Err(e),
    };
    ctx.global = Some(unshare(global));
    res
}

/// The standard top aggregator program.
pub fn top_program() -> Composer<AggregatorCtx> {
    Composer::new()
        .tasklet("load_state", async_tasklet(|c| boxed(load_state(c))))
        .tasklet("await_trainers", async_tasklet(|c| boxed(await_trainers(c))))
        .tasklet("init_model", async_tasklet(|c| boxed(init_model(c))))
        .loop_until(
            "rounds",
            |c: &AggregatorCtx| c.done,
            Composer::new()
                .tasklet("select", async_tasklet(|c| boxed(select(c))))
                .tasklet("distribute", async_tasklet(|c| boxed(distribute(c))))
                .tasklet("aggregate", async_tasklet(|c| boxed(aggregate(c))))
                .tasklet("evaluate", async_tasklet(|c| boxed(evaluate(c))))
                .tasklet("checkpoint", async_tasklet(|c| boxed(checkpoint(c))))
                .tasklet("report", async_tasklet(|c| boxed(report(c)))),
        )
        .tasklet("finish", async_tasklet(|c| boxed(finish(c))))
}

/// The standard middle aggregator program.
pub fn middle_program() -> Composer<AggregatorCtx> {
    Composer::new()
        .tasklet("join_up", async_tasklet(|c| boxed(join_up(c))))
        .tasklet("await_trainers", async_tasklet(|c| boxed(await_trainers(c))))
        .loop_until(
            "rounds",
            |c: &AggregatorCtx| c.done,
            Composer::new()
                .tasklet("fetch", async_tasklet(|c| boxed(fetch_up(c))))
                .tasklet("select", async_tasklet(|c| boxed(select(c))))
                .tasklet("distribute", async_tasklet(|c| boxed(distribute(c))))
                .tasklet("aggregate", async_tasklet(|c| boxed(aggregate(c))))
                .tasklet("upload", async_tasklet(|c| boxed(upload_up(c))))
                .tasklet("report", async_tasklet(|c| boxed(report(c)))),
        )
        .tasklet("finish", async_tasklet(|c| boxed(finish(c))))
}

#[cfg(test)]
mod grant_tests {
    use super::{DEFAULT_UPLOAD_BUDGET_BYTES, round_grants};

    #[test]
    fn grants_follow_the_setting_else_the_model_size() {
        let mb = 1 << 20;
        // Set: as given, and no grants once they cover every trainer.
        assert_eq!(round_grants(Some(2), 40 * mb, 10), 2);
        assert_eq!(round_grants(Some(0), 40 * mb, 10), 0);
        assert_eq!(round_grants(Some(10), 40 * mb, 10), 0);
        // Unset: what fits in the budget, at least one.
        assert_eq!(round_grants(None, 40 * mb, 100), 1);
        assert_eq!(round_grants(None, 400 * mb, 100), 1);
        assert_eq!(round_grants(None, 16 * mb, 100), DEFAULT_UPLOAD_BUDGET_BYTES / (16 * mb));
        // A small model: the budget covers every trainer, so no grant round trips.
        assert_eq!(round_grants(None, 400 << 10, 50), 0);
        assert_eq!(round_grants(None, 0, 3), 0);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod fold_tests {
    use fledge_algorithms::{Optimizer, Tensor};
    use fledge_channel::Tensors;

    use super::*;

    fn weights(a: [f32; 2], b: [f32; 3]) -> Weights {
        Weights::from_tensors(vec![
            Tensor::new("a", vec![2], a.to_vec()).unwrap(),
            Tensor::new("b", vec![1, 3], b.to_vec()).unwrap(),
        ])
        .unwrap()
    }

    /// The update as it arrives: decoded from the wire, tensors pointing into one buffer.
    fn received(w: &Weights) -> Tensors {
        let mut m = crate::convert::weights_message(Kind::Update, 1, 0, w).unwrap();
        m.sender = "t".into();
        fledge_channel::wire::decode(fledge_channel::wire::encode(&m).unwrap()).unwrap().tensors
    }

    fn finish(round: fledge_algorithms::Round, global: &Weights) -> Weights {
        let mut out = global.clone();
        Optimizer::default().finish_round(round, &mut out).unwrap();
        out
    }

    #[test]
    fn bad_updates_are_rejected_before_anything_is_folded() {
        let global = weights([0.0; 2], [0.0; 3]);
        let good = weights([1.0, 2.0], [3.0, 4.0, 5.0]);
        let other = weights([3.0, 2.0], [1.0, 0.0, -1.0]);
        let mut acc = Optimizer::default().begin_round(&global);
        fold_update(&mut acc, &received(&good), 10).unwrap();
        let before = acc.clone();

        // A NaN in the last value of the last tensor, a truncated tensor, another layout.
        let nan = received(&weights([9.0, 9.0], [9.0, 9.0, f32::NAN]));
        assert!(matches!(
            fold_update(&mut acc, &nan, 5),
            Err(Error::Aggregation(fledge_algorithms::Error::NonFinite { index: 2, .. }))
        ));
        let mut short = Tensors::new();
        short.insert("a", fledge_channel::Tensor::from_f32(vec![2], &[9.0, 9.0]).unwrap());
        short.insert("b", fledge_channel::Tensor::from_f32(vec![1, 2], &[9.0, 9.0]).unwrap());
        assert!(fold_update(&mut acc, &short, 5).is_err());
        let mut one = Tensors::new();
        one.insert("a", fledge_channel::Tensor::from_f32(vec![2], &[9.0, 9.0]).unwrap());
        assert!(fold_update(&mut acc, &one, 5).is_err());
        assert_eq!(acc.len(), before.len());
        assert_eq!(finish(acc.clone(), &global), finish(before, &global));

        // The same round as folding decoded weights, bit for bit.
        fold_update(&mut acc, &received(&other), 30).unwrap();
        let mut reference = Optimizer::default().begin_round(&global);
        reference.add(&good, 10, 0).unwrap();
        reference.add(&other, 30, 0).unwrap();
        assert_eq!(finish(acc, &global), finish(reference, &global));
    }

    #[test]
    fn shared_messages_borrow_the_global_model_and_give_it_back() {
        let global = Arc::new(weights([1.0, 2.0], [3.0, 4.0, 5.0]));
        let m = shared_weights_message(Kind::Weights, 3, 2, &global).unwrap();
        assert_eq!((m.round, m.model_version), (3, 2));
        assert_eq!(tensors_to_weights(&m.tensors).unwrap(), *global);
        // While a message holds it, taking it back copies; once released, it moves.
        let copy = unshare(global.clone());
        assert_eq!(copy, *global);
        drop(m);
        let ptr = global.tensors()[0].data().as_ptr();
        let back = unshare(global);
        assert_eq!(back.tensors()[0].data().as_ptr(), ptr);
    }
}
