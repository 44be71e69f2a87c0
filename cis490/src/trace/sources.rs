//! Every source sampled at a bucket boundary, stamped with one clock pair
//! and `seq`; and the QMP source's connection states.

use std::{borrow::Cow, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use serde_json::json;
use tokio::time::Instant;

use super::outputs::Outputs;
use crate::{
    clock::{BucketClock, ClockPair, Tick},
    ebpf::EbpfSource,
    event::{Event, QmpDetail},
    row::{Row, SourceKind},
    sources::{
        SampleCtx, Source, gateway::GatewaySource, guest::GuestSource, perf::PerfSource,
        proc::ProcSource, qmp::QmpSource,
    },
    taps::{self, Holdings},
};

/// The sources, and what the coordinator knows about the target that they
/// share (its tap interfaces and KVM VM, from its fds).
pub(super) struct Sources {
    pub(super) pid: i32,
    pub(super) episode_id: String,
    pub(super) ebpf: EbpfSource,
    pub(super) proc: Option<ProcSource>,
    pub(super) perf: Option<PerfSource>,
    pub(super) qmp: Option<QmpSlot>,
    pub(super) guest: Option<GuestSource>,
    pub(super) gateway: Option<GatewaySource>,
    /// How long a QMP query may take within a bucket.
    pub(super) qmp_timeout: Duration,
    /// Buckets whose QMP row has no data at all (not connected yet or any
    /// more, or QEMU not answering in time).
    pub(super) qmp_empty_buckets: u64,
    pub(super) holdings: Holdings,
    pub(super) holdings_at: Option<Instant>,
    /// Where the target's taps live (from its tun/tap fds).
    pub(super) taps: taps::Resolver,
    /// The longest spread of the host-side sources' reads at one boundary
    /// (`meta.json` `read_spread_max_ns`).
    pub(super) read_spread_max_ns: u64,
}

/// Times the host-side sources' reads at one boundary: from the start of
/// the first to the end of the last.
#[derive(Default)]
struct Spread {
    first: Option<std::time::Instant>,
    last: Option<std::time::Instant>,
}

impl Spread {
    /// Runs one host-side source's read (eBPF, /proc, perf), timed.
    fn read<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let start = std::time::Instant::now();
        self.first.get_or_insert(start);
        let out = f();
        self.last = Some(std::time::Instant::now());
        out
    }

    fn ns(&self) -> u64 {
        match (self.first, self.last) {
            (Some(a), Some(b)) => u64::try_from(b.duration_since(a).as_nanos()).unwrap_or(u64::MAX),
            _ => 0,
        }
    }
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
            Ok(mut h) => {
                h.tap_ifs = self.taps.resolve(self.pid, &h.tap_fds);
                self.holdings = h;
            }
            Err(e) => log::debug!("fds of {}: {e}", self.pid),
        }
    }

    /// Takes every source's baseline at one instant.
    pub(super) async fn baseline(&mut self) -> Result<()> {
        self.refresh_holdings();
        let ctx = SampleCtx {
            holdings: Cow::Borrowed(&self.holdings),
            taps: Some(&self.taps),
        };
        let mut spread = Spread::default();
        spread.read(|| Source::sample(&mut self.ebpf, &ctx))?;
        spread.read(|| sample_opt(&mut self.proc, &ctx))?;
        spread.read(|| sample_opt(&mut self.perf, &ctx))?;
        self.read_spread_max_ns = self.read_spread_max_ns.max(spread.ns());
        if let Some(g) = &mut self.gateway {
            g.sample()?;
        }
        if let Some(q) = &mut self.qmp {
            q.sample(self.qmp_timeout, self.pid).await?;
        }
        Ok(())
    }

    /// Closes the bucket at `now`: one row per source, stamped with the same
    /// clock pair and `seq`.
    pub(super) async fn close_bucket(
        &mut self,
        clock: &mut BucketClock,
        out: &mut Outputs,
        now: ClockPair,
    ) -> Result<Tick> {
        self.refresh_holdings();
        let tick = clock.close(now);
        let ctx = SampleCtx {
            holdings: Cow::Borrowed(&self.holdings),
            taps: Some(&self.taps),
        };
        let mut drops = 0;
        let mut spread = Spread::default();
        for (kind, file) in &mut out.rows {
            let m = match kind {
                SourceKind::Ebpf => spread.read(|| Source::sample(&mut self.ebpf, &ctx))?,
                SourceKind::Proc => spread.read(|| sample_opt(&mut self.proc, &ctx))?,
                SourceKind::Perf => spread.read(|| sample_opt(&mut self.perf, &ctx))?,
                SourceKind::Qmp => match &mut self.qmp {
                    Some(q) => {
                        let m = q.sample(self.qmp_timeout, self.pid).await?;
                        if m == crate::row::Measures::default() {
                            self.qmp_empty_buckets += 1;
                        }
                        m
                    }
                    None => crate::row::Measures::default(),
                },
                SourceKind::Guest => match &mut self.guest {
                    Some(g) => g.sample(now),
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
        self.read_spread_max_ns = self.read_spread_max_ns.max(spread.ns());
        if drops > 0 {
            // Not silent: the loss shows in events.jsonl and on stderr.
            out.event(
                now,
                Some(tick.seq),
                Event::Drops {
                    dropped_records: drops,
                },
            )?;
            log::warn!(
                "bucket {}: {drops} ring-buffer records dropped (rows stay exact)",
                tick.seq
            );
        }
        if let Some(q) = &mut self.qmp {
            for (at, detail) in q.take_events(now) {
                out.event(at, clock.seq_of(at.mono_ns), Event::Qmp(detail))?;
            }
        }
        if let Some(g) = &mut self.guest {
            for (at, e) in g.take_events() {
                out.event(at, Some(tick.seq), Event::Guest(e))?;
            }
        }
        let new_taps = self.ebpf.take_new_taps();
        for tap in &new_taps {
            out.event(
                now,
                Some(tick.seq),
                Event::TapAttached {
                    name: &tap.name,
                    ifindex: tap.ifindex,
                    netns_inum: tap.netns_inum,
                },
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
pub(super) enum QmpSlot {
    Pending {
        path: PathBuf,
        since: Instant,
        last_error: Option<String>,
    },
    Connected(Box<QmpSource>),
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
    /// does not answer in time). Fails when the socket's QEMU is not the
    /// target (`target`): its rows would be another process's.
    pub(super) async fn sample(
        &mut self,
        timeout: Duration,
        target: i32,
    ) -> Result<crate::row::Measures> {
        if let QmpSlot::Pending {
            path,
            since,
            last_error,
        } = self
        {
            match QmpSource::connect(path, timeout).await {
                Ok(src) => {
                    if let Some(peer) = src.peer_pid() {
                        same_process(target, peer, path)?;
                    }
                    *self = QmpSlot::Connected(Box::new(src));
                }
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
            return Ok(crate::row::Measures::default());
        }
        Ok(match self {
            QmpSlot::Connected(src) => src.sample(timeout).await,
            _ => crate::row::Measures::default(),
        })
    }

    /// At the end of tracing: a connection still not made is a failure,
    /// reported like one (an event and meta.json's `qmp.error`).
    pub(super) fn give_up(&mut self) {
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
    pub(super) fn take_events(&mut self, now: ClockPair) -> Vec<(ClockPair, QmpDetail<'_>)> {
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
                    let detail = QmpDetail::Event {
                        qmp_event: e.event,
                        data: e.data,
                    };
                    (at, detail)
                })
                .collect(),
            QmpSlot::Failed {
                path,
                why,
                reported,
            } if !*reported => {
                *reported = true;
                vec![(
                    now,
                    QmpDetail::Error {
                        qmp_error: why,
                        socket: path,
                    },
                )]
            }
            _ => Vec::new(),
        }
    }

    pub(super) fn info(&self) -> serde_json::Value {
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
pub(super) fn kick_cpus() {
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

/// Refuses a QMP socket served by another process than the target: its
/// rows would be another VM's, or the target is a wrapper (a shell, a
/// supervisor) whose child is QEMU, and then the eBPF and /proc rows would
/// not be QEMU's either.
fn same_process(target: i32, peer: i32, socket: &std::path::Path) -> Result<()> {
    if peer == target {
        return Ok(());
    }
    if is_descendant(peer, target) {
        anyhow::bail!(
            "the QMP socket {} is served by pid {peer}, a child of the traced pid {target}: \
             the target is a wrapper of QEMU; trace QEMU itself (--target-pid {peer})",
            socket.display()
        );
    }
    anyhow::bail!(
        "the QMP socket {} is served by pid {peer}, not by the traced pid {target}: its \
         rows would be another process's; give --qmp the traced QEMU's own socket",
        socket.display()
    )
}

/// Whether `pid` descends from `ancestor` (its parents, from /proc).
fn is_descendant(pid: i32, ancestor: i32) -> bool {
    let mut p = pid;
    for _ in 0..64 {
        let Ok(stat) = procfs::process::Process::new(p).and_then(|p| p.stat()) else {
            return false;
        };
        if stat.ppid == ancestor {
            return true;
        }
        if stat.ppid <= 1 {
            return false;
        }
        p = stat.ppid;
    }
    false
}
