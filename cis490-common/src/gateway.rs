//! The gateway collector: TC classifier programs on one interface (usually
//! the lab's bridge) counting the frames of the traced VM, identified by
//! its NIC MAC addresses. "Out" is a frame the VM sent (its source MAC is
//! one of the VM's), "in" a frame sent to it (its destination MAC is).
//!
//! Every name that crosses the kernel boundary (programs, maps) is a
//! constant here, used by the loader; the eBPF side's `#[map]` statics
//! carry the same names (checked by a unit test of the loader against the
//! embedded object).

crate::names! {
    /// The gateway's programs (`cis490-ebpf/src/gateway.rs`).
    pub mod prog {
        /// The classifier on the interface's ingress (clsact or TCX).
        GW_INGRESS = "gw_ingress",
        /// The classifier on the interface's egress.
        GW_EGRESS = "gw_egress",
    }
}

crate::names! {
    /// The gateway's maps (`cis490-ebpf/src/gateway.rs`).
    pub mod map {
        /// Cumulative per-CPU counters ([`super::GwStats`], `PerCpuArray`,
        /// one slot).
        GW_STATS,
        /// The VM's MAC addresses (`HashMap<u64, u32>`, key
        /// [`super::mac_key`]).
        GW_MACS,
        /// Settings written by the loader (`Array<u32>`,
        /// [`super::CONFIG_SLOTS`] slots).
        GW_CONFIG,
        /// The current bucket epoch (`Array<u64>`, one slot), published by
        /// the loader at every boundary.
        GW_EPOCH,
        /// 5-tuples seen in this episode (`HashMap<FlowKey, u8>`).
        GW_FLOWS,
        /// Remote addresses the VM sent to, per epoch (`HashMap<IpKey, u8>`).
        GW_REMOTE_IPS,
        /// Remote ports the VM sent to, per epoch (`HashMap<PortKey, u8>`).
        GW_REMOTE_PORTS,
        /// Captured frames for `gateway.pcap` (ring buffer of
        /// [`super::PcapRecord`]).
        GW_PCAP,
    }
}

pub use map::{
    GW_CONFIG, GW_EPOCH, GW_FLOWS, GW_MACS, GW_PCAP, GW_REMOTE_IPS, GW_REMOTE_PORTS, GW_STATS,
};
pub use prog::{GW_EGRESS, GW_INGRESS};

/// Every map name, for the loader's check against the object.
pub const MAPS: &[&str] = map::ALL;
/// Every program name.
pub const PROGRAMS: &[&str] = prog::ALL;

/// MAC addresses of the VM tracked at once.
pub const MAX_MACS: u32 = 16;
/// Entries of `GW_FLOWS`: distinct 5-tuples counted exactly per episode.
pub const FLOWS_CAP: u32 = 65_536;
/// Entries of `GW_REMOTE_IPS` and of `GW_REMOTE_PORTS`: distinct values
/// counted exactly per bucket (the entries of the bucket before are swept
/// by the loader right after each boundary).
pub const DISTINCT_CAP: u32 = 8_192;
/// Elements of the frame size histogram (log2 of the frame length).
pub const SIZE_BUCKETS: usize = 32;
/// Largest snap length of `gateway.pcap` (a power of two: the classifier
/// bounds the copy's length with a mask, which every verifier follows).
pub const SNAP_MAX: u32 = 1_024;
const _: () = assert!(SNAP_MAX.is_power_of_two());
/// Default size of the `GW_PCAP` ring buffer (a power of two of pages).
pub const PCAP_RINGBUF_BYTES: u32 = 4 << 20;

/// `GW_CONFIG[CONFIG_COUNT_ALL]`: 1 counts every frame on the interface
/// (no MAC known); direction then comes from the hook (ingress: out).
pub const CONFIG_COUNT_ALL: u32 = 0;
/// `GW_CONFIG[CONFIG_SNAPLEN]`: bytes of each frame written to `GW_PCAP`
/// (0: no capture).
pub const CONFIG_SNAPLEN: u32 = 1;
pub const CONFIG_SLOTS: u32 = 2;

/// Ethertypes told apart.
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_ARP: u16 = 0x0806;
/// IP protocol numbers told apart.
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// A MAC address (network order bytes) as the `GW_MACS` key.
#[inline(always)]
pub const fn mac_key(m: [u8; 6]) -> u64 {
    (m[0] as u64)
        | (m[1] as u64) << 8
        | (m[2] as u64) << 16
        | (m[3] as u64) << 24
        | (m[4] as u64) << 32
        | (m[5] as u64) << 40
}

/// Cumulative per-CPU counters of the VM's frames (map `GW_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GwStats {
    pub out_frames: u64,
    pub out_bytes: u64,
    pub in_frames: u64,
    pub in_bytes: u64,
    pub ipv4: u64,
    pub ipv6: u64,
    pub arp: u64,
    pub other: u64,
    pub tcp: u64,
    pub udp: u64,
    pub icmp: u64,
    /// SYN without ACK, out.
    pub tcp_syn: u64,
    /// SYN+ACK, in.
    pub tcp_synack_in: u64,
    pub tcp_rst_in: u64,
    pub tcp_rst_out: u64,
    /// FIN, either way.
    pub tcp_fin: u64,
    pub dns_queries: u64,
    pub dns_nxdomain: u64,
    /// 5-tuples inserted into `GW_FLOWS`.
    pub new_flows: u64,
    /// Flows not recorded: `GW_FLOWS` full.
    pub flows_overflow: u64,
    /// (epoch, remote address) pairs inserted into `GW_REMOTE_IPS`.
    pub remote_ips: u64,
    /// (epoch, remote port) pairs inserted into `GW_REMOTE_PORTS`.
    pub remote_ports: u64,
    /// Distinct values not recorded: a distinct map full.
    pub distinct_overflow: u64,
    /// Frames written to `GW_PCAP`.
    pub pcap_records: u64,
    /// Frames not written: `GW_PCAP` full.
    pub pcap_dropped: u64,
    /// Frame length histogram: element `i` counts lengths in
    /// `[2^i, 2^(i+1))`.
    pub size_hist: [u64; SIZE_BUCKETS],
}

impl GwStats {
    pub const ZERO: Self = Self {
        out_frames: 0,
        out_bytes: 0,
        in_frames: 0,
        in_bytes: 0,
        ipv4: 0,
        ipv6: 0,
        arp: 0,
        other: 0,
        tcp: 0,
        udp: 0,
        icmp: 0,
        tcp_syn: 0,
        tcp_synack_in: 0,
        tcp_rst_in: 0,
        tcp_rst_out: 0,
        tcp_fin: 0,
        dns_queries: 0,
        dns_nxdomain: 0,
        new_flows: 0,
        flows_overflow: 0,
        remote_ips: 0,
        remote_ports: 0,
        distinct_overflow: 0,
        pcap_records: 0,
        pcap_dropped: 0,
        size_hist: [0; SIZE_BUCKETS],
    };
}

/// A 5-tuple from the VM's side (`GW_FLOWS` key). IPv4 addresses are
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub proto: u32,
}

/// A remote address in one epoch (`GW_REMOTE_IPS` key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpKey {
    pub epoch: u64,
    pub addr: [u8; 16],
}

/// A remote TCP or UDP port in one epoch (`GW_REMOTE_PORTS` key).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortKey {
    pub epoch: u64,
    pub port: u64,
}

/// A captured frame in `GW_PCAP`: the first `cap_len` bytes of `data`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PcapRecord {
    /// CLOCK_MONOTONIC when the program saw the frame, ns.
    pub ts_ns: u64,
    /// The frame's length on the wire.
    pub orig_len: u32,
    pub cap_len: u32,
    pub data: [u8; SNAP_MAX as usize],
}

/// Size of [`PcapRecord`]'s header (before `data`).
pub const PCAP_HEADER: usize = 16;

const _: () = assert!(core::mem::size_of::<GwStats>() == 8 * (25 + SIZE_BUCKETS));
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);
const _: () = assert!(core::mem::size_of::<IpKey>() == 24);
const _: () = assert!(core::mem::size_of::<PortKey>() == 16);
const _: () = assert!(core::mem::size_of::<PcapRecord>() == PCAP_HEADER + SNAP_MAX as usize);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers and byte arrays without padding
    // (asserted above).
    unsafe impl aya::Pod for super::GwStats {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::IpKey {}
    unsafe impl aya::Pod for super::PortKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_keys_keep_every_byte() {
        assert_eq!(mac_key([0x52, 0x54, 0, 0x12, 0x34, 0x56]), 0x5634_1200_5452);
        assert_ne!(mac_key([1, 0, 0, 0, 0, 0]), mac_key([0, 0, 0, 0, 0, 1]));
    }
}
