//! End-to-end test of vertical FL (issue 6, item 6): the `vertical-breast-cancer` example job
//! directory is submitted through the real platform (`fledge standalone` as a child process,
//! driven with the `fledgectl` binary built next to it). Two feature parties hold half of the
//! breast-cancer columns each and a label party holds the diagnoses; every file has its own
//! row order and a few ids the others lack. The job must complete, and the label party's test
//! accuracy, read back from the metric records through the REST API, must reach 0.93.

// Helpers outside #[test] functions too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fledge_types::JobState;

mod support;

use support::{Platform, records_of};

#[tokio::test(flavor = "multi_thread")]
async fn vertical_breast_cancer_completes_through_the_platform() {
    let platform = Platform::start();
    let job = platform.run("vertical-breast-cancer");
    let (job, tasks, records) = platform.job(&job).await;
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(tasks.len(), 3, "two feature parties and a label party: {tasks:?}");

    let spec: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            support::repo_root().join("examples/vertical-breast-cancer/modelSpec.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let rounds = spec["hyperparameters"]["rounds"].as_u64().unwrap();

    // The label party reports one record per round (an epoch over the aligned train rows).
    let label = records_of(&records, "label-party");
    assert_eq!(label.len() as u64, rounds, "{label:?}");
    let last = &label[label.len() - 1].metrics;
    let accuracy = last["accuracy"];
    assert!(accuracy >= 0.93, "vertical test accuracy {accuracy}");
    assert_eq!(last["featureParties"], 2.0);
    // 560 ids are held by all three files (each drops a few): 448 train, 112 test.
    assert_eq!((last["trainSamples"], last["testSamples"]), (448.0, 112.0));
    assert!(label[0].metrics["train_loss"] > last["train_loss"], "{label:?}");

    // Each feature party served every step of every round and sent embeddings, not data.
    let features = records_of(&records, "feature-party");
    assert_eq!(features.len() as u64, 2 * rounds, "{features:?}");
    for r in &features {
        assert_eq!(r.metrics["steps"], last["steps"]);
        assert_eq!(r.metrics["embeddedRows"], 448.0 + 112.0);
        assert!(r.metrics["bytesSent"] > 0.0);
    }
}
