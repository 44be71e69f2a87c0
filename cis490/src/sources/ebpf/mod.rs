//! The eBPF source: reads the in-kernel per-CPU aggregates of each probe
//! family at every boundary and turns them into per-bucket deltas (one
//! reader per family, in the module named for it); and the ring-buffer
//! consumer for streamed lifecycle records.
//!
//! Rows are exact whatever happens to the ring buffer: every row quantity is
//! a cumulative per-CPU counter in the kernel. Per-bucket maxima come from
//! slots tagged with the bucket epoch, which the loader advances first.

mod block;
mod kvm;
mod net;
mod sched;

use std::os::fd::AsRawFd;

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{Array, MapData, PerCpuArray, RingBuf};
use cis490_common::{
    HIST_BUCKETS, LifecycleRecord, MaxSlot, RecordKind, SchedStats, record::record_kind,
};
use tokio::io::unix::AsyncFd;

use super::{SampleCtx, Source};
use crate::{
    probes::{Plan, Probes},
    row::{Measures, SourceKind},
    taps::Tap,
};

/// Takes a map out of the loaded object.
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

/// Sums a per-CPU value over all CPUs.
fn read_percpu<T: aya::Pod>(
    map: &PerCpuArray<MapData, T>,
    name: &str,
    mut acc: T,
    add: impl Fn(&mut T, &T),
) -> Result<T> {
    for v in map.get(&0, 0).with_context(|| name.to_owned())?.iter() {
        add(&mut acc, v);
    }
    Ok(acc)
}

/// The largest value recorded for bucket epoch `ended` on any CPU.
fn max_of(slots: &PerCpuArray<MapData, MaxSlot>, ended: u64) -> Result<Option<u64>> {
    Ok(slots
        .get(&((ended & 1) as u32), 0)?
        .iter()
        .filter(|m| m.epoch == ended)
        .map(|m| m.max_ns)
        .max())
}

/// Per-bucket deltas of a log2 histogram, trailing zeros trimmed.
fn hist_delta(now: &[u64; HIST_BUCKETS], prev: &[u64; HIST_BUCKETS]) -> Vec<u64> {
    trim_zeros(
        now.iter()
            .zip(prev)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect(),
    )
}

fn trim_zeros(mut v: Vec<u64>) -> Vec<u64> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// The bucket epoch the programs tag per-bucket maxima with.
struct Epoch {
    map: Array<MapData, u64>,
    current: u64,
}

impl Epoch {
    /// Publishes the next epoch; returns the one that ended.
    fn advance(&mut self) -> Result<u64> {
        let ended = self.current;
        self.current += 1;
        self.map.set(0, self.current, 0).context("EPOCH")?;
        Ok(ended)
    }
}

/// The eBPF source.
pub struct EbpfSource {
    epoch: Epoch,
    sched: sched::SchedReader,
    block: Option<block::BlockReader>,
    net: Option<net::NetReader>,
    kvm: Option<kvm::KvmReader>,
}

impl EbpfSource {
    /// Takes the maps out of the loaded object and takes a first baseline.
    /// Call [`Self::rebase`] once every CPU has switched since (so a thread
    /// running at attach has its slice recorded).
    pub fn new(probes: &mut Probes, plan: &Plan, pid: i32) -> Result<Self> {
        let epoch = Epoch {
            map: take(probes, "EPOCH")?,
            current: 0,
        };
        let run_delay = probes
            .family("sched")
            .and_then(|f| f.path)
            .is_some_and(|p| p.contains("sched_info"));
        let sched = sched::SchedReader::new(probes, run_delay)?;
        let block = probes
            .active("block")
            .then(|| block::BlockReader::new(probes))
            .transpose()?;
        let net = match probes.family("net").filter(|f| f.active).cloned() {
            Some(status) => Some(net::NetReader::new(probes, pid, &status)?),
            None => None,
        };
        let kvm_status = probes.family("kvm").filter(|f| f.active).cloned();
        let kvm = match (&plan.kvm, kvm_status) {
            (Ok(format), Some(status)) => Some(kvm::KvmReader::new(probes, format, &status)?),
            _ => None,
        };
        let mut src = Self {
            epoch,
            sched,
            block,
            net,
            kvm,
        };
        src.rebase()?;
        Ok(src)
    }

    /// Takes the current totals as the baseline of the next row.
    pub fn rebase(&mut self) -> Result<()> {
        self.sample_with(&SampleCtx::default()).map(drop)
    }

    /// Cumulative scheduler counters so far (for meta.json and progress).
    pub fn totals(&self) -> &SchedStats {
        self.sched.totals()
    }

    /// See [`sched::SchedReader::check_visible`].
    pub fn check_visible(&mut self, pid: i32) -> Option<String> {
        self.sched.check_visible(pid)
    }

    /// Whether the target's pid went to a new process while tracing (not
    /// traced: the probes ignore it from its fork on).
    pub fn target_pid_reused(&self) -> bool {
        self.sched.target_pid_reused()
    }

    /// Block requests the kernel map could not hold, so far.
    pub fn block_map_errors(&self) -> u64 {
        self.block.as_ref().map_or(0, |b| b.map_errors())
    }

    /// Block requests whose completion was not delivered, so far.
    pub fn block_missed_completions(&self) -> u64 {
        self.block.as_ref().map_or(0, |b| b.missed_completions())
    }

    /// Before the last row: waits for an exited target's last final
    /// switch-outs, and accounts what the kernel will not report any more
    /// (block requests whose completion was never delivered).
    pub fn settle(&mut self, target_gone: bool) {
        if target_gone {
            self.sched
                .wait_for_final_switches(std::time::Duration::from_secs(1));
        }
        if let Some(b) = &mut self.block {
            b.settle(target_gone);
        }
    }

    /// Taps registered with the probes since the last call.
    pub fn take_new_taps(&mut self) -> Vec<Tap> {
        self.net
            .as_mut()
            .map(|n| n.take_new_taps())
            .unwrap_or_default()
    }

    fn sample_with(&mut self, ctx: &SampleCtx<'_>) -> Result<Measures> {
        let ended = self.epoch.advance()?;
        let mut m = Measures::default();
        self.sched.sample(ended, &mut m)?;
        if let Some(b) = &mut self.block {
            b.sample(ended, &mut m)?;
        }
        if let Some(n) = &mut self.net {
            n.sample(ctx, &mut m)?;
        }
        if let Some(k) = &mut self.kvm {
            k.sample(ctx, &mut m)?;
        }
        Ok(m)
    }
}

impl Source for EbpfSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Ebpf
    }

    fn sample(&mut self, ctx: &SampleCtx<'_>) -> Result<Measures> {
        self.sample_with(ctx)
    }
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
    fn histogram_deltas_are_trimmed() {
        assert_eq!(trim_zeros(vec![0, 3, 0, 1, 0, 0]), vec![0, 3, 0, 1]);
        assert!(trim_zeros(vec![0, 0]).is_empty());
        let mut a = [0u64; HIST_BUCKETS];
        let mut b = [0u64; HIST_BUCKETS];
        a[3] = 5;
        b[3] = 2;
        a[1] = 1;
        b[1] = 1;
        assert_eq!(hist_delta(&a, &b), vec![0, 0, 0, 3]);
    }
}
