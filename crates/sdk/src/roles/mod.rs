//! The built-in roles, each a [`crate::role::Role`] whose program is a
//! [`crate::composer::Composer`] over its context; [`crate::table::ROLES`] lists them.
//!
//! - [`trainer`]: fetches the global model on its `fetch` channel, trains with user code,
//!   uploads the update on `upload`.
//! - [`aggregator`]: the top aggregator (distributes on `distribute`, folds updates from
//!   `aggregate`) and the middle aggregator of a three-tier topology (a trainer towards the
//!   top on `fetch`/`upload`, an aggregator towards its trainers).
//! - [`fedbuff`]: asynchronous (FedBuff) top and middle aggregators; [`follow`]: a trainer
//!   that follows the newest model of several aggregators.
//! - [`secagg`]: secure aggregation (SecAgg+) carried by the trainer and the synchronous
//!   aggregators when a job's model spec has `secureAggregation`.
//! - [`ring`]: decentralised ring all-reduce; [`hybrid`]: ring within a group, aggregator
//!   across groups.
//! - [`vertical`]: split learning between feature parties and a label party.
//! - [`coordinator`] and [`coordinated`]: a coordinator that plans each round's tree, and the
//!   aggregators and trainers that follow its plan.
//!
//! Which role a task plays follows from the role name ([`crate::table::find`]) or else from
//! its function tags ([`RoleKind::infer`]), as in Flame: `fetch`+`upload` only is a trainer,
//! `distribute`+`aggregate` only is a top aggregator, and both pairs (on different channels)
//! is a middle aggregator.

use std::time::Duration;

use fledge_types::TaskConfig;

use crate::hyper::{self, names};
use crate::{Error, Result};

pub mod aggregator;
pub mod coordinated;
pub mod coordinator;
pub mod fedbuff;
pub mod follow;
pub mod hybrid;
pub mod ring;
pub mod secagg;
pub mod trainer;
pub mod vertical;

/// Function tags of the built-in roles.
pub mod tags {
    /// Trainer side: receives the global model.
    pub const FETCH: &str = "fetch";
    /// Trainer side: sends its update.
    pub const UPLOAD: &str = "upload";
    /// Aggregator side: sends the global model.
    pub const DISTRIBUTE: &str = "distribute";
    /// Aggregator side: receives updates.
    pub const AGGREGATE: &str = "aggregate";
}

/// The built-in roles (the rows of [`crate::table::ROLES`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RoleKind {
    /// Trains on local data with user code ([`trainer`]).
    Trainer,
    /// The root of the synchronous aggregation tree ([`aggregator`]).
    TopAggregator,
    /// An inner node: aggregates its trainers, reports to the top ([`aggregator`]).
    MiddleAggregator,
    /// The FedBuff (asynchronous) top aggregator ([`fedbuff`]).
    AsyncAggregator,
    /// The FedBuff middle aggregator ([`fedbuff`]).
    AsyncMiddleAggregator,
    /// A trainer that follows whichever aggregator sent the newest model ([`follow`]).
    AsyncTrainer,
    /// The trainer, made an artificial straggler when `slowTrainers` names it ([`fedbuff`]).
    StragglerTrainer,
    /// A peer of the ring all-reduce ([`ring`]).
    RingTrainer,
    /// A member of a hybrid (ring within a group, aggregator across groups) job ([`hybrid`]).
    HybridTrainer,
    /// The party with features and a bottom model in split learning ([`vertical`]).
    VerticalFeatureParty,
    /// The party with labels and the top model in split learning ([`vertical`]).
    VerticalLabelParty,
    /// Plans which aggregator each trainer uses per round ([`coordinator`]).
    Coordinator,
    /// The top aggregator under a coordinator ([`coordinated`]).
    CoordinatedTopAggregator,
    /// A middle aggregator under a coordinator ([`coordinated`]).
    CoordinatedMiddleAggregator,
    /// A trainer under a coordinator ([`coordinated`]).
    CoordinatedTrainer,
}

impl RoleKind {
    /// The built-in name (`trainer`, `top-aggregator`, `ring-trainer`, ...).
    pub fn name(self) -> &'static str {
        match self {
            RoleKind::Trainer => "trainer",
            RoleKind::TopAggregator => "top-aggregator",
            RoleKind::MiddleAggregator => "middle-aggregator",
            RoleKind::AsyncAggregator => "async-aggregator",
            RoleKind::AsyncMiddleAggregator => "async-middle-aggregator",
            RoleKind::AsyncTrainer => "async-trainer",
            RoleKind::StragglerTrainer => "straggler-trainer",
            RoleKind::RingTrainer => "ring-trainer",
            RoleKind::HybridTrainer => "hybrid-trainer",
            RoleKind::VerticalFeatureParty => "vertical-feature-party",
            RoleKind::VerticalLabelParty => "vertical-label-party",
            RoleKind::Coordinator => "coordinator",
            RoleKind::CoordinatedTopAggregator => "coordinated-top-aggregator",
            RoleKind::CoordinatedMiddleAggregator => "coordinated-middle-aggregator",
            RoleKind::CoordinatedTrainer => "coordinated-trainer",
        }
    }

    /// The role `config`'s function tags describe.
    pub fn infer(config: &TaskConfig) -> Result<RoleKind> {
        let has = |tag| config.channels_with_tag(tag).next().is_some();
        let trainer_side = has(tags::FETCH) && has(tags::UPLOAD);
        let aggregator_side = has(tags::DISTRIBUTE) && has(tags::AGGREGATE);
        match (trainer_side, aggregator_side) {
            (true, false) => Ok(RoleKind::Trainer),
            (false, true) => Ok(RoleKind::TopAggregator),
            (true, true) => Ok(RoleKind::MiddleAggregator),
            (false, false) => Err(Error::Config(format!(
                "role {:?} has neither fetch+upload nor distribute+aggregate function tags on its channels",
                config.role
            ))),
        }
    }
}

/// Settings every role reads from hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Common {
    /// How long to wait for peers to join.
    pub join_timeout: Duration,
    /// How long a child waits for its aggregator to come back after it left (the controller
    /// restarts a failed aggregator, which resumes from its last round) before it fails; the
    /// same for the peers of a coordinator, a ring leader or a vertical label party.
    pub rejoin_timeout: Duration,
}

impl Common {
    /// Reads them from `config`.
    pub fn from_config(config: &TaskConfig) -> Result<Common> {
        let h = &config.hyperparameters;
        let secs = hyper::uint(h, names::JOIN_TIMEOUT, 120, 1)?;
        // Only a control plane restarts a failed aggregator: without one (a simulation, a
        // task run by hand) there is nothing to wait for.
        let default_rejoin = if config.control_plane.is_some() { 300 } else { 0 };
        let rejoin = hyper::uint(h, names::REJOIN_TIMEOUT, default_rejoin, 0)?;
        if rejoin > 86_400 {
            return Err(crate::Error::Hyperparameter {
                name: names::REJOIN_TIMEOUT.to_owned(),
                reason: format!("{rejoin} s exceeds the limit of 86400 s (one day)"),
            });
        }
        Ok(Common {
            join_timeout: Duration::from_secs(secs),
            rejoin_timeout: Duration::from_secs(rejoin),
        })
    }
}
