//! Differential privacy wrappers: config validation, clipping, noise of the documented size,
//! adaptive clipping moving towards its quantile, the budget refusing the round that would
//! exceed it, and local DP accounting.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use fledge_algorithms::privacy::dp::{self, DpConfig, DpError, DpMode};
use fledge_algorithms::privacy::{CentralDp, LocalDp, RdpAccountant};
use fledge_algorithms::{Tensor, Weights};
use serde_json::json;

fn model(values: Vec<f32>) -> Weights {
    let n = values.len();
    Weights::from_tensors(vec![Tensor::new("w", vec![n], values).unwrap()]).unwrap()
}

fn central(extra: serde_json::Value) -> DpConfig {
    let mut v = json!({
        "mode": "central", "noiseMultiplier": 1.0, "clippingNorm": 1.0,
        "clientsPerRound": 10, "totalClients": 100, "delta": 1e-5
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    DpConfig::from_json(&v).unwrap()
}

#[test]
fn config_errors_name_the_field() {
    let cases = [
        (
            json!({"noiseMultiplier": 1, "clippingNorm": 1, "delta": 1e-5}),
            "differentialPrivacy.mode: is required",
        ),
        (
            json!({"mode": "global", "noiseMultiplier": 1, "clippingNorm": 1, "delta": 1e-5}),
            "differentialPrivacy.mode",
        ),
        (
            json!({"mode": "local", "noiseMultiplier": 0, "clippingNorm": 1, "delta": 1e-5}),
            "differentialPrivacy.noiseMultiplier",
        ),
        (
            json!({"mode": "local", "noiseMultiplier": 1, "clippingNorm": -2, "delta": 1e-5}),
            "differentialPrivacy.clippingNorm",
        ),
        (
            json!({"mode": "local", "noiseMultiplier": 1, "clippingNorm": 1}),
            "differentialPrivacy.delta: is required",
        ),
        (
            json!({"mode": "local", "noiseMultiplier": 1, "clippingNorm": 1, "delta": 1.5}),
            "differentialPrivacy.delta",
        ),
        (
            json!({"mode": "local", "noiseMultiplier": 1, "clippingNorm": 1, "delta": 1e-5, "epsilon": 0}),
            "differentialPrivacy.epsilon",
        ),
        (
            json!({"mode": "local", "noiseMultiplier": 1, "clippingNorm": 1, "delta": 1e-5, "samplingRate": 0.1}),
            "differentialPrivacy.samplingRate: applies to central mode only",
        ),
        (
            json!({"mode": "central", "noiseMultiplier": 1, "clippingNorm": 1, "delta": 1e-5}),
            "differentialPrivacy.samplingRate: central mode needs",
        ),
        (
            json!({"mode": "central", "noiseMultiplier": 1, "clippingNorm": 1, "delta": 1e-5, "clientsPerRound": 10}),
            "differentialPrivacy.totalClients",
        ),
        (
            json!({"mode": "central", "noiseMultiplier": 1, "clippingNorm": 1, "delta": 1e-5, "clientsPerRound": 10, "totalClients": 5}),
            "differentialPrivacy.totalClients: must be at least",
        ),
        (
            json!({"mode": "central", "noiseMultiplier": 1, "clippingNorm": 1, "delta": 1e-5, "samplingRate": 0}),
            "differentialPrivacy.samplingRate",
        ),
        (
            json!({"mode": "central", "noiseMultiplier": 1, "clippingNorm": 1, "delta": 1e-5, "samplingRate": 0.1, "adaptiveClipping": true}),
            "differentialPrivacy.adaptiveClipping.clippedCountStddev: is required",
        ),
        (
            json!({"mode": "central", "noiseMultiplier": 2, "clippingNorm": 1, "delta": 1e-5, "clientsPerRound": 10, "totalClients": 100, "adaptiveClipping": true}),
            "must exceed noiseMultiplier / 2",
        ),
        (
            json!({"mode": "central", "noiseMultiplier": 1, "clippingNorm": 1, "delta": 1e-5, "samplingRate": 0.1, "adaptiveClipping": {"targetQuantile": 1.5, "clippedCountStddev": 5}}),
            "differentialPrivacy.adaptiveClipping.targetQuantile",
        ),
        (
            json!({"mode": "central", "noiseMultiplier": 1, "clippingNorm": 1, "delta": 1e-5, "samplingRate": 0.1, "noise": 3}),
            "differentialPrivacy.noise: unknown field",
        ),
    ];
    for (value, expected) in cases {
        let err = DpConfig::from_json(&value).unwrap_err().to_string();
        assert!(err.contains(expected), "{value}: {err}");
    }
    let c = central(json!({"adaptiveClipping": {"clippedCountStddev": 2.0}, "epsilon": 8}));
    assert_eq!(c.mode, DpMode::Central);
    assert_eq!(c.sampling_rate, 0.1);
    assert_eq!(c.epsilon_budget, Some(8.0));
    let a = c.adaptive_clipping.unwrap();
    assert_eq!((a.target_quantile, a.learning_rate, a.clipped_count_stddev), (0.5, 0.2, 2.0));
    // z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) = (1 − 1/16)^(−1/2).
    assert!((c.update_noise_multiplier() - (1.0f64 - 1.0 / 16.0).powf(-0.5)).abs() < 1e-12);
}

#[test]
fn central_dp_clips_each_update_and_adds_noise_of_the_stated_size() {
    let cfg = central(json!({"noiseMultiplier": 0.5, "clippingNorm": 2.0}));
    let mut dp = CentralDp::with_seed(cfg.clone(), 1).unwrap();
    let params = 200_000;
    let global = model(vec![0.0; params]);
    let mut round = dp.begin_round(&global).unwrap();
    // Ten updates: five far outside the norm (clipped to 2), five inside (kept).
    let big = model(vec![0.1; params]); // norm ≈ 44.7
    let small = model((0..params).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect());
    for _ in 0..5 {
        assert!(round.add(&big).unwrap() > 44.0);
        assert_eq!(round.add(&small).unwrap(), 1.0);
    }
    let bad = model(vec![f32::NAN; params]);
    assert!(round.add(&bad).is_err());
    assert_eq!(round.updates(), 10);
    let (mean, report) = dp.finish_round(round).unwrap();
    assert_eq!(report.updates, 10);
    assert_eq!(report.clipped_fraction, 0.5);
    assert_eq!(report.noise_stddev, 0.5 * 2.0);
    // Expected mean without noise: (5·clip(big) + 5·small)/10; clip(big) = 0.1·2/‖big‖.
    let big_norm = (params as f64 * 0.01f64).sqrt();
    let clipped = 0.1 * 2.0 / big_norm;
    let expected = |i: usize| (5.0 * clipped + if i == 0 { 5.0 } else { 0.0 }) / 10.0;
    let residual: Vec<f64> = mean.tensors()[0]
        .data()
        .iter()
        .enumerate()
        .map(|(i, v)| f64::from(*v) - expected(i))
        .collect();
    let m = residual.iter().sum::<f64>() / params as f64;
    let sd = (residual.iter().map(|r| (r - m).powi(2)).sum::<f64>() / params as f64).sqrt();
    // Noise on the mean: z·C/m = 0.1; over 200k samples the sample sd is within 1% of it.
    assert!((sd - 0.1).abs() < 0.001, "noise sd {sd}");
    assert!(m.abs() < 0.001, "noise mean {m}");
    // The round was accounted exactly as the accountant says.
    let mut acc = RdpAccountant::new();
    acc.compose_poisson_gaussian(0.1, 0.5, 1);
    assert_eq!(report.epsilon, acc.epsilon(1e-5).0);
    assert_eq!(dp.epsilon(), report.epsilon);
}

#[test]
fn os_seeded_noise_differs_between_instances() {
    let cfg = central(json!({}));
    let global = model(vec![0.0; 64]);
    let mut outs = Vec::new();
    for _ in 0..2 {
        let mut dp = CentralDp::new(cfg.clone()).unwrap();
        let mut r = dp.begin_round(&global).unwrap();
        r.add(&global).unwrap();
        outs.push(dp.finish_round(r).unwrap().0);
    }
    assert_ne!(outs[0], outs[1]);
}

#[test]
fn the_budget_refuses_the_round_that_would_exceed_it() {
    let cfg = central(
        json!({"noiseMultiplier": 1.0, "samplingRate": 0.5, "clientsPerRound": null, "totalClients": null, "epsilon": 3.0}),
    );
    let mut dp = CentralDp::with_seed(cfg.clone(), 2).unwrap();
    let global = model(vec![0.0; 4]);
    let mut last = 0.0;
    let mut rounds = 0;
    let err = loop {
        let mut r = match dp.begin_round(&global) {
            Ok(r) => r,
            Err(e) => break e,
        };
        r.add(&model(vec![0.1; 4])).unwrap();
        let (_, report) = dp.finish_round(r).unwrap();
        assert!(report.epsilon > last && report.epsilon <= 3.0);
        last = report.epsilon;
        rounds += 1;
        assert!(rounds < 10_000);
    };
    match &err {
        DpError::BudgetExceeded { round, spent, would_be, budget, .. } => {
            assert_eq!(*round, rounds + 1);
            assert_eq!(*spent, last);
            assert!(*would_be > 3.0 && *budget == 3.0);
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("above the budget ε = 3"), "{err}");
    // The same limit, computed up front for a planned job.
    assert!(dp::check_job_budget(&cfg, rounds).is_ok());
    match dp::check_job_budget(&cfg, rounds + 5) {
        Err(DpError::JobExceedsBudget { fits, .. }) => assert_eq!(fits, rounds),
        other => panic!("{other:?}"),
    }
}

#[test]
fn adaptive_clipping_moves_the_norm_towards_the_target_quantile() {
    // Updates of norm 0.1 under an initial norm of 1: all unclipped, the norm shrinks
    // geometrically until about half are clipped.
    let cfg =
        central(json!({"adaptiveClipping": {"clippedCountStddev": 1.0, "learningRate": 0.3}}));
    let mut dp = CentralDp::with_seed(cfg, 3).unwrap();
    let global = model(vec![0.0; 8]);
    let norms: Vec<f32> = (0..100).map(|i| 0.05 + 0.001 * i as f32).collect(); // 0.05..0.15
    for _ in 0..60 {
        let mut r = dp.begin_round(&global).unwrap();
        for n in &norms {
            let mut v = vec![0.0; 8];
            v[0] = *n;
            r.add(&model(v)).unwrap();
        }
        dp.finish_round(r).unwrap();
    }
    let c = dp.clipping_norm();
    assert!((0.08..0.13).contains(&c), "norm {c}, the median update norm is 0.1");
}

#[test]
fn local_dp_clips_noises_and_accounts_each_release() {
    let cfg = DpConfig::from_json(&json!({
        "mode": "local", "noiseMultiplier": 4.0, "clippingNorm": 1.0, "delta": 1e-5, "epsilon": 20
    }))
    .unwrap();
    assert!(CentralDp::new(cfg.clone()).is_err(), "a local config is not a central one");
    let mut dp = LocalDp::with_seed(cfg, 4).unwrap();
    let params = 100_000;
    let mut update = model(vec![1.0; params]); // norm ≈ 316: clipped to 1
    let report = dp.privatize(&mut update).unwrap();
    assert_eq!(report.clipped_fraction, 1.0);
    assert_eq!(report.noise_stddev, 4.0);
    let data = update.tensors()[0].data();
    let clipped = 1.0 / (params as f64).sqrt();
    let sd = (data.iter().map(|v| (f64::from(*v) - clipped).powi(2)).sum::<f64>() / params as f64)
        .sqrt();
    assert!((sd - 4.0).abs() < 0.05, "noise sd {sd}");
    // Sensitivity 2C with q = 1: the accountant's Gaussian mechanism at z/2.
    let mut acc = RdpAccountant::new();
    acc.compose_poisson_gaussian(1.0, 2.0, 1);
    assert_eq!(report.epsilon, acc.epsilon(1e-5).0);
    let mut n = 1;
    while dp.privatize(&mut model(vec![0.0; 4])).is_ok() {
        n += 1;
        assert!(n < 1000);
    }
    assert!(dp.epsilon() <= 20.0);
    let before = model(vec![0.5; 4]);
    let mut after = before.clone();
    assert!(matches!(dp.privatize(&mut after), Err(DpError::BudgetExceeded { .. })));
    assert_eq!(after, before, "a refused release leaves the update untouched");
}

#[test]
fn model_spec_sections_are_read_together_and_central_dp_with_secagg_is_refused() {
    use fledge_algorithms::privacy::PrivacyConfig;
    let none = PrivacyConfig::from_model_spec(&json!({"optimizer": {"sort": "fedavg"}})).unwrap();
    assert_eq!(none, PrivacyConfig::default());
    let secagg = json!({"threshold": 3, "quantizationBits": 16, "clippingRange": 1.0});
    let local = json!({"mode": "local", "noiseMultiplier": 1, "clippingNorm": 1, "delta": 1e-5});
    let both = PrivacyConfig::from_model_spec(&json!({
        "secureAggregation": secagg, "differentialPrivacy": local, "differentialPrivacy2": null
    }))
    .unwrap();
    assert!(both.secure_aggregation.is_some() && both.differential_privacy.is_some());
    let central = json!({"mode": "central", "noiseMultiplier": 1, "clippingNorm": 1, "delta": 1e-5, "samplingRate": 0.1});
    let err = PrivacyConfig::from_model_spec(
        &json!({"secureAggregation": secagg, "differentialPrivacy": central}),
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("differentialPrivacy.mode:"), "{err}");
    let err = PrivacyConfig::from_model_spec(&json!({"secureAggregation": {"threshold": 3}}))
        .unwrap_err();
    assert_eq!(err.field, "secureAggregation.quantizationBits");
}
