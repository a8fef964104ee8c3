//! [`Client`]: the user-facing REST API (designs, schemas, code, datasets, jobs, computes, users).

use std::sync::Arc;

use bytes::Bytes;
use reqwest::{Method, header};
use tokio::sync::OnceCell;

use fledge_types::{
    Compute, ComputeId, ComputeSpec, Dataset, DatasetId, DatasetSpec, Design, DesignId, DesignSpec,
    Job, JobId, JobSpec, JobState, MetricRecord, ModelFile, Schema, Task, TaskId, Token, User,
    UserId,
};

use crate::dto::{
    CodeRevision, JobStateRequest, JobStatus, JoinInfo, MintedKey, NewToken, NewUser,
    SchemaRevision, ServerVersion, TaskLog, TokenRequest, VersionedSchema,
};
use crate::error::Result;
use crate::http::{Transport, seg};

/// Header carrying the revision of a latest schema or code answer.
pub const VERSION_HEADER: &str = "x-fledge-version";

/// A typed client for the REST API, authenticated with a user token.
///
/// Calls under `/users/{user}` use the token's user, found with `GET /whoami` on first use
/// (or set with [`Client::with_user`], which admins use to act on another user's resources).
/// Cloning is cheap and shares the connection pool.
#[derive(Clone, Debug)]
pub struct Client {
    transport: Transport,
    user: Arc<OnceCell<UserId>>,
}

impl Client {
    /// A client for the apiserver at `endpoint` (`http://host:port`) with a user token.
    ///
    /// No token means unauthenticated requests: only `/healthz` and the OpenAPI document work.
    pub fn new(endpoint: &str, token: Option<&str>) -> Result<Self> {
        Ok(Self {
            transport: Transport::new(endpoint, token, "token")?,
            user: Arc::new(OnceCell::new()),
        })
    }

    /// The same client trusting exactly `ca` for an `https://` endpoint (the system's roots
    /// when `None`).
    pub fn with_ca(mut self, ca: Option<&fledge_tls::Ca>) -> Result<Self> {
        self.transport = self.transport.with_ca(ca)?;
        Ok(self)
    }

    /// The same client acting on `user`'s resources instead of the token's user.
    pub fn with_user(mut self, user: UserId) -> Self {
        self.user = Arc::new(OnceCell::new_with(Some(user)));
        self
    }

    /// The base URL this client talks to.
    pub fn endpoint(&self) -> &str {
        self.transport.endpoint()
    }

    /// The user whose resources `/users/{user}/...` calls address.
    pub async fn user(&self) -> Result<UserId> {
        let user =
            self.user.get_or_try_init(|| async { self.whoami().await.map(|user| user.id) }).await?;
        Ok(user.clone())
    }

    async fn user_path(&self, rest: &str) -> Result<String> {
        Ok(format!("/api/v1/users/{}{rest}", seg(self.user().await?.as_str())))
    }

    /// `GET /healthz`: whether the apiserver answers.
    pub async fn health(&self) -> Result<()> {
        let method = Method::GET;
        let path = "/healthz";
        self.transport.send(&method, path, self.transport.request(method.clone(), path)).await?;
        Ok(())
    }

    /// `GET /api/v1/version`: the server's version and API version (no token needed).
    pub async fn server_version(&self) -> Result<ServerVersion> {
        self.transport.get_json("/api/v1/version").await
    }

    /// `GET /api/v1/openapi.json`: the OpenAPI document.
    pub async fn openapi(&self) -> Result<serde_json::Value> {
        self.transport.get_json("/api/v1/openapi.json").await
    }

    // ---- users and tokens ----

    /// `GET /whoami`: the token's user.
    pub async fn whoami(&self) -> Result<User> {
        self.transport.get_json("/api/v1/whoami").await
    }

    /// `POST /users` (admin): creates a user.
    pub async fn create_user(&self, id: &UserId, is_admin: bool) -> Result<User> {
        let body = NewUser { id: id.clone(), is_admin };
        self.transport.json(Method::POST, "/api/v1/users", &body).await
    }

    /// `GET /users` (admin): every user.
    pub async fn list_users(&self) -> Result<Vec<User>> {
        self.transport.get_json("/api/v1/users").await
    }

    /// `POST /users/{user}/tokens` (admin or self): a new token for `user`, shown once.
    pub async fn create_token(&self, user: &UserId) -> Result<String> {
        Ok(self.issue_token(user, &TokenRequest::default()).await?.token)
    }

    /// `POST /users/{user}/tokens` (admin or self) with a description and lifetime.
    pub async fn issue_token(&self, user: &UserId, request: &TokenRequest) -> Result<NewToken> {
        let path = format!("/api/v1/users/{}/tokens", seg(user.as_str()));
        self.transport.json(Method::POST, &path, request).await
    }

    /// `GET /users/{user}/tokens` (admin or self): ids, descriptions, expiry; never secrets.
    pub async fn list_tokens(&self, user: &UserId) -> Result<Vec<Token>> {
        let path = format!("/api/v1/users/{}/tokens", seg(user.as_str()));
        self.transport.get_json(&path).await
    }

    /// `DELETE /users/{user}/tokens/{tokenId}` (admin or self).
    pub async fn revoke_token(&self, user: &UserId, id: &str) -> Result<()> {
        let path = format!("/api/v1/users/{}/tokens/{}", seg(user.as_str()), seg(id));
        self.transport.json_no_content::<()>(Method::DELETE, &path, None).await
    }

    // ---- designs, schemas, code ----

    /// `POST /users/{user}/designs`.
    pub async fn create_design(&self, spec: &DesignSpec) -> Result<Design> {
        let path = self.user_path("/designs").await?;
        self.transport.json(Method::POST, &path, spec).await
    }

    /// `GET /users/{user}/designs`.
    pub async fn list_designs(&self) -> Result<Vec<Design>> {
        let path = self.user_path("/designs").await?;
        self.transport.get_json(&path).await
    }

    /// `GET /users/{user}/designs/{designId}`.
    pub async fn get_design(&self, design: &DesignId) -> Result<Design> {
        let path = self.design_path(design, "").await?;
        self.transport.get_json(&path).await
    }

    /// `DELETE /users/{user}/designs/{designId}`.
    pub async fn delete_design(&self, design: &DesignId) -> Result<()> {
        let path = self.design_path(design, "").await?;
        self.transport.json_no_content::<()>(Method::DELETE, &path, None).await
    }

    /// `POST /users/{user}/designs/{designId}/schemas`: stores a new schema revision.
    pub async fn create_schema(&self, design: &DesignId, schema: &Schema) -> Result<String> {
        let path = self.design_path(design, "/schemas").await?;
        let answer: SchemaRevision = self.transport.json(Method::POST, &path, schema).await?;
        Ok(answer.version)
    }

    /// `GET /users/{user}/designs/{designId}/schema`: the latest schema and its revision.
    pub async fn get_schema(&self, design: &DesignId) -> Result<VersionedSchema> {
        let path = self.design_path(design, "/schema").await?;
        let method = Method::GET;
        let response = self
            .transport
            .send(&method, &path, self.transport.request(method.clone(), &path))
            .await?;
        let version = header_version(response.headers());
        let schema = self.transport.decode(&method, &path, response).await?;
        Ok(VersionedSchema { version, schema })
    }

    /// `GET /users/{user}/designs/{designId}/schemas/{version}`.
    pub async fn get_schema_version(&self, design: &DesignId, version: &str) -> Result<Schema> {
        let path = self.design_path(design, &format!("/schemas/{}", seg(version))).await?;
        self.transport.get_json(&path).await
    }

    /// `POST /users/{user}/designs/{designId}/codes`: uploads a zip (one folder per role).
    pub async fn upload_code(&self, design: &DesignId, zip: Bytes) -> Result<CodeRevision> {
        let path = self.design_path(design, "/codes").await?;
        let method = Method::POST;
        let builder = self
            .transport
            .request(method.clone(), &path)
            .header(header::CONTENT_TYPE, "application/zip")
            .body(zip);
        let response = self.transport.send(&method, &path, builder).await?;
        self.transport.decode(&method, &path, response).await
    }

    /// `GET /users/{user}/designs/{designId}/code`: the latest zip and its revision.
    pub async fn get_code(&self, design: &DesignId) -> Result<(Option<String>, Bytes)> {
        let path = self.design_path(design, "/code").await?;
        self.download(&path).await
    }

    /// `GET /users/{user}/designs/{designId}/codes/{version}`: that zip.
    pub async fn get_code_version(&self, design: &DesignId, version: &str) -> Result<Bytes> {
        let path = self.design_path(design, &format!("/codes/{}", seg(version))).await?;
        Ok(self.download(&path).await?.1)
    }

    async fn download(&self, path: &str) -> Result<(Option<String>, Bytes)> {
        let method = Method::GET;
        let response = self
            .transport
            .send(&method, path, self.transport.request(method.clone(), path))
            .await?;
        let version = header_version(response.headers());
        Ok((version, self.transport.bytes(response).await?))
    }

    async fn design_path(&self, design: &DesignId, rest: &str) -> Result<String> {
        self.user_path(&format!("/designs/{}{rest}", seg(design.as_str()))).await
    }

    // ---- datasets ----

    /// `POST /users/{user}/datasets`.
    pub async fn create_dataset(&self, spec: &DatasetSpec) -> Result<Dataset> {
        let path = self.user_path("/datasets").await?;
        self.transport.json(Method::POST, &path, spec).await
    }

    /// `GET /users/{user}/datasets`: own and public datasets.
    pub async fn list_datasets(&self) -> Result<Vec<Dataset>> {
        let path = self.user_path("/datasets").await?;
        self.transport.get_json(&path).await
    }

    /// `GET /users/{user}/datasets/{datasetId}`.
    pub async fn get_dataset(&self, dataset: &DatasetId) -> Result<Dataset> {
        let path = self.user_path(&format!("/datasets/{}", seg(dataset.as_str()))).await?;
        self.transport.get_json(&path).await
    }

    /// `DELETE /users/{user}/datasets/{datasetId}`.
    pub async fn delete_dataset(&self, dataset: &DatasetId) -> Result<()> {
        let path = self.user_path(&format!("/datasets/{}", seg(dataset.as_str()))).await?;
        self.transport.json_no_content::<()>(Method::DELETE, &path, None).await
    }

    // ---- jobs ----

    /// `POST /users/{user}/jobs/plan`: the tasks the job would expand to; stores nothing.
    pub async fn plan_job(&self, spec: &JobSpec) -> Result<Vec<Task>> {
        let path = self.user_path("/jobs/plan").await?;
        self.transport.json(Method::POST, &path, spec).await
    }

    /// `POST /users/{user}/jobs`: creates a job in state `ready`.
    pub async fn create_job(&self, spec: &JobSpec) -> Result<Job> {
        let path = self.user_path("/jobs").await?;
        self.transport.json(Method::POST, &path, spec).await
    }

    /// `GET /users/{user}/jobs`, optionally only those in `state`.
    pub async fn list_jobs(&self, state: Option<JobState>) -> Result<Vec<Job>> {
        let mut path = self.user_path("/jobs").await?;
        if let Some(state) = state {
            path.push_str("?state=");
            path.push_str(state.as_str());
        }
        self.transport.get_json(&path).await
    }

    /// `GET /users/{user}/jobs/{jobId}`.
    pub async fn get_job(&self, job: &JobId) -> Result<Job> {
        let path = self.job_path(job, "").await?;
        self.transport.get_json(&path).await
    }

    /// `PUT /users/{user}/jobs/{jobId}`: replaces the spec of a `ready` job.
    pub async fn update_job(&self, job: &JobId, spec: &JobSpec) -> Result<Job> {
        let path = self.job_path(job, "").await?;
        self.transport.json(Method::PUT, &path, spec).await
    }

    /// `DELETE /users/{user}/jobs/{jobId}`.
    pub async fn delete_job(&self, job: &JobId) -> Result<()> {
        let path = self.job_path(job, "").await?;
        self.transport.json_no_content::<()>(Method::DELETE, &path, None).await
    }

    /// Starts a job (`PUT .../status {"state": "starting"}`).
    pub async fn start_job(&self, job: &JobId) -> Result<Job> {
        self.set_job_state(job, JobState::Starting).await
    }

    /// Stops a job (`PUT .../status {"state": "stopping"}`).
    pub async fn stop_job(&self, job: &JobId) -> Result<Job> {
        self.set_job_state(job, JobState::Stopping).await
    }

    async fn set_job_state(&self, job: &JobId, state: JobState) -> Result<Job> {
        let path = self.job_path(job, "/status").await?;
        self.transport.json(Method::PUT, &path, &JobStateRequest { state }).await
    }

    /// `GET /users/{user}/jobs/{jobId}/status`: state, reason and task counts.
    pub async fn job_status(&self, job: &JobId) -> Result<JobStatus> {
        let path = self.job_path(job, "/status").await?;
        self.transport.get_json(&path).await
    }

    /// `GET /users/{user}/jobs/{jobId}/tasks`.
    pub async fn list_tasks(&self, job: &JobId) -> Result<Vec<Task>> {
        let path = self.job_path(job, "/tasks").await?;
        self.transport.get_json(&path).await
    }

    /// `GET /users/{user}/jobs/{jobId}/tasks/{taskId}` (with the log tail).
    pub async fn get_task(&self, job: &JobId, task: &TaskId) -> Result<Task> {
        let path = self.job_path(job, &format!("/tasks/{}", seg(task.as_str()))).await?;
        self.transport.get_json(&path).await
    }

    /// `GET /users/{user}/jobs/{jobId}/tasks/{taskId}/log?since=N`: the task's log lines from
    /// number `since` on.
    pub async fn task_log(&self, job: &JobId, task: &TaskId, since: u64) -> Result<TaskLog> {
        let path =
            self.job_path(job, &format!("/tasks/{}/log?since={since}", seg(task.as_str()))).await?;
        self.transport.get_json(&path).await
    }

    /// `GET /users/{user}/jobs/{jobId}/join`: the participant-run tasks and the endpoints
    /// their data owners' agents join.
    pub async fn join_info(&self, job: &JobId) -> Result<JoinInfo> {
        let path = self.job_path(job, "/join").await?;
        self.transport.get_json(&path).await
    }

    /// `POST /users/{user}/jobs/{jobId}/tasks/{taskId}/key`: mints (or re-mints, replacing
    /// the old one) a participant-run task's key, shown once.
    pub async fn mint_task_key(&self, job: &JobId, task: &TaskId) -> Result<MintedKey> {
        let path = self.job_path(job, &format!("/tasks/{}/key", seg(task.as_str()))).await?;
        self.transport.json(Method::POST, &path, &serde_json::json!({})).await
    }

    /// `DELETE /users/{user}/jobs/{jobId}/tasks/{taskId}/key`: revokes a participant-run task's
    /// key.
    pub async fn revoke_task_key(&self, job: &JobId, task: &TaskId) -> Result<()> {
        let path = self.job_path(job, &format!("/tasks/{}/key", seg(task.as_str()))).await?;
        self.transport.json_no_content::<()>(Method::DELETE, &path, None).await
    }

    /// `GET /users/{user}/jobs/{jobId}/metrics`.
    pub async fn job_metrics(&self, job: &JobId) -> Result<Vec<MetricRecord>> {
        let path = self.job_path(job, "/metrics").await?;
        self.transport.get_json(&path).await
    }

    /// `GET /users/{user}/jobs/{jobId}/models`: the job's model files in the platform's
    /// registry, its MLflow server or its S3 bucket (per round and final, per group).
    pub async fn list_models(&self, job: &JobId) -> Result<Vec<ModelFile>> {
        let path = self.job_path(job, "/models").await?;
        self.transport.get_json(&path).await
    }

    /// `GET /users/{user}/jobs/{jobId}/model[?round=R][&group=G]`: one model file's
    /// safetensors bytes (the final model when `round` is `None`).
    pub async fn get_model(
        &self,
        job: &JobId,
        round: Option<u64>,
        group: Option<&str>,
    ) -> Result<Bytes> {
        let mut query = Vec::new();
        if let Some(round) = round {
            query.push(format!("round={round}"));
        }
        if let Some(group) = group {
            query.push(format!("group={}", seg(group)));
        }
        let rest = if query.is_empty() {
            "/model".to_owned()
        } else {
            format!("/model?{}", query.join("&"))
        };
        let path = self.job_path(job, &rest).await?;
        Ok(self.download(&path).await?.1)
    }

    async fn job_path(&self, job: &JobId, rest: &str) -> Result<String> {
        self.user_path(&format!("/jobs/{}{rest}", seg(job.as_str()))).await
    }

    // ---- computes (admin) ----

    /// `POST /computes` (admin): registers a compute with its API key.
    pub async fn create_compute(&self, spec: &ComputeSpec) -> Result<Compute> {
        // `ComputeSpec` never serializes its key (it is a secret), so send it explicitly.
        let body = serde_json::json!({
            "computeId": spec.compute_id,
            "region": spec.region,
            "apiKey": spec.api_key,
            "platform": spec.platform,
        });
        self.transport.json(Method::POST, "/api/v1/computes", &body).await
    }

    /// `GET /computes` (admin).
    pub async fn list_computes(&self) -> Result<Vec<Compute>> {
        self.transport.get_json("/api/v1/computes").await
    }

    /// `GET /computes/{computeId}` (admin).
    pub async fn get_compute(&self, compute: &ComputeId) -> Result<Compute> {
        let path = format!("/api/v1/computes/{}", seg(compute.as_str()));
        self.transport.get_json(&path).await
    }

    /// `DELETE /computes/{computeId}` (admin).
    pub async fn delete_compute(&self, compute: &ComputeId) -> Result<()> {
        let path = format!("/api/v1/computes/{}", seg(compute.as_str()));
        self.transport.json_no_content::<()>(Method::DELETE, &path, None).await
    }
}

fn header_version(headers: &header::HeaderMap) -> Option<String> {
    headers.get(VERSION_HEADER).and_then(|value| value.to_str().ok()).map(str::to_owned)
}
