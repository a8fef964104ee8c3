//! The embedded MQTT broker (feature `broker`): rumqttd, configured in code.
//!
//! With [`BrokerOptions::tls`] set the broker speaks MQTT over TLS only (`mqtts`): the relay in
//! front of rumqttd (see below) completes a rustls handshake, within 10 s, before it forwards a
//! byte, so a plain MQTT client is dropped without reaching rumqttd, and credentials never
//! cross the network in clear. `fledge serve` gives it the control plane's server identity.
//!
//! With [`BrokerOptions::auth`] set, a client must present a username and password that the
//! given check accepts (the control plane admits only the credentials it issued to tasks of
//! live jobs, see `fledge_control::broker_auth`); a client without credentials or with refused
//! ones gets CONNACK "not authorized" before it can subscribe or publish. The relay checks the
//! login, and rumqttd accepts only CONNECTs the relay passed on (see `broker::acl`); rumqttd has no
//! topic ACLs, so the relay enforces them too: a login `<job id>/<task id>` subscribes and
//! publishes only inside its job, and publishes only its own presence; a client that tries
//! anything else is disconnected. Without `auth` (local runs and tests in one process) the
//! broker is anonymous and the relay passes bytes through unread.
//!
//! rumqttd can neither report the port it bound nor stop. So the broker listens on an internal
//! loopback port, and a small TCP relay owned by [`BrokerHandle`] listens on the address the
//! caller asked for (port 0 works: [`BrokerHandle::addr`] has the real one). Shutting the handle
//! down closes the public listener and every relayed connection, which clients see as the broker
//! going away (their last wills fire); a new broker can then bind the same address. The rumqttd
//! router threads themselves stay parked until the process exits (a few idle threads per broker).

use std::collections::HashMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::mqtt::DEFAULT_CHUNK_SIZE;

mod acl;
use crate::shared::{Error, Result};

/// Longest username or password the broker passes to [`BrokerAuth`], in bytes; longer ones are
/// refused without asking it.
pub const MAX_CREDENTIAL_BYTES: usize = 1024;

/// How long a client may take to complete its TLS handshake before it is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Username of the broker's own readiness probe (it connects to the internal port).
const PROBE_USERNAME: &str = "fledge-broker-probe";

/// How long a client may take, once connected (and past TLS), to send its CONNECT when the
/// broker checks logins.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// CONNACK with return code 5, "not authorized" (MQTT 3.1.1).
const CONNACK_NOT_AUTHORIZED: [u8; 4] = [0x20, 0x02, 0x00, 0x05];

type AuthFuture = Pin<Box<dyn Future<Output = bool> + Send>>;

/// Decides whether a client presenting `(username, password)` may connect.
#[derive(Clone)]
pub struct BrokerAuth(Arc<dyn Fn(String, String) -> AuthFuture + Send + Sync>);

impl BrokerAuth {
    /// A check run for every CONNECT that carries credentials; `true` admits the client.
    pub fn new<F, Fut>(check: F) -> BrokerAuth
    where
        F: Fn(String, String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        BrokerAuth(Arc::new(move |user, pass| Box::pin(check(user, pass))))
    }
}

impl std::fmt::Debug for BrokerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BrokerAuth(<check>)")
    }
}

/// Broker sizing and admission. The defaults carry [`DEFAULT_CHUNK_SIZE`] chunks with room to
/// spare and admit anonymous clients.
#[derive(Clone, Debug)]
pub struct BrokerOptions {
    /// Who may connect: `None` admits anyone (one-process runs and tests); `Some` admits only
    /// clients whose username and password the check accepts.
    pub auth: Option<BrokerAuth>,
    /// TLS the broker serves (`mqtts`): `None` serves plain MQTT (loopback runs and tests).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Largest publish payload accepted, in bytes. Default 2 × 4 MiB + 64 KiB.
    pub max_payload_size: usize,
    /// Unacknowledged QoS 1 publishes per connection. Default 1000.
    pub max_inflight_count: usize,
    /// Concurrent connections. Default 10 000.
    pub max_connections: usize,
    /// Bytes of one commit-log segment per topic filter (raised to twice the payload size if
    /// smaller). Default 32 MiB.
    pub max_segment_size: usize,
    /// Segments kept per topic filter. rumqttd keeps up to `max_segment_size ×
    /// max_segment_count` bytes per active topic in memory (256 MiB by default), and a
    /// subscriber further behind than that loses data. Default 8.
    pub max_segment_count: usize,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            auth: None,
            tls: None,
            max_payload_size: 2 * DEFAULT_CHUNK_SIZE + (64 << 10),
            max_inflight_count: 1000,
            max_connections: 10_000,
            max_segment_size: 32 << 20,
            max_segment_count: 8,
        }
    }
}

/// A running embedded broker; stops when dropped or shut down.
#[derive(Debug)]
pub struct BrokerHandle {
    addr: SocketAddr,
    /// rumqttd's own loopback port, behind the relay.
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    internal: SocketAddr,
    tls: bool,
    cancel: CancellationToken,
    relay: Option<thread::JoinHandle<()>>,
    /// Client connections relayed to rumqttd right now (TLS handshake done).
    connections: Arc<AtomicUsize>,
}

impl BrokerHandle {
    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// rumqttd's internal loopback address behind the relay (for this crate's tests: no client
    /// is meant to connect there).
    #[cfg(feature = "test-hooks")]
    pub fn internal_addr(&self) -> SocketAddr {
        self.internal
    }

    /// Whether it serves MQTT over TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// `mqtt://ip:port`, or `mqtts://ip:port` when it serves TLS, for
    /// [`crate::MqttConfig::parse`] and task configs.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        format!("{scheme}://{}", self.addr)
    }

    /// The client connections open right now (past the TLS handshake when it serves TLS):
    /// a counter to read whenever needed (the operator's `fledge_broker_connections`).
    pub fn connections(&self) -> Arc<AtomicUsize> {
        self.connections.clone()
    }

    /// Stops accepting, drops every client connection and releases the address.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.cancel.cancel();
        if let Some(relay) = self.relay.take()
            && relay.join().is_err()
        {
            tracing::warn!("broker relay thread panicked");
        }
    }
}

impl Drop for BrokerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn io(context: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { context: context.to_owned(), source }
}

/// rumqttd's settings. With `opts.auth`, rumqttd admits only the password `secret`, which only
/// the relay (for logins it checked) and the readiness probe present.
fn rumqttd_config(internal: SocketAddr, opts: &BrokerOptions, secret: &str) -> rumqttd::Config {
    let mut connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: opts.max_payload_size,
        max_inflight_count: opts.max_inflight_count,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    if opts.auth.is_some() {
        let secret = secret.to_owned();
        connections.set_auth_handler(move |client_id: String, user: String, pass: String| {
            let admitted = crate::secure::same_secret(&pass, &secret);
            if !admitted {
                // Someone reached the internal port without the relay.
                tracing::warn!(%client_id, username = %user, "mqtt client refused: not through the relay");
            }
            async move { admitted }
        });
    }
    let server = rumqttd::ServerSettings {
        name: "fledge-v4".to_owned(),
        listen: internal,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: opts.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: opts.max_segment_size.max(opts.max_payload_size * 2),
            max_segment_count: opts.max_segment_count.max(2),
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Default::default()
    }
}

/// Starts a broker with default sizing on `addr` (port 0 picks a free port).
pub fn start_embedded_broker(addr: SocketAddr) -> Result<BrokerHandle> {
    start_embedded_broker_with(addr, BrokerOptions::default())
}

/// Starts a broker with `opts` on `addr` (port 0 picks a free port).
pub fn start_embedded_broker_with(addr: SocketAddr, opts: BrokerOptions) -> Result<BrokerHandle> {
    // Bind the public side first so that a busy address fails before anything starts.
    let public = StdListener::bind(addr).map_err(io("bind broker address"))?;
    let public_addr = public.local_addr().map_err(io("read broker address"))?;
    public.set_nonblocking(true).map_err(io("configure broker listener"))?;

    // rumqttd binds by itself; take a free loopback port and hand it over.
    let internal = {
        let probe =
            StdListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(io("reserve internal port"))?;
        probe.local_addr().map_err(io("read internal port"))?
    };
    // The relay's (and the probe's) credential at rumqttd, good for this broker only.
    let secret = format!("{:032x}", rand::random::<u128>());
    let config = rumqttd_config(internal, &opts, &secret);
    thread::Builder::new()
        .name("fledge-broker".to_owned())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(io("spawn broker thread"))?;
    wait_listening(internal, &secret)?;

    let acceptor = opts.tls.clone().map(TlsAcceptor::from);
    let tls = acceptor.is_some();
    let auth = opts.auth.clone().map(|check| (check, secret));
    let cancel = CancellationToken::new();
    let relay_cancel = cancel.clone();
    let connections = Arc::new(AtomicUsize::new(0));
    let relay_connections = connections.clone();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io("build broker relay runtime"))?;
    let relay = thread::Builder::new()
        .name("fledge-broker-relay".to_owned())
        .spawn(move || {
            runtime.block_on(relay(
                public,
                Relay { internal, acceptor, auth },
                relay_cancel,
                relay_connections,
            ))
        })
        .map_err(io("spawn broker relay thread"))?;
    tracing::info!(addr = %public_addr, tls, "embedded mqtt broker started");
    Ok(BrokerHandle { addr: public_addr, internal, tls, cancel, relay: Some(relay), connections })
}

/// Waits until rumqttd answers an MQTT CONNECT on `internal` (it binds on its own thread).
/// A full CONNECT/CONNACK/DISCONNECT exchange checks the router too, and unlike a bare TCP
/// probe it does not make rumqttd log a connect error.
fn wait_listening(internal: SocketAddr, probe_secret: &str) -> Result<()> {
    use backon::{BlockingRetryable as _, ConstantBuilder};
    // Up to 5 s: 200 probes 25 ms apart.
    let schedule =
        ConstantBuilder::default().with_delay(Duration::from_millis(25)).with_max_times(200);
    (|| probe(internal, probe_secret)).retry(schedule).sleep(thread::sleep).call().map_err(
        |source| Error::Io {
            context: format!("embedded broker did not answer on {internal}"),
            source,
        },
    )
}

fn probe(internal: SocketAddr, probe_secret: &str) -> std::io::Result<()> {
    use std::io::{Read, Write};
    const CLIENT_ID: &[u8] = b"fledge-probe";
    let field = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    // Protocol "MQTT" level 4, clean session, username and password, keep-alive 10 s.
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xc2, 0x00, 0x0a];
    field(&mut body, CLIENT_ID);
    field(&mut body, PROBE_USERNAME.as_bytes());
    field(&mut body, probe_secret.as_bytes());
    // The probe's CONNECT is well under 128 bytes: a one-byte remaining length.
    let mut connect = vec![0x10, body.len() as u8];
    connect.extend_from_slice(&body);
    let mut stream = std::net::TcpStream::connect_timeout(&internal, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(&connect)?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack)?;
    if connack != [0x20, 0x02, 0x00, 0x00] {
        return Err(std::io::Error::other(format!("unexpected CONNACK {connack:02x?}")));
    }
    stream.write_all(&[0xe0, 0x00])?;
    Ok(())
}

/// How the relay treats each client.
#[derive(Clone)]
struct Relay {
    /// rumqttd's loopback port.
    internal: SocketAddr,
    /// TLS to complete first, when the broker serves it.
    acceptor: Option<TlsAcceptor>,
    /// The login check and the password rumqttd takes from the relay, when the broker admits
    /// only logins: then the relay checks logins and enforces their topic ACLs ([`acl`]).
    auth: Option<(BrokerAuth, String)>,
}

async fn relay(public: StdListener, how: Relay, cancel: CancellationToken, open: Arc<AtomicUsize>) {
    let listener = match TcpListener::from_std(public) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "broker relay cannot listen");
            return;
        }
    };
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    let open = open.clone();
                    connections.spawn(serve(client, peer, how.clone(), open));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "broker accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    // Dropping the set aborts every relayed connection: clients see the broker go away.
    connections.shutdown().await;
}

/// Relays one client: after a TLS handshake when the broker serves TLS (a client that fails
/// it, or takes longer than 10 s, is dropped before rumqttd sees a byte).
async fn serve(client: TcpStream, peer: SocketAddr, how: Relay, open: Arc<AtomicUsize>) {
    let _ = client.set_nodelay(true);
    let Some(acceptor) = how.acceptor.clone() else {
        return pipe(client, peer, &how, &open).await;
    };
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(client)).await {
        Ok(Ok(tls)) => pipe(tls, peer, &how, &open).await,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "mqtt client dropped: TLS handshake failed")
        }
        Err(_) => tracing::debug!(%peer, "mqtt client dropped: no TLS handshake within 10 s"),
    }
}

/// Counts one open connection for as long as it lives (the count drops when it is dropped,
/// aborted relays included).
struct Open<'a>(&'a AtomicUsize);

impl<'a> Open<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Open(count)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn pipe<C: AsyncRead + AsyncWrite + Unpin>(
    mut client: C,
    peer: SocketAddr,
    how: &Relay,
    open: &AtomicUsize,
) {
    let _open = Open::new(open);
    let connect_internal = || async {
        let broker = TcpStream::connect(how.internal).await;
        if let Err(e) = &broker {
            tracing::warn!(error = %e, "embedded broker unreachable");
        }
        broker.ok().inspect(|b| {
            let _ = b.set_nodelay(true);
        })
    };
    let Some((check, secret)) = &how.auth else {
        let Some(mut broker) = connect_internal().await else { return };
        let _ = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut broker,
            256 << 10,
            256 << 10,
        )
        .await;
        return;
    };
    let (client_read, mut client_write) = tokio::io::split(client);
    let mut reader = tokio::io::BufReader::with_capacity(256 << 10, client_read);
    let (connect, rules) =
        match tokio::time::timeout(CONNECT_TIMEOUT, acl::read_connect(&mut reader)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::warn!(%peer, reason = %e, "mqtt client refused: its CONNECT");
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    let _ = client_write.write_all(&CONNACK_NOT_AUTHORIZED).await;
                    let _ = client_write.shutdown().await;
                }
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "mqtt client dropped: no CONNECT within 10 s");
                return;
            }
        };
    let bounded = connect.username.len() <= MAX_CREDENTIAL_BYTES
        && connect.password.len() <= MAX_CREDENTIAL_BYTES;
    if !bounded || !(check.0)(connect.username.clone(), connect.password.clone()).await {
        tracing::warn!(%peer, username = %connect.username.chars().take(200).collect::<String>(), "mqtt client refused: bad credentials");
        let _ = client_write.write_all(&CONNACK_NOT_AUTHORIZED).await;
        let _ = client_write.shutdown().await;
        return;
    }
    let Some(broker) = connect_internal().await else { return };
    // What the client sends is read packet by packet against its login's ACL; what the broker
    // sends back passes through. Either side ending ends both.
    let (mut broker_read, mut broker_write) = broker.into_split();
    if broker_write.write_all(&connect.with_password(secret)).await.is_err() {
        return;
    }
    let upstream = acl::forward(&mut reader, broker_write, &rules);
    let downstream = async {
        let mut reader = tokio::io::BufReader::with_capacity(256 << 10, &mut broker_read);
        tokio::io::copy_buf(&mut reader, &mut client_write).await
    };
    tokio::select! {
        res = upstream => {
            if let Err(e) = res
                && e.kind() == std::io::ErrorKind::PermissionDenied
            {
                tracing::warn!(%peer, reason = %e, "mqtt client disconnected: refused by the topic ACL");
            }
        }
        _ = downstream => {}
    }
}
