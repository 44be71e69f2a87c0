//! `cis490 summary EPISODE`: every source's totals side by side.
//!
//! Generic over the row schema: each field is summed over the rows (the
//! schema's rule), except levels (`threads`: the maximum seen) and maxima
//! (`*_max_ns`: the maximum); histograms show their number of samples. A
//! field a source does not measure shows as `-`.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write},
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Map, Value};

use crate::episode::{DONE, LABELS, META};

const ENVELOPE: &[&str] = &[
    "episode_id",
    "source",
    "available_in_deployment",
    "t_mono_ns",
    "t_wall_ns",
    "interval_ns",
    "seq",
];

/// How a field aggregates over an episode.
fn is_max_field(name: &str) -> bool {
    name == "threads" || name.ends_with("_max_ns")
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

/// Aggregates rows (JSON objects) of one source.
pub fn aggregate<'a>(rows: impl IntoIterator<Item = &'a Map<String, Value>>) -> SourceTotals {
    let mut out = SourceTotals::default();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for row in rows {
        out.rows += 1;
        let mut flat = Vec::new();
        for (k, v) in row {
            if !ENVELOPE.contains(&k.as_str()) {
                flatten(k.clone(), v, &mut flat);
            }
        }
        for (k, v) in flat {
            let i = *index.entry(k.clone()).or_insert_with(|| {
                out.fields.push((k.clone(), None));
                out.fields.len() - 1
            });
            let x = match v {
                Value::Number(n) => n.as_f64(),
                Value::Array(a) => Some(a.iter().filter_map(Value::as_f64).sum()),
                _ => None,
            };
            if let Some(x) = x {
                let slot = &mut out.fields[i].1;
                *slot = Some(match *slot {
                    None => x,
                    Some(acc) if is_max_field(&k) => acc.max(x),
                    Some(acc) => acc + x,
                });
            }
        }
    }
    out
}

fn read_rows(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut rows = Vec::new();
    for (n, line) in BufReader::new(f).lines().enumerate() {
        let line = line?;
        match serde_json::from_str(&line) {
            Ok(Value::Object(m)) => rows.push(m),
            _ => bail!("{}:{}: not a JSON object", path.display(), n + 1),
        }
    }
    Ok(rows)
}

fn human(field: &str, v: f64) -> String {
    if field.ends_with("_ns") {
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

/// Writes the summary table of an episode to `w`.
pub fn write_summary(dir: &Path, w: &mut impl Write) -> Result<()> {
    let meta: Value = serde_json::from_slice(
        &fs::read(dir.join(META))
            .with_context(|| format!("{} is not an episode directory", dir.display()))?,
    )?;
    let done = dir.join(DONE).exists();
    let mut sources = Vec::new();
    for s in meta["sources"].as_array().into_iter().flatten() {
        let name = s["source"].as_str().unwrap_or("?").to_owned();
        let file = s["file"].as_str().unwrap_or_default();
        sources.push((name, aggregate(&read_rows(&dir.join(file))?)));
    }
    let secs = match (
        meta["start"]["t_mono_ns"].as_f64(),
        meta["end"]["t_mono_ns"].as_f64(),
    ) {
        (Some(a), Some(b)) => format!("{:.2} s", (b - a) / 1e9),
        _ => "?".into(),
    };
    writeln!(
        w,
        "episode {} ({}{})  target pid {} '{}'  {} in buckets of {} ms, ended by {}",
        meta["id"].as_str().unwrap_or("?"),
        meta["status"].as_str().unwrap_or("?"),
        if done { ", done" } else { ", NOT done" },
        meta["target"]["pid"],
        meta["target"]["comm"].as_str().unwrap_or("?"),
        secs,
        meta["interval_ns"].as_f64().unwrap_or(0.0) / 1e6,
        meta["end_reason"].as_str().unwrap_or("?"),
    )?;
    if let Some(start) = meta["start"]["t_mono_ns"].as_f64() {
        let labels = read_rows(&dir.join(LABELS)).unwrap_or_default();
        if !labels.is_empty() {
            let marks: Vec<String> = labels
                .iter()
                .map(|l| {
                    format!(
                        "{} at {:.2} s",
                        l["label"].as_str().unwrap_or("?"),
                        (l["t_mono_ns"].as_f64().unwrap_or(start) - start) / 1e9
                    )
                })
                .collect();
            writeln!(w, "phases: {}", marks.join(", "))?;
        }
    }
    let mut fields: Vec<String> = Vec::new();
    for (_, t) in &sources {
        for (f, _) in &t.fields {
            if !fields.contains(f) {
                fields.push(f.clone());
            }
        }
    }
    // An object field that is null in some rows and has leaves in others
    // shows as its leaves only.
    let parents: Vec<String> = fields
        .iter()
        .filter(|f| {
            fields.iter().any(|g| {
                g.strip_prefix(f.as_str())
                    .is_some_and(|r| r.starts_with('.'))
            })
        })
        .cloned()
        .collect();
    fields.retain(|f| !parents.contains(f));
    let width = fields
        .iter()
        .map(|f| f.len() + 2)
        .max()
        .unwrap_or(0)
        .max(28);
    write!(w, "{:<width$}", "field")?;
    for (name, t) in &sources {
        write!(w, "{:>18}", format!("{name} ({} rows)", t.rows))?;
    }
    writeln!(w)?;
    for f in &fields {
        write!(w, "{f:<width$}")?;
        for (_, t) in &sources {
            let v = t.fields.iter().find(|(k, _)| k == f).and_then(|(_, v)| *v);
            write!(w, "{:>18}", v.map_or("-".into(), |v| human(f, v)))?;
        }
        writeln!(w)?;
    }
    let e = &meta["ebpf"];
    writeln!(
        w,
        "loss: {} ring-buffer records dropped, {} map errors, {} undecodable records",
        e["dropped_events"], e["map_errors"], e["records_undecodable"]
    )?;
    Ok(())
}

pub fn run(dir: &Path) -> Result<()> {
    let mut out = std::io::stdout().lock();
    write_summary(dir, &mut out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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

    #[test]
    fn human_units() {
        assert_eq!(human("cpu_ns", 2.5e9), "2.500 s");
        assert_eq!(human("runq_delay_ns", 1.5e6), "1.500 ms");
        assert_eq!(human("wakeups", 12.0), "12");
    }
}
