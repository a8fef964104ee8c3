//! End-to-end tests of the three-tier asynchronous (FedBuff) and the coordinated hierarchical
//! topologies (issue 6, items 1 and 2): each example job directory is submitted through the
//! real platform (`fledge standalone` as a child process, driven with the `fledgectl` binary
//! built next to it) and must complete with a sensible accuracy, read back through the REST
//! API. The failure case (a middle aggregator that dies) runs in process in
//! `fledge_sdk::roles::coordinated`'s tests.

// Helpers outside #[test] functions too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fledge_types::{JobState, TaskState};

mod support;

use support::{Platform, records_of};

#[tokio::test(flavor = "multi_thread")]
async fn async_hierarchical_and_coordinated_hierarchical_complete_through_the_platform() {
    let platform = Platform::start();

    // Three asynchronous tiers: 8 top steps of 2 middle updates, each of 2 trainer updates.
    let started = std::time::Instant::now();
    let job = platform.run("async-hierarchical-mnist");
    let async_secs = started.elapsed().as_secs_f64();
    let (job, tasks, records) = platform.job(&job).await;
    assert_eq!(job.state, JobState::Completed);
    assert!(tasks.iter().all(|t| t.state == TaskState::Completed), "{tasks:?}");
    let steps = records_of(&records, "top-aggregator");
    assert_eq!(steps.len(), 8, "one record per server step: {steps:?}");
    assert!(steps.iter().all(|r| r.metrics["updates"] == 2.0), "{steps:?}");
    let async_accuracy = steps[7].metrics["trainer.accuracy"];
    assert!(async_accuracy > 0.8, "async hierarchical accuracy {async_accuracy}");
    // Both replicas of the middle aggregator sent updates up, each of 2 trainer updates.
    let middles = records_of(&records, "middle-aggregator");
    let senders: std::collections::BTreeSet<_> = middles.iter().map(|r| &r.task_id).collect();
    assert_eq!(senders.len(), 2, "{middles:?}");
    assert!(middles.iter().all(|r| r.metrics["updates"] == 2.0), "{middles:?}");
    assert!(middles.len() >= 16, "8 steps × 2 middle updates: {}", middles.len());

    // Coordinated: 5 synchronous rounds, both middle aggregators active in every one.
    let started = std::time::Instant::now();
    let job = platform.run("coordinated-hierarchical-mnist");
    let coordinated_secs = started.elapsed().as_secs_f64();
    let (job, tasks, records) = platform.job(&job).await;
    assert_eq!(job.state, JobState::Completed);
    assert!(tasks.iter().all(|t| t.state == TaskState::Completed), "{tasks:?}");
    let plans = records_of(&records, "coordinator");
    assert_eq!(plans.len(), 5, "{plans:?}");
    for p in &plans {
        assert_eq!(p.metrics["middleAggregatorsActive"], 2.0, "{p:?}");
        assert_eq!(p.metrics["trainersAlive"], 4.0, "{p:?}");
        assert_eq!(p.metrics["trainersReassigned"], 0.0, "sticky while nothing fails: {p:?}");
    }
    let rounds = records_of(&records, "top-aggregator");
    assert_eq!(rounds.len(), 5, "{rounds:?}");
    assert!(rounds.iter().all(|r| r.metrics["updates"] == 2.0), "{rounds:?}");
    let coordinated_accuracy = rounds[4].metrics["trainer.accuracy"];
    assert!(coordinated_accuracy > 0.8, "coordinated accuracy {coordinated_accuracy}");
    // Each trainer trained every round for the middle aggregator it was assigned.
    assert_eq!(records_of(&records, "trainer").len(), 4 * 5);

    eprintln!(
        "async-hierarchical-mnist: {} steps, accuracy {async_accuracy:.4}, {async_secs:.1} s; \
         coordinated-hierarchical-mnist: {} rounds, accuracy {coordinated_accuracy:.4}, {coordinated_secs:.1} s",
        steps.len(),
        rounds.len()
    );
}
