//! `bundle` fuzz target: the body is `fledge_agent::fuzzing::bundle`, shared with the corpus replay test.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fledge_agent::fuzzing::bundle(data));
