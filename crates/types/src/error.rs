//! The REST error body and the small set of error codes every service maps to.

use serde::{Deserialize, Serialize};

/// Service-edge error classes; mapped to HTTP and gRPC status in exactly one place each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// The request is malformed or fails validation.
    BadRequest,
    /// No valid credentials.
    Unauthenticated,
    /// Valid credentials, not allowed.
    PermissionDenied,
    /// No such resource (or not yours).
    NotFound,
    /// The resource exists already.
    AlreadyExists,
    /// The resource's state forbids the request (e.g. start a running job).
    Conflict,
    /// Larger than allowed.
    PayloadTooLarge,
    /// Faster than allowed; retry later (the message says when).
    TooManyRequests,
    /// A dependency is down; retry later.
    Unavailable,
    /// A bug.
    Internal,
}

/// One problem found in a request, with the path to the field (`roles[1].groupAssociation[0]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetail {
    /// Path to the field, empty for the whole body.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

/// The body of every REST error response: `{code, message, details[]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    /// Error class.
    pub code: ErrorCode,
    /// One-line summary.
    pub message: String,
    /// Every problem found, each with a field path.
    #[serde(default)]
    pub details: Vec<ErrorDetail>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        for detail in &self.details {
            if detail.path.is_empty() {
                write!(f, "\n  - {}", detail.message)?;
            } else {
                write!(f, "\n  - {}: {}", detail.path, detail.message)?;
            }
        }
        Ok(())
    }
}
