//! Integration tests of the apiserver: a real router on a loopback port over a temp-dir SQLite
//! store, driven with raw HTTP.
//!
//! No controller runs: tests that need tasks insert them as the controller would (expansion
//! plus one key per task), and the controller's wake-ups are read from its queue.

// Helpers outside `#[test]` functions are test code too: a panic is the failure report.
#![allow(clippy::unwrap_used)]

mod api;
mod mlflow;
mod support;
mod ui;
