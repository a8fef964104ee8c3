//! SecAgg+ end to end: client and server state machines exchanging encoded bytes, as they
//! will over a channel. The aggregate equals plain weighted FedAvg (the crate's own
//! `Optimizer`) within one quantisation step, with and without dropouts at every stage; one
//! client's masked bytes look uniform; below the threshold the round fails and says why; and
//! malformed, tampered or lying messages are rejected with an error naming the sender.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::{BTreeMap, BTreeSet};

use fledge_algorithms::privacy::secagg::{
    ClientBody, ClientMessage, MaskedInput, SecAggClient, SecAggConfig, SecAggError, SecAggResult,
    SecAggServer, ServerBody, ServerMessage, Stage,
};
use fledge_algorithms::{Optimizer, Tensor, Weights};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde_json::json;

fn config(value: serde_json::Value) -> SecAggConfig {
    SecAggConfig::from_json(&value).unwrap()
}

/// Round trip through bytes, as over a channel.
fn s2c(m: &ServerMessage) -> ServerMessage {
    ServerMessage::decode(&m.encode()).unwrap()
}
fn c2s(m: &ClientMessage) -> ClientMessage {
    ClientMessage::decode(&m.encode()).unwrap()
}

/// Who drops before each stage: [keys, shares, masked input, unmask shares].
type Drops = [BTreeSet<u32>; 4];

fn no_drops() -> Drops {
    Default::default()
}

struct Round {
    updates: Vec<Vec<f32>>,
    samples: Vec<u64>,
}

fn round_data(n: u32, params: usize, range: f32, seed: u64) -> Round {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let updates =
        (0..n).map(|_| (0..params).map(|_| rng.random_range(-range..range)).collect()).collect();
    let samples = (0..n).map(|_| rng.random_range(1..600)).collect();
    Round { updates, samples }
}

fn run(
    cfg: &SecAggConfig,
    data: &Round,
    drops: &Drops,
    seed: u8,
) -> Result<SecAggResult, SecAggError> {
    let n = data.updates.len() as u32;
    let params = data.updates[0].len() as u64;
    let (mut server, setups) = SecAggServer::with_graph_seed(cfg, 3, n, params, [seed; 32])?;
    let mut clients = BTreeMap::new();
    for (i, setup) in setups.iter().enumerate() {
        let i = i as u32;
        let (c, keys) =
            SecAggClient::with_seed(cfg, &s2c(setup), u64::from(seed) * 1000 + u64::from(i))?;
        if drops[0].contains(&i) {
            continue;
        }
        server.receive(i, &c2s(&keys))?;
        clients.insert(i, c);
    }
    for (i, m) in server.close_stage()? {
        if drops[1].contains(&i) {
            continue;
        }
        let reply = clients.get_mut(&i).unwrap().handle_keys(&s2c(&m))?;
        server.receive(i, &c2s(&reply))?;
    }
    for (i, m) in server.close_stage()? {
        if drops[2].contains(&i) {
            continue;
        }
        let u = i as usize;
        let reply = clients.get_mut(&i).unwrap().handle_shares(
            &s2c(&m),
            &data.updates[u],
            data.samples[u],
        )?;
        server.receive(i, &c2s(&reply))?;
    }
    for (i, m) in server.close_stage()? {
        if drops[3].contains(&i) {
            continue;
        }
        let reply = clients.get_mut(&i).unwrap().handle_unmask(&s2c(&m))?;
        server.receive(i, &c2s(&reply))?;
    }
    server.finish()
}

/// The crate's FedAvg over `who`, with sample counts clipped to `max_weight`.
fn fedavg(data: &Round, who: &[u32], max_weight: Option<u64>) -> Vec<f32> {
    let len = data.updates[0].len();
    let mut opt = Optimizer::from_config(&json!({"sort": "fedavg"})).unwrap();
    let mut global =
        Weights::from_tensors(vec![Tensor::new("w", vec![len], vec![0.0; len]).unwrap()]).unwrap();
    let mut round = opt.begin_round(&global);
    for &i in who {
        let i = i as usize;
        let w = Weights::from_tensors(vec![
            Tensor::new("w", vec![len], data.updates[i].clone()).unwrap(),
        ])
        .unwrap();
        let weight = max_weight.map_or(1, |m| data.samples[i].min(m));
        round.add(&w, weight, 0).unwrap();
    }
    opt.finish_round(round, &mut global).unwrap();
    global.tensors()[0].data().to_vec()
}

fn assert_matches_fedavg(cfg: &SecAggConfig, data: &Round, result: &SecAggResult) {
    let expected = fedavg(data, &result.contributors, cfg.max_weight);
    let bound = result.quantization_step * 1.0001 + 1e-6;
    let worst = result
        .mean
        .iter()
        .zip(&expected)
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0.0, f64::max);
    assert!(
        worst <= bound,
        "max |secagg − fedavg| = {worst}, quantisation step {}",
        result.quantization_step
    );
    let expected_weight: u64 = result
        .contributors
        .iter()
        .map(|i| cfg.max_weight.map_or(1, |m| data.samples[*i as usize].min(m)))
        .sum();
    assert_eq!(result.total_weight, expected_weight);
}

fn set(ids: &[u32]) -> BTreeSet<u32> {
    ids.iter().copied().collect()
}

#[test]
fn aggregate_equals_weighted_fedavg_within_one_quantisation_step() {
    for rounding in ["stochastic", "nearest"] {
        let cfg = config(json!({
            "threshold": 6, "quantizationBits": 16, "clippingRange": 1.0,
            "maxWeight": 1000, "rounding": rounding
        }));
        let data = round_data(10, 2000, 1.0, 1);
        let result = run(&cfg, &data, &no_drops(), 1).unwrap();
        assert_eq!(result.contributors, (0..10).collect::<Vec<_>>());
        assert!(result.dropped.is_empty());
        assert_matches_fedavg(&cfg, &data, &result);
    }
}

#[test]
fn unweighted_and_64_bit_ring_rounds_match_fedavg() {
    // Without maxWeight every client weighs 1.
    let cfg = config(json!({"threshold": 3, "quantizationBits": 12, "clippingRange": 0.5}));
    let data = round_data(4, 500, 0.5, 2);
    let result = run(&cfg, &data, &no_drops(), 2).unwrap();
    assert_eq!(result.total_weight, 4);
    assert_matches_fedavg(&cfg, &data, &result);
    // 30 bits × weights up to 2^20 need the 64-bit ring.
    let cfg = config(
        json!({"threshold": 3, "quantizationBits": 30, "clippingRange": 2.0, "maxWeight": 1 << 20}),
    );
    let (server, _) = SecAggServer::with_graph_seed(&cfg, 0, 4, 10, [0; 32]).unwrap();
    assert_eq!(server.setup().ring_bits, 64);
    let data = round_data(4, 300, 2.0, 3);
    let result = run(&cfg, &data, &no_drops(), 3).unwrap();
    assert_matches_fedavg(&cfg, &data, &result);
}

#[test]
fn sparse_neighbour_graph_matches_fedavg() {
    let cfg = config(json!({
        "threshold": 6, "neighbors": 9, "quantizationBits": 16, "clippingRange": 1.0, "maxWeight": 500
    }));
    let data = round_data(30, 400, 1.0, 4);
    let (server, _) = SecAggServer::with_graph_seed(&cfg, 3, 30, 400, [4; 32]).unwrap();
    assert_eq!(server.setup().neighbors, 10, "rounded up to even");
    assert!((0..30).all(|i| server.neighbours(i).len() == 10));
    let result = run(&cfg, &data, &no_drops(), 4).unwrap();
    assert_matches_fedavg(&cfg, &data, &result);
}

#[test]
fn thirty_percent_dropping_at_each_stage_still_matches_fedavg() {
    let cfg = config(
        json!({"threshold": 6, "quantizationBits": 16, "clippingRange": 1.0, "maxWeight": 1000}),
    );
    let data = round_data(10, 1000, 1.0, 5);
    for stage in 0..4 {
        let mut drops = no_drops();
        drops[stage] = set(&[1, 4, 8]);
        let result = run(&cfg, &data, &drops, 5).unwrap_or_else(|e| panic!("stage {stage}: {e}"));
        let expected: Vec<u32> = if stage < 3 {
            (0..10).filter(|i| ![1, 4, 8].contains(i)).collect()
        } else {
            (0..10).collect() // dropped after sending the masked input: still in the sum
        };
        assert_eq!(result.contributors, expected, "stage {stage}");
        if stage == 2 {
            assert_eq!(result.dropped, vec![1, 4, 8], "their pairwise masks were cancelled");
        }
        assert_matches_fedavg(&cfg, &data, &result);
    }
}

#[test]
fn thirty_percent_dropping_at_each_stage_on_a_sparse_graph() {
    let cfg = config(json!({
        "threshold": 8, "neighbors": 14, "quantizationBits": 16, "clippingRange": 1.0, "maxWeight": 1000
    }));
    let data = round_data(40, 300, 1.0, 6);
    for stage in 0..4 {
        let mut drops = no_drops();
        drops[stage] = (0..40).filter(|i| i % 10 < 3).collect();
        let result = run(&cfg, &data, &drops, 6).unwrap_or_else(|e| panic!("stage {stage}: {e}"));
        assert_eq!(result.contributors.len(), if stage < 3 { 28 } else { 40 });
        assert_matches_fedavg(&cfg, &data, &result);
    }
}

#[test]
fn dropouts_at_every_stage_of_one_round() {
    // 20 clients, 2 lost before each of the four stages: 12 of the 14 that sent input also
    // reveal, and the sum still comes out.
    let cfg = config(
        json!({"threshold": 11, "quantizationBits": 16, "clippingRange": 1.0, "maxWeight": 1000}),
    );
    let data = round_data(20, 500, 1.0, 7);
    let drops = [set(&[0, 19]), set(&[5, 6]), set(&[10, 3]), set(&[7, 12])];
    let result = run(&cfg, &data, &drops, 7).unwrap();
    let expected: Vec<u32> = (0..20).filter(|i| ![0, 19, 5, 6, 10, 3].contains(i)).collect();
    assert_eq!(result.contributors, expected);
    assert_eq!(result.dropped, vec![3, 10]);
    assert_matches_fedavg(&cfg, &data, &result);
}

#[test]
fn below_threshold_the_round_fails_with_a_clear_reason() {
    let cfg = config(json!({"threshold": 6, "quantizationBits": 16, "clippingRange": 1.0}));
    let data = round_data(10, 100, 1.0, 8);
    for (stage, name) in
        [(0, "advertise keys"), (1, "share keys"), (2, "masked input"), (3, "unmask")]
    {
        let mut drops = no_drops();
        drops[stage] = set(&[0, 2, 4, 6, 8]);
        let err = run(&cfg, &data, &drops, 8).unwrap_err();
        match &err {
            SecAggError::BelowThreshold { stage: s, got, threshold, .. } => {
                assert_eq!((*s, *got, *threshold), (name, 5, 6), "{err}");
            }
            other => panic!("stage {stage}: expected BelowThreshold, got {other}"),
        }
        let text = err.to_string();
        assert!(
            text.contains("below threshold") && text.contains("no individual update was revealed"),
            "{text}"
        );
    }
}

#[test]
fn an_aborted_server_reveals_nothing_later() {
    let cfg = config(json!({"threshold": 3, "quantizationBits": 8, "clippingRange": 1.0}));
    let (mut server, setups) = SecAggServer::with_graph_seed(&cfg, 1, 4, 10, [1; 32]).unwrap();
    let (_c, keys) = SecAggClient::with_seed(&cfg, &setups[0], 1).unwrap();
    server.receive(0, &keys).unwrap();
    assert!(matches!(server.close_stage(), Err(SecAggError::BelowThreshold { got: 1, .. })));
    assert_eq!(server.stage(), Stage::Failed);
    assert!(server.close_stage().is_err());
    assert!(server.finish().is_err());
}

/// Pearson's chi-square of the byte histogram against uniform (255 degrees of freedom).
fn chi_square(bytes: &[u8]) -> f64 {
    let mut hist = [0u64; 256];
    for b in bytes {
        hist[*b as usize] += 1;
    }
    let e = bytes.len() as f64 / 256.0;
    hist.iter().map(|&o| (o as f64 - e).powi(2) / e).sum()
}

/// Wald–Wolfowitz runs test on the bits: the z-score of the number of runs.
fn runs_z(bytes: &[u8]) -> f64 {
    let bits = bytes.iter().flat_map(|b| (0..8).map(move |k| (b >> k) & 1));
    let (mut n1, mut n0, mut runs, mut last) = (0f64, 0f64, 0f64, 2u8);
    for bit in bits {
        if bit == 1 {
            n1 += 1.0
        } else {
            n0 += 1.0
        }
        if bit != last {
            runs += 1.0;
            last = bit;
        }
    }
    let n = n0 + n1;
    let mean = 2.0 * n0 * n1 / n + 1.0;
    let var = (mean - 1.0) * (mean - 2.0) / (n - 1.0);
    (runs - mean) / var.sqrt()
}

#[test]
fn one_clients_masked_bytes_are_indistinguishable_from_uniform() {
    // Thresholds far in the tails (chi-square with 255 df above 400: p ≈ 5e-9; |z| > 6:
    // p ≈ 2e-9), and the seeds are fixed, so this cannot flake; a plain or badly masked
    // input fails both by orders of magnitude (checked below on the quantised plain bytes).
    let cfg = config(
        json!({"threshold": 3, "quantizationBits": 16, "clippingRange": 1.0, "maxWeight": 100}),
    );
    let params = 250_000; // 1 MB of 32-bit elements
    for (seed, value) in [(11u8, 0.0f32), (12, 1.0), (13, -0.37)] {
        let (mut server, setups) =
            SecAggServer::with_graph_seed(&cfg, 9, 4, params, [seed; 32]).unwrap();
        let mut clients: Vec<SecAggClient> = Vec::new();
        for (i, s) in setups.iter().enumerate() {
            let (c, keys) =
                SecAggClient::with_seed(&cfg, s, u64::from(seed) * 10 + i as u64).unwrap();
            server.receive(i as u32, &keys).unwrap();
            clients.push(c);
        }
        for (i, m) in server.close_stage().unwrap() {
            let r = clients[i as usize].handle_keys(&m).unwrap();
            server.receive(i, &r).unwrap();
        }
        let deliveries = server.close_stage().unwrap();
        let (i, m) = &deliveries[0];
        let update = vec![value; params as usize];
        let masked = clients[*i as usize].handle_shares(m, &update, 50).unwrap();
        let ClientBody::Input(MaskedInput { data, .. }) = &masked.body else {
            panic!("not an input")
        };
        let wire = masked.encode();
        assert!(wire.ends_with(data), "the bytes on the wire end with the masked vector");

        let chi = chi_square(data);
        let z = runs_z(data);
        assert!(chi < 400.0, "value {value}: chi-square {chi} over 255 df");
        assert!(z.abs() < 6.0, "value {value}: runs z-score {z}");

        // The same statistics on the unmasked quantised input (level × weight) are huge.
        let level = ((f64::from(value) + 1.0) / 2.0 * 65535.0).round() as u32 * 50;
        let plain: Vec<u8> = (0..params).flat_map(|_| level.to_le_bytes()).collect();
        assert!(chi_square(&plain) > 100_000.0);
    }
}

/// A full round up to the masked-input stage with n clients; returns the pieces.
struct Staged {
    cfg: SecAggConfig,
    server: SecAggServer,
    clients: Vec<SecAggClient>,
    deliveries: Vec<(u32, ServerMessage)>,
}

fn staged(n: u32, params: u64) -> Staged {
    let cfg = config(
        json!({"threshold": 3, "quantizationBits": 16, "clippingRange": 1.0, "maxWeight": 100}),
    );
    let (mut server, setups) = SecAggServer::with_graph_seed(&cfg, 5, n, params, [5; 32]).unwrap();
    let mut clients = Vec::new();
    for (i, s) in setups.iter().enumerate() {
        let (c, keys) = SecAggClient::with_seed(&cfg, s, 500 + i as u64).unwrap();
        server.receive(i as u32, &keys).unwrap();
        clients.push(c);
    }
    for (i, m) in server.close_stage().unwrap() {
        let r = clients[i as usize].handle_keys(&m).unwrap();
        server.receive(i, &r).unwrap();
    }
    let deliveries = server.close_stage().unwrap();
    Staged { cfg, server, clients, deliveries }
}

#[test]
fn a_tampered_share_box_is_rejected_naming_its_sender_and_changes_nothing() {
    let mut st = staged(4, 8);
    let (i, good) = st.deliveries[0].clone();
    let ServerBody::Shares(delivery) = &good.body else { panic!() };
    let mut bad = delivery.clone();
    let sender = bad.shares[1].0;
    bad.shares[1].1[20] ^= 1;
    let tampered = ServerMessage { round: good.round, body: ServerBody::Shares(bad) };
    let err = st.clients[i as usize].handle_shares(&tampered, &[0.5; 8], 10).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(&format!("client {sender}")) && text.contains("authentication"),
        "{text}"
    );
    // A box moved to another recipient is not accepted either.
    let (k, other) = st.deliveries[1].clone();
    let ServerBody::Shares(other) = other.body else { panic!() };
    let mut swapped = delivery.clone();
    let b = other
        .shares
        .iter()
        .find(|(from, _)| *from != i && delivery.shares.iter().any(|(f, _)| f == from))
        .expect("with 4 clients in a complete graph, some sender boxed shares for both");
    let pos = swapped.shares.iter().position(|(f, _)| *f == b.0).unwrap();
    swapped.shares[pos].1 = b.1.clone();
    let msg = ServerMessage { round: good.round, body: ServerBody::Shares(swapped) };
    let err = st.clients[i as usize].handle_shares(&msg, &[0.5; 8], 10).unwrap_err();
    assert!(err.to_string().contains("authentication"), "box for {k} accepted by {i}: {err}");
    // The client is still waiting for its shares: the genuine delivery goes through.
    let input = st.clients[i as usize].handle_shares(&good, &[0.5; 8], 10).unwrap();
    st.server.receive(i, &input).unwrap();
}

#[test]
fn the_server_rejects_invalid_client_messages_naming_the_client() {
    let mut st = staged(4, 8);
    let (i, m) = st.deliveries[0].clone();
    let input = st.clients[i as usize].handle_shares(&m, &[0.1; 8], 10).unwrap();
    // Wrong round.
    let mut wrong_round = input.clone();
    wrong_round.round += 1;
    assert!(matches!(st.server.receive(i, &wrong_round), Err(SecAggError::WrongRound { .. })));
    // Wrong length.
    let ClientBody::Input(mi) = &input.body else { panic!() };
    let short = ClientMessage {
        round: input.round,
        body: ClientBody::Input(MaskedInput {
            ring_bits: mi.ring_bits,
            data: mi.data[..mi.data.len() - 4].to_vec(),
        }),
    };
    let err = st.server.receive(i, &short).unwrap_err().to_string();
    assert!(err.starts_with(&format!("client {i}:")), "{err}");
    // A client outside the round.
    assert!(st.server.receive(99, &input).unwrap_err().to_string().contains("client 99"));
    // Accepted once, refused the second time (a replay would double-count the input).
    st.server.receive(i, &input).unwrap();
    let err = st.server.receive(i, &input).unwrap_err().to_string();
    assert!(err.contains(&format!("client {i}")) && err.contains("already sent"), "{err}");
    // A message of another stage.
    let keys_again = ClientMessage::decode(&{
        let mut b = input.encode();
        b.truncate(13);
        b[4] = 2; // advertise keys
        b.extend_from_slice(&[7u8; 64]);
        b
    })
    .unwrap();
    assert!(matches!(
        st.server.receive(i, &keys_again),
        Err(SecAggError::UnexpectedMessage { .. })
    ));
}

#[test]
fn clients_refuse_unsafe_unmask_requests_and_weakened_setups() {
    let mut st = staged(4, 8);
    for (i, m) in st.deliveries.clone() {
        let r = st.clients[i as usize].handle_shares(&m, &[0.0; 8], 1).unwrap();
        st.server.receive(i, &r).unwrap();
    }
    let requests = st.server.close_stage().unwrap();
    let (i, req) = requests[0].clone();
    let ServerBody::Unmask(r) = &req.body else { panic!() };
    let peer = *r.survivors.iter().find(|j| **j != i).unwrap();
    // Asking for both kinds of shares of one peer would reveal its update.
    let mut both = r.clone();
    both.dropped.push(peer);
    let msg = ServerMessage { round: req.round, body: ServerBody::Unmask(both) };
    let err = st.clients[i as usize].handle_unmask(&msg).unwrap_err().to_string();
    assert!(err.contains("both dropped and surviving"), "{err}");
    // Claiming everyone dropped leaves the client below threshold: it refuses.
    let all_dropped = fledge_algorithms::privacy::secagg::UnmaskRequest {
        dropped: r.survivors.iter().copied().filter(|j| *j != i).collect(),
        survivors: vec![i],
    };
    let msg = ServerMessage { round: req.round, body: ServerBody::Unmask(all_dropped) };
    assert!(matches!(
        st.clients[i as usize].handle_unmask(&msg),
        Err(SecAggError::BelowThreshold { .. })
    ));
    // The genuine request is still answered.
    st.clients[i as usize].handle_unmask(&req).unwrap();

    // A setup that lowers this client's threshold or changes its quantisation is refused.
    let (_, setups) = SecAggServer::with_graph_seed(&st.cfg, 1, 4, 8, [0; 32]).unwrap();
    for tweak in 0..3 {
        let mut s = setups[0].clone();
        let ServerBody::Setup(setup) = &mut s.body else { panic!() };
        match tweak {
            0 => setup.threshold = 2,
            1 => setup.quantization_bits = 8,
            _ => setup.index = 4,
        }
        let err = SecAggClient::with_seed(&st.cfg, &s, 1).unwrap_err();
        assert!(matches!(err, SecAggError::Invalid { .. }), "{err}");
    }
}

#[test]
fn a_lying_share_is_outvoted_when_spares_exist_and_detected_otherwise() {
    for (n, expect_ok) in [(6u32, true), (3, false)] {
        let cfg = config(
            json!({"threshold": if n == 6 { 4 } else { 3 }, "quantizationBits": 16, "clippingRange": 1.0}),
        );
        let (mut server, setups) = SecAggServer::with_graph_seed(&cfg, 2, n, 4, [2; 32]).unwrap();
        let mut clients = Vec::new();
        for (i, s) in setups.iter().enumerate() {
            let (c, k) = SecAggClient::with_seed(&cfg, s, i as u64).unwrap();
            server.receive(i as u32, &k).unwrap();
            clients.push(c);
        }
        for (i, m) in server.close_stage().unwrap() {
            let r = clients[i as usize].handle_keys(&m).unwrap();
            server.receive(i, &r).unwrap();
        }
        for (i, m) in server.close_stage().unwrap() {
            let r = clients[i as usize].handle_shares(&m, &[0.25, -0.25, 0.5, 0.0], 1).unwrap();
            server.receive(i, &r).unwrap();
        }
        for (i, m) in server.close_stage().unwrap() {
            let mut r = clients[i as usize].handle_unmask(&m).unwrap();
            if i == 0 {
                let ClientBody::Unmask(u) = &mut r.body else { panic!() };
                u.self_mask_shares[1].1[0] ^= 1; // lie about a neighbour's seed share
            }
            server.receive(i, &r).unwrap();
        }
        match server.finish() {
            Ok(res) => {
                assert!(expect_ok);
                for (a, b) in res.mean.iter().zip([0.25f32, -0.25, 0.5, 0.0]) {
                    assert!((a - b).abs() <= res.quantization_step as f32 * 1.0001);
                }
            }
            Err(e) => {
                assert!(!expect_ok, "{e}");
                assert!(e.to_string().contains("a client lied"), "{e}");
            }
        }
    }
}

#[test]
fn garbage_bytes_never_panic_the_decoders_or_the_state_machines() {
    let mut st = staged(4, 16);
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let mut samples: Vec<Vec<u8>> = st.deliveries.iter().map(|(_, m)| m.encode()).collect();
    let (i, m) = st.deliveries[0].clone();
    let input = st.clients[i as usize].handle_shares(&m, &[0.0; 16], 1).unwrap();
    samples.push(input.encode());
    for base in samples {
        for cut in 0..base.len() {
            assert!(ServerMessage::decode(&base[..cut]).is_err() || cut == base.len());
            assert!(ClientMessage::decode(&base[..cut]).is_err() || cut == base.len());
        }
        for _ in 0..300 {
            let mut b = base.clone();
            let k = rng.random_range(0..b.len());
            b[k] ^= 1 << rng.random_range(0..8);
            if let Ok(msg) = ServerMessage::decode(&b) {
                let c = st.clients.get_mut(1).unwrap();
                let _ = c.handle_keys(&msg);
                let _ = c.handle_unmask(&msg);
            }
            if let Ok(msg) = ClientMessage::decode(&b) {
                let _ = st.server.receive(rng.random_range(0..5), &msg);
            }
        }
        let noise: Vec<u8> = (0..rng.random_range(0..200)).map(|_| rng.random()).collect();
        assert!(ServerMessage::decode(&noise).is_err());
    }
    // A count that claims four billion entries is refused without allocating them.
    let mut huge = ServerMessage { round: 5, body: ServerBody::Keys(vec![]) }.encode();
    let n = huge.len();
    huge[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
    let err = ServerMessage::decode(&huge).unwrap_err().to_string();
    assert!(err.contains("keys broadcast") && err.contains("count"), "{err}");
}

#[test]
fn config_errors_name_the_field() {
    let cases = [
        (
            json!({"quantizationBits": 16, "clippingRange": 1.0}),
            "secureAggregation.threshold: is required",
        ),
        (
            json!({"threshold": 1, "quantizationBits": 16, "clippingRange": 1.0}),
            "secureAggregation.threshold",
        ),
        (
            json!({"threshold": 3, "neighbors": 8, "quantizationBits": 16, "clippingRange": 1.0}),
            "more than half",
        ),
        (
            json!({"threshold": 12, "neighbors": 8, "quantizationBits": 16, "clippingRange": 1.0}),
            "exceeds neighbors + 1",
        ),
        (
            json!({"threshold": 3, "quantizationBits": 33, "clippingRange": 1.0}),
            "secureAggregation.quantizationBits",
        ),
        (
            json!({"threshold": 3, "quantizationBits": 8, "clippingRange": -1}),
            "secureAggregation.clippingRange",
        ),
        (
            json!({"threshold": 3, "quantizationBits": 8, "clippingRange": 1, "maxWeight": 0}),
            "secureAggregation.maxWeight",
        ),
        (
            json!({"threshold": 3, "quantizationBits": 8, "clippingRange": 1, "rounding": "up"}),
            "secureAggregation.rounding",
        ),
        (
            json!({"threshold": 3, "quantizationBits": 8, "clippingRange": 1, "treshold": 2}),
            "secureAggregation.treshold: unknown field",
        ),
        (json!([1, 2]), "secureAggregation: must be an object"),
    ];
    for (value, expected) in cases {
        let err = SecAggConfig::from_json(&value).unwrap_err().to_string();
        assert!(err.contains(expected), "{value}: {err}");
    }
    let ok = SecAggConfig::from_json(&json!({
        "// note": "comments are ignored", "threshold": 3, "quantizationBits": 8, "clippingRange": 1
    }))
    .unwrap();
    // Per round: more clients than the threshold, and a threshold safe for the graph.
    let err = ok.round_setup(2, 10, [0; 32]).unwrap_err().to_string();
    assert!(err.contains("secureAggregation.threshold"), "{err}");
    let err = ok.round_setup(10, 10, [0; 32]).unwrap_err().to_string();
    assert!(err.contains("more than 5"), "{err}");
    // A complete graph over thousands of clients is refused: set neighbors.
    let many = SecAggConfig::from_json(
        &json!({"threshold": 3001, "quantizationBits": 8, "clippingRange": 1}),
    )
    .unwrap();
    let err = many.round_setup(6000, 10, [0; 32]).unwrap_err().to_string();
    assert!(err.contains("secureAggregation.neighbors"), "{err}");
    let big = SecAggConfig::from_json(&json!({"threshold": 3, "quantizationBits": 32, "clippingRange": 1, "maxWeight": 4294967295u64})).unwrap();
    let err = big.round_setup(4, 10, [0; 32]).unwrap_err().to_string();
    assert!(err.contains("overflows 64 bits"), "{err}");
}
