//! `wakeburn`: a many-thread CPU burn with frequent wakeups, for benchmarks.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use crate::burn::spin;
use crate::clock::{Rusage, process_cpu_ns, rusage, secs};
use crate::held::Held;
use crate::threads::{join, spawn_named};

/// A many-thread CPU burn with frequent wakeups, for benchmarks.
///
/// N threads (more than the CPUs, so the run queue is never empty) each do C cycles of
/// (spin --spin-iters iterations of pure computation, then nanosleep --sleep-us), so each
/// cycle is a switch-out, a timer wakeup and a switch-in. The work is fixed: the wall time
/// it takes is the measure. With --wait-signal, writes PATH.ready and waits for SIGUSR1
/// first. Report: {"kind":"wakeburn", "pid", "threads", "cycles", "spin_iters",
/// "sleep_us", "wall_ns", "cycles_per_s", "rusage_self", "process_cpu_ns"}; then sleeps
/// --linger-ms.
#[derive(Args, Debug)]
pub struct WakeburnArgs {
    /// Number of threads.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    threads: u32,
    /// Cycles (spin, then sleep) per thread.
    #[arg(long, value_name = "C", value_parser = clap::value_parser!(u64).range(1..))]
    cycles: u64,
    /// Iterations of the spin loop per cycle (about 1 ns each here).
    #[arg(long, value_name = "I", default_value_t = 20_000)]
    spin_iters: u64,
    /// nanosleep per cycle, in microseconds (the kernel adds its timer slack, 50 us by
    /// default).
    #[arg(long, value_name = "US", default_value_t = 1)]
    sleep_us: u64,
    #[command(flatten)]
    held: Held,
}

pub fn cmd_wakeburn(a: &WakeburnArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        threads: u32,
        cycles: u64,
        spin_iters: u64,
        sleep_us: u64,
        wall_ns: u64,
        cycles_per_s: f64,
        rusage_self: Rusage,
        process_cpu_ns: u64,
    }
    a.held.start()?;
    let (cycles, iters, nap) = (a.cycles, a.spin_iters, Duration::from_micros(a.sleep_us));
    let start = Instant::now();
    thread::scope(|s| -> Result<()> {
        let handles = (0..a.threads)
            .map(|i| {
                spawn_named(s, format!("wake-{i}"), move || {
                    for _ in 0..cycles {
                        spin(iters);
                        thread::sleep(nap);
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        handles.into_iter().try_for_each(join)
    })?;
    let wall_ns = start.elapsed().as_nanos() as u64;
    let report = Report {
        kind: "wakeburn",
        pid: std::process::id(),
        threads: a.threads,
        cycles,
        spin_iters: iters,
        sleep_us: a.sleep_us,
        wall_ns,
        cycles_per_s: (cycles * a.threads as u64) as f64 / secs(wall_ns),
        rusage_self: rusage(libc::RUSAGE_SELF),
        process_cpu_ns: process_cpu_ns(),
    };
    a.held.finish(&report)
}
