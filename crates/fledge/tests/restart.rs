//! End-to-end tests of issue 14 item 3 through the real binaries: `fledge standalone` killed
//! with SIGKILL in the middle of a job starts again on the same data directory (it used to
//! refuse forever: "cannot replace compute default: compute default is in use"), keeps every
//! design, dataset and job, and brings the interrupted job to a final state.

// Helpers outside #[test] functions too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use fledge_types::JobState;

mod support;

use support::{Platform, repo_root};

#[tokio::test(flavor = "multi_thread")]
async fn a_standalone_killed_mid_job_restarts_on_its_data_dir_and_the_job_ends() {
    let platform = Platform::start();
    // Start the MNIST example and wait until its job runs.
    let mut run = platform
        .fledgectl()
        .arg("run")
        .arg(repo_root().join("examples/mnist"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(run.stderr.take().unwrap());
    let mut job = None;
    for line in stderr.lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("created job ") {
            job = rest.split_whitespace().next().map(str::to_owned);
            break;
        }
    }
    let job = job.expect("fledgectl run prints the job it created");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (state, _, _) = platform.job(&job).await;
        if state.state == JobState::Running {
            break;
        }
        assert!(!state.state.is_final(), "the job ended before the crash: {:?}", state.reason);
        assert!(Instant::now() < deadline, "the job never ran: {:?}", state.state);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = run.kill();
    let _ = run.wait();

    // Crash, then start again on the same data directory: it must come up.
    let platform = platform.crash_and_restart();
    let (after, _, _) = platform.job(&job).await;
    assert_eq!(after.spec.name, "mnist two-tier", "the job survives the crash");
    let out = platform.fledgectl().args(["get", "designs", "-o", "json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("mnist"), "the design survives");

    // The interrupted job reaches a final state: nothing stays running forever.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (state, tasks, _) = platform.job(&job).await;
        if state.state.is_final() {
            eprintln!("after the restart the job ended {:?}: {:?}", state.state, state.reason);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job is still {:?} after the restart: {:?}; tasks: {:?}",
            state.state,
            state.reason,
            tasks.iter().map(|t| (&t.task_id, t.state)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
