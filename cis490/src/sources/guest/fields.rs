//! The guest source's row fields (docs/data-model.md, "The guest source").
//! Flattened into every row: `null` in the other sources' rows, and in the
//! guest source's rows when no agent line was accepted in the bucket (but
//! the three line counts, which the host always measures).

use serde::{Deserialize, Serialize};

/// What the guest agent's lines said in one bucket. Counters are deltas
/// since the previous accepted line; levels are the last accepted line's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMeasures {
    /// Guest CPU time in user mode (user + nice), all CPUs, ns.
    pub guest_cpu_user_ns: Option<u64>,
    /// Guest CPU time in the kernel (system + irq + softirq), ns.
    pub guest_cpu_system_ns: Option<u64>,
    /// Guest CPU time idle, ns.
    pub guest_cpu_idle_ns: Option<u64>,
    /// Guest CPU time waiting for I/O, ns.
    pub guest_cpu_iowait_ns: Option<u64>,
    /// Guest memory in use (`MemTotal - MemAvailable`), bytes (a level).
    pub guest_mem_used_bytes: Option<u64>,
    /// Guest memory available, bytes (a level).
    pub guest_mem_available_bytes: Option<u64>,
    /// User-space processes alive in the guest (a level).
    pub guest_procs: Option<u64>,
    /// Processes the agent saw start (listed in events.jsonl as
    /// `guest_exec`, or counted there as left out).
    pub guest_execs: Option<u64>,
    /// Bytes the guest's interfaces sent (all but `lo`).
    pub guest_net_tx_bytes: Option<u64>,
    /// Bytes the guest's interfaces received.
    pub guest_net_rx_bytes: Option<u64>,
    /// Bytes read from the guest's block devices.
    pub guest_disk_read_bytes: Option<u64>,
    /// Bytes written to the guest's block devices.
    pub guest_disk_write_bytes: Option<u64>,
    /// TCP sockets not listening in the guest (a level).
    pub guest_tcp_conns: Option<u64>,
    /// Agent lines accepted in the bucket.
    pub guest_lines: Option<u64>,
    /// Agent lines rejected: too long, not JSON, wrong types, invalid or
    /// absurd values, counters going back, cut by a hang-up.
    pub guest_bad_lines: Option<u64>,
    /// Agent lines skipped unread past the flood cap.
    pub guest_skipped_lines: Option<u64>,
}

/// Guest fields that are levels (aggregated by their maximum, not summed).
pub const LEVELS: [&str; 4] = [
    "guest_mem_used_bytes",
    "guest_mem_available_bytes",
    "guest_procs",
    "guest_tcp_conns",
];

impl GuestMeasures {
    /// Every field `Some(n)` (schema tests).
    pub fn every(n: u64) -> Self {
        // No `..Default::default()`: a new field must be added here too.
        Self {
            guest_cpu_user_ns: Some(n),
            guest_cpu_system_ns: Some(n),
            guest_cpu_idle_ns: Some(n),
            guest_cpu_iowait_ns: Some(n),
            guest_mem_used_bytes: Some(n),
            guest_mem_available_bytes: Some(n),
            guest_procs: Some(n),
            guest_execs: Some(n),
            guest_net_tx_bytes: Some(n),
            guest_net_rx_bytes: Some(n),
            guest_disk_read_bytes: Some(n),
            guest_disk_write_bytes: Some(n),
            guest_tcp_conns: Some(n),
            guest_lines: Some(n),
            guest_bad_lines: Some(n),
            guest_skipped_lines: Some(n),
        }
    }
}
