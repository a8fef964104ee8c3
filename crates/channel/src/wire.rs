//! The wire format: a versioned, checksummed header followed by named tensors in the
//! safetensors layout.
//!
//! Layout (all integers little-endian):
//!
//! | field | size |
//! |---|---|
//! | magic `FLDG` | 4 |
//! | format version ([`FORMAT_VERSION`]) | u16 |
//! | message kind ([`Kind`]) | u8 |
//! | flags (reserved, 0) | u8 |
//! | round | u64 |
//! | model version | u64 |
//! | sender id length + UTF-8 bytes | u16 + n |
//! | metadata JSON object length + bytes | u32 + n |
//! | tensor count | u32 |
//! | payload length | u64 |
//! | CRC32 of the payload | u32 |
//! | payload: safetensors bytes | payload length |
//!
//! Decoding treats input as untrusted: every length is checked against the bytes actually
//! present before anything is sliced or allocated, so a decoder allocates at most about the size
//! of its input, and never panics. Tensor data is not copied: each [`Tensor`] keeps a slice of
//! the input [`Bytes`]. Nothing here can execute code (no pickle).

use std::borrow::Cow;
use std::collections::HashMap;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};

/// Magic bytes at the start of every message.
pub const MAGIC: [u8; 4] = *b"FLDG";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Default size limit of one encoded message: 1 GiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 30;
/// Bytes of the fixed part of the header (without sender and metadata).
const FIXED_HEADER: usize = 4 + 2 + 1 + 1 + 8 + 8 + 2 + 4 + 4 + 8 + 4;
/// `__metadata__` key under which the tensor order is kept in the safetensors header.
const ORDER_KEY: &str = "fledge.order";

/// Errors of encoding and decoding messages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input ended before a field was complete.
    #[error("message truncated: {field} needs {needed} bytes, {available} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Bytes it needs.
        needed: u64,
        /// Bytes left in the input.
        available: usize,
    },
    /// The input does not start with `FLDG`.
    #[error("bad magic {found:02x?}: not a fledge message")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// The format version is not one this build reads.
    #[error("unsupported wire format version {found} (this build reads {FORMAT_VERSION})")]
    UnsupportedVersion {
        /// The version in the header.
        found: u16,
    },
    /// Reserved flag bits are set (a newer writer).
    #[error("unsupported header flags {0:#04x}")]
    UnsupportedFlags(u8),
    /// Unknown message kind byte.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The message is larger than the configured limit.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Its size (or claimed size).
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// The payload checksum does not match.
    #[error("payload checksum mismatch: header says {expected:#010x}, payload has {actual:#010x}")]
    Checksum {
        /// CRC32 in the header.
        expected: u32,
        /// CRC32 of the payload received.
        actual: u32,
    },
    /// Bytes follow the payload.
    #[error("{0} unexpected bytes after the payload")]
    TrailingBytes(usize),
    /// The sender id is not UTF-8 or too long.
    #[error("invalid sender id: {0}")]
    Sender(String),
    /// The metadata is not a JSON object.
    #[error("invalid metadata: {0}")]
    Meta(#[source] serde_json::Error),
    /// The safetensors payload is malformed.
    #[error("invalid tensor payload: {0}")]
    Safetensors(#[source] safetensors::SafeTensorError),
    /// The header's tensor count disagrees with the payload.
    #[error("header says {header} tensors, payload holds {payload}")]
    TensorCount {
        /// Count in the header.
        header: u32,
        /// Tensors in the payload.
        payload: usize,
    },
    /// A dtype fledge does not carry.
    #[error("unsupported tensor dtype {0}")]
    UnsupportedDtype(String),
    /// Shape and data length disagree.
    #[error("tensor shape {shape:?} of {dtype} needs {expected} bytes, got {actual}")]
    ShapeMismatch {
        /// The shape.
        shape: Vec<usize>,
        /// The dtype.
        dtype: Dtype,
        /// Bytes the shape needs.
        expected: u64,
        /// Bytes given.
        actual: usize,
    },
    /// A tensor was read as the wrong dtype.
    #[error("tensor has dtype {actual}, expected {expected}")]
    WrongDtype {
        /// The dtype asked for.
        expected: Dtype,
        /// The tensor's dtype.
        actual: Dtype,
    },
    /// Two tensors share a name.
    #[error("duplicate tensor name {0:?}")]
    DuplicateName(String),
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a message means. A closed set: unknown kinds are rejected at decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Kind {
    /// Model weights sent down (aggregator → trainers / middle aggregators).
    Weights = 1,
    /// A model update sent up (trainer → aggregator); its meta is the sender's business.
    Update = 2,
    /// Control message (meta carries the command).
    Control = 3,
    /// The training is over; the receiver should finish.
    EndOfTraining = 4,
    /// Acknowledgement.
    Ack = 5,
    /// Metrics or evaluation results (meta carries them).
    Metrics = 6,
}

impl Kind {
    /// Decodes the kind byte.
    pub fn from_u8(byte: u8) -> Result<Kind> {
        Ok(match byte {
            1 => Kind::Weights,
            2 => Kind::Update,
            3 => Kind::Control,
            4 => Kind::EndOfTraining,
            5 => Kind::Ack,
            6 => Kind::Metrics,
            other => return Err(Error::UnknownKind(other)),
        })
    }
}

/// Element type of a tensor. `F32` is the working type; the others are carried as raw bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit float.
    F64,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// Unsigned byte.
    U8,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::U8 => 1,
        }
    }

    fn to_st(self) -> StDtype {
        match self {
            Dtype::F32 => StDtype::F32,
            Dtype::F16 => StDtype::F16,
            Dtype::BF16 => StDtype::BF16,
            Dtype::F64 => StDtype::F64,
            Dtype::I64 => StDtype::I64,
            Dtype::I32 => StDtype::I32,
            Dtype::U8 => StDtype::U8,
        }
    }

    fn from_st(dtype: StDtype) -> Result<Dtype> {
        Ok(match dtype {
            StDtype::F32 => Dtype::F32,
            StDtype::F16 => Dtype::F16,
            StDtype::BF16 => Dtype::BF16,
            StDtype::F64 => Dtype::F64,
            StDtype::I64 => Dtype::I64,
            StDtype::I32 => Dtype::I32,
            StDtype::U8 => Dtype::U8,
            other => return Err(Error::UnsupportedDtype(other.to_string())),
        })
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::I32 => "I32",
            Dtype::U8 => "U8",
        })
    }
}

/// One named array: dtype, shape and little-endian element bytes (shared, cheap to clone).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Bytes,
}

fn checked_len(shape: &[usize], dtype: Dtype) -> Option<u64> {
    shape.iter().try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
}

impl Tensor {
    /// A tensor from raw little-endian bytes; checks that `data` fits `shape`.
    pub fn from_raw(dtype: Dtype, shape: Vec<usize>, data: Bytes) -> Result<Tensor> {
        let expected = checked_len(&shape, dtype);
        if expected != Some(data.len() as u64) {
            return Err(Error::ShapeMismatch {
                shape,
                dtype,
                expected: expected.unwrap_or(u64::MAX),
                actual: data.len(),
            });
        }
        Ok(Tensor { dtype, shape, data })
    }

    /// An `F32` tensor (copies `values` into little-endian bytes).
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Result<Tensor> {
        let mut buf = BytesMut::with_capacity(values.len() * 4);
        for v in values {
            buf.put_f32_le(*v);
        }
        Tensor::from_raw(Dtype::F32, shape, buf.freeze())
    }

    /// An `F32` tensor over values owned by `owner`, which the tensor keeps alive: on
    /// little-endian targets nothing is copied (a model can be sent without a wire copy of
    /// it); elsewhere the values are copied as by [`Tensor::from_f32`].
    pub fn from_f32_owner<T>(shape: Vec<usize>, owner: T) -> Result<Tensor>
    where
        T: AsRef<[f32]> + Send + 'static,
    {
        if cfg!(target_endian = "little") {
            Tensor::from_raw(Dtype::F32, shape, Bytes::from_owner(F32Bytes(owner)))
        } else {
            Tensor::from_f32(shape, owner.as_ref())
        }
    }

    /// An `F16` tensor.
    pub fn from_f16(shape: Vec<usize>, values: &[half::f16]) -> Result<Tensor> {
        let mut buf = BytesMut::with_capacity(values.len() * 2);
        for v in values {
            buf.put_u16_le(v.to_bits());
        }
        Tensor::from_raw(Dtype::F16, shape, buf.freeze())
    }

    /// An `I64` tensor.
    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> Result<Tensor> {
        let mut buf = BytesMut::with_capacity(values.len() * 8);
        for v in values {
            buf.put_i64_le(*v);
        }
        Tensor::from_raw(Dtype::I64, shape, buf.freeze())
    }

    /// A `U8` tensor (no copy).
    pub fn from_u8(shape: Vec<usize>, values: Bytes) -> Result<Tensor> {
        Tensor::from_raw(Dtype::U8, shape, values)
    }

    /// The element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// The raw little-endian bytes.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// The values of an `F32` tensor; borrowed without copying when the bytes are 4-aligned.
    pub fn as_f32(&self) -> Result<Cow<'_, [f32]>> {
        self.expect_dtype(Dtype::F32)?;
        if cfg!(target_endian = "little") {
            // SAFETY: every bit pattern is a valid f32, and `align_to` only returns the middle
            // part at correct alignment; we use it only when nothing is left over on either side.
            let (head, mid, tail) = unsafe { self.data.align_to::<f32>() };
            if head.is_empty() && tail.is_empty() {
                return Ok(Cow::Borrowed(mid));
            }
        }
        Ok(Cow::Owned(
            self.data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ))
    }

    /// The values of an `F32`, `F16`, `BF16` or `F64` tensor converted to `f32`.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(match self.dtype {
            Dtype::F32 => self.as_f32()?.into_owned(),
            Dtype::F16 => self
                .data
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Dtype::BF16 => self
                .data
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Dtype::F64 => self
                .data
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    f64::from_le_bytes(b) as f32
                })
                .collect(),
            other => {
                return Err(Error::WrongDtype { expected: Dtype::F32, actual: other });
            }
        })
    }

    /// The values of an `I64` tensor.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        self.expect_dtype(Dtype::I64)?;
        Ok(self
            .data
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                i64::from_le_bytes(b)
            })
            .collect())
    }

    fn expect_dtype(&self, expected: Dtype) -> Result<()> {
        if self.dtype == expected {
            Ok(())
        } else {
            Err(Error::WrongDtype { expected, actual: self.dtype })
        }
    }
}

/// `f32` values seen as their in-memory (on little-endian targets: wire) bytes.
struct F32Bytes<T>(T);

impl<T: AsRef<[f32]>> AsRef<[u8]> for F32Bytes<T> {
    fn as_ref(&self) -> &[u8] {
        let values = self.0.as_ref();
        // SAFETY: `f32` has no padding and every byte of it is initialised; `u8` has alignment
        // 1; the slice covers exactly `size_of_val(values)` bytes of `values` and borrows
        // `self`, so it cannot outlive the values.
        unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        }
    }
}

impl View for &Tensor {
    fn dtype(&self) -> StDtype {
        self.dtype.to_st()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Named tensors in insertion order (the order survives encode/decode).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tensors {
    entries: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
}

impl Tensors {
    /// An empty set.
    pub fn new() -> Tensors {
        Tensors::default()
    }

    /// Adds or replaces `name`; a replaced tensor keeps its position.
    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) -> Option<Tensor> {
        let name = name.into();
        match self.index.get(&name) {
            Some(&i) => Some(std::mem::replace(&mut self.entries[i].1, tensor)),
            None => {
                self.index.insert(name.clone(), self.entries.len());
                self.entries.push((name, tensor));
                None
            }
        }
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (name, tensor) in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// Names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> usize {
        self.entries.iter().map(|(_, t)| t.data.len()).sum()
    }
}

impl FromIterator<(String, Tensor)> for Tensors {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        let mut res = Tensors::new();
        for (name, tensor) in iter {
            res.insert(name, tensor);
        }
        res
    }
}

/// One message on a channel.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// What it means.
    pub kind: Kind,
    /// The round it belongs to.
    pub round: u64,
    /// The model version it carries or was computed from.
    pub model_version: u64,
    /// The sending end's id; set by the channel on send.
    pub sender: String,
    /// Small JSON metadata (per-message key/values the layer above defines).
    pub meta: serde_json::Map<String, serde_json::Value>,
    /// The tensors.
    pub tensors: Tensors,
}

impl Message {
    /// An empty message of `kind` for `round`.
    pub fn new(kind: Kind, round: u64) -> Message {
        Message {
            kind,
            round,
            model_version: 0,
            sender: String::new(),
            meta: serde_json::Map::new(),
            tensors: Tensors::new(),
        }
    }

    /// Sets a metadata value (builder style).
    pub fn with_meta(mut self, key: &str, value: impl Into<serde_json::Value>) -> Message {
        self.meta.insert(key.to_owned(), value.into());
        self
    }

    /// Adds a tensor (builder style).
    pub fn with_tensor(mut self, name: &str, tensor: Tensor) -> Message {
        self.tensors.insert(name, tensor);
        self
    }
}

/// An encoded message in parts: the header (everything before the tensor data, including the
/// safetensors header) and each tensor's data in payload order, shared with the message's
/// tensors (not copied). Concatenated, the parts are [`encode`]'s output; a backend that
/// chunks messages copies each byte once, into its chunk.
#[derive(Clone, Debug)]
pub(crate) struct Encoded {
    /// The header bytes.
    pub(crate) head: Bytes,
    /// Tensor data, in payload order.
    pub(crate) data: Vec<Bytes>,
}

impl Encoded {
    /// Total encoded length.
    pub(crate) fn len(&self) -> usize {
        self.head.len() + self.data.iter().map(Bytes::len).sum::<usize>()
    }

    /// The parts, in order.
    pub(crate) fn parts(&self) -> impl Iterator<Item = &Bytes> {
        std::iter::once(&self.head).chain(&self.data)
    }

    /// The whole encoding in one buffer.
    pub(crate) fn concat(self) -> Bytes {
        if self.data.iter().all(Bytes::is_empty) {
            return self.head;
        }
        let mut buf = BytesMut::with_capacity(self.len());
        for part in self.parts() {
            buf.put_slice(part);
        }
        buf.freeze()
    }
}

/// Encodes a message. Fails only on a sender id longer than 65535 bytes.
pub fn encode(message: &Message) -> Result<Bytes> {
    encode_parts(message).map(Encoded::concat)
}

/// Encodes a message as [`Encoded`] parts, without copying the tensor data.
pub(crate) fn encode_parts(message: &Message) -> Result<Encoded> {
    let sender = message.sender.as_bytes();
    let sender_len = u16::try_from(sender.len())
        .map_err(|_| Error::Sender(format!("{} bytes is longer than 65535", sender.len())))?;
    let meta = serde_json::to_vec(&message.meta).map_err(Error::Meta)?;
    let meta_len = u32::try_from(meta.len())
        .map_err(|_| Error::TooLarge { size: meta.len() as u64, limit: u32::MAX as usize })?;
    let (st_header, ordered) = safetensors_header(&message.tensors)?;
    let data_len: usize = ordered.iter().map(|t| t.data.len()).sum();
    let payload_len = 8 + st_header.len() + data_len;
    let tensor_count =
        u32::try_from(message.tensors.len()).expect("tensor count fits u32: each has a name");
    // One pass over the tensor data for the checksum; the data itself is shared, not copied.
    let mut crc = crc32fast::Hasher::new();
    crc.update(&(st_header.len() as u64).to_le_bytes());
    crc.update(&st_header);
    for tensor in &ordered {
        crc.update(&tensor.data);
    }

    let mut buf =
        BytesMut::with_capacity(FIXED_HEADER + sender.len() + meta.len() + 8 + st_header.len());
    buf.put_slice(&MAGIC);
    buf.put_u16_le(FORMAT_VERSION);
    buf.put_u8(message.kind as u8);
    buf.put_u8(0);
    buf.put_u64_le(message.round);
    buf.put_u64_le(message.model_version);
    buf.put_u16_le(sender_len);
    buf.put_slice(sender);
    buf.put_u32_le(meta_len);
    buf.put_slice(&meta);
    buf.put_u32_le(tensor_count);
    buf.put_u64_le(payload_len as u64);
    buf.put_u32_le(crc.finalize());
    buf.put_u64_le(st_header.len() as u64);
    buf.put_slice(&st_header);
    Ok(Encoded { head: buf.freeze(), data: ordered.iter().map(|t| t.data.clone()).collect() })
}

/// The safetensors header for `tensors` and the tensors in payload order, exactly as
/// `safetensors::serialize` lays them out (descending dtype alignment, then name; header padded
/// to 8 bytes), so the payload can be written with one copy of the data.
fn safetensors_header(tensors: &Tensors) -> Result<(Vec<u8>, Vec<&Tensor>)> {
    let mut ordered: Vec<(&str, &Tensor)> = tensors.iter().collect();
    ordered
        .sort_by(|(ln, l), (rn, r)| r.dtype.to_st().cmp(&l.dtype.to_st()).then_with(|| ln.cmp(rn)));
    let mut offset = 0;
    let mut infos = Vec::with_capacity(ordered.len());
    for (name, tensor) in &ordered {
        let n = tensor.data.len();
        infos.push((
            (*name).to_owned(),
            safetensors::tensor::TensorInfo {
                dtype: tensor.dtype.to_st(),
                shape: tensor.shape.clone(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let order: Vec<&str> = tensors.names().collect();
    let order_json = serde_json::to_string(&order).map_err(Error::Meta)?;
    let info = HashMap::from([(ORDER_KEY.to_owned(), order_json)]);
    let metadata =
        safetensors::tensor::Metadata::new(Some(info), infos).map_err(Error::Safetensors)?;
    let mut header = serde_json::to_vec(&metadata).map_err(Error::Meta)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    Ok((header, ordered.into_iter().map(|(_, t)| t).collect()))
}

/// Size `encode` would produce, without encoding the tensor data (metadata is serialized).
pub fn encoded_len(message: &Message) -> usize {
    let meta = serde_json::to_vec(&message.meta).map(|v| v.len()).unwrap_or(0);
    // The safetensors header is JSON with one entry per tensor; estimate it generously but
    // deterministically: name + dtype + shape + offsets.
    let st_header: usize =
        message.tensors.iter().map(|(n, t)| n.len() * 2 + 64 + t.shape.len() * 21).sum();
    FIXED_HEADER + message.sender.len() + meta + 8 + st_header + message.tensors.data_bytes()
}

/// Decodes a message with the default size limit.
pub fn decode(input: Bytes) -> Result<Message> {
    decode_with_limit(input, DEFAULT_MAX_MESSAGE_BYTES)
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, field: &'static str, n: u64) -> Result<()> {
        if (self.buf.remaining() as u64) < n {
            return Err(Error::Truncated { field, needed: n, available: self.buf.remaining() });
        }
        Ok(())
    }
    fn u8(&mut self, field: &'static str) -> Result<u8> {
        self.need(field, 1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self, field: &'static str) -> Result<u16> {
        self.need(field, 2)?;
        Ok(self.buf.get_u16_le())
    }
    fn u32(&mut self, field: &'static str) -> Result<u32> {
        self.need(field, 4)?;
        Ok(self.buf.get_u32_le())
    }
    fn u64(&mut self, field: &'static str) -> Result<u64> {
        self.need(field, 8)?;
        Ok(self.buf.get_u64_le())
    }
    fn bytes(&mut self, field: &'static str, n: u64) -> Result<Bytes> {
        self.need(field, n)?;
        // `need` checked n <= remaining, which is a usize.
        Ok(self.buf.split_to(n as usize))
    }
}

/// Decodes a message, rejecting input larger than `limit` bytes.
pub fn decode_with_limit(input: Bytes, limit: usize) -> Result<Message> {
    if input.len() > limit {
        return Err(Error::TooLarge { size: input.len() as u64, limit });
    }
    let mut r = Reader { buf: input };
    let magic = r.bytes("magic", 4)?;
    if magic[..] != MAGIC {
        let mut found = [0u8; 4];
        found.copy_from_slice(&magic);
        return Err(Error::BadMagic { found });
    }
    let version = r.u16("version")?;
    if version != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion { found: version });
    }
    let kind = Kind::from_u8(r.u8("kind")?)?;
    let flags = r.u8("flags")?;
    if flags != 0 {
        return Err(Error::UnsupportedFlags(flags));
    }
    let round = r.u64("round")?;
    let model_version = r.u64("model version")?;
    let sender_len = r.u16("sender length")?;
    let sender = r.bytes("sender", u64::from(sender_len))?;
    let sender = std::str::from_utf8(&sender)
        .map_err(|e| Error::Sender(format!("not UTF-8: {e}")))?
        .to_owned();
    let meta_len = r.u32("metadata length")?;
    let meta = r.bytes("metadata", u64::from(meta_len))?;
    let meta: serde_json::Map<String, serde_json::Value> = if meta.is_empty() {
        serde_json::Map::new()
    } else {
        serde_json::from_slice(&meta).map_err(Error::Meta)?
    };
    let tensor_count = r.u32("tensor count")?;
    let payload_len = r.u64("payload length")?;
    let expected_crc = r.u32("checksum")?;
    let payload = r.bytes("payload", payload_len)?;
    if !r.buf.is_empty() {
        return Err(Error::TrailingBytes(r.buf.len()));
    }
    let actual_crc = crc32fast::hash(&payload);
    if actual_crc != expected_crc {
        return Err(Error::Checksum { expected: expected_crc, actual: actual_crc });
    }
    let tensors = decode_tensors(&payload)?;
    if tensors.len() != tensor_count as usize {
        return Err(Error::TensorCount { header: tensor_count, payload: tensors.len() });
    }
    Ok(Message { kind, round, model_version, sender, meta, tensors })
}

fn decode_tensors(payload: &Bytes) -> Result<Tensors> {
    // `deserialize` validates the header (bounded size, offsets contiguous and in range).
    let st = SafeTensors::deserialize(payload).map_err(Error::Safetensors)?;
    let (header_len, metadata) = SafeTensors::read_metadata(payload).map_err(Error::Safetensors)?;
    let data_start = 8 + header_len;
    let infos = metadata.tensors();
    let mut order: Vec<String> = metadata.offset_keys();
    if let Some(Ok(named)) = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(ORDER_KEY))
        .map(|s| serde_json::from_str::<Vec<String>>(s))
    {
        // Use the sender's order only if it is exactly the set of tensors present.
        let mut sorted_named = named.clone();
        sorted_named.sort();
        let mut sorted_keys = order.clone();
        sorted_keys.sort();
        if sorted_named == sorted_keys {
            order = named;
        }
    }
    let mut res = Tensors::new();
    for name in order {
        let info = infos.get(&name).ok_or_else(|| {
            Error::Safetensors(safetensors::SafeTensorError::TensorNotFound(name.clone()))
        })?;
        let dtype = Dtype::from_st(info.dtype)?;
        let (start, end) = info.data_offsets;
        let data = payload.slice(data_start + start..data_start + end);
        let tensor = Tensor::from_raw(dtype, info.shape.clone(), data)?;
        if res.insert(name.clone(), tensor).is_some() {
            return Err(Error::DuplicateName(name));
        }
    }
    debug_assert_eq!(res.len(), st.len());
    Ok(res)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn sample() -> Message {
        let mut m = Message::new(Kind::Update, 7).with_meta("weight", 120).with_meta("loss", 0.25);
        m.model_version = 3;
        m.sender = "trainer-1".into();
        m.tensors.insert(
            "z.weight",
            Tensor::from_f32(vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).expect("shape"),
        );
        m.tensors.insert(
            "a.bias",
            Tensor::from_f16(vec![2], &[half::f16::from_f32(0.5), half::f16::ONE]).expect("shape"),
        );
        m.tensors.insert("steps", Tensor::from_i64(vec![1], &[42]).expect("shape"));
        m.tensors.insert(
            "mask",
            Tensor::from_u8(vec![3], Bytes::from_static(&[1, 0, 1])).expect("shape"),
        );
        m
    }

    #[test]
    fn round_trip_keeps_everything_and_order() {
        let m = sample();
        let bytes = encode(&m).expect("encode");
        assert!(encoded_len(&m) >= bytes.len(), "estimate is an upper bound");
        let back = decode(bytes).expect("decode");
        assert_eq!(back, m);
        let names: Vec<&str> = back.tensors.names().collect();
        assert_eq!(names, ["z.weight", "a.bias", "steps", "mask"]);
        let w = back.tensors.get("z.weight").expect("present");
        assert_eq!(&*w.as_f32().expect("f32"), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(
            back.tensors.get("a.bias").expect("present").to_f32_vec().expect("f16"),
            vec![0.5, 1.0]
        );
        assert_eq!(
            back.tensors.get("steps").expect("present").to_i64_vec().expect("i64"),
            vec![42]
        );
        assert_eq!(back.meta.get("weight").and_then(serde_json::Value::as_u64), Some(120));
    }

    #[test]
    fn payload_is_byte_identical_to_safetensors_serialize() {
        let m = sample();
        let bytes = encode(&m).expect("encode");
        let order: Vec<&str> = m.tensors.names().collect();
        let info =
            HashMap::from([(ORDER_KEY.to_owned(), serde_json::to_string(&order).expect("json"))]);
        let reference = safetensors::serialize(m.tensors.iter(), Some(info)).expect("serialize");
        assert_eq!(&bytes[bytes.len() - reference.len()..], &reference[..]);
    }

    #[test]
    fn bad_inputs_are_named_errors() {
        let bytes = encode(&sample()).expect("encode");
        assert!(matches!(decode(Bytes::from_static(b"NOPE....")), Err(Error::BadMagic { .. })));
        let mut v = bytes.to_vec();
        v[4] = 9;
        assert!(matches!(decode(v.into()), Err(Error::UnsupportedVersion { found: 9 })));
        let mut v = bytes.to_vec();
        v[6] = 200;
        assert!(matches!(decode(v.into()), Err(Error::UnknownKind(200))));
        let mut v = bytes.to_vec();
        let last = v.len() - 1;
        v[last] ^= 0xff;
        assert!(matches!(decode(v.into()), Err(Error::Checksum { .. })));
        let mut v = bytes.to_vec();
        v.push(0);
        assert!(matches!(decode(v.into()), Err(Error::TrailingBytes(1))));
        assert!(matches!(
            decode_with_limit(bytes.clone(), 10),
            Err(Error::TooLarge { limit: 10, .. })
        ));
        assert!(matches!(
            Tensor::from_f32(vec![4], &[1.0]),
            Err(Error::ShapeMismatch { expected: 16, actual: 4, .. })
        ));
        assert!(matches!(
            Tensor::from_f32(vec![usize::MAX, 3], &[]),
            Err(Error::ShapeMismatch { .. })
        ));
        let t = Tensor::from_i64(vec![1], &[1]).expect("shape");
        assert!(matches!(t.as_f32(), Err(Error::WrongDtype { .. })));
    }

    #[test]
    fn parts_share_tensor_data_and_owned_f32_is_not_copied() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.25).collect();
        let owner = std::sync::Arc::new(values.clone());
        struct Shared(std::sync::Arc<Vec<f32>>);
        impl AsRef<[f32]> for Shared {
            fn as_ref(&self) -> &[f32] {
                &self.0
            }
        }
        let t = Tensor::from_f32_owner(vec![10, 100], Shared(owner.clone())).expect("shape");
        assert_eq!(t, Tensor::from_f32(vec![10, 100], &values).expect("shape"));
        if cfg!(target_endian = "little") {
            assert_eq!(t.data().as_ptr(), owner.as_ptr().cast::<u8>());
        }
        assert!(Tensor::from_f32_owner(vec![3], Shared(owner.clone())).is_err());
        let mut m = Message::new(Kind::Weights, 2).with_tensor("w", t);
        m.sender = "agg".into();
        let parts = encode_parts(&m).expect("encode");
        assert_eq!(parts.data.len(), 1);
        assert_eq!(parts.data[0].as_ptr(), m.tensors.get("w").expect("w").data().as_ptr());
        let whole = parts.clone().concat();
        assert_eq!(whole.len(), parts.len());
        assert_eq!(decode(whole).expect("decode"), m);
        drop((m, parts));
        // Every tensor and part released its share of the owner.
        assert_eq!(std::sync::Arc::strong_count(&owner), 1);
    }

    #[test]
    fn unaligned_f32_is_copied_correctly() {
        let mut raw = vec![0u8];
        raw.extend_from_slice(&1.5f32.to_le_bytes());
        let data = Bytes::from(raw).slice(1..);
        let t = Tensor::from_raw(Dtype::F32, vec![1], data).expect("shape");
        assert_eq!(&*t.as_f32().expect("f32"), &[1.5]);
    }

    /// Offsets of the length fields in `sample()`'s encoding.
    fn length_field_offsets(bytes: &[u8]) -> Vec<usize> {
        let sender_len_at = 4 + 2 + 1 + 1 + 8 + 8;
        let sender_len = u16::from_le_bytes([bytes[sender_len_at], bytes[sender_len_at + 1]]);
        let meta_len_at = sender_len_at + 2 + sender_len as usize;
        let mut meta_len = [0u8; 4];
        meta_len.copy_from_slice(&bytes[meta_len_at..meta_len_at + 4]);
        let count_at = meta_len_at + 4 + u32::from_le_bytes(meta_len) as usize;
        let payload_len_at = count_at + 4;
        let st_len_at = payload_len_at + 8 + 4;
        vec![sender_len_at, meta_len_at, count_at, payload_len_at, st_len_at]
    }

    proptest! {
        #[test]
        fn truncated_input_is_an_error(cut in 0usize..400) {
            let bytes = encode(&sample()).expect("encode");
            let cut = cut.min(bytes.len() - 1);
            prop_assert!(decode(bytes.slice(..cut)).is_err());
        }

        #[test]
        fn bit_flips_never_panic(pos in 0usize..400, bit in 0u8..8) {
            let bytes = encode(&sample()).expect("encode");
            let mut v = bytes.to_vec();
            let pos = pos % v.len();
            v[pos] ^= 1 << bit;
            // Flips in the payload are caught by the checksum, flips in the header by parsing;
            // a flip in round/model version/meta values may still decode, to different values.
            if let Ok(m) = decode(v.into()) {
                prop_assert_ne!(m, sample());
            }
        }

        #[test]
        fn oversized_length_fields_are_errors(which in 0usize..5, value in any::<u64>()) {
            let bytes = encode(&sample()).expect("encode");
            let offsets = length_field_offsets(&bytes);
            let at = offsets[which];
            let mut v = bytes.to_vec();
            let width = match which { 0 => 2, 1 | 2 => 4, _ => 8 };
            let original = v[at..at + width].to_vec();
            v[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            prop_assume!(v[at..at + width] != original[..]);
            prop_assert!(decode(v.into()).is_err());
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut v = MAGIC.to_vec();
            v.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            v.extend_from_slice(&data);
            let _ = decode(v.into());
        }

        #[test]
        fn f32_round_trip(values in proptest::collection::vec(any::<f32>().prop_filter("nan", |v| !v.is_nan()), 0..64)) {
            let mut m = Message::new(Kind::Weights, 1);
            m.tensors.insert("w", Tensor::from_f32(vec![values.len()], &values).expect("shape"));
            let back = decode(encode(&m).expect("encode")).expect("decode");
            prop_assert_eq!(&*back.tensors.get("w").expect("present").as_f32().expect("f32"), &values[..]);
        }
    }
}
