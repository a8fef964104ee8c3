//! TLS of the control-plane listeners: which identity they present and which CA clients are
//! told to trust, resolved once at startup from [`TlsSection`](crate::config::TlsSection).
//!
//! The certificates themselves (creation with rcgen, PEM loading, rustls configs, the CA
//! fingerprint) are `fledge-tls`; this module only decides where they come from (the
//! operator's files, or `<data_dir>/tls` made on first start) and puts TLS under axum
//! ([`TlsListener`]) and tonic ([`ControlTls::tonic`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use fledge_tls::{Ca, Fingerprint, ServerIdentity};

use crate::config::Options;

/// How long a client may take to finish its TLS handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the HTTP server to take them.
const ACCEPT_QUEUE: usize = 128;

/// The resolved TLS of this process's control-plane listeners.
#[derive(Clone, Debug)]
pub struct ControlTls {
    /// What the listeners present.
    pub identity: ServerIdentity,
    /// The CA clients should trust (generated, or the operator's `tls.ca`); `None` when the
    /// operator's certificate comes without one (clients then use their own trust).
    pub ca: Option<Ca>,
    /// Where that CA's PEM file is (to hand to local deployers and workers).
    pub ca_path: Option<PathBuf>,
}

impl ControlTls {
    /// Resolves `options.tls`: `None` under `tls.insecure`; the operator's files when given;
    /// else the CA and server certificate in `<data_dir>/tls`, created or re-issued for
    /// [`server_names`].
    pub fn resolve(options: &Options, bound: &[SocketAddr]) -> anyhow::Result<Option<Self>> {
        fledge_tls::install_default_provider();
        let tls = &options.tls;
        if tls.insecure {
            return Ok(None);
        }
        if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
            let identity = ServerIdentity::load(cert, key).with_context(|| {
                format!("tls.cert {} / tls.key {}", cert.display(), key.display())
            })?;
            let ca = tls
                .ca
                .as_ref()
                .map(|path| Ca::load(path).with_context(|| format!("tls.ca {}", path.display())))
                .transpose()?;
            return Ok(Some(Self { identity, ca, ca_path: tls.ca.clone() }));
        }
        let dir = options.tls_dir();
        let names = server_names(options, bound);
        let generated = fledge_tls::ensure_dir(&dir, &names).with_context(|| {
            format!("cannot create or load the control-plane CA in {}", dir.display())
        })?;
        if generated.created_ca {
            tracing::info!(
                dir = %dir.display(),
                fingerprint = %generated.ca.fingerprint(),
                "created the control-plane CA"
            );
        }
        Ok(Some(Self {
            identity: generated.identity,
            ca: Some(generated.ca),
            ca_path: Some(generated.ca_path),
        }))
    }

    /// The CA's fingerprint, when clients are given a CA.
    pub fn fingerprint(&self) -> Option<Fingerprint> {
        self.ca.as_ref().map(Ca::fingerprint)
    }

    /// The tonic server TLS config presenting this identity (HTTP/2 ALPN is tonic's).
    pub fn tonic(&self) -> tonic::transport::ServerTlsConfig {
        tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            self.identity.cert_pem(),
            self.identity.key_pem(),
        ))
    }

    /// The rustls server config of the embedded MQTT broker (`mqtts`, no ALPN: MQTT clients
    /// rarely offer one).
    pub fn mqtt_server_config(
        &self,
    ) -> anyhow::Result<std::sync::Arc<tokio_rustls::rustls::ServerConfig>> {
        self.identity.server_config(Vec::new()).context("cannot build the broker's TLS config")
    }

    /// A rustls acceptor for the apiserver (HTTP/1.1 only: axum runs without HTTP/2 here).
    pub fn acceptor(&self) -> anyhow::Result<TlsAcceptor> {
        let config = self
            .identity
            .server_config(vec![b"http/1.1".to_vec()])
            .context("cannot build the apiserver's TLS config")?;
        Ok(TlsAcceptor::from(config))
    }
}

/// The names the generated server certificate carries: `localhost`, the loopback addresses,
/// every bound address that is not a wildcard (and the embedded broker's), the hosts of the
/// advertised URLs (the broker's too: it presents this certificate) and `tls.names`.
pub fn server_names(options: &Options, bound: &[SocketAddr]) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    let broker = options.runs(crate::config::ServiceKind::Broker).then_some(options.broker.listen);
    for addr in bound.iter().chain(&broker) {
        if !addr.ip().is_unspecified() {
            names.push(addr.ip().to_string());
        }
    }
    let broker_advertise = broker.and(options.broker.advertise.clone());
    for url in [
        &options.apiserver.advertise,
        &options.notifier.advertise,
        &options.metaserver.advertise,
        &broker_advertise,
    ]
    .into_iter()
    .flatten()
    {
        if let Some(host) = url_host(url) {
            names.push(host);
        }
    }
    names.extend(options.tls.names.iter().cloned());
    names.sort();
    names.dedup();
    names
}

/// The host of `scheme://host[:port][/path]` (IPv6 without brackets), if any.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split_once(']')?.0
    } else {
        authority.split_once(':').map_or(authority, |(host, _)| host)
    };
    (!host.is_empty()).then(|| host.to_owned())
}

/// An axum listener that hands over only connections whose TLS handshake succeeded.
///
/// Handshakes run in their own tasks (bounded by a 10 s timeout), so a client that
/// stalls mid-handshake, or speaks plain HTTP, delays no one else; it is dropped and logged at
/// debug level.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    addr: SocketAddr,
}

impl TlsListener {
    /// Accepts on `listener` until `shutdown` fires.
    pub fn new(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = shutdown.cancelled() => break,
                    accepted = listener.accept() => accepted,
                };
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        // Out of file descriptors and the like: wait a little, as axum does.
                        tracing::warn!(%err, "apiserver accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            // The server is gone when the receiver is: nothing to do then.
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(err)) => tracing::debug!(%peer, %err, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { rx, addr })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(pair) => pair,
            // The accept loop ended (shutdown): no more connections; axum's graceful shutdown
            // is already under way, so wait for it.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts_are_found() {
        assert_eq!(url_host("https://cp.example:10100/x").as_deref(), Some("cp.example"));
        assert_eq!(url_host("https://[::1]:10101").as_deref(), Some("::1"));
        assert_eq!(url_host("http://10.0.0.5").as_deref(), Some("10.0.0.5"));
        assert_eq!(url_host("cp:1883").as_deref(), Some("cp"));
        assert_eq!(url_host("https://"), None);
    }

    #[test]
    fn names_cover_loopback_bound_and_advertised_hosts() {
        let mut options = Options::default();
        options.apiserver.advertise = Some("https://fledge.example:443".to_owned());
        options.tls.names = vec!["10.1.2.3".to_owned()];
        let names = server_names(
            &options,
            &["0.0.0.0:1".parse().expect("addr"), "192.168.1.9:2".parse().expect("addr")],
        );
        for want in ["localhost", "127.0.0.1", "::1", "192.168.1.9", "fledge.example", "10.1.2.3"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        assert!(!names.iter().any(|n| n == "0.0.0.0"), "{names:?}");

        // The embedded broker presents the same certificate: its address and advertised host
        // are in it while it runs here, and not otherwise (an operator's broker is not us).
        options.broker.listen = "172.17.0.1:1883".parse().expect("addr");
        options.broker.advertise = Some("mqtts://mqtt.example:8883".to_owned());
        let names = server_names(&options, &[]);
        for want in ["172.17.0.1", "mqtt.example"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
        options.services.retain(|s| *s != crate::config::ServiceKind::Broker);
        let names = server_names(&options, &[]);
        assert!(!names.iter().any(|n| n == "mqtt.example" || n == "172.17.0.1"), "{names:?}");
    }
}
