//! A job: one FL run of a design with a data spec and a model spec.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{DatasetId, DesignId, JobId, UserId};
use crate::schema::Backend;
use crate::state::JobState;

/// What a user submits to create a job (Flame's `job.json` with the specs inline).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    /// Human-readable name. Optional, as in Flame's job files: absent (or empty) it becomes the
    /// design id ([`JobSpec::with_defaults`], applied by the apiserver before validation).
    #[serde(default)]
    pub name: String,
    /// The design to run.
    pub design_id: DesignId,
    /// Pin a schema revision; the latest when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<String>,
    /// Pin a code revision; the latest when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_version: Option<String>,
    /// Scheduling priority.
    #[serde(default)]
    pub priority: Priority,
    /// Default backend of channels that name none.
    #[serde(default)]
    pub backend: Backend,
    /// Wall-time limit in seconds; the job is `terminated` past it. 0 means no limit.
    #[serde(default)]
    pub max_run_time: u64,
    /// Which datasets each data-consuming role reads, by group.
    #[serde(default)]
    pub data_spec: Vec<DataSpecEntry>,
    /// Hyperparameters, optimizer, selector, base model, registry.
    #[serde(default)]
    pub model_spec: ModelSpec,
    /// Restart policy per role of the platform-run tasks; a role not listed gets
    /// [`RestartPolicy::default_for`] its kind.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub restart_policy: BTreeMap<String, RestartPolicy>,
    /// Path of the data spec file beside job.json (resolved by `fledgectl`, never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_spec_path: Option<String>,
    /// Path of the model spec file beside job.json (resolved by `fledgectl`, never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_spec_path: Option<String>,
}

impl JobSpec {
    /// The spec with Flame's defaults filled in: a job without a `name` is named after its
    /// design (`designId`). A blank but non-empty name is left for validation to report.
    pub fn with_defaults(mut self) -> Self {
        if self.name.is_empty() {
            self.name = self.design_id.as_str().to_owned();
        }
        self
    }
}

/// Whether the controller redeploys a platform-run task that failed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum RestartOn {
    /// A failed task stays failed; the job's outcome rules decide.
    Never,
    /// A failed task is redeployed under the same id, up to `maxRestarts` times; it resumes
    /// from the state its role persisted.
    #[default]
    OnFailure,
}

/// A role's restart policy (`restartPolicy.<role>` in the job spec).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestartPolicy {
    /// When to restart.
    #[serde(default)]
    pub policy: RestartOn,
    /// Restarts allowed per task (with `onFailure`); one more failure fails the task for good.
    #[serde(default = "RestartPolicy::default_max")]
    pub max_restarts: u32,
}

impl RestartPolicy {
    /// The most restarts a job may allow a task.
    pub const MAX_RESTARTS_LIMIT: u32 = 100;

    fn default_max() -> u32 {
        3
    }

    /// The default of a role: tasks that read no dataset (aggregators, coordinators) restart
    /// on failure up to 3 times, since the whole job depends on them and they persist their
    /// state each round; data-consuming tasks (trainers) never do: the aggregator's selector
    /// drops a trainer that dies, as it would drop one that leaves.
    pub fn default_for(data_consumer: bool) -> RestartPolicy {
        RestartPolicy {
            policy: if data_consumer { RestartOn::Never } else { RestartOn::OnFailure },
            max_restarts: Self::default_max(),
        }
    }

    /// How many restarts a task under this policy may still have after `restarts` of them.
    pub fn allows(&self, restarts: u32) -> bool {
        self.policy == RestartOn::OnFailure && restarts < self.max_restarts
    }
}

/// Job priority (Flame's values).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Low.
    Low,
    /// Medium (the default).
    #[default]
    Medium,
    /// High.
    High,
}

/// One entry of the data spec: a data-consuming role and its datasets per group label.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataSpecEntry {
    /// The data-consuming role.
    pub role: String,
    /// Group label → dataset ids; one task per dataset id.
    pub dataset_groups: BTreeMap<String, Vec<DatasetId>>,
    /// Set when the data owners of these datasets run their tasks themselves (non-orchestration
    /// mode), although the role's other tasks are deployed by the platform: one job may mix
    /// both. A role with `participantRun` in the schema has all its tasks participant-run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub participant_run: bool,
}

/// The model side of a job (Flame's `modelSpec.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// The model to start from; none means the aggregator asks a trainer for initial weights.
    #[serde(default)]
    pub base_model: BaseModel,
    /// Server-side aggregation algorithm.
    #[serde(default = "Sort::fedavg")]
    pub optimizer: Sort,
    /// Trainer selection policy.
    #[serde(default = "Sort::default_selector")]
    pub selector: Sort,
    /// Free-form hyperparameters handed to every task (`rounds`, `epochs`, `batchSize`, ...).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub hyperparameters: serde_json::Map<String, serde_json::Value>,
    /// Where models and metrics go.
    #[serde(default)]
    pub registry: RegistrySpec,
    /// Packages the code needs (informational; e.g. `numpy >= 1.2.0`).
    #[serde(default)]
    pub dependencies: Vec<String>,
    /// Differential privacy (`docs/privacy.md`): `{mode: central | local, noiseMultiplier,
    /// clippingNorm, delta, epsilon (budget), ...}`. Checked when the job is created: a job
    /// whose rounds would exceed the budget is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub differential_privacy: Option<serde_json::Value>,
    /// Secure aggregation, SecAgg+ (`docs/privacy.md`): `{threshold, quantizationBits,
    /// clippingRange, neighbors, maxWeight, rounding}`. Checked when the job is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub secure_aggregation: Option<serde_json::Value>,
}

impl Default for ModelSpec {
    /// The same values as an empty `modelSpec` object parses to (the derived default would
    /// give the selector `fedavg`, an optimizer's name).
    fn default() -> Self {
        Self {
            base_model: BaseModel::default(),
            optimizer: Sort::fedavg(),
            selector: Sort::default_selector(),
            hyperparameters: Default::default(),
            registry: RegistrySpec::default(),
            dependencies: Vec::new(),
            differential_privacy: None,
            secure_aggregation: None,
        }
    }
}

/// A named, versioned model in the registry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaseModel {
    /// Model name; empty for none.
    #[serde(default)]
    pub name: String,
    /// Model version.
    #[serde(default)]
    pub version: i64,
}

/// An algorithm choice: `{"sort": "fedadam", "kwargs": {"lr": 0.01}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Sort {
    /// The algorithm's name.
    pub sort: String,
    /// Its arguments.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

impl Sort {
    /// `{"sort": "fedavg"}`.
    pub fn fedavg() -> Self {
        Self { sort: "fedavg".to_owned(), kwargs: Default::default() }
    }
    /// `{"sort": "default"}`.
    pub fn default_selector() -> Self {
        Self { sort: "default".to_owned(), kwargs: Default::default() }
    }
}

impl Default for Sort {
    fn default() -> Self {
        Self::fedavg()
    }
}

/// Where a job's models and metrics are recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistrySpec {
    /// `local` (a directory), `mlflow`, or `dummy` (Flame's "no registry": the job names none,
    /// so its tasks use the platform's default registry, as when `uri` is empty).
    #[serde(default = "local")]
    pub sort: String,
    /// Directory path or MLflow URL; empty means the worker's default.
    #[serde(default)]
    pub uri: String,
}

/// The registry sort Flame's examples use for "no registry" (see [`RegistrySpec::sort`]).
pub const DUMMY_REGISTRY: &str = "dummy";

/// The registry sort of an MLflow tracking server (`uri` is its URL).
pub const MLFLOW_REGISTRY: &str = "mlflow";

/// The registry sort of an S3-compatible object store (`uri` is `s3://bucket[/prefix]`).
pub const S3_REGISTRY: &str = "s3";

/// `(bucket, prefix)` of an `s3://bucket[/prefix]` registry URI, or why it is not one. The
/// bucket follows S3's naming rules (3 to 63 lowercase letters, digits, `-` or `.`, starting
/// and ending with a letter or digit); each prefix part is letters, digits, `-`, `_` or `.`.
pub fn parse_s3_uri(uri: &str) -> Result<(String, String), String> {
    let rest = uri
        .strip_prefix("s3://")
        .ok_or_else(|| format!("{uri:?} is not an s3:// URI (s3://bucket/optional/prefix)"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !valid_bucket {
        return Err(format!(
            "{bucket:?} is not a bucket name (3 to 63 lowercase letters, digits, '-' or '.')"
        ));
    }
    let prefix = prefix.trim_matches('/');
    for part in prefix.split('/').filter(|p| !p.is_empty()) {
        let ok = part != "."
            && part != ".."
            && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(format!(
                "key prefix part {part:?} is not letters, digits, '-', '_' or '.'"
            ));
        }
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

impl RegistrySpec {
    /// Whether the spec names a registry of its own: not `dummy` and with a `uri`. A job whose
    /// registry names none gets the deployment's default ([`crate::task_config::TaskEnv`]).
    pub fn is_named(&self) -> bool {
        self.sort != DUMMY_REGISTRY && !self.uri.is_empty()
    }
}

fn local() -> String {
    "local".to_owned()
}

impl Default for RegistrySpec {
    fn default() -> Self {
        Self { sort: local(), uri: String::new() }
    }
}

/// A stored job, as the API returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// Assigned id.
    pub id: JobId,
    /// Owner.
    pub owner: UserId,
    /// The submitted spec (with the data and model specs inline).
    pub spec: JobSpec,
    /// The schema revision the job was expanded from.
    pub schema_version: String,
    /// The code revision its tasks run.
    pub code_version: String,
    /// Current state.
    pub state: JobState,
    /// Why the job is in its state (e.g. which role failed), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Creation time.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// When the job entered `starting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Last state change.
    pub updated_at: chrono::DateTime<chrono::Utc>,
    /// When the job reached a final state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_model_spec_equals_an_empty_one() {
        let parsed: ModelSpec = serde_json::from_str("{}").expect("empty model spec parses");
        assert_eq!(ModelSpec::default(), parsed);
        assert_eq!(ModelSpec::default().selector.sort, "default");
        assert_eq!(ModelSpec::default().optimizer.sort, "fedavg");
    }

    #[test]
    fn a_job_without_a_name_is_named_after_its_design() {
        // Flame's job files carry no name.
        let spec: JobSpec = crate::json::from_slice(br#"{"designId": "mnist", "priority": "low"}"#)
            .expect("a Flame job file parses");
        assert_eq!(spec.name, "");
        assert_eq!(spec.clone().with_defaults().name, "mnist");
        let named = JobSpec { name: "mine".into(), ..spec.clone() }.with_defaults();
        assert_eq!(named.name, "mine", "a given name is kept");
        let blank = JobSpec { name: "  ".into(), ..spec }.with_defaults();
        assert_eq!(blank.name, "  ", "a blank name is left for validation to report");
    }

    #[test]
    fn the_dummy_registry_names_none() {
        let dummy = RegistrySpec { sort: DUMMY_REGISTRY.into(), uri: "x".into() };
        assert!(!dummy.is_named());
        assert!(!RegistrySpec::default().is_named(), "no uri: the deployment's default");
        assert!(RegistrySpec { sort: "local".into(), uri: "/models".into() }.is_named());
    }
}
