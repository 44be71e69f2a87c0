//! `cargo xtask bench`: cis490's overhead beside bpftrace's and a /proc
//! poller's, measured side by side in one run, on eight workloads; writes
//! the table into `docs/benchmarks.md` and prints it.
//!
//! Each round runs every workload once untraced and once under each tracer,
//! in an order that rotates from round to round; each run starts the
//! workload held, attaches the tracer, reads the tracer's CPU time, releases
//! the workload, reads the tracer's CPU time again when the work is done,
//! and lets everything end. Medians over the rounds. Then a second pass with
//! the kernel's BPF statistics on (they add two clock reads to every BPF
//! program run, so the timed rounds run without them) measures the BPF
//! programs' own run time, and a loss check runs cis490 with a deliberately
//! tiny ring buffer against a thread burst.

mod gateway;
mod measure;
mod report;
mod scaling;
mod tracers;
mod workloads;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use cis490_tests::guest::GuestJson;

use measure::{BpfRun, BpfStats};
use tracers::{Outcome, Setup, Tracer};
pub use workloads::Kind;
use workloads::{Env, Sizes};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Timed rounds (each runs every workload untraced and under every tracer).
    #[arg(long, value_name = "N", default_value_t = 7,
          value_parser = clap::value_parser!(u32).range(1..=50))]
    pub rounds: u32,
    /// Smaller workloads and 2 rounds (unless --rounds is given): for development.
    #[arg(long)]
    pub quick: bool,
    /// Workloads to run, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST")]
    pub workloads: Vec<Kind>,
    /// Tracers to compare, comma-separated (default: all; `none` is always run).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "LIST")]
    pub tracers: Vec<Tracer>,
    /// Skip the BPF-statistics pass.
    #[arg(long)]
    pub no_bpf_stats: bool,
    /// Skip the ring-buffer loss check.
    #[arg(long)]
    pub no_loss_check: bool,
    /// Skip the gateway part (the gateway collector beside tcpdump on a
    /// frame flood at a bridge).
    #[arg(long, conflicts_with = "gateway_only")]
    pub no_gateway: bool,
    /// Run the gateway part only; it rewrites its own section of --out and
    /// leaves the workloads' section as it was.
    #[arg(long)]
    pub gateway_only: bool,
    /// Skip the scaling part (the pinned storm while other targets are
    /// traced too: each by a standalone cis490, then all through one
    /// server).
    #[arg(long, conflicts_with = "scaling_only")]
    pub no_scaling: bool,
    /// Run the scaling part only; it rewrites its own section of --out.
    #[arg(long, conflicts_with = "gateway_only")]
    pub scaling_only: bool,
    /// The scaling part's counts of other targets (idle processes): it runs
    /// with none, then with each of these, every one traced by a
    /// standalone `cis490 trace`, then all through one `cis490 serve`.
    #[arg(long, value_name = "N,...", value_delimiter = ',', default_value = "8,32",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub scaling_others: Vec<u32>,
    /// Rounds of the scaling part's paired comparison (through the server,
    /// the traced storm with no other target and with the most, alternated
    /// within each round). 11 or more give an interval of the median at
    /// 98.8% from the 2nd and the next-to-last differences.
    #[arg(long, value_name = "N", default_value_t = 11,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub scaling_paired_rounds: u32,
    /// Wait (up to this many minutes) until the 1-minute load average is
    /// below --quiet-load before starting.
    #[arg(long, value_name = "MIN", default_value_t = 0)]
    pub wait_quiet_min: u64,
    /// The load average --wait-quiet-min waits for.
    #[arg(long, value_name = "LOAD", default_value_t = 0.6)]
    pub quiet_load: f64,
    /// Benchmark this cis490 binary instead of the one built here (e.g. an
    /// older build, for a before/after comparison; it must accept
    /// `--ringbuf-kib` unless --no-loss-check is given).
    #[arg(long, value_name = "PATH")]
    pub cis490_bin: Option<PathBuf>,
    /// The Markdown file whose generated section receives the table.
    #[arg(long, value_name = "PATH", default_value = "docs/benchmarks.md")]
    pub out: PathBuf,
}

/// One run: a workload under one tracer (or none).
#[derive(Clone, Debug)]
pub struct Run {
    pub round: u32,
    /// The BPF-statistics pass (not used for timing).
    pub stats_pass: bool,
    pub kind: Kind,
    pub tracer: Tracer,
    pub work_ns: u64,
    pub rate: Option<f64>,
    /// Release to end of work, as the bench saw it.
    pub window_ns: u64,
    /// The workload's own CPU time in that window (its process CPU clock).
    pub work_cpu_ns: Option<u64>,
    /// The tracer's CPU time in that window.
    pub tracer_cpu_ns: Option<u64>,
    /// Its BPF programs' run time and runs in that window (statistics on).
    pub bpf: Option<BpfRun>,
    pub outcome: Option<Outcome>,
}

/// The ring-buffer loss check.
#[derive(Clone, Debug)]
pub struct LossCheck {
    pub ringbuf_bytes: u64,
    pub threads: u64,
    pub expected: u64,
    pub received: u64,
    pub dropped: u64,
    pub drops_events: u64,
}

/// Everything the report needs.
pub struct Results {
    pub command: String,
    /// `--cis490-bin`, when another binary was benchmarked.
    pub cis490_bin: Option<String>,
    pub started_utc: String,
    pub load_start: f64,
    pub load_end: f64,
    pub rounds: u32,
    pub sizes: Sizes,
    pub kinds: Vec<Kind>,
    pub tracers: Vec<Tracer>,
    pub runs: Vec<Run>,
    pub failures: Vec<String>,
    pub skipped: Vec<String>,
    pub loss: Option<std::result::Result<LossCheck, String>>,
    pub machine: report::Machine,
    pub elapsed: Duration,
}

pub fn run(args: Args, bin: &Path, guest: Option<Result<GuestJson>>) -> Result<()> {
    let t_start = Instant::now();
    let command = format!(
        "cargo xtask {}",
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    let rounds = if args.quick && !std::env::args().any(|a| a.starts_with("--rounds")) {
        2
    } else {
        args.rounds
    };
    let mut kinds = if args.workloads.is_empty() {
        Kind::ALL.to_vec()
    } else {
        args.workloads.clone()
    };
    kinds.sort();
    kinds.dedup();
    let mut tracers = if args.tracers.is_empty() {
        Tracer::ALL.to_vec()
    } else {
        args.tracers.clone()
    };
    if args.scaling_only {
        tracers = vec![Tracer::Cis490];
        kinds = vec![Kind::Storm];
    }
    tracers.push(Tracer::None);
    tracers.sort();
    tracers.dedup();

    let gw_frames = if args.quick { 50_000 } else { 300_000 };
    let cis490 = args
        .cis490_bin
        .clone()
        .unwrap_or_else(|| bin.join("cis490"));
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        crate::workspace_root().join(&args.out)
    };
    let scratch = std::env::temp_dir().join(format!("cis490-bench-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    measure::restore_on_signal();
    let run_gateway = |failures: &mut Vec<String>| -> Result<()> {
        eprintln!("bench: the gateway part: {rounds} round(s) of a {gw_frames}-frame flood");
        let when = utc_now();
        let g = gateway::run(bin, &cis490, gw_frames, rounds, &scratch)?;
        let text = gateway::render(&g, &command, &when);
        println!("{text}");
        report::write_between(&out, report::GW_BEGIN, report::GW_END, &text)?;
        eprintln!("bench: wrote the gateway section of {}", out.display());
        failures.extend(g.failures);
        Ok(())
    };
    if args.gateway_only {
        let mut failures = Vec::new();
        run_gateway(&mut failures)?;
        let _ = fs::remove_dir_all(&scratch);
        if !failures.is_empty() {
            bail!("{} gateway run(s) failed (see the table)", failures.len());
        }
        return Ok(());
    }

    ensure_tracefs()?;
    let bpftrace = if tracers.contains(&Tracer::Bpftrace) {
        ensure_bpftrace()?
    } else {
        PathBuf::from("bpftrace")
    };

    let mut skipped = Vec::new();
    let guest = match guest {
        Some(Ok(g)) => Some(g),
        Some(Err(e)) => {
            skipped.push(format!("qemu: no QEMU guest here ({e:#})"));
            kinds.retain(|k| *k != Kind::Qemu);
            None
        }
        None => None,
    };
    wait_quiet(args.wait_quiet_min, args.quiet_load);
    let machine = report::Machine::current(&bpftrace);
    let load_start = measure::loadavg();
    let started_utc = utc_now();
    let env = Env::new(bin, sizes, &kinds, guest)?;
    let setup = Setup {
        bin: bin.to_owned(),
        cis490: cis490.clone(),
        bpftrace,
        ringbuf_kib: None,
        block_tps: if Path::new("/sys/kernel/tracing/events/block/block_io_start").exists() {
            ("block_io_start", "block_io_done")
        } else {
            ("block_rq_issue", "block_rq_complete")
        },
        server: None,
    };
    eprintln!(
        "bench: {} round(s) of {} x {}; scratch {}",
        rounds,
        kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(","),
        tracers
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(","),
        scratch.display()
    );

    let mut scaling_counts = vec![0usize];
    scaling_counts.extend(args.scaling_others.iter().map(|&n| n as usize));
    scaling_counts.sort();
    scaling_counts.dedup();
    let run_scaling = |failures: &mut Vec<String>| -> Result<()> {
        eprintln!(
            "bench: the scaling part: the pinned storm with {scaling_counts:?} other traced targets"
        );
        let when = utc_now();
        let s = scaling::run(
            &env,
            &setup,
            &scaling_counts,
            (rounds, args.scaling_paired_rounds),
            &scratch,
        )?;
        let text = scaling::render(&s, &command, &when);
        println!("{text}");
        report::write_between(&out, report::SCALE_BEGIN, report::SCALE_END, &text)?;
        eprintln!("bench: wrote the scaling section of {}", out.display());
        failures.extend(s.failures);
        Ok(())
    };
    if args.scaling_only {
        let mut failures = Vec::new();
        run_scaling(&mut failures)?;
        drop(env);
        let _ = fs::remove_dir_all(&scratch);
        if !failures.is_empty() {
            bail!("{} scaling run(s) failed (see the table)", failures.len());
        }
        return Ok(());
    }

    let mut runs = Vec::new();
    let mut failures = Vec::new();
    let mut n = 0usize;
    for round in 0..rounds {
        for (ki, &kind) in kinds.iter().enumerate() {
            // Rotate the order so no tracer always runs first or last.
            let mut order = tracers.clone();
            order.rotate_left((round as usize + ki) % tracers.len());
            for tracer in order {
                n += 1;
                let dir = scratch.join(format!("{n:03}-r{round}-{}-{}", kind.name(), slug(tracer)));
                match run_once(&env, &setup, kind, tracer, &dir, round, false) {
                    Ok(r) => {
                        eprintln!("bench: round {}/{rounds} {}", round + 1, progress_line(&r));
                        runs.push(r);
                    }
                    Err(e) => {
                        let msg = format!(
                            "round {} {} {}: {e:#}",
                            round + 1,
                            kind.name(),
                            tracer.name()
                        );
                        eprintln!("bench: FAILED {msg}");
                        failures.push(msg);
                    }
                }
                settle();
            }
        }
    }

    if !args.no_bpf_stats && tracers.iter().any(|t| t.is_bpf()) {
        let stats = BpfStats::enable()?;
        eprintln!("bench: BPF statistics on (kernel.bpf_stats_enabled=1) for the statistics pass");
        for &kind in &kinds {
            for &tracer in tracers.iter().filter(|t| t.is_bpf()) {
                n += 1;
                let dir = scratch.join(format!("{n:03}-stats-{}-{}", kind.name(), slug(tracer)));
                match run_once(&env, &setup, kind, tracer, &dir, rounds, true) {
                    Ok(r) => {
                        eprintln!("bench: stats pass {}", progress_line(&r));
                        runs.push(r);
                    }
                    Err(e) => {
                        let msg =
                            format!("statistics pass {} {}: {e:#}", kind.name(), tracer.name());
                        eprintln!("bench: FAILED {msg}");
                        failures.push(msg);
                    }
                }
                settle();
            }
        }
        drop(stats);
        eprintln!("bench: BPF statistics restored");
    }

    let loss = (!args.no_loss_check && tracers.contains(&Tracer::Cis490))
        .then(|| loss_check(&setup, &scratch.join("loss")).map_err(|e| format!("{e:#}")));
    if let Some(Err(e)) = &loss {
        eprintln!("bench: loss check FAILED: {e}");
    }
    if !args.no_scaling
        && let Err(e) = run_scaling(&mut failures)
    {
        failures.push(format!("the scaling part: {e:#}"));
    }
    drop(env);

    let mut gw_failures = Vec::new();
    if !args.no_gateway
        && let Err(e) = run_gateway(&mut gw_failures)
    {
        gw_failures.push(format!("the gateway part: {e:#}"));
    }
    failures.extend(gw_failures);

    let results = Results {
        command,
        cis490_bin: args.cis490_bin.as_ref().map(|p| p.display().to_string()),
        started_utc,
        load_start,
        load_end: measure::loadavg(),
        rounds,
        sizes,
        kinds,
        tracers,
        runs,
        failures,
        skipped,
        loss,
        machine,
        elapsed: t_start.elapsed(),
    };
    let text = report::render(&results);
    println!("{text}");
    report::write_section(&out, &text)?;
    eprintln!(
        "bench: wrote {} ({:.0} s)",
        out.display(),
        t_start.elapsed().as_secs_f64()
    );
    let _ = fs::remove_dir_all(&scratch);
    if !results.failures.is_empty() {
        bail!("{} run(s) failed (see the table)", results.failures.len());
    }
    Ok(())
}

fn slug(t: Tracer) -> &'static str {
    match t {
        Tracer::Proc => "proc",
        t => t.name(),
    }
}

/// A pause between runs, so one run's tail (a tracer's exit, writeback)
/// does not fall into the next.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

fn progress_line(r: &Run) -> String {
    let mut s = format!(
        "{} {}: {:.3} s",
        r.kind.name(),
        r.tracer.name(),
        r.work_ns as f64 / 1e9
    );
    if let Some(rate) = r.rate {
        s += &format!(" ({})", report::rate_text(r.kind, rate));
    }
    if let Some(c) = r.work_cpu_ns {
        s += &format!(", workload CPU {:.3} s", c as f64 / 1e9);
    }
    if let Some(c) = r.tracer_cpu_ns {
        s += &format!(
            ", tracer CPU {:.2}% of a core",
            c as f64 / r.window_ns as f64 * 100.0
        );
    }
    if let Some(e) = r.outcome.as_ref().and_then(|o| o.events) {
        s += &format!(", {:.0} events/s", e as f64 / (r.work_ns as f64 / 1e9));
    }
    if let Some(b) = r.bpf {
        s += &format!(
            ", BPF {} runs, {:.0} ns/run",
            b.run_cnt,
            b.run_time_ns as f64 / b.run_cnt.max(1) as f64
        );
    }
    s
}

#[allow(clippy::too_many_arguments)]
fn run_once(
    env: &Env,
    setup: &Setup,
    kind: Kind,
    tracer: Tracer,
    dir: &Path,
    round: u32,
    stats_pass: bool,
) -> Result<Run> {
    fs::create_dir_all(dir)?;
    let mut held = env.start(kind, dir)?;
    let running = setup.start(tracer, held.pid, dir)?;
    let tpid = running.as_ref().map(|r| r.pid());
    // Let the tracer finish what it does right after attaching.
    std::thread::sleep(Duration::from_millis(150));
    let cpu0 = tpid.map(measure::cpu_ns);
    let bpf0 = tpid.map(measure::bpf_run);
    let wcpu0 = measure::process_cpu_ns(held.pid);
    let t0 = Instant::now();
    held.release()?;
    let timeout = if kind == Kind::Qemu {
        Duration::from_secs(600)
    } else {
        Duration::from_secs(180)
    };
    let done = held.wait_work(timeout)?;
    let window_ns = t0.elapsed().as_nanos() as u64;
    let wcpu1 = measure::process_cpu_ns(held.pid);
    let cpu1 = tpid.map(measure::cpu_ns);
    let bpf1 = tpid.map(measure::bpf_run);
    held.wait_exit(Duration::from_secs(60))?;
    let outcome = running.map(|r| r.finish()).transpose()?;
    fs::write(
        dir.join("workload-report.json"),
        serde_json::to_vec_pretty(&done.report)?,
    )?;
    Ok(Run {
        round,
        stats_pass,
        kind,
        tracer,
        work_ns: done.work_ns,
        rate: done.rate,
        window_ns,
        work_cpu_ns: wcpu0.zip(wcpu1).map(|(a, b)| b.saturating_sub(a)),
        tracer_cpu_ns: cpu0.zip(cpu1).map(|(a, b)| b.saturating_sub(a)),
        bpf: if stats_pass {
            bpf0.zip(bpf1).map(|(a, b)| b.since(a))
        } else {
            None
        },
        outcome,
    })
}

/// cis490 with a 4 KiB ring buffer (one page, about 85 lifecycle records)
/// while the target starts and ends 20000 threads: every record is either
/// received or counted as dropped. The tracer is stopped (SIGSTOP) for the
/// burst and continued after it, so the ring buffer fills and records are
/// dropped on any machine (a fast tracer kept up with a running one: 0
/// dropped on 2026-12-07, and the check proved nothing).
fn loss_check(setup: &Setup, dir: &Path) -> Result<LossCheck> {
    const THREADS: u64 = 20_000;
    fs::create_dir_all(dir)?;
    let out = dir.join("burst.json");
    let mut wl = Command::new(setup.bin.join("cis490-workload"))
        .args(["thread-burst", "--count", &THREADS.to_string(), "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("workload.stderr"))?)
        .spawn()
        .context("cannot start the thread burst")?;
    let mut ready = out.clone().into_os_string();
    ready.push(".ready");
    cis490_tests::wait_for_file(Path::new(&ready), Duration::from_secs(30));
    let tiny = Setup {
        bin: setup.bin.clone(),
        cis490: setup.cis490.clone(),
        bpftrace: setup.bpftrace.clone(),
        ringbuf_kib: Some(4),
        block_tps: setup.block_tps,
        server: None,
    };
    let running = tiny
        .start(Tracer::Cis490, wl.id(), dir)?
        .context("cis490 did not start")?;
    measure::signal(running.pid(), libc::SIGSTOP)?;
    measure::signal(wl.id(), libc::SIGUSR1)?;
    let u = measure::wait_usage(&mut wl, Duration::from_secs(120));
    measure::signal(running.pid(), libc::SIGCONT)?;
    let u = u?;
    if u.code != 0 {
        bail!("the thread burst failed (code {})", u.code);
    }
    let o = running.finish()?;
    let meta = o.meta.context("no meta.json")?;
    let stdout = fs::read_to_string(dir.join("tracer.stdout"))?;
    let ep = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    let drops_events = fs::read_to_string(ep.join("events.jsonl"))?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "drops")
        .filter_map(|v| v["dropped_records"].as_u64())
        .sum();
    let check = LossCheck {
        ringbuf_bytes: meta["ebpf"]["ringbuf_bytes"].as_u64().unwrap_or(0),
        threads: THREADS,
        // One start and one exit record per thread, plus the main thread's exit.
        expected: 2 * THREADS + 1,
        received: o.records.unwrap_or(0),
        dropped: o.dropped.unwrap_or(0),
        drops_events,
    };
    eprintln!(
        "bench: loss check: {} KiB ring buffer, {} records expected, {} received + {} dropped = {}",
        check.ringbuf_bytes / 1024,
        check.expected,
        check.received,
        check.dropped,
        check.received + check.dropped
    );
    Ok(check)
}

/// bpftrace's classic tracepoints need tracefs.
fn ensure_tracefs() -> Result<()> {
    if Path::new("/sys/kernel/tracing/events").exists() {
        return Ok(());
    }
    eprintln!("bench: mounting tracefs at /sys/kernel/tracing");
    crate::run(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
        .context("cannot mount tracefs (bpftrace needs it)")
}

/// Debian's bpftrace, installed with apt if missing.
fn ensure_bpftrace() -> Result<PathBuf> {
    let find = || {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
            .map(|d| d.join("bpftrace"))
            .find(|p| p.is_file())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    eprintln!(
        "bench: installing bpftrace (apt-get install bpftrace), the peer it compares against"
    );
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !apt(&["install", "-y", "--no-install-recommends", "bpftrace"]) {
        let _ = apt(&["update"]);
        if !apt(&["install", "-y", "--no-install-recommends", "bpftrace"]) {
            bail!(
                "cannot install bpftrace with apt-get: install Debian's bpftrace package and rerun"
            );
        }
    }
    find().context("bpftrace was installed but is not on PATH")
}

/// Waits (up to `minutes`) until the 1-minute load average is below `load`.
fn wait_quiet(minutes: u64, load: f64) {
    if minutes == 0 {
        return;
    }
    let t0 = Instant::now();
    let mut last = Instant::now() - Duration::from_secs(60);
    loop {
        let l = measure::loadavg();
        if l < load {
            eprintln!("bench: load average {l:.2} < {load}: starting");
            return;
        }
        if t0.elapsed() > Duration::from_secs(minutes * 60) {
            eprintln!(
                "bench: load average still {l:.2} after {minutes} min: starting anyway (the table records it)"
            );
            return;
        }
        if last.elapsed() >= Duration::from_secs(30) {
            eprintln!("bench: waiting for a quiet machine: load average {l:.2} (want < {load})");
            last = Instant::now();
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
