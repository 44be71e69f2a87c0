//! The fuzz targets (`fuzz/`, see `docs/fuzzing.md`): the bounded run that
//! `cargo xtask test` does, and longer runs (`cargo xtask fuzz`).
//!
//! cargo-fuzz is installed from crates.io if it is missing (once, about two
//! minutes here); the targets build with the nightly toolchain that
//! `setup` installs, into `fuzz/target/`. Each target runs from its curated
//! seeds (`fuzz/seeds/<target>/`, tracked) and the working corpus libFuzzer
//! grows (`fuzz/corpus/<target>/`, not tracked); a crash or a hang fails the
//! run, and libFuzzer leaves the input in `fuzz/artifacts/<target>/`.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::{setup, workspace_root};

/// Every fuzz target (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: [&str; 4] = ["record", "proc", "qmp", "guest"];

/// The cargo-fuzz release installed when none is.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Seconds per target in `cargo xtask test`.
pub const TEST_SECS: u64 = 20;

/// A single input running longer than this is a hang (a failure).
const INPUT_TIMEOUT_SECS: u64 = 10;

/// `rustup run nightly cargo fuzz ...`, from the workspace root, with
/// cargo's bin dir on PATH and nothing of the calling cargo's (stable)
/// toolchain selection in the environment.
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(workspace_root())
        .env("PATH", setup::path_with_cargo_bin());
    for var in [
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTUP_TOOLCHAIN",
        "RUSTC_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn cargo_fuzz_works() -> bool {
    cargo_fuzz()
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs cargo-fuzz if `cargo fuzz` does not run.
pub fn ensure_cargo_fuzz() -> Result<()> {
    if cargo_fuzz_works() {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION} (once; about two minutes)");
    crate::run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .env("PATH", setup::path_with_cargo_bin())
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
            ]),
    )?;
    if !cargo_fuzz_works() {
        bail!("cargo-fuzz was installed but `cargo +nightly fuzz --version` does not run");
    }
    Ok(())
}

/// Builds every target, then runs each for `secs` seconds (all of `only`
/// if given). Prints one line per target: runs and the corpus size.
pub fn run(secs: u64, only: Option<&str>) -> Result<()> {
    setup::ensure()?;
    ensure_cargo_fuzz()?;
    let targets: Vec<&str> = match only {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t} (targets: {})", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    let t0 = Instant::now();
    crate::run(cargo_fuzz().arg("build"))?;
    eprintln!("fuzz: targets built in {:.0?}", t0.elapsed());
    let fuzz = workspace_root().join("fuzz");
    for target in targets {
        let corpus = fuzz.join("corpus").join(target);
        fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        let seeds = fuzz.join("seeds").join(target);
        let log = log_path(target);
        let out =
            fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        // New inputs go to the first directory (the working corpus); the
        // seeds are only read.
        let status = cargo_fuzz()
            .args(["run", target])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
            .arg("-print_final_stats=1")
            .stdout(out.try_clone()?)
            .stderr(out)
            .status()
            .context("cannot run cargo fuzz run")?;
        let text = fs::read_to_string(&log).unwrap_or_default();
        if !status.success() {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
            bail!(
                "fuzz target {target} failed (log: {}; the input is in {})",
                log.display(),
                fuzz.join("artifacts").join(target).display()
            );
        }
        eprintln!("fuzz: {target}: {}", summary(&text));
    }
    Ok(())
}

/// `N runs in S s, corpus C inputs` from libFuzzer's output.
fn summary(log: &str) -> String {
    let done = log
        .lines()
        .find_map(|l| l.strip_prefix("Done "))
        .unwrap_or("(no final line)");
    let corpus = log
        .lines()
        .rev()
        .find_map(|l| {
            let i = l.find("corp: ")?;
            l[i + 6..].split_whitespace().next()
        })
        .unwrap_or("?");
    format!("{done}; corpus {corpus} (inputs/bytes)")
}

/// Where a target's libFuzzer log goes.
pub fn log_path(target: &str) -> PathBuf {
    workspace_root()
        .join("fuzz")
        .join("target")
        .join(format!("{target}.log"))
}
