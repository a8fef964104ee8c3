//! Privacy for model updates: secure aggregation ([`secagg`], SecAgg+) so the server learns
//! only the sum of the updates, and differential privacy ([`dp`]: central and local, with the
//! RDP [`accountant`]) so the model itself bounds what it reveals about any one participant.
//!
//! Both are pure, synchronous state and math: the roles in `fledge-sdk` carry the
//! [`secagg`] messages (which encode to bytes) over their channels and call [`dp`] around
//! aggregation. `docs/privacy.md` gives the threat model and the configuration reference.

pub mod accountant;
mod config;
pub mod dp;
pub mod secagg;

pub use accountant::RdpAccountant;
pub use config::ConfigError;
pub use dp::{CentralDp, DpConfig, DpError, DpMode, DpRoundReport, LocalDp};
pub use secagg::{SecAggClient, SecAggConfig, SecAggError, SecAggResult, SecAggServer};
