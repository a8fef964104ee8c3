//! Differential privacy for model updates: central DP (the server clips each update and adds
//! Gaussian noise to the aggregate), with a fixed or adaptive clipping norm, and local DP
//! (each client clips and noises its own update), both tracked by the RDP
//! [accountant](super::accountant).
//!
//! # Central DP (DP-FedAvg, McMahan et al. 2018)
//!
//! Per round the server clips every update (a delta from the round's global model) to L2 norm
//! `C`, sums them, adds `N(0, (z·C)²)` to every coordinate of the sum and divides by the
//! number of updates. One client changes the sum by at most `C`, so a round is the Gaussian
//! mechanism with noise multiplier `z` on a Poisson sample of rate `q` (user-level DP, the
//! add/remove-one-client relation), and the accountant composes one such step per round.
//! Sample counts are ignored (a weight would scale a client's sensitivity).
//!
//! **Adaptive clipping** (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private
//! Learning with Adaptive Clipping", NeurIPS 2021): every round also releases the noisy
//! fraction of updates that were not clipped, `b̃ = (Σ 1[‖Δᵢ‖ ≤ C] + N(0, σ_b²)) / m`, and
//! moves the norm geometrically towards the target quantile `γ`: `C ← C·exp(−η(b̃ − γ))`.
//! The two releases together must cost what `z` alone costs, so the updates get the larger
//! multiplier `z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2)` (needs `σ_b > z/2`).
//!
//! # Local DP
//!
//! A client clips its update to `C` and adds `N(0, (z·C)²)` before sending it. The server
//! (and anyone on the path) sees who took part, so there is no amplification by sampling, and
//! any two clipped updates differ by up to `2C`: each release is the Gaussian mechanism with
//! noise multiplier `z/2` at `q = 1`, composed once per round the client takes part.
//!
//! # Noise
//!
//! Gaussian noise is drawn from ChaCha20 seeded by the operating system ([`OsRng`]); the
//! `with_seed` constructors exist for tests and reproducible experiments only.
//!
//! [`OsRng`]: rand::rngs::OsRng

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::StandardNormal;
use serde_json::Value;

use super::accountant::RdpAccountant;
use super::config::{ConfigError, Fields};
use crate::weights::Weights;

/// Where the noise is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpMode {
    /// The server clips each update and noises the aggregate.
    Central,
    /// Each client clips and noises its own update.
    Local,
}

/// Adaptive clipping parameters (Andrew et al. 2021).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveClipping {
    /// Target fraction of updates left unclipped, `γ ∈ (0, 1)` (`targetQuantile`, default 0.5).
    pub target_quantile: f64,
    /// Geometric learning rate of the norm, `η > 0` (`learningRate`, default 0.2).
    pub learning_rate: f64,
    /// Standard deviation of the noise on the unclipped count, `σ_b`
    /// (`clippedCountStddev`, default `clientsPerRound / 20`); must exceed `z / 2`.
    pub clipped_count_stddev: f64,
}

/// The job's `differentialPrivacy` section.
#[derive(Debug, Clone, PartialEq)]
pub struct DpConfig {
    /// `mode`: `central` or `local`.
    pub mode: DpMode,
    /// `noiseMultiplier` `z > 0`: noise standard deviation over the clipping norm.
    pub noise_multiplier: f64,
    /// `clippingNorm` `C > 0`: L2 bound of one update (the initial one under adaptive clipping).
    pub clipping_norm: f64,
    /// `adaptiveClipping` (central only): `true` for the defaults, or an object.
    pub adaptive_clipping: Option<AdaptiveClipping>,
    /// Poisson sampling rate of clients per round, `q ∈ (0, 1]` (central only): `samplingRate`,
    /// or `clientsPerRound / totalClients`.
    pub sampling_rate: f64,
    /// `delta` `δ ∈ (0, 1)`: the δ ε is reported for.
    pub delta: f64,
    /// `epsilon`: the ε budget; a round that would exceed it is refused.
    pub epsilon_budget: Option<f64>,
}

/// The fields `differentialPrivacy` accepts.
pub const DP_FIELDS: &[&str] = &[
    "mode",
    "noiseMultiplier",
    "clippingNorm",
    "adaptiveClipping",
    "clientsPerRound",
    "totalClients",
    "samplingRate",
    "delta",
    "epsilon",
];

impl DpConfig {
    /// Parses the `differentialPrivacy` object of a model spec; every problem names its field.
    pub fn from_json(value: &Value) -> Result<Self, ConfigError> {
        const P: &str = "differentialPrivacy";
        let mut f = Fields::new(value, P)?;
        let mode = match f.string("mode")?.as_deref().map(str::to_ascii_lowercase).as_deref() {
            Some("central") => DpMode::Central,
            Some("local") => DpMode::Local,
            Some(other) => {
                return Err(
                    f.err("mode", format!("unknown mode '{other}' (valid: central, local)"))
                );
            }
            None => return Err(f.err("mode", "is required (central or local)")),
        };
        let noise_multiplier = f.required_number("noiseMultiplier")?;
        if noise_multiplier <= 0.0 {
            return Err(f.err("noiseMultiplier", format!("must be > 0, got {noise_multiplier}")));
        }
        let clipping_norm = f.required_number("clippingNorm")?;
        if clipping_norm <= 0.0 {
            return Err(f.err("clippingNorm", format!("must be > 0, got {clipping_norm}")));
        }
        let delta = f.required_number("delta")?;
        if !(delta > 0.0 && delta < 1.0) {
            return Err(f.err("delta", format!("must be in (0, 1), got {delta}")));
        }
        let epsilon_budget = f.number("epsilon")?;
        if let Some(e) = epsilon_budget
            && e <= 0.0
        {
            return Err(f.err("epsilon", format!("the budget must be > 0, got {e}")));
        }
        let clients_per_round = f.integer("clientsPerRound")?;
        let total_clients = f.integer("totalClients")?;
        let sampling = f.number("samplingRate")?;
        let adaptive = f.take("adaptiveClipping");
        let sampling_rate = match mode {
            DpMode::Local => {
                for (name, given) in [
                    ("clientsPerRound", clients_per_round.is_some()),
                    ("totalClients", total_clients.is_some()),
                    ("samplingRate", sampling.is_some()),
                    ("adaptiveClipping", adaptive.is_some()),
                ] {
                    if given {
                        return Err(f.err(
                            name,
                            "applies to central mode only (local DP is accounted per client with \
                             no amplification by sampling, and clips to a fixed norm)",
                        ));
                    }
                }
                1.0
            }
            DpMode::Central => match (sampling, clients_per_round, total_clients) {
                (Some(q), None, None) => {
                    if !(q > 0.0 && q <= 1.0) {
                        return Err(f.err("samplingRate", format!("must be in (0, 1], got {q}")));
                    }
                    q
                }
                (None, Some(k), Some(n)) => {
                    if k == 0 {
                        return Err(f.err("clientsPerRound", "must be at least 1"));
                    }
                    if n < k {
                        return Err(f.err(
                            "totalClients",
                            format!("must be at least clientsPerRound ({k}), got {n}"),
                        ));
                    }
                    k as f64 / n as f64
                }
                (Some(_), _, _) => {
                    return Err(f.err(
                        "samplingRate",
                        "give either samplingRate or clientsPerRound and totalClients, not both",
                    ));
                }
                (None, Some(_), None) => {
                    return Err(f.err(
                        "totalClients",
                        "is required with clientsPerRound (the sampling rate is their ratio)",
                    ));
                }
                (None, None, _) => {
                    return Err(f.err(
                        "samplingRate",
                        "central mode needs the sampling rate: samplingRate, or clientsPerRound \
                         and totalClients",
                    ));
                }
            },
        };
        let adaptive_clipping = match adaptive {
            None | Some(Value::Bool(false)) => None,
            Some(v) => {
                let expected = clients_per_round
                    .map(|k| k as f64)
                    .or_else(|| total_clients.map(|n| n as f64 * sampling_rate));
                Some(parse_adaptive(&v, expected, noise_multiplier)?)
            }
        };
        f.finish(DP_FIELDS)?;
        Ok(Self {
            mode,
            noise_multiplier,
            clipping_norm,
            adaptive_clipping,
            sampling_rate,
            delta,
            epsilon_budget,
        })
    }

    /// The noise multiplier applied to the updates: `z`, or `z_Δ` under adaptive clipping.
    pub fn update_noise_multiplier(&self) -> f64 {
        match self.adaptive_clipping {
            None => self.noise_multiplier,
            Some(a) => {
                let z = self.noise_multiplier;
                (z.powi(-2) - (2.0 * a.clipped_count_stddev).powi(-2)).powf(-0.5)
            }
        }
    }

    /// The `(q, z)` one round composes into the accountant.
    fn accounted_step(&self) -> (f64, f64) {
        match self.mode {
            DpMode::Central => (self.sampling_rate, self.noise_multiplier),
            DpMode::Local => (1.0, self.noise_multiplier / 2.0),
        }
    }
}

fn parse_adaptive(
    value: &Value,
    expected_clients: Option<f64>,
    z: f64,
) -> Result<AdaptiveClipping, ConfigError> {
    const P: &str = "differentialPrivacy.adaptiveClipping";
    let mut f = match value {
        Value::Bool(true) => Fields::new(&Value::Object(Default::default()), P)?,
        v => Fields::new(v, P)?,
    };
    let target_quantile = f.number("targetQuantile")?.unwrap_or(0.5);
    if !(target_quantile > 0.0 && target_quantile < 1.0) {
        return Err(f.err("targetQuantile", format!("must be in (0, 1), got {target_quantile}")));
    }
    let learning_rate = f.number("learningRate")?.unwrap_or(0.2);
    if learning_rate <= 0.0 {
        return Err(f.err("learningRate", format!("must be > 0, got {learning_rate}")));
    }
    let clipped_count_stddev = match f.number("clippedCountStddev")? {
        Some(s) => s,
        None => match expected_clients {
            Some(m) => m / 20.0,
            None => {
                return Err(f.err(
                    "clippedCountStddev",
                    "is required when the sampling rate is given as samplingRate alone \
                     (the default is clientsPerRound / 20)",
                ));
            }
        },
    };
    if clipped_count_stddev <= z / 2.0 {
        return Err(f.err(
            "clippedCountStddev",
            format!(
                "must exceed noiseMultiplier / 2 = {} so that the count's noise leaves a finite \
                 noise multiplier for the updates, got {clipped_count_stddev}",
                z / 2.0
            ),
        ));
    }
    f.finish(&["targetQuantile", "learningRate", "clippedCountStddev"])?;
    Ok(AdaptiveClipping { target_quantile, learning_rate, clipped_count_stddev })
}

/// Why a DP step was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DpError {
    /// Running the next round would spend more than the configured ε budget.
    #[error(
        "privacy budget: round {round} would bring ε to {would_be:.4} (δ = {delta:e}), above the \
         budget ε = {budget} (spent so far: {spent:.4})"
    )]
    BudgetExceeded {
        /// The round that was refused (1-based count of rounds).
        round: u64,
        /// ε spent so far.
        spent: f64,
        /// ε after that round.
        would_be: f64,
        /// The configured budget.
        budget: f64,
        /// δ.
        delta: f64,
    },
    /// A job of this many rounds cannot fit the budget.
    #[error(
        "privacy budget: {rounds} rounds would spend ε = {would_be:.4} (δ = {delta:e}), above the \
         budget ε = {budget}; at most {fits} rounds fit"
    )]
    JobExceedsBudget {
        /// Rounds planned.
        rounds: u64,
        /// ε after them.
        would_be: f64,
        /// The configured budget.
        budget: f64,
        /// δ.
        delta: f64,
        /// How many rounds fit.
        fits: u64,
    },
    /// The wrapper was built for the other mode.
    #[error("this differentialPrivacy config is for {0:?} mode")]
    WrongMode(DpMode),
    /// An update is unusable (layout, NaN/inf) or the round is empty.
    #[error(transparent)]
    Update(#[from] crate::Error),
}

/// What one round spent and did, for the job's metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct DpRoundReport {
    /// Rounds accounted so far, this one included.
    pub rounds: u64,
    /// ε for [`DpRoundReport::delta`] after this round.
    pub epsilon: f64,
    /// The configured δ.
    pub delta: f64,
    /// The clipping norm used this round.
    pub clipping_norm: f64,
    /// Standard deviation of the Gaussian noise added to each coordinate (of the sum for
    /// central DP, of the update for local DP).
    pub noise_stddev: f64,
    /// Updates in the round (central) or 1 (local).
    pub updates: usize,
    /// Fraction of those updates whose norm exceeded the clipping norm.
    pub clipped_fraction: f64,
    /// The clipping norm for the next round (differs under adaptive clipping).
    pub next_clipping_norm: f64,
}

/// Budget bookkeeping shared by both modes.
#[derive(Debug, Clone)]
struct Budget {
    accountant: RdpAccountant,
    rounds: u64,
}

impl Budget {
    fn check_next(&self, cfg: &DpConfig) -> Result<(), DpError> {
        let Some(budget) = cfg.epsilon_budget else { return Ok(()) };
        let (q, z) = cfg.accounted_step();
        let would_be = self.accountant.epsilon_after(q, z, 1, cfg.delta);
        if would_be > budget {
            return Err(DpError::BudgetExceeded {
                round: self.rounds + 1,
                spent: self.accountant.epsilon(cfg.delta).0,
                would_be,
                budget,
                delta: cfg.delta,
            });
        }
        Ok(())
    }

    fn spend(&mut self, cfg: &DpConfig) -> f64 {
        let (q, z) = cfg.accounted_step();
        self.accountant.compose_poisson_gaussian(q, z, 1);
        self.rounds += 1;
        self.accountant.epsilon(cfg.delta).0
    }
}

/// Checks that a job of `rounds` rounds fits the budget (to refuse a job before it starts).
pub fn check_job_budget(cfg: &DpConfig, rounds: u64) -> Result<f64, DpError> {
    let (q, z) = cfg.accounted_step();
    let total = RdpAccountant::new().epsilon_after(q, z, rounds, cfg.delta);
    if let Some(budget) = cfg.epsilon_budget
        && total > budget
    {
        // Largest number of rounds that fits, by bisection (ε grows with rounds).
        let (mut lo, mut hi) = (0u64, rounds);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if RdpAccountant::new().epsilon_after(q, z, mid, cfg.delta) <= budget {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        return Err(DpError::JobExceedsBudget {
            rounds,
            would_be: total,
            budget,
            delta: cfg.delta,
            fits: lo,
        });
    }
    Ok(total)
}

fn os_seeded() -> ChaCha20Rng {
    ChaCha20Rng::from_os_rng()
}

/// Squared L2 norm of a whole model (all tensors), accumulated in `f64`.
pub fn l2_norm(w: &Weights) -> f64 {
    w.tensors()
        .iter()
        .flat_map(|t| t.data())
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt()
}

/// Scales `w` down to L2 norm `c` if it is longer; returns its norm before clipping.
pub fn clip_to_norm(w: &mut Weights, c: f64) -> f64 {
    let norm = l2_norm(w);
    if norm > c {
        let s = (c / norm) as f32;
        for t in w.tensors_mut() {
            for v in t.data_mut() {
                *v *= s;
            }
        }
    }
    norm
}

fn add_gaussian(w: &mut Weights, stddev: f64, rng: &mut ChaCha20Rng) {
    for t in w.tensors_mut() {
        for v in t.data_mut() {
            let n: f64 = rng.sample(StandardNormal);
            *v = (f64::from(*v) + n * stddev) as f32;
        }
    }
}

/// Server-side central DP: clips each update, noises the sum, adapts the norm, accounts.
#[derive(Debug, Clone)]
pub struct CentralDp {
    cfg: DpConfig,
    clipping_norm: f64,
    budget: Budget,
    rng: ChaCha20Rng,
}

/// One round of central DP: the sum of clipped updates so far.
#[derive(Debug, Clone)]
pub struct CentralDpRound {
    sum: Weights,
    updates: usize,
    unclipped: usize,
    clipping_norm: f64,
}

impl CentralDpRound {
    /// Clips `delta` (an update minus the round's global model) and adds it to the sum;
    /// returns its norm before clipping. A non-finite or differently shaped update is
    /// rejected and leaves the round unchanged.
    pub fn add(&mut self, delta: &Weights) -> Result<f64, DpError> {
        self.sum.check_same_layout(delta)?;
        delta.check_finite()?;
        let mut clipped = delta.clone();
        let norm = clip_to_norm(&mut clipped, self.clipping_norm);
        self.sum.add_scaled(&clipped, 1.0)?;
        self.updates += 1;
        if norm <= self.clipping_norm {
            self.unclipped += 1;
        }
        Ok(norm)
    }

    /// Updates added so far.
    pub fn updates(&self) -> usize {
        self.updates
    }
}

impl CentralDp {
    /// Central DP with noise from an OS-seeded ChaCha20.
    pub fn new(cfg: DpConfig) -> Result<Self, DpError> {
        Self::with_rng(cfg, os_seeded())
    }

    /// Central DP with a fixed noise seed: for tests and reproducible experiments only (the
    /// noise is then predictable and protects nothing).
    pub fn with_seed(cfg: DpConfig, seed: u64) -> Result<Self, DpError> {
        Self::with_rng(cfg, ChaCha20Rng::seed_from_u64(seed))
    }

    fn with_rng(cfg: DpConfig, rng: ChaCha20Rng) -> Result<Self, DpError> {
        if cfg.mode != DpMode::Central {
            return Err(DpError::WrongMode(cfg.mode));
        }
        let clipping_norm = cfg.clipping_norm;
        Ok(Self {
            cfg,
            clipping_norm,
            budget: Budget { accountant: RdpAccountant::new(), rounds: 0 },
            rng,
        })
    }

    /// The config.
    pub fn config(&self) -> &DpConfig {
        &self.cfg
    }

    /// The current clipping norm.
    pub fn clipping_norm(&self) -> f64 {
        self.clipping_norm
    }

    /// ε spent so far at the configured δ.
    pub fn epsilon(&self) -> f64 {
        self.budget.accountant.epsilon(self.cfg.delta).0
    }

    /// What a resumed aggregator needs to go on: rounds accounted and the clipping norm.
    pub fn state(&self) -> (u64, f64) {
        (self.budget.rounds, self.clipping_norm)
    }

    /// Restores [`CentralDp::state`]: the accountant composes the rounds already spent again
    /// (deterministic in the config), so ε goes on from where the failed run left it.
    pub fn restore(&mut self, rounds: u64, clipping_norm: f64) -> Result<(), DpError> {
        if !(clipping_norm.is_finite() && clipping_norm > 0.0) {
            return Err(crate::Error::InvalidArgument {
                name: "clipping norm",
                reason: format!("must be finite and > 0, got {clipping_norm}"),
            }
            .into());
        }
        let (q, z) = self.cfg.accounted_step();
        let mut accountant = RdpAccountant::new();
        accountant.compose_poisson_gaussian(q, z, rounds);
        self.budget = Budget { accountant, rounds };
        self.clipping_norm = clipping_norm;
        Ok(())
    }

    /// Starts a round shaped like `global`; refused when the round would exceed the budget.
    pub fn begin_round(&self, global: &Weights) -> Result<CentralDpRound, DpError> {
        self.budget.check_next(&self.cfg)?;
        Ok(CentralDpRound {
            sum: global.zeros_like(),
            updates: 0,
            unclipped: 0,
            clipping_norm: self.clipping_norm,
        })
    }

    /// Noises the sum, returns the mean noisy delta and the round's report, and accounts
    /// the round (and adapts the clipping norm). An empty round is an error and spends
    /// nothing.
    pub fn finish_round(
        &mut self,
        round: CentralDpRound,
    ) -> Result<(Weights, DpRoundReport), DpError> {
        if round.updates == 0 {
            return Err(crate::Error::EmptyRound { sort: "central DP" }.into());
        }
        self.budget.check_next(&self.cfg)?;
        let m = round.updates as f64;
        let noise_stddev = self.cfg.update_noise_multiplier() * round.clipping_norm;
        let mut mean = round.sum;
        add_gaussian(&mut mean, noise_stddev, &mut self.rng);
        let inv = (1.0 / m) as f32;
        for t in mean.tensors_mut() {
            for v in t.data_mut() {
                *v *= inv;
            }
        }
        if let Some(a) = self.cfg.adaptive_clipping {
            let noise: f64 = self.rng.sample(StandardNormal);
            let frac = (round.unclipped as f64 + noise * a.clipped_count_stddev) / m;
            self.clipping_norm *= (-a.learning_rate * (frac - a.target_quantile)).exp();
        }
        let epsilon = self.budget.spend(&self.cfg);
        let report = DpRoundReport {
            rounds: self.budget.rounds,
            epsilon,
            delta: self.cfg.delta,
            clipping_norm: round.clipping_norm,
            noise_stddev,
            updates: round.updates,
            clipped_fraction: (round.updates - round.unclipped) as f64 / m,
            next_clipping_norm: self.clipping_norm,
        };
        Ok((mean, report))
    }
}

/// Client-side local DP: clips and noises each of this client's updates, accounts them.
#[derive(Debug, Clone)]
pub struct LocalDp {
    cfg: DpConfig,
    budget: Budget,
    rng: ChaCha20Rng,
}

impl LocalDp {
    /// Local DP with noise from an OS-seeded ChaCha20.
    pub fn new(cfg: DpConfig) -> Result<Self, DpError> {
        Self::with_rng(cfg, os_seeded())
    }

    /// Local DP with a fixed noise seed: for tests and reproducible experiments only.
    pub fn with_seed(cfg: DpConfig, seed: u64) -> Result<Self, DpError> {
        Self::with_rng(cfg, ChaCha20Rng::seed_from_u64(seed))
    }

    fn with_rng(cfg: DpConfig, rng: ChaCha20Rng) -> Result<Self, DpError> {
        if cfg.mode != DpMode::Local {
            return Err(DpError::WrongMode(cfg.mode));
        }
        Ok(Self { cfg, budget: Budget { accountant: RdpAccountant::new(), rounds: 0 }, rng })
    }

    /// ε this client has spent so far at the configured δ.
    pub fn epsilon(&self) -> f64 {
        self.budget.accountant.epsilon(self.cfg.delta).0
    }

    /// Clips `delta` to the clipping norm and adds `N(0, (z·C)²)` to each coordinate, in
    /// place; refused (and `delta` left as it was) when the release would exceed the budget.
    pub fn privatize(&mut self, delta: &mut Weights) -> Result<DpRoundReport, DpError> {
        delta.check_finite()?;
        self.budget.check_next(&self.cfg)?;
        let c = self.cfg.clipping_norm;
        let norm = clip_to_norm(delta, c);
        let noise_stddev = self.cfg.noise_multiplier * c;
        add_gaussian(delta, noise_stddev, &mut self.rng);
        let epsilon = self.budget.spend(&self.cfg);
        Ok(DpRoundReport {
            rounds: self.budget.rounds,
            epsilon,
            delta: self.cfg.delta,
            clipping_norm: c,
            noise_stddev,
            updates: 1,
            clipped_fraction: if norm > c { 1.0 } else { 0.0 },
            next_clipping_norm: c,
        })
    }
}
