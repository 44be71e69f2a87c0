//! The block I/O probe family (programs in `cis490-ebpf/src/block.rs`):
//! `block_io_start`/`block_io_done` where the kernel has them (6.5+), else
//! the older `block_rq_insert`/`block_rq_issue`/`block_rq_complete` (with
//! `block_bio_queue` and `block_split` marking the target's bios).
//!
//! The reader: Block I/O rows from `BLOCK_STATS` and `BLOCK_MAX` (probes in
//! `cis490-ebpf/src/block.rs`).

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
};
use cis490_common::{
    BlockStats, MaxSlot, ReqStart,
    block::{CGROUP_SLOTS_MAX, REQ_OP_READ, REQS_MAX, global, map, prog},
};

use super::{
    cgroup::{OwnCgroup, own_cgroup},
    maps::{hist_delta, max_of, open, read_percpu, take_where},
    spec::{Attacher, FamilyStatus, KernelFacts, OffsetSpec, ProbeSpec},
    targets::Slot,
};
use crate::{clock::mono_now_ns, row::Measures};

pub const FAMILY: &str = "block";

/// Which block tracepoints to use (`--block-probes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PathChoice {
    /// `block_io_*` where the kernel has them, else the `block_rq_*` fallback.
    #[default]
    Auto,
    /// `block_io_start`/`block_io_done` (Linux 6.5+).
    Io,
    /// `block_rq_insert`/`block_rq_issue`/`block_rq_complete`.
    Rq,
}

/// The path taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockPath {
    Io,
    Rq,
}

impl BlockPath {
    pub fn name(self) -> &'static str {
        match self {
            Self::Io => "block_io",
            Self::Rq => "block_rq",
        }
    }
}

pub const OFFSETS: &[OffsetSpec] = &[
    OffsetSpec {
        global: global::REQ_CMD_FLAGS_OFFSET,
        ty: "request",
        path: "cmd_flags",
    },
    OffsetSpec {
        global: global::REQ_BIO_OFFSET,
        ty: "request",
        path: "bio",
    },
    OffsetSpec {
        global: global::REQ_DATA_LEN_OFFSET,
        ty: "request",
        path: "__data_len",
    },
    OffsetSpec {
        global: global::BIO_PRIVATE_OFFSET,
        ty: "bio",
        path: "bi_private",
    },
];

/// From a bio to the id of the cgroup its I/O is charged to: optional (a
/// kernel without CONFIG_BLK_CGROUP counts each target's own threads' I/O
/// only).
pub const CGROUP_OFFSETS: &[OffsetSpec] = &[
    OffsetSpec {
        global: global::BIO_BLKG_OFFSET,
        ty: "bio",
        path: "bi_blkg",
    },
    OffsetSpec {
        global: global::BLKG_BLKCG_OFFSET,
        ty: "blkcg_gq",
        path: "blkcg",
    },
    OffsetSpec {
        global: global::BLKCG_CGROUP_OFFSET,
        ty: "blkcg",
        path: "css.cgroup",
    },
    OffsetSpec {
        global: global::CGROUP_KN_OFFSET,
        ty: "cgroup",
        path: "kn",
    },
    OffsetSpec {
        global: global::KERNFS_NODE_ID_OFFSET,
        ty: "kernfs_node",
        path: "id",
    },
];

/// The block family as attached, for its readers.
#[derive(Clone, Debug)]
pub struct Attached {
    /// Whether the programs can tell a bio's cgroup (`CGROUP_OFFSETS`).
    pub cgroups: Result<(), String>,
}

pub(super) const IO: &[ProbeSpec] = &[
    ProbeSpec::tp_btf(prog::BLOCK_IO_START),
    ProbeSpec::tp_btf(prog::BLOCK_RQ_MERGE),
    ProbeSpec::tp_btf(prog::BLOCK_RQ_ISSUE),
    ProbeSpec::tp_btf(prog::BLOCK_RQ_COMPLETE),
    ProbeSpec::tp_btf(prog::BLOCK_IO_DONE),
];
pub(super) const RQ: &[ProbeSpec] = &[
    ProbeSpec::tp_btf(prog::BLOCK_BIO_QUEUE),
    ProbeSpec::tp_btf(prog::BLOCK_SPLIT),
    ProbeSpec::tp_btf(prog::BLOCK_RQ_INSERT),
    ProbeSpec::tp_btf(prog::BLOCK_RQ_MERGE),
    ProbeSpec::tp_btf(prog::BLOCK_RQ_ISSUE),
    ProbeSpec::tp_btf(prog::BLOCK_RQ_COMPLETE),
];

/// Every program of both paths, once.
fn every_probe() -> impl Iterator<Item = &'static ProbeSpec> {
    IO.iter().chain(
        RQ.iter()
            .filter(|s| !IO.iter().any(|i| i.program == s.program)),
    )
}

fn probes(path: BlockPath) -> &'static [ProbeSpec] {
    match path {
        BlockPath::Io => IO,
        BlockPath::Rq => RQ,
    }
}

/// Picks the path before loading (it is a read-only global of the object).
pub fn plan(facts: &KernelFacts, choice: PathChoice) -> Result<BlockPath, String> {
    facts.have_offsets(OFFSETS)?;
    let has_all = |specs: &[ProbeSpec]| specs.iter().all(|s| facts.has_tracepoint(s.tracepoint));
    let (io, rq) = (has_all(IO), has_all(RQ));
    match choice {
        PathChoice::Io if io => Ok(BlockPath::Io),
        PathChoice::Io => Err("this kernel has no block_io_start/block_io_done tracepoints".into()),
        PathChoice::Rq if rq => Ok(BlockPath::Rq),
        PathChoice::Auto if io => Ok(BlockPath::Io),
        PathChoice::Auto | PathChoice::Rq if rq => Ok(BlockPath::Rq),
        _ => Err("this kernel has neither block_io_* nor block_rq_* tracepoints".into()),
    }
}

/// Attaches the planned path's programs; the path for the reader when they
/// all attached.
pub fn attach(
    a: &mut Attacher<'_>,
    plan: &Result<BlockPath, String>,
) -> (FamilyStatus, Option<BlockPath>) {
    let path = match plan {
        Ok(p) => *p,
        Err(why) => {
            for s in every_probe() {
                a.skip(FAMILY, s, why);
            }
            return (FamilyStatus::off(FAMILY, why), None);
        }
    };
    let mut failed = None;
    for s in probes(path) {
        if !a.attach(FAMILY, s) && failed.is_none() {
            failed = Some(format!("{} did not attach", s.program));
        }
    }
    for s in every_probe().filter(|s| !probes(path).iter().any(|p| p.program == s.program)) {
        a.skip(FAMILY, s, &format!("path {} taken", path.name()));
    }
    let active = failed.is_none();
    let status = FamilyStatus {
        family: FAMILY.into(),
        active,
        path: Some(path.name().into()),
        note: failed,
    };
    (status, active.then_some(path))
}

/// Changes the list of the targets' own cgroups (`CGROUP_SLOTS`) with
/// `change`, then writes how many it lists (`CGROUPS_LISTED`, which lets
/// the programs skip the cgroup lookup while none is). One change at a time
/// in the process, so the count written is never older than a change.
pub(super) fn change_cgroups<T>(
    slots: &mut HashMap<MapData, u64, u32>,
    listed: &mut Array<MapData, u32>,
    change: impl FnOnce(&mut HashMap<MapData, u64, u32>) -> Result<T>,
) -> Result<T> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = change(slots)?;
    // Only the loader changes the map, one change at a time: an exact walk.
    let n = slots
        .keys()
        .take(CGROUP_SLOTS_MAX as usize)
        .filter_map(Result::ok)
        .count();
    listed.set(0, n as u32, 0).context(map::CGROUPS_LISTED)?;
    Ok(out)
}

// ---- the reader ----------------------------------------------------------

pub struct BlockReader {
    /// The target's own cgroup whose I/O counts as the target's, or why
    /// none does.
    own_cgroup: Result<OwnCgroup, String>,
    stats: PerCpuArray<MapData, BlockStats>,
    max: PerCpuArray<MapData, MaxSlot>,
    reqs: HashMap<MapData, u64, ReqStart>,
    /// The target's slot.
    slot: u32,
    /// Requests accounted here rather than in the kernel (see `settle`).
    settled: BlockStats,
    prev: BlockStats,
    /// When `REQS` was last scanned for requests completed unseen.
    last_scan: Instant,
}

/// How often `REQS` is scanned for requests whose completion the probes
/// did not get.
const SCAN_EVERY: Duration = Duration::from_millis(250);
/// An issued request still in `REQS` this long after its issue completed
/// unseen (a device request takes milliseconds; the emulated disks here
/// tens at worst). One that was only slow is then counted here, without
/// its latency, and its late completion finds no entry: its bytes count
/// once either way.
const STALE_AFTER_NS: u64 = 2_000_000_000;

impl BlockReader {
    /// The reader of target `slot` (thread group `tgid`). Lists the
    /// target's own cgroup for the programs when it has one
    /// ([`own_cgroup`]); `Targets::remove` takes it off.
    pub fn new(ebpf: &Ebpf, slot: Slot, tgid: u32, attached: &Attached) -> Result<Self> {
        let own_cgroup = attached.cgroups.clone().and_then(|()| own_cgroup(tgid));
        if let Ok(c) = &own_cgroup {
            let (mut slots, mut listed) = (
                open(ebpf, map::CGROUP_SLOTS)?,
                open(ebpf, map::CGROUPS_LISTED)?,
            );
            change_cgroups(&mut slots, &mut listed, |s| {
                s.insert(c.id, slot.index(), 0).context(map::CGROUP_SLOTS)
            })?;
        }
        Ok(Self {
            own_cgroup,
            stats: open(ebpf, map::BLOCK_STATS)?,
            max: open(ebpf, map::BLOCK_MAX)?,
            reqs: open(ebpf, map::REQS)?,
            slot: slot.index(),
            settled: BlockStats::ZERO,
            prev: BlockStats::ZERO,
            last_scan: Instant::now(),
        })
    }

    /// The target's own cgroup whose I/O counts as the target's (its
    /// path), or why none does.
    pub fn own_cgroup(&self) -> Result<&str, &str> {
        match &self.own_cgroup {
            Ok(c) => Ok(&c.path),
            Err(why) => Err(why),
        }
    }

    pub fn map_errors(&self) -> u64 {
        self.prev.map_errors
    }

    pub fn missed_completions(&self) -> u64 {
        self.prev.missed_completions
    }

    pub fn merged(&self) -> u64 {
        self.prev.merged
    }

    /// Accounts requests still in the kernel map that were issued but never
    /// seen completing (their completion event was not delivered): all of
    /// them once the target is gone, else those issued over
    /// [`STALE_AFTER_NS`] ago. Called every [`SCAN_EVERY`] (from
    /// [`Self::sample`]) and before the last row, so such a request lands
    /// in a row a few seconds after its issue at most, not at the end.
    pub fn settle(&mut self, target_gone: bool) {
        self.last_scan = Instant::now();
        let now = mono_now_ns();
        let (slot, gone) = (self.slot, target_gone);
        let stale = take_where(&mut self.reqs, 2 * REQS_MAX, |r| {
            r.slot == slot
                && r.issued != 0
                && (gone || now.saturating_sub(r.ts_ns) > STALE_AFTER_NS)
        });
        for (_, r) in stale {
            let s = &mut self.settled;
            if r.op == REQ_OP_READ {
                s.read_bytes += r.missing_bytes();
                s.read_ops += 1;
            } else {
                s.write_bytes += r.missing_bytes();
                s.write_ops += 1;
            }
            s.missed_completions += 1;
        }
    }

    pub fn sample(&mut self, ended: u64, m: &mut Measures) -> Result<()> {
        if self.last_scan.elapsed() >= SCAN_EVERY {
            self.settle(false);
        }
        let mut c = read_percpu(
            &self.stats,
            map::BLOCK_STATS,
            self.slot,
            BlockStats::ZERO,
            BlockStats::accumulate,
        )?;
        c.accumulate(&self.settled);
        let max = max_of(&self.max, self.slot, ended).context(map::BLOCK_MAX)?;
        let p = &self.prev;
        let d = |a: u64, b: u64| Some(a.saturating_sub(b));
        m.blk_read_ops = d(c.read_ops, p.read_ops);
        m.blk_write_ops = d(c.write_ops, p.write_ops);
        m.blk_read_bytes = d(c.read_bytes, p.read_bytes);
        m.blk_write_bytes = d(c.write_bytes, p.write_bytes);
        m.blk_latency_ns_sum = d(c.latency_ns, p.latency_ns);
        m.blk_latency_max_ns = Some(max.unwrap_or(0));
        m.blk_latency_hist_log2 = Some(hist_delta(&c.latency_hist, &p.latency_hist));
        self.prev = c;
        Ok(())
    }
}
