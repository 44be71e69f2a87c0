//! `cpu`: N threads burn a fixed amount of CPU.

use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use crate::clock::{Rusage, process_cpu_ns, rusage};
use crate::phases::{BurnPhase, burn_phase};
use crate::report::write_json_atomic;
use crate::threads::ThreadStats;

/// Burn a fixed amount of CPU in N threads (optionally plus M late threads).
///
/// After --start-delay-ms (sleeping), starts N threads named burn-0.. that each busy-loop
/// (pure computation; the only syscall is reading the thread's own CPU clock about every
/// 1 ms of work) until their CLOCK_THREAD_CPUTIME_ID reaches --burn-ms. With
/// --late-threads M, M more threads named late-0.. doing the same are started
/// --late-delay-ms after the first ones. All threads are joined, then the report is
/// written: {"kind":"cpu", "pid", "threads":[{"name","tid","cpu_ns","nvcsw","nivcsw",
/// "utime_ns","stime_ns","late"}], "burn_cpu_ns", "process_cpu_ns", "rusage_self",
/// "main_thread", "max_threads_alive", ...}.
#[derive(Args, Debug)]
pub struct CpuArgs {
    /// Number of threads started first (burn-0..).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    threads: u32,
    /// CPU time each thread burns, in ms of its own CLOCK_THREAD_CPUTIME_ID.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    burn_ms: u64,
    /// Number of extra threads (late-0..) started --late-delay-ms after the first ones.
    #[arg(long, value_name = "M", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=4096))]
    late_threads: u32,
    /// Delay from starting the first threads to starting the late ones, in ms.
    #[arg(long, value_name = "D", default_value_t = 0)]
    late_delay_ms: u64,
    /// Idle sleep before the first threads are started, in ms.
    #[arg(long, value_name = "S", default_value_t = 0)]
    start_delay_ms: u64,
    /// After burning, each thread sleeps this long before it exits, so a poller (the /proc
    /// oracle) sees its final counts.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    linger_ms: u64,
    /// Where to write the JSON report.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

#[derive(Serialize)]
pub struct CpuReport {
    pub kind: &'static str,
    pub pid: u32,
    pub burn_ms: u64,
    /// Worker threads, in start order (late ones last).
    pub threads: Vec<ThreadStats>,
    /// Sum of the worker threads' cpu_ns.
    pub burn_cpu_ns: u64,
    /// CLOCK_PROCESS_CPUTIME_ID after all workers were joined.
    pub process_cpu_ns: u64,
    /// getrusage(RUSAGE_SELF) after all workers were joined.
    pub rusage_self: Rusage,
    /// The main thread's own accounting at the end.
    pub main_thread: ThreadStats,
    /// Most threads (main included) running workload code at the same time.
    pub max_threads_alive: usize,
    /// Wall time from starting the first worker to joining the last.
    pub wall_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ns_before_signal: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rusage_before_signal: Option<Rusage>,
}

impl CpuReport {
    pub fn new(burn_ms: u64, phase: BurnPhase) -> Self {
        let main_thread = ThreadStats::current(None);
        CpuReport {
            kind: "cpu",
            pid: std::process::id(),
            burn_ms,
            burn_cpu_ns: phase.threads.iter().map(|t| t.cpu_ns).sum(),
            threads: phase.threads,
            process_cpu_ns: process_cpu_ns(),
            rusage_self: rusage(libc::RUSAGE_SELF),
            main_thread,
            max_threads_alive: phase.max_threads_alive,
            wall_ns: phase.wall_ns,
            cpu_ns_before_signal: None,
            rusage_before_signal: None,
        }
    }
}

pub fn cmd_cpu(a: &CpuArgs) -> Result<()> {
    thread::sleep(Duration::from_millis(a.start_delay_ms));
    let phase = burn_phase(
        a.threads,
        a.burn_ms,
        a.late_threads,
        a.late_delay_ms,
        a.linger_ms,
    )?;
    write_json_atomic(&a.out, &CpuReport::new(a.burn_ms, phase))
}
