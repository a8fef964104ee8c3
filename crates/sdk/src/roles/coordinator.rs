//! The coordinator of coordinated hierarchical FL (built-in name `coordinator`): each round
//! it assigns the live trainers to the live middle aggregators and tells the top aggregator
//! which middle aggregators are active.
//!
//! Program ([`program`]):
//!
//! ```text
//! load_state, await_members,
//! loop rounds until the top ends the job { await_request, assign, commit, notify },
//! finish
//! ```
//!
//! The coordinator talks to each role on its own channel, found by function tag:
//! `coordinateWithTopAgg`, `coordinateWithMidAgg` and `coordinateWithTrainer` (the other
//! roles carry `coordinate` on theirs). Per round r:
//!
//! | from → to | kind | round | meta |
//! |---|---|---|---|
//! | top → coordinator | `Control` | r | `command: "plan"` |
//! | coordinator → each live middle aggregator | `Control` | r | `command: "assign"`, `trainers: [ids]` (empty: idle this round) |
//! | coordinator → each live trainer | `Control` | r | `command: "assign"`, `aggregator: id` (null: idle this round) |
//! | coordinator → top | `Control` | r | `command: "plan"`, `active: [middle aggregator ids]` |
//! | top → coordinator, then coordinator → everyone | `EndOfTraining` | last | |
//!
//! **Assignment** ([`assign`], a pure function). Only ends that are live on the
//! coordinator's channels count, so a middle aggregator that died (its end left; over MQTT
//! after the liveness timeout) gets no trainers in the next round and its trainers move to
//! the others: the job goes on as long as one middle aggregator of each trainer's group is
//! alive. Trainers and middle aggregators announce their aggregation group (the channel
//! and group that link them, end property [`GROUP_PROP`]); a trainer is only assigned to a
//! middle aggregator of its group, so replicas of a middle aggregator share the trainers of
//! their group. Within a group the load is balanced (sizes differ by at most one) and
//! sticky: a trainer stays with its previous middle aggregator while that one is alive and
//! not over its share.
//!
//! **Resume.** `commit` saves the round's assignment, round number and record in the task's
//! resume file ([`crate::registry::ResumeState`], no model) before anyone is told of it, then
//! reports the record. A coordinator redeployed under the same id (`load_state`) goes on from
//! there: a plan request for the round it saved last (the top asks again, since the failed
//! run may have died before answering) is answered with the saved assignment, unrecorded, and
//! the next round is assigned stickily from it, so trainers stay where they were. The other
//! roles reattach: they wait `rejoinTimeout` for a coordinator that left, and the top asks a
//! restarted one for its plan again. Middle aggregators and trainers ignore an assignment for
//! a round they already have, which a replay sends again (it is the same one). The coordinator
//! waits the same way for a top aggregator that left (the top resumes too).
//!
//! Hyperparameters: `expectedTrainers` and `expectedMiddleAggregators` (ends to wait for,
//! up to `joinTimeout`, before the first round; default 1 each).

use std::collections::BTreeMap;
use std::time::Duration;

use fledge_channel::{Channel, Kind, Message};
use fledge_types::{TaskConfig, TaskId};
use serde_json::Value;
use tokio::time::Instant;

use crate::app::{AppNeed, UserApp};
use crate::composer::{Composer, Context, async_tasklet, boxed};
use crate::hyper::{self, names};
use crate::protocol::{Command, await_parent, parent_left, peer_left};
use crate::registry::ResumeState;
use crate::role::{Role, RoleCtx, RunOptions, TaskIo};
use crate::roles::{Common, RoleKind};
use crate::{Error, Result};

/// The built-in name of the coordinator.
pub const BUILTIN_NAME: &str = "coordinator";

/// Function tags of coordinated hierarchical FL.
pub mod tags {
    /// The coordinator's side towards the top aggregator.
    pub const WITH_TOP: &str = "coordinateWithTopAgg";
    /// The coordinator's side towards the middle aggregators.
    pub const WITH_MIDDLE: &str = "coordinateWithMidAgg";
    /// The coordinator's side towards the trainers.
    pub const WITH_TRAINER: &str = "coordinateWithTrainer";
    /// The other roles' side towards the coordinator.
    pub const COORDINATE: &str = "coordinate";
}

/// Meta key: the middle aggregators active this round (to the top).
pub const ACTIVE: &str = "active";
/// Meta key: the trainers assigned to a middle aggregator.
pub const TRAINERS: &str = "trainers";
/// Meta key: the middle aggregator a trainer is assigned to.
pub const AGGREGATOR: &str = "aggregator";
/// End property with the aggregation group (`channel/group`) of trainers and middle
/// aggregators.
pub const GROUP_PROP: &str = "aggregationGroup";
/// Hyperparameter: middle aggregators to wait for before the first round (default 1).
pub const EXPECTED_MIDDLE: &str = "expectedMiddleAggregators";

/// How often a waiting coordinator re-checks who is alive.
const POLL: Duration = Duration::from_millis(200);

/// A live end and its aggregation group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its task id.
    pub id: TaskId,
    /// Its aggregation group ([`GROUP_PROP`]).
    pub group: String,
}

/// One round's assignment.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Assignment {
    /// Every live middle aggregator and its trainers, sorted (possibly none).
    pub trainers_of: BTreeMap<TaskId, Vec<TaskId>>,
    /// Trainers without a live middle aggregator in their group, sorted.
    pub unassigned: Vec<TaskId>,
}

impl Assignment {
    /// Trainer → its middle aggregator.
    pub fn aggregator_of(&self) -> BTreeMap<TaskId, TaskId> {
        self.trainers_of
            .iter()
            .flat_map(|(m, ts)| ts.iter().map(move |t| (t.clone(), m.clone())))
            .collect()
    }

    /// The middle aggregators with at least one trainer.
    pub fn active(&self) -> Vec<TaskId> {
        self.trainers_of.iter().filter(|(_, ts)| !ts.is_empty()).map(|(m, _)| m.clone()).collect()
    }
}

/// Assigns `trainers` to `middles` of their group: balanced within each group (sizes differ
/// by at most one) and sticky (a trainer keeps its `previous` middle aggregator while that
/// one is live and within its share). Deterministic: the same input gives the same output.
pub fn assign(
    middles: &[Member],
    trainers: &[Member],
    previous: &BTreeMap<TaskId, TaskId>,
) -> Assignment {
    let mut res = Assignment::default();
    let mut groups: BTreeMap<&str, (Vec<&TaskId>, Vec<&TaskId>)> = BTreeMap::new();
    for m in middles {
        groups.entry(&m.group).or_default().0.push(&m.id);
        res.trainers_of.insert(m.id.clone(), Vec::new());
    }
    for t in trainers {
        groups.entry(&t.group).or_default().1.push(&t.id);
    }
    for (mids, mut ts) in groups.into_values() {
        ts.sort();
        ts.dedup();
        if mids.is_empty() {
            res.unassigned.extend(ts.into_iter().cloned());
            continue;
        }
        let (base, mut extra) = (ts.len() / mids.len(), ts.len() % mids.len());
        // Keep each middle aggregator's previous trainers, up to its share; the largest
        // groups of kept trainers get the `extra` larger shares.
        let mut kept: BTreeMap<&TaskId, Vec<&TaskId>> =
            mids.iter().map(|m| (*m, Vec::new())).collect();
        for t in &ts {
            if let Some(m) = previous.get(*t)
                && let Some(list) = kept.get_mut(m)
            {
                list.push(t);
            }
        }
        let mut by_size: Vec<&TaskId> = kept.keys().copied().collect();
        by_size.sort_by_key(|m| std::cmp::Reverse(kept[m].len()));
        for m in by_size {
            let list = kept.get_mut(m).expect("every middle aggregator has a list");
            let cap = if extra > 0 && list.len() > base {
                extra -= 1;
                base + 1
            } else {
                base
            };
            list.truncate(cap);
        }
        // Everyone not kept (new, over a share, or from a dead middle aggregator), in order.
        let placed: std::collections::BTreeSet<&TaskId> =
            kept.values().flatten().copied().collect();
        let pool: Vec<&TaskId> = ts.iter().copied().filter(|t| !placed.contains(t)).collect();
        // The rest go, in order, to the middle aggregator with the fewest trainers.
        for t in pool {
            let m = *kept
                .iter()
                .min_by_key(|(m, list)| (list.len(), **m))
                .map(|(m, _)| m)
                .expect("a group here has a middle aggregator");
            kept.get_mut(m).expect("chosen from the map").push(t);
        }
        for (m, mut list) in kept {
            list.sort();
            res.trainers_of.insert(m.clone(), list.into_iter().cloned().collect());
        }
    }
    res.unassigned.sort();
    res
}

/// State of a coordinator task.
pub struct CoordinatorCtx {
    /// The task's I/O.
    pub io: TaskIo,
    common: Common,
    top: Channel,
    middles: Channel,
    trainers: Channel,
    top_end: Option<TaskId>,
    expected_trainers: usize,
    expected_middles: usize,
    /// The round being planned (the top's round number); between rounds, the last one
    /// committed.
    pub round: u64,
    /// The top ended the job.
    pub done: bool,
    /// The current assignment.
    pub assignment: Assignment,
    /// This round was committed already (the top asked again after a restart): it is sent
    /// again as saved, neither reassigned nor recorded.
    replay: bool,
}

impl Context for CoordinatorCtx {
    fn record_time(&mut self, alias: &str, seconds: f64) {
        self.io.record_time(alias, seconds);
    }
}

impl RoleCtx for CoordinatorCtx {
    fn io(&mut self) -> &mut TaskIo {
        &mut self.io
    }
}

/// The coordinator (see the module docs). Its rounds are the rounds it planned.
pub struct Coordinator;

impl Role for Coordinator {
    type Ctx = CoordinatorCtx;
    const KIND: RoleKind = RoleKind::Coordinator;
    const APP: AppNeed = AppNeed::None;

    fn build(io: TaskIo, _app: UserApp) -> Result<CoordinatorCtx> {
        CoordinatorCtx::new(io)
    }

    fn program(_ctx: &CoordinatorCtx) -> Result<Composer<CoordinatorCtx>> {
        Ok(program())
    }
}

impl CoordinatorCtx {
    /// A coordinator over the task's `io`.
    pub fn new(io: TaskIo) -> Result<CoordinatorCtx> {
        let (config, channels) = (&io.config, &io.channels);
        let common = Common::from_config(config)?;
        let h = &config.hyperparameters;
        let min = hyper::uint(h, names::MIN_TRAINERS, 1, 1)?;
        let expected_trainers = hyper::uint(h, names::EXPECTED_TRAINERS, min, 1)? as usize;
        let expected_middles = hyper::uint(h, EXPECTED_MIDDLE, 1, 1)? as usize;
        let top = channels.by_tag(tags::WITH_TOP)?.clone();
        let middles = channels.by_tag(tags::WITH_MIDDLE)?.clone();
        let trainers = channels.by_tag(tags::WITH_TRAINER)?.clone();
        Ok(CoordinatorCtx {
            io,
            common,
            top,
            middles,
            trainers,
            top_end: None,
            expected_trainers,
            expected_middles,
            round: 0,
            done: false,
            assignment: Assignment::default(),
            replay: false,
        })
    }

    fn top_end(&self) -> Result<TaskId> {
        self.top_end
            .clone()
            .ok_or_else(|| Error::Config("no top aggregator joined the coordinator".to_owned()))
    }
}

/// The live ends of `channel` with their aggregation groups.
fn members(channel: &Channel) -> Vec<Member> {
    channel
        .ends()
        .into_iter()
        .map(|id| {
            let group = channel
                .end_props(&id)
                .and_then(|p| p.props.get(GROUP_PROP).and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_else(|| fledge_types::DEFAULT_GROUP.to_owned());
            Member { id, group }
        })
        .collect()
}

/// Waits up to `timeout` for `n` ends on `channel`; at least one is required.
async fn await_some(channel: &Channel, n: usize, timeout: Duration) -> Result<usize> {
    match channel.await_ends(n, timeout).await {
        Ok(ends) => Ok(ends.len()),
        Err(fledge_channel::Error::JoinTimeout { .. }) if !channel.ends().is_empty() => {
            let have = channel.ends().len();
            tracing::warn!(
                channel = channel.name(),
                have,
                want = n,
                "join timeout; going on with the ends present"
            );
            Ok(have)
        }
        Err(e) => Err(e.into()),
    }
}

async fn await_members(ctx: &mut CoordinatorCtx) -> Result<()> {
    let timeout = ctx.common.join_timeout;
    ctx.top_end = ctx.top.await_join(timeout).await?.into_iter().next();
    let middles = await_some(&ctx.middles, ctx.expected_middles, timeout).await?;
    let trainers = await_some(&ctx.trainers, ctx.expected_trainers, timeout).await?;
    tracing::info!(task_id = %ctx.io.config.task_id, middles, trainers, "coordinator ready");
    Ok(())
}

/// Goes on from the state saved after the last committed round, if this task ran before.
async fn load_state(ctx: &mut CoordinatorCtx) -> Result<()> {
    // The coordinator keeps its records with the control plane only, not in the registry.
    let Some(state) = ctx.io.resume_state(false).await? else {
        return Ok(());
    };
    ctx.assignment = serde_json::from_value(state.selector).map_err(|e| {
        Error::Config(format!("the coordinator's saved assignment is unreadable: {e}"))
    })?;
    ctx.round = state.round;
    tracing::info!(round = ctx.round, assignment = ?ctx.assignment.trainers_of, "coordinator resumed");
    Ok(())
}

async fn await_request(ctx: &mut CoordinatorCtx) -> Result<()> {
    let top = ctx.top_end()?;
    loop {
        let received = ctx.top.recv(&top).await.map_err(peer_left);
        if parent_left(&received, &top) {
            // The top aggregator is restarted and resumes; it asks again.
            await_parent(&ctx.top, &top, ctx.common.rejoin_timeout).await?;
            continue;
        }
        let message = received?;
        match message.kind {
            Kind::Control if Command::Plan.is(&message) && message.round > ctx.round => {
                ctx.round = message.round;
                ctx.replay = false;
                ctx.io.start_round();
                return Ok(());
            }
            Kind::Control
                if Command::Plan.is(&message) && message.round == ctx.round && ctx.round > 0 =>
            {
                tracing::info!(round = ctx.round, "plan asked again; sending the committed one");
                ctx.replay = true;
                return Ok(());
            }
            Kind::EndOfTraining => {
                ctx.done = true;
                return Ok(());
            }
            other => {
                tracing::warn!(kind = ?other, "unexpected message from the top aggregator ignored")
            }
        }
    }
}

async fn assign_round(ctx: &mut CoordinatorCtx) -> Result<()> {
    if ctx.replay {
        return Ok(());
    }
    let since = Instant::now();
    let (middles, trainers) = loop {
        let (middles, trainers) = (members(&ctx.middles), members(&ctx.trainers));
        let next = assign(&middles, &trainers, &ctx.assignment.aggregator_of());
        if !next.active().is_empty() {
            break (middles, trainers);
        }
        if since.elapsed() > ctx.common.join_timeout {
            return Err(Error::Quorum { round: ctx.round, got: 0, need: 1 });
        }
        tracing::warn!(
            round = ctx.round,
            middles = middles.len(),
            trainers = trainers.len(),
            "no trainer can be assigned; waiting"
        );
        tokio::time::sleep(POLL).await;
    };
    let previous = ctx.assignment.aggregator_of();
    let next = assign(&middles, &trainers, &previous);
    let moved = next
        .aggregator_of()
        .iter()
        .filter(|(t, m)| previous.get(*t).is_some_and(|old| old != *m))
        .count();
    let m = &mut ctx.io.metrics;
    m.set("middleAggregatorsAlive", middles.len() as f64);
    m.set("middleAggregatorsActive", next.active().len() as f64);
    m.set("trainersAlive", trainers.len() as f64);
    m.set("trainersUnassigned", next.unassigned.len() as f64);
    m.set("trainersReassigned", moved as f64);
    tracing::info!(round = ctx.round, assignment = ?next.trainers_of, "trainers assigned");
    ctx.assignment = next;
    Ok(())
}

/// Sends `message` to `end`; an end that left in the meantime is skipped with a warning.
async fn send_or_skip(channel: &Channel, end: &TaskId, message: Message) -> Result<()> {
    match channel.send(end, message).await {
        Ok(()) => Ok(()),
        Err(fledge_channel::Error::UnknownEnd { .. }) => {
            tracing::warn!(%end, channel = channel.name(), "end left before it was told; skipped");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

async fn notify(ctx: &mut CoordinatorCtx) -> Result<()> {
    let round = ctx.round;
    let ids =
        |v: &[TaskId]| Value::from(v.iter().map(|t| t.as_str().to_owned()).collect::<Vec<_>>());
    for (middle, trainers) in &ctx.assignment.trainers_of {
        let message = Command::Assign.message(round).with_meta(TRAINERS, ids(trainers));
        send_or_skip(&ctx.middles, middle, message).await?;
    }
    let aggregator_of = ctx.assignment.aggregator_of();
    for trainer in ctx.trainers.ends() {
        let aggregator =
            aggregator_of.get(&trainer).map_or(Value::Null, |m| Value::from(m.as_str()));
        let message = Command::Assign.message(round).with_meta(AGGREGATOR, aggregator);
        send_or_skip(&ctx.trainers, &trainer, message).await?;
    }
    let plan = Command::Plan.message(round).with_meta(ACTIVE, ids(&ctx.assignment.active()));
    let top = ctx.top_end()?;
    // A top aggregator that left is restarted and asks for this plan again.
    send_or_skip(&ctx.top, &top, plan).await
}

/// The round's commit point: its assignment, number and record are saved before anyone is
/// told of it (a restart before this assigns the round again; after it, sends it again as
/// saved), then the record is reported.
async fn commit(ctx: &mut CoordinatorCtx) -> Result<()> {
    if ctx.replay {
        return Ok(());
    }
    let io = &mut ctx.io;
    let record = std::mem::take(&mut io.metrics).finish(
        &io.config.task_id,
        &io.config.role,
        ctx.round,
        io.traffic(),
    );
    let selector = serde_json::to_value(&ctx.assignment)
        .map_err(|e| Error::Config(format!("assignment not serialisable: {e}")))?;
    let state = ResumeState {
        round: ctx.round,
        model_version: ctx.round,
        global: fledge_algorithms::Weights::new(),
        server: None,
        selector,
        record: Some(record.clone()),
        privacy: None,
    };
    let (registry, job, task) =
        (io.registry.clone(), io.config.job.id.clone(), io.config.task_id.clone());
    tokio::task::spawn_blocking(move || registry.save_resume(&job, &task, &state)).await??;
    io.report(record);
    Ok(())
}

async fn finish(ctx: &mut CoordinatorCtx) -> Result<()> {
    let end = Message::new(Kind::EndOfTraining, ctx.round);
    for channel in [&ctx.middles, &ctx.trainers] {
        for peer in channel.ends() {
            send_or_skip(channel, &peer, end.clone()).await?;
        }
    }
    Ok(())
}

/// The coordinator program.
pub fn program() -> Composer<CoordinatorCtx> {
    Composer::new()
        .tasklet("load_state", async_tasklet(|c| boxed(load_state(c))))
        .tasklet("await_members", async_tasklet(|c| boxed(await_members(c))))
        .loop_until(
            "rounds",
            |c: &CoordinatorCtx| c.done,
            Composer::new()
                .tasklet("await_request", async_tasklet(|c| boxed(await_request(c))))
                .tasklet("assign", async_tasklet(|c| boxed(assign_round(c))))
                .tasklet("commit", async_tasklet(|c| boxed(commit(c))))
                .tasklet("notify", async_tasklet(|c| boxed(notify(c)))),
        )
        .tasklet("finish", async_tasklet(|c| boxed(finish(c))))
}

/// Sets the aggregation group end property of a trainer (`tag` = `fetch`) or middle
/// aggregator (`tag` = `distribute`) from the channel that links them.
pub(crate) fn announce_group(config: &TaskConfig, tag: &str, opts: &mut RunOptions) {
    if let Some(spec) = config.channels_with_tag(tag).next() {
        let group = format!("{}/{}", spec.name, config.group_of(&spec.name));
        opts.backend_env.props.insert(GROUP_PROP.to_owned(), Value::from(group));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, group: &str) -> Member {
        Member { id: id.into(), group: group.to_owned() }
    }

    fn sizes(a: &Assignment) -> Vec<usize> {
        a.trainers_of.values().map(Vec::len).collect()
    }

    #[test]
    fn balances_within_groups_and_leaves_groups_without_aggregator_unassigned() {
        let middles = [m("m1", "g"), m("m2", "g"), m("m3", "h")];
        let trainers: Vec<Member> = ["t1", "t2", "t3", "t4", "t5"]
            .into_iter()
            .map(|t| m(t, "g"))
            .chain([m("u1", "h"), m("x1", "lonely")])
            .collect();
        let a = assign(&middles, &trainers, &BTreeMap::new());
        assert_eq!(a.trainers_of[&TaskId::from("m1")], ["t1", "t3", "t5"].map(TaskId::from));
        assert_eq!(a.trainers_of[&TaskId::from("m2")], ["t2", "t4"].map(TaskId::from));
        assert_eq!(a.trainers_of[&TaskId::from("m3")], [TaskId::from("u1")]);
        assert_eq!(a.unassigned, [TaskId::from("x1")]);
        assert_eq!(a.active().len(), 3);
        assert_eq!(assign(&middles, &trainers, &BTreeMap::new()), a, "deterministic");
        // More middle aggregators than trainers: some are idle, none is listed active.
        let a = assign(&middles[..2], &[m("t1", "g")], &BTreeMap::new());
        assert_eq!(sizes(&a), [1, 0]);
        assert_eq!(a.active(), [TaskId::from("m1")]);
    }

    #[test]
    fn a_dead_middle_aggregators_trainers_move_and_the_others_stay() {
        let trainers: Vec<Member> =
            ["t1", "t2", "t3", "t4", "t5", "t6"].into_iter().map(|t| m(t, "g")).collect();
        let all = [m("m1", "g"), m("m2", "g"), m("m3", "g")];
        let first = assign(&all, &trainers, &BTreeMap::new());
        assert_eq!(sizes(&first), [2, 2, 2]);
        // m2 dies: its two trainers go to m1 and m3, nobody else moves.
        let survivors = [m("m1", "g"), m("m3", "g")];
        let second = assign(&survivors, &trainers, &first.aggregator_of());
        assert_eq!(sizes(&second), [3, 3]);
        let (before, after) = (first.aggregator_of(), second.aggregator_of());
        for (t, old) in &before {
            if old.as_str() != "m2" {
                assert_eq!(&after[t], old, "{t} moved without need");
            }
        }
        // A trainer dies and a new middle aggregator joins: the load evens out again, and
        // the largest kept groups are trimmed to the share.
        let fewer = &trainers[..5];
        let third = assign(&all, fewer, &second.aggregator_of());
        let mut s = sizes(&third);
        s.sort();
        assert_eq!(s, [1, 2, 2]);
        assert_eq!(third.aggregator_of().len(), 5);
        // No live middle aggregator at all: everyone is unassigned.
        let none = assign(&[], &trainers, &third.aggregator_of());
        assert!(none.active().is_empty() && none.unassigned.len() == 6);
    }
}
