//! Integration tests of the agent: the supervisor and the fledgelet loop running real child
//! processes against a fake control plane, and the deployer starting real (fake) fledgelets.
//!
//! Waits use generous deadlines and poll for a condition; nothing asserts on how fast
//! something happened.

mod deployer;
mod e2e;
mod fakes;
mod k8s;
mod manifests;
mod supervisor;
