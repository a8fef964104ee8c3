//! `/whoami`, `/users`, `/users/{user}/tokens`.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use fledge_types::{ErrorDetail, User, UserId};

use super::auth::{new_secret, secret_hash};
use super::error::{Error, Result};
use super::{ApiState, body, check_user, or_not_found};

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(whoami))
        .routes(routes!(create_user, list_users))
        .routes(routes!(create_token))
}

/// A new user.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct NewUser {
    /// Login name: 1 to 64 of `A-Z a-z 0-9 . _ -`.
    id: String,
    /// Whether the user is an admin.
    #[serde(default)]
    is_admin: bool,
}

/// A freshly issued token, shown once.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub(super) struct NewToken {
    /// The bearer token.
    token: String,
}

/// Checks a user-chosen id (users, designs, computes): problems as details at `path`.
pub(super) fn check_id(path: &str, id: &str, details: &mut Vec<ErrorDetail>) {
    let ok = (1..=64).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !id.starts_with('.');
    if !ok {
        details.push(ErrorDetail {
            path: path.to_owned(),
            message: format!(
                "{id:?} is not a valid id: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with .)"
            ),
        });
    }
}

/// The caller's user.
#[utoipa::path(get, path = "/whoami", tag = "users",
    responses((status = 200, body = User), (status = 401, body = fledge_types::ApiError)))]
async fn whoami(State(state): State<ApiState>, headers: HeaderMap) -> Result<Json<User>> {
    Ok(Json(state.user(&headers).await?))
}

/// Creates a user (admin only).
#[utoipa::path(post, path = "/users", tag = "users", request_body = NewUser,
    responses((status = 201, body = User), (status = 409, body = fledge_types::ApiError)))]
async fn create_user(
    State(state): State<ApiState>,
    headers: HeaderMap,
    request: Body,
) -> Result<(StatusCode, Json<User>)> {
    state.admin(&headers).await?;
    let new: NewUser = body::json(request, state.limits.json_bytes, "user").await?;
    let mut details = Vec::new();
    check_id("id", &new.id, &mut details);
    if !details.is_empty() {
        return Err(Error::invalid("invalid user", details));
    }
    let user = User { id: UserId::new(new.id), is_admin: new.is_admin };
    state.store.create_user(&user).await?;
    Ok((StatusCode::CREATED, Json(user)))
}

/// Lists users (admin only).
#[utoipa::path(get, path = "/users", tag = "users", responses((status = 200, body = [User])))]
async fn list_users(State(state): State<ApiState>, headers: HeaderMap) -> Result<Json<Vec<User>>> {
    state.admin(&headers).await?;
    Ok(Json(state.store.list_users().await?))
}

/// Issues a new token for a user (admin or the user).
#[utoipa::path(post, path = "/users/{user}/tokens", tag = "users",
    params(("user" = String, Path, description = "User id")),
    responses((status = 201, body = NewToken), (status = 404, body = fledge_types::ApiError)))]
async fn create_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<(StatusCode, Json<NewToken>)> {
    let auth = state.user(&headers).await?;
    let user = check_user(&auth, &user)?;
    let token = new_secret();
    state
        .store
        .add_token(&user, &secret_hash(&token))
        .await
        .map_err(|err| or_not_found(err, || Error::not_found(format!("user {user} not found"))))?;
    Ok((StatusCode::CREATED, Json(NewToken { token })))
}
