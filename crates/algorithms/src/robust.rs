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
use crate::kernels::{self, PAR_THRESHOLD};
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
    let n = updates.len();
    by_sorted_block(&refs, |sorted, width, out| {
        if n % 2 == 1 {
            out.copy_from_slice(&sorted[(n / 2) * width..(n / 2 + 1) * width]);
        } else {
            let lo = &sorted[(n / 2 - 1) * width..(n / 2) * width];
            let hi = &sorted[(n / 2) * width..(n / 2 + 1) * width];
            for ((o, a), b) in out.iter_mut().zip(lo).zip(hi) {
                // In f64 so that huge values cannot overflow and equal values stay exact.
                *o = ((f64::from(*a) + f64::from(*b)) * 0.5) as f32;
            }
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
    let kept = (n - 2 * k) as f64;
    Ok(by_sorted_block(&refs, |sorted, width, out| {
        // Summed in sorted order, so the result does not depend on the input order.
        for (l, o) in out.iter_mut().enumerate() {
            let sum: f64 = (k..n - k).map(|r| f64::from(sorted[r * width + l])).sum();
            *o = (sum / kept) as f32;
        }
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
    let pairs: Vec<(usize, usize)> = (0..n).flat_map(|i| (i + 1..n).map(move |j| (i, j))).collect();
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
            let mut row: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| matrix[i * n + j]).collect();
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
        let rows = chosen.len();
        by_block(&chosen, false, |block, width, out| {
            for (l, o) in out.iter_mut().enumerate() {
                let sum: f64 = (0..rows).map(|r| f64::from(block[r * width + l])).sum();
                *o = (sum / rows as f64) as f32;
            }
        })
    };
    Ok(KrumOutcome { aggregate, selected, scores })
}

/// Coordinates per block: the block of `n` rows (`n × BLOCK` values) stays in L1/L2 while
/// it is sorted, and each row is long enough for SIMD.
const BLOCK: usize = 256;

/// Up to this many updates, columns are sorted with a branch-free sorting network that
/// works on whole rows (SIMD across coordinates, `n²/2` compare-exchanges); above it, each
/// column is sorted on its own (`n log n`, but branchy and scalar).
const NETWORK_MAX: usize = 32;

/// Calls `reduce(sorted, width, out)` on blocks of coordinates where `sorted` holds, row
/// after row, the `n` values of each of the `width` coordinates in ascending order.
fn by_sorted_block(
    updates: &[&Weights],
    reduce: impl Fn(&[f32], usize, &mut [f32]) + Sync,
) -> Weights {
    by_block(updates, true, reduce)
}

/// Gathers blocks of `width ≤ BLOCK` coordinates from every update into `n` rows (row `r` =
/// update `r`), optionally sorts every column, and lets `reduce` write the block's output.
fn by_block(
    updates: &[&Weights],
    sort: bool,
    reduce: impl Fn(&[f32], usize, &mut [f32]) + Sync,
) -> Weights {
    let n = updates.len();
    let mut res = updates[0].clone();
    for (t_idx, out) in res.tensors_mut().iter_mut().enumerate() {
        let sources: Vec<&[f32]> = updates.iter().map(|u| u.tensors()[t_idx].data()).collect();
        let run = |start: usize, out: &mut [f32]| {
            let mut rows = vec![0.0f32; n * BLOCK];
            let mut column = vec![0.0f32; n];
            for (b, out) in out.chunks_mut(BLOCK).enumerate() {
                let width = out.len();
                let first = start + b * BLOCK;
                let rows = &mut rows[..n * width];
                for (row, src) in rows.chunks_exact_mut(width).zip(&sources) {
                    row.copy_from_slice(&src[first..first + width]);
                }
                if sort {
                    sort_columns(rows, n, width, &mut column);
                }
                reduce(rows, width, out);
            }
        };
        let out = out.data_mut();
        // Each coordinate costs a small sort, so splitting pays much earlier than in the
        // memory-bound kernels.
        const TASK: usize = 16 * BLOCK;
        if out.len() * n >= PAR_THRESHOLD / 4 && out.len() > TASK {
            out.par_chunks_mut(TASK).enumerate().for_each(|(c, o)| run(c * TASK, o));
        } else {
            run(0, out);
        }
    }
    res
}

/// Sorts each of the `width` columns of `rows` (`n` rows of `width`) in place.
fn sort_columns(rows: &mut [f32], n: usize, width: usize, column: &mut [f32]) {
    if n <= NETWORK_MAX {
        // Odd-even transposition sort: n rounds of compare-exchange between neighbouring
        // rows, with no data-dependent branches. Fixed 8-lane groups written through small
        // arrays are what LLVM turns into packed min/max (3x faster than a plain zip loop).
        for round in 0..n {
            let mut i = round % 2;
            while i + 1 < n {
                let (lo, hi) = rows[i * width..(i + 2) * width].split_at_mut(width);
                let mut lo8 = lo.chunks_exact_mut(8);
                let mut hi8 = hi.chunks_exact_mut(8);
                for (a, b) in (&mut lo8).zip(&mut hi8) {
                    let mut mn = [0.0f32; 8];
                    let mut mx = [0.0f32; 8];
                    for k in 0..8 {
                        let (x, y) = (a[k], b[k]);
                        let lt = x < y;
                        mn[k] = if lt { x } else { y };
                        mx[k] = if lt { y } else { x };
                    }
                    a.copy_from_slice(&mn);
                    b.copy_from_slice(&mx);
                }
                for (a, b) in lo8.into_remainder().iter_mut().zip(hi8.into_remainder()) {
                    let (x, y) = (*a, *b);
                    *a = if x < y { x } else { y };
                    *b = if x < y { y } else { x };
                }
                i += 2;
            }
        }
    } else {
        for l in 0..width {
            for (r, c) in column.iter_mut().enumerate() {
                *c = rows[r * width + l];
            }
            column.sort_unstable_by(f32::total_cmp);
            for (r, c) in column.iter().enumerate() {
                rows[r * width + l] = *c;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
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
        assert_eq!(coordinate_median(&ups).unwrap(), model([2.0, 5.0, -2.0, 0.0, 8.0]));
        // Even count: mean of the middle two.
        assert_eq!(coordinate_median(&ups[..2]).unwrap(), model([2.0, 4.5, -2.0, 0.0, 8.0]));
        assert_eq!(coordinate_median(&[]).unwrap_err(), Error::EmptyRound { sort: "median" });
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
        assert_eq!(trimmed_mean(&ups, 0.4).unwrap(), model([3.0, 0.0, 0.0, 0.0, 0.0]));
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
        assert!(matches!(krum(&ups, 1, 5), Err(Error::InvalidArgument { name: "m", .. })));
    }

    #[test]
    fn blocked_sorting_matches_a_naive_reference() {
        // Both column-sort paths (network and fallback), several blocks and a ragged tail,
        // and a tensor big enough to go parallel.
        for (n, len) in [(1, 5), (3, 300), (10, 1000), (33, 300), (40, 70), (4, PAR_THRESHOLD / 8)]
        {
            let ups: Vec<Weights> = (0..n)
                .map(|j| {
                    let data = (0..len)
                        .map(|i| ((i * 7919 + j * 104_729) % 1013) as f32 - 500.0)
                        .collect();
                    Weights::from_tensors(vec![
                        crate::weights::Tensor::new("w", vec![len], data).unwrap(),
                    ])
                    .unwrap()
                })
                .collect();
            let median = coordinate_median(&ups).unwrap();
            let trimmed = trimmed_mean(&ups, 0.25).unwrap();
            let k = trim_count(n, 0.25);
            for i in 0..len {
                let mut col: Vec<f32> = ups.iter().map(|u| u.tensors()[0].data()[i]).collect();
                col.sort_by(f32::total_cmp);
                let want = if n % 2 == 1 {
                    col[n / 2]
                } else {
                    ((f64::from(col[n / 2 - 1]) + f64::from(col[n / 2])) / 2.0) as f32
                };
                assert_eq!(median.tensors()[0].data()[i], want, "median n={n} i={i}");
                let kept = &col[k..n - k];
                let want =
                    (kept.iter().map(|&v| f64::from(v)).sum::<f64>() / kept.len() as f64) as f32;
                assert_eq!(trimmed.tensors()[0].data()[i], want, "trimmed n={n} i={i}");
            }
        }
    }

    #[test]
    fn robust_rules_reject_bad_updates() {
        let ups = [model([1.0; 5]), model([1.0, 1.0, 1.0, f32::NAN, 1.0])];
        assert!(matches!(coordinate_median(&ups), Err(Error::NonFinite { index: 1, .. })));
        let other =
            Weights::from_tensors(vec![crate::weights::Tensor::zeros("a", vec![2])]).unwrap();
        assert!(matches!(
            trimmed_mean(&[model([1.0; 5]), other], 0.0),
            Err(Error::TensorCount { .. })
        ));
    }
}
