//! Fuzz target bodies (not part of the API): the `fuzz/` crate's `wire_chunks` and
//! `safetensors` targets call these, and this crate's `fuzz_corpus` test replays every file
//! of their committed corpora through them, so a regression fails the normal test run.
//!
//! Each body must not panic on any input: a panic is a finding.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use fledge_types::TaskId;

use crate::chunk::{self, Opener, Reassembler, Sealer};
use crate::secure::{Incarnation, Keyring};
use crate::wire::{self, Dtype, Kind, Message};

/// Size limit of messages in the fuzz bodies (small, so a claimed size is exercised).
const LIMIT: usize = 1 << 20;
/// The sender's identity seed in sealed inputs.
const SENDER_SEED: [u8; 32] = [1; 32];
/// The receiver's identity seed in sealed inputs.
const RECEIVER_SEED: [u8; 32] = [2; 32];
/// The channel key in sealed inputs.
const CHANNEL_KEY: [u8; 32] = [3; 32];
/// The scope of sealed inputs: job, channel, group, and the receiving end.
const SCOPE: [&str; 4] = ["job", "param", "default", "b"];
/// The sending end in sealed inputs.
const SENDER: &str = "a";

/// Wire decode and chunk reassembly. The first byte picks the mode: `0` decodes the rest as
/// one encoded message; `1` and `2` read the rest as frames (`u16` little-endian length, then
/// that many bytes, the last frame taking what is left), parse each as a chunk and push it
/// into a plain (`1`) or sealed (`2`, with fixed test keys) reassembler, and
/// decode every whole message that comes out.
pub fn wire_chunks(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode {
        0 => check_message(Bytes::copy_from_slice(rest)),
        1 | 2 => {
            let opener = (mode == 2).then(opener);
            let mut reassembler = Reassembler::with_opener(LIMIT, opener);
            for frame in frames(rest) {
                let Ok(chunk) = chunk::parse(Bytes::copy_from_slice(frame)) else { continue };
                if let Ok(Some(whole)) = reassembler.push(chunk) {
                    assert!(whole.bytes.len() <= LIMIT, "reassembled past the limit");
                    check_message(whole.bytes);
                }
            }
        }
        _ => {}
    }
}

/// The safetensors payload checks: `data` is taken as the payload of a message whose header
/// is made valid for it (checksum and tensor count), so every input reaches the safetensors
/// parser; a decoded message's tensors are then read as `f32`/`i64` as the roles do.
pub fn safetensors(data: &[u8]) {
    let payload = Bytes::copy_from_slice(data);
    // The header count must match what the payload holds; the count the safetensors header
    // claims is what a sender would write. Try it (and 0 for payloads that do not parse).
    let count = safetensors::SafeTensors::deserialize(&payload).map(|st| st.len()).unwrap_or(0);
    let framed = frame_payload(&payload, u32::try_from(count).unwrap_or(u32::MAX));
    check_message(framed);
}

/// Decodes `bytes`; a decoded message must read back as the roles read it and survive an
/// encode/decode round trip unchanged.
fn check_message(bytes: Bytes) {
    let Ok(message) = wire::decode_with_limit(bytes, LIMIT) else { return };
    for (_, tensor) in message.tensors.iter() {
        match tensor.dtype() {
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64 => {
                let values = tensor.to_f32_vec().expect("a float tensor converts to f32");
                assert_eq!(values.len(), tensor.numel());
            }
            Dtype::I64 => {
                let values = tensor.to_i64_vec().expect("an i64 tensor converts");
                assert_eq!(values.len(), tensor.numel());
            }
            Dtype::I32 | Dtype::U8 => {
                assert!(tensor.to_f32_vec().is_err(), "{} is not a float", tensor.dtype());
            }
        }
    }
    let again = wire::encode(&message).expect("a decoded message encodes");
    let back = wire::decode_with_limit(again, usize::MAX).expect("an encoded message decodes");
    assert_eq!(back.kind, message.kind);
    assert_eq!(back.round, message.round);
    assert_eq!(back.model_version, message.model_version);
    assert_eq!(back.sender, message.sender);
    assert_eq!(back.tensors, message.tensors);
}

/// Splits `data` into frames: `u16` little-endian length, then the bytes.
fn frames(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if data.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_le_bytes([data[0], data[1]]));
        let rest = &data[2..];
        let (frame, next) = rest.split_at(len.min(rest.len()));
        data = next;
        Some(frame)
    })
}

/// A message header with a correct checksum around `payload`.
fn frame_payload(payload: &Bytes, tensor_count: u32) -> Bytes {
    let mut buf = BytesMut::with_capacity(64 + payload.len());
    buf.put_slice(&wire::MAGIC);
    buf.put_u16_le(wire::FORMAT_VERSION);
    buf.put_u8(Kind::Update as u8);
    buf.put_u8(0);
    buf.put_u64_le(1);
    buf.put_u64_le(1);
    buf.put_u16_le(1);
    buf.put_slice(b"a");
    buf.put_u32_le(0);
    buf.put_u32_le(tensor_count);
    buf.put_u64_le(payload.len() as u64);
    buf.put_u32_le(crc32fast::hash(payload));
    buf.put_slice(payload);
    buf.freeze()
}

fn opener() -> Arc<Opener> {
    let members = [(TaskId::new(SENDER), Keyring::public_key_of(&SENDER_SEED))];
    let keys = Keyring::new(RECEIVER_SEED, CHANNEL_KEY, members).expect("valid fixed keys");
    let [job, channel, group, me] = SCOPE;
    Arc::new(Opener {
        keys: Arc::new(keys),
        job: job.to_owned(),
        channel: channel.to_owned(),
        group: group.to_owned(),
        me: me.to_owned(),
        bcast: crate::secure::broadcast_to("trainer"),
    })
}

/// Seed inputs for [`wire_chunks`]: `message` whole (mode 0), and split into chunks of
/// `chunk_size` bytes, plain (mode 1) and sealed with the fixed keys the sealed mode opens
/// (mode 2). Used to build the committed corpus.
pub fn wire_chunks_seeds(message: &Message, chunk_size: usize) -> Vec<Vec<u8>> {
    let encoded = wire::encode(message).expect("encode seed message");
    let mut whole = vec![0u8];
    whole.extend_from_slice(&encoded);
    let plain = chunk::split_parts(SENDER, 7, std::slice::from_ref(&encoded), chunk_size);
    let keys = Keyring::new(SENDER_SEED, CHANNEL_KEY, []).expect("valid fixed keys");
    let sealer = Sealer {
        keys: &keys,
        scope: SCOPE,
        sender: SENDER,
        incarnation: Incarnation { start_ms: 1, instance: 2 },
    };
    let sealed = chunk::split_sealed(&sealer, 7, &[encoded], chunk_size);
    let framed = |mode: u8, chunks: &[Bytes]| {
        let mut out = vec![mode];
        for c in chunks {
            let len = u16::try_from(c.len()).expect("seed chunks fit a u16 frame");
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(c);
        }
        out
    };
    vec![whole, framed(1, &plain), framed(2, &sealed)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Tensor;

    #[test]
    fn seeds_reach_a_decoded_message() {
        // The seeds are only useful if they get through every check; prove it by corrupting
        // nothing and counting the messages that come out.
        let m = Message::new(Kind::Update, 3)
            .with_meta("n", 5)
            .with_tensor("w", Tensor::from_f32(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]).expect("t"));
        let encoded = wire::encode(&m).expect("encode");
        for (mode, seed) in wire_chunks_seeds(&m, 40).into_iter().enumerate() {
            let rest = &seed[1..];
            let delivered = match mode {
                0 => vec![Bytes::copy_from_slice(rest)],
                _ => {
                    let mut r = Reassembler::with_opener(LIMIT, (mode == 2).then(opener));
                    frames(rest)
                        .filter_map(|f| {
                            r.push(chunk::parse(Bytes::copy_from_slice(f)).expect("chunk"))
                                .expect("accepted")
                        })
                        .map(|w| w.bytes)
                        .collect()
                }
            };
            assert_eq!(delivered, vec![encoded.clone()], "mode {mode}");
            wire_chunks(&seed);
        }
    }
}
