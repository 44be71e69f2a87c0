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
mod cgroup;
mod kvm;
mod loader;
mod maps;
mod net;
mod records;
mod sched;
mod spec;
mod targets;

pub use block::PathChoice as BlockPathChoice;
pub use loader::{Options, Plan, Probes};
pub use records::{Record, RecordStream, decode as decode_record};
pub use spec::{AttachState, FamilyStatus, KernelFacts, ProbeKind, ProbeStatus};
pub use targets::{Slot, Targets};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, MapData};
use cis490_common::{SchedStats, map};

use self::maps::open;

use crate::{
    row::{Measures, SourceKind},
    sources::{SampleCtx, Source},
    taps::Tap,
};

/// The bucket epoch the programs tag a target's per-bucket maxima with.
struct Epoch {
    map: Array<MapData, u64>,
    slot: u32,
    current: u64,
}

impl Epoch {
    /// Publishes the next epoch; returns the one that ended.
    fn advance(&mut self) -> Result<u64> {
        let ended = self.current;
        self.current += 1;
        self.map
            .set(self.slot, self.current, 0)
            .context(map::EPOCH)?;
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

    /// Opens the maps of target `slot` (thread group `pid`) and takes a
    /// first baseline. Call [`Self::rebase`] once every CPU has switched
    /// since (so a thread running at attach has its slice recorded).
    pub fn new(probes: &Probes, slot: Slot, pid: i32) -> Result<Self> {
        let epoch = Epoch {
            map: open(&probes.ebpf, map::EPOCH)?,
            slot: slot.index(),
            current: 0,
        };
        let handoff = probes.handoff.clone();
        let ebpf = &probes.ebpf;
        let sched = match handoff.sched {
            Some(attached) => sched::SchedReader::new(ebpf, slot, pid as u32, attached)?,
            None => bail!("the scheduler's task iterator is not attached"),
        };
        let block = match handoff.block {
            Some(attached) => Some(block::BlockReader::new(ebpf, slot, pid as u32, &attached)?),
            None => None,
        };
        let net = match handoff.net {
            Some(attached) => Some(net::NetReader::new(ebpf, slot, attached)?),
            None => None,
        };
        let kvm = match handoff.kvm {
            Some(attached) => Some(kvm::KvmReader::new(ebpf, slot, attached)?),
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

    /// See [`sched::SchedReader::torn_slice_reads`].
    pub fn torn_slice_reads(&self) -> u64 {
        self.sched.torn_slice_reads()
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

    /// The target's own cgroup whose I/O counts as the target's (its path),
    /// or why none does (`None`: no block family).
    pub fn own_cgroup(&self) -> Option<Result<&str, &str>> {
        self.block.as_ref().map(block::BlockReader::own_cgroup)
    }

    /// The target's block requests merged into others, so far.
    pub fn block_requests_merged(&self) -> u64 {
        self.block.as_ref().map_or(0, |b| b.merged())
    }

    /// Before the last row: waits for an exited target's last final
    /// switch-outs, and accounts what the kernel will not report any more
    /// (block requests whose completion was never delivered).
    pub fn settle(&mut self, target_gone: bool) {
        if target_gone {
            let limit = std::time::Duration::from_secs(1);
            let pending = self.sched.wait_for_final_switches(limit);
            let estimated = self.sched.sweep_exiting();
            if estimated > 0 {
                log::warn!(
                    "{estimated} exited threads of the target counted from their counters when \
                     they began to exit: the kernel ran the programs for neither their final \
                     switch-out nor their free (meta.json ebpf.exits_estimated)"
                );
            }
            if pending > estimated {
                log::warn!(
                    "the target's last threads had not left their CPUs after {limit:?}: {} \
                     final switch-outs not counted (meta.json ebpf.exits_unaccounted)",
                    pending - estimated
                );
            }
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
