//! The MLflow registry against a real MLflow tracking server (`FLEDGE_MLFLOW_URL`, started by
//! `scripts/test-all` with `--serve-artifacts`), checked through MLflow's own REST API: every
//! [`Registry`] method, two tasks of one job sharing one job run, an outage that keeps every
//! record until the server is back, and the check a job's registry passes at creation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fledge_algorithms::{Tensor, Weights};
use fledge_sdk::registry::mlflow::{ModelMeta, check};
use fledge_sdk::registry::{MlflowRegistry, Registry};
use fledge_types::{JobId, MetricRecord, RegistrySpec, TaskConfig};
use serde_json::{Value, json};

/// The server's URL, or `None` (and a message) when the tests are to be skipped.
fn server() -> Option<String> {
    match std::env::var("FLEDGE_MLFLOW_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("FLEDGE_MLFLOW_URL is not set: MLflow registry tests skipped");
            None
        }
    }
}

/// A name no other run of the tests has used.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    format!("{prefix}-{}-{}", std::process::id(), nanos.as_nanos())
}

fn model(v: f32) -> Weights {
    Weights::from_tensors(vec![
        Tensor::new("z.weight", vec![2, 3], vec![v, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap(),
        Tensor::new("a.bias", vec![2], vec![0.5, v]).unwrap(),
    ])
    .unwrap()
}

/// The config of task `task` of job `job` with an MLflow registry at `url`.
fn config(url: &str, job: &str, task_index: usize) -> TaskConfig {
    let plan = fledge_sdk::plan::JobPlan::local(job, vec!["/d1".to_owned(), "/d2".to_owned()]);
    let mut config = plan.configs().unwrap().remove(task_index);
    config.registry = RegistrySpec { sort: "mlflow".into(), uri: url.to_owned() };
    config.job.name = format!("{job}-model");
    config.job.design = "fledge-registry-test".into();
    config.hyperparameters.insert("rounds".into(), json!(2));
    config
}

fn record(task: &str, round: u64, accuracy: f64, loss: f64) -> MetricRecord {
    MetricRecord {
        task_id: task.into(),
        role: "aggregator".into(),
        round,
        metrics: BTreeMap::from([
            ("global.accuracy".to_owned(), accuracy),
            ("global.loss".to_owned(), loss),
        ]),
        timestamp: None,
    }
}

/// MLflow's REST API, as a user would query it.
struct Mlflow {
    http: reqwest::Client,
    url: String,
}

impl Mlflow {
    fn new(url: &str) -> Mlflow {
        fledge_tls::install_default_provider();
        Mlflow { http: reqwest::Client::new(), url: url.trim_end_matches('/').to_owned() }
    }

    async fn get(&self, endpoint: &str, query: &[(&str, &str)]) -> Value {
        let resp = self
            .http
            .get(format!("{}/api/2.0/mlflow/{endpoint}", self.url))
            .query(query)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "{endpoint}: {status} {body}");
        body
    }

    async fn post(&self, endpoint: &str, body: Value) -> Value {
        let resp = self
            .http
            .post(format!("{}/api/2.0/mlflow/{endpoint}", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "{endpoint}: {status} {body}");
        body
    }

    async fn artifact(&self, path: &str) -> Vec<u8> {
        let resp = self
            .http
            .get(format!("{}/api/2.0/mlflow-artifacts/artifacts/{path}", self.url))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.bytes().await.unwrap().to_vec()
    }

    /// Active runs of the test experiment matching `filter`.
    async fn runs(&self, filter: &str) -> Vec<Value> {
        let experiment = self
            .get("experiments/get-by-name", &[("experiment_name", "fledge-registry-test")])
            .await;
        let id = experiment["experiment"]["experiment_id"].as_str().unwrap().to_owned();
        let found = self
            .post(
                "runs/search",
                json!({"experiment_ids": [id], "filter": filter, "max_results": 100}),
            )
            .await;
        found["runs"].as_array().cloned().unwrap_or_default()
    }

    /// `(step, value)` of every logged value of `key` in `run`.
    async fn history(&self, run: &str, key: &str) -> Vec<(i64, f64)> {
        let found = self.get("metrics/get-history", &[("run_id", run), ("metric_key", key)]).await;
        let mut values: Vec<(i64, f64)> = found["metrics"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|m| (m["step"].as_i64().unwrap(), m["value"].as_f64().unwrap()))
            .collect();
        values.sort_by(|a, b| a.partial_cmp(b).unwrap());
        values
    }
}

fn tag<'a>(run: &'a Value, key: &str) -> Option<&'a str> {
    run["data"]["tags"].as_array()?.iter().find(|t| t["key"] == key)?["value"].as_str()
}

fn param<'a>(run: &'a Value, key: &str) -> Option<&'a str> {
    run["data"]["params"].as_array()?.iter().find(|t| t["key"] == key)?["value"].as_str()
}

fn run_id(run: &Value) -> String {
    run["info"]["run_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_registry_method_lands_in_mlflow() {
    let Some(url) = server() else { return };
    let mlflow = Mlflow::new(&url);
    let work = tempfile::tempdir().unwrap();
    let job = unique("job");
    // Two tasks of one job (an aggregator and a second writer): one job run, a run each.
    let top = config(&url, &job, 0);
    let other = config(&url, &job, 1);
    let job_id = JobId::from(job.as_str());
    let (reg, reg2) = (
        Arc::new(MlflowRegistry::for_task(&top, None, work.path()).unwrap()),
        Arc::new(MlflowRegistry::for_task(&other, None, work.path()).unwrap()),
    );
    let (r, r2, j) = (reg.clone(), reg2.clone(), job_id.clone());
    let task = top.task_id.to_string();
    let other_task = other.task_id.to_string();
    tokio::task::spawn_blocking(move || {
        r.save_round(&j, 1, &model(1.0)).unwrap();
        r.append_metrics(&j, &[record(&task, 1, 0.5, 1.5)]).unwrap();
        r.save_round(&j, 2, &model(2.0)).unwrap();
        r.append_metrics(&j, &[record(&task, 2, 0.75, 0.7)]).unwrap();
        r.save_final(&j, &model(3.0)).unwrap();
        r2.append_metrics(&j, &[record(&other_task, 1, 0.1, 9.0)]).unwrap();
        r.finish(true).unwrap();
        r2.finish(true).unwrap();
    })
    .await
    .unwrap();
    for r in [&reg, &reg2] {
        let left: Vec<_> = std::fs::read_dir(r.spool_dir()).unwrap().collect();
        assert!(left.is_empty(), "the spool drains once MLflow has everything: {left:?}");
    }

    let job_runs =
        mlflow.runs(&format!("tags.`fledge.job` = '{job}' and tags.`fledge.kind` = 'job'")).await;
    assert_eq!(job_runs.len(), 1, "one run per job: {job_runs:#?}");
    let job_run = &job_runs[0];
    assert_eq!(param(job_run, "rounds"), Some("2"));
    assert_eq!(param(job_run, "optimizer"), Some("fedavg"));
    assert_eq!(tag(job_run, "fledge.design"), Some("fledge-registry-test"));
    assert_eq!(job_run["info"]["status"], "FINISHED");
    let children = mlflow.runs(&format!("tags.`mlflow.parentRunId` = '{}'", run_id(job_run))).await;
    assert_eq!(children.len(), 2, "a nested run per writing task: {children:#?}");
    let child =
        children.iter().find(|r| tag(r, "fledge.task") == Some(top.task_id.as_str())).unwrap();
    assert_eq!(tag(child, "fledge.role"), Some(top.role.as_str()));
    let child_id = run_id(child);
    assert_eq!(mlflow.history(&child_id, "global.accuracy").await, [(1, 0.5), (2, 0.75)]);
    assert_eq!(mlflow.history(&child_id, "global.loss").await, [(1, 1.5), (2, 0.7)]);

    // Artifacts: every round and the final model, each with its metadata.
    let listed = mlflow.get("artifacts/list", &[("run_id", &child_id), ("path", "rounds")]).await;
    let dirs: Vec<&str> =
        listed["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(dirs, ["rounds/round-00001", "rounds/round-00002"]);
    let root =
        child["info"]["artifact_uri"].as_str().unwrap().trim_start_matches("mlflow-artifacts:/");
    let meta: ModelMeta = serde_json::from_slice(
        &mlflow.artifact(&format!("{root}/rounds/round-00002/fledge.json")).await,
    )
    .unwrap();
    assert_eq!(meta.round, Some(2));
    assert_eq!(meta.tensors[0].name, "z.weight");
    assert_eq!(meta.tensors[0].shape, [2, 3]);
    let bytes = mlflow.artifact(&format!("{root}/final/model.safetensors")).await;
    assert_eq!(fledge_sdk::registry::from_safetensors("final", &bytes).unwrap(), model(3.0));

    // The final model is version 1 of the model named by the job, and loads back.
    let name = format!("{job}-model");
    assert_eq!(reg.model_name(), name);
    let versions =
        mlflow.get("model-versions/search", &[("filter", &format!("name = '{name}'"))]).await;
    let versions = versions["model_versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "{versions:#?}");
    assert_eq!(versions[0]["version"], "1");
    assert_eq!(versions[0]["run_id"], child_id.as_str());
    let (r, n) = (reg.clone(), name.clone());
    let (loaded, missing) = tokio::task::spawn_blocking(move || {
        (r.load_model(&n, 1).unwrap(), r.load_model(&n, 7).unwrap())
    })
    .await
    .unwrap();
    assert_eq!(loaded, Some(model(3.0)), "load_model reads the registered version");
    assert_eq!(missing, None, "a version that does not exist is none, not an error");

    // save_model registers a model of its own name, which load_model reads back.
    let base = unique("base");
    let (r, b) = (reg.clone(), base.clone());
    let back = tokio::task::spawn_blocking(move || {
        r.save_model(&b, 1, &model(9.0)).unwrap();
        r.finish(true).unwrap();
        r.load_model(&b, 1).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(back, Some(model(9.0)));
}

/// A TCP relay to the server that can refuse every connection, as a server that is down.
struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    async fn start(target: &str) -> Relay {
        let target = reqwest::Url::parse(target).unwrap();
        let addr =
            format!("{}:{}", target.host_str().unwrap(), target.port_or_known_default().unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(false));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (flag, cuts) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if !flag.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let addr = addr.clone();
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&addr).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Relay { port, up, cut }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_outage_keeps_every_record_until_mlflow_is_back() {
    let Some(url) = server() else { return };
    let mlflow = Mlflow::new(&url);
    let relay = Relay::start(&url).await;
    let work = tempfile::tempdir().unwrap();
    let job = unique("outage");
    let config = config(&format!("http://127.0.0.1:{}", relay.port), &job, 0);
    let reg = Arc::new(MlflowRegistry::for_task(&config, None, work.path()).unwrap());
    let task = config.task_id.to_string();

    // Down from the start: rounds are taken, kept in the spool, and not reported as stored.
    let (r, t, j) = (reg.clone(), task.clone(), JobId::from(job.as_str()));
    let err = tokio::task::spawn_blocking(move || {
        for round in 1..=3 {
            r.save_round(&j, round, &model(round as f32)).unwrap();
            r.append_metrics(&j, &[record(&t, round, 0.1 * round as f64, 1.0)]).unwrap();
        }
        r.finish_within(true, Duration::from_secs(2)).unwrap_err().to_string()
    })
    .await
    .unwrap();
    assert!(err.contains("6 record(s) were not taken"), "{err}");
    assert!(err.contains(&reg.spool_dir().display().to_string()), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{}", relay.port)), "the error names the URL: {err}");

    // Back: everything arrives, in order, once.
    relay.set_up(true);
    let (r, t, j) = (reg.clone(), task.clone(), JobId::from(job.as_str()));
    tokio::task::spawn_blocking(move || {
        r.append_metrics(&j, &[record(&t, 4, 0.4, 1.0)]).unwrap();
        r.finish_within(true, Duration::from_secs(120)).unwrap();
    })
    .await
    .unwrap();
    let runs = mlflow
        .runs(&format!("tags.`fledge.job` = '{job}' and tags.`fledge.task` = '{task}'"))
        .await;
    assert_eq!(runs.len(), 1);
    let run = run_id(&runs[0]);
    let steps: Vec<i64> =
        mlflow.history(&run, "global.accuracy").await.into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [1, 2, 3, 4], "every round, each once");
    let listed = mlflow.get("artifacts/list", &[("run_id", &run), ("path", "rounds")]).await;
    assert_eq!(listed["files"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn the_creation_check_accepts_the_server_and_names_a_dead_one() {
    let Some(url) = server() else { return };
    check(&url, None, Duration::from_secs(10)).await.unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = format!("http://127.0.0.1:{port}");
    let err = check(&dead, None, Duration::from_secs(5)).await.unwrap_err().to_string();
    assert!(err.contains(&dead) && err.contains("unreachable"), "{err}");

    // A web server that is not MLflow (a misconfigured uri): refused, saying so.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let page = "<html>not mlflow</html>";
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{page}",
                page.len()
            );
            let _ = conn.write_all(answer.as_bytes()).await;
        }
    });
    let err = check(&other, None, Duration::from_secs(5)).await.unwrap_err().to_string();
    assert!(err.contains(&other) && err.contains("not MLflow's JSON"), "{err}");
}
