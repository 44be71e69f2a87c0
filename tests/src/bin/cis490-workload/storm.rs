//! `storm`: a context-switch storm for benchmarks.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::affinity::{allowed_cpus, set_affinity};
use crate::burn::burn_for_ns;
use crate::clock::{Rusage, process_cpu_ns, rusage, secs};
use crate::held::Held;
use crate::threads::{join, spawn_named};

/// A context-switch storm for benchmarks: two threads bounce one byte over two pipes,
/// R round trips, as fast as the machine allows.
///
/// With --via yield the two threads of a pair, on one CPU, hand it to each other with
/// sched_yield instead: one context switch per call and no wakeup (neither thread sleeps),
/// the fastest context-switch storm a process can make; a round trip is then one yield by
/// each thread.
///
/// By default both threads are pinned to the same CPU (the fastest way here: a wakeup on
/// the same CPU costs no inter-processor interrupt), so every round trip is two context
/// switches between the two threads. --cpus split pins them to two CPUs, --cpus free
/// leaves them to the scheduler; --pairs N runs N such pairs at once. With --wait-signal,
/// writes PATH.ready and waits for SIGUSR1 first. Report: {"kind":"storm", "pid",
/// "round_trips" (all pairs), "pairs", "cpus", "wall_ns",
/// "round_trips_per_s", "via", "rusage_self", "process_cpu_ns"}; then sleeps --linger-ms.
#[derive(Args, Debug)]
pub struct StormArgs {
    /// Number of round trips.
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u64).range(1..))]
    round_trips: u64,
    /// Where the two threads run: same (one CPU, pinned), split (two CPUs, pinned) or free.
    #[arg(long, value_name = "HOW", default_value = "same",
          value_parser = ["same", "split", "free"])]
    cpus: String,
    /// How the threads hand the CPU over: pipes (a blocking read and a wakeup each way) or
    /// yield (sched_yield: needs --cpus same).
    #[arg(long, value_name = "HOW", default_value = "pipes", value_parser = ["pipes", "yield"])]
    via: String,
    /// Independent ping-pong pairs, each doing R round trips; with --cpus same, pair K is
    /// pinned to the K-th allowed CPU (modulo their number): two pairs on two CPUs keep both
    /// busy switching.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pairs: u32,
    /// Each ping thread first burns this much of its own CPU time, so the two threads of a
    /// pair have very different CPU totals when they start switching.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    burn_first_ms: u64,
    /// Stop each pair after this many milliseconds of ping-pong even if R round trips are
    /// not done (the report gives the round trips done).
    #[arg(long, value_name = "MS")]
    for_ms: Option<u64>,
    #[command(flatten)]
    held: Held,
}

pub fn cmd_storm(a: &StormArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        /// All pairs' round trips together.
        round_trips: u64,
        pairs: u32,
        /// CPUs of [ping, "pong"] of the first pair, or null when not pinned.
        cpus: Option<[usize; 2]>,
        wall_ns: u64,
        round_trips_per_s: f64,
        via: String,
        rusage_self: Rusage,
        process_cpu_ns: u64,
    }
    let yields = a.via == "yield";
    if yields && a.cpus != "same" {
        bail!(
            "--via yield needs --cpus same: sched_yield hands the CPU only to a thread on the same CPU"
        );
    }
    let allowed = allowed_cpus()?;
    let cpus_of = |k: usize| match (a.cpus.as_str(), &allowed[..]) {
        ("same", [_, ..]) => {
            let c = allowed[k % allowed.len()];
            Ok(Some([c, c]))
        }
        ("split", [c, d, ..]) => Ok(Some([*c, *d])),
        ("split", _) => bail!("--cpus split needs two CPUs"),
        _ => Ok(None),
    };
    let pinned: Vec<Option<[usize; 2]>> =
        (0..a.pairs as usize).map(cpus_of).collect::<Result<_>>()?;
    a.held.start()?;
    let n = a.round_trips;
    let (burn_ns, for_ms) = (a.burn_first_ms * 1_000_000, a.for_ms);
    let done = AtomicU64::new(0);
    let done = &done;
    let start = Instant::now();
    thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for (k, cpus) in pinned.iter().copied().enumerate() {
            if yields {
                let [cpu, _] = cpus.context("--via yield pins each pair")?;
                handles.extend(yield_pair(s, k, cpu, n, for_ms, burn_ns, done)?);
                continue;
            }
            let (mut r1, mut w1) = io::pipe().context("pipe")?;
            let (mut r2, mut w2) = io::pipe().context("pipe")?;
            handles.push(spawn_named(
                s,
                format!("pong-{k}"),
                move || -> Result<()> {
                    if let Some([_, cpu]) = cpus {
                        set_affinity(&[cpu])?;
                    }
                    let mut b = [0u8; 1];
                    for _ in 0..n {
                        match r1.read_exact(&mut b) {
                            // The ping side stopped at --for-ms.
                            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                            r => r.context("pong: read")?,
                        }
                        w2.write_all(&b).context("pong: write")?;
                    }
                    Ok(())
                },
            )?);
            handles.push(spawn_named(
                s,
                format!("ping-{k}"),
                move || -> Result<()> {
                    if let Some([cpu, _]) = cpus {
                        set_affinity(&[cpu])?;
                    }
                    if burn_ns > 0 {
                        burn_for_ns(burn_ns);
                    }
                    let t0 = Instant::now();
                    let deadline = for_ms.map(|ms| t0 + Duration::from_millis(ms));
                    let mut b = [0u8; 1];
                    let mut trips = 0;
                    for i in 0..n {
                        if deadline.is_some_and(|d| i % 256 == 0 && Instant::now() >= d) {
                            break;
                        }
                        w1.write_all(&[i as u8]).context("ping: write")?;
                        r2.read_exact(&mut b).context("ping: read")?;
                        trips += 1;
                    }
                    done.fetch_add(trips, Ordering::Relaxed);
                    Ok(())
                },
            )?);
        }
        for h in handles {
            join(h)??;
        }
        Ok(())
    })?;
    let wall_ns = start.elapsed().as_nanos() as u64;
    let total = done.load(Ordering::Relaxed);
    let report = Report {
        kind: "storm",
        pid: std::process::id(),
        round_trips: total,
        pairs: a.pairs,
        cpus: pinned[0],
        wall_ns,
        round_trips_per_s: total as f64 / secs(wall_ns),
        via: a.via.clone(),
        rusage_self: rusage(libc::RUSAGE_SELF),
        process_cpu_ns: process_cpu_ns(),
    };
    a.held.finish(&report)
}

/// A pair that hands one CPU back and forth with `sched_yield`: ping yields `n` times (or
/// until `for_ms`), pong until ping is done.
fn yield_pair<'s>(
    s: &'s thread::Scope<'s, '_>,
    k: usize,
    cpu: usize,
    n: u64,
    for_ms: Option<u64>,
    burn_ns: u64,
    done: &'s AtomicU64,
) -> Result<[thread::ScopedJoinHandle<'s, Result<()>>; 2]> {
    let stop = Arc::new(AtomicBool::new(false));
    let ping_stop = stop.clone();
    let pong = spawn_named(s, format!("pong-{k}"), move || -> Result<()> {
        set_affinity(&[cpu])?;
        while !stop.load(Ordering::Relaxed) {
            sched_yield();
        }
        Ok(())
    })?;
    let ping = spawn_named(s, format!("ping-{k}"), move || -> Result<()> {
        set_affinity(&[cpu])?;
        if burn_ns > 0 {
            burn_for_ns(burn_ns);
        }
        let t0 = Instant::now();
        let deadline = for_ms.map(|ms| t0 + Duration::from_millis(ms));
        let mut trips = 0;
        for i in 0..n {
            if deadline.is_some_and(|d| i % 256 == 0 && Instant::now() >= d) {
                break;
            }
            sched_yield();
            trips += 1;
        }
        ping_stop.store(true, Ordering::Relaxed);
        done.fetch_add(trips, Ordering::Relaxed);
        Ok(())
    })?;
    Ok([pong, ping])
}

fn sched_yield() {
    // SAFETY: no arguments; it cannot fail on Linux.
    unsafe { libc::sched_yield() };
}
