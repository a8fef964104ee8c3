//! Privacy for model updates. So far: the RDP [`accountant`] that differential privacy
//! reports ε with.

pub mod accountant;

pub use accountant::RdpAccountant;
