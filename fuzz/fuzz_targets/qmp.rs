//! Bytes from QEMU's QMP socket: one line, then a stream split into lines, decoded and interpreted.
//! Must never panic; see `cis490_fuzz::harness::qmp_stream` for the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cis490_fuzz::harness::qmp_stream(data));
