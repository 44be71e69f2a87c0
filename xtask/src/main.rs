//! `cargo xtask <task>`: everything the project needs beyond `cargo build`.
//!
//! - `setup`: the eBPF toolchain (nightly + rust-src + bpf-linker built
//!   against nightly's own LLVM); idempotent and fast when already done.
//! - `build-ebpf`: builds the eBPF object (through cis490's build.rs) and
//!   prints its path and program sizes.
//! - `demo`: setup, build, trace the bundled workload, print a summary, write
//!   the report page.
//! - `test`: setup, build, run every test (unit, a bounded run of every
//!   fuzz target, privileged on the host kernel, then privileged in VMs
//!   on Debian's 6.1 and 6.12 kernels unless `CIS490_SKIP_VM=1`).
//! - `fuzz`: run the fuzz targets for longer.
//! - `bench`: setup, build, benchmark cis490 beside bpftrace and a /proc
//!   poller; write the table into docs/benchmarks.md.
//! - `integration-test local|vm`: the privileged tests on the host kernel,
//!   or on Debian kernels booted in QEMU VMs.

mod agent;
mod apt;
mod bench;
mod browser;
mod capture;
mod demo;
mod fuzz;
mod guest;
mod integration;
mod probe_summary;
mod pyenv;
mod setup;
mod testbins;
mod testrun;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "cis490 project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain (nightly rust-src, bpf-linker) if missing.
    Setup,
    /// Build the eBPF object and print its path and program sizes.
    BuildEbpf {
        /// Build in release mode.
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, trace the bundled workload, print the episode and a
    /// summary, write its report page (cis490 report) and print its path.
    Demo {
        /// Where episodes go.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
    },
    /// Set up, build, then run all tests: unit tests, a bounded run of
    /// every fuzz target, then the privileged integration tests (need root)
    /// on the host kernel, then the same tests on the Debian kernels of
    /// `integration-test vm` in QEMU VMs (skipped with CIS490_SKIP_VM=1).
    Test {
        /// Seconds each fuzz target runs (0: skip the fuzz run).
        #[arg(long, default_value_t = fuzz::TEST_SECS)]
        fuzz_secs: u64,
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the fuzz targets (cargo-fuzz, nightly; installed if missing),
    /// each for `--secs`. See docs/fuzzing.md.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        secs: u64,
        /// Only this target (record, proc, qmp, guest).
        target: Option<String>,
    },
    /// Benchmark cis490's overhead beside bpftrace and a /proc poller on
    /// eight workloads (context-switch storms: pinned, unpinned, one per
    /// CPU, and yield storms one per CPU; a many-thread CPU burn with
    /// wakeups, direct I/O, tap traffic, the demo's QEMU guest), then the
    /// gateway and scaling parts; write the tables into docs/benchmarks.md
    /// and print them. Needs root; installs bpftrace with apt if missing.
    /// Long: every workload runs 7 rounds under every tracer (pick some
    /// with --workloads and --tracers; --quick for a short check).
    Bench(bench::Args),
    /// Build the in-guest agent (cis490-agent) as a static executable and
    /// print its path (the guest images include it and start it at boot).
    BuildAgent,
    /// Build the test guest (kernel + busybox initramfs with the agent,
    /// cached outside the repo), probe the accelerator, write and print
    /// guest.json.
    Guest {
        /// Also boot the guest once with a sample disk workload.
        #[arg(long)]
        boot: bool,
    },
    /// Run the privileged integration tests on the host kernel (`local`) or
    /// on Debian kernels in QEMU VMs (`vm [KERNEL...]`), and report which
    /// probe path each family took on each kernel.
    IntegrationTest {
        #[command(subcommand)]
        target: integration::Target,
    },
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A `cargo` command in the workspace, with the toolchain's bin dir on PATH.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd.env("PATH", setup::path_with_cargo_bin());
    cmd
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::ensure(),
        Task::BuildEbpf { release } => build_ebpf(release),
        Task::Demo { data_dir } => demo(&data_dir),
        Task::Test { fuzz_secs, args } => test(fuzz_secs, &args),
        Task::Fuzz { secs, target } => fuzz::run(secs, target.as_deref()),
        Task::BuildAgent => agent::task(),
        Task::Guest { boot } => guest::task(boot),
        Task::Bench(args) => bench_task(args),
        Task::IntegrationTest { target } => integration::task(target),
    }
}

/// Builds cis490 (whose build.rs builds the eBPF object) and reports the
/// object that was embedded.
fn build_ebpf(release: bool) -> Result<()> {
    setup::ensure()?;
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "cis490",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("cargo build")?;
    if !out.status.success() {
        bail!("cargo build -p cis490 failed");
    }
    let mut object = None;
    for line in out.stdout.split(|&b| b == b'\n') {
        let Ok(msg) = serde_json::from_slice::<serde_json::Value>(line) else {
            continue;
        };
        // package_id: "path+file:///.../cis490#0.1.0"
        if msg["reason"] == "build-script-executed"
            && msg["package_id"]
                .as_str()
                .is_some_and(|id| id.contains("/cis490#"))
            && let Some(dir) = msg["out_dir"].as_str()
        {
            object = Some(PathBuf::from(dir).join("cis490-ebpf"));
        }
    }
    let object = object.context("cargo did not report cis490's build-script output directory")?;
    print_programs(&object)
}

fn print_programs(path: &Path) -> Result<()> {
    use object::{Object as _, ObjectSection as _};
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file = object::File::parse(&*data)?;
    println!("eBPF object: {} ({} bytes)", path.display(), data.len());
    println!("{:<36} {:>8} {:>8}", "program section", "bytes", "insns");
    for s in file.sections() {
        let name = s.name().unwrap_or("");
        if name.starts_with("tp_btf/")
            || name.starts_with("tracepoint/")
            || name.starts_with("raw_tp/")
        {
            println!("{:<36} {:>8} {:>8}", name, s.size(), s.size() / 8);
        }
    }
    Ok(())
}

/// Fails with a message naming `what` unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "{what} loads eBPF programs and needs root (CAP_BPF, CAP_PERFMON): \
             run `sudo -E cargo xtask {what}`"
        );
    }
    Ok(())
}

pub fn build_bins(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "cis490",
        "--package",
        "cis490-tests",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" }))
}

fn demo(data_dir: &Path) -> Result<()> {
    setup::ensure()?;
    if !is_root() {
        bail!("the demo loads eBPF programs and needs root: run `sudo -E cargo xtask demo`");
    }
    let bin = build_bins(true)?;
    demo::run_demo(&bin, &workspace_root().join(data_dir))
}

fn bench_task(args: bench::Args) -> Result<()> {
    setup::ensure()?;
    if !is_root() {
        bail!("the bench loads eBPF programs and needs root: run `sudo -E cargo xtask bench`");
    }
    let bin = build_bins(true)?;
    let wants_qemu = !args.gateway_only
        && (args.workloads.is_empty() || args.workloads.contains(&bench::Kind::Qemu));
    let guest = wants_qemu.then(|| {
        guest::prepare().map(|(g, accel, _)| cis490_tests::guest::GuestJson {
            guest: g,
            accel: accel.to_owned(),
        })
    });
    bench::run(args, &bin, guest)
}

fn test(fuzz_secs: u64, args: &[String]) -> Result<()> {
    // Some unit tests need root too (the KVM tracepoints' formats in
    // tracefs), and a test that cannot run is a failure, not a pass: as
    // another user, stop before running anything.
    if !is_root() {
        bail!(
            "the tests need root (the privileged integration tests load eBPF programs: CAP_BPF, \
             CAP_PERFMON; some unit tests read tracefs; bpftool and QEMU are installed with apt if \
             missing): run `sudo -E cargo xtask test`"
        );
    }
    setup::ensure()?;
    build_bins(false)?;
    // What the tests check against, installed if missing: bpftool (the BTF
    // cross-check) and the QEMU guest.
    let bpftool = testrun::ensure_bpftool()?;
    eprintln!("test: bpftool: {}", bpftool.display());
    let (_, accel, guest_json) = guest::prepare()?;
    eprintln!("test: QEMU guest ready ({accel}): {}", guest_json.display());
    let mut skips = testrun::Skips::default();
    let mut unit = cargo();
    unit.env(guest::JSON_ENV, &guest_json);
    // The eBPF crate only builds for the BPF target (cis490's build.rs does
    // that); its shared types are tested through cis490-common.
    unit.args([
        "test",
        "--package",
        "cis490-common",
        "--package",
        "cis490",
        "--package",
        "xtask",
        "--",
    ])
    .args(args);
    skips.run(&mut unit)?;
    // No privileges needed: every target for a bounded time (seeds, the
    // crash regressions among them, then new inputs).
    if fuzz_secs > 0 {
        fuzz::run(fuzz_secs, None)?;
    }
    // DuckDB, pyarrow and moto for the dataset tests (a venv, made once).
    let python = pyenv::ensure()?;
    // The browser the report test opens its page in.
    let chromium = browser::ensure_chromium(&mut guest::Apt::default())?;
    eprintln!("test: browser ready: {}", chromium.display());
    // The capture the gateway test holds the gateway collector against.
    let tcpdump = capture::ensure_tcpdump(&mut guest::Apt::default())?;
    let mut privileged = cargo();
    privileged.env(guest::JSON_ENV, &guest_json);
    privileged.env(pyenv::PYTHON_ENV, &python);
    privileged.env(cis490_tests::browser::CHROMIUM_ENV, &chromium);
    privileged.env(cis490_tests::capture::TCPDUMP_ENV, &tcpdump);
    // One at a time: each test times real workloads on a 2-core machine.
    privileged
        .args([
            "test",
            "--package",
            "cis490-tests",
            "--",
            "--test-threads=1",
        ])
        .args(args);
    skips.run(&mut privileged)?;
    // Every test above ran, or the run says which did not and fails.
    skips.report()?;
    // The same tests on other kernels, in VMs (about 10 minutes here).
    if std::env::var(SKIP_VM_ENV).is_ok_and(|v| v == "1") {
        eprintln!("test: {SKIP_VM_ENV}=1: the VM matrix (other kernels) skipped");
        return Ok(());
    }
    integration::vm(
        &[],
        &vm::Options {
            filters: args.to_vec(),
            ..vm::Options::default()
        },
    )
}

/// Env var: `1` leaves the VM matrix out of `cargo xtask test`.
pub const SKIP_VM_ENV: &str = "CIS490_SKIP_VM";
