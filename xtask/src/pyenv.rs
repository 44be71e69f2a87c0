//! The Python the dataset tests read the Parquet dataset with: a venv under
//! `~/.cache/cis490/py` (or `$CIS490_PY_DIR`) with pinned DuckDB (and its
//! httpfs extension as a pip package: DuckDB would otherwise download it at
//! run time), pyarrow and moto (a local S3-compatible server). Made once,
//! remade when the pins change; `cargo xtask test` sets [`PYTHON_ENV`] for
//! the privileged tests.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use crate::guest::{Apt, cache_dir_of, output, write_atomic};

/// Env var: the venv's python, for tests/tests/dataset.rs.
pub const PYTHON_ENV: &str = "CIS490_PYTHON";
/// Env var: where the venv lives (default `~/.cache/cis490/py`).
pub const DIR_ENV: &str = "CIS490_PY_DIR";

/// The pins. duckdb-ext-httpfs is built for exactly this DuckDB version.
pub const REQUIREMENTS: &[&str] = &[
    "duckdb==1.4.4",
    "duckdb-ext-httpfs==1.4.4.20260205",
    "pyarrow==26.0.1",
    "moto[server]==5.2.6",
];

/// Makes the venv if it is missing or its pins differ; returns its python.
pub fn ensure() -> Result<PathBuf> {
    let dir = cache_dir_of(DIR_ENV, "py");
    let python = dir.join("bin/python");
    let stamp = dir.join("cis490-requirements.txt");
    let want = REQUIREMENTS.join("\n") + "\n";
    if python.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(python);
    }
    eprintln!(
        "pyenv: making {} ({})",
        dir.display(),
        REQUIREMENTS.join(", ")
    );
    if !python.exists() {
        make_venv(&dir)?;
    }
    output(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(REQUIREMENTS),
    )?;
    write_atomic(&stamp, want.as_bytes())?;
    Ok(python)
}

fn make_venv(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.parent().unwrap_or(dir))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let venv = || output(Command::new("python3").args(["-m", "venv"]).arg(dir));
    if venv().is_ok() {
        return Ok(());
    }
    // Debian keeps venv (and its pip) in a package of its own.
    let _ = std::fs::remove_dir_all(dir);
    Apt::default().run(&["install", "-y", "python3-venv", "python3-pip"], None)?;
    venv().map(drop)
}
