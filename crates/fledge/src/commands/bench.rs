//! `fledge bench [aggregate|transfer|memory|round|all]`: performance against bounds measured
//! in the same run; `fledge bench chaos`: recovery from injected faults (see `chaos`).
//!
//! Every row is `name | value | unit | bound | ratio`:
//!
//! - **aggregate**: FedAvg fold throughput on a 100 MB model (fledge-algorithms' public fold
//!   path) against single-thread memory read bandwidth.
//! - **transfer**: a 100 MB model from an aggregator to 10 trainers through the embedded MQTT
//!   broker, as delivered GB/s, against loopback TCP bandwidth.
//! - **memory**: peak RSS (`VmHWM`) of a real top aggregator process (FedAvg) running one
//!   round of a 10M-parameter model with 10 and with 100 trainers; the bound is the target, 3×
//!   the model size, so a ratio ≤ 1 meets it. The target setting is `maxConcurrentUploads` 1,
//!   which is also what an aggregator picks by itself for this model when the hyperparameter
//!   is unset (a 64 MiB budget of updates in flight, at least one):
//!   the aggregator then holds the accumulator and one upload (plus the global model while it
//!   distributes); with 2 it holds two uploads at once, and without grants as many as arrive.
//!   Those rows are measured too, as the price of each setting. Uploads are serialized at the
//!   aggregator's link anyway, so one grant costs little time. The aggregator runs as a child
//!   process (`fledge bench memory-child`); this process hosts the broker and the trainers,
//!   which echo the model back.
//! - **round**: overhead of a 10-trainer MNIST round over MQTT in one process: aggregator round
//!   wall time minus the slowest trainer's compute, against that compute.
//! - **security** (not in `all`): what security costs, each figure against the same thing
//!   without it, measured in the same run, alternating the two so that load drifts hit both:
//!   one FL round's traffic with a 40 MB model and 4 trainers (broadcast, then an update back
//!   from each) over the embedded broker (mqtts and sealed messages vs plain MQTT and no keys)
//!   and over p2p (TLS streams and sealed messages vs plain streams and no keys); and the wall
//!   time of `fledge quickstart` vs `fledge quickstart --insecure` (TLS on every listener vs
//!   plain text; the data plane's keys are on in both). The goal is a ratio ≤ 1.15.
//!
//! Build with `--release`: debug figures are meaningless.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use fledge_channel::{BackendEnv, Channel, Kind, Message, MqttConfig};
use fledge_models::MnistFactory;
use fledge_models::url::{DatasetUrl, Partition};
use fledge_sdk::runner::{JobPlan, RunOptions, simulate_with};
use fledge_types::{Backend, TaskConfig};

/// Which benchmark.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// FedAvg fold vs memory bandwidth.
    Aggregate,
    /// MQTT fan-out vs loopback TCP.
    Transfer,
    /// Aggregator peak RSS, 10 vs 100 trainers.
    Memory,
    /// MNIST round overhead.
    Round,
    /// Everything above (not chaos).
    All,
    /// A three-tier MNIST job under injected faults vs the same job without (see `chaos`).
    Chaos,
    /// MNIST with 10 trainers under plain FedAvg, SecAgg+, central DP and local DP (see `privacy_bench`).
    Privacy,
    /// What security costs: a 40 MB-model round and the quickstart, secure vs `--insecure`.
    Security,
    /// Internal: the aggregator process of the memory benchmark.
    #[value(hide = true)]
    MemoryChild,
}

/// Arguments of `fledge bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Which benchmark.
    #[arg(value_enum, default_value = "all")]
    which: Which,
    /// Model size of the memory benchmark, in parameters.
    #[arg(long, default_value_t = 10_000_000)]
    params: usize,
    /// Internal (memory-child): broker address.
    #[arg(long, hide = true)]
    broker: Option<String>,
    /// Internal (memory-child): trainers to wait for.
    #[arg(long, hide = true, default_value_t = 10)]
    trainers: usize,
    /// Internal (memory-child): maxConcurrentUploads (0: unlimited).
    #[arg(long, hide = true, default_value_t = 0)]
    max_uploads: u64,
    /// Internal (memory-child): job id.
    #[arg(long, hide = true, default_value = "bench-memory")]
    job: String,
    /// Chaos: the three-tier example job directory.
    #[arg(long, value_name = "DIR", default_value = "examples/hierarchical-mnist")]
    example: PathBuf,
    /// Chaos and privacy: rounds of the job (chaos default 100, privacy uses at most 1000).
    #[arg(long, default_value_t = 100)]
    rounds: u64,
    /// Chaos: faults to inject.
    #[arg(long, default_value_t = 20)]
    faults: usize,
    /// Chaos: seed of the fault schedule.
    #[arg(long, default_value_t = 14)]
    seed: u64,
    /// Security: runs of each side of a comparison (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeat: u32,
}

struct Row {
    name: String,
    value: f64,
    unit: &'static str,
    bound: f64,
    ratio: f64,
}

fn print_table(rows: &[Row]) {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::ASCII_MARKDOWN);
    table.set_header(["name", "value", "unit", "bound", "ratio"]);
    for r in rows {
        table.add_row([
            r.name.clone(),
            format!("{:.3}", r.value),
            r.unit.to_owned(),
            format!("{:.3}", r.bound),
            format!("{:.3}", r.ratio),
        ]);
    }
    println!("{table}");
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.which == Which::MemoryChild {
        return memory_child(&args).await;
    }
    if args.which == Which::Privacy {
        return super::privacy_bench::run(&data_dir()?, args.rounds.min(1000)).await;
    }
    if args.which == Which::Security {
        if cfg!(debug_assertions) {
            eprintln!("warning: debug build; build with --release for meaningful figures");
        }
        let rows = security(args.repeat).await?;
        print_table(&rows);
        println!("goal: ratio ≤ {SECURITY_GOAL} (secure time / insecure time)");
        return Ok(());
    }
    if args.which == Which::Chaos {
        return super::chaos::run(super::chaos::Options {
            example: args.example.clone(),
            rounds: args.rounds,
            faults: args.faults,
            seed: args.seed,
        })
        .await;
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; build with --release for meaningful figures");
    }
    let all = args.which == Which::All;
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    let mut take = |name: &str, res: anyhow::Result<Vec<Row>>| match res {
        Ok(r) => rows.extend(r),
        Err(e) => {
            eprintln!("bench {name} failed: {e:#}");
            failed.push(name.to_owned());
        }
    };
    if all || args.which == Which::Aggregate {
        take("aggregate", aggregate().await);
    }
    if all || args.which == Which::Transfer {
        take("transfer", transfer().await);
    }
    if all || args.which == Which::Memory {
        take("memory", memory(args.params).await);
    }
    if all || args.which == Which::Round {
        take("round", round().await);
    }
    print_table(&rows);
    if !failed.is_empty() {
        bail!("benchmarks failed: {}", failed.join(", "));
    }
    Ok(())
}

async fn aggregate() -> anyhow::Result<Vec<Row>> {
    eprintln!("aggregate: folding a 100 MB model ...");
    let params = 25_000_000;
    let (fold, kernel, bw) = tokio::task::spawn_blocking(move || {
        let bw = fledge_algorithms::bench::memory_read_bandwidth(256 << 20);
        let fold = fledge_algorithms::bench::fold_throughput(params, 5);
        let kernel = fledge_algorithms::bench::fold_kernel_throughput(params, 5, false);
        (fold, kernel, bw)
    })
    .await?;
    Ok(vec![
        Row {
            name: "fedavg fold, 100 MB model (checked add)".to_owned(),
            value: fold,
            unit: "GB/s",
            bound: bw,
            ratio: fold / bw,
        },
        Row {
            name: "fedavg fold kernel, single thread".to_owned(),
            value: kernel,
            unit: "GB/s",
            bound: bw,
            ratio: kernel / bw,
        },
    ])
}

async fn transfer() -> anyhow::Result<Vec<Row>> {
    eprintln!("transfer: 100 MB to 10 trainers through the embedded broker ...");
    let bytes = 100_000_000;
    let receivers = 10;
    let loopback = fledge_channel::bench::loopback_tcp_bandwidth(1 << 30).await?;
    let elapsed = fledge_channel::bench::mqtt_fanout(bytes, receivers).await?;
    let delivered = (bytes * receivers) as f64 / elapsed.as_secs_f64() / 1e9;
    eprintln!("transfer: the same with keys (sealed: encrypted, signed) ...");
    let sealed = fledge_channel::bench::mqtt_fanout_with(bytes, receivers, true).await?;
    let sealed_delivered = (bytes * receivers) as f64 / sealed.as_secs_f64() / 1e9;
    Ok(vec![
        Row {
            name: "mqtt fan-out 100 MB → 10 trainers, sealed (delivered)".to_owned(),
            value: sealed_delivered,
            unit: "GB/s",
            bound: loopback,
            ratio: sealed_delivered / loopback,
        },
        Row {
            name: "mqtt fan-out sealed vs plain (time)".to_owned(),
            value: sealed.as_secs_f64(),
            unit: "s",
            bound: elapsed.as_secs_f64(),
            ratio: sealed.as_secs_f64() / elapsed.as_secs_f64(),
        },
        Row {
            name: "mqtt fan-out 100 MB → 10 trainers (delivered)".to_owned(),
            value: delivered,
            unit: "GB/s",
            bound: loopback,
            ratio: delivered / loopback,
        },
        Row {
            name: "mqtt fan-out 100 MB → 10 trainers (time)".to_owned(),
            value: elapsed.as_secs_f64(),
            unit: "s",
            bound: (bytes * receivers) as f64 / loopback / 1e9,
            ratio: elapsed.as_secs_f64() / ((bytes * receivers) as f64 / loopback / 1e9),
        },
    ])
}

/// What `fledge bench security` aims for: secure time at most this many times the insecure.
const SECURITY_GOAL: f64 = 1.15;

/// The median of `values` (not empty).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 }
}

/// Runs `secure` and `insecure` `repeat` times each, alternating, and returns a row of their
/// median times in seconds (secure as the value, insecure as the bound).
async fn compare<S, I, FS, FI>(
    name: &str,
    repeat: u32,
    mut secure: S,
    mut insecure: I,
) -> anyhow::Result<Row>
where
    S: FnMut() -> FS,
    I: FnMut() -> FI,
    FS: std::future::Future<Output = anyhow::Result<Duration>>,
    FI: std::future::Future<Output = anyhow::Result<Duration>>,
{
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..repeat {
        eprintln!("security: {name}, run {} of {repeat} ...", i + 1);
        // Alternate which side goes first, so that neither always runs on a warmer machine.
        if i % 2 == 0 {
            on.push(secure().await?.as_secs_f64());
            off.push(insecure().await?.as_secs_f64());
        } else {
            off.push(insecure().await?.as_secs_f64());
            on.push(secure().await?.as_secs_f64());
        }
    }
    let (on, off) = (median(&mut on), median(&mut off));
    Ok(Row { name: name.to_owned(), value: on, unit: "s", bound: off, ratio: on / off })
}

/// The rows of `fledge bench security` (see the module's documentation).
async fn security(repeat: u32) -> anyhow::Result<Vec<Row>> {
    const MODEL_BYTES: usize = 40_000_000;
    const TRAINERS: usize = 4;
    let mut rows = Vec::new();
    rows.push(
        compare(
            "40 MB round, 4 trainers, embedded broker: mqtts + sealed vs plain",
            repeat,
            || async { Ok(fledge_channel::bench::mqtt_round(MODEL_BYTES, TRAINERS, true).await?) },
            || async { Ok(fledge_channel::bench::mqtt_round(MODEL_BYTES, TRAINERS, false).await?) },
        )
        .await?,
    );
    rows.push(
        compare(
            "40 MB round, 4 trainers, p2p: TLS + sealed vs plain",
            repeat,
            || p2p_round(MODEL_BYTES, TRAINERS, true),
            || p2p_round(MODEL_BYTES, TRAINERS, false),
        )
        .await?,
    );
    rows.push(
        compare(
            "fledge quickstart wall time: TLS vs --insecure",
            repeat,
            || quickstart_wall(false),
            || quickstart_wall(true),
        )
        .await?,
    );
    Ok(rows)
}

/// [`fledge_channel::bench::round_with`] over p2p, with a metaserver of its own on loopback:
/// with `secure`, TLS streams and keys; without, plain streams and no keys.
async fn p2p_round(bytes: usize, trainers: usize, secure: bool) -> anyhow::Result<Duration> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let metaserver = fledge_control::metaserver::Options::default().build()?;
    let server = tokio::spawn(metaserver.run(listener, stop.clone()));
    let mut config = fledge_channel::P2pConfig::new(format!("http://{addr}"));
    config.tls = secure;
    let res = fledge_channel::bench::round_with(
        fledge_channel::Backend::P2p(config),
        bytes,
        trainers,
        secure,
    )
    .await;
    stop.cancel();
    let _ = server.await;
    Ok(res?)
}

/// Wall time of `fledge quickstart` (this executable), with `--insecure` when `insecure`.
async fn quickstart_wall(insecure: bool) -> anyhow::Result<Duration> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command.arg("quickstart");
    if insecure {
        command.arg("--insecure");
    }
    command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let start = tokio::time::Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(900), command.output())
        .await
        .context("fledge quickstart did not finish in 900 s")??;
    let elapsed = start.elapsed();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        bail!(
            "fledge quickstart{} failed with {}: {}",
            if insecure { " --insecure" } else { "" },
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    Ok(elapsed)
}

/// Peak resident set of this process in bytes (Linux `VmHWM`).
fn vm_hwm() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .context("cannot parse VmHWM")?;
    Ok(kb * 1024)
}

fn bench_plan(job: &str, trainers: usize, broker: &str, max_uploads: u64) -> JobPlan {
    let mut plan = JobPlan::local(job, (0..trainers).map(|i| format!("bench:{i}")).collect());
    plan.backend = Backend::Mqtt;
    plan.brokers = vec![broker.to_owned()];
    plan.hyperparameters =
        serde_json::json!({"rounds": 1, "minTrainers": trainers, "joinTimeout": 120, "maxConcurrentUploads": max_uploads})
            .as_object()
            .cloned()
            .expect("literal object");
    plan
}

/// The aggregator side of the memory benchmark, in a child process: runs the real top
/// aggregator for one round, then prints its peak RSS.
async fn memory_child(args: &Args) -> anyhow::Result<()> {
    let broker = args.broker.clone().context("memory-child needs --broker")?;
    let plan = bench_plan(&args.job, args.trainers, &broker, args.max_uploads);
    let config = plan.configs()?.remove(0);
    let dir = tempfile::tempdir()?;
    let mut opts = RunOptions { workdir: dir.path().to_path_buf(), ..RunOptions::default() };
    opts.backend_env.max_message_bytes = 1 << 30;
    let parsed = MqttConfig::parse(&broker)?;
    opts.backend_env.mqtt = loaded_mqtt(&parsed.host, parsed.port);
    fledge_sdk::runner::run_task_with(config, MnistFactory::shared(), opts)
        .await
        .map_err(|e| anyhow::anyhow!(fledge_sdk::runner::error_chain(&e)))?;
    println!("{{\"vmHwm\": {}}}", vm_hwm()?);
    Ok(())
}

/// MQTT settings for moving gigabytes through one broker on two cores: heartbeats can lag
/// by seconds under that load, which must not count as a dead peer.
fn loaded_mqtt(host: &str, port: u16) -> MqttConfig {
    let mut config = MqttConfig::new(host, port);
    config.keep_alive = Duration::from_secs(60);
    config.liveness_timeout = Duration::from_secs(120);
    config.connect_timeout = Duration::from_secs(60);
    config
}

/// A trainer that echoes the model it gets (shared bytes: no copy per trainer).
async fn echo_trainer(
    config: TaskConfig,
    env: BackendEnv,
    model: fledge_channel::Tensors,
) -> anyhow::Result<()> {
    let grants =
        config.hyperparameters.get("maxConcurrentUploads").and_then(|v| v.as_u64()).unwrap_or(0)
            > 0;
    let spec = &config.channels[0];
    let (opts, backend) = fledge_channel::manager::plan(&config, spec, &env)?;
    let channel = Channel::open(opts, backend).await?;
    let aggregator = channel
        .await_join(Duration::from_secs(120))
        .await?
        .into_iter()
        .next()
        .context("no aggregator")?;
    loop {
        let m = match channel.recv(&aggregator).await {
            Ok(m) => m,
            Err(_) => return Ok(()),
        };
        match m.kind {
            Kind::Control => {
                let mut reply = Message::new(Kind::Weights, 0);
                reply.tensors = model.clone();
                channel.send(&aggregator, reply).await?;
            }
            Kind::Weights => {
                if grants {
                    let ready = Message::new(Kind::Control, m.round).with_meta("command", "ready");
                    channel.send(&aggregator, ready).await?;
                    loop {
                        let g = channel.recv(&aggregator).await?;
                        if g.kind == Kind::Control
                            && g.meta.get("command").and_then(|v| v.as_str()) == Some("upload")
                        {
                            break;
                        }
                    }
                }
                let mut reply = Message::new(Kind::Update, m.round).with_meta("num_samples", 1);
                reply.model_version = m.model_version;
                reply.tensors = m.tensors;
                channel.send(&aggregator, reply).await?;
            }
            Kind::EndOfTraining => {
                channel.close().await?;
                return Ok(());
            }
            _ => {}
        }
    }
}

async fn memory_run(params: usize, trainers: usize, max_uploads: u64) -> anyhow::Result<u64> {
    let broker =
        fledge_channel::broker::start_embedded_broker((std::net::Ipv4Addr::LOCALHOST, 0).into())?;
    let job = format!("bench-memory-{trainers}");
    let plan = bench_plan(&job, trainers, &broker.addr().to_string(), max_uploads);
    let configs = plan.configs()?;
    let exe = std::env::current_exe()?;
    let child = tokio::process::Command::new(exe)
        .args(["bench", "memory-child", "--broker", &broker.addr().to_string()])
        .args(["--trainers", &trainers.to_string(), "--job", &job])
        .args(["--max-uploads", &max_uploads.to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let values: Vec<f32> = (0..params).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let mut model = fledge_channel::Tensors::new();
    model.insert("w", fledge_channel::Tensor::from_f32(vec![params], &values)?);
    drop(values);
    let env = BackendEnv {
        mqtt: loaded_mqtt("127.0.0.1", broker.addr().port()),
        max_message_bytes: 1 << 30,
        ..BackendEnv::default()
    };
    let mut set = tokio::task::JoinSet::new();
    for config in configs.into_iter().skip(1) {
        set.spawn(echo_trainer(config, env.clone(), model.clone()));
    }
    let output = tokio::time::timeout(Duration::from_secs(600), child.wait_with_output())
        .await
        .context("memory benchmark aggregator did not finish in 600 s")??;
    while let Some(res) = set.join_next().await {
        res??;
    }
    if !output.status.success() {
        bail!("memory benchmark aggregator failed with {}", output.status);
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("bad child output {line:?}"))?;
    v["vmHwm"].as_u64().context("child printed no vmHwm")
}

/// The memory target: aggregator peak RSS at most this many model sizes.
const MEMORY_BOUND_MODELS: f64 = 3.0;

async fn memory(params: usize) -> anyhow::Result<Vec<Row>> {
    let model_bytes = (params * 4) as f64;
    let mut rows = Vec::new();
    // maxConcurrentUploads 1 first: the setting the target is met with; then the others, so
    // that what they cost is in the table too.
    for (trainers, max_uploads) in [(10, 1), (100, 1), (10, 2), (100, 2), (10, 0)] {
        eprintln!(
            "memory: aggregator peak RSS, {params} parameters, {trainers} trainers, maxConcurrentUploads {max_uploads} ..."
        );
        let limit = match max_uploads {
            0 => "unlimited".to_owned(),
            1 => "1 (target setting; the default for this model)".to_owned(),
            n => n.to_string(),
        };
        let name = format!(
            "aggregator peak RSS, {trainers} trainers, {} M params, uploads {limit}",
            params / 1_000_000
        );
        let res = tokio::time::timeout(
            Duration::from_secs(300),
            memory_run(params, trainers, max_uploads),
        )
        .await;
        let hwm = match res {
            Ok(Ok(hwm)) => hwm as f64,
            Ok(Err(e)) => {
                eprintln!("memory run with {trainers} trainers failed: {e:#}");
                f64::NAN
            }
            Err(_) => {
                eprintln!("memory run with {trainers} trainers stalled for 300 s; abandoned");
                f64::NAN
            }
        };
        eprintln!("  peak RSS {:.1} MB = {:.2}x the model", hwm / 1e6, hwm / model_bytes);
        // The bound is the target, 3x the model size: a ratio <= 1 meets it.
        let bound = MEMORY_BOUND_MODELS * model_bytes;
        rows.push(Row {
            name,
            value: hwm / 1e6,
            unit: "MB",
            bound: bound / 1e6,
            ratio: hwm / bound,
        });
    }
    Ok(rows)
}

fn data_dir() -> anyhow::Result<PathBuf> {
    let here = PathBuf::from("examples/data");
    let dir = if here.is_dir() {
        here
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/data")
    };
    std::fs::canonicalize(&dir)
        .with_context(|| format!("MNIST data not found at {}", dir.display()))
}

async fn round() -> anyhow::Result<Vec<Row>> {
    eprintln!("round: 10-trainer MNIST job over MQTT, 3 rounds x 1 epoch ...");
    let broker =
        fledge_channel::broker::start_embedded_broker((std::net::Ipv4Addr::LOCALHOST, 0).into())?;
    let data = data_dir()?;
    let trainers = 10;
    let mut plan = JobPlan::local(
        "bench-round",
        (0..trainers)
            .map(|i| DatasetUrl::for_shard(&data, i, trainers, Partition::Iid, 0))
            .collect(),
    );
    plan.backend = Backend::Mqtt;
    plan.brokers = vec![broker.addr().to_string()];
    plan.hyperparameters = serde_json::json!({"rounds": 3, "epochs": 1, "minTrainers": trainers})
        .as_object()
        .cloned()
        .expect("literal object");
    let dir = tempfile::tempdir()?;
    let opts = RunOptions {
        workdir: dir.path().to_path_buf(),
        backend_env: BackendEnv {
            mqtt: MqttConfig::new("127.0.0.1", broker.addr().port()),
            ..BackendEnv::default()
        },
        ..RunOptions::default()
    };
    let report = simulate_with(&plan, MnistFactory::shared(), opts)
        .await
        .map_err(|e| anyhow::anyhow!(fledge_sdk::runner::error_chain(&e)))?;
    // Per round: aggregator wall time (its tasklets) and the slowest trainer's train time.
    let mut slowest: BTreeMap<u64, f64> = BTreeMap::new();
    for run in report.others.values().flatten() {
        for r in &run.history {
            let t = r.metrics.get("seconds.train").copied().unwrap_or(0.0);
            let e = slowest.entry(r.round).or_default();
            *e = e.max(t);
        }
    }
    let mut overhead = Vec::new();
    let mut compute = Vec::new();
    for r in &report.top.history {
        let wall: f64 = ["select", "distribute", "aggregate"]
            .iter()
            .map(|k| r.metrics.get(&format!("seconds.{k}")).copied().unwrap_or(0.0))
            .sum();
        let c = slowest.get(&r.round).copied().unwrap_or(0.0);
        overhead.push(wall - c);
        compute.push(c);
    }
    // Round 1 includes the trainers' start-up; report the steady rounds.
    let steady = overhead.len().saturating_sub(1).max(1);
    let skip = overhead.len() - steady;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (o, c) = (mean(&overhead[skip..]), mean(&compute[skip..]));
    Ok(vec![Row {
        name: "mnist round overhead, 10 trainers (wall - slowest compute)".to_owned(),
        value: o,
        unit: "s",
        bound: c,
        ratio: o / c.max(1e-9),
    }])
}
