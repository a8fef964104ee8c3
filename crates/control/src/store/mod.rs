//! The store: every piece of control-plane state, behind one trait.
//!
//! Implementations: SQLite (embedded default) and PostgreSQL, plus code bundles in a
//! [`BlobStore`] (a directory by default) so a bundle's size is bounded by configuration, not by
//! a row limit. One behavioural suite (`store::suite::run`) runs against every implementation.
//!
//! Invariants every implementation keeps:
//! - every write is atomic: a failed call changes nothing;
//! - ownership is enforced by the caller (the apiserver) through `owner` arguments: a lookup with
//!   the wrong owner is `NotFound`, never a leak;
//! - state changes go through compare-and-set ([`Store::set_job_state`]) so the controller and
//!   the apiserver never overwrite each other's transitions.

use std::collections::{BTreeSet, HashMap};

use async_trait::async_trait;
use fledge_types::ErrorCode;
use fledge_types::{
    Compute, ComputeId, ComputeSpec, Dataset, DatasetId, DatasetSpec, Design, DesignId, DesignSpec,
    Job, JobId, JobSpec, JobState, MetricRecord, Schema, Task, TaskId, TaskState, Token, User,
    UserId,
};

mod blob;
mod postgres;
mod sql;
mod sqlite;
#[cfg(test)]
mod suite;

pub use blob::{BlobStore, DEFAULT_MAX_BYTES};
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such resource (or not the caller's).
    #[error("{kind} {id} not found")]
    NotFound {
        /// Resource kind (`job`, `design`, ...).
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// The resource exists already.
    #[error("{kind} {id} already exists")]
    AlreadyExists {
        /// Resource kind.
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// A compare-and-set saw another state.
    #[error("{kind} {id} is {actual}, expected {expected}")]
    Conflict {
        /// Resource kind.
        kind: &'static str,
        /// Its id.
        id: String,
        /// The state the caller expected.
        expected: String,
        /// The state found.
        actual: String,
    },
    /// The resource is still referenced (e.g. a design with jobs).
    #[error("{kind} {id} is in use: {reason}")]
    InUse {
        /// Resource kind.
        kind: &'static str,
        /// Its id.
        id: String,
        /// By what.
        reason: String,
    },
    /// A code bundle is larger than the configured limit.
    #[error("code bundle of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Bundle size in bytes.
        size: u64,
        /// Configured limit in bytes.
        limit: u64,
    },
    /// Storing these metric records would pass a task's bound; nothing was stored.
    #[error(
        "task {task} has stored {stored} metric records; with these {adding} it would pass its \
         limit of {limit}"
    )]
    MetricLimit {
        /// The task.
        task: String,
        /// Records it has stored.
        stored: u64,
        /// Records the request would add (those not stored already).
        adding: u64,
        /// The bound.
        limit: u64,
    },
    /// The database failed.
    #[error("database error")]
    Database(#[source] anyhow::Error),
    /// The blob store failed.
    #[error("blob store error")]
    Blob(#[source] std::io::Error),
}

impl Error {
    /// The service-edge class of this error (mapped to HTTP status in `api` only).
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::NotFound { .. } => ErrorCode::NotFound,
            Error::AlreadyExists { .. } => ErrorCode::AlreadyExists,
            Error::Conflict { .. } | Error::InUse { .. } => ErrorCode::Conflict,
            Error::TooLarge { .. } | Error::MetricLimit { .. } => ErrorCode::PayloadTooLarge,
            Error::Database(_) | Error::Blob(_) => ErrorCode::Internal,
        }
    }
}

/// Result of store calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A stored code bundle's metadata (the bytes live in the blob store).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeMeta {
    /// Revision (`"1"`, `"2"`, ...).
    pub version: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the zip, hex.
    pub sha256: String,
}

/// A task as the controller creates it: the public record plus the hash of its key.
#[derive(Clone, Debug, PartialEq)]
pub struct NewTask {
    /// The record (state `ready`).
    pub task: Task,
    /// SHA-256 (hex) of the key of a platform-run task. The plain key is never stored: the
    /// controller derives it again whenever it deploys the task. A participant-run task accepts
    /// only the key its job's owner mints ([`Store::set_participant_key`]), never this one.
    pub key_sha256: String,
}

/// How many jobs and tasks are in each state, over the whole store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateCounts {
    /// Jobs by state.
    pub jobs: HashMap<JobState, u64>,
    /// Tasks (of every job) by state.
    pub tasks: HashMap<TaskState, u64>,
}

/// Filter for job listings.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    /// Only this owner's jobs (`None`: everyone's, for admins and the controller).
    pub owner: Option<UserId>,
    /// Only jobs in these states (empty: all).
    pub states: Vec<JobState>,
}

/// All control-plane state.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The largest code bundle [`Store::put_code`] accepts, in bytes.
    fn max_code_bytes(&self) -> u64;

    // Users and tokens.
    /// Creates a user.
    async fn create_user(&self, user: &User) -> Result<()>;
    /// Looks a user up.
    async fn get_user(&self, id: &UserId) -> Result<User>;
    /// Lists users.
    async fn list_users(&self) -> Result<Vec<User>>;
    /// Stores a token's SHA-256 hash for a user, with a description and an optional expiry;
    /// returns the token as listed (with a fresh public id).
    async fn add_token(
        &self,
        user: &UserId,
        token_sha256: &str,
        description: &str,
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<Token>;
    /// The user a token hash belongs to; `NotFound` for an unknown, revoked or expired token.
    async fn user_by_token(&self, token_sha256: &str) -> Result<User>;
    /// The tokens of `user` (`None`: everyone's), oldest first, expired ones included.
    async fn list_tokens(&self, user: Option<&UserId>) -> Result<Vec<Token>>;
    /// Revokes (deletes) token `id` of `user` (`None`: any user's); `NotFound` otherwise.
    async fn revoke_token(&self, user: Option<&UserId>, id: &str) -> Result<()>;

    // Designs, schemas, code.
    /// Creates a design owned by `owner`.
    async fn create_design(&self, owner: &UserId, spec: &DesignSpec) -> Result<Design>;
    /// Gets a design of `owner` (`None`: any owner; design ids are unique per owner, so when
    /// several owners use the id, the first owner in name order wins: callers that know the
    /// owner, such as the controller with `job.owner`, should pass it).
    async fn get_design(&self, owner: Option<&UserId>, id: &DesignId) -> Result<Design>;
    /// Lists designs (`None`: all).
    async fn list_designs(&self, owner: Option<&UserId>) -> Result<Vec<Design>>;
    /// Deletes a design, its schemas and code; `InUse` while a non-final job uses it.
    async fn delete_design(&self, owner: Option<&UserId>, id: &DesignId) -> Result<()>;
    /// Stores a new schema revision; returns its version.
    async fn put_schema(
        &self,
        owner: Option<&UserId>,
        design: &DesignId,
        schema: &Schema,
    ) -> Result<String>;
    /// A schema revision (`None`: latest) and its version.
    async fn get_schema(
        &self,
        owner: Option<&UserId>,
        design: &DesignId,
        version: Option<&str>,
    ) -> Result<(String, Schema)>;
    /// Stores a new code revision (a zip); `TooLarge` past the configured limit.
    async fn put_code(
        &self,
        owner: Option<&UserId>,
        design: &DesignId,
        zip: &[u8],
    ) -> Result<CodeMeta>;
    /// A code revision (`None`: latest): metadata and bytes.
    async fn get_code(
        &self,
        owner: Option<&UserId>,
        design: &DesignId,
        version: Option<&str>,
    ) -> Result<(CodeMeta, Vec<u8>)>;

    // Datasets.
    /// Registers a dataset.
    async fn create_dataset(&self, owner: &UserId, spec: &DatasetSpec) -> Result<Dataset>;
    /// Gets a dataset the owner may use (own or public; `None`: any).
    async fn get_dataset(&self, owner: Option<&UserId>, id: &DatasetId) -> Result<Dataset>;
    /// Lists datasets visible to `owner` (own + public; `None`: all).
    async fn list_datasets(&self, owner: Option<&UserId>) -> Result<Vec<Dataset>>;
    /// Deletes an own dataset; `InUse` while a non-final job uses it.
    async fn delete_dataset(&self, owner: Option<&UserId>, id: &DatasetId) -> Result<()>;

    // Computes.
    /// Registers a compute (its API key is stored hashed).
    async fn create_compute(&self, spec: &ComputeSpec) -> Result<Compute>;
    /// Gets a compute.
    async fn get_compute(&self, id: &ComputeId) -> Result<Compute>;
    /// Lists computes.
    async fn list_computes(&self) -> Result<Vec<Compute>>;
    /// Deletes a compute.
    async fn delete_compute(&self, id: &ComputeId) -> Result<()>;
    /// Replaces a compute's API key (stored hashed); its tasks and jobs are untouched.
    async fn set_compute_key(&self, id: &ComputeId, api_key: &str) -> Result<()>;
    /// Checks a compute's API key hash; `NotFound` when it does not match.
    async fn verify_compute_key(&self, id: &ComputeId, key_sha256: &str) -> Result<()>;

    // Jobs.
    /// Stores a validated job in state `ready`.
    async fn create_job(
        &self,
        owner: &UserId,
        spec: &JobSpec,
        schema_version: &str,
        code_version: &str,
    ) -> Result<Job>;
    /// Gets a job (`None`: any owner).
    async fn get_job(&self, owner: Option<&UserId>, id: &JobId) -> Result<Job>;
    /// Lists jobs.
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>>;
    /// Replaces a `ready` job's spec and the revisions it resolved to; `Conflict` in any other
    /// state.
    async fn update_job_spec(
        &self,
        owner: Option<&UserId>,
        id: &JobId,
        spec: &JobSpec,
        schema_version: &str,
        code_version: &str,
    ) -> Result<Job>;
    /// Deletes a job in a final state or `ready` with its tasks and metrics; `Conflict` otherwise.
    async fn delete_job(&self, owner: Option<&UserId>, id: &JobId) -> Result<()>;
    /// Compare-and-set of a job's state: succeeds only if the state is one of `from`.
    /// Sets `reason`, `started_at` (entering `starting`) and `ended_at` (entering a final state).
    async fn set_job_state(
        &self,
        id: &JobId,
        from: &[JobState],
        to: JobState,
        reason: Option<&str>,
    ) -> Result<Job>;
    /// Records why a job in `state` waits, leaving its state and `updated_at` alone (the
    /// controller's timers count from the last state change); `Conflict` in another state.
    async fn set_job_reason(&self, id: &JobId, state: JobState, reason: &str) -> Result<()>;

    // Tasks.
    /// Inserts a job's tasks; re-inserting the same ids is a no-op (expansion is deterministic).
    async fn insert_tasks(&self, tasks: &[NewTask]) -> Result<()>;
    /// A job's tasks in expansion order.
    async fn list_tasks(&self, job: &JobId) -> Result<Vec<Task>>;
    /// How many tasks of a job are in each state (states without tasks are absent).
    async fn count_tasks(&self, job: &JobId) -> Result<HashMap<TaskState, u64>>;
    /// One task.
    async fn get_task(&self, job: &JobId, task: &TaskId) -> Result<Task>;
    /// How many jobs, and tasks of all jobs, are in each state (states without any are
    /// absent): the operator's gauges.
    async fn state_counts(&self) -> Result<StateCounts>;
    /// Finds a task by id alone and checks its key hash (a platform-run task's key, or the key
    /// minted for a participant-run task); `NotFound` when either is wrong or the task's job is
    /// in a final state (a task key dies with its job).
    async fn task_by_key(&self, task: &TaskId, key_sha256: &str) -> Result<Task>;
    /// Sets a task's state and log tail if the transition is legal; returns the task.
    async fn set_task_state(
        &self,
        job: &JobId,
        task: &TaskId,
        state: TaskState,
        log: Option<&str>,
    ) -> Result<Task>;
    /// Puts a `failed` task that has had `restarts` restarts back to `ready` for its next
    /// worker: the count goes up by one, `log` becomes its log tail and its heartbeat is
    /// cleared. `Conflict` when the task is no longer `failed` with that count (another
    /// controller pass restarted it, or it changed meanwhile).
    async fn restart_task(
        &self,
        job: &JobId,
        task: &TaskId,
        restarts: u32,
        log: &str,
    ) -> Result<Task>;
    /// Records that the key of platform-run task `task`'s attempt `attempt` was handed out
    /// (a deployer claims it once per attempt). A compare-and-set: it succeeds only if the
    /// task's job has not ended, `attempt` is the task's current restart count and that
    /// attempt's key was not claimed before, so two claims cannot both win. `NotFound` for an
    /// unknown task, `Conflict` (saying why) otherwise.
    async fn claim_task_key(&self, job: &JobId, task: &TaskId, attempt: u32) -> Result<()>;
    /// Records a heartbeat from a task's agent (sets `Task::last_heartbeat` to now).
    async fn record_heartbeat(&self, task: &TaskId) -> Result<()>;
    /// Sets (`Some`: mints or re-mints, replacing any previous key) or revokes (`None`) the key
    /// hash of participant-run task `task` of `job`. `NotFound` for an unknown task, `Conflict`
    /// for a platform-run task or a job in a final state.
    async fn set_participant_key(
        &self,
        job: &JobId,
        task: &TaskId,
        key_sha256: Option<&str>,
    ) -> Result<()>;
    /// The participant-run tasks of `job` that have a key.
    async fn participant_keys(&self, job: &JobId) -> Result<BTreeSet<TaskId>>;

    // Metrics.
    /// Appends metric records of a job; a record already stored (same task, round and
    /// timestamp: a restarted task re-sends its recent records) is skipped. Returns the indices
    /// in `records` of those newly stored. When a task would then hold more than
    /// `max_per_task` records, nothing is stored and the error is `MetricLimit`; the count and
    /// the insert are one transaction under the task's lock, so concurrent requests cannot
    /// pass the bound together.
    async fn add_metrics(
        &self,
        job: &JobId,
        records: &[MetricRecord],
        max_per_task: u64,
    ) -> Result<Vec<usize>>;
    /// How many metric records task `task` of `job` has stored.
    async fn count_metrics(&self, job: &JobId, task: &TaskId) -> Result<u64>;
    /// A job's metric records in insertion order.
    async fn list_metrics(&self, job: &JobId) -> Result<Vec<MetricRecord>>;
    /// The highest round any task of `job` recorded metrics for (`None`: no record yet), without
    /// reading the records: the dashboard's progress of many jobs at once.
    async fn latest_round(&self, job: &JobId) -> Result<Option<u64>>;
}
