//! Rows into chart data, one row at a time: every numeric leaf of a row
//! becomes a series (per source and field path) of per-second rates
//! (deltas) or plain values (levels, maxima), reduced to pixel columns.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fs,
    io::{BufRead as _, BufReader, Read as _, Seek as _, SeekFrom},
    path::Path,
};

use serde_json::{Map, Value};

use crate::meta::Meta;

use super::{
    series::{Columns, Heat, column},
    svg::{COLUMNS, HEAT_COLUMNS},
};
use crate::{episode::EVENTS, summary::is_max_field};

/// Keys kept per object field (`net_by_if`, `kvm_exit_reasons`,
/// `blk_by_dev`) and source; later keys are summed into `(other)`.
pub const MAX_KEYS: usize = 8;
/// The name later keys are folded into.
pub const OTHER: &str = "(other)";
/// Series (field paths) kept per source; later ones are counted, not drawn.
pub const MAX_SERIES: usize = 160;
/// Events kept for the timeline (the rest are counted).
pub const MAX_EVENTS: usize = 20_000;
/// The derived mean block latency (sum / requests), ns.
pub const BLK_MEAN: &str = "blk_latency_mean_ns";

use crate::summary::ENVELOPE;

/// Chart data of an episode.
pub struct Ingest {
    pub start_ns: f64,
    pub span_s: f64,
    pub nominal_ns: f64,
    /// Sources in the order of meta.json.
    pub sources: Vec<String>,
    /// Per source: field path -> series, in the order first seen.
    pub series: HashMap<String, Vec<(String, Columns)>>,
    index: HashMap<String, HashMap<String, usize>>,
    /// Per source: object field -> its leaf series.
    obj_leaves: HashMap<String, HashMap<String, Vec<String>>>,
    /// Per source: histogram field -> heat-map.
    pub heats: HashMap<String, Vec<(String, Heat)>>,
    /// Per (source, object field): the keys kept, in the order seen.
    keys: HashMap<(String, String), Vec<String>>,
    /// Per (source, object field): distinct keys folded into `(other)`
    /// (counted up to 10 000).
    pub folded: HashMap<(String, String), HashSet<String>>,
    /// Field paths not drawn because a source had too many.
    pub dropped_series: BTreeSet<String>,
    pub drop_cols: BTreeSet<usize>,
    pub merged_cols: BTreeSet<usize>,
    /// Buckets (of the first source that has them) with dropped records.
    pub drop_buckets: HashMap<String, u64>,
    pub merged_buckets: HashMap<String, u64>,
    /// Rows without a usable clock (not drawn).
    pub bad_rows: u64,
}

impl Ingest {
    pub fn new(dir: &Path, meta: &Meta) -> Self {
        let start_ns = meta.start.map_or(0.0, |c| c.t_mono_ns as f64);
        let sources: Vec<(String, String)> = meta
            .sources
            .iter()
            .map(|s| (s.source.name().to_owned(), s.file.clone()))
            .collect();
        // The span: the episode's end, or (an unfinished episode) the
        // last row of its first source.
        let end_ns = meta.end.map(|c| c.t_mono_ns as f64).or_else(|| {
            sources
                .iter()
                .find_map(|(_, f)| last_t_mono(&dir.join(f)))
                .map(|t| t as f64)
        });
        let span_s = end_ns
            .map(|e| (e - start_ns) / 1e9)
            .filter(|s| *s > 0.0 && s.is_finite())
            .unwrap_or(1.0);
        Self {
            start_ns,
            span_s,
            nominal_ns: meta.interval_ns as f64,
            sources: sources.into_iter().map(|(s, _)| s).collect(),
            series: HashMap::new(),
            index: HashMap::new(),
            obj_leaves: HashMap::new(),
            heats: HashMap::new(),
            keys: HashMap::new(),
            folded: HashMap::new(),
            dropped_series: BTreeSet::new(),
            drop_cols: BTreeSet::new(),
            merged_cols: BTreeSet::new(),
            drop_buckets: HashMap::new(),
            merged_buckets: HashMap::new(),
            bad_rows: 0,
        }
    }

    /// The series of `field` in `source`, if it had a value.
    pub fn get(&self, source: &str, field: &str) -> Option<&Columns> {
        let i = *self.index.get(source)?.get(field)?;
        let c = &self.series[source][i].1;
        (!c.is_empty()).then_some(c)
    }

    /// Field paths of `source`, in the order first seen.
    pub fn fields(&self, source: &str) -> impl Iterator<Item = &str> {
        self.series
            .get(source)
            .into_iter()
            .flatten()
            .filter(|(_, c)| !c.is_empty())
            .map(|(f, _)| f.as_str())
    }

    pub fn heat(&self, source: &str, field: &str) -> Option<&Heat> {
        self.heats
            .get(source)?
            .iter()
            .find(|(f, h)| f == field && h.used_rows().is_some())
            .map(|(_, h)| h)
    }

    fn series_mut(&mut self, source: &str, field: &str) -> Option<&mut Columns> {
        let idx = self.index.entry(source.to_owned()).or_default();
        let list = self.series.entry(source.to_owned()).or_default();
        let i = match idx.get(field) {
            Some(i) => *i,
            None => {
                if list.len() >= MAX_SERIES {
                    self.dropped_series.insert(format!("{source}: {field}"));
                    return None;
                }
                list.push((field.to_owned(), Columns::new(COLUMNS, self.span_s)));
                if let Some((object, _)) = field.split_once('.') {
                    self.obj_leaves
                        .entry(source.to_owned())
                        .or_default()
                        .entry(object.to_owned())
                        .or_default()
                        .push(field.to_owned());
                }
                idx.insert(field.to_owned(), list.len() - 1);
                list.len() - 1
            }
        };
        Some(&mut list[i].1)
    }

    /// The name a key of object field `field` is drawn under.
    fn key_name(&mut self, source: &str, field: &str, key: &str) -> String {
        let kept = self
            .keys
            .entry((source.to_owned(), field.to_owned()))
            .or_default();
        if kept.iter().any(|k| k == key) {
            return key.to_owned();
        }
        if kept.len() < MAX_KEYS {
            kept.push(key.to_owned());
            return key.to_owned();
        }
        let f = self
            .folded
            .entry((source.to_owned(), field.to_owned()))
            .or_default();
        if f.len() < 10_000 {
            f.insert(key.to_owned());
        }
        OTHER.to_owned()
    }

    /// Adds one row of `source`.
    pub fn add(&mut self, source: &str, row: &Map<String, Value>) {
        let Some(t) = row.get("t_mono_ns").and_then(Value::as_f64) else {
            self.bad_rows += 1;
            return;
        };
        let t_s = (t - self.start_ns) / 1e9;
        let interval_ns = row
            .get("interval_ns")
            .and_then(Value::as_f64)
            .filter(|i| *i > 0.0)
            .unwrap_or(self.nominal_ns.max(1.0));
        let per_s = 1e9 / interval_ns;
        let col = column(t_s, self.span_s, COLUMNS);
        if self.nominal_ns > 0.0 && interval_ns > 1.5 * self.nominal_ns {
            self.merged_cols.insert(col);
            *self.merged_buckets.entry(source.to_owned()).or_default() += 1;
        }
        if row
            .get("dropped_events")
            .and_then(Value::as_u64)
            .is_some_and(|d| d > 0)
        {
            self.drop_cols.insert(col);
            *self.drop_buckets.entry(source.to_owned()).or_default() += 1;
        }
        // Leaves of this row: path -> value (None: null), folded keys summed.
        let mut leaves: Vec<(String, Option<f64>)> = Vec::new();
        // Only keys folded into `(other)` can repeat within a row: they are
        // summed apart (a few per object field).
        let mut others: Vec<(String, Option<f64>)> = Vec::new();
        let push = |leaves: &mut Vec<(String, Option<f64>)>,
                    others: &mut Vec<(String, Option<f64>)>,
                    path: String,
                    v: Option<f64>| {
            if !path.contains(OTHER) {
                leaves.push((path, v));
            } else if let Some((_, old)) = others.iter_mut().find(|(p, _)| *p == path) {
                *old = Some(old.unwrap_or(0.0) + v.unwrap_or(0.0));
            } else {
                others.push((path, v));
            }
        };
        for (k, v) in row {
            if ENVELOPE.contains(&k.as_str()) {
                continue;
            }
            match v {
                Value::Number(n) => push(&mut leaves, &mut others, k.clone(), n.as_f64()),
                Value::Array(a) => {
                    let hist: Vec<u64> = a.iter().map(|x| x.as_u64().unwrap_or(0)).collect();
                    let span = self.span_s;
                    let heats = self.heats.entry(source.to_owned()).or_default();
                    let i = match heats.iter().position(|(f, _)| f == k) {
                        Some(i) => i,
                        None if heats.len() < 8 => {
                            heats.push((k.clone(), Heat::new(HEAT_COLUMNS, span)));
                            heats.len() - 1
                        }
                        None => continue,
                    };
                    heats[i].1.add(t_s, &hist);
                }
                Value::Object(m) => {
                    for (key, inner) in m {
                        let name = self.key_name(source, k, key);
                        match inner {
                            Value::Object(counters) => {
                                for (c, x) in counters {
                                    push(
                                        &mut leaves,
                                        &mut others,
                                        format!("{k}.{name}.{c}"),
                                        x.as_f64(),
                                    );
                                }
                            }
                            x => push(&mut leaves, &mut others, format!("{k}.{name}"), x.as_f64()),
                        }
                    }
                }
                Value::Null => {
                    // Every leaf drawn so far under an object field, or the
                    // field itself: a gap.
                    if self.index.get(source).is_some_and(|i| i.contains_key(k)) {
                        push(&mut leaves, &mut others, k.clone(), None);
                    }
                    let known = self.obj_leaves.get(source).and_then(|o| o.get(k));
                    for f in known.into_iter().flatten() {
                        push(&mut leaves, &mut others, f.clone(), None);
                    }
                }
                _ => {}
            }
        }
        leaves.append(&mut others);
        let ops = ["blk_read_ops", "blk_write_ops"]
            .iter()
            .filter_map(|f| row.get(*f).and_then(Value::as_f64))
            .sum::<f64>();
        let mean = row
            .get("blk_latency_ns_sum")
            .and_then(Value::as_f64)
            .filter(|_| ops > 0.0)
            .map(|s| s / ops);
        if mean.is_some() || self.get(source, BLK_MEAN).is_some() {
            leaves.push((BLK_MEAN.to_owned(), mean));
        }
        for (path, v) in leaves {
            let field = path.rsplit('.').next().unwrap_or(&path);
            let plain = path == BLK_MEAN || is_max_field(field) || is_max_field(&path);
            let v = v.map(|v| if plain { v } else { v * per_s });
            // A null before any value opens no series.
            if v.is_none()
                && self
                    .index
                    .get(source)
                    .is_none_or(|i| !i.contains_key(&path))
            {
                continue;
            }
            if let Some(c) = self.series_mut(source, &path) {
                c.add(t_s, v);
            }
        }
    }

    /// Keys folded into `(other)` for (source, field), if any.
    pub fn folded_count(&self, source: &str, field: &str) -> usize {
        self.folded
            .get(&(source.to_owned(), field.to_owned()))
            .map_or(0, HashSet::len)
    }
}

/// `t_mono_ns` of the last line of a JSONL file (read from its end).
fn last_t_mono(path: &Path) -> Option<u64> {
    let mut f = fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let from = len.saturating_sub(1 << 16);
    f.seek(SeekFrom::Start(from)).ok()?;
    let mut tail = String::new();
    f.take(1 << 16).read_to_string(&mut tail).ok()?;
    tail.lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok()?["t_mono_ns"].as_u64())
}

/// What `events.jsonl` holds, capped.
#[derive(Default)]
pub struct Events {
    pub lines: Vec<Value>,
    /// Lines past [`MAX_EVENTS`] (counted, not kept).
    pub more: u64,
    /// Lines that are not JSON objects.
    pub bad: u64,
}

pub fn read_events(dir: &Path) -> Events {
    let mut ev = Events::default();
    let Ok(f) = fs::File::open(dir.join(EVENTS)) else {
        return ev;
    };
    for line in BufReader::new(f).lines() {
        let Ok(line) = line else {
            ev.bad += 1;
            break;
        };
        match serde_json::from_str::<Value>(&line) {
            Ok(v @ Value::Object(_)) if ev.lines.len() < MAX_EVENTS => ev.lines.push(v),
            Ok(Value::Object(_)) => ev.more += 1,
            _ => ev.bad += 1,
        }
    }
    ev
}
