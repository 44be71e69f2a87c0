//! `cis490 summary EPISODE`: every source's totals side by side.
//!
//! Generic over the row schema: each field is summed over the rows (the
//! schema's rule), except levels (`threads` and the guest's levels: the maximum seen) and maxima
//! (`*_max_ns`: the maximum); histograms show their number of samples. A
//! field a source does not measure shows as `-`.

use std::{
    collections::HashMap,
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::{
    episode::{DONE, LABELS},
    meta::{EndReason, Meta},
    row::SourceKind,
};

/// The row envelope: the fields of every row that are not measures.
pub(crate) const ENVELOPE: &[&str] = &[
    "episode_id",
    "source",
    "available_in_deployment",
    "t_mono_ns",
    "t_wall_ns",
    "interval_ns",
    "seq",
];

/// How a field aggregates over an episode.
pub fn is_max_field(name: &str) -> bool {
    name == "threads"
        || name.ends_with("_max_ns")
        || crate::sources::guest::fields::LEVELS.contains(&name)
}

/// An object field (`net_by_if`, `kvm_exit_reasons`) as dotted leaves; a
/// null object stays one null field.
fn flatten<'a>(name: String, v: &'a Value, out: &mut Vec<(String, &'a Value)>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, inner) in m {
                flatten(format!("{name}.{k}"), inner, out);
            }
        }
        _ => out.push((name, v)),
    }
}

/// Totals of one source.
#[derive(Debug, Default)]
pub struct SourceTotals {
    pub rows: u64,
    /// Field -> total (None: never measured). Keeps the schema's order.
    pub fields: Vec<(String, Option<f64>)>,
}

/// Sums rows of one source as they are read (an hour at 1 ms buckets is
/// 3.6M rows: they are never all in memory).
#[derive(Debug, Default)]
pub struct Totaler {
    out: SourceTotals,
    index: HashMap<String, usize>,
}

impl Totaler {
    pub fn add(&mut self, row: &Map<String, Value>) {
        self.out.rows += 1;
        let mut flat = Vec::new();
        for (k, v) in row {
            if !ENVELOPE.contains(&k.as_str()) {
                flatten(k.clone(), v, &mut flat);
            }
        }
        for (k, v) in flat {
            let i = match self.index.get(&k) {
                Some(i) => *i,
                None => {
                    self.out.fields.push((k.clone(), None));
                    self.index.insert(k.clone(), self.out.fields.len() - 1);
                    self.out.fields.len() - 1
                }
            };
            let x = match v {
                Value::Number(n) => n.as_f64(),
                Value::Array(a) => Some(a.iter().filter_map(Value::as_f64).sum()),
                _ => None,
            };
            if let Some(x) = x {
                let slot = &mut self.out.fields[i].1;
                *slot = Some(match *slot {
                    None => x,
                    Some(acc) if is_max_field(&k) => acc.max(x),
                    Some(acc) => acc + x,
                });
            }
        }
    }

    pub fn finish(self) -> SourceTotals {
        self.out
    }
}

/// Aggregates rows (JSON objects) of one source.
pub fn aggregate<'a>(rows: impl IntoIterator<Item = &'a Map<String, Value>>) -> SourceTotals {
    let mut t = Totaler::default();
    for row in rows {
        t.add(row);
    }
    t.finish()
}

/// Calls `f` with each line of a JSONL file as a JSON object, streaming.
pub fn for_each_row(path: &Path, f: impl FnMut(&Map<String, Value>)) -> Result<()> {
    for_each_row_of(path, false, f).map(drop)
}

/// [`for_each_row`]; with `torn_tail`, a last line that does not parse (a
/// tracer killed mid-write) is skipped, and `true` returned, instead of an
/// error.
fn for_each_row_of(
    path: &Path,
    torn_tail: bool,
    mut f: impl FnMut(&Map<String, Value>),
) -> Result<bool> {
    let file = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut lines = BufReader::with_capacity(1 << 16, file)
        .lines()
        .enumerate()
        .peekable();
    while let Some((n, line)) = lines.next() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        match serde_json::from_str(&line) {
            Ok(Value::Object(m)) => f(&m),
            _ if torn_tail && lines.peek().is_none() => return Ok(true),
            _ => bail!("{}:{}: not a JSON object", path.display(), n + 1),
        }
    }
    Ok(false)
}

fn read_rows(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let mut rows = Vec::new();
    for_each_row(path, |m| rows.push(m.clone()))?;
    Ok(rows)
}

/// Formats a total for people: nanosecond fields (`*_ns`, `*_ns_sum`) in
/// s/ms/us/ns, counts whole; never `-0`.
pub fn human(field: &str, v: f64) -> String {
    // -0.0 == 0.0: a zero is printed as 0 whatever its sign bit.
    let v = if v == 0.0 { 0.0 } else { v };
    if field.ends_with("_ns") || field.contains("_ns_") {
        match v {
            v if v >= 1e9 => format!("{:.3} s", v / 1e9),
            v if v >= 1e6 => format!("{:.3} ms", v / 1e6),
            v if v >= 1e3 => format!("{:.1} us", v / 1e3),
            v => format!("{v:.0} ns"),
        }
    } else {
        format!("{v:.0}")
    }
}

/// A phase mark of `labels.jsonl`, in seconds from the start.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub label: String,
    pub t_s: f64,
}

/// One source's column of the table.
#[derive(Debug, Serialize)]
pub struct SourceColumn {
    pub source: String,
    pub rows: u64,
    /// Every field of the table (`EpisodeTotals::fields`) -> its total, or
    /// `null` where this source never measured it.
    pub totals: Map<String, Value>,
}

/// Loss accounting of the eBPF side (`meta.json` `ebpf`).
#[derive(Debug, Serialize)]
pub struct Loss {
    pub dropped_events: Value,
    pub map_errors: Value,
    pub records_undecodable: Value,
}

/// What `cis490 summary` shows, as text or (`--json`) as this document;
/// the report's totals table is the same.
#[derive(Debug, Serialize)]
pub struct EpisodeTotals {
    pub episode: String,
    pub status: String,
    /// `done.marker` present.
    pub done: bool,
    /// Source files whose last line was cut off (a tracer killed
    /// mid-write: only an episode without `done.marker`), skipped.
    pub torn_files: Vec<String>,
    pub target_pid: Value,
    pub target_comm: String,
    /// From the first bucket's start to the last one's end, s.
    pub duration_s: Option<f64>,
    pub interval_ms: f64,
    pub end_reason: String,
    pub phases: Vec<Phase>,
    /// The table's rows: every field some source has, objects as their
    /// dotted leaves (`net_by_if.tap0.tx_bytes`), in schema order.
    pub fields: Vec<String>,
    pub sources: Vec<SourceColumn>,
    pub loss: Loss,
}

/// A total as a JSON number: integral totals (every row field is an
/// integer) as integers.
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && (0.0..9.007_199_254_740_992e15).contains(&v) {
        Value::from(v as u64)
    } else {
        serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
    }
}

/// The totals of every source of an episode: the one computation behind
/// `cis490 summary`, `summary --json` and the report's table. `visit` sees
/// every row of every source as it is read (source name, row), so a caller
/// that needs the rows too (the report) reads each file once.
pub fn episode_totals(
    dir: &Path,
    visit: &mut dyn FnMut(&str, &Map<String, Value>),
) -> Result<EpisodeTotals> {
    let meta = Meta::read(dir)?;
    let done = dir.join(DONE).exists();
    // meta.json lists the sources' files when the trace finishes; an
    // episode whose tracer never finished (killed) has its rows on disk
    // all the same: read every source file there is.
    let files: Vec<(String, String)> = if meta.sources.is_empty() {
        SourceKind::ALL
            .iter()
            .map(|k| (k.name().to_owned(), k.file_name()))
            .filter(|(_, f)| dir.join(f).is_file())
            .collect()
    } else {
        meta.sources
            .iter()
            .map(|s| (s.source.name().to_owned(), s.file.clone()))
            .collect()
    };
    let mut sources = Vec::new();
    let mut torn = Vec::new();
    for (name, file) in files {
        let mut t = Totaler::default();
        let cut = for_each_row_of(&dir.join(&file), !done, |row| {
            t.add(row);
            visit(&name, row);
        })?;
        if cut {
            torn.push(file);
        }
        sources.push((name, t.finish()));
    }
    let start = meta.start.map(|c| c.t_mono_ns as f64);
    let duration_s = match (start, meta.end.map(|c| c.t_mono_ns as f64)) {
        (Some(a), Some(b)) => Some((b - a) / 1e9),
        _ => None,
    };
    let mut phases = Vec::new();
    if let Some(start) = start {
        for l in read_rows(&dir.join(LABELS)).unwrap_or_default() {
            phases.push(Phase {
                label: l["label"].as_str().unwrap_or("?").to_owned(),
                t_s: (l["t_mono_ns"].as_f64().unwrap_or(start) - start) / 1e9,
            });
        }
    }
    let mut fields: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (_, t) in &sources {
        for (f, _) in &t.fields {
            if seen.insert(f.clone()) {
                fields.push(f.clone());
            }
        }
    }
    // An object field that is null in some rows and has leaves in others
    // shows as its leaves only.
    let parents: std::collections::HashSet<String> = fields
        .iter()
        .filter_map(|f| f.rsplit_once('.').map(|(p, _)| p.to_owned()))
        .flat_map(|p| {
            // every dotted prefix of a leaf is a parent
            let mut out = vec![p.clone()];
            let mut q = p.as_str();
            while let Some((r, _)) = q.rsplit_once('.') {
                out.push(r.to_owned());
                q = r;
            }
            out
        })
        .collect();
    fields.retain(|f| !parents.contains(f));
    let columns = sources
        .into_iter()
        .map(|(source, t)| {
            let by: HashMap<&str, Option<f64>> =
                t.fields.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            let totals = fields
                .iter()
                .map(|f| {
                    let v = by.get(f.as_str()).copied().flatten();
                    (f.clone(), v.map_or(Value::Null, number))
                })
                .collect();
            SourceColumn {
                source,
                rows: t.rows,
                totals,
            }
        })
        .collect();
    let e = &meta.ebpf;
    Ok(EpisodeTotals {
        episode: meta.id.clone(),
        status: meta.status.name().to_owned(),
        done,
        torn_files: torn,
        target_pid: meta.target.pid.into(),
        target_comm: meta.target.comm.clone(),
        duration_s,
        interval_ms: meta.interval_ns as f64 / 1e6,
        end_reason: meta.end_reason.map_or("?", EndReason::name).to_owned(),
        phases,
        fields,
        sources: columns,
        loss: Loss {
            dropped_events: e.dropped_events.into(),
            map_errors: e.map_errors.into(),
            records_undecodable: e.records_undecodable.into(),
        },
    })
}

/// Writes the summary table of `t` to `w`.
pub fn write_text(t: &EpisodeTotals, w: &mut impl Write) -> Result<()> {
    writeln!(
        w,
        "episode {} ({}{})  target pid {} '{}'  {} in buckets of {} ms, ended by {}",
        t.episode,
        t.status,
        if t.done { ", done" } else { ", NOT done" },
        t.target_pid,
        t.target_comm,
        t.duration_s.map_or("?".into(), |s| format!("{s:.2} s")),
        t.interval_ms,
        t.end_reason,
    )?;
    if !t.done {
        writeln!(
            w,
            "incomplete: the tracer did not finish this episode (no done.marker); the totals \
             are those of the rows on disk{}",
            if t.torn_files.is_empty() {
                String::new()
            } else {
                format!(
                    " (a cut-off last line skipped in {})",
                    t.torn_files.join(", ")
                )
            }
        )?;
    }
    if !t.phases.is_empty() {
        let marks: Vec<String> = t
            .phases
            .iter()
            .map(|p| format!("{} at {:.2} s", p.label, p.t_s))
            .collect();
        writeln!(w, "phases: {}", marks.join(", "))?;
    }
    let width = t
        .fields
        .iter()
        .map(|f| f.len() + 2)
        .max()
        .unwrap_or(0)
        .max(28);
    write!(w, "{:<width$}", "field")?;
    for c in &t.sources {
        write!(w, "{:>18}", format!("{} ({} rows)", c.source, c.rows))?;
    }
    writeln!(w)?;
    for f in &t.fields {
        write!(w, "{f:<width$}")?;
        for c in &t.sources {
            let v = c.totals.get(f).and_then(Value::as_f64);
            write!(w, "{:>18}", v.map_or("-".into(), |v| human(f, v)))?;
        }
        writeln!(w)?;
    }
    writeln!(
        w,
        "loss: {} ring-buffer records dropped, {} map errors, {} undecodable records",
        t.loss.dropped_events, t.loss.map_errors, t.loss.records_undecodable
    )?;
    Ok(())
}

/// Writes the summary table of an episode to `w`.
pub fn write_summary(dir: &Path, w: &mut impl Write) -> Result<()> {
    write_text(&episode_totals(dir, &mut |_, _| {})?, w)
}

pub fn run(dir: &Path, json: bool) -> Result<()> {
    let t = episode_totals(dir, &mut |_, _| {})?;
    let mut out = std::io::stdout().lock();
    if json {
        // As an io::Error, so a reader that stops reading (`| head`) is
        // a broken pipe that main() lets pass.
        serde_json::to_writer_pretty(&mut out, &t).map_err(std::io::Error::from)?;
        writeln!(out)?;
        Ok(())
    } else {
        write_text(&t, &mut out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::episode::META;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn sums_deltas_maxes_levels_and_keeps_nulls() {
        let rows = [
            obj(
                json!({"seq": 0, "cpu_ns": 10, "threads": 2, "runq_delay_max_ns": 5, "wakeups": null, "runq_delay_hist_log2": [1, 2]}),
            ),
            obj(
                json!({"seq": 1, "cpu_ns": 15, "threads": 3, "runq_delay_max_ns": 4, "wakeups": null, "runq_delay_hist_log2": [0, 0, 4]}),
            ),
        ];
        let t = aggregate(&rows);
        assert_eq!(t.rows, 2);
        let get = |k: &str| t.fields.iter().find(|(f, _)| f == k).unwrap().1;
        assert_eq!(get("cpu_ns"), Some(25.0));
        assert_eq!(get("threads"), Some(3.0));
        assert_eq!(get("runq_delay_max_ns"), Some(5.0));
        assert_eq!(get("wakeups"), None);
        assert_eq!(get("runq_delay_hist_log2"), Some(7.0));
        assert!(t.fields.iter().all(|(f, _)| f != "seq"));
        assert_eq!(t.fields[0].0, "cpu_ns", "schema order kept");
    }

    #[test]
    fn objects_are_summed_leaf_by_leaf() {
        let rows = [
            obj(json!({"net_by_if": {"tap0": {"tx_bytes": 10}}, "kvm_exit_reasons": null})),
            obj(
                json!({"net_by_if": {"tap0": {"tx_bytes": 5}, "sockets": {"tx_bytes": 1}}, "kvm_exit_reasons": {}}),
            ),
        ];
        let t = aggregate(&rows);
        let get = |k: &str| t.fields.iter().find(|(f, _)| f == k).map(|f| f.1);
        assert_eq!(get("net_by_if.tap0.tx_bytes"), Some(Some(15.0)));
        assert_eq!(get("net_by_if.sockets.tx_bytes"), Some(Some(1.0)));
        assert_eq!(get("kvm_exit_reasons"), Some(None));
    }

    /// A killed tracer's episode: meta.json as written at the start (no
    /// sources listed, status running), rows on disk, the last one cut
    /// off. The summary reads the rows that are there and says the episode
    /// is incomplete.
    #[test]
    fn a_killed_tracers_episode_is_summed_and_called_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let meta = json!({"id": "01K", "status": "running", "interval_ns": 100_000_000u64,
            "start": {"t_mono_ns": 0, "t_wall_ns": 0}, "target": {"pid": 9, "comm": "w"},
            "sources": []});
        fs::write(d.join(META), meta.to_string()).unwrap();
        fs::write(d.join(LABELS), "").unwrap();
        fs::write(
            d.join("telemetry-ebpf.jsonl"),
            "{\"seq\":0,\"cpu_ns\":10}\n{\"seq\":1,\"cpu_ns\":5}\n{\"seq\":2,\"cpu",
        )
        .unwrap();
        fs::write(
            d.join("telemetry-proc.jsonl"),
            "{\"seq\":0,\"cpu_ns\":12}\n",
        )
        .unwrap();
        let t = episode_totals(d, &mut |_, _| {}).unwrap();
        assert!(!t.done);
        assert_eq!(t.status, "running");
        let names: Vec<&str> = t.sources.iter().map(|s| s.source.as_str()).collect();
        assert_eq!(names, ["ebpf", "proc"]);
        assert_eq!(t.sources[0].rows, 2);
        assert_eq!(t.sources[0].totals["cpu_ns"], 15);
        assert_eq!(t.sources[1].totals["cpu_ns"], 12);
        assert_eq!(t.torn_files, ["telemetry-ebpf.jsonl"]);
        let mut text = Vec::new();
        write_text(&t, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.contains("incomplete: the tracer did not finish"),
            "{text}"
        );
        // A complete episode's torn line is an error, not skipped.
        fs::write(d.join(DONE), "").unwrap();
        assert!(episode_totals(d, &mut |_, _| {}).is_err());
    }

    #[test]
    fn the_table_and_json_are_the_same_totals() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let meta = json!({"id": "01T", "status": "complete", "interval_ns": 100_000_000u64,
            "start": {"t_mono_ns": 0}, "end": {"t_mono_ns": 200_000_000u64},
            "target": {"pid": 7, "comm": "q"}, "end_reason": "duration",
            "ebpf": {"dropped_events": 0, "map_errors": 0, "records_undecodable": 0},
            "sources": [{"source": "ebpf", "file": "a.jsonl"}, {"source": "proc", "file": "b.jsonl"}]});
        fs::write(d.join(META), meta.to_string()).unwrap();
        fs::write(
            d.join(LABELS),
            "{\"label\":\"boot\",\"t_mono_ns\":50000000}\n",
        )
        .unwrap();
        let rows = |v: [Value; 2]| v.iter().map(|r| format!("{r}\n")).collect::<String>();
        fs::write(
            d.join("a.jsonl"),
            rows([
                json!({"seq": 0, "cpu_ns": 10, "wakeups": 1, "net_by_if": null}),
                json!({"seq": 1, "cpu_ns": 2_000_000_000u64, "wakeups": 2, "net_by_if": {"tap0": {"tx_bytes": 5}}}),
            ]),
        )
        .unwrap();
        fs::write(
            d.join("b.jsonl"),
            rows([
                json!({"seq": 0, "cpu_ns": 7, "wakeups": null, "net_by_if": null}),
                json!({"seq": 1, "cpu_ns": 3, "wakeups": null, "net_by_if": null}),
            ]),
        )
        .unwrap();
        let mut visited = 0;
        let t = episode_totals(d, &mut |_, _| visited += 1).unwrap();
        assert_eq!(visited, 4, "every row of every source is visited once");
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(
            v["fields"],
            json!(["cpu_ns", "wakeups", "net_by_if.tap0.tx_bytes"])
        );
        assert_eq!(v["sources"][0]["totals"]["cpu_ns"], 2_000_000_010u64);
        assert_eq!(v["sources"][1]["totals"]["cpu_ns"], 10);
        assert!(
            v["sources"][1]["totals"]["wakeups"].is_null(),
            "null, not 0"
        );
        assert_eq!(v["sources"][0]["totals"]["net_by_if.tap0.tx_bytes"], 5);
        assert_eq!(v["phases"][0]["t_s"], 0.05);
        let mut text = Vec::new();
        write_text(&t, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        let cpu = text.lines().find(|l| l.starts_with("cpu_ns")).unwrap();
        assert!(cpu.contains("2.000 s") && cpu.contains("10 ns"), "{text}");
        let wake = text.lines().find(|l| l.starts_with("wakeups")).unwrap();
        assert!(wake.trim_end().ends_with('-'), "{text}");
        assert!(text.contains("phases: boot at 0.05 s"));
    }

    #[test]
    fn human_units() {
        assert_eq!(human("cpu_ns", 2.5e9), "2.500 s");
        assert_eq!(human("runq_delay_ns", 1.5e6), "1.500 ms");
        assert_eq!(human("wakeups", 12.0), "12");
        assert_eq!(human("blk_latency_ns_sum", 697_938_008.0), "697.938 ms");
        assert_eq!(human("runq_delay_hist_log2", -0.0), "0");
        assert_eq!(human("cpu_ns", -0.0), "0 ns");
    }
}
