//! Fledge's SDK: the roles that train and aggregate, built from tasklets, plus the model
//! registry, metrics and the runner that starts a role from its task config.
//!
//! - [`role`]: one way to write a role. A [`Role`] names itself, the user code it drives and
//!   its program; [`role::run`] is the one runner every role goes through (open the task's
//!   [`TaskIo`], bound the run by `maxRunTime`, run the program, close the I/O).
//! - [`roles`]: the built-in roles, one file each: trainer, top and middle aggregators,
//!   FedBuff aggregators, the trainer that follows the sender, ring all-reduce, hybrid,
//!   vertical feature and label parties, coordinator and coordinated roles.
//! - [`table`]: the role table (name, aliases, position, user code, entry point) that
//!   `fledge run-task`, `fledge roles` and Python's `fledge.run` dispatch through.
//! - [`protocol`]: the data-plane message vocabulary ([`protocol::Command`], meta keys) and
//!   the checks of numbers peers send.
//! - [`composer`]: Flame's tasklet composer. A role is a list of named tasklets, some inside
//!   `loop_until` blocks; a new topology customises a role with `insert_before`/`after`,
//!   `replace`, `wrap` and `remove` by alias instead of forking it.
//! - [`registry`]: where round checkpoints, metrics and the final model go (a local directory).
//! - [`metrics`]: per-round metrics and the reporter that posts them to the control plane.
//! - [`runner`]: [`run_task`] runs one task from its [`TaskConfig`] (the role from the
//!   table); [`runner::simulate`] runs a whole job ([`plan::JobPlan`]: a tree, a ring or a
//!   vertical job) in one process over the local backend.
//!
//! User code plugs in through [`app`]: [`TrainerApp`], [`Evaluator`], [`FeatureApp`] and
//! [`LabelApp`], built per task by an [`AppFactory`]. This crate does not define models or
//! load data (the reference MNIST and vertical models live in `fledge-models`), and it does
//! not talk to brokers directly: `fledge-channel` does. `docs/writing-a-role.md` walks
//! through writing a role.
//!
//! Modules import downwards only: `app`, `composer`, `metrics`, `registry`, `protocol` →
//! `role` → `roles/*` → `table` → `runner`; no two files import each other.

#![deny(missing_docs)]

pub mod app;
pub mod composer;
pub mod convert;
mod error;
pub mod hyper;
pub mod metrics;
pub mod plan;
pub mod protocol;
pub mod registry;
pub mod role;
pub mod roles;
pub mod runner;
pub mod table;

pub use app::{AppFactory, AppNeed, Evaluator, FeatureApp, LabelApp, TrainOutcome, TrainerApp};
pub use error::{Error, Result};
pub use fledge_algorithms::{Tensor, Weights};
pub use fledge_types::TaskConfig;
pub use role::{RecordObserver, Role, RunOptions, RunSummary, TaskIo};
pub use runner::{run_task, run_task_with};
