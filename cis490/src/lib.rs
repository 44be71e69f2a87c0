//! cis490: a host-side eBPF tracer for QEMU virtual machines.
//!
//! Data flows one way: kernel tracepoints -> `cis490-ebpf` programs (per-CPU
//! aggregates + a ring buffer) -> [`sources`] (one per vantage) -> one
//! [`row::Row`] per source per bucket ([`clock`]) -> [`episode`] files.

pub mod caps;
pub mod check;
pub mod cli;
pub mod clock;
pub mod control;
pub mod dataset;
pub mod ebpf;
pub mod episode;
pub mod event;
pub mod fdwatch;
pub mod meta;
pub mod report;
pub mod row;
pub mod serve;
pub mod sources;
pub mod summary;
pub mod taps;
pub mod target;
pub mod trace;
