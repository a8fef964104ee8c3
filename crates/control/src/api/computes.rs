//! Computes (admin), and the deployer's deployment reports and task-key claims (compute API key).

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use fledge_types::{Compute, ComputeId, ComputeSpec, ErrorDetail, JobId, TaskId, TaskState};

use super::error::{Error, Result};
use super::users::check_id;
use super::{ApiState, body};
use crate::store;

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_compute, list_computes))
        .routes(routes!(get_compute, delete_compute))
        .routes(routes!(report_deployment))
        .routes(routes!(claim_task_key))
        .routes(routes!(compute_endpoints))
}

/// Where a compute's workers connect: what task configs and deploy events carry, without any
/// credential, so that a compute can check it reaches each (`fledge doctor`).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct ComputeEndpoints {
    /// The apiserver URL workers report to.
    apiserver: Option<String>,
    /// The notifier URL deployers and workers subscribe to.
    notifier: Option<String>,
    /// The MQTT brokers (`mqtts://host:port` or `mqtt://host:port`).
    brokers: Vec<String>,
    /// The metaserver of the `p2p` backend.
    metaserver: Option<String>,
}

/// The endpoints a compute's workers will be told to connect to (compute API key).
#[utoipa::path(get, path = "/computes/{computeId}/endpoints", tag = "computes",
    params(("computeId" = String, Path)),
    responses((status = 200, body = ComputeEndpoints), (status = 401, body = fledge_types::ApiError)))]
async fn compute_endpoints(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(compute): Path<String>,
) -> Result<Json<ComputeEndpoints>> {
    state.compute(&headers, &ComputeId::new(compute)).await?;
    Ok(Json(ComputeEndpoints {
        apiserver: state.env.apiserver.clone(),
        notifier: state.notifier_url.clone(),
        brokers: state.env.brokers.iter().map(|b| b.host.clone()).collect(),
        metaserver: state.env.metaserver.clone(),
    }))
}

/// What a deployer did with a task's worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(super) enum DeploymentState {
    /// The worker exists.
    Deployed,
    /// The worker could not be created; the task fails with the message as its log.
    Failed,
    /// The worker was removed.
    Revoked,
}

/// A deployer's report about one task's worker.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct DeploymentReport {
    /// The task's job.
    job_id: JobId,
    /// What happened.
    state: DeploymentState,
    /// Details (the failure's cause).
    #[serde(default)]
    message: String,
    /// The worker's attempt (the task's restart count when it was deployed); a report about
    /// an earlier attempt than the task's current one is stale and ignored.
    #[serde(default)]
    attempt: u32,
}

/// A deployer's claim of the key of one attempt of a task.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct KeyClaim {
    /// The task's job.
    job_id: JobId,
    /// The attempt the worker is deployed for (the `attempt` of its deploy event).
    attempt: u32,
}

/// The key of a task's attempt, handed out once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct ClaimedKey {
    /// The task.
    task_id: TaskId,
    /// The attempt the key was claimed for.
    attempt: u32,
    /// The task key the worker authenticates with (`FLEDGE_TASK_KEY`).
    key: String,
}

impl ApiState {
    pub(super) fn connected(&self, mut compute: Compute) -> Compute {
        compute.connected =
            self.notifier.as_ref().is_some_and(|n| n.is_compute_connected(&compute.compute_id));
        compute
    }
}

/// Registers a compute (admin only); its API key is stored hashed.
#[utoipa::path(post, path = "/computes", tag = "computes", request_body = ComputeSpec,
    responses((status = 201, body = Compute), (status = 400, body = fledge_types::ApiError)))]
async fn create_compute(
    State(state): State<ApiState>,
    headers: HeaderMap,
    request: Body,
) -> Result<(StatusCode, Json<Compute>)> {
    state.admin(&headers).await?;
    let spec: ComputeSpec = body::json(request, state.limits.json_bytes, "compute").await?;
    let mut details = Vec::new();
    check_id("computeId", spec.compute_id.as_str(), &mut details);
    if spec.region.trim().is_empty() || spec.region.split('/').any(str::is_empty) {
        details.push(ErrorDetail {
            path: "region".to_owned(),
            message: "must be a realm prefix such as default/eu".to_owned(),
        });
    }
    if spec.api_key.len() < 16 {
        details.push(ErrorDetail {
            path: "apiKey".to_owned(),
            message: "must be at least 16 characters".to_owned(),
        });
    }
    if !details.is_empty() {
        return Err(Error::invalid("invalid compute", details));
    }
    let compute = state.store.create_compute(&spec).await?;
    Ok((StatusCode::CREATED, Json(state.connected(compute))))
}

/// Lists computes (admin only).
#[utoipa::path(get, path = "/computes", tag = "computes", responses((status = 200, body = [Compute])))]
async fn list_computes(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<Vec<Compute>>> {
    state.admin(&headers).await?;
    let computes = state.store.list_computes().await?;
    Ok(Json(computes.into_iter().map(|c| state.connected(c)).collect()))
}

/// Gets a compute (admin only).
#[utoipa::path(get, path = "/computes/{computeId}", tag = "computes",
    params(("computeId" = String, Path)),
    responses((status = 200, body = Compute), (status = 404, body = fledge_types::ApiError)))]
async fn get_compute(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Compute>> {
    state.admin(&headers).await?;
    let compute = state.store.get_compute(&ComputeId::new(id)).await?;
    Ok(Json(state.connected(compute)))
}

/// Deletes a compute (admin only); 409 while a non-final job has tasks on it.
#[utoipa::path(delete, path = "/computes/{computeId}", tag = "computes",
    params(("computeId" = String, Path)),
    responses((status = 204), (status = 409, body = fledge_types::ApiError)))]
async fn delete_compute(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    state.admin(&headers).await?;
    state.store.delete_compute(&ComputeId::new(id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A deployer reports a task's worker (compute API key); `failed` fails the task.
#[utoipa::path(put, path = "/computes/{computeId}/tasks/{taskId}/deployment", tag = "computes",
    request_body = DeploymentReport,
    params(("computeId" = String, Path), ("taskId" = String, Path)),
    responses((status = 204), (status = 401, body = fledge_types::ApiError),
        (status = 404, body = fledge_types::ApiError)))]
async fn report_deployment(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((compute, task)): Path<(String, String)>,
    request: Body,
) -> Result<StatusCode> {
    let compute = ComputeId::new(compute);
    state.compute(&headers, &compute).await?;
    let report: DeploymentReport =
        body::json(request, state.limits.json_bytes, "deployment report").await?;
    let task_id = TaskId::new(task);
    let task = state.store.get_task(&report.job_id, &task_id).await?;
    if task.compute_id != compute {
        return Err(Error::not_found(format!(
            "task {task_id} of job {} is not on compute {compute}",
            report.job_id
        )));
    }
    tracing::info!(job_id = %report.job_id, task_id = %task_id, compute_id = %compute,
        state = ?report.state, message = %report.message, "deployment report");
    if report.attempt < task.restarts {
        tracing::info!(job_id = %report.job_id, task_id = %task_id, attempt = report.attempt,
            restarts = task.restarts, "stale deployment report of an earlier attempt ignored");
        return Ok(StatusCode::NO_CONTENT);
    }
    if report.state == DeploymentState::Failed && !task.state.is_final() {
        let log = format!("deployment failed: {}", report.message);
        match state
            .store
            .set_task_state(&report.job_id, &task_id, TaskState::Failed, Some(&log))
            .await
        {
            // The task ended meanwhile: its own report wins.
            Ok(_) | Err(store::Error::Conflict { .. }) => {}
            Err(err) => return Err(err.into()),
        }
    }
    state.controller.job_changed(report.job_id);
    Ok(StatusCode::NO_CONTENT)
}

/// A deployer claims the key of a task's attempt (compute API key), once: deploy events carry
/// no key, since a compute's stream is replayed to whoever subscribes with its key. Answered
/// only for a platform-run task on this compute whose job has not ended, for the task's current
/// attempt, and the first time that attempt is claimed (409 after, whoever claimed it).
#[utoipa::path(post, path = "/computes/{computeId}/tasks/{taskId}/key", tag = "computes",
    request_body = KeyClaim,
    params(("computeId" = String, Path), ("taskId" = String, Path)),
    responses((status = 200, body = ClaimedKey), (status = 401, body = fledge_types::ApiError),
        (status = 404, body = fledge_types::ApiError),
        (status = 409, body = fledge_types::ApiError)))]
async fn claim_task_key(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((compute, task)): Path<(String, String)>,
    request: Body,
) -> Result<Json<ClaimedKey>> {
    let compute = ComputeId::new(compute);
    state.compute(&headers, &compute).await?;
    let claim: KeyClaim = body::json(request, state.limits.json_bytes, "key claim").await?;
    let task_id = TaskId::new(task);
    let not_here = || {
        Error::not_found(format!(
            "task {task_id} of job {} is not on compute {compute}",
            claim.job_id
        ))
    };
    let task = match state.store.get_task(&claim.job_id, &task_id).await {
        Ok(task) => task,
        Err(store::Error::NotFound { .. }) => return Err(not_here()),
        Err(err) => return Err(err.into()),
    };
    if task.compute_id != compute {
        return Err(not_here());
    }
    state.store.claim_task_key(&claim.job_id, &task_id, claim.attempt).await?;
    tracing::info!(job_id = %claim.job_id, task_id = %task_id, compute_id = %compute,
        attempt = claim.attempt, "task key claimed");
    let key = state.data_plane_keys.key(&task_id);
    Ok(Json(ClaimedKey { task_id, attempt: claim.attempt, key }))
}
