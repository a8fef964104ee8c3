//! The backend-independent state behind a channel, which every backend feeds: the options
//! of an end, the set of live peer ends with their announced properties, one bounded inbound
//! queue per sending end, the traffic counters and the errors.
//!
//! Each queued message carries a channel-wide arrival number, so `Channel::recv_any` and
//! `Channel::recv_fifo` return messages in the order they arrived across ends. Waiters sleep
//! on a `watch` counter that is bumped on every state change (message queued or taken, peer
//! joined or left). The backends (`local`, `mqtt`, `p2p`) and the [`crate::channel::Channel`]
//! handle both import this module; it imports neither.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use fledge_types::{JobId, TaskId};

use crate::chunk::{Chunk, ChunkError, Opener, Reassembler};
use crate::secure::{Guard, Incarnation, Keyring};
use crate::wire::{self, Message};

/// Default bound of each per-end inbound queue, in messages.
pub const DEFAULT_QUEUE_DEPTH: usize = 64;
/// Default bound on the distinct ends a channel end keeps state for (see
/// [`ChannelOptions::max_senders`]).
pub const DEFAULT_MAX_SENDERS: usize = crate::chunk::DEFAULT_MAX_SENDERS;
/// Decode off the runtime threads above this many bytes.
const BLOCKING_THRESHOLD: usize = 1 << 20;

/// Errors of channels and backends.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A message could not be encoded or decoded.
    #[error("wire format error")]
    Wire(#[from] wire::Error),
    /// The end is not a live peer of this channel.
    #[error("end {end} is not a peer on channel {channel} (group {group})")]
    UnknownEnd {
        /// The end asked for.
        end: TaskId,
        /// The channel.
        channel: String,
        /// The group.
        group: String,
    },
    /// The end left before a message from it arrived.
    #[error("end {end} left channel {channel} without sending")]
    EndLeft {
        /// The end.
        end: TaskId,
        /// The channel.
        channel: String,
    },
    /// Another end with the same id is already on this channel and group.
    #[error("end {end} is already joined to channel {channel} (group {group})")]
    DuplicateEnd {
        /// The end.
        end: TaskId,
        /// The channel.
        channel: String,
        /// The group.
        group: String,
    },
    /// No peer end showed up in time.
    #[error("no peer joined channel {channel} (group {group}) within {timeout:?}")]
    JoinTimeout {
        /// The channel.
        channel: String,
        /// The group.
        group: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// The message is larger than the channel's size limit.
    #[error("message of {size} bytes exceeds channel {channel}'s limit of {limit} bytes")]
    TooLarge {
        /// The channel.
        channel: String,
        /// Encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The backend is not part of this build.
    #[error("backend {0} is not built yet (use mqtt or local)")]
    BackendNotBuilt(String),
    /// The options are invalid.
    #[error("invalid channel options: {0}")]
    InvalidOptions(String),
    /// The task config does not let us join a channel.
    #[error("cannot join channel {channel}: {reason}")]
    Config {
        /// The channel.
        channel: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// No channel of this role carries the function tag.
    #[error("no channel of role {role} has function tag {tag:?}")]
    NoChannelForTag {
        /// The role.
        role: String,
        /// The tag.
        tag: String,
    },
    /// Could not reach the broker.
    #[error("failed to connect to mqtt broker {addr} within {timeout:?}: {reason}")]
    Connect {
        /// `mqtt://host:port` or `mqtts://host:port`.
        addr: String,
        /// How long we tried.
        timeout: Duration,
        /// The last connection error, or what was still missing.
        reason: String,
    },
    /// The TLS handshake with an `mqtts` broker failed for a reason retrying cannot fix: its
    /// certificate does not chain to the CA this end trusts or does not name the host, or no
    /// TLS client config could be built.
    #[error("mqtt broker {broker}: TLS failed: {reason}")]
    BrokerTls {
        /// `mqtts://host:port`.
        broker: String,
        /// What the handshake or the configuration reported.
        reason: String,
    },
    /// The MQTT client refused a request (its event loop is gone).
    #[error("mqtt client request failed")]
    Client(#[from] rumqttc::ClientError),
    /// A peer-to-peer request failed: the metaserver or a peer is unreachable or refused.
    #[error("p2p: {what} failed: {reason}")]
    P2p {
        /// What was being done (with the address).
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// The channel was closed.
    #[error("channel {0} is closed")]
    Closed(String),
    /// A message or presence from one more end than the channel keeps state for.
    #[error(
        "channel {channel}: state is kept for {max} ends already, none for end {end} \
         (ChannelOptions::max_senders)"
    )]
    TooManySenders {
        /// The channel.
        channel: String,
        /// The end refused.
        end: TaskId,
        /// The bound.
        max: usize,
    },
    /// An I/O error (benchmarks, broker).
    #[error("i/o error: {context}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Who this end is and where it joins.
#[derive(Clone, Debug)]
pub struct ChannelOptions {
    /// The job (scopes everything).
    pub job: JobId,
    /// The channel name.
    pub channel: String,
    /// This end's group on the channel.
    pub group: String,
    /// This end's id: the task id.
    pub me: TaskId,
    /// This end's role.
    pub role: String,
    /// The role at the other end of the pair (the same role for a self-loop).
    pub peer_role: String,
    /// Properties announced to peers (e.g. an aggregation group).
    pub props: serde_json::Map<String, serde_json::Value>,
    /// Largest encoded message sent or accepted, in bytes. Default 1 GiB.
    pub max_message_bytes: usize,
    /// Bound of each per-end inbound queue, in messages. Default 64.
    pub queue_depth: usize,
    /// Most distinct ends this end keeps state for at once: half-reassembled messages, inbound
    /// queues and, on a plain channel, peers announced by presence. Past it, what a new end
    /// sends is dropped and counted (`messages_dropped`). On a channel with keys only members
    /// get state at all; on a plain one anyone who can publish could otherwise make up ids
    /// without bound. Default 4096.
    pub max_senders: usize,
    /// This end's keys: with them (the default whenever the task config carries them) the
    /// network backends seal every message and presence, and accept only authentic, fresh ones
    /// from members (see the `secure` module); without them the channel is plain.
    pub security: Option<Arc<Keyring>>,
}

impl ChannelOptions {
    /// Options with default limits and no properties.
    pub fn new(
        job: impl Into<JobId>,
        channel: impl Into<String>,
        group: impl Into<String>,
        me: impl Into<TaskId>,
        role: impl Into<String>,
        peer_role: impl Into<String>,
    ) -> ChannelOptions {
        ChannelOptions {
            job: job.into(),
            channel: channel.into(),
            group: group.into(),
            me: me.into(),
            role: role.into(),
            peer_role: peer_role.into(),
            props: serde_json::Map::new(),
            max_message_bytes: wire::DEFAULT_MAX_MESSAGE_BYTES,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            max_senders: DEFAULT_MAX_SENDERS,
            security: None,
        }
    }

    /// Sets this end's keys (builder style).
    pub fn with_security(mut self, keys: Keyring) -> ChannelOptions {
        self.security = Some(Arc::new(keys));
        self
    }

    /// Announces a property to peers (builder style).
    pub fn with_prop(mut self, key: &str, value: impl Into<serde_json::Value>) -> ChannelOptions {
        self.props.insert(key.to_owned(), value.into());
        self
    }

    /// Inbound queues held at once: one per sender, besides the end's own (a self-loop).
    fn queue_limit(&self) -> usize {
        self.max_senders.saturating_add(1)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        for (field, value) in [
            ("job", self.job.as_str()),
            ("channel", self.channel.as_str()),
            ("group", self.group.as_str()),
            ("me", self.me.as_str()),
            ("role", self.role.as_str()),
            ("peer_role", self.peer_role.as_str()),
        ] {
            if value.is_empty() {
                problems.push(format!("{field} is empty"));
            }
        }
        if self.queue_depth == 0 {
            problems.push("queue_depth is 0".to_owned());
        }
        if self.max_senders == 0 {
            problems.push("max_senders is 0".to_owned());
        }
        if self.max_message_bytes < 1024 {
            problems.push(format!("max_message_bytes {} is below 1024", self.max_message_bytes));
        }
        if problems.is_empty() { Ok(()) } else { Err(Error::InvalidOptions(problems.join("; "))) }
    }
}

/// What a peer end announced when it joined.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EndProps {
    /// Its role.
    pub role: String,
    /// Its task id (= its end id).
    pub task_id: TaskId,
    /// Announced properties (e.g. an aggregation group).
    #[serde(default)]
    pub props: serde_json::Map<String, serde_json::Value>,
    /// Tells one run of the end from the next: a worker that restarts under the same task id
    /// announces another instance (empty when the backend cannot tell).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance: String,
}

/// Traffic counters of one channel, readable at any time.
///
/// Over `mqtt` the byte counts are exact encoded sizes; over `local`, where nothing is encoded,
/// they are the size the encoding would have (an upper-bound estimate of the header).
#[derive(Debug, Default)]
pub struct ChannelMetrics {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    messages_sent: AtomicU64,
    messages_received: AtomicU64,
    messages_dropped: AtomicU64,
    rejected_forged: AtomicU64,
    rejected_replayed: AtomicU64,
}

/// A copy of [`ChannelMetrics`] at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Encoded bytes sent (a broadcast counts once per publish).
    pub bytes_sent: u64,
    /// Encoded bytes received.
    pub bytes_received: u64,
    /// Messages sent.
    pub messages_sent: u64,
    /// Messages received and queued.
    pub messages_received: u64,
    /// Inbound messages dropped as malformed, oversized or spoofed.
    pub messages_dropped: u64,
    /// Inbound messages, chunks, presences or p2p streams refused as not authentic: unsigned
    /// on a channel with keys, from a non-member, for another end, or failing verification.
    /// Also counted in `messages_dropped`.
    pub rejected_forged: u64,
    /// Authentic inbound messages or presences refused because they were already accepted or
    /// come from an older run of their sender. Also counted in `messages_dropped`.
    pub rejected_replayed: u64,
}

impl ChannelMetrics {
    /// Current values.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            messages_sent: self.messages_sent.load(Ordering::Relaxed),
            messages_received: self.messages_received.load(Ordering::Relaxed),
            messages_dropped: self.messages_dropped.load(Ordering::Relaxed),
            rejected_forged: self.rejected_forged.load(Ordering::Relaxed),
            rejected_replayed: self.rejected_replayed.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn sent(&self, bytes: usize) {
        self.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
        self.messages_sent.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn received(&self, bytes: usize) {
        self.bytes_received.fetch_add(bytes as u64, Ordering::Relaxed);
        self.messages_received.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dropped(&self) {
        self.messages_dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn forged(&self) {
        self.dropped();
        self.rejected_forged.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn replayed(&self) {
        self.dropped();
        self.rejected_replayed.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) peers: BTreeMap<TaskId, EndProps>,
    /// How many times each end has joined: a worker that crashes and rejoins under the same
    /// task id is a new incarnation, even when its leave and join fall between two checks.
    pub(crate) incarnations: HashMap<TaskId, u64>,
    /// The incarnation of each end when this end last sent to it.
    pub(crate) sent_to: HashMap<TaskId, u64>,
    pub(crate) queues: HashMap<TaskId, VecDeque<(u64, Message)>>,
    pub(crate) next_seq: u64,
    pub(crate) closed: bool,
}

/// State shared between a channel handle and its backend's background work.
pub(crate) struct Shared {
    pub(crate) opts: ChannelOptions,
    /// This run of the end (see [`EndProps::instance`]).
    pub(crate) instance: String,
    /// This run of the end, as sealed messages and presences carry it.
    pub(crate) incarnation: Incarnation,
    /// What was accepted from each sender (sealed channels).
    pub(crate) guard: Guard,
    /// This end's keys and scope for opening sealed chunks (channels with keys).
    pub(crate) opener: Option<Arc<Opener>>,
    pub(crate) state: Mutex<State>,
    pub(crate) changed: watch::Sender<u64>,
    pub(crate) metrics: ChannelMetrics,
}

impl Shared {
    pub(crate) fn new(opts: ChannelOptions) -> Arc<Shared> {
        let incarnation = Incarnation::new();
        let opener = opts.security.as_ref().map(|keys| {
            Arc::new(Opener {
                keys: keys.clone(),
                job: opts.job.as_str().to_owned(),
                channel: opts.channel.clone(),
                group: opts.group.clone(),
                me: opts.me.as_str().to_owned(),
                bcast: crate::secure::broadcast_to(&opts.role),
            })
        });
        Arc::new(Shared {
            opts,
            instance: format!("{:016x}", incarnation.instance),
            incarnation,
            guard: Guard::default(),
            opener,
            state: Mutex::new(State::default()),
            changed: watch::channel(0).0,
            metrics: ChannelMetrics::default(),
        })
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves only plain collections behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Records a peer end as present (or updates its properties); false (and nothing recorded)
    /// for this end itself, or for a new end once [`ChannelOptions::max_senders`] ends were
    /// seen.
    pub(crate) fn peer_up(&self, props: EndProps) -> bool {
        if props.task_id == self.opts.me {
            return false;
        }
        let changed = {
            let mut state = self.lock();
            if !state.incarnations.contains_key(&props.task_id)
                && state.incarnations.len() >= self.opts.max_senders
            {
                drop(state);
                tracing::warn!(channel = %self.opts.channel, end = %props.task_id, max = self.opts.max_senders, "presence of one end too many ignored");
                self.metrics.dropped();
                return false;
            }
            let previous = state.peers.insert(props.task_id.clone(), props.clone());
            if previous.as_ref().is_none_or(|p| p.instance != props.instance) {
                *state.incarnations.entry(props.task_id.clone()).or_default() += 1;
            }
            previous != Some(props)
        };
        if changed {
            self.bump();
        }
        true
    }

    /// Records a peer end as gone.
    pub(crate) fn peer_down(&self, end: &TaskId) {
        let removed = self.lock().peers.remove(end).is_some();
        if removed {
            tracing::debug!(channel = %self.opts.channel, %end, "peer left");
            self.bump();
        }
    }

    /// This end lost its connection and has it back: whatever it sent before may be lost
    /// (a restarted broker keeps nothing), so no peer it sent to is waited for any more, as
    /// if each were a new incarnation ([`State::can_answer`]); ends it sends to again count
    /// from then on.
    pub(crate) fn reconnected(&self) {
        {
            let mut state = self.lock();
            for incarnation in state.incarnations.values_mut() {
                *incarnation += 1;
            }
        }
        tracing::info!(channel = %self.opts.channel, "reconnected: earlier sends may be lost");
        self.bump();
    }

    /// Marks the channel closed: waiters wake up and fail.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.bump();
    }

    pub(crate) fn is_peer(&self, end: &TaskId) -> bool {
        self.lock().peers.contains_key(end)
    }

    /// Records that a message went to each of `ends` as they are now.
    pub(crate) fn sent_to(&self, ends: &[TaskId]) {
        let mut state = self.lock();
        for end in ends {
            let incarnation = state.incarnations.get(end).copied().unwrap_or_default();
            state.sent_to.insert(end.clone(), incarnation);
        }
    }

    /// Queues `message` from `from`, waiting while that end's queue is full.
    pub(crate) async fn push(&self, from: TaskId, message: Message) -> Result<()> {
        let mut rx = self.changed.subscribe();
        let mut message = Some(message);
        loop {
            {
                let mut state = self.lock();
                if state.closed {
                    return Err(Error::Closed(self.opts.channel.clone()));
                }
                if !state.queues.contains_key(&from)
                    && state.queues.len() >= self.opts.queue_limit()
                {
                    // Ends with nothing queued need no queue.
                    state.queues.retain(|_, queue| !queue.is_empty());
                    if state.queues.len() >= self.opts.queue_limit() {
                        return Err(Error::TooManySenders {
                            channel: self.opts.channel.clone(),
                            end: from,
                            max: self.opts.max_senders,
                        });
                    }
                }
                let seq = state.next_seq;
                let queue = state.queues.entry(from.clone()).or_default();
                if queue.len() < self.opts.queue_depth {
                    queue.push_back((seq, message.take().expect("taken only when queued")));
                    state.next_seq += 1;
                    drop(state);
                    self.bump();
                    return Ok(());
                }
            }
            if rx.changed().await.is_err() {
                return Err(Error::Closed(self.opts.channel.clone()));
            }
        }
    }

    /// Takes one inbound chunk of a network backend through reassembly, verification (sealed
    /// channels: authentic, from a member, for this end, never accepted before) and decoding,
    /// and queues the message it completes. Anything refused is dropped before it is queued,
    /// and counted. Returns whether a message was queued.
    pub(crate) async fn take_chunk(&self, reassembler: &mut Reassembler, chunk: Chunk) -> bool {
        if let Some(part) = &chunk.sealed
            && !self.guard.fresh(
                &TaskId::new(chunk.sender.as_str()),
                part.incarnation,
                chunk.msg_id,
            )
        {
            tracing::warn!(channel = %self.opts.channel, sender = %chunk.sender, msg_id = chunk.msg_id, "replayed chunk dropped");
            self.metrics.replayed();
            return false;
        }
        let whole = match reassembler.push(chunk) {
            Ok(Some(whole)) => whole,
            Ok(None) => return false,
            Err(ChunkError::Forged(why)) => {
                tracing::warn!(channel = %self.opts.channel, %why, "forged message dropped");
                self.metrics.forged();
                return false;
            }
            Err(e) => {
                tracing::warn!(channel = %self.opts.channel, error = %e, "chunk rejected");
                self.metrics.dropped();
                return false;
            }
        };
        let sender = TaskId::new(whole.sender);
        if let Some(incarnation) = whole.incarnation
            && !self.guard.accept(&sender, incarnation, whole.msg_id)
        {
            tracing::warn!(channel = %self.opts.channel, %sender, msg_id = whole.msg_id, "replayed message dropped");
            self.metrics.replayed();
            return false;
        }
        let bytes = whole.bytes;
        let size = bytes.len();
        let limit = self.opts.max_message_bytes;
        let decoded = if size > BLOCKING_THRESHOLD {
            tokio::task::spawn_blocking(move || wire::decode_with_limit(bytes, limit))
                .await
                .unwrap_or_else(|e| panic!("decode task panicked: {e}"))
        } else {
            wire::decode_with_limit(bytes, limit)
        };
        let message = match decoded {
            Ok(m) if m.sender == sender.as_str() => m,
            Ok(m) => {
                tracing::warn!(chunk_sender = %sender, message_sender = %m.sender, "sender mismatch, dropped");
                self.metrics.dropped();
                return false;
            }
            Err(e) => {
                tracing::warn!(%sender, error = %e, "undecodable message dropped");
                self.metrics.dropped();
                return false;
            }
        };
        self.metrics.received(size);
        // Waits while this sender's queue is full: back-pressure reaches the sender.
        match self.push(sender, message).await {
            Ok(()) => true,
            Err(e @ Error::TooManySenders { .. }) => {
                tracing::warn!(error = %e, "message dropped");
                self.metrics.dropped();
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "message arrived after close");
                false
            }
        }
    }

    /// Splits an encoded message into chunk payloads: sealed for `to` (an end id, or
    /// [`crate::secure::broadcast_to`] a role) on a channel with keys, plain otherwise.
    pub(crate) fn chunks(
        &self,
        to: &str,
        msg_id: u64,
        parts: &[bytes::Bytes],
        chunk_size: usize,
    ) -> Vec<bytes::Bytes> {
        let o = &self.opts;
        match &o.security {
            Some(keys) => crate::chunk::split_sealed(
                &crate::chunk::Sealer {
                    keys,
                    scope: [o.job.as_str(), &o.channel, &o.group, to],
                    sender: o.me.as_str(),
                    incarnation: self.incarnation,
                },
                msg_id,
                parts,
                chunk_size,
            ),
            None => crate::chunk::split_parts(o.me.as_str(), msg_id, parts, chunk_size),
        }
    }

    /// Waits until `check` returns `Some`, re-checking on every state change.
    pub(crate) async fn wait_for<T>(
        &self,
        mut check: impl FnMut(&mut State) -> Option<Result<T>>,
    ) -> Result<T> {
        let mut rx = self.changed.subscribe();
        loop {
            let res = {
                let mut state = self.lock();
                match check(&mut state) {
                    Some(res) => Some(res),
                    None if state.closed => Some(Err(Error::Closed(self.opts.channel.clone()))),
                    None => None,
                }
            };
            if let Some(res) = res {
                // Taking a message frees queue space: wake blocked senders.
                self.bump();
                return res;
            }
            if rx.changed().await.is_err() {
                return Err(Error::Closed(self.opts.channel.clone()));
            }
        }
    }
}

impl State {
    /// Whether `end` is present as the incarnation this end last sent to (if it sent at all).
    pub(crate) fn can_answer(&self, end: &TaskId) -> bool {
        self.peers.contains_key(end)
            && self.sent_to.get(end).is_none_or(|sent| self.incarnations.get(end) == Some(sent))
    }
}

pub(crate) fn pop_oldest(state: &mut State, from: &HashSet<TaskId>) -> Option<(TaskId, Message)> {
    let end = state
        .queues
        .iter()
        .filter(|(end, q)| from.contains(*end) && !q.is_empty())
        .min_by_key(|(_, q)| q.front().map(|(seq, _)| *seq))
        .map(|(end, _)| end.clone())?;
    let (_, message) = state.queues.get_mut(&end)?.pop_front()?;
    Some((end, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk;

    /// One whole plain message from `sender`, as its chunk arrives.
    fn message_from(sender: &str) -> Chunk {
        let mut m = Message::new(wire::Kind::Update, 1).with_meta("weight", 1);
        m.sender = sender.to_owned();
        let encoded = wire::encode(&m).expect("encodes");
        chunk::parse(chunk::split(sender, 1, &encoded, 1 << 16).remove(0)).expect("parses")
    }

    /// A plain channel cannot tell made-up ends from real ones: 10,000 of them, each sending a
    /// message and announcing itself, leave state for at most `max_senders` ends (reassembly,
    /// queues, peers), and what they sent beyond it is dropped and counted.
    #[tokio::test]
    async fn made_up_ends_leave_a_receiver_bounded() {
        let mut opts = ChannelOptions::new("j", "param", "g", "me", "agg", "trainer");
        opts.max_senders = 8;
        let shared = Shared::new(opts);
        let mut reassembler = Reassembler::new(1 << 20).with_max_senders(8);
        let mut queued = 0;
        for i in 0..10_000 {
            let end = format!("made-up-{i}");
            if shared.take_chunk(&mut reassembler, message_from(&end)).await {
                queued += 1;
            }
            shared.peer_up(EndProps {
                role: "trainer".to_owned(),
                task_id: TaskId::new(end),
                props: serde_json::Map::new(),
                instance: String::new(),
            });
        }
        let state = shared.lock();
        assert!(reassembler.senders() <= 8, "{} reassembly states", reassembler.senders());
        assert_eq!(state.queues.len(), 9, "one queue per end, and this end's own");
        assert_eq!(queued, 9);
        assert_eq!((state.peers.len(), state.incarnations.len()), (8, 8));
        let dropped = shared.metrics.snapshot().messages_dropped;
        assert_eq!(dropped, 2 * (10_000 - 9) + 1, "messages past 9 queues, presences past 8");
    }
}
