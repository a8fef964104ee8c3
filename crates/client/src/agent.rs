//! Clients for the compute side: [`TaskClient`] (a worker's agent, authenticated with its task
//! key) and [`ComputeClient`] (a deployer, authenticated with its compute's API key).

use bytes::Bytes;
use reqwest::Method;

use fledge_types::{ComputeId, JobId, MetricRecord, TaskConfig, TaskId, TaskState};

use crate::dto::{
    ClaimedKey, DeploymentReport, DeploymentState, KeyClaim, LogLines, TaskJoin, TaskStatusUpdate,
};
use crate::error::Result;
use crate::http::{Transport, seg};

/// The agent's view of the API: one task, authenticated with that task's key.
#[derive(Clone, Debug)]
pub struct TaskClient {
    transport: Transport,
    task: TaskId,
}

impl TaskClient {
    /// A client for task `task` at the apiserver `endpoint`, authenticated with `key`.
    pub fn new(endpoint: &str, task: TaskId, key: &str) -> Result<Self> {
        Ok(Self { transport: Transport::new(endpoint, Some(key), "task key")?, task })
    }

    /// The same client trusting exactly `ca` for an `https://` endpoint.
    pub fn with_ca(mut self, ca: Option<&fledge_tls::Ca>) -> Result<Self> {
        self.transport = self.transport.with_ca(ca)?;
        Ok(self)
    }

    /// The task this client acts for.
    pub fn task_id(&self) -> &TaskId {
        &self.task
    }

    /// The base URL this client talks to.
    pub fn endpoint(&self) -> &str {
        self.transport.endpoint()
    }

    fn path(&self, rest: &str) -> String {
        format!("/api/v1/tasks/{}{rest}", seg(self.task.as_str()))
    }

    /// `GET /tasks/{taskId}`: the task and the notifier URL. An agent's first call: a wrong,
    /// revoked or dead key (its job ended) fails here (`Unauthenticated`).
    pub async fn join(&self) -> Result<TaskJoin> {
        self.transport.get_json(&self.path("")).await
    }

    /// `GET /tasks/{taskId}/config`: the task's manifest.
    pub async fn config(&self) -> Result<TaskConfig> {
        self.transport.get_json(&self.path("/config")).await
    }

    /// `GET /tasks/{taskId}/code`: a zip of the task's role folder (rooted at that folder).
    pub async fn code(&self) -> Result<Bytes> {
        let path = self.path("/code");
        let method = Method::GET;
        let response = self
            .transport
            .send(&method, &path, self.transport.request(method.clone(), &path))
            .await?;
        self.transport.bytes(response).await
    }

    /// `PUT /tasks/{taskId}/status`: reports the task's state and the tail of its log.
    pub async fn set_status(&self, state: TaskState, log: &str) -> Result<()> {
        let body = TaskStatusUpdate { state, log: log.to_owned() };
        self.transport.json_no_content(Method::PUT, &self.path("/status"), Some(&body)).await
    }

    /// `POST /tasks/{taskId}/log`: lines `offset..` of this agent run's output stream.
    pub async fn append_log(&self, stream: &str, offset: u64, lines: &[String]) -> Result<()> {
        let body = LogLines { stream: stream.to_owned(), offset, lines: lines.to_vec() };
        self.transport.json_no_content(Method::POST, &self.path("/log"), Some(&body)).await
    }

    /// `POST /tasks/{taskId}/heartbeat`: says the agent is alive.
    pub async fn heartbeat(&self) -> Result<()> {
        self.transport.json_no_content::<()>(Method::POST, &self.path("/heartbeat"), None).await
    }

    /// `POST /tasks/{taskId}/metrics`: per-round metrics of this task.
    pub async fn post_metrics(&self, records: &[MetricRecord]) -> Result<()> {
        self.transport.json_no_content(Method::POST, &self.path("/metrics"), Some(records)).await
    }
}

/// The deployer's view of the API: one compute, authenticated with its API key.
#[derive(Clone, Debug)]
pub struct ComputeClient {
    transport: Transport,
    compute: ComputeId,
}

impl ComputeClient {
    /// A client for compute `compute` at the apiserver `endpoint`, authenticated with `key`.
    pub fn new(endpoint: &str, compute: ComputeId, key: &str) -> Result<Self> {
        Ok(Self { transport: Transport::new(endpoint, Some(key), "compute key")?, compute })
    }

    /// The same client trusting exactly `ca` for an `https://` endpoint.
    pub fn with_ca(mut self, ca: Option<&fledge_tls::Ca>) -> Result<Self> {
        self.transport = self.transport.with_ca(ca)?;
        Ok(self)
    }

    /// The compute this client acts for.
    pub fn compute_id(&self) -> &ComputeId {
        &self.compute
    }

    /// `PUT /computes/{computeId}/tasks/{taskId}/deployment`: what happened to a task's worker.
    ///
    /// `Failed` marks the task failed with `message` as its log. `attempt` is the worker's
    /// (the task's restart count it was deployed for): reports of older attempts are ignored.
    pub async fn report_deployment(
        &self,
        job: &JobId,
        task: &TaskId,
        attempt: u32,
        state: DeploymentState,
        message: &str,
    ) -> Result<()> {
        let path = format!(
            "/api/v1/computes/{}/tasks/{}/deployment",
            seg(self.compute.as_str()),
            seg(task.as_str())
        );
        let body =
            DeploymentReport { job_id: job.clone(), state, message: message.to_owned(), attempt };
        self.transport.json_no_content(Method::PUT, &path, Some(&body)).await
    }

    /// `POST /computes/{computeId}/tasks/{taskId}/key`: the key of attempt `attempt` of task
    /// `task` (deploy events carry none). Answered once per attempt: a second claim is a 409
    /// `Conflict`, a task not on this compute a 404, a wrong compute key a 401.
    pub async fn claim_task_key(&self, job: &JobId, task: &TaskId, attempt: u32) -> Result<String> {
        let path = format!(
            "/api/v1/computes/{}/tasks/{}/key",
            seg(self.compute.as_str()),
            seg(task.as_str())
        );
        let body = KeyClaim { job_id: job.clone(), attempt };
        let claimed: ClaimedKey = self.transport.json(Method::POST, &path, &body).await?;
        Ok(claimed.key)
    }
}
