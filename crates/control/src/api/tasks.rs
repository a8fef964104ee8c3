//! The agent's routes, authenticated with the task key: the task itself (the agent's first
//! call, which pins a participant-run task's key), config, code, status, heartbeat, metrics.

use std::io::{Cursor, Read as _, Write as _};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use fledge_types::{ErrorCode, ErrorDetail, MetricRecord, Task, TaskConfig, TaskId, TaskState};

use super::error::{Error, Result};
use super::rate::Refused;
use super::{ApiState, body};
use crate::store;

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(task_join))
        .routes(routes!(task_config))
        .routes(routes!(task_code))
        .routes(routes!(task_status))
        .routes(routes!(heartbeat))
        .routes(routes!(task_metrics))
        .routes(routes!(task_log))
}

/// Lines of a task's output, as its agent streams them (`POST /tasks/{taskId}/log`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct LogLines {
    /// Chosen by the agent for each of its runs (1 to 64 characters).
    stream: String,
    /// The number of the first line in this stream (0 for its first line).
    offset: u64,
    /// The lines, without their newlines.
    lines: Vec<String>,
}

/// The task streams lines of its output; `fledgectl logs -f` reads them.
#[utoipa::path(post, path = "/tasks/{taskId}/log", tag = "tasks", request_body = LogLines,
    params(("taskId" = String, Path)),
    responses((status = 204), (status = 400, body = fledge_types::ApiError),
        (status = 401, body = fledge_types::ApiError)))]
async fn task_log(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(task): Path<String>,
    request: Body,
) -> Result<StatusCode> {
    use super::logbook::MAX_LINES_PER_POST;
    let task = state.task(&headers, &TaskId::new(task)).await?;
    let posted: LogLines = body::json(request, state.limits.json_bytes, "log lines").await?;
    let mut details = Vec::new();
    if posted.stream.is_empty() || posted.stream.len() > 64 {
        details.push(ErrorDetail {
            path: "stream".to_owned(),
            message: format!("{} characters; must be 1 to 64", posted.stream.len()),
        });
    }
    if posted.lines.len() > MAX_LINES_PER_POST {
        details.push(ErrorDetail {
            path: "lines".to_owned(),
            message: format!("{} lines; at most {MAX_LINES_PER_POST} per post", posted.lines.len()),
        });
    }
    if posted.offset.checked_add(posted.lines.len() as u64).is_none_or(|end| end > 1 << 53) {
        details.push(ErrorDetail { path: "offset".to_owned(), message: "too large".to_owned() });
    }
    if !details.is_empty() {
        return Err(Error::invalid("invalid log lines", details));
    }
    state.logs.append(&task.job_id, &task.task_id, &posted.stream, posted.offset, posted.lines);
    Ok(StatusCode::NO_CONTENT)
}

/// A task's state report.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub(super) struct TaskStatusReport {
    /// `running`, `completed`, `failed` or `terminated`.
    state: TaskState,
    /// The tail of the task's log.
    #[serde(default)]
    log: Option<String>,
}

/// Largest log tail kept per task, in bytes.
const LOG_TAIL_BYTES: usize = 64 * 1024;

fn internal(err: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::Internal, err.to_string())
}

/// What an agent learns when it joins: its task and where to subscribe to its events.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct TaskJoin {
    /// The task (its job, role, state, and whether the platform manages it).
    task: Task,
    /// The notifier's URL, if this apiserver knows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    notifier: Option<String>,
}

/// The task this key belongs to. An agent calls it first: a participant-run task's first key
/// is pinned here, and a wrong key is refused before the agent waits for anything.
#[utoipa::path(get, path = "/tasks/{taskId}", tag = "tasks",
    params(("taskId" = String, Path)),
    responses((status = 200, body = TaskJoin), (status = 401, body = fledge_types::ApiError)))]
async fn task_join(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(task): Path<String>,
) -> Result<Json<TaskJoin>> {
    let task = state.task(&headers, &TaskId::new(task)).await?;
    Ok(Json(TaskJoin { task, notifier: state.notifier_url.clone() }))
}

/// The task's config: everything its worker needs to run.
#[utoipa::path(get, path = "/tasks/{taskId}/config", tag = "tasks",
    params(("taskId" = String, Path)),
    responses((status = 200, body = TaskConfig), (status = 401, body = fledge_types::ApiError)))]
async fn task_config(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(task): Path<String>,
) -> Result<Json<TaskConfig>> {
    let task = state.task(&headers, &TaskId::new(task)).await?;
    let job = state.store.get_job(None, &task.job_id).await?;
    let (_, schema) = state
        .store
        .get_schema(Some(&job.owner), &job.spec.design_id, Some(&job.schema_version))
        .await?;
    let dataset = match &task.dataset_id {
        Some(id) => match state.store.get_dataset(None, id).await {
            Ok(dataset) => Some(dataset),
            Err(store::Error::NotFound { .. }) => {
                return Err(Error::conflict(format!(
                    "dataset {id} of task {} was deleted",
                    task.task_id
                )));
            }
            Err(err) => return Err(err.into()),
        },
        None => None,
    };
    let mut config =
        fledge_types::task_config::build(&job, &schema, &task, dataset.as_ref(), &state.env);
    // The role's own connections to the control plane (metrics, the metaserver) trust this CA.
    config.control_plane_ca = state.ca.as_ref().map(|ca| ca.pem().to_owned());
    if let Some(creds) = &state.broker_credentials {
        creds.fill(&mut config);
    }
    if let Some(mosquitto) = &state.mosquitto {
        mosquitto.ensure_task(&task).await.map_err(|err| {
            tracing::error!(task = %task.task_id, %err, "cannot provision the task's broker login");
            Error::new(
                fledge_types::ErrorCode::Unavailable,
                format!("cannot provision task {}'s broker login yet: {err}", task.task_id),
            )
        })?;
    }
    let tasks = state.store.list_tasks(&job.id).await?;
    config.data_plane = Some(state.data_plane_keys.data_plane(&schema, &task, &tasks));
    config.registry_token = registry_token(&state, &job, &task, &config).await?;
    Ok(Json(config))
}

/// The MLflow token a task's config carries: the operator's, when the task's registry is an
/// MLflow server the token belongs to and the task runs one of Fledge's built-in roles (its
/// role folder's `fledge-role.toml` names `builtin`), so user code never receives it.
async fn registry_token(
    state: &ApiState,
    job: &fledge_types::Job,
    task: &Task,
    config: &TaskConfig,
) -> Result<Option<fledge_types::RegistryToken>> {
    if config.registry.sort != fledge_types::MLFLOW_REGISTRY {
        return Ok(None);
    }
    let Some(token) = state.mlflow.token_for(&config.registry.uri) else {
        return Ok(None);
    };
    let (_, bundle) = state
        .store
        .get_code(Some(&job.owner), &job.spec.design_id, Some(&job.code_version))
        .await?;
    let role = task.role.clone();
    let max_inflated = state.limits.code_inflated_bytes;
    let builtin = tokio::task::spawn_blocking(move || runs_builtin(&bundle, &role, max_inflated))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    Ok(builtin.then(|| fledge_types::RegistryToken(token.to_owned())))
}

/// Whether `role`'s folder of `bundle` runs a built-in role: every entry that the worker
/// would unpack as its `fledge-role.toml` is a manifest naming `builtin` and no `command`
/// (a bundle without one runs user code). Reads at most `max_inflated` bytes of a manifest.
pub(super) fn runs_builtin(
    bundle: &[u8],
    role: &str,
    max_inflated: u64,
) -> std::result::Result<bool, String> {
    use std::path::{Component, Path as FsPath};
    let mut archive =
        zip::ZipArchive::new(Cursor::new(bundle)).map_err(|e| format!("bad stored zip: {e}"))?;
    let names: Vec<String> = archive.file_names().map(str::to_owned).collect();
    let Some(prefix) = role_prefix(&names, role) else {
        return Ok(false);
    };
    let mut manifests = 0;
    for i in 0..archive.len() {
        let entry = archive.by_index(i).map_err(|e| format!("bad stored zip entry {i}: {e}"))?;
        let Some(rest) = entry.name().strip_prefix(&prefix) else { continue };
        let parts: Vec<Component<'_>> =
            FsPath::new(rest).components().filter(|c| !matches!(c, Component::CurDir)).collect();
        // A name that differs in case only is the manifest on some file systems: it must be a
        // built-in one too, but only the exact name counts as one.
        let Some(name) = (match parts.as_slice() {
            [Component::Normal(name)] => name.to_str(),
            _ => None,
        }) else {
            continue;
        };
        if !name.eq_ignore_ascii_case("fledge-role.toml") {
            continue;
        }
        let exact = name == "fledge-role.toml";
        if entry.is_dir() || entry.is_symlink() {
            return Ok(false);
        }
        let mut text = String::new();
        if (entry.take(max_inflated.min(64 << 10) + 1)).read_to_string(&mut text).is_err()
            || text.len() as u64 > max_inflated.min(64 << 10)
        {
            return Ok(false);
        }
        let Ok(table) = text.parse::<toml::Table>() else { return Ok(false) };
        let builtin = table.get("builtin").is_some_and(toml::Value::is_str);
        if !builtin || table.keys().any(|k| k != "builtin") {
            return Ok(false);
        }
        manifests += usize::from(exact);
    }
    Ok(manifests > 0)
}

/// The folder of `bundle` holding `role`'s code: `<role>/` at the top, or `<top>/<role>/` when
/// every entry sits under one top folder (e.g. `code/<role>/`).
fn role_prefix(names: &[String], role: &str) -> Option<String> {
    let direct = format!("{role}/");
    if names.iter().any(|n| n.starts_with(&direct)) {
        return Some(direct);
    }
    let top = names.first()?.split('/').next()?.to_owned();
    if names.iter().all(|n| n.starts_with(&format!("{top}/"))) {
        let nested = format!("{top}/{role}/");
        if names.iter().any(|n| n.starts_with(&nested)) {
            return Some(nested);
        }
    }
    None
}

/// Re-zips `role`'s folder of `bundle`, rooted at that folder; `None` when it has none. Never
/// inflates more than `max_inflated` bytes in all, whatever the archive declares (bundles are
/// checked at upload; this holds for any stored before that check or tampered with since).
pub(super) fn role_zip(
    bundle: &[u8],
    role: &str,
    max_inflated: u64,
) -> std::result::Result<Option<Vec<u8>>, String> {
    let mut archive =
        zip::ZipArchive::new(Cursor::new(bundle)).map_err(|e| format!("bad stored zip: {e}"))?;
    let names: Vec<String> = archive.file_names().map(str::to_owned).collect();
    let Some(prefix) = role_prefix(&names, role) else {
        return Ok(None);
    };
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let mut inflated: u64 = 0;
    for i in 0..archive.len() {
        let mut entry =
            archive.by_index(i).map_err(|e| format!("bad stored zip entry {i}: {e}"))?;
        let Some(rest) = entry.name().strip_prefix(&prefix).map(str::to_owned) else {
            continue;
        };
        if rest.is_empty() || entry.enclosed_name().is_none() {
            continue;
        }
        let mut options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        if let Some(mode) = entry.unix_mode() {
            options = options.unix_permissions(mode);
        }
        if entry.is_dir() {
            out.add_directory(rest, options).map_err(|e| format!("cannot write zip: {e}"))?;
            continue;
        }
        // Declared sizes are never used to allocate: they can lie.
        let budget = max_inflated - inflated;
        let mut bytes = Vec::new();
        (&mut entry)
            .take(budget + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read stored zip entry {rest}: {e}"))?;
        if bytes.len() as u64 > budget {
            return Err(format!(
                "the stored code bundle inflates to more than {max_inflated} bytes"
            ));
        }
        inflated += bytes.len() as u64;
        out.start_file(rest, options).map_err(|e| format!("cannot write zip: {e}"))?;
        out.write_all(&bytes).map_err(|e| format!("cannot write zip: {e}"))?;
    }
    let cursor = out.finish().map_err(|e| format!("cannot finish zip: {e}"))?;
    Ok(Some(cursor.into_inner()))
}

/// The task's role folder of the job's code bundle, as a zip rooted at that folder.
#[utoipa::path(get, path = "/tasks/{taskId}/code", tag = "tasks",
    params(("taskId" = String, Path)),
    responses((status = 200, content_type = "application/zip", body = Vec<u8>),
        (status = 401, body = fledge_types::ApiError), (status = 404, body = fledge_types::ApiError)))]
async fn task_code(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(task): Path<String>,
) -> Result<Response> {
    let task = state.task(&headers, &TaskId::new(task)).await?;
    let job = state.store.get_job(None, &task.job_id).await?;
    let (meta, bundle) = state
        .store
        .get_code(Some(&job.owner), &job.spec.design_id, Some(&job.code_version))
        .await?;
    let role = task.role.clone();
    let max_inflated = state.limits.code_inflated_bytes;
    let zipped = tokio::task::spawn_blocking(move || role_zip(&bundle, &role, max_inflated))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let Some(zipped) = zipped else {
        return Err(Error::not_found(format!(
            "code revision {} of design {} has no folder for role {}",
            meta.version, job.spec.design_id, task.role
        )));
    };
    Ok(([(CONTENT_TYPE, "application/zip")], zipped).into_response())
}

/// The task reports its state and log tail.
#[utoipa::path(put, path = "/tasks/{taskId}/status", tag = "tasks", request_body = TaskStatusReport,
    params(("taskId" = String, Path)),
    responses((status = 204), (status = 409, body = fledge_types::ApiError)))]
async fn task_status(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(task): Path<String>,
    request: Body,
) -> Result<StatusCode> {
    let task = state.task(&headers, &TaskId::new(task)).await?;
    let report: TaskStatusReport =
        body::json(request, state.limits.json_bytes, "status report").await?;
    if report.state == TaskState::Ready {
        return Err(Error::invalid(
            "invalid status report",
            vec![ErrorDetail {
                path: "state".to_owned(),
                message:
                    "a task cannot report \"ready\"; use running, completed, failed or terminated"
                        .to_owned(),
            }],
        ));
    }
    let log = report.log.map(|log| tail(log, LOG_TAIL_BYTES));
    match state
        .store
        .set_task_state(&task.job_id, &task.task_id, report.state, log.as_deref())
        .await
    {
        Ok(_) => {}
        Err(store::Error::Conflict { actual, .. }) => {
            return Err(Error::conflict(format!(
                "task {} is {actual} and cannot become {}",
                task.task_id, report.state
            )));
        }
        Err(err) => return Err(err.into()),
    }
    state.controller.job_changed(task.job_id);
    Ok(StatusCode::NO_CONTENT)
}

/// The last `max` bytes of `log`, cut at a character boundary.
fn tail(log: String, max: usize) -> String {
    if log.len() <= max {
        return log;
    }
    let mut start = log.len() - max;
    while !log.is_char_boundary(start) {
        start += 1;
    }
    log[start..].to_owned()
}

/// The task's agent is alive.
#[utoipa::path(post, path = "/tasks/{taskId}/heartbeat", tag = "tasks",
    params(("taskId" = String, Path)),
    responses((status = 204), (status = 401, body = fledge_types::ApiError)))]
async fn heartbeat(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(task): Path<String>,
) -> Result<StatusCode> {
    let task = state.task(&headers, &TaskId::new(task)).await?;
    state.store.record_heartbeat(&task.task_id).await?;
    if !task.managed && task.state == TaskState::Ready {
        // A data owner's agent is up: the job may be waiting for it to start.
        state.controller.job_changed(task.job_id);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The task reports per-round metrics. Bounded per task: records per request and stored in
/// all (413), and records per minute (429, with `Retry-After`); each refusal names its setting.
#[utoipa::path(post, path = "/tasks/{taskId}/metrics", tag = "tasks", request_body = [MetricRecord],
    params(("taskId" = String, Path)),
    responses((status = 204), (status = 400, body = fledge_types::ApiError),
        (status = 401, body = fledge_types::ApiError),
        (status = 413, body = fledge_types::ApiError),
        (status = 429, body = fledge_types::ApiError)))]
async fn task_metrics(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(task): Path<String>,
    request: Body,
) -> Result<Response> {
    let task = state.task(&headers, &TaskId::new(task)).await?;
    let records: Vec<MetricRecord> =
        body::json(request, state.limits.json_bytes, "metric records").await?;
    let limits = &state.limits;
    let too_many = |message: String| Error::new(ErrorCode::PayloadTooLarge, message);
    if records.len() > limits.metric_records_per_request {
        return Err(too_many(format!(
            "{} metric records in one request; at most {} may be sent at once \
             (setting limits.metric_records_per_request)",
            records.len(),
            limits.metric_records_per_request
        )));
    }
    let mut details = Vec::new();
    for (i, record) in records.iter().enumerate() {
        if record.task_id != task.task_id {
            details.push(ErrorDetail {
                path: format!("[{i}].taskId"),
                message: format!("must be this task's id {}", task.task_id),
            });
        }
        if record.role != task.role {
            details.push(ErrorDetail {
                path: format!("[{i}].role"),
                message: format!("must be this task's role {}", task.role),
            });
        }
        if record.metrics.len() > limits.metrics_per_record {
            details.push(ErrorDetail {
                path: format!("[{i}].metrics"),
                message: format!(
                    "{} metrics; at most {} per record (setting limits.metrics_per_record)",
                    record.metrics.len(),
                    limits.metrics_per_record
                ),
            });
        }
        for (name, value) in &record.metrics {
            if name.is_empty() || name.len() > 128 {
                details.push(ErrorDetail {
                    path: format!("[{i}].metrics"),
                    message: format!("metric name of {} bytes; must be 1 to 128", name.len()),
                });
            }
            if !value.is_finite() {
                details.push(ErrorDetail {
                    path: format!("[{i}].metrics.{name}"),
                    message: "must be a finite number".to_owned(),
                });
            }
        }
    }
    if !details.is_empty() {
        return Err(Error::invalid("invalid metric records", details));
    }
    let per_minute = limits.metric_records_per_minute;
    match state.metric_rate.take(&task.task_id, records.len() as u64, per_minute, Instant::now()) {
        Ok(()) => {}
        Err(Refused::TooMany) => {
            return Err(too_many(format!(
                "{} metric records in one request; a task may post at most {per_minute} a \
                 minute (setting limits.metric_records_per_minute)",
                records.len()
            )));
        }
        Err(Refused::Wait(wait)) => {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let err = Error::new(
                ErrorCode::TooManyRequests,
                format!(
                    "task {} posts metric records faster than {per_minute} a minute (setting \
                     limits.metric_records_per_minute); retry these {} in {secs} s",
                    task.task_id,
                    records.len()
                ),
            );
            return Ok((StatusCode::TOO_MANY_REQUESTS, [(RETRY_AFTER, secs.to_string())], err)
                .into_response());
        }
    }
    let stored =
        match state.store.add_metrics(&task.job_id, &records, limits.metric_records_per_task).await
        {
            Ok(stored) => stored,
            Err(err @ store::Error::MetricLimit { .. }) => {
                return Err(too_many(format!("{err} (setting limits.metric_records_per_task)")));
            }
            Err(err) => return Err(err.into()),
        };
    let new: Vec<fledge_types::MetricRecord> =
        stored.into_iter().filter_map(|i| records.get(i).cloned()).collect();
    state.reported.observe(&new);
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(files: &[&str]) -> Vec<u8> {
        let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for name in files {
            out.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
            out.write_all(name.as_bytes()).unwrap();
        }
        out.finish().unwrap().into_inner()
    }

    fn names(zip: &[u8]) -> Vec<String> {
        let archive = zip::ZipArchive::new(Cursor::new(zip)).unwrap();
        archive.file_names().map(str::to_owned).collect::<Vec<_>>()
    }

    #[test]
    fn a_stored_bundle_is_never_inflated_beyond_the_bound() {
        let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let deflated = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        out.start_file("trainer/a.bin", deflated).unwrap();
        out.write_all(&[0u8; 600 << 10]).unwrap();
        out.start_file("trainer/b.bin", deflated).unwrap();
        out.write_all(&[0u8; 600 << 10]).unwrap();
        let bomb = out.finish().unwrap().into_inner();
        let err = role_zip(&bomb, "trainer", 1 << 20).unwrap_err();
        assert!(err.contains("more than 1048576 bytes"), "{err}");
        assert_eq!(names(&role_zip(&bomb, "trainer", 2 << 20).unwrap().unwrap()).len(), 2);
    }

    #[test]
    fn role_folder_is_rezipped_at_its_root() {
        let flat = bundle(&["trainer/main.py", "trainer/lib/x.py", "aggregator/main.py"]);
        let mut got = names(&role_zip(&flat, "trainer", 1 << 20).unwrap().unwrap());
        got.sort();
        assert_eq!(got, ["lib/x.py", "main.py"]);
        let nested = bundle(&["code/trainer/main.py", "code/aggregator/main.py"]);
        assert_eq!(names(&role_zip(&nested, "aggregator", 1 << 20).unwrap().unwrap()), ["main.py"]);
        assert_eq!(role_zip(&flat, "coordinator", 1 << 20).unwrap(), None);
        assert!(role_zip(b"not a zip", "trainer", 1 << 20).is_err());
    }

    fn bundle_of(files: &[(&str, &str)]) -> Vec<u8> {
        let mut out = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, text) in files {
            out.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
            out.write_all(text.as_bytes()).unwrap();
        }
        out.finish().unwrap().into_inner()
    }

    #[test]
    fn only_a_builtin_manifest_makes_a_role_builtin() {
        let builtin = "# Fledge's aggregator\nbuiltin = \"top-aggregator\"\n";
        let yes =
            bundle_of(&[("aggregator/fledge-role.toml", builtin), ("trainer/main.py", "print()")]);
        assert!(runs_builtin(&yes, "aggregator", 1 << 20).unwrap());
        assert!(!runs_builtin(&yes, "trainer", 1 << 20).unwrap(), "main.py is user code");
        assert!(!runs_builtin(&yes, "coordinator", 1 << 20).unwrap(), "no folder");
        let nested = bundle_of(&[("code/aggregator/./fledge-role.toml", builtin)]);
        assert!(runs_builtin(&nested, "aggregator", 1 << 20).unwrap());
        for (what, files) in [
            (
                "a command",
                vec![("aggregator/fledge-role.toml", "command = [\"python3\", \"x.py\"]")],
            ),
            ("both", vec![("aggregator/fledge-role.toml", "builtin = \"a\"\ncommand = [\"sh\"]")]),
            ("not TOML", vec![("aggregator/fledge-role.toml", "builtin = ")]),
            ("not a string", vec![("aggregator/fledge-role.toml", "builtin = 1")]),
            (
                // The zip crate refuses the same name twice; this one unpacks to the same file.
                "a second, user-code manifest",
                vec![
                    ("aggregator/fledge-role.toml", builtin),
                    ("aggregator/./fledge-role.toml", "command = [\"sh\"]"),
                ],
            ),
            (
                "a case variant only",
                vec![("aggregator/FLEDGE-ROLE.toml", builtin), ("aggregator/main.py", "")],
            ),
            (
                "a case variant of user code",
                vec![
                    ("aggregator/fledge-role.toml", builtin),
                    ("aggregator/Fledge-Role.toml", "command = [\"sh\"]"),
                ],
            ),
            ("main.py", vec![("aggregator/main.py", "")]),
        ] {
            let zip = bundle_of(&files);
            assert!(!runs_builtin(&zip, "aggregator", 1 << 20).unwrap(), "{what}");
        }
        let big = format!("builtin = \"a\"\n#{}", "x".repeat(100 << 10));
        assert!(
            !runs_builtin(
                &bundle_of(&[("aggregator/fledge-role.toml", &big)]),
                "aggregator",
                1 << 20
            )
            .unwrap()
        );
    }

    #[test]
    fn log_tail_keeps_the_end_on_a_char_boundary() {
        assert_eq!(tail("abcdef".into(), 3), "def");
        assert_eq!(tail("aé".into(), 2), "é");
        assert_eq!(tail("ab".into(), 3), "ab");
    }
}
