//! Network map layouts. Seen from the target: *tx* is what the target sends
//! out, *rx* what it receives.
//!
//! Two vantages: the target's tap interfaces, counted by interface in the
//! kernel (a frame written into a tap is received by the host, one sent into
//! it is counted when a reader copies it out, and neither need run in the
//! target's own threads, so they are matched by interface, not by the
//! current task); and the target's own IPv4/IPv6
//! socket traffic, in process context.

crate::names! {
    /// The network family's maps (`cis490-ebpf/src/net.rs`).
    pub mod map {
        NET_STATS,
        TAP_IFS,
        TAP_TABLE,
    }
}

crate::names! {
    /// The network family's programs, each named for its tracepoint.
    pub mod prog {
        NETIF_RECEIVE_SKB = "netif_receive_skb",
        SKB_COPY_DATAGRAM_IOVEC = "skb_copy_datagram_iovec",
        SOCK_SEND_LENGTH = "sock_send_length",
        SOCK_RECV_LENGTH = "sock_recv_length",
    }
}

crate::names! {
    /// The network family's read-only globals: `sk_buff`, `net_device`,
    /// `net` and `sock` member offsets.
    pub mod global {
        SKB_LEN_OFFSET,
        SKB_DATA_OFFSET,
        SKB_HEAD_OFFSET,
        SKB_MAC_HEADER_OFFSET,
        SKB_DEV_OFFSET,
        SKB_SK_OFFSET,
        NETDEV_IFINDEX_OFFSET,
        NETDEV_NET_OFFSET,
        NET_INUM_OFFSET,
        SOCK_FAMILY_OFFSET,
    }
}

/// Tap interfaces tracked at once.
pub const MAX_IFS: usize = 16;
/// Slot of [`NetStats::slots`] that counts socket traffic.
pub const SOCKET_SLOT: usize = MAX_IFS;

/// Entries of the tap table (map `TAP_TABLE`, `Array<TapEntry>`), indexed
/// by an interface's index modulo this ([`tap_entry`]). The network probes
/// run on every packet of the machine: an entry that holds another
/// interface (most often none) says "not a tap of a target" with one
/// inlined array load; one that holds this interface's index and namespace
/// gives its slots without the `TAP_IFS` hash lookup.
pub const TAP_TABLE_ENTRIES: u32 = 1024;

/// The tap table's entry for `ifindex`.
#[inline(always)]
pub const fn tap_entry(ifindex: u32) -> u32 {
    ifindex % TAP_TABLE_ENTRIES
}

/// One entry of the tap table: the tap registered first at this entry
/// (`ifindex` 0: none; no interface has index 0), and whether others that
/// share the entry (the same index in another namespace, or an index
/// [`TAP_TABLE_ENTRIES`] apart) are in `TAP_IFS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TapEntry {
    pub ifindex: u32,
    /// The inode number of the tap's network namespace.
    pub netns_inum: u32,
    /// [`tap_value`] of the tap.
    pub value: u32,
    /// Nonzero: look other interfaces of this entry up in `TAP_IFS`.
    pub overflow: u32,
}

/// Counters of one interface (or of the sockets), from the target's side.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfStats {
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub rx_packets: u64,
}

impl IfStats {
    pub const ZERO: Self = Self {
        tx_bytes: 0,
        rx_bytes: 0,
        tx_packets: 0,
        rx_packets: 0,
    };

    pub fn accumulate(&mut self, o: &Self) {
        self.tx_bytes = self.tx_bytes.wrapping_add(o.tx_bytes);
        self.rx_bytes = self.rx_bytes.wrapping_add(o.rx_bytes);
        self.tx_packets = self.tx_packets.wrapping_add(o.tx_packets);
        self.rx_packets = self.rx_packets.wrapping_add(o.rx_packets);
    }
}

/// Cumulative per-CPU network counters of one target (map `NET_STATS`, one
/// entry per target slot): slots `0..MAX_IFS` are its tap interfaces (the
/// slot number is in the value of `TAP_IFS`, [`tap_slots`]), slot
/// `SOCKET_SLOT` its sockets.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetStats {
    pub slots: [IfStats; MAX_IFS + 1],
}

impl NetStats {
    pub const ZERO: Self = Self {
        slots: [IfStats::ZERO; MAX_IFS + 1],
    };

    pub fn accumulate(&mut self, o: &Self) {
        for (a, b) in self.slots.iter_mut().zip(o.slots.iter()) {
            a.accumulate(b);
        }
    }
}

/// Value of `TAP_IFS`: the target slot that owns the tap and the tap's
/// slot of that target's [`NetStats::slots`].
#[inline(always)]
pub const fn tap_value(target: u32, if_slot: u32) -> u32 {
    (target << 8) | (if_slot & 0xff)
}

/// The (target slot, interface slot) of a `TAP_IFS` value.
#[inline(always)]
pub const fn tap_slots(value: u32) -> (u32, usize) {
    (value >> 8, (value & 0xff) as usize)
}

/// Key of `TAP_IFS`: an interface is its index within its network
/// namespace (the namespace's inode number).
#[inline(always)]
pub const fn if_key(netns_inum: u32, ifindex: u32) -> u64 {
    ((netns_inum as u64) << 32) | ifindex as u64
}

/// Socket families counted.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

const _: () = assert!(core::mem::size_of::<IfStats>() == 32);
const _: () = assert!(core::mem::size_of::<TapEntry>() == 16);
const _: () = assert!(core::mem::size_of::<NetStats>() == 32 * (MAX_IFS + 1));

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers without padding (asserted above).
    unsafe impl aya::Pod for super::NetStats {}
    unsafe impl aya::Pod for super::TapEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_keys_separate_namespaces() {
        assert_ne!(if_key(1, 5), if_key(2, 5));
        assert_eq!(if_key(0xf000_0001, 7), 0xf000_0001_0000_0007);
    }

    #[test]
    fn tap_entries_cover_every_index() {
        assert_eq!(tap_entry(1), 1);
        assert_eq!(tap_entry(TAP_TABLE_ENTRIES - 1), TAP_TABLE_ENTRIES - 1);
        // Indexes past the table share entries (the overflow flag's case).
        assert_eq!(tap_entry(TAP_TABLE_ENTRIES + 5), tap_entry(5));
        assert!(tap_entry(u32::MAX) < TAP_TABLE_ENTRIES);
    }

    #[test]
    fn tap_values_round_trip() {
        assert_eq!(tap_slots(tap_value(0, 3)), (0, 3));
        assert_eq!(
            tap_slots(tap_value(1023, MAX_IFS as u32 - 1)),
            (1023, MAX_IFS - 1)
        );
    }
}
