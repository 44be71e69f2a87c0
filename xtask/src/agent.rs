//! `cargo xtask build-agent`: the in-guest agent (`cis490-agent`) as one
//! static executable, so it runs in the busybox initramfs (no libc there)
//! and in any Linux guest. glibc linked statically (`+crt-static` on the
//! host's own target: no musl target needed, only glibc's `libc.a`, from
//! Debian's `libc6-dev`, installed here when missing). The guest images
//! (`cargo xtask guest`, the demo) put it in their initramfs and start it
//! at boot.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::{apt::Apt, cargo, run, workspace_root};

/// The target triple the agent is built for (the host's, statically).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// glibc's static archive, which `+crt-static` links.
const LIBC_A: &str = "/usr/lib/x86_64-linux-gnu/libc.a";

/// Builds the agent (release, static) and returns its path.
pub fn build() -> Result<PathBuf> {
    if !Path::new(LIBC_A).is_file() {
        eprintln!("agent: {LIBC_A} is missing (static glibc): installing libc6-dev");
        Apt::default().run(
            &["install", "-y", "--no-install-recommends", "libc6-dev"],
            None,
        )?;
    }
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "cis490-agent",
        "--bin",
        "cis490-agent",
        "--release",
        "--target",
        TARGET,
    ])
    // Only the agent's own target gets the flag (build scripts and proc
    // macros are built for the host without it, as `--target` is given).
    .env(
        "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
        "-C target-feature=+crt-static",
    );
    run(&mut cmd)?;
    let path = workspace_root()
        .join("target")
        .join(TARGET)
        .join("release/cis490-agent");
    let elf = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    if has_interpreter(&elf)? {
        bail!(
            "{} is dynamically linked (it has a PT_INTERP): it would not run in the busybox guest",
            path.display()
        );
    }
    Ok(path)
}

/// Whether an ELF executable asks for a dynamic loader.
fn has_interpreter(elf: &[u8]) -> Result<bool> {
    use object::read::elf::ElfFile64;
    let file = ElfFile64::<object::Endianness>::parse(elf).context("not a 64-bit ELF")?;
    Ok(file
        .elf_program_headers()
        .iter()
        .any(|ph| ph.p_type.get(file.endian()) == object::elf::PT_INTERP))
}

/// `cargo xtask build-agent`.
pub fn task() -> Result<()> {
    let path = build()?;
    println!("{}", path.display());
    Ok(())
}
