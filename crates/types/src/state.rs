//! Job and task states and which transitions between them are legal.

use serde::{Deserialize, Serialize};

/// A job's lifecycle (`docs/design.md`, "States").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Created, not started.
    Ready,
    /// Start requested; tasks are being expanded and stored.
    Starting,
    /// Deploy requests sent; waiting for workers.
    Deploying,
    /// Workers are training.
    Running,
    /// A user asked to stop; workers are being revoked.
    Stopping,
    /// Every role has a completed task and no task runs.
    Completed,
    /// Every task of some role failed.
    Failed,
    /// Stopped by the user or by `maxRunTime`.
    Terminated,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 8] = [
        JobState::Ready,
        JobState::Starting,
        JobState::Deploying,
        JobState::Running,
        JobState::Stopping,
        JobState::Completed,
        JobState::Failed,
        JobState::Terminated,
    ];

    /// Whether the job can no longer change state.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Completed | JobState::Failed | JobState::Terminated)
    }

    /// Whether the job may go from `self` to `next`.
    pub fn can_transition_to(self, next: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, next),
            (Ready, Starting)
                | (Starting, Deploying)
                | (Deploying, Running)
                | (Starting | Deploying | Running, Stopping)
                | (Starting | Deploying | Running, Completed | Failed | Terminated)
                | (Stopping, Terminated | Failed | Completed)
        )
    }

    /// Lower-case name as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Ready => "ready",
            JobState::Starting => "starting",
            JobState::Deploying => "deploying",
            JobState::Running => "running",
            JobState::Stopping => "stopping",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Terminated => "terminated",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_owned()))
            .map_err(|_| format!("unknown job state {s:?}"))
    }
}

/// A task's lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Stored, not yet running.
    Ready,
    /// Its worker's code runs.
    Running,
    /// Its code exited successfully.
    Completed,
    /// Its code or its worker failed.
    Failed,
    /// Stopped by the control plane.
    Terminated,
}

impl TaskState {
    /// Every state, in lifecycle order.
    pub const ALL: [TaskState; 5] = [
        TaskState::Ready,
        TaskState::Running,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Terminated,
    ];

    /// Whether the task can no longer change state.
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Completed | TaskState::Failed | TaskState::Terminated)
    }

    /// Whether the task may go from `self` to `next` (idempotent repeats are allowed).
    pub fn can_transition_to(self, next: TaskState) -> bool {
        use TaskState::*;
        self == next
            || matches!(
                (self, next),
                (Ready, Running | Completed | Failed | Terminated)
                    | (Running, Completed | Failed | Terminated)
            )
    }

    /// Lower-case name as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Ready => "ready",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Terminated => "terminated",
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_owned()))
            .map_err(|_| format!("unknown task state {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_job_states_never_move() {
        use JobState::*;
        let all = [Ready, Starting, Deploying, Running, Stopping, Completed, Failed, Terminated];
        for from in all.into_iter().filter(|s| s.is_final()) {
            assert!(all.iter().all(|to| !from.can_transition_to(*to)), "{from} moved");
        }
        assert!(!Running.can_transition_to(Starting));
        assert!(Ready.can_transition_to(Starting));
        assert_eq!("running".parse::<JobState>(), Ok(Running));
        assert!("runnin".parse::<JobState>().is_err());
    }
}
