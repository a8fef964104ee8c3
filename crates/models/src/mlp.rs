//! A one-hidden-layer ReLU MLP (784-128-10 for MNIST) on candle's CPU backend.
//!
//! Training is plain minibatch SGD with cross-entropy loss; gradients come from candle's
//! autodiff (`Tensor::backward`), not from hand-written derivatives.
//!
//! Everything random is explicit and seeded, so a run can be reproduced outside Fledge (the
//! numpy reference check in `tests/reference_fedavg.rs` does):
//! - initialisation ([`Mlp::new`]): He-normal weights (`W` ~ N(0, 2/fan_in), as the usual numpy
//!   reference MLP: it keeps the ReLU layer's activations at unit scale) and zero biases, drawn
//!   in tensor order from one `StdRng` seeded with [`MlpConfig::seed`];
//! - data order ([`epoch_orders`]): one `StdRng` seeded with [`SgdConfig::seed`] shuffles the row
//!   order in place at the start of each epoch.
//!
//! Weights cross to the rest of Fledge as named `f32` tensors in PyTorch's naming and layout:
//! `fc1.weight` `[hidden, input]`, `fc1.bias` `[hidden]`, `fc2.weight` `[classes, hidden]`,
//! `fc2.bias` `[classes]`.

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use fledge_algorithms::Weights;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Normal};

use crate::data::Dataset;
use crate::{Error, Result};

/// Tensor names, in order.
pub const PARAM_NAMES: [&str; 4] = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];

/// Shape and initialisation of an [`Mlp`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlpConfig {
    /// Input features (784 for MNIST).
    pub input: usize,
    /// Hidden units (128).
    pub hidden: usize,
    /// Output classes (10).
    pub classes: usize,
    /// Seed of the initial weights.
    pub seed: u64,
}

impl MlpConfig {
    /// The 784-128-10 MNIST model.
    pub fn mnist(seed: u64) -> MlpConfig {
        MlpConfig { input: 784, hidden: 128, classes: 10, seed }
    }

    fn shapes(&self) -> [Vec<usize>; 4] {
        [
            vec![self.hidden, self.input],
            vec![self.hidden],
            vec![self.classes, self.hidden],
            vec![self.classes],
        ]
    }
}

/// SGD settings of one local training call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate (> 0).
    pub lr: f64,
    /// Minibatch size (>= 1).
    pub batch_size: usize,
    /// Passes over the data (>= 1).
    pub epochs: usize,
    /// Seed of the minibatch shuffle.
    pub seed: u64,
}

/// Result of [`Mlp::train`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainStats {
    /// Mean training loss over the last epoch.
    pub loss: f64,
    /// Rows seen per epoch.
    pub num_samples: usize,
}

/// Loss and accuracy on a data set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalStats {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Fraction classified correctly.
    pub accuracy: f64,
}

/// The row order of each epoch of [`Mlp::train`] on `rows` rows: one `StdRng` seeded with
/// `seed` shuffles `0..rows` in place at the start of every epoch (so epoch 2 shuffles epoch
/// 1's order again). Minibatches are consecutive runs of `batch_size` rows of an order.
pub fn epoch_orders(rows: usize, seed: u64, epochs: usize) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<u32> = (0..rows as u32).collect();
    (0..epochs)
        .map(|_| {
            order.shuffle(&mut rng);
            order.clone()
        })
        .collect()
}

/// The model: four trainable variables.
pub struct Mlp {
    config: MlpConfig,
    vars: Vec<Var>,
    device: Device,
}

impl std::fmt::Debug for Mlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mlp").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Mlp {
    /// A freshly initialised model.
    pub fn new(config: MlpConfig) -> Result<Mlp> {
        if config.input == 0 || config.hidden == 0 || config.classes < 2 {
            return Err(Error::Weights(format!("degenerate shape {config:?}")));
        }
        let device = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(config.seed);
        // Standard deviation per tensor: He-normal weights, zero biases.
        let stds =
            [(2.0 / config.input as f32).sqrt(), 0.0, (2.0 / config.hidden as f32).sqrt(), 0.0];
        let vars = config
            .shapes()
            .into_iter()
            .zip(stds)
            .map(|(shape, std)| {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = if std == 0.0 {
                    vec![0.0; n]
                } else {
                    let normal = Normal::new(0.0, std).expect("a positive, finite deviation");
                    (0..n).map(|_| normal.sample(&mut rng)).collect()
                };
                Var::from_vec(values, shape, &device)
            })
            .collect::<candle_core::Result<Vec<Var>>>()?;
        Ok(Mlp { config, vars, device })
    }

    /// The model's shape.
    pub fn config(&self) -> MlpConfig {
        self.config
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = x
            .matmul(&self.vars[0].as_tensor().t()?)?
            .broadcast_add(self.vars[1].as_tensor())?
            .relu()?;
        hidden.matmul(&self.vars[2].as_tensor().t()?)?.broadcast_add(self.vars[3].as_tensor())
    }

    fn check_data(&self, data: &Dataset) -> Result<()> {
        if data.dim != self.config.input {
            return Err(Error::Weights(format!(
                "data has {} features, the model expects {}",
                data.dim, self.config.input
            )));
        }
        if let Some(bad) = data.labels.iter().find(|&&l| l as usize >= self.config.classes) {
            return Err(Error::Weights(format!(
                "label {bad} is out of the model's {} classes",
                self.config.classes
            )));
        }
        Ok(())
    }

    fn tensors(&self, data: &Dataset) -> Result<(Tensor, Tensor)> {
        let x = Tensor::from_slice(&data.features, (data.len(), data.dim), &self.device)?;
        let labels: Vec<u32> = data.labels.iter().map(|&l| u32::from(l)).collect();
        let y = Tensor::from_vec(labels, data.len(), &self.device)?;
        Ok((x, y))
    }

    /// Trains in place with minibatch SGD.
    pub fn train(&mut self, data: &Dataset, sgd: SgdConfig) -> Result<TrainStats> {
        self.check_data(data)?;
        if data.is_empty() {
            return Err(Error::Weights("cannot train on an empty data set".to_owned()));
        }
        if !(sgd.lr.is_finite() && sgd.lr > 0.0) || sgd.batch_size == 0 || sgd.epochs == 0 {
            return Err(Error::Hyperparameter {
                name: "lr/batchSize/epochs".to_owned(),
                reason: format!("need lr > 0, batch size >= 1, epochs >= 1, got {sgd:?}"),
            });
        }
        let (x, y) = self.tensors(data)?;
        let mut optimizer = candle_nn::SGD::new(self.vars.clone(), sgd.lr)?;
        let mut last_loss = 0.0;
        for order in epoch_orders(data.len(), sgd.seed, sgd.epochs) {
            let mut loss_sum = 0.0;
            for batch in order.chunks(sgd.batch_size) {
                let idx = Tensor::from_slice(batch, batch.len(), &self.device)?;
                let xb = x.index_select(&idx, 0)?;
                let yb = y.index_select(&idx, 0)?;
                let loss = candle_nn::loss::cross_entropy(&self.logits(&xb)?, &yb)?;
                optimizer.backward_step(&loss)?;
                loss_sum += f64::from(loss.to_scalar::<f32>()?) * batch.len() as f64;
            }
            last_loss = loss_sum / data.len() as f64;
        }
        if !last_loss.is_finite() {
            return Err(Error::Weights(format!(
                "training diverged (loss {last_loss}); lower the learning rate"
            )));
        }
        Ok(TrainStats { loss: last_loss, num_samples: data.len() })
    }

    /// Mean loss and accuracy on `data`.
    pub fn evaluate(&self, data: &Dataset) -> Result<EvalStats> {
        self.check_data(data)?;
        if data.is_empty() {
            return Err(Error::Weights("cannot evaluate on an empty data set".to_owned()));
        }
        let (x, y) = self.tensors(data)?;
        let logits = self.logits(&x)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &y)?.to_scalar::<f32>()?;
        let predicted = logits.argmax(D::Minus1)?;
        let correct = predicted.eq(&y)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        Ok(EvalStats { loss: f64::from(loss), accuracy: f64::from(correct) / data.len() as f64 })
    }

    /// The weights as named tensors ([`PARAM_NAMES`]).
    pub fn weights(&self) -> Result<Weights> {
        let mut res = Weights::new();
        for (name, var) in PARAM_NAMES.iter().zip(&self.vars) {
            let data = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let tensor = fledge_algorithms::Tensor::new(*name, var.dims().to_vec(), data)
                .map_err(|e| Error::Weights(e.to_string()))?;
            res.push(tensor).map_err(|e| Error::Weights(e.to_string()))?;
        }
        Ok(res)
    }

    /// Replaces the weights; names and shapes must match exactly.
    pub fn set_weights(&mut self, weights: &Weights) -> Result<()> {
        if weights.len() != PARAM_NAMES.len() {
            return Err(Error::Weights(format!(
                "{} tensors, expected {} ({})",
                weights.len(),
                PARAM_NAMES.len(),
                PARAM_NAMES.join(", ")
            )));
        }
        let mut staged = Vec::with_capacity(PARAM_NAMES.len());
        for ((name, var), shape) in PARAM_NAMES.iter().zip(&self.vars).zip(self.config.shapes()) {
            let tensor = weights
                .get(name)
                .ok_or_else(|| Error::Weights(format!("missing tensor {name}")))?;
            if tensor.shape() != shape.as_slice() {
                return Err(Error::Weights(format!(
                    "tensor {name} has shape {:?}, expected {shape:?}",
                    tensor.shape()
                )));
            }
            if let Some(bad) = tensor.data().iter().find(|v| !v.is_finite()) {
                return Err(Error::Weights(format!("tensor {name} holds {bad}")));
            }
            staged.push((var, Tensor::from_slice(tensor.data(), shape, &self.device)?));
        }
        for (var, value) in staged {
            var.set(&value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Split, load_digits, load_mnist};

    fn data_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data")
    }

    #[test]
    fn seeded_init_and_weight_round_trip() {
        let a = Mlp::new(MlpConfig::mnist(3)).expect("model");
        let b = Mlp::new(MlpConfig::mnist(3)).expect("model");
        let c = Mlp::new(MlpConfig::mnist(4)).expect("model");
        let (wa, wb, wc) =
            (a.weights().expect("w"), b.weights().expect("w"), c.weights().expect("w"));
        assert_eq!(wa, wb);
        assert_ne!(wa, wc);
        assert_eq!(a.num_params(), 784 * 128 + 128 + 128 * 10 + 10);
        let names: Vec<&str> = wa.tensors().iter().map(|t| t.name()).collect();
        assert_eq!(names, PARAM_NAMES);
        let mut d = Mlp::new(MlpConfig::mnist(9)).expect("model");
        d.set_weights(&wa).expect("same layout");
        assert_eq!(d.weights().expect("w"), wa);
        let wrong = Mlp::new(MlpConfig { hidden: 64, ..MlpConfig::mnist(0) })
            .expect("model")
            .weights()
            .expect("w");
        let err = d.set_weights(&wrong).unwrap_err().to_string();
        assert!(err.contains("fc1.weight") && err.contains("shape"), "{err}");
    }

    #[test]
    fn learns_digits_with_autodiff_sgd() {
        let data = load_digits(&data_dir().join("digits.csv.gz")).expect("digits");
        let train = data.subset(&(0..1400).collect::<Vec<_>>());
        let test = data.subset(&(1400..data.len()).collect::<Vec<_>>());
        let mut model =
            Mlp::new(MlpConfig { input: 64, hidden: 32, classes: 10, seed: 0 }).expect("model");
        let before = model.evaluate(&test).expect("eval");
        let sgd = SgdConfig { lr: 0.1, batch_size: 32, epochs: 10, seed: 0 };
        let stats = model.train(&train, sgd).expect("train");
        let after = model.evaluate(&test).expect("eval");
        assert_eq!(stats.num_samples, 1400);
        assert!(after.accuracy > 0.85, "digits accuracy {}", after.accuracy);
        assert!(after.loss < before.loss);
        let err = model.train(&train, SgdConfig { lr: 0.0, ..sgd }).unwrap_err();
        assert!(err.to_string().contains("lr"), "{err}");
    }

    #[test]
    fn learns_a_subset_of_real_mnist() {
        let train = load_mnist(&data_dir(), Split::Train).expect("mnist").head(2000);
        let test = load_mnist(&data_dir(), Split::Test).expect("mnist").head(500);
        let mut model = Mlp::new(MlpConfig::mnist(0)).expect("model");
        let sgd = SgdConfig { lr: 0.1, batch_size: 32, epochs: 5, seed: 0 };
        let first = model.train(&train, SgdConfig { epochs: 1, ..sgd }).expect("train").loss;
        let last = model.train(&train, sgd).expect("train").loss;
        let acc = model.evaluate(&test).expect("eval").accuracy;
        assert!(last < first, "training loss falls: {first} -> {last}");
        assert!(acc > 0.85, "mnist subset accuracy {acc}");
    }
}
