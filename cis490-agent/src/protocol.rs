//! The agent protocol (docs/agent-protocol.md, docs/agent-line.schema.json):
//! the line the agent writes every interval ([`AgentLine`]) and the line the
//! host writes back ([`HostLine`]). The same types serialize in the guest and
//! deserialize on the host, so the two sides cannot drift; the host also
//! holds each line to [`AgentLine::validate`], because the guest is hostile.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The virtio-serial port name (`/dev/virtio-ports/<name>` in the guest).
pub const PORT_NAME: &str = "cis490.guest.agent";
/// The protocol version, `v` of every agent line.
pub const VERSION: u32 = 1;
/// The longest line either side accepts, bytes (the newline not counted).
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// At most this many started processes are listed in one line; the rest
/// are counted in `execs_left_out`.
pub const MAX_EXECS: usize = 64;
/// At most this many interfaces and this many disks in one line.
pub const MAX_DEVICES: usize = 32;
/// The longest interface, disk or command name, bytes.
pub const MAX_NAME_BYTES: usize = 64;
/// The longest `boot_id`, bytes.
pub const MAX_BOOT_ID_BYTES: usize = 64;
/// No counter or level may exceed this (2^62: 146 years of CPU time
/// in ns, 4 EiB, a wall clock until 2116): larger values are absurd, and keeping every value
/// below it leaves room to add them without overflow.
pub const MAX_VALUE: u64 = 1 << 62;
/// The agent's interval bounds, ms.
pub const MIN_INTERVAL_MS: u64 = 50;
pub const MAX_INTERVAL_MS: u64 = 60_000;
/// The interval the agent uses until the host sends one, ms.
pub const DEFAULT_INTERVAL_MS: u64 = 1000;

/// CPU time of all CPUs since the guest booted (`/proc/stat`'s `cpu` line).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTimes {
    /// `user + nice`, ns.
    pub user_ns: u64,
    /// `system + irq + softirq`, ns.
    pub system_ns: u64,
    pub idle_ns: u64,
    pub iowait_ns: u64,
}

/// Memory levels (`/proc/meminfo`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Memory {
    /// `MemTotal - MemAvailable`, bytes.
    pub used_bytes: u64,
    /// `MemAvailable`, bytes.
    pub available_bytes: u64,
}

/// A process the agent saw for the first time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    pub pid: u32,
    pub ppid: u32,
    /// Its command name (`/proc/PID/stat`'s second field).
    pub comm: String,
}

/// Counters of one network interface since boot (`/proc/net/dev`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetIf {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

/// Counters of one block device since boot (`/sys/block/DEV/stat`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Completed read requests.
    pub read_ios: u64,
    /// Sectors read times 512.
    pub read_bytes: u64,
    pub write_ios: u64,
    pub write_bytes: u64,
}

/// One line from the agent: what the guest's own `/proc` and `/sys` said at
/// `guest_mono_ns`. Counters are cumulative since the guest booted; levels
/// are the value at that instant; `execs` are the processes first seen since
/// the previous line the agent managed to write.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentLine {
    /// [`VERSION`].
    pub v: u32,
    /// The agent's line number since it started (lines it could not write
    /// included).
    pub seq: u64,
    /// `/proc/sys/kernel/random/boot_id`: counters restart when it changes.
    pub boot_id: String,
    /// The guest's CLOCK_MONOTONIC, ns (data only: the host stamps lines on
    /// its own clock).
    pub guest_mono_ns: u64,
    /// The guest's CLOCK_REALTIME, ns since the Unix epoch (data only).
    pub guest_wall_ns: u64,
    pub cpu: CpuTimes,
    pub mem: Memory,
    /// User-space processes alive (kernel threads not counted).
    pub procs: u64,
    /// Processes first seen since the previous written line (at most
    /// [`MAX_EXECS`]).
    pub execs: Vec<Exec>,
    /// Processes first seen but not listed (past [`MAX_EXECS`]).
    pub execs_left_out: u64,
    /// Interfaces by name (`lo` left out).
    pub net: BTreeMap<String, NetIf>,
    /// Whole block devices by name (`loop*`, `ram*` left out).
    pub disks: BTreeMap<String, Disk>,
    /// TCP sockets not listening (`/proc/net/tcp` and `tcp6`).
    pub tcp_conns: u64,
    /// Lines the agent could not write since it started (no host, or the
    /// port was full).
    pub unsent_lines: u64,
}

/// Why a line that parsed is still not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl AgentLine {
    /// The limits the types cannot express: version, list and name lengths,
    /// and every number below [`MAX_VALUE`].
    pub fn validate(&self) -> Result<(), Invalid> {
        let bad = |s: String| Err(Invalid(s));
        if self.v != VERSION {
            return bad(format!("protocol version {} (expected {VERSION})", self.v));
        }
        if self.boot_id.len() > MAX_BOOT_ID_BYTES {
            return bad(format!("boot_id of {} bytes", self.boot_id.len()));
        }
        if self.execs.len() > MAX_EXECS {
            return bad(format!(
                "{} execs listed (at most {MAX_EXECS})",
                self.execs.len()
            ));
        }
        if self.net.len() > MAX_DEVICES || self.disks.len() > MAX_DEVICES {
            return bad(format!(
                "{} interfaces, {} disks (at most {MAX_DEVICES} each)",
                self.net.len(),
                self.disks.len()
            ));
        }
        let long_name = self
            .net
            .keys()
            .chain(self.disks.keys())
            .chain(self.execs.iter().map(|e| &e.comm))
            .find(|n| n.len() > MAX_NAME_BYTES);
        if let Some(n) = long_name {
            return bad(format!("a name of {} bytes", n.len()));
        }
        let c = &self.cpu;
        let mut values = vec![
            ("seq", self.seq),
            ("guest_mono_ns", self.guest_mono_ns),
            ("guest_wall_ns", self.guest_wall_ns),
            ("cpu.user_ns", c.user_ns),
            ("cpu.system_ns", c.system_ns),
            ("cpu.idle_ns", c.idle_ns),
            ("cpu.iowait_ns", c.iowait_ns),
            ("mem.used_bytes", self.mem.used_bytes),
            ("mem.available_bytes", self.mem.available_bytes),
            ("procs", self.procs),
            ("execs_left_out", self.execs_left_out),
            ("tcp_conns", self.tcp_conns),
            ("unsent_lines", self.unsent_lines),
        ];
        for n in self.net.values() {
            values.extend([
                ("net.rx_bytes", n.rx_bytes),
                ("net.rx_packets", n.rx_packets),
                ("net.tx_bytes", n.tx_bytes),
                ("net.tx_packets", n.tx_packets),
            ]);
        }
        for d in self.disks.values() {
            values.extend([
                ("disks.read_ios", d.read_ios),
                ("disks.read_bytes", d.read_bytes),
                ("disks.write_ios", d.write_ios),
                ("disks.write_bytes", d.write_bytes),
            ]);
        }
        if let Some((name, v)) = values.into_iter().find(|(_, v)| *v > MAX_VALUE) {
            return bad(format!("{name} = {v} is absurd (over 2^62)"));
        }
        Ok(())
    }
}

/// The host's line to the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostLine {
    /// How often to write a line, ms (clamped to
    /// [`MIN_INTERVAL_MS`]..=[`MAX_INTERVAL_MS`] by the agent).
    pub interval_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> AgentLine {
        AgentLine {
            v: VERSION,
            seq: 3,
            boot_id: "0b5a4a38-1c1e-4d2e-9a55-7f0e4e0c9f11".into(),
            guest_mono_ns: 5_000_000_000,
            guest_wall_ns: 1_700_000_000_000_000_000,
            cpu: CpuTimes {
                user_ns: 10,
                system_ns: 20,
                idle_ns: 30,
                iowait_ns: 40,
            },
            mem: Memory {
                used_bytes: 1 << 20,
                available_bytes: 2 << 20,
            },
            procs: 4,
            execs: vec![Exec {
                pid: 80,
                ppid: 1,
                comm: "sleep".into(),
            }],
            execs_left_out: 0,
            net: [("eth0".to_owned(), NetIf::default())].into(),
            disks: [("vda".to_owned(), Disk::default())].into(),
            tcp_conns: 1,
            unsent_lines: 0,
        }
    }

    fn schema() -> jsonschema::Validator {
        let s: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/agent-line.schema.json")).unwrap();
        jsonschema::meta::validate(&s).expect("a valid 2020-12 schema");
        jsonschema::draft202012::new(&s).unwrap()
    }

    /// What the host accepts: parses as [`AgentLine`] and validates.
    fn accepted(text: &str) -> bool {
        serde_json::from_str::<AgentLine>(text).is_ok_and(|l| l.validate().is_ok())
    }

    #[test]
    fn a_line_round_trips_and_validates() {
        let l = sample();
        let text = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<AgentLine>(&text).unwrap(), l);
        assert_eq!(l.validate(), Ok(()));
        assert!(schema().is_valid(&serde_json::to_value(&l).unwrap()));
    }

    #[test]
    fn the_schema_and_the_types_agree() {
        let v = schema();
        let good = serde_json::to_value(sample()).unwrap();
        type Edit = fn(&mut serde_json::Value);
        let cases: &[(&str, Edit, bool)] = &[
            ("unchanged", |_| {}, true),
            ("no execs", |l| l["execs"] = serde_json::json!([]), true),
            (
                "at the cap",
                |l| l["cpu"]["idle_ns"] = MAX_VALUE.into(),
                true,
            ),
            ("a string for a count", |l| l["procs"] = "4".into(), false),
            (
                "a negative counter",
                |l| l["cpu"]["user_ns"] = (-1).into(),
                false,
            ),
            ("a fraction", |l| l["tcp_conns"] = 1.5.into(), false),
            (
                "an absurd counter",
                |l| l["disks"]["vda"]["write_bytes"] = (MAX_VALUE + 1).into(),
                false,
            ),
            (
                "a missing field",
                |l| {
                    l.as_object_mut().unwrap().remove("mem");
                },
                false,
            ),
            ("an unknown field", |l| l["extra"] = 1.into(), false),
            (
                "an unknown nested field",
                |l| l["cpu"]["steal_ns"] = 1.into(),
                false,
            ),
            ("another version", |l| l["v"] = 2.into(), false),
            (
                "a long comm",
                |l| l["execs"][0]["comm"] = "x".repeat(65).into(),
                false,
            ),
            (
                "a pid past u32",
                |l| l["execs"][0]["pid"] = (1u64 << 32).into(),
                false,
            ),
            (
                "too many execs",
                |l| {
                    let e = l["execs"][0].clone();
                    l["execs"] = serde_json::Value::Array(vec![e; MAX_EXECS + 1]);
                },
                false,
            ),
            (
                "too many disks",
                |l| {
                    let d = l["disks"]["vda"].clone();
                    for i in 0..=MAX_DEVICES {
                        l["disks"][format!("vd{i}")] = d.clone();
                    }
                },
                false,
            ),
            (
                "an array for the net map",
                |l| l["net"] = serde_json::json!([]),
                false,
            ),
        ];
        for (what, edit, ok) in cases {
            let mut line = good.clone();
            edit(&mut line);
            assert_eq!(v.is_valid(&line), *ok, "schema, {what}");
            assert_eq!(accepted(&line.to_string()), *ok, "types, {what}");
        }
    }

    #[test]
    fn the_host_line() {
        let h: HostLine = serde_json::from_str(r#"{"interval_ms":250}"#).unwrap();
        assert_eq!(h.interval_ms, 250);
        assert!(serde_json::from_str::<HostLine>(r#"{"interval_ms":-1}"#).is_err());
    }
}
