//! The built-in roles, each a [`crate::composer::Composer`] program over a context.
//!
//! - [`trainer`]: fetches the global model on its `fetch` channel, trains with user code,
//!   uploads the update on `upload`.
//! - [`aggregator`]: the top aggregator (distributes on `distribute`, folds updates from
//!   `aggregate`) and the middle aggregator of a three-tier topology (a trainer towards the
//!   top on `fetch`/`upload`, an aggregator towards its trainers).
//!
//! Which role a task plays follows from its function tags ([`RoleKind::infer`]), as in Flame:
//! `fetch`+`upload` only is a trainer, `distribute`+`aggregate` only is a top aggregator, and
//! both pairs (on different channels) is a middle aggregator.

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

/// The built-in role programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleKind {
    /// Trains on local data with user code.
    Trainer,
    /// The root of the aggregation tree.
    TopAggregator,
    /// An inner node: aggregates its trainers, reports to the top.
    MiddleAggregator,
}

impl RoleKind {
    /// The built-in name (`trainer`, `top-aggregator`, `middle-aggregator`).
    pub fn name(self) -> &'static str {
        match self {
            RoleKind::Trainer => "trainer",
            RoleKind::TopAggregator => "top-aggregator",
            RoleKind::MiddleAggregator => "middle-aggregator",
        }
    }

    /// The role program `config`'s function tags describe.
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
}

impl Common {
    /// Reads them from `config`.
    pub fn from_config(config: &TaskConfig) -> Result<Common> {
        let secs = hyper::uint(&config.hyperparameters, names::JOIN_TIMEOUT, 120, 1)?;
        Ok(Common { join_timeout: Duration::from_secs(secs) })
    }
}
