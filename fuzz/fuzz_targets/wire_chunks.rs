//! `wire_chunks` fuzz target: the body is `fledge_channel::fuzzing::wire_chunks`, shared with the corpus replay test.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fledge_channel::fuzzing::wire_chunks(data));
