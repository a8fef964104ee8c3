//! Request bodies: read with an explicit limit (413 names it), JSON parsed strictly.

use axum::body::{Body, Bytes};
use serde::de::DeserializeOwned;

use fledge_types::ErrorCode;

use super::error::{Error, Result};

/// Reads a body of at most `limit` bytes.
pub(super) async fn read(body: Body, limit: u64, what: &str) -> Result<Bytes> {
    let capped = usize::try_from(limit).unwrap_or(usize::MAX);
    match axum::body::to_bytes(body, capped).await {
        Ok(bytes) => Ok(bytes),
        Err(err) => {
            let too_large = std::error::Error::source(&err)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            if too_large {
                Err(Error::new(
                    ErrorCode::PayloadTooLarge,
                    format!("{what} exceeds the limit of {limit} bytes"),
                ))
            } else {
                Err(Error::bad_request(format!("cannot read the {what}: {err}")))
            }
        }
    }
}

/// Parses a JSON body into `T`: comment keys (`//...`) are ignored, unknown fields are errors,
/// and every problem is listed with its path.
pub(super) async fn json<T: DeserializeOwned>(body: Body, limit: usize, what: &str) -> Result<T> {
    let bytes = read(body, limit as u64, what).await?;
    fledge_types::json::from_slice(&bytes)
        .map_err(|details| Error::invalid(format!("invalid {what}"), details))
}
