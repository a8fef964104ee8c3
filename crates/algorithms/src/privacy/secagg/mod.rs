//! Secure aggregation: SecAgg+ (Bell, Bonawitz, Gascón, Lepoint and Raykova, "Secure
//! Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020), the sparse-graph
//! version of Bonawitz et al.'s SecAgg (CCS 2017).
//!
//! The server learns the weighted sum of the clients' quantised updates and nothing else about
//! any one of them, even when clients drop out after sending their shares or after sending
//! their masked update, as long as enough shares remain.
//!
//! # Protocol (one round)
//!
//! | stage | client → server | server → client |
//! |---|---|---|
//! | 0 | | [`Setup`]: round parameters, the client's index, the graph seed |
//! | 1 | [`AdvertiseKeys`]: two X25519 public keys | neighbours' keys ([`ServerBody::Keys`]) |
//! | 2 | [`EncryptedShares`]: Shamir shares of its self-mask seed `b` and mask secret key, one ChaCha20-Poly1305 box per neighbour, and a commitment to `b` | the boxes addressed to it ([`SharesDelivery`]) |
//! | 3 | [`MaskedInput`]: `y = w·q(x) + PRG(b) + Σ ±PRG(s_ij)` in `Z/2^r` | [`UnmaskRequest`]: which neighbours dropped, which survived |
//! | 4 | [`UnmaskShares`]: mask-key shares of the dropped, `b` shares of the survivors | |
//!
//! The server then rebuilds the dropped clients' mask keys (to cancel their pairwise masks
//! with the survivors) and the survivors' `b` (to remove their self masks); the sum of the
//! survivors' inputs remains. Each client is joined to `neighbors` others in a random Harary
//! graph ([`graph`]), so cost per client is O(`neighbors`) instead of O(clients).
//!
//! # Safety rules the state machines enforce
//!
//! - `threshold > (neighbors + 1) / 2`: a client answers one unmask request per round and
//!   gives, for each neighbour, either its mask-key share or its `b` share, never both; a
//!   server that tells some clients a neighbour dropped and others that it survived would need
//!   `2·threshold` distinct answers from a neighbourhood of `neighbors + 1`.
//! - A client refuses to go on when fewer than `threshold` of its neighbourhood are left at
//!   any stage, and a server refuses to unmask below `threshold` at any stage
//!   ([`SecAggError::BelowThreshold`]) before asking anyone for a share.
//! - Every peer input is checked before any state changes: a malformed or lying message is an
//!   error naming the peer and leaves the state machine where it was.
//!
//! # Quantisation and weights
//!
//! Values are clipped to `[−c, c]` and mapped to `q ∈ {0, …, L}` with `L = 2^bits − 1`
//! (stochastic rounding by default, which is unbiased). A client multiplies `q` by its weight
//! `w = min(num_samples, maxWeight)` (1 without `maxWeight`) and appends `w` itself, so the
//! server learns `Σ w·q` and `Σ w` and returns the weighted mean `Σ w·x / Σ w` within one
//! quantisation step `2c/L`. The ring is `Z/2^32` when `n·maxWeight·L` fits, else `Z/2^64`.

mod client;
mod crypto;
pub mod graph;
pub mod messages;
mod server;
pub mod shamir;

pub use client::SecAggClient;
pub use messages::{
    AdvertiseKeys, ClientBody, ClientMessage, DecodeError, EncryptedShares, MaskedInput, PeerKeys,
    ServerBody, ServerMessage, Setup, SharesDelivery, UnmaskRequest, UnmaskShares,
};
pub use server::{SecAggResult, SecAggServer, Stage};

use rand::Rng;
use serde_json::Value;

use super::config::{ConfigError, Fields};

/// Most clients one round accepts (bounds every list the protocol carries).
pub const MAX_CLIENTS: u32 = 1 << 20;

/// Most neighbour pairs (clients × neighbours) one round accepts: the server keeps the graph
/// and relays O(pairs) keys and shares. A complete graph (no `neighbors`) reaches it at about
/// 5,800 clients.
pub const MAX_EDGES: u64 = 1 << 25;

/// The model spec's `secureAggregation` section.
#[derive(Debug, Clone, PartialEq)]
pub struct SecAggConfig {
    /// `threshold`: shares needed to rebuild a secret, `≥ 2`, `≤ neighbors + 1` and
    /// `> (neighbors + 1) / 2` in every round.
    pub threshold: u32,
    /// `neighbors` (optional): neighbours per client, rounded up to even; absent means all
    /// other clients (the original SecAgg).
    pub neighbors: Option<u32>,
    /// `quantizationBits`: 1 to 32.
    pub quantization_bits: u8,
    /// `clippingRange` `c > 0`: values are clipped to `[−c, c]`.
    pub clipping_range: f64,
    /// `maxWeight` (optional): clients weigh `min(num_samples, maxWeight)`; absent, all weigh 1.
    pub max_weight: Option<u64>,
    /// `rounding` (optional): `stochastic` (default, unbiased) or `nearest`.
    pub stochastic: bool,
}

/// The fields `secureAggregation` accepts.
pub const SECAGG_FIELDS: &[&str] =
    &["threshold", "neighbors", "quantizationBits", "clippingRange", "maxWeight", "rounding"];

impl SecAggConfig {
    /// Parses the `secureAggregation` object of a model spec; every problem names its field.
    pub fn from_json(value: &Value) -> Result<Self, ConfigError> {
        let mut f = Fields::new(value, "secureAggregation")?;
        let threshold = f.required_integer("threshold")?;
        if !(2..=u64::from(MAX_CLIENTS)).contains(&threshold) {
            return Err(f.err(
                "threshold",
                format!("must be between 2 and {MAX_CLIENTS}, got {threshold} (with 1, one client's share would reveal its secrets)"),
            ));
        }
        let neighbors = f.integer("neighbors")?;
        if let Some(k) = neighbors {
            if !(2..=u64::from(MAX_CLIENTS)).contains(&k) {
                return Err(
                    f.err("neighbors", format!("must be between 2 and {MAX_CLIENTS}, got {k}"))
                );
            }
            let k_even = k + k % 2;
            if threshold > k_even + 1 {
                return Err(f.err(
                    "threshold",
                    format!("{threshold} exceeds neighbors + 1 = {} (a client's secrets are shared among itself and its neighbours)", k_even + 1),
                ));
            }
            if 2 * threshold <= k_even + 1 {
                return Err(f.err(
                    "threshold",
                    format!("must be more than half of neighbors + 1 = {}, got {threshold} (else a lying server could collect both kinds of shares of one client)", k_even + 1),
                ));
            }
        }
        let bits = f.required_integer("quantizationBits")?;
        if !(1..=32).contains(&bits) {
            return Err(f.err("quantizationBits", format!("must be between 1 and 32, got {bits}")));
        }
        let clipping_range = f.required_number("clippingRange")?;
        if clipping_range <= 0.0 {
            return Err(f.err("clippingRange", format!("must be > 0, got {clipping_range}")));
        }
        let max_weight = f.integer("maxWeight")?;
        if let Some(w) = max_weight
            && !(1..=u64::from(u32::MAX)).contains(&w)
        {
            return Err(f.err("maxWeight", format!("must be between 1 and {}, got {w}", u32::MAX)));
        }
        let stochastic = match f.string("rounding")?.as_deref() {
            None | Some("stochastic") => true,
            Some("nearest") => false,
            Some(other) => {
                return Err(f.err(
                    "rounding",
                    format!("unknown rounding '{other}' (valid: stochastic, nearest)"),
                ));
            }
        };
        f.finish(SECAGG_FIELDS)?;
        Ok(Self {
            threshold: threshold as u32,
            neighbors: neighbors.map(|k| k as u32),
            quantization_bits: bits as u8,
            clipping_range,
            max_weight,
            stochastic,
        })
    }

    /// The parameters of a round of `num_clients` clients, or why such a round cannot run
    /// (naming the field to change).
    pub fn round_setup(
        &self,
        num_clients: u32,
        num_params: u64,
        graph_seed: [u8; 32],
    ) -> Result<Setup, ConfigError> {
        let f = |field: &str, reason: String| {
            ConfigError::new(format!("secureAggregation.{field}"), reason)
        };
        if num_clients > MAX_CLIENTS {
            return Err(f(
                "threshold",
                format!("{num_clients} clients is more than the {MAX_CLIENTS} a round supports"),
            ));
        }
        if num_clients < self.threshold {
            return Err(f(
                "threshold",
                format!("{} exceeds the {num_clients} clients of the round", self.threshold),
            ));
        }
        if num_params == 0 || num_params >= u64::from(u32::MAX) * 64 {
            return Err(f(
                "quantizationBits",
                format!("an update of {num_params} parameters cannot be aggregated"),
            ));
        }
        let k = graph::effective_degree(num_clients, self.neighbors.unwrap_or(u32::MAX));
        if self.threshold > k + 1 || 2 * self.threshold <= k + 1 {
            return Err(f(
                "threshold",
                format!(
                    "with {num_clients} clients each has {k} neighbours: the threshold must be more than {} and at most {}, got {}",
                    k.div_ceil(2),
                    k + 1,
                    self.threshold
                ),
            ));
        }
        if u64::from(num_clients) * u64::from(k) > MAX_EDGES {
            return Err(f(
                "neighbors",
                format!(
                    "{num_clients} clients with {k} neighbours each is more than {MAX_EDGES} neighbour pairs; set neighbors (SecAgg+ needs only O(log n))"
                ),
            ));
        }
        let levels = (1u128 << self.quantization_bits) - 1;
        let w = u128::from(self.max_weight.unwrap_or(1));
        let peak = u128::from(num_clients) * w * levels.max(1);
        let ring_bits = if peak < 1u128 << 32 {
            32
        } else if peak < 1u128 << 64 {
            64
        } else {
            return Err(f(
                "quantizationBits",
                format!(
                    "{num_clients} clients × maxWeight {w} × {levels} levels overflows 64 bits; lower quantizationBits or maxWeight"
                ),
            ));
        };
        Ok(Setup {
            num_clients,
            index: 0,
            num_params,
            threshold: self.threshold,
            neighbors: k,
            quantization_bits: self.quantization_bits,
            clipping_range: self.clipping_range,
            max_weight: self.max_weight.unwrap_or(0),
            stochastic: self.stochastic,
            ring_bits,
            graph_seed,
        })
    }
}

/// What went wrong in a round of secure aggregation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecAggError {
    /// The configuration cannot run this round.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Bytes that are not a message.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A message that does not belong to the current stage.
    #[error("{who}: got a {got} message while {expected}")]
    UnexpectedMessage {
        /// Which side or peer sent it.
        who: String,
        /// What the state machine waits for.
        expected: String,
        /// The message's name.
        got: &'static str,
    },
    /// A message of another round.
    #[error("{who}: message is for round {got}, this is round {expected}")]
    WrongRound {
        /// Which side or peer sent it.
        who: String,
        /// This round.
        expected: u64,
        /// The message's round.
        got: u64,
    },
    /// A message whose content is invalid or inconsistent (a malformed or lying peer).
    #[error("{who}: {reason}")]
    Invalid {
        /// `client N`, or `server`.
        who: String,
        /// What is wrong.
        reason: String,
    },
    /// Too few clients (or shares) are left to go on; nothing individual was revealed.
    #[error(
        "secure aggregation below threshold at stage '{stage}': {got} left, {threshold} needed \
         ({detail}); the round is aborted and no individual update was revealed"
    )]
    BelowThreshold {
        /// The stage that fell short.
        stage: &'static str,
        /// What was left.
        got: usize,
        /// The threshold.
        threshold: usize,
        /// Which set fell short.
        detail: String,
    },
    /// The client's own update cannot be aggregated.
    #[error("secure aggregation input: {0}")]
    Input(String),
    /// Every surviving client weighs zero.
    #[error("secure aggregation: the weights of the surviving clients sum to zero")]
    ZeroTotalWeight,
}

pub(crate) fn client_name(i: u32) -> String {
    format!("client {i}")
}

/// The quantisation of one round.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Quantizer {
    pub(crate) range: f64,
    pub(crate) levels: f64,
    pub(crate) stochastic: bool,
}

impl Quantizer {
    pub(crate) fn new(setup: &Setup) -> Self {
        Self {
            range: setup.clipping_range,
            levels: ((1u64 << setup.quantization_bits) - 1) as f64,
            stochastic: setup.stochastic,
        }
    }

    /// `x` clipped to `[−c, c]` as a level in `0..=L`.
    pub(crate) fn quantize(&self, x: f32, rng: &mut impl Rng) -> u64 {
        let v = ((f64::from(x).clamp(-self.range, self.range) + self.range) / (2.0 * self.range)
            * self.levels)
            .clamp(0.0, self.levels);
        let q = if self.stochastic {
            let fl = v.floor();
            // A 32-bit uniform draw: the rounding probability is exact to 2⁻³².
            let u = f64::from(rng.next_u32()) * (1.0 / 4_294_967_296.0);
            if u < v - fl { fl + 1.0 } else { fl }
        } else {
            v.round()
        };
        q.min(self.levels) as u64
    }

    /// The weighted mean from `Σ w·q` and `Σ w`.
    pub(crate) fn dequantize_mean(&self, sum: u64, total_weight: u64) -> f32 {
        let scale = 2.0 * self.range / self.levels;
        (sum as f64 * scale / total_weight as f64 - self.range) as f32
    }

    /// One quantisation step, `2c/L`: the error bound of the mean for values inside the range.
    pub(crate) fn step(&self) -> f64 {
        2.0 * self.range / self.levels
    }
}
