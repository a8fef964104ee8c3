//! `fledgectl` against the real controller: after `run --no-watch` the controller expands the
//! hierarchical job into its 7 tasks; `stop job` ends it and `job watch` reports the outcome.
//! No deployer runs, so tasks never start; nothing here depends on timing beyond generous
//! polling deadlines.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Server, fixture, s};

/// Polls `check` every 100 ms for up to 60 s.
async fn eventually<F, Fut>(what: &str, mut check: F) -> Value
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<Value>>,
{
    for _ in 0..600 {
        if let Some(value) = check().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_expands_and_stops_a_job_run_from_the_cli() {
    let server = Server::start_with_controller().await;
    let job = server.ctl(&["run", s(&fixture()), "--no-watch"]).await.ok();

    let tasks = eventually("7 tasks", || async {
        let tasks = server.ctl(&["get", "tasks", &job, "-o", "json"]).await.json();
        (tasks.as_array().map_or(0, Vec::len) == 7).then_some(tasks)
    })
    .await;
    let count = |role: &str| tasks.as_array().unwrap().iter().filter(|t| t["role"] == role).count();
    assert_eq!((count("trainer"), count("middle-aggregator"), count("top-aggregator")), (4, 2, 1));
    assert!(tasks.as_array().unwrap().iter().all(|t| t.get("key").is_none()), "keys leaked");
    let table = server.ctl(&["get", "tasks", &job]).await.ok();
    assert_eq!(table.lines().count(), 8, "{table}");

    server.ctl(&["stop", "job", &job]).await.ok();
    eventually("a final state", || async {
        let job = server.ctl(&["get", "job", &job, "-o", "json"]).await.json();
        matches!(job["state"].as_str(), Some("terminated" | "failed" | "completed")).then_some(job)
    })
    .await;
    let watch = server.ctl(&["job", "watch", &job, "--interval-ms", "50"]).await;
    assert_eq!(watch.code, 1, "{watch:?}");
    assert!(watch.stderr.contains(&format!("job {job} ended")), "{}", watch.stderr);
}
