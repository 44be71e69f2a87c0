//! The episode dataset: complete episodes converted to a Hive-partitioned
//! Parquet dataset (`cis490 export`, [`export`]) and shipped to object
//! storage or a directory (`cis490 ship`, [`ship`]). The layout and every
//! column are in `docs/data-model.md` ("The Parquet dataset"); the Arrow
//! schemas are in [`schema`].
//!
//! An episode is read whole and typed here ([`Episode::read`]): the rows as
//! [`Row`], labels as [`LabelLine`], events as an envelope plus the rest of
//! the line. Only complete episodes (`done.marker` present, `status:
//! "complete"`) are read; anything malformed is an error naming the file and
//! line, never skipped.

pub mod export;
pub mod schema;
pub mod ship;

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{
    episode::{DONE, EVENTS, LABELS, META},
    row::{Row, SourceKind},
};

/// The version of the dataset layout and columns (`docs/data-model.md`).
/// Bumped on any change a reader could notice.
pub const DATASET_VERSION: u32 = 2;

/// The partition value Hive, Spark and DuckDB read as `NULL`.
pub const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// The parts of `meta.json` the dataset uses (the whole text is kept too).
#[derive(Clone, Debug, Deserialize)]
pub struct MetaIn {
    pub schema_version: u32,
    pub id: String,
    pub status: String,
    pub cis490_version: String,
    pub host: HostIn,
    pub target: TargetIn,
    pub interval_ns: u64,
    pub duration_limit_s: Option<f64>,
    pub start: Option<ClockIn>,
    pub end: Option<ClockIn>,
    pub end_reason: Option<String>,
    pub sources: Vec<SourceIn>,
    pub skipped_boundaries: u64,
    /// Episodes traced before `--tag` existed have none.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct HostIn {
    pub hostname: String,
    pub kernel_release: String,
    pub cpus: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct TargetIn {
    pub pid: i64,
    pub mode: String,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
pub struct ClockIn {
    pub t_mono_ns: u64,
    pub t_wall_ns: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct SourceIn {
    pub source: SourceKind,
    pub file: String,
}

/// One line of `labels.jsonl`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelLine {
    pub t_mono_ns: u64,
    pub t_wall_ns: u64,
    pub seq: Option<u64>,
    pub label: String,
    pub via: String,
}

/// One line of `events.jsonl`: the envelope, and the event's own fields.
#[derive(Clone, Debug)]
pub struct EventLine {
    pub t_mono_ns: u64,
    pub t_wall_ns: u64,
    pub seq: Option<u64>,
    pub event: String,
    /// The other fields, in the order of the line.
    pub data: Map<String, Value>,
}

impl EventLine {
    fn parse(line: &str) -> Result<Self, String> {
        let mut m: Map<String, Value> = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let mut take = |k: &str| m.shift_remove(k).ok_or_else(|| format!("no `{k}`"));
        let u64_of = |k: &str, v: Value| v.as_u64().ok_or_else(|| format!("`{k}` is not a u64"));
        let t_mono_ns = u64_of("t_mono_ns", take("t_mono_ns")?)?;
        let t_wall_ns = u64_of("t_wall_ns", take("t_wall_ns")?)?;
        let seq = match take("seq")? {
            Value::Null => None,
            v => Some(u64_of("seq", v)?),
        };
        let event = match take("event")? {
            Value::String(s) => s,
            _ => return Err("`event` is not a string".into()),
        };
        Ok(Self {
            t_mono_ns,
            t_wall_ns,
            seq,
            event,
            data: m,
        })
    }
}

/// A complete episode, read and typed.
#[derive(Clone, Debug)]
pub struct Episode {
    pub dir: PathBuf,
    pub meta: MetaIn,
    /// `meta.json` as written (kept whole in the `episodes` table).
    pub meta_text: String,
    /// Rows per source, in `meta.json`'s source order.
    pub rows: Vec<(SourceKind, Vec<Row>)>,
    pub events: Vec<EventLine>,
    pub labels: Vec<LabelLine>,
}

/// Whether `dir` holds a complete episode (its `done.marker`).
pub fn is_complete(dir: &Path) -> bool {
    dir.join(DONE).is_file()
}

/// Reads every line of a JSONL file with `parse`; an error names the line.
fn read_lines<T>(path: &Path, parse: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>> {
    let f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        out.push(
            parse(&line).map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), i + 1))?,
        );
    }
    Ok(out)
}

/// An episode id is a file name in the dataset: 1 to 64 of `[0-9A-Za-z]`
/// (cis490 writes ULIDs).
fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        bail!("episode id '{id}' is not 1 to 64 letters and digits");
    }
    Ok(())
}

impl Episode {
    /// The `meta.json` of a complete episode (and its text): what
    /// [`Episode::read`] checks before reading the lines.
    pub fn read_meta(dir: &Path) -> Result<(MetaIn, String)> {
        if !is_complete(dir) {
            bail!(
                "{} is not a complete episode (no {DONE}): refusing it",
                dir.display()
            );
        }
        let meta_path = dir.join(META);
        let meta_text = fs::read_to_string(&meta_path)
            .with_context(|| format!("cannot read {}", meta_path.display()))?;
        let meta: MetaIn = serde_json::from_str(&meta_text)
            .with_context(|| format!("{} is not a cis490 meta.json", meta_path.display()))?;
        check_id(&meta.id).with_context(|| meta_path.display().to_string())?;
        if meta.status != "complete" {
            bail!(
                "{}: status is '{}', not 'complete': refusing it",
                meta_path.display(),
                meta.status
            );
        }
        if meta.start.is_none() {
            bail!(
                "{}: a complete episode without `start`",
                meta_path.display()
            );
        }
        Ok((meta, meta_text))
    }

    /// Reads a complete episode; an incomplete one (no `done.marker`) is an
    /// error.
    pub fn read(dir: &Path) -> Result<Self> {
        let (meta, meta_text) = Self::read_meta(dir)?;
        let meta_path = dir.join(META);
        let mut rows = Vec::new();
        for s in &meta.sources {
            if s.file != s.source.file_name() {
                bail!(
                    "{}: source {} in file '{}'",
                    meta_path.display(),
                    s.source.name(),
                    s.file
                );
            }
            if rows.iter().any(|(k, _)| *k == s.source) {
                bail!(
                    "{}: source {} listed twice",
                    meta_path.display(),
                    s.source.name()
                );
            }
            let (id, kind) = (&meta.id, s.source);
            let r = read_lines(&dir.join(&s.file), |l| {
                let row: Row = serde_json::from_str(l).map_err(|e| e.to_string())?;
                if &row.episode_id != id || row.source != kind {
                    return Err(format!(
                        "a row of episode {} source {} in episode {id} source {}",
                        row.episode_id,
                        row.source.name(),
                        kind.name()
                    ));
                }
                Ok(row)
            })?;
            rows.push((s.source, r));
        }
        let events = read_lines(&dir.join(EVENTS), EventLine::parse)?;
        let labels = read_lines(&dir.join(LABELS), |l| {
            serde_json::from_str::<LabelLine>(l).map_err(|e| e.to_string())
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            meta,
            meta_text,
            rows,
            events,
            labels,
        })
    }

    pub fn id(&self) -> &str {
        &self.meta.id
    }

    /// The `date=` partition: the UTC day of the episode's start.
    pub fn date(&self) -> String {
        let wall = self.meta.start.map_or(0, |c| c.t_wall_ns);
        utc_date(wall / 1_000_000_000)
    }

    /// The `host=` partition: the hostname with every character outside
    /// `[A-Za-z0-9_.-]` replaced by `_`, or [`NULL_PARTITION`] when empty.
    pub fn host(&self) -> String {
        host_partition(&self.meta.host.hostname)
    }
}

pub fn host_partition(hostname: &str) -> String {
    if hostname.is_empty() {
        return NULL_PARTITION.to_owned();
    }
    hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `YYYY-MM-DD` (UTC) of a Unix time in seconds (civil-from-days, Howard
/// Hinnant's algorithm).
pub fn utc_date(unix_secs: u64) -> String {
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The UTC time of day of a Unix time as `hh:mm:ss`.
pub fn utc_time(unix_secs: u64) -> String {
    let rem = unix_secs % 86_400;
    format!("{:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60)
}

/// The episode directories under `DATA/episodes/`, sorted by name.
pub fn episode_dirs(data_dir: &Path) -> Result<Vec<PathBuf>> {
    let root = data_dir.join("episodes");
    let mut out = Vec::new();
    for e in fs::read_dir(&root).with_context(|| format!("cannot list {}", root.display()))? {
        let e = e.with_context(|| format!("cannot list {}", root.display()))?;
        if e.file_type()?.is_dir() {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_735_689_599), "2024-12-31");
        assert_eq!(utc_date(1_735_689_600), "2025-01-01");
        assert_eq!(utc_date(4_107_542_400), "2100-03-01");
        assert_eq!(utc_time(1_735_689_599), "23:59:59");
        assert_eq!(utc_time(1_735_689_600 + 3_723), "01:02:03");
    }

    #[test]
    fn host_partitions() {
        assert_eq!(host_partition("lab-03.example"), "lab-03.example");
        assert_eq!(host_partition("a/b=c d"), "a_b_c_d");
        assert_eq!(host_partition(""), NULL_PARTITION);
    }

    #[test]
    fn malformed_episodes_are_refused_with_the_file_and_line() {
        let data = tempfile::tempdir().unwrap();
        let dir = fixture::episode(data.path(), "01EP", 3, &["tap0"], true);
        let ep = Episode::read(&dir).unwrap();
        assert_eq!(
            (ep.date(), ep.host()),
            ("2026-12-04".to_owned(), "lab-03".to_owned())
        );
        assert_eq!(ep.rows.len(), 2);
        let rows = dir.join("telemetry-ebpf.jsonl");
        let good = fs::read_to_string(&rows).unwrap();
        let err = |text: &str, file: &Path| {
            let old = fs::read_to_string(file).unwrap();
            fs::write(file, text).unwrap();
            let e = format!("{:#}", Episode::read(&dir).unwrap_err());
            fs::write(file, old).unwrap();
            e
        };
        let e = err(&format!("{good}{{\"episode_id\":\"01EP\"}}\n"), &rows);
        assert!(e.contains("telemetry-ebpf.jsonl line 4"), "{e}");
        let e = err(&good.replace("01EP", "01XX"), &rows);
        assert!(e.contains("a row of episode 01XX"), "{e}");
        let e = err(&good.replace("\"cpu_ns\":1000", "\"cpu_ns\":-1"), &rows);
        assert!(e.contains("line 1"), "{e}");
        let meta = dir.join("meta.json");
        let text = fs::read_to_string(&meta).unwrap();
        let e = err(&text.replace("\"complete\"", "\"failed\""), &meta);
        assert!(e.contains("status is 'failed'"), "{e}");
        let e = err(&text.replace("\"id\": \"01EP\"", "\"id\": \"../x\""), &meta);
        assert!(e.contains("not 1 to 64 letters and digits"), "{e}");
        let e = err("{\"t_mono_ns\":1}\n", &dir.join("labels.jsonl"));
        assert!(e.contains("labels.jsonl line 1"), "{e}");
        fs::remove_file(dir.join(DONE)).unwrap();
        let e = format!("{:#}", Episode::read(&dir).unwrap_err());
        assert!(e.contains("not a complete episode"), "{e}");
    }

    #[test]
    fn event_lines_split_envelope_and_data() {
        let e = EventLine::parse(
            r#"{"t_mono_ns":1,"t_wall_ns":2,"seq":null,"event":"started","pid":7,"mode":"spawn"}"#,
        )
        .unwrap();
        assert_eq!(
            (e.t_mono_ns, e.t_wall_ns, e.seq, e.event.as_str()),
            (1, 2, None, "started")
        );
        assert_eq!(
            serde_json::to_string(&e.data).unwrap(),
            r#"{"pid":7,"mode":"spawn"}"#
        );
        assert!(EventLine::parse(r#"{"t_mono_ns":1,"t_wall_ns":2,"event":"x"}"#).is_err());
        assert!(EventLine::parse(r#"{"t_mono_ns":-1,"t_wall_ns":2,"seq":1,"event":"x"}"#).is_err());
    }
}

/// A complete episode on disk, made for the unit tests of this module.
#[cfg(test)]
pub(crate) mod fixture {
    use std::{collections::BTreeMap, fs, path::Path};

    use crate::row::{BlkCounters, Measures, NetCounters, Row, SourceKind};

    /// An ebpf row with every kind of value: counts, a null, histograms,
    /// and `net_by_if` with `interfaces`.
    pub fn row(id: &str, seq: u64, interfaces: &[&str]) -> Row {
        let mut m = Measures {
            cpu_ns: Some(1000 + seq),
            wakeups: None,
            runq_delay_hist_log2: Some(vec![seq, 0, 3]),
            blk_latency_hist_log2: Some(vec![]),
            kvm_exit_reasons: Some(BTreeMap::from([("HLT".to_owned(), seq + 1)])),
            kvm_userspace_exit_reasons: Some(BTreeMap::new()),
            blk_by_dev: None,
            ..Default::default()
        };
        let by_if = interfaces
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let c = NetCounters {
                    tx_bytes: 100 * seq + i as u64,
                    rx_bytes: 7,
                    tx_packets: seq,
                    rx_packets: 1,
                };
                ((*n).to_owned(), c)
            })
            .collect();
        m.set_net(Some(by_if));
        Row {
            episode_id: id.to_owned(),
            source: SourceKind::Ebpf,
            available_in_deployment: false,
            t_mono_ns: 1_000 + seq,
            t_wall_ns: 1_796_417_038_000_000_000 + seq,
            interval_ns: 100,
            seq,
            m,
        }
    }

    /// A qmp row: blk_by_dev, everything else null.
    pub fn qmp_row(id: &str, seq: u64) -> Row {
        let mut m = Measures::default();
        let c = BlkCounters {
            read_bytes: 512 * seq,
            write_bytes: 0,
            read_ops: seq,
            write_ops: 0,
        };
        m.set_blk_by_dev(Some(BTreeMap::from([("virtio0".to_owned(), c)])));
        Row {
            episode_id: id.to_owned(),
            source: SourceKind::Qmp,
            available_in_deployment: false,
            t_mono_ns: 1_000 + seq,
            t_wall_ns: 1_796_417_038_000_000_000 + seq,
            interval_ns: 100,
            seq,
            m,
        }
    }

    /// Writes `data/episodes/<id>/` with `rows` ebpf and qmp rows; `done`:
    /// whether it is complete.
    pub fn episode(
        data: &Path,
        id: &str,
        rows: u64,
        interfaces: &[&str],
        done: bool,
    ) -> std::path::PathBuf {
        let dir = data.join("episodes").join(id);
        fs::create_dir_all(&dir).unwrap();
        let meta = serde_json::json!({
            "schema_version": 1, "id": id, "status": if done { "complete" } else { "running" },
            "error": null, "cis490_version": "0.1.0", "command_line": ["cis490", "trace"],
            "host": {"hostname": "lab-03", "kernel_release": "6.18", "kernel_version": "#1", "cpus": 2},
            "target": {"pid": 7, "mode": "spawn", "comm": "qemu", "exe": null, "cmdline": ["qemu", "-m"], "starttime": 1},
            "interval_ns": 100, "duration_limit_s": null,
            "start": {"t_mono_ns": 1000, "t_wall_ns": 1_796_417_038_000_000_000u64},
            "end": {"t_mono_ns": 2000, "t_wall_ns": 1_796_417_039_000_000_000u64},
            "end_reason": "target_exited",
            "sources": [
                {"source": "ebpf", "file": "telemetry-ebpf.jsonl", "available_in_deployment": false, "rows": rows},
                {"source": "qmp", "file": "telemetry-qmp.jsonl", "available_in_deployment": false, "rows": rows}
            ],
            "skipped_boundaries": 0, "labels": 1, "tags": {"sample": "sha256:ab", "vm": "w10"}
        });
        fs::write(
            dir.join("meta.json"),
            serde_json::to_vec_pretty(&meta).unwrap(),
        )
        .unwrap();
        let lines = |f: &dyn Fn(u64) -> Row| {
            (0..rows)
                .map(|s| serde_json::to_string(&f(s)).unwrap() + "\n")
                .collect::<String>()
        };
        fs::write(
            dir.join("telemetry-ebpf.jsonl"),
            lines(&|s| row(id, s, interfaces)),
        )
        .unwrap();
        fs::write(dir.join("telemetry-qmp.jsonl"), lines(&|s| qmp_row(id, s))).unwrap();
        fs::write(
            dir.join("events.jsonl"),
            "{\"t_mono_ns\":1000,\"t_wall_ns\":5,\"seq\":null,\"event\":\"started\",\"pid\":7,\"mode\":\"spawn\"}\n\
             {\"t_mono_ns\":1900,\"t_wall_ns\":6,\"seq\":0,\"event\":\"duration_reached\"}\n",
        )
        .unwrap();
        fs::write(
            dir.join("labels.jsonl"),
            "{\"t_mono_ns\":1000,\"t_wall_ns\":5,\"seq\":0,\"label\":\"boot\",\"via\":\"cli\"}\n",
        )
        .unwrap();
        if done {
            fs::write(dir.join("done.marker"), b"").unwrap();
        }
        dir
    }
}
