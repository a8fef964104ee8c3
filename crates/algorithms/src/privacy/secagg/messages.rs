//! The protocol's messages and their byte encoding.
//!
//! Every message is `"FSA" ‖ version (1) ‖ kind (u8) ‖ round (u64 LE) ‖ body`, with integers
//! little-endian and lists as a `u32` count followed by fixed-size entries. Decoding is bounded
//! by the input: a count is accepted only if that many entries fit in the bytes that remain,
//! so a lying count cannot make the decoder allocate more than the message's own size; any
//! truncation, unknown kind or version, trailing byte or out-of-range value is a
//! [`DecodeError`] naming the message and field. The state machines then check the meaning
//! (who may appear in a list, lengths against the round's setup).

use super::shamir::{self, SHARE_LEN, ShareValue};

const MAGIC: &[u8; 3] = b"FSA";
/// The encoding's version.
pub const VERSION: u8 = 1;
/// Bytes of an encrypted share pair: sender, receiver, two share values, Poly1305 tag.
pub const CIPHERTEXT_LEN: usize = 4 + 4 + 2 * SHARE_LEN + 16;
/// Bytes of the plaintext of an encrypted share pair.
pub(crate) const PLAINTEXT_LEN: usize = CIPHERTEXT_LEN - 16;
const HEADER_LEN: usize = 3 + 1 + 1 + 8;

/// Why bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed secure-aggregation message ({message}): {reason}")]
pub struct DecodeError {
    /// The message kind being decoded (`header` before the kind is known).
    pub message: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// Round parameters the server announces to every client.
#[derive(Debug, Clone, PartialEq)]
pub struct Setup {
    /// Clients in the round (indices `0..num_clients`).
    pub num_clients: u32,
    /// This client's index.
    pub index: u32,
    /// Length of the update vector.
    pub num_params: u64,
    /// Shares needed to reconstruct a secret.
    pub threshold: u32,
    /// Neighbours of each client (even, at most `num_clients − 1`).
    pub neighbors: u32,
    /// Quantisation levels are `0..2^quantization_bits`.
    pub quantization_bits: u8,
    /// Values are clipped to `[−clipping_range, clipping_range]`.
    pub clipping_range: f64,
    /// Weights are `min(num_samples, max_weight)`; 0 means every client weighs 1.
    pub max_weight: u64,
    /// Stochastic (unbiased) rounding instead of round-to-nearest.
    pub stochastic: bool,
    /// The ring is `Z/2^ring_bits` (32 or 64).
    pub ring_bits: u8,
    /// Seed of the neighbour graph.
    pub graph_seed: [u8; 32],
}

/// A client's two public keys (share encryption, mask agreement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertiseKeys {
    /// X25519 public key for encrypting shares.
    pub enc_pk: [u8; 32],
    /// X25519 public key for the pairwise masks.
    pub mask_pk: [u8; 32],
}

/// One neighbour's public keys, as the server relays them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerKeys {
    /// The neighbour's index.
    pub index: u32,
    /// Its share-encryption key.
    pub enc_pk: [u8; 32],
    /// Its mask-agreement key.
    pub mask_pk: [u8; 32],
}

/// A client's encrypted shares, one per neighbour, and its self-mask commitment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedShares {
    /// `SHA-256(label ‖ round ‖ index ‖ self-mask seed)`.
    pub commitment: [u8; 32],
    /// `(recipient, ciphertext)`.
    pub shares: Vec<(u32, Vec<u8>)>,
}

/// The shares addressed to one client, relayed by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharesDelivery {
    /// `(sender, ciphertext)`.
    pub shares: Vec<(u32, Vec<u8>)>,
}

/// A client's masked, quantised, weighted update (`num_params + 1` ring elements, the last
/// one the weight), little-endian.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedInput {
    /// 32 or 64.
    pub ring_bits: u8,
    /// The elements.
    pub data: Vec<u8>,
}

/// Which neighbours the server saw drop after sending shares, and which sent their input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskRequest {
    /// Neighbours whose mask key shares are asked for.
    pub dropped: Vec<u32>,
    /// Neighbours (and the client itself) whose self-mask shares are asked for.
    pub survivors: Vec<u32>,
}

/// The shares a client reveals for unmasking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskShares {
    /// `(owner, share of its mask secret key)` for the dropped owners.
    pub mask_key_shares: Vec<(u32, ShareValue)>,
    /// `(owner, share of its self-mask seed)` for the surviving owners.
    pub self_mask_shares: Vec<(u32, ShareValue)>,
}

/// A message from the server to one client.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerBody {
    /// Stage 0: round parameters.
    Setup(Setup),
    /// Stage 1 → 2: neighbours' public keys.
    Keys(Vec<PeerKeys>),
    /// Stage 2 → 3: shares from neighbours.
    Shares(SharesDelivery),
    /// Stage 3 → 4: what to reveal.
    Unmask(UnmaskRequest),
}

/// A message from a client to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientBody {
    /// Stage 1.
    Keys(AdvertiseKeys),
    /// Stage 2.
    Shares(EncryptedShares),
    /// Stage 3.
    Input(MaskedInput),
    /// Stage 4.
    Unmask(UnmaskShares),
}

/// A server message with its round.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerMessage {
    /// The round it belongs to.
    pub round: u64,
    /// The content.
    pub body: ServerBody,
}

/// A client message with its round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientMessage {
    /// The round it belongs to.
    pub round: u64,
    /// The content.
    pub body: ClientBody,
}

const K_SETUP: u8 = 1;
const K_ADVERTISE: u8 = 2;
const K_KEYS: u8 = 3;
const K_ENC_SHARES: u8 = 4;
const K_DELIVERY: u8 = 5;
const K_INPUT: u8 = 6;
const K_UNMASK_REQ: u8 = 7;
const K_UNMASK_SHARES: u8 = 8;

impl ServerBody {
    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            ServerBody::Setup(_) => "setup",
            ServerBody::Keys(_) => "keys broadcast",
            ServerBody::Shares(_) => "shares delivery",
            ServerBody::Unmask(_) => "unmask request",
        }
    }
}

impl ClientBody {
    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            ClientBody::Keys(_) => "advertise keys",
            ClientBody::Shares(_) => "encrypted shares",
            ClientBody::Input(_) => "masked input",
            ClientBody::Unmask(_) => "unmask shares",
        }
    }
}

fn header(out: &mut Vec<u8>, kind: u8, round: u64) {
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&round.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_len(out: &mut Vec<u8>, n: usize) {
    put_u32(out, u32::try_from(n).unwrap_or(u32::MAX));
}

fn put_share(out: &mut Vec<u8>, s: &ShareValue) {
    for v in s {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

impl ServerMessage {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.body {
            ServerBody::Setup(s) => {
                header(&mut out, K_SETUP, self.round);
                put_u32(&mut out, s.num_clients);
                put_u32(&mut out, s.index);
                out.extend_from_slice(&s.num_params.to_le_bytes());
                put_u32(&mut out, s.threshold);
                put_u32(&mut out, s.neighbors);
                out.push(s.quantization_bits);
                out.extend_from_slice(&s.clipping_range.to_le_bytes());
                out.extend_from_slice(&s.max_weight.to_le_bytes());
                out.push(u8::from(s.stochastic));
                out.push(s.ring_bits);
                out.extend_from_slice(&s.graph_seed);
            }
            ServerBody::Keys(keys) => {
                header(&mut out, K_KEYS, self.round);
                put_len(&mut out, keys.len());
                for k in keys {
                    put_u32(&mut out, k.index);
                    out.extend_from_slice(&k.enc_pk);
                    out.extend_from_slice(&k.mask_pk);
                }
            }
            ServerBody::Shares(d) => {
                header(&mut out, K_DELIVERY, self.round);
                put_len(&mut out, d.shares.len());
                for (from, ct) in &d.shares {
                    put_u32(&mut out, *from);
                    out.extend_from_slice(ct);
                }
            }
            ServerBody::Unmask(r) => {
                header(&mut out, K_UNMASK_REQ, self.round);
                put_len(&mut out, r.dropped.len());
                for i in &r.dropped {
                    put_u32(&mut out, *i);
                }
                put_len(&mut out, r.survivors.len());
                for i in &r.survivors {
                    put_u32(&mut out, *i);
                }
            }
        }
        out
    }

    /// Parses bytes from the server; never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (kind, round, mut r) = Reader::header(bytes)?;
        let body = match kind {
            K_SETUP => {
                r.message = "setup";
                let s = Setup {
                    num_clients: r.u32("num_clients")?,
                    index: r.u32("index")?,
                    num_params: r.u64("num_params")?,
                    threshold: r.u32("threshold")?,
                    neighbors: r.u32("neighbors")?,
                    quantization_bits: r.u8("quantization_bits")?,
                    clipping_range: f64::from_le_bytes(r.array("clipping_range")?),
                    max_weight: r.u64("max_weight")?,
                    stochastic: match r.u8("stochastic")? {
                        0 => false,
                        1 => true,
                        v => return Err(r.bad(format!("stochastic flag {v} is not 0 or 1"))),
                    },
                    ring_bits: r.u8("ring_bits")?,
                    graph_seed: r.array("graph_seed")?,
                };
                ServerBody::Setup(s)
            }
            K_KEYS => {
                r.message = "keys broadcast";
                let n = r.count("keys", 4 + 64)?;
                let mut keys = Vec::with_capacity(n);
                for _ in 0..n {
                    keys.push(PeerKeys {
                        index: r.u32("index")?,
                        enc_pk: r.array("enc_pk")?,
                        mask_pk: r.array("mask_pk")?,
                    });
                }
                ServerBody::Keys(keys)
            }
            K_DELIVERY => {
                r.message = "shares delivery";
                let n = r.count("shares", 4 + CIPHERTEXT_LEN)?;
                let mut shares = Vec::with_capacity(n);
                for _ in 0..n {
                    let from = r.u32("sender")?;
                    shares.push((from, r.bytes("ciphertext", CIPHERTEXT_LEN)?.to_vec()));
                }
                ServerBody::Shares(SharesDelivery { shares })
            }
            K_UNMASK_REQ => {
                r.message = "unmask request";
                let dropped = r.u32_list("dropped")?;
                let survivors = r.u32_list("survivors")?;
                ServerBody::Unmask(UnmaskRequest { dropped, survivors })
            }
            other => {
                return Err(DecodeError {
                    message: "header",
                    reason: format!("kind {other} is not a server message"),
                });
            }
        };
        r.finish()?;
        Ok(Self { round, body })
    }
}

impl ClientMessage {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match &self.body {
            ClientBody::Keys(k) => {
                header(&mut out, K_ADVERTISE, self.round);
                out.extend_from_slice(&k.enc_pk);
                out.extend_from_slice(&k.mask_pk);
            }
            ClientBody::Shares(s) => {
                header(&mut out, K_ENC_SHARES, self.round);
                out.extend_from_slice(&s.commitment);
                put_len(&mut out, s.shares.len());
                for (to, ct) in &s.shares {
                    put_u32(&mut out, *to);
                    out.extend_from_slice(ct);
                }
            }
            ClientBody::Input(m) => {
                out.reserve_exact(HEADER_LEN + 1 + 8 + m.data.len());
                header(&mut out, K_INPUT, self.round);
                out.push(m.ring_bits);
                out.extend_from_slice(&(m.data.len() as u64).to_le_bytes());
                out.extend_from_slice(&m.data);
            }
            ClientBody::Unmask(u) => {
                header(&mut out, K_UNMASK_SHARES, self.round);
                for list in [&u.mask_key_shares, &u.self_mask_shares] {
                    put_len(&mut out, list.len());
                    for (owner, s) in list {
                        put_u32(&mut out, *owner);
                        put_share(&mut out, s);
                    }
                }
            }
        }
        out
    }

    /// Parses bytes from a client; never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (kind, round, mut r) = Reader::header(bytes)?;
        let body = match kind {
            K_ADVERTISE => {
                r.message = "advertise keys";
                ClientBody::Keys(AdvertiseKeys {
                    enc_pk: r.array("enc_pk")?,
                    mask_pk: r.array("mask_pk")?,
                })
            }
            K_ENC_SHARES => {
                r.message = "encrypted shares";
                let commitment = r.array("commitment")?;
                let n = r.count("shares", 4 + CIPHERTEXT_LEN)?;
                let mut shares = Vec::with_capacity(n);
                for _ in 0..n {
                    let to = r.u32("recipient")?;
                    shares.push((to, r.bytes("ciphertext", CIPHERTEXT_LEN)?.to_vec()));
                }
                ClientBody::Shares(EncryptedShares { commitment, shares })
            }
            K_INPUT => {
                r.message = "masked input";
                let ring_bits = r.u8("ring_bits")?;
                if ring_bits != 32 && ring_bits != 64 {
                    return Err(r.bad(format!("ring_bits {ring_bits} is not 32 or 64")));
                }
                let len = r.u64("length")?;
                let len =
                    usize::try_from(len).ok().filter(|l| *l == r.remaining()).ok_or_else(|| {
                        r.bad(format!(
                            "length {len} does not match the {} bytes that follow",
                            r.remaining()
                        ))
                    })?;
                if len % (usize::from(ring_bits) / 8) != 0 {
                    return Err(r.bad(format!(
                        "{len} bytes is not a whole number of {ring_bits}-bit elements"
                    )));
                }
                ClientBody::Input(MaskedInput { ring_bits, data: r.bytes("data", len)?.to_vec() })
            }
            K_UNMASK_SHARES => {
                r.message = "unmask shares";
                let mask_key_shares = r.share_list("mask_key_shares")?;
                let self_mask_shares = r.share_list("self_mask_shares")?;
                ClientBody::Unmask(UnmaskShares { mask_key_shares, self_mask_shares })
            }
            other => {
                return Err(DecodeError {
                    message: "header",
                    reason: format!("kind {other} is not a client message"),
                });
            }
        };
        r.finish()?;
        Ok(Self { round, body })
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn header(bytes: &'a [u8]) -> Result<(u8, u64, Self), DecodeError> {
        let mut r = Reader { bytes, pos: 0, message: "header" };
        let magic: [u8; 3] = r.array("magic")?;
        if &magic != MAGIC {
            return Err(r.bad("not a secure-aggregation message (bad magic)"));
        }
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(r.bad(format!("version {version} (this build speaks {VERSION})")));
        }
        let kind = r.u8("kind")?;
        let round = r.u64("round")?;
        Ok((kind, round, r))
    }

    fn bad(&self, reason: impl Into<String>) -> DecodeError {
        DecodeError { message: self.message, reason: reason.into() }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn bytes(&mut self, field: &str, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(self.bad(format!(
                "truncated at {field}: {n} bytes needed, {} left",
                self.remaining()
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(field, N)?);
        Ok(a)
    }

    fn u8(&mut self, field: &str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u32(&mut self, field: &str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A list count, accepted only if that many entries of `entry` bytes fit.
    fn count(&mut self, field: &str, entry: usize) -> Result<usize, DecodeError> {
        let n = self.u32(field)? as usize;
        if n.saturating_mul(entry) > self.remaining() {
            return Err(self.bad(format!(
                "{field}: count {n} needs {} bytes, only {} left",
                n.saturating_mul(entry),
                self.remaining()
            )));
        }
        Ok(n)
    }

    fn u32_list(&mut self, field: &str) -> Result<Vec<u32>, DecodeError> {
        let n = self.count(field, 4)?;
        (0..n).map(|_| self.u32(field)).collect()
    }

    fn share_list(&mut self, field: &str) -> Result<Vec<(u32, ShareValue)>, DecodeError> {
        let n = self.count(field, 4 + SHARE_LEN)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let owner = self.u32(field)?;
            let value = read_share(self.bytes(field, SHARE_LEN)?).ok_or_else(|| {
                self.bad(format!("{field}: share of {owner} is not a field element"))
            })?;
            out.push((owner, value));
        }
        Ok(out)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(self.bad(format!("{} trailing bytes", self.remaining())));
        }
        Ok(())
    }
}

/// A share value from its 40 bytes; `None` if an element is not below the modulus.
pub(crate) fn read_share(bytes: &[u8]) -> Option<ShareValue> {
    let mut s = [0u64; shamir::CHUNKS];
    for (v, b) in s.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        *v = u64::from_le_bytes(a);
    }
    shamir::is_valid(&s).then_some(s)
}

pub(crate) fn write_share(out: &mut Vec<u8>, s: &ShareValue) {
    put_share(out, s);
}
