//! The phases several subcommands share: N threads burning CPU (`cpu`, `wait-signal`, `demo`)
//! and two threads bouncing a byte over pipes (`pingpong`, `demo`).

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::affinity::{allowed_cpus, set_affinity};
use crate::burn::burn_until_thread_cpu;
use crate::clock::{NS_PER_MS, gettid, rusage, sleep_until};
use crate::threads::{Alive, ThreadStats, join, spawn_named};

pub struct BurnPhase {
    pub threads: Vec<ThreadStats>,
    pub max_threads_alive: usize,
    pub wall_ns: u64,
}

/// `threads` threads burn `burn_ms` each; `late_threads` more start `late_delay_ms` later.
pub fn burn_phase(
    threads: u32,
    burn_ms: u64,
    late_threads: u32,
    late_delay_ms: u64,
    linger_ms: u64,
) -> Result<BurnPhase> {
    let target_ns = burn_ms * NS_PER_MS;
    let alive = Alive::new();
    let alive = &alive;
    let start = Instant::now();
    let stats = thread::scope(|s| -> Result<Vec<ThreadStats>> {
        let burner = move |late: bool| {
            move || {
                alive.enter();
                burn_until_thread_cpu(target_ns);
                let st = ThreadStats::current(Some(late));
                alive.leave();
                thread::sleep(Duration::from_millis(linger_ms));
                st
            }
        };
        let mut handles = Vec::new();
        for i in 0..threads {
            handles.push(spawn_named(s, format!("burn-{i}"), burner(false))?);
        }
        if late_threads > 0 {
            sleep_until(start + Duration::from_millis(late_delay_ms));
            for i in 0..late_threads {
                handles.push(spawn_named(s, format!("late-{i}"), burner(true))?);
            }
        }
        handles.into_iter().map(join).collect()
    })?;
    Ok(BurnPhase {
        threads: stats,
        max_threads_alive: alive.max(),
        wall_ns: start.elapsed().as_nanos() as u64,
    })
}

/// One side of the ping-pong handshake. Before each blocking read, a thread publishes its own
/// voluntary switch count (`pre`, from getrusage(RUSAGE_THREAD)) and the round number; the peer
/// then waits until the kernel's count for that thread (/proc/self/task/TID/status) exceeds
/// `pre`. That count only goes up once the kernel has committed the thread to sleep, so every
/// write lands on a blocked reader: one voluntary switch per side per round, no more, no less.
pub struct Side {
    tid: std::sync::atomic::AtomicI32,
    pre: std::sync::atomic::AtomicU64,
    round: std::sync::atomic::AtomicU64,
}

impl Side {
    pub const fn new() -> Self {
        Self {
            tid: std::sync::atomic::AtomicI32::new(0),
            pre: std::sync::atomic::AtomicU64::new(0),
            round: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Called by the thread itself just before it blocks in round `round`.
    pub fn about_to_block(&self, round: u64) {
        self.tid.store(gettid(), Ordering::Relaxed);
        self.pre
            .store(rusage(libc::RUSAGE_THREAD).nvcsw, Ordering::Relaxed);
        self.round.store(round, Ordering::Release);
    }

    /// Called by the peer: returns once the thread blocked in round `round`.
    pub fn wait_blocked(&self, round: u64, buf: &mut String) -> Result<()> {
        while self.round.load(Ordering::Acquire) < round {
            std::hint::spin_loop();
        }
        let pre = self.pre.load(Ordering::Relaxed);
        let path = format!(
            "/proc/self/task/{}/status",
            self.tid.load(Ordering::Relaxed)
        );
        loop {
            buf.clear();
            std::fs::File::open(&path)
                .and_then(|mut f| f.read_to_string(buf))
                .with_context(|| format!("read {path}"))?;
            let now: u64 = buf
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("no voluntary_ctxt_switches in {path}"))?;
            if now > pre {
                return Ok(());
            }
            std::hint::spin_loop();
        }
    }
}

pub struct PingpongPhase {
    pub threads: Vec<ThreadStats>,
    /// CPUs of the calling thread and of "pong", if they were pinned.
    pub pinned_cpus: Option<[usize; 2]>,
    pub wall_ns: u64,
}

/// The calling thread and a new thread "pong" bounce one byte `round_trips` times.
///
/// With `pin` (and at least two allowed CPUs) the two threads run on two different CPUs, so
/// that each blocks in read() instead of being preempted by the other's wakeup. The calling
/// thread's affinity is restored afterwards, so threads it starts later are not pinned.
pub fn pingpong_phase(
    round_trips: u64,
    pin: bool,
    handshake: bool,
    linger_ms: u64,
) -> Result<PingpongPhase> {
    let allowed = allowed_cpus()?;
    let pinned_cpus = match allowed[..] {
        [a, b, ..] if pin => Some([a, b]),
        _ => None,
    };
    let (mut r1, w1) = io::pipe().context("pipe")?;
    let (r2, mut w2) = io::pipe().context("pipe")?;
    let start = Instant::now();
    let (ping_side, pong_side) = (Side::new(), Side::new());
    let threads = thread::scope(|s| -> Result<Vec<ThreadStats>> {
        let (ping_side, pong_side) = (&ping_side, &pong_side);
        let pong = spawn_named(s, "pong".to_string(), move || -> Result<ThreadStats> {
            if let Some([_, cpu]) = pinned_cpus {
                set_affinity(&[cpu])?;
            }
            let mut b = [0u8; 1];
            let mut buf = String::new();
            for round in 1..=round_trips {
                if handshake {
                    pong_side.about_to_block(round);
                }
                r1.read_exact(&mut b).context("pong: read pipe 1")?;
                if handshake {
                    ping_side.wait_blocked(round, &mut buf)?;
                }
                w2.write_all(&b).context("pong: write pipe 2")?;
            }
            thread::sleep(Duration::from_millis(linger_ms));
            Ok(ThreadStats::current(None))
        })?;
        // Takes the pipe ends by value, so that on error they are closed and "pong" sees EOF
        // instead of blocking forever.
        let ping = move |mut w1: io::PipeWriter, mut r2: io::PipeReader| -> Result<ThreadStats> {
            if let Some([cpu, _]) = pinned_cpus {
                set_affinity(&[cpu])?;
            }
            let mut b = [0u8; 1];
            let mut buf = String::new();
            for round in 1..=round_trips {
                if handshake {
                    pong_side.wait_blocked(round, &mut buf)?;
                }
                w1.write_all(&[round as u8]).context("ping: write pipe 1")?;
                if handshake {
                    ping_side.about_to_block(round);
                }
                r2.read_exact(&mut b).context("ping: read pipe 2")?;
            }
            thread::sleep(Duration::from_millis(linger_ms));
            Ok(ThreadStats::current(None))
        };
        let main = ping(w1, r2);
        let pong = join(pong)?;
        Ok(vec![main?, pong?])
    });
    let wall_ns = start.elapsed().as_nanos() as u64;
    if pinned_cpus.is_some() {
        set_affinity(&allowed)?;
    }
    Ok(PingpongPhase {
        threads: threads?,
        pinned_cpus,
        wall_ns,
    })
}
