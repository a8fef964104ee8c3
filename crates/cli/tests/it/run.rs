//! `fledgectl run DIR`: registers a job directory, starts the job and watches it; exit 0 iff it
//! completed. Re-running creates a new job and nothing else. The test plays the controller by
//! moving the job through the store.

use std::collections::BTreeMap;
use std::time::Duration;

use fledge_control::store::JobFilter;
use fledge_types::{Job, JobState, MetricRecord, TaskId, TaskState};

use crate::support::{Server, fixture, insert_ready_task, s};

/// Waits until a job is `starting`, then drives it to `end` with three rounds of metrics.
async fn play_controller(server: &Server, end: JobState) -> Job {
    let filter = JobFilter { owner: None, states: vec![JobState::Starting] };
    let job = loop {
        if let Some(job) = server.store.list_jobs(&filter).await.unwrap().into_iter().next() {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let store = &server.store;
    store.set_job_state(&job.id, &[JobState::Starting], JobState::Deploying, None).await.unwrap();
    store.set_job_state(&job.id, &[JobState::Deploying], JobState::Running, None).await.unwrap();
    for round in 1..=3 {
        let record = MetricRecord {
            task_id: TaskId::new("top"),
            role: "top-aggregator".into(),
            round,
            metrics: BTreeMap::from([
                ("loss".to_owned(), 1.0 / round as f64),
                ("accuracy".to_owned(), 0.3 * round as f64),
            ]),
            timestamp: None,
        };
        store.add_metrics(&job.id, &[record], u64::MAX).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    if end == JobState::Failed {
        insert_ready_task(store.as_ref(), &job.id, "t-failed").await;
        let log = "loading data\nTraceback (most recent call last):\nValueError: bad shard";
        store
            .set_task_state(&job.id, &TaskId::new("t-failed"), TaskState::Failed, Some(log))
            .await
            .unwrap();
    }
    let reason = (end != JobState::Completed).then_some("all trainer tasks failed");
    store.set_job_state(&job.id, &[JobState::Running], end, reason).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_registers_once_and_exits_by_the_job_outcome() {
    let server = Server::start().await;
    let dir = fixture();

    let run_args = ["run", s(&dir), "--interval-ms", "20"];
    let (run, job) =
        tokio::join!(server.ctl(&run_args), play_controller(&server, JobState::Completed));
    let stdout = run.ok();
    assert!(stdout.contains(job.id.as_str()) && stdout.contains("completed"), "{stdout}");
    for expected in [
        "created design hier-cli",
        "stored schema version 1",
        "stored code version 1",
        "round 3/3",
        "loss 0.3333",
        "accuracy 0.9000",
    ] {
        assert!(run.stderr.contains(expected), "missing {expected:?} in:\n{}", run.stderr);
    }
    assert_eq!(run.stderr.matches("created dataset").count(), 4, "{}", run.stderr);
    let tasks = server.ctl(&["get", "metrics", job.id.as_str()]).await.ok();
    assert_eq!(tasks.lines().count(), 4, "{tasks}");

    let accuracy = server
        .ctl(&[
            "get",
            "metrics",
            job.id.as_str(),
            "--names",
            "accuracy",
            "--round",
            "2",
            "-o",
            "json",
        ])
        .await
        .json();
    assert_eq!(accuracy.as_array().unwrap().len(), 1, "{accuracy}");
    assert_eq!(accuracy[0]["metrics"], serde_json::json!({"accuracy": 0.6}));

    // Again, without watching: nothing is registered twice, a second job starts.
    let again = server.ctl(&["run", s(&dir), "--no-watch"]).await;
    let second = again.ok();
    assert_ne!(second, job.id.as_str());
    for expected in
        ["design hier-cli exists", "schema unchanged (version 1)", "code unchanged (version 1)"]
    {
        assert!(again.stderr.contains(expected), "missing {expected:?} in:\n{}", again.stderr);
    }
    assert_eq!(again.stderr.matches("reusing dataset").count(), 4, "{}", again.stderr);
    let count = |json: serde_json::Value| json.as_array().unwrap().len();
    assert_eq!(count(server.ctl(&["get", "designs", "-o", "json"]).await.json()), 1);
    assert_eq!(count(server.ctl(&["get", "datasets", "-o", "json"]).await.json()), 4);
    assert_eq!(count(server.ctl(&["get", "jobs", "-o", "json"]).await.json()), 2);
    let job2 = server.ctl(&["get", "job", &second, "-o", "json"]).await.json();
    assert_eq!(job2["state"], "starting");
    assert_eq!(job2["spec"]["dataSpec"][0]["datasetGroups"]["eu"].as_array().unwrap().len(), 2);
    server.ctl(&["stop", "job", &second]).await.ok();

    // A job that fails makes `run` (and `job watch`) exit 1 with the reason.
    let (run, job) =
        tokio::join!(server.ctl(&run_args), play_controller(&server, JobState::Failed));
    let stderr = run.fails(1);
    assert!(
        stderr.contains(&format!("job {} ended failed: all trainer tasks failed", job.id)),
        "{stderr}"
    );
    // Which task failed, and the tail of its log.
    assert!(stderr.contains("task t-failed (trainer) failed"), "{stderr}");
    assert!(stderr.contains("  | ValueError: bad shard"), "{stderr}");
    let logs =
        server.ctl(&["logs", "-f", job.id.as_str(), "t-failed", "--interval-ms", "20"]).await;
    assert!(logs.ok().ends_with("ValueError: bad shard"), "{logs:?}");
    assert!(logs.stderr.contains("task t-failed ended failed"), "{}", logs.stderr);
    let watch = server.ctl(&["job", "watch", job.id.as_str(), "-o", "json"]).await;
    assert_eq!(watch.code, 1, "{watch:?}");
    let watched: serde_json::Value = serde_json::from_str(&watch.stdout).unwrap();
    assert_eq!(watched["state"], "failed");
}
