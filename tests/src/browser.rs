//! Headless Chromium for the report test: Debian's `chromium`, installed by
//! `cargo xtask test` (xtask/src/browser.rs), which names it through
//! [`CHROMIUM_ENV`].

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

/// Env var through which `cargo xtask test` names the browser.
pub const CHROMIUM_ENV: &str = "CIS490_CHROMIUM";

/// The browser: `$CIS490_CHROMIUM`, else `chromium` on the PATH; panics
/// with what to do when there is none.
pub fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os(CHROMIUM_ENV) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join("chromium"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "chromium is missing: this test opens the report in Debian's headless chromium; \
                 run the tests with `cargo xtask test` (it installs chromium with apt) or \
                 `apt-get install chromium`"
            )
        })
}

/// `chromium --headless ...` with a fresh profile in `profile`, no network
/// services, as root (`--no-sandbox`).
fn command(profile: &Path) -> Command {
    let mut c = Command::new(chromium());
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

fn url(html: &Path) -> String {
    format!(
        "file://{}",
        html.canonicalize().expect("html path").display()
    )
}

/// Runs the browser with its stdout and stderr in files under `profile`
/// (a DOM is larger than a pipe's buffer), killing it after 120 s.
fn run(c: &mut Command, profile: &Path) -> Output {
    let (out_path, err_path) = (profile.join("stdout"), profile.join("stderr"));
    let mut child = c
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("cannot start chromium");
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chromium did not finish within 120 s; stderr:\n{}",
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: fs::read(&out_path).unwrap_or_default(),
        stderr: fs::read(&err_path).unwrap_or_default(),
    }
}

/// Screenshot of `html` at `width` x `height` into `png`; returns the
/// browser's output (stderr has its console log).
pub fn screenshot(html: &Path, png: &Path, width: u32, height: u32, profile: &Path) -> Output {
    let out = run(
        command(profile)
            .arg(format!("--screenshot={}", png.display()))
            .arg(format!("--window-size={width},{height}"))
            .arg(url(html)),
        profile,
    );
    assert!(
        out.status.success() && png.exists(),
        "chromium --screenshot failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The DOM of `html` after the browser parsed (and ran) it.
pub fn dump_dom(html: &Path, profile: &Path) -> Output {
    let out = run(command(profile).arg("--dump-dom").arg(url(html)), profile);
    assert!(
        out.status.success(),
        "chromium --dump-dom failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
