//! Configuration of the control-plane services, parsed once at startup into typed [`Options`].
//!
//! Sources are layered, later ones winning: built-in defaults → a TOML file (`--config PATH`) →
//! `FLEDGE_*` environment variables → command-line overrides. The environment is passed in as a
//! map ([`Options::load`]), so tests inject one and deep code never reads the process env.
//!
//! Environment names are the option's path in upper case with `_` between parts:
//! `FLEDGE_DATA_DIR`, `FLEDGE_STORE_URL`, `FLEDGE_APISERVER_LISTEN`,
//! `FLEDGE_CONTROLLER_STOP_GRACE_SECS`, `FLEDGE_SERVICES=apiserver,controller`. `FLEDGE_*`
//! variables that name no option (`FLEDGE_LOG`, `FLEDGE_CONFIG`, ...) belong to other tools and
//! are ignored. Command-line overrides use dotted paths (`apiserver.listen`).
//!
//! TLS ([`TlsSection`]) is on by default for the apiserver, the notifier, the metaserver and
//! the embedded MQTT broker (`mqtts`):
//! a CA and a server certificate are created under `<data_dir>/tls` on first start unless the
//! operator names their own (`tls.cert`, `tls.key`, `tls.ca`). `tls.insecure` serves plain
//! text, and is refused when one of those listeners binds a non-loopback address.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{controller, notifier};

/// Errors of configuration loading.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("config file {path} is not valid TOML")]
    Toml {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: toml::de::Error,
    },
    /// An environment variable or flag has a value of the wrong type.
    #[error("{source_name} sets {key} to {value:?}: {reason}")]
    BadValue {
        /// Where it came from (`FLEDGE_X` or `--flag`).
        source_name: String,
        /// The option path.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A command-line override names no option.
    #[error("unknown option {key}")]
    UnknownKey {
        /// The option path given.
        key: String,
    },
    /// The merged configuration does not fit the options (unknown field, wrong type, ...).
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Result of configuration calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A service `fledge serve` can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceKind {
    /// The REST apiserver.
    Apiserver,
    /// The job controller.
    Controller,
    /// The gRPC notifier.
    Notifier,
    /// The embedded MQTT broker.
    Broker,
    /// The rendezvous of the `p2p` channel backend (see [`crate::metaserver`]).
    Metaserver,
    /// The compute-side `process` deployer of one compute (see [`DeployerSection`]); not part
    /// of the default set, and it needs no store.
    Deployer,
}

impl ServiceKind {
    /// Every service, in start order.
    pub const ALL: [ServiceKind; 5] = [
        ServiceKind::Broker,
        ServiceKind::Metaserver,
        ServiceKind::Notifier,
        ServiceKind::Controller,
        ServiceKind::Apiserver,
    ];

    /// Every service name `--services` accepts.
    pub const KNOWN: [ServiceKind; 6] = [
        ServiceKind::Broker,
        ServiceKind::Metaserver,
        ServiceKind::Notifier,
        ServiceKind::Controller,
        ServiceKind::Apiserver,
        ServiceKind::Deployer,
    ];

    /// Whether this is a control-plane service (they share the store).
    pub fn is_control_plane(self) -> bool {
        !matches!(self, ServiceKind::Deployer)
    }

    /// The service's name.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceKind::Apiserver => "apiserver",
            ServiceKind::Controller => "controller",
            ServiceKind::Notifier => "notifier",
            ServiceKind::Broker => "broker",
            ServiceKind::Metaserver => "metaserver",
            ServiceKind::Deployer => "deployer",
        }
    }
}

impl fmt::Display for ServiceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ServiceKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        ServiceKind::KNOWN.into_iter().find(|k| k.as_str() == s.trim()).ok_or_else(|| {
            format!(
                "unknown service {s:?} (expected one of apiserver, controller, notifier, broker, metaserver, deployer)"
            )
        })
    }
}

/// Where the store lives, parsed from [`Options::store_url`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    /// A SQLite file (`sqlite://PATH`; `sqlite:///abs/path` is absolute).
    Sqlite(PathBuf),
    /// A PostgreSQL URL (`postgres://...` or `postgresql://...`), passed on whole.
    Postgres(String),
}

impl FromStr for StoreUrl {
    type Err = String;
    fn from_str(url: &str) -> std::result::Result<Self, String> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err("sqlite:// needs a file path, e.g. sqlite:///var/lib/fledge/fledge.db"
                    .to_owned());
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(url.to_owned()));
        }
        Err(format!("unsupported store URL {url:?} (expected sqlite://PATH or postgres://...)"))
    }
}

/// A listener: where to bind and what to tell others.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Address to bind, `host:port`; port 0 picks a free one (the bound address is reported).
    pub listen: SocketAddr,
    /// Address others use to reach it (URL for HTTP/gRPC, `host:port` for the broker); the
    /// bound address (with `0.0.0.0` read as `127.0.0.1`) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
}

impl Listen {
    fn on(port: u16) -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], port)), advertise: None }
    }
}

/// The MQTT broker tasks use: the embedded one (service `broker`), or the operator's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// Address the embedded broker binds, `host:port`; port 0 picks a free one. It serves
    /// MQTT over TLS (`mqtts`) with the control plane's identity unless `tls.insecure`.
    pub listen: SocketAddr,
    /// The broker written into task configs: `host:port`, `mqtt://host:port` (plain) or
    /// `mqtts://host:port` (TLS). Without a scheme it is `mqtts://` when the embedded broker
    /// runs here with TLS, plain otherwise. Default: the bound address (`0.0.0.0` read as
    /// `127.0.0.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// The CA (PEM) that an operator's `mqtts` broker's certificate chains to, given to tasks
    /// (and trusted by the Mosquitto provisioner). Default: tasks trust the control plane's CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl BrokerSection {
    /// Whether `advertise` names a TLS broker explicitly (`mqtts://` or `ssl://`).
    pub fn advertises_tls(&self) -> bool {
        self.advertise
            .as_deref()
            .is_some_and(|url| url.starts_with("mqtts://") || url.starts_with("ssl://"))
    }
}

/// Notifier section: listener plus [`notifier::Options`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifierSection {
    /// Address to bind, `host:port`. Default `127.0.0.1:10101`; port 0 picks a free one.
    pub listen: SocketAddr,
    /// URL agents and deployers use to reach it; `http://<bound address>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Most events kept per subscriber (events, default 256).
    pub mailbox_capacity: usize,
}

/// The compute-side deployer run by `fledge serve --services deployer`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployerSection {
    /// The compute this deployer serves. Default `default`.
    pub compute_id: String,
    /// The compute's API key (as registered with `POST /computes`); required when the deployer
    /// runs, given here, through `FLEDGE_DEPLOYER_API_KEY`, or (preferred) read from
    /// `api_key_file`. Never dumped, never passed on to workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// A file holding the compute's API key (e.g. mode 0600, or a secret a container runtime
    /// mounts; `FLEDGE_DEPLOYER_API_KEY_FILE`): read once at start, surrounding whitespace
    /// ignored, at most 4 KiB. Not with `api_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// Apiserver URL for the deployer and its workers. Default: this process's apiserver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apiserver: Option<String>,
    /// Notifier URL for the deployer and its workers. Default: this process's notifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifier: Option<String>,
    /// Root of the workers' directories. Default `<data_dir>/work`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_root: Option<PathBuf>,
    /// The control plane's CA (PEM) that the deployer and its workers trust
    /// (`FLEDGE_DEPLOYER_CA_FILE`). Default: this process's CA when the control plane runs
    /// here; required for an `https://` control plane elsewhere whose certificate is not
    /// signed by a system root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Most workers running at once; more wait in a queue. Default 64.
    pub max_workers: usize,
    /// Where workers run: `process` (child processes, the default), `docker` (one container
    /// per task on the local Docker Engine) or `kubernetes` (one Pod per task; see
    /// `docs/deployers.md`).
    pub platform: fledge_types::Platform,
    /// Kubernetes: the namespace of the worker Pods. Default: the deployer's own namespace in
    /// a cluster, else the kubeconfig context's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_namespace: Option<String>,
    /// Kubernetes: the worker image, as the cluster pulls it. Default `fledge-worker:latest`.
    pub k8s_image: String,
    /// Kubernetes: `Always`, `IfNotPresent` or `Never`. Default `IfNotPresent`.
    pub k8s_image_pull_policy: String,
    /// Kubernetes: a kubeconfig file. Default: the Pod's service account in a cluster, else
    /// `KUBECONFIG` or `~/.kube/config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_kubeconfig: Option<PathBuf>,
    /// Kubernetes: the service account the worker Pods run as (its token is never mounted).
    /// Default: the namespace's `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s_service_account: Option<String>,
    /// Docker: the worker image (build it with `fledge image build`). Default
    /// `fledge-worker:latest`.
    pub docker_image: String,
    /// Docker: the daemon's socket. Default `/var/run/docker.sock`.
    pub docker_socket: PathBuf,
    /// Docker: `job` (a bridge network per job; the control plane must listen where
    /// containers reach it) or `host` (the host's network, e.g. for a loopback control plane).
    /// Default `job`.
    pub docker_network: String,
    /// Docker: extra bind mounts for every worker, `HOST:CONTAINER[:ro|:rw]` (datasets named
    /// by `file://` URLs must be mounted where the URL points). Default none.
    pub docker_mounts: Vec<String>,
    /// Docker and Kubernetes: CPUs per worker (e.g. 1.5); 0 leaves it unlimited. Default 0.
    pub worker_cpus: f64,
    /// Docker and Kubernetes: memory per worker in MiB (no swap beyond it); 0 leaves it
    /// unlimited. Default 0.
    pub worker_memory_mib: u64,
    /// Docker: most processes per worker; 0 leaves it unlimited. Default 1024.
    pub worker_pids: i64,
    /// Names of variables of this process's environment (e.g. `AWS_ACCESS_KEY_ID`) that
    /// workers running Fledge's own built-in roles receive, for a registry that needs
    /// credentials (`s3`). User code (`main.py`, `command`) never receives them. Default none.
    pub registry_env: Vec<String>,
    /// Process workers: how task code is confined (Landlock, `docs/security.md`): `auto`
    /// (what the kernel supports; the deployer says at start what is in force), `required`
    /// (refuse to start without it) or `off`. Default `auto`.
    pub sandbox: String,
    /// Process workers: directories datasets must lie in; a task naming a dataset elsewhere
    /// fails at start. Default none: datasets anywhere but the protected paths (the data dir,
    /// the work root, the CLI config).
    pub sandbox_data_roots: Vec<PathBuf>,
    /// Process workers: more paths task code may read and execute (a shared Python
    /// installation, a model cache). Default none.
    pub sandbox_read: Vec<PathBuf>,
    /// Process workers: the IP address their p2p ends listen on (`0.0.0.0` when peers run on
    /// other machines). Default none: `127.0.0.1`. Docker workers on a job network always
    /// listen on every address of their container.
    pub p2p_listen_host: Option<std::net::IpAddr>,
    /// Process workers: the host name or IP address peers reach them at, advertised by their
    /// p2p ends (this machine's name on the network the jobs' peers share). Default none: the
    /// listen address. Docker workers on a job network advertise their task id, their name on
    /// that network.
    pub p2p_advertise_host: Option<String>,
}

/// Largest secret file read (keys and passwords are a few dozen bytes).
const MAX_API_KEY_FILE_BYTES: u64 = 4096;

/// The secret in the file `path` (option `key`): at most 4 KiB of UTF-8, surrounding
/// whitespace (a trailing newline) removed, one word. A missing, oversized, non-UTF-8 or blank
/// file is an error naming the option and the file.
fn read_secret_file(path: &Path, key: &str) -> Result<String> {
    let bad = |why: String| Error::Invalid(format!("{key}: {}: {why}", path.display()));
    let file = std::fs::File::open(path).map_err(|err| bad(err.to_string()))?;
    let mut text = String::new();
    let read = std::io::Read::read_to_string(
        &mut std::io::Read::take(file, MAX_API_KEY_FILE_BYTES + 1),
        &mut text,
    )
    .map_err(|err| bad(err.to_string()))?;
    if read as u64 > MAX_API_KEY_FILE_BYTES {
        return Err(bad(format!("larger than {MAX_API_KEY_FILE_BYTES} bytes")));
    }
    let secret = text.trim();
    if secret.is_empty() || secret.chars().any(char::is_whitespace) {
        return Err(bad("expected one secret, without whitespace inside".to_owned()));
    }
    Ok(secret.to_owned())
}

impl DeployerSection {
    /// Fills `api_key` from `api_key_file`, if one is named; a missing, oversized, non-UTF-8 or
    /// blank file, or a key given both ways, is an error naming the file.
    fn read_api_key_file(&mut self) -> Result<()> {
        let Some(path) = &self.api_key_file else { return Ok(()) };
        if self.api_key.is_some() {
            return Err(Error::Invalid(format!(
                "deployer.api_key_file: {}: the key is also given as deployer.api_key; set only one",
                path.display()
            )));
        }
        self.api_key = Some(
            read_secret_file(path, "deployer.api_key_file")
                .map_err(|err| Error::Invalid(err.to_string().replace("one secret", "one key")))?,
        );
        Ok(())
    }
}

/// The values of [`DeployerSection::sandbox`].
pub const SANDBOX_MODES: [&str; 3] = ["auto", "required", "off"];

impl Default for DeployerSection {
    fn default() -> Self {
        Self {
            compute_id: "default".to_owned(),
            api_key: None,
            api_key_file: None,
            apiserver: None,
            notifier: None,
            work_root: None,
            ca_file: None,
            max_workers: 64,
            platform: fledge_types::Platform::Process,
            docker_image: "fledge-worker:latest".to_owned(),
            docker_socket: PathBuf::from("/var/run/docker.sock"),
            docker_network: "job".to_owned(),
            docker_mounts: Vec::new(),
            k8s_namespace: None,
            k8s_image: "fledge-worker:latest".to_owned(),
            k8s_image_pull_policy: "IfNotPresent".to_owned(),
            k8s_kubeconfig: None,
            k8s_service_account: None,
            registry_env: Vec::new(),
            sandbox: "auto".to_owned(),
            sandbox_data_roots: Vec::new(),
            sandbox_read: Vec::new(),
            p2p_listen_host: None,
            p2p_advertise_host: None,
            worker_cpus: 0.0,
            worker_memory_mib: 0,
            worker_pids: 1024,
        }
    }
}

/// TLS of the control-plane listeners (apiserver, notifier, metaserver).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Serve plain text instead of TLS. Refused when the apiserver, notifier or metaserver
    /// binds a non-loopback address. Default false.
    pub insecure: bool,
    /// The operator's server certificate chain (PEM); default: one issued by the CA that
    /// `<data_dir>/tls` holds (created on first start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// The private key of `cert` (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
    /// The CA (PEM) that clients should trust for `cert`: served at `/api/v1/ca.pem` and put
    /// into task configs. Without it, clients of an operator's certificate use their own trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Extra names (hosts or IPs) for the generated server certificate, beyond `localhost`,
    /// the loopback addresses, the listeners' addresses and the advertised hosts.
    pub names: Vec<String>,
}

/// A Mosquitto that `fledge` provisions with task logins and topic ACLs through its
/// dynamic-security plugin (see `docs/mosquitto.md`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MosquittoSection {
    /// The broker to provision, `mqtt://host:port` or `mqtts://host:port` (verified against
    /// `broker.ca_file`, else the control plane's CA); none by default. Point `broker.advertise`
    /// at it (and leave the `broker` service out) so that task configs name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_url: Option<String>,
    /// The plugin's admin client. Default `fledge-admin`.
    pub admin_username: String,
    /// Its password; set it through `FLEDGE_MOSQUITTO_ADMIN_PASSWORD` rather than a file.
    /// Never dumped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_password: Option<String>,
    /// A file holding the password instead (`FLEDGE_MOSQUITTO_ADMIN_PASSWORD_FILE`; a mounted
    /// secret); read at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_password_file: Option<PathBuf>,
    /// Seconds between sweeps that delete the logins of ended jobs. Default 2.
    pub sweep_interval_secs: f64,
}

impl Default for MosquittoSection {
    fn default() -> Self {
        Self {
            admin_url: None,
            admin_username: "fledge-admin".to_owned(),
            admin_password: None,
            admin_password_file: None,
            sweep_interval_secs: 2.0,
        }
    }
}

impl MosquittoSection {
    /// The admin login, when a broker is to be provisioned.
    pub fn admin(&self) -> Option<crate::mosquitto::Admin> {
        Some(crate::mosquitto::Admin {
            ca: None,
            url: self.admin_url.clone()?,
            username: self.admin_username.clone(),
            password: self.admin_password.clone().unwrap_or_default(),
        })
    }
}

/// Every option of the control-plane services.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// Services to run. Default: all (`broker`, `notifier`, `controller`, `apiserver`).
    pub services: Vec<ServiceKind>,
    /// Directory for the SQLite database and code bundles. Default `./fledge-data`.
    pub data_dir: PathBuf,
    /// The store: `sqlite://PATH` or `postgres://user:pass@host/db`.
    /// Default `sqlite://<data_dir>/fledge.db`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_url: Option<String>,
    /// A file holding the password of a `postgres://user@host/db` store URL
    /// (`FLEDGE_STORE_PASSWORD_FILE`; a mounted secret), so that the URL carries none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_password_file: Option<PathBuf>,
    /// The password read from `store_password_file` at load; never serialized.
    #[serde(skip)]
    pub store_password: Option<String>,
    /// Directory of code bundles. Default `<data_dir>/blobs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob_dir: Option<PathBuf>,
    /// Largest code bundle accepted, in bytes. Default 104857600 (100 MiB).
    pub max_code_bytes: u64,
    /// The REST apiserver. Default listen `127.0.0.1:10100`.
    pub apiserver: Listen,
    /// The gRPC notifier. Default listen `127.0.0.1:10101`.
    pub notifier: NotifierSection,
    /// The MQTT broker: where the embedded one listens, what task configs name, and the CA of
    /// an operator's `mqtts` broker. Default listen `127.0.0.1:1883`.
    pub broker: BrokerSection,
    /// The metaserver (rendezvous of the `p2p` backend); `advertise` is the URL written into
    /// task configs. Default listen `127.0.0.1:10104`.
    pub metaserver: Listen,
    /// Controller timers (seconds) and queue size.
    pub controller: controller::Options,
    /// The compute-side deployer (service `deployer`).
    pub deployer: DeployerSection,
    /// TLS of the apiserver, notifier and metaserver (on unless `tls.insecure`).
    pub tls: TlsSection,
    /// A Mosquitto to provision with task logins (none by default).
    #[serde(default)]
    pub mosquitto: MosquittoSection,
    /// A listener of its own for `/metrics` (none by default: the apiserver serves it).
    #[serde(default)]
    pub metrics: MetricsSection,
    /// Bounds on what callers may make the services hold (metric records, code bundles,
    /// metaserver registrations).
    #[serde(default)]
    pub limits: LimitsSection,
}

/// `[limits]`: bounds on state that requests from outside create, each refused with an error
/// that names its setting. The defaults suit real jobs with room to spare.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Most metric records one `POST /tasks/{id}/metrics` may carry (413 beyond). Default 1000.
    pub metric_records_per_request: usize,
    /// Most metrics one record may carry (400 beyond). Default 256.
    pub metrics_per_record: usize,
    /// Most metric records a task may store over its job (413 beyond). Default 100000.
    pub metric_records_per_task: u64,
    /// Metric records a task may post per minute, on average, per apiserver; a task may post
    /// this many at once after a quiet minute (a token bucket). 429 beyond. Default 6000.
    pub metric_records_per_minute: u32,
    /// Most bytes a code bundle may inflate to (413 beyond). Default 268435456 (256 MiB).
    pub code_inflated_bytes: u64,
    /// Most entries a code bundle may hold (413 beyond). Default 10000.
    pub code_entries: usize,
    /// Most ends registered with the metaserver at once, over all jobs. Default 100000.
    pub metaserver_ends: usize,
    /// Most ends one job may have registered with the metaserver at once. Default 10000.
    pub metaserver_ends_per_job: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        let metaserver = crate::metaserver::Options::default();
        Self {
            metric_records_per_request: crate::api::DEFAULT_METRIC_RECORDS_PER_REQUEST,
            metrics_per_record: crate::api::DEFAULT_METRICS_PER_RECORD,
            metric_records_per_task: crate::api::DEFAULT_METRIC_RECORDS_PER_TASK,
            metric_records_per_minute: crate::api::DEFAULT_METRIC_RECORDS_PER_MINUTE,
            code_inflated_bytes: crate::api::DEFAULT_CODE_INFLATED_LIMIT,
            code_entries: crate::api::DEFAULT_CODE_ENTRIES_LIMIT,
            metaserver_ends: metaserver.max_ends,
            metaserver_ends_per_job: metaserver.max_ends_per_job,
        }
    }
}

impl LimitsSection {
    /// Checks that every bound is at least 1, naming the first that is not.
    pub fn validate(&self) -> Result<()> {
        let bounds = [
            ("metric_records_per_request", self.metric_records_per_request as u64),
            ("metrics_per_record", self.metrics_per_record as u64),
            ("metric_records_per_task", self.metric_records_per_task),
            ("metric_records_per_minute", u64::from(self.metric_records_per_minute)),
            ("code_inflated_bytes", self.code_inflated_bytes),
            ("code_entries", self.code_entries as u64),
            ("metaserver_ends", self.metaserver_ends as u64),
            ("metaserver_ends_per_job", self.metaserver_ends_per_job as u64),
        ];
        match bounds.into_iter().find(|(_, value)| *value == 0) {
            Some((name, _)) => Err(Error::Invalid(format!("limits.{name}: must be at least 1"))),
            None => Ok(()),
        }
    }

    /// The apiserver's limits: these over `base` (whose body and bundle sizes they keep).
    pub fn api(&self, base: crate::api::Limits) -> crate::api::Limits {
        crate::api::Limits {
            metric_records_per_request: self.metric_records_per_request,
            metrics_per_record: self.metrics_per_record,
            metric_records_per_task: self.metric_records_per_task,
            metric_records_per_minute: self.metric_records_per_minute,
            code_inflated_bytes: self.code_inflated_bytes,
            code_entries: self.code_entries,
            ..base
        }
    }

    /// The metaserver's options with these bounds.
    pub fn metaserver(&self) -> crate::metaserver::Options {
        crate::metaserver::Options {
            max_ends: self.metaserver_ends,
            max_ends_per_job: self.metaserver_ends_per_job,
            ..crate::metaserver::Options::default()
        }
    }
}

/// `[metrics]`: where a process serves its operator metrics when it runs no apiserver (or
/// wants them apart from the API).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of a `/metrics` listener (`host:port`). It serves TLS with the control plane's
    /// identity when this process runs control-plane services; a deployer-only process, or
    /// `tls.insecure`, serves plain text, allowed on loopback only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            services: ServiceKind::ALL.to_vec(),
            data_dir: PathBuf::from("fledge-data"),
            store_url: None,
            store_password_file: None,
            store_password: None,
            blob_dir: None,
            max_code_bytes: 100 * 1024 * 1024,
            apiserver: Listen::on(10100),
            notifier: NotifierSection {
                listen: SocketAddr::from(([127, 0, 0, 1], 10101)),
                advertise: None,
                mailbox_capacity: notifier::Options::default().mailbox_capacity,
            },
            broker: BrokerSection {
                listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
                advertise: None,
                ca_file: None,
            },
            metaserver: Listen::on(10104),
            controller: controller::Options::default(),
            deployer: DeployerSection::default(),
            tls: TlsSection::default(),
            mosquitto: MosquittoSection::default(),
            metrics: MetricsSection::default(),
            limits: LimitsSection::default(),
        }
    }
}

/// Options that are absent from the defaults but may be set (`None` by default), with a
/// template value that gives their type.
const OPTIONAL_KEYS: &[&str] = &[
    "store_url",
    "store_password_file",
    "blob_dir",
    "apiserver.advertise",
    "notifier.advertise",
    "broker.advertise",
    "broker.ca_file",
    "metaserver.advertise",
    "deployer.api_key",
    "deployer.api_key_file",
    "deployer.apiserver",
    "deployer.notifier",
    "deployer.work_root",
    "deployer.ca_file",
    "deployer.k8s_namespace",
    "deployer.k8s_kubeconfig",
    "deployer.k8s_service_account",
    "tls.cert",
    "tls.key",
    "tls.ca",
    "mosquitto.admin_url",
    "mosquitto.admin_password",
    "mosquitto.admin_password_file",
    "metrics.listen",
];

/// Sections whose name prefixes environment keys (`FLEDGE_<SECTION>_<KEY>`).
const SECTIONS: &[&str] = &[
    "apiserver",
    "notifier",
    "broker",
    "metaserver",
    "controller",
    "deployer",
    "tls",
    "mosquitto",
    "metrics",
    "limits",
];

impl Options {
    /// Loads options: defaults → `file` → `FLEDGE_*` entries of `env` → `overrides`
    /// (dotted option path → value, from command-line flags). Validates the result.
    pub fn load(
        file: Option<&Path>,
        env: &HashMap<String, String>,
        overrides: &[(String, String)],
    ) -> Result<Options> {
        let defaults = toml::Value::try_from(Options::default())
            .map_err(|err| Error::Invalid(format!("cannot render the defaults: {err}")))?;
        let mut merged = defaults.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .map_err(|source| Error::Read { path: path.to_owned(), source })?;
            let value: toml::Table = toml::from_str(&text)
                .map_err(|source| Error::Toml { path: path.to_owned(), source })?;
            merge(&mut merged, toml::Value::Table(value));
        }
        let mut env_keys: Vec<(&String, &String)> = env.iter().collect();
        env_keys.sort();
        for (name, value) in env_keys {
            let Some(rest) = name.strip_prefix("FLEDGE_") else {
                continue;
            };
            let Some(key) = env_key(&defaults, &rest.to_ascii_lowercase()) else {
                continue;
            };
            set(&mut merged, &defaults, &key, value, name)?;
        }
        for (key, value) in overrides {
            if lookup(&defaults, key).is_none() && !OPTIONAL_KEYS.contains(&key.as_str()) {
                return Err(Error::UnknownKey { key: key.clone() });
            }
            set(
                &mut merged,
                &defaults,
                key,
                value,
                &format!("--{}", key.replace(['.', '_'], "-")),
            )?;
        }
        // Through text rather than `Value::try_into`, so that errors quote the offending line
        // (with its key) of the merged configuration.
        let text = toml::to_string(&merged)
            .map_err(|err| Error::Invalid(format!("cannot render the configuration: {err}")))?;
        let mut options: Options = toml::from_str(&text)
            .map_err(|err: toml::de::Error| Error::Invalid(err.to_string().trim().to_owned()))?;
        options.deployer.read_api_key_file()?;
        options.read_secret_files()?;
        options.validate()?;
        Ok(options)
    }

    /// Reads `store_password_file` and `mosquitto.admin_password_file`; a secret given both
    /// in a file and inline is an error.
    fn read_secret_files(&mut self) -> Result<()> {
        if let Some(path) = &self.store_password_file {
            let password = read_secret_file(path, "store_password_file")?;
            let url = self.store_url.as_deref().unwrap_or_default();
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(Error::Invalid(
                    "store_password_file: only with a postgres:// store_url".to_owned(),
                ));
            }
            with_password(url, &password).map_err(|reason| {
                Error::Invalid(format!("store_password_file: store_url {reason}"))
            })?;
            self.store_password = Some(password);
        }
        if let Some(path) = &self.mosquitto.admin_password_file {
            if self.mosquitto.admin_password.is_some() {
                return Err(Error::Invalid(format!(
                    "mosquitto.admin_password_file: {}: the password is also given as \
                     mosquitto.admin_password (FLEDGE_MOSQUITTO_ADMIN_PASSWORD); set only one",
                    path.display()
                )));
            }
            self.mosquitto.admin_password =
                Some(read_secret_file(path, "mosquitto.admin_password_file")?);
        }
        Ok(())
    }

    /// Checks every option, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.services.is_empty() {
            return Err(Error::Invalid("services: name at least one service".to_owned()));
        }
        if self.runs(ServiceKind::Controller) && !self.runs(ServiceKind::Notifier) {
            // The controller publishes into the notifier's in-process mailboxes.
            return Err(Error::Invalid(
                "services: the controller needs the notifier in the same process; add notifier"
                    .to_owned(),
            ));
        }
        if self.runs(ServiceKind::Deployer) {
            let deployer = &self.deployer;
            if deployer.compute_id.trim().is_empty() {
                return Err(Error::Invalid("deployer.compute_id: must not be empty".to_owned()));
            }
            // With the store in this process, `fledge serve` registers the compute itself.
            if deployer.api_key.as_deref().is_none_or(|k| k.trim().is_empty())
                && !self.runs_control_plane()
            {
                return Err(Error::Invalid(
                    "deployer.api_key: required when the deployer runs without the control plane (deployer.api_key_file, FLEDGE_DEPLOYER_API_KEY_FILE or FLEDGE_DEPLOYER_API_KEY)"
                        .to_owned(),
                ));
            }
            if deployer.max_workers == 0 {
                return Err(Error::Invalid("deployer.max_workers: must be at least 1".to_owned()));
            }
            if !SANDBOX_MODES.contains(&deployer.sandbox.as_str()) {
                return Err(Error::Invalid(format!(
                    "deployer.sandbox: {:?} is not one of {}",
                    deployer.sandbox,
                    SANDBOX_MODES.join(", ")
                )));
            }
            for (field, paths) in [
                ("sandbox_data_roots", &deployer.sandbox_data_roots),
                ("sandbox_read", &deployer.sandbox_read),
            ] {
                if paths.len() > 64 {
                    return Err(Error::Invalid(format!(
                        "deployer.{field}: {} paths, at most 64",
                        paths.len()
                    )));
                }
                if let Some(path) = paths.iter().find(|p| !p.is_absolute()) {
                    return Err(Error::Invalid(format!(
                        "deployer.{field}: {} is not an absolute path",
                        path.display()
                    )));
                }
            }
            if let Some(host) = &deployer.p2p_advertise_host
                && let Err(why) = fledge_types::validate::dialable_host(host)
            {
                return Err(Error::Invalid(format!("deployer.p2p_advertise_host: {host:?} {why}")));
            }
            if deployer.p2p_listen_host.is_some_and(|ip| ip.is_unspecified())
                && deployer.p2p_advertise_host.is_none()
            {
                return Err(Error::Invalid(
                    "deployer.p2p_listen_host: listening on every address needs \
                     deployer.p2p_advertise_host, the name peers reach the workers at"
                        .to_owned(),
                ));
            }
            for (field, url, local) in [
                ("apiserver", &deployer.apiserver, ServiceKind::Apiserver),
                ("notifier", &deployer.notifier, ServiceKind::Notifier),
            ] {
                if url.is_none() && !self.runs(local) {
                    return Err(Error::Invalid(format!(
                        "deployer.{field}: set the {field} URL, or run the {field} in this process"
                    )));
                }
            }
        }
        self.validate_tls()?;
        self.validate_broker()?;
        let mosquitto = &self.mosquitto;
        if mosquitto.admin_url.is_some() {
            if mosquitto.admin_password.as_deref().is_none_or(|p| p.is_empty()) {
                return Err(Error::Invalid(
                    "mosquitto.admin_password: required with mosquitto.admin_url \
                     (FLEDGE_MOSQUITTO_ADMIN_PASSWORD)"
                        .to_owned(),
                ));
            }
            if mosquitto.admin_username.trim().is_empty() {
                return Err(Error::Invalid(
                    "mosquitto.admin_username: must not be empty".to_owned(),
                ));
            }
            if !(mosquitto.sweep_interval_secs.is_finite() && mosquitto.sweep_interval_secs > 0.0) {
                return Err(Error::Invalid(
                    "mosquitto.sweep_interval_secs: must be a positive number".to_owned(),
                ));
            }
        }
        if self.max_code_bytes == 0 {
            return Err(Error::Invalid("max_code_bytes: must be at least 1".to_owned()));
        }
        self.limits.validate()?;
        if let Some(addr) = self.metrics.listen
            && (self.tls.insecure || !self.runs_control_plane())
            && !addr.ip().is_loopback()
        {
            return Err(Error::Invalid(format!(
                "metrics.listen: {addr} would serve plain text (this process has no TLS \
                 identity{}); listen on 127.0.0.1 or ::1",
                if self.tls.insecure { " under tls.insecure" } else { ": it runs only a deployer" }
            )));
        }
        self.store().map_err(|reason| Error::Invalid(format!("store_url: {reason}")))?;
        self.controller.validate().map_err(|err| Error::Invalid(err.to_string()))?;
        self.notifier_options().validate().map_err(|err| Error::Invalid(err.to_string()))?;
        Ok(())
    }

    /// Checks the `[tls]` section: a certificate comes with its key, and plain text only on
    /// loopback.
    fn validate_tls(&self) -> Result<()> {
        let tls = &self.tls;
        if tls.cert.is_some() != tls.key.is_some() {
            return Err(Error::Invalid(
                "tls.cert and tls.key: give both (--tls-cert and --tls-key) or neither".to_owned(),
            ));
        }
        if tls.ca.is_some() && tls.cert.is_none() {
            return Err(Error::Invalid(
                "tls.ca: only with your own tls.cert and tls.key (the generated CA is <data_dir>/tls/ca.pem)"
                    .to_owned(),
            ));
        }
        if tls.insecure {
            if tls.cert.is_some() {
                return Err(Error::Invalid(
                    "tls.insecure: contradicts tls.cert; drop one of them".to_owned(),
                ));
            }
            for (service, addr) in self.tls_listeners() {
                if !addr.ip().is_loopback() {
                    return Err(Error::Invalid(format!(
                        "tls.insecure (--insecure): the {service} listens on {addr}, which is not a \
                         loopback address; plain text is allowed only on 127.0.0.1 or ::1, so \
                         drop --insecure (TLS is the default) or listen on loopback"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Checks `[broker]`: what task configs are told agrees with what the embedded broker
    /// serves, and a CA file goes with an explicit `mqtts://` broker that is not the embedded
    /// one.
    fn validate_broker(&self) -> Result<()> {
        let broker = &self.broker;
        let advertise = broker.advertise.as_deref().unwrap_or_default();
        if self.runs(ServiceKind::Broker) {
            if broker.ca_file.is_some() {
                return Err(Error::Invalid(
                    "broker.ca_file: the embedded broker presents the control plane's \
                     certificate, which tasks verify with the control plane's CA; ca_file is \
                     for an mqtts broker of your own (leave the broker service out)"
                        .to_owned(),
                ));
            }
            if !self.tls.insecure && advertise.starts_with("mqtt://") {
                return Err(Error::Invalid(format!(
                    "broker.advertise: {advertise} is plain MQTT, but the embedded broker serves \
                     TLS (mqtts); write it without a scheme or as mqtts://"
                )));
            }
            if self.tls.insecure && broker.advertises_tls() {
                return Err(Error::Invalid(format!(
                    "broker.advertise: {advertise} is mqtts, but under tls.insecure the embedded \
                     broker serves plain MQTT"
                )));
            }
        } else if broker.ca_file.is_some() && !broker.advertises_tls() {
            return Err(Error::Invalid(
                "broker.ca_file: only with an mqtts:// broker.advertise (the broker the CA is for)"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// The listeners that serve TLS (or plain text under `tls.insecure`): those of the
    /// apiserver, notifier, metaserver and embedded broker that run here.
    pub fn tls_listeners(&self) -> Vec<(ServiceKind, SocketAddr)> {
        [
            (ServiceKind::Apiserver, self.apiserver.listen),
            (ServiceKind::Notifier, self.notifier.listen),
            (ServiceKind::Metaserver, self.metaserver.listen),
            (ServiceKind::Broker, self.broker.listen),
        ]
        .into_iter()
        .filter(|(service, _)| self.runs(*service))
        .collect()
    }

    /// The directory of the generated CA and server certificate (`<data_dir>/tls`).
    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("tls")
    }

    /// The store to open (a PostgreSQL URL with the password of `store_password_file`).
    pub fn store(&self) -> std::result::Result<StoreUrl, String> {
        match &self.store_url {
            Some(url) => match url.parse()? {
                StoreUrl::Postgres(url) => match &self.store_password {
                    Some(password) => Ok(StoreUrl::Postgres(with_password(&url, password)?)),
                    None => Ok(StoreUrl::Postgres(url)),
                },
                sqlite => Ok(sqlite),
            },
            None => Ok(StoreUrl::Sqlite(self.data_dir.join("fledge.db"))),
        }
    }

    /// The code bundle directory.
    pub fn blob_dir(&self) -> PathBuf {
        self.blob_dir.clone().unwrap_or_else(|| self.data_dir.join("blobs"))
    }

    /// The file holding the secret the controller derives task keys from
    /// (`<data_dir>/secrets/task-keys.secret`, created on first start, mode 0600).
    pub fn task_key_secret_path(&self) -> PathBuf {
        self.data_dir.join("secrets").join("task-keys.secret")
    }

    /// The file holding the secret broker logins are derived from
    /// (`<data_dir>/secrets/broker.secret`, created on first start, mode 0600).
    pub fn broker_secret_path(&self) -> PathBuf {
        self.data_dir.join("secrets").join("broker.secret")
    }

    /// The notifier's own options.
    pub fn notifier_options(&self) -> notifier::Options {
        notifier::Options {
            mailbox_capacity: self.notifier.mailbox_capacity,
            ..notifier::Options::default()
        }
    }

    /// Whether `service` is to run.
    pub fn runs(&self, service: ServiceKind) -> bool {
        self.services.contains(&service)
    }

    /// Whether any control-plane service (which needs the store) is to run.
    pub fn runs_control_plane(&self) -> bool {
        self.services.iter().any(|s| s.is_control_plane())
    }

    /// The effective configuration as TOML (`--dump-config`), with secrets redacted.
    pub fn to_toml(&self) -> Result<String> {
        let mut shown = self.clone();
        if shown.deployer.api_key.is_some() {
            shown.deployer.api_key = Some("<redacted>".to_owned());
        }
        if shown.mosquitto.admin_password.is_some() && shown.mosquitto.admin_password_file.is_none()
        {
            shown.mosquitto.admin_password = Some("<redacted>".to_owned());
        } else if shown.mosquitto.admin_password_file.is_some() {
            // Read from its file: the file is what was configured.
            shown.mosquitto.admin_password = None;
        }
        toml::to_string_pretty(&shown)
            .map_err(|err| Error::Invalid(format!("cannot render the configuration: {err}")))
    }
}

/// `url` (`postgres://user@host...`) with `password` put into its user info, percent-encoded;
/// an error when it names no user or has a password already.
fn with_password(url: &str, password: &str) -> std::result::Result<String, String> {
    let (scheme, rest) = url.split_once("://").ok_or("has no scheme")?;
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((user_info, host)) = authority.rsplit_once('@') else {
        return Err("names no user (postgres://USER@HOST/DB)".to_owned());
    };
    if user_info.contains(':') {
        return Err("has a password already; remove it from the URL".to_owned());
    }
    if user_info.is_empty() {
        return Err("names no user (postgres://USER@HOST/DB)".to_owned());
    }
    let mut encoded = String::new();
    for byte in password.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    Ok(format!("{scheme}://{user_info}:{encoded}@{host}{tail}"))
}

/// Maps an environment key (lower case, without `FLEDGE_`) to a dotted option path.
fn env_key(defaults: &toml::Value, key: &str) -> Option<String> {
    for section in SECTIONS {
        if let Some(field) = key.strip_prefix(section).and_then(|k| k.strip_prefix('_')) {
            let path = format!("{section}.{field}");
            if lookup(defaults, &path).is_some() || OPTIONAL_KEYS.contains(&path.as_str()) {
                return Some(path);
            }
        }
    }
    (lookup(defaults, key).is_some_and(|v| !v.is_table()) || OPTIONAL_KEYS.contains(&key))
        .then(|| key.to_owned())
}

fn lookup<'a>(value: &'a toml::Value, path: &str) -> Option<&'a toml::Value> {
    path.split('.').try_fold(value, |value, part| value.as_table()?.get(part))
}

/// Sets `path` in `merged` to `raw`, typed like the default at that path.
fn set(
    merged: &mut toml::Value,
    defaults: &toml::Value,
    path: &str,
    raw: &str,
    source_name: &str,
) -> Result<()> {
    let bad = |reason: &str| Error::BadValue {
        source_name: source_name.to_owned(),
        key: path.to_owned(),
        value: raw.to_owned(),
        reason: reason.to_owned(),
    };
    let value = match lookup(defaults, path) {
        Some(toml::Value::Integer(_)) => {
            toml::Value::Integer(raw.trim().parse().map_err(|_| bad("expected an integer"))?)
        }
        Some(toml::Value::Float(_)) => {
            toml::Value::Float(raw.trim().parse().map_err(|_| bad("expected a number"))?)
        }
        Some(toml::Value::Boolean(_)) => {
            toml::Value::Boolean(raw.trim().parse().map_err(|_| bad("expected true or false"))?)
        }
        Some(toml::Value::Array(_)) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        Some(toml::Value::Table(_)) => return Err(bad("names a section, not an option")),
        _ => toml::Value::String(raw.to_owned()),
    };
    let mut table = merged.as_table_mut().expect("the merged configuration is a table");
    let parts: Vec<&str> = path.split('.').collect();
    let (last, parents) = parts.split_last().expect("split yields at least one part");
    for part in parents {
        table = table
            .entry((*part).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| bad("its section is not a table"))?;
    }
    table.insert((*last).to_owned(), value);
    Ok(())
}

/// Deep-merges `over` into `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(base), toml::Value::Table(over)) => {
            for (key, value) in over {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, over) => *base = over,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn layers_apply_in_order_defaults_file_env_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("fledge.toml");
        std::fs::write(
            &file,
            r#"
data_dir = "/srv/fledge"
max_code_bytes = 1000
[apiserver]
listen = "0.0.0.0:9000"
[controller]
stop_grace_secs = 5.0
"#,
        )
        .expect("write config");
        let options = Options::load(
            Some(&file),
            &env(&[
                ("FLEDGE_APISERVER_LISTEN", "127.0.0.1:9100"),
                ("FLEDGE_CONTROLLER_STOP_GRACE_SECS", "7"),
                ("FLEDGE_SERVICES", "apiserver, controller,notifier"),
                ("FLEDGE_STORE_URL", "postgres://u@db/fledge"),
                ("FLEDGE_LOG", "debug"),
                ("HOME", "/root"),
            ]),
            &[("controller.stop_grace_secs".to_owned(), "9".to_owned())],
        )
        .expect("valid layers");
        assert_eq!(options.data_dir, PathBuf::from("/srv/fledge"));
        assert_eq!(options.max_code_bytes, 1000);
        assert_eq!(options.apiserver.listen.to_string(), "127.0.0.1:9100");
        assert_eq!(options.controller.stop_grace_secs, 9.0);
        assert_eq!(
            options.services,
            vec![ServiceKind::Apiserver, ServiceKind::Controller, ServiceKind::Notifier]
        );
        assert_eq!(options.store(), Ok(StoreUrl::Postgres("postgres://u@db/fledge".to_owned())));
        // Untouched options keep their defaults.
        assert_eq!(options.notifier.listen.to_string(), "127.0.0.1:10101");
        assert_eq!(options.blob_dir(), PathBuf::from("/srv/fledge/blobs"));

        // The dump loads back to the same options.
        let dumped = dir.path().join("dump.toml");
        std::fs::write(&dumped, options.to_toml().expect("render")).expect("write dump");
        let reloaded = Options::load(Some(&dumped), &HashMap::new(), &[]).expect("reload");
        assert_eq!(reloaded, options);
    }

    #[test]
    fn insecure_on_loopback_and_tls_anywhere_are_valid() {
        let options =
            Options::load(None, &env(&[("FLEDGE_TLS_INSECURE", "true")]), &[]).expect("loopback");
        assert!(options.tls.insecure);
        let options = Options::load(
            None,
            &env(&[("FLEDGE_APISERVER_LISTEN", "0.0.0.0:10100")]),
            &[("tls.names".to_owned(), "fledge.example, 10.0.0.2".to_owned())],
        )
        .expect("TLS on a public address");
        assert!(!options.tls.insecure);
        assert_eq!(options.tls.names, ["fledge.example", "10.0.0.2"]);
        assert_eq!(options.tls_dir(), PathBuf::from("fledge-data/tls"));
    }

    #[test]
    fn defaults_are_valid_and_sqlite_lives_in_the_data_dir() {
        let options = Options::load(None, &HashMap::new(), &[]).expect("defaults");
        assert_eq!(options, Options::default());
        assert_eq!(options.store(), Ok(StoreUrl::Sqlite(PathBuf::from("fledge-data/fledge.db"))));
        assert_eq!(
            "sqlite:///var/x.db".parse::<StoreUrl>(),
            Ok(StoreUrl::Sqlite(PathBuf::from("/var/x.db")))
        );
    }

    #[test]
    fn a_deployer_only_process_needs_its_key_and_urls_and_never_dumps_the_key() {
        let options = Options::load(
            None,
            &env(&[
                ("FLEDGE_SERVICES", "deployer"),
                ("FLEDGE_DEPLOYER_API_KEY", "s3cret"),
                ("FLEDGE_DEPLOYER_COMPUTE_ID", "eu"),
                ("FLEDGE_DEPLOYER_APISERVER", "http://cp:10100"),
                ("FLEDGE_DEPLOYER_NOTIFIER", "http://cp:10101"),
            ]),
            &[],
        )
        .expect("valid deployer config");
        assert!(!options.runs_control_plane());
        assert_eq!(options.deployer.compute_id, "eu");
        assert_eq!(options.deployer.api_key.as_deref(), Some("s3cret"));
        let dump = options.to_toml().expect("render");
        assert!(!dump.contains("s3cret") && dump.contains("<redacted>"), "{dump}");
    }

    /// Every `[limits]` setting reaches the service it bounds.
    #[test]
    fn limits_reach_the_apiserver_and_the_metaserver() {
        let options = Options::load(
            None,
            &env(&[
                ("FLEDGE_LIMITS_METRIC_RECORDS_PER_MINUTE", "120"),
                ("FLEDGE_LIMITS_METASERVER_ENDS_PER_JOB", "50"),
            ]),
            &[("limits.metric_records_per_task".to_owned(), "7".to_owned())],
        )
        .expect("valid");
        let base = crate::api::Limits {
            json_bytes: 1,
            code_bytes: 2,
            code_inflated_bytes: 3,
            code_entries: 4,
            metric_records_per_request: 5,
            metrics_per_record: 6,
            metric_records_per_task: 7,
            metric_records_per_minute: 8,
        };
        let api = options.limits.api(base);
        assert_eq!((api.json_bytes, api.code_bytes), (1, 2), "body sizes are kept");
        assert_eq!((api.metric_records_per_minute, api.metric_records_per_task), (120, 7));
        assert_eq!(api.metric_records_per_request, 1_000, "the default");
        assert_eq!(api.code_inflated_bytes, crate::api::DEFAULT_CODE_INFLATED_LIMIT);
        let metaserver = options.limits.metaserver();
        assert_eq!((metaserver.max_ends_per_job, metaserver.max_ends), (50, 100_000));
        metaserver.validate().expect("valid");
    }

    #[test]
    fn bad_config_names_what_is_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let check = |toml_text: &str, env_pairs: &[(&str, &str)], needle: &str| {
            let file = dir.path().join("c.toml");
            std::fs::write(&file, toml_text).expect("write");
            let err = Options::load(Some(&file), &env(env_pairs), &[])
                .expect_err("must be rejected")
                .to_string();
            assert!(err.contains(needle), "{err:?} lacks {needle:?}");
        };
        check("data_dirr = \"x\"", &[], "data_dirr");
        check("[apiserver]\nlisten = \"nowhere\"", &[], "listen");
        check("[controller]\nbogus = 1", &[], "bogus");
        check("store_url = \"mysql://x\"", &[], "store_url");
        check("services = [\"apiserver\", \"metrics\"]", &[], "metrics");
        check("services = []", &[], "services");
        check("services = [\"controller\", \"apiserver\"]", &[], "needs the notifier");
        check("services = [\"deployer\"]", &[], "deployer.api_key");
        let deployer = [("FLEDGE_DEPLOYER_API_KEY", "k")];
        let compute = |line: &str| {
            format!(
                "services = [\"deployer\"]\n[deployer]\napiserver = \"https://cp:1\"\n\
                 notifier = \"https://cp:2\"\n{line}\n"
            )
        };
        check(&compute("p2p_listen_host = \"site-a\""), &deployer, "p2p_listen_host");
        check(&compute("p2p_listen_host = \"0.0.0.0\""), &deployer, "p2p_advertise_host");
        check(&compute("p2p_advertise_host = \"a b\""), &deployer, "p2p_advertise_host");
        check(&compute("p2p_advertise_host = \"0.0.0.0\""), &deployer, "p2p_advertise_host");
        let key_file = dir.path().join("compute.key");
        std::fs::write(&key_file, "  k3y-from-file\n").unwrap();
        let env: HashMap<String, String> =
            [("FLEDGE_DEPLOYER_API_KEY_FILE".to_owned(), key_file.display().to_string())].into();
        let file = dir.path().join("deployer.toml");
        std::fs::write(
            &file,
            "services = [\"deployer\"]\n[deployer]\napiserver = \"http://cp:1\"\nnotifier = \"http://cp:2\"\n",
        )
        .unwrap();
        let options = Options::load(Some(&file), &env, &[]).unwrap();
        assert_eq!(options.deployer.api_key.as_deref(), Some("k3y-from-file"));
        for (text, why) in [("", "expected one key"), ("a b", "expected one key")] {
            std::fs::write(&key_file, text).unwrap();
            let err = Options::load(None, &env, &[]).unwrap_err().to_string();
            assert!(err.contains("api_key_file") && err.contains(why), "{err}");
        }
        std::fs::write(&key_file, vec![b'k'; 5000]).unwrap();
        let err = Options::load(None, &env, &[]).unwrap_err().to_string();
        assert!(err.contains("larger than 4096"), "{err}");
        let mut both = env.clone();
        both.insert("FLEDGE_DEPLOYER_API_KEY".into(), "k".into());
        std::fs::write(&key_file, "k").unwrap();
        let err = Options::load(None, &both, &[]).unwrap_err().to_string();
        assert!(err.contains("set only one"), "{err}");
        let missing: HashMap<String, String> =
            [("FLEDGE_DEPLOYER_API_KEY_FILE".to_owned(), "/nonexistent/key".to_owned())].into();
        let err = Options::load(None, &missing, &[]).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/key"), "{err}");
        check("services = [\"deployer\"]\n[deployer]\napi_key = \"k\"", &[], "deployer.apiserver");
        check("[controller]\nstop_grace_secs = -1.0", &[], "stop_grace_secs");
        check("data_dir = ", &[], "not valid TOML");
        check("", &[("FLEDGE_MAX_CODE_BYTES", "lots")], "FLEDGE_MAX_CODE_BYTES");
        check("", &[("FLEDGE_NOTIFIER_MAILBOX_CAPACITY", "0")], "mailbox_capacity");
        check("[limits]\nmetric_records_per_minute = 0", &[], "limits.metric_records_per_minute");
        check("", &[("FLEDGE_LIMITS_METASERVER_ENDS_PER_JOB", "0")], "metaserver_ends_per_job");
        check("[limits]\nmetric_rows = 1", &[], "metric_rows");
        // Plain text only on loopback; a certificate comes with its key.
        check(
            "[tls]\ninsecure = true\n[apiserver]\nlisten = \"0.0.0.0:10100\"",
            &[],
            "the apiserver listens on 0.0.0.0:10100, which is not a loopback address",
        );
        check(
            "[metaserver]\nlisten = \"192.168.1.2:1\"",
            &[("FLEDGE_TLS_INSECURE", "true")],
            "not a loopback address",
        );
        check("[tls]\ncert = \"/c.pem\"", &[], "tls.cert and tls.key");
        check("[tls]\nca = \"/ca.pem\"", &[], "tls.ca");
        check("[tls]\ninsecure = true\ncert = \"/c\"\nkey = \"/k\"", &[], "contradicts");
        // The embedded broker follows the same rule, and the broker settings must agree with
        // what it serves.
        check(
            "[tls]\ninsecure = true\n[broker]\nlisten = \"0.0.0.0:1883\"",
            &[],
            "the broker listens on 0.0.0.0:1883",
        );
        check("[broker]\nadvertise = \"mqtt://h:1883\"", &[], "plain MQTT");
        check(
            "[tls]\ninsecure = true\n[broker]\nadvertise = \"mqtts://h:1883\"",
            &[],
            "serves plain MQTT",
        );
        check("[broker]\nca_file = \"/ca.pem\"", &[], "the embedded broker presents");
        check(
            "services = [\"apiserver\"]\n[broker]\nadvertise = \"h:1883\"\nca_file = \"/ca.pem\"",
            &[],
            "only with an mqtts:// broker.advertise",
        );

        let err = Options::load(None, &HashMap::new(), &[("nope".to_owned(), "1".to_owned())])
            .expect_err("unknown override");
        assert!(err.to_string().contains("nope"), "{err}");
        let err = Options::load(Some(&dir.path().join("missing.toml")), &HashMap::new(), &[])
            .expect_err("missing file");
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }

    /// Secrets in files: the store's password goes into the PostgreSQL URL (percent-encoded),
    /// never into the dump; Mosquitto's admin password likewise; bad files and double
    /// settings are refused naming the setting.
    #[test]
    fn secrets_come_from_files_and_stay_out_of_the_dump() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("pg");
        std::fs::write(&password, "p@ss/w:rd\n").unwrap();
        let admin = dir.path().join("mq");
        std::fs::write(&admin, " s3cret-admin \n").unwrap();
        let options = Options::load(
            None,
            &env(&[
                ("FLEDGE_STORE_URL", "postgres://fledge@db:5432/fledge?sslmode=disable"),
                ("FLEDGE_STORE_PASSWORD_FILE", password.to_str().unwrap()),
                ("FLEDGE_MOSQUITTO_ADMIN_URL", "mqtt://mq:1883"),
                ("FLEDGE_MOSQUITTO_ADMIN_PASSWORD_FILE", admin.to_str().unwrap()),
            ]),
            &[],
        )
        .expect("valid");
        assert_eq!(
            options.store(),
            Ok(StoreUrl::Postgres(
                "postgres://fledge:p%40ss%2Fw%3Ard@db:5432/fledge?sslmode=disable".to_owned()
            ))
        );
        assert_eq!(options.mosquitto.admin_password.as_deref(), Some("s3cret-admin"));
        let dump = options.to_toml().unwrap();
        assert!(!dump.contains("p%40ss") && !dump.contains("s3cret-admin"), "{dump}");

        let check = |pairs: &[(&str, &str)], want: &str| {
            let err = Options::load(None, &env(pairs), &[]).expect_err(want).to_string();
            assert!(err.contains(want), "{want}: {err}");
        };
        let file = password.to_str().unwrap();
        check(&[("FLEDGE_STORE_PASSWORD_FILE", file)], "only with a postgres:// store_url");
        check(
            &[("FLEDGE_STORE_URL", "postgres://db/fledge"), ("FLEDGE_STORE_PASSWORD_FILE", file)],
            "names no user",
        );
        check(
            &[
                ("FLEDGE_STORE_URL", "postgres://u:p@db/fledge"),
                ("FLEDGE_STORE_PASSWORD_FILE", file),
            ],
            "has a password already",
        );
        let missing = dir.path().join("missing");
        check(
            &[
                ("FLEDGE_STORE_URL", "postgres://u@db/fledge"),
                ("FLEDGE_STORE_PASSWORD_FILE", missing.to_str().unwrap()),
            ],
            "store_password_file",
        );
        std::fs::write(&missing, "\n").unwrap();
        check(
            &[
                ("FLEDGE_STORE_URL", "postgres://u@db/fledge"),
                ("FLEDGE_STORE_PASSWORD_FILE", missing.to_str().unwrap()),
            ],
            "expected one secret",
        );
        check(
            &[
                ("FLEDGE_MOSQUITTO_ADMIN_URL", "mqtt://mq:1883"),
                ("FLEDGE_MOSQUITTO_ADMIN_PASSWORD", "x"),
                ("FLEDGE_MOSQUITTO_ADMIN_PASSWORD_FILE", admin.to_str().unwrap()),
            ],
            "set only one",
        );
        // With the store in this process, a deployer needs no key (serve registers it).
        Options::load(
            None,
            &env(&[("FLEDGE_SERVICES", "apiserver,notifier,controller,deployer")]),
            &[],
        )
        .expect("a deployer beside the control plane needs no key");
    }
}
