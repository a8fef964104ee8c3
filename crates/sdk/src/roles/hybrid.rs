//! The hybrid trainer (built-in name `hybrid-trainer`): ring all-reduce inside a group, FL
//! across groups.
//!
//! Trainers of one group share a self-loop channel (function tag `ring_allreduce`, typically
//! on the `p2p` backend, so weights go straight from trainer to trainer); every trainer is
//! also on a `fetch`/`upload` channel with an ordinary aggregator (typically `mqtt`). Each round
//! every trainer fetches the global model, trains locally, and the group replaces its weights
//! by their sample-weighted mean with the ring all-reduce of [`crate::roles::ring`]
//! (including its per-round membership, led by the lowest task id of the group). Every member
//! then uploads the group's model with its own sample count, so the aggregator's FedAvg over
//! all trainers is exactly the sample-weighted mean over every group. The aggregator is the
//! stock one: it ends training, keeps the final model and saves it.
//!
//! Program ([`program`]):
//!
//! ```text
//! initialize, load_data, join, bootstrap,
//! loop rounds until end-of-training { fetch, membership, train, allreduce, evaluate, upload, report },
//! finish
//! ```
//!
//! Hyperparameters: those of the trainer and the ring, plus `groupSize`, the trainers waited
//! for in this task's group at bootstrap (default: `expectedTrainers` divided by the number of
//! groups of the ring channel, rounded up).

use std::collections::BTreeMap;

use fledge_channel::{Channel, Kind};
use fledge_types::{TaskConfig, TaskId};

use crate::app::{AppNeed, UserApp};
use crate::composer::{Composer, Context, async_tasklet, boxed};
use crate::convert::{tensors_to_weights, weights_message};
use crate::hyper::{self, names};
use crate::protocol::{Command, Model, Update, await_upload_permit, peer_left};
use crate::role::{Role, RoleCtx, TaskIo};
use crate::roles::ring::{self, RingCtx};
use crate::roles::{Common, RoleKind, tags};
use crate::{Error, Result, Weights};

/// The built-in name of the hybrid trainer.
pub const BUILTIN_NAME: &str = "hybrid-trainer";
/// Hyperparameter: trainers of this task's group waited for at bootstrap.
pub const GROUP_SIZE: &str = "groupSize";

/// State of a hybrid trainer task: the ring part (group channel, user code, metrics) and the
/// aggregator part.
pub struct HybridCtx {
    /// The in-group ring all-reduce state (user code, group channel, metrics, history).
    pub ring: RingCtx,
    fetch: Channel,
    upload: Channel,
    common: Common,
    /// The aggregator this trainer fetches from and uploads to.
    pub aggregator: Option<TaskId>,
    /// The aggregator's round being run.
    pub round: u64,
    /// Upload grants the aggregator announced with this round's model.
    upload_grants: u64,
    model_version: u64,
    /// Training is over (the aggregator said so).
    pub done: bool,
}

impl Context for HybridCtx {
    fn record_time(&mut self, alias: &str, seconds: f64) {
        self.ring.record_time(alias, seconds);
    }
}

/// Trainers of `config`'s group on its ring channel: `groupSize`, else `expectedTrainers` over
/// the channel's groups, rounded up.
fn group_size(config: &TaskConfig) -> Result<usize> {
    let h = &config.hyperparameters;
    if h.contains_key(GROUP_SIZE) {
        return Ok(hyper::uint(h, GROUP_SIZE, 1, 1)? as usize);
    }
    let expected = hyper::uint(h, names::EXPECTED_TRAINERS, 1, 1)? as usize;
    let groups = config
        .channels
        .iter()
        .find(|c| c.is_self_loop())
        .and_then(|c| c.group_by.as_ref())
        .map_or(1, |g| g.value.len().max(1));
    Ok(expected.div_ceil(groups))
}

impl HybridCtx {
    /// A hybrid trainer over joined `channels`: a self-loop channel for the group and a
    /// `fetch`/`upload` channel to the aggregator.
    pub fn new(io: TaskIo, app: Box<dyn crate::app::TrainerApp>) -> Result<HybridCtx> {
        let fetch = io.channels.by_tag(tags::FETCH)?.clone();
        let upload = io.channels.by_tag(tags::UPLOAD)?.clone();
        let common = Common::from_config(&io.config)?;
        let expected = group_size(&io.config)?;
        let mut ring = RingCtx::new(io, app)?;
        ring.expected = expected;
        Ok(HybridCtx {
            ring,
            fetch,
            upload,
            common,
            aggregator: None,
            round: 0,
            upload_grants: 0,
            model_version: 0,
            done: false,
        })
    }

    fn config(&self) -> &TaskConfig {
        &self.ring.io.config
    }

    fn aggregator(&self) -> Result<TaskId> {
        self.aggregator
            .clone()
            .ok_or_else(|| Error::Config("trainer has not joined an aggregator".to_owned()))
    }
}

async fn join(ctx: &mut HybridCtx) -> Result<()> {
    let ends = ctx.fetch.await_join(ctx.common.join_timeout).await?;
    let aggregator = ends.into_iter().next().expect("await_join returns at least one end");
    tracing::info!(task_id = %ctx.config().task_id, %aggregator, "joined aggregator");
    ctx.aggregator = Some(aggregator);
    Ok(())
}

/// Receives the round's global model (answering the aggregator's `init_model` request on the
/// way), or the end of training.
async fn fetch(ctx: &mut HybridCtx) -> Result<()> {
    let aggregator = ctx.aggregator()?;
    loop {
        let message = ctx.fetch.recv(&aggregator).await.map_err(peer_left)?;
        match message.kind {
            Kind::Control if Command::InitModel.is(&message) => {
                let weights = ctx.ring.with_app("get_weights", |app| app.get_weights()).await?;
                let reply = weights_message(Kind::Weights, 0, 0, &weights)?;
                ctx.upload.send(&aggregator, reply).await.map_err(peer_left)?;
                tracing::info!(task_id = %ctx.config().task_id, "sent initial model to aggregator");
            }
            Kind::Weights => {
                let model = Model::decode(&aggregator, &message)?;
                let weights = tensors_to_weights(&message.tensors)?;
                ctx.ring.with_app("set_weights", move |app| app.set_weights(&weights)).await?;
                ctx.round = model.round;
                ctx.model_version = model.model_version;
                ctx.upload_grants = model.upload_grants;
                return Ok(());
            }
            Kind::EndOfTraining => {
                if !message.tensors.is_empty() {
                    let weights = tensors_to_weights(&message.tensors)?;
                    ctx.ring.with_app("set_weights", move |app| app.set_weights(&weights)).await?;
                }
                tracing::info!(task_id = %ctx.config().task_id, round = message.round, "end of training");
                ctx.done = true;
                return Ok(());
            }
            other => {
                tracing::warn!(task_id = %ctx.config().task_id, kind = ?other, "unexpected message ignored");
            }
        }
    }
}

/// Uploads the group's model with this trainer's own sample count.
async fn upload(ctx: &mut HybridCtx) -> Result<()> {
    let aggregator = ctx.aggregator()?;
    await_upload_permit(ctx.upload_grants, &ctx.fetch, &ctx.upload, &aggregator, ctx.round).await?;
    let weights: Weights = ctx.ring.with_app("get_weights", |app| app.get_weights()).await?;
    let mut metrics = BTreeMap::new();
    for (k, v) in &ctx.ring.outcome.metrics {
        metrics.insert(format!("train_{k}"), *v);
    }
    for (k, v) in &ctx.ring.evaluation {
        metrics.insert(k.clone(), *v);
    }
    let header = Update {
        round: ctx.round,
        model_version: ctx.model_version,
        num_samples: ctx.ring.outcome.num_samples,
        metrics,
    };
    let message = header.encode(weights_message(Kind::Update, 0, 0, &weights)?);
    ctx.upload.send(&aggregator, message).await.map_err(peer_left)
}

async fn report(ctx: &mut HybridCtx) -> Result<()> {
    let ring = &mut ctx.ring;
    let metrics = &mut ring.io.metrics;
    metrics.set("localSamples", ring.outcome.num_samples as f64);
    metrics.extend("train_", &ring.outcome.metrics);
    metrics.extend("", &ring.evaluation);
    ring.io.finish_round(ctx.round);
    tracing::info!(
        task_id = %ring.io.config.task_id,
        round = ctx.round,
        members = ring.members.len(),
        metrics = ?ring.evaluation,
        "hybrid round done"
    );
    Ok(())
}

/// Keeps the model this trainer ends with (the aggregator's final model).
async fn finish(ctx: &mut HybridCtx) -> Result<()> {
    let weights = ctx.ring.with_app("get_weights", |app| app.get_weights()).await?;
    ctx.ring.final_model = Some(weights);
    Ok(())
}

impl RoleCtx for HybridCtx {
    fn io(&mut self) -> &mut TaskIo {
        &mut self.ring.io
    }

    fn rounds(&mut self) -> u64 {
        self.round
    }

    fn final_model(&mut self) -> Option<Weights> {
        self.ring.final_model.take()
    }
}

/// The hybrid trainer (see the module docs).
pub struct HybridTrainer;

impl Role for HybridTrainer {
    type Ctx = HybridCtx;
    const KIND: RoleKind = RoleKind::HybridTrainer;
    const APP: AppNeed = AppNeed::Trainer;

    fn build(io: TaskIo, app: UserApp) -> Result<HybridCtx> {
        HybridCtx::new(io, app.trainer()?)
    }

    fn program(_ctx: &HybridCtx) -> Result<Composer<HybridCtx>> {
        Ok(program())
    }
}

/// The hybrid trainer program.
pub fn program() -> Composer<HybridCtx> {
    Composer::new()
        .tasklet(
            "initialize",
            async_tasklet(|c: &mut HybridCtx| boxed(ring::initialize(&mut c.ring))),
        )
        .tasklet(
            "load_data",
            async_tasklet(|c: &mut HybridCtx| boxed(ring::load_data(&mut c.ring))),
        )
        .tasklet("join", async_tasklet(|c| boxed(join(c))))
        .tasklet(
            "bootstrap",
            async_tasklet(|c: &mut HybridCtx| boxed(ring::bootstrap(&mut c.ring))),
        )
        .loop_until(
            "rounds",
            |c: &HybridCtx| c.done,
            Composer::new()
                .tasklet("fetch", async_tasklet(|c| boxed(fetch(c))))
                .tasklet(
                    "membership",
                    async_tasklet(|c: &mut HybridCtx| boxed(ring::membership(&mut c.ring))),
                )
                .tasklet(
                    "train",
                    async_tasklet(|c: &mut HybridCtx| boxed(ring::train(&mut c.ring))),
                )
                .tasklet(
                    "allreduce",
                    async_tasklet(|c: &mut HybridCtx| boxed(ring::allreduce(&mut c.ring))),
                )
                .tasklet(
                    "evaluate",
                    async_tasklet(|c: &mut HybridCtx| boxed(ring::evaluate(&mut c.ring))),
                )
                .tasklet("upload", async_tasklet(|c| boxed(upload(c))))
                .tasklet("report", async_tasklet(|c| boxed(report(c)))),
        )
        .tasklet("finish", async_tasklet(|c| boxed(finish(c))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hyperparameters: serde_json::Value, groups: &[&str]) -> TaskConfig {
        serde_json::from_value(serde_json::json!({
            "taskId": "t0",
            "role": "trainer",
            "job": {"id": "j"},
            "channels": [{
                "name": "group-channel",
                "pair": ["trainer", "trainer"],
                "groupBy": {"type": "tag", "value": groups},
                "funcTags": {"trainer": ["ring_allreduce"]}
            }],
            "hyperparameters": hyperparameters
        }))
        .expect("valid task config")
    }

    #[test]
    fn group_size_defaults_to_an_even_split() {
        let even = config(serde_json::json!({"expectedTrainers": 4}), &["eu", "us"]);
        assert_eq!(group_size(&even).expect("valid"), 2);
        let uneven = config(serde_json::json!({"expectedTrainers": 5}), &["eu", "us"]);
        assert_eq!(group_size(&uneven).expect("valid"), 3);
        let set = config(serde_json::json!({"expectedTrainers": 5, "groupSize": 1}), &["eu"]);
        assert_eq!(group_size(&set).expect("valid"), 1);
        let bad = config(serde_json::json!({"groupSize": 0}), &["eu"]);
        let err = group_size(&bad).expect_err("below 1").to_string();
        assert!(err.contains("groupSize"), "{err}");
    }
}
