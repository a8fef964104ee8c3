//! Issue 14 items 1 and 2 end to end, through the real binaries: an aggregator killed with
//! SIGKILL in the middle of a job is redeployed by the controller (its role's restart policy),
//! resumes from the last round it saved, its children reattach without a restart of their
//! own, and the job completes with every round recorded once, at the accuracy of the same job
//! run without the fault in the same test.

// Helpers outside #[test] functions too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fledge_types::{JobState, MetricRecord, Task, TaskState};

mod support;

use support::{Platform, example_with_rounds, records_of};

/// SIGKILLs every process whose working directory is inside `work_dir` (the task's
/// fledgelet and its role process); returns how many.
fn kill_processes_in(work_dir: &Path) -> usize {
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) else {
            continue;
        };
        if cwd.starts_with(work_dir) {
            let status =
                std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
            if status.success() {
                killed += 1;
            }
        }
    }
    killed
}

/// The top aggregator's records, one per round (sorted).
fn top_rounds(records: &[MetricRecord], role: &str) -> Vec<u64> {
    records_of(records, role).iter().map(|r| r.round).collect()
}

fn accuracy(records: &[MetricRecord], role: &str) -> f64 {
    let last = records_of(records, role).pop().expect("the top aggregator reported rounds");
    last.metrics["global.accuracy"]
}

/// Runs `dir` to completion and returns its top aggregator's final global accuracy.
async fn clean_run(platform: &Platform, dir: &Path, top: &str) -> f64 {
    let outcome = platform.run_dir(dir);
    assert!(outcome.success, "the fault-free job failed:\n{}", outcome.output);
    let (_, _, records) = platform.job(&outcome.job).await;
    accuracy(&records, top)
}

/// Runs `dir`, kills the first task of role `victim` once the top aggregator has recorded
/// `after` rounds, and waits for the job to end; returns the job's tasks and records.
async fn faulted_run(
    platform: &Platform,
    dir: &Path,
    top: &str,
    victim: &str,
    after: u64,
) -> (String, Vec<Task>, Vec<MetricRecord>) {
    let run = platform
        .fledgectl()
        .arg("run")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `fledgectl run` prints the job id first; find it through the API instead of its pipes.
    let client = platform.client();
    let deadline = Instant::now() + Duration::from_secs(300);
    let (job, victim_task) = loop {
        assert!(Instant::now() < deadline, "the job never reached round {after}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Some(job) =
            client.list_jobs(None).await.unwrap().into_iter().max_by_key(|j| j.created_at)
        else {
            continue;
        };
        let (state, tasks, records) = platform.job(job.id.as_str()).await;
        assert!(!state.state.is_final(), "the job ended before the fault: {:?}", state.reason);
        if top_rounds(&records, top).len() as u64 >= after {
            let victim = tasks.into_iter().find(|t| t.role == victim).expect("the victim role");
            break (job.id.to_string(), victim);
        }
    };
    let work_dir = platform.data_dir().join("work").join(&job).join(victim_task.task_id.as_str());
    let killed = kill_processes_in(&work_dir);
    assert!(killed > 0, "no process runs in {}", work_dir.display());
    eprintln!("killed {killed} processes of {victim} {} after round {after}", victim_task.task_id);

    let out = tokio::task::spawn_blocking(move || run.wait_with_output()).await.unwrap().unwrap();
    let (state, tasks, records) = platform.job(&job).await;
    assert!(
        out.status.success() && state.state == JobState::Completed,
        "the job did not complete after the fault: {:?} {:?}\n{}{}\ntasks: {:?}",
        state.state,
        state.reason,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tasks.iter().map(|t| (&t.role, t.state, t.restarts, &t.log)).collect::<Vec<_>>()
    );
    (job, tasks, records)
}

/// The checks every fault shares: the victim was restarted once and completed, nothing else
/// restarted, every round is recorded once, and the accuracy is the fault-free one's.
fn check_recovered(
    tasks: &[Task],
    records: &[MetricRecord],
    top: &str,
    victim: &str,
    rounds: u64,
    clean: f64,
    tolerance: f64,
) {
    let restarted: Vec<&Task> = tasks.iter().filter(|t| t.restarts > 0).collect();
    assert_eq!(restarted.len(), 1, "only the victim restarts: {tasks:?}");
    assert_eq!(restarted[0].role, victim);
    assert_eq!(restarted[0].restarts, 1);
    assert_eq!(restarted[0].state, TaskState::Completed);
    assert!(tasks.iter().all(|t| t.state == TaskState::Completed), "{tasks:?}");
    assert_eq!(top_rounds(records, top), (1..=rounds).collect::<Vec<_>>(), "every round once");
    let faulted = accuracy(records, top);
    eprintln!("{victim} killed: final global accuracy {faulted:.4}, fault-free {clean:.4}");
    assert!(
        (faulted - clean).abs() <= tolerance,
        "accuracy {faulted} is not within {tolerance} of the fault-free run's {clean}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_top_aggregator_resumes_and_the_job_completes() {
    let platform = Platform::start();
    let rounds = 6;
    let dir = example_with_rounds(&platform, "mnist", "mnist", rounds);
    let clean = clean_run(&platform, &dir, "aggregator").await;
    let (_, tasks, records) = faulted_run(&platform, &dir, "aggregator", "aggregator", 3).await;
    check_recovered(&tasks, &records, "aggregator", "aggregator", rounds, clean, 0.005);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_middle_aggregator_comes_back_and_the_job_completes() {
    let platform = Platform::start();
    let rounds = 6;
    let dir = example_with_rounds(&platform, "hierarchical-mnist", "hierarchical", rounds);
    let clean = clean_run(&platform, &dir, "top-aggregator").await;
    let (_, tasks, records) =
        faulted_run(&platform, &dir, "top-aggregator", "middle-aggregator", 2).await;
    check_recovered(&tasks, &records, "top-aggregator", "middle-aggregator", rounds, clean, 0.005);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_fedbuff_aggregator_resumes_and_the_job_completes() {
    let platform = Platform::start();
    let steps = 10;
    let dir = example_with_rounds(&platform, "async-two-tier", "async", steps);
    let clean = clean_run(&platform, &dir, "aggregator").await;
    let (_, tasks, records) = faulted_run(&platform, &dir, "aggregator", "aggregator", 4).await;
    // FedBuff folds updates in arrival order with staleness weights, so two fault-free runs
    // of this job already differ by up to about a point: the bound is wider here.
    check_recovered(&tasks, &records, "aggregator", "aggregator", steps, clean, 0.015);
}
