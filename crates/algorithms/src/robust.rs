//! Byzantine-robust aggregation rules: coordinate-wise median, trimmed mean, Krum, Multi-Krum.
//!
//! Unlike the streaming accumulators, these rules need **every update of the round in memory
//! at once** (memory O(model size × updates)): a median or a pairwise distance cannot be
//! computed from a running sum. The round collects the updates and runs the rule at the end.
//!
//! Sample counts are deliberately ignored: a Byzantine trainer could claim any count, and
//! these rules exist to bound the influence of a minority of bad updates.
//!
//! - Coordinate-wise median and trimmed mean: Yin et al., "Byzantine-Robust Distributed
//!   Learning: Towards Optimal Statistical Rates", ICML 2018.
//! - Krum and Multi-Krum: Blanchard et al., "Machine Learning with Adversaries: Byzantine
//!   Tolerant Gradient Descent", NeurIPS 2017.
//!
//! All rules are shift-invariant, so they give the same model whether they are applied to
//! full weights or to deltas from a common base.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::{self, PAR_CHUNK, PAR_THRESHOLD};
use crate::weights::Weights;

/// Coordinate-wise median of `updates` (for an even count, the mean of the two middle
/// values).
pub fn coordinate_median(updates: &[Weights]) -> Result<Weights> {
    validate(updates, "median")?;
    Ok(median_unchecked(updates))
}

/// Coordinate-wise trimmed mean: at each coordinate, drop the `floor(beta * n)` largest and
/// smallest values and average the rest. `beta` must lie in `[0, 0.5)`.
pub fn trimmed_mean(updates: &[Weights], beta: f64) -> Result<Weights> {
    check_beta(beta)?;
    validate(updates, "trimmedmean")?;
    trimmed_mean_unchecked(updates, beta)
}

/// The result of [`krum`]: the aggregate and which updates it was built from.
#[derive(Debug, Clone, PartialEq)]
pub struct KrumOutcome {
    /// Mean of the selected updates (the single selected update when `m` = 1).
    pub aggregate: Weights,
    /// Indices (into the input) of the selected updates, best score first.
    pub selected: Vec<usize>,
    /// Krum score of every input update (lower is more central).
    pub scores: Vec<f64>,
}

/// Krum (`m` = 1) and Multi-Krum (`m` > 1) for at most `f` Byzantine updates.
///
/// Each update's score is the sum of squared distances to its `n - f - 2` nearest
/// neighbours; the `m` lowest-scoring updates are averaged (uniformly). Needs
/// `n ≥ 2f + 3` and `1 ≤ m ≤ n - f`.
pub fn krum(updates: &[Weights], f: usize, m: usize) -> Result<KrumOutcome> {
    validate(updates, "krum")?;
    krum_unchecked(updates, f, m)
}

pub(crate) fn check_beta(beta: f64) -> Result<()> {
    if !(0.0..0.5).contains(&beta) {
        return Err(Error::InvalidArgument {
            name: "beta",
            reason: format!("trim fraction must be in [0, 0.5), got {beta}"),
        });
    }
    Ok(())
}

fn validate(updates: &[Weights], sort: &'static str) -> Result<()> {
    let first = updates.first().ok_or(Error::EmptyRound { sort })?;
    for u in updates {
        first.check_same_layout(u)?;
        u.check_finite()?;
    }
    Ok(())
}

pub(crate) fn median_unchecked(updates: &[Weights]) -> Weights {
    let refs: Vec<&Weights> = updates.iter().collect();
    by_coordinate(&refs, |buf| {
        buf.sort_unstable_by(f32::total_cmp);
        let n = buf.len();
        if n % 2 == 1 {
            buf[n / 2]
        } else {
            // In f64 so that huge values cannot overflow and equal values stay exact.
            ((f64::from(buf[n / 2 - 1]) + f64::from(buf[n / 2])) * 0.5) as f32
        }
    })
}

pub(crate) fn trimmed_mean_unchecked(updates: &[Weights], beta: f64) -> Result<Weights> {
    let n = updates.len();
    let k = trim_count(n, beta);
    if n <= 2 * k {
        return Err(Error::NotEnoughUpdates {
            sort: "trimmedmean",
            needed: 2 * k + 1,
            got: n,
            why: format!("trimming {k} from each end with beta {beta}"),
        });
    }
    let refs: Vec<&Weights> = updates.iter().collect();
    Ok(by_coordinate(&refs, |buf| {
        buf.sort_unstable_by(f32::total_cmp);
        let kept = &buf[k..n - k];
        // Summed in sorted order, so the result does not depend on the input order.
        let sum: f64 = kept.iter().map(|&v| f64::from(v)).sum();
        (sum / kept.len() as f64) as f32
    }))
}

/// Number of values trimmed from each end: `floor(beta * n)`.
pub(crate) fn trim_count(n: usize, beta: f64) -> usize {
    (beta * n as f64).floor() as usize
}

pub(crate) fn krum_unchecked(updates: &[Weights], f: usize, m: usize) -> Result<KrumOutcome> {
    let n = updates.len();
    if n < 2 * f + 3 {
        return Err(Error::NotEnoughUpdates {
            sort: "krum",
            needed: 2 * f + 3,
            got: n,
            why: format!("krum with f={f} needs n >= 2f+3"),
        });
    }
    if m == 0 || m > n - f {
        return Err(Error::InvalidArgument {
            name: "m",
            reason: format!("multi-krum needs 1 <= m <= n - f = {}, got {m}", n - f),
        });
    }
    let pairs: Vec<(usize, usize)> = (0..n)
        .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
        .collect();
    let dists: Vec<f64> = pairs
        .par_iter()
        .map(|&(i, j)| {
            updates[i]
                .tensors()
                .iter()
                .zip(updates[j].tensors())
                .map(|(a, b)| kernels::squared_distance(a.data(), b.data()))
                .sum()
        })
        .collect();
    let mut matrix = vec![0.0f64; n * n];
    for (&(i, j), &d) in pairs.iter().zip(&dists) {
        matrix[i * n + j] = d;
        matrix[j * n + i] = d;
    }
    let neighbours = n - f - 2;
    let scores: Vec<f64> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n)
                .filter(|&j| j != i)
                .map(|j| matrix[i * n + j])
                .collect();
            row.sort_unstable_by(f64::total_cmp);
            row[..neighbours].iter().sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    // Ties go to the lower index, so the choice is deterministic.
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let selected: Vec<usize> = order[..m].to_vec();
    let aggregate = if m == 1 {
        updates[selected[0]].clone()
    } else {
        // Averaged per coordinate in f64 (in index order), exact for moderate counts.
        let mut by_index = selected.clone();
        by_index.sort_unstable();
        let chosen: Vec<&Weights> = by_index.iter().map(|&i| &updates[i]).collect();
        by_coordinate(&chosen, |buf| {
            let sum: f64 = buf.iter().map(|&v| f64::from(v)).sum();
            (sum / buf.len() as f64) as f32
        })
    };
    Ok(KrumOutcome {
        aggregate,
        selected,
        scores,
    })
}

/// Applies `rule` to the `n` values of every coordinate (in a scratch buffer it may reorder).
fn by_coordinate(updates: &[&Weights], rule: impl Fn(&mut [f32]) -> f32 + Sync) -> Weights {
    let n = updates.len();
    let mut res = updates[0].clone();
    for (t_idx, out) in res.tensors_mut().iter_mut().enumerate() {
        let columns: Vec<&[f32]> = updates.iter().map(|u| u.tensors()[t_idx].data()).collect();
        let fill = |start: usize, out: &mut [f32]| {
            let mut buf = vec![0.0f32; n];
            for (k, y) in out.iter_mut().enumerate() {
                let i = start + k;
                for (b, col) in buf.iter_mut().zip(&columns) {
                    *b = col[i];
                }
                *y = rule(&mut buf);
            }
        };
        let out = out.data_mut();
        // Each coordinate costs a small sort, so chunks are worth splitting much earlier than
        // in the memory-bound kernels.
        if out.len() * n >= PAR_THRESHOLD / 4 {
            out.par_chunks_mut(PAR_CHUNK / 16)
                .enumerate()
                .for_each(|(c, o)| fill(c * (PAR_CHUNK / 16), o));
        } else {
            fill(0, out);
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::tests::model;

    #[test]
    fn median_by_hand() {
        let ups = [
            model([1.0, 5.0, -1.0, 0.0, 9.0]),
            model([3.0, 4.0, -3.0, 0.0, 7.0]),
            model([2.0, 100.0, -2.0, 1.0, 8.0]),
        ];
        assert_eq!(
            coordinate_median(&ups).unwrap(),
            model([2.0, 5.0, -2.0, 0.0, 8.0])
        );
        // Even count: mean of the middle two.
        assert_eq!(
            coordinate_median(&ups[..2]).unwrap(),
            model([2.0, 4.5, -2.0, 0.0, 8.0])
        );
        assert_eq!(
            coordinate_median(&[]).unwrap_err(),
            Error::EmptyRound { sort: "median" }
        );
    }

    #[test]
    fn trimmed_mean_by_hand() {
        let ups = [
            model([1.0, 0.0, 0.0, 0.0, 0.0]),
            model([2.0, 0.0, 0.0, 0.0, 0.0]),
            model([3.0, 0.0, 0.0, 0.0, 0.0]),
            model([4.0, 0.0, 0.0, 0.0, 10.0]),
            model([1000.0, -50.0, 0.0, 0.0, 0.0]),
        ];
        // beta 0.2 of 5 trims one from each end: coordinate 0 keeps {2, 3, 4}.
        let got = trimmed_mean(&ups, 0.2).unwrap();
        assert_eq!(got, model([3.0, 0.0, 0.0, 0.0, 0.0]));
        // beta 0 is the plain mean.
        let got = trimmed_mean(&ups, 0.0).unwrap();
        assert_eq!(got, model([202.0, -10.0, 0.0, 0.0, 2.0]));
        // beta 0.4 of 2 updates trims 0; of 5 it trims 2 (keeps the median).
        assert_eq!(
            trimmed_mean(&ups, 0.4).unwrap(),
            model([3.0, 0.0, 0.0, 0.0, 0.0])
        );
        assert!(trimmed_mean(&ups, 0.5).is_err());
        assert!(trimmed_mean(&ups, -0.1).is_err());
    }

    #[test]
    fn krum_by_hand() {
        // Four points near the origin and one far away; f = 1, so each score sums the
        // n - f - 2 = 2 nearest squared distances.
        let ups = [
            model([0.0, 0.0, 0.0, 0.0, 0.0]),
            model([1.0, 0.0, 0.0, 0.0, 0.0]),
            model([0.0, 1.0, 0.0, 0.0, 0.0]),
            model([1.0, 1.0, 0.0, 0.0, 0.0]),
            model([10.0, 10.0, 0.0, 0.0, 0.0]),
        ];
        let out = krum(&ups, 1, 1).unwrap();
        // Scores: #0: 1+1, #1: 1+1, #2: 1+1, #3: 1+1, #4: 162+181.
        assert_eq!(out.scores, vec![2.0, 2.0, 2.0, 2.0, 343.0]);
        assert_eq!(out.selected, vec![0]);
        assert_eq!(out.aggregate, ups[0]);

        let out = krum(&ups, 1, 4).unwrap();
        assert_eq!(out.selected, vec![0, 1, 2, 3]);
        assert_eq!(out.aggregate, model([0.5, 0.5, 0.0, 0.0, 0.0]));

        assert!(matches!(
            krum(&ups[..4], 1, 1),
            Err(Error::NotEnoughUpdates { needed: 5, got: 4, .. })
        ));
        assert!(matches!(
            krum(&ups, 1, 5),
            Err(Error::InvalidArgument { name: "m", .. })
        ));
    }

    #[test]
    fn robust_rules_reject_bad_updates() {
        let ups = [model([1.0; 5]), model([1.0, 1.0, 1.0, f32::NAN, 1.0])];
        assert!(matches!(
            coordinate_median(&ups),
            Err(Error::NonFinite { index: 1, .. })
        ));
        let other = Weights::from_tensors(vec![crate::weights::Tensor::zeros("a", vec![2])]).unwrap();
        assert!(matches!(
            trimmed_mean(&[model([1.0; 5]), other], 0.0),
            Err(Error::TensorCount { .. })
        ));
    }
}
