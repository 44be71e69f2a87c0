//! The integration test binaries of `cis490-tests`: building them and
//! listing their tests. The host run ([`crate::integration`]) and the VM
//! runner ([`crate::vm`]) both run them.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::cargo;

/// One integration test binary of `cis490-tests`.
#[derive(Clone, Debug)]
pub struct TestBinary {
    /// The test target's name (`sched` for tests/tests/sched.rs).
    pub name: String,
    pub path: PathBuf,
}

impl TestBinary {
    /// Its tests, from `--list`.
    pub fn list(&self) -> Result<Vec<String>> {
        let out = Command::new(&self.path)
            .args(["--list", "--format", "terse"])
            .output()
            .with_context(|| format!("cannot run {} --list", self.path.display()))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .map(str::to_owned)
            .collect())
    }
}

/// Builds the integration test binaries (without running them) and returns them.
pub fn build_test_binaries() -> Result<Vec<TestBinary>> {
    let out = cargo()
        .args([
            "test",
            "--package",
            "cis490-tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the integration tests failed");
    }
    let mut bins = Vec::new();
    for line in out.stdout.split(|&b| b == b'\n') {
        let Ok(msg) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["kind"] == serde_json::json!(["test"])
            && let Some(exe) = msg["executable"].as_str()
        {
            bins.push(TestBinary {
                name: msg["target"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                path: PathBuf::from(exe),
            });
        }
    }
    if bins.is_empty() {
        bail!("cargo reported no integration test binaries");
    }
    bins.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(bins)
}
