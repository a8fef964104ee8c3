//! Splitting encoded messages into broker-sized chunks and putting them back together.
//!
//! Chunk layout (little-endian): magic `FLDC`, version u8, sender id (u16 length + UTF-8),
//! message id u64 (per sender, increasing), chunk index u32, chunk count u32, total message
//! length u64, then the chunk's bytes.
//!
//! Reassembly is bounded: a message may not claim more than the size limit, chunks are kept
//! only as they arrive (a bogus count allocates nothing), each sender has at most
//! [`MAX_PARTIALS_PER_SENDER`] messages in flight, and duplicate chunks (QoS 1 redelivery) are
//! ignored. Chunks of different senders and messages may interleave freely.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::{Buf, BufMut, Bytes, BytesMut};

const MAGIC: [u8; 4] = *b"FLDC";
const VERSION: u8 = 1;
/// Messages a sender may have half-delivered at once; older ones are dropped beyond this.
pub(crate) const MAX_PARTIALS_PER_SENDER: usize = 4;
/// Completed message ids remembered per sender to drop redelivered chunks.
const REMEMBERED_IDS: usize = 64;

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
}

/// Splits `message` into chunk payloads of at most `chunk_size` data bytes each.
pub(crate) fn split(sender: &str, msg_id: u64, message: &Bytes, chunk_size: usize) -> Vec<Bytes> {
    let chunk_size = chunk_size.max(1);
    let count = message.len().div_ceil(chunk_size).max(1);
    let count32 = u32::try_from(count).expect("chunk count fits u32 for messages under 4 PiB");
    (0..count)
        .map(|i| {
            let start = i * chunk_size;
            let end = (start + chunk_size).min(message.len());
            let data = &message[start..end];
            let mut buf = BytesMut::with_capacity(32 + sender.len() + data.len());
            buf.put_slice(&MAGIC);
            buf.put_u8(VERSION);
            let sender_len = u16::try_from(sender.len()).unwrap_or(u16::MAX);
            buf.put_u16_le(sender_len);
            buf.put_slice(&sender.as_bytes()[..sender_len as usize]);
            buf.put_u64_le(msg_id);
            buf.put_u32_le(u32::try_from(i).expect("i < count fits u32"));
            buf.put_u32_le(count32);
            buf.put_u64_le(message.len() as u64);
            buf.put_slice(data);
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
pub(crate) fn parse(mut buf: Bytes) -> Result<Chunk, ChunkError> {
    if take::<4>(&mut buf, "magic")? != MAGIC {
        return Err(ChunkError::BadMagic);
    }
    let [version] = take::<1>(&mut buf, "version")?;
    if version != VERSION {
        return Err(ChunkError::Version(version));
    }
    let sender_len = u16::from_le_bytes(take::<2>(&mut buf, "sender length")?) as usize;
    if buf.remaining() < sender_len {
        return Err(ChunkError::Truncated("sender"));
    }
    let sender = buf.split_to(sender_len);
    let sender = std::str::from_utf8(&sender).map_err(|_| ChunkError::Sender)?.to_owned();
    let msg_id = u64::from_le_bytes(take::<8>(&mut buf, "message id")?);
    let index = u32::from_le_bytes(take::<4>(&mut buf, "index")?);
    let count = u32::from_le_bytes(take::<4>(&mut buf, "count")?);
    let total = u64::from_le_bytes(take::<8>(&mut buf, "total")?);
    if index >= count {
        return Err(ChunkError::Index { index, count });
    }
    Ok(Chunk { sender, msg_id, index, count, total, data: buf })
}

struct Partial {
    count: u32,
    total: u64,
    bytes: u64,
    chunks: BTreeMap<u32, Bytes>,
}

#[derive(Default)]
struct SenderState {
    partials: BTreeMap<u64, Partial>,
    done: VecDeque<u64>,
}

/// Puts chunks back together into whole encoded messages.
pub(crate) struct Reassembler {
    limit: usize,
    senders: HashMap<String, SenderState>,
}

impl Reassembler {
    pub(crate) fn new(limit: usize) -> Reassembler {
        Reassembler { limit, senders: HashMap::new() }
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

    /// Adds a chunk; returns the whole message once its last chunk is in.
    pub(crate) fn push(&mut self, chunk: Chunk) -> Result<Option<(String, Bytes)>, ChunkError> {
        if chunk.total > self.limit as u64 {
            return Err(ChunkError::TooLarge { size: chunk.total, limit: self.limit });
        }
        if chunk.data.len() as u64 > chunk.total {
            return Err(ChunkError::Overflow { total: chunk.total });
        }
        let state = self.senders.entry(chunk.sender.clone()).or_default();
        if state.done.contains(&chunk.msg_id) {
            return Ok(None);
        }
        if chunk.count == 1 {
            if chunk.data.len() as u64 != chunk.total {
                return Err(ChunkError::Inconsistent);
            }
            remember(state, chunk.msg_id);
            return Ok(Some((chunk.sender, chunk.data)));
        }
        if !state.partials.contains_key(&chunk.msg_id)
            && state.partials.len() >= MAX_PARTIALS_PER_SENDER
        {
            // Drop the oldest half-delivered message of this sender to stay bounded.
            if let Some((&oldest, _)) = state.partials.iter().next() {
                tracing::warn!(sender = %chunk.sender, msg_id = oldest, "dropping incomplete message");
                state.partials.remove(&oldest);
            }
        }
        let partial = state.partials.entry(chunk.msg_id).or_insert(Partial {
            count: chunk.count,
            total: chunk.total,
            bytes: 0,
            chunks: BTreeMap::new(),
        });
        if partial.count != chunk.count || partial.total != chunk.total {
            return Err(ChunkError::Inconsistent);
        }
        if partial.chunks.contains_key(&chunk.index) {
            return Ok(None);
        }
        let bytes = partial.bytes + chunk.data.len() as u64;
        if bytes > partial.total {
            let total = partial.total;
            state.partials.remove(&chunk.msg_id);
            return Err(ChunkError::Overflow { total });
        }
        partial.bytes = bytes;
        partial.chunks.insert(chunk.index, chunk.data);
        if partial.chunks.len() as u64 != u64::from(partial.count) {
            return Ok(None);
        }
        let partial = state.partials.remove(&chunk.msg_id).expect("present: just inserted into");
        if partial.bytes != partial.total {
            return Err(ChunkError::Inconsistent);
        }
        remember(state, chunk.msg_id);
        let mut whole = BytesMut::with_capacity(partial.total as usize);
        for data in partial.chunks.values() {
            whole.put_slice(data);
        }
        Ok(Some((chunk.sender, whole.freeze())))
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
            if let Some(m) = r.push(parse(c).expect("valid")).expect("accepted") {
                done.push(m);
            }
        }
        assert_eq!(done.len(), 2);
        assert!(done.contains(&("a".to_owned(), a.clone())));
        assert!(done.contains(&("b".to_owned(), b)));
        assert_eq!(r.buffered(), 0);
        // A redelivery of an old chunk after completion is ignored.
        assert_eq!(r.push(parse(ca[3].clone()).expect("valid")).expect("ok"), None);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn bounds_are_enforced() {
        let mut r = Reassembler::new(4096);
        let big = split("a", 1, &message(5000), 1000);
        assert_eq!(
            r.push(parse(big[0].clone()).expect("valid")).expect_err("too large"),
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
        assert_eq!(r.push(parse(forged.freeze()).expect("parses")).expect("held"), None);
        assert_eq!(r.buffered(), 10);
        // Many half-sent messages from one sender stay bounded.
        for id in 100..120 {
            let c = split("x", id, &message(2000), 1000);
            r.push(parse(c[0].clone()).expect("valid")).expect("held");
        }
        assert!(r.buffered() <= (MAX_PARTIALS_PER_SENDER * 1000) as u64);
        assert!(matches!(parse(Bytes::from_static(b"FLD")), Err(ChunkError::Truncated(_))));
        assert!(matches!(parse(Bytes::from_static(b"XXXXX")), Err(ChunkError::BadMagic)));
    }

    proptest! {
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
                if let Some(done) = r.push(parse(c).expect("valid")).expect("accepted") {
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
