//! What the agent and the deployer need from the control plane, as traits, so the supervisor
//! and the deployer can be driven by fakes in tests; the real implementations wrap
//! `fledge-client`.
//!
//! Calls fail in one of two ways: the control plane is unavailable (connection refused, 5xx,
//! timeout: worth retrying, e.g. while it restarts) or it rejected the call (4xx: retrying
//! cannot help). [`retry`] retries the first kind with capped, jittered exponential backoff for
//! a bounded time.

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;

use fledge_client::{ComputeClient, TaskClient};
use fledge_types::{JobId, TaskConfig, TaskId, TaskState};

/// What a deployer reports about one task's worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeploymentState {
    /// The worker was created.
    Deployed,
    /// The worker could not be created or died before reporting; the task is marked failed.
    Failed,
    /// The worker was removed on request.
    Revoked,
}

/// Why a control-plane call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The control plane could not be reached or answered with a server error; retry later.
    #[error("control plane unavailable")]
    Unavailable(#[source] anyhow::Error),
    /// The control plane rejected the call; retrying will not help.
    #[error("control plane rejected the call")]
    Rejected(#[source] anyhow::Error),
}

/// Result of a control-plane call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether retrying may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable(_))
    }
}

/// A task's side of the control plane: fetch its manifest, report its state.
pub trait TaskApi: Send + Sync {
    /// The task's config.
    fn config(&self) -> BoxFuture<'_, Result<TaskConfig>>;
    /// A zip of the task's role folder.
    fn code(&self) -> BoxFuture<'_, Result<Vec<u8>>>;
    /// Reports the task's state with the tail of its log.
    fn set_status<'a>(&'a self, state: TaskState, log: &'a str) -> BoxFuture<'a, Result<()>>;
    /// Says the agent is alive.
    fn heartbeat(&self) -> BoxFuture<'_, Result<()>>;
    /// Streams lines `offset..` of this agent run's output (`stream` names the run).
    fn append_log<'a>(
        &'a self,
        stream: &'a str,
        offset: u64,
        lines: &'a [String],
    ) -> BoxFuture<'a, Result<()>>;
}

/// A compute's side of the control plane: report what happened to workers.
pub trait DeploymentApi: Send + Sync {
    /// Reports a task's worker as deployed, failed (with the reason) or revoked.
    fn report<'a>(
        &'a self,
        job: &'a JobId,
        task: &'a TaskId,
        attempt: u32,
        state: DeploymentState,
        message: &'a str,
    ) -> BoxFuture<'a, Result<()>>;

    /// Claims the key of attempt `attempt` of task `task` (deploy events carry none); the
    /// control plane answers once per attempt.
    fn claim_key<'a>(
        &'a self,
        job: &'a JobId,
        task: &'a TaskId,
        attempt: u32,
    ) -> BoxFuture<'a, Result<String>>;
}

impl From<fledge_client::Error> for Error {
    fn from(err: fledge_client::Error) -> Self {
        use fledge_client::Error as E;
        let transient = match &err {
            E::Connect { .. } | E::Transport { .. } => true,
            E::Api { status, .. } | E::Http { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        };
        if transient { Error::Unavailable(err.into()) } else { Error::Rejected(err.into()) }
    }
}

impl TaskApi for TaskClient {
    fn config(&self) -> BoxFuture<'_, Result<TaskConfig>> {
        Box::pin(async move { Ok(TaskClient::config(self).await?) })
    }

    fn code(&self) -> BoxFuture<'_, Result<Vec<u8>>> {
        Box::pin(async move { Ok(TaskClient::code(self).await?.to_vec()) })
    }

    fn set_status<'a>(&'a self, state: TaskState, log: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { Ok(TaskClient::set_status(self, state, log).await?) })
    }

    fn heartbeat(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move { Ok(TaskClient::heartbeat(self).await?) })
    }

    fn append_log<'a>(
        &'a self,
        stream: &'a str,
        offset: u64,
        lines: &'a [String],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { Ok(TaskClient::append_log(self, stream, offset, lines).await?) })
    }
}

impl DeploymentApi for ComputeClient {
    fn report<'a>(
        &'a self,
        job: &'a JobId,
        task: &'a TaskId,
        attempt: u32,
        state: DeploymentState,
        message: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        let state = match state {
            DeploymentState::Deployed => fledge_client::DeploymentState::Deployed,
            DeploymentState::Failed => fledge_client::DeploymentState::Failed,
            DeploymentState::Revoked => fledge_client::DeploymentState::Revoked,
        };
        Box::pin(
            async move { Ok(self.report_deployment(job, task, attempt, state, message).await?) },
        )
    }

    fn claim_key<'a>(
        &'a self,
        job: &'a JobId,
        task: &'a TaskId,
        attempt: u32,
    ) -> BoxFuture<'a, Result<String>> {
        Box::pin(async move { Ok(self.claim_task_key(job, task, attempt).await?) })
    }
}

/// Capped exponential backoff with jitter, bounded in total time.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    /// First delay (default 200 ms).
    pub initial: Duration,
    /// Largest delay (default 5 s).
    pub max: Duration,
    /// Give up once this much time has passed since the first attempt (default 300 s).
    pub max_elapsed: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
            max_elapsed: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The delays between attempts: doubling from `initial` up to `max`, each with "equal
    /// jitter" (uniform in `[d/2, d)`, so agents that lost the same control plane do not retry
    /// in lockstep), summing to at most `max_elapsed`.
    pub fn builder(&self) -> backon::ExponentialBuilder {
        let min = (self.initial / 2).max(Duration::from_millis(1));
        backon::ExponentialBuilder::default()
            .with_min_delay(min)
            .with_max_delay((self.max / 2).max(min))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .with_total_delay(Some(self.max_elapsed))
    }
}

/// Runs `call` until it succeeds, fails for good, or `backoff.max_elapsed` passes.
///
/// `what` names the call in logs.
pub async fn retry<T, F, Fut>(backoff: Backoff, what: &str, call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    use backon::Retryable as _;
    let start = tokio::time::Instant::now();
    let attempts = std::sync::atomic::AtomicU32::new(1);
    let count = || attempts.load(std::sync::atomic::Ordering::Relaxed);
    let res = call
        .retry(backoff.builder())
        .sleep(tokio::time::sleep)
        .when(|err: &Error| err.is_transient() && start.elapsed() < backoff.max_elapsed)
        .notify(|err: &Error, delay: Duration| {
            tracing::debug!(what, attempt = count(), ?delay, error = %format!("{err:#}"), "retrying");
            attempts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
        .await;
    if let Err(err) = &res
        && err.is_transient()
    {
        tracing::warn!(what, attempts = count(), error = %format!("{err:#}"), "giving up");
    }
    res
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_transient_errors_until_success() {
        let calls = AtomicU32::new(0);
        let res = retry(Backoff::default(), "test", || async {
            if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                Err(Error::Unavailable(anyhow::anyhow!("down")))
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(res.expect("eventually ok"), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_on_rejection_at_once_and_on_outage_after_the_bound() {
        let calls = AtomicU32::new(0);
        let res: Result<()> = retry(Backoff::default(), "test", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Error::Rejected(anyhow::anyhow!("409")))
        })
        .await;
        assert!(!res.expect_err("rejected").is_transient());
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let backoff = Backoff { max_elapsed: Duration::from_secs(30), ..Backoff::default() };
        let start = tokio::time::Instant::now();
        let res: Result<()> =
            retry(backoff, "test", || async { Err(Error::Unavailable(anyhow::anyhow!("down"))) })
                .await;
        assert!(res.expect_err("outage").is_transient());
        assert!(start.elapsed() <= Duration::from_secs(30));
        assert!(start.elapsed() >= Duration::from_secs(20));
    }
}
