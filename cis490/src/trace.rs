//! `cis490 trace`: validate, attach or spawn, load the probes, then one event
//! loop that closes a bucket on every grid boundary (one row per source),
//! streams lifecycle records into `events.jsonl`, and stops on the target's
//! exit, the duration, or SIGINT/SIGTERM. The episode is marked done only
//! when everything was written.

use std::{borrow::Cow, ffi::OsString, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::json;
use tokio::{
    signal::unix::{SignalKind, signal},
    time::{Instant, sleep, sleep_until},
};

use crate::{
    caps,
    clock::{BucketClock, ClockPair, Tick, mono_now_ns},
    control::{Command as ControlCommand, ControlSocket},
    episode::{self, EpisodeDir, JsonlFile},
    fdwatch,
    meta::{Clock, EbpfTotals, EndReason, Host, Meta, SourceMeta, Status},
    probes::{self, KernelFacts, Plan, Probes},
    row::{Row, SourceKind},
    sources::{
        SampleCtx, Source,
        ebpf::{EbpfSource, Record, RecordStream},
        gateway::GatewaySource,
        perf::PerfSource,
        proc::ProcSource,
        qmp::QmpSource,
    },
    taps::{self, Holdings},
    target::Target,
};
use cis490_common::LifecycleKind;

/// Everything `cis490 trace` was asked to do.
#[derive(Clone, Debug)]
pub struct TraceConfig {
    pub target_pid: Option<i32>,
    pub command: Vec<OsString>,
    pub duration: Option<Duration>,
    pub interval: Duration,
    pub data_dir: PathBuf,
    pub sources: Vec<SourceKind>,
    pub btf: PathBuf,
    pub progress: Option<Duration>,
    pub probe_options: probes::Options,
    /// Phase labels at fixed times after the start (`--label NAME@SECS`).
    pub labels: Vec<(String, Duration)>,
    /// `--tag KEY=VALUE` pairs, for meta.json.
    pub tags: Vec<(String, String)>,
    /// The control socket to listen on (`--control PATH`).
    pub control: Option<PathBuf>,
    /// QEMU's QMP socket (`--qmp PATH`).
    pub qmp: Option<PathBuf>,
    /// The gateway collector (`--gateway-if` and co).
    pub gateway: Option<crate::sources::gateway::GatewayConfig>,
    /// This process's own argv, for meta.json.
    pub argv: Vec<String>,
}

impl TraceConfig {
    fn validate(&self) -> Result<()> {
        if self.target_pid.is_some() != self.command.is_empty() {
            bail!("give exactly one target: --target-pid PID or -- COMMAND [ARGS...]");
        }
        if self.interval < Duration::from_millis(1) {
            bail!("--interval-ms must be at least 1");
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            bail!("--duration must be positive");
        }
        if self.sources.is_empty() {
            bail!("--sources must name at least one source");
        }
        if let Some(path) = &self.control {
            crate::control::check_path(path)?;
        }
        if self.sources.contains(&SourceKind::Qmp) && self.qmp.is_none() {
            bail!("the qmp source needs QEMU's QMP socket: give --qmp SOCKET");
        }
        if self.sources.contains(&SourceKind::Gateway) && self.gateway.is_none() {
            bail!("the gateway source needs an interface: give --gateway-if IFACE");
        }
        if let Some(g) = &self.gateway {
            g.validate()?;
        }
        if let Some(limit) = self.duration {
            for (name, at) in &self.labels {
                if *at > limit {
                    bail!(
                        "--label {name}@{} comes after --duration {} s: it would never be written",
                        at.as_secs_f64(),
                        limit.as_secs_f64()
                    );
                }
            }
        }
        crate::meta::tag_map(&self.tags).map_err(anyhow::Error::msg)?;
        Ok(())
    }
}

/// SIGINT and SIGTERM, blocked from the start of a trace until the event
/// loop handles them, so a signal during setup still ends in a complete
/// episode instead of killing the tracer.
fn stop_signals(how: libc::c_int) {
    // SAFETY: a sigset built with sigemptyset/sigaddset, for this thread
    // (no other thread exists yet when blocking).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Runs a trace; returns the episode directory.
pub fn run(mut cfg: TraceConfig) -> Result<PathBuf> {
    stop_signals(libc::SIG_BLOCK);
    cfg.validate()?;
    // Paths on stdout and in meta.json are absolute: a relative --data-dir
    // means nothing to a reader in another directory.
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    cfg.data_dir = cwd.join(&cfg.data_dir);
    caps::require_tracing_caps()?;
    caps::require_init_pid_namespace()?;
    let facts = KernelFacts::probe(&cfg.btf)?;
    // Fork before any thread exists (the runtime is created below).
    let mut target = match cfg.target_pid {
        Some(pid) => Target::attach(pid)?,
        None => Target::spawn(&cfg.command)?,
    };
    let episode = EpisodeDir::create(&cfg.data_dir)?;
    let argv = (!cfg.command.is_empty()).then_some(cfg.command.as_slice());
    let mut meta = Meta {
        schema_version: 1,
        id: episode.id().to_owned(),
        status: Status::Running,
        error: None,
        cis490_version: env!("CARGO_PKG_VERSION"),
        command_line: cfg.argv.clone(),
        working_directory: cwd.clone(),
        host: Host::current(),
        target: target.info(argv),
        interval_ns: cfg.interval.as_nanos() as u64,
        duration_limit_s: cfg.duration.map(|d| d.as_secs_f64()),
        start: None,
        end: None,
        end_reason: None,
        target_exit: None,
        target_rusage: None,
        sources: Vec::new(),
        kernel: Some(facts.clone()),
        probes: Vec::new(),
        families: Vec::new(),
        ebpf: EbpfTotals {
            ringbuf_bytes: cfg.probe_options.ringbuf_bytes,
            ..Default::default()
        },
        skipped_boundaries: 0,
        perf: None,
        perf_error: None,
        tracer: None,
        qmp: None,
        control_socket: cfg.control.as_ref().map(|p| p.display().to_string()),
        labels: 0,
        tags: crate::meta::tag_map(&cfg.tags).map_err(anyhow::Error::msg)?,
        host_steal_ns: None,
        gateway: None,
    };
    episode.write_meta(&meta)?;
    log::info!("episode {} -> {}", episode.id(), episode.path().display());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the event loop")?;
    let result = rt.block_on(trace(&cfg, &facts, &mut target, &episode, &mut meta));
    match result {
        Ok(()) => {
            meta.status = Status::Complete;
            episode.write_meta(&meta)?;
            episode.mark_done()?;
            Ok(episode.path().to_owned())
        }
        Err(e) => {
            // A spawned command does not outlive a failed trace.
            target.end_spawned(Duration::from_secs(5));
            meta.status = Status::Failed;
            meta.error = Some(format!("{e:#}"));
            if let Err(w) = episode.write_meta(&meta) {
                log::warn!("{w:#}");
            }
            Err(e)
        }
    }
}

/// A line of `events.jsonl`.
#[derive(Serialize)]
struct Event<'a> {
    t_mono_ns: u64,
    t_wall_ns: u64,
    /// The bucket it happened in (`null` before the first one opened).
    seq: Option<u64>,
    event: &'a str,
    #[serde(flatten)]
    detail: serde_json::Value,
}

/// A line of `labels.jsonl`.
#[derive(Serialize)]
struct LabelLine<'a> {
    t_mono_ns: u64,
    t_wall_ns: u64,
    seq: Option<u64>,
    label: &'a str,
    /// `cli` (`--label`) or `control` (the control socket).
    via: &'a str,
}

/// The open output files of an episode.
struct Outputs {
    events: JsonlFile,
    labels: JsonlFile,
    rows: Vec<(SourceKind, JsonlFile)>,
}

impl Outputs {
    fn event(
        &mut self,
        at: ClockPair,
        seq: Option<u64>,
        event: &str,
        detail: serde_json::Value,
    ) -> Result<()> {
        let detail = if detail.is_null() { json!({}) } else { detail };
        self.events
            .write(&Event {
                t_mono_ns: at.mono_ns,
                t_wall_ns: at.wall_ns,
                seq,
                event,
                detail,
            })
            .context("cannot write events.jsonl")
    }

    /// Writes a phase label now (flushed at once: an orchestrator may read it).
    fn label(&mut self, at: ClockPair, seq: Option<u64>, label: &str, via: &str) -> Result<()> {
        self.labels
            .write(&LabelLine {
                t_mono_ns: at.mono_ns,
                t_wall_ns: at.wall_ns,
                seq,
                label,
                via,
            })
            .context("cannot write labels.jsonl")?;
        self.labels.flush().context("cannot write labels.jsonl")?;
        Ok(())
    }

    /// Flushes every file; an error names the file (a full disk shows
    /// here, where buffered lines reach it).
    fn flush(&mut self) -> Result<()> {
        self.events.flush().context("cannot write events.jsonl")?;
        self.labels.flush().context("cannot write labels.jsonl")?;
        for (k, f) in &mut self.rows {
            f.flush()
                .with_context(|| format!("cannot write {}", k.file_name()))?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.events.sync().context("cannot write events.jsonl")?;
        self.labels.sync().context("cannot write labels.jsonl")?;
        for (k, f) in &mut self.rows {
            f.sync()
                .with_context(|| format!("cannot write {}", k.file_name()))?;
        }
        Ok(())
    }
}

/// The sources, and what the coordinator knows about the target that they
/// share (its tap interfaces and KVM VM, from its fds).
struct Sources {
    pid: i32,
    episode_id: String,
    ebpf: EbpfSource,
    proc: Option<ProcSource>,
    perf: Option<PerfSource>,
    qmp: Option<QmpSlot>,
    gateway: Option<GatewaySource>,
    /// How long a QMP query may take within a bucket.
    qmp_timeout: Duration,
    holdings: Holdings,
    holdings_at: Option<Instant>,
}

impl Sources {
    /// How often the target's fds are rescanned for new taps and a KVM VM.
    const RESCAN: Duration = Duration::from_millis(250);

    fn refresh_holdings(&mut self) {
        if self.holdings_at.is_some_and(|t| t.elapsed() < Self::RESCAN) {
            return;
        }
        self.holdings_at = Some(Instant::now());
        match taps::holdings(self.pid) {
            Ok(h) => self.holdings = h,
            Err(e) => log::debug!("fds of {}: {e}", self.pid),
        }
    }

    /// Takes every source's baseline at one instant.
    async fn baseline(&mut self) -> Result<()> {
        self.refresh_holdings();
        let ctx = SampleCtx {
            holdings: Cow::Borrowed(&self.holdings),
        };
        Source::sample(&mut self.ebpf, &ctx)?;
        sample_opt(&mut self.proc, &ctx)?;
        sample_opt(&mut self.perf, &ctx)?;
        if let Some(g) = &mut self.gateway {
            g.sample()?;
        }
        if let Some(q) = &mut self.qmp {
            q.sample(self.qmp_timeout).await;
        }
        Ok(())
    }

    /// Closes the bucket at `now`: one row per source, stamped with the same
    /// clock pair and `seq`.
    async fn close_bucket(
        &mut self,
        clock: &mut BucketClock,
        out: &mut Outputs,
        now: ClockPair,
    ) -> Result<Tick> {
        self.refresh_holdings();
        let tick = clock.close(now);
        let ctx = SampleCtx {
            holdings: Cow::Borrowed(&self.holdings),
        };
        let mut drops = 0;
        for (kind, file) in &mut out.rows {
            let m = match kind {
                SourceKind::Ebpf => Source::sample(&mut self.ebpf, &ctx)?,
                SourceKind::Proc => sample_opt(&mut self.proc, &ctx)?,
                SourceKind::Perf => sample_opt(&mut self.perf, &ctx)?,
                SourceKind::Qmp => match &mut self.qmp {
                    Some(q) => q.sample(self.qmp_timeout).await,
                    None => crate::row::Measures::default(),
                },
                SourceKind::Gateway => match &mut self.gateway {
                    Some(g) => g.sample()?,
                    None => crate::row::Measures::default(),
                },
            };
            let row = Row {
                episode_id: self.episode_id.clone(),
                source: *kind,
                available_in_deployment: kind.available_in_deployment(),
                t_mono_ns: tick.end.mono_ns,
                t_wall_ns: tick.end.wall_ns,
                interval_ns: tick.interval_ns,
                seq: tick.seq,
                m,
            };
            let dropped = (row.source == SourceKind::Ebpf)
                .then_some(row.m.dropped_events)
                .flatten();
            file.write(&row)
                .with_context(|| format!("cannot write {}", kind.file_name()))?;
            if let Some(n) = dropped.filter(|n| *n > 0) {
                drops = n;
            }
        }
        if drops > 0 {
            // Not silent: the loss shows in events.jsonl and on stderr.
            out.event(
                now,
                Some(tick.seq),
                "drops",
                json!({"dropped_records": drops}),
            )?;
            log::warn!(
                "bucket {}: {drops} ring-buffer records dropped (rows stay exact)",
                tick.seq
            );
        }
        if let Some(q) = &mut self.qmp {
            for (at, detail) in q.take_events(now) {
                out.event(at, clock.seq_of(at.mono_ns), "qmp", detail)?;
            }
        }
        let new_taps = self.ebpf.take_new_taps();
        for tap in &new_taps {
            out.event(
                now,
                Some(tick.seq),
                "tap_attached",
                json!({"name": tap.name, "ifindex": tap.ifindex, "netns_inum": tap.netns_inum}),
            )?;
        }
        if !new_taps.is_empty() {
            out.events.flush().context("cannot write events.jsonl")?;
        }
        Ok(tick)
    }
}

/// The QMP source: waiting for QEMU to open its socket, connected, or given
/// up on.
enum QmpSlot {
    Pending {
        path: PathBuf,
        since: Instant,
        last_error: Option<String>,
    },
    Connected(QmpSource),
    Failed {
        path: PathBuf,
        why: String,
        reported: bool,
    },
}

impl QmpSlot {
    /// How long QEMU has, after tracing starts, to create its QMP socket and
    /// greet on it. QEMU creates the socket early but greets only once its
    /// main loop runs, which on a loaded machine under TCG can be seconds
    /// later; each bucket tries again (each try bounded by the sample
    /// timeout).
    const CONNECT_WINDOW: Duration = Duration::from_secs(30);

    /// This bucket's QMP row (`null` fields until connected, or when QMP
    /// does not answer in time).
    async fn sample(&mut self, timeout: Duration) -> crate::row::Measures {
        if let QmpSlot::Pending {
            path,
            since,
            last_error,
        } = self
        {
            match QmpSource::connect(path, timeout).await {
                Ok(src) => *self = QmpSlot::Connected(src),
                Err(e) if since.elapsed() > Self::CONNECT_WINDOW => {
                    log::warn!("QMP source off: {e:#}");
                    *self = QmpSlot::Failed {
                        path: path.clone(),
                        why: format!("{e:#}"),
                        reported: false,
                    };
                }
                Err(e) => {
                    // Said at once, not only when the window closes: a
                    // mistyped path should not cost 30 silent seconds.
                    if last_error.is_none() {
                        log::warn!(
                            "QMP: {e:#}; retrying every bucket for {} s",
                            Self::CONNECT_WINDOW.as_secs()
                        );
                    }
                    log::debug!("QMP not there yet: {e:#}");
                    *last_error = Some(format!("{e:#}"));
                }
            }
            // The connection took this bucket's baseline.
            return crate::row::Measures::default();
        }
        match self {
            QmpSlot::Connected(src) => src.sample(timeout).await,
            _ => crate::row::Measures::default(),
        }
    }

    /// At the end of tracing: a connection still not made is a failure,
    /// reported like one (an event and meta.json's `qmp.error`).
    fn give_up(&mut self) {
        if let QmpSlot::Pending {
            path, last_error, ..
        } = self
        {
            let why = last_error.take().map_or_else(
                || format!("QEMU never opened its QMP socket {}", path.display()),
                |e| format!("no QMP session while tracing: {e}"),
            );
            log::warn!("QMP source off: {why}");
            *self = QmpSlot::Failed {
                path: path.clone(),
                why,
                reported: false,
            };
        }
    }

    /// QMP events to log (with their clock pair from QEMU's wall clock) and
    /// a one-time event when QMP could not be reached.
    fn take_events(&mut self, now: ClockPair) -> Vec<(ClockPair, serde_json::Value)> {
        match self {
            QmpSlot::Connected(src) => src
                .take_events()
                .into_iter()
                .map(|e| {
                    let at = e.t_wall_ns().map_or(now, |wall| ClockPair {
                        mono_ns: (now.mono_ns as i128 + wall as i128 - now.wall_ns as i128).max(0)
                            as u64,
                        wall_ns: wall,
                    });
                    (at, json!({"qmp_event": e.event, "data": e.data}))
                })
                .collect(),
            QmpSlot::Failed {
                path,
                why,
                reported,
            } if !*reported => {
                *reported = true;
                vec![(now, json!({"qmp_error": why, "socket": path}))]
            }
            _ => Vec::new(),
        }
    }

    fn info(&self) -> serde_json::Value {
        match self {
            QmpSlot::Connected(src) => serde_json::to_value(src.info()).unwrap_or_default(),
            QmpSlot::Pending { path, .. } => json!({"socket": path, "error": "never connected"}),
            QmpSlot::Failed { path, why, .. } => json!({"socket": path, "error": why}),
        }
    }
}

/// A row of an optional source (`null` fields when it is off).
fn sample_opt<S: Source>(src: &mut Option<S>, ctx: &SampleCtx<'_>) -> Result<crate::row::Measures> {
    Ok(match src {
        Some(s) => s.sample(ctx)?,
        None => crate::row::Measures::default(),
    })
}

/// Runs a short thread on every online CPU so each CPU switches once: the
/// scheduler probe then knows what runs everywhere before the baseline.
fn kick_cpus() {
    let cpus = aya::util::online_cpus().unwrap_or_default();
    let handles: Vec<_> = cpus
        .into_iter()
        .map(|cpu| {
            std::thread::spawn(move || {
                // SAFETY: a zeroed cpu_set_t with one bit set, for this thread.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu as usize, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
                }
                std::thread::sleep(Duration::from_micros(200));
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

fn lifecycle_event(r: &cis490_common::LifecycleRecord) -> (&'static str, serde_json::Value) {
    let comm = String::from_utf8_lossy(r.comm_bytes()).into_owned();
    match r.lifecycle() {
        Ok(LifecycleKind::ThreadStart) => (
            "thread_started",
            json!({"tid": r.tid, "parent_tid": r.aux, "comm": comm}),
        ),
        Ok(LifecycleKind::ThreadExit) => ("thread_exited", json!({"tid": r.tid, "comm": comm})),
        Ok(LifecycleKind::Exec) => (
            "exec",
            json!({"tid": r.tid, "old_tid": r.aux, "comm": comm}),
        ),
        Ok(LifecycleKind::Rename) => ("thread_renamed", json!({"tid": r.tid, "comm": comm})),
        Err(_) => ("unknown_record", json!({"tid": r.tid, "what": r.what})),
    }
}

async fn trace(
    cfg: &TraceConfig,
    facts: &KernelFacts,
    target: &mut Target,
    episode: &EpisodeDir,
    meta: &mut Meta,
) -> Result<()> {
    // Handle SIGINT/SIGTERM from here on: a signal during setup still ends
    // in a complete episode.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    stop_signals(libc::SIG_UNBLOCK);
    let pid = target.pid();
    // perf counters first: on a spawned command still held before execve,
    // they are inherited by every thread it will start.
    let mut kinds = cfg.sources.clone();
    if cfg.qmp.is_some() && !kinds.contains(&SourceKind::Qmp) {
        kinds.push(SourceKind::Qmp);
    }
    if cfg.gateway.is_some() && !kinds.contains(&SourceKind::Gateway) {
        kinds.push(SourceKind::Gateway);
    }
    let perf = if kinds.contains(&SourceKind::Perf) {
        match PerfSource::new(pid) {
            Ok(p) => {
                meta.perf = Some(p.info());
                Some(p)
            }
            Err(e) => {
                log::warn!("perf source off: {e:#}");
                meta.perf_error = Some(format!("{e:#}"));
                kinds.retain(|k| *k != SourceKind::Perf);
                None
            }
        }
    } else {
        None
    };
    let mut out = Outputs {
        events: JsonlFile::create(&episode.file(episode::EVENTS))?,
        labels: JsonlFile::create(&episode.file(episode::LABELS))?,
        rows: kinds
            .iter()
            .map(|&k| Ok((k, JsonlFile::create(&episode.file(&k.file_name()))?)))
            .collect::<Result<_>>()?,
    };
    let mut control = cfg
        .control
        .as_deref()
        .map(ControlSocket::bind)
        .transpose()?;

    let plan = Plan::new(facts, cfg.probe_options);
    let mut probes = Probes::load_and_attach(pid as u32, facts, &plan)?;
    meta.probes = probes.status.clone();
    meta.families = probes.families.clone();
    let attached_at = ClockPair::now();
    for p in &probes.status {
        out.event(attached_at, None, "probe", serde_json::to_value(p)?)?;
    }
    for f in &probes.families {
        if !f.active {
            log::warn!(
                "{} telemetry off: {}",
                f.family,
                f.note.as_deref().unwrap_or("?")
            );
        }
    }
    let mut records = RecordStream::new(&mut probes)?;
    target.check_same_process()?;

    let mut ebpf = EbpfSource::new(&mut probes, &plan, pid)?;
    if let Some(why) = ebpf.check_visible(pid) {
        log::warn!("{why}");
        if let Some(f) = meta.families.iter_mut().find(|f| f.family == "sched") {
            f.note = Some(why);
        }
    }
    let gateway = match &cfg.gateway {
        Some(g) => {
            // QEMU's command line, for `mac=`: the command given, or the
            // running target's.
            let argv: Vec<String> = if cfg.command.is_empty() {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|b| {
                        b.split(|&c| c == 0)
                            .take(4096)
                            .map(|a| String::from_utf8_lossy(a).into_owned())
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                cfg.command
                    .iter()
                    .map(|a| a.to_string_lossy().into_owned())
                    .collect()
            };
            let macs = GatewaySource::find_macs(g, cfg.qmp.as_deref(), &argv).await;
            let src = GatewaySource::new(&mut probes, g, macs, episode.path())?;
            meta.gateway = Some(src.info().clone());
            Some(src)
        }
        None => None,
    };
    let proc = if cfg.sources.contains(&SourceKind::Proc) {
        Some(ProcSource::new(pid)?)
    } else {
        None
    };
    let mut sources = Sources {
        pid,
        episode_id: meta.id.clone(),
        ebpf,
        proc,
        perf,
        gateway,
        qmp: cfg.qmp.as_ref().map(|p| QmpSlot::Pending {
            path: p.clone(),
            since: Instant::now(),
            last_error: None,
        }),
        qmp_timeout: (cfg.interval * 4 / 5)
            .clamp(Duration::from_millis(20), Duration::from_millis(500)),
        holdings: Holdings::default(),
        holdings_at: None,
    };
    // Every CPU switches once: threads running at attach are switched out,
    // so their counters (seeded from /proc, which lags for a running thread)
    // catch up before the baseline.
    kick_cpus();
    sources.baseline().await?;

    let start = ClockPair::now();
    let mut clock = BucketClock::new(start, cfg.interval.as_nanos() as u64);
    let steal_at_start = crate::meta::machine_steal_ns();
    meta.start = Some(Clock {
        t_mono_ns: start.mono_ns,
        t_wall_ns: start.wall_ns,
    });
    out.event(
        start,
        None,
        "started",
        json!({"pid": pid, "mode": meta.target.mode, "interval_ns": clock.interval_ns()}),
    )?;
    target.release()?;
    if target.is_spawned() {
        out.event(
            ClockPair::now(),
            Some(0),
            "target_released",
            json!({"pid": pid}),
        )?;
        // After execve: the command's own name and executable.
        meta.target = target.info(Some(&cfg.command));
    }
    // Let a watcher tailing events.jsonl see that tracing runs.
    out.flush()?;

    let pidfd = fdwatch::readable(target.pidfd().try_clone()?)?;
    // The monotonic clock first, then the Instant: a preemption between the
    // two reads (tens of ms under software emulation) makes a deadline
    // late, never early (a label at +0.39 s for `@0.4` the other way round).
    let mono_to_instant = |mono: u64| {
        let left = Duration::from_nanos(mono.saturating_sub(mono_now_ns()));
        Instant::now() + left
    };
    let end_at = cfg
        .duration
        .map(|d| mono_to_instant(start.mono_ns + d.as_nanos() as u64));
    let mut next_progress = cfg.progress.map(|p| Instant::now() + p);
    let mut timed_labels: Vec<(String, Duration)> = cfg.labels.clone();
    timed_labels.sort_by_key(|(_, at)| std::cmp::Reverse(*at));
    let mut last_flush = Instant::now();

    let reason = loop {
        let deadline = mono_to_instant(clock.next_deadline_ns());
        tokio::select! {
            biased;
            _ = sigint.recv() => {
                let now = ClockPair::now();
                out.event(now, clock.seq_of(now.mono_ns), "signal", json!({"signal": "SIGINT"}))?;
                break EndReason::Signal;
            }
            _ = sigterm.recv() => {
                let now = ClockPair::now();
                out.event(now, clock.seq_of(now.mono_ns), "signal", json!({"signal": "SIGTERM"}))?;
                break EndReason::Signal;
            }
            r = pidfd.readable() => {
                r?.retain_ready();
                break EndReason::TargetExited;
            }
            _ = async { sleep_until(end_at.unwrap()).await }, if end_at.is_some() => {
                break EndReason::Duration;
            }
            _ = async {
                let at = timed_labels.last().map_or(start.mono_ns, |(_, d)| start.mono_ns + d.as_nanos() as u64);
                sleep_until(mono_to_instant(at)).await
            }, if !timed_labels.is_empty() => {
                let (name, _) = timed_labels.pop().expect("checked non-empty");
                let now = ClockPair::now();
                out.label(now, clock.seq_of(now.mono_ns), &name, "cli")?;
                meta.labels += 1;
            }
            Some((cmd, reply)) = async { control.as_mut().unwrap().requests.recv().await }, if control.is_some() => {
                let now = ClockPair::now();
                let answer = format!("ok {}", now.mono_ns);
                match cmd {
                    ControlCommand::Label(name) => {
                        out.label(now, clock.seq_of(now.mono_ns), &name, "control")?;
                        meta.labels += 1;
                        let _ = reply.send(answer);
                    }
                    ControlCommand::Ping => {
                        let _ = reply.send(answer);
                    }
                    ControlCommand::Stop => {
                        out.event(now, clock.seq_of(now.mono_ns), "control_stop", serde_json::Value::Null)?;
                        let _ = reply.send(answer);
                        // Let the connection write its reply before the loop ends.
                        for _ in 0..4 {
                            tokio::task::yield_now().await;
                        }
                        break EndReason::Control;
                    }
                }
            }
            _ = sleep_until(deadline) => {
                let tick = sources.close_bucket(&mut clock, &mut out, ClockPair::now()).await?;
                if last_flush.elapsed() >= Duration::from_secs(1) {
                    out.flush()?;
                    last_flush = Instant::now();
                }
                if let Some(p) = next_progress.filter(|p| Instant::now() >= *p) {
                    let t = sources.ebpf.totals();
                    log::info!(
                        "traced {:.1} s: {} buckets, {} target events, {} dropped records",
                        (tick.end.mono_ns - start.mono_ns) as f64 / 1e9,
                        clock.closed(), t.events, t.dropped
                    );
                    next_progress = Some(p + cfg.progress.unwrap_or_default());
                }
            }
            r = records.readable() => {
                r?;
                let mut lines = Vec::new();
                records.drain(|rec| lines.push(rec));
                for Record::Lifecycle(l) in lines {
                    if l.lifecycle() == Ok(LifecycleKind::Exec) {
                        // The target became another program (`ip netns exec`
                        // becoming QEMU): meta.json names the program it is.
                        meta.target = target.info(target.is_spawned().then_some(cfg.command.as_slice()));
                    }
                    let (name, detail) = lifecycle_event(&l);
                    let at = ClockPair { mono_ns: l.ts_ns, wall_ns: start.wall_of(l.ts_ns) };
                    out.event(at, clock.seq_of(l.ts_ns), name, detail)?;
                }
            }
        }
    };

    if reason == EndReason::Signal {
        // A second SIGINT or SIGTERM while finishing aborts at once: no
        // done.marker, so nothing picks up a half-finished episode. A
        // spawned command is killed with it rather than left behind.
        let killer = target.killer();
        tokio::spawn(async move {
            tokio::select! {
                _ = sigint.recv() => {}
                _ = sigterm.recv() => {}
            }
            if let Some(fd) = &killer {
                let _ = crate::target::pidfd_send_signal(fd, libc::SIGKILL);
            }
            crate::sources::gateway::emergency_detach();
            eprintln!(
                "error: second signal while finishing: aborted, the episode has no done.marker"
            );
            std::process::exit(130);
        });
    }
    if reason == EndReason::TargetExited {
        // Let the last threads finish their final switch-out.
        sleep(Duration::from_millis(5)).await;
    }
    sources.ebpf.settle(reason == EndReason::TargetExited);
    if let Some(q) = &mut sources.qmp {
        q.give_up();
    }
    let end = ClockPair::now();
    let last = sources.close_bucket(&mut clock, &mut out, end).await?;
    // Detach: no more events after the final row.
    records.drain(|Record::Lifecycle(l)| {
        let (name, detail) = lifecycle_event(&l);
        let at = ClockPair {
            mono_ns: l.ts_ns,
            wall_ns: start.wall_of(l.ts_ns),
        };
        let _ = out.event(at, clock.seq_of(l.ts_ns), name, detail);
    });
    let totals = *sources.ebpf.totals();
    if let Some(q) = &sources.qmp {
        meta.qmp = Some(q.info());
    }
    if let Some(p) = &sources.perf {
        meta.perf = Some(p.info());
    }
    if sources.ebpf.target_pid_reused() {
        log::warn!(
            "pid {pid} went to a new process after the target ended; that process was not traced"
        );
    }
    if let Some(g) = sources.gateway.take() {
        meta.gateway = Some(g.finish()?);
    }
    let block_map_errors = sources.ebpf.block_map_errors();
    meta.ebpf.block_missed_completions = sources.ebpf.block_missed_completions();
    drop(sources);
    drop(probes);

    match reason {
        EndReason::TargetExited => {
            meta.target_exit = target.exit_status();
            meta.target_rusage = target.exit_usage();
            out.event(
                end,
                Some(last.seq),
                "target_exited",
                json!({"pid": pid, "status": meta.target_exit}),
            )?;
        }
        EndReason::Duration => out.event(
            end,
            Some(last.seq),
            "duration_reached",
            serde_json::Value::Null,
        )?,
        EndReason::Signal | EndReason::Control => {}
    }
    if target.is_spawned() && reason != EndReason::TargetExited {
        terminate(target, &mut out).await?;
    }
    target.reap();

    meta.end = Some(Clock {
        t_mono_ns: end.mono_ns,
        t_wall_ns: end.wall_ns,
    });
    meta.end_reason = Some(reason);
    meta.tracer = Some(crate::meta::TracerUsage::now());
    meta.host_steal_ns = steal_at_start
        .zip(crate::meta::machine_steal_ns())
        .map(|(a, b)| b.saturating_sub(a));
    meta.skipped_boundaries = clock.skipped();
    meta.ebpf.events = totals.events;
    meta.ebpf.dropped_events = totals.dropped;
    meta.ebpf.map_errors = totals.map_errors + block_map_errors;
    meta.ebpf.slice_mismatches = totals.slice_mismatches;
    meta.ebpf.records_received = records.received;
    meta.ebpf.records_undecodable = records.undecodable;
    meta.sources = out
        .rows
        .iter()
        .map(|(k, f)| SourceMeta {
            source: *k,
            file: k.file_name(),
            available_in_deployment: k.available_in_deployment(),
            rows: f.lines(),
        })
        .collect();
    if meta.ebpf.block_missed_completions > 0 {
        log::warn!(
            "{} block request completions were not delivered by the kernel; their bytes were \
             accounted when found (see meta.json)",
            meta.ebpf.block_missed_completions
        );
    }
    if totals.dropped > 0 || totals.map_errors > 0 || records.undecodable > 0 {
        log::warn!(
            "{} ring-buffer records dropped, {} map errors, {} undecodable records (rows are exact; see meta.json)",
            totals.dropped,
            totals.map_errors,
            records.undecodable
        );
    }
    out.event(
        ClockPair::now(),
        None,
        "finished",
        json!({"reason": reason, "buckets": clock.closed()}),
    )?;
    out.sync()?;
    Ok(())
}

/// Ends a spawned command that outlived the trace: SIGTERM, then SIGKILL
/// after 5 s.
async fn terminate(target: &mut Target, out: &mut Outputs) -> Result<()> {
    if target.has_exited() {
        return Ok(());
    }
    let _ = target.signal(libc::SIGTERM);
    out.event(
        ClockPair::now(),
        None,
        "target_terminated",
        json!({"signal": "SIGTERM"}),
    )?;
    for _ in 0..500 {
        if target.has_exited() {
            return Ok(());
        }
        sleep(Duration::from_millis(10)).await;
    }
    let _ = target.signal(libc::SIGKILL);
    out.event(
        ClockPair::now(),
        None,
        "target_terminated",
        json!({"signal": "SIGKILL"}),
    )?;
    Ok(())
}
