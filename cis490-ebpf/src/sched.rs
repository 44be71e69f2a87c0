//! Scheduler probes (BTF-enabled raw tracepoints): on-CPU time, context
//! switches, wakeups, migrations, run-queue delay, thread lifecycle.
//!
//! Everything that goes into rows is aggregated in `SCHED_STATS` (per CPU,
//! cumulative); only thread lifecycle records are streamed.
//!
//! Counts come from the kernel's own per-thread counters, read at every
//! switch-out of a target thread and diffed against the previous read
//! (`THREADS`), not from counting events: a tracepoint event the kernel does
//! not deliver (recursion protection, or a kernel that hides some tasks'
//! switches) delays a count to the thread's next switch-out instead of
//! losing it. Events still give what counters cannot: wakeups, the
//! distribution of single run-queue delays, and the running slice at a
//! bucket boundary (`CPU_SLICE`).

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{
        bpf_get_current_comm, bpf_get_current_task, bpf_ktime_get_ns,
        bpf_probe_read_kernel_str_bytes,
    },
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;
use cis490_common::{
    COMM_LEN, CpuSlice, LifecycleKind, LifecycleRecord, RecordKind, SchedStats, ThreadCounters,
};

use crate::{
    maps::{
        CPU_SLICE, RUNNABLE_SINCE, RUNQ_MAX, TARGET_GONE, THREADS, THREADS_FULL, add, add_to_hist,
        emit, raise_max, stats,
    },
    target::{current, has_run_delay, target_tgid, task_counters, task_tgid, task_tid},
};

type Res = Result<(), i32>;
const NO_MAP: i32 = -1;
const EEXIST: i32 = -17;
/// `TASK_DEAD` in `task_struct.__state`: the thread's final switch-out.
const TASK_DEAD: u32 = 0x80;

/// `sched_switch(bool preempt, struct task_struct *prev,
///               struct task_struct *next, unsigned int prev_state)`.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let _ = try_sched_switch(&ctx);
    0
}

fn try_sched_switch(ctx: &BtfTracePointContext) -> Res {
    let target = target_tgid();
    let slice = CPU_SLICE.get_ptr_mut(0).ok_or(NO_MAP)?;
    // `current` is still `prev` when the tracepoint fires.
    let (prev_tgid, prev_tid) = current();
    let next: *const u8 = ctx.arg(2);
    let prev_is_target = prev_tgid == target;
    let next_is_target = task_tgid(next)? == target;
    // SAFETY: map value pointers from lookups are valid for this program run.
    let slice = unsafe { &mut *slice };
    if !prev_is_target && !next_is_target {
        // Hot path: the switch does not concern the target.
        if slice.state != CpuSlice::OTHER {
            slice.state = CpuSlice::OTHER;
        }
        return Ok(());
    }
    let now = unsafe { bpf_ktime_get_ns() };
    let s = stats().ok_or(NO_MAP)?;

    if prev_is_target {
        let prev: *const u8 = ctx.arg(1);
        let prev_state: u64 = ctx.arg(3);
        let prev_state = prev_state as u32;
        // The loader reads SCHED_STATS, then CPU_SLICE, while this runs.
        // Closing the slice before adding its time means a concurrent read
        // can miss this slice for a moment (the next read catches up) but
        // never count it twice (as running and as done).
        let was = *slice;
        unsafe { core::ptr::write_volatile(&raw mut slice.state, CpuSlice::OTHER) };
        compiler_barrier();
        account_switch_out(s, &was, prev, prev_tid, prev_state, now)?;
        // A thread that leaves the CPU runnable (preempted, or yielding in
        // TASK_RUNNING) starts waiting now; any older mark is stale.
        let preempt: u64 = ctx.arg(0);
        let _ = RUNNABLE_SINCE.remove(&prev_tid);
        if (preempt & 1 != 0 || prev_state == 0)
            && RUNNABLE_SINCE
                .insert(&prev_tid, &now, BPF_ANY as u64)
                .is_err()
        {
            add(unsafe { &raw mut (*s).map_errors }, 1);
        }
    }

    if next_is_target {
        let next_tid = task_tid(next)?;
        if let Some(since) = RUNNABLE_SINCE.get_ptr(&next_tid) {
            let delay = now.saturating_sub(unsafe { *since });
            let _ = RUNNABLE_SINCE.remove(&next_tid);
            record_runq_delay(s, delay);
        }
        slice.since_ns = now;
        slice.tid = next_tid;
        compiler_barrier();
        unsafe { core::ptr::write_volatile(&raw mut slice.state, CpuSlice::TARGET) };
    } else {
        slice.state = CpuSlice::OTHER;
    }
    add(unsafe { &raw mut (*s).events }, 1);
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

/// Adds what a target thread did since its previous switch-out, from its
/// own kernel counters.
#[inline(always)]
fn account_switch_out(
    s: *mut SchedStats,
    slice: &CpuSlice,
    prev: *const u8,
    tid: u32,
    prev_state: u32,
    now: u64,
) -> Res {
    let c = task_counters(prev)?;
    let Some(t) = THREADS.get_ptr_mut(&tid) else {
        // Not tracked. When the thread map was full: time the slice
        // instead. Otherwise this is a thread between the two halves of an
        // execve from a thread that is not the main one (its id changed;
        // `sched_process_exec` moves its entry): its counters catch up at
        // its next switch-out, so timing the slice would count it twice.
        if THREADS_FULL.get(0).copied().unwrap_or(0) != 0
            && slice.state == CpuSlice::TARGET
            && slice.tid == tid
        {
            add(
                unsafe { &raw mut (*s).cpu_ns },
                now.saturating_sub(slice.since_ns),
            );
        }
        add(unsafe { &raw mut (*s).slice_mismatches }, 1);
        return Ok(());
    };
    let t = unsafe { &mut *t };
    if t.task == 0 {
        // Seeded from /proc: the first switch-out names the task.
        t.task = c.task;
    } else if t.task != c.task {
        // The entry is another task's: `execve` from a non-main thread
        // swapped this tid with the old main thread's, and the old main
        // thread's final switch-out came after the swap. No difference
        // against another task's counters (its last slice is not counted).
        add(unsafe { &raw mut (*s).slice_mismatches }, 1);
        return Ok(());
    }
    if slice.state != CpuSlice::TARGET || slice.tid != tid {
        // Its switch-in was not delivered: the counters catch up anyway.
        add(unsafe { &raw mut (*s).slice_mismatches }, 1);
    }
    add(
        unsafe { &raw mut (*s).cpu_ns },
        delta(c.runtime_ns, t.runtime_ns),
    );
    add(
        unsafe { &raw mut (*s).ctx_voluntary },
        delta(c.nvcsw, t.nvcsw),
    );
    add(
        unsafe { &raw mut (*s).ctx_involuntary },
        delta(c.nivcsw, t.nivcsw),
    );
    add(
        unsafe { &raw mut (*s).migrations },
        delta(c.migrations, t.migrations),
    );
    if has_run_delay() {
        add(
            unsafe { &raw mut (*s).runq_delay_ns },
            delta(c.run_delay_ns, t.run_delay_ns),
        );
    }
    if prev_state & TASK_DEAD != 0 {
        let _ = THREADS.remove(&tid);
    } else {
        t.runtime_ns = c.runtime_ns;
        t.nvcsw = c.nvcsw;
        t.nivcsw = c.nivcsw;
        t.migrations = c.migrations;
        t.run_delay_ns = c.run_delay_ns;
    }
    Ok(())
}

/// `now - before`, or 0 when `before` was not known.
#[inline(always)]
fn delta(now: u64, before: u64) -> u64 {
    if before == ThreadCounters::UNKNOWN {
        0
    } else {
        now.wrapping_sub(before)
    }
}

#[inline(always)]
fn record_runq_delay(s: *mut SchedStats, delay: u64) {
    if !has_run_delay() {
        add(unsafe { &raw mut (*s).runq_delay_ns }, delay);
    }
    add(unsafe { &raw mut (*s).runq_delay_count }, 1);
    add_to_hist(unsafe { &raw mut (*s).runq_hist }, delay);
    // Only sched_switch (interrupts off) touches RUNQ_MAX: no nesting.
    raise_max(&RUNQ_MAX, delay);
}

/// `sched_wakeup(struct task_struct *p)`.
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
    if task_tgid(p)? != target_tgid() {
        return Ok(());
    }
    let tid = task_tid(p)?;
    let now = unsafe { bpf_ktime_get_ns() };
    let s = stats().ok_or(NO_MAP)?;
    add(unsafe { &raw mut (*s).wakeups }, 1);
    add(unsafe { &raw mut (*s).events }, 1);
    // Keep the earliest time if the thread is already runnable.
    match RUNNABLE_SINCE.insert(&tid, &now, BPF_NOEXIST as u64) {
        Ok(()) | Err(EEXIST) => {}
        Err(_) => add(unsafe { &raw mut (*s).map_errors }, 1),
    }
    Ok(())
}

fn lifecycle(what: LifecycleKind, tid: u32, aux: u32, comm: [u8; COMM_LEN]) -> LifecycleRecord {
    LifecycleRecord {
        kind: RecordKind::Lifecycle as u32,
        what: what as u32,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        tid,
        aux,
        comm,
    }
}

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`:
/// a new thread of the target (a child *process* has its own tgid and is
/// not the target).
#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let _ = try_fork(&ctx);
    0
}

fn try_fork(ctx: &BtfTracePointContext) -> Res {
    let child: *const u8 = ctx.arg(1);
    let target = target_tgid();
    if task_tgid(child)? != target {
        return Ok(());
    }
    let tid = task_tid(child)?;
    if tid == target {
        // A new thread never gets its process's id: this is a new process
        // that got the target's pid after the target ended (every thread
        // exited and it was reaped). It is not the target; nothing with
        // this tgid is from now on. The target existed before the probes
        // (attached, or forked before them), so this is the only way.
        if let Some(gone) = TARGET_GONE.get_ptr_mut(0) {
            // SAFETY: a map value pointer, valid for this program run.
            unsafe { *gone = 1 };
        }
        return Ok(());
    }
    let s = stats().ok_or(NO_MAP)?;
    add(unsafe { &raw mut (*s).events }, 1);
    // A new task's counters all start at 0.
    let new = ThreadCounters {
        task: child as u64,
        ..ThreadCounters::NEW
    };
    match THREADS.insert(&tid, &new, BPF_NOEXIST as u64) {
        Ok(()) => add(unsafe { &raw mut (*s).threads_started }, 1),
        Err(EEXIST) => {}
        Err(_) => {
            if let Some(full) = THREADS_FULL.get_ptr_mut(0) {
                // SAFETY: a map value pointer, valid for this program run.
                unsafe { *full = 1 };
            }
            add(unsafe { &raw mut (*s).map_errors }, 1);
            warn!(ctx, "cis490: thread map full, tid {} not tracked", tid);
        }
    }
    let (_, parent_tid) = current();
    let comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    emit(
        &lifecycle(LifecycleKind::ThreadStart, tid, parent_tid, comm),
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

fn try_exit(_ctx: &BtfTracePointContext) -> Res {
    let (tgid, tid) = current();
    if tgid != target_tgid() {
        return Ok(());
    }
    let s = stats().ok_or(NO_MAP)?;
    add(unsafe { &raw mut (*s).events }, 1);
    if let Some(t) = THREADS.get_ptr_mut(&tid) {
        let t = unsafe { &mut *t };
        // SAFETY: bpf_get_current_task has no preconditions.
        let me = unsafe { bpf_get_current_task() };
        if t.exited == 0 && (t.task == 0 || t.task == me) {
            t.exited = 1;
            add(unsafe { &raw mut (*s).threads_exited }, 1);
        }
    }
    let _ = RUNNABLE_SINCE.remove(&tid);
    let comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    emit(&lifecycle(LifecycleKind::ThreadExit, tid, 0, comm), s);
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
    if tgid != target_tgid() {
        return Ok(());
    }
    let old_pid: u64 = ctx.arg(1);
    let old_tid = old_pid as u32;
    let s = stats().ok_or(NO_MAP)?;
    add(unsafe { &raw mut (*s).events }, 1);
    if old_tid != tid {
        // An execve from a thread that was not the main one: the kernel
        // killed the other threads and gave this one the process id (the
        // old main thread got this one's id). Its counters move with it.
        // SAFETY: the value is copied out at once.
        if let Some(t) = unsafe { THREADS.get(&old_tid) } {
            let t = *t;
            if THREADS.insert(&tid, &t, BPF_ANY as u64).is_err() {
                add(unsafe { &raw mut (*s).map_errors }, 1);
            }
            let _ = THREADS.remove(&old_tid);
        }
        let _ = RUNNABLE_SINCE.remove(&old_tid);
    }
    let comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    emit(
        &lifecycle(LifecycleKind::Exec, tid, old_pid as u32, comm),
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
    if task_tgid(task)? != target_tgid() {
        return Ok(());
    }
    let tid = task_tid(task)?;
    let s = stats().ok_or(NO_MAP)?;
    add(unsafe { &raw mut (*s).events }, 1);
    let src: *const u8 = ctx.arg(1);
    let mut comm = [0u8; COMM_LEN];
    let _ = unsafe { bpf_probe_read_kernel_str_bytes(src, &mut comm) };
    emit(&lifecycle(LifecycleKind::Rename, tid, 0, comm), s);
    Ok(())
}
