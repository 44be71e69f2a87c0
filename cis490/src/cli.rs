//! Command-line interface.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{row::SourceKind, trace::TraceConfig};

#[derive(Debug, Parser)]
#[command(
    name = "cis490",
    version,
    about = "Host-side eBPF tracer for QEMU virtual machines",
    long_about = "cis490 traces one process (a QEMU VM, or any process) from the host with eBPF \
                  programs on scheduler tracepoints, beside a /proc poller (the oracle), and writes \
                  an episode directory of JSONL rows that share one schema and one clock, so the \
                  sources join row by row. Loading eBPF needs root (CAP_BPF + CAP_PERFMON)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace a process and write an episode directory.
    #[command(
        long_about = "Trace a process and write an episode directory DATA/episodes/<ULID>/ with \
                      meta.json, events.jsonl, labels.jsonl, telemetry-<source>.jsonl and, last, \
                      done.marker. The last line on stdout is the episode directory.\n\n\
                      Examples:\n  sudo cis490 trace --target-pid 1234 --duration 60\n  \
                      sudo cis490 trace --interval-ms 10 -- qemu-system-x86_64 ...",
        after_help = "Tracing stops when the target exits, at --duration, or on SIGINT/SIGTERM. \
                      A command started with -- that is still running then gets SIGTERM \
                      (SIGKILL 5 s later)."
    )]
    Trace(TraceArgs),
    /// Print per-source totals of an episode, side by side.
    #[command(
        long_about = "Print per-source totals of an episode, side by side: each field summed \
                      over the rows, except levels (threads: the maximum) and maxima (*_max_ns); \
                      a histogram shows its number of samples; `-` (JSON null) where a source \
                      does not measure the field.\n\n\
                      Examples:\n  cis490 summary data/episodes/01M8...\n  \
                      cis490 summary --json data/episodes/01M8... | jq '.sources[].totals.cpu_ns'"
    )]
    Summary(SummaryCmdArgs),
    /// Validate an episode: complete, every row to the schema, buckets
    /// aligned across sources, sources agreeing on shared totals. Exits
    /// non-zero with the problems found.
    Check(SummaryArgs),
    /// Write a self-contained HTML page of an episode: every source over
    /// time, the phases, the losses, the totals and the events.
    #[command(
        long_about = "Write one self-contained HTML file (no scripts, no network, no external \
                      fonts: it opens from a file or an e-mail attachment) showing an episode: \
                      a header (target, host, kernel, duration, sources, probe paths and \
                      `cis490 check`'s verdict), one SVG time-series chart per field group \
                      with each source as a line on a shared time axis, the phases of \
                      labels.jsonl as shaded bands, buckets with dropped records or merged \
                      intervals marked, the log2 histograms as heat-maps, the totals table of \
                      `cis490 summary` and a timeline of threads and QEMU events.\n\n\
                      Charts keep the minimum and the maximum of every pixel column, so no \
                      spike is lost however long the episode; the page stays under 8 MiB \
                      whatever the episode's length (an hour at 1 ms buckets included).\n\n\
                      Examples:\n  cis490 report data/episodes/01M8...\n  \
                      cis490 report data/episodes/01M8... -o /tmp/vm.html"
    )]
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Trace this running process (all its threads, including new ones).
    #[arg(long, value_name = "PID", conflicts_with = "command")]
    pub target_pid: Option<i32>,

    /// Stop after this many seconds (fractions allowed).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub duration: Option<Duration>,

    /// Bucket width: one row per source every MS milliseconds (>= 1).
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub interval_ms: u64,

    /// Directory that receives episodes/<ULID>/.
    #[arg(long, value_name = "DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// Sources to record, comma-separated: ebpf, proc, perf (qmp is added
    /// by --qmp).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "ebpf,proc,perf"
    )]
    pub sources: Vec<SourceKind>,

    /// Kernel BTF to read task_struct offsets and tracepoints from.
    #[arg(long, value_name = "PATH", default_value = "/sys/kernel/btf/vmlinux")]
    pub btf: PathBuf,

    /// Block tracepoints: block_io_start/done (Linux 6.5+), the older
    /// block_rq_insert/issue/complete, or auto (the first this kernel has).
    #[arg(long, value_name = "PATH", value_enum, default_value = "auto")]
    pub block_probes: crate::probes::block::PathChoice,

    /// Mark a phase NAME at SECS seconds after tracing starts, in labels.jsonl
    /// (repeatable; e.g. --label boot@0 --label detonate@30).
    #[arg(long = "label", value_name = "NAME@SECS", value_parser = crate::control::parse_label_at)]
    pub labels: Vec<(String, Duration)>,

    /// Also record QEMU's own statistics from its QMP unix socket (QEMU's
    /// `-qmp unix:PATH,server=on,wait=off`): rows in telemetry-qmp.jsonl,
    /// QMP events (STOP, RESUME, SHUTDOWN, BLOCK_IO_ERROR...) in
    /// events.jsonl. A socket that is not there or not answering yet (QEMU
    /// starting) is retried every bucket for 30 s.
    #[arg(long, value_name = "SOCKET")]
    pub qmp: Option<PathBuf>,

    /// Listen on this unix socket for live commands, one per line:
    /// `label NAME` (mark a phase now), `ping`, `stop` (end tracing).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Size of the ring buffer that carries thread lifecycle records to
    /// events.jsonl, in KiB: a power of two, at least the page size (4).
    /// Rows never depend on it; a record that does not fit is counted in
    /// `dropped_events`.
    #[arg(long, value_name = "KIB", default_value_t = cis490_common::RINGBUF_BYTES / 1024,
          value_parser = parse_ringbuf_kib)]
    pub ringbuf_kib: u32,

    /// Log progress to stderr every SECS seconds (0: never).
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs_or_zero)]
    pub progress_secs: Duration,

    /// Command to start and trace from its first instruction (after --).
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct SummaryArgs {
    /// An episode directory (as printed by `cis490 trace`).
    pub episode: PathBuf,
}

#[derive(Debug, Args)]
pub struct SummaryCmdArgs {
    /// An episode directory (as printed by `cis490 trace`).
    pub episode: PathBuf,

    /// Print the totals as one JSON document (for scripts) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// An episode directory (as printed by `cis490 trace`).
    pub episode: PathBuf,

    /// Where to write the page (default: EPISODE/report.html).
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

fn parse_secs_or_zero(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("'{s}' must be zero or more seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn parse_ringbuf_kib(s: &str) -> Result<u32, String> {
    let kib: u32 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number of KiB"))?;
    // SAFETY: sysconf has no preconditions.
    let page_kib = (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) / 1024) as u32;
    if !kib.is_power_of_two() || kib < page_kib || kib > 1 << 20 {
        return Err(format!(
            "must be a power of two from {page_kib} (the page size) to 1048576 KiB"
        ));
    }
    Ok(kib)
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let d = parse_secs_or_zero(s)?;
    if d.is_zero() {
        return Err("must be more than 0 seconds".into());
    }
    Ok(d)
}

impl TraceArgs {
    pub fn into_config(self, argv: Vec<String>) -> TraceConfig {
        TraceConfig {
            target_pid: self.target_pid,
            command: self.command,
            duration: self.duration,
            interval: Duration::from_millis(self.interval_ms),
            data_dir: self.data_dir,
            sources: self.sources,
            btf: self.btf,
            progress: (!self.progress_secs.is_zero()).then_some(self.progress_secs),
            probe_options: crate::probes::Options {
                block: self.block_probes,
                ringbuf_bytes: self.ringbuf_kib * 1024,
            },
            labels: self.labels,
            control: self.control,
            qmp: self.qmp,
            argv,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("cis490").chain(args.iter().copied()))
    }

    #[test]
    fn trace_defaults() {
        let Command::Trace(t) = parse(&["trace", "--target-pid", "7"]).unwrap().command else {
            panic!()
        };
        assert_eq!(t.target_pid, Some(7));
        assert_eq!(t.interval_ms, 100);
        assert_eq!(
            t.sources,
            [SourceKind::Ebpf, SourceKind::Proc, SourceKind::Perf]
        );
        assert_eq!(t.data_dir, PathBuf::from("data"));
    }

    #[test]
    fn command_after_double_dash() {
        let Command::Trace(t) = parse(&["trace", "--duration", "1.5", "--", "sleep", "-x", "3"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!(t.command, ["sleep", "-x", "3"]);
        assert_eq!(t.duration, Some(Duration::from_millis(1500)));
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(parse(&["trace", "--duration", "0", "--", "true"]).is_err());
        assert!(parse(&["trace", "--duration", "-1", "--", "true"]).is_err());
        assert!(parse(&["trace", "--sources", "ebpf,nope", "--", "true"]).is_err());
        assert!(parse(&["trace", "--target-pid", "1", "--", "true"]).is_err());
    }
}
