//! Corpus replay body (not part of the API): this crate's `fuzz_corpus` test feeds every file
//! of the committed `bundle` fuzz corpus (see `fledge_agent::fuzzing::bundle`) through the
//! upload check, so the server side of code bundles is exercised by the same inputs.

/// Small bounds, so the corpus reaches them with small inputs (the agent's fuzz bounds).
pub const MAX_INFLATED: u64 = 1 << 20;
/// See [`MAX_INFLATED`].
pub const MAX_ENTRIES: usize = 64;

/// Runs the upload check of a code bundle on `data`. It must not panic; a rejection must be
/// a client error (400 or 413), never a server error.
pub fn check_zip(data: &[u8]) {
    if let Err(err) = crate::api::designs::check_zip(data, MAX_INFLATED, MAX_ENTRIES) {
        let status = crate::api::error::status_of(err.0.code);
        assert!(status.is_client_error(), "{status} for a bad bundle: {}", err.0.message);
    }
}
