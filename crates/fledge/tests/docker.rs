//! The `docker` deployer end to end, on the machine's Docker Engine: `fledge image build` makes
//! the worker image from the `fledge` binary under test (nothing pulled), `fledge standalone`
//! listens on the Docker bridge's gateway (so that containers on their job networks reach it)
//! with compute `default` on the `docker` platform, and `fledgectl run` submits the jobs.
//!
//! Covered: the two-tier MNIST example completes in containers with the process deployer's
//! accuracy and leaves no container or network behind; a worker container killed from outside
//! is reported failed with its exit status, and stopping the job then revokes the other workers
//! and again leaves nothing.
//!
//! Skipped, with a message, when no Docker daemon is reachable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fledge_types::{JobState, TaskState};

use support::containers::{build_fledge_image, docker, docker_reachable};
use support::{Platform, copy_example, records_of, repo_root};

/// The image the tests build and run (rebuilt each run from the binary under test).
const IMAGE: &str = "fledge-worker:e2e-test";

/// A standalone platform on the bridge gateway whose compute runs workers in containers.
fn docker_platform(config_dir: &Path) -> Platform {
    build_fledge_image(IMAGE);
    let gateway = bridge_gateway();
    let data = repo_root().join("examples/data").canonicalize().unwrap();
    let config = config_dir.join("docker.toml");
    std::fs::write(
        &config,
        format!(
            "[deployer]\nplatform = \"docker\"\ndocker_image = \"{IMAGE}\"\n\
             docker_mounts = [\"{data}:{data}:ro\"]\nworker_cpus = 1.0\n\
             worker_memory_mib = 2048\n",
            data = data.display()
        ),
    )
    .unwrap();
    Platform::start_with(&[
        "--host".to_owned(),
        gateway,
        "--config".to_owned(),
        config.display().to_string(),
    ])
}

/// The address of the host on Docker's default bridge: its IPAM gateway when the engine
/// records one, else the bridge interface's address (`docker0`).
fn bridge_gateway() -> String {
    let first = |lines: Option<Vec<String>>| {
        lines.and_then(|lines| lines.into_iter().next()).filter(|line| !line.trim().is_empty())
    };
    if let Some(gateway) = first(docker(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
    ])) {
        return gateway.trim().to_owned();
    }
    let interface = first(docker(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{index .Options \"com.docker.network.bridge.name\"}}",
    ]))
    .unwrap_or_else(|| "docker0".to_owned());
    let out = Command::new("ip").args(["-4", "-o", "addr", "show", interface.trim()]).output();
    let text = out.map(|out| String::from_utf8_lossy(&out.stdout).into_owned()).unwrap_or_default();
    // `4: docker0    inet 172.17.0.1/16 brd ...`
    text.split_whitespace()
        .skip_while(|word| *word != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no address of the Docker bridge {interface}: {text}"))
}

/// The names of the containers, and of the networks, labelled with `label`.
fn leftovers(label: &str) -> (Vec<String>, Vec<String>) {
    let filter = format!("label={label}");
    let containers = docker(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"]).unwrap();
    let networks =
        docker(&["network", "ls", "--filter", &filter, "--format", "{{.Name}}"]).unwrap();
    (containers, networks)
}

/// Waits (bounded) until nothing labelled `label` is left; returns what is left at the end.
fn wait_until_gone(label: &str) -> (Vec<String>, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let left = leftovers(label);
        if (left.0.is_empty() && left.1.is_empty()) || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mnist_completes_in_containers_and_leaves_nothing_behind() {
    if !docker_reachable() {
        return;
    }
    let config = tempfile::tempdir().unwrap();
    let platform = docker_platform(config.path());
    let dir = platform.scratch().join("mnist");
    copy_example("mnist", &dir);
    let outcome = platform.run_dir(&dir);
    assert!(outcome.success, "fledgectl run mnist failed:\n{}", outcome.output);
    let (job, tasks, records) = platform.job(&outcome.job).await;
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    assert_eq!(tasks.len(), 5, "4 trainers and 1 aggregator");
    assert!(tasks.iter().all(|t| t.state == TaskState::Completed), "{tasks:?}");
    let rounds = records_of(&records, "aggregator");
    assert_eq!(rounds.len(), 20, "one aggregator record per round");
    let accuracy = rounds[19].metrics["global.accuracy"];
    // The process deployer's bound for the same job (tests/platform.rs).
    assert!(accuracy > 0.9, "two-tier accuracy after 20 rounds in containers: {accuracy}");
    eprintln!("docker deployer: mnist two-tier accuracy {accuracy:.4}");

    let left = wait_until_gone(&format!("fledge.job={}", job.id));
    assert_eq!(left, (Vec::new(), Vec::new()), "containers and networks of the job left");
    // The workers really ran in containers: their output is in the usual log file.
    let work = platform.data_dir().join("work").join(job.id.as_str());
    let trainer = tasks.iter().find(|t| t.role == "trainer").unwrap();
    let log =
        std::fs::read_to_string(work.join(trainer.task_id.as_str()).join("fledgelet.log")).unwrap();
    assert!(!log.is_empty(), "the container's output is copied into fledgelet.log");
    // No key file outlives its container (each goes before its job's network does).
    let keys: Vec<_> =
        std::fs::read_dir(work.join(".keys")).map(|d| d.collect()).unwrap_or_default();
    assert!(keys.is_empty(), "key files left: {keys:?}");
}

/// A hybrid job's trainers run their ring all-reduce over p2p between containers: each listens
/// on its container's addresses and advertises its name on the job network, which a worker
/// advertising its own loopback address (as before) could not do.
#[tokio::test(flavor = "multi_thread")]
async fn a_hybrid_jobs_p2p_ring_runs_between_containers_on_the_job_network() {
    if !docker_reachable() {
        return;
    }
    let config = tempfile::tempdir().unwrap();
    let platform = docker_platform(config.path());
    let dir = platform.scratch().join("hybrid-mnist");
    copy_example("hybrid-mnist", &dir);
    let outcome = platform.run_dir(&dir);
    assert!(outcome.success, "fledgectl run hybrid-mnist failed:\n{}", outcome.output);
    let (job, tasks, records) = platform.job(&outcome.job).await;
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    assert!(tasks.iter().all(|t| t.state == TaskState::Completed), "{tasks:?}");
    let rounds = records_of(&records, "aggregator");
    assert_eq!(rounds.len(), 5, "one aggregator record per round: {rounds:?}");
    let work = platform.data_dir().join("work").join(job.id.as_str());
    let trainer = tasks.iter().find(|t| t.role == "trainer").unwrap();
    let log =
        std::fs::read_to_string(work.join(trainer.task_id.as_str()).join("task.log")).unwrap();
    assert!(
        log.contains(&format!("endpoint=https://{}:", trainer.task_id)),
        "the trainer's p2p end advertises its name on the job network:\n{log}"
    );
    let left = wait_until_gone(&format!("fledge.job={}", job.id));
    assert_eq!(left, (Vec::new(), Vec::new()), "containers and networks of the job left");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_container_is_reported_failed_and_stop_removes_the_rest() {
    if !docker_reachable() {
        return;
    }
    let config = tempfile::tempdir().unwrap();
    let platform = docker_platform(config.path());
    // Enough rounds that the job still runs when a trainer is killed and when it is stopped.
    let dir = platform.scratch().join("long");
    copy_example("mnist", &dir);
    let spec = dir.join("modelSpec.json");
    let text =
        std::fs::read_to_string(&spec).unwrap().replace("\"rounds\": 20", "\"rounds\": 5000");
    std::fs::write(&spec, text).unwrap();
    let job_json = dir.join("job.json");
    let text = std::fs::read_to_string(&job_json)
        .unwrap()
        .replace("\"designId\": \"mnist\"", "\"designId\": \"mnist-killed\"");
    std::fs::write(&job_json, text).unwrap();
    let mut run = platform
        .fledgectl()
        .arg("run")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();

    // Once all five workers run, kill one trainer's container from outside (bounded wait).
    let owner = format!("label=fledge.owner={}", platform.data_dir().join("work").display());
    let running = |role: &str| {
        let role = format!("label=fledge.role={role}");
        docker(&["ps", "--filter", &owner, "--filter", &role, "--format", "{{.Names}}"]).unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim = loop {
        let trainers = running("trainer");
        if trainers.len() == 4 && running("aggregator").len() == 1 {
            break trainers[0].clone();
        }
        assert!(Instant::now() < deadline, "the job's five containers did not come up");
        assert!(run.try_wait().unwrap().is_none(), "fledgectl run ended before the job ran");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let label = |key: &str| {
        docker(&[
            "inspect",
            "--format",
            &format!("{{{{index .Config.Labels \"{key}\"}}}}"),
            &victim,
        ])
        .and_then(|lines| lines.into_iter().next())
        .unwrap()
    };
    let (job_id, task_id) = (fledge_types::JobId::new(label("fledge.job")), label("fledge.task"));
    assert!(docker(&["kill", &victim]).is_some(), "docker kill {victim}");

    // The deployer reports it failed, with the exit status.
    let client = platform.client();
    let deadline = Instant::now() + Duration::from_secs(60);
    let killed = loop {
        let task = client.get_task(&job_id, &task_id.as_str().into()).await.unwrap();
        if task.state.is_final() || Instant::now() > deadline {
            break task;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(killed.state, TaskState::Failed, "{killed:?}");
    assert!(
        killed.log.contains("exit code 137 (SIGKILL)"),
        "the failure names the exit status: {killed:?}"
    );

    // Stopping the job revokes the other workers: their containers and the job's network go.
    client.stop_job(&job_id).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while run.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "fledgectl run did not end after the stop");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let job = client.get_job(&job_id).await.unwrap();
    assert!(job.state.is_final() && job.state != JobState::Completed, "{job:?}");
    let left = wait_until_gone(&format!("fledge.job={job_id}"));
    assert_eq!(left, (Vec::new(), Vec::new()), "containers and networks of the job left");
}
