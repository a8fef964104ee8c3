//! Joining every channel of a task from its [`TaskConfig`], and finding them by function tag.

use std::collections::BTreeMap;
use std::time::Duration;

use fledge_types::{Backend as BackendKind, ChannelSpec, TaskConfig};

use crate::channel::{Backend, Channel, ChannelOptions, Error, Result};
use crate::local::LocalHub;
use crate::mqtt::MqttConfig;
use crate::wire;

/// Process-level settings the task config does not carry.
#[derive(Clone, Debug)]
pub struct BackendEnv {
    /// Hub for `local` channels (the process-wide one by default).
    pub local_hub: LocalHub,
    /// MQTT tuning (chunk size, keep-alive, heartbeat, liveness); host and port come from the
    /// task config.
    pub mqtt: MqttConfig,
    /// Largest message in bytes. Default 1 GiB.
    pub max_message_bytes: usize,
    /// Per-end inbound queue bound.
    pub queue_depth: usize,
    /// Properties this end announces on every channel (e.g. `num_samples`).
    pub props: serde_json::Map<String, serde_json::Value>,
}

impl Default for BackendEnv {
    fn default() -> Self {
        BackendEnv {
            local_hub: LocalHub::global(),
            mqtt: MqttConfig::new("127.0.0.1", 1883),
            max_message_bytes: wire::DEFAULT_MAX_MESSAGE_BYTES,
            queue_depth: crate::channel::DEFAULT_QUEUE_DEPTH,
            props: serde_json::Map::new(),
        }
    }
}

/// Every channel of one task, by name.
#[derive(Clone, Debug)]
pub struct ChannelManager {
    role: String,
    channels: BTreeMap<String, Channel>,
    tags: BTreeMap<String, Vec<String>>,
}

/// Where an `mqtt` channel's broker is: the channel's `brokerHost`, else the first `mqtt` broker.
fn broker_of(config: &TaskConfig, spec: &ChannelSpec, env: &BackendEnv) -> Result<MqttConfig> {
    let host = spec
        .broker_host
        .clone()
        .or_else(|| {
            config
                .brokers
                .iter()
                .find(|b| b.sort.eq_ignore_ascii_case("mqtt"))
                .map(|b| b.host.clone())
        })
        .ok_or_else(|| Error::Config {
            channel: spec.name.clone(),
            reason:
                "backend mqtt but the task config names no mqtt broker (brokers[] or brokerHost)"
                    .to_owned(),
        })?;
    let parsed = MqttConfig::parse(&host)?;
    Ok(MqttConfig { host: parsed.host, port: parsed.port, ..env.mqtt.clone() })
}

/// The options and backend for one channel of `config`.
pub fn plan(
    config: &TaskConfig,
    spec: &ChannelSpec,
    env: &BackendEnv,
) -> Result<(ChannelOptions, Backend)> {
    let peer_role = spec.peer_role(&config.role).ok_or_else(|| Error::Config {
        channel: spec.name.clone(),
        reason: format!("role {} is not in the channel's pair {:?}", config.role, spec.pair),
    })?;
    let opts = ChannelOptions {
        job: config.job.id.clone(),
        channel: spec.name.clone(),
        group: config.group_of(&spec.name).to_owned(),
        me: config.task_id.clone(),
        role: config.role.clone(),
        peer_role: peer_role.to_owned(),
        props: env.props.clone(),
        max_message_bytes: env.max_message_bytes,
        queue_depth: env.queue_depth,
    };
    let backend = match config.backend_of(spec) {
        BackendKind::Local => Backend::Local(env.local_hub.clone()),
        BackendKind::Mqtt => Backend::Mqtt(broker_of(config, spec, env)?),
        BackendKind::P2p => Backend::P2p,
    };
    Ok((opts, backend))
}

impl ChannelManager {
    /// Joins every channel of `config`'s role (all of them, or none on error).
    pub async fn join_all(config: &TaskConfig, env: &BackendEnv) -> Result<ChannelManager> {
        let mut channels = BTreeMap::new();
        let mut tags = BTreeMap::new();
        for spec in &config.channels {
            let (opts, backend) = plan(config, spec, env)?;
            let channel = Channel::open(opts, backend).await?;
            tags.insert(
                spec.name.clone(),
                spec.func_tags.get(&config.role).cloned().unwrap_or_default(),
            );
            channels.insert(spec.name.clone(), channel);
        }
        Ok(ChannelManager { role: config.role.clone(), channels, tags })
    }

    /// The channel called `name`.
    pub fn get(&self, name: &str) -> Option<&Channel> {
        self.channels.get(name)
    }

    /// All channels, by name.
    pub fn channels(&self) -> impl Iterator<Item = &Channel> {
        self.channels.values()
    }

    /// The channel on which this role carries function tag `tag` (the first by name if several).
    pub fn by_tag<'a>(&'a self, tag: &'a str) -> Result<&'a Channel> {
        self.all_by_tag(tag)
            .next()
            .ok_or_else(|| Error::NoChannelForTag { role: self.role.clone(), tag: tag.to_owned() })
    }

    /// Every channel on which this role carries `tag`.
    pub fn all_by_tag<'a>(&'a self, tag: &'a str) -> impl Iterator<Item = &'a Channel> + 'a {
        self.tags
            .iter()
            .filter(move |(_, tags)| tags.iter().any(|t| t == tag))
            .filter_map(|(name, _)| self.channels.get(name))
    }

    /// Waits until every channel has at least one peer.
    pub async fn await_all_joined(&self, timeout: Duration) -> Result<()> {
        for channel in self.channels.values() {
            channel.await_join(timeout).await?;
        }
        Ok(())
    }

    /// Leaves and disconnects every channel.
    pub async fn close(&self) -> Result<()> {
        for channel in self.channels.values() {
            channel.close().await?;
        }
        Ok(())
    }
}
