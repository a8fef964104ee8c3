//! `/whoami`, `/users`, `/users/{user}/tokens`.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use fledge_types::{ErrorDetail, Token, User, UserId};

use super::auth::{new_secret, secret_hash};
use super::error::{Error, Result};
use super::{ApiState, body, check_user, or_not_found};

pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(whoami))
        .routes(routes!(create_user, list_users))
        .routes(routes!(create_token, list_tokens))
        .routes(routes!(revoke_token))
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

/// The longest lifetime a token may be issued with: ten years, in seconds.
pub const MAX_TOKEN_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// The longest token description, in bytes.
const MAX_DESCRIPTION_BYTES: usize = 256;

/// A token request; every field is optional, and an empty body is an empty request.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct TokenRequest {
    /// What the token is for (at most 256 bytes).
    #[serde(default)]
    description: String,
    /// Lifetime in seconds (1 to 315360000, ten years); absent: the token never expires.
    #[serde(default)]
    ttl_secs: Option<u64>,
}

/// A freshly issued token, shown once.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct NewToken {
    /// The bearer token (only its SHA-256 is stored: it cannot be shown again).
    token: String,
    /// Its public id, to list and revoke it by.
    id: String,
    /// When it expires, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
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

/// Issues a new token for a user (admin or the user), optionally with a lifetime.
#[utoipa::path(post, path = "/users/{user}/tokens", tag = "users", request_body = TokenRequest,
    params(("user" = String, Path, description = "User id")),
    responses((status = 201, body = NewToken), (status = 400, body = fledge_types::ApiError),
        (status = 404, body = fledge_types::ApiError)))]
async fn create_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(user): Path<String>,
    request: Body,
) -> Result<(StatusCode, Json<NewToken>)> {
    let auth = state.user(&headers).await?;
    let user = check_user(&auth, &user)?;
    let bytes = body::read(request, state.limits.json_bytes as u64, "token request").await?;
    let request: TokenRequest = if bytes.iter().all(u8::is_ascii_whitespace) {
        TokenRequest::default()
    } else {
        fledge_types::json::from_slice(&bytes)
            .map_err(|details| Error::invalid("invalid token request", details))?
    };
    let mut details = Vec::new();
    if request.description.len() > MAX_DESCRIPTION_BYTES {
        details.push(ErrorDetail {
            path: "description".to_owned(),
            message: format!(
                "{} bytes; at most {MAX_DESCRIPTION_BYTES} are allowed",
                request.description.len()
            ),
        });
    }
    if let Some(ttl) = request.ttl_secs
        && !(1..=MAX_TOKEN_TTL_SECS).contains(&ttl)
    {
        details.push(ErrorDetail {
            path: "ttlSecs".to_owned(),
            message: format!("{ttl} is out of range: use 1 to {MAX_TOKEN_TTL_SECS} seconds"),
        });
    }
    if !details.is_empty() {
        return Err(Error::invalid("invalid token request", details));
    }
    let expires_at = request.ttl_secs.map(|ttl| {
        chrono::Utc::now() + chrono::Duration::seconds(i64::try_from(ttl).unwrap_or(i64::MAX))
    });
    let token = new_secret();
    let stored = state
        .store
        .add_token(&user, &secret_hash(&token), &request.description, expires_at)
        .await
        .map_err(|err| or_not_found(err, || Error::not_found(format!("user {user} not found"))))?;
    tracing::info!(user = %user, token_id = %stored.id, ?expires_at, "token issued");
    Ok((
        StatusCode::CREATED,
        Json(NewToken { token, id: stored.id, expires_at: stored.expires_at }),
    ))
}

/// Lists a user's tokens (admin or the user): ids, descriptions and expiry, never the secrets.
#[utoipa::path(get, path = "/users/{user}/tokens", tag = "users",
    params(("user" = String, Path, description = "User id")),
    responses((status = 200, body = [Token]), (status = 404, body = fledge_types::ApiError)))]
async fn list_tokens(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<Json<Vec<Token>>> {
    let auth = state.user(&headers).await?;
    let user = check_user(&auth, &user)?;
    state
        .store
        .get_user(&user)
        .await
        .map_err(|err| or_not_found(err, || Error::not_found(format!("user {user} not found"))))?;
    Ok(Json(state.store.list_tokens(Some(&user)).await?))
}

/// Revokes a user's token (admin or the user); it is refused from then on.
#[utoipa::path(delete, path = "/users/{user}/tokens/{tokenId}", tag = "users",
    params(("user" = String, Path, description = "User id"),
        ("tokenId" = String, Path, description = "Token id (from the listing)")),
    responses((status = 204), (status = 404, body = fledge_types::ApiError)))]
async fn revoke_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path((user, id)): Path<(String, String)>,
) -> Result<StatusCode> {
    let auth = state.user(&headers).await?;
    let user = check_user(&auth, &user)?;
    state.store.revoke_token(Some(&user), &id).await.map_err(|err| {
        or_not_found(err, || Error::not_found(format!("token {id} of user {user} not found")))
    })?;
    tracing::info!(user = %user, token_id = %id, "token revoked");
    Ok(StatusCode::NO_CONTENT)
}
