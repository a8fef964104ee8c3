//! The interface between the roles and user code.
//!
//! User code touches data; the roles do everything else. A trainer role drives a
//! [`TrainerApp`]: it calls [`TrainerApp::initialize`] and [`TrainerApp::load_data`] once,
//! then each round [`TrainerApp::set_weights`] with the global model, [`TrainerApp::train`],
//! [`TrainerApp::evaluate`] and [`TrainerApp::get_weights`] for the update it uploads.
//! Methods are synchronous: the roles call them on a blocking thread, so they may compute
//! for as long as they need without stalling the network.
//!
//! The vertical (split-learning) parties drive a [`FeatureApp`] or a [`LabelApp`] instead;
//! an aggregator may take an [`Evaluator`]. An [`AppFactory`] builds whichever a role needs
//! ([`AppNeed`]).

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
/// evaluator for aggregators, the party apps of vertical learning.
///
/// Which one a role asks for is its [`AppNeed`] (`crate::role::Role::APP`).
pub trait AppFactory: Send + Sync + 'static {
    /// The trainer app for `config`.
    fn trainer(&self, config: &TaskConfig) -> anyhow::Result<Box<dyn TrainerApp>>;
    /// The evaluator for an aggregator task, if any (none by default).
    fn evaluator(&self, _config: &TaskConfig) -> anyhow::Result<Option<Box<dyn Evaluator>>> {
        Ok(None)
    }
    /// The feature party app of a vertical task (none by default: an error saying so).
    fn feature_party(&self, config: &TaskConfig) -> anyhow::Result<Box<dyn FeatureApp>> {
        anyhow::bail!("this user code has no feature party app for role {:?}", config.role)
    }
    /// The label party app of a vertical task (none by default: an error saying so).
    fn label_party(&self, config: &TaskConfig) -> anyhow::Result<Box<dyn LabelApp>> {
        anyhow::bail!("this user code has no label party app for role {:?}", config.role)
    }
}

/// The user code a role runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppNeed {
    /// None: the role only moves messages (coordinator, FedBuff middle aggregator).
    None,
    /// A [`TrainerApp`].
    Trainer,
    /// An optional [`Evaluator`].
    Evaluator,
    /// A [`FeatureApp`].
    FeatureParty,
    /// A [`LabelApp`].
    LabelParty,
}

impl AppNeed {
    /// The word `fledge roles` prints.
    pub fn name(self) -> &'static str {
        match self {
            AppNeed::None => "none",
            AppNeed::Trainer => "trainer",
            AppNeed::Evaluator => "evaluator",
            AppNeed::FeatureParty => "feature-party",
            AppNeed::LabelParty => "label-party",
        }
    }

    /// Builds the user code this need names from `factory`.
    pub fn create(self, factory: &dyn AppFactory, config: &TaskConfig) -> crate::Result<UserApp> {
        let app = match self {
            AppNeed::None => Ok(UserApp::None),
            AppNeed::Trainer => factory.trainer(config).map(UserApp::Trainer),
            AppNeed::Evaluator => factory.evaluator(config).map(UserApp::Evaluator),
            AppNeed::FeatureParty => factory.feature_party(config).map(UserApp::FeatureParty),
            AppNeed::LabelParty => factory.label_party(config).map(UserApp::LabelParty),
        };
        app.map_err(|source| crate::Error::App { step: "create", source })
    }
}

/// The user code a role was built with (see [`AppNeed`]).
pub enum UserApp {
    /// No user code.
    None,
    /// A trainer app.
    Trainer(Box<dyn TrainerApp>),
    /// An evaluator, if the user code has one.
    Evaluator(Option<Box<dyn Evaluator>>),
    /// A feature party app.
    FeatureParty(Box<dyn FeatureApp>),
    /// A label party app.
    LabelParty(Box<dyn LabelApp>),
}

impl UserApp {
    fn wrong(&self, wanted: AppNeed) -> crate::Error {
        let got = match self {
            UserApp::None => AppNeed::None,
            UserApp::Trainer(_) => AppNeed::Trainer,
            UserApp::Evaluator(_) => AppNeed::Evaluator,
            UserApp::FeatureParty(_) => AppNeed::FeatureParty,
            UserApp::LabelParty(_) => AppNeed::LabelParty,
        };
        crate::Error::Config(format!(
            "the role needs user code of kind {}, was given {}",
            wanted.name(),
            got.name()
        ))
    }

    /// The trainer app.
    pub fn trainer(self) -> crate::Result<Box<dyn TrainerApp>> {
        match self {
            UserApp::Trainer(app) => Ok(app),
            other => Err(other.wrong(AppNeed::Trainer)),
        }
    }

    /// The evaluator (none is fine).
    pub fn evaluator(self) -> crate::Result<Option<Box<dyn Evaluator>>> {
        match self {
            UserApp::Evaluator(app) => Ok(app),
            UserApp::None => Ok(None),
            other => Err(other.wrong(AppNeed::Evaluator)),
        }
    }

    /// The feature party app.
    pub fn feature_party(self) -> crate::Result<Box<dyn FeatureApp>> {
        match self {
            UserApp::FeatureParty(app) => Ok(app),
            other => Err(other.wrong(AppNeed::FeatureParty)),
        }
    }

    /// The label party app.
    pub fn label_party(self) -> crate::Result<Box<dyn LabelApp>> {
        match self {
            UserApp::LabelParty(app) => Ok(app),
            other => Err(other.wrong(AppNeed::LabelParty)),
        }
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

// ---- vertical (split-learning) parties -------------------------------------------------

/// Which aligned rows a request is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Training rows (the party keeps what its backward pass needs).
    Train,
    /// Held-out rows (no backward pass follows).
    Test,
}

impl Split {
    /// `train` or `test`.
    pub fn word(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }

    pub(crate) fn parse(word: &str) -> Option<Split> {
        match word {
            "train" => Some(Split::Train),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

/// A batch of embeddings (or of their gradients): `rows × dim` values, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    /// Values per row.
    pub dim: usize,
    /// `rows * dim` values.
    pub values: Vec<f32>,
}

impl Embedding {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.values.len().checked_div(self.dim).unwrap_or(0)
    }
}

/// User code of a feature party: its table and its bottom model. Methods are synchronous;
/// the role calls them on a blocking thread.
pub trait FeatureApp: Send + 'static {
    /// Reads hyperparameters, loads this party's table (`config.dataset`), builds the bottom
    /// model; returns the sample ids the table holds.
    fn load(&mut self, config: &TaskConfig) -> anyhow::Result<Vec<String>>;
    /// Values per embedding row.
    fn embedding_dim(&self) -> usize;
    /// Keeps the rows of `train` then `test` (every id is in the table), in that order, and
    /// standardises the columns with statistics of the `train` rows only.
    fn align(&mut self, train: &[String], test: &[String]) -> anyhow::Result<()>;
    /// Embeddings of aligned rows `rows` of `split`. For [`Split::Train`] the app keeps what
    /// [`FeatureApp::backward`] needs.
    fn embed(&mut self, split: Split, rows: &[usize]) -> anyhow::Result<Embedding>;
    /// Back-propagates the gradient of the loss with respect to the last train embedding and
    /// steps the bottom model.
    fn backward(&mut self, gradient: &Embedding) -> anyhow::Result<()>;
    /// The bottom model's weights.
    fn weights(&self) -> anyhow::Result<Weights>;
    /// Replaces them with `weights`, which [`FeatureApp::weights`] returned before: when the
    /// label party was restarted and resumes from its last saved round, the party goes back
    /// to its bottom model of that round, so the run goes on as if nothing had happened. By
    /// default an app cannot, and the party goes on with its bottom model as trained so far.
    fn set_weights(&mut self, weights: &Weights) -> anyhow::Result<()> {
        let _ = weights;
        anyhow::bail!("this feature party's user code does not implement FeatureApp::set_weights")
    }
}

/// What one training step of the label party produced.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutcome {
    /// Mean loss of the batch.
    pub loss: f64,
    /// Gradient of that loss with respect to each party's embedding, in the order given.
    pub gradients: Vec<Embedding>,
}

/// User code of the label party: its labelled table (maybe with columns of its own), the top
/// model and the loss. Methods are synchronous; the role calls them on a blocking thread.
pub trait LabelApp: Send + 'static {
    /// Reads hyperparameters and loads this party's labelled table; returns its sample ids.
    fn load(&mut self, config: &TaskConfig) -> anyhow::Result<Vec<String>>;
    /// Keeps the rows of `train` then `test` in that order, and builds the top model over
    /// embeddings of `dims` values from the feature parties (in the order of later calls).
    fn align(&mut self, train: &[String], test: &[String], dims: &[usize]) -> anyhow::Result<()>;
    /// One optimisation step on train rows `rows` given the parties' embeddings of them.
    fn train_step(
        &mut self,
        rows: &[usize],
        embeddings: &[Embedding],
    ) -> anyhow::Result<StepOutcome>;
    /// Metrics (e.g. `loss`, `accuracy`) on test rows `rows` given their embeddings.
    fn evaluate(
        &mut self,
        rows: &[usize],
        embeddings: &[Embedding],
    ) -> anyhow::Result<BTreeMap<String, f64>>;
    /// The top model's weights (and those of the party's own bottom model, if any).
    fn weights(&self) -> anyhow::Result<Weights>;
    /// Replaces them (after [`LabelApp::align`]) with `weights`, which [`LabelApp::weights`]
    /// returned before: a label party restarted after a crash resumes from the weights it
    /// saved after its last round (`docs/fault-tolerance.md`). Optimizer state beyond the
    /// weights is the app's to keep or lose. By default an app cannot, so a restarted label
    /// party fails saying so.
    fn set_weights(&mut self, weights: &Weights) -> anyhow::Result<()> {
        let _ = weights;
        anyhow::bail!(
            "this label party's user code does not implement LabelApp::set_weights, so it \
             cannot resume after a restart"
        )
    }
}
