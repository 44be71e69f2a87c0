//! `spin`: one thread that never blocks, with its own CPU clock sampled as it goes.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use crate::clock::{NS_PER_MS, clock_ns, process_cpu_ns, thread_cpu_ns};
use crate::report::write_json_atomic;

/// One thread (the main one) that busy-loops without a syscall that blocks, sampling its own
/// CPU clock.
///
/// For --ms of CLOCK_MONOTONIC it loops, and every --sample-us of that clock it records a pair
/// (CLOCK_MONOTONIC, CLOCK_THREAD_CPUTIME_ID), both in ns: the thread's on-CPU time as the
/// kernel counts it (the clock is brought up to date when read), at a time on the clock of
/// `t_mono_ns`. So the CPU time of any stretch inside the run is known to a sample's spacing.
/// Report: {"kind":"spin", "pid", "samples":[[mono_ns, cpu_ns], ...], "process_cpu_ns"}.
#[derive(Args, Debug)]
pub struct SpinArgs {
    /// How long to spin, in ms of CLOCK_MONOTONIC.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=600_000))]
    ms: u64,
    /// Spacing of the samples, in µs of CLOCK_MONOTONIC.
    #[arg(long, value_name = "US", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    sample_us: u64,
    /// Where to write the JSON report.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

#[derive(Serialize)]
struct SpinReport {
    kind: &'static str,
    pid: u32,
    samples: Vec<[u64; 2]>,
    /// CLOCK_PROCESS_CPUTIME_ID at the end.
    process_cpu_ns: u64,
}

pub fn cmd_spin(a: &SpinArgs) -> Result<()> {
    let mono = || clock_ns(libc::CLOCK_MONOTONIC);
    let step = a.sample_us * 1000;
    let start = mono();
    let end = start + a.ms * NS_PER_MS;
    let mut samples = Vec::with_capacity((a.ms * NS_PER_MS / step + 2) as usize);
    let mut next = start;
    let mut spin = 0u64;
    loop {
        let now = mono();
        if now >= next {
            samples.push([now, thread_cpu_ns()]);
            if now >= end {
                break;
            }
            next = now + step;
        }
        // A little work between clock reads (the vDSO reads CLOCK_MONOTONIC without a syscall).
        for i in 0..256u64 {
            spin = std::hint::black_box(spin.wrapping_mul(31).wrapping_add(i));
        }
    }
    write_json_atomic(
        &a.out,
        &SpinReport {
            kind: "spin",
            pid: std::process::id(),
            samples,
            process_cpu_ns: process_cpu_ns(),
        },
    )
}
