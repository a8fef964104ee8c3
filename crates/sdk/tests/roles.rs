//! The built-in roles over the local backend with a tiny exact app: each trainer pulls the
//! model halfway towards its own target, so FedAvg after R rounds from w0 is exactly
//! `t + (w0 - t) / 2^R` with `t` the sample-weighted mean of the targets.

use std::collections::BTreeMap;
use std::sync::Arc;

use fledge_sdk::runner::{JobPlan, simulate};
use fledge_sdk::{AppFactory, Error, TaskConfig, Tensor, TrainOutcome, TrainerApp, Weights};

/// Dataset url `target0,target1:num_samples[:fail_at_round]`.
struct MeanApp {
    w: Vec<f32>,
    target: Vec<f32>,
    n: u64,
    fail_at: Option<u64>,
}

impl TrainerApp for MeanApp {
    fn initialize(&mut self, config: &TaskConfig) -> anyhow::Result<()> {
        let url = &config.dataset.as_ref().expect("trainers have a dataset").url;
        let parts: Vec<&str> = url.split(':').collect();
        self.target = parts[0].split(',').map(|v| v.parse().expect("number")).collect();
        self.n = parts[1].parse()?;
        self.fail_at = parts.get(2).map(|v| v.parse()).transpose()?;
        self.w = vec![0.0; self.target.len()];
        Ok(())
    }
    fn load_data(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    fn train(&mut self, round: u64) -> anyhow::Result<TrainOutcome> {
        if self.fail_at == Some(round) {
            anyhow::bail!("simulated crash in round {round}");
        }
        for (w, t) in self.w.iter_mut().zip(&self.target) {
            *w += 0.5 * (t - *w);
        }
        Ok(TrainOutcome {
            num_samples: self.n,
            metrics: BTreeMap::from([("loss".to_owned(), 1.0)]),
        })
    }
    fn evaluate(&mut self) -> anyhow::Result<BTreeMap<String, f64>> {
        let err: f32 = self.w.iter().zip(&self.target).map(|(w, t)| (w - t).abs()).sum();
        Ok(BTreeMap::from([("accuracy".to_owned(), f64::from(1.0 - err.min(1.0)))]))
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
        Ok(Box::new(MeanApp { w: vec![], target: vec![], n: 0, fail_at: None }))
    }
}

fn plan(job: &str, datasets: &[&str], rounds: u64, min_trainers: u64) -> JobPlan {
    let mut plan = JobPlan::local(job, datasets.iter().map(|s| s.to_string()).collect());
    plan.hyperparameters =
        serde_json::json!({"rounds": rounds, "minTrainers": min_trainers, "joinTimeout": 20})
            .as_object()
            .cloned()
            .expect("object");
    plan
}

fn final_w(report: &fledge_sdk::runner::SimReport) -> Vec<f32> {
    report.top.final_model.as_ref().expect("final model").get("w").expect("w").data().to_vec()
}

fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-4, "got {got:?}, want {want:?}");
    }
}

#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn two_tier_fedavg_is_exact_and_writes_the_registry() {
    let dir = tempfile::tempdir().expect("tmp");
    // Weighted mean of targets: (1*10 + 4*30) / 40 = 3.25; (2*10 + 0*30) / 40 = 0.5.
    let plan = plan("two-tier", &["1,2:10", "4,0:30"], 3, 2);
    let report =
        simulate(&plan, Arc::new(Factory), dir.path().to_path_buf()).await.expect("job runs");
    let shrink = 1.0 - 0.125; // w0 = 0 (a trainer's initial weights), three halvings.
    assert_close(&final_w(&report), &[3.25 * shrink, 0.5 * shrink]);
    assert_eq!(report.top.rounds, 3);
    assert_eq!(report.top.history.len(), 3);
    let r1 = &report.top.history[0].metrics;
    assert_eq!(r1["updates"], 2.0);
    assert_eq!(r1["numSamples"], 40.0);
    assert!(r1["bytesSent"] > 0.0 && r1["bytesReceived"] > 0.0);
    assert!(
        r1.contains_key("seconds.aggregate") && r1.contains_key("trainer.afterTraining.accuracy")
    );
    for (id, res) in &report.others {
        let run = res.as_ref().unwrap_or_else(|e| panic!("{id} failed: {e}"));
        assert_eq!(run.history.len(), 3, "{id} trained every round");
    }
    let job = dir.path().join("registry/jobs/two-tier");
    for f in
        ["rounds/round-00001.safetensors", "rounds/round-00003.safetensors", "final.safetensors"]
    {
        assert!(job.join(f).is_file(), "{f} written");
    }
    let metrics = std::fs::read_to_string(job.join("metrics.jsonl")).expect("metrics");
    assert_eq!(metrics.lines().count(), 3);
}

#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn three_tier_matches_the_flat_weighted_mean() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut plan = plan("three-tier", &["1:10", "3:10", "5:20", "7:40"], 2, 1);
    plan.middle = 2;
    let report =
        simulate(&plan, Arc::new(Factory), dir.path().to_path_buf()).await.expect("job runs");
    // (10 + 30 + 100 + 280) / 80 = 5.25 after two halvings from 0.
    assert_close(&final_w(&report), &[5.25 * 0.75]);
    assert_eq!(report.others.len(), 6);
    assert!(report.others.values().all(Result::is_ok), "{:?}", report.others);
    assert_eq!(report.top.history[0].metrics["updates"], 2.0, "two middle aggregators");
    assert_eq!(report.top.history[0].metrics["numSamples"], 80.0);
}

#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn a_dead_trainer_is_dropped_and_the_job_completes() {
    let dir = tempfile::tempdir().expect("tmp");
    let plan = plan("dropout", &["1:10", "1:10", "1:10:2"], 3, 2);
    let report =
        simulate(&plan, Arc::new(Factory), dir.path().to_path_buf()).await.expect("job completes");
    let h = &report.top.history;
    assert_eq!(h.len(), 3);
    assert_eq!(h[0].metrics["updates"], 3.0);
    assert_eq!((h[1].metrics["updates"], h[1].metrics["trainersDropped"]), (2.0, 1.0));
    assert_eq!(h[2].metrics["trainersSelected"], 2.0);
    let failed = report.others["dropout-trainer-2"].as_ref().expect_err("crashed trainer");
    assert!(failed.contains("simulated crash"), "{failed}");
    assert_close(&final_w(&report), &[0.875]);
}

#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn too_few_trainers_fail_the_round_with_a_quorum_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let plan = plan("quorum", &["1:10", "1:10:2"], 3, 2);
    let err = simulate(&plan, Arc::new(Factory), dir.path().to_path_buf())
        .await
        .expect_err("quorum lost");
    assert!(matches!(err, Error::Quorum { round: 2, got: 1, need: 2 }), "{err}");
}

#[test]
fn roles_are_customisable_by_alias() {
    let mut program = fledge_sdk::roles::trainer::program();
    program
        .insert_after(
            "train",
            "clip",
            fledge_sdk::composer::tasklet(|_: &mut fledge_sdk::roles::trainer::TrainerCtx| Ok(())),
        )
        .expect("train exists");
    program.remove("evaluate").expect("evaluate exists");
    assert_eq!(
        program.aliases(),
        [
            "initialize",
            "load_data",
            "join",
            "rounds",
            "fetch",
            "evaluate_received",
            "train",
            "clip",
            "upload",
            "report"
        ]
    );
    // Wrapping keeps the alias and place; the decorator decides when the original runs.
    program.wrap("upload", |upload| upload).expect("upload exists");
    assert!(program.wrap("rounds", |step| step).is_err(), "a loop cannot be wrapped");
    assert_eq!(program.aliases().len(), 10);
    let top = fledge_sdk::roles::aggregator::top_program();
    assert!(top.aliases().contains(&"checkpoint".to_owned()));
}

#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn upload_grants_bound_concurrency_and_survive_a_dead_trainer() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut plan = plan("grants", &["1:10", "1:10", "1:10:2", "1:10"], 3, 2);
    plan.hyperparameters.insert("maxConcurrentUploads".to_owned(), 1.into());
    let report =
        simulate(&plan, Arc::new(Factory), dir.path().to_path_buf()).await.expect("job completes");
    let h = &report.top.history;
    assert_eq!(h[0].metrics["updates"], 4.0);
    assert_eq!(h[1].metrics["updates"], 3.0);
    assert_close(&final_w(&report), &[0.875]);
}

/// Central DP (issue 18): the top aggregator clips each update's delta, noises the mean,
/// reports ε after every round, and ε grows; an ε budget the next round would exceed stops
/// the job with the reason.
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn central_dp_reports_epsilon_every_round_and_enforces_the_budget() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut p = plan("dp-central", &["1,2:10", "3,4:10", "5,6:10"], 3, 3);
    let dp = serde_json::json!({"mode": "central", "noiseMultiplier": 1.0, "clippingNorm": 0.5,
        "samplingRate": 1.0, "delta": 1e-5});
    p.differential_privacy = Some(dp.clone());
    let report =
        simulate(&p, Arc::new(Factory), dir.path().join("a")).await.expect("job completes");
    let eps: Vec<f64> = report.top.history.iter().map(|r| r.metrics["dp.epsilon"]).collect();
    assert_eq!(eps.len(), 3);
    assert!(eps[0] > 0.0 && eps[0] < eps[1] && eps[1] < eps[2], "{eps:?}");
    for r in &report.top.history {
        assert_eq!(r.metrics["dp.delta"], 1e-5);
        assert_eq!(r.metrics["dp.noiseStddev"], 0.5, "z × C");
        assert!((0.0..=1.0).contains(&r.metrics["dp.clippedFraction"]));
    }
    // Round 1's deltas (half the way from 0 to targets of norm > 2) are all clipped.
    assert_eq!(report.top.history[0].metrics["dp.clippedFraction"], 1.0);
    // A budget that two rounds exhaust: the third is refused with the reason.
    let mut tight = dp.clone();
    tight["epsilon"] = (eps[1] + (eps[2] - eps[1]) / 2.0).into();
    p.differential_privacy = Some(tight);
    p.job_id = "dp-tight".into();
    let err = simulate(&p, Arc::new(Factory), dir.path().join("b")).await.expect_err("budget");
    assert!(err.to_string().contains("privacy budget: round 3"), "{err}");
}

/// Local DP: each trainer clips and noises its own delta and reports its ε; the aggregator
/// adds nothing.
#[test_log::test(tokio::test(flavor = "multi_thread", worker_threads = 2))]
async fn local_dp_is_applied_and_accounted_by_each_trainer() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut p = plan("dp-local", &["1,2:10", "3,4:10"], 2, 2);
    p.differential_privacy = Some(serde_json::json!({"mode": "local", "noiseMultiplier": 2.0,
        "clippingNorm": 0.25, "delta": 1e-5}));
    let report = simulate(&p, Arc::new(Factory), dir.path().to_path_buf()).await.expect("job");
    assert!(report.top.history.iter().all(|r| !r.metrics.contains_key("dp.epsilon")));
    for (id, run) in &report.others {
        let run = run.as_ref().expect("trainer ran");
        let eps: Vec<f64> = run.history.iter().map(|r| r.metrics["dp.epsilon"]).collect();
        assert!(eps.len() == 2 && eps[0] > 0.0 && eps[0] < eps[1], "{id}: {eps:?}");
    }
    // Clipped to 0.25 per trainer: the model moved by at most that much from zero.
    let moved: f32 = final_w(&report).iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!(moved < 0.25 * 2.0 + 3.0, "{moved}");
}
