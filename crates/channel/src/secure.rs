//! The authenticated, private data plane: who may speak on a channel, what is sealed, and what
//! a receiver accepts.
//!
//! Every end holds a [`Keyring`] for its channel: its own Ed25519 signing key (its identity in
//! the job), the channel's 32-byte symmetric key, and the public keys of every end of the job
//! that may send to it. With a keyring (the default whenever the task config carries one), the
//! `mqtt` and `p2p` backends:
//!
//! - **seal every message**: its encoded bytes are split into chunks (`chunk`, version 2), each
//!   chunk encrypted in place with ChaCha20-Poly1305 under a key derived from the channel key
//!   and the message's identity (sender, incarnation, message id), the chunk header as
//!   associated data; the last chunk carries the sender's Ed25519 signature over a SHA-256 of
//!   the scope (job, channel, group, addressee) and every chunk as sent. The tensor data is
//!   copied once (into its chunk), encrypted there, and hashed while it is hot;
//! - **accept a message only** when its sender is a member with a key, every chunk
//!   authenticates, the signature verifies for this end's scope and addressee, and its
//!   (incarnation, message id) was never accepted before (`Guard`): otherwise it is dropped
//!   before it is queued and counted (`rejected_forged`, `rejected_replayed`);
//! - **sign presence** (MQTT): a presence or leave is accepted only signed by the end it names,
//!   newer than the last one accepted from it; an empty retained presence changes nothing, and the
//!   connection's last will is a signed leave valid only for the connection that set it;
//! - **prove the sender of a p2p stream**: its `Hello` is signed, fresh and never seen before.
//!
//! Without a keyring (in-process simulations, unit tests, Python `simulate`), a channel is
//! plain: nothing is signed or encrypted, and a sealed message is refused. The `local` backend
//! hands messages over in process and never seals: nothing crosses a wire.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest as _, Sha256};

use fledge_types::TaskId;

use crate::shared::{Error, Result};

/// Bytes of an Ed25519 signature.
pub(crate) const SIGNATURE_LEN: usize = 64;
/// Bytes of a ChaCha20-Poly1305 tag.
pub(crate) const TAG_LEN: usize = 16;
/// Message ids accepted out of order behind the newest one (unicast and broadcast travel on
/// different topics, so a sender's messages may complete out of order).
const REPLAY_WINDOW: u64 = 4096;
/// How far a p2p hello's clock may be from ours.
pub(crate) const HELLO_SKEW: Duration = Duration::from_secs(300);

/// One end's keys for one channel: its identity, the channel key, and who may speak.
pub struct Keyring {
    signing: SigningKey,
    channel_key: Key,
    members: HashMap<TaskId, VerifyingKey>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("public_key", &hex_of(&self.public_key()))
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Keyring {
    /// A keyring from this end's 32-byte identity seed, the channel's 32-byte key and the
    /// public keys of the ends it may hear from. Fails naming the first invalid public key.
    pub fn new(
        seed: [u8; 32],
        channel_key: [u8; 32],
        members: impl IntoIterator<Item = (TaskId, [u8; 32])>,
    ) -> Result<Keyring> {
        let mut keys = HashMap::new();
        for (end, public) in members {
            let key = VerifyingKey::from_bytes(&public).map_err(|e| {
                Error::InvalidOptions(format!("public key of end {end} is not an Ed25519 key: {e}"))
            })?;
            keys.insert(end, key);
        }
        Ok(Keyring {
            signing: SigningKey::from_bytes(&seed),
            channel_key: Key::from(channel_key),
            members: keys,
        })
    }

    /// The public key that goes with an identity seed.
    pub fn public_key_of(seed: &[u8; 32]) -> [u8; 32] {
        SigningKey::from_bytes(seed).verifying_key().to_bytes()
    }

    /// This end's public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// Whether `end` may speak on this channel.
    pub fn is_member(&self, end: &TaskId) -> bool {
        self.members.contains_key(end)
    }

    pub(crate) fn sign(&self, bytes: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.signing.sign(bytes).to_bytes()
    }

    /// Whether `signature` is `end`'s over `bytes` (false for a non-member).
    pub(crate) fn verify(&self, end: &TaskId, bytes: &[u8], signature: &[u8]) -> bool {
        let Some(key) = self.members.get(end) else { return false };
        let Ok(signature) = Signature::from_slice(signature) else { return false };
        key.verify(bytes, &signature).is_ok()
    }

    /// The AEAD of one message: its key is derived from the channel key and the message's
    /// identity, so chunk nonces (the chunk index) never repeat under one key.
    pub(crate) fn message_cipher(&self, id: &MessageId<'_>) -> ChaCha20Poly1305 {
        let mut h = Sha256::new();
        h.update(b"fledge message key v2\0");
        h.update(self.channel_key);
        id.hash_into(&mut h);
        ChaCha20Poly1305::new(&h.finalize())
    }
}

/// Which run of an end: its start time (ms since the epoch) and a random id. Later starts are
/// newer; a message or presence of an older run than the newest seen is a replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Incarnation {
    pub(crate) start_ms: u64,
    pub(crate) instance: u64,
}

impl Incarnation {
    pub(crate) fn new() -> Incarnation {
        Incarnation { start_ms: now_ms(), instance: rand::random() }
    }
}

/// Equality of two secrets (passwords, tokens) in time independent of where they differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What identifies one sealed message.
pub(crate) struct MessageId<'a> {
    pub(crate) sender: &'a str,
    pub(crate) incarnation: Incarnation,
    pub(crate) msg_id: u64,
}

impl MessageId<'_> {
    fn hash_into(&self, h: &mut Sha256) {
        put_str(h, self.sender);
        h.update(self.incarnation.start_ms.to_le_bytes());
        h.update(self.incarnation.instance.to_le_bytes());
        h.update(self.msg_id.to_le_bytes());
    }
}

/// Hashes a length-prefixed string (so that concatenations cannot collide).
pub(crate) fn put_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

/// The scope a sealed message is signed for: a receiver recomputes it from its own options,
/// so a message moved to another job, channel, group or end fails its signature.
pub(crate) fn scope_hasher(job: &str, channel: &str, group: &str, to: &str) -> Sha256 {
    let mut h = Sha256::new();
    h.update(b"fledge sealed message v2\0");
    for part in [job, channel, group, to] {
        put_str(&mut h, part);
    }
    h
}

/// The addressee of a broadcast to every end of `role`.
pub(crate) fn broadcast_to(role: &str) -> String {
    format!("*{role}")
}

/// Encrypts `data` in place, the chunk header as associated data; returns the tag.
pub(crate) fn seal_chunk(
    cipher: &ChaCha20Poly1305,
    index: u32,
    header: &[u8],
    data: &mut [u8],
) -> [u8; TAG_LEN] {
    cipher
        .encrypt_in_place_detached(&nonce(index), header, data)
        .unwrap_or_else(|_| unreachable!("ChaCha20-Poly1305 seals chunks below 256 GiB"))
        .into()
}

/// Decrypts `data` in place; false (and `data` unspecified) if it does not authenticate.
pub(crate) fn open_chunk(
    cipher: &ChaCha20Poly1305,
    index: u32,
    header: &[u8],
    data: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> bool {
    cipher.decrypt_in_place_detached(&nonce(index), header, data, Tag::from_slice(tag)).is_ok()
}

fn nonce(index: u32) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&index.to_le_bytes());
    Nonce::from(n)
}

/// Why a presence was refused: unsigned, not from a member, or not authentic.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// What is wrong with it.
    Forged(String),
}

#[derive(Default)]
struct Window {
    max: Option<u64>,
    seen: BTreeSet<u64>,
}

impl Window {
    fn fresh(&self, id: u64) -> bool {
        match self.max {
            None => true,
            Some(max) => id > max || (id + REPLAY_WINDOW > max && !self.seen.contains(&id)),
        }
    }

    fn accept(&mut self, id: u64) {
        self.seen.insert(id);
        let max = self.max.map_or(id, |m| m.max(id));
        self.max = Some(max);
        let floor = max.saturating_sub(REPLAY_WINDOW);
        while self.seen.first().is_some_and(|&first| first <= floor) {
            self.seen.pop_first();
        }
    }
}

/// What this end last accepted from one sender.
struct SenderRecord {
    incarnation: Incarnation,
    messages: Window,
    /// Timestamp of the newest presence or leave accepted from this incarnation.
    presence_ts: u64,
    /// The connection epoch of that presence (a last will is valid for it only).
    epoch: u64,
}

impl SenderRecord {
    fn new(incarnation: Incarnation) -> SenderRecord {
        SenderRecord { incarnation, messages: Window::default(), presence_ts: 0, epoch: 0 }
    }
}

/// Replay protection for one channel end: per sender, its newest incarnation and the message
/// ids and presence timestamps accepted from it.
#[derive(Default)]
pub(crate) struct Guard {
    senders: Mutex<HashMap<TaskId, SenderRecord>>,
    /// Recent p2p hello nonces, oldest first, with their timestamps.
    hellos: Mutex<VecDeque<(u64, [u8; 16])>>,
}

impl Guard {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, SenderRecord>> {
        self.senders.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a message could still be accepted (checked on every chunk, cheaply).
    pub(crate) fn fresh(&self, sender: &TaskId, incarnation: Incarnation, msg_id: u64) -> bool {
        match self.lock().get(sender) {
            None => true,
            Some(r) if incarnation > r.incarnation => true,
            Some(r) if incarnation == r.incarnation => r.messages.fresh(msg_id),
            Some(_) => false,
        }
    }

    /// Records an authentic message as accepted; false if it is a replay.
    pub(crate) fn accept(&self, sender: &TaskId, incarnation: Incarnation, msg_id: u64) -> bool {
        let mut senders = self.lock();
        let record =
            senders.entry(sender.clone()).or_insert_with(|| SenderRecord::new(incarnation));
        if incarnation > record.incarnation {
            *record = SenderRecord::new(incarnation);
        }
        if incarnation < record.incarnation || !record.messages.fresh(msg_id) {
            return false;
        }
        record.messages.accept(msg_id);
        true
    }

    /// Records an authentic presence (or leave) as accepted; false if it is a replay. The
    /// newest presence seen again (the broker's retained copy, a QoS 1 redelivery) is `None`:
    /// nothing to do, and nothing to count.
    pub(crate) fn check_presence(&self, end: &TaskId, p: &Presence) -> Option<bool> {
        if p.state != PresenceState::Will {
            let senders = self.lock();
            if let Some(r) = senders.get(end)
                && r.incarnation == p.incarnation
                && r.presence_ts == p.ts
            {
                return None;
            }
        }
        Some(self.accept_presence(end, p))
    }

    /// Records an authentic presence (or leave) as accepted; false if it is a replay.
    pub(crate) fn accept_presence(&self, end: &TaskId, p: &Presence) -> bool {
        let mut senders = self.lock();
        let record = senders.entry(end.clone()).or_insert_with(|| SenderRecord::new(p.incarnation));
        if p.incarnation > record.incarnation {
            *record = SenderRecord::new(p.incarnation);
        }
        if p.incarnation < record.incarnation {
            return false;
        }
        match p.state {
            // Valid only for the connection that set it: once the end announced a later
            // connection, a captured will of an earlier one changes nothing.
            PresenceState::Will => p.epoch == record.epoch,
            PresenceState::Present | PresenceState::Left => {
                if p.ts <= record.presence_ts {
                    return false;
                }
                record.presence_ts = p.ts;
                record.epoch = record.epoch.max(p.epoch);
                true
            }
        }
    }

    /// Records a p2p hello's nonce; false if it was seen within the skew window or is stale.
    pub(crate) fn accept_hello(&self, ts: u64, nonce: [u8; 16]) -> bool {
        let now = now_ms();
        let skew = HELLO_SKEW.as_millis() as u64;
        if ts.abs_diff(now) > skew {
            return false;
        }
        let mut hellos = self.hellos.lock().unwrap_or_else(|e| e.into_inner());
        while hellos.front().is_some_and(|(t, _)| t.saturating_add(2 * skew) < now) {
            hellos.pop_front();
        }
        if hellos.iter().any(|(_, n)| *n == nonce) {
            return false;
        }
        hellos.push_back((ts, nonce));
        true
    }
}

/// What a presence message says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PresenceState {
    /// The end is joined.
    Present = 1,
    /// The end left cleanly.
    Left = 0,
    /// The connection of `epoch` was lost (the broker fired the last will).
    Will = 2,
}

/// A signed presence (MQTT): layout `FLDP`, version 1, state u8, epoch u64, ts u64,
/// incarnation (u64 start ms, u64 instance), props JSON (u32 length + bytes), signature.
#[derive(Debug)]
pub(crate) struct Presence {
    pub(crate) state: PresenceState,
    pub(crate) epoch: u64,
    pub(crate) ts: u64,
    pub(crate) incarnation: Incarnation,
    pub(crate) props: Vec<u8>,
}

const PRESENCE_MAGIC: [u8; 4] = *b"FLDP";
const PRESENCE_FIXED: usize = 4 + 1 + 1 + 8 + 8 + 8 + 8 + 4;
/// Largest presence accepted (announced properties are small).
const MAX_PRESENCE_BYTES: usize = 64 << 10;

fn presence_signed_bytes(scope: [&str; 4], body: &[u8]) -> Vec<u8> {
    let mut out = b"fledge presence v1\0".to_vec();
    for part in scope {
        out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(body);
    out
}

impl Presence {
    /// Encodes and signs this presence of `end` on (job, channel, group).
    pub(crate) fn seal(&self, keys: &Keyring, scope: [&str; 4]) -> Vec<u8> {
        let mut body = Vec::with_capacity(PRESENCE_FIXED + self.props.len() + SIGNATURE_LEN);
        body.extend_from_slice(&PRESENCE_MAGIC);
        body.push(1);
        body.push(self.state as u8);
        body.extend_from_slice(&self.epoch.to_le_bytes());
        body.extend_from_slice(&self.ts.to_le_bytes());
        body.extend_from_slice(&self.incarnation.start_ms.to_le_bytes());
        body.extend_from_slice(&self.incarnation.instance.to_le_bytes());
        body.extend_from_slice(&(self.props.len() as u32).to_le_bytes());
        body.extend_from_slice(&self.props);
        let signature = keys.sign(&presence_signed_bytes(scope, &body));
        body.extend_from_slice(&signature);
        body
    }

    /// Parses and verifies a presence of `end` (scope's last part) on (job, channel, group).
    pub(crate) fn open(
        keys: &Keyring,
        end: &TaskId,
        scope: [&str; 4],
        payload: &[u8],
    ) -> std::result::Result<Presence, Rejection> {
        let forged = |why: &str| Rejection::Forged(format!("presence of {end}: {why}"));
        if payload.is_empty() {
            return Err(forged("empty (unsigned)"));
        }
        if payload.len() > MAX_PRESENCE_BYTES {
            return Err(forged(&format!("{} bytes exceeds {MAX_PRESENCE_BYTES}", payload.len())));
        }
        if !keys.is_member(end) {
            return Err(forged("not a member of the channel"));
        }
        if payload.len() < PRESENCE_FIXED + SIGNATURE_LEN || payload[..4] != PRESENCE_MAGIC {
            return Err(forged("not a signed presence"));
        }
        let (body, signature) = payload.split_at(payload.len() - SIGNATURE_LEN);
        if !keys.verify(end, &presence_signed_bytes(scope, body), signature) {
            return Err(forged("bad signature"));
        }
        // Signed by a member: the layout is trusted only as far as it is checked.
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if body[4] != 1 {
            return Err(forged(&format!("unsupported presence version {}", body[4])));
        }
        let state = match body[5] {
            0 => PresenceState::Left,
            1 => PresenceState::Present,
            2 => PresenceState::Will,
            other => return Err(forged(&format!("unknown presence state {other}"))),
        };
        let mut len = [0u8; 4];
        len.copy_from_slice(&body[38..42]);
        let props_len = u32::from_le_bytes(len) as usize;
        if body.len() != PRESENCE_FIXED + props_len {
            return Err(forged("length mismatch"));
        }
        Ok(Presence {
            state,
            epoch: u64_at(6),
            ts: u64_at(14),
            incarnation: Incarnation { start_ms: u64_at(22), instance: u64_at(30) },
            props: body[PRESENCE_FIXED..].to_vec(),
        })
    }
}

/// The bytes a p2p hello's signature covers.
pub(crate) fn hello_signed_bytes(scope: [&str; 5], ts: u64, nonce: &[u8]) -> Vec<u8> {
    let mut out = b"fledge p2p hello v1\0".to_vec();
    for part in scope {
        out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        out.extend_from_slice(part.as_bytes());
    }
    out.extend_from_slice(&ts.to_le_bytes());
    out.extend_from_slice(nonce);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(seed: u8, members: &[(&str, u8)]) -> Keyring {
        Keyring::new(
            [seed; 32],
            [7; 32],
            members.iter().map(|(e, s)| (TaskId::new(*e), Keyring::public_key_of(&[*s; 32]))),
        )
        .expect("valid keys")
    }

    #[test]
    fn signatures_verify_only_for_the_signer() {
        let a = ring(1, &[("b", 2)]);
        let b = ring(2, &[("a", 1)]);
        let sig = a.sign(b"hello");
        assert!(b.verify(&TaskId::new("a"), b"hello", &sig));
        assert!(!b.verify(&TaskId::new("a"), b"hellO", &sig));
        assert!(!b.verify(&TaskId::new("c"), b"hello", &sig), "non-member");
        assert!(!a.verify(&TaskId::new("b"), b"hello", &sig), "wrong signer");
        assert!(!format!("{a:?}").contains("0101"), "{a:?}");
    }

    #[test]
    fn the_window_accepts_each_id_once_even_out_of_order() {
        let g = Guard::default();
        let s = TaskId::new("s");
        let inc = Incarnation { start_ms: 10, instance: 1 };
        assert!(g.accept(&s, inc, 5));
        assert!(!g.accept(&s, inc, 5), "replay");
        assert!(g.accept(&s, inc, 3), "late but new");
        assert!(!g.fresh(&s, inc, 3));
        assert!(g.accept(&s, inc, 5 + REPLAY_WINDOW + 1));
        assert!(!g.fresh(&s, inc, 4), "fell out of the window");
        let older = Incarnation { start_ms: 9, instance: 9 };
        assert!(!g.accept(&s, older, 1_000_000), "older run");
        let newer = Incarnation { start_ms: 11, instance: 0 };
        assert!(g.accept(&s, newer, 0), "restart");
        assert!(!g.fresh(&s, inc, 100_000), "the previous run is over");
    }

    #[test]
    fn presence_is_signed_fresh_and_a_will_counts_once_per_connection() {
        let a = ring(1, &[]);
        let b = ring(2, &[("a", 1)]);
        let end = TaskId::new("a");
        let scope = ["j", "c", "g", "a"];
        let inc = Incarnation { start_ms: 1, instance: 1 };
        let p = |state, epoch, ts| Presence {
            state,
            epoch,
            ts,
            incarnation: inc,
            props: b"{}".to_vec(),
        };
        let g = Guard::default();
        let open = |bytes: &[u8]| Presence::open(&b, &end, scope, bytes);
        let up = a.seal_presence_for_test(&p(PresenceState::Present, 0, 5), scope);
        assert!(g.accept_presence(&end, &open(&up).expect("authentic")));
        assert!(!g.accept_presence(&end, &open(&up).expect("authentic")), "replayed");
        assert!(matches!(open(b""), Err(Rejection::Forged(_))));
        assert!(matches!(
            Presence::open(&b, &end, ["j", "c", "other", "a"], &up),
            Err(Rejection::Forged(_))
        ));
        let mut tampered = up.clone();
        tampered[14] ^= 1;
        assert!(matches!(open(&tampered), Err(Rejection::Forged(_))));
        let old_will = a.seal_presence_for_test(&p(PresenceState::Will, 0, 0), scope);
        let up1 = a.seal_presence_for_test(&p(PresenceState::Present, 1, 6), scope);
        assert!(g.accept_presence(&end, &open(&up1).expect("authentic")));
        assert!(!g.accept_presence(&end, &open(&old_will).expect("authentic")), "stale will");
        let will = a.seal_presence_for_test(&p(PresenceState::Will, 1, 0), scope);
        assert!(g.accept_presence(&end, &open(&will).expect("authentic")));
        let up2 = a.seal_presence_for_test(&p(PresenceState::Present, 2, 7), scope);
        assert!(g.accept_presence(&end, &open(&up2).expect("authentic")), "reconnected");
        assert!(!g.accept_presence(&end, &open(&will).expect("authentic")), "captured will");
    }

    impl Keyring {
        fn seal_presence_for_test(&self, p: &Presence, scope: [&str; 4]) -> Vec<u8> {
            p.seal(self, scope)
        }
    }

    #[test]
    fn hellos_are_fresh_and_single_use() {
        let g = Guard::default();
        let now = now_ms();
        assert!(g.accept_hello(now, [1; 16]));
        assert!(!g.accept_hello(now, [1; 16]));
        assert!(!g.accept_hello(now - 3_600_000, [2; 16]), "stale");
    }

    #[test]
    fn chunks_open_only_unchanged_and_under_their_message_key() {
        let k = ring(1, &[]);
        let id = MessageId {
            sender: "a",
            incarnation: Incarnation { start_ms: 1, instance: 2 },
            msg_id: 3,
        };
        let cipher = k.message_cipher(&id);
        let mut data = b"secret weights".to_vec();
        let tag = seal_chunk(&cipher, 0, b"hdr", &mut data);
        assert_ne!(&data, b"secret weights");
        let mut copy = data.clone();
        assert!(!open_chunk(&cipher, 1, b"hdr", &mut copy, &tag), "other index");
        let mut copy = data.clone();
        assert!(!open_chunk(&cipher, 0, b"hdR", &mut copy, &tag), "other header");
        let other = k.message_cipher(&MessageId { msg_id: 4, ..id });
        let mut copy = data.clone();
        assert!(!open_chunk(&other, 0, b"hdr", &mut copy, &tag), "other message");
        assert!(open_chunk(&cipher, 0, b"hdr", &mut data, &tag));
        assert_eq!(&data, b"secret weights");
    }
}
