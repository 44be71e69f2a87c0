//! Loading the embedded eBPF object and attaching each probe family, with a
//! record of what attached, which path a family took (its fallbacks) and
//! what failed: for meta.json, and for nulling the fields a missing probe
//! would have measured.
//!
//! Order: [`KernelFacts::probe`] reads the kernel BTF (member offsets,
//! tracepoints) and fails early if the scheduler family cannot work;
//! [`Plan::new`] decides each family's path; [`Probes::load_and_attach`]
//! loads the object with the offsets and paths as read-only globals, then
//! attaches family by family.

mod attach_btf;
pub mod block;
pub mod kvm;
pub mod net;
pub mod sched;
pub mod task_iter;
pub mod tracefs;

use std::{collections::BTreeMap, path::Path, sync::Arc};

use anyhow::{Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{BtfTracePoint, TracePoint},
};
use serde::Serialize;

use crate::btf::KernelBtf;

/// The eBPF object built by build.rs from `cis490-ebpf`.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cis490-ebpf"));

/// A kernel struct member a program reads, and the read-only global in the
/// object that receives its byte offset.
#[derive(Clone, Copy, Debug)]
pub struct OffsetSpec {
    pub global: &'static str,
    pub ty: &'static str,
    /// Dotted member path, e.g. `se.sum_exec_runtime`.
    pub path: &'static str,
}

/// How a program attaches. In meta.json and `probe` events one string:
/// `tp_btf`, `iter`, or `trace_point:CATEGORY` (one JSON type for every
/// probe, so a column of them has one type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKind {
    /// A BTF-enabled raw tracepoint (`btf_trace_<name>` in the kernel BTF).
    TpBtf,
    /// A classic tracepoint of this category (needs tracefs).
    TracePoint(&'static str),
    /// A BPF iterator over kernel objects (`iter/<what>`), run by the
    /// loader rather than by an event.
    Iter,
}

impl Serialize for ProbeKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ProbeKind::TpBtf => s.serialize_str("tp_btf"),
            ProbeKind::Iter => s.serialize_str("iter"),
            ProbeKind::TracePoint(cat) => s.collect_str(&format_args!("trace_point:{cat}")),
        }
    }
}

/// One program of a family.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSpec {
    /// Program (function) name in the object.
    pub program: &'static str,
    pub tracepoint: &'static str,
    pub kind: ProbeKind,
    /// Without it the family cannot work at all (for the scheduler family:
    /// fail the trace).
    pub required: bool,
}

/// How a probe ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachState {
    Attached,
    /// The kernel has no such tracepoint.
    Missing,
    /// Load or attach failed (see `error`).
    Failed,
    /// Not attached: the family took another path, or cannot work here.
    Skipped,
}

/// What meta.json records per probe.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeStatus {
    pub family: &'static str,
    pub program: &'static str,
    pub tracepoint: &'static str,
    pub kind: ProbeKind,
    pub required: bool,
    pub state: AttachState,
    pub error: Option<String>,
}

/// What meta.json records per family: whether it measures, and which path
/// it took (for example `block_io` or the `block_rq` fallback).
#[derive(Clone, Debug, Serialize)]
pub struct FamilyStatus {
    pub family: &'static str,
    pub active: bool,
    pub path: Option<&'static str>,
    /// Why it is inactive or degraded.
    pub note: Option<String>,
}

/// The kernel facts the programs need, read from its BTF before anything
/// loads.
#[derive(Clone, Debug, Serialize)]
pub struct KernelFacts {
    pub btf_path: String,
    /// Object global -> byte offset (`None`: the member is not in this
    /// kernel; the family that needs it does not attach).
    pub offsets: BTreeMap<&'static str, Option<u32>>,
    /// The kernel's BTF-enabled tracepoints and BPF iterator targets, by
    /// name, with their BTF type ids. Only this is kept of the parsed BTF
    /// (several MiB): it is all the loader needs to attach (see
    /// `attach_btf`).
    #[serde(skip)]
    tracepoints: Arc<BTreeMap<String, u32>>,
    #[serde(skip)]
    iterators: Arc<BTreeMap<String, u32>>,
}

/// Every program any family may attach.
fn all_probes() -> impl Iterator<Item = &'static ProbeSpec> {
    sched::PROBES
        .iter()
        .chain([&sched::ITER])
        .chain(block::IO)
        .chain(block::RQ)
        .chain(net::TAPS)
        .chain(net::SOCKETS)
        .chain([&kvm::KVM_EXIT, &kvm::KVM_USERSPACE_EXIT])
}

/// Every offset any family needs.
fn all_offsets() -> impl Iterator<Item = &'static OffsetSpec> {
    sched::OFFSETS
        .iter()
        .chain(block::OFFSETS)
        .chain(net::OFFSETS)
}

impl KernelFacts {
    /// Reads the kernel BTF and fails with one line naming what is missing
    /// for the scheduler family: BTF itself, a `task_struct` member, or a
    /// required tracepoint. Other families only record what they lack.
    pub fn probe(btf_path: &Path) -> Result<Self> {
        let btf = KernelBtf::from_file(btf_path)?;
        let required: Vec<&str> = sched::PROBES
            .iter()
            .filter(|p| p.required)
            .map(|p| p.tracepoint)
            .collect();
        let missing = btf.missing_tracepoints(&required);
        if !missing.is_empty() {
            bail!(
                "this kernel lacks the tracepoints cis490 needs: {} (no btf_trace_* type in {})",
                missing.join(", "),
                btf_path.display()
            );
        }
        let mut offsets = BTreeMap::new();
        for o in all_offsets() {
            let off = btf.member_path_offset(o.ty, o.path);
            if sched::REQUIRED_OFFSETS.contains(&o.global) {
                offsets.insert(o.global, Some(off?));
            } else {
                offsets.insert(o.global, off.ok());
            }
        }
        // Only the attach points some family may use: the stub BTF built
        // from them (attach_btf) then stops at the highest of their ids.
        let wanted = |kind: ProbeKind| {
            all_probes()
                .filter(move |p| p.kind == kind)
                .map(|p| p.tracepoint)
                .collect::<std::collections::BTreeSet<_>>()
        };
        let (tps, iters) = (wanted(ProbeKind::TpBtf), wanted(ProbeKind::Iter));
        let mut tracepoints = btf.tracepoints();
        tracepoints.retain(|name, _| tps.contains(name.as_str()));
        let mut iterators = btf.iterators();
        iterators.retain(|name, _| iters.contains(name.as_str()));
        let (tracepoints, iterators) = (Arc::new(tracepoints), Arc::new(iterators));
        drop(btf);
        release_freed_memory();
        Ok(Self {
            btf_path: btf_path.display().to_string(),
            offsets,
            tracepoints,
            iterators,
        })
    }

    pub fn has_tracepoint(&self, name: &str) -> bool {
        self.tracepoints.contains_key(name)
    }

    /// Whether every offset a family lists resolved; `Err` names the first
    /// missing member.
    pub fn have_offsets(&self, specs: &[OffsetSpec]) -> Result<(), String> {
        match specs
            .iter()
            .find(|o| self.offsets.get(o.global).copied().flatten().is_none())
        {
            Some(o) => Err(format!("kernel BTF has no {}.{}", o.ty, o.path)),
            None => Ok(()),
        }
    }
}

/// User choices about probe paths.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub block: block::PathChoice,
    /// Size of the lifecycle-record ring buffer (`RECORDS`), bytes: a power
    /// of two and a multiple of the page size.
    pub ringbuf_bytes: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            block: block::PathChoice::default(),
            ringbuf_bytes: cis490_common::RINGBUF_BYTES,
        }
    }
}

/// Per-family decisions taken before the object is loaded (they become
/// read-only globals).
#[derive(Clone, Debug)]
pub struct Plan {
    pub block: Result<block::BlockPath, String>,
    pub net: net::NetPlan,
    pub kvm: Result<kvm::KvmFormat, String>,
    pub ringbuf_bytes: u32,
}

impl Plan {
    pub fn new(facts: &KernelFacts, opts: Options) -> Self {
        Self {
            block: block::plan(facts, opts.block),
            net: net::plan(facts),
            kvm: kvm::plan(),
            ringbuf_bytes: opts.ringbuf_bytes,
        }
    }

    /// The globals to set at load time, beyond the offsets.
    fn globals(&self) -> Vec<(&'static str, u32)> {
        let mut g = vec![(
            "BLOCK_LEGACY",
            matches!(self.block, Ok(block::BlockPath::Rq)) as u32,
        )];
        g.extend(kvm::globals(&self.kvm));
        g
    }
}

/// The loaded object and what became of each probe and family.
pub struct Probes {
    pub ebpf: Ebpf,
    pub status: Vec<ProbeStatus>,
    pub families: Vec<FamilyStatus>,
    /// The link of the scheduler's task iterator (`sched_iter`), which the
    /// loader runs at every bucket boundary.
    pub sched_iter: Option<std::os::fd::OwnedFd>,
}

impl Probes {
    /// Loads the programs for target thread group `tgid` and attaches every
    /// family. Only the scheduler family's required probes are fatal.
    pub fn load_and_attach(tgid: u32, facts: &KernelFacts, plan: &Plan) -> Result<Self> {
        raise_memlock_limit();
        // aya 0.14's loader always parses the whole kernel BTF when it is
        // made (about 28 MiB at its peak here, the tracer's largest
        // allocation), for CO-RE relocations this object does not have:
        // made first, while little else is allocated, and that BTF dropped
        // at once.
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        release_freed_memory();
        // The attach points' type ids, not the whole kernel BTF (see
        // attach_btf).
        let btf = aya::Btf::parse(
            &attach_btf::stub(&facts.tracepoints, &facts.iterators),
            aya::Endianness::default(),
        )
        .map_err(|e| anyhow!("cannot build the attach points' BTF: {e}"))?;
        let offsets: Vec<(&'static str, u32)> = facts
            .offsets
            .iter()
            .map(|(g, o)| (*g, o.unwrap_or(0)))
            .collect();
        let globals = plan.globals();
        loader
            .map_max_entries("RECORDS", plan.ringbuf_bytes)
            .override_global("TARGET_TGID", &tgid, true);
        for (name, value) in offsets.iter().chain(globals.iter()) {
            loader.override_global(name, value, true);
        }
        let ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| anyhow!("cannot load the eBPF object: {e}"))?;
        let mut a = Attacher {
            ebpf,
            btf,
            facts,
            status: Vec::new(),
            iter_link: None,
        };
        let families = vec![
            sched::attach(&mut a, tgid)?,
            block::attach(&mut a, &plan.block),
            net::attach(&mut a, &plan.net),
            kvm::attach(&mut a, &plan.kvm),
        ];
        let Attacher {
            ebpf,
            status,
            iter_link,
            btf,
            ..
        } = a;
        // aya's parse of the kernel BTF is the tracer's largest allocation.
        drop(btf);
        release_freed_memory();
        Ok(Self {
            ebpf,
            status,
            families,
            sched_iter: iter_link,
        })
    }

    pub fn family(&self, name: &str) -> Option<&FamilyStatus> {
        self.families.iter().find(|f| f.family == name)
    }

    /// Whether a family measures anything.
    pub fn active(&self, name: &str) -> bool {
        self.family(name).is_some_and(|f| f.active)
    }

    /// Whether one program attached.
    pub fn attached(&self, program: &str) -> bool {
        self.status
            .iter()
            .any(|s| s.program == program && s.state == AttachState::Attached)
    }
}

/// Attaches programs of the loaded object and records what happened.
pub struct Attacher<'a> {
    ebpf: Ebpf,
    btf: aya::Btf,
    facts: &'a KernelFacts,
    status: Vec<ProbeStatus>,
    iter_link: Option<std::os::fd::OwnedFd>,
}

impl Attacher<'_> {
    /// Attaches one program; records and returns whether it worked.
    pub fn attach(&mut self, family: &'static str, spec: &ProbeSpec) -> bool {
        let state = self.try_attach(spec);
        let ok = state.is_ok();
        let (state, error) = match state {
            Ok(()) => (AttachState::Attached, None),
            Err((s, e)) => (s, Some(e)),
        };
        self.status.push(ProbeStatus {
            family,
            program: spec.program,
            tracepoint: spec.tracepoint,
            kind: spec.kind,
            required: spec.required,
            state,
            error,
        });
        ok
    }

    /// Records a program that a family decided not to attach.
    pub fn skip(&mut self, family: &'static str, spec: &ProbeSpec, why: &str) {
        self.status.push(ProbeStatus {
            family,
            program: spec.program,
            tracepoint: spec.tracepoint,
            kind: spec.kind,
            required: spec.required,
            state: AttachState::Skipped,
            error: Some(why.to_owned()),
        });
    }

    fn try_attach(&mut self, spec: &ProbeSpec) -> Result<(), (AttachState, String)> {
        let failed = |e: String| (AttachState::Failed, e);
        let prog = self
            .ebpf
            .program_mut(spec.program)
            .ok_or_else(|| failed(format!("program {} not in the object", spec.program)))?;
        match spec.kind {
            ProbeKind::TpBtf => {
                if !self.facts.has_tracepoint(spec.tracepoint) {
                    return Err((
                        AttachState::Missing,
                        format!("no btf_trace_{} in kernel BTF", spec.tracepoint),
                    ));
                }
                let p: &mut BtfTracePoint = prog.try_into().map_err(|e| failed(format!("{e}")))?;
                p.load(spec.tracepoint, &self.btf)
                    .map_err(|e| failed(format!("{e:#}")))?;
                p.attach().map_err(|e| failed(format!("{e:#}")))?;
            }
            ProbeKind::TracePoint(category) => {
                let p: &mut TracePoint = prog.try_into().map_err(|e| failed(format!("{e}")))?;
                p.load().map_err(|e| failed(format!("{e:#}")))?;
                p.attach(category, spec.tracepoint)
                    .map_err(|e| failed(format!("{e:#}")))?;
            }
            ProbeKind::Iter => {
                let p: &mut aya::programs::Iter =
                    prog.try_into().map_err(|e| failed(format!("{e}")))?;
                p.load(spec.tracepoint, &self.btf)
                    .map_err(|e| failed(format!("{e:#}")))?;
            }
        }
        Ok(())
    }
}

/// Gives memory freed after a large parse back to the system (glibc keeps
/// freed heap otherwise), so the tracer's resident size stays small while
/// it traces.
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `*_OFFSET` and flag global of the embedded object is set by the
    /// loader (a global left at 0 would read the wrong field, silently).
    #[test]
    fn every_global_of_the_object_is_set() {
        use object::{Object as _, ObjectSymbol as _};
        let obj = object::File::parse(EBPF_OBJECT).unwrap();
        let globals: Vec<String> = obj
            .symbols()
            .filter(|s| {
                s.section_index().is_some_and(|i| {
                    obj.section_by_index(i)
                        .ok()
                        .and_then(|sec| {
                            object::ObjectSection::name(&sec)
                                .ok()
                                .map(|n| n.starts_with(".rodata"))
                        })
                        .unwrap_or(false)
                })
            })
            .filter_map(|s| s.name().ok().map(str::to_owned))
            // Ours: offsets and flags.
            .filter(|n| n.ends_with("_OFFSET") || n == "BLOCK_LEGACY" || n == "TARGET_TGID")
            .collect();
        assert!(
            globals.iter().any(|g| g == "TASK_PID_OFFSET"),
            "{globals:?}"
        );
        let plan_globals = [
            "BLOCK_LEGACY",
            "KVM_EXIT_REASON_OFFSET",
            "KVM_EXIT_ISA_OFFSET",
            "KVM_USERSPACE_REASON_OFFSET",
            "KVM_USERSPACE_ERRNO_OFFSET",
            "TARGET_TGID",
        ];
        for g in &globals {
            assert!(
                all_offsets().any(|o| o.global == g) || plan_globals.contains(&g.as_str()),
                "global {g} of the eBPF object is never set by the loader"
            );
        }
        for o in all_offsets() {
            assert!(
                globals.iter().any(|g| g == o.global),
                "offset {} is not in the object",
                o.global
            );
        }
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!(
            "cannot raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}
