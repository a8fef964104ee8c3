//! Seeded splits of a training set into shards, one per trainer.
//!
//! - [`iid`]: shuffle, then deal rows round-robin: shards differ in size by at most one and
//!   have the data set's label mix.
//! - [`dirichlet`]: the usual non-IID benchmark split (Hsu et al. 2019, "Measuring the effects
//!   of non-identical data distribution"): for each class, shard proportions are drawn from
//!   Dirichlet(alpha, ..., alpha) and that class's rows are cut accordingly. Small alpha (0.1)
//!   gives shards dominated by one or two classes; large alpha approaches IID.
//!
//! Both are deterministic for a given seed, return disjoint shards that together cover every
//! row, and never return an empty shard (a trainer with no data could not train).

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Gamma};

use crate::{Error, Result};

fn check(n_rows: usize, shards: usize) -> Result<()> {
    if shards == 0 {
        return Err(Error::Partition("shards must be at least 1".to_owned()));
    }
    if n_rows < shards {
        return Err(Error::Partition(format!(
            "{n_rows} rows cannot fill {shards} non-empty shards"
        )));
    }
    Ok(())
}

/// Splits `0..n_rows` into `shards` IID shards (sorted row indices).
pub fn iid(n_rows: usize, shards: usize, seed: u64) -> Result<Vec<Vec<usize>>> {
    check(n_rows, shards)?;
    let mut rows: Vec<usize> = (0..n_rows).collect();
    rows.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut res = vec![Vec::with_capacity(n_rows / shards + 1); shards];
    for (i, row) in rows.into_iter().enumerate() {
        res[i % shards].push(row);
    }
    for shard in &mut res {
        shard.sort_unstable();
    }
    Ok(res)
}

/// Splits rows by a Dirichlet(`alpha`) label skew (sorted row indices per shard).
pub fn dirichlet(labels: &[u8], shards: usize, alpha: f64, seed: u64) -> Result<Vec<Vec<usize>>> {
    check(labels.len(), shards)?;
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(Error::Partition(format!("alpha must be a positive number, got {alpha}")));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let gamma =
        Gamma::new(alpha, 1.0).map_err(|e| Error::Partition(format!("alpha {alpha}: {e}")))?;
    let n_classes = labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
    let mut res: Vec<Vec<usize>> = vec![Vec::new(); shards];
    for class in 0..n_classes {
        let mut rows: Vec<usize> =
            (0..labels.len()).filter(|&i| labels[i] as usize == class).collect();
        if rows.is_empty() {
            continue;
        }
        rows.shuffle(&mut rng);
        // Dirichlet sample as normalised Gamma draws; a tiny floor keeps the sum positive
        // when alpha is very small and every draw underflows.
        let draws: Vec<f64> = (0..shards).map(|_| gamma.sample(&mut rng).max(1e-300)).collect();
        let total: f64 = draws.iter().sum();
        let mut start = 0usize;
        let mut acc = 0.0;
        for (shard, d) in draws.iter().enumerate() {
            acc += d / total;
            let end = if shard + 1 == shards {
                rows.len()
            } else {
                ((acc * rows.len() as f64).round() as usize).clamp(start, rows.len())
            };
            res[shard].extend_from_slice(&rows[start..end]);
            start = end;
        }
    }
    // No empty shard: move one row from the largest shard into each empty one.
    for i in 0..shards {
        if res[i].is_empty() {
            let largest = (0..shards).max_by_key(|&j| res[j].len()).expect("shards >= 1");
            let row = res[largest].pop().expect("n_rows >= shards leaves a non-empty shard");
            res[i].push(row);
        }
    }
    for shard in &mut res {
        shard.sort_unstable();
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn assert_partition(shards: &[Vec<usize>], n_rows: usize) {
        let mut all: Vec<usize> = shards.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n_rows).collect::<Vec<_>>(), "disjoint and covering");
        assert!(shards.iter().all(|s| !s.is_empty()), "no empty shard");
    }

    proptest! {
        #[test]
        fn iid_is_a_balanced_partition(n in 1usize..500, shards in 1usize..20, seed: u64) {
            prop_assume!(n >= shards);
            let res = iid(n, shards, seed).expect("valid request");
            assert_partition(&res, n);
            let sizes: Vec<usize> = res.iter().map(Vec::len).collect();
            prop_assert!(sizes.iter().max().expect("non-empty") - sizes.iter().min().expect("non-empty") <= 1);
            prop_assert_eq!(&res, &iid(n, shards, seed).expect("valid request"));
        }

        #[test]
        fn dirichlet_is_a_partition(
            labels in proptest::collection::vec(0u8..10, 20..400),
            shards in 1usize..12,
            alpha in 0.05f64..10.0,
            seed: u64,
        ) {
            prop_assume!(labels.len() >= shards);
            let res = dirichlet(&labels, shards, alpha, seed).expect("valid request");
            assert_partition(&res, labels.len());
            prop_assert_eq!(&res, &dirichlet(&labels, shards, alpha, seed).expect("valid request"));
        }
    }

    #[test]
    fn small_alpha_skews_labels_more_than_large_alpha() {
        let labels: Vec<u8> = (0..5000).map(|i| (i % 10) as u8).collect();
        // Mean over shards of the share of the shard's most common label.
        let skew = |alpha| {
            let res = dirichlet(&labels, 10, alpha, 7).expect("valid");
            res.iter()
                .map(|s| {
                    let mut c = [0usize; 10];
                    s.iter().for_each(|&i| c[labels[i] as usize] += 1);
                    *c.iter().max().expect("10 classes") as f64 / s.len() as f64
                })
                .sum::<f64>()
                / 10.0
        };
        let (skewed, flat) = (skew(0.1), skew(100.0));
        assert!(skewed > 0.5, "alpha 0.1 top-label share {skewed}");
        assert!(flat < 0.2, "alpha 100 top-label share {flat}");
    }

    #[test]
    fn bad_requests_are_errors() {
        assert!(iid(3, 0, 0).unwrap_err().to_string().contains("at least 1"));
        assert!(iid(3, 4, 0).unwrap_err().to_string().contains("3 rows"));
        assert!(dirichlet(&[0, 1], 2, 0.0, 0).unwrap_err().to_string().contains("alpha"));
        assert!(dirichlet(&[0, 1], 2, f64::NAN, 0).is_err());
    }
}
