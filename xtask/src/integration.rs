//! `cargo xtask integration-test local|vm`: the privileged integration tests
//! on the host kernel, or on Debian kernels booted in QEMU VMs (see
//! [`crate::vm`]), each run reporting which probe path every family took.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use serde_json::Value;

use crate::{cargo, guest, probe_summary::ProbeSummary, setup, testbins::build_test_binaries, vm};

#[derive(Subcommand, Debug)]
pub enum Target {
    /// The host kernel: the privileged tests as `cargo xtask test` runs
    /// them, then the probe paths a real trace took here.
    Local {
        /// libtest arguments (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Debian kernels in QEMU VMs (KVM where a KVM boot works, else
    /// software emulation): each kernel is fetched with `apt-get download`
    /// and cached in ~/.cache/cis490/vm ($CIS490_VM_CACHE), then booted with
    /// an initramfs holding a small init, cis490, the workload and the test
    /// binaries; results and probe paths are read from the serial console.
    Vm {
        /// Kernels: a Debian series (`6.1`, `6.12`: its newest kernel), a
        /// release (`6.1.0-56-amd64`) or a package name. Default: 6.1 6.12.
        kernels: Vec<String>,
        /// Time limit per kernel (boot and every test), in seconds.
        #[arg(long, default_value_t = 900)]
        timeout_secs: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 2048)]
        memory_mib: u32,
        /// Guest vCPUs.
        #[arg(long, default_value_t = 2)]
        smp: u32,
        /// Print every console line (it is always kept in
        /// target/vm/<release>/console.log).
        #[arg(long)]
        verbose: bool,
        /// More kernel command line for the VMs (e.g. `loglevel=7`).
        #[arg(long)]
        append: Option<String>,
        /// libtest name filters, passed to every test binary in the VM.
        #[arg(last = true)]
        filters: Vec<String>,
    },
}

/// Test binaries that do not run in a VM, and why. The host run (`local`)
/// runs them.
pub const VM_SKIPPED_BINARIES: &[(&str, &str)] = &[
    (
        "dataset",
        "reads the Parquet dataset back with DuckDB and pyarrow and ships to a moto S3 server: \
         Python, which the busybox VMs do not have",
    ),
    (
        "qemu",
        "boots a QEMU guest of its own: a software-emulated guest inside a software-emulated VM \
         does not boot in reasonable time",
    ),
    (
        "guest_agent",
        "boots a QEMU guest with the guest agent (as `qemu` does): a software-emulated guest \
         inside a software-emulated VM does not boot in reasonable time",
    ),
    (
        "qmp_qemu",
        "runs QEMU and boots a guest under it (as `qemu` does), for the QMP source's real-QEMU \
         tests",
    ),
    (
        "schema",
        "validates an episode of a QEMU guest it boots (as `qemu` does) and one of /dev/kvm (as \
         `kvm` does)",
    ),
    (
        "kvm",
        "needs a working /dev/kvm, which a VM under software emulation does not have (no \
         VMX/SVM; the kvm module is loaded, so the kvm family's classic tracepoints still \
         attach: see the VM's probe report)",
    ),
    (
        "report",
        "renders the report of a QEMU guest's episode (as `qemu` does) and opens it in \
         Chromium, which the busybox VMs do not have",
    ),
];

/// Single tests that do not run in a VM (libtest `--skip` filters), and why.
pub const VM_SKIPPED_TESTS: &[(&str, &str)] = &[];

/// Runs `cis490 trace -- sleep 1` on the host and summarises its meta.json.
fn host_probe_summary(bin_dir: &Path) -> Result<ProbeSummary> {
    let dir = std::env::temp_dir().join(format!("cis490-probes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(bin_dir.join("cis490"))
        .args(["trace", "--progress-secs", "0", "--data-dir"])
        .arg(&dir)
        .args(["--", "sleep", "1"])
        .output()
        .context("cannot run cis490")?;
    if !out.status.success() {
        bail!(
            "the probe trace failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ep = stdout.lines().last().context("cis490 printed no episode")?;
    let meta: Value =
        serde_json::from_slice(&std::fs::read(Path::new(ep.trim()).join("meta.json"))?)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ProbeSummary::from_meta(&meta))
}

/// Runs the privileged tests on the host kernel (with `guest_json` for the
/// QEMU tests), echoing their output; returns (passed, failed).
pub fn run_host_tests(args: &[String], guest_json: &Path) -> Result<(u64, u64)> {
    let python = crate::pyenv::ensure()?;
    let mut cmd = cargo();
    cmd.env(guest::JSON_ENV, guest_json);
    cmd.env(crate::pyenv::PYTHON_ENV, &python);
    // One at a time: each test times real workloads on a 2-core machine.
    cmd.args([
        "test",
        "--package",
        "cis490-tests",
        "--",
        "--test-threads=1",
    ])
    .args(args)
    .stdout(Stdio::piped());
    let mut child = cmd.spawn().context("cannot run cargo test")?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut w = part.split_whitespace();
                match (w.next().and_then(|n| n.parse::<u64>().ok()), w.next()) {
                    (Some(n), Some("passed")) => passed += n,
                    (Some(n), Some("failed")) => failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        failed += 1;
    }
    Ok((passed, failed))
}

/// `integration-test local`.
pub fn local(args: &[String]) -> Result<()> {
    setup::ensure()?;
    let bin_dir = crate::build_bins(false)?;
    crate::require_root("integration-test local")?;
    let (_, accel, guest_json) = guest::prepare()?;
    eprintln!(
        "local: QEMU guest ready ({accel}): {}",
        guest_json.display()
    );
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    let summary = host_probe_summary(&bin_dir)?;
    for l in summary.lines() {
        eprintln!("local {release}: {l}");
    }
    let t0 = Instant::now();
    let (passed, failed) = run_host_tests(args, &guest_json)?;
    eprintln!(
        "local {release}: {passed} passed, {failed} failed in {:.0} s",
        t0.elapsed().as_secs_f64()
    );
    if failed > 0 {
        bail!("{failed} privileged test(s) failed on the host kernel {release}");
    }
    Ok(())
}

/// `integration-test vm`.
pub fn vm(kernels: &[String], opts: &vm::Options) -> Result<()> {
    let t0 = Instant::now();
    setup::ensure()?;
    // The tracer and the workload in release: under software emulation a
    // debug tracer falls behind short buckets and stretches every wall-clock
    // expectation. The test binaries (the harness) stay debug builds.
    let bin_dir = crate::build_bins(true)?;
    crate::require_root("integration-test vm")?;
    let tests = build_test_binaries()?;
    let bins = vec![bin_dir.join("cis490"), bin_dir.join("cis490-workload")];
    let mut run_tests = Vec::new();
    for t in &tests {
        match VM_SKIPPED_BINARIES.iter().find(|(n, _)| *n == t.name) {
            Some((_, why)) => {
                let names = t.list().unwrap_or_default();
                eprintln!(
                    "vm: skipping {} ({} tests: {}): {why}",
                    t.name,
                    names.len(),
                    names.join(", ")
                );
            }
            None => run_tests.push(t.clone()),
        }
    }
    for (name, why) in VM_SKIPPED_TESTS {
        eprintln!("vm: skipping test {name}: {why}");
    }
    let skip: Vec<String> = VM_SKIPPED_TESTS
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    let mut apt = guest::Apt::default();
    // The VM copies the host's tcpdump (the gateway test's capture).
    crate::capture::ensure_tcpdump(&mut apt)?;
    let (qemu, accel, busybox) = vm::host_parts(&mut apt)?;
    let kernels: Vec<String> = if kernels.is_empty() {
        vm::DEFAULT_KERNELS.iter().map(|s| s.to_string()).collect()
    } else {
        kernels.to_vec()
    };
    let mut runs = Vec::new();
    let mut machine_faults = Vec::new();
    for k in &kernels {
        let mut run = || {
            vm::run_kernel(
                k, &mut apt, &qemu, accel, &busybox, &bins, &run_tests, &skip, opts,
            )
            .with_context(|| format!("kernel {k}"))
        };
        let mut r = run()?;
        if let Some(fault) = r.machine_fault.clone() {
            // The emulated machine itself failed (a panic, a lockup, no
            // result): one more run tells a fault of the emulation from one
            // of cis490. A test's failed assertion is never run again: it
            // fails the run. The first attempt's console is kept beside the
            // second's.
            let first = r.console.with_file_name("console-first-attempt.log");
            let _ = std::fs::rename(&r.console, &first);
            eprintln!(
                "vm {}: the emulated machine failed ({fault}); running this kernel once more \
                 (the first attempt's console: {})",
                r.release,
                first.display()
            );
            machine_faults.push(format!("{}: {}", r.release, r.result()));
            r = run()?;
        }
        runs.push(r);
    }
    let summary = crate::workspace_root().join("target/vm/summary.json");
    let json: Vec<Value> = runs.iter().map(vm::KernelRun::json).collect();
    guest::write_atomic(&summary, format!("{:#}\n", Value::from(json)).as_bytes())?;
    eprintln!(
        "\nvm: {} kernel(s) in {:.0} s (details: {})",
        runs.len(),
        t0.elapsed().as_secs_f64(),
        summary.display()
    );
    for r in &runs {
        eprintln!(
            "  {:<28} {:<6} {:>5.0} s  {}",
            r.release,
            if r.ok() { "ok" } else { "FAILED" },
            r.elapsed.as_secs_f64(),
            r.result()
        );
        if let Some(p) = &r.probes {
            eprintln!("      {}", p.paths().join(", "));
        }
    }
    for f in &machine_faults {
        eprintln!("  the emulated machine failed once, then run again: {f}");
    }
    let failed: Vec<&str> = runs
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.release.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("the VM run failed on {}", failed.join(", "));
    }
    Ok(())
}

pub fn task(target: Target) -> Result<()> {
    match target {
        Target::Local { args } => local(&args),
        Target::Vm {
            kernels,
            timeout_secs,
            memory_mib,
            smp,
            verbose,
            append,
            filters,
        } => vm(
            &kernels,
            &vm::Options {
                timeout: Duration::from_secs(timeout_secs),
                memory_mib,
                smp,
                verbose,
                filters,
                append,
            },
        ),
    }
}
