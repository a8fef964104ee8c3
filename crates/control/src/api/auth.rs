//! Authentication: bearer user tokens, task keys and compute API keys.
//!
//! Secrets are 32 random bytes in hex. Only their SHA-256 is stored and compared, so a leaked
//! database does not leak usable tokens. A bad or missing secret is 401 whatever the reason
//! (unknown task, wrong key), so that probing learns nothing.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;

use fledge_types::{ComputeId, Task, TaskId, User, UserId};

use super::ApiState;
use super::error::{Error, Result};
use crate::store::{self, BlobStore, Store};

/// The name of the user `bootstrap_admin` creates.
pub const ADMIN_USER: &str = "admin";

/// A new random secret: 32 bytes, hex (64 characters).
pub fn new_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The stored form of a secret: its SHA-256, hex.
pub fn secret_hash(secret: &str) -> String {
    BlobStore::digest(secret.as_bytes())
}

/// Creates user `admin` if absent and a new token for it; returns the token (plain).
/// Used by `fledge standalone` to hand `fledgectl` its credentials.
pub async fn bootstrap_admin(store: &dyn Store) -> store::Result<String> {
    let admin = User { id: UserId::new(ADMIN_USER), is_admin: true };
    match store.create_user(&admin).await {
        Ok(()) | Err(store::Error::AlreadyExists { .. }) => {}
        Err(err) => return Err(err),
    }
    let token = new_secret();
    store.add_token(&admin.id, &secret_hash(&token), "issued at start by fledge", None).await?;
    Ok(token)
}

/// The bearer secret of a request.
fn bearer(headers: &HeaderMap) -> Result<&str> {
    let value = headers
        .get(AUTHORIZATION)
        .ok_or_else(|| Error::unauthenticated("missing Authorization: Bearer header"))?;
    let value = value
        .to_str()
        .map_err(|_| Error::unauthenticated("the Authorization header is not text"))?;
    let secret = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Error::unauthenticated("the Authorization header must be `Bearer <token>`")
        })?;
    Ok(secret)
}

impl ApiState {
    /// The user whose token the request carries.
    pub(super) async fn user(&self, headers: &HeaderMap) -> Result<User> {
        self.user_by_token_hash(&secret_hash(bearer(headers)?)).await
    }

    /// The user whose token has SHA-256 `token_sha256` (the dashboard's sessions keep the
    /// hash): 401 for an unknown, revoked or expired token.
    pub(super) async fn user_by_token_hash(&self, token_sha256: &str) -> Result<User> {
        match self.store.user_by_token(token_sha256).await {
            Ok(user) => Ok(user),
            Err(store::Error::NotFound { .. }) => {
                Err(Error::unauthenticated("invalid, revoked or expired token"))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// The user of the request, who must be an admin.
    pub(super) async fn admin(&self, headers: &HeaderMap) -> Result<User> {
        let user = self.user(headers).await?;
        if !user.is_admin {
            return Err(Error::forbidden(format!(
                "user {} is not an admin; this route needs an admin token",
                user.id
            )));
        }
        Ok(user)
    }

    /// The task `task` if the request carries its key: the key its deployer was given for a
    /// platform-run task, the key its job's owner minted for a participant-run task. No key is
    /// valid once the task's job has ended.
    pub(super) async fn task(&self, headers: &HeaderMap, task: &TaskId) -> Result<Task> {
        let hash = secret_hash(bearer(headers)?);
        match self.store.task_by_key(task, &hash).await {
            Ok(found) => Ok(found),
            // The same words whatever the cause (unknown task, wrong key, revoked key, ended
            // job), so that probing learns nothing.
            Err(store::Error::NotFound { .. }) => Err(Error::unauthenticated(format!(
                "invalid key for task {task}: a platform-run task takes the key its deployer was \
                 given, a participant-run task the key its job's owner minted with `fledgectl job \
                 join` (a revoked or re-minted key is refused), and no key is valid once the \
                 job has ended"
            ))),
            Err(err) => Err(err.into()),
        }
    }

    /// Checks that the request carries compute `compute`'s API key.
    pub(super) async fn compute(&self, headers: &HeaderMap, compute: &ComputeId) -> Result<()> {
        let hash = secret_hash(bearer(headers)?);
        match self.store.verify_compute_key(compute, &hash).await {
            Ok(()) => Ok(()),
            Err(store::Error::NotFound { .. }) => {
                Err(Error::unauthenticated(format!("invalid API key for compute {compute}")))
            }
            Err(err) => Err(err.into()),
        }
    }
}
