//! The vocabulary every probe family and the loader share: what a family
//! lists (its struct members, [`OffsetSpec`], and programs, [`ProbeSpec`]),
//! what the kernel offers ([`KernelFacts`]), what became of each probe and
//! family ([`ProbeStatus`], [`FamilyStatus`], for meta.json), and the
//! [`Attacher`] a family attaches its programs with.

use std::{borrow::Cow, collections::BTreeMap, sync::Arc};

use aya::{
    Ebpf,
    programs::{BtfTracePoint, TracePoint},
};
use serde::{Deserialize, Serialize};

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

impl ProbeKind {
    /// `tp_btf`, `iter` or `trace_point:CATEGORY`.
    pub fn label(self) -> Cow<'static, str> {
        match self {
            ProbeKind::TpBtf => "tp_btf".into(),
            ProbeKind::Iter => "iter".into(),
            ProbeKind::TracePoint(cat) => format!("trace_point:{cat}").into(),
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

impl ProbeSpec {
    /// An optional `tp_btf` program named for its tracepoint.
    pub const fn tp_btf(program: &'static str) -> Self {
        Self {
            program,
            tracepoint: program,
            kind: ProbeKind::TpBtf,
            required: false,
        }
    }
}

/// How a probe ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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

impl AttachState {
    /// Its name in meta.json.
    pub fn name(self) -> &'static str {
        match self {
            Self::Attached => "attached",
            Self::Missing => "missing",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }
}

/// What meta.json records per probe.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeStatus {
    pub family: Cow<'static, str>,
    pub program: Cow<'static, str>,
    pub tracepoint: Cow<'static, str>,
    /// [`ProbeKind::label`].
    pub kind: Cow<'static, str>,
    pub required: bool,
    pub state: AttachState,
    pub error: Option<String>,
}

/// What meta.json records per family: whether it measures, and which path
/// it took (for example `block_io` or the `block_rq` fallback).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FamilyStatus {
    pub family: Cow<'static, str>,
    pub active: bool,
    /// A label of the path taken (never parsed back: each family hands its
    /// reader a typed result).
    pub path: Option<Cow<'static, str>>,
    /// Why it is inactive or degraded.
    pub note: Option<String>,
}

/// Why a counting probe or family is off when `--sources` has no `ebpf`.
pub const NOT_ASKED: &str = "the ebpf source was not asked for (--sources)";

impl FamilyStatus {
    /// A family that measures nothing here, and why.
    pub fn off(family: &'static str, why: &str) -> Self {
        Self {
            family: family.into(),
            active: false,
            path: None,
            note: Some(why.to_owned()),
        }
    }
}

/// The kernel facts the programs need, read from its BTF before anything
/// loads.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KernelFacts {
    pub btf_path: String,
    /// Object global -> byte offset (`None`: the member is not in this
    /// kernel; the family that needs it does not attach).
    pub offsets: BTreeMap<Cow<'static, str>, Option<u32>>,
    /// The kernel's BTF-enabled tracepoints and BPF iterator targets, by
    /// name, with their BTF type ids. Only this is kept of the parsed BTF
    /// (several MiB): it is all the loader needs to attach (see
    /// `btf::stub`).
    #[serde(skip)]
    pub(super) tracepoints: Arc<BTreeMap<String, u32>>,
    #[serde(skip)]
    pub(super) iterators: Arc<BTreeMap<String, u32>>,
}

impl KernelFacts {
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

/// Attaches programs of the loaded object and records what happened.
pub struct Attacher<'a> {
    pub(super) ebpf: Ebpf,
    pub(super) btf: aya::Btf,
    pub(super) facts: &'a KernelFacts,
    pub(super) status: Vec<ProbeStatus>,
}

impl Attacher<'_> {
    /// The error of the program attached or skipped last.
    pub fn last_error(&self) -> Option<String> {
        self.status.last().and_then(|s| s.error.clone())
    }

    /// Attaches one program; records and returns whether it worked.
    pub fn attach(&mut self, family: &'static str, spec: &ProbeSpec) -> bool {
        let state = self.try_attach(spec);
        let ok = state.is_ok();
        let (state, error) = match state {
            Ok(()) => (AttachState::Attached, None),
            Err((s, e)) => (s, Some(e)),
        };
        self.record(family, spec, state, error);
        ok
    }

    /// Records a program that a family decided not to attach.
    pub fn skip(&mut self, family: &'static str, spec: &ProbeSpec, why: &str) {
        self.record(family, spec, AttachState::Skipped, Some(why.to_owned()));
    }

    fn record(
        &mut self,
        family: &'static str,
        spec: &ProbeSpec,
        state: AttachState,
        error: Option<String>,
    ) {
        self.status.push(ProbeStatus {
            family: family.into(),
            program: spec.program.into(),
            tracepoint: spec.tracepoint.into(),
            kind: spec.kind.label(),
            required: spec.required,
            state,
            error,
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
