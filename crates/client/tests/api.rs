//! Every client against the real apiserver (temp-dir SQLite store, loopback port): the user
//! client's resource calls, the agent's task calls with a task key, the deployer's report with
//! a compute key, and how API errors arrive (decoded `ApiError` with details, 401, 404).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use fledge_client::{Client, ComputeClient, DeploymentState, TaskClient};
use fledge_control::api::{self, ApiState};
use fledge_control::controller;
use fledge_control::store::{BlobStore, NewTask, SqliteStore, Store};
use fledge_types::task_config::TaskEnv;
use fledge_types::{
    ComputeSpec, DataSpecEntry, DatasetSpec, DesignSpec, ErrorCode, JobSpec, JobState,
    MetricRecord, Platform, Schema, TaskState,
};

struct Server {
    base: String,
    store: Arc<dyn Store>,
    admin: Client,
    _dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let blobs = BlobStore::new(dir.path().join("blobs"), 1024 * 1024).unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.path().join("fledge.db"), blobs).await.unwrap());
    let (handle, _woken) = controller::Handle::channel(1);
    let state = ApiState::new(store.clone(), handle, None, TaskEnv::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(api::serve(listener, state, shutdown.clone()));
    let token = api::bootstrap_admin(store.as_ref()).await.unwrap();
    let admin = Client::new(&base, Some(&token)).unwrap();
    Server { base, store, admin, _dir: dir, shutdown }
}

fn schema() -> Schema {
    serde_json::from_value(serde_json::json!({
        "roles": [
            {"name": "trainer", "isDataConsumer": true},
            {"name": "aggregator", "groupAssociation": [{"param": "default"}]}
        ],
        "channels": [{"name": "param", "pair": ["trainer", "aggregator"],
                      "funcTags": {"trainer": ["fetch", "upload"], "aggregator": ["distribute", "aggregate"]}}]
    }))
    .unwrap()
}

fn zip(files: &[(&str, &str)]) -> Vec<u8> {
    let mut writer = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, text) in files {
        writer.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
        writer.write_all(text.as_bytes()).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_agent_and_deployer_calls_round_trip() {
    let server = start().await;
    let admin = &server.admin;
    server.admin.health().await.unwrap();
    assert!(admin.openapi().await.unwrap()["paths"].is_object());

    // A second user with their own token.
    admin.create_user(&"bob".into(), false).await.unwrap();
    let token = admin.create_token(&"bob".into()).await.unwrap();
    let bob = Client::new(&server.base, Some(&token)).unwrap();
    assert_eq!(bob.user().await.unwrap().as_str(), "bob");
    assert_eq!(admin.list_users().await.unwrap().len(), 2);

    // Design, schema and code revisions.
    let design =
        bob.create_design(&DesignSpec { id: "d1".into(), ..Default::default() }).await.unwrap();
    assert_eq!(design.owner.as_str(), "bob");
    assert_eq!(bob.create_schema(&design.id, &schema()).await.unwrap(), "1");
    let latest = bob.get_schema(&design.id).await.unwrap();
    assert_eq!(latest.version.as_deref(), Some("1"));
    assert_eq!(latest.schema, schema());
    assert_eq!(bob.get_schema_version(&design.id, "1").await.unwrap(), schema());
    let bundle = zip(&[("trainer/main.py", "print(1)"), ("aggregator/fledge-role.toml", "")]);
    let revision = bob.upload_code(&design.id, bundle.clone().into()).await.unwrap();
    assert_eq!((revision.version.as_str(), revision.size), ("1", bundle.len() as u64));
    let (version, bytes) = bob.get_code(&design.id).await.unwrap();
    assert_eq!((version.as_deref(), bytes.as_ref()), (Some("1"), bundle.as_slice()));
    assert_eq!(bob.get_code_version(&design.id, "1").await.unwrap().as_ref(), bundle.as_slice());
    assert_eq!(bob.list_designs().await.unwrap().len(), 1);

    // A dataset and a job over it.
    let dataset = bob
        .create_dataset(&DatasetSpec {
            name: "digits".into(),
            url: "file:///data/digits.csv".into(),
            realm: "default/eu".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(bob.get_dataset(&dataset.id).await.unwrap(), dataset);
    let spec = JobSpec {
        name: "j".into(),
        design_id: design.id.clone(),
        data_spec: vec![DataSpecEntry {
            role: "trainer".into(),
            dataset_groups: BTreeMap::from([("default".to_owned(), vec![dataset.id.clone()])]),
            participant_run: false,
        }],
        ..Default::default()
    };
    let plan = bob.plan_job(&spec).await.unwrap();
    assert_eq!(plan.len(), 2);
    let job = bob.create_job(&spec).await.unwrap();
    assert_eq!(job.state, JobState::Ready);
    assert_eq!(bob.update_job(&job.id, &spec).await.unwrap().id, job.id);
    assert_eq!(bob.list_jobs(Some(JobState::Ready)).await.unwrap().len(), 1);
    assert!(bob.list_jobs(Some(JobState::Running)).await.unwrap().is_empty());
    assert_eq!(bob.start_job(&job.id).await.unwrap().state, JobState::Starting);
    assert_eq!(bob.job_status(&job.id).await.unwrap().state, JobState::Starting);

    // Play the controller: store the expansion with one key per task.
    let tasks = bob.plan_job(&spec).await.unwrap();
    let new_tasks: Vec<NewTask> = tasks
        .iter()
        .map(|task| NewTask {
            task: fledge_types::Task { job_id: job.id.clone(), ..task.clone() },
            key_sha256: fledge_control::api::secret_hash(&format!("key-of-{}", task.task_id)),
        })
        .collect();
    server.store.insert_tasks(&new_tasks).await.unwrap();
    let trainer = new_tasks.iter().find(|t| t.task.role == "trainer").unwrap();

    // The agent's calls with the task key.
    let agent = TaskClient::new(
        &server.base,
        trainer.task.task_id.clone(),
        &format!("key-of-{}", trainer.task.task_id),
    )
    .unwrap();
    let config = agent.config().await.unwrap();
    assert_eq!((config.role.as_str(), &config.job.id), ("trainer", &job.id));
    assert_eq!(config.dataset.unwrap().url, "file:///data/digits.csv");
    let code = agent.code().await.unwrap();
    assert!(zip::ZipArchive::new(std::io::Cursor::new(code)).unwrap().by_name("main.py").is_ok());
    agent.set_status(TaskState::Running, "epoch 1").await.unwrap();
    agent.heartbeat().await.unwrap();
    let record = MetricRecord {
        task_id: trainer.task.task_id.clone(),
        role: "trainer".into(),
        round: 1,
        metrics: BTreeMap::from([("loss".to_owned(), 0.5)]),
        timestamp: None,
    };
    agent.post_metrics(std::slice::from_ref(&record)).await.unwrap();
    let seen = bob.get_task(&job.id, &trainer.task.task_id).await.unwrap();
    assert_eq!((seen.state, seen.log.as_str()), (TaskState::Running, "epoch 1"));
    assert!(seen.last_heartbeat.is_some());
    assert_eq!(bob.job_metrics(&job.id).await.unwrap()[0].metrics["loss"], 0.5);
    assert_eq!(bob.list_tasks(&job.id).await.unwrap().len(), 2);
    // A wrong key is refused as not found.
    let impostor = TaskClient::new(&server.base, trainer.task.task_id.clone(), "nope").unwrap();
    assert!(impostor.config().await.unwrap_err().status().is_some_and(|s| s == 401 || s == 404));

    // The deployer's report with the compute key marks the aggregator failed.
    let compute = admin
        .create_compute(&ComputeSpec {
            compute_id: seen.compute_id.clone(),
            region: "default".into(),
            api_key: "a-compute-key-0123456789".into(),
            platform: Platform::Process,
        })
        .await
        .unwrap();
    assert_eq!(admin.get_compute(&compute.compute_id).await.unwrap().region, "default");
    let aggregator = new_tasks.iter().find(|t| t.task.role == "aggregator").unwrap();
    let deployer = ComputeClient::new(
        &server.base,
        aggregator.task.compute_id.clone(),
        "a-compute-key-0123456789",
    )
    .unwrap();
    deployer
        .report_deployment(
            &job.id,
            &aggregator.task.task_id,
            0,
            DeploymentState::Failed,
            "no image",
        )
        .await
        .unwrap();
    let failed = bob.get_task(&job.id, &aggregator.task.task_id).await.unwrap();
    assert_eq!(failed.state, TaskState::Failed);
    assert!(failed.log.contains("no image"), "{}", failed.log);

    assert_eq!(bob.stop_job(&job.id).await.unwrap().state, JobState::Stopping);
    assert_eq!(admin.list_computes().await.unwrap().len(), 1);
    // A compute that hosts a job that has not ended cannot be removed.
    let err = admin.delete_compute(&compute.compute_id).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_the_api_error_and_name_the_endpoint() {
    let server = start().await;
    server.admin.create_design(&DesignSpec { id: "d".into(), ..Default::default() }).await.unwrap();

    // Validation: every problem with its path.
    let mut bad = schema();
    bad.channels[0].pair = vec!["trainer".into(), "ghost".into()];
    let err = server.admin.create_schema(&"d".into(), &bad).await.unwrap_err();
    let api = err.api_error().expect("an ApiError");
    assert_eq!((api.code, err.status()), (ErrorCode::BadRequest, Some(400)));
    assert!(api.details.iter().any(|d| d.path.starts_with("channels[0].pair")), "{api:?}");
    assert!(err.to_string().contains("channels[0].pair"), "{err}");

    // Unknown ids and duplicate ids.
    let err = server.admin.get_job(&"nope".into()).await.unwrap_err();
    assert!(err.is_not_found() && err.code() == Some(ErrorCode::NotFound), "{err}");
    let err = server
        .admin
        .create_design(&DesignSpec { id: "d".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");

    // No token, a wrong token.
    let anonymous = Client::new(&server.base, None).unwrap();
    let err = anonymous.list_designs().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthenticated), "{err}");
    let wrong = Client::new(&server.base, Some("wrong")).unwrap();
    assert_eq!(wrong.whoami().await.unwrap_err().status(), Some(401));

    // Nobody listening; a bad endpoint or secret is refused before any request.
    let nobody = Client::new("http://127.0.0.1:1", Some("t")).unwrap();
    let err = nobody.whoami().await.unwrap_err();
    assert!(matches!(err, fledge_client::Error::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("http://127.0.0.1:1"), "{err}");
    assert!(Client::new("ftp://x", None).is_err());
    assert!(Client::new(&server.base, Some("bad\ntoken")).is_err());
}
