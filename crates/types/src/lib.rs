//! Fledge's domain model and wire DTOs: designs, schemas (TAG), datasets, computes, jobs, tasks,
//! their states, the task config a worker reads, and the REST error body.
//!
//! This crate does no I/O (but for the hidden `fuzzing::replay`, a test helper that reads the
//! committed fuzz corpora) and knows no runtime: no tokio, HTTP, gRPC or database. It is shared
//! by the control plane, the agent, the CLI and the data plane, so its JSON shapes are the
//! contracts between them. Field names follow Cisco Flame's (`camelCase`, ids as strings) so a
//! Flame user's `schema.json`, `job.json`, `dataSpec.json`, `modelSpec.json` and dataset files
//! load unchanged.
//!
//! Start reading at [`schema::Schema`] and [`job::JobSpec`] (what users submit), then
//! [`task_config::TaskConfig`] (what workers read).
//!
//! # From submission to tasks
//!
//! 1. [`json::from_slice`] parses a submitted document: keys beginning with `//` are comments
//!    (as in Flame's examples), and every unknown field is reported with its path and the
//!    fields expected there.
//! 2. [`validate::schema`] and [`validate::job`] return every problem at once, each with a path
//!    (`roles[1].groupAssociation[0].param-channel`); an empty list means valid.
//! 3. [`expand::expand`] turns a job into tasks. A data-consuming role gets one task per dataset
//!    listed for it, in the group association that contains the dataset's group label, on the
//!    compute whose `region` is the longest path-segment prefix of the dataset's `realm`
//!    (compute `default` when none matches). Every other role gets `replica` tasks (at least 1)
//!    per group association entry, on compute `default`. A channel without `groupBy` has the
//!    single group `default`. Tasks that would idle (an aggregator with no trainer in its
//!    group, or no path to any data) are errors. Task ids hash (job id, role, index, group
//!    association), so expanding the same job twice gives the same ids in the same order.
//! 4. [`task_config::build`] writes what one task's worker reads: its channels (whole), groups,
//!    model spec, dataset and the deployment's brokers and endpoints ([`TaskEnv`]).
//!
//! The golden cases under `tests/golden/` (one folder per topology: two-tier, hierarchical,
//! hybrid, vertical, ...) show realistic schemas and their expansions; `tests/invalid/` shows
//! the error report for each validation rule.

pub mod error;
pub mod expand;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod job;
pub mod json;
pub mod resources;
pub mod schema;
pub mod state;
pub mod task;
pub mod task_config;
pub mod validate;

pub use error::{ApiError, ErrorCode, ErrorDetail};
pub use ids::{ComputeId, DatasetId, DesignId, JobId, TaskId, UserId};
pub use job::{
    BaseModel, DUMMY_REGISTRY, DataSpecEntry, Job, JobSpec, MLFLOW_REGISTRY, ModelSpec, Priority,
    RegistrySpec, RestartOn, RestartPolicy, S3_REGISTRY, Sort, parse_s3_uri,
};
pub use resources::{
    Compute, ComputeSpec, Dataset, DatasetSpec, Design, DesignSpec, ModelFile, Platform, Token,
    User,
};
pub use schema::{Backend, ChannelSpec, DEFAULT_GROUP, GroupBy, Role, Schema};
pub use state::{JobState, TaskState};
pub use task::Task;
pub use task_config::{
    BrokerSpec, ControlPlaneRef, DataPlaneSecurity, DatasetRef, JobRef, MetricRecord,
    RegistryToken, TaskConfig, TaskEnv,
};
