//! What `meta.json` holds. Written at the start (`status: "running"`) and
//! rewritten atomically at the end (`"complete"` or `"failed"`).

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    ebpf::{FamilyStatus, KernelFacts, ProbeStatus},
    row::SourceKind,
    target::{ExitStatus, ExitUsage, TargetInfo},
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    #[default]
    Running,
    Complete,
    Failed,
}

/// Why tracing stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    TargetExited,
    Duration,
    Signal,
    /// `stop` on the control socket.
    Control,
    /// The `cis490 trace --server` client went away.
    ClientGone,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Clock {
    pub t_mono_ns: u64,
    pub t_wall_ns: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Host {
    pub hostname: String,
    pub kernel_release: String,
    pub kernel_version: String,
    pub cpus: usize,
}

impl Host {
    pub fn current() -> Self {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        Self {
            hostname: read("/proc/sys/kernel/hostname"),
            kernel_release: read("/proc/sys/kernel/osrelease"),
            kernel_version: read("/proc/sys/kernel/version"),
            // Online CPUs, not this process's affinity: what the target
            // can run on.
            // SAFETY: sysconf has no preconditions.
            cpus: usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) })
                .unwrap_or(0),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SourceMeta {
    pub source: SourceKind,
    pub file: String,
    #[serde(default)]
    pub available_in_deployment: bool,
    #[serde(default)]
    pub rows: u64,
}

/// Totals of the eBPF side, for loss accounting.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct EbpfTotals {
    pub ringbuf_bytes: u32,
    /// Tracepoint hits attributed to the target.
    pub events: u64,
    /// Ring-buffer records lost (reserve failed); rows are unaffected.
    pub dropped_events: u64,
    /// Hash-map updates that failed (a run-queue delay or thread untracked).
    pub map_errors: u64,
    /// Switch-outs of a target thread whose switch-in the kernel did not
    /// deliver to the probe. Rows stay exact (they come from the thread's
    /// own counters at switch-out); only the split of that slice across
    /// buckets is late.
    pub slice_mismatches: u64,
    /// CPU time the target's exited threads spent from the start of their
    /// exit (`sched_process_exit`) to their final switch-out, ns. The
    /// kernel folds a thread into its process's totals (getrusage,
    /// `/proc/PID/stat`, the process CPU clock) on that way, so eBPF's
    /// `cpu_ns`, which counts each thread to its final switch-out, is above
    /// those by less than this.
    #[serde(default)]
    pub exit_path_cpu_ns: u64,
    /// Exited target threads whose final switch-out the probe never saw:
    /// counted when the kernel freed them, from their final counters.
    /// Should stay 0.
    #[serde(default)]
    pub final_switch_repairs: u64,
    /// Target threads that began to exit and whose final counters were in
    /// no row by the end: neither their final switch-out nor, where the
    /// probe missed it, their free was counted before the last row (the
    /// tracer warns about them too). Their counters are missing from the
    /// rows. Should stay 0.
    #[serde(default)]
    pub exits_unaccounted: u64,
    /// Target threads that exited and whose final switch-out and free the
    /// probes both missed (the kernel ran neither program for them): counted
    /// in the last row from their counters when they began to exit, with
    /// their final switch-out; short of the CPU time of their last
    /// microseconds on the way out. Should stay 0.
    #[serde(default)]
    pub exits_estimated: u64,
    /// Times the task iterator found a CPU's running-slice record being
    /// rewritten (a switch-in on that CPU) while it copied it, and counted
    /// that thread with the kernel's own runtime (current to the last tick)
    /// instead: the part of the slice since the tick lands in the next
    /// bucket. Never an overcount.
    #[serde(default)]
    pub torn_slice_reads: u64,
    /// Block requests whose completion the kernel did not deliver; their
    /// bytes were accounted when found (their address reused, the reader's
    /// scan of requests in flight over 2 s, or the end).
    pub block_missed_completions: u64,
    /// The target's block requests merged into another request in the I/O
    /// scheduler after they were attributed (`block_rq_merge`): their bytes
    /// complete with the request they joined and count as that one does.
    #[serde(default)]
    pub block_requests_merged: u64,
    /// The target's own cgroup (v2, its path), whose block I/O counts as
    /// the target's whoever submits it (the flusher's writeback of the
    /// pages it dirtied): `null` when it has none such, and then
    /// `block_cgroup_note` says why.
    #[serde(default)]
    pub block_cgroup: Option<String>,
    #[serde(default)]
    pub block_cgroup_note: Option<String>,
    /// Per loaded program: runs the kernel skipped during the episode
    /// because the program would have run nested on its own CPU (the
    /// program's `recursion_misses`; a server's programs are shared, so
    /// there it counts every episode's). Empty on kernels before 5.12.
    #[serde(default)]
    pub recursion_misses: std::collections::BTreeMap<String, u64>,
    pub records_received: u64,
    pub records_undecodable: u64,
}

/// What meta.json says about the /proc oracle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    /// Buckets whose `blk_read_bytes` and `io_write_bytes` are `null`
    /// because the target reaped a child in them (the kernel then adds the
    /// child's whole lifetime of I/O to the target's `/proc/PID/io`).
    pub children_reaped_buckets: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Meta {
    pub schema_version: u32,
    pub id: String,
    pub status: Status,
    pub error: Option<String>,
    pub cis490_version: std::borrow::Cow<'static, str>,
    pub command_line: Vec<String>,
    /// The tracer's working directory (relative paths on its command line
    /// are relative to it).
    pub working_directory: std::path::PathBuf,
    pub host: Host,
    pub target: TargetInfo,
    pub interval_ns: u64,
    pub duration_limit_s: Option<f64>,
    pub start: Option<Clock>,
    pub end: Option<Clock>,
    pub end_reason: Option<EndReason>,
    pub target_exit: Option<ExitStatus>,
    /// A spawned command's usage at its exit, as the kernel totals it.
    pub target_rusage: Option<ExitUsage>,
    pub sources: Vec<SourceMeta>,
    pub kernel: Option<KernelFacts>,
    pub probes: Vec<ProbeStatus>,
    /// Per probe family: whether it measures and which path it took.
    pub families: Vec<FamilyStatus>,
    pub ebpf: EbpfTotals,
    /// Bucket boundaries that passed while the tracer was late; the row after
    /// them covers a longer interval (see `interval_ns` of each row).
    pub skipped_boundaries: u64,
    /// The perf source: what each event counts or why it cannot.
    pub perf: Option<crate::sources::perf::PerfInfo>,
    /// Why the perf source is off, if it is.
    pub perf_error: Option<String>,
    /// The /proc oracle's notes, when it ran.
    pub proc: Option<ProcInfo>,
    /// The QMP source: what it could read, or why not.
    pub qmp: Option<serde_json::Value>,
    /// The guest agent source's socket, caps and counts (`--guest-agent`).
    pub guest_agent: Option<crate::sources::guest::GuestInfo>,
    /// The tracer's own cost (getrusage at the end).
    pub tracer: Option<TracerUsage>,
    /// `--tag KEY=VALUE` pairs (the sample, the VM...), by key.
    pub tags: BTreeMap<String, String>,
    /// The control socket (`--control`), if any.
    pub control_socket: Option<String>,
    /// Lines written to labels.jsonl.
    pub labels: u64,
    /// Steal time of the whole machine from the start to the end, ns (the
    /// `steal` column of `/proc/stat`): time the hypervisor ran something
    /// else while this machine's CPUs wanted to run. perf's `task-clock`
    /// counts it, the scheduler's runtime does not, so `cis490 check`
    /// allows perf's `cpu_ns` that much more. `null` where not readable.
    pub host_steal_ns: Option<u64>,
    /// The longest time the tracer took, at one bucket boundary, from the
    /// start of its first host-side source's read (eBPF, /proc, perf) to the
    /// end of its last one's, ns: what one source can have counted at a
    /// boundary that another counts in the next bucket. `cis490 check`
    /// allows each CPU that long plus a 10 ms tick of CPU time between two
    /// sources' running totals. `null` in episodes written before it was
    /// recorded.
    pub read_spread_max_ns: Option<u64>,
    /// How the thread that closed the buckets was scheduled (`--priority`).
    /// `null` in episodes written before it was recorded.
    #[serde(default)]
    pub tracer_scheduling: Option<crate::trace::priority::Scheduling>,
    /// The gateway collector: interface, attach mode, the VM's MAC
    /// addresses and where they came from, capture counts (`null` without
    /// `--gateway-if`).
    /// (Written only: no reader of an episode needs it back typed.)
    #[serde(skip_deserializing)]
    pub gateway: Option<crate::sources::gateway::GatewayInfo>,
}

/// Longest `--tag` value, bytes.
impl Meta {
    /// Reads an episode's `meta.json` (the episode's readers: `check`,
    /// `summary`). Members an older or unfinished episode lacks take their
    /// defaults.
    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let bytes = std::fs::read(dir.join(crate::episode::META))
            .with_context(|| format!("{} is not an episode directory", dir.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: meta.json does not parse", dir.display()))
    }
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Complete => "complete",
            Status::Failed => "failed",
        }
    }
}

impl EndReason {
    pub fn name(self) -> &'static str {
        match self {
            EndReason::TargetExited => "target_exited",
            EndReason::Duration => "duration",
            EndReason::Signal => "signal",
            EndReason::Control => "control",
            EndReason::ClientGone => "client_gone",
        }
    }
}

pub const TAG_VALUE_MAX: usize = 1024;

/// Parses `KEY=VALUE` of `--tag`: the key is 1 to 64 characters of
/// `[A-Za-z0-9_.-]`, the value up to [`TAG_VALUE_MAX`] bytes with no control
/// characters (it may be empty and may hold `=`).
pub fn parse_tag(spec: &str) -> Result<(String, String), String> {
    let (key, value) = spec
        .split_once('=')
        .ok_or_else(|| format!("'{spec}' is not KEY=VALUE"))?;
    if key.is_empty()
        || key.len() > 64
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return Err(format!(
            "tag key '{key}' must be 1 to 64 characters of A-Z a-z 0-9 _ . -"
        ));
    }
    if value.len() > TAG_VALUE_MAX {
        return Err(format!(
            "the value of tag '{key}' is {} bytes, more than {TAG_VALUE_MAX}",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "the value of tag '{key}' holds a control character"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// The tags as meta.json holds them; a key given twice is an error.
pub fn tag_map(tags: &[(String, String)]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in tags {
        if out.insert(k.clone(), v.clone()).is_some() {
            return Err(format!("--tag {k} is given more than once"));
        }
    }
    Ok(out)
}

/// The machine's steal time so far, ns (`/proc/stat`, all CPUs).
pub fn machine_steal_ns() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: u64 = stat
        .lines()
        .next()?
        .split_whitespace()
        .nth(8)?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks.saturating_mul(1_000_000_000) / hz as u64)
}

/// What the tracer itself used.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TracerUsage {
    /// Peak resident memory, KiB.
    pub max_rss_kib: u64,
    pub cpu_user_ns: u64,
    pub cpu_sys_ns: u64,
}

impl TracerUsage {
    /// The tracer process's.
    pub fn now() -> Self {
        Self::of(libc::RUSAGE_SELF)
    }

    /// A server's episode: the CPU time of the calling thread (the
    /// episode's event loop) and the server's peak memory.
    pub fn now_for_thread() -> Self {
        Self {
            max_rss_kib: Self::now().max_rss_kib,
            ..Self::of(libc::RUSAGE_THREAD)
        }
    }

    fn of(who: libc::c_int) -> Self {
        // SAFETY: getrusage fills a zeroed struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut ru) };
        let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
        Self {
            max_rss_kib: own_peak_rss_kib().unwrap_or(ru.ru_maxrss as u64),
            cpu_user_ns: ns(ru.ru_utime),
            cpu_sys_ns: ns(ru.ru_stime),
        }
    }
}

/// This process's own peak resident memory, KiB: `VmHWM` in
/// `/proc/self/status`, the high-water mark of the memory it has now.
/// Not `getrusage`'s `ru_maxrss`: at `execve` the kernel carries the old
/// memory's high-water mark into it, and a process started by `vfork` or
/// `posix_spawn` (Rust's `Command`, Python's `subprocess`) execs from its
/// parent's memory, so `ru_maxrss` is at least the parent's peak (a test
/// harness at 73 MiB made a 50 MiB tracer report 73).
pub fn own_peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status_kib(&status, "VmHWM")
}

/// A `KEY:  N kB` line of a `/proc/PID/status` text, KiB.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_is_read_from_vm_hwm() {
        let status =
            "Name:\tcis490\nVmPeak:\t  300000 kB\nVmHWM:\t   51234 kB\nVmRSS:\t   40000 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(51234));
        assert_eq!(status_kib("VmRSS:\t 1 kB\n", "VmHWM"), None);
        assert_eq!(status_kib("VmHWM:\t lots kB\n", "VmHWM"), None);
        // This process's, live: at least what it holds now.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let now = status_kib(&status, "VmRSS").unwrap();
        assert!(own_peak_rss_kib().unwrap() >= now);
    }

    /// meta.json is written and read as one type: what the tracer writes
    /// reads back to the same document.
    #[test]
    fn meta_reads_back_what_is_written() {
        let meta = Meta {
            schema_version: 1,
            id: "01TEST".into(),
            status: Status::Complete,
            cis490_version: "0.1.0".into(),
            start: Some(Clock {
                t_mono_ns: 1,
                t_wall_ns: 2,
            }),
            end_reason: Some(EndReason::Duration),
            sources: vec![SourceMeta {
                source: SourceKind::Ebpf,
                file: SourceKind::Ebpf.file_name(),
                available_in_deployment: false,
                rows: 3,
            }],
            host_steal_ns: Some(4),
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let text = serde_json::to_string(&meta).unwrap();
        std::fs::write(dir.path().join(crate::episode::META), &text).unwrap();
        let back = Meta::read(dir.path()).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
        assert_eq!(back.sources[0].rows, 3);
        assert_eq!(back.status.name(), "complete");
    }

    #[test]
    fn tags_are_validated() {
        assert_eq!(
            parse_tag("sample=sha256:ab=c").unwrap(),
            ("sample".into(), "sha256:ab=c".into())
        );
        assert_eq!(
            parse_tag("vm.name-2_x=").unwrap(),
            ("vm.name-2_x".into(), "".into())
        );
        for bad in ["novalue", "=x", "a b=1", "k/x=1", "k=a\nb", "k=\u{7f}"] {
            assert!(parse_tag(bad).is_err(), "{bad}");
        }
        assert!(parse_tag(&format!("{}=1", "k".repeat(65))).is_err());
        assert!(parse_tag(&format!("k={}", "v".repeat(TAG_VALUE_MAX))).is_ok());
        assert!(parse_tag(&format!("k={}", "v".repeat(TAG_VALUE_MAX + 1))).is_err());
        let dup = [
            ("a".to_owned(), "1".to_owned()),
            ("a".to_owned(), "2".to_owned()),
        ];
        assert_eq!(
            tag_map(&dup).unwrap_err(),
            "--tag a is given more than once"
        );
        assert_eq!(tag_map(&dup[..1]).unwrap()["a"], "1");
    }
}
