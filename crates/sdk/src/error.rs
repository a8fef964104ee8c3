//! The SDK's error type.

use fledge_types::TaskId;

/// Errors of roles, the registry and the runner.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A channel operation failed.
    #[error("channel error")]
    Channel(#[from] fledge_channel::Error),
    /// An update or model could not be aggregated.
    #[error("aggregation error")]
    Aggregation(#[from] fledge_algorithms::Error),
    /// The optimizer or selector object of the task config is invalid.
    #[error("invalid algorithm config")]
    AlgorithmConfig(#[from] fledge_algorithms::config::Error),
    /// A message could not be converted to or from weights.
    #[error("bad tensors in message: {0}")]
    Tensors(String),
    /// The task config cannot run this role.
    #[error("invalid task config: {0}")]
    Config(String),
    /// A hyperparameter has the wrong type or value.
    #[error("bad hyperparameter {name:?}: {reason}")]
    Hyperparameter {
        /// Its name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// User code (a [`crate::TrainerApp`] or [`crate::Evaluator`]) failed.
    #[error("user code failed in {step}")]
    App {
        /// The step (`train`, `evaluate`, ...).
        step: &'static str,
        /// The cause.
        #[source]
        source: anyhow::Error,
    },
    /// A peer broke the protocol.
    #[error("protocol error from {peer}: {reason}")]
    Protocol {
        /// The peer end.
        peer: TaskId,
        /// What it did.
        reason: String,
    },
    /// Too few trainers answered a round.
    #[error("round {round}: only {got} of the selected trainers answered, minTrainers is {need}")]
    Quorum {
        /// The round.
        round: u64,
        /// How many updates arrived.
        got: usize,
        /// The minimum.
        need: usize,
    },
    /// A privacy step was refused: differential privacy (the ε budget would be exceeded, or
    /// an update could not be clipped) or secure aggregation (too few trainers left, a
    /// lying peer).
    #[error("privacy: {0}")]
    Privacy(String),
    /// The peer this role depends on left.
    #[error("peer {peer} left channel {channel}")]
    PeerLeft {
        /// The peer.
        peer: TaskId,
        /// The channel.
        channel: String,
    },
    /// A registry file could not be read or written.
    #[error("registry i/o on {path}")]
    Registry {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A safetensors file is malformed.
    #[error("bad safetensors data in {path}: {reason}")]
    Safetensors {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A background task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Join(String),
    /// The MLflow registry refused a request, answered nonsense or could not be reached.
    #[error("MLflow registry at {url}: {reason}")]
    Mlflow {
        /// The tracking server's URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The task exceeded `maxRunTime`.
    #[error("task exceeded maxRunTime of {0} s")]
    Timeout(u64),
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Join(e.to_string())
    }
}
