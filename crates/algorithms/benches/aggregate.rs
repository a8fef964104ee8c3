//! Aggregation benchmarks: the FedAvg fold of a 10M-parameter model (public path, bare
//! kernel single-threaded and with rayon, and an `f64`-accumulator variant for comparison),
//! one FedAdam server step, and the coordinate median of 10 updates.
//!
//! Throughput is bytes of memory traffic per second (12 B/param for the bare fold, 16 B/param
//! for `WeightedMean::add`, which also scans for NaN/inf); compare it with the single-thread
//! read bandwidth printed first. Run: `cargo bench -p fledge-algorithms --bench aggregate`.

#![allow(missing_docs)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fledge_algorithms::accumulate::WeightedMean;
use fledge_algorithms::fedopt::{AdaptiveOptimizer, AdaptiveParams, AdaptiveRule};
use fledge_algorithms::{Tensor, Weights, bench, kernels, robust};

const PARAMS: usize = 10_000_000;
const MEDIAN_PARAMS: usize = 1_000_000;
const MEDIAN_UPDATES: usize = 10;

fn model(params: usize, seed: u32) -> Weights {
    let data = (0..params)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 10_000) as f32 * 1e-4)
        .collect();
    Weights::from_tensors(vec![Tensor::new("w", vec![params], data).expect("shape")])
        .expect("one tensor")
}

/// The fold with an `f64` accumulator, to justify accumulating in `f32`.
fn mean_step_f64(acc: &mut [f64], x: &[f32], r: f64) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += r * (f64::from(*b) - *a);
    }
}

fn fold(c: &mut Criterion) {
    // The bench-table figures, as `fledge bench aggregate` will compute them, on buffers far
    // larger than any last-level cache (servers ship with up to ~256 MiB of L3, where a
    // 10M-parameter fold, 80 MB, would run from cache).
    let bw = bench::memory_read_bandwidth(bench::DRAM_BENCH_BYTES);
    let params = bench::DRAM_BENCH_PARAMS;
    let add = bench::fold_throughput(params, 5);
    let serial = bench::fold_kernel_throughput(params, 5, false);
    let parallel = bench::fold_kernel_throughput(params, 5, true);
    eprintln!("single-thread memory read bandwidth (1 GiB):  {bw:.2} GB/s");
    eprintln!("WeightedMean::add, 100M params (16 B/param):  {add:.2} GB/s = {:.2}x", add / bw);
    eprintln!(
        "fold kernel 1 thread, 100M (12 B/param):      {serial:.2} GB/s = {:.2}x",
        serial / bw
    );
    eprintln!(
        "fold kernel rayon, 100M (12 B/param):         {parallel:.2} GB/s = {:.2}x",
        parallel / bw
    );

    let update = model(PARAMS, 1);
    let mut group = c.benchmark_group("fedavg_fold_10M");
    group.sample_size(10);

    group.throughput(Throughput::Bytes((PARAMS * bench::ADD_BYTES_PER_PARAM) as u64));
    let mut acc = WeightedMean::new(&update);
    acc.add(&model(PARAMS, 2), 1.0).expect("same layout");
    group.bench_function("weighted_mean_add", |b| {
        b.iter(|| acc.add(black_box(&update), 1.0).expect("same layout"))
    });

    group.throughput(Throughput::Bytes((PARAMS * bench::FOLD_BYTES_PER_PARAM) as u64));
    let x = update.tensors()[0].data();
    let mut acc32 = vec![0.5f32; PARAMS];
    group.bench_function("kernel_f32_serial", |b| {
        b.iter(|| kernels::mean_step_serial(black_box(&mut acc32), black_box(x), 0.25))
    });
    group.bench_function("kernel_f32_rayon", |b| {
        b.iter(|| kernels::mean_step(black_box(&mut acc32), black_box(x), 0.25))
    });
    let mut acc64 = vec![0.5f64; PARAMS];
    group.bench_function("kernel_f64_serial", |b| {
        b.iter(|| mean_step_f64(black_box(&mut acc64), black_box(x), 0.25))
    });
    group.finish();
}

fn fedadam(c: &mut Criterion) {
    let mut global = model(PARAMS, 3);
    let delta = model(PARAMS, 4);
    let mut opt = AdaptiveOptimizer::new(AdaptiveRule::Adam, AdaptiveParams::default());
    let mut group = c.benchmark_group("fedadam_step_10M");
    group.sample_size(10);
    group.bench_function("step", |b| {
        b.iter(|| opt.step(black_box(&mut global), black_box(&delta)).expect("same layout"))
    });
    group.finish();
}

fn median(c: &mut Criterion) {
    let updates: Vec<Weights> =
        (0..MEDIAN_UPDATES as u32).map(|s| model(MEDIAN_PARAMS, s * 7919)).collect();
    let mut group = c.benchmark_group("median_10x1M");
    group.sample_size(10);
    group.throughput(Throughput::Elements((MEDIAN_PARAMS * MEDIAN_UPDATES) as u64));
    group.bench_function("coordinate_median", |b| {
        b.iter(|| robust::coordinate_median(black_box(&updates)).expect("same layout"))
    });
    group.finish();
}

criterion_group!(benches, fold, fedadam, median);
criterion_main!(benches);
