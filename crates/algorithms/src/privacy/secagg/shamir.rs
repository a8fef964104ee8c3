//! Shamir secret sharing of 32-byte secrets over the prime field `GF(2⁶¹ − 1)`.
//!
//! A secret is cut into five 7-byte chunks (56 bits each, below the modulus); each chunk is
//! the constant term of its own random polynomial of degree `t − 1`, and a share is the five
//! polynomials evaluated at the holder's point `x = index + 1`. Any `t` shares give back the
//! secret (Lagrange interpolation at 0); fewer reveal nothing about it.

use rand::RngCore;

/// The modulus, the Mersenne prime `2⁶¹ − 1`.
pub const P: u64 = (1 << 61) - 1;
/// Field elements per share.
pub const CHUNKS: usize = 5;
/// Bytes of a share's value on the wire.
pub const SHARE_LEN: usize = CHUNKS * 8;
const CHUNK_BYTES: usize = 7;

/// One share's value: the polynomials at the holder's point.
pub type ShareValue = [u64; CHUNKS];

fn reduce(x: u128) -> u64 {
    let lo = (x as u64) & P;
    let hi = (x >> 61) as u64;
    let s = lo + (hi & P) + (hi >> 61);
    let s = (s & P) + (s >> 61);
    if s >= P { s - P } else { s }
}

fn add(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= P { s - P } else { s }
}

fn sub(a: u64, b: u64) -> u64 {
    if a >= b { a - b } else { a + P - b }
}

fn mul(a: u64, b: u64) -> u64 {
    reduce(u128::from(a) * u128::from(b))
}

fn pow(mut a: u64, mut e: u64) -> u64 {
    let mut r = 1;
    while e > 0 {
        if e & 1 == 1 {
            r = mul(r, a);
        }
        a = mul(a, a);
        e >>= 1;
    }
    r
}

fn inv(a: u64) -> u64 {
    pow(a, P - 2)
}

fn random_element(rng: &mut impl RngCore) -> u64 {
    loop {
        let v = rng.next_u64() & P;
        if v != P {
            return v;
        }
    }
}

/// The evaluation point of the client with this index.
pub fn point(index: u32) -> u64 {
    u64::from(index) + 1
}

/// Splits `secret` into one share per holder index, any `threshold` of which recover it.
pub fn split(
    secret: &[u8; 32],
    holders: &[u32],
    threshold: usize,
    rng: &mut impl RngCore,
) -> Vec<ShareValue> {
    let mut chunks = [0u64; CHUNKS];
    for (c, bytes) in chunks.iter_mut().zip(secret.chunks(CHUNK_BYTES)) {
        let mut le = [0u8; 8];
        le[..bytes.len()].copy_from_slice(bytes);
        *c = u64::from_le_bytes(le);
    }
    // coeffs[c][d]: coefficient of x^d of chunk c's polynomial; d = 0 is the secret.
    let coeffs: Vec<Vec<u64>> = chunks
        .iter()
        .map(|&s| {
            let mut p = vec![s];
            p.extend((1..threshold).map(|_| random_element(rng)));
            p
        })
        .collect();
    holders
        .iter()
        .map(|&h| {
            let x = point(h);
            let mut y = [0u64; CHUNKS];
            for (yc, poly) in y.iter_mut().zip(&coeffs) {
                // Horner.
                *yc = poly.iter().rev().fold(0, |acc, &c| add(mul(acc, x), c));
            }
            y
        })
        .collect()
}

/// Why shares do not give back a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CombineError {
    /// Fewer distinct shares than the threshold.
    #[error("{got} distinct shares, {needed} needed")]
    TooFew {
        /// Distinct shares given.
        got: usize,
        /// The threshold.
        needed: usize,
    },
    /// The interpolated value is not a valid secret (some share is wrong).
    #[error("the shares are inconsistent (the interpolated value is not a 56-bit chunk)")]
    Inconsistent,
}

/// Recovers the secret from the first `threshold` of `shares` (`(holder index, value)`,
/// distinct holders).
pub fn combine(shares: &[(u32, ShareValue)], threshold: usize) -> Result<[u8; 32], CombineError> {
    if shares.len() < threshold || threshold == 0 {
        return Err(CombineError::TooFew { got: shares.len(), needed: threshold });
    }
    let used = &shares[..threshold];
    let xs: Vec<u64> = used.iter().map(|(h, _)| point(*h)).collect();
    for (i, a) in xs.iter().enumerate() {
        if xs[..i].contains(a) {
            return Err(CombineError::TooFew { got: i, needed: threshold });
        }
    }
    // Lagrange basis at 0: l_i = Π_{j≠i} x_j / (x_j − x_i).
    let basis: Vec<u64> = (0..threshold)
        .map(|i| {
            let (mut num, mut den) = (1u64, 1u64);
            for j in 0..threshold {
                if i != j {
                    num = mul(num, xs[j]);
                    den = mul(den, sub(xs[j], xs[i]));
                }
            }
            mul(num, inv(den))
        })
        .collect();
    let mut secret = [0u8; 35];
    for c in 0..CHUNKS {
        let v = used.iter().zip(&basis).fold(0, |acc, ((_, y), l)| add(acc, mul(y[c], *l)));
        if v >> (CHUNK_BYTES * 8) != 0 {
            return Err(CombineError::Inconsistent);
        }
        secret[c * CHUNK_BYTES..(c + 1) * CHUNK_BYTES]
            .copy_from_slice(&v.to_le_bytes()[..CHUNK_BYTES]);
    }
    if secret[32..].iter().any(|b| *b != 0) {
        return Err(CombineError::Inconsistent);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(&secret[..32]);
    Ok(out)
}

/// Recovers a secret that `verify` accepts from `shares`, trying successive windows of
/// `threshold` shares so that a few wrong shares (from lying clients) are skipped when more
/// than `threshold` are available. `None` if no window verifies.
pub fn combine_verified(
    shares: &[(u32, ShareValue)],
    threshold: usize,
    verify: impl Fn(&[u8; 32]) -> bool,
) -> Result<[u8; 32], CombineError> {
    if shares.len() < threshold {
        return Err(CombineError::TooFew { got: shares.len(), needed: threshold });
    }
    for start in 0..=(shares.len() - threshold) {
        if let Ok(secret) = combine(&shares[start..], threshold)
            && verify(&secret)
        {
            return Ok(secret);
        }
    }
    Err(CombineError::Inconsistent)
}

/// Whether every element is a field element (decoded shares from peers are checked).
pub fn is_valid(value: &ShareValue) -> bool {
    value.iter().all(|v| *v < P)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    #[test]
    fn any_threshold_subset_recovers_the_secret_and_fewer_do_not() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        secret[31] = 0xff;
        let holders: Vec<u32> = vec![3, 9, 17, 40, 41, 1000];
        let shares = split(&secret, &holders, 4, &mut rng);
        let all: Vec<(u32, ShareValue)> = holders.iter().copied().zip(shares).collect();
        for start in 0..=2 {
            assert_eq!(combine(&all[start..], 4).unwrap(), secret);
        }
        let reversed: Vec<_> = all.iter().rev().copied().collect();
        assert_eq!(combine(&reversed, 4).unwrap(), secret);
        assert!(matches!(combine(&all[..3], 4), Err(CombineError::TooFew { .. })));
        // Three shares interpolated as if the threshold were 3 give something else.
        assert_ne!(combine(&all[..3], 3).ok(), Some(secret));
    }

    #[test]
    fn a_wrong_share_is_skipped_when_spares_exist() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let secret = [42u8; 32];
        let holders: Vec<u32> = (0..6).collect();
        let mut all: Vec<(u32, ShareValue)> =
            holders.iter().copied().zip(split(&secret, &holders, 3, &mut rng)).collect();
        all[0].1[2] = add(all[0].1[2], 1);
        let got = combine_verified(&all, 3, |s| *s == secret).unwrap();
        assert_eq!(got, secret);
        assert_eq!(
            combine_verified(&all[..3], 3, |s| *s == secret),
            Err(CombineError::Inconsistent)
        );
    }

    #[test]
    fn field_arithmetic() {
        assert_eq!(mul(P - 1, P - 1), 1);
        assert_eq!(mul(inv(12345), 12345), 1);
        assert_eq!(reduce(u128::from(P) * 3 + 5), 5);
        assert_eq!(sub(0, 1), P - 1);
    }
}
