//! Multi-host for real, on Docker networks of the machine's engine, with the Fledge image of
//! the binary under test (`fledge image build`):
//!
//! - network `core`: the control plane (`fledge serve --services
//!   apiserver,notifier,controller,metaserver`) and the broker (`fledge serve --services
//!   broker`, the same TLS identity and store), each also attached to both site networks
//!   under the names `fledge-cp` and `fledge-broker`, which is all the sites know of them;
//! - networks `site-a` and `site-b`: one container each, a compute agent (`fledge serve
//!   --services deployer`, process platform: its workers are processes of the site's
//!   container, so they see exactly the site's network). Site A is compute `site-a` (region
//!   `default/eu/uk`: the UK trainer of `examples/hierarchical-mnist`), site B is compute
//!   `default` (every other trainer and the aggregators).
//!
//! Then the partitions:
//! 1. Site A is cut off mid-job (`docker network disconnect`): its trainer is failed by the
//!    controller's heartbeat timeout (set low here) and the job completes with the others.
//!    Reconnected, site A runs its trainer of a new job, which completes.
//! 2. The control plane is cut off from both sites for a while mid-job (the broker stays): the
//!    data plane goes on (rounds are measured while it is away), and the job completes with
//!    every task.
//!
//! Skipped, with a message, when no Docker daemon is reachable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fledge_types::{ComputeId, ComputeSpec, JobState, Platform, TaskState};

use support::containers::{
    build_fledge_image, docker, docker_ok, docker_reachable, read_when_there, unique, wait_for,
};
use support::{copy_example, records_of, repo_root};

const IMAGE: &str = "fledge:multihost-test";
/// The controller's heartbeat timeout in this test (seconds): short, so that a cut-off site's
/// tasks are failed soon; longer than the control plane's own cut below.
const HEARTBEAT_TIMEOUT_SECS: u64 = 30;
/// How long the control plane stays cut off from the sites.
const CONTROL_PLANE_CUT: Duration = Duration::from_secs(12);

/// Containers and networks of one run, removed on drop (also after a failed assertion).
struct Cluster {
    id: String,
    containers: Vec<String>,
    networks: Vec<String>,
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for container in self.containers.iter().rev() {
            let _ = docker(&["rm", "-f", "-v", container]);
        }
        for network in &self.networks {
            let _ = docker(&["network", "rm", network]);
        }
    }
}

impl Cluster {
    fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.id)
    }

    fn network(&mut self, what: &str) -> String {
        let name = self.name(what);
        docker_ok(&["network", "create", "--label", &format!("fledge.test={}", self.id), &name]);
        self.networks.push(name.clone());
        name
    }

    /// `docker run -d` of the Fledge image on `network` (named `what`), with `args`.
    fn run(&mut self, what: &str, network: &str, docker_args: &[String], args: &[&str]) -> String {
        let name = self.name(what);
        let mut all: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            name.clone(),
            "--label".into(),
            format!("fledge.test={}", self.id),
            "--network".into(),
            network.into(),
        ];
        all.extend(docker_args.iter().cloned());
        all.push(IMAGE.into());
        all.extend(args.iter().map(|s| (*s).to_owned()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        docker_ok(&refs);
        self.containers.push(name.clone());
        name
    }

    fn logs(&self, container: &str) -> String {
        let out = Command::new("docker").args(["logs", "--tail", "80", container]).output();
        out.map(|o| {
            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
        })
        .unwrap_or_default()
    }

    /// The container's whole output.
    fn logs_all(&self, container: &str) -> String {
        let out = Command::new("docker").args(["logs", container]).output();
        out.map(|o| {
            format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
        })
        .unwrap_or_default()
    }

    fn all_logs(&self) -> String {
        self.containers.iter().map(|c| format!("--- {c}\n{}", self.logs(c))).collect()
    }

    fn scratch(&self) -> &Path {
        self.dir.path()
    }
}

/// A job directory: `example` copied with absolute dataset paths, `rounds` rounds and design
/// `design`.
fn job_dir(scratch: &Path, example: &str, design: &str, rounds: u64) -> PathBuf {
    let dir = scratch.join(design);
    copy_example(example, &dir);
    let spec_path = dir.join("modelSpec.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&spec_path).unwrap()).unwrap();
    spec["hyperparameters"]["rounds"] = rounds.into();
    std::fs::write(&spec_path, serde_json::to_string_pretty(&spec).unwrap()).unwrap();
    let job_path = dir.join("job.json");
    let mut job: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&job_path).unwrap()).unwrap();
    job["designId"] = design.into();
    std::fs::write(&job_path, serde_json::to_string_pretty(&job).unwrap()).unwrap();
    dir
}

struct Ctl {
    cli_config: PathBuf,
}

impl Ctl {
    fn command(&self) -> Command {
        let path = Path::new(env!("CARGO_BIN_EXE_fledge")).with_file_name("fledgectl");
        assert!(path.exists(), "{} is missing: build the workspace first", path.display());
        let mut command = Command::new(path);
        command.env("FLEDGE_CONFIG", &self.cli_config);
        command
    }

    /// `fledgectl run DIR` in the background, its output in `DIR.log`.
    fn spawn_run(&self, dir: &Path) -> Child {
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        self.command()
            .arg("run")
            .arg(dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    }
}

/// The job `fledgectl run DIR` created (from its log), once it printed it.
fn job_of(dir: &Path) -> String {
    let log = dir.with_extension("log");
    let mut id = String::new();
    wait_for("fledgectl run to create its job", Duration::from_secs(120), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(found) = text
            .lines()
            .find_map(|l| l.strip_prefix("created job "))
            .and_then(|l| l.split_whitespace().next())
        {
            id = found.to_owned();
        }
        !id.is_empty()
    });
    id
}

/// Waits (bounded) for `child` to exit; returns whether it succeeded.
fn wait_child(child: &mut Child, limit: Duration) -> bool {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.success();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sites_on_their_own_networks_survive_partitions() {
    if !docker_reachable() {
        return;
    }
    let took = build_fledge_image(IMAGE);
    eprintln!("fledge image build: {took:.1?}");
    let mut cluster = Cluster {
        id: unique("fledgemh"),
        containers: Vec::new(),
        networks: Vec::new(),
        dir: tempfile::tempdir().unwrap(),
    };
    let data_dir = cluster.scratch().join("control-plane");
    std::fs::create_dir_all(&data_dir).unwrap();
    let data = data_dir.display().to_string();
    let datasets = repo_root().join("examples/data").canonicalize().unwrap();
    let datasets_mount = format!("{0}:{0}:ro", datasets.display());
    let core = cluster.network("core");
    let site_a_net = cluster.network("site-a");
    let site_b_net = cluster.network("site-b");

    // The control plane: its data directory (store, TLS, secrets) is a host directory the
    // broker shares; only the apiserver is published, on the host's loopback, for the test.
    let common_env = |extra: &[(&str, String)]| -> Vec<String> {
        let mut env = vec![
            ("FLEDGE_TLS_NAMES", "fledge-cp,fledge-broker".to_owned()),
            ("FLEDGE_BROKER_ADVERTISE", "mqtts://fledge-broker:1883".to_owned()),
            ("FLEDGE_LOG", "info,rumqttd=off".to_owned()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        env.into_iter().flat_map(|(k, v)| ["-e".to_owned(), format!("{k}={v}")]).collect()
    };
    let mut cp_args = common_env(&[
        ("FLEDGE_APISERVER_ADVERTISE", "https://fledge-cp:10100".to_owned()),
        ("FLEDGE_NOTIFIER_ADVERTISE", "https://fledge-cp:10101".to_owned()),
        ("FLEDGE_METASERVER_ADVERTISE", "https://fledge-cp:10104".to_owned()),
        ("FLEDGE_CONTROLLER_HEARTBEAT_TIMEOUT_SECS", HEARTBEAT_TIMEOUT_SECS.to_string()),
    ]);
    cp_args.extend(
        ["--network-alias", "fledge-cp", "-p", "127.0.0.1::10100", "-v"]
            .map(str::to_owned)
            .into_iter()
            .chain([format!("{data}:{data}")]),
    );
    let cp = cluster.run(
        "cp",
        &core,
        &cp_args,
        &[
            "serve",
            "--services",
            "apiserver,notifier,controller,metaserver",
            "--data-dir",
            &data,
            "--apiserver-listen",
            "0.0.0.0:10100",
            "--notifier-listen",
            "0.0.0.0:10101",
            "--metaserver-listen",
            "0.0.0.0:10104",
        ],
    );
    let token = read_when_there(&data_dir.join("admin.token"), Duration::from_secs(120));
    // The broker, started once the CA exists (the two would otherwise both create one).
    let mut broker_args = common_env(&[]);
    broker_args.extend(
        ["--network-alias", "fledge-broker", "-v"]
            .map(str::to_owned)
            .into_iter()
            .chain([format!("{data}:{data}")]),
    );
    let broker = cluster.run(
        "broker",
        &core,
        &broker_args,
        &["serve", "--services", "broker", "--data-dir", &data, "--broker-listen", "0.0.0.0:1883"],
    );
    for net in [&site_a_net, &site_b_net] {
        docker_ok(&["network", "connect", "--alias", "fledge-cp", net, &cp]);
        docker_ok(&["network", "connect", "--alias", "fledge-broker", net, &broker]);
    }
    let port = docker_ok(&["port", &cp, "10100/tcp"]);
    let port = port.lines().next().unwrap().rsplit(':').next().unwrap().to_owned();
    let endpoint = format!("https://127.0.0.1:{port}");
    let ca_path = data_dir.join("tls/ca.pem");
    let ctl = Ctl { cli_config: cluster.scratch().join("cli.yaml") };
    wait_for("fledgectl login", Duration::from_secs(120), || {
        ctl.command()
            .args(["login", "--server", &endpoint, "--ca"])
            .arg(&ca_path)
            .args(["--login-token", &token])
            .output()
            .unwrap()
            .status
            .success()
    });
    let client = fledge_client::Client::new(&endpoint, Some(&token))
        .unwrap()
        .with_ca(Some(&fledge_client::Ca::load(&ca_path).unwrap()))
        .unwrap();

    // Two sites, each registered as a compute whose key only its agent holds.
    let mut sites = Vec::new();
    for (what, compute, region, net) in [
        ("site-a", "site-a", "default/eu/uk", &site_a_net),
        ("site-b", "default", "default", &site_b_net),
    ] {
        let key = format!("{:032x}", rand::random::<u128>());
        client
            .create_compute(&ComputeSpec {
                compute_id: ComputeId::new(compute),
                region: region.to_owned(),
                api_key: key.clone(),
                platform: Platform::Process,
            })
            .await
            .unwrap();
        let key_file = cluster.scratch().join(format!("{what}.key"));
        std::fs::write(&key_file, &key).unwrap();
        let args: Vec<String> = [
            ("FLEDGE_DEPLOYER_COMPUTE_ID", compute.to_owned()),
            ("FLEDGE_DEPLOYER_API_KEY_FILE", "/etc/fledge/compute.key".to_owned()),
            ("FLEDGE_DEPLOYER_APISERVER", "https://fledge-cp:10100".to_owned()),
            ("FLEDGE_DEPLOYER_NOTIFIER", "https://fledge-cp:10101".to_owned()),
            ("FLEDGE_DEPLOYER_CA_FILE", "/etc/fledge/ca.pem".to_owned()),
            // The notifier client's subscriptions are logged at debug.
            ("FLEDGE_LOG", "info,fledge_client=debug".to_owned()),
        ]
        .into_iter()
        .flat_map(|(k, v)| ["-e".to_owned(), format!("{k}={v}")])
        .chain([
            "-v".to_owned(),
            format!("{}:/etc/fledge/compute.key:ro", key_file.display()),
            "-v".to_owned(),
            format!("{}:/etc/fledge/ca.pem:ro", ca_path.display()),
            "-v".to_owned(),
            datasets_mount.clone(),
        ])
        .collect();
        let container = cluster.run(
            what,
            net,
            &args,
            &["serve", "--services", "deployer", "--data-dir", "/var/lib/fledge-site"],
        );
        sites.push((container, net.clone()));
    }
    let (site_a, site_a_net) = sites[0].clone();

    // 1. A hierarchical job with trainers at both sites; site A is cut off mid-job.
    let dir = job_dir(cluster.scratch(), "hierarchical-mnist", "mh-cut-site", 40);
    let mut run = ctl.spawn_run(&dir);
    let job = job_of(&dir);
    let id = job.as_str().into();
    let rounds_of =
        |records: &[fledge_types::MetricRecord]| records_of(records, "top-aggregator").len();
    let deadline = Instant::now() + Duration::from_secs(300);
    let at_cut = loop {
        let rounds = rounds_of(&client.job_metrics(&id).await.unwrap());
        if rounds >= 2 {
            break rounds;
        }
        assert!(Instant::now() < deadline, "job 1 made no 2 rounds:\n{}", cluster.all_logs());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let tasks = client.list_tasks(&id).await.unwrap();
    let uk = tasks
        .iter()
        .find(|t| t.compute_id.as_str() == "site-a")
        .unwrap_or_else(|| panic!("no task on site-a: {tasks:?}"))
        .clone();
    assert_eq!(uk.role, "trainer", "{uk:?}");
    docker_ok(&["network", "disconnect", &site_a_net, &site_a]);
    let cut = Instant::now();
    eprintln!("partition 1: site A cut off after round {at_cut} of job {job}");
    let dropped = loop {
        let task = client.get_task(&id, &uk.task_id).await.unwrap();
        if task.state.is_final() {
            break task;
        }
        assert!(
            cut.elapsed() < Duration::from_secs(300),
            "site A's trainer was never dropped: {task:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!(
        "partition 1: site A's trainer {} {:?} {:.1?} after the cut: {}",
        dropped.task_id,
        dropped.state,
        cut.elapsed(),
        dropped.log.lines().last().unwrap_or_default()
    );
    assert_eq!(dropped.state, TaskState::Failed, "{dropped:?}");
    let ok = wait_child(&mut run, Duration::from_secs(900));
    let job1 = client.get_job(&id).await.unwrap();
    let tasks = client.list_tasks(&id).await.unwrap();
    let records = client.job_metrics(&id).await.unwrap();
    assert!(
        ok && job1.state == JobState::Completed,
        "job 1 did not complete without site A: {job1:?}\n{tasks:?}\n{}",
        cluster.all_logs()
    );
    for task in tasks.iter().filter(|t| t.task_id != uk.task_id) {
        assert_eq!(task.state, TaskState::Completed, "{task:?}");
    }
    let top = records_of(&records, "top-aggregator");
    assert_eq!(top.len(), 40, "every round recorded once");
    let accuracy = top[39].metrics["global.accuracy"];
    eprintln!("partition 1: job {job} completed without site A, global.accuracy {accuracy:.4}");
    assert!(accuracy > 0.8, "accuracy without site A: {accuracy}");

    // Site A reconnected: its agent subscribes to the notifier again (the dead stream ended by
    // its keepalive), and a new job runs its trainer there.
    let subscriptions = || cluster.logs_all(&site_a).matches("subscribed to the notifier").count();
    let before = subscriptions();
    docker_ok(&["network", "connect", &site_a_net, &site_a]);
    let took = wait_for("site A's agent to subscribe again", Duration::from_secs(180), || {
        subscriptions() > before
    });
    eprintln!("reconnected: site A's agent subscribed again {took:.1?} after the reconnect");
    let dir = job_dir(cluster.scratch(), "hierarchical-mnist", "mh-reconnected", 3);
    let mut run = ctl.spawn_run(&dir);
    let job = job_of(&dir);
    let id = job.as_str().into();
    let ok = wait_child(&mut run, Duration::from_secs(600));
    let job2 = client.get_job(&id).await.unwrap();
    let tasks = client.list_tasks(&id).await.unwrap();
    assert!(
        ok && job2.state == JobState::Completed,
        "job 2 after the reconnect: {job2:?}\n{tasks:?}\n{}",
        cluster.all_logs()
    );
    let uk = tasks.iter().find(|t| t.compute_id.as_str() == "site-a").unwrap();
    assert_eq!(uk.state, TaskState::Completed, "site A's trainer of the new job: {uk:?}");
    eprintln!("reconnected: job {job} completed with site A's trainer {}", uk.task_id);

    // 2. The control plane is cut off from both sites mid-job; the broker is not.
    let dir = job_dir(cluster.scratch(), "hierarchical-mnist", "mh-cut-cp", 30);
    let mut run = ctl.spawn_run(&dir);
    let job = job_of(&dir);
    let id = job.as_str().into();
    let deadline = Instant::now() + Duration::from_secs(300);
    while rounds_of(&client.job_metrics(&id).await.unwrap()) < 2 {
        assert!(Instant::now() < deadline, "job 3 made no 2 rounds:\n{}", cluster.all_logs());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let from = chrono::Utc::now();
    for net in [&site_a_net, &site_b_net] {
        docker_ok(&["network", "disconnect", net, &cp]);
    }
    std::thread::sleep(CONTROL_PLANE_CUT);
    for net in [&site_a_net, &site_b_net] {
        docker_ok(&["network", "connect", "--alias", "fledge-cp", net, &cp]);
    }
    let to = chrono::Utc::now();
    let ok = wait_child(&mut run, Duration::from_secs(900));
    let job3 = client.get_job(&id).await.unwrap();
    let tasks = client.list_tasks(&id).await.unwrap();
    assert!(
        ok && job3.state == JobState::Completed,
        "job 3 after the control plane's cut: {job3:?}\n{tasks:?}\n{}",
        cluster.all_logs()
    );
    assert!(tasks.iter().all(|t| t.state == TaskState::Completed), "{tasks:?}");
    let top = records_of(&client.job_metrics(&id).await.unwrap(), "top-aggregator");
    assert_eq!(top.len(), 30, "every round recorded once");
    let during: Vec<u64> = top
        .iter()
        .filter(|r| r.timestamp.is_some_and(|t| t > from && t < to))
        .map(|r| r.round)
        .collect();
    eprintln!(
        "partition 2: rounds measured while the control plane was cut off: {during:?}; \
         global.accuracy {:.4}",
        top[29].metrics["global.accuracy"]
    );
    assert!(!during.is_empty(), "no round was made while the control plane was away: {top:?}");
}
