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

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::hint::black_box;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
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
    /// As the very last act, after the subcommand's report: read the process's CPU clock
    /// (CLOCK_PROCESS_CPUTIME_ID) and getrusage(RUSAGE_SELF) once more and write them to PATH
    /// ({"kind":"exit-stamp", "pid", "process_cpu_ns", "rusage_self"}). What follows is only
    /// writing that file and the exit itself: ground truth for a tracer's totals at the exit
    /// of a process the test cannot wait4 for (one the tracer spawned).
    #[arg(long, global = true, value_name = "PATH")]
    exit_stamp: Option<PathBuf>,
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
    /// "ms", "threads", "tids", "sleeps"} and calls exit(0) while the sleepers are still
    /// running; "sleeps" counts the 1 ms sleeps the sleepers had finished by then (each
    /// ended in a wakeup).
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

    /// Direct (O_DIRECT) block I/O of a known size, with the kernel's /proc/self/io accounting.
    ///
    /// Setup (not part of the measured phase): creates or truncates --file, preallocates it
    /// with max(W, R) MiB of zeros written with ordinary buffered writes, fsync()s it and drops
    /// it from the page cache (posix_fadvise DONTNEED). Because the blocks are then allocated
    /// and written, the direct writes below overwrite them in place and cause no filesystem
    /// metadata I/O (no allocation, no unwritten-extent conversion).
    ///
    /// With --wait-signal, then writes PATH.ready ({"kind":"ready","pid"}) and waits for
    /// SIGUSR1 (at most --timeout-ms). Then sleeps --start-delay-ms.
    ///
    /// Direct phase: reads /proc/self/io, opens the file with O_DIRECT, writes W MiB from
    /// offset 0 with pwrite() in blocks of --block-kb from a 4096-aligned buffer, calls
    /// fdatasync() once, reads R MiB from offset 0 with pread() in the same blocks, and reads
    /// /proc/self/io again. Nothing else in the process does file I/O in between, so
    /// write_bytes in /proc/self/io grows by exactly W MiB and read_bytes by R MiB (direct
    /// reads are accounted when their bios are submitted, direct writes when issued).
    ///
    /// Report: {"kind":"dio", "pid", "file", "block_bytes", "prealloc_bytes", "write_bytes",
    /// "read_bytes", "write_calls", "read_calls", "write_ns" (the pwrite() calls), "fdatasync_ns",
    /// "read_ns" (the pread() calls), "proc_io_before":{...}, "proc_io_after":{...}}, where
    /// proc_io_* hold every field of /proc/self/io (rchar, wchar, syscr, syscw, read_bytes,
    /// write_bytes, cancelled_write_bytes). Without --out the report goes to stdout. The file
    /// is left in place (the caller removes it).
    Dio(DioArgs),

    /// Create a tap device, write N Ethernet frames into it, then read frames the host sends.
    ///
    /// Opens /dev/net/tun and creates tap NAME (IFF_TAP | IFF_NO_PI, not persistent) in the
    /// process's own network namespace (choose it with `ip netns exec NS cis490-workload ...`).
    /// The interface is not configured here: with --wait-signal, PATH.ready
    /// ({"kind":"ready","pid","name"}) is written once the tap exists and the workload waits
    /// for SIGUSR1 (at most --signal-timeout-ms) so the caller can bring it up (`ip link set
    /// NAME up`) and start a tracer.
    ///
    /// Then writes N frames of exactly S bytes into the tap fd (one write() each): dst
    /// ff:ff:ff:ff:ff:ff, src 02:00:00:00:00:01, ethertype 0x88b5 (IEEE local experimental),
    /// then the frame's index (u32, big-endian) and zero padding. The host receives these on
    /// NAME: they count as rx_packets / rx_bytes in /sys/class/net/NAME/statistics (and are
    /// then dropped, as no protocol handles 0x88b5). Writing to a tap that is down fails with
    /// EIO, which is an error (exit code 2).
    ///
    /// Then reads frames from the tap fd (poll() + read(), one frame per read) until M frames
    /// were read or --timeout-ms passed. These are frames the host transmitted on NAME
    /// (tx_packets / tx_bytes there), e.g. from `cis490-workload send-frames`, but also
    /// anything the host's stack sends, such as IPv6 neighbour discovery and MLD when the
    /// link comes up; frames_read_by_ethertype tells them apart (disable IPv6 on NAME to avoid
    /// them).
    ///
    /// Report: {"kind":"tap", "pid", "name" (as the kernel named it), "frame_size",
    /// "frames_written", "bytes_written", "frames_read", "bytes_read",
    /// "frames_read_by_ethertype":{"0x88b5":n,...}, "read_timed_out", "write_ns", "read_ns"}.
    /// Then, after --linger-ms, the fd is closed and the tap disappears with the process.
    Tap(TapArgs),

    /// Send N Ethernet frames of S bytes out of interface NAME through an AF_PACKET socket.
    ///
    /// The host-side peer of `tap`: a frame sent on the host side of a tap is delivered to the
    /// process holding the tap fd. Opens an AF_PACKET SOCK_RAW socket (protocol 0, so it
    /// receives nothing), binds it to NAME and calls send() N times with a frame of exactly S
    /// bytes: dst ff:ff:ff:ff:ff:ff, src 02:00:00:00:00:02, ethertype 0x88b5, the frame's
    /// index (u32, big-endian), zero padding. The interface must be up (else ENETDOWN, an
    /// error). A successful send() means the frame was handed to the device's queue; the
    /// device may still drop it (tx_dropped) if the reader does not keep up, so pace with
    /// --interval-us if that matters. Report: {"kind":"send-frames", "pid", "ifname",
    /// "ifindex", "frame_size", "frames_sent", "bytes_sent", "send_calls", "wall_ns"}.
    SendFrames(SendFramesArgs),

    /// A minimal KVM guest that makes N port-I/O exits, then halts.
    ///
    /// Raw ioctls on /dev/kvm (API version 12): one VM with 2 pages of memory at guest
    /// physical 0x1000, one vCPU in 16-bit real mode (cs base 0, ip 0x1000) running
    ///
    ///     mov cx, N ; jcxz done ; again: out 0x10, al ; dec cx ; jnz again ; done: hlt
    ///
    /// so the guest makes exactly N KVM_EXIT_IO exits (port 0x10, out, 1 byte, al=0x2a) and
    /// one KVM_EXIT_HLT (no in-kernel irqchip is created, so hlt exits to user space). KVM_RUN
    /// is called in a loop on the main thread; every exit is counted by exit_reason. Any other
    /// exit (or an I/O exit that is not exactly the guest's `out`) stops the guest.
    ///
    /// A SIGALRM timer bounds the whole run: if the guest has not halted within --timeout-ms,
    /// KVM_RUN is interrupted and the run stops.
    ///
    /// Report: {"kind":"kvm", "pid", "io_exits", "hlt_exits", "other_exits":{"KVM_EXIT_...":
    /// n}, "kvm_runs" (KVM_RUN calls), "stop_reason" ("hlt", or what stopped it),
    /// "final_rip", "final_rcx", "vcpu_mmap_size", "run_ns"}. If the guest did not halt
    /// cleanly, the report is still written (to --out, or stdout without it) and then the
    /// workload fails (one-line error, exit code 2).
    Kvm(KvmArgs),

    /// Receive network traffic on port P and count it (TCP by default, or --udp).
    ///
    /// Binds 0.0.0.0:P (P 0 picks a free port), then writes PATH.ready
    /// ({"kind":"ready","pid","port"}) once it is listening. TCP: accepts one connection and
    /// reads it to EOF (64 KiB read() calls). UDP: receives datagrams until --bytes B were
    /// received (if given) or the timeout. Either way --timeout-ms (counted from the ready
    /// file; 0 waits forever) ends the wait: that is normal for UDP without --bytes and sets
    /// "timed_out" otherwise.
    ///
    /// Report: {"kind":"sink", "pid", "port", "protocol":"tcp"|"udp", "bytes",
    /// "connections" (tcp) or "datagrams" (udp), "read_calls", "elapsed_ns" (from accept / the
    /// first datagram to EOF / the last datagram), "timed_out"}.
    Sink(SinkArgs),

    /// The main thread exits at once; another thread goes on, then ends the process.
    ///
    /// The main thread starts thread "survivor", then ends itself alone (the raw exit
    /// syscall, not exit_group): the process lives on with a zombie main thread, which is
    /// what /proc/PID/stat then shows (state Z). The survivor writes PATH.ready
    /// ({"kind":"ready","pid"}), sleeps --delay-ms, burns --burn-ms of its own CPU clock,
    /// writes {"kind":"main-exits", "pid", "cpu_ns_before_burn", "process_cpu_ns"} to PATH
    /// and exits the process with code 0.
    MainExits(MainExitsArgs),

    /// Burn CPU in several threads, then execve PROGRAM from one that is not the main thread.
    ///
    /// Starts --threads N threads: "execer" burns --burn-ms of its own CPU clock, then calls
    /// execv(PROGRAM, [PROGRAM, ARGS...]) while the main thread (blocked in join) and N-1
    /// "spinner-K" threads (burning CPU without end) are still alive. The kernel kills them
    /// (de_thread), the execer takes over the process id, and PROGRAM runs in the same process:
    /// its CLOCK_PROCESS_CPUTIME_ID and getrusage(RUSAGE_SELF) still include everything done
    /// before the exec, by every thread. Writes no report (PROGRAM does); if execv fails, an
    /// error (exit code 2). PROGRAM is a path (no PATH search).
    Exec(ExecArgs),
    /// A context-switch storm for benchmarks: two threads bounce one byte over two pipes,
    /// R round trips, as fast as the machine allows.
    ///
    /// By default both threads are pinned to the same CPU (the fastest way here: a wakeup on
    /// the same CPU costs no inter-processor interrupt), so every round trip is two context
    /// switches between the two threads. --cpus split pins them to two CPUs, --cpus free
    /// leaves them to the scheduler; --pairs N runs N such pairs at once. With --wait-signal,
    /// writes PATH.ready and waits for SIGUSR1 first. Report: {"kind":"storm", "pid",
    /// "round_trips" (all pairs), "pairs", "cpus", "wall_ns",
    /// "round_trips_per_s", "rusage_self", "process_cpu_ns"}; then sleeps --linger-ms.
    Storm(StormArgs),

    /// A many-thread CPU burn with frequent wakeups, for benchmarks.
    ///
    /// N threads (more than the CPUs, so the run queue is never empty) each do C cycles of
    /// (spin --spin-iters iterations of pure computation, then nanosleep --sleep-us), so each
    /// cycle is a switch-out, a timer wakeup and a switch-in. The work is fixed: the wall time
    /// it takes is the measure. With --wait-signal, writes PATH.ready and waits for SIGUSR1
    /// first. Report: {"kind":"wakeburn", "pid", "threads", "cycles", "spin_iters",
    /// "sleep_us", "wall_ns", "cycles_per_s", "rusage_self", "process_cpu_ns"}; then sleeps
    /// --linger-ms.
    Wakeburn(WakeburnArgs),

    /// Page faults: T threads each map --pages anonymous pages (no transparent huge pages:
    /// MADV_NOHUGEPAGE) and write one byte to each (one minor fault per page), then exit; the
    /// main thread joins them.
    ///
    /// Report: {"kind":"faults", "pid", "threads", "pages", "touched", "minflt", "majflt"}:
    /// `touched` is threads x pages (the faults the work itself must take), `minflt` and
    /// `majflt` are getrusage(RUSAGE_SELF) after the join (every thread, exited ones included,
    /// and the faults of starting the program), the process's own count.
    Faults(FaultsArgs),

    /// An io_uring with a kernel submission-queue thread: io_uring_setup(2) with
    /// IORING_SETUP_SQPOLL makes the kernel create a thread ("iou-sqp-PID") in this
    /// process's thread group, without clone(2). Holds the ring --hold-ms, closes it and
    /// writes {"kind":"io-uring", "pid"} to --out.
    IoUring(IoUringArgs),

    /// Timed wakeups whose delays the process measures itself: ground truth for run-queue
    /// delay.
    ///
    /// One thread (the main one), with a timer slack of 1 ns, sleeps --count times until an
    /// absolute CLOCK_MONOTONIC deadline --period-us after the previous one's wake-up
    /// (clock_nanosleep TIMER_ABSTIME), and reads the clock as soon as it runs: each delay is
    /// `woke - deadline`, the timer's expiry, the wait on the run queue (what the kernel counts
    /// as `sched_info.run_delay`) and the return to user space. Report: {"kind":"wakeups", "pid",
    /// "count", "period_us", "delays_ns":[...], "sum_ns", "max_ns", "rusage_self",
    /// "process_cpu_ns"}.
    Wakeups(WakeupsArgs),
}

#[derive(Args, Debug)]
struct IoUringArgs {
    /// How long the ring (and its kernel thread) lives, ms.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    hold_ms: u64,
    /// Where the report goes.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct FaultsArgs {
    /// Threads, each faulting its own mapping.
    #[arg(long, value_name = "T", default_value_t = 4)]
    threads: u32,
    /// Pages each thread maps and touches.
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    pages: u64,
    /// Where the report goes.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct WakeupsArgs {
    /// Number of timed sleeps.
    #[arg(long, value_name = "N", default_value_t = 500,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    count: u64,
    /// Sleep per wake-up, in µs.
    #[arg(long, value_name = "US", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    period_us: u64,
    /// Where to write the JSON report.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

fn cmd_wakeups(a: &WakeupsArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        count: u64,
        period_us: u64,
        delays_ns: Vec<u64>,
        sum_ns: u64,
        max_ns: u64,
        rusage_self: Rusage,
        process_cpu_ns: u64,
    }
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes a plain integer and changes only this thread.
    if unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) } != 0 {
        bail!("prctl(PR_SET_TIMERSLACK): {}", io::Error::last_os_error());
    }
    let mut delays = Vec::with_capacity(a.count as usize);
    let mut now = clock_ns(libc::CLOCK_MONOTONIC);
    for _ in 0..a.count {
        let deadline = now + a.period_us * 1000;
        let ts = libc::timespec {
            tv_sec: (deadline / 1_000_000_000) as libc::time_t,
            tv_nsec: (deadline % 1_000_000_000) as libc::c_long,
        };
        loop {
            // SAFETY: `ts` is a valid timespec; a null remainder is allowed with TIMER_ABSTIME.
            let rc = unsafe {
                libc::clock_nanosleep(
                    libc::CLOCK_MONOTONIC,
                    libc::TIMER_ABSTIME,
                    &ts,
                    std::ptr::null_mut(),
                )
            };
            match rc {
                0 => break,
                libc::EINTR => continue,
                e => bail!("clock_nanosleep: {}", io::Error::from_raw_os_error(e)),
            }
        }
        now = clock_ns(libc::CLOCK_MONOTONIC);
        delays.push(now.saturating_sub(deadline));
    }
    let report = Report {
        kind: "wakeups",
        pid: std::process::id(),
        count: a.count,
        period_us: a.period_us,
        sum_ns: delays.iter().sum(),
        max_ns: delays.iter().copied().max().unwrap_or(0),
        delays_ns: delays,
        rusage_self: rusage(libc::RUSAGE_SELF),
        process_cpu_ns: process_cpu_ns(),
    };
    write_json_atomic(&a.out, &report)
}

#[derive(Args, Debug)]
struct StormArgs {
    /// Number of round trips.
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u64).range(1..))]
    round_trips: u64,
    /// Where the two threads run: same (one CPU, pinned), split (two CPUs, pinned) or free.
    #[arg(long, value_name = "HOW", default_value = "same",
          value_parser = ["same", "split", "free"])]
    cpus: String,
    /// Independent ping-pong pairs, each doing R round trips; with --cpus same, pair K is
    /// pinned to the K-th allowed CPU (modulo their number): two pairs on two CPUs keep both
    /// busy switching.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pairs: u32,
    #[command(flatten)]
    held: Held,
}

/// A benchmark workload's start and end: held until SIGUSR1 (optionally),
/// then a report, then a linger.
#[derive(Args, Debug)]
struct Held {
    /// Write PATH.ready and wait for SIGUSR1 before the work.
    #[arg(long)]
    wait_signal: bool,
    /// With --wait-signal: give up (error, exit code 2) if no SIGUSR1 arrives within this
    /// many ms; 0 waits forever.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    timeout_ms: u64,
    /// Sleep this long after writing the report, before exiting.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    linger_ms: u64,
    /// Where to write the JSON report; the ready file is PATH.ready.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

impl Held {
    /// With --wait-signal: writes PATH.ready and waits for SIGUSR1.
    fn start(&self) -> Result<()> {
        if self.wait_signal {
            ready_then_wait(&self.out, self.timeout_ms)?;
        }
        Ok(())
    }

    /// Writes the report, then lingers.
    fn finish(&self, report: &impl Serialize) -> Result<()> {
        write_json_atomic(&self.out, report)?;
        thread::sleep(Duration::from_millis(self.linger_ms));
        Ok(())
    }
}

#[derive(Args, Debug)]
struct MainExitsArgs {
    /// Sleep before burning, in ms (time to attach a tracer).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    delay_ms: u64,
    /// CPU time the survivor burns, in ms of its own thread CPU clock.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    burn_ms: u64,
    /// Where to write the JSON report; the ready file is PATH.ready.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct ExecArgs {
    /// Threads besides the main one: the execer and N-1 spinners.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: u32,
    /// CPU time the execer burns before it calls execv, in ms of its own thread CPU clock.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    burn_ms: u64,
    /// PROGRAM and its arguments.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    argv: Vec<OsString>,
}

#[derive(Args, Debug)]
struct WakeburnArgs {
    /// Number of threads.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=4096))]
    threads: u32,
    /// Cycles (spin, then sleep) per thread.
    #[arg(long, value_name = "C", value_parser = clap::value_parser!(u64).range(1..))]
    cycles: u64,
    /// Iterations of the spin loop per cycle (about 1 ns each here).
    #[arg(long, value_name = "I", default_value_t = 20_000)]
    spin_iters: u64,
    /// nanosleep per cycle, in microseconds (the kernel adds its timer slack, 50 us by
    /// default).
    #[arg(long, value_name = "US", default_value_t = 1)]
    sleep_us: u64,
    #[command(flatten)]
    held: Held,
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
    /// After burning, each thread sleeps this long before it exits, so a poller (the /proc
    /// oracle) sees its final counts.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    linger_ms: u64,
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

#[derive(Args, Debug)]
struct DioArgs {
    /// File to create (or truncate) and use, on a block-device filesystem (ext4, xfs, btrfs)
    /// that supports O_DIRECT. (tmpfs accepts O_DIRECT on recent kernels but does no block
    /// I/O, so read_bytes / write_bytes would not grow.) Left in place afterwards.
    #[arg(long, value_name = "PATH")]
    file: PathBuf,
    /// MiB to write with O_DIRECT, from offset 0.
    #[arg(long, value_name = "W", value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    write_mb: u64,
    /// MiB to read back with O_DIRECT, from offset 0 (after the writes).
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    read_mb: u64,
    /// Size of each pwrite()/pread() in KiB: a multiple of 4, at most 65536. The last call
    /// is shorter if it does not divide the total.
    #[arg(long, value_name = "KB", default_value_t = 1024, value_parser = parse_block_kb)]
    block_kb: u64,
    /// Idle sleep before the direct phase (after the preallocation and any signal wait).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    start_delay_ms: u64,
    /// Idle sleep after the direct phase, before exiting, so a poller (the /proc oracle)
    /// sees the final counts.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    linger_ms: u64,
    /// After preallocating, write PATH.ready and wait for SIGUSR1 before the direct phase.
    #[arg(long, requires = "out")]
    wait_signal: bool,
    /// With --wait-signal: give up (error, exit code 2) if no SIGUSR1 arrives within this
    /// many ms; 0 waits forever.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    timeout_ms: u64,
    /// Where to write the JSON report (stdout if omitted); the ready file is PATH.ready.
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct TapArgs {
    /// Name of the tap device to create (at most 15 bytes; a "%d" in it lets the kernel pick
    /// a number, and the report gives the name it chose).
    #[arg(long, value_name = "NAME")]
    name: String,
    /// Number of frames to write into the tap (received by the host on NAME).
    #[arg(long, value_name = "N")]
    frames: u64,
    /// Size of each frame written, in bytes, Ethernet header included (no FCS).
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(60..=65535))]
    size: u64,
    /// Number of frames to read from the tap (sent by the host on NAME) after writing.
    #[arg(long, value_name = "M", default_value_t = 0)]
    read_frames: u64,
    /// Write PATH.ready once the tap exists and wait for SIGUSR1 before writing frames.
    #[arg(long)]
    wait_signal: bool,
    /// With --wait-signal: give up (error, exit code 2) if no SIGUSR1 arrives within this
    /// many ms; 0 waits forever.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    signal_timeout_ms: u64,
    /// Stop reading after this many ms (counted from the first read attempt) even if fewer
    /// than M frames arrived; the report then says "read_timed_out": true.
    #[arg(long, value_name = "T", default_value_t = 10_000)]
    timeout_ms: u64,
    /// After writing the report, keep the tap (fd open) this long before closing it and
    /// exiting, so the caller can read the interface's statistics once it sees the report.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    linger_ms: u64,
    /// Where to write the JSON report; the ready file is PATH.ready.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct SendFramesArgs {
    /// Interface to send on (e.g. the host side of a tap); it must be up.
    #[arg(long, value_name = "NAME")]
    ifname: String,
    /// Number of frames to send.
    #[arg(long, value_name = "N")]
    frames: u64,
    /// Size of each frame, in bytes, Ethernet header included (no FCS); at most the
    /// interface's MTU + 14.
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(60..=65535))]
    size: u64,
    /// Sleep this many microseconds between two frames (0: back to back).
    #[arg(long, value_name = "US", default_value_t = 0)]
    interval_us: u64,
    /// Where to write the JSON report.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct KvmArgs {
    /// Number of port-I/O exits the guest makes before it halts (0 to 65535).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16))]
    io_exits: u16,
    /// Stop the guest (and fail) if it has not halted within this many ms.
    #[arg(long, value_name = "MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
    /// Where to write the JSON report (stdout if omitted).
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct SinkArgs {
    /// Port to listen on, on 0.0.0.0 (0: any free port, given in the ready file and report).
    #[arg(long, value_name = "P")]
    port: u16,
    /// Receive UDP datagrams instead of one TCP connection.
    #[arg(long)]
    udp: bool,
    /// With --udp: stop once this many bytes (UDP payload) were received.
    #[arg(long, value_name = "B", requires = "udp")]
    bytes: Option<u64>,
    /// Stop waiting this many ms after the ready file was written; 0 waits forever.
    #[arg(long, value_name = "T", default_value_t = 30_000)]
    timeout_ms: u64,
    /// Where to write the JSON report; the ready file is PATH.ready.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

fn parse_block_kb(s: &str) -> Result<u64, String> {
    let kb: u64 = s.parse().map_err(|e| format!("{e}"))?;
    if kb == 0 || !kb.is_multiple_of(4) || kb > 65536 {
        return Err("must be a multiple of 4 between 4 and 65536".to_string());
    }
    Ok(kb)
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
                "missing subcommand (cpu, pingpong, exit-after, wait-signal, demo, thread-burst, dio, \
                 tap, send-frames, kvm, sink, exec, main-exits, storm, wakeburn, faults, io-uring or wakeups)".to_string()
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

    let exit_stamp = cli.exit_stamp.clone();
    let result = match cli.command {
        Command::Cpu(a) => cmd_cpu(&a),
        Command::Pingpong(a) => cmd_pingpong(&a),
        Command::ExitAfter(a) => cmd_exit_after(&a),
        Command::WaitSignal(a) => cmd_wait_signal(&a),
        Command::Demo(a) => cmd_demo(&a),
        Command::ThreadBurst(a) => cmd_thread_burst(&a),
        Command::Dio(a) => cmd_dio(&a),
        Command::Tap(a) => cmd_tap(&a),
        Command::SendFrames(a) => cmd_send_frames(&a),
        Command::Kvm(a) => cmd_kvm(&a),
        Command::Sink(a) => cmd_sink(&a),
        Command::Exec(a) => cmd_exec(&a),
        Command::MainExits(a) => cmd_main_exits(&a),
        Command::Storm(a) => cmd_storm(&a),
        Command::Wakeburn(a) => cmd_wakeburn(&a),
        Command::Faults(a) => cmd_faults(&a),
        Command::IoUring(a) => cmd_io_uring(&a),
        Command::Wakeups(a) => cmd_wakeups(&a),
    };
    let result = result.and_then(|()| match &exit_stamp {
        Some(path) => write_exit_stamp(path),
        None => Ok(()),
    });
    if let Err(e) = result {
        eprintln!("{PROG}: error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(2);
    }
}

/// `--exit-stamp PATH`: the process's own totals as late as it can take them.
fn write_exit_stamp(path: &Path) -> Result<()> {
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

fn cmd_io_uring(a: &IoUringArgs) -> Result<()> {
    /// `struct io_uring_params` (include/uapi/linux/io_uring.h): 120 bytes.
    #[repr(C)]
    struct Params {
        sq_entries: u32,
        cq_entries: u32,
        flags: u32,
        sq_thread_cpu: u32,
        sq_thread_idle: u32,
        features: u32,
        wq_fd: u32,
        resv: [u32; 3],
        offsets: [u64; 10],
    }
    const IORING_SETUP_SQPOLL: u32 = 1 << 1;
    let mut p = Params {
        sq_entries: 0,
        cq_entries: 0,
        flags: IORING_SETUP_SQPOLL,
        sq_thread_cpu: 0,
        sq_thread_idle: 1000,
        features: 0,
        wq_fd: 0,
        resv: [0; 3],
        offsets: [0; 10],
    };
    // SAFETY: io_uring_setup reads and writes `p`, a valid io_uring_params.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 8u32, &raw mut p) };
    if fd < 0 {
        bail!("io_uring_setup(SQPOLL): {}", io::Error::last_os_error());
    }
    thread::sleep(Duration::from_millis(a.hold_ms));
    // SAFETY: the ring's fd, closed once.
    unsafe { libc::close(fd as i32) };
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
    }
    write_json_atomic(
        &a.out,
        &Report {
            kind: "io-uring",
            pid: std::process::id(),
        },
    )
}

fn cmd_faults(a: &FaultsArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        threads: u32,
        pages: u64,
        touched: u64,
        minflt: u64,
        majflt: u64,
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let len = page * a.pages as usize;
    let mut handles = Vec::new();
    for i in 0..a.threads {
        handles.push(
            thread::Builder::new()
                .name(format!("faulter-{i}"))
                .spawn(move || -> Result<u64> {
                    // SAFETY: a new private anonymous mapping; nothing else refers to it.
                    let p = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            len,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        )
                    };
                    if p == libc::MAP_FAILED {
                        bail!("mmap: {}", io::Error::last_os_error());
                    }
                    // Small pages only: with transparent huge pages one fault
                    // would map 512 of them.
                    // (EINVAL: a kernel without huge pages, small pages anyway.)
                    // SAFETY: advice on the mapping made above.
                    if unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) } != 0 {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EINVAL) {
                            bail!("madvise(MADV_NOHUGEPAGE): {e}");
                        }
                    }
                    let mut touched = 0;
                    for off in (0..len).step_by(page) {
                        // SAFETY: inside the mapping just made, writable.
                        unsafe { std::ptr::write_volatile(p.cast::<u8>().add(off), 1) };
                        touched += 1;
                    }
                    // SAFETY: the mapping made above, no longer used.
                    unsafe { libc::munmap(p, len) };
                    Ok(touched)
                })
                .with_context(|| format!("cannot start thread faulter-{i}"))?,
        );
    }
    let mut touched = 0;
    for h in handles {
        touched += h
            .join()
            .map_err(|_| anyhow::anyhow!("a faulter panicked"))??;
    }
    // SAFETY: `struct rusage` is plain integers and timevals, for which all-zero is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage; getrusage only writes into it.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        bail!("getrusage: {}", io::Error::last_os_error());
    }
    write_json_atomic(
        &a.out,
        &Report {
            kind: "faults",
            pid: std::process::id(),
            threads: a.threads,
            pages: a.pages,
            touched,
            minflt: ru.ru_minflt as u64,
            majflt: ru.ru_majflt as u64,
        },
    )
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
        sleeps: usize,
    }
    static SLEEPS: AtomicUsize = AtomicUsize::new(0);
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
                    SLEEPS.fetch_add(1, Ordering::Relaxed);
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
        sleeps: SLEEPS.load(Ordering::Relaxed),
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

fn cmd_main_exits(a: &MainExitsArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        cpu_ns_before_burn: u64,
        process_cpu_ns: u64,
    }
    let (delay, burn_ns, out) = (a.delay_ms, a.burn_ms * NS_PER_MS, a.out.clone());
    thread::Builder::new()
        .name("survivor".to_string())
        .spawn(move || {
            let run = || -> Result<()> {
                #[derive(Serialize)]
                struct Ready {
                    kind: &'static str,
                    pid: u32,
                }
                let pid = std::process::id();
                write_ready(&out, &Ready { kind: "ready", pid })?;
                thread::sleep(Duration::from_millis(delay));
                let before = process_cpu_ns();
                burn_for_ns(burn_ns);
                write_json_atomic(
                    &out,
                    &Report {
                        kind: "main-exits",
                        pid,
                        cpu_ns_before_burn: before,
                        process_cpu_ns: process_cpu_ns(),
                    },
                )
            };
            match run() {
                Ok(()) => std::process::exit(0),
                Err(e) => {
                    eprintln!("{PROG}: error: {}", format!("{e:#}").replace('\n', " "));
                    std::process::exit(2);
                }
            }
        })
        .context("cannot start thread survivor")?;
    // SAFETY: the raw exit syscall ends the calling thread only; nothing of
    // this thread is used afterwards (the survivor owns what it needs).
    unsafe { libc::syscall(libc::SYS_exit, 0) };
    unreachable!("SYS_exit returned");
}

fn cmd_exec(a: &ExecArgs) -> Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let argv = a
        .argv
        .iter()
        .map(|s| std::ffi::CString::new(s.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .context("an argument contains a NUL byte")?;
    for i in 0..a.threads - 1 {
        thread::Builder::new()
            .name(format!("spinner-{i}"))
            .spawn(|| {
                loop {
                    spin(1_000_000);
                }
            })
            .with_context(|| format!("cannot start thread spinner-{i}"))?;
    }
    let burn_ns = a.burn_ms * NS_PER_MS;
    let execer = thread::Builder::new()
        .name("execer".to_string())
        .spawn(move || -> Result<()> {
            burn_for_ns(burn_ns);
            let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
            ptrs.push(std::ptr::null());
            // SAFETY: a NUL-terminated path and a NULL-terminated argv of C strings that
            // outlive the call; execv returns only on failure.
            unsafe { libc::execv(ptrs[0], ptrs.as_ptr()) };
            Err(anyhow!(
                "cannot exec {}: {}",
                argv[0].to_string_lossy(),
                io::Error::last_os_error()
            ))
        })
        .context("cannot start thread execer")?;
    // Returns only if execv failed.
    execer
        .join()
        .map_err(|_| anyhow!("the execer thread panicked"))?
}

fn cmd_storm(a: &StormArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        /// All pairs' round trips together.
        round_trips: u64,
        pairs: u32,
        /// CPUs of [ping, "pong"] of the first pair, or null when not pinned.
        cpus: Option<[usize; 2]>,
        wall_ns: u64,
        round_trips_per_s: f64,
        rusage_self: Rusage,
        process_cpu_ns: u64,
    }
    let allowed = allowed_cpus()?;
    let cpus_of = |k: usize| match (a.cpus.as_str(), &allowed[..]) {
        ("same", [_, ..]) => {
            let c = allowed[k % allowed.len()];
            Ok(Some([c, c]))
        }
        ("split", [c, d, ..]) => Ok(Some([*c, *d])),
        ("split", _) => bail!("--cpus split needs two CPUs"),
        _ => Ok(None),
    };
    let pinned: Vec<Option<[usize; 2]>> =
        (0..a.pairs as usize).map(cpus_of).collect::<Result<_>>()?;
    a.held.start()?;
    let n = a.round_trips;
    let start = Instant::now();
    thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for (k, cpus) in pinned.iter().copied().enumerate() {
            let (mut r1, mut w1) = io::pipe().context("pipe")?;
            let (mut r2, mut w2) = io::pipe().context("pipe")?;
            handles.push(spawn_named(
                s,
                format!("pong-{k}"),
                move || -> Result<()> {
                    if let Some([_, cpu]) = cpus {
                        set_affinity(&[cpu])?;
                    }
                    let mut b = [0u8; 1];
                    for _ in 0..n {
                        r1.read_exact(&mut b).context("pong: read")?;
                        w2.write_all(&b).context("pong: write")?;
                    }
                    Ok(())
                },
            )?);
            handles.push(spawn_named(
                s,
                format!("ping-{k}"),
                move || -> Result<()> {
                    if let Some([cpu, _]) = cpus {
                        set_affinity(&[cpu])?;
                    }
                    let mut b = [0u8; 1];
                    for i in 0..n {
                        w1.write_all(&[i as u8]).context("ping: write")?;
                        r2.read_exact(&mut b).context("ping: read")?;
                    }
                    Ok(())
                },
            )?);
        }
        for h in handles {
            join(h)??;
        }
        Ok(())
    })?;
    let wall_ns = start.elapsed().as_nanos() as u64;
    let total = n * u64::from(a.pairs);
    let report = Report {
        kind: "storm",
        pid: std::process::id(),
        round_trips: total,
        pairs: a.pairs,
        cpus: pinned[0],
        wall_ns,
        round_trips_per_s: total as f64 / secs(wall_ns),
        rusage_self: rusage(libc::RUSAGE_SELF),
        process_cpu_ns: process_cpu_ns(),
    };
    a.held.finish(&report)
}

fn cmd_wakeburn(a: &WakeburnArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        threads: u32,
        cycles: u64,
        spin_iters: u64,
        sleep_us: u64,
        wall_ns: u64,
        cycles_per_s: f64,
        rusage_self: Rusage,
        process_cpu_ns: u64,
    }
    a.held.start()?;
    let (cycles, iters, nap) = (a.cycles, a.spin_iters, Duration::from_micros(a.sleep_us));
    let start = Instant::now();
    thread::scope(|s| -> Result<()> {
        let handles = (0..a.threads)
            .map(|i| {
                spawn_named(s, format!("wake-{i}"), move || {
                    for _ in 0..cycles {
                        spin(iters);
                        thread::sleep(nap);
                    }
                })
            })
            .collect::<Result<Vec<_>>>()?;
        handles.into_iter().try_for_each(join)
    })?;
    let wall_ns = start.elapsed().as_nanos() as u64;
    let report = Report {
        kind: "wakeburn",
        pid: std::process::id(),
        threads: a.threads,
        cycles,
        spin_iters: iters,
        sleep_us: a.sleep_us,
        wall_ns,
        cycles_per_s: (cycles * a.threads as u64) as f64 / secs(wall_ns),
        rusage_self: rusage(libc::RUSAGE_SELF),
        process_cpu_ns: process_cpu_ns(),
    };
    a.held.finish(&report)
}

fn cmd_wait_signal(a: &WaitSignalArgs) -> Result<()> {
    ready_then_wait(&a.out, a.timeout_ms)?;

    let cpu_before = process_cpu_ns();
    let rusage_before = rusage(libc::RUSAGE_SELF);
    let phase = burn_phase(a.threads, a.burn_ms, 0, 0, a.linger_ms)?;
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

// ---------------------------------------------------------------------------------------------
// Shared helpers for the I/O, network and KVM subcommands
// ---------------------------------------------------------------------------------------------

/// Writes the report atomically to `out`, or pretty-prints it on stdout without `--out`.
fn emit_report(out: Option<&Path>, value: &impl Serialize) -> Result<()> {
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
fn write_ready(out: &Path, value: &impl Serialize) -> Result<()> {
    write_json_atomic(&with_suffix(out, ".ready"), value)
}

/// `deadline` for a timeout in ms where 0 means "never".
fn deadline_after(timeout_ms: u64) -> Option<Instant> {
    (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms))
}

/// Waits until `fd` is readable (or has an error or hangup to report) or `deadline` passes.
/// Returns false at the deadline; also false when interrupted by a signal, so callers loop
/// until their deadline.
fn poll_readable(fd: RawFd, deadline: Option<Instant>) -> Result<bool> {
    let timeout_ms: libc::c_int = match deadline {
        None => -1,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            // Rounded up, so that a sub-millisecond remainder does not become a busy loop.
            left.as_nanos()
                .div_ceil(NS_PER_MS as u128)
                .min(i32::MAX as u128) as libc::c_int
        }
    };
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid, writable pollfd and the count passed is 1; poll only writes
    // its `revents`.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            return Ok(false);
        }
        bail!("poll: {err}");
    }
    Ok(rc > 0)
}

/// The result of an ioctl() that returns 0 or a new fd on success and -1 with errno on error.
fn ioctl_result(rc: libc::c_int, what: &str) -> Result<libc::c_int> {
    if rc < 0 {
        bail!("{what}: {}", io::Error::last_os_error());
    }
    Ok(rc)
}

/// Takes ownership of a file descriptor a syscall just returned.
fn owned_fd(fd: libc::c_int) -> OwnedFd {
    assert!(fd >= 0, "owned_fd({fd})");
    // SAFETY: the caller got `fd` from a successful syscall that created it, and nothing
    // else owns or closes it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A zero-initialised heap buffer whose address is a multiple of `align` (for O_DIRECT).
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> Result<Self> {
        let layout = Layout::from_size_align(len.max(1), align)
            .with_context(|| format!("bad buffer layout ({len} bytes, align {align})"))?;
        // SAFETY: `layout` has a non-zero size (at least 1 byte, see above).
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr)
            .with_context(|| format!("cannot allocate an aligned buffer of {len} bytes"))?;
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed) bytes owned by `self`,
        // borrowed immutably for as long as `self` is.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by alloc_zeroed with exactly this `layout` and is freed
        // only here.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

// ---------------------------------------------------------------------------------------------
// dio: direct block I/O
// ---------------------------------------------------------------------------------------------

const MIB: u64 = 1 << 20;
/// Alignment of the O_DIRECT buffer, offsets and sizes: the largest common logical block size.
const DIO_ALIGN: usize = 4096;

/// Every "name: value" line of /proc/self/io, in file order.
fn proc_self_io() -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string("/proc/self/io").context("read /proc/self/io")?;
    let mut map = serde_json::Map::new();
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value: u64 = value
            .trim()
            .parse()
            .with_context(|| format!("bad line in /proc/self/io: {line:?}"))?;
        map.insert(name.trim().to_string(), value.into());
    }
    for name in ["read_bytes", "write_bytes"] {
        if !map.contains_key(name) {
            bail!("no {name} in /proc/self/io (kernel without CONFIG_TASK_IO_ACCOUNTING?)");
        }
    }
    Ok(map)
}

/// Creates `path` with `bytes` of zeros (buffered writes), fsync()s it and drops its pages.
fn preallocate(path: &Path, bytes: u64) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let zeros = vec![0u8; MIB as usize];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(MIB) as usize;
        f.write_all(&zeros[..n])
            .with_context(|| format!("cannot preallocate {}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all()
        .with_context(|| format!("fsync {}", path.display()))?;
    // SAFETY: `f` is an open file descriptor; offset 0 with length 0 means the whole file.
    // posix_fadvise reads no memory.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!(
            "posix_fadvise(DONTNEED) {}: {}",
            path.display(),
            io::Error::from_raw_os_error(rc)
        );
    }
    Ok(())
}

fn cmd_dio(a: &DioArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        file: String,
        block_bytes: u64,
        prealloc_bytes: u64,
        write_bytes: u64,
        read_bytes: u64,
        write_calls: u64,
        read_calls: u64,
        write_ns: u64,
        fdatasync_ns: u64,
        read_ns: u64,
        proc_io_before: serde_json::Map<String, serde_json::Value>,
        proc_io_after: serde_json::Map<String, serde_json::Value>,
    }
    let write_bytes = a.write_mb * MIB;
    let read_bytes = a.read_mb * MIB;
    let block = a.block_kb * 1024;
    let prealloc_bytes = write_bytes.max(read_bytes);

    preallocate(&a.file, prealloc_bytes)?;
    if a.wait_signal {
        let out = a.out.as_deref().context("--wait-signal needs --out")?;
        ready_then_wait(out, a.timeout_ms)?;
    }
    thread::sleep(Duration::from_millis(a.start_delay_ms));

    // Everything the direct phase needs is set up before the first /proc/self/io reading.
    let mut buf = AlignedBuf::new(block as usize, DIO_ALIGN)?;
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 251) as u8 ^ 0xa5;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&a.file)
        .with_context(|| format!("cannot open {} with O_DIRECT", a.file.display()))?;

    let proc_io_before = proc_self_io()?;
    let start = Instant::now();
    let (mut off, mut write_calls) = (0u64, 0u64);
    while off < write_bytes {
        let n = (write_bytes - off).min(block) as usize;
        let done = file
            .write_at(&buf.as_slice()[..n], off)
            .with_context(|| format!("O_DIRECT pwrite of {n} bytes at offset {off}"))?;
        write_calls += 1;
        if done != n {
            bail!("short O_DIRECT write at offset {off}: {done} of {n} bytes");
        }
        off += n as u64;
    }
    let write_ns = start.elapsed().as_nanos() as u64;
    let start = Instant::now();
    file.sync_data()
        .with_context(|| format!("fdatasync {}", a.file.display()))?;
    let fdatasync_ns = start.elapsed().as_nanos() as u64;

    let start = Instant::now();
    let (mut off, mut read_calls) = (0u64, 0u64);
    while off < read_bytes {
        let n = (read_bytes - off).min(block) as usize;
        let done = file
            .read_at(&mut buf.as_mut_slice()[..n], off)
            .with_context(|| format!("O_DIRECT pread of {n} bytes at offset {off}"))?;
        read_calls += 1;
        if done != n {
            bail!("short O_DIRECT read at offset {off}: {done} of {n} bytes");
        }
        off += n as u64;
    }
    let read_ns = start.elapsed().as_nanos() as u64;
    let proc_io_after = proc_self_io()?;
    drop(file);

    let report = Report {
        kind: "dio",
        pid: std::process::id(),
        file: a.file.display().to_string(),
        block_bytes: block,
        prealloc_bytes,
        write_bytes,
        read_bytes,
        write_calls,
        read_calls,
        write_ns,
        fdatasync_ns,
        read_ns,
        proc_io_before,
        proc_io_after,
    };
    thread::sleep(Duration::from_millis(a.linger_ms));
    emit_report(a.out.as_deref(), &report)
}

// ---------------------------------------------------------------------------------------------
// tap and send-frames: Ethernet frames through a tap device
// ---------------------------------------------------------------------------------------------

/// IEEE 802 "local experimental ethertype 1": no protocol in the kernel handles it.
const ETHERTYPE_EXPERIMENTAL: u16 = 0x88b5;
/// Source MAC of frames the workload writes into its tap (the "guest" side).
const TAP_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// Source MAC of frames `send-frames` sends (the host side).
const HOST_SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// `struct ifreq` as TUNSETIFF uses it: the interface name, then `short ifr_flags` at the
/// start of the 24-byte union.
#[repr(C)]
struct IfreqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}
const _: () = assert!(std::mem::size_of::<IfreqFlags>() == 40);
const _: () = assert!(std::mem::size_of::<IfreqFlags>() == std::mem::size_of::<libc::ifreq>());
const _: () = assert!(std::mem::offset_of!(IfreqFlags, flags) == 16);
// _IOW('T', 202, int)
const _: () = assert!(libc::TUNSETIFF == 0x4004_54ca);

/// A broadcast frame of `size` bytes: header, the index `seq` (big-endian), zero padding.
fn ethernet_frame(src: [u8; 6], seq: u32, size: usize) -> Vec<u8> {
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ETHERTYPE_EXPERIMENTAL.to_be_bytes());
    set_frame_seq(&mut f, seq);
    f
}

/// Sets the frame index (the first 4 payload bytes, big-endian; it wraps after 2^32 frames).
fn set_frame_seq(frame: &mut [u8], seq: u32) {
    frame[14..18].copy_from_slice(&seq.to_be_bytes());
}

/// Opens /dev/net/tun and creates the (non-persistent) tap `name`; returns the fd and the
/// name the kernel gave the device.
fn create_tap(name: &str) -> Result<(std::fs::File, String)> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['\0', '/']) {
        bail!(
            "bad interface name {name:?} (1 to {} bytes, no '/')",
            libc::IFNAMSIZ - 1
        );
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("cannot open /dev/net/tun")?;
    let mut ifr = IfreqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    ifr.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; `ifr` has its exact size and layout
    // (checked above), is NUL-terminated in `name`, and outlives the call.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    ioctl_result(rc, &format!("TUNSETIFF (create tap {name})"))?;
    let len = ifr
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(ifr.name.len());
    Ok((tun, String::from_utf8_lossy(&ifr.name[..len]).into_owned()))
}

fn cmd_tap(a: &TapArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Ready<'a> {
        kind: &'static str,
        pid: u32,
        name: &'a str,
    }
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        name: String,
        frame_size: u64,
        frames_written: u64,
        bytes_written: u64,
        frames_read: u64,
        bytes_read: u64,
        /// Frames read, by ethertype ("0x88b5", "0x86dd", ...; "short" below 14 bytes).
        frames_read_by_ethertype: BTreeMap<String, u64>,
        read_timed_out: bool,
        write_ns: u64,
        read_ns: u64,
    }
    // Blocked before anything else, so that a SIGUSR1 sent as soon as the tap shows up stays
    // pending instead of killing the process.
    let sigset = if a.wait_signal {
        Some(block_sigusr1()?)
    } else {
        None
    };
    let (mut tap, name) = create_tap(&a.name)?;
    if let Some(set) = &sigset {
        write_ready(
            &a.out,
            &Ready {
                kind: "ready",
                pid: std::process::id(),
                name: &name,
            },
        )?;
        let timeout = (a.signal_timeout_ms > 0).then(|| Duration::from_millis(a.signal_timeout_ms));
        wait_for_sigusr1(set, timeout)?;
    }

    let start = Instant::now();
    let (mut frames_written, mut bytes_written) = (0u64, 0u64);
    let mut frame = ethernet_frame(TAP_SRC_MAC, 0, a.size as usize);
    for i in 0..a.frames {
        set_frame_seq(&mut frame, i as u32);
        let n = match tap.write(&frame) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                bail!("write frame {i} into tap {name}: {e} (is the interface up?)")
            }
            Err(e) => bail!("write frame {i} into tap {name}: {e}"),
        };
        if n != frame.len() {
            bail!(
                "short write of frame {i} into tap {name}: {n} of {} bytes",
                frame.len()
            );
        }
        frames_written += 1;
        bytes_written += n as u64;
    }
    let write_ns = start.elapsed().as_nanos() as u64;

    let start = Instant::now();
    let deadline = Some(start + Duration::from_millis(a.timeout_ms));
    let (mut frames_read, mut bytes_read) = (0u64, 0u64);
    let mut by_type = BTreeMap::new();
    let mut read_timed_out = false;
    let mut buf = vec![0u8; 65536];
    while frames_read < a.read_frames {
        if !poll_readable(tap.as_raw_fd(), deadline)? {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                read_timed_out = true;
                break;
            }
            continue;
        }
        let n = tap
            .read(&mut buf)
            .with_context(|| format!("read from tap {name}"))?;
        frames_read += 1;
        bytes_read += n as u64;
        let key = match buf[..n] {
            [_, _, _, _, _, _, _, _, _, _, _, _, hi, lo, ..] => {
                format!("{:#06x}", u16::from_be_bytes([hi, lo]))
            }
            _ => "short".to_string(),
        };
        *by_type.entry(key).or_insert(0u64) += 1;
    }
    let read_ns = start.elapsed().as_nanos() as u64;

    let report = Report {
        kind: "tap",
        pid: std::process::id(),
        name,
        frame_size: a.size,
        frames_written,
        bytes_written,
        frames_read,
        bytes_read,
        frames_read_by_ethertype: by_type,
        read_timed_out,
        write_ns,
        read_ns,
    };
    write_json_atomic(&a.out, &report)?;
    thread::sleep(Duration::from_millis(a.linger_ms));
    drop(tap);
    Ok(())
}

fn cmd_send_frames(a: &SendFramesArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        ifname: String,
        ifindex: u32,
        frame_size: u64,
        frames_sent: u64,
        bytes_sent: u64,
        send_calls: u64,
        wall_ns: u64,
    }
    let cname = std::ffi::CString::new(a.ifname.as_str())
        .with_context(|| format!("bad interface name {:?}", a.ifname))?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {}: {}", a.ifname, io::Error::last_os_error());
    }
    // Protocol 0: the socket can send but receives nothing.
    // SAFETY: plain socket() call with constant arguments; it touches no memory.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!(
            "socket(AF_PACKET, SOCK_RAW): {}",
            io::Error::last_os_error()
        );
    }
    let sock = owned_fd(fd);
    // SAFETY: sockaddr_ll is plain integers and byte arrays, for which all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as libc::c_ushort;
    sll.sll_protocol = 0;
    sll.sll_ifindex = ifindex as libc::c_int;
    // SAFETY: `sll` is an initialised sockaddr_ll and the length passed is exactly its size;
    // bind only reads it.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const sll).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "bind AF_PACKET socket to {}: {}",
            a.ifname,
            io::Error::last_os_error()
        );
    }

    let start = Instant::now();
    let (mut frames_sent, mut bytes_sent, mut send_calls) = (0u64, 0u64, 0u64);
    let mut frame = ethernet_frame(HOST_SRC_MAC, 0, a.size as usize);
    for i in 0..a.frames {
        if i > 0 && a.interval_us > 0 {
            thread::sleep(Duration::from_micros(a.interval_us));
        }
        set_frame_seq(&mut frame, i as u32);
        // SAFETY: `frame` is a valid buffer of exactly the length passed, outliving the call;
        // send only reads it.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                frame.as_ptr().cast::<libc::c_void>(),
                frame.len(),
                0,
            )
        };
        send_calls += 1;
        if n < 0 {
            let err = io::Error::last_os_error();
            bail!("send frame {i} on {}: {err}", a.ifname);
        }
        if n as usize != frame.len() {
            bail!(
                "short send of frame {i} on {}: {n} of {} bytes",
                a.ifname,
                frame.len()
            );
        }
        frames_sent += 1;
        bytes_sent += n as u64;
    }
    let wall_ns = start.elapsed().as_nanos() as u64;
    drop(sock);

    let report = Report {
        kind: "send-frames",
        pid: std::process::id(),
        ifname: a.ifname.clone(),
        ifindex,
        frame_size: a.size,
        frames_sent,
        bytes_sent,
        send_calls,
        wall_ns,
    };
    write_json_atomic(&a.out, &report)
}

// ---------------------------------------------------------------------------------------------
// kvm: a tiny real-mode guest
// ---------------------------------------------------------------------------------------------

/// The KVM user-space API for x86_64 (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/
/// kvm.h): only what `cmd_kvm` needs, with sizes and offsets checked against the UAPI.
mod kvm_sys {
    use libc::c_ulong;

    const KVMIO: u64 = 0xae;
    const IOC_NONE: u64 = 0;
    const IOC_WRITE: u64 = 1;
    const IOC_READ: u64 = 2;

    /// `_IOC(dir, KVMIO, nr, size)`.
    const fn ioc(dir: u64, nr: u64, size: usize) -> c_ulong {
        ((dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr) as c_ulong
    }

    pub const API_VERSION: i32 = 12;
    pub const KVM_GET_API_VERSION: c_ulong = ioc(IOC_NONE, 0x00, 0);
    pub const KVM_CREATE_VM: c_ulong = ioc(IOC_NONE, 0x01, 0);
    pub const KVM_GET_VCPU_MMAP_SIZE: c_ulong = ioc(IOC_NONE, 0x04, 0);
    pub const KVM_CREATE_VCPU: c_ulong = ioc(IOC_NONE, 0x41, 0);
    pub const KVM_SET_USER_MEMORY_REGION: c_ulong =
        ioc(IOC_WRITE, 0x46, size_of::<UserspaceMemoryRegion>());
    pub const KVM_SET_TSS_ADDR: c_ulong = ioc(IOC_NONE, 0x47, 0);
    pub const KVM_RUN: c_ulong = ioc(IOC_NONE, 0x80, 0);
    pub const KVM_GET_REGS: c_ulong = ioc(IOC_READ, 0x81, size_of::<Regs>());
    pub const KVM_SET_REGS: c_ulong = ioc(IOC_WRITE, 0x82, size_of::<Regs>());
    pub const KVM_GET_SREGS: c_ulong = ioc(IOC_READ, 0x83, size_of::<Sregs>());
    pub const KVM_SET_SREGS: c_ulong = ioc(IOC_WRITE, 0x84, size_of::<Sregs>());

    // The values <linux/kvm.h> gives on x86_64.
    const _: () = assert!(KVM_GET_API_VERSION == 0xae00);
    const _: () = assert!(KVM_CREATE_VM == 0xae01);
    const _: () = assert!(KVM_GET_VCPU_MMAP_SIZE == 0xae04);
    const _: () = assert!(KVM_CREATE_VCPU == 0xae41);
    const _: () = assert!(KVM_SET_USER_MEMORY_REGION == 0x4020_ae46);
    const _: () = assert!(KVM_SET_TSS_ADDR == 0xae47);
    const _: () = assert!(KVM_RUN == 0xae80);
    const _: () = assert!(KVM_GET_REGS == 0x8090_ae81);
    const _: () = assert!(KVM_SET_REGS == 0x4090_ae82);
    const _: () = assert!(KVM_GET_SREGS == 0x8138_ae83);
    const _: () = assert!(KVM_SET_SREGS == 0x4138_ae84);

    pub const KVM_EXIT_IO: u32 = 2;
    pub const KVM_EXIT_HLT: u32 = 5;
    pub const KVM_EXIT_FAIL_ENTRY: u32 = 9;
    pub const KVM_EXIT_INTR: u32 = 10;
    pub const KVM_EXIT_INTERNAL_ERROR: u32 = 17;
    pub const KVM_EXIT_IO_OUT: u8 = 1;

    /// Names of the exit reasons in <linux/kvm.h> (index = value); later ones print as
    /// numbers.
    #[rustfmt::skip]
    const EXIT_NAMES: [&str; 41] = [
        "UNKNOWN", "EXCEPTION", "IO", "HYPERCALL", "DEBUG", "HLT", "MMIO", "IRQ_WINDOW_OPEN",
        "SHUTDOWN", "FAIL_ENTRY", "INTR", "SET_TPR", "TPR_ACCESS", "S390_SIEIC", "S390_RESET",
        "DCR", "NMI", "INTERNAL_ERROR", "OSI", "PAPR_HCALL", "S390_UCONTROL", "WATCHDOG",
        "S390_TSCH", "EPR", "SYSTEM_EVENT", "S390_STSI", "IOAPIC_EOI", "HYPERV", "ARM_NISV",
        "X86_RDMSR", "X86_WRMSR", "DIRTY_RING_FULL", "AP_RESET_HOLD", "X86_BUS_LOCK", "XEN",
        "RISCV_SBI", "RISCV_CSR", "NOTIFY", "LOONGARCH_IOCSR", "MEMORY_FAULT", "TDX",
    ];

    pub fn exit_name(reason: u32) -> String {
        match EXIT_NAMES.get(reason as usize) {
            Some(name) => format!("KVM_EXIT_{name}"),
            None => format!("KVM_EXIT_{reason}"),
        }
    }

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug)]
    pub struct UserspaceMemoryRegion {
        pub slot: u32,
        pub flags: u32,
        pub guest_phys_addr: u64,
        pub memory_size: u64,
        pub userspace_addr: u64,
    }
    const _: () = assert!(size_of::<UserspaceMemoryRegion>() == 32);

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug)]
    pub struct Regs {
        pub rax: u64,
        pub rbx: u64,
        pub rcx: u64,
        pub rdx: u64,
        pub rsi: u64,
        pub rdi: u64,
        pub rsp: u64,
        pub rbp: u64,
        pub r8: u64,
        pub r9: u64,
        pub r10: u64,
        pub r11: u64,
        pub r12: u64,
        pub r13: u64,
        pub r14: u64,
        pub r15: u64,
        pub rip: u64,
        pub rflags: u64,
    }
    const _: () = assert!(size_of::<Regs>() == 144);

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug)]
    pub struct Segment {
        pub base: u64,
        pub limit: u32,
        pub selector: u16,
        pub type_: u8,
        pub present: u8,
        pub dpl: u8,
        pub db: u8,
        pub s: u8,
        pub l: u8,
        pub g: u8,
        pub avl: u8,
        pub unusable: u8,
        pub padding: u8,
    }
    const _: () = assert!(size_of::<Segment>() == 24);

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug)]
    pub struct Dtable {
        pub base: u64,
        pub limit: u16,
        pub padding: [u16; 3],
    }
    const _: () = assert!(size_of::<Dtable>() == 16);

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug)]
    pub struct Sregs {
        pub cs: Segment,
        pub ds: Segment,
        pub es: Segment,
        pub fs: Segment,
        pub gs: Segment,
        pub ss: Segment,
        pub tr: Segment,
        pub ldt: Segment,
        pub gdt: Dtable,
        pub idt: Dtable,
        pub cr0: u64,
        pub cr2: u64,
        pub cr3: u64,
        pub cr4: u64,
        pub cr8: u64,
        pub efer: u64,
        pub apic_base: u64,
        /// KVM_NR_INTERRUPTS (256) bits.
        pub interrupt_bitmap: [u64; 4],
    }
    const _: () = assert!(size_of::<Sregs>() == 312);
    const _: () = assert!(std::mem::offset_of!(Sregs, gdt) == 192);
    const _: () = assert!(std::mem::offset_of!(Sregs, cr0) == 224);

    /// The fixed head of `struct kvm_run` (the mmap()ed vCPU area); the exit union follows.
    #[repr(C)]
    pub struct RunHeader {
        pub request_interrupt_window: u8,
        pub immediate_exit: u8,
        pub padding1: [u8; 6],
        pub exit_reason: u32,
        pub ready_for_interrupt_injection: u8,
        pub if_flag: u8,
        pub flags: u16,
        pub cr8: u64,
        pub apic_base: u64,
    }
    const _: () = assert!(std::mem::offset_of!(RunHeader, exit_reason) == 8);
    const _: () = assert!(size_of::<RunHeader>() == 32);
    /// Offset of the exit union in `struct kvm_run`.
    pub const RUN_UNION_OFFSET: usize = 32;

    /// `kvm_run.io` (KVM_EXIT_IO); the data is at `data_offset` from the start of kvm_run.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct RunIo {
        pub direction: u8,
        pub size: u8,
        pub port: u16,
        pub count: u32,
        pub data_offset: u64,
    }
    const _: () = assert!(size_of::<RunIo>() == 16);

    /// `kvm_run.fail_entry` (KVM_EXIT_FAIL_ENTRY).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct RunFailEntry {
        pub hardware_entry_failure_reason: u64,
        pub cpu: u32,
    }

    /// The first field of `kvm_run.internal` (KVM_EXIT_INTERNAL_ERROR).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct RunInternal {
        pub suberror: u32,
    }
}

/// Guest physical address of the guest's memory, where its code starts.
const GUEST_BASE: u64 = 0x1000;
const GUEST_PAGES: usize = 2;
const GUEST_IO_PORT: u16 = 0x10;
const GUEST_AL: u8 = 0x2a;

/// The guest's 16-bit code: `io_exits` times `out 0x10, al`, then `hlt`.
fn guest_code(io_exits: u16) -> Vec<u8> {
    let [lo, hi] = io_exits.to_le_bytes();
    vec![
        0xb9,
        lo,
        hi, // 0: mov cx, imm16
        0xe3,
        0x05, // 3: jcxz +5 (to 10: hlt)
        0xe6,
        GUEST_IO_PORT as u8, // 5: out imm8, al
        0x49,                // 7: dec cx
        0x75,
        0xfb, // 8: jnz -5 (to 5: out)
        0xf4, // 10: hlt
    ]
}
/// Guest rip after the `hlt` (which is the last byte of the code).
const GUEST_RIP_AFTER_HLT: u64 = GUEST_BASE + 11;

/// An mmap()ed region, unmapped on drop.
struct Mapping {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

impl Mapping {
    /// mmap(NULL, len, PROT_READ|PROT_WRITE, flags, fd, 0).
    fn new(len: usize, flags: libc::c_int, fd: RawFd, what: &str) -> Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel chooses; nothing in this process
        // is overwritten. `fd` is -1 for anonymous mappings or an open fd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mmap {what} ({len} bytes): {}", io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr).context("mmap returned NULL")?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping made by `Mapping::new` and unmapped only here;
        // no references into it outlive `self`.
        unsafe { libc::munmap(self.ptr.as_ptr(), self.len) };
    }
}

/// Set by the SIGALRM handler when the guest's time is up.
static KVM_TIMED_OUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigalrm(_sig: libc::c_int) {
    KVM_TIMED_OUT.store(true, Ordering::SeqCst);
}

/// Arms ITIMER_REAL to raise SIGALRM after `after` and then every 100 ms (so a KVM_RUN entered
/// just after one signal is still interrupted by the next), with a handler installed without
/// SA_RESTART so that KVM_RUN returns EINTR. `None` disarms the timer.
fn kvm_alarm(after: Option<Duration>) -> Result<()> {
    if after.is_some() {
        // SAFETY: sigaction is plain data (a handler address, a sigset and flags), for which
        // all-zero is valid; the fields that matter are set below.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigalrm as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = 0;
        // SAFETY: `sa` is a valid sigaction whose handler only stores to an atomic (which is
        // async-signal-safe); a null old-action pointer is allowed.
        let rc = unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            bail!("sigaction(SIGALRM): {}", io::Error::last_os_error());
        }
    }
    let tv = |d: Duration| libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    let zero = Duration::ZERO;
    let timer = libc::itimerval {
        it_value: tv(after.map_or(zero, |d| d.max(Duration::from_micros(1)))),
        it_interval: tv(after.map_or(zero, |_| Duration::from_millis(100))),
    };
    // SAFETY: `timer` is a valid itimerval that outlives the call; a null old-value pointer is
    // allowed.
    let rc = unsafe { libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut()) };
    if rc != 0 {
        bail!("setitimer: {}", io::Error::last_os_error());
    }
    Ok(())
}

fn cmd_kvm(a: &KvmArgs) -> Result<()> {
    use kvm_sys::*;

    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        io_exits: u64,
        hlt_exits: u64,
        other_exits: BTreeMap<String, u64>,
        kvm_runs: u64,
        stop_reason: String,
        final_rip: Option<u64>,
        final_rcx: Option<u64>,
        vcpu_mmap_size: usize,
        run_ns: u64,
    }

    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("cannot open /dev/kvm")?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and touches no memory.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    let version = ioctl_result(version, "KVM_GET_API_VERSION")?;
    if version != API_VERSION {
        bail!("KVM API version {version}, expected {API_VERSION}");
    }
    // SAFETY: KVM_CREATE_VM takes the machine type (0: default) and touches no memory.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    let vm = owned_fd(ioctl_result(vm, "KVM_CREATE_VM")?);
    // Needed on Intel hosts without "unrestricted guest" to run real-mode code; harmless
    // elsewhere. Three pages just below 4 GiB, outside the guest's memory.
    // SAFETY: KVM_SET_TSS_ADDR takes a guest physical address by value; no memory is touched.
    let rc = unsafe {
        libc::ioctl(
            vm.as_raw_fd(),
            KVM_SET_TSS_ADDR,
            0xfffb_d000 as libc::c_ulong,
        )
    };
    ioctl_result(rc, "KVM_SET_TSS_ADDR")?;

    let mem_len = GUEST_PAGES * 4096;
    let mem = Mapping::new(
        mem_len,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        -1,
        "guest memory",
    )?;
    let code = guest_code(a.io_exits);
    // SAFETY: `mem` is a fresh, writable mapping of `mem_len` bytes, more than `code.len()`,
    // and nothing else refers to it yet.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), mem.ptr.as_ptr().cast::<u8>(), code.len())
    };
    let region = UserspaceMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: GUEST_BASE,
        memory_size: mem_len as u64,
        userspace_addr: mem.ptr.as_ptr() as u64,
    };
    // SAFETY: KVM_SET_USER_MEMORY_REGION reads a kvm_userspace_memory_region; `region` has
    // its exact layout (checked in kvm_sys) and outlives the call. The memory it names stays
    // mapped until after the VM fd is closed (`mem` is dropped after `vm`, see the end).
    let rc = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_SET_USER_MEMORY_REGION, &region) };
    ioctl_result(rc, "KVM_SET_USER_MEMORY_REGION")?;

    // SAFETY: KVM_GET_VCPU_MMAP_SIZE takes no argument and touches no memory.
    let run_size = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_VCPU_MMAP_SIZE, 0) };
    let run_size = ioctl_result(run_size, "KVM_GET_VCPU_MMAP_SIZE")? as usize;
    if run_size < RUN_UNION_OFFSET + 256 {
        bail!("KVM_GET_VCPU_MMAP_SIZE returned only {run_size} bytes");
    }
    // SAFETY: KVM_CREATE_VCPU takes the vCPU id by value and touches no memory.
    let vcpu = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CREATE_VCPU, 0) };
    let vcpu = owned_fd(ioctl_result(vcpu, "KVM_CREATE_VCPU")?);
    let run = Mapping::new(run_size, libc::MAP_SHARED, vcpu.as_raw_fd(), "kvm_run")?;
    let run_ptr = run.ptr.as_ptr().cast::<u8>();

    let mut sregs = Sregs::default();
    // SAFETY: KVM_GET_SREGS writes a kvm_sregs; `sregs` has its exact layout and outlives
    // the call.
    let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_SREGS, &mut sregs) };
    ioctl_result(rc, "KVM_GET_SREGS")?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    // SAFETY: KVM_SET_SREGS reads a kvm_sregs; `sregs` has its exact layout and outlives it.
    let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_SET_SREGS, &sregs) };
    ioctl_result(rc, "KVM_SET_SREGS")?;
    let regs = Regs {
        rip: GUEST_BASE,
        rax: GUEST_AL as u64,
        rflags: 0x2, // bit 1 is reserved and always set
        ..Regs::default()
    };
    // SAFETY: KVM_SET_REGS reads a kvm_regs; `regs` has its exact layout and outlives it.
    let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_SET_REGS, &regs) };
    ioctl_result(rc, "KVM_SET_REGS")?;

    let (mut io_exits, mut hlt_exits, mut kvm_runs) = (0u64, 0u64, 0u64);
    let mut other_exits: BTreeMap<String, u64> = BTreeMap::new();
    KVM_TIMED_OUT.store(false, Ordering::SeqCst);
    kvm_alarm(Some(Duration::from_millis(a.timeout_ms)))?;
    let start = Instant::now();
    let stop_reason: Result<String> = loop {
        if KVM_TIMED_OUT.load(Ordering::SeqCst) {
            break Ok(format!(
                "timeout: the guest did not halt within {} ms",
                a.timeout_ms
            ));
        }
        // SAFETY: KVM_RUN takes no argument; it writes only into the vCPU's kvm_run area,
        // which `run` keeps mapped.
        let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_RUN, 0) };
        kvm_runs += 1;
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                *other_exits.entry(exit_name(KVM_EXIT_INTR)).or_insert(0) += 1;
                continue;
            }
            break Err(anyhow!("KVM_RUN: {err}"));
        }
        // SAFETY: `run_ptr` points to the kvm_run area of `run_size` bytes (checked to be
        // larger than the header and the union read below), which the kernel updated before
        // KVM_RUN returned; volatile reads because the kernel, not Rust, writes it.
        let exit_reason = unsafe {
            std::ptr::read_volatile(&raw const (*run_ptr.cast::<RunHeader>()).exit_reason)
        };
        match exit_reason {
            KVM_EXIT_IO => {
                // SAFETY: as above; the io member of the union is at RUN_UNION_OFFSET.
                let io = unsafe {
                    std::ptr::read_volatile(run_ptr.add(RUN_UNION_OFFSET).cast::<RunIo>())
                };
                let data_end =
                    (io.data_offset as usize).saturating_add(io.size as usize * io.count as usize);
                let data = if io.size == 1 && io.count == 1 && data_end <= run_size {
                    // SAFETY: the byte at data_offset lies inside the kvm_run area (checked).
                    Some(unsafe { std::ptr::read_volatile(run_ptr.add(io.data_offset as usize)) })
                } else {
                    None
                };
                let expected = io.direction == KVM_EXIT_IO_OUT
                    && io.port == GUEST_IO_PORT
                    && data == Some(GUEST_AL);
                if !expected {
                    *other_exits.entry(exit_name(exit_reason)).or_insert(0) += 1;
                    break Ok(format!(
                        "unexpected KVM_EXIT_IO: direction {} port {:#x} size {} count {} data {:?}",
                        io.direction, io.port, io.size, io.count, data
                    ));
                }
                io_exits += 1;
            }
            KVM_EXIT_HLT => {
                hlt_exits += 1;
                break Ok("hlt".to_string());
            }
            other => {
                *other_exits.entry(exit_name(other)).or_insert(0) += 1;
                let detail = match other {
                    KVM_EXIT_FAIL_ENTRY => {
                        // SAFETY: as above; fail_entry is at RUN_UNION_OFFSET.
                        let f = unsafe {
                            std::ptr::read_volatile(
                                run_ptr.add(RUN_UNION_OFFSET).cast::<RunFailEntry>(),
                            )
                        };
                        format!(
                            " (hardware_entry_failure_reason {:#x})",
                            f.hardware_entry_failure_reason
                        )
                    }
                    KVM_EXIT_INTERNAL_ERROR => {
                        // SAFETY: as above; internal is at RUN_UNION_OFFSET.
                        let i = unsafe {
                            std::ptr::read_volatile(
                                run_ptr.add(RUN_UNION_OFFSET).cast::<RunInternal>(),
                            )
                        };
                        format!(" (suberror {})", i.suberror)
                    }
                    _ => String::new(),
                };
                break Ok(format!("unexpected exit {}{detail}", exit_name(other)));
            }
        }
    };
    let run_ns = start.elapsed().as_nanos() as u64;
    kvm_alarm(None)?;
    let stop_reason = stop_reason?;

    let mut regs = Regs::default();
    // SAFETY: KVM_GET_REGS writes a kvm_regs; `regs` has its exact layout and outlives it.
    let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_REGS, &mut regs) };
    let (final_rip, final_rcx) = match ioctl_result(rc, "KVM_GET_REGS") {
        Ok(_) => (Some(regs.rip), Some(regs.rcx)),
        Err(_) => (None, None),
    };
    // The vCPU and VM go before the memory they use.
    drop(run);
    drop(vcpu);
    drop(vm);
    drop(mem);

    let halted = stop_reason == "hlt";
    let report = Report {
        kind: "kvm",
        pid: std::process::id(),
        io_exits,
        hlt_exits,
        other_exits,
        kvm_runs,
        stop_reason: stop_reason.clone(),
        final_rip,
        final_rcx,
        vcpu_mmap_size: run_size,
        run_ns,
    };
    emit_report(a.out.as_deref(), &report)?;
    if !halted {
        bail!("guest stopped after {io_exits} I/O exits: {stop_reason}");
    }
    if final_rip != Some(GUEST_RIP_AFTER_HLT) || final_rcx.map(|c| c & 0xffff) != Some(0) {
        bail!(
            "guest halted in an unexpected state: rip {final_rip:#x?}, rcx {final_rcx:#x?} \
             (expected rip {GUEST_RIP_AFTER_HLT:#x}, cx 0)"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// sink: count received TCP or UDP bytes
// ---------------------------------------------------------------------------------------------

fn cmd_sink(a: &SinkArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Ready {
        kind: &'static str,
        pid: u32,
        port: u16,
    }
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        port: u16,
        protocol: &'static str,
        bytes: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        connections: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        datagrams: Option<u64>,
        read_calls: u64,
        elapsed_ns: u64,
        timed_out: bool,
    }
    let pid = std::process::id();
    let mut buf = vec![0u8; 65536];
    let (mut bytes, mut read_calls, mut count) = (0u64, 0u64, 0u64);
    let mut timed_out = false;
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;

    let port = if a.udp {
        let sock = std::net::UdpSocket::bind(("0.0.0.0", a.port))
            .with_context(|| format!("cannot bind UDP 0.0.0.0:{}", a.port))?;
        let port = sock.local_addr().context("getsockname")?.port();
        write_ready(
            &a.out,
            &Ready {
                kind: "ready",
                pid,
                port,
            },
        )?;
        let deadline = deadline_after(a.timeout_ms);
        while a.bytes.is_none_or(|b| bytes < b) {
            if !poll_readable(sock.as_raw_fd(), deadline)? {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    // The normal end without --bytes.
                    timed_out = a.bytes.is_some();
                    break;
                }
                continue;
            }
            let n = sock.recv(&mut buf).context("recv")?;
            read_calls += 1;
            let now = Instant::now();
            first.get_or_insert(now);
            last = Some(now);
            count += 1;
            bytes += n as u64;
        }
        port
    } else {
        let listener = std::net::TcpListener::bind(("0.0.0.0", a.port))
            .with_context(|| format!("cannot listen on TCP 0.0.0.0:{}", a.port))?;
        let port = listener.local_addr().context("getsockname")?.port();
        write_ready(
            &a.out,
            &Ready {
                kind: "ready",
                pid,
                port,
            },
        )?;
        let deadline = deadline_after(a.timeout_ms);
        let stream = loop {
            if poll_readable(listener.as_raw_fd(), deadline)? {
                break Some(listener.accept().context("accept")?.0);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break None;
            }
        };
        match stream {
            None => timed_out = true,
            Some(mut stream) => {
                count = 1;
                first = Some(Instant::now());
                loop {
                    if !poll_readable(stream.as_raw_fd(), deadline)? {
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            timed_out = true;
                            break;
                        }
                        continue;
                    }
                    let n = stream.read(&mut buf).context("read from TCP connection")?;
                    read_calls += 1;
                    last = Some(Instant::now());
                    if n == 0 {
                        break;
                    }
                    bytes += n as u64;
                }
            }
        }
        port
    };
    drop(buf);

    let elapsed_ns = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_nanos() as u64,
        _ => 0,
    };
    let report = Report {
        kind: "sink",
        pid,
        port,
        protocol: if a.udp { "udp" } else { "tcp" },
        bytes,
        connections: (!a.udp).then_some(count),
        datagrams: a.udp.then_some(count),
        read_calls,
        elapsed_ns,
        timed_out,
    };
    write_json_atomic(&a.out, &report)
}
