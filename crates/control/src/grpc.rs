//! The control plane's gRPC edge in one place: the one mapping from [`ErrorCode`] to a gRPC
//! [`Status`] (as [`crate::api`]'s `status_of` is for HTTP), reading a caller's credentials from
//! request metadata, and authenticating a task against the store. A service classifies its
//! errors as `ErrorCode`s; only this module knows which gRPC code each becomes.
//!
//! A task authenticates with `authorization: Bearer <task key>` (the key its worker got as
//! `FLEDGE_TASK_KEY`, the same one the apiserver takes) and names itself in
//! [`TASK_ID_METADATA`]. A missing, malformed or wrong credential is `Unauthenticated` with the
//! same words whatever the cause (unknown task, wrong key, ended job), so that probing learns
//! nothing; a store failure is `Unavailable`.

use tonic::{Code, Request, Status};

use fledge_types::{ErrorCode, Task, TaskId};

use crate::store::{self, BlobStore, Store};

pub use fledge_proto::TASK_ID_METADATA;

/// The gRPC code of an error code. This is the only place codes become gRPC codes.
pub fn code_of(code: ErrorCode) -> Code {
    match code {
        ErrorCode::BadRequest => Code::InvalidArgument,
        ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::PermissionDenied => Code::PermissionDenied,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::Conflict => Code::FailedPrecondition,
        // Too much of something the server bounds (a message, its table of ends).
        ErrorCode::PayloadTooLarge | ErrorCode::TooManyRequests => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Internal => Code::Internal,
    }
}

/// A status with the gRPC code of `code` and `message`.
pub fn status(code: ErrorCode, message: impl Into<String>) -> Status {
    Status::new(code_of(code), message)
}

/// Longest bearer secret or task id read from metadata, in bytes.
const MAX_CREDENTIAL_BYTES: usize = 1024;

fn unauthenticated(message: impl Into<String>) -> Status {
    status(ErrorCode::Unauthenticated, message)
}

/// The ASCII value of metadata `name`, or `Unauthenticated` naming what is missing.
fn metadata<'a, T>(request: &'a Request<T>, name: &str) -> Result<&'a str, Status> {
    let value = request
        .metadata()
        .get(name)
        .ok_or_else(|| unauthenticated(format!("missing {name} metadata")))?;
    let value =
        value.to_str().map_err(|_| unauthenticated(format!("{name} metadata is not ASCII")))?;
    if value.len() > MAX_CREDENTIAL_BYTES {
        return Err(unauthenticated(format!(
            "{name} metadata is longer than {MAX_CREDENTIAL_BYTES} bytes"
        )));
    }
    Ok(value)
}

/// The bearer secret of a request, or `Unauthenticated`.
pub fn bearer<T>(request: &Request<T>) -> Result<String, Status> {
    metadata(request, "authorization")?
        .strip_prefix("Bearer ")
        .map(|secret| secret.trim().to_owned())
        .filter(|secret| !secret.is_empty())
        .ok_or_else(|| unauthenticated("authorization metadata must be `Bearer <secret>`"))
}

/// The task whose id ([`TASK_ID_METADATA`]) and key (`authorization: Bearer`) the request
/// carries, if the key is valid and its job is not in a final state.
pub async fn authenticate_task<T>(store: &dyn Store, request: &Request<T>) -> Result<Task, Status> {
    let key = bearer(request)?;
    let task = metadata(request, TASK_ID_METADATA)?.trim();
    if task.is_empty() {
        return Err(unauthenticated(format!("{TASK_ID_METADATA} metadata is empty")));
    }
    let task = TaskId::new(task);
    store.task_by_key(&task, &BlobStore::digest(key.as_bytes())).await.map_err(|err| match err {
        store::Error::NotFound { .. } => unauthenticated(format!(
            "invalid key for task {task}, or its job has ended: present the task's own key \
             (FLEDGE_TASK_KEY) as `authorization: Bearer <key>`"
        )),
        other => store_status(other),
    })
}

/// A store failure as seen by a gRPC caller: `Unavailable`, details in the log only.
pub fn store_status(err: store::Error) -> Status {
    tracing::error!(error = %err, "store failed while serving a gRPC request");
    status(ErrorCode::Unavailable, "the control plane's store is unavailable; retry later")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_has_a_distinct_meaningful_grpc_code() {
        let all = [
            ErrorCode::BadRequest,
            ErrorCode::Unauthenticated,
            ErrorCode::PermissionDenied,
            ErrorCode::NotFound,
            ErrorCode::AlreadyExists,
            ErrorCode::Conflict,
            ErrorCode::PayloadTooLarge,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ];
        let codes: std::collections::BTreeSet<i32> =
            all.iter().map(|&code| code_of(code) as i32).collect();
        assert_eq!(codes.len(), all.len(), "two error codes share a gRPC code");
        assert!(!codes.contains(&(Code::Ok as i32)) && !codes.contains(&(Code::Unknown as i32)));
        assert_eq!(status(ErrorCode::Unauthenticated, "no").code(), Code::Unauthenticated);
    }

    #[test]
    fn credentials_are_read_strictly_from_metadata() {
        let mut request = Request::new(());
        assert_eq!(bearer(&request).unwrap_err().code(), Code::Unauthenticated);
        request.metadata_mut().insert("authorization", "Basic abc".parse().unwrap());
        let err = bearer(&request).unwrap_err();
        assert!(err.message().contains("Bearer"), "{err:?}");
        request.metadata_mut().insert("authorization", "Bearer  s3cret ".parse().unwrap());
        assert_eq!(bearer(&request).unwrap(), "s3cret");
        let long = format!("Bearer {}", "k".repeat(MAX_CREDENTIAL_BYTES));
        request.metadata_mut().insert("authorization", long.parse().unwrap());
        assert!(bearer(&request).unwrap_err().message().contains("longer than"));
    }
}
