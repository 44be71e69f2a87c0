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
//!
//! Each subcommand is one module named after it (`storm.rs` for `storm`, `send_frames.rs` for
//! `send-frames`), holding its arguments (whose doc comment is its `--help`) and its `cmd_*`
//! function; the pieces several subcommands share are in small modules named for what they
//! hold (`clock`, `signals`, `affinity`, `burn`, `threads`, `phases`, `report`, `held`,
//! `fdutil`, `frames`).

use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{Parser, Subcommand};

mod affinity;
mod blkdev;
mod burn;
mod churn;
mod clock;
mod cpu;
mod demo;
mod dio;
mod exec;
mod exit_after;
mod faults;
mod fdutil;
mod frames;
mod held;
mod io_uring;
mod kvm;
mod main_exits;
mod phases;
mod pingpong;
mod report;
mod send_frames;
mod signals;
mod sink;
mod spin;
mod storm;
mod tap;
mod thread_burst;
mod threads;
mod wait_signal;
mod wakeburn;
mod wakeups;

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

/// The subcommands; each one's `--help` is the doc comment of its arguments struct.
#[derive(Subcommand, Debug)]
enum Command {
    Cpu(cpu::CpuArgs),
    Pingpong(pingpong::PingpongArgs),
    ExitAfter(exit_after::ExitAfterArgs),
    WaitSignal(wait_signal::WaitSignalArgs),
    Demo(demo::DemoArgs),
    ThreadBurst(thread_burst::ThreadBurstArgs),
    Dio(dio::DioArgs),
    Blkdev(blkdev::BlkdevArgs),
    Tap(tap::TapArgs),
    SendFrames(send_frames::SendFramesArgs),
    Kvm(kvm::KvmArgs),
    Sink(sink::SinkArgs),
    MainExits(main_exits::MainExitsArgs),
    Exec(exec::ExecArgs),
    Storm(storm::StormArgs),
    Wakeburn(wakeburn::WakeburnArgs),
    Faults(faults::FaultsArgs),
    IoUring(io_uring::IoUringArgs),
    Wakeups(wakeups::WakeupsArgs),
    Spin(spin::SpinArgs),
    Churn(churn::ChurnArgs),
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
                 blkdev, tap, send-frames, kvm, sink, exec, main-exits, storm, wakeburn, faults, io-uring, wakeups, spin or churn)".to_string()
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
        Command::Cpu(a) => cpu::cmd_cpu(&a),
        Command::Pingpong(a) => pingpong::cmd_pingpong(&a),
        Command::ExitAfter(a) => exit_after::cmd_exit_after(&a),
        Command::WaitSignal(a) => wait_signal::cmd_wait_signal(&a),
        Command::Demo(a) => demo::cmd_demo(&a),
        Command::ThreadBurst(a) => thread_burst::cmd_thread_burst(&a),
        Command::Dio(a) => dio::cmd_dio(&a),
        Command::Blkdev(a) => blkdev::cmd_blkdev(&a),
        Command::Tap(a) => tap::cmd_tap(&a),
        Command::SendFrames(a) => send_frames::cmd_send_frames(&a),
        Command::Kvm(a) => kvm::cmd_kvm(&a),
        Command::Sink(a) => sink::cmd_sink(&a),
        Command::Exec(a) => exec::cmd_exec(&a),
        Command::MainExits(a) => main_exits::cmd_main_exits(&a),
        Command::Storm(a) => storm::cmd_storm(&a),
        Command::Wakeburn(a) => wakeburn::cmd_wakeburn(&a),
        Command::Faults(a) => faults::cmd_faults(&a),
        Command::IoUring(a) => io_uring::cmd_io_uring(&a),
        Command::Wakeups(a) => wakeups::cmd_wakeups(&a),
        Command::Spin(a) => spin::cmd_spin(&a),
        Command::Churn(a) => churn::cmd_churn(&a),
    };
    let result = result.and_then(|()| match &exit_stamp {
        Some(path) => report::write_exit_stamp(path),
        None => Ok(()),
    });
    if let Err(e) = result {
        eprintln!("{PROG}: error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(2);
    }
}
