//! A ring-buffer record (bytes from the eBPF side) through cis490-common's decoders.
//! Must never panic; see `cis490_fuzz::harness::record` for the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cis490_fuzz::harness::record(data));
