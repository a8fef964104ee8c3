//! The control plane's side of MLflow registries (`docs/registry.md`): the check a job's
//! MLflow registry passes before the job is created (the tracking server at its
//! `modelSpec.registry.uri` answers MLflow's REST API with this deployment's credentials and
//! proxies artifacts, within a short timeout), and the reads behind the model routes (a job's
//! model artifacts listed and downloaded through the artifact proxy). The data plane's
//! `fledge_sdk::registry::mlflow` writes them; this crate does not link the sdk, so the few
//! calls are made here.
//!
//! The token is the apiserver's `FLEDGE_MLFLOW_TOKEN` (else MLflow's `MLFLOW_TRACKING_TOKEN`),
//! sent as `Authorization: Bearer …`, and only to the servers named in `FLEDGE_MLFLOW_SERVERS`
//! ([`MlflowAuth`]): a job names its registry's URL, and a URL of the job owner's choosing
//! must not receive the operator's token.

use std::time::Duration;

use fledge_types::ModelFile;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde_json::{Value, json};

/// How long a job creation waits for its MLflow server.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest answer read from the server while checking it or listing a job's models.
const MAX_ANSWER: usize = 4 << 20;

/// Largest model file the apiserver streams from MLflow (as the workers' download bound).
pub const MAX_MODEL_BYTES: u64 = 2 << 30;

/// How long one API call of the model routes may take.
pub const API_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a download may wait for its next bytes.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Most runs of one job read when listing its models (tasks that wrote to MLflow).
const MAX_RUNS: usize = 1_000;

/// Most round checkpoints listed per run.
const MAX_ROUNDS: usize = 10_000;

/// How many artifact listings run at once.
const LIST_CONCURRENCY: usize = 8;

/// The variable naming the servers the token belongs to.
pub const SERVERS_ENV: &str = "FLEDGE_MLFLOW_SERVERS";

/// The token from the environment, as the workers read it.
pub fn token_from_env() -> Option<String> {
    ["FLEDGE_MLFLOW_TOKEN", "MLFLOW_TRACKING_TOKEN"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
}

/// The operator's MLflow credentials: a bearer token and the tracking servers it belongs to
/// (`FLEDGE_MLFLOW_SERVERS`, comma-separated base URLs). The token is sent to, and handed to
/// tasks for, a registry URL only when it is one of those servers (same scheme, host and port,
/// and under its path); a token without servers is used for none.
#[derive(Clone, Default)]
pub struct MlflowAuth {
    token: Option<String>,
    servers: Vec<reqwest::Url>,
}

impl std::fmt::Debug for MlflowAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlflowAuth")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("servers", &self.servers.iter().map(|u| u.as_str()).collect::<Vec<_>>())
            .finish()
    }
}

/// A server URL as a comparable base: http(s), a host, no query, a path ending in `/`.
fn server_url(uri: &str) -> Result<reqwest::Url, String> {
    let base = uri.trim().trim_end_matches('/');
    let mut url = reqwest::Url::parse(base).map_err(|e| format!("{base:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{base:?} is not an http:// or https:// server URL"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(format!("{base:?} has a query, a fragment or a login; name the server only"));
    }
    let path = format!("{}/", url.path().trim_end_matches('/'));
    url.set_path(&path);
    Ok(url)
}

impl MlflowAuth {
    /// Credentials of `token` for `servers` (comma-separated base URLs).
    pub fn new(token: Option<String>, servers: &str) -> Result<MlflowAuth, String> {
        let servers = servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| server_url(s).map_err(|e| format!("{SERVERS_ENV}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let token = token.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty());
        if let Some(token) = &token
            && HeaderValue::from_str(&format!("Bearer {token}")).is_err()
        {
            return Err("the MLflow token is not a valid header value".into());
        }
        Ok(MlflowAuth { token, servers })
    }

    /// The credentials of this process's environment ([`token_from_env`], [`SERVERS_ENV`]).
    pub fn from_env() -> Result<MlflowAuth, String> {
        MlflowAuth::new(token_from_env(), &std::env::var(SERVERS_ENV).unwrap_or_default())
    }

    /// Whether a token is set at all.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The servers the token belongs to.
    pub fn servers(&self) -> impl Iterator<Item = &str> {
        self.servers.iter().map(reqwest::Url::as_str)
    }

    /// The token for the registry at `uri`: only when it is one of the servers.
    pub fn token_for(&self, uri: &str) -> Option<&str> {
        let token = self.token.as_deref()?;
        let url = server_url(uri).ok()?;
        self.servers
            .iter()
            .any(|s| {
                s.scheme() == url.scheme()
                    && s.host_str() == url.host_str()
                    && s.port_or_known_default() == url.port_or_known_default()
                    && url.path().starts_with(s.path())
            })
            .then_some(token)
    }
}

/// What a server that passed the check said about itself.
#[derive(Clone, Debug, Default)]
pub struct Found {
    /// Its MLflow version (`GET /version`), when it tells.
    pub version: Option<String>,
}

/// A tracking server as the apiserver speaks to it: its base URL and the bearer header.
#[derive(Clone, Debug)]
pub struct Server {
    http: reqwest::Client,
    base: String,
    auth: Option<HeaderValue>,
}

/// What went wrong talking to a server: its HTTP status when it answered, and the reason.
#[derive(Clone, Debug)]
pub struct Fault {
    /// The HTTP status, when the server answered.
    pub status: Option<u16>,
    /// MLflow's `error_code` of an error answer, when it gave one.
    pub code: Option<String>,
    /// What happened, for a message.
    pub reason: String,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl Fault {
    fn new(reason: impl Into<String>) -> Fault {
        Fault { status: None, code: None, reason: reason.into() }
    }

    /// Whether the server said the thing asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        self.status == Some(404) || self.code.as_deref() == Some("RESOURCE_DOES_NOT_EXIST")
    }
}

impl Server {
    /// The server at `uri` (an http(s) base URL), sending `token` when given; each API call
    /// is bounded by `timeout`, a download by `READ_TIMEOUT` between reads.
    pub fn new(uri: &str, token: Option<&str>, timeout: Duration) -> Result<Server, String> {
        let base = server_url(uri)?.as_str().trim_end_matches('/').to_owned();
        fledge_tls::install_default_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .read_timeout(READ_TIMEOUT.min(timeout.max(Duration::from_secs(1))))
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        let auth = match token {
            Some(token) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    .map_err(|_| "the MLflow token is not a valid header value".to_owned())?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        Ok(Server { http, base, auth })
    }

    fn request(&self, method: reqwest::Method, url: String) -> reqwest::RequestBuilder {
        let req = self.http.request(method, url);
        match &self.auth {
            Some(value) => req.header(AUTHORIZATION, value.clone()),
            None => req,
        }
    }

    async fn get(&self, endpoint: &str, query: &[(&str, &str)]) -> Result<Value, Fault> {
        let req = self
            .request(reqwest::Method::GET, format!("{}/api/2.0/mlflow/{endpoint}", self.base))
            .query(query)
            .timeout(API_TIMEOUT);
        answer(req).await
    }

    async fn post(&self, endpoint: &str, body: &Value) -> Result<Value, Fault> {
        let req = self
            .request(reqwest::Method::POST, format!("{}/api/2.0/mlflow/{endpoint}", self.base))
            .json(body)
            .timeout(API_TIMEOUT);
        answer(req).await
    }

    /// Checks the server (see the module docs): it answers MLflow's API and proxies artifacts.
    pub async fn check(&self) -> Result<Found, String> {
        let req = self
            .request(
                reqwest::Method::POST,
                format!("{}/api/2.0/mlflow/experiments/search", self.base),
            )
            .json(&json!({"max_results": 1}));
        let found = answer(req).await.map_err(|f| f.reason)?;
        if !found.is_object() {
            return Err("it does not answer as an MLflow tracking server".to_owned());
        }
        let req = self
            .request(
                reqwest::Method::GET,
                format!("{}/api/2.0/mlflow-artifacts/artifacts", self.base),
            )
            .query(&[("path", "")]);
        answer(req).await.map_err(|e| {
            format!("it does not proxy artifacts ({e}); start it with --serve-artifacts")
        })?;
        // `/version` answers plain text; a server that does not tell is not wrong.
        let version =
            match self.request(reqwest::Method::GET, format!("{}/version", self.base)).send().await
            {
                Ok(resp) if resp.status().is_success() => read_bounded(resp, 64)
                    .await
                    .ok()
                    .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
                    .filter(|v| !v.is_empty() && v.bytes().all(|c| c.is_ascii_graphic())),
                _ => None,
            };
        Ok(Found { version })
    }

    /// The task runs of job `job` in experiment `experiment` (the job's design), oldest first:
    /// each run's id, its proxy path and its model scope (`fledge.scope`, none for the job's
    /// one model). An experiment that does not exist has none.
    async fn job_runs(&self, experiment: &str, job: &str) -> Result<Vec<JobRun>, Fault> {
        if job.contains(['\'', '\\']) {
            return Err(Fault::new(format!("job id {job:?} cannot be searched for")));
        }
        let found =
            match self.get("experiments/get-by-name", &[("experiment_name", experiment)]).await {
                Ok(found) => found,
                Err(fault) if fault.is_not_found() => return Ok(Vec::new()),
                Err(fault) => return Err(fault),
            };
        let id = str_at(&found, "/experiment/experiment_id")?.to_owned();
        let filter = format!("tags.`fledge.job` = '{job}' and tags.`fledge.kind` = 'task'");
        let mut runs = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let mut body = json!({"experiment_ids": [id], "filter": filter, "max_results": 500,
                "order_by": ["attributes.start_time ASC"]});
            if let Some(token) = &page {
                body["page_token"] = json!(token);
            }
            let found = self.post("runs/search", &body).await?;
            for run in found.get("runs").and_then(Value::as_array).into_iter().flatten() {
                if runs.len() >= MAX_RUNS {
                    return Err(Fault::new(format!("job {job} has more than {MAX_RUNS} runs")));
                }
                let uri = str_at(run, "/info/artifact_uri")?;
                runs.push(JobRun {
                    id: str_at(run, "/info/run_id")?.to_owned(),
                    artifacts: proxy_path(uri).map_err(Fault::new)?,
                    scope: tag(run, "fledge.scope").map(str::to_owned),
                });
            }
            page = found
                .get("next_page_token")
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if page.is_none() {
                break;
            }
        }
        Ok(runs)
    }

    /// The files directly under `path` of `run`'s artifacts: `(path, is_dir, size)`.
    async fn list(&self, run: &str, path: &str) -> Result<Vec<(String, bool, u64)>, Fault> {
        let found = self.get("artifacts/list", &[("run_id", run), ("path", path)]).await?;
        let mut out = Vec::new();
        for file in found.get("files").and_then(Value::as_array).into_iter().flatten() {
            let Some(path) = file.get("path").and_then(Value::as_str) else { continue };
            let is_dir = file.get("is_dir").and_then(Value::as_bool).unwrap_or(false);
            let size = match file.get("file_size") {
                Some(Value::Number(n)) => n.as_u64().unwrap_or(0),
                Some(Value::String(s)) => s.parse().unwrap_or(0),
                _ => 0,
            };
            out.push((path.to_owned(), is_dir, size));
        }
        Ok(out)
    }

    /// The size of `dir/model.safetensors` of `run`, if it is there.
    async fn model_size(&self, run: &str, dir: &str) -> Result<Option<u64>, Fault> {
        let file = format!("{dir}/{MODEL_FILE}");
        Ok(self
            .list(run, dir)
            .await?
            .into_iter()
            .find(|(p, d, _)| !d && *p == file)
            .map(|(_, _, s)| s))
    }

    /// The model files of job `job` (final and per round, per group scope), oldest round
    /// first; where two runs hold the same file, the later run's.
    pub async fn job_models(&self, experiment: &str, job: &str) -> Result<Vec<ModelFile>, Fault> {
        use futures::StreamExt as _;
        let runs = self.job_runs(experiment, job).await?;
        let mut found: std::collections::BTreeMap<(Option<String>, bool, Option<u64>), u64> =
            Default::default();
        for run in &runs {
            let mut dirs: Vec<(Option<u64>, String)> = vec![(None, "final".to_owned())];
            let rounds = self.list(&run.id, "rounds").await?;
            dirs.extend(
                rounds
                    .into_iter()
                    .filter(|(_, is_dir, _)| *is_dir)
                    .filter_map(|(path, _, _)| {
                        let round = path.strip_prefix("rounds/round-")?;
                        (!round.is_empty() && round.bytes().all(|b| b.is_ascii_digit()))
                            .then(|| round.parse().ok())
                            .flatten()
                            .map(|r| (Some(r), path))
                    })
                    .take(MAX_ROUNDS),
            );
            let sizes: Vec<_> =
                futures::stream::iter(dirs.into_iter().map(|(round, dir)| async move {
                    self.model_size(&run.id, &dir).await.map(|size| (round, size))
                }))
                .buffer_unordered(LIST_CONCURRENCY)
                .collect()
                .await;
            for size in sizes {
                if let (round, Some(size)) = size? {
                    found.insert((run.scope.clone(), round.is_none(), round), size);
                }
            }
        }
        Ok(found
            .into_iter()
            .map(|((group, _, round), size)| ModelFile { group, round, size })
            .collect())
    }

    /// The model file of job `job` (`round`'s checkpoint, else the final model; of `group`'s
    /// scope, else the job's one model) as a streaming answer from the artifact proxy, with
    /// its length when the server tells it; `None` when no run of the job has it. Bounded by
    /// [`MAX_MODEL_BYTES`]: a larger file is refused, and a stream that runs past the bound
    /// is cut.
    pub async fn job_model(
        &self,
        experiment: &str,
        job: &str,
        round: Option<u64>,
        group: Option<&str>,
    ) -> Result<Option<(Option<u64>, reqwest::Response)>, Fault> {
        let runs = self.job_runs(experiment, job).await?;
        let dir = match round {
            Some(round) => format!("rounds/round-{round:05}"),
            None => "final".to_owned(),
        };
        for run in runs.iter().rev().filter(|r| r.scope.as_deref() == group) {
            let url = format!(
                "{}/api/2.0/mlflow-artifacts/artifacts/{}/{dir}/{MODEL_FILE}",
                self.base, run.artifacts
            );
            let resp = self
                .request(reqwest::Method::GET, url)
                .send()
                .await
                .map_err(|e| Fault::new(format!("unreachable: {}", chain(&e))))?;
            let status = resp.status();
            if status.as_u16() == 404 {
                continue;
            }
            if !status.is_success() {
                let body = read_bounded(resp, 4096).await.unwrap_or_default();
                return Err(status_fault(status, &body));
            }
            let length = resp.content_length();
            if length.is_some_and(|n| n > MAX_MODEL_BYTES) {
                return Err(Fault {
                    status: Some(413),
                    code: None,
                    reason: format!(
                        "the model file is larger than the apiserver streams ({MAX_MODEL_BYTES} bytes)"
                    ),
                });
            }
            return Ok(Some((length, resp)));
        }
        Ok(None)
    }
}

/// The model file's name in a model's artifact directory (as the sdk writes it).
const MODEL_FILE: &str = "model.safetensors";

/// One task run of a job.
#[derive(Debug)]
struct JobRun {
    id: String,
    /// Its artifacts' path under the artifact proxy.
    artifacts: String,
    scope: Option<String>,
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> Result<&'a str, Fault> {
    value.pointer(pointer).and_then(Value::as_str).ok_or_else(|| {
        let text = value.to_string();
        Fault::new(format!("MLflow's answer has no {pointer}: {}", &text[..text.len().min(200)]))
    })
}

fn tag<'a>(run: &'a Value, key: &str) -> Option<&'a str> {
    run.pointer("/data/tags")?.as_array()?.iter().find(|t| t["key"] == key)?["value"].as_str()
}

/// The proxy path of an `mlflow-artifacts:` URI (`mlflow-artifacts:/1/abc/artifacts` or
/// `mlflow-artifacts://host/1/abc/artifacts` → `1/abc/artifacts`); any other scheme is not
/// served through the proxy, and a relative path is refused.
fn proxy_path(uri: &str) -> Result<String, String> {
    let rest = uri.strip_prefix("mlflow-artifacts:").ok_or_else(|| {
        format!("artifacts are stored at {uri:?}, which the server does not proxy")
    })?;
    let path = match rest.strip_prefix("//") {
        Some(host_and_path) => host_and_path.find('/').map_or("", |i| &host_and_path[i..]),
        None => rest,
    };
    let path = path.trim_matches('/');
    if path.is_empty()
        || path.split('/').any(|seg| seg.is_empty() || seg == ".." || seg == ".")
        || !path.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    {
        return Err(format!("artifact uri {uri:?} is not a path the apiserver reads"));
    }
    Ok(path.to_owned())
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// Checks the MLflow tracking server at `uri` (see the module docs), within `timeout`. The
/// error says what is wrong; the caller names the URL.
pub async fn check(uri: &str, token: Option<&str>, timeout: Duration) -> Result<Found, String> {
    let server = Server::new(uri, token, timeout)?;
    match tokio::time::timeout(timeout, server.check()).await {
        Ok(res) => res,
        Err(_) => Err(format!("no answer within {} s", timeout.as_secs_f64())),
    }
}

/// At most `max` bytes of `resp`'s body.
async fn read_bounded(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, Fault> {
    let mut body = Vec::new();
    while let Some(chunk) =
        resp.chunk().await.map_err(|e| Fault::new(format!("answer cut: {e}")))?
    {
        if body.len() + chunk.len() > max {
            return Err(Fault::new(format!("an answer larger than {max} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn status_fault(status: reqwest::StatusCode, body: &[u8]) -> Fault {
    let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let code = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error_code").and_then(Value::as_str).map(str::to_owned));
    let reason = match status.as_u16() {
        401 | 403 => format!(
            "HTTP {status}: it refused this deployment's credentials (set FLEDGE_MLFLOW_TOKEN \
             or MLFLOW_TRACKING_TOKEN, and name the server in {SERVERS_ENV}): {text}"
        ),
        _ => format!("HTTP {status}: {text}"),
    };
    Fault { status: Some(status.as_u16()), code, reason }
}

/// The JSON answer to `req`, or what went wrong (no answer, an HTTP error, not JSON).
async fn answer(req: reqwest::RequestBuilder) -> Result<Value, Fault> {
    let resp = req.send().await.map_err(|e| Fault::new(format!("unreachable: {}", chain(&e))))?;
    let status = resp.status();
    if resp.content_length().is_some_and(|n| n > MAX_ANSWER as u64) {
        return Err(Fault::new(format!(
            "HTTP {status} with an answer larger than {MAX_ANSWER} bytes"
        )));
    }
    let body = read_bounded(resp, MAX_ANSWER)
        .await
        .map_err(|f| Fault::new(format!("HTTP {status} with {f}")))?;
    if !status.is_success() {
        return Err(status_fault(status, &body));
    }
    serde_json::from_slice(&body).map_err(|_| {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        Fault::new(format!("it does not answer as an MLflow tracking server: {text:?}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_or_malformed_server_is_refused_with_the_reason() {
        // A port nobody listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err =
            check(&format!("http://127.0.0.1:{port}"), None, CHECK_TIMEOUT).await.unwrap_err();
        assert!(err.contains("unreachable"), "{err}");
        let err = check("ftp://host", None, CHECK_TIMEOUT).await.unwrap_err();
        assert!(err.contains("http://"), "{err}");
    }

    #[test]
    fn the_token_goes_only_to_the_servers_it_belongs_to() {
        let auth = MlflowAuth::new(
            Some("s3cret".into()),
            "http://mlflow.example:5000, https://ml.example/team-a/",
        )
        .unwrap();
        for yes in [
            "http://mlflow.example:5000",
            "http://MLflow.example:5000/",
            "https://ml.example/team-a",
            "https://ml.example:443/team-a/sub",
        ] {
            assert_eq!(auth.token_for(yes), Some("s3cret"), "{yes}");
        }
        for no in [
            "http://mlflow.example:5001",
            "https://mlflow.example:5000",
            "http://mlflow.example.evil:5000",
            "https://ml.example/team-ab",
            "https://ml.example/",
            "http://user@mlflow.example:5000",
            "not a url",
        ] {
            assert_eq!(auth.token_for(no), None, "{no}");
        }
        let none = MlflowAuth::new(Some("s3cret".into()), "").unwrap();
        assert!(none.has_token());
        assert_eq!(none.token_for("http://mlflow.example:5000"), None, "no servers: no one");
        assert!(!format!("{auth:?}").contains("s3cret"));
        let err = MlflowAuth::new(None, "ftp://x").unwrap_err();
        assert!(err.contains(SERVERS_ENV), "{err}");
        assert!(MlflowAuth::new(Some("a\nb".into()), "").is_err());
    }

    #[test]
    fn artifact_uris_are_read_strictly() {
        assert_eq!(proxy_path("mlflow-artifacts:/1/abc/artifacts").unwrap(), "1/abc/artifacts");
        assert_eq!(
            proxy_path("mlflow-artifacts://host:5000/1/abc/artifacts").unwrap(),
            "1/abc/artifacts"
        );
        for bad in [
            "s3://bucket/1/abc",
            "mlflow-artifacts:/1/../etc",
            "mlflow-artifacts:/1//x",
            "mlflow-artifacts:/",
            "mlflow-artifacts:/1/a?b",
        ] {
            assert!(proxy_path(bad).is_err(), "{bad}");
        }
    }
}
