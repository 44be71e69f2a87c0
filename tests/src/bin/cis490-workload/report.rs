//! Writing reports: atomically to a file (`PATH.tmp`, then renamed), to stdout, the ready file
//! and the `--exit-stamp` file.

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::clock::{Rusage, process_cpu_ns, rusage};

/// `path` with `suffix` appended to its last component ("out.json" + ".tmp").
pub fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes `value` as JSON to `path.tmp`, then renames it to `path`.
pub fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<()> {
    let tmp = with_suffix(path, ".tmp");
    let mut text = serde_json::to_vec_pretty(value).context("cannot serialise report")?;
    text.push(b'\n');
    std::fs::write(&tmp, &text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// Writes the report atomically to `out`, or pretty-prints it on stdout without `--out`.
pub fn emit_report(out: Option<&Path>, value: &impl Serialize) -> Result<()> {
    match out {
        Some(path) => write_json_atomic(path, value),
        None => {
            let mut text = serde_json::to_vec_pretty(value).context("cannot serialise report")?;
            text.push(b'\n');
            io::stdout()
                .write_all(&text)
                .context("cannot write report to stdout")
        }
    }
}

/// Writes `value` (a ready record with extra fields) to PATH.ready, atomically.
pub fn write_ready(out: &Path, value: &impl Serialize) -> Result<()> {
    write_json_atomic(&with_suffix(out, ".ready"), value)
}

/// `--exit-stamp PATH`: the process's own totals as late as it can take them.
pub fn write_exit_stamp(path: &Path) -> Result<()> {
    #[derive(Serialize)]
    struct ExitStamp {
        kind: &'static str,
        pid: u32,
        process_cpu_ns: u64,
        rusage_self: Rusage,
    }
    let stamp = ExitStamp {
        kind: "exit-stamp",
        pid: std::process::id(),
        process_cpu_ns: process_cpu_ns(),
        rusage_self: rusage(libc::RUSAGE_SELF),
    };
    write_json_atomic(path, &stamp)
}
