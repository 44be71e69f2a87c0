//! The telemetry row schema shared by every source. `docs/data-model.md`
//! mirrors this file field by field.
//!
//! A row is an envelope ([`Row`]) around the quantities a source measured in
//! one bucket ([`Measures`]). Every quantity is a per-bucket delta summed over
//! all threads of the target (except `threads`, a level, and
//! `runq_delay_max_ns`, a maximum), so summing a field over an episode's rows
//! gives the episode total. A field a source cannot measure is `None`, written
//! as JSON `null`, never `0`.

use serde::{Deserialize, Serialize};

/// A telemetry source. `available_in_deployment` is decided here, once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// The eBPF tracer (this project).
    Ebpf,
    /// The /proc poller (the lab's original collector, the oracle).
    Proc,
}

impl SourceKind {
    pub const ALL: [SourceKind; 2] = [SourceKind::Ebpf, SourceKind::Proc];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Proc => "proc",
        }
    }

    /// In the lab's threat model every host-side vantage is an oracle: the
    /// deployed detector cannot see the host.
    pub fn available_in_deployment(self) -> bool {
        match self {
            Self::Ebpf | Self::Proc => false,
        }
    }

    /// `telemetry-<name>.jsonl`.
    pub fn file_name(self) -> String {
        format!("telemetry-{}.jsonl", self.name())
    }
}

impl std::str::FromStr for SourceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown source '{s}' (known: ebpf, proc)"))
    }
}

/// What one source measured in one bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measures {
    /// On-CPU time, ns.
    pub cpu_ns: Option<u64>,
    /// Context switches where the thread blocked.
    pub ctx_switches_voluntary: Option<u64>,
    /// Context switches where the thread was preempted (or yielded).
    pub ctx_switches_involuntary: Option<u64>,
    /// Time runnable threads waited for a CPU, ns.
    pub runq_delay_ns: Option<u64>,
    /// Threads alive at the end of the bucket (a level, not a delta).
    pub threads: Option<u64>,
    /// Wakeups of target threads.
    pub wakeups: Option<u64>,
    /// Migrations of target threads between CPUs.
    pub migrations: Option<u64>,
    /// Longest single run-queue delay in the bucket, ns.
    pub runq_delay_max_ns: Option<u64>,
    /// log2 histogram of run-queue delays: element `i` counts delays in
    /// `[2^i, 2^(i+1))` ns (element 0 also counts 0); trailing zeros trimmed.
    pub runq_delay_hist_log2: Option<Vec<u64>>,
    /// Tracepoint hits attributed to the target.
    pub events: Option<u64>,
    /// Records lost because the ring buffer was full.
    pub dropped_events: Option<u64>,
}

/// One line of `telemetry-<source>.jsonl`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub episode_id: String,
    pub source: SourceKind,
    pub available_in_deployment: bool,
    /// CLOCK_MONOTONIC at the end of the bucket, ns (shared by all sources).
    pub t_mono_ns: u64,
    /// CLOCK_REALTIME at the end of the bucket, ns since the Unix epoch.
    pub t_wall_ns: u64,
    /// Length of the bucket, ns (`t_mono_ns` minus the previous bucket's).
    pub interval_ns: u64,
    /// Bucket number, from 0, the same in every source.
    pub seq: u64,
    #[serde(flatten)]
    pub m: Measures,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmeasured_fields_are_null_not_zero() {
        let row = Row {
            episode_id: "01J".into(),
            source: SourceKind::Proc,
            available_in_deployment: SourceKind::Proc.available_in_deployment(),
            t_mono_ns: 2,
            t_wall_ns: 3,
            interval_ns: 1,
            seq: 0,
            m: Measures {
                cpu_ns: Some(0),
                ..Default::default()
            },
        };
        let v: serde_json::Value = serde_json::to_value(&row).unwrap();
        assert_eq!(v["source"], "proc");
        assert_eq!(v["available_in_deployment"], false);
        assert_eq!(v["cpu_ns"], 0);
        assert!(v["wakeups"].is_null());
        assert!(v.as_object().unwrap().contains_key("wakeups"));
        assert!(v["runq_delay_hist_log2"].is_null());
        let back: Row = serde_json::from_value(v).unwrap();
        assert_eq!(back, row);
    }

    #[test]
    fn source_names_round_trip() {
        for k in SourceKind::ALL {
            assert_eq!(k.name().parse::<SourceKind>().unwrap(), k);
        }
        assert!("perf".parse::<SourceKind>().is_err());
    }
}
