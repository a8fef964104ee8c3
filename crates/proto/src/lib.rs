//! Fledge's protobuf contracts and their tonic client/server code.
//!
//! The `.proto` files under `proto/` are compiled at build time with `protox` (a pure-Rust
//! protobuf compiler), so building needs no system `protoc`. This is the only crate that exposes
//! prost types; others convert at their edge.

/// Version 1 of the `fledge` protobuf package.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("fledge.v1");
}

pub use v1::metaserver_client::MetaserverClient;
pub use v1::metaserver_server::{Metaserver, MetaserverServer};
pub use v1::notifier_client::NotifierClient;
pub use v1::notifier_server::{Notifier, NotifierServer};
pub use v1::p2p_client::P2pClient;
pub use v1::p2p_server::{P2p, P2pServer};
pub use v1::{
    ComputeSubscription, DeployEvent, DeployEventKind, TaskDeployment, TaskEvent, TaskEventKind,
    TaskSubscription,
};

/// gRPC metadata naming the calling task (with `authorization: Bearer <task key>`), on
/// metaserver requests.
pub const TASK_ID_METADATA: &str = "fledge-task-id";
