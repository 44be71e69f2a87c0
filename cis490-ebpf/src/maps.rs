//! The maps every family uses (the bucket epoch, the ring buffer), and the
//! counter helpers. Each family's own maps are in its module.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::map,
    maps::{Array, PerCpuArray, RingBuf},
};
use cis490_common::{HIST_BUCKETS, MaxSlot, RINGBUF_BYTES, SchedStats, log2_bucket};

/// The current bucket epoch of each target slot, published by the loader at
/// each of that target's boundaries. Sized by the loader.
#[map]
pub static EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// Streamed records (`cis490_common::record`).
#[map]
pub static RECORDS: RingBuf = RingBuf::with_byte_size(RINGBUF_BYTES, 0);

/// Adds `v` to a per-CPU counter from a program that runs with interrupts
/// off (`sched_switch`, `sched_wakeup[_new]`: the scheduler holds the run
/// queue lock): nothing can run in between on this CPU, so a plain add is
/// enough, and it is several times cheaper than an atomic one.
#[inline(always)]
pub fn bump(counter: *mut u64, v: u64) {
    // SAFETY: `counter` points into a map value, valid and 8-byte aligned.
    unsafe { *counter = (*counter).wrapping_add(v) };
}

/// Adds `v` to a per-CPU counter. Atomic because programs can nest on one
/// CPU (an interrupt's `sched_wakeup` inside a `task_newtask`).
#[inline(always)]
pub fn add(counter: *mut u64, v: u64) {
    // SAFETY: `counter` points into a map value, valid and 8-byte aligned.
    // (core's AtomicU64 has no read-modify-write ops on the BPF target.)
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, v) };
}

/// The bucket epoch the loader published last for target slot `slot`.
#[inline(always)]
pub fn epoch(slot: u32) -> u64 {
    EPOCH.get(slot).copied().unwrap_or(0)
}

/// The log2 histogram bucket of `v`, with a bounds check the verifier sees.
///
/// LLVM knows `log2_bucket` is at most 63 and would drop the check, leaving
/// the verifier to bound the index from its arithmetic. Older verifiers
/// cannot: they track bounds through `|` only with a constant operand
/// (Linux 6.1 rejects the program: "math between map_value pointer and
/// register with unbounded min value"). A volatile read of the index (one
/// stack store and load) hides the bound from LLVM, so the check stays and
/// bounds the index on every kernel. (An empty `asm!` did too, but its
/// line info shares an instruction offset with the next line's, which
/// 6.1's verifier refuses: "Invalid line_info".)
#[inline(always)]
fn hist_index(v: u64) -> Option<usize> {
    let b = log2_bucket(v);
    // SAFETY: a volatile read of a local, initialised and aligned.
    let b = unsafe { core::ptr::read_volatile(&b) };
    (b < HIST_BUCKETS).then_some(b)
}

/// Counts a latency sample in a log2 histogram (atomically).
#[inline(always)]
pub fn add_to_hist(hist: *mut [u64; HIST_BUCKETS], v: u64) {
    if let Some(b) = hist_index(v) {
        // SAFETY: `hist` points into a map value; `b` is in bounds.
        add(unsafe { &raw mut (*hist)[b] }, 1);
    }
}

/// Counts a latency sample in a log2 histogram, from a program that runs
/// with interrupts off (see [`bump`]).
#[inline(always)]
pub fn bump_hist(hist: *mut [u64; HIST_BUCKETS], v: u64) {
    if let Some(b) = hist_index(v) {
        // SAFETY: `hist` points into a map value; `b` is in bounds.
        bump(unsafe { &raw mut (*hist)[b] }, 1);
    }
}

/// Raises this CPU's maximum for target `target`'s current bucket epoch in
/// `slots` (two per target, `2 * target + (epoch & 1)`), resetting it when
/// the epoch moved on.
#[inline(always)]
pub fn raise_max(slots: &PerCpuArray<MaxSlot>, target: u32, v: u64) {
    let e = epoch(target);
    if let Some(slot) = slots.get_ptr_mut(2 * target + (e & 1) as u32) {
        raise(slot, e, v);
    }
}

/// [`raise_max`] in a pair of maxima inside a map value (`pair[e & 1]`),
/// for bucket epoch `e`.
#[inline(always)]
pub fn raise_max_in(pair: *mut [MaxSlot; 2], e: u64, v: u64) {
    // SAFETY: `pair` points into a map value; the index is 0 or 1.
    raise(
        unsafe { (pair as *mut MaxSlot).add((e & 1) as usize) },
        e,
        v,
    );
}

#[inline(always)]
fn raise(slot: *mut MaxSlot, e: u64, v: u64) {
    // SAFETY: a map value pointer, valid for this program run.
    let slot = unsafe { &mut *slot };
    if slot.epoch != e {
        slot.epoch = e;
        slot.max_ns = v;
    } else if v > slot.max_ns {
        slot.max_ns = v;
    }
}

/// Writes `record` to the ring buffer, counting it as dropped when the ring
/// buffer is full.
#[inline(always)]
pub fn emit<T: 'static>(record: &T, s: *mut SchedStats) {
    if RECORDS.output::<T>(record, 0).is_err() {
        // SAFETY: `s` points to this CPU's `SchedStats` (a map value).
        add(unsafe { &raw mut (*s).dropped }, 1);
    }
}
