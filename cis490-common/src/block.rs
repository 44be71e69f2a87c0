//! Block I/O map layouts: requests issued by the target, accounted at
//! completion (in interrupt context, where the current task is not the
//! target): the request is attributed when it starts, in the issuing
//! thread's context, and remembered by its address (`REQS`).

crate::names! {
    /// The block family's maps (`cis490-ebpf/src/block.rs`).
    pub mod map {
        BLOCK_STATS,
        BLOCK_MAX,
        REQS,
        BIOS,
        CGROUP_SLOTS,
        CGROUPS_LISTED,
    }
}

crate::names! {
    /// The block family's programs, each named for its tracepoint.
    pub mod prog {
        BLOCK_BIO_QUEUE = "block_bio_queue",
        BLOCK_SPLIT = "block_split",
        BLOCK_IO_START = "block_io_start",
        BLOCK_RQ_INSERT = "block_rq_insert",
        BLOCK_RQ_ISSUE = "block_rq_issue",
        BLOCK_RQ_COMPLETE = "block_rq_complete",
        BLOCK_IO_DONE = "block_io_done",
        BLOCK_RQ_MERGE = "block_rq_merge",
    }
}

crate::names! {
    /// The block family's read-only globals: `struct request` and
    /// `struct bio` member offsets, and the path taken (1: the `block_rq`
    /// fallback); the offsets from a bio to its cgroup's id (`bi_blkg`,
    /// `blkg.blkcg`, `blkcg.css.cgroup`, `cgroup.kn`, `kernfs_node.id`),
    /// and 1 in `BLOCK_CGROUPS` where the kernel has them all.
    pub mod global {
        REQ_CMD_FLAGS_OFFSET,
        REQ_DATA_LEN_OFFSET,
        REQ_BIO_OFFSET,
        BIO_PRIVATE_OFFSET,
        BLOCK_LEGACY,
        BIO_BLKG_OFFSET,
        BLKG_BLKCG_OFFSET,
        BLKCG_CGROUP_OFFSET,
        CGROUP_KN_OFFSET,
        KERNFS_NODE_ID_OFFSET,
        BLOCK_CGROUPS,
    }
}

use crate::sched::HIST_BUCKETS;

/// Cumulative per-CPU block I/O counters for the target (map `BLOCK_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStats {
    pub read_ops: u64,
    pub write_ops: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    /// Sum of issue-to-completion latencies, ns.
    pub latency_ns: u64,
    /// Requests whose latency was measured.
    pub latency_count: u64,
    /// Requests the kernel map could not hold (not accounted).
    pub map_errors: u64,
    /// Requests whose completion the probes never saw (the kernel did not
    /// deliver the event): found when their address was reused, or when
    /// tracing ended, and accounted then with the bytes they were issued
    /// with.
    pub missed_completions: u64,
    /// The target's requests merged into another request in the I/O
    /// scheduler after they were attributed (`block_rq_merge`): their bytes
    /// complete with that request, counted as it is.
    pub merged: u64,
    /// log2 histogram of latencies (bucket `i`: `[2^i, 2^(i+1))` ns).
    pub latency_hist: [u64; HIST_BUCKETS],
}

impl BlockStats {
    pub const ZERO: Self = Self {
        read_ops: 0,
        write_ops: 0,
        read_bytes: 0,
        write_bytes: 0,
        latency_ns: 0,
        latency_count: 0,
        map_errors: 0,
        missed_completions: 0,
        merged: 0,
        latency_hist: [0; HIST_BUCKETS],
    };

    /// Adds `other` into `self` (summing CPUs).
    pub fn accumulate(&mut self, other: &Self) {
        self.read_ops = self.read_ops.wrapping_add(other.read_ops);
        self.write_ops = self.write_ops.wrapping_add(other.write_ops);
        self.read_bytes = self.read_bytes.wrapping_add(other.read_bytes);
        self.write_bytes = self.write_bytes.wrapping_add(other.write_bytes);
        self.latency_ns = self.latency_ns.wrapping_add(other.latency_ns);
        self.latency_count = self.latency_count.wrapping_add(other.latency_count);
        self.map_errors = self.map_errors.wrapping_add(other.map_errors);
        self.missed_completions = self
            .missed_completions
            .wrapping_add(other.missed_completions);
        self.merged = self.merged.wrapping_add(other.merged);
        for (a, b) in self.latency_hist.iter_mut().zip(other.latency_hist.iter()) {
            *a = a.wrapping_add(*b);
        }
    }
}

/// Entries of `REQS`: target block requests in flight at once, over every
/// target.
pub const REQS_MAX: u32 = 16_384;

/// Entries of `BIOS`: target bios marked on the legacy path (LRU).
pub const BIOS_MAX: u32 = 16_384;

/// Entries of `CGROUP_SLOTS`: a target's own cgroup (v2 id) -> its slot.
/// One per target at most.
pub const CGROUP_SLOTS_MAX: u32 = crate::target::MAX_TARGETS;

/// A target request in flight (map `REQS`, keyed by `struct request *`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReqStart {
    /// When it was issued to the driver (or started, until it is), ns.
    pub ts_ns: u64,
    /// Bytes completed so far.
    pub done_bytes: u64,
    /// Bytes it had when it was issued (after merges).
    pub issued_bytes: u64,
    /// Its first bio: the same request seen again (inserted, then issued;
    /// requeued) keeps it, a new request at the same address does not.
    pub bio: u64,
    /// `REQ_OP_READ` or `REQ_OP_WRITE` (other ops are not tracked).
    pub op: u32,
    /// 1 once issued to the driver.
    pub issued: u32,
    /// The target slot it is counted for (`crate::target`).
    pub slot: u32,
    /// Zero.
    pub reserved: u32,
}

impl ReqStart {
    /// Bytes issued but never seen completing.
    pub const fn missing_bytes(&self) -> u64 {
        self.issued_bytes.saturating_sub(self.done_bytes)
    }
}

/// `cmd_flags & REQ_OP_MASK` values.
pub const REQ_OP_MASK: u32 = 0xff;
pub const REQ_OP_READ: u32 = 0;
pub const REQ_OP_WRITE: u32 = 1;

const _: () = assert!(core::mem::size_of::<BlockStats>() == (9 + HIST_BUCKETS) * 8);
const _: () = assert!(core::mem::size_of::<ReqStart>() == 48);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers without padding (asserted above).
    unsafe impl aya::Pod for super::BlockStats {}
    unsafe impl aya::Pod for super::ReqStart {}
}
