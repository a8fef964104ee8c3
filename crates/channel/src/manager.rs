//! Joining every channel of a task from its [`TaskConfig`], and finding them by function tag.

use std::collections::BTreeMap;
use std::time::Duration;

use fledge_types::{Backend as BackendKind, ChannelSpec, TaskConfig};

use crate::channel::{Backend, Channel, ChannelOptions, Error, Result};
use crate::local::LocalHub;
use crate::mqtt::{MqttConfig, MqttCredentials, MqttTls};
use crate::p2p::P2pConfig;
use crate::secure::Keyring;
use crate::wire;

/// Process-level settings the task config does not carry.
#[derive(Clone, Debug)]
pub struct BackendEnv {
    /// Hub for `local` channels (the process-wide one by default).
    pub local_hub: LocalHub,
    /// MQTT tuning (chunk size, keep-alive, heartbeat, liveness); host and port come from the
    /// task config.
    pub mqtt: MqttConfig,
    /// p2p tuning (listen host, chunk size, heartbeat, lease); the metaserver comes from the
    /// task config.
    pub p2p: P2pConfig,
    /// Largest message in bytes. Default 1 GiB.
    pub max_message_bytes: usize,
    /// Per-end inbound queue bound.
    pub queue_depth: usize,
    /// Most distinct ends a channel end keeps state for ([`ChannelOptions::max_senders`]).
    pub max_senders: usize,
    /// Properties this end announces on every channel (e.g. an aggregation group).
    pub props: serde_json::Map<String, serde_json::Value>,
}

impl Default for BackendEnv {
    fn default() -> Self {
        BackendEnv {
            local_hub: LocalHub::global(),
            mqtt: MqttConfig::new("127.0.0.1", 1883),
            p2p: P2pConfig::default(),
            max_message_bytes: wire::DEFAULT_MAX_MESSAGE_BYTES,
            queue_depth: crate::channel::DEFAULT_QUEUE_DEPTH,
            max_senders: crate::shared::DEFAULT_MAX_SENDERS,
            props: serde_json::Map::new(),
        }
    }
}

impl BackendEnv {
    /// Sets how long a silent peer counts as alive, for every backend that checks liveness
    /// (MQTT heartbeats, the p2p lease and heartbeats).
    pub fn set_liveness_timeout(&mut self, timeout: Duration) {
        self.mqtt.liveness_timeout = timeout;
        self.p2p.liveness_timeout = timeout;
    }
}

/// Every channel of one task, by name.
#[derive(Clone, Debug)]
pub struct ChannelManager {
    role: String,
    channels: BTreeMap<String, Channel>,
    tags: BTreeMap<String, Vec<String>>,
}

/// Where an `mqtt` channel's broker is: the channel's `brokerHost`, else the first broker.
/// An `mqtts://` broker is verified against its entry's `ca`, else the task config's
/// `controlPlaneCa` (the embedded broker presents the control plane's certificate), else the
/// CA of `env.mqtt.tls`, else the system's roots.
fn broker_of(config: &TaskConfig, spec: &ChannelSpec, env: &BackendEnv) -> Result<MqttConfig> {
    let host = config.broker_for(spec).ok_or_else(|| Error::Config {
        channel: spec.name.clone(),
        reason: "backend mqtt but the task config names no mqtt broker (brokers[] or brokerHost)"
            .to_owned(),
    })?;
    let parsed = MqttConfig::parse(host)?;
    let entry = config.brokers.iter().find(|b| b.host == host);
    // The login issued for this broker, if the config carries one: never sent to a broker
    // other than the one it was issued for.
    let credentials = entry.and_then(|b| {
        Some(MqttCredentials { username: b.username.clone()?, password: b.password.clone()? })
    });
    let bad_ca = |reason: String| Error::Config { channel: spec.name.clone(), reason };
    let entry_ca = entry.and_then(|b| b.ca.as_deref());
    let tls = match (parsed.tls, entry_ca) {
        (None, Some(_)) => {
            return Err(bad_ca(format!(
                "broker {host:?} has a `ca` but a plain address; write mqtts://{} to use TLS",
                host.split_once("://").map_or(host, |(_, rest)| rest)
            )));
        }
        (None, None) => None,
        (Some(_), Some(pem)) => Some(MqttTls {
            ca: Some(
                fledge_tls::Ca::from_pem(pem, &format!("the ca of broker {host}"))
                    .map_err(|e| bad_ca(e.to_string()))?,
            ),
        }),
        (Some(_), None) => match &config.control_plane_ca {
            Some(pem) => Some(MqttTls {
                ca: Some(
                    fledge_tls::Ca::from_pem(pem, "controlPlaneCa")
                        .map_err(|e| bad_ca(e.to_string()))?,
                ),
            }),
            None => Some(env.mqtt.tls.clone().unwrap_or_default()),
        },
    };
    Ok(MqttConfig {
        host: parsed.host,
        port: parsed.port,
        credentials: credentials.or_else(|| env.mqtt.credentials.clone()),
        tls,
        ..env.mqtt.clone()
    })
}

/// Where a `p2p` channel's metaserver is: the task config's `metaserver`.
fn metaserver_of(config: &TaskConfig, spec: &ChannelSpec, env: &BackendEnv) -> Result<P2pConfig> {
    let addr = config.metaserver.as_deref().ok_or_else(|| Error::Config {
        channel: spec.name.clone(),
        reason: "backend p2p but the task config names no metaserver (metaserver)".to_owned(),
    })?;
    let metaserver = P2pConfig::parse_metaserver(addr)?;
    // A plain-text metaserver means the operator opted out of TLS (`--insecure`): the ends'
    // streams follow it. Otherwise they speak TLS unless the environment turned it off.
    let tls = env.p2p.tls && metaserver.starts_with("https://");
    Ok(P2pConfig {
        metaserver,
        metaserver_ca: config.control_plane_ca.clone().or_else(|| env.p2p.metaserver_ca.clone()),
        tls,
        ..env.p2p.clone()
    })
}

/// Decodes 64 hex digits of `what` for channel `channel`.
fn key32(channel: &str, what: &str, hex_digits: &str) -> Result<[u8; 32]> {
    let bad = |reason: String| Error::Config {
        channel: channel.to_owned(),
        reason: format!("dataPlane: {what} {reason}"),
    };
    let bytes = hex::decode(hex_digits).map_err(|e| bad(format!("is not hex: {e}")))?;
    bytes.try_into().map_err(|b: Vec<u8>| bad(format!("is {} bytes, not 32", b.len())))
}

/// This task's keys for channel `spec` when its config carries data-plane keys.
fn keyring_of(config: &TaskConfig, spec: &ChannelSpec) -> Result<Option<Keyring>> {
    let Some(security) = &config.data_plane else { return Ok(None) };
    let name = spec.name.as_str();
    let seed = key32(name, "identity", &security.identity)?;
    let channel_key = security.channel_keys.get(name).ok_or_else(|| Error::Config {
        channel: name.to_owned(),
        reason: format!("dataPlane.channelKeys has no key for channel {name}"),
    })?;
    let channel_key = key32(name, &format!("channelKeys.{name}"), channel_key)?;
    let mut members = Vec::new();
    for (end, public) in security.members.get(name).into_iter().flatten() {
        members.push((
            fledge_types::TaskId::new(end.as_str()),
            key32(name, &format!("members.{name}.{end}"), public)?,
        ));
    }
    Keyring::new(seed, channel_key, members).map(Some)
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
        max_senders: env.max_senders,
        security: keyring_of(config, spec)?.map(std::sync::Arc::new),
    };
    let backend = match config.backend_of(spec) {
        BackendKind::Local => Backend::Local(env.local_hub.clone()),
        BackendKind::Mqtt => Backend::Mqtt(broker_of(config, spec, env)?),
        BackendKind::P2p => Backend::P2p(metaserver_of(config, spec, env)?),
    };
    Ok((opts, backend))
}

impl ChannelManager {
    /// An empty manager for `role`; add channels with [`ChannelManager::insert`]
    /// (simulations that open channels by hand).
    pub fn new(role: impl Into<String>) -> ChannelManager {
        ChannelManager { role: role.into(), channels: BTreeMap::new(), tags: BTreeMap::new() }
    }

    /// Adds (or replaces) a channel with the function tags this role carries on it.
    pub fn insert(&mut self, channel: Channel, tags: Vec<String>) {
        let name = channel.name().to_owned();
        self.tags.insert(name.clone(), tags);
        self.channels.insert(name, channel);
    }

    /// The role whose channels these are.
    pub fn role(&self) -> &str {
        &self.role
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(task: &str, role: &str, group: &str, backend: &str) -> TaskConfig {
        serde_json::from_value(serde_json::json!({
            "taskId": task,
            "role": role,
            "job": {"id": "job-1", "name": "mnist"},
            "backend": backend,
            "channels": [{
                "name": "param",
                "pair": ["trainer", "aggregator"],
                "groupBy": {"type": "tag", "value": ["eu", "us"]},
                "funcTags": {"trainer": ["fetch", "upload"], "aggregator": ["distribute", "aggregate"]}
            }],
            "groupAssociation": {"param": group}
        }))
        .expect("valid task config")
    }

    fn env(hub: &LocalHub) -> BackendEnv {
        BackendEnv { local_hub: hub.clone(), ..BackendEnv::default() }
    }

    #[tokio::test]
    async fn joins_by_config_and_finds_by_tag() {
        let hub = LocalHub::new();
        let agg =
            ChannelManager::join_all(&config("agg-eu", "aggregator", "eu", "local"), &env(&hub))
                .await
                .expect("aggregator joins");
        let mut trainer_env = env(&hub);
        trainer_env.props.insert("weight".into(), 640.into());
        let t1 = ChannelManager::join_all(&config("t1", "trainer", "eu", "local"), &trainer_env)
            .await
            .expect("trainer joins");
        let t2 = ChannelManager::join_all(&config("t2", "trainer", "us", "local"), &trainer_env)
            .await
            .expect("trainer joins");
        let fetch = t1.by_tag("fetch").expect("trainer fetches on param");
        assert_eq!((fetch.name(), fetch.group(), fetch.me().as_str()), ("param", "eu", "t1"));
        let distribute = agg.by_tag("distribute").expect("aggregator distributes on param");
        assert_eq!(distribute.ends(), vec![fledge_types::TaskId::new("t1")]);
        let props = distribute.end_props(&"t1".into()).expect("t1 announced");
        assert_eq!(props.props.get("weight"), Some(&640.into()));
        assert!(t2.by_tag("upload").expect("upload").ends().is_empty(), "us sees no eu aggregator");
        assert!(matches!(
            agg.by_tag("fetch"),
            Err(Error::NoChannelForTag { ref role, ref tag }) if role == "aggregator" && tag == "fetch"
        ));
        assert_eq!(agg.all_by_tag("aggregate").count(), 1);
        agg.await_all_joined(Duration::from_secs(1)).await.expect("peer present");
        t1.close().await.expect("close");
        assert!(distribute.ends().is_empty());
    }

    #[tokio::test]
    async fn bad_configs_are_named() {
        let hub = LocalHub::new();
        let err = ChannelManager::join_all(&config("t1", "coordinator", "eu", "local"), &env(&hub))
            .await
            .expect_err("role not in pair");
        assert!(err.to_string().contains("role coordinator is not in the channel's pair"), "{err}");
        let err = ChannelManager::join_all(&config("t1", "trainer", "eu", "mqtt"), &env(&hub))
            .await
            .expect_err("no broker");
        assert!(err.to_string().contains("names no mqtt broker"), "{err}");
        let err = ChannelManager::join_all(&config("t1", "trainer", "eu", "p2p"), &env(&hub))
            .await
            .expect_err("p2p without a metaserver");
        assert!(err.to_string().contains("names no metaserver"), "{err}");
        let mut bad_metaserver = config("t1", "trainer", "eu", "p2p");
        bad_metaserver.metaserver = Some("mqtt://nowhere:1".into());
        let err = ChannelManager::join_all(&bad_metaserver, &env(&hub)).await.expect_err("scheme");
        assert!(err.to_string().contains("metaserver address"), "{err}");
        let mut bad_broker = config("t1", "trainer", "eu", "mqtt");
        bad_broker.channels[0].broker_host = Some("ws://nowhere:1".into());
        let err = ChannelManager::join_all(&bad_broker, &env(&hub)).await.expect_err("scheme");
        assert!(err.to_string().contains("unsupported scheme"), "{err}");
    }

    /// An `mqtts` broker is verified against its entry's `ca`, else `controlPlaneCa`; a CA
    /// never goes with a plain address, and a bad one is named.
    #[test]
    fn mqtts_brokers_get_the_ca_the_config_names() {
        let pki = |dir: &std::path::Path| {
            fledge_tls::ensure_dir(dir, &["broker".to_owned()]).expect("test CA").ca
        };
        let (a, b) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
        let (own, control) = (pki(a.path()), pki(b.path()));
        let hub = LocalHub::new();
        let mut config = config("t1", "trainer", "eu", "mqtt");
        let spec = config.channels[0].clone();
        let mut entry = fledge_types::BrokerSpec::mqtt("mqtts://broker:8883");
        entry.ca = Some(own.pem().to_owned());
        config.brokers = vec![entry];
        config.control_plane_ca = Some(control.pem().to_owned());
        let trusted = |config: &TaskConfig| {
            let mqtt = broker_of(config, &spec, &env(&hub)).expect("broker");
            assert_eq!((mqtt.host.as_str(), mqtt.port), ("broker", 8883));
            mqtt.tls.expect("tls").ca.map(|ca| ca.fingerprint())
        };
        assert_eq!(trusted(&config), Some(own.fingerprint()), "the entry's own CA first");
        config.brokers[0].ca = None;
        assert_eq!(trusted(&config), Some(control.fingerprint()), "else controlPlaneCa");
        config.control_plane_ca = None;
        assert_eq!(trusted(&config), None, "no CA: the system's roots");

        config.brokers[0].ca = Some("not a certificate".to_owned());
        let err = broker_of(&config, &spec, &env(&hub)).expect_err("bad CA");
        assert!(err.to_string().contains("the ca of broker mqtts://broker:8883"), "{err}");
        config.brokers[0] = fledge_types::BrokerSpec::mqtt("broker:1883");
        config.brokers[0].ca = Some(own.pem().to_owned());
        let err = broker_of(&config, &spec, &env(&hub)).expect_err("CA with a plain address");
        assert!(err.to_string().contains("write mqtts://broker:1883"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_broker_times_out_with_reason() {
        // A port nobody listens on: bind, read, release.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut mqtt = MqttConfig::new("127.0.0.1", port);
        mqtt.connect_timeout = Duration::from_millis(500);
        let opts = ChannelOptions::new("j", "c", "g", "me", "trainer", "aggregator");
        let err = Channel::open(opts, Backend::Mqtt(mqtt)).await.expect_err("nobody listens");
        assert!(matches!(err, Error::Connect { .. }), "{err}");
        assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
    }
}
