//! The HTTP plumbing shared by every REST client: base URL, bearer secret, and turning
//! responses into typed values or [`Error`]s.

use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, RequestBuilder, Response, header};
use serde::Serialize;
use serde::de::DeserializeOwned;

use fledge_tls::Ca;
use fledge_types::ApiError;

use crate::error::{Error, Result};

/// How long to wait for a TCP connection before calling the control plane unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a non-JSON error body to keep in [`Error::Http`].
const BODY_SNIPPET: usize = 512;

/// A base URL, a bearer secret and a connection pool.
#[derive(Clone, Debug)]
pub(crate) struct Transport {
    http: reqwest::Client,
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:10100`.
    endpoint: String,
    /// `Bearer <secret>`, absent when no secret is configured.
    authorization: Option<header::HeaderValue>,
}

/// An HTTP client for `endpoint`: an `https://` endpoint's certificate is checked against
/// `ca` and nothing else, or against the system's roots when no CA is given.
pub(crate) fn http_client(endpoint: &str, ca: Option<&Ca>) -> Result<reqwest::Client> {
    fledge_tls::install_default_provider();
    let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT);
    if let Some(ca) = ca {
        let config = ca
            .client_config()
            .map_err(|source| Error::Tls { endpoint: endpoint.to_owned(), source })?;
        builder = builder.tls_backend_preconfigured(config);
    }
    builder.build().map_err(|source| Error::Transport { endpoint: endpoint.to_owned(), source })
}

impl Transport {
    /// Trusts `ca` (see [`http_client`]) from now on.
    pub(crate) fn with_ca(mut self, ca: Option<&Ca>) -> Result<Self> {
        self.http = http_client(&self.endpoint, ca)?;
        Ok(self)
    }

    pub(crate) fn new(endpoint: &str, secret: Option<&str>, what: &'static str) -> Result<Self> {
        let endpoint = normalize_endpoint(endpoint)?;
        let authorization = match secret.filter(|s| !s.is_empty()) {
            Some(secret) => {
                let mut value = header::HeaderValue::from_str(&format!("Bearer {secret}"))
                    .map_err(|_| Error::InvalidSecret { what })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let http = http_client(&endpoint, None)?;
        Ok(Self { http, endpoint, authorization })
    }

    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A request to `path` (which starts with `/`), authorised when a secret is set.
    pub(crate) fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let builder = self.http.request(method, format!("{}{}", self.endpoint, path));
        match &self.authorization {
            Some(value) => builder.header(header::AUTHORIZATION, value.clone()),
            None => builder,
        }
    }

    /// Sends the request and returns the response if its status is a success.
    pub(crate) async fn send(
        &self,
        method: &Method,
        path: &str,
        builder: RequestBuilder,
    ) -> Result<Response> {
        tracing::debug!(%method, path, "request");
        let response = builder.send().await.map_err(|source| {
            if let Some(reason) = tls_failure(&source) {
                Error::TlsHandshake { endpoint: self.endpoint.clone(), reason }
            } else if source.is_connect() || source.is_timeout() {
                Error::Connect { endpoint: self.endpoint.clone(), source }
            } else {
                Error::Transport { endpoint: self.endpoint.clone(), source }
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        Err(error_from_body(method, path, status.as_u16(), &body))
    }

    /// Sends a request without a body and decodes a JSON answer.
    pub(crate) async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let method = Method::GET;
        let response = self.send(&method, path, self.request(method.clone(), path)).await?;
        self.decode(&method, path, response).await
    }

    /// Sends a JSON body and decodes a JSON answer.
    pub(crate) async fn json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T> {
        let response =
            self.send(&method, path, self.request(method.clone(), path).json(body)).await?;
        self.decode(&method, path, response).await
    }

    /// Sends a JSON body (or none) and expects no answer body worth reading (e.g. 204).
    pub(crate) async fn json_no_content<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<()> {
        let mut builder = self.request(method.clone(), path);
        if let Some(body) = body {
            builder = builder.json(body);
        }
        self.send(&method, path, builder).await?;
        Ok(())
    }

    /// Reads the whole body of a successful response as bytes.
    pub(crate) async fn bytes(&self, response: Response) -> Result<Bytes> {
        response
            .bytes()
            .await
            .map_err(|source| Error::Transport { endpoint: self.endpoint.clone(), source })
    }

    /// Decodes a successful response's JSON body.
    pub(crate) async fn decode<T: DeserializeOwned>(
        &self,
        method: &Method,
        path: &str,
        response: Response,
    ) -> Result<T> {
        let body = self.bytes(response).await?;
        serde_json::from_slice(&body).map_err(|source| Error::Decode {
            method: method.to_string(),
            path: path.to_owned(),
            source,
        })
    }
}

/// The rustls reason when `err` is a failed TLS handshake (unknown issuer, bad name, ...).
fn tls_failure(err: &reqwest::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        // `io::Error::source` skips the error it wraps, and hyper wraps the handshake's
        // io::Error in another one: look inside every layer.
        let mut inner = cause.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        while let Some(wrapped) = inner {
            if let Some(tls) = wrapped.downcast_ref::<rustls::Error>() {
                return Some(tls.to_string());
            }
            inner = wrapped.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        }
        // Connectors may carry the handshake failure as text only.
        let text = cause.to_string();
        if text.starts_with("invalid peer certificate") || text.contains("received fatal alert") {
            return Some(text);
        }
        source = cause.source();
    }
    None
}

/// Turns an error response into [`Error::Api`] when its body is an `ApiError`, else [`Error::Http`].
fn error_from_body(method: &Method, path: &str, status: u16, body: &[u8]) -> Error {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(api) => Error::Api { method: method.to_string(), path: path.to_owned(), status, api },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let mut snippet: String = text.chars().take(BODY_SNIPPET).collect();
            if snippet.trim().is_empty() {
                snippet = "(empty body)".to_owned();
            }
            Error::Http { method: method.to_string(), path: path.to_owned(), status, body: snippet }
        }
    }
}

/// Checks that `endpoint` is an `http(s)://host[:port][/prefix]` URL and strips trailing slashes.
pub(crate) fn normalize_endpoint(endpoint: &str) -> Result<String> {
    let trimmed = endpoint.trim().trim_end_matches('/');
    let invalid = |reason: &str| Error::InvalidEndpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
        .ok_or_else(|| invalid("it must start with http:// or https://"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(invalid("it names no host"));
    }
    let url = reqwest::Url::parse(trimmed).map_err(|e| invalid(&e.to_string()))?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("it must not have a query or fragment"));
    }
    Ok(trimmed.to_owned())
}

/// Percent-encodes one path segment (ids are user-chosen and may hold any character).
pub(crate) fn seg(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_checked_and_normalized() {
        assert_eq!(
            normalize_endpoint("http://127.0.0.1:10100/").unwrap(),
            "http://127.0.0.1:10100"
        );
        assert_eq!(
            normalize_endpoint(" https://fledge.example/api-gw ").unwrap(),
            "https://fledge.example/api-gw"
        );
        let err = normalize_endpoint("127.0.0.1:10100").unwrap_err();
        assert!(err.to_string().contains("http://"), "{err}");
        assert!(normalize_endpoint("http://").is_err());
        assert!(normalize_endpoint("http://host?x=1").is_err());
    }

    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(seg("mnist-v1.2_x~"), "mnist-v1.2_x~");
        assert_eq!(seg("a/b c"), "a%2Fb%20c");
        assert_eq!(seg("é"), "%C3%A9");
    }

    #[test]
    fn error_bodies_decode_to_api_errors_or_keep_a_snippet() {
        let body = br#"{"code":"BAD_REQUEST","message":"invalid schema","details":[{"path":"roles[0].name","message":"empty"}]}"#;
        let err = error_from_body(&Method::POST, "/x", 400, body);
        let api = err.api_error().expect("api error");
        assert_eq!(api.details[0].path, "roles[0].name");
        assert_eq!(
            err.to_string(),
            "POST /x failed (400): invalid schema\n  - roles[0].name: empty"
        );
        let err = error_from_body(&Method::GET, "/y", 502, b"bad gateway");
        assert_eq!(err.to_string(), "GET /y failed with HTTP 502: bad gateway");
        assert!(err.api_error().is_none());
        assert_eq!(err.status(), Some(502));
    }
}
