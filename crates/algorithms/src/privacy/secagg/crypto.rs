//! The primitives: X25519 agreement, key derivation (SHA-256), the ChaCha20 mask generator
//! and ChaCha20-Poly1305 for the shares routed through the server.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

/// Domain separation labels of the derived keys.
pub(crate) const LABEL_ENC: &[u8] = b"fledge-secagg/v1/share-encryption";
pub(crate) const LABEL_MASK: &[u8] = b"fledge-secagg/v1/pairwise-mask";
pub(crate) const LABEL_COMMIT: &[u8] = b"fledge-secagg/v1/self-mask-commitment";
const LABEL_AAD: &[u8] = b"fledge-secagg/v1/share";

/// A 32-byte key from a Diffie–Hellman output, bound to the round and the (unordered) pair.
pub(crate) fn pair_key(label: &[u8], dh: &[u8; 32], round: u64, a: u32, b: u32) -> [u8; 32] {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let mut h = Sha256::new();
    h.update(label);
    h.update(round.to_le_bytes());
    h.update(lo.to_le_bytes());
    h.update(hi.to_le_bytes());
    h.update(dh);
    h.finalize().into()
}

/// `DH(sk, pk)`, or `None` for a low-order public key (the result would not depend on `sk`).
pub(crate) fn agree(sk: &StaticSecret, pk: &PublicKey) -> Option<[u8; 32]> {
    let shared = sk.diffie_hellman(pk);
    shared.was_contributory().then(|| *shared.as_bytes())
}

/// The commitment to a self-mask seed the server checks its reconstruction against.
pub(crate) fn commit(seed: &[u8; 32], round: u64, client: u32) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(LABEL_COMMIT);
    h.update(round.to_le_bytes());
    h.update(client.to_le_bytes());
    h.update(seed);
    h.finalize().into()
}

fn nonce(from: u32, to: u32) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&from.to_le_bytes());
    n[4..8].copy_from_slice(&to.to_le_bytes());
    n
}

fn aad(round: u64, from: u32, to: u32) -> Vec<u8> {
    let mut a = LABEL_AAD.to_vec();
    a.extend_from_slice(&round.to_le_bytes());
    a.extend_from_slice(&from.to_le_bytes());
    a.extend_from_slice(&to.to_le_bytes());
    a
}

/// Encrypts `plaintext` from `from` to `to` (a fresh key per round and pair, a nonce per
/// direction).
pub(crate) fn seal(key: &[u8; 32], round: u64, from: u32, to: u32, plaintext: &[u8]) -> Vec<u8> {
    let cipher = ChaCha20Poly1305::new(key.into());
    let aad = aad(round, from, to);
    cipher
        .encrypt(&nonce(from, to).into(), Payload { msg: plaintext, aad: &aad })
        .unwrap_or_default()
}

/// Decrypts what [`seal`] made; `None` if it was tampered with or is not for this pair.
pub(crate) fn open(
    key: &[u8; 32],
    round: u64,
    from: u32,
    to: u32,
    ciphertext: &[u8],
) -> Option<Vec<u8>> {
    let cipher = ChaCha20Poly1305::new(key.into());
    let aad = aad(round, from, to);
    cipher.decrypt(&nonce(from, to).into(), Payload { msg: ciphertext, aad: &aad }).ok()
}

/// An element of the ring `Z/2^w` the masked vectors live in.
pub(crate) trait Word: Copy + Default + Send + Sync + 'static {
    const BYTES: usize;
    fn from_le(b: &[u8]) -> Self;
    fn put_le(self, out: &mut [u8]);
    fn wadd(self, o: Self) -> Self;
    fn wsub(self, o: Self) -> Self;
    fn from_u64(v: u64) -> Self;
    fn to_u64(self) -> u64;
}

impl Word for u32 {
    const BYTES: usize = 4;
    fn from_le(b: &[u8]) -> Self {
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        u32::from_le_bytes(a)
    }
    fn put_le(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
    fn wadd(self, o: Self) -> Self {
        self.wrapping_add(o)
    }
    fn wsub(self, o: Self) -> Self {
        self.wrapping_sub(o)
    }
    fn from_u64(v: u64) -> Self {
        v as u32
    }
    fn to_u64(self) -> u64 {
        u64::from(self)
    }
}

impl Word for u64 {
    const BYTES: usize = 8;
    fn from_le(b: &[u8]) -> Self {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        u64::from_le_bytes(a)
    }
    fn put_le(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
    fn wadd(self, o: Self) -> Self {
        self.wrapping_add(o)
    }
    fn wsub(self, o: Self) -> Self {
        self.wrapping_sub(o)
    }
    fn from_u64(v: u64) -> Self {
        v
    }
    fn to_u64(self) -> u64 {
        self
    }
}

/// Bytes of keystream generated at a time (fits L1/L2 with the slice it is added to).
const BLOCK: usize = 16 * 1024;

/// Elements per unit of parallel work: every mask is applied to one chunk while it is in
/// cache, and chunks are spread over rayon's pool.
pub(crate) const CHUNK: usize = 1 << 14;

/// A mask: the ChaCha20 keystream under key `seed` and a zero nonce, read as little-endian
/// words, added to (or, with `subtract`, subtracted from) a vector in the ring. Every seed is
/// used for one round only, so the nonce never repeats under a key.
pub(crate) type Mask = ([u8; 32], bool);

/// Applies `masks` to `data`, the elements `offset..offset + data.len()` of the vector
/// (each mask's keystream is sought to the offset, so chunks can be masked in any order).
pub(crate) fn apply_masks_at<W: Word>(data: &mut [W], offset: usize, masks: &[Mask]) {
    let mut buf = vec![0u8; BLOCK.min(data.len() * W::BYTES)];
    for (seed, subtract) in masks {
        let mut cipher = ChaCha20::new(seed.into(), &[0u8; 12].into());
        cipher.seek((offset * W::BYTES) as u64);
        for chunk in data.chunks_mut(BLOCK / W::BYTES) {
            let bytes = &mut buf[..chunk.len() * W::BYTES];
            bytes.fill(0);
            cipher.apply_keystream(bytes);
            if *subtract {
                for (d, k) in chunk.iter_mut().zip(bytes.chunks_exact(W::BYTES)) {
                    *d = d.wsub(W::from_le(k));
                }
            } else {
                for (d, k) in chunk.iter_mut().zip(bytes.chunks_exact(W::BYTES)) {
                    *d = d.wadd(W::from_le(k));
                }
            }
        }
    }
}

/// Applies `masks` to the whole of `data`, chunk by chunk in parallel.
pub(crate) fn apply_masks<W: Word>(data: &mut [W], masks: &[Mask]) {
    data.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| apply_masks_at(chunk, i * CHUNK, masks));
}

/// A fresh X25519 secret from 32 random bytes.
pub(crate) fn secret_from(bytes: [u8; 32]) -> StaticSecret {
    StaticSecret::from(bytes)
}
