//! Integration tests of `fledgectl`: the built binary driven as a user would, against a real
//! apiserver (temp-dir SQLite store) started in-process on a loopback port.
//!
//! No controller runs, so a started job stays `starting`; tests that need a job to progress or
//! end move it through the store as the controller would.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod controller;
mod errors;
mod flame;
mod lifecycle;
mod run;
mod support;
mod ux;
