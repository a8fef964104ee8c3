//! The role table: every built-in role with its name, aliases, kind, user code and entry
//! point. `fledge run-task`, the fledgelet's `builtin = "…"`, `fledge roles` and Python's
//! `fledge.run`/`fledge.builtin_roles()` all read it, so a role added here is runnable
//! everywhere.
//!
//! Adding a topology: write the role in one file under `roles/` (a [`crate::role::Role`]
//! implementation, see `docs/writing-a-role.md`), give it a [`RoleKind`] and add its row
//! below.

use std::sync::Arc;

use fledge_types::TaskConfig;
use futures::future::BoxFuture;

use crate::app::{AppFactory, AppNeed};
use crate::role::{self, Role, RunOptions, RunSummary};
use crate::roles::{
    RoleKind, aggregator, coordinated, coordinator, fedbuff, follow, hybrid, ring, trainer,
    vertical,
};
use crate::{Error, Result};

/// Where a role sits in a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// Trains on local data (alone, or with peers of its group).
    Trainer,
    /// Aggregates what others trained.
    Aggregator,
    /// Plans who talks to whom; moves no model.
    Coordinator,
    /// A party of vertical (split) learning.
    Party,
}

impl Position {
    /// The word `fledge roles` prints.
    pub fn name(self) -> &'static str {
        match self {
            Position::Trainer => "trainer",
            Position::Aggregator => "aggregator",
            Position::Coordinator => "coordinator",
            Position::Party => "party",
        }
    }
}

/// A role's entry point: runs one task of it with user code from the factory.
pub type EntryPoint =
    fn(TaskConfig, Arc<dyn AppFactory>, RunOptions) -> BoxFuture<'static, Result<RunSummary>>;

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct RoleEntry {
    /// Which role.
    pub kind: RoleKind,
    /// Other names that run it (older names, names the examples use).
    pub aliases: &'static [&'static str],
    /// Where it sits.
    pub position: Position,
    /// The user code it drives.
    pub app: AppNeed,
    /// One line on what it does.
    pub about: &'static str,
    /// Runs a task of it.
    pub run: EntryPoint,
}

impl RoleEntry {
    /// Its built-in name.
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// Whether `name` is its name or one of its aliases.
    pub fn answers_to(&self, name: &str) -> bool {
        self.name() == name || self.aliases.contains(&name)
    }
}

fn entry<R: Role>(
    config: TaskConfig,
    factory: Arc<dyn AppFactory>,
    opts: RunOptions,
) -> BoxFuture<'static, Result<RunSummary>> {
    Box::pin(role::run::<R>(config, factory, opts))
}

/// Every built-in role.
pub static ROLES: &[RoleEntry] = &[
    RoleEntry {
        kind: RoleKind::Trainer,
        aliases: &["mnist-mlp-trainer"],
        position: Position::Trainer,
        app: AppNeed::Trainer,
        about: "fetches the global model, trains with user code, uploads the update",
        run: entry::<trainer::Trainer>,
    },
    RoleEntry {
        kind: RoleKind::TopAggregator,
        aliases: &["aggregator", "global-aggregator"],
        position: Position::Aggregator,
        app: AppNeed::Evaluator,
        about: "root of the synchronous aggregation tree; runs the server optimizer",
        run: entry::<aggregator::TopAggregator>,
    },
    RoleEntry {
        kind: RoleKind::MiddleAggregator,
        aliases: &["intermediate-aggregator"],
        position: Position::Aggregator,
        app: AppNeed::None,
        about: "averages its trainers (FedAvg) and reports to the top aggregator",
        run: entry::<aggregator::MiddleAggregator>,
    },
    RoleEntry {
        kind: RoleKind::AsyncAggregator,
        aliases: &[],
        position: Position::Aggregator,
        app: AppNeed::Evaluator,
        about: "FedBuff: steps the global model every buffer of updates, stale ones discounted",
        run: entry::<fedbuff::AsyncAggregator>,
    },
    RoleEntry {
        kind: RoleKind::AsyncMiddleAggregator,
        aliases: &[],
        position: Position::Aggregator,
        app: AppNeed::None,
        about: "FedBuff buffer under a top aggregator; replicas may share a group",
        run: entry::<fedbuff::AsyncMiddleAggregator>,
    },
    RoleEntry {
        kind: RoleKind::AsyncTrainer,
        aliases: &[],
        position: Position::Trainer,
        app: AppNeed::Trainer,
        about: "trainer that serves whichever aggregator sent a model, least recently served first",
        run: entry::<follow::AsyncTrainer>,
    },
    RoleEntry {
        kind: RoleKind::StragglerTrainer,
        aliases: &[],
        position: Position::Trainer,
        app: AppNeed::Trainer,
        about: "trainer made `factor` times slower when `slowTrainers` names its task index",
        run: entry::<fedbuff::StragglerTrainer>,
    },
    RoleEntry {
        kind: RoleKind::RingTrainer,
        aliases: &[],
        position: Position::Trainer,
        app: AppNeed::Trainer,
        about: "decentralised: peers average their models by ring all-reduce, no aggregator",
        run: entry::<ring::RingTrainer>,
    },
    RoleEntry {
        kind: RoleKind::HybridTrainer,
        aliases: &[],
        position: Position::Trainer,
        app: AppNeed::Trainer,
        about: "ring all-reduce within its group, an aggregator across groups",
        run: entry::<hybrid::HybridTrainer>,
    },
    RoleEntry {
        kind: RoleKind::VerticalFeatureParty,
        aliases: &[],
        position: Position::Party,
        app: AppNeed::FeatureParty,
        about: "split learning: holds feature columns and a bottom model, sends embeddings",
        run: entry::<vertical::FeatureParty>,
    },
    RoleEntry {
        kind: RoleKind::VerticalLabelParty,
        aliases: &[],
        position: Position::Party,
        app: AppNeed::LabelParty,
        about: "split learning: holds the labels and the top model, drives the batches",
        run: entry::<vertical::LabelParty>,
    },
    RoleEntry {
        kind: RoleKind::Coordinator,
        aliases: &[],
        position: Position::Coordinator,
        app: AppNeed::None,
        about: "assigns each round's trainers to live middle aggregators",
        run: entry::<coordinator::Coordinator>,
    },
    RoleEntry {
        kind: RoleKind::CoordinatedTopAggregator,
        aliases: &[],
        position: Position::Aggregator,
        app: AppNeed::Evaluator,
        about: "top aggregator that asks the coordinator which middle aggregators are active",
        run: entry::<coordinated::CoordinatedTopAggregator>,
    },
    RoleEntry {
        kind: RoleKind::CoordinatedMiddleAggregator,
        aliases: &[],
        position: Position::Aggregator,
        app: AppNeed::None,
        about: "middle aggregator that aggregates the trainers the coordinator assigns it",
        run: entry::<coordinated::CoordinatedMiddleAggregator>,
    },
    RoleEntry {
        kind: RoleKind::CoordinatedTrainer,
        aliases: &[],
        position: Position::Trainer,
        app: AppNeed::Trainer,
        about: "trainer that trains for the middle aggregator the coordinator assigns it",
        run: entry::<coordinated::CoordinatedTrainer>,
    },
];

/// The row answering to `name` (a name or an alias).
pub fn find(name: &str) -> Option<&'static RoleEntry> {
    ROLES.iter().find(|r| r.answers_to(name))
}

/// The row of `kind`.
pub fn entry_of(kind: RoleKind) -> &'static RoleEntry {
    ROLES.iter().find(|r| r.kind == kind).expect("every RoleKind has a row in ROLES")
}

/// The built-in names, in table order.
pub fn names() -> Vec<&'static str> {
    ROLES.iter().map(RoleEntry::name).collect()
}

/// The row for a name given by a user (`--role-kind`, `builtin = "…"`, `fledge.run(role=…)`),
/// or an error listing the names.
pub fn lookup(name: &str) -> Result<&'static RoleEntry> {
    find(name).ok_or_else(|| {
        Error::Config(format!("{name:?} is not a built-in role (one of: {})", names().join(", ")))
    })
}

/// The role to run for `config`: `name` when given, else the config's role name when it is a
/// built-in name or alias, else the role its function tags describe ([`RoleKind::infer`]).
pub fn resolve(name: Option<&str>, config: &TaskConfig) -> Result<&'static RoleEntry> {
    if let Some(name) = name {
        return lookup(name);
    }
    if let Some(entry) = find(&config.role) {
        return Ok(entry);
    }
    Ok(entry_of(RoleKind::infer(config)?))
}

/// Runs the task `config` as the role `name` (else resolved from the config, see
/// [`resolve`]) with user code from `factory`.
pub async fn run_named(
    name: Option<&str>,
    config: TaskConfig,
    factory: Arc<dyn AppFactory>,
    opts: RunOptions,
) -> Result<RunSummary> {
    let entry = resolve(name, &config)?;
    (entry.run)(config, factory, opts).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_one_row_and_names_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for row in ROLES {
            assert!(seen.insert(row.name()), "duplicate name {}", row.name());
            for alias in row.aliases {
                assert!(seen.insert(alias), "alias {alias} is taken twice");
            }
            assert_eq!(entry_of(row.kind).name(), row.name());
        }
        assert_eq!(ROLES.len(), 15);
    }

    #[test]
    fn lookup_names_the_choices() {
        assert_eq!(lookup("aggregator").expect("alias").kind, RoleKind::TopAggregator);
        let err = lookup("pytorch").unwrap_err().to_string();
        assert!(err.contains("pytorch") && err.contains("ring-trainer"), "{err}");
    }
}
