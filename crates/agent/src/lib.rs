//! Fledge's compute side: the `fledgelet` worker agent and the `process` deployer.
//!
//! - [`fledgelet`]: the agent inside each worker. It waits for its task's START event, fetches
//!   the task's config and code with its task key, runs the role's entrypoint as a child
//!   process ([`supervisor`]), reports `running`, heartbeats and the final state with the tail
//!   of the log, and stops the child on a STOP event.
//! - [`deployer`]: one per compute. It receives DEPLOY/REVOKE events and starts or kills one
//!   `fledgelet` child process per task, reporting each worker's deployment.
//!
//! [`cli`] holds the `fledgelet` flags and entry point, shared by the `fledgelet` binary and
//! any binary that embeds it as a subcommand.
//!
//! Supporting modules: [`bundle`] (zip-slip-safe unpacking), [`entrypoint`] (`main.py` or
//! `fledge-role.toml`), [`logtail`] (bounded log tail), [`process`] (process groups, group
//! kill, parent-death signal), [`sandbox`] (Landlock confinement of task code), [`api`] (the control-plane calls as traits, with retry).
//! Notifier subscriptions (with reconnect) come from `fledge_client`.
//!
//! This crate never links the control plane; it speaks to it only over REST and gRPC.
//! Start reading at [`supervisor::run`].

pub mod api;
pub mod bundle;
pub mod cli;
pub mod deployer;
pub mod entrypoint;
pub mod fledgelet;
#[doc(hidden)]
pub mod fuzzing;
pub mod logtail;
pub mod process;
pub mod sandbox;
pub mod supervisor;
