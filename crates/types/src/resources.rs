//! Designs, datasets, computes and users: the resources a user registers.

use serde::{Deserialize, Serialize};

use crate::ids::{ComputeId, DatasetId, DesignId, UserId};

/// A design: a named topology plus its code, both revisioned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Design {
    /// Chosen by the user.
    pub id: DesignId,
    /// Owner.
    pub owner: UserId,
    /// Human-readable name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Schema revisions stored, oldest first (`"1"`, `"2"`, ...).
    #[serde(default)]
    pub schema_versions: Vec<String>,
    /// Code revisions stored, oldest first.
    #[serde(default)]
    pub code_versions: Vec<String>,
    /// Creation time.
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// What a user submits to create a design.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DesignSpec {
    /// The design id to create.
    pub id: DesignId,
    /// Human-readable name; the id when absent.
    #[serde(default)]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// Metadata about a dataset; the data itself never leaves its owner.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetSpec {
    /// Human-readable name, unique per owner.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Where the worker finds the data (`file:///...`, `https://...`).
    pub url: String,
    /// Format hint for the worker's loader (`csv`, `npy`, `mnist-idx`, ...).
    #[serde(default)]
    pub data_format: String,
    /// Where the data lives, e.g. `default/eu/uk`; decides which compute runs its task.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Whether other users may use it in their jobs.
    #[serde(default)]
    pub is_public: bool,
}

fn default_realm() -> String {
    "default".to_owned()
}

/// A stored dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Dataset {
    /// Assigned id.
    pub id: DatasetId,
    /// Owner.
    pub owner: UserId,
    /// What was registered.
    #[serde(flatten)]
    pub spec: DatasetSpec,
}

/// The platform a compute's deployer creates workers on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// Local child processes.
    #[default]
    Process,
    /// Docker Engine containers.
    Docker,
    /// Kubernetes Pods (`k8s`; `kubernetes` is accepted too).
    #[serde(alias = "kubernetes")]
    K8s,
}

/// What an admin or deployer submits to register a compute cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeSpec {
    /// Unique id.
    pub compute_id: ComputeId,
    /// Realm prefix this compute serves, e.g. `default/eu`; datasets whose realm starts with it land here.
    pub region: String,
    /// Secret the deployer authenticates with (stored hashed, never listed back).
    #[serde(default, skip_serializing)]
    pub api_key: String,
    /// Where workers run.
    #[serde(default)]
    pub platform: Platform,
}

/// A stored compute (without its key).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Compute {
    /// Unique id.
    pub compute_id: ComputeId,
    /// Realm prefix it serves.
    pub region: String,
    /// Where workers run.
    pub platform: Platform,
    /// Whether a deployer is connected now.
    #[serde(default)]
    pub connected: bool,
}

/// A user of the control plane.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// Login name.
    pub id: UserId,
    /// Admins see and change everything.
    pub is_admin: bool,
}

/// A user's API token as listed: never the secret itself, which is shown once when issued and
/// stored only as its SHA-256.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Token {
    /// Public id (16 hex digits), to revoke the token by.
    pub id: String,
    /// The user it authenticates.
    pub user: UserId,
    /// What the token is for (free text, may be empty).
    #[serde(default)]
    pub description: String,
    /// When it was issued.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// After this instant the token is refused (`None`: never expires).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// One model file a job's aggregators saved in the platform's registry: the final model or
/// the global model after a round, of the job's one model or of one named group's (parallel
/// experiments keep one model per group).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelFile {
    /// The groups whose model it is (`eu`, `eu+us`), or none for the job's one model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The round after which it was saved; none for the final model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u64>,
    /// Size in bytes (a safetensors file).
    pub size: u64,
}
