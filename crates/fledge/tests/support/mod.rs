//! A real platform for end-to-end tests: `fledge standalone` as a child process on free
//! loopback ports in a temporary data directory, driven with the `fledgectl` binary built next
//! to it and read back through `fledge_client`.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use fledge_types::{Job, MetricRecord, Task};

pub mod containers;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A running `fledge standalone`, killed on drop.
pub struct Platform {
    child: Child,
    /// The `--port` it was started with (0: free ports, others each start).
    port: u16,
    /// Extra environment it was started with.
    env: Vec<(String, String)>,
    pub endpoint: String,
    pub token: String,
    pub cli_config: PathBuf,
    dir: tempfile::TempDir,
}

/// What `fledgectl run DIR` did.
pub struct RunOutcome {
    /// Whether it exited 0 (the job completed).
    pub success: bool,
    /// The job it created.
    pub job: String,
    /// Its stdout and stderr.
    pub output: String,
}

impl Platform {
    /// Starts `fledge standalone --port 0` and waits until it prints `ready`.
    pub fn start() -> Platform {
        Platform::start_in(tempfile::tempdir().unwrap(), 0, Vec::new())
    }

    /// Starts `fledge standalone` with extra environment variables (e.g. secrets that must
    /// not reach its workers).
    pub fn start_with_env(env: &[(&str, &str)]) -> Platform {
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Platform::start_in(tempfile::tempdir().unwrap(), 0, env)
    }

    /// Starts `fledge standalone` on a fixed base port (four free consecutive ports), so that a
    /// restart on the same data directory comes back on the same addresses, as a real
    /// deployment's would: its workers reconnect to them.
    pub fn start_on_fixed_ports() -> Platform {
        Platform::start_in(tempfile::tempdir().unwrap(), free_base_port(), Vec::new())
    }

    /// Starts `fledge standalone --port 0` with extra environment variables and flags.
    pub fn start_with_env_and(env: &[(&str, &str)], extra: &[String]) -> Platform {
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Platform::start_in_with(tempfile::tempdir().unwrap(), 0, env, extra)
    }

    /// Starts `fledge standalone --port 0` with extra flags (e.g. `--config FILE`).
    pub fn start_with(extra: &[String]) -> Platform {
        Platform::start_in_with(tempfile::tempdir().unwrap(), 0, Vec::new(), extra)
    }

    /// SIGKILLs `fledge standalone` (no shutdown of any kind, as a crash or an OOM kill) and
    /// starts it again on the same data directory.
    pub fn crash_and_restart(mut self) -> Platform {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        Platform::start_in(dir, self.port, std::mem::take(&mut self.env))
    }

    fn start_in(dir: tempfile::TempDir, port: u16, env: Vec<(String, String)>) -> Platform {
        Platform::start_in_with(dir, port, env, &[])
    }

    fn start_in_with(
        dir: tempfile::TempDir,
        port: u16,
        env: Vec<(String, String)>,
        extra: &[String],
    ) -> Platform {
        let cli_config = dir.path().join("cli.yaml");
        let mut child = Command::new(env!("CARGO_BIN_EXE_fledge"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(["standalone", "--port", &port.to_string(), "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--cli-config")
            .arg(&cli_config)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.path().join("standalone.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (mut endpoint, mut token) = (None, None);
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(v) = line.strip_prefix("endpoint: ") {
                endpoint = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("token: ") {
                token = Some(v.to_owned());
            } else if line == "ready" {
                break;
            }
        }
        let log = || std::fs::read_to_string(dir.path().join("standalone.log")).unwrap_or_default();
        assert!(endpoint.is_some(), "fledge standalone did not start:\n{}", log());
        Platform {
            child,
            port,
            env,
            endpoint: endpoint.expect("standalone prints its endpoint"),
            token: token.expect("standalone prints its token"),
            cli_config,
            dir,
        }
    }

    /// The platform's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The CA the platform created in its data directory on start (its clients trust it).
    pub fn ca(&self) -> fledge_client::Ca {
        fledge_client::Ca::load(&self.data_dir().join("tls").join("ca.pem")).unwrap()
    }

    /// A REST client for the platform, trusting its CA.
    pub fn client(&self) -> fledge_client::Client {
        fledge_client::Client::new(&self.endpoint, Some(&self.token))
            .unwrap()
            .with_ca(Some(&self.ca()))
            .unwrap()
    }

    /// The embedded broker's port, from the standalone's "standalone listening" log line
    /// (apiserver, notifier, broker, metaserver, in that order).
    pub fn broker_port(&self) -> u16 {
        let log = self.scratch().join("standalone.log");
        for _ in 0..100 {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("standalone listening")) {
                let ports: Vec<u16> = line
                    .split("127.0.0.1:")
                    .skip(1)
                    .filter_map(|rest| {
                        let digits: String =
                            rest.chars().take_while(char::is_ascii_digit).collect();
                        digits.parse().ok()
                    })
                    .collect();
                assert_eq!(ports.len(), 4, "four listeners in {line}");
                return ports[2];
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("no 'standalone listening' line in {}", log.display());
    }

    /// A scratch directory that lives as long as the platform.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// `fledgectl run examples/<example>`, which must complete; returns the job id.
    pub fn run(&self, example: &str) -> String {
        let outcome = self.run_dir(&repo_root().join("examples").join(example));
        assert!(outcome.success, "fledgectl run {example} failed:\n{}", outcome.output);
        outcome.job
    }

    /// `fledgectl run DIR`, whatever its outcome.
    pub fn run_dir(&self, dir: &Path) -> RunOutcome {
        let out = self.fledgectl().arg("run").arg(dir).output().unwrap();
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let job = output
            .lines()
            .find_map(|l| l.strip_prefix("created job "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or_else(|| panic!("no job id in fledgectl output:\n{output}"))
            .to_owned();
        RunOutcome { success: out.status.success(), job, output }
    }

    /// A `fledgectl` command configured for this platform.
    pub fn fledgectl(&self) -> Command {
        let fledgectl = Path::new(env!("CARGO_BIN_EXE_fledge")).with_file_name("fledgectl");
        assert!(
            fledgectl.exists(),
            "{} is missing: build it first (cargo build -p fledge-cli)",
            fledgectl.display()
        );
        let mut command = Command::new(fledgectl);
        command.env("FLEDGE_CONFIG", &self.cli_config);
        command
    }

    /// `GET {endpoint}{path}` over TLS trusting the platform's CA, without a token; returns
    /// the status and body.
    #[allow(dead_code)]
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        fledge_tls::install_default_provider();
        let pem = std::fs::read(self.data_dir().join("tls").join("ca.pem")).unwrap();
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap();
        let response = http.get(format!("{}{path}", self.endpoint)).send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    /// The job, its tasks and its metric records, through the REST API.
    pub async fn job(&self, id: &str) -> (Job, Vec<Task>, Vec<MetricRecord>) {
        let client = self.client();
        let id = id.into();
        let job = client.get_job(&id).await.unwrap();
        let tasks = client.list_tasks(&id).await.unwrap();
        let metrics = client.job_metrics(&id).await.unwrap();
        (job, tasks, metrics)
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A base port P with P..P+3 free on loopback now (the ports `fledge standalone --port P`
/// takes), away from the common ones.
fn free_base_port() -> u16 {
    for _ in 0..200 {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = probe.local_addr().unwrap().port();
        drop(probe);
        if !(20_000..=65_000).contains(&base) {
            continue;
        }
        let free = (0..4).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no four free consecutive ports on loopback");
}

/// The records of `role`, ordered by round.
pub fn records_of(records: &[MetricRecord], role: &str) -> Vec<MetricRecord> {
    let mut res: Vec<MetricRecord> = records.iter().filter(|r| r.role == role).cloned().collect();
    res.sort_by_key(|r| r.round);
    res
}

/// Copies a directory tree (a job directory to vary in a test).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Copies `examples/<example>` to `dir`, pointing its relative data URLs (the datasets' and the
/// aggregator's `evalDataset`, `file:../data`) at the repository's `examples/data`, so the copy
/// runs from anywhere.
pub fn copy_example(example: &str, dir: &Path) {
    copy_dir(&repo_root().join("examples").join(example), dir);
    let data = repo_root().join("examples/data").canonicalize().unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("dataset-") || name == "modelSpec.json" {
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.replace("file:../data", &format!("file://{}", data.display()));
            std::fs::write(&path, text).unwrap();
        }
    }
}

/// Copies `example` into the platform's scratch space as `name` (see [`copy_example`]), with
/// `rounds` rounds.
pub fn example_with_rounds(platform: &Platform, example: &str, name: &str, rounds: u64) -> PathBuf {
    let dir = platform.scratch().join(name);
    copy_example(example, &dir);
    let spec_path = dir.join("modelSpec.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&spec_path).unwrap()).unwrap();
    spec["hyperparameters"]["rounds"] = rounds.into();
    std::fs::write(&spec_path, serde_json::to_string_pretty(&spec).unwrap()).unwrap();
    dir
}
