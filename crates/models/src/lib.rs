//! Reference models and real data sets for Fledge's examples, quickstart, tests and benches.
//!
//! - [`data`]: loaders for the MNIST IDX files (gzip or plain), the UCI optical digits CSV and
//!   the breast-cancer CSV shipped in `examples/data/`.
//! - [`partition`]: seeded IID and Dirichlet(alpha) non-IID splits of a training set into
//!   shards, one per trainer.
//! - [`url`]: the dataset URL convention (`file:///dir?shard=i&shards=n&partition=...`).
//! - [`mlp`]: a 784-128-10 ReLU MLP on candle (CPU), trained with plain SGD through candle's
//!   autodiff, with weights exposed as named `f32` tensors (`fc1.weight`, ...).
//! - [`trainer`]: [`trainer::MnistTrainer`], the reference [`fledge_sdk::TrainerApp`]
//!   (built-in name `mnist-mlp-trainer`) and [`trainer::MnistEvaluator`] for aggregators.
//! - [`vertical`], [`vertical_data`]: split learning for vertical FL (bottom and top models on
//!   candle, the parties' id-keyed CSV tables) and its centralised comparison.
//!
//! This crate does no networking: roles, channels and aggregation live in `fledge-sdk`.

pub mod data;
pub mod mlp;
pub mod partition;
pub mod trainer;
pub mod url;
pub mod vertical;
pub mod vertical_data;

pub use data::{Dataset, Split};
pub use mlp::{Mlp, MlpConfig};
pub use trainer::{MnistEvaluator, MnistFactory, MnistTrainer};
pub use url::DatasetUrl;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A data file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A data file is not in the expected format.
    #[error("{path} is not a valid {format} file: {reason}")]
    Format {
        /// The file.
        path: String,
        /// The expected format.
        format: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A dataset URL is malformed.
    #[error("bad dataset url {url:?}: {reason}")]
    Url {
        /// The URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A partition request cannot be satisfied.
    #[error("cannot partition: {0}")]
    Partition(String),
    /// Weights do not fit the model.
    #[error("weights do not fit the model: {0}")]
    Weights(String),
    /// A hyperparameter is out of range or of the wrong type.
    #[error("bad hyperparameter {name}: {reason}")]
    Hyperparameter {
        /// The name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The tensor library failed.
    #[error("tensor operation failed")]
    Candle(#[from] candle_core::Error),
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
