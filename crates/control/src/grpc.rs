//! The control plane's gRPC edge in one place: reading a caller's credentials from request
//! metadata, authenticating a task against the store, and mapping errors to [`Status`].
//!
//! A task authenticates with `authorization: Bearer <task key>` (the key its worker got as
//! `FLEDGE_TASK_KEY`, the same one the apiserver takes) and names itself in
//! [`TASK_ID_METADATA`]. A missing, malformed or wrong credential is `Unauthenticated` with the
//! same words whatever the cause (unknown task, wrong key, ended job), so that probing learns
//! nothing; a store failure is `Unavailable`.

use tonic::{Request, Status};

use fledge_types::{Task, TaskId};

use crate::store::{self, BlobStore, Store};

pub use fledge_proto::TASK_ID_METADATA;

/// Longest bearer secret or task id read from metadata, in bytes.
const MAX_CREDENTIAL_BYTES: usize = 1024;

/// The ASCII value of metadata `name`, or `Unauthenticated` naming what is missing.
fn metadata<'a, T>(request: &'a Request<T>, name: &str) -> Result<&'a str, Status> {
    let value = request
        .metadata()
        .get(name)
        .ok_or_else(|| Status::unauthenticated(format!("missing {name} metadata")))?;
    let value = value
        .to_str()
        .map_err(|_| Status::unauthenticated(format!("{name} metadata is not ASCII")))?;
    if value.len() > MAX_CREDENTIAL_BYTES {
        return Err(Status::unauthenticated(format!(
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
        .ok_or_else(|| Status::unauthenticated("authorization metadata must be `Bearer <secret>`"))
}

/// The task whose id ([`TASK_ID_METADATA`]) and key (`authorization: Bearer`) the request
/// carries, if the key is valid and its job is not in a final state.
pub async fn authenticate_task<T>(store: &dyn Store, request: &Request<T>) -> Result<Task, Status> {
    let key = bearer(request)?;
    let task = metadata(request, TASK_ID_METADATA)?.trim();
    if task.is_empty() {
        return Err(Status::unauthenticated(format!("{TASK_ID_METADATA} metadata is empty")));
    }
    let task = TaskId::new(task);
    store.task_by_key(&task, &BlobStore::digest(key.as_bytes())).await.map_err(|err| match err {
        store::Error::NotFound { .. } => Status::unauthenticated(format!(
            "invalid key for task {task}, or its job has ended: present the task's own key \
             (FLEDGE_TASK_KEY) as `authorization: Bearer <key>`"
        )),
        other => store_status(other),
    })
}

/// A store failure as seen by a gRPC caller: `Unavailable`, details in the log only.
pub fn store_status(err: store::Error) -> Status {
    tracing::error!(error = %err, "store failed while serving a gRPC request");
    Status::unavailable("the control plane's store is unavailable; retry later")
}

impl From<crate::metaserver::Error> for Status {
    fn from(err: crate::metaserver::Error) -> Status {
        use crate::metaserver::Error;
        match &err {
            Error::InvalidRequest(_) => Status::invalid_argument(err.to_string()),
            Error::Full { .. } => Status::resource_exhausted(err.to_string()),
            Error::PermissionDenied(_) => Status::permission_denied(err.to_string()),
            Error::InvalidOption { .. } | Error::Serve(_) => Status::internal(err.to_string()),
        }
    }
}
