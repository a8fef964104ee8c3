//! The `local` backend: ends in one process meet in a [`LocalHub`].
//!
//! A hub holds rooms keyed by (job, channel, group); an end that joins a room sees the members
//! of its peer role, and they see it. Messages are handed over as values (tensor bytes are
//! shared, not copied), with the same size limit and per-end queue bound as the network
//! backends. Dropping the last handle of a channel removes the end from its room, which peers
//! see as the end leaving.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use fledge_types::TaskId;

use crate::shared::{EndProps, Error, Result, Shared};
use crate::wire::{self, Message};

type RoomKey = (String, String, String);

struct Member {
    shared: Arc<Shared>,
    present: bool,
}

#[derive(Default)]
struct Rooms {
    rooms: HashMap<RoomKey, HashMap<TaskId, Member>>,
}

/// Where in-process ends meet. Cheap to clone; clones share the same rooms.
#[derive(Clone, Default)]
pub struct LocalHub {
    rooms: Arc<Mutex<Rooms>>,
}

impl std::fmt::Debug for LocalHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalHub").finish_non_exhaustive()
    }
}

fn room_key(shared: &Shared) -> RoomKey {
    let o = &shared.opts;
    (o.job.as_str().to_owned(), o.channel.clone(), o.group.clone())
}

fn props_of(shared: &Shared) -> EndProps {
    EndProps {
        role: shared.opts.role.clone(),
        task_id: shared.opts.me.clone(),
        props: shared.opts.props.clone(),
        instance: shared.instance.clone(),
    }
}

/// Whether `a` counts `b` as a peer: `b` plays `a`'s peer role and is another end.
fn is_peer_of(a: &Shared, b: &Shared) -> bool {
    a.opts.me != b.opts.me && b.opts.role == a.opts.peer_role
}

impl LocalHub {
    /// A new, empty hub (tests and simulations that want isolation).
    pub fn new() -> LocalHub {
        LocalHub::default()
    }

    /// The process-wide hub.
    pub fn global() -> LocalHub {
        static GLOBAL: OnceLock<LocalHub> = OnceLock::new();
        GLOBAL.get_or_init(LocalHub::new).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rooms> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn join(&self, shared: Arc<Shared>) -> Result<LocalEnd> {
        let key = room_key(&shared);
        let mut rooms = self.lock();
        let room = rooms.rooms.entry(key.clone()).or_default();
        if room.contains_key(&shared.opts.me) {
            return Err(Error::DuplicateEnd {
                end: shared.opts.me.clone(),
                channel: shared.opts.channel.clone(),
                group: shared.opts.group.clone(),
            });
        }
        room.insert(shared.opts.me.clone(), Member { shared: shared.clone(), present: false });
        drop(rooms);
        let end = LocalEnd { hub: self.clone(), key, shared };
        end.announce(true)?;
        Ok(end)
    }
}

/// One end's membership in a hub room.
pub(crate) struct LocalEnd {
    hub: LocalHub,
    key: RoomKey,
    shared: Arc<Shared>,
}

impl LocalEnd {
    /// Makes this end visible (or invisible) to its peers, and learns who is there.
    pub(crate) fn announce(&self, present: bool) -> Result<()> {
        let mut rooms = self.hub.lock();
        let Some(room) = rooms.rooms.get_mut(&self.key) else {
            return Err(Error::Closed(self.shared.opts.channel.clone()));
        };
        let me = &self.shared.opts.me;
        if let Some(member) = room.get_mut(me) {
            member.present = present;
        }
        for (id, other) in room.iter() {
            if id == me {
                continue;
            }
            if is_peer_of(&other.shared, &self.shared) {
                if present {
                    other.shared.peer_up(props_of(&self.shared));
                } else {
                    other.shared.peer_down(me);
                }
            }
            if present && other.present && is_peer_of(&self.shared, &other.shared) {
                self.shared.peer_up(props_of(&other.shared));
            }
        }
        Ok(())
    }

    fn target(&self, end: &TaskId) -> Result<Arc<Shared>> {
        let rooms = self.hub.lock();
        rooms
            .rooms
            .get(&self.key)
            .and_then(|room| room.get(end))
            .filter(|m| m.present)
            .map(|m| m.shared.clone())
            .ok_or_else(|| Error::UnknownEnd {
                end: end.clone(),
                channel: self.shared.opts.channel.clone(),
                group: self.shared.opts.group.clone(),
            })
    }

    pub(crate) async fn send(&self, end: &TaskId, message: Message) -> Result<()> {
        let target = self.target(end)?;
        let size = wire::encoded_len(&message);
        if size > target.opts.max_message_bytes {
            target.metrics.dropped();
            return Err(Error::TooLarge {
                channel: target.opts.channel.clone(),
                size,
                limit: target.opts.max_message_bytes,
            });
        }
        target.push(self.shared.opts.me.clone(), message).await?;
        self.shared.metrics.sent(size);
        target.metrics.received(size);
        Ok(())
    }

    pub(crate) async fn broadcast(&self, ends: &[TaskId], message: Message) -> Result<()> {
        for end in ends {
            // An end that left between `ends()` and now, or is closing (its queues are shut
            // and it is about to leave), is skipped, as on a broker.
            match self.send(end, message.clone()).await {
                Ok(()) | Err(Error::UnknownEnd { .. } | Error::Closed(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl Drop for LocalEnd {
    fn drop(&mut self) {
        let _ = self.announce(false);
        let mut rooms = self.hub.lock();
        if let Some(room) = rooms.rooms.get_mut(&self.key) {
            room.remove(&self.shared.opts.me);
            if room.is_empty() {
                rooms.rooms.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::channel::{Backend, Channel, ChannelOptions};
    use crate::wire::{Kind, Message};

    use super::LocalHub;

    /// A broadcast skips an end that is closing (its queues shut, its leave not announced yet),
    /// as a broker would, instead of failing the sender: an aggregator's last broadcast must not
    /// fail because one trainer finished first.
    #[tokio::test]
    async fn a_broadcast_skips_an_end_that_is_closing() {
        let hub = LocalHub::new();
        let open = |me: &str, role: &str, peer: &str| {
            let opts = ChannelOptions::new("j", "param", "default", me, role, peer);
            Channel::open(opts, Backend::Local(hub.clone()))
        };
        let agg = open("agg", "aggregator", "trainer").await.expect("aggregator");
        let closing = open("t0", "trainer", "aggregator").await.expect("t0");
        let staying = open("t1", "trainer", "aggregator").await.expect("t1");
        agg.await_ends(2, Duration::from_secs(5)).await.expect("both trainers");
        closing.shared().close();
        agg.broadcast(Message::new(Kind::EndOfTraining, 3)).await.expect("the broadcast");
        let got = staying.recv(&"agg".into()).await.expect("t1 still gets it");
        assert_eq!((got.kind, got.round), (Kind::EndOfTraining, 3));
    }
}
