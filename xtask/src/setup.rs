//! The eBPF toolchain, installed by the project itself.
//!
//! The eBPF crate builds with the installed nightly (`-Z build-std=core`
//! needs `rust-src`) and links with `bpf-linker`. No prebuilt bpf-linker can
//! be downloaded here, so it is built from crates.io against the LLVM that
//! nightly rustc itself ships (`lib/libLLVM.so.*` in its sysroot): a prefix
//! directory whose `lib/` links `libLLVM.so` and the exact soname to that
//! file is given as `LLVM_PREFIX`. The prefix lives under the user's data
//! directory (the binary keeps it as its runpath, so not /tmp).

use std::{
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::run;

const NIGHTLY: &str = "nightly";
/// The bpf-linker release this project is built and tested with.
const BPF_LINKER_VERSION: &str = "0.13.0";

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"))
        .join("bin")
}

/// PATH with cargo's bin dir (where bpf-linker is installed) in front.
pub fn path_with_cargo_bin() -> OsString {
    let mut dirs = vec![cargo_bin()];
    if let Some(p) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rustup() -> Command {
    let mut c = Command::new("rustup");
    c.env("PATH", path_with_cargo_bin());
    c
}

/// Makes sure nightly with rust-src and a working bpf-linker are installed.
pub fn ensure() -> Result<()> {
    let toolchains = output(rustup().args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        eprintln!("setup: installing the nightly toolchain");
        run(rustup().args(["toolchain", "install", NIGHTLY, "--profile", "minimal"]))?;
    }
    let components =
        output(rustup().args(["component", "list", "--installed", "--toolchain", NIGHTLY]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly");
        run(rustup().args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
    }
    if bpf_linker_works() {
        return Ok(());
    }
    install_bpf_linker()
}

fn bpf_linker_works() -> bool {
    Command::new(cargo_bin().join("bpf-linker"))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The nightly rustc's LLVM: `(major version, path of libLLVM.so.<soname>)`.
fn nightly_llvm() -> Result<(u32, PathBuf)> {
    let vv = output(rustup().args(["run", NIGHTLY, "rustc", "-vV"]))?;
    let version = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("nightly rustc -vV printed no LLVM version")?;
    let major: u32 = version
        .split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("cannot parse LLVM version {version}"))?;
    let sysroot = PathBuf::from(
        output(rustup().args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))?.trim(),
    );
    let lib = sysroot.join("lib");
    let so = fs::read_dir(&lib)
        .with_context(|| format!("cannot list {}", lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {} (nightly ships its LLVM there)",
                lib.display()
            )
        })?;
    Ok((major, so))
}

/// `prefix/lib/{libLLVM.so, <soname>}` -> the nightly's libLLVM.
fn make_llvm_prefix(so: &Path) -> Result<PathBuf> {
    let soname = so.file_name().context("libLLVM path has no file name")?;
    let stem = soname.to_string_lossy().replace("libLLVM.so.", "llvm-");
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".local").join("share"));
    let prefix = data.join("cis490").join(stem);
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    for name in [Path::new("libLLVM.so"), Path::new(soname)] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(so, &link)
            .with_context(|| format!("cannot link {} -> {}", link.display(), so.display()))?;
    }
    Ok(prefix)
}

fn install_bpf_linker() -> Result<()> {
    let (major, so) = nightly_llvm()?;
    let prefix = make_llvm_prefix(&so)?;
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} ({}); this takes a few minutes, once",
        so.display()
    );
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .env("PATH", path_with_cargo_bin())
            .env("LLVM_PREFIX", &prefix)
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--force",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ]),
    )?;
    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but does not run (check {}/lib)",
            prefix.display()
        );
    }
    Ok(())
}
