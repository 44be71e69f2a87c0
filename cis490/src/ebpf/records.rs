//! The ring-buffer consumer: the streamed lifecycle records
//! (`cis490_common::record`), decoded and counted.

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use cis490_common::{LifecycleRecord, RecordKind, map, record::record_kind};
use tokio::io::unix::AsyncFd;

use super::{Probes, maps::open};

/// A decoded ring-buffer record.
#[derive(Clone, Debug)]
pub enum Record {
    Lifecycle(LifecycleRecord),
}

/// The ring-buffer consumer: wakes up when records are ready.
pub struct RecordStream {
    ring: AsyncFd<RingBuf<MapData>>,
    pub received: u64,
    pub undecodable: u64,
}

impl RecordStream {
    pub fn new(probes: &Probes) -> Result<Self> {
        let ring: RingBuf<MapData> = open(&probes.ebpf, map::RECORDS)?;
        Ok(Self {
            ring: crate::fdwatch::readable(ring)
                .context("registering the ring buffer with the event loop")?,
            received: 0,
            undecodable: 0,
        })
    }

    /// Waits until the ring buffer has data.
    pub async fn readable(&mut self) -> Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        guard.clear_ready();
        Ok(())
    }

    /// Hands every record now in the ring buffer to `f`. Records that do not
    /// decode are counted (and logged once in a while), never silently lost.
    pub fn drain(&mut self, mut f: impl FnMut(Record)) {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            self.received += 1;
            let bytes: &[u8] = &item;
            let decoded = record_kind(bytes).and_then(|k| match k {
                RecordKind::Lifecycle => LifecycleRecord::try_from(bytes).map(Record::Lifecycle),
            });
            match decoded {
                Ok(r) => f(r),
                Err(e) => {
                    self.undecodable += 1;
                    if self.undecodable.is_power_of_two() {
                        log::warn!(
                            "undecodable ring-buffer record ({e}); {} so far",
                            self.undecodable
                        );
                    }
                }
            }
        }
    }
}
