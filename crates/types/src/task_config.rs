//! The task config: what the controller writes for each task and what a worker reads.
//!
//! This is the contract between the control plane and the data plane. A worker gets it from
//! the apiserver's task fetch (through `fledgelet`) or from a file (local runs); both sides use
//! this one type. Field names follow Flame's; unknown fields are tolerated so that newer control
//! planes can add fields without breaking older workers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{DatasetId, JobId, TaskId};
use crate::job::{BaseModel, RegistrySpec, Sort};
use crate::schema::{Backend, ChannelSpec};

/// Version of the task config format this crate writes.
pub const TASK_CONFIG_VERSION: u32 = 1;

/// Everything a worker needs to run one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskConfig {
    /// Format version ([`TASK_CONFIG_VERSION`]).
    #[serde(default = "v1")]
    pub version: u32,
    /// This task's id; also its end id on every channel.
    pub task_id: TaskId,
    /// The role it plays.
    pub role: String,
    /// Index among the role's tasks (0-based).
    #[serde(default)]
    pub task_index: u32,
    /// The job it belongs to.
    pub job: JobRef,
    /// Default backend for channels that name none.
    #[serde(default)]
    pub backend: Backend,
    /// Brokers for the `mqtt` backend.
    #[serde(default)]
    pub brokers: Vec<BrokerSpec>,
    /// Where models and metrics go.
    #[serde(default)]
    pub registry: RegistrySpec,
    /// The channels this role is in, whole.
    #[serde(default)]
    pub channels: Vec<ChannelSpec>,
    /// Channel → group label for this task.
    #[serde(default)]
    pub group_association: BTreeMap<String, String>,
    /// Free-form hyperparameters from the model spec.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub hyperparameters: serde_json::Map<String, serde_json::Value>,
    /// Server-side aggregation algorithm.
    #[serde(default)]
    pub optimizer: Sort,
    /// Trainer selection policy.
    #[serde(default = "Sort::default_selector")]
    pub selector: Sort,
    /// The job's `modelSpec.differentialPrivacy`, if any (`docs/privacy.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub differential_privacy: Option<serde_json::Value>,
    /// The job's `modelSpec.secureAggregation`, if any (`docs/privacy.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub secure_aggregation: Option<serde_json::Value>,
    /// The model to start from (empty name: none).
    #[serde(default)]
    pub base_model: BaseModel,
    /// The dataset (data-consuming roles only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetRef>,
    /// Wall-time limit of the job in seconds (0: none).
    #[serde(default)]
    pub max_run_time: u64,
    /// Where to report metrics and status; absent in local runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlPlaneRef>,
    /// Metaserver endpoint for the `p2p` backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metaserver: Option<String>,
    /// The control plane's CA (PEM) that the task's own connections to the apiserver and the
    /// metaserver trust; absent when the control plane serves plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane_ca: Option<String>,
    /// The task's data-plane identity and keys (set by the control plane; absent in local
    /// runs, where channels are plain). Secret: served only with the task's own key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_plane: Option<DataPlaneSecurity>,
    /// The bearer token of the task's MLflow registry (`docs/registry.md`): set by the
    /// control plane only for a task that runs one of Fledge's built-in roles, when the
    /// registry is a server the operator's token belongs to. Secret: served only with the
    /// task's own key, never shown by `Debug`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_token: Option<RegistryToken>,
}

/// A registry's bearer token, kept out of logs (`Debug` shows `***`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(transparent)]
pub struct RegistryToken(pub String);

impl std::fmt::Debug for RegistryToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RegistryToken(***)")
    }
}

/// A task's data-plane identity and keys for its job (see `docs/security.md`): with them,
/// every channel message is signed by its sender, encrypted under its channel's key, and
/// accepted once, from members only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataPlaneSecurity {
    /// This task's Ed25519 identity seed: 64 hex digits.
    pub identity: String,
    /// Per channel of this task (by name): the channel's 32-byte key, 64 hex digits.
    pub channel_keys: BTreeMap<String, String>,
    /// Per channel of this task (by name): the Ed25519 public keys (64 hex digits) of every
    /// other task of the job on that channel, by task id.
    pub members: BTreeMap<String, BTreeMap<String, String>>,
}

impl std::fmt::Debug for DataPlaneSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataPlaneSecurity")
            .field("channels", &self.channel_keys.keys().collect::<Vec<_>>())
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

fn v1() -> u32 {
    TASK_CONFIG_VERSION
}

impl TaskConfig {
    /// The channel named `name`, if this role is in it.
    pub fn channel(&self, name: &str) -> Option<&ChannelSpec> {
        self.channels.iter().find(|c| c.name == name)
    }

    /// The channels on which this role carries function tag `tag`.
    pub fn channels_with_tag<'a>(
        &'a self,
        tag: &'a str,
    ) -> impl Iterator<Item = &'a ChannelSpec> + 'a {
        self.channels.iter().filter(move |c| {
            c.func_tags.get(&self.role).is_some_and(|tags| tags.iter().any(|t| t == tag))
        })
    }

    /// The group this task is in on `channel` (`default` when unassigned).
    pub fn group_of(&self, channel: &str) -> &str {
        self.group_association
            .get(channel)
            .map(String::as_str)
            .unwrap_or(crate::schema::DEFAULT_GROUP)
    }

    /// The broker `channel` uses: its `brokerHost` override, else the first configured broker.
    pub fn broker_for<'a>(&'a self, channel: &'a ChannelSpec) -> Option<&'a str> {
        channel.broker_host.as_deref().or_else(|| self.brokers.first().map(|b| b.host.as_str()))
    }

    /// The backend of `channel`: its own, else the task's default.
    pub fn backend_of(&self, channel: &ChannelSpec) -> Backend {
        channel.backend.unwrap_or(self.backend)
    }
}

/// The job a task belongs to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobRef {
    /// Job id (scopes channel topics).
    pub id: JobId,
    /// Job name.
    #[serde(default)]
    pub name: String,
    /// The design the job runs (names its MLflow experiment); empty in local runs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub design: String,
}

/// A message broker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokerSpec {
    /// Broker kind: `mqtt`.
    #[serde(default = "mqtt")]
    pub sort: String,
    /// `host:port` or `mqtt://host:port` (plain MQTT), `mqtts://host:port` (MQTT over TLS).
    pub host: String,
    /// MQTT username this task presents to this broker (its broker credential), if the broker
    /// authenticates clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// MQTT password that goes with `username`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// The CA (PEM) an `mqtts` broker's certificate must chain to, when it is not the control
    /// plane's (`controlPlaneCa`), e.g. an operator's Mosquitto with a CA of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

impl BrokerSpec {
    /// An `mqtt` broker at `host` (`host:port`), without credentials.
    pub fn mqtt(host: impl Into<String>) -> BrokerSpec {
        BrokerSpec { sort: mqtt(), host: host.into(), username: None, password: None, ca: None }
    }
}

fn mqtt() -> String {
    "mqtt".to_owned()
}

/// The dataset a data-consuming task reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetRef {
    /// Dataset id.
    pub id: DatasetId,
    /// Dataset name.
    #[serde(default)]
    pub name: String,
    /// Where the data is.
    pub url: String,
    /// Format hint.
    #[serde(default)]
    pub data_format: String,
}

/// How a worker reaches the control plane.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ControlPlaneRef {
    /// Apiserver base URL, e.g. `http://127.0.0.1:10100`.
    pub apiserver: String,
}

/// One per-round metrics report from a role to the control plane.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricRecord {
    /// Reporting task.
    pub task_id: TaskId,
    /// Its role.
    pub role: String,
    /// Round number (1-based).
    pub round: u64,
    /// Metric name → value (`loss`, `accuracy`, `bytesSent`, `roundSeconds`, ...).
    pub metrics: BTreeMap<String, f64>,
    /// When it was measured; the server's time when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<chrono::DateTime<chrono::Utc>>,
}

/// What the deployment adds to a task config beyond the job and its schema.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskEnv {
    /// Brokers for the `mqtt` backend (a channel's `brokerHost` overrides them for it).
    pub brokers: Vec<BrokerSpec>,
    /// Apiserver base URL workers report to; `None` for local runs.
    pub apiserver: Option<String>,
    /// Metaserver endpoint for the `p2p` backend, if one runs.
    pub metaserver: Option<String>,
    /// The registry used when the job's model spec names none (empty `uri`).
    pub default_registry: RegistrySpec,
}

/// Builds the config of `task`, a task of `job` expanded from `schema`.
///
/// - `channels` are the schema's channels whose pair contains the task's role, whole (a
///   channel's `brokerHost` and `backend` stay on it; see [`TaskConfig::broker_for`]);
/// - hyperparameters, optimizer, selector and base model come from the job's model spec;
/// - the registry is the model spec's when it names one (a `uri`, and not Flame's `dummy`),
///   else `env.default_registry`;
/// - `dataset` is passed on for data-consuming roles only (the task's dataset).
pub fn build(
    job: &crate::job::Job,
    schema: &crate::schema::Schema,
    task: &crate::task::Task,
    dataset: Option<&crate::resources::Dataset>,
    env: &TaskEnv,
) -> TaskConfig {
    let model = &job.spec.model_spec;
    let is_data_consumer = schema.roles.iter().any(|r| r.name == task.role && r.is_data_consumer);
    let registry = if model.registry.is_named() {
        model.registry.clone()
    } else {
        env.default_registry.clone()
    };
    TaskConfig {
        version: TASK_CONFIG_VERSION,
        task_id: task.task_id.clone(),
        role: task.role.clone(),
        task_index: task.index,
        job: JobRef {
            id: job.id.clone(),
            name: job.spec.name.clone(),
            design: job.spec.design_id.to_string(),
        },
        backend: job.spec.backend,
        brokers: env.brokers.clone(),
        registry,
        channels: schema.channels.iter().filter(|c| c.pair.contains(&task.role)).cloned().collect(),
        group_association: task.group_association.clone(),
        hyperparameters: model.hyperparameters.clone(),
        optimizer: model.optimizer.clone(),
        selector: model.selector.clone(),
        differential_privacy: model.differential_privacy.clone(),
        secure_aggregation: model.secure_aggregation.clone(),
        base_model: model.base_model.clone(),
        dataset: dataset.filter(|_| is_data_consumer).map(|d| DatasetRef {
            id: d.id.clone(),
            name: d.spec.name.clone(),
            url: d.spec.url.clone(),
            data_format: d.spec.data_format.clone(),
        }),
        max_run_time: job.spec.max_run_time,
        control_plane: env.apiserver.clone().map(|apiserver| ControlPlaneRef { apiserver }),
        metaserver: env.metaserver.clone(),
        control_plane_ca: None,
        data_plane: None,
        registry_token: None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ids::{ComputeId, UserId};
    use crate::job::{Job, JobSpec, ModelSpec};
    use crate::resources::{Dataset, DatasetSpec};
    use crate::schema::{Role, Schema};
    use crate::state::{JobState, TaskState};
    use crate::task::Task;

    fn schema() -> Schema {
        let channel = |name: &str, pair: [&str; 2], broker: Option<&str>| ChannelSpec {
            name: name.into(),
            pair: pair.map(str::to_owned).to_vec(),
            broker_host: broker.map(str::to_owned),
            backend: broker.map(|_| Backend::Mqtt),
            ..Default::default()
        };
        Schema {
            roles: vec![
                Role { name: "trainer".into(), is_data_consumer: true, ..Default::default() },
                Role { name: "middle".into(), ..Default::default() },
                Role { name: "top".into(), ..Default::default() },
            ],
            channels: vec![
                channel("param", ["trainer", "middle"], None),
                channel("global", ["top", "middle"], Some("broker-b:1883")),
            ],
            ..Default::default()
        }
    }

    fn job(registry_uri: &str) -> Job {
        let mut hyperparameters = serde_json::Map::new();
        hyperparameters.insert("rounds".into(), 3.into());
        Job {
            id: JobId::new("job-1"),
            owner: UserId::new("alice"),
            spec: JobSpec {
                name: "mnist".into(),
                max_run_time: 600,
                backend: Backend::Mqtt,
                model_spec: ModelSpec {
                    hyperparameters,
                    optimizer: Sort { sort: "fedadam".into(), kwargs: Default::default() },
                    registry: RegistrySpec { sort: "mlflow".into(), uri: registry_uri.into() },
                    ..Default::default()
                },
                ..Default::default()
            },
            schema_version: "1".into(),
            code_version: "1".into(),
            state: JobState::Starting,
            reason: None,
            created_at: chrono::DateTime::UNIX_EPOCH,
            started_at: None,
            updated_at: chrono::DateTime::UNIX_EPOCH,
            ended_at: None,
        }
    }

    fn task(role: &str, group_association: &[(&str, &str)]) -> Task {
        Task {
            job_id: JobId::new("job-1"),
            task_id: TaskId::new(format!("{role}-0")),
            role: role.into(),
            index: 0,
            group_association: group_association
                .iter()
                .map(|(c, g)| ((*c).to_owned(), (*g).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            dataset_id: None,
            compute_id: ComputeId::new("default"),
            managed: true,
            state: TaskState::Ready,
            log: String::new(),
            updated_at: None,
            last_heartbeat: None,
            restarts: 0,
        }
    }

    fn env() -> TaskEnv {
        TaskEnv {
            brokers: vec![BrokerSpec::mqtt("broker-a:1883")],
            apiserver: Some("http://127.0.0.1:10100".into()),
            metaserver: None,
            default_registry: RegistrySpec {
                sort: "local".into(),
                uri: "/var/lib/fledge/registry".into(),
            },
        }
    }

    #[test]
    fn a_middle_aggregator_gets_both_its_channels_whole_and_no_dataset() {
        let schema = schema();
        let dataset = Dataset {
            id: DatasetId::new("d1"),
            owner: UserId::new("alice"),
            spec: DatasetSpec {
                name: "mnist-1".into(),
                url: "file:///data/d1".into(),
                ..Default::default()
            },
        };
        let middle = task("middle", &[("param", "eu"), ("global", "default")]);
        let config = build(&job(""), &schema, &middle, Some(&dataset), &env());
        assert_eq!(config.channels, schema.channels);
        assert_eq!(config.group_of("param"), "eu");
        assert_eq!(config.dataset, None, "non-data roles get no dataset");
        assert_eq!(config.registry, env().default_registry, "empty uri: default");
        assert_eq!(config.job.name, "mnist");
        assert_eq!(config.max_run_time, 600);
        assert_eq!(config.optimizer.sort, "fedadam");
        assert_eq!(config.hyperparameters["rounds"], 3);
        assert_eq!(
            config.control_plane.as_ref().map(|c| c.apiserver.as_str()),
            Some("http://127.0.0.1:10100")
        );
        let param = config.channel("param").expect("param channel");
        let global = config.channel("global").expect("global channel");
        assert_eq!(config.broker_for(param), Some("broker-a:1883"));
        assert_eq!(config.broker_for(global), Some("broker-b:1883"));

        let trainer = task("trainer", &[("param", "eu")]);
        let config = build(&job("http://mlflow:5000"), &schema, &trainer, Some(&dataset), &env());
        assert_eq!(config.channels, schema.channels[..1]);
        assert_eq!(config.registry.uri, "http://mlflow:5000", "the job's registry wins");
        assert_eq!(config.registry.sort, "mlflow");
        let dataset_ref = config.dataset.as_ref().expect("trainers get their dataset");
        assert_eq!(dataset_ref.url, "file:///data/d1");
        assert_eq!(dataset_ref.name, "mnist-1");
        // Flame's `dummy` registry names none: the deployment's default, even with a uri set.
        let mut dummy = job("");
        dummy.spec.model_spec.registry = RegistrySpec { sort: "dummy".into(), uri: String::new() };
        let config = build(&dummy, &schema, &trainer, Some(&dataset), &env());
        assert_eq!(config.registry, env().default_registry, "dummy: the default registry");
        dummy.spec.model_spec.registry.uri = "ignored".into();
        let config = build(&dummy, &schema, &trainer, Some(&dataset), &env());
        assert_eq!(config.registry, env().default_registry, "dummy never names a registry");
        // The config round-trips through JSON unchanged.
        let json = serde_json::to_string(&config).expect("serialise");
        assert_eq!(serde_json::from_str::<TaskConfig>(&json).expect("parse"), config);
    }
}
