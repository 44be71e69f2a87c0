//! The gateway source's row fields (`gw_*`), in every row (`null` but in
//! the gateway's).

use serde::{Deserialize, Serialize};

/// The gateway fields of a row (flattened into [`crate::row::Measures`]; `null` in
/// every other source). "out": sent by the VM; "in": sent to it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayMeasures {
    pub gw_out_frames: Option<u64>,
    pub gw_out_bytes: Option<u64>,
    pub gw_in_frames: Option<u64>,
    pub gw_in_bytes: Option<u64>,
    pub gw_ipv4_frames: Option<u64>,
    pub gw_ipv6_frames: Option<u64>,
    pub gw_arp_frames: Option<u64>,
    pub gw_other_frames: Option<u64>,
    pub gw_tcp_frames: Option<u64>,
    pub gw_udp_frames: Option<u64>,
    pub gw_icmp_frames: Option<u64>,
    pub gw_tcp_syn: Option<u64>,
    pub gw_tcp_synack_in: Option<u64>,
    pub gw_tcp_rst_in: Option<u64>,
    pub gw_tcp_rst_out: Option<u64>,
    pub gw_tcp_fin: Option<u64>,
    pub gw_dns_queries: Option<u64>,
    pub gw_dns_nxdomain: Option<u64>,
    pub gw_new_flows: Option<u64>,
    pub gw_remote_ips: Option<u64>,
    pub gw_remote_ports: Option<u64>,
    /// Values the kernel maps had no room for in this bucket (flows,
    /// remote addresses, remote ports): 0 means the three counts above are
    /// exact; more, that they are lower bounds (an estimate).
    pub gw_distinct_overflow: Option<u64>,
    /// log2 histogram of frame lengths (as `runq_delay_hist_log2`).
    pub gw_frame_size_hist_log2: Option<Vec<u64>>,
}

impl GatewayMeasures {
    /// Every field set to `n` (histogram: `[0, n]`), for schema tests.
    pub fn full(n: u64) -> Self {
        let s = Some(n);
        Self {
            gw_out_frames: s,
            gw_out_bytes: s,
            gw_in_frames: s,
            gw_in_bytes: s,
            gw_ipv4_frames: s,
            gw_ipv6_frames: s,
            gw_arp_frames: s,
            gw_other_frames: s,
            gw_tcp_frames: s,
            gw_udp_frames: s,
            gw_icmp_frames: s,
            gw_tcp_syn: s,
            gw_tcp_synack_in: s,
            gw_tcp_rst_in: s,
            gw_tcp_rst_out: s,
            gw_tcp_fin: s,
            gw_dns_queries: s,
            gw_dns_nxdomain: s,
            gw_new_flows: s,
            gw_remote_ips: s,
            gw_remote_ports: s,
            gw_distinct_overflow: s,
            gw_frame_size_hist_log2: Some(vec![0, n]),
        }
    }
}
