//! perf_event counters of the whole target process (`telemetry-perf.jsonl`).
//!
//! How the whole process is counted, every thread including the ones created
//! later, without counting any thread twice:
//!
//! - One counter per event is opened on every thread that exists when the
//!   source starts (`/proc/PID/task`, the leader first), with `inherit = 1`:
//!   a thread created later by a counted thread inherits a child counter, and
//!   reading the parent counter returns the parent's count plus those of all
//!   its inherited children, live or exited (the kernel's
//!   `perf_event_read_value` walks `child_list`; an exiting child's count is
//!   folded into the parent). So the process total is the sum over the
//!   counters opened at start, and no counter is ever opened on a later
//!   thread (it would be counted twice).
//! - `inherit_thread = 1` (Linux 5.13+) keeps child *processes* the target
//!   forks out of the count, as `/proc/PID/stat` does; on an older kernel the
//!   source falls back to plain `inherit` and says so in [`PerfInfo`].
//! - A thread created while the counters are being opened could be missed
//!   (its creator not yet counted) or, if listed, counted twice. So the thread
//!   list is read again after opening: if a thread appeared, every counter is
//!   closed and the opening starts again. Threads listed before the first
//!   counter was opened cannot have inherited one. A thread born and dead
//!   inside the window did all its work before the baseline read.
//! - A counter stays readable after its thread exits (its final value plus
//!   what its inherited children still add): it is kept.
//! - An event that cannot be opened (no hardware PMU: `ENOENT`/`EOPNOTSUPP`)
//!   leaves its field `None`, never 0, and [`PerfInfo::events`] says why.
//! - Each counter is read with `TOTAL_TIME_ENABLED | TOTAL_TIME_RUNNING`; a
//!   counter that was multiplexed (`running < enabled`) is scaled by
//!   `enabled / running`, and [`PerfInfo::scaled_reads`] counts those reads.
//!   A bucket's value is the sum over counters of the growth of each
//!   counter's (scaled) cumulative value since the previous sample, never
//!   negative.
//!
//! Counters are opened and read through the `perf-event2` crate
//! (`perf_event::Builder`, `Counter::read_full`), with the kernel's full
//! `perf_event_attr` (older kernels accept it: the fields they do not know
//! are zero).

use std::collections::{BTreeMap, BTreeSet};
use std::io;

use anyhow::{anyhow, bail};

use crate::row::Measures;

/// What meta.json says about the perf source.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PerfInfo {
    /// Event name -> "counting" or the reason it is not (e.g. "not supported by this machine (no hardware PMU): ENOENT").
    pub events: BTreeMap<String, String>,
    /// Threads counted directly at start (new threads are inherited).
    pub threads_opened: usize,
    /// Reads where a counter was multiplexed and scaled.
    pub scaled_reads: u64,
}

/// Counts the target process with perf_event counters.
#[derive(Debug)]
pub struct PerfSource {
    pid: i32,
    events: Vec<Event>,
    threads_opened: usize,
    scaled_reads: u64,
    /// Failed reads of an open counter (never expected); logged once.
    read_errors: u64,
}

/// The `Measures` field an event fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    CpuNs,
    CtxSwitches,
    Migrations,
    PageFaultsMinor,
    PageFaultsMajor,
    Cycles,
    Instructions,
    CacheReferences,
    CacheMisses,
    BranchMisses,
}

impl Field {
    fn slot(self, m: &mut Measures) -> &mut Option<u64> {
        match self {
            Self::CpuNs => &mut m.cpu_ns,
            Self::CtxSwitches => &mut m.ctx_switches,
            Self::Migrations => &mut m.migrations,
            Self::PageFaultsMinor => &mut m.page_faults_minor,
            Self::PageFaultsMajor => &mut m.page_faults_major,
            Self::Cycles => &mut m.cycles,
            Self::Instructions => &mut m.instructions,
            Self::CacheReferences => &mut m.cache_references,
            Self::CacheMisses => &mut m.cache_misses,
            Self::BranchMisses => &mut m.branch_misses,
        }
    }
}

use perf_event::events::{Hardware, Software};

/// Which kind of perf event (the hardware ones need a PMU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Software(Software),
    Hardware(Hardware),
}

/// One perf event, as perf(1) names it.
struct EventSpec {
    name: &'static str,
    kind: Kind,
    field: Field,
}

impl EventSpec {
    fn is_software(&self) -> bool {
        matches!(self.kind, Kind::Software(_))
    }
}

const EVENTS: [EventSpec; 10] = [
    EventSpec {
        name: "task-clock",
        kind: Kind::Software(Software::TASK_CLOCK),
        field: Field::CpuNs,
    },
    EventSpec {
        name: "context-switches",
        kind: Kind::Software(Software::CONTEXT_SWITCHES),
        field: Field::CtxSwitches,
    },
    EventSpec {
        name: "cpu-migrations",
        kind: Kind::Software(Software::CPU_MIGRATIONS),
        field: Field::Migrations,
    },
    EventSpec {
        name: "minor-faults",
        kind: Kind::Software(Software::PAGE_FAULTS_MIN),
        field: Field::PageFaultsMinor,
    },
    EventSpec {
        name: "major-faults",
        kind: Kind::Software(Software::PAGE_FAULTS_MAJ),
        field: Field::PageFaultsMajor,
    },
    EventSpec {
        name: "cycles",
        kind: Kind::Hardware(Hardware::CPU_CYCLES),
        field: Field::Cycles,
    },
    EventSpec {
        name: "instructions",
        kind: Kind::Hardware(Hardware::INSTRUCTIONS),
        field: Field::Instructions,
    },
    EventSpec {
        name: "cache-references",
        kind: Kind::Hardware(Hardware::CACHE_REFERENCES),
        field: Field::CacheReferences,
    },
    EventSpec {
        name: "cache-misses",
        kind: Kind::Hardware(Hardware::CACHE_MISSES),
        field: Field::CacheMisses,
    },
    EventSpec {
        name: "branch-misses",
        kind: Kind::Hardware(Hardware::BRANCH_MISSES),
        field: Field::BranchMisses,
    },
];

/// Opens a counting event on thread `tid` (any CPU), enabled now, with
/// child threads inherited (and child processes not, with `inherit_thread`).
fn open_counter(
    spec: &EventSpec,
    tid: i32,
    inherit_thread: bool,
) -> io::Result<perf_event::Counter> {
    let mut b = match spec.kind {
        Kind::Software(e) => perf_event::Builder::new(e),
        Kind::Hardware(e) => perf_event::Builder::new(e),
    };
    b.observe_pid(tid)
        .any_cpu()
        .inherit(true)
        .inherit_thread(inherit_thread)
        // Kernel time counts (task-clock is the whole CPU time), the
        // hypervisor's does not.
        .exclude_kernel(false)
        .exclude_hv(true)
        .read_format(
            perf_event::ReadFormat::TOTAL_TIME_ENABLED | perf_event::ReadFormat::TOTAL_TIME_RUNNING,
        )
        .enabled(true);
    b.build()
}

/// Reads `(value, time_enabled, time_running)` (ns); one read(2).
fn read_counter(c: &mut perf_event::Counter) -> io::Result<[u64; 3]> {
    let d = c.read_full()?;
    let ns = |t: Option<std::time::Duration>| t.map_or(0, |t| t.as_nanos() as u64);
    Ok([d.count(), ns(d.time_enabled()), ns(d.time_running())])
}

/// A counter's value scaled for multiplexing, and whether it was scaled.
/// A counter that never ran (`running == 0`) while enabled has no basis for
/// scaling: its raw value is used and the read still counts as scaled.
fn scale(value: u64, enabled: u64, running: u64) -> (u64, bool) {
    if running >= enabled {
        (value, false)
    } else if running == 0 {
        (value, true)
    } else {
        let v = u128::from(value) * u128::from(enabled) / u128::from(running);
        (u64::try_from(v).unwrap_or(u64::MAX), true)
    }
}

/// `ENOENT` and friends.
fn errno_name(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::ENOENT) => "ENOENT",
        Some(libc::EOPNOTSUPP) => "EOPNOTSUPP",
        Some(libc::ENODEV) => "ENODEV",
        Some(libc::EACCES) => "EACCES",
        Some(libc::EPERM) => "EPERM",
        Some(libc::ESRCH) => "ESRCH",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::EMFILE) => "EMFILE",
        Some(libc::ENFILE) => "ENFILE",
        Some(libc::EBUSY) => "EBUSY",
        Some(libc::E2BIG) => "E2BIG",
        Some(libc::ENOSPC) => "ENOSPC",
        Some(libc::ENOSYS) => "ENOSYS",
        // perf-event2 turns E2BIG (an attribute this kernel does not know)
        // into an error of this kind.
        None if e.kind() == io::ErrorKind::Unsupported => "E2BIG",
        _ => return e.to_string(),
    };
    name.to_owned()
}

/// Why an event cannot be opened, in one line.
fn reason(spec: &EventSpec, e: &io::Error) -> String {
    let name = errno_name(e);
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::EOPNOTSUPP | libc::ENODEV) if !spec.is_software() => {
            format!("not supported by this machine (no hardware PMU): {name}")
        }
        Some(libc::ENOENT | libc::EOPNOTSUPP | libc::ENODEV) => {
            format!("not supported by this kernel: {name}")
        }
        Some(libc::EACCES | libc::EPERM) => {
            let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "?".to_owned());
            format!(
                "permission denied: {name} (kernel.perf_event_paranoid = {paranoid}; needs root or CAP_PERFMON and ptrace access to the target)"
            )
        }
        Some(libc::EMFILE | libc::ENFILE) => {
            format!("out of file descriptors: {name} (raise RLIMIT_NOFILE)")
        }
        Some(libc::ENOSYS) => format!("perf_event_open is not available: {name}"),
        _ => format!("perf_event_open failed: {name} ({e})"),
    }
}

struct Counter {
    counter: perf_event::Counter,
    /// (Scaled) cumulative value at the previous read.
    prev: u64,
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::os::fd::AsRawFd as _;
        f.debug_struct("Counter")
            .field("fd", &self.counter.as_raw_fd())
            .field("prev", &self.prev)
            .finish()
    }
}

#[derive(Debug)]
struct Event {
    name: &'static str,
    field: Field,
    /// `Ok(note)` if counting ("" or a caveat), `Err(reason)` if not.
    status: Result<&'static str, String>,
    counters: Vec<Counter>,
}

/// Threads of `pid`, the leader first. Fails if the process is gone.
fn list_tids(pid: i32, out: &mut Vec<i32>) -> anyhow::Result<()> {
    out.clear();
    let tids = crate::target::thread_ids(pid).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            anyhow!("perf: process {pid} does not exist (no /proc/{pid}/task)")
        } else {
            anyhow!("perf: cannot list the threads of process {pid} (/proc/{pid}/task): {e}")
        }
    })?;
    out.extend(tids.into_iter().map(|t| t as i32));
    if out.is_empty() {
        bail!("perf: process {pid} has no threads (it has exited)");
    }
    // The leader first, so that threads it creates while the others are
    // being opened are inherited (the rescan catches them anyway).
    out.sort_unstable_by_key(|&t| (t != pid, t));
    Ok(())
}

/// How often the opening starts over because a thread appeared meanwhile.
const MAX_OPEN_ATTEMPTS: usize = 20;

impl PerfSource {
    /// Opens the counters on every thread of `pid` now and reads the baseline.
    /// Fails only if no software event at all can be opened (e.g. no permission), with a clear one-line reason.
    pub fn new(pid: i32) -> anyhow::Result<Self> {
        if pid <= 0 {
            bail!("perf: invalid pid {pid}");
        }
        let mut inherit_thread = true;
        let mut tids = Vec::new();
        let mut after = Vec::new();
        let mut attempt = 0;
        let (events, threads_opened) = loop {
            attempt += 1;
            list_tids(pid, &mut tids)?;
            let (events, threads_opened) = Self::open_all(&tids, &mut inherit_thread);
            list_tids(pid, &mut after)?;
            let known: BTreeSet<i32> = tids.iter().copied().collect();
            let new: Vec<i32> = after
                .iter()
                .copied()
                .filter(|t| !known.contains(t))
                .collect();
            if new.is_empty() {
                break (events, threads_opened);
            }
            if attempt >= MAX_OPEN_ATTEMPTS {
                log::warn!(
                    "perf: threads of process {pid} kept appearing while the counters were opened \
                     ({attempt} attempts; last new: {new:?}); they may be missed or counted twice"
                );
                break (events, threads_opened);
            }
            log::debug!(
                "perf: threads {new:?} of process {pid} appeared while opening the counters; starting over"
            );
        };

        if !events
            .iter()
            .any(|e| e.status.is_ok() && EVENTS.iter().any(|s| s.name == e.name && s.is_software()))
        {
            let why = events
                .iter()
                .find_map(|e| e.status.as_ref().err())
                .map(String::as_str)
                .unwrap_or("no thread could be opened");
            bail!("perf: cannot open any software counter on process {pid}: {why}");
        }
        // Every thread vanished (ESRCH): the process is gone.
        if threads_opened == 0 {
            bail!("perf: process {pid} exited while its counters were being opened");
        }

        let mut me = Self {
            pid,
            events,
            threads_opened,
            scaled_reads: 0,
            read_errors: 0,
        };
        // Baseline: the first sample's deltas start here.
        let _ = me.sample();
        for e in &me.events {
            match &e.status {
                Ok(_) => log::debug!(
                    "perf: {} counting on {} threads of process {pid}",
                    e.name,
                    e.counters.len()
                ),
                Err(why) => log::info!("perf: {} not counted: {why}", e.name),
            }
        }
        Ok(me)
    }

    /// Opens every event on every thread in `tids`; returns the events and
    /// how many threads got at least one counter.
    fn open_all(tids: &[i32], inherit_thread: &mut bool) -> (Vec<Event>, usize) {
        let mut events: Vec<Event> = EVENTS
            .iter()
            .map(|s| Event {
                name: s.name,
                field: s.field,
                status: Ok(""),
                counters: Vec::with_capacity(tids.len()),
            })
            .collect();
        let mut threads_opened = 0;
        for &tid in tids {
            let mut opened_here = false;
            for (spec, ev) in EVENTS.iter().zip(events.iter_mut()) {
                if ev.status.is_err() {
                    continue;
                }
                let mut res = open_counter(spec, tid, *inherit_thread);
                if *inherit_thread
                    && spec.is_software()
                    && matches!(&res, Err(e) if e.raw_os_error() == Some(libc::EINVAL))
                {
                    // A kernel older than 5.13 has no inherit_thread: count
                    // child processes too rather than nothing.
                    if let Ok(c) = open_counter(spec, tid, false) {
                        *inherit_thread = false;
                        log::warn!(
                            "perf: this kernel has no inherit_thread; child processes of the target are counted too"
                        );
                        // Counters already opened with inherit_thread are
                        // still right (they just follow threads only).
                        res = Ok(c);
                    }
                }
                match res {
                    Ok(counter) => {
                        opened_here = true;
                        ev.counters.push(Counter { counter, prev: 0 });
                    }
                    // The thread exited: it did its work before the baseline.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => break,
                    Err(e) => {
                        let why = reason(spec, &e);
                        ev.status = Err(if ev.counters.is_empty() {
                            why
                        } else {
                            // Counting only some threads would undercount.
                            format!(
                                "opened on {} threads but not on thread {tid}: {why}",
                                ev.counters.len()
                            )
                        });
                        ev.counters = Vec::new();
                    }
                }
            }
            if opened_here {
                threads_opened += 1;
            }
        }
        if !*inherit_thread {
            for ev in events.iter_mut().filter(|e| e.status.is_ok()) {
                ev.status = Ok(" (child processes included: this kernel has no inherit_thread)");
            }
        }
        (events, threads_opened)
    }

    /// What changed since the previous call (fields of events that could not be opened are None).
    pub fn sample(&mut self) -> Measures {
        let mut m = Measures::default();
        for ev in &mut self.events {
            if ev.status.is_err() {
                continue;
            }
            let mut delta = 0u64;
            for c in &mut ev.counters {
                match read_counter(&mut c.counter) {
                    Ok([value, enabled, running]) => {
                        let (v, scaled) = scale(value, enabled, running);
                        if scaled {
                            self.scaled_reads += 1;
                        }
                        if v > c.prev {
                            delta = delta.saturating_add(v - c.prev);
                            c.prev = v;
                        }
                    }
                    Err(e) => {
                        if self.read_errors == 0 {
                            log::warn!(
                                "perf: reading {} of process {} failed: {e}",
                                ev.name,
                                self.pid
                            );
                        }
                        self.read_errors += 1;
                    }
                }
            }
            *ev.field.slot(&mut m) = Some(delta);
        }
        m
    }

    pub fn info(&self) -> PerfInfo {
        PerfInfo {
            events: self
                .events
                .iter()
                .map(|e| {
                    let s = match &e.status {
                        Ok(note) => format!("counting{note}"),
                        Err(why) => why.clone(),
                    };
                    (e.name.to_owned(), s)
                })
                .collect(),
            threads_opened: self.threads_opened,
            scaled_reads: self.scaled_reads,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
    use std::time::{Duration, Instant};

    const MODE_ENV: &str = "CIS490_PERF_TEST_WORKLOAD";
    const MS: u64 = 1_000_000;

    /// CPU time of this thread, ns.
    fn thread_cpu_ns() -> u64 {
        clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
    }

    fn clock_ns(clock: libc::clockid_t) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec.
        let r = unsafe { libc::clock_gettime(clock, &mut ts) };
        assert_eq!(
            r,
            0,
            "clock_gettime({clock}): {}",
            io::Error::last_os_error()
        );
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// The whole-process CPU clock of another process (`clock_getcpuclockid`,
    /// which the libc crate lacks on Linux): the sum over all its threads,
    /// exited ones included, in ns.
    fn process_cpu_ns(pid: i32) -> u64 {
        // MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
        let clock = ((!pid) << 3) | 2;
        clock_ns(clock)
    }

    /// Burns `ns` of this thread's CPU time.
    fn burn(ns: u64) {
        let start = thread_cpu_ns();
        let mut x = 0u64;
        while thread_cpu_ns() - start < ns {
            for i in 0..10_000u64 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
            }
        }
        std::hint::black_box(x);
    }

    fn wait_line(stdin: &mut BufReader<io::Stdin>) {
        let mut s = String::new();
        stdin.read_line(&mut s).unwrap();
    }

    /// The workload child's entry: an `.init_array` constructor of this
    /// test binary, so that a copy of it started with `MODE_ENV` set runs
    /// the workload and exits before libtest starts. Not a test (a test
    /// that returns at once when the variable is unset would pass without
    /// testing anything).
    #[used]
    #[unsafe(link_section = ".init_array")]
    static WORKLOAD_CHILD_ENTRY: extern "C" fn() = {
        extern "C" fn entry() {
            if std::env::var_os(MODE_ENV).is_some() {
                workload_child();
                std::process::exit(0);
            }
        }
        entry
    };

    /// The body of the workload child (see `WORKLOAD_CHILD_ENTRY`).
    fn workload_child() {
        let Ok(mode) = std::env::var(MODE_ENV) else {
            return;
        };
        let mut stdin = BufReader::new(io::stdin());
        let mut out = io::stdout();
        match mode.as_str() {
            // 200 ms after GO, two new threads burn 300 ms of CPU each.
            "late-threads" => {
                writeln!(out, "READY").unwrap();
                wait_line(&mut stdin);
                std::thread::sleep(Duration::from_millis(200));
                let hs: Vec<_> = (0..2)
                    .map(|_| std::thread::spawn(|| burn(300 * MS)))
                    .collect();
                for h in hs {
                    h.join().unwrap();
                }
            }
            // A thread that exists before GO creates a burner thread after
            // GO and exits before it: only the exited thread's counter sees
            // the burner.
            "orphan" => {
                let (tx, rx) = std::sync::mpsc::channel::<()>();
                let (htx, hrx) = std::sync::mpsc::channel();
                let t = std::thread::spawn(move || {
                    rx.recv().unwrap();
                    let h = std::thread::spawn(|| {
                        std::thread::sleep(Duration::from_millis(100));
                        burn(300 * MS)
                    });
                    htx.send(h).unwrap();
                });
                // Let the thread block in recv before READY.
                std::thread::sleep(Duration::from_millis(50));
                writeln!(out, "READY").unwrap();
                wait_line(&mut stdin);
                tx.send(()).unwrap();
                t.join().unwrap();
                let h = hrx.recv().unwrap();
                h.join().unwrap();
            }
            // Thread churn, as a thread pool that spawns and retires workers:
            // short-lived threads one after another, before and after GO,
            // until the process has burned 150 ms of CPU after GO (CPU time,
            // not wall time: on a loaded machine 300 ms of wall time can be
            // 50 ms of CPU).
            "churn" => {
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let stop2 = stop.clone();
                let spawned = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
                let spawned2 = spawned.clone();
                let spawner = std::thread::spawn(move || {
                    while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                        std::thread::spawn(|| burn(MS)).join().unwrap();
                        spawned2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
                std::thread::sleep(Duration::from_millis(20));
                writeln!(out, "READY").unwrap();
                wait_line(&mut stdin);
                let before_go = spawned.load(std::sync::atomic::Ordering::Relaxed);
                let go = clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID);
                while clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID) - go < 150 * MS {
                    std::thread::sleep(Duration::from_millis(10));
                }
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                spawner.join().unwrap();
                let n = spawned.load(std::sync::atomic::Ordering::Relaxed) - before_go;
                writeln!(out, "EXITED {n}").unwrap();
            }
            // The main thread burns 200 ms.
            "burn" => {
                writeln!(out, "READY").unwrap();
                wait_line(&mut stdin);
                burn(200 * MS);
            }
            // Open counters on the pid given, as an unprivileged user.
            "open-as-nobody" => {
                let pid: i32 = std::env::var("CIS490_PERF_TEST_PID")
                    .unwrap()
                    .parse()
                    .unwrap();
                match PerfSource::new(pid) {
                    Ok(s) => writeln!(out, "OPENED {:?}", s.info()).unwrap(),
                    Err(e) => writeln!(out, "ERROR {e:#}").unwrap(),
                }
                return;
            }
            m => panic!("unknown workload {m}"),
        }
        writeln!(out, "DONE").unwrap();
        out.flush().unwrap();
        // Stay alive (and measurable) until the test closes stdin.
        let mut rest = String::new();
        let _ = stdin.read_line(&mut rest);
        // Exit without the harness's own report.
        std::process::exit(0);
    }

    /// `workload_child`'s name for the test harness (the module path without the crate).
    /// A test name that matches nothing: the child runs its workload from
    /// its constructor and exits before libtest; should that not happen,
    /// libtest runs no test and the parent sees no `READY`.
    fn workload_test_name() -> String {
        "no-such-test-the-workload-child-runs-before-libtest".to_owned()
    }

    struct Workload {
        child: Child,
        stdin: Option<ChildStdin>,
        stdout: BufReader<ChildStdout>,
    }

    impl Workload {
        fn spawn(mode: &str) -> Self {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    &workload_test_name(),
                    "--nocapture",
                    "--test-threads=1",
                    "-q",
                ])
                .env(MODE_ENV, mode)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let stdin = child.stdin.take();
            let stdout = BufReader::new(child.stdout.take().unwrap());
            let mut w = Self {
                child,
                stdin,
                stdout,
            };
            w.expect("READY");
            w
        }
        fn pid(&self) -> i32 {
            self.child.id() as i32
        }
        fn expect(&mut self, word: &str) {
            let mut line = String::new();
            loop {
                line.clear();
                let n = self.stdout.read_line(&mut line).unwrap();
                assert!(n > 0, "workload exited before printing {word}");
                if line.trim() == word {
                    return;
                }
            }
        }
        /// Reads lines until one is `WORD N`; returns N.
        fn value(&mut self, word: &str) -> u64 {
            let mut line = String::new();
            loop {
                line.clear();
                let n = self.stdout.read_line(&mut line).unwrap();
                assert!(n > 0, "workload exited before printing {word}");
                if let Some(v) = line.trim().strip_prefix(word) {
                    return v.trim().parse().unwrap();
                }
            }
        }
        fn go(&mut self) {
            writeln!(self.stdin.as_mut().unwrap(), "GO").unwrap();
        }
    }

    impl Drop for Workload {
        fn drop(&mut self) {
            drop(self.stdin.take());
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn threads_of(pid: i32) -> usize {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count()
    }

    /// task-clock and the process CPU clock are two clocks over the same
    /// slices (perf's and the scheduler's), within 2% of each other, except
    /// that task-clock keeps counting while the hypervisor steals the CPU
    /// and the scheduler's clock does not (CONFIG_PARAVIRT_TIME_ACCOUNTING):
    /// perf may be above by the machine's steal time since `steal_before`
    /// too (as the integration test and `cis490 check` allow).
    fn assert_task_clock(what: &str, perf: u64, truth: u64, steal_before: Option<u64>) {
        let steal = crate::meta::machine_steal_ns()
            .zip(steal_before)
            .map_or(0, |(now, before)| now.saturating_sub(before));
        let (lo, hi) = (truth as f64 * 0.98, truth as f64 * 1.02 + steal as f64);
        assert!(
            (lo..=hi).contains(&(perf as f64)),
            "{what}: perf {perf} vs process CPU clock {truth}: not within 2% (plus {steal} ns of steal above)"
        );
    }

    #[test]
    fn threads_created_later_are_counted_once() {
        let mut w = Workload::spawn("late-threads");
        let pid = w.pid();
        let threads_at_start = threads_of(pid);
        let steal0 = crate::meta::machine_steal_ns();
        let cpu0 = process_cpu_ns(pid);
        let mut src = PerfSource::new(pid).unwrap();
        assert_eq!(src.info().threads_opened, threads_at_start);
        w.go();
        w.expect("DONE");
        let cpu1 = process_cpu_ns(pid);
        let m = src.sample();
        let truth = cpu1 - cpu0;
        let perf = m.cpu_ns.expect("task-clock counts");
        println!(
            "late threads: {} threads at start, perf cpu_ns {perf} ({:.1} ms), process CPU clock {truth} ({:.1} ms), ratio {:.4}",
            threads_at_start,
            perf as f64 / 1e6,
            truth as f64 / 1e6,
            perf as f64 / truth as f64
        );
        assert!(
            perf >= 600 * MS,
            "the two late threads burned 600 ms; perf saw {perf} ns"
        );
        assert!(truth >= 600 * MS, "ground truth too small: {truth}");
        assert_task_clock("late threads", perf, truth, steal0);
        assert!(
            m.ctx_switches.unwrap() > 0,
            "the sleep and the joins switch context"
        );
        assert!(
            m.page_faults_minor.unwrap() > 0,
            "new thread stacks fault pages in"
        );
        assert!(m.migrations.is_some() && m.page_faults_major.is_some());
        // Nothing else ran: the next bucket is (nearly) empty.
        let m2 = src.sample();
        assert!(
            m2.cpu_ns.unwrap() < 20 * MS,
            "idle bucket had {:?} ns",
            m2.cpu_ns
        );
        // Fields perf does not measure stay None.
        let perf_fields = Measures {
            cpu_ns: m.cpu_ns,
            ctx_switches: m.ctx_switches,
            migrations: m.migrations,
            page_faults_minor: m.page_faults_minor,
            page_faults_major: m.page_faults_major,
            cycles: m.cycles,
            instructions: m.instructions,
            cache_references: m.cache_references,
            cache_misses: m.cache_misses,
            branch_misses: m.branch_misses,
            ..Default::default()
        };
        assert_eq!(m, perf_fields, "a field perf does not measure is not None");
    }

    #[test]
    fn exited_thread_keeps_counting_its_inherited_children() {
        let mut w = Workload::spawn("orphan");
        let pid = w.pid();
        let steal0 = crate::meta::machine_steal_ns();
        let cpu0 = process_cpu_ns(pid);
        let mut src = PerfSource::new(pid).unwrap();
        let opened = src.info().threads_opened;
        assert!(
            opened >= 2,
            "main and the waiting thread (and maybe the harness's): {opened}"
        );
        w.go();
        w.expect("DONE");
        let cpu1 = process_cpu_ns(pid);
        let perf = src.sample().cpu_ns.unwrap();
        let truth = cpu1 - cpu0;
        println!(
            "orphan: {opened} threads opened, perf cpu_ns {:.1} ms, process CPU clock {:.1} ms",
            perf as f64 / 1e6,
            truth as f64 / 1e6
        );
        assert!(
            perf as f64 >= 300.0 * MS as f64 * 0.98,
            "the burner (child of an exited counted thread) burned 300 ms; perf saw {perf}"
        );
        assert_task_clock("orphan", perf, truth, steal0);
    }

    #[test]
    fn hardware_events_are_counted_or_none_with_a_reason() {
        let mut w = Workload::spawn("burn");
        let mut src = PerfSource::new(w.pid()).unwrap();
        w.go();
        w.expect("DONE");
        let m = src.sample();
        let info = src.info();
        println!("perf info: {info:#?}");
        assert_eq!(info.events.len(), 10);
        for sw in [
            "task-clock",
            "context-switches",
            "cpu-migrations",
            "minor-faults",
            "major-faults",
        ] {
            assert!(
                info.events[sw].starts_with("counting"),
                "{sw}: {}",
                info.events[sw]
            );
        }
        let cpu = m.cpu_ns.unwrap();
        assert!(
            cpu as f64 >= 200.0 * MS as f64 * 0.98,
            "the main thread burned 200 ms of CPU after the counters opened; task-clock saw {cpu}"
        );
        let hw = [
            ("cycles", m.cycles),
            ("instructions", m.instructions),
            ("cache-references", m.cache_references),
            ("cache-misses", m.cache_misses),
            ("branch-misses", m.branch_misses),
        ];
        for (name, v) in hw {
            let status = &info.events[name];
            if status.starts_with("counting") {
                println!("{name}: hardware path, counting: {v:?}");
                assert!(v.is_some(), "{name} counting but None");
            } else {
                println!("{name}: no-PMU path: {status}");
                assert_eq!(v, None, "{name} not counting ({status}) but {v:?}");
                assert!(
                    !status.is_empty() && status.contains(": E"),
                    "{name}: reason lacks the errno: {status}"
                );
            }
        }
        if info.events["cycles"].starts_with("counting") {
            assert!(
                m.cycles.unwrap() > 0 && m.instructions.unwrap_or(1) > 0,
                "200 ms of burn took no cycles"
            );
        } else {
            assert!(
                info.events["cycles"].starts_with("not supported by this machine"),
                "{}",
                info.events["cycles"]
            );
        }
        // Serializes as meta.json wants it.
        let v = serde_json::to_value(&info).unwrap();
        assert!(v["events"]["task-clock"].is_string() && v["threads_opened"].is_u64());
    }

    #[test]
    fn threads_churning_while_opening_are_counted_once() {
        let mut w = Workload::spawn("churn");
        let pid = w.pid();
        let steal0 = crate::meta::machine_steal_ns();
        let before = process_cpu_ns(pid);
        let mut src = PerfSource::new(pid).unwrap();
        let after = process_cpu_ns(pid);
        w.go();
        let exited = w.value("EXITED");
        w.expect("DONE");
        let end = process_cpu_ns(pid);
        let perf = src.sample().cpu_ns.unwrap();
        let (lo, hi) = (end - after, end - before);
        println!(
            "churn: {} threads opened, {exited} threads exited, perf cpu_ns {:.1} ms, process CPU clock {:.1}..{:.1} ms, perf short by {:.1} us per exited thread",
            src.info().threads_opened,
            perf as f64 / 1e6,
            lo as f64 / 1e6,
            hi as f64 / 1e6,
            (lo as f64 - perf as f64) / exited.max(1) as f64 / 1e3
        );
        assert!(lo >= 100 * MS, "the churn burned too little: {lo}");
        // A thread's task-clock stops when perf closes its counters in the
        // exit path, before the thread's last switch-out, which the process
        // clock still counts: 20 to 90 us per exited thread measured here,
        // the more the busier the machine (90 at a load average of 11).
        // Allowed: 2%, plus 200 us per exited thread below. What this test
        // is for is the upper bound: a thread counted twice.
        // Above, task-clock may also count the machine's steal time since
        // the start, as assert_task_clock explains (CI's clean run: perf
        // 190.7 ms against 155.5 ms of process CPU clock).
        let steal = crate::meta::machine_steal_ns()
            .zip(steal0)
            .map_or(0, |(now, before)| now.saturating_sub(before));
        let floor = lo as f64 * 0.98 - exited as f64 * 200e3;
        let ceiling = hi as f64 * 1.02 + steal as f64;
        assert!(
            perf as f64 >= floor && perf as f64 <= ceiling,
            "perf {perf} outside the process CPU clock's {lo}..{hi} (2%, and 200 us per exited thread below, {steal} ns of the machine's steal above)"
        );
    }

    #[test]
    fn a_pid_that_does_not_exist_is_an_error() {
        // Above the largest pid_max (2^22).
        let e = PerfSource::new(i32::MAX - 1).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        // A reaped child.
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id() as i32;
        c.wait().unwrap();
        assert!(PerfSource::new(pid).is_err());
        for bad in [0, -1] {
            assert!(PerfSource::new(bad).is_err(), "pid {bad}");
        }
    }

    #[test]
    fn no_permission_is_an_error_with_a_one_line_reason() {
        // SAFETY: getuid has no preconditions.
        if unsafe { libc::getuid() } != 0 {
            println!("not root: nothing to drop (skipping the nobody path)");
            let e = PerfSource::new(1).unwrap_err().to_string();
            assert!(e.contains("permission denied"), "{e}");
            return;
        }
        // A root-owned process (this one), opened by a child running as nobody.
        use std::os::unix::{fs::PermissionsExt, process::CommandExt};
        // A copy of this binary that nobody can run wherever the build is.
        let exe = std::env::temp_dir().join(format!("cis490-perf-test-{}", std::process::id()));
        std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new(&exe)
            .args([
                "--exact",
                &workload_test_name(),
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(MODE_ENV, "open-as-nobody")
            .env("CIS490_PERF_TEST_PID", std::process::id().to_string())
            .uid(65534)
            .gid(65534)
            .output();
        let _ = std::fs::remove_file(&exe);
        let out = out.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("ERROR ") || l.starts_with("OPENED "))
            .unwrap_or_else(|| {
                panic!(
                    "no result from the nobody child: {stdout} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        println!("as nobody: {line}");
        assert!(
            line.starts_with("ERROR perf: cannot open any software counter"),
            "{line}"
        );
        assert!(
            line.contains("permission denied: EACCES") || line.contains("permission denied: EPERM"),
            "{line}"
        );
    }

    #[test]
    fn multiplexed_counts_are_scaled() {
        assert_eq!(scale(100, 10, 10), (100, false));
        assert_eq!(scale(100, 10, 5), (200, true));
        assert_eq!(scale(7, 10, 0), (7, true));
        assert_eq!(scale(u64::MAX, 4, 2), (u64::MAX, true));
        assert_eq!(scale(3, 0, 0), (3, false));
    }
}
