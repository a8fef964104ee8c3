//! The MLflow registry: a task's rounds, metrics and models in an MLflow tracking server,
//! spoken to through its REST API 2.0 (`docs/registry.md`).
//!
//! What goes where:
//!
//! - one MLflow **run per job** (tags `fledge.job`, `fledge.job.name`, `fledge.design`; the
//!   job's hyperparameters, optimizer, selector and base model as params) in the experiment
//!   named by the job's design;
//! - one **nested run per task** that writes (tags `mlflow.parentRunId`, `fledge.task`,
//!   `fledge.role`, `fledge.groups`, `fledge.topology`): its metrics, one value per round
//!   (`step` = round), logged in batches (`runs/log-batch`), and its models as artifacts:
//!   `rounds/round-00001/` and `final/`, each a `model.safetensors` with a `fledge.json` that
//!   names the tensors, their shapes and the round;
//! - the **final model registered** as a new version of the registered model named by the job
//!   (its name; `{name}.{scope}` for a task whose models are scoped by group), so a later job's
//!   `baseModel {name, version}` starts from it ([`Registry::load_model`] reads any registered
//!   version whose artifacts the server proxies).
//!
//! Nothing is lost when MLflow is down: every write is first a file in the task's **spool**
//! (`{workdir}/mlflow-spool/{job}/{task}`: the model file, then a small JSON record that
//! commits it), and a background uploader drains the spool in order, retrying with bounded
//! backoff (0.5 s doubling to 30 s) as long as the server is unreachable or answers 5xx. A
//! record leaves the spool only once MLflow has it. Every upload is idempotent (metrics carry
//! their own timestamps, artifacts are overwritten, a model version is looked up before it is
//! created), so a retry after a lost answer stores nothing twice. A record the server refuses
//! outright (4xx) is moved to `failed/` in the spool and fails the task at its end, with the
//! server's message. [`Registry::finish`] waits (at most [`FLUSH_TIMEOUT`]) for the spool to
//! drain and marks the runs finished or failed.
//!
//! The server must proxy artifacts (`mlflow server --serve-artifacts`, the default since
//! MLflow 2.0): artifacts go through `/api/2.0/mlflow-artifacts/artifacts/…` on the same URL,
//! so workers need no credentials for the artifact store. A token, when the server needs one,
//! is the task config's `registryToken` (handed to deployed built-in roles by the control
//! plane), else read from `FLEDGE_MLFLOW_TOKEN` or MLflow's own `MLFLOW_TRACKING_TOKEN`, and
//! sent as `Authorization: Bearer …`. Every answer is bounded: API responses to [`MAX_RESPONSE`]
//! bytes, model downloads to [`MAX_MODEL_BYTES`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fledge_algorithms::{Tensor, Weights};
use fledge_types::{JobId, MetricRecord, TaskConfig, TaskId};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    LocalRegistry, Registry, ResumeState, component, from_safetensors, io_err, save_atomic,
};
use crate::{Error, Result};

/// Environment variable holding the bearer token for the MLflow server (checked first).
pub const TOKEN_ENV: &str = "FLEDGE_MLFLOW_TOKEN";
/// MLflow's own token variable, used when [`TOKEN_ENV`] is unset.
pub const MLFLOW_TOKEN_ENV: &str = "MLFLOW_TRACKING_TOKEN";

/// Largest API response read, in bytes.
pub const MAX_RESPONSE: usize = 4 << 20;
/// Largest model file downloaded, in bytes.
pub const MAX_MODEL_BYTES: u64 = 2 << 30;
/// How long [`Registry::finish`] waits for the spool to drain.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(300);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of one API call.
const API_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound of one artifact transfer.
const ARTIFACT_TIMEOUT: Duration = Duration::from_secs(600);
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// MLflow's limits: metrics, params and tags per `log-batch`, key and param value lengths.
const BATCH_METRICS: usize = 1000;
const BATCH_PARAMS: usize = 100;
const MAX_KEY: usize = 250;
const MAX_PARAM_VALUE: usize = 6000;
const MAX_TAG_VALUE: usize = 5000;
const MODEL_FILE: &str = "model.safetensors";
const META_FILE: &str = "fledge.json";

/// An MLflow tracking server's base URL (`http(s)://host[:port][/prefix]`, no trailing
/// slash), checked.
pub fn base_url(uri: &str) -> Result<String> {
    let bad = |reason: &str| Error::Mlflow { url: uri.to_owned(), reason: reason.to_owned() };
    let url = reqwest::Url::parse(uri).map_err(|e| bad(&format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the MLflow registry's uri must be an http:// or https:// URL"));
    }
    if url.host_str().is_none() || url.query().is_some() || url.fragment().is_some() {
        return Err(bad(
            "the MLflow registry's uri must be a server URL without query or fragment",
        ));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// The bearer token from the environment ([`TOKEN_ENV`], else [`MLFLOW_TOKEN_ENV`]).
pub fn token_from_env() -> Option<String> {
    [TOKEN_ENV, MLFLOW_TOKEN_ENV]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
}

/// Why a call failed, and so whether to try it again.
#[derive(Debug)]
enum CallError {
    /// No answer (connection refused, timeout, reset): retried.
    Transport(String),
    /// An HTTP error; 5xx, 408 and 429 are retried.
    Status { status: u16, code: String, message: String },
    /// An answer that is not what MLflow sends, or a request we cannot make: not retried.
    Invalid(String),
}

impl CallError {
    fn retryable(&self) -> bool {
        match self {
            CallError::Transport(_) => true,
            CallError::Status { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            CallError::Invalid(_) => false,
        }
    }

    fn is_code(&self, want: &str) -> bool {
        matches!(self, CallError::Status { code, .. } if code == want)
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Transport(e) => write!(f, "unreachable: {e}"),
            CallError::Status { status, code, message } if code.is_empty() => {
                write!(f, "HTTP {status}: {message}")
            }
            CallError::Status { status, code, message } => {
                write!(f, "HTTP {status} {code}: {message}")
            }
            CallError::Invalid(e) => f.write_str(e),
        }
    }
}

/// A REST client for one tracking server.
#[derive(Clone, Debug)]
struct Api {
    http: reqwest::Client,
    base: String,
    authorization: Option<HeaderValue>,
}

/// The full text of a transport error (reqwest's own message hides its causes).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl Api {
    fn new(uri: &str, token: Option<&str>) -> Result<Api> {
        let base = base_url(uri)?;
        let bad = |reason: String| Error::Mlflow { url: base.clone(), reason };
        let authorization = match token {
            Some(token) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    .map_err(|_| bad("the MLflow token is not a valid header value".into()))?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        fledge_tls::install_default_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| bad(format!("cannot build an HTTP client: {}", chain(&e))))?;
        Ok(Api { http, base, authorization })
    }

    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url);
        match &self.authorization {
            Some(auth) => req.header(AUTHORIZATION, auth.clone()),
            None => req,
        }
    }

    /// `GET /api/2.0/mlflow/{endpoint}?query`.
    async fn get(&self, endpoint: &str, query: &[(&str, &str)]) -> Result<Value, CallError> {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.base);
        let req = self.request(reqwest::Method::GET, url).query(query).timeout(API_TIMEOUT);
        self.json(req).await
    }

    /// `POST /api/2.0/mlflow/{endpoint}` with a JSON body.
    async fn post(&self, endpoint: &str, body: &Value) -> Result<Value, CallError> {
        let url = format!("{}/api/2.0/mlflow/{endpoint}", self.base);
        let req = self.request(reqwest::Method::POST, url).json(body).timeout(API_TIMEOUT);
        self.json(req).await
    }

    async fn json(&self, req: reqwest::RequestBuilder) -> Result<Value, CallError> {
        let resp = req.send().await.map_err(|e| CallError::Transport(chain(&e)))?;
        let status = resp.status();
        let body = read_bounded(resp, MAX_RESPONSE as u64).await?;
        if !status.is_success() {
            return Err(status_error(status.as_u16(), &body));
        }
        if body.is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_slice(&body).map_err(|e| {
            CallError::Invalid(format!("the answer is not MLflow's JSON ({e}): {}", snippet(&body)))
        })
    }

    fn artifact_url(&self, path: &str) -> String {
        format!("{}/api/2.0/mlflow-artifacts/artifacts/{path}", self.base)
    }

    /// `PUT`s a file to the artifact proxy, streamed from disk.
    async fn put_artifact(&self, path: &str, file: &Path) -> Result<(), CallError> {
        let local = |e: std::io::Error| {
            CallError::Invalid(format!("cannot read spooled file {}: {e}", file.display()))
        };
        let handle = tokio::fs::File::open(file).await.map_err(local)?;
        let len = handle.metadata().await.map_err(local)?.len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(handle));
        let req = self
            .request(reqwest::Method::PUT, self.artifact_url(path))
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body)
            .timeout(ARTIFACT_TIMEOUT);
        let resp = req.send().await.map_err(|e| CallError::Transport(chain(&e)))?;
        let status = resp.status();
        let answer = read_bounded(resp, MAX_RESPONSE as u64).await?;
        if status.is_success() { Ok(()) } else { Err(status_error(status.as_u16(), &answer)) }
    }

    /// `GET`s a file from the artifact proxy, at most `max` bytes.
    async fn get_artifact(&self, path: &str, max: u64) -> Result<Vec<u8>, CallError> {
        let req =
            self.request(reqwest::Method::GET, self.artifact_url(path)).timeout(ARTIFACT_TIMEOUT);
        let resp = req.send().await.map_err(|e| CallError::Transport(chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let body = read_bounded(resp, MAX_RESPONSE as u64).await?;
            return Err(status_error(status.as_u16(), &body));
        }
        read_bounded(resp, max).await
    }
}

/// The body of `resp`, refused past `max` bytes (by its length header or as it arrives).
async fn read_bounded(mut resp: reqwest::Response, max: u64) -> Result<Vec<u8>, CallError> {
    let too_big = || CallError::Invalid(format!("the answer is larger than {max} bytes"));
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| CallError::Transport(chain(&e)))? {
        if (body.len() + chunk.len()) as u64 > max {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]);
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An HTTP error with MLflow's `{error_code, message}` when the body has them.
fn status_error(status: u16, body: &[u8]) -> CallError {
    #[derive(Deserialize)]
    struct Body {
        #[serde(default)]
        error_code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(b) => CallError::Status { status, code: b.error_code, message: b.message },
        Err(_) => CallError::Status { status, code: String::new(), message: snippet(body) },
    }
}

/// Checks that `uri` is an MLflow tracking server that answers this client (with `token`)
/// and proxies artifacts: what a job with this registry needs before it starts. Bounded by
/// `timeout`.
pub async fn check(uri: &str, token: Option<&str>, timeout: Duration) -> Result<()> {
    let api = Api::new(uri, token)?;
    let fail = |reason: String| Error::Mlflow { url: api.base.clone(), reason };
    let probe = async {
        let found = api.post("experiments/search", &json!({"max_results": 1})).await?;
        if !found.is_object() {
            return Err(CallError::Invalid("experiments/search did not answer an object".into()));
        }
        let req = api
            .request(reqwest::Method::GET, api.artifact_url("").trim_end_matches('/').to_owned())
            .timeout(API_TIMEOUT)
            .query(&[("path", "")]);
        api.json(req).await.map_err(|e| match e {
            CallError::Status { status, message, .. } => CallError::Invalid(format!(
                "it does not proxy artifacts (HTTP {status}: {message}); start it with \
                 --serve-artifacts"
            )),
            other => other,
        })?;
        Ok(())
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(_) => Err(fail(format!("no answer within {} s", timeout.as_secs_f64()))),
    }
}

/// A record of the spool: one upload, in order.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
enum Op {
    /// Metric values for the task's run.
    Metrics { metrics: Vec<MetricValue> },
    /// A model file (`{seq}.safetensors` beside the record) for the task's run at `artifact`,
    /// registered as a new version of `register` when set.
    Model { artifact: String, meta: ModelMeta, register: Option<String> },
}

/// One metric value as MLflow takes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MetricValue {
    key: String,
    value: f64,
    timestamp: i64,
    step: i64,
}

/// The `fledge.json` beside each model artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelMeta {
    /// Always `safetensors`.
    pub format: String,
    /// The model file beside it.
    pub file: String,
    /// The job.
    pub job: String,
    /// The task that wrote it.
    pub task: String,
    /// The round after which it was saved; none for a final or saved model.
    pub round: Option<u64>,
    /// The tensors in their order, with shapes.
    pub tensors: Vec<TensorMeta>,
    /// Total number of values.
    pub parameters: usize,
}

/// A tensor in [`ModelMeta`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorMeta {
    /// Its name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

impl ModelMeta {
    fn of(weights: &Weights, job: &str, task: &str, round: Option<u64>) -> ModelMeta {
        ModelMeta {
            format: "safetensors".into(),
            file: MODEL_FILE.into(),
            job: job.into(),
            task: task.into(),
            round,
            tensors: weights
                .tensors()
                .iter()
                .map(|t: &Tensor| TensorMeta { name: t.name().into(), shape: t.shape().to_vec() })
                .collect(),
            parameters: weights.num_params(),
        }
    }
}

/// The task's spool directory: records `{seq:010}.json`, model files `{seq:010}.safetensors`,
/// refused records under `failed/`.
#[derive(Debug)]
struct Spool {
    dir: PathBuf,
    next: AtomicU64,
}

impl Spool {
    fn open(dir: PathBuf) -> Result<Spool> {
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let last = Spool::list(&dir)?.last().map_or(0, |(seq, _)| *seq);
        Ok(Spool { dir, next: AtomicU64::new(last + 1) })
    }

    /// The committed records, oldest first.
    fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let path = entry.map_err(io_err(dir))?.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Some(seq) = path.file_stem().and_then(|s| s.to_str()?.parse().ok())
            {
                found.push((seq, path));
            }
        }
        found.sort();
        Ok(found)
    }

    fn data_path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:010}.safetensors"))
    }

    /// Writes `op` as the next record (temp file, fsync, rename: it exists whole or not at
    /// all), after `weights` as its model file when given.
    fn push(&self, op: &Op, weights: Option<&Weights>) -> Result<u64> {
        let seq = self.next.fetch_add(1, Ordering::SeqCst);
        if let Some(weights) = weights {
            save_atomic(&self.data_path(seq), weights)?;
        }
        let path = self.dir.join(format!("{seq:010}.json"));
        let text = serde_json::to_vec(op).expect("spool records serialise");
        fledge_durable::write(&path, &text).map_err(io_err(&path))?;
        Ok(seq)
    }

    /// Drops a record MLflow has, model file first.
    fn remove(&self, seq: u64, record: &Path) -> Result<()> {
        let data = self.data_path(seq);
        match std::fs::remove_file(&data) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&data)(e)),
            _ => {}
        }
        std::fs::remove_file(record).map_err(io_err(record))
    }

    /// Moves a record MLflow refused (and its model file) to `failed/`.
    fn park(&self, seq: u64, record: &Path) -> Result<()> {
        let failed = self.dir.join("failed");
        std::fs::create_dir_all(&failed).map_err(io_err(&failed))?;
        let data = self.data_path(seq);
        if data.exists() {
            let to = failed.join(data.file_name().expect("spool files have names"));
            std::fs::rename(&data, &to).map_err(io_err(&data))?;
        }
        let to = failed.join(record.file_name().expect("spool files have names"));
        std::fs::rename(record, &to).map_err(io_err(record))
    }
}

/// What the runs, params and registered models are named after: the task config.
#[derive(Debug)]
struct Target {
    job: JobId,
    task: String,
    experiment: String,
    /// Registered model of the final model.
    model_name: String,
    job_run_name: String,
    task_run_name: String,
    job_tags: Vec<(String, String)>,
    task_tags: Vec<(String, String)>,
    params: Vec<(String, String)>,
}

/// Keeps the characters MLflow allows in metric and param keys (letters, digits, `_ - . /`
/// and space), the others as `_`, at most [`MAX_KEY`] long.
fn key(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() || "_-./ ".contains(c) { c } else { '_' })
        .take(MAX_KEY)
        .collect()
}

fn clip(value: &str, max: usize) -> String {
    value.chars().take(max).collect()
}

fn param_value(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    clip(&text, MAX_PARAM_VALUE)
}

impl Target {
    fn of(config: &TaskConfig, scope: Option<&str>) -> Target {
        let job = config.job.id.clone();
        let job_name =
            if config.job.name.is_empty() { job.to_string() } else { config.job.name.clone() };
        let experiment = if !config.job.design.is_empty() {
            config.job.design.clone()
        } else {
            job_name.clone()
        };
        let model_name = match scope {
            Some(scope) => format!("{job_name}.{scope}"),
            None => job_name.clone(),
        };
        let groups: Vec<String> =
            config.group_association.iter().map(|(ch, g)| format!("{ch}={g}")).collect();
        let topology: Vec<String> =
            config.channels.iter().map(|c| format!("{}: {}", c.name, c.pair.join(" - "))).collect();
        let job_tags = vec![
            ("fledge.kind".into(), "job".into()),
            ("fledge.job".into(), job.to_string()),
            ("fledge.job.name".into(), job_name.clone()),
            ("fledge.design".into(), config.job.design.clone()),
        ];
        let mut task_tags = vec![
            ("fledge.kind".into(), "task".into()),
            ("fledge.job".into(), job.to_string()),
            ("fledge.task".into(), config.task_id.to_string()),
            ("fledge.role".into(), config.role.clone()),
            ("fledge.groups".into(), groups.join(", ")),
            ("fledge.topology".into(), topology.join("; ")),
            ("fledge.registeredModel".into(), model_name.clone()),
        ];
        if let Some(scope) = scope {
            // The group scope the platform's model routes list the run's models under.
            task_tags.push(("fledge.scope".into(), scope.to_owned()));
        }
        let mut params: Vec<(String, String)> =
            config.hyperparameters.iter().map(|(k, v)| (key(k), param_value(v))).collect();
        params.push(("optimizer".into(), config.optimizer.sort.clone()));
        if !config.optimizer.kwargs.is_empty() {
            params.push((
                "optimizer.kwargs".into(),
                param_value(&Value::Object(config.optimizer.kwargs.clone())),
            ));
        }
        params.push(("selector".into(), config.selector.sort.clone()));
        if !config.base_model.name.is_empty() {
            params.push((
                "baseModel".into(),
                format!("{}/{}", config.base_model.name, config.base_model.version),
            ));
        }
        Target {
            job,
            task: config.task_id.to_string(),
            experiment,
            model_name,
            job_run_name: job_name,
            task_run_name: format!("{} {}", config.role, config.task_id),
            job_tags,
            task_tags,
            params,
        }
    }
}

fn tags_json(tags: &[(String, String)]) -> Value {
    Value::Array(
        tags.iter().map(|(k, v)| json!({"key": k, "value": clip(v, MAX_TAG_VALUE)})).collect(),
    )
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The runs a task writes to, found or created once.
#[derive(Clone, Debug)]
struct Runs {
    job_run: String,
    task_run: String,
    /// The task run's `artifact_uri` (`mlflow-artifacts:/…`).
    artifact_uri: String,
    /// Its path under the artifact proxy.
    artifact_path: String,
}

/// The proxy path of an `mlflow-artifacts:` URI (`mlflow-artifacts:/1/abc/artifacts` or
/// `mlflow-artifacts://host/1/abc/artifacts` → `1/abc/artifacts`), refusing any other scheme
/// (the server does not proxy those) and `..`.
fn proxy_path(uri: &str) -> Result<String, CallError> {
    let rest = uri.strip_prefix("mlflow-artifacts:").ok_or_else(|| {
        CallError::Invalid(format!(
            "artifacts are stored at {uri:?}, which the server does not proxy; start it with \
             --serve-artifacts (and no --default-artifact-root outside the proxy)"
        ))
    })?;
    let path = match rest.strip_prefix("//") {
        Some(host_and_path) => host_and_path.find('/').map_or("", |i| &host_and_path[i..]),
        None => rest,
    };
    let path = path.trim_matches('/');
    if path.split('/').any(|seg| seg == ".." || seg == ".") {
        return Err(CallError::Invalid(format!("artifact uri {uri:?} has a relative path")));
    }
    Ok(path.to_owned())
}

/// Progress of the uploader, watched by [`Registry::finish`].
#[derive(Clone, Debug, Default)]
struct Progress {
    /// Records refused by the server (kept under `failed/`).
    parked: usize,
    /// The last failure, cleared by the next success.
    last_error: Option<String>,
}

/// State shared by the registry handle and its uploader.
#[derive(Debug)]
struct Shared {
    api: Api,
    spool: Spool,
    target: Target,
    runs: tokio::sync::Mutex<Option<Runs>>,
    wake: tokio::sync::Notify,
    progress: tokio::sync::watch::Sender<Progress>,
}

/// Reads a string field of a JSON answer.
fn field<'a>(value: &'a Value, pointer: &str) -> Result<&'a str, CallError> {
    value.pointer(pointer).and_then(Value::as_str).ok_or_else(|| {
        CallError::Invalid(format!(
            "MLflow's answer has no {pointer}: {}",
            clip(&value.to_string(), 200)
        ))
    })
}

impl Shared {
    async fn experiment_id(&self) -> Result<String, CallError> {
        let name = self.target.experiment.as_str();
        for _ in 0..2 {
            match self.api.get("experiments/get-by-name", &[("experiment_name", name)]).await {
                Ok(found) => {
                    if field(&found, "/experiment/lifecycle_stage")? == "deleted" {
                        return Err(CallError::Invalid(format!(
                            "experiment {name:?} is deleted; restore it or delete it for good"
                        )));
                    }
                    return Ok(field(&found, "/experiment/experiment_id")?.to_owned());
                }
                Err(e) if e.is_code("RESOURCE_DOES_NOT_EXIST") => {}
                Err(e) => return Err(e),
            }
            match self.api.post("experiments/create", &json!({"name": name})).await {
                Ok(made) => return Ok(field(&made, "/experiment_id")?.to_owned()),
                // Another task made it in between: read it.
                Err(e) if e.is_code("RESOURCE_ALREADY_EXISTS") => {}
                Err(e) => return Err(e),
            }
        }
        Err(CallError::Invalid(format!("experiment {name:?} cannot be found nor created")))
    }

    /// Runs of `experiment` matching `filter`, oldest first.
    async fn search(&self, experiment: &str, filter: &str) -> Result<Vec<Value>, CallError> {
        let found = self
            .api
            .post(
                "runs/search",
                &json!({
                    "experiment_ids": [experiment],
                    "filter": filter,
                    "run_view_type": "ACTIVE_ONLY",
                    "max_results": 50,
                    "order_by": ["attributes.start_time ASC"],
                }),
            )
            .await?;
        let mut runs = found.get("runs").and_then(Value::as_array).cloned().unwrap_or_default();
        // Same start time: the smaller id, so every task picks the same run.
        runs.sort_by(|a, b| {
            let start = |r: &Value| r.pointer("/info/start_time").and_then(value_i64);
            let id =
                |r: &Value| r.pointer("/info/run_id").and_then(Value::as_str).map(str::to_owned);
            (start(a), id(a)).cmp(&(start(b), id(b)))
        });
        Ok(runs)
    }

    async fn create_run(
        &self,
        experiment: &str,
        name: &str,
        tags: &[(String, String)],
    ) -> Result<Value, CallError> {
        let made = self
            .api
            .post(
                "runs/create",
                &json!({
                    "experiment_id": experiment,
                    "run_name": name,
                    "start_time": now_ms(),
                    "tags": tags_json(tags),
                }),
            )
            .await?;
        made.get("run").cloned().ok_or_else(|| CallError::Invalid("runs/create: no run".into()))
    }

    /// The job's run: the oldest active run tagged with the job, created when there is none.
    /// Tasks of one job may race to create it; each then picks the oldest and deletes its own
    /// if that is not it.
    async fn job_run(&self, experiment: &str) -> Result<String, CallError> {
        let filter = format!(
            "tags.`fledge.job` = '{}' and tags.`fledge.kind` = 'job'",
            self.target.job.as_str()
        );
        if let Some(run) = self.search(experiment, &filter).await?.first() {
            return Ok(field(run, "/info/run_id")?.to_owned());
        }
        let mine =
            self.create_run(experiment, &self.target.job_run_name, &self.target.job_tags).await?;
        let mine = field(&mine, "/info/run_id")?.to_owned();
        let oldest = self.search(experiment, &filter).await?;
        let chosen = match oldest.first() {
            Some(run) => field(run, "/info/run_id")?.to_owned(),
            None => mine.clone(),
        };
        if chosen != mine {
            self.api.post("runs/delete", &json!({"run_id": mine})).await?;
        }
        Ok(chosen)
    }

    /// Finds (after a restart) or creates the runs, and logs the job's params.
    async fn resolve_runs(&self) -> Result<Runs, CallError> {
        let experiment = self.experiment_id().await?;
        let job_run = self.job_run(&experiment).await?;
        for chunk in self.target.params.chunks(BATCH_PARAMS) {
            let params: Vec<Value> =
                chunk.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
            self.api.post("runs/log-batch", &json!({"run_id": job_run, "params": params})).await?;
        }
        let filter = format!(
            "tags.`fledge.task` = '{}' and tags.`mlflow.parentRunId` = '{job_run}'",
            self.target.task
        );
        let run = match self.search(&experiment, &filter).await?.into_iter().next() {
            Some(run) => run,
            None => {
                let mut tags = self.target.task_tags.clone();
                tags.push(("mlflow.parentRunId".into(), job_run.clone()));
                self.create_run(&experiment, &self.target.task_run_name, &tags).await?
            }
        };
        let task_run = field(&run, "/info/run_id")?.to_owned();
        let artifact_uri = field(&run, "/info/artifact_uri")?.to_owned();
        let artifact_path = proxy_path(&artifact_uri)?;
        tracing::info!(job_run, task_run, artifact_uri, "MLflow runs ready");
        Ok(Runs { job_run, task_run, artifact_uri, artifact_path })
    }

    async fn runs(&self) -> Result<Runs, CallError> {
        let mut runs = self.runs.lock().await;
        if let Some(runs) = runs.as_ref() {
            return Ok(runs.clone());
        }
        let found = self.resolve_runs().await?;
        *runs = Some(found.clone());
        Ok(found)
    }

    /// Uploads one spool record.
    async fn upload(&self, seq: u64, record: &Path) -> Result<(), CallError> {
        let text = std::fs::read(record).map_err(|e| {
            CallError::Invalid(format!("cannot read spool record {}: {e}", record.display()))
        })?;
        let op: Op = serde_json::from_slice(&text).map_err(|e| {
            CallError::Invalid(format!("spool record {} is not valid: {e}", record.display()))
        })?;
        let runs = self.runs().await?;
        match op {
            Op::Metrics { metrics } => {
                for chunk in metrics.chunks(BATCH_METRICS) {
                    let body = json!({"run_id": runs.task_run, "metrics": chunk});
                    self.api.post("runs/log-batch", &body).await?;
                }
            }
            Op::Model { artifact, meta, register } => {
                let dir = format!("{}/{artifact}", runs.artifact_path);
                let meta_file = self.spool.dir.join(format!("{seq:010}.meta.json"));
                let text = serde_json::to_vec_pretty(&meta).expect("metadata serialises");
                std::fs::write(&meta_file, text).map_err(|e| {
                    CallError::Invalid(format!("cannot write {}: {e}", meta_file.display()))
                })?;
                let res = async {
                    self.api.put_artifact(&format!("{dir}/{META_FILE}"), &meta_file).await?;
                    self.api
                        .put_artifact(&format!("{dir}/{MODEL_FILE}"), &self.spool.data_path(seq))
                        .await
                }
                .await;
                let _ = std::fs::remove_file(&meta_file);
                res?;
                if let Some(name) = register {
                    let source = format!("{}/{artifact}", runs.artifact_uri);
                    self.register(&name, &source, &runs.task_run, meta.round).await?;
                }
            }
        }
        Ok(())
    }

    /// Registers `source` as a new version of `name`, unless a version of it from this run
    /// with this source exists already (a retry after a lost answer).
    async fn register(
        &self,
        name: &str,
        source: &str,
        run: &str,
        round: Option<u64>,
    ) -> Result<(), CallError> {
        match self.api.post("registered-models/create", &json!({"name": name})).await {
            Ok(_) => {}
            Err(e) if e.is_code("RESOURCE_ALREADY_EXISTS") => {}
            Err(e) => return Err(e),
        }
        let filter = format!("run_id = '{run}'");
        let found = self.api.get("model-versions/search", &[("filter", &filter)]).await?;
        let versions = found.get("model_versions").and_then(Value::as_array);
        let existing = versions.into_iter().flatten().find(|v| {
            v.get("name").and_then(Value::as_str) == Some(name)
                && v.get("source").and_then(Value::as_str) == Some(source)
        });
        let version = match existing {
            Some(v) => field(v, "/version")?.to_owned(),
            None => {
                let mut tags = vec![
                    ("fledge.job".to_owned(), self.target.job.to_string()),
                    ("fledge.task".to_owned(), self.target.task.clone()),
                ];
                if let Some(round) = round {
                    tags.push(("fledge.round".into(), round.to_string()));
                }
                let made = self
                    .api
                    .post(
                        "model-versions/create",
                        &json!({"name": name, "source": source, "run_id": run,
                                "tags": tags_json(&tags)}),
                    )
                    .await?;
                field(&made, "/model_version/version")?.to_owned()
            }
        };
        tracing::info!(name, version, source, "model version registered in MLflow");
        Ok(())
    }

    /// Marks the task's run and the job's run as ended.
    async fn end_runs(&self, runs: &Runs, succeeded: bool) -> Result<(), CallError> {
        let status = if succeeded { "FINISHED" } else { "FAILED" };
        for run in [&runs.task_run, &runs.job_run] {
            self.api
                .post(
                    "runs/update",
                    &json!({"run_id": run, "status": status, "end_time": now_ms()}),
                )
                .await?;
        }
        Ok(())
    }
}

fn value_i64(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}

/// Drains the spool forever (until the runtime shuts down), oldest record first.
async fn upload_loop(shared: Arc<Shared>) {
    let mut backoff = BACKOFF_START;
    loop {
        let woken = shared.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let next = match Spool::list(&shared.spool.dir) {
            Ok(records) => records.into_iter().next(),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the MLflow spool");
                shared.progress.send_modify(|p| p.last_error = Some(e.to_string()));
                tokio::time::sleep(BACKOFF_MAX).await;
                continue;
            }
        };
        let Some((seq, record)) = next else {
            shared.progress.send_modify(|_| {});
            woken.await;
            continue;
        };
        match shared.upload(seq, &record).await {
            Ok(()) => {
                backoff = BACKOFF_START;
                if let Err(e) = shared.spool.remove(seq, &record) {
                    tracing::error!(error = %e, "cannot remove an uploaded spool record");
                    shared.progress.send_modify(|p| p.last_error = Some(e.to_string()));
                    tokio::time::sleep(BACKOFF_MAX).await;
                    continue;
                }
                shared.progress.send_modify(|p| p.last_error = None);
            }
            Err(e) if e.retryable() => {
                tracing::warn!(url = %shared.api.base, error = %e, retry_in = ?backoff,
                    "MLflow did not take a record; it stays in the spool");
                shared.progress.send_modify(|p| p.last_error = Some(e.to_string()));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => {
                tracing::error!(url = %shared.api.base, error = %e, record = %record.display(),
                    "MLflow refused a record; it is kept under failed/");
                // The cached runs may be what is wrong (e.g. deleted): look them up again.
                *shared.runs.lock().await = None;
                let parked = shared.spool.park(seq, &record);
                shared.progress.send_modify(|p| {
                    p.parked += 1;
                    p.last_error = Some(match &parked {
                        Ok(()) => e.to_string(),
                        Err(io) => format!("{e} (and it could not be moved: {io})"),
                    });
                });
                if parked.is_err() {
                    tokio::time::sleep(BACKOFF_MAX).await;
                }
            }
        }
    }
}

/// A task's registry in an MLflow tracking server: see the module docs.
pub struct MlflowRegistry {
    shared: Arc<Shared>,
    /// Resume state stays on the worker (`{workdir}/registry`, as a local registry keeps it):
    /// it is rewritten every round and read only by a redeployed task on the same worker.
    resume: LocalRegistry,
    /// Runs the uploader; shut down in the background on drop (it may be dropped on an async
    /// thread).
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for MlflowRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlflowRegistry")
            .field("url", &self.shared.api.base)
            .field("spool", &self.shared.spool.dir)
            .finish_non_exhaustive()
    }
}

impl Drop for MlflowRegistry {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl MlflowRegistry {
    /// The registry of task `config` in the MLflow server of its `registry.uri`, spooling
    /// under `workdir`; `scope` names the task's model group (see `registry::for_task`). The
    /// token is the config's `registryToken` (what the control plane hands a deployed built-in
    /// role), else the environment's ([`token_from_env`]). Nothing is sent until something
    /// is written or loaded; records a previous run of the task left in the spool are sent
    /// first.
    pub fn for_task(config: &TaskConfig, scope: Option<&str>, workdir: &Path) -> Result<Self> {
        let token = match &config.registry_token {
            Some(token) => Some(token.0.clone()),
            None => token_from_env(),
        };
        MlflowRegistry::with_token(config, scope, workdir, token.as_deref())
    }

    /// [`MlflowRegistry::for_task`] with an explicit token.
    pub fn with_token(
        config: &TaskConfig,
        scope: Option<&str>,
        workdir: &Path,
        token: Option<&str>,
    ) -> Result<Self> {
        let api = Api::new(&config.registry.uri, token)?;
        component("job id", config.job.id.as_str())?;
        component("task id", config.task_id.as_str())?;
        if let Some(scope) = scope {
            component("model scope (the task's group names)", scope)?;
        }
        let dir =
            workdir.join("mlflow-spool").join(config.job.id.as_str()).join(config.task_id.as_str());
        let spool = Spool::open(dir)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fledge-mlflow")
            .enable_all()
            .build()
            .map_err(|source| Error::Registry { path: api.base.clone(), source })?;
        let shared = Arc::new(Shared {
            api,
            spool,
            target: Target::of(config, scope),
            runs: tokio::sync::Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            progress: tokio::sync::watch::channel(Progress::default()).0,
        });
        runtime.spawn(upload_loop(shared.clone()));
        let resume = LocalRegistry::new(workdir.join("registry"));
        let resume = match scope {
            Some(scope) => resume.scoped(scope),
            None => resume,
        };
        Ok(MlflowRegistry { shared, resume, runtime: Some(runtime) })
    }

    /// The spool directory.
    pub fn spool_dir(&self) -> &Path {
        &self.shared.spool.dir
    }

    /// The registered model that the final model becomes a version of.
    pub fn model_name(&self) -> &str {
        &self.shared.target.model_name
    }

    /// Runs `fut` on the registry's runtime from any thread (a scoped thread blocks on it,
    /// so a caller on an async thread does not panic).
    fn block_on<T: Send>(&self, fut: impl std::future::Future<Output = T> + Send) -> T {
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        std::thread::scope(|s| {
            s.spawn(|| runtime.block_on(fut))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    fn error(&self, reason: impl std::fmt::Display) -> Error {
        Error::Mlflow { url: self.shared.api.base.clone(), reason: reason.to_string() }
    }

    fn check_job(&self, job: &JobId) -> Result<()> {
        if *job == self.shared.target.job {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "the MLflow registry of job {} was asked to write for job {job}",
                self.shared.target.job
            )))
        }
    }

    fn push(&self, op: &Op, weights: Option<&Weights>) -> Result<()> {
        self.shared.spool.push(op, weights)?;
        self.shared.wake.notify_one();
        Ok(())
    }

    fn push_model(
        &self,
        artifact: String,
        round: Option<u64>,
        register: Option<String>,
        weights: &Weights,
    ) -> Result<PathBuf> {
        let meta = ModelMeta::of(
            weights,
            self.shared.target.job.as_str(),
            &self.shared.target.task,
            round,
        );
        let path = PathBuf::from(format!("mlflow:{}/{artifact}", self.shared.api.base));
        self.push(&Op::Model { artifact, meta, register }, Some(weights))?;
        Ok(path)
    }

    async fn load(&self, name: &str, version: i64) -> Result<Option<Weights>, CallError> {
        let version = version.to_string();
        let query = [("name", name), ("version", version.as_str())];
        match self.shared.api.get("model-versions/get", &query).await {
            Ok(_) => {}
            Err(e) if e.is_code("RESOURCE_DOES_NOT_EXIST") => return Ok(None),
            Err(e) => return Err(e),
        }
        let found = self.shared.api.get("model-versions/get-download-uri", &query).await?;
        let uri = field(&found, "/artifact_uri")?;
        let path = proxy_path(uri)?;
        let bytes =
            self.shared.api.get_artifact(&format!("{path}/{MODEL_FILE}"), MAX_MODEL_BYTES).await?;
        let weights = from_safetensors(&format!("{uri}/{MODEL_FILE}"), &bytes)
            .map_err(|e| CallError::Invalid(e.to_string()))?;
        Ok(Some(weights))
    }

    /// Waits until the spool is empty (or the deadline passes).
    async fn drain(&self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut progress = self.shared.progress.subscribe();
        loop {
            let pending = Spool::list(&self.shared.spool.dir).map_err(|e| e.to_string())?.len();
            let state = progress.borrow_and_update().clone();
            if pending == 0 {
                if state.parked > 0 {
                    return Err(format!(
                        "{} record(s) were refused (last error: {}); they are kept in {}",
                        state.parked,
                        state.last_error.unwrap_or_default(),
                        self.shared.spool.dir.join("failed").display()
                    ));
                }
                return Ok(());
            }
            self.shared.wake.notify_one();
            let wait = tokio::time::timeout_at(deadline, async {
                // A change of progress, or a look at the spool every second.
                let _ = tokio::time::timeout(Duration::from_secs(1), progress.changed()).await;
            });
            if wait.await.is_err() {
                return Err(format!(
                    "{pending} record(s) were not taken within {} s (last error: {}); they are \
                     kept in {}",
                    timeout.as_secs(),
                    state.last_error.unwrap_or_else(|| "none".into()),
                    self.shared.spool.dir.display()
                ));
            }
        }
    }

    /// [`Registry::finish`] with a bound of its own.
    pub fn finish_within(&self, succeeded: bool, timeout: Duration) -> Result<()> {
        self.block_on(async {
            self.drain(timeout).await.map_err(|e| self.error(e))?;
            let runs = self.shared.runs.lock().await.clone();
            if let Some(runs) = runs {
                self.shared.end_runs(&runs, succeeded).await.map_err(|e| self.error(e))?;
            }
            Ok(())
        })
    }
}

impl Registry for MlflowRegistry {
    fn load_model(&self, name: &str, version: i64) -> Result<Option<Weights>> {
        self.block_on(self.load(name, version)).map_err(|e| {
            self.error(format_args!("cannot load registered model {name:?} version {version}: {e}"))
        })
    }

    fn save_model(&self, name: &str, version: i64, weights: &Weights) -> Result<PathBuf> {
        component("model name", name)?;
        self.push_model(format!("models/{name}/v{version}"), None, Some(name.to_owned()), weights)
    }

    fn save_round(&self, job: &JobId, round: u64, weights: &Weights) -> Result<PathBuf> {
        self.check_job(job)?;
        self.push_model(format!("rounds/round-{round:05}"), Some(round), None, weights)
    }

    fn save_final(&self, job: &JobId, weights: &Weights) -> Result<PathBuf> {
        self.check_job(job)?;
        let name = self.shared.target.model_name.clone();
        self.push_model("final".to_owned(), None, Some(name), weights)
    }

    fn append_metrics(&self, job: &JobId, records: &[MetricRecord]) -> Result<()> {
        self.check_job(job)?;
        let mut metrics = Vec::new();
        for record in records {
            let timestamp = record.timestamp.map_or_else(now_ms, |t| t.timestamp_millis());
            for (name, value) in &record.metrics {
                if !value.is_finite() {
                    tracing::debug!(name, value, "a non-finite metric is not sent to MLflow");
                    continue;
                }
                metrics.push(MetricValue {
                    key: key(name),
                    value: *value,
                    timestamp,
                    step: record.round as i64,
                });
            }
        }
        if metrics.is_empty() {
            return Ok(());
        }
        self.push(&Op::Metrics { metrics }, None)
    }

    fn save_resume(&self, job: &JobId, task: &TaskId, state: &ResumeState) -> Result<()> {
        self.check_job(job)?;
        self.resume.save_resume(job, task, state)
    }

    fn load_resume(&self, job: &JobId, task: &TaskId) -> Result<Option<ResumeState>> {
        self.check_job(job)?;
        self.resume.load_resume(job, task)
    }

    fn finish(&self, succeeded: bool) -> Result<()> {
        self.finish_within(succeeded, FLUSH_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_paths_are_read_from_both_uri_forms_and_others_refused() {
        assert_eq!(proxy_path("mlflow-artifacts:/1/abc/artifacts").expect("p"), "1/abc/artifacts");
        assert_eq!(
            proxy_path("mlflow-artifacts://host:5000/1/abc/artifacts/").expect("p"),
            "1/abc/artifacts"
        );
        let err = proxy_path("file:///srv/mlruns/1/abc").unwrap_err().to_string();
        assert!(err.contains("--serve-artifacts"), "{err}");
        assert!(proxy_path("mlflow-artifacts:/1/../../etc").is_err());
    }

    #[test]
    fn urls_and_keys_are_checked() {
        assert_eq!(base_url("http://127.0.0.1:5000/").expect("ok"), "http://127.0.0.1:5000");
        assert_eq!(base_url("https://h/mlflow/").expect("ok"), "https://h/mlflow");
        for bad in ["127.0.0.1:5000", "ftp://h", "http://h/?x=1", ""] {
            let err = base_url(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
        assert_eq!(key("global.accuracy"), "global.accuracy");
        assert_eq!(key("a:b{c}"), "a_b_c_");
        assert_eq!(key(&"x".repeat(400)).len(), MAX_KEY);
    }

    #[test]
    fn the_spool_keeps_records_in_order_across_reopens() {
        let dir = tempfile::tempdir().expect("tmp");
        let spool = Spool::open(dir.path().join("s")).expect("open");
        let op = Op::Metrics { metrics: vec![] };
        assert_eq!(spool.push(&op, None).expect("push"), 1);
        assert_eq!(spool.push(&op, None).expect("push"), 2);
        let again = Spool::open(dir.path().join("s")).expect("reopen");
        assert_eq!(again.push(&op, None).expect("push"), 3, "numbering goes on after a restart");
        let listed: Vec<u64> =
            Spool::list(&again.dir).expect("list").into_iter().map(|(s, _)| s).collect();
        assert_eq!(listed, [1, 2, 3]);
        let (seq, path) = Spool::list(&again.dir).expect("list").remove(0);
        again.park(seq, &path).expect("park");
        assert!(again.dir.join("failed/0000000001.json").is_file());
        assert_eq!(Spool::list(&again.dir).expect("list").len(), 2);
    }
}
