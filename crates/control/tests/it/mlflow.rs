//! Jobs whose registry is an MLflow server, against a small stand-in for one that requires a
//! bearer token: the operator's token is sent only to the servers it belongs to (a job naming
//! another URL is checked without it, and refused by a server that needs it), reaches the task
//! configs of built-in roles only, and the model routes list and stream the job's models from
//! the server's runs and artifact proxy, for the job's owner only.

use std::sync::{Arc, Mutex};

use axum::extract::{Query, Request};
use axum::http::StatusCode as AxumStatus;
use axum::response::{IntoResponse, Response};
use reqwest::StatusCode;
use serde_json::{Value, json};

use fledge_control::mlflow::MlflowAuth;

use crate::api::insert_tasks;
use crate::support::{Server, hier_job, setup_hier};

const TOKEN: &str = "operator-mlflow-token";

/// A stand-in MLflow server: one experiment, one task run of any job with a round-1
/// checkpoint and a final model; every request without the token is 401 and remembered.
struct FakeMlflow {
    url: String,
    refused: Arc<Mutex<Vec<String>>>,
    job_filters: Arc<Mutex<Vec<String>>>,
}

impl FakeMlflow {
    async fn start() -> FakeMlflow {
        let refused: Arc<Mutex<Vec<String>>> = Arc::default();
        let job_filters: Arc<Mutex<Vec<String>>> = Arc::default();
        let (r, f) = (refused.clone(), job_filters.clone());
        let app = axum::Router::new().fallback(move |req: Request| {
            let (refused, filters) = (r.clone(), f.clone());
            async move { answer(req, &refused, &filters).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeMlflow { url, refused, job_filters }
    }
}

async fn answer(
    req: Request,
    refused: &Mutex<Vec<String>>,
    filters: &Mutex<Vec<String>>,
) -> Response {
    let path = req.uri().path().to_owned();
    let authorized = req.headers().get("authorization").and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {TOKEN}"));
    if !authorized {
        refused.lock().unwrap().push(path);
        return (AxumStatus::UNAUTHORIZED, axum::Json(json!({"error_code": "UNAUTHENTICATED"})))
            .into_response();
    }
    let Query(query): Query<std::collections::HashMap<String, String>> =
        Query::try_from_uri(req.uri()).unwrap();
    let body = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap();
    let files = |list: Value| axum::Json(json!({"files": list})).into_response();
    match path.as_str() {
        "/api/2.0/mlflow/experiments/search" => {
            axum::Json(json!({"experiments": []})).into_response()
        }
        "/api/2.0/mlflow-artifacts/artifacts" => files(json!([])),
        "/api/2.0/mlflow/experiments/get-by-name" => {
            assert_eq!(query["experiment_name"], "hier");
            axum::Json(json!({"experiment": {"experiment_id": "7", "name": "hier"}}))
                .into_response()
        }
        "/api/2.0/mlflow/runs/search" => {
            let search: Value = serde_json::from_slice(&body).unwrap();
            filters.lock().unwrap().push(search["filter"].as_str().unwrap().to_owned());
            axum::Json(json!({"runs": [{
                "info": {"run_id": "r1", "artifact_uri": "mlflow-artifacts:/7/r1/artifacts"},
                "data": {"tags": [{"key": "fledge.kind", "value": "task"}]}
            }]}))
            .into_response()
        }
        "/api/2.0/mlflow/artifacts/list" => match query["path"].as_str() {
            "rounds" => files(json!([
                {"path": "rounds/round-00001", "is_dir": true},
                {"path": "rounds/notes", "is_dir": true},
            ])),
            "rounds/round-00001" => files(json!([
                {"path": "rounds/round-00001/fledge.json", "is_dir": false, "file_size": 10},
                {"path": "rounds/round-00001/model.safetensors", "is_dir": false, "file_size": 4},
            ])),
            "final" => files(json!([
                {"path": "final/model.safetensors", "is_dir": false, "file_size": "6"},
            ])),
            _ => files(json!([])),
        },
        "/api/2.0/mlflow-artifacts/artifacts/7/r1/artifacts/final/model.safetensors" => {
            b"final!".to_vec().into_response()
        }
        "/api/2.0/mlflow-artifacts/artifacts/7/r1/artifacts/rounds/round-00001/model.safetensors" => {
            b"one!".to_vec().into_response()
        }
        _ => (AxumStatus::NOT_FOUND, axum::Json(json!({"error_code": "RESOURCE_DOES_NOT_EXIST"})))
            .into_response(),
    }
}

fn with_registry(mut job: Value, uri: &str) -> Value {
    job["modelSpec"]["registry"] = json!({"sort": "mlflow", "uri": uri});
    job
}

#[tokio::test]
async fn the_token_reaches_its_server_and_builtin_roles_only_and_models_are_served() {
    let mlflow = FakeMlflow::start().await;
    let dir = tempfile::tempdir().unwrap();
    let auth = MlflowAuth::new(Some(TOKEN.into()), &mlflow.url).unwrap();
    let server = Server::start_with_mlflow(dir.path(), auth).await;
    let ann = server.user("ann").await;
    let bob = server.user("bob").await;
    let datasets = setup_hier(&ann, "ann").await;

    // The same server under a name the token is not for: checked without it, and refused.
    let alias = mlflow.url.replace("127.0.0.1", "localhost");
    let (status, body) =
        ann.post("/users/ann/jobs", &with_registry(hier_job(&datasets), &alias)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let detail = body["details"][0]["message"].as_str().unwrap();
    assert!(detail.contains(&alias) && detail.contains("401"), "{detail}");
    assert_eq!(mlflow.refused.lock().unwrap().len(), 1, "the check went without the token");
    mlflow.refused.lock().unwrap().clear();

    // Named as the operator's server: checked under the token, created.
    let (status, job) =
        ann.post("/users/ann/jobs", &with_registry(hier_job(&datasets), &mlflow.url)).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();

    // Built-in roles' configs carry the token; user code's (trainer/main.py) does not.
    let tasks = insert_tasks(&server, &id).await;
    for (task, key) in &tasks {
        let agent = crate::support::Client::new(&server.base, key);
        let (status, config) = agent.get(&format!("/tasks/{}/config", task.task_id)).await;
        assert_eq!(status, StatusCode::OK, "{config}");
        let expected = match task.role.as_str() {
            "trainer" => Value::Null,
            "top-aggregator" | "middle-aggregator" => json!(TOKEN),
            other => panic!("unexpected role {other}"),
        };
        assert_eq!(
            config.get("registryToken").cloned().unwrap_or(Value::Null),
            expected,
            "{}",
            task.role
        );
    }

    // The job's models, listed from its runs and streamed from the artifact proxy.
    let (status, listed) = ann.get(&format!("/users/ann/jobs/{id}/models")).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed, json!([{"round": 1, "size": 4}, {"size": 6}]));
    assert_eq!(
        *mlflow.job_filters.lock().unwrap(),
        [format!("tags.`fledge.job` = '{id}' and tags.`fledge.kind` = 'task'")]
    );
    let (status, bytes) = ann.get_bytes(&format!("/users/ann/jobs/{id}/model")).await;
    assert_eq!((status, bytes.as_slice()), (StatusCode::OK, &b"final!"[..]));
    let (status, bytes) = ann.get_bytes(&format!("/users/ann/jobs/{id}/model?round=1")).await;
    assert_eq!((status, bytes.as_slice()), (StatusCode::OK, &b"one!"[..]));
    let (status, body) = ann.get(&format!("/users/ann/jobs/{id}/model?round=2")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body["message"].as_str().unwrap().contains("round 2"), "{body}");
    let (status, body) = ann.get(&format!("/users/ann/jobs/{id}/model?group=eu")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no run of group eu: {body}");
    assert!(mlflow.refused.lock().unwrap().is_empty(), "every read carried the token");

    // Another user learns nothing, and MLflow is not asked.
    let before = mlflow.job_filters.lock().unwrap().len();
    for path in [format!("/users/bob/jobs/{id}/models"), format!("/users/bob/jobs/{id}/model")] {
        let (status, body) = bob.get(&path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    let (status, _) = bob.get(&format!("/users/ann/jobs/{id}/models")).await;
    assert!(matches!(status, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND), "{status}");
    assert_eq!(mlflow.job_filters.lock().unwrap().len(), before);
    server.stop().await;
}

#[tokio::test]
async fn a_job_whose_mlflow_went_away_gets_503_naming_it() {
    let mlflow = FakeMlflow::start().await;
    let dir = tempfile::tempdir().unwrap();
    let auth = MlflowAuth::new(Some(TOKEN.into()), &mlflow.url).unwrap();
    let server = Server::start_with_mlflow(dir.path(), auth).await;
    let ann = server.user("ann").await;
    let datasets = setup_hier(&ann, "ann").await;
    let (status, job) =
        ann.post("/users/ann/jobs", &with_registry(hier_job(&datasets), &mlflow.url)).await;
    assert_eq!(status, StatusCode::CREATED, "{job}");
    let id = job["id"].as_str().unwrap();
    // The server's address, now answering nothing: the job was made with it, as a job whose
    // MLflow later stopped.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = format!("http://127.0.0.1:{port}");
    let mut stored = server.store.get_job(None, &fledge_types::JobId::new(id)).await.unwrap();
    stored.spec.model_spec.registry.uri = dead.clone();
    server
        .store
        .update_job_spec(
            None,
            &stored.id,
            &stored.spec,
            &stored.schema_version,
            &stored.code_version,
        )
        .await
        .unwrap();
    let (status, body) = ann.get(&format!("/users/ann/jobs/{id}/models")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["message"].as_str().unwrap().contains(&dead), "{body}");
    server.stop().await;
}
