//! QEMU's own statistics over its QMP socket (`telemetry-qmp.jsonl`).
//!
//! At every bucket boundary the source asks QEMU, over QMP, for its counters
//! and returns what grew since the previous boundary:
//!
//! - Block: `query-blockstats`, per guest disk (named by its `device`, or by
//!   `qdev` then `node-name` when `device` is empty, as for `-blockdev` +
//!   `-device`), the front-end (`stats`, what the guest asked for, not the
//!   backing file's `parent` stats) `rd_bytes`, `wr_bytes`, `rd_operations`,
//!   `wr_operations` -> `blk_by_dev` and the `blk_*` totals. A disk that
//!   appears later counts from zero; one whose counters went backwards
//!   (unplugged and plugged again under the same name) counts from zero too.
//! - vCPUs: `query-stats {"target": "vcpu"}` (QEMU 7.1+), the KVM statistic
//!   `exits` summed over vCPUs -> `kvm_exits`. Only KVM provides vCPU
//!   statistics: under TCG QEMU returns an empty list, so the source checks
//!   once at connect time (and `query-kvm` says why) and `kvm_exits` stays
//!   `None`; `QmpInfo::vcpu_stats` says why.
//! - Network: QEMU has no per-netdev byte or packet counters over QMP; the
//!   `net_*` fields stay `None`.
//!
//! Every sample is bounded by its timeout. A timeout, an error reply or a
//! malformed reply leaves that family's fields `None` for the bucket and is
//! counted in `QmpInfo::errors`; the previous counters are kept, so the next
//! good sample's delta covers both buckets and an episode's sums stay right.
//! QEMU closing the socket (the guest powered off, QEMU exited) is the end of
//! the source, not an error of the episode: it marks itself closed and
//! returns all-`None` rows from then on, and the events it got before (the
//! `SHUTDOWN`) are kept for [`QmpSource::take_events`]. A close that was not
//! announced by a `SHUTDOWN` event (QEMU killed or crashed) counts as one
//! error.
//!
//! QEMU serves one client per QMP socket: if another client holds it, the
//! connection is queued by the kernel and the greeting never comes, so
//! [`QmpSource::connect`] fails with a timeout.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{
    qmp::{QmpClient, QmpError, QmpEvent},
    row::{BlkCounters, Measures},
};

/// What meta.json says about the QMP source.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QmpInfo {
    /// The QMP socket.
    pub socket: String,
    /// QEMU's version from the QMP greeting (`7.2.22 (Debian ...)`).
    pub qemu_version: Option<String>,
    /// "ok", or why `blk_*` is `None`.
    pub blockstats: String,
    /// "ok", or why `kvm_exits` is `None`.
    pub vcpu_stats: String,
    /// Why the `net_*` fields are `None`.
    pub net_stats: String,
    /// Failed queries (timeouts, error replies, malformed replies) and an
    /// unannounced close.
    pub errors: u64,
    /// QEMU closed the socket; the rows after that are all `None`.
    pub closed: bool,
}

/// Events kept for [`QmpSource::take_events`] at most (the oldest are
/// dropped beyond).
const MAX_EVENTS: usize = 4096;

const NET_STATS: &str = "not available: QEMU has no per-netdev byte or packet counters over QMP";

/// Whether `query-stats` gives vCPU exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vcpu {
    /// Not known yet (the probe failed transiently): ask again.
    Probe,
    /// KVM `exits` are available.
    Kvm,
    /// Not available; `vcpu_stats` says why.
    Off,
}

/// Samples QEMU's statistics over QMP.
#[derive(Debug)]
pub struct QmpSource {
    socket: PathBuf,
    client: Option<QmpClient>,
    qemu_version: Option<String>,
    /// `query-blockstats` is asked (false once it failed for good).
    blk_on: bool,
    blk_prev: Option<BTreeMap<String, BlkCounters>>,
    blockstats: String,
    vcpu: Vcpu,
    exits_prev: Option<u64>,
    vcpu_stats: String,
    errors: u64,
    closed: bool,
    saw_shutdown: bool,
    events: Vec<QmpEvent>,
    dropped_events: u64,
}

impl QmpSource {
    /// Connects to QEMU's QMP socket and takes the baseline, all within
    /// `timeout`. Fails if the socket cannot be connected to or QEMU does
    /// not complete the QMP handshake in time; a baseline query that fails
    /// is counted and retried at the next sample.
    pub async fn connect(socket: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let deadline = Instant::now() + timeout;
        let client = QmpClient::connect(socket, timeout)
            .await
            .with_context(|| format!("cannot connect to QEMU's QMP socket {}", socket.display()))?;
        let mut s = QmpSource {
            socket: socket.to_owned(),
            qemu_version: Some(client.version().to_string()),
            client: Some(client),
            blk_on: true,
            blk_prev: None,
            blockstats: "no sample yet".into(),
            vcpu: Vcpu::Probe,
            exits_prev: None,
            vcpu_stats: "no sample yet".into(),
            errors: 0,
            closed: false,
            saw_shutdown: false,
            events: Vec::new(),
            dropped_events: 0,
        };
        // The baseline: a sample whose deltas are all None (no previous).
        let _ = s.sample_until(deadline).await;
        Ok(s)
    }

    /// What changed since the previous call (or the baseline). Fields QMP
    /// cannot give are `None`. Returns within `timeout` (plus scheduling);
    /// on a timeout, an error or a closed socket the affected fields are
    /// `None` and the failure is counted; once closed, every row is all
    /// `None`.
    pub async fn sample(&mut self, timeout: Duration) -> Measures {
        self.sample_until(Instant::now() + timeout).await
    }

    /// The QMP events received so far (oldest first), for events.jsonl.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.collect_events();
        std::mem::take(&mut self.events)
    }

    /// What meta.json says about this source.
    pub fn info(&self) -> QmpInfo {
        QmpInfo {
            socket: self.socket.display().to_string(),
            qemu_version: self.qemu_version.clone(),
            blockstats: self.blockstats.clone(),
            vcpu_stats: self.vcpu_stats.clone(),
            net_stats: NET_STATS.into(),
            errors: self.errors,
            closed: self.closed,
        }
    }

    async fn sample_until(&mut self, deadline: Instant) -> Measures {
        let mut m = Measures::default();
        if self.closed || self.client.is_none() {
            return m;
        }
        if self.blk_on {
            self.sample_blk(&mut m, deadline).await;
        }
        if !self.closed && self.vcpu != Vcpu::Off {
            self.sample_vcpu(&mut m, deadline).await;
        }
        if !self.closed {
            // Events that came after the last reply, and an EOF already
            // there, without waiting.
            let r = match self.client.as_mut() {
                Some(c) => c.poll_events(Duration::ZERO).await,
                None => Ok(0),
            };
            match r {
                Ok(_) => {}
                Err(QmpError::Closed) => self.close(),
                Err(e) => self.failed("reading events", e),
            }
        }
        self.collect_events();
        m
    }

    async fn sample_blk(&mut self, m: &mut Measures, deadline: Instant) {
        let Some(client) = self.client.as_mut() else { return };
        let r = client.execute_until("query-blockstats", None, deadline).await;
        match r {
            Ok(v) => match parse_blockstats(&v) {
                Ok(cur) => {
                    if let Some(prev) = &self.blk_prev {
                        m.set_blk_by_dev(Some(blk_delta(prev, &cur)));
                    }
                    self.blk_prev = Some(cur);
                    self.blockstats = "ok".into();
                }
                Err(why) => {
                    self.errors += 1;
                    log::warn!("QMP: unexpected query-blockstats reply: {why}");
                    if self.blk_prev.is_none() {
                        // Never worked: it will not start working.
                        self.blk_on = false;
                        self.blockstats = format!("unexpected query-blockstats reply: {why}");
                    }
                }
            },
            Err(QmpError::Command { class, desc }) if self.blk_prev.is_none() => {
                self.errors += 1;
                self.blk_on = false;
                self.blockstats = format!("query-blockstats failed: {class}: {desc}");
                log::warn!("QMP: {}", self.blockstats);
            }
            Err(e) => {
                if self.blk_prev.is_none() && !matches!(e, QmpError::Closed) {
                    self.blockstats = format!("no baseline yet: {e}");
                }
                self.failed("query-blockstats", e);
            }
        }
    }

    async fn sample_vcpu(&mut self, m: &mut Measures, deadline: Instant) {
        let Some(client) = self.client.as_mut() else { return };
        let r = client.execute_until("query-stats", Some(json!({"target": "vcpu"})), deadline).await;
        match r {
            Ok(v) => match sum_kvm_exits(&v) {
                Ok(Some(cur)) => {
                    if self.vcpu == Vcpu::Kvm
                        && let Some(prev) = self.exits_prev
                    {
                        // A sum that went down (a vCPU unplugged): no delta
                        // for this bucket.
                        m.kvm_exits = cur.checked_sub(prev);
                    }
                    self.vcpu = Vcpu::Kvm;
                    self.exits_prev = Some(cur);
                    self.vcpu_stats = "ok".into();
                }
                Ok(None) if self.vcpu == Vcpu::Probe => {
                    let entries = v.as_array().map_or(0, Vec::len);
                    let kvm = self.kvm_state(deadline).await;
                    self.vcpu = Vcpu::Off;
                    self.vcpu_stats =
                        format!("query-stats (target vcpu) gave no KVM 'exits' statistic ({entries} entries): {kvm}");
                    log::info!("QMP: kvm_exits not available: {}", self.vcpu_stats);
                }
                Ok(None) => {
                    self.errors += 1;
                    log::warn!("QMP: query-stats no longer gives the KVM 'exits' statistic");
                }
                Err(why) => {
                    self.errors += 1;
                    log::warn!("QMP: unexpected query-stats reply: {why}");
                    if self.vcpu == Vcpu::Probe {
                        self.vcpu = Vcpu::Off;
                        self.vcpu_stats = format!("unexpected query-stats reply: {why}");
                    }
                }
            },
            Err(QmpError::Command { class, desc }) if self.vcpu == Vcpu::Probe => {
                // Not an error of the episode: this QEMU cannot say.
                self.vcpu = Vcpu::Off;
                self.vcpu_stats = if class == "CommandNotFound" {
                    format!("query-stats is not available (QEMU before 7.1): {class}: {desc}")
                } else {
                    format!("query-stats (target vcpu) failed: {class}: {desc}")
                };
                log::info!("QMP: kvm_exits not available: {}", self.vcpu_stats);
            }
            Err(e) => {
                if self.vcpu == Vcpu::Probe && !matches!(e, QmpError::Closed) {
                    self.vcpu_stats = format!("not probed yet: {e}");
                }
                self.failed("query-stats", e);
            }
        }
    }

    /// Why there are no vCPU statistics, from `query-kvm`.
    async fn kvm_state(&mut self, deadline: Instant) -> String {
        let Some(client) = self.client.as_mut() else {
            return "QEMU closed the socket".into();
        };
        match client.execute_until("query-kvm", None, deadline).await {
            Ok(v) if v["enabled"] == true => "KVM is enabled but gives no vCPU exits".into(),
            Ok(v) if v["present"] == true => {
                "KVM is not in use (QEMU runs under TCG, which has no vCPU statistics)".into()
            }
            Ok(_) => "KVM is not in use (QEMU runs under TCG, which has no vCPU statistics; no KVM on this host)".into(),
            Err(QmpError::Closed) => {
                self.close();
                "QEMU closed the socket".into()
            }
            Err(e) => format!("only KVM has vCPU statistics (query-kvm: {e})"),
        }
    }

    /// A query failed: count it, or close on `Closed`.
    fn failed(&mut self, what: &str, e: QmpError) {
        if matches!(e, QmpError::Closed) || self.client.as_ref().is_some_and(QmpClient::is_closed) {
            if !matches!(e, QmpError::Closed) {
                // An I/O error that broke the socket.
                self.errors += 1;
                log::warn!("QMP: {what}: {e}");
            }
            self.close();
        } else {
            self.errors += 1;
            log::warn!("QMP: {what}: {e}");
        }
    }

    /// QEMU has closed the socket: keep its events, drop the client.
    fn close(&mut self) {
        self.collect_events();
        self.client = None;
        if !self.closed {
            self.closed = true;
            if self.saw_shutdown {
                log::info!("QMP: QEMU closed the socket after SHUTDOWN");
            } else {
                self.errors += 1;
                log::warn!("QMP: QEMU closed the socket without a SHUTDOWN event");
            }
        }
    }

    /// Moves the client's queued events here.
    fn collect_events(&mut self) {
        let Some(client) = self.client.as_mut() else { return };
        for e in client.take_events() {
            if e.event == "SHUTDOWN" {
                self.saw_shutdown = true;
            }
            if self.events.len() >= MAX_EVENTS {
                self.events.remove(0);
                self.dropped_events += 1;
                if self.dropped_events == 1 {
                    log::warn!("QMP: more than {MAX_EVENTS} events not taken; dropping the oldest");
                }
            }
            self.events.push(e);
        }
    }
}

/// The per-disk counters of a `query-blockstats` reply.
fn parse_blockstats(v: &Value) -> Result<BTreeMap<String, BlkCounters>, String> {
    let list = v.as_array().ok_or("not a list")?;
    let mut out = BTreeMap::new();
    for (i, dev) in list.iter().enumerate() {
        let name = ["device", "qdev", "node-name"]
            .into_iter()
            .filter_map(|k| dev.get(k).and_then(Value::as_str))
            .find(|s| !s.is_empty())
            .map_or_else(|| format!("#{i}"), str::to_owned);
        let stats = dev
            .get("stats")
            .and_then(Value::as_object)
            .ok_or_else(|| format!("disk {name} has no 'stats' object"))?;
        let get = |k: &str| {
            stats
                .get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("disk {name} has no unsigned '{k}'"))
        };
        let c = BlkCounters {
            read_bytes: get("rd_bytes")?,
            write_bytes: get("wr_bytes")?,
            read_ops: get("rd_operations")?,
            write_ops: get("wr_operations")?,
        };
        // Two entries with one name (not expected): their sum.
        let e = out.entry(name).or_insert_with(BlkCounters::default);
        e.read_bytes += c.read_bytes;
        e.write_bytes += c.write_bytes;
        e.read_ops += c.read_ops;
        e.write_ops += c.write_ops;
    }
    Ok(out)
}

/// Growth per disk; a new disk, or one whose counters went backwards (a new
/// device under the same name), counts from zero.
fn blk_delta(prev: &BTreeMap<String, BlkCounters>, cur: &BTreeMap<String, BlkCounters>) -> BTreeMap<String, BlkCounters> {
    cur.iter()
        .map(|(name, c)| {
            let d = match prev.get(name) {
                Some(p)
                    if c.read_bytes >= p.read_bytes
                        && c.write_bytes >= p.write_bytes
                        && c.read_ops >= p.read_ops
                        && c.write_ops >= p.write_ops =>
                {
                    BlkCounters {
                        read_bytes: c.read_bytes - p.read_bytes,
                        write_bytes: c.write_bytes - p.write_bytes,
                        read_ops: c.read_ops - p.read_ops,
                        write_ops: c.write_ops - p.write_ops,
                    }
                }
                _ => *c,
            };
            (name.clone(), d)
        })
        .collect()
}

/// The KVM statistic `exits` summed over the vCPUs of a `query-stats`
/// reply; `None` if no vCPU has it (TCG: an empty list).
fn sum_kvm_exits(v: &Value) -> Result<Option<u64>, String> {
    let list = v.as_array().ok_or("not a list")?;
    let mut sum: Option<u64> = None;
    for entry in list {
        if entry.get("provider").and_then(Value::as_str) != Some("kvm") {
            continue;
        }
        let stats = entry.get("stats").and_then(Value::as_array).ok_or("a KVM entry has no 'stats' list")?;
        for s in stats {
            if s.get("name").and_then(Value::as_str) == Some("exits") {
                let n = s
                    .get("value")
                    .and_then(Value::as_u64)
                    .ok_or("a KVM 'exits' value is not an unsigned integer")?;
                sum = Some(sum.unwrap_or(0).saturating_add(n));
            }
        }
    }
    Ok(sum)
}
