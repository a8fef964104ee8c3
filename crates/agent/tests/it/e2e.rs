//! End to end on loopback: the real apiserver, notifier and controller (in process, SQLite),
//! the real deployer (in process) and real `fledgelet` processes running a two-role job whose
//! code is a pair of shell scripts, from START to `completed`, also across a restart of the
//! control plane in the middle of the job.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use fledge_agent::deployer::DeployerOptions;
use fledge_control::config::{Listen, NotifierSection, Options, ServiceKind};
use fledge_control::controller;
use fledge_control::service::{self, Services};
use fledge_control::store::Store;
use fledge_types::{
    ComputeId, ComputeSpec, DatasetSpec, DesignId, DesignSpec, Job, JobId, JobSpec, JobState,
    Platform, Schema, Task, TaskState, User, UserId,
};

use crate::fakes::{DEADLINE, zip_of};

const COMPUTE_KEY: &str = "e2e-compute-key";

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn options(dir: &Path, apiserver: SocketAddr, notifier: SocketAddr) -> Options {
    Options {
        services: vec![ServiceKind::Notifier, ServiceKind::Controller, ServiceKind::Apiserver],
        data_dir: dir.join("data"),
        apiserver: Listen { listen: apiserver, advertise: None },
        notifier: NotifierSection { listen: notifier, advertise: None, mailbox_capacity: 256 },
        controller: controller::Options {
            resync_interval_secs: 0.2,
            ..controller::Options::default()
        },
        ..Options::default()
    }
}

/// A running control plane and the token that stops it.
struct Control {
    services: Services,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
}

impl Control {
    async fn start(dir: &Path, apiserver: SocketAddr, notifier: SocketAddr) -> Control {
        let options = options(dir, apiserver, notifier);
        let store = service::open_store(&options).await.expect("store");
        let shutdown = CancellationToken::new();
        let services =
            service::start(&options, store.clone(), &shutdown).await.expect("services start");
        Control { services, store, shutdown }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.services.wait().await.expect("services stop cleanly");
    }
}

/// Stores a user, a two-role design whose roles run `trainer_sh` / `aggregator_sh`, two
/// datasets, then creates and starts a job; returns its id.
async fn start_job(control: &Control, trainer_sh: &str, aggregator_sh: &str) -> JobId {
    let store = &control.store;
    let owner = UserId::new("alice");
    store.create_user(&User { id: owner.clone(), is_admin: false }).await.expect("user");
    let design = DesignId::new("e2e");
    store
        .create_design(
            &owner,
            &DesignSpec { id: design.clone(), name: "e2e".into(), description: String::new() },
        )
        .await
        .expect("design");
    let schema: Schema = serde_json::from_value(serde_json::json!({
        "name": "two tier",
        "roles": [
            {"name": "trainer", "isDataConsumer": true,
             "groupAssociation": [{"param-channel": "default"}]},
            {"name": "aggregator", "groupAssociation": [{"param-channel": "default"}]}
        ],
        "channels": [
            {"name": "param-channel", "pair": ["trainer", "aggregator"],
             "groupBy": {"type": "tag", "value": ["default"]},
             "funcTags": {"trainer": ["fetch", "upload"], "aggregator": ["distribute", "aggregate"]}}
        ]
    }))
    .expect("schema");
    let schema_version =
        store.put_schema(Some(&owner), &design, &schema).await.expect("put schema");
    let role_toml = "command = [\"sh\", \"run.sh\", \"{config}\"]\n";
    let code = zip_of(&[
        ("trainer/fledge-role.toml", role_toml),
        ("trainer/run.sh", trainer_sh),
        ("aggregator/fledge-role.toml", role_toml),
        ("aggregator/run.sh", aggregator_sh),
    ]);
    let code_meta = store.put_code(Some(&owner), &design, &code).await.expect("put code");
    let mut datasets = Vec::new();
    for name in ["part-a", "part-b"] {
        let dataset = store
            .create_dataset(
                &owner,
                &DatasetSpec {
                    name: name.into(),
                    url: format!("file:///data/{name}"),
                    realm: "default".into(),
                    ..DatasetSpec::default()
                },
            )
            .await
            .expect("dataset");
        datasets.push(dataset.id);
    }

    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "e2e",
        "designId": design,
        "dataSpec": [{"role": "trainer", "datasetGroups": {"default": datasets}}],
    }))
    .expect("job spec");
    let job =
        store.create_job(&owner, &spec, &schema_version, &code_meta.version).await.expect("job");
    store
        .set_job_state(&job.id, &[JobState::Ready], JobState::Starting, None)
        .await
        .expect("start");
    control.services.controller.job_changed(job.id.clone());
    job.id
}

/// Registers compute `default` (before its deployer subscribes, as `standalone` does).
async fn register_compute(control: &Control) {
    let store = &control.store;
    store
        .create_compute(&ComputeSpec {
            compute_id: ComputeId::new("default"),
            region: "default".into(),
            api_key: COMPUTE_KEY.into(),
            platform: Platform::Process,
        })
        .await
        .expect("compute");
}

/// Starts the deployer of compute `default` running the real fledgelet binary.
fn start_deployer(
    control: &Control,
    work_root: PathBuf,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<fledge_agent::deployer::Result<()>> {
    let mut opts = DeployerOptions::new(
        ComputeId::new("default"),
        COMPUTE_KEY,
        control.services.endpoints.apiserver.clone(),
        control.services.endpoints.notifier.clone(),
        work_root,
        env!("CARGO_BIN_EXE_fledgelet").into(),
    );
    opts.fledgelet_args = vec!["--heartbeat-interval".into(), "0.5".into()];
    // The control plane serves TLS with the CA it created: the deployer and every fledgelet
    // it starts trust exactly that CA.
    opts.ca_file = control.services.tls.as_ref().and_then(|tls| tls.ca_path.clone());
    assert!(control.services.endpoints.apiserver.starts_with("https://"));
    opts.reconnect = fledge_client::Reconnect {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    let deployer = opts.build().expect("deployer");
    tokio::spawn(deployer.run(shutdown))
}

/// Waits until `check` holds for the job's tasks (and returns them).
async fn wait_tasks(
    store: &dyn Store,
    job: &JobId,
    what: &str,
    check: impl Fn(&[Task]) -> bool,
) -> Vec<Task> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let tasks = store.list_tasks(job).await.expect("tasks");
        if !tasks.is_empty() && check(&tasks) {
            return tasks;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; tasks: {tasks:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_job_final(store: &dyn Store, job: &JobId, work_root: &Path) -> Job {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let current = store.get_job(None, job).await.expect("job");
        if current.state.is_final() {
            return current;
        }
        if tokio::time::Instant::now() > deadline {
            let tasks = store.list_tasks(job).await.expect("tasks");
            panic!(
                "job stuck in {} ({:?}); tasks: {tasks:#?}; worker logs:\n{}",
                current.state,
                current.reason,
                worker_logs(work_root)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every worker's own output (`fledgelet.log`), for failure messages.
fn worker_logs(work_root: &Path) -> String {
    let mut res = String::new();
    let Ok(jobs) = std::fs::read_dir(work_root) else {
        return format!("(no work root {})", work_root.display());
    };
    for job in jobs.flatten() {
        for task in std::fs::read_dir(job.path()).into_iter().flatten().flatten() {
            let log =
                std::fs::read_to_string(task.path().join("fledgelet.log")).unwrap_or_default();
            res.push_str(&format!("--- {}\n{log}\n", task.path().display()));
        }
    }
    res
}

const TRAINER_SH: &str =
    "grep -q '\"role\": \"trainer\"' \"$1\" || exit 5\necho \"trainer $FLEDGE_TASK_ID trained\"\n";
const AGGREGATOR_SH: &str = "grep -q '\"role\": \"aggregator\"' \"$1\" || exit 5\necho \"aggregator $FLEDGE_TASK_ID aggregated\"\n";

fn assert_completed_with_output(job: &Job, tasks: &[Task]) {
    assert_eq!(job.state, JobState::Completed, "{:?}; {tasks:#?}", job.reason);
    assert_eq!(tasks.len(), 3);
    for task in tasks {
        assert_eq!(task.state, TaskState::Completed, "{task:#?}");
        let expected = match task.role.as_str() {
            "trainer" => format!("trainer {} trained", task.task_id),
            _ => format!("aggregator {} aggregated", task.task_id),
        };
        assert!(task.log.contains(&expected), "{}", task.log);
        assert!(task.log.contains("exited with exit code 0"), "{}", task.log);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_through_deployer_and_fledgelets_to_completed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = Control::start(dir.path(), loopback(), loopback()).await;
    let shutdown = CancellationToken::new();
    register_compute(&control).await;
    let deployer = start_deployer(&control, dir.path().join("workers"), shutdown.clone());

    // The tasks wait for each other (as real roles do over their channels): the controller
    // may end a job whose finished roles are all done while another task has not started yet.
    let go = dir.path().join("go");
    let wait_go = format!("while [ ! -f '{}' ]; do sleep 0.05; done\n", go.display());
    let job = start_job(
        &control,
        &format!("{wait_go}{TRAINER_SH}"),
        &format!("{wait_go}{AGGREGATOR_SH}"),
    )
    .await;
    wait_tasks(control.store.as_ref(), &job, "all tasks running", |tasks| {
        tasks.iter().all(|t| t.state == TaskState::Running)
    })
    .await;
    std::fs::write(&go, "").expect("write go");
    let done = wait_job_final(control.store.as_ref(), &job, &dir.path().join("workers")).await;
    let tasks = control.store.list_tasks(&job).await.expect("tasks");
    assert_completed_with_output(&done, &tasks);

    shutdown.cancel();
    deployer.await.expect("join").expect("deployer stops cleanly");
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_states_reported_while_the_control_plane_restarts_are_not_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let go = dir.path().join("go");
    let control = Control::start(dir.path(), loopback(), loopback()).await;
    let (api_addr, notifier_addr) = (
        control.services.addrs.apiserver.expect("apiserver bound"),
        control.services.addrs.notifier.expect("notifier bound"),
    );
    let shutdown = CancellationToken::new();
    register_compute(&control).await;
    let deployer = start_deployer(&control, dir.path().join("workers"), shutdown.clone());

    // Every task waits for `go`, then leaves a mark and finishes.
    let wait_go =
        format!("while [ ! -f '{}' ]; do sleep 0.05; done\ntouch finished\n", go.display());
    let job = start_job(
        &control,
        &format!("{wait_go}{TRAINER_SH}"),
        &format!("{wait_go}{AGGREGATOR_SH}"),
    )
    .await;
    let tasks = wait_tasks(control.store.as_ref(), &job, "all tasks running", |tasks| {
        tasks.iter().all(|t| t.state == TaskState::Running)
    })
    .await;

    // The control plane goes away; the tasks finish while it is down.
    control.stop().await;
    std::fs::write(&go, "").expect("write go");
    for task in &tasks {
        let mark = dir
            .path()
            .join("workers")
            .join(job.as_str())
            .join(task.task_id.as_str())
            .join("code/finished");
        crate::fakes::wait_for_path(&mark).await;
    }

    // It comes back on the same addresses; the retried reports land and the job completes.
    let control = Control::start(dir.path(), api_addr, notifier_addr).await;
    let done = wait_job_final(control.store.as_ref(), &job, &dir.path().join("workers")).await;
    let tasks = control.store.list_tasks(&job).await.expect("tasks");
    assert_completed_with_output(&done, &tasks);

    shutdown.cancel();
    deployer.await.expect("join").expect("deployer stops cleanly");
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_fledgelet_fails_its_task_promptly_and_takes_its_child_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let go = dir.path().join("go");
    let control = Control::start(dir.path(), loopback(), loopback()).await;
    register_compute(&control).await;
    let shutdown = CancellationToken::new();
    let deployer = start_deployer(&control, dir.path().join("workers"), shutdown.clone());

    // Each task's code records its own pid and its fledgelet's, then waits for `go`.
    let wait_go = format!(
        "echo $$ > self.pid\necho $PPID > agent.pid\nwhile [ ! -f '{}' ]; do sleep 0.05; done\n",
        go.display()
    );
    let job = start_job(
        &control,
        &format!("{wait_go}{TRAINER_SH}"),
        &format!("{wait_go}{AGGREGATOR_SH}"),
    )
    .await;
    let tasks = wait_tasks(control.store.as_ref(), &job, "all tasks running", |tasks| {
        tasks.iter().all(|t| t.state == TaskState::Running)
    })
    .await;
    let victim = tasks.iter().find(|t| t.role == "trainer").expect("a trainer");
    let code_dir =
        dir.path().join("workers").join(job.as_str()).join(victim.task_id.as_str()).join("code");
    let agent: i32 =
        crate::fakes::wait_for_file(&code_dir.join("agent.pid")).await.trim().parse().expect("pid");
    let child: i32 =
        crate::fakes::wait_for_file(&code_dir.join("self.pid")).await.trim().parse().expect("pid");

    crate::fakes::kill9(agent);
    let tasks = wait_tasks(control.store.as_ref(), &job, "the victim failed", |tasks| {
        tasks.iter().any(|t| t.task_id == victim.task_id && t.state == TaskState::Failed)
    })
    .await;
    let failed = tasks.iter().find(|t| t.task_id == victim.task_id).expect("victim");
    assert!(
        failed.log.contains("worker exited with signal 9 (SIGKILL) before reporting"),
        "{}",
        failed.log
    );
    // The code died with its agent (parent-death signal), not orphaned.
    crate::fakes::wait_dead(child).await;

    // The others finish; one trainer completed is enough for the job.
    std::fs::write(&go, "").expect("write go");
    let done = wait_job_final(control.store.as_ref(), &job, &dir.path().join("workers")).await;
    assert_eq!(done.state, JobState::Completed, "{:?}", done.reason);

    shutdown.cancel();
    deployer.await.expect("join").expect("deployer stops cleanly");
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_stop_terminates_every_task_and_its_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = Control::start(dir.path(), loopback(), loopback()).await;
    register_compute(&control).await;
    let shutdown = CancellationToken::new();
    let deployer = start_deployer(&control, dir.path().join("workers"), shutdown.clone());

    // Code that never ends on its own.
    let forever = "echo $$ > self.pid\ntrap 'echo stopping on TERM; exit 0' TERM\nwhile :; do sleep 0.05; done\n";
    let job = start_job(&control, forever, forever).await;
    let tasks = wait_tasks(control.store.as_ref(), &job, "all tasks running", |tasks| {
        tasks.iter().all(|t| t.state == TaskState::Running)
    })
    .await;
    let mut pids = Vec::new();
    for task in &tasks {
        let pid_file = dir
            .path()
            .join("workers")
            .join(job.as_str())
            .join(task.task_id.as_str())
            .join("code/self.pid");
        let pid: i32 = crate::fakes::wait_for_file(&pid_file).await.trim().parse().expect("pid");
        pids.push(pid);
    }
    // Agents beat while their code runs (every 0.5 s here).
    wait_tasks(control.store.as_ref(), &job, "heartbeats from every agent", |tasks| {
        tasks.iter().all(|t| t.last_heartbeat.is_some())
    })
    .await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while control.store.get_job(None, &job).await.expect("job").state != JobState::Running {
        assert!(tokio::time::Instant::now() < deadline, "job never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    control
        .store
        .set_job_state(&job, &[JobState::Running], JobState::Stopping, None)
        .await
        .expect("stop");
    control.services.controller.job_changed(job.clone());

    let done = wait_job_final(control.store.as_ref(), &job, &dir.path().join("workers")).await;
    assert_eq!(done.state, JobState::Terminated, "{:?}", done.reason);
    let tasks = wait_tasks(control.store.as_ref(), &job, "all tasks final", |tasks| {
        tasks.iter().all(|t| t.state.is_final())
    })
    .await;
    for task in &tasks {
        assert_eq!(task.state, TaskState::Terminated, "{task:#?}");
        assert!(task.log.contains("stopping on TERM"), "{}", task.log);
    }
    for pid in pids {
        crate::fakes::wait_dead(pid).await;
    }

    shutdown.cancel();
    deployer.await.expect("join").expect("deployer stops cleanly");
    control.stop().await;
}
