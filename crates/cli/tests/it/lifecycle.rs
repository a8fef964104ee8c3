//! The three-tier hierarchical lifecycle through the CLI: design, schema, code, four datasets,
//! plan (4 trainers, 2 middle aggregators, 1 top aggregator), job, start, get, stop, remove.

use serde_json::{Value, json};

use fledge_types::{JobId, JobState};

use crate::support::{Server, fixture, s};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hierarchical_job_lifecycle() {
    let server = Server::start().await;
    let fx = fixture();

    assert_eq!(
        server.ctl(&["create", "design", "hier-cli", "--name", "Hierarchical"]).await.ok(),
        "hier-cli"
    );
    let schema = fx.join("schema.json");
    assert_eq!(
        server.ctl(&["create", "schema", s(&schema), "--design", "hier-cli"]).await.ok(),
        "1"
    );
    assert_eq!(
        server.ctl(&["create", "code", s(&fx.join("code")), "-d", "hier-cli"]).await.ok(),
        "1"
    );
    // The same schema again is a new revision (update is an alias of create for revisions).
    assert_eq!(server.ctl(&["update", "schema", s(&schema), "-d", "hier-cli"]).await.ok(), "2");

    let mut ids = Vec::new();
    for name in ["uk", "de", "us-west", "us-east"] {
        let file = fx.join(format!("dataset-{name}.json"));
        ids.push(server.ctl(&["create", "dataset", s(&file)]).await.ok());
    }
    let datasets = server.ctl(&["get", "datasets", "-o", "json"]).await.json();
    assert_eq!(datasets.as_array().unwrap().len(), 4);
    let table = server.ctl(&["get", "datasets"]).await.ok();
    assert!(table.starts_with("ID") && table.contains("cli-mnist-us-east"), "{table}");

    // job.json with dataset ids inline and the model spec by path (relative to job.json).
    let job_dir = server.path("job");
    std::fs::create_dir_all(&job_dir).unwrap();
    std::fs::copy(fx.join("modelSpec.json"), job_dir.join("modelSpec.json")).unwrap();
    let job_json = job_dir.join("job.json");
    std::fs::write(
        &job_json,
        serde_json::to_string_pretty(&json!({
            "name": "hier via cli",
            "designId": "hier-cli",
            "dataSpec": [{"role": "trainer", "datasetGroups": {"eu": [ids[0], ids[1]], "us": [ids[2], ids[3]]}}],
            "modelSpecPath": "modelSpec.json"
        }))
        .unwrap(),
    )
    .unwrap();

    let plan = server.ctl(&["job", "plan", s(&job_json)]).await;
    let table = plan.ok();
    assert!(
        plan.stderr.contains("7 tasks (trainer: 4, middle-aggregator: 2, top-aggregator: 1)"),
        "{}",
        plan.stderr
    );
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 8, "{table}");
    assert!(lines[0].starts_with("ROLE") && lines[0].contains("GROUPS"), "{table}");
    let plan_json = server.ctl(&["job", "plan", s(&job_json), "-o", "json"]).await.json();
    let roles: Vec<&str> =
        plan_json.as_array().unwrap().iter().map(|t| t["role"].as_str().unwrap()).collect();
    assert_eq!(roles.iter().filter(|r| **r == "trainer").count(), 4);
    assert_eq!(roles.iter().filter(|r| **r == "middle-aggregator").count(), 2);
    assert_eq!(roles.iter().filter(|r| **r == "top-aggregator").count(), 1);
    // Planning stored nothing.
    assert_eq!(server.ctl(&["get", "jobs", "-o", "json"]).await.json(), json!([]));

    let job_id = server.ctl(&["create", "job", s(&job_json)]).await.ok();
    let job = server.ctl(&["get", "job", &job_id, "-o", "json"]).await.json();
    assert_eq!(job["state"], "ready");
    assert_eq!(job["spec"]["modelSpec"]["hyperparameters"]["rounds"], 3);
    assert_eq!(job["schemaVersion"], "2");
    let jobs = server.ctl(&["get", "jobs"]).await.ok();
    assert!(jobs.contains(&job_id) && jobs.contains("ready"), "{jobs}");

    let started = server.ctl(&["start", "job", &job_id, "-o", "json"]).await.json();
    assert_eq!(started["state"], "starting");
    let yaml = server.ctl(&["get", "job", &job_id, "-o", "yaml"]).await.ok();
    assert!(yaml.contains("state: starting"), "{yaml}");
    let status = server.ctl(&["get", "status", &job_id, "-o", "json"]).await.json();
    assert_eq!(status["state"], "starting");
    // Starting twice is an illegal transition: the server's 409 comes through.
    let again = server.ctl(&["start", "job", &job_id]).await;
    assert!(again.fails(2).contains("409"), "{}", again.stderr);

    assert_eq!(server.ctl(&["stop", "job", &job_id]).await.ok(), job_id);
    let stopped = server.ctl(&["get", "jobs", "--state", "stopping", "-o", "json"]).await.json();
    assert_eq!(stopped.as_array().unwrap().len(), 1, "{stopped}");
    let removing = server.ctl(&["remove", "job", &job_id]).await;
    removing.fails(2);

    // The controller would end it; then it can be removed.
    server
        .store
        .set_job_state(
            &JobId::new(job_id.clone()),
            &[JobState::Stopping],
            JobState::Terminated,
            None,
        )
        .await
        .unwrap();
    server.ctl(&["remove", "job", &job_id]).await.ok();
    assert_eq!(server.ctl(&["get", "jobs", "-o", "json"]).await.json(), json!([]));

    // Reading back what was registered.
    let fetched: Value =
        server.ctl(&["get", "schema", "-d", "hier-cli", "-o", "json"]).await.json();
    let original: Value = serde_json::from_slice(&std::fs::read(&schema).unwrap()).unwrap();
    assert_eq!(
        fetched["roles"].as_array().unwrap().len(),
        original["roles"].as_array().unwrap().len()
    );
    let zip_path = server.path("code.zip");
    server.ctl(&["get", "code", "-d", "hier-cli", "-f", s(&zip_path)]).await.ok();
    assert!(std::fs::metadata(&zip_path).unwrap().len() > 0);
    let designs = server.ctl(&["get", "designs", "-o", "json"]).await.json();
    assert_eq!(designs[0]["schemaVersions"], json!(["1", "2"]));
    server.ctl(&["remove", "design", "hier-cli"]).await.ok();
    server.ctl(&["remove", "dataset", &ids[0]]).await.ok();
    assert_eq!(
        server.ctl(&["get", "datasets", "-o", "json"]).await.json().as_array().unwrap().len(),
        3
    );
}
