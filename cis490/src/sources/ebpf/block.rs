//! Block I/O rows from `BLOCK_STATS` and `BLOCK_MAX` (probes in
//! `cis490-ebpf/src/block.rs`).

use anyhow::{Context as _, Result};
use aya::maps::{MapData, PerCpuArray};
use cis490_common::{BlockStats, MaxSlot};

use super::{hist_delta, max_of, read_percpu, take};
use crate::{probes::Probes, row::Measures};

pub struct BlockReader {
    stats: PerCpuArray<MapData, BlockStats>,
    max: PerCpuArray<MapData, MaxSlot>,
    prev: BlockStats,
}

impl BlockReader {
    pub fn new(probes: &mut Probes) -> Result<Self> {
        Ok(Self {
            stats: take(probes, "BLOCK_STATS")?,
            max: take(probes, "BLOCK_MAX")?,
            prev: BlockStats::ZERO,
        })
    }

    pub fn map_errors(&self) -> u64 {
        self.prev.map_errors
    }

    pub fn sample(&mut self, ended: u64, m: &mut Measures) -> Result<()> {
        let c = read_percpu(
            &self.stats,
            "BLOCK_STATS",
            BlockStats::ZERO,
            BlockStats::accumulate,
        )?;
        let max = max_of(&self.max, ended).context("BLOCK_MAX")?;
        let p = &self.prev;
        let d = |a: u64, b: u64| Some(a.saturating_sub(b));
        m.blk_read_ops = d(c.read_ops, p.read_ops);
        m.blk_write_ops = d(c.write_ops, p.write_ops);
        m.blk_read_bytes = d(c.read_bytes, p.read_bytes);
        m.blk_write_bytes = d(c.write_bytes, p.write_bytes);
        m.blk_latency_ns_sum = d(c.latency_ns, p.latency_ns);
        m.blk_latency_max_ns = Some(max.unwrap_or(0));
        m.blk_latency_hist_log2 = Some(hist_delta(&c.latency_hist, &p.latency_hist));
        self.prev = c;
        Ok(())
    }
}
