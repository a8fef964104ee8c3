//! The sparse neighbour graph of SecAgg+: a Harary graph `H(k, n)` on a random permutation of
//! the clients (each client is joined to the `k/2` clients on either side of it on a ring in
//! permuted order), as in Bell et al. 2020 and Flower. Client and server derive it from the
//! round's seed, so it is never sent.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// `k` rounded up to even and capped at `n − 1` (then the graph is complete).
pub fn effective_degree(n: u32, k: u32) -> u32 {
    let k = k.saturating_add(k % 2);
    k.min(n.saturating_sub(1))
}

/// The sorted neighbours of every client `0..n` (a client is not its own neighbour).
pub fn neighbours(n: u32, k: u32, seed: &[u8; 32]) -> Vec<Vec<u32>> {
    let k = effective_degree(n, k);
    if k >= n.saturating_sub(1) {
        return (0..n).map(|i| (0..n).filter(|j| *j != i).collect()).collect();
    }
    let perm = permutation(n, seed);
    let mut pos = vec![0u32; n as usize];
    for (p, &c) in perm.iter().enumerate() {
        pos[c as usize] = p as u32;
    }
    (0..n)
        .map(|c| {
            let p = pos[c as usize];
            let mut out: Vec<u32> = (1..=k / 2)
                .flat_map(|d| [perm[((p + d) % n) as usize], perm[((p + n - d) % n) as usize]])
                .collect();
            out.sort_unstable();
            out.dedup();
            out
        })
        .collect()
}

/// The neighbours of one client (what a client computes for itself), in O(n) time and
/// memory, the same list as `neighbours(n, k, seed)[client]`.
pub fn neighbours_of(n: u32, k: u32, seed: &[u8; 32], client: u32) -> Vec<u32> {
    let k = effective_degree(n, k);
    if client >= n {
        return Vec::new();
    }
    if k >= n.saturating_sub(1) {
        return (0..n).filter(|j| *j != client).collect();
    }
    let perm = permutation(n, seed);
    let Some(p) = perm.iter().position(|c| *c == client) else { return Vec::new() };
    let p = p as u32;
    let mut out: Vec<u32> = (1..=k / 2)
        .flat_map(|d| [perm[((p + d) % n) as usize], perm[((p + n - d) % n) as usize]])
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// A uniform permutation of `0..n` by Fisher–Yates on ChaCha20 (stable across versions of
/// `rand`: only the raw ChaCha20 stream is used, with rejection sampling).
fn permutation(n: u32, seed: &[u8; 32]) -> Vec<u32> {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    let mut perm: Vec<u32> = (0..n).collect();
    for i in (1..perm.len()).rev() {
        let bound = i as u64 + 1;
        let zone = u64::MAX - (u64::MAX % bound);
        let j = loop {
            let v = rng.next_u64();
            if v < zone {
                break (v % bound) as usize;
            }
        };
        perm.swap(i, j);
    }
    perm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harary_graph_is_symmetric_and_regular() {
        let g = neighbours(50, 8, &[3; 32]);
        for (i, ns) in g.iter().enumerate() {
            assert_eq!(ns.len(), 8, "client {i}");
            assert!(!ns.contains(&(i as u32)));
            for j in ns {
                assert!(g[*j as usize].contains(&(i as u32)), "{i} -> {j} not symmetric");
            }
        }
        assert_ne!(g, neighbours(50, 8, &[4; 32]), "the seed picks the graph");
        for i in 0..50 {
            assert_eq!(neighbours_of(50, 8, &[3; 32], i), g[i as usize]);
        }
        assert_eq!(neighbours_of(5, 8, &[0; 32], 2), vec![0, 1, 3, 4]);
        assert_eq!(effective_degree(50, 7), 8);
        assert_eq!(neighbours(5, 8, &[0; 32])[0], vec![1, 2, 3, 4]);
    }
}
