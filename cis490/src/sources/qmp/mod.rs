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
//! What QEMU counted between the last sample and its exit is lost: QEMU
//! cannot be asked once it has gone (the guest's last I/O before a power-off
//! shows only if a sample came after it).
//!
//! QEMU serves one client per QMP socket: if another client holds it, the
//! connection is queued by the kernel and the greeting never comes, so
//! [`QmpSource::connect`] fails with a timeout.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::time::Instant;

pub mod client;

use self::client::{QmpClient, QmpError, QmpEvent};
use crate::row::{BlkCounters, Measures};

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
    /// QMP events dropped (oldest first) because more than 4096 arrived
    /// between two buckets; they are missing from events.jsonl.
    pub dropped_events: u64,
    /// The guest's disks as `query-block` described them when the source
    /// connected (those with a medium); empty when that failed.
    pub disks: Vec<QmpDisk>,
    /// "ok", or why `disks` is empty.
    pub disks_note: String,
}

/// One guest disk, as `query-block` describes it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct QmpDisk {
    /// Its name in `blk_by_dev` (`device`, else `qdev`, else `node-name`).
    pub name: String,
    /// The image's format driver (`raw`, `qcow2`, ...).
    pub driver: String,
    /// `cache.direct`: QEMU opened the image with O_DIRECT (`cache=none`
    /// or `directsync`), so the guest's I/O is QEMU's block I/O on the
    /// host, not the host's page cache.
    pub direct: bool,
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
    disks: Result<Vec<QmpDisk>, String>,
}

impl QmpSource {
    /// The pid of the process serving the QMP socket (QEMU), if known.
    pub fn peer_pid(&self) -> Option<i32> {
        self.client.as_ref().and_then(QmpClient::peer_pid)
    }

    /// Connects to QEMU's QMP socket and takes the baseline, all within
    /// `timeout`. Fails if the socket cannot be connected to or QEMU does
    /// not complete the QMP handshake in time; a baseline query that fails
    /// is counted and retried at the next sample.
    pub async fn connect(socket: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let deadline = Instant::now() + timeout;
        let client = QmpClient::connect(socket, timeout).await.map_err(|e| {
            let hint = match &e {
                QmpError::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    " (the socket is busy: QEMU serves one client at a time on each -qmp \
                     socket, and another holds this one; give cis490 a -qmp socket of its own, \
                     QEMU accepts several)"
                }
                QmpError::Io(io) if io.kind() == std::io::ErrorKind::NotFound => {
                    " (nothing at that path: QEMU creates it as it starts, with -qmp \
                     unix:PATH,server=on,wait=off)"
                }
                _ => "",
            };
            anyhow::anyhow!(
                "cannot connect to QEMU's QMP socket {}: {e}{hint}",
                socket.display()
            )
        })?;
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
            disks: Err("not asked".into()),
        };
        s.query_disks(deadline).await;
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
            dropped_events: self.dropped_events
                + self.client.as_ref().map_or(0, |c| c.dropped_events()),
            disks: self.disks.clone().unwrap_or_default(),
            disks_note: match &self.disks {
                Ok(_) => "ok".into(),
                Err(why) => why.clone(),
            },
        }
    }

    /// Asks once, at connect time, how the guest's disks are opened (for
    /// `cis490 check`, which holds QMP's block bytes to the host's only for
    /// raw images opened with O_DIRECT). A failure is said in
    /// `QmpInfo::disks_note`, not counted: the rows do not depend on it.
    async fn query_disks(&mut self, deadline: Instant) {
        let Some(client) = self.client.as_mut() else {
            return;
        };
        self.disks = match client.execute_until("query-block", None, deadline).await {
            Ok(v) => parse_block(&v).map_err(|e| format!("unexpected query-block reply: {e}")),
            Err(QmpError::Command { class, desc }) => {
                Err(format!("query-block failed: {class}: {desc}"))
            }
            Err(QmpError::Closed) => {
                self.close();
                Err("QEMU closed the socket".into())
            }
            Err(e) => Err(format!("query-block: {e}")),
        };
        if let Err(why) = &self.disks {
            log::info!("QMP: the guest's disks are not known: {why}");
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
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let r = client
            .execute_until("query-blockstats", None, deadline)
            .await;
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
        let Some(client) = self.client.as_mut() else {
            return;
        };
        let r = client
            .execute_until("query-stats", Some(json!({"target": "vcpu"})), deadline)
            .await;
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
                    self.vcpu_stats = format!(
                        "query-stats (target vcpu) gave no KVM 'exits' statistic ({entries} entries): {kvm}"
                    );
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
        let gone = self.client.as_ref().is_none_or(QmpClient::is_closed);
        if !matches!(e, QmpError::Closed) {
            log::warn!("QMP: {what}: {e}");
        }
        if gone || matches!(e, QmpError::Closed) {
            // QEMU closed the socket, or an I/O error broke it: close()
            // counts it unless QEMU announced its SHUTDOWN.
            self.close();
        } else {
            self.errors += 1;
        }
    }

    /// QEMU has closed the socket: keep its events, drop the client.
    fn close(&mut self) {
        self.collect_events();
        if let Some(c) = self.client.take() {
            self.dropped_events += c.dropped_events();
        }
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
        let Some(client) = self.client.as_mut() else {
            return;
        };
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

/// The per-disk counters of a `query-blockstats` reply. (This and the
/// other reply readers are `pub(crate)` for the `qmp` fuzz target.)
///
/// A drive with no medium (no `node-name`: QEMU's default empty drives
/// `floppy0`, `ide1-cd0`, `sd0`, which no guest can use) whose counters are
/// all zero is left out, so rows name only the disks a guest has; once it
/// has counted anything (a medium used, then ejected) it is kept.
pub(crate) fn parse_blockstats(v: &Value) -> Result<BTreeMap<String, BlkCounters>, String> {
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
        let has_medium = dev
            .get("node-name")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        if !has_medium && c == BlkCounters::default() {
            continue;
        }
        // Two entries with one name (not expected): their sum, saturating
        // (QEMU's counters are u64).
        let e = out.entry(name).or_insert_with(BlkCounters::default);
        e.read_bytes = e.read_bytes.saturating_add(c.read_bytes);
        e.write_bytes = e.write_bytes.saturating_add(c.write_bytes);
        e.read_ops = e.read_ops.saturating_add(c.read_ops);
        e.write_ops = e.write_ops.saturating_add(c.write_ops);
    }
    Ok(out)
}

/// The disks with a medium in a `query-block` reply, named as
/// [`parse_blockstats`] names them.
pub(crate) fn parse_block(v: &Value) -> Result<Vec<QmpDisk>, String> {
    let list = v.as_array().ok_or("not a list")?;
    let mut out = Vec::new();
    for (i, dev) in list.iter().enumerate() {
        let Some(inserted) = dev.get("inserted") else {
            // No medium: no guest I/O.
            continue;
        };
        let name = [
            dev.get("device"),
            dev.get("qdev"),
            inserted.get("node-name"),
        ]
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find(|s| !s.is_empty())
        .map_or_else(|| format!("#{i}"), str::to_owned);
        let driver = inserted
            .get("drv")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("disk {name} has no string 'drv'"))?
            .to_owned();
        let direct = inserted
            .get("cache")
            .and_then(|c| c.get("direct"))
            .and_then(Value::as_bool)
            .ok_or_else(|| format!("disk {name} has no boolean 'cache.direct'"))?;
        out.push(QmpDisk {
            name,
            driver,
            direct,
        });
    }
    Ok(out)
}

/// Growth per disk; a new disk, or one whose counters went backwards (a new
/// device under the same name), counts from zero.
pub(crate) fn blk_delta(
    prev: &BTreeMap<String, BlkCounters>,
    cur: &BTreeMap<String, BlkCounters>,
) -> BTreeMap<String, BlkCounters> {
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
pub(crate) fn sum_kvm_exits(v: &Value) -> Result<Option<u64>, String> {
    let list = v.as_array().ok_or("not a list")?;
    let mut sum: Option<u64> = None;
    for entry in list {
        if entry.get("provider").and_then(Value::as_str) != Some("kvm") {
            continue;
        }
        let stats = entry
            .get("stats")
            .and_then(Value::as_array)
            .ok_or("a KVM entry has no 'stats' list")?;
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

#[cfg(test)]
mod tests {
    use std::time::Instant as StdInstant;

    use super::client::fake::{Act, err, event, greeting, ret, serve};
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn blk(rd: u64, wr: u64, rd_ops: u64, wr_ops: u64) -> BlkCounters {
        BlkCounters {
            read_bytes: rd,
            write_bytes: wr,
            read_ops: rd_ops,
            write_ops: wr_ops,
        }
    }

    /// A `query-blockstats` reply: `virtio0` by device name, and a
    /// `-blockdev` disk with an empty device name (named by qdev).
    fn blockstats(n: u64) -> String {
        json!([
            {"device": "virtio0", "node-name": "#block180", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
             "stats": {"rd_bytes": 512 + n * 4096, "wr_bytes": n * 1_048_576, "rd_operations": 1 + n, "wr_operations": 2 * n,
                       "flush_operations": 0, "timed_stats": []},
             "parent": {"stats": {"rd_bytes": 999_999, "wr_bytes": 999_999, "rd_operations": 9, "wr_operations": 9}}},
            {"device": "", "qdev": "/machine/peripheral/disk1/virtio-backend", "node-name": "disk1",
             "stats": {"rd_bytes": 100 * n, "wr_bytes": 0, "rd_operations": n, "wr_operations": 0}}
        ])
        .to_string()
    }

    /// QEMU's default drives without a medium (no node-name, all zero) are
    /// not disks a guest has: left out; a used one stays.
    #[test]
    fn empty_default_drives_are_left_out() {
        let v = json!([
            {"device": "virtio0", "node-name": "#block180",
             "stats": {"rd_bytes": 0, "wr_bytes": 0, "rd_operations": 0, "wr_operations": 0}},
            {"device": "floppy0",
             "stats": {"rd_bytes": 0, "wr_bytes": 0, "rd_operations": 0, "wr_operations": 0}},
            {"device": "ide1-cd0",
             "stats": {"rd_bytes": 0, "wr_bytes": 0, "rd_operations": 0, "wr_operations": 0}},
            {"device": "sd0",
             "stats": {"rd_bytes": 0, "wr_bytes": 0, "rd_operations": 0, "wr_operations": 0}},
            {"device": "ide0-cd1",
             "stats": {"rd_bytes": 2048, "wr_bytes": 0, "rd_operations": 1, "wr_operations": 0}}
        ]);
        let names: Vec<String> = parse_blockstats(&v).unwrap().into_keys().collect();
        assert_eq!(names, ["ide0-cd1", "virtio0"]);
    }

    #[test]
    fn blockstats_are_parsed_per_disk_and_differenced() {
        let v: Value = serde_json::from_str(&blockstats(2)).unwrap();
        let cur = parse_blockstats(&v).unwrap();
        assert_eq!(
            cur.keys().collect::<Vec<_>>(),
            ["/machine/peripheral/disk1/virtio-backend", "virtio0"]
        );
        assert_eq!(
            cur["virtio0"],
            blk(512 + 8192, 2 << 20, 3, 4),
            "the front-end stats, not the parent's"
        );
        let prev = parse_blockstats(&serde_json::from_str(&blockstats(1)).unwrap()).unwrap();
        let d = blk_delta(&prev, &cur);
        assert_eq!(d["virtio0"], blk(4096, 1 << 20, 1, 2));
        assert_eq!(
            d["/machine/peripheral/disk1/virtio-backend"],
            blk(100, 0, 1, 0)
        );
        // A new disk counts from zero; one whose counters went back too.
        let mut prev2 = prev.clone();
        prev2.remove("virtio0");
        prev2
            .get_mut("/machine/peripheral/disk1/virtio-backend")
            .unwrap()
            .read_bytes = 1_000_000;
        let d = blk_delta(&prev2, &cur);
        assert_eq!(d["virtio0"], cur["virtio0"]);
        assert_eq!(
            d["/machine/peripheral/disk1/virtio-backend"],
            cur["/machine/peripheral/disk1/virtio-backend"]
        );
        // Node name when there is neither device nor qdev; an index last.
        let v = json!([{"device": "", "node-name": "n0", "stats": {"rd_bytes": 1, "wr_bytes": 2, "rd_operations": 3, "wr_operations": 4}},
                       {"stats": {"rd_bytes": 1, "wr_bytes": 2, "rd_operations": 3, "wr_operations": 4}}]);
        assert_eq!(
            parse_blockstats(&v).unwrap().keys().collect::<Vec<_>>(),
            ["#1", "n0"]
        );
        // Shapes QEMU never sends are errors, not zeros.
        assert!(parse_blockstats(&json!({})).is_err());
        assert!(
            parse_blockstats(&json!([{"device": "d"}]))
                .unwrap_err()
                .contains("stats")
        );
        assert!(
            parse_blockstats(&json!([{"device": "d", "stats": {"rd_bytes": -1}}]))
                .unwrap_err()
                .contains("rd_bytes")
        );
        assert_eq!(parse_blockstats(&json!([])).unwrap().len(), 0);
    }

    #[test]
    fn blockstats_of_one_name_sum_without_overflowing() {
        // Two entries named alike whose counters sum past u64::MAX panicked
        // ("attempt to add with overflow") in debug builds. Found by reading
        // the code, reproduced with the `qmp` fuzz target on
        // fuzz/seeds/qmp/crash-blockstats-duplicate-name-overflow.
        let v = json!([
            {"device": "virtio0", "stats": {"rd_bytes": u64::MAX, "wr_bytes": 1, "rd_operations": 1, "wr_operations": 0}},
            {"device": "virtio0", "stats": {"rd_bytes": 1, "wr_bytes": 2, "rd_operations": 1, "wr_operations": 0}}
        ]);
        assert_eq!(
            parse_blockstats(&v).unwrap()["virtio0"],
            blk(u64::MAX, 3, 2, 0)
        );
    }

    #[test]
    fn kvm_exits_are_summed_over_vcpus() {
        let v = json!([
            {"provider": "kvm", "qom-path": "/machine/unattached/device[0]",
             "stats": [{"name": "halt_wait_hist", "value": [1, 2]}, {"name": "exits", "value": 100}]},
            {"provider": "kvm", "qom-path": "/machine/unattached/device[1]",
             "stats": [{"name": "exits", "value": 23}]},
            {"provider": "other", "stats": [{"name": "exits", "value": 1000}]}
        ]);
        assert_eq!(sum_kvm_exits(&v).unwrap(), Some(123));
        assert_eq!(
            sum_kvm_exits(&json!([])).unwrap(),
            None,
            "TCG: no statistics"
        );
        assert!(sum_kvm_exits(&json!({})).is_err());
        assert!(
            sum_kvm_exits(
                &json!([{"provider": "kvm", "stats": [{"name": "exits", "value": "x"}]}])
            )
            .is_err()
        );
    }

    /// A fake QEMU: blockstats growing at every call, TCG (`query-stats`
    /// gives `[]`), and a hook for the `n`th query-blockstats (from 0).
    fn fake_qemu(
        mut on_blockstats: impl FnMut(u64, &Value) -> Option<Vec<Act>> + Send + 'static,
    ) -> super::client::fake::Server {
        let mut n = 0;
        serve(greeting(), move |req| match req["execute"].as_str() {
            Some("query-blockstats") => {
                let k = n;
                n += 1;
                on_blockstats(k, req).unwrap_or_else(|| vec![ret(req, &blockstats(k))])
            }
            Some("query-stats") => vec![ret(req, "[]")],
            Some("query-kvm") => vec![ret(req, r#"{"enabled": false, "present": true}"#)],
            Some("query-block") => {
                // One line, as QEMU sends it.
                let line = serde_json::from_str::<Value>(QUERY_BLOCK)
                    .unwrap()
                    .to_string();
                vec![ret(req, &line)]
            }
            _ => vec![err(req, "CommandNotFound", "unknown")],
        })
    }

    /// QEMU 7.2's `query-block` (abridged) for a `-drive if=virtio,
    /// cache=none,format=raw` disk, a `-blockdev` + `-device` qcow2 disk
    /// with the default cache, and an empty CD drive.
    const QUERY_BLOCK: &str = r##"[
        {"device": "virtio0", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
         "locked": false, "removable": false, "type": "unknown",
         "inserted": {"node-name": "#block123", "drv": "raw", "ro": false, "file": "/tmp/d.img",
                      "cache": {"writeback": true, "direct": true, "no-flush": false}}},
        {"device": "", "qdev": "/machine/peripheral/disk1/virtio-backend",
         "locked": false, "removable": false, "type": "unknown",
         "inserted": {"node-name": "disk1", "drv": "qcow2", "ro": false, "file": "/tmp/e.qcow2",
                      "cache": {"writeback": true, "direct": false, "no-flush": false}}},
        {"device": "ide1-cd0", "qdev": "/machine/unattached/device[23]", "locked": false,
         "removable": true, "type": "unknown", "tray_open": false}
    ]"##;

    #[test]
    fn query_block_names_each_disk_with_its_format_and_cache() {
        let v: Value = serde_json::from_str(QUERY_BLOCK).unwrap();
        assert_eq!(
            parse_block(&v).unwrap(),
            vec![
                QmpDisk {
                    name: "virtio0".into(),
                    driver: "raw".into(),
                    direct: true
                },
                QmpDisk {
                    name: "/machine/peripheral/disk1/virtio-backend".into(),
                    driver: "qcow2".into(),
                    direct: false
                },
            ]
        );
        assert_eq!(parse_block(&json!([])).unwrap(), vec![]);
        assert!(parse_block(&json!({})).unwrap_err().contains("not a list"));
        let no_cache = json!([{"device": "virtio0", "inserted": {"drv": "raw"}}]);
        assert_eq!(
            parse_block(&no_cache).unwrap_err(),
            "disk virtio0 has no boolean 'cache.direct'"
        );
        let no_drv =
            json!([{"device": "", "inserted": {"node-name": "n1", "cache": {"direct": true}}}]);
        assert_eq!(
            parse_block(&no_drv).unwrap_err(),
            "disk n1 has no string 'drv'"
        );
    }

    #[tokio::test]
    async fn deltas_per_disk_and_tcg_has_no_vcpu_stats() {
        let srv = fake_qemu(|_, _| None);
        let mut s = QmpSource::connect(&srv.path, T).await.unwrap();
        for _ in 0..3 {
            let m = s.sample(T).await;
            let by = m.blk_by_dev.clone().unwrap();
            assert_eq!(by["virtio0"], blk(4096, 1 << 20, 1, 2));
            assert_eq!(
                by["/machine/peripheral/disk1/virtio-backend"],
                blk(100, 0, 1, 0)
            );
            assert_eq!(
                (
                    m.blk_read_bytes,
                    m.blk_write_bytes,
                    m.blk_read_ops,
                    m.blk_write_ops
                ),
                (Some(4196), Some(1 << 20), Some(2), Some(2))
            );
            assert_eq!(m.kvm_exits, None);
            assert_eq!(
                (m.net_tx_bytes, m.net_rx_bytes, m.net_by_if.clone()),
                (None, None, None)
            );
            assert_eq!((m.cpu_ns, m.threads), (None, None));
        }
        let info = s.info();
        assert_eq!(info.qemu_version.as_deref(), Some("7.2.22 (Fake 1)"));
        assert_eq!(info.blockstats, "ok");
        assert_eq!((info.disks.len(), info.disks_note.as_str()), (2, "ok"));
        assert!(
            info.vcpu_stats.contains("TCG") && info.vcpu_stats.contains("0 entries"),
            "{}",
            info.vcpu_stats
        );
        assert!(
            info.net_stats.contains("no per-netdev"),
            "{}",
            info.net_stats
        );
        assert_eq!((info.errors, info.closed), (0, false));
        // query-stats and query-kvm are asked once (at connect), not every bucket.
        let reqs = srv.requests.lock().unwrap();
        let count = |c: &str| reqs.iter().filter(|r| r["execute"] == c).count();
        assert_eq!(
            (
                count("query-stats"),
                count("query-kvm"),
                count("query-blockstats")
            ),
            (1, 1, 4)
        );
        assert_eq!(
            reqs.iter().find(|r| r["execute"] == "query-stats").unwrap()["arguments"],
            json!({"target": "vcpu"})
        );
    }

    #[tokio::test]
    async fn kvm_exits_are_differenced() {
        let mut n = 0u64;
        let srv = serve(greeting(), move |req| match req["execute"].as_str() {
            Some("query-blockstats") => vec![ret(req, "[]")],
            Some("query-stats") => {
                n += 1;
                let v = json!([
                    {"provider": "kvm", "qom-path": "/machine/unattached/device[0]", "stats": [{"name": "exits", "value": 1000 * n}]},
                    {"provider": "kvm", "qom-path": "/machine/unattached/device[1]", "stats": [{"name": "exits", "value": 10 * n}]}
                ]);
                vec![ret(req, &v.to_string())]
            }
            _ => vec![err(req, "CommandNotFound", "unknown")],
        });
        let mut s = QmpSource::connect(&srv.path, T).await.unwrap();
        assert_eq!(s.info().vcpu_stats, "ok");
        let m = s.sample(T).await;
        assert_eq!(m.kvm_exits, Some(1010));
        // No disks: an empty map and zero totals, not None.
        assert_eq!(m.blk_by_dev, Some(BTreeMap::new()));
        assert_eq!(m.blk_read_bytes, Some(0));
        assert_eq!(s.sample(T).await.kvm_exits, Some(1010));
    }

    #[tokio::test]
    async fn query_stats_missing_is_said_and_not_asked_again() {
        let srv = serve(greeting(), |req| match req["execute"].as_str() {
            Some("query-blockstats") => vec![ret(req, &blockstats(0))],
            _ => vec![err(
                req,
                "CommandNotFound",
                "The command query-stats has not been found",
            )],
        });
        let mut s = QmpSource::connect(&srv.path, T).await.unwrap();
        let m = s.sample(T).await;
        assert_eq!(m.kvm_exits, None);
        assert_eq!(m.blk_read_bytes, Some(0));
        let info = s.info();
        assert!(
            info.vcpu_stats.contains("before 7.1"),
            "{}",
            info.vcpu_stats
        );
        assert_eq!(info.errors, 0, "a QEMU without query-stats is not an error");
        let asked = srv
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["execute"] == "query-stats")
            .count();
        assert_eq!(asked, 1);
    }

    #[tokio::test]
    async fn blockstats_failing_at_the_baseline_is_said() {
        let srv = fake_qemu(|_, req| Some(vec![err(req, "GenericError", "no block layer")]));
        let mut s = QmpSource::connect(&srv.path, T).await.unwrap();
        let m = s.sample(T).await;
        assert_eq!((m.blk_by_dev, m.blk_read_bytes), (None, None));
        let info = s.info();
        assert_eq!(
            info.blockstats,
            "query-blockstats failed: GenericError: no block layer"
        );
        assert_eq!(info.errors, 1);
        let asked = srv
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r["execute"] == "query-blockstats")
            .count();
        assert_eq!(asked, 1, "not asked again");
    }

    #[tokio::test]
    async fn a_timeout_is_a_none_row_and_the_next_delta_covers_it() {
        // The 2nd query-blockstats (the 1st sample after the baseline) is
        // answered late: with the 3rd one.
        let held = std::sync::Arc::new(std::sync::Mutex::new(None::<Value>));
        let srv = fake_qemu(move |k, req| match k {
            1 => {
                *held.lock().unwrap() = Some(req.clone());
                Some(vec![])
            }
            2 => {
                let first = held.lock().unwrap().take().unwrap();
                Some(vec![ret(&first, &blockstats(1)), ret(req, &blockstats(2))])
            }
            _ => None,
        });
        let mut s = QmpSource::connect(&srv.path, T).await.unwrap();
        let t0 = StdInstant::now();
        let m = s.sample(Duration::from_millis(300)).await;
        let took = t0.elapsed();
        assert!(took < Duration::from_millis(1500), "{took:?}");
        assert_eq!(m, Measures::default(), "a timed-out bucket is all None");
        assert_eq!((s.info().errors, s.info().closed), (1, false));
        let m = s.sample(T).await;
        assert_eq!(
            m.blk_by_dev.unwrap()["virtio0"],
            blk(2 * 4096, 2 << 20, 2, 4),
            "two buckets' growth"
        );
        assert_eq!(s.info().errors, 1);
    }

    #[tokio::test]
    async fn qemu_closing_after_shutdown_ends_the_source_quietly() {
        let srv = fake_qemu(|k, req| {
            (k == 2)
                .then(|| {
                    vec![
                        event(
                            "SHUTDOWN",
                            Some(r#"{"guest": true, "reason": "guest-shutdown"}"#),
                        ),
                        Act::Close,
                    ]
                })
                .or_else(|| (k == 1).then(|| vec![ret(req, &blockstats(1)), event("STOP", None)]))
        });
        let mut s = QmpSource::connect(&srv.path, T).await.unwrap();
        assert!(s.sample(T).await.blk_by_dev.is_some());
        let t0 = StdInstant::now();
        let m = s.sample(T).await;
        assert_eq!(m, Measures::default());
        assert!(s.info().closed);
        assert_eq!(s.info().errors, 0, "a close after SHUTDOWN is not an error");
        for _ in 0..3 {
            assert_eq!(s.sample(T).await, Measures::default());
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "closed: no waiting");
        let ev = s.take_events();
        assert_eq!(
            ev.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(),
            ["STOP", "SHUTDOWN"]
        );
        assert_eq!(ev[1].data["reason"], "guest-shutdown");
        assert!(s.take_events().is_empty());
    }

    #[tokio::test]
    async fn an_unannounced_close_is_counted() {
        let srv = fake_qemu(|k, _| (k == 1).then(|| vec![Act::Close]));
        let mut s = QmpSource::connect(&srv.path, T).await.unwrap();
        assert_eq!(s.sample(T).await, Measures::default());
        let info = s.info();
        assert!(info.closed);
        assert_eq!(info.errors, 1);
        assert!(s.take_events().is_empty());
    }

    #[tokio::test]
    async fn a_silent_qemu_fails_connect_in_time() {
        let srv = serve(vec![Act::Hang], |_| vec![]);
        let t0 = StdInstant::now();
        let e = QmpSource::connect(&srv.path, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(format!("{e:#}").contains("timeout"), "{e:#}");
    }
}
