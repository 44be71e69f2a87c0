//! Scheduler map layouts: what the `sched_*` programs aggregate in the kernel.
//!
//! Rows must stay exact even when the ring buffer overflows, so every row
//! quantity is a cumulative counter kept in the kernel; the loader reads it
//! at each bucket boundary and emits the difference. Two halves make the
//! scheduler counters:
//!
//! - the threads alive at the boundary: the `sched_iter` task iterator sums
//!   their own kernel counters (`se.sum_exec_runtime`, `nvcsw`, `nivcsw`,
//!   `se.nr_migrations`, `sched_info.run_delay`) into [`LiveCounters`],
//!   adding the running part of slices still on a CPU ([`CpuSlice`]);
//! - the threads that have exited: `sched_switch` adds their final counters
//!   at their final switch-out into [`SchedStats`] (`dead_*`).
//!
//! So the per-switch work is a few loads, and nothing depends on an event
//! being delivered. What only events give (wakeups, single run-queue delays
//! for the histogram and the per-bucket maximum) is counted per CPU in
//! [`SchedStats`], the per-bucket maximum in its two [`MaxSlot`]s, tagged
//! with the bucket epoch the loader publishes.

crate::names! {
    /// The scheduler family's maps (`cis490-ebpf/src/sched.rs`). Per target
    /// slot: `SCHED_STATS` and `LIVE`.
    pub mod map {
        SCHED_STATS,
        CPU_SLICE,
        LIVE,
        RUNNABLE_SINCE,
        EXITING,
    }
}

crate::names! {
    /// The scheduler family's programs, each named for its tracepoint (the
    /// iterator for what it walks).
    pub mod prog {
        SCHED_SWITCH = "sched_switch",
        SCHED_WAKEUP = "sched_wakeup",
        SCHED_WAKEUP_NEW = "sched_wakeup_new",
        TASK_NEWTASK = "task_newtask",
        SCHED_PROCESS_EXIT = "sched_process_exit",
        SCHED_PROCESS_EXEC = "sched_process_exec",
        TASK_RENAME = "task_rename",
        SCHED_PROCESS_FREE = "sched_process_free",
        SCHED_ITER = "sched_iter",
    }
}

crate::names! {
    /// The scheduler family's read-only globals: `task_struct` (and run
    /// queue) member offsets from the kernel's BTF, and the run-delay
    /// decision ([`RunDelaySource`]).
    pub mod global {
        TASK_PID_OFFSET,
        TASK_TGID_OFFSET,
        TASK_RUNTIME_OFFSET,
        TASK_NVCSW_OFFSET,
        TASK_NIVCSW_OFFSET,
        TASK_MIGRATIONS_OFFSET,
        TASK_RUN_DELAY_OFFSET,
        TASK_MIN_FLT_OFFSET,
        TASK_MAJ_FLT_OFFSET,
        TASK_IO_WRITE_BYTES_OFFSET,
        TASK_STATE_OFFSET,
        TASK_CPU_OFFSET,
        TASK_ON_CPU_OFFSET,
        TASK_FLAGS_OFFSET,
        TASK_LAST_QUEUED_OFFSET,
        TASK_CFS_RQ_OFFSET,
        CFS_RQ_RQ_OFFSET,
        RQ_CLOCK_OFFSET,
        TASK_EXEC_START_OFFSET,
        RQ_CLOCK_TASK_OFFSET,
        RUN_DELAY_SOURCE,
        SKIP_FINAL_SWITCH_OF_TID_MULTIPLES,
        SKIP_FREE_OF_TID_MULTIPLES,
        COUNTING,
    }
}

/// Where run-queue delays come from on this kernel, decided once by the
/// loader from the kernel's BTF and given to the programs as the global
/// `RUN_DELAY_SOURCE`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunDelaySource {
    /// No `sched_info.run_delay` (no CONFIG_SCHED_INFO): the sum and the
    /// single delays are timed from the wakeup (`RUNNABLE_SINCE`).
    WakeupMarks = 0,
    /// The sum from each thread's `sched_info.run_delay`; single delays
    /// timed from the wakeup (no `sched_info.last_queued` or `se.cfs_rq`).
    SumFromSchedInfo = 1,
    /// Both from `sched_info`: single delays as `rq->clock -
    /// sched_info.last_queued` at switch-in.
    SchedInfo = 2,
}

/// Number of log2 buckets in a latency histogram (covers every `u64`).
pub const HIST_BUCKETS: usize = 64;

/// Cumulative per-CPU scheduler counters of one target process (map
/// `SCHED_STATS`, one entry per target slot, `PerCpuArray`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedStats {
    /// Exited threads' `se.sum_exec_runtime` at their final switch-out, ns.
    pub dead_runtime_ns: u64,
    /// Exited threads' `nvcsw` (switches where the thread blocked), the final
    /// switch-out included.
    pub dead_nvcsw: u64,
    /// Exited threads' `nivcsw` (switches where it was preempted or yielded).
    pub dead_nivcsw: u64,
    /// Exited threads' `se.nr_migrations`.
    pub dead_migrations: u64,
    /// Exited threads' `sched_info.run_delay`, ns.
    pub dead_run_delay_ns: u64,
    /// Exited threads' `min_flt` (page faults served without I/O).
    pub dead_min_flt: u64,
    /// Exited threads' `maj_flt` (page faults that needed I/O).
    pub dead_maj_flt: u64,
    /// Exited threads' `ioac.write_bytes` (bytes they dirtied in the page
    /// cache or wrote with direct I/O; 0 without CONFIG_TASK_IO_ACCOUNTING).
    pub dead_io_write_bytes: u64,
    /// Target threads that began to exit (`sched_process_exit`).
    pub exits_started: u64,
    /// Their `se.sum_exec_runtime` then, ns: `dead_runtime_ns` less this is
    /// the CPU time exited threads spent on their way out, from the start
    /// of their exit to their final switch-out.
    pub exit_start_runtime_ns: u64,
    /// Target threads that began to exit and are not counted yet (listed in
    /// `EXITING`): their own counters when they began to exit. Added at
    /// `sched_process_exit`, taken off where the thread is counted (its
    /// final switch-out, its free, an estimate); the task iterator skips
    /// such a thread, so from the start of its exit to its final switch-out
    /// it is counted here, never missing from the sum however long that
    /// takes, never twice. Per CPU a field can wrap below zero (taken off on
    /// another CPU); the sum over the CPUs cannot.
    pub exiting: ThreadCounters,
    /// Exited target threads whose final switch-out the probe never saw,
    /// found when the kernel freed them (`sched_process_free`) and counted
    /// then from their final counters (in `dead_*` and `exits_accounted`).
    pub final_switch_repairs: u64,
    /// Exited target threads whose final switch-out and free the probes
    /// both missed, counted (in `dead_*` and `exits_accounted`) from their
    /// counters when they began to exit, with their final switch-out
    /// ([`ThreadCounters::final_from_exit_start`]): by `sched_process_exit`
    /// when a new thread's task has the address of one still listed in
    /// `EXITING` (so it was freed), and by the loader for those still listed
    /// once the target ended.
    pub exits_estimated: u64,
    /// Target threads whose final switch-out was counted (`dead_*`): the
    /// loader's last row waits until this reaches `exits_started`.
    pub exits_accounted: u64,
    /// `sched_wakeup` + `sched_wakeup_new` of target threads.
    pub wakeups: u64,
    /// Sum of the single run-queue delays below, ns (the `runq_delay_ns` of
    /// a kernel without `sched_info`).
    pub runq_delay_ns: u64,
    /// Run-queue delays observed one by one (queued, after a wakeup or a
    /// preemption, to switch-in); they feed the histogram and the maximum.
    pub runq_delay_count: u64,
    /// Tracepoint hits attributed to the target.
    pub events: u64,
    /// Ring-buffer records that could not be reserved (lost records).
    pub dropped: u64,
    /// Map updates that failed (a full hash map): a single run-queue delay
    /// could not be tracked (kernels without `sched_info` only).
    pub map_errors: u64,
    /// Switch-outs of a target thread whose switch-in was not delivered
    /// (the CPU's slice record did not show it running): the running part
    /// of that slice was not counted at boundaries before it (the thread's
    /// counters catch up). Should stay 0.
    pub slice_mismatches: u64,
    /// The largest single run-queue delay of the bucket on this CPU, ns:
    /// two, at `epoch & 1`, each valid for its `epoch` only (the loader reads
    /// the ended bucket's while the programs write the next one's). Here,
    /// not in a map of their own, so that a switch-in costs one lookup.
    pub runq_max: [MaxSlot; 2],
    /// log2 histogram of run-queue delays (bucket `i`: `[2^i, 2^(i+1))` ns).
    pub runq_hist: [u64; HIST_BUCKETS],
}

impl SchedStats {
    pub const ZERO: Self = Self {
        dead_runtime_ns: 0,
        dead_nvcsw: 0,
        dead_nivcsw: 0,
        dead_migrations: 0,
        dead_run_delay_ns: 0,
        dead_min_flt: 0,
        dead_maj_flt: 0,
        dead_io_write_bytes: 0,
        exits_started: 0,
        exit_start_runtime_ns: 0,
        exiting: ThreadCounters::ZERO,
        final_switch_repairs: 0,
        exits_estimated: 0,
        exits_accounted: 0,
        wakeups: 0,
        runq_delay_ns: 0,
        runq_delay_count: 0,
        events: 0,
        dropped: 0,
        map_errors: 0,
        slice_mismatches: 0,
        runq_max: [MaxSlot::ZERO; 2],
        runq_hist: [0; HIST_BUCKETS],
    };

    /// Counts an exited thread's counters ([`ThreadCounters::as_exited`])
    /// as the exited threads' (the loader's estimates: the programs add
    /// theirs field by field, atomically where they may run nested).
    pub fn add_exited(&mut self, c: &ThreadCounters) {
        self.dead_runtime_ns = self.dead_runtime_ns.wrapping_add(c.runtime_ns);
        self.dead_nvcsw = self.dead_nvcsw.wrapping_add(c.nvcsw);
        self.dead_nivcsw = self.dead_nivcsw.wrapping_add(c.nivcsw);
        self.dead_migrations = self.dead_migrations.wrapping_add(c.migrations);
        self.dead_run_delay_ns = self.dead_run_delay_ns.wrapping_add(c.run_delay_ns);
        self.dead_min_flt = self.dead_min_flt.wrapping_add(c.min_flt);
        self.dead_maj_flt = self.dead_maj_flt.wrapping_add(c.maj_flt);
        self.dead_io_write_bytes = self.dead_io_write_bytes.wrapping_add(c.io_write_bytes);
        self.exits_accounted = self.exits_accounted.wrapping_add(1);
    }

    /// Adds `other` into `self` (summing CPUs); `runq_max`, a maximum per
    /// CPU, is left as it was.
    pub fn accumulate(&mut self, other: &Self) {
        self.dead_runtime_ns = self.dead_runtime_ns.wrapping_add(other.dead_runtime_ns);
        self.dead_nvcsw = self.dead_nvcsw.wrapping_add(other.dead_nvcsw);
        self.dead_nivcsw = self.dead_nivcsw.wrapping_add(other.dead_nivcsw);
        self.dead_migrations = self.dead_migrations.wrapping_add(other.dead_migrations);
        self.dead_run_delay_ns = self.dead_run_delay_ns.wrapping_add(other.dead_run_delay_ns);
        self.dead_min_flt = self.dead_min_flt.wrapping_add(other.dead_min_flt);
        self.dead_maj_flt = self.dead_maj_flt.wrapping_add(other.dead_maj_flt);
        self.dead_io_write_bytes = self
            .dead_io_write_bytes
            .wrapping_add(other.dead_io_write_bytes);
        self.exits_started = self.exits_started.wrapping_add(other.exits_started);
        self.exit_start_runtime_ns = self
            .exit_start_runtime_ns
            .wrapping_add(other.exit_start_runtime_ns);
        self.exiting = self.exiting.wrapping_add(&other.exiting);
        self.exits_estimated = self.exits_estimated.wrapping_add(other.exits_estimated);
        self.exits_accounted = self.exits_accounted.wrapping_add(other.exits_accounted);
        self.final_switch_repairs = self
            .final_switch_repairs
            .wrapping_add(other.final_switch_repairs);
        self.wakeups = self.wakeups.wrapping_add(other.wakeups);
        self.runq_delay_ns = self.runq_delay_ns.wrapping_add(other.runq_delay_ns);
        self.runq_delay_count = self.runq_delay_count.wrapping_add(other.runq_delay_count);
        self.events = self.events.wrapping_add(other.events);
        self.dropped = self.dropped.wrapping_add(other.dropped);
        self.map_errors = self.map_errors.wrapping_add(other.map_errors);
        self.slice_mismatches = self.slice_mismatches.wrapping_add(other.slice_mismatches);
        for (a, b) in self.runq_hist.iter_mut().zip(other.runq_hist.iter()) {
            *a = a.wrapping_add(*b);
        }
    }
}

/// What the task iterator (`sched_iter`) summed over a target's live
/// threads at one boundary (map `LIVE`, one entry per target slot,
/// `Array`): each thread's own kernel counters, with the running part of a
/// slice still on a CPU added to its on-CPU time. Exited threads
/// (`TASK_DEAD`) are skipped: their final counters are in [`SchedStats`].
/// The loader zeroes the slot's entry before each run (runs are one at a
/// time in a process), and reads it after.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveCounters {
    /// `se.sum_exec_runtime` (plus the running part of a slice on a CPU), ns.
    pub runtime_ns: u64,
    pub nvcsw: u64,
    pub nivcsw: u64,
    pub migrations: u64,
    /// `sched_info.run_delay`, ns (0 without `sched_info`).
    pub run_delay_ns: u64,
    /// `min_flt`, `maj_flt`: page faults.
    pub min_flt: u64,
    pub maj_flt: u64,
    /// `ioac.write_bytes`: bytes dirtied in the page cache or written with
    /// direct I/O.
    pub io_write_bytes: u64,
    /// Live threads visited.
    pub threads: u64,
    /// Of them, threads on a CPU whose running slice was added.
    pub running: u64,
    /// Threads marked `TASK_DEAD` but still on a CPU: their final
    /// switch-out, which adds them to the exited ones, is still to come.
    pub dying: u64,
    /// Threads whose CPU's slice record was being rewritten while the
    /// iterator copied it: counted with the kernel's own
    /// `se.sum_exec_runtime` (up to date at the last tick), not the copy.
    pub torn: u64,
}

impl LiveCounters {
    pub const ZERO: Self = Self {
        runtime_ns: 0,
        nvcsw: 0,
        nivcsw: 0,
        migrations: 0,
        run_delay_ns: 0,
        min_flt: 0,
        maj_flt: 0,
        io_write_bytes: 0,
        threads: 0,
        running: 0,
        dying: 0,
        torn: 0,
    };
}

/// What runs on one CPU, as the `sched_switch` program last saw it
/// (map `CPU_SLICE`, one slot, `PerCpuArray`). The task iterator counts a
/// thread that is on a CPU as its `se.sum_exec_runtime` plus the time since
/// the kernel last brought it up to date (on the run queue's clock, through
/// `cal_clock_ns` and `cal_rq_ns`), or, without the members that takes, as
/// `base_runtime_ns + (now - since_ns)`: so a thread that never leaves the
/// CPU is still counted bucket by bucket (its runtime is only brought up to
/// date at ticks).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuSlice {
    /// A sequence count: odd while `sched_switch` rewrites the record at a
    /// target thread's switch-in, even otherwise. The task iterator, on
    /// another CPU, uses the record only when the count was the same even
    /// number before and after it copied it (a torn copy could pair one
    /// thread's id with another's base).
    pub seq: u64,
    /// When the running target thread was switched in: the run queue's
    /// clock (`rq->clock`), or `bpf_ktime_get_ns` when `cal_clock_ns` is 0.
    pub since_ns: u64,
    /// A recent `bpf_ktime_get_ns` on this CPU, and `rq->clock` at the same
    /// moment: converts the iterator's clock to the run queue's (0: no
    /// pair, `since_ns` is on the clock).
    pub cal_clock_ns: u64,
    pub cal_rq_ns: u64,
    /// Its `se.sum_exec_runtime` then.
    pub base_runtime_ns: u64,
    /// Thread id of the running target thread.
    pub tid: u32,
    /// One of `CpuSlice::UNKNOWN`, `OTHER`, `TARGET`.
    pub state: u32,
    /// This CPU's last answer of `TARGETS`, for `sched_switch` alone (it
    /// runs with interrupts off, so nothing else on the CPU writes it
    /// meanwhile): the tgid asked, its slot (`NO_SLOT`: not a target),
    /// and `TARGETS_GEN` when it was asked. Most switches that involve a
    /// target involve the same process as the one before on that CPU; the
    /// answer is good while the count has not moved.
    pub cache_tgid: u32,
    pub cache_slot: u32,
    pub cache_gen: u64,
}

impl CpuSlice {
    /// No switch seen on this CPU since the programs were attached.
    pub const UNKNOWN: u32 = 0;
    /// A task outside the target runs.
    pub const OTHER: u32 = 1;
    /// Target thread `tid` runs since `since_ns`.
    pub const TARGET: u32 = 2;
    /// `cache_slot` of a tgid that is not a target.
    pub const NO_SLOT: u32 = u32::MAX;
    pub const ZERO: Self = Self {
        seq: 0,
        since_ns: 0,
        cal_clock_ns: 0,
        cal_rq_ns: 0,
        base_runtime_ns: 0,
        tid: 0,
        state: Self::UNKNOWN,
        cache_tgid: 0,
        cache_slot: Self::NO_SLOT,
        cache_gen: 0,
    };
}

/// A thread's own scheduler counters, as the kernel keeps them in its
/// `task_struct` (read by the programs, and from /proc by the oracle).
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
    /// `min_flt`: page faults served without I/O.
    pub min_flt: u64,
    /// `maj_flt`: page faults that needed I/O.
    pub maj_flt: u64,
    /// `ioac.write_bytes`: bytes the thread dirtied in the page cache (when
    /// it dirtied them) or wrote with direct I/O (when it issued them), as
    /// the kernel's I/O accounting counts them (`/proc/PID/io`).
    pub io_write_bytes: u64,
}

impl ThreadCounters {
    /// A counter whose value is not known.
    pub const UNKNOWN: u64 = u64::MAX;

    pub const ZERO: Self = Self {
        runtime_ns: 0,
        nvcsw: 0,
        nivcsw: 0,
        run_delay_ns: 0,
        migrations: 0,
        min_flt: 0,
        maj_flt: 0,
        io_write_bytes: 0,
    };

    /// Field by field, modulo 2^64.
    #[must_use]
    pub const fn wrapping_add(&self, o: &Self) -> Self {
        Self {
            runtime_ns: self.runtime_ns.wrapping_add(o.runtime_ns),
            nvcsw: self.nvcsw.wrapping_add(o.nvcsw),
            nivcsw: self.nivcsw.wrapping_add(o.nivcsw),
            run_delay_ns: self.run_delay_ns.wrapping_add(o.run_delay_ns),
            migrations: self.migrations.wrapping_add(o.migrations),
            min_flt: self.min_flt.wrapping_add(o.min_flt),
            maj_flt: self.maj_flt.wrapping_add(o.maj_flt),
            io_write_bytes: self.io_write_bytes.wrapping_add(o.io_write_bytes),
        }
    }

    /// Field by field, modulo 2^64.
    #[must_use]
    pub const fn wrapping_sub(&self, o: &Self) -> Self {
        Self {
            runtime_ns: self.runtime_ns.wrapping_sub(o.runtime_ns),
            nvcsw: self.nvcsw.wrapping_sub(o.nvcsw),
            nivcsw: self.nivcsw.wrapping_sub(o.nivcsw),
            run_delay_ns: self.run_delay_ns.wrapping_sub(o.run_delay_ns),
            migrations: self.migrations.wrapping_sub(o.migrations),
            min_flt: self.min_flt.wrapping_sub(o.min_flt),
            maj_flt: self.maj_flt.wrapping_sub(o.maj_flt),
            io_write_bytes: self.io_write_bytes.wrapping_sub(o.io_write_bytes),
        }
    }

    /// What an exited thread adds to its process's exited threads'
    /// counters (`SchedStats::dead_*`), from its final counters.
    ///
    /// The kernel counted its final switch-out in `nvcsw` just before the
    /// switch tracepoint, but a thread other than the leader
    /// (`folded_before`) was folded into the process's totals (`getrusage`,
    /// `wait4`, `/proc/PID/stat`) when it was released, before that switch:
    /// so that switch is left out for such a thread, and the process's
    /// switches are counted as the kernel counts them. (A leader's own
    /// counters are added when its process is reaped, after its final
    /// switch: that one stays.)
    #[must_use]
    pub const fn as_exited(self, folded_before: bool) -> Self {
        let mut c = self;
        if folded_before {
            c.nvcsw = c.nvcsw.saturating_sub(1);
        }
        c
    }

    /// A thread's final counters estimated from its counters when it began
    /// to exit (`sched_process_exit`): its final switch-out (a voluntary
    /// one) added. Short of what it ran on its way out after that (its
    /// share of `meta.json` `ebpf.exit_path_cpu_ns`, microseconds), and of
    /// any switch, migration or fault there.
    #[must_use]
    pub const fn final_from_exit_start(self) -> Self {
        let mut c = self;
        c.nvcsw = c.nvcsw.wrapping_add(1);
        c
    }
}

/// Entries of `EXITING`: threads between the start of their exit and their
/// final switch-out (or, where the probe missed that, their free), over
/// every target. More at once are not listed (`map_errors`): only their
/// repair is lost, not their final switch-out.
pub const EXITING_MAX: u32 = 16_384;

/// A target thread that began to exit and whose final counters are not
/// counted yet (map `EXITING`, by `struct task_struct *`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitingThread {
    /// Its process's id.
    pub tgid: u32,
    /// Its process's target slot.
    pub slot: u32,
    /// 1 for a thread other than its process's leader
    /// ([`ThreadCounters::as_exited`]).
    pub folded_before: u32,
    /// Its own id: another task freed later at the same address (the
    /// thread's memory reused) is not it.
    pub tid: u32,
    /// Its own counters when it began to exit.
    pub at_exit: ThreadCounters,
}

/// Per-bucket maximum of a latency on one CPU, valid for bucket `epoch` only
/// (two per target slot, at `epoch & 1`: `SchedStats::runq_max`, and map
/// `BLOCK_MAX` at `2 * slot + (epoch & 1)`, a `PerCpuArray`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxSlot {
    pub epoch: u64,
    pub max_ns: u64,
}

impl MaxSlot {
    pub const ZERO: Self = Self {
        epoch: 0,
        max_ns: 0,
    };
}

const _: () = assert!(core::mem::size_of::<SchedStats>() == (20 + 8 + 4 + HIST_BUCKETS) * 8);
const _: () = assert!(core::mem::size_of::<LiveCounters>() == 12 * 8);
const _: () = assert!(core::mem::size_of::<CpuSlice>() == 64);
const _: () = assert!(core::mem::size_of::<ThreadCounters>() == 8 * 8);
const _: () = assert!(core::mem::size_of::<MaxSlot>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers without padding (asserted above).
    unsafe impl aya::Pod for super::SchedStats {}
    unsafe impl aya::Pod for super::LiveCounters {}
    unsafe impl aya::Pod for super::CpuSlice {}
    unsafe impl aya::Pod for super::MaxSlot {}
    unsafe impl aya::Pod for super::ThreadCounters {}
    unsafe impl aya::Pod for super::ExitingThread {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's count of a process's voluntary switches: a thread other
    /// than the leader was folded into its process before its final
    /// switch-out, the leader after. An estimate from a thread's counters
    /// at exit start adds that switch, so it agrees with its final counters
    /// in every field but the exit path's own.
    #[test]
    fn an_exited_threads_switches_are_counted_as_the_kernel_counts_its_process() {
        let at_exit = ThreadCounters {
            runtime_ns: 1_000,
            nvcsw: 7,
            nivcsw: 2,
            run_delay_ns: 30,
            migrations: 1,
            min_flt: 40,
            maj_flt: 0,
            io_write_bytes: 4_096,
        };
        // Its final counters: the final switch-out counted in nvcsw, 50 ns
        // more on the way out.
        let last = ThreadCounters {
            runtime_ns: 1_050,
            nvcsw: 8,
            ..at_exit
        };
        for folded_before in [true, false] {
            let exact = last.as_exited(folded_before);
            let estimate = at_exit.final_from_exit_start().as_exited(folded_before);
            assert_eq!(exact.nvcsw, if folded_before { 7 } else { 8 });
            assert_eq!(
                estimate,
                ThreadCounters {
                    runtime_ns: 1_000,
                    ..exact
                }
            );
        }
        let mut s = SchedStats::ZERO;
        s.add_exited(&last.as_exited(true));
        assert_eq!(
            (s.dead_runtime_ns, s.dead_nvcsw, s.dead_io_write_bytes),
            (1_050, 7, 4_096)
        );
        assert_eq!((s.exits_accounted, s.exits_estimated), (1, 0));
    }

    #[test]
    fn accumulate_sums_every_field() {
        // Every field a distinct value, so a field left out (or summed into
        // another) shows: the struct is plain u64s, walked as such.
        const N: usize = core::mem::size_of::<SchedStats>() / 8;
        fn words(s: &SchedStats) -> [u64; N] {
            // SAFETY: SchedStats is #[repr(C)] u64s only (asserted above).
            unsafe { core::mem::transmute_copy(s) }
        }
        let mut vals = [0u64; N];
        for (i, v) in vals.iter_mut().enumerate() {
            *v = 1000 + i as u64;
        }
        // SAFETY: as above, the other way round.
        let b: SchedStats = unsafe { core::mem::transmute_copy(&vals) };
        let mut a = SchedStats::ZERO;
        a.accumulate(&b);
        a.accumulate(&b);
        // Every word but the per-CPU maxima, which are not sums (the loader
        // reads them CPU by CPU).
        let max_words = core::mem::offset_of!(SchedStats, runq_max) / 8
            ..core::mem::offset_of!(SchedStats, runq_hist) / 8;
        assert_eq!(max_words.len(), 4);
        for (i, (got, v)) in words(&a).iter().zip(vals).enumerate() {
            let want = if max_words.contains(&i) { 0 } else { 2 * v };
            assert_eq!(*got, want, "word {i} of SchedStats");
        }
        // And by name, the ones the rows need.
        assert_eq!(a.dead_runtime_ns, 2 * b.dead_runtime_ns);
        assert_eq!(a.exits_accounted, 2 * b.exits_accounted);
        assert_eq!(a.runq_hist[63], 2 * b.runq_hist[63]);
    }
}
