//! Specs written for Cisco Flame load and expand unchanged (issue #11): the Flame-shaped golden
//! cases of `fledge-types` (`crates/types/tests/golden/flame-*`: a job file without `name`,
//! datasets that all share the name "MNIST dataset", `registry.sort: "dummy"`) go through
//! `fledgectl create …` and `fledgectl job plan` against the real REST API, and expand exactly
//! as the golden expansion does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use fledge_types::{Dataset, DatasetId, JobId, JobSpec, Schema, expand};

use crate::support::{Server, s};

fn golden(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../types/tests/golden").join(case)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flame_mnist_loads_and_expands_unchanged() {
    flame_case("flame-mnist", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flame_hier_mnist_loads_and_expands_unchanged() {
    flame_case("flame-hier-mnist", 4).await;
}

async fn flame_case(case: &str, n_datasets: usize) {
    let server = Server::start().await;
    let dir = golden(case);
    let job: Value = read_json(&dir.join("job.json"));
    assert!(job.get("name").is_none(), "a Flame job file has no name");
    assert_eq!(job["modelSpec"]["registry"]["sort"], "dummy");
    let design = job["designId"].as_str().unwrap().to_owned();

    // The design, its schema file as Flame publishes it, and a code folder per role.
    assert_eq!(server.ctl(&["create", "design", &design]).await.ok(), design);
    let schema_file = dir.join("schema.json");
    assert_eq!(server.ctl(&["create", "schema", s(&schema_file), "-d", &design]).await.ok(), "1");
    let schema: Schema = serde_json::from_value(read_json(&schema_file)).unwrap();
    let code = server.path("code");
    for role in &schema.roles {
        std::fs::create_dir_all(code.join(&role.name)).unwrap();
        std::fs::write(code.join(&role.name).join("main.py"), "print('flame')\n").unwrap();
    }
    assert_eq!(server.ctl(&["create", "code", s(&code), "-d", &design]).await.ok(), "1");

    // Every dataset file registers, though they all share one name; each gets its own id.
    let golden_datasets: Vec<Dataset> =
        serde_json::from_value(read_json(&dir.join("datasets.json"))).unwrap();
    assert_eq!(golden_datasets.len(), n_datasets);
    assert!(golden_datasets.iter().all(|d| d.spec.name == "MNIST dataset"));
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    for (idx, dataset) in golden_datasets.iter().enumerate() {
        let file = server.path(&format!("dataset{idx}.json"));
        std::fs::write(&file, serde_json::to_string_pretty(&dataset.spec).unwrap()).unwrap();
        let id = server.ctl(&["create", "dataset", s(&file)]).await.ok();
        assert!(!ids.values().any(|seen| *seen == id), "dataset ids are unique");
        ids.insert(dataset.id.to_string(), id);
    }
    let listed = server.ctl(&["get", "datasets", "-o", "json"]).await.json();
    assert_eq!(listed.as_array().unwrap().len(), n_datasets);

    // A shared name is ambiguous on the command line: the error lists every id; an id works.
    let ambiguous = server.ctl(&["get", "dataset", "MNIST dataset"]).await;
    let stderr = ambiguous.fails(64);
    assert!(stderr.contains(&format!("{n_datasets} datasets share it")), "{stderr}");
    for id in ids.values() {
        assert!(stderr.contains(id.as_str()), "{id} missing from: {stderr}");
    }
    let first = ids.values().next().unwrap().clone();
    let got = server.ctl(&["get", "dataset", &first, "-o", "json"]).await.json();
    assert_eq!(got["name"], "MNIST dataset");

    // The job file as Flame writes it; only the dataset ids are the ones this server assigned.
    let mut job_text = std::fs::read_to_string(dir.join("job.json")).unwrap();
    for (golden_id, id) in &ids {
        job_text = job_text.replace(golden_id.as_str(), id);
    }
    let job_json = server.path("job.json");
    std::fs::write(&job_json, &job_text).unwrap();

    let plan = server.ctl(&["job", "plan", s(&job_json), "-o", "json"]).await;
    let planned = plan.json();
    assert!(plan.stderr.contains(&format!("job {design:?} expands to")), "{}", plan.stderr);
    let planned: Vec<(String, u64, Value, Option<String>)> = planned
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let dataset = t["datasetId"].as_str().map(|id| {
                ids.iter().find(|(_, v)| v.as_str() == id).map(|(k, _)| k.clone()).unwrap()
            });
            (
                t["role"].as_str().unwrap().to_owned(),
                t["index"].as_u64().unwrap(),
                t["groupAssociation"].clone(),
                dataset,
            )
        })
        .collect();
    // The golden expansion of the same files (golden dataset ids), as `fledge-types` tests it.
    let spec: JobSpec =
        fledge_types::json::from_slice(&std::fs::read(dir.join("job.json")).unwrap()).unwrap();
    let expected: Vec<(String, u64, Value, Option<String>)> = expand::expand(
        &JobId::new("golden"),
        &spec.with_defaults(),
        &schema,
        &golden_datasets,
        &[],
    )
    .unwrap()
    .into_iter()
    .map(|t| {
        (
            t.role,
            u64::from(t.index),
            serde_json::to_value(&t.group_association).unwrap(),
            t.dataset_id.as_ref().map(DatasetId::to_string),
        )
    })
    .collect();
    assert_eq!(planned, expected);

    // Created: the job is named after its design and keeps Flame's dummy registry.
    let job_id = server.ctl(&["create", "job", s(&job_json)]).await.ok();
    let created = server.ctl(&["get", "job", &job_id, "-o", "json"]).await.json();
    assert_eq!(created["spec"]["name"], design.as_str());
    assert_eq!(created["spec"]["modelSpec"]["registry"]["sort"], "dummy");
    assert_eq!(created["state"], "ready");

    // Removing by a shared name is refused the same way; nothing is removed.
    let removing = server.ctl(&["remove", "dataset", "MNIST dataset"]).await;
    assert!(removing.fails(64).contains("ambiguous"), "{}", removing.stderr);
    let listed = server.ctl(&["get", "datasets", "-o", "json"]).await.json();
    assert_eq!(listed.as_array().unwrap().len(), n_datasets);
}
