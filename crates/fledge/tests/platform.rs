//! End-to-end tests of the platform through its real binaries (issue 4): `fledge standalone`
//! (every service, the process deployer), workers as `fledge fledgelet` processes running the
//! built-in roles, and jobs submitted with `fledgectl run`.
//!
//! Covered: the two-tier and three-tier MNIST examples complete with a sensible accuracy; a
//! trainer whose code exits non-zero fails the job with its log tail visible through the API;
//! a job past its `maxRunTime` is terminated with every worker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use fledge_types::{JobState, TaskState};

use support::{Platform, copy_example, records_of, repo_root};

#[tokio::test(flavor = "multi_thread")]
async fn two_tier_and_three_tier_mnist_complete_through_the_platform() {
    let platform = Platform::start();

    let job = platform.run("mnist");
    let (job, tasks, records) = platform.job(&job).await;
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    assert_eq!(tasks.len(), 5, "4 trainers and 1 aggregator");
    assert!(tasks.iter().all(|t| t.state == TaskState::Completed), "{tasks:?}");
    let rounds = records_of(&records, "aggregator");
    assert_eq!(rounds.len(), 20, "one aggregator record per round");
    let accuracy = rounds[19].metrics["global.accuracy"];
    assert!(accuracy > 0.9, "two-tier accuracy after 20 rounds: {accuracy}");

    // The trained models are the user's: listed and downloaded with fledgectl, and the final
    // one, evaluated here, has exactly the accuracy the aggregator reported.
    let out = platform
        .fledgectl()
        .args(["get", "models", job.id.as_str(), "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let files: Vec<fledge_types::ModelFile> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(files.len(), 21, "20 round checkpoints and the final model: {files:?}");
    assert_eq!(files[20].round, None);
    let file = platform.scratch().join("final.safetensors");
    let out = platform
        .fledgectl()
        .args(["get", "model", job.id.as_str(), "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len() as u64, files[20].size);
    let weights = fledge_sdk::registry::from_safetensors("final", &bytes).unwrap();
    let data = format!("file://{}", repo_root().join("examples/data").display());
    let mut evaluator = fledge_models::MnistEvaluator::new(&data, 128).unwrap();
    let evaluated = fledge_sdk::Evaluator::evaluate(&mut evaluator, &weights).unwrap()["accuracy"];
    assert!((evaluated - accuracy).abs() < 1e-6, "downloaded {evaluated}, reported {accuracy}");

    // Operators see the job in `/metrics`: jobs and tasks by state from the store, the rounds
    // and traffic the tasks reported, the controller's transitions and deploy latency, the
    // deployer's worker starts, the broker's logins, the notifier's subscribers.
    let (status, text) = platform.get_text("/metrics").await;
    assert_eq!(status, 200, "{text}");
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(value("fledge_jobs{state=\"completed\"}"), 1.0);
    assert_eq!(value("fledge_jobs{state=\"running\"}"), 0.0);
    assert_eq!(value("fledge_tasks{state=\"completed\"}"), 5.0);
    assert_eq!(value("fledge_task_rounds_total{role=\"aggregator\"}"), 20.0);
    assert_eq!(value("fledge_task_rounds_total{role=\"trainer\"}"), 80.0);
    assert_eq!(value("fledge_task_round_duration_seconds_count{role=\"aggregator\"}"), 20.0);
    assert_eq!(value("fledge_task_aggregation_duration_seconds_count{role=\"aggregator\"}"), 20.0);
    // 20 rounds of a 784-128-10 f32 MLP (about 400 kB) to and from each of 4 trainers.
    let sent = value("fledge_channel_sent_bytes_total{channel=\"param-channel\"}");
    let received = value("fledge_channel_received_bytes_total{channel=\"param-channel\"}");
    assert!(
        sent > 20.0 * 4.0 * 400_000.0 && received > 20.0 * 4.0 * 400_000.0,
        "{sent} {received}"
    );
    assert_eq!(value("fledge_controller_job_transitions_total{to=\"completed\"}"), 1.0);
    assert_eq!(value("fledge_controller_job_deploy_duration_seconds_count"), 1.0);
    assert_eq!(
        value("fledge_deployer_worker_starts_total{platform=\"process\",result=\"started\"}"),
        5.0
    );
    assert_eq!(value("fledge_deployer_worker_exits_total{platform=\"process\"}"), 5.0);
    assert!(value("fledge_broker_logins_total{result=\"accepted\"}") >= 5.0);
    assert!(value("fledge_broker_connections") >= 0.0, "the open connections are reported");
    assert!(value("fledge_notifier_events_published_total{kind=\"deploy\"}") >= 1.0);
    assert_eq!(value("fledge_notifier_subscribers{kind=\"deploy\"}"), 1.0, "the deployer");
    assert!(
        text.lines().any(|l| l.starts_with("fledge_apiserver_http_requests_total{method=\"POST\"")
            && l.contains("/metrics\"")
            && l.contains("status=\"204\"")),
        "the tasks' metric posts are counted: {text}"
    );
    assert!(!text.contains(job.id.as_str()), "no series names a job");

    let job = platform.run("hierarchical-mnist");
    let (job, tasks, records) = platform.job(&job).await;
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    let count = |role: &str| tasks.iter().filter(|t| t.role == role).count();
    assert_eq!((count("trainer"), count("middle-aggregator"), count("top-aggregator")), (4, 2, 1));
    // The two regions' trainers land in their own groups.
    let mut groups: Vec<&str> = tasks
        .iter()
        .filter(|t| t.role == "trainer")
        .map(|t| t.group_association["param-channel"].as_str())
        .collect();
    groups.sort_unstable();
    assert_eq!(groups, ["eu", "eu", "us", "us"]);
    let top = records_of(&records, "top-aggregator");
    assert_eq!(top.len(), 10, "one top-aggregator record per round");
    let accuracy = top[9].metrics["global.accuracy"];
    assert!(accuracy > 0.85, "three-tier accuracy after 10 rounds: {accuracy}");
}

/// Writes `code/<role>/fledge-role.toml` of a copy of `examples/mnist` to run `command`.
fn mnist_with_command(dir: &std::path::Path, role: &str, command: &str) {
    copy_example("mnist", dir);
    std::fs::write(dir.join("code").join(role).join("fledge-role.toml"), command).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_trainer_fails_the_job_and_max_run_time_terminates_one() {
    let platform = Platform::start();

    // Every trainer exits 3 after writing to stderr: the role fails, and so does the job.
    let failing = platform.scratch().join("failing");
    mnist_with_command(
        &failing,
        "trainer",
        r#"command = ["sh", "-c", "echo trainer-broke-here >&2; exit 3"]"#,
    );
    let outcome = platform.run_dir(&failing);
    assert!(!outcome.success, "fledgectl run must fail:\n{}", outcome.output);
    let (job, tasks, _) = platform.job(&outcome.job).await;
    assert_eq!(job.state, JobState::Failed);
    assert!(job.reason.as_deref().unwrap_or("").contains("trainer"), "{job:?}");
    let trainer = tasks.iter().find(|t| t.role == "trainer").unwrap();
    assert_eq!(trainer.state, TaskState::Failed);
    assert!(trainer.log.contains("trainer-broke-here"), "log tail: {}", trainer.log);
    // The same tail through the CLI.
    let out = platform
        .fledgectl()
        .args(["get", "task", &outcome.job, trainer.task_id.as_str(), "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("trainer-broke-here"));

    // Workers that never finish: maxRunTime ends the job and every task.
    let endless = platform.scratch().join("endless");
    mnist_with_command(&endless, "trainer", r#"command = ["sleep", "600"]"#);
    mnist_with_command(&endless, "aggregator", r#"command = ["sleep", "600"]"#);
    let job_json = endless.join("job.json");
    let text = std::fs::read_to_string(&job_json).unwrap();
    let text = text
        .replace("\"maxRunTime\": 900", "\"maxRunTime\": 3")
        .replace("\"designId\": \"mnist\"", "\"designId\": \"mnist-endless\"");
    std::fs::write(&job_json, text).unwrap();
    let outcome = platform.run_dir(&endless);
    assert!(!outcome.success, "a terminated job is not a success:\n{}", outcome.output);
    let (job, tasks, _) = platform.job(&outcome.job).await;
    assert_eq!(job.state, JobState::Terminated, "{job:?}");
    assert!(job.reason.as_deref().unwrap_or("").contains("maxRunTime"), "{job:?}");
    assert!(tasks.iter().all(|t| t.state == TaskState::Terminated), "{tasks:?}");
}

/// `fledgectl logs -f` on a real worker that writes while followed: every line once, in order,
/// through the agent's stream; then `describe`, `version` and `-o name` on the same platform.
#[tokio::test(flavor = "multi_thread")]
async fn logs_follow_a_running_worker_line_by_line() {
    let platform = Platform::start();
    let dir = platform.scratch().join("ticking");
    let ticking = r#"command = ["sh", "-c", "i=0; while [ $i -lt 40 ]; do echo tick-$i; i=$((i+1)); sleep 0.05; done"]"#;
    mnist_with_command(&dir, "trainer", ticking);
    std::fs::write(dir.join("code").join("aggregator").join("fledge-role.toml"), ticking).unwrap();
    let out = platform.fledgectl().arg("run").arg(&dir).arg("--no-watch").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let job = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    // The first trainer, as soon as the job has expanded.
    let mut task = None;
    for _ in 0..300 {
        let out = platform.fledgectl().args(["get", "tasks", &job, "-o", "json"]).output().unwrap();
        let tasks: Vec<fledge_types::Task> =
            serde_json::from_slice(&out.stdout).unwrap_or_default();
        task = tasks.iter().find(|t| t.role == "trainer").map(|t| t.task_id.to_string());
        if task.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let task = task.expect("the job expanded into tasks");
    let out = platform
        .fledgectl()
        .args(["logs", "-f", &job, &task, "--interval-ms", "100"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("ended completed"), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let ticks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("tick-")).collect();
    let expected: Vec<String> = (0..40).map(|i| format!("tick-{i}")).collect();
    assert_eq!(ticks, expected, "{stdout}");
    // The fledgelet's own lines come first: the sandbox in force, then the command.
    let mut lines = stdout.lines();
    assert!(lines.next().unwrap().starts_with("[fledgelet] sandbox: "), "{stdout}");
    assert!(lines.next().unwrap().starts_with("[fledgelet] running"), "{stdout}");
    assert!(stdout.trim_end().ends_with("exited with exit code 0"), "{stdout}");

    // The other workers end too: the job completes.
    let out =
        platform.fledgectl().args(["job", "watch", &job, "--timeout", "5m"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = platform.fledgectl().args(["get", "tasks", &job, "-o", "name"]).output().unwrap();
    let names = String::from_utf8(out.stdout).unwrap();
    assert!(names.lines().any(|l| l == format!("task/{task}")), "{names}");
    let out = platform.fledgectl().args(["describe", "job", &job]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("State:            completed") && text.contains("Tasks (5): completed 5"),
        "{text}"
    );
    let out = platform.fledgectl().arg("version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("Server Version"), "{text}");
}
