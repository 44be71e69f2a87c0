//! The targets: which thread groups are traced, each with its slot in the
//! per-target maps (`cis490_common::target`), and the kernel struct field
//! offsets the loader resolved from the kernel's BTF.
//!
//! Rust has no CO-RE field relocations, so the loader reads the offsets from
//! `/sys/kernel/btf/vmlinux` and writes them into these read-only globals
//! before loading; the verifier then sees them as constants. That makes a
//! field of a BTF-typed pointer (a `tp_btf` argument, an iterator's task)
//! one load instruction ([`load`]), which the verifier checks against the
//! kernel's BTF, instead of a `bpf_probe_read_kernel` helper call: the
//! `sched_switch` program runs on every context switch of the machine.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::map,
    maps::{Array, HashMap},
};
use cis490_common::{
    CpuSlice, ThreadCounters,
    sched::RunDelaySource,
    target::{TargetsData, filter_bit},
};

/// The traced thread groups: tgid -> target slot (`cis490_common::target`).
/// Sized by the loader.
#[map]
pub static TARGETS: HashMap<u32, u32> = HashMap::with_max_entries(1, 0);

/// The target filter (a bit per tgid modulo `FILTER_BITS`, set by the
/// loader for every traced tgid) and the loader's count of changes of
/// `TARGETS`. A global, not a map of its own, so that reading it is a load,
/// not a lookup: the filter runs on every context switch of the machine.
/// The loader writes it whole, through the map of its data section
/// (`map::TARGETS_DATA`); no program writes it.
#[unsafe(no_mangle)]
#[unsafe(link_section = ".data.targets")]
static mut TARGETS_DATA: TargetsData = TargetsData::ZERO;

/// Raised by the new-task probe each time it marks a slot gone, after the
/// mark: with the loader's count it makes the count a cached answer is
/// checked against ([`target_slot_cached`]). Only programs write it (the
/// loader writes its own count whole, which would undo a raise here).
#[unsafe(no_mangle)]
#[unsafe(link_section = ".bss.gone")]
static mut GONE_COUNT: u64 = 0;

/// Per target slot: set to 1 by the new-task probe when a new process gets
/// the target's pid: the target is gone and its pid reused. From then on no
/// task matches that slot ([`target_slot`]). Sized by the loader.
#[map]
pub static TARGET_GONE: Array<u32> = Array::with_max_entries(1, 0);

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
/// `task_struct.min_flt`, `task_struct.maj_flt`: the thread's page faults.
#[unsafe(no_mangle)]
static TASK_MIN_FLT_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_MAJ_FLT_OFFSET: Global<u32> = Global::new(0);
/// `task_struct.ioac.write_bytes`: the thread's bytes dirtied in the page
/// cache or written with direct I/O; 0 when the kernel has no
/// CONFIG_TASK_IO_ACCOUNTING (the member is never at offset 0).
#[unsafe(no_mangle)]
static TASK_IO_WRITE_BYTES_OFFSET: Global<u32> = Global::new(0);
/// `task_struct.__state` (the task iterator skips `TASK_DEAD` threads).
#[unsafe(no_mangle)]
static TASK_STATE_OFFSET: Global<u32> = Global::new(0);
/// `task_struct.thread_info.cpu`: the CPU a thread is (or last was) on.
#[unsafe(no_mangle)]
static TASK_CPU_OFFSET: Global<u32> = Global::new(0);
/// `task_struct.on_cpu`: 1 from switch-in until just after switch-out.
#[unsafe(no_mangle)]
static TASK_ON_CPU_OFFSET: Global<u32> = Global::new(0);
/// `task_struct.flags`.
#[unsafe(no_mangle)]
static TASK_FLAGS_OFFSET: Global<u32> = Global::new(0);
/// `task_struct.sched_info.last_queued`: when the thread was queued on a
/// run queue (rq clock); 0 when not queued. These last four are 0 where the
/// kernel lacks them: single run-queue delays then come from events.
#[unsafe(no_mangle)]
static TASK_LAST_QUEUED_OFFSET: Global<u32> = Global::new(0);
/// `task_struct.se.cfs_rq` (CONFIG_FAIR_GROUP_SCHED).
#[unsafe(no_mangle)]
static TASK_CFS_RQ_OFFSET: Global<u32> = Global::new(0);
/// `cfs_rq.rq`.
#[unsafe(no_mangle)]
static CFS_RQ_RQ_OFFSET: Global<u32> = Global::new(0);
/// `rq.clock`.
#[unsafe(no_mangle)]
static RQ_CLOCK_OFFSET: Global<u32> = Global::new(0);
/// `task_struct.se.exec_start`: when the kernel last added a running
/// thread's time to `sum_exec_runtime` (on `rq.clock_task`).
#[unsafe(no_mangle)]
static TASK_EXEC_START_OFFSET: Global<u32> = Global::new(0);
/// `rq.clock_task`: the run queue's clock less IRQ and steal time (where
/// the kernel accounts them), the clock `sum_exec_runtime` advances on.
/// These two are 0 where the kernel lacks them (never at offset 0).
#[unsafe(no_mangle)]
static RQ_CLOCK_TASK_OFFSET: Global<u32> = Global::new(0);
/// Where run-queue delays come from (`cis490_common::sched::RunDelaySource`),
/// decided by the loader.
#[unsafe(no_mangle)]
static RUN_DELAY_SOURCE: Global<u32> = Global::new(0);

/// The target slot of thread group `tgid`, if it is traced: the filter
/// rejects almost every task of the machine with one inlined array load
/// whatever the number of targets; only a set bit costs the `TARGETS`
/// lookup. Not once the target's pid went to a new process
/// (`TARGET_GONE`).
#[inline(always)]
pub fn target_slot(tgid: u32) -> Option<u32> {
    let slot = traced_slot(tgid)?;
    (!target_gone(slot)).then_some(slot)
}

/// [`target_slot`] for `sched_switch`, through this CPU's cached answer in
/// its slice record (see `CpuSlice::cache_tgid`): the `TARGETS` lookup (and
/// `TARGET_GONE`'s) only when the tgid or the count of changes differs.
/// Only for a program that runs with interrupts off (nothing else writes
/// the cache meanwhile). `CpuSlice::NO_SLOT` when `tgid` is not traced.
#[inline(always)]
pub fn target_slot_cached(tgid: u32, cache: &mut CpuSlice) -> u32 {
    if !may_be_target(tgid) {
        return CpuSlice::NO_SLOT;
    }
    let count = changes();
    if cache.cache_tgid == tgid && cache.cache_gen == count {
        cache.cache_slot
    } else {
        // The count before the lookup: a change after it raises the count
        // again, so the answer is asked again.
        let slot = target_slot(tgid).unwrap_or(CpuSlice::NO_SLOT);
        cache.cache_tgid = tgid;
        cache.cache_slot = slot;
        cache.cache_gen = count;
        slot
    }
}

/// The count of changes a cached answer of [`target_slot_cached`] holds
/// for: the loader's count plus the gone marks' (both only grow, so the
/// sum moves whenever either does). The loader's count is read first, then
/// the marks': the new-task probe raises its count after it marked the slot
/// gone, so an answer that missed the mark holds an older count (x86 keeps
/// loads in order, and stores).
#[inline(always)]
fn changes() -> u64 {
    // SAFETY: globals of the programs' data sections (map values), aligned.
    let loader = unsafe { core::ptr::read_volatile(&raw const TARGETS_DATA.generation) };
    let gone = unsafe { core::ptr::read_volatile(&raw const GONE_COUNT) };
    loader.wrapping_add(gone)
}

/// Marks target slot `slot` gone (its pid went to a new process): the flag
/// first, then the count every cached answer is checked against.
#[inline(always)]
pub fn mark_gone(slot: u32) {
    if let Some(gone) = TARGET_GONE.get_ptr_mut(slot) {
        // SAFETY: a map value pointer, valid for this program run.
        unsafe { core::ptr::write_volatile(gone, 1) };
        // SAFETY: a global of the programs' data (a map value), aligned.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut GONE_COUNT, 1) };
    }
}

/// The target slot of `tgid`, gone or not (the new-task probe marks a slot
/// gone).
#[inline(always)]
pub fn traced_slot(tgid: u32) -> Option<u32> {
    if !may_be_target(tgid) {
        return None;
    }
    // SAFETY: a copy of the value, read at once.
    unsafe { TARGETS.get(tgid) }.copied()
}

/// Whether the filter lets `tgid` through (a clear bit: not a target).
#[inline(always)]
pub fn may_be_target(tgid: u32) -> bool {
    let (word, bit) = filter_bit(tgid);
    // SAFETY: `word` < FILTER_WORDS (`filter_bit`); a global of the
    // programs' data (a map value), aligned.
    let w = unsafe {
        core::ptr::read_volatile(
            (&raw const TARGETS_DATA.filter)
                .cast::<u64>()
                .add(word as usize),
        )
    };
    w & bit != 0
}

/// Whether target slot `slot`'s pid went to a new process (`TARGET_GONE`).
#[inline(always)]
pub fn target_gone(slot: u32) -> bool {
    TARGET_GONE.get(slot).copied().unwrap_or(0) != 0
}

/// Whether the kernel keeps per-thread run-queue delay (`sched_info`).
#[inline(always)]
pub fn has_run_delay() -> bool {
    RUN_DELAY_SOURCE.load() != RunDelaySource::WakeupMarks as u32
}

/// Whether a single run-queue delay can be read off the kernel's own
/// `sched_info` at switch-in (`rq->clock - last_queued`, exactly what the
/// kernel then adds to `run_delay`), instead of timing it from the wakeup.
#[inline(always)]
pub fn delays_from_sched_info() -> bool {
    RUN_DELAY_SOURCE.load() == RunDelaySource::SchedInfo as u32
}

/// `(tgid, tid)` of the current task.
#[inline(always)]
pub fn current() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// Reads a field of a kernel struct at a loader-set offset (resolved from
/// the kernel's BTF). Probe reads are fault-safe: a bad pointer is an error.
/// For pointers that are not BTF-typed (read out of other structs).
#[inline(always)]
pub fn field<T>(base: *const u8, offset: &Global<u32>) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address.
    unsafe { bpf_probe_read_kernel(base.add(offset.load() as usize).cast::<T>()) }
}

/// Loads a field of a BTF-typed kernel pointer (a `tp_btf` argument, an
/// iterator's task, or a pointer loaded from one) directly: the offset is a
/// read-only global the verifier sees as a constant, so this is one load
/// instruction, checked against the kernel's BTF when the program loads.
#[inline(always)]
pub fn load<T>(base: *const u8, offset: &Global<u32>) -> T {
    // SAFETY: `base` is a BTF-typed kernel pointer; the verifier checks the
    // access (and makes loads through untrusted pointers fault-safe).
    unsafe { core::ptr::read_volatile(base.add(offset.load() as usize).cast::<T>()) }
}

/// The thread-group id of a `struct task_struct *`.
#[inline(always)]
pub fn task_tgid(task: *const u8) -> u32 {
    load(task, &TASK_TGID_OFFSET)
}

/// The thread id of a `struct task_struct *`.
#[inline(always)]
pub fn task_tid(task: *const u8) -> u32 {
    load(task, &TASK_PID_OFFSET)
}

/// `task_struct.__state`.
#[inline(always)]
pub fn task_state(task: *const u8) -> u32 {
    load(task, &TASK_STATE_OFFSET)
}

/// `PF_EXITING` in `task_struct.flags`: set as a thread begins to exit,
/// before `sched_process_exit`.
const PF_EXITING: u32 = 0x4;

/// Whether a task began to exit.
#[inline(always)]
pub fn task_exiting(task: *const u8) -> bool {
    load::<u32>(task, &TASK_FLAGS_OFFSET) & PF_EXITING != 0
}

/// The CPU a task is on (or last ran on).
#[inline(always)]
pub fn task_cpu(task: *const u8) -> u32 {
    load(task, &TASK_CPU_OFFSET)
}

/// Whether a task is on a CPU (until just after its switch-out).
#[inline(always)]
pub fn task_on_cpu(task: *const u8) -> bool {
    load::<u32>(task, &TASK_ON_CPU_OFFSET) != 0
}

/// `se.sum_exec_runtime` of a task, ns.
#[inline(always)]
pub fn task_runtime(task: *const u8) -> u64 {
    load(task, &TASK_RUNTIME_OFFSET)
}

/// The clock of the run queue a task being switched in is on (`rq->clock`,
/// ns, the scheduler's clock: brought up to date by this `__schedule`).
/// Only call when [`delays_from_sched_info`]. A NULL pointer on the way
/// reads 0 (fault-safe loads).
#[inline(always)]
pub fn rq_clock(next: *const u8) -> u64 {
    load(task_rq(next), &RQ_CLOCK_OFFSET)
}

/// The run queue a task is on (`se.cfs_rq->rq`).
#[inline(always)]
fn task_rq(task: *const u8) -> *const u8 {
    let cfs_rq: *const u8 = load(task, &TASK_CFS_RQ_OFFSET);
    load(cfs_rq, &CFS_RQ_RQ_OFFSET)
}

/// Whether a running thread's time since the kernel last updated its
/// runtime can be read ([`task_exec_start`], [`rq_clocks`]).
#[inline(always)]
pub fn has_exec_start() -> bool {
    TASK_EXEC_START_OFFSET.load() != 0 && RQ_CLOCK_TASK_OFFSET.load() != 0
}

/// `se.exec_start` of a task: where its `sum_exec_runtime` was last brought
/// up to date, on its run queue's `clock_task`. Only call when
/// [`has_exec_start`].
#[inline(always)]
pub fn task_exec_start(task: *const u8) -> u64 {
    load(task, &TASK_EXEC_START_OFFSET)
}

/// `(rq->clock_task, rq->clock)` of the run queue a task is on, read in
/// that order: the kernel writes `clock` first, so a `clock_task` that is
/// already new comes with a new `clock` (x86 keeps stores and loads in
/// order; the loads are volatile). Only call when [`has_exec_start`] and
/// [`delays_from_sched_info`].
#[inline(always)]
pub fn rq_clocks(task: *const u8) -> (u64, u64) {
    let rq = task_rq(task);
    let clock_task = load(rq, &RQ_CLOCK_TASK_OFFSET);
    (clock_task, load(rq, &RQ_CLOCK_OFFSET))
}

/// The single run-queue delay of a task being switched in, ns, read off the
/// kernel's `sched_info`: `rq->clock - sched_info.last_queued` (the
/// kernel's `sched_info_arrive`, right after the tracepoint, adds exactly
/// this to `run_delay`). `None` when it was not queued. Only call when
/// [`delays_from_sched_info`].
#[inline(always)]
pub fn arrival_delay(next: *const u8, rq_now: u64) -> Option<u64> {
    let queued: u64 = load(next, &TASK_LAST_QUEUED_OFFSET);
    // 0 is a real sample: after a wakeup preemption the scheduler skips
    // its next clock update.
    (queued != 0 && rq_now >= queued).then(|| rq_now - queued)
}

/// The kernel's own scheduler counters of a task.
#[inline(always)]
pub fn task_counters(task: *const u8) -> ThreadCounters {
    ThreadCounters {
        runtime_ns: task_runtime(task),
        nvcsw: load(task, &TASK_NVCSW_OFFSET),
        nivcsw: load(task, &TASK_NIVCSW_OFFSET),
        run_delay_ns: if has_run_delay() {
            load(task, &TASK_RUN_DELAY_OFFSET)
        } else {
            0
        },
        migrations: load(task, &TASK_MIGRATIONS_OFFSET),
        min_flt: load(task, &TASK_MIN_FLT_OFFSET),
        maj_flt: load(task, &TASK_MAJ_FLT_OFFSET),
        io_write_bytes: if TASK_IO_WRITE_BYTES_OFFSET.load() != 0 {
            load(task, &TASK_IO_WRITE_BYTES_OFFSET)
        } else {
            0
        },
    }
}
