//! `wait-signal`: `cpu`, started by SIGUSR1 (attach to a running process).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::clock::{process_cpu_ns, rusage};
use crate::cpu::CpuReport;
use crate::phases::burn_phase;
use crate::report::write_json_atomic;
use crate::signals::ready_then_wait_with;

/// Write PATH.ready, wait for SIGUSR1, then do what `cpu` does.
///
/// Immediately writes {"kind":"ready","pid"} to PATH.ready (atomically), then blocks in
/// sigtimedwait() until SIGUSR1 arrives (at most --timeout-ms). Then starts N threads that
/// each burn --burn-ms of their own CPU clock, and writes a `cpu` report (kind "cpu") with
/// two extra fields: "cpu_ns_before_signal" (CLOCK_PROCESS_CPUTIME_ID just before the
/// wait for the signal) and "rusage_before_signal" (getrusage(RUSAGE_SELF) at the same
/// moment), so the work after the signal, its wake-up included, can be told apart. For
/// testing attach to a running process: a tracer that attaches during the wait sees all of
/// that window but its first switch, the switch-out into the wait.
#[derive(Args, Debug)]
pub struct WaitSignalArgs {
    /// CPU time each thread burns after the signal, in ms of its own thread CPU clock.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    burn_ms: u64,
    /// Number of threads started after the signal.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    threads: u32,
    /// Give up (error, exit code 2) if no SIGUSR1 arrives within this many ms; 0 waits forever.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    timeout_ms: u64,
    /// After burning, each thread sleeps this long before it exits, so a poller (the /proc
    /// oracle) sees its final counts.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    linger_ms: u64,
    /// Where to write the JSON report; the ready file is PATH.ready.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

pub fn cmd_wait_signal(a: &WaitSignalArgs) -> Result<()> {
    // Read before the wait, not after: waking up is work after the signal
    // (under software emulation up to ~5 ms of CPU, code run for the first
    // time), which a tracer attached during the wait counts.
    let (cpu_before, rusage_before) = ready_then_wait_with(&a.out, a.timeout_ms, || {
        (process_cpu_ns(), rusage(libc::RUSAGE_SELF))
    })?;
    let phase = burn_phase(a.threads, a.burn_ms, 0, 0, a.linger_ms)?;
    let mut report = CpuReport::new(a.burn_ms, phase);
    report.cpu_ns_before_signal = Some(cpu_before);
    report.rusage_before_signal = Some(rusage_before);
    write_json_atomic(&a.out, &report)
}
