//! The apiserver: REST resources, authentication, the agent's task fetch, OpenAPI.
//!
//! The contract is `docs/api.md`; the OpenAPI document served at `/api/v1/openapi.json` is
//! generated from the handlers' `#[utoipa::path]` annotations. Shape:
//! - [`ApiState`] holds the store, the controller's handle and what task configs need;
//! - [`router`] builds every route; [`serve`] runs it until the shutdown token fires;
//! - [`auth`] turns bearer secrets into a user, a task or a compute; [`error`] is the one
//!   place an error code becomes an HTTP status.
//!
//! Handlers validate everything before they write, so a rejected request changes nothing.

pub mod auth;
mod body;
mod computes;
mod datasets;
mod designs;
pub mod error;
mod http_metrics;
mod jobs;
mod tasks;
mod users;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;

use fledge_types::task_config::TaskEnv;
use fledge_types::{User, UserId};

use crate::controller;
use crate::notifier;
use crate::store::{self, Store};

pub use auth::{bootstrap_admin, new_secret, secret_hash};
pub use error::{Error, Result, status_of};

/// Default limit of a JSON request body: 8 MiB.
pub const DEFAULT_JSON_LIMIT: usize = 8 * 1024 * 1024;

/// Request size limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest JSON body in bytes (default [`DEFAULT_JSON_LIMIT`]).
    pub json_bytes: usize,
    /// Largest code bundle in bytes (default: the store's blob limit).
    pub code_bytes: u64,
}

/// Everything the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    /// All state.
    pub store: Arc<dyn Store>,
    /// Woken after a start/stop request, a task status report or a deployment report.
    pub controller: controller::Handle,
    /// Tells whether deployers are connected (for `Compute::connected`), when the notifier runs
    /// in this process.
    pub notifier: Option<notifier::Handle>,
    /// What task configs get beyond the job: brokers, apiserver URL, metaserver, registry.
    pub env: TaskEnv,
    /// Request size limits.
    pub limits: Limits,
    /// The notifier's URL as agents reach it, told to agents when they join (`GET
    /// /tasks/{taskId}`) and shown in the join commands of participant-run tasks.
    pub notifier_url: Option<String>,
    /// Derives the data-plane keys task configs carry (random unless set from the
    /// controller's secret file, see [`ApiState::with_data_plane_keys`]).
    pub data_plane_keys: controller::TaskKeys,
    metrics: Arc<http_metrics::HttpMetrics>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("env", &self.env)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// State with default limits (JSON 8 MiB, code bundles up to the store's blob limit).
    pub fn new(
        store: Arc<dyn Store>,
        controller: controller::Handle,
        notifier: Option<notifier::Handle>,
        env: TaskEnv,
    ) -> Self {
        let limits = Limits { json_bytes: DEFAULT_JSON_LIMIT, code_bytes: store.max_code_bytes() };
        Self {
            store,
            controller,
            notifier,
            env,
            limits,
            notifier_url: None,
            data_plane_keys: controller::TaskKeys::random(),
            metrics: Arc::new(http_metrics::HttpMetrics::default()),
        }
    }

    /// Derives task configs' data-plane keys from `keys` (the controller's secret, so every
    /// apiserver of a deployment serves the same keys).
    pub fn with_data_plane_keys(mut self, keys: controller::TaskKeys) -> Self {
        self.data_plane_keys = keys;
        self
    }

    /// Sets the notifier URL agents are told.
    pub fn with_notifier_url(mut self, url: impl Into<String>) -> Self {
        self.notifier_url = Some(url.into());
        self
    }

    /// Replaces the limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// The OpenAPI document's root; paths are added by the router.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "Fledge REST API", description = "See docs/api.md for the contract."),
    components(schemas(fledge_types::ApiError, fledge_types::ErrorDetail)),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

/// Every `/api/v1` route, with its OpenAPI description.
fn api_routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .merge(users::routes())
        .merge(designs::routes())
        .merge(datasets::routes())
        .merge(jobs::routes())
        .merge(computes::routes())
        .merge(tasks::routes())
}

/// The OpenAPI document of the REST API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, doc) = OpenApiRouter::<ApiState>::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", api_routes())
        .split_for_parts();
    doc
}

/// The apiserver's router: `/api/v1/...`, `/api/v1/openapi.json`, `/healthz`, `/metrics`.
pub fn router(state: ApiState) -> Router {
    let (api, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", api_routes())
        .split_for_parts();
    let doc = Arc::new(doc);
    api.route(
        "/api/v1/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc.as_ref().clone()) }
        }),
    )
    .route("/healthz", get(|| async { "ok" }))
    .route("/metrics", get(http_metrics::render))
    .fallback(|| async { Error::not_found("no such route; see /api/v1/openapi.json") })
    // Bodies are read with explicit limits (JSON vs code) so that 413s carry the limit.
    .layer(DefaultBodyLimit::disable())
    .layer(axum::middleware::from_fn_with_state(state.clone(), http_metrics::track))
    .with_state(state)
}

/// Serves `router(state)` on `listener` until `shutdown` fires, then drains open requests.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "apiserver listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    tracing::info!(%addr, "apiserver stopped");
    Ok(())
}

/// Checks that `auth` may act as path user `user`: the same user, or an admin.
fn check_user(auth: &User, user: &str) -> Result<UserId> {
    if auth.is_admin || auth.id.as_str() == user {
        Ok(UserId::new(user))
    } else {
        Err(Error::forbidden(format!("user {} may not act for user {user}", auth.id)))
    }
}

/// Maps a store `NotFound` to `not_found` (anything else passes through).
fn or_not_found(err: store::Error, not_found: impl FnOnce() -> Error) -> Error {
    match err {
        store::Error::NotFound { .. } => not_found(),
        other => other.into(),
    }
}
