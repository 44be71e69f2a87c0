//! Helpers for cis490's privileged integration tests: run the real `cis490`
//! binary against the ground-truth workload and read the episode back.
//!
//! These tests load eBPF programs for real, so they need root (CAP_BPF and
//! CAP_PERFMON); `cargo xtask test` builds the binaries and runs them one at
//! a time.

pub mod guest;

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// `target/<profile>/` of the binaries under test (this test binary lives in
/// `target/<profile>/deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Path of a workspace binary; panics with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built: run the tests with `cargo xtask test` (it builds cis490 and the workload first)",
        p.display()
    );
    p
}

/// Fails the test unless it runs as root (these tests load eBPF for real).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged test: run as root (sudo -E cargo xtask test)"
    );
}

/// A scratch directory for one test (data dir, workload reports).
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cis490-test-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// `cis490 trace ...` with a data dir in `dir`.
pub fn trace_cmd(dir: &Path) -> Command {
    let mut c = Command::new(bin("cis490"));
    c.arg("trace")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--progress-secs")
        .arg("0");
    c
}

/// Runs a command to completion, with a timeout.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_output(child, timeout)
}

pub fn wait_output(mut child: Child, timeout: Duration) -> Output {
    let t0 = Instant::now();
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "timed out after {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An episode directory read back.
#[derive(Debug)]
pub struct Episode {
    pub dir: PathBuf,
    pub meta: Value,
    pub events: Vec<Value>,
    pub rows: HashMap<String, Vec<Value>>,
}

fn read_jsonl(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: bad line {l}: {e}", path.display()))
        })
        .collect()
}

impl Episode {
    /// Reads the episode whose path is the last line of a successful trace's stdout.
    pub fn from_output(out: &Output) -> Episode {
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "cis490 trace failed ({}); stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let last = stdout
            .lines()
            .last()
            .expect("cis490 printed nothing on stdout");
        Episode::read(Path::new(last.trim()))
    }

    pub fn read(dir: &Path) -> Episode {
        let meta: Value =
            serde_json::from_slice(&fs::read(dir.join("meta.json")).unwrap()).unwrap();
        let mut rows = HashMap::new();
        for s in meta["sources"].as_array().expect("meta.sources") {
            let name = s["source"].as_str().unwrap().to_owned();
            rows.insert(name, read_jsonl(&dir.join(s["file"].as_str().unwrap())));
        }
        Episode {
            dir: dir.to_owned(),
            events: read_jsonl(&dir.join("events.jsonl")),
            meta,
            rows,
        }
    }

    pub fn is_done(&self) -> bool {
        self.dir.join("done.marker").exists()
    }

    pub fn rows(&self, source: &str) -> &[Value] {
        self.rows
            .get(source)
            .unwrap_or_else(|| panic!("no {source} rows"))
    }

    /// Sum of a per-bucket field over the rows of a source that measured
    /// it; panics if none did. (The oracle's last row is all null when an
    /// attached target is gone: /proc has nothing to read then.)
    pub fn sum(&self, source: &str, field: &str) -> u64 {
        let vals: Vec<u64> = self
            .rows(source)
            .iter()
            .filter_map(|r| r[field].as_u64())
            .collect();
        assert!(!vals.is_empty(), "{source}.{field} is null in every row");
        vals.iter().sum()
    }

    /// Maximum of a field over all rows of a source.
    pub fn max(&self, source: &str, field: &str) -> u64 {
        self.rows(source)
            .iter()
            .filter_map(|r| r[field].as_u64())
            .max()
            .unwrap_or(0)
    }

    pub fn events_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.events.iter().filter(move |e| e["event"] == name)
    }
}

/// A workload report (`--out` JSON).
pub fn report(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

/// Waits for a file to appear.
pub fn wait_for_file(path: &Path, timeout: Duration) {
    let t0 = Instant::now();
    while !path.exists() {
        assert!(
            t0.elapsed() < timeout,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until a running trace has written its `started` event (its
/// baseline is taken), and returns the episode directory.
pub fn wait_trace_started(data_dir: &Path, timeout: Duration) -> PathBuf {
    let t0 = Instant::now();
    loop {
        if let Ok(entries) = fs::read_dir(data_dir.join("episodes")) {
            for e in entries.flatten() {
                let events = fs::read_to_string(e.path().join("events.jsonl")).unwrap_or_default();
                if events.contains("\"event\":\"started\"") {
                    return e.path();
                }
            }
        }
        assert!(
            t0.elapsed() < timeout,
            "trace did not start within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the episode's events.jsonl has an event named `name`
/// (matching `pred`), and returns it.
pub fn wait_for_event(
    episode: &Path,
    name: &str,
    pred: impl Fn(&Value) -> bool,
    timeout: Duration,
) -> Value {
    let t0 = Instant::now();
    loop {
        let text = fs::read_to_string(episode.join("events.jsonl")).unwrap_or_default();
        for line in text.lines() {
            if let Ok(v) = serde_json::from_str::<Value>(line)
                && v["event"] == name
                && pred(&v)
            {
                return v;
            }
        }
        assert!(t0.elapsed() < timeout, "no {name} event within {timeout:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The only episode directory under `dir/data`.
pub fn episode_dir(dir: &Path) -> PathBuf {
    let mut eps: Vec<PathBuf> = fs::read_dir(dir.join("data/episodes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(eps.len(), 1, "expected one episode in {}", dir.display());
    eps.pop().unwrap()
}

/// A network namespace for one test, removed (with what lives in it) on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("cis490-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        Netns(name)
    }

    /// `ip netns exec NAME` + `argv`.
    pub fn cmd(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }

    /// Runs `ip -n NAME ARGS...` and checks it worked.
    pub fn ip(&self, args: &[&str]) {
        let st = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip -n {} {args:?}", self.0);
    }

    /// Runs a shell command inside the namespace and returns its stdout.
    pub fn sh(&self, script: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "sh", "-c", script])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Starts `cis490 trace ARGS` in the background (data dir under `dir`) and
/// returns once it has taken its baseline (its `started` event is out).
pub fn start_trace(dir: &Path, args: &[&str]) -> Child {
    let child = trace_cmd(dir)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cis490");
    wait_trace_started(&dir.join("data"), Duration::from_secs(30));
    child
}

/// `|a - b| <= tol * b`, with a readable failure.
#[track_caller]
pub fn assert_close(what: &str, measured: f64, truth: f64, tol: f64) {
    let err = (measured - truth).abs() / truth.abs().max(f64::MIN_POSITIVE);
    assert!(
        err <= tol,
        "{what}: measured {measured} vs {truth}: off by {:.2}% (tolerance {:.1}%)",
        err * 100.0,
        tol * 100.0
    );
    eprintln!(
        "{what}: {measured} vs {truth} ({:+.3}%)",
        (measured - truth) / truth * 100.0
    );
}

/// Sends a signal to a process.
pub fn kill(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid and signal number.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}
