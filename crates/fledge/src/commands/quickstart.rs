//! `fledge quickstart`: a real two-tier FL job on MNIST, end to end, in one command.
//!
//! It starts the whole platform in this process (as `fledge standalone` does, on free loopback
//! ports, in a temporary data directory), registers the `examples/mnist` design — its schema,
//! code (built-in aggregator and reference MLP trainer), one dataset per trainer (an IID shard
//! of the MNIST training digits) and a job — through the same REST API that `fledgectl` uses,
//! starts the job, shows live progress, and ends with a summary: the final global model's test
//! accuracy (its `final.safetensors` evaluated on the 2,000 test digits; the aggregator reports
//! the same figure every round as `global.accuracy`), the trainers' mean for contrast, rounds,
//! wall time, and where the model and metrics are.
//!
//! The example's files and the MNIST data are compiled into the binary, so the quickstart runs
//! from any directory. Its job is the `examples/mnist` job directory; `fledgectl run
//! examples/mnist` submits the same job by hand.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use fledge_client::Client;
use fledge_types::{
    DataSpecEntry, DatasetId, DatasetSpec, DesignId, DesignSpec, JobId, JobSpec, JobState,
    MetricRecord, ModelSpec, Schema, TaskState,
};

use super::UsageError;
use super::standalone;

/// The example's files, compiled in (`examples/mnist`).
const SCHEMA: &str = include_str!("../../../../examples/mnist/schema.json");
const JOB: &str = include_str!("../../../../examples/mnist/job.json");
const MODEL_SPEC: &str = include_str!("../../../../examples/mnist/modelSpec.json");
const TRAINER_ROLE: &str = include_str!("../../../../examples/mnist/code/trainer/fledge-role.toml");
const AGGREGATOR_ROLE: &str =
    include_str!("../../../../examples/mnist/code/aggregator/fledge-role.toml");

/// The MNIST files (8,000 train and 2,000 test digits, IDX format, gzip), compiled in.
const MNIST: [(&str, &[u8]); 4] = [
    (
        "mnist10k-train-images-idx3-ubyte.gz",
        include_bytes!("../../../../examples/data/mnist10k-train-images-idx3-ubyte.gz"),
    ),
    (
        "mnist10k-train-labels-idx1-ubyte.gz",
        include_bytes!("../../../../examples/data/mnist10k-train-labels-idx1-ubyte.gz"),
    ),
    (
        "mnist10k-test-images-idx3-ubyte.gz",
        include_bytes!("../../../../examples/data/mnist10k-test-images-idx3-ubyte.gz"),
    ),
    (
        "mnist10k-test-labels-idx1-ubyte.gz",
        include_bytes!("../../../../examples/data/mnist10k-test-labels-idx1-ubyte.gz"),
    ),
];

/// Arguments of `fledge quickstart`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Keep the files (the MNIST data in DIR/mnist; the platform's store, workers' logs and
    /// models in DIR/platform) in DIR instead of a temporary directory removed at exit.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Number of trainers (one IID shard of the training set each).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub trainers: u32,
    /// Number of FL rounds [default: the example's modelSpec.json].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub rounds: Option<u32>,
    /// Give up (and stop the job) after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Run the platform without TLS (plain text, on loopback only), as `fledge standalone
    /// --insecure` does; the data plane's keys stay on. For measuring what TLS costs
    /// (`fledge bench security`), not for use.
    #[arg(long)]
    pub insecure: bool,
}

/// What the quickstart measured, for the summary.
struct Summary {
    job: JobId,
    state: JobState,
    reason: Option<String>,
    /// The last round's figures as the job reported them.
    progress: Progress,
    /// The last round's sample-weighted mean of the trainers' locally trained models' accuracy.
    trainers_accuracy: Option<f64>,
    /// `final.safetensors` evaluated here on the test digits: (accuracy, loss), or why not.
    final_model: Option<Result<(f64, f64), String>>,
    wall: Duration,
    data_dir: PathBuf,
    /// Whether `data_dir` outlives the command (`--data-dir`), or is removed at exit.
    kept: bool,
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let started = tokio::time::Instant::now();
    let temp;
    let data_dir = match &args.data_dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::Builder::new()
                .prefix("fledge-quickstart-")
                .tempdir()
                .context("cannot create a temporary data directory")?;
            temp.path().to_path_buf()
        }
    };
    let root = std::path::absolute(&data_dir)
        .map_err(|err| UsageError(format!("--data-dir {}: {err}", data_dir.display())))?;
    // The data lies beside the platform's data dir, not in it: job code never gets any of
    // the data dir (the sandbox protects it whole), only its datasets.
    let mnist_dir = write_mnist(&root)?;
    let data_dir = root.join("platform");

    eprintln!("fledge quickstart: starting the platform in {}", data_dir.display());
    let mut platform_args = standalone::Args::ephemeral(data_dir.clone());
    platform_args.tls.insecure = args.insecure;
    let platform =
        standalone::launch(&platform_args, None).await.context("cannot start the platform")?;
    let client = Client::new(&platform.endpoint, Some(&platform.token))
        .and_then(|client| client.with_ca(platform.ca.as_ref()))
        .context("cannot build the REST client")?;

    let result = submit_and_watch(&client, &args, &mnist_dir, &data_dir, started).await;
    platform.shutdown().await;
    let mut summary = result?;
    summary.kept = args.data_dir.is_some();
    let model = summary.registry_dir().join("final.safetensors");
    if model.exists() {
        summary.final_model =
            Some(evaluate_final(&model, &mnist_dir).map_err(|err| format!("{err:#}")));
    }
    print_summary(&summary);
    if summary.state != JobState::Completed {
        anyhow::bail!(
            "job {} ended {}{}",
            summary.job,
            summary.state,
            summary.reason.map(|r| format!(": {r}")).unwrap_or_default()
        );
    }
    Ok(())
}

/// Writes the compiled-in MNIST files to `<root>/mnist` and returns that directory.
fn write_mnist(root: &Path) -> anyhow::Result<PathBuf> {
    let dir = root.join("mnist");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, bytes) in MNIST {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(dir)
}

/// Registers the example through the REST API, starts the job and follows it to its end.
async fn submit_and_watch(
    client: &Client,
    args: &Args,
    mnist_dir: &Path,
    data_dir: &Path,
    started: tokio::time::Instant,
) -> anyhow::Result<Summary> {
    let (spec, rounds) = register(client, args, mnist_dir).await?;
    let job = client.create_job(&spec).await.context("cannot create the job")?;
    eprintln!("job {} created: {} trainers, {} rounds", job.id, args.trainers, rounds);
    client.start_job(&job.id).await.context("cannot start the job")?;

    let bar = ProgressBar::new(rounds);
    bar.set_style(
        ProgressStyle::with_template("{spinner} round {pos}/{len} [{bar:30}] {elapsed} {msg}")
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let mut stop_sent = false;
    let job = loop {
        let job = client.get_job(&job.id).await.context("cannot read the job")?;
        let metrics = client.job_metrics(&job.id).await.context("cannot read metrics")?;
        let tasks = client.list_tasks(&job.id).await.context("cannot read tasks")?;
        let progress = latest(&metrics);
        bar.set_position(progress.round.min(rounds));
        bar.set_message(status_line(job.state, &tasks, &progress));
        if job.state.is_final() {
            break job;
        }
        if tokio::time::Instant::now() >= deadline && !stop_sent {
            bar.println(format!("timeout of {} s reached: stopping the job", args.timeout));
            client.stop_job(&job.id).await.context("cannot stop the job")?;
            stop_sent = true;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    bar.finish_and_clear();

    let metrics = client.job_metrics(&job.id).await.context("cannot read metrics")?;
    let progress = latest(&metrics);
    if job.state != JobState::Completed {
        for task in client.list_tasks(&job.id).await.unwrap_or_default() {
            if task.state == TaskState::Failed {
                eprintln!("task {} ({}) failed; log tail:\n{}", task.task_id, task.role, task.log);
            }
        }
    }
    Ok(Summary {
        job: job.id,
        state: job.state,
        reason: job.reason,
        trainers_accuracy: metrics
            .iter()
            .filter(|r| r.round == progress.round && r.role != "trainer")
            .find_map(|r| r.metrics.get("trainer.afterTraining.accuracy").copied()),
        progress,
        final_model: None,
        wall: started.elapsed(),
        data_dir: data_dir.to_path_buf(),
        kept: false,
    })
}

/// Registers the design, schema, code and datasets; returns the job spec and its rounds.
async fn register(
    client: &Client,
    args: &Args,
    mnist_dir: &Path,
) -> anyhow::Result<(JobSpec, u64)> {
    let schema: Schema = parse("examples/mnist/schema.json", SCHEMA)?;
    let mut spec: JobSpec = parse("examples/mnist/job.json", JOB)?;
    let mut model_spec: ModelSpec = parse("examples/mnist/modelSpec.json", MODEL_SPEC)?;
    if let Some(rounds) = args.rounds {
        model_spec.hyperparameters.insert("rounds".to_owned(), rounds.into());
    }
    // The aggregator evaluates every round's global model on the 2,000 test digits.
    model_spec
        .hyperparameters
        .insert("evalDataset".to_owned(), format!("file://{}", mnist_dir.display()).into());
    let rounds = model_spec.hyperparameters.get("rounds").and_then(|r| r.as_u64()).unwrap_or(1);

    let design = DesignId::new("mnist");
    client
        .create_design(&DesignSpec {
            id: design.clone(),
            name: "MNIST two-tier".to_owned(),
            description: "quickstart: built-in aggregator, reference MLP trainers".to_owned(),
        })
        .await
        .context("cannot create the design")?;
    client.create_schema(&design, &schema).await.context("cannot store the schema")?;
    client.upload_code(&design, code_zip()?.into()).await.context("cannot upload the code")?;

    let mut ids: Vec<DatasetId> = Vec::new();
    for shard in 0..args.trainers {
        let url = format!(
            "file://{}?shard={shard}&shards={}&partition=iid&seed=0",
            mnist_dir.display(),
            args.trainers
        );
        let dataset = client
            .create_dataset(&DatasetSpec {
                name: format!("mnist10k shard {shard} of {}", args.trainers),
                description: "IID shard of the 8,000 MNIST training digits".to_owned(),
                url,
                data_format: "mnist-idx".to_owned(),
                realm: "default".to_owned(),
                is_public: false,
            })
            .await
            .with_context(|| format!("cannot register dataset {shard}"))?;
        ids.push(dataset.id);
    }
    spec.data_spec = vec![DataSpecEntry {
        role: "trainer".to_owned(),
        dataset_groups: BTreeMap::from([("default".to_owned(), ids)]),
        participant_run: false,
    }];
    spec.model_spec = model_spec;
    spec.data_spec_path = None;
    spec.model_spec_path = None;
    Ok((spec, rounds))
}

fn parse<T: serde::de::DeserializeOwned>(name: &str, text: &str) -> anyhow::Result<T> {
    fledge_types::json::from_slice(text.as_bytes()).map_err(|details| {
        let lines: Vec<String> =
            details.iter().map(|d| format!("{}: {}", d.path, d.message)).collect();
        anyhow::anyhow!("the compiled-in {name} is invalid: {}", lines.join("; "))
    })
}

/// The design's code bundle: one folder per role, each naming its built-in role.
fn code_zip() -> anyhow::Result<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default();
    for (path, text) in [
        ("trainer/fledge-role.toml", TRAINER_ROLE),
        ("aggregator/fledge-role.toml", AGGREGATOR_ROLE),
    ] {
        zip.start_file(path, options).context("cannot build the code zip")?;
        zip.write_all(text.as_bytes()).context("cannot build the code zip")?;
    }
    Ok(zip.finish().context("cannot build the code zip")?.into_inner())
}

/// The latest round seen in the metrics, with its loss and accuracy.
#[derive(Debug, Default, PartialEq)]
struct Progress {
    round: u64,
    loss: Option<f64>,
    accuracy: Option<f64>,
    /// What `loss` and `accuracy` measure.
    source: Source,
}

/// Which model a [`Progress`] figure measures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Source {
    /// No figure yet.
    #[default]
    None,
    /// The aggregated (global) model, evaluated by the aggregator (`global.*`).
    Global,
    /// The trainers' locally trained models, sample-weighted mean (`trainer.afterTraining.*`).
    Trainers,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::None | Source::Global => "global model",
            Source::Trainers => "trainers' local models, mean",
        }
    }
}

/// Latest round and its figures: the aggregator's evaluation of the global model
/// (`global.loss`, `global.accuracy`), else the aggregator's sample-weighted mean of its
/// trainers' evaluations of their locally trained models (`trainer.afterTraining.*`).
fn latest(records: &[MetricRecord]) -> Progress {
    let Some(round) = records.iter().map(|r| r.round).max() else {
        return Progress::default();
    };
    let of_round: Vec<&MetricRecord> =
        records.iter().filter(|r| r.round == round && r.role != "trainer").collect();
    let figure = |key: String| of_round.iter().find_map(|r| r.metrics.get(&key).copied());
    for (source, prefix) in
        [(Source::Global, "global."), (Source::Trainers, "trainer.afterTraining.")]
    {
        let accuracy = figure(format!("{prefix}accuracy"));
        if accuracy.is_some() {
            return Progress { round, loss: figure(format!("{prefix}loss")), accuracy, source };
        }
    }
    Progress { round, ..Progress::default() }
}

/// Evaluates the job's `final.safetensors` on the MNIST test digits in `mnist_dir`.
fn evaluate_final(model: &Path, mnist_dir: &Path) -> anyhow::Result<(f64, f64)> {
    use fledge_sdk::Evaluator as _;
    let bytes = std::fs::read(model).with_context(|| format!("cannot read {}", model.display()))?;
    let weights = fledge_sdk::registry::from_safetensors(&model.display().to_string(), &bytes)?;
    let url = format!("file://{}", mnist_dir.display());
    let mut evaluator = fledge_models::MnistEvaluator::new(&url, 128)?;
    let metrics = evaluator.evaluate(&weights)?;
    Ok((metrics["accuracy"], metrics["loss"]))
}

fn status_line(state: JobState, tasks: &[fledge_types::Task], progress: &Progress) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for task in tasks {
        *counts.entry(task.state.as_str()).or_default() += 1;
    }
    let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let mut res = format!("{state} | tasks: {}", counts.join(", "));
    if let Some(accuracy) = progress.accuracy {
        res.push_str(&format!(" | {}: accuracy {accuracy:.4}", progress.source.label()));
    }
    if let Some(loss) = progress.loss {
        res.push_str(&format!(", loss {loss:.4}"));
    }
    res
}

impl Summary {
    fn registry_dir(&self) -> PathBuf {
        self.data_dir.join("registry").join("jobs").join(self.job.as_str())
    }
}

fn print_summary(summary: &Summary) {
    let registry = summary.registry_dir();
    let figure = |v: Option<f64>| v.map(|a| format!("{a:.4}")).unwrap_or_else(|| "-".to_owned());
    let progress = &summary.progress;
    #[allow(clippy::print_stdout)]
    {
        println!("job:                    {} ({})", summary.job, summary.state);
        println!("rounds:                 {}", progress.round);
        match &summary.final_model {
            Some(Ok((accuracy, loss))) => {
                println!(
                    "global model accuracy:  {accuracy:.4}  (final.safetensors on the 2,000 test digits)"
                );
                println!("global model loss:      {loss:.4}");
                if progress.source == Source::Global
                    && progress.accuracy.is_some_and(|a| (a - accuracy).abs() > 1e-9)
                {
                    println!(
                        "warning: the aggregator reported {} for its last round",
                        figure(progress.accuracy)
                    );
                }
            }
            Some(Err(err)) => println!("global model:           cannot evaluate: {err}"),
            None => println!(
                "{:<24}accuracy {}, loss {}",
                format!("{}:", progress.source.label()),
                figure(progress.accuracy),
                figure(progress.loss)
            ),
        }
        if summary.trainers_accuracy.is_some() {
            println!(
                "trainers' accuracy:     {}  (their locally trained models, sample-weighted mean)",
                figure(summary.trainers_accuracy)
            );
        }
        println!("wall time:              {:.1} s", summary.wall.as_secs_f64());
        println!("model:                  {}", registry.join("final.safetensors").display());
        println!("metrics:                {}", registry.join("metrics.jsonl").display());
        if !summary.kept {
            println!("(a temporary directory, removed now: pass --data-dir DIR to keep the files)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(role: &str, round: u64, metrics: &[(&str, f64)]) -> MetricRecord {
        MetricRecord {
            task_id: fledge_types::TaskId::new(format!("{role}-{round}")),
            role: role.to_owned(),
            round,
            metrics: metrics.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            timestamp: None,
        }
    }

    #[test]
    fn latest_reports_the_global_model_else_the_trainers_mean() {
        assert_eq!(latest(&[]), Progress::default());
        let trainers_only = [
            record("trainer", 1, &[("afterTraining.accuracy", 0.5)]),
            record("trainer", 2, &[("afterTraining.accuracy", 0.6)]),
        ];
        assert_eq!(latest(&trainers_only), Progress { round: 2, ..Progress::default() });
        let mut weighted = trainers_only.to_vec();
        weighted.push(record(
            "aggregator",
            2,
            &[("trainer.afterTraining.accuracy", 0.75), ("trainer.afterTraining.loss", 0.5)],
        ));
        assert_eq!(
            latest(&weighted),
            Progress { round: 2, loss: Some(0.5), accuracy: Some(0.75), source: Source::Trainers }
        );
        let mut with_global = weighted.clone();
        with_global.push(record("aggregator", 2, &[("global.accuracy", 0.9)]));
        let progress = latest(&with_global);
        assert_eq!(progress.accuracy, Some(0.9), "the global model's own evaluation wins");
        assert_eq!(progress.source, Source::Global);
        assert_eq!(progress.loss, None, "never mixed with the trainers' loss");
    }

    #[test]
    fn compiled_in_example_parses_and_names_its_builtin_roles() {
        let schema: Schema = parse("schema", SCHEMA).expect("schema parses");
        assert!(fledge_types::validate::schema(&schema).is_empty());
        let _: JobSpec = parse("job", JOB).expect("job parses");
        let _: ModelSpec = parse("modelSpec", MODEL_SPEC).expect("model spec parses");
        assert!(TRAINER_ROLE.contains("mnist-mlp-trainer"));
        assert!(AGGREGATOR_ROLE.contains("top-aggregator"));
        assert!(code_zip().expect("zip").len() > 100);
    }
}
