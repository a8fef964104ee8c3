//! The MNIST trainer inside the real roles over the local backend, on a subset of the real
//! data: two-tier and three-tier jobs reach a sensible accuracy.

use std::path::PathBuf;

use fledge_models::MnistFactory;
use fledge_models::url::{DatasetUrl, Partition};
use fledge_sdk::runner::{JobPlan, simulate};

fn data_dir() -> PathBuf {
    std::fs::canonicalize(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/data"))
        .expect("examples/data exists")
}

fn plan(job: &str, trainers: usize, middle: usize) -> JobPlan {
    let data = data_dir();
    // The first 2,000 training rows, split IID.
    let datasets = (0..trainers)
        .map(|i| {
            format!("{}&limit=2000", DatasetUrl::for_shard(&data, i, trainers, Partition::Iid, 0))
        })
        .collect();
    let mut plan = JobPlan::local(job, datasets);
    plan.middle = middle;
    plan.hyperparameters = serde_json::json!({
        "rounds": 3,
        "epochs": 3,
        "batchSize": 32,
        "learningRate": 0.1,
        "evalDataset": format!("file://{}", data.display()),
    })
    .as_object()
    .cloned()
    .expect("object");
    plan
}

fn final_accuracy(report: &fledge_sdk::runner::SimReport) -> f64 {
    report.top.history.last().expect("rounds ran").metrics["global.accuracy"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tier_mnist_subset_learns() {
    let dir = tempfile::tempdir().expect("tmp");
    let report = simulate(&plan("mnist-2", 4, 0), MnistFactory::shared(), dir.path().to_path_buf())
        .await
        .expect("job runs");
    let acc: Vec<f64> = report.top.history.iter().map(|r| r.metrics["global.accuracy"]).collect();
    assert!(final_accuracy(&report) > 0.85, "accuracy per round {acc:?}");
    assert!(acc[2] >= acc[0] - 0.02, "does not get worse: {acc:?}");
    assert!(report.others.values().all(Result::is_ok), "{:?}", report.others);
    assert_eq!(report.top.history[0].metrics["numSamples"], 2000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_tier_mnist_subset_learns() {
    let dir = tempfile::tempdir().expect("tmp");
    let report = simulate(&plan("mnist-3", 4, 2), MnistFactory::shared(), dir.path().to_path_buf())
        .await
        .expect("job runs");
    assert!(final_accuracy(&report) > 0.85, "{:?}", report.top.history.last());
    assert_eq!(report.others.len(), 6);
}

#[tokio::test]
async fn a_trainer_without_a_usable_dataset_fails_clearly() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut plan = plan("mnist-bad", 1, 0);
    plan.datasets = vec!["file:///nonexistent/dir?shard=0&shards=1".to_owned()];
    plan.hyperparameters.insert("joinTimeout".to_owned(), 5.into());
    let report = simulate(&plan, MnistFactory::shared(), dir.path().to_path_buf()).await;
    let err = report.expect_err("no trainer can start");
    assert!(err.to_string().contains("round 0") || err.to_string().contains("only 0"), "{err}");
}
