//! The supervisor and the fledgelet loop running real children against a fake control plane.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use fledge_agent::api::Backoff;
use fledge_agent::entrypoint::Tools;
use fledge_agent::fledgelet::{self, TaskEvents};
use fledge_agent::supervisor::{self, Outcome, SupervisorOptions, TaskEnv};
use fledge_proto::{TaskEvent, TaskEventKind};
use fledge_types::{JobId, TaskId, TaskState};

use crate::fakes::{FakeTaskApi, kill9, wait_for_file, zip_of};

fn options(work_dir: &Path) -> SupervisorOptions {
    let env = TaskEnv {
        task_id: TaskId::new("t1"),
        task_key: "secret-key".into(),
        job_id: JobId::new("j1"),
        apiserver: "http://127.0.0.1:9".into(),
        ca_pem: None,
    };
    let tools = Tools { python: "python3".into(), fledge_bin: "/nonexistent/fledge".into() };
    let mut opts = SupervisorOptions::new(work_dir.to_owned(), env, tools);
    opts.heartbeat_interval = Duration::from_millis(50);
    opts.stop_grace = Duration::from_secs(5);
    opts.report_backoff = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(50),
        max_elapsed: Duration::from_secs(30),
    };
    opts
}

/// A role folder running `script` with sh.
fn sh_role(script: &str) -> Vec<u8> {
    zip_of(&[
        ("fledge-role.toml", "command = [\"sh\", \"run.sh\", \"{config}\"]\n"),
        ("run.sh", script),
    ])
}

async fn run(work: &Path, api: &Arc<FakeTaskApi>, stop: CancellationToken) -> Outcome {
    supervisor::run(&options(work), api.clone(), stop).await
}

#[tokio::test]
async fn completed_task_reports_running_then_completed_with_its_output() {
    let work = tempfile::tempdir().expect("tempdir");
    let script = r#"
test -f "$1" || { echo "no config at $1" >&2; exit 9; }
grep -q '"taskId": "t1"' "$1" || exit 8
grep -q '"apiserver": "http://127.0.0.1:9"' "$1" || exit 7
echo "hello from $FLEDGE_TASK_ID of $FLEDGE_JOB_ID key=$FLEDGE_TASK_KEY api=$FLEDGE_APISERVER no_color=$NO_COLOR"
echo "to stderr" >&2
"#;
    let api = Arc::new(FakeTaskApi::new(sh_role(script)));
    // The control plane restarts while the final state is being reported.
    api.unavailable_final_reports.store(3, Ordering::SeqCst);

    let outcome = run(work.path(), &api, CancellationToken::new()).await;

    assert_eq!(outcome.state, TaskState::Completed, "{}", outcome.log);
    assert!(outcome.reported);
    assert_eq!(api.states(), [TaskState::Running, TaskState::Completed]);
    let statuses = api.statuses.lock().expect("lock").clone();
    let log = &statuses[1].1;
    assert!(
        log.contains("hello from t1 of j1 key=secret-key api=http://127.0.0.1:9 no_color=1"),
        "{log}"
    );
    assert!(log.contains("to stderr"), "{log}");
    assert!(log.contains("exited with exit code 0"), "{log}");
    let file = std::fs::read_to_string(work.path().join(supervisor::LOG_FILE)).expect("log");
    assert!(file.contains("hello from t1") && file.contains("to stderr"), "{file}");
    let marker =
        std::fs::read_to_string(work.path().join(supervisor::REPORTED_MARKER)).expect("marker");
    assert_eq!(marker, "completed");
}

#[tokio::test]
async fn output_streams_while_the_task_runs_and_all_of_it_before_the_final_state() {
    let work = tempfile::tempdir().expect("tempdir");
    // 300 lines: more than the 200-line tail, written over a few stream intervals; the last
    // ones right before the exit, so only the final flush can carry them.
    let script = "i=0\nwhile [ $i -lt 300 ]; do echo \"line $i\"; i=$((i+1)); \
                  [ $((i % 60)) -eq 0 ] && sleep 0.1; done\n";
    let api = Arc::new(FakeTaskApi::new(sh_role(script)));
    let mut opts = options(work.path());
    opts.log_interval = Duration::from_millis(30);

    let outcome = supervisor::run(&opts, api.clone(), CancellationToken::new()).await;

    assert_eq!(outcome.state, TaskState::Completed, "{}", outcome.log);
    let streamed = api.streamed.lock().expect("lock").clone();
    let numbers: Vec<u64> = streamed.iter().map(|(n, _)| *n).collect();
    let expected: Vec<u64> = (0..streamed.len() as u64).collect();
    assert_eq!(numbers, expected, "numbered from 0, each once, in order");
    let lines: Vec<&str> = streamed.iter().map(|(_, l)| l.as_str()).collect();
    // The sandbox in force, then the command, then what the code wrote.
    assert!(lines[0].starts_with("[fledgelet] sandbox: "), "{lines:?}");
    assert!(lines[1].starts_with("[fledgelet] running"), "{lines:?}");
    let written: Vec<String> = (0..300).map(|i| format!("line {i}")).collect();
    assert_eq!(&lines[2..302], written.iter().map(String::as_str).collect::<Vec<_>>());
    // The fake refuses posts after the final state, so all of this came before it.
    assert!(lines.last().is_some_and(|l| l.contains("exited with exit code 0")), "{lines:?}");
}

#[tokio::test]
async fn failing_task_reports_failed_with_its_stderr_and_exit_status() {
    let work = tempfile::tempdir().expect("tempdir");
    let script = "echo working\necho 'boom: the data is missing' >&2\nexit 3\n";
    let api = Arc::new(FakeTaskApi::new(sh_role(script)));

    let outcome = run(work.path(), &api, CancellationToken::new()).await;

    assert_eq!(outcome.state, TaskState::Failed);
    assert_eq!(api.states().last(), Some(&TaskState::Failed));
    assert!(outcome.log.contains("boom: the data is missing"), "{}", outcome.log);
    assert!(outcome.log.contains("exit code 3"), "{}", outcome.log);
}

#[tokio::test]
async fn stop_terminates_the_child_group_and_reports_terminated() {
    let work = tempfile::tempdir().expect("tempdir");
    let script = "sleep 60 &\necho $! > child.pid\ntrap 'echo got TERM >&2; exit 0' TERM\necho started\nwhile :; do sleep 0.05; done\n";
    let api = Arc::new(FakeTaskApi::new(sh_role(script)));
    let stop = CancellationToken::new();
    let task = {
        let (api, stop, dir) = (api.clone(), stop.clone(), work.path().to_owned());
        tokio::spawn(async move { run(&dir, &api, stop).await })
    };
    let pid_file = work.path().join("code/child.pid");
    let grandchild: i32 = wait_for_file(&pid_file).await.trim().parse().expect("pid");
    api.wait_until("running", |api| api.states().contains(&TaskState::Running)).await;

    stop.cancel();
    let outcome = task.await.expect("join");

    assert_eq!(outcome.state, TaskState::Terminated, "{}", outcome.log);
    assert_eq!(api.states(), [TaskState::Running, TaskState::Terminated]);
    assert!(outcome.log.contains("stopped on request"), "{}", outcome.log);
    assert!(outcome.log.contains("got TERM"), "{}", outcome.log);
    crate::fakes::wait_dead(grandchild).await;
}

#[tokio::test]
async fn child_killed_by_signal_9_is_failed_and_heartbeats_flow_while_it_runs() {
    let work = tempfile::tempdir().expect("tempdir");
    let script = "echo $$ > self.pid\nwhile :; do sleep 0.05; done\n";
    let api = Arc::new(FakeTaskApi::new(sh_role(script)));
    let task = {
        let (api, dir) = (api.clone(), work.path().to_owned());
        tokio::spawn(async move { run(&dir, &api, CancellationToken::new()).await })
    };
    let pid: i32 =
        wait_for_file(&work.path().join("code/self.pid")).await.trim().parse().expect("pid");
    api.wait_until("a heartbeat", |api| api.heartbeats.load(Ordering::SeqCst) > 0).await;

    kill9(pid);
    let outcome = task.await.expect("join");

    assert_eq!(outcome.state, TaskState::Failed);
    assert!(outcome.log.contains("signal 9 (SIGKILL)"), "{}", outcome.log);
}

#[tokio::test]
async fn python_main_py_runs_with_the_config_path() {
    let work = tempfile::tempdir().expect("tempdir");
    let main = "import json, sys\ncfg = json.load(open(sys.argv[1]))\nprint('python role', cfg['role'], cfg['hyperparameters']['rounds'])\n";
    let api = Arc::new(FakeTaskApi::new(zip_of(&[("main.py", main)])));

    let outcome = run(work.path(), &api, CancellationToken::new()).await;

    assert_eq!(outcome.state, TaskState::Completed, "{}", outcome.log);
    assert!(outcome.log.contains("python role trainer 2"), "{}", outcome.log);
}

#[tokio::test]
async fn bad_bundles_fail_with_a_clear_message_and_run_nothing() {
    let cases: [(Vec<u8>, &str); 5] = [
        (zip_of(&[("fledge-role.toml", "command = [\"sh\"")]), "invalid fledge-role.toml"),
        (
            zip_of(&[("fledge-role.toml", "builtin = \"top-aggregator\"\n")]),
            "failed to start /nonexistent/fledge",
        ),
        (
            zip_of(&[("main.py", "print(1)"), ("../escape.py", "x")]),
            "unsafe path in code bundle: \"../escape.py\"",
        ),
        (zip_of(&[("README.md", "hi")]), "has no entrypoint"),
        (b"PK not really".to_vec(), "not a valid zip archive"),
    ];
    for (zip, expected) in cases {
        let work = tempfile::tempdir().expect("tempdir");
        let api = Arc::new(FakeTaskApi::new(zip));
        let outcome = run(work.path(), &api, CancellationToken::new()).await;
        assert_eq!(outcome.state, TaskState::Failed, "{expected}");
        assert!(outcome.log.contains(expected), "{expected}: {}", outcome.log);
        assert_eq!(api.states(), [TaskState::Failed], "{expected}");
        assert!(!work.path().join("escape.py").exists());
    }
}

fn event(kind: TaskEventKind, seq: u64) -> fledge_client::Result<TaskEvent> {
    Ok(TaskEvent { seq, job_id: "j1".into(), task_id: "t1".into(), kind: kind.into() })
}

fn events() -> (mpsc::Sender<fledge_client::Result<TaskEvent>>, TaskEvents) {
    let (tx, rx) = mpsc::channel(8);
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    (tx, stream.boxed())
}

#[tokio::test]
async fn fledgelet_waits_for_start_ignores_repeats_and_stops_on_stop() {
    let work = tempfile::tempdir().expect("tempdir");
    let script = "echo $$ > self.pid\nwhile :; do sleep 0.05; done\n";
    let api = Arc::new(FakeTaskApi::new(sh_role(script)));
    let (tx, rx) = events();
    let opts = options(work.path());
    let agent = {
        let api = api.clone();
        tokio::spawn(async move { fledgelet::run(&opts, api, rx, CancellationToken::new()).await })
    };
    // Nothing runs before START.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(api.states().is_empty());
    assert!(!work.path().join("code").exists());

    tx.send(event(TaskEventKind::Start, 1)).await.expect("send");
    tx.send(event(TaskEventKind::Start, 2)).await.expect("send");
    wait_for_file(&work.path().join("code/self.pid")).await;
    api.wait_until("running", |api| api.states().contains(&TaskState::Running)).await;
    tx.send(event(TaskEventKind::Stop, 3)).await.expect("send");

    let outcome = agent.await.expect("join");
    assert_eq!(outcome.state, TaskState::Terminated, "{}", outcome.log);
    assert_eq!(api.states(), [TaskState::Running, TaskState::Terminated]);
}

#[tokio::test]
async fn fledgelet_stop_before_start_and_shutdown_report_terminated_without_running() {
    let work = tempfile::tempdir().expect("tempdir");
    let api = Arc::new(FakeTaskApi::new(sh_role("echo ran > ran.txt\n")));
    let (tx, rx) = events();
    tx.send(event(TaskEventKind::Stop, 1)).await.expect("send");
    let outcome =
        fledgelet::run(&options(work.path()), api.clone(), rx, CancellationToken::new()).await;
    assert_eq!(outcome.state, TaskState::Terminated);
    assert!(outcome.log.contains("stopped before the task started"));
    assert!(!work.path().join("code").exists());

    let api = Arc::new(FakeTaskApi::new(sh_role("echo ran > ran.txt\n")));
    let (_tx, rx) = events();
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let outcome = fledgelet::run(&options(work.path()), api.clone(), rx, shutdown).await;
    assert_eq!(outcome.state, TaskState::Terminated);
    assert_eq!(api.states(), [TaskState::Terminated]);
    assert!(!work.path().join("code").exists());
}

#[tokio::test]
async fn fledgelet_whose_subscription_is_refused_fails_with_the_reason() {
    let work = tempfile::tempdir().expect("tempdir");
    let api = Arc::new(FakeTaskApi::new(sh_role("echo ran > ran.txt\n")));
    let (tx, rx) = events();
    tx.send(Err(fledge_client::Error::Notifier {
        endpoint: "http://127.0.0.1:10".into(),
        code: "Unauthenticated".into(),
        message: "unknown task or wrong key".into(),
    }))
    .await
    .expect("send");
    let outcome =
        fledgelet::run(&options(work.path()), api.clone(), rx, CancellationToken::new()).await;
    assert_eq!(outcome.state, TaskState::Failed);
    assert!(
        outcome.log.contains("cannot receive task events")
            && outcome.log.contains("unknown task or wrong key"),
        "{}",
        outcome.log
    );
    assert!(!work.path().join("code").exists());
}

#[tokio::test]
async fn participant_run_agent_beats_while_waiting_and_leaves_its_task_on_shutdown() {
    let work = tempfile::tempdir().expect("tempdir");
    let script = "echo $$ > self.pid\nwhile :; do sleep 0.05; done\n";
    let api = Arc::new(FakeTaskApi::new(sh_role(script)));
    let (tx, rx) = events();
    let mut opts = options(work.path());
    opts.participant_run = true;
    let shutdown = CancellationToken::new();
    let agent = {
        let (api, shutdown) = (api.clone(), shutdown.clone());
        tokio::spawn(async move { fledgelet::run(&opts, api, rx, shutdown).await })
    };
    // It beats before START, so that the controller knows its data owner joined.
    for _ in 0..600 {
        if api.heartbeats.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(api.heartbeats.load(Ordering::SeqCst) > 0);
    assert!(api.states().is_empty());

    tx.send(event(TaskEventKind::Start, 1)).await.expect("send");
    wait_for_file(&work.path().join("code/self.pid")).await;
    api.wait_until("running", |api| api.states().contains(&TaskState::Running)).await;
    // The data owner stops the agent: the code stops, the task stays running to be rejoined.
    shutdown.cancel();
    let outcome = agent.await.expect("join");
    assert_eq!(outcome.state, TaskState::Running, "{}", outcome.log);
    assert!(api.states().iter().all(|s| *s == TaskState::Running), "{:?}", api.states());
    let statuses = api.statuses.lock().expect("lock").clone();
    let (_, log) = statuses.last().expect("the leave is reported");
    assert!(log.contains("same task id and key to rejoin"), "{log}");
    let pid: i32 = std::fs::read_to_string(work.path().join("code/self.pid"))
        .expect("pid")
        .trim()
        .parse()
        .expect("pid number");
    assert!(!crate::fakes::alive(pid), "the task's code was stopped");

    // Before START, a shutdown leaves without any report.
    let api = Arc::new(FakeTaskApi::new(sh_role("echo ran > ran.txt\n")));
    let (_tx, rx) = events();
    let mut opts = options(work.path());
    opts.participant_run = true;
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let outcome = fledgelet::run(&opts, api.clone(), rx, shutdown).await;
    assert_eq!(outcome.state, TaskState::Ready);
    assert!(!outcome.reported && api.states().is_empty());
}
