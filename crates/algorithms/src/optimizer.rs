//! The optimizer facade: one type, chosen by the job's `optimizer {sort, kwargs}`, that the
//! aggregator roles drive round by round.
//!
//! ```text
//! let mut optimizer = Optimizer::from_config(&task_config["optimizer"])?;
//! loop {
//!     let mut round = optimizer.begin_round(&global);
//!     while let Some((update, num_samples, staleness)) = next_update() {
//!         round.add(&update, num_samples, staleness)?;   // or add_delta(..)
//!         if optimizer.is_async() && round.is_ready() { break; }   // FedBuff: aggGoal reached
//!     }
//!     optimizer.finish_round(round, &mut global)?;   // updates global in place
//! }
//! ```
//!
//! A [`Round`] owns its accumulator and borrows nothing, so it can be moved into
//! `spawn_blocking` and back; the optimizer keeps the cross-round state (FedOpt moments).
//!
//! | sort | round memory | server step |
//! |---|---|---|
//! | `fedavg`, `fedprox` | O(model) | sample-weighted mean |
//! | `fedadam`, `fedyogi`, `fedadagrad` | O(model) | FedOpt step on the mean delta ([`crate::fedopt`]) |
//! | `fedbuff` | O(model) | `x + lr · Σ nᵢ s(τᵢ) Δᵢ / Σ nᵢ` with `s(τ) = 1/√(1+τ)` |
//! | `median`, `trimmedmean`, `krum` | O(model × updates) | robust rule ([`crate::robust`]) |

use serde_json::Value;

use crate::accumulate::WeightedMean;
use crate::config::{self, non_negative, parse_sort, positive, unit_open};
use crate::error::{Error, Result};
use crate::fedopt::{self, AdaptiveOptimizer, AdaptiveParams, AdaptiveRule};
use crate::fedprox;
use crate::robust;
use crate::weights::{Layout, Weights, WeightsView};

/// The optimizer sorts [`Optimizer::from_config`] accepts.
pub const OPTIMIZER_SORTS: &[&str] = &[
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedbuff",
    "median",
    "trimmedmean",
    "krum",
];

/// An aggregation rule and its hyperparameters.
#[derive(Debug, Clone, PartialEq)]
pub enum OptimizerKind {
    /// FedAvg (McMahan et al. 2017): sample-weighted mean of the updates.
    FedAvg,
    /// FedProx: FedAvg on the server; trainers add `mu·(w - w_g)` to their gradients.
    FedProx {
        /// Proximal coefficient μ ≥ 0 (kwarg `mu`, default 0.01).
        mu: f32,
    },
    /// FedAdam, FedYogi or FedAdaGrad (Reddi et al. 2021).
    Adaptive {
        /// Which second-moment rule.
        rule: AdaptiveRule,
        /// Server hyperparameters (kwargs `lr`, `beta1`, `beta2`, `tau`).
        params: AdaptiveParams,
    },
    /// FedBuff (Nguyen et al. 2022): asynchronous, buffered, staleness-weighted.
    FedBuff {
        /// Updates buffered before the server steps (kwarg `aggGoal`, default 3).
        agg_goal: usize,
        /// Trainers kept busy at once, for the role and the fedbuff selector (kwarg
        /// `concurrency`, default 10).
        concurrency: usize,
        /// Server learning rate applied to the buffered mean delta (kwarg `lr`, default 1).
        lr: f32,
    },
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean.
    TrimmedMean {
        /// Fraction trimmed from each end, in [0, 0.5) (kwarg `beta`, default 0.1).
        beta: f64,
    },
    /// Krum / Multi-Krum.
    Krum {
        /// Byzantine updates tolerated (kwarg `f`, default 1).
        f: usize,
        /// Updates selected and averaged; 1 is Krum (kwarg `m`, default 1).
        m: usize,
    },
}

impl OptimizerKind {
    /// The config sort of this kind.
    pub fn sort(&self) -> &'static str {
        match self {
            Self::FedAvg => "fedavg",
            Self::FedProx { .. } => "fedprox",
            Self::Adaptive { rule, .. } => rule.sort(),
            Self::FedBuff { .. } => "fedbuff",
            Self::Median => "median",
            Self::TrimmedMean { .. } => "trimmedmean",
            Self::Krum { .. } => "krum",
        }
    }

    fn validate(&self) -> Result<()> {
        match self {
            Self::FedProx { mu } => fedprox::check_mu(*mu),
            Self::Adaptive { params, .. } => fedopt::check_params(params),
            Self::FedBuff { agg_goal, concurrency, lr } => {
                if *agg_goal == 0 {
                    return Err(invalid("aggGoal", "must be at least 1"));
                }
                if *concurrency == 0 {
                    return Err(invalid("concurrency", "must be at least 1"));
                }
                if !(lr.is_finite() && *lr > 0.0) {
                    return Err(invalid("lr", "must be finite and > 0"));
                }
                Ok(())
            }
            Self::TrimmedMean { beta } => robust::check_beta(*beta),
            Self::Krum { m, .. } if *m == 0 => Err(invalid("m", "must be at least 1")),
            Self::FedAvg | Self::Median | Self::Krum { .. } => Ok(()),
        }
    }
}

fn invalid(name: &'static str, reason: &str) -> Error {
    Error::InvalidArgument { name, reason: reason.to_owned() }
}

/// Whether a round holds full model weights or deltas from the model the trainer started
/// from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateKind {
    /// Full weights after local training (what Flame trainers send).
    Weights,
    /// `w_local - w_start`.
    Delta,
}

impl UpdateKind {
    fn name(self) -> &'static str {
        match self {
            Self::Weights => "full weights",
            Self::Delta => "a delta",
        }
    }
}

/// The configured aggregation rule plus its state across rounds.
#[derive(Debug, Clone)]
pub struct Optimizer {
    kind: OptimizerKind,
    server: Option<AdaptiveOptimizer>,
}

impl Default for Optimizer {
    /// FedAvg, the default when a job names no optimizer.
    fn default() -> Self {
        Self { kind: OptimizerKind::FedAvg, server: None }
    }
}

impl Optimizer {
    /// An optimizer of `kind`, validating its hyperparameters.
    pub fn new(kind: OptimizerKind) -> Result<Self> {
        kind.validate()?;
        let server = match &kind {
            OptimizerKind::Adaptive { rule, params } => {
                Some(AdaptiveOptimizer::new(*rule, *params))
            }
            _ => None,
        };
        Ok(Self { kind, server })
    }

    /// Parses the job's `optimizer` object, e.g. `{"sort": "fedadam", "kwargs": {"lr": 0.01}}`.
    ///
    /// `null` gives the default (FedAvg). Sorts are [`OPTIMIZER_SORTS`]; unknown sorts, unknown
    /// kwargs and out-of-range values are errors naming the field.
    pub fn from_config(value: &Value) -> config::Result<Self> {
        if value.is_null() {
            return Ok(Self::default());
        }
        let mut kw = parse_sort(value, "optimizer", OPTIMIZER_SORTS)?;
        let (kind, valid): (OptimizerKind, &[&str]) = match kw.sort {
            "fedavg" => (OptimizerKind::FedAvg, &[]),
            "fedprox" => (
                OptimizerKind::FedProx { mu: kw.number("mu", 0.01, non_negative)? as f32 },
                &["mu"],
            ),
            "fedadam" | "fedyogi" | "fedadagrad" => {
                let rule = match kw.sort {
                    "fedadam" => AdaptiveRule::Adam,
                    "fedyogi" => AdaptiveRule::Yogi,
                    _ => AdaptiveRule::AdaGrad,
                };
                let d = AdaptiveParams::default();
                let params = AdaptiveParams {
                    lr: kw.number("lr", f64::from(d.lr), positive)? as f32,
                    beta1: kw.number("beta1", f64::from(d.beta1), unit_open)? as f32,
                    beta2: kw.number("beta2", f64::from(d.beta2), unit_open)? as f32,
                    tau: kw.number("tau", f64::from(d.tau), positive)? as f32,
                };
                (OptimizerKind::Adaptive { rule, params }, &["lr", "beta1", "beta2", "tau"])
            }
            "fedbuff" => (
                OptimizerKind::FedBuff {
                    agg_goal: kw.count("aggGoal", 3, 1)?,
                    concurrency: kw.count("concurrency", 10, 1)?,
                    lr: kw.number("lr", 1.0, positive)? as f32,
                },
                &["aggGoal", "concurrency", "lr"],
            ),
            "median" => (OptimizerKind::Median, &[]),
            "trimmedmean" => (
                OptimizerKind::TrimmedMean {
                    beta: kw.number("beta", 0.1, |b| {
                        (!(0.0..0.5).contains(&b)).then_some("must be in [0, 0.5)")
                    })?,
                },
                &["beta"],
            ),
            "krum" => (
                OptimizerKind::Krum { f: kw.count("f", 1, 0)?, m: kw.count("m", 1, 1)? },
                &["f", "m"],
            ),
            other => unreachable!("parse_sort returned unlisted sort {other}"),
        };
        let sort = kw.sort;
        kw.finish(valid)?;
        // The parser checks ranges already; this catches what survives the f64 -> f32 cast.
        Self::new(kind).map_err(|e| config::Error::BadKwarg {
            what: "optimizer",
            sort,
            name: match &e {
                Error::InvalidArgument { name, .. } => name,
                _ => "kwargs",
            },
            reason: e.to_string(),
        })
    }

    /// The server optimizer's state to persist after a round (`None` for rules without
    /// state across rounds: FedAvg, FedProx, the robust rules).
    pub fn server_state(&self, global: &Weights) -> Result<Option<fedopt::ServerState>> {
        self.server.as_ref().map(|s| s.export(global)).transpose()
    }

    /// Restores a state persisted by [`Optimizer::server_state`] (a resumed aggregator); an
    /// error if this optimizer keeps no state or the state does not fit `global`.
    pub fn restore_server_state(
        &mut self,
        state: fedopt::ServerState,
        global: &Weights,
    ) -> Result<()> {
        match &mut self.server {
            Some(server) => server.restore(state, global),
            None => Err(Error::InvalidArgument {
                name: "server state",
                reason: format!("{} keeps no server state to restore", self.kind.sort()),
            }),
        }
    }

    /// The rule and its hyperparameters.
    pub fn kind(&self) -> &OptimizerKind {
        &self.kind
    }

    /// The config sort (`fedavg`, `fedadam`, ...).
    pub fn sort(&self) -> &'static str {
        self.kind.sort()
    }

    /// Whether the aggregator should run asynchronously (FedBuff): step every
    /// [`Optimizer::agg_goal`] updates instead of once per synchronous round.
    pub fn is_async(&self) -> bool {
        matches!(self.kind, OptimizerKind::FedBuff { .. })
    }

    /// FedBuff's buffer size (updates per server step); `None` for synchronous rules.
    pub fn agg_goal(&self) -> Option<usize> {
        match self.kind {
            OptimizerKind::FedBuff { agg_goal, .. } => Some(agg_goal),
            _ => None,
        }
    }

    /// FedProx's μ, which trainers need for [`crate::fedprox::add_proximal_grad`]; `None`
    /// for other rules.
    pub fn proximal_mu(&self) -> Option<f32> {
        match self.kind {
            OptimizerKind::FedProx { mu } => Some(mu),
            _ => None,
        }
    }

    /// Whether rounds keep every update in memory (robust rules) rather than streaming.
    pub fn holds_all_updates(&self) -> bool {
        matches!(
            self.kind,
            OptimizerKind::Median | OptimizerKind::TrimmedMean { .. } | OptimizerKind::Krum { .. }
        )
    }

    /// Starts a round (or, for FedBuff, a buffer) against the current global model.
    ///
    /// Only `global`'s layout is kept: updates are checked against it as they arrive.
    pub fn begin_round(&self, global: &Weights) -> Round {
        let acc = if self.holds_all_updates() {
            Acc::Collect(Vec::new())
        } else {
            Acc::Mean { mean: WeightedMean::new(global), total_samples: 0.0 }
        };
        Round {
            sort: self.sort(),
            layout: Layout::of(global),
            update_kind: None,
            acc,
            count: 0,
            agg_goal: self.agg_goal(),
            staleness_weighted: self.is_async(),
        }
    }

    /// Whether the new model of a round of full weights is the round's aggregate alone.
    ///
    /// FedAvg, FedProx and the robust rules (median, trimmed mean, Krum) replace the global
    /// model, so [`Optimizer::finish_round_replacing`] finishes their rounds without the
    /// previous model, and an aggregator can free it while updates arrive. FedAdam, FedYogi
    /// and FedAdaGrad step from the previous model (their delta is the mean minus it), and
    /// FedBuff applies its deltas to it: they need it until the round is finished.
    pub fn replaces_global(&self) -> bool {
        !matches!(self.kind, OptimizerKind::Adaptive { .. } | OptimizerKind::FedBuff { .. })
    }

    /// [`Optimizer::finish_round`] without the previous global model, for a rule that
    /// [replaces it](Optimizer::replaces_global) and a round of full weights: returns the new
    /// global model. Fails as `finish_round` does, and also when the rule needs the previous
    /// model or the round holds deltas (which apply to it).
    pub fn finish_round_replacing(&mut self, round: Round) -> Result<Weights> {
        self.check_round_sort(&round)?;
        let sort = self.sort();
        let kind = round.update_kind.ok_or(Error::EmptyRound { sort })?;
        if !self.replaces_global() || kind == UpdateKind::Delta {
            return Err(Error::InvalidArgument {
                name: "round",
                reason: format!(
                    "a '{sort}' round of {} needs the previous global model (use finish_round)",
                    kind.name()
                ),
            });
        }
        self.aggregate_replacing(round.acc)
    }

    fn check_round_sort(&self, round: &Round) -> Result<()> {
        if round.sort != self.sort() {
            return Err(Error::InvalidArgument {
                name: "round",
                reason: format!(
                    "round was begun by a '{}' optimizer, not '{}'",
                    round.sort,
                    self.sort()
                ),
            });
        }
        Ok(())
    }

    /// The aggregate of a round under a rule that [replaces](Optimizer::replaces_global) the
    /// global model.
    fn aggregate_replacing(&self, acc: Acc) -> Result<Weights> {
        let sort = self.sort();
        match (acc, &self.kind) {
            (Acc::Mean { mean, .. }, OptimizerKind::FedAvg | OptimizerKind::FedProx { .. }) => {
                mean.finish(sort)
            }
            (Acc::Collect(updates), _) if updates.is_empty() => Err(Error::EmptyRound { sort }),
            (Acc::Collect(updates), OptimizerKind::Median) => {
                Ok(robust::median_unchecked(&updates))
            }
            (Acc::Collect(updates), OptimizerKind::TrimmedMean { beta }) => {
                robust::trimmed_mean_unchecked(&updates, *beta)
            }
            (Acc::Collect(updates), OptimizerKind::Krum { f, m }) => {
                Ok(robust::krum_unchecked(&updates, *f, *m)?.aggregate)
            }
            _ => unreachable!(
                "begin_round builds the accumulator matching the optimizer kind, and callers check replaces_global"
            ),
        }
    }

    /// Aggregates the round into `global`, which becomes the new global model.
    ///
    /// Updating in place avoids a second model-sized buffer (and, for big models, the page
    /// faults of allocating one). `global` must be the model the round began with (same
    /// layout; for FedBuff, the current model to which the buffered deltas apply). Fails on an
    /// empty round, a round whose samples sum to zero (mean-based rules), too few updates for
    /// a robust rule, or a round begun by an optimizer of another sort; on error `global` is
    /// unchanged.
    pub fn finish_round(&mut self, round: Round, global: &mut Weights) -> Result<()> {
        self.check_round_sort(&round)?;
        round.layout.check(global)?;
        let sort = self.sort();
        let kind = round.update_kind.ok_or(Error::EmptyRound { sort })?;
        // Turns the round's aggregate into the new model, in place.
        let apply = |global: &mut Weights, agg: Weights| -> Result<()> {
            match kind {
                UpdateKind::Weights => *global = agg,
                UpdateKind::Delta => global.add_scaled(&agg, 1.0)?,
            }
            Ok(())
        };
        // Turns the round's aggregate into a delta from `global`, reusing its buffer.
        let into_delta = |mut agg: Weights, global: &Weights| -> Result<Weights> {
            if kind == UpdateKind::Weights {
                agg.add_scaled(global, -1.0)?;
            }
            Ok(agg)
        };
        if self.replaces_global() {
            return apply(global, self.aggregate_replacing(round.acc)?);
        }
        match (round.acc, &self.kind) {
            (Acc::Mean { mean, .. }, OptimizerKind::Adaptive { .. }) => {
                let delta = into_delta(mean.finish(sort)?, global)?;
                let server =
                    self.server.as_mut().expect("adaptive optimizers are built with server state");
                server.step(global, &delta)
            }
            (Acc::Mean { mean, total_samples }, OptimizerKind::FedBuff { lr, .. }) => {
                // The mean is Σ nᵢsᵢΔᵢ / Σ nᵢsᵢ; rescale to Σ nᵢsᵢΔᵢ / Σ nᵢ so that stale
                // updates shrink the step instead of being renormalised away.
                let staleness_mass = mean.total_weight();
                let delta = into_delta(mean.finish(sort)?, global)?;
                let scale = (f64::from(*lr) * staleness_mass / total_samples) as f32;
                global.add_scaled(&delta, scale)
            }
            _ => unreachable!("begin_round builds the accumulator matching the optimizer kind"),
        }
    }
}

#[derive(Debug, Clone)]
enum Acc {
    Mean {
        mean: WeightedMean,
        /// Σ nᵢ over the folded updates (FedBuff's normaliser).
        total_samples: f64,
    },
    Collect(Vec<Weights>),
}

/// One round's (or one FedBuff buffer's) accumulator. Build it with
/// [`Optimizer::begin_round`], feed it with [`Round::add`] / [`Round::add_delta`], and close
/// it with [`Optimizer::finish_round`].
///
/// Every update is checked before it is folded: same layout as the global model (the error
/// names the first differing tensor), all values finite (NaN/inf are rejected with the
/// tensor's name and index), and all updates of a round of one kind. A rejected update
/// changes nothing, so the round can go on with the others.
#[derive(Debug, Clone)]
pub struct Round {
    sort: &'static str,
    layout: Layout,
    update_kind: Option<UpdateKind>,
    acc: Acc,
    count: usize,
    agg_goal: Option<usize>,
    staleness_weighted: bool,
}

impl Round {
    /// Adds a trainer's full weights, trained on `num_samples` samples, `staleness` model
    /// versions behind the current global (0 for synchronous rounds).
    ///
    /// Synchronous rules ignore `staleness`; robust rules ignore `num_samples`. FedBuff
    /// rejects full weights with `staleness` > 0 (send a delta instead).
    pub fn add(&mut self, update: &Weights, num_samples: u64, staleness: u32) -> Result<()> {
        if self.staleness_weighted && staleness > 0 {
            return Err(Error::StaleWeights { staleness });
        }
        self.add_kind(UpdateKind::Weights, &update.view(), num_samples, staleness)
    }

    /// [`Round::add`] for a borrowed update, such as the little-endian `f32` bytes of a
    /// received message: folded without decoding it into [`Weights`] first (robust rules,
    /// which keep every update, copy it).
    pub fn add_view(
        &mut self,
        update: &WeightsView<'_>,
        num_samples: u64,
        staleness: u32,
    ) -> Result<()> {
        if self.staleness_weighted && staleness > 0 {
            return Err(Error::StaleWeights { staleness });
        }
        self.add_kind(UpdateKind::Weights, update, num_samples, staleness)
    }

    /// Adds a trainer's delta `w_local - w_start` (see [`Round::add`] for the arguments).
    pub fn add_delta(&mut self, delta: &Weights, num_samples: u64, staleness: u32) -> Result<()> {
        self.add_kind(UpdateKind::Delta, &delta.view(), num_samples, staleness)
    }

    fn add_kind(
        &mut self,
        kind: UpdateKind,
        update: &WeightsView<'_>,
        num_samples: u64,
        staleness: u32,
    ) -> Result<()> {
        if let Some(first) = self.update_kind
            && first != kind
        {
            return Err(Error::MixedUpdateKinds { first: first.name(), got: kind.name() });
        }
        match &mut self.acc {
            Acc::Mean { mean, total_samples } => {
                let n = num_samples as f64;
                let weight = if self.staleness_weighted {
                    n / (1.0 + f64::from(staleness)).sqrt()
                } else {
                    n
                };
                mean.add_view(update, weight)?;
                *total_samples += n;
            }
            Acc::Collect(updates) => {
                self.layout.check_view(update)?;
                update.check_finite()?;
                updates.push(update.to_weights());
            }
        }
        self.update_kind = Some(kind);
        self.count += 1;
        Ok(())
    }

    /// Number of updates accepted so far.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether no update was accepted yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether the round can be finished: FedBuff once `aggGoal` updates are buffered,
    /// other rules once it holds at least one update (the role decides when a synchronous
    /// round ends).
    pub fn is_ready(&self) -> bool {
        self.count >= self.agg_goal.unwrap_or(1)
    }

    /// The kind of the updates accepted so far, if any.
    pub fn update_kind(&self) -> Option<UpdateKind> {
        self.update_kind
    }

    /// The sort of the optimizer that began this round.
    pub fn sort(&self) -> &'static str {
        self.sort
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use serde_json::json;

    use super::*;
    use crate::weights::Tensor;
    use crate::weights::tests::model;

    /// Runs `finish_round` on a copy of `global` and returns the new model.
    fn finish(o: &mut Optimizer, r: Round, global: &Weights) -> Result<Weights> {
        let mut g = global.clone();
        o.finish_round(r, &mut g)?;
        Ok(g)
    }

    fn opt(v: Value) -> Optimizer {
        Optimizer::from_config(&v).unwrap()
    }

    fn vector(v: &[f32]) -> Weights {
        Weights::from_tensors(vec![Tensor::new("w", vec![v.len()], v.to_vec()).unwrap()]).unwrap()
    }

    #[test]
    fn rounds_can_move_across_threads() {
        // The roles move a Round into spawn_blocking and back.
        fn assert_send_static<T: Send + Sync + 'static>() {}
        assert_send_static::<Round>();
        assert_send_static::<Optimizer>();
        assert_send_static::<crate::Selector>();
    }

    #[test]
    fn fedavg_of_weights_and_of_deltas() {
        let mut o = opt(json!({"sort": "fedavg"}));
        let global = model([1.0; 5]);
        let mut r = o.begin_round(&global);
        r.add(&model([1.0, 2.0, 3.0, 4.0, 5.0]), 10, 0).unwrap();
        r.add(&model([5.0, 6.0, 7.0, 8.0, 9.0]), 30, 7).unwrap();
        assert!(r.is_ready());
        assert_eq!(finish(&mut o, r, &global).unwrap(), model([4.0, 5.0, 6.0, 7.0, 8.0]));

        let mut r = o.begin_round(&global);
        r.add_delta(&model([2.0, 0.0, 0.0, 0.0, -4.0]), 1, 0).unwrap();
        r.add_delta(&model([0.0, 0.0, 0.0, 0.0, 0.0]), 1, 0).unwrap();
        assert_eq!(r.update_kind(), Some(UpdateKind::Delta));
        assert_eq!(finish(&mut o, r, &global).unwrap(), model([2.0, 1.0, 1.0, 1.0, -1.0]));
    }

    #[test]
    fn replacing_rules_finish_without_the_previous_global_bit_for_bit() {
        let global = model([1.0; 5]);
        let updates = [
            model([1.0, 2.0, 3.0, 4.0, 5.0]),
            model([5.0, 6.0, 7.0, 8.0, 9.0]),
            model([0.5, -6.0, 7.5, 1.0, 2.0]),
            model([2.0, 2.0, 2.0, 2.0, 2.0]),
            model([9.0, 0.0, -1.0, 3.0, 4.0]),
        ];
        for config in [
            json!({"sort": "fedavg"}),
            json!({"sort": "fedprox"}),
            json!({"sort": "median"}),
            json!({"sort": "trimmedmean", "kwargs": {"beta": 0.2}}),
            json!({"sort": "krum", "kwargs": {"f": 1, "m": 2}}),
        ] {
            let mut o = opt(config.clone());
            assert!(o.replaces_global(), "{config}");
            let mut r = o.begin_round(&global);
            for (i, u) in updates.iter().enumerate() {
                r.add(u, 10 * (i as u64 + 1), 0).unwrap();
            }
            let expected = finish(&mut o, r.clone(), &global).unwrap();
            assert_eq!(o.finish_round_replacing(r).unwrap(), expected, "{config}");
            // An empty round fails as finish_round does.
            let empty = o.begin_round(&global);
            assert!(matches!(o.finish_round_replacing(empty), Err(Error::EmptyRound { .. })));
        }

        // Deltas apply to the previous model: refused, not silently averaged.
        let mut o = opt(json!({"sort": "fedavg"}));
        let mut r = o.begin_round(&global);
        r.add_delta(&model([1.0; 5]), 1, 0).unwrap();
        let err = o.finish_round_replacing(r).unwrap_err().to_string();
        assert!(err.contains("previous global model"), "{err}");

        // Server optimizers step from the previous model.
        for sort in ["fedadam", "fedyogi", "fedadagrad", "fedbuff"] {
            let mut o = opt(json!({ "sort": sort }));
            assert!(!o.replaces_global(), "{sort}");
            let mut r = o.begin_round(&global);
            r.add_delta(&model([1.0; 5]), 1, 0).unwrap();
            assert!(o.finish_round_replacing(r).is_err(), "{sort}");
        }
    }

    #[test]
    fn fedadam_applies_the_server_step_to_the_mean_delta() {
        let mut o = opt(json!({"sort": "fedadam",
            "kwargs": {"lr": 0.1, "beta1": 0.5, "beta2": 0.75, "tau": 0.5}}));
        let global = vector(&[0.0]);
        let mut r = o.begin_round(&global);
        r.add(&vector(&[1.0]), 1, 0).unwrap();
        r.add(&vector(&[3.0]), 1, 0).unwrap();
        // Δ = 2: m = 1, v = 0.75·0.25 + 0.25·4 = 1.1875, x = 0.1·1/(√1.1875 + 0.5).
        let x = finish(&mut o, r, &global).unwrap();
        assert!((x.tensors()[0].data()[0] - 0.062_904).abs() < 1e-6, "{x:?}");
        // The moments persist: a zero delta still moves the model along m.
        let mut r = o.begin_round(&x);
        r.add(&x, 1, 0).unwrap();
        let y = finish(&mut o, r, &x).unwrap();
        assert!(y.tensors()[0].data()[0] > x.tensors()[0].data()[0]);

        for sort in ["fedyogi", "fedadagrad"] {
            let mut o = opt(json!({ "sort": sort }));
            let mut r = o.begin_round(&global);
            r.add(&vector(&[1.0]), 5, 0).unwrap();
            let x = finish(&mut o, r, &global).unwrap();
            let step = x.tensors()[0].data()[0];
            assert!(step > 0.0 && step < 0.01 + 1e-6, "{sort}: {step}");
        }
    }

    #[test]
    fn fedbuff_weights_stale_deltas_down_and_waits_for_agg_goal() {
        let mut o = opt(json!({"sort": "fedbuff", "kwargs": {"aggGoal": 2, "concurrency": 4}}));
        assert!(o.is_async());
        assert_eq!(o.agg_goal(), Some(2));
        let global = vector(&[1.0, 1.0]);
        let mut r = o.begin_round(&global);
        r.add_delta(&vector(&[2.0, 0.0]), 1, 0).unwrap();
        assert!(!r.is_ready());
        // Staleness 3: s = 1/√4 = 0.5.
        r.add_delta(&vector(&[0.0, 4.0]), 1, 3).unwrap();
        assert!(r.is_ready());
        // (1·1·[2,0] + 1·0.5·[0,4]) / (1 + 1) = [1, 1].
        assert_eq!(finish(&mut o, r, &global).unwrap(), vector(&[2.0, 2.0]));

        let mut r = o.begin_round(&global);
        assert_eq!(
            r.add(&vector(&[2.0, 0.0]), 1, 1).unwrap_err(),
            Error::StaleWeights { staleness: 1 }
        );
        // Fresh full weights are fine: the delta is taken against the current model.
        r.add(&vector(&[3.0, 1.0]), 1, 0).unwrap();
        let mut o = opt(json!({"sort": "fedbuff", "kwargs": {"lr": 0.5}}));
        assert_eq!(finish(&mut o, r, &global).unwrap(), vector(&[2.0, 1.0]));
    }

    #[test]
    fn robust_sorts_through_the_facade() {
        let global = model([0.0; 5]);
        let ups = [
            model([1.0, 0.0, 0.0, 0.0, 0.0]),
            model([2.0, 0.0, 0.0, 0.0, 0.0]),
            model([3.0, 0.0, 0.0, 0.0, 0.0]),
            model([4.0, 0.0, 0.0, 0.0, 0.0]),
            model([1000.0, 0.0, 0.0, 0.0, 0.0]),
        ];
        for (cfg, want) in [
            (json!({"sort": "median"}), 3.0),
            (json!({"sort": "trimmedmean", "kwargs": {"beta": 0.2}}), 3.0),
            (json!({"sort": "krum", "kwargs": {"f": 1, "m": 3}}), 2.0),
        ] {
            let mut o = opt(cfg.clone());
            assert!(o.holds_all_updates());
            let mut r = o.begin_round(&global);
            for (i, u) in ups.iter().enumerate() {
                // Sample counts are ignored by robust rules, even absurd ones.
                r.add_delta(u, if i == 4 { 1_000_000 } else { 1 }, 0).unwrap();
            }
            let got = finish(&mut o, r, &model([10.0; 5])).unwrap();
            assert_eq!(got, model([10.0 + want, 10.0, 10.0, 10.0, 10.0]), "{cfg}");
        }
        let mut o = opt(json!({"sort": "krum"}));
        let mut r = o.begin_round(&global);
        r.add(&ups[0], 1, 0).unwrap();
        assert!(matches!(
            finish(&mut o, r, &global),
            Err(Error::NotEnoughUpdates { sort: "krum", needed: 5, got: 1, .. })
        ));
    }

    #[test]
    fn bad_rounds_are_errors() {
        let global = model([0.0; 5]);
        for sort in OPTIMIZER_SORTS {
            let mut o = opt(json!({ "sort": sort }));
            let r = o.begin_round(&global);
            assert_eq!(
                finish(&mut o, r, &global).unwrap_err(),
                Error::EmptyRound { sort },
                "{sort}"
            );
        }
        // On error the global model is left as it was.
        let mut o = opt(json!({"sort": "krum"}));
        let mut r = o.begin_round(&global);
        r.add(&model([1.0; 5]), 1, 0).unwrap();
        let mut g = global.clone();
        assert!(o.finish_round(r, &mut g).is_err());
        assert_eq!(g, global);

        let mut o = Optimizer::default();
        let mut r = o.begin_round(&global);
        r.add(&model([1.0; 5]), 0, 0).unwrap();
        assert_eq!(
            finish(&mut o, r, &global).unwrap_err(),
            Error::ZeroTotalSamples { sort: "fedavg" }
        );

        let mut r = o.begin_round(&global);
        let other =
            Weights::from_tensors(vec![Tensor::zeros("a", vec![2]), Tensor::zeros("b", vec![3])])
                .unwrap();
        assert_eq!(
            r.add(&other, 1, 0).unwrap_err().to_string(),
            "model layout differs for tensor 'b': expected shape [1, 3], got [3]"
        );
        let err = r.add(&model([0.0, f32::NAN, 0.0, 0.0, 0.0]), 1, 0).unwrap_err();
        assert_eq!(err.to_string(), "tensor 'a' holds a non-finite value (NaN) at element 1");
        r.add(&model([2.0; 5]), 1, 0).unwrap();
        assert!(matches!(r.add_delta(&model([1.0; 5]), 1, 0), Err(Error::MixedUpdateKinds { .. })));
        assert_eq!(r.len(), 1);
        let mut median = opt(json!({"sort": "median"}));
        assert!(matches!(
            finish(&mut median, r.clone(), &global),
            Err(Error::InvalidArgument { name: "round", .. })
        ));
        let one_tensor = Weights::from_tensors(vec![Tensor::zeros("a", vec![2])]).unwrap();
        assert!(matches!(finish(&mut o, r.clone(), &one_tensor), Err(Error::TensorCount { .. })));
        assert_eq!(finish(&mut o, r, &global).unwrap(), model([2.0; 5]));
    }

    #[test]
    fn config_parsing_defaults_and_errors() {
        assert_eq!(Optimizer::from_config(&Value::Null).unwrap().sort(), "fedavg");
        let o = opt(json!({"sort": "FedAdam", "kwargs": {"lr": 0.01, "beta1": 0.9,
            "beta2": 0.99, "tau": 1e-3, "//": "comment"}}));
        assert!(matches!(o.kind(), OptimizerKind::Adaptive { rule: AdaptiveRule::Adam, params }
            if params.lr == 0.01 && params.tau == 1e-3));
        let o = opt(json!({"sort": "fedbuff", "kwargs": {"aggGoal": 3, "concurrency": 5}}));
        assert_eq!(o.kind(), &OptimizerKind::FedBuff { agg_goal: 3, concurrency: 5, lr: 1.0 });
        assert_eq!(opt(json!({"sort": "fedprox", "kwargs": {"mu": 0.1}})).proximal_mu(), Some(0.1));
        assert_eq!(opt(json!({"sort": "fedprox"})).proximal_mu(), Some(0.01));
        assert_eq!(
            opt(json!({"sort": "krum", "kwargs": {"f": 2, "m": 3}})).kind(),
            &OptimizerKind::Krum { f: 2, m: 3 }
        );
        assert_eq!(
            opt(json!({"sort": "trimmedmean", "kwargs": {"beta": 0.1}})).kind(),
            &OptimizerKind::TrimmedMean { beta: 0.1 }
        );

        let cases = [
            (
                json!({"sort": "fedsgd"}),
                "unknown optimizer sort 'fedsgd' (valid sorts: fedavg, fedprox, fedadam, \
                 fedyogi, fedadagrad, fedbuff, median, trimmedmean, krum)",
            ),
            (
                json!({"sort": "fedadam", "kwargs": {"lr": -1}}),
                "invalid kwarg 'lr' for optimizer sort 'fedadam': must be a finite number > 0, got -1",
            ),
            (
                json!({"sort": "fedadam", "kwargs": {"beta1": "high"}}),
                "invalid kwarg 'beta1' for optimizer sort 'fedadam': expected a number, got \"high\"",
            ),
            (
                json!({"sort": "fedadam", "kwargs": {"momentum": 0.9}}),
                "unknown kwarg 'momentum' for optimizer sort 'fedadam' (valid kwargs: lr, beta1, beta2, tau)",
            ),
            (
                json!({"sort": "fedavg", "kwargs": {"lr": 1}}),
                "unknown kwarg 'lr' for optimizer sort 'fedavg' (valid kwargs: none)",
            ),
            (
                json!({"sort": "fedbuff", "kwargs": {"aggGoal": 0}}),
                "invalid kwarg 'aggGoal' for optimizer sort 'fedbuff': must be at least 1, got 0",
            ),
            (
                json!({"sort": "fedbuff", "kwargs": {"aggGoal": 2.5}}),
                "invalid kwarg 'aggGoal' for optimizer sort 'fedbuff': expected a non-negative integer, got 2.5",
            ),
            (
                json!({"sort": "trimmedmean", "kwargs": {"beta": 0.5}}),
                "invalid kwarg 'beta' for optimizer sort 'trimmedmean': must be in [0, 0.5), got 0.5",
            ),
            (
                json!({"sort": "krum", "kwargs": {"m": 0}}),
                "invalid kwarg 'm' for optimizer sort 'krum': must be at least 1, got 0",
            ),
            (
                json!({"sort": "fedavg", "kwargs": [1]}),
                "optimizer.kwargs of sort 'fedavg' must be an object, got [1]",
            ),
            (
                json!({"sort": "fedavg", "kwarg": {}}),
                "unknown field 'kwarg' in optimizer (expected 'sort' and 'kwargs')",
            ),
            (
                json!({"kwargs": {}}),
                "optimizer.sort is missing or not a string (valid sorts: fedavg, fedprox, \
                 fedadam, fedyogi, fedadagrad, fedbuff, median, trimmedmean, krum)",
            ),
            (
                json!("fedavg"),
                "optimizer must be an object like {\"sort\": \"...\", \"kwargs\": {...}}, got \"fedavg\"",
            ),
        ];
        for (cfg, want) in cases {
            let err = Optimizer::from_config(&cfg).unwrap_err();
            assert_eq!(err.to_string(), want, "{cfg}");
        }
        assert!(Optimizer::new(OptimizerKind::FedProx { mu: f32::NAN }).is_err());
    }
}
