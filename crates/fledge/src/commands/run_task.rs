//! `fledge run-task`: run one task from its config, or simulate a whole MNIST job.
//!
//! ```text
//! fledge run-task CONFIG.json [--role-kind top-aggregator|middle-aggregator|mnist-mlp-trainer]
//! fledge run-task --simulate [--processes] [--trainers 10] [--middle 0] [--rounds 20] ...
//! ```
//!
//! **One task.** The built-in role comes from `--role-kind`, else from the config's role name,
//! else from the role's function tags, all through the SDK's role table
//! (`fledge_sdk::table`; `fledge roles` prints it). The user code is the reference MNIST
//! code of `fledge-models` (trainer, evaluator, vertical parties). The agent runs
//! `fledge run-task <config>` for a code folder whose `fledge-role.toml` says
//! `builtin = "<name>"` and passes the name as `--role-kind`. The task key for metrics comes
//! from `FLEDGE_TASK_KEY`.
//!
//! **Simulation.** `--simulate` generates the task configs of an MNIST job (one aggregator and
//! `--trainers` trainers, or a three-tier job with `--middle` middle aggregators) and runs it:
//! in this process over the local backend, or with `--processes` as one `fledge run-task`
//! child process per task talking MQTT through an embedded broker this command starts.
//! Configs, logs and the registry go to `--workdir` (default `./fledge-sim`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use fledge_models::MnistFactory;
use fledge_models::url::{DatasetUrl, Partition};
use fledge_sdk::roles::RoleKind;
use fledge_sdk::runner::{JobPlan, RunOptions, RunSummary, simulate};
use fledge_sdk::table::{self, RoleEntry};
use fledge_types::{Backend, MetricRecord, Sort, TaskConfig};
use serde_json::{Value, json};

use super::UsageError;

/// Arguments of `fledge run-task`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The task config (JSON) to run. Not used with --simulate.
    #[arg(required_unless_present = "simulate")]
    config: Option<PathBuf>,
    /// Built-in role to run (a name or alias of `fledge roles`).
    #[arg(long)]
    role_kind: Option<String>,

    /// Simulate a whole MNIST job instead of running one task.
    #[arg(long, conflicts_with = "config")]
    simulate: bool,
    /// With --simulate: one OS process per task over MQTT (embedded broker), not in-process.
    #[arg(long, requires = "simulate")]
    processes: bool,
    /// Trainers.
    #[arg(long, default_value_t = 10)]
    trainers: usize,
    /// Middle aggregators (0: two-tier).
    #[arg(long, default_value_t = 0)]
    middle: usize,
    /// Rounds.
    #[arg(long, default_value_t = 20)]
    rounds: u64,
    /// Local epochs per round.
    #[arg(long, default_value_t = 5)]
    epochs: u64,
    /// Minibatch size.
    #[arg(long, default_value_t = 32)]
    batch_size: u64,
    /// SGD learning rate.
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    /// Server optimizer: fedavg, fedadam, fedyogi, fedadagrad, fedprox, median, ...
    #[arg(long, default_value = "fedavg")]
    optimizer: String,
    /// Optimizer kwargs as JSON, e.g. '{"lr": 0.01}'.
    #[arg(long)]
    optimizer_kwargs: Option<String>,
    /// Data split: iid or dirichlet.
    #[arg(long, default_value = "iid")]
    partition: String,
    /// Dirichlet concentration.
    #[arg(long, default_value_t = 0.3)]
    alpha: f64,
    /// Seed of the split, the initial model and the shuffles.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Least trainers per round.
    #[arg(long, default_value_t = 1)]
    min_trainers: u64,
    /// Directory with the MNIST IDX files (default: examples/data of this checkout).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where configs, logs and the registry go.
    #[arg(long, default_value = "fledge-sim")]
    workdir: PathBuf,
    /// With --processes: SIGKILL the last trainer once this round has been aggregated.
    #[arg(long, requires = "processes")]
    kill_trainer_after_round: Option<u64>,
    /// With --processes: seconds without a heartbeat before a peer counts as dead.
    #[arg(long, default_value_t = 10)]
    liveness_timeout: u64,
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.simulate {
        return simulate_job(&args).await;
    }
    let path = args.config.as_deref().expect("clap requires CONFIG without --simulate");
    let config = read_config(path)?;
    let entry = role_entry(args.role_kind.as_deref(), &config)?;
    tracing::info!(task_id = %config.task_id, role = entry.name(), "running task");
    let opts =
        RunOptions::from_env().map_err(|e| anyhow::anyhow!(fledge_sdk::runner::error_chain(&e)))?;
    let summary = (entry.run)(config, MnistFactory::shared(), opts)
        .await
        .map_err(|e| anyhow::anyhow!(fledge_sdk::runner::error_chain(&e)))?;
    tracing::info!(rounds = summary.rounds, "task completed");
    Ok(())
}

fn read_config(path: &Path) -> anyhow::Result<TaskConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read task config {}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| UsageError(format!("task config {} is invalid: {e}", path.display())).into())
}

/// The role for `config` from the role table: the flag, else the role name, else the
/// function tags.
pub fn role_entry(flag: Option<&str>, config: &TaskConfig) -> anyhow::Result<&'static RoleEntry> {
    table::resolve(flag, config).map_err(|e| UsageError(format!("--role-kind: {e}")).into())
}

fn default_data_dir() -> PathBuf {
    let here = PathBuf::from("examples/data");
    if here.is_dir() {
        return here;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/data")
}

fn plan(args: &Args, backend: Backend) -> anyhow::Result<JobPlan> {
    if args.trainers == 0 {
        bail!(UsageError("--trainers must be at least 1".to_owned()));
    }
    let data = args.data.clone().unwrap_or_else(default_data_dir);
    let data = std::fs::canonicalize(&data).with_context(|| {
        format!("data directory {} not found (pass --data DIR)", data.display())
    })?;
    let partition = match args.partition.as_str() {
        "iid" => Partition::Iid,
        "dirichlet" => Partition::Dirichlet { alpha: args.alpha },
        other => bail!(UsageError(format!("--partition {other:?} is not iid or dirichlet"))),
    };
    let datasets = (0..args.trainers)
        .map(|i| DatasetUrl::for_shard(&data, i, args.trainers, partition, args.seed))
        .collect();
    let kwargs = match &args.optimizer_kwargs {
        None => serde_json::Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            _ => bail!(UsageError(format!("--optimizer-kwargs {text:?} is not a JSON object"))),
        },
    };
    let hyperparameters = json!({
        "rounds": args.rounds,
        "epochs": args.epochs,
        "batchSize": args.batch_size,
        "learningRate": args.lr,
        "seed": args.seed,
        "minTrainers": args.min_trainers,
        "livenessTimeout": args.liveness_timeout,
        "evalDataset": format!("file://{}", data.display()),
    });
    let mut plan = JobPlan::local(&format!("sim-{}", args.optimizer), datasets);
    plan.middle = args.middle;
    plan.hyperparameters = hyperparameters.as_object().cloned().expect("literal object");
    plan.optimizer = Sort { sort: args.optimizer.clone(), kwargs };
    plan.backend = backend;
    let registry = std::path::absolute(args.workdir.join("registry"))?;
    plan.registry_uri = registry.display().to_string();
    // Fail on a bad optimizer before anything starts.
    fledge_algorithms::Optimizer::from_config(&serde_json::to_value(&plan.optimizer)?)
        .map_err(|e| UsageError(format!("--optimizer: {e}")))?;
    Ok(plan)
}

fn print_rounds(history: &[MetricRecord]) {
    println!("round | global accuracy | global loss | updates | dropped | seconds");
    for r in history {
        let get = |k: &str| r.metrics.get(k).copied().unwrap_or(f64::NAN);
        let secs: f64 =
            r.metrics.iter().filter(|(k, _)| k.starts_with("seconds.")).map(|(_, v)| v).sum();
        println!(
            "{:>5} | {:>15.4} | {:>11.4} | {:>7} | {:>7} | {:>7.2}",
            r.round,
            get("global.accuracy"),
            get("global.loss"),
            get("updates"),
            get("trainersDropped"),
            secs
        );
    }
}

async fn simulate_job(args: &Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.workdir)
        .with_context(|| format!("cannot create {}", args.workdir.display()))?;
    if args.processes {
        return simulate_processes(args).await;
    }
    let plan = plan(args, Backend::Local)?;
    eprintln!(
        "simulating {} trainers{} in-process, {} rounds ({})",
        args.trainers,
        if args.middle > 0 {
            format!(" under {} middle aggregators", args.middle)
        } else {
            String::new()
        },
        args.rounds,
        args.optimizer
    );
    let started = tokio::time::Instant::now();
    let report = simulate(&plan, MnistFactory::shared(), args.workdir.clone())
        .await
        .map_err(|e| anyhow::anyhow!(fledge_sdk::runner::error_chain(&e)))?;
    print_rounds(&report.top.history);
    print_summary(&report.top, started.elapsed());
    Ok(())
}

fn print_summary(top: &RunSummary, elapsed: Duration) {
    let acc = top
        .history
        .last()
        .and_then(|r| r.metrics.get("global.accuracy"))
        .copied()
        .unwrap_or(f64::NAN);
    println!(
        "final global model test accuracy {acc:.4} after {} rounds in {:.1} s",
        top.rounds,
        elapsed.as_secs_f64()
    );
}

/// A child task process.
struct Child {
    id: String,
    role: String,
    child: tokio::process::Child,
}

async fn simulate_processes(args: &Args) -> anyhow::Result<()> {
    let broker =
        fledge_channel::broker::start_embedded_broker((std::net::Ipv4Addr::LOCALHOST, 0).into())
            .context("cannot start the embedded MQTT broker")?;
    let mut plan = plan(args, Backend::Mqtt)?;
    plan.brokers = vec![broker.addr().to_string()];
    let configs = plan.configs()?;
    let workdir = std::path::absolute(&args.workdir)?;
    let (config_dir, log_dir) = (workdir.join("configs"), workdir.join("logs"));
    std::fs::create_dir_all(&config_dir)?;
    std::fs::create_dir_all(&log_dir)?;
    let metrics_path = workdir.join("registry/jobs").join(&plan.job_id).join("metrics.jsonl");
    // A fresh run: old metrics would confuse the progress display.
    let _ = std::fs::remove_file(&metrics_path);
    let exe = std::env::current_exe().context("cannot find the fledge executable")?;
    eprintln!(
        "broker {}; starting {} task processes (logs in {})",
        broker.url(),
        configs.len(),
        log_dir.display()
    );
    let mut children = Vec::new();
    for config in &configs {
        let id = config.task_id.as_str().to_owned();
        let path = config_dir.join(format!("{id}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(config)?)?;
        let log = std::fs::File::create(log_dir.join(format!("{id}.log")))?;
        let child = tokio::process::Command::new(&exe)
            .arg("run-task")
            .arg(&path)
            .current_dir(&workdir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        children.push(Child { id, role: config.role.clone(), child });
    }
    let started = tokio::time::Instant::now();
    let top_index = 0;
    let mut killed = false;
    let mut shown = 0usize;
    let status = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let history = read_metrics(&metrics_path);
        for r in history.iter().skip(shown) {
            let get = |k: &str| r.metrics.get(k).copied().unwrap_or(f64::NAN);
            eprintln!(
                "round {:>3}: global accuracy {:.4} loss {:.4} updates {} dropped {} ({:.1} s)",
                r.round,
                get("global.accuracy"),
                get("global.loss"),
                get("updates"),
                get("trainersDropped"),
                started.elapsed().as_secs_f64()
            );
        }
        shown = history.len();
        if let Some(after) = args.kill_trainer_after_round
            && !killed
            && history.len() as u64 >= after
        {
            let victim = children
                .iter_mut()
                .rev()
                .find(|c| c.role == "trainer")
                .expect("a plan has trainers");
            victim.child.start_kill().context("cannot kill the trainer")?;
            killed = true;
            eprintln!(
                "killed trainer {} (SIGKILL) after round {after} at {:.1} s",
                victim.id,
                started.elapsed().as_secs_f64()
            );
        }
        if let Some(status) = children[top_index].child.try_wait()? {
            break status;
        }
        // A crashed middle aggregator or a stuck job shows up here.
        for c in children.iter_mut().skip(1) {
            if c.role != "trainer"
                && let Some(s) = c.child.try_wait()?
                && !s.success()
            {
                eprintln!("task {} exited with {s}; see its log", c.id);
            }
        }
    };
    let mut failures = BTreeMap::new();
    for c in children.iter_mut().skip(1) {
        let res = tokio::time::timeout(Duration::from_secs(30), c.child.wait()).await;
        match res {
            Ok(Ok(s)) if s.success() => {}
            Ok(Ok(s)) => {
                failures.insert(c.id.clone(), s.to_string());
            }
            Ok(Err(e)) => {
                failures.insert(c.id.clone(), e.to_string());
            }
            Err(_) => {
                let _ = c.child.start_kill();
                failures.insert(c.id.clone(), "did not exit within 30 s of the end".to_owned());
            }
        }
    }
    drop(broker);
    let history = read_metrics(&metrics_path);
    print_rounds(&history);
    for (id, why) in &failures {
        eprintln!("task {id}: {why}");
    }
    if !status.success() {
        bail!(
            "the aggregator exited with {status}; see {}",
            log_dir.join(format!("{}.log", children[top_index].id)).display()
        );
    }
    let summary = RunSummary {
        kind: RoleKind::TopAggregator,
        rounds: history.last().map(|r| r.round).unwrap_or(0),
        history,
        final_model: None,
    };
    print_summary(&summary, started.elapsed());
    Ok(())
}

fn read_metrics(path: &Path) -> Vec<MetricRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_kind_from_flag_name_and_tags() {
        let plan = JobPlan::local("j", vec!["/d".to_owned()]);
        let configs = plan.configs().expect("configs");
        let (agg, trainer) = (&configs[0], &configs[1]);
        let kind = |flag, config| role_entry(flag, config).map(|e| e.kind);
        assert_eq!(kind(None, agg).expect("name"), RoleKind::TopAggregator);
        assert_eq!(kind(None, trainer).expect("name"), RoleKind::Trainer);
        assert_eq!(
            kind(Some("middle-aggregator"), trainer).expect("flag"),
            RoleKind::MiddleAggregator
        );
        assert_eq!(kind(Some("mnist-mlp-trainer"), agg).expect("alias"), RoleKind::Trainer);
        assert_eq!(kind(Some("ring-trainer"), trainer).expect("flag"), RoleKind::RingTrainer);
        let mut renamed = trainer.clone();
        renamed.role = "worker".to_owned();
        for c in &mut renamed.channels {
            let tags = c.func_tags.remove("trainer").expect("tags");
            c.func_tags.insert("worker".to_owned(), tags);
        }
        assert_eq!(kind(None, &renamed).expect("tags"), RoleKind::Trainer);
        let err = role_entry(Some("pytorch"), trainer).unwrap_err().to_string();
        assert!(err.contains("pytorch") && err.contains("vertical-label-party"), "{err}");
    }
}
