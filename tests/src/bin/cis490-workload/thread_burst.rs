//! `thread-burst`: many short-lived threads after SIGUSR1.

use std::hint::black_box;
use std::path::PathBuf;
use std::thread;

use anyhow::{Result, anyhow};
use clap::Args;
use serde::Serialize;

use crate::clock::{Rusage, process_cpu_ns, rusage};
use crate::report::write_json_atomic;
use crate::signals::ready_then_wait;

/// Write PATH.ready, wait for SIGUSR1, then start and join COUNT short-lived threads.
///
/// Threads are unnamed (no prctl rename) and exit at once; they are started in batches of
/// 64 alive at a time. Used to flood the tracer's ring buffer with thread start/exit
/// records: the process makes exactly COUNT thread starts and COUNT thread exits after the
/// signal (plus the main thread's exit at the end). Report: {"kind":"thread-burst",
/// "pid", "count", "cpu_ns_before_signal", "process_cpu_ns", "rusage_before_signal",
/// "rusage_self"}.
#[derive(Args, Debug)]
pub struct ThreadBurstArgs {
    /// Number of threads to start (and join) after the signal.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Give up (error, exit code 2) if no SIGUSR1 arrives within this many ms; 0 waits forever.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    timeout_ms: u64,
    /// Where to write the JSON report; the ready file is PATH.ready.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

pub fn cmd_thread_burst(a: &ThreadBurstArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        count: u64,
        cpu_ns_before_signal: u64,
        process_cpu_ns: u64,
        rusage_before_signal: Rusage,
        rusage_self: Rusage,
    }
    ready_then_wait(&a.out, a.timeout_ms)?;
    let cpu_before = process_cpu_ns();
    let rusage_before = rusage(libc::RUSAGE_SELF);
    let mut left = a.count;
    while left > 0 {
        let batch = left.min(64);
        let handles: Vec<_> = (0..batch)
            .map(|_| thread::spawn(|| black_box(0u64)))
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow!("a burst thread panicked"))?;
        }
        left -= batch;
    }
    write_json_atomic(
        &a.out,
        &Report {
            kind: "thread-burst",
            pid: std::process::id(),
            count: a.count,
            cpu_ns_before_signal: cpu_before,
            process_cpu_ns: process_cpu_ns(),
            rusage_before_signal: rusage_before,
            rusage_self: rusage(libc::RUSAGE_SELF),
        },
    )
}
