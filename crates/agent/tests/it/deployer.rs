//! The deployer starting, watching and revoking real processes (a fake `fledgelet` script).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use fledge_agent::api::DeploymentState;
use fledge_agent::deployer::{DeployEvents, DeployerOptions};
use fledge_proto::{DeployEvent, DeployEventKind, TaskDeployment};
use fledge_types::ComputeId;

use crate::fakes::{FakeDeploymentApi, alive, kill9, wait_dead, wait_for_file};

/// Behaves by task id prefix: `ok*` reports (writes the marker) and exits 0, `broken*` exits 2
/// without reporting, anything else runs until killed.
const FAKE_FLEDGELET: &str = r#"#!/bin/sh
first="$1"
while [ $# -gt 0 ]; do
  case "$1" in
    --work-dir) wd="$2"; shift;;
    --task-id) tid="$2"; shift;;
    --apiserver) api="$2"; shift;;
  esac
  shift
done
echo "first=$first key=$FLEDGE_TASK_KEY api=$api bin=$FLEDGE_BIN" > "$wd/args"
echo $$ > "$wd/pid"
case "$tid" in
  ok*) echo completed > "$wd/final-state"; exit 0;;
  broken*) echo "fake fledgelet: cannot reach the apiserver" >&2; exit 2;;
  *) while :; do sleep 0.05; done;;
esac
"#;

struct Harness {
    root: tempfile::TempDir,
    api: Arc<FakeDeploymentApi>,
    events: mpsc::Sender<fledge_client::Result<DeployEvent>>,
    shutdown: CancellationToken,
    deployer: tokio::task::JoinHandle<fledge_agent::deployer::Result<()>>,
}

impl Harness {
    fn start(max_workers: usize) -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        let bin = root.path().join("fake-fledgelet");
        std::fs::write(&bin, FAKE_FLEDGELET).expect("write script");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Self::start_with(root, bin, max_workers)
    }

    fn start_with(root: tempfile::TempDir, bin: PathBuf, max_workers: usize) -> Self {
        let mut opts = DeployerOptions::new(
            ComputeId::new("c1"),
            "compute-key",
            "http://127.0.0.1:9",
            "http://127.0.0.1:10",
            root.path().join("work"),
            bin,
        );
        opts.max_workers = max_workers;
        opts.stop_grace = Duration::from_secs(5);
        opts.fledge_bin = Some("/opt/fledge".into());
        opts.fledgelet_prefix_args = vec!["fledgelet".into()];
        let api = Arc::new(FakeDeploymentApi::default());
        let deployer = opts.build_with(api.clone()).expect("valid options");
        let (events, rx) = mpsc::channel(16);
        let stream: DeployEvents =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|item| (item, rx)) },
            )
            .boxed();
        let shutdown = CancellationToken::new();
        let deployer = tokio::spawn(deployer.run_with_events(stream, shutdown.clone()));
        Self { root, api, events, shutdown, deployer }
    }

    async fn send(&self, kind: DeployEventKind, job: &str, tasks: &[&str]) {
        let event = DeployEvent {
            seq: 0,
            kind: kind.into(),
            job_id: job.into(),
            tasks: tasks
                .iter()
                .map(|t| TaskDeployment {
                    task_id: (*t).into(),
                    role: "trainer".into(),
                    attempt: 0,
                })
                .collect(),
            apiserver: String::new(),
            notifier: String::new(),
        };
        self.events.send(Ok(event)).await.expect("deployer listens");
    }

    fn work_dir(&self, job: &str, task: &str) -> PathBuf {
        self.root.path().join("work").join(job).join(task)
    }

    async fn pid(&self, job: &str, task: &str) -> i32 {
        pid_in(&self.work_dir(job, task)).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.deployer.await.expect("join").expect("deployer ends cleanly");
    }
}

async fn pid_in(dir: &Path) -> i32 {
    wait_for_file(&dir.join("pid")).await.trim().parse().expect("pid")
}

#[tokio::test]
async fn deploys_once_per_task_and_reports_a_worker_killed_before_reporting() {
    // One slot: `long1` starts only after the deployer handled `ok1`'s exit.
    let h = Harness::start(1);
    h.send(DeployEventKind::Deploy, "j1", &["ok1", "long1"]).await;
    h.send(DeployEventKind::Deploy, "j1", &["long1", "ok1"]).await;

    h.api.wait_for("long1", DeploymentState::Deployed).await;
    // `ok1` reported its final state itself (marker), so the deployer adds nothing.
    let ok1: Vec<_> = h.api.of("ok1").into_iter().map(|(s, _)| s).collect();
    assert_eq!(ok1, [DeploymentState::Deployed]);
    let args = wait_for_file(&h.work_dir("j1", "long1").join("args")).await;
    assert_eq!(
        args.trim(),
        "first=fledgelet key=key-of-long1 api=http://127.0.0.1:9 bin=/opt/fledge"
    );

    let pid = h.pid("j1", "long1").await;
    kill9(pid);
    let message = h.api.wait_for("long1", DeploymentState::Failed).await;
    assert!(
        message.starts_with("worker exited with signal 9 (SIGKILL) before reporting"),
        "{message}"
    );
    let long1: Vec<_> = h.api.of("long1").into_iter().map(|(s, _)| s).collect();
    assert_eq!(long1, [DeploymentState::Deployed, DeploymentState::Failed]);

    // Tasks that already ran are not deployed again by a repeated event; `marker` is handled
    // after the repeats, so once it is deployed the repeats were seen.
    h.send(DeployEventKind::Deploy, "j1", &["ok1", "long1"]).await;
    h.send(DeployEventKind::Deploy, "j1", &["marker"]).await;
    h.api.wait_for("marker", DeploymentState::Deployed).await;
    let deployed =
        |task| h.api.of(task).iter().filter(|(s, _)| *s == DeploymentState::Deployed).count();
    assert_eq!((deployed("ok1"), deployed("long1")), (1, 1));
    h.stop().await;
}

#[tokio::test]
async fn worker_exiting_without_reporting_is_failed_with_its_output() {
    let h = Harness::start(4);
    h.send(DeployEventKind::Deploy, "j1", &["broken1"]).await;
    let message = h.api.wait_for("broken1", DeploymentState::Failed).await;
    assert!(message.starts_with("worker exited with exit code 2 before reporting"), "{message}");
    assert!(message.contains("fake fledgelet: cannot reach the apiserver"), "{message}");
    h.stop().await;
}

#[tokio::test]
async fn revoke_kills_the_jobs_workers_and_drops_its_queued_tasks() {
    let h = Harness::start(1);
    h.send(DeployEventKind::Deploy, "j2", &["long-a", "long-b"]).await;
    h.send(DeployEventKind::Deploy, "j3", &["long-c"]).await;
    h.api.wait_for("long-a", DeploymentState::Deployed).await;
    let pid_a = h.pid("j2", "long-a").await;

    h.send(DeployEventKind::Revoke, "j2", &[]).await;
    assert_eq!(
        h.api.wait_for("long-b", DeploymentState::Revoked).await,
        "revoked before it started"
    );
    h.api.wait_for("long-a", DeploymentState::Revoked).await;
    wait_dead(pid_a).await;
    assert!(
        h.api
            .reports()
            .iter()
            .filter(|r| r.task.starts_with("long-a") || r.task.starts_with("long-b"))
            .all(|r| r.job == "j2")
    );
    assert!(h.api.of("long-b").iter().all(|(s, _)| *s != DeploymentState::Deployed));

    // The freed slot goes to the other job's queued task; revoking it by name works too.
    h.api.wait_for("long-c", DeploymentState::Deployed).await;
    let pid_c = h.pid("j3", "long-c").await;
    h.send(DeployEventKind::Revoke, "j3", &["long-c"]).await;
    h.api.wait_for("long-c", DeploymentState::Revoked).await;
    wait_dead(pid_c).await;
    assert!(h.api.reports().iter().all(|r| r.state != DeploymentState::Failed));
    h.stop().await;
}

#[tokio::test]
async fn shutdown_kills_every_worker() {
    let h = Harness::start(4);
    h.send(DeployEventKind::Deploy, "j1", &["long-x", "long-y"]).await;
    h.api.wait_for("long-x", DeploymentState::Deployed).await;
    h.api.wait_for("long-y", DeploymentState::Deployed).await;
    let pids = [h.pid("j1", "long-x").await, h.pid("j1", "long-y").await];
    assert!(pids.iter().all(|pid| alive(*pid)));
    h.stop().await;
    for pid in pids {
        assert!(!alive(pid), "worker {pid} outlived the deployer");
    }
}

#[tokio::test]
async fn unstartable_workers_and_bad_ids_are_reported_failed() {
    let root = tempfile::tempdir().expect("tempdir");
    let h = Harness::start_with(root, "/nonexistent/fledgelet".into(), 4);
    h.send(DeployEventKind::Deploy, "j1", &["t1"]).await;
    let message = h.api.wait_for("t1", DeploymentState::Failed).await;
    assert!(message.starts_with("failed to start /nonexistent/fledgelet"), "{message}");
    h.send(DeployEventKind::Deploy, "j1", &["../../etc"]).await;
    let message = h.api.wait_for("../../etc", DeploymentState::Failed).await;
    assert!(message.contains("may only contain"), "{message}");
    h.stop().await;
}

/// Deploy events carry no key: a worker whose attempt's key was claimed already (by anyone) is
/// not started, and is reported failed with the reason.
#[tokio::test]
async fn a_worker_whose_key_cannot_be_claimed_is_reported_failed() {
    let h = Harness::start(4);
    h.api.claims.lock().expect("lock").insert(("j1".into(), "long-k".into(), 0));
    h.send(DeployEventKind::Deploy, "j1", &["long-k"]).await;
    let message = h.api.wait_for("long-k", DeploymentState::Failed).await;
    assert!(message.starts_with("cannot claim the key of attempt 0"), "{message}");
    assert!(message.contains("claimed already"), "{message}");
    assert!(!h.work_dir("j1", "long-k").join("pid").exists(), "no worker started");
    h.stop().await;
}

#[test]
fn invalid_options_are_rejected_by_name() {
    let mut opts = DeployerOptions::new(
        ComputeId::new("c1"),
        "key",
        "http://127.0.0.1:9",
        "http://127.0.0.1:10",
        "/tmp/w".into(),
        "fledgelet".into(),
    );
    opts.max_workers = 0;
    let err = opts
        .build_with(Arc::new(FakeDeploymentApi::default()))
        .err()
        .expect("max_workers 0 is invalid");
    assert_eq!(err.to_string(), "invalid deployer option max_workers: must be at least 1");
}
