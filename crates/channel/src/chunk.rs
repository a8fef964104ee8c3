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
    let mut rest = parts.iter().map(|p| p.as_ref());
    let mut current: &[u8] = &[];
    (0..count)
        .map(|i| {
            let len = chunk_size.min(total - i * chunk_size);
            let mut buf = BytesMut::with_capacity(32 + sender.len() + len);
            buf.put_slice(&MAGIC);
            buf.put_u8(VERSION);
            let sender_len = u16::try_from(sender.len()).unwrap_or(u16::MAX);
            buf.put_u16_le(sender_len);
            buf.put_slice(&sender.as_bytes()[..sender_len as usize]);
            buf.put_u64_le(msg_id);
            buf.put_u32_le(u32::try_from(i).expect("i < count fits u32"));
            buf.put_u32_le(count32);
            buf.put_u64_le(total as u64);
            let mut need = len;
            while need > 0 {
                if current.is_empty() {
                    current = rest.next().expect("parts hold `total` bytes");
                    continue;
                }
                let n = need.min(current.len());
                buf.put_slice(&current[..n]);
                current = &current[n..];
                need -= n;
            }
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
    parked: BTreeMap<u32, Bytes>,
}

impl Partial {
    /// Appends an in-order chunk, then every parked chunk that now follows.
    fn append(&mut self, data: &[u8]) {
        if self.whole.capacity() == 0 {
            // Reserve the whole message once: no reallocation copies while it grows. The
            // claimed total was checked against the limit; a large reservation is address
            // space, its pages are only committed as chunks are written.
            self.whole.reserve(usize::try_from(self.total).expect("total <= limit fits usize"));
        }
        self.whole.extend_from_slice(data);
        self.next += 1;
        while let Some(data) = self.parked.remove(&self.next) {
            self.whole.extend_from_slice(&data);
            self.next += 1;
        }
    }
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
            next: 0,
            whole: BytesMut::new(),
            parked: BTreeMap::new(),
        });
        if partial.count != chunk.count || partial.total != chunk.total {
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
        partial.bytes = bytes;
        if chunk.index == partial.next {
            partial.append(&chunk.data);
        } else {
            partial.parked.insert(chunk.index, chunk.data);
        }
        if partial.next != partial.count {
            return Ok(None);
        }
        let partial = state.partials.remove(&chunk.msg_id).expect("present: just inserted into");
        if partial.bytes != partial.total {
            return Err(ChunkError::Inconsistent);
        }
        remember(state, chunk.msg_id);
        Ok(Some((chunk.sender, partial.whole.freeze())))
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
            chunks.into_iter().filter_map(|c| parse(c).ok()).map(|c| r.push(c)).collect()
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
            assert_eq!(r.push(parse(c.clone()).expect("valid")).expect("held"), None);
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
