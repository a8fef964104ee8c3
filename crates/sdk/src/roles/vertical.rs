//! Vertical federated learning by split learning: the feature party (built-in name
//! `vertical-feature-party`) and the label party (`vertical-label-party`).
//!
//! The parties hold different columns of the same samples, each in its own file that carries
//! the sample ids. Each feature party owns a *bottom model* over its columns; the label party
//! holds the labels (and maybe columns of its own) and the *top model*. Raw features and labels
//! never leave their party: only embeddings (forward) and their gradients (backward) travel.
//!
//! **Alignment.** Every feature party sends the label party its sample ids. The label party
//! keeps the ids every party holds (the intersection, sorted), splits them into train and test
//! with a seeded shuffle (`testFraction`, `seed`), and sends both lists back. From then on a
//! row is an index into those lists, the same at every party whatever the order of its file.
//! Parties standardise their own columns with their own train statistics.
//!
//! **Training.** One round is one epoch over the aligned train rows, in batches the label party
//! draws (`batchSize`, shuffled per round from `seed`). For each batch the label party asks every
//! feature party for the embeddings of those rows, runs the top model and the loss, steps the top
//! model, and sends each party the gradient of the loss with respect to its embedding; the party
//! back-propagates it through its bottom model and steps. After each round the label party asks
//! for the test rows' embeddings and evaluates (`accuracy`, `loss`).
//!
//! **Models.** At the end the label party saves its top model as the job's final model in its
//! registry; each feature party saves its bottom model in its own registry as the model
//! `{jobId}-{taskId}-bottom`, version 1. Nobody holds the whole network: that is the point.
//!
//! # Wire protocol (one channel; the feature party's `upload` channel is the label party's
//! `aggregate` channel)
//!
//! | from → to | kind | round | meta | tensors |
//! |---|---|---|---|---|
//! | feature → label | `Control` | 0 | `command: "ids"`, `ids` (strings), `embeddingDim`, `partyIndex` | |
//! | label → feature | `Control` | 0 | `command: "align"`, `train`, `test` (strings), `resumed` (round) | |
//! | label → feature | `Control` | 0 | `command: "abort"`, `reason` (alignment failed) | |
//! | label → feature | `Control` | r | `command: "embed"`, `split` (`train`/`test`), `step` | `rows` i64 `[b]` |
//! | feature → label | `Update` | r | `split`, `step` | `embedding` f32 `[b, embeddingDim]` |
//! | label → feature | `Control` | r | `command: "gradient"`, `step` | `gradient` f32 `[b, embeddingDim]` |
//! | label → feature | `EndOfTraining` | last | | |
//!
//! **Resume.** The label party commits each round by saving its top model, the round and the
//! round's record in its resume file ([`crate::registry::ResumeState`]) before it reports the
//! round. Redeployed under the same id, it loads its table, aligns again (the same ids and
//! seed give the same split), restores the top model ([`LabelApp::set_weights`]) and goes on
//! with the next round; the round it died in is redone. A feature party whose label party
//! leaves, or comes back as a new run, waits for it (`rejoinTimeout`), says hello again, and
//! takes the alignment, which names the round the label party resumes from (`resumed`): it
//! goes back to its bottom model of that round (it keeps those of the last two rounds it
//! served; [`FeatureApp::set_weights`]), so the redone round starts where the first attempt
//! did. An embedding that reaches the restarted label party before the hello is ignored.
//!
//! User code plugs in through [`FeatureApp`] (bottom model and the party's table) and
//! [`LabelApp`] (labels, top model, loss); the candle implementations live in
//! `fledge-models` (`vertical`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fledge_algorithms::Weights;
use fledge_channel::{Channel, ChannelManager, Kind, Message};
use fledge_types::{TaskConfig, TaskId};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::Value;

use crate::app::{AppNeed, UserApp};
pub use crate::app::{Embedding, FeatureApp, LabelApp, Split, StepOutcome};
use crate::composer::{Composer, Context, async_tasklet, boxed};
use crate::hyper;
use crate::metrics::RoundMetrics;
use crate::protocol::{Command, await_parent, parent_left, peer_left};
use crate::registry::ResumeState;
use crate::role::{Role, RoleCtx, TaskIo};
use crate::roles::{Common, RoleKind, tags};
use crate::{Error, Result};

/// The built-in name of the feature party.
pub const FEATURE_PARTY: &str = "vertical-feature-party";
/// The built-in name of the label party.
pub const LABEL_PARTY: &str = "vertical-label-party";

/// Hyperparameters of the label party (the feature parties read theirs in user code).
pub mod names {
    /// Feature parties the label party waits for (default 1).
    pub const FEATURE_PARTIES: &str = "featureParties";
    /// Fraction of the aligned samples held out for testing (default 0.2).
    pub const TEST_FRACTION: &str = "testFraction";
    /// Rows per training step (default 32).
    pub const BATCH_SIZE: &str = "batchSize";
    /// Seed of the train/test split and the batch order (default 0).
    pub const SEED: &str = "seed";
}

const IDS: &str = "ids";
/// Meta key of a feature party's hello: its task index (the order of the embeddings).
const PARTY_INDEX: &str = "partyIndex";
/// Meta key of the alignment: the round the label party resumes after (0: a fresh start).
const RESUMED: &str = "resumed";
/// Bottom models a feature party keeps, of the last rounds it served: the label party saves
/// a round after its test embeddings, so it resumes from the last one or the one before.
const SNAPSHOTS: usize = 2;
/// How often a feature party waiting for the label party checks whether it was restarted.
const RESTART_POLL: Duration = Duration::from_millis(500);
/// Tensor name of a gradient.
const GRADIENT: &str = "gradient";

/// The ids held by the label party and by every feature party, sorted. Fails when a list has
/// a duplicate or when fewer than two ids are shared (nothing to train and test on), naming
/// each party's count and an example id.
pub fn align_ids(label: &[String], parties: &[(TaskId, Vec<String>)]) -> Result<Vec<String>> {
    let as_set = |who: &str, ids: &[String]| -> Result<BTreeSet<String>> {
        let mut set = BTreeSet::new();
        for id in ids {
            if !set.insert(id.clone()) {
                return Err(Error::Config(format!("{who} lists sample id {id:?} twice")));
            }
        }
        Ok(set)
    };
    let mut common = as_set("the label party", label)?;
    for (party, ids) in parties {
        let set = as_set(&format!("feature party {party}"), ids)?;
        common.retain(|id| set.contains(id));
    }
    if common.len() < 2 {
        let example =
            |ids: &[String]| ids.first().map(|i| format!(", e.g. {i:?}")).unwrap_or_default();
        let mut held = vec![format!("the label party {} ids{}", label.len(), example(label))];
        held.extend(
            parties.iter().map(|(p, ids)| format!("{p} {} ids{}", ids.len(), example(ids))),
        );
        return Err(Error::Config(format!(
            "the parties share {} sample ids, need at least 2 to align (held: {}); do their \
             dataset files use the same ids?",
            common.len(),
            held.join("; ")
        )));
    }
    Ok(common.into_iter().collect())
}

/// Splits aligned `ids` into (train, test) by a shuffle seeded with `seed`: `test_fraction`
/// of them (rounded, at least one, at most all but one) are test ids. Both lists keep the
/// shuffled order, which is the row order every party uses.
pub fn split_ids(ids: &[String], test_fraction: f64, seed: u64) -> (Vec<String>, Vec<String>) {
    let mut shuffled = ids.to_vec();
    shuffled.shuffle(&mut StdRng::seed_from_u64(seed));
    let n_test = ((ids.len() as f64 * test_fraction).round() as usize).clamp(1, ids.len() - 1);
    let train = shuffled.split_off(n_test);
    (train, shuffled)
}

fn strings(m: &Message, key: &str) -> Option<Vec<String>> {
    m.meta.get(key)?.as_array()?.iter().map(|v| v.as_str().map(str::to_owned)).collect()
}

fn strings_value(ids: &[String]) -> Value {
    Value::from(ids.iter().map(|i| Value::from(i.as_str())).collect::<Vec<_>>())
}

fn tensor_of(e: &Embedding) -> Result<fledge_channel::Tensor> {
    fledge_channel::Tensor::from_f32(vec![e.rows(), e.dim], &e.values)
        .map_err(|err| Error::Tensors(format!("embedding: {err}")))
}

/// The `[rows, dim]` f32 tensor `name` of `m` from `peer`, checked.
fn embedding_of(
    peer: &TaskId,
    m: &Message,
    name: &str,
    rows: usize,
    dim: usize,
) -> Result<Embedding> {
    let bad = |reason: String| Error::Protocol { peer: peer.clone(), reason };
    let tensor = m.tensors.get(name).ok_or_else(|| bad(format!("message without {name}")))?;
    if tensor.shape() != [rows, dim] {
        return Err(bad(format!("{name} of shape {:?}, expected [{rows}, {dim}]", tensor.shape())));
    }
    let values = tensor.to_f32_vec().map_err(|e| bad(format!("{name}: {e}")))?;
    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
        return Err(bad(format!("{name} holds {v}")));
    }
    Ok(Embedding { dim, values })
}

async fn blocking<A, T, F>(app: &Arc<Mutex<Box<A>>>, step: &'static str, f: F) -> Result<T>
where
    A: ?Sized + Send + 'static,
    T: Send + 'static,
    F: FnOnce(&mut A) -> anyhow::Result<T> + Send + 'static,
{
    let app = app.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = app.lock().unwrap_or_else(|e| e.into_inner());
        f(guard.as_mut())
    })
    .await?
    .map_err(|source| Error::App { step, source })
}

/// The channel on which `config`'s role carries `tag`.
fn channel_by_tag(channels: &ChannelManager, config: &TaskConfig, tag: &str) -> Result<Channel> {
    channels.by_tag(tag).cloned().map_err(|_| {
        Error::Config(format!(
            "role {:?} has no channel with function tag {tag:?} (the vertical parties talk on \
             the channel where the feature party has `upload` and the label party `aggregate`)",
            config.role
        ))
    })
}

/// State of a feature party task.
pub struct FeatureCtx {
    /// The task's I/O.
    pub io: TaskIo,
    app: Arc<Mutex<Box<dyn FeatureApp>>>,
    channel: Channel,
    common: Common,
    label: Option<TaskId>,
    /// The label party's run (its end's instance) this party said hello to.
    label_instance: String,
    /// The train and test ids of the alignment applied.
    aligned: Option<(Vec<String>, Vec<String>)>,
    /// The bottom model after the last rounds served (0: as aligned), newest last: a label
    /// party that resumes from one of them has this party go back to it.
    snapshots: std::collections::VecDeque<(u64, Weights)>,
    ids: Vec<String>,
    /// The round being served (an epoch of the label party).
    pub round: u64,
    /// Training is over.
    pub done: bool,
    steps: u64,
    rows: u64,
    /// The bottom model, once trained.
    final_model: Option<Weights>,
}

impl RoleCtx for FeatureCtx {
    fn io(&mut self) -> &mut TaskIo {
        &mut self.io
    }

    fn rounds(&mut self) -> u64 {
        self.round
    }

    fn final_model(&mut self) -> Option<Weights> {
        self.final_model.take()
    }
}

/// The feature party of split learning (see the module docs).
pub struct FeatureParty;

impl Role for FeatureParty {
    type Ctx = FeatureCtx;
    const KIND: RoleKind = RoleKind::VerticalFeatureParty;
    const APP: AppNeed = AppNeed::FeatureParty;
    const LINGER: bool = false;

    fn build(io: TaskIo, app: UserApp) -> Result<FeatureCtx> {
        FeatureCtx::new(io, app.feature_party()?)
    }

    fn program(_ctx: &FeatureCtx) -> Result<Composer<FeatureCtx>> {
        Ok(feature_program())
    }
}

impl Context for FeatureCtx {
    fn record_time(&mut self, alias: &str, seconds: f64) {
        self.io.record_time(alias, seconds);
    }
}

impl FeatureCtx {
    /// A feature party over the task's `io` running `app`.
    pub fn new(mut io: TaskIo, app: Box<dyn FeatureApp>) -> Result<FeatureCtx> {
        let channel = channel_by_tag(&io.channels, &io.config, tags::UPLOAD)?;
        let common = Common::from_config(&io.config)?;
        io.start_round();
        Ok(FeatureCtx {
            io,
            app: Arc::new(Mutex::new(app)),
            channel,
            common,
            label: None,
            label_instance: String::new(),
            aligned: None,
            snapshots: std::collections::VecDeque::new(),
            ids: Vec::new(),
            round: 0,
            done: false,
            steps: 0,
            rows: 0,
            final_model: None,
        })
    }

    fn label(&self) -> &TaskId {
        self.label.as_ref().expect("hello sets the label party")
    }

    /// The next message from the label party; its leaving is an error.
    async fn recv(&self) -> Result<Message> {
        self.channel.recv(self.label()).await.map_err(peer_left)
    }

    /// Whether the label party present now is another run than the one this party said
    /// hello to (it was restarted under the same id, faster than its end was seen to leave).
    fn label_restarted(&self) -> bool {
        let now = self.channel.end_props(self.label()).map(|p| p.instance);
        !self.label_instance.is_empty()
            && now.is_some_and(|now| !now.is_empty() && now != self.label_instance)
    }

    fn protocol(&self, reason: String) -> Error {
        Error::Protocol { peer: self.label().clone(), reason }
    }
}

async fn feature_load(ctx: &mut FeatureCtx) -> Result<()> {
    let config = ctx.io.config.clone();
    ctx.ids = blocking(&ctx.app, "load", move |app| app.load(&config)).await?;
    tracing::info!(task_id = %ctx.io.config.task_id, samples = ctx.ids.len(), "party table loaded");
    Ok(())
}

/// Finds the label party and sends it this party's ids.
async fn feature_hello(ctx: &mut FeatureCtx) -> Result<()> {
    let ends = ctx.channel.await_join(ctx.common.join_timeout).await?;
    let [label] = ends.as_slice() else {
        return Err(Error::Config(format!(
            "channel {} has {} label parties in this group ({}), expected exactly one",
            ctx.channel.name(),
            ends.len(),
            ends.iter().map(TaskId::as_str).collect::<Vec<_>>().join(", ")
        )));
    };
    ctx.label = Some(label.clone());
    ctx.label_instance = ctx.channel.end_props(label).map(|p| p.instance).unwrap_or_default();
    let dim = { ctx.app.lock().unwrap_or_else(|e| e.into_inner()).embedding_dim() };
    let message = Command::Ids
        .message(0)
        .with_meta(IDS, strings_value(&ctx.ids))
        .with_meta("embeddingDim", dim as u64)
        .with_meta(PARTY_INDEX, u64::from(ctx.io.config.task_index));
    ctx.channel.send(label, message).await?;
    Ok(())
}

async fn feature_align(ctx: &mut FeatureCtx) -> Result<()> {
    let mut m = ctx.recv().await?;
    // Aligning again with a restarted label party: a request of its previous run that was
    // still on its way is void.
    while ctx.aligned.is_some() && (Command::Embed.is(&m) || Command::Gradient.is(&m)) {
        tracing::warn!(round = m.round, "request of the label party's previous run ignored");
        m = ctx.recv().await?;
    }
    if Command::Abort.is(&m) {
        let reason = m.meta.get("reason").and_then(Value::as_str).unwrap_or("no reason given");
        return Err(Error::Config(format!(
            "the label party {} could not align the samples: {reason}",
            ctx.label()
        )));
    }
    if m.kind == Kind::EndOfTraining {
        return Err(ctx.protocol(
            "training ended before this party was aligned (it joined after the label party \
             had started; check featureParties)"
                .to_owned(),
        ));
    }
    if !Command::Align.is(&m) {
        return Err(ctx.protocol(format!("expected the alignment, got {:?}", m.kind)));
    }
    let (Some(train), Some(test)) = (strings(&m, "train"), strings(&m, "test")) else {
        return Err(ctx.protocol("alignment without train and test id lists".to_owned()));
    };
    let held: BTreeSet<&String> = ctx.ids.iter().collect();
    if let Some(id) = train.iter().chain(&test).find(|id| !held.contains(id)) {
        return Err(
            ctx.protocol(format!("alignment names sample id {id:?}, which this party lacks"))
        );
    }
    if let Some((was_train, was_test)) = &ctx.aligned {
        // A restarted label party aligns the same ids with the same seed: nothing changes,
        // and the bottom model goes on as it is.
        if *was_train != train || *was_test != test {
            return Err(ctx.protocol(
                "the restarted label party aligned the samples differently (did the datasets \
                 or the seed change?)"
                    .to_owned(),
            ));
        }
        let resumed = m.meta.get(RESUMED).and_then(Value::as_u64).unwrap_or(0);
        tracing::info!(resumed, "aligned again with the restarted label party");
        restore_snapshot(ctx, resumed).await;
        return Ok(());
    }
    tracing::info!(train = train.len(), test = test.len(), "aligned");
    let (t, e) = (train.clone(), test.clone());
    blocking(&ctx.app, "align", move |app| app.align(&t, &e)).await?;
    ctx.aligned = Some((train, test));
    snapshot(ctx, 0).await
}

/// Keeps the bottom model as it is after round `round` (the last [`SNAPSHOTS`]).
async fn snapshot(ctx: &mut FeatureCtx, round: u64) -> Result<()> {
    let weights = blocking(&ctx.app, "weights", |app| app.weights()).await?;
    if ctx.snapshots.len() == SNAPSHOTS {
        ctx.snapshots.pop_front();
    }
    ctx.snapshots.push_back((round, weights));
    Ok(())
}

/// Goes back to the bottom model of round `round`, which the restarted label party resumes
/// from; without it (or with user code that cannot set its weights), goes on with the bottom
/// model as trained so far, which costs some accuracy but not the job.
async fn restore_snapshot(ctx: &mut FeatureCtx, round: u64) {
    let Some(pos) = ctx.snapshots.iter().position(|(r, _)| *r == round) else {
        tracing::warn!(round, kept = ?ctx.snapshots.iter().map(|(r, _)| r).collect::<Vec<_>>(),
            "no bottom model of the round the label party resumes from; going on with this one");
        return;
    };
    ctx.snapshots.truncate(pos + 1);
    let weights = ctx.snapshots[pos].1.clone();
    match blocking(&ctx.app, "set_weights", move |app| app.set_weights(&weights)).await {
        Ok(()) => tracing::info!(round, "bottom model of the resumed round restored"),
        Err(e) => tracing::warn!(round, error = %e,
            "cannot restore the bottom model; going on with it as trained so far"),
    }
}

/// The label party's next message, or `None` when it left or was restarted: the controller
/// restarts it under its id and it resumes from its last saved round, so this party waits
/// for it (`rejoinTimeout`), says hello and aligns again, and whatever was in flight is void.
async fn label_message(ctx: &mut FeatureCtx) -> Result<Option<Message>> {
    let label = ctx.label().clone();
    let received = loop {
        match tokio::time::timeout(RESTART_POLL, ctx.channel.recv(&label)).await {
            Ok(received) => break received.map_err(peer_left),
            Err(_) if ctx.label_restarted() => {
                break Err(Error::PeerLeft {
                    peer: label.clone(),
                    channel: ctx.channel.name().to_owned(),
                });
            }
            Err(_) => {}
        }
    };
    if !parent_left(&received, &label) {
        return received.map(Some);
    }
    rejoin(ctx).await?;
    Ok(None)
}

/// Waits for the label party to come back, then says hello and aligns again.
async fn rejoin(ctx: &mut FeatureCtx) -> Result<()> {
    let label = ctx.label().clone();
    await_parent(&ctx.channel, &label, ctx.common.rejoin_timeout).await?;
    feature_hello(ctx).await?;
    feature_align(ctx).await
}

fn rows_of(m: &Message, peer: &TaskId) -> Result<Vec<usize>> {
    let bad = |reason: String| Error::Protocol { peer: peer.clone(), reason };
    let tensor =
        m.tensors.get("rows").ok_or_else(|| bad("embed request without rows".to_owned()))?;
    let rows = tensor.to_i64_vec().map_err(|e| bad(format!("rows: {e}")))?;
    rows.into_iter()
        .map(|r| usize::try_from(r).map_err(|_| bad(format!("row {r} is negative"))))
        .collect()
}

/// Serves the label party's requests for one round: train steps, then the test embeddings.
async fn feature_serve(ctx: &mut FeatureCtx) -> Result<()> {
    ctx.io.metrics = RoundMetrics::start(ctx.io.traffic());
    loop {
        let Some(m) = label_message(ctx).await? else {
            continue;
        };
        if m.kind == Kind::EndOfTraining {
            ctx.done = true;
            return Ok(());
        }
        if !Command::Embed.is(&m) {
            return Err(ctx.protocol(format!("expected an embed request, got {:?}", m.kind)));
        }
        let split = m
            .meta
            .get("split")
            .and_then(Value::as_str)
            .and_then(Split::parse)
            .ok_or_else(|| ctx.protocol("embed request without split train|test".to_owned()))?;
        let step = m.meta.get("step").and_then(Value::as_u64).unwrap_or(0);
        let rows = rows_of(&m, ctx.label())?;
        let n_rows = rows.len();
        ctx.round = m.round;
        let embedding = blocking(&ctx.app, "embed", move |app| app.embed(split, &rows)).await?;
        let reply = Message::new(Kind::Update, m.round)
            .with_meta("split", split.word())
            .with_meta("step", step)
            .with_tensor("embedding", tensor_of(&embedding)?);
        let sent = ctx.channel.send(ctx.label(), reply).await.map_err(peer_left);
        if parent_left(&sent, ctx.label()) {
            rejoin(ctx).await?;
            continue;
        }
        sent?;
        ctx.rows += n_rows as u64;
        if split == Split::Test {
            // The evaluation closes the round.
            return snapshot(ctx, m.round).await;
        }
        let Some(g) = label_message(ctx).await? else {
            continue;
        };
        if !Command::Gradient.is(&g)
            || g.round != m.round
            || g.meta.get("step").and_then(Value::as_u64) != Some(step)
        {
            return Err(ctx.protocol(format!(
                "expected the gradient of round {} step {step}, got {:?} of round {}",
                m.round, g.kind, g.round
            )));
        }
        let gradient = embedding_of(ctx.label(), &g, GRADIENT, n_rows, embedding.dim)?;
        blocking(&ctx.app, "backward", move |app| app.backward(&gradient)).await?;
        ctx.steps += 1;
    }
}

async fn feature_report(ctx: &mut FeatureCtx) -> Result<()> {
    let metrics = &mut ctx.io.metrics;
    metrics.set("steps", std::mem::take(&mut ctx.steps) as f64);
    metrics.set("embeddedRows", std::mem::take(&mut ctx.rows) as f64);
    ctx.io.finish_round(ctx.round);
    Ok(())
}

async fn feature_finish(ctx: &mut FeatureCtx) -> Result<()> {
    let weights = blocking(&ctx.app, "weights", |app| app.weights()).await?;
    let name = format!("{}-{}-bottom", ctx.io.config.job.id, ctx.io.config.task_id);
    let registry = ctx.io.registry.clone();
    let saved = weights.clone();
    let path = tokio::task::spawn_blocking(move || registry.save_model(&name, 1, &saved)).await??;
    ctx.final_model = Some(weights);
    tracing::info!(path = %path.display(), "bottom model saved");
    Ok(())
}

/// The feature party program.
pub fn feature_program() -> Composer<FeatureCtx> {
    Composer::new()
        .tasklet("load", async_tasklet(|c| boxed(feature_load(c))))
        .tasklet("hello", async_tasklet(|c| boxed(feature_hello(c))))
        .tasklet("align", async_tasklet(|c| boxed(feature_align(c))))
        .loop_until(
            "rounds",
            |c: &FeatureCtx| c.done,
            Composer::new()
                .tasklet("serve", async_tasklet(|c| boxed(feature_serve(c))))
                .tasklet("report", async_tasklet(|c| boxed(feature_report(c)))),
        )
        .tasklet("finish", async_tasklet(|c| boxed(feature_finish(c))))
}

/// State of a label party task.
pub struct LabelCtx {
    /// The task's I/O.
    pub io: TaskIo,
    app: Arc<Mutex<Box<dyn LabelApp>>>,
    channel: Channel,
    common: Common,
    expected: usize,
    test_fraction: f64,
    batch_size: usize,
    seed: u64,
    ids: Vec<String>,
    /// The feature parties, in the order of their task indexes (the order of embeddings).
    pub parties: Vec<TaskId>,
    dims: Vec<usize>,
    n_train: usize,
    n_test: usize,
    /// Rounds (epochs) to run.
    pub rounds: u64,
    /// The round being run (0 before the first).
    pub round: u64,
    /// Training is over.
    pub done: bool,
    train_loss: f64,
    steps: u64,
    /// Metrics of the last evaluation.
    pub evaluation: BTreeMap<String, f64>,
    /// The top model, once trained.
    final_model: Option<Weights>,
    /// What this task saved after its last round, when it was restarted: applied once the
    /// parties are aligned.
    resumed: Option<ResumeState>,
}

impl RoleCtx for LabelCtx {
    fn io(&mut self) -> &mut TaskIo {
        &mut self.io
    }

    fn rounds(&mut self) -> u64 {
        self.round
    }

    fn final_model(&mut self) -> Option<Weights> {
        self.final_model.take()
    }
}

/// The label party of split learning (see the module docs).
pub struct LabelParty;

impl Role for LabelParty {
    type Ctx = LabelCtx;
    const KIND: RoleKind = RoleKind::VerticalLabelParty;
    const APP: AppNeed = AppNeed::LabelParty;

    fn build(io: TaskIo, app: UserApp) -> Result<LabelCtx> {
        LabelCtx::new(io, app.label_party()?)
    }

    fn program(_ctx: &LabelCtx) -> Result<Composer<LabelCtx>> {
        Ok(label_program())
    }
}

impl Context for LabelCtx {
    fn record_time(&mut self, alias: &str, seconds: f64) {
        self.io.record_time(alias, seconds);
    }
}

impl LabelCtx {
    /// A label party over the task's `io` running `app`.
    pub fn new(mut io: TaskIo, app: Box<dyn LabelApp>) -> Result<LabelCtx> {
        io.start_round();
        let channel = channel_by_tag(&io.channels, &io.config, tags::AGGREGATE)?;
        let common = Common::from_config(&io.config)?;
        let h = &io.config.hyperparameters;
        let test_fraction = match h.get(names::TEST_FRACTION) {
            None | Some(Value::Null) => 0.2,
            Some(v) => v.as_f64().filter(|f| *f > 0.0 && *f < 1.0).ok_or_else(|| {
                Error::Hyperparameter {
                    name: names::TEST_FRACTION.to_owned(),
                    reason: format!("{v} is not a number strictly between 0 and 1"),
                }
            })?,
        };
        let expected = hyper::uint(h, names::FEATURE_PARTIES, 1, 1)? as usize;
        let batch_size = hyper::uint(h, names::BATCH_SIZE, 32, 1)? as usize;
        let seed = hyper::uint(h, names::SEED, 0, 0)?;
        let rounds = hyper::uint(h, hyper::names::ROUNDS, 1, 1)?;
        Ok(LabelCtx {
            expected,
            batch_size,
            seed,
            rounds,
            test_fraction,
            io,
            app: Arc::new(Mutex::new(app)),
            channel,
            common,
            ids: Vec::new(),
            parties: Vec::new(),
            dims: Vec::new(),
            n_train: 0,
            n_test: 0,
            round: 0,
            done: false,
            train_loss: 0.0,
            steps: 0,
            evaluation: BTreeMap::new(),
            final_model: None,
            resumed: None,
        })
    }

    async fn recv(&self, party: &TaskId) -> Result<Message> {
        self.channel.recv(party).await.map_err(peer_left)
    }

    async fn send(&self, party: &TaskId, message: Message) -> Result<()> {
        self.channel.send(party, message).await.map_err(peer_left)
    }

    /// Asks every party for the embeddings of `rows` of `split`; returns them in party order.
    async fn embeddings(&self, split: Split, step: u64, rows: &[usize]) -> Result<Vec<Embedding>> {
        let as_i64: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let tensor = fledge_channel::Tensor::from_i64(vec![rows.len()], &as_i64)
            .map_err(|e| Error::Tensors(format!("rows: {e}")))?;
        let request = Command::Embed
            .message(self.round)
            .with_meta("split", split.word())
            .with_meta("step", step)
            .with_tensor("rows", tensor);
        for party in &self.parties {
            self.send(party, request.clone()).await?;
        }
        let mut res = Vec::with_capacity(self.parties.len());
        for (party, &dim) in self.parties.iter().zip(&self.dims) {
            let m = self.recv(party).await?;
            let matches = m.kind == Kind::Update
                && m.round == self.round
                && m.meta.get("step").and_then(Value::as_u64) == Some(step)
                && m.meta.get("split").and_then(Value::as_str) == Some(split.word());
            if !matches {
                return Err(Error::Protocol {
                    peer: party.clone(),
                    reason: format!(
                        "expected the {} embedding of round {} step {step}, got {:?} of round {}",
                        split.word(),
                        self.round,
                        m.kind,
                        m.round
                    ),
                });
            }
            res.push(embedding_of(party, &m, "embedding", rows.len(), dim)?);
        }
        Ok(res)
    }
}

async fn label_load(ctx: &mut LabelCtx) -> Result<()> {
    let config = ctx.io.config.clone();
    ctx.ids = blocking(&ctx.app, "load", move |app| app.load(&config)).await?;
    tracing::info!(task_id = %ctx.io.config.task_id, samples = ctx.ids.len(), "labelled table loaded");
    // Restarted: the top model is restored once aligned (it is built by the alignment).
    ctx.resumed = ctx.io.resume_state(true).await?;
    Ok(())
}

/// Waits for the feature parties, aligns their ids with ours and tells them the split.
async fn label_align(ctx: &mut LabelCtx) -> Result<()> {
    let mut parties = ctx.channel.await_ends(ctx.expected, ctx.common.join_timeout).await.map_err(
        |e| match e {
            fledge_channel::Error::JoinTimeout { timeout, .. } => Error::Config(format!(
                "only {} of featureParties = {} feature parties joined within {} s",
                ctx.channel.ends().len(),
                ctx.expected,
                timeout.as_secs()
            )),
            e => e.into(),
        },
    )?;
    parties.sort();
    // (party index, party, ids, embedding size) of each party.
    let mut hellos = Vec::with_capacity(parties.len());
    for party in &parties {
        let bad = |reason: &str| Error::Protocol { peer: party.clone(), reason: reason.to_owned() };
        let m = loop {
            let m = ctx.recv(party).await?;
            match m.kind {
                _ if Command::Ids.is(&m) => break m,
                // An embedding a party sent to this task's previous run (it was restarted
                // while the party computed it): the party says hello again after it.
                Kind::Update => {
                    tracing::warn!(%party, round = m.round, "embedding for the previous run ignored");
                }
                _ => return Err(bad("expected its sample ids first")),
            }
        };
        let ids = strings(&m, IDS).ok_or_else(|| bad("ids is not a list of strings"))?;
        let dim = m
            .meta
            .get("embeddingDim")
            .and_then(Value::as_u64)
            .filter(|d| *d > 0)
            .ok_or_else(|| bad("embeddingDim is missing or 0"))?;
        let index = m
            .meta
            .get(PARTY_INDEX)
            .and_then(Value::as_u64)
            .filter(|i| *i <= u64::from(u32::MAX))
            .ok_or_else(|| bad("partyIndex is missing or not a task index"))?;
        hellos.push((index, party.clone(), ids, dim as usize));
    }
    // Embeddings go in the order of the parties' task indexes, which are the same in every
    // run of a job (task ids are not: they hash the job's id), so a job gives the same model
    // every time it runs.
    hellos.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    let mut held = Vec::with_capacity(hellos.len());
    for (_, party, ids, dim) in hellos {
        ctx.parties.push(party.clone());
        ctx.dims.push(dim);
        held.push((party, ids));
    }
    let aligned = match align_ids(&ctx.ids, &held) {
        Ok(aligned) => aligned,
        Err(e) => {
            let abort = Command::Abort.message(0).with_meta("reason", e.to_string());
            for party in &ctx.parties {
                let _ = ctx.send(party, abort.clone()).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Err(e);
        }
    };
    let (train, test) = split_ids(&aligned, ctx.test_fraction, ctx.seed);
    tracing::info!(
        aligned = aligned.len(),
        label_party = ctx.ids.len(),
        train = train.len(),
        test = test.len(),
        "samples aligned"
    );
    let message = Command::Align
        .message(0)
        .with_meta("train", strings_value(&train))
        .with_meta("test", strings_value(&test))
        .with_meta(RESUMED, ctx.resumed.as_ref().map_or(0, |s| s.round));
    for party in &ctx.parties {
        ctx.send(party, message.clone()).await?;
    }
    (ctx.n_train, ctx.n_test) = (train.len(), test.len());
    let dims = ctx.dims.clone();
    blocking(&ctx.app, "align", move |app| app.align(&train, &test, &dims)).await?;
    if let Some(state) = ctx.resumed.take() {
        // The same ids and seed align the same rows: the saved top model fits them.
        let weights = state.global;
        blocking(&ctx.app, "set_weights", move |app| app.set_weights(&weights)).await?;
        ctx.round = state.round;
        ctx.done = ctx.round >= ctx.rounds;
        tracing::info!(round = ctx.round, "label party resumed from its last saved round");
    }
    Ok(())
}

/// One epoch over the train rows in seeded random batches.
async fn label_train(ctx: &mut LabelCtx) -> Result<()> {
    ctx.round += 1;
    ctx.io.metrics = RoundMetrics::start(ctx.io.traffic());
    let mut order: Vec<usize> = (0..ctx.n_train).collect();
    order.shuffle(&mut StdRng::seed_from_u64(
        ctx.seed.wrapping_mul(1_000_003).wrapping_add(ctx.round),
    ));
    let mut loss_sum = 0.0;
    let mut steps = 0;
    for (step, batch) in order.chunks(ctx.batch_size).enumerate() {
        let step = step as u64;
        let embeddings = ctx.embeddings(Split::Train, step, batch).await?;
        let rows = batch.to_vec();
        let outcome =
            blocking(&ctx.app, "train_step", move |app| app.train_step(&rows, &embeddings)).await?;
        if outcome.gradients.len() != ctx.parties.len() {
            return Err(Error::App {
                step: "train_step",
                source: anyhow::anyhow!(
                    "{} gradients for {} feature parties",
                    outcome.gradients.len(),
                    ctx.parties.len()
                ),
            });
        }
        for (party, gradient) in ctx.parties.iter().zip(&outcome.gradients) {
            let message = Command::Gradient
                .message(ctx.round)
                .with_meta("step", step)
                .with_tensor(GRADIENT, tensor_of(gradient)?);
            ctx.send(party, message).await?;
        }
        loss_sum += outcome.loss * batch.len() as f64;
        steps += 1;
    }
    ctx.train_loss = loss_sum / ctx.n_train as f64;
    ctx.steps = steps;
    if !ctx.train_loss.is_finite() {
        return Err(Error::App {
            step: "train_step",
            source: anyhow::anyhow!(
                "training diverged in round {} (loss {}); lower the learning rate",
                ctx.round,
                ctx.train_loss
            ),
        });
    }
    Ok(())
}

async fn label_evaluate(ctx: &mut LabelCtx) -> Result<()> {
    let rows: Vec<usize> = (0..ctx.n_test).collect();
    let embeddings = ctx.embeddings(Split::Test, 0, &rows).await?;
    ctx.evaluation =
        blocking(&ctx.app, "evaluate", move |app| app.evaluate(&rows, &embeddings)).await?;
    Ok(())
}

/// The round's commit point: the top model, the round and its record are saved in the
/// task's resume file before the record is kept and reported (a restart before this redoes
/// the round; after it, goes on with the next).
async fn label_report(ctx: &mut LabelCtx) -> Result<()> {
    let io = &mut ctx.io;
    let mut metrics = std::mem::take(&mut io.metrics);
    metrics.set("train_loss", ctx.train_loss);
    metrics.set("steps", ctx.steps as f64);
    metrics.set("trainSamples", ctx.n_train as f64);
    metrics.set("testSamples", ctx.n_test as f64);
    metrics.set("featureParties", ctx.parties.len() as f64);
    metrics.extend("", &ctx.evaluation);
    let record = metrics.finish(&io.config.task_id, &io.config.role, ctx.round, io.traffic());
    tracing::info!(round = ctx.round, train_loss = ctx.train_loss, metrics = ?ctx.evaluation, "vertical round done");
    let global = blocking(&ctx.app, "weights", |app| app.weights()).await?;
    let state = ResumeState {
        round: ctx.round,
        model_version: ctx.round,
        global,
        server: None,
        selector: Value::Null,
        record: Some(record.clone()),
        privacy: None,
    };
    let (registry, job, task, rec) = (
        ctx.io.registry.clone(),
        ctx.io.config.job.id.clone(),
        ctx.io.config.task_id.clone(),
        record.clone(),
    );
    tokio::task::spawn_blocking(move || {
        registry.save_resume(&job, &task, &state)?;
        registry.append_metrics(&job, &[rec])
    })
    .await??;
    ctx.io.report(record);
    ctx.done = ctx.round >= ctx.rounds;
    Ok(())
}

async fn label_finish(ctx: &mut LabelCtx) -> Result<()> {
    // Every end, so that a party that joined too late stops too.
    for party in ctx.channel.ends() {
        let _ = ctx.send(&party, Message::new(Kind::EndOfTraining, ctx.round)).await;
    }
    let weights = blocking(&ctx.app, "weights", |app| app.weights()).await?;
    let (registry, job, saved) =
        (ctx.io.registry.clone(), ctx.io.config.job.id.clone(), weights.clone());
    let path = tokio::task::spawn_blocking(move || registry.save_final(&job, &saved)).await??;
    tracing::info!(path = %path.display(), "final top model saved");
    ctx.final_model = Some(weights);
    Ok(())
}

/// The label party program.
pub fn label_program() -> Composer<LabelCtx> {
    Composer::new()
        .tasklet("load", async_tasklet(|c| boxed(label_load(c))))
        .tasklet("align", async_tasklet(|c| boxed(label_align(c))))
        .loop_until(
            "rounds",
            |c: &LabelCtx| c.done,
            Composer::new()
                .tasklet("train", async_tasklet(|c| boxed(label_train(c))))
                .tasklet("evaluate", async_tasklet(|c| boxed(label_evaluate(c))))
                .tasklet("report", async_tasklet(|c| boxed(label_report(c)))),
        )
        .tasklet("finish", async_tasklet(|c| boxed(label_finish(c))))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use fledge_channel::{BackendEnv, LocalHub};
    use serde_json::json;

    use super::*;
    use crate::app::AppFactory;
    use crate::role::{RunOptions, RunSummary, run};

    fn ids(v: &[u32]) -> Vec<String> {
        v.iter().map(|i| format!("s{i}")).collect()
    }

    fn number(id: &str) -> f32 {
        id[1..].parse().expect("toy ids are s<number>")
    }

    /// Feature toy: the embedding of a row is `[id number + offset]`; checks that each
    /// gradient is twice the embedding it answers.
    struct ToyFeature {
        offset: f32,
        ids: Vec<String>,
        train: Vec<String>,
        test: Vec<String>,
        last: Option<Embedding>,
        backwards: Arc<AtomicU64>,
    }

    /// The dataset url of a toy party: `toy:<offset>:<id>,<id>,...`.
    fn parse_url(config: &TaskConfig) -> (f32, Vec<String>) {
        let url = &config.dataset.as_ref().expect("toy parties have a dataset").url;
        let mut parts = url.splitn(3, ':').skip(1);
        let offset = parts.next().expect("offset").parse().expect("number");
        let ids = parts.next().expect("ids").split(',').map(str::to_owned).collect();
        (offset, ids)
    }

    impl FeatureApp for ToyFeature {
        fn load(&mut self, config: &TaskConfig) -> anyhow::Result<Vec<String>> {
            (self.offset, self.ids) = parse_url(config);
            Ok(self.ids.clone())
        }
        fn embedding_dim(&self) -> usize {
            1
        }
        fn align(&mut self, train: &[String], test: &[String]) -> anyhow::Result<()> {
            (self.train, self.test) = (train.to_vec(), test.to_vec());
            Ok(())
        }
        fn embed(&mut self, split: Split, rows: &[usize]) -> anyhow::Result<Embedding> {
            let ids = if split == Split::Train { &self.train } else { &self.test };
            let values = rows.iter().map(|&r| number(&ids[r]) + self.offset).collect();
            let e = Embedding { dim: 1, values };
            if split == Split::Train {
                self.last = Some(e.clone());
            }
            Ok(e)
        }
        fn backward(&mut self, gradient: &Embedding) -> anyhow::Result<()> {
            let last = self.last.take().ok_or_else(|| anyhow::anyhow!("no embedding"))?;
            let want: Vec<f32> = last.values.iter().map(|v| 2.0 * v).collect();
            anyhow::ensure!(gradient.values == want, "gradient {gradient:?} for {last:?}");
            self.backwards.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn weights(&self) -> anyhow::Result<Weights> {
            Ok(Weights::new())
        }
    }

    /// Label toy: checks that every party's embedding is the one of the requested ids
    /// (alignment and row order agree) and answers with twice the embedding.
    struct ToyLabel {
        offsets: Vec<f32>,
        train: Vec<String>,
        test: Vec<String>,
        rows_seen: Arc<AtomicU64>,
    }

    impl ToyLabel {
        fn check(
            &self,
            ids: &[String],
            rows: &[usize],
            embeddings: &[Embedding],
        ) -> anyhow::Result<()> {
            anyhow::ensure!(
                embeddings.len() == self.offsets.len(),
                "{} embeddings",
                embeddings.len()
            );
            for (e, offset) in embeddings.iter().zip(&self.offsets) {
                let want: Vec<f32> = rows.iter().map(|&r| number(&ids[r]) + offset).collect();
                anyhow::ensure!(
                    e.values == want,
                    "misaligned embedding {:?}, want {want:?}",
                    e.values
                );
            }
            self.rows_seen.fetch_add(rows.len() as u64, Ordering::SeqCst);
            Ok(())
        }
    }

    impl LabelApp for ToyLabel {
        fn load(&mut self, config: &TaskConfig) -> anyhow::Result<Vec<String>> {
            Ok(parse_url(config).1)
        }
        fn align(
            &mut self,
            train: &[String],
            test: &[String],
            dims: &[usize],
        ) -> anyhow::Result<()> {
            anyhow::ensure!(dims.iter().all(|d| *d == 1), "dims {dims:?}");
            (self.train, self.test) = (train.to_vec(), test.to_vec());
            Ok(())
        }
        fn train_step(
            &mut self,
            rows: &[usize],
            embeddings: &[Embedding],
        ) -> anyhow::Result<StepOutcome> {
            self.check(&self.train, rows, embeddings)?;
            let gradients = embeddings
                .iter()
                .map(|e| Embedding { dim: 1, values: e.values.iter().map(|v| 2.0 * v).collect() })
                .collect();
            Ok(StepOutcome { loss: 1.0, gradients })
        }
        fn evaluate(
            &mut self,
            rows: &[usize],
            embeddings: &[Embedding],
        ) -> anyhow::Result<BTreeMap<String, f64>> {
            self.check(&self.test, rows, embeddings)?;
            Ok(BTreeMap::from([("accuracy".to_owned(), 1.0)]))
        }
        fn weights(&self) -> anyhow::Result<Weights> {
            Ok(Weights::new())
        }
    }

    fn config(task: &str, role: &str, url: &str, h: &Value) -> TaskConfig {
        let tags = if role == "label" {
            json!(["aggregate", "distribute"])
        } else {
            json!(["upload", "fetch"])
        };
        serde_json::from_value(json!({
            "taskId": task,
            "role": role,
            "job": {"id": "vfl-toy", "name": "vfl-toy"},
            "backend": "local",
            "channels": [{"name": "vfl", "pair": ["feature", "label"], "funcTags": {role: tags}}],
            "groupAssociation": {"vfl": "default"},
            "hyperparameters": h,
            "dataset": {"id": task, "url": url}
        }))
        .expect("valid task config")
    }

    fn url(offset: u32, ids: &[String]) -> String {
        format!("toy:{offset}:{}", ids.join(","))
    }

    /// User code handed over once (each test builds its toy apps itself).
    #[derive(Default)]
    struct Apps {
        feature: std::sync::Mutex<Option<Box<dyn FeatureApp>>>,
        label: std::sync::Mutex<Option<Box<dyn LabelApp>>>,
    }

    impl Apps {
        fn feature(app: impl FeatureApp) -> Arc<dyn AppFactory> {
            let apps = Apps::default();
            *apps.feature.lock().expect("lock") = Some(Box::new(app));
            Arc::new(apps)
        }

        fn label(app: impl LabelApp) -> Arc<dyn AppFactory> {
            let apps = Apps::default();
            *apps.label.lock().expect("lock") = Some(Box::new(app));
            Arc::new(apps)
        }
    }

    impl AppFactory for Apps {
        fn trainer(&self, _: &TaskConfig) -> anyhow::Result<Box<dyn crate::TrainerApp>> {
            anyhow::bail!("no trainer here")
        }

        fn feature_party(&self, _: &TaskConfig) -> anyhow::Result<Box<dyn FeatureApp>> {
            self.feature.lock().expect("lock").take().ok_or_else(|| anyhow::anyhow!("used"))
        }

        fn label_party(&self, _: &TaskConfig) -> anyhow::Result<Box<dyn LabelApp>> {
            self.label.lock().expect("lock").take().ok_or_else(|| anyhow::anyhow!("used"))
        }
    }

    /// Runs two toy feature parties and a toy label party; returns their results.
    async fn run_toy(
        parties: [Vec<String>; 2],
        label: Vec<String>,
        rows_seen: Arc<AtomicU64>,
        backwards: Arc<AtomicU64>,
    ) -> (Result<RunSummary>, Vec<Result<RunSummary>>) {
        let dir = tempfile::tempdir().expect("tmp");
        let h =
            json!({"rounds": 3, "batchSize": 4, "featureParties": 2, "seed": 7, "joinTimeout": 10});
        let opts = RunOptions {
            workdir: dir.path().to_owned(),
            backend_env: BackendEnv { local_hub: LocalHub::new(), ..BackendEnv::default() },
            ..RunOptions::default()
        };
        let mut set = tokio::task::JoinSet::new();
        for (i, ids) in parties.iter().enumerate() {
            let offset = 1000 * (i as u32 + 1);
            let app = ToyFeature {
                offset: 0.0,
                ids: Vec::new(),
                train: Vec::new(),
                test: Vec::new(),
                last: None,
                backwards: backwards.clone(),
            };
            let c = config(&format!("f{i}"), "feature", &url(offset, ids), &h);
            set.spawn(run::<FeatureParty>(c, Apps::feature(app), opts.clone()));
        }
        let app = ToyLabel {
            offsets: vec![1000.0, 2000.0],
            train: Vec::new(),
            test: Vec::new(),
            rows_seen,
        };
        let label =
            run::<LabelParty>(config("l", "label", &url(0, &label), &h), Apps::label(app), opts)
                .await;
        let mut features = Vec::new();
        while let Some(res) = set.join_next().await {
            features.push(res.expect("join"));
        }
        (label, features)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parties_align_by_id_whatever_their_row_order() {
        let all: Vec<u32> = (0..30).collect();
        let mut a = ids(&all[1..]);
        a.reverse();
        let mut b = ids(&all[..28]);
        b.rotate_left(11);
        let mut l: Vec<String> = ids(&all[2..]);
        l.extend(ids(&[100, 101]));
        l.rotate_left(5);
        // Shared: s2..s27 = 26 ids; 5 test, 21 train in batches of 4 (6 steps per round).
        let (rows_seen, backwards) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (label, features) = run_toy([a, b], l, rows_seen.clone(), backwards.clone()).await;
        let label = label.expect("label party runs");
        // Each party's summary says which party it is (both used to say another role's kind).
        assert_eq!(label.kind, RoleKind::VerticalLabelParty);
        assert!(label.final_model.is_some(), "the label party ends with the top model");
        assert_eq!(label.rounds, 3);
        let last = &label.history[2].metrics;
        assert_eq!((last["trainSamples"], last["testSamples"], last["steps"]), (21.0, 5.0, 6.0));
        assert_eq!(rows_seen.load(Ordering::SeqCst), 3 * (21 + 5));
        assert_eq!(backwards.load(Ordering::SeqCst), 2 * 3 * 6);
        for f in features {
            let f = f.expect("feature party runs");
            assert_eq!(f.kind, RoleKind::VerticalFeatureParty);
            assert_eq!(f.history.len(), 3);
            assert!(
                f.history
                    .iter()
                    .all(|r| r.metrics["steps"] == 6.0 && r.metrics["embeddedRows"] == 26.0)
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn disjoint_ids_fail_every_party_with_the_reason() {
        let none = Arc::new(AtomicU64::new(0));
        let (label, features) =
            run_toy([ids(&[1, 2, 3]), ids(&[2, 3, 4])], ids(&[7, 8, 9]), none.clone(), none).await;
        let err = label.expect_err("nothing to align").to_string();
        assert!(err.contains("share 0 sample ids") && err.contains("\"s7\""), "{err}");
        for f in features {
            let err = crate::runner::error_chain(&f.expect_err("aborted by the label party"));
            assert!(err.contains("could not align") && err.contains("share 0 sample ids"), "{err}");
        }
    }

    #[test]
    fn align_ids_intersects_and_names_duplicates() {
        let parties =
            vec![(TaskId::from("a"), ids(&[5, 1, 2, 3])), (TaskId::from("b"), ids(&[3, 2, 9, 1]))];
        assert_eq!(align_ids(&ids(&[2, 3, 1, 8]), &parties).expect("aligned"), ids(&[1, 2, 3]));
        let dup = vec![(TaskId::from("b"), ids(&[1, 2, 1]))];
        let err = align_ids(&ids(&[1, 2]), &dup).unwrap_err().to_string();
        assert!(err.contains("feature party b lists sample id \"s1\" twice"), "{err}");
        let err = align_ids(&ids(&[1, 9]), &parties).unwrap_err().to_string();
        assert!(err.contains("share 1 sample ids") && err.contains("a 4 ids"), "{err}");
    }

    #[test]
    fn split_ids_is_seeded_and_covers_every_id_once() {
        let all = ids(&(0..50).collect::<Vec<_>>());
        let (train, test) = split_ids(&all, 0.2, 3);
        assert_eq!((train.len(), test.len()), (40, 10));
        assert_eq!(split_ids(&all, 0.2, 3), (train.clone(), test.clone()));
        assert_ne!(split_ids(&all, 0.2, 4).1, test);
        let mut both: Vec<String> = train.into_iter().chain(test).collect();
        both.sort();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(both, sorted);
        // At least one of each, whatever the fraction.
        let (train, test) = split_ids(&ids(&[1, 2]), 0.01, 0);
        assert_eq!((train.len(), test.len()), (1, 1));
    }
}
