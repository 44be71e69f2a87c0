//! Network probes, from the target's side (tx: what it sends out).
//!
//! Taps: a frame the target writes into its tap fd enters the host stack as
//! a packet *received* on the tap (`netif_receive_skb`); a frame the host
//! sends into the tap waits in the tap's queue until the target (or its
//! vhost worker) reads it, and is counted then, where the tap's own
//! counters count it (`skb_copy_datagram_iovec`, the copy to the reader).
//! Both are matched by interface (its network namespace and index:
//! `TAP_TABLE`, and `TAP_IFS` for taps that share a table entry), never by
//! the current task.
//! Sockets: `sock_send_length`/`sock_recv_length` (6.3+) in the target's own
//! threads, IPv4/IPv6 only (not the unix sockets of QMP or a monitor).

use aya_ebpf::{
    Global,
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::BtfTracePointContext,
};
use cis490_common::{
    IfStats, NetStats,
    net::{AF_INET, AF_INET6, MAX_IFS, SOCKET_SLOT, TapEntry, if_key, tap_entry, tap_slots},
};

use crate::{
    maps::bump,
    target::{current, field, load, target_slot},
};

/// Cumulative network counters per target slot (per tap interface and for
/// sockets), per CPU. Sized by the loader.
#[map]
pub static NET_STATS: PerCpuArray<NetStats> = PerCpuArray::with_max_entries(1, 0);

/// The targets' taps that share a `TAP_TABLE` entry with another tap:
/// `if_key(netns inode, ifindex)` -> `tap_value(target slot, slot of its
/// NetStats::slots)`. Kept by the loader as targets open taps.
#[map]
pub static TAP_IFS: HashMap<u64, u32> = HashMap::with_max_entries(MAX_IFS as u32, 0);

/// The targets' taps by interface index (`cis490_common::net::tap_entry`):
/// the first registered at each entry, and whether more are in `TAP_IFS`.
/// Set by the loader.
#[map]
pub static TAP_TABLE: Array<TapEntry> =
    Array::with_max_entries(cis490_common::net::TAP_TABLE_ENTRIES, 0);

#[unsafe(no_mangle)]
static SKB_LEN_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SKB_DATA_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SKB_HEAD_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SKB_MAC_HEADER_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SKB_DEV_OFFSET: Global<u32> = Global::new(0);
/// `sk_buff.sk`: the socket that owns it (none in a tap's queue).
#[unsafe(no_mangle)]
static SKB_SK_OFFSET: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static NETDEV_IFINDEX_OFFSET: Global<u32> = Global::new(0);
/// `net_device.nd_net.net`: the device's `struct net *`.
#[unsafe(no_mangle)]
static NETDEV_NET_OFFSET: Global<u32> = Global::new(0);
/// `net.ns.inum`: the namespace's inode number.
#[unsafe(no_mangle)]
static NET_INUM_OFFSET: Global<u32> = Global::new(0);
/// `sock.__sk_common.skc_family`.
#[unsafe(no_mangle)]
static SOCK_FAMILY_OFFSET: Global<u32> = Global::new(0);

type Res = Result<(), i32>;
const MSG_PEEK: u64 = 2;

/// The (target slot, `NetStats` slot) of a tap of a target, if `dev` (a
/// BTF-typed `struct net_device *`) is one. Direct loads: this runs for
/// every packet of the machine.
#[inline(always)]
fn tap_slot(dev: *const u8) -> Option<(u32, usize)> {
    let ifindex: u32 = load(dev, &NETDEV_IFINDEX_OFFSET);
    // Most packets of the machine are not on a tap of a target: its table
    // entry (an inlined array load) says so.
    let entry = TAP_TABLE.get(tap_entry(ifindex))?;
    if entry.ifindex != ifindex && entry.overflow == 0 {
        return None;
    }
    let net: *const u8 = load(dev, &NETDEV_NET_OFFSET);
    let inum: u32 = load(net, &NET_INUM_OFFSET);
    let value = if entry.ifindex == ifindex && entry.netns_inum == inum {
        entry.value
    } else if entry.overflow != 0 {
        *unsafe { TAP_IFS.get(if_key(inum, ifindex)) }?
    } else {
        return None;
    };
    Some(tap_slots(value)).filter(|&(_, slot)| slot < MAX_IFS)
}

/// Adds one packet of `bytes` to `slot`, as sent (`tx`) or received.
///
/// Plain adds, not atomic ones (about 30 ns less per frame on a tap flood
/// here): each counter of a slot has one writer, a tap's tx
/// `netif_receive_skb`, its rx `skb_copy_datagram_iovec`, the sockets' tx
/// `sock_send_length` and rx `sock_recv_length`; a tracepoint's program
/// runs with preemption off, and none of these runs from an interrupt on
/// top of itself (`netif_receive_skb` runs with bottom halves off, the
/// others in process context; kernels since late 2022 also skip and count a
/// nested run, `recursion_misses`). So nothing can come between a
/// counter's load and its store.
#[inline(always)]
fn count(target: u32, slot: usize, tx: bool, bytes: u64) {
    let Some(s) = NET_STATS.get_ptr_mut(target) else {
        return;
    };
    if slot > MAX_IFS {
        return;
    }
    let i: *mut IfStats = unsafe { &raw mut (*s).slots[slot] };
    unsafe {
        if tx {
            bump(&raw mut (*i).tx_bytes, bytes);
            bump(&raw mut (*i).tx_packets, 1);
        } else {
            bump(&raw mut (*i).rx_bytes, bytes);
            bump(&raw mut (*i).rx_packets, 1);
        }
    }
}

/// `netif_receive_skb(struct sk_buff *skb)`: a packet the host receives. On
/// a tap of the target, that is a frame the target sent.
#[btf_tracepoint(function = "netif_receive_skb")]
pub fn netif_receive_skb(ctx: BtfTracePointContext) -> i32 {
    let _ = try_receive(&ctx);
    0
}

fn try_receive(ctx: &BtfTracePointContext) -> Res {
    let skb: *const u8 = ctx.arg(0);
    let dev: *const u8 = load(skb, &SKB_DEV_OFFSET);
    let Some((target, slot)) = tap_slot(dev) else {
        return Ok(());
    };
    // The stack has pulled the link-layer header by now; count the whole
    // frame, as the interface statistics do.
    let len: u32 = load(skb, &SKB_LEN_OFFSET);
    let head: u64 = load(skb, &SKB_HEAD_OFFSET);
    let data: u64 = load(skb, &SKB_DATA_OFFSET);
    let mac: u16 = load(skb, &SKB_MAC_HEADER_OFFSET);
    let pulled = if mac == u16::MAX {
        0
    } else {
        data.saturating_sub(head + mac as u64)
    };
    count(target, slot, true, len as u64 + pulled.min(256));
    Ok(())
}

/// `skb_copy_datagram_iovec(const struct sk_buff *skb, int len)`: data of
/// `skb` copied to a reader. A tap's read (`tun_put_user`, also from a vhost
/// worker) copies a frame from the tap's queue, where the host's transmit
/// left it without an owning socket (`tun_net_xmit` orphans it); a socket's
/// receive copies an skb its socket owns. So an ownerless skb of a tap of
/// the target is a frame the target reads, counted as the tap's own
/// counters count it: when read (not when queued: frames dropped at a full
/// queue, or still queued at the end, are not the target's rx).
#[btf_tracepoint(function = "skb_copy_datagram_iovec")]
pub fn skb_copy_datagram_iovec(ctx: BtfTracePointContext) -> i32 {
    let _ = try_copy(&ctx);
    0
}

/// Bytes of the header copied apart before an accelerated VLAN tag
/// (`tun_put_user`: the two MAC addresses).
const VLAN_OFFSET: u32 = 12;
/// The accelerated VLAN tag that the tap inserts and counts.
const VLAN_HLEN: u32 = 4;

fn try_copy(ctx: &BtfTracePointContext) -> Res {
    let skb: *const u8 = ctx.arg(0);
    // Most copies of the machine are a socket's: one load says so.
    let sk: u64 = load(skb, &SKB_SK_OFFSET);
    if sk != 0 {
        return Ok(());
    }
    let dev: *const u8 = load(skb, &SKB_DEV_OFFSET);
    let Some((target, slot)) = tap_slot(dev) else {
        return Ok(());
    };
    let copied: u64 = ctx.arg(1);
    let copied = copied as u32;
    let len: u32 = load(skb, &SKB_LEN_OFFSET);
    // One copy of the whole frame; or, with an accelerated VLAN tag, the
    // first 12 bytes, the tag, then the rest: counted once, at the rest,
    // with the tag as the tap counts it.
    let bytes = if copied == len {
        len
    } else if copied != VLAN_OFFSET && copied.wrapping_add(VLAN_OFFSET) == len {
        len + VLAN_HLEN
    } else {
        return Ok(());
    };
    count(target, slot, false, bytes as u64);
    Ok(())
}

/// Counts socket traffic of the target's IPv4/IPv6 sockets.
#[inline(always)]
fn sock(ctx: &BtfTracePointContext, tx: bool) -> Res {
    let (tgid, _) = current();
    let Some(target) = target_slot(tgid) else {
        return Ok(());
    };
    let ret: u64 = ctx.arg(1);
    let ret = ret as i32;
    let flags: u64 = ctx.arg(2);
    if ret <= 0 || (!tx && flags & MSG_PEEK != 0) {
        return Ok(());
    }
    let sk: *const u8 = ctx.arg(0);
    let family: u16 = field(sk, &SOCK_FAMILY_OFFSET)?;
    if family == AF_INET || family == AF_INET6 {
        count(target, SOCKET_SLOT, tx, ret as u64);
    }
    Ok(())
}

/// `sock_send_length(struct sock *sk, int ret, int flags)` (6.3+).
#[btf_tracepoint(function = "sock_send_length")]
pub fn sock_send_length(ctx: BtfTracePointContext) -> i32 {
    let _ = sock(&ctx, true);
    0
}

/// `sock_recv_length(struct sock *sk, int ret, int flags)` (6.3+).
#[btf_tracepoint(function = "sock_recv_length")]
pub fn sock_recv_length(ctx: BtfTracePointContext) -> i32 {
    let _ = sock(&ctx, false);
    0
}
