//! Replays the `safetensors` fuzz target's committed corpus (safetensors payloads, see
//! docs/fuzzing.md) through the registry's model file decoder: it must reject or decode every
//! input without panicking, and what it decodes must encode and decode back to the same bytes.

use fledge_sdk::registry::{from_safetensors, to_safetensors};

fn decode_model_file(data: &[u8]) {
    let Ok(weights) = from_safetensors("corpus", data) else { return };
    let bytes = to_safetensors(&weights).expect("decoded weights encode");
    let again = from_safetensors("re-encoded", &bytes).expect("encoded weights decode");
    // Bytes, not weights: NaN values compare unequal but must survive unchanged.
    assert_eq!(to_safetensors(&again).expect("encode again"), bytes);
}

#[test]
fn safetensors_corpus_replays_through_the_model_file_decoder() {
    fledge_types::fuzzing::replay("safetensors", decode_model_file);
}
