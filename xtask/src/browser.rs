//! The browser the report test opens `cis490 report`'s page in: Debian's
//! `chromium`, installed with apt when missing (as `guest.rs` installs
//! QEMU), so `cargo xtask test` works on a fresh machine.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

use crate::guest::{Apt, find_in_path};

/// Finds `chromium`, installing Debian's `chromium` package if missing.
pub fn ensure_chromium(apt: &mut Apt) -> Result<PathBuf> {
    const CHROMIUM: &str = "chromium";
    if let Some(p) = find_in_path(CHROMIUM) {
        return Ok(p);
    }
    eprintln!(
        "test: {CHROMIUM} is missing (the report test opens its page in it): installing chromium"
    );
    apt.run(
        &["install", "-y", "--no-install-recommends", "chromium"],
        None,
    )?;
    find_in_path(CHROMIUM).context("chromium still missing after installing Debian's chromium")
}
