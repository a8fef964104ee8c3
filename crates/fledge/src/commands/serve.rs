//! `fledge serve`: runs a chosen set of control-plane services from one configuration.
//!
//! Configuration is layered: defaults → `--config FILE` (TOML) → `FLEDGE_*` environment →
//! the flags below. `--dump-config` prints the effective configuration and exits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use fledge_agent::deployer::docker::DockerOptions;
use fledge_agent::deployer::k8s::K8sOptions;
use fledge_agent::deployer::{Deployer, DeployerOptions};
use fledge_control::config::{DeployerSection, Options, ServiceKind};
use fledge_control::controller::Endpoints;
use fledge_control::service;
use fledge_types::{ComputeId, Platform};

use super::UsageError;

/// Arguments of `fledge serve`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Configuration file (TOML).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Services to run, comma-separated: apiserver, controller, notifier, broker, metaserver,
    /// deployer
    /// (default: all but deployer; the deployer reads its `[deployer]` section / `FLEDGE_DEPLOYER_*`).
    #[arg(long, value_name = "LIST")]
    pub services: Option<String>,
    /// Directory of the SQLite store and code bundles.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Store URL: `sqlite://PATH` or `postgres://...`.
    #[arg(long, value_name = "URL")]
    pub store_url: Option<String>,
    /// Apiserver listen address (`host:port`; port 0 picks a free port).
    #[arg(long, value_name = "ADDR")]
    pub apiserver_listen: Option<String>,
    /// Notifier listen address.
    #[arg(long, value_name = "ADDR")]
    pub notifier_listen: Option<String>,
    /// Embedded broker listen address.
    #[arg(long, value_name = "ADDR")]
    pub broker_listen: Option<String>,
    /// Broker written into task configs (e.g. an external Mosquitto): `host:port`,
    /// `mqtt://host:port` (plain) or `mqtts://host:port` (TLS).
    #[arg(long, value_name = "URL")]
    pub broker_advertise: Option<String>,
    /// The CA (PEM) of an `mqtts` broker of your own (--broker-advertise mqtts://...), given to
    /// tasks; default: the control plane's CA.
    #[arg(long, value_name = "PEM")]
    pub broker_ca_file: Option<PathBuf>,
    /// Metaserver (rendezvous of the `p2p` channel backend) listen address.
    #[arg(long, value_name = "ADDR")]
    pub metaserver_listen: Option<String>,
    /// Metaserver URL written into task configs (e.g. one run by another `fledge serve`).
    #[arg(long, value_name = "URL")]
    pub metaserver_advertise: Option<String>,
    /// A Mosquitto to provision with task logins and ACLs through its dynamic-security plugin
    /// (`mqtt://host:port`, or `mqtts://host:port` verified with --broker-ca-file; the admin
    /// password comes from `FLEDGE_MOSQUITTO_ADMIN_PASSWORD`).
    #[arg(long, value_name = "URL")]
    pub mosquitto_admin_url: Option<String>,
    /// Serve `/metrics` on a listener of its own (`host:port`), e.g. for a process without an
    /// apiserver (TLS with the control plane's identity; plain text on loopback only for a
    /// deployer-only process or under --insecure).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Print the effective configuration (TOML) and exit.
    #[arg(long)]
    pub dump_config: bool,
    /// TLS of the control plane's listeners.
    #[command(flatten)]
    pub tls: super::standalone::TlsArgs,
}

impl Args {
    /// The flags as dotted option overrides, in layer order.
    pub(crate) fn overrides(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut res = Vec::new();
        let mut push = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                res.push((key.to_owned(), value));
            }
        };
        push("services", self.services.clone());
        push("data_dir", self.data_dir.as_ref().map(|p| p.display().to_string()));
        push("store_url", self.store_url.clone());
        push("apiserver.listen", self.apiserver_listen.clone());
        push("notifier.listen", self.notifier_listen.clone());
        push("broker.listen", self.broker_listen.clone());
        push("broker.advertise", self.broker_advertise.clone());
        if let Some(path) = &self.broker_ca_file {
            // Absolute, so that a relative path means the same from every directory.
            let path = std::path::absolute(path)
                .map_err(|err| UsageError(format!("broker.ca_file {}: {err}", path.display())))?;
            push("broker.ca_file", Some(path.display().to_string()));
        }
        push("metaserver.listen", self.metaserver_listen.clone());
        push("metaserver.advertise", self.metaserver_advertise.clone());
        push("mosquitto.admin_url", self.mosquitto_admin_url.clone());
        push("metrics.listen", self.metrics_listen.clone());
        res.extend(self.tls.overrides()?);
        Ok(res)
    }
}

/// Loads the layered configuration; any problem is a [`UsageError`] (exit 64).
pub fn load_options(
    config: Option<&Path>,
    env: &HashMap<String, String>,
    overrides: &[(String, String)],
) -> anyhow::Result<Options> {
    Options::load(config, env, overrides)
        .map_err(|err| anyhow::Error::new(UsageError(format!("{:#}", anyhow::Error::new(err)))))
}

/// Builds the deployer described by `section` (`process` or `docker`). URLs it leaves unset come from
/// `local` (the services of this process); workers' data goes under `<data_dir>/work` unless
/// `section.work_root` says otherwise. Workers get this executable as `FLEDGE_BIN`, and the
/// CA of `section.ca_file` (else `local_ca`, this process's) to trust.
pub fn build_deployer(
    section: &DeployerSection,
    data_dir: &Path,
    local: Option<&Endpoints>,
    local_ca: Option<&Path>,
) -> anyhow::Result<Deployer> {
    let url = |given: &Option<String>, field: &str, pick: fn(&Endpoints) -> &String| {
        given.clone().or_else(|| local.map(|e| pick(e).clone())).ok_or_else(|| {
            anyhow::Error::new(UsageError(format!(
                "deployer.{field}: set the {field} URL, or run the {field} in this process"
            )))
        })
    };
    let apiserver = url(&section.apiserver, "apiserver", |e| &e.apiserver)?;
    let notifier = url(&section.notifier, "notifier", |e| &e.notifier)?;
    let api_key = section.api_key.clone().ok_or_else(|| {
        UsageError("deployer.api_key: required when the deployer runs".to_owned())
    })?;
    let mut options = DeployerOptions::new(
        ComputeId::new(section.compute_id.clone()),
        api_key,
        apiserver,
        notifier,
        section.work_root.clone().unwrap_or_else(|| data_dir.join("work")),
        PathBuf::new(),
    );
    // Workers run this very executable's `fledgelet` subcommand: one build, no second binary
    // to find.
    (options.fledgelet_bin, options.fledgelet_prefix_args) = super::fledgelet::agent_command()?;
    options.max_workers = section.max_workers;
    options.ca_file = section.ca_file.clone().or_else(|| local_ca.map(Path::to_path_buf));
    options.fledge_bin = std::env::current_exe().ok();
    options.docker = docker_options(section)?;
    options.k8s = k8s_options(section)?;
    options.fledgelet_env.extend(registry_env(section)?);
    if let Some(ip) = section.p2p_listen_host {
        options.fledgelet_env.push(("FLEDGE_P2P_LISTEN_HOST".to_owned(), ip.to_string()));
    }
    if let Some(host) = &section.p2p_advertise_host {
        options.fledgelet_env.push(("FLEDGE_P2P_ADVERTISE_HOST".to_owned(), host.clone()));
    }
    options.sandbox = sandbox_policy(section, data_dir)?;
    let platform = match section.platform {
        Platform::Process => "process",
        Platform::Docker => "docker",
        Platform::K8s => "kubernetes",
    };
    tracing::info!(
        compute_id = %section.compute_id,
        platform,
        fledgelet = %options.fledgelet_bin.display(),
        "deployer starting"
    );
    options.build().map_err(|err| match err {
        fledge_agent::deployer::Error::InvalidOption { .. } => {
            anyhow::Error::new(UsageError(format!("deployer: {err}")))
        }
        err => anyhow::Error::new(err).context("cannot build the deployer"),
    })
}

/// The workers' sandbox: the section's mode and paths, with the data dir protected (the
/// deployer adds its work root and the CLI config dir).
fn sandbox_policy(
    section: &DeployerSection,
    data_dir: &Path,
) -> anyhow::Result<fledge_agent::sandbox::Policy> {
    use clap::ValueEnum as _;
    let mode = fledge_agent::sandbox::Mode::from_str(&section.sandbox, false).map_err(|_| {
        UsageError(format!(
            "deployer.sandbox: {:?} is not one of auto, required, off",
            section.sandbox
        ))
    })?;
    let data_dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    Ok(fledge_agent::sandbox::Policy {
        mode,
        protected: vec![data_dir],
        data_roots: section.sandbox_data_roots.clone(),
        read: section.sandbox_read.clone(),
    })
}

/// What the fledgelets get for `deployer.registry_env`: each named variable's value from this
/// process's environment, and `FLEDGE_REGISTRY_ENV` naming them, so that they hand them to
/// built-in roles only.
fn registry_env(section: &DeployerSection) -> anyhow::Result<Vec<(String, String)>> {
    const MAX: usize = 32;
    if section.registry_env.len() > MAX {
        return Err(UsageError(format!(
            "deployer.registry_env: {} names, at most {MAX}",
            section.registry_env.len()
        ))
        .into());
    }
    let mut env = Vec::new();
    for name in &section.registry_env {
        if !fledge_agent::process::is_registry_env_name(name) {
            return Err(UsageError(format!(
                "deployer.registry_env: {name:?} is not a variable that may be passed \
                 (A-Z, 0-9, _; not FLEDGE_*, LD_*, PATH, HOME, TMPDIR or PYTHON*)"
            ))
            .into());
        }
        let value = std::env::var(name).map_err(|_| {
            UsageError(format!(
                "deployer.registry_env: {name} is not set in this process's environment"
            ))
        })?;
        env.push((name.clone(), value));
    }
    if !env.is_empty() {
        let names: Vec<&str> = env.iter().map(|(name, _)| name.as_str()).collect();
        env.push((fledge_agent::process::REGISTRY_ENV.to_owned(), names.join(",")));
    }
    Ok(env)
}

/// The Docker options of a `docker` deployer section (`None` for `process`).
fn docker_options(section: &DeployerSection) -> anyhow::Result<Option<DockerOptions>> {
    match section.platform {
        Platform::Process => Ok(None),
        Platform::Docker => {
            let network = section
                .docker_network
                .parse()
                .map_err(|err| UsageError(format!("deployer.docker_network: {err}")))?;
            let memory_bytes = section
                .worker_memory_mib
                .checked_mul(1024 * 1024)
                .ok_or_else(|| UsageError("deployer.worker_memory_mib: too large".to_owned()))?;
            Ok(Some(DockerOptions {
                socket: section.docker_socket.clone(),
                image: section.docker_image.clone(),
                network,
                mounts: section.docker_mounts.clone(),
                cpus: section.worker_cpus,
                memory_bytes,
                pids: section.worker_pids,
                user: None,
            }))
        }
        Platform::K8s => Ok(None),
    }
}

/// The Kubernetes options of a `kubernetes` deployer section (`None` for the others).
fn k8s_options(section: &DeployerSection) -> anyhow::Result<Option<K8sOptions>> {
    if section.platform != Platform::K8s {
        return Ok(None);
    }
    let memory_bytes = section
        .worker_memory_mib
        .checked_mul(1024 * 1024)
        .ok_or_else(|| UsageError("deployer.worker_memory_mib: too large".to_owned()))?;
    Ok(Some(K8sOptions {
        namespace: section.k8s_namespace.clone(),
        image: section.k8s_image.clone(),
        image_pull_policy: section.k8s_image_pull_policy.clone(),
        kubeconfig: section.k8s_kubeconfig.clone(),
        service_account: section.k8s_service_account.clone(),
        cpus: section.worker_cpus,
        memory_bytes,
    }))
}

/// The file, in the data directory, that holds the admin token `fledge serve` creates on its
/// first start with an apiserver (mode 0600; never rewritten, so delete it to get a new one).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Creates an admin token and writes it to `<data_dir>/admin.token` unless that file exists:
/// how the operator of a fresh `fledge serve` logs in (`fledgectl login --login-token`).
async fn write_admin_token(
    store: &dyn fledge_control::store::Store,
    data_dir: &Path,
) -> anyhow::Result<()> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    if path.exists() {
        return Ok(());
    }
    let token = fledge_control::api::bootstrap_admin(store)
        .await
        .context("cannot create the admin token")?;
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        file.write_all(format!("{token}\n").as_bytes())?;
        file.sync_all()
    };
    write().with_context(|| format!("cannot write the admin token to {}", path.display()))?;
    tracing::info!(path = %path.display(), "wrote an admin token");
    Ok(())
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let options = load_options(args.config.as_deref(), &env, &args.overrides()?)?;
    if args.dump_config {
        #[allow(clippy::print_stdout)]
        {
            print!("{}", options.to_toml()?);
        }
        return Ok(());
    }
    let shutdown = CancellationToken::new();
    service::cancel_on_signal(shutdown.clone());
    if !options.runs_control_plane() {
        // A compute-side process: the deployer alone, no store. Its metrics listener (if
        // any) serves plain text on loopback only (`Options::validate`): it has no identity.
        let deployer = build_deployer(&options.deployer, &options.data_dir, None, None)?;
        let Some(addr) = options.metrics.listen else {
            return deployer.run(shutdown).await.context("the deployer failed");
        };
        let telemetry = fledge_control::telemetry::Telemetry::new();
        telemetry.register(|r| deployer.register_metrics(r.sub_registry_with_prefix("deployer")));
        let listener = fledge_control::telemetry::bind(addr).await?;
        let metrics =
            tokio::spawn(fledge_control::telemetry::serve(listener, telemetry, shutdown.clone()));
        let result = deployer.run(shutdown.clone()).await.context("the deployer failed");
        shutdown.cancel();
        metrics.await.context("the metrics listener panicked")??;
        return result;
    }
    let store = service::open_store(&options).await?;
    let services = service::start(&options, store.clone(), &shutdown)
        .await
        .context("cannot start the services")?;
    if options.runs(ServiceKind::Apiserver) {
        write_admin_token(store.as_ref(), &options.data_dir).await?;
    }
    if options.runs(ServiceKind::Deployer) {
        let local_ca = services.tls.as_ref().and_then(|tls| tls.ca_path.clone());
        let mut section = options.deployer.clone();
        if section.api_key.is_none() {
            // The store is in this process: register the compute (or renew its key).
            section.api_key = Some(
                super::standalone::register_compute(
                    store.as_ref(),
                    &section.compute_id,
                    section.platform,
                )
                .await?,
            );
        }
        let deployer = build_deployer(
            &section,
            &options.data_dir,
            Some(&services.endpoints),
            local_ca.as_deref(),
        )?;
        services
            .telemetry
            .register(|r| deployer.register_metrics(r.sub_registry_with_prefix("deployer")));
        let token = services.shutdown_token();
        services.spawn("deployer", async move {
            deployer.run(token).await.map_err(anyhow::Error::from)
        });
    }
    let names: Vec<String> = options.services.iter().map(ToString::to_string).collect();
    tracing::info!(
        services = names.join(","),
        apiserver = ?services.addrs.apiserver,
        notifier = ?services.addrs.notifier,
        broker = ?services.addrs.broker,
        metaserver = ?services.addrs.metaserver,
        metrics = ?services.addrs.metrics,
        "fledge serving"
    );
    if services.addrs.apiserver.is_some()
        && let Some(login) =
            super::standalone::login_command(&services.endpoints.apiserver, services.tls.as_ref())
    {
        let path = options.data_dir.join("login.txt");
        std::fs::write(&path, format!("{login}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
        let fingerprint = services.tls.as_ref().and_then(|tls| tls.fingerprint());
        #[allow(clippy::print_stdout)]
        {
            if let Some(fingerprint) = fingerprint {
                println!("ca fingerprint: {fingerprint}");
            }
            println!("login: {login} --login-token TOKEN");
        }
    }
    services.wait().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_config_is_a_usage_error_and_the_deployer_needs_urls() {
        let env = HashMap::from([("FLEDGE_MAX_CODE_BYTES".to_owned(), "many".to_owned())]);
        let err = load_options(None, &env, &[]).expect_err("bad env value");
        assert!(err.is::<UsageError>(), "{err:#}");
        assert!(format!("{err:#}").contains("FLEDGE_MAX_CODE_BYTES"), "{err:#}");

        let args = Args {
            config: None,
            services: Some("apiserver,bogus".to_owned()),
            data_dir: None,
            store_url: None,
            apiserver_listen: None,
            notifier_listen: None,
            broker_listen: None,
            broker_advertise: None,
            broker_ca_file: None,
            metaserver_listen: None,
            metaserver_advertise: None,
            mosquitto_admin_url: None,
            metrics_listen: None,
            dump_config: false,
            tls: Default::default(),
        };
        let err = load_options(None, &HashMap::new(), &args.overrides().expect("flags"))
            .expect_err("bad flag");
        assert!(format!("{err:#}").contains("bogus"), "{err:#}");

        let section = DeployerSection { api_key: Some("k".to_owned()), ..Default::default() };
        let err = build_deployer(&section, Path::new("/tmp"), None, None).err().expect("no URLs");
        assert!(err.is::<UsageError>());
        assert!(err.to_string().contains("deployer.apiserver"), "{err}");
        let local = Endpoints {
            apiserver: "http://127.0.0.1:1".to_owned(),
            notifier: "http://127.0.0.1:2".to_owned(),
        };
        build_deployer(&section, Path::new("/tmp"), Some(&local), None)
            .expect("local URLs suffice");
    }
}
