//! A test server and an HTTP client with the helpers the tests share.
//!
//! The server serves TLS as a default control plane does, with one CA (made once per test
//! binary) that the clients trust; so every API test also goes through TLS.

use std::io::{Cursor, Write as _};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use fledge_control::api::{self, ApiState};
use fledge_control::controller;
use fledge_control::store::{BlobStore, JobFilter, SqliteStore, Store};
use fledge_control::tls::TlsListener;
use fledge_types::JobId;
use fledge_types::task_config::{BrokerSpec, TaskEnv};

/// Code bundles above this are rejected (small, so the 413 test stays cheap).
pub const CODE_LIMIT: u64 = 64 * 1024;
/// Code bundles that inflate beyond this are rejected (small, so the bomb test stays cheap).
pub const INFLATED_LIMIT: u64 = 1024 * 1024;
/// Code bundles with more entries than this are rejected.
pub const ENTRIES_LIMIT: usize = 50;
/// Metric records a task may store.
pub const METRIC_ROWS_LIMIT: u64 = 5;
/// `limits.metric_records_per_minute` of the test server.
pub const METRIC_RATE_LIMIT: u32 = 10;

/// A running apiserver.
pub struct Server {
    pub base: String,
    pub store: Arc<dyn Store>,
    pub admin: Client,
    /// Job ids the apiserver woke the controller for.
    pub woken: mpsc::Receiver<JobId>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Opens (or reopens) the store in `dir` and serves it on 127.0.0.1:0.
    pub async fn start(dir: &Path) -> Server {
        Server::start_with_mlflow(dir, fledge_control::mlflow::MlflowAuth::default()).await
    }

    /// [`Server::start`] with the operator's MLflow credentials `mlflow`.
    pub async fn start_with_mlflow(
        dir: &Path,
        mlflow: fledge_control::mlflow::MlflowAuth,
    ) -> Server {
        let blobs = BlobStore::new(dir.join("blobs"), CODE_LIMIT).unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(dir.join("fledge.db"), blobs).await.unwrap());
        let (handle, woken) = controller::Handle::channel(1024);
        let env = TaskEnv {
            brokers: vec![BrokerSpec::mqtt("127.0.0.1:1883")],
            apiserver: Some("http://127.0.0.1:1".into()),
            metaserver: None,
            default_registry: fledge_types::RegistrySpec {
                sort: "local".into(),
                uri: dir.join("registry").display().to_string(),
            },
        };
        let tls = tls();
        let mut state = ApiState::new(store.clone(), handle, None, env)
            .with_ca(Some(tls.ca.clone()))
            .with_mlflow(mlflow);
        state.limits.code_inflated_bytes = INFLATED_LIMIT;
        state.limits.code_entries = ENTRIES_LIMIT;
        state.limits.metric_records_per_task = METRIC_ROWS_LIMIT;
        state.limits.metric_records_per_minute = METRIC_RATE_LIMIT;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("https://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let acceptor = tokio_rustls::TlsAcceptor::from(
            tls.identity.server_config(vec![b"http/1.1".to_vec()]).unwrap(),
        );
        let listener = TlsListener::new(listener, acceptor, shutdown.clone()).unwrap();
        let task = tokio::spawn(api::serve_on(listener, state, shutdown.clone()));
        let token = api::bootstrap_admin(store.as_ref()).await.unwrap();
        let admin = Client::new(&base, &token);
        Server { base, store, admin, woken, shutdown, task }
    }

    /// Stops serving and waits for the server to exit.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    /// Creates user `id` and returns a client with a fresh token of theirs.
    pub async fn user(&self, id: &str) -> Client {
        let (status, _) = self.admin.post("/users", &json!({"id": id})).await;
        assert_eq!(status, StatusCode::CREATED);
        let (status, body) = self.admin.post(&format!("/users/{id}/tokens"), &json!({})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        Client::new(&self.base, body["token"].as_str().unwrap())
    }

    /// Everything a user can see, straight from the store, to compare before and after a
    /// rejected request.
    pub async fn snapshot(&self) -> Value {
        let store = &self.store;
        let mut jobs = Vec::new();
        for job in store.list_jobs(&JobFilter::default()).await.unwrap() {
            let tasks = store.list_tasks(&job.id).await.unwrap();
            let metrics = store.list_metrics(&job.id).await.unwrap();
            jobs.push(json!({"job": job, "tasks": tasks, "metrics": metrics}));
        }
        let mut codes = Vec::new();
        for design in store.list_designs(None).await.unwrap() {
            for version in &design.code_versions {
                let (meta, _) =
                    store.get_code(Some(&design.owner), &design.id, Some(version)).await.unwrap();
                codes.push(json!([design.id, meta.version, meta.sha256]));
            }
        }
        json!({
            "users": store.list_users().await.unwrap(),
            "designs": store.list_designs(None).await.unwrap(),
            "codes": codes,
            "datasets": store.list_datasets(None).await.unwrap(),
            "computes": store.list_computes().await.unwrap(),
            "jobs": jobs,
        })
    }
}

/// The CA and server identity every test server of this binary presents.
pub fn tls() -> &'static fledge_tls::Generated {
    static TLS: OnceLock<(tempfile::TempDir, fledge_tls::Generated)> = OnceLock::new();
    let (_, generated) = TLS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let names = ["localhost".to_owned(), "127.0.0.1".to_owned()];
        let generated = fledge_tls::ensure_dir(dir.path(), &names).unwrap();
        (dir, generated)
    });
    generated
}

/// An HTTP client that trusts the test CA only.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls().ca.client_config().unwrap())
        .build()
        .unwrap()
}

/// Raw HTTP with one bearer secret.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(base: &str, token: &str) -> Client {
        Client { http: http(), base: base.to_owned(), token: Some(token.into()) }
    }

    /// A client that sends no Authorization header.
    pub fn anonymous(base: &str) -> Client {
        Client { http: http(), base: base.to_owned(), token: None }
    }

    /// The bearer secret this client sends.
    pub fn token(&self) -> &str {
        self.token.as_deref().unwrap_or_default()
    }

    /// The same credentials against another server.
    pub fn at(&self, base: &str) -> Client {
        Client { http: self.http.clone(), base: base.to_owned(), token: self.token.clone() }
    }

    fn url(&self, path: &str) -> String {
        if path.starts_with("/api/") || path == "/healthz" || path == "/metrics" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/api/v1{path}", self.base)
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.unwrap();
        let status = response.status();
        let bytes = response.bytes().await.unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, body)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn get_bytes(&self, path: &str) -> (StatusCode, Vec<u8>) {
        let mut request = self.http.get(self.url(path));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        (response.status(), response.bytes().await.unwrap().to_vec())
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.send(self.http.post(self.url(path)).json(body)).await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        self.send(self.http.post(self.url(path)).header("content-type", content_type).body(body))
            .await
    }

    pub async fn put(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.send(self.http.put(self.url(path)).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.delete(self.url(path))).await
    }
}

/// A zip of `files` (path, contents).
pub fn zip_of(files: &[(&str, &str)]) -> Vec<u8> {
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, text) in files {
        out.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
        out.write_all(text.as_bytes()).unwrap();
    }
    out.finish().unwrap().into_inner()
}

/// A zip of `files` (name, bytes), deflated.
pub fn zip_bytes(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in files {
        out.start_file(*name, options).unwrap();
        out.write_all(data).unwrap();
    }
    out.finish().unwrap().into_inner()
}

/// A zip of one file `name` holding `data` (stored or deflated) whose zip64 extra fields
/// declare `declared` uncompressed bytes: what a reader that trusts declared sizes trips on.
pub fn zip64_lying(name: &str, data: &[u8], deflate: bool, declared: u64) -> Vec<u8> {
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let method =
        if deflate { zip::CompressionMethod::Deflated } else { zip::CompressionMethod::Stored };
    let options =
        zip::write::SimpleFileOptions::default().compression_method(method).large_file(true);
    out.start_file(name, options).unwrap();
    out.write_all(data).unwrap();
    let mut bytes = out.finish().unwrap().into_inner();
    // Every zip64 extra field (tag 0x0001) starts with the uncompressed size.
    let real = (data.len() as u64).to_le_bytes();
    let mut patched = 0;
    let mut i = 0;
    while i + 12 <= bytes.len() {
        if bytes[i..i + 2] == [1, 0] && bytes[i + 4..i + 12] == real {
            bytes[i + 4..i + 12].copy_from_slice(&declared.to_le_bytes());
            patched += 1;
            i += 12;
        } else {
            i += 1;
        }
    }
    assert!(patched > 0, "no zip64 extra field to patch");
    bytes
}

/// Flame's three-tier hierarchical topology: trainers in two groups, one middle aggregator per
/// group, one top aggregator.
pub fn hier_schema() -> Value {
    json!({
        "name": "hierarchical",
        "description": "// comment keys like Flame's are ignored",
        "// note": "trainers -> middle aggregators -> top aggregator",
        "roles": [
            {"name": "trainer", "isDataConsumer": true,
             "groupAssociation": [{"param-channel": "eu"}, {"param-channel": "us"}]},
            {"name": "middle-aggregator",
             "groupAssociation": [
                {"param-channel": "eu", "global-channel": "default"},
                {"param-channel": "us", "global-channel": "default"}]},
            {"name": "top-aggregator", "groupAssociation": [{"global-channel": "default"}]}
        ],
        "channels": [
            {"name": "param-channel", "pair": ["trainer", "middle-aggregator"],
             "groupBy": {"type": "tag", "value": ["eu", "us"]},
             "funcTags": {"trainer": ["fetch", "upload"],
                          "middle-aggregator": ["distribute", "aggregate"]}},
            {"name": "global-channel", "pair": ["middle-aggregator", "top-aggregator"],
             "groupBy": {"type": "tag", "value": ["default"]},
             "funcTags": {"middle-aggregator": ["fetch", "upload"],
                          "top-aggregator": ["distribute", "aggregate"]}}
        ]
    })
}

/// The design's code: one folder per role.
pub fn hier_code() -> Vec<u8> {
    zip_of(&[
        ("trainer/main.py", "print('train')\n"),
        ("trainer/util/data.py", "X = 1\n"),
        ("middle-aggregator/fledge-role.toml", "builtin = \"middle-aggregator\"\n"),
        ("top-aggregator/fledge-role.toml", "builtin = \"top-aggregator\"\n"),
    ])
}

/// A user's design `hier` with schema, code and four datasets (two per realm); returns the
/// dataset ids in order uk, de, east, west.
pub async fn setup_hier(user: &Client, name: &str) -> Vec<String> {
    let (status, body) = user.post(&format!("/users/{name}/designs"), &json!({"id": "hier"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) =
        user.post(&format!("/users/{name}/designs/hier/schemas"), &hier_schema()).await;
    assert_eq!((status, &body["version"]), (StatusCode::CREATED, &json!("1")), "{body}");
    let (status, body) = user
        .post_raw(&format!("/users/{name}/designs/hier/codes"), "application/zip", hier_code())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mut ids = Vec::new();
    for (dataset, realm) in [
        ("uk", "default/eu/uk"),
        ("de", "default/eu/de"),
        ("east", "default/us/east"),
        ("west", "default/us/west"),
    ] {
        let (status, body) = user
            .post(
                &format!("/users/{name}/datasets"),
                &json!({"name": dataset, "url": format!("file:///data/{dataset}.csv"),
                        "dataFormat": "csv", "realm": realm}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    ids
}

/// The job spec of the hierarchical design over `datasets` (uk, de → eu; east, west → us).
pub fn hier_job(datasets: &[String]) -> Value {
    json!({
        "name": "hier-mnist",
        "designId": "hier",
        "maxRunTime": 600,
        "dataSpec": [{"role": "trainer",
                      "datasetGroups": {"eu": [datasets[0], datasets[1]],
                                        "us": [datasets[2], datasets[3]]}}],
        "modelSpec": {"optimizer": {"sort": "fedavg"},
                      "hyperparameters": {"rounds": 3, "epochs": 1, "batchSize": 32}}
    })
}
