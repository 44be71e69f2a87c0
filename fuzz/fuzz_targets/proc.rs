//! The text of a /proc file (stat, status, schedstat, sched, io, net/dev, fdinfo) through every /proc parser.
//! Must never panic; see `cis490_fuzz::harness::proc_files` for the properties.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cis490_fuzz::harness::proc_files(data));
