//! A task: one worker's share of a job, produced by expansion.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{ComputeId, DatasetId, JobId, TaskId};
use crate::state::TaskState;

/// A task as stored and listed (the key is never listed back to users).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Task {
    /// The job it belongs to.
    pub job_id: JobId,
    /// Stable id (hash of job id, role, index, group association).
    pub task_id: TaskId,
    /// The role it plays.
    pub role: String,
    /// Index among the role's tasks (0-based, in expansion order).
    pub index: u32,
    /// Channel → group label.
    pub group_association: BTreeMap<String, String>,
    /// The dataset it reads (data-consuming roles only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_id: Option<DatasetId>,
    /// The compute that hosts it.
    pub compute_id: ComputeId,
    /// Whether the platform deploys it (`false`: its data owner runs it).
    #[serde(default = "yes")]
    pub managed: bool,
    /// Current state.
    pub state: TaskState,
    /// The tail of its log, as last reported.
    #[serde(default)]
    pub log: String,
    /// Last state change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Last heartbeat from its agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<chrono::DateTime<chrono::Utc>>,
    /// How many times the controller redeployed it after a failure (its restart policy).
    #[serde(default)]
    pub restarts: u32,
}

fn yes() -> bool {
    true
}
