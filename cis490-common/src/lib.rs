//! Records and map layouts shared by the eBPF programs (`cis490-ebpf`) and the
//! loader (`cis490`).
//!
//! Every type here is `#[repr(C)]` and built only from `u64`/`u32`/byte
//! arrays laid out so that there is no implicit padding (checked by the
//! `const` assertions below). The eBPF side writes them; the loader reads
//! them either as map values (through [`aya::Pod`], feature `user`) or as
//! ring-buffer bytes (through the `TryFrom<&[u8]>` decoders in [`record`],
//! which never transmute and are unit-tested on the host).
#![no_std]

/// Declares names that cross the kernel boundary, each written once: a
/// module of `&str` constants whose values are their own identifiers (maps
/// and globals) or the given literal (programs, named for their
/// tracepoint), and `ALL`, every one of them. The eBPF side must name its
/// items the same (its macros take no constants); the loader uses only
/// these constants, and its unit test checks the built object against
/// every `ALL`.
#[macro_export]
macro_rules! names {
    ($(#[$m:meta])* $vis:vis mod $module:ident { $($(#[$d:meta])* $name:ident $(= $value:literal)?),* $(,)? }) => {
        $(#[$m])*
        $vis mod $module {
            $($(#[$d])* pub const $name: &str = $crate::names!(@value $name $($value)?);)*
            /// Every name of this module.
            pub const ALL: &[&str] = &[$($name),*];
        }
    };
    (@value $name:ident $value:literal) => { $value };
    (@value $name:ident) => { stringify!($name) };
}

names! {
    /// Maps every family uses.
    pub mod map {
        /// The traced thread groups: tgid -> target slot
        /// ([`target`](crate::target)).
        TARGETS,
        /// The target filter and the count of changes of `TARGETS`
        /// ([`target::TargetsData`]): a global of the programs, in a data
        /// section of its own, which the loader opens as a map of one entry.
        TARGETS_DATA = ".data.targets",
        /// A count the programs raise each time they mark a slot gone (a
        /// global in a data section of its own that only the programs
        /// write; the loader never opens it).
        GONE_COUNT = ".bss.gone",
        /// Per target slot: 1 once its pid went to a new process.
        TARGET_GONE,
        /// The bucket epoch the loader publishes at each boundary, per
        /// target slot (each episode has its own grid).
        EPOCH,
        /// The ring buffer of streamed records ([`record`]).
        RECORDS,
    }
}

pub mod block;
pub mod gateway;
pub mod kvm;
pub mod net;
pub mod record;
pub mod sched;
pub mod target;

pub use block::{BlockStats, ReqStart};
pub use kvm::KvmStats;
pub use net::{IfStats, NetStats};
pub use record::{DecodeError, LifecycleKind, LifecycleRecord, RecordKind, ThreadTotals};
pub use sched::{CpuSlice, HIST_BUCKETS, LiveCounters, MaxSlot, SchedStats, ThreadCounters};

/// Length of a kernel task name (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Size of the BPF ring buffer that carries streamed records, in bytes
/// (a power of two and a multiple of the page size).
pub const RINGBUF_BYTES: u32 = 256 * 1024;

/// Maximum number of target threads tracked at once.
pub const MAX_THREADS: u32 = 65_536;

/// Index of the log2 histogram bucket for a value: bucket `i` holds values in
/// `[2^i, 2^(i+1))`, bucket 0 also holds 0.
///
/// Written as a branch-free binary search of shifts (not `leading_zeros`) so
/// that the eBPF verifier can see the result is at most 63 and accept it as
/// an array index; the same function runs in host tests.
#[inline(always)]
pub const fn log2_bucket(mut v: u64) -> usize {
    let mut r = ((v > 0xFFFF_FFFF) as u64) << 5;
    v >>= r;
    let mut s = ((v > 0xFFFF) as u64) << 4;
    v >>= s;
    r |= s;
    s = ((v > 0xFF) as u64) << 3;
    v >>= s;
    r |= s;
    s = ((v > 0xF) as u64) << 2;
    v >>= s;
    r |= s;
    s = ((v > 0x3) as u64) << 1;
    v >>= s;
    r |= s;
    (r | (v >> 1)) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log2_bucket_bounds() {
        assert_eq!(log2_bucket(0), 0);
        assert_eq!(log2_bucket(1), 0);
        assert_eq!(log2_bucket(2), 1);
        assert_eq!(log2_bucket(3), 1);
        assert_eq!(log2_bucket(4), 2);
        assert_eq!(log2_bucket(1023), 9);
        assert_eq!(log2_bucket(1024), 10);
        assert_eq!(log2_bucket(u64::MAX), 63);
        for i in 0..64 {
            assert_eq!(log2_bucket(1u64 << i), i, "2^{i}");
            if i > 0 {
                assert_eq!(log2_bucket((1u64 << i) - 1), i - 1, "2^{i}-1");
            }
        }
    }
}
