//! Fledge's control plane as libraries: the apiserver (REST), the controller (job lifecycle),
//! the notifier (event streams to agents and deployers), the metaserver (rendezvous of the
//! peer-to-peer channel backend), the store, and the configuration that
//! composes them into services, and the TLS of their listeners ([`tls`]).
//!
//! The `fledge` binary (crate `crates/fledge`) runs any subset of these services in one process
//! (`fledge serve --services ...`) or all of them (`fledge standalone`). Services talk through the
//! same interfaces whether or not they share a process: REST, gRPC and the store.
//!
//! This crate never links the data plane's roles (`fledge-sdk`); it only links `fledge-channel`
//! for the embedded MQTT broker service.
//!
//! Start reading at [`store::Store`] (all state), then [`api`] (what users call) and
//! [`controller`] (what happens after `start job`).

pub mod api;
pub mod broker_auth;
pub mod config;
pub mod controller;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod metaserver;
pub mod mlflow;
pub mod mosquitto;
pub mod notifier;
pub mod s3;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod tls;
