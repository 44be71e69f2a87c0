//! Bytes from a guest agent's port: split into capped lines, each validated.
//! Must never panic; see `cis490_fuzz::harness::guest_stream` for the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cis490_fuzz::harness::guest_stream(data));
