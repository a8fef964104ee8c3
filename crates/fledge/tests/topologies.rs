//! End-to-end tests of the topologies beyond two tiers (issue 6): each example job directory
//! is submitted through the real platform (`fledge standalone` as a child process, driven
//! with the `fledgectl` binary built next to it) and must complete with a sensible accuracy,
//! read back through the REST API. Plus an in-process comparison of asynchronous (FedBuff)
//! and synchronous (FedAvg) aggregation with one trainer 5× slower, which prints the wall
//! time each takes to reach a target test accuracy (printed, not asserted: the machine is
//! shared and noisy).

// Helpers outside #[test] functions too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use fledge_channel::{BackendEnv, LocalHub};
use fledge_models::MnistFactory;
use fledge_models::url::{DatasetUrl, Partition};
use fledge_sdk::AppFactory;
use fledge_sdk::roles::RoleKind;
use fledge_sdk::roles::fedbuff::{self, StragglerFactory};
use fledge_sdk::runner::{JobPlan, RunOptions, RunSummary, run_task_with};
use fledge_types::{JobState, MetricRecord, Sort};
use serde_json::json;

mod support;

use support::{Platform, records_of as last_of, repo_root};

#[tokio::test(flavor = "multi_thread")]
async fn async_two_tier_and_distributed_ring_complete_through_the_platform() {
    let platform = Platform::start();

    // FedBuff: 16 server steps of 2 updates, trainer 3 five times slower.
    let job = platform.run("async-two-tier");
    let (job, _, records) = platform.job(&job).await;
    assert_eq!(job.state, JobState::Completed);
    let steps = last_of(&records, "aggregator");
    assert_eq!(steps.len(), 16, "one record per server step: {steps:?}");
    let last = &steps[15];
    assert_eq!(last.metrics["updates"], 2.0);
    assert_eq!(last.metrics["modelVersion"], 16.0);
    let accuracy = last.metrics["global.accuracy"];
    assert!(accuracy > 0.8, "async accuracy {accuracy}");
    // Updates arrive against older models: staleness is measured and weighted.
    assert!(steps.iter().any(|r| r.metrics["staleness.max"] >= 1.0), "{steps:?}");

    // Ring all-reduce: 3 trainers, 8 rounds, every trainer holds the same averaged model.
    let job = platform.run("distributed-ring");
    let (job, _, records) = platform.job(&job).await;
    assert_eq!(job.state, JobState::Completed);
    let rounds = last_of(&records, "trainer");
    assert_eq!(rounds.len(), 3 * 8, "3 trainers × 8 rounds: {rounds:?}");
    let finals: Vec<f64> =
        rounds.iter().filter(|r| r.round == 8).map(|r| r.metrics["accuracy"]).collect();
    assert_eq!(finals.len(), 3);
    assert!(finals.iter().all(|a| *a > 0.85), "ring accuracies {finals:?}");
    // All members evaluate the same weights on the same test set after the all-reduce.
    assert!(finals.iter().all(|a| (a - finals[0]).abs() < 1e-9), "{finals:?}");
    assert!(rounds.iter().all(|r| r.metrics["members"] == 3.0));
}

/// Seconds from `start` to the first record with `accuracy` ≥ `target`.
fn time_to(
    records: &[MetricRecord],
    start: chrono::DateTime<chrono::Utc>,
    target: f64,
) -> Option<f64> {
    records
        .iter()
        .filter(|r| r.metrics.get("global.accuracy").is_some_and(|a| *a >= target))
        .filter_map(|r| r.timestamp)
        .map(|t| (t - start).num_milliseconds() as f64 / 1000.0)
        .reduce(f64::min)
}

/// Runs one job of 4 trainers (trainer 3 five times slower) in this process over the local
/// backend: the FedBuff aggregator when `optimizer` is fedbuff, else the synchronous one.
async fn run_in_process(
    optimizer: Sort,
    rounds: u64,
    workdir: &Path,
) -> (RunSummary, chrono::DateTime<chrono::Utc>) {
    let data = repo_root().join("examples/data").canonicalize().unwrap();
    let datasets = (0..4).map(|i| DatasetUrl::for_shard(&data, i, 4, Partition::Iid, 0)).collect();
    let is_async = optimizer.sort == "fedbuff";
    let mut plan = JobPlan::local(&format!("cmp-{}", optimizer.sort), datasets);
    plan.optimizer = optimizer;
    plan.registry_uri = workdir.join("registry").display().to_string();
    plan.hyperparameters = json!({
        "rounds": rounds, "epochs": 1, "batchSize": 32, "learningRate": 0.1,
        "expectedTrainers": 4, "minTrainers": 4,
        "slowTrainers": {"3": 5},
        "evalDataset": format!("file://{}", data.display()),
    })
    .as_object()
    .cloned()
    .unwrap();
    let configs = plan.configs().unwrap();
    let factory: Arc<dyn AppFactory> = Arc::new(StragglerFactory::new(MnistFactory::shared()));
    let opts = RunOptions {
        workdir: workdir.to_owned(),
        task_key: None,
        backend_env: BackendEnv { local_hub: LocalHub::new(), ..BackendEnv::default() },
        role: None,
        observer: None,
    };
    let start = chrono::Utc::now();
    let mut set = tokio::task::JoinSet::new();
    for (i, config) in configs.into_iter().enumerate() {
        let (factory, mut opts) = (factory.clone(), opts.clone());
        set.spawn(async move {
            let res = if i == 0 && is_async {
                fledge_sdk::role::run::<fedbuff::AsyncAggregator>(config, factory, opts).await
            } else {
                if i > 0 {
                    opts.role = Some(RoleKind::Trainer);
                }
                run_task_with(config, factory, opts).await
            };
            (i, res)
        });
    }
    let mut top = None;
    while let Some(joined) = set.join_next().await {
        let (i, res) = joined.unwrap();
        let summary =
            res.unwrap_or_else(|e| panic!("task {i}: {}", fledge_sdk::runner::error_chain(&e)));
        if i == 0 {
            top = Some(summary);
        }
    }
    (top.unwrap(), start)
}

#[tokio::test(flavor = "multi_thread")]
async fn fedbuff_and_fedavg_reach_the_target_with_a_5x_straggler() {
    const TARGET: f64 = 0.85;
    let dir = tempfile::tempdir().unwrap();
    let fedbuff = Sort {
        sort: "fedbuff".to_owned(),
        kwargs: json!({"aggGoal": 2, "concurrency": 4}).as_object().cloned().unwrap(),
    };
    let (async_run, async_start) = run_in_process(fedbuff, 24, dir.path()).await;
    let (sync_run, sync_start) = run_in_process(Sort::fedavg(), 8, dir.path()).await;
    let async_secs = time_to(&async_run.history, async_start, TARGET);
    let sync_secs = time_to(&sync_run.history, sync_start, TARGET);
    let finish = |r: &RunSummary, start: chrono::DateTime<chrono::Utc>| {
        let last = r.history.last().unwrap();
        (
            last.metrics["global.accuracy"],
            (last.timestamp.unwrap() - start).num_milliseconds() as f64 / 1000.0,
        )
    };
    let (async_acc, async_total) = finish(&async_run, async_start);
    let (sync_acc, sync_total) = finish(&sync_run, sync_start);
    eprintln!(
        "time to test accuracy {TARGET} with trainer 3 of 4 five times slower:\n\
         fedbuff (aggGoal 2, concurrency 4): {async_secs:?} s; {} steps, final accuracy {async_acc:.4} at {async_total:.1} s\n\
         fedavg (synchronous):               {sync_secs:?} s; {} rounds, final accuracy {sync_acc:.4} at {sync_total:.1} s",
        async_run.rounds, sync_run.rounds
    );
    assert_eq!(async_run.rounds, 24);
    assert_eq!(sync_run.rounds, 8);
    assert!(async_secs.is_some(), "fedbuff never reached {TARGET}: {:?}", async_run.history);
    assert!(sync_secs.is_some(), "fedavg never reached {TARGET}: {:?}", sync_run.history);
}
