//! Telemetry sources. Each answers one question at every bucket boundary:
//! "what changed since the last boundary?", as a [`Measures`]. The
//! coordinator stamps the row envelope; no source reads another's output.

pub mod gateway;
pub mod guest;
pub mod perf;
pub mod proc;
pub mod qmp;

use crate::{
    row::{Measures, SourceKind},
    taps::Holdings,
};

/// What the coordinator knows about the target at a boundary, shared by
/// every source (target discovery, not another source's output).
#[derive(Clone, Debug, Default)]
pub struct SampleCtx<'a> {
    pub holdings: std::borrow::Cow<'a, Holdings>,
    /// Where the taps in `holdings` live, with each namespace's
    /// `/proc/net/dev` (for the /proc oracle).
    pub taps: Option<&'a crate::taps::Resolver>,
}

/// A source sampled at every bucket boundary.
pub trait Source {
    fn kind(&self) -> SourceKind;
    /// What changed since the previous call.
    fn sample(&mut self, ctx: &SampleCtx<'_>) -> anyhow::Result<Measures>;
}

impl Source for proc::ProcSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Proc
    }
    fn sample(&mut self, ctx: &SampleCtx<'_>) -> anyhow::Result<Measures> {
        Ok(proc::ProcSource::sample(
            self,
            &ctx.holdings.tap_ifs,
            ctx.taps,
        ))
    }
}

impl Source for perf::PerfSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Perf
    }
    fn sample(&mut self, _ctx: &SampleCtx<'_>) -> anyhow::Result<Measures> {
        Ok(perf::PerfSource::sample(self))
    }
}
