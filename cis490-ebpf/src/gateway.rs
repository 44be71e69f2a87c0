//! The gateway collector's TC classifiers (names and layouts in
//! `cis490_common::gateway`): on the ingress and egress of one interface,
//! usually the lab's bridge, they count the frames of the traced VM (by MAC
//! address) by protocol, TCP flag and DNS answer, record the 5-tuples and
//! the remote addresses and ports it sends to, and optionally copy the
//! frames' first bytes to a ring buffer for `gateway.pcap`. They never drop
//! or change a frame (`TC_ACT_UNSPEC`: the next filter or the default
//! action decides).
//!
//! Header parsing: Ethernet (no VLAN: a tagged frame is `other`), IPv4
//! (options skipped by IHL; layer 4 only in first fragments) and IPv6 (the
//! fixed header's next header only: no extension header walk). Lengths come
//! from the IP headers, never from the frame length (which may carry
//! Ethernet padding).

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use cis490_common::{
    gateway::{
        CONFIG_COUNT_ALL, CONFIG_SLOTS, CONFIG_SNAPLEN, DISTINCT_CAP, ETH_P_ARP, ETH_P_IP,
        ETH_P_IPV6, FLOWS_CAP, FlowKey, GwStats, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
        IPPROTO_UDP, IpKey, MAX_MACS, PCAP_RINGBUF_BYTES, PcapRecord, PortKey, SIZE_BUCKETS,
        SNAP_MAX, mac_key,
    },
    log2_bucket,
};

/// `BPF_F_NO_PREALLOC`: the flow and distinct maps take memory only for
/// what they hold (they stay empty unless the gateway collector runs).
const NO_PREALLOC: u32 = 1;
const E2BIG: i32 = -7;

#[map]
static GW_STATS: PerCpuArray<GwStats> = PerCpuArray::with_max_entries(1, 0);
#[map]
static GW_MACS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_MACS, 0);
#[map]
static GW_CONFIG: Array<u32> = Array::with_max_entries(CONFIG_SLOTS, 0);
#[map]
static GW_EPOCH: Array<u64> = Array::with_max_entries(1, 0);
#[map]
static GW_FLOWS: HashMap<FlowKey, u8> = HashMap::with_max_entries(FLOWS_CAP, NO_PREALLOC);
#[map]
static GW_REMOTE_IPS: HashMap<IpKey, u8> = HashMap::with_max_entries(DISTINCT_CAP, NO_PREALLOC);
#[map]
static GW_REMOTE_PORTS: HashMap<PortKey, u8> = HashMap::with_max_entries(DISTINCT_CAP, NO_PREALLOC);
#[map]
static GW_PCAP: RingBuf = RingBuf::with_byte_size(PCAP_RINGBUF_BYTES, 0);

const ETH_HLEN: usize = 14;

/// Frames on the interface's ingress: sent by the VM when no MAC is known.
#[classifier]
pub fn gw_ingress(ctx: TcContext) -> i32 {
    let _ = count(&ctx, false);
    TC_ACT_UNSPEC
}

/// Frames on the interface's egress: sent to the VM when no MAC is known.
#[classifier]
pub fn gw_egress(ctx: TcContext) -> i32 {
    let _ = count(&ctx, true);
    TC_ACT_UNSPEC
}

/// Adds `v` to a per-CPU counter. Not atomic: TC programs run with bottom
/// halves off (ingress in the receive softirq, egress under
/// `rcu_read_lock_bh`), so nothing else touches this CPU's slot meanwhile.
#[inline(always)]
fn bump(counter: *mut u64, v: u64) {
    // SAFETY: `counter` points into a map value, valid and 8-byte aligned.
    unsafe { *counter = (*counter).wrapping_add(v) };
}

#[inline(always)]
fn config(slot: u32) -> u32 {
    GW_CONFIG.get(slot).copied().unwrap_or(0)
}

#[inline(always)]
fn mac(b: &[u8; ETH_HLEN], at: usize) -> u64 {
    mac_key([b[at], b[at + 1], b[at + 2], b[at + 3], b[at + 4], b[at + 5]])
}

/// What layer 4 of a frame is, from the VM's side.
struct L4 {
    out: bool,
    proto: u8,
    local: [u8; 16],
    remote: [u8; 16],
    /// Offset of the layer 4 header.
    off: usize,
    /// Bytes from the layer 4 header to the end of the IP payload.
    len: usize,
}

fn count(ctx: &TcContext, egress: bool) -> Result<(), i64> {
    let eth: [u8; ETH_HLEN] = ctx.load(0)?;
    let out = if config(CONFIG_COUNT_ALL) != 0 {
        !egress
    } else if unsafe { GW_MACS.get(mac(&eth, 6)) }.is_some() {
        true
    } else if unsafe { GW_MACS.get(mac(&eth, 0)) }.is_some() {
        false
    } else {
        return Ok(());
    };
    let s = GW_STATS.get_ptr_mut(0).ok_or(0i64)?;
    let len = ctx.len() as u64;
    // SAFETY (every deref of `s` below): a per-CPU map value, valid for
    // this program run.
    unsafe {
        if out {
            bump(&raw mut (*s).out_frames, 1);
            bump(&raw mut (*s).out_bytes, len);
        } else {
            bump(&raw mut (*s).in_frames, 1);
            bump(&raw mut (*s).in_bytes, len);
        }
        let b = log2_bucket(len);
        // A volatile read keeps the bounds check LLVM would drop (see
        // `maps::hist_index`).
        let b = core::ptr::read_volatile(&b);
        if b < SIZE_BUCKETS {
            bump(&raw mut (*s).size_hist[b], 1);
        }
    }
    let snaplen = config(CONFIG_SNAPLEN);
    if snaplen != 0 {
        capture(ctx, s, len as u32, snaplen);
    }
    let ethertype = u16::from_be_bytes([eth[12], eth[13]]);
    let l4 = match ethertype {
        ETH_P_IP => {
            unsafe { bump(&raw mut (*s).ipv4, 1) };
            ipv4(ctx, out)?
        }
        ETH_P_IPV6 => {
            unsafe { bump(&raw mut (*s).ipv6, 1) };
            ipv6(ctx, out)?
        }
        ETH_P_ARP => {
            unsafe { bump(&raw mut (*s).arp, 1) };
            None
        }
        _ => {
            unsafe { bump(&raw mut (*s).other, 1) };
            None
        }
    };
    let Some(l4) = l4 else { return Ok(()) };
    match l4.proto {
        IPPROTO_TCP => unsafe { bump(&raw mut (*s).tcp, 1) },
        IPPROTO_UDP => unsafe { bump(&raw mut (*s).udp, 1) },
        IPPROTO_ICMP | IPPROTO_ICMPV6 => unsafe { bump(&raw mut (*s).icmp, 1) },
        _ => {}
    }
    if l4.out {
        distinct_ip(s, &l4.remote);
    }
    if l4.off == 0 {
        // A later fragment: no layer 4 header.
        return Ok(());
    }
    if l4.proto == IPPROTO_TCP {
        tcp(ctx, s, &l4)
    } else if l4.proto == IPPROTO_UDP {
        udp(ctx, s, &l4)
    } else {
        Ok(())
    }
}

/// The IPv4 header: addresses as IPv4-mapped IPv6, layer 4 offset (0 for
/// a later fragment) and length.
#[inline(always)]
fn ipv4(ctx: &TcContext, out: bool) -> Result<Option<L4>, i64> {
    let h: [u8; 20] = ctx.load(ETH_HLEN)?;
    let ihl = ((h[0] & 0xf) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Ok(None);
    }
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    let frag = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[10] = 0xff;
    src[11] = 0xff;
    dst[10] = 0xff;
    dst[11] = 0xff;
    src[12..16].copy_from_slice(&h[12..16]);
    dst[12..16].copy_from_slice(&h[16..20]);
    let (local, remote) = if out { (src, dst) } else { (dst, src) };
    Ok(Some(L4 {
        out,
        proto: h[9],
        local,
        remote,
        off: if frag == 0 { ETH_HLEN + ihl } else { 0 },
        len: total.saturating_sub(ihl),
    }))
}

#[inline(always)]
fn ipv6(ctx: &TcContext, out: bool) -> Result<Option<L4>, i64> {
    let h: [u8; 40] = ctx.load(ETH_HLEN)?;
    if h[0] >> 4 != 6 {
        return Ok(None);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    let (local, remote) = if out { (src, dst) } else { (dst, src) };
    Ok(Some(L4 {
        out,
        proto: h[6],
        local,
        remote,
        off: ETH_HLEN + 40,
        len: u16::from_be_bytes([h[4], h[5]]) as usize,
    }))
}

fn tcp(ctx: &TcContext, s: *mut GwStats, l4: &L4) -> Result<(), i64> {
    let h: [u8; 14] = ctx.load(l4.off)?;
    let sport = u16::from_be_bytes([h[0], h[1]]);
    let dport = u16::from_be_bytes([h[2], h[3]]);
    let doff = ((h[12] >> 4) as usize) * 4;
    let flags = h[13];
    let (syn, ack, rst, fin) = (
        flags & 2 != 0,
        flags & 0x10 != 0,
        flags & 4 != 0,
        flags & 1 != 0,
    );
    let payload = l4.len.saturating_sub(doff);
    unsafe {
        if syn && !ack && l4.out {
            bump(&raw mut (*s).tcp_syn, 1);
        }
        if syn && ack && !l4.out {
            bump(&raw mut (*s).tcp_synack_in, 1);
        }
        if rst {
            if l4.out {
                bump(&raw mut (*s).tcp_rst_out, 1);
            } else {
                bump(&raw mut (*s).tcp_rst_in, 1);
            }
        }
        if fin {
            bump(&raw mut (*s).tcp_fin, 1);
        }
    }
    ports(s, l4, sport, dport);
    if l4.out && dport == 53 && payload > 0 {
        unsafe { bump(&raw mut (*s).dns_queries, 1) };
    } else if !l4.out && sport == 53 && payload >= 6 && doff >= 20 {
        // DNS over TCP: a two-byte length, then the header.
        let f: [u8; 2] = ctx.load(l4.off + doff + 4)?;
        nxdomain(s, f);
    }
    Ok(())
}

fn udp(ctx: &TcContext, s: *mut GwStats, l4: &L4) -> Result<(), i64> {
    let h: [u8; 8] = ctx.load(l4.off)?;
    let sport = u16::from_be_bytes([h[0], h[1]]);
    let dport = u16::from_be_bytes([h[2], h[3]]);
    let len = u16::from_be_bytes([h[4], h[5]]) as usize;
    ports(s, l4, sport, dport);
    if l4.out && dport == 53 {
        unsafe { bump(&raw mut (*s).dns_queries, 1) };
    } else if !l4.out && sport == 53 && len >= 8 + 4 {
        let f: [u8; 2] = ctx.load(l4.off + 8 + 2)?;
        nxdomain(s, f);
    }
    Ok(())
}

/// A DNS header's flags: a response (QR) with rcode 3 is NXDOMAIN.
#[inline(always)]
fn nxdomain(s: *mut GwStats, f: [u8; 2]) {
    if f[0] & 0x80 != 0 && f[1] & 0xf == 3 {
        unsafe { bump(&raw mut (*s).dns_nxdomain, 1) };
    }
}

/// The 5-tuple (new in the episode?) and, for a frame the VM sent, the
/// remote port (new in this bucket?).
#[inline(always)]
fn ports(s: *mut GwStats, l4: &L4, sport: u16, dport: u16) {
    let (local_port, remote_port) = if l4.out {
        (sport, dport)
    } else {
        (dport, sport)
    };
    let key = FlowKey {
        local: l4.local,
        remote: l4.remote,
        local_port,
        remote_port,
        proto: l4.proto as u32,
    };
    // A lookup first: lock-free, where an insert takes the bucket's lock
    // even to find the key there (most frames belong to a known flow).
    if unsafe { GW_FLOWS.get(key) }.is_some() {
        return distinct_port(s, l4, remote_port);
    }
    match GW_FLOWS.insert(key, 0, BPF_NOEXIST as u64) {
        Ok(()) => unsafe { bump(&raw mut (*s).new_flows, 1) },
        Err(E2BIG) => unsafe { bump(&raw mut (*s).flows_overflow, 1) },
        Err(_) => {}
    }
    distinct_port(s, l4, remote_port);
}

/// A remote port the VM sent to: new in this bucket?
#[inline(always)]
fn distinct_port(s: *mut GwStats, l4: &L4, port: u16) {
    if !l4.out {
        return;
    }
    let key = PortKey {
        epoch: epoch(),
        port: port as u64,
    };
    if unsafe { GW_REMOTE_PORTS.get(key) }.is_some() {
        return;
    }
    match GW_REMOTE_PORTS.insert(key, 0, BPF_NOEXIST as u64) {
        Ok(()) => unsafe { bump(&raw mut (*s).remote_ports, 1) },
        Err(E2BIG) => unsafe { bump(&raw mut (*s).distinct_overflow, 1) },
        Err(_) => {}
    }
}

#[inline(always)]
fn epoch() -> u64 {
    GW_EPOCH.get(0).copied().unwrap_or(0)
}

#[inline(always)]
fn distinct_ip(s: *mut GwStats, remote: &[u8; 16]) {
    let key = IpKey {
        epoch: epoch(),
        addr: *remote,
    };
    if unsafe { GW_REMOTE_IPS.get(key) }.is_some() {
        return;
    }
    match GW_REMOTE_IPS.insert(key, 0, BPF_NOEXIST as u64) {
        Ok(()) => unsafe { bump(&raw mut (*s).remote_ips, 1) },
        Err(E2BIG) => unsafe { bump(&raw mut (*s).distinct_overflow, 1) },
        Err(_) => {}
    }
}

/// Copies the frame's first `snaplen` bytes to `GW_PCAP`, counting a full
/// ring buffer as a drop.
#[inline(always)]
fn capture(ctx: &TcContext, s: *mut GwStats, len: u32, snaplen: u32) {
    let Some(mut entry) = GW_PCAP.reserve::<PcapRecord>(0) else {
        unsafe { bump(&raw mut (*s).pcap_dropped, 1) };
        return;
    };
    let rec = entry.as_mut_ptr();
    // 1..=SNAP_MAX (a frame has bytes; the loader keeps the snap length
    // in 1..=SNAP_MAX), bounded by a mask the verifier follows on every
    // kernel (a compare LLVM may turn into one on a copy of the register).
    let n = if len < snaplen { len } else { snaplen };
    let n = unsafe { core::ptr::read_volatile(&n) };
    let n = (n.wrapping_sub(1) & (SNAP_MAX - 1)) + 1;
    // SAFETY: `rec` is the reserved record; `n` fits `data`.
    let ok = unsafe {
        (*rec).ts_ns = bpf_ktime_get_ns();
        (*rec).orig_len = len;
        (*rec).cap_len = n;
        bpf_skb_load_bytes(ctx.skb.skb as *const _, 0, (&raw mut (*rec).data).cast(), n) == 0
    };
    if ok {
        entry.submit(0);
        unsafe { bump(&raw mut (*s).pcap_records, 1) };
    } else {
        entry.discard(0);
        unsafe { bump(&raw mut (*s).pcap_dropped, 1) };
    }
}
