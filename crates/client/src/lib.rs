//! Fledge's typed async client: the REST API (`docs/api.md`) and the notifier streams.
//!
//! - [`Client`]: everything a user does (designs, schemas, code, datasets, jobs, computes,
//!   users), authenticated with a user token. `fledgectl` is a thin layer over it.
//! - [`TaskClient`]: a worker agent's calls for its one task (config, code, status, heartbeat,
//!   metrics), authenticated with the task key.
//! - [`ComputeClient`]: a deployer's deployment reports, authenticated with the compute key.
//! - [`notifier`]: subscriptions to the notifier's gRPC streams that reconnect with backoff and
//!   drop repeated events.
//! - [`config`]: where the endpoint, token and CA come from (`~/.fledge/config.yaml`, env,
//!   flags); [`trust`]: fetching a control plane's CA checked against its fingerprint.
//!
//! An `https://` control plane is trusted through exactly the configured CA
//! (`with_ca`), or the system's roots when none is configured.
//!
//! Every call returns [`Error`]: the server's `ApiError` (with every detail) for API errors,
//! the endpoint for connection failures, and the request for undecodable answers.
//! This crate does not retry REST calls; callers decide.
//!
//! ```no_run
//! # async fn demo() -> fledge_client::Result<()> {
//! let client = fledge_client::Client::new("http://127.0.0.1:10100", Some("token"))?;
//! for job in client.list_jobs(None).await? {
//!     println!("{} {}", job.id, job.state);
//! }
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

mod agent;
pub mod config;
pub mod dto;
mod error;
mod http;
pub mod notifier;
mod rest;
pub mod trust;

pub use agent::{ComputeClient, TaskClient};
pub use config::ClientConfig;
pub use dto::{
    ClaimedKey, CodeRevision, DeploymentReport, DeploymentState, JobStatus, JoinInfo, KeyClaim,
    LogLines, MintedKey, NewToken, SchemaRevision, ServerVersion, TaskJoin, TaskLog,
    TaskStatusUpdate, TokenRequest, VersionedSchema,
};
pub use error::{Error, Result};
pub use fledge_tls::{Ca, Fingerprint};
pub use notifier::{Backoff, Reconnect, subscribe_compute, subscribe_task};
pub use rest::{Client, VERSION_HEADER};
pub use trust::fetch_ca;
