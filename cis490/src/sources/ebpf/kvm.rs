//! KVM rows from `KVM_STATS` (probes in `cis490-ebpf/src/kvm.rs`), named
//! with the kernel's own reason names. `null` while the target holds no KVM
//! VM, and for a kind of exit this kernel cannot report.

use std::collections::BTreeMap;

use anyhow::Result;
use aya::maps::{MapData, PerCpuArray};
use cis490_common::{
    KvmStats,
    kvm::{USERSPACE_ERROR_SLOT, USERSPACE_RESTART_SLOT, slot_reason},
};

use super::{SampleCtx, read_percpu, take};
use crate::{
    probes::{FamilyStatus, Probes, kvm},
    row::Measures,
};

pub struct KvmReader {
    stats: PerCpuArray<MapData, KvmStats>,
    hw: Option<kvm::HwExits>,
    userspace: Option<kvm::UserspaceExits>,
    prev: KvmStats,
}

/// Non-zero per-slot deltas, by name.
fn named(now: &[u64], prev: &[u64], name: impl Fn(usize) -> String) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (slot, (a, b)) in now.iter().zip(prev).enumerate() {
        let n = a.saturating_sub(*b);
        if n > 0 {
            *out.entry(name(slot)).or_insert(0) += n;
        }
    }
    out
}

impl KvmReader {
    pub fn new(
        probes: &mut Probes,
        format: &kvm::KvmFormat,
        status: &FamilyStatus,
    ) -> Result<Self> {
        Ok(Self {
            stats: take(probes, "KVM_STATS")?,
            hw: kvm::hw_active(status)
                .then(|| format.hw.clone().ok())
                .flatten(),
            userspace: kvm::userspace_active(status)
                .then(|| format.userspace.clone().ok())
                .flatten(),
            prev: KvmStats::ZERO,
        })
    }

    pub fn sample(&mut self, ctx: &SampleCtx<'_>, m: &mut Measures) -> Result<()> {
        let c = read_percpu(
            &self.stats,
            "KVM_STATS",
            KvmStats::ZERO,
            KvmStats::accumulate,
        )?;
        let p = &self.prev;
        let any = c.exits != p.exits || c.userspace_exits != p.userspace_exits;
        if ctx.holdings.kvm_vm || any {
            if let Some(hw) = &self.hw {
                let isa = c.isa as u32;
                m.kvm_exits = Some(c.exits.saturating_sub(p.exits));
                m.kvm_exit_reasons = Some(named(&c.by_reason, &p.by_reason, |slot| {
                    slot_reason(slot, isa)
                        .map_or_else(|| "other".to_owned(), |code| hw.reason_name(isa, code))
                }));
            }
            if let Some(u) = &self.userspace {
                m.kvm_userspace_exits = Some(c.userspace_exits.saturating_sub(p.userspace_exits));
                m.kvm_userspace_exit_reasons = Some(named(
                    &c.userspace_by_reason,
                    &p.userspace_by_reason,
                    |slot| match slot {
                        USERSPACE_RESTART_SLOT => "restart".to_owned(),
                        USERSPACE_ERROR_SLOT => "error".to_owned(),
                        code => u.reason_name(code as u32),
                    },
                ));
            }
        }
        self.prev = c;
        Ok(())
    }
}
