//! Fledge's federated-learning math: aggregation of model updates, server optimizers,
//! Byzantine-robust rules and trainer selection.
//!
//! This crate is pure and synchronous: no I/O, no async runtime, no logging. It uses rayon
//! for large tensors, so the roles call it from `spawn_blocking`. It knows nothing about
//! channels or the wire format; the roles in `fledge-sdk` decode updates into [`Weights`] and
//! hand them here.
//!
//! # Where to start reading
//!
//! - [`weights`]: [`Weights`], the model as ordered named `f32` tensors, and layout checks.
//! - [`optimizer`]: the facade the aggregator roles use. Parse the job's `optimizer` object
//!   with [`Optimizer::from_config`], then per round:
//!
//! ```
//! use fledge_algorithms::{Optimizer, Tensor, Weights};
//! use serde_json::json;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut optimizer = Optimizer::from_config(&json!({"sort": "fedavg"}))?;
//! let mut global = Weights::from_tensors(vec![Tensor::new("w", vec![2], vec![0.0, 0.0])?])?;
//!
//! let mut round = optimizer.begin_round(&global);
//! let a = Weights::from_tensors(vec![Tensor::new("w", vec![2], vec![1.0, 2.0])?])?;
//! let b = Weights::from_tensors(vec![Tensor::new("w", vec![2], vec![4.0, 8.0])?])?;
//! round.add(&a, 100, 0)?; // update, num_samples, staleness
//! round.add(&b, 300, 0)?;
//! optimizer.finish_round(round, &mut global)?; // global is now the new model
//! assert_eq!(global.tensors()[0].data(), &[3.25, 6.5]);
//! # Ok(())
//! # }
//! ```
//!
//! - [`selector`]: [`Selector`], parsed from the job's `selector` object, picks the trainers
//!   of each round.
//! - The math, one module per family: [`accumulate`] (streaming weighted mean, the FedAvg
//!   core), [`fedopt`] (FedAdam/FedYogi/FedAdaGrad), [`fedprox`] (the client-side proximal
//!   term), [`robust`] (median, trimmed mean, Krum), all on the SIMD-friendly loops of
//!   [`kernels`].
//! - [`privacy`]: secure aggregation (SecAgg+ client and server state machines with byte
//!   messages) and differential privacy (central and local, with an RDP accountant).
//! - [`bench`](mod@bench): throughput probes for `fledge bench aggregate`.
//!
//! `README.md` next to this crate explains the algorithms with paper references.
//!
//! # Policies
//!
//! - **Memory**: mean-based rules (FedAvg, FedProx, FedOpt, FedBuff) fold each update as it
//!   arrives into one model-sized buffer; robust rules keep every update (by nature).
//! - **Bad input**: an update with another layout, or holding NaN/±inf, is rejected with an
//!   error naming the tensor; the round is left unchanged and can continue. An empty round,
//!   or one whose sample counts sum to zero, is an error.
//! - **Precision**: accumulation is `f32` as a running mean (see [`kernels`] for why not `f64`).

pub mod accumulate;
pub mod bench;
pub mod config;
mod error;
pub mod fedopt;
pub mod fedprox;
pub mod kernels;
pub mod optimizer;
pub mod privacy;
pub mod robust;
pub mod selector;
pub mod weights;

pub use error::{Error, Result};
pub use fedopt::ServerState;
pub use optimizer::{OPTIMIZER_SORTS, Optimizer, OptimizerKind, Round, UpdateKind};
pub use selector::{EndReport, SELECTOR_SORTS, Selector, SelectorKind};
pub use weights::{Tensor, TensorView, Weights, WeightsView};
