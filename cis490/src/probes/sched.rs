//! The scheduler probe family (programs in `cis490-ebpf/src/sched.rs`).

use super::ProbeSpec;

pub const FAMILY: &str = "sched";

pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: "sched_switch",
        tracepoint: "sched_switch",
        required: true,
    },
    ProbeSpec {
        program: "sched_wakeup",
        tracepoint: "sched_wakeup",
        required: true,
    },
    ProbeSpec {
        program: "sched_wakeup_new",
        tracepoint: "sched_wakeup_new",
        required: true,
    },
    ProbeSpec {
        program: "sched_process_fork",
        tracepoint: "sched_process_fork",
        required: true,
    },
    ProbeSpec {
        program: "sched_process_exit",
        tracepoint: "sched_process_exit",
        required: true,
    },
    ProbeSpec {
        program: "sched_process_exec",
        tracepoint: "sched_process_exec",
        required: false,
    },
    ProbeSpec {
        program: "task_rename",
        tracepoint: "task_rename",
        required: false,
    },
];
