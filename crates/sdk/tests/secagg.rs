//! Secure aggregation (SecAgg+) carried by the roles, over the local backend (issue 18).
//!
//! The app is exact: each trainer pulls the model halfway towards its own target, so one
//! FedAvg round from `g` gives `g + ½ (t̄ − g)` with `t̄` the sample-weighted mean of the
//! targets of the trainers in the round. Under SecAgg+ the aggregator gets the same within
//! one quantisation step `2c / (2^bits − 1)` per coordinate and round.
//!
//! Dropouts use a test role ([`Dropper`]): the standard trainer whose program fails at a
//! given SecAgg+ stage of its first round (so the task ends and leaves its channels, as a
//! crashed trainer does). It is defined here; nothing in the platform knows it.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fledge_algorithms::privacy::secagg::{ClientBody, ClientMessage};
use fledge_channel::{BackendEnv, Kind, LocalHub};
use fledge_sdk::app::UserApp;
use fledge_sdk::composer::{Composer, tasklet};
use fledge_sdk::protocol::Model;
use fledge_sdk::role::{Role, RunOptions, TaskIo};
use fledge_sdk::roles::RoleKind;
use fledge_sdk::roles::secagg::{self, StageTimeouts};
use fledge_sdk::roles::trainer::{Trainer, TrainerCtx, secure_program};
use fledge_sdk::runner::{JobPlan, SimReport, simulate};
use fledge_sdk::{
    AppFactory, AppNeed, Error, TaskConfig, Tensor, TrainOutcome, TrainerApp, Weights,
};

/// Dataset url `target0,target1,...:num_samples`.
struct MeanApp {
    w: Vec<f32>,
    target: Vec<f32>,
    n: u64,
}

impl TrainerApp for MeanApp {
    fn initialize(&mut self, config: &TaskConfig) -> anyhow::Result<()> {
        let url = &config.dataset.as_ref().expect("trainers have a dataset").url;
        let (targets, n) = url.split_once(':').expect("targets:samples");
        self.target = targets.split(',').map(|v| v.parse().expect("number")).collect();
        self.n = n.parse()?;
        self.w = vec![0.0; self.target.len()];
        Ok(())
    }
    fn load_data(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    fn train(&mut self, _round: u64) -> anyhow::Result<TrainOutcome> {
        for (w, t) in self.w.iter_mut().zip(&self.target) {
            *w += 0.5 * (t - *w);
        }
        Ok(TrainOutcome { num_samples: self.n, metrics: BTreeMap::new() })
    }
    fn evaluate(&mut self) -> anyhow::Result<BTreeMap<String, f64>> {
        Ok(BTreeMap::new())
    }
    fn get_weights(&self) -> anyhow::Result<Weights> {
        Ok(Weights::from_tensors(vec![Tensor::new("w", vec![self.w.len()], self.w.clone())?])?)
    }
    fn set_weights(&mut self, weights: &Weights) -> anyhow::Result<()> {
        self.w = weights.get("w").expect("w").data().to_vec();
        Ok(())
    }
}

struct Factory;

impl AppFactory for Factory {
    fn trainer(&self, _config: &TaskConfig) -> anyhow::Result<Box<dyn TrainerApp>> {
        Ok(Box::new(MeanApp { w: vec![], target: vec![], n: 0 }))
    }
}

/// Trainer `i` of 10: a 2-value target in [−3, 3] and 10 + 7i samples.
fn dataset(i: usize) -> (Vec<f32>, u64) {
    let a = ((i * 37) % 13) as f32 / 2.0 - 3.0;
    let b = 3.0 - ((i * 53) % 11) as f32 / 2.0;
    (vec![a, b], 10 + 7 * i as u64)
}

fn url(i: usize) -> String {
    let (t, n) = dataset(i);
    let t: Vec<String> = t.iter().map(f32::to_string).collect();
    format!("{}:{n}", t.join(","))
}

const BITS: u32 = 12;
const RANGE: f64 = 2.0;

fn step() -> f64 {
    2.0 * RANGE / f64::from((1u32 << BITS) - 1)
}

fn plan(job: &str, trainers: usize, rounds: u64, secure: bool) -> JobPlan {
    let mut plan = JobPlan::local(job, (0..trainers).map(url).collect());
    plan.hyperparameters = serde_json::json!({"rounds": rounds, "minTrainers": 1,
        "expectedTrainers": trainers, "joinTimeout": 20, "secAggStageTimeout": 30})
    .as_object()
    .cloned()
    .expect("object");
    if secure {
        // Weights are the sample counts (all below maxWeight): sample-weighted like FedAvg.
        plan.secure_aggregation = Some(serde_json::json!({"threshold": 6,
            "quantizationBits": BITS, "clippingRange": RANGE, "maxWeight": 1000}));
    }
    plan
}

/// FedAvg of this app over `rounds` (the trainers of each round), from 0.
fn fedavg(rounds: &[Vec<usize>]) -> Vec<f64> {
    let mut g = vec![0.0f64; 2];
    for members in rounds {
        let total: u64 = members.iter().map(|i| dataset(*i).1).sum();
        for (k, gk) in g.iter_mut().enumerate() {
            let mean: f64 = members
                .iter()
                .map(|i| {
                    let (t, n) = dataset(*i);
                    f64::from(t[k]) * n as f64
                })
                .sum::<f64>()
                / total as f64;
            *gk += 0.5 * (mean - *gk);
        }
    }
    g
}

fn final_w(report: &SimReport) -> Vec<f32> {
    report.top.final_model.as_ref().expect("final model").get("w").expect("w").data().to_vec()
}

/// Each round adds at most one step of error, which later rounds halve: < 2 steps in all.
fn assert_within(got: &[f32], want: &[f64], bound: f64) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        let err = (f64::from(*g) - w).abs();
        assert!(err <= bound, "got {got:?}, want {want:?}: error {err} > bound {bound}");
    }
}

#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn secure_aggregation_equals_fedavg_within_the_quantisation_step() {
    let dir = tempfile::tempdir().expect("tmp");
    let rounds = 3;
    let plain =
        simulate(&plan("plain", 10, rounds, false), Arc::new(Factory), dir.path().join("a"))
            .await
            .expect("plain job runs");
    let secure =
        simulate(&plan("secure", 10, rounds, true), Arc::new(Factory), dir.path().join("b"))
            .await
            .expect("secure job runs");
    let all: Vec<usize> = (0..10).collect();
    let exact = fedavg(&vec![all; rounds as usize]);
    // Plain FedAvg is exact (f32); SecAgg+ within two steps (see `assert_within`).
    assert_within(&final_w(&plain), &exact, 1e-5);
    assert_within(&final_w(&secure), &exact, 2.0 * step() + 1e-5);
    let (p, s) = (final_w(&plain), final_w(&secure));
    for (a, b) in p.iter().zip(&s) {
        assert!(f64::from((a - b).abs()) <= 2.0 * step() + 2e-5, "plain {p:?} secure {s:?}");
    }
    let samples: u64 = (0..10).map(|i| dataset(i).1).sum();
    for r in &secure.top.history {
        let m = &r.metrics;
        assert_eq!(m["secagg.survivors"], 10.0);
        assert_eq!(m["updates"], 10.0);
        assert_eq!(m["numSamples"], samples as f64);
        for stage in secagg::STAGES {
            assert_eq!(m[&format!("secagg.dropped.{stage}")], 0.0, "{stage}");
        }
        assert!((m["secagg.quantizationStep"] - step()).abs() < 1e-12);
        // Nothing per trainer reaches the aggregator in clear.
        assert!(!m.keys().any(|k| k.starts_with("trainer.")), "{m:?}");
    }
    assert!(plain.top.history.iter().all(|r| !r.metrics.contains_key("secagg.survivors")));
}

/// The standard trainer, failing at `stage` of its first round (before that stage's work):
/// a task that ends there and leaves its channels.
struct Dropper;

/// The hyperparameter the test sets on the dropping trainers' own configs only.
const DROP_AT: &str = "testDropBefore";

impl Role for Dropper {
    type Ctx = TrainerCtx;
    const KIND: RoleKind = RoleKind::Trainer;
    const APP: AppNeed = AppNeed::Trainer;
    const LINGER: bool = false;

    fn prepare(config: &TaskConfig, opts: &mut RunOptions) -> fledge_sdk::Result<()> {
        Trainer::prepare(config, opts)
    }

    fn build(io: TaskIo, app: UserApp) -> fledge_sdk::Result<TrainerCtx> {
        Trainer::build(io, app)
    }

    fn program(ctx: &TrainerCtx) -> fledge_sdk::Result<Composer<TrainerCtx>> {
        let stage = ctx.io.config.hyperparameters[DROP_AT].as_str().expect("stage").to_owned();
        let mut program = secure_program();
        let reason = format!("simulated dropout before {stage}");
        program.replace(
            &stage,
            tasklet(move |_: &mut TrainerCtx| Err(Error::Config(reason.clone()))),
        )?;
        Ok(program)
    }
}

/// Runs `plan` in this process with trainers `drop` (indices among the trainers) failing
/// before `stage`, after `adjust` saw each config; returns the top aggregator's result and
/// the others' by task id.
async fn run_plan(
    plan: &JobPlan,
    drop: &[usize],
    stage: &str,
    workdir: std::path::PathBuf,
    adjust: impl Fn(&mut TaskConfig),
) -> (
    fledge_sdk::Result<fledge_sdk::RunSummary>,
    BTreeMap<String, fledge_sdk::Result<fledge_sdk::RunSummary>>,
) {
    let opts = RunOptions {
        workdir,
        backend_env: BackendEnv { local_hub: LocalHub::new(), ..BackendEnv::default() },
        ..RunOptions::default()
    };
    let mut configs = plan.configs().expect("configs");
    configs.iter_mut().for_each(&adjust);
    let top = configs.remove(0);
    let mut set = tokio::task::JoinSet::new();
    let mut trainer = 0;
    for mut config in configs {
        let opts = opts.clone();
        let id = config.task_id.as_str().to_owned();
        let is_trainer = RoleKind::infer(&config).expect("role") == RoleKind::Trainer;
        if is_trainer && drop.contains(&trainer) {
            config.hyperparameters.insert(DROP_AT.to_owned(), stage.into());
            set.spawn(async move {
                (id, fledge_sdk::role::run::<Dropper>(config, Arc::new(Factory), opts).await)
            });
        } else {
            set.spawn(async move {
                (id, fledge_sdk::runner::run_task_with(config, Arc::new(Factory), opts).await)
            });
        }
        trainer += usize::from(is_trainer);
    }
    let res = fledge_sdk::runner::run_task_with(top, Arc::new(Factory), opts).await;
    let mut others = BTreeMap::new();
    while let Some(joined) = set.join_next().await {
        let (id, res) = joined.expect("task did not panic");
        others.insert(id, res);
    }
    (res, others)
}

async fn run_with_dropouts(
    plan: &JobPlan,
    drop: &[usize],
    stage: &str,
    workdir: std::path::PathBuf,
) -> fledge_sdk::Result<fledge_sdk::RunSummary> {
    run_plan(plan, drop, stage, workdir, |_| {}).await.0
}

/// 30% of the trainers drop at each stage in turn: after advertising keys, after sending
/// shares, after sending the masked input. The round completes with the mean of the
/// trainers whose input is in the sum (all ten when the dropouts sent their input), the
/// next round with the seven left.
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn thirty_percent_dropping_at_each_stage_still_gives_the_survivors_mean() {
    let dir = tempfile::tempdir().expect("tmp");
    let dropped = [2, 5, 8];
    let survivors: Vec<usize> = (0..10).filter(|i| !dropped.contains(i)).collect();
    let all: Vec<usize> = (0..10).collect();
    // (stage the dropouts fail before, the stage index of `secagg.dropped.*`, round 1's set)
    let cases = [
        ("secagg_shares", 1, survivors.clone()),
        ("secagg_input", 2, survivors.clone()),
        ("secagg_unmask", 3, all.clone()),
    ];
    for (stage, index, first) in cases {
        let job = format!("drop-{}", stage.replace('_', "-"));
        let plan = plan(&job, 10, 2, true);
        let run = run_with_dropouts(&plan, &dropped, stage, dir.path().join(&job))
            .await
            .unwrap_or_else(|e| panic!("{stage}: the job completes: {e}"));
        let h = &run.history;
        assert_eq!(h.len(), 2, "{stage}");
        let m = &h[0].metrics;
        assert_eq!(m["secagg.survivors"], first.len() as f64, "{stage}: {m:?}");
        for (k, name) in secagg::STAGES.iter().enumerate() {
            let want = if k == index { 3.0 } else { 0.0 };
            assert_eq!(m[&format!("secagg.dropped.{name}")], want, "{stage}: {name}");
        }
        assert_eq!(h[1].metrics["secagg.survivors"], 7.0, "{stage}");
        let exact = fedavg(&[first, survivors.clone()]);
        let w = run.final_model.as_ref().expect("final").get("w").expect("w").data().to_vec();
        assert_within(&w, &exact, 2.0 * step() + 1e-5);
    }
}

/// Below the threshold the round fails, saying why, and no share was asked for.
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn below_the_threshold_the_round_fails_with_the_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    let plan = plan("below", 10, 2, true);
    // Five of ten leave after advertising keys: five shares sets, threshold six.
    let err = run_with_dropouts(&plan, &[0, 1, 2, 3, 4], "secagg_shares", dir.path().into())
        .await
        .expect_err("below threshold");
    let msg = err.to_string();
    assert!(matches!(err, Error::Privacy(_)), "{msg}");
    assert!(msg.contains("below threshold at stage 'share keys': 5 left, 6 needed"), "{msg}");
    assert!(msg.contains("no individual update was revealed"), "{msg}");
}

/// Three tiers: each middle aggregator masks within its group and forwards the group's
/// mean; the top aggregates the group means in clear.
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn hierarchical_jobs_mask_within_each_group() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut plan = plan("hier", 10, 2, true);
    plan.middle = 2;
    // Five trainers per group: a complete graph of degree 4, threshold 3 to 5.
    plan.secure_aggregation = Some(serde_json::json!({"threshold": 4,
        "quantizationBits": BITS, "clippingRange": RANGE, "maxWeight": 1000}));
    // Each aggregator starts once all its children joined: two middles, five trainers each.
    let (top, others) = run_plan(&plan, &[], "", dir.path().into(), |c| {
        let children = match RoleKind::infer(c).expect("role") {
            RoleKind::TopAggregator => 2,
            _ => 5,
        };
        c.hyperparameters.insert("expectedTrainers".into(), children.into());
    })
    .await;
    let top = top.expect("job runs");
    let all: Vec<usize> = (0..10).collect();
    let w = top.final_model.as_ref().expect("final").get("w").expect("w").data().to_vec();
    assert_within(&w, &fedavg(&[all.clone(), all]), 2.0 * step() + 1e-5);
    let samples: u64 = (0..10).map(|i| dataset(i).1).sum();
    let top = &top.history[0].metrics;
    assert_eq!(top["updates"], 2.0, "two group means");
    assert_eq!(top["numSamples"], samples as f64);
    assert!(!top.contains_key("secagg.survivors"), "the top aggregates in clear: {top:?}");
    let middles: Vec<_> = others
        .iter()
        .filter(|(_, run)| run.as_ref().is_ok_and(|r| r.kind == RoleKind::MiddleAggregator))
        .collect();
    assert_eq!(middles.len(), 2, "{others:?}");
    for (id, run) in middles {
        let run = run.as_ref().expect("checked");
        for r in &run.history {
            assert_eq!(r.metrics["secagg.survivors"], 5.0, "{id}");
        }
    }
}

/// Combinations that cannot work are refused before anything runs, naming the field.
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn unsound_combinations_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    for (optimizer, field) in [("median", "optimizer.sort"), ("krum", "optimizer.sort")] {
        let mut p = plan(&format!("refuse-{optimizer}"), 3, 1, true);
        p.optimizer = fledge_types::Sort { sort: optimizer.into(), kwargs: Default::default() };
        let err =
            simulate(&p, Arc::new(Factory), dir.path().join(optimizer)).await.expect_err("refused");
        assert!(err.to_string().contains(&format!("modelSpec.{field}")), "{err}");
    }
    let mut p = plan("refuse-dp", 3, 1, true);
    p.differential_privacy = Some(serde_json::json!({"mode": "central", "noiseMultiplier": 1.0,
        "clippingNorm": 0.5, "samplingRate": 1.0, "delta": 1e-5}));
    let err = simulate(&p, Arc::new(Factory), dir.path().join("dp")).await.expect_err("refused");
    assert!(err.to_string().contains("modelSpec.differentialPrivacy.mode"), "{err}");
    let mut p = plan("refuse-field", 3, 1, true);
    p.secure_aggregation = Some(serde_json::json!({"threshold": 1, "quantizationBits": 8,
        "clippingRange": 1.0}));
    let err = simulate(&p, Arc::new(Factory), dir.path().join("f")).await.expect_err("refused");
    assert!(err.to_string().contains("modelSpec.secureAggregation.threshold"), "{err}");
}

/// What the aggregator received: (trainer, SecAgg+ message bytes), in arrival order.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// χ² statistic of the byte frequencies of `bytes` against the uniform distribution.
fn chi_square(bytes: &[u8]) -> f64 {
    let mut counts = [0u64; 256];
    for b in bytes {
        counts[*b as usize] += 1;
    }
    let expected = bytes.len() as f64 / 256.0;
    counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum()
}

/// χ² with 255 degrees of freedom exceeds this with probability 10⁻⁹ (uniform bytes).
const CHI2_255_P1E9: f64 = 403.0;

/// What the aggregator receives from one trainer (the masked input, as the bytes of the
/// message that arrived over the channel) is indistinguishable from uniform bytes by a χ²
/// test on byte frequencies, while the same trainer's update in clear is far from it.
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn what_the_aggregator_receives_from_a_trainer_looks_uniform() {
    let dir = tempfile::tempdir().expect("tmp");
    let len = 8192;
    // Trainers with smooth, very non-uniform targets.
    let urls: Vec<String> = (0..6)
        .map(|i| {
            let t: Vec<String> =
                (0..len).map(|k| format!("{:.3}", ((k + i) % 17) as f32 / 20.0)).collect();
            format!("{}:{}", t.join(","), 10 + i)
        })
        .collect();
    let mut plan = JobPlan::local("uniform", urls);
    plan.hyperparameters =
        serde_json::json!({"rounds": 1, "joinTimeout": 20}).as_object().cloned().expect("object");
    plan.secure_aggregation = Some(serde_json::json!({"threshold": 4, "quantizationBits": 16,
        "clippingRange": 1.0}));
    let opts = RunOptions {
        workdir: dir.path().into(),
        backend_env: BackendEnv { local_hub: LocalHub::new(), ..BackendEnv::default() },
        ..RunOptions::default()
    };
    let mut configs = plan.configs().expect("configs");
    let top = configs.remove(0);
    let mut trainers = tokio::task::JoinSet::new();
    for config in configs {
        trainers.spawn(fledge_sdk::runner::run_task_with(config, Arc::new(Factory), opts.clone()));
    }
    // The test is the aggregator: the top's own channels, the roles' own messages.
    let cfg = secagg::config_of(&top).expect("config").expect("secure aggregation");
    let io = TaskIo::open(top.clone(), &opts).await.expect("channels");
    let distribute = io.channels.by_tag("distribute").expect("distribute").clone();
    let aggregate = io.channels.by_tag("aggregate").expect("aggregate").clone();
    let ends = distribute.await_ends(6, std::time::Duration::from_secs(20)).await.expect("ends");
    let global = Weights::from_tensors(vec![Tensor::new("w", vec![len], vec![0.0; len]).unwrap()])
        .expect("weights");
    let model = Model { round: 1, model_version: 0, upload_grants: 0 }
        .encode(fledge_sdk::convert::weights_message(Kind::Weights, 0, 0, &global).expect("msg"));
    for end in &ends {
        distribute.send(end, model.clone()).await.expect("model sent");
    }
    let seen: Received = Arc::default();
    let log = seen.clone();
    let round = secagg::server_round(
        &distribute,
        &aggregate,
        &ends,
        &cfg,
        1,
        len,
        StageTimeouts::from_config(&top).expect("timeouts"),
        &mut move |end, message| {
            let bytes = secagg::payload(end, message).expect("a secagg message").to_vec();
            log.lock().unwrap().push((end.as_str().to_owned(), bytes));
        },
    )
    .await
    .expect("round");
    assert_eq!(round.contributors.len(), 6);
    distribute.broadcast(fledge_channel::Message::new(Kind::EndOfTraining, 1)).await.expect("end");
    while let Some(joined) = trainers.join_next().await {
        joined.expect("no panic").expect("trainer completes");
    }
    // One trainer's masked input, as received.
    let seen = seen.lock().unwrap();
    let first = &ends[0];
    let (_, received) = seen
        .iter()
        .find(|(end, bytes)| {
            end == first.as_str()
                && matches!(ClientMessage::decode(bytes).map(|m| m.body), Ok(ClientBody::Input(_)))
        })
        .expect("the trainer's masked input was received");
    let masked = chi_square(received);
    assert!(received.len() > 4 * len, "{}", received.len());
    assert!(masked < CHI2_255_P1E9, "masked input χ² = {masked}");
    // The test has power: the trainer's delta in clear (what it would send without SecAgg+)
    // fails it by far, and so does its quantised form.
    let plain: Vec<u8> =
        (0..len).flat_map(|k| (0.5 * ((k % 17) as f32 / 20.0)).to_le_bytes()).collect();
    assert!(chi_square(&plain) > 10.0 * CHI2_255_P1E9, "{}", chi_square(&plain));
    let mean: Vec<f32> = round.result.mean;
    assert!(
        (mean[0] - 0.5 * (0..6).map(|i| (i % 17) as f32 / 20.0).sum::<f32>() / 6.0).abs() < 1e-3
    );
}
