//! Records streamed through the ring buffer, and their host-side decoders.
//!
//! Every record starts with a `u32` kind ([`RecordKind`]); the loader reads
//! the kind, then decodes the rest field by field from little-endian bytes
//! (`TryFrom<&[u8]>`), so a short or unknown record is an error, never UB.
//!
//! Rows do not depend on these records (they come from in-kernel counters):
//! a lost record costs an `events.jsonl` line, and it is counted.

use crate::COMM_LEN;

/// The first `u32` of every ring-buffer record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A [`LifecycleRecord`].
    Lifecycle = 1,
}

impl TryFrom<u32> for RecordKind {
    type Error = DecodeError;
    fn try_from(v: u32) -> Result<Self, DecodeError> {
        match v {
            1 => Ok(Self::Lifecycle),
            other => Err(DecodeError::UnknownKind(other)),
        }
    }
}

/// What happened to a target thread.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleKind {
    /// A new thread of the target (`sched_process_fork`); `aux` = parent tid.
    ThreadStart = 1,
    /// A target thread exited (`sched_process_exit`).
    ThreadExit = 2,
    /// A target thread called `execve` (`sched_process_exec`); `aux` = old tid.
    Exec = 3,
    /// A target thread was renamed (`task_rename`); `comm` is the new name.
    Rename = 4,
}

impl TryFrom<u32> for LifecycleKind {
    type Error = DecodeError;
    fn try_from(v: u32) -> Result<Self, DecodeError> {
        match v {
            1 => Ok(Self::ThreadStart),
            2 => Ok(Self::ThreadExit),
            3 => Ok(Self::Exec),
            4 => Ok(Self::Rename),
            other => Err(DecodeError::UnknownLifecycle(other)),
        }
    }
}

/// A thread lifecycle record (80 bytes, no padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LifecycleRecord {
    /// Always `RecordKind::Lifecycle as u32`.
    pub kind: u32,
    /// A `LifecycleKind` as `u32`.
    pub what: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when it happened.
    pub ts_ns: u64,
    /// Thread id.
    pub tid: u32,
    /// Depends on `what` (see [`LifecycleKind`]).
    pub aux: u32,
    /// Thread name, NUL-padded.
    pub comm: [u8; COMM_LEN],
    /// The target slot of the thread's process (`crate::target`).
    pub slot: u32,
    /// Zero.
    pub reserved: u32,
    /// At a thread's exit, its own counters then (before its final
    /// switch-out); zero for the other kinds.
    pub totals: ThreadTotals,
}

/// A thread's own scheduler counters over its life, read as it exits
/// (`sched_process_exit`, in the thread, before the kernel folds them into
/// its process's totals): what a poller of `/proc/PID/task` misses of a
/// thread that exits between two polls.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadTotals {
    /// `se.sum_exec_runtime`, ns.
    pub cpu_ns: u64,
    /// `nvcsw`.
    pub voluntary: u64,
    /// `nivcsw`.
    pub involuntary: u64,
    /// `se.nr_migrations`.
    pub migrations: u64,
}

const _: () = assert!(
    core::mem::size_of::<LifecycleRecord>() == 4 + 4 + 8 + 4 + 4 + COMM_LEN + 4 + 4 + 4 * 8
);

/// Why a ring-buffer record could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the record needs.
    Short { need: usize, got: usize },
    /// A record kind this loader does not know.
    UnknownKind(u32),
    /// A lifecycle `what` this loader does not know.
    UnknownLifecycle(u32),
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Short { need, got } => {
                write!(f, "record too short: need {need} bytes, got {got}")
            }
            Self::UnknownKind(k) => write!(f, "unknown record kind {k}"),
            Self::UnknownLifecycle(k) => write!(f, "unknown lifecycle kind {k}"),
        }
    }
}

/// Little-endian field reader over a byte slice whose length was checked.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn u32(&mut self) -> u32 {
        let (head, rest) = self.0.split_at(4);
        self.0 = rest;
        u32::from_le_bytes([head[0], head[1], head[2], head[3]])
    }
    fn u64(&mut self) -> u64 {
        let lo = self.u32() as u64;
        let hi = self.u32() as u64;
        lo | (hi << 32)
    }
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        let mut out = [0u8; N];
        out.copy_from_slice(head);
        out
    }
}

fn check_len(buf: &[u8], need: usize) -> Result<(), DecodeError> {
    if buf.len() < need {
        Err(DecodeError::Short {
            need,
            got: buf.len(),
        })
    } else {
        Ok(())
    }
}

/// Reads the kind of the record in `buf`.
pub fn record_kind(buf: &[u8]) -> Result<RecordKind, DecodeError> {
    check_len(buf, 4)?;
    RecordKind::try_from(Fields(buf).u32())
}

impl TryFrom<&[u8]> for LifecycleRecord {
    type Error = DecodeError;
    fn try_from(buf: &[u8]) -> Result<Self, DecodeError> {
        check_len(buf, core::mem::size_of::<Self>())?;
        let mut f = Fields(buf);
        let kind = f.u32();
        if kind != RecordKind::Lifecycle as u32 {
            return Err(DecodeError::UnknownKind(kind));
        }
        let what = f.u32();
        LifecycleKind::try_from(what)?;
        Ok(Self {
            kind,
            what,
            ts_ns: f.u64(),
            tid: f.u32(),
            aux: f.u32(),
            comm: f.bytes(),
            slot: f.u32(),
            reserved: f.u32(),
            totals: ThreadTotals {
                cpu_ns: f.u64(),
                voluntary: f.u64(),
                involuntary: f.u64(),
                migrations: f.u64(),
            },
        })
    }
}

impl LifecycleRecord {
    /// The decoded `what` (validated by the decoder).
    pub fn lifecycle(&self) -> Result<LifecycleKind, DecodeError> {
        LifecycleKind::try_from(self.what)
    }

    /// The thread name up to its first NUL.
    pub fn comm_bytes(&self) -> &[u8] {
        let end = self.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        &self.comm[..end]
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    fn encode(what: u32, ts: u64, tid: u32, aux: u32, comm: &[u8]) -> Vec<u8> {
        encode_slot(what, ts, tid, aux, comm, 0)
    }

    fn encode_slot(what: u32, ts: u64, tid: u32, aux: u32, comm: &[u8], slot: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&what.to_le_bytes());
        v.extend_from_slice(&ts.to_le_bytes());
        v.extend_from_slice(&tid.to_le_bytes());
        v.extend_from_slice(&aux.to_le_bytes());
        let mut c = [0u8; COMM_LEN];
        c[..comm.len()].copy_from_slice(comm);
        v.extend_from_slice(&c);
        v.extend_from_slice(&slot.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        for t in [5u64, 6, 7, 8] {
            v.extend_from_slice(&t.to_le_bytes());
        }
        v
    }

    #[test]
    fn decodes_a_thread_start() {
        let buf = encode_slot(1, 0x0102_0304_0506_0708, 4242, 4240, b"CPU 0/TCG", 7);
        assert_eq!(record_kind(&buf), Ok(RecordKind::Lifecycle));
        let r = LifecycleRecord::try_from(buf.as_slice()).unwrap();
        assert_eq!(r.lifecycle(), Ok(LifecycleKind::ThreadStart));
        assert_eq!(r.ts_ns, 0x0102_0304_0506_0708);
        assert_eq!(r.tid, 4242);
        assert_eq!(r.aux, 4240);
        assert_eq!(r.comm_bytes(), b"CPU 0/TCG");
        assert_eq!(r.slot, 7);
        assert_eq!(
            r.totals,
            ThreadTotals {
                cpu_ns: 5,
                voluntary: 6,
                involuntary: 7,
                migrations: 8
            }
        );
    }

    #[test]
    fn full_length_comm_has_no_nul() {
        let buf = encode(4, 1, 2, 0, b"0123456789abcdef");
        let r = LifecycleRecord::try_from(buf.as_slice()).unwrap();
        assert_eq!(r.comm_bytes(), b"0123456789abcdef");
    }

    #[test]
    fn rejects_short_and_unknown() {
        let buf = encode(2, 1, 2, 0, b"x");
        assert_eq!(
            LifecycleRecord::try_from(&buf[..79]),
            Err(DecodeError::Short { need: 80, got: 79 })
        );
        assert_eq!(
            record_kind(&buf[..3]),
            Err(DecodeError::Short { need: 4, got: 3 })
        );
        let bad_what = encode(9, 1, 2, 0, b"x");
        assert_eq!(
            LifecycleRecord::try_from(bad_what.as_slice()),
            Err(DecodeError::UnknownLifecycle(9))
        );
        let mut bad_kind = encode(1, 1, 2, 0, b"x");
        bad_kind[0] = 7;
        assert_eq!(record_kind(&bad_kind), Err(DecodeError::UnknownKind(7)));
    }

    #[test]
    fn decoder_matches_in_memory_layout() {
        // The eBPF side writes the struct as laid out in memory (x86_64 and
        // bpfel are little-endian); decoding its bytes must round-trip.
        let r = LifecycleRecord {
            kind: RecordKind::Lifecycle as u32,
            what: LifecycleKind::Exec as u32,
            ts_ns: 987_654_321,
            tid: 77,
            aux: 76,
            comm: *b"workload\0\0\0\0\0\0\0\0",
            slot: 3,
            reserved: 0,
            totals: ThreadTotals {
                cpu_ns: 1_000_001,
                voluntary: 12,
                involuntary: 3,
                migrations: 4,
            },
        };
        // SAFETY: LifecycleRecord is repr(C) without padding (asserted above).
        let bytes = unsafe {
            core::slice::from_raw_parts(
                (&r as *const LifecycleRecord).cast::<u8>(),
                core::mem::size_of::<LifecycleRecord>(),
            )
        };
        assert_eq!(LifecycleRecord::try_from(bytes), Ok(r));
    }
}
