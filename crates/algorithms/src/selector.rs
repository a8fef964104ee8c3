//! Trainer selection policies: which ends an aggregator sends the model to.
//!
//! A [`Selector`] is pure policy: given the ends currently available on the channel (their
//! ids) and the round number, [`Selector::select`] returns the ends that should train now.
//! The aggregator role tells it what happened with [`Selector::report`] (an update arrived,
//! with the trainer's loss statistics) and [`Selector::remove`] (an end left).
//!
//! | sort | kwargs (defaults) | policy |
//! |---|---|---|
//! | `default` | none | every available end, every round |
//! | `random` | `k` (1), `seed` (0) | `k` ends uniformly at random |
//! | `fedbuff` | `c` (10), `seed` (0) | keep `c` ends busy: returns only *newly dispatched* ends, an end is busy until its report |
//! | `oort` | see [`OortParams`] | utility-guided exploration/exploitation (Lai et al., OSDI 2021) |
//!
//! Randomness is reproducible: each round draws from a generator seeded with `(seed, round)`,
//! and ends are sorted by id first, so the same inputs always give the same selection
//! whatever order the channel listed the ends in. (The generator is rand's `StdRng`,
//! stable for a given rand version.)

use std::collections::{BTreeSet, HashMap};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::config::{self, non_negative, parse_sort, positive, unit_closed};

/// The selector sorts [`Selector::from_config`] accepts.
pub const SELECTOR_SORTS: &[&str] = &["default", "random", "fedbuff", "oort"];

/// What a trainer reported with its update, for utility-guided selection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndReport {
    /// Samples trained on in the round.
    pub num_samples: u64,
    /// Mean of the squared per-sample training losses, `(1/|B|) Σ loss²`.
    pub mean_squared_loss: f64,
    /// Wall-clock time the end took for the round, in seconds.
    pub duration_secs: f64,
}

impl EndReport {
    /// Builds a report from per-sample losses.
    pub fn from_losses(losses: &[f32], duration_secs: f64) -> Self {
        let sum_sq: f64 = losses.iter().map(|&l| f64::from(l) * f64::from(l)).sum();
        Self {
            num_samples: losses.len() as u64,
            mean_squared_loss: if losses.is_empty() { 0.0 } else { sum_sq / losses.len() as f64 },
            duration_secs,
        }
    }

    /// Oort's statistical utility `|B| · sqrt((1/|B|) Σ loss²)`.
    pub fn statistical_utility(&self) -> f64 {
        self.num_samples as f64 * self.mean_squared_loss.max(0.0).sqrt()
    }
}

/// Oort's hyperparameters (kwargs in parentheses, with defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OortParams {
    /// Ends wanted per round before over-commitment (`k`, 10).
    pub k: usize,
    /// Over-commitment factor ≥ 1: select `ceil(k · overcommit)` ends so that stragglers can
    /// be dropped (`overcommit`, 1.3).
    pub overcommit: f64,
    /// Initial exploration fraction ε (`epsilon`, 0.9).
    pub epsilon: f64,
    /// Per-round decay of ε (`epsilonDecay`, 0.98).
    pub epsilon_decay: f64,
    /// Floor of ε (`minEpsilon`, 0.3).
    pub min_epsilon: f64,
    /// Developer-preferred round duration T in seconds; ends slower than T have their
    /// utility multiplied by `(T/t)^alpha` (`roundDuration`, 0 = no system penalty).
    pub round_duration: f64,
    /// Penalty exponent α (`alpha`, 2).
    pub alpha: f64,
    /// Exploitation keeps ends whose score is at least `cutoff` × the k-th best score and
    /// samples among them proportionally to score (`cutoff`, 0.95).
    pub cutoff: f64,
    /// Seed of the per-round generator (`seed`, 0).
    pub seed: u64,
}

impl Default for OortParams {
    fn default() -> Self {
        Self {
            k: 10,
            overcommit: 1.3,
            epsilon: 0.9,
            epsilon_decay: 0.98,
            min_epsilon: 0.3,
            round_duration: 0.0,
            alpha: 2.0,
            cutoff: 0.95,
            seed: 0,
        }
    }
}

/// A selection policy and its hyperparameters.
#[derive(Debug, Clone, PartialEq)]
pub enum SelectorKind {
    /// Every available end.
    Default,
    /// `k` ends uniformly at random.
    Random {
        /// Ends per round.
        k: usize,
        /// Generator seed.
        seed: u64,
    },
    /// Keep `c` ends training at all times (asynchronous FL).
    FedBuff {
        /// Concurrency target.
        c: usize,
        /// Generator seed.
        seed: u64,
    },
    /// Oort utility-guided selection.
    Oort(OortParams),
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct EndStats {
    /// Statistical utility from the latest report; `None` until the end reported once.
    utility: Option<f64>,
    duration_secs: f64,
    /// Last round the end was selected in.
    last_selected: u64,
}

/// A configured selection policy with its memory of past rounds.
#[derive(Debug, Clone)]
pub struct Selector {
    kind: SelectorKind,
    in_flight: BTreeSet<String>,
    stats: HashMap<String, EndStats>,
}

impl Default for Selector {
    /// The `default` sort: select every end.
    fn default() -> Self {
        Self::new(SelectorKind::Default)
    }
}

impl Selector {
    /// A selector of `kind` with no history.
    pub fn new(kind: SelectorKind) -> Self {
        Self { kind, in_flight: BTreeSet::new(), stats: HashMap::new() }
    }

    /// The selector's memory of past rounds (ends in flight, per-end statistics), as JSON to
    /// persist after a round; [`Selector::restore`] reads it back.
    pub fn state(&self) -> Value {
        serde_json::json!({ "inFlight": self.in_flight, "stats": self.stats })
    }

    /// Restores a memory saved by [`Selector::state`] (a resumed aggregator). A malformed
    /// state is an error and changes nothing.
    pub fn restore(&mut self, state: &Value) -> crate::Result<()> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        struct Saved {
            in_flight: BTreeSet<String>,
            stats: HashMap<String, EndStats>,
        }
        let saved: Saved =
            serde_json::from_value(state.clone()).map_err(|e| crate::Error::InvalidArgument {
                name: "selector state",
                reason: format!("cannot be restored: {e}"),
            })?;
        self.in_flight = saved.in_flight;
        self.stats = saved.stats;
        Ok(())
    }

    /// Parses the job's `selector` object, e.g. `{"sort": "random", "kwargs": {"k": 2}}`.
    ///
    /// `null` gives the `default` sort. Unknown sorts, unknown kwargs and out-of-range values
    /// are errors naming the field.
    pub fn from_config(value: &Value) -> config::Result<Self> {
        if value.is_null() {
            return Ok(Self::default());
        }
        let mut kw = parse_sort(value, "selector", SELECTOR_SORTS)?;
        let (kind, valid): (SelectorKind, &[&str]) = match kw.sort {
            "default" => (SelectorKind::Default, &[]),
            "random" => (
                SelectorKind::Random { k: kw.count("k", 1, 1)?, seed: kw.integer("seed", 0, 0)? },
                &["k", "seed"],
            ),
            "fedbuff" => (
                SelectorKind::FedBuff { c: kw.count("c", 10, 1)?, seed: kw.integer("seed", 0, 0)? },
                &["c", "seed"],
            ),
            "oort" => {
                let d = OortParams::default();
                let params = OortParams {
                    k: kw.count("k", d.k as u64, 1)?,
                    overcommit: kw.number("overcommit", d.overcommit, |v| {
                        (!(v.is_finite() && v >= 1.0)).then_some("must be a finite number >= 1")
                    })?,
                    epsilon: kw.number("epsilon", d.epsilon, unit_closed)?,
                    epsilon_decay: kw.number("epsilonDecay", d.epsilon_decay, unit_closed)?,
                    min_epsilon: kw.number("minEpsilon", d.min_epsilon, unit_closed)?,
                    round_duration: kw.number("roundDuration", d.round_duration, non_negative)?,
                    alpha: kw.number("alpha", d.alpha, positive)?,
                    cutoff: kw.number("cutoff", d.cutoff, unit_closed)?,
                    seed: kw.integer("seed", d.seed, 0)?,
                };
                (
                    SelectorKind::Oort(params),
                    &[
                        "k",
                        "overcommit",
                        "epsilon",
                        "epsilonDecay",
                        "minEpsilon",
                        "roundDuration",
                        "alpha",
                        "cutoff",
                        "seed",
                    ],
                )
            }
            other => unreachable!("parse_sort returned unlisted sort {other}"),
        };
        kw.finish(valid)?;
        Ok(Self::new(kind))
    }

    /// The policy.
    pub fn kind(&self) -> &SelectorKind {
        &self.kind
    }

    /// The config sort (`default`, `random`, `fedbuff`, `oort`).
    pub fn sort(&self) -> &'static str {
        match self.kind {
            SelectorKind::Default => "default",
            SelectorKind::Random { .. } => "random",
            SelectorKind::FedBuff { .. } => "fedbuff",
            SelectorKind::Oort(_) => "oort",
        }
    }

    /// Ends currently training (dispatched and not yet reported); only `fedbuff` tracks them.
    pub fn in_flight(&self) -> &BTreeSet<String> {
        &self.in_flight
    }

    /// The ends to send the model to now, sorted by id.
    ///
    /// For `default`, `random` and `oort` this is the round's cohort. For `fedbuff` it is the
    /// ends newly dispatched to bring the number in flight back to `c` (possibly none).
    /// Duplicate ids are ignored; no ends gives an empty selection.
    pub fn select<S: AsRef<str>>(&mut self, ends: &[S], round: u64) -> Vec<String> {
        let mut ends: Vec<&str> = ends.iter().map(AsRef::as_ref).collect();
        ends.sort_unstable();
        ends.dedup();
        let mut rng = StdRng::seed_from_u64(mix(self.seed(), round));
        let mut res: Vec<String> = match &self.kind {
            SelectorKind::Default => ends.iter().map(|s| s.to_string()).collect(),
            SelectorKind::Random { k, .. } => sample(&ends, *k, &mut rng),
            SelectorKind::FedBuff { c, .. } => {
                // Ends that left the channel no longer count as busy.
                self.in_flight.retain(|e| ends.binary_search(&e.as_str()).is_ok());
                let idle: Vec<&str> =
                    ends.iter().copied().filter(|e| !self.in_flight.contains(*e)).collect();
                let need = c.saturating_sub(self.in_flight.len());
                let chosen = sample(&idle, need, &mut rng);
                self.in_flight.extend(chosen.iter().cloned());
                chosen
            }
            SelectorKind::Oort(p) => oort_select(p, &self.stats, &ends, round, &mut rng),
        };
        res.sort_unstable();
        if matches!(self.kind, SelectorKind::Oort(_)) {
            for end in &res {
                self.stats.entry(end.clone()).or_default().last_selected = round;
            }
        }
        res
    }

    /// Records that `end` delivered its update, with its statistics.
    ///
    /// `fedbuff` frees the end for the next dispatch; `oort` updates its utility.
    pub fn report(&mut self, end: &str, report: &EndReport) {
        self.in_flight.remove(end);
        if matches!(self.kind, SelectorKind::Oort(_)) {
            let stats = self.stats.entry(end.to_owned()).or_default();
            stats.utility = Some(report.statistical_utility());
            stats.duration_secs = report.duration_secs;
        }
    }

    /// Forgets `end` (it left the channel).
    pub fn remove(&mut self, end: &str) {
        self.in_flight.remove(end);
        self.stats.remove(end);
    }

    fn seed(&self) -> u64 {
        match &self.kind {
            SelectorKind::Default => 0,
            SelectorKind::Random { seed, .. } | SelectorKind::FedBuff { seed, .. } => *seed,
            SelectorKind::Oort(p) => p.seed,
        }
    }
}

/// SplitMix64 of `seed` and `round`, so that consecutive rounds get unrelated streams.
fn mix(seed: u64, round: u64) -> u64 {
    let mut z = seed ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `k` of `items` uniformly without replacement (all of them if `k` ≥ their number).
fn sample(items: &[&str], k: usize, rng: &mut StdRng) -> Vec<String> {
    if k >= items.len() {
        return items.iter().map(|s| s.to_string()).collect();
    }
    rand::seq::index::sample(rng, items.len(), k)
        .into_iter()
        .map(|i| items[i].to_string())
        .collect()
}

/// Oort's selection (Lai et al., "Oort: Efficient Federated Learning via Guided Participant
/// Selection", OSDI 2021, Algorithm 1), simplified: no pacer and no blacklist.
///
/// - Explored ends (with a report) score `U/Umax + sqrt(0.1·ln(round) / last_selected)`,
///   the statistical utility normalised across ends plus a bonus for ends not picked
///   recently; ends slower than the preferred duration T are scaled by `(T/t)^alpha`.
/// - A fraction ε of the `ceil(k · overcommit)` slots goes to unexplored ends, uniformly
///   (ε decays per round to a floor); the rest is sampled, proportionally to score, among
///   the explored ends scoring at least `cutoff` × the k-th best score.
fn oort_select(
    p: &OortParams,
    stats: &HashMap<String, EndStats>,
    ends: &[&str],
    round: u64,
    rng: &mut StdRng,
) -> Vec<String> {
    let target = ((p.k as f64 * p.overcommit).ceil() as usize).min(ends.len());
    let (explored, unexplored): (Vec<&str>, Vec<&str>) =
        ends.iter().partition(|e| stats.get(**e).is_some_and(|s| s.utility.is_some()));
    let epsilon = (p.epsilon * p.epsilon_decay.powf(round as f64)).max(p.min_epsilon);
    let mut n_explore = ((epsilon * target as f64).round() as usize).min(unexplored.len());
    let n_exploit = (target - n_explore).min(explored.len());
    // Not enough explored ends to exploit: explore more instead.
    n_explore = (target - n_exploit).min(unexplored.len());

    let max_util = explored.iter().filter_map(|e| stats[*e].utility).fold(0.0f64, f64::max);
    let ln_round = (round.max(1) as f64).ln();
    let mut scored: Vec<(&str, f64)> = explored
        .iter()
        .map(|e| {
            let s = &stats[*e];
            let util = s.utility.unwrap_or(0.0);
            let mut score = if max_util > 0.0 { util / max_util } else { 0.0 };
            score += (0.1 * ln_round / s.last_selected.max(1) as f64).sqrt();
            if p.round_duration > 0.0 && s.duration_secs > p.round_duration {
                score *= (p.round_duration / s.duration_secs).powf(p.alpha);
            }
            (*e, score)
        })
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));

    let mut res = Vec::with_capacity(target);
    if n_exploit > 0 {
        let threshold = p.cutoff * scored[n_exploit - 1].1;
        let mut pool: Vec<(&str, f64)> =
            scored.iter().copied().filter(|(_, s)| *s >= threshold).collect();
        for _ in 0..n_exploit {
            let total: f64 = pool.iter().map(|(_, s)| s).sum();
            let idx = if total > 0.0 {
                let mut x = rng.random::<f64>() * total;
                pool.iter()
                    .position(|(_, s)| {
                        x -= s;
                        x < 0.0
                    })
                    .unwrap_or(pool.len() - 1)
            } else {
                rng.random_range(0..pool.len())
            };
            res.push(pool.swap_remove(idx).0.to_string());
        }
    }
    res.extend(sample(&unexplored, n_explore, rng));
    res
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use serde_json::json;

    fn ends(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("t{i:02}")).collect()
    }

    #[test]
    fn a_restored_selector_selects_as_the_original() {
        let mut original =
            Selector::from_config(&json!({"sort": "oort", "kwargs": {"k": 2}})).unwrap();
        let ends = ["a", "b", "c", "d"];
        for round in 1..=3 {
            for end in original.select(&ends, round) {
                original.report(
                    &end,
                    &EndReport {
                        num_samples: 10,
                        mean_squared_loss: round as f64,
                        duration_secs: 1.0,
                    },
                );
            }
        }
        let saved = original.state();
        let mut resumed =
            Selector::from_config(&json!({"sort": "oort", "kwargs": {"k": 2}})).unwrap();
        resumed.restore(&saved).unwrap();
        assert_eq!(resumed.state(), saved);
        assert_eq!(resumed.select(&ends, 4), original.select(&ends, 4));
        assert!(resumed.restore(&json!({"stats": 3})).is_err());
        assert_eq!(resumed.state(), original.state(), "a failed restore changes nothing");
    }

    #[test]
    fn default_selects_all_sorted_and_deduplicated() {
        let mut s = Selector::from_config(&json!({"sort": "default"})).unwrap();
        assert_eq!(s.select(&["b", "a", "b"], 1), vec!["a", "b"]);
        assert!(s.select::<&str>(&[], 1).is_empty());
    }

    #[test]
    fn random_is_reproducible_and_order_independent() {
        let cfg = json!({"sort": "random", "kwargs": {"k": 3, "seed": 7}});
        let mut a = Selector::from_config(&cfg).unwrap();
        let mut b = Selector::from_config(&cfg).unwrap();
        let e = ends(10);
        let mut reversed = e.clone();
        reversed.reverse();
        let first = a.select(&e, 1);
        assert_eq!(first.len(), 3);
        assert_eq!(first, b.select(&reversed, 1));
        // Different rounds give different cohorts over a few rounds.
        let distinct: BTreeSet<Vec<String>> = (1..6).map(|r| a.select(&e, r)).collect();
        assert!(distinct.len() > 1);
        // k larger than the ends: all of them.
        assert_eq!(a.select(&e[..2], 1), vec!["t00", "t01"]);
    }

    #[test]
    fn fedbuff_keeps_c_ends_in_flight() {
        let mut s = Selector::new(SelectorKind::FedBuff { c: 3, seed: 1 });
        let e = ends(5);
        let first = s.select(&e, 0);
        assert_eq!(first.len(), 3);
        assert_eq!(s.in_flight().len(), 3);
        // Nothing reported: nothing new to dispatch.
        assert!(s.select(&e, 1).is_empty());
        // One reports: exactly one new end, never one still in flight.
        let done = first[0].clone();
        s.report(&done, &EndReport::from_losses(&[1.0], 1.0));
        let next = s.select(&e, 2);
        assert_eq!(next.len(), 1);
        assert!(!first[1..].contains(&next[0]));
        // An in-flight end that leaves the channel is replaced.
        let gone = first[1].clone();
        let remaining: Vec<&String> = e.iter().filter(|x| **x != gone).collect();
        let refill = s.select(&remaining, 3);
        assert_eq!(refill.len(), 1);
        assert_ne!(refill[0], gone);
        assert_eq!(s.in_flight().len(), 3);
    }

    #[test]
    fn oort_explores_first_then_exploits_high_utility_ends() {
        let params = OortParams {
            k: 2,
            overcommit: 1.0,
            epsilon: 0.0,
            min_epsilon: 0.0,
            ..OortParams::default()
        };
        let mut s = Selector::new(SelectorKind::Oort(params));
        let e = ends(6);
        // No reports yet: everything is exploration.
        assert_eq!(s.select(&e, 1).len(), 2);
        // t03 and t05 have by far the highest utility.
        for (i, end) in e.iter().enumerate() {
            let loss = if i == 3 || i == 5 { 10.0 } else { 0.1 };
            s.report(end, &EndReport::from_losses(&[loss; 100], 1.0));
        }
        assert_eq!(s.select(&e, 2), vec!["t03", "t05"]);

        // A slow end is penalised when a preferred duration is set.
        let mut s =
            Selector::new(SelectorKind::Oort(OortParams { k: 1, round_duration: 10.0, ..params }));
        s.report("fast", &EndReport::from_losses(&[1.0; 100], 5.0));
        s.report("slow", &EndReport::from_losses(&[1.2; 100], 100.0));
        assert_eq!(s.select(&["fast", "slow"], 2), vec!["fast"]);
    }

    #[test]
    fn oort_reserves_exploration_slots() {
        let mut s = Selector::new(SelectorKind::Oort(OortParams {
            k: 4,
            overcommit: 1.0,
            epsilon: 0.5,
            min_epsilon: 0.5,
            ..OortParams::default()
        }));
        let e = ends(10);
        for end in &e[..5] {
            s.report(end, &EndReport::from_losses(&[1.0; 10], 1.0));
        }
        let picked = s.select(&e, 3);
        assert_eq!(picked.len(), 4);
        let explored = picked.iter().filter(|p| e[..5].contains(p)).count();
        assert_eq!(explored, 2, "{picked:?}");
    }

    #[test]
    fn config_errors_name_the_problem() {
        let err = Selector::from_config(&json!({"sort": "greedy"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown selector sort 'greedy' (valid sorts: default, random, fedbuff, oort)"
        );
        let err =
            Selector::from_config(&json!({"sort": "random", "kwargs": {"k": 0}})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid kwarg 'k' for selector sort 'random': must be at least 1, got 0"
        );
        let err =
            Selector::from_config(&json!({"sort": "fedbuff", "kwargs": {"k": 2}})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown kwarg 'k' for selector sort 'fedbuff' (valid kwargs: c, seed)"
        );
        let err = Selector::from_config(&json!({"sort": "oort", "kwargs": {"overcommit": 0.5}}))
            .unwrap_err();
        assert!(err.to_string().contains("'overcommit'"), "{err}");
        assert_eq!(Selector::from_config(&Value::Null).unwrap().sort(), "default");
        let s = Selector::from_config(&json!({"sort": "Oort", "kwargs": {"k": 3, "//": "note"}}))
            .unwrap();
        assert!(matches!(s.kind(), SelectorKind::Oort(p) if p.k == 3));
    }
}
