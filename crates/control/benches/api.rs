//! Load benchmark of the apiserver on loopback over a temp-dir SQLite store.
//!
//! Measures (bounded in count, printed as a table):
//! - jobs planned and created per second for a 1,000-trainer job (each iteration validates,
//!   expands and, for create, stores the job);
//! - `GET /users/{user}/jobs/{jobId}/status` requests per second with 16 concurrent clients, for
//!   a job without tasks and for one with its 1,001 tasks stored.
//!
//! Run with `cargo bench -p fledge-control --bench api`.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use fledge_control::api::{self, ApiState};
use fledge_control::controller;
use fledge_control::store::{BlobStore, NewTask, SqliteStore, Store};
use fledge_types::JobId;
use fledge_types::task_config::TaskEnv;

const TRAINERS: usize = 1_000;
const JOB_ITERATIONS: usize = 20;
const STATUS_REQUESTS: usize = 4_000;
const CONCURRENCY: usize = 16;

fn schema() -> Value {
    json!({
        "name": "two-tier",
        "roles": [
            {"name": "trainer", "isDataConsumer": true},
            {"name": "aggregator"}
        ],
        "channels": [
            {"name": "param-channel", "pair": ["trainer", "aggregator"],
             "funcTags": {"trainer": ["fetch", "upload"], "aggregator": ["distribute", "aggregate"]}}
        ]
    })
}

fn code() -> Vec<u8> {
    use std::io::Write as _;
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for role in ["trainer", "aggregator"] {
        out.start_file(format!("{role}/main.py"), zip::write::SimpleFileOptions::default())
            .expect("zip entry");
        out.write_all(b"print('hi')\n").expect("zip write");
    }
    out.finish().expect("zip finish").into_inner()
}

async fn send(request: reqwest::RequestBuilder, token: &str) -> anyhow::Result<Value> {
    let response = request.bearer_auth(token).send().await?;
    let status = response.status();
    let body: Value = response.json().await?;
    anyhow::ensure!(status.is_success(), "{status}: {body}");
    Ok(body)
}

async fn status_rate(http: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<(f64, f64)> {
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (http, url, token) = (http.clone(), url.to_owned(), token.to_owned());
        workers.spawn(async move {
            for _ in 0..STATUS_REQUESTS / CONCURRENCY {
                send(http.get(&url), &token).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done??;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((STATUS_REQUESTS as f64 / secs, secs))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let blobs = BlobStore::new(dir.path().join("blobs"), 1 << 20)?;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("f.db"), blobs).await?);
    let (handle, _woken) = controller::Handle::channel(1 << 16);
    let state = ApiState::new(store.clone(), handle, None, TaskEnv::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}/api/v1", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(api::serve(listener, state, shutdown.clone()));
    let token = api::bootstrap_admin(store.as_ref()).await?;
    // Plain text on loopback: this measures the handlers, not TLS.
    fledge_tls::install_default_provider();
    let http = reqwest::Client::new();

    send(http.post(format!("{base}/users/admin/designs")).json(&json!({"id": "bench"})), &token)
        .await?;
    send(http.post(format!("{base}/users/admin/designs/bench/schemas")).json(&schema()), &token)
        .await?;
    let response = http
        .post(format!("{base}/users/admin/designs/bench/codes"))
        .bearer_auth(&token)
        .header("content-type", "application/zip")
        .body(code())
        .send()
        .await?;
    anyhow::ensure!(response.status().is_success(), "code upload: {}", response.status());
    let mut datasets = Vec::with_capacity(TRAINERS);
    for i in 0..TRAINERS {
        let body = send(
            http.post(format!("{base}/users/admin/datasets")).json(&json!({
                "name": format!("d{i}"), "url": format!("file:///data/{i}.csv"),
                "realm": "default/bench"})),
            &token,
        )
        .await?;
        datasets.push(body["id"].clone());
    }
    let job = json!({"name": "big", "designId": "bench",
                     "dataSpec": [{"role": "trainer", "datasetGroups": {"default": datasets}}]});

    let start = Instant::now();
    for _ in 0..JOB_ITERATIONS {
        let plan =
            send(http.post(format!("{base}/users/admin/jobs/plan")).json(&job), &token).await?;
        anyhow::ensure!(plan.as_array().map(Vec::len) == Some(TRAINERS + 1), "plan size");
    }
    let plan_secs = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut job_id = String::new();
    for _ in 0..JOB_ITERATIONS {
        let created =
            send(http.post(format!("{base}/users/admin/jobs")).json(&job), &token).await?;
        job_id = created["id"].as_str().unwrap_or_default().to_owned();
    }
    let create_secs = start.elapsed().as_secs_f64();

    let empty_url = format!("{base}/users/admin/jobs/{job_id}/status");
    let (empty_rate, empty_secs) = status_rate(&http, &empty_url, &token).await?;

    // Store the tasks of the last job as the controller would, then poll its status again.
    let plan = send(http.post(format!("{base}/users/admin/jobs/plan")).json(&job), &token).await?;
    let mut tasks: Vec<fledge_types::Task> = serde_json::from_value(plan)?;
    for (i, task) in tasks.iter_mut().enumerate() {
        task.job_id = JobId::new(&job_id);
        task.task_id = fledge_types::TaskId::new(format!("{job_id}-{i}"));
    }
    let new: Vec<NewTask> = tasks
        .into_iter()
        .map(|task| NewTask { key_sha256: api::secret_hash(&api::new_secret()), task })
        .collect();
    let start = Instant::now();
    store.insert_tasks(&new).await?;
    let insert_secs = start.elapsed().as_secs_f64();
    let (full_rate, full_secs) = status_rate(&http, &empty_url, &token).await?;

    println!("apiserver load benchmark (loopback, SQLite, debug={})", cfg!(debug_assertions));
    println!("{:<52} {:>12} {:>10}", "measure", "per second", "seconds");
    let row = |name: &str, rate: f64, secs: f64| println!("{name:<52} {rate:>12.1} {secs:>10.3}");
    row(
        &format!("plan a {TRAINERS}-trainer job ({JOB_ITERATIONS}x)"),
        JOB_ITERATIONS as f64 / plan_secs,
        plan_secs,
    );
    row(
        &format!("create a {TRAINERS}-trainer job ({JOB_ITERATIONS}x)"),
        JOB_ITERATIONS as f64 / create_secs,
        create_secs,
    );
    row(
        &format!("GET job status, no tasks ({STATUS_REQUESTS}x, {CONCURRENCY} clients)"),
        empty_rate,
        empty_secs,
    );
    row(
        &format!(
            "GET job status, {} tasks ({STATUS_REQUESTS}x, {CONCURRENCY} clients)",
            TRAINERS + 1
        ),
        full_rate,
        full_secs,
    );
    row(
        &format!("store.insert_tasks of {} tasks (tasks/s)", TRAINERS + 1),
        (TRAINERS + 1) as f64 / insert_secs,
        insert_secs,
    );

    shutdown.cancel();
    server.await??;
    Ok(())
}
