//! The gateway collector's cost on a frame flood, beside tcpdump's on the
//! same flood (the collector the lab's design names for that vantage).
//!
//! A bridge `br0` in a network namespace of its own and one veth "VM" on
//! it in another; the VM sends N Ethernet frames of 64 bytes back to back,
//! broadcast (`cis490-workload send-frames`), which the bridge hands up to
//! its own device, where both the gateway's ingress classifier and
//! tcpdump's packet socket see every one. In alternating rounds (the order
//! rotates) the flood runs untraced, under `cis490 trace --gateway-if br0`
//! as users run it (the default sources plus the gateway, the VM named by
//! its MAC), and under `tcpdump -w /dev/null`. Per run: the sender's CPU
//! time (its syscalls, and the bridge's receive work where the kernel
//! charges it to the sender), the tracer's own process CPU time, and what
//! each counted (cis490: the rows' `gw_out_frames`; tcpdump: its "packets
//! captured"). Then one cis490 run with the kernel's BPF statistics on
//! gives the classifiers' run time per frame (the statistics add two clock
//! reads per run, so the timed rounds run without them).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use cis490_tests::Netns;

use super::measure::{self, BpfRun, BpfStats, median};

/// The bridge in the gateway namespace.
const BRIDGE: &str = "br0";
/// The source MAC of every frame `send-frames` sends (its `HOST_SRC_MAC`):
/// the "VM" the gateway counts.
const VM_MAC: &str = "02:00:00:00:00:02";
/// Bytes per frame, Ethernet header included: the smallest frames are the
/// most per byte, so the per-frame cost shows most.
const FRAME_BYTES: u64 = 64;
/// `prog_type` of a TC classifier (`BPF_PROG_TYPE_SCHED_CLS`).
const SCHED_CLS: u64 = 3;

/// Who watches the bridge during a flood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watcher {
    None,
    /// As users run it: the default sources and the gateway.
    Cis490,
    /// The gateway beside the /proc source only (no eBPF probe families):
    /// the gateway's own cost.
    Cis490Gateway,
    Tcpdump,
}

impl Watcher {
    const ALL: [Watcher; 4] = [
        Watcher::None,
        Watcher::Cis490,
        Watcher::Cis490Gateway,
        Watcher::Tcpdump,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Watcher::None => "untraced",
            Watcher::Cis490 => "cis490 --gateway-if",
            Watcher::Cis490Gateway => "cis490 --gateway-if --sources proc",
            Watcher::Tcpdump => "tcpdump -w",
        }
    }
}

/// One flood.
#[derive(Clone, Debug)]
pub struct FloodRun {
    pub watcher: Watcher,
    pub frames_sent: u64,
    /// The sender's own wall time for the flood.
    pub wall_ns: u64,
    /// The sender's user + system CPU time.
    pub sender_cpu_ns: u64,
    /// The watcher's process CPU time over the flood.
    pub watcher_cpu_ns: Option<u64>,
    /// Frames the watcher counted (cis490: `gw_out_frames` summed over the
    /// rows; tcpdump: "packets received by filter", what the kernel handed
    /// it).
    pub counted: Option<u64>,
    /// tcpdump: "packets captured" (what it had written when SIGINT came).
    pub captured: Option<u64>,
    /// Frames the watcher says it lost (cis490: the gateway rows'
    /// `dropped_events`; tcpdump: "packets dropped by kernel").
    pub lost: Option<u64>,
}

/// The BPF statistics of one cis490 flood.
#[derive(Clone, Copy, Debug)]
pub struct FloodStats {
    pub frames_sent: u64,
    /// The gateway's classifiers (TC programs).
    pub classifiers: BpfRun,
    /// Every program of the tracer (the default sources' too: the network
    /// probes see the bridge's frames as well).
    pub all: BpfRun,
}

/// What the gateway part of the bench measured.
pub struct GatewayResults {
    pub frames: u64,
    pub rounds: u32,
    pub tcpdump: String,
    pub runs: Vec<FloodRun>,
    /// The statistics runs: as users run it, and the gateway alone.
    pub stats: Option<std::result::Result<FloodStats, String>>,
    pub stats_alone: Option<std::result::Result<FloodStats, String>>,
    pub failures: Vec<String>,
}

/// The two namespaces (removed when dropped).
struct Lab {
    gw: Netns,
    vm: Netns,
}

fn lab() -> Lab {
    let lab = Lab {
        gw: Netns::new("bench-gw"),
        vm: Netns::new("bench-vm"),
    };
    for ns in [&lab.gw, &lab.vm] {
        // No IPv6 autoconfiguration frames (MLD, router solicitations) on
        // the bridge during the floods.
        ns.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
        ns.ip(&["link", "set", "lo", "up"]);
    }
    lab.gw.ip(&["link", "add", BRIDGE, "type", "bridge"]);
    lab.gw.ip(&["link", "set", BRIDGE, "up"]);
    lab.gw.ip(&[
        "link", "add", "c490b", "type", "veth", "peer", "name", "eth0", "netns", &lab.vm.0,
    ]);
    lab.gw.ip(&["link", "set", "c490b", "master", BRIDGE, "up"]);
    lab.vm.ip(&["link", "set", "eth0", "address", VM_MAC]);
    lab.vm.ip(&["link", "set", "eth0", "up"]);
    std::thread::sleep(Duration::from_millis(500));
    lab
}

/// A watcher running on the bridge.
struct Watching {
    child: Child,
    /// cis490's flood target (a `sleep`, killed to end the episode).
    target: Option<Child>,
    dir: PathBuf,
}

impl Watching {
    fn start(
        watcher: Watcher,
        lab: &Lab,
        cis490: &Path,
        tcpdump: &Path,
        dir: &Path,
    ) -> Result<Option<Watching>> {
        let stdout = fs::File::create(dir.join("watcher.stdout"))?;
        let stderr = fs::File::create(dir.join("watcher.stderr"))?;
        let (mut cmd, target) = match watcher {
            Watcher::None => return Ok(None),
            Watcher::Cis490 | Watcher::Cis490Gateway => {
                let target = Command::new("sleep")
                    .arg("3600")
                    .spawn()
                    .context("cannot start sleep")?;
                let mut c = Command::new(cis490);
                c.args(["trace", "--target-pid", &target.id().to_string()])
                    .args(["--interval-ms", "100", "--progress-secs", "0"])
                    .args(["--gateway-if", BRIDGE, "--gateway-netns", &lab.gw.0])
                    .args(["--gateway-mac", VM_MAC])
                    .args(if watcher == Watcher::Cis490Gateway {
                        &["--sources", "proc"][..]
                    } else {
                        &[]
                    })
                    .arg("--data-dir")
                    .arg(dir.join("data"));
                (c, Some(target))
            }
            Watcher::Tcpdump => {
                let mut c = lab.gw.cmd(tcpdump);
                c.args([
                    "-i",
                    BRIDGE,
                    "-n",
                    "-s",
                    "256",
                    "-B",
                    "65536",
                    "-w",
                    "/dev/null",
                ]);
                (c, None)
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let mut w = Watching {
            child,
            target,
            dir: dir.to_owned(),
        };
        let t0 = Instant::now();
        while !w.ready(watcher) {
            if let Some(st) = w.child.try_wait()? {
                bail!(
                    "{} exited ({st}) before it was ready: {}",
                    watcher.name(),
                    w.stderr()
                );
            }
            if t0.elapsed() > Duration::from_secs(60) {
                w.kill();
                bail!("{} not ready within 60 s: {}", watcher.name(), w.stderr());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Some(w))
    }

    fn ready(&self, watcher: Watcher) -> bool {
        match watcher {
            Watcher::None => true,
            Watcher::Cis490 | Watcher::Cis490Gateway => {
                cis490_tests::started_episode(&self.dir.join("data")).is_some()
            }
            Watcher::Tcpdump => self.stderr().contains("listening on"),
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("watcher.stderr")).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = &mut self.target {
            let _ = t.kill();
            let _ = t.wait();
        }
    }

    /// Ends the watcher and reads what it counted: (counted, lost,
    /// captured).
    fn finish(mut self, watcher: Watcher) -> Result<(u64, u64, Option<u64>)> {
        match &mut self.target {
            // cis490 ends its episode when its target is gone.
            Some(t) => {
                t.kill()?;
                t.wait()?;
            }
            None => measure::signal(self.pid(), libc::SIGINT)?,
        }
        let u = measure::wait_usage(&mut self.child, Duration::from_secs(60))?;
        if u.code != 0 {
            bail!(
                "{} exited with code {}: {}",
                watcher.name(),
                u.code,
                self.stderr()
            );
        }
        match watcher {
            Watcher::None => Ok((0, 0, None)),
            Watcher::Cis490 | Watcher::Cis490Gateway => {
                let out = fs::read_to_string(self.dir.join("watcher.stdout"))?;
                let ep = PathBuf::from(out.lines().last().unwrap_or_default().trim());
                let rows = fs::read_to_string(ep.join("telemetry-gateway.jsonl"))
                    .with_context(|| format!("no gateway rows in {}", ep.display()))?;
                let (mut counted, mut lost) = (0, 0);
                for line in rows.lines() {
                    let v: serde_json::Value = serde_json::from_str(line)?;
                    counted += v["gw_out_frames"].as_u64().unwrap_or(0);
                    lost += v["dropped_events"].as_u64().unwrap_or(0);
                }
                Ok((counted, lost, None))
            }
            Watcher::Tcpdump => {
                let err = self.stderr();
                let number = |what: &str| {
                    err.lines()
                        .find(|l| l.contains(what))
                        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                        .with_context(|| format!("no \"{what}\" line from tcpdump: {err}"))
                };
                Ok((
                    number("received by filter")?,
                    number("dropped by kernel")?,
                    Some(number("packets captured")?),
                ))
            }
        }
    }
}

/// Sends the flood from the VM; returns (frames sent, wall ns, CPU ns).
fn flood(lab: &Lab, workload: &Path, frames: u64, dir: &Path) -> Result<(u64, u64, u64)> {
    let report = dir.join("send-frames.json");
    let mut child = lab
        .vm
        .cmd(workload)
        .args(["send-frames", "--ifname", "eth0"])
        .args(["--frames", &frames.to_string()])
        .args(["--size", &FRAME_BYTES.to_string()])
        .arg("--out")
        .arg(&report)
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("sender.stderr"))?)
        .spawn()
        .context("cannot start cis490-workload send-frames")?;
    let u = measure::wait_usage(&mut child, Duration::from_secs(300))?;
    if u.code != 0 {
        bail!(
            "send-frames failed (code {}): {}",
            u.code,
            fs::read_to_string(dir.join("sender.stderr")).unwrap_or_default()
        );
    }
    let r: serde_json::Value = serde_json::from_slice(&fs::read(&report)?)?;
    let sent = r["frames_sent"].as_u64().context("no frames_sent")?;
    let wall = r["wall_ns"].as_u64().context("no wall_ns")?;
    Ok((sent, wall, u.user_ns + u.sys_ns))
}

struct Tools<'a> {
    cis490: &'a Path,
    workload: PathBuf,
    tcpdump: PathBuf,
}

fn run_once(
    lab: &Lab,
    tools: &Tools,
    watcher: Watcher,
    frames: u64,
    dir: &Path,
) -> Result<FloodRun> {
    fs::create_dir_all(dir)?;
    let w = Watching::start(watcher, lab, tools.cis490, &tools.tcpdump, dir)?;
    // What a tracer does right after it is ready stays out of the flood.
    std::thread::sleep(Duration::from_millis(150));
    let cpu0 = w.as_ref().map(|w| measure::cpu_ns(w.pid()));
    let sent = flood(lab, &tools.workload, frames, dir);
    let cpu1 = w.as_ref().map(|w| measure::cpu_ns(w.pid()));
    let (frames_sent, wall_ns, sender_cpu_ns) = match sent {
        Ok(s) => s,
        Err(e) => {
            if let Some(mut w) = w {
                w.kill();
            }
            return Err(e);
        }
    };
    let counted = w.map(|w| w.finish(watcher)).transpose()?;
    Ok(FloodRun {
        watcher,
        frames_sent,
        wall_ns,
        sender_cpu_ns,
        watcher_cpu_ns: cpu0.zip(cpu1).map(|(a, b)| b.saturating_sub(a)),
        counted: counted.map(|c| c.0),
        lost: counted.map(|c| c.1),
        captured: counted.and_then(|c| c.2),
    })
}

/// The BPF programs of `pid` whose `prog_type` is `only` (or all).
fn bpf_of(pid: u32, only: Option<u64>) -> BpfRun {
    measure::bpf_run_where(pid, |ty| only.is_none_or(|o| o == ty))
}

fn stats_once(
    lab: &Lab,
    tools: &Tools,
    watcher: Watcher,
    frames: u64,
    dir: &Path,
) -> Result<FloodStats> {
    fs::create_dir_all(dir)?;
    let mut w = Watching::start(watcher, lab, tools.cis490, &tools.tcpdump, dir)?
        .context("cis490 did not start")?;
    std::thread::sleep(Duration::from_millis(150));
    let (c0, a0) = (bpf_of(w.pid(), Some(SCHED_CLS)), bpf_of(w.pid(), None));
    let sent = flood(lab, &tools.workload, frames, dir);
    let (c1, a1) = (bpf_of(w.pid(), Some(SCHED_CLS)), bpf_of(w.pid(), None));
    let (frames_sent, _, _) = match sent {
        Ok(s) => s,
        Err(e) => {
            w.kill();
            return Err(e);
        }
    };
    w.finish(watcher)?;
    if c1.programs == 0 {
        bail!("the tracer had no TC classifier loaded during the flood");
    }
    Ok(FloodStats {
        frames_sent,
        classifiers: c1.since(c0),
        all: a1.since(a0),
    })
}

/// Runs the floods: `rounds` alternating rounds, then the statistics run.
pub fn run(
    bin: &Path,
    cis490: &Path,
    frames: u64,
    rounds: u32,
    scratch: &Path,
) -> Result<GatewayResults> {
    let tcpdump = crate::capture::ensure_tcpdump(&mut crate::guest::Apt::default())?;
    let version = Command::new(&tcpdump)
        .arg("--version")
        .output()
        .map(|o| {
            let all = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&all)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default();
    let tools = Tools {
        cis490,
        workload: bin.join("cis490-workload"),
        tcpdump,
    };
    let lab = lab();
    let mut res = GatewayResults {
        frames,
        rounds,
        tcpdump: version,
        runs: Vec::new(),
        stats: None,
        stats_alone: None,
        failures: Vec::new(),
    };
    let mut n = 0;
    for round in 0..rounds {
        let mut order = Watcher::ALL.to_vec();
        order.rotate_left(round as usize % Watcher::ALL.len());
        for watcher in order {
            n += 1;
            let dir = scratch.join(format!("gw{n:03}-r{round}-{watcher:?}"));
            match run_once(&lab, &tools, watcher, frames, &dir) {
                Ok(r) => {
                    eprintln!(
                        "bench: gateway round {}/{rounds} {}: {} frames in {:.3} s, sender CPU {:.0} ns/frame{}",
                        round + 1,
                        watcher.name(),
                        r.frames_sent,
                        r.wall_ns as f64 / 1e9,
                        r.sender_cpu_ns as f64 / r.frames_sent.max(1) as f64,
                        match (r.watcher_cpu_ns, r.counted) {
                            (Some(c), Some(k)) => format!(
                                ", watcher CPU {:.0} ns/frame, counted {k}",
                                c as f64 / r.frames_sent.max(1) as f64
                            ),
                            _ => String::new(),
                        }
                    );
                    res.runs.push(r);
                }
                Err(e) => {
                    let msg = format!("gateway round {} {}: {e:#}", round + 1, watcher.name());
                    eprintln!("bench: FAILED {msg}");
                    res.failures.push(msg);
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let stats = BpfStats::enable()?;
    let mut one = |w: Watcher| {
        let s = stats_once(
            &lab,
            &tools,
            w,
            frames,
            &scratch.join(format!("gw-stats-{w:?}")),
        );
        if let Err(e) = &s {
            eprintln!("bench: FAILED gateway statistics run ({}): {e:#}", w.name());
            res.failures
                .push(format!("gateway statistics run ({}): {e:#}", w.name()));
        }
        Some(s.map_err(|e| format!("{e:#}")))
    };
    let full = one(Watcher::Cis490);
    let alone = one(Watcher::Cis490Gateway);
    drop(stats);
    res.stats = full;
    res.stats_alone = alone;
    Ok(res)
}

impl GatewayResults {
    fn of(&self, w: Watcher) -> impl Iterator<Item = &FloodRun> {
        self.runs.iter().filter(move |r| r.watcher == w)
    }

    /// Median and range over the rounds of `f` for watcher `w`.
    fn spread(&self, w: Watcher, f: impl Fn(&FloodRun) -> Option<f64>) -> Option<(f64, f64, f64)> {
        let v: Vec<f64> = self.of(w).filter_map(f).collect();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        median(&v).map(|m| (m, lo, hi))
    }
}

fn per_frame(ns: Option<u64>, frames: u64) -> Option<f64> {
    ns.map(|n| n as f64 / frames.max(1) as f64)
}

fn ns_cell(v: Option<(f64, f64, f64)>) -> String {
    match v {
        Some((m, lo, hi)) => format!("{m:.0} ns ({lo:.0} .. {hi:.0})"),
        None => "-".into(),
    }
}

/// The Markdown of the gateway part.
pub fn render(res: &GatewayResults, command: &str, when: &str) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### The gateway collector on a frame flood, beside tcpdump\n\n\
         `{command}`, {when}: {} alternating rounds; each flood is {} broadcast frames of {FRAME_BYTES} B \
         sent back to back by a veth \"VM\" onto a bridge, whose own device hands every one to the \
         watchers (`cis490 trace --gateway-if br0 --gateway-mac {VM_MAC}` with the default sources, \
         the classifiers on TCX or clsact as the kernel has them; {} as `tcpdump -i br0 -n -s 256 -B 65536 \
         -w /dev/null`). Medians over the rounds, range in brackets.\n",
        res.rounds, res.frames, res.tcpdump
    );
    let _ = writeln!(
        s,
        "| per frame | untraced | cis490 --gateway-if (default sources) | cis490 --gateway-if --sources proc | tcpdump -w |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- |");
    let sender = |w| res.spread(w, |r| per_frame(Some(r.sender_cpu_ns), r.frames_sent));
    let watcher = |w| res.spread(w, |r| per_frame(r.watcher_cpu_ns, r.frames_sent));
    let wall = |w| res.spread(w, |r| per_frame(Some(r.wall_ns), r.frames_sent));
    let base = sender(Watcher::None).map(|x| x.0);
    let with_delta = |v: Option<(f64, f64, f64)>| match (v, base) {
        (Some((m, _, _)), Some(b)) if b > 0.0 => {
            format!("{} ({:+.0} ns)", ns_cell(v), m - b)
        }
        _ => ns_cell(v),
    };
    let [none, full, alone, tcpdump] = Watcher::ALL;
    let _ = writeln!(
        s,
        "| the sender's CPU time (its sends, and the bridge's receive work the kernel charges to it) | {} | {} | {} | {} |",
        ns_cell(sender(none)),
        with_delta(sender(full)),
        with_delta(sender(alone)),
        with_delta(sender(tcpdump)),
    );
    let _ = writeln!(
        s,
        "| the sender's wall time | {} | {} | {} | {} |",
        ns_cell(wall(none)),
        ns_cell(wall(full)),
        ns_cell(wall(alone)),
        ns_cell(wall(tcpdump)),
    );
    let _ = writeln!(
        s,
        "| the watcher's own process CPU time | - | {} | {} | {} |",
        ns_cell(watcher(full)),
        ns_cell(watcher(alone)),
        ns_cell(watcher(tcpdump)),
    );
    if let Some(Ok(st)) = &res.stats {
        let per = |b: BpfRun| b.run_time_ns as f64 / st.frames_sent.max(1) as f64;
        let _ = writeln!(
            s,
            "| BPF run time (statistics run, default sources): the gateway's classifiers | - | {:.0} ns ({} runs for {} frames, {:.0} ns per run) | - | - |",
            per(st.classifiers),
            st.classifiers.run_cnt,
            st.frames_sent,
            st.classifiers.run_time_ns as f64 / st.classifiers.run_cnt.max(1) as f64,
        );
        if let Some(Ok(a)) = &res.stats_alone {
            let _ = writeln!(
                s,
                "| BPF run time (statistics run, --sources proc): the gateway's classifiers | - | - | {:.0} ns ({} runs, {:.0} ns per run; every program: {:.0} ns, {} programs) | - |",
                a.classifiers.run_time_ns as f64 / a.frames_sent.max(1) as f64,
                a.classifiers.run_cnt,
                a.classifiers.run_time_ns as f64 / a.classifiers.run_cnt.max(1) as f64,
                a.all.run_time_ns as f64 / a.frames_sent.max(1) as f64,
                a.all.programs,
            );
        }
        let rest = st.all.since(st.classifiers);
        let _ = writeln!(
            s,
            "| BPF run time (same run): the default sources' programs (the network probes run on every packet of the machine; the scheduler's) | - | {:.0} ns ({} runs, {:.1} per frame) | - | - |",
            per(rest),
            rest.run_cnt,
            rest.run_cnt as f64 / st.frames_sent.max(1) as f64,
        );
    }
    let total = |w| {
        let (mut sent, mut counted, mut lost, mut captured) = (0u64, 0u64, 0u64, 0u64);
        for r in res.of(w) {
            sent += r.frames_sent;
            counted += r.counted.unwrap_or(0);
            lost += r.lost.unwrap_or(0);
            captured += r.captured.unwrap_or(0);
        }
        (sent, counted, lost, captured)
    };
    let gw_cell = |w| {
        let (sent, counted, lost, _) = total(w);
        format!("{counted} of {sent} in the rows' `gw_out_frames` ({lost} dropped events)")
    };
    let (ts, tc, tl, tw) = total(tcpdump);
    let _ = writeln!(
        s,
        "| frames counted of frames sent, all rounds | - | {} | {} | {tc} of {ts} received by its filter, {tw} captured when SIGINT stopped it ({tl} dropped by the kernel) |",
        gw_cell(full),
        gw_cell(alone),
    );
    let _ = writeln!(
        s,
        "\nThe classifiers' statistics include their own two clock reads per run. tcpdump's \
         figure is its own process only: the kernel's copy of each frame into its ring happens in \
         the receive path (the sender's row)."
    );
    if !res.failures.is_empty() {
        let _ = writeln!(s, "\nFailed runs:\n");
        for f in &res.failures {
            let _ = writeln!(s, "- {f}");
        }
    }
    s
}
