//! Coordinated hierarchical FL: the standard synchronous top aggregator, middle aggregator
//! and trainer programs, each edited by alias to follow the [`crate::roles::coordinator`].
//!
//! Top aggregator ([`top_program`], built-in `coordinated-top-aggregator`):
//!
//! ```text
//! load_state, await_coordinator,
//! loop rounds { select, coordinate, init_model, distribute, aggregate, evaluate, checkpoint, report },
//! end_coordination, finish
//! ```
//!
//! `coordinate` asks the coordinator for the round's plan and selects exactly the middle
//! aggregators it names active. The initial model is requested in the first round, after
//! the plan, from an active middle aggregator, which asks one of its assigned trainers.
//! `end_coordination` tells the coordinator the job is over.
//!
//! Middle aggregator ([`middle_program`], built-in `coordinated-middle-aggregator`):
//!
//! ```text
//! join_up, await_coordinator,
//! loop rounds until end { assignment, fetch*, select*, apply_assignment*, distribute*, aggregate*, upload*, report* },
//! finish
//! ```
//!
//! `assignment` waits for the coordinator's list of trainers for the next round; with none,
//! the starred steps are skipped (the top does not expect this middle aggregator). With
//! trainers assigned but none of them alive any more, it still answers the top, with zero
//! samples, which the top discards.
//!
//! Trainer ([`trainer_program`], built-in `coordinated-trainer`): the
//! [`crate::roles::follow`] program whose `pick` waits for the coordinator's assignment. If
//! its middle aggregator dies during a round, the round is abandoned and the coordinator
//! assigns the trainer elsewhere in the next one. Training ends with the coordinator's
//! end-of-training, so coordinated trainers do not receive the final model (it is in the
//! registry).
//!
//! Failures: a dead trainer or middle aggregator is dropped from the round it dies in (the
//! synchronous aggregators' liveness rule) and left out of the next plan. The coordinator and
//! the top aggregator resume from their last committed round when the controller restarts
//! them; the others wait up to `rejoinTimeout` for a coordinator that left, and the top asks
//! a coordinator that left or restarted since it asked for the round's plan again (see
//! [`crate::roles::coordinator`], "Resume").

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fledge_channel::{Channel, Kind, Message};
use fledge_types::{TaskConfig, TaskId};
use serde_json::Value;
use tokio::time::Instant;

use crate::app::{AppNeed, UserApp};
use crate::composer::{Composer, TaskletFn};
use crate::protocol::{Command, await_parent, parent_left, peer_left};
use crate::role::{Role, RunOptions, TaskIo};
use crate::roles::aggregator::{self, AggregatorCtx, Tier};
use crate::roles::coordinator::{ACTIVE, AGGREGATOR, TRAINERS, announce_group, tags as coord_tags};
use crate::roles::follow;
use crate::roles::trainer::TrainerCtx;
use crate::roles::{Common, RoleKind, tags};
use crate::{Error, Result};

/// The built-in name of the coordinated top aggregator.
pub const TOP_BUILTIN_NAME: &str = "coordinated-top-aggregator";
/// The built-in name of the coordinated middle aggregator.
pub const MIDDLE_BUILTIN_NAME: &str = "coordinated-middle-aggregator";
/// The built-in name of the coordinated trainer.
pub const TRAINER_BUILTIN_NAME: &str = "coordinated-trainer";

/// How often a role waiting for peers to show up looks again.
const POLL: Duration = Duration::from_millis(100);

/// Who the coordinator is, learnt on first contact.
#[derive(Clone)]
struct Coordinator {
    channel: Channel,
    end: Arc<Mutex<Option<TaskId>>>,
    join_timeout: Duration,
    /// How long to wait for a coordinator that left to come back (restarted, it resumes).
    rejoin_timeout: Duration,
}

impl Coordinator {
    fn new(channel: Channel, common: Common) -> Coordinator {
        Coordinator {
            channel,
            end: Arc::new(Mutex::new(None)),
            join_timeout: common.join_timeout,
            rejoin_timeout: common.rejoin_timeout,
        }
    }

    async fn end(&self) -> Result<TaskId> {
        if let Some(end) = self.end.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(end);
        }
        let end = self
            .channel
            .await_join(self.join_timeout)
            .await?
            .into_iter()
            .next()
            .expect("await_join returns at least one end");
        *self.end.lock().unwrap_or_else(|e| e.into_inner()) = Some(end.clone());
        Ok(end)
    }

    /// The coordinator's next message. A coordinator that leaves is waited for up to
    /// `rejoinTimeout` (the controller restarts it and it resumes), then it is an error.
    async fn recv(&self) -> Result<Message> {
        let end = self.end().await?;
        loop {
            let received = self.channel.recv(&end).await.map_err(peer_left);
            if parent_left(&received, &end) {
                await_parent(&self.channel, &end, self.rejoin_timeout).await?;
                continue;
            }
            return received;
        }
    }

    /// Sends `message`, waiting for a coordinator that left to come back first.
    async fn send(&self, message: Message) -> Result<()> {
        let end = self.end().await?;
        loop {
            let sent = self.channel.send(&end, message.clone()).await.map_err(peer_left);
            if parent_left(&sent, &end) {
                await_parent(&self.channel, &end, self.rejoin_timeout).await?;
                continue;
            }
            return sent;
        }
    }

    /// The coordinator's plan for `round`: the middle aggregators it names active. A
    /// coordinator that leaves, or restarts, before it answers is asked again once it is
    /// back: the restarted one has resumed and answers a round it committed as saved.
    async fn plan(&self, round: u64) -> Result<Vec<TaskId>> {
        let end = self.end().await?;
        'ask: loop {
            self.send(Command::Plan.message(round)).await?;
            loop {
                let received = match tokio::time::timeout(POLL, self.channel.recv(&end)).await {
                    Ok(received) => received.map_err(peer_left),
                    Err(_) if self.channel.can_answer(&end) => continue,
                    Err(_) => {
                        tracing::warn!(%end, round, "coordinator restarted before it answered; asking again");
                        await_parent(&self.channel, &end, self.rejoin_timeout).await?;
                        continue 'ask;
                    }
                };
                if parent_left(&received, &end) {
                    await_parent(&self.channel, &end, self.rejoin_timeout).await?;
                    continue 'ask;
                }
                let message = received?;
                if Command::Plan.is(&message) && message.round == round {
                    return Ok(ids(&message, ACTIVE));
                }
                tracing::warn!(kind = ?message.kind, got = message.round, round, "unexpected message from the coordinator ignored");
            }
        }
    }
}

fn ids(message: &Message, key: &str) -> Vec<TaskId> {
    message
        .meta
        .get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(TaskId::from).collect())
        .unwrap_or_default()
}

/// How long to wait for peers named by the coordinator: in the first round they may still
/// be joining; later, one that is missing has left.
fn grace(round: u64, join_timeout: Duration) -> Duration {
    if round <= 1 { join_timeout } else { Duration::ZERO }
}

/// Those of `wanted` that are (or become, within `timeout`) ends of `channel`.
async fn present(channel: &Channel, wanted: &[TaskId], timeout: Duration) -> Vec<TaskId> {
    let since = Instant::now();
    loop {
        let ends = channel.ends();
        let here: Vec<TaskId> = wanted.iter().filter(|w| ends.contains(w)).cloned().collect();
        if here.len() == wanted.len() || since.elapsed() > timeout {
            return here;
        }
        tokio::time::sleep(POLL).await;
    }
}

fn top_await(coordinator: Coordinator) -> TaskletFn<AggregatorCtx> {
    Arc::new(move |ctx: &mut AggregatorCtx| {
        let coordinator = coordinator.clone();
        Box::pin(async move {
            coordinator.end().await?;
            ctx.children().await_join(coordinator.join_timeout).await?;
            Ok(())
        })
    })
}

fn top_coordinate(coordinator: Coordinator) -> TaskletFn<AggregatorCtx> {
    Arc::new(move |ctx: &mut AggregatorCtx| {
        let coordinator = coordinator.clone();
        Box::pin(async move {
            let round = ctx.round;
            let active = coordinator.plan(round).await?;
            let wait = grace(round, coordinator.join_timeout);
            let here = present(ctx.children(), &active, wait).await;
            if here.len() < active.len() {
                tracing::warn!(
                    round,
                    ?active,
                    ?here,
                    "active middle aggregators missing at the top"
                );
            }
            if here.is_empty() {
                return Err(Error::Quorum { round, got: 0, need: 1 });
            }
            tracing::info!(round, middle_aggregators = ?here, "round planned");
            ctx.set_selected(here);
            Ok(())
        })
    })
}

fn top_end(coordinator: Coordinator) -> TaskletFn<AggregatorCtx> {
    Arc::new(move |ctx: &mut AggregatorCtx| {
        let coordinator = coordinator.clone();
        Box::pin(async move {
            match coordinator.send(Message::new(Kind::EndOfTraining, ctx.round)).await {
                Err(Error::PeerLeft { .. }) => {
                    tracing::warn!("coordinator gone before the end of training");
                    Ok(())
                }
                res => res,
            }
        })
    })
}

/// The coordinated top aggregator program (see the module docs).
pub fn top_program(coordinator: Channel, common: Common) -> Result<Composer<AggregatorCtx>> {
    let coordinator = Coordinator::new(coordinator, common);
    let mut p = aggregator::top_program();
    p.replace("await_trainers", top_await(coordinator.clone()))?;
    // The initial model is asked for once the coordinator has planned the first round.
    let init = p.remove("init_model")?;
    p.insert_after("select", "coordinate", top_coordinate(coordinator.clone()))?;
    p.insert_node("coordinate", 1, init)?;
    p.insert_before("finish", "end_coordination", top_end(coordinator))?;
    Ok(p)
}

/// A middle aggregator's assignment for the round at hand.
#[derive(Default)]
struct Assigned {
    /// Trainers assigned (empty: idle this round).
    trainers: Vec<TaskId>,
    /// The last round assigned.
    round: u64,
}

fn middle_assignment(
    coordinator: Coordinator,
    state: Arc<Mutex<Assigned>>,
) -> TaskletFn<AggregatorCtx> {
    Arc::new(move |ctx: &mut AggregatorCtx| {
        let (coordinator, state) = (coordinator.clone(), state.clone());
        Box::pin(async move {
            loop {
                let message = coordinator.recv().await?;
                if message.kind == Kind::EndOfTraining {
                    ctx.done = true;
                    return Ok(());
                }
                let last = state.lock().unwrap_or_else(|e| e.into_inner()).round;
                if !Command::Assign.is(&message) || message.round <= last.max(ctx.round) {
                    tracing::warn!(kind = ?message.kind, round = message.round, "stale or unexpected message from the coordinator ignored");
                    continue;
                }
                let trainers = ids(&message, TRAINERS);
                tracing::info!(task_id = %ctx.io.config.task_id, round = message.round, ?trainers, "assigned");
                // Selected now, so that a request for the initial model goes to them.
                ctx.set_selected(trainers.clone());
                *state.lock().unwrap_or_else(|e| e.into_inner()) =
                    Assigned { trainers, round: message.round };
                return Ok(());
            }
        })
    })
}

fn middle_apply(state: Arc<Mutex<Assigned>>, join_timeout: Duration) -> TaskletFn<AggregatorCtx> {
    Arc::new(move |ctx: &mut AggregatorCtx| {
        let state = state.clone();
        Box::pin(async move {
            let assigned = state.lock().unwrap_or_else(|e| e.into_inner()).trainers.clone();
            let here = present(ctx.children(), &assigned, grace(ctx.round, join_timeout)).await;
            if here.len() < assigned.len() {
                tracing::warn!(round = ctx.round, ?assigned, ?here, "assigned trainers missing");
            }
            ctx.set_selected(here);
            Ok(())
        })
    })
}

/// `step`, skipped in rounds this middle aggregator has no trainers for; `aggregate` is also
/// skipped (zero samples go up) when none of its trainers is alive.
fn middle_guarded(
    alias: &'static str,
    step: TaskletFn<AggregatorCtx>,
    state: Arc<Mutex<Assigned>>,
) -> TaskletFn<AggregatorCtx> {
    Arc::new(move |ctx: &mut AggregatorCtx| {
        let (step, state) = (step.clone(), state.clone());
        Box::pin(async move {
            if ctx.done || state.lock().unwrap_or_else(|e| e.into_inner()).trainers.is_empty() {
                return Ok(());
            }
            if alias == "aggregate" && ctx.selected().is_empty() {
                tracing::warn!(
                    round = ctx.round,
                    "no assigned trainer alive; reporting zero samples"
                );
                ctx.set_round_samples(0);
                return Ok(());
            }
            step(ctx).await
        })
    })
}

/// The coordinated middle aggregator program (see the module docs).
pub fn middle_program(coordinator: Channel, common: Common) -> Result<Composer<AggregatorCtx>> {
    let join_timeout = common.join_timeout;
    let coordinator = Coordinator::new(coordinator, common);
    let state = Arc::new(Mutex::new(Assigned::default()));
    let mut p = aggregator::middle_program();
    let await_coordinator = coordinator.clone();
    p.replace(
        "await_trainers",
        Arc::new(move |_ctx: &mut AggregatorCtx| {
            let coordinator = await_coordinator.clone();
            Box::pin(async move { coordinator.end().await.map(|_| ()) })
        }),
    )?;
    p.insert_before("fetch", "assignment", middle_assignment(coordinator, state.clone()))?;
    let apply = middle_apply(state.clone(), join_timeout);
    p.insert_after(
        "select",
        "apply_assignment",
        middle_guarded("apply_assignment", apply, state.clone()),
    )?;
    for alias in ["fetch", "select", "distribute", "aggregate", "upload", "report"] {
        p.wrap(alias, |step| middle_guarded(alias, step, state.clone()))?;
    }
    Ok(p)
}

fn trainer_pick(coordinator: Coordinator, fetch: Channel) -> TaskletFn<TrainerCtx> {
    Arc::new(move |ctx: &mut TrainerCtx| {
        let (coordinator, fetch) = (coordinator.clone(), fetch.clone());
        Box::pin(async move {
            loop {
                let message = coordinator.recv().await?;
                if message.kind == Kind::EndOfTraining {
                    ctx.done = true;
                    return Ok(());
                }
                if !Command::Assign.is(&message) || message.round <= ctx.round {
                    tracing::warn!(kind = ?message.kind, round = message.round, "stale or unexpected message from the coordinator ignored");
                    continue;
                }
                let aggregator = message.meta.get(AGGREGATOR).and_then(Value::as_str);
                ctx.aggregator = match aggregator {
                    None => {
                        tracing::info!(round = message.round, "not assigned this round");
                        None
                    }
                    Some(id) => {
                        let id = TaskId::from(id);
                        let wait = grace(message.round, coordinator.join_timeout);
                        let here = present(&fetch, std::slice::from_ref(&id), wait).await;
                        if here.is_empty() {
                            tracing::warn!(%id, round = message.round, "assigned middle aggregator not reachable; sitting the round out");
                        }
                        here.into_iter().next()
                    }
                };
                return Ok(());
            }
        })
    })
}

/// The coordinated trainer program (see the module docs).
pub fn trainer_program(
    coordinator: Channel,
    fetch: Channel,
    common: Common,
) -> Result<Composer<TrainerCtx>> {
    follow::program(trainer_pick(Coordinator::new(coordinator, common), fetch))
}

/// The top aggregator under a coordinator (see the module docs).
pub struct CoordinatedTopAggregator;

impl Role for CoordinatedTopAggregator {
    type Ctx = AggregatorCtx;
    const KIND: RoleKind = RoleKind::CoordinatedTopAggregator;
    const APP: AppNeed = AppNeed::Evaluator;

    fn build(io: TaskIo, app: UserApp) -> Result<AggregatorCtx> {
        AggregatorCtx::new(io, Tier::Top, app.evaluator()?)
    }

    fn program(ctx: &AggregatorCtx) -> Result<Composer<AggregatorCtx>> {
        let common = Common::from_config(&ctx.io.config)?;
        let coordinator = ctx.io.channels.by_tag(coord_tags::COORDINATE)?.clone();
        top_program(coordinator, common)
    }
}

/// A middle aggregator under a coordinator (see the module docs).
pub struct CoordinatedMiddleAggregator;

impl Role for CoordinatedMiddleAggregator {
    type Ctx = AggregatorCtx;
    const KIND: RoleKind = RoleKind::CoordinatedMiddleAggregator;
    const APP: AppNeed = AppNeed::None;

    fn prepare(config: &TaskConfig, opts: &mut RunOptions) -> Result<()> {
        announce_group(config, tags::DISTRIBUTE, opts);
        Ok(())
    }

    fn build(io: TaskIo, _app: UserApp) -> Result<AggregatorCtx> {
        AggregatorCtx::new(io, Tier::Middle, None)
    }

    fn program(ctx: &AggregatorCtx) -> Result<Composer<AggregatorCtx>> {
        let common = Common::from_config(&ctx.io.config)?;
        let coordinator = ctx.io.channels.by_tag(coord_tags::COORDINATE)?.clone();
        middle_program(coordinator, common)
    }
}

/// A trainer under a coordinator (see the module docs).
pub struct CoordinatedTrainer;

impl Role for CoordinatedTrainer {
    type Ctx = TrainerCtx;
    const KIND: RoleKind = RoleKind::CoordinatedTrainer;
    const APP: AppNeed = AppNeed::Trainer;
    const LINGER: bool = false;

    fn prepare(config: &TaskConfig, opts: &mut RunOptions) -> Result<()> {
        announce_group(config, tags::FETCH, opts);
        Ok(())
    }

    fn build(io: TaskIo, app: UserApp) -> Result<TrainerCtx> {
        TrainerCtx::new(io, app.trainer()?)
    }

    fn program(ctx: &TrainerCtx) -> Result<Composer<TrainerCtx>> {
        let common = Common::from_config(&ctx.io.config)?;
        let coordinator = ctx.io.channels.by_tag(coord_tags::COORDINATE)?.clone();
        let fetch = ctx.io.channels.by_tag(tags::FETCH)?.clone();
        trainer_program(coordinator, fetch, common)
    }

    /// The rounds this trainer took part in (not the aggregators' round numbers).
    fn rounds(ctx: &mut TrainerCtx) -> u64 {
        ctx.io.history.len() as u64
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use fledge_channel::{BackendEnv, LocalHub};
    use fledge_types::{ChannelSpec, DatasetRef};
    use serde_json::json;

    use super::*;
    use crate::app::AppFactory;
    use crate::role::run;
    use crate::roles::coordinator::tags::{WITH_MIDDLE, WITH_TOP, WITH_TRAINER};
    use crate::roles::ring::tests::MeanFactory;
    use crate::runner::JobPlan;

    /// Channel `name` between `a` (with `a_tags`) and `b` (with `b_tags`), group `default`.
    pub(crate) fn chan(
        name: &str,
        a: &str,
        a_tags: &[&str],
        b: &str,
        b_tags: &[&str],
    ) -> ChannelSpec {
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        ChannelSpec {
            name: name.to_owned(),
            description: String::new(),
            pair: vec![a.to_owned(), b.to_owned()],
            group_by: None,
            func_tags: BTreeMap::from([(a.to_owned(), tags(a_tags)), (b.to_owned(), tags(b_tags))]),
            backend: None,
            broker_host: None,
        }
    }

    /// The config of task `role`-`index` of `job` on the channels of `all` that name its role.
    pub(crate) fn task(
        job: &str,
        role: &str,
        index: u32,
        all: &[ChannelSpec],
        dataset: Option<&str>,
        hyperparameters: &serde_json::Value,
    ) -> TaskConfig {
        let mut c =
            JobPlan::local(job, vec!["unused".into()]).configs().expect("configs").remove(0);
        c.task_id = format!("{job}-{role}-{index}").into();
        c.role = role.to_owned();
        c.task_index = index;
        c.channels = all.iter().filter(|s| s.pair.iter().any(|r| r == role)).cloned().collect();
        c.group_association = BTreeMap::new();
        c.hyperparameters = hyperparameters.as_object().cloned().expect("object");
        c.dataset = dataset.map(|url| DatasetRef {
            id: format!("{job}-data-{index}").into(),
            name: String::new(),
            url: url.to_owned(),
            data_format: String::new(),
        });
        c
    }

    pub(crate) fn opts(hub: &LocalHub, dir: &std::path::Path) -> RunOptions {
        RunOptions {
            workdir: dir.to_owned(),
            task_key: None,
            backend_env: BackendEnv { local_hub: hub.clone(), ..BackendEnv::default() },
            role: None,
            observer: None,
        }
    }

    fn schema() -> Vec<ChannelSpec> {
        vec![
            chan(
                "top-agg-coord-channel",
                "top-aggregator",
                &["coordinate"],
                "coordinator",
                &[WITH_TOP],
            ),
            chan(
                "middle-agg-coord-channel",
                "middle-aggregator",
                &["coordinate"],
                "coordinator",
                &[WITH_MIDDLE],
            ),
            chan(
                "trainer-coord-channel",
                "trainer",
                &["coordinate"],
                "coordinator",
                &[WITH_TRAINER],
            ),
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
        ]
    }

    /// Two middle aggregators, four trainers; middle aggregator 1 is killed (its task
    /// aborted, so its channels vanish as in a crash) during round 2. The coordinator moves
    /// its trainers to middle aggregator 0, and every round still aggregates.
    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn a_dead_middle_aggregators_trainers_are_reassigned_and_the_job_completes() {
        let dir = tempfile::tempdir().expect("tmp");
        let hub = LocalHub::new();
        let factory = Arc::new(MeanFactory::default());
        let trained = factory.trained.clone();
        let shared: Arc<dyn AppFactory> = factory;
        let all = schema();
        let h = json!({"rounds": 5, "joinTimeout": 20, "expectedTrainers": 4, "expectedMiddleAggregators": 2});
        let job = "coord";
        let samples = [10u64, 10, 20, 20];
        let mut set = tokio::task::JoinSet::new();
        let coordinator = task(job, "coordinator", 0, &all, None, &h);
        let o = opts(&hub, dir.path());
        let f = shared.clone();
        set.spawn(async move {
            ("coordinator", run::<crate::roles::coordinator::Coordinator>(coordinator, f, o).await)
        });
        for (i, n) in samples.iter().enumerate() {
            let t = task(job, "trainer", i as u32, &all, Some(&format!("{}:{n}", i + 1)), &h);
            let (o, f) = (opts(&hub, dir.path()), shared.clone());
            set.spawn(async move { ("trainer", run::<CoordinatedTrainer>(t, f, o).await) });
        }
        let middle0 = task(job, "middle-aggregator", 0, &all, None, &h);
        let (o, f) = (opts(&hub, dir.path()), shared.clone());
        set.spawn(async move {
            ("middle-aggregator 0", run::<CoordinatedMiddleAggregator>(middle0, f, o).await)
        });
        let middle1 = task(job, "middle-aggregator", 1, &all, None, &h);
        let victim = tokio::spawn(run::<CoordinatedMiddleAggregator>(
            middle1,
            shared.clone(),
            opts(&hub, dir.path()),
        ));
        let top = task(job, "top-aggregator", 0, &all, None, &h);
        let top = tokio::spawn(run::<CoordinatedTopAggregator>(
            top,
            shared.clone(),
            opts(&hub, dir.path()),
        ));
        // Round 1 trains 4 times; the kill lands in round 2.
        while trained.load(std::sync::atomic::Ordering::SeqCst) < 6 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        victim.abort();
        let top = top.await.expect("join").expect("the top aggregator completes");
        let mut coordinator_summary = None;
        while let Some(res) = set.join_next().await {
            let (who, res) = res.expect("join");
            let summary = res.unwrap_or_else(|e| panic!("{who} did not complete: {e:?}"));
            if summary.history.first().is_some_and(|r| r.role == "coordinator") {
                coordinator_summary = Some(summary);
            }
        }
        assert_eq!(top.rounds, 5);
        let total: u64 = samples.iter().sum();
        let first = &top.history[0].metrics;
        assert_eq!((first["updates"], first["numSamples"]), (2.0, total as f64), "{first:?}");
        for r in &top.history[2..] {
            // After the kill: one middle aggregator, carrying every trainer.
            assert_eq!(
                (r.metrics["updates"], r.metrics["numSamples"]),
                (1.0, total as f64),
                "{r:?}"
            );
        }
        let plans = coordinator_summary.expect("coordinator summary").history;
        assert_eq!(plans.len(), 5);
        assert_eq!(plans[0].metrics["middleAggregatorsActive"], 2.0);
        assert_eq!(plans[4].metrics["middleAggregatorsActive"], 1.0);
        let moved: f64 = plans.iter().map(|r| r.metrics["trainersReassigned"]).sum();
        assert_eq!(moved, 2.0, "only the dead middle aggregator's two trainers move: {plans:?}");
        // The model still moves towards the targets 1..4.
        let w = top.final_model.as_ref().expect("final").get("w").expect("w").data()[0];
        assert!(w > 0.5 && w < 4.0, "final w {w}");
    }

    /// The coordinator is killed (its task aborted, its channels vanish as in a crash) during
    /// round 2 and started again under the same id: it resumes from the round it saved last,
    /// the top asks it for the plan again, the middle aggregators and trainers wait for it,
    /// and every round is still planned and aggregated by both middle aggregators.
    #[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
    async fn a_restarted_coordinator_resumes_and_the_others_wait_for_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let hub = LocalHub::new();
        let factory = Arc::new(MeanFactory::default());
        let trained = factory.trained.clone();
        let shared: Arc<dyn AppFactory> = factory;
        let all = schema();
        let h = json!({"rounds": 5, "joinTimeout": 20, "rejoinTimeout": 20,
            "expectedTrainers": 4, "expectedMiddleAggregators": 2});
        let job = "coord-resume";
        let mut set = tokio::task::JoinSet::new();
        for (i, n) in [10u64, 10, 20, 20].iter().enumerate() {
            let t = task(job, "trainer", i as u32, &all, Some(&format!("{}:{n}", i + 1)), &h);
            let (o, f) = (opts(&hub, dir.path()), shared.clone());
            set.spawn(async move { run::<CoordinatedTrainer>(t, f, o).await.map(|_| ()) });
        }
        for i in 0..2 {
            let m = task(job, "middle-aggregator", i, &all, None, &h);
            let (o, f) = (opts(&hub, dir.path()), shared.clone());
            set.spawn(async move { run::<CoordinatedMiddleAggregator>(m, f, o).await.map(|_| ()) });
        }
        let coordinator = task(job, "coordinator", 0, &all, None, &h);
        let first = tokio::spawn(run::<crate::roles::coordinator::Coordinator>(
            coordinator.clone(),
            shared.clone(),
            opts(&hub, dir.path()),
        ));
        let top = task(job, "top-aggregator", 0, &all, None, &h);
        let top = tokio::spawn(run::<CoordinatedTopAggregator>(
            top,
            shared.clone(),
            opts(&hub, dir.path()),
        ));
        // Round 1 trains 4 times; the kill lands in round 2.
        while trained.load(std::sync::atomic::Ordering::SeqCst) < 6 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        first.abort();
        let _ = first.await;
        let registry = crate::registry::for_task(&coordinator, dir.path()).expect("registry");
        let saved = registry
            .load_resume(&coordinator.job.id, &coordinator.task_id)
            .expect("readable")
            .expect("the coordinator saved round 1 at least")
            .round;
        let second = run::<crate::roles::coordinator::Coordinator>(
            coordinator,
            shared.clone(),
            opts(&hub, dir.path()),
        )
        .await
        .expect("the restarted coordinator completes");
        let top = top.await.expect("join").expect("the top aggregator completes");
        while let Some(res) = set.join_next().await {
            res.expect("join").expect("every trainer and middle aggregator completes");
        }
        assert_eq!(top.rounds, 5);
        for r in &top.history {
            assert_eq!(r.metrics["updates"], 2.0, "both middle aggregators, every round: {r:?}");
        }
        // The restarted run re-sent the saved round's record, then planned the rest: each
        // round once, sticky as before.
        let rounds: Vec<u64> = second.history.iter().map(|r| r.round).collect();
        assert_eq!(rounds, (saved..=5).collect::<Vec<_>>(), "saved round {saved}");
        assert!(second.history.iter().all(|r| r.metrics["trainersReassigned"] == 0.0));
    }
}
