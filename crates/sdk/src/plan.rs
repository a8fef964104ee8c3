//! Task configs of a whole two- or three-tier job ([`JobPlan`]), for simulations and
//! multi-process runs.

use std::collections::BTreeMap;

use fledge_types::{
    Backend, BrokerSpec, ChannelSpec, DatasetRef, GroupBy, JobRef, RegistrySpec, Sort, TaskConfig,
};

use crate::roles::{RoleKind, tags};
use crate::{Error, Result};

/// The shape of a planned job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Topology {
    /// An aggregation tree: a top aggregator, [`JobPlan::middle`] middle aggregators (0:
    /// two-tier) and one trainer per dataset.
    #[default]
    Tree,
    /// Decentralised: one `ring-trainer` per dataset on a self-loop channel, no aggregator.
    /// The first (the ring's leader: lowest task id) saves the final model.
    Ring,
    /// Vertical (split) learning: the first dataset is the `vertical-label-party`'s table,
    /// each other one a `vertical-feature-party`'s.
    Vertical,
}

/// A whole job to generate task configs for.
#[derive(Clone, Debug)]
pub struct JobPlan {
    /// Job id (scopes channels and the registry).
    pub job_id: String,
    /// One dataset URL per data-holding task (trainers, ring members or vertical parties).
    pub datasets: Vec<String>,
    /// The job's shape.
    pub topology: Topology,
    /// Middle aggregators of a [`Topology::Tree`] (0: two-tier). Trainers are spread over
    /// them round-robin.
    pub middle: usize,
    /// Hyperparameters of every task.
    pub hyperparameters: serde_json::Map<String, serde_json::Value>,
    /// Server optimizer.
    pub optimizer: Sort,
    /// Selector.
    pub selector: Sort,
    /// Differential privacy (`modelSpec.differentialPrivacy`), if any.
    pub differential_privacy: Option<serde_json::Value>,
    /// Secure aggregation (`modelSpec.secureAggregation`), if any.
    pub secure_aggregation: Option<serde_json::Value>,
    /// Backend of every channel.
    pub backend: Backend,
    /// MQTT brokers (`host:port`).
    pub brokers: Vec<String>,
    /// Registry directory (empty: `./registry`).
    pub registry_uri: String,
}

impl JobPlan {
    /// A two-tier local plan with defaults.
    pub fn local(job_id: &str, datasets: Vec<String>) -> JobPlan {
        JobPlan {
            job_id: job_id.to_owned(),
            datasets,
            topology: Topology::Tree,
            middle: 0,
            hyperparameters: serde_json::Map::new(),
            optimizer: Sort::fedavg(),
            selector: Sort::default_selector(),
            differential_privacy: None,
            secure_aggregation: None,
            backend: Backend::Local,
            brokers: Vec::new(),
            registry_uri: String::new(),
        }
    }

    fn channel(name: &str, upper: &str, lower: &str, groups: Option<Vec<String>>) -> ChannelSpec {
        ChannelSpec {
            name: name.to_owned(),
            description: String::new(),
            pair: vec![upper.to_owned(), lower.to_owned()],
            group_by: groups.map(|value| GroupBy { kind: "tag".to_owned(), value }),
            func_tags: BTreeMap::from([
                (upper.to_owned(), vec![tags::DISTRIBUTE.to_owned(), tags::AGGREGATE.to_owned()]),
                (lower.to_owned(), vec![tags::FETCH.to_owned(), tags::UPLOAD.to_owned()]),
            ]),
            backend: None,
            broker_host: None,
        }
    }

    /// The task configs: the task whose result is the job's first (the top aggregator, the
    /// ring's leader, the label party), then the others (middle aggregators, then trainers).
    pub fn configs(&self) -> Result<Vec<TaskConfig>> {
        if self.datasets.is_empty() {
            return Err(Error::Config("a job needs at least one trainer".to_owned()));
        }
        if self.topology != Topology::Tree && self.middle > 0 {
            return Err(Error::Config(format!(
                "middle aggregators belong to a tree, not a {:?} job",
                self.topology
            )));
        }
        if self.topology == Topology::Vertical && self.datasets.len() < 2 {
            return Err(Error::Config(
                "a vertical job needs the label party's dataset and at least one feature party's"
                    .to_owned(),
            ));
        }
        if self.middle > self.datasets.len() {
            return Err(Error::Config(format!(
                "{} middle aggregators for {} trainers: each needs at least one",
                self.middle,
                self.datasets.len()
            )));
        }
        let base = TaskConfig {
            version: fledge_types::task_config::TASK_CONFIG_VERSION,
            task_id: "".into(),
            role: String::new(),
            task_index: 0,
            job: JobRef {
                id: self.job_id.as_str().into(),
                name: self.job_id.clone(),
                design: String::new(),
            },
            backend: self.backend,
            brokers: self.brokers.iter().map(|host| BrokerSpec::mqtt(host.clone())).collect(),
            registry: RegistrySpec { sort: "local".to_owned(), uri: self.registry_uri.clone() },
            channels: Vec::new(),
            group_association: BTreeMap::new(),
            hyperparameters: self.hyperparameters.clone(),
            optimizer: self.optimizer.clone(),
            selector: self.selector.clone(),
            differential_privacy: self.differential_privacy.clone(),
            secure_aggregation: self.secure_aggregation.clone(),
            base_model: Default::default(),
            dataset: None,
            max_run_time: 0,
            control_plane: None,
            metaserver: None,
            control_plane_ca: None,
            // Simulations run in one process: plain channels.
            data_plane: None,
            registry_token: None,
        };
        let task = |role: &str,
                    index: usize,
                    channels: Vec<ChannelSpec>,
                    groups: BTreeMap<String, String>| {
            let mut c = base.clone();
            c.task_id = format!("{}-{role}-{index}", self.job_id).into();
            c.role = role.to_owned();
            c.task_index = index as u32;
            c.channels = channels;
            c.group_association = groups;
            c
        };
        let mut res = Vec::new();
        let n = self.datasets.len();
        let dataset = |i: usize| DatasetRef {
            id: format!("{}-data-{i}", self.job_id).into(),
            name: format!("shard {i}"),
            url: self.datasets[i].clone(),
            data_format: String::new(),
        };
        if self.topology == Topology::Ring {
            let role = RoleKind::RingTrainer.name();
            let ring = ChannelSpec {
                name: "ring-channel".to_owned(),
                description: String::new(),
                pair: vec![role.to_owned(), role.to_owned()],
                group_by: None,
                func_tags: BTreeMap::from([(role.to_owned(), vec!["ring_allreduce".to_owned()])]),
                backend: None,
                broker_host: None,
            };
            for i in 0..n {
                let mut t = task(role, i, vec![ring.clone()], BTreeMap::new());
                t.dataset = Some(dataset(i));
                t.hyperparameters.insert("expectedTrainers".to_owned(), n.into());
                res.push(t);
            }
        } else if self.topology == Topology::Vertical {
            let (label, feature) =
                (RoleKind::VerticalLabelParty.name(), RoleKind::VerticalFeatureParty.name());
            let channel = ChannelSpec {
                name: "vertical-channel".to_owned(),
                description: String::new(),
                pair: vec![label.to_owned(), feature.to_owned()],
                group_by: None,
                func_tags: BTreeMap::from([
                    (label.to_owned(), vec![tags::AGGREGATE.to_owned()]),
                    (feature.to_owned(), vec![tags::UPLOAD.to_owned()]),
                ]),
                backend: None,
                broker_host: None,
            };
            let mut top = task(label, 0, vec![channel.clone()], BTreeMap::new());
            top.dataset = Some(dataset(0));
            top.hyperparameters.insert("featureParties".to_owned(), (n - 1).into());
            res.push(top);
            for i in 1..n {
                let mut t = task(feature, i - 1, vec![channel.clone()], BTreeMap::new());
                t.dataset = Some(dataset(i));
                res.push(t);
            }
        } else if self.middle == 0 {
            let param = Self::channel("param-channel", "aggregator", "trainer", None);
            let mut top = task("aggregator", 0, vec![param.clone()], BTreeMap::new());
            set_children(&mut top, n);
            res.push(top);
            for i in 0..n {
                let mut t = task("trainer", i, vec![param.clone()], BTreeMap::new());
                t.dataset = Some(dataset(i));
                res.push(t);
            }
        } else {
            let groups: Vec<String> = (0..self.middle).map(|g| format!("g{g}")).collect();
            let global =
                Self::channel("global-channel", "top-aggregator", "middle-aggregator", None);
            let param = Self::channel(
                "param-channel",
                "middle-aggregator",
                "trainer",
                Some(groups.clone()),
            );
            let mut top = task("top-aggregator", 0, vec![global.clone()], BTreeMap::new());
            set_children(&mut top, self.middle);
            res.push(top);
            for (m, group) in groups.iter().enumerate() {
                let mut mid = task(
                    "middle-aggregator",
                    m,
                    vec![global.clone(), param.clone()],
                    BTreeMap::from([("param-channel".to_owned(), group.clone())]),
                );
                let mine = (0..n).filter(|i| i % self.middle == m).count();
                set_children(&mut mid, mine);
                res.push(mid);
            }
            for i in 0..n {
                let mut t = task(
                    "trainer",
                    i,
                    vec![param.clone()],
                    BTreeMap::from([("param-channel".to_owned(), groups[i % self.middle].clone())]),
                );
                t.dataset = Some(dataset(i));
                res.push(t);
            }
        }
        Ok(res)
    }
}

/// Sets `expectedTrainers` to the aggregator's number of children and clamps `minTrainers`
/// to it (the job-wide value counts trainers, which an aggregator above middle aggregators
/// does not see).
fn set_children(config: &mut TaskConfig, children: usize) {
    let h = &mut config.hyperparameters;
    h.insert("expectedTrainers".to_owned(), serde_json::Value::from(children));
    let min = h.get("minTrainers").and_then(serde_json::Value::as_u64).unwrap_or(1);
    h.insert("minTrainers".to_owned(), serde_json::Value::from(min.min(children as u64).max(1)));
}
