//! Privacy for model updates: differential privacy ([`dp`]: central and local, with the RDP
//! [`accountant`]) so the model itself bounds what it reveals about any one participant.
//!
//! Pure, synchronous math: the roles in `fledge-sdk` call [`dp`] around aggregation.

pub mod accountant;
mod config;
pub mod dp;

pub use accountant::RdpAccountant;
pub use config::ConfigError;
pub use dp::{CentralDp, DpConfig, DpError, DpMode, DpRoundReport, LocalDp};
