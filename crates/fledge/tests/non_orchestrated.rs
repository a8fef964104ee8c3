//! End-to-end tests of issue 6, items 7 and 5, through the real binaries (`fledge standalone`
//! as a child process, `fledgectl`, and `fledge fledgelet` started by hand):
//! - non-orchestration mixed with orchestration: the platform runs the aggregator and one
//!   trainer, two clinics run theirs (a data spec entry with `participantRun`). The job waits
//!   for the clinics, `fledgectl run` prints each owner's command,
//!   the test runs those commands as the owners would, kills one agent mid-job and restarts it
//!   with the same key (it rejoins), and checks that a made-up key cannot take a data owner's
//!   slot (no trust on first use, issue 12 item 5), that any other key is refused, and that
//!   the keys die with the job;
//! - parallel experiments: one aggregator per region in one job, each with its own rounds and
//!   metrics.

// Helpers outside #[test] functions too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use fledge_types::{JobState, MetricRecord, TaskState};

mod support;

use support::{Platform, records_of, repo_root};

/// One data owner's agent, killed on drop.
struct Owner(Child);

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The key `fledgectl` minted into a join command line (`FLEDGE_TASK_KEY=KEY fledge ...`).
fn key_of(command: &str) -> String {
    let key = command.split_whitespace().next().unwrap().strip_prefix("FLEDGE_TASK_KEY=").unwrap();
    assert_eq!(key.len(), 64, "a minted key: {command}");
    key.to_owned()
}

/// Runs a join command line printed by `fledgectl` (`FLEDGE_TASK_KEY=<...> fledge fledgelet
/// ARGS`) the way a data owner would, in their own directory, with `key` (the minted one, or an
/// attacker's).
fn join(command: &str, key: &str, dir: &Path, log: &str) -> Command {
    let mut words = command.split_whitespace();
    let assignment = words.next().unwrap();
    assert!(assignment.starts_with("FLEDGE_TASK_KEY="), "{command}");
    assert_eq!(words.next(), Some("fledge"), "{command}");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_fledge"));
    agent
        .args(words)
        .env("FLEDGE_TASK_KEY", key)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(log)).unwrap());
    agent
}

/// Polls `done` every 100 ms until it holds (a deadline only guards against a hang).
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..1200 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread")]
async fn participant_run_trainers_join_leave_rejoin_and_the_job_completes() {
    let platform = Platform::start();

    // The user runs the job; fledgectl prints the command of each participant-run task.
    let mut run = platform
        .fledgectl()
        .arg("run")
        .arg(repo_root().join("examples/non-orchestrated-mnist"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stderr = run.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            let _ = lines_tx.send(line.clone());
            all.push(line);
        }
        all.join("\n")
    });
    let mut job = None;
    let mut commands = Vec::new();
    for line in lines.iter() {
        if let Some(rest) = line.strip_prefix("created job ") {
            job = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.contains(" fledge fledgelet ") {
            commands.push(line.clone());
        }
        if line.contains("prints these commands again") {
            break;
        }
    }
    let job = job.expect("fledgectl run names the job");
    assert_eq!(commands.len(), 2, "one command per clinic: {commands:?}");

    // Nothing runs before the data owners join: the job says whom it waits for.
    // (The controller records whom it waits for once the managed tasks are deployed.)
    until("the job to say whom it waits for", async || {
        let (state, _, _) = platform.job(&job).await;
        assert_eq!(state.state, JobState::Deploying);
        let reason = state.reason.clone().unwrap_or_default();
        reason.contains("waiting for 2 participant-run tasks to join")
    })
    .await;
    let table = platform.fledgectl().args(["get", "tasks", &job]).output().unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert_eq!(table.matches(" participant ").count(), 2, "{table}");
    assert_eq!(table.matches(" platform ").count(), 2, "{table}");
    let (_, tasks, _) = platform.job(&job).await;
    assert!(tasks.iter().all(|t| t.state == TaskState::Ready), "{tasks:?}");
    let aggregator = tasks.iter().find(|t| t.role == "aggregator").unwrap().task_id.clone();
    let clinics: Vec<_> = tasks.iter().filter(|t| !t.managed).collect();
    assert_eq!(clinics.len(), 2, "{tasks:?}");
    assert!(clinics.iter().all(|t| t.role == "trainer"), "{tasks:?}");
    let task_a = clinics[0].task_id.clone();
    let command_a = commands.iter().find(|c| c.contains(task_a.as_str())).unwrap().clone();
    let command_b = commands.iter().find(|c| !c.contains(task_a.as_str())).unwrap().clone();

    let (key_a, key_b) = (key_of(&command_a), key_of(&command_b));
    assert_ne!(key_a, key_b);
    let (dir_a, dir_b) = (platform.scratch().join("clinic-a"), platform.scratch().join("clinic-b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();

    // No trust on first use: before clinic b joins, clinic a (who can derive b's task id from
    // the job) tries b's slot with a key of its own making, and is refused; so is clinic a's
    // own key on b's task.
    for (guess, log) in [("made-up-by-clinic-a", "steal-1.log"), (key_a.as_str(), "steal-2.log")] {
        let stolen = join(&command_b, guess, &dir_a, log).status().unwrap();
        assert!(!stolen.success(), "a made-up key took clinic b's slot");
        let why = std::fs::read_to_string(dir_a.join(log)).unwrap();
        assert!(why.contains("invalid key for task") && why.contains("minted"), "{why}");
    }
    // `job join` again shows no key a second time: keys are shown once.
    let again = platform.fledgectl().args(["job", "join", &job]).output().unwrap();
    let again = String::from_utf8(again.stdout).unwrap();
    assert!(!again.contains(&key_a) && !again.contains(&key_b), "{again}");
    assert_eq!(again.matches("FLEDGE_TASK_KEY=<the-key-minted-earlier>").count(), 2, "{again}");

    // Both data owners join with their minted keys, in their own directories.
    let mut first = Owner(join(&command_a, &key_a, &dir_a, "agent-1.log").spawn().unwrap());
    let _b = Owner(join(&command_b, &key_b, &dir_b, "agent.log").spawn().unwrap());

    // Mid-job (the aggregator reported a round), clinic a's machine dies.
    until("the first round", async || {
        let (_, _, records) = platform.job(&job).await;
        records.iter().any(|r| r.role == "aggregator")
    })
    .await;
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let (_, _, records) = platform.job(&job).await;
    let left_at = records_of(&records, "aggregator").last().unwrap().round;

    // Another key is refused at once, with the reason.
    let refused = join(&command_a, "a-guess", &dir_a, "refused.log").status().unwrap();
    assert!(!refused.success());
    let why = std::fs::read_to_string(dir_a.join("refused.log")).unwrap();
    assert!(why.contains("refused task") && why.contains("fledgectl job join"), "{why}");
    // The same key rejoins.
    let mut again = join(&command_a, &key_a, &dir_a, "agent-2.log").spawn().unwrap();

    let out = run.wait_with_output().unwrap();
    let stderr = reader.join().unwrap();
    assert!(out.status.success(), "fledgectl run failed:\n{stderr}");
    assert!(again.wait().unwrap().success(), "the rejoined agent's task completed");

    let (state, tasks, records) = platform.job(&job).await;
    assert_eq!(state.state, JobState::Completed);
    assert!(tasks.iter().all(|t| t.state == TaskState::Completed), "{tasks:?}");
    let rounds = records_of(&records, "aggregator");
    assert_eq!(rounds.len(), 15, "{rounds:?}");
    assert!(rounds.iter().all(|r| r.task_id == aggregator));
    let accuracy = rounds[14].metrics["global.accuracy"];
    assert!(accuracy > 0.8, "final accuracy {accuracy}");
    // Clinic a trained again after it rejoined: its records go past the round it left in.
    let trained_by_a: Vec<u64> = records_of(&records, "trainer")
        .iter()
        .filter(|r| r.task_id == task_a)
        .map(|r| r.round)
        .collect();
    assert!(trained_by_a.iter().any(|round| *round > left_at + 1), "{left_at} {trained_by_a:?}");

    // The job is final: clinic a's key opens nothing any more.
    let late = join(&command_a, &key_a, &dir_a, "late.log").status().unwrap();
    assert!(!late.success(), "a task key outlived its job");
    let why = std::fs::read_to_string(dir_a.join("late.log")).unwrap();
    assert!(why.contains("invalid key for task") && why.contains("ended"), "{why}");
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_experiments_train_one_model_per_region_in_one_job() {
    let platform = Platform::start();
    let job = platform.run("parallel-experiments-mnist");
    let (state, tasks, records) = platform.job(&job).await;
    assert_eq!(state.state, JobState::Completed);
    assert_eq!(tasks.len(), 7, "4 trainers and 3 regional aggregators: {tasks:?}");
    assert!(tasks.iter().all(|t| t.state == TaskState::Completed), "{tasks:?}");

    // Each region's aggregator ran its own 5 rounds over its own trainers only.
    let aggregators: Vec<_> = tasks.iter().filter(|t| t.role == "aggregator").collect();
    let mut regions = BTreeSet::new();
    for aggregator in &aggregators {
        let region = aggregator.group_association["param-channel"].clone();
        let all = records_of(&records, "aggregator");
        let own: Vec<&MetricRecord> =
            all.iter().filter(|r| r.task_id == aggregator.task_id).collect();
        assert_eq!(own.len(), 5, "{region}: {own:?}");
        let trainers = tasks
            .iter()
            .filter(|t| t.role == "trainer" && t.group_association["param-channel"] == region)
            .count();
        assert!(own.iter().all(|r| r.metrics["updates"] == trainers as f64), "{region}: {own:?}");
        let accuracy = own[4].metrics["global.accuracy"];
        assert!(accuracy > 0.8, "{region} accuracy {accuracy}");
        regions.insert(region);
    }
    assert_eq!(regions.into_iter().collect::<Vec<_>>(), ["asia", "eu", "us"]);

    // The registry holds every region's rounds, told apart by task id.
    let metrics = platform.scratch().join("data/registry/jobs").join(&job).join("metrics.jsonl");
    let lines = std::fs::read_to_string(&metrics).unwrap();
    let ids: BTreeSet<String> = lines
        .lines()
        .map(|l| serde_json::from_str::<MetricRecord>(l).unwrap().task_id.to_string())
        .collect();
    let expected: BTreeSet<String> = aggregators.iter().map(|t| t.task_id.to_string()).collect();
    assert_eq!(ids, expected);
    // Each region keeps its own model: jobs/<job>/<region>/final.safetensors, and its rounds.
    let job_dir = metrics.parent().unwrap();
    for region in ["asia", "eu", "us"] {
        assert!(job_dir.join(region).join("final.safetensors").is_file(), "{region}");
        assert!(job_dir.join(region).join("rounds/round-00005.safetensors").is_file(), "{region}");
    }
    assert!(!job_dir.join("final.safetensors").exists(), "no region overwrites a shared model");
}
