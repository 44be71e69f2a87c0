//! Scheduler map layouts: what the `sched_*` programs aggregate in the kernel.
//!
//! Rows must stay exact even when the ring buffer overflows, so every row
//! quantity is aggregated here, per CPU, as a cumulative counter; the loader
//! reads all CPUs at each bucket boundary and emits the difference. Only the
//! per-bucket maximum cannot be made cumulative: it lives in [`MaxSlot`],
//! tagged with the bucket epoch the loader publishes.

/// Number of log2 buckets in a latency histogram (covers every `u64`).
pub const HIST_BUCKETS: usize = 64;

/// Cumulative per-CPU scheduler counters for the target process
/// (map `SCHED_STATS`, one slot, `PerCpuArray`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedStats {
    /// On-CPU time up to each thread's last switch-out
    /// (`se.sum_exec_runtime`), ns.
    pub cpu_ns: u64,
    /// Switches where a target thread blocked (`nvcsw`).
    pub ctx_voluntary: u64,
    /// Switches where a target thread was preempted or yielded (`nivcsw`).
    pub ctx_involuntary: u64,
    /// `sched_wakeup` + `sched_wakeup_new` of target threads.
    pub wakeups: u64,
    /// Migrations of target threads between CPUs (`se.nr_migrations`).
    pub migrations: u64,
    /// Time target threads waited on a run queue (`sched_info.run_delay`),
    /// ns.
    pub runq_delay_ns: u64,
    /// Run-queue delays observed one by one (wakeup or preemption to
    /// switch-in); they feed the histogram and the maximum.
    pub runq_delay_count: u64,
    /// Threads of the target created (`sched_process_fork`, new tid).
    pub threads_started: u64,
    /// Threads of the target that exited (`sched_process_exit`, known tid).
    pub threads_exited: u64,
    /// Tracepoint hits attributed to the target.
    pub events: u64,
    /// Ring-buffer records that could not be reserved (lost records).
    pub dropped: u64,
    /// Map updates that failed (a full hash map): a run-queue delay or a
    /// thread could not be tracked.
    pub map_errors: u64,
    /// Switches whose CPU state disagreed with what the previous switch on
    /// that CPU left (a target thread switched out without a switch-in seen,
    /// or a non-target switch on a CPU thought to run the target): an
    /// on-CPU slice could not be measured. Should stay 0.
    pub slice_mismatches: u64,
    /// log2 histogram of run-queue delays (bucket `i`: `[2^i, 2^(i+1))` ns).
    pub runq_hist: [u64; HIST_BUCKETS],
}

impl SchedStats {
    pub const ZERO: Self = Self {
        cpu_ns: 0,
        ctx_voluntary: 0,
        ctx_involuntary: 0,
        wakeups: 0,
        migrations: 0,
        runq_delay_ns: 0,
        runq_delay_count: 0,
        threads_started: 0,
        threads_exited: 0,
        events: 0,
        dropped: 0,
        map_errors: 0,
        slice_mismatches: 0,
        runq_hist: [0; HIST_BUCKETS],
    };

    /// Adds `other` into `self` (summing CPUs).
    pub fn accumulate(&mut self, other: &Self) {
        self.cpu_ns = self.cpu_ns.wrapping_add(other.cpu_ns);
        self.ctx_voluntary = self.ctx_voluntary.wrapping_add(other.ctx_voluntary);
        self.ctx_involuntary = self.ctx_involuntary.wrapping_add(other.ctx_involuntary);
        self.wakeups = self.wakeups.wrapping_add(other.wakeups);
        self.migrations = self.migrations.wrapping_add(other.migrations);
        self.runq_delay_ns = self.runq_delay_ns.wrapping_add(other.runq_delay_ns);
        self.runq_delay_count = self.runq_delay_count.wrapping_add(other.runq_delay_count);
        self.threads_started = self.threads_started.wrapping_add(other.threads_started);
        self.threads_exited = self.threads_exited.wrapping_add(other.threads_exited);
        self.events = self.events.wrapping_add(other.events);
        self.dropped = self.dropped.wrapping_add(other.dropped);
        self.map_errors = self.map_errors.wrapping_add(other.map_errors);
        self.slice_mismatches = self.slice_mismatches.wrapping_add(other.slice_mismatches);
        for (a, b) in self.runq_hist.iter_mut().zip(other.runq_hist.iter()) {
            *a = a.wrapping_add(*b);
        }
    }
}

/// What runs on one CPU, as the `sched_switch` program last saw it
/// (map `CPU_SLICE`, one slot, `PerCpuArray`). The loader adds the running
/// part of an unfinished slice (`now - since_ns`) when it samples, so a thread
/// that never leaves the CPU is still counted bucket by bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuSlice {
    /// When the running target thread was switched in (`bpf_ktime_get_ns`).
    pub since_ns: u64,
    /// Thread id of the running target thread.
    pub tid: u32,
    /// One of `CpuSlice::UNKNOWN`, `OTHER`, `TARGET`.
    pub state: u32,
}

impl CpuSlice {
    /// No switch seen on this CPU since the programs were attached.
    pub const UNKNOWN: u32 = 0;
    /// A task outside the target runs.
    pub const OTHER: u32 = 1;
    /// Target thread `tid` runs since `since_ns`.
    pub const TARGET: u32 = 2;
    pub const ZERO: Self = Self {
        since_ns: 0,
        tid: 0,
        state: Self::UNKNOWN,
    };
}

/// A target thread's own scheduler counters, as the kernel keeps them in its
/// `task_struct`, last read when the thread was switched out (map
/// `THREADS`, keyed by tid, with the task they belong to: an `execve` from a
/// thread other than the main one swaps two threads' ids). The next switch-out adds the difference to
/// [`SchedStats`]. Reading the kernel's counters, instead of counting
/// events, keeps the rows exact when a tracepoint event is not delivered:
/// the next event that is delivered catches up.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadCounters {
    /// `se.sum_exec_runtime`, ns.
    pub runtime_ns: u64,
    /// `nvcsw`.
    pub nvcsw: u64,
    /// `nivcsw`.
    pub nivcsw: u64,
    /// `sched_info.run_delay`, ns.
    pub run_delay_ns: u64,
    /// `se.nr_migrations`.
    pub migrations: u64,
    /// 1 once `sched_process_exit` counted the thread as exited.
    pub exited: u64,
    /// Address of the kernel `task_struct` these counters are of; 0 until
    /// the first switch-out of a thread seeded from /proc.
    pub task: u64,
}

impl ThreadCounters {
    /// A counter whose starting value is not known yet: the first
    /// switch-out only records it.
    pub const UNKNOWN: u64 = u64::MAX;
    /// A thread created while traced: every counter starts at 0.
    pub const NEW: Self = Self {
        runtime_ns: 0,
        nvcsw: 0,
        nivcsw: 0,
        run_delay_ns: 0,
        migrations: 0,
        exited: 0,
        task: 0,
    };
}

/// Per-bucket maximum of a latency on one CPU, valid for bucket `epoch` only
/// (map `RUNQ_MAX`, two slots indexed by `epoch & 1`, `PerCpuArray`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxSlot {
    pub epoch: u64,
    pub max_ns: u64,
}

const _: () = assert!(core::mem::size_of::<SchedStats>() == (13 + HIST_BUCKETS) * 8);
const _: () = assert!(core::mem::size_of::<CpuSlice>() == 16);
const _: () = assert!(core::mem::size_of::<ThreadCounters>() == 7 * 8);
const _: () = assert!(core::mem::size_of::<MaxSlot>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers without padding (asserted above).
    unsafe impl aya::Pod for super::SchedStats {}
    unsafe impl aya::Pod for super::CpuSlice {}
    unsafe impl aya::Pod for super::MaxSlot {}
    unsafe impl aya::Pod for super::ThreadCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulate_sums_every_field() {
        let mut a = SchedStats::ZERO;
        let mut b = SchedStats::ZERO;
        b.cpu_ns = 5;
        b.ctx_voluntary = 1;
        b.dropped = 2;
        b.runq_hist[3] = 7;
        a.accumulate(&b);
        a.accumulate(&b);
        assert_eq!(a.cpu_ns, 10);
        assert_eq!(a.ctx_voluntary, 2);
        assert_eq!(a.dropped, 4);
        assert_eq!(a.runq_hist[3], 14);
        assert_eq!(a.runq_hist[2], 0);
    }
}
