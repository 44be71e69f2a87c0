//! Loading the embedded eBPF object and attaching each probe family, with a
//! record of what attached, what fell back and what failed (for meta.json
//! and for nulling the fields a missing probe would have measured).

pub mod sched;

use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{Ebpf, EbpfLoader, programs::BtfTracePoint};
use serde::Serialize;

use crate::btf::KernelBtf;

/// The eBPF object built by build.rs from `cis490-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cis490-ebpf"));

/// One program of a family: which tracepoint it attaches to and whether the
/// tracer can run without it.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSpec {
    /// Program (function) name in the object.
    pub program: &'static str,
    /// BTF-enabled tracepoint name (`btf_trace_<name>` in the kernel BTF).
    pub tracepoint: &'static str,
    /// Without it the family cannot work at all: fail the trace.
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
}

/// What meta.json records per probe.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeStatus {
    pub family: &'static str,
    pub program: &'static str,
    pub tracepoint: &'static str,
    /// "tp_btf": a BTF-enabled raw tracepoint.
    pub kind: &'static str,
    pub required: bool,
    pub state: AttachState,
    pub error: Option<String>,
}

/// The BTF-derived facts the programs need, checked before anything loads:
/// byte offsets of the `task_struct` fields the programs read.
#[derive(Clone, Debug, Serialize)]
pub struct KernelFacts {
    pub btf_path: String,
    pub task_struct_pid_offset: u32,
    pub task_struct_tgid_offset: u32,
    /// `se.sum_exec_runtime`.
    pub task_struct_runtime_offset: u32,
    pub task_struct_nvcsw_offset: u32,
    pub task_struct_nivcsw_offset: u32,
    /// `se.nr_migrations`.
    pub task_struct_migrations_offset: u32,
    /// `sched_info.run_delay`; `None` without CONFIG_SCHED_INFO (run-queue
    /// delay is then summed from wakeup/preemption to switch-in events).
    pub task_struct_run_delay_offset: Option<u32>,
}

impl KernelFacts {
    /// Reads the kernel BTF and fails with one line naming what is missing:
    /// BTF itself, a `task_struct` field, or a required tracepoint.
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
        let task = |m: &str| btf.member_offset("task_struct", m);
        let nested = |outer: &str, ty: &str, m: &str| -> Result<u32> {
            Ok(task(outer)? + btf.member_offset(ty, m)?)
        };
        Ok(Self {
            btf_path: btf_path.display().to_string(),
            task_struct_pid_offset: task("pid")?,
            task_struct_tgid_offset: task("tgid")?,
            task_struct_runtime_offset: nested("se", "sched_entity", "sum_exec_runtime")?,
            task_struct_nvcsw_offset: task("nvcsw")?,
            task_struct_nivcsw_offset: task("nivcsw")?,
            task_struct_migrations_offset: nested("se", "sched_entity", "nr_migrations")?,
            task_struct_run_delay_offset: nested("sched_info", "sched_info", "run_delay").ok(),
        })
    }
}

/// The loaded object and what became of each probe.
pub struct Probes {
    pub ebpf: Ebpf,
    pub status: Vec<ProbeStatus>,
}

impl Probes {
    /// Loads the programs for target thread group `tgid` and attaches every
    /// family. Optional probes that fail are recorded, not fatal.
    pub fn load_and_attach(tgid: u32, facts: &KernelFacts) -> Result<Self> {
        raise_memlock_limit();
        let run_delay_offset = facts.task_struct_run_delay_offset.unwrap_or(0);
        let btf = aya::Btf::parse_file(&facts.btf_path, aya::Endianness::default())
            .with_context(|| format!("cannot parse kernel BTF {}", facts.btf_path))?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .override_global("TARGET_TGID", &tgid, true)
            .override_global("TASK_PID_OFFSET", &facts.task_struct_pid_offset, true)
            .override_global("TASK_TGID_OFFSET", &facts.task_struct_tgid_offset, true)
            .override_global(
                "TASK_RUNTIME_OFFSET",
                &facts.task_struct_runtime_offset,
                true,
            )
            .override_global("TASK_NVCSW_OFFSET", &facts.task_struct_nvcsw_offset, true)
            .override_global("TASK_NIVCSW_OFFSET", &facts.task_struct_nivcsw_offset, true)
            .override_global(
                "TASK_MIGRATIONS_OFFSET",
                &facts.task_struct_migrations_offset,
                true,
            )
            .override_global("TASK_RUN_DELAY_OFFSET", &run_delay_offset, true)
            .load(EBPF_OBJECT)
            .map_err(|e| anyhow!("cannot load the eBPF object: {e}"))?;
        let mut status = Vec::new();
        let kernel = KernelBtf::from_file(Path::new(&facts.btf_path))?;
        for spec in sched::PROBES {
            let st = attach_tp_btf(&mut ebpf, &btf, &kernel, sched::FAMILY, spec);
            if spec.required && st.state != AttachState::Attached {
                bail!(
                    "cannot attach {} to tracepoint {}: {}",
                    spec.program,
                    spec.tracepoint,
                    st.error.as_deref().unwrap_or("missing")
                );
            }
            status.push(st);
        }
        Ok(Self { ebpf, status })
    }
}

fn attach_tp_btf(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    kernel: &KernelBtf,
    family: &'static str,
    spec: &ProbeSpec,
) -> ProbeStatus {
    let mut st = ProbeStatus {
        family,
        program: spec.program,
        tracepoint: spec.tracepoint,
        kind: "tp_btf",
        required: spec.required,
        state: AttachState::Attached,
        error: None,
    };
    if !kernel.has_tracepoint(spec.tracepoint) {
        st.state = AttachState::Missing;
        st.error = Some(format!("no btf_trace_{} in kernel BTF", spec.tracepoint));
        return st;
    }
    let result = (|| -> Result<()> {
        let prog: &mut BtfTracePoint = ebpf
            .program_mut(spec.program)
            .ok_or_else(|| anyhow!("program {} not in the object", spec.program))?
            .try_into()?;
        prog.load(spec.tracepoint, btf)?;
        prog.attach()?;
        Ok(())
    })();
    if let Err(e) = result {
        st.state = AttachState::Failed;
        st.error = Some(format!("{e:#}"));
    }
    st
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
