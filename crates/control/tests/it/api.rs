//! The REST API end to end: lifecycle, auth and ownership, bad input, restart.

use std::collections::BTreeMap;
use std::io::{Cursor, Read as _};

use reqwest::StatusCode;
use serde_json::{Value, json};

use fledge_control::store::NewTask;
use fledge_types::{Dataset, Job, JobId, JobState, Task};

use crate::support::{
    CODE_LIMIT, Client, ENTRIES_LIMIT, Server, hier_job, setup_hier, zip_bytes, zip_of, zip64_lying,
};

/// Stores the tasks of `job` as the controller does on start: the expansion, one key each.
pub(crate) async fn insert_tasks(server: &Server, job: &str) -> Vec<(Task, String)> {
    let store = &server.store;
    let job: Job = store.get_job(None, &JobId::new(job)).await.unwrap();
    let (_, schema) = store
        .get_schema(Some(&job.owner), &job.spec.design_id, Some(&job.schema_version))
        .await
        .unwrap();
    let datasets: Vec<Dataset> = store.list_datasets(Some(&job.owner)).await.unwrap();
    let computes = store.list_computes().await.unwrap();
    let tasks =
        fledge_types::expand::expand(&job.id, &job.spec, &schema, &datasets, &computes).unwrap();
    let keyed: Vec<(Task, String)> = tasks
        .iter()
        .enumerate()
        .map(|(i, task)| (task.clone(), format!("task-key-{i}-{}", job.id)))
        .collect();
    let new: Vec<NewTask> = keyed
        .iter()
        .map(|(task, key)| NewTask {
            task: task.clone(),
            key_sha256: fledge_control::api::secret_hash(key),
        })
        .collect();
    store.insert_tasks(&new).await.unwrap();
    keyed
}

fn roles(tasks: &Value) -> BTreeMap<String, usize> {
    let mut count = BTreeMap::new();
    for task in tasks.as_array().unwrap() {
        *count.entry(task["role"].as_str().unwrap().to_owned()).or_insert(0) += 1;
    }
    count
}

fn zip_names(bytes: &[u8]) -> Vec<String> {
    let archive = zip::ZipArchive::new(Cursor::new(bytes)).unwrap();
    let mut names: Vec<_> = archive.file_names().map(str::to_owned).collect();
    names.sort();
    names
}

#[test_log::test(tokio::test)]
async fn three_tier_job_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path()).await;
    let ann = server.user("ann").await;
    // Computes per region: the eu datasets land on compute eu.
    for (id, region) in [("eu", "default/eu"), ("us", "default/us")] {
        let (status, body) = server
            .admin
            .post(
                "/computes",
                &json!({"computeId": id, "region": region,
                                       "apiKey": format!("{id}-key-0123456789abcdef")}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert!(body.get("apiKey").is_none(), "keys are never listed: {body}");
    }
    let datasets = setup_hier(&ann, "ann").await;

    // The design shows both revisions.
    let (status, design) = ann.get("/users/ann/designs/hier").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (design["schemaVersions"].clone(), design["codeVersions"].clone()),
        (json!(["1"]), json!(["1"]))
    );
    let (status, code) = ann.get_bytes("/users/ann/designs/hier/code").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(zip_names(&code).len(), 4);

    // Plan: 4 trainers, 2 middle aggregators, 1 top aggregator; nothing stored.
    let before = server.snapshot().await;
    let (status, plan) = ann.post("/users/ann/jobs/plan", &hier_job(&datasets)).await;
    assert_eq!(status, StatusCode::OK, "{plan}");
    assert_eq!(
        roles(&plan),
        BTreeMap::from([
            ("middle-aggregator".into(), 2),
            ("top-aggregator".into(), 1),
            ("trainer".into(), 4)
        ])
    );
    let trainer_computes: Vec<_> = plan
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["role"] == "trainer")
        .map(|t| t["computeId"].clone())
        .collect();
    assert_eq!(trainer_computes, [json!("eu"), json!("eu"), json!("us"), json!("us")]);
    assert!(plan.as_array().unwrap().iter().all(|t| t.get("key").is_none()));
    assert_eq!(server.snapshot().await, before, "plan stores nothing");

    // Create: state ready, versions pinned.
    let (status, job) = ann.post("/users/ann/jobs", &hier_job(&datasets)).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    assert_eq!(
        (job["state"].clone(), job["schemaVersion"].clone(), job["codeVersion"].clone()),
        (json!("ready"), json!("1"), json!("1"))
    );
    let id = job["id"].as_str().unwrap().to_owned();
    let (_, jobs) = ann.get("/users/ann/jobs?state=ready").await;
    assert_eq!(jobs.as_array().unwrap().len(), 1);
    let (_, jobs) = ann.get("/users/ann/jobs?state=running").await;
    assert_eq!(jobs, json!([]));

    // A ready job's spec may change.
    let mut changed = hier_job(&datasets);
    changed["name"] = json!("renamed");
    let (status, body) = ann.put(&format!("/users/ann/jobs/{id}"), &changed).await;
    assert_eq!((status, &body["name"]), (StatusCode::OK, &Value::Null), "{body}");
    assert_eq!(body["spec"]["name"], "renamed");

    // Start → starting, and the controller is woken; start again → 409.
    let (status, body) =
        ann.put(&format!("/users/ann/jobs/{id}/status"), &json!({"state": "starting"})).await;
    assert_eq!((status, &body["state"]), (StatusCode::OK, &json!("starting")), "{body}");
    assert_eq!(server.woken.try_recv().unwrap().as_str(), id);
    let (status, body) =
        ann.put(&format!("/users/ann/jobs/{id}/status"), &json!({"state": "starting"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["code"], "CONFLICT");
    assert_eq!(body["message"], format!("job {id} is starting; only a ready job can be started"));
    let (status, _) = ann.put(&format!("/users/ann/jobs/{id}"), &changed).await;
    assert_eq!(status, StatusCode::CONFLICT, "a started job's spec is frozen");

    // The controller stores the tasks; agents fetch their config and code with their key.
    let tasks = insert_tasks(&server, &id).await;
    assert_eq!(tasks.len(), 7);
    let (trainer, trainer_key) = tasks.iter().find(|(t, _)| t.role == "trainer").unwrap();
    let agent = Client::new(&server.base, trainer_key);
    let (status, config) = agent.get(&format!("/tasks/{}/config", trainer.task_id)).await;
    assert_eq!(status, StatusCode::OK, "{config}");
    assert_eq!(config["role"], "trainer");
    assert_eq!(config["job"]["id"], id.as_str());
    assert_eq!(config["dataset"]["url"], "file:///data/uk.csv");
    assert_eq!(config["channels"].as_array().unwrap().len(), 1);
    assert_eq!(config["groupAssociation"]["param-channel"], "eu");
    assert_eq!(config["hyperparameters"]["rounds"], 3);
    assert_eq!(config["brokers"][0]["host"], "127.0.0.1:1883");
    // Its data-plane identity, its channel's key, and the public keys of the job's other
    // tasks on that channel (the aggregators and the other trainers), never its own.
    let data_plane = &config["dataPlane"];
    assert_eq!(data_plane["identity"].as_str().unwrap().len(), 64, "{data_plane}");
    assert_eq!(data_plane["channelKeys"]["param-channel"].as_str().unwrap().len(), 64);
    let members = data_plane["members"]["param-channel"].as_object().unwrap();
    assert!(!members.contains_key(trainer.task_id.as_str()), "{members:?}");
    let on_channel = tasks.iter().filter(|(t, _)| t.role != "top-aggregator").count();
    assert_eq!(members.len(), on_channel - 1, "{members:?}");
    let (status, code) = agent.get_bytes(&format!("/tasks/{}/code", trainer.task_id)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(zip_names(&code), ["main.py", "util/data.py"]);
    let mut main = String::new();
    zip::ZipArchive::new(Cursor::new(&code))
        .unwrap()
        .by_name("main.py")
        .unwrap()
        .read_to_string(&mut main)
        .unwrap();
    assert_eq!(main, "print('train')\n");
    let (top, top_key) = tasks.iter().find(|(t, _)| t.role == "top-aggregator").unwrap();
    let (status, config) =
        Client::new(&server.base, top_key).get(&format!("/tasks/{}/config", top.task_id)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(config.get("dataset").is_none(), "{config}");

    // Agent reports: running, heartbeat, metrics.
    let task_path = format!("/tasks/{}", trainer.task_id);
    let (status, body) =
        agent.put(&format!("{task_path}/status"), &json!({"state": "running", "log": "up"})).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(server.woken.try_recv().unwrap().as_str(), id);
    let (status, _) = agent.post(&format!("{task_path}/heartbeat"), &json!(null)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let record = |round: u64| {
        json!({"taskId": trainer.task_id, "role": "trainer", "round": round,
                                     "metrics": {"loss": 0.5, "accuracy": 0.9}})
    };
    let (status, body) =
        agent.post(&format!("{task_path}/metrics"), &json!([record(1), record(2)])).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, metrics) = ann.get(&format!("/users/ann/jobs/{id}/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        metrics.as_array().unwrap().iter().map(|m| m["round"].clone()).collect::<Vec<_>>(),
        [json!(1), json!(2)]
    );
    // Bounded: records per request, metrics per record, records per task (5 in these tests);
    // a refused request stores nothing.
    let many: Vec<Value> = (0..1_001).map(record).collect();
    let (status, body) = agent.post(&format!("{task_path}/metrics"), &json!(many)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["message"].as_str().unwrap().contains("at most 1000"), "{body}");
    let wide: serde_json::Map<String, Value> =
        (0..257).map(|i| (format!("m{i}"), json!(1.0))).collect();
    let wide = json!([{"taskId": trainer.task_id, "role": "trainer", "round": 3, "metrics": wide}]);
    let (status, body) = agent.post(&format!("{task_path}/metrics"), &wide).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["details"][0]["message"].as_str().unwrap().contains("at most 256"), "{body}");
    let four: Vec<Value> = (3..7).map(record).collect();
    let (status, body) = agent.post(&format!("{task_path}/metrics"), &json!(four)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["message"].as_str().unwrap().contains("stored 2 metric records"), "{body}");
    let (status, body) = agent
        .post(&format!("{task_path}/metrics"), &json!([record(3), record(4), record(5)]))
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, metrics) = ann.get(&format!("/users/ann/jobs/{id}/metrics")).await;
    assert_eq!(metrics.as_array().unwrap().len(), 5);
    // And records per minute (10 here: a token bucket per task that refills one every 6 s).
    // The top aggregator's bucket: 5 stored, 5 more taken (refused by the row limit), then a
    // minute's worth again is 429 naming the setting, with the wait; more than a minute's
    // worth in one request is 413.
    let top_record = |round: u64| {
        json!({"taskId": top.task_id, "role": "top-aggregator", "round": round,
               "metrics": {"loss": 0.5}})
    };
    let top_agent = Client::new(&server.base, top_key);
    let top_path = format!("/tasks/{}/metrics", top.task_id);
    let five = |from: u64| json!((from..from + 5).map(top_record).collect::<Vec<_>>());
    let (status, body) = top_agent.post(&top_path, &five(1)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = top_agent.post(&top_path, &five(6)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["message"].as_str().unwrap().contains("limits.metric_records_per_task"), "{body}");
    let response = crate::support::http()
        .post(format!("{}/api/v1{top_path}", server.base))
        .bearer_auth(top_key)
        .json(&json!((11..21).map(top_record).collect::<Vec<_>>()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let wait: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "TOO_MANY_REQUESTS", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("faster than 10 a minute")
            && message.contains("limits.metric_records_per_minute"),
        "{body}"
    );
    let eleven = json!((21..32).map(top_record).collect::<Vec<_>>());
    let (status, body) = top_agent.post(&top_path, &eleven).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["message"].as_str().unwrap().contains("at most 10 a minute"), "{body}");
    let (_, metrics) = ann.get(&format!("/users/ann/jobs/{id}/metrics")).await;
    assert_eq!(metrics.as_array().unwrap().len(), 10, "5 of each task, nothing refused");
    let (_, task) = ann.get(&format!("/users/ann/jobs/{id}/tasks/{}", trainer.task_id)).await;
    assert_eq!((task["state"].clone(), task["log"].clone()), (json!("running"), json!("up")));
    assert!(task["lastHeartbeat"].is_string(), "{task}");
    let (_, listed) = ann.get(&format!("/users/ann/jobs/{id}/tasks")).await;
    assert_eq!(listed.as_array().unwrap().len(), 7);
    assert!(listed.as_array().unwrap().iter().all(|t| t.get("key").is_none()));

    // A deployer reports a failed worker with its compute key (the second eu trainer).
    let (failed, _) = tasks.iter().filter(|(t, _)| t.role == "trainer").nth(1).unwrap();
    assert_eq!(failed.compute_id.as_str(), "eu");
    let deployer = Client::new(&server.base, "eu-key-0123456789abcdef");
    let report = json!({"jobId": id, "state": "failed", "message": "image pull failed"});
    let path = format!("/computes/eu/tasks/{}/deployment", failed.task_id);
    let (status, body) = deployer.put(&path, &report).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert_eq!(server.woken.try_recv().unwrap().as_str(), id);
    let (_, task) = ann.get(&format!("/users/ann/jobs/{id}/tasks/{}", failed.task_id)).await;
    assert_eq!(
        (task["state"].clone(), task["log"].clone()),
        (json!("failed"), json!("deployment failed: image pull failed"))
    );
    let (status, _) = Client::new(&server.base, "wrong-key").put(&path, &report).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The us deployer's key is not the eu compute's; a task of another compute is 404.
    let us = Client::new(&server.base, "us-key-0123456789abcdef");
    let (status, _) = us.put(&path, &report).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) =
        us.put(&format!("/computes/us/tasks/{}/deployment", failed.task_id), &report).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The deployer claims a task attempt's key once (deploy events carry none): a second claim
    // is 409, another compute's claim 404, a wrong compute key 401.
    let claim = json!({"jobId": id, "attempt": 0});
    let key_path = format!("/computes/eu/tasks/{}/key", failed.task_id);
    let (status, body) = Client::new(&server.base, "wrong-key").post(&key_path, &claim).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) =
        us.post(&format!("/computes/us/tasks/{}/key", failed.task_id), &claim).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = deployer.post(&key_path, &json!({"jobId": id, "attempt": 1})).await;
    assert_eq!(status, StatusCode::CONFLICT, "not the current attempt: {body}");
    let (status, body) = deployer.post(&key_path, &claim).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let key = body["key"].as_str().unwrap();
    assert_eq!((key.len(), body["attempt"].clone()), (64, json!(0)), "{body}");
    assert!(key.bytes().all(|b| b.is_ascii_hexdigit()), "{body}");
    let (status, body) = deployer.post(&key_path, &claim).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["message"].as_str().unwrap().contains("already claimed"), "{body}");
    let (status, body) = deployer.post("/computes/eu/tasks/nope/key", &claim).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // A compute learns where its workers connect (fledge doctor checks it reaches them), and
    // no credential comes with it.
    let (status, body) = deployer.get("/computes/eu/endpoints").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["brokers"].is_array() && body.get("apiserver").is_some(), "{body}");
    assert!(!body.to_string().contains("password"), "{body}");
    let (status, _) = us.get("/computes/eu/endpoints").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "another compute's key");

    let (status, job_status) = ann.get(&format!("/users/ann/jobs/{id}/status")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job_status["state"], "starting");
    let counts = job_status["tasks"].as_object().unwrap();
    assert_eq!(counts.values().map(|v| v.as_u64().unwrap()).sum::<u64>(), 7);
    assert_eq!(
        (counts["running"].clone(), counts["failed"].clone(), counts["ready"].clone()),
        (json!(1), json!(1), json!(5))
    );

    // Stop → stopping; stop again → 409; delete while stopping → 409.
    let (status, body) =
        ann.put(&format!("/users/ann/jobs/{id}/status"), &json!({"state": "stopping"})).await;
    assert_eq!((status, &body["state"]), (StatusCode::OK, &json!("stopping")), "{body}");
    let (status, _) =
        ann.put(&format!("/users/ann/jobs/{id}/status"), &json!({"state": "stopping"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = ann.delete(&format!("/users/ann/jobs/{id}")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = ann.delete("/users/ann/designs/hier").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["message"].as_str().unwrap().contains(&id), "{body}");
    server.stop().await;
}

/// Issue #11: what Cisco Flame's published specs do is accepted as Flame means it.
#[test_log::test(tokio::test)]
async fn flame_specs_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let ann = server.user("ann").await;
    setup_hier(&ann, "ann").await;

    // Several datasets called "MNIST dataset", told apart by id, url and realm.
    let mut ids = Vec::new();
    for (site, realm) in [
        ("site1", "default/eu/uk"),
        ("site2", "default/eu/de"),
        ("site3", "default/us/east"),
        ("site4", "default/us/west"),
    ] {
        let dataset = json!({"name": "MNIST dataset", "description": "MNIST dataset",
                             "url": format!("https://example.org/mnist/{site}.npz"),
                             "dataFormat": "npy", "realm": realm, "isPublic": true});
        let (status, body) = ann.post("/users/ann/datasets", &dataset).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    let (_, again) = ann
        .post(
            "/users/ann/datasets",
            &json!({"name": "MNIST dataset", "url": "https://example.org/mnist/site1.npz",
                    "realm": "default/eu/uk"}),
        )
        .await;
    assert!(!ids.contains(&again["id"].as_str().unwrap().to_owned()), "a new id every time");
    let (_, listed) = ann.get("/users/ann/datasets").await;
    let named = listed.as_array().unwrap().iter().filter(|d| d["name"] == "MNIST dataset").count();
    assert_eq!(named, 5);

    // A job file without a name and with the dummy registry.
    let mut job = hier_job(&ids);
    job.as_object_mut().unwrap().remove("name");
    job["modelSpec"]["registry"] = json!({"sort": "dummy", "uri": ""});
    let (status, plan) = ann.post("/users/ann/jobs/plan", &job).await;
    assert_eq!((status, roles(&plan).len()), (StatusCode::OK, 3), "{plan}");
    let (status, created) = ann.post("/users/ann/jobs", &job).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["spec"]["name"], "hier", "named after its design");
    assert_eq!(created["spec"]["modelSpec"]["registry"]["sort"], "dummy");

    // Its tasks get the deployment's default registry, not "dummy".
    let id = created["id"].as_str().unwrap().to_owned();
    let tasks = insert_tasks(&server, &id).await;
    let (trainer, key) = tasks.iter().find(|(t, _)| t.role == "trainer").unwrap();
    let (status, config) =
        Client::new(&server.base, key).get(&format!("/tasks/{}/config", trainer.task_id)).await;
    assert_eq!(status, StatusCode::OK, "{config}");
    assert_eq!(config["job"]["name"], "hier");
    assert_eq!(config["registry"]["sort"], "local");
    assert!(config["registry"]["uri"].as_str().unwrap().ends_with("registry"), "{config}");

    // A dummy registry with a uri is refused, naming the field.
    job["modelSpec"]["registry"]["uri"] = json!("http://mlflow:5000");
    let (status, body) = ann.post("/users/ann/jobs", &job).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["details"][0]["path"], "modelSpec.registry.uri", "{body}");
}

#[test_log::test(tokio::test)]
async fn auth_and_ownership() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let ann = server.user("ann").await;
    let bob = server.user("bob").await;
    let datasets = setup_hier(&ann, "ann").await;
    let (_, job) = ann.post("/users/ann/jobs", &hier_job(&datasets)).await;
    let id = job["id"].as_str().unwrap().to_owned();

    // No token, a bad token, a malformed header: 401 with an ApiError body.
    let (status, body) = Client::anonymous(&server.base).get("/users/ann/jobs").await;
    assert_eq!((status, &body["code"]), (StatusCode::UNAUTHORIZED, &json!("UNAUTHENTICATED")));
    let (status, _) = Client::new(&server.base, "not-a-token").get("/whoami").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, who) = ann.get("/whoami").await;
    assert_eq!((status, who), (StatusCode::OK, json!({"id": "ann", "isAdmin": false})));

    let before = server.snapshot().await;
    // Bob under his own name: Ann's ids do not exist for him.
    for path in [
        format!("/users/bob/jobs/{id}"),
        format!("/users/bob/jobs/{id}/status"),
        format!("/users/bob/jobs/{id}/tasks"),
        "/users/bob/designs/hier".to_owned(),
        format!("/users/bob/datasets/{}", datasets[0]),
    ] {
        let (status, body) = bob.get(&path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    for state in ["starting", "stopping"] {
        let (status, _) =
            bob.put(&format!("/users/bob/jobs/{id}/status"), &json!({"state": state})).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }
    let (status, _) = bob.delete(&format!("/users/bob/jobs/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = bob.delete(&format!("/users/bob/datasets/{}", datasets[0])).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Bob under Ann's name: forbidden.
    let (status, body) = bob.get(&format!("/users/ann/jobs/{id}")).await;
    assert_eq!((status, &body["code"]), (StatusCode::FORBIDDEN, &json!("PERMISSION_DENIED")));
    let (status, _) =
        bob.put(&format!("/users/ann/jobs/{id}/status"), &json!({"state": "starting"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Bob cannot use Ann's private datasets in his jobs either.
    let (status, _) = bob.post("/users/bob/designs", &json!({"id": "hier"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = bob.post("/users/bob/jobs/plan", &hier_job(&datasets)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // Admin-only routes.
    let (status, _) = bob.post("/users", &json!({"id": "eve"})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = bob.get("/computes").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = bob.post("/users/ann/tokens", &json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Bob's design creation above is the only change.
    let mut after = server.snapshot().await;
    after["designs"].as_array_mut().unwrap().retain(|d| d["owner"] != "bob");
    assert_eq!(after, before);

    // The admin sees Ann's job under her name.
    let (status, body) = server.admin.get(&format!("/users/ann/jobs/{id}")).await;
    assert_eq!((status, &body["owner"]), (StatusCode::OK, &json!("ann")));

    // Task keys: a wrong key or another task's key cannot fetch.
    let (status, _) =
        ann.put(&format!("/users/ann/jobs/{id}/status"), &json!({"state": "starting"})).await;
    assert_eq!(status, StatusCode::OK);
    let tasks = insert_tasks(&server, &id).await;
    let (first, _) = &tasks[0];
    let (_, other_key) = &tasks[1];
    for key in ["wrong", other_key.as_str()] {
        let agent = Client::new(&server.base, key);
        let (status, _) = agent.get(&format!("/tasks/{}/config", first.task_id)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = agent.get_bytes(&format!("/tasks/{}/code", first.task_id)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = agent
            .put(&format!("/tasks/{}/status", first.task_id), &json!({"state": "failed"}))
            .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // A user token is no task key.
    let (status, _) = ann.get(&format!("/tasks/{}/config", first.task_id)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = Client::new(&server.base, "x").get("/tasks/unknown/config").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    server.stop().await;
}

#[test_log::test(tokio::test)]
async fn bad_input_is_rejected_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let ann = server.user("ann").await;
    let datasets = setup_hier(&ann, "ann").await;
    let (_, job) = ann.post("/users/ann/jobs", &hier_job(&datasets)).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let before = server.snapshot().await;

    /// Expects `status` and every `paths` among the details, with the store unchanged.
    async fn check(
        server: &Server,
        before: &Value,
        what: &str,
        got: (StatusCode, Value),
        status: StatusCode,
        paths: &[&str],
    ) {
        let (got_status, body) = got;
        assert_eq!(got_status, status, "{what}: {body}");
        assert!(body["message"].is_string(), "{what}: not an ApiError: {body}");
        let details: Vec<String> = body["details"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["path"].as_str().unwrap().to_owned())
            .collect();
        for path in paths {
            assert!(details.iter().any(|d| d == path), "{what}: no detail at {path}: {body}");
        }
        assert_eq!(&server.snapshot().await, before, "{what} changed the store");
    }
    let raw = |path: &str, body: &str| {
        let ann = ann.clone();
        let path = path.to_owned();
        let body = body.as_bytes().to_vec();
        async move { ann.post_raw(&path, "application/json", body).await }
    };
    let bad = StatusCode::BAD_REQUEST;

    check(
        &server,
        &before,
        "malformed JSON",
        raw("/users/ann/designs", "{\"id\": ").await,
        bad,
        &[""],
    )
    .await;
    check(
        &server,
        &before,
        "unknown fields",
        ann.post(
            "/users/ann/datasets",
            &json!({"name": "x", "url": "file:///x", "realmm": "a", "colour": 1}),
        )
        .await,
        bad,
        &["realmm", "colour"],
    )
    .await;
    check(
        &server,
        &before,
        "dataset rules",
        ann.post("/users/ann/datasets", &json!({"name": " ", "url": "nowhere", "realm": "a//b"}))
            .await,
        bad,
        &["name", "url", "realm"],
    )
    .await;
    check(
        &server,
        &before,
        "design id",
        ann.post("/users/ann/designs", &json!({"id": "../etc"})).await,
        bad,
        &["id"],
    )
    .await;
    check(
        &server,
        &before,
        "duplicate design",
        ann.post("/users/ann/designs", &json!({"id": "hier"})).await,
        StatusCode::CONFLICT,
        &[],
    )
    .await;
    let schema = json!({"roles": [{"name": "a"}, {"name": "a"}],
                        "channels": [{"name": "c", "pair": ["a", "ghost"]}]});
    check(
        &server,
        &before,
        "schema rules",
        ann.post("/users/ann/designs/hier/schemas", &schema).await,
        bad,
        &["roles", "roles[1].name", "channels[0].pair[1]"],
    )
    .await;
    check(
        &server,
        &before,
        "schema of an unknown design",
        ann.post("/users/ann/designs/nope/schemas", &crate::support::hier_schema()).await,
        StatusCode::NOT_FOUND,
        &[],
    )
    .await;

    let mut job = hier_job(&datasets);
    job["name"] = json!("  ");
    job["maxRunTime"] = json!(100_000_000u64);
    job["dataSpec"][0]["datasetGroups"]["eu"][0] = json!("no-such-dataset");
    job["dataSpec"][0]["role"] = json!("trainer");
    check(
        &server,
        &before,
        "job rules",
        ann.post("/users/ann/jobs", &job).await,
        bad,
        &["name", "maxRunTime"],
    )
    .await;
    let (_, body) = ann.post("/users/ann/jobs", &job).await;
    assert!(body.to_string().contains("no-such-dataset"), "{body}");
    // Differential privacy: a budget the job's rounds would exceed, and central DP with a
    // server optimizer, are refused before anything is stored; a bad field names itself.
    let mut job = hier_job(&datasets);
    job["modelSpec"]["hyperparameters"]["rounds"] = json!(50);
    job["modelSpec"]["optimizer"] = json!({"sort": "fedadam", "kwargs": {}});
    job["modelSpec"]["differentialPrivacy"] = json!({"mode": "central", "noiseMultiplier": 0.5,
        "clippingNorm": 1.0, "samplingRate": 1.0, "delta": 1e-5, "epsilon": 1.0});
    check(
        &server,
        &before,
        "privacy budget",
        ann.post("/users/ann/jobs", &job).await,
        bad,
        &["modelSpec.differentialPrivacy.mode", "modelSpec.differentialPrivacy.epsilon"],
    )
    .await;
    let (_, body) = ann.post("/users/ann/jobs", &job).await;
    assert!(body.to_string().contains("rounds fit"), "{body}");
    job["modelSpec"]["differentialPrivacy"]["noiseMultiplier"] = json!(-1);
    check(
        &server,
        &before,
        "privacy field",
        ann.post("/users/ann/jobs", &job).await,
        bad,
        &["modelSpec.differentialPrivacy.noiseMultiplier"],
    )
    .await;
    let mut job = hier_job(&datasets);
    job["designId"] = json!("nope");
    check(
        &server,
        &before,
        "unknown design",
        ann.post("/users/ann/jobs", &job).await,
        bad,
        &["designId"],
    )
    .await;
    let mut job = hier_job(&datasets);
    job["schemaVersion"] = json!("7");
    job["codeVersion"] = json!("9");
    check(
        &server,
        &before,
        "unknown revisions",
        ann.post("/users/ann/jobs/plan", &job).await,
        bad,
        &["schemaVersion", "codeVersion"],
    )
    .await;
    let mut job = hier_job(&datasets);
    job["modelSpec"]["optimiser"] = json!({"sort": "fedavg"});
    check(
        &server,
        &before,
        "unknown job field",
        ann.post("/users/ann/jobs", &job).await,
        bad,
        &["modelSpec.optimiser"],
    )
    .await;

    // Code bundles.
    let code = "/users/ann/designs/hier/codes";
    check(
        &server,
        &before,
        "not a zip",
        ann.post_raw(code, "application/zip", b"PK but not really".to_vec()).await,
        bad,
        &[],
    )
    .await;
    check(
        &server,
        &before,
        "wrong content type",
        ann.post_raw(code, "application/octet-stream", crate::support::hier_code()).await,
        bad,
        &[],
    )
    .await;
    check(
        &server,
        &before,
        "empty zip",
        ann.post_raw(code, "application/zip", zip_of(&[])).await,
        bad,
        &[],
    )
    .await;
    let big: String = (0..CODE_LIMIT).map(|i| char::from(b'a' + (i * 7919 % 26) as u8)).collect();
    let mut big_zip = zip_of(&[("trainer/blob.txt", &big)]);
    big_zip.resize(CODE_LIMIT as usize + 1, 0);
    let got = ann.post_raw(code, "application/zip", big_zip).await;
    assert!(got.1["message"].as_str().unwrap().contains(&CODE_LIMIT.to_string()), "{}", got.1);
    check(&server, &before, "oversize bundle", got, StatusCode::PAYLOAD_TOO_LARGE, &[]).await;
    // Deflate bombs: 8 MiB of zeros, a few KiB zipped, beyond the inflated bound; one declares
    // its size, one lies (declares 1000 bytes), so only inflating it tells.
    let zeros = vec![0u8; 8 << 20];
    let bomb = zip_bytes(&[("trainer/main.py", &zeros)]);
    assert!(bomb.len() < CODE_LIMIT as usize, "the bomb must pass the compressed bound");
    let got = ann.post_raw(code, "application/zip", bomb).await;
    assert!(got.1["message"].as_str().unwrap().contains("at most 1048576 bytes"), "{}", got.1);
    check(&server, &before, "deflate bomb", got, StatusCode::PAYLOAD_TOO_LARGE, &[]).await;
    let lying_bomb = zip64_lying("trainer/main.py", &zeros, true, 1000);
    let got = ann.post_raw(code, "application/zip", lying_bomb).await;
    assert!(
        got.1["message"].as_str().unwrap().contains("inflates to more than 1048576"),
        "{}",
        got.1
    );
    check(&server, &before, "lying deflate bomb", got, StatusCode::PAYLOAD_TOO_LARGE, &[]).await;
    // Too many entries.
    let names: Vec<String> = (0..=ENTRIES_LIMIT).map(|i| format!("trainer/{i}.py")).collect();
    let files: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "")).collect();
    let got = ann.post_raw(code, "application/zip", zip_of(&files)).await;
    assert!(got.1["message"].as_str().unwrap().contains("entries"), "{}", got.1);
    check(&server, &before, "too many entries", got, StatusCode::PAYLOAD_TOO_LARGE, &[]).await;
    // A zip64 entry declaring 2^62 bytes: refused, never allocated, and the server lives on.
    let lying = zip64_lying("trainer/main.py", b"print('hi')", false, 1 << 62);
    let got = ann.post_raw(code, "application/zip", lying).await;
    assert!(
        got.1["message"].as_str().unwrap().contains("declares 4611686018427387904"),
        "{}",
        got.1
    );
    check(&server, &before, "zip64 lie", got, StatusCode::PAYLOAD_TOO_LARGE, &[]).await;
    // A smaller lie (declared within the bound, not what the entry holds) is a corrupt bundle.
    let lying = zip64_lying("trainer/main.py", b"print('hi')", false, 1000);
    let got = ann.post_raw(code, "application/zip", lying).await;
    assert!(
        got.1["message"].as_str().unwrap().contains("declares 1000 bytes but holds 11"),
        "{}",
        got.1
    );
    check(&server, &before, "zip64 small lie", got, StatusCode::BAD_REQUEST, &[]).await;
    let huge_json = format!("{{\"id\": \"{}\"}}", "x".repeat(9 * 1024 * 1024));
    let got = raw("/users/ann/designs", &huge_json).await;
    assert!(got.1["message"].as_str().unwrap().contains("8388608"), "{}", got.1);
    check(&server, &before, "oversize JSON", got, StatusCode::PAYLOAD_TOO_LARGE, &[]).await;

    // Unknown ids.
    let not_found = StatusCode::NOT_FOUND;
    for path in [
        "/users/ann/jobs/nope",
        "/users/ann/jobs/nope/status",
        "/users/ann/designs/nope",
        "/users/ann/designs/hier/schemas/9",
        "/users/ann/designs/hier/schemas/x",
        "/users/ann/designs/hier/codes/2",
        "/users/ann/datasets/nope",
        "/computes/nope",
        "/no/such/route",
    ] {
        let client = if path.starts_with("/computes") { &server.admin } else { &ann };
        check(&server, &before, path, client.get(path).await, not_found, &[]).await;
    }
    check(
        &server,
        &before,
        "start unknown job",
        ann.put("/users/ann/jobs/nope/status", &json!({"state": "starting"})).await,
        not_found,
        &[],
    )
    .await;
    check(
        &server,
        &before,
        "delete unknown dataset",
        ann.delete("/users/ann/datasets/nope").await,
        not_found,
        &[],
    )
    .await;

    // Illegal transitions and bad status requests.
    let status_path = format!("/users/ann/jobs/{id}/status");
    check(
        &server,
        &before,
        "stop a ready job",
        ann.put(&status_path, &json!({"state": "stopping"})).await,
        StatusCode::CONFLICT,
        &[],
    )
    .await;
    check(
        &server,
        &before,
        "request running",
        ann.put(&status_path, &json!({"state": "running"})).await,
        bad,
        &["state"],
    )
    .await;
    check(
        &server,
        &before,
        "unknown state",
        ann.put(&status_path, &json!({"state": "flying"})).await,
        bad,
        &["state"],
    )
    .await;
    check(
        &server,
        &before,
        "delete a dataset in use",
        ann.delete(&format!("/users/ann/datasets/{}", datasets[0])).await,
        StatusCode::CONFLICT,
        &[],
    )
    .await;
    check(
        &server,
        &before,
        "duplicate user",
        server.admin.post("/users", &json!({"id": "ann"})).await,
        StatusCode::CONFLICT,
        &[],
    )
    .await;
    check(
        &server,
        &before,
        "compute rules",
        server
            .admin
            .post("/computes", &json!({"computeId": "", "region": "", "apiKey": "short"}))
            .await,
        bad,
        &["computeId", "region", "apiKey"],
    )
    .await;
    server.stop().await;
}

#[test_log::test(tokio::test)]
async fn everything_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let ann = server.user("ann").await;
    let datasets = setup_hier(&ann, "ann").await;
    let (_, job) = ann.post("/users/ann/jobs", &hier_job(&datasets)).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let (status, _) =
        ann.put(&format!("/users/ann/jobs/{id}/status"), &json!({"state": "starting"})).await;
    assert_eq!(status, StatusCode::OK);
    let tasks = insert_tasks(&server, &id).await;
    let before = server.snapshot().await;
    let (_, code_before) = ann.get_bytes("/users/ann/designs/hier/code").await;
    server.stop().await;

    let server = Server::start(dir.path()).await;
    assert_eq!(server.snapshot().await, before);
    // Old tokens and task keys still work; the code bytes are the same.
    let ann = ann.at(&server.base);
    let ann = Client::new(&server.base, &ann_token(&ann).await);
    let (status, body) = ann.get(&format!("/users/ann/jobs/{id}")).await;
    assert_eq!((status, &body["state"]), (StatusCode::OK, &json!("starting")));
    let (_, code_after) = ann.get_bytes("/users/ann/designs/hier/code").await;
    assert_eq!(code_after, code_before);
    let (task, key) = &tasks[0];
    let (status, _) =
        Client::new(&server.base, key).get(&format!("/tasks/{}/config", task.task_id)).await;
    assert_eq!(status, StatusCode::OK);
    server.stop().await;
}

/// A fresh token for Ann, asked for with the token `ann` holds (which must still be valid).
async fn ann_token(ann: &Client) -> String {
    let (status, body) = ann.post("/users/ann/tokens", &json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

#[test_log::test(tokio::test)]
async fn openapi_health_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let anonymous = Client::anonymous(&server.base);
    let (status, body) = anonymous.get("/healthz").await;
    assert_eq!((status, body), (StatusCode::OK, json!("ok")));
    // The CA is public: served without a token, for clients that check its fingerprint.
    let (status, pem) = anonymous.get("/api/v1/ca.pem").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(pem.as_str(), Some(crate::support::tls().ca.pem()));
    // So is the version: a client asks it before it may have a working token.
    let (status, version) = anonymous.get("/api/v1/version").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version, json!({"version": env!("CARGO_PKG_VERSION"), "apiVersion": "v1"}));
    let (status, doc) = anonymous.get("/api/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/api/v1/users/{user}/jobs",
        "/api/v1/users/{user}/jobs/{jobId}/status",
        "/api/v1/tasks/{taskId}/config",
        "/api/v1/computes/{computeId}/tasks/{taskId}/deployment",
        "/api/v1/computes/{computeId}/tasks/{taskId}/key",
        "/api/v1/computes/{computeId}/endpoints",
        "/api/v1/users/{user}/designs/{designId}/codes",
        "/api/v1/tasks/{taskId}/log",
        "/api/v1/users/{user}/jobs/{jobId}/tasks/{taskId}/log",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from {:?}",
            paths.keys().collect::<Vec<_>>()
        );
    }
    assert!(paths["/api/v1/users/{user}/jobs/{jobId}/status"].get("put").is_some());
    let (status, _) = server.admin.get("/users/admin/jobs").await;
    assert_eq!(status, StatusCode::OK);
    let (status, text) = anonymous.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().unwrap();
    assert!(text.contains("fledge_apiserver_http_requests_total{method=\"GET\",route=\"/api/v1/users/{user}/jobs\",status=\"200\"} 1"),
            "{text}");
    assert!(text.contains("fledge_apiserver_http_request_duration_seconds_bucket"), "{text}");

    // Made-up methods and paths fold into one label each: /metrics does not grow with them.
    let http = crate::support::http();
    let made_up = |i: usize| reqwest::Method::from_bytes(format!("M{i}").as_bytes()).unwrap();
    for i in 0..10 {
        http.request(made_up(i), format!("{}/nope/{i}", server.base)).send().await.unwrap();
    }
    let size_after = |text: Value| text.as_str().unwrap().len();
    let (_, first) = anonymous.get("/metrics").await;
    for i in 10..2_000 {
        http.request(made_up(i), format!("{}/nope/{i}", server.base)).send().await.unwrap();
    }
    let (_, second) = anonymous.get("/metrics").await;
    let text = second.as_str().unwrap().to_owned();
    assert!(!text.contains("M1999") && !text.contains("/nope/"), "{text}");
    assert!(text.contains("method=\"other\",route=\"unmatched\""), "{text}");
    // Only counters and bucket counts changed (a few digits longer), no new series.
    assert!(size_after(second) < size_after(first) + 200, "/metrics grew with made-up requests");
    server.stop().await;
}

/// Found by the API fuzzer (schemathesis, `crates/fledge/tests/api_fuzz.rs`): every operation
/// answers 401 without a token and 403 with one that may not act, but the document listed
/// neither; and a query string that did not parse got axum's plain-text 400 instead of the JSON
/// error body the document promises.
#[test_log::test(tokio::test)]
async fn openapi_documents_auth_errors_and_bad_queries_get_json_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let (status, doc) = Client::anonymous(&server.base).get("/api/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Some(responses) = op.get("responses").and_then(Value::as_object) else { continue };
            operations += 1;
            for code in ["401", "403"] {
                let body = &responses.get(code).unwrap_or_else(|| {
                    panic!("{method} {path} does not document {code}: {responses:?}")
                })["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(body, "#/components/schemas/ApiError", "{method} {path} {code}");
            }
        }
    }
    assert!(operations > 40, "{operations} operations in the document");

    let (status, body) = server.admin.get("/users/admin/jobs/nope/model?round=soon").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["message"].as_str().unwrap().contains("invalid query string"), "{body}");
    let (status, body) = server.admin.get("/users/admin/jobs/nope/tasks/t/log?since=x").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["message"].as_str().unwrap().contains("invalid query string"), "{body}");
    server.stop().await;
}

#[test_log::test(tokio::test)]
async fn participant_run_tasks_take_only_the_key_their_owner_minted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let ann = server.user("ann").await;
    let bob = server.user("bob").await;
    let datasets = setup_hier(&ann, "ann").await;
    let (_, job) = ann.post("/users/ann/jobs", &hier_job(&datasets)).await;
    let id = JobId::new(job["id"].as_str().unwrap());
    let store = &server.store;
    let (_, schema) = store.get_schema(None, &"hier".into(), None).await.unwrap();
    let datasets = store.list_datasets(None).await.unwrap();
    let job = store.get_job(None, &id).await.unwrap();
    let mut tasks = fledge_types::expand::expand(&id, &job.spec, &schema, &datasets, &[]).unwrap();
    // The data owner runs the first trainer: the control plane never hands out its key.
    tasks[0].managed = false;
    let platform_key = fledge_control::api::new_secret();
    let new: Vec<NewTask> = tasks
        .iter()
        .map(|task| NewTask {
            task: task.clone(),
            key_sha256: fledge_control::api::secret_hash(&platform_key),
        })
        .collect();
    store.insert_tasks(&new).await.unwrap();
    let participant = &tasks[0].task_id;
    let config = format!("/tasks/{participant}/config");
    let key_path = format!("/users/ann/jobs/{id}/tasks/{participant}/key");

    // No trust on first use: before a key is minted, no key opens the task (a made-up one, the
    // key a platform-run task would have had), and a made-up key is not pinned either.
    for key in ["the-data-owner's-own-key", platform_key.as_str()] {
        let (status, body) = Client::new(&server.base, key).get(&config).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(body["message"].as_str().unwrap().contains("fledgectl job join"), "{body}");
    }
    let (status, join) = ann.get(&format!("/users/ann/jobs/{id}/join")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(join["keyed"], json!([]), "{join}");

    // The job's owner mints the key; only that key works, and it keeps working.
    let (status, minted) = ann.post(&key_path, &json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{minted}");
    assert_eq!(minted["taskId"], json!(participant.as_str()));
    let key = minted["key"].as_str().unwrap().to_owned();
    assert_eq!(key.len(), 64);
    let owner = Client::new(&server.base, &key);
    assert_eq!(owner.get(&config).await.0, StatusCode::OK);
    assert_eq!(owner.get(&config).await.0, StatusCode::OK, "and keeps working");
    let (status, _) = Client::new(&server.base, "someone-else").get(&config).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "another key is refused");
    let (_, join) = ann.get(&format!("/users/ann/jobs/{id}/join")).await;
    assert_eq!(join["keyed"], json!([participant.as_str()]), "{join}");
    // The key is stored hashed: it appears nowhere in the database file.
    let db = std::fs::read(dir.path().join("fledge.db")).unwrap();
    let wal = std::fs::read(dir.path().join("fledge.db-wal")).unwrap_or_default();
    for bytes in [&db, &wal] {
        assert!(!bytes.windows(key.len()).any(|w| w == key.as_bytes()), "plain key at rest");
    }

    // Nobody else may mint or revoke it: another user gets 403 (their name) or 404 (ann's job).
    assert_eq!(bob.post(&key_path, &json!({})).await.0, StatusCode::FORBIDDEN);
    let (status, _) =
        bob.post(&format!("/users/bob/jobs/{id}/tasks/{participant}/key"), &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(owner.get(&config).await.0, StatusCode::OK, "unchanged");

    // Re-minting replaces the key; revoking leaves none.
    let (status, again) = ann.post(&key_path, &json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let new_key = again["key"].as_str().unwrap().to_owned();
    assert_ne!(new_key, key);
    assert_eq!(owner.get(&config).await.0, StatusCode::UNAUTHORIZED, "the old key is dead");
    let renewed = Client::new(&server.base, &new_key);
    assert_eq!(renewed.get(&config).await.0, StatusCode::OK);
    let (status, _) = ann.delete(&key_path).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(renewed.get(&config).await.0, StatusCode::UNAUTHORIZED, "revoked");

    // Platform-run tasks take no minted key; unknown tasks are 404.
    let (status, body) =
        ann.post(&format!("/users/ann/jobs/{id}/tasks/{}/key", tasks[1].task_id), &json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["message"].as_str().unwrap().contains("platform-run"), "{body}");
    let (status, _) = ann.post(&format!("/users/ann/jobs/{id}/tasks/nope/key"), &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Managed tasks take their deployer's key only: a made-up key is refused.
    let managed = format!("/tasks/{}/config", tasks[1].task_id);
    assert_eq!(
        Client::new(&server.base, "made-up").get(&managed).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(Client::new(&server.base, &platform_key).get(&managed).await.0, StatusCode::OK);

    // Once the job is final, every key of it is dead and none can be minted.
    let (status, minted) = ann.post(&key_path, &json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let last = Client::new(&server.base, minted["key"].as_str().unwrap());
    assert_eq!(last.get(&config).await.0, StatusCode::OK);
    store.set_job_state(&id, &[JobState::Ready], JobState::Failed, Some("test")).await.unwrap();
    assert_eq!(last.get(&config).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(
        Client::new(&server.base, &platform_key).get(&managed).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, body) = ann.post(&key_path, &json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body["message"].as_str().unwrap().contains("failed"), "{body}");
    server.stop().await;
}

#[test_log::test(tokio::test)]
async fn tokens_are_listed_expire_and_are_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let ann = server.user("ann").await;
    let bob = server.user("bob").await;

    // Issue a token with a description and a lifetime; list it (never its secret).
    let (status, issued) =
        ann.post("/users/ann/tokens", &json!({"description": "ci", "ttlSecs": 3600})).await;
    assert_eq!(status, StatusCode::CREATED, "{issued}");
    let secret = issued["token"].as_str().unwrap().to_owned();
    let token_id = issued["id"].as_str().unwrap().to_owned();
    assert!(issued["expiresAt"].is_string(), "{issued}");
    let ci = Client::new(&server.base, &secret);
    assert_eq!(ci.get("/whoami").await.1["id"], json!("ann"));
    let (status, listed) = ann.get("/users/ann/tokens").await;
    assert_eq!(status, StatusCode::OK);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "the one `user` issued and this one: {listed:?}");
    let entry = listed.iter().find(|t| t["id"] == json!(token_id)).unwrap();
    assert_eq!((&entry["description"], &entry["user"]), (&json!("ci"), &json!("ann")));
    assert!(!serde_json::to_string(&listed).unwrap().contains(&secret), "no secret listed");
    // Bob cannot see or revoke Ann's tokens; the admin can see them.
    assert_eq!(bob.get("/users/ann/tokens").await.0, StatusCode::FORBIDDEN);
    assert_eq!(bob.delete(&format!("/users/ann/tokens/{token_id}")).await.0, StatusCode::FORBIDDEN);
    assert_eq!(bob.delete(&format!("/users/bob/tokens/{token_id}")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(server.admin.get("/users/ann/tokens").await.1.as_array().unwrap().len(), 2);
    assert_eq!(server.admin.get("/users/nobody/tokens").await.0, StatusCode::NOT_FOUND);

    // Revoked: 401 from then on, and gone from the listing.
    let (status, _) = ann.delete(&format!("/users/ann/tokens/{token_id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = ci.get("/whoami").await;
    assert_eq!((status, &body["code"]), (StatusCode::UNAUTHORIZED, &json!("UNAUTHENTICATED")));
    assert_eq!(ann.delete(&format!("/users/ann/tokens/{token_id}")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(ann.get("/users/ann/tokens").await.1.as_array().unwrap().len(), 1);

    // Expired: a 1-second token is refused once its second has passed (the store compares
    // against the clock, so this waits for the expiry rather than timing anything).
    let (_, short) = ann.post("/users/ann/tokens", &json!({"ttlSecs": 1})).await;
    let short = Client::new(&server.base, short["token"].as_str().unwrap());
    let expires = chrono::Utc::now() + chrono::Duration::milliseconds(1100);
    while chrono::Utc::now() < expires {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (status, body) = short.get("/whoami").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");

    // Bad requests name their fields.
    let (status, body) =
        ann.post("/users/ann/tokens", &json!({"ttlSecs": 0, "description": "x".repeat(300)})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let paths: Vec<_> = body["details"].as_array().unwrap().iter().map(|d| &d["path"]).collect();
    assert_eq!(paths, [&json!("description"), &json!("ttlSecs")], "{body}");
    let (status, body) = ann.post("/users/ann/tokens", &json!({"ttl": 5})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("ttl"), "{body}");
    server.stop().await;
}

#[test_log::test(tokio::test)]
async fn trained_models_are_listed_and_downloaded_by_their_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path()).await;
    let ann = server.user("ann").await;
    let bob = server.user("bob").await;
    let datasets = setup_hier(&ann, "ann").await;
    let (status, job) = ann.post("/users/ann/jobs", &hier_job(&datasets)).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let models = format!("/users/ann/jobs/{id}/models");
    let model = format!("/users/ann/jobs/{id}/model");

    // Nothing trained yet.
    assert_eq!(ann.get(&models).await, (StatusCode::OK, json!([])));
    let (status, body) = ann.get(&model).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["message"].as_str().unwrap().contains("has no final model"), "{body}");

    // What the aggregators write into the platform's registry.
    let job_dir = dir.path().join("registry/jobs").join(&id);
    let files = [
        ("final.safetensors", b"final".as_slice()),
        ("rounds/round-00001.safetensors", b"round one"),
        ("eu/final.safetensors", b"eu final"),
    ];
    for (rel, bytes) in files {
        let path = job_dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let (status, listed) = ann.get(&models).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed, json!([{"round": 1, "size": 9}, {"size": 5}, {"group": "eu", "size": 8}]));
    assert_eq!(ann.get_bytes(&model).await, (StatusCode::OK, b"final".to_vec()));
    assert_eq!(
        ann.get_bytes(&format!("{model}?round=1")).await,
        (StatusCode::OK, b"round one".to_vec())
    );
    assert_eq!(
        ann.get_bytes(&format!("{model}?group=eu")).await,
        (StatusCode::OK, b"eu final".to_vec())
    );
    let (status, body) = ann.get(&format!("{model}?round=7")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["message"].as_str().unwrap().contains("no model for round 7"), "{body}");
    for bad in ["..", "eu%2F..", "..%2F..%2Fsecrets"] {
        let (status, body) = ann.get(&format!("{model}?group={bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    let (status, _) = ann.get(&format!("{model}?round=-1")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Another user gets nothing, by either path.
    assert_eq!(bob.get(&models).await.0, StatusCode::FORBIDDEN);
    assert_eq!(bob.get(&format!("/users/bob/jobs/{id}/models")).await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        bob.get_bytes(&format!("/users/bob/jobs/{id}/model")).await.0,
        StatusCode::NOT_FOUND
    );

    // A job with its own registry: the apiserver says where its models are.
    let mut own = hier_job(&datasets);
    own["modelSpec"]["registry"] = json!({"sort": "local", "uri": "/srv/models"});
    let (status, job) = ann.post("/users/ann/jobs", &own).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let (status, body) =
        ann.get(&format!("/users/ann/jobs/{}/models", job["id"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["message"].as_str().unwrap().contains("/srv/models"), "{body}");
    server.stop().await;
}
