//! Builds the eBPF programs (`cis490-ebpf`, nightly + bpf-linker) with
//! aya-build and leaves the object in `$OUT_DIR/cis490-ebpf`, which `src/ebpf`
//! (`ebpf/loader.rs`) embeds. Cargo reruns this whenever the eBPF crate (a build-dependency) or
//! its sources change, so a build never embeds a stale object.
//! `cargo xtask setup` installs the toolchain this needs.

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    if which::which("bpf-linker").is_err() {
        return Err(anyhow!(
            "bpf-linker is not installed (needed to build the eBPF programs): run `cargo xtask setup`"
        ));
    }
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "cis490-ebpf")
        .ok_or_else(|| anyhow!("cis490-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    // Rebuild when the shared record layouts change too.
    println!(
        "cargo:rerun-if-changed={}/../cis490-common/src",
        root.as_str()
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
