//! The `mqtt` backend: one rumqttc connection per channel end, QoS 1, over TLS (`mqtts://`)
//! when the broker entry says so.
//!
//! Topics, with every segment percent-escaped (`/`, `+`, `#`, `%`):
//!
//! - `fledge/{job}/{channel}/{group}/data/{end}`: unicast to `end`;
//! - `fledge/{job}/{channel}/{group}/bcast/{role}`: broadcast to every end of `role`
//!   (the broker fans out, so a sender uploads a broadcast once);
//! - `fledge/{job}/{channel}/{group}/presence/{role}/{end}`: retained JSON [`EndProps`] while
//!   `end` is joined, re-published every heartbeat; an empty retained payload (a clean leave or
//!   the connection's last will) clears it.
//!
//! An end subscribes to its own data topic, its role's broadcast topic and the presence topics of
//! its peer role, so it only ever sees its own job, channel and group. A peer leaves `ends()` when
//! its presence is cleared (clean leave, or the broker firing its will when the connection drops
//! or misses keep-alives) or when no heartbeat came for `liveness_timeout`.
//!
//! Encoded messages are split into chunks of `chunk_size` bytes (see the `chunk` module) and
//! reassembled with bounded memory on the other side: state for at most `max_senders` ends (on
//! a channel with keys, members only, and only for chunks that authenticate). Order is kept per sender for unicast
//! messages and, separately, for broadcasts (they travel on different topics).
//!
//! The event loop keeps polling after errors, so a restarted broker is reconnected to; on every
//! ConnAck the end re-subscribes and re-announces itself.
//!
//! TLS ([`MqttTls`]): the broker's certificate must chain to the CA given (the broker entry's
//! `ca`, else the task config's `controlPlaneCa`; with neither, the system's roots, for a
//! certificate from a public CA) and name the host connected to; there is no way to turn
//! verification off. A handshake refused for that reason fails `open` at once with
//! [`Error::BrokerTls`] naming the broker, instead of retrying until the connect timeout.
//!
//! On a channel with keys (see `secure`) every message is sealed (encrypted, signed, replay
//! protected) and every presence is signed: an unsigned or empty retained presence changes
//! nothing, and the last will is a signed leave for the current connection only (each
//! reconnection sets a new one, so a captured will cannot evict the end later).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, TlsConfiguration, TlsError, Transport,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use fledge_types::TaskId;

use crate::chunk::{self, Reassembler};
use crate::secure::{self, Presence, PresenceState, Rejection};
use crate::shared::{EndProps, Error, Result, Shared};
use crate::wire::{self, Message};

/// Default chunk size: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: usize = 4 << 20;
/// Room for the topic, the MQTT header and the chunk header on top of a chunk.
const PACKET_SLACK: usize = 128 << 10;
/// Encode and decode off the runtime threads above this many bytes.
const BLOCKING_THRESHOLD: usize = 1 << 20;

/// How to reach the broker and how to pace liveness.
#[derive(Clone, Debug)]
pub struct MqttConfig {
    /// Broker host name or IP.
    pub host: String,
    /// Broker port (1883 by default).
    pub port: u16,
    /// Largest chunk payload in bytes. Default 4 MiB.
    pub chunk_size: usize,
    /// MQTT keep-alive; the broker fires the last will after 1.5× this without traffic.
    /// At least 1 s. Default 5 s.
    pub keep_alive: Duration,
    /// Presence heartbeat period. Default 1 s.
    pub heartbeat: Duration,
    /// A peer without a heartbeat for this long leaves `ends()`. Default 10 s.
    pub liveness_timeout: Duration,
    /// How long `open` waits for the broker. Default 10 s.
    pub connect_timeout: Duration,
    /// Username and password presented at CONNECT (the task's broker credential); `None`
    /// connects anonymously.
    pub credentials: Option<MqttCredentials>,
    /// TLS towards the broker (`mqtts://`); `None` speaks plain MQTT.
    pub tls: Option<MqttTls>,
}

/// TLS towards an `mqtts` broker: its certificate must chain to `ca` (else to a root of the
/// system's trust store) and name the host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MqttTls {
    /// The CA the broker's certificate must chain to, and the only one trusted; `None` trusts
    /// the system's roots (a broker with a certificate from a public CA).
    pub ca: Option<fledge_tls::Ca>,
}

impl MqttTls {
    /// The rustls client config (ring provider) that trusts `ca` only, or the system's roots;
    /// `broker` names the broker in errors.
    fn client_config(&self, broker: &str) -> Result<Arc<rustls::ClientConfig>> {
        let config = match &self.ca {
            Some(ca) => ca.client_config(),
            None => fledge_tls::system_client_config(),
        };
        let config = config.map_err(|e| Error::BrokerTls {
            broker: broker.to_owned(),
            reason: format!("cannot build the TLS client config: {e}"),
        })?;
        Ok(Arc::new(config))
    }
}

/// A broker login. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttCredentials {
    /// MQTT username.
    pub username: String,
    /// MQTT password.
    pub password: String,
}

impl std::fmt::Debug for MqttCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl MqttConfig {
    /// Defaults for a broker at `host:port`.
    pub fn new(host: impl Into<String>, port: u16) -> MqttConfig {
        MqttConfig {
            host: host.into(),
            port,
            chunk_size: DEFAULT_CHUNK_SIZE,
            keep_alive: Duration::from_secs(5),
            heartbeat: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            credentials: None,
            tls: None,
        }
    }

    /// Parses `mqtt://host:port`, `tcp://host:port`, `host:port` or `host` (plain, port 1883),
    /// and `mqtts://host:port`, `ssl://host:port` (TLS, port 8883 by default; the CA to trust
    /// is set apart, in [`MqttTls::ca`]).
    pub fn parse(addr: &str) -> Result<MqttConfig> {
        let bad = |why: &str| Error::InvalidOptions(format!("broker address {addr:?}: {why}"));
        let (rest, tls) = match addr.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (rest, false),
            Some(("mqtts" | "ssl", rest)) => (rest, true),
            Some((scheme, _)) => {
                return Err(bad(&format!(
                    "unsupported scheme {scheme:?} (use mqtt:// or mqtts://)"
                )));
            }
            None => (addr, false),
        };
        let default_port = if tls { 8883 } else { 1883 };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() {
            return Err(bad("no host"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                let port: u16 = port.parse().map_err(|_| bad(&format!("bad port {port:?}")))?;
                (host.trim_start_matches('[').trim_end_matches(']'), port)
            }
            _ => (rest, default_port),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let mut config = MqttConfig::new(host, port);
        config.tls = tls.then(MqttTls::default);
        Ok(config)
    }

    /// `mqtt://host:port` or `mqtts://host:port` (how errors name the broker).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            format!("{scheme}://[{}]:{}", self.host, self.port)
        } else {
            format!("{scheme}://{}:{}", self.host, self.port)
        }
    }

    /// Sets `options`' transport: TLS trusting [`MqttTls::ca`] only (else the system's roots),
    /// or plain TCP.
    pub fn apply_transport(&self, options: &mut MqttOptions) -> Result<()> {
        match &self.tls {
            Some(tls) => {
                let config = tls.client_config(&self.url())?;
                options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
            }
            None => {
                options.set_transport(Transport::tcp());
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.keep_alive < Duration::from_secs(1) {
            problems.push(format!("keep_alive {:?} is below 1 s", self.keep_alive));
        }
        if self.chunk_size < 1024 {
            problems.push(format!("chunk_size {} is below 1024", self.chunk_size));
        }
        if self.heartbeat.is_zero() {
            problems.push("heartbeat is 0".to_owned());
        }
        if self.liveness_timeout <= self.heartbeat {
            problems.push(format!(
                "liveness_timeout {:?} must exceed heartbeat {:?}",
                self.liveness_timeout, self.heartbeat
            ));
        }
        if problems.is_empty() { Ok(()) } else { Err(Error::InvalidOptions(problems.join("; "))) }
    }
}

/// The topic prefix of every channel of job `job`: `fledge/<job>` (escaped). Everything a job
/// sends goes under it, as `<prefix>/<channel>/<group>/{data/<end>, bcast/<role>,
/// presence/<role>/<end>}`; broker ACLs (see `fledge_control::mosquitto`) are written against it.
pub fn job_topic_prefix(job: &str) -> String {
    format!("fledge/{}", escape(job))
}

/// A topic segment for `id` as ends write it (`/`, `+`, `#`, `%` and NUL escaped).
pub fn topic_segment(id: &str) -> String {
    escape(id)
}

/// Escapes a topic segment so that ids cannot add levels or wildcards.
fn escape(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for c in segment.chars() {
        match c {
            '/' | '+' | '#' | '%' | '\0' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

fn unescape(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    let mut chars = segment.chars();
    while let Some(c) = chars.next() {
        if c == '%' {
            let hex: String = chars.by_ref().take(2).collect();
            match u8::from_str_radix(&hex, 16) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('%');
                    out.push_str(&hex);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The topic names of one end.
#[derive(Debug)]
struct Topics {
    prefix: String,
    my_data: String,
    my_bcast: String,
    peer_bcast: String,
    my_presence: String,
    peer_presence_prefix: String,
}

impl Topics {
    fn new(shared: &Shared) -> Topics {
        let o = &shared.opts;
        let prefix = format!(
            "{}/{}/{}",
            job_topic_prefix(o.job.as_str()),
            escape(&o.channel),
            escape(&o.group)
        );
        Topics {
            my_data: format!("{prefix}/data/{}", escape(o.me.as_str())),
            my_bcast: format!("{prefix}/bcast/{}", escape(&o.role)),
            peer_bcast: format!("{prefix}/bcast/{}", escape(&o.peer_role)),
            my_presence: format!("{prefix}/presence/{}/{}", escape(&o.role), escape(o.me.as_str())),
            peer_presence_prefix: format!("{prefix}/presence/{}/", escape(&o.peer_role)),
            prefix,
        }
    }

    fn data(&self, end: &TaskId) -> String {
        format!("{}/data/{}", self.prefix, escape(end.as_str()))
    }

    fn filters(&self) -> Vec<SubscribeFilter> {
        vec![
            SubscribeFilter::new(self.my_data.clone(), QoS::AtLeastOnce),
            SubscribeFilter::new(self.my_bcast.clone(), QoS::AtLeastOnce),
            SubscribeFilter::new(format!("{}+", self.peer_presence_prefix), QoS::AtLeastOnce),
        ]
    }
}

/// State the event loop, the ticker and the handle share.
struct Ctx {
    shared: Arc<Shared>,
    client: AsyncClient,
    topics: Topics,
    config: MqttConfig,
    joined: AtomicBool,
    hung: CancellationToken,
    last_seen: Mutex<HashMap<TaskId, Instant>>,
    /// `Ok(true)` once subscribed and announced; the last connection error otherwise.
    ready: watch::Sender<std::result::Result<bool, NotConnected>>,
    /// The connection this end is on (sealed presences and the last will name it).
    epoch: AtomicU64,
    /// Timestamp of the last sealed presence sent (strictly increasing).
    presence_ts: AtomicU64,
    /// Connections made so far (a second one is a reconnect).
    connections: AtomicU64,
}

/// Why an end is not connected (yet): the last connection error, and whether it was a TLS
/// handshake refused for a reason that retrying cannot fix.
#[derive(Clone, Debug)]
struct NotConnected {
    reason: String,
    tls_refused: bool,
}

/// Whether `error` is a TLS handshake that rustls refused (a certificate that does not chain
/// to the trusted CA or does not name the host, a peer that does not speak TLS), as opposed to
/// the network failing underneath it.
fn tls_refused(error: &ConnectionError) -> bool {
    match error {
        ConnectionError::Tls(TlsError::TLS(_) | TlsError::DNSName(_) | TlsError::WebPki(_)) => true,
        ConnectionError::Tls(TlsError::Io(io)) => {
            io.get_ref().is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        }
        _ => false,
    }
}

/// The presence payload of `shared` (a sealed one on a channel with keys; plain JSON or empty
/// otherwise).
fn presence_bytes(shared: &Shared, state: PresenceState, epoch: u64, ts: u64) -> Vec<u8> {
    let props = EndProps {
        role: shared.opts.role.clone(),
        task_id: shared.opts.me.clone(),
        props: shared.opts.props.clone(),
        instance: shared.instance.clone(),
    };
    let json =
        || serde_json::to_vec(&props).expect("EndProps serializes: plain strings and JSON values");
    let Some(keys) = &shared.opts.security else {
        return if state == PresenceState::Present { json() } else { Vec::new() };
    };
    let o = &shared.opts;
    let presence = Presence {
        state,
        epoch,
        ts,
        incarnation: shared.incarnation,
        props: if state == PresenceState::Present { json() } else { Vec::new() },
    };
    presence.seal(keys, [o.job.as_str(), &o.channel, &o.group, o.me.as_str()])
}

/// The last will of `shared`'s connection `epoch`.
fn last_will(shared: &Shared, topic: String, epoch: u64) -> LastWill {
    LastWill::new(
        topic,
        presence_bytes(shared, PresenceState::Will, epoch, 0),
        QoS::AtLeastOnce,
        true,
    )
}

impl Ctx {
    fn presence_payload(&self, present: bool) -> Vec<u8> {
        let ts = {
            let now = secure::now_ms();
            let mut prev = self.presence_ts.load(Ordering::SeqCst);
            loop {
                let next = now.max(prev + 1);
                match self.presence_ts.compare_exchange(
                    prev,
                    next,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                ) {
                    Ok(_) => break next,
                    Err(actual) => prev = actual,
                }
            }
        };
        let state = if present { PresenceState::Present } else { PresenceState::Left };
        presence_bytes(&self.shared, state, self.epoch.load(Ordering::SeqCst), ts)
    }

    fn publish_presence(&self) {
        let payload = self.presence_payload(self.joined.load(Ordering::SeqCst));
        // From the event loop and ticker we must not wait on the request queue (the event loop
        // is what drains it); a skipped heartbeat is repeated at the next tick.
        if let Err(e) =
            self.client.try_publish(&self.topics.my_presence, QoS::AtLeastOnce, true, payload)
        {
            tracing::debug!(error = %e, "presence publish skipped");
        }
    }

    /// Handles a presence update; returns the end if it left.
    fn on_presence(&self, end: &str, payload: &[u8]) -> Option<TaskId> {
        let end = TaskId::new(unescape(end));
        if end == self.shared.opts.me {
            return None;
        }
        if let Some(keys) = &self.shared.opts.security {
            let o = &self.shared.opts;
            let scope = [o.job.as_str(), &o.channel, &o.group, end.as_str()];
            let presence = match Presence::open(keys, &end, scope, payload) {
                Ok(p) => p,
                Err(Rejection::Forged(why)) => {
                    tracing::warn!(channel = %o.channel, %why, "presence refused");
                    self.shared.metrics.forged();
                    return None;
                }
            };
            match self.shared.guard.check_presence(&end, &presence) {
                Some(true) => {}
                Some(false) => {
                    tracing::warn!(channel = %o.channel, %end, "replayed presence refused");
                    self.shared.metrics.replayed();
                    return None;
                }
                // The newest presence again: refresh liveness only.
                None if presence.state == PresenceState::Present => {
                    return self.on_props(end, &presence.props);
                }
                None => return None,
            }
            if presence.state != PresenceState::Present {
                self.last_seen.lock().unwrap_or_else(|e| e.into_inner()).remove(&end);
                self.shared.peer_down(&end);
                return Some(end);
            }
            return self.on_props(end, &presence.props);
        }
        if payload.is_empty() {
            self.last_seen.lock().unwrap_or_else(|e| e.into_inner()).remove(&end);
            self.shared.peer_down(&end);
            return Some(end);
        }
        self.on_props(end, payload)
    }

    fn on_props(&self, end: TaskId, payload: &[u8]) -> Option<TaskId> {
        match serde_json::from_slice::<EndProps>(payload) {
            Ok(props) if props.task_id == end && props.role == self.shared.opts.peer_role => {
                if self.shared.peer_up(props) {
                    self.last_seen
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(end, Instant::now());
                }
            }
            Ok(props) => {
                tracing::warn!(%end, claimed = %props.task_id, role = %props.role, "presence does not match its topic, ignored");
            }
            Err(e) => tracing::warn!(%end, error = %e, "malformed presence, ignored"),
        }
        None
    }

    fn expire_peers(&self) {
        let now = Instant::now();
        let expired: Vec<TaskId> = {
            let mut seen = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
            let expired: Vec<TaskId> = seen
                .iter()
                .filter(|(_, t)| now.duration_since(**t) > self.config.liveness_timeout)
                .map(|(e, _)| e.clone())
                .collect();
            for end in &expired {
                seen.remove(end);
            }
            expired
        };
        for end in expired {
            tracing::info!(channel = %self.shared.opts.channel, %end, "peer missed heartbeats, dropped");
            self.shared.peer_down(&end);
        }
    }

    async fn on_data(&self, reassembler: &mut Reassembler, payload: Bytes) {
        let chunk = match chunk::parse(payload) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "malformed chunk dropped");
                self.shared.metrics.dropped();
                return;
            }
        };
        if chunk.sender == self.shared.opts.me.as_str() {
            return; // Our own broadcast on a self-loop channel.
        }
        self.shared.take_chunk(reassembler, chunk).await;
    }
}

/// One end's MQTT connection.
pub(crate) struct MqttEnd {
    ctx: Arc<Ctx>,
    next_msg_id: AtomicU64,
    cancel: CancellationToken,
    event_loop: Mutex<Option<JoinHandle<()>>>,
}

impl MqttEnd {
    pub(crate) async fn open(shared: Arc<Shared>, config: MqttConfig) -> Result<MqttEnd> {
        config.validate()?;
        let topics = Topics::new(&shared);
        let client_id = format!("fledge-{:016x}", rand::random::<u64>());
        let mut options = MqttOptions::new(client_id, config.host.clone(), config.port);
        options
            .set_keep_alive(config.keep_alive)
            .set_clean_session(true)
            .set_max_packet_size(config.chunk_size + PACKET_SLACK, config.chunk_size + PACKET_SLACK)
            .set_inflight(32)
            .set_last_will(last_will(&shared, topics.my_presence.clone(), 0));
        if let Some(login) = &config.credentials {
            options.set_credentials(login.username.clone(), login.password.clone());
        }
        config.apply_transport(&mut options)?;
        let (client, eventloop) = AsyncClient::new(options, 64);
        let (ready, mut ready_rx) = watch::channel(Ok(false));
        let ctx = Arc::new(Ctx {
            shared,
            client,
            topics,
            config: config.clone(),
            joined: AtomicBool::new(true),
            hung: CancellationToken::new(),
            last_seen: Mutex::new(HashMap::new()),
            ready,
            epoch: AtomicU64::new(0),
            presence_ts: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let cancel = CancellationToken::new();
        let event_loop = tokio::spawn(run_event_loop(ctx.clone(), eventloop, cancel.clone()));
        tokio::spawn(run_ticker(ctx.clone(), cancel.clone()));
        let end = MqttEnd {
            ctx,
            next_msg_id: AtomicU64::new(rand::random::<u64>() >> 1),
            cancel,
            event_loop: Mutex::new(Some(event_loop)),
        };
        let connected = {
            // Connected, or refused by TLS: a certificate will not change by retrying.
            let wait = ready_rx.wait_for(|r| match r {
                Ok(ready) => *ready,
                Err(failure) => failure.tls_refused,
            });
            matches!(tokio::time::timeout(config.connect_timeout, wait).await, Ok(Ok(_)))
        };
        let state = ready_rx.borrow().clone();
        match (connected, state) {
            (true, Ok(_)) => Ok(end),
            (_, Err(NotConnected { reason, tls_refused: true })) => {
                Err(Error::BrokerTls { broker: config.url(), reason })
            }
            (_, state) => {
                let reason = match state {
                    Err(failure) => failure.reason,
                    Ok(_) => "no subscription acknowledgement".to_owned(),
                };
                Err(Error::Connect { addr: config.url(), timeout: config.connect_timeout, reason })
            }
        }
    }

    async fn publish_message(&self, topic: String, to: String, message: Message) -> Result<()> {
        let shared = &self.ctx.shared;
        let large = message.tensors.data_bytes() > BLOCKING_THRESHOLD;
        let msg_id = self.next_msg_id.fetch_add(1, Ordering::Relaxed);
        let (sealer, chunk_size, limit) =
            (shared.clone(), self.ctx.config.chunk_size, shared.opts.max_message_bytes);
        // The tensor data is copied once, straight into the chunks (no whole encoded copy);
        // the message, and with it any buffer its tensors share, is released before the chunks
        // are queued.
        let encode = move || -> Result<(usize, Vec<Bytes>)> {
            let encoded = wire::encode_parts(&message)?;
            drop(message);
            let size = encoded.len();
            if size > limit {
                return Ok((size, Vec::new()));
            }
            let parts: Vec<Bytes> = encoded.parts().cloned().collect();
            drop(encoded);
            Ok((size, sealer.chunks(&to, msg_id, &parts, chunk_size)))
        };
        let (size, chunks) = if large {
            tokio::task::spawn_blocking(encode)
                .await
                .unwrap_or_else(|e| panic!("encode task panicked: {e}"))?
        } else {
            encode()?
        };
        if size > shared.opts.max_message_bytes {
            return Err(Error::TooLarge {
                channel: shared.opts.channel.clone(),
                size,
                limit: shared.opts.max_message_bytes,
            });
        }
        for payload in chunks {
            self.ctx.client.publish_bytes(topic.clone(), QoS::AtLeastOnce, false, payload).await?;
        }
        shared.metrics.sent(size);
        Ok(())
    }

    pub(crate) async fn send(&self, end: &TaskId, message: Message) -> Result<()> {
        self.publish_message(self.ctx.topics.data(end), end.as_str().to_owned(), message).await
    }

    pub(crate) async fn broadcast(&self, message: Message) -> Result<()> {
        let to = secure::broadcast_to(&self.ctx.shared.opts.peer_role);
        self.publish_message(self.ctx.topics.peer_bcast.clone(), to, message).await
    }

    pub(crate) async fn announce(&self, present: bool) -> Result<()> {
        self.ctx.joined.store(present, Ordering::SeqCst);
        let payload = self.ctx.presence_payload(present);
        self.ctx
            .client
            .publish(&self.ctx.topics.my_presence, QoS::AtLeastOnce, true, payload)
            .await?;
        Ok(())
    }

    /// Clean leave: clear presence, disconnect, wait (briefly) for the event loop to flush.
    pub(crate) async fn disconnect(&self) -> Result<()> {
        self.announce(false).await?;
        self.ctx.client.disconnect().await?;
        let handle = self.event_loop.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = handle
            && tokio::time::timeout(Duration::from_secs(5), handle).await.is_err()
        {
            tracing::warn!("mqtt event loop did not finish after disconnect");
        }
        self.cancel.cancel();
        Ok(())
    }

    #[cfg(feature = "test-hooks")]
    pub(crate) fn hang(&self) {
        self.ctx.hung.cancel();
    }
}

impl Drop for MqttEnd {
    fn drop(&mut self) {
        // Ends the event loop without a DISCONNECT: the broker fires our last will.
        self.cancel.cancel();
    }
}

async fn run_event_loop(ctx: Arc<Ctx>, mut eventloop: EventLoop, cancel: CancellationToken) {
    let mut reassembler =
        Reassembler::with_opener(ctx.shared.opts.max_message_bytes, ctx.shared.opener.clone())
            .with_max_senders(ctx.shared.opts.max_senders);
    // Reconnection delays: 50 ms doubling to 2 s, with jitter, for as long as it takes;
    // a new schedule starts at every successful connection.
    let schedule = || {
        use backon::BackoffBuilder as _;
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(50))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut backoff = schedule();
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ctx.hung.cancelled() => {
                // Keep the socket open but silent, as a hung process would.
                cancel.cancelled().await;
                break;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = schedule();
                if ctx.connections.fetch_add(1, Ordering::SeqCst) > 0 {
                    ctx.shared.reconnected();
                }
                tracing::debug!(channel = %ctx.shared.opts.channel, "connected to broker");
                if let Err(e) = ctx.client.try_subscribe_many(ctx.topics.filters()) {
                    tracing::warn!(error = %e, "subscribe request failed");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                // Announce only once subscribed, so nobody sends to us before we listen.
                ctx.publish_presence();
                let _previous = ctx.ready.send_replace(Ok(true));
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let topic = publish.topic.as_str();
                if let Some(end) = topic.strip_prefix(&ctx.topics.peer_presence_prefix) {
                    if let Some(gone) = ctx.on_presence(end, &publish.payload) {
                        // Half-delivered messages from a departed end will never complete.
                        reassembler.forget(gone.as_str());
                    }
                } else if topic == ctx.topics.my_data || topic == ctx.topics.my_bcast {
                    ctx.on_data(&mut reassembler, publish.payload).await;
                } else {
                    tracing::debug!(topic, "publish on unexpected topic ignored");
                }
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                if ctx.shared.opts.security.is_some() {
                    // The next connection gets a will of its own: the broker may have fired
                    // (and anyone may have kept) this one's.
                    let epoch = ctx.epoch.fetch_add(1, Ordering::SeqCst) + 1;
                    eventloop.mqtt_options.set_last_will(last_will(
                        &ctx.shared,
                        ctx.topics.my_presence.clone(),
                        epoch,
                    ));
                }
                let delay = backoff.next().unwrap_or(Duration::from_secs(2));
                tracing::debug!(error = %e, ?delay, "mqtt connection error, retrying");
                let failure = NotConnected { reason: e.to_string(), tls_refused: tls_refused(&e) };
                if failure.tls_refused {
                    tracing::warn!(broker = %ctx.config.url(), error = %e, "mqtt broker refused by TLS");
                }
                ctx.ready.send_modify(|r| {
                    if !matches!(r, Ok(true)) {
                        *r = Err(failure);
                    }
                });
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

async fn run_ticker(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(ctx.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ctx.hung.cancelled() => break,
            _ = tick.tick() => {}
        }
        if ctx.joined.load(Ordering::SeqCst) && matches!(*ctx.ready.borrow(), Ok(true)) {
            ctx.publish_presence();
        }
        ctx.expire_peers();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        let c = MqttConfig::parse("mqtt://127.0.0.1:18830").expect("valid");
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 18830));
        let c = MqttConfig::parse("broker.local").expect("valid");
        assert_eq!((c.host.as_str(), c.port), ("broker.local", 1883));
        let c = MqttConfig::parse("tcp://[::1]:1884").expect("valid");
        assert_eq!((c.host.as_str(), c.port), ("::1", 1884));
        for bad in ["ws://h:1", "mqtt://", "h:notaport", ":1883", "mqtts://", "https://h:1"] {
            assert!(MqttConfig::parse(bad).is_err(), "{bad} should be rejected");
        }
        assert!(c.tls.is_none(), "plain without mqtts://");
        assert_eq!(c.url(), "mqtt://[::1]:1884");
        let c = MqttConfig::parse("mqtts://broker.local").expect("valid");
        assert_eq!((c.host.as_str(), c.port), ("broker.local", 8883));
        assert_eq!(c.tls, Some(MqttTls { ca: None }), "TLS, verified with the system's roots");
        assert_eq!(c.url(), "mqtts://broker.local:8883");
        let c = MqttConfig::parse("ssl://10.0.0.5:1883").expect("valid");
        assert_eq!((c.url().as_str(), c.port), ("mqtts://10.0.0.5:1883", 1883));
    }

    #[test]
    fn topic_segments_cannot_inject_levels() {
        for raw in ["a/b", "+", "#", "100%", "plain-id"] {
            let e = escape(raw);
            assert!(!e.contains(['/', '+', '#']), "{e}");
            assert_eq!(unescape(&e), raw);
        }
    }
}
