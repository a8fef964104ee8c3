//! The behavioural suite every [`Store`] implementation must pass.
//!
//! [`run`] takes a factory that returns a fresh, empty store for each case, so the cases are
//! independent; `sqlite.rs` and `postgres.rs` call it from their tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;

use fledge_types::{
    ComputeSpec, DataSpecEntry, DatasetSpec, DesignSpec, JobSpec, JobState, MetricRecord, Platform,
    Schema, Task, TaskId, TaskState, User, UserId,
};

use super::{BlobStore, Error, JobFilter, NewTask, Result, Store};

/// Runs every case against fresh stores from `factory` (blob limit 1024 bytes).
pub(crate) async fn run<S, F, Fut>(mut factory: F)
where
    S: Store,
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
{
    users_and_tokens(&factory().await).await;
    designs_schemas_and_code(&factory().await).await;
    datasets(&factory().await).await;
    computes(&factory().await).await;
    jobs(&factory().await).await;
    tasks(&factory().await).await;
    metrics(&factory().await).await;
    restarts(&factory().await).await;
    key_claims(&factory().await).await;
}

fn ann() -> UserId {
    UserId::new("ann")
}

fn bob() -> UserId {
    UserId::new("bob")
}

async fn with_users(store: &impl Store) {
    for id in [ann(), bob()] {
        store.create_user(&User { id, is_admin: false }).await.unwrap();
    }
}

fn job_spec(design: &str, datasets: &[&str]) -> JobSpec {
    JobSpec {
        name: "job".to_owned(),
        design_id: design.into(),
        data_spec: vec![DataSpecEntry {
            role: "trainer".to_owned(),
            dataset_groups: BTreeMap::from([(
                "g".to_owned(),
                datasets.iter().map(|d| (*d).into()).collect(),
            )]),
            participant_run: false,
        }],
        ..JobSpec::default()
    }
}

fn task(job: &fledge_types::JobId, id: &str, index: u32, managed: bool) -> NewTask {
    NewTask {
        task: Task {
            job_id: job.clone(),
            task_id: TaskId::new(id),
            role: "trainer".to_owned(),
            index,
            group_association: BTreeMap::from([("param".to_owned(), "g".to_owned())]),
            dataset_id: None,
            compute_id: "c1".into(),
            managed,
            state: TaskState::Ready,
            log: String::new(),
            updated_at: None,
            last_heartbeat: None,
            restarts: 0,
        },
        key_sha256: sha(&format!("key-{id}")),
    }
}

fn sha(text: &str) -> String {
    BlobStore::digest(text.as_bytes())
}

async fn users_and_tokens(store: &impl Store) {
    let admin = User { id: "root".into(), is_admin: true };
    store.create_user(&admin).await.unwrap();
    assert!(matches!(
        store.create_user(&admin).await,
        Err(Error::AlreadyExists { kind: "user", .. })
    ));
    with_users(store).await;
    assert_eq!(store.get_user(&"root".into()).await.unwrap(), admin);
    let ids: Vec<_> = store.list_users().await.unwrap().into_iter().map(|u| u.id.0).collect();
    assert_eq!(ids, ["ann", "bob", "root"]);
    assert!(matches!(
        store.get_user(&"nobody".into()).await,
        Err(Error::NotFound { kind: "user", .. })
    ));

    let t1 = store.add_token(&ann(), &sha("t1"), "laptop", None).await.unwrap();
    let t2 = store.add_token(&ann(), &sha("t2"), "", None).await.unwrap();
    assert_eq!((t1.user.as_str(), t1.description.as_str(), t1.expires_at), ("ann", "laptop", None));
    assert_ne!(t1.id, t2.id);
    assert_eq!(t1.id.len(), 16);
    assert_eq!(store.user_by_token(&sha("t2")).await.unwrap().id, ann());
    assert!(matches!(store.user_by_token(&sha("t3")).await, Err(Error::NotFound { .. })));
    // The same secret twice is refused (its hash is the key).
    assert!(matches!(
        store.add_token(&bob(), &sha("t1"), "", None).await,
        Err(Error::AlreadyExists { kind: "token", .. })
    ));
    // A token for a missing user fails and is not stored.
    assert!(matches!(
        store.add_token(&"nobody".into(), &sha("t4"), "", None).await,
        Err(Error::NotFound { kind: "user", .. })
    ));
    assert!(store.user_by_token(&sha("t4")).await.is_err());

    // Expiry: a token past its expiry is refused, one before it accepted; both are listed.
    let past = chrono::Utc::now() - chrono::Duration::seconds(1);
    let future = chrono::Utc::now() + chrono::Duration::hours(1);
    let old = store.add_token(&bob(), &sha("t5"), "old", Some(past)).await.unwrap();
    let fresh = store.add_token(&bob(), &sha("t6"), "fresh", Some(future)).await.unwrap();
    assert!(matches!(store.user_by_token(&sha("t5")).await, Err(Error::NotFound { .. })));
    assert_eq!(store.user_by_token(&sha("t6")).await.unwrap().id, bob());
    let listed = store.list_tokens(Some(&bob())).await.unwrap();
    assert_eq!(listed, [old.clone(), fresh.clone()]);
    assert!(fresh.expires_at.is_some_and(|t| (t - future).num_milliseconds().abs() < 1));
    assert_eq!(store.list_tokens(None).await.unwrap().len(), 4);

    // Revocation: only the owner's (or anyone's with `None`), and then the token is refused.
    assert!(matches!(
        store.revoke_token(Some(&ann()), &fresh.id).await,
        Err(Error::NotFound { kind: "token", .. })
    ));
    assert_eq!(store.user_by_token(&sha("t6")).await.unwrap().id, bob());
    store.revoke_token(Some(&bob()), &fresh.id).await.unwrap();
    assert!(matches!(store.user_by_token(&sha("t6")).await, Err(Error::NotFound { .. })));
    assert!(matches!(
        store.revoke_token(Some(&bob()), &fresh.id).await,
        Err(Error::NotFound { .. })
    ));
    store.revoke_token(None, &t1.id).await.unwrap();
    assert!(store.user_by_token(&sha("t1")).await.is_err());
    assert_eq!(store.list_tokens(Some(&ann())).await.unwrap(), [t2]);
}

async fn designs_schemas_and_code(store: &impl Store) {
    with_users(store).await;
    let spec = DesignSpec { id: "mnist".into(), name: String::new(), description: "d".to_owned() };
    let design = store.create_design(&ann(), &spec).await.unwrap();
    assert_eq!(design.name, "mnist", "name defaults to the id");
    assert!(matches!(
        store.create_design(&ann(), &spec).await,
        Err(Error::AlreadyExists { kind: "design", .. })
    ));
    // Design ids are per owner.
    store.create_design(&bob(), &spec).await.unwrap();
    assert!(matches!(
        store.get_design(Some(&bob()), &"only-ann".into()).await,
        Err(Error::NotFound { .. })
    ));
    store
        .create_design(&ann(), &DesignSpec { id: "only-ann".into(), ..DesignSpec::default() })
        .await
        .unwrap();
    assert!(matches!(
        store.get_design(Some(&bob()), &"only-ann".into()).await,
        Err(Error::NotFound { kind: "design", .. })
    ));
    assert_eq!(store.get_design(None, &"only-ann".into()).await.unwrap().owner, ann());
    assert_eq!(store.list_designs(Some(&ann())).await.unwrap().len(), 2);
    assert_eq!(store.list_designs(None).await.unwrap().len(), 3);

    let id = &"mnist".into();
    let mut schema = Schema::default();
    assert_eq!(store.put_schema(Some(&ann()), id, &schema).await.unwrap(), "1");
    schema.name = "second".to_owned();
    assert_eq!(store.put_schema(Some(&ann()), id, &schema).await.unwrap(), "2");
    assert!(matches!(
        store.put_schema(Some(&ann()), &"nope".into(), &schema).await,
        Err(Error::NotFound { kind: "design", .. })
    ));
    let (version, latest) = store.get_schema(Some(&ann()), id, None).await.unwrap();
    assert_eq!((version.as_str(), latest.name.as_str()), ("2", "second"));
    let (_, first) = store.get_schema(Some(&ann()), id, Some("1")).await.unwrap();
    assert_eq!(first.name, "");
    for bad in ["3", "0", "x"] {
        assert!(matches!(
            store.get_schema(Some(&ann()), id, Some(bad)).await,
            Err(Error::NotFound { kind: "schema", .. })
        ));
    }
    // Bob's design of the same id has no schema: revisions do not leak across owners.
    assert!(matches!(
        store.get_schema(Some(&bob()), id, None).await,
        Err(Error::NotFound { kind: "schema", .. })
    ));

    let meta = store.put_code(Some(&ann()), id, b"zipbytes").await.unwrap();
    assert_eq!(
        (meta.version.as_str(), meta.size, meta.sha256.as_str()),
        ("1", 8, sha("zipbytes").as_str())
    );
    // Too large: rejected and nothing recorded.
    let big = vec![0u8; 1025];
    assert!(matches!(
        store.put_code(Some(&ann()), id, &big).await,
        Err(Error::TooLarge { size: 1025, limit: 1024 })
    ));
    store.put_code(Some(&bob()), id, b"zipbytes").await.unwrap();
    let (meta2, bytes) = store.get_code(Some(&ann()), id, None).await.unwrap();
    assert_eq!((meta2, bytes.as_slice()), (meta.clone(), &b"zipbytes"[..]));
    assert!(matches!(
        store.get_code(Some(&ann()), id, Some("2")).await,
        Err(Error::NotFound { kind: "code", .. })
    ));
    let design = store.get_design(Some(&ann()), id).await.unwrap();
    assert_eq!(design.schema_versions, ["1", "2"]);
    assert_eq!(design.code_versions, ["1"]);

    // In use by a ready job: not deletable; deletable once the job is gone.
    let job = store.create_job(&ann(), &job_spec("mnist", &[]), "2", "1").await.unwrap();
    let err = store.delete_design(Some(&ann()), id).await.unwrap_err();
    assert!(
        matches!(&err, Error::InUse { reason, .. } if reason.contains(job.id.as_str())),
        "{err:?}"
    );
    assert_eq!(
        store.get_design(Some(&ann()), id).await.unwrap(),
        design,
        "failed delete changed nothing"
    );
    assert!(matches!(
        store.delete_design(Some(&bob()), &"only-ann".into()).await,
        Err(Error::NotFound { .. })
    ));
    store.delete_job(Some(&ann()), &job.id).await.unwrap();
    store.delete_design(Some(&ann()), id).await.unwrap();
    assert!(matches!(
        store.get_schema(Some(&ann()), id, None).await,
        Err(Error::NotFound { kind: "design", .. })
    ));
    // Bob's revision shares the blob, which must survive Ann's delete.
    let (_, bytes) = store.get_code(Some(&bob()), id, None).await.unwrap();
    assert_eq!(bytes, b"zipbytes");
}

async fn datasets(store: &impl Store) {
    with_users(store).await;
    let spec = DatasetSpec {
        name: "uk".to_owned(),
        url: "file:///data/uk.csv".to_owned(),
        realm: "default/eu/uk".to_owned(),
        ..DatasetSpec::default()
    };
    let own = store.create_dataset(&ann(), &spec).await.unwrap();
    assert_eq!(own.spec, spec);
    // Names need not be unique (Flame's examples register many "MNIST dataset"s): datasets
    // are told apart by id.
    let twin = store
        .create_dataset(
            &ann(),
            &DatasetSpec { url: "file:///data/uk2.csv".to_owned(), ..spec.clone() },
        )
        .await
        .unwrap();
    assert_ne!(twin.id, own.id);
    assert_eq!(twin.spec.name, own.spec.name);
    assert_eq!(store.get_dataset(Some(&ann()), &twin.id).await.unwrap(), twin);
    let public = store
        .create_dataset(&bob(), &DatasetSpec { is_public: true, ..spec.clone() })
        .await
        .unwrap();
    let private = store
        .create_dataset(&bob(), &DatasetSpec { name: "secret".to_owned(), ..spec.clone() })
        .await
        .unwrap();
    assert_eq!(store.get_dataset(Some(&ann()), &public.id).await.unwrap(), public);
    assert!(matches!(
        store.get_dataset(Some(&ann()), &private.id).await,
        Err(Error::NotFound { kind: "dataset", .. })
    ));
    let visible: Vec<_> =
        store.list_datasets(Some(&ann())).await.unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(visible, [own.id.clone(), twin.id.clone(), public.id.clone()]);
    assert_eq!(store.list_datasets(None).await.unwrap().len(), 4);
    // Public does not mean deletable by others.
    assert!(matches!(
        store.delete_dataset(Some(&ann()), &public.id).await,
        Err(Error::NotFound { .. })
    ));

    let job = store.create_job(&ann(), &job_spec("d", &[own.id.as_str()]), "1", "1").await.unwrap();
    assert!(matches!(
        store.delete_dataset(Some(&ann()), &own.id).await,
        Err(Error::InUse { kind: "dataset", .. })
    ));
    store.set_job_state(&job.id, &[JobState::Ready], JobState::Starting, None).await.unwrap();
    store.set_job_state(&job.id, &[JobState::Starting], JobState::Failed, Some("x")).await.unwrap();
    store.delete_dataset(Some(&ann()), &own.id).await.unwrap();
    assert!(store.get_dataset(None, &own.id).await.is_err());
}

async fn computes(store: &impl Store) {
    with_users(store).await;
    let spec = ComputeSpec {
        compute_id: "c1".into(),
        region: "default/eu".to_owned(),
        api_key: "secret".to_owned(),
        platform: Platform::Docker,
    };
    let compute = store.create_compute(&spec).await.unwrap();
    assert_eq!(compute.platform, Platform::Docker);
    assert!(matches!(
        store.create_compute(&spec).await,
        Err(Error::AlreadyExists { kind: "compute", .. })
    ));
    assert_eq!(store.get_compute(&"c1".into()).await.unwrap(), compute);
    assert_eq!(store.list_computes().await.unwrap(), vec![compute.clone()]);
    store.verify_compute_key(&"c1".into(), &sha("secret")).await.unwrap();
    assert!(matches!(
        store.verify_compute_key(&"c1".into(), &sha("wrong")).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        store.verify_compute_key(&"c2".into(), &sha("secret")).await,
        Err(Error::NotFound { .. })
    ));

    let job = store.create_job(&ann(), &job_spec("d", &[]), "1", "1").await.unwrap();
    store.insert_tasks(&[task(&job.id, "t1", 0, true)]).await.unwrap();
    // A compute in use can have its key replaced (a restarted standalone does so).
    store.set_compute_key(&"c1".into(), "rotated").await.unwrap();
    store.verify_compute_key(&"c1".into(), &sha("rotated")).await.unwrap();
    assert!(store.verify_compute_key(&"c1".into(), &sha("secret")).await.is_err());
    assert!(matches!(
        store.set_compute_key(&"c2".into(), "x").await,
        Err(Error::NotFound { kind: "compute", .. })
    ));
    assert!(matches!(
        store.delete_compute(&"c1".into()).await,
        Err(Error::InUse { kind: "compute", .. })
    ));
    store.delete_job(None, &job.id).await.unwrap();
    store.delete_compute(&"c1".into()).await.unwrap();
    assert!(matches!(store.delete_compute(&"c1".into()).await, Err(Error::NotFound { .. })));
}

async fn jobs(store: &impl Store) {
    with_users(store).await;
    let spec = job_spec("mnist", &["d1", "d2"]);
    let job = store.create_job(&ann(), &spec, "1", "1").await.unwrap();
    assert_eq!(job.state, JobState::Ready);
    assert_eq!(store.get_job(Some(&ann()), &job.id).await.unwrap(), job);
    assert!(matches!(
        store.get_job(Some(&bob()), &job.id).await,
        Err(Error::NotFound { kind: "job", .. })
    ));
    let other = store.create_job(&bob(), &spec, "1", "1").await.unwrap();
    let list = |owner: Option<UserId>, states: Vec<JobState>| {
        let filter = JobFilter { owner, states };
        async move {
            store.list_jobs(&filter).await.unwrap().into_iter().map(|j| j.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(list(Some(ann()), vec![]).await, vec![job.id.clone()]);
    assert_eq!(list(None, vec![]).await, [job.id.clone(), other.id.clone()]);

    // Paths given to the CLI are never stored.
    let mut with_paths = spec.clone();
    with_paths.name = "renamed".to_owned();
    with_paths.data_spec_path = Some("dataSpec.json".to_owned());
    let updated =
        store.update_job_spec(Some(&ann()), &job.id, &with_paths, "2", "3").await.unwrap();
    assert_eq!(updated.spec.name, "renamed");
    assert_eq!(updated.spec.data_spec_path, None);
    assert_eq!((updated.schema_version.as_str(), updated.code_version.as_str()), ("2", "3"));
    assert!(matches!(
        store.update_job_spec(Some(&bob()), &job.id, &spec, "1", "1").await,
        Err(Error::NotFound { .. })
    ));

    // Compare-and-set.
    let started =
        store.set_job_state(&job.id, &[JobState::Ready], JobState::Starting, None).await.unwrap();
    assert_eq!(started.state, JobState::Starting);
    assert!(started.started_at.is_some() && started.ended_at.is_none());
    let err = store
        .set_job_state(&job.id, &[JobState::Ready], JobState::Starting, None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Conflict { expected, actual, .. } if expected == "ready" && actual == "starting"),
        "{err:?}"
    );
    assert!(matches!(
        store.set_job_state(&"nope".into(), &[JobState::Ready], JobState::Starting, None).await,
        Err(Error::NotFound { .. })
    ));
    // A reason without a state change keeps `updated_at`; another state is a conflict.
    store.set_job_reason(&job.id, JobState::Starting, "waiting for owners").await.unwrap();
    let noted = store.get_job(None, &job.id).await.unwrap();
    assert_eq!(noted.reason.as_deref(), Some("waiting for owners"));
    assert_eq!((noted.state, noted.updated_at), (started.state, started.updated_at));
    assert!(matches!(
        store.set_job_reason(&job.id, JobState::Running, "x").await,
        Err(Error::Conflict { .. })
    ));
    assert!(matches!(
        store.set_job_reason(&"nope".into(), JobState::Running, "x").await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(list(None, vec![JobState::Starting]).await, vec![job.id.clone()]);
    assert_eq!(list(None, vec![JobState::Ready, JobState::Starting]).await.len(), 2);

    // Not ready: no spec change, no delete, and nothing changed.
    let before = store.get_job(None, &job.id).await.unwrap();
    assert!(matches!(
        store.update_job_spec(None, &job.id, &spec, "1", "1").await,
        Err(Error::Conflict { .. })
    ));
    assert!(matches!(store.delete_job(None, &job.id).await, Err(Error::Conflict { .. })));
    assert_eq!(store.get_job(None, &job.id).await.unwrap(), before);

    let stopping = store
        .set_job_state(
            &job.id,
            &[JobState::Starting, JobState::Deploying, JobState::Running],
            JobState::Stopping,
            None,
        )
        .await
        .unwrap();
    assert_eq!(stopping.state, JobState::Stopping);
    let ended = store
        .set_job_state(
            &job.id,
            &[JobState::Stopping],
            JobState::Terminated,
            Some("stopped by the user"),
        )
        .await
        .unwrap();
    assert!(ended.ended_at.is_some());
    assert_eq!(ended.reason.as_deref(), Some("stopped by the user"));
    assert_eq!(ended.started_at, started.started_at);

    store.insert_tasks(&[task(&job.id, "t1", 0, true)]).await.unwrap();
    store.delete_job(Some(&ann()), &job.id).await.unwrap();
    assert!(matches!(store.get_job(None, &job.id).await, Err(Error::NotFound { .. })));
    assert!(matches!(store.get_task(&job.id, &"t1".into()).await, Err(Error::NotFound { .. })));
    assert!(matches!(store.delete_job(None, &job.id).await, Err(Error::NotFound { .. })));
}

async fn tasks(store: &impl Store) {
    with_users(store).await;
    let job = store.create_job(&ann(), &job_spec("d", &[]), "1", "1").await.unwrap();
    let batch = vec![
        task(&job.id, "tz", 0, true),
        task(&job.id, "ta", 1, true),
        task(&job.id, "tp", 2, false),
    ];
    store.insert_tasks(&batch).await.unwrap();
    store.insert_tasks(&batch).await.unwrap();
    let ids: Vec<_> =
        store.list_tasks(&job.id).await.unwrap().into_iter().map(|t| t.task_id.0).collect();
    assert_eq!(ids, ["tz", "ta", "tp"], "expansion order, no duplicates");
    assert_eq!(store.count_tasks(&job.id).await.unwrap(), HashMap::from([(TaskState::Ready, 3)]));
    let counts = store.state_counts().await.unwrap();
    assert_eq!(counts.tasks.get(&TaskState::Ready), Some(&3), "{counts:?}");
    assert_eq!(
        counts.jobs.values().sum::<u64>(),
        store.list_jobs(&JobFilter::default()).await.unwrap().len() as u64
    );
    assert!(matches!(store.count_tasks(&"nope".into()).await, Err(Error::NotFound { .. })));
    assert!(matches!(
        store.list_tasks(&"nope".into()).await,
        Err(Error::NotFound { kind: "job", .. })
    ));

    // A batch with one bad task inserts nothing.
    let other = store.create_job(&ann(), &job_spec("d", &[]), "1", "1").await.unwrap();
    let bad = vec![task(&other.id, "o1", 0, true), task(&"nope".into(), "o2", 1, true)];
    assert!(store.insert_tasks(&bad).await.is_err());
    assert!(store.list_tasks(&other.id).await.unwrap().is_empty());

    let found = store.task_by_key(&"ta".into(), &sha("key-ta")).await.unwrap();
    assert_eq!(found.task_id.as_str(), "ta");
    assert!(matches!(
        store.task_by_key(&"ta".into(), &sha("key-tz")).await,
        Err(Error::NotFound { .. })
    ));

    let running = store
        .set_task_state(&job.id, &"ta".into(), TaskState::Running, Some("started"))
        .await
        .unwrap();
    assert_eq!((running.state, running.log.as_str()), (TaskState::Running, "started"));
    let done =
        store.set_task_state(&job.id, &"ta".into(), TaskState::Completed, None).await.unwrap();
    assert_eq!(done.log, "started", "no log keeps the old one");
    assert!(matches!(
        store.set_task_state(&job.id, &"ta".into(), TaskState::Running, Some("again")).await,
        Err(Error::Conflict { .. })
    ));
    assert_eq!(store.get_task(&job.id, &"ta".into()).await.unwrap(), done);
    assert_eq!(
        store.count_tasks(&job.id).await.unwrap(),
        HashMap::from([(TaskState::Ready, 2), (TaskState::Completed, 1)])
    );
    assert!(matches!(
        store.set_task_state(&other.id, &"ta".into(), TaskState::Failed, None).await,
        Err(Error::NotFound { .. })
    ));

    assert!(done.last_heartbeat.is_none());
    store.record_heartbeat(&"ta".into()).await.unwrap();
    let beat = store.get_task(&job.id, &"ta".into()).await.unwrap();
    assert!(beat.last_heartbeat.is_some());
    assert!(matches!(store.record_heartbeat(&"nope".into()).await, Err(Error::NotFound { .. })));

    // A participant-run task takes only the key minted for it: never its platform key, never
    // a key it is first presented with.
    assert!(store.task_by_key(&"tp".into(), &sha("key-tp")).await.is_err());
    assert!(store.task_by_key(&"tp".into(), &sha("mine")).await.is_err());
    assert!(store.participant_keys(&job.id).await.unwrap().is_empty());
    store.set_participant_key(&job.id, &"tp".into(), Some(&sha("mine"))).await.unwrap();
    assert_eq!(store.task_by_key(&"tp".into(), &sha("mine")).await.unwrap().task_id.as_str(), "tp");
    assert!(store.task_by_key(&"tp".into(), &sha("theirs")).await.is_err());
    assert_eq!(store.participant_keys(&job.id).await.unwrap(), BTreeSet::from([TaskId::new("tp")]));
    // Re-minting replaces the key; revoking leaves none.
    store.set_participant_key(&job.id, &"tp".into(), Some(&sha("new"))).await.unwrap();
    assert!(store.task_by_key(&"tp".into(), &sha("mine")).await.is_err());
    assert!(store.task_by_key(&"tp".into(), &sha("new")).await.is_ok());
    store.set_participant_key(&job.id, &"tp".into(), None).await.unwrap();
    assert!(store.task_by_key(&"tp".into(), &sha("new")).await.is_err());
    assert!(store.participant_keys(&job.id).await.unwrap().is_empty());
    // Platform-run tasks take no participant key; unknown tasks and other jobs' are not found.
    assert!(matches!(
        store.set_participant_key(&job.id, &"tz".into(), Some(&sha("mine"))).await,
        Err(Error::Conflict { .. })
    ));
    assert!(store.task_by_key(&"tz".into(), &sha("mine")).await.is_err());
    assert!(matches!(
        store.set_participant_key(&job.id, &"nope".into(), Some(&sha("mine"))).await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        store.set_participant_key(&other.id, &"tp".into(), Some(&sha("mine"))).await,
        Err(Error::NotFound { .. })
    ));

    // Every task key dies with its job: once the job is final, no key is accepted and no
    // participant key can be minted.
    store.set_participant_key(&job.id, &"tp".into(), Some(&sha("mine"))).await.unwrap();
    store.set_job_state(&job.id, &[JobState::Ready], JobState::Starting, None).await.unwrap();
    assert!(store.task_by_key(&"tz".into(), &sha("key-tz")).await.is_ok());
    store.set_job_state(&job.id, &[JobState::Starting], JobState::Failed, None).await.unwrap();
    assert!(matches!(
        store.task_by_key(&"tz".into(), &sha("key-tz")).await,
        Err(Error::NotFound { .. })
    ));
    assert!(store.task_by_key(&"tp".into(), &sha("mine")).await.is_err());
    assert!(matches!(
        store.set_participant_key(&job.id, &"tp".into(), Some(&sha("again"))).await,
        Err(Error::Conflict { .. })
    ));
}

async fn metrics(store: &impl Store) {
    const LIMIT: u64 = 6;
    with_users(store).await;
    let job = store.create_job(&ann(), &job_spec("d", &[]), "1", "1").await.unwrap();
    let record = |round: u64, loss: f64| MetricRecord {
        task_id: "t1".into(),
        role: "trainer".to_owned(),
        round,
        metrics: BTreeMap::from([("loss".to_owned(), loss)]),
        timestamp: None,
    };
    assert_eq!(store.latest_round(&job.id).await.unwrap(), None, "no record yet");
    store.add_metrics(&job.id, &[record(2, 0.5), record(1, 0.9)], LIMIT).await.unwrap();
    assert_eq!(store.latest_round(&job.id).await.unwrap(), Some(2));
    store.add_metrics(&job.id, &[record(3, 0.1)], LIMIT).await.unwrap();
    assert_eq!(store.latest_round(&job.id).await.unwrap(), Some(3));
    assert_eq!(store.count_metrics(&job.id, &"t1".into()).await.unwrap(), 3);
    assert_eq!(store.count_metrics(&job.id, &"t2".into()).await.unwrap(), 0);
    let listed = store.list_metrics(&job.id).await.unwrap();
    let rounds: Vec<_> = listed.iter().map(|m| m.round).collect();
    assert_eq!(rounds, [2, 1, 3], "insertion order");
    assert!(listed.iter().all(|m| m.timestamp.is_some()));
    assert_eq!(listed[1].metrics["loss"], 0.9);
    assert!(matches!(
        store.add_metrics(&"nope".into(), &[record(1, 1.0)], LIMIT).await,
        Err(Error::NotFound { kind: "job", .. })
    ));
    assert!(matches!(store.list_metrics(&"nope".into()).await, Err(Error::NotFound { .. })));

    // A record sent again (same task, round and timestamp) is stored once; another timestamp
    // for the same round is another record.
    let at = |round: u64, secs: i64| MetricRecord {
        timestamp: Some(
            chrono::DateTime::from_timestamp(1_800_000_000 + secs, 123_456_000).unwrap(),
        ),
        ..record(round, 0.25)
    };
    assert_eq!(store.add_metrics(&job.id, &[at(4, 0), at(4, 0)], LIMIT).await.unwrap(), [0]);
    assert_eq!(store.add_metrics(&job.id, &[at(4, 0)], LIMIT).await.unwrap(), Vec::<usize>::new());
    assert_eq!(store.count_metrics(&job.id, &"t1".into()).await.unwrap(), 4);
    assert_eq!(store.add_metrics(&job.id, &[at(4, 0), at(4, 1)], LIMIT).await.unwrap(), [1]);
    assert_eq!(store.count_metrics(&job.id, &"t1".into()).await.unwrap(), 5);

    // A task's bound: past it nothing is stored; records stored already do not count twice.
    let err = store.add_metrics(&job.id, &[at(5, 0), at(5, 1)], LIMIT).await.unwrap_err();
    assert!(
        matches!(&err, Error::MetricLimit { task, stored: 5, adding: 2, limit: 6 } if task == "t1"),
        "{err:?}"
    );
    assert_eq!(store.count_metrics(&job.id, &"t1".into()).await.unwrap(), 5, "rolled back");
    assert_eq!(store.add_metrics(&job.id, &[at(4, 1), at(5, 0)], LIMIT).await.unwrap(), [1]);
    assert_eq!(store.count_metrics(&job.id, &"t1".into()).await.unwrap(), 6);
}

/// Concurrent posts of one task cannot pass its bound together: its count and its inserts are
/// one transaction under the task's lock (two stores over one database, as two apiservers).
pub(crate) async fn concurrent_metrics_stay_within_the_bound<S: Store>(first: &S, second: &S) {
    with_users(first).await;
    let job = first.create_job(&ann(), &job_spec("d", &[]), "1", "1").await.unwrap();
    let record = |round: u64| MetricRecord {
        task_id: "t1".into(),
        role: "trainer".to_owned(),
        round,
        metrics: BTreeMap::from([("loss".to_owned(), 0.5)]),
        timestamp: None,
    };
    let batch = |from: u64| (from..from + 3).map(record).collect::<Vec<_>>();
    let mut accepted = 0;
    for round in 0..10 {
        let (a, b) = (batch(round * 10), batch(round * 10 + 5));
        let (a, b) =
            tokio::join!(first.add_metrics(&job.id, &a, 20), second.add_metrics(&job.id, &b, 20));
        for result in [a, b] {
            match result {
                Ok(stored) => accepted += stored.len() as u64,
                Err(Error::MetricLimit { .. }) => {}
                Err(err) => panic!("{err:?}"),
            }
        }
    }
    assert_eq!(accepted, 18, "six batches of three fit in 20, the rest are refused whole");
    assert_eq!(first.count_metrics(&job.id, &"t1".into()).await.unwrap(), 18);
}

async fn restarts(store: &impl Store) {
    with_users(store).await;
    let job = store.create_job(&ann(), &job_spec("d", &[]), "1", "1").await.unwrap();
    store.insert_tasks(&[task(&job.id, "ta", 0, true)]).await.unwrap();
    let ta: TaskId = "ta".into();
    // Only a failed task restarts, and only from the count the caller saw.
    assert!(matches!(
        store.restart_task(&job.id, &ta, 0, "again").await,
        Err(Error::Conflict { .. })
    ));
    store.set_task_state(&job.id, &ta, TaskState::Running, None).await.unwrap();
    store.record_heartbeat(&ta).await.unwrap();
    store.set_task_state(&job.id, &ta, TaskState::Failed, Some("killed")).await.unwrap();
    let back = store.restart_task(&job.id, &ta, 0, "restart 1: killed").await.unwrap();
    assert_eq!(
        (back.state, back.restarts, back.log.as_str()),
        (TaskState::Ready, 1, "restart 1: killed")
    );
    assert_eq!(back.last_heartbeat, None);
    assert!(matches!(
        store.restart_task(&job.id, &ta, 0, "twice").await,
        Err(Error::Conflict { .. })
    ));
    store.set_task_state(&job.id, &ta, TaskState::Failed, None).await.unwrap();
    assert!(matches!(
        store.restart_task(&job.id, &ta, 0, "stale count").await,
        Err(Error::Conflict { .. })
    ));
    assert_eq!(store.restart_task(&job.id, &ta, 1, "restart 2").await.unwrap().restarts, 2);
    assert_eq!(store.list_tasks(&job.id).await.unwrap()[0].restarts, 2);
    assert!(matches!(
        store.restart_task(&job.id, &"nope".into(), 0, "x").await,
        Err(Error::NotFound { .. })
    ));
}

/// A task attempt's key is claimed once: a second claim, a claim of another attempt than the
/// current one, of a participant-run task or of an ended job's task is refused; concurrent
/// claims of one attempt have exactly one winner.
async fn key_claims(store: &impl Store) {
    with_users(store).await;
    let job = store.create_job(&ann(), &job_spec("d", &[]), "1", "1").await.unwrap();
    store
        .insert_tasks(&[task(&job.id, "ta", 0, true), task(&job.id, "tp", 1, false)])
        .await
        .unwrap();
    let (ta, tp): (TaskId, TaskId) = ("ta".into(), "tp".into());
    let conflict = |res: Result<()>, why: &str| match res {
        Err(Error::Conflict { .. }) => {}
        other => panic!("{why}: {other:?}"),
    };
    conflict(store.claim_task_key(&job.id, &ta, 1).await, "attempt 1 is not current yet");
    let (a, b) =
        tokio::join!(store.claim_task_key(&job.id, &ta, 0), store.claim_task_key(&job.id, &ta, 0));
    assert_eq!(u8::from(a.is_ok()) + u8::from(b.is_ok()), 1, "one winner: {a:?} {b:?}");
    conflict(store.claim_task_key(&job.id, &ta, 0).await, "attempt 0 claimed already");
    conflict(store.claim_task_key(&job.id, &tp, 0).await, "participant-run");
    assert!(matches!(
        store.claim_task_key(&job.id, &"nope".into(), 0).await,
        Err(Error::NotFound { .. })
    ));
    // The next attempt has a claim of its own.
    store.set_task_state(&job.id, &ta, TaskState::Failed, Some("killed")).await.unwrap();
    store.restart_task(&job.id, &ta, 0, "restart 1").await.unwrap();
    conflict(store.claim_task_key(&job.id, &ta, 0).await, "attempt 0 is stale");
    store.claim_task_key(&job.id, &ta, 1).await.unwrap();
    conflict(store.claim_task_key(&job.id, &ta, 1).await, "attempt 1 claimed already");
    // An ended job's tasks hand out nothing.
    store.set_task_state(&job.id, &ta, TaskState::Failed, Some("again")).await.unwrap();
    store.restart_task(&job.id, &ta, 1, "restart 2").await.unwrap();
    store.set_job_state(&job.id, &[JobState::Ready], JobState::Starting, None).await.unwrap();
    store.set_job_state(&job.id, &[JobState::Starting], JobState::Failed, Some("x")).await.unwrap();
    conflict(store.claim_task_key(&job.id, &ta, 2).await, "the job ended");
}

/// Design deletion against an upload of identical code, from two stores over one database and
/// one blob directory (two apiservers): the upload has written its blob (present already) and
/// not yet committed its row when the deletion of the only other design naming that blob runs
/// to its end. The uploaded revision must still have its bytes.
pub(crate) async fn design_deletion_races_an_upload<S: Store>(
    uploader: &S,
    uploader_blobs: &BlobStore,
    deleter: &S,
) {
    with_users(deleter).await;
    let spec = DesignSpec { id: "shared".into(), ..DesignSpec::default() };
    let id: &fledge_types::DesignId = &"shared".into();
    deleter.create_design(&ann(), &spec).await.unwrap();
    deleter.create_design(&bob(), &spec).await.unwrap();
    deleter.put_code(Some(&ann()), id, b"same code").await.unwrap();

    let (reached, resume) = uploader_blobs.pause_next_upload();
    let uploading = bob();
    let upload = uploader.put_code(Some(&uploading), id, b"same code");
    let delete = async {
        reached.await.expect("the upload wrote its blob");
        deleter.delete_design(Some(&ann()), id).await.expect("ann's design is deleted");
        resume.send(()).expect("the upload waits");
    };
    let (uploaded, ()) = tokio::join!(upload, delete);
    let meta = uploaded.expect("bob's upload commits");
    assert_eq!(meta.sha256, sha("same code"));
    for store in [uploader, deleter] {
        let (_, bytes) = store
            .get_code(Some(&bob()), id, None)
            .await
            .expect("bob's revision keeps its blob after ann's design was deleted");
        assert_eq!(bytes, b"same code");
    }
    // Once no row names the blob, deleting the last design removes it.
    deleter.delete_design(Some(&bob()), id).await.unwrap();
    let path = uploader_blobs.dir().join(&meta.sha256[..2]).join(&meta.sha256);
    assert!(!path.exists(), "an unreferenced blob is removed");
    let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
    assert!(leftovers.is_empty(), "nothing is left aside: {leftovers:?}");
}
