//! The eBPF side of the tracer: the loader ([`loader`]: the embedded
//! object, the kernel facts from BTF, each family's plan, load and attach)
//! and the eBPF source ([`EbpfSource`]), which reads the in-kernel per-CPU
//! aggregates of each probe family at every boundary and turns them into
//! per-bucket deltas. Everything about one family (its programs, struct
//! offsets, path decision, attach and reader) is in the module named for
//! it: [`sched`], [`block`], [`net`], [`kvm`]; the names and layouts the
//! kernel side shares are in `cis490_common::<family>`, its programs and
//! maps in `cis490-ebpf/src/<family>.rs`. [`records`] consumes the ring
//! buffer of streamed lifecycle records.
//!
//! Rows are exact whatever happens to the ring buffer: every row quantity is
//! a cumulative per-CPU counter in the kernel. Per-bucket maxima come from
//! slots tagged with the bucket epoch, which the loader advances first.

mod block;
mod btf;
mod kvm;
mod loader;
mod net;
mod records;
mod sched;

pub use block::PathChoice as BlockPathChoice;
pub use loader::{
    AttachState, FamilyStatus, KernelFacts, Options, Plan, ProbeKind, ProbeStatus, Probes,
};
pub use records::{Record, RecordStream};

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{Array, MapData, PerCpuArray};
use cis490_common::{HIST_BUCKETS, MaxSlot, SchedStats, map};

use crate::{
    row::{Measures, SourceKind},
    sources::{SampleCtx, Source},
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
        self.map.set(0, self.current, 0).context(map::EPOCH)?;
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
    /// The scheduler family's name in meta.json (`families`).
    pub const SCHED_FAMILY: &'static str = sched::FAMILY;

    /// Takes the maps out of the loaded object and takes a first baseline.
    /// Call [`Self::rebase`] once every CPU has switched since (so a thread
    /// running at attach has its slice recorded).
    pub fn new(probes: &mut Probes, pid: i32) -> Result<Self> {
        let epoch = Epoch {
            map: take(probes, map::EPOCH)?,
            current: 0,
        };
        let sched = sched::SchedReader::new(probes)?;
        let block = match probes.handoff.block.take() {
            Some(_) => Some(block::BlockReader::new(probes)?),
            None => None,
        };
        let net = match probes.handoff.net.take() {
            Some(attached) => Some(net::NetReader::new(probes, pid, attached)?),
            None => None,
        };
        let kvm = match probes.handoff.kvm.take() {
            Some(attached) => Some(kvm::KvmReader::new(probes, attached)?),
            None => None,
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
