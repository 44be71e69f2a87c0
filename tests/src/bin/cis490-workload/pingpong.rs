//! `pingpong`: two threads bounce a byte over two pipes.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use crate::clock::{Rusage, process_cpu_ns, rusage};
use crate::phases::pingpong_phase;
use crate::report::write_json_atomic;
use crate::threads::ThreadStats;

/// Bounce one byte between two threads over two pipes, R round trips.
///
/// The main thread writes to pipe 1 and blocks reading pipe 2; the thread "pong" reads
/// pipe 1 and writes pipe 2. Each round trip makes each side switch out about once. By
/// default the two threads are pinned to two different CPUs (when at least two are
/// allowed), so nearly all of those switches are voluntary: the nvcsw sum comes to about
/// 2R (a few short, when a thread preempted by something else finds the byte already
/// there). Cross-CPU wakeups are slow in a VM (~100 us per round trip), so keep R in the
/// thousands. Report: {"kind":"pingpong", "pid", "round_trips", "pinned_cpus",
/// "threads":[main, pong], "rusage_self", "process_cpu_ns", "wall_ns"}.
#[derive(Args, Debug)]
pub struct PingpongArgs {
    /// Number of round trips (each: main -> pong over pipe 1, pong -> main over pipe 2).
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u64).range(1..))]
    round_trips: u64,
    /// Do not pin the two threads to different CPUs. If they then share a CPU, the waking
    /// write often preempts the writer, and many switches count as involuntary instead.
    #[arg(long)]
    no_pin: bool,
    /// Before each write, wait until the peer has blocked (its voluntary switch count, read
    /// from /proc/self/task/TID/status, went up): every round trip then makes exactly one
    /// voluntary switch on each side, so the process makes at least 2R.
    #[arg(long)]
    handshake: bool,
    /// After the last round, both threads sleep this long before "pong" exits and the
    /// report is taken, so a poller (the /proc oracle) sees their final counts.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    linger_ms: u64,
    /// Where to write the JSON report.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

pub fn cmd_pingpong(a: &PingpongArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        round_trips: u64,
        /// CPUs of [main thread, "pong"], or null if not pinned.
        pinned_cpus: Option<[usize; 2]>,
        /// [main thread, "pong"].
        threads: Vec<ThreadStats>,
        rusage_self: Rusage,
        process_cpu_ns: u64,
        wall_ns: u64,
    }
    let phase = pingpong_phase(a.round_trips, !a.no_pin, a.handshake, a.linger_ms)?;
    let report = Report {
        kind: "pingpong",
        pid: std::process::id(),
        round_trips: a.round_trips,
        pinned_cpus: phase.pinned_cpus,
        threads: phase.threads,
        rusage_self: rusage(libc::RUSAGE_SELF),
        process_cpu_ns: process_cpu_ns(),
        wall_ns: phase.wall_ns,
    };
    write_json_atomic(&a.out, &report)
}
