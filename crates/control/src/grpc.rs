//! The one mapping from [`ErrorCode`] to gRPC [`Status`], shared by the gRPC services (notifier,
//! metaserver), as [`crate::api`]'s `status_of` is for HTTP. A service classifies its error as an
//! `ErrorCode`; only this module knows which gRPC code that becomes.

use fledge_types::ErrorCode;
use tonic::{Code, Status};

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
        ErrorCode::PayloadTooLarge => Code::ResourceExhausted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::Internal => Code::Internal,
    }
}

/// A status with the gRPC code of `code` and `message`.
pub fn status(code: ErrorCode, message: impl Into<String>) -> Status {
    Status::new(code_of(code), message)
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
}
