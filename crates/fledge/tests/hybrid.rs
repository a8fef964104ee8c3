//! End-to-end test of the hybrid topology (issue 6, item 4): `examples/hybrid-mnist` submitted
//! through the real platform (`fledge standalone` as a child process, `fledgectl run`).
//! Trainers ring all-reduce inside their group over the `p2p` backend (endpoints found through
//! the standalone's metaserver) and do FedAvg with the aggregator over `mqtt`.

// Helpers outside #[test] functions too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fledge_types::JobState;

mod support;

use support::{Platform, records_of};

#[tokio::test(flavor = "multi_thread")]
async fn hybrid_groups_all_reduce_over_p2p_and_aggregate_over_mqtt() {
    let platform = Platform::start();
    let job = platform.run("hybrid-mnist");
    let (job, tasks, records) = platform.job(&job).await;
    assert_eq!(job.state, JobState::Completed);
    assert_eq!(tasks.len(), 5, "4 trainers and 1 aggregator: {tasks:?}");

    let rounds = records_of(&records, "trainer");
    assert_eq!(rounds.len(), 4 * 5, "4 trainers × 5 rounds: {rounds:?}");
    // Each group of two all-reduced every round: the ring saw both members.
    assert!(rounds.iter().all(|r| r.metrics["members"] == 2.0), "{rounds:?}");
    // After the all-reduce both members of a group hold the same model, so they evaluate alike;
    // the group's sample count is the sum of its members' (the reduced weight).
    for round in 1..=5 {
        let of_round: Vec<_> = rounds.iter().filter(|r| r.round == round).collect();
        assert_eq!(of_round.len(), 4, "round {round}: {of_round:?}");
        let mut accuracies: Vec<f64> = of_round.iter().map(|r| r.metrics["accuracy"]).collect();
        accuracies.sort_by(f64::total_cmp);
        assert!((accuracies[0] - accuracies[1]).abs() < 1e-9, "round {round}: {accuracies:?}");
        assert!((accuracies[2] - accuracies[3]).abs() < 1e-9, "round {round}: {accuracies:?}");
        for r in &of_round {
            assert_eq!(r.metrics["numSamples"], 2.0 * r.metrics["localSamples"], "{r:?}");
        }
    }
    let aggregator = records_of(&records, "aggregator");
    assert_eq!(aggregator.len(), 5, "one record per round: {aggregator:?}");
    let last = &aggregator[4].metrics;
    let accuracy = last["global.accuracy"];
    assert!(accuracy > 0.8, "hybrid accuracy {accuracy}");
}
