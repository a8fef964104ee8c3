//! Fledge's domain model and wire DTOs: designs, schemas (TAG), datasets, computes, jobs, tasks,
//! their states, the task config a worker reads, and the REST error body.
//!
//! This crate does no I/O and knows no runtime: no tokio, HTTP, gRPC or database. It is shared
//! by the control plane, the agent, the CLI and the data plane, so its JSON shapes are the
//! contracts between them. Field names follow Cisco Flame's (`camelCase`, ids as strings) so a
//! Flame user's `schema.json`, `job.json`, `dataSpec.json`, `modelSpec.json` and dataset files
//! load unchanged.
//!
//! Start reading at [`schema::Schema`] and [`job::JobSpec`] (what users submit), then
//! [`task_config::TaskConfig`] (what workers read).

pub mod error;
pub mod expand;
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
pub use job::{BaseModel, DataSpecEntry, Job, JobSpec, ModelSpec, Priority, RegistrySpec, Sort};
pub use resources::{
    Compute, ComputeSpec, Dataset, DatasetSpec, Design, DesignSpec, Platform, User,
};
pub use schema::{Backend, ChannelSpec, DEFAULT_GROUP, GroupBy, Role, Schema};
pub use state::{JobState, TaskState};
pub use task::Task;
pub use task_config::{
    BrokerSpec, ControlPlaneRef, DatasetRef, JobRef, MetricRecord, TaskConfig, TaskEnv,
};
