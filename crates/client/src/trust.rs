//! Trusting a control plane's CA without copying certificates by hand.
//!
//! [`fetch_ca`] downloads the CA from the unauthenticated `GET /api/v1/ca.pem` over a
//! connection whose certificate is *not* checked yet, and accepts it only if its SHA-256 is the
//! fingerprint the operator printed (`fledge standalone` / `fledge serve` print a
//! `fledgectl login ... --ca-fingerprint sha256:...` line): the fingerprint, handed over out of
//! band, is what authenticates the CA, as in `kubeadm join`. No secret is sent on that first
//! connection. It then checks that the server's own certificate chains to that CA.

use std::path::Path;

use fledge_tls::{Ca, Fingerprint};

/// What `fledge-tls` reports (a bad fingerprint, PEM or CA).
pub use fledge_tls::Error as TlsError;

use crate::error::{Error, Result};
use crate::http::normalize_endpoint;

/// Largest CA file accepted from a server.
const MAX_CA_BYTES: usize = 256 * 1024;

/// Fetches the CA of the apiserver at `endpoint` and returns it if its fingerprint is
/// `fingerprint` and the server's certificate is signed by it.
pub async fn fetch_ca(endpoint: &str, fingerprint: &Fingerprint) -> Result<Ca> {
    let endpoint = normalize_endpoint(endpoint)?;
    if !endpoint.starts_with("https://") {
        return Err(Error::InvalidEndpoint {
            endpoint,
            reason: "a CA fingerprint needs an https:// endpoint".to_owned(),
        });
    }
    fledge_tls::install_default_provider();
    // Unverified on purpose: the fingerprint check below is what authenticates the answer.
    let http = reqwest::Client::builder()
        .tls_danger_accept_invalid_certs(true)
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|source| Error::Transport { endpoint: endpoint.clone(), source })?;
    let path = "/api/v1/ca.pem";
    let response = http
        .get(format!("{endpoint}{path}"))
        .send()
        .await
        .map_err(|source| Error::Connect { endpoint: endpoint.clone(), source })?;
    let status = response.status();
    if !status.is_success() {
        return Err(Error::Http {
            method: "GET".to_owned(),
            path: path.to_owned(),
            status: status.as_u16(),
            body: "the server publishes no CA".to_owned(),
        });
    }
    if response.content_length().is_some_and(|len| len > MAX_CA_BYTES as u64) {
        return Err(too_big(&endpoint));
    }
    let body = response
        .bytes()
        .await
        .map_err(|source| Error::Transport { endpoint: endpoint.clone(), source })?;
    if body.len() > MAX_CA_BYTES {
        return Err(too_big(&endpoint));
    }
    let text = String::from_utf8_lossy(&body);
    let tls = |source| Error::Tls { endpoint: endpoint.clone(), source };
    let ca = Ca::from_pem(&text, &format!("the CA served at {endpoint}{path}")).map_err(tls)?;
    ca.verify_fingerprint(fingerprint).map_err(tls)?;
    // The CA is authentic; now the server must prove it holds a certificate it signed.
    crate::Client::new(&endpoint, None)?.with_ca(Some(&ca))?.health().await?;
    Ok(ca)
}

fn too_big(endpoint: &str) -> Error {
    Error::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason: format!("its CA is larger than {MAX_CA_BYTES} bytes"),
    }
}

/// Reads a CA file (PEM) for `endpoint`.
pub fn load_ca(endpoint: &str, path: &Path) -> Result<Ca> {
    Ca::load(path).map_err(|source| Error::Tls { endpoint: endpoint.to_owned(), source })
}
