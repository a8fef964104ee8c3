//! Splitting encoded messages into broker-sized chunks and putting them back together.
//!
//! Chunk layout (little-endian): magic `FLDC`, version u8, sender id (u16 length + UTF-8),
//! message id u64 (per sender, increasing), chunk index u32, chunk count u32, total message
//! length u64, then the chunk's bytes.
//!
//! Reassembly is bounded: a message may not claim more than the size limit, in-order chunks
//! are written straight into one buffer reserved for the claimed total (address space: pages
//! are committed only as bytes arrive; a bogus count allocates nothing), each sender has at most
//! [`MAX_PARTIALS_PER_SENDER`] messages in flight, and duplicate chunks (QoS 1 redelivery) are
//! ignored. Chunks of different senders and messages may interleave freely. State is kept for
//! at most `max_senders` senders at once (see [`Reassembler::with_max_senders`]): a chunk from
//! one more is refused, after senders with nothing half-delivered are let go.
//!
//! Version 2 is the sealed layout of an authenticated channel (see `secure`): after the sender
//! id come the addressee (u16 length + UTF-8: an end id, or `*role` for a broadcast), the same
//! message id, index, count and total (of plaintext bytes), then the sender's incarnation
//! (u64 start ms, u64 instance); then the chunk's bytes encrypted in place, their 16-byte
//! Poly1305 tag, and on the last chunk the sender's 64-byte Ed25519 signature over the SHA-256
//! of the scope and of every chunk as sent. A sealed reassembler decrypts each chunk in place
//! as it is appended and hands out a message only once every chunk and the signature verified.
//! It holds nothing for a sealed chunk before it authenticated: the sender must be a member, and
//! a chunk that starts a message or arrives ahead of a gap is checked (on a copy) before it is
//! kept, so whoever lacks the channel's key cannot make an end buffer bytes or drop a member's
//! half-delivered message.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use chacha20poly1305::ChaCha20Poly1305;
use sha2::{Digest as _, Sha256};

use fledge_types::TaskId;

use crate::secure::{self, Incarnation, Keyring, MessageId, SIGNATURE_LEN, TAG_LEN};

const MAGIC: [u8; 4] = *b"FLDC";
const VERSION: u8 = 1;
/// The sealed chunk layout.
const SEALED_VERSION: u8 = 2;
/// Messages a sender may have half-delivered at once; older ones are dropped beyond this.
pub(crate) const MAX_PARTIALS_PER_SENDER: usize = 4;
/// Completed message ids remembered per sender to drop redelivered chunks.
const REMEMBERED_IDS: usize = 64;
/// Default bound on the senders a reassembler keeps state for.
pub(crate) const DEFAULT_MAX_SENDERS: usize = 4096;

/// Why a chunk was rejected.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ChunkError {
    #[error("chunk truncated at {0}")]
    Truncated(&'static str),
    #[error("not a fledge chunk")]
    BadMagic,
    #[error("unsupported chunk version {0}")]
    Version(u8),
    #[error("chunk sender id is not UTF-8")]
    Sender,
    #[error("chunk index {index} out of {count}")]
    Index { index: u32, count: u32 },
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: u64, limit: usize },
    #[error("chunks carry more bytes than the message length {total}")]
    Overflow { total: u64 },
    #[error("chunk disagrees with earlier chunks of the same message")]
    Inconsistent,
    /// Not authentic: unsealed on a sealed channel, from a non-member, not for this end, or a
    /// chunk or signature that does not verify.
    #[error("forged: {0}")]
    Forged(String),
    #[error("sealed chunk on a channel without keys")]
    Sealed,
    #[error("chunk from {sender}: state is already kept for {max} senders (max_senders)")]
    TooManySenders { sender: String, max: usize },
}

/// One parsed chunk.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub sender: String,
    pub msg_id: u64,
    pub index: u32,
    pub count: u32,
    pub total: u64,
    pub data: Bytes,
    /// What a sealed (version 2) chunk carries besides its encrypted bytes.
    pub sealed: Option<SealedPart>,
}

/// The sealing of one chunk.
#[derive(Debug, Clone)]
pub(crate) struct SealedPart {
    pub to: String,
    pub incarnation: Incarnation,
    /// The raw header (associated data, and hashed for the signature).
    pub header: Bytes,
    pub tag: [u8; TAG_LEN],
    pub signature: Option<[u8; SIGNATURE_LEN]>,
}

/// Who seals: the keys and scope of the sending end.
pub(crate) struct Sealer<'a> {
    pub keys: &'a Keyring,
    /// Job, channel, group, addressee.
    pub scope: [&'a str; 4],
    pub sender: &'a str,
    pub incarnation: Incarnation,
}

/// Splits the concatenation of `parts` into sealed chunk payloads (version 2): each byte is
/// copied once, into its chunk, encrypted there and hashed while hot.
pub(crate) fn split_sealed(
    sealer: &Sealer<'_>,
    msg_id: u64,
    parts: &[Bytes],
    chunk_size: usize,
) -> Vec<Bytes> {
    let chunk_size = chunk_size.max(1);
    let total: usize = parts.iter().map(Bytes::len).sum();
    let count = total.div_ceil(chunk_size).max(1);
    let count32 = u32::try_from(count).expect("chunk count fits u32 for messages under 4 PiB");
    let [job, channel, group, to] = sealer.scope;
    let cipher = sealer.keys.message_cipher(&MessageId {
        sender: sealer.sender,
        incarnation: sealer.incarnation,
        msg_id,
    });
    let mut hasher = secure::scope_hasher(job, channel, group, to);
    let mut parts = Parts::new(parts);
    (0..count)
        .map(|i| {
            let len = chunk_size.min(total - i * chunk_size);
            let last = i + 1 == count;
            let mut buf = BytesMut::with_capacity(
                64 + sealer.sender.len() + to.len() + len + TAG_LEN + SIGNATURE_LEN,
            );
            buf.put_slice(&MAGIC);
            buf.put_u8(SEALED_VERSION);
            put_short_str(&mut buf, sealer.sender);
            put_short_str(&mut buf, to);
            buf.put_u64_le(msg_id);
            buf.put_u32_le(u32::try_from(i).expect("i < count fits u32"));
            buf.put_u32_le(count32);
            buf.put_u64_le(total as u64);
            buf.put_u64_le(sealer.incarnation.start_ms);
            buf.put_u64_le(sealer.incarnation.instance);
            let header_len = buf.len();
            parts.copy_into(&mut buf, len);
            let (header, data) = buf.split_at_mut(header_len);
            let tag = secure::seal_chunk(&cipher, i as u32, header, data);
            buf.put_slice(&tag);
            hasher.update(&buf[..]);
            if last {
                let digest = std::mem::replace(&mut hasher, Sha256::new()).finalize();
                buf.put_slice(&sealer.keys.sign(&digest));
            }
            buf.freeze()
        })
        .collect()
}

/// The pieces of an encoded message, read front to back into chunks.
struct Parts<'a> {
    rest: std::slice::Iter<'a, Bytes>,
    current: &'a [u8],
}

impl<'a> Parts<'a> {
    fn new(parts: &'a [Bytes]) -> Self {
        Parts { rest: parts.iter(), current: &[] }
    }

    /// Appends the next `len` bytes of the pieces to `buf`.
    fn copy_into(&mut self, buf: &mut BytesMut, len: usize) {
        let mut need = len;
        while need > 0 {
            if self.current.is_empty() {
                self.current = self.rest.next().expect("parts hold `total` bytes");
                continue;
            }
            let n = need.min(self.current.len());
            buf.put_slice(&self.current[..n]);
            self.current = &self.current[n..];
            need -= n;
        }
    }
}

fn put_short_str(buf: &mut BytesMut, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    buf.put_u16_le(len);
    buf.put_slice(&s.as_bytes()[..len as usize]);
}

/// Splits `message` into chunk payloads of at most `chunk_size` data bytes each (tests: the
/// backends encode straight into chunks with [`split_parts`]).
#[cfg(test)]
pub(crate) fn split(sender: &str, msg_id: u64, message: &Bytes, chunk_size: usize) -> Vec<Bytes> {
    split_parts(sender, msg_id, std::slice::from_ref(message), chunk_size)
}

/// Splits the concatenation of `parts` (an encoded message in pieces, see
/// `wire::Encoded`) into chunk payloads of at most `chunk_size` data bytes each, copying
/// every byte once, into its chunk.
pub(crate) fn split_parts(
    sender: &str,
    msg_id: u64,
    parts: &[Bytes],
    chunk_size: usize,
) -> Vec<Bytes> {
    let chunk_size = chunk_size.max(1);
    let total: usize = parts.iter().map(Bytes::len).sum();
    let count = total.div_ceil(chunk_size).max(1);
    let count32 = u32::try_from(count).expect("chunk count fits u32 for messages under 4 PiB");
    let mut parts = Parts::new(parts);
    (0..count)
        .map(|i| {
            let len = chunk_size.min(total - i * chunk_size);
            let mut buf = BytesMut::with_capacity(32 + sender.len() + len);
            buf.put_slice(&MAGIC);
            buf.put_u8(VERSION);
            put_short_str(&mut buf, sender);
            buf.put_u64_le(msg_id);
            buf.put_u32_le(u32::try_from(i).expect("i < count fits u32"));
            buf.put_u32_le(count32);
            buf.put_u64_le(total as u64);
            parts.copy_into(&mut buf, len);
            buf.freeze()
        })
        .collect()
}

fn take<const N: usize>(buf: &mut Bytes, what: &'static str) -> Result<[u8; N], ChunkError> {
    if buf.remaining() < N {
        return Err(ChunkError::Truncated(what));
    }
    let mut out = [0u8; N];
    buf.copy_to_slice(&mut out);
    Ok(out)
}

/// Parses a chunk payload (untrusted).
pub(crate) fn parse(input: Bytes) -> Result<Chunk, ChunkError> {
    let mut buf = input.clone();
    if take::<4>(&mut buf, "magic")? != MAGIC {
        return Err(ChunkError::BadMagic);
    }
    let [version] = take::<1>(&mut buf, "version")?;
    if version != VERSION && version != SEALED_VERSION {
        return Err(ChunkError::Version(version));
    }
    let sender = short_str(&mut buf, "sender")?;
    let to = if version == SEALED_VERSION { Some(short_str(&mut buf, "addressee")?) } else { None };
    let msg_id = u64::from_le_bytes(take::<8>(&mut buf, "message id")?);
    let index = u32::from_le_bytes(take::<4>(&mut buf, "index")?);
    let count = u32::from_le_bytes(take::<4>(&mut buf, "count")?);
    let total = u64::from_le_bytes(take::<8>(&mut buf, "total")?);
    if index >= count {
        return Err(ChunkError::Index { index, count });
    }
    let Some(to) = to else {
        return Ok(Chunk { sender, msg_id, index, count, total, data: buf, sealed: None });
    };
    let incarnation = Incarnation {
        start_ms: u64::from_le_bytes(take::<8>(&mut buf, "start")?),
        instance: u64::from_le_bytes(take::<8>(&mut buf, "instance")?),
    };
    let header = input.slice(..input.len() - buf.len());
    let last = index + 1 == count;
    let trailer = TAG_LEN + if last { SIGNATURE_LEN } else { 0 };
    if buf.len() < trailer {
        return Err(ChunkError::Truncated("tag"));
    }
    let mut trail = buf.split_off(buf.len() - trailer);
    let tag = take::<TAG_LEN>(&mut trail, "tag")?;
    let signature = if last { Some(take::<SIGNATURE_LEN>(&mut trail, "signature")?) } else { None };
    Ok(Chunk {
        sender,
        msg_id,
        index,
        count,
        total,
        data: buf,
        sealed: Some(SealedPart { to, incarnation, header, tag, signature }),
    })
}

fn short_str(buf: &mut Bytes, what: &'static str) -> Result<String, ChunkError> {
    let len = u16::from_le_bytes(take::<2>(buf, what)?) as usize;
    if buf.remaining() < len {
        return Err(ChunkError::Truncated(what));
    }
    let raw = buf.split_to(len);
    Ok(std::str::from_utf8(&raw).map_err(|_| ChunkError::Sender)?.to_owned())
}

/// A message being reassembled. Chunks that arrive in order (the usual case: MQTT keeps
/// the order of one publisher's messages on a topic) are appended straight to `whole`, so a
/// message costs its own size once, not twice (chunk buffers plus a final copy); a chunk that
/// arrives ahead of a gap waits in `parked` until the gap is filled.
struct Partial {
    count: u32,
    total: u64,
    /// Bytes received so far (in `whole` and `parked`).
    bytes: u64,
    /// Index of the next chunk `whole` needs.
    next: u32,
    whole: BytesMut,
    parked: BTreeMap<u32, (Bytes, Option<SealedPart>)>,
    /// A sealed message's verification state.
    opening: Option<Opening>,
}

/// What a sealed message needs until its last chunk: its cipher, the running hash of its
/// chunks as sent, and the signature once the last chunk is in.
struct Opening {
    to: String,
    incarnation: Incarnation,
    cipher: ChaCha20Poly1305,
    hasher: Sha256,
    signature: Option<[u8; SIGNATURE_LEN]>,
}

impl Partial {
    /// Appends an in-order chunk, then every parked chunk that now follows; a sealed chunk is
    /// hashed, then decrypted in place.
    fn append(&mut self, data: &[u8], sealed: Option<&SealedPart>) -> Result<(), ChunkError> {
        if self.whole.capacity() == 0 {
            // Reserve the whole message once: no reallocation copies while it grows. The
            // claimed total was checked against the limit; a large reservation is address
            // space, its pages are only committed as chunks are written.
            self.whole.reserve(usize::try_from(self.total).expect("total <= limit fits usize"));
        }
        self.append_one(data, sealed)?;
        while let Some((data, sealed)) = self.parked.remove(&self.next) {
            self.append_one(&data, sealed.as_ref())?;
        }
        Ok(())
    }

    fn append_one(&mut self, data: &[u8], sealed: Option<&SealedPart>) -> Result<(), ChunkError> {
        let start = self.whole.len();
        self.whole.extend_from_slice(data);
        if let (Some(opening), Some(part)) = (self.opening.as_mut(), sealed) {
            opening.hasher.update(&part.header);
            opening.hasher.update(data);
            opening.hasher.update(part.tag);
            let index = self.next;
            if !secure::open_chunk(
                &opening.cipher,
                index,
                &part.header,
                &mut self.whole[start..],
                &part.tag,
            ) {
                // Undo: the real chunk of this index may still come.
                self.whole.truncate(start);
                return Err(ChunkError::Forged(format!("chunk {index} does not authenticate")));
            }
            if part.signature.is_some() {
                opening.signature = part.signature;
            }
        }
        self.next += 1;
        Ok(())
    }
}

#[derive(Default)]
struct SenderState {
    partials: BTreeMap<u64, Partial>,
    done: VecDeque<u64>,
}

/// The keys and scope of a receiving end that accepts only sealed messages.
pub(crate) struct Opener {
    pub keys: Arc<Keyring>,
    pub job: String,
    pub channel: String,
    pub group: String,
    pub me: String,
    /// The addressee of broadcasts to this end's role.
    pub bcast: String,
}

/// A whole message out of the reassembler.
#[derive(Debug, PartialEq)]
pub(crate) struct Whole {
    pub sender: String,
    pub msg_id: u64,
    /// The sender's incarnation (sealed messages only).
    pub incarnation: Option<Incarnation>,
    /// The encoded message (decrypted).
    pub bytes: Bytes,
}

/// Puts chunks back together into whole encoded messages.
pub(crate) struct Reassembler {
    limit: usize,
    senders: HashMap<String, SenderState>,
    opener: Option<Arc<Opener>>,
    max_senders: usize,
}

impl Reassembler {
    /// A reassembler of plain (version 1) chunks.
    #[cfg(test)]
    pub(crate) fn new(limit: usize) -> Reassembler {
        Reassembler::with_opener(limit, None)
    }

    /// A reassembler for `opener`'s end when it has keys (sealed chunks only), else plain.
    pub(crate) fn with_opener(limit: usize, opener: Option<Arc<Opener>>) -> Reassembler {
        Reassembler { limit, senders: HashMap::new(), opener, max_senders: DEFAULT_MAX_SENDERS }
    }

    /// Keeps state for at most `max` senders at once (default [`DEFAULT_MAX_SENDERS`]; at
    /// least 1).
    pub(crate) fn with_max_senders(mut self, max: usize) -> Reassembler {
        self.max_senders = max.max(1);
        self
    }

    /// Senders state is kept for.
    #[cfg(test)]
    pub(crate) fn senders(&self) -> usize {
        self.senders.len()
    }

    /// Makes room for a chunk of a sender not seen yet: lets senders with nothing
    /// half-delivered go (forgetting only which of their messages were complete, which plain
    /// redeliveries are told apart by), then refuses if every one still has a partial message.
    fn admit(&mut self, sender: &str) -> Result<(), ChunkError> {
        if self.senders.len() < self.max_senders || self.senders.contains_key(sender) {
            return Ok(());
        }
        self.senders.retain(|_, state| !state.partials.is_empty());
        if self.senders.len() < self.max_senders {
            return Ok(());
        }
        Err(ChunkError::TooManySenders { sender: sender.to_owned(), max: self.max_senders })
    }

    /// Bytes currently held in partial messages.
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> u64 {
        self.senders.values().flat_map(|s| s.partials.values()).map(|p| p.bytes).sum()
    }

    /// Forgets everything from `sender` (it left).
    pub(crate) fn forget(&mut self, sender: &str) {
        self.senders.remove(sender);
    }

    /// Checks a chunk's sealing against this end before anything is buffered.
    fn check_seal(&self, chunk: &Chunk) -> Result<(), ChunkError> {
        match (&self.opener, &chunk.sealed) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err(ChunkError::Sealed),
            (Some(_), None) => Err(ChunkError::Forged(format!(
                "unsealed chunk from {} on a channel with keys",
                chunk.sender
            ))),
            (Some(opener), Some(part)) => {
                if !opener.keys.is_member(&TaskId::new(chunk.sender.as_str())) {
                    return Err(ChunkError::Forged(format!(
                        "{} is not a member of channel {}",
                        chunk.sender, opener.channel
                    )));
                }
                if part.to != opener.me && part.to != opener.bcast {
                    return Err(ChunkError::Forged(format!(
                        "message for {:?}, this end is {}",
                        part.to, opener.me
                    )));
                }
                Ok(())
            }
        }
    }

    /// Adds a chunk; returns the whole message once its last chunk is in (for a sealed
    /// message: once every chunk authenticated and the sender's signature verified).
    pub(crate) fn push(&mut self, chunk: Chunk) -> Result<Option<Whole>, ChunkError> {
        self.check_seal(&chunk)?;
        if chunk.total > self.limit as u64 {
            return Err(ChunkError::TooLarge { size: chunk.total, limit: self.limit });
        }
        if chunk.data.len() as u64 > chunk.total {
            return Err(ChunkError::Overflow { total: chunk.total });
        }
        let opener = self.opener.clone();
        self.admit(&chunk.sender)?;
        let state = self.senders.entry(chunk.sender.clone()).or_default();
        // Sealed messages are deduplicated by the channel's replay guard, which counts them.
        if opener.is_none() && state.done.contains(&chunk.msg_id) {
            return Ok(None);
        }
        if chunk.count == 1 && opener.is_none() {
            if chunk.data.len() as u64 != chunk.total {
                return Err(ChunkError::Inconsistent);
            }
            remember(state, chunk.msg_id);
            return Ok(Some(Whole {
                sender: chunk.sender,
                msg_id: chunk.msg_id,
                incarnation: None,
                bytes: chunk.data,
            }));
        }
        let is_new = !state.partials.contains_key(&chunk.msg_id);
        if let (Some(opener), Some(part)) = (&opener, &chunk.sealed) {
            // A chunk that opens a message or waits for a gap is kept only once it
            // authenticates; the next chunk in order is checked as it is appended.
            let next = state.partials.get(&chunk.msg_id).map_or(0, |p| p.next);
            if is_new || chunk.index != next {
                authenticate(opener, &chunk, part)?;
            }
        }
        if is_new && state.partials.len() >= MAX_PARTIALS_PER_SENDER {
            // Drop the oldest half-delivered message of this sender to stay bounded.
            if let Some((&oldest, _)) = state.partials.iter().next() {
                tracing::warn!(sender = %chunk.sender, msg_id = oldest, "dropping incomplete message");
                state.partials.remove(&oldest);
            }
        }
        let partial = state.partials.entry(chunk.msg_id).or_insert_with(|| Partial {
            count: chunk.count,
            total: chunk.total,
            bytes: 0,
            next: 0,
            whole: BytesMut::new(),
            parked: BTreeMap::new(),
            opening: match (&opener, &chunk.sealed) {
                (Some(o), Some(part)) => Some(Opening {
                    to: part.to.clone(),
                    incarnation: part.incarnation,
                    cipher: o.keys.message_cipher(&MessageId {
                        sender: &chunk.sender,
                        incarnation: part.incarnation,
                        msg_id: chunk.msg_id,
                    }),
                    hasher: secure::scope_hasher(&o.job, &o.channel, &o.group, &part.to),
                    signature: None,
                }),
                _ => None,
            },
        });
        let consistent = partial.count == chunk.count
            && partial.total == chunk.total
            && match (&partial.opening, &chunk.sealed) {
                (Some(o), Some(p)) => o.to == p.to && o.incarnation == p.incarnation,
                (None, None) => true,
                _ => false,
            };
        if !consistent {
            return Err(ChunkError::Inconsistent);
        }
        if chunk.index < partial.next || partial.parked.contains_key(&chunk.index) {
            return Ok(None);
        }
        let bytes = partial.bytes + chunk.data.len() as u64;
        if bytes > partial.total {
            let total = partial.total;
            state.partials.remove(&chunk.msg_id);
            return Err(ChunkError::Overflow { total });
        }
        if chunk.index == partial.next {
            if let Err(e) = partial.append(&chunk.data, chunk.sealed.as_ref()) {
                // A chunk that does not authenticate is dropped alone (the message is kept for
                // its real chunk); parked chunks that fail after it went with it.
                partial.bytes = partial.whole.len() as u64
                    + partial.parked.values().map(|(d, _)| d.len() as u64).sum::<u64>();
                return Err(e);
            }
            partial.bytes = bytes;
        } else {
            partial.bytes = bytes;
            partial.parked.insert(chunk.index, (chunk.data, chunk.sealed));
        }
        if partial.next != partial.count {
            return Ok(None);
        }
        let partial = state.partials.remove(&chunk.msg_id).expect("present: just inserted into");
        if partial.bytes != partial.total {
            return Err(ChunkError::Inconsistent);
        }
        let incarnation = match (partial.opening, &opener) {
            (Some(opening), Some(_)) => {
                let Some(signature) = opening.signature else {
                    return Err(ChunkError::Forged("the last chunk has no signature".to_owned()));
                };
                let digest = opening.hasher.finalize();
                let sender = TaskId::new(chunk.sender.as_str());
                let keys = &opener.as_ref().expect("matched Some").keys;
                if !keys.verify(&sender, &digest, &signature) {
                    return Err(ChunkError::Forged(format!(
                        "signature of {} does not verify",
                        chunk.sender
                    )));
                }
                Some(opening.incarnation)
            }
            _ => {
                remember(state, chunk.msg_id);
                None
            }
        };
        Ok(Some(Whole {
            sender: chunk.sender,
            msg_id: chunk.msg_id,
            incarnation,
            bytes: partial.whole.freeze(),
        }))
    }
}

/// Whether a sealed chunk authenticates under its message's key (decrypting a copy).
fn authenticate(opener: &Opener, chunk: &Chunk, part: &SealedPart) -> Result<(), ChunkError> {
    let cipher = opener.keys.message_cipher(&MessageId {
        sender: &chunk.sender,
        incarnation: part.incarnation,
        msg_id: chunk.msg_id,
    });
    let mut copy = chunk.data.to_vec();
    if secure::open_chunk(&cipher, chunk.index, &part.header, &mut copy, &part.tag) {
        Ok(())
    } else {
        Err(ChunkError::Forged(format!(
            "chunk {} of message {} from {} does not authenticate",
            chunk.index, chunk.msg_id, chunk.sender
        )))
    }
}

fn remember(state: &mut SenderState, msg_id: u64) {
    if state.done.len() >= REMEMBERED_IDS {
        state.done.pop_front();
    }
    state.done.push_back(msg_id);
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn push(r: &mut Reassembler, c: Chunk) -> Result<Option<(String, Bytes)>, ChunkError> {
        r.push(c).map(|o| o.map(|w| (w.sender, w.bytes)))
    }

    fn message(len: usize) -> Bytes {
        (0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into()
    }

    #[test]
    fn interleaved_senders_and_duplicates_reassemble() {
        let a = message(10_000);
        let b = message(7_001);
        let ca = split("a", 1, &a, 1000);
        let cb = split("b", 1, &b, 1000);
        assert_eq!(ca.len(), 10);
        assert_eq!(cb.len(), 8);
        let mut r = Reassembler::new(1 << 20);
        let mut done = Vec::new();
        // Interleave, reverse b's order and deliver every chunk twice.
        let mut order: Vec<Bytes> = Vec::new();
        for i in 0..10 {
            order.push(ca[i].clone());
            if i < 8 {
                order.push(cb[7 - i].clone());
                order.push(cb[7 - i].clone());
            }
        }
        for c in order {
            if let Some(m) = push(&mut r, parse(c).expect("valid")).expect("accepted") {
                done.push(m);
            }
        }
        assert_eq!(done.len(), 2);
        assert!(done.contains(&("a".to_owned(), a.clone())));
        assert!(done.contains(&("b".to_owned(), b)));
        assert_eq!(r.buffered(), 0);
        // A redelivery of an old chunk after completion is ignored.
        assert_eq!(push(&mut r, parse(ca[3].clone()).expect("valid")).expect("ok"), None);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn bounds_are_enforced() {
        let mut r = Reassembler::new(4096);
        let big = split("a", 1, &message(5000), 1000);
        assert_eq!(
            push(&mut r, parse(big[0].clone()).expect("valid")).expect_err("too large"),
            ChunkError::TooLarge { size: 5000, limit: 4096 }
        );
        // A tiny chunk that claims a huge count allocates nothing up front.
        let mut forged = BytesMut::new();
        forged.put_slice(b"FLDC");
        forged.put_u8(1);
        forged.put_u16_le(1);
        forged.put_slice(b"x");
        forged.put_u64_le(9);
        forged.put_u32_le(0);
        forged.put_u32_le(u32::MAX);
        forged.put_u64_le(4000);
        forged.put_slice(&[0u8; 10]);
        assert_eq!(push(&mut r, parse(forged.freeze()).expect("parses")).expect("held"), None);
        assert_eq!(r.buffered(), 10);
        // Many half-sent messages from one sender stay bounded.
        for id in 100..120 {
            let c = split("x", id, &message(2000), 1000);
            push(&mut r, parse(c[0].clone()).expect("valid")).expect("held");
        }
        assert!(r.buffered() <= (MAX_PARTIALS_PER_SENDER * 1000) as u64);
        assert!(matches!(parse(Bytes::from_static(b"FLD")), Err(ChunkError::Truncated(_))));
        assert!(matches!(parse(Bytes::from_static(b"XXXXX")), Err(ChunkError::BadMagic)));
    }

    /// A plain channel cannot tell a made-up sender from a real one: flooding it with made-up
    /// sender ids leaves state for at most `max_senders` senders, and a real sender's message
    /// in progress still completes.
    #[test]
    fn made_up_senders_leave_plain_state_bounded() {
        let mut r = Reassembler::new(1 << 20).with_max_senders(8);
        let real = split("real", 1, &message(3000), 1000);
        assert_eq!(push(&mut r, parse(real[0].clone()).unwrap()).unwrap(), None);
        // Whole one-chunk messages from 10,000 ids: delivered (nothing tells them apart on a
        // plain channel), but their ids are not all kept.
        for i in 0..10_000 {
            let c = split(&format!("fake-{i}"), 1, &message(10), 1000).remove(0);
            assert!(push(&mut r, parse(c).unwrap()).unwrap().is_some());
            assert!(r.senders() <= 8, "{} senders after {i}", r.senders());
        }
        // Half-sent messages from 10,000 more: once every slot holds one, the rest is refused.
        let mut refused = 0;
        for i in 0..10_000 {
            let c = split(&format!("half-{i}"), 1, &message(2000), 1000).remove(0);
            match push(&mut r, parse(c).unwrap()) {
                Ok(None) => {}
                Err(ChunkError::TooManySenders { max: 8, .. }) => refused += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(refused, 10_000 - 7, "7 slots besides the real sender's");
        assert_eq!(r.senders(), 8);
        assert!(r.buffered() <= 8 * 1000, "{} bytes held", r.buffered());
        for c in &real[1..] {
            push(&mut r, parse(c.clone()).unwrap()).unwrap();
        }
        // Completed, the real sender's slot is free for the next one.
        let c = split("late", 1, &message(10), 1000).remove(0);
        assert!(push(&mut r, parse(c).unwrap()).unwrap().is_some());
    }

    fn keyring(seed: u8) -> Keyring {
        let members = [("a", 1u8), ("b", 2u8)]
            .map(|(e, s)| (TaskId::new(e), Keyring::public_key_of(&[s; 32])));
        Keyring::new([seed; 32], [7; 32], members).unwrap()
    }

    fn sealed_chunks(keys: &Keyring, sender: &str, msg_id: u64, len: usize) -> Vec<Bytes> {
        let sealer = Sealer {
            keys,
            scope: ["j", "c", "g", "b"],
            sender,
            incarnation: Incarnation { start_ms: 1, instance: 1 },
        };
        split_sealed(&sealer, msg_id, &[message(len)], 1000)
    }

    /// On a sealed channel nothing is held for a chunk before it authenticates: chunks of
    /// made-up senders, and chunks claiming a member but sealed without the channel's key, leave
    /// no state and do not push out the member's message in progress.
    #[test]
    fn unauthenticated_sealed_chunks_leave_no_state() {
        let opener = Opener {
            keys: Arc::new(keyring(2)),
            job: "j".into(),
            channel: "c".into(),
            group: "g".into(),
            me: "b".into(),
            bcast: "*b".into(),
        };
        let mut r = Reassembler::with_opener(1 << 20, Some(Arc::new(opener)));
        let member = keyring(1);
        let real = sealed_chunks(&member, "a", 1, 3000);
        assert_eq!(r.push(parse(real[0].clone()).unwrap()).unwrap(), None);
        let held = r.buffered();
        // Keys of an outsider (another channel key), claiming member a, and made-up senders.
        let outsider =
            Keyring::new([1; 32], [9; 32], [(TaskId::new("a"), member.public_key())]).unwrap();
        for i in 0..1000u64 {
            for (sender, keys) in [("a", &outsider), (&*format!("fake-{i}"), &member)] {
                let forged = sealed_chunks(keys, sender, 100 + i, 3000);
                for c in forged {
                    let err = r.push(parse(c).unwrap()).unwrap_err();
                    assert!(matches!(err, ChunkError::Forged(_)), "{err:?}");
                }
            }
        }
        assert_eq!((r.senders(), r.buffered()), (1, held), "nothing held for them");
        let mut done = None;
        for c in &real[1..] {
            done = r.push(parse(c.clone()).unwrap()).unwrap();
        }
        assert_eq!(done.expect("the member's message completes").bytes, message(3000));
    }

    /// A real encoded update, in chunks.
    fn update_chunks(chunk_size: usize) -> (crate::wire::Message, Vec<Bytes>) {
        let values: Vec<f32> = (0..5000).map(|i| i as f32 * 0.5).collect();
        let mut m = crate::wire::Message::new(crate::wire::Kind::Update, 1)
            .with_meta("weight", 10)
            .with_tensor("w", crate::wire::Tensor::from_f32(vec![5000], &values).expect("shape"));
        m.sender = "t".into();
        let encoded = crate::wire::encode_parts(&m).expect("encode");
        let parts: Vec<Bytes> = encoded.parts().cloned().collect();
        (m, split_parts("t", 3, &parts, chunk_size))
    }

    #[test]
    fn truncated_or_corrupted_chunk_streams_never_deliver_a_message() {
        let (m, chunks) = update_chunks(4096);
        assert!(chunks.len() > 3);
        let deliver = |chunks: Vec<Bytes>| -> Vec<Result<Option<(String, Bytes)>, ChunkError>> {
            let mut r = Reassembler::new(1 << 20);
            chunks.into_iter().filter_map(|c| parse(c).ok()).map(|c| push(&mut r, c)).collect()
        };
        // Intact, out of order: one message, equal to what was sent.
        let mut shuffled = chunks.clone();
        shuffled.swap(0, 2);
        let done: Vec<_> = deliver(shuffled).into_iter().filter_map(|r| r.expect("ok")).collect();
        assert_eq!(done.len(), 1);
        assert_eq!(crate::wire::decode(done[0].1.clone()).expect("decode"), m);

        // The last chunk never comes (the sender died): nothing is delivered, and what was
        // buffered goes when the sender is forgotten.
        let mut r = Reassembler::new(1 << 20);
        for c in &chunks[..chunks.len() - 1] {
            assert_eq!(push(&mut r, parse(c.clone()).expect("valid")).expect("held"), None);
        }
        assert!(r.buffered() > 0);
        r.forget("t");
        assert_eq!(r.buffered(), 0);

        // A chunk cut short: the message is inconsistent, not delivered.
        let mut cut = chunks.clone();
        let last = cut.len() - 1;
        cut[1] = cut[1].slice(..cut[1].len() - 4);
        let res = deliver(cut);
        assert!(res[..last].iter().all(|r| matches!(r, Ok(None))));
        assert_eq!(res[last], Err(ChunkError::Inconsistent));

        // One flipped bit in a tensor byte: reassembled, then refused by the checksum.
        let mut flipped = chunks.clone();
        let mut v = flipped[2].to_vec();
        let at = v.len() - 100;
        v[at] ^= 0x10;
        flipped[2] = v.into();
        let done: Vec<_> = deliver(flipped).into_iter().filter_map(|r| r.expect("ok")).collect();
        assert!(matches!(
            crate::wire::decode(done[0].1.clone()),
            Err(crate::wire::Error::Checksum { .. })
        ));
    }

    proptest! {
        #[test]
        fn split_parts_equals_split_of_the_concatenation(
            lens in proptest::collection::vec(0usize..900, 0..6),
            chunk in 1usize..700,
        ) {
            let parts: Vec<Bytes> = lens.iter().enumerate().map(|(i, &n)| {
                (0..n).map(|j| ((i * 31 + j) % 251) as u8).collect::<Vec<u8>>().into()
            }).collect();
            let whole: Bytes = parts.iter().flat_map(|p| p.iter().copied()).collect::<Vec<u8>>().into();
            prop_assert_eq!(split_parts("s", 9, &parts, chunk), split("s", 9, &whole, chunk));
        }

        #[test]
        fn any_order_reassembles(len in 0usize..5000, chunk in 1usize..700, seed in any::<u64>()) {
            let m = message(len);
            let mut chunks = split("s", 5, &m, chunk);
            // Deterministic shuffle.
            let n = chunks.len();
            for i in (1..n).rev() {
                let j = (seed.wrapping_mul(i as u64 + 7) % (i as u64 + 1)) as usize;
                chunks.swap(i, j);
            }
            let mut r = Reassembler::new(1 << 20);
            let mut out = None;
            for c in chunks {
                if let Some(done) = push(&mut r, parse(c).expect("valid")).expect("accepted") {
                    out = Some(done);
                }
            }
            prop_assert_eq!(out, Some(("s".to_owned(), m)));
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..128)) {
            let mut v = b"FLDC\x01".to_vec();
            v.extend_from_slice(&data);
            if let Ok(c) = parse(v.into()) {
                let _ = Reassembler::new(1 << 16).push(c);
            }
        }
    }
}
