//! The production install (`deploy/compose/docker-compose.yml`) for real, on the machine's
//! Docker Engine: the Fledge image from the binary under test (`fledge image build`), the
//! PostgreSQL and Mosquitto images built locally from the machine's packages
//! (`deploy/images/build-service-images.sh`: nothing can be pulled here), then
//! `docker-compose up -d` under a project name of its own, the admin token and the CA read from
//! the data directory, `fledgectl run examples/mnist` from the host against the published
//! port, and `docker-compose down -v`, after which nothing of the project is left.
//!
//! Skipped, with a message, when no Docker daemon is reachable, `docker-compose` is missing, or
//! the postgresql and mosquitto packages the service images are built from are not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fledge_types::{JobState, TaskState};

use support::containers::{
    build_fledge_image, build_service_images, docker, docker_reachable, free_port, read_when_there,
    unique, wait_for,
};
use support::{copy_example, records_of, repo_root};

const FLEDGE_IMAGE: &str = "fledge:install-test";
const POSTGRES_IMAGE: &str = "fledge-postgres:test";
const MOSQUITTO_IMAGE: &str = "fledge-mosquitto:test";

/// One `docker-compose` project of the production install; `down -v` on drop (also after a
/// failed assertion), and the workers of its compute removed.
struct Install {
    project: String,
    env: Vec<(String, String)>,
    home: PathBuf,
    api_port: u16,
    down: bool,
}

impl Install {
    fn compose(&self) -> Command {
        let mut command = Command::new("docker-compose");
        command
            .current_dir(repo_root().join("deploy/compose"))
            .args(["-p", &self.project, "-f", "docker-compose.yml"])
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    fn run(&self, args: &[&str]) -> String {
        let out = self.compose().args(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "docker-compose {}:\n{text}", args.join(" "));
        text
    }

    fn logs(&self) -> String {
        let out = self.compose().args(["logs", "--no-color", "--tail", "60"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn down(&mut self) {
        if !self.down {
            self.down = true;
            self.run(&["down", "-v", "--remove-orphans"]);
        }
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        if !self.down {
            let _ = self.compose().args(["down", "-v", "--remove-orphans"]).output();
        }
        // Workers the compute left if its control plane died before removing them.
        let owner = format!("label=fledge.owner={}", self.home.join("work").display());
        for container in docker(&["ps", "-aq", "--filter", &owner]).unwrap_or_default() {
            let _ = docker(&["rm", "-f", &container]);
        }
        for network in docker(&["network", "ls", "-q", "--filter", &owner]).unwrap_or_default() {
            let _ = docker(&["network", "rm", &network]);
        }
    }
}

/// A random secret (hex) in `dir/name`, mode 0600.
fn write_secret(dir: &Path, name: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    let secret: String = (0..24).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// The address of the host on Docker's default bridge (what workers on job networks reach
/// the published ports at).
fn bridge_gateway() -> String {
    let lines = docker(&[
        "network",
        "inspect",
        "bridge",
        "--format",
        "{{range .IPAM.Config}}{{.Gateway}}{{end}}",
    ])
    .unwrap_or_default();
    lines.into_iter().next().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()).unwrap_or_else(
        || {
            let out = Command::new("ip").args(["-4", "-o", "addr", "show", "docker0"]).output();
            let text =
                out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
            text.split_whitespace()
                .skip_while(|w| *w != "inet")
                .nth(1)
                .and_then(|cidr| cidr.split('/').next())
                .map(str::to_owned)
                .unwrap_or_else(|| panic!("no address of docker0: {text}"))
        },
    )
}

/// What the project left: containers, networks and volumes labelled with it.
fn project_leftovers(project: &str) -> Vec<String> {
    let filter = format!("label=com.docker.compose.project={project}");
    let mut left = Vec::new();
    for (what, args) in [
        ("container", vec!["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"]),
        ("network", vec!["network", "ls", "--filter", &filter, "--format", "{{.Name}}"]),
        ("volume", vec!["volume", "ls", "--filter", &filter, "--format", "{{.Name}}"]),
    ] {
        for name in docker(&args).unwrap() {
            left.push(format!("{what} {name}"));
        }
    }
    left
}

#[tokio::test(flavor = "multi_thread")]
async fn the_compose_install_runs_a_job_and_down_leaves_nothing() {
    if !docker_reachable() {
        return;
    }
    if Command::new("docker-compose").arg("version").output().is_err() {
        eprintln!("skipped: docker-compose is not installed");
        return;
    }
    // The service images are built from the machine's packages (scripts/test-all installs
    // them when it runs as root).
    let postgres = std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|mut d| d.next().is_some());
    if !postgres || !Path::new("/usr/sbin/mosquitto").exists() {
        eprintln!(
            "skipped: building the PostgreSQL and Mosquitto images needs the postgresql and \
             mosquitto packages installed"
        );
        return;
    }
    let took = build_fledge_image(FLEDGE_IMAGE);
    eprintln!("fledge image build: {took:.1?}");
    let took = build_service_images(POSTGRES_IMAGE, MOSQUITTO_IMAGE);
    eprintln!("service images: {took:.1?}");

    let scratch = tempfile::tempdir().unwrap();
    let home = scratch.path().join("home");
    let secrets = scratch.path().join("secrets");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&secrets).unwrap();
    write_secret(&secrets, "postgres_password");
    write_secret(&secrets, "mosquitto_admin_password");
    let data = repo_root().join("examples/data").canonicalize().unwrap();
    let api_port = free_port();
    let ports: Vec<(&str, u16)> = vec![
        ("FLEDGE_API_PORT", api_port),
        ("FLEDGE_NOTIFIER_PORT", free_port()),
        ("FLEDGE_METASERVER_PORT", free_port()),
        ("FLEDGE_MQTT_PORT", free_port()),
    ];
    let mut env: Vec<(String, String)> = vec![
        ("FLEDGE_IMAGE".into(), FLEDGE_IMAGE.into()),
        ("FLEDGE_POSTGRES_IMAGE".into(), POSTGRES_IMAGE.into()),
        ("FLEDGE_MOSQUITTO_IMAGE".into(), MOSQUITTO_IMAGE.into()),
        ("FLEDGE_HOME".into(), home.display().to_string()),
        ("FLEDGE_SECRETS".into(), secrets.display().to_string()),
        ("FLEDGE_PUBLIC_HOST".into(), bridge_gateway()),
        ("FLEDGE_DATASETS".into(), data.display().to_string()),
    ];
    env.extend(ports.iter().map(|(k, v)| ((*k).to_owned(), v.to_string())));
    let mut install = Install {
        project: unique("fledgeinstall"),
        env,
        home: home.clone(),
        api_port,
        down: false,
    };

    let started = Instant::now();
    install.run(&["up", "-d"]);
    let up = started.elapsed();
    // The control plane is up once it wrote its admin token and its apiserver answers.
    let token = read_when_there(&home.join("admin.token"), Duration::from_secs(180));
    let ca = home.join("tls/ca.pem");
    let endpoint = format!("https://127.0.0.1:{}", install.api_port);
    let cli_config = scratch.path().join("cli.yaml");
    let fledgectl = || {
        let path = Path::new(env!("CARGO_BIN_EXE_fledge")).with_file_name("fledgectl");
        assert!(path.exists(), "{} is missing: build the workspace first", path.display());
        let mut command = Command::new(path);
        command.env("FLEDGE_CONFIG", &cli_config);
        command
    };
    let mut login_output = String::new();
    let healthy = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("fledgectl login against the install", Duration::from_secs(180), || {
            let out = fledgectl()
                .args(["login", "--server", &endpoint, "--ca"])
                .arg(&ca)
                .args(["--login-token", &token])
                .output()
                .unwrap();
            login_output = String::from_utf8_lossy(&out.stderr).into_owned();
            out.status.success()
        })
    }));
    let healthy = healthy.unwrap_or_else(|_| {
        panic!("the install did not come up: {login_output}\n{}", install.logs())
    });
    eprintln!("docker-compose up -d: {up:.1?}; apiserver answering {healthy:.1?} later");

    // The README's job, from the host, with its datasets at their absolute paths (mounted
    // read-only into the workers by FLEDGE_DATASETS).
    let dir = scratch.path().join("mnist");
    copy_example("mnist", &dir);
    let started = Instant::now();
    let out = fledgectl().arg("run").arg(&dir).output().unwrap();
    let output =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fledgectl run mnist failed:\n{output}\n{}", install.logs());
    eprintln!("mnist through the install: {:.1?}", started.elapsed());
    let job_id = output
        .lines()
        .find_map(|l| l.strip_prefix("created job "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no job id in:\n{output}"))
        .to_owned();

    let client = fledge_client::Client::new(&endpoint, Some(&token))
        .unwrap()
        .with_ca(Some(&fledge_client::Ca::load(&ca).unwrap()))
        .unwrap();
    let id = job_id.as_str().into();
    let job = client.get_job(&id).await.unwrap();
    assert_eq!(job.state, JobState::Completed, "{job:?}");
    let tasks = client.list_tasks(&id).await.unwrap();
    assert_eq!(tasks.len(), 5, "4 trainers and 1 aggregator: {tasks:?}");
    assert!(tasks.iter().all(|t| t.state == TaskState::Completed), "{tasks:?}");
    let records = client.job_metrics(&id).await.unwrap();
    let rounds = records_of(&records, "aggregator");
    assert_eq!(rounds.len(), 20, "one aggregator record per round");
    let accuracy = rounds[19].metrics["global.accuracy"];
    assert!(accuracy > 0.9, "two-tier accuracy after 20 rounds through the install: {accuracy}");
    eprintln!("install: mnist global.accuracy {accuracy:.4}");
    // The job ran on PostgreSQL and Mosquitto: the store is the compose's database (the data
    // directory holds no SQLite file), and the tasks logged in to Mosquitto with the logins
    // the control plane provisioned (`<job>/<task>`).
    assert!(!home.join("fledge.db").exists(), "the store is PostgreSQL, not SQLite");
    let out = install.compose().args(["logs", "--no-color", "mosquitto"]).output().unwrap();
    let mosquitto = String::from_utf8_lossy(&out.stdout);
    assert!(
        mosquitto.contains(&format!("u'{job_id}/")),
        "no task of the job logged in to Mosquitto:\n{mosquitto}"
    );

    install.down();
    let left = project_leftovers(&install.project);
    assert!(left.is_empty(), "left after down -v: {left:?}");
    let owner = format!("label=fledge.owner={}", home.join("work").display());
    let workers = docker(&["ps", "-aq", "--filter", &owner]).unwrap();
    assert!(workers.is_empty(), "worker containers left: {workers:?}");
}
