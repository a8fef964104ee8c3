//! The `docker` worker runtime: one container per task on the local Docker Engine, driven
//! through its API socket with `bollard`.
//!
//! - Each task's container is named `fledge-<compute>-<job>-<task>` and labelled
//!   `fledge.compute`, `fledge.job`, `fledge.task` and `fledge.role`; it runs the image's
//!   `fledge fledgelet` with the same flags the process deployer passes.
//! - The task key is written to a 0600 file outside the task's work dir and bind-mounted
//!   read-only at [`KEY_PATH`] (`--task-key-file`): never in the container's environment or
//!   command line, which `docker inspect` shows to anyone with the socket.
//! - The task's work dir is bind-mounted at its host path, so the `final-state` marker and the
//!   task's files are where the process deployer would have them; the container's output is
//!   copied into the same `fledgelet.log`.
//! - Limits per worker (CPUs, memory without extra swap, processes) come from the compute's
//!   deployer options; the root filesystem is read-only (a tmpfs `/tmp`), every capability is
//!   dropped and no privilege can be gained.
//! - Network `job`: a bridge network per job (`fledge-<compute>-<job>`), created with the job's
//!   first container and removed with its last; each container is reachable on it under its
//!   task id. Network `host`: the host's namespace, no job network.
//! - A container that exits is seen at once (the engine's wait API); revoking stops it (SIGTERM,
//!   SIGKILL after the grace period). Every container is removed once it ended and its output is
//!   copied; at start and at shutdown the deployer removes every container and network labelled
//!   with its compute.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    WaitContainerOptionsBuilder,
};
use futures::StreamExt as _;
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

use fledge_types::{ComputeId, JobId, TaskId};

/// Where the task key file appears inside a worker container.
pub const KEY_PATH: &str = "/run/secrets/fledge-task-key";
/// Where the control plane's CA appears inside a worker container.
pub const CA_PATH: &str = "/etc/fledge/ca.pem";
/// The `fledge` binary inside the worker image.
pub const FLEDGE_IN_IMAGE: &str = "/usr/local/bin/fledge";
/// The label naming the compute whose deployer created a container or network.
pub const LABEL_COMPUTE: &str = "fledge.compute";
/// The label naming a container's or network's job.
pub const LABEL_JOB: &str = "fledge.job";
/// The label naming a container's task.
pub const LABEL_TASK: &str = "fledge.task";
/// The label naming a container's role.
pub const LABEL_ROLE: &str = "fledge.role";
/// The label naming the deployer instance (its work root) that created a container or
/// network: what it cleans up at start and shutdown, so that two deployers of the same compute
/// id (two test platforms) on one engine leave each other alone.
pub const LABEL_OWNER: &str = "fledge.owner";

/// Seconds the engine may take to answer a request (not a stream: waits and logs last as long
/// as the container).
const API_TIMEOUT_SECS: u64 = 120;

/// The command of a worker image's `fledge`: its fledgelet for `task` of `job`, reading its key
/// from [`KEY_PATH`] and running built-in roles with [`FLEDGE_IN_IMAGE`], then `extra` (the
/// deployer's `fledgelet_args`). The Docker and Kubernetes runtimes start the same command.
pub(crate) fn worker_command(
    task: &TaskId,
    job: &JobId,
    apiserver: &str,
    notifier: &str,
    work_dir: &str,
    extra: &[String],
) -> Vec<String> {
    let mut cmd: Vec<String> = [
        "fledgelet",
        "--task-id",
        task.as_str(),
        "--job-id",
        job.as_str(),
        "--apiserver",
        apiserver,
        "--notifier",
        notifier,
        "--work-dir",
        work_dir,
        "--task-key-file",
        KEY_PATH,
        "--fledge-bin",
        FLEDGE_IN_IMAGE,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    cmd.extend(extra.iter().cloned());
    cmd
}

/// How workers are networked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkMode {
    /// A bridge network per job; the control plane must listen on an address containers can
    /// route to (not loopback).
    Job,
    /// The host's network namespace: loopback addresses of the host work, but jobs share it.
    Host,
}

impl std::str::FromStr for NetworkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "job" => Ok(NetworkMode::Job),
            "host" => Ok(NetworkMode::Host),
            other => Err(format!("unknown docker network mode {other:?} (expected job or host)")),
        }
    }
}

/// Options of the docker runtime.
#[derive(Clone, Debug)]
pub struct DockerOptions {
    /// The engine's API socket (default `/var/run/docker.sock`).
    pub socket: PathBuf,
    /// The worker image (default `fledge-worker:latest`, made by `fledge image build`).
    pub image: String,
    /// How workers are networked (default [`NetworkMode::Job`]).
    pub network: NetworkMode,
    /// Extra bind mounts, `HOST:CONTAINER[:ro|:rw]` with absolute paths.
    pub mounts: Vec<String>,
    /// CPUs per worker; 0 for no limit.
    pub cpus: f64,
    /// Memory per worker in bytes; 0 for no limit.
    pub memory_bytes: u64,
    /// Processes per worker; 0 for no limit.
    pub pids: i64,
    /// `uid:gid` the workers run as (default: the deployer's own, so that the work dirs stay
    /// the deployer's files).
    pub user: Option<String>,
}

impl Default for DockerOptions {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/var/run/docker.sock"),
            image: "fledge-worker:latest".to_owned(),
            network: NetworkMode::Job,
            mounts: Vec::new(),
            cpus: 0.0,
            memory_bytes: 0,
            pids: 1024,
            user: None,
        }
    }
}

impl DockerOptions {
    /// Checks every option; the error names the first bad one.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.image.trim().is_empty() || self.image.chars().any(char::is_whitespace) {
            return Err(("docker.image", format!("{:?} is not an image name", self.image)));
        }
        if !(self.cpus.is_finite() && (0.0..=4096.0).contains(&self.cpus)) {
            return Err(("docker.cpus", format!("{} is not between 0 and 4096", self.cpus)));
        }
        if self.memory_bytes != 0 && self.memory_bytes < 6 * 1024 * 1024 {
            return Err(("docker.memory", "below the engine's minimum of 6 MiB".to_owned()));
        }
        if self.pids < 0 {
            return Err(("docker.pids", "must not be negative".to_owned()));
        }
        for mount in &self.mounts {
            check_mount(mount).map_err(|why| ("docker.mounts", format!("{mount:?}: {why}")))?;
        }
        Ok(())
    }
}

/// `HOST:CONTAINER[:ro|:rw]`, both absolute, no commas (the engine's bind syntax).
fn check_mount(mount: &str) -> Result<(), &'static str> {
    let parts: Vec<&str> = mount.split(':').collect();
    let (host, container) = match parts.as_slice() {
        [host, container] | [host, container, "ro" | "rw"] => (*host, *container),
        _ => return Err("expected HOST:CONTAINER[:ro|:rw]"),
    };
    if !host.starts_with('/') || !container.starts_with('/') {
        return Err("both paths must be absolute");
    }
    if mount.contains(',') {
        return Err("paths must not contain commas");
    }
    if container == "/" {
        return Err("cannot mount over the container's root");
    }
    Ok(())
}

/// A connection to the engine, with what the runtime creates on it.
pub(crate) struct DockerRuntime {
    docker: Docker,
    opts: DockerOptions,
    compute: ComputeId,
    owner: String,
    /// Containers alive per job (a job's network goes with its last one).
    per_job: HashMap<JobId, usize>,
}

/// Everything a container needs, decided by the deployer.
pub(crate) struct Launch<'a> {
    pub job: &'a JobId,
    pub task: &'a TaskId,
    pub role: &'a str,
    pub task_key: &'a str,
    pub apiserver: &'a str,
    pub notifier: &'a str,
    pub work_dir: &'a Path,
    pub ca_file: Option<&'a Path>,
    pub fledgelet_args: &'a [String],
    pub fledgelet_env: &'a [(String, String)],
}

/// A started container, for its watcher.
pub(crate) struct Started {
    pub(crate) docker: Docker,
    pub(crate) name: String,
    pub(crate) key_file: PathBuf,
}

impl DockerRuntime {
    /// Connects to the engine (negotiating the API version) and removes whatever an earlier
    /// run of this compute's deployer left behind.
    pub(crate) async fn connect(
        opts: DockerOptions,
        compute: ComputeId,
        work_root: &Path,
    ) -> Result<Self, String> {
        let socket = opts.socket.display().to_string();
        let docker =
            Docker::connect_with_unix(&socket, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                .map_err(|err| format!("cannot use the Docker socket {socket}: {err}"))?
                .negotiate_version()
                .await
                .map_err(|err| format!("the Docker Engine at {socket} does not answer: {err}"))?;
        let owner = std::path::absolute(work_root)
            .unwrap_or_else(|_| work_root.to_owned())
            .display()
            .to_string();
        let runtime = Self { docker, opts, compute, owner, per_job: HashMap::new() };
        runtime.remove_all().await;
        Ok(runtime)
    }

    fn network_name(&self, job: &JobId) -> String {
        format!("fledge-{}-{}", self.compute, job)
    }

    fn container_name(&self, job: &JobId, task: &TaskId) -> String {
        format!("fledge-{}-{}-{}", self.compute, job, task)
    }

    fn labels(&self, job: &JobId) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_COMPUTE.to_owned(), self.compute.to_string()),
            (LABEL_OWNER.to_owned(), self.owner.clone()),
            (LABEL_JOB.to_owned(), job.to_string()),
        ])
    }

    /// Creates and starts the task's container (replacing a stale one of the same name).
    pub(crate) async fn start(&mut self, launch: &Launch<'_>) -> Result<Started, String> {
        if self.opts.network == NetworkMode::Job {
            for (what, url) in [("apiserver", launch.apiserver), ("notifier", launch.notifier)] {
                if is_loopback_url(url) {
                    return Err(format!(
                        "the {what} URL {url} is a loopback address, which containers on a job \
                         network cannot reach: make the control plane listen on an address they \
                         route to (e.g. the Docker bridge's gateway: `fledge standalone --host \
                         172.17.0.1`) or give the compute the host network (docker_network = \
                         \"host\")"
                    ));
                }
            }
        }
        let key_file = write_key_file(launch.work_dir, launch.task, launch.task_key)
            .await
            .map_err(|err| format!("cannot write the task key file: {err}"))?;
        let started = self.create_and_start(launch, &key_file).await;
        match started {
            Ok(name) => {
                *self.per_job.entry(launch.job.clone()).or_default() += 1;
                Ok(Started { docker: self.docker.clone(), name, key_file })
            }
            Err(err) => {
                let _ = tokio::fs::remove_file(&key_file).await;
                if !self.per_job.contains_key(launch.job) {
                    self.remove_network(launch.job).await;
                }
                Err(err)
            }
        }
    }

    async fn create_and_start(
        &self,
        launch: &Launch<'_>,
        key_file: &Path,
    ) -> Result<String, String> {
        let network = match self.opts.network {
            NetworkMode::Job => {
                let name = self.network_name(launch.job);
                self.ensure_network(launch.job, &name).await?;
                name
            }
            NetworkMode::Host => "host".to_owned(),
        };
        let name = self.container_name(launch.job, launch.task);
        let work_dir = launch.work_dir.display().to_string();
        let mut binds = vec![
            format!("{work_dir}:{work_dir}:rw"),
            format!("{}:{KEY_PATH}:ro", key_file.display()),
        ];
        let mut env: Vec<String> =
            launch.fledgelet_env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let Some(ca) = launch.ca_file {
            binds.push(format!("{}:{CA_PATH}:ro", ca.display()));
            env.push(format!("FLEDGE_CA_FILE={CA_PATH}"));
        }
        binds.extend(self.opts.mounts.iter().cloned());
        env.push(format!("HOME={work_dir}"));
        let mut cmd = worker_command(
            launch.task,
            launch.job,
            launch.apiserver,
            launch.notifier,
            &work_dir,
            launch.fledgelet_args,
        );
        if self.opts.network == NetworkMode::Job {
            // On a job network the container is reachable under its task id: its p2p ends
            // listen on every address of the container and advertise that name.
            cmd.extend([
                "--p2p-listen-host".to_owned(),
                "0.0.0.0".to_owned(),
                "--p2p-advertise-host".to_owned(),
                launch.task.to_string(),
            ]);
        }
        let mut labels = self.labels(launch.job);
        labels.insert(LABEL_TASK.to_owned(), launch.task.to_string());
        labels.insert(LABEL_ROLE.to_owned(), launch.role.to_owned());
        // The work dir's owner (the deployer, which just created it) unless configured.
        let user = match &self.opts.user {
            Some(user) => user.clone(),
            None => {
                use std::os::unix::fs::MetadataExt as _;
                let meta = tokio::fs::metadata(launch.work_dir)
                    .await
                    .map_err(|err| format!("cannot stat {work_dir}: {err}"))?;
                format!("{}:{}", meta.uid(), meta.gid())
            }
        };
        let memory = i64::try_from(self.opts.memory_bytes).unwrap_or(i64::MAX);
        let host_config = HostConfig {
            binds: Some(binds),
            network_mode: Some(network.clone()),
            nano_cpus: (self.opts.cpus > 0.0).then_some((self.opts.cpus * 1e9) as i64),
            memory: (memory > 0).then_some(memory),
            // The same as memory: no swap beyond the limit.
            memory_swap: (memory > 0).then_some(memory),
            pids_limit: (self.opts.pids > 0).then_some(self.opts.pids),
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([("/tmp".to_owned(), "rw,nosuid,nodev".to_owned())])),
            cap_drop: Some(vec!["ALL".to_owned()]),
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            init: Some(true),
            ..Default::default()
        };
        let networking_config =
            (self.opts.network == NetworkMode::Job).then(|| bollard::models::NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    network.clone(),
                    bollard::models::EndpointSettings {
                        aliases: Some(vec![launch.task.to_string()]),
                        ..Default::default()
                    },
                )])),
            });
        let body = ContainerCreateBody {
            image: Some(self.opts.image.clone()),
            entrypoint: Some(vec![FLEDGE_IN_IMAGE.to_owned()]),
            cmd: Some(cmd),
            env: Some(env),
            user: Some(user),
            working_dir: Some(work_dir.clone()),
            labels: Some(labels),
            host_config: Some(host_config),
            networking_config,
            ..Default::default()
        };
        let options = || Some(CreateContainerOptionsBuilder::default().name(&name).build());
        match self.docker.create_container(options(), body.clone()).await {
            Ok(_) => {}
            Err(err) if status_of(&err) == Some(409) => {
                // A stale container of this task (a redelivered deploy after a crash): replace it.
                tracing::info!(container = name, "replacing a stale container");
                self.force_remove(&name).await;
                self.docker
                    .create_container(options(), body)
                    .await
                    .map_err(|err| describe_create_error(&self.opts.image, &err))?;
            }
            Err(err) => return Err(describe_create_error(&self.opts.image, &err)),
        }
        if let Err(err) = self.docker.start_container(&name, None).await {
            self.force_remove(&name).await;
            return Err(format!("cannot start container {name}: {err}"));
        }
        Ok(name)
    }

    async fn ensure_network(&self, job: &JobId, name: &str) -> Result<(), String> {
        match self.docker.inspect_network(name, None).await {
            Ok(_) => return Ok(()),
            Err(err) if status_of(&err) == Some(404) => {}
            Err(err) => return Err(format!("cannot inspect network {name}: {err}")),
        }
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("bridge".to_owned()),
            labels: Some(self.labels(job)),
            ..Default::default()
        };
        self.docker
            .create_network(request)
            .await
            .map(|_| ())
            .map_err(|err| format!("cannot create network {name}: {err}"))
    }

    /// A container of `job` ended and was removed: its network goes with the job's last one.
    pub(crate) async fn ended(&mut self, job: &JobId) {
        let Some(count) = self.per_job.get_mut(job) else {
            return;
        };
        *count = count.saturating_sub(1);
        if *count == 0 {
            self.per_job.remove(job);
            self.remove_network(job).await;
        }
    }

    async fn remove_network(&self, job: &JobId) {
        if self.opts.network != NetworkMode::Job {
            return;
        }
        let name = self.network_name(job);
        match self.docker.remove_network(&name).await {
            Ok(()) => tracing::info!(network = name, "job network removed"),
            Err(err) if status_of(&err) == Some(404) => {}
            Err(err) => tracing::warn!(network = name, %err, "cannot remove job network"),
        }
    }

    async fn force_remove(&self, name: &str) {
        let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
        match self.docker.remove_container(name, Some(options)).await {
            Ok(()) => {}
            Err(err) if status_of(&err) == Some(404) => {}
            Err(err) => tracing::warn!(container = name, %err, "cannot remove container"),
        }
    }

    /// Removes every container and network this deployer (compute and work root) created:
    /// at start what a crashed run left, at shutdown what is left.
    pub(crate) async fn remove_all(&self) {
        let filter = HashMap::from([(
            "label".to_owned(),
            vec![
                format!("{LABEL_COMPUTE}={}", self.compute),
                format!("{LABEL_OWNER}={}", self.owner),
            ],
        )]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filter).build();
        match self.docker.list_containers(Some(options)).await {
            Ok(containers) => {
                for container in containers {
                    if let Some(id) = container.id {
                        tracing::info!(container = id, "removing a container of this compute");
                        self.force_remove(&id).await;
                    }
                }
            }
            Err(err) => tracing::warn!(%err, "cannot list this compute's containers"),
        }
        let options = ListNetworksOptionsBuilder::default().filters(&filter).build();
        match self.docker.list_networks(Some(options)).await {
            Ok(networks) => {
                for network in networks {
                    if let Some(name) = network.name {
                        match self.docker.remove_network(&name).await {
                            Ok(()) => tracing::info!(network = name, "network removed"),
                            Err(err) => {
                                tracing::warn!(network = name, %err, "cannot remove network")
                            }
                        }
                    }
                }
            }
            Err(err) => tracing::warn!(%err, "cannot list this compute's networks"),
        }
    }
}

/// Waits for the container to exit (or stops it when `kill` fires), copying its output into
/// `log`, then removes it and its key file. Returns how it ended (`reported`: filled in by the
/// caller from the work dir's marker).
pub(crate) async fn watch(
    started: Started,
    kill: CancellationToken,
    grace: Duration,
    log: std::fs::File,
) -> (String, bool) {
    let Started { docker, name, key_file } = started;
    let copier = tokio::spawn(copy_logs(docker.clone(), name.clone(), log));
    let wait = || {
        let options = WaitContainerOptionsBuilder::default().condition("not-running").build();
        let mut stream = docker.wait_container(&name, Some(options));
        async move { stream.next().await }
    };
    let (waited, killed) = tokio::select! {
        waited = wait() => (waited, false),
        () = kill.cancelled() => {
            let secs = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX).max(1);
            let options = StopContainerOptionsBuilder::default().t(secs).build();
            if let Err(err) = docker.stop_container(&name, Some(options)).await {
                tracing::warn!(container = name, %err, "cannot stop container");
            }
            (wait().await, true)
        }
    };
    let mut status = match waited {
        Some(Ok(response)) => describe_exit(response.status_code),
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
            describe_exit(code)
        }
        Some(Err(err)) => format!("an unknown status ({err})"),
        None => "an unknown status (the engine ended the wait)".to_owned(),
    };
    if let Ok(inspect) = docker.inspect_container(&name, None).await
        && inspect.state.and_then(|s| s.oom_killed) == Some(true)
    {
        status.push_str(", killed by the kernel at its memory limit");
    }
    // The output ends with the container; do not hang on a stuck log stream.
    if tokio::time::timeout(Duration::from_secs(10), copier).await.is_err() {
        tracing::warn!(container = name, "container output not fully copied");
    }
    let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
    match docker.remove_container(&name, Some(options)).await {
        Ok(()) => {}
        Err(err) if status_of(&err) == Some(404) => {}
        Err(err) => tracing::warn!(container = name, %err, "cannot remove container"),
    }
    let _ = tokio::fs::remove_file(&key_file).await;
    (status, killed)
}

async fn copy_logs(docker: Docker, name: String, log: std::fs::File) {
    let mut file = tokio::fs::File::from_std(log);
    let options = LogsOptionsBuilder::default().follow(true).stdout(true).stderr(true).build();
    let mut logs = docker.logs(&name, Some(options));
    while let Some(chunk) = logs.next().await {
        match chunk {
            Ok(output) => {
                if let Err(err) = file.write_all(&output.into_bytes()).await {
                    tracing::warn!(container = name, %err, "cannot write the worker log");
                    return;
                }
            }
            Err(err) => {
                tracing::warn!(container = name, %err, "container output stream failed");
                break;
            }
        }
    }
    let _ = file.flush().await;
}

/// An exit code as the process deployer words statuses; above 128 the container died of a
/// signal (`exit code 137 (SIGKILL)`).
pub(crate) fn describe_exit(code: i64) -> String {
    let signal = code
        .checked_sub(128)
        .filter(|sig| (1..64).contains(sig))
        .and_then(|sig| i32::try_from(sig).ok())
        .and_then(|sig| nix::sys::signal::Signal::try_from(sig).ok());
    match signal {
        Some(signal) => format!("exit code {code} ({})", signal.as_str()),
        None => format!("exit code {code}"),
    }
}

fn status_of(err: &bollard::errors::Error) -> Option<u16> {
    match err {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn describe_create_error(image: &str, err: &bollard::errors::Error) -> String {
    if status_of(err) == Some(404) {
        format!(
            "the worker image {image} is not on this Docker Engine (build it with `fledge image \
             build --tag {image}`; nothing is pulled): {err}"
        )
    } else {
        format!("cannot create the worker container: {err}")
    }
}

/// Writes the key to `<job dir>/.keys/<task>.key` (directory 0700, file 0600): next to, not
/// inside, the task's work dir that the container mounts.
async fn write_key_file(work_dir: &Path, task: &TaskId, key: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let dir = work_dir.parent().unwrap_or(work_dir).join(".keys");
    let path = dir.join(format!("{task}.key"));
    let key = key.to_owned();
    let file = path.clone();
    tokio::task::spawn_blocking(move || {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&file)?;
        std::io::Write::write_all(&mut out, key.as_bytes())?;
        out.sync_all()
    })
    .await
    .map_err(std::io::Error::other)??;
    Ok(path)
}

/// Whether `url`'s host is a loopback address (`localhost`, `127.x`, `::1`).
pub(crate) fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6)
    } else {
        host_port.rsplit_once(':').map_or(host_port, |(h, _)| h)
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks that the engine at `socket` answers and has the worker image `image` (what a Docker
/// deployer needs to start workers); returns the engine's version and the image's id.
pub async fn check_engine(socket: &Path, image: &str) -> Result<(String, String), String> {
    let shown = socket.display().to_string();
    let docker = Docker::connect_with_unix(&shown, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        .map_err(|err| format!("cannot use the Docker socket {shown}: {err}"))?
        .negotiate_version()
        .await
        .map_err(|err| format!("the Docker Engine at {shown} does not answer: {err}"))?;
    let version = docker
        .version()
        .await
        .map_err(|err| format!("the Docker Engine at {shown} does not answer: {err}"))?
        .version
        .unwrap_or_else(|| "unknown".to_owned());
    let id = docker.inspect_image(image).await.map_err(|err| {
        format!(
            "the Docker Engine {version} at {shown} has no image {image:?} ({err}): build it \
             with `fledge image build`"
        )
    })?;
    Ok((version, id.id.unwrap_or_default()))
}

/// Builds the worker image `tag` on the engine at `socket` from the `fledge` executable `exe`
/// and the shared libraries it links (as `ldd` lists them), `FROM scratch`: nothing is pulled.
/// Returns the engine's build output.
pub async fn build_worker_image(socket: &Path, tag: &str, exe: &Path) -> Result<String, String> {
    if tag.trim().is_empty() || tag.chars().any(char::is_whitespace) {
        return Err(format!("{tag:?} is not an image tag"));
    }
    let exe = exe.to_owned();
    let context = tokio::task::spawn_blocking(move || build_context(&exe))
        .await
        .map_err(|err| format!("cannot pack the image: {err}"))??;
    let socket = socket.display().to_string();
    let docker = Docker::connect_with_unix(&socket, API_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
        .map_err(|err| format!("cannot use the Docker socket {socket}: {err}"))?
        .negotiate_version()
        .await
        .map_err(|err| format!("the Docker Engine at {socket} does not answer: {err}"))?;
    let options = bollard::query_parameters::BuildImageOptionsBuilder::default()
        .dockerfile("Dockerfile")
        .t(tag)
        .rm(true)
        .forcerm(true)
        .build();
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(bytes_of(context))));
    let mut output = String::new();
    while let Some(info) = stream.next().await {
        let info = info.map_err(|err| format!("the image build failed: {err}\n{output}"))?;
        if let Some(error) = info.error_detail.and_then(|d| d.message) {
            return Err(format!("the image build failed: {error}\n{output}"));
        }
        if let Some(text) = info.stream {
            output.push_str(&text);
        }
    }
    Ok(output)
}

fn bytes_of(data: Vec<u8>) -> bytes::Bytes {
    bytes::Bytes::from(data)
}

/// Where Debian-like systems keep the CA bundle (copied into the image when present).
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The Dockerfile of the worker image.
const DOCKERFILE: &str = "FROM scratch\nCOPY rootfs/ /\nLABEL fledge.image=worker\nENTRYPOINT [\"/usr/local/bin/fledge\"]\n";

/// The build context: the Dockerfile and `rootfs/` with the executable, its libraries (at the
/// paths the dynamic loader looks for them), the host's CA bundle and an empty `/tmp`.
fn build_context(exe: &Path) -> Result<Vec<u8>, String> {
    let out = std::process::Command::new("ldd").arg(exe).output().map_err(|err| {
        format!("cannot run ldd to list the libraries of {}: {err}", exe.display())
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let libraries = if !out.status.success() && text.contains("not a dynamic executable")
        || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
    {
        Vec::new()
    } else if out.status.success() {
        parse_ldd(&text)?
    } else {
        return Err(format!(
            "ldd {} failed: {}",
            exe.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    };
    let io = |what: &Path, err: std::io::Error| format!("cannot pack {}: {err}", what.display());
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, mode: u32, data: &[u8]| -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, name, data)
    };
    add("Dockerfile", 0o644, DOCKERFILE.as_bytes())
        .map_err(|err| io(Path::new("Dockerfile"), err))?;
    let binary = std::fs::read(exe).map_err(|err| io(exe, err))?;
    add(&format!("rootfs{FLEDGE_IN_IMAGE}"), 0o755, &binary).map_err(|err| io(exe, err))?;
    drop(binary);
    for library in &libraries {
        // The file itself, under the name the loader asks for (links resolved).
        let data = std::fs::read(library).map_err(|err| io(library, err))?;
        add(&format!("rootfs{}", library.display()), 0o755, &data)
            .map_err(|err| io(library, err))?;
    }
    // The host's CA bundle, if any: the system roots for a control plane whose certificate a
    // public CA signed (and rustls' native-roots loader wants at least one).
    let bundle = Path::new(CA_BUNDLE);
    if let Ok(data) = std::fs::read(bundle) {
        add(&format!("rootfs{CA_BUNDLE}"), 0o644, &data).map_err(|err| io(bundle, err))?;
    }
    let mut header = tar::Header::new_gnu();
    header.set_size(0);
    header.set_mode(0o1777);
    header.set_entry_type(tar::EntryType::Directory);
    tar.append_data(&mut header, "rootfs/tmp/", std::io::empty())
        .map_err(|err| io(Path::new("/tmp"), err))?;
    tar.into_inner().map_err(|err| io(Path::new("the build context"), err))
}

/// The absolute paths of the libraries in `ldd`'s output (the vDSO has none); a library that
/// is `not found` is an error.
fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut res = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(format!("library {} is not found on this machine", name.trim()));
                }
                rest
            }
            None => line,
        };
        let path = target.split(" (").next().unwrap_or(target).trim();
        if path.starts_with('/') {
            res.push(PathBuf::from(path));
        }
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_recognised() {
        for url in [
            "https://127.0.0.1:10100",
            "http://localhost:1",
            "https://[::1]:5/x",
            "https://127.3.4.5",
            "https://user@127.0.0.1:4/",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in
            ["https://172.17.0.1:10100", "https://host.docker.internal:1", "https://[fd00::1]:2"]
        {
            assert!(!is_loopback_url(url), "{url}");
        }
    }

    #[test]
    fn ldd_output_gives_the_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x7f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            parse_ldd(text).expect("parses"),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        let err = parse_ldd("\tlibfoo.so.1 => not found\n").expect_err("missing library");
        assert!(err.contains("libfoo.so.1"), "{err}");
    }

    #[test]
    fn exit_codes_name_their_signal() {
        assert_eq!(describe_exit(0), "exit code 0");
        assert_eq!(describe_exit(2), "exit code 2");
        assert_eq!(describe_exit(137), "exit code 137 (SIGKILL)");
        assert_eq!(describe_exit(143), "exit code 143 (SIGTERM)");
        assert_eq!(describe_exit(255), "exit code 255");
    }

    #[test]
    fn options_are_checked() {
        assert!(DockerOptions::default().validate().is_ok());
        let bad = |f: fn(&mut DockerOptions)| {
            let mut opts = DockerOptions::default();
            f(&mut opts);
            opts.validate().expect_err("invalid").0
        };
        assert_eq!(bad(|o| o.image = String::new()), "docker.image");
        assert_eq!(bad(|o| o.image = "a b".into()), "docker.image");
        assert_eq!(bad(|o| o.cpus = f64::NAN), "docker.cpus");
        assert_eq!(bad(|o| o.cpus = -1.0), "docker.cpus");
        assert_eq!(bad(|o| o.memory_bytes = 1024), "docker.memory");
        assert_eq!(bad(|o| o.pids = -1), "docker.pids");
        for mount in ["data:/data", "/data", "/a:/b:rx", "/a,b:/b", "/a:/", "/a:b"] {
            let opts = DockerOptions { mounts: vec![mount.to_owned()], ..Default::default() };
            assert_eq!(opts.validate().expect_err(mount).0, "docker.mounts", "{mount}");
        }
        let opts = DockerOptions {
            mounts: vec!["/srv/data:/srv/data:ro".into(), "/a:/b".into()],
            ..Default::default()
        };
        assert!(opts.validate().is_ok());
        assert_eq!("job".parse(), Ok(NetworkMode::Job));
        assert_eq!("host".parse(), Ok(NetworkMode::Host));
        assert!("bridge".parse::<NetworkMode>().is_err());
    }
}
