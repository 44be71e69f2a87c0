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
    feed: Feed,
    pub received: u64,
    pub undecodable: u64,
}

/// Where an episode's records come from.
enum Feed {
    /// The ring buffer itself (a standalone trace).
    Ring(AsyncFd<RingBuf<MapData>>),
    /// A server's dispatcher, which reads the ring buffer for every episode
    /// and hands each its target's records.
    Channel {
        rx: tokio::sync::mpsc::UnboundedReceiver<Record>,
        ready: Vec<Record>,
    },
}

impl RecordStream {
    pub fn new(probes: &Probes) -> Result<Self> {
        let ring: RingBuf<MapData> = open(&probes.ebpf, map::RECORDS)?;
        Ok(Self {
            feed: Feed::Ring(
                crate::fdwatch::readable(ring)
                    .context("registering the ring buffer with the event loop")?,
            ),
            received: 0,
            undecodable: 0,
        })
    }

    /// A stream of the records a dispatcher sends.
    pub fn from_channel(rx: tokio::sync::mpsc::UnboundedReceiver<Record>) -> Self {
        Self {
            feed: Feed::Channel {
                rx,
                ready: Vec::new(),
            },
            received: 0,
            undecodable: 0,
        }
    }

    /// Waits until records are ready.
    pub async fn readable(&mut self) -> Result<()> {
        match &mut self.feed {
            Feed::Ring(ring) => {
                let mut guard = ring.readable_mut().await?;
                guard.clear_ready();
            }
            Feed::Channel { rx, ready } => match rx.recv().await {
                Some(r) => ready.push(r),
                // The dispatcher is gone (the server is ending): nothing
                // more comes.
                None => std::future::pending().await,
            },
        }
        Ok(())
    }

    /// Hands every record now ready to `f`. Records that do not decode are
    /// counted (and logged once in a while), never silently lost.
    pub fn drain(&mut self, mut f: impl FnMut(Record)) {
        let ring = match &mut self.feed {
            Feed::Ring(ring) => ring.get_mut(),
            Feed::Channel { rx, ready } => {
                while let Ok(r) = rx.try_recv() {
                    ready.push(r);
                }
                self.received += ready.len() as u64;
                ready.drain(..).for_each(f);
                return;
            }
        };
        while let Some(item) = ring.next() {
            self.received += 1;
            match decode(&item) {
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

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Record, cis490_common::DecodeError> {
    record_kind(bytes).and_then(|k| match k {
        RecordKind::Lifecycle => LifecycleRecord::try_from(bytes).map(Record::Lifecycle),
    })
}

impl Record {
    /// The target slot the record is for.
    pub fn slot(&self) -> u32 {
        match self {
            Record::Lifecycle(l) => l.slot,
        }
    }
}
