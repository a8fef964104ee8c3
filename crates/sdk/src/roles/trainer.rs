//! The trainer role: fetch the global model, train with user code, upload the update.
//!
//! Program ([`program`]):
//!
//! ```text
//! initialize, load_data, join,
//! loop rounds until end-of-training {
//!     fetch, evaluate_received, train, evaluate, upload, report
//! }
//! ```
//!
//! With secure aggregation (`modelSpec.secureAggregation`, [`crate::roles::secagg`]) the
//! program is
//!
//! ```text
//! initialize, load_data, join,
//! loop rounds until end-of-training {
//!     fetch, secagg_keys, secagg_shares, evaluate_received, train, evaluate,
//!     secagg_input, secagg_unmask, report
//! }
//! ```
//!
//! The trainer advertises its keys and sends its encrypted shares as soon as the model
//! arrives, then trains and sends its delta from the received model masked (never the update
//! in clear, nor its sample count or metrics), and reveals the shares the aggregator needs to
//! unmask the sum.
//!
//! `evaluate_received` evaluates the model of the round before local training
//! (`beforeTraining.*` metrics), `evaluate` the locally trained one (`afterTraining.*`).
//! [`Trainer`] is the role; the runner ([`crate::role::run`]) closes its I/O afterwards.
//!
//! `fetch` also answers the aggregator's `init_model` request (when the job has no base model
//! the aggregator asks one trainer for its initial weights) and ends the loop on
//! end-of-training, after loading the final model.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fledge_algorithms::privacy::{DpConfig, DpMode, LocalDp, SecAggClient, SecAggConfig};
use fledge_channel::{Channel, Kind};
use fledge_types::{TaskConfig, TaskId};

use crate::app::{AppNeed, TrainOutcome, TrainerApp, UserApp};
use crate::composer::{Composer, Context, async_tasklet, boxed};
use crate::convert::{tensors_to_weights, weights_message};
use crate::metrics::{AFTER_TRAINING, BEFORE_TRAINING, RoundMetrics};
use crate::protocol::{
    Command, Model, Update, await_parent, await_upload_permit, parent_left, peer_left,
};
use crate::role::{Role, RoleCtx, RunOptions, TaskIo};
use crate::roles::{Common, RoleKind, secagg, tags};
use crate::{Error, Result, Weights};

/// State of a trainer task.
pub struct TrainerCtx {
    /// The task's I/O.
    pub io: TaskIo,
    app: Arc<Mutex<Box<dyn TrainerApp>>>,
    fetch: Channel,
    upload: Channel,
    common: Common,
    /// The aggregator end this trainer talks to.
    pub aggregator: Option<TaskId>,
    /// Current round (0 before the first model arrives).
    pub round: u64,
    /// Version of the model being trained.
    pub model_version: u64,
    /// End of training received.
    pub done: bool,
    /// Outcome of the last `train`.
    pub outcome: TrainOutcome,
    /// Metrics of the last `evaluate` (the locally trained model), keys as the app returned them.
    pub evaluation: BTreeMap<String, f64>,
    /// Metrics of the last `evaluate_received` (the model received for this round, before local
    /// training), keys as the app returned them.
    pub received_evaluation: BTreeMap<String, f64>,
    /// Upload grants the aggregator announced with the model being trained.
    upload_grants: u64,
    /// Local differential privacy (`differentialPrivacy.mode` `local`): the update's delta
    /// from the received model is clipped and noised before it leaves.
    local_dp: Option<LocalDp>,
    /// The model received for this round (kept only under local DP or secure aggregation).
    received: Option<Weights>,
    /// Secure aggregation (`modelSpec.secureAggregation`).
    secagg: Option<SecAggConfig>,
    /// This round's SecAgg+ client, while the round runs (none: sitting the round out).
    secagg_client: Option<SecAggClient>,
}

impl Context for TrainerCtx {
    fn record_time(&mut self, alias: &str, seconds: f64) {
        self.io.record_time(alias, seconds);
    }

    fn round(&self) -> Option<u64> {
        Some(self.round)
    }
}

impl RoleCtx for TrainerCtx {
    fn io(&mut self) -> &mut TaskIo {
        &mut self.io
    }

    fn rounds(&mut self) -> u64 {
        self.round
    }
}

/// The trainer role (see the module docs).
pub struct Trainer;

impl Role for Trainer {
    type Ctx = TrainerCtx;
    const KIND: RoleKind = RoleKind::Trainer;
    const APP: AppNeed = AppNeed::Trainer;
    // Its last message is an update the aggregator has already received.
    const LINGER: bool = false;

    fn prepare(config: &TaskConfig, opts: &mut RunOptions) -> Result<()> {
        if secagg::config_of(config)?.is_some() {
            opts.backend_env.props.insert(secagg::PROP.to_owned(), secagg::PROP_CLIENT.into());
        }
        Ok(())
    }

    fn build(io: TaskIo, app: UserApp) -> Result<TrainerCtx> {
        TrainerCtx::new(io, app.trainer()?)
    }

    fn program(ctx: &TrainerCtx) -> Result<Composer<TrainerCtx>> {
        Ok(if ctx.secagg.is_some() { secure_program() } else { program() })
    }
}

impl TrainerCtx {
    /// A trainer over the task's `io` running `app`.
    pub fn new(io: TaskIo, app: Box<dyn TrainerApp>) -> Result<TrainerCtx> {
        let fetch = io.channels.by_tag(tags::FETCH)?.clone();
        let upload = io.channels.by_tag(tags::UPLOAD)?.clone();
        let common = Common::from_config(&io.config)?;
        let local_dp = match &io.config.differential_privacy {
            None => None,
            Some(value) => {
                let cfg = DpConfig::from_json(value)
                    .map_err(|e| Error::Config(format!("modelSpec.{}: {}", e.field, e.reason)))?;
                match cfg.mode {
                    DpMode::Local => Some(
                        LocalDp::new(cfg)
                            .map_err(|e| Error::Config(format!("differentialPrivacy: {e}")))?,
                    ),
                    DpMode::Central => None,
                }
            }
        };
        let secagg = secagg::config_of(&io.config)?;
        Ok(TrainerCtx {
            io,
            app: Arc::new(Mutex::new(app)),
            fetch,
            upload,
            common,
            aggregator: None,
            round: 0,
            model_version: 0,
            done: false,
            outcome: TrainOutcome::default(),
            evaluation: BTreeMap::new(),
            received_evaluation: BTreeMap::new(),
            upload_grants: 0,
            local_dp,
            received: None,
            secagg,
            secagg_client: None,
        })
    }

    /// Runs `f` on the app on a blocking thread.
    async fn with_app<T, F>(&self, step: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut dyn TrainerApp) -> anyhow::Result<T> + Send + 'static,
    {
        let app = self.app.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = app.lock().unwrap_or_else(|e| e.into_inner());
            f(guard.as_mut())
        })
        .await?
        .map_err(|source| Error::App { step, source })
    }

    fn aggregator(&self) -> Result<TaskId> {
        self.aggregator
            .clone()
            .ok_or_else(|| Error::Config("trainer has not joined an aggregator".to_owned()))
    }
}

async fn initialize(ctx: &mut TrainerCtx) -> Result<()> {
    let config = ctx.io.config.clone();
    ctx.with_app("initialize", move |app| app.initialize(&config)).await
}

async fn load_data(ctx: &mut TrainerCtx) -> Result<()> {
    ctx.with_app("load_data", |app| app.load_data()).await
}

async fn join(ctx: &mut TrainerCtx) -> Result<()> {
    let ends = ctx.fetch.await_join(ctx.common.join_timeout).await?;
    let aggregator = ends.into_iter().next().expect("await_join returns at least one end");
    tracing::info!(task_id = %ctx.io.config.task_id, %aggregator, "joined aggregator");
    ctx.aggregator = Some(aggregator);
    Ok(())
}

async fn fetch(ctx: &mut TrainerCtx) -> Result<()> {
    let aggregator = ctx.aggregator()?;
    loop {
        let received = ctx.fetch.recv(&aggregator).await.map_err(peer_left);
        if parent_left(&received, &aggregator) {
            await_parent(&ctx.fetch, &aggregator, ctx.common.rejoin_timeout).await?;
            continue;
        }
        let message = received?;
        match message.kind {
            Kind::Control if Command::InitModel.is(&message) => {
                let weights = ctx.with_app("get_weights", |app| app.get_weights()).await?;
                let reply = weights_message(Kind::Weights, 0, 0, &weights)?;
                let sent = ctx.upload.send(&aggregator, reply).await.map_err(peer_left);
                if parent_left(&sent, &aggregator) {
                    // The aggregator asks again once it is back.
                    continue;
                }
                sent?;
                tracing::info!(task_id = %ctx.io.config.task_id, "sent initial model to aggregator");
            }
            Kind::Weights => {
                let model = Model::decode(&aggregator, &message)?;
                let weights = tensors_to_weights(&message.tensors)?;
                if ctx.local_dp.is_some() || ctx.secagg.is_some() {
                    ctx.received = Some(weights.clone());
                }
                ctx.with_app("set_weights", move |app| app.set_weights(&weights)).await?;
                ctx.round = model.round;
                ctx.model_version = model.model_version;
                ctx.upload_grants = model.upload_grants;
                let mut metrics = RoundMetrics::start(ctx.io.traffic());
                // Keep the time spent waiting for this model.
                metrics.values = std::mem::take(&mut ctx.io.metrics.values);
                ctx.io.metrics = metrics;
                return Ok(());
            }
            Kind::EndOfTraining => {
                if !message.tensors.is_empty() {
                    let weights = tensors_to_weights(&message.tensors)?;
                    ctx.with_app("set_weights", move |app| app.set_weights(&weights)).await?;
                }
                tracing::info!(task_id = %ctx.io.config.task_id, round = message.round, "end of training");
                ctx.done = true;
                return Ok(());
            }
            other => {
                tracing::warn!(task_id = %ctx.io.config.task_id, kind = ?other, "unexpected message ignored");
            }
        }
    }
}

async fn train(ctx: &mut TrainerCtx) -> Result<()> {
    let round = ctx.round;
    ctx.outcome = ctx.with_app("train", move |app| app.train(round)).await?;
    if ctx.outcome.num_samples == 0 {
        return Err(Error::App {
            step: "train",
            source: anyhow::anyhow!(
                "train returned num_samples = 0; FedAvg needs the sample count"
            ),
        });
    }
    Ok(())
}

/// Evaluates the model just received (the global model of this round) on the trainer's data.
async fn evaluate_received(ctx: &mut TrainerCtx) -> Result<()> {
    ctx.received_evaluation = ctx.with_app("evaluate", |app| app.evaluate()).await?;
    Ok(())
}

async fn evaluate(ctx: &mut TrainerCtx) -> Result<()> {
    ctx.evaluation = ctx.with_app("evaluate", |app| app.evaluate()).await?;
    Ok(())
}

async fn upload(ctx: &mut TrainerCtx) -> Result<()> {
    let aggregator = ctx.aggregator()?;
    let res = upload_to(ctx, &aggregator).await;
    if parent_left(&res, &aggregator) {
        // The update is lost with the aggregator; once restarted it redoes the round, and
        // `fetch` waits for it.
        tracing::warn!(task_id = %ctx.io.config.task_id, %aggregator, round = ctx.round,
            "aggregator left before the update was sent; waiting for its next model");
        return Ok(());
    }
    res
}

async fn upload_to(ctx: &mut TrainerCtx, aggregator: &TaskId) -> Result<()> {
    let aggregator = aggregator.clone();
    await_upload_permit(ctx.upload_grants, &ctx.fetch, &ctx.upload, &aggregator, ctx.round).await?;
    let mut weights: Weights = ctx.with_app("get_weights", |app| app.get_weights()).await?;
    if let (Some(dp), Some(received)) = (ctx.local_dp.as_mut(), ctx.received.as_ref()) {
        // Only a clipped, noised delta from the received model leaves this trainer.
        let mut delta = weights.delta_from(received)?;
        let report = dp.privatize(&mut delta).map_err(|e| Error::Privacy(e.to_string()))?;
        weights = received.clone();
        weights.add_scaled(&delta, 1.0)?;
        ctx.io.metrics.set_privacy(&report);
    }
    let mut metrics = BTreeMap::new();
    for (k, v) in &ctx.outcome.metrics {
        metrics.insert(format!("train_{k}"), *v);
    }
    for (k, v) in &ctx.received_evaluation {
        metrics.insert(format!("{BEFORE_TRAINING}{k}"), *v);
    }
    for (k, v) in &ctx.evaluation {
        metrics.insert(format!("{AFTER_TRAINING}{k}"), *v);
    }
    let header = Update {
        round: ctx.round,
        model_version: ctx.model_version,
        num_samples: ctx.outcome.num_samples,
        metrics,
    };
    let message = header.encode(weights_message(Kind::Update, 0, 0, &weights)?);
    ctx.upload.send(&aggregator, message).await.map_err(peer_left)
}

async fn report(ctx: &mut TrainerCtx) -> Result<()> {
    let metrics = &mut ctx.io.metrics;
    metrics.set("numSamples", ctx.outcome.num_samples as f64);
    metrics.extend("train_", &ctx.outcome.metrics);
    metrics.extend(BEFORE_TRAINING, &ctx.received_evaluation);
    metrics.extend(AFTER_TRAINING, &ctx.evaluation);
    ctx.io.finish_round(ctx.round);
    tracing::info!(
        task_id = %ctx.io.config.task_id,
        round = ctx.round,
        samples = ctx.outcome.num_samples,
        metrics = ?ctx.evaluation,
        "round trained"
    );
    Ok(())
}

/// Sends a SecAgg+ message to the aggregator; `false` when the aggregator left (the trainer
/// then sits the round out and `fetch` waits for it).
async fn send_secagg(
    ctx: &TrainerCtx,
    aggregator: &TaskId,
    message: fledge_algorithms::privacy::secagg::ClientMessage,
) -> Result<bool> {
    let wrapped = secagg::wrap(ctx.round, message.encode())?;
    let sent = ctx.upload.send(aggregator, wrapped).await.map_err(peer_left);
    if parent_left(&sent, aggregator) {
        return Ok(false);
    }
    sent.map(|()| true)
}

/// The next SecAgg+ message of this round, or `None` (with the round's client dropped) when
/// the aggregator went on without this trainer.
async fn secagg_next(
    ctx: &mut TrainerCtx,
    stage: &'static str,
) -> Result<Option<fledge_algorithms::privacy::secagg::ServerMessage>> {
    let aggregator = ctx.aggregator()?;
    let next = secagg::next_server_message(&ctx.fetch, &aggregator, ctx.round).await?;
    if next.is_none() {
        tracing::warn!(task_id = %ctx.io.config.task_id, round = ctx.round, stage,
            "the aggregator went on without this trainer; sitting the round out");
        ctx.secagg_client = None;
    }
    Ok(next)
}

/// Secure aggregation, stage 1: joins the round the aggregator's setup describes and
/// advertises this trainer's keys.
async fn secagg_keys(ctx: &mut TrainerCtx) -> Result<()> {
    ctx.secagg_client = None;
    let Some(config) = ctx.secagg.clone() else {
        return Ok(());
    };
    let Some(setup) = secagg_next(ctx, "setup").await? else {
        return Ok(());
    };
    let (client, keys) = secagg::join_round(&config, &setup)?;
    let aggregator = ctx.aggregator()?;
    if send_secagg(ctx, &aggregator, keys).await? {
        ctx.secagg_client = Some(client);
    }
    Ok(())
}

/// Secure aggregation, stage 2: takes the neighbours' keys and sends the encrypted shares.
async fn secagg_shares(ctx: &mut TrainerCtx) -> Result<()> {
    if ctx.secagg_client.is_none() {
        return Ok(());
    }
    let Some(keys) = secagg_next(ctx, "keys").await? else {
        return Ok(());
    };
    let mut client = ctx.secagg_client.take().expect("checked above");
    let shares = match client.handle_keys(&keys) {
        Ok(shares) => shares,
        Err(e) => return secagg::client_error(e),
    };
    let aggregator = ctx.aggregator()?;
    if send_secagg(ctx, &aggregator, shares).await? {
        ctx.secagg_client = Some(client);
    }
    Ok(())
}

/// Secure aggregation, stage 3: takes the shares addressed to this trainer and sends its
/// delta from the round's model (after local DP, if any), quantised, weighted and masked.
async fn secagg_input(ctx: &mut TrainerCtx) -> Result<()> {
    if ctx.secagg_client.is_none() {
        return Ok(());
    }
    let Some(delivery) = secagg_next(ctx, "shares").await? else {
        return Ok(());
    };
    let mut client = ctx.secagg_client.take().expect("checked above");
    let weights: Weights = ctx.with_app("get_weights", |app| app.get_weights()).await?;
    let received = ctx.received.as_ref().ok_or_else(|| {
        Error::Config("trainer has no received model to take its delta from".to_owned())
    })?;
    let mut delta = weights.delta_from(received)?;
    if let Some(dp) = ctx.local_dp.as_mut() {
        let report = dp.privatize(&mut delta).map_err(|e| Error::Privacy(e.to_string()))?;
        ctx.io.metrics.set_privacy(&report);
    }
    let num_samples = ctx.outcome.num_samples;
    let (client, input) = tokio::task::spawn_blocking(move || {
        let flat: Vec<f32> =
            delta.tensors().iter().flat_map(|t| t.data().iter().copied()).collect();
        drop(delta);
        let input = client.handle_shares(&delivery, &flat, num_samples);
        (client, input)
    })
    .await?;
    let input = match input {
        Ok(input) => input,
        Err(e) => return secagg::client_error(e),
    };
    let aggregator = ctx.aggregator()?;
    if send_secagg(ctx, &aggregator, input).await? {
        ctx.secagg_client = Some(client);
    }
    Ok(())
}

/// Secure aggregation, stage 4: reveals the shares the aggregator asks for to unmask the sum
/// (for each neighbour one kind of share, never both).
async fn secagg_unmask(ctx: &mut TrainerCtx) -> Result<()> {
    if ctx.secagg_client.is_none() {
        return Ok(());
    }
    let Some(request) = secagg_next(ctx, "unmask").await? else {
        return Ok(());
    };
    let mut client = ctx.secagg_client.take().expect("checked above");
    let reveal = match client.handle_unmask(&request) {
        Ok(reveal) => reveal,
        Err(e) => return secagg::client_error(e),
    };
    let aggregator = ctx.aggregator()?;
    send_secagg(ctx, &aggregator, reveal).await?;
    Ok(())
}

/// The trainer program under secure aggregation (see the module docs).
pub fn secure_program() -> Composer<TrainerCtx> {
    Composer::new()
        .tasklet("initialize", async_tasklet(|c| boxed(initialize(c))))
        .tasklet("load_data", async_tasklet(|c| boxed(load_data(c))))
        .tasklet("join", async_tasklet(|c| boxed(join(c))))
        .loop_until(
            "rounds",
            |c: &TrainerCtx| c.done,
            Composer::new()
                .tasklet("fetch", async_tasklet(|c| boxed(fetch(c))))
                .tasklet("secagg_keys", async_tasklet(|c| boxed(secagg_keys(c))))
                .tasklet("secagg_shares", async_tasklet(|c| boxed(secagg_shares(c))))
                .tasklet("evaluate_received", async_tasklet(|c| boxed(evaluate_received(c))))
                .tasklet("train", async_tasklet(|c| boxed(train(c))))
                .tasklet("evaluate", async_tasklet(|c| boxed(evaluate(c))))
                .tasklet("secagg_input", async_tasklet(|c| boxed(secagg_input(c))))
                .tasklet("secagg_unmask", async_tasklet(|c| boxed(secagg_unmask(c))))
                .tasklet("report", async_tasklet(|c| boxed(report(c)))),
        )
}

/// The standard trainer program.
pub fn program() -> Composer<TrainerCtx> {
    Composer::new()
        .tasklet("initialize", async_tasklet(|c| boxed(initialize(c))))
        .tasklet("load_data", async_tasklet(|c| boxed(load_data(c))))
        .tasklet("join", async_tasklet(|c| boxed(join(c))))
        .loop_until(
            "rounds",
            |c: &TrainerCtx| c.done,
            Composer::new()
                .tasklet("fetch", async_tasklet(|c| boxed(fetch(c))))
                .tasklet("evaluate_received", async_tasklet(|c| boxed(evaluate_received(c))))
                .tasklet("train", async_tasklet(|c| boxed(train(c))))
                .tasklet("evaluate", async_tasklet(|c| boxed(evaluate(c))))
                .tasklet("upload", async_tasklet(|c| boxed(upload(c))))
                .tasklet("report", async_tasklet(|c| boxed(report(c)))),
        )
}
