//! The QEMU test guest, seen from the tests and the demo: which kernel,
//! initramfs and QEMU to use (`guest.json`, written by `cargo xtask guest`,
//! which builds them), the QEMU command line, and the guest's console
//! reports (`cis490-guest: key=value`).

use std::{
    collections::BTreeMap,
    ffi::OsString,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

/// The guest, ready to boot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Guest {
    /// The kernel image (`vmlinuz-<version>`).
    pub kernel: PathBuf,
    /// The initramfs (uncompressed newc cpio).
    pub initrd: PathBuf,
    /// The guest kernel's release (`uname -r` inside the guest).
    pub kernel_version: String,
    /// The `qemu-system-x86_64` binary.
    pub qemu: PathBuf,
}

/// Env var through which the integration tests find `guest.json`.
pub const JSON_ENV: &str = "CIS490_GUEST_JSON";
/// Every guest console line meant for us starts with this.
pub const LINE_PREFIX: &str = "cis490-guest:";
/// The kernel command line before the workload parameters.
pub const BASE_APPEND: &str = "console=ttyS0 panic=-1 quiet";

/// The guest described by `guest.json` and the accelerator chosen for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestJson {
    #[serde(flatten)]
    pub guest: Guest,
    pub accel: String,
}

impl GuestJson {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a guest.json", path.display()))
    }

    /// The guest `cargo xtask test` prepared (it sets [`JSON_ENV`]).
    pub fn from_env() -> Result<Self> {
        let path = std::env::var_os(JSON_ENV).with_context(|| {
            format!("{JSON_ENV} is not set: run the tests with `cargo xtask test`, which builds the QEMU guest")
        })?;
        Self::load(Path::new(&path))
    }

    /// A launch of this guest with its accelerator.
    pub fn launch(&self, params: impl Into<String>) -> Launch {
        Launch {
            accel: self.accel.clone(),
            params: params.into(),
            ..Launch::default()
        }
    }
}

/// The `key=value` reports in a console text (`cis490-guest: disk_write_bytes=4194304`).
pub fn console_values(console: &str) -> BTreeMap<String, String> {
    console
        .lines()
        .filter_map(|l| l.find(LINE_PREFIX).map(|p| &l[p + LINE_PREFIX.len()..]))
        .filter_map(|l| l.trim().split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// How to launch the guest.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// "kvm" or "tcg" (as `guest.json` says).
    pub accel: String,
    /// Workload parameters appended to [`BASE_APPEND`], e.g.
    /// `cis490.disk_write_mb=4 cis490.sleep_ms=200`.
    pub params: String,
    /// A raw disk image, attached as virtio-blk with `cache=none` (it must
    /// be on a filesystem that supports O_DIRECT, i.e. not tmpfs), or the
    /// cache mode of [`Launch::disk_cache`].
    pub disk: Option<PathBuf>,
    /// QEMU's cache mode for `disk` (default `none`; the VM runner's scratch
    /// disk is `unsafe`: QEMU may cache it and ignore flushes).
    pub disk_cache: Option<&'static str>,
    /// vCPUs (default: QEMU's one). Under TCG with more than one, a single
    /// host thread runs them all (see [`qemu_argv`]).
    pub smp: Option<u32>,
    /// Guest memory, MiB (default 256).
    pub memory_mib: Option<u32>,
    /// A `-nic` value (e.g. `user,model=virtio-net-pci` or
    /// `tap,ifname=tap0,script=no,downscript=no,model=virtio-net-pci`);
    /// `none` when unset.
    pub nic: Option<String>,
    /// Write the serial console to this file instead of stdout (where it
    /// goes alone: no display, no monitor).
    pub console: Option<PathBuf>,
    /// Serve QMP on this unix socket (`-qmp unix:PATH,server=on,wait=off`).
    pub qmp: Option<PathBuf>,
    /// The guest agent's virtio-serial port (`cis490.guest.agent`) on a
    /// chardev unix socket QEMU serves at this path (`--guest-agent`).
    pub agent: Option<PathBuf>,
}

/// The QEMU command line for a launch (program first): 256 MiB unless
/// asked, no display, serial console on stdout or in a file, `-no-reboot` so
/// the guest's power-off (or panic) ends QEMU. The one place a QEMU guest's
/// command line is made: the tests, the demo and the VM runner
/// (`xtask/src/vm.rs`) launch through it.
pub fn qemu_argv(g: &Guest, launch: &Launch) -> Vec<OsString> {
    let smp = launch.smp.unwrap_or(1);
    let accel = if launch.accel == "tcg" && smp > 1 {
        // One host thread for all vCPUs. With a thread per vCPU (QEMU 7.2
        // here), the kernel's live code patching (int3, then the new
        // instruction, as every tracepoint attach and detach does) now and
        // then leaves a vCPU running the stale int3: an "Oops: int3" or a
        // soft lockup in smp_call_function_many_cond, seen in about one
        // run in three.
        "tcg,thread=single".to_owned()
    } else {
        launch.accel.clone()
    };
    let mut v: Vec<OsString> = vec![g.qemu.clone().into(), "-accel".into(), accel.into()];
    if launch.accel == "kvm" {
        v.extend(["-cpu".into(), "host".into()]);
    }
    if let Some(n) = launch.smp {
        v.extend(["-smp".into(), n.to_string().into()]);
    }
    v.extend([
        "-m".into(),
        launch.memory_mib.unwrap_or(256).to_string().into(),
        "-no-reboot".into(),
    ]);
    let serial = match &launch.console {
        Some(path) => {
            let mut serial = OsString::from("file:");
            serial.push(path);
            serial
        }
        None => "stdio".into(),
    };
    v.extend([
        "-display".into(),
        "none".into(),
        "-monitor".into(),
        "none".into(),
        "-serial".into(),
        serial,
    ]);
    v.extend([
        "-kernel".into(),
        g.kernel.clone().into(),
        "-initrd".into(),
        g.initrd.clone().into(),
    ]);
    v.extend([
        "-append".into(),
        format!("{BASE_APPEND} {}", launch.params).trim_end().into(),
    ]);
    if let Some(disk) = &launch.disk {
        let mut drive = OsString::from("file=");
        drive.push(disk);
        drive.push(",format=raw,if=virtio,cache=");
        drive.push(launch.disk_cache.unwrap_or("none"));
        v.extend(["-drive".into(), drive]);
    }
    v.extend([
        "-nic".into(),
        launch.nic.clone().unwrap_or_else(|| "none".into()).into(),
    ]);
    if let Some(qmp) = &launch.qmp {
        let mut arg = OsString::from("unix:");
        arg.push(qmp);
        arg.push(",server=on,wait=off");
        v.extend(["-qmp".into(), arg]);
    }
    if let Some(agent) = &launch.agent {
        let mut chardev = OsString::from("socket,id=cis490ga,path=");
        chardev.push(agent);
        chardev.push(",server=on,wait=off");
        v.extend([
            "-chardev".into(),
            chardev,
            "-device".into(),
            "virtio-serial".into(),
            "-device".into(),
            "virtserialport,chardev=cis490ga,name=cis490.guest.agent".into(),
        ]);
    }
    v
}

/// [`qemu_argv`] as a `Command`; stdio is left to the caller.
pub fn qemu_command(g: &Guest, launch: &Launch) -> Command {
    let argv = qemu_argv(g, launch);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

/// What a boot printed and how long it took.
#[derive(Debug, Default)]
pub struct BootOutcome {
    /// The console lines from [`LINE_PREFIX`] on (the prefix kept).
    pub lines: Vec<String>,
    /// From spawning QEMU to the `booted` line.
    pub booted: Option<Duration>,
    /// From spawning QEMU to the `done` line.
    pub done: Option<Duration>,
    /// QEMU's exit status (None if it was killed by us).
    pub status: Option<ExitStatus>,
    /// True if the timeout expired and QEMU was killed.
    pub timed_out: bool,
    /// The whole serial console output, for diagnostics.
    pub console: String,
    /// QEMU's stderr.
    pub stderr: String,
}

impl BootOutcome {
    /// The `key=value` lines as a map (`cis490-guest: disk_write_bytes=4194304`).
    pub fn values(&self) -> BTreeMap<String, String> {
        self.lines
            .iter()
            .filter_map(|l| l[LINE_PREFIX.len()..].trim().split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

/// Boots the guest and waits until it powers off, or, with `until_booted`,
/// only until it prints `booted` (QEMU is then killed). QEMU is killed when
/// `timeout` expires (`timed_out` is then set; not an error here).
pub fn boot(
    g: &Guest,
    launch: &Launch,
    timeout: Duration,
    until_booted: bool,
) -> Result<BootOutcome> {
    let start = Instant::now();
    let Console {
        mut child,
        lines,
        stderr,
    } = Console::spawn(qemu_command(g, launch))?;
    let deadline = start + timeout;
    let mut out = BootOutcome::default();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok((at, line)) => {
                out.console.push_str(&line);
                out.console.push('\n');
                let Some(pos) = line.find(LINE_PREFIX) else {
                    continue;
                };
                let line = line[pos..].trim_end().to_owned();
                let key = line[LINE_PREFIX.len()..].trim();
                if key == "booted" {
                    out.booted = Some(at - start);
                } else if key == "done" {
                    out.done = Some(at - start);
                }
                out.lines.push(line);
                if until_booted && out.booted.is_some() {
                    kill(&mut child);
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                out.timed_out = true;
                kill(&mut child);
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                out.status = Some(child.wait().context("waiting for QEMU")?);
                break;
            }
        }
    }
    out.stderr = stderr.join().unwrap_or_default();
    Ok(out)
}

/// Creates a raw disk image of `mib` MiB by writing zeros (so every block is
/// allocated: not sparse, not fallocated).
pub fn create_disk(path: &Path, mib: usize) -> Result<()> {
    let mut f =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&zeros)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Sends each line of `r` (without trailing whitespace), with the instant it
/// was read, from a thread of its own.
fn spawn_line_reader(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                    if tx.send((Instant::now(), line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// Reads all of `r` on a thread.
fn spawn_reader(mut r: impl std::io::Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = Vec::new();
        let _ = r.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    })
}

/// A guest's QEMU with its serial console (stdout) read line by line and
/// its stderr gathered, each on a thread of its own.
pub struct Console {
    pub child: Child,
    /// Each console line with the time it arrived; closed at EOF.
    pub lines: mpsc::Receiver<(Instant, String)>,
    /// All of stderr, once QEMU has closed it.
    pub stderr: thread::JoinHandle<String>,
}

impl Console {
    /// Starts `cmd` (a QEMU command line) with no stdin.
    pub fn spawn(mut cmd: Command) -> Result<Console> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", cmd.get_program().to_string_lossy()))?;
        let lines = spawn_line_reader(child.stdout.take().unwrap());
        let stderr = spawn_reader(child.stderr.take().unwrap());
        Ok(Console {
            child,
            lines,
            stderr,
        })
    }
}

/// Kills and reaps a child.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A network namespace for a QEMU guest: a tap `tap` whose host side is
/// `10.<subnet>.0.1/24` (the guest takes `.2`), and a TCP sink on `port`
/// there (`cis490-workload sink`) that counts what the guest sends,
/// ready when this returns.
pub struct GuestNet {
    pub ns: crate::Netns,
    pub tap: String,
    pub sink: std::process::Child,
    /// The sink's report.
    pub sink_out: PathBuf,
    pub subnet: u8,
    pub port: u16,
}

/// Starts `cmd` (the workload, wherever it runs) as a TCP sink on `port`
/// for the guest's stream (170 s at most), its report at `dir/sink.json`;
/// returns once it listens.
pub fn start_sink(mut cmd: Command, dir: &Path, port: u16) -> (Child, PathBuf) {
    let sink_out = dir.join("sink.json");
    let sink = cmd
        .args([
            "sink",
            "--port",
            &port.to_string(),
            "--timeout-ms",
            "170000",
        ])
        .arg("--out")
        .arg(&sink_out)
        .spawn()
        .expect("cannot start the sink");
    crate::wait_for_file(
        &sink_out.with_extension("json.ready"),
        Duration::from_secs(30),
    );
    (sink, sink_out)
}

impl GuestNet {
    pub fn start(dir: &Path, tag: &str, tap: &str, subnet: u8, port: u16) -> GuestNet {
        let ns = crate::Netns::new(tag);
        ns.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
        ns.sh(&format!("sysctl -q -w net.ipv6.conf.{tap}.disable_ipv6=1"));
        ns.ip(&["addr", "add", &format!("10.{subnet}.0.1/24"), "dev", tap]);
        ns.ip(&["link", "set", tap, "up"]);
        let (sink, sink_out) = start_sink(ns.cmd(&crate::bin("cis490-workload")), dir, port);
        GuestNet {
            ns,
            tap: tap.to_owned(),
            sink,
            sink_out,
            subnet,
            port,
        }
    }

    /// The guest's kernel parameters for its address and for sending
    /// `bytes` to the sink.
    pub fn params(&self, bytes: u64) -> String {
        format!(
            "cis490.ip=10.{s}.0.2/24 cis490.send=10.{s}.0.1:{}:{bytes}",
            self.port,
            s = self.subnet
        )
    }

    /// Gives `launch` this tap as its NIC, its console in `dir/console.log`
    /// and a QMP socket `dir/qmp.sock`; returns (console, QMP socket).
    pub fn wire(&self, launch: &mut Launch, dir: &Path) -> (PathBuf, PathBuf) {
        launch.nic = Some(format!(
            "tap,ifname={},script=no,downscript=no,model=virtio-net-pci",
            self.tap
        ));
        let console = dir.join("console.log");
        launch.console = Some(console.clone());
        let qmp = dir.join("qmp.sock");
        launch.qmp = Some(qmp.clone());
        (console, qmp)
    }

    /// `ip netns exec NS qemu-system-x86_64 ...` for `launch`.
    pub fn argv(&self, g: &Guest, launch: &Launch) -> Vec<OsString> {
        let mut argv: Vec<OsString> = ["ip", "netns", "exec", &self.ns.0]
            .map(OsString::from)
            .to_vec();
        argv.extend(qemu_argv(g, launch));
        argv
    }
}
