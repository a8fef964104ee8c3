//! The web dashboard at `/ui` (`docs/dashboard.md`): server-rendered HTML and SVG, two small
//! static files (a stylesheet and a script), nothing fetched from elsewhere, so it works
//! air-gapped and needs no JavaScript toolchain.
//!
//! - Login with an API token: `POST /ui/login` checks it as the API does and opens a session
//!   ([`session`]); the cookie is `HttpOnly`, `SameSite=Strict`, `Secure` under TLS. The login
//!   page's script also reads `#token=...` from the URL fragment (never sent to a server).
//! - Every page reads through the store with the API's ownership rule (`api::read_scope`):
//!   a user sees their own jobs, designs and datasets (and public datasets), an admin everyone's;
//!   another user's job is 404, as in the API. Computes are for admins, as `/computes`.
//! - Every response carries a strict Content-Security-Policy (no inline script or style, nothing
//!   from other origins, no framing); every user string is escaped ([`render::escape`]); the
//!   state-changing requests (login, logout) are refused unless they come from this origin.
//! - Live parts (`data-live`) are re-fetched as HTML fragments every few seconds by the script
//!   until the fragment says it is final.

pub mod render;
pub mod session;

use std::collections::HashMap;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE, HOST, LOCATION, ORIGIN, SET_COOKIE,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;

use fledge_types::{ErrorCode, Job, JobId, JobState, ModelFile, Schema, TaskState, User};

use super::error::Error;
use super::{ApiState, read_scope};
use crate::store::{self, JobFilter};

pub use session::Sessions;

/// The stylesheet, served at `/ui/static/ui.css`.
const CSS: &str = include_str!("static/ui.css");
/// The one script, served at `/ui/static/ui.js`.
const JS: &str = include_str!("static/ui.js");

/// The Content-Security-Policy of every dashboard response.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
                       base-uri 'none'";

/// Most jobs listed on the jobs page (the newest).
pub const MAX_JOBS_LISTED: usize = 100;
/// Longest token accepted at login, in bytes.
const MAX_TOKEN_BYTES: usize = 256;
/// Largest login or logout form, in bytes.
const MAX_FORM_BYTES: u64 = 2048;
/// Longest path a job id in a URL may be, in bytes.
const MAX_ID_BYTES: usize = 128;
/// Round checkpoints linked on a job page (the latest), beside every final model.
const MAX_CHECKPOINTS_LINKED: usize = 10;

/// The dashboard's state inside [`ApiState`].
#[derive(Clone, Debug)]
pub struct UiState {
    /// Open sessions.
    pub sessions: Sessions,
    /// Whether session cookies are `Secure` (the apiserver serves TLS).
    pub secure_cookies: bool,
}

impl Default for UiState {
    fn default() -> Self {
        Self { sessions: Sessions::default(), secure_cookies: true }
    }
}

/// Every `/ui` route, with the security headers.
pub(super) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/ui", get(|| async { redirect("/ui/jobs") }))
        .route("/ui/", get(|| async { redirect("/ui/jobs") }))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/static/ui.css", get(|| async { asset("text/css; charset=utf-8", CSS) }))
        .route("/ui/static/ui.js", get(|| async { asset("text/javascript; charset=utf-8", JS) }))
        .route("/ui/jobs", get(jobs_page))
        .route("/ui/jobs/fragment", get(jobs_fragment))
        .route("/ui/jobs/{id}", get(job_page))
        .route("/ui/jobs/{id}/fragment", get(job_fragment))
        .route("/ui/jobs/{id}/metrics.json", get(job_metrics))
        .route("/ui/jobs/{id}/model", get(job_model))
        .route("/ui/designs", get(designs_page))
        .route("/ui/datasets", get(datasets_page))
        .route("/ui/computes", get(computes_page))
        .route("/ui/{*rest}", get(not_found).post(not_found))
        .layer(axum::middleware::map_response(security_headers))
}

/// The headers every dashboard response carries.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert("content-security-policy", HeaderValue::from_static(CSP));
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    // `same-origin`, not `no-referrer`: under `no-referrer` a browser sends `Origin: null`.
    headers.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    headers.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    if !headers.contains_key(CACHE_CONTROL) {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

fn asset(content_type: &'static str, text: &'static str) -> Response {
    ([(CONTENT_TYPE, content_type), (CACHE_CONTROL, "no-cache")], text).into_response()
}

fn html(status: StatusCode, body: String) -> Response {
    (status, [(CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
}

fn redirect(to: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(to) {
        response.headers_mut().insert(LOCATION, value);
    }
    response
}

/// An API error as an HTML page with the API's status.
fn error_response(err: &Error, user: Option<&User>) -> Response {
    let status = super::status_of(err.code());
    html(status, render::error_page(user, status.as_u16(), &err.0.message))
}

async fn not_found(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let user = state.ui_user(&headers).await.ok().flatten();
    error_response(&Error::not_found("no such page"), user.as_ref())
}

/// `next` if it is a dashboard path safe to redirect to after login, else `/ui/jobs`.
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(next)
            if next.len() <= 512
                && next.starts_with("/ui/")
                && !next.contains("//")
                && !next.contains('\\')
                && next
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/-_.~?=&%+".contains(&b)) =>
        {
            next.to_owned()
        }
        _ => "/ui/jobs".to_owned(),
    }
}

/// Whether a state-changing request comes from this origin. A browser that sends
/// `Sec-Fetch-Site` (which no page can set) must say `same-origin`; then an `Origin` it sends
/// must name this host, though it may be `null` (a browser hides it under some referrer
/// policies). Without `Sec-Fetch-Site`, `Origin` must be present and name this host.
pub fn same_origin(headers: &HeaderMap) -> Result<(), &'static str> {
    let site = headers.get("sec-fetch-site");
    if site.is_some_and(|site| site.as_bytes() != b"same-origin") {
        return Err("a cross-site request was refused");
    }
    let origin = headers.get(ORIGIN).and_then(|v| v.to_str().ok());
    let origin = match (origin, site) {
        (Some("null") | None, Some(_)) => return Ok(()),
        (Some(origin), _) => origin,
        (None, None) => {
            return Err("the request has no Origin header; log in from the dashboard's own page");
        }
    };
    let host = headers.get(HOST).and_then(|v| v.to_str().ok()).ok_or("the request has no Host")?;
    let authority = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
    if authority != Some(host) {
        return Err("a request from another origin was refused");
    }
    Ok(())
}

/// The `name=value` pairs of an `application/x-www-form-urlencoded` body or query.
fn form(bytes: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(bytes).take(16).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

impl ApiState {
    /// The user of the request's session: `None` without a live session.
    async fn ui_user(&self, headers: &HeaderMap) -> Result<Option<User>, Error> {
        let Some(id) = session::cookie(headers) else { return Ok(None) };
        let Some(token) = self.ui.sessions.token_of(id) else { return Ok(None) };
        match self.user_by_token_hash(&token).await {
            Ok(user) => Ok(Some(user)),
            Err(err) if err.code() == ErrorCode::Unauthenticated => {
                // The token was revoked or expired: so is the session.
                self.ui.sessions.close(id);
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    /// The user of a page request, or the response that sends them to log in.
    async fn page_user(&self, headers: &HeaderMap, uri: &Uri) -> Result<User, Response> {
        match self.ui_user(headers).await {
            Ok(Some(user)) => Ok(user),
            Ok(None) => {
                let next = safe_next(uri.path_and_query().map(|p| p.as_str()));
                Err(redirect(&format!("/ui/login?next={}", render::url_encode(&next))))
            }
            Err(err) => Err(error_response(&err, None)),
        }
    }

    /// The user of a fragment or download request: 401 without a session.
    async fn fetch_user(&self, headers: &HeaderMap) -> Result<User, Response> {
        match self.ui_user(headers).await {
            Ok(Some(user)) => Ok(user),
            Ok(None) => Err(error_response(
                &Error::unauthenticated("no session, or it ended; log in again"),
                None,
            )),
            Err(err) => Err(error_response(&err, None)),
        }
    }

    /// Job `id` if `user` may read it (their own, or any for an admin): 404 otherwise, as the API.
    async fn ui_job(&self, user: &User, id: &str) -> Result<Job, Response> {
        if id.is_empty() || id.len() > MAX_ID_BYTES {
            return Err(error_response(
                &Error::not_found(format!("job {id} not found")),
                Some(user),
            ));
        }
        self.store
            .get_job(read_scope(user), &JobId::new(id))
            .await
            .map_err(|err| error_response(&err.into(), Some(user)))
    }

    /// The signed-in user and their job `id` (404 for another's), or the page to answer with.
    async fn ui_user_job(&self, headers: &HeaderMap, id: &str) -> Result<(User, Job), Response> {
        let user = self.fetch_user(headers).await?;
        let job = self.ui_job(&user, id).await?;
        Ok((user, job))
    }
}

async fn login_page(uri: Uri) -> Response {
    let query = form(uri.query().unwrap_or("").as_bytes());
    html(StatusCode::OK, render::login(&safe_next(query.get("next").map(String::as_str)), None))
}

async fn login(State(state): State<ApiState>, headers: HeaderMap, body: Body) -> Response {
    if let Err(why) = same_origin(&headers) {
        return html(StatusCode::FORBIDDEN, render::login("/ui/jobs", Some(why)));
    }
    let bytes = match super::body::read(body, MAX_FORM_BYTES, "login form").await {
        Ok(bytes) => bytes,
        Err(err) => return error_response(&err, None),
    };
    let fields = form(&bytes);
    let next = safe_next(fields.get("next").map(String::as_str));
    let token = fields.get("token").map(|t| t.trim()).unwrap_or("");
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return html(
            StatusCode::BAD_REQUEST,
            render::login(&next, Some("enter an API token (at most 256 characters)")),
        );
    }
    let hash = super::auth::secret_hash(token);
    match state.user_by_token_hash(&hash).await {
        Ok(user) => {
            let id = state.ui.sessions.open(&hash);
            tracing::info!(user = %user.id, "dashboard login");
            let mut response = redirect(&next);
            if let Ok(cookie) =
                HeaderValue::from_str(&session::set_cookie(&id, state.ui.secure_cookies))
            {
                response.headers_mut().insert(SET_COOKIE, cookie);
            }
            response
        }
        Err(err) if err.code() == ErrorCode::Unauthenticated => html(
            StatusCode::UNAUTHORIZED,
            render::login(&next, Some("invalid, revoked or expired token")),
        ),
        Err(err) => error_response(&err, None),
    }
}

async fn logout(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Err(why) = same_origin(&headers) {
        return html(StatusCode::FORBIDDEN, render::error_page(None, 403, why));
    }
    if let Some(id) = session::cookie(&headers) {
        state.ui.sessions.close(id);
    }
    let mut response = redirect("/ui/login");
    if let Ok(cookie) = HeaderValue::from_str(&session::clear_cookie(state.ui.secure_cookies)) {
        response.headers_mut().insert(SET_COOKIE, cookie);
    }
    response
}

/// The newest jobs `user` may read, with their progress.
async fn job_rows(state: &ApiState, user: &User) -> Result<(Vec<render::JobRow>, usize), Error> {
    let filter = JobFilter { owner: read_scope(user).cloned(), states: Vec::new() };
    let mut jobs = state.store.list_jobs(&filter).await?;
    let total = jobs.len();
    jobs.sort_by(|a, b| {
        b.created_at.cmp(&a.created_at).then_with(|| b.id.as_str().cmp(a.id.as_str()))
    });
    jobs.truncate(MAX_JOBS_LISTED);
    let mut rows = Vec::with_capacity(jobs.len());
    for job in jobs {
        let tasks = state.store.count_tasks(&job.id).await?;
        let round = state.store.latest_round(&job.id).await?;
        rows.push(render::JobRow { job, tasks, round });
    }
    Ok((rows, total))
}

async fn jobs_page(State(state): State<ApiState>, headers: HeaderMap, uri: Uri) -> Response {
    let user = match state.page_user(&headers, &uri).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    match job_rows(&state, &user).await {
        Ok((rows, total)) => {
            let fragment = render::jobs_fragment(&rows, total, Utc::now());
            html(StatusCode::OK, render::jobs_page(&user, &fragment))
        }
        Err(err) => error_response(&err, Some(&user)),
    }
}

async fn jobs_fragment(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let user = match state.fetch_user(&headers).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    match job_rows(&state, &user).await {
        Ok((rows, total)) => html(StatusCode::OK, render::jobs_fragment(&rows, total, Utc::now())),
        Err(err) => error_response(&err, Some(&user)),
    }
}

/// What a job page shows, read from the store.
struct JobData {
    job: Job,
    schema: Schema,
    tasks: Vec<fledge_types::Task>,
    records: Vec<fledge_types::MetricRecord>,
}

impl JobData {
    /// What the job page and its live fragment render, with `models` as the page lists them.
    fn view(&self, models: Result<Vec<(String, String)>, String>) -> render::JobView<'_> {
        render::JobView {
            job: &self.job,
            schema: &self.schema,
            tasks: &self.tasks,
            records: &self.records,
            models,
        }
    }
}

async fn job_data(state: &ApiState, job: Job) -> Result<JobData, Error> {
    let schema = match state
        .store
        .get_schema(Some(&job.owner), &job.spec.design_id, Some(&job.schema_version))
        .await
    {
        Ok((_, schema)) => schema,
        // The design was deleted after the job ended: draw the tasks without channels.
        Err(store::Error::NotFound { .. }) => Schema::default(),
        Err(err) => return Err(err.into()),
    };
    let tasks = state.store.list_tasks(&job.id).await?;
    let records = state.store.list_metrics(&job.id).await?;
    Ok(JobData { job, schema, tasks, records })
}

/// The model downloads of a job page: every final model and the latest checkpoints.
fn model_links(files: &[ModelFile]) -> Vec<(String, String)> {
    let mut links = Vec::new();
    let checkpoints: Vec<&ModelFile> = files.iter().filter(|f| f.round.is_some()).collect();
    let skip = checkpoints.len().saturating_sub(MAX_CHECKPOINTS_LINKED);
    let shown: Vec<&ModelFile> = files
        .iter()
        .filter(|f| f.round.is_none())
        .chain(checkpoints.into_iter().skip(skip))
        .collect();
    for file in shown {
        let mut query = Vec::new();
        let mut label = match file.round {
            Some(round) => {
                query.push(format!("round={round}"));
                format!("round {round} checkpoint")
            }
            None => "final model".to_owned(),
        };
        if let Some(group) = &file.group {
            query.push(format!("group={}", render::url_encode(group)));
            label.push_str(&format!(" of group {group}"));
        }
        label.push_str(&format!(" ({})", render::bytes(file.size as f64)));
        let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
        links.push((label, query));
    }
    links
}

async fn job_page(
    State(state): State<ApiState>,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
) -> Response {
    let user = match state.page_user(&headers, &uri).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    let job = match state.ui_job(&user, &id).await {
        Ok(job) => job,
        Err(response) => return response,
    };
    let models = match super::models::model_files(&state, &job).await {
        Ok(files) => Ok(model_links(&files)),
        Err(err) => Err(err.0.message),
    };
    let data = match job_data(&state, job).await {
        Ok(data) => data,
        Err(err) => return error_response(&err, Some(&user)),
    };
    let view = data.view(models);
    let fragment = render::job_fragment(&view, Utc::now());
    html(StatusCode::OK, render::job_page(&user, &view, &fragment))
}

async fn job_fragment(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (user, job) = match state.ui_user_job(&headers, &id).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let data = match job_data(&state, job).await {
        Ok(data) => data,
        Err(err) => return error_response(&err, Some(&user)),
    };
    let view = data.view(Ok(Vec::new()));
    html(StatusCode::OK, render::job_fragment(&view, Utc::now()))
}

/// A job id as a file name: its safe characters only.
fn file_stem(id: &JobId) -> String {
    id.as_str().chars().filter(|c| c.is_ascii_alphanumeric() || "-_".contains(*c)).collect()
}

async fn job_metrics(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let (user, job) = match state.ui_user_job(&headers, &id).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    match state.store.list_metrics(&job.id).await {
        Ok(records) => {
            let body = serde_json::to_vec(&records).unwrap_or_default();
            (
                [
                    (CONTENT_TYPE, "application/json".to_owned()),
                    (
                        CONTENT_DISPOSITION,
                        format!("attachment; filename=\"{}-metrics.json\"", file_stem(&job.id)),
                    ),
                ],
                body,
            )
                .into_response()
        }
        Err(err) => error_response(&err.into(), Some(&user)),
    }
}

async fn job_model(
    State(state): State<ApiState>,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
) -> Response {
    let (user, job) = match state.ui_user_job(&headers, &id).await {
        Ok(found) => found,
        Err(response) => return response,
    };
    let query = form(uri.query().unwrap_or("").as_bytes());
    let round = match query.get("round").map(|r| r.parse::<u64>()) {
        None => None,
        Some(Ok(round)) => Some(round),
        Some(Err(_)) => {
            return error_response(
                &Error::bad_request("round must be a round number"),
                Some(&user),
            );
        }
    };
    match super::models::model_file(&state, &job, round, query.get("group").map(String::as_str))
        .await
    {
        Ok(response) => response,
        Err(err) => error_response(&err, Some(&user)),
    }
}

async fn designs_page(State(state): State<ApiState>, headers: HeaderMap, uri: Uri) -> Response {
    let user = match state.page_user(&headers, &uri).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    match state.store.list_designs(read_scope(&user)).await {
        Ok(designs) => html(StatusCode::OK, render::designs_page(&user, &designs)),
        Err(err) => error_response(&err.into(), Some(&user)),
    }
}

async fn datasets_page(State(state): State<ApiState>, headers: HeaderMap, uri: Uri) -> Response {
    let user = match state.page_user(&headers, &uri).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    match state.store.list_datasets(read_scope(&user)).await {
        Ok(datasets) => html(StatusCode::OK, render::datasets_page(&user, &datasets)),
        Err(err) => error_response(&err.into(), Some(&user)),
    }
}

/// Every compute with its deployer's connection and its running tasks' newest heartbeat.
async fn compute_rows(state: &ApiState) -> Result<Vec<render::ComputeRow>, Error> {
    let computes = state.store.list_computes().await?;
    let live = JobFilter {
        owner: None,
        states: JobState::ALL.into_iter().filter(|s| !s.is_final()).collect(),
    };
    let mut rows: Vec<render::ComputeRow> = computes
        .into_iter()
        .map(|c| render::ComputeRow {
            compute: state.connected(c),
            live_tasks: 0,
            last_heartbeat: None,
        })
        .collect();
    for job in state.store.list_jobs(&live).await? {
        for task in state.store.list_tasks(&job.id).await? {
            let Some(row) = rows.iter_mut().find(|r| r.compute.compute_id == task.compute_id)
            else {
                continue;
            };
            if task.state == TaskState::Running {
                row.live_tasks += 1;
            }
            if task.last_heartbeat > row.last_heartbeat {
                row.last_heartbeat = task.last_heartbeat;
            }
        }
    }
    Ok(rows)
}

async fn computes_page(State(state): State<ApiState>, headers: HeaderMap, uri: Uri) -> Response {
    let user = match state.page_user(&headers, &uri).await {
        Ok(user) => user,
        Err(response) => return response,
    };
    if !user.is_admin {
        return html(
            StatusCode::FORBIDDEN,
            render::computes_page(
                &user,
                Err("computes are shown to admins only, as the API's /computes"),
                Utc::now(),
            ),
        );
    }
    match compute_rows(&state).await {
        Ok(rows) => html(StatusCode::OK, render::computes_page(&user, Ok(&rows), Utc::now())),
        Err(err) => error_response(&err, Some(&user)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dashboard_paths_are_followed_after_login() {
        assert_eq!(safe_next(Some("/ui/jobs/abc-1")), "/ui/jobs/abc-1");
        assert_eq!(safe_next(Some("/ui/jobs?x=1")), "/ui/jobs?x=1");
        for bad in [
            "https://evil.example/ui/",
            "//evil.example/ui/",
            "/ui//evil.example",
            "/ui/\\evil",
            "/api/v1/users",
            "/ui/jobs\"><script>",
            "javascript:alert(1)",
        ] {
            assert_eq!(safe_next(Some(bad)), "/ui/jobs", "{bad}");
        }
        assert_eq!(safe_next(Some(&format!("/ui/{}", "a".repeat(600)))), "/ui/jobs");
        assert_eq!(safe_next(None), "/ui/jobs");
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, value.parse().unwrap());
        }
        headers
    }

    #[test]
    fn state_changes_must_come_from_this_origin() {
        let host = ("host", "127.0.0.1:8443");
        assert!(same_origin(&headers(&[host, ("origin", "https://127.0.0.1:8443")])).is_ok());
        assert!(
            same_origin(&headers(&[
                host,
                ("origin", "https://127.0.0.1:8443"),
                ("sec-fetch-site", "same-origin")
            ]))
            .is_ok()
        );
        assert!(
            same_origin(&headers(&[host, ("origin", "null"), ("sec-fetch-site", "same-origin")]))
                .is_ok()
        );
        for refused in [
            headers(&[host]),
            headers(&[host, ("origin", "null")]),
            headers(&[host, ("origin", "https://evil.example")]),
            headers(&[host, ("origin", "https://127.0.0.1:8443.evil.example")]),
            headers(&[
                host,
                ("origin", "https://127.0.0.1:8443"),
                ("sec-fetch-site", "cross-site"),
            ]),
            headers(&[host, ("origin", "https://127.0.0.1:8443"), ("sec-fetch-site", "same-site")]),
            headers(&[("origin", "https://127.0.0.1:8443")]),
            headers(&[host, ("origin", "https://evil.example"), ("sec-fetch-site", "same-origin")]),
        ] {
            assert!(same_origin(&refused).is_err(), "{refused:?}");
        }
    }

    #[test]
    fn model_links_name_every_final_model_and_the_latest_checkpoints() {
        let file = |group: Option<&str>, round: Option<u64>| ModelFile {
            group: group.map(str::to_owned),
            round,
            size: 1000,
        };
        let mut files: Vec<ModelFile> = (1..=20).map(|r| file(None, Some(r))).collect();
        files.push(file(None, None));
        files.push(file(Some("eu+us"), None));
        let links = model_links(&files);
        assert_eq!(links.len(), 2 + MAX_CHECKPOINTS_LINKED);
        assert_eq!(links[0], ("final model (1.0 kB)".to_owned(), String::new()));
        assert_eq!(links[1].1, "?group=eu%2Bus");
        assert_eq!(links[2].1, "?round=11");
        assert_eq!(links.last().unwrap().1, "?round=20");
    }
}
