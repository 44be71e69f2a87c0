//! What `cargo xtask test` needs beyond cargo: the tools the tests check
//! against (bpftool), and the count of tests that did not run, so that no
//! test passes by not running without the run saying so.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::guest::{Apt, find_in_path};

/// Finds `bpftool`, installing Debian's `bpftool` package if missing: the
/// unit test `btf::tests::kernel_offsets_agree_with_bpftool` holds every
/// struct member offset cis490 decodes to bpftool's independent decoding,
/// and fails without it.
pub fn ensure_bpftool() -> Result<PathBuf> {
    let find = || {
        find_in_path("bpftool").or_else(|| {
            ["/usr/sbin/bpftool", "/sbin/bpftool"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| p.is_file())
        })
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    eprintln!("test: bpftool is missing: installing Debian's bpftool (apt-get install bpftool)");
    Apt::default().run(
        &["install", "-y", "--no-install-recommends", "bpftool"],
        None,
    )?;
    find().context("bpftool still missing after installing Debian's bpftool package")
}

/// Environment variables that make tests return early, passing without
/// having checked anything: each one set is a skip the run reports.
pub const SKIP_VARIABLES: &[(&str, &str)] = &[
    (
        "CIS490_SKIP_KERNEL_BTF_TESTS",
        "the unit tests that read the kernel's BTF (btf::tests) return early",
    ),
    (
        "CIS490_SKIP_QEMU_TESTS",
        "the QMP source's tests that boot QEMU (tests/tests/qmp_qemu.rs) return early",
    ),
];

/// Tests that did not run, across every libtest run of `cargo xtask test`.
#[derive(Debug, Default)]
pub struct Skips {
    /// `(test, why)` of each test libtest reported as ignored.
    pub ignored: Vec<(String, String)>,
    /// The sum of libtest's `N ignored` over every test binary (the
    /// per-test lines above must add up to it).
    pub ignored_total: u64,
}

impl Skips {
    /// Reads one line of libtest output.
    fn line(&mut self, line: &str) {
        // "test NAME ... ignored" / "test NAME ... ignored, REASON"
        if let Some(rest) = line.strip_prefix("test ")
            && let Some((name, verdict)) = rest.split_once(" ... ")
            && let Some(why) = verdict.strip_prefix("ignored")
        {
            let why = why.trim_start_matches(',').trim();
            self.ignored.push((
                name.to_owned(),
                if why.is_empty() {
                    "#[ignore]".to_owned()
                } else {
                    why.to_owned()
                },
            ));
        }
        // "test result: ok. 45 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; ..."
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                if let Some(n) = part.trim().strip_suffix(" ignored")
                    && let Ok(n) = n.trim().parse::<u64>()
                {
                    self.ignored_total += n;
                }
            }
        }
    }

    /// Runs `cmd` (a `cargo test`), passing its stdout through while
    /// reading libtest's verdicts from it; fails when the command fails.
    pub fn run(&mut self, cmd: &mut Command) -> Result<()> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {cmd:?}"))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let mut out = std::io::stdout().lock();
        for line in BufReader::new(stdout).lines() {
            let line = line.context("reading the test output")?;
            self.line(&line);
            let _ = writeln!(out, "{line}");
        }
        drop(out);
        let status = child.wait()?;
        if !status.success() {
            bail!("{cmd:?} failed: {status}");
        }
        Ok(())
    }

    /// Prints how many tests were skipped and why (ignored tests, skip
    /// variables set); fails when any was.
    pub fn report(&self) -> Result<()> {
        let vars: Vec<(&str, &str)> = SKIP_VARIABLES
            .iter()
            .copied()
            .filter(|(v, _)| std::env::var_os(v).is_some())
            .collect();
        let n = self.ignored_total as usize + vars.len();
        eprintln!(
            "test: {n} test(s) or test groups skipped ({} ignored by libtest, {} skip variable(s) set)",
            self.ignored_total,
            vars.len()
        );
        for (name, why) in &self.ignored {
            eprintln!("test:   skipped {name}: {why}");
        }
        for (var, what) in &vars {
            eprintln!("test:   {var} is set: {what}");
        }
        if self.ignored.len() as u64 != self.ignored_total {
            bail!(
                "libtest reported {} ignored test(s) but named {}: cannot say which were skipped",
                self.ignored_total,
                self.ignored.len()
            );
        }
        if n > 0 {
            bail!("{n} test(s) or test groups did not run (listed above): every test must run");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_tests_are_named_and_counted() {
        let mut s = Skips::default();
        for l in [
            "running 3 tests",
            "test a::b ... ok",
            "test a::c ... ignored",
            "test a::d ... ignored, boots a guest",
            "test result: ok. 1 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test result: ok. 4 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out; finished in 1.00s",
        ] {
            s.line(l);
        }
        assert_eq!(s.ignored_total, 2);
        assert_eq!(
            s.ignored,
            [
                ("a::c".to_owned(), "#[ignore]".to_owned()),
                ("a::d".to_owned(), "boots a guest".to_owned())
            ]
        );
        assert!(s.report().is_err());
        assert!(
            Skips::default().report().is_ok()
                || SKIP_VARIABLES
                    .iter()
                    .any(|(v, _)| std::env::var_os(v).is_some())
        );
    }
}
