//! The `p2p` backend: gRPC streams between ends, found through the metaserver.
//!
//! Every end runs a small gRPC server (`fledge.v1.P2p`, see `crates/proto/proto/fledge/v1/p2p.proto`)
//! on an ephemeral port and registers `https://host:port` with the metaserver under its job,
//! channel and group, together with its role and announced properties. Every `heartbeat` it
//! renews that registration (a lease of `liveness_timeout`) and asks the metaserver for the live
//! ends of its peer role, which become [`crate::Channel::ends`]. A crashed or hung end stops
//! renewing, its lease runs out, and its peers drop it at their next poll; a clean leave
//! deregisters at once.
//!
//! The server speaks TLS (unless [`P2pConfig::tls`] is off, the operator's opt-out): at open,
//! the end makes a one-off CA and a certificate for [`P2P_SERVER_NAME`] signed by it (in memory;
//! the CA's key is dropped at once) and registers that CA with its endpoint. A sender trusts,
//! for each receiver, exactly the CA the receiver registered, and learns it only from the
//! metaserver, which takes a registration only from the end's own task: streams are private,
//! and reach the end the metaserver vouches for. A TLS end never falls back to plain text
//! towards a peer that registered a plain endpoint.
//!
//! To send, an end keeps one client stream per receiver (opened on first use): a `Hello` frame
//! naming job, channel, group, sender and receiver, then chunks of encoded messages in the
//! `chunk` layout. The receiver accepts a stream only when the hello is for itself and
//! comes from a registered end of its peer role on the same job, channel and group, so a channel
//! still only ever sees its own peers. Chunks are reassembled with bounded memory, decoded (never
//! panicking on untrusted bytes) and queued; a full inbound queue stops reading the stream, and
//! HTTP/2 flow control carries that back-pressure to the sender. Order is kept per sender.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};

use fledge_proto::v1::{
    DeliverResponse, EndKey, Frame, Hello, PeersRequest, RegisterRequest, frame::Body,
};
use fledge_proto::{MetaserverClient, P2pClient, P2pServer};
use fledge_types::TaskId;

use crate::chunk::{self, Reassembler};
use crate::secure;
use crate::shared::{EndProps, Error, Result, Shared};
use crate::wire::{self, Message};

/// Default chunk size: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
/// Largest chunk size a receiver accepts, so that ends with different settings interoperate.
pub const MAX_CHUNK_SIZE: usize = 16 << 20;
/// Room for the frame and chunk headers on top of a chunk.
const FRAME_SLACK: usize = 64 << 10;
/// Frames buffered per outbound stream before `send` waits.
const LINK_DEPTH: usize = 8;
/// HTTP/2 windows: large enough that loopback and LAN transfers are not window-bound.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
/// Encode and decode off the runtime threads above this many bytes.
const BLOCKING_THRESHOLD: usize = 1 << 20;
/// The name in every end's one-off server certificate, which senders check (each end's CA
/// differs, so the name need not).
pub const P2P_SERVER_NAME: &str = "end.p2p.fledge";

/// Where the metaserver is, where this end listens, and how to pace liveness.
#[derive(Clone, Debug)]
pub struct P2pConfig {
    /// The metaserver's URL, `http://host:port` (see [`P2pConfig::parse_metaserver`]).
    pub metaserver: String,
    /// IP address this end's server binds to. Default `127.0.0.1`; use `0.0.0.0` with
    /// `advertise_host` when peers run on other machines.
    pub listen_host: std::net::IpAddr,
    /// Host name or IP peers use to reach this end; `listen_host` when absent.
    pub advertise_host: Option<String>,
    /// Largest chunk payload in bytes, at most [`MAX_CHUNK_SIZE`]. Default 1 MiB.
    pub chunk_size: usize,
    /// How often the registration is renewed and peers are polled. Default 1 s.
    pub heartbeat: Duration,
    /// The registration lease: an end that does not renew for this long leaves its peers'
    /// `ends()`. Default 10 s.
    pub liveness_timeout: Duration,
    /// How long connecting to the metaserver or a peer may take. Default 10 s.
    pub connect_timeout: Duration,
    /// The CA (PEM) an `https://` metaserver's certificate is checked against (the task
    /// config's `controlPlaneCa`); only that CA is trusted.
    pub metaserver_ca: Option<String>,
    /// Whether this end's server speaks TLS and its sends require it. Default on; off only
    /// when the operator opted out of TLS (the platform's `--insecure`).
    pub tls: bool,
    /// This end's task key (`FLEDGE_TASK_KEY`), presented to the metaserver with the end's task
    /// id on every request; an authenticating metaserver refuses requests without it.
    pub task_key: Option<TaskKey>,
}

/// A task key. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct TaskKey(pub String);

impl std::fmt::Debug for TaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TaskKey(<redacted>)")
    }
}

impl Default for P2pConfig {
    fn default() -> Self {
        P2pConfig::new("")
    }
}

impl P2pConfig {
    /// Defaults for the metaserver at `metaserver` (a URL, as [`P2pConfig::parse_metaserver`]
    /// returns it).
    pub fn new(metaserver: impl Into<String>) -> P2pConfig {
        P2pConfig {
            metaserver: metaserver.into(),
            listen_host: std::net::IpAddr::from([127, 0, 0, 1]),
            advertise_host: None,
            chunk_size: DEFAULT_CHUNK_SIZE,
            heartbeat: Duration::from_secs(1),
            liveness_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            metaserver_ca: None,
            task_key: None,
            tls: true,
        }
    }

    /// Normalises a metaserver address: `http://host:port`, `grpc://host:port` or `host:port`
    /// become `http://host:port`; `https://host:port` stays TLS.
    pub fn parse_metaserver(addr: &str) -> Result<String> {
        let bad = |why: &str| Error::InvalidOptions(format!("metaserver address {addr:?}: {why}"));
        let (scheme, rest) = match addr.trim().split_once("://") {
            Some(("https", rest)) => ("https", rest),
            Some(("http" | "grpc", rest)) => ("http", rest),
            Some((scheme, _)) => {
                return Err(bad(&format!("unsupported scheme {scheme:?} (use http://)")));
            }
            None => ("http", addr.trim()),
        };
        let rest = rest.trim_end_matches('/');
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(bad("no port (expected host:port)"));
        };
        if host.is_empty() || host.contains('/') {
            return Err(bad("no host"));
        }
        port.parse::<u16>().map_err(|_| bad(&format!("bad port {port:?}")))?;
        Ok(format!("{scheme}://{rest}"))
    }

    /// Sets where this end listens and what it advertises from the process environment:
    /// `FLEDGE_P2P_LISTEN_HOST` (an IP address, e.g. `0.0.0.0` in a container) and
    /// `FLEDGE_P2P_ADVERTISE_HOST` (the host name or IP peers dial, e.g. the container's name
    /// on its network). A fledgelet passes both to its worker from its deployer's settings.
    pub fn apply_host_env(&mut self, lookup: impl Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(listen) = lookup(LISTEN_HOST_ENV).filter(|v| !v.trim().is_empty()) {
            self.listen_host = listen.trim().parse().map_err(|_| {
                Error::InvalidOptions(format!(
                    "{LISTEN_HOST_ENV} {listen:?} is not an IP address (e.g. 0.0.0.0 or 127.0.0.1)"
                ))
            })?;
        }
        if let Some(host) = lookup(ADVERTISE_HOST_ENV).filter(|v| !v.trim().is_empty()) {
            self.advertise_host =
                Some(fledge_types::validate::dialable_host(host.trim()).map_err(|why| {
                    Error::InvalidOptions(format!("{ADVERTISE_HOST_ENV} {host:?}: {why}"))
                })?);
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.metaserver.is_empty() {
            problems.push("metaserver is empty".to_owned());
        }
        if self.listen_host.is_unspecified() && self.advertise_host.is_none() {
            problems.push(format!(
                "listen_host {} is unspecified: set advertise_host ({ADVERTISE_HOST_ENV}) to the \
                 name or address peers reach this end at",
                self.listen_host
            ));
        }
        if let Some(host) = &self.advertise_host
            && let Err(why) = fledge_types::validate::dialable_host(host)
        {
            problems.push(format!("advertise_host {host:?}: {why}"));
        }
        if !(1024..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            problems
                .push(format!("chunk_size {} is outside 1024..={MAX_CHUNK_SIZE}", self.chunk_size));
        }
        if self.heartbeat.is_zero() {
            problems.push("heartbeat is 0".to_owned());
        }
        if let Some(key) = &self.task_key
            && (key.0.is_empty()
                || key.0.len() > 1024
                || !key.0.bytes().all(|b| b.is_ascii_graphic()))
        {
            problems.push("task_key is not 1 to 1024 printable ASCII characters".to_owned());
        }
        if self.liveness_timeout <= self.heartbeat {
            problems.push(format!(
                "liveness_timeout {:?} must exceed heartbeat {:?}",
                self.liveness_timeout, self.heartbeat
            ));
        }
        if u32::try_from(self.liveness_timeout.as_millis()).is_err() {
            problems.push(format!("liveness_timeout {:?} is too long", self.liveness_timeout));
        }
        if problems.is_empty() { Ok(()) } else { Err(Error::InvalidOptions(problems.join("; "))) }
    }
}

/// The variable naming the IP address a worker's p2p ends bind to.
pub const LISTEN_HOST_ENV: &str = "FLEDGE_P2P_LISTEN_HOST";
/// The variable naming the host a worker's p2p ends advertise to their peers.
pub const ADVERTISE_HOST_ENV: &str = "FLEDGE_P2P_ADVERTISE_HOST";

fn p2p_error(what: impl Into<String>, reason: impl std::fmt::Display) -> Error {
    Error::P2p { what: what.into(), reason: reason.to_string() }
}

fn status_reason(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

type Meta = MetaserverClient<tonic::transport::Channel>;

/// Where a peer listens, as its registration says.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PeerAddr {
    endpoint: String,
    /// The CA of its `https://` endpoint (empty for a plain one).
    tls_ca: String,
}

/// State the server, the ticker and the handle share.
struct Ctx {
    shared: Arc<Shared>,
    config: P2pConfig,
    /// This end's advertised URL.
    endpoint: String,
    /// The PEM certificate of the CA that signed this end's server certificate (empty without
    /// TLS).
    tls_ca: String,
    meta: Meta,
    joined: AtomicBool,
    hung: CancellationToken,
    /// Live peers and where they listen.
    peers: Mutex<HashMap<TaskId, PeerAddr>>,
    /// When the metaserver last answered a poll.
    last_poll: Mutex<Instant>,
}

impl Ctx {
    fn end_key(&self) -> EndKey {
        let o = &self.shared.opts;
        EndKey {
            job_id: o.job.as_str().to_owned(),
            channel: o.channel.clone(),
            group: o.group.clone(),
            end_id: o.me.as_str().to_owned(),
        }
    }

    /// `body` with this end's credentials as metadata, when it has a task key.
    fn authorized<T>(&self, body: T) -> Request<T> {
        let mut request = Request::new(body);
        if let Some(key) = &self.config.task_key {
            // Both were checked to be valid metadata when the end opened.
            if let (Ok(bearer), Ok(me)) =
                (format!("Bearer {}", key.0).parse(), self.shared.opts.me.as_str().parse())
            {
                request.metadata_mut().insert("authorization", bearer);
                request.metadata_mut().insert(fledge_proto::TASK_ID_METADATA, me);
            }
        }
        request
    }

    async fn register(&self) -> Result<()> {
        let o = &self.shared.opts;
        let request = RegisterRequest {
            end: Some(self.end_key()),
            role: o.role.clone(),
            endpoint: self.endpoint.clone(),
            props_json: serde_json::Value::Object(o.props.clone()).to_string(),
            lease_ms: u32::try_from(self.config.liveness_timeout.as_millis()).unwrap_or(u32::MAX),
            tls_ca: self.tls_ca.clone(),
        };
        self.meta.clone().register(self.authorized(request)).await.map_err(|s| {
            p2p_error(
                format!("register with metaserver {}", self.config.metaserver),
                status_reason(&s),
            )
        })?;
        Ok(())
    }

    async fn deregister(&self) -> Result<()> {
        self.meta.clone().deregister(self.authorized(self.end_key())).await.map_err(|s| {
            p2p_error(
                format!("deregister from metaserver {}", self.config.metaserver),
                status_reason(&s),
            )
        })?;
        Ok(())
    }

    fn endpoint_of(&self, end: &TaskId) -> Option<PeerAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).get(end).cloned()
    }

    /// Asks the metaserver who is there and updates the peer view.
    async fn poll_peers(&self) -> Result<()> {
        let o = &self.shared.opts;
        let request = PeersRequest {
            job_id: o.job.as_str().to_owned(),
            channel: o.channel.clone(),
            group: o.group.clone(),
            role: o.peer_role.clone(),
        };
        let listed = match self.meta.clone().peers(self.authorized(request)).await {
            Ok(res) => res.into_inner().peers,
            Err(status) => {
                // Without answers for a whole lease we cannot vouch for anyone.
                let silent = Instant::now().duration_since(*self.last_poll());
                if silent > self.config.liveness_timeout {
                    self.forget_all();
                }
                return Err(p2p_error(
                    format!("poll metaserver {}", self.config.metaserver),
                    status_reason(&status),
                ));
            }
        };
        *self.last_poll.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        let mut seen = HashMap::new();
        let mut up = Vec::new();
        for peer in listed {
            let end = TaskId::new(peer.end_id);
            if end == o.me || peer.role != o.peer_role {
                continue;
            }
            let props = match serde_json::from_str(&peer.props_json) {
                Ok(props) => props,
                Err(e) => {
                    tracing::warn!(%end, error = %e, "peer announced malformed properties, ignored");
                    continue;
                }
            };
            // Every run of an end listens on a port of its own: a new endpoint is a restart.
            let instance = peer.endpoint.clone();
            seen.insert(end.clone(), PeerAddr { endpoint: peer.endpoint, tls_ca: peer.tls_ca });
            up.push(EndProps { role: peer.role, task_id: end, props, instance });
        }
        // Endpoints first: once an end shows in `ends()`, `send` must know where it listens.
        let gone: Vec<TaskId> = {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            let gone = peers.keys().filter(|e| !seen.contains_key(*e)).cloned().collect();
            *peers = seen;
            gone
        };
        for props in up {
            self.shared.peer_up(props);
        }
        for end in gone {
            self.shared.peer_down(&end);
        }
        Ok(())
    }

    fn last_poll(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.last_poll.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget_all(&self) {
        let gone: Vec<TaskId> = {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            peers.drain().map(|(end, _)| end).collect()
        };
        for end in gone {
            self.shared.peer_down(&end);
        }
    }

    /// Checks that a stream's hello is for this end and from one of its peers (on a channel
    /// with keys: signed by the end it names, fresh, and never seen before).
    async fn accept(&self, hello: &Hello) -> Result<TaskId, Status> {
        let o = &self.shared.opts;
        if let Some(keys) = &o.security {
            let from = TaskId::new(hello.from.clone());
            let signed = secure::hello_signed_bytes(
                [&hello.job_id, &hello.channel, &hello.group, &hello.from, &hello.to],
                hello.timestamp_ms,
                &hello.nonce,
            );
            let nonce: Option<[u8; 16]> = hello.nonce.as_slice().try_into().ok();
            let proved = keys.verify(&from, &signed, &hello.signature);
            if !proved || nonce.is_none() {
                self.shared.metrics.forged();
                return Err(Status::unauthenticated(format!(
                    "the hello does not prove that it comes from end {from} of channel {}",
                    o.channel
                )));
            }
            if !self.shared.guard.accept_hello(hello.timestamp_ms, nonce.unwrap_or_default()) {
                self.shared.metrics.replayed();
                return Err(Status::unauthenticated(format!(
                    "the hello of end {from} is stale or replayed (clock skew above {:?}?)",
                    secure::HELLO_SKEW
                )));
            }
        }
        if hello.job_id != o.job.as_str()
            || hello.channel != o.channel
            || hello.group != o.group
            || hello.to != o.me.as_str()
        {
            return Err(Status::permission_denied(format!(
                "this is end {} of job {} channel {} group {}; the stream is for end {} of job {} channel {} group {}",
                o.me, o.job, o.channel, o.group, hello.to, hello.job_id, hello.channel, hello.group
            )));
        }
        let from = TaskId::new(hello.from.clone());
        if !self.shared.is_peer(&from) {
            // It may have registered after our last poll.
            if let Err(e) = self.poll_peers().await {
                tracing::debug!(error = %e, "peer poll on accept failed");
            }
        }
        if !self.shared.is_peer(&from) {
            return Err(Status::permission_denied(format!(
                "end {from} is not a registered {} of channel {} group {}",
                o.peer_role, o.channel, o.group
            )));
        }
        Ok(from)
    }

    /// Handles one chunk from `from`; returns whether it completed a message.
    async fn on_chunk(&self, from: &TaskId, reassembler: &mut Reassembler, data: Bytes) -> bool {
        let chunk = match chunk::parse(data) {
            Ok(c) if c.sender == from.as_str() => c,
            Ok(c) => {
                tracing::warn!(%from, claimed = %c.sender, "chunk sender does not match the stream, dropped");
                self.shared.metrics.dropped();
                return false;
            }
            Err(e) => {
                tracing::warn!(%from, error = %e, "malformed chunk dropped");
                self.shared.metrics.dropped();
                return false;
            }
        };
        self.shared.take_chunk(reassembler, chunk).await
    }
}

/// The gRPC service receiving this end's inbound streams.
struct Receiver {
    ctx: Arc<Ctx>,
}

#[tonic::async_trait]
impl fledge_proto::P2p for Receiver {
    async fn deliver(
        &self,
        request: Request<Streaming<Frame>>,
    ) -> std::result::Result<Response<DeliverResponse>, Status> {
        let mut stream = request.into_inner();
        let hello = match stream.message().await? {
            Some(Frame { body: Some(Body::Hello(hello)) }) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first frame of a stream must be a hello",
                ));
            }
        };
        let from = self.ctx.accept(&hello).await?;
        tracing::debug!(channel = %hello.channel, me = %hello.to, %from, "p2p stream accepted");
        let mut reassembler = Reassembler::with_opener(
            self.ctx.shared.opts.max_message_bytes,
            self.ctx.shared.opener.clone(),
        );
        let mut messages = 0;
        while let Some(frame) = stream.message().await? {
            let Some(Body::Chunk(data)) = frame.body else {
                return Err(Status::invalid_argument("only chunks may follow the hello"));
            };
            if self.ctx.on_chunk(&from, &mut reassembler, data).await {
                messages += 1;
            }
        }
        Ok(Response::new(DeliverResponse { messages }))
    }
}

/// One outbound stream to a peer.
struct Link {
    endpoint: String,
    tx: mpsc::Sender<Frame>,
    /// Held while one message's chunks are queued, so messages do not interleave.
    sending: tokio::sync::Mutex<()>,
}

/// One end's server, registration and outbound streams.
pub(crate) struct P2pEnd {
    ctx: Arc<Ctx>,
    links: tokio::sync::Mutex<HashMap<TaskId, Arc<Link>>>,
    drivers: Mutex<Vec<JoinHandle<()>>>,
    next_msg_id: AtomicU64,
    cancel: CancellationToken,
}

fn endpoint(url: &str, timeout: Duration) -> std::result::Result<Endpoint, String> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|e| e.to_string())?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW)))
}

impl P2pEnd {
    pub(crate) async fn open(shared: Arc<Shared>, config: P2pConfig) -> Result<P2pEnd> {
        config.validate()?;
        let what = || format!("connect to metaserver {}", config.metaserver);
        // Every metaserver request is bounded, so a stalled metaserver never stalls the ticker.
        let mut meta = endpoint(&config.metaserver, config.connect_timeout)
            .map_err(|e| p2p_error(what(), e))?
            .timeout(config.connect_timeout);
        if config.metaserver.starts_with("https://") {
            let ca = config.metaserver_ca.as_deref().ok_or_else(|| {
                p2p_error(
                    what(),
                    "an https metaserver needs the control plane's CA (controlPlaneCa)",
                )
            })?;
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca));
            meta = meta.tls_config(tls).map_err(|e| p2p_error(what(), e.to_string()))?;
        }
        let meta = connect(meta, config.connect_timeout).await.map_err(|e| p2p_error(what(), e))?;
        let listener = TcpListener::bind((config.listen_host, 0)).await.map_err(|source| {
            Error::Io { context: format!("bind a p2p listener on {}", config.listen_host), source }
        })?;
        let port = listener
            .local_addr()
            .map_err(|source| Error::Io {
                context: "read the p2p listener's address".to_owned(),
                source,
            })?
            .port();
        let host = config.advertise_host.clone().unwrap_or_else(|| match config.listen_host {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        });
        let mut server = Server::builder();
        let (scheme, tls_ca) = if config.tls {
            let (ca, identity) = fledge_tls::ephemeral(P2P_SERVER_NAME)
                .map_err(|e| p2p_error("make this end's TLS certificate", e))?;
            let tls = tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(identity.cert_pem(), identity.key_pem()),
            );
            server = server
                .tls_config(tls)
                .map_err(|e| p2p_error("serve TLS on the p2p listener", error_chain(&e)))?;
            ("https", ca.pem().to_owned())
        } else {
            ("http", String::new())
        };
        let ctx = Arc::new(Ctx {
            shared,
            endpoint: format!("{scheme}://{host}:{port}"),
            tls_ca,
            meta: MetaserverClient::new(meta),
            config,
            joined: AtomicBool::new(true),
            hung: CancellationToken::new(),
            peers: Mutex::new(HashMap::new()),
            last_poll: Mutex::new(Instant::now()),
        });
        let cancel = CancellationToken::new();
        let server = server
            .initial_stream_window_size(Some(STREAM_WINDOW))
            .initial_connection_window_size(Some(CONNECTION_WINDOW))
            .tcp_nodelay(true)
            .add_service(
                P2pServer::new(Receiver { ctx: ctx.clone() })
                    .max_decoding_message_size(MAX_CHUNK_SIZE + FRAME_SLACK),
            )
            .serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                cancel.clone().cancelled_owned(),
            );
        let channel = ctx.shared.opts.channel.clone();
        tokio::spawn(async move {
            if let Err(e) = server.await {
                tracing::warn!(%channel, error = %e, "p2p server stopped");
            }
        });
        let end = P2pEnd {
            ctx: ctx.clone(),
            links: tokio::sync::Mutex::new(HashMap::new()),
            drivers: Mutex::new(Vec::new()),
            next_msg_id: AtomicU64::new(rand::random::<u64>() >> 1),
            cancel: cancel.clone(),
        };
        // Dropping `end` on error cancels the server.
        ctx.register().await?;
        if let Err(e) = ctx.poll_peers().await {
            tracing::debug!(error = %e, "first peer poll failed; retrying on the next heartbeat");
        }
        tracing::info!(channel = %ctx.shared.opts.channel, me = %ctx.shared.opts.me, endpoint = %ctx.endpoint, "p2p end registered");
        tokio::spawn(run_ticker(ctx, cancel));
        Ok(end)
    }

    /// The stream to `end`, opened if needed.
    async fn link(&self, end: &TaskId) -> Result<Arc<Link>> {
        let shared = &self.ctx.shared;
        let peer = self.ctx.endpoint_of(end).ok_or_else(|| Error::UnknownEnd {
            end: end.clone(),
            channel: shared.opts.channel.clone(),
            group: shared.opts.group.clone(),
        })?;
        let endpoint_url = peer.endpoint;
        let mut links = self.links.lock().await;
        if let Some(link) = links.get(end)
            && link.endpoint == endpoint_url
            && !link.tx.is_closed()
        {
            return Ok(link.clone());
        }
        let what = || format!("connect to end {end} at {endpoint_url}");
        let timeout = self.ctx.config.connect_timeout;
        let mut channel = endpoint(&endpoint_url, timeout).map_err(|e| p2p_error(what(), e))?;
        if endpoint_url.starts_with("https://") {
            // Exactly the CA this end registered, for the one name every end's certificate has.
            fledge_tls::Ca::from_pem(&peer.tls_ca, "the CA the end registered")
                .map_err(|e| p2p_error(what(), e))?;
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(&peer.tls_ca))
                .domain_name(P2P_SERVER_NAME);
            channel = channel.tls_config(tls).map_err(|e| p2p_error(what(), e.to_string()))?;
        } else if self.ctx.config.tls {
            return Err(p2p_error(
                what(),
                "the end registered a plain-text endpoint and this end sends over TLS only \
                 (p2p tls; a platform started with --insecure turns it off for every end)",
            ));
        }
        let channel = connect(channel, timeout).await.map_err(|e| p2p_error(what(), e))?;
        let mut client =
            P2pClient::new(channel).max_encoding_message_size(MAX_CHUNK_SIZE + FRAME_SLACK);
        let (tx, rx) = mpsc::channel(LINK_DEPTH);
        let o = &shared.opts;
        let mut hello = Hello {
            job_id: o.job.as_str().to_owned(),
            channel: o.channel.clone(),
            group: o.group.clone(),
            from: o.me.as_str().to_owned(),
            to: end.as_str().to_owned(),
            timestamp_ms: 0,
            nonce: Vec::new(),
            signature: Vec::new(),
        };
        if let Some(keys) = &o.security {
            hello.timestamp_ms = secure::now_ms();
            hello.nonce = rand::random::<[u8; 16]>().to_vec();
            hello.signature = keys
                .sign(&secure::hello_signed_bytes(
                    [&hello.job_id, &hello.channel, &hello.group, &hello.from, &hello.to],
                    hello.timestamp_ms,
                    &hello.nonce,
                ))
                .to_vec();
        }
        tx.send(Frame { body: Some(Body::Hello(hello)) })
            .await
            .map_err(|_| p2p_error(what(), "stream closed before the hello"))?;
        let (to, channel_name) = (end.clone(), o.channel.clone());
        let driver = tokio::spawn(async move {
            match client.deliver(ReceiverStream::new(rx)).await {
                Ok(res) => {
                    tracing::debug!(%to, messages = res.into_inner().messages, "p2p stream done")
                }
                Err(status) => tracing::warn!(
                    channel = %channel_name, %to, code = ?status.code(), reason = status.message(),
                    "p2p stream refused or broken"
                ),
            }
        });
        {
            let mut drivers = self.drivers.lock().unwrap_or_else(|e| e.into_inner());
            drivers.retain(|d| !d.is_finished());
            drivers.push(driver);
        }
        let link =
            Arc::new(Link { endpoint: endpoint_url, tx, sending: tokio::sync::Mutex::new(()) });
        links.insert(end.clone(), link.clone());
        tracing::debug!(channel = %o.channel, me = %o.me, to = %end, "p2p stream opened");
        Ok(link)
    }

    /// Encodes `message` straight into chunks: the tensor data is copied once, into the
    /// chunks, with no whole encoded copy; a broadcast shares the same chunks for every peer.
    async fn encode_chunks(&self, to: String, message: Message) -> Result<(usize, Vec<Bytes>)> {
        let shared = &self.ctx.shared;
        let large = message.tensors.data_bytes() > BLOCKING_THRESHOLD;
        let msg_id = self.next_msg_id.fetch_add(1, Ordering::Relaxed);
        let (sealer, chunk_size, limit) =
            (shared.clone(), self.ctx.config.chunk_size, shared.opts.max_message_bytes);
        let encode = move || -> Result<(usize, Vec<Bytes>)> {
            let encoded = wire::encode_parts(&message)?;
            drop(message);
            let size = encoded.len();
            if size > limit {
                return Ok((size, Vec::new()));
            }
            let parts: Vec<Bytes> = encoded.parts().cloned().collect();
            drop(encoded);
            Ok((size, sealer.chunks(&to, msg_id, &parts, chunk_size)))
        };
        let (size, chunks) = if large {
            tokio::task::spawn_blocking(encode)
                .await
                .unwrap_or_else(|e| panic!("encode task panicked: {e}"))?
        } else {
            encode()?
        };
        if size > limit {
            return Err(Error::TooLarge { channel: shared.opts.channel.clone(), size, limit });
        }
        Ok((size, chunks))
    }

    async fn send_chunks(&self, end: &TaskId, size: usize, chunks: &[Bytes]) -> Result<()> {
        let link = self.link(end).await?;
        let _one_at_a_time = link.sending.lock().await;
        for data in chunks {
            link.tx.send(Frame { body: Some(Body::Chunk(data.clone())) }).await.map_err(|_| {
                p2p_error(
                    format!("send to end {end} at {}", link.endpoint),
                    "the stream closed (the end left, or refused this end)",
                )
            })?;
        }
        self.ctx.shared.metrics.sent(size);
        Ok(())
    }

    pub(crate) async fn send(&self, end: &TaskId, message: Message) -> Result<()> {
        let (size, chunks) = self.encode_chunks(end.as_str().to_owned(), message).await?;
        self.send_chunks(end, size, &chunks).await
    }

    /// Sends to every end in `ends`, encoding once. An end that left meanwhile is skipped, as on
    /// a broker; one that cannot be reached is logged and skipped, and its lapsing lease removes
    /// it from `ends()`.
    pub(crate) async fn broadcast(&self, ends: &[TaskId], message: Message) -> Result<()> {
        let to = secure::broadcast_to(&self.ctx.shared.opts.peer_role);
        let (size, chunks) = self.encode_chunks(to, message).await?;
        let sends = ends.iter().map(|end| {
            let chunks = &chunks;
            async move { (end, self.send_chunks(end, size, chunks).await) }
        });
        for (end, res) in futures::future::join_all(sends).await {
            match res {
                Ok(()) | Err(Error::UnknownEnd { .. }) => {}
                Err(e) => tracing::warn!(%end, error = %e, "broadcast did not reach a peer"),
            }
        }
        Ok(())
    }

    pub(crate) async fn announce(&self, present: bool) -> Result<()> {
        self.ctx.joined.store(present, Ordering::SeqCst);
        if present { self.ctx.register().await } else { self.ctx.deregister().await }
    }

    /// Clean leave: deregister, let the outbound streams drain, stop the server.
    pub(crate) async fn disconnect(&self) -> Result<()> {
        self.ctx.joined.store(false, Ordering::SeqCst);
        let res = self.ctx.deregister().await;
        self.links.lock().await.clear();
        let drivers = std::mem::take(&mut *self.drivers.lock().unwrap_or_else(|e| e.into_inner()));
        for driver in drivers {
            if tokio::time::timeout(Duration::from_secs(5), driver).await.is_err() {
                tracing::warn!("p2p stream did not drain within 5 s of close");
            }
        }
        self.cancel.cancel();
        res
    }

    #[cfg(feature = "test-hooks")]
    pub(crate) fn hang(&self) {
        self.ctx.hung.cancel();
    }
}

impl Drop for P2pEnd {
    fn drop(&mut self) {
        // No deregistration: peers notice through the lapsing lease, as with a crash.
        self.cancel.cancel();
    }
}

/// Connects eagerly, within `timeout` (TCP and HTTP/2 handshake together).
async fn connect(
    endpoint: Endpoint,
    timeout: Duration,
) -> std::result::Result<tonic::transport::Channel, String> {
    match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(error_chain(&e)),
        Err(_) => Err(format!("no connection within {timeout:?}")),
    }
}

/// `error` with its sources (tonic's transport errors say little at the top).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut res = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        res.push_str(": ");
        res.push_str(&cause.to_string());
        source = cause.source();
    }
    res
}

async fn run_ticker(ctx: Arc<Ctx>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(ctx.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = ctx.hung.cancelled() => break,
            _ = tick.tick() => {}
        }
        tracing::trace!(me = %ctx.shared.opts.me, "p2p heartbeat");
        if ctx.joined.load(Ordering::SeqCst)
            && let Err(e) = ctx.register().await
        {
            tracing::debug!(error = %e, "lease renewal failed");
        }
        if let Err(e) = ctx.poll_peers().await {
            tracing::debug!(error = %e, "peer poll failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_and_advertise_hosts_come_from_the_environment_checked() {
        let env = |listen: &'static str, advertise: &'static str| {
            move |name: &str| match name {
                LISTEN_HOST_ENV => Some(listen.to_owned()),
                ADVERTISE_HOST_ENV => Some(advertise.to_owned()),
                _ => None,
            }
        };
        let mut config = P2pConfig::new("http://meta:1");
        config.apply_host_env(env("0.0.0.0", "trainer-3.site-a")).expect("valid");
        assert_eq!(config.listen_host, std::net::IpAddr::from([0, 0, 0, 0]));
        assert_eq!(config.advertise_host.as_deref(), Some("trainer-3.site-a"));
        config.validate().expect("listening everywhere with an advertised name is valid");
        config.apply_host_env(env("", "fd00::7")).expect("valid");
        assert_eq!(config.advertise_host.as_deref(), Some("[fd00::7]"));

        for (listen, advertise, names) in [
            ("site-a", "", LISTEN_HOST_ENV),
            ("0.0.0.0", "a/b", ADVERTISE_HOST_ENV),
            ("0.0.0.0", "0.0.0.0", ADVERTISE_HOST_ENV),
            ("0.0.0.0", "-x.example", ADVERTISE_HOST_ENV),
        ] {
            let err = P2pConfig::new("http://meta:1")
                .apply_host_env(env(listen, advertise))
                .expect_err("refused");
            assert!(err.to_string().contains(names), "{err}");
        }
        // Listening on every address without saying where peers reach it is refused.
        let mut config = P2pConfig::new("http://meta:1");
        config.apply_host_env(env("0.0.0.0", "")).expect("each value is valid");
        let err = config.validate().expect_err("nothing to advertise");
        assert!(err.to_string().contains(ADVERTISE_HOST_ENV), "{err}");
    }

    #[test]
    fn metaserver_addresses_parse() {
        for (raw, url) in [
            ("127.0.0.1:10104", "http://127.0.0.1:10104"),
            ("http://meta.local:10104/", "http://meta.local:10104"),
            ("grpc://[::1]:7", "http://[::1]:7"),
            ("https://cp.example:10104", "https://cp.example:10104"),
        ] {
            assert_eq!(P2pConfig::parse_metaserver(raw).expect("valid"), url);
        }
        for bad in ["mqtt://h:1", "h", "h:port", ":1", "http://"] {
            let err = P2pConfig::parse_metaserver(bad).expect_err(bad);
            assert!(err.to_string().contains("metaserver address"), "{err}");
        }
    }

    #[test]
    fn bad_configs_name_every_problem() {
        let mut config = P2pConfig::new("");
        config.chunk_size = 10;
        config.liveness_timeout = config.heartbeat;
        let err = config.validate().expect_err("invalid").to_string();
        for part in ["metaserver is empty", "chunk_size 10", "liveness_timeout"] {
            assert!(err.contains(part), "{err}");
        }
        assert!(P2pConfig::new("http://127.0.0.1:1").validate().is_ok());
    }
}
