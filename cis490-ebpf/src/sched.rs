//! Scheduler probes (BTF-enabled raw tracepoints and a task iterator):
//! on-CPU time, context switches, wakeups, migrations, run-queue delay,
//! thread lifecycle.
//!
//! The counters come from the kernel's own per-thread counters, read where
//! it costs least: the threads alive at a bucket boundary are read by the
//! task iterator `sched_iter`, which the loader runs at every boundary; a
//! thread that exits is read once, at its final switch-out. So a context
//! switch of a target thread costs a few loads here (no map lookup by tid,
//! no helper call but the clock at a switch-in), and nothing depends on a
//! tracepoint event being delivered. Events still give what counters cannot:
//! wakeups, the distribution of single run-queue delays, and the running
//! slice at a bucket boundary (`CPU_SLICE`). Only thread lifecycle records
//! are streamed.

use aya_ebpf::{
    Global,
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes},
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::BtfTracePointContext,
};
use cis490_common::{
    COMM_LEN, CpuSlice, LifecycleKind, LifecycleRecord, LiveCounters, MAX_THREADS, RecordKind,
    SchedStats, ThreadCounters, ThreadTotals,
    sched::{EXITING_MAX, ExitingThread},
};

use crate::{
    maps::{add, bump, bump_hist, emit, epoch, raise_max_in},
    target::{
        arrival_delay, current, delays_from_sched_info, has_exec_start, has_run_delay, mark_gone,
        rq_clock, rq_clocks, target_slot, target_slot_cached, task_counters, task_cpu,
        task_exec_start, task_exiting, task_on_cpu, task_runtime, task_state, task_tgid, task_tid,
    },
};

/// Cumulative scheduler counters per target slot, per CPU. Sized by the
/// loader.
#[map]
pub static SCHED_STATS: PerCpuArray<SchedStats> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scheduler counters of target slot `slot`.
#[inline(always)]
fn stats(slot: u32) -> Result<*mut SchedStats, i32> {
    SCHED_STATS.get_ptr_mut(slot).ok_or(NO_MAP)
}

/// Which target thread runs on each CPU, and since when.
#[map]
pub static CPU_SLICE: PerCpuArray<CpuSlice> = PerCpuArray::with_max_entries(1, 0);

/// What the task iterator summed over each target's live threads at its
/// last boundary (zeroed by the loader, written by `sched_iter`, read by
/// the loader right after). Sized by the loader.
#[map]
pub static LIVE: Array<LiveCounters> = Array::with_max_entries(1, 0);

/// When each target thread became runnable (wakeup or preemption), ns.
/// Only on kernels whose `sched_info` cannot give single delays.
#[map]
pub static RUNNABLE_SINCE: HashMap<u32, u64> = HashMap::with_max_entries(MAX_THREADS, 0);

/// Target threads that began to exit and whose final switch-out has not
/// been counted yet, by `struct task_struct *` (unique until the task is
/// freed, which comes after its final switch-out), with their process's
/// id and slot and their counters then. Whoever removes an entry counts the
/// thread: its final switch-out, its free, or, for one whose final
/// switch-out and free the programs both missed, `sched_process_exit` when a
/// new thread's task has its address, or the loader once the target ended.
/// A freed slot's entries are removed uncounted (`Targets::remove`).
#[map]
pub static EXITING: HashMap<u64, ExitingThread> = HashMap::with_max_entries(EXITING_MAX, 0);

/// Fault injection for the tests only (0 otherwise): the final switch-out
/// of a thread whose id is a multiple of this is left uncounted, as if the
/// probe had not seen it, so that its repair at `sched_process_free` runs.
#[unsafe(no_mangle)]
static SKIP_FINAL_SWITCH_OF_TID_MULTIPLES: Global<u32> = Global::new(0);

/// Fault injection for the tests only (0 otherwise): the free of a thread
/// whose id is a multiple of this is left alone, as if the kernel had not
/// run the program for it (it happens), so that the loader's count of it
/// from its counters at exit start runs.
#[unsafe(no_mangle)]
static SKIP_FREE_OF_TID_MULTIPLES: Global<u32> = Global::new(0);

/// 1 when the counting probes (`sched_switch`, `sched_process_free`) are
/// attached, set by the loader: else nothing would take a thread out of
/// `EXITING` again.
#[unsafe(no_mangle)]
static COUNTING: Global<u32> = Global::new(0);

type Res = Result<(), i32>;
/// How often (at most) a CPU's slice record pairs the clock with its run
/// queue's clock, ns (the two run at the same rate to a few parts per
/// million, so the pair is good for much longer).
const CALIBRATE_NS: u64 = 4_000_000;
const NO_MAP: i32 = -1;
const EEXIST: i32 = -17;
/// `TASK_DEAD` in `task_struct.__state`: set for a thread's final switch-out.
const TASK_DEAD: u32 = 0x80;

/// `sched_switch(bool preempt, struct task_struct *prev,
///               struct task_struct *next, unsigned int prev_state)`.
/// Runs on every context switch of the machine, with interrupts off.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let _ = try_sched_switch(&ctx);
    0
}

fn try_sched_switch(ctx: &BtfTracePointContext) -> Res {
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let (prev_tgid, next_tgid) = (task_tgid(prev), task_tgid(next));
    let slice = CPU_SLICE.get_ptr_mut(0).ok_or(NO_MAP)?;
    // SAFETY: map value pointers from lookups are valid for this program run.
    let slice = unsafe { &mut *slice };
    // The filter decides almost every switch with two loads; only a set
    // bit costs a look at this CPU's cached answer, and only a stale one
    // the slot lookup.
    let prev_slot = target_slot_cached(prev_tgid, slice);
    let next_slot = if next_tgid == prev_tgid {
        prev_slot
    } else {
        target_slot_cached(next_tgid, slice)
    };
    if prev_slot == CpuSlice::NO_SLOT && next_slot == CpuSlice::NO_SLOT {
        // Hot path: the switch does not concern a target.
        if slice.state != CpuSlice::OTHER {
            slice.state = CpuSlice::OTHER;
        }
        return Ok(());
    }

    // This CPU's counters of the previous thread's target, kept for the
    // next thread's when both are the same target's (one lookup, not two).
    // (Slots are plain numbers here, `NO_SLOT` for none: an `Option`'s
    // undefined payload, kept in a register across paths, is a register the
    // verifier refuses to read.)
    let mut prev_stats: *mut SchedStats = core::ptr::null_mut();
    if prev_slot != CpuSlice::NO_SLOT {
        let s = stats(prev_slot)?;
        prev_stats = s;
        bump(unsafe { &raw mut (*s).events }, 1);
        // The task iterator may read this record from another CPU
        // meanwhile: closed first, it is never counted as running after the
        // thread's own counters took the slice in.
        let (was_state, was_tid) = (slice.state, slice.tid);
        unsafe { core::ptr::write_volatile(&raw mut slice.state, CpuSlice::OTHER) };
        let prev_tid = task_tid(prev);
        if was_state != CpuSlice::TARGET || was_tid != prev_tid {
            // Its switch-in was not delivered: its counters catch up anyway.
            bump(unsafe { &raw mut (*s).slice_mismatches }, 1);
        }
        let prev_state: u64 = ctx.arg(3);
        if prev_state as u32 & TASK_DEAD != 0 {
            let skip = SKIP_FINAL_SWITCH_OF_TID_MULTIPLES.load();
            if skip == 0 || !prev_tid.is_multiple_of(skip) {
                // Its entry (rare: a target thread's final switch-out) comes
                // off the list, and its counters at exit start off the
                // exiting ones; another thread's left at its address (its
                // final switch-out and free both missed) is estimated.
                // SAFETY: a copy of the value, read at once.
                if let Some(e) = unsafe { EXITING.get(prev as u64) }.copied()
                    && EXITING.remove(prev as u64).is_ok()
                {
                    if e.tid != prev_tid {
                        let _ = account_estimated(&e);
                    } else if e.slot == prev_slot {
                        exiting(s, &e.at_exit, false, bump);
                    }
                }
                account_dead(s, prev, prev_tid != prev_tgid, bump);
            }
        }
        if !delays_from_sched_info() {
            runnable_since_on_switch_out(ctx, s, prev_tid, prev_state as u32);
        }
    } else if slice.state != CpuSlice::OTHER {
        slice.state = CpuSlice::OTHER;
    }

    if next_slot != CpuSlice::NO_SLOT {
        let s = if next_slot == prev_slot && !prev_stats.is_null() {
            prev_stats
        } else {
            let s = stats(next_slot)?;
            bump(unsafe { &raw mut (*s).events }, 1);
            s
        };
        // Odd while the record is rewritten (see `CpuSlice::seq`); only this
        // CPU writes it, with interrupts off.
        let seq = slice.seq;
        unsafe { core::ptr::write_volatile(&raw mut slice.seq, seq.wrapping_add(1)) };
        compiler_barrier();
        slice.since_ns = if delays_from_sched_info() {
            // The slice is timed on the scheduler's clock, already read;
            // the iterator converts it with a (clock, rq clock) pair taken
            // at most every CALIBRATE_NS on this CPU: the clock helper is
            // the dearest thing this program would do on every switch.
            let rq_now = rq_clock(next);
            if let Some(delay) = arrival_delay(next, rq_now) {
                record_runq_delay(s, next_slot, delay);
            }
            if slice.cal_clock_ns == 0 || rq_now.wrapping_sub(slice.cal_rq_ns) > CALIBRATE_NS {
                slice.cal_rq_ns = rq_now;
                slice.cal_clock_ns = unsafe { bpf_ktime_get_ns() };
            }
            rq_now
        } else {
            delay_from_wakeup(s, next_slot, task_tid(next));
            slice.cal_clock_ns = 0;
            unsafe { bpf_ktime_get_ns() }
        };
        slice.base_runtime_ns = task_runtime(next);
        slice.tid = task_tid(next);
        compiler_barrier();
        unsafe { core::ptr::write_volatile(&raw mut slice.state, CpuSlice::TARGET) };
        compiler_barrier();
        unsafe { core::ptr::write_volatile(&raw mut slice.seq, seq.wrapping_add(2)) };
    }
    Ok(())
}

/// Keeps the compiler from moving memory accesses across this point (an
/// empty asm block that may touch memory). BPF has no fence instruction and
/// LLVM cannot lower `compiler_fence` for it; the JIT keeps store order on
/// x86 (TSO).
#[inline(always)]
fn compiler_barrier() {
    // SAFETY: an empty asm block.
    unsafe { core::arch::asm!("", options(nostack, preserves_flags)) };
}

/// Adds a thread's counters at exit start to the exiting threads'
/// (`SchedStats::exiting`), or takes them off (`on` false) as the thread is
/// counted, field by field with `plus` (see [`account_dead`]).
#[inline(always)]
fn exiting(s: *mut SchedStats, c: &ThreadCounters, on: bool, plus: fn(*mut u64, u64)) {
    let v = |x: u64| if on { x } else { x.wrapping_neg() };
    let e = unsafe { &raw mut (*s).exiting };
    plus(unsafe { &raw mut (*e).runtime_ns }, v(c.runtime_ns));
    plus(unsafe { &raw mut (*e).nvcsw }, v(c.nvcsw));
    plus(unsafe { &raw mut (*e).nivcsw }, v(c.nivcsw));
    plus(unsafe { &raw mut (*e).migrations }, v(c.migrations));
    plus(unsafe { &raw mut (*e).run_delay_ns }, v(c.run_delay_ns));
    plus(unsafe { &raw mut (*e).min_flt }, v(c.min_flt));
    plus(unsafe { &raw mut (*e).maj_flt }, v(c.maj_flt));
    plus(unsafe { &raw mut (*e).io_write_bytes }, v(c.io_write_bytes));
}

/// A target thread's final switch-out: its counters are final; they move
/// from the live threads (the iterator skips `TASK_DEAD`) to the dead, as
/// [`ThreadCounters::as_exited`] says (`folded_before`: not the leader).
///
/// `plus` adds to a counter: a plain add where nothing can run nested
/// (`sched_switch`, interrupts off), an atomic one elsewhere.
#[inline(always)]
fn account_dead(s: *mut SchedStats, prev: *const u8, folded_before: bool, plus: fn(*mut u64, u64)) {
    account_exited(s, &task_counters(prev).as_exited(folded_before), plus);
}

/// Adds an exited thread's counters ([`ThreadCounters::as_exited`]) to the
/// exited threads' (`SchedStats::add_exited`, field by field with `plus`).
#[inline(always)]
fn account_exited(s: *mut SchedStats, c: &ThreadCounters, plus: fn(*mut u64, u64)) {
    plus(unsafe { &raw mut (*s).dead_runtime_ns }, c.runtime_ns);
    plus(unsafe { &raw mut (*s).dead_nvcsw }, c.nvcsw);
    plus(unsafe { &raw mut (*s).dead_nivcsw }, c.nivcsw);
    plus(unsafe { &raw mut (*s).dead_migrations }, c.migrations);
    plus(unsafe { &raw mut (*s).dead_run_delay_ns }, c.run_delay_ns);
    plus(unsafe { &raw mut (*s).dead_min_flt }, c.min_flt);
    plus(unsafe { &raw mut (*s).dead_maj_flt }, c.maj_flt);
    plus(
        unsafe { &raw mut (*s).dead_io_write_bytes },
        c.io_write_bytes,
    );
    plus(unsafe { &raw mut (*s).exits_accounted }, 1);
}

/// Counts a listed exited thread whose final switch-out and free the
/// programs both missed, from its counters when it began to exit
/// ([`ThreadCounters::final_from_exit_start`]), if its slot still traces
/// its process.
#[inline(always)]
fn account_estimated(e: &ExitingThread) -> Res {
    if target_slot(e.tgid) != Some(e.slot) {
        return Ok(());
    }
    let s = stats(e.slot)?;
    exiting(s, &e.at_exit, false, add);
    let c = e
        .at_exit
        .final_from_exit_start()
        .as_exited(e.folded_before != 0);
    account_exited(s, &c, add);
    add(unsafe { &raw mut (*s).exits_estimated }, 1);
    Ok(())
}

/// `sched_process_free(struct task_struct *p)`: the kernel frees a task,
/// an RCU grace period after both its release and its final switch-out.
/// A target thread still in `EXITING` then began to exit but its final
/// switch-out was never counted (the probe did not run for it): its
/// counters, final now, are counted here, and the repair is counted. A
/// listed entry of another thread (its ids differ) is one whose free was
/// missed too, its memory now this task's: counted from its exit start.
#[btf_tracepoint(function = "sched_process_free")]
pub fn sched_process_free(ctx: BtfTracePointContext) -> i32 {
    let _ = try_free(&ctx);
    0
}

fn try_free(ctx: &BtfTracePointContext) -> Res {
    let p: *const u8 = ctx.arg(0);
    // SAFETY: a copy of the value, read at once.
    let Some(entry) = (unsafe { EXITING.get(p as u64) }).copied() else {
        return Ok(());
    };
    if entry.tid != task_tid(p) || entry.tgid != task_tgid(p) {
        // Another task at the address of a listed thread whose final
        // switch-out and free were both missed (its memory reused by any
        // process's task): that thread is counted from its exit start, not
        // from this task's counters.
        if EXITING.remove(p as u64).is_ok() {
            account_estimated(&entry)?;
        }
        return Ok(());
    }
    let skip = SKIP_FREE_OF_TID_MULTIPLES.load();
    if skip != 0 && task_tid(p).is_multiple_of(skip) {
        return Ok(());
    }
    if EXITING.remove(p as u64).is_err() {
        // The loader took it meanwhile (and counts it).
        return Ok(());
    }
    // The slot must still trace that process (a server may have ended the
    // episode and given the slot to another since).
    if target_slot(entry.tgid) != Some(entry.slot) {
        return Ok(());
    }
    let s = stats(entry.slot)?;
    exiting(s, &entry.at_exit, false, add);
    account_dead(s, p, entry.folded_before != 0, add);
    add(unsafe { &raw mut (*s).final_switch_repairs }, 1);
    Ok(())
}

#[inline(always)]
fn record_runq_delay(s: *mut SchedStats, slot: u32, delay: u64) {
    bump(unsafe { &raw mut (*s).runq_delay_ns }, delay);
    bump(unsafe { &raw mut (*s).runq_delay_count }, 1);
    bump_hist(unsafe { &raw mut (*s).runq_hist }, delay);
    // Only sched_switch (interrupts off) writes the maxima: no nesting.
    raise_max_in(unsafe { &raw mut (*s).runq_max }, epoch(slot), delay);
}

/// Without single delays from `sched_info`: a thread that leaves the CPU
/// runnable (preempted, or yielding in TASK_RUNNING) starts waiting now.
#[inline(always)]
fn runnable_since_on_switch_out(
    ctx: &BtfTracePointContext,
    s: *mut SchedStats,
    tid: u32,
    prev_state: u32,
) {
    let preempt: u64 = ctx.arg(0);
    let _ = RUNNABLE_SINCE.remove(tid);
    if (preempt & 1 != 0 || prev_state == 0)
        && RUNNABLE_SINCE
            .insert(tid, unsafe { bpf_ktime_get_ns() }, BPF_ANY as u64)
            .is_err()
    {
        add(unsafe { &raw mut (*s).map_errors }, 1);
    }
}

/// Without single delays from `sched_info`: wakeup (or preemption) to
/// switch-in, timed with the wakeup mark.
#[inline(always)]
fn delay_from_wakeup(s: *mut SchedStats, slot: u32, tid: u32) {
    if let Some(since) = RUNNABLE_SINCE.get_ptr(tid) {
        let delay = unsafe { bpf_ktime_get_ns() }.saturating_sub(unsafe { *since });
        let _ = RUNNABLE_SINCE.remove(tid);
        record_runq_delay(s, slot, delay);
    }
}

/// `sched_wakeup(struct task_struct *p)`; interrupts off (run queue lock).
#[btf_tracepoint(function = "sched_wakeup")]
pub fn sched_wakeup(ctx: BtfTracePointContext) -> i32 {
    let _ = try_wakeup(&ctx);
    0
}

/// `sched_wakeup_new(struct task_struct *p)`: a new thread's first wakeup.
#[btf_tracepoint(function = "sched_wakeup_new")]
pub fn sched_wakeup_new(ctx: BtfTracePointContext) -> i32 {
    let _ = try_wakeup(&ctx);
    0
}

fn try_wakeup(ctx: &BtfTracePointContext) -> Res {
    let p: *const u8 = ctx.arg(0);
    let Some(slot) = target_slot(task_tgid(p)) else {
        return Ok(());
    };
    let s = stats(slot)?;
    bump(unsafe { &raw mut (*s).wakeups }, 1);
    bump(unsafe { &raw mut (*s).events }, 1);
    if !delays_from_sched_info() {
        // Keep the earliest time if the thread is already runnable.
        let now = unsafe { bpf_ktime_get_ns() };
        match RUNNABLE_SINCE.insert(task_tid(p), now, BPF_NOEXIST as u64) {
            Ok(()) | Err(EEXIST) => {}
            Err(_) => add(unsafe { &raw mut (*s).map_errors }, 1),
        }
    }
    Ok(())
}

/// The task iterator (`iter/task`), run by the loader at every bucket
/// boundary (limited to the target's threads where the kernel can filter
/// by pid, else over every task): sums the live target threads' own
/// counters into `LIVE`. Context: `struct bpf_iter__task { struct
/// bpf_iter_meta *meta; struct task_struct *task; }`; called once per task,
/// then once with `task == NULL`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub fn sched_iter(ctx: *mut core::ffi::c_void) -> i32 {
    let _ = try_iter(ctx as *const *const u8);
    0
}

fn try_iter(ctx: *const *const u8) -> Res {
    // SAFETY: the context is two pointers (checked by the verifier).
    let task = unsafe { *ctx.add(1) };
    if task.is_null() {
        return Ok(());
    }
    let Some(slot) = target_slot(task_tgid(task)) else {
        return Ok(());
    };
    let live = LIVE.get_ptr_mut(slot).ok_or(NO_MAP)?;
    // SAFETY: map value pointer, valid for this program run (runs are one
    // at a time: the loader serialises them).
    let live = unsafe { &mut *live };
    if task_state(task) & TASK_DEAD != 0 {
        // Counted at its final switch-out, or about to be: the loader's last
        // sample waits for the dying ones.
        if task_on_cpu(task) {
            live.dying += 1;
        }
        return Ok(());
    }
    if task_exiting(task)
        // SAFETY: a copy of the value, read at once.
        && unsafe { EXITING.get(task as u64) }.is_some_and(|e| e.tid == task_tid(task))
    {
        // Began to exit: counted with the exiting threads
        // (`SchedStats::exiting`) until its final switch-out, even once it
        // has left the thread list.
        live.threads += 1;
        return Ok(());
    }
    let c = task_counters(task);
    let mut runtime = c.runtime_ns;
    let cpu = task_cpu(task);
    let key = 0u32;
    // SAFETY: a lookup in CPU_SLICE's slot of `cpu`; NULL if out of range.
    let slot = unsafe {
        aya_ebpf::helpers::generated::bpf_map_lookup_percpu_elem(
            &raw const CPU_SLICE as *mut core::ffi::c_void,
            (&raw const key).cast(),
            cpu,
        )
    } as *const CpuSlice;
    if !slot.is_null() {
        // SAFETY: a map value pointer; another CPU may be updating it. A
        // sequence lock: the copy counts only if the count was the same even
        // number before and after it (x86 keeps loads in order, and stores;
        // the barriers keep the compiler from moving them).
        let seq = unsafe { core::ptr::read_volatile(&raw const (*slot).seq) };
        compiler_barrier();
        let state = unsafe { core::ptr::read_volatile(&raw const (*slot).state) };
        compiler_barrier();
        let sl = unsafe { *slot };
        compiler_barrier();
        let seq_after = unsafe { core::ptr::read_volatile(&raw const (*slot).seq) };
        let whole = seq & 1 == 0 && seq == seq_after;
        // `now` on the clock the slice was timed with: the run queue's,
        // through the CPU's latest (clock, rq clock) pair, or the clock.
        let clock_now = unsafe { bpf_ktime_get_ns() };
        let now = if sl.cal_clock_ns != 0 {
            sl.cal_rq_ns
                .wrapping_add(clock_now.wrapping_sub(sl.cal_clock_ns))
        } else {
            clock_now
        };
        if !whole {
            live.torn += 1;
        } else if state == CpuSlice::TARGET && sl.tid == task_tid(task) {
            // On a CPU: its runtime is only brought up to date at ticks
            // (and switches, and wakeups on its run queue).
            if sl.cal_clock_ns != 0 && has_exec_start() {
                runtime += running_tail(task, now);
            } else if now > sl.since_ns {
                // Timed from its switch-in: not below the kernel's runtime
                // (where the two clocks run at different rates the estimate
                // of a long slice drifts; the tick bounds the lag).
                runtime = runtime.max(sl.base_runtime_ns + (now - sl.since_ns));
            }
            live.running += 1;
        }
    }
    live.runtime_ns += runtime;
    live.nvcsw += c.nvcsw;
    live.nivcsw += c.nivcsw;
    live.migrations += c.migrations;
    live.min_flt += c.min_flt;
    live.maj_flt += c.maj_flt;
    live.io_write_bytes += c.io_write_bytes;
    if has_run_delay() {
        live.run_delay_ns += c.run_delay_ns;
    }
    live.threads += 1;
    Ok(())
}

/// At most this much of a running thread's time is taken from the clock
/// conversion, ns: one tick at the coarsest x86 tick rate (HZ=100). The
/// kernel adds a running thread's time to its runtime at every tick, so
/// more means the conversion is wrong.
const TAIL_MAX_NS: u64 = 10_000_000;

/// The time a running thread has run since the kernel last added it to its
/// `sum_exec_runtime` (read before this): the part up to its run queue's
/// last clock update on `rq.clock_task`, the clock the runtime advances on
/// (no IRQ or steal time where the kernel accounts them), and the part since
/// then, `now` (on the run queue's clock) less that update, at most
/// [`TAIL_MAX_NS`]. So an error of the clock conversion, or IRQ and steal
/// time, can only shift less than a tick's worth between buckets, however
/// long the thread stays on its CPU. Each read that races with an update
/// can only miss time (`exec_start` is written before the runtime, `clock`
/// before `clock_task`, and they are read the other way round), never count
/// it twice.
#[inline(always)]
fn running_tail(task: *const u8, now: u64) -> u64 {
    let exec_start = task_exec_start(task);
    let (clock_task, clock) = rq_clocks(task);
    let pending = clock_task.saturating_sub(exec_start).min(TAIL_MAX_NS);
    pending + now.saturating_sub(clock).min(TAIL_MAX_NS)
}

fn lifecycle(
    what: LifecycleKind,
    slot: u32,
    tid: u32,
    aux: u32,
    comm: [u8; COMM_LEN],
) -> LifecycleRecord {
    LifecycleRecord {
        kind: RecordKind::Lifecycle as u32,
        what: what as u32,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tid,
        aux,
        comm,
        slot,
        reserved: 0,
        totals: ThreadTotals::default(),
    }
}

/// `task_newtask(struct task_struct *task, u64 clone_flags)`, in
/// `copy_process`: every new task, a new thread of the target among them (a
/// child *process* has its own tgid and is not the target). Unlike
/// `sched_process_fork`, which only `kernel_clone` fires, it also sees the
/// threads the kernel creates in the target's thread group itself (io_uring
/// workers, vhost tasks since Linux 6.4).
#[btf_tracepoint(function = "task_newtask")]
pub fn task_newtask(ctx: BtfTracePointContext) -> i32 {
    let _ = try_newtask(&ctx);
    0
}

fn try_newtask(ctx: &BtfTracePointContext) -> Res {
    let child: *const u8 = ctx.arg(0);
    let tgid = task_tgid(child);
    let Some(slot) = target_slot(tgid) else {
        return Ok(());
    };
    let tid = task_tid(child);
    if tid == tgid {
        // A new thread never gets its process's id: this is a new process
        // that got the target's pid after the target ended (every thread
        // exited and it was reaped). It is not the target, and nothing with
        // this tgid is from now on. The target existed before the probes
        // (attached to, or forked before them), so this is the only way.
        mark_gone(slot);
        return Ok(());
    }
    let s = stats(slot)?;
    add(unsafe { &raw mut (*s).events }, 1);
    let (_, parent_tid) = current();
    let comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    emit(
        &lifecycle(LifecycleKind::ThreadStart, slot, tid, parent_tid, comm),
        s,
    );
    Ok(())
}

/// `sched_process_exit(struct task_struct *p, ...)`: fires in the exiting
/// thread itself (its final switch-out comes after).
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    let _ = try_exit(&ctx);
    0
}

fn try_exit(ctx: &BtfTracePointContext) -> Res {
    let (tgid, tid) = current();
    let Some(slot) = target_slot(tgid) else {
        return Ok(());
    };
    let s = stats(slot)?;
    add(unsafe { &raw mut (*s).events }, 1);
    add(unsafe { &raw mut (*s).exits_started }, 1);
    if !delays_from_sched_info() {
        let _ = RUNNABLE_SINCE.remove(tid);
    }
    let comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    let mut r = lifecycle(LifecycleKind::ThreadExit, slot, tid, 0, comm);
    // The exiting thread itself (`p` is current): its counters as its
    // process's totals will hold them (folded in after this, before its
    // final switch-out).
    let task: *const u8 = ctx.arg(0);
    let c = task_counters(task);
    let entry = ExitingThread {
        tgid,
        slot,
        folded_before: u32::from(tid != tgid),
        tid,
        at_exit: c,
    };
    if COUNTING.load() != 0 {
        // A thread still listed at this task's address was freed (its
        // memory is this live task's now) with its final switch-out and its
        // free both missed: counted now, before its entry is overwritten.
        // SAFETY: a copy of the value, read at once.
        if let Some(old) = unsafe { EXITING.get(task as u64) }.copied() {
            let _ = account_estimated(&old);
        }
        if EXITING.insert(task as u64, entry, BPF_ANY as u64).is_ok() {
            exiting(s, &c, true, add);
        } else {
            add(unsafe { &raw mut (*s).map_errors }, 1);
        }
    }
    add(unsafe { &raw mut (*s).exit_start_runtime_ns }, c.runtime_ns);
    r.totals = ThreadTotals {
        cpu_ns: c.runtime_ns,
        voluntary: c.nvcsw,
        involuntary: c.nivcsw,
        migrations: c.migrations,
    };
    emit(&r, s);
    Ok(())
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid,
///                     struct linux_binprm *bprm)`.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    let _ = try_exec(&ctx);
    0
}

fn try_exec(ctx: &BtfTracePointContext) -> Res {
    let (tgid, tid) = current();
    let Some(slot) = target_slot(tgid) else {
        return Ok(());
    };
    let old_pid: u64 = ctx.arg(1);
    let s = stats(slot)?;
    add(unsafe { &raw mut (*s).events }, 1);
    let comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    emit(
        &lifecycle(LifecycleKind::Exec, slot, tid, old_pid as u32, comm),
        s,
    );
    Ok(())
}

/// `task_rename(struct task_struct *task, const char *comm)`: QEMU names its
/// vCPU and I/O threads after creating them.
#[btf_tracepoint(function = "task_rename")]
pub fn task_rename(ctx: BtfTracePointContext) -> i32 {
    let _ = try_rename(&ctx);
    0
}

fn try_rename(ctx: &BtfTracePointContext) -> Res {
    let task: *const u8 = ctx.arg(0);
    let Some(slot) = target_slot(task_tgid(task)) else {
        return Ok(());
    };
    let tid = task_tid(task);
    let s = stats(slot)?;
    add(unsafe { &raw mut (*s).events }, 1);
    let src: *const u8 = ctx.arg(1);
    let mut comm = [0u8; COMM_LEN];
    let _ = unsafe { bpf_probe_read_kernel_str_bytes(src, &mut comm) };
    emit(&lifecycle(LifecycleKind::Rename, slot, tid, 0, comm), s);
    Ok(())
}
