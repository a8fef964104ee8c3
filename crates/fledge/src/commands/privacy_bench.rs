//! `fledge bench privacy`: MNIST with 10 trainers (IID shards, the same seeds) under each
//! privacy setting, in one process: plain FedAvg, secure aggregation (SecAgg+: threshold 6,
//! complete graph, 16 bits on [−1, 1], every trainer weighing 1, which is FedAvg's weighting
//! for equal IID shards), central DP at ε ∈ {1, 3, 8} and local DP at ε = 8 (δ = 1e-5
//! throughout). For each DP run the noise multiplier is the smallest that keeps
//! the job's ε within the target (bisection on the RDP accountant, every trainer in every round:
//! sampling rate 1); the table shows it, the ε the aggregator (central) or a trainer (local)
//! reported after the last round, the final global accuracy on the test set, and the mean round
//! time (the top aggregator's select + distribute + aggregate, rounds 2 on).

use std::path::Path;

use fledge_algorithms::privacy::RdpAccountant;
use fledge_models::MnistFactory;
use fledge_models::url::{DatasetUrl, Partition};
use fledge_sdk::runner::{JobPlan, RunOptions, simulate_with};

const TRAINERS: usize = 10;
const DELTA: f64 = 1e-5;
/// The L2 bound of one update's delta.
const CLIPPING_NORM: f64 = 1.0;

struct Setting {
    name: String,
    dp: Option<serde_json::Value>,
    secagg: Option<serde_json::Value>,
    noise: Option<f64>,
}

/// The SecAgg+ row's `secureAggregation`.
fn secagg_config() -> serde_json::Value {
    serde_json::json!({"threshold": 6, "quantizationBits": 16, "clippingRange": 1.0})
}

/// The smallest noise multiplier (to 0.1 %) with which `rounds` rounds of the subsampled
/// Gaussian at rate `q` stay within `epsilon` at `DELTA`.
fn noise_for(epsilon: f64, q: f64, rounds: u64) -> f64 {
    let eps = |z: f64| RdpAccountant::new().epsilon_after(q, z, rounds, DELTA);
    let (mut lo, mut hi): (f64, f64) = (0.05, 10_000.0);
    while hi / lo > 1.001 {
        let mid = (lo * hi).sqrt();
        if eps(mid) <= epsilon { hi = mid } else { lo = mid }
    }
    hi
}

/// Runs the table for `rounds` rounds of one epoch.
pub async fn run(data: &Path, rounds: u64) -> anyhow::Result<()> {
    let mut settings = vec![
        Setting { name: "plain FedAvg".to_owned(), dp: None, secagg: None, noise: None },
        Setting {
            name: "SecAgg+ (t = 6, 16 bits, c = 1)".to_owned(),
            dp: None,
            secagg: Some(secagg_config()),
            noise: None,
        },
    ];
    for epsilon in [1.0, 3.0, 8.0] {
        let z = noise_for(epsilon, 1.0, rounds);
        settings.push(Setting {
            name: format!("central DP, ε = {epsilon}"),
            dp: Some(serde_json::json!({"mode": "central", "noiseMultiplier": z,
                "clippingNorm": CLIPPING_NORM, "samplingRate": 1.0, "delta": DELTA,
                "epsilon": epsilon})),
            secagg: None,
            noise: Some(z),
        });
    }
    // Local DP is accounted per client with no amplification, at z / 2 per release.
    let z = 2.0 * noise_for(8.0, 1.0, rounds);
    settings.push(Setting {
        name: "local DP, ε = 8".to_owned(),
        dp: Some(serde_json::json!({"mode": "local", "noiseMultiplier": z,
            "clippingNorm": CLIPPING_NORM, "delta": DELTA, "epsilon": 8.0})),
        secagg: None,
        noise: Some(z),
    });

    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::ASCII_MARKDOWN);
    table.set_header([
        "run",
        "noise multiplier",
        "ε reported (δ = 1e-5)",
        "final global accuracy",
        "mean round time (s)",
    ]);
    for setting in settings {
        eprintln!("privacy: {} ({rounds} rounds, {TRAINERS} trainers) ...", setting.name);
        let mut plan = JobPlan::local(
            "bench-privacy",
            (0..TRAINERS)
                .map(|i| DatasetUrl::for_shard(data, i, TRAINERS, Partition::Iid, 0))
                .collect(),
        );
        plan.hyperparameters = serde_json::json!({"rounds": rounds, "epochs": 1,
            "minTrainers": TRAINERS, "evalDataset": format!("file://{}", data.display())})
        .as_object()
        .cloned()
        .expect("literal object");
        plan.differential_privacy = setting.dp.clone();
        plan.secure_aggregation = setting.secagg.clone();
        let dir = tempfile::tempdir()?;
        let opts = RunOptions { workdir: dir.path().to_path_buf(), ..RunOptions::default() };
        let report = simulate_with(&plan, MnistFactory::shared(), opts)
            .await
            .map_err(|e| anyhow::anyhow!(fledge_sdk::runner::error_chain(&e)))?;
        let history = &report.top.history;
        let last = history.last().ok_or_else(|| anyhow::anyhow!("no round recorded"))?;
        let accuracy = last.metrics.get("global.accuracy").copied();
        let epsilon = match setting.dp.as_ref().map(|d| d["mode"].as_str()) {
            Some(Some("central")) => last.metrics.get("dp.epsilon").copied(),
            Some(_) => report
                .others
                .values()
                .flatten()
                .filter_map(|run| run.history.last())
                .filter_map(|r| r.metrics.get("dp.epsilon").copied())
                .reduce(f64::max),
            None => None,
        };
        let times: Vec<f64> = history
            .iter()
            .skip(1)
            .map(|r| {
                ["select", "distribute", "aggregate"]
                    .iter()
                    .map(|k| r.metrics.get(&format!("seconds.{k}")).copied().unwrap_or(0.0))
                    .sum()
            })
            .collect();
        let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
        let show =
            |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
        table.add_row([
            setting.name,
            show(setting.noise, 3),
            show(epsilon, 3),
            show(accuracy, 4),
            format!("{mean:.3}"),
        ]);
    }
    println!("{table}");
    println!(
        "clipping norm {CLIPPING_NORM}, every trainer in every round (sampling rate 1); SecAgg+ \
         masks each trainer's delta from the round's model (complete graph, 32-bit ring)"
    );
    Ok(())
}
