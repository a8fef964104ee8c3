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
pub(crate) mod designs;
pub mod error;
mod http_metrics;
mod jobs;
pub mod logbook;
mod models;
mod rate;
mod tasks;
pub mod ui;
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
    /// Most bytes a code bundle may inflate to, all entries together (default
    /// [`DEFAULT_CODE_INFLATED_LIMIT`]); checked by inflating at upload, never from the sizes
    /// the archive declares, and again whenever a stored bundle is read.
    pub code_inflated_bytes: u64,
    /// Most entries a code bundle may hold (default [`DEFAULT_CODE_ENTRIES_LIMIT`]).
    pub code_entries: usize,
    /// Most metric records one `POST /tasks/{id}/metrics` may carry (default 1,000).
    pub metric_records_per_request: usize,
    /// Most metrics (names) one record may carry (default 256, as `fledge-sdk`'s protocol).
    pub metrics_per_record: usize,
    /// Most metric records a task may store over its job (default 100,000: a record a round
    /// for a long job, several per round for a short one). A request that would pass it is
    /// refused whole, also when requests of one task come concurrently (the store counts and
    /// inserts in one transaction under the task's lock).
    pub metric_records_per_task: u64,
    /// Metric records a task may post per minute on average (default 6,000); it may post this
    /// many at once after a quiet minute (a token bucket per task, per apiserver).
    pub metric_records_per_minute: u32,
}

/// Default of [`Limits::metric_records_per_request`].
pub const DEFAULT_METRIC_RECORDS_PER_REQUEST: usize = 1_000;
/// Default of [`Limits::metrics_per_record`] (as `fledge-sdk`'s protocol).
pub const DEFAULT_METRICS_PER_RECORD: usize = 256;
/// Default of [`Limits::metric_records_per_task`].
pub const DEFAULT_METRIC_RECORDS_PER_TASK: u64 = 100_000;
/// Default of [`Limits::metric_records_per_minute`]: 100 a second, far above a record per task
/// per round.
pub const DEFAULT_METRIC_RECORDS_PER_MINUTE: u32 = 6_000;

/// Default bound on what a code bundle inflates to: 256 MiB (the agent's unpacking bound).
pub const DEFAULT_CODE_INFLATED_LIMIT: u64 = 256 * 1024 * 1024;
/// Default bound on a code bundle's entries: 10,000 (the agent's unpacking bound).
pub const DEFAULT_CODE_ENTRIES_LIMIT: usize = 10_000;

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
    /// The CA clients should trust, served unauthenticated at `/api/v1/ca.pem` (a client
    /// checks it against the fingerprint it was given) and put into task configs.
    pub ca: Option<fledge_tls::Ca>,
    /// Broker logins written into task configs, when the brokers authenticate clients.
    pub broker_credentials: Option<crate::broker_auth::BrokerCredentials>,
    /// The Mosquitto provisioned with each task's login before its config is served.
    pub mosquitto: Option<crate::mosquitto::Provisioner>,
    /// Derives the data-plane keys task configs carry and the task keys deployers claim
    /// (random unless set from the controller's secret file, see
    /// [`ApiState::with_data_plane_keys`]).
    pub data_plane_keys: controller::TaskKeys,
    metrics: Arc<http_metrics::HttpMetrics>,
    /// The process's metric registry, rendered at `/metrics`.
    pub telemetry: crate::telemetry::Telemetry,
    /// Series fed by the metric records tasks post.
    reported: crate::telemetry::ReportedMetrics,
    /// How fast each task may post metric records ([`Limits::metric_records_per_minute`]).
    metric_rate: Arc<rate::RateLimiter>,
    /// The log lines tasks stream while they run (`fledgectl logs -f`).
    pub logs: Arc<logbook::LogBook>,
    /// The operator's MLflow token and the servers it belongs to: used for the check at job
    /// creation and the model routes, and handed to built-in roles' task configs.
    pub mlflow: crate::mlflow::MlflowAuth,
    /// The dashboard's sessions and cookie settings.
    ui: ui::UiState,
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
        let limits = Limits {
            json_bytes: DEFAULT_JSON_LIMIT,
            code_bytes: store.max_code_bytes(),
            code_inflated_bytes: DEFAULT_CODE_INFLATED_LIMIT,
            code_entries: DEFAULT_CODE_ENTRIES_LIMIT,
            metric_records_per_request: DEFAULT_METRIC_RECORDS_PER_REQUEST,
            metrics_per_record: DEFAULT_METRICS_PER_RECORD,
            metric_records_per_task: DEFAULT_METRIC_RECORDS_PER_TASK,
            metric_records_per_minute: DEFAULT_METRIC_RECORDS_PER_MINUTE,
        };
        Self {
            store,
            controller,
            notifier,
            env,
            limits,
            notifier_url: None,
            ca: None,
            broker_credentials: None,
            mosquitto: None,
            data_plane_keys: controller::TaskKeys::random(),
            metrics: Arc::new(http_metrics::HttpMetrics::default()),
            telemetry: crate::telemetry::Telemetry::new(),
            reported: crate::telemetry::ReportedMetrics::default(),
            metric_rate: Arc::default(),
            logs: Arc::new(logbook::LogBook::default()),
            mlflow: crate::mlflow::MlflowAuth::default(),
            ui: ui::UiState::default(),
        }
        .with_telemetry(crate::telemetry::Telemetry::new())
    }

    /// Registers the apiserver's series (HTTP, relayed task records, jobs and tasks by state)
    /// into `telemetry`, the process's registry, and renders it at `/metrics`.
    pub fn with_telemetry(mut self, telemetry: crate::telemetry::Telemetry) -> Self {
        telemetry.register(|registry| {
            self.metrics.register(registry.sub_registry_with_prefix("apiserver"));
            self.reported.register(registry);
        });
        telemetry.watch_store(self.store.clone());
        self.telemetry = telemetry;
        self
    }

    /// Writes each task's broker login ([`crate::broker_auth`]) into its config.
    pub fn with_broker_credentials(mut self, creds: crate::broker_auth::BrokerCredentials) -> Self {
        self.broker_credentials = Some(creds);
        self
    }

    /// Provisions each task's login on `mosquitto` before serving its config.
    pub fn with_mosquitto(mut self, mosquitto: crate::mosquitto::Provisioner) -> Self {
        self.mosquitto = Some(mosquitto);
        self
    }

    /// Derives task configs' data-plane keys from `keys` (the controller's secret, so every
    /// apiserver of a deployment serves the same keys).
    pub fn with_data_plane_keys(mut self, keys: controller::TaskKeys) -> Self {
        self.data_plane_keys = keys;
        self
    }

    /// Uses `auth` for MLflow registries (see [`crate::mlflow::MlflowAuth`]).
    pub fn with_mlflow(mut self, auth: crate::mlflow::MlflowAuth) -> Self {
        self.mlflow = auth;
        self
    }

    /// Sets the notifier URL agents are told.
    pub fn with_notifier_url(mut self, url: impl Into<String>) -> Self {
        self.notifier_url = Some(url.into());
        self
    }

    /// Sets the CA clients are told to trust (`None`: plain text, or an operator's
    /// certificate without a CA file).
    pub fn with_ca(mut self, ca: Option<fledge_tls::Ca>) -> Self {
        self.ca = ca;
        self
    }

    /// Whether the dashboard's session cookies are `Secure` (default: yes; `false` only for
    /// an apiserver serving plain HTTP, whose browsers would otherwise drop them).
    pub fn with_secure_cookies(mut self, secure: bool) -> Self {
        self.ui.secure_cookies = secure;
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
        .merge(models::routes())
}

/// The OpenAPI document of the REST API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = OpenApiRouter::<ApiState>::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", api_routes())
        .split_for_parts();
    document_common_errors(&mut doc);
    doc
}

/// Adds the errors any operation can answer with to each operation that does not list them
/// already, each with an [`fledge_types::ApiError`] body: 401 (no or an unknown token: every
/// operation needs one) and 403 (a token that may not do this: another user's resources, an
/// admin operation, a task or compute key outside its task), and 400 where the request carries
/// anything to get wrong (path or query parameters, a body).
fn document_common_errors(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
    let error = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new().schema(Some(Ref::from_schema_name("ApiError"))).build(),
                )
                .build(),
        )
    };
    for item in doc.paths.paths.values_mut() {
        let shared_params = item.parameters.as_ref().is_some_and(|p| !p.is_empty());
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
            &mut item.head,
            &mut item.options,
        ]
        .into_iter()
        .flatten()
        {
            let takes_input = shared_params
                || op.parameters.as_ref().is_some_and(|p| !p.is_empty())
                || op.request_body.is_some();
            let responses = &mut op.responses.responses;
            if takes_input {
                responses.entry("400".to_owned()).or_insert_with(|| error("Invalid request"));
            }
            responses.entry("401".to_owned()).or_insert_with(|| error("No or an unknown token"));
            responses.entry("403".to_owned()).or_insert_with(|| error("The token may not do this"));
        }
    }
}

/// `GET /api/v1/ca.pem`: the control plane's CA, unauthenticated. A client that does not
/// trust it yet fetches it over an unverified connection and accepts it only if its SHA-256
/// matches the fingerprint it was given (`fledgectl login --ca-fingerprint`).
async fn ca_pem(
    axum::extract::State(state): axum::extract::State<ApiState>,
) -> Result<axum::response::Response> {
    use axum::response::IntoResponse as _;
    match &state.ca {
        Some(ca) => Ok((
            [(axum::http::header::CONTENT_TYPE, "application/x-pem-file")],
            ca.pem().to_owned(),
        )
            .into_response()),
        None => Err(Error::not_found(
            "this server publishes no CA (plain text, or an operator certificate without tls.ca)",
        )),
    }
}

/// The REST API version this server serves.
pub const API_VERSION: &str = "v1";

/// Answer of `GET /api/v1/version`.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Version {
    /// The server's release.
    version: &'static str,
    /// The REST API version.
    api_version: &'static str,
}

/// `GET /api/v1/version`: the server's release and API version, unauthenticated. A client
/// asks it before it may have a working token (`fledgectl version` with an expired one, a
/// fresh `login`), as kubectl's `/version` is public; it tells no more than the release,
/// which the OpenAPI document (also public) all but tells already.
async fn version() -> axum::Json<Version> {
    axum::Json(Version { version: env!("CARGO_PKG_VERSION"), api_version: API_VERSION })
}

/// The apiserver's router: `/api/v1/...`, `/api/v1/openapi.json`, `/api/v1/ca.pem`,
/// `/api/v1/version`, `/healthz`, `/metrics`, and the dashboard at `/ui` ([`ui`]).
pub fn router(state: ApiState) -> Router {
    let (api, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/api/v1", api_routes())
        .split_for_parts();
    document_common_errors(&mut doc);
    let doc = Arc::new(doc);
    api.route(
        "/api/v1/openapi.json",
        get(move || {
            let doc = doc.clone();
            async move { axum::Json(doc.as_ref().clone()) }
        }),
    )
    .route("/api/v1/ca.pem", get(ca_pem))
    .route("/api/v1/version", get(version))
    .merge(ui::routes())
    .route("/healthz", get(|| async { "ok" }))
    .route(
        "/metrics",
        get(|axum::extract::State(state): axum::extract::State<ApiState>| async move {
            state.telemetry.response().await
        }),
    )
    .fallback(|| async { Error::not_found("no such route; see /api/v1/openapi.json") })
    // Bodies are read with explicit limits (JSON vs code) so that 413s carry the limit.
    .layer(DefaultBodyLimit::disable())
    .layer(axum::middleware::from_fn_with_state(state.clone(), http_metrics::track))
    .with_state(state)
}

/// Serves `router(state)` in plain text on `listener` until `shutdown` fires, then drains open
/// requests.
pub async fn serve(
    listener: TcpListener,
    state: ApiState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_on(listener, state, shutdown).await
}

/// Serves `router(state)` on any listener (plain TCP, or [`crate::tls::TlsListener`]) until
/// `shutdown` fires, then drains open requests.
pub async fn serve_on<L>(
    listener: L,
    state: ApiState,
    shutdown: CancellationToken,
) -> anyhow::Result<()>
where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
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

/// The owner `user`'s reads are scoped to: their own resources, or everyone's for an admin,
/// who may act for any user ([`check_user`]). A lookup outside the scope is `NotFound`.
fn read_scope(user: &User) -> Option<&UserId> {
    (!user.is_admin).then_some(&user.id)
}

/// Maps a store `NotFound` to `not_found` (anything else passes through).
fn or_not_found(err: store::Error, not_found: impl FnOnce() -> Error) -> Error {
    match err {
        store::Error::NotFound { .. } => not_found(),
        other => other.into(),
    }
}
