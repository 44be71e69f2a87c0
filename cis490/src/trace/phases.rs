//! The phases of one trace, in order: [`Run::attach`] (sources, output
//! files, control socket, probes), [`Run::begin`] (the baseline, the grid's
//! start, the target released), [`Run::event_loop`] (buckets, records,
//! labels, until something ends the trace) and [`Run::finish`] (the last
//! row, the end events, meta.json's totals).

use std::time::Duration;

use anyhow::Result;
use cis490_common::LifecycleKind;
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    time::{Instant, sleep, sleep_until},
};

use super::{
    TraceConfig,
    outputs::Outputs,
    sources::{QmpSlot, Sources, kick_cpus},
    stop_signals,
};
use crate::{
    clock::{BucketClock, ClockPair, mono_now_ns},
    control::{Command as ControlCommand, ControlSocket},
    ebpf::{EbpfSource, KernelFacts, Plan, Probes, Record, RecordStream},
    episode::EpisodeDir,
    event::Event,
    fdwatch,
    meta::{Clock, EndReason, Meta, SourceMeta},
    row::SourceKind,
    sources::{gateway::GatewaySource, guest::GuestSource, perf::PerfSource, proc::ProcSource},
    taps::Holdings,
    target::Target,
};

/// SIGINT and SIGTERM, handled by the event loop from the first phase on
/// (blocked before it: a signal during setup still ends in a complete
/// episode).
pub(super) struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    pub(super) fn handle() -> Result<Self> {
        let s = Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
        };
        stop_signals(libc::SIG_UNBLOCK);
        Ok(s)
    }
}

/// What ends a trace from outside: this process's signals (a standalone
/// trace), or a server's word for one of its episodes.
pub(crate) enum Stops {
    Signals(Signals),
    /// From the episode's client (its signals, its going away) or the
    /// server (its own signals).
    Served(tokio::sync::mpsc::UnboundedReceiver<Stop>),
}

/// Why a trace is told to stop.
#[derive(Clone, Debug)]
pub enum Stop {
    /// SIGINT or SIGTERM (to this process, to a server's client, or to the
    /// server).
    Signal(&'static str),
    /// A server's client went away.
    ClientGone,
    /// A server's client could not start its command.
    ExecFailed(String),
    /// A server's client got a second signal while the episode finished:
    /// abort, with no done.marker.
    Abort,
}

impl Stops {
    async fn next(&mut self) -> Stop {
        match self {
            Stops::Signals(s) => tokio::select! {
                _ = s.int.recv() => Stop::Signal("SIGINT"),
                _ = s.term.recv() => Stop::Signal("SIGTERM"),
            },
            Stops::Served(rx) => rx.recv().await.unwrap_or(Stop::ClientGone),
        }
    }
}

/// One trace's state across its phases.
pub(super) struct Run<'a> {
    cfg: &'a TraceConfig,
    target: &'a mut Target,
    meta: &'a mut Meta,
    pid: i32,
    out: Outputs,
    control: Option<ControlSocket>,
    records: RecordStream,
    sources: Sources,
    /// The probes: this trace's own loaded object (dropping it detaches
    /// every program), or a server's, with this episode's target slot.
    probes: Held,
    /// The programs' skipped nested runs when the episode began.
    recursion_misses: std::collections::BTreeMap<String, u64>,
}

/// Where a trace's probes come from.
pub(crate) enum Backend {
    /// Loaded and attached for this trace alone.
    Standalone,
    /// A server's, shared with its other episodes.
    Served(std::sync::Arc<crate::serve::Shared>),
}

/// The probes a trace holds.
enum Held {
    Own(Box<Probes>),
    /// A slot of a server's probes, freed when dropped, and the episode's
    /// own object for the gateway collector's classifiers (detached when
    /// dropped), if it runs one.
    Lease {
        lease: crate::serve::Lease,
        gateway: Option<Box<Probes>>,
    },
}

impl Held {
    fn probes(&self) -> &Probes {
        match self {
            Held::Own(p) => p,
            Held::Lease { lease, .. } => lease.probes(),
        }
    }

    /// Makes every record now in a server's ring buffer reach this
    /// episode's stream (a trace's own ring buffer is drained directly).
    fn flush_records(&self) {
        if let Held::Lease { lease, .. } = self {
            lease.flush_records();
        }
    }

    /// The object the gateway collector's classifiers come from: this
    /// trace's own, or one loaded for this episode of a server.
    fn for_gateway(&mut self, facts: &KernelFacts, cfg: &TraceConfig) -> Result<&mut Probes> {
        match self {
            Held::Own(p) => Ok(p),
            Held::Lease { gateway, .. } => {
                if gateway.is_none() {
                    let plan = Plan::new(facts, cfg.probe_options);
                    *gateway = Some(Box::new(Probes::load_unattached(facts, &plan)?));
                }
                Ok(gateway.as_mut().expect("just loaded"))
            }
        }
    }
}

/// The bucket grid, from the moment [`Run::begin`] took the baseline.
pub(super) struct Grid {
    start: ClockPair,
    clock: BucketClock,
    steal_at_start: Option<u64>,
}

impl<'a> Run<'a> {
    /// Opens the sources (perf first: on a spawned command still held before
    /// `execve`, its counters are inherited by every thread it will start),
    /// the output files and the control socket, and loads and attaches the
    /// probes.
    pub(super) async fn attach(
        cfg: &'a TraceConfig,
        facts: &KernelFacts,
        target: &'a mut Target,
        episode: &EpisodeDir,
        meta: &'a mut Meta,
        backend: Backend,
    ) -> Result<Self> {
        let pid = target.pid();
        let mut kinds = cfg.sources.clone();
        if cfg.qmp.is_some() && !kinds.contains(&SourceKind::Qmp) {
            kinds.push(SourceKind::Qmp);
        }
        if cfg.guest_agent.is_some() && !kinds.contains(&SourceKind::Guest) {
            kinds.push(SourceKind::Guest);
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
        let mut out = Outputs::create(episode, &kinds)?;
        let control = cfg
            .control
            .as_deref()
            .map(ControlSocket::bind)
            .transpose()?;

        let (mut held, slot, records) = match backend {
            Backend::Standalone => {
                let plan = Plan::new(facts, cfg.probe_options);
                let probes = Probes::load_and_attach(Some(pid as u32), facts, &plan)?;
                let slot = probes.slot.expect("the target was given");
                let records = RecordStream::new(&probes)?;
                (Held::Own(Box::new(probes)), slot, records)
            }
            Backend::Served(shared) => {
                let (lease, rx) = crate::serve::Lease::take(shared, pid as u32)?;
                let slot = lease.slot();
                let held = Held::Lease {
                    lease,
                    gateway: None,
                };
                (held, slot, RecordStream::from_channel(rx))
            }
        };
        let probes = held.probes();
        let recursion_misses = probes.recursion_misses();
        meta.probes = probes.status.clone();
        meta.families = probes.families.clone();
        let attached_at = ClockPair::now();
        for p in &probes.status {
            out.event(attached_at, None, Event::Probe(p))?;
        }
        for f in &probes.families {
            // Without the eBPF source its counting families are off as asked.
            if !f.active && cfg.probe_options.counters {
                log::warn!(
                    "{} telemetry off: {}",
                    f.family,
                    f.note.as_deref().unwrap_or("?")
                );
            }
        }
        target.check_same_process()?;

        let mut ebpf = EbpfSource::new(probes, slot, pid)?;
        if let Some(why) = ebpf.check_visible(pid) {
            log::warn!("{why}");
            if let Some(f) = meta
                .families
                .iter_mut()
                .find(|f| f.family == EbpfSource::SCHED_FAMILY)
            {
                f.note = Some(why);
            }
        }
        let gateway = match &cfg.gateway {
            Some(g) => {
                let argv = qemu_argv(cfg, pid);
                let macs = GatewaySource::find_macs(g, cfg.qmp.as_deref(), &argv).await;
                let probes = held.for_gateway(facts, cfg)?;
                let src = GatewaySource::new(probes, g, macs, episode.path())?;
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
        let sources = Sources {
            pid,
            episode_id: meta.id.clone(),
            ebpf,
            proc,
            perf,
            qmp: cfg.qmp.as_ref().map(|p| QmpSlot::Pending {
                path: p.clone(),
                since: Instant::now(),
                last_error: None,
            }),
            guest: cfg
                .guest_agent
                .as_deref()
                .map(|p| GuestSource::start(p, cfg.interval))
                .transpose()?,
            qmp_timeout: (cfg.interval * 4 / 5)
                .clamp(Duration::from_millis(20), Duration::from_millis(500)),
            holdings: Holdings::default(),
            holdings_at: None,
            taps: Default::default(),
            read_spread_max_ns: 0,
            qmp_empty_buckets: 0,
            gateway,
        };
        Ok(Self {
            cfg,
            target,
            meta,
            pid,
            out,
            control,
            records,
            sources,
            probes: held,
            recursion_misses,
        })
    }

    /// Takes every source's baseline at one instant, starts the grid there
    /// and releases a spawned command.
    pub(super) async fn begin(&mut self) -> Result<Grid> {
        // Every CPU switches once: threads running at attach are switched
        // out, so their counters catch up before the baseline.
        kick_cpus();
        self.sources.baseline().await?;

        let start = ClockPair::now();
        let clock = BucketClock::new(start, self.cfg.interval.as_nanos() as u64);
        let steal_at_start = crate::meta::machine_steal_ns();
        self.meta.start = Some(Clock {
            t_mono_ns: start.mono_ns,
            t_wall_ns: start.wall_ns,
        });
        self.out.event(
            start,
            None,
            Event::Started {
                pid: self.pid,
                mode: self.meta.target.mode,
                interval_ns: clock.interval_ns(),
            },
        )?;
        self.target.release()?;
        if self.target.is_spawned() {
            self.out.event(
                ClockPair::now(),
                Some(0),
                Event::TargetReleased { pid: self.pid },
            )?;
            // After execve: the command's own name and executable.
            self.meta.target = self.target.info(Some(&self.cfg.command));
        }
        // Let a watcher tailing events.jsonl see that tracing runs.
        self.out.flush()?;
        Ok(Grid {
            start,
            clock,
            steal_at_start,
        })
    }

    /// Closes a bucket at every grid point and writes what happens, until
    /// the target exits, the duration is reached, a signal or `stop` comes.
    pub(super) async fn event_loop(
        &mut self,
        grid: &mut Grid,
        stops: &mut Stops,
    ) -> Result<EndReason> {
        let Self {
            cfg,
            target,
            meta,
            out,
            control,
            records,
            sources,
            ..
        } = self;
        let Grid { start, clock, .. } = grid;
        let start = *start;
        let pidfd = fdwatch::readable(target.pidfd().try_clone()?)?;
        // The monotonic clock first, then the Instant: a preemption between
        // the two reads (tens of ms under software emulation) makes a
        // deadline late, never early (a label at +0.39 s for `@0.4` the
        // other way round).
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
                stop = stops.next() => {
                    let now = ClockPair::now();
                    let seq = clock.seq_of(now.mono_ns);
                    match stop {
                        Stop::Signal(signal) => {
                            out.event(now, seq, Event::Signal { signal })?;
                            break EndReason::Signal;
                        }
                        Stop::ClientGone => {
                            out.event(now, seq, Event::ClientGone)?;
                            break EndReason::ClientGone;
                        }
                        Stop::ExecFailed(e) => anyhow::bail!("{e}"),
                        Stop::Abort => anyhow::bail!("{ABORTED}"),
                    }
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
                            out.event(now, clock.seq_of(now.mono_ns), Event::ControlStop)?;
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
                    let tick = sources.close_bucket(clock, out, ClockPair::now()).await?;
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
                        let at = ClockPair { mono_ns: l.ts_ns, wall_ns: start.wall_of(l.ts_ns) };
                        out.event(at, clock.seq_of(l.ts_ns), Event::lifecycle(&l))?;
                    }
                }
            }
        };
        Ok(reason)
    }

    /// Writes the last row (after the target's last threads have left
    /// their CPUs), detaches, writes the end events and meta.json's totals.
    pub(super) async fn finish(
        self,
        mut grid: Grid,
        reason: EndReason,
        signals: Option<Signals>,
    ) -> Result<()> {
        let Self {
            target,
            meta,
            pid,
            mut out,
            mut records,
            mut sources,
            probes,
            recursion_misses: misses_before,
            ..
        } = self;
        if let (EndReason::Signal, Some(signals)) = (reason, signals) {
            abort_on_second_signal(target, signals);
        }
        if reason == EndReason::TargetExited {
            // Let the last threads finish their final switch-out.
            sleep(Duration::from_millis(5)).await;
        }
        sources.ebpf.settle(reason == EndReason::TargetExited);
        if let Some(q) = &mut sources.qmp {
            q.give_up();
        }
        if let Some(g) = &mut sources.guest {
            g.stop(ClockPair::now());
        }
        let end = ClockPair::now();
        let (start, clock) = (grid.start, &mut grid.clock);
        let last = sources.close_bucket(clock, &mut out, end).await?;
        // Detach: no more events after the final row.
        probes.flush_records();
        records.drain(|Record::Lifecycle(l)| {
            let at = ClockPair {
                mono_ns: l.ts_ns,
                wall_ns: start.wall_of(l.ts_ns),
            };
            let _ = out.event(at, clock.seq_of(l.ts_ns), Event::lifecycle(&l));
        });
        let totals = *sources.ebpf.totals();
        let torn_slice_reads = sources.ebpf.torn_slice_reads();
        if let Some(q) = &sources.qmp {
            let mut info = q.info();
            let empty = sources.qmp_empty_buckets;
            if empty > 0 {
                log::warn!(
                    "QMP: {empty} of {} buckets have no QMP data (null fields){}",
                    clock.closed(),
                    info.get("error")
                        .and_then(|e| e.as_str())
                        .map_or(String::new(), |e| format!(": {e}"))
                );
            }
            if let Some(o) = info.as_object_mut() {
                o.insert("buckets_without_data".into(), empty.into());
            }
            meta.qmp = Some(info);
        }
        if let Some(p) = &sources.perf {
            meta.perf = Some(p.info());
        }
        if let Some(p) = &sources.proc {
            let info = crate::meta::ProcInfo {
                children_reaped_buckets: p.children_reaped_buckets(),
            };
            if info.children_reaped_buckets > 0 {
                log::warn!(
                    "the target reaped children in {} buckets: the /proc oracle's I/O fields are \
                     null there (/proc/PID/io then holds each child's whole lifetime of I/O)",
                    info.children_reaped_buckets
                );
            }
            meta.proc = Some(info);
        }
        if let Some(g) = &sources.guest {
            meta.guest_agent = Some(g.info());
        }
        if let Some(g) = sources.gateway.take() {
            meta.gateway = Some(g.finish()?);
        }
        if sources.ebpf.target_pid_reused() {
            log::warn!(
                "pid {pid} went to a new process after the target ended; that process was not traced"
            );
        }
        let block_map_errors = sources.ebpf.block_map_errors();
        meta.ebpf.block_missed_completions = sources.ebpf.block_missed_completions();
        meta.ebpf.block_requests_merged = sources.ebpf.block_requests_merged();
        match sources.ebpf.own_cgroup() {
            Some(Ok(path)) => meta.ebpf.block_cgroup = Some(path.to_owned()),
            Some(Err(why)) => meta.ebpf.block_cgroup_note = Some(why.to_owned()),
            None => {}
        }
        meta.ebpf.recursion_misses = probes
            .probes()
            .recursion_misses()
            .into_iter()
            .map(|(name, n)| {
                let before = misses_before.get(&name).copied().unwrap_or(0);
                (name, n.saturating_sub(before))
            })
            .collect();
        let read_spread_max_ns = sources.read_spread_max_ns;
        drop(sources);
        let served = matches!(probes, Held::Lease { .. });
        drop(probes);

        match reason {
            EndReason::TargetExited => {
                meta.target_exit = target.exit_status();
                meta.target_rusage = target.exit_usage();
                out.event(
                    end,
                    Some(last.seq),
                    Event::TargetExited {
                        pid,
                        status: meta.target_exit,
                    },
                )?;
            }
            EndReason::Duration => out.event(end, Some(last.seq), Event::DurationReached)?,
            EndReason::Signal | EndReason::Control | EndReason::ClientGone => {}
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
        meta.tracer = Some(if served {
            crate::meta::TracerUsage::now_for_thread()
        } else {
            crate::meta::TracerUsage::now()
        });
        meta.host_steal_ns = grid
            .steal_at_start
            .zip(crate::meta::machine_steal_ns())
            .map(|(a, b)| b.saturating_sub(a));
        meta.skipped_boundaries = clock.skipped();
        meta.read_spread_max_ns = Some(read_spread_max_ns);
        meta.ebpf.events = totals.events;
        meta.ebpf.dropped_events = totals.dropped;
        meta.ebpf.map_errors = totals.map_errors + block_map_errors;
        meta.ebpf.slice_mismatches = totals.slice_mismatches;
        meta.ebpf.final_switch_repairs = totals.final_switch_repairs;
        meta.ebpf.exits_estimated = totals.exits_estimated;
        meta.ebpf.exits_unaccounted = totals.exits_started.saturating_sub(totals.exits_accounted);
        meta.ebpf.exit_path_cpu_ns = totals
            .dead_runtime_ns
            .saturating_sub(totals.exit_start_runtime_ns);
        meta.ebpf.torn_slice_reads = torn_slice_reads;
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
        let skipped: Vec<String> = meta
            .ebpf
            .recursion_misses
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(p, n)| format!("{p} {n}"))
            .collect();
        if !skipped.is_empty() {
            log::warn!(
                "the kernel skipped runs of programs that would have run nested on their own CPU:                  {} (see meta.json ebpf.recursion_misses)",
                skipped.join(", ")
            );
        }
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
            Event::Finished {
                reason,
                buckets: clock.closed(),
            },
        )?;
        out.sync()?;
        Ok(())
    }
}

/// QEMU's command line, for the gateway's `mac=`: the command given, or
/// the running target's.
fn qemu_argv(cfg: &TraceConfig, pid: i32) -> Vec<String> {
    if cfg.command.is_empty() {
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
    }
}

/// Why a served episode ended with no done.marker when its client got a
/// second signal.
pub(super) const ABORTED: &str =
    "aborted: the client got a second signal while finishing; the episode has no done.marker";

/// Resolves when a served episode's client asks for an abort (its other
/// messages are of no use once the episode finishes); never if the client
/// is gone without asking.
pub(super) async fn abort_asked(mut rx: tokio::sync::mpsc::UnboundedReceiver<Stop>) {
    while let Some(stop) = rx.recv().await {
        if let Stop::Abort = stop {
            return;
        }
    }
    std::future::pending().await
}

/// A second SIGINT or SIGTERM while finishing aborts at once: no
/// done.marker, so nothing picks up a half-finished episode. A spawned
/// command is killed with it rather than left behind.
fn abort_on_second_signal(target: &Target, mut signals: Signals) {
    let killer = target.killer();
    tokio::spawn(async move {
        tokio::select! {
            _ = signals.int.recv() => {}
            _ = signals.term.recv() => {}
        }
        if let Some(fd) = &killer {
            let _ = crate::target::pidfd_send_signal(fd, libc::SIGKILL);
        }
        crate::sources::gateway::emergency_detach();
        eprintln!("error: second signal while finishing: aborted, the episode has no done.marker");
        std::process::exit(130);
    });
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
        Event::TargetTerminated { signal: "SIGTERM" },
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
        Event::TargetTerminated { signal: "SIGKILL" },
    )?;
    Ok(())
}
