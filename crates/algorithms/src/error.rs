//! The error type of the aggregation math (weights, accumulators, optimizers, robust rules).
//!
//! Configuration parsing has its own error type, [`crate::config::Error`], because it is
//! raised at startup from user input, while this one is raised per update at run time.

/// What went wrong while checking, folding or aggregating model weights.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A tensor's shape does not describe as many elements as its data holds.
    #[error("tensor '{tensor}' has shape {shape:?} ({expected} elements) but {len} values")]
    ShapeDataMismatch {
        /// Tensor name.
        tensor: String,
        /// Declared shape.
        shape: Vec<usize>,
        /// Number of elements the shape describes.
        expected: usize,
        /// Number of values supplied.
        len: usize,
    },
    /// Two tensors of one model share a name.
    #[error("duplicate tensor name '{tensor}'")]
    DuplicateTensor {
        /// The repeated name.
        tensor: String,
    },
    /// Two models do not have the same number of tensors.
    #[error("model layout differs: expected {expected} tensors, got {got}")]
    TensorCount {
        /// Tensors in the reference model.
        expected: usize,
        /// Tensors in the model being checked.
        got: usize,
    },
    /// Two models name the tensor at one position differently.
    #[error("model layout differs at tensor #{index}: expected '{expected}', got '{got}'")]
    TensorName {
        /// Position of the tensor.
        index: usize,
        /// Name in the reference model.
        expected: String,
        /// Name in the model being checked.
        got: String,
    },
    /// Two models give one tensor different shapes.
    #[error("model layout differs for tensor '{tensor}': expected shape {expected:?}, got {got:?}")]
    TensorShape {
        /// Tensor name.
        tensor: String,
        /// Shape in the reference model.
        expected: Vec<usize>,
        /// Shape in the model being checked.
        got: Vec<usize>,
    },
    /// An update holds NaN or an infinity; such updates are rejected, never folded.
    #[error("tensor '{tensor}' holds a non-finite value ({value}) at element {index}")]
    NonFinite {
        /// Tensor name.
        tensor: String,
        /// Flat index of the first non-finite element.
        index: usize,
        /// The offending value.
        value: f32,
    },
    /// A round was finished without any update.
    #[error("{sort}: cannot aggregate an empty round (no updates were added)")]
    EmptyRound {
        /// Optimizer sort.
        sort: &'static str,
    },
    /// Every update of a round reported zero samples, so the weighted average is undefined.
    #[error("{sort}: total sample count of the round is zero, the weighted average is undefined")]
    ZeroTotalSamples {
        /// Optimizer sort.
        sort: &'static str,
    },
    /// A robust rule needs more updates than the round holds.
    #[error("{sort}: needs at least {needed} updates ({why}), got {got}")]
    NotEnoughUpdates {
        /// Optimizer sort.
        sort: &'static str,
        /// Minimum number of updates.
        needed: usize,
        /// Number of updates in the round.
        got: usize,
        /// The rule behind the minimum.
        why: String,
    },
    /// A round mixed full weights and deltas.
    #[error("a round must hold only full weights or only deltas; got {got} after {first}")]
    MixedUpdateKinds {
        /// Kind of the first update.
        first: &'static str,
        /// Kind of the offending update.
        got: &'static str,
    },
    /// FedBuff got full weights from a stale trainer: the delta cannot be recovered.
    #[error(
        "fedbuff: an update with staleness {staleness} must be a delta (use add_delta): \
         full weights trained from an older model cannot be turned into a delta"
    )]
    StaleWeights {
        /// The staleness of the rejected update.
        staleness: u32,
    },
    /// A sample weight or other scalar argument is not usable.
    #[error("invalid argument {name}: {reason}")]
    InvalidArgument {
        /// Argument name.
        name: &'static str,
        /// Why it is invalid.
        reason: String,
    },
}

/// Result with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
