//! What many traced VMs cost a host: the pinned context-switch storm,
//! untraced and traced as users run it, while 0 and then each of
//! `--scaling-others` other targets (idle `sleep` processes, standing in
//! for the lab's other VMs) are traced too, two ways:
//!
//! - standalone: each other target by a `cis490 trace` of its own (the
//!   default command, one per VM), the storm by another. Each loads and
//!   attaches its own programs, and the scheduler programs of every one
//!   run on every context switch of the machine, the storm's included;
//! - served: one `cis490 serve`, every target (the storm's included)
//!   through `cis490 trace --server`. One set of programs: a switch that
//!   involves no target is rejected by the target filter whatever their
//!   number.
//!
//! The figures are the storm's own CPU time (medians over the rounds; the
//! storm is pinned, so the tracers' user-space work on the other CPU does
//! not count) and, from a pass with the kernel's BPF statistics on, the run
//! time of every tracer's programs per storm round trip. The served part
//! also reads the server's resident memory with each count of episodes
//! running, and after they ended, and ends with a paired comparison of the
//! traced storm with none and with the most other targets ([`paired`]).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    measure::{self, BpfRun, BpfStats, median},
    report::Verdict,
    run_once, settle,
    tracers::{Running, Setup, Tracer},
    workloads::{Env, Kind},
};

/// How the targets are traced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A `cis490 trace` per target.
    Standalone,
    /// One `cis490 serve`, a `cis490 trace --server` client per target.
    Served,
}

impl Mode {
    fn tracer(self) -> Tracer {
        match self {
            Mode::Standalone => Tracer::Cis490,
            Mode::Served => Tracer::Cis490Served,
        }
    }
}

/// One storm run with `others` other traced targets.
#[derive(Clone, Debug)]
pub struct ScaleRun {
    pub mode: Mode,
    pub others: usize,
    pub traced: bool,
    pub stats_pass: bool,
    /// A run of the paired comparison (the traced storm with none and with
    /// the most other targets, alternated within each round), kept out of
    /// the main table.
    pub paired: bool,
    pub round: u32,
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
    /// The server's resident memory (KiB) with N other episodes running
    /// (the storm's not), and once they ended.
    pub server_rss: Vec<(usize, u64, u64)>,
    /// The server's resident memory (KiB) after each pair of the paired
    /// comparison (its `most` episodes started and ended once more).
    pub paired_rss: Vec<u64>,
    /// The server's maps' locked kernel memory (bytes), fixed at load.
    pub server_map_bytes: Option<u64>,
    pub max_targets: u32,
    /// Storm runs started so far (numbering their directories).
    pub started: usize,
    pub failures: Vec<String>,
}

/// A `cis490 serve` for the served part, stopped when dropped.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(cis490: &Path, dir: &Path, max_targets: u32) -> Result<Server> {
        fs::create_dir_all(dir)?;
        let socket = dir.join("server.sock");
        let child = Command::new(cis490)
            .arg("serve")
            .arg("--control")
            .arg(&socket)
            .args(["--max-targets", &max_targets.to_string()])
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("server.stdout"))?)
            .stderr(fs::File::create(dir.join("server.stderr"))?)
            .spawn()
            .context("cannot start cis490 serve")?;
        let mut s = Server { child, socket };
        let t0 = Instant::now();
        while !s.socket.exists() {
            if let Some(st) = s.child.try_wait()? {
                bail!("cis490 serve exited ({st}) before it listened");
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("cis490 serve did not listen within 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(s)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, KiB.
    fn rss_kib(&self) -> u64 {
        measure::status_kib(&self.pid().to_string(), "VmRSS").unwrap_or(0)
    }

    /// The locked kernel memory of the maps it holds, bytes.
    fn map_bytes(&self) -> u64 {
        let pid = self.pid();
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            return 0;
        };
        let mut seen = std::collections::BTreeSet::new();
        let mut total = 0;
        for fd in fds.flatten() {
            if !fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-map")
            {
                continue;
            }
            let info = fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            let field = |k: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let (Some(id), Some(bytes)) = (field("map_id:"), field("memlock:"))
                && seen.insert(id)
            {
                total += bytes;
            }
        }
        total
    }

    fn stop(mut self) -> Result<()> {
        super::measure::signal(self.pid(), libc::SIGTERM)?;
        let st = self.child.wait()?;
        if !st.success() {
            bail!("cis490 serve exited with {st}");
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Idle targets, each traced (standalone, or through the server).
struct Others {
    sleeps: Vec<Child>,
    tracers: Vec<Running>,
}

impl Others {
    fn start(setup: &Setup, tracer: Tracer, n: usize, dir: &Path) -> Result<Others> {
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
            let t = setup.start(tracer, pid, &d)?.context("a cis490 tracer")?;
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

/// Runs the scaling part, standalone then served: for each count of other
/// targets, `rounds` pairs of storms (untraced, traced; the order
/// alternates), then one statistics pass of each.
pub fn run(
    env: &Env,
    setup: &Setup,
    counts: &[usize],
    (rounds, paired_rounds): (u32, u32),
    scratch: &Path,
) -> Result<Scaling> {
    let max_targets = counts.iter().max().copied().unwrap_or(0) as u32 + 8;
    let mut s = Scaling {
        counts: counts.to_vec(),
        rounds,
        round_trips: env.sizes.storm_round_trips,
        runs: Vec::new(),
        server_rss: Vec::new(),
        paired_rss: Vec::new(),
        server_map_bytes: None,
        max_targets,
        started: 0,
        failures: Vec::new(),
    };
    for mode in [Mode::Standalone, Mode::Served] {
        let server = match mode {
            Mode::Standalone => None,
            Mode::Served => Some(Server::start(
                &setup.cis490,
                &scratch.join("scaling-server"),
                max_targets,
            )?),
        };
        let setup = Setup {
            bin: setup.bin.clone(),
            cis490: setup.cis490.clone(),
            bpftrace: setup.bpftrace.clone(),
            ringbuf_kib: setup.ringbuf_kib,
            block_tps: setup.block_tps,
            server: server.as_ref().map(|s| s.socket.clone()),
        };
        if let Some(sv) = &server {
            s.server_map_bytes = Some(sv.map_bytes());
        }
        for &others in counts {
            let dir = scratch.join(format!("scaling-{mode:?}-{others}"));
            fs::create_dir_all(&dir)?;
            let t0 = Instant::now();
            let o = Others::start(&setup, mode.tracer(), others, &dir)?;
            eprintln!(
                "bench: scaling: {others} other target(s), {mode:?} (ready in {:.1} s)",
                t0.elapsed().as_secs_f64()
            );
            let rss_running = server.as_ref().map(|sv| sv.rss_kib());
            // Whose programs run: the other tracers', or the server's.
            let bpf_pids: Vec<u32> = match &server {
                Some(sv) => vec![sv.pid()],
                None => o.pids(),
            };
            let mut pass = |traced: bool, round: u32, stats_pass: bool| {
                let key = RunKey {
                    mode,
                    others,
                    traced,
                    stats_pass,
                    paired: false,
                };
                storm(&mut s, env, &setup, &dir, &bpf_pids, key, round);
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
                    "scaling: {mode:?}, {others} others: a tracer: {e:#}"
                ));
            }
            if let (Some(sv), Some(running)) = (&server, rss_running) {
                std::thread::sleep(Duration::from_millis(300));
                s.server_rss.push((others, running, sv.rss_kib()));
            }
        }
        if let Some(sv) = &server
            && let Some(&most) = counts.last()
            && most > 0
        {
            paired(&mut s, env, &setup, sv, most, paired_rounds, scratch)?;
        }
        if let Some(sv) = server
            && let Err(e) = sv.stop()
        {
            s.failures.push(format!("scaling: the server: {e:#}"));
        }
    }
    Ok(s)
}

/// What one storm run is: how traced, beside how many other targets, and
/// for which table.
#[derive(Clone, Copy)]
struct RunKey {
    mode: Mode,
    others: usize,
    traced: bool,
    stats_pass: bool,
    paired: bool,
}

/// One storm run, its result pushed to `s` (or its failure). In a
/// statistics pass the programs of `bpf_pids` (the other tracers, or the
/// server) are read around it and added to the storm's own tracer's.
fn storm(
    s: &mut Scaling,
    env: &Env,
    setup: &Setup,
    dir: &Path,
    bpf_pids: &[u32],
    key: RunKey,
    round: u32,
) {
    let RunKey {
        mode,
        others,
        traced,
        stats_pass,
        ..
    } = key;
    s.started += 1;
    let d = dir.join(format!(
        "{:03}-r{round}-{}{}",
        s.started,
        if traced { "cis490" } else { "untraced" },
        if key.paired { "-paired" } else { "" }
    ));
    let tracer = if traced { mode.tracer() } else { Tracer::None };
    let others_bpf = || stats_pass.then(|| bpf_of(bpf_pids));
    let b0 = others_bpf();
    let r = run_once(env, setup, Kind::Storm, tracer, &d, round, stats_pass);
    let b1 = others_bpf();
    match r {
        Ok(r) => {
            let bpf = b0
                .zip(b1)
                .map(|(b0, b1)| r.bpf.unwrap_or_default().plus(b1.since(b0)));
            let sr = ScaleRun {
                mode,
                others,
                traced,
                stats_pass,
                paired: key.paired,
                round,
                work_cpu_ns: r.work_cpu_ns,
                round_trips: s.round_trips,
                bpf,
            };
            eprintln!(
                "bench: scaling: {mode:?}, {others} others, storm {}{}{}: workload CPU {:.3} s{}",
                tracer.name(),
                if key.paired { " (paired)" } else { "" },
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
            let msg = format!(
                "scaling: {mode:?}, {others} others, storm {}: {e:#}",
                tracer.name()
            );
            eprintln!("bench: FAILED {msg}");
            s.failures.push(msg);
        }
    }
    settle();
}

/// How many statistics passes of each side the paired comparison makes.
const PAIRED_STATS_PASSES: u32 = 3;

/// The 1-point target, paired: in each round the traced storm runs through
/// the server with no other target and with `most` (started for that run
/// and ended after it), in an order that alternates, so each round's
/// difference is of two runs a few seconds apart; then
/// [`PAIRED_STATS_PASSES`] such pairs with the BPF statistics on.
fn paired(
    s: &mut Scaling,
    env: &Env,
    setup: &Setup,
    server: &Server,
    most: usize,
    rounds: u32,
    scratch: &Path,
) -> Result<()> {
    let dir = scratch.join("scaling-Served-paired");
    fs::create_dir_all(&dir)?;
    let bpf_pids = [server.pid()];
    eprintln!(
        "bench: scaling: paired, the traced storm through the server with 0 and {most} other \
         targets, alternated in each of {rounds} round(s)"
    );
    let pair = |s: &mut Scaling, round: u32, stats_pass: bool| -> Result<()> {
        let order = if round.is_multiple_of(2) {
            [0, most]
        } else {
            [most, 0]
        };
        for others in order {
            let o = if others > 0 {
                let d = dir.join(format!("others-r{round}"));
                Some(Others::start(setup, Mode::Served.tracer(), others, &d)?)
            } else {
                None
            };
            let key = RunKey {
                mode: Mode::Served,
                others,
                traced: true,
                stats_pass,
                paired: true,
            };
            storm(s, env, setup, &dir, &bpf_pids, key, round);
            if let Some(o) = o
                && let Err(e) = o.finish()
            {
                s.failures
                    .push(format!("scaling: paired, {others} others: a tracer: {e:#}"));
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        s.paired_rss.push(server.rss_kib());
        Ok(())
    };
    for round in 0..rounds {
        pair(s, round, false)?;
    }
    let _stats = BpfStats::enable()?;
    for i in 0..PAIRED_STATS_PASSES {
        pair(s, rounds + i, true)?;
    }
    Ok(())
}

/// Per round of the paired comparison: (the traced storm's CPU time, or
/// its BPF run time per round trip in a statistics pass) with `most`
/// others minus with none, in percentage points of `base_per_trip` (the
/// untraced storm's CPU time per round trip).
fn paired_diffs(s: &Scaling, most: usize, stats_pass: bool, base_per_trip: f64) -> Vec<f64> {
    let runs: Vec<&ScaleRun> = s
        .runs
        .iter()
        .filter(|r| r.paired && r.stats_pass == stats_pass)
        .collect();
    let value = |r: &ScaleRun| -> Option<f64> {
        let trips = r.round_trips.max(1) as f64;
        if stats_pass {
            r.bpf.map(|b| b.run_time_ns as f64 / trips)
        } else {
            r.work_cpu_ns.map(|c| c as f64 / trips)
        }
    };
    let mut rounds: Vec<u32> = runs.iter().map(|r| r.round).collect();
    rounds.sort();
    rounds.dedup();
    rounds
        .into_iter()
        .filter_map(|round| {
            let at = |k: usize| {
                runs.iter()
                    .find(|r| r.round == round && r.others == k)
                    .and_then(|r| value(r))
            };
            Some((at(most)? - at(0)?) / base_per_trip * 100.0)
        })
        .collect()
}

/// A distribution-free interval of the median of `v` (sorted): the
/// order statistics k and n+1-k, k the largest with a confidence of at
/// least 95%; with the confidence it has. None under 6 values.
fn median_interval(v: &[f64]) -> Option<(f64, f64, f64)> {
    let n = v.len();
    if n < 6 {
        return None;
    }
    // P(Binomial(n, 1/2) <= j).
    let cdf = |j: usize| -> f64 {
        let mut c = 1.0f64; // C(n, 0)
        let mut sum = 0.0;
        for i in 0..=j {
            if i > 0 {
                c = c * (n + 1 - i) as f64 / i as f64;
            }
            sum += c;
        }
        sum / 2f64.powi(n as i32)
    };
    let mut k = 1;
    while k < n / 2 && 1.0 - 2.0 * cdf(k) >= 0.95 {
        k += 1;
    }
    let conf = 1.0 - 2.0 * cdf(k - 1);
    (conf >= 0.95).then(|| (v[k - 1], v[n - k], conf))
}

/// The 1-point target (at most 1 percentage point more with the most other
/// targets) for a measured range of differences.
fn one_point(lo: f64, hi: f64) -> &'static str {
    match Verdict::of(lo, hi, 1.0) {
        Verdict::Yes => "yes",
        Verdict::No => "no",
        Verdict::NotShown => "not shown (the range crosses it)",
    }
}

/// The paired comparison's verdict on the 1-point target.
fn paired_paragraph(s: &Scaling, most: usize, base_per_trip: f64) -> String {
    let mut cpu = paired_diffs(s, most, false, base_per_trip);
    let mut bpf = paired_diffs(s, most, true, base_per_trip);
    if cpu.is_empty() {
        return String::new();
    }
    cpu.sort_by(f64::total_cmp);
    bpf.sort_by(f64::total_cmp);
    let list = |v: &[f64]| {
        v.iter()
            .map(|d| format!("{d:+.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (lo, hi) = (cpu[0], cpu[cpu.len() - 1]);
    let mut t = format!(
        "\nPaired, through the server: in each of {} round(s) the traced storm ran with no \
         other target and with {most} (started for that run), in an order that alternates. \
         The storm's CPU time with {most} others minus with none, in percentage points of the \
         untraced storm's, round by round (sorted): {}. Median {:+.2}; per-round range \
         {lo:+.1}..{hi:+.1}: at most 1 point more with {most} others: {}.",
        cpu.len(),
        list(&cpu),
        median(&cpu).unwrap_or(f64::NAN),
        one_point(lo, hi)
    );
    if let Some((a, b, conf)) = median_interval(&cpu) {
        t += &format!(
            " The median's distribution-free {:.1}% interval (order statistics): \
             {a:+.2}..{b:+.2}: {}.",
            conf * 100.0,
            one_point(a, b)
        );
    }
    if !bpf.is_empty() {
        t += &format!(
            " BPF run time per round trip, {} statistics pass(es) of each, paired the same \
             way: {} points: {}.",
            bpf.len(),
            list(&bpf),
            one_point(bpf[0], bpf[bpf.len() - 1])
        );
    }
    t + "\n"
}

fn cpu_median(s: &Scaling, mode: Mode, others: usize, traced: bool) -> Option<(f64, f64, f64)> {
    let v: Vec<f64> = s
        .runs
        .iter()
        .filter(|r| {
            r.mode == mode && r.others == others && r.traced == traced && !r.stats_pass && !r.paired
        })
        .filter_map(|r| r.work_cpu_ns.map(|c| c as f64))
        .collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    median(&v).map(|m| (m, lo, hi))
}

fn bpf_per_trip(s: &Scaling, mode: Mode, others: usize, traced: bool) -> Option<f64> {
    s.runs
        .iter()
        .find(|r| {
            r.mode == mode && r.others == others && r.traced == traced && r.stats_pass && !r.paired
        })
        .and_then(|r| r.bpf)
        .map(|b| b.run_time_ns as f64 / s.round_trips.max(1) as f64)
}

/// The section of docs/benchmarks.md.
pub fn render(s: &Scaling, command: &str, when: &str) -> String {
    let mut t = String::new();
    t += &format!(
        "### Many traced VMs: standalone tracers against one server\n\n\
         Generated by `{command}` at {when}: the pinned storm ({} round trips), {} round(s) \
         per row, untraced and traced with the default sources, while N other targets (idle \
         `sleep` processes) are traced too: standalone, each target (the storm's included) by \
         a `cis490 trace` of its own; served, every target through one `cis490 serve \
         --max-targets {}` (`cis490 trace --server`). The storm's own CPU time, medians \
         (lowest..highest); the change is against the storm with no tracer and no server at all \
         (the standalone part's first row), so the served rows' untraced storm shows what the \
         server's programs cost a process it does not trace. BPF: the run time of every tracer's programs (standalone) or the \
         server's (served) per round trip, from one run with the kernel's BPF statistics on.\n\n",
        s.round_trips, s.rounds, s.max_targets
    );
    let cell = |m: Option<(f64, f64, f64)>| match m {
        Some((m, lo, hi)) => format!("{:.3} ({:.3}..{:.3})", m / 1e9, lo / 1e9, hi / 1e9),
        None => "failed".into(),
    };
    let ns = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into());
    t += "| tracing | other targets | storm untraced: CPU s | change | BPF ns/round trip | storm traced: CPU s | change | BPF ns/round trip |\n";
    t += "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n";
    // One baseline for both parts: the storm with no tracer and no server.
    let base = cpu_median(
        s,
        Mode::Standalone,
        s.counts.first().copied().unwrap_or(0),
        false,
    )
    .map(|m| m.0);
    for mode in [Mode::Standalone, Mode::Served] {
        let change = |m: Option<(f64, f64, f64)>| match (m, base) {
            (Some((m, lo, hi)), Some(b)) if b > 0.0 => format!(
                "{:+.1}% ({:+.1}..{:+.1})",
                (m / b - 1.0) * 100.0,
                (lo / b - 1.0) * 100.0,
                (hi / b - 1.0) * 100.0
            ),
            _ => "-".into(),
        };
        for &k in &s.counts {
            let (u, c) = (cpu_median(s, mode, k, false), cpu_median(s, mode, k, true));
            t += &format!(
                "| {} | {k} | {} | {} | {} | {} | {} | {} |\n",
                match mode {
                    Mode::Standalone => "standalone",
                    Mode::Served => "served",
                },
                cell(u),
                change(u),
                ns(bpf_per_trip(s, mode, k, false)),
                cell(c),
                change(c),
                ns(bpf_per_trip(s, mode, k, true))
            );
        }
    }
    // The target: through the server, the traced storm with the most other
    // targets within 1 percentage point of it with none.
    let (first, last) = (
        s.counts.first().copied().unwrap_or(0),
        s.counts.last().copied().unwrap_or(0),
    );
    if let (Some(b), Some(c0), Some(cn)) = (
        base,
        cpu_median(s, Mode::Served, first, true),
        cpu_median(s, Mode::Served, last, true),
    ) {
        let pp = (cn.0 - c0.0) / b * 100.0;
        let (lo, hi) = ((cn.1 - c0.2) / b * 100.0, (cn.2 - c0.1) / b * 100.0);
        let bpf = bpf_per_trip(s, Mode::Served, last, true)
            .zip(bpf_per_trip(s, Mode::Served, first, true))
            .map(|(a, z)| (a - z) / (b / s.round_trips.max(1) as f64) * 100.0);
        let holds = one_point(lo, hi);
        t += &format!(
            "\nServed, {last} other targets against none, the traced storm: {pp:+.1} percentage \
             points of the untraced storm's CPU time (medians; {lo:+.1}..{hi:+.1} between the \
             extremes of the two rows){}. Within 1 point: {holds}.\n",
            bpf.map(|v| format!(
                "; BPF run time per round trip {v:+.2} points (one statistics pass each)"
            ))
            .unwrap_or_default()
        );
    }
    if let Some(b) = base
        && last > 0
    {
        t += &paired_paragraph(s, last, b / s.round_trips.max(1) as f64);
    }
    if !s.server_rss.is_empty() {
        t += "\nThe server's resident memory (VmRSS) with N other episodes running (their clients idle), and after they ended:\n\n";
        t += "| other episodes | running: KiB | after: KiB |\n| ---: | ---: | ---: |\n";
        for (n, running, after) in &s.server_rss {
            t += &format!("| {n} | {running} | {after} |\n");
        }
        if let (Some(&(0, r0, _)), Some(&(n, rn, _))) = (s.server_rss.first(), s.server_rss.last())
            && n > 0
        {
            t += &format!(
                "\nAbout {:.0} KiB more per running episode ({n} episodes against none).\n",
                rn.saturating_sub(r0) as f64 / n as f64
            );
        }
    }
    if let (Some(lo), Some(hi)) = (s.paired_rss.iter().min(), s.paired_rss.iter().max()) {
        t += &format!(
            "\nAfter each pair of the paired comparison ({} times {} episodes started and \
             ended again): {lo}..{hi} KiB (first {}, last {}).\n",
            s.paired_rss.len(),
            s.counts.last().copied().unwrap_or(0),
            s.paired_rss[0],
            s.paired_rss[s.paired_rss.len() - 1]
        );
    }
    if let Some(b) = s.server_map_bytes {
        t += &format!(
            "\nThe server's maps lock {:.1} MiB of kernel memory, allocated at load for \
             --max-targets {} (it does not grow with the episodes).\n",
            b as f64 / (1024.0 * 1024.0),
            s.max_targets
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

#[cfg(test)]
mod tests {
    use super::median_interval;

    #[test]
    fn the_median_interval_is_of_order_statistics() {
        // n = 11: k = 2 (1 - 2 * 12/2048 = 98.8%); k = 3 would be 93.5%.
        let v: Vec<f64> = (1..=11).map(f64::from).collect();
        let (lo, hi, conf) = median_interval(&v).unwrap();
        assert_eq!((lo, hi), (2.0, 10.0));
        assert!((conf - (1.0 - 24.0 / 2048.0)).abs() < 1e-12);
        // n = 7: only k = 1 reaches 95% (1 - 2/128).
        let v: Vec<f64> = (1..=7).map(f64::from).collect();
        assert_eq!(median_interval(&v).map(|m| (m.0, m.1)), Some((1.0, 7.0)));
        assert!(median_interval(&v[..5]).is_none());
    }
}
