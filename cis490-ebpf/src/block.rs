//! Block I/O probes: requests the target issues, from issue to completion.
//!
//! A request is attributed when it starts, in the context of the thread
//! that submits it (`block_io_start`), and remembered by its address in
//! `REQS`. A target with a cgroup (v2) of its own also owns the requests
//! the kernel charges to that cgroup whoever submits them (`bi_blkg`;
//! `CGROUP_SLOTS`): the flusher's writeback of pages the target dirtied.
//! Kernels before 6.5 have no such tracepoint: there the target's bios
//! (its threads', and those charged to its own cgroup) are marked when queued (`block_bio_queue`, in the submitter's
//! context, `BIOS`), and a request is the target's when its first bio is,
//! seen at `block_rq_insert` or `block_rq_issue` whatever context those run
//! in (a plug flush, kblockd); at insert the submitting thread counts too,
//! never at issue (the thread that runs the queue may dispatch another
//! process's requests). Without an I/O scheduler a request is often never
//! inserted (issued directly, or a plug flushed through the driver's
//! `queue_rqs`), so the mark alone decides. A bio too large for one request
//! is split (`block_split`): the front becomes a new bio, which never passes
//! `block_bio_queue` and is the first bio of its request; it takes its
//! parent's mark (the parent, the rest, goes on as a bio already queued).
//! Completion runs in interrupt context, where the current task is
//! anyone: it only looks the request up. A request merged into another in
//! the I/O scheduler (`block_rq_merge`) goes away unissued: its entry is
//! dropped (its bytes complete with the request it joined, counted as that
//! one is). A request or bio address that a non-target reuses, or a request
//! that is not a read or write (a flush, a discard), drops any stale entry
//! or mark.

use aya_ebpf::{
    Global,
    bindings::BPF_ANY,
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::BtfTracePointContext,
};
use cis490_common::{
    BlockStats, MaxSlot, ReqStart,
    block::{BIOS_MAX, CGROUP_SLOTS_MAX, REQ_OP_MASK, REQ_OP_READ, REQ_OP_WRITE, REQS_MAX},
};

use crate::{
    maps::{add, add_to_hist, raise_max},
    target::{current, field, target_slot},
};

/// Cumulative block I/O counters per target slot, per CPU. Sized by the
/// loader.
#[map]
pub static BLOCK_STATS: PerCpuArray<BlockStats> = PerCpuArray::with_max_entries(1, 0);

/// Per-bucket block latency maximum, two per target slot and CPU
/// (`2 * slot + (epoch & 1)`). Sized by the loader.
#[map]
pub static BLOCK_MAX: PerCpuArray<MaxSlot> = PerCpuArray::with_max_entries(2, 0);

/// Target block requests in flight, keyed by `struct request *`.
#[map]
pub static REQS: HashMap<u64, ReqStart> = HashMap::with_max_entries(REQS_MAX, 0);

/// Bios a target queued (legacy block path) and the bios split from
/// them, keyed by `struct bio *`, with the target's slot; LRU, so marks of
/// bios merged into another request age out.
#[map]
pub static BIOS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(BIOS_MAX, 0);

/// Targets that have a cgroup (v2) of their own: the cgroup's id -> the
/// target's slot. Kept by the loader. I/O the kernel charges to such a
/// cgroup is the target's whoever submits it: above all the flusher's
/// writeback of pages the target dirtied.
#[map]
pub static CGROUP_SLOTS: HashMap<u64, u32> = HashMap::with_max_entries(CGROUP_SLOTS_MAX, 0);

/// How many cgroups `CGROUP_SLOTS` lists (one entry, kept by the loader):
/// while none is, a request or bio of no target costs no cgroup lookup.
#[map]
pub static CGROUPS_LISTED: Array<u32> = Array::with_max_entries(1, 0);

/// `struct request`: `cmd_flags` (the op in its low bits).
#[unsafe(no_mangle)]
static REQ_CMD_FLAGS_OFFSET: Global<u32> = Global::new(0);
/// `struct request`: `__data_len`, its size.
#[unsafe(no_mangle)]
static REQ_DATA_LEN_OFFSET: Global<u32> = Global::new(0);
/// `struct request`: `bio`, its first bio.
#[unsafe(no_mangle)]
static REQ_BIO_OFFSET: Global<u32> = Global::new(0);
/// `struct bio`: `bi_private`; a split's is its parent (`bio_chain`).
#[unsafe(no_mangle)]
static BIO_PRIVATE_OFFSET: Global<u32> = Global::new(0);
/// 1 on kernels without `block_io_start`/`block_io_done`: attribute at
/// insert or issue and account each completion as final.
#[unsafe(no_mangle)]
static BLOCK_LEGACY: Global<u32> = Global::new(0);
/// `struct bio`: `bi_blkg`, the cgroup its I/O is charged to (its
/// submitter's, or for writeback the cgroup that dirtied the pages).
#[unsafe(no_mangle)]
static BIO_BLKG_OFFSET: Global<u32> = Global::new(0);
/// `struct blkcg_gq`: `blkcg`.
#[unsafe(no_mangle)]
static BLKG_BLKCG_OFFSET: Global<u32> = Global::new(0);
/// `struct blkcg`: `css.cgroup`.
#[unsafe(no_mangle)]
static BLKCG_CGROUP_OFFSET: Global<u32> = Global::new(0);
/// `struct cgroup`: `kn`, its directory in the cgroup file system.
#[unsafe(no_mangle)]
static CGROUP_KN_OFFSET: Global<u32> = Global::new(0);
/// `struct kernfs_node`: `id`, the cgroup's id (its directory's inode).
#[unsafe(no_mangle)]
static KERNFS_NODE_ID_OFFSET: Global<u32> = Global::new(0);
/// 1 where the kernel has every offset above (CONFIG_BLK_CGROUP).
#[unsafe(no_mangle)]
static BLOCK_CGROUPS: Global<u32> = Global::new(0);

type Res = Result<(), i32>;
const NO_MAP: i32 = -1;

fn block_stats(slot: u32) -> Result<*mut BlockStats, i32> {
    BLOCK_STATS.get_ptr_mut(slot).ok_or(NO_MAP)
}

/// The slot of the target whose own cgroup `bio`'s I/O is charged to, if
/// any: the flusher writes back pages with the cgroup that dirtied them
/// (CONFIG_CGROUP_WRITEBACK, on cgroup v2 with the memory and io
/// controllers). Only where the loader listed a target's cgroup.
#[inline(always)]
fn cgroup_slot(bio: u64) -> Option<u32> {
    if BLOCK_CGROUPS.load() == 0 || bio == 0 || CGROUPS_LISTED.get(0).copied().unwrap_or(0) == 0 {
        return None;
    }
    let blkg: u64 = field(bio as *const u8, &BIO_BLKG_OFFSET).ok()?;
    if blkg == 0 {
        return None;
    }
    let blkcg: u64 = field(blkg as *const u8, &BLKG_BLKCG_OFFSET).ok()?;
    let cgroup: u64 = field(blkcg as *const u8, &BLKCG_CGROUP_OFFSET).ok()?;
    let kn: u64 = field(cgroup as *const u8, &CGROUP_KN_OFFSET).ok()?;
    let id: u64 = field(kn as *const u8, &KERNFS_NODE_ID_OFFSET).ok()?;
    unsafe { CGROUP_SLOTS.get(id) }.copied()
}

/// Attributes request `rq` if it is the target's (and the op is a read or
/// write); forgets a stale entry otherwise. It is the target's when the
/// current thread is (only if `by_current`: the submitter's context) or,
/// on the legacy path (`legacy`), when its first bio is marked (the target
/// queued it, or it was split from one the target queued). On
/// the legacy path an existing entry is kept (insert, then issue). At issue
/// the current thread is whoever runs the queue, which may be the target
/// dispatching another process's request: there only the bio mark counts.
#[inline(always)]
fn start(ctx: &BtfTracePointContext, legacy: bool, by_current: bool) -> Res {
    let rq: u64 = ctx.arg(0);
    let bio: u64 = field(rq as *const u8, &REQ_BIO_OFFSET)?;
    if let Some(r) = REQS.get_ptr_mut(rq) {
        let r = unsafe { &mut *r };
        if legacy && r.bio == bio {
            // The same request again (inserted, then issued; requeued).
            return Ok(());
        }
        if legacy && r.issued != 0 && r.done_bytes > 0 && r.done_bytes < r.issued_bytes {
            // Issued again after a part of it completed (a driver requeues
            // the rest of a short transfer): the same request, its first
            // bio now the next one.
            r.bio = bio;
            return Ok(());
        }
        // A new request at the address of one that was issued: that one
        // completed without the probes seeing it.
        if r.issued != 0 {
            catch_up(block_stats(r.slot)?, rq, r);
        }
    }
    let (tgid, _) = current();
    let mut ours = if by_current { target_slot(tgid) } else { None };
    if legacy && let Some(&marked) = unsafe { BIOS.get(bio) } {
        let _ = BIOS.remove(bio);
        ours = Some(marked);
    }
    if ours.is_none() && !legacy {
        // Submitted by another thread (the flusher) for a target's cgroup.
        // (On the legacy path its bio was marked so when queued.)
        ours = cgroup_slot(bio);
    }
    let Some(slot) = ours else {
        let _ = REQS.remove(rq);
        return Ok(());
    };
    let flags: u32 = field(rq as *const u8, &REQ_CMD_FLAGS_OFFSET)?;
    let op = flags & REQ_OP_MASK;
    let len: u32 = field(rq as *const u8, &REQ_DATA_LEN_OFFSET)?;
    if (op != REQ_OP_READ && op != REQ_OP_WRITE) || len == 0 {
        // Not counted: a flush, a discard, or the empty write that carries
        // an fsync's flush (it is never issued itself; the older path never
        // sees it). Nor is a stale entry at its address, which would
        // otherwise be counted with this request's issue and completion.
        let _ = REQS.remove(rq);
        return Ok(());
    }
    let start = ReqStart {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        done_bytes: 0,
        issued_bytes: 0,
        bio,
        op,
        issued: 0,
        slot,
        reserved: 0,
    };
    if REQS.insert(rq, start, BPF_ANY as u64).is_err() {
        add(unsafe { &raw mut (*block_stats(slot)?).map_errors }, 1);
    }
    Ok(())
}

/// `block_bio_queue(struct bio *bio)` (legacy path): a bio is submitted, in
/// the submitting thread. Marks the target's bios (its threads', and those
/// charged to its own cgroup); forgets a stale mark.
#[btf_tracepoint(function = "block_bio_queue")]
pub fn block_bio_queue(ctx: BtfTracePointContext) -> i32 {
    let bio: u64 = ctx.arg(0);
    let (tgid, _) = current();
    if let Some(slot) = target_slot(tgid).or_else(|| cgroup_slot(bio)) {
        let _ = BIOS.insert(bio, slot, BPF_ANY as u64);
    } else {
        let _ = BIOS.remove(bio);
    }
    0
}

/// `block_split(struct bio *split, unsigned int new_sector)` (legacy path):
/// the front of a bio over the queue's limits (its max_sectors_kb or
/// max_segments) was split off as a new bio, chained to the rest (the
/// parent, `bi_private`), before a request is made of it. The parent was
/// queued; the split never is (`block_bio_queue` fires once per bio), and
/// is its request's first bio: it takes the parent's mark, whatever thread
/// splits it (a stale mark at its address is dropped).
#[btf_tracepoint(function = "block_split")]
pub fn block_split(ctx: BtfTracePointContext) -> i32 {
    let split: u64 = ctx.arg(0);
    let parent: u64 = field(split as *const u8, &BIO_PRIVATE_OFFSET).unwrap_or(0);
    let marked = if parent != 0 {
        unsafe { BIOS.get(parent) }.copied()
    } else {
        None
    };
    if let Some(slot) = marked {
        let _ = BIOS.insert(split, slot, BPF_ANY as u64);
    } else {
        let _ = BIOS.remove(split);
    }
    0
}

/// `block_io_start(struct request *rq)` (6.5+): I/O accounting starts, in
/// the submitting thread.
#[btf_tracepoint(function = "block_io_start")]
pub fn block_io_start(ctx: BtfTracePointContext) -> i32 {
    let _ = start(&ctx, false, true);
    0
}

/// `block_rq_insert(struct request *rq)` (legacy path): queued to the I/O
/// scheduler.
#[btf_tracepoint(function = "block_rq_insert")]
pub fn block_rq_insert(ctx: BtfTracePointContext) -> i32 {
    let _ = start(&ctx, true, true);
    0
}

/// `block_rq_issue(struct request *rq)`: sent to the driver. Latency runs
/// from here. On the legacy path a request that skipped the scheduler is
/// attributed here.
#[btf_tracepoint(function = "block_rq_issue")]
pub fn block_rq_issue(ctx: BtfTracePointContext) -> i32 {
    let _ = try_issue(&ctx);
    0
}

fn try_issue(ctx: &BtfTracePointContext) -> Res {
    if BLOCK_LEGACY.load() != 0 {
        start(ctx, true, false)?;
    }
    // A request can be issued more than once (requeued when the device
    // queue is full): latency runs from the first issue.
    let rq: u64 = ctx.arg(0);
    if let Some(r) = REQS.get_ptr_mut(rq) {
        let len: u32 = field(rq as *const u8, &REQ_DATA_LEN_OFFSET)?;
        unsafe {
            if (*r).issued == 0 {
                (*r).ts_ns = bpf_ktime_get_ns();
                (*r).issued = 1;
            }
            // What is left of it (less, issued again after a part
            // completed) on top of what completed.
            (*r).issued_bytes = (*r).done_bytes + len as u64;
        }
    }
    Ok(())
}

/// `block_rq_complete(struct request *rq, blk_status_t error,
/// unsigned int nr_bytes)`: `nr_bytes` of the request are done (a request
/// can complete in parts).
#[btf_tracepoint(function = "block_rq_complete")]
pub fn block_rq_complete(ctx: BtfTracePointContext) -> i32 {
    let _ = try_complete(&ctx);
    0
}

fn try_complete(ctx: &BtfTracePointContext) -> Res {
    let rq: u64 = ctx.arg(0);
    let Some(r) = REQS.get_ptr_mut(rq) else {
        return Ok(());
    };
    let error: u64 = ctx.arg(1);
    let nr_bytes: u64 = ctx.arg(2);
    let r = unsafe { &mut *r };
    let s = block_stats(r.slot)?;
    if error as u8 == 0 {
        let bytes = nr_bytes & 0xffff_ffff;
        r.done_bytes += bytes;
        if r.op == REQ_OP_READ {
            add(unsafe { &raw mut (*s).read_bytes }, bytes);
        } else {
            add(unsafe { &raw mut (*s).write_bytes }, bytes);
        }
    }
    if BLOCK_LEGACY.load() != 0 {
        // Over when this part is its last: `__data_len` is what was left
        // before this part (the kernel takes the part off after the
        // tracepoint; a whole completion, or an error's, is all of it).
        let left: u32 = field(rq as *const u8, &REQ_DATA_LEN_OFFSET)?;
        if nr_bytes & 0xffff_ffff >= left as u64 {
            finish(s, rq, r);
        }
    }
    Ok(())
}

/// `block_rq_merge(struct request *rq)` (5.11+): `rq` was merged into
/// another request in the I/O scheduler and goes away unissued; its bytes
/// complete with that request, counted as that one is. Its entry goes (else
/// it would wait for its address to be taken again), and is counted.
#[btf_tracepoint(function = "block_rq_merge")]
pub fn block_rq_merge(ctx: BtfTracePointContext) -> i32 {
    let _ = try_merge(&ctx);
    0
}

fn try_merge(ctx: &BtfTracePointContext) -> Res {
    let rq: u64 = ctx.arg(0);
    let Some(r) = REQS.get_ptr(rq) else {
        return Ok(());
    };
    let slot = unsafe { (*r).slot };
    let _ = REQS.remove(rq);
    add(unsafe { &raw mut (*block_stats(slot)?).merged }, 1);
    Ok(())
}

/// `block_io_done(struct request *rq)` (6.5+): the request is over.
#[btf_tracepoint(function = "block_io_done")]
pub fn block_io_done(ctx: BtfTracePointContext) -> i32 {
    let _ = try_done(&ctx);
    0
}

fn try_done(ctx: &BtfTracePointContext) -> Res {
    let rq: u64 = ctx.arg(0);
    let Some(r) = REQS.get_ptr(rq) else {
        return Ok(());
    };
    let r = unsafe { &*r };
    finish(block_stats(r.slot)?, rq, r);
    Ok(())
}

/// Accounts a request whose completion was never delivered: its missing
/// bytes and the request (no latency: it is not known), and forgets it.
#[inline(always)]
fn catch_up(s: *mut BlockStats, rq: u64, r: &ReqStart) {
    let missing = r.missing_bytes();
    unsafe {
        if r.op == REQ_OP_READ {
            add(&raw mut (*s).read_bytes, missing);
            add(&raw mut (*s).read_ops, 1);
        } else {
            add(&raw mut (*s).write_bytes, missing);
            add(&raw mut (*s).write_ops, 1);
        }
        add(&raw mut (*s).missed_completions, 1);
    }
    let _ = REQS.remove(rq);
}

/// Counts the request and its latency, and forgets it.
#[inline(always)]
fn finish(s: *mut BlockStats, rq: u64, r: &ReqStart) {
    let latency = unsafe { bpf_ktime_get_ns() }.saturating_sub(r.ts_ns);
    if r.op == REQ_OP_READ {
        add(unsafe { &raw mut (*s).read_ops }, 1);
    } else {
        add(unsafe { &raw mut (*s).write_ops }, 1);
    }
    add(unsafe { &raw mut (*s).latency_ns }, latency);
    add(unsafe { &raw mut (*s).latency_count }, 1);
    add_to_hist(unsafe { &raw mut (*s).latency_hist }, latency);
    raise_max(&BLOCK_MAX, r.slot, latency);
    let _ = REQS.remove(rq);
}
