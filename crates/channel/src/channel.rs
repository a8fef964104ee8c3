//! The [`Channel`] handle: one end of a channel over one of the backends.
//!
//! The state behind it (peers, per-end inbound queues, counters, errors) is in
//! the crate's private `shared` module, which the backends feed; this module picks the backend and wraps the
//! state in the public API. [`Channel::recv_any`] and [`Channel::recv_fifo`] return messages
//! in the order they arrived across ends.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;

use fledge_types::{JobId, TaskId};

use crate::local::{LocalEnd, LocalHub};
use crate::mqtt::{MqttConfig, MqttEnd};
use crate::p2p::{P2pConfig, P2pEnd};
pub use crate::shared::{
    ChannelMetrics, ChannelOptions, DEFAULT_MAX_SENDERS, DEFAULT_QUEUE_DEPTH, EndProps, Error,
    MetricsSnapshot, Result,
};
use crate::shared::{Shared, pop_oldest};
use crate::wire::{self, Message};

/// Which transport a channel uses, with what it needs to connect.
#[derive(Clone, Debug)]
pub enum Backend {
    /// In-process, through a hub shared by all ends in the process.
    Local(LocalHub),
    /// MQTT through a broker.
    Mqtt(MqttConfig),
    /// Peer-to-peer gRPC streams, found through a metaserver.
    P2p(P2pConfig),
}

pub(crate) enum Transport {
    Local(LocalEnd),
    Mqtt(MqttEnd),
    P2p(P2pEnd),
}

struct Inner {
    shared: Arc<Shared>,
    transport: Transport,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping the last handle without `close` is a crash from the peers' view: the local
        // hub forgets the end, the MQTT connection goes away without a clean disconnect.
        self.shared.close();
    }
}

/// One TAG channel as seen from one end: cheap to clone, all clones share the same state.
#[derive(Clone)]
pub struct Channel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opts = &self.inner.shared.opts;
        f.debug_struct("Channel")
            .field("job", &opts.job)
            .field("channel", &opts.channel)
            .field("group", &opts.group)
            .field("me", &opts.me)
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// Connects to `backend` and joins the channel: peers see this end in their `ends()`.
    pub async fn open(opts: ChannelOptions, backend: Backend) -> Result<Channel> {
        opts.validate()?;
        let shared = Shared::new(opts);
        let transport = match backend {
            Backend::Local(hub) => Transport::Local(hub.join(shared.clone())?),
            Backend::Mqtt(config) => Transport::Mqtt(MqttEnd::open(shared.clone(), config).await?),
            Backend::P2p(config) => Transport::P2p(P2pEnd::open(shared.clone(), config).await?),
        };
        Ok(Channel { inner: Arc::new(Inner { shared, transport }) })
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// The channel name.
    pub fn name(&self) -> &str {
        &self.shared().opts.channel
    }

    /// This end's group.
    pub fn group(&self) -> &str {
        &self.shared().opts.group
    }

    /// The job.
    pub fn job(&self) -> &JobId {
        &self.shared().opts.job
    }

    /// This end's id (the task id).
    pub fn me(&self) -> &TaskId {
        &self.shared().opts.me
    }

    /// This end's role.
    pub fn role(&self) -> &str {
        &self.shared().opts.role
    }

    /// The role of the ends this channel talks to.
    pub fn peer_role(&self) -> &str {
        &self.shared().opts.peer_role
    }

    /// Traffic counters.
    pub fn metrics(&self) -> &ChannelMetrics {
        &self.shared().metrics
    }

    /// Live peer ends (the other role of the pair, or the same role for a self-loop), sorted,
    /// never including this end.
    pub fn ends(&self) -> Vec<TaskId> {
        self.shared().lock().peers.keys().cloned().collect()
    }

    /// What `end` announced, if it is a live peer.
    pub fn end_props(&self, end: &TaskId) -> Option<EndProps> {
        self.shared().lock().peers.get(end).cloned()
    }

    fn check_size(&self, message: &Message) -> Result<usize> {
        let size = wire::encoded_len(message);
        let limit = self.shared().opts.max_message_bytes;
        if size > limit {
            return Err(Error::TooLarge { channel: self.name().to_owned(), size, limit });
        }
        Ok(size)
    }

    fn stamp(&self, mut message: Message) -> Message {
        message.sender = self.me().as_str().to_owned();
        message
    }

    /// Sends `message` to `end`, which must be a live peer. The sender id is set to `me()`.
    ///
    /// Returns once the backend has taken the message (for `mqtt`: queued to the connection,
    /// in order); [`Channel::close`] flushes what is queued, dropping the handle does not.
    pub async fn send(&self, end: &TaskId, message: Message) -> Result<()> {
        if !self.shared().is_peer(end) {
            return Err(Error::UnknownEnd {
                end: end.clone(),
                channel: self.name().to_owned(),
                group: self.group().to_owned(),
            });
        }
        let message = self.stamp(message);
        self.check_size(&message)?;
        self.shared().sent_to(std::slice::from_ref(end));
        match &self.inner.transport {
            Transport::Local(local) => local.send(end, message).await,
            Transport::Mqtt(mqtt) => mqtt.send(end, message).await,
            Transport::P2p(p2p) => p2p.send(end, message).await,
        }
    }

    /// Sends `message` to every current end; returns the ends it was addressed to.
    pub async fn broadcast(&self, message: Message) -> Result<Vec<TaskId>> {
        let message = self.stamp(message);
        self.check_size(&message)?;
        let ends = self.ends();
        self.shared().sent_to(&ends);
        match &self.inner.transport {
            Transport::Local(local) => local.broadcast(&ends, message).await?,
            Transport::Mqtt(mqtt) => mqtt.broadcast(message).await?,
            Transport::P2p(p2p) => p2p.broadcast(&ends, message).await?,
        }
        Ok(ends)
    }

    /// The next message from `end`. Waits for it; fails if `end` is not (or no longer) a peer
    /// and nothing from it is queued.
    pub async fn recv(&self, end: &TaskId) -> Result<Message> {
        self.wait_from(end, |queue| queue.pop_front().map(|(_, message)| message)).await
    }

    /// Waits until `take` gets something from `end`'s queue; fails once `end` is not (or no
    /// longer) a peer and `take` gets nothing.
    async fn wait_from<T>(
        &self,
        end: &TaskId,
        mut take: impl FnMut(&mut VecDeque<(u64, Message)>) -> Option<T>,
    ) -> Result<T> {
        let channel = self.name().to_owned();
        self.shared()
            .wait_for(|state| {
                if let Some(found) = state.queues.get_mut(end).and_then(&mut take) {
                    return Some(Ok(found));
                }
                if !state.peers.contains_key(end) {
                    return Some(Err(Error::EndLeft {
                        end: end.clone(),
                        channel: channel.clone(),
                    }));
                }
                None
            })
            .await
    }

    /// The oldest queued message from any end, waiting for one if none is queued (with no
    /// peers this waits until one joins and sends; wrap it in a timeout if that can happen).
    pub async fn recv_any(&self) -> Result<(TaskId, Message)> {
        self.shared()
            .wait_for(|state| {
                let all: HashSet<TaskId> = state.queues.keys().cloned().collect();
                pop_oldest(state, &all).map(Ok)
            })
            .await
    }

    /// Waits until a message from `end` is queued, without taking it (look at it with
    /// [`Channel::peek`]); fails as [`Channel::recv`] does if `end` is gone and nothing from
    /// it is queued.
    pub async fn await_queued(&self, end: &TaskId) -> Result<()> {
        self.wait_from(end, |queue| (!queue.is_empty()).then_some(())).await
    }

    /// The next message from `end` without taking it, if one is queued.
    pub fn peek(&self, end: &TaskId) -> Option<Message> {
        self.shared().lock().queues.get(end).and_then(|q| q.front()).map(|(_, m)| m.clone())
    }

    /// One message from each of `ends`, in arrival order, until `first_k` have arrived.
    ///
    /// The stream ends early when every end that has not answered yet has left, or has left
    /// and rejoined since this end last sent to it (a restarted worker never got the request
    /// it would be answering, so it is not waited for; its queued messages still count). Items are
    /// yielded as they arrive, so a consumer can fold them one at a time (memory of one
    /// message, not of `first_k`).
    pub fn recv_fifo(
        &self,
        ends: &[TaskId],
        first_k: usize,
    ) -> impl Stream<Item = Result<(TaskId, Message)>> + Send + 'static {
        let pending: HashSet<TaskId> = ends.iter().cloned().collect();
        let channel = self.clone();
        futures::stream::unfold(
            (channel, pending, first_k),
            |(channel, mut pending, left)| async move {
                if left == 0 || pending.is_empty() {
                    return None;
                }
                let res = channel
                    .shared()
                    .wait_for(|state| {
                        if let Some(found) = pop_oldest(state, &pending) {
                            return Some(Ok(Some(found)));
                        }
                        // Nothing queued: give up on ends that are gone or restarted.
                        let alive = pending.iter().any(|e| state.can_answer(e));
                        (!alive).then_some(Ok(None))
                    })
                    .await;
                match res {
                    Ok(Some((end, message))) => {
                        pending.remove(&end);
                        Some((Ok((end, message)), (channel, pending, left - 1)))
                    }
                    Ok(None) => None,
                    Err(e) => Some((Err(e), (channel, HashSet::new(), 0))),
                }
            },
        )
    }

    /// Waits until at least one peer end is present; returns the ends.
    pub async fn await_join(&self, timeout: Duration) -> Result<Vec<TaskId>> {
        self.await_ends(1, timeout).await
    }

    /// Waits until at least `n` peer ends are present; returns the ends.
    pub async fn await_ends(&self, n: usize, timeout: Duration) -> Result<Vec<TaskId>> {
        let wait = self.shared().wait_for(|state| {
            (state.peers.len() >= n).then(|| Ok(state.peers.keys().cloned().collect()))
        });
        tokio::time::timeout(timeout, wait).await.map_err(|_| Error::JoinTimeout {
            channel: self.name().to_owned(),
            group: self.group().to_owned(),
            timeout,
        })?
    }

    /// Waits until `end` is no longer a peer.
    pub async fn await_leave(&self, end: &TaskId, timeout: Duration) -> Result<()> {
        let wait =
            self.shared().wait_for(|state| (!state.peers.contains_key(end)).then_some(Ok(())));
        tokio::time::timeout(timeout, wait).await.map_err(|_| Error::JoinTimeout {
            channel: self.name().to_owned(),
            group: self.group().to_owned(),
            timeout,
        })?
    }

    /// Whether `end` may still answer what this end sent it: it is a peer, it has not been
    /// restarted since, and this end has not reconnected to its broker since (a message lost
    /// on the way is never answered).
    pub fn can_answer(&self, end: &TaskId) -> bool {
        self.shared().lock().can_answer(end)
    }

    /// Waits until `end` is a peer (again: a restarted end rejoins under its id).
    pub async fn await_end(&self, end: &TaskId, timeout: Duration) -> Result<()> {
        let wait = self.shared().wait_for(|state| state.peers.contains_key(end).then_some(Ok(())));
        tokio::time::timeout(timeout, wait).await.map_err(|_| Error::JoinTimeout {
            channel: self.name().to_owned(),
            group: self.group().to_owned(),
            timeout,
        })?
    }

    /// Announces this end again after [`Channel::leave`].
    pub async fn join(&self) -> Result<()> {
        match &self.inner.transport {
            Transport::Local(local) => local.announce(true),
            Transport::Mqtt(mqtt) => mqtt.announce(true).await,
            Transport::P2p(p2p) => p2p.announce(true).await,
        }
    }

    /// Withdraws this end: peers stop seeing it in `ends()`. Queued messages stay readable.
    pub async fn leave(&self) -> Result<()> {
        match &self.inner.transport {
            Transport::Local(local) => local.announce(false),
            Transport::Mqtt(mqtt) => mqtt.announce(false).await,
            Transport::P2p(p2p) => p2p.announce(false).await,
        }
    }

    /// Leaves cleanly and disconnects; every clone of this handle stops working.
    pub async fn close(&self) -> Result<()> {
        // Close first: a backend blocked on a full inbound queue wakes up and stops.
        self.shared().close();
        match &self.inner.transport {
            Transport::Local(local) => local.announce(false),
            Transport::Mqtt(mqtt) => mqtt.disconnect().await,
            Transport::P2p(p2p) => p2p.disconnect().await,
        }
    }

    /// Test hook (feature `test-hooks`, for this crate's own tests): stop all network
    /// activity without closing the connection, as a hung or partitioned process would.
    /// Peers must notice through the liveness timeout.
    #[cfg(feature = "test-hooks")]
    pub fn simulate_hang(&self) {
        match &self.inner.transport {
            Transport::Local(local) => local.announce(false).unwrap_or(()),
            Transport::Mqtt(mqtt) => mqtt.hang(),
            Transport::P2p(p2p) => p2p.hang(),
        }
    }
}
