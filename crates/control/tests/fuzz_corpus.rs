//! Replays the `bundle` fuzz target's committed corpus through the upload check of code
//! bundles (see docs/fuzzing.md).

#[test]
fn bundle_corpus_replays_through_the_upload_check() {
    fledge_types::fuzzing::replay("bundle", fledge_control::fuzzing::check_zip);
}
