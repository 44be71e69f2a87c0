//! The target filter: which thread group is traced, and the `task_struct`
//! field offsets the loader resolved from the kernel's BTF.
//!
//! Rust has no CO-RE field relocations, so the loader reads the offsets from
//! `/sys/kernel/btf/vmlinux` and writes them into these read-only globals
//! before loading; the verifier then sees them as constants.

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
};
use cis490_common::ThreadCounters;

use crate::maps::TARGET_GONE;

#[unsafe(no_mangle)]
static TARGET_TGID: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_PID_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_TGID_OFFSET: Global<u32> = Global::new(0);
/// `task_struct.se.sum_exec_runtime`.
#[unsafe(no_mangle)]
static TASK_RUNTIME_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_NVCSW_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_NIVCSW_OFFSET: Global<u32> = Global::new(0);
/// `task_struct.se.nr_migrations`.
#[unsafe(no_mangle)]
static TASK_MIGRATIONS_OFFSET: Global<u32> = Global::new(0);
/// `task_struct.sched_info.run_delay`; 0 when the kernel has no
/// CONFIG_SCHED_INFO (then run-queue delay comes from events only).
#[unsafe(no_mangle)]
static TASK_RUN_DELAY_OFFSET: Global<u32> = Global::new(0);

/// A thread-group id no task has (pids are at most 2^22).
pub const NO_TGID: u32 = u32::MAX;

/// The traced process (thread-group id), or [`NO_TGID`] once its pid names
/// another process.
#[inline(always)]
pub fn target_tgid() -> u32 {
    match TARGET_GONE.get(0).copied() {
        Some(0) | None => TARGET_TGID.load(),
        Some(_) => NO_TGID,
    }
}

/// Whether the kernel keeps per-thread run-queue delay (`sched_info`).
#[inline(always)]
pub fn has_run_delay() -> bool {
    TASK_RUN_DELAY_OFFSET.load() != 0
}

/// `(tgid, tid)` of the current task.
#[inline(always)]
pub fn current() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// Reads a field of a kernel struct at a loader-set offset (resolved from
/// the kernel's BTF). Probe reads are fault-safe: a bad pointer is an error.
#[inline(always)]
pub fn field<T>(base: *const u8, offset: &Global<u32>) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address.
    unsafe { bpf_probe_read_kernel(base.add(offset.load() as usize).cast::<T>()) }
}

/// The thread-group id of a `struct task_struct *`.
#[inline(always)]
pub fn task_tgid(task: *const u8) -> Result<u32, i32> {
    field(task, &TASK_TGID_OFFSET)
}

/// The thread id of a `struct task_struct *`.
#[inline(always)]
pub fn task_tid(task: *const u8) -> Result<u32, i32> {
    field(task, &TASK_PID_OFFSET)
}

/// The kernel's own scheduler counters of a task.
#[inline(always)]
pub fn task_counters(task: *const u8) -> Result<ThreadCounters, i32> {
    Ok(ThreadCounters {
        runtime_ns: field(task, &TASK_RUNTIME_OFFSET)?,
        nvcsw: field(task, &TASK_NVCSW_OFFSET)?,
        nivcsw: field(task, &TASK_NIVCSW_OFFSET)?,
        run_delay_ns: if has_run_delay() {
            field(task, &TASK_RUN_DELAY_OFFSET)?
        } else {
            0
        },
        migrations: field(task, &TASK_MIGRATIONS_OFFSET)?,
        exited: 0,
        task: task as u64,
    })
}
