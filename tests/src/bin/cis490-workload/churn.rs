//! `churn`: short threads started and ended without pause, for a while.

use std::hint::black_box;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use clap::Args;
use serde::Serialize;

use crate::clock::{Rusage, clock_ns, process_cpu_ns, rusage, sleep_until};
use crate::report::write_json_atomic;

/// Thread churn: every --every-ms, start --batch threads and join them, for --seconds (then
/// --linger-ms idle).
///
/// Each thread spins --spin-us of its own CPU clock, sleeps --sleep-us (one voluntary switch)
/// and exits; most live less than a poll of /proc, so a poller misses them. Report:
/// {"kind":"churn", "pid", "threads" (started and joined), "rusage_self", "process_cpu_ns"}.
#[derive(Args, Debug)]
pub struct ChurnArgs {
    /// How long to churn, in s.
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Threads per batch.
    #[arg(long, value_name = "N", default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=256))]
    batch: u64,
    /// One batch every this many ms.
    #[arg(long, value_name = "MS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    every_ms: u64,
    /// CPU each thread burns, in µs of its own clock.
    #[arg(long, value_name = "US", default_value_t = 100)]
    spin_us: u64,
    /// Each thread's sleep, in µs.
    #[arg(long, value_name = "US", default_value_t = 200)]
    sleep_us: u64,
    /// After the last batch, sleep this long before the report (every
    /// thread gone, the process idle).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    linger_ms: u64,
    /// Where to write the JSON report.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

pub fn cmd_churn(a: &ChurnArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        threads: u64,
        rusage_self: Rusage,
        process_cpu_ns: u64,
    }
    let start = Instant::now();
    let end = start + Duration::from_secs(a.seconds);
    let (spin_ns, sleep) = (a.spin_us * 1000, Duration::from_micros(a.sleep_us));
    let mut threads = 0u64;
    let mut next = start;
    while next < end {
        let handles: Vec<_> = (0..a.batch)
            .map(|_| {
                thread::spawn(move || {
                    let t0 = clock_ns(libc::CLOCK_THREAD_CPUTIME_ID);
                    while clock_ns(libc::CLOCK_THREAD_CPUTIME_ID) - t0 < spin_ns {
                        black_box(());
                    }
                    thread::sleep(sleep);
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow!("a churn thread panicked"))?;
            threads += 1;
        }
        next += Duration::from_millis(a.every_ms);
        sleep_until(next);
    }
    thread::sleep(Duration::from_millis(a.linger_ms));
    let report = Report {
        kind: "churn",
        pid: std::process::id(),
        threads,
        rusage_self: rusage(libc::RUSAGE_SELF),
        process_cpu_ns: process_cpu_ns(),
    };
    write_json_atomic(&a.out, &report)
}
