//! Helpers for cis490's privileged integration tests: run the real `cis490`
//! binary against the ground-truth workload and read the episode back.
//!
//! These tests load eBPF programs for real, so they need root (CAP_BPF and
//! CAP_PERFMON); `cargo xtask test` builds the binaries and runs them one at
//! a time.

pub mod browser;
pub mod capture;
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

/// Whether the running kernel has the BTF-enabled tracepoint `name` (a
/// `btf_trace_<name>` type in `/sys/kernel/btf/vmlinux`): what cis490
/// itself checks before it picks a probe path. Tests of a path this kernel
/// lacks check the fallback instead (block_io_* came in Linux 6.5,
/// sock_*_length in 6.3).
pub fn kernel_has_tracepoint(name: &str) -> bool {
    let btf = fs::read("/sys/kernel/btf/vmlinux").expect("/sys/kernel/btf/vmlinux");
    let want = format!("btf_trace_{name}");
    // Type names live NUL-separated in the BTF string section.
    btf.split(|&b| b == 0).any(|s| s == want.as_bytes())
}

/// Whether these tests run in a VM under software emulation (QEMU TCG),
/// as `cargo xtask integration-test vm` says through `CIS490_VM_ACCEL`
/// when no KVM is available. Checks that depend on the tracer being
/// scheduled within microseconds are skipped there, saying so.
pub fn software_emulated() -> bool {
    std::env::var("CIS490_VM_ACCEL").is_ok_and(|a| a == "tcg")
}

/// The `families` entry of meta.json for `family`.
pub fn family<'a>(ep: &'a Episode, family: &str) -> &'a Value {
    ep.meta["families"]
        .as_array()
        .expect("meta.families")
        .iter()
        .find(|f| f["family"] == family)
        .unwrap_or_else(|| panic!("no {family} family in meta.json"))
}

/// A scratch directory for one test (data dir, workload reports).
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cis490-test-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// `cis490 trace ...` with a data dir in `dir`, every host-side source and
/// every count: the default (ebpf, proc) plus perf's per-thread counters as
/// one more oracle for the tests to hold the others against, and
/// `--wakeups`. (`default_trace_cmd` is the command as users run it.)
pub fn trace_cmd(dir: &Path) -> Command {
    let mut c = default_trace_cmd(dir);
    c.args(["--sources", "ebpf,proc,perf", "--wakeups"]);
    c
}

/// `cis490 trace ...` with a data dir in `dir` and the default sources.
pub fn default_trace_cmd(dir: &Path) -> Command {
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

/// `cis490-workload thread-burst`: a process that starts and ends `count`
/// threads once it gets SIGUSR1, its report in `out_json`; returned once
/// it is ready for the signal.
pub fn thread_burst(out_json: &Path, count: u64) -> Child {
    let wl = Command::new(bin("cis490-workload"))
        .args(["thread-burst", "--count", &count.to_string(), "--out"])
        .arg(out_json)
        .spawn()
        .unwrap();
    wait_for_file(
        &out_json.with_extension("json.ready"),
        Duration::from_secs(30),
    );
    wl
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
        if let Some(ep) = started_episode(data_dir) {
            return ep;
        }
        assert!(
            t0.elapsed() < timeout,
            "trace did not start within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The episode under `data_dir` whose tracer has taken its baseline (its
/// `started` event is out), if one has.
pub fn started_episode(data_dir: &Path) -> Option<PathBuf> {
    fs::read_dir(data_dir.join("episodes"))
        .ok()?
        .flatten()
        .find(|e| {
            fs::read_to_string(e.path().join("events.jsonl"))
                .is_ok_and(|t| t.contains("\"event\":\"started\""))
        })
        .map(|e| e.path())
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

    /// The namespace's file (`/run/netns/NAME`).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
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

/// Starts `cis490-workload dio ARGS --wait-signal --linger-ms 250` on
/// `DIR/target.bin` with its report at `DIR/dio.json`, and returns once it
/// is ready (waiting for SIGUSR1): the child and the report's path.
pub fn dio_workload(dir: &Path, args: &[&str]) -> (Child, PathBuf) {
    let out = dir.join("dio.json");
    let child = Command::new(bin("cis490-workload"))
        .arg("dio")
        .args(args)
        .args(["--wait-signal", "--linger-ms", "250", "--file"])
        .arg(dir.join("target.bin"))
        .arg("--out")
        .arg(&out)
        .spawn()
        .expect("spawn cis490-workload dio");
    wait_for_file(&out.with_extension("json.ready"), Duration::from_secs(60));
    (child, out)
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

/// Steal time of the whole machine so far (the `steal` column of the `cpu`
/// line of `/proc/stat`), in ns: time the hypervisor ran something else
/// while one of this VM's CPUs wanted to run.
pub fn steal_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu = stat.lines().next().expect("a cpu line");
    let ticks: u64 = cpu
        .split_whitespace()
        .nth(8)
        .and_then(|v| v.parse().ok())
        .expect("the steal column of /proc/stat");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    ticks * 1_000_000_000 / hz
}

/// A process's totals at its exit, as the kernel keeps them (`wait4`'s
/// rusage: every thread, each folded in as it exits).
#[derive(Debug, Clone, Copy)]
pub struct ExitUsage {
    pub cpu_ns: u64,
    pub nvcsw: u64,
    pub nivcsw: u64,
}

impl ExitUsage {
    /// From meta.json's `target_rusage` (a spawned command's totals, read by
    /// the tracer before it reaps the command).
    pub fn from_meta(ep: &Episode) -> ExitUsage {
        let ru = &ep.meta["target_rusage"];
        let get = |k: &str| {
            ru[k]
                .as_u64()
                .unwrap_or_else(|| panic!("meta.json target_rusage.{k}: {ru}"))
        };
        ExitUsage {
            cpu_ns: get("cpu_ns"),
            nvcsw: get("nvcsw"),
            nivcsw: get("nivcsw"),
        }
    }
}

impl ExitUsage {
    /// From a workload's `--exit-stamp` file: the process's own
    /// CLOCK_PROCESS_CPUTIME_ID and getrusage(RUSAGE_SELF), taken as its
    /// last act before it exits (see [`EXIT_TAIL_NS`] for what follows).
    /// Ground truth for a process the tracer spawned (the test cannot
    /// `wait4` for it), written by the process, not by the tracer.
    pub fn from_stamp(path: &Path) -> ExitUsage {
        let s = report(path);
        assert_eq!(s["kind"], "exit-stamp", "{}: {s}", path.display());
        let get = |v: &Value| {
            v.as_u64()
                .unwrap_or_else(|| panic!("{}: {s}", path.display()))
        };
        ExitUsage {
            cpu_ns: get(&s["process_cpu_ns"]),
            nvcsw: get(&s["rusage_self"]["nvcsw"]),
            nivcsw: get(&s["rusage_self"]["nivcsw"]),
        }
    }
}

/// The most CPU time a workload spends after its `--exit-stamp`
/// measurement (writing the stamp file, then its exit: the main thread's
/// exit_group, the address space torn down), natively and under software
/// emulation. Measured here (`sched::target_rusage_is_the_process_total_at_exit`
/// prints it): 0.1 to 0.3 ms natively.
pub fn exit_tail_ns() -> u64 {
    if software_emulated() {
        EXIT_TAIL_EMULATED_NS
    } else {
        EXIT_TAIL_NS
    }
}

/// [`exit_tail_ns`] natively.
pub const EXIT_TAIL_NS: u64 = 2_000_000;
/// [`exit_tail_ns`] under software emulation (tens of ms seen).
pub const EXIT_TAIL_EMULATED_NS: u64 = 100_000_000;

/// CPU time the tracer sees per exited thread beyond the process clock:
/// the kernel folds a thread's time into the process's before its final
/// switch-out, which only the tracer sees (3 µs natively in loss.rs, 10
/// to 20 µs in `targets::hundreds_of_threads_come_and_go`, 0.1 to 0.3 ms
/// under software emulation). Allowed: 50 µs natively, 1 ms emulated.
pub fn per_exited_thread_ns() -> u64 {
    if software_emulated() {
        1_000_000
    } else {
        50_000
    }
}

/// CPU time of a spawned command that the tracer may leave out: what its
/// child spent between the fork and the tracer's baseline (the child waits
/// on a pipe for the tracer; the process's own clock counts that time,
/// eBPF starts at the baseline). Usually tens of µs natively, but once in
/// about 10 runs here eBPF was 0.48 ms below the exit stamp (0.9 ms below
/// its usual place): 1 ms natively; 2% under software emulation (as
/// before the exit stamp).
pub fn unseen_before_baseline_ns(stamp: u64) -> u64 {
    if software_emulated() {
        stamp / 50
    } else {
        1_000_000
    }
}

/// A spawned workload's CPU time as a tracer measured it, against the
/// workload's own exit stamp ([`ExitUsage::from_stamp`]): at least the
/// stamp (the same kernel clock, read by the process itself while it still
/// had its exit to do) less `below`, and at most the stamp plus
/// [`exit_tail_ns`] plus `above` (what else the calling test explains, e.g.
/// a few µs per exited thread).
#[track_caller]
pub fn assert_cpu_vs_stamp(what: &str, measured: u64, stamp: u64, below: u64, above: u64) {
    assert_within(
        &format!(
            "{what} (the process's own clock at its exit stamp; above: {} ns for its exit \
             and {above} ns the test allows)",
            exit_tail_ns()
        ),
        measured,
        stamp,
        below,
        exit_tail_ns() + above,
    );
}

/// `measured` at least `truth - below` and at most `truth + above`, said on
/// stderr either way.
#[track_caller]
pub fn assert_within(what: &str, measured: u64, truth: u64, below: u64, above: u64) {
    let (least, most) = (truth.saturating_sub(below), truth + above);
    eprintln!(
        "{what}: {measured} vs {truth} ({:+} ns, {:+.4}%; allowed -{below} to +{above} ns)",
        measured as i64 - truth as i64,
        (measured as f64 - truth as f64) / truth as f64 * 100.0,
    );
    assert!(
        measured >= least && measured <= most,
        "{what}: {measured} ns not in [{least}, {most}]"
    );
}

/// A spawned workload's CPU time as the tracer counted it (eBPF, from its
/// baseline) against its exit stamp: [`assert_cpu_vs_stamp`] with
/// [`unseen_before_baseline_ns`] below and `above`.
#[track_caller]
pub fn assert_traced_cpu_vs_stamp(what: &str, measured: u64, stamp: u64, above: u64) {
    assert_cpu_vs_stamp(
        what,
        measured,
        stamp,
        unseen_before_baseline_ns(stamp),
        above,
    );
}

/// Reaps an exited (or exiting) child with `wait4` and returns its totals:
/// ground truth that, unlike anything the process measures itself, includes
/// its last instructions and its exit. Natively that tail is well under a
/// millisecond; under software emulation in a VM it can be tens of ms.
/// The child must have exited with status 0.
pub fn wait_rusage(child: &mut Child) -> ExitUsage {
    let mut status = 0;
    // SAFETY: all-zero is a valid rusage; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child with valid out-pointers.
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    assert_eq!(
        rc,
        child.id() as i32,
        "wait4: {}",
        std::io::Error::last_os_error()
    );
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child {} ended with wait status {status:#x}",
        child.id()
    );
    let ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000;
    ExitUsage {
        cpu_ns: ns(ru.ru_utime) + ns(ru.ru_stime),
        nvcsw: ru.ru_nvcsw as u64,
        nivcsw: ru.ru_nivcsw as u64,
    }
}

/// A traced process's CPU time against ground truth: `exit_total` (the
/// process's totals at its exit, from `wait4` of a process the test
/// started, which hold its last instructions and its exit, as the tracer
/// does), and at least `own` (what the process measured itself before its
/// report: a lower bound, its exit still to come). Natively the two agree
/// to well under a millisecond (the clock reads around a signal, wait4's
/// µs): held to 2 ms either way; under software emulation (tens of ms for
/// an exit) to `tol` of the total.
#[track_caller]
pub fn assert_cpu_vs_truth(what: &str, measured: f64, exit_total: f64, own: f64, tol: f64) {
    let allowed = if software_emulated() {
        exit_total * tol
    } else {
        2e6
    };
    eprintln!(
        "{what} (to the process's total at exit): {measured} vs {exit_total} ({:+.0} ns, {:+.3}%; allowed ±{allowed:.0} ns)",
        measured - exit_total,
        (measured - exit_total) / exit_total * 100.0
    );
    assert!(
        (measured - exit_total).abs() <= allowed,
        "{what}: {measured} vs the process's total at exit {exit_total}: more than {allowed:.0} ns apart"
    );
    assert!(
        measured + allowed >= own,
        "{what}: {measured} < the process's own count {own} - {allowed:.0} ns"
    );
    eprintln!(
        "{what} vs the process's own count: {measured} vs {own} ({:+.3}%)",
        (measured - own) / own * 100.0
    );
}

/// Sends a signal to a process.
pub fn kill(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) with a pid and signal number.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// How many episodes under `data/episodes` have a `done.marker`.
pub fn done_markers(data: &Path) -> usize {
    let Ok(eps) = fs::read_dir(data.join("episodes")) else {
        return 0;
    };
    eps.flatten()
        .filter(|e| e.path().join("done.marker").exists())
        .count()
}

/// Checks the failure shape of a trace that must fail (non-zero exit, one
/// `error: ` line on stderr, nothing on stdout, no done.marker under `data`)
/// and returns the error line.
#[track_caller]
pub fn one_line_error(out: &Output, data: &Path) -> String {
    assert!(!out.status.success(), "exit status {}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line, got:\n{stderr}");
    assert!(
        out.stdout.is_empty(),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(done_markers(data), 0, "a failed trace left a done.marker");
    errors[0].to_owned()
}

/// The failure shape of a trace that fails after its episode directory
/// exists (non-zero exit, one `error: ` line, nothing on stdout, no
/// done.marker, meta.json `status: failed` with that error); returns the
/// error line.
#[track_caller]
pub fn one_line_error_after_start(out: &Output, data: &Path) -> String {
    let line = one_line_error(out, data);
    let eps: Vec<PathBuf> = fs::read_dir(data.join("episodes"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(eps.len(), 1, "expected one (failed) episode");
    let meta = read_meta(&eps[0]);
    assert_eq!(meta["status"], "failed");
    assert!(
        line.contains(meta["error"].as_str().unwrap_or("?")),
        "{line} vs meta.json error {}",
        meta["error"]
    );
    line
}

/// `cis490 check` fails an episode whose requested QMP source never
/// connected, and says so.
#[track_caller]
pub fn assert_check_fails_qmp_never_connected(dir: &Path) {
    let (ok, text) = check_episode(dir);
    assert!(
        !ok,
        "check passed an episode whose QMP never connected:\n{text}"
    );
    assert!(
        text.contains("qmp: the QMP source was asked for but never connected"),
        "{text}"
    );
}

/// Runs `cis490 check EPISODE`: whether it passed, and its stdout + stderr.
/// Whatever the verdict, `check` must have ended the way it documents:
/// exit 0 with a `valid (N checks)` line and no `FAIL` line, or exit 1 with
/// one `FAIL` line per problem and one `error: ... N problem(s)` line (a
/// panic, a signal or another exit status fails the calling test).
#[track_caller]
pub fn check_episode(dir: &Path) -> (bool, String) {
    let out = Command::new(bin("cis490"))
        .arg("check")
        .arg(dir)
        .output()
        .expect("cis490 check");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    let text = format!("{stdout}{stderr}");
    let fails = stdout.lines().filter(|l| l.starts_with("FAIL  ")).count();
    match out.status.code() {
        Some(0) => assert!(
            fails == 0
                && stdout
                    .lines()
                    .any(|l| l.ends_with(" checks)") && l.contains(": valid (")),
            "cis490 check {} exited 0 without saying it is valid, or with FAIL lines:\n{text}",
            dir.display()
        ),
        Some(1) => {
            let errors: Vec<&str> = stderr
                .lines()
                .filter(|l| l.starts_with("error: "))
                .collect();
            assert!(
                fails > 0
                    && errors.len() == 1
                    && errors[0].contains(&format!(": {fails} problem(s); first: ")),
                "cis490 check {} exited 1 without one error line counting its {fails} FAIL lines:\n{text}",
                dir.display()
            );
        }
        _ => panic!(
            "cis490 check {} ended with {} (a crash?):\n{text}",
            dir.display(),
            out.status
        ),
    }
    (out.status.success(), text)
}

/// Fails unless `cis490 check EPISODE` passes. In a VM under software
/// emulation ([`software_emulated`]) perf's task-clock and the scheduler's
/// clock (eBPF, /proc) drift apart by up to a few % (seen: perf 2.2% below
/// /proc, 1.1% below eBPF, with two tracers' programs in the target's
/// switch path): a perf `cpu_ns` difference is tolerated there, and only
/// there; eBPF's own CPU time is held to ground truth by each test.
#[track_caller]
pub fn assert_check_passes(dir: &Path) {
    if software_emulated() {
        let tolerated = assert_check_passes_but(dir, &[("cpu_ns", &["perf"])]);
        if !tolerated.is_empty() {
            eprintln!("cis490 check, tolerated under software emulation: {tolerated:?}");
        }
        return;
    }
    let (ok, text) = check_episode(dir);
    assert!(ok, "cis490 check {} failed:\n{text}", dir.display());
}

/// Runs `cis490 check` and fails unless every problem it reports is a
/// comparison between two sources on a total that `known` lists as
/// `(field, sources)`: one of the two sides is one of `sources` (a
/// difference the calling test explains), or, for `cpu_ns`, a bucket of one
/// of `sources` holding more CPU than it lasted. Returns the tolerated
/// lines.
#[track_caller]
pub fn assert_check_passes_but(dir: &Path, known: &[(&str, &[&str])]) -> Vec<String> {
    let (passed, text) = check_episode(dir);
    let mut tolerated = Vec::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("FAIL  ")) {
        // "telemetry-S.jsonl: seq N holds X ns of CPU in ..."
        let bucket = line.split_once(": seq ").and_then(|(file, rest)| {
            let source = file.strip_prefix("telemetry-")?.strip_suffix(".jsonl")?;
            rest.contains(" ns of CPU in ").then_some(source)
        });
        if let Some(source) = bucket {
            let ok = known
                .iter()
                .any(|(f, srcs)| *f == "cpu_ns" && srcs.contains(&source));
            assert!(ok, "cis490 check {}: {line}\n{text}", dir.display());
            tolerated.push(line.to_owned());
            continue;
        }
        // "field: A a vs B b (allowed n)"
        let ok = line.split_once(": ").is_some_and(|(field, rest)| {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let sides = match words.as_slice() {
                [a, _, "vs", b, ..] => [*a, *b],
                _ => return false,
            };
            known
                .iter()
                .any(|(f, srcs)| *f == field && sides.iter().any(|s| srcs.contains(s)))
        });
        assert!(ok, "cis490 check {}: {line}\n{text}", dir.display());
        tolerated.push(line.to_owned());
    }
    // check_episode has held the exit status to the FAIL lines: it passed
    // exactly when nothing had to be tolerated.
    assert_eq!(
        passed,
        tolerated.is_empty(),
        "cis490 check {}: exit status vs its FAIL lines\n{text}",
        dir.display()
    );
    tolerated
}

/// `meta.json` of an episode, which must parse whatever happened.
#[track_caller]
pub fn read_meta(dir: &Path) -> Value {
    let bytes = fs::read(dir.join("meta.json"))
        .unwrap_or_else(|e| panic!("{}/meta.json: {e}", dir.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{}/meta.json does not parse ({e}):\n{}",
            dir.display(),
            String::from_utf8_lossy(&bytes)
        )
    })
}

/// CLOCK_MONOTONIC now, in ns (the clock of `t_mono_ns`).
pub fn mono_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A pidfd for `pid`: it names that process even if the pid is reused.
pub fn pidfd_open(pid: i32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    // SAFETY: pidfd_open returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        fd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd we own.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}

/// Waits until the process behind `pidfd` has exited (its pidfd is
/// readable); false at the timeout.
pub fn pidfd_wait_exit(pidfd: &std::os::fd::OwnedFd, timeout: Duration) -> bool {
    use std::os::fd::AsRawFd as _;
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) == 1 }
}

/// The state letter of `/proc/PID/stat` (`R`, `S`, `Z` ...), `None` when
/// there is no such process.
pub fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_field(&stat, 3)?.chars().next()
}

/// Start time of a process (field 22 of `/proc/PID/stat`, clock ticks).
pub fn proc_starttime(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_field(&stat, 22)?.parse().ok()
}

/// Field `n` (numbered from 1, as in proc(5), n >= 3) of a
/// `/proc/PID/stat` line: the fields after the command name, which is in
/// parentheses and may hold spaces and ')'.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(n.checked_sub(3)?)
}

fn c_path(p: &Path) -> std::ffi::CString {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// Moves the calling thread (the test's) into a mount namespace of its own,
/// with every mount private, so the mounts a test makes (and the processes
/// it starts, which inherit the namespace) are seen by nobody else: not the
/// host, not the namespaces other tests on the machine create meanwhile
/// (`ip netns exec` copies the mount table, and a copy would keep a mount
/// of ours alive after we unmount it). Per thread: gone with the test.
pub fn private_mounts() {
    // SAFETY: unshare(2) and mount(2) with NUL-terminated strings; they
    // change the calling thread's mount namespace only.
    let ok = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
    };
    assert!(
        ok,
        "private mount namespace: {}",
        std::io::Error::last_os_error()
    );
}

/// A small tmpfs mounted for one test (the data directory of a trace that
/// runs out of space, or a read-only one); unmounted on drop.
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`"256k"`) at `dir` (created), read-only
    /// with `read_only` (in the calling thread's mount namespace: see
    /// [`private_mounts`]).
    pub fn mount(dir: &Path, size: &str, read_only: bool) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let data = std::ffi::CString::new(format!("size={size},mode=0755")).unwrap();
        let flags = if read_only { libc::MS_RDONLY } else { 0 };
        // SAFETY: mount(2) with NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"cis490-test".as_ptr(),
                c_path(dir).as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount tmpfs at {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // SAFETY: umount2 with a NUL-terminated path.
        unsafe { libc::umount2(c_path(&self.0).as_ptr(), libc::MNT_DETACH) };
    }
}

/// Starts `cmd` as a process whose pid is `pid` (through
/// `/proc/sys/kernel/ns_last_pid`, racing the rest of the machine's forks:
/// a few tries). `None` if another process took the pid each time.
pub fn spawn_with_pid(pid: i32, cmd: &mut Command) -> Option<Child> {
    for _ in 0..50 {
        fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).unwrap();
        let mut child = cmd.spawn().expect("spawn");
        if child.id() as i32 == pid {
            return Some(child);
        }
        let _ = child.kill();
        let _ = child.wait();
        // Someone else may hold the pid for a moment.
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// What cis490 leaves in the kernel: its BPF programs, maps and links,
/// enumerated with the kernel's `BPF_*_GET_NEXT_ID` lists (through aya), and
/// who holds them (`/proc/PID/fdinfo`).
pub mod bpf {
    use std::{
        collections::{BTreeMap, BTreeSet},
        fs,
    };

    /// Every BPF object loaded in the kernel now.
    #[derive(Clone, Debug, Default)]
    pub struct Objects {
        /// Program id -> (name, ids of the maps it uses).
        pub progs: BTreeMap<u32, (String, Vec<u32>)>,
        /// Map id -> name.
        pub maps: BTreeMap<u32, String>,
        /// Link id -> id of its program.
        pub links: BTreeMap<u32, u32>,
    }

    /// Lists every program, map and link (objects that vanish while being
    /// listed are skipped).
    pub fn objects() -> Objects {
        let mut o = Objects::default();
        for p in aya::programs::loaded_programs().flatten() {
            let maps = p.map_ids().ok().flatten().unwrap_or_default();
            o.progs
                .insert(p.id(), (p.name_as_str().unwrap_or("").to_owned(), maps));
        }
        for m in aya::maps::loaded_maps().flatten() {
            o.maps
                .insert(m.id(), m.name_as_str().unwrap_or("").to_owned());
        }
        for l in aya::programs::loaded_links().flatten() {
            o.links.insert(l.id(), l.program_id());
        }
        o
    }

    impl Objects {
        /// The largest id of each kind (0 for none): objects created later
        /// have larger ids.
        pub fn max_ids(&self) -> (u32, u32, u32) {
            let last = |k: Option<&u32>| k.copied().unwrap_or(0);
            (
                last(self.progs.keys().next_back()),
                last(self.maps.keys().next_back()),
                last(self.links.keys().next_back()),
            )
        }
    }

    /// BPF objects held through file descriptors.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Held {
        pub progs: BTreeSet<u32>,
        pub maps: BTreeSet<u32>,
        pub links: BTreeSet<u32>,
        /// `perf_event` file descriptors (counters, classic tracepoints).
        pub perf_events: usize,
    }

    impl Held {
        pub fn extend(&mut self, other: &Held) {
            self.progs.extend(&other.progs);
            self.maps.extend(&other.maps);
            self.links.extend(&other.links);
            self.perf_events = self.perf_events.max(other.perf_events);
        }
    }

    fn id_field(info: &str, key: &str) -> Option<u32> {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
    }

    /// The BPF objects process `pid` holds an fd for (empty when it is gone).
    pub fn held_by(pid: i32) -> Held {
        let mut h = Held::default();
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            return h;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy().into_owned();
            let info = || {
                fs::read_to_string(format!(
                    "/proc/{pid}/fdinfo/{}",
                    fd.file_name().to_string_lossy()
                ))
                .unwrap_or_default()
            };
            match target.as_str() {
                "anon_inode:bpf-prog" => h.progs.extend(id_field(&info(), "prog_id:")),
                "anon_inode:bpf-map" => h.maps.extend(id_field(&info(), "map_id:")),
                "anon_inode:bpf_link" => {
                    let info = info();
                    h.links.extend(id_field(&info, "link_id:"));
                }
                "anon_inode:[perf_event]" => h.perf_events += 1,
                _ => {}
            }
        }
        h
    }

    /// What every live process holds together.
    pub fn held_by_anyone() -> Held {
        let mut all = Held::default();
        for e in fs::read_dir("/proc").unwrap().flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                let h = held_by(pid);
                all.progs.extend(h.progs);
                all.maps.extend(h.maps);
                all.links.extend(h.links);
            }
        }
        all
    }

    /// cis490's program names as the kernel stores them (at most 15 bytes):
    /// the names `cis490_common` declares (a unit test of cis490 holds the
    /// built object to them).
    pub fn cis490_program_names() -> BTreeSet<String> {
        use cis490_common::{block, gateway, kvm, net, sched};
        [
            sched::prog::ALL,
            block::prog::ALL,
            net::prog::ALL,
            kvm::prog::ALL,
            gateway::prog::ALL,
        ]
        .iter()
        .flat_map(|l| l.iter())
        .map(|n| n.chars().take(15).collect())
        .collect()
    }

    /// cis490's map names (at most 15 bytes), as `cis490_common` declares
    /// them.
    pub fn cis490_map_names() -> BTreeSet<String> {
        use cis490_common::{block, gateway, kvm, map, net, sched};
        [
            map::ALL,
            sched::map::ALL,
            block::map::ALL,
            net::map::ALL,
            kvm::map::ALL,
            gateway::map::ALL,
        ]
        .iter()
        .flat_map(|l| l.iter())
        .map(|n| n.chars().take(15).collect())
        .collect()
    }

    /// cis490 objects created after `before` (ids above its largest ones)
    /// that no live process holds, directly or through a held program or
    /// link: what a tracer that is gone left in the kernel.
    pub fn orphans_since(before: &Objects) -> Vec<String> {
        let (p0, m0, l0) = before.max_ids();
        let now = objects();
        let held = held_by_anyone();
        let prog_names = cis490_program_names();
        let map_names = cis490_map_names();
        let cis_progs: BTreeSet<u32> = now
            .progs
            .iter()
            .filter(|(id, (name, _))| **id > p0 && prog_names.contains(name))
            .map(|(id, _)| *id)
            .collect();
        // Programs alive because someone holds them or a held link.
        let mut live_progs: BTreeSet<u32> = held.progs.clone();
        live_progs.extend(
            now.links
                .iter()
                .filter(|(l, _)| held.links.contains(l))
                .map(|(_, p)| *p),
        );
        let mut live_maps: BTreeSet<u32> = held.maps.clone();
        for p in &live_progs {
            if let Some((_, maps)) = now.progs.get(p) {
                live_maps.extend(maps);
            }
        }
        let mut out = Vec::new();
        for id in &cis_progs {
            if !live_progs.contains(id) {
                out.push(format!("program {id} ({})", now.progs[id].0));
            }
        }
        for (id, prog) in &now.links {
            if *id > l0 && cis_progs.contains(prog) && !held.links.contains(id) {
                out.push(format!("link {id} (program {prog})"));
            }
        }
        // A map of cis490's (by name, or used by one of its programs).
        let used_by_cis: BTreeSet<u32> = cis_progs
            .iter()
            .flat_map(|p| now.progs[p].1.iter().copied())
            .collect();
        for (id, name) in &now.maps {
            let ours = map_names.contains(name) || used_by_cis.contains(id);
            if *id > m0 && ours && !live_maps.contains(id) {
                out.push(format!("map {id} ({name})"));
            }
        }
        out
    }

    /// Which of `ids` still exist in the kernel.
    pub fn still_loaded(ids: &Held) -> Vec<String> {
        let now = objects();
        let mut out = Vec::new();
        out.extend(
            ids.progs
                .iter()
                .filter(|i| now.progs.contains_key(i))
                .map(|i| format!("program {i} ({})", now.progs[i].0)),
        );
        out.extend(
            ids.maps
                .iter()
                .filter(|i| now.maps.contains_key(i))
                .map(|i| format!("map {i} ({})", now.maps[i])),
        );
        out.extend(
            ids.links
                .iter()
                .filter(|i| now.links.contains_key(i))
                .map(|i| format!("link {i}")),
        );
        out
    }
}

/// A running `cis490 serve`, stopped (SIGTERM) and reaped when dropped.
pub struct Server {
    pub child: Option<Child>,
    pub socket: PathBuf,
}

impl Server {
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        Self::start_with_env(dir, args, &[])
    }

    /// [`Server::start`] with environment variables `env` set for it.
    pub fn start_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let socket = dir.join("cis490.sock");
        let child = Command::new(bin("cis490"))
            .arg("serve")
            .arg("--control")
            .arg(&socket)
            .arg("--data-dir")
            .arg(dir.join("server-data"))
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let s = Server {
            child: Some(child),
            socket,
        };
        let t0 = Instant::now();
        while !s.socket.exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "the server did not listen within 90 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    /// `cis490 trace --server SOCKET` with a data dir in `dir`.
    pub fn trace(&self, dir: &Path) -> Command {
        let mut c = default_trace_cmd(dir);
        c.arg("--server").arg(&self.socket);
        c
    }

    /// Stops the server with `sig` and returns its output.
    pub fn stop(mut self, sig: libc::c_int) -> Output {
        let child = self.child.take().unwrap();
        kill(child.id() as i32, sig);
        wait_output(child, Duration::from_secs(90))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            kill(c.id() as i32, libc::SIGTERM);
            let out = wait_output(c, Duration::from_secs(90));
            eprintln!("server stderr:\n{}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

/// Context switches against the kernel's own process-wide count
/// (`getrusage`, which keeps the whole process's across execve) for a
/// workload `exited` of whose threads exited (the final one included).
/// The kernel folds an exiting thread's counters into the process's
/// (release_task) before the thread's last moments: its final switch-out
/// (voluntary, one per thread) the tracer leaves out as the kernel's totals
/// do, but any preemption in between is in the eBPF counts only. So
/// voluntary = getrusage (+-5: the main thread's report and exit come after
/// its getrusage), and getrusage <= involuntary (2 below allowed under
/// emulation, see below); the upper bound (getrusage
/// plus 2 per exited thread, plus 5) is a sanity bound (about 0.6 per
/// thread seen with 400 threads on 2 busy CPUs), not an exact count.
#[track_caller]
pub fn assert_switches_match_rusage(ep: &Episode, truth: &Value, exited: u64) {
    let r = |k: &str| truth["rusage_self"][k].as_u64().unwrap();
    let vol = ep.sum("ebpf", "ctx_switches_voluntary");
    let inv = ep.sum("ebpf", "ctx_switches_involuntary");
    eprintln!(
        "voluntary: ebpf {vol}, getrusage {} ({exited} exited); involuntary: ebpf {inv}, getrusage {}",
        r("nvcsw"),
        r("nivcsw")
    );
    assert!(
        vol.abs_diff(r("nvcsw")) <= 5,
        "voluntary: ebpf {vol} vs getrusage {} ({exited} threads exited)",
        r("nvcsw")
    );
    // Under emulation one short was seen once, in the 6.12 guest (a yield
    // storm: 179315 against 179316; the next two runs +2 and +0): not
    // explained yet, so allowed there and nowhere else.
    let below = if software_emulated() { 2 } else { 0 };
    assert!(
        inv + below >= r("nivcsw") && inv <= r("nivcsw") + 2 * exited + 5,
        "involuntary: ebpf {inv} vs getrusage {} (- {below}, + up to 2 x {exited} + 5)",
        r("nivcsw")
    );
}
