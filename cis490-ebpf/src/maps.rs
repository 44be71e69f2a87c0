//! Maps shared by the program families, and the counter helpers.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use cis490_common::{CpuSlice, MAX_THREADS, MaxSlot, RINGBUF_BYTES, SchedStats, ThreadCounters};

/// Cumulative scheduler counters, one slot per CPU.
#[map]
pub static SCHED_STATS: PerCpuArray<SchedStats> = PerCpuArray::with_max_entries(1, 0);

/// Which target thread runs on each CPU, and since when.
#[map]
pub static CPU_SLICE: PerCpuArray<CpuSlice> = PerCpuArray::with_max_entries(1, 0);

/// Per-bucket run-queue delay maximum, two slots per CPU (`epoch & 1`).
#[map]
pub static RUNQ_MAX: PerCpuArray<MaxSlot> = PerCpuArray::with_max_entries(2, 0);

/// The current bucket epoch, published by the loader at each boundary.
#[map]
pub static EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// Target threads (tid -> their counters at their last switch-out). Seeded
/// by the loader from /proc at attach, inserted at fork, removed at the
/// final switch-out of a dead thread; makes thread counting idempotent.
#[map]
pub static THREADS: HashMap<u32, ThreadCounters> = HashMap::with_max_entries(MAX_THREADS, 0);

/// When each target thread became runnable (wakeup or preemption), ns.
#[map]
pub static RUNNABLE_SINCE: HashMap<u32, u64> = HashMap::with_max_entries(MAX_THREADS, 0);

/// Streamed records (`cis490_common::record`).
#[map]
pub static RECORDS: RingBuf = RingBuf::with_byte_size(RINGBUF_BYTES, 0);

/// This CPU's scheduler counters.
#[inline(always)]
pub fn stats() -> Option<*mut SchedStats> {
    SCHED_STATS.get_ptr_mut(0)
}

/// Adds `v` to a per-CPU counter. Atomic because programs can nest on one
/// CPU (an interrupt's `sched_wakeup` inside a `sched_process_fork`).
#[inline(always)]
pub fn add(counter: *mut u64, v: u64) {
    // SAFETY: `counter` points into a map value, valid and 8-byte aligned.
    // (core's AtomicU64 has no read-modify-write ops on the BPF target.)
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, v) };
}

/// The bucket epoch the loader published last.
#[inline(always)]
pub fn epoch() -> u64 {
    EPOCH.get(0).copied().unwrap_or(0)
}

/// Writes `record` to the ring buffer, counting it as dropped when the ring
/// buffer is full.
#[inline(always)]
pub fn emit<T: 'static>(record: &T, s: *mut SchedStats) {
    if RECORDS.output::<T>(record, 0).is_err() {
        // SAFETY: `s` comes from `stats()`.
        add(unsafe { &raw mut (*s).dropped }, 1);
    }
}
