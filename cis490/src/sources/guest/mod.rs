//! The `guest` source: the in-guest agent's lines (cis490-agent,
//! docs/agent-protocol.md) read from QEMU's virtio-serial chardev socket
//! (`--guest-agent SOCKET`). The inside view a deployed sensor would have,
//! so `available_in_deployment: true`; and hostile input, so every line is
//! bounded, validated and counted ([`reader`]), and a counter is trusted
//! only as a delta that a guest could have produced ([`step`]).
//!
//! A line belongs to the bucket whose boundary follows its arrival on the
//! host's clock; the guest's own timestamps are data only.

pub mod fields;
pub mod lines;
pub mod reader;
pub mod validate;

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use cis490_agent::protocol::{AgentLine, CpuTimes, Disk, MAX_INTERVAL_MS, MAX_LINE_BYTES, NetIf};
use serde::{Deserialize, Serialize};

pub use fields::GuestMeasures;
use reader::{Arrived, BadReason, Reader, ReaderTotals};

use crate::{clock::ClockPair, row::Measures};

/// The slowest the agent is asked to write is the bucket interval, but
/// never faster than this (reading /proc costs the guest).
pub const MIN_AGENT_INTERVAL_MS: u64 = 100;
/// Growth a guest cannot produce, per second of host time since the
/// previous line plus [`SLACK_S`]: CPU time of 1024 CPUs, 64 GiB/s per
/// direction on the network or disks.
const ABSURD_CPU_NS_PER_S: u128 = 1024 * 1_000_000_000;
const ABSURD_BYTES_PER_S: u128 = 64 << 30;
/// Lines may queue in the guest and QEMU and arrive in a burst.
const SLACK_S: u128 = 10;

/// What events.jsonl says about the guest source (`Event::Guest`).
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GuestEvent {
    GuestConnected {
        socket: String,
    },
    GuestDisconnected {
        socket: String,
        why: String,
    },
    /// Connection events past the per-bucket cap.
    GuestConnectionsUnlisted {
        count: u64,
    },
    /// A process the agent saw start.
    GuestExec {
        pid: u32,
        ppid: u32,
        comm: String,
        guest_seq: u64,
    },
    /// Started processes the agent counted but did not list.
    GuestExecsLeftOut {
        count: u64,
        guest_seq: u64,
    },
    GuestBadLine {
        reason: BadReason,
        bytes: u64,
        detail: String,
    },
    /// Bad lines of the bucket past the cap on described ones.
    GuestBadLinesUnlisted {
        count: u64,
    },
    /// Lines skipped unread in the bucket past the flood cap.
    GuestFlood {
        skipped: u64,
        cap: u32,
    },
    /// The guest's boot id changed: its counters restarted from a new
    /// baseline.
    GuestReboot {
        boot_id: String,
    },
    /// The socket never answered while tracing.
    GuestNeverConnected {
        socket: String,
        error: String,
    },
}

/// What meta.json's `guest_agent` says.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuestInfo {
    pub socket: String,
    /// The interval the agent was asked for, ms.
    pub agent_interval_ms: u64,
    pub line_cap_bytes: usize,
    pub flood_cap_lines_per_bucket: u32,
    /// Lines accepted (the sum of `guest_lines`).
    pub lines: u64,
    /// Lines that parsed but were rejected against the previous line
    /// (counter going back, absurd growth).
    pub lines_rejected_as_deltas: u64,
    #[serde(flatten)]
    pub reader: ReaderTotals,
    /// Set when the socket never answered.
    pub error: Option<String>,
}

/// The previous accepted line's counters.
#[derive(Clone, Debug)]
struct Prev {
    at_mono_ns: u64,
    boot_id: String,
    cpu: CpuTimes,
    net: BTreeMap<String, NetIf>,
    disks: BTreeMap<String, Disk>,
}

impl Prev {
    fn of(a: &Arrived) -> Self {
        Self {
            at_mono_ns: a.at.mono_ns,
            boot_id: a.line.boot_id.clone(),
            cpu: a.line.cpu,
            net: a.line.net.clone(),
            disks: a.line.disks.clone(),
        }
    }
}

/// Counter deltas of one line, or of a bucket's lines summed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Delta {
    cpu_user: u64,
    cpu_system: u64,
    cpu_idle: u64,
    cpu_iowait: u64,
    net_tx: u64,
    net_rx: u64,
    disk_read: u64,
    disk_write: u64,
}

impl Delta {
    fn add(&mut self, d: &Delta) {
        let pairs = [
            (&mut self.cpu_user, d.cpu_user),
            (&mut self.cpu_system, d.cpu_system),
            (&mut self.cpu_idle, d.cpu_idle),
            (&mut self.cpu_iowait, d.cpu_iowait),
            (&mut self.net_tx, d.net_tx),
            (&mut self.net_rx, d.net_rx),
            (&mut self.disk_read, d.disk_read),
            (&mut self.disk_write, d.disk_write),
        ];
        for (a, b) in pairs {
            *a = a.saturating_add(b);
        }
    }
}

/// What a line means after the previous one.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Delta(Delta),
    /// Another boot: the line is a new baseline.
    Reboot,
}

/// The line's deltas since `prev`, or why it cannot be trusted. An
/// interface or disk new in this line starts from its current counters.
fn step(prev: &Prev, a: &Arrived) -> Result<Step, (BadReason, String)> {
    let l = &a.line;
    if l.boot_id != prev.boot_id {
        return Ok(Step::Reboot);
    }
    let mut d = Delta::default();
    let sub = |name: &str, now: u64, before: u64, acc: &mut u64| match now.checked_sub(before) {
        Some(x) => {
            *acc = acc.saturating_add(x);
            Ok(())
        }
        None => Err((
            BadReason::CounterWentBack,
            format!("{name} went from {before} to {now}"),
        )),
    };
    let (c, p) = (&l.cpu, &prev.cpu);
    sub("cpu.user_ns", c.user_ns, p.user_ns, &mut d.cpu_user)?;
    sub("cpu.system_ns", c.system_ns, p.system_ns, &mut d.cpu_system)?;
    sub("cpu.idle_ns", c.idle_ns, p.idle_ns, &mut d.cpu_idle)?;
    sub("cpu.iowait_ns", c.iowait_ns, p.iowait_ns, &mut d.cpu_iowait)?;
    for (name, n) in &l.net {
        if let Some(b) = prev.net.get(name) {
            sub(
                &format!("net.{name}.tx_bytes"),
                n.tx_bytes,
                b.tx_bytes,
                &mut d.net_tx,
            )?;
            sub(
                &format!("net.{name}.rx_bytes"),
                n.rx_bytes,
                b.rx_bytes,
                &mut d.net_rx,
            )?;
        }
    }
    for (name, n) in &l.disks {
        if let Some(b) = prev.disks.get(name) {
            sub(
                &format!("disks.{name}.read_bytes"),
                n.read_bytes,
                b.read_bytes,
                &mut d.disk_read,
            )?;
            sub(
                &format!("disks.{name}.write_bytes"),
                n.write_bytes,
                b.write_bytes,
                &mut d.disk_write,
            )?;
        }
    }
    // Host time since the previous line, plus slack, in whole seconds.
    let secs =
        (a.at.mono_ns.saturating_sub(prev.at_mono_ns) as u128).div_ceil(1_000_000_000) + SLACK_S;
    let cpu = [d.cpu_user, d.cpu_system, d.cpu_idle, d.cpu_iowait]
        .iter()
        .map(|&x| x as u128)
        .sum::<u128>();
    if cpu > secs * ABSURD_CPU_NS_PER_S {
        return Err((
            BadReason::Absurd,
            format!("{cpu} ns of CPU time in {secs} s (with slack)"),
        ));
    }
    for (what, x) in [
        ("net tx", d.net_tx),
        ("net rx", d.net_rx),
        ("disk read", d.disk_read),
        ("disk write", d.disk_write),
    ] {
        if x as u128 > secs * ABSURD_BYTES_PER_S {
            return Err((
                BadReason::Absurd,
                format!("{x} {what} bytes in {secs} s (with slack)"),
            ));
        }
    }
    Ok(Step::Delta(d))
}

/// The guest source.
pub struct GuestSource {
    socket: String,
    reader: Reader,
    agent_interval_ms: u64,
    prev: Option<Prev>,
    events: Vec<(ClockPair, GuestEvent)>,
    lines: u64,
    rejected: u64,
    error: Option<String>,
}

impl GuestSource {
    /// Starts reading `socket` (connecting as soon as QEMU creates it).
    pub fn start(socket: &Path, bucket: Duration) -> Result<Self> {
        let agent_interval_ms =
            (bucket.as_millis() as u64).clamp(MIN_AGENT_INTERVAL_MS, MAX_INTERVAL_MS);
        let reader = Reader::start(socket.to_owned(), agent_interval_ms)
            .context("cannot start the guest agent reader thread")?;
        Ok(Self {
            socket: socket.display().to_string(),
            reader,
            agent_interval_ms,
            prev: None,
            events: Vec::new(),
            lines: 0,
            rejected: 0,
            error: None,
        })
    }

    /// The bucket ending at `now`: the lines that arrived before it.
    pub fn sample(&mut self, now: ClockPair) -> Measures {
        let (arrived, mut bad, skipped) = {
            let mut s = self.reader.shared.lock().unwrap_or_else(|e| e.into_inner());
            let keep = s
                .arrived
                .iter()
                .position(|a| a.at.mono_ns > now.mono_ns)
                .unwrap_or(s.arrived.len());
            let arrived: Vec<Arrived> = s.arrived.drain(..keep).collect();
            s.lines_this_bucket = 0;
            for c in std::mem::take(&mut s.conn_events) {
                let ev = if c.connected {
                    GuestEvent::GuestConnected {
                        socket: self.socket.clone(),
                    }
                } else {
                    GuestEvent::GuestDisconnected {
                        socket: self.socket.clone(),
                        why: c.why.unwrap_or_default(),
                    }
                };
                self.events.push((c.at, ev));
            }
            let n = std::mem::take(&mut s.conn_unlisted);
            if n > 0 {
                self.events
                    .push((now, GuestEvent::GuestConnectionsUnlisted { count: n }));
            }
            for b in std::mem::take(&mut s.bad_events) {
                self.events.push((
                    b.at,
                    GuestEvent::GuestBadLine {
                        reason: b.reason,
                        bytes: b.bytes,
                        detail: b.detail,
                    },
                ));
            }
            let n = std::mem::take(&mut s.bad_unlisted);
            if n > 0 {
                self.events
                    .push((now, GuestEvent::GuestBadLinesUnlisted { count: n }));
            }
            (
                arrived,
                std::mem::take(&mut s.bad),
                std::mem::take(&mut s.skipped),
            )
        };
        if skipped > 0 {
            self.events.push((
                now,
                GuestEvent::GuestFlood {
                    skipped,
                    cap: reader::FLOOD_CAP,
                },
            ));
        }
        let mut sum = Delta::default();
        let mut any_delta = false;
        let mut lines = 0u64;
        let mut execs = 0u64;
        let mut last: Option<AgentLine> = None;
        for a in arrived {
            match self.prev.as_ref().map(|p| step(p, &a)) {
                None => {}
                Some(Ok(Step::Delta(d))) => {
                    sum.add(&d);
                    any_delta = true;
                }
                Some(Ok(Step::Reboot)) => self.events.push((
                    a.at,
                    GuestEvent::GuestReboot {
                        boot_id: a.line.boot_id.clone(),
                    },
                )),
                Some(Err((reason, detail))) => {
                    bad += 1;
                    self.rejected += 1;
                    self.events.push((
                        a.at,
                        GuestEvent::GuestBadLine {
                            reason,
                            bytes: a.bytes,
                            // As the reader's details: at most 200 characters.
                            detail: detail.chars().take(200).collect(),
                        },
                    ));
                    if reason == BadReason::CounterWentBack {
                        // Neither line is trusted: the next one is a new
                        // baseline.
                        self.prev = None;
                    }
                    continue;
                }
            }
            lines += 1;
            execs = execs
                .saturating_add(a.line.execs.len() as u64)
                .saturating_add(a.line.execs_left_out);
            for e in &a.line.execs {
                self.events.push((
                    a.at,
                    GuestEvent::GuestExec {
                        pid: e.pid,
                        ppid: e.ppid,
                        comm: e.comm.clone(),
                        guest_seq: a.line.seq,
                    },
                ));
            }
            if a.line.execs_left_out > 0 {
                self.events.push((
                    a.at,
                    GuestEvent::GuestExecsLeftOut {
                        count: a.line.execs_left_out,
                        guest_seq: a.line.seq,
                    },
                ));
            }
            self.prev = Some(Prev::of(&a));
            last = Some(a.line);
        }
        self.lines += lines;
        let mut g = GuestMeasures {
            guest_lines: Some(lines),
            guest_bad_lines: Some(bad),
            guest_skipped_lines: Some(skipped),
            ..Default::default()
        };
        if let Some(l) = last {
            g.guest_mem_used_bytes = Some(l.mem.used_bytes);
            g.guest_mem_available_bytes = Some(l.mem.available_bytes);
            g.guest_procs = Some(l.procs);
            g.guest_tcp_conns = Some(l.tcp_conns);
            g.guest_execs = Some(execs);
            if any_delta {
                g.guest_cpu_user_ns = Some(sum.cpu_user);
                g.guest_cpu_system_ns = Some(sum.cpu_system);
                g.guest_cpu_idle_ns = Some(sum.cpu_idle);
                g.guest_cpu_iowait_ns = Some(sum.cpu_iowait);
                g.guest_net_tx_bytes = Some(sum.net_tx);
                g.guest_net_rx_bytes = Some(sum.net_rx);
                g.guest_disk_read_bytes = Some(sum.disk_read);
                g.guest_disk_write_bytes = Some(sum.disk_write);
            }
        }
        Measures {
            guest: g,
            ..Default::default()
        }
    }

    /// Events since the last call, with their clock pairs.
    pub fn take_events(&mut self) -> Vec<(ClockPair, GuestEvent)> {
        let mut ev = std::mem::take(&mut self.events);
        ev.sort_by_key(|(at, _)| at.mono_ns);
        ev
    }

    /// At the end of tracing: stops the reader; a socket that never
    /// answered is reported (an event, a warning, meta.json's error).
    pub fn stop(&mut self, now: ClockPair) {
        self.reader.stop();
        let s = self.reader.shared.lock().unwrap_or_else(|e| e.into_inner());
        if s.totals.connections == 0 {
            let error = s
                .totals
                .last_error
                .clone()
                .unwrap_or_else(|| "never connected".into());
            log::warn!("guest agent source: no connection while tracing: {error}");
            self.events.push((
                now,
                GuestEvent::GuestNeverConnected {
                    socket: self.socket.clone(),
                    error: error.clone(),
                },
            ));
            self.error = Some(error);
        }
    }

    pub fn info(&self) -> GuestInfo {
        let s = self.reader.shared.lock().unwrap_or_else(|e| e.into_inner());
        GuestInfo {
            socket: self.socket.clone(),
            agent_interval_ms: self.agent_interval_ms,
            line_cap_bytes: MAX_LINE_BYTES,
            flood_cap_lines_per_bucket: reader::FLOOD_CAP,
            lines: self.lines,
            lines_rejected_as_deltas: self.rejected,
            reader: s.totals.clone(),
            error: self.error.clone(),
        }
    }
}

#[cfg(test)]
mod tests;
