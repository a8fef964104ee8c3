//! Split-learning models on candle for vertical FL (the user code of
//! [`fledge_sdk::roles::vertical`]): [`FeatureParty`] and [`LabelParty`].
//!
//! - Bottom model (each feature party, and the label party if its table has features):
//!   `Linear(columns → embeddingDim)` then ReLU.
//! - Top model (the label party): `Linear(Σ embeddingDim → classes)` over the concatenated
//!   embeddings (feature parties in task-id order, then the label party's own), trained with
//!   cross-entropy.
//!
//! Both train by plain SGD (`learningRate`). The label party's gradient with respect to each
//! embedding comes from candle's autodiff (the embeddings enter its graph as variables); the
//! feature party back-propagates it by calling `backward` on `sum(embedding ⊙ gradient)`,
//! whose gradient with respect to its weights is exactly the chain rule's. So split training
//! computes the same updates as training the whole network in one place.
//!
//! Hyperparameters: `learningRate` (0.1), `embeddingDim` (16), `seed` (0; initial weights),
//! `idColumn` (`id`), `labelColumn` (`label`), `classes` (2). The dataset URL names the
//! party's CSV ([`crate::vertical_data`]).
//!
//! [`centralised`] trains the comparison model: one MLP on all features with as many hidden
//! units as the split model has embedding units in total.

use std::collections::BTreeMap;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use fledge_sdk::roles::vertical::{Embedding, FeatureApp, LabelApp, Split, StepOutcome};
use fledge_sdk::{TaskConfig, Weights};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

use crate::data::Dataset;
use crate::mlp::{EvalStats, Mlp, MlpConfig, SgdConfig};
use crate::vertical_data::{PartyTable, Standardizer, table_path};
use crate::{Error, Result};

/// Settings read from hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub struct VerticalSettings {
    /// SGD learning rate.
    pub lr: f64,
    /// Values per embedding row.
    pub embedding_dim: usize,
    /// Seed of the initial weights.
    pub seed: u64,
    /// Name of the id column.
    pub id_column: String,
    /// Name of the label column (label party).
    pub label_column: String,
    /// Number of classes.
    pub classes: usize,
}

fn hp<T>(name: &str, res: fledge_sdk::Result<T>) -> Result<T> {
    res.map_err(|e| Error::Hyperparameter { name: name.to_owned(), reason: e.to_string() })
}

impl VerticalSettings {
    /// Reads the hyperparameters.
    pub fn from_hyperparameters(h: &Map<String, Value>) -> Result<VerticalSettings> {
        use fledge_sdk::hyper;
        let string = |name: &str, default: &str| -> Result<String> {
            Ok(hp(name, hyper::string(h, name))?.unwrap_or_else(|| default.to_owned()))
        };
        Ok(VerticalSettings {
            lr: hp("learningRate", hyper::positive(h, "learningRate", 0.1))?,
            embedding_dim: hp("embeddingDim", hyper::uint(h, "embeddingDim", 16, 1))? as usize,
            seed: hp("seed", hyper::uint(h, "seed", 0, 0))?,
            id_column: string("idColumn", "id")?,
            label_column: string("labelColumn", "label")?,
            classes: hp("classes", hyper::uint(h, "classes", 2, 2))? as usize,
        })
    }
}

/// A linear layer whose weights are candle variables.
struct Linear {
    weight: Var,
    bias: Var,
}

impl Linear {
    /// PyTorch's `nn.Linear` initialisation (uniform in ±1/sqrt(fan_in)) from `seed`.
    fn new(input: usize, output: usize, seed: u64, device: &Device) -> Result<Linear> {
        let mut rng = StdRng::seed_from_u64(seed);
        let bound = 1.0 / (input.max(1) as f32).sqrt();
        let mut values =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
        Ok(Linear {
            weight: Var::from_vec(values(output * input), (output, input), device)?,
            bias: Var::from_vec(values(output), output, device)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight.as_tensor().t()?)?.broadcast_add(self.bias.as_tensor())
    }

    fn vars(&self) -> Vec<Var> {
        vec![self.weight.clone(), self.bias.clone()]
    }

    /// Sets the weights [`Linear::push_weights`] pushed under `prefix`, in place (an
    /// optimizer over these variables keeps working on them).
    fn set_weights(&self, prefix: &str, weights: &Weights) -> anyhow::Result<()> {
        for (name, var) in [("weight", &self.weight), ("bias", &self.bias)] {
            let full = format!("{prefix}.{name}");
            let t = weights.get(&full).ok_or_else(|| anyhow::anyhow!("no tensor {full}"))?;
            if t.shape() != var.dims() {
                anyhow::bail!(
                    "tensor {full} has shape {:?}, the model {:?}",
                    t.shape(),
                    var.dims()
                );
            }
            var.set(&Tensor::from_slice(t.data(), t.shape(), var.device())?)?;
        }
        Ok(())
    }

    fn push_weights(&self, prefix: &str, res: &mut Weights) -> Result<()> {
        for (name, var) in [("weight", &self.weight), ("bias", &self.bias)] {
            let data = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let tensor = fledge_algorithms::Tensor::new(
                format!("{prefix}.{name}"),
                var.dims().to_vec(),
                data,
            )
            .map_err(|e| Error::Weights(e.to_string()))?;
            res.push(tensor).map_err(|e| Error::Weights(e.to_string()))?;
        }
        Ok(())
    }
}

/// The aligned, standardised features of one party, train rows then test rows.
struct Aligned {
    train: Tensor,
    test: Tensor,
}

impl Aligned {
    fn new(
        table: &PartyTable,
        train: &[String],
        test: &[String],
        device: &Device,
    ) -> Result<Aligned> {
        let dim = table.dim();
        let mut train_rows = table.select(train)?.features;
        let mut test_rows = table.select(test)?.features;
        let scaler = Standardizer::fit(&train_rows, dim);
        scaler.apply(&mut train_rows);
        scaler.apply(&mut test_rows);
        Ok(Aligned {
            train: Tensor::from_vec(train_rows, (train.len(), dim), device)?,
            test: Tensor::from_vec(test_rows, (test.len(), dim), device)?,
        })
    }

    fn rows(&self, split: Split, rows: &[usize]) -> Result<Tensor> {
        let all = match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        };
        let n = all.dim(0)?;
        if let Some(bad) = rows.iter().find(|r| **r >= n) {
            return Err(Error::Weights(format!("row {bad} of {n} aligned rows requested")));
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = Tensor::from_vec(idx, rows.len(), all.device())?;
        Ok(all.index_select(&idx, 0)?)
    }
}

fn load_table(
    config: &TaskConfig,
    settings: &VerticalSettings,
    labels: bool,
) -> Result<PartyTable> {
    let dataset = config.dataset.as_ref().ok_or_else(|| Error::Url {
        url: String::new(),
        reason: format!("task {} has no dataset; a vertical party needs its table", config.task_id),
    })?;
    let path = table_path(&dataset.url)?;
    let label_column = labels.then_some(settings.label_column.as_str());
    PartyTable::load(&path, &settings.id_column, label_column, settings.classes)
}

/// A feature party: its table and bottom model.
#[derive(Default)]
pub struct FeatureParty {
    settings: Option<VerticalSettings>,
    table: Option<PartyTable>,
    bottom: Option<Linear>,
    optimizer: Option<candle_nn::SGD>,
    aligned: Option<Aligned>,
    /// The last train embedding, with its graph, until its gradient comes back.
    pending: Option<Tensor>,
}

impl std::fmt::Debug for FeatureParty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureParty").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl FeatureParty {
    /// A party to be loaded from its task config.
    pub fn new() -> FeatureParty {
        FeatureParty::default()
    }

    fn bottom(&self) -> anyhow::Result<&Linear> {
        self.bottom.as_ref().ok_or_else(|| anyhow::anyhow!("load was not called"))
    }
}

impl FeatureApp for FeatureParty {
    fn load(&mut self, config: &TaskConfig) -> anyhow::Result<Vec<String>> {
        let settings = VerticalSettings::from_hyperparameters(&config.hyperparameters)?;
        let table = load_table(config, &settings, false)?;
        // Parties differ in their first seed so that equal shapes do not start equal.
        let seed = settings.seed.wrapping_add(1 + u64::from(config.task_index));
        let bottom = Linear::new(table.dim(), settings.embedding_dim, seed, &Device::Cpu)?;
        self.optimizer = Some(candle_nn::SGD::new(bottom.vars(), settings.lr)?);
        self.bottom = Some(bottom);
        let ids = table.ids.clone();
        tracing::info!(rows = ids.len(), columns = table.dim(), "feature table loaded");
        self.table = Some(table);
        self.settings = Some(settings);
        Ok(ids)
    }

    fn embedding_dim(&self) -> usize {
        self.settings.as_ref().map(|s| s.embedding_dim).unwrap_or(0)
    }

    fn align(&mut self, train: &[String], test: &[String]) -> anyhow::Result<()> {
        let table = self.table.as_ref().ok_or_else(|| anyhow::anyhow!("load was not called"))?;
        self.aligned = Some(Aligned::new(table, train, test, &Device::Cpu)?);
        Ok(())
    }

    fn embed(&mut self, split: Split, rows: &[usize]) -> anyhow::Result<Embedding> {
        let aligned =
            self.aligned.as_ref().ok_or_else(|| anyhow::anyhow!("align was not called"))?;
        let x = aligned.rows(split, rows)?;
        let embedding = self.bottom()?.forward(&x)?.relu()?;
        let values = embedding.flatten_all()?.to_vec1::<f32>()?;
        if split == Split::Train {
            self.pending = Some(embedding);
        }
        Ok(Embedding { dim: self.embedding_dim(), values })
    }

    fn backward(&mut self, gradient: &Embedding) -> anyhow::Result<()> {
        let embedding = self
            .pending
            .take()
            .ok_or_else(|| anyhow::anyhow!("a gradient arrived without a train embedding"))?;
        let gradient =
            Tensor::from_slice(&gradient.values, (gradient.rows(), gradient.dim), &Device::Cpu)?;
        if gradient.dims() != embedding.dims() {
            anyhow::bail!(
                "gradient of shape {:?} for an embedding of shape {:?}",
                gradient.dims(),
                embedding.dims()
            );
        }
        // d/dθ sum(e(θ) ⊙ g) = (∂e/∂θ)ᵀ g: the chain rule with the label party's gradient.
        let grads = (embedding * gradient)?.sum_all()?.backward()?;
        let optimizer =
            self.optimizer.as_mut().ok_or_else(|| anyhow::anyhow!("load was not called"))?;
        optimizer.step(&grads)?;
        Ok(())
    }

    fn weights(&self) -> anyhow::Result<Weights> {
        let mut res = Weights::new();
        self.bottom()?.push_weights("bottom", &mut res)?;
        Ok(res)
    }

    fn set_weights(&mut self, weights: &Weights) -> anyhow::Result<()> {
        if weights.tensors().len() != 2 {
            anyhow::bail!("{} tensors for a bottom model of 2", weights.tensors().len());
        }
        self.bottom()?.set_weights("bottom", weights)
    }
}

/// The label party: labels, maybe a bottom model of its own columns, and the top model.
#[derive(Default)]
pub struct LabelParty {
    settings: Option<VerticalSettings>,
    table: Option<PartyTable>,
    own: Option<Linear>,
    own_rows: Option<Aligned>,
    top: Option<Linear>,
    optimizer: Option<candle_nn::SGD>,
    train_labels: Option<Tensor>,
    test_labels: Option<Tensor>,
}

impl std::fmt::Debug for LabelParty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabelParty").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl LabelParty {
    /// A party to be loaded from its task config.
    pub fn new() -> LabelParty {
        LabelParty::default()
    }

    /// Logits of `rows` of `split` from the parties' embeddings (as graph inputs) and, if
    /// any, this party's own embedding.
    fn logits(&self, split: Split, rows: &[usize], inputs: &[Tensor]) -> anyhow::Result<Tensor> {
        let top = self.top.as_ref().ok_or_else(|| anyhow::anyhow!("align was not called"))?;
        let mut parts: Vec<Tensor> = inputs.to_vec();
        if let (Some(own), Some(own_rows)) = (&self.own, &self.own_rows) {
            parts.push(own.forward(&own_rows.rows(split, rows)?)?.relu()?);
        }
        Ok(top.forward(&Tensor::cat(&parts, 1)?)?)
    }

    fn labels(&self, split: Split, rows: &[usize]) -> anyhow::Result<Tensor> {
        let all = match split {
            Split::Train => self.train_labels.as_ref(),
            Split::Test => self.test_labels.as_ref(),
        }
        .ok_or_else(|| anyhow::anyhow!("align was not called"))?;
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        Ok(all.index_select(&Tensor::from_vec(idx, rows.len(), &Device::Cpu)?, 0)?)
    }
}

fn check_embeddings(rows: &[usize], embeddings: &[Embedding]) -> anyhow::Result<()> {
    if let Some(e) =
        embeddings.iter().find(|e| e.rows() != rows.len() || e.values.len() % e.dim.max(1) != 0)
    {
        anyhow::bail!(
            "an embedding of {} values (dim {}) for {} rows",
            e.values.len(),
            e.dim,
            rows.len()
        );
    }
    Ok(())
}

impl LabelApp for LabelParty {
    fn load(&mut self, config: &TaskConfig) -> anyhow::Result<Vec<String>> {
        let settings = VerticalSettings::from_hyperparameters(&config.hyperparameters)?;
        let table = load_table(config, &settings, true)?;
        if table.dim() > 0 {
            self.own = Some(Linear::new(
                table.dim(),
                settings.embedding_dim,
                settings.seed.wrapping_add(1_000),
                &Device::Cpu,
            )?);
        }
        let ids = table.ids.clone();
        tracing::info!(rows = ids.len(), columns = table.dim(), "labelled table loaded");
        self.table = Some(table);
        self.settings = Some(settings);
        Ok(ids)
    }

    fn align(&mut self, train: &[String], test: &[String], dims: &[usize]) -> anyhow::Result<()> {
        let (Some(table), Some(settings)) = (&self.table, &self.settings) else {
            anyhow::bail!("load was not called");
        };
        let labels = |ids: &[String]| -> anyhow::Result<Tensor> {
            let rows = table.select(ids)?;
            let labels: Vec<u32> = rows
                .labels
                .expect("the label party's table has labels")
                .into_iter()
                .map(u32::from)
                .collect();
            Ok(Tensor::from_vec(labels, ids.len(), &Device::Cpu)?)
        };
        self.train_labels = Some(labels(train)?);
        self.test_labels = Some(labels(test)?);
        let own_dim = if self.own.is_some() { settings.embedding_dim } else { 0 };
        if self.own.is_some() {
            self.own_rows = Some(Aligned::new(table, train, test, &Device::Cpu)?);
        }
        let input = dims.iter().sum::<usize>() + own_dim;
        if input == 0 {
            anyhow::bail!("no embeddings to train on: no feature party and no own features");
        }
        let top = Linear::new(input, settings.classes, settings.seed, &Device::Cpu)?;
        let mut vars = top.vars();
        if let Some(own) = &self.own {
            vars.extend(own.vars());
        }
        self.optimizer = Some(candle_nn::SGD::new(vars, settings.lr)?);
        self.top = Some(top);
        Ok(())
    }

    fn train_step(
        &mut self,
        rows: &[usize],
        embeddings: &[Embedding],
    ) -> anyhow::Result<StepOutcome> {
        check_embeddings(rows, embeddings)?;
        let inputs = embeddings
            .iter()
            .map(|e| Var::from_slice(&e.values, (rows.len(), e.dim), &Device::Cpu))
            .collect::<candle_core::Result<Vec<Var>>>()?;
        let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let logits = self.logits(Split::Train, rows, &tensors)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &self.labels(Split::Train, rows)?)?;
        let grads = loss.backward()?;
        let gradients = inputs
            .iter()
            .zip(embeddings)
            .map(|(var, e)| -> anyhow::Result<Embedding> {
                let values = match grads.get(var.as_tensor()) {
                    Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
                    // Not on the loss's path (cannot happen with a linear top): zero gradient.
                    None => vec![0.0; e.values.len()],
                };
                Ok(Embedding { dim: e.dim, values })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let optimizer =
            self.optimizer.as_mut().ok_or_else(|| anyhow::anyhow!("align was not called"))?;
        optimizer.step(&grads)?;
        Ok(StepOutcome { loss: f64::from(loss.to_scalar::<f32>()?), gradients })
    }

    fn evaluate(
        &mut self,
        rows: &[usize],
        embeddings: &[Embedding],
    ) -> anyhow::Result<BTreeMap<String, f64>> {
        check_embeddings(rows, embeddings)?;
        let inputs = embeddings
            .iter()
            .map(|e| Tensor::from_slice(&e.values, (rows.len(), e.dim), &Device::Cpu))
            .collect::<candle_core::Result<Vec<Tensor>>>()?;
        let logits = self.logits(Split::Test, rows, &inputs)?;
        let y = self.labels(Split::Test, rows)?;
        let stats = eval_stats(&logits, &y, rows.len())?;
        Ok(BTreeMap::from([
            ("loss".to_owned(), stats.loss),
            ("accuracy".to_owned(), stats.accuracy),
        ]))
    }

    fn weights(&self) -> anyhow::Result<Weights> {
        let mut res = Weights::new();
        let top = self.top.as_ref().ok_or_else(|| anyhow::anyhow!("align was not called"))?;
        top.push_weights("top", &mut res)?;
        if let Some(own) = &self.own {
            own.push_weights("bottom", &mut res)?;
        }
        Ok(res)
    }

    fn set_weights(&mut self, weights: &Weights) -> anyhow::Result<()> {
        let top = self.top.as_ref().ok_or_else(|| anyhow::anyhow!("align was not called"))?;
        let expected = 2 + if self.own.is_some() { 2 } else { 0 };
        if weights.tensors().len() != expected {
            anyhow::bail!("{} tensors for a model of {expected}", weights.tensors().len());
        }
        top.set_weights("top", weights)?;
        if let Some(own) = &self.own {
            own.set_weights("bottom", weights)?;
        }
        Ok(())
    }
}

fn eval_stats(logits: &Tensor, y: &Tensor, n: usize) -> Result<EvalStats> {
    let loss = candle_nn::loss::cross_entropy(logits, y)?.to_scalar::<f32>()?;
    let correct =
        logits.argmax(D::Minus1)?.eq(y)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
    Ok(EvalStats { loss: f64::from(loss), accuracy: f64::from(correct) / n as f64 })
}

/// The centralised comparison: the parties' tables joined on `train` and `test` ids (columns
/// of every table, standardised with train statistics), one MLP with `hidden` units trained
/// with `sgd`, evaluated on the test rows.
pub fn centralised(
    tables: &[&PartyTable],
    labels: &PartyTable,
    train: &[String],
    test: &[String],
    hidden: usize,
    sgd: SgdConfig,
) -> Result<EvalStats> {
    let joined = |ids: &[String]| -> Result<Dataset> {
        let parts = tables.iter().map(|t| t.select(ids)).collect::<Result<Vec<_>>>()?;
        let dim: usize = tables.iter().map(|t| t.dim()).sum();
        let mut features = Vec::with_capacity(ids.len() * dim);
        for row in 0..ids.len() {
            for (part, table) in parts.iter().zip(tables) {
                features
                    .extend_from_slice(&part.features[row * table.dim()..(row + 1) * table.dim()]);
            }
        }
        let labels = labels
            .select(ids)?
            .labels
            .ok_or_else(|| Error::Weights(format!("{} has no labels", labels.path.display())))?;
        Ok(Dataset { features, labels, dim, classes: 2 })
    };
    let (mut train, mut test) = (joined(train)?, joined(test)?);
    let scaler = Standardizer::fit(&train.features, train.dim);
    scaler.apply(&mut train.features);
    scaler.apply(&mut test.features);
    let mut model = Mlp::new(MlpConfig { input: train.dim, hidden, classes: 2, seed: sgd.seed })?;
    model.train(&train, sgd)?;
    model.evaluate(&test)
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use fledge_sdk::RunOptions;
    use fledge_sdk::roles::vertical::{self, align_ids, split_ids};
    use fledge_types::TaskId;
    use serde_json::json;

    use super::*;

    fn data_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/vertical-breast-cancer/data")
    }

    fn config(task: &str, role: &str, index: u32, url: &str, h: &Value) -> TaskConfig {
        let tags = if role == "label-party" {
            json!(["aggregate", "distribute"])
        } else {
            json!(["upload", "fetch"])
        };
        serde_json::from_value(json!({
            "taskId": task,
            "role": role,
            "taskIndex": index,
            "job": {"id": "vfl", "name": "vfl"},
            "backend": "local",
            "channels": [{
                "name": "vfl-channel",
                "pair": ["feature-party", "label-party"],
                "funcTags": {role: tags}
            }],
            "groupAssociation": {"vfl-channel": "default"},
            "hyperparameters": h,
            "dataset": {"id": task, "url": url}
        }))
        .expect("valid task config")
    }

    /// The hyperparameters of the example job.
    fn example_hyperparameters() -> Value {
        let path = data_dir().join("../modelSpec.json");
        let spec: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("modelSpec"))
            .expect("json");
        spec["hyperparameters"].clone()
    }

    /// One split step equals one step of the joined network: same loss gradients reach the
    /// bottom weights through the protocol's two halves.
    #[test]
    fn a_split_step_equals_a_step_of_the_joined_network() {
        let dir = tempfile::tempdir().expect("tmp");
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            p.display().to_string()
        };
        let a = write("a.csv", "id,x1,x2\nr1,1,2\nr2,-1,0.5\nr3,3,1\nr4,0,0\n");
        let b = write("b.csv", "id,x3\nr4,2\nr2,1\nr1,-2\nr3,0.5\n");
        let l = write("l.csv", "id,label\nr3,1\nr1,0\nr4,1\nr2,0\n");
        let h = json!({"learningRate": 0.5, "embeddingDim": 3, "seed": 4});
        let mut fa = FeatureParty::new();
        let mut fb = FeatureParty::new();
        let mut lp = LabelParty::new();
        fa.load(&config("a", "feature-party", 0, &a, &h)).expect("a");
        fb.load(&config("b", "feature-party", 1, &b, &h)).expect("b");
        lp.load(&config("l", "label-party", 0, &l, &h)).expect("l");
        let train: Vec<String> = ["r1", "r2", "r3"].map(String::from).to_vec();
        let test = vec!["r4".to_owned()];
        fa.align(&train, &test).expect("a");
        fb.align(&train, &test).expect("b");
        lp.align(&train, &test, &[3, 3]).expect("l");
        let before = [fa.weights().expect("w"), fb.weights().expect("w"), lp.weights().expect("w")];

        // The joined network, by hand, from the same weights.
        let t = |w: &Weights, name: &str| {
            let t = w.get(name).expect("tensor");
            Var::from_slice(t.data(), t.shape(), &Device::Cpu).expect("var")
        };
        let vars = [
            t(&before[0], "bottom.weight"),
            t(&before[0], "bottom.bias"),
            t(&before[1], "bottom.weight"),
            t(&before[1], "bottom.bias"),
            t(&before[2], "top.weight"),
            t(&before[2], "top.bias"),
        ];
        // Standardised with train statistics (rows r1, r2, r3; the step uses rows 2, 0).
        let std = |v: [f32; 3]| {
            let m = (v[0] + v[1] + v[2]) / 3.0;
            let s = (v.iter().map(|x| (x - m).powi(2)).sum::<f32>() / 3.0).sqrt();
            v.map(|x| (x - m) / s)
        };
        let (x1, x2, x3) = (std([1.0, -1.0, 3.0]), std([2.0, 0.5, 1.0]), std([-2.0, 1.0, 0.5]));
        let xa =
            Tensor::from_vec(vec![x1[2], x2[2], x1[0], x2[0]], (2, 2), &Device::Cpu).expect("x");
        let xb = Tensor::from_vec(vec![x3[2], x3[0]], (2, 1), &Device::Cpu).expect("x");
        let lin = |x: &Tensor, w: &Var, b: &Var| {
            x.matmul(&w.as_tensor().t().expect("t"))
                .expect("mm")
                .broadcast_add(b.as_tensor())
                .expect("add")
        };
        let ea = lin(&xa, &vars[0], &vars[1]).relu().expect("relu");
        let eb = lin(&xb, &vars[2], &vars[3]).relu().expect("relu");
        let logits = lin(&Tensor::cat(&[ea, eb], 1).expect("cat"), &vars[4], &vars[5]);
        let y = Tensor::from_vec(vec![1u32, 0], 2, &Device::Cpu).expect("y");
        let loss = candle_nn::loss::cross_entropy(&logits, &y).expect("loss");
        let mut sgd = candle_nn::SGD::new(vars.to_vec(), 0.5).expect("sgd");
        sgd.backward_step(&loss).expect("step");

        // The split step.
        let rows = [2, 0];
        let ea = fa.embed(Split::Train, &rows).expect("embed");
        let eb = fb.embed(Split::Train, &rows).expect("embed");
        let outcome = lp.train_step(&rows, &[ea, eb]).expect("step");
        fa.backward(&outcome.gradients[0]).expect("backward");
        fb.backward(&outcome.gradients[1]).expect("backward");
        assert!((outcome.loss - f64::from(loss.to_scalar::<f32>().expect("s"))).abs() < 1e-6);

        let after = [fa.weights().expect("w"), fb.weights().expect("w"), lp.weights().expect("w")];
        let names = [
            (0, "bottom.weight"),
            (0, "bottom.bias"),
            (1, "bottom.weight"),
            (1, "bottom.bias"),
            (2, "top.weight"),
            (2, "top.bias"),
        ];
        for ((party, name), var) in names.iter().zip(&vars) {
            let want = var.as_tensor().flatten_all().expect("f").to_vec1::<f32>().expect("v");
            let got = after[*party].get(name).expect("tensor").data().to_vec();
            let moved = before[*party].get(name).expect("tensor").data() != got.as_slice();
            assert!(moved || *name == "bottom.bias", "{party} {name} did not change");
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "party {party} {name}: {got:?} vs {want:?}");
            }
        }
        let err = fa.backward(&outcome.gradients[0]).unwrap_err().to_string();
        assert!(err.contains("without a train embedding"), "{err}");

        // Back to the weights before the step (what a resumed label party and its feature
        // parties do), the same step gives the same weights again: the optimizers work on
        // the restored variables.
        fa.set_weights(&before[0]).expect("a");
        fb.set_weights(&before[1]).expect("b");
        lp.set_weights(&before[2]).expect("l");
        assert_eq!([fa.weights().unwrap(), fb.weights().unwrap(), lp.weights().unwrap()], before);
        let ea = fa.embed(Split::Train, &rows).expect("embed");
        let eb = fb.embed(Split::Train, &rows).expect("embed");
        let again = lp.train_step(&rows, &[ea, eb]).expect("step");
        fa.backward(&again.gradients[0]).expect("backward");
        fb.backward(&again.gradients[1]).expect("backward");
        assert_eq!(again, outcome);
        assert_eq!([fa.weights().unwrap(), fb.weights().unwrap(), lp.weights().unwrap()], after);
        // Weights of another model are refused, naming what is wrong.
        let err = lp.set_weights(&before[0]).unwrap_err().to_string();
        assert!(err.contains("no tensor top.weight"), "{err}");
        let err = fa.set_weights(&before[2]).unwrap_err().to_string();
        assert!(err.contains("no tensor bottom.weight"), "{err}");
    }

    #[test]
    fn a_label_party_without_labels_or_a_table_without_ids_is_refused() {
        let h = json!({});
        let url = data_dir().join("features-a.csv").display().to_string();
        let err = LabelParty::new().load(&config("l", "label-party", 0, &url, &h)).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("no label column \"label\"") && err.contains("features-a.csv"),
            "{err}"
        );
        let h = json!({"idColumn": "patient"});
        let err = FeatureParty::new().load(&config("a", "feature-party", 0, &url, &h)).unwrap_err();
        assert!(format!("{err:#}").contains("no id column \"patient\""), "{err:#}");
        let h = json!({"embeddingDim": 0});
        let err = FeatureParty::new().load(&config("a", "feature-party", 0, &url, &h)).unwrap_err();
        assert!(format!("{err:#}").contains("embeddingDim"), "{err:#}");
    }

    /// The example's job run in-process over the local backend (the real protocol), and the
    /// centralised model on the same split: both reach 0.93 and are printed for the README.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn split_learning_matches_the_centralised_model_on_breast_cancer() {
        let mut h = example_hyperparameters();
        let workdir = tempfile::tempdir().expect("tmp");
        h["joinTimeout"] = json!(30);
        let url = |f: &str| data_dir().join(f).display().to_string();
        let opts = RunOptions { workdir: workdir.path().to_owned(), ..RunOptions::default() };
        let parties = [("vfl-a", "features-a.csv"), ("vfl-b", "features-b.csv")];
        let started = tokio::time::Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for (i, (task, file)) in parties.iter().enumerate() {
            let c = config(task, "feature-party", i as u32, &url(file), &h);
            set.spawn(fledge_sdk::role::run::<vertical::FeatureParty>(
                c,
                crate::MnistFactory::shared(),
                opts.clone(),
            ));
        }
        let c = config("vfl-label", "label-party", 0, &url("labels.csv"), &h);
        let label = fledge_sdk::role::run::<vertical::LabelParty>(
            c,
            crate::MnistFactory::shared(),
            opts.clone(),
        )
        .await
        .expect("label party runs");
        while let Some(res) = set.join_next().await {
            let summary = res.expect("join").expect("feature party runs");
            assert_eq!(summary.rounds, label.rounds);
        }
        let split_seconds = started.elapsed().as_secs_f64();
        let rounds = h["rounds"].as_u64().expect("rounds");
        assert_eq!(label.history.len() as u64, rounds);
        let last = &label.history[label.history.len() - 1].metrics;
        let split_acc = last["accuracy"];

        // The centralised model on the same aligned split.
        let load = |f: &str, labels: Option<&str>| {
            PartyTable::load(&data_dir().join(f), "id", labels, 2).expect("table")
        };
        let (a, b, l) = (
            load("features-a.csv", None),
            load("features-b.csv", None),
            load("labels.csv", Some("label")),
        );
        let held = vec![(TaskId::from("a"), a.ids.clone()), (TaskId::from("b"), b.ids.clone())];
        let aligned = align_ids(&l.ids, &held).expect("aligned");
        let seed = h["seed"].as_u64().unwrap_or(0);
        let (train, test) = split_ids(&aligned, h["testFraction"].as_f64().unwrap_or(0.2), seed);
        assert_eq!(last["trainSamples"] as usize, train.len());
        let hidden = 2 * h["embeddingDim"].as_u64().expect("embeddingDim") as usize;
        let sgd = SgdConfig {
            lr: h["learningRate"].as_f64().expect("lr"),
            batch_size: h["batchSize"].as_u64().expect("batchSize") as usize,
            epochs: rounds as usize,
            seed,
        };
        let started = tokio::time::Instant::now();
        let central = centralised(&[&a, &b], &l, &train, &test, hidden, sgd).expect("centralised");
        let central_seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "aligned {} samples ({} train / {} test); split learning accuracy {split_acc:.4} \
             (loss {:.4}, {split_seconds:.2} s); centralised MLP 30-{hidden}-2 accuracy {:.4} \
             (loss {:.4}, {central_seconds:.2} s)",
            aligned.len(),
            train.len(),
            test.len(),
            last["loss"],
            central.accuracy,
            central.loss
        );
        assert!(split_acc >= 0.93, "split learning accuracy {split_acc}");
        assert!(central.accuracy >= 0.93, "centralised accuracy {}", central.accuracy);
        assert!(workdir.path().join("registry/jobs/vfl/final.safetensors").is_file());
        assert!(workdir.path().join("registry/models/vfl-vfl-a-bottom/1.safetensors").is_file());
    }

    /// Three ways: two feature parties with ten columns each, and a label party that holds
    /// the last ten columns besides the labels (its own bottom model feeds the top model).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_label_party_with_columns_of_its_own_trains_them_too() {
        let source =
            crate::data::load_breast_cancer(&data_dir().join("../../data/breast_cancer.csv"))
                .expect("source");
        let dir = tempfile::tempdir().expect("tmp");
        let write = |name: &str, columns: std::ops::Range<usize>, labels: bool| {
            let mut text = String::from("id");
            for c in columns.clone() {
                text.push_str(&format!(",c{c}"));
            }
            text.push_str(if labels { ",label\n" } else { "\n" });
            // Each file in its own order: reversed for the label party.
            let order: Vec<usize> = if labels {
                (0..source.len()).rev().collect()
            } else {
                (0..source.len()).collect()
            };
            for i in order {
                text.push_str(&crate::vertical_data::sample_id(i));
                for c in columns.clone() {
                    text.push_str(&format!(",{}", source.features[i * 30 + c]));
                }
                if labels {
                    text.push_str(&format!(",{}", source.labels[i]));
                }
                text.push('\n');
            }
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write");
            path.display().to_string()
        };
        let (a, b, l) = (
            write("a.csv", 0..10, false),
            write("b.csv", 10..20, false),
            write("l.csv", 20..30, true),
        );
        let h = json!({"rounds": 8, "batchSize": 32, "learningRate": 0.1, "embeddingDim": 8,
                       "featureParties": 2, "joinTimeout": 30});
        let opts = RunOptions { workdir: dir.path().to_owned(), ..RunOptions::default() };
        let fa = fledge_sdk::role::run::<vertical::FeatureParty>(
            config("a", "feature-party", 0, &a, &h),
            crate::MnistFactory::shared(),
            opts.clone(),
        );
        let fb = fledge_sdk::role::run::<vertical::FeatureParty>(
            config("b", "feature-party", 1, &b, &h),
            crate::MnistFactory::shared(),
            opts.clone(),
        );
        let lp = fledge_sdk::role::run::<vertical::LabelParty>(
            config("l", "label-party", 0, &l, &h),
            crate::MnistFactory::shared(),
            opts,
        );
        let (fa, fb, lp) = tokio::join!(fa, fb, lp);
        let (lp, _, _) = (lp.expect("label"), fa.expect("a"), fb.expect("b"));
        let last = &lp.history[7].metrics;
        assert_eq!((last["trainSamples"], last["testSamples"]), (455.0, 114.0));
        assert!(last["accuracy"] >= 0.93, "accuracy {}", last["accuracy"]);
        let top = lp.final_model.expect("top model");
        // The top model sees 8 + 8 embedding values from the parties and 8 of its own.
        assert_eq!(top.get("top.weight").expect("top").shape(), [2, 24]);
        assert_eq!(top.get("bottom.weight").expect("own bottom").shape(), [8, 10]);
    }
}
