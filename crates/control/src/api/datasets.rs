//! Datasets: metadata only (url, format, realm); the data never leaves its owner.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use fledge_types::{Dataset, DatasetId, DatasetSpec, ErrorDetail};

use super::error::{Error, Result};
use super::{ApiState, body, check_user};

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(create_dataset, list_datasets))
        .routes(routes!(get_dataset, delete_dataset))
}

fn check(spec: &DatasetSpec) -> Vec<ErrorDetail> {
    let mut details = Vec::new();
    let mut push = |path: &str, message: &str| {
        details.push(ErrorDetail { path: path.to_owned(), message: message.to_owned() })
    };
    if spec.name.trim().is_empty() {
        push("name", "must not be empty");
    }
    if spec.url.trim().is_empty() {
        push("url", "must not be empty");
    } else if !spec.url.contains("://") {
        push("url", "must be a URL with a scheme (file:///..., https://...)");
    }
    if spec.realm.trim().is_empty() {
        push("realm", "must not be empty (e.g. default/eu/uk)");
    } else if spec.realm.split('/').any(str::is_empty) {
        push("realm", "must be slash-separated names without empty segments");
    }
    details
}

/// Registers a dataset.
#[utoipa::path(post, path = "/users/{user}/datasets", tag = "datasets", request_body = DatasetSpec,
    params(("user" = String, Path)),
    responses((status = 201, body = Dataset), (status = 400, body = fledge_types::ApiError)))]
async fn create_dataset(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(user): Path<String>,
    request: Body,
) -> Result<(StatusCode, Json<Dataset>)> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    let spec: DatasetSpec = body::json(request, state.limits.json_bytes, "dataset").await?;
    let details = check(&spec);
    if !details.is_empty() {
        return Err(Error::invalid("invalid dataset", details));
    }
    let dataset = state.store.create_dataset(&user, &spec).await?;
    Ok((StatusCode::CREATED, Json(dataset)))
}

/// Lists the user's datasets and public ones.
#[utoipa::path(get, path = "/users/{user}/datasets", tag = "datasets",
    params(("user" = String, Path)), responses((status = 200, body = [Dataset])))]
async fn list_datasets(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<Json<Vec<Dataset>>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    Ok(Json(state.store.list_datasets(Some(&user)).await?))
}

/// Gets a dataset (own or public).
#[utoipa::path(get, path = "/users/{user}/datasets/{datasetId}", tag = "datasets",
    params(("user" = String, Path), ("datasetId" = String, Path)),
    responses((status = 200, body = Dataset), (status = 404, body = fledge_types::ApiError)))]
async fn get_dataset(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id)): Path<(String, String)>,
) -> Result<Json<Dataset>> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    Ok(Json(state.store.get_dataset(Some(&user), &DatasetId::new(id)).await?))
}

/// Deletes an own dataset; 409 while a non-final job uses it.
#[utoipa::path(delete, path = "/users/{user}/datasets/{datasetId}", tag = "datasets",
    params(("user" = String, Path), ("datasetId" = String, Path)),
    responses((status = 204), (status = 409, body = fledge_types::ApiError)))]
async fn delete_dataset(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id)): Path<(String, String)>,
) -> Result<StatusCode> {
    let user = check_user(&state.user(&headers).await?, &user)?;
    state.store.delete_dataset(Some(&user), &DatasetId::new(id)).await?;
    Ok(StatusCode::NO_CONTENT)
}
