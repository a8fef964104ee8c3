//! The apiserver's error type and the one mapping from [`ErrorCode`] to HTTP status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fledge_types::{ApiError, ErrorCode, ErrorDetail};

use crate::store;

/// The HTTP status of an error code. This is the only place codes become statuses.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        ErrorCode::PermissionDenied => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::AlreadyExists | ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Every handler's error: becomes an [`ApiError`] JSON body with the status of its code.
#[derive(Debug)]
pub struct Error(pub ApiError);

/// Result of handlers.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with no details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(ApiError { code, message: message.into(), details: Vec::new() })
    }

    /// A validation failure listing every problem.
    pub fn invalid(message: impl Into<String>, details: Vec<ErrorDetail>) -> Self {
        Self(ApiError { code: ErrorCode::BadRequest, message: message.into(), details })
    }

    /// 400 with one message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// 401.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthenticated, message)
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PermissionDenied, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    /// The error's code.
    pub fn code(&self) -> ErrorCode {
        self.0.code
    }
}

impl From<store::Error> for Error {
    fn from(err: store::Error) -> Self {
        let code = err.code();
        if code == ErrorCode::Internal {
            // The cause chain may hold paths or SQL: log it, tell the client only the class.
            tracing::error!(error = format!("{:#}", anyhow::Error::new(err)), "store failure");
            return Self::new(code, "internal error in the store; see the server log");
        }
        Self::new(code, err.to_string())
    }
}

/// A query string that does not parse (`?round=x`) is a 400 with the usual JSON body, not
/// axum's plain-text rejection (which the OpenAPI document does not describe).
impl From<axum::extract::rejection::QueryRejection> for Error {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        Self::bad_request(format!("invalid query string: {}", rejection.body_text()))
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        (status_of(self.0.code), Json(self.0)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_their_status() {
        let cases = [
            (store::Error::NotFound { kind: "job", id: "j".into() }, 404),
            (store::Error::AlreadyExists { kind: "design", id: "d".into() }, 409),
            (
                store::Error::InUse {
                    kind: "design",
                    id: "d".into(),
                    reason: "job j is ready".into(),
                },
                409,
            ),
            (store::Error::TooLarge { size: 2, limit: 1 }, 413),
            (store::Error::Database(anyhow::anyhow!("secret path /x")), 500),
        ];
        for (err, status) in cases {
            let err = Error::from(err);
            assert_eq!(status_of(err.code()).as_u16(), status, "{err:?}");
            assert!(!err.0.message.contains("secret"), "{err:?}");
        }
    }
}
