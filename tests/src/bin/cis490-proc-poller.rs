//! `cis490-proc-poller`: a plain /proc poller, the peer `cargo xtask bench`
//! compares cis490 with (the lab's original way of watching a VM).
//!
//! Every `--interval-ms` (on a fixed grid) it reads what the lab's poller
//! read about one process: `/proc/PID/stat` (CPU time, threads, page
//! faults), every thread's `status` (context switches) and `schedstat` (CPU
//! and run-queue delay), `/proc/PID/io` and `/proc/PID/net/dev`, and writes
//! one JSON line of totals and per-bucket deltas to `--out`. It writes
//! `OUT.ready` after its first sample and stops when the process is gone.
//!
//! Errors are one line on stderr and exit code 2.

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use clap::Parser;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "cis490-proc-poller",
    about = "Poll /proc for one process at a fixed interval and write JSONL rows (the /proc peer of cargo xtask bench)"
)]
struct Cli {
    /// The process to watch.
    #[arg(long, value_name = "PID")]
    pid: i32,
    /// Bucket width in ms.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    interval_ms: u64,
    /// JSONL output; OUT.ready is written after the first sample.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

/// Cumulative counters of the process at one poll.
#[derive(Default, Clone, Copy)]
struct Sample {
    cpu_ticks: u64,
    threads: u64,
    minflt: u64,
    majflt: u64,
    voluntary: u64,
    involuntary: u64,
    runtime_ns: u64,
    run_delay_ns: u64,
    read_bytes: u64,
    write_bytes: u64,
    net_rx_bytes: u64,
    net_tx_bytes: u64,
}

/// Reads a sample; `None` once the process is gone.
fn sample(pid: i32, buf: &mut String, dead: &mut HashMap<u32, [u64; 4]>) -> Option<Sample> {
    let mut s = Sample::default();
    let read = |path: &str, buf: &mut String| -> bool {
        buf.clear();
        fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_to_string(&mut f, buf))
            .is_ok()
    };
    if !read(&format!("/proc/{pid}/stat"), buf) {
        return None;
    }
    let after = &buf[buf.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields from 3 (state) on: minflt 10, majflt 12, utime 14, stime 15, num_threads 20.
    let n = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    s.minflt = n(10);
    s.majflt = n(12);
    s.cpu_ticks = n(14) + n(15);
    s.threads = n(20);
    // Per thread: switches and schedstat; a thread that exited keeps its last counts.
    let mut seen: HashMap<u32, [u64; 4]> = HashMap::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let mut c = [0u64; 4];
            if read(&format!("/proc/{pid}/task/{tid}/status"), buf) {
                for l in buf.lines() {
                    if let Some(v) = l.strip_prefix("voluntary_ctxt_switches:") {
                        c[0] = v.trim().parse().unwrap_or(0);
                    } else if let Some(v) = l.strip_prefix("nonvoluntary_ctxt_switches:") {
                        c[1] = v.trim().parse().unwrap_or(0);
                    }
                }
            }
            if read(&format!("/proc/{pid}/task/{tid}/schedstat"), buf) {
                let mut it = buf
                    .split_whitespace()
                    .map(|v| v.parse::<u64>().unwrap_or(0));
                c[2] = it.next().unwrap_or(0);
                c[3] = it.next().unwrap_or(0);
            }
            seen.insert(tid, c);
        }
    }
    for (tid, c) in &seen {
        dead.insert(*tid, *c);
    }
    for c in dead.values() {
        s.voluntary += c[0];
        s.involuntary += c[1];
        s.runtime_ns += c[2];
        s.run_delay_ns += c[3];
    }
    if read(&format!("/proc/{pid}/io"), buf) {
        for l in buf.lines() {
            if let Some(v) = l.strip_prefix("read_bytes:") {
                s.read_bytes = v.trim().parse().unwrap_or(0);
            } else if let Some(v) = l.strip_prefix("write_bytes:") {
                s.write_bytes = v.trim().parse().unwrap_or(0);
            }
        }
    }
    if read(&format!("/proc/{pid}/net/dev"), buf) {
        for l in buf.lines().skip(2) {
            let Some((name, rest)) = l.split_once(':') else {
                continue;
            };
            if name.trim() == "lo" {
                continue;
            }
            let v: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            s.net_rx_bytes += v.first().copied().unwrap_or(0);
            s.net_tx_bytes += v.get(8).copied().unwrap_or(0);
        }
    }
    Some(s)
}

fn run(cli: &Cli) -> Result<()> {
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut buf = String::new();
    let mut dead = HashMap::new();
    let mut out = std::io::BufWriter::new(
        fs::File::create(&cli.out)
            .with_context(|| format!("cannot create {}", cli.out.display()))?,
    );
    let mut prev =
        sample(cli.pid, &mut buf, &mut dead).with_context(|| format!("no process {}", cli.pid))?;
    let mut ready = cli.out.clone().into_os_string();
    ready.push(".ready");
    fs::write(
        &ready,
        format!("{{\"kind\":\"ready\",\"pid\":{}}}\n", std::process::id()),
    )
    .context("cannot write the ready file")?;
    let interval = Duration::from_millis(cli.interval_ms.max(1));
    let start = Instant::now();
    for seq in 0u64.. {
        let deadline = start + interval * (seq as u32 + 1);
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        let Some(s) = sample(cli.pid, &mut buf, &mut dead) else {
            break;
        };
        let row = json!({
            "seq": seq,
            "t_ns": start.elapsed().as_nanos() as u64,
            "cpu_ns": (s.cpu_ticks - prev.cpu_ticks.min(s.cpu_ticks)) * 1_000_000_000 / tck,
            "threads": s.threads,
            "ctx_switches_voluntary": s.voluntary.saturating_sub(prev.voluntary),
            "ctx_switches_involuntary": s.involuntary.saturating_sub(prev.involuntary),
            "runq_delay_ns": s.run_delay_ns.saturating_sub(prev.run_delay_ns),
            "sched_runtime_ns": s.runtime_ns.saturating_sub(prev.runtime_ns),
            "minflt": s.minflt.saturating_sub(prev.minflt),
            "majflt": s.majflt.saturating_sub(prev.majflt),
            "blk_read_bytes": s.read_bytes.saturating_sub(prev.read_bytes),
            "blk_write_bytes": s.write_bytes.saturating_sub(prev.write_bytes),
            "net_rx_bytes": s.net_rx_bytes.saturating_sub(prev.net_rx_bytes),
            "net_tx_bytes": s.net_tx_bytes.saturating_sub(prev.net_tx_bytes),
        });
        serde_json::to_writer(&mut out, &row)?;
        out.write_all(b"\n")?;
        prev = s;
    }
    out.flush()?;
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!(
            "cis490-proc-poller: error: {}",
            format!("{e:#}").replace('\n', " ")
        );
        std::process::exit(2);
    }
}
