//! Replays the `bundle` fuzz target's committed corpus (see docs/fuzzing.md).

#[test]
fn bundle_corpus_replays() {
    fledge_types::fuzzing::replay("bundle", fledge_agent::fuzzing::bundle);
}
