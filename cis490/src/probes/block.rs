//! The block I/O probe family (programs in `cis490-ebpf/src/block.rs`):
//! `block_io_start`/`block_io_done` where the kernel has them (6.5+), else
//! the older `block_rq_insert`/`block_rq_issue`/`block_rq_complete`.

use super::{Attacher, FamilyStatus, KernelFacts, OffsetSpec, ProbeKind::TpBtf, ProbeSpec};

pub const FAMILY: &str = "block";

/// Which block tracepoints to use (`--block-probes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PathChoice {
    /// `block_io_*` where the kernel has them, else the `block_rq_*` fallback.
    #[default]
    Auto,
    /// `block_io_start`/`block_io_done` (Linux 6.5+).
    Io,
    /// `block_rq_insert`/`block_rq_issue`/`block_rq_complete`.
    Rq,
}

/// The path taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockPath {
    Io,
    Rq,
}

impl BlockPath {
    pub fn name(self) -> &'static str {
        match self {
            Self::Io => "block_io",
            Self::Rq => "block_rq",
        }
    }
}

pub const OFFSETS: &[OffsetSpec] = &[
    OffsetSpec {
        global: "REQ_CMD_FLAGS_OFFSET",
        ty: "request",
        path: "cmd_flags",
    },
    OffsetSpec {
        global: "REQ_BIO_OFFSET",
        ty: "request",
        path: "bio",
    },
    OffsetSpec {
        global: "REQ_DATA_LEN_OFFSET",
        ty: "request",
        path: "__data_len",
    },
];

const fn tp(program: &'static str) -> ProbeSpec {
    ProbeSpec {
        program,
        tracepoint: program,
        kind: TpBtf,
        required: false,
    }
}

pub(super) const IO: &[ProbeSpec] = &[
    tp("block_io_start"),
    tp("block_rq_issue"),
    tp("block_rq_complete"),
    tp("block_io_done"),
];
pub(super) const RQ: &[ProbeSpec] = &[
    tp("block_bio_queue"),
    tp("block_rq_insert"),
    tp("block_rq_issue"),
    tp("block_rq_complete"),
];

fn probes(path: BlockPath) -> &'static [ProbeSpec] {
    match path {
        BlockPath::Io => IO,
        BlockPath::Rq => RQ,
    }
}

/// Picks the path before loading (it is a read-only global of the object).
pub fn plan(facts: &KernelFacts, choice: PathChoice) -> Result<BlockPath, String> {
    facts.have_offsets(OFFSETS)?;
    let has_all = |specs: &[ProbeSpec]| specs.iter().all(|s| facts.has_tracepoint(s.tracepoint));
    let (io, rq) = (has_all(IO), has_all(RQ));
    match choice {
        PathChoice::Io if io => Ok(BlockPath::Io),
        PathChoice::Io => Err("this kernel has no block_io_start/block_io_done tracepoints".into()),
        PathChoice::Rq if rq => Ok(BlockPath::Rq),
        PathChoice::Auto if io => Ok(BlockPath::Io),
        PathChoice::Auto | PathChoice::Rq if rq => Ok(BlockPath::Rq),
        _ => Err("this kernel has neither block_io_* nor block_rq_* tracepoints".into()),
    }
}

pub fn attach(a: &mut Attacher<'_>, plan: &Result<BlockPath, String>) -> FamilyStatus {
    let all = IO
        .iter()
        .chain(RQ)
        .filter(|s| s.program != "block_rq_issue" && s.program != "block_rq_complete");
    let path = match plan {
        Ok(p) => *p,
        Err(why) => {
            for s in all.chain(&IO[1..3]) {
                a.skip(FAMILY, s, why);
            }
            return FamilyStatus {
                family: FAMILY,
                active: false,
                path: None,
                note: Some(why.clone()),
            };
        }
    };
    let mut failed = None;
    for s in probes(path) {
        if !a.attach(FAMILY, s) && failed.is_none() {
            failed = Some(format!("{} did not attach", s.program));
        }
    }
    for s in all.filter(|s| !probes(path).iter().any(|p| p.program == s.program)) {
        a.skip(FAMILY, s, &format!("path {} taken", path.name()));
    }
    FamilyStatus {
        family: FAMILY,
        active: failed.is_none(),
        path: Some(path.name()),
        note: failed,
    }
}
