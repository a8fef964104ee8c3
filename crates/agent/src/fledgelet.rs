//! The agent's main loop: wait for START, run the task, stop it on STOP or shutdown.
//!
//! [`run`] consumes the task's notifier events (see `fledge_client::subscribe_task`) and
//! drives [`supervisor::run`]. Duplicate STARTs (a redelivery after a reconnect, a controller
//! that re-sends) are ignored; a STOP before START reports `terminated` without running
//! anything; a shutdown (SIGTERM from the deployer) stops the child like a STOP does.
//!
//! The agent beats from the moment it runs, also while it waits for START: the controller
//! holds the start of a job until the data owners' agents of its participant-run tasks beat,
//! and tells a managed worker that came up from one that never did. A participant-run task's
//! agent that is shut down locally (its data owner pressed Ctrl-C, or restarts the machine)
//! leaves the task without a final state, so that the same key can rejoin it.

use std::sync::Arc;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use tokio_util::sync::CancellationToken;

use fledge_proto::{TaskEvent, TaskEventKind};
use fledge_types::TaskState;

use crate::api::TaskApi;
use crate::supervisor::{self, Outcome, SupervisorOptions};

/// The task's notifier events, as `fledge_client::subscribe_task` yields them.
pub type TaskEvents = BoxStream<'static, fledge_client::Result<TaskEvent>>;

/// What the agent was asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskCommand {
    /// Fetch the manifest and run the task.
    Start,
    /// Stop the task.
    Stop,
}

impl TaskCommand {
    /// The command an event carries, if any (unknown kinds are ignored by the caller).
    pub fn from_event(event: &TaskEvent) -> Option<TaskCommand> {
        match TaskEventKind::try_from(event.kind) {
            Ok(TaskEventKind::Start) => Some(TaskCommand::Start),
            Ok(TaskEventKind::Stop) => Some(TaskCommand::Stop),
            Ok(TaskEventKind::Unspecified) | Err(_) => None,
        }
    }
}

/// Runs the agent until its task ended (or it was shut down before the task started).
pub async fn run(
    opts: &SupervisorOptions,
    api: Arc<dyn TaskApi>,
    mut events: TaskEvents,
    shutdown: CancellationToken,
) -> Outcome {
    // Phase 1: wait for START, beating.
    let beating = {
        let api = api.clone();
        let interval = opts.heartbeat_interval;
        tokio::spawn(async move {
            loop {
                if let Err(err) = api.heartbeat().await {
                    tracing::debug!(error = %supervisor::chain(&err), "heartbeat failed");
                }
                tokio::time::sleep(interval).await;
            }
        })
    };
    let _stop_beating = AbortOnDrop(beating);
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = shutdown.cancelled() => {
                tracing::info!("shut down before the task started");
                if opts.participant_run {
                    tracing::info!("left the participant-run task before it started; the same key rejoins it");
                    let log = "[fledgelet] shut down before the task started; the same key rejoins it".to_owned();
                    return Outcome { state: TaskState::Ready, log, reported: false };
                }
                let log = "[fledgelet] worker shut down before the task started".to_owned();
                return supervisor::finish(opts, api.as_ref(), TaskState::Terminated, log).await;
            }
        };
        match event {
            Some(Ok(event)) => match TaskCommand::from_event(&event) {
                Some(TaskCommand::Start) => break,
                Some(TaskCommand::Stop) => {
                    tracing::info!("stopped before the task started");
                    let log = "[fledgelet] stopped before the task started".to_owned();
                    return supervisor::finish(opts, api.as_ref(), TaskState::Terminated, log)
                        .await;
                }
                None => tracing::warn!(kind = event.kind, "ignoring an unknown task event"),
            },
            Some(Err(err)) => return lost_notifier(opts, api, &supervisor::chain(&err)).await,
            None => return lost_notifier(opts, api, "the notifier subscription ended").await,
        }
    }

    // Phase 2: run, with STOP and shutdown both cancelling `stop`; the supervisor beats.
    drop(_stop_beating);
    tracing::info!("task starting");
    let stop = shutdown.child_token();
    let forward = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event.as_ref().ok().and_then(TaskCommand::from_event) {
                    Some(TaskCommand::Stop) => {
                        tracing::info!("stop requested");
                        stop.cancel();
                    }
                    Some(TaskCommand::Start) => tracing::debug!("ignoring a repeated start"),
                    None => {}
                }
            }
        })
    };
    // A local shutdown of a participant-run task's agent leaves the task to be rejoined.
    let leave = if opts.participant_run { shutdown.clone() } else { CancellationToken::new() };
    let outcome = supervisor::run_or_leave(opts, api, stop, leave).await;
    forward.abort();
    outcome
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn lost_notifier(opts: &SupervisorOptions, api: Arc<dyn TaskApi>, why: &str) -> Outcome {
    tracing::error!(why, "cannot receive task events");
    let log = format!("[fledgelet] cannot receive task events: {why}");
    supervisor::finish(opts, api.as_ref(), TaskState::Failed, log).await
}
