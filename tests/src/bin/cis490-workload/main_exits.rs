//! `main-exits`: the main thread exits alone; another thread ends the process.

use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use crate::PROG;
use crate::burn::burn_for_ns;
use crate::clock::{NS_PER_MS, process_cpu_ns};
use crate::report::{write_json_atomic, write_ready};
use crate::signals::{block_sigusr1, wait_for_sigusr1};

/// The main thread exits at once; another thread goes on, then ends the process.
///
/// The main thread blocks SIGUSR1, starts thread "survivor", then ends itself alone (the
/// raw exit syscall, not exit_group): the process lives on with a zombie main thread,
/// which is what /proc/PID/stat then shows (state Z). The survivor writes PATH.ready
/// ({"kind":"ready","pid"}), reads the process CPU clock, waits for SIGUSR1 (sent once a
/// tracer has attached; at most --wait-ms), reads it again, burns --burn-ms of its own
/// CPU clock, writes {"kind":"main-exits", "pid", "cpu_ns_before_wait",
/// "cpu_ns_before_burn", "process_cpu_ns"} to PATH and exits the process with code 0.
#[derive(Args, Debug)]
pub struct MainExitsArgs {
    /// How long to wait for SIGUSR1 before burning, in ms (an error after that).
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    wait_ms: u64,
    /// CPU time the survivor burns, in ms of its own thread CPU clock.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    burn_ms: u64,
    /// Where to write the JSON report; the ready file is PATH.ready.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

pub fn cmd_main_exits(a: &MainExitsArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        cpu_ns_before_wait: u64,
        cpu_ns_before_burn: u64,
        process_cpu_ns: u64,
    }
    let (wait, burn_ns, out) = (a.wait_ms, a.burn_ms * NS_PER_MS, a.out.clone());
    // Blocked before the survivor starts, so it inherits the mask: a
    // process-directed SIGUSR1 then stays pending until it collects it.
    let set = block_sigusr1()?;
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
                let before_wait = process_cpu_ns();
                wait_for_sigusr1(&set, Some(Duration::from_millis(wait)))?;
                let before = process_cpu_ns();
                burn_for_ns(burn_ns);
                write_json_atomic(
                    &out,
                    &Report {
                        kind: "main-exits",
                        pid,
                        cpu_ns_before_wait: before_wait,
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
