//! The distributed trainer (built-in name `ring-trainer`): training without an aggregator.
//!
//! Trainers share one self-loop channel (a channel whose `pair` is the trainer role twice).
//! Each round every member trains locally, then the group replaces its weights by their
//! sample-weighted mean, computed by ring all-reduce over the members ordered by task id:
//! `n − 1` reduce-scatter steps then `n − 1` all-gather steps, each sending one `1/n` chunk
//! of the model to the next member. Every member sends and receives about `2 × model` bytes
//! per round whatever `n` is. The weighting is exact: each member contributes
//! `num_samples × weights` plus its `num_samples` as a last element, and divides by the
//! reduced sample count.
//!
//! Program ([`program`]):
//!
//! ```text
//! initialize, load_data, bootstrap,
//! loop rounds until done { membership, train, allreduce, evaluate, report },
//! finish
//! ```
//!
//! **Membership.** The leader is the lowest task id among the trainers present at bootstrap
//! (after waiting up to `joinTimeout` for `expectedTrainers`). Before each round the other
//! members tell the leader they are ready (`Control` `ready`, round r); a trainer that has
//! no model yet says `ready` for round 0. The leader sends such a newcomer the current
//! weights (`Weights`, round r) so that a late joiner never trains from random weights, then
//! sends every member the round's member list (`Control` `members`, with an `epoch` that
//! the ring chunks of that round carry). Members that leave between rounds are dropped.
//!
//! After the last round the leader saves the final model to the registry, and tells
//! trainers still waiting to join that training is over (`EndOfTraining`).
//!
//! **Resume** (the `ring-trainer` role; the hybrid trainer's ring keeps the old rule: a member
//! that leaves during an all-reduce fails it with a peer-left error). Every member commits
//! each round by saving the group's model, the round, the leader and its record in its resume
//! file ([`crate::registry::ResumeState`]) before it reports the round. A member that leaves,
//! or is restarted under its id, during an all-reduce breaks the ring: every other member
//! notices (it watches every member's end and run while it waits), goes back to the group's
//! model of the round's start, drops the broken round's chunks and redoes the round from its
//! membership. A restarted member that leads loads its saved model and round and leads again;
//! one that does not lead joins as a newcomer and gets the leader's model. Members wait
//! `rejoinTimeout` for a leader that leaves or is restarted and say they are ready again; a
//! member ready for another round than the leader's (one of them was restarted between the
//! end of a round and its save) is sent the leader's model like a newcomer, so the leader's
//! saved state is the group's. After the last round, the leader answers any member still
//! asking with the final model.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fledge_algorithms::{Tensor, Weights};
use fledge_channel::{Channel, Kind, Message};
use fledge_types::TaskId;
use serde_json::Value;
use tokio::time::Instant;

use crate::app::{AppNeed, TrainOutcome, TrainerApp, UserApp};
use crate::composer::{Composer, Context, async_tasklet, boxed};
use crate::convert::{tensors_to_weights, weights_message};
use crate::hyper::{self, names};
use crate::metrics::RoundMetrics;
use crate::protocol::{self, Command, peer_left};
use crate::registry::ResumeState;
use crate::role::{Role, RoleCtx, TaskIo};
use crate::roles::{Common, RoleKind};
use crate::{Error, Result};

/// The built-in name of the distributed trainer.
pub const BUILTIN_NAME: &str = "ring-trainer";

/// Meta key of the leader's member list.
const MEMBERS: &str = "members";
/// Meta key of the membership a member list and the ring chunks belong to.
const EPOCH: &str = "epoch";
/// Key of the leader's id in a ring member's saved state (its `selector`).
const LEADER: &str = "leader";

/// Messages one peer may have stashed, not consumed yet: the channel's own per-end queue
/// bound. A member is at most a few messages ahead of this one; a peer further ahead is
/// flooding, a protocol error.
const MAILBOX_PER_PEER: usize = fledge_channel::channel::DEFAULT_QUEUE_DEPTH;

/// How often a waiting trainer re-checks which peers are still alive.
const LIVENESS_POLL: Duration = Duration::from_millis(500);

/// Messages taken from the channel but not consumed yet (the ring and the membership
/// protocol share one channel, so a member may receive a peer's next message early).
struct Mailbox {
    channel: Channel,
    stash: VecDeque<(TaskId, Message)>,
}

impl Mailbox {
    /// The first message matching `pred`, waiting at most [`LIVENESS_POLL`] for one.
    async fn poll<P>(&mut self, pred: P) -> Result<Option<(TaskId, Message)>>
    where
        P: Fn(&TaskId, &Message) -> bool,
    {
        loop {
            if let Some(pos) = self.stash.iter().position(|(e, m)| pred(e, m)) {
                return Ok(self.stash.remove(pos));
            }
            match tokio::time::timeout(LIVENESS_POLL, self.channel.recv_any()).await {
                Ok(res) => self.stash(res?)?,
                Err(_) => return Ok(None),
            }
        }
    }

    /// Keeps a message for later; fails when its sender already has [`MAILBOX_PER_PEER`]
    /// messages waiting.
    fn stash(&mut self, (from, message): (TaskId, Message)) -> Result<()> {
        let held = self.stash.iter().filter(|(e, _)| *e == from).count();
        if held >= MAILBOX_PER_PEER {
            return Err(Error::Protocol {
                peer: from,
                reason: format!(
                    "{held} messages ahead of this member on channel {}; at most {MAILBOX_PER_PEER} may wait",
                    self.channel.name()
                ),
            });
        }
        self.stash.push_back((from, message));
        Ok(())
    }

    /// The first message from `from` matching `pred`; fails with [`Error::PeerLeft`] when
    /// `from`, or an end of `watch`, has left or is another run than the one `watch` names
    /// (restarted under the same id: it will never send what this member waits for).
    async fn take<P>(
        &mut self,
        from: &TaskId,
        watch: &[(TaskId, String)],
        pred: P,
    ) -> Result<Message>
    where
        P: Fn(&Message) -> bool,
    {
        loop {
            if let Some((_, m)) = self.poll(|e, m| e == from && pred(m)).await? {
                return Ok(m);
            }
            let ends = self.channel.ends();
            let gone = std::iter::once(from)
                .chain(watch.iter().map(|(end, _)| end))
                .find(|end| !ends.contains(end))
                .or_else(|| {
                    watch.iter().map(|(end, run)| (end, run)).find_map(|(end, run)| {
                        let now = self.channel.end_props(end).map(|p| p.instance);
                        now.is_some_and(|now| !run.is_empty() && now != *run).then_some(end)
                    })
                });
            if let Some(end) = gone {
                return Err(Error::PeerLeft {
                    peer: end.clone(),
                    channel: self.channel.name().to_owned(),
                });
            }
        }
    }

    /// Drops every ring chunk kept: those of an all-reduce that broke.
    fn drop_chunks(&mut self) {
        self.stash.retain(|(_, m)| m.kind != Kind::Update);
    }
}

/// State of a distributed trainer task.
pub struct RingCtx {
    /// The task's I/O.
    pub io: TaskIo,
    app: Arc<Mutex<Box<dyn TrainerApp>>>,
    mailbox: Mailbox,
    common: Common,
    /// Trainers waited for at bootstrap (this one included).
    pub(crate) expected: usize,
    /// Rounds to run.
    pub rounds: u64,
    /// The round being run (0 before the first).
    pub round: u64,
    /// Training is over.
    pub done: bool,
    /// The leader (lowest id at bootstrap).
    pub leader: Option<TaskId>,
    /// This round's members, sorted (this task included).
    pub members: Vec<TaskId>,
    /// Whether this task holds the group's model.
    synced: bool,
    /// Members of the previous round (the leader waits for them).
    previous: Vec<TaskId>,
    /// This task resumes after a restart and waits for a leader that leaves (the
    /// `ring-trainer` role; the hybrid trainer does not).
    pub(crate) resumable: bool,
    /// The membership this round's all-reduce belongs to (the leader draws one per
    /// membership, so chunks of a broken all-reduce never count in the next one).
    epoch: u64,
    /// The other members and their runs (end instances) when this round's membership was
    /// announced: one that leaves or is restarted breaks the ring.
    watch: Vec<(TaskId, String)>,
    /// The group's model at the start of the round (resumable members: a broken all-reduce
    /// goes back to it).
    start_model: Option<Weights>,
    /// This round's all-reduce broke: the round is redone.
    aborted: bool,
    /// This leader resumed after the last round (it died between saving it and finishing).
    resumed_done: bool,
    pub(crate) outcome: TrainOutcome,
    /// Metrics of the last `evaluate`.
    pub evaluation: BTreeMap<String, f64>,
    /// The model this task ends with (set by `finish`).
    pub(crate) final_model: Option<Weights>,
}

impl RoleCtx for RingCtx {
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

/// The ring all-reduce trainer (see the module docs).
pub struct RingTrainer;

impl Role for RingTrainer {
    type Ctx = RingCtx;
    const KIND: RoleKind = RoleKind::RingTrainer;
    const APP: AppNeed = AppNeed::Trainer;

    fn build(io: TaskIo, app: UserApp) -> Result<RingCtx> {
        let mut ctx = RingCtx::new(io, app.trainer()?)?;
        ctx.resumable = true;
        Ok(ctx)
    }

    fn program(_ctx: &RingCtx) -> Result<Composer<RingCtx>> {
        Ok(program())
    }
}

impl Context for RingCtx {
    fn record_time(&mut self, alias: &str, seconds: f64) {
        self.io.record_time(alias, seconds);
    }

    fn round(&self) -> Option<u64> {
        Some(self.round)
    }
}

impl RingCtx {
    /// A distributed trainer over the task's `io` (one channel must be a self-loop) running
    /// `app`.
    pub fn new(io: TaskIo, app: Box<dyn TrainerApp>) -> Result<RingCtx> {
        let (config, channels) = (&io.config, &io.channels);
        let spec = config.channels.iter().find(|c| c.is_self_loop()).ok_or_else(|| {
            Error::Config(format!(
                "role {:?} has no self-loop channel (pair [{0:?}, {0:?}]) for ring all-reduce",
                config.role
            ))
        })?;
        let channel = channels
            .get(&spec.name)
            .ok_or_else(|| Error::Config(format!("channel {} was not joined", spec.name)))?
            .clone();
        let common = Common::from_config(config)?;
        let h = &config.hyperparameters;
        let rounds = hyper::uint(h, names::ROUNDS, 1, 1)?;
        let expected = hyper::uint(h, names::EXPECTED_TRAINERS, 1, 1)? as usize;
        Ok(RingCtx {
            io,
            app: Arc::new(Mutex::new(app)),
            mailbox: Mailbox { channel, stash: VecDeque::new() },
            common,
            expected,
            rounds,
            round: 0,
            done: false,
            leader: None,
            members: Vec::new(),
            synced: false,
            previous: Vec::new(),
            resumable: false,
            epoch: 0,
            watch: Vec::new(),
            start_model: None,
            aborted: false,
            resumed_done: false,
            outcome: TrainOutcome::default(),
            evaluation: BTreeMap::new(),
            final_model: None,
        })
    }

    fn me(&self) -> &TaskId {
        &self.io.config.task_id
    }

    fn channel(&self) -> &Channel {
        &self.mailbox.channel
    }

    fn is_leader(&self) -> bool {
        self.leader.as_ref() == Some(self.me())
    }

    pub(crate) async fn with_app<T, F>(&self, step: &'static str, f: F) -> Result<T>
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

    async fn send(&self, end: &TaskId, message: Message) -> Result<()> {
        self.channel().send(end, message).await.map_err(peer_left)
    }
}

pub(crate) async fn initialize(ctx: &mut RingCtx) -> Result<()> {
    let config = ctx.io.config.clone();
    ctx.with_app("initialize", move |app| app.initialize(&config)).await
}

pub(crate) async fn load_data(ctx: &mut RingCtx) -> Result<()> {
    ctx.with_app("load_data", |app| app.load_data()).await
}

pub(crate) async fn bootstrap(ctx: &mut RingCtx) -> Result<()> {
    // Restarted: the leader it had, and (if it leads) the group's model and round it saved.
    let saved = if ctx.resumable { ctx.io.resume_state(false).await? } else { None };
    let want = ctx.expected.saturating_sub(1);
    let ends = if want == 0 {
        ctx.channel().ends()
    } else {
        match ctx.channel().await_ends(want, ctx.common.join_timeout).await {
            Ok(ends) => ends,
            Err(fledge_channel::Error::JoinTimeout { .. }) => {
                let ends = ctx.channel().ends();
                tracing::warn!(
                    have = ends.len() + 1,
                    want = ctx.expected,
                    "join timeout; starting with the trainers present"
                );
                ends
            }
            Err(e) => return Err(e.into()),
        }
    };
    let saved_leader = saved.as_ref().and_then(|s| s.selector.get(LEADER)?.as_str());
    let leader = match saved_leader {
        Some(leader) => TaskId::from(leader),
        None => {
            ends.iter().chain(std::iter::once(ctx.me())).min().expect("at least this task").clone()
        }
    };
    tracing::info!(task_id = %ctx.me(), %leader, peers = ends.len(), "ring bootstrap");
    if &leader == ctx.me() {
        // The leader's model is the group's model; everyone present joins through round 0.
        ctx.synced = true;
        ctx.previous = ends;
        if let Some(state) = saved {
            // Resumed: the group goes on from the round this leader saved last. The others
            // say they are ready for the round after the one they have; one that is not
            // at this round is sent this model, as a newcomer is.
            if let Some(record) = state.record {
                let (registry, job) = (ctx.io.registry.clone(), ctx.io.config.job.id.clone());
                tokio::task::spawn_blocking(move || registry.append_metrics(&job, &[record]))
                    .await??;
            }
            let weights = state.global;
            ctx.with_app("set_weights", move |app| app.set_weights(&weights)).await?;
            ctx.round = state.round;
            ctx.done = ctx.round >= ctx.rounds;
            ctx.resumed_done = ctx.done;
            tracing::info!(round = ctx.round, "ring leader resumed from its last saved round");
        }
    }
    // A restarted member that does not lead joins as a newcomer: the leader's model is the
    // group's, whatever this member saved.
    ctx.leader = Some(leader);
    Ok(())
}

/// A member's side of the membership: says it is ready (for the next round, or as a
/// newcomer), takes the group's model when the leader sends it one, and the member list.
/// False when training ended before it could join. A resumable member whose leader leaves,
/// or is restarted, waits for it (`rejoinTimeout`) and says it is ready again.
async fn member_join(ctx: &mut RingCtx, leader: &TaskId) -> Result<bool> {
    'ready: loop {
        let leader_run = vec![(leader.clone(), run_of(ctx.channel(), leader))];
        let asked = if ctx.synced { ctx.round + 1 } else { 0 };
        let sent = ctx.send(leader, Command::Ready.message(asked)).await;
        if ctx.resumable && protocol::parent_left(&sent, leader) {
            protocol::await_parent(ctx.channel(), leader, ctx.common.rejoin_timeout).await?;
            continue 'ready;
        }
        sent?;
        tracing::info!(%leader, asked, leader_run = %leader_run[0].1, "ready sent to the leader");
        loop {
            let want = ctx.round + 1;
            let synced = ctx.synced;
            let got = ctx
                .mailbox
                .take(leader, &leader_run, |m| {
                    (Command::Members.is(m) && m.round == want && synced)
                        || m.kind == Kind::Weights
                        || m.kind == Kind::EndOfTraining
                })
                .await;
            if ctx.resumable && protocol::parent_left(&got, leader) {
                tracing::info!(%leader, "the leader left or restarted while this member waited for it");
                protocol::await_parent(ctx.channel(), leader, ctx.common.rejoin_timeout).await?;
                continue 'ready;
            }
            let m = got?;
            if m.kind == Kind::EndOfTraining {
                if !m.tensors.is_empty() {
                    let weights = tensors_to_weights(&m.tensors)?;
                    ctx.with_app("set_weights", move |app| app.set_weights(&weights)).await?;
                    ctx.round = m.round;
                }
                tracing::info!(task_id = %ctx.me(), round = m.round, "training ended before this trainer could join the round");
                ctx.done = true;
                return Ok(false);
            }
            if m.kind == Kind::Weights {
                let previous = protocol::round_before(leader, &m)?;
                let weights = tensors_to_weights(&m.tensors)?;
                for t in weights.tensors() {
                    protocol::check_finite(
                        leader,
                        &format!("the group's model ({})", t.name()),
                        t.data(),
                    )?;
                }
                ctx.with_app("set_weights", move |app| app.set_weights(&weights)).await?;
                ctx.synced = true;
                ctx.round = previous;
                tracing::info!(task_id = %ctx.me(), round = m.round, "received the group's model");
                continue;
            }
            let members = m
                .meta
                .get(MEMBERS)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).map(TaskId::from).collect::<Vec<_>>())
                .filter(|m| m.contains(ctx.me()))
                .ok_or_else(|| Error::Protocol {
                    peer: leader.clone(),
                    reason: format!(
                        "round {want} member list is missing or leaves this trainer out"
                    ),
                })?;
            ctx.epoch =
                m.meta.get(EPOCH).and_then(Value::as_u64).ok_or_else(|| Error::Protocol {
                    peer: leader.clone(),
                    reason: format!("round {want} member list has no {EPOCH}"),
                })?;
            ctx.members = members;
            ctx.round = want;
            return Ok(true);
        }
    }
}

/// The run (end instance) of `end` on the ring channel as it is now (empty: unknown).
fn run_of(channel: &Channel, end: &TaskId) -> String {
    channel.end_props(end).map(|p| p.instance).unwrap_or_default()
}

/// Sends `message` to the member `end`; one that left meanwhile is skipped with a warning
/// (the all-reduce it was to join breaks, and the round is redone without it).
async fn send_member(ctx: &RingCtx, end: &TaskId, message: Message) -> Result<()> {
    match ctx.send(end, message).await {
        Err(Error::PeerLeft { .. }) if ctx.resumable => {
            tracing::warn!(%end, round = ctx.round, "member left before it was told; skipped");
            Ok(())
        }
        res => res,
    }
}

/// Leader: waits for every previous member's `ready`, admits newcomers with the current
/// weights, and announces the members. Others: say `ready` and wait for the member list.
pub(crate) async fn membership(ctx: &mut RingCtx) -> Result<()> {
    let round = ctx.round + 1;
    ctx.io.metrics = RoundMetrics::start(ctx.io.traffic());
    let leader = ctx.leader.clone().expect("bootstrap sets the leader");
    if ctx.is_leader() {
        let mut waiting: BTreeSet<TaskId> =
            ctx.previous.iter().filter(|e| *e != ctx.me()).cloned().collect();
        let mut ready: BTreeSet<TaskId> = BTreeSet::new();
        let mut newcomers: BTreeSet<TaskId> = BTreeSet::new();
        loop {
            // Newcomers that asked already are admitted without waiting for them.
            let got = ctx.mailbox.poll(|_, m| Command::Ready.is(m)).await?;
            match got {
                Some((end, m)) if m.round == 0 => {
                    waiting.remove(&end);
                    newcomers.insert(end);
                }
                Some((end, m)) if m.round == round => {
                    waiting.remove(&end);
                    ready.insert(end);
                }
                Some((end, m)) if ctx.resumable => {
                    // At another round than the group (this leader or that member was
                    // restarted in between): it is sent the group's model, as a newcomer is.
                    tracing::warn!(%end, got = m.round, round, "member at another round; it gets the group's model");
                    waiting.remove(&end);
                    newcomers.insert(end);
                }
                Some((end, m)) => {
                    tracing::warn!(%end, got = m.round, round, "ready for another round ignored");
                }
                None => {
                    let alive: BTreeSet<TaskId> = ctx.channel().ends().into_iter().collect();
                    for gone in waiting.iter().filter(|e| !alive.contains(*e)) {
                        tracing::warn!(end = %gone, round, "member left before the round; dropped");
                    }
                    waiting.retain(|e| alive.contains(e));
                }
            }
            if waiting.is_empty() {
                break;
            }
        }
        tracing::info!(round, ?ready, ?newcomers, "membership of the round");
        if !newcomers.is_empty() {
            let weights = ctx.with_app("get_weights", |app| app.get_weights()).await?;
            let message = weights_message(Kind::Weights, round, round - 1, &weights)?;
            for end in &newcomers {
                tracing::info!(%end, round, "sending the current model to a joining trainer");
                send_member(ctx, end, message.clone()).await?;
            }
        }
        let mut members: Vec<TaskId> = ready.into_iter().chain(newcomers).collect();
        members.push(ctx.me().clone());
        members.sort();
        let list = Value::from(members.iter().map(|e| Value::from(e.as_str())).collect::<Vec<_>>());
        // JSON-safe (< 2^53) and new for every membership, also across restarts.
        ctx.epoch = rand::random::<u64>() >> 11;
        let message =
            Command::Members.message(round).with_meta(MEMBERS, list).with_meta(EPOCH, ctx.epoch);
        for end in members.iter().filter(|e| *e != ctx.me()) {
            send_member(ctx, end, message.clone()).await?;
        }
        ctx.members = members;
        ctx.round = round;
    } else {
        if !member_join(ctx, &leader).await? {
            return Ok(());
        }
    }
    let me = ctx.me().clone();
    let channel = ctx.channel().clone();
    ctx.watch = ctx
        .members
        .iter()
        .filter(|e| **e != me)
        .map(|e| (e.clone(), run_of(&channel, e)))
        .collect();
    if ctx.resumable {
        ctx.aborted = false;
        ctx.start_model = Some(ctx.with_app("get_weights", |app| app.get_weights()).await?);
    }
    ctx.previous = ctx.members.clone();
    ctx.io.metrics.set("members", ctx.members.len() as f64);
    Ok(())
}

pub(crate) async fn train(ctx: &mut RingCtx) -> Result<()> {
    let round = ctx.round;
    ctx.outcome = ctx.with_app("train", move |app| app.train(round)).await?;
    if ctx.outcome.num_samples == 0 {
        return Err(Error::App {
            step: "train",
            source: anyhow::anyhow!(
                "train returned num_samples = 0; the weighted mean needs the sample count"
            ),
        });
    }
    Ok(())
}

/// `[start, end)` of chunk `c` of `n` over `len` values.
fn chunk_range(len: usize, n: usize, c: usize) -> std::ops::Range<usize> {
    (c * len / n)..((c + 1) * len / n)
}

fn chunk_message(
    round: u64,
    epoch: u64,
    phase: &str,
    step: usize,
    data: &[f32],
) -> Result<Message> {
    let tensor = fledge_channel::Tensor::from_f32(vec![data.len()], data)
        .map_err(|e| Error::Tensors(format!("ring chunk: {e}")))?;
    Ok(Message::new(Kind::Update, round)
        .with_meta(EPOCH, epoch)
        .with_meta("phase", phase)
        .with_meta("step", step as u64)
        .with_tensor("chunk", tensor))
}

/// Ring all-reduce (sum) of `values` over `members` (sorted; this task is `me`).
async fn ring_allreduce(ctx: &mut RingCtx, values: &mut [f32]) -> Result<()> {
    let n = ctx.members.len();
    if n < 2 {
        return Ok(());
    }
    let me = ctx.members.iter().position(|e| e == ctx.me()).expect("members include this task");
    let next = ctx.members[(me + 1) % n].clone();
    let prev = ctx.members[(me + n - 1) % n].clone();
    let (round, epoch) = (ctx.round, ctx.epoch);
    let len = values.len();
    for phase in ["reduce-scatter", "all-gather"] {
        let gather = phase == "all-gather";
        for step in 0..n - 1 {
            // Reduce-scatter sends chunk (me − step), all-gather chunk (me + 1 − step).
            let send_chunk = (me + n + usize::from(gather) - step % n) % n;
            let recv_chunk = (me + 2 * n - 1 + usize::from(gather) - step % n) % n;
            let range = chunk_range(len, n, send_chunk);
            ctx.send(&next, chunk_message(round, epoch, phase, step, &values[range])?).await?;
            let m = ctx
                .mailbox
                .take(&prev, &ctx.watch, |m| {
                    m.kind == Kind::Update
                        && m.round == round
                        && m.meta.get(EPOCH).and_then(Value::as_u64) == Some(epoch)
                        && m.meta.get("phase").and_then(Value::as_str) == Some(phase)
                        && m.meta.get("step").and_then(Value::as_u64) == Some(step as u64)
                })
                .await?;
            let range = chunk_range(len, n, recv_chunk);
            let data = m
                .tensors
                .get("chunk")
                .ok_or_else(|| Error::Protocol {
                    peer: prev.clone(),
                    reason: "ring message without chunk".to_owned(),
                })?
                .to_f32_vec()
                .map_err(|e| Error::Tensors(format!("ring chunk: {e}")))?;
            protocol::check_finite(&prev, &format!("{phase} step {step} chunk"), &data)?;
            if data.len() != range.len() {
                return Err(Error::Protocol {
                    peer: prev.clone(),
                    reason: format!(
                        "{phase} step {step}: chunk of {} values, expected {}",
                        data.len(),
                        range.len()
                    ),
                });
            }
            let target = &mut values[range];
            if gather {
                target.copy_from_slice(&data);
            } else {
                for (t, d) in target.iter_mut().zip(&data) {
                    *t += d;
                }
            }
        }
    }
    Ok(())
}

/// `weights × scale` flattened, with `scale` appended.
fn flatten(weights: &Weights, scale: f32) -> Vec<f32> {
    let mut res = Vec::with_capacity(weights.num_params() + 1);
    for t in weights.tensors() {
        res.extend(t.data().iter().map(|v| v * scale));
    }
    res.push(scale);
    res
}

/// The inverse of [`flatten`] after a sum: divides by the summed scale.
fn unflatten(layout: &Weights, values: &[f32]) -> Result<Weights> {
    let (total, values) = values.split_last().expect("flatten appends the scale");
    if *total <= 0.0 || values.len() != layout.num_params() {
        return Err(Error::Tensors(format!(
            "all-reduce result is malformed (total weight {total})"
        )));
    }
    let mut res = Weights::new();
    let mut at = 0;
    for t in layout.tensors() {
        let data = values[at..at + t.len()].iter().map(|v| v / total).collect();
        at += t.len();
        res.push(Tensor::new(t.name(), t.shape().to_vec(), data)?)?;
    }
    Ok(res)
}

pub(crate) async fn allreduce(ctx: &mut RingCtx) -> Result<()> {
    let local = ctx.with_app("get_weights", |app| app.get_weights()).await?;
    let mut values = flatten(&local, ctx.outcome.num_samples as f32);
    ring_allreduce(ctx, &mut values).await?;
    let mean = unflatten(&local, &values)?;
    ctx.io.metrics.set("numSamples", f64::from(values[values.len() - 1]));
    ctx.with_app("set_weights", move |app| app.set_weights(&mean)).await
}

/// The ring trainer's all-reduce: a member that leaves or is restarted during it breaks the
/// ring, and every member goes back to the round's start (the group's model of the last
/// round, the same at every member) and redoes the round with the members left (a restarted
/// one rejoins as a newcomer, or leads again from its saved state).
async fn allreduce_or_redo(ctx: &mut RingCtx) -> Result<()> {
    match allreduce(ctx).await {
        Err(Error::PeerLeft { peer, .. }) if ctx.resumable => {
            tracing::warn!(%peer, round = ctx.round, "ring broken; redoing the round");
            let start = ctx.start_model.clone().expect("membership keeps the round's start");
            ctx.with_app("set_weights", move |app| app.set_weights(&start)).await?;
            ctx.mailbox.drop_chunks();
            ctx.round -= 1;
            ctx.aborted = true;
            Ok(())
        }
        res => res,
    }
}

pub(crate) async fn evaluate(ctx: &mut RingCtx) -> Result<()> {
    if ctx.aborted {
        return Ok(());
    }
    ctx.evaluation = ctx.with_app("evaluate", |app| app.evaluate()).await?;
    Ok(())
}

/// The round's commit point (resumable members): the group's model, the round, the leader and
/// the record are saved in the task's resume file before the record is kept and reported.
async fn report(ctx: &mut RingCtx) -> Result<()> {
    if ctx.aborted {
        return Ok(());
    }
    let mut metrics = std::mem::take(&mut ctx.io.metrics);
    metrics.set("localSamples", ctx.outcome.num_samples as f64);
    metrics.extend("train_", &ctx.outcome.metrics);
    metrics.extend("", &ctx.evaluation);
    let record = metrics.finish(ctx.me(), &ctx.io.config.role, ctx.round, ctx.io.traffic());
    tracing::info!(task_id = %ctx.me(), round = ctx.round, members = ctx.members.len(), metrics = ?ctx.evaluation, "ring round done");
    if ctx.resumable {
        let global = ctx.with_app("get_weights", |app| app.get_weights()).await?;
        let leader = ctx.leader.as_ref().map_or("", TaskId::as_str);
        let state = ResumeState {
            round: ctx.round,
            model_version: ctx.round,
            global,
            server: None,
            selector: serde_json::json!({ LEADER: leader }),
            record: Some(record.clone()),
            privacy: None,
        };
        let (registry, job, task) =
            (ctx.io.registry.clone(), ctx.io.config.job.id.clone(), ctx.me().clone());
        tokio::task::spawn_blocking(move || registry.save_resume(&job, &task, &state)).await??;
    }
    if ctx.is_leader() {
        let (registry, job, rec) =
            (ctx.io.registry.clone(), ctx.io.config.job.id.clone(), record.clone());
        tokio::task::spawn_blocking(move || registry.append_metrics(&job, &[rec])).await??;
    }
    ctx.io.report(record);
    ctx.done = ctx.round >= ctx.rounds;
    Ok(())
}

async fn finish(ctx: &mut RingCtx) -> Result<()> {
    let weights = ctx.with_app("get_weights", |app| app.get_weights()).await?;
    ctx.final_model = Some(weights.clone());
    if ctx.is_leader() {
        let (registry, job) = (ctx.io.registry.clone(), ctx.io.config.job.id.clone());
        let path =
            tokio::task::spawn_blocking(move || registry.save_final(&job, &weights)).await??;
        tracing::info!(path = %path.display(), "final model saved");
        // Trainers that asked to join too late are told to stop; resumable members that
        // redo the last round get the final model with it.
        let resumable = ctx.resumable;
        let end_of_training = match (&ctx.final_model, resumable) {
            (Some(last), true) => weights_message(Kind::EndOfTraining, ctx.round, ctx.round, last)?,
            _ => Message::new(Kind::EndOfTraining, ctx.round),
        };
        // A leader resumed after the last round: the others are done (and leave) or wait for
        // it, so it answers each one still here, for up to `rejoinTimeout`.
        let until = ctx.resumed_done.then(|| Instant::now() + ctx.common.rejoin_timeout);
        let mut answered = BTreeSet::new();
        loop {
            let got = ctx
                .mailbox
                .poll(|_, m| Command::Ready.is(m) && (m.round == 0 || resumable))
                .await?;
            if let Some((end, _)) = got {
                let _ = ctx.send(&end, end_of_training.clone()).await;
                answered.insert(end);
                continue;
            }
            let unanswered = ctx.channel().ends().iter().any(|e| !answered.contains(e));
            if !until.is_some_and(|at| unanswered && Instant::now() < at) {
                break;
            }
        }
    }
    Ok(())
}

/// The distributed trainer program.
pub fn program() -> Composer<RingCtx> {
    Composer::new()
        .tasklet("initialize", async_tasklet(|c| boxed(initialize(c))))
        .tasklet("load_data", async_tasklet(|c| boxed(load_data(c))))
        .tasklet("bootstrap", async_tasklet(|c| boxed(bootstrap(c))))
        .loop_until(
            "rounds",
            |c: &RingCtx| c.done,
            Composer::new()
                .tasklet("membership", async_tasklet(|c| boxed(membership(c))))
                .tasklet("train", async_tasklet(|c| boxed(train(c))))
                .tasklet("allreduce", async_tasklet(|c| boxed(allreduce_or_redo(c))))
                .tasklet("evaluate", async_tasklet(|c| boxed(evaluate(c))))
                .tasklet("report", async_tasklet(|c| boxed(report(c)))),
        )
        .tasklet("finish", async_tasklet(|c| boxed(finish(c))))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use fledge_channel::{BackendEnv, LocalHub};
    use fledge_types::{ChannelSpec, DatasetRef, GroupBy};

    use super::*;
    use crate::app::AppFactory;
    use crate::plan::JobPlan;
    use crate::role::{RunOptions, RunSummary, run};
    use fledge_types::TaskConfig;

    /// Exact toy app. Dataset url `target:num_samples[:w0]`; each round pulls the weight
    /// halfway to the target; `trained` counts rounds trained by every app of a factory.
    pub(crate) struct MeanApp {
        w: f32,
        target: f32,
        n: u64,
        trained: Arc<AtomicU64>,
    }

    impl TrainerApp for MeanApp {
        fn initialize(&mut self, config: &TaskConfig) -> anyhow::Result<()> {
            let url = &config.dataset.as_ref().expect("trainers have a dataset").url;
            let parts: Vec<&str> = url.split(':').collect();
            self.target = parts[0].parse()?;
            self.n = parts[1].parse()?;
            self.w = parts.get(2).map(|v| v.parse()).transpose()?.unwrap_or(0.0);
            Ok(())
        }
        fn load_data(&mut self) -> anyhow::Result<()> {
            Ok(())
        }
        fn train(&mut self, _round: u64) -> anyhow::Result<TrainOutcome> {
            self.w += 0.5 * (self.target - self.w);
            self.trained.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(50));
            Ok(TrainOutcome { num_samples: self.n, metrics: BTreeMap::new() })
        }
        fn evaluate(&mut self) -> anyhow::Result<BTreeMap<String, f64>> {
            Ok(BTreeMap::from([("w".to_owned(), f64::from(self.w))]))
        }
        fn get_weights(&self) -> anyhow::Result<Weights> {
            Ok(Weights::from_tensors(vec![Tensor::new("w", vec![1], vec![self.w])?])?)
        }
        fn set_weights(&mut self, weights: &Weights) -> anyhow::Result<()> {
            self.w = weights.get("w").expect("w").data()[0];
            Ok(())
        }
    }

    /// Builds [`MeanApp`]s sharing one round counter.
    #[derive(Default)]
    pub(crate) struct MeanFactory {
        pub(crate) trained: Arc<AtomicU64>,
    }

    impl AppFactory for MeanFactory {
        fn trainer(&self, _config: &TaskConfig) -> anyhow::Result<Box<dyn TrainerApp>> {
            Ok(Box::new(MeanApp { w: 0.0, target: 0.0, n: 0, trained: self.trained.clone() }))
        }
    }

    /// Ring trainer configs over a self-loop channel, one per dataset url.
    fn ring_configs(job: &str, datasets: &[&str], h: serde_json::Value) -> Vec<TaskConfig> {
        let plan = JobPlan::local(job, datasets.iter().map(|d| d.to_string()).collect());
        let ring = ChannelSpec {
            name: "ring-channel".to_owned(),
            description: String::new(),
            pair: vec!["trainer".to_owned(), "trainer".to_owned()],
            group_by: Some(GroupBy { kind: "tag".to_owned(), value: vec!["default".to_owned()] }),
            func_tags: BTreeMap::from([("trainer".to_owned(), vec!["ring_allreduce".to_owned()])]),
            backend: None,
            broker_host: None,
        };
        let configs = plan.configs().expect("configs");
        configs
            .into_iter()
            .filter(|c| c.role == "trainer")
            .map(|mut c| {
                c.channels = vec![ring.clone()];
                c.group_association =
                    BTreeMap::from([("ring-channel".to_owned(), "default".to_owned())]);
                c.hyperparameters = h.as_object().cloned().expect("object");
                let url = c.dataset.as_ref().map(|d| d.url.clone()).expect("dataset");
                c.dataset = Some(DatasetRef { url, ..c.dataset.clone().expect("dataset") });
                c
            })
            .collect()
    }

    #[tokio::test]
    async fn the_mailbox_holds_at_most_a_queue_of_messages_per_peer() {
        let opts = fledge_channel::ChannelOptions::new("j", "ring", "g", "t0", "r", "r");
        let channel = Channel::open(opts, fledge_channel::Backend::Local(LocalHub::new()))
            .await
            .expect("open");
        let mut mailbox = Mailbox { channel, stash: VecDeque::new() };
        let (peer, other) = (TaskId::from("t1"), TaskId::from("t2"));
        for round in 0..MAILBOX_PER_PEER as u64 {
            mailbox.stash((peer.clone(), Message::new(Kind::Update, round))).expect("within");
        }
        mailbox.stash((other, Message::new(Kind::Update, 0))).expect("each peer has its bound");
        let err = mailbox.stash((peer, Message::new(Kind::Update, 99))).unwrap_err().to_string();
        assert!(err.contains("t1") && err.contains("at most 64"), "{err}");
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
    async fn ring_averages_exactly_and_a_late_joiner_starts_from_the_group_model() {
        let dir = tempfile::tempdir().expect("tmp");
        let hub = LocalHub::new();
        let factory = Arc::new(MeanFactory::default());
        // Trainer 2 would start from w = 100 if it trained on its own weights.
        let mut configs = ring_configs(
            "ring",
            &["1:10", "3:10", "8:20:100"],
            serde_json::json!({"rounds": 6, "expectedTrainers": 2, "joinTimeout": 20}),
        );
        let late = configs.pop().expect("three configs");
        let mut set = tokio::task::JoinSet::new();
        for config in configs {
            let (factory, opts) = (factory.clone(), opts(&hub, dir.path()));
            set.spawn(async move { run::<RingTrainer>(config, factory, opts).await });
        }
        // Join once the first two have trained two rounds each.
        while factory.trained.load(Ordering::SeqCst) < 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let late_run =
            tokio::spawn(run::<RingTrainer>(late, factory.clone(), opts(&hub, dir.path())));
        let mut runs: Vec<RunSummary> = Vec::new();
        while let Some(res) = set.join_next().await {
            runs.push(res.expect("join").expect("early trainer runs"));
        }
        let late_run = late_run.await.expect("join").expect("late trainer runs");
        let first = late_run.history.first().expect("the late trainer trained").round;
        assert!((3..=6).contains(&first), "late trainer's first round {first}");
        assert_eq!(late_run.history.len() as u64, 7 - first);
        // The exact group model: halfway to the members' weighted mean target each round.
        let mut w = 0.0f32;
        for round in 1..=6 {
            let target =
                if round < first { (10.0 + 30.0) / 20.0 } else { (10.0 + 30.0 + 160.0) / 40.0 };
            w += 0.5 * (target - w);
        }
        for r in runs.iter().chain(std::iter::once(&late_run)) {
            assert_eq!(r.rounds, 6);
            let got = r.final_model.as_ref().expect("final").get("w").expect("w").data()[0];
            assert!((got - w).abs() < 1e-4, "got {got}, want {w}");
        }
        let members: Vec<f64> = runs[0].history.iter().map(|h| h.metrics["members"]).collect();
        assert_eq!(members.iter().filter(|m| **m == 3.0).count() as u64, 7 - first, "{members:?}");
        assert!(dir.path().join("registry/jobs/ring/final.safetensors").is_file());
    }

    /// A member killed (its task aborted: its channel vanishes as in a crash) in the middle of
    /// round 3 and started again under the same id: the ring breaks, the others go back to
    /// the round's start and redo it, and the group ends with exactly the model of a run
    /// without the fault. Once the leader, once another member.
    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn a_restarted_member_or_leader_rejoins_and_the_round_is_redone_exactly() {
        for victim_is_leader in [true, false] {
            let dir = tempfile::tempdir().expect("tmp");
            let hub = LocalHub::new();
            let factory = Arc::new(MeanFactory::default());
            let h = serde_json::json!({"rounds": 6, "expectedTrainers": 3, "joinTimeout": 20,
                "rejoinTimeout": 20});
            let mut configs = ring_configs("ring-resume", &["1:10", "3:10", "8:20"], h);
            configs.sort_by(|a, b| a.task_id.cmp(&b.task_id));
            let victim = configs.remove(if victim_is_leader { 0 } else { 2 });
            let mut set = tokio::task::JoinSet::new();
            for config in configs {
                let (factory, opts) = (factory.clone(), opts(&hub, dir.path()));
                set.spawn(async move { run::<RingTrainer>(config, factory, opts).await });
            }
            let first = tokio::spawn(run::<RingTrainer>(
                victim.clone(),
                factory.clone(),
                opts(&hub, dir.path()),
            ));
            // Two rounds of three trainings, and one of round 3.
            while factory.trained.load(Ordering::SeqCst) < 7 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            first.abort();
            let _ = first.await;
            let again = run::<RingTrainer>(victim, factory.clone(), opts(&hub, dir.path()))
                .await
                .expect("the restarted trainer completes");
            let mut runs = vec![again];
            while let Some(res) = set.join_next().await {
                runs.push(res.expect("join").expect("the others complete"));
            }
            let mut w = 0.0f32;
            for _ in 1..=6 {
                w += 0.5 * ((10.0 + 30.0 + 160.0) / 40.0 - w);
            }
            for r in &runs {
                assert_eq!(r.rounds, 6);
                let got = r.final_model.as_ref().expect("final").get("w").expect("w").data()[0];
                assert!((got - w).abs() < 1e-5, "leader {victim_is_leader}: got {got}, want {w}");
            }
            assert!(
                factory.trained.load(Ordering::SeqCst) > 18,
                "a round was redone (the kill landed in one)"
            );
        }
    }

    #[tokio::test]
    async fn a_role_without_a_self_loop_channel_is_rejected() {
        let dir = tempfile::tempdir().expect("tmp");
        let plan = JobPlan::local("no-ring", vec!["1:1".to_owned()]);
        let config = plan.configs().expect("configs").remove(1);
        let err = run::<RingTrainer>(
            config,
            Arc::new(MeanFactory::default()),
            opts(&LocalHub::new(), dir.path()),
        )
        .await
        .expect_err("no self-loop");
        assert!(err.to_string().contains("self-loop"), "{err}");
    }

    #[test]
    fn chunks_cover_the_vector_once() {
        for (len, n) in [(10, 3), (3, 4), (101, 7)] {
            let mut covered = vec![0; len];
            for c in 0..n {
                for i in chunk_range(len, n, c) {
                    covered[i] += 1;
                }
            }
            assert!(covered.iter().all(|c| *c == 1), "len {len} n {n}");
        }
    }

    #[test]
    fn flatten_and_unflatten_give_the_weighted_mean() {
        let w = |v: Vec<f32>| {
            Weights::from_tensors(vec![
                Tensor::new("a", vec![2], v[..2].to_vec()).expect("t"),
                Tensor::new("b", vec![1], v[2..].to_vec()).expect("t"),
            ])
            .expect("w")
        };
        let (x, y) = (w(vec![1.0, 2.0, 3.0]), w(vec![5.0, 6.0, 7.0]));
        let sum: Vec<f32> =
            flatten(&x, 1.0).iter().zip(flatten(&y, 3.0)).map(|(a, b)| a + b).collect();
        let mean = unflatten(&x, &sum).expect("mean");
        assert_eq!(mean, w(vec![4.0, 5.0, 6.0]));
        assert!(unflatten(&x, &[1.0, 0.0]).is_err());
    }
}
