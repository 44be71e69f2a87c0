//! Block I/O rows from `BLOCK_STATS` and `BLOCK_MAX` (probes in
//! `cis490-ebpf/src/block.rs`).

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData, PerCpuArray};
use cis490_common::{BlockStats, MaxSlot, ReqStart, block::REQ_OP_READ};

use super::{hist_delta, max_of, read_percpu, take};
use crate::{clock::mono_now_ns, probes::Probes, row::Measures};

pub struct BlockReader {
    stats: PerCpuArray<MapData, BlockStats>,
    max: PerCpuArray<MapData, MaxSlot>,
    reqs: HashMap<MapData, u64, ReqStart>,
    /// Requests accounted here rather than in the kernel (see `settle`).
    settled: BlockStats,
    prev: BlockStats,
}

impl BlockReader {
    pub fn new(probes: &mut Probes) -> Result<Self> {
        Ok(Self {
            stats: take(probes, "BLOCK_STATS")?,
            max: take(probes, "BLOCK_MAX")?,
            reqs: take(probes, "REQS")?,
            settled: BlockStats::ZERO,
            prev: BlockStats::ZERO,
        })
    }

    pub fn map_errors(&self) -> u64 {
        self.prev.map_errors
    }

    pub fn missed_completions(&self) -> u64 {
        self.prev.missed_completions
    }

    /// Accounts requests still in the kernel map that were issued but never
    /// seen completing (their completion event was not delivered): all of
    /// them once the target is gone, else those issued over a second ago.
    /// Called before the last row.
    pub fn settle(&mut self, target_gone: bool) {
        let now = mono_now_ns();
        let stale: Vec<(u64, ReqStart)> = self
            .reqs
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, r)| {
                r.issued != 0 && (target_gone || now.saturating_sub(r.ts_ns) > 1_000_000_000)
            })
            .collect();
        for (rq, r) in stale {
            if self.reqs.remove(&rq).is_err() {
                continue; // completed meanwhile
            }
            let s = &mut self.settled;
            if r.op == REQ_OP_READ {
                s.read_bytes += r.missing_bytes();
                s.read_ops += 1;
            } else {
                s.write_bytes += r.missing_bytes();
                s.write_ops += 1;
            }
            s.missed_completions += 1;
        }
    }

    pub fn sample(&mut self, ended: u64, m: &mut Measures) -> Result<()> {
        let mut c = read_percpu(
            &self.stats,
            "BLOCK_STATS",
            BlockStats::ZERO,
            BlockStats::accumulate,
        )?;
        c.accumulate(&self.settled);
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
