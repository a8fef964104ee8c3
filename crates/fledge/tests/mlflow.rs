//! The MLflow registry end to end (issue 16): `examples/mnist` through the real binaries with
//! `modelSpec.registry` an MLflow tracking server (`FLEDGE_MLFLOW_URL`, started by
//! `scripts/test-all`) behind a relay that requires a bearer token (the platform's
//! `FLEDGE_MLFLOW_TOKEN`, which reaches the deployed aggregator through its task config only),
//! checked through MLflow's own REST API; the job's models listed and downloaded with
//! `fledgectl` through the apiserver, the final one evaluating to the reported accuracy; a
//! second job starts from the registered version; a job naming an unreachable MLflow is
//! refused at creation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;

use fledge_types::JobState;
use serde_json::{Value, json};

use support::{Platform, copy_example, records_of, repo_root};

fn server() -> Option<String> {
    match std::env::var("FLEDGE_MLFLOW_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("FLEDGE_MLFLOW_URL is not set: MLflow end-to-end tests skipped");
            None
        }
    }
}

/// A copy of `examples/mnist` in `dir` as design `design`, job `name`, with `rounds` rounds,
/// the model spec's `extra` fields merged in.
fn mnist_job(dir: &Path, design: &str, name: &str, rounds: u64, extra: Value) {
    copy_example("mnist", dir);
    let job_path = dir.join("job.json");
    let mut job: Value =
        serde_json::from_str(&std::fs::read_to_string(&job_path).unwrap()).unwrap();
    job["designId"] = json!(design);
    job["name"] = json!(name);
    std::fs::write(&job_path, serde_json::to_string_pretty(&job).unwrap()).unwrap();
    let model_path = dir.join("modelSpec.json");
    let mut model: Value =
        serde_json::from_str(&std::fs::read_to_string(&model_path).unwrap()).unwrap();
    model["hyperparameters"]["rounds"] = json!(rounds);
    for (k, v) in extra.as_object().unwrap() {
        if k == "hyperparameters" {
            for (hk, hv) in v.as_object().unwrap() {
                model["hyperparameters"][hk] = hv.clone();
            }
        } else {
            model[k] = v.clone();
        }
    }
    std::fs::write(&model_path, serde_json::to_string_pretty(&model).unwrap()).unwrap();
}

struct Mlflow {
    http: reqwest::Client,
    url: String,
}

impl Mlflow {
    async fn call(
        &self,
        method: reqwest::Method,
        endpoint: &str,
        query: &[(&str, &str)],
        body: Option<Value>,
    ) -> Value {
        let mut req = self
            .http
            .request(method, format!("{}/api/2.0/mlflow/{endpoint}", self.url))
            .query(query);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert!(status.is_success(), "{endpoint}: {status} {body}");
        body
    }

    async fn get(&self, endpoint: &str, query: &[(&str, &str)]) -> Value {
        self.call(reqwest::Method::GET, endpoint, query, None).await
    }

    async fn search(&self, experiment: &str, filter: &str) -> Vec<Value> {
        let exp = self.get("experiments/get-by-name", &[("experiment_name", experiment)]).await;
        let id = exp["experiment"]["experiment_id"].as_str().unwrap().to_owned();
        let found = self
            .call(
                reqwest::Method::POST,
                "runs/search",
                &[],
                Some(json!({"experiment_ids": [id], "filter": filter, "max_results": 100})),
            )
            .await;
        found["runs"].as_array().cloned().unwrap_or_default()
    }

    async fn steps(&self, run: &str, key: &str) -> Vec<i64> {
        let found = self.get("metrics/get-history", &[("run_id", run), ("metric_key", key)]).await;
        let mut steps: Vec<i64> = found["metrics"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|m| m["step"].as_i64().unwrap())
            .collect();
        steps.sort_unstable();
        steps
    }
}

/// An MLflow server that requires `Authorization: Bearer {token}`: an HTTP relay in front of
/// the real one that answers 401 to any request without it, and counts both.
struct AuthRelay {
    url: String,
    passed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    refused: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

#[derive(Clone)]
struct AuthState {
    target: String,
    token: String,
    http: reqwest::Client,
    passed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    refused: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

async fn relay_with_auth(
    axum::extract::State(state): axum::extract::State<AuthState>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
    use axum::response::IntoResponse as _;
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let expected = format!("Bearer {}", state.token);
    if parts.headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        state.refused.lock().unwrap().push(format!("{} {path}", parts.method));
        let body =
            json!({"error_code": "UNAUTHENTICATED", "message": "a bearer token is required"});
        return (axum::http::StatusCode::UNAUTHORIZED, axum::Json(body)).into_response();
    }
    state.passed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let bytes = axum::body::to_bytes(body, 256 << 20).await.unwrap();
    let mut req =
        state.http.request(parts.method.clone(), format!("{}{path}", state.target)).body(bytes);
    if let Some(kind) = parts.headers.get(CONTENT_TYPE) {
        req = req.header(CONTENT_TYPE, kind.clone());
    }
    let resp = req.send().await.unwrap();
    let (status, kind) = (resp.status(), resp.headers().get(CONTENT_TYPE).cloned());
    let mut out = (status, resp.bytes().await.unwrap()).into_response();
    if let Some(kind) = kind {
        out.headers_mut().insert(CONTENT_TYPE, kind);
    }
    out
}

impl AuthRelay {
    async fn start(target: &str, token: &str) -> AuthRelay {
        let state = AuthState {
            target: target.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http: reqwest::Client::new(),
            passed: Default::default(),
            refused: Default::default(),
        };
        let (passed, refused) = (state.passed.clone(), state.refused.clone());
        let app = axum::Router::new().fallback(relay_with_auth).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        AuthRelay { url, passed, refused }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mnist_with_an_mlflow_registry_records_every_round_and_registers_the_model() {
    let Some(url) = server() else { return };
    fledge_tls::install_default_provider();
    let mlflow = Mlflow { http: reqwest::Client::new(), url: url.trim_end_matches('/').to_owned() };
    // The job's MLflow requires a token; the platform has it, its workers' environment not.
    let token = format!("tok-{}", std::process::id());
    let relay = AuthRelay::start(&url, &token).await;
    let unauthenticated = reqwest::Client::new()
        .post(format!("{}/api/2.0/mlflow/experiments/search", relay.url))
        .json(&json!({"max_results": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401, "the relay requires the token");
    relay.refused.lock().unwrap().clear();
    let platform = Platform::start_with_env(&[
        ("FLEDGE_MLFLOW_TOKEN", &token),
        ("FLEDGE_MLFLOW_SERVERS", &relay.url),
    ]);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let name = format!("mnist-e2e-{}", nanos.as_nanos());
    let registry = json!({"registry": {"sort": "mlflow", "uri": relay.url}});

    let dir = platform.scratch().join("mnist-mlflow");
    let rounds = 5;
    mnist_job(&dir, "mnist-mlflow", &name, rounds, registry.clone());
    let outcome = platform.run_dir(&dir);
    assert!(outcome.success, "fledgectl run failed:\n{}", outcome.output);
    let (job, _, records) = platform.job(&outcome.job).await;
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    let reported = records_of(&records, "aggregator");
    assert_eq!(reported.len(), rounds as usize);
    // Everything went through the relay with the token: the creation check (the apiserver)
    // and the aggregator's uploads (the token reached it through its task config: a
    // deployed worker's environment never carries FLEDGE_* variables).
    assert!(relay.passed.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert_eq!(*relay.refused.lock().unwrap(), Vec::<String>::new(), "no request without it");

    // MLflow has the job's run, the aggregator's nested run with one value per round of loss
    // and accuracy, the final artifact and a registered version.
    let job_runs = mlflow
        .search(
            "mnist-mlflow",
            &format!("tags.`fledge.job` = '{}' and tags.`fledge.kind` = 'job'", job.id),
        )
        .await;
    assert_eq!(job_runs.len(), 1, "{job_runs:#?}");
    assert_eq!(job_runs[0]["info"]["status"], "FINISHED");
    let parent = job_runs[0]["info"]["run_id"].as_str().unwrap();
    let children =
        mlflow.search("mnist-mlflow", &format!("tags.`mlflow.parentRunId` = '{parent}'")).await;
    assert_eq!(children.len(), 1, "only the aggregator writes: {children:#?}");
    let run = children[0]["info"]["run_id"].as_str().unwrap();
    let every_round: Vec<i64> = (1..=rounds as i64).collect();
    assert_eq!(mlflow.steps(run, "global.accuracy").await, every_round);
    assert_eq!(mlflow.steps(run, "global.loss").await, every_round);
    let files = mlflow.get("artifacts/list", &[("run_id", run), ("path", "final")]).await;
    let files: Vec<&str> =
        files["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(files, ["final/fledge.json", "final/model.safetensors"]);
    let versions =
        mlflow.get("model-versions/search", &[("filter", &format!("name = '{name}'"))]).await;
    let versions = versions["model_versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "{versions:#?}");
    assert_eq!(versions[0]["run_id"], run);
    let final_accuracy = reported.last().unwrap().metrics["global.accuracy"];

    // The job's models, through the apiserver (which reads MLflow under its token): every
    // round and the final model listed, the final one downloaded, and evaluated here it has
    // exactly the accuracy the aggregator reported for the last round.
    let out = platform
        .fledgectl()
        .args(["get", "models", job.id.as_str(), "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Vec<fledge_types::ModelFile> = serde_json::from_slice(&out.stdout).unwrap();
    let rounds_listed: Vec<Option<u64>> = listed.iter().map(|f| f.round).collect();
    let mut expected: Vec<Option<u64>> = (1..=rounds).map(Some).collect();
    expected.push(None);
    assert_eq!(rounds_listed, expected, "every round, then the final model: {listed:?}");
    assert!(listed.iter().all(|f| f.group.is_none() && f.size > 100_000), "{listed:?}");
    let file = platform.scratch().join("final.safetensors");
    let out = platform
        .fledgectl()
        .args(["get", "model", job.id.as_str(), "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len() as u64, listed[rounds as usize].size);
    let weights = fledge_sdk::registry::from_safetensors("final", &bytes).unwrap();
    let data = format!("file://{}", repo_root().join("examples/data").display());
    let mut evaluator = fledge_models::MnistEvaluator::new(&data, 128).unwrap();
    let evaluated = fledge_sdk::Evaluator::evaluate(&mut evaluator, &weights).unwrap()["accuracy"];
    assert!(
        (evaluated - final_accuracy).abs() < 1e-6,
        "downloaded {evaluated}, reported {final_accuracy}"
    );
    eprintln!(
        "{} model files listed; the final model ({} bytes) evaluates to {evaluated}, reported \
         {final_accuracy}",
        listed.len(),
        bytes.len()
    );
    // A round's checkpoint too, and a round the job never had is 404.
    let round_file = platform.scratch().join("round-2.safetensors");
    let out = platform
        .fledgectl()
        .args(["get", "model", job.id.as_str(), "--round", "2", "-f"])
        .arg(&round_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&round_file).unwrap().len() as u64, listed[1].size);
    let out = platform
        .fledgectl()
        .args(["get", "model", job.id.as_str(), "--round", "99", "-f"])
        .arg(platform.scratch().join("none.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("round 99"), "{stderr}");
    assert_eq!(*relay.refused.lock().unwrap(), Vec::<String>::new(), "no request without it");

    // A second job starts from that version: with a learning rate too small to move it, its
    // first round evaluates the registered model (a fresh one scores about 0.1).
    let second = platform.scratch().join("mnist-base");
    let base = json!({
        "registry": {"sort": "mlflow", "uri": relay.url},
        "baseModel": {"name": name, "version": 1},
        "hyperparameters": {"learningRate": 1e-9},
    });
    mnist_job(&second, "mnist-base", &format!("{name}-second"), 1, base);
    let outcome = platform.run_dir(&second);
    assert!(outcome.success, "fledgectl run failed:\n{}", outcome.output);
    let (_, _, records) = platform.job(&outcome.job).await;
    let first = records_of(&records, "aggregator")[0].metrics["global.accuracy"];
    assert!(
        (first - final_accuracy).abs() < 0.01,
        "started from version 1: round 1 {first}, the registered model {final_accuracy}"
    );

    // A job naming an MLflow nobody answers at is refused at creation, naming the URL.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = format!("http://127.0.0.1:{port}");
    let refused = platform.scratch().join("mnist-dead");
    mnist_job(
        &refused,
        "mnist-mlflow",
        "dead",
        1,
        json!({"registry": {"sort": "mlflow", "uri": dead}}),
    );
    let out = platform
        .fledgectl()
        .args(["create", "job"])
        .arg(refused.join("job.json"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a dead registry must be refused");
    assert!(stderr.contains(&dead) && stderr.contains("modelSpec.registry.uri"), "{stderr}");
    let jobs = platform.client().list_jobs(None).await.unwrap();
    assert!(jobs.iter().all(|j| j.spec.name != "dead"), "nothing was stored");
}

/// A TCP relay to the MLflow server that can go down (every connection cut and refused) and
/// come back, as a server that is stopped and restarted.
struct Relay {
    port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Relay {
    async fn start(target: &str) -> Relay {
        use std::sync::atomic::Ordering;
        let target = reqwest::Url::parse(target).unwrap();
        let addr =
            format!("{}:{}", target.host_str().unwrap(), target.port_or_known_default().unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (flag, cuts) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if !flag.load(Ordering::SeqCst) {
                    continue;
                }
                let (addr, mut cut) = (addr.clone(), cuts.subscribe());
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
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

/// The aggregator's highest reported round of job `name`, once the job exists.
async fn reported_round(platform: &Platform, name: &str) -> Option<(String, u64)> {
    let client = platform.client();
    let job = client.list_jobs(None).await.ok()?.into_iter().find(|j| j.spec.name == name)?;
    let records = client.job_metrics(&job.id).await.ok()?;
    let round = records_of(&records, "aggregator").last().map_or(0, |r| r.round);
    Some((job.id.to_string(), round))
}

/// Waits (bounded) until the job named `name` has reported round `round`.
async fn wait_for_round(platform: &Platform, name: &str, round: u64) {
    for _ in 0..3000 {
        if reported_round(platform, name).await.is_some_and(|(_, r)| r >= round) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("job {name} never reported round {round}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mlflow_down_for_rounds_mid_job_still_ends_with_every_round() {
    let Some(url) = server() else { return };
    fledge_tls::install_default_provider();
    let mlflow = Mlflow { http: reqwest::Client::new(), url: url.trim_end_matches('/').to_owned() };
    let relay = Relay::start(&url).await;
    let platform = Platform::start();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let name = format!("mnist-outage-{}", nanos.as_nanos());
    let dir = platform.scratch().join("mnist-outage");
    let rounds = 12;
    let via_relay = format!("http://127.0.0.1:{}", relay.port);
    mnist_job(
        &dir,
        "mnist-outage",
        &name,
        rounds,
        json!({"registry": {"sort": "mlflow", "uri": via_relay}}),
    );
    let mut cli = platform.fledgectl();
    cli.arg("run").arg(&dir);
    let run = tokio::task::spawn_blocking(move || cli.output());
    // Down after the first round, for at least three rounds, then back.
    wait_for_round(&platform, &name, 1).await;
    relay.set_up(false);
    let (_, down_at) = reported_round(&platform, &name).await.unwrap();
    wait_for_round(&platform, &name, down_at + 3).await;
    relay.set_up(true);
    let out = run.await.unwrap().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (job, _) = reported_round(&platform, &name).await.unwrap();
    // The outage happened: the aggregator's uploads failed and were kept for later.
    let (_, tasks, _) = platform.job(&job).await;
    let aggregator = tasks.iter().find(|t| t.role == "aggregator").unwrap();
    assert!(
        aggregator.log.contains("MLflow did not take a record"),
        "log tail: {}",
        aggregator.log
    );

    let runs = mlflow
        .search(
            "mnist-outage",
            &format!("tags.`fledge.job` = '{job}' and tags.`fledge.kind` = 'task'"),
        )
        .await;
    assert_eq!(runs.len(), 1, "{runs:#?}");
    let run = runs[0]["info"]["run_id"].as_str().unwrap();
    let every_round: Vec<i64> = (1..=rounds as i64).collect();
    assert_eq!(mlflow.steps(run, "global.accuracy").await, every_round, "every round, once");
    let listed = mlflow.get("artifacts/list", &[("run_id", run), ("path", "rounds")]).await;
    assert_eq!(listed["files"].as_array().unwrap().len(), rounds as usize);
}
