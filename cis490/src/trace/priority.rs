//! How the thread that closes buckets is scheduled (`--priority`).
//!
//! A bucket ends when this thread wakes up and reads the counters. At the
//! default policy it waits its turn behind the target's runnable threads:
//! with 200 threads burning both CPUs of this machine its reads at one
//! boundary took up to 0.57 s, and one bucket held the CPU time of the next
//! ones (and `cis490 check` failed it); at `SCHED_FIFO` up to 25 ms. At
//! `SCHED_FIFO` priority 1 it runs as soon as it wakes, before any normal
//! thread; the kernel's real-time throttling
//! (`kernel.sched_rt_runtime_us`, 95% of each second by default) still
//! bounds it. Any thread or process it starts afterwards is created at the
//! normal policy (`SCHED_RESET_ON_FORK`): the threads that make every CPU
//! switch before the baseline, the guest agent's reader; a command to trace
//! is started before, from the tracer's original policy.

use serde::{Deserialize, Serialize};

/// The policy asked for with `--priority`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// `SCHED_FIFO` priority 1 for the thread that closes buckets.
    Realtime,
    /// The policy the tracer was started with.
    Normal,
}

/// What the thread got: `meta.json` `tracer_scheduling`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scheduling {
    /// `--priority`.
    pub asked: Priority,
    /// The policy the kernel reports for the thread afterwards
    /// (`SCHED_FIFO`, `SCHED_OTHER` ...).
    pub policy: String,
    /// Its real-time priority (0 for the normal policies).
    pub rt_priority: i32,
    /// Its nice value.
    pub nice: i32,
    /// Why the real-time policy could not be set, if it could not.
    pub error: Option<String>,
}

/// Sets the calling thread's policy as asked and reports what it got. A
/// refusal (no `CAP_SYS_NICE`, a cgroup without real-time runtime) is a
/// warning, not an error: the trace runs, its buckets may close late under
/// load, and `meta.json` says why.
pub fn apply(asked: Priority) -> Scheduling {
    let error = match asked {
        Priority::Normal => None,
        Priority::Realtime => set_fifo(1).err().map(|e| {
            let why = format!("cannot run at SCHED_FIFO priority 1: {e}");
            log::warn!(
                "{why}; buckets may close late when the target keeps every CPU busy \
                 (meta.json tracer_scheduling)"
            );
            why
        }),
    };
    let (policy, rt_priority) = current();
    Scheduling {
        asked,
        policy,
        rt_priority,
        nice: nice(),
        error,
    }
}

fn set_fifo(priority: i32) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: pid 0 is the calling thread; `param` outlives the call.
    let r = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread's policy name and real-time priority.
fn current() -> (String, i32) {
    // SAFETY: pid 0 is the calling thread.
    let policy = unsafe { libc::sched_getscheduler(0) };
    let name = if policy < 0 {
        format!("unreadable ({})", std::io::Error::last_os_error())
    } else {
        policy_name(policy)
    };
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: as above; `param` is a valid out-pointer.
    let prio = if unsafe { libc::sched_getparam(0, &mut param) } == 0 {
        param.sched_priority
    } else {
        0
    };
    (name, prio)
}

/// The name of a policy as `sched_getscheduler` returns it.
fn policy_name(policy: i32) -> String {
    match policy & !libc::SCHED_RESET_ON_FORK {
        libc::SCHED_OTHER => "SCHED_OTHER".into(),
        libc::SCHED_FIFO => "SCHED_FIFO".into(),
        libc::SCHED_RR => "SCHED_RR".into(),
        libc::SCHED_BATCH => "SCHED_BATCH".into(),
        libc::SCHED_IDLE => "SCHED_IDLE".into(),
        6 => "SCHED_DEADLINE".into(),
        p => format!("policy {p}"),
    }
}

/// The calling thread's nice value.
fn nice() -> i32 {
    // SAFETY: plain syscall; on Linux PRIO_PROCESS with 0 is the calling thread.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_leaves_the_thread_as_it_is() {
        let s = std::thread::spawn(|| apply(Priority::Normal))
            .join()
            .unwrap();
        assert_eq!(s.asked, Priority::Normal);
        assert_eq!(s.error, None);
        assert_eq!(
            s.policy,
            policy_name(unsafe { libc::sched_getscheduler(0) })
        );
    }

    #[test]
    fn policies_are_named() {
        assert_eq!(
            policy_name(libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK),
            "SCHED_FIFO"
        );
        assert_eq!(policy_name(libc::SCHED_OTHER), "SCHED_OTHER");
        assert_eq!(policy_name(42), "policy 42");
    }

    #[test]
    fn meta_spells_the_choice_in_lowercase() {
        assert_eq!(
            serde_json::to_string(&Priority::Realtime).unwrap(),
            "\"realtime\""
        );
    }
}
