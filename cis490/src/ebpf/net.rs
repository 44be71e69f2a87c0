//! The network probe family (programs in `cis490-ebpf/src/net.rs`): the
//! target's tap interfaces (by interface: what it writes as the host
//! receives it, what it reads as the tap hands it over) and its own
//! IPv4/IPv6 sockets (in process context, Linux 6.3+).
//!
//! The reader: Network rows from `NET_STATS`, and the registry of the target's taps in
//! `TAP_TABLE` and `TAP_IFS` (probes in `cis490-ebpf/src/net.rs`).

use std::{collections::BTreeMap, sync::Mutex};

use anyhow::Result;
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
};
use cis490_common::{
    IfStats, NetStats,
    net::{MAX_IFS, SOCKET_SLOT, TapEntry, global, if_key, map, prog, tap_entry, tap_value},
};

use crate::sources::SampleCtx;

use super::{
    maps::{open, read_percpu},
    spec::{Attacher, FamilyStatus, KernelFacts, OffsetSpec, ProbeSpec},
    targets::Slot,
};
use crate::{
    row::{Measures, NetCounters},
    taps::Tap,
};

pub const FAMILY: &str = "net";

pub const TAP_OFFSETS: &[OffsetSpec] = &[
    OffsetSpec {
        global: global::SKB_LEN_OFFSET,
        ty: "sk_buff",
        path: "len",
    },
    OffsetSpec {
        global: global::SKB_DATA_OFFSET,
        ty: "sk_buff",
        path: "data",
    },
    OffsetSpec {
        global: global::SKB_HEAD_OFFSET,
        ty: "sk_buff",
        path: "head",
    },
    OffsetSpec {
        global: global::SKB_MAC_HEADER_OFFSET,
        ty: "sk_buff",
        path: "mac_header",
    },
    OffsetSpec {
        global: global::SKB_DEV_OFFSET,
        ty: "sk_buff",
        path: "dev",
    },
    OffsetSpec {
        global: global::SKB_SK_OFFSET,
        ty: "sk_buff",
        path: "sk",
    },
    OffsetSpec {
        global: global::NETDEV_IFINDEX_OFFSET,
        ty: "net_device",
        path: "ifindex",
    },
    OffsetSpec {
        global: global::NETDEV_NET_OFFSET,
        ty: "net_device",
        path: "nd_net.net",
    },
    OffsetSpec {
        global: global::NET_INUM_OFFSET,
        ty: "net",
        path: "ns.inum",
    },
];
pub const SOCK_OFFSETS: &[OffsetSpec] = &[OffsetSpec {
    global: global::SOCK_FAMILY_OFFSET,
    ty: "sock",
    path: "__sk_common.skc_family",
}];
pub const OFFSETS: &[OffsetSpec] = &{
    let mut all = [TAP_OFFSETS[0]; TAP_OFFSETS.len() + SOCK_OFFSETS.len()];
    let mut i = 0;
    while i < TAP_OFFSETS.len() {
        all[i] = TAP_OFFSETS[i];
        i += 1;
    }
    all[i] = SOCK_OFFSETS[0];
    all
};

pub(super) const TAPS: &[ProbeSpec] = &[
    ProbeSpec::tp_btf(prog::NETIF_RECEIVE_SKB),
    ProbeSpec::tp_btf(prog::SKB_COPY_DATAGRAM_IOVEC),
];
pub(super) const SOCKETS: &[ProbeSpec] = &[
    ProbeSpec::tp_btf(prog::SOCK_SEND_LENGTH),
    ProbeSpec::tp_btf(prog::SOCK_RECV_LENGTH),
];

/// Which vantages can work on this kernel.
#[derive(Clone, Debug)]
pub struct NetPlan {
    pub taps: Result<(), String>,
    pub sockets: Result<(), String>,
}

pub fn plan(facts: &KernelFacts) -> NetPlan {
    let tracepoints =
        |specs: &[ProbeSpec]| match specs.iter().find(|s| !facts.has_tracepoint(s.tracepoint)) {
            Some(s) => Err(format!("this kernel has no {} tracepoint", s.tracepoint)),
            None => Ok(()),
        };
    NetPlan {
        taps: facts
            .have_offsets(TAP_OFFSETS)
            .and_then(|()| tracepoints(TAPS)),
        sockets: facts
            .have_offsets(SOCK_OFFSETS)
            .and_then(|()| tracepoints(SOCKETS)),
    }
}

/// Attaches one vantage; `Ok` when all its programs attached.
fn vantage(
    a: &mut Attacher<'_>,
    specs: &[ProbeSpec],
    plan: &Result<(), String>,
) -> Result<(), String> {
    match plan {
        Err(why) => {
            for s in specs {
                a.skip(FAMILY, s, why);
            }
            Err(why.clone())
        }
        Ok(()) => match specs.iter().filter(|s| !a.attach(FAMILY, s)).count() {
            0 => Ok(()),
            _ => Err(format!("{} did not attach", specs[0].program)),
        },
    }
}

/// Which vantages attached, for the reader.
#[derive(Clone, Copy, Debug)]
pub struct Attached {
    taps: bool,
    sockets: bool,
}

/// Attaches the vantages the plan allows; `None` for the reader when
/// neither attached.
pub fn attach(a: &mut Attacher<'_>, plan: &NetPlan) -> (FamilyStatus, Option<Attached>) {
    let taps = vantage(a, TAPS, &plan.taps);
    let sockets = vantage(a, SOCKETS, &plan.sockets);
    let (taps_ok, sockets_ok) = (taps.is_ok(), sockets.is_ok());
    let path = match (&taps, &sockets) {
        (Ok(()), Ok(())) => Some("taps+sockets"),
        (Ok(()), Err(_)) => Some("taps"),
        (Err(_), Ok(())) => Some("sockets"),
        (Err(_), Err(_)) => None,
    };
    let note = [
        taps.err().map(|e| format!("taps: {e}")),
        sockets.err().map(|e| format!("sockets: {e}")),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>();
    let status = FamilyStatus {
        family: FAMILY.into(),
        active: path.is_some(),
        path: path.map(Into::into),
        note: (!note.is_empty()).then(|| note.join("; ")),
    };
    let attached = path.is_some().then_some(Attached {
        taps: taps_ok,
        sockets: sockets_ok,
    });
    (status, attached)
}

// ---- the reader ----------------------------------------------------------

pub struct NetReader {
    /// The target's slot.
    target: u32,
    stats: PerCpuArray<MapData, NetStats>,
    tap_ifs: HashMap<MapData, u64, u32>,
    /// The taps by interface index: the first at each entry.
    tap_table: Array<MapData, TapEntry>,
    taps_on: bool,
    sockets_on: bool,
    /// Interface name of each slot in use, in slot order.
    slots: Vec<String>,
    /// Their `TAP_IFS` keys, removed when the reader goes (the slot may
    /// go to another target) from `TAP_TABLE` or `TAP_IFS`.
    keys: Vec<u64>,
    new_taps: Vec<Tap>,
    prev: NetStats,
}

/// Counters of one slot between two reads.
fn delta(now: &IfStats, prev: &IfStats) -> NetCounters {
    NetCounters {
        tx_bytes: now.tx_bytes.saturating_sub(prev.tx_bytes),
        rx_bytes: now.rx_bytes.saturating_sub(prev.rx_bytes),
        tx_packets: now.tx_packets.saturating_sub(prev.tx_packets),
        rx_packets: now.rx_packets.saturating_sub(prev.rx_packets),
    }
}

impl NetReader {
    pub fn new(ebpf: &Ebpf, slot: Slot, attached: Attached) -> Result<Self> {
        Ok(Self {
            target: slot.index(),
            stats: open(ebpf, map::NET_STATS)?,
            tap_ifs: open(ebpf, map::TAP_IFS)?,
            tap_table: open(ebpf, map::TAP_TABLE)?,
            taps_on: attached.taps,
            sockets_on: attached.sockets,
            slots: Vec::new(),
            keys: Vec::new(),
            new_taps: Vec::new(),
            prev: NetStats::ZERO,
        })
    }

    pub fn take_new_taps(&mut self) -> Vec<Tap> {
        std::mem::take(&mut self.new_taps)
    }

    /// Gives taps the target opened since the last call a slot, so the
    /// probes count their traffic from now on. A tap is an interface in a
    /// namespace (`TAP_IFS`'s key), not a name: one re-created under its old
    /// name (a NIC hot-plugged again) is a new one, counted under the same
    /// name in the rows.
    fn register(&mut self, taps: &[Tap]) {
        for tap in taps {
            let key = if_key(tap.netns_inum, tap.ifindex);
            if self.keys.contains(&key) {
                continue;
            }
            if self.slots.len() >= MAX_IFS {
                log::warn!(
                    "the target holds more than {MAX_IFS} taps: {} is not counted",
                    tap.name
                );
                continue;
            }
            let value = tap_value(self.target, self.slots.len() as u32);
            match self.enter(tap, value) {
                Ok(()) => {
                    self.slots.push(tap.name.clone());
                    self.keys.push(key);
                    self.new_taps.push(tap.clone());
                }
                Err(e) => log::warn!("cannot count tap {}: {e}", tap.name),
            }
        }
    }

    /// Puts a tap into the table, or into `TAP_IFS` with its table entry's
    /// overflow flag set when another tap holds the entry.
    ///
    /// The probes may read an entry while it is written, so no write may
    /// show them a mix that matches a tap with another's value: an empty
    /// entry (`ifindex` 0, matching nothing) first gets the namespace and
    /// the value, then, in a second write, the index; a tap leaves by its
    /// index alone (see `Drop`).
    fn enter(&mut self, tap: &Tap, value: u32) -> Result<(), aya::maps::MapError> {
        let _one_writer = TAP_TABLE_WRITER.lock().unwrap_or_else(|e| e.into_inner());
        let i = tap_entry(tap.ifindex);
        let mut entry = self.tap_table.get(&i, 0)?;
        if entry.ifindex == 0 {
            entry.netns_inum = tap.netns_inum;
            entry.value = value;
            self.tap_table.set(i, entry, 0)?;
            entry.ifindex = tap.ifindex;
        } else {
            self.tap_ifs
                .insert(if_key(tap.netns_inum, tap.ifindex), value, 0)?;
            entry.overflow = 1;
        }
        self.tap_table.set(i, entry, 0)
    }

    pub fn sample(&mut self, ctx: &SampleCtx<'_>, m: &mut Measures) -> Result<()> {
        if self.taps_on {
            self.register(&ctx.holdings.tap_ifs);
        }
        let c = read_percpu(
            &self.stats,
            map::NET_STATS,
            self.target,
            NetStats::ZERO,
            NetStats::accumulate,
        )?;
        let mut by_if: BTreeMap<String, NetCounters> = BTreeMap::new();
        for (i, name) in self.slots.iter().enumerate() {
            by_if
                .entry(name.clone())
                .or_default()
                .add(&delta(&c.slots[i], &self.prev.slots[i]));
        }
        if self.sockets_on {
            by_if.insert(
                "sockets".to_owned(),
                delta(&c.slots[SOCKET_SLOT], &self.prev.slots[SOCKET_SLOT]),
            );
        }
        m.set_net(Some(by_if));
        self.prev = c;
        Ok(())
    }
}

/// One writer of `TAP_TABLE` at a time: a server's episodes register taps
/// from their own threads, and an entry is written whole.
static TAP_TABLE_WRITER: Mutex<()> = Mutex::new(());

impl Drop for NetReader {
    /// The target's taps are no longer counted for its slot. (An entry's
    /// overflow flag stays: it only sends a lookup to `TAP_IFS`.)
    fn drop(&mut self) {
        let _one_writer = TAP_TABLE_WRITER.lock().unwrap_or_else(|e| e.into_inner());
        for &key in &self.keys {
            let (netns_inum, ifindex) = ((key >> 32) as u32, key as u32);
            let i = tap_entry(ifindex);
            match self.tap_table.get(&i, 0) {
                Ok(e) if e.ifindex == ifindex && e.netns_inum == netns_inum => {
                    // The index alone: a read during the write sees the
                    // whole tap or none.
                    let _ = self.tap_table.set(i, TapEntry { ifindex: 0, ..e }, 0);
                }
                _ => {
                    let _ = self.tap_ifs.remove(&key);
                }
            }
        }
    }
}
