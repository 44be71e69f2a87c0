//! The eight workloads. Each is started held (so every tracer attaches to
//! the same process before it does anything), released with a signal,
//! and measures itself: the time its fixed amount of work took.
//!
//! - `storm` (and `storm-free`, `storms`, `yields`), `wakeburn`, `dio`, `net`: `cis490-workload` subcommands with
//!   `--wait-signal` (they write `OUT.ready`, wait for SIGUSR1, do the work,
//!   write their report, then linger a little so a tracer's cost can be read
//!   while the target is still alive).
//! - `qemu`: the demo's guest (TCG or KVM, as `guest.json` says) in a
//!   network namespace with a tap and a TCP peer; held by a shell that
//!   stops itself (`kill -STOP $$`) before `exec`ing `ip netns exec ...
//!   qemu-system-x86_64`, so the pid the tracers watch stays the same; its
//!   work ends when the guest prints `cis490-guest: done`.

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use cis490_tests::{
    Netns,
    guest::{GuestJson, create_disk, qemu_argv},
};
use serde_json::Value;

use super::measure::{self, signal};

/// A workload of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Kind {
    /// Context-switch storm: two threads ping-pong one byte over pipes on one CPU.
    Storm,
    /// The same storm left to the scheduler (unpinned: cross-CPU wake-ups).
    StormFree,
    /// Two storms at once in one process, one pinned to each CPU: the most
    /// events per second this machine makes for one target.
    Storms,
    /// Two yield storms at once in one process, one pinned to each CPU: each
    /// pair's threads hand their CPU to each other with `sched_yield` (one
    /// switch per call, no wakeup): the most context switches per second a
    /// process makes here.
    Yields,
    /// Many-thread CPU burn with frequent wakeups (more threads than CPUs).
    Wakeburn,
    /// Direct-I/O block writes, then reads.
    Dio,
    /// Network: Ethernet frames written into a tap.
    Net,
    /// The demo's QEMU guest: boot, direct I/O on its disk, TCP over its tap.
    Qemu,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Storm,
        Kind::StormFree,
        Kind::Storms,
        Kind::Yields,
        Kind::Wakeburn,
        Kind::Dio,
        Kind::Net,
        Kind::Qemu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Storm => "storm",
            Kind::StormFree => "storm-free",
            Kind::Storms => "storms",
            Kind::Yields => "yields",
            Kind::Wakeburn => "wakeburn",
            Kind::Dio => "dio",
            Kind::Net => "net",
            Kind::Qemu => "qemu",
        }
    }
}

/// How much work each workload does (`--quick` makes it smaller).
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    pub storm_round_trips: u64,
    pub storm_free_round_trips: u64,
    pub yield_round_trips: u64,
    pub wakeburn_threads: u32,
    pub wakeburn_cycles: u64,
    pub wakeburn_spin_iters: u64,
    pub dio_mib: u64,
    pub dio_block_kib: u64,
    pub net_frames: u64,
    pub net_frame_bytes: u64,
    pub qemu_disk_mib: u64,
    pub qemu_send_bytes: u64,
}

impl Sizes {
    pub fn full() -> Self {
        Sizes {
            storm_round_trips: 1_000_000,
            storm_free_round_trips: 300_000,
            yield_round_trips: 2_000_000,
            wakeburn_threads: 8,
            wakeburn_cycles: 4_000,
            wakeburn_spin_iters: 8_000,
            dio_mib: 128,
            dio_block_kib: 16,
            net_frames: 2_000_000,
            net_frame_bytes: 1000,
            qemu_disk_mib: 32,
            qemu_send_bytes: 4_000_000,
        }
    }

    pub fn quick() -> Self {
        Sizes {
            storm_round_trips: 300_000,
            storm_free_round_trips: 50_000,
            yield_round_trips: 500_000,
            wakeburn_cycles: 1_200,
            dio_mib: 32,
            net_frames: 500_000,
            qemu_disk_mib: 8,
            qemu_send_bytes: 1_000_000,
            ..Self::full()
        }
    }

    /// One line per workload for the doc: what exactly it does.
    pub fn describe(&self, k: Kind) -> String {
        match k {
            Kind::Storm => format!(
                "`cis490-workload storm --round-trips {}`: two threads pinned to one CPU bounce one byte over two pipes (two context switches per round trip)",
                self.storm_round_trips
            ),
            Kind::StormFree => format!(
                "`cis490-workload storm --round-trips {} --cpus free`: the same, unpinned (the scheduler places the threads: on one CPU or two, from run to run; cross-CPU wake-ups are slow in this VM)",
                self.storm_free_round_trips
            ),
            Kind::Storms => format!(
                "`cis490-workload storm --round-trips {} --pairs 2`: two such pairs in one process, one pinned to each CPU",
                self.storm_round_trips
            ),
            Kind::Yields => format!(
                "`cis490-workload storm --via yield --round-trips {} --pairs 2`: two pairs, one pinned to each CPU, whose two threads hand the CPU to each other with `sched_yield` (a round trip is one yield each: two context switches, no wakeup)",
                self.yield_round_trips
            ),
            Kind::Wakeburn => format!(
                "`cis490-workload wakeburn --threads {} --cycles {} --spin-iters {}`: each thread spins, then sleeps 1 us (plus the timer slack), {} times",
                self.wakeburn_threads,
                self.wakeburn_cycles,
                self.wakeburn_spin_iters,
                self.wakeburn_cycles
            ),
            Kind::Dio => format!(
                "`cis490-workload dio --write-mb {m} --read-mb {m} --block-kb {}`: O_DIRECT writes then reads of a preallocated file on the root filesystem (ext4 on virtio-blk)",
                self.dio_block_kib,
                m = self.dio_mib
            ),
            Kind::Net => format!(
                "`cis490-workload tap --frames {} --size {}`: frames written into a tap (up, in a network namespace) that the host receives",
                self.net_frames, self.net_frame_bytes
            ),
            Kind::Qemu => format!(
                "the demo's QEMU guest: boots, writes and reads {} MiB on its virtio disk (direct I/O, `cache=none`), sends {} bytes over TCP through its tap to a peer; time from release to the guest's `done`",
                self.qemu_disk_mib, self.qemu_send_bytes
            ),
        }
    }
}

/// What the workloads need that outlives one run.
pub struct Env {
    pub bin: PathBuf,
    pub sizes: Sizes,
    /// A directory on a block-device filesystem (for O_DIRECT and QEMU's disk).
    pub disk_dir: PathBuf,
    net: Option<NetEnv>,
    qemu: Option<QemuEnv>,
}

struct NetEnv {
    ns: Netns,
}

struct QemuEnv {
    ns: Netns,
    guest: GuestJson,
    disk: PathBuf,
}

const NET_TAP: &str = "c490bench0";
const QEMU_TAP: &str = "c490benchq";

impl Env {
    pub fn new(bin: &Path, sizes: Sizes, kinds: &[Kind], guest: Option<GuestJson>) -> Result<Env> {
        let disk_dir = PathBuf::from("/var/tmp/cis490-bench");
        fs::create_dir_all(&disk_dir)
            .with_context(|| format!("cannot create {}", disk_dir.display()))?;
        let net = kinds.contains(&Kind::Net).then(|| NetEnv {
            ns: Netns::new("bench-net"),
        });
        let qemu = match (kinds.contains(&Kind::Qemu), guest) {
            (true, Some(guest)) => {
                let ns = Netns::new("bench-qemu");
                ns.ip(&["tuntap", "add", "dev", QEMU_TAP, "mode", "tap"]);
                ns.sh(&format!(
                    "sysctl -q -w net.ipv6.conf.{QEMU_TAP}.disable_ipv6=1"
                ));
                ns.ip(&["addr", "add", "10.98.0.1/24", "dev", QEMU_TAP]);
                ns.ip(&["link", "set", QEMU_TAP, "up"]);
                let disk = disk_dir.join("qemu-disk.img");
                create_disk(&disk, 2 * sizes.qemu_disk_mib as usize)?;
                Some(QemuEnv { ns, guest, disk })
            }
            (true, None) => bail!("the qemu workload needs the QEMU guest"),
            _ => None,
        };
        Ok(Env {
            bin: bin.to_owned(),
            sizes,
            disk_dir,
            net,
            qemu,
        })
    }

    fn workload(&self) -> Command {
        Command::new(self.bin.join("cis490-workload"))
    }

    /// Starts one workload, held; returns once it waits for its release.
    pub fn start(&self, kind: Kind, dir: &Path) -> Result<Held> {
        let out = dir.join("workload.json");
        let s = &self.sizes;
        let mut cmd = match kind {
            Kind::Storm => {
                let mut c = self.workload();
                c.args(["storm", "--round-trips", &s.storm_round_trips.to_string()]);
                c
            }
            Kind::StormFree => {
                let mut c = self.workload();
                c.args(["storm", "--cpus", "free", "--round-trips"])
                    .arg(s.storm_free_round_trips.to_string());
                c
            }
            Kind::Storms => {
                let mut c = self.workload();
                c.args(["storm", "--pairs", "2", "--round-trips"])
                    .arg(s.storm_round_trips.to_string());
                c
            }
            Kind::Yields => {
                let mut c = self.workload();
                c.args(["storm", "--via", "yield", "--pairs", "2", "--round-trips"])
                    .arg(s.yield_round_trips.to_string());
                c
            }
            Kind::Wakeburn => {
                let mut c = self.workload();
                c.args([
                    "wakeburn",
                    "--threads",
                    &s.wakeburn_threads.to_string(),
                    "--cycles",
                    &s.wakeburn_cycles.to_string(),
                    "--spin-iters",
                    &s.wakeburn_spin_iters.to_string(),
                ]);
                c
            }
            Kind::Dio => {
                let mut c = self.workload();
                c.args(["dio", "--file"])
                    .arg(self.disk_dir.join("dio.img"))
                    .args([
                        "--write-mb",
                        &s.dio_mib.to_string(),
                        "--read-mb",
                        &s.dio_mib.to_string(),
                        "--block-kb",
                        &s.dio_block_kib.to_string(),
                    ]);
                c
            }
            Kind::Net => {
                let net = self.net.as_ref().context("net workload not prepared")?;
                let mut c = net.ns.cmd(&self.bin.join("cis490-workload"));
                c.args([
                    "tap",
                    "--name",
                    NET_TAP,
                    "--frames",
                    &s.net_frames.to_string(),
                    "--size",
                    &s.net_frame_bytes.to_string(),
                ]);
                c
            }
            Kind::Qemu => return self.start_qemu(dir),
        };
        cmd.arg("--wait-signal")
            .arg("--linger-ms")
            .arg("300")
            .arg("--out")
            .arg(&out);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("workload.stderr"))?);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {cmd:?}"))?;
        let ready = with_suffix(&out, ".ready");
        let t0 = Instant::now();
        while !ready.exists() {
            if t0.elapsed() > Duration::from_secs(60) {
                bail!(
                    "{} workload not ready within 60 s ({})",
                    kind.name(),
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let r: Value = serde_json::from_slice(&fs::read(&ready)?)?;
        let pid = r["pid"].as_u64().context("ready file without pid")? as u32;
        if kind == Kind::Net {
            let net = self.net.as_ref().unwrap();
            net.ns.sh(&format!(
                "sysctl -q -w net.ipv6.conf.{NET_TAP}.disable_ipv6=1"
            ));
            net.ns.ip(&["link", "set", NET_TAP, "up"]);
        }
        Ok(Held {
            kind,
            child,
            pid,
            out,
            console: None,
            sink: None,
            released: None,
        })
    }

    fn start_qemu(&self, dir: &Path) -> Result<Held> {
        let q = self.qemu.as_ref().context("qemu workload not prepared")?;
        let sink_out = dir.join("sink.json");
        let sink =
            q.ns.cmd(&self.bin.join("cis490-workload"))
                .args(["sink", "--port", "5555", "--timeout-ms", "300000", "--out"])
                .arg(&sink_out)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start the network peer")?;
        cis490_tests::wait_for_file(&with_suffix(&sink_out, ".ready"), Duration::from_secs(30));
        let s = &self.sizes;
        let console = dir.join("console.log");
        let mut launch = q.guest.launch(format!(
            "cis490.ip=10.98.0.2/24 cis490.disk_write_mb={m} cis490.disk_read_mb={m} \
             cis490.send=10.98.0.1:5555:{}",
            s.qemu_send_bytes,
            m = s.qemu_disk_mib
        ));
        launch.disk = Some(q.disk.clone());
        launch.nic = Some(format!(
            "tap,ifname={QEMU_TAP},script=no,downscript=no,model=virtio-net-pci"
        ));
        launch.console = Some(console.clone());
        let mut argv: Vec<OsString> = ["ip", "netns", "exec", &q.ns.0]
            .map(OsString::from)
            .to_vec();
        argv.extend(qemu_argv(&q.guest.guest, &launch));
        // The shell stops itself; once released it becomes ip, then QEMU
        // (exec keeps the pid).
        let child = Command::new("sh")
            .arg("-c")
            .arg("kill -STOP $$ && exec \"$@\"")
            .arg("sh")
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("workload.stderr"))?)
            .spawn()
            .context("cannot start QEMU")?;
        let pid = child.id();
        let t0 = Instant::now();
        while !is_stopped(pid) {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("the QEMU launcher did not stop itself");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Held {
            kind: Kind::Qemu,
            child,
            pid,
            out: dir.join("workload.json"),
            console: Some(console),
            sink: Some(sink),
            released: None,
        })
    }
}

fn is_stopped(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s[s.rfind(')')? + 2..].starts_with('T')))
        .unwrap_or(false)
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A workload process waiting for its release.
pub struct Held {
    pub kind: Kind,
    child: Child,
    pub pid: u32,
    out: PathBuf,
    console: Option<PathBuf>,
    sink: Option<Child>,
    released: Option<Instant>,
}

/// What a workload measured of itself.
#[derive(Clone, Debug)]
pub struct Done {
    /// Wall time of its fixed work, ns (lower is better).
    pub work_ns: u64,
    /// Its own rate, when it has one (round trips/s, cycles/s, frames/s, MB/s).
    pub rate: Option<f64>,
    /// The workload's report, for the record.
    pub report: Value,
}

impl Held {
    /// Lets the workload run.
    pub fn release(&mut self) -> Result<()> {
        self.released = Some(Instant::now());
        match self.kind {
            Kind::Qemu => signal(self.pid, libc::SIGCONT),
            _ => signal(self.pid, libc::SIGUSR1),
        }
    }

    /// Waits until the workload has finished its work (its report is
    /// written, or the guest said `done`); the process may still linger.
    pub fn wait_work(&mut self, timeout: Duration) -> Result<Done> {
        let released = self.released.context("not released")?;
        loop {
            if let Some(d) = self.poll_done(released)? {
                return Ok(d);
            }
            if let Some(st) = self.child.try_wait()? {
                // Exited without finishing its work.
                let stderr = fs::read_to_string(self.out.with_file_name("workload.stderr"))
                    .unwrap_or_default();
                bail!(
                    "{} workload exited ({st}) before finishing: {}",
                    self.kind.name(),
                    stderr.trim()
                );
            }
            if released.elapsed() > timeout {
                bail!(
                    "{} workload did not finish within {timeout:?}",
                    self.kind.name()
                );
            }
            std::thread::sleep(Duration::from_millis(if self.console.is_some() {
                5
            } else {
                2
            }));
        }
    }

    fn poll_done(&self, released: Instant) -> Result<Option<Done>> {
        if let Some(console) = &self.console {
            let text = fs::read_to_string(console).unwrap_or_default();
            if !text.contains("cis490-guest: done") {
                return Ok(None);
            }
            let work_ns = released.elapsed().as_nanos() as u64;
            let said = cis490_tests::guest::console_values(&text);
            if let Some((k, v)) = said.iter().find(|(k, _)| k.starts_with("error")) {
                bail!("the guest reported {k}={v}");
            }
            return Ok(Some(Done {
                work_ns,
                rate: None,
                report: serde_json::to_value(&said)?,
            }));
        }
        if !self.out.exists() {
            return Ok(None);
        }
        let r: Value = serde_json::from_slice(&fs::read(&self.out)?)
            .with_context(|| format!("{}", self.out.display()))?;
        let (work_ns, rate) = match self.kind {
            Kind::Storm | Kind::StormFree | Kind::Storms | Kind::Yields => {
                (r["wall_ns"].as_u64(), r["round_trips_per_s"].as_f64())
            }
            Kind::Wakeburn => (r["wall_ns"].as_u64(), r["cycles_per_s"].as_f64()),
            Kind::Dio => {
                let ns = r["write_ns"].as_u64().unwrap_or(0)
                    + r["fdatasync_ns"].as_u64().unwrap_or(0)
                    + r["read_ns"].as_u64().unwrap_or(0);
                let bytes =
                    r["write_bytes"].as_u64().unwrap_or(0) + r["read_bytes"].as_u64().unwrap_or(0);
                (Some(ns), Some(bytes as f64 / 1e6 / (ns as f64 / 1e9)))
            }
            Kind::Net => {
                let ns = r["write_ns"].as_u64();
                let frames = r["frames_written"].as_u64().unwrap_or(0);
                (ns, ns.map(|ns| frames as f64 / (ns as f64 / 1e9)))
            }
            Kind::Qemu => unreachable!("the guest reports on its console"),
        };
        let work_ns = work_ns.with_context(|| format!("no timing in {}", self.out.display()))?;
        Ok(Some(Done {
            work_ns,
            rate,
            report: r,
        }))
    }

    /// Waits for the process to end (it lingers briefly after its work).
    pub fn wait_exit(mut self, timeout: Duration) -> Result<()> {
        let u = measure::wait_usage(&mut self.child, timeout);
        if let Some(mut s) = self.sink.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let u = u?;
        if u.code != 0 {
            bail!("{} workload exited with code {}", self.kind.name(), u.code);
        }
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Only when a run failed half-way: nothing is left behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(s) = &mut self.sink {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}
