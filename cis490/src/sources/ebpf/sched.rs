//! Scheduler rows from `SCHED_STATS`, `CPU_SLICE`, `RUNQ_MAX` and `THREADS`
//! (probes in `cis490-ebpf/src/sched.rs`).

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use cis490_common::{CpuSlice, MaxSlot, SchedStats, ThreadCounters};

use super::{hist_delta, max_of, read_percpu, take};
use crate::{clock::mono_now_ns, probes::Probes, row::Measures};

/// Cumulative totals at one sample.
#[derive(Clone, Copy)]
struct Totals {
    stats: SchedStats,
    /// Completed slices plus the running part of unfinished ones.
    cpu_ns: u64,
}

pub struct SchedReader {
    stats: PerCpuArray<MapData, SchedStats>,
    slices: PerCpuArray<MapData, CpuSlice>,
    runq_max: PerCpuArray<MapData, MaxSlot>,
    prev: Totals,
    /// Threads seeded from /proc at attach (already alive then).
    base_threads: u64,
    /// Target threads and their counters (`THREADS`), seeded here.
    _threads: HashMap<MapData, u32, ThreadCounters>,
    /// Set by the probes when the target's pid went to a new process.
    gone: Array<MapData, u32>,
}

impl SchedReader {
    pub fn new(
        probes: &mut Probes,
        tids: &[u32],
        counters: impl Fn(u32) -> Option<ThreadCounters>,
    ) -> Result<Self> {
        let mut threads: HashMap<MapData, u32, ThreadCounters> = take(probes, "THREADS")?;
        let mut base_threads = 0u64;
        for &tid in tids {
            let Some(c) = counters(tid) else { continue };
            // BPF_NOEXIST: a thread the fork probe already saw is not counted twice.
            if threads.insert(tid, c, 1 /* BPF_NOEXIST */).is_ok() {
                base_threads += 1;
            }
        }
        // A thread listed but gone before it was inserted would stay forever.
        for &tid in tids {
            if counters(tid).is_none() && threads.remove(&tid).is_ok() {
                base_threads -= 1;
            }
        }
        Ok(Self {
            stats: take(probes, "SCHED_STATS")?,
            slices: take(probes, "CPU_SLICE")?,
            runq_max: take(probes, "RUNQ_MAX")?,
            prev: Totals {
                stats: SchedStats::ZERO,
                cpu_ns: 0,
            },
            base_threads,
            _threads: threads,
            gone: take(probes, "TARGET_GONE")?,
        })
    }

    /// Whether a new process got the target's pid (after the target ended)
    /// while tracing; the probes stopped matching anything then.
    pub fn target_pid_reused(&self) -> bool {
        self.gone.get(&0, 0).is_ok_and(|v| v != 0)
    }

    pub fn totals(&self) -> &SchedStats {
        &self.prev.stats
    }

    fn read(&self) -> Result<Totals> {
        let stats = read_percpu(
            &self.stats,
            "SCHED_STATS",
            SchedStats::ZERO,
            SchedStats::accumulate,
        )?;
        // After SCHED_STATS: the probe closes a slice before adding its
        // time, so in this order a slice is never counted twice.
        let slices = self.slices.get(&0, 0).context("CPU_SLICE")?;
        // Read the clock after the maps: every slice start we saw is <= now.
        let now = mono_now_ns();
        let running: u64 = slices
            .iter()
            .filter(|s| s.state == CpuSlice::TARGET)
            .map(|s| now.saturating_sub(s.since_ns))
            .sum();
        Ok(Totals {
            stats,
            cpu_ns: stats.cpu_ns.wrapping_add(running),
        })
    }

    pub fn sample(&mut self, ended: u64, m: &mut Measures) -> Result<()> {
        let cur = self.read()?;
        let max = max_of(&self.runq_max, ended).context("RUNQ_MAX")?;
        let (p, c) = (&self.prev.stats, &cur.stats);
        let d = |a: u64, b: u64| Some(a.saturating_sub(b));
        // A slice read half-updated can make the running total dip; keep the
        // cumulative value monotonic so the episode sum stays exact.
        let cpu_total = cur.cpu_ns.max(self.prev.cpu_ns);
        m.cpu_ns = Some(cpu_total - self.prev.cpu_ns);
        m.ctx_switches_voluntary = d(c.ctx_voluntary, p.ctx_voluntary);
        m.ctx_switches_involuntary = d(c.ctx_involuntary, p.ctx_involuntary);
        m.set_ctx_total();
        m.runq_delay_ns = d(c.runq_delay_ns, p.runq_delay_ns);
        m.threads = Some((self.base_threads + c.threads_started).saturating_sub(c.threads_exited));
        m.wakeups = d(c.wakeups, p.wakeups);
        m.migrations = d(c.migrations, p.migrations);
        // No delay measured in the bucket: the maximum is 0, not unknown.
        m.runq_delay_max_ns = Some(max.unwrap_or(0));
        m.runq_delay_hist_log2 = Some(hist_delta(&c.runq_hist, &p.runq_hist));
        m.events = d(c.events, p.events);
        m.dropped_events = d(c.dropped, p.dropped);
        self.prev = Totals {
            stats: cur.stats,
            cpu_ns: cpu_total,
        };
        Ok(())
    }
}
