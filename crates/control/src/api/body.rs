//! Request bodies: read with an explicit limit (413 names it), JSON parsed strictly.

use axum::body::{Body, Bytes};
use bytes::BytesMut;
use futures::StreamExt as _;
use serde::de::DeserializeOwned;

use fledge_types::ErrorCode;

use super::error::{Error, Result};

/// Reads a body of at most `limit` bytes, chunk by chunk, so an oversize body is refused as
/// soon as it passes the limit rather than after it has been buffered.
pub(super) async fn read(body: Body, limit: u64, what: &str) -> Result<Bytes> {
    let mut stream = body.into_data_stream();
    let mut buffer = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|err| Error::bad_request(format!("cannot read the {what}: {err}")))?;
        if (buffer.len() + chunk.len()) as u64 > limit {
            return Err(Error::new(
                ErrorCode::PayloadTooLarge,
                format!("{what} exceeds the limit of {limit} bytes"),
            ));
        }
        buffer.extend_from_slice(&chunk);
    }
    Ok(buffer.freeze())
}

/// Parses a JSON body into `T`: comment keys (`//...`) are ignored, unknown fields are errors,
/// and every problem is listed with its path.
pub(super) async fn json<T: DeserializeOwned>(body: Body, limit: usize, what: &str) -> Result<T> {
    let bytes = read(body, limit as u64, what).await?;
    fledge_types::json::from_slice(&bytes)
        .map_err(|details| Error::invalid(format!("invalid {what}"), details))
}
