//! Composes the control-plane services into one process: any subset of the apiserver,
//! controller, notifier, metaserver and embedded broker, sharing one store.
//!
//! [`start`] opens the store, binds every configured listener first (so a busy port fails before
//! anything runs; port 0 picks a free port and [`Services::addrs`] reports it), then builds and
//! spawns each service on a [`TaskTracker`] under a child of the caller's [`CancellationToken`].
//! When any service fails, the others are shut down and [`Services::wait`] returns the error.
//! Callers add their own components (the compute-side deployer of `fledge standalone`) with
//! [`Services::spawn`], so they shut down with the rest.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use fledge_types::task_config::{BrokerSpec, TaskEnv};

use crate::broker_auth::BrokerCredentials;
use crate::config::{Options, ServiceKind, StoreUrl};
use crate::controller::{self, Controller, Endpoints};
use crate::notifier;
use crate::store::{BlobStore, PostgresStore, SqliteStore, Store};
use crate::telemetry::Telemetry;
use crate::tls::{ControlTls, TlsListener};

/// The addresses the services are bound to (present for the services that run).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BoundAddrs {
    /// The REST apiserver.
    pub apiserver: Option<SocketAddr>,
    /// The gRPC notifier.
    pub notifier: Option<SocketAddr>,
    /// The embedded MQTT broker.
    pub broker: Option<SocketAddr>,
    /// The metaserver.
    pub metaserver: Option<SocketAddr>,
    /// The metrics listener (`metrics.listen`).
    pub metrics: Option<SocketAddr>,
}

/// Running services.
pub struct Services {
    /// Where each running service listens.
    pub addrs: BoundAddrs,
    /// Where workers and clients reach the control plane (advertised addresses).
    pub endpoints: Endpoints,
    /// The brokers written into task configs (`host:port`).
    pub brokers: Vec<BrokerSpec>,
    /// The shared store.
    pub store: Arc<dyn Store>,
    /// The TLS of the apiserver, notifier and metaserver (`None` under `tls.insecure`).
    pub tls: Option<ControlTls>,
    /// Wakes the controller (a no-op sink when the controller runs elsewhere).
    pub controller: controller::Handle,
    /// Publishes notifier events (present when the notifier runs here).
    pub notifier: Option<notifier::Handle>,
    /// This process's operator metrics: every service registers its series here; callers add
    /// their own components' (a deployer's) with [`Telemetry::register`].
    pub telemetry: Telemetry,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    failure: Arc<Mutex<Option<anyhow::Error>>>,
    broker: Option<fledge_channel::broker::BrokerHandle>,
}

/// Opens the configured store (creating the SQLite file and blob directory if needed).
pub async fn open_store(options: &Options) -> anyhow::Result<Arc<dyn Store>> {
    let blob_dir = options.blob_dir();
    let blobs = BlobStore::new(&blob_dir, options.max_code_bytes)
        .with_context(|| format!("cannot open the blob directory {}", blob_dir.display()))?;
    let store: Arc<dyn Store> =
        match options.store().map_err(|reason| anyhow::anyhow!("store_url: {reason}"))? {
            StoreUrl::Sqlite(path) => Arc::new(
                SqliteStore::open(&path, blobs)
                    .await
                    .with_context(|| format!("cannot open the SQLite store {}", path.display()))?,
            ),
            StoreUrl::Postgres(url) => Arc::new(
                PostgresStore::connect(&url, blobs)
                    .await
                    .context("cannot connect to the PostgreSQL store")?,
            ),
        };
    Ok(store)
}

/// `https://addr` (or `http://` without TLS), with an unspecified IP (`0.0.0.0`, `::`) read
/// as loopback.
fn url_of(addr: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{}", reachable(addr))
}

fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        let ip = if addr.is_ipv4() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
        };
        SocketAddr::new(ip, addr.port())
    } else {
        addr
    }
}

/// The broker entry of task configs: `broker.advertise`, else the embedded broker's address;
/// `mqtts://` when the embedded broker runs here with TLS (tasks verify it with
/// `controlPlaneCa`), with `broker.ca_file` as its CA for an operator's `mqtts` broker.
fn broker_spec(
    options: &Options,
    embedded: Option<SocketAddr>,
    secure: bool,
) -> anyhow::Result<BrokerSpec> {
    let host = options
        .broker
        .advertise
        .clone()
        .unwrap_or_else(|| reachable(embedded.unwrap_or(options.broker.listen)).to_string());
    let host = if embedded.is_some() && secure && !host.contains("://") {
        format!("mqtts://{host}")
    } else {
        host
    };
    let mut spec = BrokerSpec::mqtt(host);
    if let Some(path) = &options.broker.ca_file {
        let ca = fledge_tls::Ca::load(path)
            .with_context(|| format!("broker.ca_file {}", path.display()))?;
        spec.ca = Some(ca.pem().to_owned());
    }
    Ok(spec)
}

async fn bind(service: ServiceKind, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("cannot bind the {service} to {addr}"))
}

/// Starts the services `options.services` over `store`, under `shutdown`.
pub async fn start(
    options: &Options,
    store: Arc<dyn Store>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Services> {
    let shutdown = shutdown.child_token();
    let res = start_under(options, store, shutdown.clone()).await;
    if res.is_err() {
        // Stop whatever already started rather than leaving it running detached.
        shutdown.cancel();
    }
    res
}

async fn start_under(
    options: &Options,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> anyhow::Result<Services> {
    options.validate().context("invalid configuration")?;

    // Bind first: a busy port fails before any service starts.
    let api_listener = match options.runs(ServiceKind::Apiserver) {
        true => Some(bind(ServiceKind::Apiserver, options.apiserver.listen).await?),
        false => None,
    };
    let notifier_listener = match options.runs(ServiceKind::Notifier) {
        true => Some(bind(ServiceKind::Notifier, options.notifier.listen).await?),
        false => None,
    };
    let metaserver_listener = match options.runs(ServiceKind::Metaserver) {
        true => Some(bind(ServiceKind::Metaserver, options.metaserver.listen).await?),
        false => None,
    };
    let metrics_listener = match options.metrics.listen {
        Some(addr) => Some(crate::telemetry::bind(addr).await?),
        None => None,
    };
    let local_addr = |listener: &Option<TcpListener>| -> anyhow::Result<Option<SocketAddr>> {
        listener.as_ref().map(|l| l.local_addr().context("cannot read a bound address")).transpose()
    };
    let mut addrs = BoundAddrs {
        apiserver: local_addr(&api_listener)?,
        notifier: local_addr(&notifier_listener)?,
        broker: None,
        metaserver: local_addr(&metaserver_listener)?,
        metrics: local_addr(&metrics_listener)?,
    };
    let bound: Vec<SocketAddr> = [addrs.apiserver, addrs.notifier, addrs.metaserver, addrs.metrics]
        .into_iter()
        .flatten()
        .collect();
    let telemetry = Telemetry::new();
    telemetry.watch_store(store.clone());
    let tls = ControlTls::resolve(options, &bound).context("cannot set up TLS")?;
    let secure = tls.is_some();
    // Task configs carry broker logins derived from this secret; the embedded broker admits
    // only those of tasks of live jobs.
    let broker_secret = options.broker_secret_path();
    let broker_credentials =
        BrokerCredentials::load_or_create(&broker_secret).with_context(|| {
            format!("cannot read or create the broker secret {}", broker_secret.display())
        })?;
    let broker = if options.runs(ServiceKind::Broker) {
        let broker_options = fledge_channel::broker::BrokerOptions {
            auth: Some(broker_credentials.clone().broker_auth(store.clone(), &telemetry)),
            // mqtts with the control plane's identity; plain only under tls.insecure, which
            // validation allows on loopback only.
            tls: tls.as_ref().map(ControlTls::mqtt_server_config).transpose()?,
            ..Default::default()
        };
        let handle = fledge_channel::broker::start_embedded_broker_with(
            options.broker.listen,
            broker_options,
        )
        .with_context(|| format!("cannot start the broker on {}", options.broker.listen))?;
        addrs.broker = Some(handle.addr());
        tracing::info!(addr = %handle.addr(), "broker listening");
        let open = handle.connections();
        let gauge = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        telemetry.register(|registry| {
            registry.sub_registry_with_prefix("broker").register(
                "connections",
                "MQTT client connections open on the embedded broker (past the TLS handshake)",
                gauge.clone(),
            );
        });
        telemetry.on_scrape(move || {
            let n = open.load(std::sync::atomic::Ordering::Relaxed);
            gauge.set(i64::try_from(n).unwrap_or(i64::MAX));
        });
        Some(handle)
    } else {
        None
    };

    let endpoints =
        Endpoints {
            apiserver: options.apiserver.advertise.clone().unwrap_or_else(|| {
                url_of(addrs.apiserver.unwrap_or(options.apiserver.listen), secure)
            }),
            notifier: options.notifier.advertise.clone().unwrap_or_else(|| {
                url_of(addrs.notifier.unwrap_or(options.notifier.listen), secure)
            }),
        };
    let brokers = vec![broker_spec(options, addrs.broker, secure)?];

    let mut services = Services {
        addrs,
        endpoints: endpoints.clone(),
        brokers,
        store: store.clone(),
        tls: tls.clone(),
        // Replaced below when the controller runs here; otherwise wake-ups go nowhere and the
        // remote controller's periodic resync picks changes up.
        controller: controller::Handle::channel(1).0,
        notifier: None,
        telemetry: telemetry.clone(),
        shutdown: shutdown.clone(),
        tracker: TaskTracker::new(),
        failure: Arc::new(Mutex::new(None)),
        broker,
    };

    // Task configs name the metaserver when one runs here or is configured elsewhere.
    let metaserver_url = options
        .metaserver
        .advertise
        .clone()
        .or_else(|| services.addrs.metaserver.map(|addr| url_of(addr, secure)));
    if let Some(listener) = metaserver_listener {
        let mut metaserver = options
            .limits
            .metaserver()
            .build()
            .context("cannot build the metaserver")?
            .authenticated(store.clone());
        if let Some(tls) = &tls {
            metaserver = metaserver.with_tls(tls.tonic());
        }
        let token = shutdown.clone();
        services.spawn("metaserver", async move {
            metaserver.run(listener, token).await.map_err(anyhow::Error::from)
        });
    }

    if let Some(listener) = notifier_listener {
        let mut notifier =
            options.notifier_options().build(store.clone()).context("cannot build the notifier")?;
        if let Some(tls) = &tls {
            notifier = notifier.with_tls(tls.tonic());
        }
        services.notifier = Some(notifier.handle());
        notifier.handle().register_metrics(&telemetry);
        let token = shutdown.clone();
        services.spawn("notifier", async move {
            notifier.run(listener, token).await.map_err(anyhow::Error::from)
        });
    }

    if options.runs(ServiceKind::Controller) {
        let notifier = services
            .notifier
            .clone()
            .context("the controller needs the notifier in the same process")?;
        let secret = options.task_key_secret_path();
        let keys = controller::TaskKeys::load_or_create(&secret).with_context(|| {
            format!("cannot read or create the task-key secret {}", secret.display())
        })?;
        let controller = Controller::build(
            options.controller.clone(),
            store.clone(),
            notifier,
            endpoints.clone(),
            keys,
        )
        .context("cannot build the controller")?;
        controller.register_metrics(&telemetry);
        services.controller = controller.handle();
        let token = shutdown.clone();
        services.spawn("controller", controller.run(token));
    }

    if let Some(listener) = api_listener {
        let env = TaskEnv {
            brokers: services.brokers.clone(),
            apiserver: Some(endpoints.apiserver.clone()),
            metaserver: metaserver_url,
            // Jobs that name no registry keep their models and metrics under the data
            // directory, where `fledge quickstart` and users look for them.
            default_registry: fledge_types::RegistrySpec {
                sort: "local".to_owned(),
                uri: options.data_dir.join("registry").display().to_string(),
            },
        };
        let secret = options.task_key_secret_path();
        let keys = controller::TaskKeys::load_or_create(&secret).with_context(|| {
            format!("cannot read or create the task-key secret {}", secret.display())
        })?;
        let mosquitto = match options.mosquitto.admin() {
            Some(mut admin) => {
                // An mqtts admin URL is verified like tasks verify the broker: against
                // broker.ca_file, else the control plane's CA.
                admin.ca = match &options.broker.ca_file {
                    Some(path) => Some(
                        fledge_tls::Ca::load(path)
                            .with_context(|| format!("broker.ca_file {}", path.display()))?,
                    ),
                    None => services.tls.as_ref().and_then(|tls| tls.ca.clone()),
                };
                let provisioner =
                    crate::mosquitto::Provisioner::connect(&admin, broker_credentials.clone())
                        .context("cannot set up Mosquitto provisioning")?;
                let (sweeper, store, token) =
                    (provisioner.clone(), store.clone(), shutdown.clone());
                let interval = Duration::from_secs_f64(options.mosquitto.sweep_interval_secs);
                services.spawn("mosquitto provisioner", async move {
                    sweeper.run(store, interval, token).await;
                    Ok(())
                });
                Some(provisioner)
            }
            None => None,
        };
        let access = ApiAccess { broker_credentials, mosquitto, data_plane_keys: keys };
        start_apiserver(&mut services, listener, env, access, &options.limits)?;
    }

    if let Some(listener) = metrics_listener {
        let (token, telemetry) = (shutdown.clone(), telemetry.clone());
        match &tls {
            Some(tls) => {
                let listener = TlsListener::new(listener, tls.acceptor()?, token.clone())
                    .context("cannot read the metrics listener's bound address")?;
                services.spawn("metrics", crate::telemetry::serve(listener, telemetry, token));
            }
            None => services.spawn("metrics", crate::telemetry::serve(listener, telemetry, token)),
        }
    }

    Ok(services)
}

/// What the apiserver puts into task configs: broker logins (and the Mosquitto provisioned
/// with them) and data-plane keys.
struct ApiAccess {
    broker_credentials: BrokerCredentials,
    mosquitto: Option<crate::mosquitto::Provisioner>,
    data_plane_keys: controller::TaskKeys,
}

/// Starts the REST apiserver on `listener`, bounded by `limits`.
fn start_apiserver(
    services: &mut Services,
    listener: TcpListener,
    env: TaskEnv,
    access: ApiAccess,
    limits: &crate::config::LimitsSection,
) -> anyhow::Result<()> {
    let ApiAccess { broker_credentials, mosquitto, data_plane_keys } = access;
    let mlflow = crate::mlflow::MlflowAuth::from_env()
        .map_err(|err| anyhow::anyhow!("the MLflow credentials: {err}"))?;
    if mlflow.has_token() && mlflow.servers().next().is_none() {
        tracing::warn!(
            "an MLflow token is set but {} names no server: it is sent to none",
            crate::mlflow::SERVERS_ENV
        );
    }
    let state = crate::api::ApiState::new(
        services.store.clone(),
        services.controller.clone(),
        services.notifier.clone(),
        env,
    );
    let base = state.limits;
    let state = state
        .with_limits(limits.api(base))
        .with_notifier_url(services.endpoints.notifier.clone())
        .with_ca(services.tls.as_ref().and_then(|tls| tls.ca.clone()))
        .with_broker_credentials(broker_credentials)
        .with_data_plane_keys(data_plane_keys)
        .with_secure_cookies(services.tls.is_some())
        .with_mlflow(mlflow)
        .with_telemetry(services.telemetry.clone());
    let state = match mosquitto {
        Some(provisioner) => state.with_mosquitto(provisioner),
        None => state,
    };
    let token = services.shutdown.clone();
    match &services.tls {
        Some(tls) => {
            let listener = TlsListener::new(listener, tls.acceptor()?, token.clone())
                .context("cannot read the apiserver's bound address")?;
            services.spawn("apiserver", async move {
                crate::api::serve_on(listener, state, token).await
            });
        }
        None => {
            services
                .spawn("apiserver", async move { crate::api::serve(listener, state, token).await });
        }
    }
    Ok(())
}

impl Services {
    /// Runs `future` as a named component of these services: it is tracked, and its failure
    /// shuts every service down and becomes the result of [`Services::wait`].
    pub fn spawn<F>(&self, name: &'static str, future: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let shutdown = self.shutdown.clone();
        let failure = self.failure.clone();
        self.tracker.spawn(async move {
            match future.await {
                Ok(()) => tracing::info!(service = name, "service stopped"),
                Err(err) => {
                    tracing::error!(
                        service = name,
                        error = format!("{err:#}"),
                        "service failed; shutting down"
                    );
                    let mut slot = failure.lock().unwrap_or_else(|p| p.into_inner());
                    slot.get_or_insert(err.context(format!("the {name} failed")));
                    shutdown.cancel();
                }
            }
        });
    }

    /// The token that stops these services (a child of the one given to [`start`]).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until shutdown is requested (or a service failed), then for every service to stop.
    /// Returns the first service failure.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        self.shutdown.cancelled().await;
        self.tracker.close();
        self.tracker.wait().await;
        if let Some(broker) = self.broker.take() {
            broker.shutdown();
        }
        let failure = self.failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        match failure {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }
}

/// Cancels `shutdown` on Ctrl-C or SIGTERM.
pub fn cancel_on_signal(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => tracing::info!("ctrl-c received; shutting down"),
            () = term => tracing::info!("SIGTERM received; shutting down"),
        }
        shutdown.cancel();
    });
}
