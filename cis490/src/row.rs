//! The telemetry row schema shared by every source. `docs/data-model.md`
//! mirrors this file field by field.
//!
//! A row is an envelope ([`Row`]) around the quantities a source measured in
//! one bucket ([`Measures`]). Every quantity is a per-bucket delta summed over
//! all threads of the target (except `threads`, a level, and
//! `runq_delay_max_ns`, a maximum), so summing a field over an episode's rows
//! gives the episode total. A field a source cannot measure is `None`, written
//! as JSON `null`, never `0`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A telemetry source. `available_in_deployment` is decided here, once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// The eBPF tracer (this project).
    Ebpf,
    /// The /proc poller (the lab's original collector, the oracle).
    Proc,
    /// perf_event counters of the target (software and hardware events).
    Perf,
    /// QEMU's own statistics over its QMP socket.
    Qmp,
    /// The in-guest agent's lines over virtio-serial (`--guest-agent`).
    Guest,
    /// The VM's frames at the lab's gateway interface (TC classifiers).
    Gateway,
}

impl SourceKind {
    pub const ALL: [SourceKind; 6] = [
        SourceKind::Ebpf,
        SourceKind::Proc,
        SourceKind::Perf,
        SourceKind::Qmp,
        SourceKind::Guest,
        SourceKind::Gateway,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ebpf => "ebpf",
            Self::Proc => "proc",
            Self::Perf => "perf",
            Self::Qmp => "qmp",
            Self::Guest => "guest",
            Self::Gateway => "gateway",
        }
    }

    /// In the lab's threat model every host-side vantage is an oracle: the
    /// deployed detector cannot see the host. The guest agent is the inside
    /// view a deployed endpoint sensor has, and the gateway what a deployed
    /// detector on the network sees.
    pub fn available_in_deployment(self) -> bool {
        match self {
            Self::Ebpf | Self::Proc | Self::Perf | Self::Qmp => false,
            Self::Guest | Self::Gateway => true,
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
            .ok_or_else(|| {
                format!("unknown source '{s}' (known: ebpf, proc, perf, qmp, guest, gateway)")
            })
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
    /// All context switches (voluntary + involuntary; what perf counts).
    pub ctx_switches: Option<u64>,
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

    /// Block read requests completed.
    pub blk_read_ops: Option<u64>,
    /// Block write requests completed.
    pub blk_write_ops: Option<u64>,
    /// Bytes read from block devices.
    pub blk_read_bytes: Option<u64>,
    /// Bytes written to block devices.
    pub blk_write_bytes: Option<u64>,
    /// Bytes the target dirtied in the page cache or wrote with direct I/O,
    /// as the kernel's per-task I/O accounting counts them.
    pub io_write_bytes: Option<u64>,
    /// Sum of block request latencies (issue to completion), ns.
    pub blk_latency_ns_sum: Option<u64>,
    /// Longest block request latency in the bucket, ns.
    pub blk_latency_max_ns: Option<u64>,
    /// log2 histogram of block request latencies (as `runq_delay_hist_log2`).
    pub blk_latency_hist_log2: Option<Vec<u64>>,

    /// Bytes the target sent (sum of `net_by_if`).
    pub net_tx_bytes: Option<u64>,
    /// Bytes the target received.
    pub net_rx_bytes: Option<u64>,
    /// Packets the target sent.
    pub net_tx_packets: Option<u64>,
    /// Packets the target received.
    pub net_rx_packets: Option<u64>,
    /// The same per vantage: a tap interface by name, or `sockets`.
    pub net_by_if: Option<BTreeMap<String, NetCounters>>,

    /// Hardware VM exits of the target's vCPUs.
    pub kvm_exits: Option<u64>,
    /// Hardware VM exits by the kernel's reason name.
    pub kvm_exit_reasons: Option<BTreeMap<String, u64>>,
    /// Returns of `KVM_RUN` to the target (exits QEMU itself handles).
    pub kvm_userspace_exits: Option<u64>,
    /// The same by `KVM_EXIT_*` reason name.
    pub kvm_userspace_exit_reasons: Option<BTreeMap<String, u64>>,

    /// Block I/O per guest disk, as QEMU counts it (QMP `query-blockstats`).
    pub blk_by_dev: Option<BTreeMap<String, BlkCounters>>,

    /// Minor page faults (no I/O).
    pub page_faults_minor: Option<u64>,
    /// Major page faults (I/O).
    pub page_faults_major: Option<u64>,
    /// CPU cycles (hardware counter).
    pub cycles: Option<u64>,
    /// Instructions retired (hardware counter).
    pub instructions: Option<u64>,
    /// Cache references (hardware counter).
    pub cache_references: Option<u64>,
    /// Cache misses (hardware counter).
    pub cache_misses: Option<u64>,
    /// Branch mispredictions (hardware counter).
    pub branch_misses: Option<u64>,

    /// The guest agent's fields (`guest_*`), in every row.
    #[serde(flatten)]
    pub guest: crate::sources::guest::fields::GuestMeasures,
    /// The gateway's fields (`gw_*`), `null` in every other source.
    #[serde(flatten)]
    pub gw: crate::sources::gateway::fields::GatewayMeasures,
}

/// Block counters of one device, as a source counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkCounters {
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

impl Measures {
    /// Fills `ctx_switches` from the voluntary and involuntary counts
    /// (saturating at `u64::MAX`: only malformed input gets there).
    pub fn set_ctx_total(&mut self) {
        self.ctx_switches = match (self.ctx_switches_voluntary, self.ctx_switches_involuntary) {
            (Some(v), Some(i)) => Some(v.saturating_add(i)),
            _ => None,
        };
    }

    /// Fills `blk_*` totals from `blk_by_dev` (saturating at `u64::MAX`).
    pub fn set_blk_by_dev(&mut self, by_dev: Option<BTreeMap<String, BlkCounters>>) {
        let sum = |f: fn(&BlkCounters) -> u64| {
            by_dev
                .as_ref()
                .map(|m| m.values().map(f).fold(0, u64::saturating_add))
        };
        self.blk_read_bytes = sum(|c| c.read_bytes);
        self.blk_write_bytes = sum(|c| c.write_bytes);
        self.blk_read_ops = sum(|c| c.read_ops);
        self.blk_write_ops = sum(|c| c.write_ops);
        self.blk_by_dev = by_dev;
    }
}

/// Network counters of one vantage, from the target's side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetCounters {
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
}

impl NetCounters {
    /// What the counters gained since `earlier` (each saturating at 0).
    pub fn since(&self, earlier: &NetCounters) -> NetCounters {
        NetCounters {
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            tx_packets: self.tx_packets.saturating_sub(earlier.tx_packets),
            rx_packets: self.rx_packets.saturating_sub(earlier.rx_packets),
        }
    }

    /// Adds `other` (each saturating at `u64::MAX`): two interfaces of one
    /// name.
    pub fn add(&mut self, other: &NetCounters) {
        self.tx_bytes = self.tx_bytes.saturating_add(other.tx_bytes);
        self.rx_bytes = self.rx_bytes.saturating_add(other.rx_bytes);
        self.tx_packets = self.tx_packets.saturating_add(other.tx_packets);
        self.rx_packets = self.rx_packets.saturating_add(other.rx_packets);
    }
}

impl Measures {
    /// Fills the `net_*` totals from `net_by_if` (`None` stays `None`).
    /// Totals saturate at `u64::MAX` (only malformed input gets there).
    pub fn set_net(&mut self, by_if: Option<BTreeMap<String, NetCounters>>) {
        let total = by_if.as_ref().map(|m| {
            m.values().fold(NetCounters::default(), |a, c| NetCounters {
                tx_bytes: a.tx_bytes.saturating_add(c.tx_bytes),
                rx_bytes: a.rx_bytes.saturating_add(c.rx_bytes),
                tx_packets: a.tx_packets.saturating_add(c.tx_packets),
                rx_packets: a.rx_packets.saturating_add(c.rx_packets),
            })
        });
        self.net_tx_bytes = total.map(|t| t.tx_bytes);
        self.net_rx_bytes = total.map(|t| t.rx_bytes);
        self.net_tx_packets = total.map(|t| t.tx_packets);
        self.net_rx_packets = total.map(|t| t.rx_packets);
        self.net_by_if = by_if;
    }
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
    fn net_totals_sum_the_vantages() {
        let mut m = Measures::default();
        m.set_net(None);
        assert_eq!(m.net_tx_bytes, None);
        let mut by = BTreeMap::new();
        by.insert(
            "tap0".to_owned(),
            NetCounters {
                tx_bytes: 10,
                rx_bytes: 1,
                tx_packets: 2,
                rx_packets: 1,
            },
        );
        by.insert(
            "sockets".to_owned(),
            NetCounters {
                tx_bytes: 5,
                ..Default::default()
            },
        );
        m.set_net(Some(by));
        assert_eq!(
            (m.net_tx_bytes, m.net_rx_bytes, m.net_tx_packets),
            (Some(15), Some(1), Some(2))
        );
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["net_by_if"]["tap0"]["tx_bytes"], 10);
        assert!(v["kvm_exit_reasons"].is_null());
    }

    #[test]
    fn net_totals_saturate_instead_of_overflowing() {
        // Found by the `proc` fuzz target (fuzz/seeds/proc/
        // crash-net-dev-totals-overflow): a net/dev text whose interfaces'
        // counters sum past u64::MAX panicked ("attempt to add with
        // overflow") in debug builds and wrapped in release builds.
        let mut m = Measures::default();
        let big = NetCounters {
            tx_bytes: u64::MAX - 1,
            rx_bytes: 7,
            tx_packets: u64::MAX,
            rx_packets: 1,
        };
        let by: BTreeMap<String, NetCounters> =
            [("a".to_owned(), big), ("b".to_owned(), big)].into();
        m.set_net(Some(by));
        assert_eq!(m.net_tx_bytes, Some(u64::MAX));
        assert_eq!(m.net_rx_bytes, Some(14));
        assert_eq!(m.net_tx_packets, Some(u64::MAX));
        assert_eq!(m.net_rx_packets, Some(2));
    }

    #[test]
    fn ctx_total_saturates_instead_of_overflowing() {
        // fuzz/seeds/proc/crash-status-ctx-total-overflow: a status file
        // whose two counts sum past u64::MAX panicked the `proc` fuzz target
        // here (found by reading the code after the set_net overflow, then
        // reproduced with the target; its runs had not reached it).
        let mut m = Measures {
            ctx_switches_voluntary: Some(u64::MAX),
            ctx_switches_involuntary: Some(1),
            ..Default::default()
        };
        m.set_ctx_total();
        assert_eq!(m.ctx_switches, Some(u64::MAX));
        m.ctx_switches_involuntary = None;
        m.set_ctx_total();
        assert_eq!(m.ctx_switches, None);
    }

    #[test]
    fn blk_totals_saturate_instead_of_overflowing() {
        // Two disks whose QMP deltas sum past u64::MAX panicked in
        // Iterator::sum (debug builds; release builds wrapped). Found by
        // reading the code, reproduced with the `qmp` fuzz target on
        // fuzz/seeds/qmp/crash-blk-totals-overflow.
        let mut m = Measures::default();
        let big = BlkCounters {
            read_bytes: u64::MAX,
            write_bytes: 5,
            read_ops: 1,
            write_ops: u64::MAX,
        };
        m.set_blk_by_dev(Some([("a".to_owned(), big), ("b".to_owned(), big)].into()));
        assert_eq!(
            (
                m.blk_read_bytes,
                m.blk_write_bytes,
                m.blk_read_ops,
                m.blk_write_ops
            ),
            (Some(u64::MAX), Some(10), Some(2), Some(u64::MAX))
        );
        m.set_blk_by_dev(None);
        assert_eq!(m.blk_read_bytes, None);
    }

    /// `docs/row.schema.json`, checked against the draft 2020-12
    /// metaschema and compiled.
    fn row_schema() -> (serde_json::Value, jsonschema::Validator) {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/row.schema.json")).unwrap();
        jsonschema::meta::validate(&schema).expect("row.schema.json is a valid 2020-12 schema");
        let v = jsonschema::draft202012::new(&schema).unwrap();
        (schema, v)
    }

    fn errors(v: &jsonschema::Validator, row: &serde_json::Value) -> Vec<String> {
        v.iter_errors(row)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect()
    }

    /// A row with every measure present; `n` is every count (and every
    /// histogram element, map entry count...).
    fn full_row(n: u64) -> Row {
        let map = |k: &str| BTreeMap::from([(k.to_owned(), n)]);
        let net = NetCounters {
            tx_bytes: n,
            rx_bytes: n,
            tx_packets: n,
            rx_packets: n,
        };
        let blk = BlkCounters {
            read_bytes: n,
            write_bytes: n,
            read_ops: n,
            write_ops: n,
        };
        // No `..Default::default()`: a new field must be added here too.
        let m = Measures {
            cpu_ns: Some(n),
            ctx_switches_voluntary: Some(n),
            ctx_switches_involuntary: Some(n),
            ctx_switches: Some(n),
            runq_delay_ns: Some(n),
            threads: Some(n),
            wakeups: Some(n),
            migrations: Some(n),
            runq_delay_max_ns: Some(n),
            runq_delay_hist_log2: Some(vec![n; 64]),
            events: Some(n),
            dropped_events: Some(n),
            blk_read_ops: Some(n),
            blk_write_ops: Some(n),
            blk_read_bytes: Some(n),
            blk_write_bytes: Some(n),
            io_write_bytes: Some(n),
            blk_latency_ns_sum: Some(n),
            blk_latency_max_ns: Some(n),
            blk_latency_hist_log2: Some(vec![0, n]),
            net_tx_bytes: Some(n),
            net_rx_bytes: Some(n),
            net_tx_packets: Some(n),
            net_rx_packets: Some(n),
            net_by_if: Some(BTreeMap::from([
                ("tap0".to_owned(), net),
                ("sockets".to_owned(), net),
            ])),
            kvm_exits: Some(n),
            kvm_exit_reasons: Some(map("EPT_VIOLATION")),
            kvm_userspace_exits: Some(n),
            kvm_userspace_exit_reasons: Some(map("KVM_EXIT_IO")),
            blk_by_dev: Some(BTreeMap::from([("virtio0".to_owned(), blk)])),
            page_faults_minor: Some(n),
            page_faults_major: Some(n),
            cycles: Some(n),
            instructions: Some(n),
            cache_references: Some(n),
            cache_misses: Some(n),
            branch_misses: Some(n),
            guest: crate::sources::guest::fields::GuestMeasures::every(n),
            gw: crate::sources::gateway::fields::GatewayMeasures::full(n),
        };
        Row {
            episode_id: "01M8HJJ72G58PD87B8318Y5SKR".into(),
            source: SourceKind::Ebpf,
            available_in_deployment: false,
            t_mono_ns: n,
            t_wall_ns: n,
            interval_ns: n,
            seq: n,
            m,
        }
    }

    #[test]
    fn the_schema_has_every_field_and_requires_it() {
        let (schema, _) = row_schema();
        let row = serde_json::to_value(full_row(1)).unwrap();
        let fields: Vec<&String> = row.as_object().unwrap().keys().collect();
        let props: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
        assert_eq!(props, fields, "schema properties vs Row's fields, in order");
        let required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(required, fields);
        assert_eq!(schema["additionalProperties"], false);
        // The full row leaves nothing null, so it exercises every branch.
        assert!(row.as_object().unwrap().values().all(|v| !v.is_null()));
    }

    #[test]
    fn rows_validate_against_the_schema() {
        let (_, v) = row_schema();
        let mut all_null = full_row(0);
        all_null.m = Measures::default();
        for (what, row) in [
            ("all null", all_null),
            ("full, zeros", full_row(0)),
            ("full", full_row(123_456_789)),
            ("full, u64::MAX", full_row(u64::MAX)),
        ] {
            for source in SourceKind::ALL {
                let mut row = row.clone();
                row.source = source;
                let json = serde_json::to_value(&row).unwrap();
                assert_eq!(errors(&v, &json), Vec::<String>::new(), "{what} {source:?}");
                // And what validates here reads back as the same Row.
                assert_eq!(serde_json::from_value::<Row>(json).unwrap(), row);
            }
        }
    }

    #[test]
    fn the_schema_rejects_malformed_rows() {
        let (_, v) = row_schema();
        let good = serde_json::to_value(full_row(5)).unwrap();
        assert!(v.is_valid(&good));
        type Edit = fn(&mut serde_json::Value);
        let cases: [(&str, Edit); 16] = [
            ("a string for a count", |r| r["cpu_ns"] = "lots".into()),
            ("a missing field", |r| {
                r.as_object_mut().unwrap().remove("wakeups");
            }),
            ("an unknown field", |r| r["bogus"] = 1.into()),
            ("a negative count", |r| r["cpu_ns"] = (-1).into()),
            ("a fraction", |r| r["cpu_ns"] = 1.5.into()),
            ("past u64::MAX", |r| {
                r["cycles"] = serde_json::from_str("18446744073709551616").unwrap()
            }),
            ("an unknown source", |r| r["source"] = "pcap".into()),
            ("a null envelope field", |r| {
                r["seq"] = serde_json::Value::Null
            }),
            ("an id that is not a ULID", |r| {
                r["episode_id"] = "01test".into()
            }),
            ("a string for a bool", |r| {
                r["available_in_deployment"] = "no".into()
            }),
            ("a negative histogram element", |r| {
                r["runq_delay_hist_log2"] = serde_json::json!([1, -2])
            }),
            ("a histogram over 64 buckets", |r| {
                r["blk_latency_hist_log2"] = serde_json::json!(vec![1; 65])
            }),
            ("an interface without rx_packets", |r| {
                r["net_by_if"]["tap0"]
                    .as_object_mut()
                    .unwrap()
                    .remove("rx_packets");
            }),
            ("a disk with an extra counter", |r| {
                r["blk_by_dev"]["virtio0"]["flush_ops"] = 1.into()
            }),
            ("a reason count that is a string", |r| {
                r["kvm_exit_reasons"]["HLT"] = "x".into()
            }),
            ("a map that is a list", |r| {
                r["net_by_if"] = serde_json::json!([])
            }),
        ];
        for (what, edit) in cases {
            let mut row = good.clone();
            edit(&mut row);
            assert!(!v.is_valid(&row), "{what}: accepted {row}");
        }
    }

    #[test]
    fn the_event_and_label_line_schemas_accept_and_reject() {
        // Not rows, but the other two line formats of an episode, shipped
        // beside row.schema.json (docs/data-model.md, events.jsonl).
        for (file, text, good, bad) in [
            (
                "event",
                include_str!("../../docs/event.schema.json"),
                vec![
                    r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":null,"event":"started","pid":7,"mode":"spawn","interval_ns":100000000}"#,
                    r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":0,"event":"thread_started","tid":8,"parent_tid":7,"comm":"CPU 0/TCG"}"#,
                    r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":3,"event":"qmp","qmp_event":"STOP","data":null}"#,
                    r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":3,"event":"guest_exec","pid":95,"ppid":1,"comm":"sleep","guest_seq":7}"#,
                    r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":3,"event":"guest_bad_line","reason":"too_long","bytes":104857600,"detail":"a line of 104857600 bytes (at most 65536)"}"#,
                ],
                vec![
                    r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":0,"event":"thread_started","tid":8,"comm":"x"}"#,
                    r#"{"t_mono_ns":1,"t_wall_ns":2,"event":"duration_reached"}"#,
                    r#"{"t_mono_ns":-1,"t_wall_ns":2,"seq":0,"event":"finished","reason":"signal","buckets":1}"#,
                    r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":0,"event":"Started"}"#,
                    r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":3,"event":"guest_exec","pid":95,"comm":"sleep","guest_seq":7}"#,
                    r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":3,"event":"guest_bad_line","reason":"lies","bytes":1,"detail":""}"#,
                ],
            ),
            (
                "label",
                include_str!("../../docs/label.schema.json"),
                vec![r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":4,"label":"detonate","via":"control"}"#],
                vec![
                    r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":4,"label":"two words","via":"cli"}"#,
                    r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":4,"label":"boot","via":"http"}"#,
                    r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":4,"label":"boot","via":"cli","x":1}"#,
                ],
            ),
        ] {
            let schema: serde_json::Value = serde_json::from_str(text).unwrap();
            jsonschema::meta::validate(&schema).expect(file);
            let v = jsonschema::draft202012::new(&schema).unwrap();
            for l in good {
                let line: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(errors(&v, &line), Vec::<String>::new(), "{file}: {l}");
            }
            for l in bad {
                assert!(
                    !v.is_valid(&serde_json::from_str(l).unwrap()),
                    "{file}: accepted {l}"
                );
            }
        }
    }

    #[test]
    fn source_names_round_trip() {
        for k in SourceKind::ALL {
            assert_eq!(k.name().parse::<SourceKind>().unwrap(), k);
        }
        assert!("pcap".parse::<SourceKind>().is_err());
    }
}
