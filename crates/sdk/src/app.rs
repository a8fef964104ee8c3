//! The interface between the roles and user code.
//!
//! User code touches data; the roles do everything else. A trainer role drives a
//! [`TrainerApp`]: it calls [`TrainerApp::initialize`] and [`TrainerApp::load_data`] once,
//! then each round [`TrainerApp::set_weights`] with the global model, [`TrainerApp::train`],
//! [`TrainerApp::evaluate`] and [`TrainerApp::get_weights`] for the update it uploads.
//! Methods are synchronous: the roles call them on a blocking thread, so they may compute
//! for as long as they need without stalling the network.

use std::collections::BTreeMap;
use std::sync::Arc;

use fledge_algorithms::Weights;
use fledge_types::TaskConfig;

/// What one local training call produced.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrainOutcome {
    /// Samples the update was trained on (the FedAvg weight).
    pub num_samples: u64,
    /// Free metrics, e.g. `loss` (reported as `train_loss`).
    pub metrics: BTreeMap<String, f64>,
}

/// User code of a trainer.
pub trait TrainerApp: Send + 'static {
    /// Reads hyperparameters and builds the model (called once, first).
    fn initialize(&mut self, config: &TaskConfig) -> anyhow::Result<()>;
    /// Loads this task's data (`config.dataset`), called once after `initialize`.
    fn load_data(&mut self) -> anyhow::Result<()>;
    /// Trains locally for `round` (1-based) from the current weights.
    fn train(&mut self, round: u64) -> anyhow::Result<TrainOutcome>;
    /// Evaluates the current weights (e.g. `loss`, `accuracy` on local test data).
    fn evaluate(&mut self) -> anyhow::Result<BTreeMap<String, f64>>;
    /// The current weights.
    fn get_weights(&self) -> anyhow::Result<Weights>;
    /// Replaces the weights (the global model of a round).
    fn set_weights(&mut self, weights: &Weights) -> anyhow::Result<()>;
}

/// Optional user code of an aggregator: evaluates the global model after each round
/// (e.g. on a held-out test set) so the job's accuracy is measured where the model is.
pub trait Evaluator: Send + 'static {
    /// Metrics of `weights`, e.g. `loss` and `accuracy`.
    fn evaluate(&mut self, weights: &Weights) -> anyhow::Result<BTreeMap<String, f64>>;
}

/// Builds the user code of a task: a trainer app for data-consuming roles, an optional
/// evaluator for aggregators.
pub trait AppFactory: Send + Sync + 'static {
    /// The trainer app for `config`.
    fn trainer(&self, config: &TaskConfig) -> anyhow::Result<Box<dyn TrainerApp>>;
    /// The evaluator for an aggregator task, if any (none by default).
    fn evaluator(&self, _config: &TaskConfig) -> anyhow::Result<Option<Box<dyn Evaluator>>> {
        Ok(None)
    }
}

/// An [`AppFactory`] from a closure that builds trainer apps (no evaluator).
pub struct FnFactory<F>(pub F);

impl<F> AppFactory for FnFactory<F>
where
    F: Fn(&TaskConfig) -> anyhow::Result<Box<dyn TrainerApp>> + Send + Sync + 'static,
{
    fn trainer(&self, config: &TaskConfig) -> anyhow::Result<Box<dyn TrainerApp>> {
        (self.0)(config)
    }
}

/// Shared handle to a factory.
pub type SharedFactory = Arc<dyn AppFactory>;
