//! The client's error type: API errors (with the server's `ApiError`), connection failures,
//! undecodable responses, and notifier stream failures.

use fledge_types::{ApiError, ErrorCode};

/// Result of a client call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong talking to the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error body (`{code, message, details[]}`).
    ///
    /// The display is the server's message followed by each detail as `path: message`.
    #[error("{method} {path} failed ({status}): {api}")]
    Api {
        /// HTTP method of the request.
        method: String,
        /// Request path (without the endpoint).
        path: String,
        /// HTTP status code.
        status: u16,
        /// The decoded error body.
        api: ApiError,
    },
    /// The server answered with an error status but not with an `ApiError` body.
    #[error("{method} {path} failed with HTTP {status}: {body}")]
    Http {
        /// HTTP method of the request.
        method: String,
        /// Request path.
        path: String,
        /// HTTP status code.
        status: u16,
        /// The start of the body, for diagnosis.
        body: String,
    },
    /// The control plane could not be reached (refused, timed out, DNS, ...).
    #[error("cannot reach the control plane at {endpoint}")]
    Connect {
        /// The endpoint that failed.
        endpoint: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The control plane's certificate was refused (not signed by the trusted CA, wrong name,
    /// expired), or the server does not speak TLS.
    #[error(
        "TLS with {endpoint} failed: {reason} (is the CA right? `fledgectl login --server URL \
         --ca-fingerprint sha256:...` fetches and checks it)"
    )]
    TlsHandshake {
        /// The endpoint.
        endpoint: String,
        /// rustls's reason.
        reason: String,
    },
    /// The CA to trust is unusable, or is not the one expected (fingerprint mismatch).
    #[error("cannot trust the CA of {endpoint}")]
    Tls {
        /// The endpoint it is for.
        endpoint: String,
        /// Why.
        #[source]
        source: fledge_tls::Error,
    },
    /// The response body was not what the API contract says.
    #[error("cannot decode the response of {method} {path}")]
    Decode {
        /// HTTP method of the request.
        method: String,
        /// Request path.
        path: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The endpoint is not a valid base URL.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    InvalidEndpoint {
        /// What was given.
        endpoint: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A secret (token or key) cannot be sent as a header (e.g. it contains a newline).
    #[error("the {what} contains characters not allowed in a header")]
    InvalidSecret {
        /// Which secret: `token`, `task key`, `compute key`.
        what: &'static str,
    },
    /// The notifier refused the subscription for good (bad key, unknown task, ...).
    #[error("notifier {endpoint} refused the subscription: {message}")]
    Notifier {
        /// Notifier URL.
        endpoint: String,
        /// gRPC status code name.
        code: String,
        /// The notifier's message.
        message: String,
    },
    /// Any other transport failure (reading a body, building a request).
    #[error("request to {endpoint} failed")]
    Transport {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
}

impl Error {
    /// The decoded API error, when the server sent one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            Error::Api { api, .. } => Some(api),
            _ => None,
        }
    }

    /// The API error code, when the server sent one.
    pub fn code(&self) -> Option<ErrorCode> {
        self.api_error().map(|api| api.code)
    }

    /// The HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } | Error::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the server said the resource does not exist.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(404)
    }
}
