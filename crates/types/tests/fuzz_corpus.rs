//! Replays the `spec` fuzz target's committed corpus (see docs/fuzzing.md).

#[test]
fn spec_corpus_replays() {
    fledge_types::fuzzing::replay("spec", fledge_types::fuzzing::spec);
}
