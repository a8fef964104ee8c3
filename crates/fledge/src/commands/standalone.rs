//! `fledge standalone`: every service in one process on loopback, a SQLite store in one data
//! directory, an embedded broker and a compute `default`: zero external services.
//!
//! The apiserver, notifier and metaserver serve TLS: a CA and a server certificate are created
//! in `<data_dir>/tls` on first start and reused after (or the operator's `--tls-cert`,
//! `--tls-key`, `--tls-ca`); `--insecure` serves plain text (loopback only).
//!
//! On start it creates an admin token and writes it with the apiserver's endpoint and the CA
//! into `fledgectl`'s config file (`$FLEDGE_CONFIG`, else `~/.fledge/config.yaml`) as its
//! context `standalone`, made current (the file's other contexts are kept), prints both and a `fledgectl login` command carrying the CA's
//! fingerprint (also written to `<data_dir>/login.txt`), then prints `ready` once every
//! listener is up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use fledge_control::config::DeployerSection;
use fledge_control::service::{self, BoundAddrs, Services};
use fledge_control::store;
use fledge_control::tls::ControlTls;
use fledge_types::{ComputeId, ComputeSpec};

use super::UsageError;

/// The compute standalone registers for its own deployer.
pub const DEFAULT_COMPUTE: &str = "default";

/// Arguments of `fledge standalone`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory for the SQLite store, code bundles and workers' files.
    #[arg(long, value_name = "DIR", default_value = "fledge-data")]
    pub data_dir: PathBuf,
    /// Apiserver port; the notifier takes PORT+1, the broker PORT+2 and the metaserver PORT+3.
    /// 0 picks free ports.
    #[arg(long, value_name = "N", default_value_t = 10100)]
    pub port: u16,
    /// Address every listener binds. Loopback by default; the Docker bridge's gateway (e.g.
    /// 172.17.0.1) lets workers in containers on their job networks reach the control plane
    /// and the broker (see `docs/deployers.md`). `--insecure` is refused off loopback.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Extra configuration file (TOML); the data directory, store and listeners above win.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// `fledgectl` config file to write (default `$FLEDGE_CONFIG`, else `~/.fledge/config.yaml`).
    #[arg(long, value_name = "PATH")]
    pub cli_config: Option<PathBuf>,
    /// Do not run the process deployer (workers are then started by hand).
    #[arg(long)]
    pub no_deployer: bool,
    /// Print the effective configuration (TOML) and exit.
    #[arg(long)]
    pub dump_config: bool,
    /// TLS of the control plane's listeners.
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// TLS flags shared by `fledge standalone` and `fledge serve`.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct TlsArgs {
    /// Serve the apiserver, notifier, metaserver and embedded MQTT broker in plain text.
    /// Refused when one of them listens on a non-loopback address.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub insecure: bool,
    /// Your own server certificate chain (PEM) instead of the one issued by the CA that
    /// `<data_dir>/tls` holds.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) clients should trust for --tls-cert (served at /api/v1/ca.pem).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The flags as dotted option overrides.
    pub fn overrides(&self) -> anyhow::Result<Vec<(String, String)>> {
        let mut res = Vec::new();
        if self.insecure {
            res.push(("tls.insecure".to_owned(), "true".to_owned()));
        }
        for (key, path) in
            [("tls.cert", &self.tls_cert), ("tls.key", &self.tls_key), ("tls.ca", &self.tls_ca)]
        {
            if let Some(path) = path {
                // Absolute, so that a relative path means the same from every directory.
                let path = std::path::absolute(path)
                    .map_err(|err| UsageError(format!("{key} {}: {err}", path.display())))?;
                res.push((key.to_owned(), path.display().to_string()));
            }
        }
        Ok(res)
    }
}

/// The line that lets another machine trust this control plane without copying files:
/// `fledgectl login --server URL --ca-fingerprint sha256:...`.
pub fn login_command(endpoint: &str, tls: Option<&ControlTls>) -> Option<String> {
    let fingerprint = tls?.fingerprint()?;
    Some(format!("fledgectl login --server {endpoint} --ca-fingerprint {fingerprint}"))
}

impl Args {
    /// The flags as dotted option overrides.
    pub(crate) fn overrides(&self) -> anyhow::Result<Vec<(String, String)>> {
        let port = |offset: u16| -> anyhow::Result<String> {
            let port = if self.port == 0 {
                0
            } else {
                self.port.checked_add(offset).ok_or_else(|| {
                    UsageError(format!("--port {} leaves no room for PORT+{offset}", self.port))
                })?
            };
            Ok(std::net::SocketAddr::new(self.host, port).to_string())
        };
        // Absolute, so that workers started in other directories find the same files.
        let data_dir = std::path::absolute(&self.data_dir)
            .map_err(|err| UsageError(format!("--data-dir {}: {err}", self.data_dir.display())))?;
        let store_url = format!("sqlite://{}", data_dir.join("fledge.db").display());
        let data_dir = data_dir.display().to_string();
        // With an operator's Mosquitto to provision, tasks use it and the embedded broker
        // stays out (as `fledge serve` without the broker service).
        let services = if self.provisions_mosquitto()? {
            "metaserver,notifier,controller,apiserver"
        } else {
            "broker,metaserver,notifier,controller,apiserver"
        };
        let mut res = vec![
            ("services".to_owned(), services.to_owned()),
            ("data_dir".to_owned(), data_dir.clone()),
            ("store_url".to_owned(), store_url),
            ("apiserver.listen".to_owned(), port(0)?),
            ("notifier.listen".to_owned(), port(1)?),
            ("broker.listen".to_owned(), port(2)?),
            ("metaserver.listen".to_owned(), port(3)?),
        ];
        res.extend(self.tls.overrides()?);
        Ok(res)
    }
}

impl Args {
    /// Whether the configuration names a Mosquitto to provision (`mosquitto.admin_url` in the
    /// `--config` file or `FLEDGE_MOSQUITTO_ADMIN_URL`).
    fn provisions_mosquitto(&self) -> anyhow::Result<bool> {
        if std::env::var_os("FLEDGE_MOSQUITTO_ADMIN_URL").is_some_and(|v| !v.is_empty()) {
            return Ok(true);
        }
        let Some(path) = &self.config else { return Ok(false) };
        // An unreadable or malformed file is reported, with its line, when it is loaded.
        let Ok(text) = std::fs::read_to_string(path) else { return Ok(false) };
        let Ok(table) = text.parse::<toml::Table>() else { return Ok(false) };
        Ok(table
            .get("mosquitto")
            .and_then(|m| m.get("admin_url"))
            .and_then(|url| url.as_str())
            .is_some_and(|url| !url.is_empty()))
    }

    /// The arguments of a plain `fledge standalone` (every default).
    pub fn defaults() -> Args {
        Args {
            data_dir: PathBuf::from("fledge-data"),
            port: 10100,
            ..Args::ephemeral(PathBuf::new())
        }
    }

    /// Arguments for a throw-away platform in `data_dir`: free ports, a process deployer,
    /// no configuration file (used by `fledge quickstart`).
    pub fn ephemeral(data_dir: PathBuf) -> Args {
        Args {
            data_dir,
            port: 0,
            host: std::net::IpAddr::from([127, 0, 0, 1]),
            config: None,
            cli_config: None,
            no_deployer: false,
            dump_config: false,
            tls: TlsArgs::default(),
        }
    }
}

/// A running standalone platform.
pub struct Platform {
    /// The apiserver's base URL.
    pub endpoint: String,
    /// An admin token for it.
    pub token: String,
    /// The CA its clients trust (`None` under `--insecure`).
    pub ca: Option<fledge_client::Ca>,
    /// `fledgectl login ...` with the CA's fingerprint, when there is a CA.
    pub login: Option<String>,
    /// Where each service listens.
    pub addrs: BoundAddrs,
    services: Services,
}

impl Platform {
    /// Waits until the platform is shut down (signal or service failure); returns the first
    /// service failure.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.services.wait().await
    }

    /// Stops every service and waits for them; a service failure is logged.
    pub async fn shutdown(self) {
        self.services.shutdown_token().cancel();
        if let Err(err) = self.services.wait().await {
            tracing::warn!(error = format!("{err:#}"), "a service failed during the run");
        }
    }
}

/// Starts every service, the admin token, compute `default` and (unless `--no-deployer`) its
/// process deployer. Writes the endpoint and token into `cli_config` when given.
pub async fn launch(args: &Args, cli_config: Option<&Path>) -> anyhow::Result<Platform> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let options = super::serve::load_options(args.config.as_deref(), &env, &args.overrides()?)?;
    let store = service::open_store(&options).await?;
    let services = service::start(&options, store.clone(), &CancellationToken::new())
        .await
        .context("cannot start the services")?;
    let endpoint = services.endpoints.apiserver.clone();
    let token = fledge_control::api::bootstrap_admin(store.as_ref())
        .await
        .context("cannot create the admin token")?;
    let ca = services.tls.as_ref().and_then(|tls| tls.ca.clone());
    if let Some(path) = cli_config {
        write_cli_config(path, &endpoint, &token, ca.as_ref())?;
    }
    let login = login_command(&endpoint, services.tls.as_ref());
    if let Some(login) = &login {
        let path = options.data_dir.join("login.txt");
        std::fs::write(&path, format!("{login}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let api_key =
        register_compute(store.as_ref(), DEFAULT_COMPUTE, options.deployer.platform).await?;
    if args.no_deployer {
        tracing::info!("--no-deployer: workers must be started by hand");
    } else {
        start_deployer(&services, &options.deployer, &options.data_dir, api_key)?;
    }
    Ok(Platform { endpoint, token, ca, login, addrs: services.addrs.clone(), services })
}

/// Runs the subcommand.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.dump_config {
        let env: HashMap<String, String> = std::env::vars().collect();
        let options = super::serve::load_options(args.config.as_deref(), &env, &args.overrides()?)?;
        #[allow(clippy::print_stdout)]
        {
            print!("{}", options.to_toml()?);
        }
        return Ok(());
    }
    let cli_config = match &args.cli_config {
        Some(path) => path.clone(),
        None => {
            let env: HashMap<String, String> = std::env::vars().collect();
            fledge_client::config::ClientConfig::default_path(&env)
                .map_err(|err| UsageError(format!("{err}; pass --cli-config PATH")))?
        }
    };
    let platform = launch(&args, Some(&cli_config)).await?;
    service::cancel_on_signal(platform.services.shutdown_token());
    tracing::info!(
        apiserver = ?platform.addrs.apiserver,
        notifier = ?platform.addrs.notifier,
        broker = ?platform.addrs.broker,
        metaserver = ?platform.addrs.metaserver,
        "standalone listening"
    );
    #[allow(clippy::print_stdout)]
    {
        println!("endpoint: {}", platform.endpoint);
        println!("token: {}", platform.token);
        if let Some(ca) = &platform.ca {
            println!("ca fingerprint: {}", ca.fingerprint());
        }
        if let Some(login) = &platform.login {
            println!("login from elsewhere: {login} --login-token TOKEN");
        }
        println!("fledgectl config: {}", cli_config.display());
        println!("ready");
    }
    platform.wait().await
}

/// Registers compute `id` (serving every realm) with a fresh API key. An existing one (from an
/// earlier start on this store, maybe one that crashed with jobs running) keeps its tasks and
/// gets the new key, since the old one is stored hashed and cannot be recovered.
pub(crate) async fn register_compute(
    store: &dyn store::Store,
    id: &str,
    platform: fledge_types::Platform,
) -> anyhow::Result<String> {
    let id = ComputeId::new(id);
    let api_key = fledge_control::api::new_secret();
    match store.set_compute_key(&id, &api_key).await {
        Ok(()) => return Ok(api_key),
        Err(store::Error::NotFound { .. }) => {}
        Err(err) => {
            return Err(err).with_context(|| format!("cannot renew the key of compute {id}"));
        }
    }
    store
        .create_compute(&ComputeSpec {
            compute_id: id.clone(),
            region: "default".to_owned(),
            api_key: api_key.clone(),
            platform,
        })
        .await
        .with_context(|| format!("cannot register compute {id}"))?;
    Ok(api_key)
}

/// Runs the deployer of compute `default` as one more service: one `fledgelet` per task under
/// `<data_dir>/work`, as a child process or (`[deployer] platform = "docker"` in `--config`) a
/// container. The configuration's deployer section gives the platform and its options; the
/// compute, its key, its URLs and its CA are this process's.
fn start_deployer(
    services: &Services,
    configured: &DeployerSection,
    data_dir: &Path,
    api_key: String,
) -> anyhow::Result<()> {
    let section = DeployerSection {
        compute_id: DEFAULT_COMPUTE.to_owned(),
        api_key: Some(api_key),
        apiserver: None,
        notifier: None,
        // Workers trust the CA this process created (or the operator's --tls-ca).
        ca_file: services.tls.as_ref().and_then(|tls| tls.ca_path.clone()),
        ..configured.clone()
    };
    let deployer =
        super::serve::build_deployer(&section, data_dir, Some(&services.endpoints), None)?;
    services
        .telemetry
        .register(|r| deployer.register_metrics(r.sub_registry_with_prefix("deployer")));
    let token = services.shutdown_token();
    services
        .spawn("deployer", async move { deployer.run(token).await.map_err(anyhow::Error::from) });
    Ok(())
}

/// The `fledgectl` context `fledge standalone` writes.
pub const CLI_CONTEXT: &str = "standalone";

/// Sets `endpoint`, `token` and `ca` (PEM; removed when `None`) as the context
/// [`CLI_CONTEXT`] of `fledgectl`'s config file at `path` and makes it the current one,
/// keeping the file's other contexts (a single-endpoint file keeps its settings as the
/// context `default`). Written atomically, mode 0600: it holds an admin token.
pub fn write_cli_config(
    path: &Path,
    endpoint: &str,
    token: &str,
    ca: Option<&fledge_client::Ca>,
) -> anyhow::Result<()> {
    use fledge_client::config::ConfigFile;
    let mut file = ConfigFile::read(path)?.unwrap_or_default();
    let context = file.context_mut(CLI_CONTEXT)?;
    context.endpoint = Some(endpoint.to_owned());
    context.token = Some(token.to_owned());
    context.ca = ca.map(|ca| ca.pem().to_owned());
    context.ca_file = None;
    file.current_context = Some(CLI_CONTEXT.to_owned());
    file.write(path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_config_keeps_other_contexts_and_rejects_non_configs() {
        use fledge_client::config::ConfigFile;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("config.yaml");
        write_cli_config(&path, "http://127.0.0.1:1", "t1", None).expect("fresh file");
        // A user's single-endpoint file: kept as the context `default`.
        std::fs::write(&path, "endpoint: https://remote:1\ntoken: mine\nca: stale\n")
            .expect("seed");
        write_cli_config(&path, "http://127.0.0.1:2", "t2", None).expect("update");
        let file = ConfigFile::read(&path).expect("read").expect("exists");
        assert_eq!(file.current_context.as_deref(), Some(CLI_CONTEXT));
        let ours = file.context(CLI_CONTEXT).expect("standalone context");
        assert_eq!(ours.endpoint.as_deref(), Some("http://127.0.0.1:2"));
        assert_eq!(ours.token.as_deref(), Some("t2"));
        assert!(ours.ca.is_none(), "a plain-text endpoint keeps no stale CA");
        let theirs = file.context("default").expect("the user's context");
        assert_eq!(theirs.token.as_deref(), Some("mine"));

        std::fs::write(&path, "- a\n- b\n").expect("seed list");
        let err = write_cli_config(&path, "e", "t", None).expect_err("a list is not a config");
        assert!(err.to_string().contains("invalid config file"), "{err}");
    }

    #[test]
    fn ports_follow_the_base_port() {
        let args = Args {
            data_dir: PathBuf::from("/d"),
            port: 20000,
            host: std::net::IpAddr::from([127, 0, 0, 1]),
            config: None,
            cli_config: None,
            no_deployer: true,
            dump_config: false,
            tls: TlsArgs::default(),
        };
        let overrides = args.overrides().expect("valid port");
        let get = |key: &str| overrides.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        assert_eq!(get("notifier.listen").as_deref(), Some("127.0.0.1:20001"));
        assert_eq!(get("broker.listen").as_deref(), Some("127.0.0.1:20002"));
        assert_eq!(get("metaserver.listen").as_deref(), Some("127.0.0.1:20003"));
        assert_eq!(get("store_url").as_deref(), Some("sqlite:///d/fledge.db"));
        let too_high = Args { port: u16::MAX, ..args };
        assert!(too_high.overrides().is_err());
    }
}
