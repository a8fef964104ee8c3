//! Jobs: plan, create, update, delete, start/stop, status, tasks and metrics.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use fledge_types::{
    Dataset, DatasetId, ErrorDetail, Job, JobId, JobSpec, JobState, MetricRecord, Task, TaskId,
    UserId,
};

use super::error::{Error, Result};
use super::{ApiState, body, check_user};
use crate::store::{self, JobFilter};

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(plan_job))
        .routes(routes!(create_job, list_jobs))
        .routes(routes!(get_job, update_job, delete_job))
        .routes(routes!(set_status, get_status))
        .routes(routes!(list_tasks))
        .routes(routes!(get_task))
        .routes(routes!(get_task_log))
        .routes(routes!(join_info))
        .routes(routes!(mint_task_key, revoke_task_key))
        .routes(routes!(list_metrics))
}

/// A start or stop request: `{"state": "starting"}` or `{"state": "stopping"}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(super) struct StatusRequest {
    /// `starting` (start) or `stopping` (stop).
    state: JobState,
}

/// A job's state with its tasks counted by state.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct JobStatus {
    /// The job's state.
    state: JobState,
    /// Why it is in that state, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Task state → number of tasks.
    tasks: BTreeMap<String, u64>,
}

/// `?state=running,failed`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct ListQuery {
    /// Comma-separated job states to keep.
    state: Option<String>,
}

/// What a job spec resolves to: its revisions and its expansion.
struct Prepared {
    schema_version: String,
    code_version: String,
    tasks: Vec<Task>,
}

/// Problems of `modelSpec.differentialPrivacy`: its fields, central DP with another optimizer
/// than `fedavg`, and an ε budget that the job's rounds would exceed (the job is refused
/// before it starts, naming how many rounds fit).
fn privacy_problems(spec: &JobSpec) -> Vec<ErrorDetail> {
    let mut problems = secagg_problems(spec);
    problems.extend(dp_problems(spec));
    problems
}

/// Problems of `modelSpec.secureAggregation`: its fields, central DP with it, and a server
/// optimizer that cannot run on a masked sum (robust rules, FedBuff).
fn secagg_problems(spec: &JobSpec) -> Vec<ErrorDetail> {
    use fledge_algorithms::privacy::{PrivacyConfig, secagg_optimizer_problem};
    let model = &spec.model_spec;
    if model.secure_aggregation.is_none() {
        return Vec::new();
    }
    let mut sections = serde_json::Map::new();
    sections.insert("secureAggregation".into(), model.secure_aggregation.clone().into());
    sections.insert("differentialPrivacy".into(), model.differential_privacy.clone().into());
    let mut problems = Vec::new();
    if let Err(e) = PrivacyConfig::from_model_spec(&serde_json::Value::Object(sections)) {
        problems.push(detail(&format!("modelSpec.{}", e.field), e.reason));
    }
    if let Some(e) = secagg_optimizer_problem(&model.optimizer.sort) {
        problems.push(detail(&format!("modelSpec.{}", e.field), e.reason));
    }
    problems
}

fn dp_problems(spec: &JobSpec) -> Vec<ErrorDetail> {
    use fledge_algorithms::privacy::{DpConfig, DpMode, dp::check_job_budget};
    let model = &spec.model_spec;
    let Some(value) = &model.differential_privacy else {
        return Vec::new();
    };
    let cfg = match DpConfig::from_json(value) {
        Ok(cfg) => cfg,
        Err(e) => return vec![detail(&format!("modelSpec.{}", e.field), e.reason)],
    };
    let mut problems = Vec::new();
    if cfg.mode == DpMode::Central && !model.optimizer.sort.eq_ignore_ascii_case("fedavg") {
        problems.push(detail(
            "modelSpec.differentialPrivacy.mode",
            format!(
                "central DP averages clipped updates itself and runs with the fedavg optimizer \
                 only, not {}",
                model.optimizer.sort
            ),
        ));
    }
    let rounds =
        model.hyperparameters.get("rounds").and_then(serde_json::Value::as_u64).unwrap_or(1);
    if let Err(e) = check_job_budget(&cfg, rounds) {
        problems.push(detail("modelSpec.differentialPrivacy.epsilon", e.to_string()));
    }
    problems
}

fn detail(path: &str, message: String) -> ErrorDetail {
    ErrorDetail { path: path.to_owned(), message }
}

/// Validates `spec` for `owner` and expands it (as job `job_id`): resolves the schema and code
/// revisions, looks the datasets up, validates, expands. Every problem comes back at once.
async fn prepare(
    state: &ApiState,
    owner: &UserId,
    spec: &JobSpec,
    job_id: &JobId,
) -> Result<Prepared> {
    let invalid = |details| Error::invalid("invalid job", details);
    let design = match state.store.get_design(Some(owner), &spec.design_id).await {
        Ok(design) => design,
        Err(store::Error::NotFound { .. }) => {
            return Err(invalid(vec![detail(
                "designId",
                format!("design {:?} not found", spec.design_id.as_str()),
            )]));
        }
        Err(err) => return Err(err.into()),
    };
    let mut details = Vec::new();
    let code_version = match &spec.code_version {
        Some(version) if design.code_versions.contains(version) => Some(version.clone()),
        Some(version) => {
            details.push(detail(
                "codeVersion",
                format!("design {} has no code revision {version:?}", design.id),
            ));
            None
        }
        None => {
            let latest = design.code_versions.last().cloned();
            if latest.is_none() {
                details.push(detail(
                    "designId",
                    format!("design {} has no code; upload a code bundle first", design.id),
                ));
            }
            latest
        }
    };
    let schema =
        match state.store.get_schema(Some(owner), &design.id, spec.schema_version.as_deref()).await
        {
            Ok(found) => Some(found),
            Err(store::Error::NotFound { .. }) => {
                details.push(match &spec.schema_version {
                    Some(version) => detail(
                        "schemaVersion",
                        format!("design {} has no schema revision {version:?}", design.id),
                    ),
                    None => detail(
                        "designId",
                        format!("design {} has no schema; upload one first", design.id),
                    ),
                });
                None
            }
            Err(err) => return Err(err.into()),
        };
    let Some((schema_version, schema)) = schema else {
        return Err(invalid(details));
    };

    // One query for every dataset the owner may use, not one per id: a 1,000-trainer job names
    // 1,000 datasets.
    let named: HashSet<&DatasetId> =
        spec.data_spec.iter().flat_map(|entry| entry.dataset_groups.values().flatten()).collect();
    let datasets: HashMap<DatasetId, Dataset> = state
        .store
        .list_datasets(Some(owner))
        .await?
        .into_iter()
        .filter(|d| named.contains(&d.id))
        .map(|d| (d.id.clone(), d))
        .collect();
    details.extend(fledge_types::validate::job(spec, &schema, &|id| datasets.get(id).cloned()));
    details.extend(privacy_problems(spec));
    let Some(code_version) = code_version.filter(|_| details.is_empty()) else {
        return Err(invalid(details));
    };
    check_registry(state, &spec.model_spec.registry).await.map_err(|d| invalid(vec![d]))?;
    let computes = state.store.list_computes().await?;
    let found: Vec<Dataset> = datasets.into_values().collect();
    let tasks =
        fledge_types::expand::expand(job_id, spec, &schema, &found, &computes).map_err(invalid)?;
    Ok(Prepared { schema_version, code_version, tasks })
}

/// A job's MLflow registry must answer before the job exists, not fail its tasks later: an
/// unreachable or misconfigured server is a problem of the spec, naming the URL.
async fn check_registry(
    state: &ApiState,
    registry: &fledge_types::RegistrySpec,
) -> Result<(), ErrorDetail> {
    if registry.sort != fledge_types::MLFLOW_REGISTRY || !registry.is_named() {
        return Ok(());
    }
    let token = state.mlflow.token_for(&registry.uri);
    crate::mlflow::check(&registry.uri, token, crate::mlflow::CHECK_TIMEOUT)
        .await
        .map(|_| ())
        .map_err(|reason| {
            detail(
                "modelSpec.registry.uri",
                format!("the MLflow registry at {} cannot be used: {reason}", registry.uri),
            )
        })
}

/// The expansion of a job spec: its tasks, nothing stored.
#[utoipa::path(post, path = "/users/{user}/jobs/plan", tag = "jobs", request_body = JobSpec,
    params(("user" = String, Path)),
    responses((status = 200, body = [Task]), (status = 400, body = fledge_types::ApiError)))]
async fn plan_job(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(user): Path<String>,
    request: Body,
) -> Result<Json<Vec<Task>>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let spec =
        body::json::<JobSpec>(request, state.limits.json_bytes, "job spec").await?.with_defaults();
    let prepared = prepare(&state, &user, &spec, &JobId::new("plan")).await?;
    Ok(Json(prepared.tasks))
}

/// Creates a job in state `ready` after validating and expanding it.
#[utoipa::path(post, path = "/users/{user}/jobs", tag = "jobs", request_body = JobSpec,
    params(("user" = String, Path)),
    responses((status = 201, body = Job), (status = 400, body = fledge_types::ApiError)))]
async fn create_job(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(user): Path<String>,
    request: Body,
) -> Result<(StatusCode, Json<Job>)> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let spec =
        body::json::<JobSpec>(request, state.limits.json_bytes, "job spec").await?.with_defaults();
    let prepared = prepare(&state, &user, &spec, &JobId::new("check")).await?;
    let job = state
        .store
        .create_job(&user, &spec, &prepared.schema_version, &prepared.code_version)
        .await?;
    tracing::info!(job_id = %job.id, owner = %user, tasks = prepared.tasks.len(), "job created");
    Ok((StatusCode::CREATED, Json(job)))
}

/// Lists the user's jobs, optionally only those in some states.
#[utoipa::path(get, path = "/users/{user}/jobs", tag = "jobs",
    params(("user" = String, Path), ListQuery), responses((status = 200, body = [Job])))]
async fn list_jobs(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(user): Path<String>,
    query: std::result::Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Vec<Job>>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let Query(query) = query?;
    let mut states = Vec::new();
    for name in
        query.state.iter().flat_map(|s| s.split(',')).map(str::trim).filter(|s| !s.is_empty())
    {
        states.push(
            name.parse::<JobState>()
                .map_err(|err| Error::invalid("invalid query", vec![detail("state", err)]))?,
        );
    }
    let filter = JobFilter { owner: Some(user), states };
    Ok(Json(state.store.list_jobs(&filter).await?))
}

/// Gets a job.
#[utoipa::path(get, path = "/users/{user}/jobs/{jobId}", tag = "jobs",
    params(("user" = String, Path), ("jobId" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = fledge_types::ApiError)))]
async fn get_job(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id)): Path<(String, String)>,
) -> Result<Json<Job>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    Ok(Json(state.store.get_job(Some(&user), &JobId::new(id)).await?))
}

/// Replaces a `ready` job's spec (validated and expanded again); 409 in any other state.
#[utoipa::path(put, path = "/users/{user}/jobs/{jobId}", tag = "jobs", request_body = JobSpec,
    params(("user" = String, Path), ("jobId" = String, Path)),
    responses((status = 200, body = Job), (status = 409, body = fledge_types::ApiError)))]
async fn update_job(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id)): Path<(String, String)>,
    request: Body,
) -> Result<Json<Job>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let id = JobId::new(id);
    let current = state.store.get_job(Some(&user), &id).await?;
    if current.state != JobState::Ready {
        return Err(Error::conflict(format!(
            "job {id} is {}; only a ready job can be changed",
            current.state
        )));
    }
    let spec =
        body::json::<JobSpec>(request, state.limits.json_bytes, "job spec").await?.with_defaults();
    let prepared = prepare(&state, &user, &spec, &id).await?;
    let job = state
        .store
        .update_job_spec(Some(&user), &id, &spec, &prepared.schema_version, &prepared.code_version)
        .await?;
    Ok(Json(job))
}

/// Deletes a job that is `ready` or final, with its tasks and metrics.
#[utoipa::path(delete, path = "/users/{user}/jobs/{jobId}", tag = "jobs",
    params(("user" = String, Path), ("jobId" = String, Path)),
    responses((status = 204), (status = 409, body = fledge_types::ApiError)))]
async fn delete_job(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id)): Path<(String, String)>,
) -> Result<StatusCode> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let id = JobId::new(id);
    match state.store.delete_job(Some(&user), &id).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(store::Error::Conflict { actual, .. }) => Err(Error::conflict(format!(
            "job {id} is {actual}; stop it and wait for it to end before deleting it"
        ))),
        Err(err) => Err(err.into()),
    }
}

/// Starts (`starting`) or stops (`stopping`) a job; 409 for an illegal transition.
#[utoipa::path(put, path = "/users/{user}/jobs/{jobId}/status", tag = "jobs",
    request_body = StatusRequest, params(("user" = String, Path), ("jobId" = String, Path)),
    responses((status = 200, body = Job), (status = 409, body = fledge_types::ApiError)))]
async fn set_status(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id)): Path<(String, String)>,
    request: Body,
) -> Result<Json<Job>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let id = JobId::new(id);
    let request: StatusRequest =
        body::json(request, state.limits.json_bytes, "status request").await?;
    // Ownership first: a foreign job is 404 whatever its state.
    state.store.get_job(Some(&user), &id).await?;
    let (from, verb, allowed): (&[JobState], &str, &str) = match request.state {
        JobState::Starting => (&[JobState::Ready], "started", "only a ready job"),
        JobState::Stopping => (
            &[JobState::Starting, JobState::Deploying, JobState::Running],
            "stopped",
            "only a starting, deploying or running job",
        ),
        other => {
            return Err(Error::invalid(
                "invalid status request",
                vec![detail(
                    "state",
                    format!("\"{other}\" cannot be requested; use \"starting\" or \"stopping\""),
                )],
            ));
        }
    };
    let reason = (request.state == JobState::Stopping).then_some("stop requested by the user");
    match state.store.set_job_state(&id, from, request.state, reason).await {
        Ok(job) => {
            tracing::info!(job_id = %id, state = %job.state, "job state requested");
            state.controller.job_changed(id);
            Ok(Json(job))
        }
        Err(store::Error::Conflict { actual, .. }) => {
            Err(Error::conflict(format!("job {id} is {actual}; {allowed} can be {verb}")))
        }
        Err(err) => Err(err.into()),
    }
}

/// A job's state and its tasks counted by state.
#[utoipa::path(get, path = "/users/{user}/jobs/{jobId}/status", tag = "jobs",
    params(("user" = String, Path), ("jobId" = String, Path)),
    responses((status = 200, body = JobStatus), (status = 404, body = fledge_types::ApiError)))]
async fn get_status(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id)): Path<(String, String)>,
) -> Result<Json<JobStatus>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let job = state.store.get_job(Some(&user), &JobId::new(id)).await?;
    let tasks = state
        .store
        .count_tasks(&job.id)
        .await?
        .into_iter()
        .map(|(task_state, n)| (task_state.to_string(), n))
        .collect();
    Ok(Json(JobStatus { state: job.state, reason: job.reason, tasks }))
}

/// A job's tasks in expansion order (never their keys).
#[utoipa::path(get, path = "/users/{user}/jobs/{jobId}/tasks", tag = "jobs",
    params(("user" = String, Path), ("jobId" = String, Path)),
    responses((status = 200, body = [Task]), (status = 404, body = fledge_types::ApiError)))]
async fn list_tasks(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id)): Path<(String, String)>,
) -> Result<Json<Vec<Task>>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let job = state.store.get_job(Some(&user), &JobId::new(id)).await?;
    Ok(Json(state.store.list_tasks(&job.id).await?))
}

/// One task with its log tail.
#[utoipa::path(get, path = "/users/{user}/jobs/{jobId}/tasks/{taskId}", tag = "jobs",
    params(("user" = String, Path), ("jobId" = String, Path), ("taskId" = String, Path)),
    responses((status = 200, body = Task), (status = 404, body = fledge_types::ApiError)))]
async fn get_task(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id, task)): Path<(String, String, String)>,
) -> Result<Json<Task>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let job = state.store.get_job(Some(&user), &JobId::new(id)).await?;
    Ok(Json(state.store.get_task(&job.id, &TaskId::new(task)).await?))
}

/// `?since=N`: the number of the first line wanted.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct LogQuery {
    /// The first line wanted (default 0); a reader passes the `next` of its previous read.
    since: Option<u64>,
}

/// Lines of a task's log, numbered (see `docs/api.md`).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct TaskLog {
    /// The number of the oldest line still held: lines `since..first` are gone.
    first: u64,
    /// The number after the last line returned: the next read's `since`.
    next: u64,
    /// The lines, without their newlines.
    lines: Vec<String>,
    /// The task's state when the lines were read: once final, no line follows those held.
    state: fledge_types::TaskState,
    /// `true` when the lines are those the task streams while it runs; `false` when they are
    /// the tail it reported with its state (numbered from 0), as the streamed ones are not
    /// held here (this apiserver restarted, or the task never streamed).
    streamed: bool,
}

/// A task's log from line `since` on: the lines its agent streams while it runs, held in the
/// apiserver's memory, else the tail the task reported with its state.
#[utoipa::path(get, path = "/users/{user}/jobs/{jobId}/tasks/{taskId}/log", tag = "jobs",
    params(("user" = String, Path), ("jobId" = String, Path), ("taskId" = String, Path),
        LogQuery),
    responses((status = 200, body = TaskLog), (status = 404, body = fledge_types::ApiError)))]
async fn get_task_log(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id, task)): Path<(String, String, String)>,
    query: std::result::Result<Query<LogQuery>, QueryRejection>,
) -> Result<Json<TaskLog>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let Query(query) = query?;
    let job = state.store.get_job(Some(&user), &JobId::new(id)).await?;
    // The state first: an agent streams its last lines before it reports a final state, so
    // lines read after a final state are all there will be.
    let task = state.store.get_task(&job.id, &TaskId::new(task)).await?;
    let since = query.since.unwrap_or(0);
    if let Some(read) = state.logs.read(&job.id, &task.task_id, since) {
        return Ok(Json(TaskLog {
            first: read.first,
            next: read.next,
            lines: read.lines,
            state: task.state,
            streamed: true,
        }));
    }
    let tail: Vec<String> = task.log.lines().map(str::to_owned).collect();
    let total = tail.len() as u64;
    let from = since.min(total);
    let lines = tail.into_iter().skip(usize::try_from(from).unwrap_or(usize::MAX)).collect();
    Ok(Json(TaskLog { first: 0, next: total, lines, state: task.state, streamed: false }))
}

/// What the data owners of a job's participant-run tasks need to start their agents.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct JoinInfo {
    /// The apiserver URL agents use, if this apiserver knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    apiserver: Option<String>,
    /// The notifier URL agents use, if this apiserver knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    notifier: Option<String>,
    /// The SHA-256 fingerprint (`sha256:...`) of the CA agents trust; agents fetch the CA from
    /// `/api/v1/ca.pem` and check it against this (absent in plain text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_fingerprint: Option<String>,
    /// The job's participant-run tasks in expansion order (empty until the job is expanded,
    /// i.e. started).
    tasks: Vec<Task>,
    /// The participant-run tasks that have a key minted (keys are shown once, when minted).
    #[serde(default)]
    keyed: Vec<TaskId>,
}

/// A participant-run task's key, freshly minted: shown once, stored only as its SHA-256.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct MintedKey {
    /// The task.
    task_id: TaskId,
    /// Its key: the data owner's agent presents it (`FLEDGE_TASK_KEY`).
    key: String,
}

/// The participant-run tasks of a job and the endpoints their agents join.
#[utoipa::path(get, path = "/users/{user}/jobs/{jobId}/join", tag = "jobs",
    params(("user" = String, Path), ("jobId" = String, Path)),
    responses((status = 200, body = JoinInfo), (status = 404, body = fledge_types::ApiError)))]
async fn join_info(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id)): Path<(String, String)>,
) -> Result<Json<JoinInfo>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let job = state.store.get_job(Some(&user), &JobId::new(id)).await?;
    let tasks = state.store.list_tasks(&job.id).await?.into_iter().filter(|t| !t.managed).collect();
    let keyed = state.store.participant_keys(&job.id).await?.into_iter().collect();
    Ok(Json(JoinInfo {
        apiserver: state.env.apiserver.clone(),
        notifier: state.notifier_url.clone(),
        ca_fingerprint: state.ca.as_ref().map(|ca| ca.fingerprint().to_string()),
        tasks,
        keyed,
    }))
}

/// Mints the key of a participant-run task (the job's owner or an admin), replacing any key it
/// had: the agent running with the old key is refused from its next call on. The key is in
/// this answer only; the data owner's agent presents it.
#[utoipa::path(post, path = "/users/{user}/jobs/{jobId}/tasks/{taskId}/key", tag = "jobs",
    params(("user" = String, Path), ("jobId" = String, Path), ("taskId" = String, Path)),
    responses((status = 201, body = MintedKey), (status = 404, body = fledge_types::ApiError),
        (status = 409, body = fledge_types::ApiError)))]
async fn mint_task_key(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id, task)): Path<(String, String, String)>,
) -> Result<(StatusCode, Json<MintedKey>)> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let job = state.store.get_job(Some(&user), &JobId::new(id)).await?;
    let task = TaskId::new(task);
    let key = super::auth::new_secret();
    state
        .store
        .set_participant_key(&job.id, &task, Some(&super::auth::secret_hash(&key)))
        .await
        .map_err(|err| participant_key_error(err, &job.id, &task))?;
    tracing::info!(job_id = %job.id, task_id = %task, "participant-run task key minted");
    Ok((StatusCode::CREATED, Json(MintedKey { task_id: task, key })))
}

/// Revokes the key of a participant-run task (the job's owner or an admin): its agent is
/// refused from its next call on, until a new key is minted.
#[utoipa::path(delete, path = "/users/{user}/jobs/{jobId}/tasks/{taskId}/key", tag = "jobs",
    params(("user" = String, Path), ("jobId" = String, Path), ("taskId" = String, Path)),
    responses((status = 204), (status = 404, body = fledge_types::ApiError),
        (status = 409, body = fledge_types::ApiError)))]
async fn revoke_task_key(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id, task)): Path<(String, String, String)>,
) -> Result<StatusCode> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let job = state.store.get_job(Some(&user), &JobId::new(id)).await?;
    let task = TaskId::new(task);
    state
        .store
        .set_participant_key(&job.id, &task, None)
        .await
        .map_err(|err| participant_key_error(err, &job.id, &task))?;
    tracing::info!(job_id = %job.id, task_id = %task, "participant-run task key revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// A participant-key store error in the words of the route.
fn participant_key_error(err: store::Error, job: &JobId, task: &TaskId) -> Error {
    match err {
        store::Error::NotFound { .. } => {
            Error::not_found(format!("task {task} of job {job} not found"))
        }
        store::Error::Conflict { kind: "task", .. } => Error::conflict(format!(
            "task {task} is platform-run: its key goes to its deployer, none can be minted"
        )),
        store::Error::Conflict { actual, .. } => Error::conflict(format!(
            "job {job} is {actual}: no task key is valid once a job has ended"
        )),
        other => other.into(),
    }
}

/// A job's metric records in the order they arrived.
#[utoipa::path(get, path = "/users/{user}/jobs/{jobId}/metrics", tag = "jobs",
    params(("user" = String, Path), ("jobId" = String, Path)),
    responses((status = 200, body = [MetricRecord]), (status = 404, body = fledge_types::ApiError)))]
async fn list_metrics(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id)): Path<(String, String)>,
) -> Result<Json<Vec<MetricRecord>>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let job = state.store.get_job(Some(&user), &JobId::new(id)).await?;
    Ok(Json(state.store.list_metrics(&job.id).await?))
}
