//! `gateway.pcap`: the frames the classifiers copied to the `GW_PCAP` ring
//! buffer, in the classic pcap format with nanosecond timestamps (magic
//! `0xa1b23c4d`, link type Ethernet), which tcpdump, tshark and Wireshark
//! read.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use cis490_common::gateway::{PCAP_HEADER, SNAP_MAX};

use crate::episode::create_new;

pub const FILE: &str = "gateway.pcap";
const MAGIC_NS: u32 = 0xa1b2_3c4d;
const LINKTYPE_ETHERNET: u32 = 1;

/// The ring buffer and the file it drains into.
pub struct PcapSink {
    ring: RingBuf<MapData>,
    out: BufWriter<File>,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, ns, at the start.
    wall_minus_mono: i128,
    pub records: u64,
    /// Records whose header did not make sense (never expected: counted).
    pub undecodable: u64,
}

impl PcapSink {
    pub fn create(
        path: &Path,
        ring: RingBuf<MapData>,
        snaplen: u32,
        wall_minus_mono: i128,
    ) -> Result<Self> {
        let f = create_new(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut out = BufWriter::with_capacity(256 * 1024, f);
        let mut h = Vec::with_capacity(24);
        h.extend_from_slice(&MAGIC_NS.to_le_bytes());
        h.extend_from_slice(&2u16.to_le_bytes());
        h.extend_from_slice(&4u16.to_le_bytes());
        h.extend_from_slice(&0i32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&snaplen.to_le_bytes());
        h.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&h)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self {
            ring,
            out,
            wall_minus_mono,
            records: 0,
            undecodable: 0,
        })
    }

    /// Writes every record waiting in the ring buffer.
    pub fn drain(&mut self) -> Result<()> {
        while let Some(item) = self.ring.next() {
            let rec: &[u8] = &item;
            match decode(rec) {
                Some((ts_ns, orig_len, data)) => {
                    let wall = (ts_ns as i128 + self.wall_minus_mono).max(0) as u128;
                    let mut h = [0u8; 16];
                    h[0..4].copy_from_slice(&((wall / 1_000_000_000) as u32).to_le_bytes());
                    h[4..8].copy_from_slice(&((wall % 1_000_000_000) as u32).to_le_bytes());
                    h[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
                    h[12..16].copy_from_slice(&orig_len.to_le_bytes());
                    self.out
                        .write_all(&h)
                        .and_then(|()| self.out.write_all(data))
                        .context("cannot write gateway.pcap")?;
                    self.records += 1;
                }
                None => self.undecodable += 1,
            }
        }
        Ok(())
    }

    /// Flushes and fsyncs.
    pub fn finish(&mut self) -> Result<()> {
        self.drain()?;
        self.out.flush().context("cannot write gateway.pcap")?;
        self.out
            .get_ref()
            .sync_all()
            .context("cannot write gateway.pcap")
    }
}

/// A `PcapRecord`'s timestamp, frame length and captured bytes; `None` if
/// the lengths do not fit.
fn decode(rec: &[u8]) -> Option<(u64, u32, &[u8])> {
    let ts = u64::from_ne_bytes(rec.get(0..8)?.try_into().ok()?);
    let orig = u32::from_ne_bytes(rec.get(8..12)?.try_into().ok()?);
    let cap = u32::from_ne_bytes(rec.get(12..16)?.try_into().ok()?);
    if cap == 0 || cap > SNAP_MAX || cap > orig {
        return None;
    }
    Some((ts, orig, rec.get(PCAP_HEADER..PCAP_HEADER + cap as usize)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decode_within_bounds() {
        let mut r = vec![0u8; PCAP_HEADER + SNAP_MAX as usize];
        r[0..8].copy_from_slice(&5u64.to_ne_bytes());
        r[8..12].copy_from_slice(&1500u32.to_ne_bytes());
        r[12..16].copy_from_slice(&60u32.to_ne_bytes());
        let (ts, orig, data) = decode(&r).unwrap();
        assert_eq!((ts, orig, data.len()), (5, 1500, 60));
        r[12..16].copy_from_slice(&(SNAP_MAX + 1).to_ne_bytes());
        assert!(decode(&r).is_none());
        r[12..16].copy_from_slice(&1501u32.to_ne_bytes());
        assert!(decode(&r).is_none());
        assert!(decode(&r[..10]).is_none());
    }
}
