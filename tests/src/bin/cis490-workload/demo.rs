//! `demo`: the bundled demo workload, three phases.

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use crate::PROG;
use crate::burn::burn_for_ns;
use crate::clock::{NS_PER_MS, Rusage, process_cpu_ns, rusage, secs};
use crate::phases::{burn_phase, pingpong_phase};
use crate::report::write_json_atomic;
use crate::threads::{ThreadStats, join, spawn_named};

/// The bundled demo workload (about 3 s); prints a summary to stderr.
///
/// Phase 1: 2 threads burn 600 ms of CPU each. Phase 2: pingpong, 20000 round trips
/// (threads not pinned, so switches are a mix of voluntary and involuntary).
/// Phase 3: 3 new threads each do 20 cycles of (burn 10 ms CPU, sleep 10 ms). Phases are
/// separated by --gap-ms of idle sleep so they stand apart on a timeline. With --out, also
/// writes {"kind":"demo", "pid", "phases":{...}, "process_cpu_ns", "rusage_self", ...}.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Idle sleep between phases, in ms.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    gap_ms: u64,
    /// Optionally write the JSON report here.
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

pub fn cmd_demo(a: &DemoArgs) -> Result<()> {
    const P1_THREADS: u32 = 2;
    const P1_BURN_MS: u64 = 600;
    const P2_ROUND_TRIPS: u64 = 20_000;
    const P3_THREADS: u32 = 3;
    const P3_CYCLES: u32 = 20;
    const P3_BURN_MS: u64 = 10;
    const P3_SLEEP_MS: u64 = 10;

    #[derive(Serialize)]
    struct Phase {
        description: String,
        threads: Vec<ThreadStats>,
        wall_ns: u64,
    }
    #[derive(Serialize)]
    struct Phases {
        burn: Phase,
        pingpong: Phase,
        cycles: Phase,
    }
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        phases: Phases,
        gap_ms: u64,
        main_thread: ThreadStats,
        process_cpu_ns: u64,
        rusage_self: Rusage,
        wall_ns: u64,
    }

    let pid = std::process::id();
    let start = Instant::now();
    let gap = Duration::from_millis(a.gap_ms);
    eprintln!("{PROG} demo: pid {pid}");

    let p1 = burn_phase(P1_THREADS, P1_BURN_MS, 0, 0, 0)?;
    let burn = Phase {
        description: format!("{P1_THREADS} threads burn {P1_BURN_MS} ms of CPU each"),
        threads: p1.threads,
        wall_ns: p1.wall_ns,
    };
    eprintln!(
        "  phase 1: {} in {:.2} s",
        burn.description,
        secs(burn.wall_ns)
    );
    thread::sleep(gap);

    // Unpinned: pinned cross-CPU round trips cost ~100 us each in a VM, which would make this
    // phase alone take seconds.
    let p2 = pingpong_phase(P2_ROUND_TRIPS, false, false, 0)?;
    let pingpong = Phase {
        description: format!("pingpong, {P2_ROUND_TRIPS} round trips over two pipes (unpinned)"),
        threads: p2.threads,
        wall_ns: p2.wall_ns,
    };
    eprintln!(
        "  phase 2: {} in {:.2} s",
        pingpong.description,
        secs(pingpong.wall_ns)
    );
    thread::sleep(gap);

    let p3_start = Instant::now();
    let p3_threads = thread::scope(|s| -> Result<Vec<ThreadStats>> {
        let handles = (0..P3_THREADS)
            .map(|i| {
                spawn_named(s, format!("cycle-{i}"), || {
                    for _ in 0..P3_CYCLES {
                        burn_for_ns(P3_BURN_MS * NS_PER_MS);
                        thread::sleep(Duration::from_millis(P3_SLEEP_MS));
                    }
                    ThreadStats::current(None)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        handles.into_iter().map(join).collect()
    })?;
    let cycles = Phase {
        description: format!(
            "{P3_THREADS} threads, {P3_CYCLES} cycles of (burn {P3_BURN_MS} ms, sleep {P3_SLEEP_MS} ms)"
        ),
        threads: p3_threads,
        wall_ns: p3_start.elapsed().as_nanos() as u64,
    };
    eprintln!(
        "  phase 3: {} in {:.2} s",
        cycles.description,
        secs(cycles.wall_ns)
    );

    let report = Report {
        kind: "demo",
        pid,
        phases: Phases {
            burn,
            pingpong,
            cycles,
        },
        gap_ms: a.gap_ms,
        main_thread: ThreadStats::current(None),
        process_cpu_ns: process_cpu_ns(),
        rusage_self: rusage(libc::RUSAGE_SELF),
        wall_ns: start.elapsed().as_nanos() as u64,
    };
    eprintln!(
        "  total: {:.2} s wall, {:.3} s CPU, {} voluntary / {} involuntary context switches",
        secs(report.wall_ns),
        secs(report.process_cpu_ns),
        report.rusage_self.nvcsw,
        report.rusage_self.nivcsw
    );
    if let Some(out) = &a.out {
        write_json_atomic(out, &report)?;
    }
    Ok(())
}
