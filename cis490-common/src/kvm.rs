//! KVM exit counters: `kvm:kvm_exit` in the vCPU thread's context.

crate::names! {
    /// The KVM family's maps (`cis490-ebpf/src/kvm.rs`).
    pub mod map {
        KVM_STATS,
    }
}

crate::names! {
    /// The KVM family's programs, each named for its (classic) tracepoint.
    pub mod prog {
        KVM_EXIT = "kvm_exit",
        KVM_USERSPACE_EXIT = "kvm_userspace_exit",
    }
}

crate::names! {
    /// The KVM family's read-only globals: field offsets from the
    /// tracepoints' format files.
    pub mod global {
        KVM_EXIT_REASON_OFFSET,
        KVM_EXIT_ISA_OFFSET,
        KVM_USERSPACE_REASON_OFFSET,
        KVM_USERSPACE_ERRNO_OFFSET,
    }
}

/// Exit reasons counted one by one. VMX basic reasons (`exit_reason &
/// 0xffff`) are below 0x100; SVM codes are below 0xb0 or `0x400..0x410`
/// (folded to `0xb0 + (code & 0xf)`). A VMX exit is counted by its basic
/// reason whatever its flag bits (a failed VM entry by the reason it
/// failed for). Anything else (an SEV `vmgexit` sub-code) goes to
/// [`OTHER_SLOT`].
pub const KVM_REASON_SLOTS: usize = 256;
/// The slot of reasons not counted one by one.
pub const OTHER_SLOT: usize = KVM_REASON_SLOTS - 1;
/// `isa` of the `kvm_exit` tracepoint.
pub const ISA_VMX: u32 = 1;
pub const ISA_SVM: u32 = 2;

/// Slots of returns to userspace (`KVM_EXIT_*` codes are below 62).
pub const USERSPACE_SLOTS: usize = 64;
/// `KVM_RUN` returned `-EINTR` (restart).
pub const USERSPACE_RESTART_SLOT: usize = 62;
/// `KVM_RUN` returned another error, or the code is out of range.
pub const USERSPACE_ERROR_SLOT: usize = 63;

/// Cumulative per-CPU KVM exit counters of one target (map `KVM_STATS`, one
/// entry per target slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmStats {
    /// Hardware VM exits (`kvm:kvm_exit`).
    pub exits: u64,
    /// `isa` of the last exit seen (1: VMX, 2: SVM), to name the reasons.
    pub isa: u64,
    pub by_reason: [u64; KVM_REASON_SLOTS],
    /// Returns of `KVM_RUN` to the VMM (`kvm:kvm_userspace_exit`).
    pub userspace_exits: u64,
    pub userspace_by_reason: [u64; USERSPACE_SLOTS],
}

impl KvmStats {
    pub const ZERO: Self = Self {
        exits: 0,
        isa: 0,
        by_reason: [0; KVM_REASON_SLOTS],
        userspace_exits: 0,
        userspace_by_reason: [0; USERSPACE_SLOTS],
    };

    pub fn accumulate(&mut self, o: &Self) {
        self.exits = self.exits.wrapping_add(o.exits);
        self.isa = self.isa.max(o.isa);
        for (a, b) in self.by_reason.iter_mut().zip(o.by_reason.iter()) {
            *a = a.wrapping_add(*b);
        }
        self.userspace_exits = self.userspace_exits.wrapping_add(o.userspace_exits);
        for (a, b) in self
            .userspace_by_reason
            .iter_mut()
            .zip(o.userspace_by_reason.iter())
        {
            *a = a.wrapping_add(*b);
        }
    }
}

/// The slot of a return to userspace.
#[inline(always)]
pub const fn userspace_slot(reason: u32, errno: i32) -> usize {
    if errno == -4 {
        USERSPACE_RESTART_SLOT
    } else if errno < 0 || reason >= USERSPACE_RESTART_SLOT as u32 {
        USERSPACE_ERROR_SLOT
    } else {
        reason as usize
    }
}

/// The slot of an exit reason code.
#[inline(always)]
pub const fn reason_slot(code: u32, isa: u32) -> usize {
    if isa == ISA_SVM {
        if code < 0xb0 {
            code as usize
        } else if code >= 0x400 && code < 0x410 {
            0xb0 + (code & 0xf) as usize
        } else {
            OTHER_SLOT
        }
    } else if code & 0xffff < OTHER_SLOT as u32 {
        // VMX: the tracepoint gives the full exit reason; its low 16 bits
        // are the basic reason, the high ones flags (bit 31: a failed
        // VM entry, bit 27: from enclave mode, ...), so a flagged exit is
        // still counted under its basic reason.
        (code & 0xffff) as usize
    } else {
        OTHER_SLOT
    }
}

/// The exit reason code of a slot (`None` for [`OTHER_SLOT`]).
pub const fn slot_reason(slot: usize, isa: u32) -> Option<u32> {
    if slot >= OTHER_SLOT {
        None
    } else if isa == ISA_SVM && slot >= 0xb0 {
        Some(0x400 + (slot as u32 - 0xb0))
    } else {
        Some(slot as u32)
    }
}

const _: () =
    assert!(core::mem::size_of::<KvmStats>() == (3 + KVM_REASON_SLOTS + USERSPACE_SLOTS) * 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers without padding (asserted above).
    unsafe impl aya::Pod for super::KvmStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_slots_round_trip() {
        for code in [0u32, 12, 30, 48, 77, 85] {
            assert_eq!(slot_reason(reason_slot(code, ISA_VMX), ISA_VMX), Some(code));
        }
        for code in [0x60u32, 0x7b, 0xa6, 0x400, 0x403] {
            assert_eq!(slot_reason(reason_slot(code, ISA_SVM), ISA_SVM), Some(code));
        }
        // A failed VM entry (bit 31) with basic reason 33 (invalid guest
        // state), and an exit from enclave mode (bit 27), by basic reason.
        assert_eq!(reason_slot(0x8000_0021, ISA_VMX), 0x21);
        assert_eq!(reason_slot(0x0800_000c, ISA_VMX), 12);
        assert_eq!(reason_slot(0x0000_ffff, ISA_VMX), OTHER_SLOT);
        assert_eq!(reason_slot(0x8000_0001, ISA_SVM), OTHER_SLOT);
        assert_eq!(slot_reason(OTHER_SLOT, ISA_VMX), None);
    }
}
