//! Fledge's data plane transport: channels between the ends (tasks) of a job.
//!
//! A [`Channel`] is one TAG channel as seen from one task, scoped to the task's job and group:
//! it lists the live peer ends ([`Channel::ends`]), sends and receives [`wire::Message`]s to and
//! from a specific end, in arrival order from a set of ends ([`Channel::recv_fifo`]), and
//! broadcasts. A [`ChannelManager`] joins every channel of a task's role from its
//! [`fledge_types::TaskConfig`] and finds channels by function tag.
//!
//! Backends ([`Backend`]): `local` (in-process [`LocalHub`], for simulation and tests) and
//! `mqtt` (rumqttc against an external broker or the embedded one of [`broker`], feature
//! `broker`) and `p2p` (gRPC streams between ends, found through the metaserver; see [`p2p`]).
//!
//! Messages travel in [`wire`]'s format: a checksummed header plus safetensors; decoding is safe
//! on untrusted input. This crate does not aggregate, select trainers or know about rounds
//! beyond carrying the round number: that is `fledge-sdk`'s job.
//!
//! Start reading at [`channel`], then [`local`] and [`mqtt`].

pub mod bench;
#[cfg(feature = "broker")]
pub mod broker;
pub mod channel;
mod chunk;
#[doc(hidden)]
pub mod fuzzing;
pub mod local;
pub mod manager;
pub mod mqtt;
pub mod p2p;
pub mod secure;
mod shared;
pub mod wire;

pub use channel::{
    Backend, Channel, ChannelMetrics, ChannelOptions, EndProps, Error, MetricsSnapshot, Result,
};
pub use local::LocalHub;
pub use manager::{BackendEnv, ChannelManager};
pub use mqtt::{MqttConfig, MqttCredentials, MqttTls};
pub use p2p::P2pConfig;
pub use secure::Keyring;
pub use wire::{Dtype, Kind, Message, Tensor, Tensors};
