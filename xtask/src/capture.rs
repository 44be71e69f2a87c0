//! The packet capture the gateway test compares the gateway collector
//! with: Debian's `tcpdump`, installed with apt when missing (as `guest.rs`
//! installs QEMU), so `cargo xtask test` works on a fresh machine.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

use crate::guest::{Apt, find_in_path};

/// Finds `tcpdump`, installing Debian's `tcpdump` package if missing.
pub fn ensure_tcpdump(apt: &mut Apt) -> Result<PathBuf> {
    const TCPDUMP: &str = "tcpdump";
    if let Some(p) = find_in_path(TCPDUMP) {
        return Ok(p);
    }
    eprintln!(
        "test: {TCPDUMP} is missing (the gateway test captures the bridge with it): installing \
         tcpdump"
    );
    apt.run(
        &["install", "-y", "--no-install-recommends", "tcpdump"],
        None,
    )?;
    find_in_path(TCPDUMP).context("tcpdump still missing after installing Debian's tcpdump")
}
