//! The in-process apiserver and a runner for the `fledgectl` binary.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use fledge_control::api::{self, ApiState};
use fledge_control::controller;
use fledge_control::store::{BlobStore, SqliteStore, Store};
use fledge_types::task_config::TaskEnv;

/// A running apiserver over a temp-dir SQLite store.
pub struct Server {
    /// `http://127.0.0.1:PORT`, or `https://…` for [`Server::start_with_controller`].
    pub base: String,
    /// The store behind it (to play the controller).
    pub store: Arc<dyn Store>,
    /// The admin's token.
    pub token: String,
    /// A scratch directory (HOME of the CLI, test files).
    pub dir: tempfile::TempDir,
    /// The CA fledgectl must trust (`FLEDGE_CA_FILE`), when the server serves TLS.
    pub ca_file: Option<PathBuf>,
    shutdown: CancellationToken,
}

impl Server {
    /// Serves a fresh store on 127.0.0.1:0.
    pub async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::new(dir.path().join("blobs"), 16 * 1024 * 1024).unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(dir.path().join("fledge.db"), blobs).await.unwrap());
        // No controller runs in these tests; without a receiver, wake-ups are no-ops.
        let (handle, _woken) = controller::Handle::channel(1);
        let state = ApiState::new(store.clone(), handle, None, TaskEnv::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        tokio::spawn(api::serve(listener, state, shutdown.clone()));
        let token = api::bootstrap_admin(store.as_ref()).await.unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        Server { base, store, token, dir, ca_file: None, shutdown }
    }

    /// Runs the apiserver, the controller and the notifier (`fledge serve` minus the broker)
    /// over a fresh store on free loopback ports, with short controller timers; TLS as by
    /// default, with the CA it creates in its data directory.
    pub async fn start_with_controller() -> Server {
        use fledge_control::config::{Options, ServiceKind};
        use fledge_control::service;

        let dir = tempfile::tempdir().unwrap();
        let mut options = Options {
            services: vec![ServiceKind::Notifier, ServiceKind::Controller, ServiceKind::Apiserver],
            data_dir: dir.path().join("data"),
            ..Options::default()
        };
        options.apiserver.listen = "127.0.0.1:0".parse().unwrap();
        options.notifier.listen = "127.0.0.1:0".parse().unwrap();
        options.controller.resync_interval_secs = 0.2;
        options.controller.stop_grace_secs = 0.5;
        let store = service::open_store(&options).await.unwrap();
        let shutdown = CancellationToken::new();
        let services = service::start(&options, store.clone(), &shutdown).await.unwrap();
        let base = services.endpoints.apiserver.clone();
        assert!(base.starts_with("https://"), "{base}");
        let ca_file = services.tls.as_ref().and_then(|tls| tls.ca_path.clone());
        tokio::spawn(services.wait());
        let token = api::bootstrap_admin(store.as_ref()).await.unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        Server { base, store, token, dir, ca_file, shutdown }
    }

    /// A path in the scratch directory.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Runs `fledgectl args` as the admin (endpoint and token from the environment).
    pub async fn ctl(&self, args: &[&str]) -> Run {
        let mut env =
            vec![("FLEDGE_ENDPOINT", self.base.as_str()), ("FLEDGE_TOKEN", self.token.as_str())];
        let ca_file = self.ca_file.as_ref().map(|path| path.display().to_string());
        if let Some(path) = &ca_file {
            env.push(("FLEDGE_CA_FILE", path.as_str()));
        }
        self.ctl_with(args, &env).await
    }

    /// Runs `fledgectl args` with only `env` set (plus an empty HOME).
    pub async fn ctl_with(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fledgectl"));
        command
            .args(args)
            .env_clear()
            .env("HOME", self.path("home"))
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for (key, value) in env {
            command.env(key, value);
        }
        let output = command.output().await.unwrap();
        Run::from(output, args)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A finished `fledgectl` run.
#[derive(Debug)]
pub struct Run {
    /// Exit code.
    pub code: i32,
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
    args: String,
}

impl Run {
    fn from(output: Output, args: &[&str]) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            args: args.join(" "),
        }
    }

    /// Asserts success and returns stdout trimmed.
    pub fn ok(&self) -> String {
        assert_eq!(
            self.code, 0,
            "fledgectl {} failed:\nstdout: {}\nstderr: {}",
            self.args, self.stdout, self.stderr
        );
        self.stdout.trim().to_owned()
    }

    /// Asserts failure with `code` and returns stderr.
    pub fn fails(&self, code: i32) -> &str {
        assert_eq!(
            self.code, code,
            "fledgectl {} exited {} (wanted {code}):\nstdout: {}\nstderr: {}",
            self.args, self.code, self.stdout, self.stderr
        );
        &self.stderr
    }

    /// stdout parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok()).unwrap_or_else(|err| {
            panic!("fledgectl {}: stdout is not JSON ({err}): {}", self.args, self.stdout)
        })
    }
}

/// The fixture job directory (hierarchical topology, 4 dataset files, code per role).
pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hierarchical")
}

/// `p` as a `&str` (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Inserts a `ready` trainer task `task` of `job` in group `eu`, as the controller would,
/// with agent key `k`.
pub async fn insert_ready_task(store: &dyn Store, job: &fledge_types::JobId, task: &str) {
    use std::collections::BTreeMap;

    use fledge_control::store::NewTask;
    use fledge_types::{ComputeId, Task, TaskId, TaskState};
    let task = Task {
        job_id: job.clone(),
        task_id: TaskId::new(task),
        role: "trainer".into(),
        index: 0,
        group_association: BTreeMap::from([("param-channel".to_owned(), "eu".to_owned())]),
        dataset_id: None,
        compute_id: ComputeId::new("default"),
        managed: true,
        state: TaskState::Ready,
        log: String::new(),
        updated_at: None,
        last_heartbeat: None,
        restarts: 0,
    };
    store.insert_tasks(&[NewTask { task, key_sha256: api::secret_hash("k") }]).await.unwrap();
}
