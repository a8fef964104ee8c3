//! End to end on loopback: the real apiserver, notifier and controller (in process, SQLite),
//! the real deployer (in process) and real `fledgelet` processes running a two-role job whose
//! code is a pair of shell scripts, from START to `completed`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use fledge_agent::deployer::DeployerOptions;
use fledge_control::config::{Listen, NotifierSection, Options, ServiceKind};
use fledge_control::{controller, service};
use fledge_types::{
    ComputeId, ComputeSpec, DatasetSpec, DesignId, DesignSpec, JobSpec, JobState, Platform, Schema,
    TaskState, User, UserId,
};

use crate::fakes::{DEADLINE, zip_of};

const COMPUTE_KEY: &str = "e2e-compute-key";

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_through_deployer_and_fledgelets_to_completed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = Options {
        services: vec![ServiceKind::Notifier, ServiceKind::Controller, ServiceKind::Apiserver],
        data_dir: dir.path().join("data"),
        apiserver: Listen { listen: loopback(), advertise: None },
        notifier: NotifierSection { listen: loopback(), advertise: None, mailbox_capacity: 256 },
        controller: controller::Options {
            resync_interval_secs: 0.2,
            ..controller::Options::default()
        },
        ..Options::default()
    };
    let store = service::open_store(&options).await.expect("store");
    let shutdown = CancellationToken::new();
    let services =
        service::start(&options, store.clone(), &shutdown).await.expect("services start");

    // A user, a two-role design whose code is two shell scripts, two datasets, one compute.
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
        (
            "trainer/run.sh",
            "grep -q '\"role\": \"trainer\"' \"$1\" || exit 5\necho \"trainer $FLEDGE_TASK_ID trained\"\n",
        ),
        ("aggregator/fledge-role.toml", role_toml),
        (
            "aggregator/run.sh",
            "grep -q '\"role\": \"aggregator\"' \"$1\" || exit 5\necho \"aggregator $FLEDGE_TASK_ID aggregated\"\n",
        ),
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
    store
        .create_compute(&ComputeSpec {
            compute_id: ComputeId::new("default"),
            region: "default".into(),
            api_key: COMPUTE_KEY.into(),
            platform: Platform::Process,
        })
        .await
        .expect("compute");

    // The deployer of compute `default`, running the real fledgelet binary.
    let mut deployer_options = DeployerOptions::new(
        ComputeId::new("default"),
        COMPUTE_KEY,
        services.endpoints.apiserver.clone(),
        services.endpoints.notifier.clone(),
        dir.path().join("workers"),
        env!("CARGO_BIN_EXE_fledgelet").into(),
    );
    deployer_options.fledgelet_args = vec!["--heartbeat-interval".into(), "0.5".into()];
    let deployer = deployer_options.build().expect("deployer");
    let deployer_task = tokio::spawn(deployer.run(shutdown.child_token()));

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
    services.controller.job_changed(job.id.clone());

    let deadline = tokio::time::Instant::now() + DEADLINE;
    let done = loop {
        let current = store.get_job(None, &job.id).await.expect("job");
        if current.state.is_final() {
            break current;
        }
        if tokio::time::Instant::now() > deadline {
            let tasks = store.list_tasks(&job.id).await.expect("tasks");
            panic!("job stuck in {} ({:?}); tasks: {tasks:#?}", current.state, current.reason);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let tasks = store.list_tasks(&job.id).await.expect("tasks");
    assert_eq!(done.state, JobState::Completed, "{:?}; {tasks:#?}", done.reason);
    assert_eq!(tasks.len(), 3);
    for task in &tasks {
        assert_eq!(task.state, TaskState::Completed, "{task:#?}");
        let expected = match task.role.as_str() {
            "trainer" => format!("trainer {} trained", task.task_id),
            _ => format!("aggregator {} aggregated", task.task_id),
        };
        assert!(task.log.contains(&expected), "{}", task.log);
        assert!(task.log.contains("exited with exit code 0"), "{}", task.log);
    }

    shutdown.cancel();
    deployer_task.await.expect("join").expect("deployer stops cleanly");
    services.wait().await.expect("services stop cleanly");
}
