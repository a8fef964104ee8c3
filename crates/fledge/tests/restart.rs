//! End-to-end tests of issue 14 item 3 through the real binaries: `fledge standalone` killed
//! with SIGKILL in the middle of a job starts again on the same data directory (it used to
//! refuse forever: "cannot replace compute default: compute default is in use"), keeps every
//! design, dataset and job, and the interrupted job completes: its workers outlived the crash
//! (the deployer re-adopts them), reconnected to the broker and the control plane that came
//! back on the same addresses, and recovered the round the crash interrupted.

// Helpers outside #[test] functions too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use fledge_types::{JobState, TaskState};

mod support;

use support::{Platform, example_with_rounds, records_of};

#[tokio::test(flavor = "multi_thread")]
async fn a_standalone_killed_mid_job_restarts_and_the_job_completes_with_its_workers() {
    let platform = Platform::start_on_fixed_ports();
    let rounds = 8;
    let dir = example_with_rounds(&platform, "mnist", "mnist", rounds);

    // The same job without the crash, for the accuracy to compare with.
    let clean = platform.run_dir(&dir);
    assert!(clean.success, "the fault-free job failed:\n{}", clean.output);
    let (_, _, records) = platform.job(&clean.job).await;
    let clean_accuracy =
        records_of(&records, "aggregator").pop().unwrap().metrics["global.accuracy"];

    // Start the job again and crash the platform once the aggregator has done two rounds.
    let mut run = platform
        .fledgectl()
        .arg("run")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = platform.client();
    let deadline = Instant::now() + Duration::from_secs(180);
    let job = loop {
        assert!(Instant::now() < deadline, "the job never reached round 2");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let newest = client.list_jobs(None).await.unwrap().into_iter().max_by_key(|j| j.created_at);
        let Some(job) = newest.filter(|j| j.id.as_str() != clean.job) else {
            continue;
        };
        let (state, _, records) = platform.job(job.id.as_str()).await;
        assert!(!state.state.is_final(), "the job ended before the crash: {:?}", state.reason);
        if records_of(&records, "aggregator").len() >= 2 {
            break job.id.to_string();
        }
    };
    let _ = run.kill();
    let _ = run.wait();
    let platform = platform.crash_and_restart();
    let crashed_at = Instant::now();

    let (after, _, _) = platform.job(&job).await;
    assert_eq!(after.spec.name, "mnist two-tier", "the job survives the crash");
    let out = platform.fledgectl().args(["get", "designs", "-o", "json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("mnist"), "the design survives");

    // The interrupted job completes, with the workers that outlived the crash.
    let deadline = Instant::now() + Duration::from_secs(300);
    let (state, tasks, records) = loop {
        let (state, tasks, records) = platform.job(&job).await;
        if state.state.is_final() {
            break (state, tasks, records);
        }
        assert!(
            Instant::now() < deadline,
            "the job is still {:?} after the restart: {:?}; tasks: {:?}",
            state.state,
            state.reason,
            tasks.iter().map(|t| (&t.role, t.state, t.restarts, &t.log)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let log =
        std::fs::read_to_string(platform.scratch().join("standalone.log")).unwrap_or_default();
    assert_eq!(
        state.state,
        JobState::Completed,
        "{:?}; tasks: {:?}\nstandalone log:\n{}",
        state.reason,
        tasks.iter().map(|t| (&t.role, t.state, t.restarts, &t.log)).collect::<Vec<_>>(),
        log.lines().rev().take(60).collect::<Vec<_>>().join("\n")
    );
    assert!(log.contains("worker adopted"), "the restarted deployer adopted the workers");
    assert!(tasks.iter().all(|t| t.state == TaskState::Completed), "{tasks:?}");
    let rounds_recorded: Vec<u64> =
        records_of(&records, "aggregator").iter().map(|r| r.round).collect();
    assert_eq!(rounds_recorded, (1..=rounds).collect::<Vec<_>>(), "every round recorded once");
    let accuracy = records_of(&records, "aggregator").pop().unwrap().metrics["global.accuracy"];
    let restarted: Vec<(&str, u32, &str)> = tasks
        .iter()
        .filter(|t| t.restarts > 0)
        .map(|t| (t.role.as_str(), t.restarts, t.log.lines().next().unwrap_or("")))
        .collect();
    eprintln!(
        "standalone killed after round 2: job completed {:.1}s after the restart; restarted tasks {restarted:?}; accuracy {accuracy:.4} (fault-free {clean_accuracy:.4})",
        crashed_at.elapsed().as_secs_f64()
    );
    assert!(
        (accuracy - clean_accuracy).abs() <= 0.005,
        "accuracy {accuracy} is not within 0.5 points of the fault-free run's {clean_accuracy}"
    );
}
