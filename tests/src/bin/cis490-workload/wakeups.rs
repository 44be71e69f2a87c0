//! `wakeups`: timed wakeups whose delays the process measures itself.

use std::io;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use serde::Serialize;

use crate::clock::{Rusage, clock_ns, process_cpu_ns, rusage};
use crate::report::write_json_atomic;

/// Timed wakeups whose delays the process measures itself: ground truth for run-queue
/// delay.
///
/// One thread (the main one), with a timer slack of 1 ns, sleeps --count times until an
/// absolute CLOCK_MONOTONIC deadline --period-us after the previous one's wake-up
/// (clock_nanosleep TIMER_ABSTIME), and reads the clock as soon as it runs: each delay is
/// `woke - deadline`, the timer's expiry, the wait on the run queue (what the kernel counts
/// as `sched_info.run_delay`) and the return to user space. A sleep whose deadline passed
/// before the thread left its CPU (the thread stalled between reading the clock and
/// sleeping, or the timer fired while it was still switching out) never waits on the run
/// queue: `not_slept` counts the sleeps across which the thread's voluntary switches
/// (getrusage RUSAGE_THREAD `ru_nvcsw`) did not grow. Report: {"kind":"wakeups", "pid",
/// "count", "period_us", "delays_ns":[...], "sum_ns", "max_ns", "not_slept", "rusage_self",
/// "process_cpu_ns"}.
#[derive(Args, Debug)]
pub struct WakeupsArgs {
    /// Number of timed sleeps.
    #[arg(long, value_name = "N", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    count: u64,
    /// Sleep per wake-up, in µs.
    #[arg(long, value_name = "US", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    period_us: u64,
    /// Where to write the JSON report.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

pub fn cmd_wakeups(a: &WakeupsArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        count: u64,
        period_us: u64,
        delays_ns: Vec<u64>,
        sum_ns: u64,
        max_ns: u64,
        not_slept: u64,
        rusage_self: Rusage,
        process_cpu_ns: u64,
    }
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes a plain integer and changes only this thread.
    if unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) } != 0 {
        bail!("prctl(PR_SET_TIMERSLACK): {}", io::Error::last_os_error());
    }
    let mut delays = Vec::with_capacity(a.count as usize);
    let mut not_slept = 0;
    let mut now = clock_ns(libc::CLOCK_MONOTONIC);
    for _ in 0..a.count {
        let deadline = now + a.period_us * 1000;
        let ts = libc::timespec {
            tv_sec: (deadline / 1_000_000_000) as libc::time_t,
            tv_nsec: (deadline % 1_000_000_000) as libc::c_long,
        };
        let switches_before = rusage(libc::RUSAGE_THREAD).nvcsw;
        loop {
            // SAFETY: `ts` is a valid timespec; a null remainder is allowed with TIMER_ABSTIME.
            let rc = unsafe {
                libc::clock_nanosleep(
                    libc::CLOCK_MONOTONIC,
                    libc::TIMER_ABSTIME,
                    &ts,
                    std::ptr::null_mut(),
                )
            };
            match rc {
                0 => break,
                libc::EINTR => continue,
                e => bail!("clock_nanosleep: {}", io::Error::from_raw_os_error(e)),
            }
        }
        now = clock_ns(libc::CLOCK_MONOTONIC);
        delays.push(now.saturating_sub(deadline));
        if rusage(libc::RUSAGE_THREAD).nvcsw == switches_before {
            not_slept += 1;
        }
    }
    let report = Report {
        kind: "wakeups",
        pid: std::process::id(),
        count: a.count,
        period_us: a.period_us,
        sum_ns: delays.iter().sum(),
        max_ns: delays.iter().copied().max().unwrap_or(0),
        delays_ns: delays,
        not_slept,
        rusage_self: rusage(libc::RUSAGE_SELF),
        process_cpu_ns: process_cpu_ns(),
    };
    write_json_atomic(&a.out, &report)
}
