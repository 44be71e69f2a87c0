//! The target filter: which thread group is traced, and the `task_struct`
//! field offsets the loader resolved from the kernel's BTF.
//!
//! Rust has no CO-RE field relocations, so the loader reads the offsets of
//! `task_struct.pid` and `.tgid` from `/sys/kernel/btf/vmlinux` and writes
//! them into these read-only globals before loading; the verifier then sees
//! them as constants.

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
};

#[unsafe(no_mangle)]
static TARGET_TGID: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_PID_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_TGID_OFFSET: Global<u32> = Global::new(0);

/// The traced process (thread-group id).
#[inline(always)]
pub fn target_tgid() -> u32 {
    TARGET_TGID.load()
}

/// `(tgid, tid)` of the current task.
#[inline(always)]
pub fn current() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// Reads a `u32` field of a `struct task_struct *` at a loader-set offset.
#[inline(always)]
fn task_field(task: *const u8, offset: &Global<u32>) -> Result<u32, i32> {
    // SAFETY: the offset comes from the kernel's BTF; probe reads are
    // fault-safe.
    unsafe { bpf_probe_read_kernel(task.add(offset.load() as usize).cast::<u32>()) }
}

/// The thread-group id of a `struct task_struct *`.
#[inline(always)]
pub fn task_tgid(task: *const u8) -> Result<u32, i32> {
    task_field(task, &TASK_TGID_OFFSET)
}

/// The thread id of a `struct task_struct *`.
#[inline(always)]
pub fn task_tid(task: *const u8) -> Result<u32, i32> {
    task_field(task, &TASK_PID_OFFSET)
}
