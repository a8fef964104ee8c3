//! Replays the `wire_chunks` and `safetensors` fuzz targets' committed corpora (see
//! docs/fuzzing.md).

use fledge_types::fuzzing::replay;

#[test]
fn wire_chunks_corpus_replays() {
    replay("wire_chunks", fledge_channel::fuzzing::wire_chunks);
}

#[test]
fn safetensors_corpus_replays() {
    replay("safetensors", fledge_channel::fuzzing::safetensors);
}
