//! Property tests of the aggregation rules: permutation invariance, identity on one input,
//! weight normalisation, agreement with an `f64` reference, and Krum's robustness.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use fledge_algorithms::robust::{coordinate_median, krum, trimmed_mean};
use fledge_algorithms::{Error, Optimizer, Tensor, Weights};
use proptest::prelude::*;
use serde_json::json;

/// Tensor lengths of a model with a fixed layout of 1 to 3 tensors.
fn layout() -> impl Strategy<Value = Vec<usize>> {
    prop::collection::vec(1usize..24, 1..4)
}

fn build(lens: &[usize], values: &[f32]) -> Weights {
    let mut offset = 0;
    let tensors = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let t = Tensor::new(format!("t{i}"), vec![len], values[offset..offset + len].to_vec())
                .expect("shape matches");
            offset += len;
            t
        })
        .collect();
    Weights::from_tensors(tensors).expect("unique names")
}

/// `n` models of one random layout, with values in [-100, 100].
fn models(n: std::ops::Range<usize>) -> impl Strategy<Value = Vec<Weights>> {
    (layout(), n).prop_flat_map(|(lens, n)| {
        let total: usize = lens.iter().sum();
        prop::collection::vec(prop::collection::vec(-100.0f32..100.0, total), n)
            .prop_map(move |vals| vals.iter().map(|v| build(&lens, v)).collect())
    })
}

fn fedavg(updates: &[Weights], samples: &[u64]) -> Result<Weights, Error> {
    let mut o = Optimizer::default();
    let mut global = updates[0].zeros_like();
    let mut r = o.begin_round(&global);
    for (u, &n) in updates.iter().zip(samples) {
        r.add(u, n, 0)?;
    }
    o.finish_round(r, &mut global)?;
    Ok(global)
}

fn flat(w: &Weights) -> Vec<f32> {
    w.tensors().iter().flat_map(|t| t.data().to_vec()).collect()
}

/// `a` agrees with the reference `b` within `tol` relative to each coordinate's `scale` (the
/// size of what was summed there): a mean of large values that cancel is only as exact as
/// `f32` arithmetic on those values, not as exact as the small result.
fn assert_close(a: &Weights, b: &[f64], scale: &[f64], tol: f64) -> Result<(), TestCaseError> {
    for ((x, y), s) in flat(a).iter().zip(b).zip(scale) {
        prop_assert!(
            (f64::from(*x) - y).abs() <= tol * y.abs().max(*s).max(1.0),
            "{x} vs {y} (scale {s})"
        );
    }
    Ok(())
}

/// Reverses and rotates, a permutation that moves every element for n ≥ 2.
fn permute<T: Clone>(v: &[T], rot: usize) -> Vec<T> {
    let mut p: Vec<T> = v.iter().rev().cloned().collect();
    let len = p.len();
    p.rotate_left(rot % len);
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn fedavg_matches_f64_reference_in_any_order(
        ups in models(1..8),
        seed in prop::collection::vec(1u64..10_000, 8),
        rot in 0usize..8,
    ) {
        let samples = &seed[..ups.len()];
        let total: f64 = samples.iter().map(|&n| n as f64).sum();
        let reference: Vec<f64> = (0..ups[0].num_params())
            .map(|i| {
                ups.iter().zip(samples)
                    .map(|(u, &n)| n as f64 * f64::from(flat(u)[i]))
                    .sum::<f64>() / total
            })
            .collect();
        // The weighted mean of the magnitudes: the size of the terms each coordinate sums.
        let scale: Vec<f64> = (0..ups[0].num_params())
            .map(|i| {
                ups.iter().zip(samples)
                    .map(|(u, &n)| n as f64 * f64::from(flat(u)[i]).abs())
                    .sum::<f64>() / total
            })
            .collect();
        let got = fedavg(&ups, samples).unwrap();
        assert_close(&got, &reference, &scale, 1e-5)?;
        let got = fedavg(&permute(&ups, rot), &permute(samples, rot)).unwrap();
        assert_close(&got, &reference, &scale, 1e-5)?;
    }

    #[test]
    fn one_update_is_returned_unchanged(ups in models(1..2), n in 1u64..1_000_000) {
        let u = &ups[0];
        prop_assert_eq!(&fedavg(&ups, &[n]).unwrap(), u);
        prop_assert_eq!(&coordinate_median(&ups).unwrap(), u);
        prop_assert_eq!(&trimmed_mean(&ups, 0.4).unwrap(), u);
    }

    #[test]
    fn identical_updates_average_to_themselves_whatever_the_counts(
        ups in models(1..2),
        samples in prop::collection::vec(0u64..1_000_000, 1..10),
    ) {
        prop_assume!(samples.iter().any(|&n| n > 0));
        let copies = vec![ups[0].clone(); samples.len()];
        prop_assert_eq!(&fedavg(&copies, &samples).unwrap(), &ups[0]);
        prop_assert_eq!(&coordinate_median(&copies).unwrap(), &ups[0]);
        prop_assert_eq!(&trimmed_mean(&copies, 0.2).unwrap(), &ups[0]);
    }

    #[test]
    fn zero_total_samples_is_an_error(ups in models(1..6)) {
        let zeros = vec![0; ups.len()];
        prop_assert_eq!(fedavg(&ups, &zeros).unwrap_err(), Error::ZeroTotalSamples { sort: "fedavg" });
    }

    #[test]
    fn median_and_trimmed_mean_ignore_order(ups in models(1..9), rot in 0usize..9, beta in 0.0f64..0.49) {
        let p = permute(&ups, rot);
        prop_assert_eq!(coordinate_median(&ups).unwrap(), coordinate_median(&p).unwrap());
        prop_assert_eq!(trimmed_mean(&ups, beta).unwrap(), trimmed_mean(&p, beta).unwrap());
    }

    #[test]
    fn median_lies_between_min_and_max(ups in models(1..9)) {
        let m = flat(&coordinate_median(&ups).unwrap());
        for (i, v) in m.iter().enumerate() {
            let col: Vec<f32> = ups.iter().map(|u| flat(u)[i]).collect();
            let lo = col.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = col.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            prop_assert!(lo <= *v && *v <= hi);
        }
    }

    #[test]
    fn krum_picks_an_honest_update_when_outliers_are_far(
        honest in models(5..9),
        f in 1usize..3,
        sign in prop::bool::ANY,
        rot in 0usize..12,
    ) {
        // Honest updates lie in [-100, 100]; the f Byzantine ones sit 10⁴ away.
        let far = if sign { 1e4f32 } else { -1e4 };
        let n_honest = honest.len();
        prop_assume!(n_honest + f >= 2 * f + 3);
        let mut all: Vec<(bool, Weights)> = honest.iter().cloned().map(|w| (true, w)).collect();
        for source in honest.iter().take(f) {
            let mut bad = source.clone();
            for t in bad.tensors_mut() {
                t.data_mut().iter_mut().for_each(|v| *v += far);
            }
            all.push((false, bad));
        }
        let all = permute(&all, rot);
        let updates: Vec<Weights> = all.iter().map(|(_, w)| w.clone()).collect();
        let out = krum(&updates, f, 1).unwrap();
        prop_assert!(all[out.selected[0]].0, "krum selected a Byzantine update");
        prop_assert_eq!(&out.aggregate, &updates[out.selected[0]]);
        let m = n_honest + f - f - 2;
        let out = krum(&updates, f, m.max(1)).unwrap();
        for i in &out.selected {
            prop_assert!(all[*i].0, "multi-krum selected a Byzantine update");
        }
    }
}

#[test]
fn facade_config_matches_the_brief_examples() {
    for cfg in [
        json!({"sort": "fedavg"}),
        json!({"sort": "fedadam", "kwargs": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}}),
        json!({"sort": "fedbuff", "kwargs": {"aggGoal": 3, "concurrency": 5}}),
        json!({"sort": "median"}),
        json!({"sort": "trimmedmean", "kwargs": {"beta": 0.1}}),
        json!({"sort": "krum", "kwargs": {"f": 1, "m": 1}}),
        json!({"sort": "fedprox", "kwargs": {"mu": 0.01}}),
        json!({"sort": "fedyogi"}),
        json!({"sort": "fedadagrad"}),
    ] {
        let o = Optimizer::from_config(&cfg).unwrap();
        assert_eq!(o.sort(), cfg["sort"].as_str().unwrap());
    }
}
