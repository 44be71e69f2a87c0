//! `cis490-workload`: a test workload for cis490 that measures its own ground truth.
//!
//! The integration tests run it under the tracer (`cis490 trace -- cis490-workload ...`)
//! and compare what the tracer reports with what this program wrote to `--out PATH`.
//! Every number here comes from the kernel's own accounting:
//!
//! * `clock_gettime(CLOCK_THREAD_CPUTIME_ID)` for one thread's on-CPU time,
//! * `clock_gettime(CLOCK_PROCESS_CPUTIME_ID)` for the whole process (exited threads included),
//! * `getrusage(RUSAGE_THREAD)` for one thread's voluntary / involuntary context switches,
//! * `getrusage(RUSAGE_SELF)` for the whole process (exited threads included).
//!
//! Per-thread values are cumulative since that thread was created; process values are
//! cumulative since exec. The JSON report is written atomically (`PATH.tmp`, then renamed to
//! `PATH`) as the very last step, so a test that sees `PATH` sees a complete report. The
//! little work done after the final measurement (serialising and writing the report, exiting)
//! is not in the report, but the tracer sees it; it is well under a millisecond.
//!
//! Errors are one line on stderr and exit code 2.

use std::ffi::OsString;
use std::hint::black_box;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

const NS_PER_MS: u64 = 1_000_000;
const PROG: &str = "cis490-workload";

// ---------------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------------

/// Test workload for cis490: does a known amount of scheduler-visible work and writes the
/// kernel's own accounting of it (per-thread CPU clocks, context switches) as JSON.
#[derive(Parser, Debug)]
#[command(name = PROG, version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Burn a fixed amount of CPU in N threads (optionally plus M late threads).
    ///
    /// After --start-delay-ms (sleeping), starts N threads named burn-0.. that each busy-loop
    /// (pure computation; the only syscall is reading the thread's own CPU clock about every
    /// 1 ms of work) until their CLOCK_THREAD_CPUTIME_ID reaches --burn-ms. With
    /// --late-threads M, M more threads named late-0.. doing the same are started
    /// --late-delay-ms after the first ones. All threads are joined, then the report is
    /// written: {"kind":"cpu", "pid", "threads":[{"name","tid","cpu_ns","nvcsw","nivcsw",
    /// "utime_ns","stime_ns","late"}], "burn_cpu_ns", "process_cpu_ns", "rusage_self",
    /// "main_thread", "max_threads_alive", ...}.
    Cpu(CpuArgs),

    /// Bounce one byte between two threads over two pipes, R round trips.
    ///
    /// The main thread writes to pipe 1 and blocks reading pipe 2; the thread "pong" reads
    /// pipe 1 and writes pipe 2. Each round trip makes each side switch out about once. By
    /// default the two threads are pinned to two different CPUs (when at least two are
    /// allowed), so nearly all of those switches are voluntary: the nvcsw sum comes to about
    /// 2R (a few short, when a thread preempted by something else finds the byte already
    /// there). Cross-CPU wakeups are slow in a VM (~100 us per round trip), so keep R in the
    /// thousands. Report: {"kind":"pingpong", "pid", "round_trips", "pinned_cpus",
    /// "threads":[main, pong], "rusage_self", "process_cpu_ns", "wall_ns"}.
    Pingpong(PingpongArgs),

    /// Start N sleeper threads, then exit the whole process after T ms.
    ///
    /// Each thread (sleeper-0..) loops forever sleeping 1 ms. After --ms T (counted from just
    /// before the threads are started) the main thread writes {"kind":"exit-after", "pid",
    /// "ms", "threads", "tids"} and calls exit(0) while the sleepers are still running.
    ExitAfter(ExitAfterArgs),

    /// Write PATH.ready, wait for SIGUSR1, then do what `cpu` does.
    ///
    /// Immediately writes {"kind":"ready","pid"} to PATH.ready (atomically), then blocks in
    /// sigtimedwait() until SIGUSR1 arrives (at most --timeout-ms). Then starts N threads that
    /// each burn --burn-ms of their own CPU clock, and writes a `cpu` report (kind "cpu") with
    /// two extra fields: "cpu_ns_before_signal" (CLOCK_PROCESS_CPUTIME_ID just before the
    /// work started) and "rusage_before_signal" (getrusage(RUSAGE_SELF) at the same moment),
    /// so only the work after the signal can be told apart. For testing attach to a running
    /// process.
    WaitSignal(WaitSignalArgs),

    /// The bundled demo workload (about 3 s); prints a summary to stderr.
    ///
    /// Phase 1: 2 threads burn 600 ms of CPU each. Phase 2: pingpong, 20000 round trips
    /// (threads not pinned, so switches are a mix of voluntary and involuntary).
    /// Phase 3: 3 new threads each do 20 cycles of (burn 10 ms CPU, sleep 10 ms). Phases are
    /// separated by --gap-ms of idle sleep so they stand apart on a timeline. With --out, also
    /// writes {"kind":"demo", "pid", "phases":{...}, "process_cpu_ns", "rusage_self", ...}.
    Demo(DemoArgs),

    /// Write PATH.ready, wait for SIGUSR1, then start and join COUNT short-lived threads.
    ///
    /// Threads are unnamed (no prctl rename) and exit at once; they are started in batches of
    /// 64 alive at a time. Used to flood the tracer's ring buffer with thread start/exit
    /// records: the process makes exactly COUNT thread starts and COUNT thread exits after the
    /// signal (plus the main thread's exit at the end). Report: {"kind":"thread-burst",
    /// "pid", "count", "cpu_ns_before_signal", "process_cpu_ns", "rusage_before_signal",
    /// "rusage_self"}.
    ThreadBurst(ThreadBurstArgs),
}

#[derive(Args, Debug)]
struct ThreadBurstArgs {
    /// Number of threads to start (and join) after the signal.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    count: u64,
    /// Give up (error, exit code 2) if no SIGUSR1 arrives within this many ms; 0 waits forever.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    timeout_ms: u64,
    /// Where to write the JSON report; the ready file is PATH.ready.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct CpuArgs {
    /// Number of threads started first (burn-0..).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    threads: u32,
    /// CPU time each thread burns, in ms of its own CLOCK_THREAD_CPUTIME_ID.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    burn_ms: u64,
    /// Number of extra threads (late-0..) started --late-delay-ms after the first ones.
    #[arg(long, value_name = "M", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=4096))]
    late_threads: u32,
    /// Delay from starting the first threads to starting the late ones, in ms.
    #[arg(long, value_name = "D", default_value_t = 0)]
    late_delay_ms: u64,
    /// Idle sleep before the first threads are started, in ms.
    #[arg(long, value_name = "S", default_value_t = 0)]
    start_delay_ms: u64,
    /// After burning, each thread sleeps this long before it exits, so a poller (the /proc
    /// oracle) sees its final counts.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    linger_ms: u64,
    /// Where to write the JSON report.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct PingpongArgs {
    /// Number of round trips (each: main -> pong over pipe 1, pong -> main over pipe 2).
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u64).range(1..))]
    round_trips: u64,
    /// Do not pin the two threads to different CPUs. If they then share a CPU, the waking
    /// write often preempts the writer, and many switches count as involuntary instead.
    #[arg(long)]
    no_pin: bool,
    /// Before each write, wait until the peer has blocked (its voluntary switch count, read
    /// from /proc/self/task/TID/status, went up): every round trip then makes exactly one
    /// voluntary switch on each side, so the process makes at least 2R.
    #[arg(long)]
    handshake: bool,
    /// After the last round, both threads sleep this long before "pong" exits and the
    /// report is taken, so a poller (the /proc oracle) sees their final counts.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    linger_ms: u64,
    /// Where to write the JSON report.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct ExitAfterArgs {
    /// Time until the process exits, in ms.
    #[arg(long, value_name = "T")]
    ms: u64,
    /// Number of sleeper threads still running when the process exits.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(0..=4096))]
    threads: u32,
    /// Where to write the JSON report (written just before exiting).
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct WaitSignalArgs {
    /// CPU time each thread burns after the signal, in ms of its own thread CPU clock.
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    burn_ms: u64,
    /// Number of threads started after the signal.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    threads: u32,
    /// Give up (error, exit code 2) if no SIGUSR1 arrives within this many ms; 0 waits forever.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    timeout_ms: u64,
    /// Where to write the JSON report; the ready file is PATH.ready.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Idle sleep between phases, in ms.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    gap_ms: u64,
    /// Optionally write the JSON report here.
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

fn main() {
    // A panic anywhere (which would mean a broken libc call) is reported like any error.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()));
        eprintln!(
            "{PROG}: internal error: {}{}",
            msg.replace('\n', " "),
            at.unwrap_or_default()
        );
        std::process::exit(2);
    }));

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            let msg = if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                "missing subcommand (cpu, pingpong, exit-after, wait-signal or demo)".to_string()
            } else {
                // clap's first paragraph (the error and any list under it), on one line.
                let text = e.to_string();
                let first = text.trim_start().split("\n\n").next().unwrap_or_default();
                let first = first.split_whitespace().collect::<Vec<_>>().join(" ");
                first.strip_prefix("error: ").unwrap_or(&first).to_string()
            };
            eprintln!("{PROG}: error: {msg} (see --help)");
            std::process::exit(2);
        }
    };

    let result = match cli.command {
        Command::Cpu(a) => cmd_cpu(&a),
        Command::Pingpong(a) => cmd_pingpong(&a),
        Command::ExitAfter(a) => cmd_exit_after(&a),
        Command::WaitSignal(a) => cmd_wait_signal(&a),
        Command::Demo(a) => cmd_demo(&a),
        Command::ThreadBurst(a) => cmd_thread_burst(&a),
    };
    if let Err(e) = result {
        eprintln!("{PROG}: error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(2);
    }
}

// ---------------------------------------------------------------------------------------------
// Kernel accounting (the only unsafe code: plain libc calls)
// ---------------------------------------------------------------------------------------------

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call; clock_gettime only
    // writes into it.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        panic!(
            "clock_gettime({clock}) failed: {}",
            io::Error::last_os_error()
        );
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// On-CPU time of the calling thread since it was created, in ns.
fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// On-CPU time of the whole process (all threads, exited ones included), in ns.
fn process_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// Kernel thread id of the calling thread.
fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::gettid() }
}

#[derive(Serialize, Debug, Clone, Copy)]
struct Rusage {
    nvcsw: u64,
    nivcsw: u64,
    utime_ns: u64,
    stime_ns: u64,
}

fn timeval_ns(tv: libc::timeval) -> u64 {
    tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1_000
}

/// `getrusage(who)`: `libc::RUSAGE_THREAD` for the calling thread, `libc::RUSAGE_SELF` for the
/// whole process (exited threads included).
fn rusage(who: libc::c_int) -> Rusage {
    // SAFETY: `struct rusage` is plain integers and timevals, for which all-zero is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage that outlives the call; getrusage only writes
    // into it.
    let rc = unsafe { libc::getrusage(who, &mut ru) };
    if rc != 0 {
        panic!("getrusage({who}) failed: {}", io::Error::last_os_error());
    }
    Rusage {
        nvcsw: ru.ru_nvcsw as u64,
        nivcsw: ru.ru_nivcsw as u64,
        utime_ns: timeval_ns(ru.ru_utime),
        stime_ns: timeval_ns(ru.ru_stime),
    }
}

/// Blocks SIGUSR1 in the calling thread (and so in every thread it starts later), so that it
/// stays pending until `wait_for_sigusr1` collects it. Call before starting any thread.
fn block_sigusr1() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is a plain bit array, for which all-zero is valid; it is initialised
    // properly by sigemptyset right below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t; SIGUSR1 is a valid signal number.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1)
    };
    if rc != 0 {
        bail!("sigaddset: {}", io::Error::last_os_error());
    }
    // SAFETY: `set` is an initialised sigset_t; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        bail!("pthread_sigmask: {}", io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// Waits until SIGUSR1 (blocked by `block_sigusr1`) is delivered; `timeout` None waits forever.
fn wait_for_sigusr1(set: &libc::sigset_t, timeout: Option<Duration>) -> Result<()> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ts = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            }
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |ts| ts as *const libc::timespec);
        // SAFETY: `set` is an initialised sigset_t and `ts_ptr` is null (wait forever) or
        // points to `ts`, a valid timespec; both outlive the call. A null siginfo pointer is
        // allowed.
        let rc = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), ts_ptr) };
        if rc == libc::SIGUSR1 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match (rc, err.raw_os_error(), timeout) {
            (-1, Some(libc::EINTR), _) => continue,
            (-1, Some(libc::EAGAIN), Some(t)) => bail!("no SIGUSR1 within {} ms", t.as_millis()),
            (-1, _, _) => bail!("sigtimedwait: {err}"),
            (sig, _, _) => bail!("sigtimedwait returned unexpected signal {sig}"),
        }
    }
}

/// CPUs the calling thread may run on, in increasing order.
fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array, for which all-zero (the empty set) is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of exactly the size passed; pid 0 means
    // the calling thread.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        bail!("sched_getaffinity: {}", io::Error::last_os_error());
    }
    let max = libc::CPU_SETSIZE as usize;
    // SAFETY: every index is below CPU_SETSIZE, the number of bits in a cpu_set_t.
    Ok((0..max)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Restricts the calling thread to `cpus` (numbers from `allowed_cpus`).
fn set_affinity(cpus: &[usize]) -> Result<()> {
    // SAFETY: cpu_set_t is a plain bit array, for which all-zero (the empty set) is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            bail!("CPU {cpu} out of range");
        }
        // SAFETY: `cpu` was just checked to be below CPU_SETSIZE, the number of bits in `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is an initialised cpu_set_t of exactly the size passed; pid 0 means the
    // calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        bail!(
            "sched_setaffinity({cpus:?}): {}",
            io::Error::last_os_error()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Burning CPU
// ---------------------------------------------------------------------------------------------

/// Pure computation, `iters` steps of a multiply-rotate mix that the optimiser cannot skip.
fn spin(iters: u64) -> u64 {
    let mut x = black_box(0x9E37_79B9_7F4A_7C15_u64);
    for i in 0..iters {
        x = black_box(x.rotate_left(7) ^ i).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    }
    black_box(x)
}

/// Busy-loops until the calling thread's CPU clock reaches `target_ns`; returns the clock then.
///
/// The clock is read about once per millisecond of work (the chunk size adapts to the measured
/// speed), and more often in the last 2 ms so the target is overshot by only microseconds.
/// Time spent preempted does not count, since the thread CPU clock only runs on-CPU.
fn burn_until_thread_cpu(target_ns: u64) -> u64 {
    let mut iters_per_ms: u64 = 100_000; // first guess; corrected after the first chunk
    let mut now = thread_cpu_ns();
    while now < target_ns {
        // Whole milliseconds while far from the target, then halve the remaining distance
        // (never below 10 us) so a chunk that runs slower than estimated overshoots little.
        let remaining = target_ns - now;
        let step_ns = if remaining > 2 * NS_PER_MS {
            NS_PER_MS
        } else {
            (remaining / 2).max(10_000)
        };
        let iters = (iters_per_ms * step_ns / NS_PER_MS).max(1);
        spin(iters);
        let after = thread_cpu_ns();
        // Keep the estimate within sane bounds even if a chunk is measured badly.
        if let Some(rate) = iters
            .saturating_mul(NS_PER_MS)
            .checked_div(after.saturating_sub(now))
        {
            iters_per_ms = rate.clamp(1_000, 1_000_000_000);
        }
        now = after;
    }
    now
}

/// Burns `ns` more nanoseconds of the calling thread's CPU time.
fn burn_for_ns(ns: u64) -> u64 {
    burn_until_thread_cpu(thread_cpu_ns() + ns)
}

fn sleep_until(deadline: Instant) {
    thread::sleep(deadline.saturating_duration_since(Instant::now()));
}

// ---------------------------------------------------------------------------------------------
// Per-thread records and shared phases
// ---------------------------------------------------------------------------------------------

/// One thread's own accounting, taken by the thread itself at the end of its work.
#[derive(Serialize, Debug)]
struct ThreadStats {
    name: String,
    tid: i32,
    /// CLOCK_THREAD_CPUTIME_ID.
    cpu_ns: u64,
    /// getrusage(RUSAGE_THREAD).
    nvcsw: u64,
    nivcsw: u64,
    utime_ns: u64,
    stime_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    late: Option<bool>,
}

impl ThreadStats {
    fn current(late: Option<bool>) -> Self {
        let cpu_ns = thread_cpu_ns();
        let ru = rusage(libc::RUSAGE_THREAD);
        ThreadStats {
            name: thread::current().name().unwrap_or("?").to_string(),
            tid: gettid(),
            cpu_ns,
            nvcsw: ru.nvcsw,
            nivcsw: ru.nivcsw,
            utime_ns: ru.utime_ns,
            stime_ns: ru.stime_ns,
            late,
        }
    }
}

/// Counts threads running workload code at once, the main thread included.
struct Alive {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Alive {
    fn new() -> Self {
        Alive {
            now: AtomicUsize::new(1),
            max: AtomicUsize::new(1),
        }
    }
    fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
    fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

fn spawn_named<'s, T: Send + 's>(
    scope: &'s Scope<'s, '_>,
    name: String,
    f: impl FnOnce() -> T + Send + 's,
) -> Result<ScopedJoinHandle<'s, T>> {
    thread::Builder::new()
        .name(name.clone())
        .spawn_scoped(scope, f)
        .with_context(|| format!("cannot start thread {name}"))
}

fn join<T>(h: ScopedJoinHandle<'_, T>) -> Result<T> {
    h.join().map_err(|_| anyhow!("a worker thread panicked"))
}

struct BurnPhase {
    threads: Vec<ThreadStats>,
    max_threads_alive: usize,
    wall_ns: u64,
}

/// `threads` threads burn `burn_ms` each; `late_threads` more start `late_delay_ms` later.
fn burn_phase(
    threads: u32,
    burn_ms: u64,
    late_threads: u32,
    late_delay_ms: u64,
    linger_ms: u64,
) -> Result<BurnPhase> {
    let target_ns = burn_ms * NS_PER_MS;
    let alive = Alive::new();
    let alive = &alive;
    let start = Instant::now();
    let stats = thread::scope(|s| -> Result<Vec<ThreadStats>> {
        let burner = move |late: bool| {
            move || {
                alive.enter();
                burn_until_thread_cpu(target_ns);
                let st = ThreadStats::current(Some(late));
                alive.leave();
                thread::sleep(Duration::from_millis(linger_ms));
                st
            }
        };
        let mut handles = Vec::new();
        for i in 0..threads {
            handles.push(spawn_named(s, format!("burn-{i}"), burner(false))?);
        }
        if late_threads > 0 {
            sleep_until(start + Duration::from_millis(late_delay_ms));
            for i in 0..late_threads {
                handles.push(spawn_named(s, format!("late-{i}"), burner(true))?);
            }
        }
        handles.into_iter().map(join).collect()
    })?;
    Ok(BurnPhase {
        threads: stats,
        max_threads_alive: alive.max(),
        wall_ns: start.elapsed().as_nanos() as u64,
    })
}

/// One side of the ping-pong handshake. Before each blocking read, a thread publishes its own
/// voluntary switch count (`pre`, from getrusage(RUSAGE_THREAD)) and the round number; the peer
/// then waits until the kernel's count for that thread (/proc/self/task/TID/status) exceeds
/// `pre`. That count only goes up once the kernel has committed the thread to sleep, so every
/// write lands on a blocked reader: one voluntary switch per side per round, no more, no less.
struct Side {
    tid: std::sync::atomic::AtomicI32,
    pre: std::sync::atomic::AtomicU64,
    round: std::sync::atomic::AtomicU64,
}

impl Side {
    const fn new() -> Self {
        Self {
            tid: std::sync::atomic::AtomicI32::new(0),
            pre: std::sync::atomic::AtomicU64::new(0),
            round: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Called by the thread itself just before it blocks in round `round`.
    fn about_to_block(&self, round: u64) {
        self.tid.store(gettid(), Ordering::Relaxed);
        self.pre
            .store(rusage(libc::RUSAGE_THREAD).nvcsw, Ordering::Relaxed);
        self.round.store(round, Ordering::Release);
    }

    /// Called by the peer: returns once the thread blocked in round `round`.
    fn wait_blocked(&self, round: u64, buf: &mut String) -> Result<()> {
        while self.round.load(Ordering::Acquire) < round {
            std::hint::spin_loop();
        }
        let pre = self.pre.load(Ordering::Relaxed);
        let path = format!(
            "/proc/self/task/{}/status",
            self.tid.load(Ordering::Relaxed)
        );
        loop {
            buf.clear();
            std::fs::File::open(&path)
                .and_then(|mut f| f.read_to_string(buf))
                .with_context(|| format!("read {path}"))?;
            let now: u64 = buf
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
                .with_context(|| format!("no voluntary_ctxt_switches in {path}"))?;
            if now > pre {
                return Ok(());
            }
            std::hint::spin_loop();
        }
    }
}

struct PingpongPhase {
    threads: Vec<ThreadStats>,
    /// CPUs of the calling thread and of "pong", if they were pinned.
    pinned_cpus: Option<[usize; 2]>,
    wall_ns: u64,
}

/// The calling thread and a new thread "pong" bounce one byte `round_trips` times.
///
/// With `pin` (and at least two allowed CPUs) the two threads run on two different CPUs, so
/// that each blocks in read() instead of being preempted by the other's wakeup. The calling
/// thread's affinity is restored afterwards, so threads it starts later are not pinned.
fn pingpong_phase(
    round_trips: u64,
    pin: bool,
    handshake: bool,
    linger_ms: u64,
) -> Result<PingpongPhase> {
    let allowed = allowed_cpus()?;
    let pinned_cpus = match allowed[..] {
        [a, b, ..] if pin => Some([a, b]),
        _ => None,
    };
    let (mut r1, w1) = io::pipe().context("pipe")?;
    let (r2, mut w2) = io::pipe().context("pipe")?;
    let start = Instant::now();
    let (ping_side, pong_side) = (Side::new(), Side::new());
    let threads = thread::scope(|s| -> Result<Vec<ThreadStats>> {
        let (ping_side, pong_side) = (&ping_side, &pong_side);
        let pong = spawn_named(s, "pong".to_string(), move || -> Result<ThreadStats> {
            if let Some([_, cpu]) = pinned_cpus {
                set_affinity(&[cpu])?;
            }
            let mut b = [0u8; 1];
            let mut buf = String::new();
            for round in 1..=round_trips {
                if handshake {
                    pong_side.about_to_block(round);
                }
                r1.read_exact(&mut b).context("pong: read pipe 1")?;
                if handshake {
                    ping_side.wait_blocked(round, &mut buf)?;
                }
                w2.write_all(&b).context("pong: write pipe 2")?;
            }
            thread::sleep(Duration::from_millis(linger_ms));
            Ok(ThreadStats::current(None))
        })?;
        // Takes the pipe ends by value, so that on error they are closed and "pong" sees EOF
        // instead of blocking forever.
        let ping = move |mut w1: io::PipeWriter, mut r2: io::PipeReader| -> Result<ThreadStats> {
            if let Some([cpu, _]) = pinned_cpus {
                set_affinity(&[cpu])?;
            }
            let mut b = [0u8; 1];
            let mut buf = String::new();
            for round in 1..=round_trips {
                if handshake {
                    pong_side.wait_blocked(round, &mut buf)?;
                }
                w1.write_all(&[round as u8]).context("ping: write pipe 1")?;
                if handshake {
                    ping_side.about_to_block(round);
                }
                r2.read_exact(&mut b).context("ping: read pipe 2")?;
            }
            thread::sleep(Duration::from_millis(linger_ms));
            Ok(ThreadStats::current(None))
        };
        let main = ping(w1, r2);
        let pong = join(pong)?;
        Ok(vec![main?, pong?])
    });
    let wall_ns = start.elapsed().as_nanos() as u64;
    if pinned_cpus.is_some() {
        set_affinity(&allowed)?;
    }
    Ok(PingpongPhase {
        threads: threads?,
        pinned_cpus,
        wall_ns,
    })
}

// ---------------------------------------------------------------------------------------------
// Reports
// ---------------------------------------------------------------------------------------------

/// `path` with `suffix` appended to its last component ("out.json" + ".tmp").
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(suffix);
    PathBuf::from(s)
}

/// Writes `value` as JSON to `path.tmp`, then renames it to `path`.
fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<()> {
    let tmp = with_suffix(path, ".tmp");
    let mut text = serde_json::to_vec_pretty(value).context("cannot serialise report")?;
    text.push(b'\n');
    std::fs::write(&tmp, &text).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

#[derive(Serialize)]
struct CpuReport {
    kind: &'static str,
    pid: u32,
    burn_ms: u64,
    /// Worker threads, in start order (late ones last).
    threads: Vec<ThreadStats>,
    /// Sum of the worker threads' cpu_ns.
    burn_cpu_ns: u64,
    /// CLOCK_PROCESS_CPUTIME_ID after all workers were joined.
    process_cpu_ns: u64,
    /// getrusage(RUSAGE_SELF) after all workers were joined.
    rusage_self: Rusage,
    /// The main thread's own accounting at the end.
    main_thread: ThreadStats,
    /// Most threads (main included) running workload code at the same time.
    max_threads_alive: usize,
    /// Wall time from starting the first worker to joining the last.
    wall_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_ns_before_signal: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rusage_before_signal: Option<Rusage>,
}

impl CpuReport {
    fn new(burn_ms: u64, phase: BurnPhase) -> Self {
        let main_thread = ThreadStats::current(None);
        CpuReport {
            kind: "cpu",
            pid: std::process::id(),
            burn_ms,
            burn_cpu_ns: phase.threads.iter().map(|t| t.cpu_ns).sum(),
            threads: phase.threads,
            process_cpu_ns: process_cpu_ns(),
            rusage_self: rusage(libc::RUSAGE_SELF),
            main_thread,
            max_threads_alive: phase.max_threads_alive,
            wall_ns: phase.wall_ns,
            cpu_ns_before_signal: None,
            rusage_before_signal: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Subcommands
// ---------------------------------------------------------------------------------------------

fn cmd_cpu(a: &CpuArgs) -> Result<()> {
    thread::sleep(Duration::from_millis(a.start_delay_ms));
    let phase = burn_phase(
        a.threads,
        a.burn_ms,
        a.late_threads,
        a.late_delay_ms,
        a.linger_ms,
    )?;
    write_json_atomic(&a.out, &CpuReport::new(a.burn_ms, phase))
}

fn cmd_pingpong(a: &PingpongArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        round_trips: u64,
        /// CPUs of [main thread, "pong"], or null if not pinned.
        pinned_cpus: Option<[usize; 2]>,
        /// [main thread, "pong"].
        threads: Vec<ThreadStats>,
        rusage_self: Rusage,
        process_cpu_ns: u64,
        wall_ns: u64,
    }
    let phase = pingpong_phase(a.round_trips, !a.no_pin, a.handshake, a.linger_ms)?;
    let report = Report {
        kind: "pingpong",
        pid: std::process::id(),
        round_trips: a.round_trips,
        pinned_cpus: phase.pinned_cpus,
        threads: phase.threads,
        rusage_self: rusage(libc::RUSAGE_SELF),
        process_cpu_ns: process_cpu_ns(),
        wall_ns: phase.wall_ns,
    };
    write_json_atomic(&a.out, &report)
}

fn cmd_exit_after(a: &ExitAfterArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        ms: u64,
        /// Sleeper threads still running at exit.
        threads: u32,
        tids: Vec<i32>,
    }
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    for i in 0..a.threads {
        let tx = tx.clone();
        thread::Builder::new()
            .name(format!("sleeper-{i}"))
            .spawn(move || {
                let _ = tx.send(gettid());
                drop(tx);
                loop {
                    thread::sleep(Duration::from_millis(1));
                }
            })
            .with_context(|| format!("cannot start thread sleeper-{i}"))?;
    }
    drop(tx);
    let tids: Vec<i32> = rx.iter().collect();
    sleep_until(start + Duration::from_millis(a.ms));
    let report = Report {
        kind: "exit-after",
        pid: std::process::id(),
        ms: a.ms,
        threads: a.threads,
        tids,
    };
    write_json_atomic(&a.out, &report)?;
    std::process::exit(0);
}

/// Writes PATH.ready and waits for SIGUSR1 (blocked first, so an early signal stays pending).
fn ready_then_wait(out: &Path, timeout_ms: u64) -> Result<()> {
    #[derive(Serialize)]
    struct Ready {
        kind: &'static str,
        pid: u32,
    }
    let set = block_sigusr1()?;
    write_json_atomic(
        &with_suffix(out, ".ready"),
        &Ready {
            kind: "ready",
            pid: std::process::id(),
        },
    )?;
    let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms));
    wait_for_sigusr1(&set, timeout)
}

fn cmd_thread_burst(a: &ThreadBurstArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        count: u64,
        cpu_ns_before_signal: u64,
        process_cpu_ns: u64,
        rusage_before_signal: Rusage,
        rusage_self: Rusage,
    }
    ready_then_wait(&a.out, a.timeout_ms)?;
    let cpu_before = process_cpu_ns();
    let rusage_before = rusage(libc::RUSAGE_SELF);
    let mut left = a.count;
    while left > 0 {
        let batch = left.min(64);
        let handles: Vec<_> = (0..batch)
            .map(|_| thread::spawn(|| black_box(0u64)))
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow!("a burst thread panicked"))?;
        }
        left -= batch;
    }
    write_json_atomic(
        &a.out,
        &Report {
            kind: "thread-burst",
            pid: std::process::id(),
            count: a.count,
            cpu_ns_before_signal: cpu_before,
            process_cpu_ns: process_cpu_ns(),
            rusage_before_signal: rusage_before,
            rusage_self: rusage(libc::RUSAGE_SELF),
        },
    )
}

fn cmd_wait_signal(a: &WaitSignalArgs) -> Result<()> {
    ready_then_wait(&a.out, a.timeout_ms)?;

    let cpu_before = process_cpu_ns();
    let rusage_before = rusage(libc::RUSAGE_SELF);
    let phase = burn_phase(a.threads, a.burn_ms, 0, 0, 0)?;
    let mut report = CpuReport::new(a.burn_ms, phase);
    report.cpu_ns_before_signal = Some(cpu_before);
    report.rusage_before_signal = Some(rusage_before);
    write_json_atomic(&a.out, &report)
}

fn cmd_demo(a: &DemoArgs) -> Result<()> {
    const P1_THREADS: u32 = 2;
    const P1_BURN_MS: u64 = 600;
    const P2_ROUND_TRIPS: u64 = 20_000;
    const P3_THREADS: u32 = 3;
    const P3_CYCLES: u32 = 20;
    const P3_BURN_MS: u64 = 10;
    const P3_SLEEP_MS: u64 = 10;

    #[derive(Serialize)]
    struct Phase {
        description: String,
        threads: Vec<ThreadStats>,
        wall_ns: u64,
    }
    #[derive(Serialize)]
    struct Phases {
        burn: Phase,
        pingpong: Phase,
        cycles: Phase,
    }
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        phases: Phases,
        gap_ms: u64,
        main_thread: ThreadStats,
        process_cpu_ns: u64,
        rusage_self: Rusage,
        wall_ns: u64,
    }

    let pid = std::process::id();
    let start = Instant::now();
    let gap = Duration::from_millis(a.gap_ms);
    eprintln!("{PROG} demo: pid {pid}");

    let p1 = burn_phase(P1_THREADS, P1_BURN_MS, 0, 0, 0)?;
    let burn = Phase {
        description: format!("{P1_THREADS} threads burn {P1_BURN_MS} ms of CPU each"),
        threads: p1.threads,
        wall_ns: p1.wall_ns,
    };
    eprintln!(
        "  phase 1: {} in {:.2} s",
        burn.description,
        secs(burn.wall_ns)
    );
    thread::sleep(gap);

    // Unpinned: pinned cross-CPU round trips cost ~100 us each in a VM, which would make this
    // phase alone take seconds.
    let p2 = pingpong_phase(P2_ROUND_TRIPS, false, false, 0)?;
    let pingpong = Phase {
        description: format!("pingpong, {P2_ROUND_TRIPS} round trips over two pipes (unpinned)"),
        threads: p2.threads,
        wall_ns: p2.wall_ns,
    };
    eprintln!(
        "  phase 2: {} in {:.2} s",
        pingpong.description,
        secs(pingpong.wall_ns)
    );
    thread::sleep(gap);

    let p3_start = Instant::now();
    let p3_threads = thread::scope(|s| -> Result<Vec<ThreadStats>> {
        let handles = (0..P3_THREADS)
            .map(|i| {
                spawn_named(s, format!("cycle-{i}"), || {
                    for _ in 0..P3_CYCLES {
                        burn_for_ns(P3_BURN_MS * NS_PER_MS);
                        thread::sleep(Duration::from_millis(P3_SLEEP_MS));
                    }
                    ThreadStats::current(None)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        handles.into_iter().map(join).collect()
    })?;
    let cycles = Phase {
        description: format!(
            "{P3_THREADS} threads, {P3_CYCLES} cycles of (burn {P3_BURN_MS} ms, sleep {P3_SLEEP_MS} ms)"
        ),
        threads: p3_threads,
        wall_ns: p3_start.elapsed().as_nanos() as u64,
    };
    eprintln!(
        "  phase 3: {} in {:.2} s",
        cycles.description,
        secs(cycles.wall_ns)
    );

    let report = Report {
        kind: "demo",
        pid,
        phases: Phases {
            burn,
            pingpong,
            cycles,
        },
        gap_ms: a.gap_ms,
        main_thread: ThreadStats::current(None),
        process_cpu_ns: process_cpu_ns(),
        rusage_self: rusage(libc::RUSAGE_SELF),
        wall_ns: start.elapsed().as_nanos() as u64,
    };
    eprintln!(
        "  total: {:.2} s wall, {:.3} s CPU, {} voluntary / {} involuntary context switches",
        secs(report.wall_ns),
        secs(report.process_cpu_ns),
        report.rusage_self.nvcsw,
        report.rusage_self.nivcsw
    );
    if let Some(out) = &a.out {
        write_json_atomic(out, &report)?;
    }
    Ok(())
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}
