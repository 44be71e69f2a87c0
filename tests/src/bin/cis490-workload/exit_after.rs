//! `exit-after`: sleeper threads still running when the process exits.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use crate::clock::{gettid, sleep_until};
use crate::report::write_json_atomic;

/// Start N sleeper threads, then exit the whole process after T ms.
///
/// Each thread (sleeper-0..) loops forever sleeping 1 ms. After --ms T (counted from just
/// before the threads are started) the main thread writes {"kind":"exit-after", "pid",
/// "ms", "threads", "tids", "sleeps"} and calls exit(0) while the sleepers are still
/// running; "sleeps" counts the 1 ms sleeps the sleepers had finished by then (each
/// ended in a wakeup).
#[derive(Args, Debug)]
pub struct ExitAfterArgs {
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

pub fn cmd_exit_after(a: &ExitAfterArgs) -> Result<()> {
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
