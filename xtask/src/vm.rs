//! The VM runner: the privileged integration tests inside a QEMU VM booted
//! with a Debian kernel, one VM per kernel, so every probe is loaded,
//! verified and attached on each kernel the lab's hosts run.
//!
//! Per kernel:
//!
//! 1. The kernel: `apt-get download` of its `linux-image-*` package, cached
//!    (image plus the few modules the VM needs, decompressed, in load order)
//!    in `$CIS490_VM_CACHE/kernels/<package>/`, by default
//!    `~/.cache/cis490/vm/`. A short name (`6.1`, `6.12`) is resolved
//!    through Debian's meta-package to its newest kernel.
//! 2. The initramfs (`target/vm/<release>/initramfs.cpio`, uncompressed
//!    newc): busybox and its applets, the host's `ip` (busybox's lacks
//!    `netns`), `bash` and `setpriv` with every shared library `ldd` names,
//!    `cis490` and `cis490-workload` (release builds) and the test binaries
//!    (debug builds; debug info stripped), the modules, and [`INIT`].
//! 3. A scratch disk (ext4, made by the host's `mkfs.ext4`, fresh for every
//!    boot): the tests' `TMPDIR`, so O_DIRECT block I/O reaches a real
//!    (virtio) block device.
//! 4. The boot: `qemu-system-x86_64`, 2 vCPUs, KVM where a KVM boot works,
//!    else software emulation (TCG). What to run goes on the kernel command
//!    line (`cis490.*`); the init reports on the serial console
//!    (`cis490-vm: key=value` lines, the test binaries' own output, and a
//!    final `cis490-vm-result: kernel=R passed=N failed=M`). The whole
//!    console is kept in `target/vm/<release>/console.log`.
//!
//! A run fails on a kernel panic (or an Oops / BUG), a timeout, an init
//! error, no result line, or any failed test.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use cis490_tests::guest::{Console, kill};

use crate::{
    guest::{self, Apt, Cpio, KernelFiles},
    probe_summary::ProbeSummary,
    testbins::TestBinary,
};

/// Env var: the VM cache directory (default `~/.cache/cis490/vm`).
pub const CACHE_ENV: &str = "CIS490_VM_CACHE";

/// The kernels `vm` boots when none is named.
pub const DEFAULT_KERNELS: &[&str] = &["6.1", "6.12"];

/// Modules the VM loads beyond [`guest::VIRTIO_MODULES`] (the scratch disk's
/// transport and device), with their dependencies from each module's
/// `depends=`: ext4 for the scratch disk's filesystem (crc32c is only a
/// soft dependency of ext4, so named), tun for the tap tests, loop for the
/// failing-disk test (an ext4 image mounted through a loop device), and kvm
/// for its tracepoints (`kvm:kvm_exit`, `kvm:kvm_userspace_exit`, classic
/// ones through tracefs: the kvm family attaches there, though without
/// VMX/SVM under emulation no VM runs).
/// The gateway test's lab: veth pairs on a bridge, the clsact qdisc
/// (sch_ingress) and the classifier (cls_bpf) of the clsact path.
const MODULES: &[&str] = &[
    "crc32c_generic",
    "ext4",
    "tun",
    "loop",
    "kvm",
    "veth",
    "bridge",
    "sch_ingress",
    "cls_bpf",
];

/// Host programs the tests run that busybox lacks or gets wrong: `ip netns`
/// (the tap tests), `bash` (`/dev/tcp` in the socket test), `setpriv
/// --clear-groups` (the non-root test), `mkfs.ext4` (the failing-disk test),
/// `tcpdump` and `tc` (the gateway test: its capture, and the qdiscs and
/// filters left on the bridge). Copied with their libraries.
const HOST_TOOLS: &[&str] = &["ip", "bash", "setpriv", "mkfs.ext4", "tcpdump", "tc"];

/// Where the binaries go inside the VM: the test binaries in `deps/`, since
/// the tests find `cis490` and the workload in the parent of their own
/// directory (`target/<profile>/` when they run from `target/<profile>/deps/`).
const GUEST_BIN_DIR: &str = "cis490/bin";

/// Time limit of one test binary in the VM (the slowest, `sched`, takes
/// about 45 s under software emulation here): a hung binary is killed and
/// counted as failed, so the other binaries still run.
const BINARY_TIMEOUT_SECS: u64 = 300;

/// Scratch disk size.
const SCRATCH_MIB: u64 = 2048;

/// The VM's `/init` after [`guest::init_script`]'s common part;
/// `@BIN_DIR@` and `@BINARY_TIMEOUT@` are filled in.
///
/// Kernel command line parameters:
/// `cis490.accel=tcg|kvm` (exported as `CIS490_VM_ACCEL` for the tests),
/// `cis490.tests=a,b` (test binaries to run, in order),
/// `cis490.skip=x,y` (libtest `--skip` filters),
/// `cis490.filter=f,g` (libtest name filters).
pub const INIT: &str = r#"
export RUST_BACKTRACE=1
mnt tmpfs tmpfs /run
mnt tracefs tracefs /sys/kernel/tracing
mnt debugfs debugfs /sys/kernel/debug
mnt bpf bpf /sys/fs/bpf
mnt cgroup2 cgroup2 /sys/fs/cgroup
ln -s /proc/self/fd /dev/fd

tests= skip= filter=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        cis490.accel=*) export CIS490_VM_ACCEL="${arg#*=}" ;;
        cis490.tests=*) tests=$(echo "${arg#*=}" | tr , ' ') ;;
        cis490.skip=*) skip=$(echo "${arg#*=}" | tr , ' ') ;;
        cis490.filter=*) filter=$(echo "${arg#*=}" | tr , ' ') ;;
    esac
done

n=0
while [ ! -e /dev/vda ] && [ $n -lt 100 ]; do usleep 100000; n=$((n + 1)); done
mkdir -p /scratch
mount -t ext4 /dev/vda /scratch || say "error=mount_scratch"
mkdir -p /scratch/tmp
export TMPDIR=/scratch/tmp
cd /scratch
ip link set lo up || say "error=loopback"

btf=no
[ -e /sys/kernel/btf/vmlinux ] && btf=yes
say "booted kernel=$(uname -r) cpus=$(nproc) btf=$btf"

T=/@BIN_DIR@
# A real trace: which probes attached and which path each family took.
if $T/cis490 trace --data-dir /scratch/probe --progress-secs 0 -- sleep 1 \
        >/scratch/probe.out 2>/scratch/probe.err; then
    ep=$(tail -n 1 /scratch/probe.out)
    say "probe_meta=$(tr -d '\n' < "$ep/meta.json")"
    if $T/cis490 check "$ep" >/scratch/check.out 2>&1; then
        say "probe_check=ok"
    else
        say "probe_check=$(tr '\n' ' ' < /scratch/check.out)"
    fi
else
    say "probe_error=$(tr '\n' ' ' < /scratch/probe.err)"
fi

# The same kernel with its BTF hidden: one clear error line.
if mount -t tmpfs -o size=64k nobtf /sys/kernel/btf; then
    $T/cis490 trace --data-dir /scratch/nobtf --progress-secs 0 -- true \
        >/dev/null 2>/scratch/nobtf.err
    rc=$?
    umount /sys/kernel/btf
    say "no_btf=exit $rc: $(grep '^error: ' /scratch/nobtf.err | head -n 1)"
else
    say "error=hide_btf"
fi

set -o pipefail
skips=
for s in $skip; do skips="$skips --skip $s"; done
passed=0 failed=0
for t in $tests; do
    say "test_binary_start=$t"
    start=$(date +%s)
    # A hung test binary is killed, counted as failed, and the next one runs.
    if timeout -s KILL @BINARY_TIMEOUT@ $T/deps/$t --test-threads=1 --show-output $skips $filter \
            2>&1 | tee "/scratch/test-$t.log"; then
        rc=0
    else
        rc=$?
    fi
    res=$(grep '^test result:' "/scratch/test-$t.log" | tail -n 1)
    p=$(echo "$res" | sed -n 's/.* \([0-9][0-9]*\) passed;.*/\1/p')
    f=$(echo "$res" | sed -n 's/.* \([0-9][0-9]*\) failed;.*/\1/p')
    [ -n "$p" ] || p=0
    # No result line: the binary itself died; count it as one failure.
    [ -n "$f" ] || f=1
    [ $rc -eq 0 ] || [ $f -gt 0 ] || f=1
    [ $rc -ne 137 ] || say "error=test_binary_timeout_$t"
    passed=$((passed + p))
    failed=$((failed + f))
    say "test_binary_end=$t exit=$rc passed=$p failed=$f secs=$(($(date +%s) - start))"
done
echo "cis490-vm-result: kernel=$(uname -r) passed=$passed failed=$failed"
sync
poweroff -f
"#;

/// Options of one `vm` run.
#[derive(Clone, Debug)]
pub struct Options {
    pub timeout: Duration,
    pub memory_mib: u32,
    pub smp: u32,
    /// Print every console line, not just progress.
    pub verbose: bool,
    /// libtest name filters.
    pub filters: Vec<String>,
    /// More kernel command line (e.g. `loglevel=7`).
    pub append: Option<String>,
}

impl Default for Options {
    /// What `integration-test vm` uses without options.
    fn default() -> Self {
        Options {
            timeout: Duration::from_secs(900),
            memory_mib: 2048,
            smp: 2,
            verbose: false,
            filters: Vec::new(),
            append: None,
        }
    }
}

/// What one kernel's run found.
#[derive(Debug, Default)]
pub struct KernelRun {
    /// As asked (`6.1`).
    pub spec: String,
    pub package: String,
    /// `uname -r` of the kernel.
    pub release: String,
    pub accel: String,
    pub booted: Option<Duration>,
    pub elapsed: Duration,
    pub probes: Option<ProbeSummary>,
    pub probe_error: Option<String>,
    pub probe_check: Option<String>,
    pub no_btf: Option<String>,
    /// (test, outcome `ok`/`FAILED`/`ignored`, time since the previous line).
    pub tests: Vec<(String, String, Duration)>,
    pub passed: Option<u64>,
    pub failed: Option<u64>,
    /// Why the run failed beyond failed tests: init errors, a panic, a
    /// timeout, a missing result line.
    pub errors: Vec<String>,
    /// A fault of the emulated machine itself, not of a test: a kernel
    /// panic, BUG or Oops, no output until the timeout (a lockup), QEMU
    /// ending without a result line. Only such a run is run once more.
    pub machine_fault: Option<String>,
    pub console: PathBuf,
}

impl KernelRun {
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.failed == Some(0) && self.passed.is_some_and(|p| p > 0)
    }

    pub fn result(&self) -> String {
        match (self.passed, self.failed) {
            (Some(p), Some(f)) if self.errors.is_empty() => format!("{p} passed, {f} failed"),
            (Some(p), Some(f)) => format!("{p} passed, {f} failed; {}", self.errors.join("; ")),
            _ => self.errors.join("; "),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::json!({
            "spec": self.spec,
            "package": self.package,
            "release": self.release,
            "accel": self.accel,
            "booted_s": self.booted.map(|d| d.as_secs_f64()),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "probes": self.probes.as_ref().map(ProbeSummary::json),
            "probe_error": self.probe_error,
            "probe_check": self.probe_check,
            "no_btf": self.no_btf,
            "tests": self.tests.iter().map(|(n, o, d)| serde_json::json!({
                "test": n, "outcome": o, "secs": d.as_secs_f64(),
            })).collect::<Vec<_>>(),
            "passed": self.passed,
            "failed": self.failed,
            "errors": self.errors,
            "machine_fault": self.machine_fault,
            "ok": self.ok(),
            "console": self.console,
        })
    }
}

/// `$CIS490_VM_CACHE`, else `~/.cache/cis490/vm`.
pub fn cache_dir() -> PathBuf {
    guest::cache_dir_of(CACHE_ENV, "vm")
}

/// The kernel package a spec names: `6.1` and `6.12` (any `X.Y`) through
/// Debian's meta-packages (the newest such kernel), a package name as is,
/// else a release (`6.1.0-56-amd64` is `linux-image-6.1.0-56-amd64`).
fn resolve_package(apt: &mut Apt, spec: &str) -> Result<String> {
    if spec.starts_with("linux-image-") {
        return Ok(spec.to_owned());
    }
    let is_series = spec.split('.').count() == 2
        && spec
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if !is_series {
        return Ok(format!("linux-image-{spec}"));
    }
    let prefix = format!("linux-image-{spec}.");
    // Debian 12: linux-image-amd64 is the 6.1 series; newer series have
    // their own meta-package (linux-image-6.12-amd64).
    // Apt's lists as they are first, then once more after `apt-get update`.
    let metas = [
        format!("linux-image-{spec}-amd64"),
        "linux-image-amd64".into(),
    ];
    for update in [false, true] {
        if update {
            apt.update()?;
        }
        if let Some(p) = metas
            .iter()
            .filter_map(|m| guest::known_meta_dependency(m))
            .find(|p| p.starts_with(&prefix))
        {
            return Ok(p);
        }
    }
    bail!(
        "no Debian kernel package for {spec}: neither linux-image-{spec}-amd64 nor \
         linux-image-amd64 depends on a {prefix}* package (try `apt-cache search {prefix}`)"
    )
}

/// The kernel image and modules for `spec`, from the cache or downloaded.
fn ensure_kernel(apt: &mut Apt, spec: &str) -> Result<(String, KernelFiles)> {
    let cache = cache_dir();
    let kernels = cache.join("kernels");
    let package = match resolve_package(apt, spec) {
        Ok(p) => p,
        Err(e) => {
            // Offline: the newest cached kernel of that series will do.
            let mut cached: Vec<String> = fs::read_dir(&kernels)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("linux-image-{spec}.")))
                .collect();
            cached.sort();
            match cached.pop() {
                Some(p) => {
                    eprintln!("vm: {e:#}: using the cached {p}");
                    p
                }
                None => return Err(e),
            }
        }
    };
    let dir = kernels.join(&package);
    if let Some(k) = KernelFiles::load(&dir, &guest::modules(MODULES)) {
        return Ok((package, k));
    }
    eprintln!("vm: {spec}: fetching {package}");
    fs::create_dir_all(&kernels)?;
    let files = guest::fetch_kernel(apt, &package, &cache, &dir, &guest::modules(MODULES))
        .with_context(|| format!("cannot fetch kernel package {package}"))?;
    Ok((package, files))
}

/// The shared libraries (and the dynamic loader) `ldd` names for `bin`.
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": static, nothing to copy.
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("{}: a library is missing: {line}", bin.display());
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// `bin` without its debug info (through the host's `strip` when there is
/// one): a smaller initramfs boots faster under emulation.
fn stripped(bin: &Path, scratch: &Path) -> Result<Vec<u8>> {
    let out = scratch.join("stripped");
    let ok = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let data = if ok { fs::read(&out)? } else { fs::read(bin)? };
    let _ = fs::remove_file(&out);
    Ok(data)
}

/// Collects initramfs entries, creating parent directories first.
#[derive(Default)]
struct Tree {
    dirs: std::collections::BTreeSet<String>,
    files: BTreeMap<String, (u32, Vec<u8>)>,
    links: BTreeMap<String, String>,
}

impl Tree {
    fn parents(&mut self, path: &str) {
        let mut p = Path::new(path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            self.dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }

    fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        let path = path.trim_start_matches('/').to_owned();
        self.parents(&path);
        self.files.insert(path, (mode, data));
    }

    fn symlink(&mut self, path: &str, target: &str) {
        let path = path.trim_start_matches('/').to_owned();
        self.parents(&path);
        self.links.insert(path, target.to_owned());
    }

    /// A host file at the same path (its content, symlinks followed).
    fn host_file(&mut self, path: &Path) -> Result<()> {
        let data = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        self.file(&path.to_string_lossy(), 0o755, data);
        Ok(())
    }

    fn cpio(self) -> Vec<u8> {
        let mut c = Cpio::default();
        for d in &self.dirs {
            c.dir(d);
        }
        c.char_dev("dev/console", 0o600, 5, 1);
        c.char_dev("dev/null", 0o666, 1, 3);
        for (path, (mode, data)) in &self.files {
            c.file(path, *mode, data);
        }
        for (path, target) in &self.links {
            c.symlink(path, target);
        }
        c.finish()
    }
}

/// The VM's whole `/init` for these modules (in load order).
fn init_script(modules: &[String]) -> String {
    let body = INIT
        .replace("@BIN_DIR@", GUEST_BIN_DIR)
        .replace("@BINARY_TIMEOUT@", &BINARY_TIMEOUT_SECS.to_string());
    guest::init_script(
        "cis490-vm",
        "cis490 VM test runner (written by `cargo xtask integration-test vm`)",
        modules,
        &body,
    )
}

/// Writes the initramfs for one kernel into `out`.
fn write_initramfs(
    out: &Path,
    kernel: &KernelFiles,
    busybox: &Path,
    bins: &[PathBuf],
    tests: &[TestBinary],
) -> Result<()> {
    let work = out.parent().unwrap();
    let mut tree = Tree::default();
    for d in ["proc", "sys", "dev", "run", "tmp", "scratch", "etc"] {
        tree.dirs.insert(d.into());
    }
    tree.symlink("var/run", "/run");
    let init = init_script(&kernel.order);
    tree.file("init", 0o755, init.into_bytes());
    tree.file("bin/busybox", 0o755, fs::read(busybox)?);
    // root's user and group entries: tcpdump looks up the user it runs as
    // (`-Z root`, so it keeps root's rights instead of dropping to
    // `tcpdump`, whom this VM does not know).
    tree.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
    );
    tree.file("etc/group", 0o644, b"root:x:0:\n".to_vec());
    let list = guest::output(Command::new(busybox).arg("--list"))?;
    for applet in list.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet != "busybox" {
            tree.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    for name in &kernel.order {
        tree.file(
            &format!("lib/modules/{name}.ko"),
            0o644,
            fs::read(kernel.module(name))?,
        );
    }
    let mut libs = std::collections::BTreeSet::new();
    for tool in HOST_TOOLS {
        let path = guest::find_in_path(tool)
            .or_else(|| {
                ["/usr/sbin", "/sbin"]
                    .map(|d| Path::new(d).join(tool))
                    .into_iter()
                    .find(|p| p.is_file())
            })
            .with_context(|| format!("{tool} is not installed on this host (the VM copies it)"))?;
        tree.file(&format!("usr/bin/{tool}"), 0o755, fs::read(&path)?);
        libs.extend(shared_libraries(&path)?);
    }
    for bin in bins {
        let name = bin.file_name().unwrap().to_string_lossy();
        tree.file(
            &format!("{GUEST_BIN_DIR}/{name}"),
            0o755,
            stripped(bin, work)?,
        );
        libs.extend(shared_libraries(bin)?);
    }
    for t in tests {
        tree.file(
            &format!("{GUEST_BIN_DIR}/deps/{}", t.name),
            0o755,
            stripped(&t.path, work)?,
        );
        libs.extend(shared_libraries(&t.path)?);
    }
    for lib in &libs {
        tree.host_file(lib)?;
    }
    let archive = tree.cpio();
    guest::write_atomic(out, &archive)?;
    Ok(())
}

/// A fresh ext4 scratch disk (sparse file; no lazy initialisation, so the
/// guest's kernel writes nothing of its own in the background).
fn make_scratch_disk(path: &Path) -> Result<()> {
    let _ = fs::remove_file(path);
    let f = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.set_len(SCRATCH_MIB << 20)?;
    drop(f);
    let mkfs = guest::find_in_path("mkfs.ext4")
        .or_else(|| Some(PathBuf::from("/usr/sbin/mkfs.ext4")).filter(|p| p.is_file()))
        .context(
            "mkfs.ext4 is missing (Debian package e2fsprogs): the VM's scratch disk needs it",
        )?;
    guest::output(
        Command::new(mkfs)
            .args(["-q", "-F", "-L", "cis490-scratch"])
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(path),
    )?;
    Ok(())
}

/// QEMU's command for a kernel of the matrix, through the one builder of
/// QEMU command lines (`cis490_tests::guest::qemu_argv`): the serial
/// console alone on stdout (read from a pipe), the scratch disk on virtio
/// with `cache=unsafe` (scratch data: QEMU may cache it and ignore
/// flushes), no network.
fn qemu_command(
    qemu: &Path,
    accel: &str,
    opts: &Options,
    kernel: &KernelFiles,
    initrd: &Path,
    disk: &Path,
    params: &str,
) -> Command {
    let guest = cis490_tests::guest::Guest {
        kernel: kernel.vmlinuz(),
        initrd: initrd.to_owned(),
        kernel_version: kernel.version.clone(),
        qemu: qemu.to_owned(),
    };
    let launch = cis490_tests::guest::Launch {
        accel: accel.to_owned(),
        params: params.to_owned(),
        disk: Some(disk.to_owned()),
        disk_cache: Some("unsafe"),
        smp: Some(opts.smp),
        memory_mib: Some(opts.memory_mib),
        ..Default::default()
    };
    cis490_tests::guest::qemu_command(&guest, &launch)
}

/// Boots one kernel and runs the tests; never fails itself (what went wrong
/// is in the returned run), except when the VM cannot be prepared.
#[allow(clippy::too_many_arguments)]
pub fn run_kernel(
    spec: &str,
    apt: &mut Apt,
    qemu: &Path,
    accel: &str,
    busybox: &Path,
    bins: &[PathBuf],
    tests: &[TestBinary],
    skip: &[String],
    opts: &Options,
) -> Result<KernelRun> {
    let (package, kernel) = ensure_kernel(apt, spec)?;
    let release = kernel.version.clone();
    let tag = format!("vm {release}");
    let out_dir = crate::workspace_root().join("target/vm").join(&release);
    fs::create_dir_all(&out_dir)?;
    let initrd = out_dir.join("initramfs.cpio");
    let t0 = Instant::now();
    write_initramfs(&initrd, &kernel, busybox, bins, tests)?;
    let disk = cache_dir().join(format!("scratch-{release}.img"));
    make_scratch_disk(&disk)?;
    eprintln!(
        "{tag}: initramfs {} MiB and a {SCRATCH_MIB} MiB ext4 scratch disk ready in {:.1} s",
        fs::metadata(&initrd)?.len() >> 20,
        t0.elapsed().as_secs_f64()
    );
    let names: Vec<&str> = tests.iter().map(|t| t.name.as_str()).collect();
    // loglevel=5: warnings and stack traces reach the console (and
    // console.log), so a lockup or a verifier splat shows its stack.
    // After the guests' common `console=ttyS0 panic=-1 quiet`
    // (`cis490_tests::guest::BASE_APPEND`); a later loglevel wins.
    let mut append = format!(
        "loglevel=5 cis490.accel={accel} cis490.tests={}",
        names.join(",")
    );
    if !skip.is_empty() {
        append.push_str(&format!(" cis490.skip={}", skip.join(",")));
    }
    if !opts.filters.is_empty() {
        append.push_str(&format!(" cis490.filter={}", opts.filters.join(",")));
    }
    if let Some(more) = &opts.append {
        append.push(' ');
        append.push_str(more);
    }
    let length = cis490_tests::guest::BASE_APPEND.len() + 1 + append.len();
    if length > 2000 {
        bail!("the kernel command line would be {length} bytes (limit 2048): {append}");
    }
    let console = out_dir.join("console.log");
    let mut run = KernelRun {
        spec: spec.to_owned(),
        package,
        release: release.clone(),
        accel: accel.to_owned(),
        console: console.clone(),
        ..KernelRun::default()
    };
    eprintln!(
        "{tag}: booting ({accel}, {} vCPUs, {} MiB; timeout {} s; console in {})",
        opts.smp,
        opts.memory_mib,
        opts.timeout.as_secs(),
        console.display()
    );
    let start = Instant::now();
    let Console {
        mut child,
        lines,
        stderr,
    } = Console::spawn(qemu_command(
        qemu, accel, opts, &kernel, &initrd, &disk, &append,
    ))?;
    let mut log = fs::File::create(&console)
        .with_context(|| format!("cannot create {}", console.display()))?;
    let deadline = start + opts.timeout;
    let mut last = start;
    let mut result_seen = false;
    let mut status = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok((at, line)) => {
                let _ = writeln!(log, "{line}");
                if opts.verbose {
                    eprintln!("{tag} | {line}");
                }
                let fatal = on_line(&tag, &mut run, &line, at - start, &mut last, at);
                if line.starts_with("cis490-vm-result:") {
                    result_seen = true;
                }
                if let Some(why) = fatal {
                    run.machine_fault = Some(why.clone());
                    run.errors.push(why);
                    kill(&mut child);
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let why = format!("timed out after {} s (QEMU killed)", opts.timeout.as_secs());
                run.machine_fault = Some(why.clone());
                run.errors.push(why);
                kill(&mut child);
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                status = Some(child.wait().context("waiting for QEMU")?);
                break;
            }
        }
    }
    run.elapsed = start.elapsed();
    let stderr = stderr.join().unwrap_or_default();
    if !result_seen && run.errors.is_empty() {
        let why = format!(
            "QEMU ended ({}) without a result line{}",
            status.map_or("killed".to_owned(), |s| s.to_string()),
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", stderr.trim())
            }
        );
        run.machine_fault = Some(why.clone());
        run.errors.push(why);
    }
    check_extras(&mut run);
    eprintln!(
        "{tag}: {} in {:.0} s: {}",
        if run.ok() { "PASSED" } else { "FAILED" },
        run.elapsed.as_secs_f64(),
        run.result()
    );
    if run.ok() {
        let _ = fs::remove_file(&disk);
    }
    Ok(run)
}

/// Findings beyond the tests: the probe trace worked, and a kernel whose
/// BTF is hidden gives the one-line error naming CONFIG_DEBUG_INFO_BTF.
fn check_extras(run: &mut KernelRun) {
    if run.passed.is_none() {
        return;
    }
    if let Some(e) = &run.probe_error {
        run.errors.push(format!("the probe trace failed: {e}"));
    } else if run.probes.is_none() {
        run.errors
            .push("no probe report (meta.json) on the console".into());
    }
    if let Some(c) = run.probe_check.as_ref().filter(|c| *c != "ok") {
        run.errors
            .push(format!("cis490 check of the probe trace: {c}"));
    }
    match &run.no_btf {
        Some(l)
            if l.contains("CONFIG_DEBUG_INFO_BTF")
                && l.contains("/sys/kernel/btf/vmlinux")
                && !l.starts_with("exit 0") => {}
        Some(l) => run.errors.push(format!(
            "with its BTF hidden, cis490 did not fail with a clear message: {l}"
        )),
        None => run.errors.push("no report of the hidden-BTF run".into()),
    }
}

/// Handles one console line; returns why to stop the VM now, if so.
fn on_line(
    tag: &str,
    run: &mut KernelRun,
    line: &str,
    since_start: Duration,
    last: &mut Instant,
    at: Instant,
) -> Option<String> {
    // Kernel messages carry a `[  12.345678] ` time stamp (and may start in
    // the middle of a line a test is writing).
    let kernel_msg = line.find("] ").map(|i| &line[i + 2..]);
    if line.contains("Kernel panic")
        || kernel_msg.is_some_and(|m| m.contains("BUG: ") || m.starts_with("Oops: "))
    {
        eprintln!("{tag} | {line}");
        return Some(format!("kernel: {}", line.trim()));
    }
    if let Some(kv) = line.strip_prefix("cis490-vm: ") {
        // `key=value`, or `key value...` (`booted kernel=...`).
        let (k, v) = match kv.find(['=', ' ']) {
            Some(i) => (&kv[..i], &kv[i + 1..]),
            None => (kv, ""),
        };
        match k {
            "booted" => {
                run.booted = Some(since_start);
                *last = at;
                eprintln!("{tag}: booted in {:.1} s ({v})", since_start.as_secs_f64());
            }
            "error" => {
                eprintln!("{tag}: init error: {v}");
                run.errors.push(format!("init: {v}"));
            }
            "probe_meta" => match serde_json::from_str::<Value>(v) {
                Ok(meta) => {
                    let s = ProbeSummary::from_meta(&meta);
                    for l in s.lines() {
                        eprintln!("{tag}: {l}");
                    }
                    run.probes = Some(s);
                }
                Err(e) => {
                    run.probe_error = Some(format!("meta.json unreadable on the console: {e}"))
                }
            },
            "probe_error" => {
                eprintln!("{tag}: probe trace failed: {v}");
                run.probe_error = Some(v.to_owned());
            }
            "probe_check" => run.probe_check = Some(v.to_owned()),
            "no_btf" => {
                eprintln!("{tag}: BTF hidden: {v}");
                run.no_btf = Some(v.to_owned());
            }
            "test_binary_start" => {
                *last = at;
                eprintln!("{tag}: running {v}");
            }
            "test_binary_end" => eprintln!("{tag}: {v}"),
            _ => eprintln!("{tag}: {kv}"),
        }
        return None;
    }
    if let Some(rest) = line.strip_prefix("cis490-vm-result: ") {
        for kv in rest.split_whitespace() {
            match kv.split_once('=') {
                Some(("passed", n)) => run.passed = n.parse().ok(),
                Some(("failed", n)) => run.failed = n.parse().ok(),
                _ => {}
            }
        }
        return None;
    }
    // libtest: "test NAME ... ok" (with --test-threads=1, one per line); a
    // test's own output or a kernel message can come between the name and
    // its outcome, which then ends a later line.
    const OUTCOMES: &[&str] = &["ok", "FAILED", "ignored"];
    let outcome_of = |s: &str| OUTCOMES.iter().find(|o| s.trim() == **o).copied();
    if let Some(rest) = line.strip_prefix("test ")
        && let Some((name, after)) = rest.split_once(" ... ")
    {
        match OUTCOMES.iter().find(|o| after.trim() == **o) {
            Some(outcome) => {
                let took = at - *last;
                *last = at;
                eprintln!(
                    "{tag}:   {name} ... {outcome} ({:.1} s)",
                    took.as_secs_f64()
                );
                run.tests.push((name.to_owned(), outcome.to_string(), took));
            }
            None => run
                .tests
                .push((name.to_owned(), String::new(), Duration::ZERO)),
        }
    } else if let Some(t) = run.tests.last_mut().filter(|t| t.1.is_empty())
        && let Some(outcome) = outcome_of(line)
    {
        let took = at - *last;
        *last = at;
        eprintln!(
            "{tag}:   {} ... {outcome} ({:.1} s)",
            t.0,
            took.as_secs_f64()
        );
        t.1 = outcome.to_owned();
        t.2 = took;
    } else if line.starts_with("test result:") || line.contains("panicked at") {
        eprintln!("{tag}:   {line}");
    }
    None
}

/// The pieces every kernel's VM shares: QEMU, the accelerator, busybox.
pub fn host_parts(apt: &mut Apt) -> Result<(PathBuf, &'static str, PathBuf)> {
    let qemu = guest::ensure_qemu(apt)?;
    let g = guest::ensure()?;
    let accel = guest::accel(&g)?;
    let busybox = guest::ensure_busybox(&guest::cache_dir(), apt)?;
    Ok((qemu, accel, busybox))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_reads_every_parameter_and_reports_a_result() {
        let init = init_script(&["virtio".into(), "ext4".into()]);
        assert!(init.starts_with("#!/bin/sh\n") && init.contains("for m in virtio ext4; do"));
        assert!(!init.contains('@'), "a placeholder left: {init}");
        for p in ["accel", "tests", "skip", "filter"] {
            assert!(init.contains(&format!("cis490.{p}=*)")), "{p}");
        }
        assert!(init.contains("cis490-vm-result: kernel="));
        for fs in ["proc", "sysfs", "devtmpfs", "tracefs", "bpf", "cgroup2"] {
            assert!(init.contains(&format!("mnt {fs} ")), "{fs}");
        }
    }

    #[test]
    fn console_lines_are_parsed() {
        let mut run = KernelRun::default();
        let t = Instant::now();
        let mut last = t;
        assert!(
            on_line(
                "t",
                &mut run,
                "cis490-vm: booted kernel=6.1",
                Duration::from_secs(8),
                &mut last,
                t
            )
            .is_none()
        );
        assert_eq!(run.booted, Some(Duration::from_secs(8)));
        on_line(
            "t",
            &mut run,
            "test cpu_time ... ok",
            Duration::ZERO,
            &mut last,
            t,
        );
        // A failed test is not a fault of the machine (never run again).
        assert!(
            on_line(
                "t",
                &mut run,
                "test late ... FAILED",
                Duration::ZERO,
                &mut last,
                t,
            )
            .is_none()
        );
        assert_eq!(run.tests.len(), 2);
        assert_eq!(run.tests[1].1, "FAILED");
        // The outcome after a kernel message, on a later line.
        on_line(
            "t",
            &mut run,
            "test disk ... [   57.2] EXT4-fs (loop0): shut down requested (2)",
            Duration::ZERO,
            &mut last,
            t,
        );
        on_line(
            "t",
            &mut run,
            "[   57.3] Aborting journal",
            Duration::ZERO,
            &mut last,
            t,
        );
        assert_eq!(run.tests[2].1, "");
        on_line("t", &mut run, "it took", Duration::ZERO, &mut last, t);
        assert_eq!(run.tests[2].1, "");
        on_line("t", &mut run, "ok", Duration::ZERO, &mut last, t);
        assert_eq!(run.tests[2], ("disk".into(), "ok".into(), Duration::ZERO));
        run.tests.pop();
        on_line(
            "t",
            &mut run,
            "cis490-vm-result: kernel=6.1.0 passed=20 failed=1",
            Duration::ZERO,
            &mut last,
            t,
        );
        assert_eq!((run.passed, run.failed), (Some(20), Some(1)));
        assert!(!run.ok());
        assert!(
            on_line(
                "t",
                &mut run,
                "[  1.0] Kernel panic - not syncing: x",
                Duration::ZERO,
                &mut last,
                t
            )
            .is_some()
        );
        assert!(
            on_line(
                "t",
                &mut run,
                "[ 90.1] watchdog: BUG: soft lockup - CPU#1 stuck for 26s!",
                Duration::ZERO,
                &mut last,
                t
            )
            .is_some()
        );
    }
}
