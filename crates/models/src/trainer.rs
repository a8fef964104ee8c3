//! The reference MNIST trainer (built-in name `mnist-mlp-trainer`) and the aggregator-side
//! evaluator, as [`fledge_sdk`] user code.
//!
//! Hyperparameters (task config): `epochs` (default 1), `batchSize` (32), `learningRate`
//! (0.1; `lr` also accepted), `seed` (0: the model's initial weights and the minibatch
//! shuffle), `hidden` (128). The dataset comes from the task config's `dataset.url` in the
//! [`crate::url`] convention. The top aggregator's evaluator reads the test set of the
//! directory named by hyperparameter `evalDataset` (a URL or path in the same convention).

use std::collections::BTreeMap;
use std::sync::Arc;

use fledge_sdk::{AppFactory, Evaluator, TaskConfig, TrainOutcome, TrainerApp, Weights};
use serde_json::{Map, Value};

use crate::data::{Dataset, Split, load_mnist};
use crate::mlp::{Mlp, MlpConfig, SgdConfig};
use crate::partition;
use crate::url::{DatasetUrl, Partition};
use crate::{Error, Result};

/// The built-in name of [`MnistTrainer`].
pub const BUILTIN_NAME: &str = "mnist-mlp-trainer";

/// Training settings read from hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainSettings {
    /// Local SGD.
    pub sgd: SgdConfig,
    /// Hidden units.
    pub hidden: usize,
    /// Seed of the initial weights.
    pub seed: u64,
}

fn hp_uint(h: &Map<String, Value>, name: &str, default: u64, min: u64) -> Result<u64> {
    fledge_sdk::hyper::uint(h, name, default, min)
        .map_err(|e| Error::Hyperparameter { name: name.to_owned(), reason: e.to_string() })
}

impl TrainSettings {
    /// Reads the hyperparameters.
    pub fn from_hyperparameters(h: &Map<String, Value>) -> Result<TrainSettings> {
        let lr_name = if h.contains_key("learningRate") { "learningRate" } else { "lr" };
        let lr = fledge_sdk::hyper::positive(h, lr_name, 0.1).map_err(|e| {
            Error::Hyperparameter { name: lr_name.to_owned(), reason: e.to_string() }
        })?;
        let seed = hp_uint(h, "seed", 0, 0)?;
        Ok(TrainSettings {
            sgd: SgdConfig {
                lr,
                batch_size: hp_uint(h, "batchSize", 32, 1)? as usize,
                epochs: hp_uint(h, "epochs", 1, 1)? as usize,
                seed,
            },
            hidden: hp_uint(h, "hidden", 128, 1)? as usize,
            seed,
        })
    }
}

/// Loads the training shard a dataset URL names.
pub fn load_shard(url: &DatasetUrl) -> Result<Dataset> {
    let mut train = load_mnist(&url.dir, Split::Train)?;
    if let Some(limit) = url.limit {
        train = train.head(limit);
    }
    let Some((shard, shards)) = url.shard else {
        return Ok(train);
    };
    let parts = match url.partition {
        Partition::Iid => partition::iid(train.len(), shards, url.seed)?,
        Partition::Dirichlet { alpha } => {
            partition::dirichlet(&train.labels, shards, alpha, url.seed)?
        }
    };
    Ok(train.subset(&parts[shard]))
}

/// The shuffle seed of local training in `round`: a different data order every round,
/// reproducible from the job's `seed` (the orders are [`crate::mlp::epoch_orders`] of it).
pub fn round_seed(seed: u64, round: u64) -> u64 {
    seed.wrapping_mul(1_000_003).wrapping_add(round)
}

/// The MNIST MLP trainer.
#[derive(Debug, Default)]
pub struct MnistTrainer {
    settings: Option<TrainSettings>,
    url: Option<DatasetUrl>,
    model: Option<Mlp>,
    train: Option<Dataset>,
    test: Option<Dataset>,
}

impl MnistTrainer {
    /// A trainer to be initialised from its task config.
    pub fn new() -> MnistTrainer {
        MnistTrainer::default()
    }

    fn model(&mut self) -> anyhow::Result<&mut Mlp> {
        self.model.as_mut().ok_or_else(|| anyhow::anyhow!("initialize was not called"))
    }
}

impl TrainerApp for MnistTrainer {
    fn initialize(&mut self, config: &TaskConfig) -> anyhow::Result<()> {
        let settings = TrainSettings::from_hyperparameters(&config.hyperparameters)?;
        let dataset = config.dataset.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "task {} has no dataset; the MNIST trainer needs dataset.url",
                config.task_id
            )
        })?;
        self.url = Some(DatasetUrl::parse(&dataset.url)?);
        self.model = Some(Mlp::new(MlpConfig {
            hidden: settings.hidden,
            ..MlpConfig::mnist(settings.seed)
        })?);
        self.settings = Some(settings);
        Ok(())
    }

    fn load_data(&mut self) -> anyhow::Result<()> {
        let url = self.url.as_ref().ok_or_else(|| anyhow::anyhow!("initialize was not called"))?;
        let train = load_shard(url)?;
        tracing::info!(rows = train.len(), classes = ?train.class_counts(), "training shard loaded");
        self.test = Some(load_mnist(&url.dir, Split::Test)?);
        self.train = Some(train);
        Ok(())
    }

    fn train(&mut self, round: u64) -> anyhow::Result<TrainOutcome> {
        let settings = self.settings.ok_or_else(|| anyhow::anyhow!("initialize was not called"))?;
        let train = self.train.take().ok_or_else(|| anyhow::anyhow!("load_data was not called"))?;
        let sgd = SgdConfig { seed: round_seed(settings.sgd.seed, round), ..settings.sgd };
        let res = self.model().and_then(|m| Ok(m.train(&train, sgd)?));
        self.train = Some(train);
        let stats = res?;
        Ok(TrainOutcome {
            num_samples: stats.num_samples as u64,
            metrics: BTreeMap::from([("loss".to_owned(), stats.loss)]),
        })
    }

    fn evaluate(&mut self) -> anyhow::Result<BTreeMap<String, f64>> {
        let test = self.test.take().ok_or_else(|| anyhow::anyhow!("load_data was not called"))?;
        let res = self.model().and_then(|m| Ok(m.evaluate(&test)?));
        self.test = Some(test);
        let stats = res?;
        Ok(BTreeMap::from([
            ("loss".to_owned(), stats.loss),
            ("accuracy".to_owned(), stats.accuracy),
        ]))
    }

    fn get_weights(&self) -> anyhow::Result<Weights> {
        let model =
            self.model.as_ref().ok_or_else(|| anyhow::anyhow!("initialize was not called"))?;
        Ok(model.weights()?)
    }

    fn set_weights(&mut self, weights: &Weights) -> anyhow::Result<()> {
        Ok(self.model()?.set_weights(weights)?)
    }
}

/// Evaluates global models on the MNIST test set.
#[derive(Debug)]
pub struct MnistEvaluator {
    model: Mlp,
    test: Dataset,
}

impl MnistEvaluator {
    /// An evaluator of models of `hidden` units on the test set in `url`'s directory.
    pub fn new(url: &str, hidden: usize) -> Result<MnistEvaluator> {
        let url = DatasetUrl::parse(url)?;
        Ok(MnistEvaluator {
            model: Mlp::new(MlpConfig { hidden, ..MlpConfig::mnist(0) })?,
            test: load_mnist(&url.dir, Split::Test)?,
        })
    }
}

impl Evaluator for MnistEvaluator {
    fn evaluate(&mut self, weights: &Weights) -> anyhow::Result<BTreeMap<String, f64>> {
        self.model.set_weights(weights)?;
        let stats = self.model.evaluate(&self.test)?;
        Ok(BTreeMap::from([
            ("loss".to_owned(), stats.loss),
            ("accuracy".to_owned(), stats.accuracy),
        ]))
    }
}

/// The [`AppFactory`] of the MNIST example: [`MnistTrainer`] for trainers, an
/// [`MnistEvaluator`] for aggregators whose hyperparameters name `evalDataset`, and the candle
/// parties of [`crate::vertical`] for the vertical roles.
#[derive(Clone, Copy, Debug, Default)]
pub struct MnistFactory;

impl MnistFactory {
    /// The factory, shared.
    pub fn shared() -> Arc<dyn AppFactory> {
        Arc::new(MnistFactory)
    }
}

impl AppFactory for MnistFactory {
    fn trainer(&self, _config: &TaskConfig) -> anyhow::Result<Box<dyn TrainerApp>> {
        Ok(Box::new(MnistTrainer::new()))
    }

    fn evaluator(&self, config: &TaskConfig) -> anyhow::Result<Option<Box<dyn Evaluator>>> {
        let h = &config.hyperparameters;
        let Some(url) = fledge_sdk::hyper::string(h, "evalDataset")? else {
            return Ok(None);
        };
        let hidden = hp_uint(h, "hidden", 128, 1)? as usize;
        Ok(Some(Box::new(MnistEvaluator::new(&url, hidden)?)))
    }

    /// The candle bottom model of vertical learning ([`crate::vertical::FeatureParty`]).
    fn feature_party(
        &self,
        _config: &TaskConfig,
    ) -> anyhow::Result<Box<dyn fledge_sdk::FeatureApp>> {
        Ok(Box::new(crate::vertical::FeatureParty::new()))
    }

    /// The candle top model of vertical learning ([`crate::vertical::LabelParty`]).
    fn label_party(&self, _config: &TaskConfig) -> anyhow::Result<Box<dyn fledge_sdk::LabelApp>> {
        Ok(Box::new(crate::vertical::LabelParty::new()))
    }
}
