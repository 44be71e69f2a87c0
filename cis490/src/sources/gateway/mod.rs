//! The `gateway` source: what the traced VM sends onto the lab's network
//! and receives from it, counted by TC classifiers on one interface (usually
//! the lab's bridge; programs in `cis490-ebpf/src/gateway.rs`, names and
//! layouts in `cis490_common::gateway`). The vantage a deployed detector
//! has, so its rows are `available_in_deployment: true`.

pub mod attach;
pub mod check;
pub mod fields;
pub mod macs;
pub mod pcap;

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use cis490_common::gateway::{
    self as gw, CONFIG_COUNT_ALL, CONFIG_SNAPLEN, DISTINCT_CAP, FLOWS_CAP, GwStats, IpKey,
    MAX_MACS, PortKey, mac_key,
};
use serde::Serialize;

use crate::{clock::ClockPair, ebpf::Probes, row::Measures};
pub use attach::emergency_detach;
use attach::{AttachMode, Attachment};
pub use fields::GatewayMeasures;
use macs::{Mac, MacOrigin};

/// Default snap length of `gateway.pcap`.
pub const DEFAULT_SNAPLEN: u32 = 256;

/// What `--gateway-*` asked for.
#[derive(Clone, Debug, Default)]
pub struct GatewayConfig {
    pub iface: String,
    /// `--gateway-mac` (repeatable); empty: discover.
    pub macs: Vec<Mac>,
    /// `--gateway-pcap`.
    pub pcap: bool,
    pub snaplen: u32,
    /// `--gateway-attach`.
    pub attach: attach::AttachChoice,
    /// `--gateway-netns`: the interface's network namespace.
    pub netns: Option<std::path::PathBuf>,
}

impl GatewayConfig {
    pub fn validate(&self) -> Result<()> {
        if self.macs.len() > MAX_MACS as usize {
            anyhow::bail!("--gateway-mac: at most {MAX_MACS} addresses");
        }
        if self.snaplen == 0 || self.snaplen > gw::SNAP_MAX {
            anyhow::bail!("--gateway-snaplen must be 1..={}", gw::SNAP_MAX);
        }
        attach::in_netns(self.netns.as_deref(), || attach::ifindex(&self.iface))?;
        Ok(())
    }
}

/// What meta.json records of the gateway (`gateway`).
#[derive(Clone, Debug, Serialize)]
pub struct GatewayInfo {
    pub interface: String,
    /// `--gateway-netns` as given (`null`: the tracer's namespace).
    pub netns: Option<std::path::PathBuf>,
    pub ifindex: u32,
    pub attach: AttachMode,
    /// Whether the tracer added the clsact qdisc (and removed it at the end).
    pub added_clsact: bool,
    pub macs: Vec<Mac>,
    pub mac_origin: MacOrigin,
    /// No MAC known: every frame on the interface was counted, ingress as
    /// "out", egress as "in".
    pub counts_every_frame: bool,
    /// `mac=` values of the command line that did not parse.
    pub bad_command_line_macs: usize,
    pub flows_cap: u32,
    pub distinct_cap: u32,
    pub frames: u64,
    pub flows_overflow: u64,
    pub distinct_overflow: u64,
    pub pcap: Option<PcapInfo>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PcapInfo {
    pub file: &'static str,
    pub snaplen: u32,
    pub records: u64,
    /// Frames not captured: the ring buffer was full.
    pub dropped: u64,
    pub undecodable: u64,
}

/// The gateway source: the attached classifiers and their maps.
pub struct GatewaySource {
    /// `None` once detached.
    attachment: Option<Attachment>,
    stats: PerCpuArray<MapData, GwStats>,
    epoch_map: Array<MapData, u64>,
    ips: HashMap<MapData, IpKey, u8>,
    ports: HashMap<MapData, PortKey, u8>,
    pcap: Option<pcap::PcapSink>,
    epoch: u64,
    prev: Option<GwStats>,
    info: GatewayInfo,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    probes: &mut Probes,
    name: &str,
) -> Result<T> {
    let map = probes
        .ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} not in the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
}

impl GatewaySource {
    /// The VM's MAC addresses: `--gateway-mac`, else QEMU's answer to
    /// `query-rx-filter` over `qmp` (when given and answering within 2 s),
    /// else `mac=` in QEMU's command line `argv`.
    pub async fn find_macs(
        cfg: &GatewayConfig,
        qmp: Option<&Path>,
        argv: &[String],
    ) -> (Vec<Mac>, MacOrigin, usize) {
        if !cfg.macs.is_empty() {
            return (cfg.macs.clone(), MacOrigin::Cli, 0);
        }
        if let Some(q) = qmp {
            match macs::from_qmp(q, std::time::Duration::from_secs(2)).await {
                Ok(m) if !m.is_empty() => return (m, MacOrigin::Qmp, 0),
                Ok(_) => log::info!("gateway: QEMU's query-rx-filter lists no NIC"),
                Err(e) => log::info!("gateway: no MAC from QMP ({e:#}); trying the command line"),
            }
        }
        let (m, bad) = macs::from_command_line(argv, MAX_MACS as usize);
        let origin = if m.is_empty() {
            MacOrigin::None
        } else {
            MacOrigin::CommandLine
        };
        (m, origin, bad)
    }

    /// Configures the maps (MACs, capture) and attaches the classifiers.
    pub fn new(
        probes: &mut Probes,
        cfg: &GatewayConfig,
        (macs, origin, bad): (Vec<Mac>, MacOrigin, usize),
        episode: &Path,
    ) -> Result<Self> {
        let mut mac_map: HashMap<MapData, u64, u32> = take(probes, gw::GW_MACS)?;
        for m in &macs {
            mac_map.insert(mac_key(m.0), 1, 0).context("map GW_MACS")?;
        }
        let mut config: Array<MapData, u32> = take(probes, gw::GW_CONFIG)?;
        let count_all = macs.is_empty();
        config
            .set(CONFIG_COUNT_ALL, count_all as u32, 0)
            .context("map GW_CONFIG")?;
        let pcap = if cfg.pcap {
            let ring: RingBuf<MapData> = take(probes, gw::GW_PCAP)?;
            let now = ClockPair::now();
            let sink = pcap::PcapSink::create(
                &episode.join(pcap::FILE),
                ring,
                cfg.snaplen,
                now.wall_ns as i128 - now.mono_ns as i128,
            )?;
            config
                .set(CONFIG_SNAPLEN, cfg.snaplen, 0)
                .context("map GW_CONFIG")?;
            Some(sink)
        } else {
            None
        };
        let stats = take(probes, gw::GW_STATS)?;
        let epoch_map = take(probes, gw::GW_EPOCH)?;
        let ips = take(probes, gw::GW_REMOTE_IPS)?;
        let ports = take(probes, gw::GW_REMOTE_PORTS)?;
        let attachment = Attachment::attach(
            &mut probes.ebpf,
            &cfg.iface,
            cfg.attach,
            cfg.netns.as_deref(),
        )?;
        if count_all {
            log::warn!(
                "gateway: no MAC address of the VM known (--gateway-mac, mac= in its command line): \
                 counting every frame on {}",
                cfg.iface
            );
        }
        let info = GatewayInfo {
            interface: cfg.iface.clone(),
            netns: cfg.netns.clone(),
            ifindex: attachment.ifindex,
            attach: attachment.mode,
            added_clsact: attachment.added_clsact,
            macs,
            mac_origin: origin,
            counts_every_frame: count_all,
            bad_command_line_macs: bad,
            flows_cap: FLOWS_CAP,
            distinct_cap: DISTINCT_CAP,
            frames: 0,
            flows_overflow: 0,
            distinct_overflow: 0,
            pcap: cfg.pcap.then_some(PcapInfo {
                file: pcap::FILE,
                snaplen: cfg.snaplen,
                records: 0,
                dropped: 0,
                undecodable: 0,
            }),
        };
        Ok(Self {
            attachment: Some(attachment),
            stats,
            epoch_map,
            ips,
            ports,
            pcap,
            epoch: 0,
            prev: None,
            info,
        })
    }

    fn read(&self) -> Result<GwStats> {
        let mut acc = GwStats::ZERO;
        for v in self.stats.get(&0, 0).context("map GW_STATS")?.iter() {
            add(&mut acc, v);
        }
        Ok(acc)
    }

    /// Deletes the distinct-map entries of epochs before the current one.
    fn sweep(&mut self) {
        let e = self.epoch;
        let old: Vec<IpKey> = self
            .ips
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.epoch < e)
            .collect();
        for k in old {
            let _ = self.ips.remove(&k);
        }
        let old: Vec<PortKey> = self
            .ports
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.epoch < e)
            .collect();
        for k in old {
            let _ = self.ports.remove(&k);
        }
    }

    /// What changed since the last call (the first call is the baseline).
    pub fn sample(&mut self) -> Result<Measures> {
        // Frames from now on count in the next bucket's distinct sets.
        self.epoch += 1;
        self.epoch_map
            .set(0, self.epoch, 0)
            .context("map GW_EPOCH")?;
        let now = self.read()?;
        let prev = self.prev.replace(now).unwrap_or(now);
        self.sweep();
        if let Some(p) = &mut self.pcap {
            p.drain()?;
        }
        let d = |f: fn(&GwStats) -> u64| Some(f(&now).wrapping_sub(f(&prev)));
        let mut hist: Vec<u64> = now
            .size_hist
            .iter()
            .zip(prev.size_hist.iter())
            .map(|(a, b)| a.wrapping_sub(*b))
            .collect();
        while hist.last() == Some(&0) {
            hist.pop();
        }
        let overflow = d(|s| s.flows_overflow.wrapping_add(s.distinct_overflow));
        let mut m = Measures {
            events: d(|s| s.out_frames.wrapping_add(s.in_frames)),
            dropped_events: d(|s| s.pcap_dropped),
            ..Default::default()
        };
        m.gw = GatewayMeasures {
            gw_out_frames: d(|s| s.out_frames),
            gw_out_bytes: d(|s| s.out_bytes),
            gw_in_frames: d(|s| s.in_frames),
            gw_in_bytes: d(|s| s.in_bytes),
            gw_ipv4_frames: d(|s| s.ipv4),
            gw_ipv6_frames: d(|s| s.ipv6),
            gw_arp_frames: d(|s| s.arp),
            gw_other_frames: d(|s| s.other),
            gw_tcp_frames: d(|s| s.tcp),
            gw_udp_frames: d(|s| s.udp),
            gw_icmp_frames: d(|s| s.icmp),
            gw_tcp_syn: d(|s| s.tcp_syn),
            gw_tcp_synack_in: d(|s| s.tcp_synack_in),
            gw_tcp_rst_in: d(|s| s.tcp_rst_in),
            gw_tcp_rst_out: d(|s| s.tcp_rst_out),
            gw_tcp_fin: d(|s| s.tcp_fin),
            gw_dns_queries: d(|s| s.dns_queries),
            gw_dns_nxdomain: d(|s| s.dns_nxdomain),
            gw_new_flows: d(|s| s.new_flows),
            gw_remote_ips: d(|s| s.remote_ips),
            gw_remote_ports: d(|s| s.remote_ports),
            gw_distinct_overflow: overflow,
            gw_frame_size_hist_log2: Some(hist),
        };
        self.info.frames = now.out_frames.wrapping_add(now.in_frames);
        self.info.flows_overflow = now.flows_overflow;
        self.info.distinct_overflow = now.distinct_overflow;
        if let (Some(pi), Some(p)) = (&mut self.info.pcap, &self.pcap) {
            pi.records = p.records;
            pi.dropped = now.pcap_dropped;
            pi.undecodable = p.undecodable;
        }
        Ok(m)
    }

    /// Detaches the classifiers, writes out `gateway.pcap`, and returns
    /// what meta.json records.
    pub fn finish(mut self) -> Result<GatewayInfo> {
        drop(self.attachment.take());
        if let Some(p) = &mut self.pcap {
            p.finish()?;
            if let Some(pi) = &mut self.info.pcap {
                pi.records = p.records;
                pi.undecodable = p.undecodable;
            }
        }
        Ok(self.info)
    }

    pub fn info(&self) -> &GatewayInfo {
        &self.info
    }
}

fn add(a: &mut GwStats, b: &GwStats) {
    macro_rules! sum {
        ($($f:ident),*) => { $(a.$f = a.$f.wrapping_add(b.$f);)* };
    }
    sum!(
        out_frames,
        out_bytes,
        in_frames,
        in_bytes,
        ipv4,
        ipv6,
        arp,
        other,
        tcp,
        udp,
        icmp,
        tcp_syn,
        tcp_synack_in,
        tcp_rst_in,
        tcp_rst_out,
        tcp_fin,
        dns_queries,
        dns_nxdomain,
        new_flows,
        flows_overflow,
        remote_ips,
        remote_ports,
        distinct_overflow,
        pcap_records,
        pcap_dropped
    );
    for (x, y) in a.size_hist.iter_mut().zip(b.size_hist.iter()) {
        *x = x.wrapping_add(*y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The object's gateway maps and programs are held to
    // `cis490_common::gateway`'s names by the loader's names test
    // (`ebpf::loader::tests::the_objects_names_are_the_declared_ones`).

    #[test]
    fn per_cpu_counters_add_up() {
        let mut a = GwStats::ZERO;
        let mut b = GwStats::ZERO;
        b.out_frames = 3;
        b.pcap_dropped = 2;
        b.size_hist[6] = 5;
        add(&mut a, &b);
        add(&mut a, &b);
        assert_eq!((a.out_frames, a.pcap_dropped, a.size_hist[6]), (6, 4, 10));
    }
}
