//! KVM exits of the target's vCPU threads: hardware VM exits
//! (`kvm:kvm_exit`, a classic tracepoint: its `exit_reason` field is
//! computed by the tracepoint itself, which a BTF raw tracepoint cannot see)
//! and returns to the VMM (`kvm:kvm_userspace_exit`). Field offsets come
//! from the tracepoints' format files, read by the loader.

use aya_ebpf::{
    Global,
    macros::{map, tracepoint},
    maps::PerCpuArray,
    programs::TracePointContext,
};
use cis490_common::{
    KvmStats,
    kvm::{KVM_REASON_SLOTS, USERSPACE_SLOTS, reason_slot, userspace_slot},
};

use crate::{
    maps::add,
    target::{current, target_slot},
};

/// Cumulative KVM exit counters per target slot, per CPU. Sized by the
/// loader.
#[map]
pub static KVM_STATS: PerCpuArray<KvmStats> = PerCpuArray::with_max_entries(1, 0);

#[unsafe(no_mangle)]
static KVM_EXIT_REASON_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static KVM_EXIT_ISA_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static KVM_USERSPACE_REASON_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static KVM_USERSPACE_ERRNO_OFFSET: Global<u32> = Global::new(0);

#[tracepoint]
pub fn kvm_exit(ctx: TracePointContext) -> u32 {
    let _ = try_kvm_exit(&ctx);
    0
}

fn try_kvm_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let (tgid, _) = current();
    let Some(target) = target_slot(tgid) else {
        return Ok(());
    };
    let reason: u32 = unsafe { ctx.read_at(KVM_EXIT_REASON_OFFSET.load() as usize)? };
    let isa: u32 = unsafe { ctx.read_at(KVM_EXIT_ISA_OFFSET.load() as usize)? };
    let Some(s) = KVM_STATS.get_ptr_mut(target) else {
        return Ok(());
    };
    let slot = reason_slot(reason, isa);
    unsafe {
        add(&raw mut (*s).exits, 1);
        (*s).isa = isa as u64;
        if slot < KVM_REASON_SLOTS {
            add(&raw mut (*s).by_reason[slot], 1);
        }
    }
    Ok(())
}

/// `kvm:kvm_userspace_exit`: `KVM_RUN` returns to the VMM (an exit it must
/// handle: port or MMIO I/O, halt, shutdown, ... or an interrupted run).
#[tracepoint]
pub fn kvm_userspace_exit(ctx: TracePointContext) -> u32 {
    let _ = try_userspace_exit(&ctx);
    0
}

fn try_userspace_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let (tgid, _) = current();
    let Some(target) = target_slot(tgid) else {
        return Ok(());
    };
    let reason: u32 = unsafe { ctx.read_at(KVM_USERSPACE_REASON_OFFSET.load() as usize)? };
    let errno: i32 = unsafe { ctx.read_at(KVM_USERSPACE_ERRNO_OFFSET.load() as usize)? };
    let Some(s) = KVM_STATS.get_ptr_mut(target) else {
        return Ok(());
    };
    let slot = userspace_slot(reason, errno);
    unsafe {
        add(&raw mut (*s).userspace_exits, 1);
        if slot < USERSPACE_SLOTS {
            add(&raw mut (*s).userspace_by_reason[slot], 1);
        }
    }
    Ok(())
}
