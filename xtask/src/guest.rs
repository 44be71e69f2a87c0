//! The test guest: a Debian kernel plus a busybox initramfs, booted by a real
//! `qemu-system-x86_64` so tests and the demo have a VM to trace.
//!
//! Everything is built by this module, once, into a cache directory outside
//! the repository (`$CIS490_CACHE`, else `~/.cache/cis490/guest/`):
//!
//! - `kernel/`: `vmlinuz-<version>`, the virtio modules (plain `.ko`) and
//!   `manifest.json` (version, modules in load order), written last so a
//!   half-finished build is redone. Taken from Debian's
//!   `linux-image-<version>-amd64` package (`apt-get download`, `dpkg-deb -x`).
//! - `busybox/busybox`: from Debian's `busybox-static` package.
//! - the in-guest agent, `/bin/cis490-agent` in the initramfs, built here
//!   (`crate::agent`, static) and started by `/init` at boot.
//! - `initramfs-<hash>.cpio`: an uncompressed `newc` archive written here
//!   (no `cpio` tool); the hash is over the whole archive, so a change to the
//!   init script, busybox or a module gives a new file.
//! - `accel-<host kernel release>`: the accelerator probe's answer.
//! - `guest.json`: the resolved facts, for the integration tests.
//!
//! To take a newer Debian kernel, delete the cache directory.
//!
//! The guest's `/init` reads its workload from the kernel command line
//! (`cis490.*` parameters, see [`INIT_SCRIPT`]) and reports on the serial
//! console in lines `cis490-guest: <key>=<value>`.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::apt::only_entry;
pub(crate) use crate::apt::{Apt, output, output_bytes};
pub use cis490_tests::guest::{Guest, GuestJson, JSON_ENV, Launch, boot, create_disk};

/// Env var: the cache directory (default `~/.cache/cis490/guest`).
pub const CACHE_ENV: &str = "CIS490_CACHE";
/// Env var: `kvm` or `tcg`, overrides the accelerator probe.
pub const ACCEL_ENV: &str = "CIS490_GUEST_ACCEL";
/// The virtio PCI transport and its block device: the first modules of
/// every guest (the test guest's and the VM runner's, each adding its own).
/// Those built into the kernel are absent from the package and skipped; the
/// load order comes from each module's own `depends=` (its `.modinfo`).
pub(crate) const VIRTIO_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
];

/// The test guest's modules beyond [`VIRTIO_MODULES`]: the NIC and
/// virtio-serial (the guest agent's port, cis490.guest.agent).
const MODULES: &[&str] = &["failover", "net_failover", "virtio_net", "virtio_console"];

/// [`VIRTIO_MODULES`] and then `extra`.
pub(crate) fn modules(extra: &[&'static str]) -> Vec<&'static str> {
    VIRTIO_MODULES.iter().chain(extra).copied().collect()
}

/// Every guest's `/init` up to its own work: PATH, `say` (a console line
/// `PREFIX: key=value`), `mnt TYPE SOURCE DIR` (a failure said, not fatal),
/// proc, sysfs and devtmpfs mounted, and the modules loaded in order.
pub(crate) fn init_script(prefix: &str, what: &str, modules: &[String], body: &str) -> String {
    format!(
        r#"#!/bin/sh
# {what}; runs as PID 1.
export PATH=/usr/bin:/bin

say() {{ echo "{prefix}: $*"; }}
mnt() {{
    mkdir -p "$3"
    mount -t "$1" "$2" "$3" || say "error=mount_$1_$3"
}}
mnt proc proc /proc
mnt sysfs sysfs /sys
mnt devtmpfs devtmpfs /dev

for m in {modules}; do
    insmod "/lib/modules/$m.ko" || say "error=insmod_$m"
done
{body}"#,
        modules = modules.join(" ")
    )
}

/// Busybox applets the init script uses (plus a few for debugging by hand),
/// installed as `/bin/<applet>` symlinks.
const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "insmod", "cat", "dd", "ip", "nc", "head", "usleep", "timeout",
    "poweroff", "sleep", "ls", "dmesg", "uname",
];

/// How long a KVM boot may take to reach `booted` before the probe says "tcg".
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The test guest's `/init` after [`init_script`]'s common part.
///
/// Kernel command line parameters (all optional), run in this order:
/// `cis490.ip=A.B.C.D/P` (eth0 up with that address, IPv6 off),
/// `cis490.wait_ms=N` (idle first: the guest agent's first line goes out),
/// then `vda_write_bytes_before=` and `eth0_tx_bytes_before=` (the guest's
/// own counters, where the device exists),
/// `cis490.procs=K` (K `sleep 3` processes in the background; their pids in
/// `proc_pids=`),
/// `cis490.disk_write_mb=N` (N MiB of zeros to /dev/vda from offset 0, direct I/O),
/// `cis490.disk_read_mb=N` (read N MiB back, direct I/O),
/// `cis490.write_phases=A,B,...` (A MiB, then B MiB... of zeros to /dev/vda,
/// each after the last, direct I/O; `cis490.phase_gap_ms=G` idle before
/// each phase: `phaseI_write_bytes=` for each),
/// `cis490.send=HOST:PORT:BYTES` (BYTES zero bytes over TCP, then close),
/// then the counters again (`..._after=`), `cis490.sleep_ms=N` (idle).
/// Then `done` and power off. `/bin/cis490-agent` starts before the
/// workload.
pub const INIT_SCRIPT: &str = r#"
# The guest agent: a line per interval on its virtio-serial port when QEMU
# has one (it waits for the port otherwise).
/bin/cis490-agent </dev/null >/dev/null 2>&1 &
say booted

# Waits up to 5 s for a device node or interface to appear.
wait_for() {
    n=0
    while [ ! -e "$1" ] && [ $n -lt 50 ]; do usleep 100000; n=$((n + 1)); done
}

ip= write_mb= read_mb= send= sleep_ms= wait_ms= procs= write_phases= phase_gap_ms=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        cis490.wait_ms=*) wait_ms=${arg#*=} ;;
        cis490.procs=*) procs=${arg#*=} ;;
        cis490.ip=*) ip=${arg#*=} ;;
        cis490.disk_write_mb=*) write_mb=${arg#*=} ;;
        cis490.disk_read_mb=*) read_mb=${arg#*=} ;;
        cis490.write_phases=*) write_phases=${arg#*=} ;;
        cis490.phase_gap_ms=*) phase_gap_ms=${arg#*=} ;;
        cis490.send=*) send=${arg#*=} ;;
        cis490.sleep_ms=*) sleep_ms=${arg#*=} ;;
    esac
done

if [ -n "$ip" ]; then
    wait_for /sys/class/net/eth0
    # No IPv6: its router solicitations would be traffic the tests did not send.
    { echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6; } 2>/dev/null
    if ip link set lo up && ip link set eth0 up && ip addr add "$ip" dev eth0; then
        say "ip=$ip"
    else
        say "error=ip"
    fi
fi

if [ -n "$wait_ms" ]; then
    usleep $((wait_ms * 1000))
fi

# The guest's own counters before the workload (its ground truth).
counters() {
    if [ -e /sys/block/vda/stat ]; then
        # $1 stays the label; the 7th field (sectors written) becomes $8.
        set -- "$1" $(cat /sys/block/vda/stat)
        say "vda_write_bytes_$1=$(($8 * 512))"
    fi
    if [ -e /sys/class/net/eth0 ]; then
        say "eth0_tx_bytes_$1=$(cat /sys/class/net/eth0/statistics/tx_bytes)"
    fi
}
counters before

if [ -n "$procs" ]; then
    pids=
    n=0
    while [ $n -lt "$procs" ]; do
        sleep 3 &
        pids="$pids${pids:+,}$!"
        n=$((n + 1))
    done
    say "proc_pids=$pids"
fi

if [ -n "$write_mb" ]; then
    wait_for /dev/vda
    if dd if=/dev/zero of=/dev/vda bs=1M count="$write_mb" oflag=direct 2>/dev/null; then
        say "disk_write_bytes=$((write_mb * 1048576))"
    else
        say "error=disk_write"
    fi
fi

if [ -n "$read_mb" ]; then
    wait_for /dev/vda
    if dd if=/dev/vda of=/dev/null bs=1M count="$read_mb" iflag=direct 2>/dev/null; then
        say "disk_read_bytes=$((read_mb * 1048576))"
    else
        say "error=disk_read"
    fi
fi

if [ -n "$write_phases" ]; then
    wait_for /dev/vda
    i=0
    seek=0
    # The list is split on commas once, as the loop starts.
    oldifs=$IFS
    IFS=,
    for mb in $write_phases; do
        IFS=$oldifs
        usleep $((${phase_gap_ms:-0} * 1000))
        if dd if=/dev/zero of=/dev/vda bs=1M count="$mb" seek="$seek" oflag=direct 2>/dev/null; then
            say "phase${i}_write_bytes=$((mb * 1048576))"
        else
            say "error=phase_write"
        fi
        seek=$((seek + mb))
        i=$((i + 1))
    done
    IFS=$oldifs
fi

if [ -n "$send" ]; then
    host=${send%%:*}
    rest=${send#*:}
    port=${rest%%:*}
    bytes=${rest#*:}
    # nc half-closes (the peer sees EOF) when its stdin ends, then waits for
    # the peer to close; the timeout bounds that wait.
    if head -c "$bytes" /dev/zero | timeout 30 nc "$host" "$port" >/dev/null; then
        say "net_sent_bytes=$bytes"
    else
        say "error=send"
    fi
fi

counters after

if [ -n "$sleep_ms" ]; then
    usleep $((sleep_ms * 1000))
fi

say done
poweroff -f
"#;

// ---------------------------------------------------------------------------
// Public API

/// The cache directory: `$CIS490_CACHE`, else `~/.cache/cis490/guest`.
pub fn cache_dir() -> PathBuf {
    cache_dir_of(CACHE_ENV, "guest")
}

/// `$env` when set and not empty, else `~/.cache/cis490/<leaf>`.
pub fn cache_dir_of(env: &str, leaf: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(env).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/cis490").join(leaf)
}

/// Downloads/builds what is missing; idempotent, and fast (no apt calls) when
/// everything is cached.
#[allow(dead_code, reason = "API for the other xtask tasks")]
pub fn ensure() -> Result<Guest> {
    Ok(ensure_parts()?.0)
}

/// Which accelerator works here: "kvm" only if a KVM boot of this guest
/// reaches `cis490-guest: booted` within [`KVM_PROBE_TIMEOUT`], else "tcg".
/// Probed once and cached per host kernel release; `CIS490_GUEST_ACCEL`
/// overrides.
pub fn accel(g: &Guest) -> Result<&'static str> {
    if let Some(v) = std::env::var_os(ACCEL_ENV) {
        return parse_accel(&v.to_string_lossy())
            .with_context(|| format!("{ACCEL_ENV} must be kvm or tcg"));
    }
    let file = cache_dir().join(format!("accel-{}", host_kernel_release()?));
    if let Ok(cached) = fs::read_to_string(&file)
        && let Ok(a) = parse_accel(&cached)
    {
        return Ok(a);
    }
    let a = probe_accel(g)?;
    write_atomic(&file, a.as_bytes())?;
    Ok(a)
}

/// Writes `guest.json` (kernel, initrd, kernel_version, qemu, accel) into the
/// cache dir and returns its path (what `CIS490_GUEST_JSON` should hold).
pub fn write_json(g: &Guest, accel: &str) -> Result<PathBuf> {
    let path = cache_dir().join("guest.json");
    let json = GuestJson {
        guest: g.clone(),
        accel: accel.to_owned(),
    };
    write_atomic(
        &path,
        format!("{:#}\n", serde_json::to_value(&json)?).as_bytes(),
    )?;
    Ok(path)
}

/// [`ensure`], [`accel`] and [`write_json`] in one: what callers that run the
/// integration tests need. Returns the guest, its accelerator and the
/// `guest.json` path.
pub fn prepare() -> Result<(Guest, &'static str, PathBuf)> {
    let g = ensure()?;
    let a = accel(&g)?;
    let json = write_json(&g, a)?;
    Ok((g, a, json))
}

/// `cargo xtask guest [--boot]`: builds what is missing, probes the
/// accelerator, writes and prints `guest.json`; with `boot`, boots the guest
/// once with a sample disk workload and prints what it reported.
pub fn task(boot_once: bool) -> Result<()> {
    let (g, kernel) = ensure_parts()?;
    eprintln!(
        "guest: kernel {} modules (load order): {} ({})",
        kernel.version,
        kernel.order.join(" "),
        if kernel.compressed.is_empty() {
            "none were compressed".to_owned()
        } else {
            format!("decompressed: {}", kernel.compressed.join(" "))
        }
    );
    let a = accel(&g)?;
    let json = write_json(&g, a)?;
    println!("{}", json.display());
    print!("{}", fs::read_to_string(&json)?);
    if boot_once {
        sample_boot(&g, a)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Accelerator

fn parse_accel(s: &str) -> Result<&'static str> {
    match s.trim() {
        "kvm" => Ok("kvm"),
        "tcg" => Ok("tcg"),
        other => bail!("unknown accelerator {other:?}"),
    }
}

fn host_kernel_release() -> Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("cannot read the host kernel release")?
        .trim()
        .to_owned())
}

/// Boots the guest under KVM (no workload) and says "kvm" if it reaches
/// `booted` in time.
fn probe_accel(g: &Guest) -> Result<&'static str> {
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("guest: /dev/kvm cannot be opened: using tcg");
        return Ok("tcg");
    }
    eprintln!("guest: probing KVM (a boot must reach `booted` within {KVM_PROBE_TIMEOUT:?})");
    let launch = Launch {
        accel: "kvm".into(),
        ..Launch::default()
    };
    let start = Instant::now();
    let out = boot(g, &launch, KVM_PROBE_TIMEOUT, true)?;
    let answer = if out.booted.is_some() { "kvm" } else { "tcg" };
    let why = if out.booted.is_some() {
        "booted".to_owned()
    } else if out.timed_out {
        "timed out".to_owned()
    } else {
        format!("QEMU ended: {}", out.stderr.trim())
    };
    eprintln!(
        "guest: KVM probe: {why} after {:.1?}: using {answer}",
        start.elapsed()
    );
    Ok(answer)
}

// ---------------------------------------------------------------------------
// Sample boot

fn sample_boot(g: &Guest, accel: &'static str) -> Result<()> {
    let disk = cache_dir().join("sample-disk.img");
    create_disk(&disk, 64)?;
    let launch = Launch {
        accel: accel.into(),
        params: "cis490.disk_write_mb=4 cis490.disk_read_mb=4 cis490.sleep_ms=200".into(),
        disk: Some(disk.clone()),
        ..Launch::default()
    };
    let out = boot(g, &launch, Duration::from_secs(120), false);
    let _ = fs::remove_file(&disk);
    let out = out?;
    for line in &out.lines {
        println!("{line}");
    }
    let secs =
        |d: Option<Duration>| d.map_or("never".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()));
    println!(
        "accel {accel}: booted after {}, done after {}",
        secs(out.booted),
        secs(out.done)
    );
    if out.timed_out {
        bail!(
            "the guest did not finish within 120 s (QEMU killed); console:\n{}",
            out.console
        );
    }
    if out.done.is_none() || !out.status.is_some_and(|s| s.success()) {
        bail!(
            "the guest did not finish cleanly (QEMU {:?}); console:\n{}\nQEMU stderr:\n{}",
            out.status,
            out.console,
            out.stderr
        );
    }
    if out.lines.iter().any(|l| l.contains("error=")) {
        bail!("the guest reported an error; console:\n{}", out.console);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Building the guest

/// The guest plus what the kernel step found (for reporting).
fn ensure_parts() -> Result<(Guest, KernelFiles)> {
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let mut apt = Apt::default();
    let qemu = ensure_qemu(&mut apt)?;
    let kernel = ensure_kernel(&cache, &mut apt)?;
    let busybox = ensure_busybox(&cache, &mut apt)?;
    let agent = crate::agent::build()?;
    let initrd = ensure_initramfs(&cache, &kernel, &busybox, &agent)?;
    let guest = Guest {
        kernel: kernel.dir.join(format!("vmlinuz-{}", kernel.version)),
        initrd,
        kernel_version: kernel.version.clone(),
        qemu,
    };
    Ok((guest, kernel))
}

/// Finds `qemu-system-x86_64`, installing Debian's `qemu-system-x86` if missing.
pub(crate) fn ensure_qemu(apt: &mut Apt) -> Result<PathBuf> {
    const QEMU: &str = "qemu-system-x86_64";
    if let Some(p) = find_in_path(QEMU) {
        return Ok(p);
    }
    eprintln!("guest: {QEMU} is missing: installing qemu-system-x86");
    apt.run(
        &[
            "install",
            "-y",
            "--no-install-recommends",
            "qemu-system-x86",
        ],
        None,
    )?;
    find_in_path(QEMU)
        .with_context(|| format!("{QEMU} still missing after installing qemu-system-x86"))
}

pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// What `kernel/manifest.json` records.
#[derive(Debug)]
pub(crate) struct KernelFiles {
    /// `<cache>/kernel`, holding `vmlinuz-<version>` and `modules/<name>.ko`.
    pub dir: PathBuf,
    pub version: String,
    /// Module names in load order (dependencies first).
    pub order: Vec<String>,
    /// Modules that were compressed in the package.
    pub compressed: Vec<String>,
}

impl KernelFiles {
    pub fn module(&self, name: &str) -> PathBuf {
        self.dir.join("modules").join(format!("{name}.ko"))
    }

    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join(format!("vmlinuz-{}", self.version))
    }

    fn manifest(&self, requested: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "version": self.version,
            "requested": requested,
            "order": self.order,
            "compressed": self.compressed,
        })
    }

    /// The cached kernel, if complete and built for the module list `requested`.
    pub fn load(dir: &Path, requested: &[&str]) -> Option<Self> {
        let text = fs::read(dir.join("manifest.json")).ok()?;
        let m: serde_json::Value = serde_json::from_slice(&text).ok()?;
        if m["requested"] != serde_json::json!(requested) {
            return None;
        }
        let strings = |v: &serde_json::Value| -> Option<Vec<String>> {
            v.as_array()?
                .iter()
                .map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        let files = KernelFiles {
            dir: dir.to_owned(),
            version: m["version"].as_str()?.to_owned(),
            order: strings(&m["order"])?,
            compressed: strings(&m["compressed"])?,
        };
        let vmlinuz = dir.join(format!("vmlinuz-{}", files.version));
        (vmlinuz.is_file() && files.order.iter().all(|n| files.module(n).is_file()))
            .then_some(files)
    }
}

/// The kernel image and modules, from the cache or from the newest
/// `linux-image-6.1.0-*-amd64` package.
fn ensure_kernel(cache: &Path, apt: &mut Apt) -> Result<KernelFiles> {
    let dir = cache.join("kernel");
    if let Some(k) = KernelFiles::load(&dir, &modules(MODULES)) {
        return Ok(k);
    }
    let package = meta_dependency(apt, "linux-image-amd64")?;
    fetch_kernel(apt, &package, cache, &dir, &modules(MODULES))
}

/// Downloads kernel package `package` (with `apt-get download`, working in
/// `work`) and extracts its image and the modules `modules` (with their
/// dependencies) into `dir`.
pub(crate) fn fetch_kernel(
    apt: &mut Apt,
    package: &str,
    work: &Path,
    dir: &Path,
    modules: &[&str],
) -> Result<KernelFiles> {
    let staging = work.join("staging-kernel");
    let deb = apt.download(package, work)?;
    unpack(&deb, &staging)?;
    let files = extract_kernel(&staging, dir, modules);
    let _ = fs::remove_dir_all(&staging);
    Apt::clean_downloads(work);
    files
}

/// The kernel package the meta-package `meta` depends on (for
/// `linux-image-amd64`, the newest 6.1 kernel of Debian 12).
pub(crate) fn meta_dependency(apt: &mut Apt, meta: &str) -> Result<String> {
    if let Some(p) = known_meta_dependency(meta) {
        return Ok(p);
    }
    apt.update()?;
    known_meta_dependency(meta)
        .with_context(|| format!("apt-cache names no kernel package that {meta} depends on"))
}

/// [`meta_dependency`] from apt's package lists as they are (no update).
pub(crate) fn known_meta_dependency(meta: &str) -> Option<String> {
    let out = output(Command::new("apt-cache").args(["depends", meta])).ok()?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_owned)
}

/// Copies the kernel image and our modules (decompressed, with their
/// dependencies) from an unpacked kernel package into `dir`.
fn extract_kernel(unpacked: &Path, dir: &Path, modules: &[&str]) -> Result<KernelFiles> {
    let vmlinuz = only_entry(&unpacked.join("boot"), "vmlinuz-")?;
    let version = vmlinuz.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_owned();
    let mod_root = unpacked.join("lib/modules").join(&version);
    let index = index_modules(&mod_root.join("kernel"))?;
    let builtin = fs::read_to_string(mod_root.join("modules.builtin")).unwrap_or_default();
    let is_builtin = |name: &str| {
        builtin
            .lines()
            .filter_map(|l| Path::new(l).file_stem())
            .any(|s| normalize(&s.to_string_lossy()) == name)
    };

    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir.join("modules"))?;
    let mut files = KernelFiles {
        dir: dir.to_owned(),
        version: version.clone(),
        order: Vec::new(),
        compressed: Vec::new(),
    };
    let mut visited = HashSet::new();
    for &name in modules {
        if !index.contains_key(name) {
            let why = if is_builtin(name) {
                "built into the kernel"
            } else {
                "not in the package"
            };
            eprintln!("guest: module {name}: {why}: skipped");
            continue;
        }
        add_module(name, &index, &is_builtin, &mut visited, &mut files)?;
    }
    fs::copy(&vmlinuz, dir.join(format!("vmlinuz-{version}")))?;
    write_atomic(
        &dir.join("manifest.json"),
        format!("{:#}\n", files.manifest(modules)).as_bytes(),
    )?;
    eprintln!(
        "guest: kernel {version}: modules in load order: {}",
        files.order.join(" ")
    );
    Ok(files)
}

/// Adds `name` after its dependencies (depth first), decompressing it into
/// `files.dir/modules`.
fn add_module(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    is_builtin: &dyn Fn(&str) -> bool,
    visited: &mut HashSet<String>,
    files: &mut KernelFiles,
) -> Result<()> {
    if !visited.insert(name.to_owned()) {
        return Ok(());
    }
    let src = &index[name];
    let (data, compressed) = read_module(src)?;
    for dep in module_depends(&data).with_context(|| format!("reading {}", src.display()))? {
        if index.contains_key(&dep) {
            add_module(&dep, index, is_builtin, visited, files)?;
        } else if !is_builtin(&dep) {
            bail!("module {name} needs {dep}, which is neither in the package nor built in");
        }
    }
    fs::write(files.module(name), &data)?;
    if compressed {
        files.compressed.push(name.to_owned());
    }
    files.order.push(name.to_owned());
    Ok(())
}

/// Every module under `dir`, by name (`-` read as `_`, like modprobe).
fn index_modules(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            if let Some((stem, _)) = file.split_once(".ko") {
                index.insert(normalize(stem), path);
            }
        }
    }
    Ok(index)
}

fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// A module's bytes as plain ELF (`.ko.xz`/`.ko.zst`/`.ko.gz` decompressed
/// with the host tool), and whether it was compressed.
fn read_module(path: &Path) -> Result<(Vec<u8>, bool)> {
    let name = path.to_string_lossy();
    let tool = match name.rsplit_once(".ko") {
        Some((_, "")) => return Ok((fs::read(path)?, false)),
        Some((_, ".xz")) => "xz",
        Some((_, ".zst")) => "zstd",
        Some((_, ".gz")) => "gzip",
        _ => bail!("unknown module compression: {name}"),
    };
    let out = output_bytes(Command::new(tool).arg("-dc").arg(path))?;
    Ok((out, true))
}

/// The `depends=` list from a module's `.modinfo` section.
fn module_depends(elf: &[u8]) -> Result<Vec<String>> {
    use object::{Object as _, ObjectSection as _};
    let file = object::File::parse(elf)?;
    let modinfo = file
        .section_by_name(".modinfo")
        .context("no .modinfo section")?;
    let data = modinfo.data()?;
    Ok(data
        .split(|&b| b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|list| {
            String::from_utf8_lossy(list)
                .split(',')
                .map(normalize)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect())
}

/// The static busybox, from the cache or from Debian's `busybox-static`.
pub(crate) fn ensure_busybox(cache: &Path, apt: &mut Apt) -> Result<PathBuf> {
    let target = cache.join("busybox/busybox");
    if target.is_file() {
        return Ok(target);
    }
    let staging = cache.join("staging-busybox");
    let deb = apt.download("busybox-static", cache)?;
    unpack(&deb, &staging)?;
    fs::create_dir_all(target.parent().unwrap())?;
    let tmp = target.with_extension("tmp");
    fs::copy(staging.join("bin/busybox"), &tmp).context("busybox-static has no bin/busybox")?;
    fs::rename(&tmp, &target)?;
    let _ = fs::remove_dir_all(&staging);
    Apt::clean_downloads(cache);
    Ok(target)
}

/// `dpkg-deb -x` into a fresh `dir`.
pub(crate) fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(dir);
    output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))?;
    Ok(())
}

/// The initramfs for this kernel and busybox, named by its content's hash;
/// written only if that file does not exist yet (older ones are removed).
fn ensure_initramfs(
    cache: &Path,
    kernel: &KernelFiles,
    busybox: &Path,
    agent: &Path,
) -> Result<PathBuf> {
    let archive = initramfs(kernel, busybox, agent)?;
    let path = cache.join(format!("initramfs-{:016x}.cpio", fnv1a(&archive)));
    if path.is_file() {
        return Ok(path);
    }
    write_atomic(&path, &archive)?;
    for entry in fs::read_dir(cache)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("initramfs-") && name.ends_with(".cpio") && entry.path() != path {
            let _ = fs::remove_file(entry.path());
        }
    }
    eprintln!("guest: wrote {} ({} bytes)", path.display(), archive.len());
    Ok(path)
}

/// The initramfs archive: `/init`, busybox and its applet links, the guest
/// agent, the modules, the mount points, and `/dev/console` (the kernel
/// opens it for init's stdio before devtmpfs is mounted).
fn initramfs(kernel: &KernelFiles, busybox: &Path, agent: &Path) -> Result<Vec<u8>> {
    let init = init_script(
        "cis490-guest",
        "cis490 test guest init (written by `cargo xtask guest`)",
        &kernel.order,
        INIT_SCRIPT,
    );
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
        cpio.dir(dir);
    }
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.char_dev("dev/null", 0o666, 1, 3);
    cpio.file("init", 0o755, init.as_bytes());
    cpio.file("bin/busybox", 0o755, &fs::read(busybox)?);
    cpio.file("bin/cis490-agent", 0o755, &fs::read(agent)?);
    for applet in APPLETS {
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    for name in &kernel.order {
        cpio.file(
            &format!("lib/modules/{name}.ko"),
            0o644,
            &fs::read(kernel.module(name))?,
        );
    }
    Ok(cpio.finish())
}

/// A writer of uncompressed `newc` cpio archives (what the kernel unpacks as
/// an initramfs). Owner root, mtime 0, so the same inputs give the same bytes.
#[derive(Default)]
pub(crate) struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    const S_IFDIR: u32 = 0o040000;
    const S_IFREG: u32 = 0o100000;
    const S_IFLNK: u32 = 0o120000;
    const S_IFCHR: u32 = 0o020000;

    pub fn dir(&mut self, path: &str) {
        self.entry(path, Self::S_IFDIR | 0o755, 2, (0, 0), b"");
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.entry(path, Self::S_IFREG | perm, 1, (0, 0), data);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, Self::S_IFLNK | 0o777, 1, (0, 0), target.as_bytes());
    }

    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.entry(path, Self::S_IFCHR | perm, 1, (major, minor), b"");
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1, // with its NUL
            0,                     // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad4();
        self.out.extend_from_slice(data);
        self.pad4();
    }

    fn pad4(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), b"");
        self.out
    }
}

/// 64-bit FNV-1a: a stable content hash for cache file names.
pub(crate) fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

// ---------------------------------------------------------------------------
// Small helpers

/// Writes `data` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    fs::write(&tmp, data).with_context(|| format!("cannot write {}", path.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_end_with_a_trailer() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        c.symlink("bin/sh", "busybox");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        let trailer = b"TRAILER!!!\0";
        let at = out
            .windows(trailer.len())
            .rposition(|w| w == trailer)
            .unwrap();
        // The trailer's header (110 bytes) starts 4-aligned.
        assert_eq!((at - 110) % 4, 0);
    }

    #[test]
    fn init_script_parses_every_parameter() {
        for p in [
            "ip",
            "wait_ms",
            "procs",
            "disk_write_mb",
            "disk_read_mb",
            "write_phases",
            "phase_gap_ms",
            "send",
            "sleep_ms",
        ] {
            assert!(INIT_SCRIPT.contains(&format!("cis490.{p}=*)")), "{p}");
        }
        assert!(INIT_SCRIPT.contains("oflag=direct") && INIT_SCRIPT.contains("iflag=direct"));
    }
}
