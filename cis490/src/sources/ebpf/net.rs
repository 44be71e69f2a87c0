//! Network rows from `NET_STATS`, and the registry of the target's taps in
//! `TAP_IFS` (probes in `cis490-ebpf/src/net.rs`).

use std::collections::BTreeMap;

use anyhow::Result;
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use cis490_common::{
    IfStats, NetStats,
    net::{MAX_IFS, SOCKET_SLOT, if_key, ifindex_bit},
};

use super::{SampleCtx, read_percpu, take};
use crate::{
    probes::{FamilyStatus, Probes, net},
    row::{Measures, NetCounters},
    taps::{self, Tap},
};

pub struct NetReader {
    pid: i32,
    stats: PerCpuArray<MapData, NetStats>,
    tap_ifs: HashMap<MapData, u64, u32>,
    /// The probes' ifindex filter: a bit for every registered tap.
    tap_ifindexes: Array<MapData, u64>,
    taps_on: bool,
    sockets_on: bool,
    /// Interface name of each slot in use, in slot order.
    slots: Vec<String>,
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
    pub fn new(probes: &mut Probes, pid: i32, status: &FamilyStatus) -> Result<Self> {
        Ok(Self {
            pid,
            stats: take(probes, "NET_STATS")?,
            tap_ifs: take(probes, "TAP_IFS")?,
            tap_ifindexes: take(probes, "TAP_IFINDEXES")?,
            taps_on: net::taps_active(status),
            sockets_on: net::sockets_active(status),
            slots: Vec::new(),
            new_taps: Vec::new(),
            prev: NetStats::ZERO,
        })
    }

    pub fn take_new_taps(&mut self) -> Vec<Tap> {
        std::mem::take(&mut self.new_taps)
    }

    /// Gives taps the target opened since the last call a slot, so the
    /// probes count their traffic from now on.
    fn register(&mut self, names: &[String]) {
        let fresh: Vec<String> = names
            .iter()
            .filter(|n| !self.slots.contains(n))
            .cloned()
            .collect();
        if fresh.is_empty() {
            return;
        }
        let resolved = match taps::resolve(self.pid, &fresh) {
            Ok(r) => r,
            Err(e) => {
                log::debug!("taps of {}: {e}", self.pid);
                return;
            }
        };
        for tap in resolved {
            if self.slots.len() >= MAX_IFS {
                log::warn!(
                    "the target holds more than {MAX_IFS} taps: {} is not counted",
                    tap.name
                );
                continue;
            }
            let slot = self.slots.len() as u32;
            // The filter bit first: a frame between the two is then only
            // looked up in vain, never missed once the tap is in TAP_IFS.
            let (word, bit) = ifindex_bit(tap.ifindex);
            let set = self
                .tap_ifindexes
                .get(&word, 0)
                .and_then(|w| self.tap_ifindexes.set(word, w | bit, 0));
            if let Err(e) = set {
                log::warn!("cannot count tap {}: {e}", tap.name);
                continue;
            }
            match self
                .tap_ifs
                .insert(if_key(tap.netns_inum, tap.ifindex), slot, 0)
            {
                Ok(()) => {
                    self.slots.push(tap.name.clone());
                    self.new_taps.push(tap);
                }
                Err(e) => log::warn!("cannot count tap {}: {e}", tap.name),
            }
        }
    }

    pub fn sample(&mut self, ctx: &SampleCtx<'_>, m: &mut Measures) -> Result<()> {
        if self.taps_on {
            self.register(&ctx.holdings.taps);
        }
        let c = read_percpu(
            &self.stats,
            "NET_STATS",
            NetStats::ZERO,
            NetStats::accumulate,
        )?;
        let mut by_if = BTreeMap::new();
        for (i, name) in self.slots.iter().enumerate() {
            by_if.insert(name.clone(), delta(&c.slots[i], &self.prev.slots[i]));
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
