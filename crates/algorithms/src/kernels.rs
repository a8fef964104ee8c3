//! Element-wise kernels over `f32` slices: the inner loops of every aggregation rule.
//!
//! Each kernel is a plain loop over fixed-size chunks ([`LANES`] elements) that LLVM turns into
//! SIMD code without `unsafe` or intrinsics; `benches/aggregate.rs` and [`crate::bench`] check
//! that the fold runs at memory speed. Slices longer than [`PAR_THRESHOLD`] are split into
//! [`PAR_CHUNK`]-element pieces processed by rayon's global pool.
//!
//! Accumulation is in `f32`. The fold is memory-bound (it reads the update and reads and
//! writes the accumulator), so an `f64` accumulator would move 20 bytes per parameter instead
//! of 12 and run about 40% slower (see the `fold_f64` case of the criterion bench). Precision
//! is kept by folding as a running weighted mean, `acc += (w / W) * (x - acc)`, whose values
//! stay in the range of the inputs instead of growing with the total weight; this also makes
//! the mean of one update, or of identical updates, exact.

use rayon::prelude::*;

/// Elements per inner chunk: 16 `f32`s, i.e. two AVX2 or four SSE registers, enough for LLVM
/// to unroll and vectorise the body while keeping the remainder loop short.
pub const LANES: usize = 16;

/// Slices with at least this many elements are processed in parallel.
///
/// 256 Ki elements is 1 MiB per `f32` operand: below it the fold takes ~100 µs on one core and
/// rayon's fork/join (a few µs per task, plus waking a second core) is not worth it; above it
/// every chunk is large enough to amortise scheduling and a second core adds bandwidth.
pub const PAR_THRESHOLD: usize = 1 << 18;

/// Elements per rayon task (256 KiB per `f32` operand), a multiple of [`LANES`].
pub const PAR_CHUNK: usize = 1 << 16;

/// `acc[i] += r * (x[i] - acc[i])`: one step of a running weighted mean.
///
/// # Panics
/// Panics if the slices differ in length (callers check layouts first).
pub fn mean_step(acc: &mut [f32], x: &[f32], r: f32) {
    assert_eq!(acc.len(), x.len(), "mean_step: slice lengths differ");
    if acc.len() >= PAR_THRESHOLD {
        acc.par_chunks_mut(PAR_CHUNK)
            .zip(x.par_chunks(PAR_CHUNK))
            .for_each(|(a, b)| mean_step_serial(a, b, r));
    } else {
        mean_step_serial(acc, x, r);
    }
}

/// Single-threaded [`mean_step`].
pub fn mean_step_serial(acc: &mut [f32], x: &[f32], r: f32) {
    let mut acc_chunks = acc.chunks_exact_mut(LANES);
    let mut x_chunks = x.chunks_exact(LANES);
    for (a, b) in (&mut acc_chunks).zip(&mut x_chunks) {
        for i in 0..LANES {
            a[i] += r * (b[i] - a[i]);
        }
    }
    for (a, b) in acc_chunks.into_remainder().iter_mut().zip(x_chunks.remainder()) {
        *a += r * (*b - *a);
    }
}

/// `acc[i] += a * x[i]`.
///
/// # Panics
/// Panics if the slices differ in length.
pub fn axpy(acc: &mut [f32], x: &[f32], a: f32) {
    assert_eq!(acc.len(), x.len(), "axpy: slice lengths differ");
    if acc.len() >= PAR_THRESHOLD {
        acc.par_chunks_mut(PAR_CHUNK)
            .zip(x.par_chunks(PAR_CHUNK))
            .for_each(|(y, x)| axpy_serial(y, x, a));
    } else {
        axpy_serial(acc, x, a);
    }
}

/// Single-threaded [`axpy`].
pub fn axpy_serial(acc: &mut [f32], x: &[f32], a: f32) {
    let mut acc_chunks = acc.chunks_exact_mut(LANES);
    let mut x_chunks = x.chunks_exact(LANES);
    for (y, b) in (&mut acc_chunks).zip(&mut x_chunks) {
        for i in 0..LANES {
            y[i] += a * b[i];
        }
    }
    for (y, b) in acc_chunks.into_remainder().iter_mut().zip(x_chunks.remainder()) {
        *y += a * *b;
    }
}

/// `x[i] *= a`.
pub fn scale(x: &mut [f32], a: f32) {
    if x.len() >= PAR_THRESHOLD {
        x.par_chunks_mut(PAR_CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v *= a));
    } else {
        x.iter_mut().for_each(|v| *v *= a);
    }
}

/// Index of the first non-finite (NaN or ±inf) element, if any.
///
/// The scan is branch-free inside each block (see `first_non_finite_serial`), so it
/// vectorises and runs at memory read speed; only a failing block is searched element by
/// element.
pub fn first_non_finite(x: &[f32]) -> Option<usize> {
    if x.len() >= PAR_THRESHOLD {
        x.par_chunks(PAR_CHUNK)
            .enumerate()
            .filter_map(|(i, c)| first_non_finite_serial(c).map(|j| i * PAR_CHUNK + j))
            .min()
    } else {
        first_non_finite_serial(x)
    }
}

fn first_non_finite_serial(x: &[f32]) -> Option<usize> {
    // A value is NaN or infinite iff its exponent bits are all ones, i.e. iff its bits without
    // the sign are >= 0x7f80_0000. An integer max over a block vectorises well (one compare
    // per block instead of per element).
    const BLOCK: usize = 1024;
    for (bi, block) in x.chunks(BLOCK).enumerate() {
        let max = block.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
        if max >= 0x7f80_0000 {
            return block.iter().position(|v| !v.is_finite()).map(|j| bi * BLOCK + j);
        }
    }
    None
}

/// Squared Euclidean distance `sum((a[i] - b[i])^2)`, accumulated in `f64` per chunk.
///
/// # Panics
/// Panics if the slices differ in length.
pub fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "squared_distance: slice lengths differ");
    if a.len() >= PAR_THRESHOLD {
        a.par_chunks(PAR_CHUNK)
            .zip(b.par_chunks(PAR_CHUNK))
            .map(|(x, y)| squared_distance_serial(x, y))
            .sum()
    } else {
        squared_distance_serial(a, b)
    }
}

fn squared_distance_serial(a: &[f32], b: &[f32]) -> f64 {
    // Partial sums in f32 lanes over short blocks keep the loop vectorised; each block is
    // then added to an f64 total so the long sum does not lose precision.
    const BLOCK: usize = 1024;
    let mut total = 0.0f64;
    for (xa, xb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let mut lanes = [0.0f32; LANES];
        let mut ca = xa.chunks_exact(LANES);
        let mut cb = xb.chunks_exact(LANES);
        for (u, v) in (&mut ca).zip(&mut cb) {
            for i in 0..LANES {
                let d = u[i] - v[i];
                lanes[i] += d * d;
            }
        }
        let mut block: f64 = lanes.iter().map(|&v| f64::from(v)).sum();
        for (u, v) in ca.remainder().iter().zip(cb.remainder()) {
            let d = f64::from(*u) - f64::from(*v);
            block += d * d;
        }
        total += block;
    }
    total
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn kernels_match_scalar_reference_on_odd_and_parallel_lengths() {
        for len in [0, 1, 15, 16, 17, 1000, PAR_THRESHOLD + 37] {
            let x: Vec<f32> = (0..len).map(|i| (i % 97) as f32 * 0.25 - 3.0).collect();
            let base: Vec<f32> = (0..len).map(|i| (i % 13) as f32).collect();

            let mut acc = base.clone();
            axpy(&mut acc, &x, 2.0);
            for i in 0..len {
                assert_eq!(acc[i], base[i] + 2.0 * x[i], "axpy at {i}");
            }

            let mut acc = base.clone();
            mean_step(&mut acc, &x, 0.5);
            for i in 0..len {
                assert_eq!(acc[i], base[i] + 0.5 * (x[i] - base[i]), "mean_step at {i}");
            }

            let mut scaled = x.clone();
            scale(&mut scaled, 3.0);
            for i in 0..len {
                assert_eq!(scaled[i], 3.0 * x[i]);
            }

            let expected: f64 =
                x.iter().zip(&base).map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2)).sum();
            let got = squared_distance(&x, &base);
            assert!((got - expected).abs() <= 1e-6 * expected.max(1.0), "{got} vs {expected}");
        }
    }

    #[test]
    fn first_non_finite_finds_the_first_bad_element() {
        let len = PAR_THRESHOLD + 100;
        let mut x = vec![1.0f32; len];
        assert_eq!(first_non_finite(&x), None);
        x[len - 3] = f32::INFINITY;
        assert_eq!(first_non_finite(&x), Some(len - 3));
        x[PAR_CHUNK + 5] = f32::NAN;
        assert_eq!(first_non_finite(&x), Some(PAR_CHUNK + 5));
        assert_eq!(first_non_finite(&[1.0, f32::NEG_INFINITY]), Some(1));
        assert_eq!(first_non_finite(&[]), None);
    }
}
