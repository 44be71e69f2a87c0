//! Scheduler probes (BTF-enabled raw tracepoints): on-CPU time, context
//! switches, wakeups, migrations, run-queue delay, thread lifecycle.
//!
//! Everything that goes into rows is aggregated in `SCHED_STATS` (per CPU,
//! cumulative); only thread lifecycle records are streamed.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use aya_log_ebpf::warn;
use cis490_common::{
    log2_bucket, CpuSlice, LifecycleKind, LifecycleRecord, RecordKind, SchedStats, COMM_LEN,
    HIST_BUCKETS,
};

use crate::{
    maps::{add, emit, epoch, stats, CPU_SLICE, RUNNABLE_SINCE, RUNQ_MAX, TIDS},
    target::{current, target_tgid, task_tgid, task_tid},
};

type Res = Result<(), i32>;
const NO_MAP: i32 = -1;

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
        if slice.state == CpuSlice::TARGET && slice.tid == prev_tid {
            add(unsafe { &raw mut (*s).cpu_ns }, now.saturating_sub(slice.since_ns));
        }
        let preempt: u64 = ctx.arg(0);
        let prev_state: u64 = ctx.arg(3);
        // The kernel counts nivcsw for a preemption and for a switch in
        // TASK_RUNNING (yield); either way the thread stays runnable.
        if preempt & 1 != 0 || prev_state as u32 == 0 {
            add(unsafe { &raw mut (*s).ctx_involuntary }, 1);
            if RUNNABLE_SINCE.insert(&prev_tid, &now, BPF_ANY as u64).is_err() {
                add(unsafe { &raw mut (*s).map_errors }, 1);
            }
        } else {
            add(unsafe { &raw mut (*s).ctx_voluntary }, 1);
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
        slice.state = CpuSlice::TARGET;
    } else {
        slice.state = CpuSlice::OTHER;
    }
    add(unsafe { &raw mut (*s).events }, 1);
    Ok(())
}

#[inline(always)]
fn record_runq_delay(s: *mut SchedStats, delay: u64) {
    add(unsafe { &raw mut (*s).runq_delay_ns }, delay);
    add(unsafe { &raw mut (*s).runq_delay_count }, 1);
    let b = log2_bucket(delay);
    if b < HIST_BUCKETS {
        add(unsafe { &raw mut (*s).runq_hist[b] }, 1);
    }
    // Only sched_switch (interrupts off) touches RUNQ_MAX: no nesting.
    let e = epoch();
    if let Some(slot) = RUNQ_MAX.get_ptr_mut((e & 1) as u32) {
        let slot = unsafe { &mut *slot };
        if slot.epoch != e {
            slot.epoch = e;
            slot.max_ns = delay;
        } else if delay > slot.max_ns {
            slot.max_ns = delay;
        }
    }
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
        Ok(()) => {}
        Err(e) if e == -17 => {} // EEXIST
        Err(_) => add(unsafe { &raw mut (*s).map_errors }, 1),
    }
    Ok(())
}

/// `sched_migrate_task(struct task_struct *p, int dest_cpu)`.
#[btf_tracepoint(function = "sched_migrate_task")]
pub fn sched_migrate_task(ctx: BtfTracePointContext) -> i32 {
    let _ = try_migrate(&ctx);
    0
}

fn try_migrate(ctx: &BtfTracePointContext) -> Res {
    let p: *const u8 = ctx.arg(0);
    if task_tgid(p)? != target_tgid() {
        return Ok(());
    }
    let s = stats().ok_or(NO_MAP)?;
    add(unsafe { &raw mut (*s).migrations }, 1);
    add(unsafe { &raw mut (*s).events }, 1);
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
    if task_tgid(child)? != target_tgid() {
        return Ok(());
    }
    let tid = task_tid(child)?;
    let s = stats().ok_or(NO_MAP)?;
    add(unsafe { &raw mut (*s).events }, 1);
    match TIDS.insert(&tid, &1, BPF_NOEXIST as u64) {
        Ok(()) => add(unsafe { &raw mut (*s).threads_started }, 1),
        Err(e) if e == -17 => {}
        Err(_) => {
            add(unsafe { &raw mut (*s).map_errors }, 1);
            warn!(ctx, "cis490: thread map full, tid {} not tracked", tid);
        }
    }
    let (_, parent_tid) = current();
    let comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    emit(&lifecycle(LifecycleKind::ThreadStart, tid, parent_tid, comm), s);
    Ok(())
}

/// `sched_process_exit(struct task_struct *p, ...)`: fires in the exiting
/// thread itself.
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
    if TIDS.remove(&tid).is_ok() {
        add(unsafe { &raw mut (*s).threads_exited }, 1);
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
    let s = stats().ok_or(NO_MAP)?;
    add(unsafe { &raw mut (*s).events }, 1);
    let comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    emit(&lifecycle(LifecycleKind::Exec, tid, old_pid as u32, comm), s);
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
