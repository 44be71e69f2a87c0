//! Target slots: one loaded set of programs traces any number of thread
//! groups, each with its own slot. Every per-target map (a family's
//! counters, its per-bucket maxima, the epoch, the pid-reuse flag) is an
//! array indexed by slot, sized by the loader: 1 for a standalone trace,
//! `--max-targets` for a server.
//!
//! A program finds a task's slot in two steps: the filter (a bit per tgid
//! modulo [`FILTER_BITS`] in [`TargetsData`], a global the programs read
//! with one load, no map lookup) rejects almost every task of the machine
//! whatever the number of targets, and only a task whose bit is set is
//! looked up in `TARGETS` (tgid -> slot).

/// Bits of the target filter (a power of two).
pub const FILTER_BITS: u32 = 65_536;
/// 64-bit words of the target filter (`TARGET_FILTER`'s entries).
pub const FILTER_WORDS: u32 = FILTER_BITS / 64;

/// The filter word and bit of a tgid.
#[inline(always)]
pub const fn filter_bit(tgid: u32) -> (u32, u64) {
    let b = tgid & (FILTER_BITS - 1);
    (b / 64, 1u64 << (b % 64))
}

/// The loader's global of the target filter (the eBPF side's
/// `TARGETS_DATA`, in its own data section, `map::TARGETS_DATA`): only the
/// loader writes it, always whole (one map update), so no program write can
/// be lost to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetsData {
    /// A count the loader raises after every change of `TARGETS`: a slot
    /// `sched_switch` cached with an older count is looked up again.
    pub generation: u64,
    /// A bit per tgid modulo [`FILTER_BITS`] ([`filter_bit`]), set for every
    /// traced tgid.
    pub filter: [u64; FILTER_WORDS as usize],
}

impl TargetsData {
    pub const ZERO: Self = Self {
        generation: 0,
        filter: [0; FILTER_WORDS as usize],
    };
}

const _: () = assert!(core::mem::size_of::<TargetsData>() == 8 + FILTER_BITS as usize / 8);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)] u64s without padding (asserted above).
unsafe impl aya::Pod for TargetsData {}

/// The most targets one server traces at once (`cis490 serve
/// --max-targets`).
pub const MAX_TARGETS: u32 = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_bits_cover_the_filter() {
        assert_eq!(filter_bit(0), (0, 1));
        assert_eq!(filter_bit(63), (0, 1 << 63));
        assert_eq!(filter_bit(64), (1, 1));
        assert_eq!(filter_bit(FILTER_BITS - 1), (FILTER_WORDS - 1, 1 << 63));
        assert_eq!(filter_bit(FILTER_BITS + 5), filter_bit(5));
    }
}
