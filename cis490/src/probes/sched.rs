//! The scheduler probe family (programs in `cis490-ebpf/src/sched.rs`): the
//! one the tracer cannot run without.

use anyhow::{Result, bail};

use super::{Attacher, FamilyStatus, OffsetSpec, ProbeKind::TpBtf, ProbeSpec};

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
        program: "sched_process_fork",
        tracepoint: "sched_process_fork",
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
    // Absent without CONFIG_SCHED_INFO: run-queue delay then comes from events.
    OffsetSpec {
        global: "TASK_RUN_DELAY_OFFSET",
        ty: "task_struct",
        path: "sched_info.run_delay",
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
];

/// Attaches every scheduler probe; a required one that fails ends the trace.
pub fn attach(a: &mut Attacher<'_>) -> Result<FamilyStatus> {
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
    let run_delay = a
        .facts
        .offsets
        .get("TASK_RUN_DELAY_OFFSET")
        .copied()
        .flatten()
        .is_some();
    Ok(FamilyStatus {
        family: FAMILY,
        active: true,
        path: Some(if run_delay {
            "tp_btf+sched_info"
        } else {
            "tp_btf"
        }),
        note: (!run_delay).then(|| {
            "no task_struct.sched_info.run_delay (CONFIG_SCHED_INFO): runq_delay_ns is summed \
             from single delays"
                .to_owned()
        }),
    })
}
