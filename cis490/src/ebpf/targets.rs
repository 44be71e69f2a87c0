//! The traced thread groups and their slots in the per-target maps
//! (`cis490_common::target`): the loader's side of `TARGETS`, the target
//! filter and its count of changes (`TARGETS_DATA`), `TARGET_GONE` and
//! `EPOCH`. A standalone trace has one slot; a
//! server as many as `--max-targets`, each given to an episode and taken
//! back when it ends.

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData},
};
use cis490_common::{
    ReqStart,
    block::{BIOS_MAX, CGROUP_SLOTS_MAX, REQS_MAX, map as block_map},
    map,
    sched::{EXITING_MAX, ExitingThread, map as sched_map},
    target::{TargetsData, filter_bit},
};

use super::{
    block::change_cgroups,
    maps::{open, take_where},
};

/// A target's slot: the index of its entries in every per-target map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot(pub(super) u32);

impl Slot {
    pub fn index(self) -> u32 {
        self.0
    }
}

/// The table of traced thread groups, kept in the kernel's maps.
pub struct Targets {
    map: HashMap<MapData, u32, u32>,
    /// The programs' global of the filter and the count of changes, and
    /// what this loader last wrote there (it is the only writer).
    data: Array<MapData, TargetsData>,
    written: Box<TargetsData>,
    gone: Array<MapData, u32>,
    epoch: Array<MapData, u64>,
    /// Block requests in flight and bio marks, each with its slot: a freed
    /// slot's are forgotten before the slot is given again.
    reqs: HashMap<MapData, u64, ReqStart>,
    bios: HashMap<MapData, u64, u32>,
    /// The targets' own cgroups (listed by the block reader) and their
    /// count.
    cgroups: HashMap<MapData, u64, u32>,
    cgroups_listed: Array<MapData, u32>,
    /// Exiting threads not counted yet, each with its slot: a freed slot's
    /// are forgotten too (else one whose final switch-out and free the
    /// programs both missed would stay listed for the server's life).
    exiting: HashMap<MapData, u64, ExitingThread>,
    /// The tgid in each slot, if any.
    tgids: Vec<Option<u32>>,
}

impl Targets {
    /// The table of a loaded object with `slots` slots per target map.
    pub fn new(ebpf: &Ebpf, slots: u32) -> Result<Self> {
        Ok(Self {
            map: open(ebpf, map::TARGETS)?,
            data: open(ebpf, map::TARGETS_DATA)?,
            written: Box::new(TargetsData::ZERO),
            gone: open(ebpf, map::TARGET_GONE)?,
            epoch: open(ebpf, map::EPOCH)?,
            reqs: open(ebpf, block_map::REQS)?,
            bios: open(ebpf, block_map::BIOS)?,
            cgroups: open(ebpf, block_map::CGROUP_SLOTS)?,
            cgroups_listed: open(ebpf, block_map::CGROUPS_LISTED)?,
            exiting: open(ebpf, sched_map::EXITING)?,
            tgids: vec![None; slots as usize],
        })
    }

    /// Traces thread group `tgid` from now on, in a free slot: its
    /// pid-reuse flag and epoch reset first, then its entry, then its filter
    /// bit (so no program sees a half-made target).
    pub fn add(&mut self, tgid: u32) -> Result<Slot> {
        if self.tgids.contains(&Some(tgid)) {
            bail!("pid {tgid} is traced already");
        }
        let Some(i) = self.tgids.iter().position(Option::is_none) else {
            bail!(
                "{} targets are traced already (the most this tracer takes)",
                self.tgids.len()
            );
        };
        let slot = i as u32;
        self.gone.set(slot, 0, 0).context(map::TARGET_GONE)?;
        self.epoch.set(slot, 0, 0).context(map::EPOCH)?;
        self.map.insert(tgid, slot, 0).context(map::TARGETS)?;
        // The count first, then the bit, in two writes (one copy does not
        // order its stores): a program that sees the bit sees the count.
        self.written.generation = self.written.generation.wrapping_add(1);
        self.write()?;
        let (word, bit) = filter_bit(tgid);
        self.written.filter[word as usize] |= bit;
        self.write()?;
        self.tgids[i] = Some(tgid);
        Ok(Slot(slot))
    }

    /// Stops tracing the thread group in `slot` and frees the slot. Its
    /// filter bit stays set while another target shares it. Its block
    /// requests still in flight, its bio marks and its own cgroup are
    /// forgotten before the slot is free, so that none completes into the next target given it,
    /// and so are its threads listed as exiting (their episode has had its
    /// last row).
    pub fn remove(&mut self, slot: Slot) -> Result<()> {
        let Some(tgid) = self.tgid(slot) else {
            return Ok(());
        };
        let (word, bit) = filter_bit(tgid);
        let shared = self
            .tgids
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != slot.0 as usize)
            .filter_map(|(_, t)| *t)
            .any(|t| filter_bit(t) == (word, bit));
        if !shared {
            self.written.filter[word as usize] &= !bit;
            self.write()?;
        }
        // Only the loader adds and removes entries; the count after the
        // entry is gone, so that no answer cached meanwhile outlives it.
        self.map.remove(&tgid).context(map::TARGETS)?;
        self.written.generation = self.written.generation.wrapping_add(1);
        self.write()?;
        // No program adds entries of the slot any more.
        let mine = |s: u32| s == slot.0;
        take_where(&mut self.reqs, 2 * REQS_MAX, |r| mine(r.slot));
        take_where(&mut self.bios, 2 * BIOS_MAX, |&s| mine(s));
        change_cgroups(&mut self.cgroups, &mut self.cgroups_listed, |c| {
            Ok(take_where(c, 2 * CGROUP_SLOTS_MAX, |&s| mine(s)))
        })?;
        take_where(&mut self.exiting, 2 * EXITING_MAX, |e| mine(e.slot));
        self.tgids[slot.0 as usize] = None;
        Ok(())
    }

    /// Writes the filter and the count as this loader holds them (whole:
    /// the programs never write them).
    fn write(&mut self) -> Result<()> {
        self.data
            .set(0, *self.written, 0)
            .context(map::TARGETS_DATA)
    }

    /// The thread group traced in `slot`.
    pub fn tgid(&self, slot: Slot) -> Option<u32> {
        self.tgids.get(slot.0 as usize).copied().flatten()
    }

    /// Targets traced now.
    pub fn len(&self) -> usize {
        self.tgids.iter().flatten().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
