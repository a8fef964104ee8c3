//! Component tests of the controller and the notifier: the real notifier on an ephemeral
//! loopback port, the real controller over a SQLite store, and in-process gRPC subscribers
//! standing in for a deployer (compute `default`) and for each task's agent.
//!
//! Task reports are written to the store and followed by a controller wake-up, exactly as the
//! apiserver does. Waits poll with a generous deadline; nothing asserts on timing.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;

use fledge_control::controller::{self, Controller, Endpoints};
use fledge_control::notifier;
use fledge_control::store::{BlobStore, SqliteStore, Store};
use fledge_proto::{
    ComputeSubscription, DeployEvent, DeployEventKind, NotifierClient, TaskEvent, TaskEventKind,
    TaskSubscription,
};
use fledge_types::{
    ComputeId, ComputeSpec, DatasetSpec, DesignId, DesignSpec, Job, JobId, JobSpec, JobState,
    Platform, Schema, Task, TaskId, TaskState, User, UserId,
};

const COMPUTE_KEY: &str = "compute-secret";
const DEADLINE: Duration = Duration::from_secs(30);

/// Everything a test drives.
struct Plane {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    notifier_url: String,
    notifier: notifier::Handle,
    controller: controller::Handle,
    controller_token: CancellationToken,
    controller_task: JoinHandle<anyhow::Result<()>>,
    /// The secret the controller derives task keys from (a restarted controller reloads it).
    keys_path: std::path::PathBuf,
    shutdown: CancellationToken,
    owner: UserId,
    design: DesignId,
    datasets: Vec<fledge_types::DatasetId>,
}

fn options(heartbeat_secs: f64, stop_grace_secs: f64) -> controller::Options {
    controller::Options {
        resync_interval_secs: 0.05,
        heartbeat_timeout_secs: heartbeat_secs,
        stop_grace_secs,
        queue_capacity: 64,
        ..controller::Options::default()
    }
}

fn endpoints(notifier_url: &str) -> Endpoints {
    Endpoints { apiserver: "http://127.0.0.1:1".to_owned(), notifier: notifier_url.to_owned() }
}

/// Registers a two-tier design (trainer + aggregator), two datasets and compute `default` for
/// `owner` (created unless it exists).
async fn seed(store: &dyn Store, owner: &UserId) -> (DesignId, Vec<fledge_types::DatasetId>) {
    match store.create_user(&User { id: owner.clone(), is_admin: false }).await {
        Ok(()) | Err(fledge_control::store::Error::AlreadyExists { .. }) => {}
        Err(err) => panic!("cannot create user: {err}"),
    }
    let design = DesignId::new("mnist");
    store
        .create_design(
            owner,
            &DesignSpec {
                id: design.clone(),
                name: "mnist".to_owned(),
                description: String::new(),
            },
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
    .expect("schema json");
    store.put_schema(Some(owner), &design, &schema).await.expect("schema");
    let mut datasets = Vec::new();
    for name in ["part-a", "part-b"] {
        let dataset = store
            .create_dataset(
                owner,
                &DatasetSpec {
                    name: name.to_owned(),
                    url: format!("file:///data/{name}"),
                    realm: "default".to_owned(),
                    ..DatasetSpec::default()
                },
            )
            .await
            .expect("dataset");
        datasets.push(dataset.id);
    }
    store
        .create_compute(&ComputeSpec {
            compute_id: ComputeId::new("default"),
            region: "default".to_owned(),
            api_key: COMPUTE_KEY.to_owned(),
            platform: Platform::Process,
        })
        .await
        .expect("compute");
    (design, datasets)
}

async fn plane(controller_options: controller::Options) -> Plane {
    let dir = tempfile::tempdir().expect("tempdir");
    let blobs = BlobStore::new(dir.path().join("blobs"), 1 << 20).expect("blob dir");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(dir.path().join("fledge.db"), blobs).await.expect("sqlite store"),
    );
    let owner = UserId::new("alice");
    let (design, datasets) = seed(store.as_ref(), &owner).await;
    let shutdown = CancellationToken::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let notifier_url = format!("http://{}", listener.local_addr().expect("addr"));
    let service = notifier::Options::default().build(store.clone()).expect("notifier");
    let notifier = service.handle();
    tokio::spawn(service.run(listener, shutdown.clone()));

    let controller_token = shutdown.child_token();
    let keys_path = dir.path().join("secrets/task-keys.secret");
    let built = Controller::build(
        controller_options,
        store.clone(),
        notifier.clone(),
        endpoints(&notifier_url),
        controller::TaskKeys::load_or_create(&keys_path).expect("task-key secret"),
    )
    .expect("controller");
    let controller = built.handle();
    let controller_task = tokio::spawn(built.run(controller_token.clone()));
    Plane {
        _dir: dir,
        store,
        notifier_url,
        notifier,
        controller,
        controller_token,
        controller_task,
        keys_path,
        shutdown,
        owner,
        design,
        datasets,
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Plane {
    /// The key the controller derives for `task` (deploy events carry none).
    fn key(&self, task: &str) -> String {
        controller::TaskKeys::load_or_create(&self.keys_path)
            .expect("task-key secret")
            .key(&TaskId::new(task))
    }

    async fn create_job(&self, max_run_time: u64) -> JobId {
        let spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "job",
            "designId": self.design,
            "maxRunTime": max_run_time,
            "dataSpec": [{"role": "trainer", "datasetGroups": {"default": self.datasets}}],
        }))
        .expect("job spec");
        let job = self.store.create_job(&self.owner, &spec, "1", "1").await.expect("create job");
        job.id
    }

    async fn set_job(&self, job: &JobId, from: &[JobState], to: JobState) {
        self.store.set_job_state(job, from, to, None).await.expect("job transition");
        self.controller.job_changed(job.clone());
    }

    /// What an agent's status report does through the apiserver.
    async fn report(&self, job: &JobId, task: &TaskId, state: TaskState) {
        self.store.set_task_state(job, task, state, Some("reported")).await.expect("task report");
        self.controller.job_changed(job.clone());
    }

    async fn job(&self, job: &JobId) -> Job {
        self.store.get_job(None, job).await.expect("job")
    }

    async fn tasks(&self, job: &JobId) -> Vec<Task> {
        self.store.list_tasks(job).await.expect("tasks")
    }

    async fn wait_job(&self, job: &JobId, state: JobState) -> Job {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let current = self.job(job).await;
            if current.state == state {
                return current;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job stayed {} (reason {:?}), expected {state}",
                current.state,
                current.reason
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Polls `probe` until it returns `Some`.
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn bearer<T>(message: T, secret: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {secret}")).expect("ascii"),
    );
    request
}

/// A subscriber that records every event it receives.
#[derive(Clone, Default)]
struct Recorder<E> {
    events: Arc<Mutex<Vec<E>>>,
}

impl<E: Clone> Recorder<E> {
    fn snapshot(&self) -> Vec<E> {
        self.events.lock().expect("recorder lock").clone()
    }
}

/// A notifier client: plain for `http://`, trusting exactly `ca` for `https://`.
async fn notifier_client(
    url: &str,
    ca: Option<&fledge_tls::Ca>,
) -> NotifierClient<tonic::transport::Channel> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned()).expect("url");
    if let Some(ca) = ca {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca.pem()));
        endpoint = endpoint.tls_config(tls).expect("tls config");
    }
    NotifierClient::new(endpoint.connect().await.expect("connect"))
}

async fn deployer(url: &str) -> Recorder<DeployEvent> {
    deployer_trusting(url, None).await
}

async fn deployer_trusting(url: &str, ca: Option<&fledge_tls::Ca>) -> Recorder<DeployEvent> {
    let mut client = notifier_client(url, ca).await;
    let mut stream = client
        .subscribe_compute(bearer(
            ComputeSubscription { compute_id: "default".to_owned() },
            COMPUTE_KEY,
        ))
        .await
        .expect("deployer subscribes")
        .into_inner();
    let recorder = Recorder::<DeployEvent>::default();
    let events = recorder.events.clone();
    tokio::spawn(async move {
        while let Ok(Some(event)) = stream.message().await {
            events.lock().expect("recorder lock").push(event);
        }
    });
    recorder
}

async fn agent(url: &str, job: &JobId, task: &TaskId, key: &str) -> Recorder<TaskEvent> {
    let mut client = NotifierClient::connect(url.to_owned()).await.expect("connect");
    let mut stream = client
        .subscribe_task(bearer(
            TaskSubscription { job_id: job.to_string(), task_id: task.to_string() },
            key,
        ))
        .await
        .expect("agent subscribes")
        .into_inner();
    let recorder = Recorder::<TaskEvent>::default();
    let events = recorder.events.clone();
    tokio::spawn(async move {
        while let Ok(Some(event)) = stream.message().await {
            events.lock().expect("recorder lock").push(event);
        }
    });
    recorder
}

fn kinds(events: &[TaskEvent]) -> Vec<TaskEventKind> {
    events.iter().map(|e| TaskEventKind::try_from(e.kind).expect("known kind")).collect()
}

fn deploy_kinds(events: &[DeployEvent]) -> Vec<DeployEventKind> {
    events.iter().map(|e| DeployEventKind::try_from(e.kind).expect("known kind")).collect()
}

/// Starts a job and waits for it to be deployed; returns the deployer and every task's agent.
async fn start_and_deploy(
    plane: &Plane,
    job: &JobId,
) -> (Recorder<DeployEvent>, BTreeMap<TaskId, Recorder<TaskEvent>>) {
    let deployer = deployer(&plane.notifier_url).await;
    plane.set_job(job, &[JobState::Ready], JobState::Starting).await;
    plane.wait_job(job, JobState::Deploying).await;

    let tasks = plane.tasks(job).await;
    assert_eq!(tasks.len(), 3, "two trainers and one aggregator: {tasks:?}");
    let deploy = eventually("a deploy event", || {
        let deployer = deployer.clone();
        async move { deployer.snapshot().into_iter().next() }
    })
    .await;
    assert_eq!(deploy.kind, DeployEventKind::Deploy as i32);
    assert_eq!(deploy.job_id, job.as_str());
    assert_eq!(deploy.notifier, plane.notifier_url);
    assert_eq!(deploy.apiserver, "http://127.0.0.1:1");
    let deployed: BTreeMap<String, (String, String)> = deploy
        .tasks
        .iter()
        .map(|t| (t.task_id.clone(), (plane.key(&t.task_id), t.role.clone())))
        .collect();
    let mut keys = BTreeMap::new();
    for task in &tasks {
        let (key, role) = &deployed[task.task_id.as_str()];
        assert_eq!(key.len(), 64, "32 bytes, hex");
        let hash = fledge_control::api::secret_hash(key);
        let found = plane.store.task_by_key(&task.task_id, &hash).await.expect("the key is valid");
        assert_eq!(found.task_id, task.task_id, "the deployed key opens its own task");
        assert_eq!(role, &task.role);
        keys.insert(task.task_id.clone(), key.clone());
    }
    assert_eq!(
        keys.values().collect::<std::collections::BTreeSet<_>>().len(),
        tasks.len(),
        "every task has its own key"
    );

    let mut agents = BTreeMap::new();
    for task in &tasks {
        let recorder = agent(&plane.notifier_url, job, &task.task_id, &keys[&task.task_id]).await;
        // The start event was published before the agent connected.
        eventually("a start event", || {
            let recorder = recorder.clone();
            async move { (kinds(&recorder.snapshot()) == [TaskEventKind::Start]).then_some(()) }
        })
        .await;
        agents.insert(task.task_id.clone(), recorder);
    }
    (deployer, agents)
}

async fn run_all(plane: &Plane, job: &JobId) {
    for task in plane.tasks(job).await {
        plane.report(job, &task.task_id, TaskState::Running).await;
    }
    plane.wait_job(job, JobState::Running).await;
}

async fn wait_revoke(deployer: &Recorder<DeployEvent>) {
    eventually("a revoke event", || {
        let deployer = deployer.clone();
        async move {
            deploy_kinds(&deployer.snapshot()).contains(&DeployEventKind::Revoke).then_some(())
        }
    })
    .await;
}

async fn wait_stop(agent: &Recorder<TaskEvent>) {
    eventually("a stop event", || {
        let agent = agent.clone();
        async move { kinds(&agent.snapshot()).contains(&TaskEventKind::Stop).then_some(()) }
    })
    .await;
}

#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn a_job_runs_from_start_to_completed() {
    let plane = plane(options(3600.0, 30.0)).await;
    let job = plane.create_job(0).await;
    let (deployer, agents) = start_and_deploy(&plane, &job).await;
    assert!(plane.notifier.is_compute_connected(&ComputeId::new("default")));
    run_all(&plane, &job).await;

    for task in plane.tasks(&job).await {
        plane.report(&job, &task.task_id, TaskState::Completed).await;
    }
    let done = plane.wait_job(&job, JobState::Completed).await;
    assert!(done.ended_at.is_some());
    wait_revoke(&deployer).await;
    assert_eq!(
        deploy_kinds(&deployer.snapshot()),
        [DeployEventKind::Deploy, DeployEventKind::Revoke]
    );
    // Nothing was left to stop.
    for agent in agents.values() {
        assert_eq!(kinds(&agent.snapshot()), [TaskEventKind::Start]);
    }
}

#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn a_user_stop_stops_revokes_and_terminates() {
    let plane = plane(options(3600.0, 30.0)).await;
    let job = plane.create_job(0).await;
    let (deployer, agents) = start_and_deploy(&plane, &job).await;
    run_all(&plane, &job).await;

    plane.set_job(&job, &[JobState::Running], JobState::Stopping).await;
    wait_revoke(&deployer).await;
    for (task, agent) in &agents {
        wait_stop(agent).await;
        plane.report(&job, task, TaskState::Terminated).await;
    }
    let job = plane.wait_job(&job, JobState::Terminated).await;
    assert_eq!(job.reason.as_deref(), Some("stopped by user"));
}

#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn max_run_time_stops_the_job_and_the_grace_terminates_stragglers() {
    let plane = plane(options(3600.0, 0.2)).await;
    let job = plane.create_job(1).await;
    let (deployer, agents) = start_and_deploy(&plane, &job).await;
    run_all(&plane, &job).await;

    // Nobody reports: the limit stops the job, the grace marks the tasks terminated.
    let ended = plane.wait_job(&job, JobState::Terminated).await;
    assert_eq!(ended.reason.as_deref(), Some("maxRunTime"));
    wait_revoke(&deployer).await;
    for agent in agents.values() {
        wait_stop(agent).await;
    }
    for task in plane.tasks(&job).await {
        assert_eq!(task.state, TaskState::Terminated, "{task:?}");
        assert!(task.log.contains("stop grace"), "{}", task.log);
    }
}

#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn a_role_whose_tasks_all_failed_fails_the_job() {
    let plane = plane(options(3600.0, 30.0)).await;
    let job = plane.create_job(0).await;
    let (deployer, agents) = start_and_deploy(&plane, &job).await;
    run_all(&plane, &job).await;

    let tasks = plane.tasks(&job).await;
    let trainers: Vec<&Task> = tasks.iter().filter(|t| t.role == "trainer").collect();
    let aggregator = tasks.iter().find(|t| t.role == "aggregator").expect("aggregator");
    plane.report(&job, &trainers[0].task_id, TaskState::Failed).await;
    // One trainer failing is not enough.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(plane.job(&job).await.state, JobState::Running);
    plane.report(&job, &trainers[1].task_id, TaskState::Failed).await;

    let failed = plane.wait_job(&job, JobState::Failed).await;
    assert_eq!(failed.reason.as_deref(), Some("all tasks of role trainer failed"));
    wait_revoke(&deployer).await;
    wait_stop(&agents[&aggregator.task_id]).await;
    let aggregator = plane.store.get_task(&job, &aggregator.task_id).await.expect("task");
    assert_eq!(aggregator.state, TaskState::Terminated);
}

#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn silent_agents_are_failed_as_lost() {
    let plane = plane(options(0.5, 30.0)).await;
    let job = plane.create_job(0).await;
    let (deployer, _agents) = start_and_deploy(&plane, &job).await;
    for task in plane.tasks(&job).await {
        plane.report(&job, &task.task_id, TaskState::Running).await;
    }
    // No heartbeats: every task is lost, so every role failed.
    let failed = plane.wait_job(&job, JobState::Failed).await;
    let reason = failed.reason.expect("a reason");
    assert!(reason.starts_with("all tasks of role"), "{reason}");
    wait_revoke(&deployer).await;
    let logs: Vec<String> = plane.tasks(&job).await.into_iter().map(|t| t.log).collect();
    assert!(logs.iter().any(|log| log.contains("agent lost")), "{logs:?}");
}

/// Whoever subscribes with the compute key gets the compute's recent events replayed: they
/// must carry no task key (the deployer claims each attempt's key over REST instead).
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn replayed_deploy_events_carry_no_task_key() {
    let plane = plane(options(3600.0, 30.0)).await;
    let job = plane.create_job(0).await;
    let (first, _agents) = start_and_deploy(&plane, &job).await;
    let keys: Vec<String> =
        plane.tasks(&job).await.iter().map(|t| plane.key(t.task_id.as_str())).collect();
    assert_eq!(keys.len(), 3);
    let replay = deployer(&plane.notifier_url).await;
    let replayed = eventually("the replay", || {
        let (first, replay) = (first.clone(), replay.clone());
        async move {
            let events = replay.snapshot();
            (!events.is_empty() && events.len() == first.snapshot().len()).then_some(events)
        }
    })
    .await;
    assert!(
        replayed.iter().any(|e| e.kind == DeployEventKind::Deploy as i32 && e.tasks.len() == 3),
        "the deploy event is replayed: {replayed:?}"
    );
    let encoded: Vec<u8> = replayed.iter().flat_map(prost::Message::encode_to_vec).collect();
    for key in &keys {
        let found = encoded.windows(key.len()).any(|w| w == key.as_bytes());
        assert!(!found, "a task key is in the replayed events");
    }
}

#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn a_restarted_controller_resumes_the_job() {
    let mut plane = plane(options(3600.0, 30.0)).await;
    let job = plane.create_job(0).await;
    let (deployer, _agents) = start_and_deploy(&plane, &job).await;
    let keys_before: BTreeMap<String, String> = deployer.snapshot()[0]
        .tasks
        .iter()
        .map(|t| (t.task_id.clone(), plane.key(&t.task_id)))
        .collect();

    // Stop the controller mid-job (deploying) and build a new one on the same store.
    plane.controller_token.cancel();
    (&mut plane.controller_task)
        .await
        .expect("controller joins")
        .expect("controller stops cleanly");
    let token = plane.shutdown.child_token();
    let built = Controller::build(
        options(3600.0, 30.0),
        plane.store.clone(),
        plane.notifier.clone(),
        endpoints(&plane.notifier_url),
        controller::TaskKeys::load_or_create(&plane.keys_path).expect("task-key secret"),
    )
    .expect("controller");
    plane.controller = built.handle();
    plane.controller_task = tokio::spawn(built.run(token.clone()));
    plane.controller_token = token;

    // The new controller re-sends the deploy event with the same tasks and keys (derived again
    // from the secret: the store holds none).
    let redeploy = eventually("a second deploy event", || {
        let deployer = deployer.clone();
        async move { deployer.snapshot().get(1).cloned() }
    })
    .await;
    assert_eq!(redeploy.kind, DeployEventKind::Deploy as i32);
    assert!(redeploy.seq > deployer.snapshot()[0].seq, "sequence numbers keep counting");
    for deployment in &redeploy.tasks {
        assert_eq!(plane.key(&deployment.task_id), keys_before[&deployment.task_id]);
    }
    assert_eq!(redeploy.tasks.len(), keys_before.len());

    run_all(&plane, &job).await;
    for task in plane.tasks(&job).await {
        plane.report(&job, &task.task_id, TaskState::Completed).await;
    }
    plane.wait_job(&job, JobState::Completed).await;
}

#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn a_job_that_cannot_expand_fails_with_the_problem_named() {
    let plane = plane(options(3600.0, 30.0)).await;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "job",
        "designId": plane.design,
        "dataSpec": [{"role": "trainer", "datasetGroups": {"default": ["no-such-dataset"]}}],
    }))
    .expect("job spec");
    let job = plane.store.create_job(&plane.owner, &spec, "1", "1").await.expect("create job").id;
    plane.set_job(&job, &[JobState::Ready], JobState::Starting).await;
    let failed = plane.wait_job(&job, JobState::Failed).await;
    let reason = failed.reason.expect("a reason");
    assert!(
        reason.starts_with("expansion failed") && reason.contains("no-such-dataset"),
        "{reason}"
    );
    assert!(plane.tasks(&job).await.is_empty());
}

#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn notifier_queues_before_connect_replays_on_reconnect_and_checks_keys() {
    let plane = plane(options(3600.0, 30.0)).await;
    let compute = ComputeId::new("default");
    let job = JobId::new("j-notify");
    let event = |kind| notifier::deploy_event(kind, &job, Vec::new(), "a", "n");
    plane.notifier.publish_deploy(&compute, event(DeployEventKind::Deploy));
    assert!(!plane.notifier.is_compute_connected(&compute));

    let first = deployer(&plane.notifier_url).await;
    eventually("the queued event", || {
        let first = first.clone();
        async move { (first.snapshot().len() == 1).then_some(()) }
    })
    .await;
    plane.notifier.publish_deploy(&compute, event(DeployEventKind::Revoke));
    eventually("the live event", || {
        let first = first.clone();
        async move { (first.snapshot().len() == 2).then_some(()) }
    })
    .await;

    // A reconnect replays both with the same sequence numbers; the client drops duplicates.
    let second = deployer(&plane.notifier_url).await;
    let replayed = eventually("the replay", || {
        let second = second.clone();
        async move {
            let events = second.snapshot();
            (events.len() == 2).then_some(events)
        }
    })
    .await;
    assert_eq!(replayed, first.snapshot());
    assert_eq!(replayed[1].seq, replayed[0].seq + 1, "consecutive per subscriber");
    assert!(plane.notifier.is_compute_connected(&compute));

    // Wrong or missing secrets are refused.
    let mut client = NotifierClient::connect(plane.notifier_url.clone()).await.expect("connect");
    let status = client
        .subscribe_compute(bearer(
            ComputeSubscription { compute_id: "default".to_owned() },
            "wrong",
        ))
        .await
        .expect_err("wrong key");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let status = client
        .subscribe_task(tonic::Request::new(TaskSubscription {
            job_id: String::new(),
            task_id: "t".to_owned(),
        }))
        .await
        .expect_err("no key");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(status.message().contains("authorization"), "{status:?}");
    let status = client
        .subscribe_task(bearer(
            TaskSubscription { job_id: String::new(), task_id: "no-such-task".to_owned() },
            "k",
        ))
        .await
        .expect_err("unknown task");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
}

/// `service::start` composes every service on ephemeral ports; a job started over REST runs to
/// completion with task reports made over REST with the task keys (the apiserver wakes the
/// controller), and shutdown is clean.
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn composed_services_run_a_job_over_rest() {
    use fledge_control::config::{Options, ServiceKind};
    use fledge_control::service;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = Options { data_dir: dir.path().to_owned(), ..Options::default() };
    options.apiserver.listen = "127.0.0.1:0".parse().expect("addr");
    options.notifier.listen = "127.0.0.1:0".parse().expect("addr");
    options.broker.listen = "127.0.0.1:0".parse().expect("addr");
    options.controller.resync_interval_secs = 0.05;
    assert_eq!(options.services, ServiceKind::ALL);

    let store = service::open_store(&options).await.expect("store");
    let shutdown = CancellationToken::new();
    let services = service::start(&options, store.clone(), &shutdown).await.expect("services");
    let api_addr = services.addrs.apiserver.expect("apiserver runs");
    let notifier_addr = services.addrs.notifier.expect("notifier runs");
    let broker_addr = services.addrs.broker.expect("broker runs");
    assert!(api_addr.port() != 0 && notifier_addr.port() != 0 && broker_addr.port() != 0);
    // TLS is the default: a CA was created in the data directory.
    assert_eq!(services.endpoints.apiserver, format!("https://{api_addr}"));
    assert_eq!(services.endpoints.notifier, format!("https://{notifier_addr}"));
    let ca = services.tls.as_ref().and_then(|tls| tls.ca.clone()).expect("a generated CA");
    assert!(dir.path().join("tls").join("ca.pem").is_file());
    // The embedded broker serves mqtts too, verified against the same CA (controlPlaneCa).
    assert_eq!(services.brokers[0].host, format!("mqtts://{broker_addr}"));
    assert_eq!(services.brokers[0].ca, None);

    let token = fledge_control::api::bootstrap_admin(store.as_ref()).await.expect("admin");
    let admin = UserId::new("admin");
    let (design, datasets) = seed(store.as_ref(), &admin).await;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "job",
        "designId": design,
        "dataSpec": [{"role": "trainer", "datasetGroups": {"default": datasets}}],
    }))
    .expect("job spec");
    let job = store.create_job(&admin, &spec, "1", "1").await.expect("job").id;
    let deployer = deployer_trusting(&services.endpoints.notifier, Some(&ca)).await;

    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(ca.client_config().expect("client config"))
        .build()
        .expect("http client");
    let api = format!("https://{api_addr}/api/v1");
    let job_state = || {
        let (http, api, token, job) = (http.clone(), api.clone(), token.clone(), job.clone());
        async move {
            let job: Job = http
                .get(format!("{api}/users/admin/jobs/{job}"))
                .bearer_auth(&token)
                .send()
                .await
                .expect("get job")
                .json()
                .await
                .expect("job json");
            job.state
        }
    };
    let started = http
        .put(format!("{api}/users/admin/jobs/{job}/status"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"state": "starting"}))
        .send()
        .await
        .expect("start job");
    assert!(started.status().is_success(), "{:?}", started.text().await);
    let deploy = eventually("a deploy event", || {
        let deployer = deployer.clone();
        async move { deployer.snapshot().into_iter().next() }
    })
    .await;
    assert_eq!(deploy.apiserver, services.endpoints.apiserver);
    let keys = claim_keys(&http, &api, &job, &deploy).await;

    // Each task's agent: fetch the config, report running, then completed.
    for state in ["running", "completed"] {
        for task in &deploy.tasks {
            if state == "running" {
                let config: serde_json::Value = http
                    .get(format!("{api}/tasks/{}/config", task.task_id))
                    .bearer_auth(&keys[&task.task_id])
                    .send()
                    .await
                    .expect("task config")
                    .json()
                    .await
                    .expect("config json");
                assert_eq!(config["brokers"][0]["host"], format!("mqtts://{broker_addr}"));
                // The role's own connections (metrics, metaserver) trust the same CA.
                assert_eq!(config["controlPlaneCa"], ca.pem());
            }
            let reported = http
                .put(format!("{api}/tasks/{}/status", task.task_id))
                .bearer_auth(&keys[&task.task_id])
                .json(&serde_json::json!({"state": state, "log": ""}))
                .send()
                .await
                .expect("report");
            assert!(reported.status().is_success(), "{:?}", reported.text().await);
        }
        let want = if state == "running" { JobState::Running } else { JobState::Completed };
        eventually("the job state", || async { (job_state().await == want).then_some(()) }).await;
    }
    wait_revoke(&deployer).await;

    shutdown.cancel();
    services.wait().await.expect("clean shutdown");
}

/// Connects to the MQTT broker at `addr` with `login` (none: anonymous), over TLS trusting
/// `ca` when given, and returns whether the broker acknowledged the CONNECT (a refused client
/// is disconnected without a CONNACK).
async fn broker_admits(
    addr: std::net::SocketAddr,
    ca: Option<&fledge_tls::Ca>,
    login: Option<(&str, &str)>,
) -> bool {
    let id = format!("probe-{:016x}", rand::random::<u64>());
    let mut options = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    if let Some((user, pass)) = login {
        options.set_credentials(user, pass);
    }
    let mut transport = fledge_channel::MqttConfig::new(addr.ip().to_string(), addr.port());
    transport.tls = ca.map(|ca| fledge_channel::MqttTls { ca: Some(ca.clone()) });
    transport.apply_transport(&mut options).expect("transport");
    let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
    let admitted = loop {
        match events.poll().await {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                break ack.code == rumqttc::ConnectReturnCode::Success;
            }
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    let _ = client.disconnect().await;
    admitted
}

/// A metaserver request carrying `task`'s id and `key` (none: no credentials).
fn as_task<T>(message: T, task: &str, key: Option<&str>) -> tonic::Request<T> {
    let mut request = match key {
        Some(key) => bearer(message, key),
        None => tonic::Request::new(message),
    };
    request
        .metadata_mut()
        .insert(fledge_proto::TASK_ID_METADATA, MetadataValue::try_from(task).expect("ascii"));
    request
}

/// The data plane's control points through the composed services: the embedded broker admits
/// only the login the apiserver put in a task's config, and only while its job is live; the
/// metaserver serves only a task with its key, for its own end in its own job.
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn broker_and_metaserver_admit_only_live_tasks_for_their_own_ends() {
    use fledge_control::config::Options;
    use fledge_control::service;
    use fledge_proto::v1::{EndKey, PeersRequest, RegisterRequest};

    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = Options { data_dir: dir.path().to_owned(), ..Options::default() };
    options.apiserver.listen = "127.0.0.1:0".parse().expect("addr");
    options.notifier.listen = "127.0.0.1:0".parse().expect("addr");
    options.broker.listen = "127.0.0.1:0".parse().expect("addr");
    options.metaserver.listen = "127.0.0.1:0".parse().expect("addr");
    options.controller.resync_interval_secs = 0.05;
    options.limits.metaserver_ends_per_job = 3;
    let store = service::open_store(&options).await.expect("store");
    let shutdown = CancellationToken::new();
    let services = service::start(&options, store.clone(), &shutdown).await.expect("services");
    let ca = services.tls.as_ref().and_then(|tls| tls.ca.clone()).expect("a generated CA");
    let api = format!("https://{}/api/v1", services.addrs.apiserver.expect("apiserver"));
    let broker = services.addrs.broker.expect("broker runs");
    let metaserver = format!("https://{}", services.addrs.metaserver.expect("metaserver runs"));

    let (job, deploy, _deployer) = start_a_trainer_job(&store, &services, &ca).await;
    assert!(deploy.tasks.len() >= 2, "two tasks at least: {:?}", deploy.tasks.len());
    let (a, b) = (&deploy.tasks[0], &deploy.tasks[1]);

    // The login is in the task's config, fetched with the task key.
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(ca.client_config().expect("client config"))
        .build()
        .expect("http client");
    let keys = claim_keys(&http, &api, &job, &deploy).await;
    let (a_key, b_key) = (keys[&a.task_id].clone(), keys[&b.task_id].clone());
    let config: serde_json::Value = http
        .get(format!("{api}/tasks/{}/config", a.task_id))
        .bearer_auth(&a_key)
        .send()
        .await
        .expect("task config")
        .json()
        .await
        .expect("config json");
    let user = config["brokers"][0]["username"].as_str().expect("a username").to_owned();
    let pass = config["brokers"][0]["password"].as_str().expect("a password").to_owned();
    assert_eq!(user, format!("{job}/{}", a.task_id));

    // Broker: no login, a made-up password, another task's name with this password: refused.
    let broker_tls = Some(&ca);
    assert!(!broker_admits(broker, broker_tls, None).await, "an anonymous client was admitted");
    assert!(
        !broker_admits(broker, broker_tls, Some((user.as_str(), "0".repeat(64).as_str()))).await
    );
    let b_user = format!("{job}/{}", b.task_id);
    assert!(
        !broker_admits(broker, broker_tls, Some((b_user.as_str(), pass.as_str()))).await,
        "a password works for one task"
    );
    // The broker speaks mqtts only: the right login over plain MQTT gets nowhere.
    assert!(
        !broker_admits(broker, None, Some((user.as_str(), pass.as_str()))).await,
        "a plain MQTT client was admitted by the TLS broker"
    );
    assert!(
        broker_admits(broker, broker_tls, Some((user.as_str(), pass.as_str()))).await,
        "the issued login is admitted"
    );

    // Metaserver: no key, a wrong key, someone else's end, another job: refused.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca.pem()));
    let channel = tonic::transport::Endpoint::from_shared(metaserver)
        .expect("metaserver url")
        .tls_config(tls)
        .expect("tls config")
        .connect()
        .await
        .expect("metaserver");
    let mut meta = fledge_proto::MetaserverClient::new(channel);
    let end = |task: &str, job: &str| EndKey {
        job_id: job.to_owned(),
        channel: "param".to_owned(),
        group: "default".to_owned(),
        end_id: task.to_owned(),
    };
    let register = |end: EndKey| RegisterRequest {
        end: Some(end),
        role: "trainer".to_owned(),
        endpoint: "http://127.0.0.1:9".to_owned(),
        props_json: "{}".to_owned(),
        lease_ms: 60_000,
        tls_ca: String::new(),
    };
    let peers = |job: &str| PeersRequest {
        job_id: job.to_owned(),
        channel: "param".to_owned(),
        group: "default".to_owned(),
        role: "trainer".to_owned(),
    };
    let (a_id, b_id, job_id) = (a.task_id.as_str(), b.task_id.as_str(), job.as_str());
    let status = meta.peers(tonic::Request::new(peers(job_id))).await.expect_err("no key");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("authorization"), "{status:?}");
    let status = meta.peers(as_task(peers(job_id), a_id, Some(&b_key))).await.expect_err("b's key");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let status = meta
        .register(as_task(register(end(b_id, job_id)), a_id, Some(&a_key)))
        .await
        .expect_err("someone else's end");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("its own end"), "{status:?}");
    let status = meta
        .register(as_task(register(end(a_id, "other-job")), a_id, Some(&a_key)))
        .await
        .expect_err("another job");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let status = meta
        .peers(as_task(peers("other-job"), a_id, Some(&a_key)))
        .await
        .expect_err("lookup in another job");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // Its own end, with its key: registered, listed to its job-mate, not deregistrable by it.
    meta.register(as_task(register(end(a_id, job_id)), a_id, Some(&a_key))).await.expect("own end");
    let listed = meta
        .peers(as_task(peers(job_id), b_id, Some(&b_key)))
        .await
        .expect("job-mate looks up")
        .into_inner()
        .peers;
    assert_eq!(listed.iter().map(|p| p.end_id.as_str()).collect::<Vec<_>>(), [a_id]);
    let status = meta
        .deregister(as_task(end(a_id, job_id), b_id, Some(&b_key)))
        .await
        .expect_err("deregistering someone else");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // A task may name any channel and group for its own end: the job's ends are bounded
    // (`limits.metaserver_ends_per_job`, 3 here), and the refusal names the setting.
    let in_group = |group: &str| EndKey { group: group.to_owned(), ..end(a_id, job_id) };
    for group in ["g1", "g2"] {
        meta.register(as_task(register(in_group(group)), a_id, Some(&a_key)))
            .await
            .expect("room in the job");
    }
    let status = meta
        .register(as_task(register(in_group("g3")), a_id, Some(&a_key)))
        .await
        .expect_err("a fourth end of the job");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("limits.metaserver_ends_per_job"), "{status:?}");

    // The job ends: its logins and keys stop working.
    store
        .set_job_state(
            &job,
            &[JobState::Starting, JobState::Deploying, JobState::Running],
            JobState::Failed,
            Some("ended by the test"),
        )
        .await
        .expect("end the job");
    assert!(
        !broker_admits(broker, broker_tls, Some((user.as_str(), pass.as_str()))).await,
        "an ended job's login works"
    );
    let status = meta
        .register(as_task(register(end(a_id, job_id)), a_id, Some(&a_key)))
        .await
        .expect_err("ended job");
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");

    shutdown.cancel();
    services.wait().await.expect("clean shutdown");
}

/// Seeds admin's design and datasets, creates and starts a job of trainers on `services`, and
/// returns it with the deploy event a deployer trusting `ca` gets for it, and that deployer
/// (kept connected as long as the caller holds it).
/// Claims each deployed task's key (attempt 0) over REST as the compute's deployer does:
/// deploy events carry none. Task id to key.
async fn claim_keys(
    http: &reqwest::Client,
    api: &str,
    job: &JobId,
    deploy: &DeployEvent,
) -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    for task in &deploy.tasks {
        let claimed: serde_json::Value = http
            .post(format!("{api}/computes/default/tasks/{}/key", task.task_id))
            .bearer_auth(COMPUTE_KEY)
            .json(&serde_json::json!({"jobId": job, "attempt": task.attempt}))
            .send()
            .await
            .expect("claim")
            .error_for_status()
            .expect("claim accepted")
            .json()
            .await
            .expect("claimed key json");
        let key = claimed["key"].as_str().expect("a key").to_owned();
        keys.insert(task.task_id.clone(), key);
    }
    keys
}

async fn start_a_trainer_job(
    store: &Arc<dyn Store>,
    services: &fledge_control::service::Services,
    ca: &fledge_tls::Ca,
) -> (JobId, DeployEvent, Recorder<DeployEvent>) {
    let admin = UserId::new("admin");
    let (design, datasets) = seed(store.as_ref(), &admin).await;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "job",
        "designId": design,
        "dataSpec": [{"role": "trainer", "datasetGroups": {"default": datasets}}],
    }))
    .expect("job spec");
    let job = store.create_job(&admin, &spec, "1", "1").await.expect("job").id;
    let deployer = deployer_trusting(&services.endpoints.notifier, Some(ca)).await;
    store.set_job_state(&job, &[JobState::Ready], JobState::Starting, None).await.expect("start");
    services.controller.job_changed(job.clone());
    let deploy = eventually("a deploy event", || {
        let deployer = deployer.clone();
        async move { deployer.snapshot().into_iter().next() }
    })
    .await;
    (job, deploy, deployer)
}

/// An MQTT client of the test: its event stream and what it has received so far.
struct MqttProbe {
    client: rumqttc::AsyncClient,
    events: rumqttc::EventLoop,
}

impl MqttProbe {
    /// Connects with `login` (over TLS trusting `ca` when given); `None` when the broker
    /// refuses it.
    async fn connect(
        addr: std::net::SocketAddr,
        ca: Option<&fledge_tls::Ca>,
        login: (&str, &str),
    ) -> Option<MqttProbe> {
        let id = format!("probe-{:016x}", rand::random::<u64>());
        let mut options = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_credentials(login.0, login.1);
        // Other tests' jobs on the shared broker may leave large retained messages.
        options.set_max_packet_size(64 << 20, 64 << 20);
        let mut transport = fledge_channel::MqttConfig::new(addr.ip().to_string(), addr.port());
        transport.tls = ca.map(|ca| fledge_channel::MqttTls { ca: Some(ca.clone()) });
        transport.apply_transport(&mut options).expect("transport");
        let (client, mut events) = rumqttc::AsyncClient::new(options, 100);
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))) => {
                    return (ack.code == rumqttc::ConnectReturnCode::Success)
                        .then_some(MqttProbe { client, events });
                }
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Subscribes to `filter`; returns whether the broker granted it.
    async fn subscribe(&mut self, filter: &str) -> bool {
        self.client.subscribe(filter, rumqttc::QoS::AtLeastOnce).await.expect("queue subscribe");
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack)) =
                self.events.poll().await.expect("connection stays up")
            {
                return ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_)));
            }
        }
    }

    /// Publishes at QoS 1 and waits for the broker's acknowledgement (Mosquitto acknowledges
    /// a publish its ACLs drop, too, and drops it silently).
    async fn publish(&mut self, topic: &str, payload: &str, retain: bool) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload.as_bytes().to_vec())
            .await
            .expect("queue publish");
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) =
                self.events.poll().await.expect("connection stays up")
            {
                return;
            }
        }
    }

    /// Every publish received until one with payload `marker`, as `(topic, payload)`.
    async fn received_until(&mut self, marker: &str) -> Vec<(String, String)> {
        let mut seen = Vec::new();
        loop {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) =
                self.events.poll().await.expect("connection stays up")
            {
                let payload = String::from_utf8_lossy(&p.payload).into_owned();
                if payload == marker {
                    return seen;
                }
                seen.push((p.topic, payload));
            }
        }
    }
}

/// Fledge provisions a real Mosquitto (its dynamic-security plugin; `scripts/test-all` starts
/// one and sets `FLEDGE_MOSQUITTO_AUTH_URL` and the admin login): no anonymous client, a task
/// login only while its job is live, and per-task ACLs that keep a task inside its job and off
/// other ends' presence. Then the same over TLS, on that Mosquitto's mqtts listener
/// (`FLEDGE_MOSQUITTO_AUTH_TLS_URL`) whose certificate comes from a CA of its own
/// (`FLEDGE_MOSQUITTO_AUTH_TLS_CA`, given as `broker.ca_file`): the provisioner's admin
/// connection and the tasks' verify it with that CA, and task configs carry it. One after the
/// other, in one test: two control planes on one Mosquitto delete each other's logins.
/// Skipped without that broker.
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn a_provisioned_mosquitto_admits_live_tasks_within_their_job_only() {
    let Ok(url) = std::env::var("FLEDGE_MOSQUITTO_AUTH_URL") else {
        eprintln!("FLEDGE_MOSQUITTO_AUTH_URL not set: skipping");
        return;
    };
    provisioned_mosquitto(url, None).await;
    let (Ok(url), Ok(ca)) = (
        std::env::var("FLEDGE_MOSQUITTO_AUTH_TLS_URL"),
        std::env::var("FLEDGE_MOSQUITTO_AUTH_TLS_CA"),
    ) else {
        eprintln!("FLEDGE_MOSQUITTO_AUTH_TLS_URL/_CA not set: skipping the TLS half");
        return;
    };
    provisioned_mosquitto(url, Some(std::path::PathBuf::from(ca))).await;
}

/// See `a_provisioned_mosquitto_admits_live_tasks_within_their_job_only`: Mosquitto at `url`
/// (`mqtt://` or `mqtts://` with its CA's file `ca_file`).
async fn provisioned_mosquitto(url: String, ca_file: Option<std::path::PathBuf>) {
    use fledge_control::config::{Options, ServiceKind};
    use fledge_control::service;

    let (Ok(admin_user), Ok(admin_password)) = (
        std::env::var("FLEDGE_MOSQUITTO_AUTH_ADMIN"),
        std::env::var("FLEDGE_MOSQUITTO_AUTH_ADMIN_PASSWORD"),
    ) else {
        eprintln!("FLEDGE_MOSQUITTO_AUTH_ADMIN/_ADMIN_PASSWORD not set: skipping");
        return;
    };
    let parsed = fledge_channel::MqttConfig::parse(&url).expect("a Mosquitto URL");
    let mosquitto: std::net::SocketAddr =
        format!("{}:{}", parsed.host, parsed.port).parse().expect("the URL is ip:port");
    let broker_ca = ca_file.as_ref().map(|path| fledge_tls::Ca::load(path).expect("its CA"));
    let broker_ca = broker_ca.as_ref();
    assert_eq!(parsed.tls.is_some(), broker_ca.is_some(), "mqtts:// goes with a CA file");
    // What task configs name: host:port for plain MQTT, the mqtts:// URL for TLS.
    let host = if broker_ca.is_some() {
        url.trim_end_matches('/').to_owned()
    } else {
        url.trim_start_matches("mqtt://").trim_end_matches('/').to_owned()
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = Options {
        data_dir: dir.path().to_owned(),
        services: vec![ServiceKind::Notifier, ServiceKind::Controller, ServiceKind::Apiserver],
        ..Options::default()
    };
    options.apiserver.listen = "127.0.0.1:0".parse().expect("addr");
    options.notifier.listen = "127.0.0.1:0".parse().expect("addr");
    options.broker.advertise = Some(host.clone());
    options.broker.ca_file = ca_file.clone();
    options.controller.resync_interval_secs = 0.05;
    options.mosquitto.admin_url = Some(url.clone());
    options.mosquitto.admin_username = admin_user.clone();
    options.mosquitto.admin_password = Some(admin_password.clone());
    options.mosquitto.sweep_interval_secs = 0.2;
    let store = service::open_store(&options).await.expect("store");
    let shutdown = CancellationToken::new();
    let services = service::start(&options, store.clone(), &shutdown).await.expect("services");
    let ca = services.tls.as_ref().and_then(|tls| tls.ca.clone()).expect("a generated CA");
    let api = format!("https://{}/api/v1", services.addrs.apiserver.expect("apiserver"));

    let (job, deploy, _deployer) = start_a_trainer_job(&store, &services, &ca).await;
    let tasks = store.list_tasks(&job).await.expect("tasks");
    let a = tasks.iter().find(|t| t.task_id.as_str() == deploy.tasks[0].task_id).expect("a");
    let b = tasks.iter().find(|t| t.task_id.as_str() == deploy.tasks[1].task_id).expect("b");

    // Fetching the config provisions the task's login on Mosquitto.
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(ca.client_config().expect("client config"))
        .build()
        .expect("http client");
    let keys = claim_keys(&http, &api, &job, &deploy).await;
    let config: serde_json::Value = http
        .get(format!("{api}/tasks/{}/config", a.task_id))
        .bearer_auth(&keys[&deploy.tasks[0].task_id])
        .send()
        .await
        .expect("task config")
        .json()
        .await
        .expect("config json");
    assert_eq!(config["brokers"][0]["host"], host);
    // An mqtts broker's own CA travels with it; the plain one has none.
    assert_eq!(config["brokers"][0]["ca"].as_str(), broker_ca.map(|ca| ca.pem()));
    let user = config["brokers"][0]["username"].as_str().expect("a username").to_owned();
    let pass = config["brokers"][0]["password"].as_str().expect("a password").to_owned();

    assert!(!broker_admits(mosquitto, broker_ca, None).await, "an anonymous client was admitted");
    assert!(
        !broker_admits(mosquitto, broker_ca, Some((user.as_str(), "guess"))).await,
        "a made-up password works"
    );
    let b_user = format!("{job}/{}", b.task_id);
    assert!(
        !broker_admits(mosquitto, broker_ca, Some((b_user.as_str(), pass.as_str()))).await,
        "an unprovisioned task"
    );

    let mut observer =
        MqttProbe::connect(mosquitto, broker_ca, (admin_user.as_str(), admin_password.as_str()))
            .await
            .expect("admin");
    assert!(observer.subscribe("fledge/#").await, "the admin observes every job");
    let mut task_a = MqttProbe::connect(mosquitto, broker_ca, (user.as_str(), pass.as_str()))
        .await
        .expect("a's login");
    let prefix = format!("fledge/{job}/param/default");
    assert!(task_a.subscribe(&format!("fledge/{job}/#")).await, "its own job");
    assert!(!task_a.subscribe("fledge/other-job/#").await, "another job's topics");
    assert!(!task_a.subscribe("#").await, "everything");
    // Into another job, onto b's presence (evict or impersonate), then a legitimate marker:
    // the observer sees only the marker's predecessors that the ACLs let through.
    task_a.publish("fledge/other-job/param/default/data/x", "foreign", false).await;
    task_a.publish(&format!("{prefix}/presence/{}/{}", b.role, b.task_id), "", true).await;
    task_a.publish(&format!("{prefix}/presence/{}/{}", a.role, a.task_id), "{}", false).await;
    task_a.publish(&format!("{prefix}/data/{}", b.task_id), "end", false).await;
    // (Retained messages other runs may have left on the broker are not this test's.)
    let seen: Vec<(String, String)> = observer
        .received_until("end")
        .await
        .into_iter()
        .filter(|(topic, _)| {
            topic.starts_with(&format!("fledge/{job}/")) || topic.starts_with("fledge/other-job/")
        })
        .collect();
    assert_eq!(
        seen,
        [(format!("{prefix}/presence/{}/{}", a.role, a.task_id), "{}".to_owned())],
        "only a's own presence passed"
    );

    // Another control plane (its own secret, an empty store) provisioning the same Mosquitto
    // sweeps it: this one's logins are not its to remove, and keep working.
    let mut admin = options.mosquitto.admin().expect("admin settings");
    admin.ca = broker_ca.cloned();
    let other = fledge_control::mosquitto::Provisioner::connect(
        &admin,
        fledge_control::broker_auth::BrokerCredentials::random(),
    )
    .expect("another provisioner");
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other_store = service::open_store(&Options {
        data_dir: other_dir.path().to_owned(),
        ..Options::default()
    })
    .await
    .expect("another store");
    assert!(other.task_clients().await.expect("list").is_empty(), "it sees none of ours");
    assert_eq!(other.sweep(other_store.as_ref()).await.expect("sweep"), 0);
    assert!(
        broker_admits(mosquitto, broker_ca, Some((user.as_str(), pass.as_str()))).await,
        "another control plane's sweep removed a live login"
    );

    // The job ends: the sweep deletes the login, and it stops working.
    store
        .set_job_state(
            &job,
            &[JobState::Starting, JobState::Deploying, JobState::Running],
            JobState::Failed,
            Some("ended by the test"),
        )
        .await
        .expect("end the job");
    eventually("the ended job's login to be refused", || {
        let (user, pass) = (user.clone(), pass.clone());
        async move {
            (!broker_admits(mosquitto, broker_ca, Some((user.as_str(), pass.as_str()))).await)
                .then_some(())
        }
    })
    .await;

    drop((task_a, observer));
    shutdown.cancel();
    services.wait().await.expect("clean shutdown");
}

/// A busy port fails `service::start` with the service and address named, before anything runs.
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn a_busy_port_is_reported_with_the_service_named() {
    use fledge_control::config::{Options, ServiceKind};
    use fledge_control::service;

    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("addr");
    let mut options = Options {
        data_dir: dir.path().to_owned(),
        services: vec![ServiceKind::Notifier, ServiceKind::Controller, ServiceKind::Apiserver],
        ..Options::default()
    };
    options.apiserver.listen = "127.0.0.1:0".parse().expect("addr");
    options.notifier.listen = busy;
    let store = service::open_store(&options).await.expect("store");
    let shutdown = CancellationToken::new();
    let err = service::start(&options, store, &shutdown).await.err().expect("port is busy");
    let message = format!("{err:#}");
    assert!(message.contains(&format!("cannot bind the notifier to {busy}")), "{message}");
}

/// A controller that died right after persisting a final state (before stopping and revoking)
/// is succeeded by one that finishes the cleanup: revoke, stop, tasks terminated.
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn a_restarted_controller_finishes_an_interrupted_ending() {
    let mut plane = plane(options(3600.0, 30.0)).await;
    let job = plane.create_job(0).await;
    let (deployer, agents) = start_and_deploy(&plane, &job).await;
    run_all(&plane, &job).await;

    plane.controller_token.cancel();
    (&mut plane.controller_task).await.expect("joins").expect("stops cleanly");
    // What the dead controller persisted last: the final state, nothing else.
    plane
        .store
        .set_job_state(&job, &[JobState::Running], JobState::Failed, Some("crash test"))
        .await
        .expect("final state");

    let built = Controller::build(
        options(3600.0, 30.0),
        plane.store.clone(),
        plane.notifier.clone(),
        endpoints(&plane.notifier_url),
        controller::TaskKeys::load_or_create(&plane.keys_path).expect("task-key secret"),
    )
    .expect("controller");
    plane.controller_task = tokio::spawn(built.run(plane.shutdown.child_token()));

    wait_revoke(&deployer).await;
    for agent in agents.values() {
        wait_stop(agent).await;
    }
    eventually("every task terminated", || async {
        plane.tasks(&job).await.iter().all(|t| t.state == TaskState::Terminated).then_some(())
    })
    .await;
    assert_eq!(plane.job(&job).await.reason.as_deref(), Some("crash test"));
}

/// A job whose compute never starts its workers fails after the deploy timeout, naming it.
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn a_job_without_a_working_deployer_fails_after_the_deploy_timeout() {
    let plane =
        plane(controller::Options { deploy_timeout_secs: 0.3, ..options(3600.0, 30.0) }).await;
    let job = plane.create_job(0).await;
    plane.set_job(&job, &[JobState::Ready], JobState::Starting).await;
    let failed = plane.wait_job(&job, JobState::Failed).await;
    let reason = failed.reason.expect("a reason");
    assert!(reason.contains("not started within 300ms") && reason.contains("default"), "{reason}");
    // The job's final state is persisted first, its tasks' right after.
    eventually("every task terminated", || async {
        plane.tasks(&job).await.iter().all(|t| t.state == TaskState::Terminated).then_some(())
    })
    .await;
}

/// A process without an apiserver serves its own `/metrics` (`metrics.listen`) over TLS with
/// the control plane's identity: the notifier's series are there, and plain text is refused on
/// a non-loopback address.
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn a_process_without_an_apiserver_serves_its_own_metrics_over_tls() {
    use fledge_control::config::{Options, ServiceKind};
    use fledge_control::service;

    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = Options {
        data_dir: dir.path().to_owned(),
        services: vec![ServiceKind::Notifier, ServiceKind::Controller],
        ..Options::default()
    };
    options.notifier.listen = "127.0.0.1:0".parse().expect("addr");
    options.metrics.listen = Some("127.0.0.1:0".parse().expect("addr"));
    let store = service::open_store(&options).await.expect("store");
    let shutdown = CancellationToken::new();
    let services = service::start(&options, store, &shutdown).await.expect("services");
    let addr = services.addrs.metrics.expect("the metrics listener is bound");
    assert_eq!(services.addrs.apiserver, None);

    fledge_tls::install_default_provider();
    let pem = std::fs::read(dir.path().join("tls").join("ca.pem")).expect("the generated CA");
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("pem"))
        .build()
        .expect("client");
    let response =
        http.get(format!("https://{addr}/metrics")).send().await.expect("metrics over TLS");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("body");
    for series in [
        "fledge_notifier_subscribers{kind=\"deploy\"} 0",
        "fledge_jobs{state=\"running\"} 0",
        "fledge_controller_reconcile_errors_total 0",
    ] {
        assert!(text.contains(series), "{series} missing from\n{text}");
    }
    assert!(!text.contains("fledge_apiserver_"), "no apiserver runs here:\n{text}");
    // Plain HTTP gets no metrics.
    let plain = reqwest::Client::new().get(format!("http://{addr}/metrics")).send().await;
    assert!(plain.map_or(true, |r| !r.status().is_success()), "plain text was served");
    shutdown.cancel();
    services.wait().await.expect("clean shutdown");

    // Plain text is refused off loopback: under --insecure, and for a deployer-only process.
    for (insecure, services) in
        [(true, vec![ServiceKind::Notifier]), (false, vec![ServiceKind::Deployer])]
    {
        let mut options =
            Options { data_dir: dir.path().to_owned(), services, ..Options::default() };
        options.tls.insecure = insecure;
        options.deployer.api_key = Some("k".to_owned());
        options.deployer.apiserver = Some("https://cp:10100".to_owned());
        options.deployer.notifier = Some("https://cp:10101".to_owned());
        options.metrics.listen = Some("0.0.0.0:9464".parse().expect("addr"));
        let err = options.validate().expect_err("plain text off loopback");
        assert!(err.to_string().contains("metrics.listen"), "{err}");
    }
}
