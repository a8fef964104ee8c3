//! Fledge's SDK: the roles that train and aggregate, built from tasklets, plus the model
//! registry, metrics and the runner that starts a role from its task config.
//!
//! - [`composer`]: Flame's tasklet composer. A role is a list of named tasklets, some inside
//!   `loop_until` blocks; a new topology customises a role with `insert_before`/`after`,
//!   `replace` and `remove` by alias instead of forking it.
//! - [`roles`]: [`roles::trainer`] (calls user code through [`TrainerApp`]),
//!   [`roles::aggregator`] (top and middle aggregators, synchronous rounds, streaming
//!   aggregation with `fledge-algorithms`, quorum and liveness).
//! - [`registry`]: where round checkpoints, metrics and the final model go (a local directory).
//! - [`metrics`]: per-round metrics and the reporter that posts them to the control plane.
//! - [`runner`]: [`run_task`] runs one task from its [`TaskConfig`]; [`runner::simulate`]
//!   runs a whole job in one process over the local backend.
//!
//! This crate does not define models or load data: user code does, through [`TrainerApp`]
//! (the reference MNIST trainer lives in `fledge-models`). It does not talk to brokers
//! directly either: `fledge-channel` does.
//!
//! # Wire protocol between the roles
//!
//! | from → to | kind | round | tensors | meta |
//! |---|---|---|---|---|
//! | aggregator → trainer | `Weights` | r (1-based) | global model | `model_version` in the header |
//! | trainer → aggregator | `Update` | r | local weights | `num_samples`, `metrics` |
//! | aggregator → one trainer | `Control` | 0 | none | `command: "init_model"` |
//! | that trainer → aggregator | `Weights` | 0 | its initial weights | |
//! | aggregator → trainers | `EndOfTraining` | last | final model | |

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
pub use role::{Role, RunOptions, RunSummary, TaskIo};
pub use runner::{run_task, run_task_with};
