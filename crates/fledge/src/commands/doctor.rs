//! `fledge doctor`: checks what `fledge standalone` or `fledge serve` would run with (the same
//! flags, configuration file and `FLEDGE_*` environment) before it runs, or while it runs, and
//! says what is wrong in words an operator can act on.
//!
//! Each check ends `ok`, `warn` (it will run, but look) or `fail` (it will not run, or a job
//! will fail); the exit code is 1 when one failed. Checks only read: nothing is created,
//! migrated or started.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use fledge_control::config::{Options, ServiceKind, StoreUrl};
use fledge_types::Platform;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;

use super::Exit;

/// How long a network check waits for an answer.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Free space below which the data directory is a warning.
const LOW_DISK_BYTES: u64 = 1 << 30;
/// How soon a certificate's expiry is a warning.
const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// Arguments of `fledge doctor`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Whose configuration to check (default: `standalone` with its defaults).
    #[command(subcommand)]
    pub target: Option<Target>,
    /// Also check this MLflow tracking server (a job's `modelSpec.registry` uri); default
    /// `$MLFLOW_TRACKING_URI` when set.
    #[arg(long, value_name = "URL", global = true)]
    pub mlflow_url: Option<String>,
    /// Output format: `table` or `json`.
    #[arg(short = 'o', long, value_name = "FORMAT", default_value = "table", global = true)]
    pub output: Format,
}

/// The output formats.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// One line per check.
    Table,
    /// A JSON array of `{check, status, detail}`.
    Json,
}

/// What is checked.
#[derive(clap::Subcommand, Debug)]
pub enum Target {
    /// What `fledge standalone` with these flags would run.
    Standalone(super::standalone::Args),
    /// What `fledge serve` with these flags would run.
    Serve(Box<super::serve::Args>),
}

/// How a check ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

/// One check's result.
#[derive(Debug, Serialize)]
struct Check {
    check: String,
    status: Status,
    detail: String,
}

impl Check {
    fn new(check: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
        Check { check: check.into(), status, detail: detail.into() }
    }
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let (overrides, config, deployer) = match &args.target {
        None => {
            let defaults = super::standalone::Args::defaults();
            (defaults.overrides()?, None, true)
        }
        Some(Target::Standalone(a)) => (a.overrides()?, a.config.clone(), !a.no_deployer),
        Some(Target::Serve(a)) => (a.overrides()?, a.config.clone(), false),
    };
    let mut checks = Vec::new();
    match super::serve::load_options(config.as_deref(), &env, &overrides) {
        Err(err) => checks.push(Check::new("configuration", Status::Fail, format!("{err:#}"))),
        Ok(options) => {
            checks.push(Check::new("configuration", Status::Ok, services_line(&options)));
            checks.extend(check_options(&options, deployer).await);
        }
    }
    checks.extend(check_mlflow_servers(args.mlflow_url.as_deref(), &env).await);
    print(&checks, args.output)?;
    if checks.iter().any(|c| c.status == Status::Fail) {
        return Err(Exit(1).into());
    }
    Ok(())
}

fn services_line(options: &Options) -> String {
    let names: Vec<&str> = options.services.iter().map(|s| s.as_str()).collect();
    format!("services {}; data directory {}", names.join(","), options.data_dir.display())
}

async fn check_options(options: &Options, deployer: bool) -> Vec<Check> {
    let mut checks = vec![check_data_dir(&options.data_dir)];
    if options.runs_control_plane() {
        checks.push(check_store(options));
    }
    checks.push(check_tls(options));
    checks.extend(check_listeners(options).await);
    if let Some(url) = &options.mosquitto.admin_url {
        checks.push(check_mosquitto(url, options.mosquitto.admin_password.is_some()));
    }
    if deployer || options.runs(ServiceKind::Deployer) {
        checks.push(check_deployer(options).await);
        checks.extend(check_compute_reach(options).await);
        if options.deployer.platform == Platform::Process {
            checks.push(check_sandbox(&options.deployer.sandbox));
        }
        checks.push(check_python().await);
    }
    checks
}

/// The data directory exists and is writable (or can be created), with room to spare.
fn check_data_dir(dir: &Path) -> Check {
    const NAME: &str = "data directory";
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    let probe = existing.join(format!(".fledge-doctor-{}", std::process::id()));
    if let Err(err) = std::fs::write(&probe, b"") {
        return Check::new(
            NAME,
            Status::Fail,
            format!("{} is not writable: {err}", existing.display()),
        );
    }
    let _ = std::fs::remove_file(&probe);
    let state = if dir.exists() { "exists" } else { "will be created" };
    match free_bytes(existing) {
        Some(free) if free < LOW_DISK_BYTES => Check::new(
            NAME,
            Status::Warn,
            format!("{} {state}; only {} MiB free", dir.display(), free >> 20),
        ),
        Some(free) => Check::new(
            NAME,
            Status::Ok,
            format!("{} {state}, writable, {} GiB free", dir.display(), free >> 30),
        ),
        None => Check::new(NAME, Status::Ok, format!("{} {state}, writable", dir.display())),
    }
}

/// Free bytes for an unprivileged user on the file system of `path`.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a NUL-terminated path and `stat` a valid, writable statvfs.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    // The field types differ between platforms (u32 on some 32-bit ones).
    #[allow(clippy::useless_conversion)]
    (rc == 0).then(|| u64::from(stat.f_bavail).saturating_mul(u64::from(stat.f_frsize)))
}

/// SQLite: the file's directory is writable; PostgreSQL: the server accepts connections.
fn check_store(options: &Options) -> Check {
    const NAME: &str = "store";
    match options.store() {
        Err(err) => Check::new(NAME, Status::Fail, format!("store_url: {err}")),
        Ok(StoreUrl::Sqlite(path)) => {
            let state = if path.exists() { "exists" } else { "will be created" };
            Check::new(NAME, Status::Ok, format!("SQLite {} {state}", path.display()))
        }
        Ok(StoreUrl::Postgres(url)) => {
            let shown = redact(&url);
            match host_port(&url, 5432) {
                None => Check::new(NAME, Status::Fail, format!("{shown}: no host in the URL")),
                Some(addr) => match connect(&addr) {
                    Ok(()) => Check::new(
                        NAME,
                        Status::Ok,
                        format!(
                            "PostgreSQL {shown} accepts connections (credentials are checked when the services start)"
                        ),
                    ),
                    Err(err) => {
                        Check::new(NAME, Status::Fail, format!("PostgreSQL {shown}: {err}"))
                    }
                },
            }
        }
    }
}

/// The listeners' certificate: the operator's, or the generated one, valid now and for the
/// next 30 days for every name clients use, and issued by the CA clients are given.
fn check_tls(options: &Options) -> Check {
    const NAME: &str = "tls";
    let tls = &options.tls;
    if tls.insecure {
        return Check::new(NAME, Status::Warn, "plain text (--insecure): loopback only");
    }
    fledge_tls::install_default_provider();
    let generated = tls.cert.is_none();
    let (cert, key, ca) = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone(), tls.ca.clone()),
        _ => {
            let dir = options.tls_dir();
            let (cert, key, ca) = (
                dir.join(fledge_tls::SERVER_CERT_FILE),
                dir.join(fledge_tls::SERVER_KEY_FILE),
                dir.join(fledge_tls::CA_CERT_FILE),
            );
            if !cert.exists() || !ca.exists() {
                return Check::new(
                    NAME,
                    Status::Ok,
                    format!(
                        "no certificate yet: a CA and server certificate will be created in {}",
                        dir.display()
                    ),
                );
            }
            (cert, key, Some(ca))
        }
    };
    let identity = match fledge_tls::ServerIdentity::load(&cert, &key) {
        Ok(identity) => identity,
        Err(err) => return Check::new(NAME, Status::Fail, format!("{}: {err:#}", cert.display())),
    };
    let Some(ca_path) = ca else {
        return Check::new(
            NAME,
            Status::Warn,
            format!(
                "{} loads; no tls.ca given, so clients must already trust its issuer",
                cert.display()
            ),
        );
    };
    let ca = match fledge_tls::Ca::load(&ca_path) {
        Ok(ca) => ca,
        Err(err) => {
            return Check::new(NAME, Status::Fail, format!("{}: {err:#}", ca_path.display()));
        }
    };
    let bound: Vec<SocketAddr> = options.tls_listeners().into_iter().map(|(_, a)| a).collect();
    let names = fledge_control::tls::server_names(options, &bound);
    match verify(&identity, &ca, &names) {
        // The generated certificate is issued again for the wanted names at start.
        Err(problem) if generated && problem.contains("not valid for") => Check::new(
            NAME,
            Status::Warn,
            format!(
                "{problem}: it is issued again for {} when the services start",
                names.join(", ")
            ),
        ),
        Err(problem) => Check::new(NAME, Status::Fail, problem),
        Ok(Some(warning)) => Check::new(NAME, Status::Warn, warning),
        Ok(None) => Check::new(
            NAME,
            Status::Ok,
            format!("{} valid for {} (CA {})", cert.display(), names.join(", "), ca.fingerprint()),
        ),
    }
}

/// Verifies `identity`'s chain against `ca` for each name, now and in 30 days.
fn verify(
    identity: &fledge_tls::ServerIdentity,
    ca: &fledge_tls::Ca,
    names: &[String],
) -> Result<Option<String>, String> {
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile_certs(identity.cert_pem()).map_err(|e| format!("the certificate: {e}"))?;
    let (leaf, chain) = certs.split_first().ok_or("the certificate file holds no certificate")?;
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls_pemfile_certs(ca.pem()).map_err(|e| format!("the CA: {e}"))? {
        roots.add(der).map_err(|e| format!("the CA: {e}"))?;
    }
    let verifier =
        WebPkiServerVerifier::builder_with_provider(roots.into(), fledge_tls::provider())
            .build()
            .map_err(|e| format!("the CA: {e}"))?;
    let soon = UnixTime::since_unix_epoch(
        UnixTime::now()
            .as_secs()
            .checked_add(EXPIRY_WARNING.as_secs())
            .map_or(Duration::from_secs(u64::MAX / 2), Duration::from_secs),
    );
    let mut warning = None;
    for name in names {
        let server = ServerName::try_from(name.clone())
            .map_err(|e| format!("{name:?} is not a host name: {e}"))?;
        verifier
            .verify_server_cert(leaf, chain, &server, &[], UnixTime::now())
            .map_err(|e| format!("the certificate is not valid for {name}: {e}"))?;
        if let Err(e) = verifier.verify_server_cert(leaf, chain, &server, &[], soon) {
            warning = Some(format!("the certificate will not be valid in 30 days ({e}): renew it"));
        }
    }
    Ok(warning)
}

/// The DER certificates of a PEM text.
fn rustls_pemfile_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// Each listener of the services that run is free, or already held by a Fledge that answers.
async fn check_listeners(options: &Options) -> Vec<Check> {
    let mut listeners = vec![];
    for (service, addr) in [
        (ServiceKind::Apiserver, options.apiserver.listen),
        (ServiceKind::Notifier, options.notifier.listen),
        (ServiceKind::Broker, options.broker.listen),
        (ServiceKind::Metaserver, options.metaserver.listen),
    ] {
        if options.runs(service) {
            listeners.push((service.as_str().to_owned(), addr));
        }
    }
    if let Some(addr) = options.metrics.listen {
        listeners.push(("metrics".to_owned(), addr));
    }
    // A Fledge answering on the apiserver's address most likely holds the others too.
    let running = match options.runs(ServiceKind::Apiserver) && options.apiserver.listen.port() != 0
    {
        true if TcpListener::bind(options.apiserver.listen).is_err() => {
            apiserver_answers(options, options.apiserver.listen).await
        }
        _ => None,
    };
    let mut checks = Vec::new();
    for (service, addr) in listeners {
        let name = format!("{service} listener");
        if addr.port() == 0 {
            checks.push(Check::new(name, Status::Ok, format!("{addr}: a free port is picked")));
            continue;
        }
        match TcpListener::bind(addr) {
            Ok(_) => checks.push(Check::new(name, Status::Ok, format!("{addr} is free"))),
            Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => {
                checks.push(match &running {
                    Some(version) if service == ServiceKind::Apiserver.as_str() => Check::new(
                        name,
                        Status::Ok,
                        format!("{addr}: a Fledge apiserver is running there ({version})"),
                    ),
                    Some(_) => Check::new(
                        name,
                        Status::Ok,
                        format!("{addr} is in use, presumably by the Fledge running beside it"),
                    ),
                    None => Check::new(
                        name,
                        Status::Warn,
                        format!(
                            "{addr} is in use: another process (or this Fledge, already running) holds it"
                        ),
                    ),
                });
            }
            Err(err) => checks.push(Check::new(name, Status::Fail, format!("{addr}: {err}"))),
        }
    }
    checks
}

/// What the apiserver at `addr` says to `/healthz`, through the configured TLS.
async fn apiserver_answers(options: &Options, addr: SocketAddr) -> Option<String> {
    fledge_tls::install_default_provider();
    let host =
        if addr.ip().is_unspecified() { "127.0.0.1".to_owned() } else { addr.ip().to_string() };
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let mut client = reqwest::Client::builder().timeout(TIMEOUT);
    let scheme = if options.tls.insecure {
        "http"
    } else {
        let ca = options.tls.ca.clone().unwrap_or_else(|| options.tls_dir().join("ca.pem"));
        let pem = std::fs::read(ca).ok()?;
        client = client.add_root_certificate(reqwest::Certificate::from_pem(&pem).ok()?);
        "https"
    };
    let resp = client
        .build()
        .ok()?
        .get(format!("{scheme}://{host}:{}/healthz", addr.port()))
        .send()
        .await
        .ok()?;
    resp.status().is_success().then(|| format!("{scheme}, /healthz {}", resp.status()))
}

/// The Mosquitto to provision accepts connections, and its admin password is set.
fn check_mosquitto(url: &str, has_password: bool) -> Check {
    const NAME: &str = "mosquitto";
    let Some(addr) = host_port(url, 1883) else {
        return Check::new(NAME, Status::Fail, format!("mosquitto.admin_url {url:?}: no host"));
    };
    if !has_password {
        return Check::new(
            NAME,
            Status::Fail,
            format!("{url}: set FLEDGE_MOSQUITTO_ADMIN_PASSWORD (the dynamic-security admin's)"),
        );
    }
    match connect(&addr) {
        Ok(()) => Check::new(NAME, Status::Ok, format!("{url} accepts connections")),
        Err(err) => Check::new(NAME, Status::Fail, format!("{url}: {err}")),
    }
}

/// The deployer's platform: the Docker Engine and the worker image for `docker`.
async fn check_deployer(options: &Options) -> Check {
    const NAME: &str = "deployer";
    let section = &options.deployer;
    match section.platform {
        Platform::Process => {
            Check::new(NAME, Status::Ok, "process: workers run as child processes of the deployer")
        }
        Platform::Docker => {
            match fledge_agent::deployer::docker::check_engine(
                &section.docker_socket,
                &section.docker_image,
            )
            .await
            {
                Ok((version, _)) => Check::new(
                    NAME,
                    Status::Ok,
                    format!(
                        "docker: Engine {version} at {} has the worker image {}",
                        section.docker_socket.display(),
                        section.docker_image
                    ),
                ),
                Err(err) => Check::new(NAME, Status::Fail, format!("docker: {err}")),
            }
        }
        Platform::K8s => {
            match fledge_agent::deployer::k8s::check_cluster(
                section.k8s_kubeconfig.as_deref(),
                section.k8s_namespace.as_deref(),
            )
            .await
            {
                Ok(namespace) => Check::new(
                    NAME,
                    Status::Ok,
                    format!(
                        "kubernetes: the API answers and grants the deployer's verbs in \
                         namespace {namespace} (image {}, not checked: the cluster pulls it)",
                        section.k8s_image
                    ),
                ),
                Err(err) => Check::new(NAME, Status::Fail, format!("kubernetes: {err}")),
            }
        }
    }
}

/// From a compute whose control plane runs elsewhere (`deployer.apiserver` set): the apiserver
/// answers through the configured CA and takes the compute key, and every endpoint the
/// compute's workers will be told to connect to (notifier, brokers, metaserver) accepts
/// connections from here. Workers on Docker job networks connect from their containers, which
/// the detail says.
async fn check_compute_reach(options: &Options) -> Vec<Check> {
    const NAME: &str = "compute reach";
    let section = &options.deployer;
    let (Some(apiserver), Some(key)) = (&section.apiserver, &section.api_key) else {
        return Vec::new();
    };
    let base = apiserver.trim_end_matches('/');
    fledge_tls::install_default_provider();
    let mut client = reqwest::Client::builder().timeout(TIMEOUT);
    if let Some(ca) = &section.ca_file {
        let certificate = std::fs::read(ca)
            .map_err(|err| err.to_string())
            .and_then(|pem| reqwest::Certificate::from_pem(&pem).map_err(|err| err.to_string()));
        match certificate {
            Ok(certificate) => client = client.add_root_certificate(certificate),
            Err(err) => {
                let detail = format!("deployer.ca_file {}: {err}", ca.display());
                return vec![Check::new(NAME, Status::Fail, detail)];
            }
        }
    }
    let client = match client.build() {
        Ok(client) => client,
        Err(err) => return vec![Check::new(NAME, Status::Fail, err.to_string())],
    };
    let url = format!("{base}/api/v1/computes/{}/endpoints", section.compute_id);
    let answer = match client.get(&url).bearer_auth(key).send().await {
        Ok(answer) => answer,
        Err(err) => {
            let mut why = err.to_string();
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                why = format!("{why}: {cause}");
                source = cause.source();
            }
            return vec![Check::new(NAME, Status::Fail, format!("apiserver {base}: {why}"))];
        }
    };
    let status = answer.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        let detail = format!(
            "apiserver {base} does not accept the key of compute {} (deployer.api_key)",
            section.compute_id
        );
        return vec![Check::new(NAME, Status::Fail, detail)];
    }
    let endpoints: serde_json::Value = match answer.json().await {
        Ok(body) if status.is_success() => body,
        Ok(body) => {
            let detail = format!("apiserver {base}: {status}: {}", body["message"]);
            return vec![Check::new(NAME, Status::Fail, detail)];
        }
        Err(err) => {
            let detail = format!("apiserver {base}: {status}, unreadable answer: {err}");
            return vec![Check::new(NAME, Status::Fail, detail)];
        }
    };
    let mut checks = vec![Check::new(
        NAME,
        Status::Ok,
        format!("apiserver {base} answers and accepts compute {}'s key", section.compute_id),
    )];
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    let mut targets: Vec<(&str, String, u16)> = Vec::new();
    if let Some(url) = section.notifier.clone().or_else(|| text(&endpoints["notifier"])) {
        targets.push(("notifier", url, 443));
    }
    for broker in endpoints["brokers"].as_array().into_iter().flatten().filter_map(text) {
        targets.push(("broker", broker, 1883));
    }
    if let Some(url) = text(&endpoints["metaserver"]) {
        targets.push(("metaserver", url, 443));
    }
    let from = match section.platform {
        Platform::Docker if section.docker_network == "job" => {
            " (from this machine; job-network containers connect through the Docker bridge)"
        }
        _ => "",
    };
    for (what, url, default_port) in targets {
        let check = match host_port(&url, default_port) {
            None => Check::new(NAME, Status::Fail, format!("{what} {url}: no host in the URL")),
            Some(addr) => match tokio::task::spawn_blocking(move || connect(&addr)).await {
                Ok(Ok(())) => {
                    Check::new(NAME, Status::Ok, format!("{what} {url} accepts connections{from}"))
                }
                Ok(Err(err)) => Check::new(NAME, Status::Fail, format!("{what} {url}: {err}")),
                Err(err) => Check::new(NAME, Status::Fail, format!("{what} {url}: {err}")),
            },
        };
        checks.push(check);
    }
    checks
}

/// What confines process workers' code on this kernel (`deployer.sandbox`).
fn check_sandbox(mode: &str) -> Check {
    const NAME: &str = "sandbox";
    let support = fledge_agent::sandbox::probe();
    match (mode, support.abi) {
        ("off", _) => Check::new(
            NAME,
            Status::Warn,
            "off (deployer.sandbox = \"off\"): task code runs with the deployer's user's file access",
        ),
        ("required", None) => Check::new(NAME, Status::Fail, format!("required, but {support}")),
        (_, Some(_)) => Check::new(NAME, Status::Ok, support.to_string()),
        (_, None) => Check::new(NAME, Status::Warn, support.to_string()),
    }
}

/// The interpreter workers run Python roles with has `fledge` and numpy.
async fn check_python() -> Check {
    const NAME: &str = "python workers";
    let python = std::env::var("FLEDGE_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let script = "import fledge, numpy; print(fledge.__version__, numpy.__version__)";
    let run = tokio::process::Command::new(&python).args(["-c", script]).output();
    match tokio::time::timeout(Duration::from_secs(30), run).await {
        Err(_) => Check::new(NAME, Status::Warn, format!("{python} did not answer in 30 s")),
        Ok(Err(err)) => Check::new(
            NAME,
            Status::Warn,
            format!(
                "cannot run {python} ({err}): jobs with Python roles will fail (set FLEDGE_PYTHON)"
            ),
        ),
        Ok(Ok(out)) if !out.status.success() => {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err.lines().last().unwrap_or("").trim();
            Check::new(
                NAME,
                Status::Warn,
                format!(
                    "{python} cannot import fledge and numpy ({last}): jobs with Python roles will \
                     fail; `pip install ./crates/py` into it, or set FLEDGE_PYTHON"
                ),
            )
        }
        Ok(Ok(out)) => {
            let versions = String::from_utf8_lossy(&out.stdout);
            let mut parts = versions.split_whitespace();
            Check::new(
                NAME,
                Status::Ok,
                format!(
                    "{python}: fledge {}, numpy {}",
                    parts.next().unwrap_or("?"),
                    parts.next().unwrap_or("?")
                ),
            )
        }
    }
}

/// The MLflow tracking servers named (`--mlflow-url`, else `$MLFLOW_TRACKING_URI`) or
/// configured (`FLEDGE_MLFLOW_SERVERS`, the servers the apiserver's token belongs to), each
/// checked as a job naming it is at creation, under the token the apiserver would send it.
async fn check_mlflow_servers(named: Option<&str>, env: &HashMap<String, String>) -> Vec<Check> {
    use fledge_control::mlflow::{MlflowAuth, SERVERS_ENV};
    const NAME: &str = "mlflow";
    let token = ["FLEDGE_MLFLOW_TOKEN", "MLFLOW_TRACKING_TOKEN"]
        .iter()
        .find_map(|name| env.get(*name).filter(|v| !v.trim().is_empty()).cloned());
    let auth = match MlflowAuth::new(token, env.get(SERVERS_ENV).map_or("", String::as_str)) {
        Ok(auth) => auth,
        Err(err) => return vec![Check::new(NAME, Status::Fail, err)],
    };
    let mut urls: Vec<String> = Vec::new();
    let named = named.map(str::to_owned).or_else(|| env.get("MLFLOW_TRACKING_URI").cloned());
    for url in named.into_iter().chain(auth.servers().map(str::to_owned)) {
        let url = url.trim().trim_end_matches('/').to_owned();
        if !url.is_empty() && !urls.contains(&url) {
            urls.push(url);
        }
    }
    let mut checks = Vec::new();
    if auth.has_token() && auth.servers().next().is_none() {
        checks.push(Check::new(
            NAME,
            Status::Warn,
            format!("an MLflow token is set but {SERVERS_ENV} names no server: it is sent to none"),
        ));
    }
    for url in urls {
        checks.push(check_mlflow(&url, &auth).await);
    }
    checks
}

/// The MLflow tracking server at `url` answers its API and proxies artifacts (the check a
/// job naming it passes at creation), and what it said about itself.
async fn check_mlflow(url: &str, auth: &fledge_control::mlflow::MlflowAuth) -> Check {
    const NAME: &str = "mlflow";
    let token = auth.token_for(url);
    let credentials = match (token, auth.has_token()) {
        (Some(_), _) => "with the token".to_owned(),
        (None, true) => format!(
            "without a token (the token is for {} only)",
            auth.servers().collect::<Vec<_>>().join(", ")
        ),
        (None, false) => "without a token (none set)".to_owned(),
    };
    match fledge_control::mlflow::check(url, token, TIMEOUT).await {
        Ok(found) => Check::new(
            NAME,
            Status::Ok,
            format!(
                "{url}: MLflow {}, answers the tracking API and proxies artifacts, {credentials}",
                found.version.as_deref().unwrap_or("(version not told)")
            ),
        ),
        Err(err) => Check::new(NAME, Status::Fail, format!("{url}: {err} ({credentials})")),
    }
}

/// `host:port` of `scheme://[user[:pass]@]host[:port][/...]`.
fn host_port(url: &str, default_port: u16) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if authority.is_empty() {
        return None;
    }
    let has_port =
        if authority.starts_with('[') { authority.contains("]:") } else { authority.contains(':') };
    Some(if has_port { authority.to_owned() } else { format!("{authority}:{default_port}") })
}

/// A URL with any password replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((user, host)) => {
            let user = user.split_once(':').map_or(user, |(name, _)| name);
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// Opens (and closes) a TCP connection to `addr` within [`TIMEOUT`].
fn connect(addr: &str) -> Result<(), String> {
    use std::net::ToSocketAddrs as _;
    let addrs: Vec<SocketAddr> =
        addr.to_socket_addrs().map_err(|e| format!("cannot resolve {addr}: {e}"))?.collect();
    let mut last = format!("{addr} resolves to no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("cannot connect to {a}: {e}"),
        }
    }
    Err(last)
}

fn print(checks: &[Check], format: Format) -> anyhow::Result<()> {
    use std::io::Write as _;
    let text = match format {
        Format::Json => serde_json::to_string_pretty(checks)? + "\n",
        Format::Table => {
            let width = checks.iter().map(|c| c.check.len()).max().unwrap_or(5).max(5);
            let mut text = format!("{:width$}  {:6}  DETAIL\n", "CHECK", "STATUS");
            for c in checks {
                let status = match c.status {
                    Status::Ok => "ok",
                    Status::Warn => "warn",
                    Status::Fail => "FAIL",
                };
                text.push_str(&format!("{:width$}  {status:6}  {}\n", c.check, c.detail));
            }
            text
        }
    };
    // A closed pipe (`fledge doctor | head`) is not an error of the checks.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_and_redaction() {
        assert_eq!(host_port("postgres://u:p@db.example/fledge", 5432).unwrap(), "db.example:5432");
        assert_eq!(host_port("postgres://db:6000/x", 5432).unwrap(), "db:6000");
        assert_eq!(host_port("mqtt://[::1]:1883", 1883).unwrap(), "[::1]:1883");
        assert_eq!(host_port("mqtt://[::1]", 1883).unwrap(), "[::1]:1883");
        assert!(host_port("postgres:///fledge", 5432).is_none());
        assert_eq!(redact("postgres://u:secret@db/fledge"), "postgres://u:***@db/fledge");
        assert_eq!(redact("postgres://db/fledge"), "postgres://db/fledge");
    }

    #[test]
    fn a_missing_data_directory_under_a_writable_parent_will_be_created() {
        let dir = tempfile::tempdir().unwrap();
        let check = check_data_dir(&dir.path().join("a/b"));
        assert_eq!(check.status, Status::Ok, "{check:?}");
        assert!(check.detail.contains("will be created"), "{check:?}");
    }

    #[test]
    fn a_certificate_for_other_names_or_from_another_ca_fails() {
        fledge_tls::install_default_provider();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let one = fledge_tls::ensure_dir(a.path(), &["localhost".to_owned()]).unwrap();
        let two = fledge_tls::ensure_dir(b.path(), &["localhost".to_owned()]).unwrap();
        assert_eq!(verify(&one.identity, &one.ca, &["localhost".to_owned()]), Ok(None));
        let wrong_name = verify(&one.identity, &one.ca, &["fledge.example".to_owned()]);
        assert!(wrong_name.unwrap_err().contains("not valid for fledge.example"));
        let wrong_ca = verify(&one.identity, &two.ca, &["localhost".to_owned()]);
        assert!(wrong_ca.is_err());
    }
}
