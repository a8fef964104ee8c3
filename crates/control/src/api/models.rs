//! Trained models: the model files a job's aggregators saved in the platform's registry, listed
//! and downloaded by the job's owner.
//!
//! The platform's registry is the deployment's default (`<data_dir>/registry` for `fledge
//! standalone`), where every job that names no registry of its own keeps its models (see
//! `fledge-sdk`'s `registry` module for the layout). A job whose model spec names an MLflow
//! tracking server has its models listed from its task runs' artifacts and streamed through
//! MLflow's artifact proxy under the apiserver's credentials ([`crate::mlflow`]), bounded in
//! time and size; an `s3` job's are read from its bucket when the apiserver has S3
//! credentials ([`crate::s3`]). A job whose model spec names another registry keeps its models
//! there, and these routes say so.

use std::path::{Path as FsPath, PathBuf};

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use fledge_types::{ErrorCode, Job, JobId, ModelFile};

use super::error::{Error, Result};
use super::{ApiState, check_user};

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(list_models)).routes(routes!(get_model))
}

/// Most model files listed for one job (a round checkpoint per round per group).
const MAX_LISTED: usize = 100_000;

/// Where the apiserver reads a job's models.
enum Source {
    /// The job's directory in the platform's registry.
    Local(PathBuf),
    /// The job's runs in the MLflow tracking server at `uri`.
    Mlflow { uri: String },
    /// The job's directory in the S3 bucket `uri` names.
    S3 { uri: String },
}

/// Where `job`'s models are, or why the apiserver does not serve them.
fn source(state: &ApiState, job: &Job) -> Result<Source> {
    let registry = &job.spec.model_spec.registry;
    if registry.is_named() && registry.sort == fledge_types::MLFLOW_REGISTRY {
        return Ok(Source::Mlflow { uri: registry.uri.clone() });
    }
    if registry.is_named()
        && registry.sort == fledge_types::S3_REGISTRY
        && crate::s3::has_credentials()
    {
        return Ok(Source::S3 { uri: registry.uri.clone() });
    }
    Ok(Source::Local(job_dir(state, job)?))
}

/// How long listing a job's models in MLflow may take in all.
const MLFLOW_LIST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The apiserver's client of the MLflow server at `uri`.
fn mlflow_server(state: &ApiState, uri: &str) -> Result<crate::mlflow::Server> {
    crate::mlflow::Server::new(uri, state.mlflow.token_for(uri), crate::mlflow::API_TIMEOUT)
        .map_err(|reason| mlflow_error(uri, None, reason))
}

/// An MLflow failure as an API error naming the server.
fn mlflow_error(uri: &str, status: Option<u16>, reason: String) -> Error {
    let code = match status {
        Some(413) => ErrorCode::PayloadTooLarge,
        _ => ErrorCode::Unavailable,
    };
    tracing::warn!(uri, %reason, "the MLflow registry did not serve a job's models");
    Error::new(code, format!("the MLflow registry at {uri}: {reason}"))
}

/// An S3 failure as an API error naming the bucket.
fn s3_error(uri: &str, fault: crate::s3::Fault) -> Error {
    let code = match fault {
        crate::s3::Fault::TooLarge(_) => ErrorCode::PayloadTooLarge,
        _ => ErrorCode::Unavailable,
    };
    tracing::warn!(uri, %fault, "the s3 registry did not serve a job's models");
    Error::new(code, format!("the s3 registry {uri}: {fault}"))
}

/// The model file a key relative to a job's directory names: `(group, round)`.
fn model_of_key(rel: &str) -> Option<(Option<String>, Option<u64>)> {
    let file = |rest: &[&str]| match rest {
        ["final.safetensors"] => Some(None),
        ["rounds", file] => round_of(file).map(Some),
        _ => None,
    };
    let parts: Vec<&str> = rel.split('/').collect();
    if let Some(round) = file(&parts) {
        return Some((None, round));
    }
    match parts.as_slice() {
        [scope, rest @ ..] if is_scope(scope) => file(rest).map(|r| (Some((*scope).to_owned()), r)),
        _ => None,
    }
}

/// The directory of `job`'s models in the platform's registry, or why the apiserver does not
/// serve them.
fn job_dir(state: &ApiState, job: &Job) -> Result<PathBuf> {
    let registry = &job.spec.model_spec.registry;
    if registry.is_named() {
        return Err(Error::not_found(format!(
            "job {} keeps its models in its own registry ({} {}), which the apiserver does not \
             serve (an s3 one only when it has S3 credentials)",
            job.id, registry.sort, registry.uri
        )));
    }
    let platform = &state.env.default_registry;
    if !matches!(platform.sort.as_str(), "" | "local") || platform.uri.is_empty() {
        return Err(Error::not_found(format!(
            "the platform's registry ({} {:?}) is not a directory the apiserver can serve",
            platform.sort, platform.uri
        )));
    }
    let root = platform.uri.strip_prefix("file://").unwrap_or(&platform.uri);
    Ok(FsPath::new(root).join("jobs").join(job.id.as_str()))
}

/// A group scope as the registry writes it: group names joined with `+`, each a safe
/// identifier. Anything else never names a directory.
fn is_scope(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "rounds"
        && name.split('+').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
}

/// The round of a checkpoint file name (`round-00003.safetensors` → 3).
fn round_of(file_name: &str) -> Option<u64> {
    let digits = file_name.strip_prefix("round-")?.strip_suffix(".safetensors")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The model files of one scope's directory (`dir` = job dir or job dir / scope).
fn scan_scope(dir: &FsPath, group: Option<&str>, out: &mut Vec<ModelFile>) -> std::io::Result<()> {
    let file = |round, meta: std::fs::Metadata| ModelFile {
        group: group.map(str::to_owned),
        round,
        size: meta.len(),
    };
    match std::fs::metadata(dir.join("final.safetensors")) {
        Ok(meta) if meta.is_file() => out.push(file(None, meta)),
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let rounds = match std::fs::read_dir(dir.join("rounds")) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    for entry in rounds {
        let entry = entry?;
        let Some(round) = entry.file_name().to_str().and_then(round_of) else { continue };
        let meta = entry.metadata()?;
        if meta.is_file() && out.len() < MAX_LISTED {
            out.push(file(Some(round), meta));
        }
    }
    Ok(())
}

/// Every model file of the job directory `dir`: its own, then each group scope's.
fn scan(dir: &FsPath) -> std::io::Result<Vec<ModelFile>> {
    let mut out = Vec::new();
    scan_scope(dir, None, &mut out)?;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(err) => return Err(err),
    };
    for entry in entries {
        let entry = entry?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        if is_scope(&name) && entry.file_type()?.is_dir() {
            scan_scope(&entry.path(), Some(&name), &mut out)?;
        }
    }
    out.sort_by(|a, b| {
        (&a.group, a.round.is_none(), a.round).cmp(&(&b.group, b.round.is_none(), b.round))
    });
    Ok(out)
}

fn io_error(err: std::io::Error) -> Error {
    tracing::error!(error = %err, "cannot read the registry");
    Error::new(ErrorCode::Internal, "cannot read the registry")
}

/// The model files of a job (final and per round, per group), oldest round first: from the
/// platform's registry, the job's MLflow runs when its registry is an MLflow server, or its
/// S3 bucket when the apiserver has S3 credentials (503 when that cannot be read).
#[utoipa::path(get, path = "/users/{user}/jobs/{jobId}/models", tag = "models",
    params(("user" = String, Path), ("jobId" = String, Path)),
    responses((status = 200, body = [ModelFile]), (status = 404, body = fledge_types::ApiError),
        (status = 503, body = fledge_types::ApiError)))]
async fn list_models(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id)): Path<(String, String)>,
) -> Result<Json<Vec<ModelFile>>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let job = state.store.get_job(Some(&user), &JobId::new(id)).await?;
    Ok(Json(model_files(&state, &job).await?))
}

/// The model files of `job` in the platform's registry (the caller checked ownership).
pub(super) async fn model_files(state: &ApiState, job: &Job) -> Result<Vec<ModelFile>> {
    let dir = match source(state, job)? {
        Source::Local(dir) => dir,
        Source::Mlflow { uri } => {
            let server = mlflow_server(state, &uri)?;
            let listing = server.job_models(job.spec.design_id.as_str(), job.id.as_str());
            return match tokio::time::timeout(MLFLOW_LIST_TIMEOUT, listing).await {
                Ok(Ok(files)) => Ok(files),
                Ok(Err(fault)) => Err(mlflow_error(&uri, fault.status, fault.reason)),
                Err(_) => Err(mlflow_error(
                    &uri,
                    None,
                    format!("no listing within {} s", MLFLOW_LIST_TIMEOUT.as_secs()),
                )),
            };
        }
        Source::S3 { uri } => {
            let objects = crate::s3::JobObjects::new(&uri, job.id.as_str())
                .map_err(|e| s3_error(&uri, crate::s3::Fault::Other(e)))?;
            let listed = match tokio::time::timeout(MLFLOW_LIST_TIMEOUT, objects.list()).await {
                Ok(listed) => listed.map_err(|f| s3_error(&uri, f))?,
                Err(_) => {
                    let reason = format!("no listing within {} s", MLFLOW_LIST_TIMEOUT.as_secs());
                    return Err(s3_error(&uri, crate::s3::Fault::Other(reason)));
                }
            };
            let mut files: Vec<ModelFile> = listed
                .into_iter()
                .filter_map(|(rel, size)| {
                    model_of_key(&rel).map(|(group, round)| ModelFile { group, round, size })
                })
                .collect();
            files.sort_by(|a, b| {
                (&a.group, a.round.is_none(), a.round).cmp(&(&b.group, b.round.is_none(), b.round))
            });
            return Ok(files);
        }
    };
    tokio::task::spawn_blocking(move || scan(&dir))
        .await
        .map_err(|err| Error::new(ErrorCode::Internal, err.to_string()))?
        .map_err(io_error)
}

/// `?round=R&group=G`: which model file (default: the final model of the job's one model).
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub(super) struct ModelQuery {
    /// The round whose checkpoint to get; absent: the final model.
    round: Option<u64>,
    /// The groups whose model to get (as listed); absent: the job's one model.
    group: Option<String>,
}

/// One model file of a job, as safetensors bytes (for an MLflow or S3 job, streamed from the
/// server's artifact proxy or the bucket: 503 when it cannot be read, 413 past the bound).
#[utoipa::path(get, path = "/users/{user}/jobs/{jobId}/model", tag = "models",
    params(("user" = String, Path), ("jobId" = String, Path), ModelQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, body = fledge_types::ApiError), (status = 404, body = fledge_types::ApiError),
        (status = 413, body = fledge_types::ApiError), (status = 503, body = fledge_types::ApiError)))]
async fn get_model(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id)): Path<(String, String)>,
    query: std::result::Result<Query<ModelQuery>, QueryRejection>,
) -> Result<Response> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let Query(query) = query?;
    let job = state.store.get_job(Some(&user), &JobId::new(id)).await?;
    model_file(&state, &job, query.round, query.group.as_deref()).await
}

/// One model file of `job` (final or `round`'s checkpoint, of `group`'s scope or the job's
/// one model) as a download (the caller checked ownership).
pub(super) async fn model_file(
    state: &ApiState,
    job: &Job,
    round: Option<u64>,
    group: Option<&str>,
) -> Result<Response> {
    let source = source(state, job)?;
    if let Some(group) = group
        && !is_scope(group)
    {
        return Err(Error::bad_request(format!(
            "group {group:?} is not a group name (letters, digits, '-', '_', '.', joined by '+')"
        )));
    }
    let what = || {
        let of = group.map(|g| format!(" of group {g}")).unwrap_or_default();
        match round {
            Some(round) => format!("job {} has no model for round {round}{of}", job.id),
            None => format!("job {} has no final model{of} (yet)", job.id),
        }
    };
    let download = match round {
        Some(round) => format!("{}-round-{round}.safetensors", job.id),
        None => format!("{}-final.safetensors", job.id),
    };
    let mut path = match source {
        Source::Local(path) => path,
        Source::Mlflow { uri } => {
            let server = mlflow_server(state, &uri)?;
            let found = server
                .job_model(job.spec.design_id.as_str(), job.id.as_str(), round, group)
                .await
                .map_err(|fault| mlflow_error(&uri, fault.status, fault.reason))?;
            let Some((length, resp)) = found else { return Err(Error::not_found(what())) };
            return Ok(mlflow_download(&download, length, resp));
        }
        Source::S3 { uri } => {
            let objects = crate::s3::JobObjects::new(&uri, job.id.as_str())
                .map_err(|e| s3_error(&uri, crate::s3::Fault::Other(e)))?;
            let mut rel = group.map(|g| format!("{g}/")).unwrap_or_default();
            rel.push_str(&match round {
                Some(round) => format!("rounds/round-{round:05}.safetensors"),
                None => "final.safetensors".to_owned(),
            });
            let (size, stream) = match objects.get(&rel, crate::mlflow::MAX_MODEL_BYTES).await {
                Ok(found) => found,
                Err(crate::s3::Fault::NotFound) => return Err(Error::not_found(what())),
                Err(fault) => return Err(s3_error(&uri, fault)),
            };
            return Ok((
                [
                    (CONTENT_TYPE, "application/octet-stream".to_owned()),
                    (CONTENT_LENGTH, size.to_string()),
                    (CONTENT_DISPOSITION, format!("attachment; filename=\"{download}\"")),
                ],
                Body::from_stream(stream),
            )
                .into_response());
        }
    };
    if let Some(group) = group {
        path.push(group);
    }
    path.push(match round {
        Some(round) => format!("rounds/round-{round:05}.safetensors"),
        None => "final.safetensors".to_owned(),
    });
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::not_found(what()));
        }
        Err(err) => return Err(io_error(err)),
    };
    let size = file.metadata().await.map_err(io_error)?.len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (CONTENT_TYPE, "application/octet-stream".to_owned()),
            (CONTENT_LENGTH, size.to_string()),
            (CONTENT_DISPOSITION, format!("attachment; filename=\"{download}\"")),
        ],
        body,
    )
        .into_response())
}

/// A model file streamed from MLflow's artifact proxy as a download, cut when it runs past
/// [`crate::mlflow::MAX_MODEL_BYTES`].
fn mlflow_download(download: &str, length: Option<u64>, resp: reqwest::Response) -> Response {
    use futures::StreamExt as _;
    let mut seen: u64 = 0;
    let stream = resp.bytes_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        seen += chunk.len() as u64;
        if seen > crate::mlflow::MAX_MODEL_BYTES {
            return Err(std::io::Error::other(format!(
                "the model file runs past {} bytes",
                crate::mlflow::MAX_MODEL_BYTES
            )));
        }
        Ok(chunk)
    });
    let mut headers = vec![
        (CONTENT_TYPE, "application/octet-stream".to_owned()),
        (CONTENT_DISPOSITION, format!("attachment; filename=\"{download}\"")),
    ];
    if let Some(length) = length {
        headers.push((CONTENT_LENGTH, length.to_string()));
    }
    let mut response = Body::from_stream(stream).into_response();
    for (name, value) in headers {
        if let Ok(value) = value.parse() {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_round_names_are_parsed_strictly() {
        for good in ["eu", "eu+us", "region-1", "a_b.c"] {
            assert!(is_scope(good), "{good}");
        }
        for bad in ["", "..", "eu/..", "eu+", "+eu", "a b", "rounds", "eu+..", "é"] {
            assert!(!is_scope(bad), "{bad}");
        }
        assert_eq!(round_of("round-00003.safetensors"), Some(3));
        assert_eq!(round_of("round-123456.safetensors"), Some(123_456));
        for bad in
            ["round-.safetensors", "round-3.tmp", "round--1.safetensors", "final.safetensors"]
        {
            assert_eq!(round_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_job_directory_lists_every_model_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let job = dir.path();
        for rel in [
            "final.safetensors",
            "rounds/round-00002.safetensors",
            "rounds/round-00001.safetensors",
            "rounds/round-00003.tmp",
            "eu/final.safetensors",
            "eu/rounds/round-00001.safetensors",
            "metrics.jsonl",
        ] {
            let path = job.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"abc").unwrap();
        }
        let listed: Vec<(Option<String>, Option<u64>)> =
            scan(job).unwrap().into_iter().map(|f| (f.group, f.round)).collect();
        assert_eq!(
            listed,
            [
                (None, Some(1)),
                (None, Some(2)),
                (None, None),
                (Some("eu".to_owned()), Some(1)),
                (Some("eu".to_owned()), None),
            ]
        );
        assert!(scan(&job.join("missing")).unwrap().is_empty());
    }

    #[test]
    fn object_keys_name_model_files_strictly() {
        assert_eq!(model_of_key("final.safetensors"), Some((None, None)));
        assert_eq!(model_of_key("rounds/round-00002.safetensors"), Some((None, Some(2))));
        assert_eq!(model_of_key("eu+us/final.safetensors"), Some((Some("eu+us".into()), None)));
        assert_eq!(
            model_of_key("eu/rounds/round-00001.safetensors"),
            Some((Some("eu".into()), Some(1)))
        );
        for other in [
            "metrics/t1/1-2.json",
            "resume/t1.safetensors",
            "rounds/round-1.tmp",
            "../final.safetensors",
            "eu/x/final.safetensors",
            "rounds/final.safetensors",
        ] {
            assert_eq!(model_of_key(other), None, "{other}");
        }
    }
}
