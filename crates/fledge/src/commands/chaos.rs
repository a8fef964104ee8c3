//! `fledge bench chaos`: a three-tier MNIST job under injected faults, against the same job
//! without them, in one invocation.
//!
//! It starts `fledge standalone` (this binary) on a fixed base port in a scratch data
//! directory, runs the example job (default `examples/hierarchical-mnist`) once to the end
//! without faults, then again while it injects faults one after the other, at moments drawn
//! from a seeded generator (`--seed`): SIGKILL of a trainer, a middle aggregator or the top
//! aggregator (the task's whole process group), of a fledgelet alone, or of the control plane
//! itself (`fledge standalone`, with its embedded broker), which is then started again on the
//! same data directory and ports. Every role restarts on failure for this run
//! (`restartPolicy`, 100 restarts each), so every fault is one the platform must absorb.
//!
//! After each fault it waits for recovery: the victim runs again (its restart count went up,
//! or for the control plane the API answers) and the top aggregator has recorded a round it
//! had not before the fault. The table lists each fault, what it hit, whether it recovered, the
//! seconds that took, and the rounds redone (each restart of the top aggregator redoes the
//! round it died in); below it, the final global accuracy of both runs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use fledge_types::{JobState, MetricRecord, Task, TaskState};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Options of the chaos run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The example job directory (three tiers: `trainer`, `middle-aggregator`, `top-aggregator`).
    pub example: PathBuf,
    /// Rounds of the job.
    pub rounds: u64,
    /// Faults to inject (fewer if the job ends first).
    pub faults: usize,
    /// Seed of the fault schedule.
    pub seed: u64,
}

const TOP: &str = "top-aggregator";
const MIDDLE: &str = "middle-aggregator";
const TRAINER: &str = "trainer";

/// A fault the run injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Trainer,
    MiddleAggregator,
    TopAggregator,
    Fledgelet,
    ControlPlane,
}

impl Fault {
    const ALL: [Fault; 5] = [
        Fault::Trainer,
        Fault::MiddleAggregator,
        Fault::TopAggregator,
        Fault::Fledgelet,
        Fault::ControlPlane,
    ];

    fn label(self) -> &'static str {
        match self {
            Fault::Trainer => "kill -9 trainer",
            Fault::MiddleAggregator => "kill -9 middle aggregator",
            Fault::TopAggregator => "kill -9 top aggregator",
            Fault::Fledgelet => "kill -9 fledgelet",
            Fault::ControlPlane => "kill -9 control plane + broker",
        }
    }
}

/// One injected fault and what it cost.
struct Injected {
    at: f64,
    fault: Fault,
    target: String,
    recovered: bool,
    seconds: f64,
    rounds_redone: u32,
}

/// `fledge standalone` as a child process.
struct Plane {
    child: Child,
    port: u16,
    dir: PathBuf,
    endpoint: String,
    token: String,
}

impl Plane {
    fn start(dir: &Path, port: u16) -> anyhow::Result<Plane> {
        use std::io::{BufRead, BufReader};
        let exe = std::env::current_exe().context("locating the fledge binary")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("standalone.log"))
            .context("opening standalone.log")?;
        let mut child = Command::new(exe)
            .args(["standalone", "--port", &port.to_string(), "--data-dir"])
            .arg(dir.join("data"))
            .arg("--cli-config")
            .arg(dir.join("cli.yaml"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting fledge standalone")?;
        let stdout = child.stdout.take().context("standalone's stdout")?;
        let (mut endpoint, mut token) = (None, None);
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading standalone's output")?;
            if let Some(v) = line.strip_prefix("endpoint: ") {
                endpoint = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("token: ") {
                token = Some(v.to_owned());
            } else if line == "ready" {
                break;
            }
        }
        match (endpoint, token) {
            (Some(endpoint), Some(token)) => {
                Ok(Plane { child, port, dir: dir.to_owned(), endpoint, token })
            }
            _ => bail!(
                "fledge standalone did not start; see {}",
                dir.join("standalone.log").display()
            ),
        }
    }

    fn crash_and_restart(mut self) -> anyhow::Result<Plane> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        Plane::start(&self.dir.clone(), self.port)
    }

    fn client(&self) -> anyhow::Result<fledge_client::Client> {
        let ca = fledge_client::Ca::load(&self.dir.join("data").join("tls").join("ca.pem"))?;
        Ok(fledge_client::Client::new(&self.endpoint, Some(&self.token))?.with_ca(Some(&ca))?)
    }

    fn fledgectl(&self) -> Command {
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("fledge"));
        let mut command = Command::new(exe.with_file_name("fledgectl"));
        command.env("FLEDGE_CONFIG", self.dir.join("cli.yaml"));
        command
    }

    async fn job(&self, id: &str) -> anyhow::Result<(JobState, Vec<Task>, Vec<MetricRecord>)> {
        let client = self.client()?;
        let id = id.into();
        let job = client.get_job(&id).await?;
        Ok((job.state, client.list_tasks(&id).await?, client.job_metrics(&id).await?))
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the chaos benchmark and prints its table.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    if opts.faults == 0 || opts.faults > 1000 {
        bail!("--faults must be between 1 and 1000, got {}", opts.faults);
    }
    if !(2..=10_000).contains(&opts.rounds) {
        bail!("--rounds must be between 2 and 10000, got {}", opts.rounds);
    }
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    let job_dir = scratch.path().join("job");
    prepare_job(&opts.example, &job_dir, opts.rounds)?;
    let port = free_base_port()?;
    let mut plane = Plane::start(scratch.path(), port)?;

    eprintln!("chaos: fault-free run of {} rounds ...", opts.rounds);
    let started = Instant::now();
    let out = plane.fledgectl().arg("run").arg(&job_dir).output().context("running fledgectl")?;
    let output =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("the fault-free job failed:\n{output}");
    }
    let clean_seconds = started.elapsed().as_secs_f64();
    let clean_job = output
        .lines()
        .find_map(|l| l.strip_prefix("created job "))
        .and_then(|l| l.split_whitespace().next())
        .context("no job id in fledgectl's output")?
        .to_owned();
    let (_, _, records) = plane.job(&clean_job).await?;
    let clean_accuracy = final_accuracy(&records)?;

    eprintln!("chaos: the same job with {} faults (seed {}) ...", opts.faults, opts.seed);
    let mut run = plane
        .fledgectl()
        .arg("run")
        .arg(&job_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("running fledgectl")?;
    let started = Instant::now();
    let job = newest_job_but(&plane, &clean_job).await?;
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut injected = Vec::new();
    while injected.len() < opts.faults {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
        let (state, tasks, records) = plane.job(&job).await?;
        if state.is_final() {
            break;
        }
        let fault = Fault::ALL[rng.random_range(0..Fault::ALL.len())];
        let before_round = last_round(&records);
        let top_restarts = restarts_of(&tasks, TOP);
        let at = started.elapsed().as_secs_f64();
        let t0 = Instant::now();
        let (target, victim) = match fault {
            Fault::ControlPlane => {
                plane = plane.crash_and_restart()?;
                ("fledge standalone".to_owned(), None)
            }
            _ => {
                let role = match fault {
                    Fault::Trainer => Some(TRAINER),
                    Fault::MiddleAggregator => Some(MIDDLE),
                    Fault::TopAggregator => Some(TOP),
                    _ => None,
                };
                let running: Vec<&Task> = tasks
                    .iter()
                    .filter(|t| t.state == TaskState::Running)
                    .filter(|t| role.is_none_or(|r| t.role == r))
                    .collect();
                if running.is_empty() {
                    continue;
                }
                let task = running[rng.random_range(0..running.len())];
                let work = scratch.path().join("data/work").join(&job).join(task.task_id.as_str());
                if !kill_worker(&work, fault == Fault::Fledgelet) {
                    continue;
                }
                (
                    format!("{} {}", task.role, task.task_id),
                    Some((task.task_id.clone(), task.restarts)),
                )
            }
        };
        eprintln!("chaos: {:>6.1}s {} ({target})", at, fault.label());
        let recovered = wait_recovered(&plane, &job, before_round, victim.as_ref()).await;
        let (_, tasks, _) = plane.job(&job).await?;
        injected.push(Injected {
            at,
            fault,
            target,
            recovered,
            seconds: t0.elapsed().as_secs_f64(),
            rounds_redone: restarts_of(&tasks, TOP).saturating_sub(top_restarts),
        });
        if !recovered {
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let (state, _, records) = loop {
        let (state, tasks, records) = plane.job(&job).await?;
        if state.is_final() {
            break (state, tasks, records);
        }
        if Instant::now() > deadline {
            bail!("the chaos job did not end within 10 minutes of the last fault");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let _ = run.kill();
    let _ = run.wait();
    let chaos_seconds = started.elapsed().as_secs_f64();
    print_report(
        &injected,
        state,
        &records,
        opts.rounds,
        clean_accuracy,
        clean_seconds,
        chaos_seconds,
    )
}

/// Copies the example to `to` with `rounds`, absolute data URLs and a restart policy under
/// which every role comes back (the faults are the point).
fn prepare_job(example: &Path, to: &Path, rounds: u64) -> anyhow::Result<()> {
    let data = example
        .join("../data")
        .canonicalize()
        .with_context(|| format!("{}/../data (the MNIST files)", example.display()))?;
    copy_dir(example, to)?;
    for entry in std::fs::read_dir(to)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if name.starts_with("dataset-") || name == "modelSpec.json" {
            let text = std::fs::read_to_string(&path)?;
            std::fs::write(
                &path,
                text.replace("file:../data", &format!("file://{}", data.display())),
            )?;
        }
    }
    let edit = |file: &str, f: &dyn Fn(&mut serde_json::Value)| -> anyhow::Result<()> {
        let path = to.join(file);
        let mut value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path)?)
                .with_context(|| format!("parsing {}", path.display()))?;
        f(&mut value);
        std::fs::write(&path, serde_json::to_string_pretty(&value)?)?;
        Ok(())
    };
    edit("modelSpec.json", &|spec| spec["hyperparameters"]["rounds"] = rounds.into())?;
    edit("job.json", &|job| {
        job["maxRunTime"] = 3600.into();
        job["restartPolicy"] = serde_json::json!({
            TRAINER: {"policy": "onFailure", "maxRestarts": 100},
            MIDDLE: {"policy": "onFailure", "maxRestarts": 100},
            TOP: {"policy": "onFailure", "maxRestarts": 100},
        });
    })
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// SIGKILLs the worker in `work_dir`: its fledgelet alone, or its whole process group.
fn kill_worker(work_dir: &Path, fledgelet_only: bool) -> bool {
    #[derive(serde::Deserialize)]
    struct Record {
        pid: i32,
    }
    let Ok(text) = std::fs::read_to_string(work_dir.join("worker.json")) else {
        return false;
    };
    let Ok(record) = serde_json::from_str::<Record>(&text) else {
        return false;
    };
    let target = if fledgelet_only { record.pid } else { -record.pid };
    Command::new("kill").args(["-9", "--", &target.to_string()]).status().is_ok_and(|s| s.success())
}

/// Waits (at most two minutes) until the top aggregator records a round after `before` and
/// the victim, if any, runs again.
async fn wait_recovered(
    plane: &Plane,
    job: &str,
    before: u64,
    victim: Option<&(fledge_types::TaskId, u32)>,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok((state, tasks, records)) = plane.job(job).await else {
            continue;
        };
        if state == JobState::Completed {
            return true;
        }
        if state.is_final() {
            return false;
        }
        let victim_back = victim.is_none_or(|(id, restarts)| {
            tasks.iter().any(|t| {
                &t.task_id == id && t.restarts > *restarts && t.state == TaskState::Running
            })
        });
        if victim_back && last_round(&records) > before {
            return true;
        }
    }
    false
}

async fn newest_job_but(plane: &Plane, other: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = plane.client()?.list_jobs(None).await?;
        if let Some(job) =
            jobs.into_iter().filter(|j| j.id.as_str() != other).max_by_key(|j| j.created_at)
        {
            return Ok(job.id.to_string());
        }
        if Instant::now() > deadline {
            bail!("the chaos job was not created");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn top_records(records: &[MetricRecord]) -> Vec<&MetricRecord> {
    let mut top: Vec<&MetricRecord> = records.iter().filter(|r| r.role == TOP).collect();
    top.sort_by_key(|r| r.round);
    top
}

fn last_round(records: &[MetricRecord]) -> u64 {
    top_records(records).last().map_or(0, |r| r.round)
}

fn final_accuracy(records: &[MetricRecord]) -> anyhow::Result<f64> {
    top_records(records)
        .last()
        .and_then(|r| r.metrics.get("global.accuracy").copied())
        .context("the top aggregator recorded no global accuracy")
}

fn restarts_of(tasks: &[Task], role: &str) -> u32 {
    tasks.iter().filter(|t| t.role == role).map(|t| t.restarts).sum()
}

fn print_report(
    injected: &[Injected],
    state: JobState,
    records: &[MetricRecord],
    rounds: u64,
    clean_accuracy: f64,
    clean_seconds: f64,
    chaos_seconds: f64,
) -> anyhow::Result<()> {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::ASCII_MARKDOWN);
    table.set_header([
        "#",
        "at (s)",
        "fault",
        "target",
        "recovered",
        "recovery (s)",
        "rounds redone",
    ]);
    for (i, f) in injected.iter().enumerate() {
        table.add_row([
            (i + 1).to_string(),
            format!("{:.1}", f.at),
            f.fault.label().to_owned(),
            f.target.clone(),
            if f.recovered { "yes" } else { "NO" }.to_owned(),
            format!("{:.1}", f.seconds),
            f.rounds_redone.to_string(),
        ]);
    }
    println!("{table}");
    let recovered = injected.iter().filter(|f| f.recovered).count();
    let redone: u32 = injected.iter().map(|f| f.rounds_redone).sum();
    let top = top_records(records);
    let recorded: Vec<u64> = top.iter().map(|r| r.round).collect();
    let once = recorded == (1..=rounds).collect::<Vec<_>>();
    let mut summary = comfy_table::Table::new();
    summary.load_preset(comfy_table::presets::ASCII_MARKDOWN);
    summary.set_header(["run", "job", "rounds recorded", "final global accuracy", "wall time (s)"]);
    summary.add_row([
        "fault-free".to_owned(),
        "completed".to_owned(),
        rounds.to_string(),
        format!("{clean_accuracy:.4}"),
        format!("{clean_seconds:.1}"),
    ]);
    let chaos_accuracy = final_accuracy(records).map_or("-".to_owned(), |a| format!("{a:.4}"));
    summary.add_row([
        format!("{} faults", injected.len()),
        state.to_string(),
        format!("{} ({})", recorded.len(), if once { "each once" } else { "NOT each once" }),
        chaos_accuracy,
        format!("{chaos_seconds:.1}"),
    ]);
    println!("{summary}");
    println!(
        "faults injected: {}, recovered: {recovered}, rounds redone: {redone}",
        injected.len()
    );
    if state != JobState::Completed || recovered < injected.len() || !once {
        bail!("the job did not absorb every fault (see the tables)");
    }
    Ok(())
}

/// A base port P with P..P+3 free on loopback (the ports `fledge standalone --port P` takes).
fn free_base_port() -> anyhow::Result<u16> {
    for _ in 0..200 {
        let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
        let base = probe.local_addr()?.port();
        drop(probe);
        if !(20_000..=65_000).contains(&base) {
            continue;
        }
        if (0..4).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return Ok(base);
        }
    }
    bail!("no four free consecutive ports on loopback")
}
