//! Designs, their schema revisions and their code bundles.

use std::io::{Cursor, Read as _};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use fledge_types::{Design, DesignId, DesignSpec, Schema};

use super::error::{Error, Result};
use super::users::check_id;
use super::{ApiState, body, check_user};

/// Header carrying the revision of a returned schema or code bundle.
pub(super) const VERSION_HEADER: &str = "x-fledge-version";

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_design, list_designs))
        .routes(routes!(get_design, delete_design))
        .routes(routes!(put_schema))
        .routes(routes!(latest_schema))
        .routes(routes!(get_schema))
        .routes(routes!(put_code))
        .routes(routes!(latest_code))
        .routes(routes!(get_code))
}

/// A stored revision.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct Version {
    /// The revision (`"1"`, `"2"`, ...).
    version: String,
}

/// A stored code bundle.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct CodeInfo {
    /// The revision.
    version: String,
    /// Size in bytes.
    size: u64,
    /// SHA-256 of the zip, hex.
    sha256: String,
}

/// Creates a design.
#[utoipa::path(post, path = "/users/{user}/designs", tag = "designs", request_body = DesignSpec,
    params(("user" = String, Path)),
    responses((status = 201, body = Design), (status = 400, body = fledge_types::ApiError),
        (status = 409, body = fledge_types::ApiError)))]
async fn create_design(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(user): Path<String>,
    request: Body,
) -> Result<(StatusCode, Json<Design>)> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let spec: DesignSpec = body::json(request, state.limits.json_bytes, "design").await?;
    let mut details = Vec::new();
    check_id("id", spec.id.as_str(), &mut details);
    if !details.is_empty() {
        return Err(Error::invalid("invalid design", details));
    }
    let design = state.store.create_design(&user, &spec).await?;
    Ok((StatusCode::CREATED, Json(design)))
}

/// Lists the user's designs.
#[utoipa::path(get, path = "/users/{user}/designs", tag = "designs",
    params(("user" = String, Path)), responses((status = 200, body = [Design])))]
async fn list_designs(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<Json<Vec<Design>>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    Ok(Json(state.store.list_designs(Some(&user)).await?))
}

/// Gets a design.
#[utoipa::path(get, path = "/users/{user}/designs/{designId}", tag = "designs",
    params(("user" = String, Path), ("designId" = String, Path)),
    responses((status = 200, body = Design), (status = 404, body = fledge_types::ApiError)))]
async fn get_design(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, design)): Path<(String, String)>,
) -> Result<Json<Design>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    Ok(Json(state.store.get_design(Some(&user), &DesignId::new(design)).await?))
}

/// Deletes a design with its schemas and code; 409 while a non-final job uses it.
#[utoipa::path(delete, path = "/users/{user}/designs/{designId}", tag = "designs",
    params(("user" = String, Path), ("designId" = String, Path)),
    responses((status = 204), (status = 409, body = fledge_types::ApiError)))]
async fn delete_design(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, design)): Path<(String, String)>,
) -> Result<StatusCode> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    state.store.delete_design(Some(&user), &DesignId::new(design)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Stores a new schema revision after validating it.
#[utoipa::path(post, path = "/users/{user}/designs/{designId}/schemas", tag = "designs",
    request_body = Schema, params(("user" = String, Path), ("designId" = String, Path)),
    responses((status = 201, body = Version), (status = 400, body = fledge_types::ApiError)))]
async fn put_schema(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, design)): Path<(String, String)>,
    request: Body,
) -> Result<(StatusCode, Json<Version>)> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let design = DesignId::new(design);
    // Unknown design first: a schema for nothing is a 404, not a validation error.
    state.store.get_design(Some(&user), &design).await?;
    let schema: Schema = body::json(request, state.limits.json_bytes, "schema").await?;
    let details = fledge_types::validate::schema(&schema);
    if !details.is_empty() {
        return Err(Error::invalid("invalid schema", details));
    }
    let version = state.store.put_schema(Some(&user), &design, &schema).await?;
    Ok((StatusCode::CREATED, Json(Version { version })))
}

fn schema_response(version: String, schema: Schema) -> Response {
    let mut response = Json(schema).into_response();
    if let Ok(value) = HeaderValue::from_str(&version) {
        response.headers_mut().insert(VERSION_HEADER, value);
    }
    response
}

/// The latest schema revision (its version in header `x-fledge-version`).
#[utoipa::path(get, path = "/users/{user}/designs/{designId}/schema", tag = "designs",
    params(("user" = String, Path), ("designId" = String, Path)),
    responses((status = 200, body = Schema), (status = 404, body = fledge_types::ApiError)))]
async fn latest_schema(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, design)): Path<(String, String)>,
) -> Result<Response> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let (version, schema) =
        state.store.get_schema(Some(&user), &DesignId::new(design), None).await?;
    Ok(schema_response(version, schema))
}

/// One schema revision.
#[utoipa::path(get, path = "/users/{user}/designs/{designId}/schemas/{version}", tag = "designs",
    params(("user" = String, Path), ("designId" = String, Path), ("version" = String, Path)),
    responses((status = 200, body = Schema), (status = 404, body = fledge_types::ApiError)))]
async fn get_schema(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, design, version)): Path<(String, String, String)>,
) -> Result<Response> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let (version, schema) =
        state.store.get_schema(Some(&user), &DesignId::new(design), Some(&version)).await?;
    Ok(schema_response(version, schema))
}

/// Checks that `bytes` are a readable zip with at least one file, at most `max_entries`
/// entries ([`super::Limits::code_entries`]) and safe paths, that inflates to at most `max_inflated`
/// bytes ([`super::Limits::code_inflated_bytes`]): every entry is inflated (to nowhere) to count what it
/// really holds, since the sizes an archive declares can lie. A corrupt entry (bad deflate
/// data, CRC mismatch) is a 400; too much is a 413.
pub(crate) fn check_zip(bytes: &[u8], max_inflated: u64, max_entries: usize) -> Result<()> {
    let too_large = |message: String| Error::new(fledge_types::ErrorCode::PayloadTooLarge, message);
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|err| {
        Error::bad_request(format!("the code bundle is not a zip archive: {err}"))
    })?;
    if archive.len() > max_entries {
        return Err(too_large(format!(
            "the code bundle has {} entries; at most {} are allowed",
            archive.len(),
            max_entries
        )));
    }
    let mut files = 0usize;
    let mut inflated: u64 = 0;
    for i in 0..archive.len() {
        let entry = archive
            .by_index(i)
            .map_err(|err| Error::bad_request(format!("the code bundle is corrupt: {err}")))?;
        let name = entry.name().to_owned();
        if entry.enclosed_name().is_none() {
            return Err(Error::bad_request(format!("the code bundle has an unsafe path {name:?}")));
        }
        if !entry.is_file() {
            continue;
        }
        files += 1;
        let budget = max_inflated - inflated;
        // The declared size only ever rejects (a lie is caught below), never sizes a buffer.
        let declared = entry.size();
        if declared > budget {
            return Err(too_large(format!(
                "the code bundle's entry {name:?} declares {declared} bytes; all entries together may inflate to at most {} bytes",
                max_inflated
            )));
        }
        let n =
            std::io::copy(&mut entry.take(budget + 1), &mut std::io::sink()).map_err(|err| {
                Error::bad_request(format!("the code bundle's entry {name:?} is corrupt: {err}"))
            })?;
        if n > budget {
            return Err(too_large(format!(
                "the code bundle inflates to more than {} bytes (at entry {name:?})",
                max_inflated
            )));
        }
        if n != declared {
            return Err(Error::bad_request(format!(
                "the code bundle is corrupt: entry {name:?} declares {declared} bytes but holds {n}"
            )));
        }
        inflated += n;
    }
    if files == 0 {
        return Err(Error::bad_request(
            "the code bundle has no files; it needs one folder per role",
        ));
    }
    Ok(())
}

/// Stores a new code revision: a zip with one folder per role (`application/zip`).
#[utoipa::path(post, path = "/users/{user}/designs/{designId}/codes", tag = "designs",
    request_body(content = Vec<u8>, content_type = "application/zip"),
    params(("user" = String, Path), ("designId" = String, Path)),
    responses((status = 201, body = CodeInfo), (status = 400, body = fledge_types::ApiError),
        (status = 413, body = fledge_types::ApiError)))]
async fn put_code(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, design)): Path<(String, String)>,
    request: Body,
) -> Result<(StatusCode, Json<CodeInfo>)> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let design = DesignId::new(design);
    state.store.get_design(Some(&user), &design).await?;
    let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if content_type.split(';').next().map(str::trim) != Some("application/zip") {
        return Err(Error::bad_request(format!(
            "a code bundle must be sent as Content-Type: application/zip, not {content_type:?}"
        )));
    }
    let bytes = body::read(request, state.limits.code_bytes, "code bundle").await?;
    let checked = bytes.clone();
    let (max_inflated, max_entries) = (state.limits.code_inflated_bytes, state.limits.code_entries);
    tokio::task::spawn_blocking(move || check_zip(&checked, max_inflated, max_entries))
        .await
        .map_err(|err| Error::new(fledge_types::ErrorCode::Internal, err.to_string()))??;
    let meta = state.store.put_code(Some(&user), &design, &bytes).await?;
    Ok((
        StatusCode::CREATED,
        Json(CodeInfo { version: meta.version, size: meta.size, sha256: meta.sha256 }),
    ))
}

async fn code_response(
    state: &ApiState,
    headers: &HeaderMap,
    user: &str,
    design: String,
    version: Option<&str>,
) -> Result<Response> {
    let user = check_user(&state.user(headers).await?, user)?;
    let (meta, bytes) = state.store.get_code(Some(&user), &DesignId::new(design), version).await?;
    let mut response = ([(CONTENT_TYPE, "application/zip")], bytes).into_response();
    if let Ok(value) = HeaderValue::from_str(&meta.version) {
        response.headers_mut().insert(VERSION_HEADER, value);
    }
    Ok(response)
}

/// The latest code bundle (zip bytes; version in header `x-fledge-version`).
#[utoipa::path(get, path = "/users/{user}/designs/{designId}/code", tag = "designs",
    params(("user" = String, Path), ("designId" = String, Path)),
    responses((status = 200, content_type = "application/zip", body = Vec<u8>),
        (status = 404, body = fledge_types::ApiError)))]
async fn latest_code(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, design)): Path<(String, String)>,
) -> Result<Response> {
    code_response(&state, &headers, &user, design, None).await
}

/// One code revision (zip bytes).
#[utoipa::path(get, path = "/users/{user}/designs/{designId}/codes/{version}", tag = "designs",
    params(("user" = String, Path), ("designId" = String, Path), ("version" = String, Path)),
    responses((status = 200, content_type = "application/zip", body = Vec<u8>),
        (status = 404, body = fledge_types::ApiError)))]
async fn get_code(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, design, version)): Path<(String, String, String)>,
) -> Result<Response> {
    code_response(&state, &headers, &user, design, Some(&version)).await
}
