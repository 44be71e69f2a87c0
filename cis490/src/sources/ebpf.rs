//! The eBPF source: reads the in-kernel per-CPU aggregates at each boundary
//! and turns them into per-bucket deltas; and the ring-buffer consumer for
//! streamed lifecycle records.
//!
//! Rows are exact whatever happens to the ring buffer: every row quantity is
//! a cumulative per-CPU counter in the kernel. On-CPU time of a slice that
//! is still running at the boundary is added from `CPU_SLICE` (`now -
//! since`), so a thread that never leaves the CPU is counted bucket by
//! bucket. The per-bucket maximum comes from the `RUNQ_MAX` slot of the epoch
//! that just ended; the loader publishes the next epoch first.

use std::os::fd::AsRawFd;

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use cis490_common::{
    CpuSlice, LifecycleRecord, MaxSlot, RecordKind, SchedStats, ThreadCounters, record::record_kind,
};
use tokio::io::unix::AsyncFd;

use super::Source;
use crate::{
    clock::mono_now_ns,
    probes::Probes,
    row::{Measures, SourceKind},
};

/// Cumulative totals at one sample.
#[derive(Clone, Copy)]
struct Totals {
    stats: SchedStats,
    /// Completed slices plus the running part of unfinished ones.
    cpu_ns: u64,
}

/// The eBPF source.
pub struct EbpfSource {
    stats: PerCpuArray<MapData, SchedStats>,
    slices: PerCpuArray<MapData, CpuSlice>,
    runq_max: PerCpuArray<MapData, MaxSlot>,
    epoch_map: Array<MapData, u64>,
    epoch: u64,
    prev: Totals,
    /// Threads seeded from /proc at attach (already alive then).
    base_threads: u64,
    /// Target threads and their counters (`THREADS`), seeded here.
    _threads: HashMap<MapData, u32, ThreadCounters>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    probes: &mut Probes,
    name: &str,
) -> Result<T> {
    let map = probes
        .ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} not in the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}

impl EbpfSource {
    /// Takes the maps out of the loaded object and seeds the thread map with
    /// the target's current threads and their counters (`counters(tid)`,
    /// from /proc; `None` for a thread that is gone). Call [`Self::rebase`]
    /// once every CPU has switched since (a running thread's /proc counters
    /// lag until its next switch-out).
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
        let mut src = Self {
            stats: take(probes, "SCHED_STATS")?,
            slices: take(probes, "CPU_SLICE")?,
            runq_max: take(probes, "RUNQ_MAX")?,
            epoch_map: take(probes, "EPOCH")?,
            epoch: 0,
            prev: Totals {
                stats: SchedStats::ZERO,
                cpu_ns: 0,
            },
            base_threads,
            _threads: threads,
        };
        src.rebase()?;
        Ok(src)
    }

    /// Takes the current totals as the baseline of the next row.
    pub fn rebase(&mut self) -> Result<()> {
        self.prev = self.read()?.0;
        Ok(())
    }

    /// Publishes the next epoch, then reads the cumulative totals and the
    /// maximum of the epoch that ended.
    fn read(&mut self) -> Result<(Totals, Option<u64>)> {
        let ended = self.epoch;
        self.epoch += 1;
        self.epoch_map.set(0, self.epoch, 0).context("EPOCH")?;

        let mut stats = SchedStats::ZERO;
        for cpu in self.stats.get(&0, 0).context("SCHED_STATS")?.iter() {
            stats.accumulate(cpu);
        }
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
        let max = self
            .runq_max
            .get(&((ended & 1) as u32), 0)
            .context("RUNQ_MAX")?
            .iter()
            .filter(|m| m.epoch == ended)
            .map(|m| m.max_ns)
            .max();
        let totals = Totals {
            stats,
            cpu_ns: stats.cpu_ns.wrapping_add(running),
        };
        Ok((totals, max))
    }

    /// Cumulative kernel counters so far (for meta.json and progress).
    pub fn totals(&self) -> &SchedStats {
        &self.prev.stats
    }
}

impl Source for EbpfSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Ebpf
    }

    fn sample(&mut self) -> Result<Measures> {
        let (cur, max) = self.read()?;
        let p = &self.prev.stats;
        let c = &cur.stats;
        let d = |a: u64, b: u64| a.saturating_sub(b);
        // A slice read half-updated can make the running total dip; keep the
        // cumulative value monotonic so the episode sum stays exact.
        let cpu_total = cur.cpu_ns.max(self.prev.cpu_ns);
        let hist: Vec<u64> = trim_zeros(
            c.runq_hist
                .iter()
                .zip(p.runq_hist.iter())
                .map(|(a, b)| d(*a, *b))
                .collect(),
        );
        let m = Measures {
            cpu_ns: Some(cpu_total - self.prev.cpu_ns),
            ctx_switches_voluntary: Some(d(c.ctx_voluntary, p.ctx_voluntary)),
            ctx_switches_involuntary: Some(d(c.ctx_involuntary, p.ctx_involuntary)),
            runq_delay_ns: Some(d(c.runq_delay_ns, p.runq_delay_ns)),
            threads: Some((self.base_threads + c.threads_started).saturating_sub(c.threads_exited)),
            wakeups: Some(d(c.wakeups, p.wakeups)),
            migrations: Some(d(c.migrations, p.migrations)),
            // No delay measured in the bucket: the maximum is 0, not unknown.
            runq_delay_max_ns: Some(max.unwrap_or(0)),
            runq_delay_hist_log2: Some(hist),
            events: Some(d(c.events, p.events)),
            dropped_events: Some(d(c.dropped, p.dropped)),
        };
        self.prev = Totals {
            stats: cur.stats,
            cpu_ns: cpu_total,
        };
        Ok(m)
    }
}

fn trim_zeros(mut v: Vec<u64>) -> Vec<u64> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// A decoded ring-buffer record.
#[derive(Clone, Debug)]
pub enum Record {
    Lifecycle(LifecycleRecord),
}

/// The ring-buffer consumer: wakes up when records are ready.
pub struct RecordStream {
    ring: AsyncFd<RingBuf<MapData>>,
    pub received: u64,
    pub undecodable: u64,
}

impl RecordStream {
    pub fn new(probes: &mut Probes) -> Result<Self> {
        let ring: RingBuf<MapData> = take(probes, "RECORDS")?;
        Ok(Self {
            ring: crate::fdwatch::readable(ring)
                .context("registering the ring buffer with the event loop")?,
            received: 0,
            undecodable: 0,
        })
    }

    /// Waits until the ring buffer has data.
    pub async fn readable(&mut self) -> Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        guard.clear_ready();
        Ok(())
    }

    /// Hands every record now in the ring buffer to `f`. Records that do not
    /// decode are counted (and logged once in a while), never silently lost.
    pub fn drain(&mut self, mut f: impl FnMut(Record)) {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            self.received += 1;
            let bytes: &[u8] = &item;
            let decoded = record_kind(bytes).and_then(|k| match k {
                RecordKind::Lifecycle => LifecycleRecord::try_from(bytes).map(Record::Lifecycle),
            });
            match decoded {
                Ok(r) => f(r),
                Err(e) => {
                    self.undecodable += 1;
                    if self.undecodable.is_power_of_two() {
                        log::warn!(
                            "undecodable ring-buffer record ({e}); {} so far",
                            self.undecodable
                        );
                    }
                }
            }
        }
    }

    pub fn fd(&self) -> i32 {
        self.ring.get_ref().as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_tail_is_trimmed() {
        assert_eq!(trim_zeros(vec![0, 3, 0, 1, 0, 0]), vec![0, 3, 0, 1]);
        assert!(trim_zeros(vec![0, 0]).is_empty());
    }
}
