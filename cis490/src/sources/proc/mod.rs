//! The /proc oracle: a collector that, once per bucket, reads the target
//! process's `/proc` files and returns what changed since the previous bucket
//! as a [`Measures`].
//!
//! It is the ground truth the eBPF tracer is compared with, so it is careful
//! about the ways /proc polling goes wrong:
//!
//! - `cpu_ns` comes from the whole-process `/proc/PID/stat` (utime + stime),
//!   which includes threads that have exited. It is in clock ticks
//!   (`sysconf(_SC_CLK_TCK)`), so one bucket's value is accurate to about two
//!   ticks; the sum over an episode is exact to the same two ticks.
//! - Context switches, run-queue delay and migrations exist only per thread
//!   (`/proc/PID/status` describes the leader thread alone), so they are summed
//!   over `/proc/PID/task/*`. Each thread's last-seen counters are kept, keyed
//!   by tid *and* start time (a reused tid is a new thread), and a thread that
//!   exits keeps its last-seen counts in the cumulative totals. A bucket's value
//!   is the cumulative total now minus the one at the previous sample,
//!   saturating at 0. What a thread did after its last sample before it
//!   exited, and threads born and dead between two samples, cannot be seen
//!   by polling: they are missing from the per-thread fields (not from
//!   `cpu_ns`).
//! - `/proc/PID/io` gets a child's whole lifetime of I/O added when the
//!   process reaps it: a bucket where that happened (the reaped children's
//!   faults or CPU in `/proc/PID/stat` grew) has `null` I/O fields.
//! - A field whose file this kernel does not have (`sched` without
//!   `CONFIG_SCHED_DEBUG`, `schedstat` without `CONFIG_SCHED_INFO`) is `None`,
//!   never 0.
//! - If the process is gone (its `stat` unreadable, or its pid now belongs to
//!   a process with another start time), every field is `None`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, ensure};

use crate::row::{Measures, NetCounters};
use crate::taps::{Resolver, Tap};

// The parsers are `pub(crate)`: the fuzz targets (`fuzz/`, which compile
// this module from its file) drive them.
pub(crate) mod io_bytes;
pub(crate) mod net_dev;

/// Collects per-bucket deltas for one process from `/proc`.
#[derive(Debug)]
pub struct ProcSource {
    pid: i32,
    /// `ROOT/PID/stat`.
    stat_path: PathBuf,
    /// `ROOT/PID/task`.
    task_dir: PathBuf,
    /// Clock ticks per second, for utime and stime.
    clk_tck: u64,
    /// Start time of the process (stat field 22), to notice pid reuse.
    start_time: u64,
    /// Set for good once the pid names another process.
    gone: bool,
    /// Threads seen alive (or not yet known to be dead), with their
    /// last-seen counters.
    threads: HashMap<ThreadKey, ThreadState>,
    /// Last-seen counters of threads known to have exited, summed.
    retired: Counters,
    /// Which per-thread files have ever been read on this kernel.
    seen: Seen,
    /// Whether the missing `sched` file has been logged already.
    logged_no_sched: bool,
    /// Incremented by every scan; threads not updated in it are stale.
    generation: u64,
    /// Cumulative values at the previous sample (or the baseline).
    prev: Snapshot,
    io: Reader,
    /// `ROOT/PID/io` and its value at the previous sample (`None` if it
    /// was never readable).
    io_path: PathBuf,
    prev_io: Option<io_bytes::IoBytes>,
    /// Buckets whose I/O fields are `null` because a child was reaped in
    /// them (see `sample_io`).
    children_reaped_buckets: u64,
    /// `ROOT/PID/net/dev`, and the target's taps there at the previous
    /// sample (cumulative, from the target's side).
    net_dev_path: PathBuf,
    prev_taps: BTreeMap<(u32, u32), NetCounters>,
    /// Reused buffers for one scan.
    tids: Vec<i32>,
    stale: Vec<ThreadKey>,
}

impl ProcSource {
    /// Attach to process `pid` under `/proc`; takes the baseline sample.
    ///
    /// # Errors
    ///
    /// If `/proc/PID/stat` cannot be read or parsed (no such process), or
    /// the clock-tick rate is unknown.
    pub fn new(pid: i32) -> anyhow::Result<Self> {
        Self::with_root("/proc", pid)
    }

    /// Same as [`ProcSource::new`], with another proc root (unit tests use a
    /// fake tree in a tempdir).
    ///
    /// # Errors
    ///
    /// As [`ProcSource::new`], for `ROOT/PID/stat`.
    pub fn with_root(root: impl Into<PathBuf>, pid: i32) -> anyhow::Result<Self> {
        let proc_dir = root.into().join(pid.to_string());
        let clk_tck = clock_ticks_per_second()?;
        let mut io = Reader::default();
        let stat_path = proc_dir.join("stat");
        let (stat, comm) = io
            .read_with(&stat_path, |s| {
                let st = parse_stat(s)?;
                Ok((ProcessStat::from(&st), st.comm.to_owned()))
            })
            .map_err(|e| anyhow!("process {pid}: cannot read {}: {e}", stat_path.display()))?;
        log::debug!(
            "proc source: attached to {pid} ({comm}), state {}, {} threads, CLK_TCK {clk_tck}",
            stat.state,
            stat.num_threads
        );
        let mut src = ProcSource {
            pid,
            stat_path,
            task_dir: proc_dir.join("task"),
            clk_tck,
            start_time: stat.start_time,
            gone: false,
            threads: HashMap::new(),
            retired: Counters::default(),
            seen: Seen::default(),
            logged_no_sched: false,
            generation: 0,
            prev: Snapshot::default(),
            io,
            io_path: proc_dir.join("io"),
            prev_io: None,
            children_reaped_buckets: 0,
            net_dev_path: proc_dir.join("net/dev"),
            prev_taps: BTreeMap::new(),
            tids: Vec::new(),
            stale: Vec::new(),
        };
        src.scan_threads();
        src.prev = src.snapshot(&stat);
        src.prev_io = src.read_io();
        Ok(src)
    }

    /// Reads /proc now and returns what changed since the previous call (or
    /// since the baseline for the first call).
    ///
    /// Every field is `None` if the process is gone; `wakeups`,
    /// `runq_delay_max_ns`, `runq_delay_hist_log2`, `events` and
    /// `dropped_events` are always `None` (/proc does not have them).
    ///
    /// `taps` are the target's tap interfaces (from its fds, each where it
    /// lives; `spaces` has the namespaces' `/proc/net/dev`): their counters
    /// fill the `net_*` fields (`null` without taps: /proc has no
    /// per-process socket traffic).
    pub fn sample(&mut self, taps: &[Tap], spaces: Option<&Resolver>) -> Measures {
        let Some(stat) = self.read_process_stat() else {
            return Measures::default();
        };
        self.scan_threads();
        let now = self.snapshot(&stat);
        let mut m = self.measures(&now, stat.num_threads);
        m.set_ctx_total();
        let reaped = now.children != self.prev.children;
        self.prev = now;
        self.sample_io(&mut m, reaped);
        self.sample_taps(taps, spaces, &mut m);
        m
    }

    /// Buckets whose `blk_read_bytes` and `io_write_bytes` are `null`
    /// because the target reaped a child in them.
    pub fn children_reaped_buckets(&self) -> u64 {
        self.children_reaped_buckets
    }

    fn read_io(&mut self) -> Option<io_bytes::IoBytes> {
        match self.io.read_with(&self.io_path, io_bytes::parse_io) {
            Ok(v) => Some(v),
            Err(e) => {
                log::debug!("proc source: {}: {e}", self.io_path.display());
                None
            }
        }
    }

    /// `blk_read_bytes` and `io_write_bytes` from `/proc/PID/io`: its
    /// `write_bytes` counts pages as they are dirtied (and direct writes as
    /// they are issued), not requests to a device, so it is not a
    /// `blk_write_bytes` (null here). When the process reaped a child since
    /// the last sample (`reaped`), the kernel has added the child's whole
    /// lifetime of I/O to the file: both fields are `null` in that bucket
    /// (counted in [`Self::children_reaped_buckets`]).
    fn sample_io(&mut self, m: &mut Measures, reaped: bool) {
        let now = self.read_io();
        if reaped && now.is_some() && self.prev_io.is_some() {
            self.children_reaped_buckets += 1;
        } else if let (Some(now), Some(prev)) = (now, self.prev_io) {
            m.blk_read_bytes = Some(now.read_bytes.saturating_sub(prev.read_bytes));
            m.io_write_bytes = Some(now.write_bytes.saturating_sub(prev.write_bytes));
        }
        if now.is_some() {
            self.prev_io = now;
        }
    }

    /// `net_*` and `net_by_if` from the target's taps' interface counters,
    /// in the `/proc/net/dev` of the namespace each lives in (`spaces` keeps
    /// one for each namespace a tap was found in from its fd; else the
    /// target's own `/proc/PID/net/dev`). A tap is an interface in a
    /// namespace: one re-created under its old name is a new one, summed
    /// under the name. A tap counts from the first sample that sees it.
    fn sample_taps(&mut self, taps: &[Tap], spaces: Option<&Resolver>, m: &mut Measures) {
        if taps.is_empty() && self.prev_taps.is_empty() {
            return;
        }
        let mut tables: BTreeMap<u32, Option<BTreeMap<String, NetCounters>>> = BTreeMap::new();
        let mut now_of: BTreeMap<(u32, u32), (String, NetCounters)> = BTreeMap::new();
        for tap in taps {
            let table = tables.entry(tap.netns_inum).or_insert_with(|| {
                let text = match spaces.and_then(|r| r.net_dev(tap.netns_inum)) {
                    Some(Ok(text)) => Ok(net_dev::parse_net_dev(&text)),
                    Some(Err(e)) => Err(format!("net/dev of namespace {}: {e}", tap.netns_inum)),
                    None => self
                        .io
                        .read_with(&self.net_dev_path, |s| Ok(net_dev::parse_net_dev(s)))
                        .map_err(|e| format!("{}: {e}", self.net_dev_path.display())),
                };
                text.map_err(|e| log::debug!("proc source: {e}")).ok()
            });
            if let Some(c) = table.as_ref().and_then(|t| t.get(&tap.name)) {
                now_of.insert((tap.netns_inum, tap.ifindex), (tap.name.clone(), *c));
            }
        }
        let mut by_if: BTreeMap<String, NetCounters> = BTreeMap::new();
        for (key, (name, now)) in &now_of {
            let Some(prev) = self.prev_taps.get(key) else {
                continue;
            };
            by_if.entry(name.clone()).or_default().add(&now.since(prev));
        }
        for (key, (_, now)) in now_of {
            self.prev_taps.insert(key, now);
        }
        m.set_net(Some(by_if));
    }

    /// The process's own stat, or `None` if the process is gone.
    fn read_process_stat(&mut self) -> Option<ProcessStat> {
        if self.gone {
            return None;
        }
        let stat = match self.io.read_with(&self.stat_path, |s| {
            parse_stat(s).map(|st| ProcessStat::from(&st))
        }) {
            Ok(stat) => stat,
            Err(e) => {
                log::debug!("proc source: process {} unreadable: {e}", self.pid);
                return None;
            }
        };
        if stat.start_time != self.start_time {
            log::debug!(
                "proc source: pid {} now names another process (start time {} != {})",
                self.pid,
                stat.start_time,
                self.start_time
            );
            self.gone = true;
            return None;
        }
        if stat.state == 'Z' {
            log::debug!("proc source: process {} is a zombie", self.pid);
        }
        Some(stat)
    }

    /// Updates every thread's last-seen counters and retires the threads
    /// that have exited.
    fn scan_threads(&mut self) {
        self.generation += 1;
        self.list_tids();
        for i in 0..self.tids.len() {
            // Errors are dealt with below: the thread is then stale.
            let _ = self.visit(self.tids[i]);
        }
        let generation = self.generation;
        self.stale.clear();
        self.stale.extend(
            self.threads
                .iter()
                .filter(|(_, t)| t.generation != generation)
                .map(|(k, _)| *k),
        );
        for i in 0..self.stale.len() {
            let key = self.stale[i];
            self.recheck(key);
        }
    }

    /// Fills `self.tids` from `ROOT/PID/task`.
    fn list_tids(&mut self) {
        self.tids.clear();
        let entries = match std::fs::read_dir(&self.task_dir) {
            Ok(entries) => entries,
            Err(e) => {
                log::debug!("proc source: skipping {}: {e}", self.task_dir.display());
                return;
            }
        };
        for entry in entries {
            match entry {
                Ok(entry) => {
                    if let Some(tid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                        self.tids.push(tid);
                    }
                }
                Err(e) => log::debug!("proc source: listing {}: {e}", self.task_dir.display()),
            }
        }
    }

    /// A known thread that the listing did not show, or whose files could
    /// not be read: look again, and retire it if it is gone for sure.
    fn recheck(&mut self, key: ThreadKey) {
        match self.visit(key.tid) {
            Ok(start) if start == key.start_time => {} // updated now
            Ok(_) => {
                log::debug!("proc source: tid {} reused", key.tid);
                self.retire(key);
            }
            Err(e) if e.is_gone() => self.retire(key),
            // Not known to be gone: keep its last-seen values, look again
            // next time.
            Err(e) => log::debug!("proc source: keeping thread {}: {e}", key.tid),
        }
    }

    /// Moves an exited thread's last-seen counters into `retired`.
    fn retire(&mut self, key: ThreadKey) {
        if let Some(t) = self.threads.remove(&key) {
            self.retired.add(&t.counters);
        }
    }

    /// Reads one thread's files and updates its last-seen counters; returns
    /// its start time. A file that cannot be read leaves that counter as it
    /// was.
    fn visit(&mut self, tid: i32) -> Result<u64, ReadError> {
        let start_time = self.read_task(tid, "stat", |s| {
            let st = parse_stat(s)?;
            ensure!(st.pid == tid, "stat of tid {tid} names pid {}", st.pid);
            Ok(st.start_time)
        });
        let start_time = match start_time {
            Ok(t) => t,
            Err(e) => {
                log::debug!("proc source: skipping thread {tid}: stat: {e}");
                return Err(e);
            }
        };
        let ctxt = self.read_task_field(tid, "status", parse_status_ctxt);
        let run_delay = self.read_task_field(tid, "schedstat", |s| {
            parse_schedstat(s).map(|st| st.run_delay_ns)
        });
        let migrations = self.read_task_field(tid, "sched", parse_sched_migrations);

        self.seen.ctxt |= ctxt.is_some();
        self.seen.schedstat |= run_delay.is_some();
        self.seen.sched |= migrations.is_some();
        let generation = self.generation;
        let key = ThreadKey { tid, start_time };
        let t = self.threads.entry(key).or_default();
        t.generation = generation;
        t.counters.update(ctxt, run_delay, migrations);
        Ok(start_time)
    }

    /// Reads and parses `task/TID/NAME`, or logs why not.
    fn read_task_field<T>(
        &mut self,
        tid: i32,
        name: &str,
        parse: impl FnOnce(&str) -> anyhow::Result<T>,
    ) -> Option<T> {
        match self.read_task(tid, name, parse) {
            Ok(v) => Some(v),
            Err(e) => {
                let quiet = name == "sched" && !self.seen.sched && e.is_gone();
                if !quiet || !self.logged_no_sched {
                    log::debug!("proc source: skipping thread {tid} {name}: {e}");
                }
                self.logged_no_sched |= quiet;
                None
            }
        }
    }

    /// Reads and parses `task/TID/NAME`.
    fn read_task<T>(
        &mut self,
        tid: i32,
        name: &str,
        parse: impl FnOnce(&str) -> anyhow::Result<T>,
    ) -> Result<T, ReadError> {
        self.io.set_task_path(&self.task_dir, tid, name);
        self.io.read_buffered_path(parse)
    }

    /// Cumulative values now.
    fn snapshot(&self, stat: &ProcessStat) -> Snapshot {
        let mut totals = self.retired;
        for t in self.threads.values() {
            totals.add(&t.counters);
        }
        Snapshot {
            cpu_ns: ticks_to_ns(stat.cpu_ticks, self.clk_tck),
            minflt: stat.minflt,
            majflt: stat.majflt,
            children: stat.children,
            totals,
        }
    }

    /// The deltas from `self.prev` to `now`.
    fn measures(&self, now: &Snapshot, num_threads: u64) -> Measures {
        let (a, b) = (&now.totals, &self.prev.totals);
        let delta = |seen: bool, now: u64, prev: u64| seen.then(|| now.saturating_sub(prev));
        Measures {
            cpu_ns: Some(now.cpu_ns.saturating_sub(self.prev.cpu_ns)),
            threads: Some(num_threads),
            ctx_switches_voluntary: delta(self.seen.ctxt, a.voluntary, b.voluntary),
            ctx_switches_involuntary: delta(self.seen.ctxt, a.involuntary, b.involuntary),
            runq_delay_ns: delta(self.seen.schedstat, a.run_delay_ns, b.run_delay_ns),
            migrations: delta(self.seen.sched, a.migrations, b.migrations),
            page_faults_minor: Some(now.minflt.saturating_sub(self.prev.minflt)),
            page_faults_major: Some(now.majflt.saturating_sub(self.prev.majflt)),
            ..Measures::default()
        }
    }
}

/// A thread: its tid and its start time, so that a reused tid is a new
/// thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ThreadKey {
    tid: i32,
    start_time: u64,
}

/// A thread's last-seen counters.
#[derive(Clone, Copy, Debug, Default)]
struct ThreadState {
    counters: Counters,
    /// The last scan that read this thread's stat.
    generation: u64,
}

/// Per-thread cumulative counters (or sums of them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counters {
    voluntary: u64,
    involuntary: u64,
    run_delay_ns: u64,
    migrations: u64,
}

impl Counters {
    fn add(&mut self, o: &Counters) {
        self.voluntary = self.voluntary.saturating_add(o.voluntary);
        self.involuntary = self.involuntary.saturating_add(o.involuntary);
        self.run_delay_ns = self.run_delay_ns.saturating_add(o.run_delay_ns);
        self.migrations = self.migrations.saturating_add(o.migrations);
    }

    /// Replaces the counters that were read; keeps the others.
    fn update(&mut self, ctxt: Option<CtxtSwitches>, run_delay: Option<u64>, migr: Option<u64>) {
        if let Some(c) = ctxt {
            self.voluntary = c.voluntary;
            self.involuntary = c.involuntary;
        }
        if let Some(d) = run_delay {
            self.run_delay_ns = d;
        }
        if let Some(m) = migr {
            self.migrations = m;
        }
    }
}

/// Which per-thread files were ever read: a field whose file never was is
/// `None`.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    ctxt: bool,
    schedstat: bool,
    sched: bool,
}

/// Cumulative values at one sample.
#[derive(Clone, Copy, Debug, Default)]
struct Snapshot {
    cpu_ns: u64,
    minflt: u64,
    majflt: u64,
    /// [`ProcessStat::children`].
    children: u64,
    totals: Counters,
}

/// What a sample keeps of the process's own stat.
#[derive(Clone, Copy, Debug)]
struct ProcessStat {
    state: char,
    minflt: u64,
    majflt: u64,
    cpu_ticks: u64,
    /// What the kernel adds to the process's own stat when it reaps a child
    /// (its faults and CPU ticks, and those of the child's own reaped
    /// children): grows when a child was reaped.
    children: u64,
    num_threads: u64,
    start_time: u64,
}

impl From<&Stat<'_>> for ProcessStat {
    fn from(st: &Stat<'_>) -> Self {
        ProcessStat {
            state: st.state,
            minflt: st.minflt,
            majflt: st.majflt,
            cpu_ticks: st.utime.saturating_add(st.stime),
            children: [st.cminflt, st.cmajflt, st.cutime, st.cstime]
                .into_iter()
                .fold(0, u64::saturating_add),
            num_threads: st.num_threads,
            start_time: st.start_time,
        }
    }
}

/// Why a /proc file gave no value.
#[derive(Debug)]
enum ReadError {
    Io(io::Error),
    Parse(anyhow::Error),
}

impl ReadError {
    /// The file (or its task) does not exist (any more).
    fn is_gone(&self) -> bool {
        match self {
            ReadError::Io(e) => {
                e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
            }
            ReadError::Parse(_) => false,
        }
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::Parse(e) => write!(f, "{e:#}"),
        }
    }
}

/// Reads /proc files into reused buffers.
#[derive(Debug, Default)]
struct Reader {
    buf: Vec<u8>,
    path: PathBuf,
    num: String,
}

impl Reader {
    /// Sets `self.path` to `TASK_DIR/TID/NAME`.
    fn set_task_path(&mut self, task_dir: &Path, tid: i32, name: &str) {
        self.num.clear();
        // Writing to a String cannot fail.
        let _ = write!(self.num, "{tid}");
        self.path.as_mut_os_string().clear();
        self.path.push(task_dir);
        self.path.push(&self.num);
        self.path.push(name);
    }

    /// Reads `self.path` and parses it.
    fn read_buffered_path<T>(
        &mut self,
        parse: impl FnOnce(&str) -> anyhow::Result<T>,
    ) -> Result<T, ReadError> {
        let path = std::mem::take(&mut self.path);
        let r = self.read_with(&path, parse);
        self.path = path;
        r
    }

    /// Reads `path` whole and parses it. Thread names may hold any bytes, so
    /// the text is read lossily (without allocating when it is UTF-8).
    fn read_with<T>(
        &mut self,
        path: &Path,
        parse: impl FnOnce(&str) -> anyhow::Result<T>,
    ) -> Result<T, ReadError> {
        self.buf.clear();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut self.buf))
            .map_err(ReadError::Io)?;
        let text: Cow<'_, str> = String::from_utf8_lossy(&self.buf);
        parse(&text).map_err(ReadError::Parse)
    }
}

/// `sysconf(_SC_CLK_TCK)`: the unit of utime and stime.
fn clock_ticks_per_second() -> anyhow::Result<u64> {
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(tck)
        .ok()
        .filter(|&t| t > 0)
        .ok_or_else(|| anyhow!("sysconf(_SC_CLK_TCK) returned {tck}"))
}

/// Clock ticks to ns, rounding down.
pub(crate) fn ticks_to_ns(ticks: u64, clk_tck: u64) -> u64 {
    let ns = u128::from(ticks) * 1_000_000_000 / u128::from(clk_tck.max(1));
    u64::try_from(ns).unwrap_or(u64::MAX)
}

/// The fields of `/proc/PID/stat` (or `/proc/PID/task/TID/stat`) this
/// module uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stat<'a> {
    /// Field 1.
    pub(crate) pid: i32,
    /// Field 2, without the parentheses.
    pub(crate) comm: &'a str,
    /// Field 3.
    pub(crate) state: char,
    /// Field 10: minor faults (whole process when read from PID/stat).
    pub(crate) minflt: u64,
    /// Field 11: minor faults of reaped children (whole process).
    pub(crate) cminflt: u64,
    /// Field 12: major faults.
    pub(crate) majflt: u64,
    /// Field 13: major faults of reaped children.
    pub(crate) cmajflt: u64,
    /// Field 14, clock ticks.
    pub(crate) utime: u64,
    /// Field 15, clock ticks.
    pub(crate) stime: u64,
    /// Fields 16 and 17: CPU of reaped children, clock ticks.
    pub(crate) cutime: u64,
    pub(crate) cstime: u64,
    /// Field 20.
    pub(crate) num_threads: u64,
    /// Field 22, clock ticks since boot.
    pub(crate) start_time: u64,
}

/// Parses a stat line. The comm is everything between the first `(` and the
/// last `)`, and the fields after it are counted from that last `)`.
pub(crate) fn parse_stat(s: &str) -> anyhow::Result<Stat<'_>> {
    /// Fields 3 to 22.
    const AFTER_COMM: usize = 20;
    let open = s.find('(').context("stat: no '('")?;
    let close = s.rfind(')').context("stat: no ')'")?;
    ensure!(close > open, "stat: no ')' after the '('");
    let pid = s[..open].trim();
    let pid = pid
        .parse()
        .with_context(|| format!("stat: bad pid {pid:?}"))?;
    let mut f = [""; AFTER_COMM];
    let mut rest = s[close + 1..].split_ascii_whitespace();
    for (i, slot) in f.iter_mut().enumerate() {
        *slot = rest
            .next()
            .ok_or_else(|| anyhow!("stat: {i} fields after the comm, need {AFTER_COMM}"))?;
    }
    let field = |n: usize| -> anyhow::Result<u64> {
        let v = f[n - 3];
        v.parse()
            .with_context(|| format!("stat: bad field {n} {v:?}"))
    };
    let mut state = f[0].chars();
    let (Some(st), None) = (state.next(), state.next()) else {
        return Err(anyhow!("stat: bad state {:?}", f[0]));
    };
    Ok(Stat {
        pid,
        comm: &s[open + 1..close],
        state: st,
        minflt: field(10)?,
        cminflt: field(11)?,
        majflt: field(12)?,
        cmajflt: field(13)?,
        utime: field(14)?,
        stime: field(15)?,
        cutime: field(16)?,
        cstime: field(17)?,
        num_threads: field(20)?,
        start_time: field(22)?,
    })
}

/// The context-switch counts of one thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CtxtSwitches {
    pub(crate) voluntary: u64,
    pub(crate) involuntary: u64,
}

/// Parses the `voluntary_ctxt_switches:` and `nonvoluntary_ctxt_switches:`
/// lines of a status file.
pub(crate) fn parse_status_ctxt(s: &str) -> anyhow::Result<CtxtSwitches> {
    let (mut voluntary, mut involuntary) = (None, None);
    for line in s.lines() {
        if let Some(v) = line.strip_prefix("voluntary_ctxt_switches:") {
            voluntary = Some(parse_u64(v, "voluntary_ctxt_switches")?);
        } else if let Some(v) = line.strip_prefix("nonvoluntary_ctxt_switches:") {
            involuntary = Some(parse_u64(v, "nonvoluntary_ctxt_switches")?);
        }
    }
    Ok(CtxtSwitches {
        voluntary: voluntary.context("status: no voluntary_ctxt_switches")?,
        involuntary: involuntary.context("status: no nonvoluntary_ctxt_switches")?,
    })
}

/// The three fields of a schedstat file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SchedStat {
    /// Time on CPU, ns.
    pub(crate) sum_exec_runtime_ns: u64,
    /// Time spent waiting on a run queue, ns.
    pub(crate) run_delay_ns: u64,
    /// Number of timeslices run on this CPU.
    pub(crate) timeslices: u64,
}

/// Parses a schedstat file: `sum_exec_runtime run_delay timeslices`.
pub(crate) fn parse_schedstat(s: &str) -> anyhow::Result<SchedStat> {
    let mut it = s.split_ascii_whitespace();
    let mut next = |name: &str| -> anyhow::Result<u64> {
        let v = it.next().with_context(|| format!("schedstat: no {name}"))?;
        parse_u64(v, name)
    };
    let st = SchedStat {
        sum_exec_runtime_ns: next("sum_exec_runtime")?,
        run_delay_ns: next("run_delay")?,
        timeslices: next("timeslices")?,
    };
    ensure!(it.next().is_none(), "schedstat: more than three fields");
    Ok(st)
}

/// Parses the `se.nr_migrations : N` line of a sched file.
pub(crate) fn parse_sched_migrations(s: &str) -> anyhow::Result<u64> {
    s.lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(key, _)| key.trim() == "se.nr_migrations")
        .context("sched: no se.nr_migrations")
        .and_then(|(_, v)| parse_u64(v, "se.nr_migrations"))
}

/// Parses a decimal count, ignoring surrounding whitespace.
fn parse_u64(v: &str, name: &str) -> anyhow::Result<u64> {
    let v = v.trim();
    v.parse().with_context(|| format!("bad {name} {v:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::sync::mpsc;
    use std::thread;
    use std::time::{Duration, Instant};

    fn tck() -> u64 {
        clock_ticks_per_second().unwrap()
    }

    /// A stat line with all 52 fields.
    fn stat_line(pid: i32, comm: &str, state: char, p: Proc) -> String {
        let Proc {
            utime,
            stime,
            num_threads,
            start_time,
        } = p;
        // fields 4-13, 14-22, 23-52
        format!(
            "{pid} ({comm}) {state} 1 {pid} {pid} 0 -1 4194304 120 0 3 0 \
             {utime} {stime} 0 0 20 0 {num_threads} 0 {start_time} \
             1000000 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 \
             0 0 0 0 0 0 0\n"
        )
    }

    #[derive(Clone, Copy)]
    struct Proc {
        utime: u64,
        stime: u64,
        num_threads: u64,
        start_time: u64,
    }

    #[test]
    fn stat_parses_fields_after_the_comm() {
        let line = stat_line(
            42,
            "qemu-system-x86",
            'S',
            Proc {
                utime: 7,
                stime: 9,
                num_threads: 5,
                start_time: 1234,
            },
        );
        let st = parse_stat(&line).unwrap();
        assert_eq!(
            st,
            Stat {
                pid: 42,
                comm: "qemu-system-x86",
                state: 'S',
                minflt: 120,
                cminflt: 0,
                majflt: 3,
                cmajflt: 0,
                utime: 7,
                stime: 9,
                cutime: 0,
                cstime: 0,
                num_threads: 5,
                start_time: 1234
            }
        );
    }

    #[test]
    fn stat_parses_a_real_line() {
        let line = "7929 (cat) R 7927 7927 6903 0 -1 4194304 99 0 0 0 3 1 0 0 20 0 1 0 \
                    57562 3133440 358 18446744073709551615 94555809083392 94555809103273 \
                    140725747245104 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 94555809119280 \
                    94555809120896 94556644495360 140725747247840 140725747247860 \
                    140725747247860 140725747249131 0\n";
        let st = parse_stat(line).unwrap();
        assert_eq!((st.pid, st.comm, st.state), (7929, "cat", 'R'));
        assert_eq!(
            (st.utime, st.stime, st.num_threads, st.start_time),
            (3, 1, 1, 57562)
        );
    }

    #[test]
    fn stat_comm_with_spaces_and_parentheses() {
        let p = Proc {
            utime: 11,
            stime: 22,
            num_threads: 3,
            start_time: 99,
        };
        let line = stat_line(5, "a) (b c)", 'R', p);
        let st = parse_stat(&line).unwrap();
        assert_eq!(st.comm, "a) (b c)");
        assert_eq!((st.pid, st.state), (5, 'R'));
        assert_eq!(
            (st.utime, st.stime, st.num_threads, st.start_time),
            (11, 22, 3, 99)
        );
    }

    #[test]
    fn stat_comm_ending_with_a_parenthesis() {
        let p = Proc {
            utime: 1,
            stime: 2,
            num_threads: 4,
            start_time: 8,
        };
        let line = stat_line(6, "x)", 'Z', p);
        assert!(line.starts_with("6 (x)) Z "));
        let st = parse_stat(&line).unwrap();
        assert_eq!(st.comm, "x)");
        assert_eq!(st.state, 'Z');
        assert_eq!(
            (st.utime, st.stime, st.num_threads, st.start_time),
            (1, 2, 4, 8)
        );
        // An empty comm and a comm that is only ')'.
        assert_eq!(parse_stat(&stat_line(6, "", 'S', p)).unwrap().comm, "");
        assert_eq!(parse_stat(&stat_line(6, ")", 'S', p)).unwrap().comm, ")");
    }

    #[test]
    fn stat_rejects_malformed_lines() {
        let p = Proc {
            utime: 1,
            stime: 2,
            num_threads: 4,
            start_time: 8,
        };
        let good = stat_line(6, "x", 'S', p);
        assert!(parse_stat("").is_err());
        assert!(parse_stat("6 x S 1 2 3").is_err(), "no parentheses");
        assert!(parse_stat("6 (x S 1 2 3").is_err(), "no ')'");
        assert!(parse_stat("6 )x( S 1 2 3").is_err(), "')' before '('");
        assert!(
            parse_stat(&good.replace("6 (", "six (")).is_err(),
            "bad pid"
        );
        assert!(parse_stat("6 (x) S 1 2 3 4 5").is_err(), "too few fields");
        // 19 fields after the comm: one short of starttime.
        let short: Vec<&str> = good.split_ascii_whitespace().take(2 + 19).collect();
        assert!(parse_stat(&short.join(" ")).is_err());
        let short: Vec<&str> = good.split_ascii_whitespace().take(2 + 20).collect();
        assert_eq!(parse_stat(&short.join(" ")).unwrap().start_time, 8);
        assert!(
            parse_stat(&good.replace(" S ", " SS ")).is_err(),
            "bad state"
        );
        let bad_utime = stat_line(6, "x", 'S', p).replace(" 3 0 1 2 ", " 3 0 one 2 ");
        assert_ne!(bad_utime, good);
        assert!(parse_stat(&bad_utime).is_err(), "bad utime");
        let neg = stat_line(6, "x", 'S', p).replace(" 3 0 1 2 ", " 3 0 -1 2 ");
        assert!(parse_stat(&neg).is_err(), "negative utime");
    }

    fn status_text(vol: u64, invol: u64) -> String {
        format!(
            "Name:\tCPU 0/KVM\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t100\nPid:\t101\n\
             Threads:\t2\nCpus_allowed_list:\t0-1\n\
             voluntary_ctxt_switches:\t{vol}\nnonvoluntary_ctxt_switches:\t{invol}\n"
        )
    }

    #[test]
    fn status_ctxt_lines() {
        let c = parse_status_ctxt(&status_text(1234, 56)).unwrap();
        assert_eq!(
            c,
            CtxtSwitches {
                voluntary: 1234,
                involuntary: 56
            }
        );
        // Order does not matter, and "nonvoluntary" is not "voluntary".
        let c = parse_status_ctxt("nonvoluntary_ctxt_switches:\t7\nvoluntary_ctxt_switches:\t8\n")
            .unwrap();
        assert_eq!(
            c,
            CtxtSwitches {
                voluntary: 8,
                involuntary: 7
            }
        );
    }

    #[test]
    fn status_ctxt_errors() {
        assert!(parse_status_ctxt("").is_err());
        assert!(parse_status_ctxt("voluntary_ctxt_switches:\t8\n").is_err());
        assert!(parse_status_ctxt("nonvoluntary_ctxt_switches:\t8\n").is_err());
        assert!(
            parse_status_ctxt("voluntary_ctxt_switches:\tx\nnonvoluntary_ctxt_switches:\t8\n")
                .is_err()
        );
        assert!(
            parse_status_ctxt("voluntary_ctxt_switches:\t\nnonvoluntary_ctxt_switches:\t8\n")
                .is_err()
        );
    }

    #[test]
    fn schedstat_fields() {
        let st = parse_schedstat("1381865 20417 3\n").unwrap();
        assert_eq!(
            st,
            SchedStat {
                sum_exec_runtime_ns: 1381865,
                run_delay_ns: 20417,
                timeslices: 3
            }
        );
        assert!(parse_schedstat("").is_err());
        assert!(parse_schedstat("1 2\n").is_err());
        assert!(parse_schedstat("1 2 3 4\n").is_err());
        assert!(parse_schedstat("1 x 3\n").is_err());
        assert!(parse_schedstat("1 -2 3\n").is_err());
    }

    fn sched_text(comm: &str, tid: i32, migrations: u64) -> String {
        format!(
            "{comm} ({tid}, #threads: 2)\n\
             -------------------------------------------------------------------\n\
             se.exec_start                                :        703629.183492\n\
             se.vruntime                                  :            89.797378\n\
             se.sum_exec_runtime                          :             1.381865\n\
             se.nr_migrations                             :                    {migrations}\n\
             nr_switches                                  :                    1\n"
        )
    }

    #[test]
    fn sched_migrations_line() {
        assert_eq!(
            parse_sched_migrations(&sched_text("CPU 0/KVM", 101, 77)).unwrap(),
            77
        );
        // A comm (at most 15 bytes) that looks like the key does not fool it.
        assert_eq!(
            parse_sched_migrations(&sched_text("se.nr_migration", 9, 6)).unwrap(),
            6
        );
        assert_eq!(
            parse_sched_migrations(&sched_text("se.nr_m: 5", 9, 6)).unwrap(),
            6
        );
        assert!(parse_sched_migrations("").is_err());
        assert!(parse_sched_migrations("nr_switches : 4\n").is_err());
        assert!(parse_sched_migrations("se.nr_migrations : x\n").is_err());
        assert!(parse_sched_migrations("se.nr_migrations_cold : 4\n").is_err());
    }

    #[test]
    fn ticks_convert_to_ns() {
        assert_eq!(ticks_to_ns(3, 100), 30_000_000);
        assert_eq!(ticks_to_ns(3, 1024), 2_929_687);
        assert_eq!(ticks_to_ns(u64::MAX, 1), u64::MAX);
    }

    /// One thread's counters in a fake tree.
    #[derive(Clone, Copy)]
    struct T {
        start: u64,
        vol: u64,
        invol: u64,
        delay: u64,
        migr: Option<u64>,
    }

    /// A fake `/proc` in a tempdir holding process `PID`.
    struct Fake {
        root: tempfile::TempDir,
    }

    const PID: i32 = 100;

    impl Fake {
        fn new() -> Self {
            Fake {
                root: tempfile::tempdir().unwrap(),
            }
        }

        fn pid_dir(&self) -> PathBuf {
            self.root.path().join(PID.to_string())
        }

        fn set_process(&self, state: char, p: Proc) {
            fs::create_dir_all(self.pid_dir().join("task")).unwrap();
            fs::write(
                self.pid_dir().join("stat"),
                stat_line(PID, "qemu-system-x86", state, p),
            )
            .unwrap();
        }

        fn thread_dir(&self, tid: i32) -> PathBuf {
            self.pid_dir().join("task").join(tid.to_string())
        }

        fn set_thread(&self, tid: i32, t: T) {
            let dir = self.thread_dir(tid);
            fs::create_dir_all(&dir).unwrap();
            let p = Proc {
                utime: 0,
                stime: 0,
                num_threads: 2,
                start_time: t.start,
            };
            fs::write(dir.join("stat"), stat_line(tid, "CPU 0/KVM", 'S', p)).unwrap();
            fs::write(dir.join("status"), status_text(t.vol, t.invol)).unwrap();
            fs::write(
                dir.join("schedstat"),
                format!("{} {} 10\n", t.vol * 1000, t.delay),
            )
            .unwrap();
            match t.migr {
                Some(m) => fs::write(dir.join("sched"), sched_text("CPU 0/KVM", tid, m)).unwrap(),
                None => {
                    let _ = fs::remove_file(dir.join("sched"));
                }
            }
        }

        /// The process's own stat with `cminflt` and `cutime` set (what
        /// reaping a child adds), and its `io` file.
        fn set_process_io(&self, cminflt: u64, cutime: u64, read: u64, write: u64) {
            let line = format!(
                "{PID} (sh) S 1 {PID} {PID} 0 -1 4194304 120 {cminflt} 3 0 \
                 7 9 {cutime} 0 20 0 1 0 5000 \
                 1000000 300 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0 \
                 0 0 0 0 0 0 0\n"
            );
            fs::create_dir_all(self.pid_dir().join("task")).unwrap();
            fs::write(self.pid_dir().join("stat"), line).unwrap();
            fs::write(
                self.pid_dir().join("io"),
                format!(
                    "rchar: 0\nwchar: 0\nsyscr: 0\nsyscw: 0\nread_bytes: {read}\n\
                     write_bytes: {write}\ncancelled_write_bytes: 0\n"
                ),
            )
            .unwrap();
        }

        fn remove_thread(&self, tid: i32) {
            fs::remove_dir_all(self.thread_dir(tid)).unwrap();
        }

        fn source(&self) -> ProcSource {
            ProcSource::with_root(self.root.path(), PID).unwrap()
        }
    }

    fn proc(ticks: u64, num_threads: u64) -> Proc {
        Proc {
            utime: ticks,
            stime: 0,
            num_threads,
            start_time: 5000,
        }
    }

    fn expect(
        cpu_ticks: u64,
        threads: u64,
        vol: u64,
        invol: u64,
        delay: u64,
        migr: Option<u64>,
    ) -> Measures {
        Measures {
            cpu_ns: Some(cpu_ticks * 1_000_000_000 / tck()),
            threads: Some(threads),
            ctx_switches_voluntary: Some(vol),
            ctx_switches_involuntary: Some(invol),
            ctx_switches: Some(vol + invol),
            runq_delay_ns: Some(delay),
            migrations: migr,
            // The fake stat's fault counts do not move.
            page_faults_minor: Some(0),
            page_faults_major: Some(0),
            ..Measures::default()
        }
    }

    /// Reaping a child adds its whole lifetime of I/O to the parent's
    /// `/proc/PID/io`: the bucket where that happened (the reaped
    /// children's faults or CPU in the process's stat grew) has `null` I/O
    /// fields, and the next bucket counts from the new value.
    #[test]
    fn a_bucket_where_a_child_was_reaped_has_null_io() {
        let f = Fake::new();
        f.set_process_io(0, 0, 4096, 8192);
        let mut src = f.source();
        f.set_process_io(0, 0, 4096, 8192 + 4096);
        let m = src.sample(&[], None);
        assert_eq!((m.blk_read_bytes, m.io_write_bytes), (Some(0), Some(4096)));
        // A child reaped: 64 MiB of its writes folded in, its faults too.
        f.set_process_io(250, 0, 4096, 12288 + (64 << 20));
        let m = src.sample(&[], None);
        assert_eq!((m.blk_read_bytes, m.io_write_bytes), (None, None));
        assert_eq!(src.children_reaped_buckets(), 1);
        // Its CPU ticks alone also tell.
        f.set_process_io(250, 3, 4096, 12288 + (64 << 20) + 100);
        let m = src.sample(&[], None);
        assert_eq!(m.io_write_bytes, None);
        // Then the process's own again.
        f.set_process_io(250, 3, 8192, 12288 + (64 << 20) + 4196);
        let m = src.sample(&[], None);
        assert_eq!(
            (m.blk_read_bytes, m.io_write_bytes),
            (Some(4096), Some(4096))
        );
        assert_eq!(src.children_reaped_buckets(), 2);
        assert_eq!(m.cpu_ns, Some(0), "a child's CPU is not the process's");
    }

    #[test]
    fn fake_tree_keeps_exited_threads_counts() {
        let f = Fake::new();
        f.set_process('S', proc(100, 2));
        let a = T {
            start: 5000,
            vol: 10,
            invol: 2,
            delay: 1_000,
            migr: Some(3),
        };
        let b = T {
            start: 5001,
            vol: 500,
            invol: 40,
            delay: 900_000,
            migr: Some(60),
        };
        f.set_thread(PID, a);
        f.set_thread(101, b);
        let mut src = f.source();

        // Both advance.
        f.set_process(
            'S',
            Proc {
                utime: 104,
                stime: 3,
                ..proc(0, 2)
            },
        );
        let a = T {
            vol: 15,
            invol: 3,
            delay: 1_500,
            migr: Some(4),
            ..a
        };
        let b = T {
            vol: 520,
            invol: 41,
            delay: 900_100,
            migr: Some(62),
            ..b
        };
        f.set_thread(PID, a);
        f.set_thread(101, b);
        assert_eq!(
            src.sample(&[], None),
            expect(7, 2, 5 + 20, 1 + 1, 500 + 100, Some(1 + 2))
        );

        // Thread 101 exits; the leader advances a little. Were 101's
        // counts dropped, every total would fall and the deltas would be 0.
        f.remove_thread(101);
        f.set_process(
            'S',
            Proc {
                utime: 110,
                stime: 3,
                ..proc(0, 1)
            },
        );
        let a = T {
            vol: 18,
            invol: 4,
            delay: 1_700,
            migr: Some(5),
            ..a
        };
        f.set_thread(PID, a);
        assert_eq!(src.sample(&[], None), expect(6, 1, 3, 1, 200, Some(1)));
        assert_eq!(src.threads.len(), 1, "101 is retired");
        assert_eq!(
            src.retired,
            Counters {
                voluntary: 520,
                involuntary: 41,
                run_delay_ns: 900_100,
                migrations: 62
            }
        );

        // Nothing changes: all zero, not None.
        assert_eq!(src.sample(&[], None), expect(0, 1, 0, 0, 0, Some(0)));

        // A new thread is counted from its birth.
        let c = T {
            start: 5100,
            vol: 7,
            invol: 1,
            delay: 30,
            migr: Some(2),
        };
        f.set_thread(102, c);
        f.set_process(
            'S',
            Proc {
                utime: 111,
                stime: 3,
                ..proc(0, 2)
            },
        );
        assert_eq!(src.sample(&[], None), expect(1, 2, 7, 1, 30, Some(2)));
    }

    #[test]
    fn fake_tree_reused_tid_is_a_new_thread() {
        let f = Fake::new();
        f.set_process('S', proc(10, 2));
        let a = T {
            start: 5000,
            vol: 1,
            invol: 1,
            delay: 10,
            migr: Some(1),
        };
        let old = T {
            start: 5001,
            vol: 50,
            invol: 9,
            delay: 5_000,
            migr: Some(8),
        };
        f.set_thread(PID, a);
        f.set_thread(101, old);
        let mut src = f.source();

        // 101 exits and its tid goes to a new thread with small counts.
        let new = T {
            start: 6000,
            vol: 3,
            invol: 2,
            delay: 70,
            migr: Some(1),
        };
        f.set_thread(101, new);
        assert_eq!(src.sample(&[], None), expect(0, 2, 3, 2, 70, Some(1)));
        assert_eq!(src.threads.len(), 2);
        assert_eq!(src.retired.voluntary, 50);

        let new = T { vol: 4, ..new };
        f.set_thread(101, new);
        assert_eq!(src.sample(&[], None), expect(0, 2, 1, 0, 0, Some(0)));
    }

    #[test]
    fn fake_tree_thread_vanishing_mid_read_keeps_last_seen() {
        let f = Fake::new();
        f.set_process('S', proc(10, 2));
        let a = T {
            start: 5000,
            vol: 1,
            invol: 1,
            delay: 10,
            migr: Some(1),
        };
        let b = T {
            start: 5001,
            vol: 40,
            invol: 4,
            delay: 400,
            migr: Some(4),
        };
        f.set_thread(PID, a);
        f.set_thread(101, b);
        let mut src = f.source();

        // 101's status went missing (but its stat is there): its
        // context-switch counts stay, its other counters update.
        let b = T {
            vol: 45,
            invol: 5,
            delay: 430,
            migr: Some(6),
            ..b
        };
        f.set_thread(101, b);
        fs::remove_file(f.thread_dir(101).join("status")).unwrap();
        assert_eq!(src.sample(&[], None), expect(0, 2, 0, 0, 30, Some(2)));

        // 101 is listed but its stat is gone (it exited between the listing
        // and the reads): skipped, and its last-seen values stay counted.
        fs::remove_file(f.thread_dir(101).join("stat")).unwrap();
        let a = T { vol: 2, ..a };
        f.set_thread(PID, a);
        assert_eq!(src.sample(&[], None), expect(0, 2, 1, 0, 0, Some(0)));
        assert_eq!(
            src.retired.voluntary, 40,
            "retired with its last-seen counts"
        );
        assert_eq!(src.prev.totals.voluntary, 2 + 40);
    }

    #[test]
    fn fake_tree_unparsable_stat_keeps_the_thread() {
        let f = Fake::new();
        f.set_process('S', proc(10, 2));
        let b = T {
            start: 5001,
            vol: 40,
            invol: 4,
            delay: 400,
            migr: Some(4),
        };
        f.set_thread(101, b);
        let mut src = f.source();
        // Garbage is not proof the thread is gone: keep it, and do not
        // count it twice when it reads well again.
        fs::write(f.thread_dir(101).join("stat"), "garbage").unwrap();
        assert_eq!(src.sample(&[], None), expect(0, 2, 0, 0, 0, Some(0)));
        assert_eq!(src.threads.len(), 1);
        let b = T { vol: 41, ..b };
        f.set_thread(101, b);
        assert_eq!(src.sample(&[], None), expect(0, 2, 1, 0, 0, Some(0)));
    }

    #[test]
    fn fake_tree_process_gone_is_all_none() {
        let f = Fake::new();
        f.set_process('S', proc(10, 1));
        f.set_thread(
            PID,
            T {
                start: 5000,
                vol: 1,
                invol: 1,
                delay: 10,
                migr: Some(1),
            },
        );
        let mut src = f.source();
        fs::remove_dir_all(f.pid_dir()).unwrap();
        let m = src.sample(&[], None);
        assert_eq!(m, Measures::default());
        assert!(m.cpu_ns.is_none() && m.threads.is_none() && m.migrations.is_none());
    }

    #[test]
    fn fake_tree_pid_reused_is_all_none() {
        let f = Fake::new();
        f.set_process('S', proc(10, 1));
        f.set_thread(
            PID,
            T {
                start: 5000,
                vol: 1,
                invol: 1,
                delay: 10,
                migr: Some(1),
            },
        );
        let mut src = f.source();
        f.set_process(
            'S',
            Proc {
                start_time: 9000,
                ..proc(20, 1)
            },
        );
        f.set_thread(
            PID,
            T {
                start: 9000,
                vol: 9,
                invol: 1,
                delay: 10,
                migr: Some(1),
            },
        );
        assert_eq!(src.sample(&[], None), Measures::default());
        // And it stays gone even if the start time looked right again.
        f.set_process('S', proc(30, 1));
        assert_eq!(src.sample(&[], None), Measures::default());
    }

    #[test]
    fn fake_tree_zombie_is_still_read() {
        let f = Fake::new();
        f.set_process('S', proc(10, 1));
        let a = T {
            start: 5000,
            vol: 1,
            invol: 1,
            delay: 10,
            migr: Some(1),
        };
        f.set_thread(PID, a);
        let mut src = f.source();
        f.set_process('Z', proc(12, 1));
        f.set_thread(PID, T { vol: 3, ..a });
        assert_eq!(src.sample(&[], None), expect(2, 1, 2, 0, 0, Some(0)));
    }

    #[test]
    fn fake_tree_without_sched_has_no_migrations() {
        let f = Fake::new();
        f.set_process('S', proc(10, 2));
        let a = T {
            start: 5000,
            vol: 1,
            invol: 1,
            delay: 10,
            migr: None,
        };
        let b = T {
            start: 5001,
            vol: 2,
            invol: 2,
            delay: 20,
            migr: None,
        };
        f.set_thread(PID, a);
        f.set_thread(101, b);
        let mut src = f.source();
        f.set_process('S', proc(13, 2));
        f.set_thread(
            PID,
            T {
                vol: 4,
                delay: 15,
                ..a
            },
        );
        f.set_thread(101, T { invol: 5, ..b });
        let m = src.sample(&[], None);
        assert_eq!(m, expect(3, 2, 3, 3, 5, None));
        assert_eq!(m.migrations, None);
    }

    #[test]
    fn attach_fails_without_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let err = ProcSource::with_root(dir.path(), 4242)
            .unwrap_err()
            .to_string();
        assert!(err.contains("4242") && err.contains("stat"), "{err}");
        // A stat that does not parse is an error too.
        fs::create_dir_all(dir.path().join("4242")).unwrap();
        fs::write(dir.path().join("4242/stat"), "4242 (x) S 1\n").unwrap();
        assert!(ProcSource::with_root(dir.path(), 4242).is_err());
        // The real /proc: pid -1 never exists.
        assert!(ProcSource::new(-1).is_err());
    }

    fn thread_cpu_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid timespec to write to.
        let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(r, 0);
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    fn own_ctxt() -> CtxtSwitches {
        parse_status_ctxt(&fs::read_to_string("/proc/thread-self/status").unwrap()).unwrap()
    }

    #[test]
    fn real_proc_self_sees_a_worker_thread() {
        const BLOCKS: u64 = 10;
        const SPIN_NS: u64 = 80_000_000;
        let t0 = Instant::now();
        let mut src = ProcSource::new(std::process::id() as i32).unwrap();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let worker = thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let start = thread_cpu_ns();
            let mut x = 0u64;
            while thread_cpu_ns() - start < SPIN_NS {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            for _ in 0..BLOCKS {
                thread::sleep(Duration::from_millis(2));
            }
            ready_tx.send((tid, thread_cpu_ns(), own_ctxt())).unwrap();
            go_rx.recv().unwrap();
            own_ctxt()
        });
        let (tid, worker_cpu, worker_ctxt) = ready_rx.recv().unwrap();
        let m = src.sample(&[], None);
        let elapsed = t0.elapsed().as_nanos() as u64;
        go_tx.send(()).unwrap();
        let final_ctxt = worker.join().unwrap();

        let tick_ns = 1_000_000_000 / tck();
        assert!(m.threads.unwrap() >= 2, "{m:?}");
        let cpu = m.cpu_ns.unwrap();
        // utime and stime are each rounded down to a tick.
        assert!(
            cpu + 2 * tick_ns >= worker_cpu,
            "cpu {cpu} < worker's {worker_cpu}"
        );
        let cpus = thread::available_parallelism().map_or(64, |n| n.get() as u64);
        assert!(
            cpu <= elapsed * cpus + 2 * tick_ns,
            "cpu {cpu} in {elapsed} ns"
        );
        // The worker was born after the baseline: all its switches count.
        assert!(worker_ctxt.voluntary >= BLOCKS, "{worker_ctxt:?}");
        let vol = m.ctx_switches_voluntary.unwrap();
        assert!(
            vol >= worker_ctxt.voluntary,
            "{vol} < worker's {worker_ctxt:?}"
        );
        assert!(m.ctx_switches_involuntary.unwrap() >= worker_ctxt.involuntary);
        assert!(m.runq_delay_ns.is_some());
        assert_eq!(
            m.migrations.is_some(),
            Path::new("/proc/self/sched").exists()
        );
        assert!(m.wakeups.is_none() && m.events.is_none());

        // Once the worker's task is gone from /proc, its counts are kept.
        let task = PathBuf::from(format!("/proc/self/task/{tid}"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while task.exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        assert!(!task.exists(), "worker {tid} still in /proc");
        let m2 = src.sample(&[], None);
        assert!(m2.cpu_ns.is_some() && m2.ctx_switches_voluntary.is_some());
        // Its last-seen counts are those of the first sample, taken after
        // `worker_ctxt` was read and before `final_ctxt`.
        assert!(final_ctxt.voluntary >= worker_ctxt.voluntary);
        assert!(
            src.retired.voluntary >= worker_ctxt.voluntary,
            "retired {:?} < worker's {worker_ctxt:?}",
            src.retired
        );
        assert!(!src.threads.keys().any(|k| k.tid == tid));
    }
}
