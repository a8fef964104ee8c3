//! SecAgg+ cost at 100k and 10M parameters with 10 clients (complete graph, threshold 6,
//! 16-bit quantisation, weights up to 1000, so the 32-bit ring):
//!
//! - `client_mask`: one client's stage 3 (decrypt 9 share boxes, quantise, weight, add its
//!   self mask and 9 pairwise masks); compare with the time to train and send the update.
//! - `server_unmask`: the server's last step with no dropout (10 self masks removed) and with
//!   3 clients dropped after sending shares (7 self masks and 21 pairwise masks).
//! - `plain_fold`: the plain FedAvg fold of the same 10 updates, the baseline a SecAgg round
//!   replaces on the server.
//!
//! Run: `cargo bench -p fledge-algorithms --bench secagg`.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use fledge_algorithms::privacy::secagg::{
    ClientMessage, SecAggClient, SecAggConfig, SecAggServer, ServerMessage,
};
use fledge_algorithms::{Optimizer, Tensor, Weights};
use serde_json::json;

const CLIENTS: u32 = 10;

fn config() -> SecAggConfig {
    SecAggConfig::from_json(&json!({
        "threshold": 6, "quantizationBits": 16, "clippingRange": 1.0, "maxWeight": 1000
    }))
    .expect("config")
}

fn update(params: usize, seed: u32) -> Vec<f32> {
    (0..params)
        .map(|i| {
            ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 2000) as f32 * 1e-3 - 1.0
        })
        .collect()
}

/// Runs a round up to the masked-input stage; returns the server, the clients, the share
/// deliveries and each client's masked input.
struct Prepared {
    server: SecAggServer,
    clients: Vec<SecAggClient>,
    deliveries: Vec<(u32, ServerMessage)>,
}

fn prepare(params: usize) -> Prepared {
    let cfg = config();
    let (mut server, setups) =
        SecAggServer::with_graph_seed(&cfg, 1, CLIENTS, params as u64, [1; 32]).expect("server");
    let mut clients = Vec::new();
    for (i, s) in setups.iter().enumerate() {
        let (c, keys) = SecAggClient::with_seed(&cfg, s, i as u64).expect("client");
        server.receive(i as u32, &keys).expect("keys");
        clients.push(c);
    }
    for (i, m) in server.close_stage().expect("keys stage") {
        let r = clients[i as usize].handle_keys(&m).expect("shares");
        server.receive(i, &r).expect("shares");
    }
    let deliveries = server.close_stage().expect("shares stage");
    Prepared { server, clients, deliveries }
}

/// The server after every masked input arrived (minus `dropped`), with the unmask shares in.
fn ready_to_finish(params: usize, updates: &[Vec<f32>], dropped: &[u32]) -> SecAggServer {
    let Prepared { mut server, mut clients, deliveries } = prepare(params);
    for (i, m) in deliveries {
        if dropped.contains(&i) {
            continue;
        }
        let input =
            clients[i as usize].handle_shares(&m, &updates[i as usize], 100).expect("input");
        server.receive(i, &input).expect("input");
    }
    for (i, m) in server.close_stage().expect("input stage") {
        let r = clients[i as usize].handle_unmask(&m).expect("unmask");
        server.receive(i, &r).expect("unmask");
    }
    server
}

fn bench(c: &mut Criterion) {
    for (params, label, samples) in [(100_000usize, "100k", 20usize), (10_000_000, "10M", 10)] {
        let updates: Vec<Vec<f32>> = (0..CLIENTS).map(|i| update(params, i)).collect();
        let mut group = c.benchmark_group(format!("secagg_{label}"));
        group.sample_size(samples).measurement_time(Duration::from_secs(if params > 1_000_000 {
            40
        } else {
            5
        }));
        group.throughput(Throughput::Elements(params as u64));

        group.bench_function("client_mask", |b| {
            b.iter_batched(
                || {
                    let mut p = prepare(params);
                    let (i, delivery) = p.deliveries.swap_remove(0);
                    (i, delivery.encode(), p.clients.swap_remove(i as usize))
                },
                |(i, wire, mut client)| {
                    let msg = ServerMessage::decode(&wire).expect("decode");
                    let out: ClientMessage =
                        client.handle_shares(&msg, &updates[i as usize], 100).expect("mask");
                    black_box(out.encode())
                },
                BatchSize::PerIteration,
            )
        });

        for (name, dropped) in
            [("server_unmask", &[][..]), ("server_unmask_3_dropped", &[2u32, 5, 7][..])]
        {
            group.bench_function(name, |b| {
                b.iter_batched(
                    || ready_to_finish(params, &updates, dropped),
                    |mut server| black_box(server.finish().expect("finish")),
                    BatchSize::PerIteration,
                )
            });
        }

        let global = Weights::from_tensors(vec![Tensor::zeros("w", vec![params])]).expect("model");
        let models: Vec<Weights> = updates
            .iter()
            .map(|u| {
                Weights::from_tensors(vec![Tensor::new("w", vec![params], u.clone()).expect("t")])
                    .expect("m")
            })
            .collect();
        group.bench_function("plain_fold_10_updates", |b| {
            let opt = Optimizer::from_config(&json!({"sort": "fedavg"})).expect("fedavg");
            b.iter(|| {
                let mut round = opt.begin_round(&global);
                for m in &models {
                    round.add(m, 100, 0).expect("add");
                }
                black_box(round)
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
