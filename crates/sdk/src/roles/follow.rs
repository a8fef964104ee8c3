//! Trainers whose aggregator may change from one round to the next: the standard
//! [`crate::roles::trainer`] program with one `pick` step in front of each round and the
//! loss of an aggregator made survivable.
//!
//! Program ([`program`]):
//!
//! ```text
//! initialize, load_data, join,
//! loop rounds until done { pick, fetch*, train*, evaluate*, upload*, report* }
//! ```
//!
//! `pick` is the topology's rule. It points `TrainerCtx::aggregator` at this round's
//! aggregator, sets it to `None` to sit the round out, or sets [`TrainerCtx::done`] to stop.
//! The starred steps are the standard trainer's, wrapped ([`Composer::wrap`]) so they are skipped when there is no aggregator this
//! round. When the aggregator leaves during the round (fetch or upload fails with
//! [`Error::PeerLeft`]) the round is abandoned with a warning instead of failing the task:
//! the next `pick` chooses again.
//!
//! Two rules are built in:
//! - [`follow_sender`] (built-in trainer `async-trainer`): train for whichever aggregator
//!   sent a model, least recently served first. Replicated asynchronous middle aggregators
//!   sharing one group share its trainers this way, without a coordinator (as Flame's
//!   trainers answer the end that has a message waiting).
//! - the coordinator's assignment ([`crate::roles::coordinated`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fledge_channel::Channel;
use fledge_types::TaskId;
use tokio::time::Instant;

use crate::app::{AppNeed, UserApp};
use crate::composer::{Composer, TaskletFn};
use crate::role::{Role, TaskIo};
use crate::roles::trainer::{self, TrainerCtx};
use crate::roles::{Common, RoleKind, tags};
use crate::{Error, Result};

/// The built-in name of the trainer that follows the sender ([`follow_sender`]).
pub const BUILTIN_NAME: &str = "async-trainer";

/// How often a trainer waiting for any aggregator looks at its inbound queues again.
const POLL: Duration = Duration::from_millis(20);

/// `step`, skipped when the round has no aggregator; an aggregator that leaves during it
/// (`PeerLeft`) abandons the round.
fn guarded(step: TaskletFn<TrainerCtx>, survive_peer_left: bool) -> TaskletFn<TrainerCtx> {
    Arc::new(move |ctx: &mut TrainerCtx| {
        let step = step.clone();
        Box::pin(async move {
            if ctx.aggregator.is_none() {
                return Ok(());
            }
            match step(ctx).await {
                Err(Error::PeerLeft { peer, channel }) if survive_peer_left => {
                    tracing::warn!(task_id = %ctx.io.config.task_id, %peer, %channel, round = ctx.round, "aggregator left during the round; round abandoned");
                    ctx.aggregator = None;
                    Ok(())
                }
                res => res,
            }
        })
    })
}

/// The standard trainer program with `pick` before every round (see the module docs).
pub fn program(pick: TaskletFn<TrainerCtx>) -> Result<Composer<TrainerCtx>> {
    let mut res = trainer::program();
    res.insert_before("fetch", "pick", pick)?;
    for (alias, survive) in [
        ("fetch", true),
        ("evaluate_received", false),
        ("train", false),
        ("evaluate", false),
        ("upload", true),
        ("report", false),
    ] {
        res.wrap(alias, |step| guarded(step, survive))?;
    }
    Ok(res)
}

/// Which aggregators a [`follow_sender`] trainer served last.
#[derive(Default)]
struct Served {
    /// Every aggregator end ever seen (an end that left may still have a message queued,
    /// such as its end-of-training).
    known: BTreeSet<TaskId>,
    /// Aggregator → the pick count when it was last chosen.
    last: BTreeMap<TaskId, u64>,
    picks: u64,
}

/// Picks the aggregator that has a message waiting, least recently served first, so that
/// replicated aggregators sharing a group share the trainer fairly. Fails when no
/// aggregator is left and none has anything queued for `join_timeout`.
pub fn follow_sender(fetch: Channel, join_timeout: Duration) -> TaskletFn<TrainerCtx> {
    let served = Arc::new(Mutex::new(Served::default()));
    Arc::new(move |ctx: &mut TrainerCtx| {
        let (fetch, served) = (fetch.clone(), served.clone());
        Box::pin(async move {
            let mut alone_since = Instant::now();
            loop {
                let live = fetch.ends();
                let chosen = {
                    let mut s = served.lock().unwrap_or_else(|e| e.into_inner());
                    s.known.extend(live.iter().cloned());
                    let best = s
                        .known
                        .iter()
                        .filter(|end| fetch.peek(end).is_some())
                        .min_by_key(|end| s.last.get(*end).copied().unwrap_or(0))
                        .cloned();
                    if let Some(end) = &best {
                        s.picks += 1;
                        let picks = s.picks;
                        s.last.insert(end.clone(), picks);
                    }
                    best
                };
                if let Some(end) = chosen {
                    ctx.aggregator = Some(end);
                    return Ok(());
                }
                if !live.is_empty() {
                    alone_since = Instant::now();
                } else if alone_since.elapsed() > join_timeout {
                    return Err(Error::PeerLeft {
                        peer: ctx.aggregator.clone().unwrap_or_else(|| TaskId::from("aggregator")),
                        channel: fetch.name().to_owned(),
                    });
                }
                // The channel has no "wait for a message from any end without taking it";
                // peeking every few milliseconds costs nothing next to a training round.
                tokio::time::sleep(POLL).await;
            }
        })
    })
}

/// The trainer that follows the sender ([`follow_sender`]).
pub struct AsyncTrainer;

impl Role for AsyncTrainer {
    type Ctx = TrainerCtx;
    const KIND: RoleKind = RoleKind::AsyncTrainer;
    const APP: AppNeed = AppNeed::Trainer;
    const LINGER: bool = false;

    fn build(io: TaskIo, app: UserApp) -> Result<TrainerCtx> {
        TrainerCtx::new(io, app.trainer()?)
    }

    fn program(ctx: &TrainerCtx) -> Result<Composer<TrainerCtx>> {
        let common = Common::from_config(&ctx.io.config)?;
        let fetch = ctx.io.channels.by_tag(tags::FETCH)?.clone();
        program(follow_sender(fetch, common.join_timeout))
    }

    /// The rounds this trainer took part in (not the aggregators' round numbers).
    fn rounds(ctx: &mut TrainerCtx) -> u64 {
        ctx.io.history.len() as u64
    }
}
