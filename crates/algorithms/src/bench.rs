//! Throughput probes for `fledge bench aggregate`: the fold's speed and the memory bandwidth
//! bound it is judged against, measured in the same process.
//!
//! Both functions allocate their buffers, touch them once so page faults are not timed, and
//! report the median of several timed passes in GB/s (10⁹ bytes per second). Build in
//! release mode: debug numbers are meaningless.
//!
//! Size the buffers well beyond the last-level cache, or the "memory" figures are cache
//! figures: server CPUs carry up to a few hundred MiB of L3 (the machine this was written on
//! has 260 MiB), so use [`DRAM_BENCH_BYTES`] and [`DRAM_BENCH_PARAMS`].

use std::hint::black_box;
use std::time::{Duration, Instant};

use crate::accumulate::WeightedMean;
use crate::kernels;
use crate::weights::{Tensor, Weights};

/// Buffer size for [`memory_read_bandwidth`] that no current cache holds: 1 GiB.
pub const DRAM_BENCH_BYTES: usize = 1 << 30;

/// Model size for [`fold_throughput`] whose fold (update + accumulator, 800 MB) runs from
/// DRAM: 100M parameters.
pub const DRAM_BENCH_PARAMS: usize = 100_000_000;

/// Memory traffic of one [`WeightedMean::add`] per parameter: the finiteness scan reads the
/// update (4 B), the fold reads it again (4 B) and reads and writes the accumulator (8 B).
pub const ADD_BYTES_PER_PARAM: usize = 16;

/// Memory traffic of the bare fold kernel per parameter ([`kernels::mean_step`]): read the
/// update, read and write the accumulator.
pub const FOLD_BYTES_PER_PARAM: usize = 12;

/// Throughput of folding one update of `params` parameters into a FedAvg accumulator through
/// the public path the roles use ([`WeightedMean::add`]: layout check, NaN/inf scan, fold,
/// rayon above [`kernels::PAR_THRESHOLD`]), counted as [`ADD_BYTES_PER_PARAM`] bytes of
/// memory traffic per parameter. Median of `iters` (at least 1) folds.
pub fn fold_throughput(params: usize, iters: usize) -> f64 {
    let update = sample_model(params, 1.0);
    let mut acc = WeightedMean::new(&update);
    acc.add(&sample_model(params, 2.0), 1.0).expect("bench models share a layout and are finite");
    let times = time_passes(iters, || {
        acc.add(black_box(&update), 1.0).expect("bench models share a layout and are finite");
    });
    black_box(&acc);
    gb_per_s(params * ADD_BYTES_PER_PARAM, median(times))
}

/// Throughput of the bare fold kernel on `params` parameters, single-threaded
/// ([`kernels::mean_step_serial`]) or with rayon ([`kernels::mean_step`]), counted as
/// [`FOLD_BYTES_PER_PARAM`] bytes per parameter. Median of `iters` passes.
pub fn fold_kernel_throughput(params: usize, iters: usize, parallel: bool) -> f64 {
    let x: Vec<f32> = (0..params).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let mut acc = vec![0.5f32; params];
    let times = time_passes(iters, || {
        if parallel {
            kernels::mean_step(black_box(&mut acc), black_box(&x), 0.25);
        } else {
            kernels::mean_step_serial(black_box(&mut acc), black_box(&x), 0.25);
        }
    });
    black_box(&acc);
    gb_per_s(params * FOLD_BYTES_PER_PARAM, median(times))
}

/// Single-threaded memory read bandwidth: a plain sum over a `bytes`-byte buffer (rounded
/// down to whole `u64`s, at least one), which `black_box` keeps the compiler from eliding.
/// Use a buffer much larger than the last-level cache ([`DRAM_BENCH_BYTES`]). Median of 5
/// passes.
pub fn memory_read_bandwidth(bytes: usize) -> f64 {
    let words = (bytes / 8).max(1);
    let buf: Vec<u64> = (0..words as u64).collect();
    let times = time_passes(5, || {
        let data = black_box(buf.as_slice());
        // Eight independent lanes so the sum is not serialised on one add chain.
        let mut lanes = [0u64; 8];
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            for i in 0..8 {
                lanes[i] = lanes[i].wrapping_add(c[i]);
            }
        }
        let tail: u64 = chunks.remainder().iter().fold(0, |a, &b| a.wrapping_add(b));
        black_box(lanes.iter().fold(tail, |a, &b| a.wrapping_add(b)));
    });
    gb_per_s(words * 8, median(times))
}

/// A one-tensor model of `params` finite values.
fn sample_model(params: usize, offset: f32) -> Weights {
    let data = (0..params).map(|i| offset + (i % 1000) as f32 * 1e-3).collect();
    let tensor = Tensor::new("w", vec![params], data).expect("shape matches data");
    Weights::from_tensors(vec![tensor]).expect("one tensor has a unique name")
}

fn time_passes(iters: usize, mut f: impl FnMut()) -> Vec<Duration> {
    // One untimed pass warms caches, the TLB and rayon's pool.
    f();
    (0..iters.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .collect()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

fn gb_per_s(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64().max(1e-12) / 1e9
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn probes_return_positive_finite_rates() {
        // Small sizes: this checks the plumbing, not the speed (benches measure speed).
        for rate in [
            fold_throughput(4096, 2),
            fold_kernel_throughput(4096, 2, false),
            fold_kernel_throughput(4096, 2, true),
            memory_read_bandwidth(1 << 16),
        ] {
            assert!(rate.is_finite() && rate > 0.0, "{rate}");
        }
    }
}
