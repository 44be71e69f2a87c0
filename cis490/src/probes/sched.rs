//! The scheduler probe family (programs in `cis490-ebpf/src/sched.rs`): the
//! one the tracer cannot run without.

use std::os::fd::AsFd as _;

use anyhow::{Result, bail};

use super::{
    AttachState, Attacher, FamilyStatus, OffsetSpec,
    ProbeKind::{Iter, TpBtf},
    ProbeSpec, task_iter,
};

pub const FAMILY: &str = "sched";

pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: "sched_switch",
        tracepoint: "sched_switch",
        kind: TpBtf,
        required: true,
    },
    ProbeSpec {
        program: "sched_wakeup",
        tracepoint: "sched_wakeup",
        kind: TpBtf,
        required: true,
    },
    ProbeSpec {
        program: "sched_wakeup_new",
        tracepoint: "sched_wakeup_new",
        kind: TpBtf,
        required: true,
    },
    ProbeSpec {
        program: "task_newtask",
        tracepoint: "task_newtask",
        kind: TpBtf,
        required: true,
    },
    ProbeSpec {
        program: "sched_process_exit",
        tracepoint: "sched_process_exit",
        kind: TpBtf,
        required: true,
    },
    ProbeSpec {
        program: "sched_process_exec",
        tracepoint: "sched_process_exec",
        kind: TpBtf,
        required: false,
    },
    ProbeSpec {
        program: "task_rename",
        tracepoint: "task_rename",
        kind: TpBtf,
        required: false,
    },
];

/// The task iterator that reads the live threads' counters at every bucket
/// boundary (`bpf_iter_task`, Linux 5.8+; limited to the target's threads
/// from Linux 6.1).
pub const ITER: ProbeSpec = ProbeSpec {
    program: "sched_iter",
    tracepoint: "task",
    kind: Iter,
    required: true,
};

pub const OFFSETS: &[OffsetSpec] = &[
    OffsetSpec {
        global: "TASK_PID_OFFSET",
        ty: "task_struct",
        path: "pid",
    },
    OffsetSpec {
        global: "TASK_TGID_OFFSET",
        ty: "task_struct",
        path: "tgid",
    },
    OffsetSpec {
        global: "TASK_RUNTIME_OFFSET",
        ty: "task_struct",
        path: "se.sum_exec_runtime",
    },
    OffsetSpec {
        global: "TASK_NVCSW_OFFSET",
        ty: "task_struct",
        path: "nvcsw",
    },
    OffsetSpec {
        global: "TASK_NIVCSW_OFFSET",
        ty: "task_struct",
        path: "nivcsw",
    },
    OffsetSpec {
        global: "TASK_MIGRATIONS_OFFSET",
        ty: "task_struct",
        path: "se.nr_migrations",
    },
    OffsetSpec {
        global: "TASK_MIN_FLT_OFFSET",
        ty: "task_struct",
        path: "min_flt",
    },
    OffsetSpec {
        global: "TASK_MAJ_FLT_OFFSET",
        ty: "task_struct",
        path: "maj_flt",
    },
    // Absent without CONFIG_SCHED_INFO: run-queue delay then comes from events.
    OffsetSpec {
        global: "TASK_RUN_DELAY_OFFSET",
        ty: "task_struct",
        path: "sched_info.run_delay",
    },
    OffsetSpec {
        global: "TASK_STATE_OFFSET",
        ty: "task_struct",
        path: "__state",
    },
    OffsetSpec {
        global: "TASK_CPU_OFFSET",
        ty: "task_struct",
        path: "thread_info.cpu",
    },
    OffsetSpec {
        global: "TASK_ON_CPU_OFFSET",
        ty: "task_struct",
        path: "on_cpu",
    },
    // Single run-queue delays off the kernel's sched_info (rq->clock -
    // last_queued at switch-in); without any of these, from events.
    OffsetSpec {
        global: "TASK_LAST_QUEUED_OFFSET",
        ty: "task_struct",
        path: "sched_info.last_queued",
    },
    OffsetSpec {
        global: "TASK_CFS_RQ_OFFSET",
        ty: "task_struct",
        path: "se.cfs_rq",
    },
    OffsetSpec {
        global: "CFS_RQ_RQ_OFFSET",
        ty: "cfs_rq",
        path: "rq",
    },
    OffsetSpec {
        global: "RQ_CLOCK_OFFSET",
        ty: "rq",
        path: "clock",
    },
];

/// Offsets without which the trace fails (all but `run_delay`).
pub const REQUIRED_OFFSETS: &[&str] = &[
    "TASK_PID_OFFSET",
    "TASK_TGID_OFFSET",
    "TASK_RUNTIME_OFFSET",
    "TASK_NVCSW_OFFSET",
    "TASK_NIVCSW_OFFSET",
    "TASK_MIGRATIONS_OFFSET",
    "TASK_MIN_FLT_OFFSET",
    "TASK_MAJ_FLT_OFFSET",
    "TASK_STATE_OFFSET",
    "TASK_CPU_OFFSET",
    "TASK_ON_CPU_OFFSET",
];

/// Attaches every scheduler probe and creates the task iterator's link
/// (for thread group `tgid`); a required one that fails ends the trace.
pub fn attach(a: &mut Attacher<'_>, tgid: u32) -> Result<FamilyStatus> {
    attach_iter(a, tgid)?;
    for spec in PROBES {
        if !a.attach(FAMILY, spec) && spec.required {
            let err = a
                .status
                .last()
                .and_then(|s| s.error.clone())
                .unwrap_or_default();
            bail!(
                "cannot attach {} to tracepoint {}: {err}",
                spec.program,
                spec.tracepoint
            );
        }
    }
    let has = |g: &str| a.facts.offsets.get(g).copied().flatten().is_some();
    let run_delay = has("TASK_RUN_DELAY_OFFSET");
    let info_delays = run_delay
        && [
            "TASK_LAST_QUEUED_OFFSET",
            "TASK_CFS_RQ_OFFSET",
            "CFS_RQ_RQ_OFFSET",
            "RQ_CLOCK_OFFSET",
        ]
        .iter()
        .all(|g| has(g));
    Ok(FamilyStatus {
        family: FAMILY,
        active: true,
        path: Some(match (run_delay, info_delays) {
            (true, true) => "tp_btf+iter+sched_info",
            (true, false) => "tp_btf+iter+sched_info+wakeup_marks",
            _ => "tp_btf+iter+wakeup_marks",
        }),
        note: match (run_delay, info_delays) {
            (true, true) => None,
            (true, false) => Some(
                "no sched_info.last_queued / se.cfs_rq (CONFIG_FAIR_GROUP_SCHED): single \
                 run-queue delays are timed from the wakeup"
                    .to_owned(),
            ),
            _ => Some(
                "no task_struct.sched_info.run_delay (CONFIG_SCHED_INFO): runq_delay_ns is \
                 summed from single delays timed from the wakeup"
                    .to_owned(),
            ),
        },
    })
}

/// Loads the task iterator and creates its link: for the target's threads
/// only where the kernel filters by pid (6.1+), else over every task (the
/// program filters).
fn attach_iter(a: &mut Attacher<'_>, tgid: u32) -> Result<()> {
    let loaded = a.attach(FAMILY, &ITER);
    let link = loaded
        .then(|| {
            let prog: &mut aya::programs::Iter =
                a.ebpf.program_mut(ITER.program)?.try_into().ok()?;
            let fd = prog.fd().ok()?.as_fd();
            Some(
                task_iter::link(fd, Some(tgid))
                    .or_else(|_| task_iter::link(fd, None))
                    .map_err(|e| format!("cannot create the task iterator's link: {e}")),
            )
        })
        .flatten();
    match link {
        Some(Ok(fd)) => {
            a.iter_link = Some(fd);
            Ok(())
        }
        Some(Err(e)) => {
            if let Some(s) = a.status.last_mut() {
                s.state = AttachState::Failed;
                s.error = Some(e.clone());
            }
            bail!("{e}")
        }
        None => {
            let err = a
                .status
                .last()
                .and_then(|s| s.error.clone())
                .unwrap_or_else(|| "cannot load it".into());
            bail!(
                "cannot load the task iterator {} (BPF task iterators need Linux 5.8+): {err}",
                ITER.program
            )
        }
    }
}
