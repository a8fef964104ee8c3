//! Secure aggregation through the real binaries (issue 18): `fledge standalone` and
//! `fledgectl run` of a copy of `examples/mnist` with `secureAggregation` in its model spec.
//! The job completes over MQTT with every trainer's update in the masked sum and a sensible
//! accuracy; a model spec that combines it with a robust rule is refused at creation, naming
//! the field.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use fledge_types::JobState;

use support::{Platform, example_with_rounds, records_of};

fn set_model_spec(dir: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("modelSpec.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut spec);
    std::fs::write(&path, serde_json::to_string_pretty(&spec).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn mnist_with_secure_aggregation_completes_through_the_platform() {
    let platform = Platform::start();
    let dir = example_with_rounds(&platform, "mnist", "mnist-secagg", 3);
    set_model_spec(&dir, |spec| {
        spec["secureAggregation"] =
            serde_json::json!({"threshold": 3, "quantizationBits": 16, "clippingRange": 1.0});
    });
    let outcome = platform.run_dir(&dir);
    assert!(outcome.success, "{}", outcome.output);
    let (job, _, records) = platform.job(&outcome.job).await;
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    let rounds = records_of(&records, "aggregator");
    assert_eq!(rounds.len(), 3);
    for r in &rounds {
        assert_eq!(r.metrics["secagg.survivors"], 4.0, "{:?}", r.metrics);
        assert_eq!(r.metrics["secagg.dropped.input"], 0.0);
        assert!(!r.metrics.keys().any(|k| k.starts_with("trainer.")), "{:?}", r.metrics);
    }
    let accuracy = rounds[2].metrics["global.accuracy"];
    assert!(accuracy > 0.8, "accuracy after 3 secure rounds: {accuracy}");

    // Three tiers: each middle aggregator masks within its group of two trainers.
    let dir = example_with_rounds(&platform, "hierarchical-mnist", "hier-secagg", 2);
    set_model_spec(&dir, |spec| {
        spec["secureAggregation"] =
            serde_json::json!({"threshold": 2, "quantizationBits": 16, "clippingRange": 1.0});
    });
    let outcome = platform.run_dir(&dir);
    assert!(outcome.success, "{}", outcome.output);
    let (job, _, records) = platform.job(&outcome.job).await;
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    let middles = records_of(&records, "middle-aggregator");
    assert_eq!(middles.len(), 4, "two groups, two rounds");
    assert!(middles.iter().all(|r| r.metrics["secagg.survivors"] == 2.0), "{middles:?}");
    let top = records_of(&records, "top-aggregator");
    assert_eq!(top.len(), 2);
    assert!(top.iter().all(|r| !r.metrics.contains_key("secagg.survivors")));

    // A robust rule cannot run on a masked sum: refused when the job is created.
    let dir = example_with_rounds(&platform, "mnist", "mnist-secagg-median", 1);
    set_model_spec(&dir, |spec| {
        spec["secureAggregation"] =
            serde_json::json!({"threshold": 3, "quantizationBits": 16, "clippingRange": 1.0});
        spec["optimizer"] = serde_json::json!({"sort": "median", "kwargs": {}});
    });
    // No job is created, so `fledgectl` is called directly.
    let out = platform.fledgectl().arg("run").arg(&dir).output().unwrap();
    let output =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{output}");
    assert!(
        output.contains("modelSpec.optimizer.sort: median needs each update in clear"),
        "{output}"
    );
}
