//! Loading the embedded eBPF object and attaching each probe family (the
//! vocabulary they share is in `spec`), with a
//! record of what attached, which path a family took (its fallbacks) and
//! what failed: for meta.json, and for nulling the fields a missing probe
//! would have measured.
//!
//! Order: [`KernelFacts::probe`] reads the kernel BTF (member offsets,
//! tracepoints) and fails early if the scheduler family cannot work;
//! [`Plan::new`] decides each family's path; [`Probes::load_and_attach`]
//! loads the object with the offsets and paths as read-only globals, then
//! attaches family by family.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use anyhow::{Result, anyhow, bail};
use aya::{Ebpf, EbpfLoader};
use cis490_common::{
    block::{global as block_names, map as block_maps},
    kvm::map as kvm_maps,
    map,
    net::map as net_maps,
    sched::{global as sched_names, map as sched_maps},
};

use super::{
    block,
    btf::{self, KernelBtf},
    kvm, net, sched,
    spec::{
        AttachState, Attacher, FamilyStatus, KernelFacts, NOT_ASKED, OffsetSpec, ProbeKind,
        ProbeSpec, ProbeStatus,
    },
    targets::{Slot, Targets},
};

/// The eBPF object built by build.rs from `cis490-ebpf`.
pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cis490-ebpf"));

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
        .chain(block::CGROUP_OFFSETS)
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
                offsets.insert(o.global.into(), Some(off?));
            } else {
                offsets.insert(o.global.into(), off.ok());
            }
        }
        // Only the attach points some family may use: the stub BTF built
        // from them (btf::stub) then stops at the highest of their ids.
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
}

/// User choices about probe paths.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub block: block::PathChoice,
    /// Size of the lifecycle-record ring buffer (`RECORDS`), bytes: a power
    /// of two and a multiple of the page size.
    pub ringbuf_bytes: u32,
    /// Whether the eBPF source's counters are wanted (`--sources` has
    /// `ebpf`). Without them only the lifecycle probes attach (for
    /// `events.jsonl`): no program on every switch, request or packet.
    pub counters: bool,
    /// Whether `wakeups` is counted (`--wakeups`): the `sched_wakeup`
    /// program on every wakeup of the machine. Without it the program runs
    /// only where single run-queue delays are timed from the wakeup.
    pub wakeups: bool,
    /// Target slots in the per-target maps: 1 for a standalone trace.
    pub targets: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            block: block::PathChoice::default(),
            ringbuf_bytes: cis490_common::RINGBUF_BYTES,
            counters: true,
            wakeups: false,
            targets: 1,
        }
    }
}

/// The maps with entries per target slot, and how many entries a slot has
/// (the loader sizes them for the number of targets).
const PER_TARGET_MAPS: &[(&str, u32)] = &[
    (map::TARGETS, 1),
    (map::TARGET_GONE, 1),
    (map::EPOCH, 1),
    (sched_maps::SCHED_STATS, 1),
    (sched_maps::LIVE, 1),
    (block_maps::BLOCK_STATS, 1),
    (block_maps::BLOCK_MAX, 2),
    (net_maps::NET_STATS, 1),
    (kvm_maps::KVM_STATS, 1),
];

/// Per-family decisions taken before the object is loaded (they become
/// read-only globals).
#[derive(Clone, Debug)]
pub struct Plan {
    pub sched: sched::SchedPlan,
    pub block: Result<block::BlockPath, String>,
    /// Whether the block programs can tell the cgroup a bio is charged to.
    pub block_cgroups: Result<(), String>,
    pub net: net::NetPlan,
    pub kvm: Result<kvm::KvmFormat, String>,
    pub ringbuf_bytes: u32,
    /// Target slots (see [`Options::targets`]).
    pub targets: u32,
}

impl Plan {
    pub fn new(facts: &KernelFacts, opts: Options) -> Self {
        fn off<T>() -> Result<T, String> {
            Err(NOT_ASKED.to_owned())
        }
        let (block, net, kvm) = if opts.counters {
            (
                block::plan(facts, opts.block),
                net::plan(facts),
                kvm::plan(),
            )
        } else {
            let net = net::NetPlan {
                taps: off(),
                sockets: off(),
            };
            (off(), net, off())
        };
        Self {
            sched: sched::plan(facts, opts.counters, opts.wakeups),
            block_cgroups: block
                .as_ref()
                .map_err(Clone::clone)
                .and_then(|_| facts.have_offsets(block::CGROUP_OFFSETS)),
            block,
            net,
            kvm,
            ringbuf_bytes: opts.ringbuf_bytes,
            targets: opts.targets.max(1),
        }
    }

    /// The globals to set at load time, beyond the offsets.
    fn globals(&self) -> Vec<(&'static str, u32)> {
        let mut g = vec![
            (sched_names::RUN_DELAY_SOURCE, self.sched.run_delay as u32),
            (sched_names::COUNTING, self.sched.counters as u32),
            (
                block_names::BLOCK_LEGACY,
                matches!(self.block, Ok(block::BlockPath::Rq)) as u32,
            ),
            (
                block_names::BLOCK_CGROUPS,
                self.block_cgroups.is_ok() as u32,
            ),
        ];
        g.extend(kvm::globals(&self.kvm));
        g.push((
            sched_names::SKIP_FINAL_SWITCH_OF_TID_MULTIPLES,
            injected(SKIP_FINAL_SWITCH_ENV, "the final switch-out"),
        ));
        g.push((
            sched_names::SKIP_FREE_OF_TID_MULTIPLES,
            injected(SKIP_FREE_ENV, "the free"),
        ));
        g
    }
}

/// A test's fault injection from environment variable `var` (0 without
/// it), with a warning on stderr when set: `what` of every target thread
/// whose id is a multiple of it goes unseen by the programs.
fn injected(var: &str, what: &str) -> u32 {
    let n = std::env::var(var)
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    if n > 0 {
        log::warn!(
            "{var}={n}: for tests only, the programs leave {what} of every target thread whose \
             id is a multiple of {n} unseen"
        );
    }
    n
}

/// Fault injection for the tests (docs/reliability.md): a thread id
/// multiple N whose final switch-outs the probe leaves uncounted (they are
/// repaired at the thread's free).
pub const SKIP_FINAL_SWITCH_ENV: &str = "CIS490_TEST_SKIP_FINAL_SWITCH_OF_TID_MULTIPLES";

/// Fault injection for the tests (docs/reliability.md): a thread id
/// multiple N whose frees the probe leaves unseen (with its final switch-out
/// missed too, the tracer counts such a thread from its counters at exit
/// start once the target ended).
pub const SKIP_FREE_ENV: &str = "CIS490_TEST_SKIP_FREE_OF_TID_MULTIPLES";

/// The loaded object and what became of each probe and family.
pub struct Probes {
    pub ebpf: Ebpf,
    /// The traced thread groups (a server's episodes add and remove theirs).
    pub targets: std::sync::Mutex<Targets>,
    /// The slot of the target given to [`Probes::load_and_attach`], if one
    /// was (a server adds its targets later).
    pub slot: Option<Slot>,
    pub status: Vec<ProbeStatus>,
    pub families: Vec<FamilyStatus>,
    /// What each attached family hands to its reader (taken by
    /// [`super::EbpfSource::new`]).
    pub(super) handoff: Handoff,
}

/// Each family's typed result of attaching, for its readers (`None`: the
/// family measures nothing here). Every episode's readers get a copy.
#[derive(Clone)]
pub(super) struct Handoff {
    pub sched: Option<sched::Attached>,
    pub block: Option<block::Attached>,
    pub net: Option<net::Attached>,
    pub kvm: Option<kvm::Attached>,
}

impl Probes {
    /// Runs of each loaded program that the kernel skipped since it was
    /// loaded, because the program would have run nested on its own CPU (an
    /// interrupt on a CPU already running it: a block completion in a hard
    /// interrupt while the same program handles one in a soft interrupt, for
    /// one): `recursion_misses` in the program's fdinfo (Linux 5.12+; a
    /// kernel without it gives no entry).
    pub fn recursion_misses(&self) -> BTreeMap<String, u64> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let fd = p.fd().ok()?.as_fd().as_raw_fd();
                let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
                fdinfo_recursion_misses(&info).map(|n| (name.to_owned(), n))
            })
            .collect()
    }

    /// Loads the programs, adds thread group `first` as a target if given
    /// (before anything attaches) and attaches every family. Only the
    /// scheduler family's required probes are fatal.
    pub fn load_and_attach(first: Option<u32>, facts: &KernelFacts, plan: &Plan) -> Result<Self> {
        let (ebpf, btf) = Self::load(facts, plan)?;
        // The target before any program attaches: none misses its start.
        let mut targets = Targets::new(&ebpf, plan.targets)?;
        let slot = first.map(|tgid| targets.add(tgid)).transpose()?;
        let mut a = Attacher {
            ebpf,
            btf,
            facts,
            status: Vec::new(),
        };
        let (sched_status, sched) = sched::attach(&mut a, plan.sched)?;
        let (block_status, block) = block::attach(&mut a, &plan.block);
        let (net_status, net) = net::attach(&mut a, &plan.net);
        let (kvm_status, kvm) = kvm::attach(&mut a, &plan.kvm);
        let families = vec![sched_status, block_status, net_status, kvm_status];
        let Attacher {
            ebpf, status, btf, ..
        } = a;
        // aya's parse of the kernel BTF is the tracer's largest allocation.
        drop(btf);
        release_freed_memory();
        Ok(Self {
            ebpf,
            targets: std::sync::Mutex::new(targets),
            slot,
            status,
            families,
            handoff: Handoff {
                sched: Some(sched),
                block: block.map(|_| block::Attached {
                    cgroups: plan.block_cgroups.clone(),
                }),
                net,
                kvm,
            },
        })
    }

    /// The object loaded with nothing attached and no target, for a
    /// server's episode that runs the gateway collector: its classifiers
    /// and maps are the episode's own (the gateway source attaches them).
    pub fn load_unattached(facts: &KernelFacts, plan: &Plan) -> Result<Self> {
        let (ebpf, btf) = Self::load(facts, plan)?;
        drop(btf);
        let targets = Targets::new(&ebpf, plan.targets)?;
        Ok(Self {
            ebpf,
            targets: std::sync::Mutex::new(targets),
            slot: None,
            status: Vec::new(),
            families: Vec::new(),
            handoff: Handoff {
                sched: None,
                block: None,
                net: None,
                kvm: None,
            },
        })
    }

    /// Loads the object (maps made, programs not yet) with the offsets and
    /// the plan's decisions as read-only globals; returns it and the attach
    /// points' BTF.
    fn load(facts: &KernelFacts, plan: &Plan) -> Result<(Ebpf, aya::Btf)> {
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
        // btf::stub).
        let btf = aya::Btf::parse(
            &btf::stub::stub(&facts.tracepoints, &facts.iterators),
            aya::Endianness::default(),
        )
        .map_err(|e| anyhow!("cannot build the attach points' BTF: {e}"))?;
        let offsets: Vec<(&str, u32)> = facts
            .offsets
            .iter()
            .map(|(g, o)| (g.as_ref(), o.unwrap_or(0)))
            .collect();
        let globals = plan.globals();
        loader.map_max_entries(map::RECORDS, plan.ringbuf_bytes);
        for (name, per_slot) in PER_TARGET_MAPS {
            loader.map_max_entries(name, per_slot * plan.targets);
        }
        for (name, value) in offsets.iter().chain(globals.iter()) {
            loader.override_global(name, value, true);
        }
        let ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| anyhow!("cannot load the eBPF object: {e}"))?;
        Ok((ebpf, btf))
    }
}

impl Probes {
    /// A handle of its own on the ring buffer of lifecycle records (a
    /// server's dispatcher reads it for every episode).
    pub fn records_ring(&self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        super::maps::open(&self.ebpf, map::RECORDS)
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

/// Gives memory freed after a large parse back to the system (glibc keeps
/// freed heap otherwise), so the tracer's resident size stays small while
/// it traces.
fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
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

/// The `recursion_misses:` value of a BPF program's fdinfo.
fn fdinfo_recursion_misses(info: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix("recursion_misses:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use cis490_common::{block, gateway, kvm, net, sched};
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

    use super::*;

    #[test]
    fn recursion_misses_are_read_from_a_programs_fdinfo() {
        let info = "pos:\t0\nflags:\t02000002\nprog_type:\t26\nprog_id:\t61\n\
                    run_time_ns:\t0\nrun_cnt:\t0\nrecursion_misses:\t7\nverified_insns:\t12\n";
        assert_eq!(fdinfo_recursion_misses(info), Some(7));
        assert_eq!(fdinfo_recursion_misses("prog_id:\t61\n"), None);
        assert_eq!(fdinfo_recursion_misses("recursion_misses:\tx\n"), None);
    }

    /// The names `cis490_common` declares, by kind, over every family.
    fn declared(kind: &str) -> BTreeSet<&'static str> {
        let lists: &[&[&str]] = match kind {
            "maps" => &[
                map::ALL,
                sched::map::ALL,
                block::map::ALL,
                net::map::ALL,
                kvm::map::ALL,
                gateway::map::ALL,
            ],
            "programs" => &[
                sched::prog::ALL,
                block::prog::ALL,
                net::prog::ALL,
                kvm::prog::ALL,
                gateway::prog::ALL,
            ],
            _ => &[
                sched::global::ALL,
                block::global::ALL,
                net::global::ALL,
                kvm::global::ALL,
            ],
        };
        lists.iter().flat_map(|l| l.iter().copied()).collect()
    }

    /// The symbols of the embedded object defined in sections whose name
    /// passes `section`.
    fn symbols(section: impl Fn(&str) -> bool) -> BTreeSet<String> {
        let obj = object::File::parse(EBPF_OBJECT).unwrap();
        obj.symbols()
            .filter(|s| {
                s.section_index()
                    .and_then(|i| obj.section_by_index(i).ok())
                    .and_then(|sec| sec.name().ok().map(&section))
                    .unwrap_or(false)
            })
            .filter_map(|s| s.name().ok().map(str::to_owned))
            // Ours only: not the compiler's anonymous constants (`anon.*`).
            .filter(|n| !n.is_empty() && !n.contains('.'))
            .collect()
    }

    /// Every map, program and global of the embedded eBPF object is a name
    /// declared in `cis490_common`, and every declared name is in the
    /// object: a name spelled differently on the two sides fails here, not
    /// at load time on some kernel.
    #[test]
    fn the_objects_names_are_the_declared_ones() {
        let mut maps = symbols(|s| s == "maps" || s == ".maps");
        // And the globals that are maps of their own: a data section each.
        let obj = object::File::parse(EBPF_OBJECT).unwrap();
        maps.extend(
            obj.sections()
                .filter_map(|s| s.name().ok().map(str::to_owned))
                .filter(|n| n.starts_with(".data.") || n.starts_with(".bss.")),
        );
        let globals = symbols(|s| s.starts_with(".rodata"));
        let programs = symbols(|s| {
            ["tp_btf", "iter", "tracepoint", "classifier", "tc"]
                .iter()
                .any(|p| s == *p || s.starts_with(&format!("{p}/")))
        });
        for (kind, found) in [("maps", maps), ("programs", programs), ("globals", globals)] {
            let found: BTreeSet<&str> = found.iter().map(String::as_str).collect();
            assert_eq!(
                found,
                declared(kind),
                "the object's {kind} (left) differ from cis490_common's names (right)"
            );
        }
    }

    /// Every global of the object is set by the loader (a global left at 0
    /// would read the wrong field, silently), and every offset the families
    /// list is a global of the object.
    #[test]
    fn every_global_of_the_object_is_set() {
        let plan_globals: BTreeSet<&str> = std::iter::empty()
            .chain(
                Plan {
                    sched: super::sched::SchedPlan {
                        run_delay: sched::RunDelaySource::SchedInfo,
                        counters: true,
                        wakeups: true,
                        io_accounting: true,
                    },
                    block: Err(String::new()),
                    block_cgroups: Err(String::new()),
                    net: super::net::NetPlan {
                        taps: Ok(()),
                        sockets: Ok(()),
                    },
                    kvm: Err(String::new()),
                    ringbuf_bytes: 0,
                    targets: 1,
                }
                .globals()
                .into_iter()
                .map(|(g, _)| g),
            )
            .chain(all_offsets().map(|o| o.global))
            .collect();
        assert_eq!(plan_globals, declared("globals"));
    }
}
