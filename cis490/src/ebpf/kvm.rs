//! The KVM probe family (programs in `cis490-ebpf/src/kvm.rs`): hardware VM
//! exits (`kvm:kvm_exit`) and returns of `KVM_RUN` to the VMM
//! (`kvm:kvm_userspace_exit`). Both are classic tracepoints (the exit
//! reason is computed inside the tracepoint), so they need tracefs and the
//! field offsets from their format files, which also name the reasons.
//!
//! The reader: KVM rows from `KVM_STATS` (probes in `cis490-ebpf/src/kvm.rs`), named
//! with the kernel's own reason names. `null` while the target holds no KVM
//! VM, and for a kind of exit this kernel cannot report.

use std::{collections::BTreeMap, path::Path};

use anyhow::Result;
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use cis490_common::{
    KvmStats,
    kvm::{USERSPACE_ERROR_SLOT, USERSPACE_RESTART_SLOT, global, map, prog, slot_reason},
};

use crate::sources::SampleCtx;

use super::{
    maps::{open, read_percpu},
    spec::{Attacher, FamilyStatus, ProbeKind, ProbeSpec},
    targets::Slot,
};
use crate::row::Measures;

mod tracefs;

pub const FAMILY: &str = "kvm";

pub(super) const KVM_EXIT: ProbeSpec = ProbeSpec {
    program: prog::KVM_EXIT,
    tracepoint: "kvm_exit",
    kind: ProbeKind::TracePoint("kvm"),
    required: false,
};
pub(super) const KVM_USERSPACE_EXIT: ProbeSpec = ProbeSpec {
    program: prog::KVM_USERSPACE_EXIT,
    tracepoint: "kvm_userspace_exit",
    kind: ProbeKind::TracePoint("kvm"),
    required: false,
};

/// `kvm:kvm_exit` on this kernel.
#[derive(Clone, Debug)]
pub struct HwExits {
    pub exit_reason: u32,
    pub isa: u32,
    pub vmx_names: BTreeMap<u32, String>,
    pub svm_names: BTreeMap<u32, String>,
}

/// `kvm:kvm_userspace_exit` on this kernel.
#[derive(Clone, Debug)]
pub struct UserspaceExits {
    pub reason: u32,
    pub errno: u32,
    pub names: BTreeMap<u32, String>,
}

/// What the KVM family can do here.
#[derive(Clone, Debug)]
pub struct KvmFormat {
    pub hw: Result<HwExits, String>,
    pub userspace: Result<UserspaceExits, String>,
    /// Whether cis490 mounted tracefs to get here.
    pub mounted_tracefs: bool,
}

impl HwExits {
    /// The name of exit reason `code` under `isa` (1 VMX, 2 SVM).
    pub fn reason_name(&self, isa: u32, code: u32) -> String {
        let names = if isa == cis490_common::kvm::ISA_SVM {
            &self.svm_names
        } else {
            &self.vmx_names
        };
        names
            .get(&code)
            .cloned()
            .unwrap_or_else(|| format!("reason_{code:#x}"))
    }
}

impl UserspaceExits {
    pub fn reason_name(&self, code: u32) -> String {
        self.names
            .get(&code)
            .cloned()
            .unwrap_or_else(|| format!("KVM_EXIT_{code}"))
    }
}

/// Parses a `{ N, "NAME" }` list's number: decimal, hex, or `a + b`.
fn parse_code(expr: &str) -> Option<u32> {
    expr.split('+')
        .map(|t| {
            let t = t.trim();
            match t.strip_prefix("0x") {
                Some(h) => u32::from_str_radix(h, 16).ok(),
                None => t.parse().ok(),
            }
        })
        .try_fold(0u32, |acc, v| Some(acc.wrapping_add(v?)))
}

/// The quoted pieces of a C string expression, joined (`"A_" "B"` is `A_B`).
fn c_string(expr: &str) -> String {
    expr.split('"').skip(1).step_by(2).collect()
}

/// The `{ code, "name" }` tables of each `__print_symbolic(...)` in a
/// format's print fmt, in order.
pub fn symbolic_tables(format: &str) -> Vec<BTreeMap<u32, String>> {
    format
        .split("__print_symbolic(")
        .skip(1)
        .map(|section| {
            let mut map = BTreeMap::new();
            let mut rest = section;
            // The table ends where the call's closing parenthesis is.
            while let Some(open) = rest.find('{') {
                if rest[..open].contains(')') {
                    break;
                }
                let Some(close) = rest[open..].find('}') else {
                    break;
                };
                let entry = &rest[open + 1..open + close];
                if let Some((code, name)) = entry.split_once(',')
                    && let Some(code) = parse_code(code)
                {
                    map.insert(code, c_string(name));
                }
                rest = &rest[open + close + 1..];
            }
            map
        })
        .collect()
}

fn read_format(root: &Path, event: &str) -> Result<String, String> {
    std::fs::read_to_string(root.join("events/kvm").join(event).join("format")).map_err(|_| {
        format!("this kernel has no kvm:{event} tracepoint (KVM not built in or loaded)")
    })
}

fn offset(format: &str, event: &str, field: &str) -> Result<u32, String> {
    tracefs::field_offset(format, field).ok_or_else(|| format!("kvm:{event} has no field {field}"))
}

/// The KVM modules loaded, e.g. `["kvm", "kvm_intel"]`.
fn kvm_modules() -> Vec<String> {
    std::fs::read_dir("/sys/module")
        .map(|d| {
            let mut v: Vec<String> = d
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n == "kvm" || n.starts_with("kvm_"))
                .collect();
            v.sort();
            v
        })
        .unwrap_or_default()
}

/// The note of a family whose plan mounted tracefs (gone with the tracer).
const MOUNTED_TRACEFS: &str =
    "mounted tracefs at /sys/kernel/tracing in the tracer's own mount namespace";

pub fn plan() -> Result<KvmFormat, String> {
    let (root, mounted_tracefs) = tracefs::ensure()?;
    let hw = read_format(&root, "kvm_exit").and_then(|f| {
        let modules = kvm_modules();
        // kvm:kvm_exit is emitted by the VMX and SVM exit handlers; other
        // backends (this lab's kvm_pvm) never fire it.
        if !modules.iter().any(|m| m == "kvm_intel" || m == "kvm_amd") {
            return Err(format!(
                "the KVM backend here ({}) does not emit kvm:kvm_exit (only kvm_intel and kvm_amd do)",
                modules.join(", ")
            ));
        }
        let mut t = symbolic_tables(&f).into_iter();
        Ok(HwExits {
            exit_reason: offset(&f, "kvm_exit", "exit_reason")?,
            isa: offset(&f, "kvm_exit", "isa")?,
            vmx_names: t.next().unwrap_or_default(),
            svm_names: t.next().unwrap_or_default(),
        })
    });
    let userspace = read_format(&root, "kvm_userspace_exit").and_then(|f| {
        Ok(UserspaceExits {
            reason: offset(&f, "kvm_userspace_exit", "reason")?,
            errno: offset(&f, "kvm_userspace_exit", "errno")?,
            names: symbolic_tables(&f).into_iter().next().unwrap_or_default(),
        })
    });
    if let (Err(a), Err(b)) = (&hw, &userspace) {
        let mut why = format!("{a}; {b}");
        if mounted_tracefs {
            why.push_str(&format!("; {MOUNTED_TRACEFS}"));
        }
        return Err(why);
    }
    Ok(KvmFormat {
        hw,
        userspace,
        mounted_tracefs,
    })
}

/// The read-only globals this family needs at load time.
pub fn globals(plan: &Result<KvmFormat, String>) -> Vec<(&'static str, u32)> {
    let f = plan.as_ref().ok();
    let hw = f.and_then(|f| f.hw.as_ref().ok());
    let user = f.and_then(|f| f.userspace.as_ref().ok());
    vec![
        (
            global::KVM_EXIT_REASON_OFFSET,
            hw.map_or(0, |h| h.exit_reason),
        ),
        (global::KVM_EXIT_ISA_OFFSET, hw.map_or(0, |h| h.isa)),
        (
            global::KVM_USERSPACE_REASON_OFFSET,
            user.map_or(0, |u| u.reason),
        ),
        (
            global::KVM_USERSPACE_ERRNO_OFFSET,
            user.map_or(0, |u| u.errno),
        ),
    ]
}

/// Attaches one tracepoint if its plan is good; `Ok` when attached.
fn one<T>(a: &mut Attacher<'_>, spec: &ProbeSpec, plan: &Result<T, String>) -> Result<(), String> {
    match plan {
        Err(why) => {
            a.skip(FAMILY, spec, why);
            Err(why.clone())
        }
        Ok(_) if a.attach(FAMILY, spec) => Ok(()),
        Ok(_) => Err(format!("{} did not attach", spec.program)),
    }
}

/// The exit kinds that attached, with their reason names, for the reader.
#[derive(Clone, Debug)]
pub struct Attached {
    hw: Option<HwExits>,
    userspace: Option<UserspaceExits>,
}

/// Attaches what the plan allows; `None` for the reader when nothing did.
pub fn attach(
    a: &mut Attacher<'_>,
    plan: &Result<KvmFormat, String>,
) -> (FamilyStatus, Option<Attached>) {
    let f = match plan {
        Ok(f) => f,
        Err(why) => {
            a.skip(FAMILY, &KVM_EXIT, why);
            a.skip(FAMILY, &KVM_USERSPACE_EXIT, why);
            return (FamilyStatus::off(FAMILY, why), None);
        }
    };
    let hw = one(a, &KVM_EXIT, &f.hw);
    let user = one(a, &KVM_USERSPACE_EXIT, &f.userspace);
    let (hw_ok, user_ok) = (hw.is_ok(), user.is_ok());
    let path = match (&hw, &user) {
        (Ok(()), Ok(())) => Some("kvm_exit+kvm_userspace_exit"),
        (Ok(()), Err(_)) => Some("kvm_exit"),
        (Err(_), Ok(())) => Some("kvm_userspace_exit"),
        (Err(_), Err(_)) => None,
    };
    let mut notes: Vec<String> = [hw.err(), user.err()].into_iter().flatten().collect();
    if f.mounted_tracefs {
        notes.push(MOUNTED_TRACEFS.into());
    }
    let status = FamilyStatus {
        family: FAMILY.into(),
        active: path.is_some(),
        path: path.map(Into::into),
        note: (!notes.is_empty()).then(|| notes.join("; ")),
    };
    let attached = path.is_some().then(|| Attached {
        hw: hw_ok.then(|| f.hw.clone().ok()).flatten(),
        userspace: user_ok.then(|| f.userspace.clone().ok()).flatten(),
    });
    (status, attached)
}

// ---- the reader ----------------------------------------------------------

pub struct KvmReader {
    /// The target's slot.
    slot: u32,
    stats: PerCpuArray<MapData, KvmStats>,
    hw: Option<HwExits>,
    userspace: Option<UserspaceExits>,
    prev: KvmStats,
}

/// Non-zero per-slot deltas, by name.
fn named(now: &[u64], prev: &[u64], name: impl Fn(usize) -> String) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (slot, (a, b)) in now.iter().zip(prev).enumerate() {
        let n = a.saturating_sub(*b);
        if n > 0 {
            *out.entry(name(slot)).or_insert(0) += n;
        }
    }
    out
}

impl KvmReader {
    pub fn new(ebpf: &Ebpf, slot: Slot, attached: Attached) -> Result<Self> {
        Ok(Self {
            stats: open(ebpf, map::KVM_STATS)?,
            slot: slot.index(),
            hw: attached.hw,
            userspace: attached.userspace,
            prev: KvmStats::ZERO,
        })
    }

    pub fn sample(&mut self, ctx: &SampleCtx<'_>, m: &mut Measures) -> Result<()> {
        let c = read_percpu(
            &self.stats,
            map::KVM_STATS,
            self.slot,
            KvmStats::ZERO,
            KvmStats::accumulate,
        )?;
        let p = &self.prev;
        let any = c.exits != p.exits || c.userspace_exits != p.userspace_exits;
        if ctx.holdings.kvm_vm || any {
            if let Some(hw) = &self.hw {
                let isa = c.isa as u32;
                m.kvm_exits = Some(c.exits.saturating_sub(p.exits));
                m.kvm_exit_reasons = Some(named(&c.by_reason, &p.by_reason, |slot| {
                    slot_reason(slot, isa)
                        .map_or_else(|| "other".to_owned(), |code| hw.reason_name(isa, code))
                }));
            }
            if let Some(u) = &self.userspace {
                m.kvm_userspace_exits = Some(c.userspace_exits.saturating_sub(p.userspace_exits));
                m.kvm_userspace_exit_reasons = Some(named(
                    &c.userspace_by_reason,
                    &p.userspace_by_reason,
                    |slot| match slot {
                        USERSPACE_RESTART_SLOT => "restart".to_owned(),
                        USERSPACE_ERROR_SLOT => "error".to_owned(),
                        code => u.reason_name(code as u32),
                    },
                ));
            }
        }
        self.prev = c;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_the_print_fmt() {
        let fmt = r#"print fmt: "vcpu %u reason %s", REC->vcpu_id, (REC->isa == 1) ? __print_symbolic(REC->exit_reason & 0xffff, { 0, "EXCEPTION_NMI" }, { 12, "HLT" }, { 30, "IO_INSTRUCTION" }) : __print_symbolic(REC->exit_reason, { 0x040 + 14, "PF excp" }, { 0x07b, "io" }, { 0x400, "npf" }, { -1, "invalid_guest_state" }), (REC->isa == 1) ? __print_flags(REC->exit_reason & ~0xffff, " ", { 0x80000000, "FAILED_VMENTRY" }) : """#;
        let t = symbolic_tables(fmt);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].get(&30).map(String::as_str), Some("IO_INSTRUCTION"));
        assert_eq!(t[0].len(), 3);
        assert_eq!(t[1].get(&0x4e).map(String::as_str), Some("PF excp"));
        assert_eq!(t[1].get(&0x7b).map(String::as_str), Some("io"));
        assert!(!t[1].values().any(|n| n == "FAILED_VMENTRY"));
    }

    #[test]
    fn concatenated_names() {
        let fmt = r#"print fmt: "reason %s (%d)", REC->errno < 0 ? "error" : __print_symbolic(REC->reason, { 0, "KVM_EXIT_" "UNKNOWN" }, { 2, "KVM_EXIT_" "IO" })"#;
        let t = symbolic_tables(fmt);
        assert_eq!(t[0].get(&2).map(String::as_str), Some("KVM_EXIT_IO"));
    }

    #[test]
    fn this_kernels_names() {
        // Real tracefs and the real KVM tracepoints: a kernel without them
        // (or a run that cannot mount tracefs) fails here rather than
        // passing without having looked.
        let f = plan().unwrap_or_else(|e| {
            panic!("the KVM tracepoints' formats could not be read (needs root and a kernel with KVM): {e}")
        });
        let u = f.userspace.as_ref().unwrap();
        assert_eq!(u.reason_name(2), "KVM_EXIT_IO");
        assert_eq!(u.reason_name(5), "KVM_EXIT_HLT");
        if let Ok(h) = &f.hw {
            assert_eq!(h.reason_name(1, 30), "IO_INSTRUCTION");
            assert_eq!(h.reason_name(2, 0x7b), "io");
            assert_eq!(h.reason_name(1, 9999), "reason_0x270f");
        }
    }
}
