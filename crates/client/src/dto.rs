//! Small request/response bodies of the REST contract (`docs/api.md`) that are not resources
//! and therefore not in `fledge-types`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use fledge_types::{JobId, JobState, TaskId, TaskState, UserId};

/// Answer to a schema upload: the revision it became.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SchemaRevision {
    /// The new revision (`"1"`, `"2"`, ...).
    pub version: String,
}

/// Answer to a code upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CodeRevision {
    /// The new revision.
    pub version: String,
    /// Size of the zip in bytes.
    pub size: u64,
    /// Hex SHA-256 of the zip.
    pub sha256: String,
}

/// The latest schema of a design with its revision.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionedSchema {
    /// The revision, from the `x-fledge-version` header (absent if the server did not send it).
    pub version: Option<String>,
    /// The schema.
    pub schema: fledge_types::Schema,
}

/// Answer of `GET /api/v1/version`: what the server runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerVersion {
    /// The server's release (its crate version, e.g. `0.1.0`).
    pub version: String,
    /// The REST API version it serves (`v1`).
    pub api_version: String,
}

/// Body of `PUT /users/{user}/jobs/{jobId}/status`: start or stop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobStateRequest {
    /// `starting` (start) or `stopping` (stop).
    pub state: JobState,
}

/// Answer of `GET /users/{user}/jobs/{jobId}/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    /// The job's state.
    pub state: JobState,
    /// Why it is in that state, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Task state (`running`, ...) → number of tasks in it.
    #[serde(default)]
    pub tasks: BTreeMap<String, u64>,
}

/// Body of `POST /users`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewUser {
    /// Login name.
    pub id: UserId,
    /// Whether the user is an admin.
    #[serde(default)]
    pub is_admin: bool,
}

/// Answer of `POST /users/{user}/tokens`: the plain token, shown once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NewToken {
    /// The bearer token (shown once: only its hash is stored).
    pub token: String,
    /// Its public id, to revoke it by.
    #[serde(default)]
    pub id: String,
    /// When it expires, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Body of `POST /users/{user}/tokens`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequest {
    /// What the token is for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Lifetime in seconds (`None`: never expires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// Answer of `POST /users/{user}/jobs/{jobId}/tasks/{taskId}/key`: a participant-run task's
/// key, shown once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MintedKey {
    /// The task.
    pub task_id: TaskId,
    /// Its key.
    pub key: String,
}

/// Body of `PUT /tasks/{taskId}/status` (agent).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskStatusUpdate {
    /// The task's new state.
    pub state: TaskState,
    /// Tail of the task's log.
    #[serde(default)]
    pub log: String,
}

/// Body of `POST /tasks/{taskId}/log`: lines of a task's output as its agent streams them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogLines {
    /// Chosen by the agent for each of its runs (1 to 64 characters).
    pub stream: String,
    /// The number of the first line in this stream.
    pub offset: u64,
    /// The lines, without their newlines.
    pub lines: Vec<String>,
}

/// Answer of `GET /users/{user}/jobs/{jobId}/tasks/{taskId}/log?since=N`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskLog {
    /// The number of the oldest line the server still holds: lines `since..first` are gone.
    pub first: u64,
    /// The number after the last line returned: the next read's `since`.
    pub next: u64,
    /// The lines, without their newlines.
    pub lines: Vec<String>,
    /// The task's state when the lines were read; once final, no line follows.
    pub state: TaskState,
    /// Whether these are the streamed lines (else the tail the task reported with its state).
    pub streamed: bool,
}

/// What a deployer reports about one task's worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentState {
    /// The worker was created.
    Deployed,
    /// The worker could not be created; the task is marked failed.
    Failed,
    /// The worker was removed.
    Revoked,
}

/// Body of `PUT /computes/{computeId}/tasks/{taskId}/deployment` (deployer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentReport {
    /// The task's job.
    pub job_id: JobId,
    /// What happened.
    pub state: DeploymentState,
    /// Details (the error when `failed`).
    #[serde(default)]
    pub message: String,
    /// The worker's attempt (the task's restart count it was deployed for).
    #[serde(default)]
    pub attempt: u32,
}

/// Body of `POST /computes/{computeId}/tasks/{taskId}/key` (deployer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyClaim {
    /// The task's job.
    pub job_id: JobId,
    /// The attempt the worker is deployed for.
    pub attempt: u32,
}

/// Answer of `POST /computes/{computeId}/tasks/{taskId}/key`: a task attempt's key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimedKey {
    /// The task.
    pub task_id: TaskId,
    /// The attempt it was claimed for.
    pub attempt: u32,
    /// The task key.
    pub key: String,
}

impl std::fmt::Debug for ClaimedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedKey")
            .field("task_id", &self.task_id)
            .field("attempt", &self.attempt)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Answer of `GET /tasks/{taskId}` (task key): what an agent learns when it joins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskJoin {
    /// The task: its job, role, state, and whether the platform manages it.
    pub task: fledge_types::Task,
    /// The notifier URL to subscribe to, if the apiserver knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifier: Option<String>,
}

/// Answer of `GET /users/{user}/jobs/{jobId}/join`: what the data owners of a job's
/// participant-run tasks need to start their agents.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinInfo {
    /// The apiserver URL agents use, if the apiserver knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apiserver: Option<String>,
    /// The notifier URL agents use, if the apiserver knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifier: Option<String>,
    /// The fingerprint of the CA agents trust (`sha256:...`), when the apiserver serves TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_fingerprint: Option<String>,
    /// The participant-run tasks, in expansion order (empty until the job is expanded).
    #[serde(default)]
    pub tasks: Vec<fledge_types::Task>,
    /// The participant-run tasks that have a key minted.
    #[serde(default)]
    pub keyed: Vec<TaskId>,
}
