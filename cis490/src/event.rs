//! The lines of `events.jsonl` and `labels.jsonl`: one typed enum with one
//! variant per kind of event, so an event's members are written in one
//! place (docs/data-model.md, docs/event.schema.json, docs/label.schema.json).

use std::path::Path;

use cis490_common::{LifecycleKind, LifecycleRecord};
use serde::Serialize;

use crate::{
    clock::ClockPair,
    ebpf::ProbeStatus,
    meta::EndReason,
    target::{ExitStatus, Mode},
};

/// A line of `events.jsonl`: when, in which bucket, and what.
#[derive(Debug, Serialize)]
pub struct EventLine<'a> {
    pub t_mono_ns: u64,
    pub t_wall_ns: u64,
    /// The bucket it happened in (`null` before the first one opened).
    pub seq: Option<u64>,
    #[serde(flatten)]
    pub event: Event<'a>,
}

impl<'a> EventLine<'a> {
    pub fn new(at: ClockPair, seq: Option<u64>, event: Event<'a>) -> Self {
        Self {
            t_mono_ns: at.mono_ns,
            t_wall_ns: at.wall_ns,
            seq,
            event,
        }
    }
}

/// What happened (the `event` member names the variant).
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event<'a> {
    /// How one program ended up at attach time.
    Probe(&'a ProbeStatus),
    /// Tracing started: the baseline is taken and the first bucket opens.
    Started {
        pid: i32,
        mode: Mode,
        interval_ns: u64,
    },
    /// A spawned command was let go to `execve`.
    TargetReleased { pid: i32 },
    /// SIGINT or SIGTERM ends the trace.
    Signal { signal: &'static str },
    /// `stop` on the control socket ends the trace.
    ControlStop,
    /// The `cis490 trace --server` client of this episode went away (its
    /// connection closed without a result): the server ends the episode.
    ClientGone,
    /// Ring-buffer records dropped in a bucket (rows stay exact).
    Drops { dropped_records: u64 },
    /// A QMP event of QEMU's, or the QMP source giving up.
    Qmp(QmpDetail<'a>),
    /// A tap of the target registered with the probes.
    TapAttached {
        name: &'a str,
        ifindex: u32,
        netns_inum: u32,
    },
    /// A thread of the target started.
    ThreadStarted {
        tid: u32,
        parent_tid: u32,
        comm: String,
    },
    /// A thread of the target exited, with its own counters over its life
    /// as it exited (before its final switch-out).
    ThreadExited {
        tid: u32,
        comm: String,
        cpu_ns: u64,
        ctx_switches_voluntary: u64,
        ctx_switches_involuntary: u64,
        migrations: u64,
    },
    /// A thread of the target called `execve` (`old_tid`: the thread that
    /// called it, when not the leader).
    Exec {
        tid: u32,
        old_tid: u32,
        comm: String,
    },
    /// A thread of the target changed its name.
    ThreadRenamed { tid: u32, comm: String },
    /// A ring-buffer record of a kind this tracer does not know.
    UnknownRecord { tid: u32, what: u32 },
    /// The target exited (its status when known).
    TargetExited {
        pid: i32,
        status: Option<ExitStatus>,
    },
    /// `--duration` was reached.
    DurationReached,
    /// A spawned command that outlived the trace was sent this signal.
    TargetTerminated { signal: &'static str },
    /// Tracing finished; everything is written.
    Finished { reason: EndReason, buckets: u64 },
    /// The guest agent source's events (`guest_*`, named by their own
    /// `event` tag; untagged variants come last).
    #[serde(untagged)]
    Guest(crate::sources::guest::GuestEvent),
}

/// The members of a `qmp` event.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum QmpDetail<'a> {
    /// An event QEMU sent (`SHUTDOWN`, `STOP`, ...), with its data.
    Event {
        qmp_event: String,
        data: serde_json::Value,
    },
    /// Why the QMP source got no data (once).
    Error {
        qmp_error: &'a str,
        socket: &'a Path,
    },
}

impl Event<'_> {
    /// The event of a thread-lifecycle record from the ring buffer.
    pub fn lifecycle(r: &LifecycleRecord) -> Event<'static> {
        let comm = String::from_utf8_lossy(r.comm_bytes()).into_owned();
        match r.lifecycle() {
            Ok(LifecycleKind::ThreadStart) => Event::ThreadStarted {
                tid: r.tid,
                parent_tid: r.aux,
                comm,
            },
            Ok(LifecycleKind::ThreadExit) => Event::ThreadExited {
                tid: r.tid,
                comm,
                cpu_ns: r.totals.cpu_ns,
                ctx_switches_voluntary: r.totals.voluntary,
                ctx_switches_involuntary: r.totals.involuntary,
                migrations: r.totals.migrations,
            },
            Ok(LifecycleKind::Exec) => Event::Exec {
                tid: r.tid,
                old_tid: r.aux,
                comm,
            },
            Ok(LifecycleKind::Rename) => Event::ThreadRenamed { tid: r.tid, comm },
            Err(_) => Event::UnknownRecord {
                tid: r.tid,
                what: r.what,
            },
        }
    }
}

/// A line of `labels.jsonl`.
#[derive(Debug, Serialize)]
pub struct LabelLine<'a> {
    pub t_mono_ns: u64,
    pub t_wall_ns: u64,
    pub seq: Option<u64>,
    pub label: &'a str,
    /// `cli` (`--label`) or `control` (the control socket).
    pub via: &'a str,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The members each kind of event has, as docs/event.schema.json and
    /// the data model list them.
    #[test]
    fn events_serialize_with_their_members() {
        let at = ClockPair {
            mono_ns: 5,
            wall_ns: 7,
        };
        let line = |e| serde_json::to_value(EventLine::new(at, Some(2), e)).unwrap();
        assert_eq!(
            line(Event::ThreadStarted {
                tid: 3,
                parent_tid: 1,
                comm: "w".into()
            }),
            serde_json::json!({"t_mono_ns": 5, "t_wall_ns": 7, "seq": 2, "event": "thread_started",
                "tid": 3, "parent_tid": 1, "comm": "w"})
        );
        assert_eq!(
            line(Event::ClientGone),
            serde_json::json!({"t_mono_ns": 5, "t_wall_ns": 7, "seq": 2, "event": "client_gone"})
        );
        assert_eq!(
            line(Event::ControlStop),
            serde_json::json!({"t_mono_ns": 5, "t_wall_ns": 7, "seq": 2, "event": "control_stop"})
        );
        assert_eq!(
            line(Event::Qmp(QmpDetail::Error {
                qmp_error: "gone",
                socket: Path::new("/q")
            })),
            serde_json::json!({"t_mono_ns": 5, "t_wall_ns": 7, "seq": 2, "event": "qmp",
                "qmp_error": "gone", "socket": "/q"})
        );
        assert_eq!(
            line(Event::Finished {
                reason: EndReason::Duration,
                buckets: 9
            })["reason"],
            "duration"
        );
        // The guest source's events carry their own `event` name.
        assert_eq!(
            line(Event::Guest(crate::sources::guest::GuestEvent::GuestExec {
                pid: 95,
                ppid: 1,
                comm: "sleep".into(),
                guest_seq: 4
            })),
            serde_json::json!({"t_mono_ns": 5, "t_wall_ns": 7, "seq": 2, "event": "guest_exec",
                "pid": 95, "ppid": 1, "comm": "sleep", "guest_seq": 4})
        );
    }
}
