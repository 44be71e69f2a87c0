//! The scheduler probe family (programs in `cis490-ebpf/src/sched.rs`): the
//! one the tracer cannot run without.
//!
//! Its reader makes the scheduler fields of the eBPF rows from
//! `SCHED_STATS` (exited threads, events, the per-bucket maxima) and the
//! task iterator's `LIVE` (threads alive at the boundary).

use std::os::fd::{AsFd as _, OwnedFd};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
};
use cis490_common::{
    LiveCounters, SchedStats, map as common_map,
    sched::{EXITING_MAX, ExitingThread, RunDelaySource, global, map, prog},
};

use super::{
    maps::{hist_delta, open, read_percpu, take_where},
    spec::{
        Attacher, FamilyStatus, KernelFacts, OffsetSpec,
        ProbeKind::{Iter, TpBtf},
        ProbeSpec,
    },
    targets::Slot,
};
use crate::row::Measures;

mod task_iter;

pub const FAMILY: &str = "sched";

pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: prog::SCHED_SWITCH,
        tracepoint: "sched_switch",
        kind: TpBtf,
        required: true,
    },
    ProbeSpec {
        program: prog::SCHED_WAKEUP,
        tracepoint: "sched_wakeup",
        kind: TpBtf,
        required: true,
    },
    ProbeSpec {
        program: prog::SCHED_WAKEUP_NEW,
        tracepoint: "sched_wakeup_new",
        kind: TpBtf,
        required: true,
    },
    ProbeSpec {
        program: prog::TASK_NEWTASK,
        tracepoint: "task_newtask",
        kind: TpBtf,
        required: true,
    },
    ProbeSpec {
        program: prog::SCHED_PROCESS_EXIT,
        tracepoint: "sched_process_exit",
        kind: TpBtf,
        required: true,
    },
    ProbeSpec {
        program: prog::SCHED_PROCESS_EXEC,
        tracepoint: "sched_process_exec",
        kind: TpBtf,
        required: false,
    },
    ProbeSpec {
        program: prog::TASK_RENAME,
        tracepoint: "task_rename",
        kind: TpBtf,
        required: false,
    },
    ProbeSpec {
        program: prog::SCHED_PROCESS_FREE,
        tracepoint: "sched_process_free",
        kind: TpBtf,
        required: false,
    },
];

/// The task iterator that reads the live threads' counters at every bucket
/// boundary (`bpf_iter_task`, Linux 5.8+; limited to the target's threads
/// from Linux 6.1).
pub const ITER: ProbeSpec = ProbeSpec {
    program: prog::SCHED_ITER,
    tracepoint: "task",
    kind: Iter,
    required: true,
};

pub const OFFSETS: &[OffsetSpec] = &[
    OffsetSpec {
        global: global::TASK_PID_OFFSET,
        ty: "task_struct",
        path: "pid",
    },
    OffsetSpec {
        global: global::TASK_TGID_OFFSET,
        ty: "task_struct",
        path: "tgid",
    },
    OffsetSpec {
        global: global::TASK_RUNTIME_OFFSET,
        ty: "task_struct",
        path: "se.sum_exec_runtime",
    },
    OffsetSpec {
        global: global::TASK_NVCSW_OFFSET,
        ty: "task_struct",
        path: "nvcsw",
    },
    OffsetSpec {
        global: global::TASK_NIVCSW_OFFSET,
        ty: "task_struct",
        path: "nivcsw",
    },
    OffsetSpec {
        global: global::TASK_MIGRATIONS_OFFSET,
        ty: "task_struct",
        path: "se.nr_migrations",
    },
    OffsetSpec {
        global: global::TASK_MIN_FLT_OFFSET,
        ty: "task_struct",
        path: "min_flt",
    },
    OffsetSpec {
        global: global::TASK_MAJ_FLT_OFFSET,
        ty: "task_struct",
        path: "maj_flt",
    },
    // Absent without CONFIG_TASK_IO_ACCOUNTING: io_write_bytes is then null.
    OffsetSpec {
        global: global::TASK_IO_WRITE_BYTES_OFFSET,
        ty: "task_struct",
        path: "ioac.write_bytes",
    },
    // Absent without CONFIG_SCHED_INFO: run-queue delay then comes from events.
    OffsetSpec {
        global: global::TASK_RUN_DELAY_OFFSET,
        ty: "task_struct",
        path: "sched_info.run_delay",
    },
    OffsetSpec {
        global: global::TASK_STATE_OFFSET,
        ty: "task_struct",
        path: "__state",
    },
    OffsetSpec {
        global: global::TASK_CPU_OFFSET,
        ty: "task_struct",
        path: "thread_info.cpu",
    },
    OffsetSpec {
        global: global::TASK_ON_CPU_OFFSET,
        ty: "task_struct",
        path: "on_cpu",
    },
    // `PF_EXITING` in it: a thread that began to exit.
    OffsetSpec {
        global: global::TASK_FLAGS_OFFSET,
        ty: "task_struct",
        path: "flags",
    },
    // Single run-queue delays off the kernel's sched_info (rq->clock -
    // last_queued at switch-in); without any of these, from events.
    OffsetSpec {
        global: global::TASK_LAST_QUEUED_OFFSET,
        ty: "task_struct",
        path: "sched_info.last_queued",
    },
    OffsetSpec {
        global: global::TASK_CFS_RQ_OFFSET,
        ty: "task_struct",
        path: "se.cfs_rq",
    },
    OffsetSpec {
        global: global::CFS_RQ_RQ_OFFSET,
        ty: "cfs_rq",
        path: "rq",
    },
    OffsetSpec {
        global: global::RQ_CLOCK_OFFSET,
        ty: "rq",
        path: "clock",
    },
    // A running thread's time since its last tick, on the clock its runtime
    // advances on; without them, since its switch-in on `rq.clock`.
    OffsetSpec {
        global: global::TASK_EXEC_START_OFFSET,
        ty: "task_struct",
        path: "se.exec_start",
    },
    OffsetSpec {
        global: global::RQ_CLOCK_TASK_OFFSET,
        ty: "rq",
        path: "clock_task",
    },
];

/// Offsets without which the trace fails (all but the run-delay ones).
pub const REQUIRED_OFFSETS: &[&str] = &[
    global::TASK_PID_OFFSET,
    global::TASK_TGID_OFFSET,
    global::TASK_RUNTIME_OFFSET,
    global::TASK_NVCSW_OFFSET,
    global::TASK_NIVCSW_OFFSET,
    global::TASK_MIGRATIONS_OFFSET,
    global::TASK_MIN_FLT_OFFSET,
    global::TASK_MAJ_FLT_OFFSET,
    global::TASK_STATE_OFFSET,
    global::TASK_CPU_OFFSET,
    global::TASK_ON_CPU_OFFSET,
    global::TASK_FLAGS_OFFSET,
];

/// The family's decisions: where run-queue delays come from, and which
/// probes attach. The wakeup probes run on every wakeup of the machine:
/// with the counters, only when `wakeups` asks or the run-queue delays are
/// timed from the wakeup.
pub fn plan(facts: &KernelFacts, counters: bool, wakeups: bool) -> SchedPlan {
    let run_delay = run_delay_source(facts);
    SchedPlan {
        run_delay,
        counters,
        wakeups: counters && (wakeups || run_delay != RunDelaySource::SchedInfo),
        io_accounting: facts
            .offsets
            .get(global::TASK_IO_WRITE_BYTES_OFFSET)
            .copied()
            .flatten()
            .is_some(),
    }
}

/// Where run-queue delays come from on this kernel (the programs read the
/// decision as the global `RUN_DELAY_SOURCE`, the reader as this value):
/// from the offsets the kernel's BTF has.
fn run_delay_source(facts: &KernelFacts) -> RunDelaySource {
    let has = |g: &str| facts.offsets.get(g).copied().flatten().is_some();
    let single = [
        global::TASK_LAST_QUEUED_OFFSET,
        global::TASK_CFS_RQ_OFFSET,
        global::CFS_RQ_RQ_OFFSET,
        global::RQ_CLOCK_OFFSET,
    ];
    match (
        has(global::TASK_RUN_DELAY_OFFSET),
        single.iter().all(|g| has(g)),
    ) {
        (true, true) => RunDelaySource::SchedInfo,
        (true, false) => RunDelaySource::SumFromSchedInfo,
        (false, _) => RunDelaySource::WakeupMarks,
    }
}

/// The family's path in meta.json (a label, never parsed back), and why it
/// is degraded when it is.
fn path_and_note(run_delay: RunDelaySource) -> (&'static str, Option<String>) {
    match run_delay {
        RunDelaySource::SchedInfo => ("tp_btf+iter+sched_info", None),
        RunDelaySource::SumFromSchedInfo => (
            "tp_btf+iter+sched_info+wakeup_marks",
            Some(
                "no sched_info.last_queued / se.cfs_rq (CONFIG_FAIR_GROUP_SCHED): single \
                 run-queue delays are timed from the wakeup"
                    .to_owned(),
            ),
        ),
        RunDelaySource::WakeupMarks => (
            "tp_btf+iter+wakeup_marks",
            Some(
                "no task_struct.sched_info.run_delay (CONFIG_SCHED_INFO): runq_delay_ns is \
                 summed from single delays timed from the wakeup"
                    .to_owned(),
            ),
        ),
    }
}

/// What attaching the family hands to its readers: the plan (the run-delay
/// decision, what attached). Each reader makes its own link of the task
/// iterator, for its target.
#[derive(Clone, Copy, Debug)]
pub struct Attached {
    plan: SchedPlan,
}

/// The probes that count (on every switch and wakeup of the machine); the
/// others carry the thread lifecycle to `events.jsonl`.
fn counts(spec: &ProbeSpec) -> bool {
    [prog::SCHED_SWITCH, prog::SCHED_PROCESS_FREE].contains(&spec.program) || is_wakeup(spec)
}

fn is_wakeup(spec: &ProbeSpec) -> bool {
    [prog::SCHED_WAKEUP, prog::SCHED_WAKEUP_NEW].contains(&spec.program)
}

/// Why the wakeup probes are left out when the counters run.
pub const WAKEUPS_NOT_ASKED: &str = "wakeups not counted (--wakeups)";

/// Why `io_write_bytes` is null on a kernel without per-task I/O accounting.
pub const NO_IO_ACCOUNTING: &str =
    "no task_struct.ioac (CONFIG_TASK_IO_ACCOUNTING): io_write_bytes is null";

/// What the loader's plan decided for this family.
#[derive(Clone, Copy, Debug)]
pub struct SchedPlan {
    pub run_delay: RunDelaySource,
    /// The counting probes attach (else lifecycle only).
    pub counters: bool,
    /// The wakeup probes attach (with the counters).
    pub wakeups: bool,
    /// The kernel keeps per-thread I/O accounting (`task_struct.ioac`,
    /// CONFIG_TASK_IO_ACCOUNTING): else `io_write_bytes` is null.
    pub io_accounting: bool,
}

/// Attaches every scheduler probe the plan asks for and loads the task
/// iterator; a required one that fails ends the trace.
pub fn attach(a: &mut Attacher<'_>, plan: SchedPlan) -> Result<(FamilyStatus, Attached)> {
    let (run_delay, counters) = (plan.run_delay, plan.counters);
    load_iter(a)?;
    for spec in PROBES {
        if !counters && counts(spec) {
            a.skip(FAMILY, spec, super::spec::NOT_ASKED);
            continue;
        }
        if !plan.wakeups && is_wakeup(spec) {
            a.skip(FAMILY, spec, WAKEUPS_NOT_ASKED);
            continue;
        }
        if !a.attach(FAMILY, spec) && spec.required {
            let err = a.last_error().unwrap_or_default();
            bail!(
                "cannot attach {} to tracepoint {}: {err}",
                spec.program,
                spec.tracepoint
            );
        }
    }
    let (path, mut note) = path_and_note(run_delay);
    let mut add_note = |more: &str| {
        note = Some(match note.take() {
            Some(n) => format!("{n}; {more}"),
            None => more.to_owned(),
        });
    };
    if counters && !plan.wakeups {
        add_note(&format!("{WAKEUPS_NOT_ASKED}: wakeups is null"));
    }
    if counters && !plan.io_accounting {
        add_note(NO_IO_ACCOUNTING);
    }
    let status = if counters {
        FamilyStatus {
            family: FAMILY.into(),
            active: true,
            path: Some(path.into()),
            note,
        }
    } else {
        FamilyStatus::off(
            FAMILY,
            &format!(
                "{}: the thread lifecycle probes only",
                super::spec::NOT_ASKED
            ),
        )
    };
    Ok((status, Attached { plan }))
}

/// Loads the task iterator (each reader links it for its target).
fn load_iter(a: &mut Attacher<'_>) -> Result<()> {
    if a.attach(FAMILY, &ITER) {
        return Ok(());
    }
    let err = a.last_error().unwrap_or_else(|| "cannot load it".into());
    bail!(
        "cannot load the task iterator {} (BPF task iterators need Linux 5.8+): {err}",
        ITER.program
    )
}

/// Creates a link of the loaded task iterator for thread group `tgid`: its
/// threads only where the kernel filters by pid (6.1+), else every task
/// (the program filters by target).
fn iter_link(ebpf: &Ebpf, tgid: u32) -> Result<OwnedFd> {
    let prog: &aya::programs::Iter = ebpf
        .program(ITER.program)
        .ok_or_else(|| anyhow::anyhow!("no program {} in the eBPF object", ITER.program))?
        .try_into()
        .with_context(|| ITER.program)?;
    let fd = prog.fd().with_context(|| ITER.program)?.as_fd();
    task_iter::link(fd, Some(tgid))
        .or_else(|_| task_iter::link(fd, None))
        .context("cannot create the task iterator's link")
}

// ---- the reader ----------------------------------------------------------

/// Cumulative totals at one sample: exited threads plus live ones.
#[derive(Clone, Copy)]
struct Totals {
    stats: SchedStats,
    cpu_ns: u64,
    nvcsw: u64,
    nivcsw: u64,
    migrations: u64,
    runq_delay_ns: u64,
    min_flt: u64,
    maj_flt: u64,
    io_write_bytes: u64,
    threads: u64,
    /// This read's torn slice copies (`LiveCounters::torn`).
    torn: u64,
}

impl Totals {
    /// Each counter at least what it was: a thread that begins to exit
    /// between the read of the exited and exiting threads' counters and the
    /// task iterator's visit is in neither for that read, so a total can
    /// dip; the next sample catches it up, and keeping the totals monotonic
    /// keeps every episode sum exact. (Before the exiting threads were
    /// counted apart, a thread was in neither from leaving the thread list
    /// to its final switch-out, which a preempted exit stretched to tens of
    /// ms: a 20 ms bucket with no CPU time and the next with two buckets'.)
    fn at_least(self, prev: &Totals) -> Totals {
        Totals {
            cpu_ns: self.cpu_ns.max(prev.cpu_ns),
            nvcsw: self.nvcsw.max(prev.nvcsw),
            nivcsw: self.nivcsw.max(prev.nivcsw),
            migrations: self.migrations.max(prev.migrations),
            runq_delay_ns: self.runq_delay_ns.max(prev.runq_delay_ns),
            min_flt: self.min_flt.max(prev.min_flt),
            maj_flt: self.maj_flt.max(prev.maj_flt),
            io_write_bytes: self.io_write_bytes.max(prev.io_write_bytes),
            ..self
        }
    }
}

pub struct SchedReader {
    /// The target's slot.
    slot: u32,
    /// The target's process id.
    tgid: u32,
    stats: PerCpuArray<MapData, SchedStats>,
    live: Array<MapData, LiveCounters>,
    iter_link: OwnedFd,
    /// Whether the kernel keeps `sched_info.run_delay` per thread.
    run_delay: bool,
    prev: Option<Totals>,
    /// Set by the probes when the target's pid went to a new process.
    gone: Array<MapData, u32>,
    /// Why the task iterator cannot see the target's live threads, when it
    /// cannot: their counters are then unknown, and so `null`.
    blind: Option<String>,
    /// Whether the counting probes run (no final switch-outs to wait for
    /// without them).
    counters: bool,
    /// Torn slice copies over the samples (`meta.json`
    /// `ebpf.torn_slice_reads`).
    torn: u64,
    /// Whether the wakeup probes run (else `wakeups` is null).
    wakeups: bool,
    /// Whether the kernel keeps per-thread I/O accounting (else
    /// `io_write_bytes` is null).
    io_accounting: bool,
    /// Every target's threads that began to exit and are not counted yet.
    exiting: HashMap<MapData, u64, ExitingThread>,
    /// What the loader itself counted: exited threads whose final
    /// switch-out and free the probes both missed ([`Self::sweep_exiting`]),
    /// added to the programs' counters at every read.
    estimated: SchedStats,
}

impl SchedReader {
    pub fn new(ebpf: &Ebpf, slot: Slot, tgid: u32, attached: Attached) -> Result<Self> {
        let iter_link = iter_link(ebpf, tgid)?;
        let Attached {
            plan:
                SchedPlan {
                    run_delay,
                    counters,
                    wakeups,
                    io_accounting,
                },
        } = attached;
        Ok(Self {
            slot: slot.index(),
            tgid,
            stats: open(ebpf, map::SCHED_STATS)?,
            live: open(ebpf, map::LIVE)?,
            iter_link,
            run_delay: run_delay != RunDelaySource::WakeupMarks,
            prev: None,
            gone: open(ebpf, common_map::TARGET_GONE)?,
            blind: None,
            counters,
            torn: 0,
            wakeups,
            io_accounting,
            exiting: open(ebpf, map::EXITING)?,
            estimated: SchedStats::ZERO,
        })
    }

    /// Checks that the task iterator sees the target's threads: a live
    /// process has at least one. Some kernels hide a process from task
    /// iterators (here: the sandbox's pid 1, which no `iter/task` run
    /// visits, filtered or not); then the live threads' counters cannot be
    /// read and the fields that need them are `null` from the first row.
    /// Returns the reason when blind.
    pub fn check_visible(&mut self, pid: i32) -> Option<String> {
        let threads = self.live().ok().map(|l| l.threads + l.dying);
        let in_proc = crate::target::thread_ids(pid).map_or(0, |t| t.len());
        if threads == Some(0) && in_proc > 0 {
            self.blind = Some(format!(
                "the kernel's task iterator shows none of pid {pid}'s {in_proc} threads: \
                 cpu_ns, context switches, migrations, runq_delay_ns, page faults and threads are null \
                 (wakeups and single run-queue delays still come from events)"
            ));
        }
        self.blind.clone()
    }

    /// Whether a new process got the target's pid (after the target ended)
    /// while tracing; the probes stopped matching anything then.
    pub fn target_pid_reused(&self) -> bool {
        self.gone.get(&self.slot, 0).is_ok_and(|v| v != 0)
    }

    /// Once the target has exited: waits (at most `limit`) until every
    /// thread of it has made its final switch-out, which adds its final
    /// counters to the exited threads', so the last row has them. (The
    /// target's exit is reported when its last thread is marked exited,
    /// a moment before that thread leaves its CPU; in a VM whose virtual
    /// CPU is descheduled, that moment can last milliseconds.)
    ///
    /// A thread that is not the leader leaves the thread list (where the
    /// iterator finds it) before its final switch-out, so the iterator alone
    /// cannot tell that one is still to come: the probes also count the
    /// exits that began (`sched_process_exit`) and the final switch-outs
    /// accounted, and the wait lasts until the two are equal too.
    ///
    /// Returns how many are still to come after `limit`.
    pub fn wait_for_final_switches(&mut self, limit: std::time::Duration) -> u64 {
        if !self.counters {
            return 0;
        }
        let t0 = std::time::Instant::now();
        let mut pending = None;
        while t0.elapsed() < limit {
            let live_settled = self
                .live()
                .ok()
                .is_none_or(|l| l.threads == 0 && l.dying == 0);
            let exits = read_percpu(
                &self.stats,
                map::SCHED_STATS,
                self.slot,
                SchedStats::ZERO,
                SchedStats::accumulate,
            )
            .map(|s| s.exits_started.saturating_sub(s.exits_accounted))
            .unwrap_or(0);
            pending = Some(exits);
            if live_settled && exits == 0 {
                return 0;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        pending.unwrap_or(0)
    }

    /// Once the target has ended and the wait for its final switch-outs is
    /// over: counts the target's threads still listed as exiting
    /// (`EXITING`), taking them off the list, and returns how many.
    ///
    /// Such a thread is one whose final switch-out and free the probes both
    /// missed. The second happens: here the kernel now and then runs no
    /// program for a free that its own trace event records (2 of 966 frees
    /// in one measurement, both in a softirq on top of the same host
    /// process), and counts no recursion miss for it. Such a thread is
    /// counted from its counters when it began to exit
    /// ([`ThreadCounters::final_from_exit_start`]), in the last row, and
    /// `meta.json` `ebpf.exits_estimated` counts it. An entry the kernel
    /// removes meanwhile is the kernel's to count. (An episode that ends
    /// while its target runs estimates none: a thread may still be on its
    /// way out; its entries are forgotten when the slot is freed,
    /// `Targets::remove`.)
    ///
    /// [`ThreadCounters::final_from_exit_start`]: cis490_common::ThreadCounters::final_from_exit_start
    pub fn sweep_exiting(&mut self) -> u64 {
        let (slot, tgid) = (self.slot, self.tgid);
        let mine = take_where(&mut self.exiting, 2 * EXITING_MAX, |e| {
            e.slot == slot && e.tgid == tgid
        });
        let counted = mine.len() as u64;
        for (_, e) in mine {
            let c = e
                .at_exit
                .final_from_exit_start()
                .as_exited(e.folded_before != 0);
            self.estimated.exiting = self.estimated.exiting.wrapping_sub(&e.at_exit);
            self.estimated.add_exited(&c);
            self.estimated.exits_estimated += 1;
        }
        counted
    }

    /// One run of the task iterator over the target's live threads: its
    /// `LIVE` entry zeroed, the run, the entry read. Runs are one at a time
    /// in a process (a server's episodes share the entries; where the
    /// kernel cannot filter by pid a run visits every target's threads).
    fn live(&mut self) -> Result<LiveCounters> {
        static RUNS: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = RUNS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.live
            .set(self.slot, LiveCounters::ZERO, 0)
            .context(map::LIVE)?;
        task_iter::run(self.iter_link.as_fd()).context("running the task iterator")?;
        self.live.get(&self.slot, 0).context(map::LIVE)
    }

    /// Cumulative event counters so far (for meta.json and progress).
    pub fn totals(&self) -> &SchedStats {
        static ZERO: SchedStats = SchedStats::ZERO;
        self.prev.as_ref().map_or(&ZERO, |p| &p.stats)
    }

    /// The totals now, and the largest single run-queue delay of bucket
    /// epoch `ended` on any CPU, from one read of the per-CPU counters.
    fn read(&mut self, ended: u64) -> Result<(Totals, Option<u64>)> {
        // The exited and exiting threads first, then the live ones: a thread
        // that begins to exit in between (microseconds) is then missing for
        // one sample (caught up by the next), never counted twice (the
        // iterator skips a thread from the moment it is listed as exiting,
        // when its counters at exit start join the exiting ones, until they
        // leave them for the exited ones at its final switch-out).
        let per_cpu = self.stats.get(&self.slot, 0).context(map::SCHED_STATS)?;
        let mut stats = self.estimated;
        for s in per_cpu.iter() {
            stats.accumulate(s);
        }
        let i = (ended & 1) as usize;
        let max = per_cpu
            .iter()
            .map(|s| s.runq_max[i])
            .filter(|m| m.epoch == ended)
            .map(|m| m.max_ns)
            .max();
        let live = self.live()?;
        // Exited threads, exiting ones (at their exit start), live ones.
        let x = &stats.exiting;
        let totals = Totals {
            stats,
            cpu_ns: (stats.dead_runtime_ns.wrapping_add(x.runtime_ns))
                .wrapping_add(live.runtime_ns),
            nvcsw: (stats.dead_nvcsw.wrapping_add(x.nvcsw)).wrapping_add(live.nvcsw),
            nivcsw: (stats.dead_nivcsw.wrapping_add(x.nivcsw)).wrapping_add(live.nivcsw),
            migrations: (stats.dead_migrations.wrapping_add(x.migrations))
                .wrapping_add(live.migrations),
            runq_delay_ns: if self.run_delay {
                (stats.dead_run_delay_ns.wrapping_add(x.run_delay_ns))
                    .wrapping_add(live.run_delay_ns)
            } else {
                stats.runq_delay_ns
            },
            min_flt: (stats.dead_min_flt.wrapping_add(x.min_flt)).wrapping_add(live.min_flt),
            maj_flt: (stats.dead_maj_flt.wrapping_add(x.maj_flt)).wrapping_add(live.maj_flt),
            io_write_bytes: (stats.dead_io_write_bytes.wrapping_add(x.io_write_bytes))
                .wrapping_add(live.io_write_bytes),
            threads: live.threads,
            torn: live.torn,
        };
        Ok((totals, max))
    }

    /// Torn slice copies the task iterator met and did without.
    pub fn torn_slice_reads(&self) -> u64 {
        self.torn
    }

    pub fn sample(&mut self, ended: u64, m: &mut Measures) -> Result<()> {
        let (cur, max) = self.read(ended)?;
        self.torn += cur.torn;
        let Some(prev) = self.prev else {
            // The baseline.
            self.prev = Some(cur);
            return Ok(());
        };
        let cur = cur.at_least(&prev);
        let (p, c) = (&prev.stats, &cur.stats);
        let d = |a: u64, b: u64| Some(a.saturating_sub(b));
        if self.blind.is_none() {
            m.cpu_ns = d(cur.cpu_ns, prev.cpu_ns);
            m.ctx_switches_voluntary = d(cur.nvcsw, prev.nvcsw);
            m.ctx_switches_involuntary = d(cur.nivcsw, prev.nivcsw);
            m.set_ctx_total();
            m.runq_delay_ns = d(cur.runq_delay_ns, prev.runq_delay_ns);
            m.threads = Some(cur.threads);
            m.migrations = d(cur.migrations, prev.migrations);
            m.page_faults_minor = d(cur.min_flt, prev.min_flt);
            m.page_faults_major = d(cur.maj_flt, prev.maj_flt);
            if self.io_accounting {
                m.io_write_bytes = d(cur.io_write_bytes, prev.io_write_bytes);
            }
        }
        m.wakeups = self.wakeups.then(|| c.wakeups.saturating_sub(p.wakeups));
        // No delay measured in the bucket: the maximum is 0, not unknown.
        m.runq_delay_max_ns = Some(max.unwrap_or(0));
        m.runq_delay_hist_log2 = Some(hist_delta(&c.runq_hist, &p.runq_hist));
        m.events = d(c.events, p.events);
        m.dropped_events = d(c.dropped, p.dropped);
        self.prev = Some(cur);
        Ok(())
    }
}
