//! The tracers the bench compares, each attached to the held workload's
//! pid before it is released:
//!
//! - `cis490`: `cis490 trace --target-pid PID` as users run it (the
//!   default sources, 100 ms buckets), and `cis490 ebpf|proc|perf`: each
//!   source alone (`--sources S`); ready when its `started` event is out
//!   (its baseline is taken);
//! - `bpftrace`: Debian's bpftrace with [`bpftrace_script`], which counts
//!   the same scheduler and block events for the same process in BPF maps
//!   and prints them every 100 ms; ready at its first print;
//! - `proc`: `cis490-proc-poller`, a plain /proc poller at 100 ms; ready
//!   after its first sample.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::measure::{self, Usage, signal};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Tracer {
    /// No tracer: the baseline.
    None,
    /// cis490 as users run it: `cis490 trace --target-pid PID` (the
    /// default sources).
    Cis490,
    /// cis490 as users run it plus `--wakeups` (the wakeup program on
    /// every wakeup of the machine).
    Cis490Wakeups,
    /// cis490 with the eBPF source alone (`--sources ebpf`: every probe family).
    Cis490Ebpf,
    /// cis490 with the /proc oracle alone (`--sources proc`).
    Cis490Proc,
    /// cis490 with perf's per-thread counters alone (`--sources perf`).
    Cis490Perf,
    /// cis490 as users run it, through a server (`cis490 trace --server`;
    /// the scaling part only, which runs the server).
    Cis490Served,
    /// bpftrace counting the same scheduler and block events.
    Bpftrace,
    /// A plain /proc poller at the same interval.
    Proc,
}

impl Tracer {
    pub const ALL: [Tracer; 8] = [
        Tracer::None,
        Tracer::Cis490,
        Tracer::Cis490Wakeups,
        Tracer::Cis490Ebpf,
        Tracer::Cis490Proc,
        Tracer::Cis490Perf,
        Tracer::Bpftrace,
        Tracer::Proc,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Tracer::None => "untraced",
            Tracer::Cis490 => "cis490",
            Tracer::Cis490Wakeups => "cis490 --wakeups",
            Tracer::Cis490Ebpf => "cis490 ebpf",
            Tracer::Cis490Proc => "cis490 proc",
            Tracer::Cis490Perf => "cis490 perf",
            Tracer::Cis490Served => "cis490 --server",
            Tracer::Bpftrace => "bpftrace",
            Tracer::Proc => "/proc poller",
        }
    }

    /// For a cis490 run: its `--sources` (`None`: the default sources).
    pub fn cis490_sources(self) -> Option<Option<&'static str>> {
        match self {
            Tracer::Cis490 | Tracer::Cis490Wakeups | Tracer::Cis490Served => Some(None),
            Tracer::Cis490Ebpf => Some(Some("ebpf")),
            Tracer::Cis490Proc => Some(Some("proc")),
            Tracer::Cis490Perf => Some(Some("perf")),
            _ => None,
        }
    }

    pub fn is_cis490(self) -> bool {
        self.cis490_sources().is_some()
    }

    /// Whether it runs BPF programs (and so has BPF statistics): every
    /// cis490 (without the eBPF source only its thread lifecycle probes,
    /// which the statistics pass shows) and bpftrace.
    pub fn is_bpf(self) -> bool {
        self.is_cis490() || self == Tracer::Bpftrace
    }
}

/// Interval of every tracer's rows, ms.
pub const INTERVAL_MS: u64 = 100;

/// Options for starting tracers.
pub struct Setup {
    /// Where the workloads and the /proc poller are.
    pub bin: PathBuf,
    /// The cis490 binary benchmarked.
    pub cis490: PathBuf,
    pub bpftrace: PathBuf,
    /// cis490's ring buffer, KiB (its default unless the loss check asks).
    pub ringbuf_kib: Option<u32>,
    /// Block tracepoints bpftrace uses: ("block_io_start", "block_io_done")
    /// on Linux 6.5+, else ("block_rq_issue", "block_rq_complete").
    pub block_tps: (&'static str, &'static str),
    /// A running `cis490 serve`'s socket, for `Tracer::Cis490Served`.
    pub server: Option<PathBuf>,
}

/// A tracer running against a pid.
pub struct Running {
    pub tracer: Tracer,
    child: Child,
    dir: PathBuf,
}

/// What a tracer reported and used.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub usage: Usage,
    /// Events attributed to the target that went into rows (cis490:
    /// `meta.json` `ebpf.events`; bpftrace: its `@events` count).
    pub events: Option<u64>,
    /// Ring-buffer records received and dropped (cis490).
    pub records: Option<u64>,
    pub dropped: Option<u64>,
    pub ringbuf_bytes: Option<u64>,
    /// bpftrace's "Lost N events" lines, summed.
    pub lost: Option<u64>,
    /// cis490's `meta.json`.
    pub meta: Option<Value>,
}

impl Setup {
    /// Starts `tracer` on `pid`, writing its files under `dir`, and returns
    /// once it is ready (attached, baseline taken).
    pub fn start(&self, tracer: Tracer, pid: u32, dir: &Path) -> Result<Option<Running>> {
        let stdout = || fs::File::create(dir.join("tracer.stdout"));
        let stderr = || fs::File::create(dir.join("tracer.stderr"));
        let mut cmd = match tracer {
            Tracer::None => return Ok(None),
            t @ (Tracer::Cis490
            | Tracer::Cis490Wakeups
            | Tracer::Cis490Ebpf
            | Tracer::Cis490Proc
            | Tracer::Cis490Perf
            | Tracer::Cis490Served) => {
                let mut c = Command::new(&self.cis490);
                c.args(["trace", "--target-pid", &pid.to_string()]);
                if t == Tracer::Cis490Served {
                    let socket = self
                        .server
                        .as_ref()
                        .context("cis490 --server runs in the scaling part only")?;
                    c.arg("--server").arg(socket);
                }
                if let Some(Some(sources)) = t.cis490_sources() {
                    c.args(["--sources", sources]);
                }
                if t == Tracer::Cis490Wakeups {
                    c.arg("--wakeups");
                }
                c.args([
                    "--interval-ms",
                    &INTERVAL_MS.to_string(),
                    "--progress-secs",
                    "0",
                ])
                .arg("--data-dir")
                .arg(dir.join("data"));
                if let Some(k) = self.ringbuf_kib {
                    c.args(["--ringbuf-kib", &k.to_string()]);
                }
                c
            }
            Tracer::Bpftrace => {
                let script = bpftrace_script(pid, self.block_tps);
                fs::write(dir.join("peer.bt"), &script)?;
                let mut c = Command::new(&self.bpftrace);
                c.args(["-B", "line", "-o"])
                    .arg(dir.join("bpftrace.out"))
                    .arg(dir.join("peer.bt"));
                c
            }
            Tracer::Proc => {
                let mut c = Command::new(self.bin.join("cis490-proc-poller"));
                c.args([
                    "--pid",
                    &pid.to_string(),
                    "--interval-ms",
                    &INTERVAL_MS.to_string(),
                ])
                .arg("--out")
                .arg(dir.join("proc.jsonl"));
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout()?)
            .stderr(stderr()?)
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let mut r = Running {
            tracer,
            child,
            dir: dir.to_owned(),
        };
        r.wait_ready(Duration::from_secs(60))?;
        Ok(Some(r))
    }
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn is_ready(&self) -> bool {
        match self.tracer {
            Tracer::None => true,
            Tracer::Cis490
            | Tracer::Cis490Wakeups
            | Tracer::Cis490Ebpf
            | Tracer::Cis490Proc
            | Tracer::Cis490Perf
            | Tracer::Cis490Served => {
                cis490_tests::started_episode(&self.dir.join("data")).is_some()
            }
            Tracer::Bpftrace => {
                fs::read_to_string(self.dir.join("bpftrace.out")).is_ok_and(|t| t.contains("tick"))
            }
            Tracer::Proc => self.dir.join("proc.jsonl.ready").exists(),
        }
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        while !self.is_ready() {
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "{} exited ({st}) before it was ready: {}",
                    self.tracer.name(),
                    self.stderr_tail()
                );
            }
            if t0.elapsed() > timeout {
                bail!(
                    "{} not ready within {timeout:?}: {}",
                    self.tracer.name(),
                    self.stderr_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    fn stderr_tail(&self) -> String {
        let t = fs::read_to_string(self.dir.join("tracer.stderr")).unwrap_or_default();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// Ends the tracer once the workload has exited (cis490 and the poller
    /// stop by themselves when the target is gone; bpftrace gets SIGINT)
    /// and collects what it reported.
    pub fn finish(mut self) -> Result<Outcome> {
        if self.tracer == Tracer::Bpftrace {
            signal(self.pid(), libc::SIGINT)?;
        }
        let usage = measure::wait_usage(&mut self.child, Duration::from_secs(60))?;
        if usage.code != 0 {
            bail!(
                "{} exited with code {}: {}",
                self.tracer.name(),
                usage.code,
                self.stderr_tail()
            );
        }
        let mut o = Outcome {
            usage,
            ..Outcome::default()
        };
        match self.tracer {
            t if t.is_cis490() => {
                let stdout = fs::read_to_string(self.dir.join("tracer.stdout"))?;
                let ep = PathBuf::from(
                    stdout
                        .lines()
                        .last()
                        .context("cis490 printed no episode")?
                        .trim(),
                );
                if !ep.join("done.marker").exists() {
                    bail!("cis490's episode {} is incomplete", ep.display());
                }
                let meta: Value = serde_json::from_slice(&fs::read(ep.join("meta.json"))?)?;
                o.events = meta["ebpf"]["events"].as_u64();
                o.records = meta["ebpf"]["records_received"].as_u64();
                o.dropped = meta["ebpf"]["dropped_events"].as_u64();
                o.ringbuf_bytes = meta["ebpf"]["ringbuf_bytes"].as_u64();
                o.meta = Some(meta);
            }
            Tracer::Bpftrace => {
                let out = fs::read_to_string(self.dir.join("bpftrace.out")).unwrap_or_default();
                let err = fs::read_to_string(self.dir.join("tracer.stderr")).unwrap_or_default();
                o.events = out
                    .lines()
                    .rev()
                    .find_map(|l| l.strip_prefix("@events: "))
                    .and_then(|v| v.trim().parse().ok())
                    .or(Some(0));
                o.lost = Some(
                    out.lines()
                        .chain(err.lines())
                        .filter_map(|l| {
                            let l = l.trim();
                            l.strip_prefix("Lost ")?
                                .split_whitespace()
                                .next()?
                                .parse::<u64>()
                                .ok()
                        })
                        .sum(),
                );
            }
            _ => {}
        }
        Ok(o)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Only when a run failed half-way.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The bpftrace peer: what cis490's scheduler and block families count,
/// for one process, the way bpftrace's own tools (runqlat, biolatency) do
/// it: switches and wakeups of its threads (a thread is known by its tid
/// once it has run; classic tracepoints give only the woken or next
/// thread's tid), run-queue latency from wakeup or preemption to switch-in
/// (a histogram), thread starts and exits, block requests started by the
/// process with their bytes and latency (a histogram). Every hit on the
/// process counts in `@events`. Printed every 100 ms, like rows.
pub fn bpftrace_script(pid: u32, (blk_start, blk_done): (&str, &str)) -> String {
    format!(
        r#"// cis490 bench peer: scheduler and block events of process {pid}.
tracepoint:sched:sched_switch
{{
  $in = @tids[args->next_pid];
  if (pid == {pid} || $in) {{
    @events = count();
    if (pid == {pid}) {{
      @tids[tid] = 1;
      @switches = count();
      if (args->prev_state == 0) {{ @queued[tid] = nsecs; }}
    }}
    if ($in) {{
      $t = @queued[args->next_pid];
      if ($t) {{
        @runq_ns = hist(nsecs - $t);
        delete(@queued[args->next_pid]);
      }}
    }}
  }}
}}

tracepoint:sched:sched_wakeup, tracepoint:sched:sched_wakeup_new
/@tids[args->pid]/
{{
  @events = count();
  @wakeups = count();
  @queued[args->pid] = nsecs;
}}

tracepoint:sched:sched_process_fork
/pid == {pid}/
{{
  @events = count();
  @threads_started = count();
  @tids[args->child_pid] = 1;
}}

tracepoint:sched:sched_process_exit
/pid == {pid}/
{{
  @events = count();
  @threads_exited = count();
  delete(@tids[tid]);
  delete(@queued[tid]);
}}

tracepoint:block:{blk_start}
/pid == {pid}/
{{
  @events = count();
  @blk_start[args->dev, args->sector] = nsecs;
  @blk_bytes = sum(args->bytes);
}}

tracepoint:block:{blk_done}
/@blk_start[args->dev, args->sector]/
{{
  @events = count();
  @blk_ops = count();
  @blk_lat_ns = hist(nsecs - @blk_start[args->dev, args->sector]);
  delete(@blk_start[args->dev, args->sector]);
}}

interval:ms:{INTERVAL_MS}
{{
  printf("tick %lld\n", nsecs);
  print(@switches);
  print(@wakeups);
  print(@blk_ops);
  print(@blk_bytes);
}}

END
{{
  clear(@tids);
  clear(@queued);
  clear(@blk_start);
}}
"#
    )
}
