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

// Parsed once per run: the size of the trace variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace a process and write an episode directory.
    #[command(
        long_about = "Trace a process and write an episode directory DATA/episodes/<ULID>/ with \
                      meta.json, events.jsonl, labels.jsonl, telemetry-<source>.jsonl and, last, \
                      done.marker. The last line on stdout is the episode directory.\n\n\
                      Examples:\n  sudo cis490 trace --target-pid 1234 --duration 60\n  \
                      sudo cis490 trace --interval-ms 10 -- qemu-system-x86_64 ...\n  \
                      sudo cis490 trace --gateway-if br-malware --gateway-pcap -- qemu-system-x86_64 \
                      -nic tap,mac=52:54:00:12:34:56 ...",
        after_help = "Tracing stops when the target exits, at --duration, or on SIGINT/SIGTERM. \
                      A command started with -- that is still running then gets SIGTERM \
                      (SIGKILL 5 s later)."
    )]
    Trace(TraceArgs),
    /// Load the probes once and run many episodes, one per `cis490 trace
    /// --server` client.
    #[command(
        long_about = "Load and attach the eBPF programs once, then run any number of episodes \
                      at once, each for its own target, one per client (`cis490 trace --server \
                      SOCKET ...`). One set of programs serves every VM of the host: a context \
                      switch that involves no target costs the same whatever the number of \
                      targets, where every standalone tracer adds its own programs to every \
                      switch of the machine.\n\n\
                      A client behaves like the standalone command for its caller: the same \
                      options, the same episode, the episode directory as the last line on \
                      stdout, the same exit statuses; SIGINT/SIGTERM to it finish its episode \
                      only, and one that dies (SIGKILL) ends its episode with end_reason \
                      client_gone. Paths a client gives are its own (relative to its working \
                      directory). The load-time options (--block-probes, --wakeups, \
                      --ringbuf-kib, --btf) are the server's: a client asking for others gets an \
                      error. --gateway-if attaches the gateway's classifiers for that episode \
                      alone.\n\n\
                      SIGINT/SIGTERM to the server finish every running episode (done.marker), \
                      then detach everything. The control socket is mode 0600, and only root or \
                      the server's user may use it.\n\n\
                      Examples:\n  \
                      sudo cis490 serve --control /run/cis490.sock --max-targets 64 &\n  \
                      sudo cis490 trace --server /run/cis490.sock --duration 60 --target-pid 1234\n  \
                      sudo cis490 trace --server /run/cis490.sock --qmp /run/vm3.qmp -- \
                      qemu-system-x86_64 ..."
    )]
    Serve(ServeArgs),
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
    /// Convert complete episodes into a Hive-partitioned Parquet dataset.
    #[command(
        long_about = "Convert complete episodes (done.marker present) into a Hive-partitioned \
                      Parquet dataset under DIR: telemetry/source=S/date=YYYY-MM-DD/host=H/<episode>.parquet \
                      (one schema per table for every episode), the keyed objects as long side \
                      tables (net_by_if/, blk_by_dev/, kvm_exit_reasons/, \
                      kvm_userspace_exit_reasons/), and episodes/, events/, labels/ \
                      (docs/data-model.md, \"The Parquet dataset\"). Needs no privileges. Every \
                      episode is checked first: one that is not complete fails the command \
                      before anything is written. The same episode always gives the same bytes, \
                      so exporting again changes nothing.\n\n\
                      Examples:\n  cis490 export data/episodes/01J... --to dataset\n  \
                      cis490 export data/episodes/* --to /srv/lab/dataset"
    )]
    Export(ExportArgs),
    /// Export and upload every complete episode not shipped yet (S3 or a
    /// directory), verified, resumable.
    #[command(
        long_about = "Export every complete episode of DATA/episodes/ that is not shipped yet and \
                      upload its files to s3://BUCKET/PREFIX (or copy them to a directory): each \
                      object is read back and its SHA-256 compared, then the episode's manifest \
                      PREFIX/manifests/<episode>.json is written last. An episode is shipped \
                      when its manifest exists: readers go by the manifests. A run that was \
                      killed is resumed by running it again. Incomplete episodes (no \
                      done.marker) are skipped. Credentials: AWS_ACCESS_KEY_ID, \
                      AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION (or the profile \
                      AWS_PROFILE / default of ~/.aws/credentials and ~/.aws/config).\n\n\
                      Examples:\n  cis490 ship --data-dir data --to s3://lab-telemetry/v1\n  \
                      cis490 ship --to s3://lab/v1 --endpoint http://127.0.0.1:9000 --delete-local\n  \
                      cis490 ship --data-dir data --to /mnt/nas/dataset"
    )]
    Ship(ShipArgs),
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
pub struct ExportArgs {
    /// Episode directories (as printed by `cis490 trace`).
    #[arg(required = true, value_name = "EPISODE_DIR")]
    pub episodes: Vec<PathBuf>,

    /// Root directory of the dataset (created if missing).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
}

#[derive(Debug, Args)]
pub struct ShipArgs {
    /// Directory holding episodes/<ULID>/ (as given to `cis490 trace`).
    #[arg(long, value_name = "DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// s3://BUCKET/PREFIX, or a directory.
    #[arg(long, value_name = "URL")]
    pub to: crate::dataset::ship::Destination,

    /// S3 endpoint URL (an S3-compatible store: MinIO, Ceph...); plain
    /// http:// is allowed here. Default: AWS (or AWS_ENDPOINT).
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,

    /// Delete each local episode once its upload is verified.
    #[arg(long)]
    pub delete_local: bool,
}

/// The options that choose and load the programs: a standalone trace's
/// own, a server's for every episode it runs (a served episode may repeat
/// them, not change them).
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Count the wakeups of the target's threads (the eBPF source's
    /// `wakeups` field, null without this). It runs one more program on
    /// every wakeup of the machine, whatever the process: on a pinned
    /// context-switch storm here the traced process spent 8.2% more CPU
    /// time with it, 5.2% without (medians of 7 rounds, each spread over
    /// several points; docs/benchmarks.md), and the BPF programs took 5.00%
    /// of its CPU with it, 2.74% without.
    /// Kernels without
    /// `sched_info` run that program anyway (their run-queue delays are
    /// timed from the wakeup) and count wakeups without being asked.
    #[arg(long)]
    pub wakeups: bool,

    /// Kernel BTF to read task_struct offsets and tracepoints from.
    #[arg(long, value_name = "PATH", default_value = "/sys/kernel/btf/vmlinux")]
    pub btf: PathBuf,

    /// Block tracepoints: block_io_start/done (Linux 6.5+), the older
    /// block_rq_insert/issue/complete, or auto (the first this kernel has).
    #[arg(long, value_name = "PATH", value_enum, default_value = "auto")]
    pub block_probes: crate::ebpf::BlockPathChoice,
}

impl ProbeArgs {
    /// The probes' options, with the ring buffer's size and the number of
    /// target slots.
    pub fn options(&self, ringbuf_kib: u32, counters: bool, targets: u32) -> crate::ebpf::Options {
        crate::ebpf::Options {
            block: self.block_probes,
            ringbuf_bytes: ringbuf_kib * 1024,
            counters,
            wakeups: self.wakeups,
            targets,
        }
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The unix socket clients connect to (`cis490 trace --server SOCKET`);
    /// created mode 0600, replacing a socket left by an earlier server.
    #[arg(long, value_name = "SOCKET")]
    pub control: PathBuf,

    /// Where episodes go when a client gives no --data-dir
    /// (DIR/episodes/<ULID>/).
    #[arg(long, value_name = "DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// The most targets traced at once; a client beyond them gets an error.
    /// The kernel side keeps per-CPU counters for each (see the README).
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=cis490_common::target::MAX_TARGETS as i64))]
    pub max_targets: u32,

    #[command(flatten)]
    pub probes: ProbeArgs,

    /// Size of the lifecycle-record ring buffer shared by every episode, in
    /// KiB (a power of two, at least the page size).
    #[arg(long, value_name = "KIB", default_value_t = 4 * cis490_common::RINGBUF_BYTES / 1024,
          value_parser = parse_ringbuf_kib)]
    pub ringbuf_kib: u32,
}

impl ServeArgs {
    /// The probes' options for every episode.
    pub fn probe_options(&self) -> crate::ebpf::Options {
        self.probes
            .options(self.ringbuf_kib, true, self.max_targets)
    }
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Run the episode through a server (`cis490 serve --control SOCKET`),
    /// which has the probes loaded once for every VM of the host; for the
    /// caller it behaves as without.
    #[arg(long, value_name = "SOCKET")]
    pub server: Option<PathBuf>,

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
    /// by --qmp, gateway by --gateway-if). The default is ebpf and proc.
    /// Given more than once, the sources of every list (each once).
    /// Without ebpf only the thread lifecycle probes load (for
    /// events.jsonl): no program on every switch, request or packet. perf is
    /// an explicit oracle: it opens software counters (task-clock, context
    /// switches, migrations, page faults) and the hardware ones on every
    /// thread of the target, and the kernel saves and restores them at every
    /// context switch of a traced thread: on a context-switch storm here the
    /// traced process spent 24.6% more CPU time under perf alone (medians of
    /// 7 rounds on 2026-12-05), against 7.7% under ebpf alone and 0.3% under
    /// proc alone then (docs/benchmarks.md). eBPF and /proc give the same software counts;
    /// only the hardware counters (cycles, instructions, cache references
    /// and misses, branch misses, where the machine has a PMU) are perf's
    /// alone.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "ebpf,proc"
    )]
    pub sources: Vec<SourceKind>,

    #[command(flatten)]
    pub probes: ProbeArgs,

    /// Mark a phase NAME at SECS seconds after tracing starts, in labels.jsonl
    /// (repeatable; e.g. --label boot@0 --label detonate@30).
    #[arg(long = "label", value_name = "NAME@SECS", value_parser = crate::control::parse_label_at)]
    pub labels: Vec<(String, Duration)>,

    /// Record KEY=VALUE in meta.json `tags` (repeatable; e.g. --tag
    /// sample=sha256:... --tag vm=win10-03). KEY: 1 to 64 of [A-Za-z0-9_.-];
    /// VALUE: up to 1024 bytes, no control characters.
    #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = crate::meta::parse_tag)]
    pub tags: Vec<(String, String)>,

    /// Also record QEMU's own statistics from its QMP unix socket (QEMU's
    /// `-qmp unix:PATH,server=on,wait=off`): rows in telemetry-qmp.jsonl,
    /// QMP events (STOP, RESUME, SHUTDOWN, BLOCK_IO_ERROR...) in
    /// events.jsonl. A socket that is not there or not answering yet (QEMU
    /// starting) is retried every bucket for 30 s. QEMU serves one client at
    /// a time per -qmp socket: give cis490 one of its own (QEMU accepts
    /// several -qmp options). The socket must be the traced QEMU's own: one
    /// served by another process stops the trace, naming both pids (and
    /// QEMU's, when the target is a wrapper that started it).
    #[arg(long, value_name = "SOCKET")]
    pub qmp: Option<PathBuf>,

    /// Also record what the in-guest agent (cis490-agent, started by the
    /// guest's init) reports, from QEMU's chardev socket of its
    /// virtio-serial port: rows in telemetry-guest.jsonl
    /// (available_in_deployment: true), started guest processes as
    /// guest_exec events. The socket is retried every 100 ms while QEMU
    /// starts and after every hang-up. QEMU options, e.g.:
    /// `-chardev socket,id=ga,path=SOCKET,server=on,wait=off -device
    /// virtio-serial -device virtserialport,chardev=ga,name=cis490.guest.agent`.
    /// Each line is untrusted: at most 64 KiB (longer ones are cut and
    /// counted), at most 32 lines read per bucket (the rest skipped and
    /// counted), malformed or implausible ones counted in guest_bad_lines
    /// (docs/agent-protocol.md).
    #[arg(long, value_name = "SOCKET")]
    pub guest_agent: Option<PathBuf>,
    /// Also count the VM's frames on this interface (usually the lab's
    /// bridge) with TC classifiers (clsact or TCX, detached at the end):
    /// rows in telemetry-gateway.jsonl (`available_in_deployment: true`;
    /// frames, bytes, protocols, TCP flags, DNS queries and NXDOMAIN
    /// answers, new flows, distinct remote addresses and ports, frame
    /// sizes). The VM's frames are those from or to its MAC addresses
    /// (--gateway-mac, else QEMU's query-rx-filter over --qmp, else `mac=`
    /// in QEMU's command line); with none known
    /// every frame on the interface is counted (meta.json says so).
    /// Example: --gateway-if br-malware --gateway-mac 52:54:00:12:34:56
    #[arg(long, value_name = "IFACE")]
    pub gateway_if: Option<String>,

    /// A MAC address of the traced VM's NIC (repeatable), for --gateway-if.
    #[arg(long = "gateway-mac", value_name = "MAC", requires = "gateway_if")]
    pub gateway_macs: Vec<crate::sources::gateway::macs::Mac>,

    /// Also write the VM's frames to gateway.pcap in the episode (through
    /// a ring buffer; frames it had no room for are counted in the rows'
    /// `dropped_events`).
    #[arg(long, requires = "gateway_if")]
    pub gateway_pcap: bool,

    /// Bytes of each frame kept in gateway.pcap (1..=1024).
    #[arg(long, value_name = "BYTES", default_value_t = crate::sources::gateway::DEFAULT_SNAPLEN,
          requires = "gateway_pcap")]
    pub gateway_snaplen: u32,

    /// The network namespace of --gateway-if: a name of `ip netns` or a
    /// path (/proc/PID/ns/net); default: the tracer's own.
    #[arg(long, value_name = "NETNS", requires = "gateway_if")]
    pub gateway_netns: Option<PathBuf>,

    /// How --gateway-if attaches: tcx (bpf links, Linux 6.6+: gone with the
    /// tracer whatever ends it), clsact (the clsact qdisc, added if missing
    /// and then removed, and netlink filters, removed at the end), or auto
    /// (tcx where the kernel has it).
    #[arg(
        long,
        value_name = "HOW",
        value_enum,
        default_value = "auto",
        requires = "gateway_if"
    )]
    pub gateway_attach: crate::sources::gateway::attach::AttachChoice,

    /// Listen on this unix socket for live commands, one per line:
    /// `label NAME` (mark a phase now), `ping`, `stop` (end tracing).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Write the episode directory's absolute path (one line) to this file
    /// as soon as the directory exists, atomically: an orchestrator finds
    /// the episode of a tracer that is later killed without parsing its
    /// log. (stdout has the path only at the end, after a successful trace.)
    #[arg(long, value_name = "PATH")]
    pub episode_file: Option<PathBuf>,

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

    /// How the thread that closes buckets is scheduled. realtime:
    /// SCHED_FIFO priority 1, so a bucket is read when it ends even while
    /// the target keeps every CPU busy (at the normal policy, with 200 busy
    /// threads on 2 CPUs, the reads at one boundary took up to 0.57 s, and a
    /// bucket held its successors' CPU time); a command it traces, and any
    /// thread it starts, run at the normal policy, and the kernel's real-time
    /// throttling bounds the tracer. normal: the policy cis490 was started
    /// with. If realtime is refused (no CAP_SYS_NICE), a warning, and
    /// meta.json `tracer_scheduling` says why.
    #[arg(long, value_name = "POLICY", value_enum, default_value_t = crate::trace::priority::Priority::Realtime)]
    pub priority: crate::trace::priority::Priority,

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

/// `cis490 trace`'s options alone (a server parses its clients' with it).
#[derive(Debug, Parser)]
#[command(name = "cis490 trace", no_binary_name = true)]
struct TraceOnly {
    #[command(flatten)]
    args: TraceArgs,
}

impl TraceArgs {
    /// Parses `cis490 trace`'s arguments (without `cis490 trace`); the
    /// error is clap's first line.
    pub fn parse_args(args: &[String]) -> Result<Self, String> {
        TraceOnly::try_parse_from(args)
            .map(|t| t.args)
            .map_err(|e| {
                let text = e.to_string();
                text.lines()
                    .next()
                    .unwrap_or("bad arguments")
                    .trim_start_matches("error: ")
                    .to_owned()
            })
    }

    pub fn into_config(self, argv: Vec<String>) -> TraceConfig {
        let counters = self.sources.contains(&SourceKind::Ebpf);
        // `--sources` given twice, or a source twice in one list: each once.
        let mut sources = Vec::new();
        for s in self.sources {
            if !sources.contains(&s) {
                sources.push(s);
            }
        }
        TraceConfig {
            target_pid: self.target_pid,
            command: self.command,
            duration: self.duration,
            interval: Duration::from_millis(self.interval_ms),
            data_dir: self.data_dir,
            sources,
            btf: self.probes.btf.clone(),
            progress: (!self.progress_secs.is_zero()).then_some(self.progress_secs),
            probe_options: self.probes.options(self.ringbuf_kib, counters, 1),
            labels: self.labels,
            tags: self.tags,
            control: self.control,
            qmp: self.qmp,
            guest_agent: self.guest_agent,
            episode_file: self.episode_file,
            priority: self.priority,
            gateway: self
                .gateway_if
                .map(|iface| crate::sources::gateway::GatewayConfig {
                    iface,
                    macs: self.gateway_macs,
                    pcap: self.gateway_pcap,
                    snaplen: self.gateway_snaplen,
                    attach: self.gateway_attach,
                    netns: self.gateway_netns,
                }),
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

    /// Every command's help reads as prose: no line of it carries the source's
    /// indentation (a `long_about` continued without `\\`).
    #[test]
    fn help_texts_have_no_source_indentation() {
        use clap::CommandFactory as _;
        let mut cli = Cli::command();
        cli.build();
        for sub in cli.get_subcommands_mut().filter(|s| s.get_name() != "help") {
            let name = sub.get_name().to_string();
            let help = sub.render_long_help().to_string();
            for line in help.lines() {
                assert!(
                    !line.trim_start().contains("    "),
                    "`cis490 {name} --help` has a run of spaces: {line:?}"
                );
            }
        }
    }

    #[test]
    fn trace_defaults() {
        let Command::Trace(t) = parse(&["trace", "--target-pid", "7"]).unwrap().command else {
            panic!()
        };
        assert_eq!(t.target_pid, Some(7));
        assert_eq!(t.interval_ms, 100);
        // perf's per-thread counters cost a switch-heavy target dearly:
        // an explicit oracle, not a default.
        assert_eq!(t.sources, [SourceKind::Ebpf, SourceKind::Proc]);
        assert_eq!(t.data_dir, PathBuf::from("data"));
        assert_eq!(t.priority, crate::trace::priority::Priority::Realtime);
    }

    #[test]
    fn sources_given_twice_are_each_taken_once() {
        let Command::Trace(t) = parse(&[
            "trace",
            "--sources",
            "ebpf,proc,ebpf",
            "--sources",
            "perf,proc",
            "--",
            "true",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        let c = t.into_config(Vec::new());
        assert_eq!(
            c.sources,
            [SourceKind::Ebpf, SourceKind::Proc, SourceKind::Perf]
        );
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
    fn tags_export_and_ship() {
        let Command::Trace(t) = parse(&[
            "trace",
            "--tag",
            "vm=w10",
            "--tag",
            "sample=a=b",
            "--",
            "true",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert_eq!(
            t.tags,
            [("vm".into(), "w10".into()), ("sample".into(), "a=b".into())]
        );
        assert!(parse(&["trace", "--tag", "bad key=1", "--", "true"]).is_err());
        assert!(
            parse(&["export", "--to", "d"]).is_err(),
            "an episode is required"
        );
        let Command::Ship(s) = parse(&["ship", "--to", "s3://b/p/q/"]).unwrap().command else {
            panic!()
        };
        assert_eq!(
            s.to,
            crate::dataset::ship::Destination::S3 {
                bucket: "b".into(),
                prefix: "p/q".into()
            }
        );
        assert!(parse(&["ship", "--to", "s3:///x"]).is_err());
        assert!(parse(&["ship", "--to", "gs://b"]).is_err());
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(parse(&["trace", "--duration", "0", "--", "true"]).is_err());
        assert!(parse(&["trace", "--duration", "-1", "--", "true"]).is_err());
        assert!(parse(&["trace", "--sources", "ebpf,nope", "--", "true"]).is_err());
        assert!(parse(&["trace", "--target-pid", "1", "--", "true"]).is_err());
    }
}
