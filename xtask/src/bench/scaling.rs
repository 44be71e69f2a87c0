//! What many traced VMs cost a host today: the pinned context-switch storm,
//! untraced and under `cis490 trace` as users run it, while 0 and then
//! `--scaling-others` other targets (idle `sleep` processes, standing in
//! for the lab's other VMs) are each traced by a standalone `cis490 trace`
//! of their own (the default command, as a lab runs one per VM today).
//!
//! Each standalone tracer loads and attaches its own programs, and the
//! scheduler programs of every one run on every context switch of the
//! machine, the storm's included: the storm's CPU time grows with the
//! number of tracers even when none of them traces it. The figures are
//! the storm's own CPU time (medians over the rounds; the storm is pinned,
//! so the other tracers' user-space work on the other CPU does not count)
//! and, from a pass with the kernel's BPF statistics on, the run time of
//! every tracer's programs per storm round trip.

use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result};

use super::{
    measure::{self, BpfRun, BpfStats, median},
    run_once, settle,
    tracers::{Running, Setup, Tracer},
    workloads::{Env, Kind},
};

/// One storm run with `others` standalone tracers on idle targets.
#[derive(Clone, Debug)]
pub struct ScaleRun {
    pub others: usize,
    pub traced: bool,
    pub stats_pass: bool,
    pub work_cpu_ns: Option<u64>,
    pub round_trips: u64,
    /// Every tracer's programs (the storm's own and the others'), in the
    /// storm's window; statistics pass only.
    pub bpf: Option<BpfRun>,
}

pub struct Scaling {
    pub counts: Vec<usize>,
    pub rounds: u32,
    pub round_trips: u64,
    pub runs: Vec<ScaleRun>,
    pub failures: Vec<String>,
}

/// Idle targets, each with its standalone tracer.
struct Others {
    sleeps: Vec<Child>,
    tracers: Vec<Running>,
}

impl Others {
    fn start(setup: &Setup, n: usize, dir: &Path) -> Result<Others> {
        let mut o = Others {
            sleeps: Vec::new(),
            tracers: Vec::new(),
        };
        for i in 0..n {
            let sleep = Command::new("sleep")
                .arg("100000")
                .stdin(Stdio::null())
                .spawn()
                .context("cannot start sleep")?;
            let pid = sleep.id();
            o.sleeps.push(sleep);
            let d = dir.join(format!("other-{i}"));
            fs::create_dir_all(&d)?;
            let t = setup
                .start(Tracer::Cis490, pid, &d)?
                .context("a cis490 tracer")?;
            o.tracers.push(t);
        }
        Ok(o)
    }

    fn pids(&self) -> Vec<u32> {
        self.tracers.iter().map(|t| t.pid()).collect()
    }

    /// Ends the idle targets; each tracer then ends its episode (and must
    /// exit 0).
    fn finish(mut self) -> Result<()> {
        for s in &mut self.sleeps {
            let _ = s.kill();
            let _ = s.wait();
        }
        for t in self.tracers.drain(..) {
            t.finish()?;
        }
        Ok(())
    }
}

impl Drop for Others {
    fn drop(&mut self) {
        for s in &mut self.sleeps {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

fn bpf_of(pids: &[u32]) -> BpfRun {
    pids.iter()
        .map(|&p| measure::bpf_run(p))
        .fold(BpfRun::default(), BpfRun::plus)
}

/// Runs the scaling part: for each count of other targets, `rounds` pairs
/// of storms (untraced, traced; the order alternates), then one statistics
/// pass of each.
pub fn run(
    env: &Env,
    setup: &Setup,
    counts: &[usize],
    rounds: u32,
    scratch: &Path,
) -> Result<Scaling> {
    let mut s = Scaling {
        counts: counts.to_vec(),
        rounds,
        round_trips: env.sizes.storm_round_trips,
        runs: Vec::new(),
        failures: Vec::new(),
    };
    let mut n = 0usize;
    for &others in counts {
        let dir = scratch.join(format!("scaling-{others}"));
        fs::create_dir_all(&dir)?;
        let t0 = Instant::now();
        let o = Others::start(setup, others, &dir)?;
        eprintln!(
            "bench: scaling: {others} other target(s), each with its own cis490 trace (ready in {:.1} s)",
            t0.elapsed().as_secs_f64()
        );
        let mut pass = |traced: bool, round: u32, stats_pass: bool| {
            n += 1;
            let d = dir.join(format!(
                "{n:03}-r{round}-{}",
                if traced { "cis490" } else { "untraced" }
            ));
            let tracer = if traced { Tracer::Cis490 } else { Tracer::None };
            // The other tracers' programs, read around the run in the
            // statistics pass only.
            let others_bpf = || stats_pass.then(|| bpf_of(&o.pids()));
            let b0 = others_bpf();
            let r = run_once(env, setup, Kind::Storm, tracer, &d, round, stats_pass);
            let b1 = others_bpf();
            match r {
                Ok(r) => {
                    let bpf = b0
                        .zip(b1)
                        .map(|(b0, b1)| r.bpf.unwrap_or_default().plus(b1.since(b0)));
                    let sr = ScaleRun {
                        others,
                        traced,
                        stats_pass,
                        work_cpu_ns: r.work_cpu_ns,
                        round_trips: s.round_trips,
                        bpf,
                    };
                    eprintln!(
                        "bench: scaling: {others} others, storm {}{}: workload CPU {:.3} s{}",
                        tracer.name(),
                        if stats_pass { " (statistics pass)" } else { "" },
                        sr.work_cpu_ns.unwrap_or(0) as f64 / 1e9,
                        sr.bpf
                            .map(|b| format!(
                                ", BPF {:.0} ns per round trip",
                                b.run_time_ns as f64 / sr.round_trips as f64
                            ))
                            .unwrap_or_default()
                    );
                    s.runs.push(sr);
                }
                Err(e) => {
                    let msg = format!("scaling: {others} others, storm {}: {e:#}", tracer.name());
                    eprintln!("bench: FAILED {msg}");
                    s.failures.push(msg);
                }
            }
            settle();
        };
        for round in 0..rounds {
            let first = round % 2 == 0;
            pass(!first, round, false);
            pass(first, round, false);
        }
        {
            let _stats = BpfStats::enable()?;
            pass(false, rounds, true);
            pass(true, rounds, true);
        }
        if let Err(e) = o.finish() {
            s.failures.push(format!(
                "scaling: {others} others: a standalone tracer: {e:#}"
            ));
        }
    }
    Ok(s)
}

fn cpu_median(s: &Scaling, others: usize, traced: bool) -> Option<(f64, f64, f64)> {
    let v: Vec<f64> = s
        .runs
        .iter()
        .filter(|r| r.others == others && r.traced == traced && !r.stats_pass)
        .filter_map(|r| r.work_cpu_ns.map(|c| c as f64))
        .collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    median(&v).map(|m| (m, lo, hi))
}

fn bpf_per_trip(s: &Scaling, others: usize, traced: bool) -> Option<f64> {
    s.runs
        .iter()
        .find(|r| r.others == others && r.traced == traced && r.stats_pass)
        .and_then(|r| r.bpf)
        .map(|b| b.run_time_ns as f64 / s.round_trips.max(1) as f64)
}

/// The section of docs/benchmarks.md.
pub fn render(s: &Scaling, command: &str, when: &str) -> String {
    let mut t = String::new();
    t += &format!(
        "### Many traced VMs: standalone tracers (today's design)\n\n\
         Generated by `{command}` at {when}: the pinned storm ({} round trips), {} round(s) \
         per row, untraced and under `cis490 trace` (the default sources), while N other \
         targets (idle `sleep` processes) are each traced by a standalone `cis490 trace` of \
         their own. The storm's own CPU time, medians (lowest..highest); the change is against \
         the untraced storm with no other tracer. BPF: the run time of every tracer's programs \
         per round trip, from one run with the kernel's BPF statistics on.\n\n",
        s.round_trips, s.rounds
    );
    t += "| other targets (standalone tracers) | storm untraced: CPU s | change | BPF ns/round trip | storm under cis490: CPU s | change | BPF ns/round trip |\n";
    t += "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    let base = cpu_median(s, s.counts.first().copied().unwrap_or(0), false).map(|m| m.0);
    let cell = |m: Option<(f64, f64, f64)>| match m {
        Some((m, lo, hi)) => format!("{:.3} ({:.3}..{:.3})", m / 1e9, lo / 1e9, hi / 1e9),
        None => "failed".into(),
    };
    let change = |m: Option<(f64, f64, f64)>| match (m, base) {
        (Some((m, lo, hi)), Some(b)) if b > 0.0 => format!(
            "{:+.1}% ({:+.1}..{:+.1})",
            (m / b - 1.0) * 100.0,
            (lo / b - 1.0) * 100.0,
            (hi / b - 1.0) * 100.0
        ),
        _ => "-".into(),
    };
    let ns = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
    for &k in &s.counts {
        let (u, c) = (cpu_median(s, k, false), cpu_median(s, k, true));
        t += &format!(
            "| {k} | {} | {} | {} | {} | {} | {} |\n",
            cell(u),
            change(u),
            ns(bpf_per_trip(s, k, false)),
            cell(c),
            change(c),
            ns(bpf_per_trip(s, k, true))
        );
    }
    if !s.failures.is_empty() {
        t += "\nFailed runs:\n\n";
        for f in &s.failures {
            t += &format!("- {f}\n");
        }
    }
    t
}
