//! `spec` fuzz target: the body is `fledge_types::fuzzing::spec`, shared with the corpus replay test.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fledge_types::fuzzing::spec(data));
