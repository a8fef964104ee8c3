//! The controller: expands jobs into tasks and drives each job's state machine.

use fledge_types::JobId;
use tokio::sync::mpsc;

/// A cheap handle to wake the controller when a job may need work.
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::Sender<JobId>,
}

impl Handle {
    /// Creates a handle and the receiver the controller reads (used by the controller's builder).
    pub fn channel(capacity: usize) -> (Handle, mpsc::Receiver<JobId>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Handle { tx }, rx)
    }

    /// Tells the controller that `job` changed (state requested, a task reported, ...).
    /// Never blocks: when the queue is full the controller's periodic resync picks the job up.
    pub fn job_changed(&self, job: JobId) {
        if let Err(err) = self.tx.try_send(job) {
            tracing::debug!(%err, "controller queue full or closed; periodic resync will handle the job");
        }
    }
}
