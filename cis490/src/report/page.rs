//! The HTML page: header, charts by field group, heat-maps, the totals
//! table and the timeline.

use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::Value;

use super::{
    ingest::{BLK_MEAN, Events, Ingest, OTHER},
    series::Columns,
    svg::{self, Frame, Lane, Line, Style, clip, esc},
};
use crate::{check, meta::Meta, summary};

/// Phases drawn as bands (more are listed, not drawn).
const MAX_PHASES: usize = 32;
/// Rows of the phase list and of the QEMU event list.
const MAX_LIST: usize = 200;
/// Thread lanes of the timeline.
const MAX_THREADS: usize = 40;
/// Marks per timeline lane.
const MAX_MARKS: usize = 400;
/// Line charts and lines of the whole page: with [`svg::COLUMNS`] columns
/// a line is at most about 11 KB and a chart's frame (axes, phases, marks)
/// about 26 KB, so the charts stay under 7 MB whatever the rows hold.
/// Charts past these are listed by name, not drawn.
const MAX_CHARTS: usize = 100;
const MAX_LINES: usize = 400;

/// What the page has drawn so far, against [`MAX_CHARTS`] and [`MAX_LINES`].
#[derive(Default)]
struct Budget {
    charts: std::cell::Cell<usize>,
    lines: std::cell::Cell<usize>,
    skipped: std::cell::RefCell<Vec<String>>,
}

const STYLE: &str = "body{font-family:sans-serif;margin:16px 24px;color:#111;max-width:1040px}\
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:22px 0 6px;border-bottom:1px solid #999}\
h3{font-size:13px;margin:10px 0 2px}table{border-collapse:collapse;font-size:12px;margin:4px 0}\
td,th{border:1px solid #bbb;padding:2px 6px;text-align:left;vertical-align:top}\
td.n{text-align:right;font-variant-numeric:tabular-nums}.ok{color:#006400;font-weight:bold}\
.fail{color:#b00000;font-weight:bold}.note{font-size:12px;color:#444;margin:2px 0}\
.legend{font-size:12px;display:flex;flex-wrap:wrap;gap:4px 14px;margin:0 0 6px 78px}\
.legend span{display:inline-flex;align-items:center;gap:4px}figure{margin:0 0 10px}\
svg.chart{display:block}svg text{font-family:sans-serif}";

/// The shared time frame of every chart, and the page's chart budget.
struct Canvas {
    frame: Frame,
    budget: Budget,
}

/// Renders the page.
pub fn page(
    meta: &Meta,
    totals: &summary::EpisodeTotals,
    check: &check::Report,
    ing: &Ingest,
    events: &Events,
) -> String {
    let mut phases: Vec<(String, f64)> = totals
        .phases
        .iter()
        .map(|p| (p.label.clone(), p.t_s))
        .collect();
    phases.sort_by(|a, b| a.1.total_cmp(&b.1));
    let frame = Frame {
        span_s: ing.span_s,
        phases: phases.iter().take(MAX_PHASES).cloned().collect(),
        drop_cols: ing.drop_cols.iter().copied().collect(),
        merged_cols: ing.merged_cols.iter().copied().collect(),
    };
    let mut h = String::with_capacity(1 << 20);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
         <title>cis490 episode {}</title><style>{STYLE}</style></head><body>\n",
        esc(&totals.episode)
    );
    header(&mut h, meta, totals, check, ing, &phases);
    let canvas = Canvas {
        frame,
        budget: Budget::default(),
    };
    charts(&mut h, &canvas, ing, meta);
    heat_maps(&mut h, &canvas, ing);
    totals_table(&mut h, totals);
    timeline(&mut h, &canvas, ing, events);
    h.push_str("</body></html>\n");
    h
}

fn kv(h: &mut String, k: &str, v: &str) {
    let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", esc(k), v);
}

/// Wall-clock ns since the epoch as `YYYY-MM-DD hh:mm:ss UTC`.
pub fn utc(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (date, time) = (
        crate::dataset::utc_date(secs),
        crate::dataset::utc_time(secs),
    );
    format!("{date} {time} UTC")
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

fn header(
    h: &mut String,
    meta: &Meta,
    t: &summary::EpisodeTotals,
    check: &check::Report,
    ing: &Ingest,
    phases: &[(String, f64)],
) {
    let _ = write!(h, "<h1>cis490 episode {}</h1>", esc(&t.episode));
    let verdict = if check.problems.is_empty() {
        format!(
            r##"<span class="ok" id="verdict">valid</span> ({} checks passed)"##,
            check.passed.len()
        )
    } else {
        format!(
            r##"<span class="fail" id="verdict">{} problem(s)</span>, {} checks passed"##,
            check.problems.len(),
            check.passed.len()
        )
    };
    h.push_str("<table class=\"head\">");
    let target = &meta.target;
    kv(
        h,
        "target",
        &format!(
            "pid {} <b>{}</b> ({}), {}",
            target.pid,
            esc(&target.comm),
            target.mode.name(),
            esc(&clip(&target.cmdline.join(" "), 400))
        ),
    );
    let host = &meta.host;
    kv(
        h,
        "host",
        &format!(
            "{}, kernel {}, {} CPUs",
            esc(&host.hostname),
            esc(&host.kernel_release),
            host.cpus
        ),
    );
    let started = meta.start.map_or("-".into(), |c| utc(c.t_wall_ns));
    kv(
        h,
        "time",
        &format!(
            "started {started}; duration {}; buckets of {} ms; {} rows per source",
            t.duration_s.map_or("?".into(), |s| format!("{s:.2} s")),
            t.interval_ms,
            t.sources.first().map_or(0, |s| s.rows)
        ),
    );
    kv(
        h,
        "end",
        &format!(
            "{} (status {}{}); {} grid points skipped (merged buckets)",
            esc(&t.end_reason),
            esc(&t.status),
            if t.done {
                ", done.marker present"
            } else {
                ", NO done.marker"
            },
            meta.skipped_boundaries
        ),
    );
    let sources: Vec<String> = meta
        .sources
        .iter()
        .map(|s| format!("{} ({}, {} rows)", s.source.name(), esc(&s.file), s.rows))
        .collect();
    kv(h, "sources", &sources.join(", "));
    let e = &meta.ebpf;
    let loss = format!(
        "{} ring-buffer records dropped ({} buckets), {} map errors, {} undecodable records, {} slice mismatches; {} merged buckets (longer than 1.5 intervals)",
        e.dropped_events,
        ing.drop_buckets.values().max().copied().unwrap_or(0),
        e.map_errors,
        e.records_undecodable,
        e.slice_mismatches,
        ing.merged_buckets.values().max().copied().unwrap_or(0),
    );
    kv(h, "loss", &loss);
    kv(h, "cis490 check", &verdict);
    h.push_str("</table>");
    if !check.problems.is_empty() {
        h.push_str("<ul class=\"problems\">");
        for p in &check.problems {
            let _ = write!(h, "<li class=\"fail\">FAIL {}</li>", esc(&clip(p, 600)));
        }
        h.push_str("</ul>");
    }
    // Probe paths.
    h.push_str("<h3>Probe families</h3><table class=\"families\"><tr><th>family</th><th>active</th><th>path</th><th>note</th></tr>");
    for f in &meta.families {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&f.family),
            f.active,
            esc(f.path.as_deref().unwrap_or("-")),
            esc(&clip(f.note.as_deref().unwrap_or("-"), 400))
        );
    }
    h.push_str("</table>");
    let mut states: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in &meta.probes {
        states
            .entry(p.state.name().to_owned())
            .or_default()
            .push(p.program.to_string());
    }
    let probes: Vec<String> = states
        .iter()
        .map(|(s, ps)| {
            if s == "attached" {
                format!("{} attached", ps.len())
            } else {
                format!(
                    "{} {}: {}",
                    ps.len(),
                    esc(s),
                    esc(&clip(&ps.join(", "), 300))
                )
            }
        })
        .collect();
    let _ = write!(h, "<p class=\"note\">probes: {}</p>", probes.join("; "));
    if !phases.is_empty() {
        let list: Vec<String> = phases
            .iter()
            .take(MAX_LIST)
            .map(|(n, t)| format!("<b>{}</b> at {t:.2} s", esc(&clip(n, 64))))
            .collect();
        let more = phases.len().saturating_sub(MAX_LIST);
        let _ = write!(
            h,
            "<p class=\"note\">phases (labels.jsonl): {}{}</p>",
            list.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
        if phases.len() > MAX_PHASES {
            let _ = write!(
                h,
                "<p class=\"note\">The charts shade the first {MAX_PHASES} phases.</p>"
            );
        }
    }
    let _ = write!(
        h,
        "<p class=\"note\">Charts: each source is a line on one time axis (seconds since the \
         start); deltas are drawn as rates per second, levels and maxima as they are; each pixel \
         column shows the minimum and maximum of its buckets, so no spike is lost. Shaded bands \
         are the phases. Marks on the top edge: <span style=\"color:#D55E00\">&#9660;</span> a \
         bucket that lost ring-buffer records, <span style=\"color:#0072B2\">|</span> a bucket \
         longer than 1.5 intervals (the tracer was late and merged buckets). A field a source \
         does not measure (null) is not drawn; a line breaks where it was null.</p>"
    );
}

/// A chart in a figure with its title and legend; nothing when no line
/// has a value.
fn figure(
    h: &mut String,
    canvas: &Canvas,
    id: &str,
    title: &str,
    unit: &Unit,
    lines: Vec<(String, &Columns)>,
) -> bool {
    if lines.is_empty() {
        return false;
    }
    let b = &canvas.budget;
    let (c, l) = (b.charts.get() + 1, b.lines.get() + lines.len());
    if c > MAX_CHARTS || l > MAX_LINES {
        b.skipped.borrow_mut().push(title.to_owned());
        return true;
    }
    b.charts.set(c);
    b.lines.set(l);
    let max = lines
        .iter()
        .filter_map(|(_, c)| c.max_value())
        .fold(0.0f64, f64::max);
    let (label, scale) = unit.pick(max);
    let lines: Vec<Line> = lines
        .into_iter()
        .enumerate()
        .map(|(i, (label, data))| Line {
            label,
            data,
            style: Style(i),
        })
        .collect();
    let _ = write!(
        h,
        "<figure data-chart=\"{}\"><h3>{}</h3>",
        esc(id),
        esc(title)
    );
    h.push_str("<div class=\"legend\">");
    for l in &lines {
        let _ = write!(
            h,
            "<span>{}{}</span>",
            svg::swatch(l.style),
            esc(&clip(&l.label, 60))
        );
    }
    h.push_str("</div>");
    h.push_str(&svg::line_chart(&canvas.frame, &label, scale, &lines));
    h.push_str("</figure>\n");
    true
}

/// How a chart's values are labelled and scaled.
enum Unit {
    /// Fixed: label and divisor.
    Fixed(&'static str, f64),
    /// Per second of a count ("requests"), with k/M/G.
    Rate(&'static str),
    /// Bytes per second, with kB/MB/GB.
    Bytes,
    /// A duration in ns, shown in µs/ms/s.
    Time,
    /// A plain count (a level), with k/M/G.
    Count(&'static str),
}

impl Unit {
    fn pick(&self, max: f64) -> (String, f64) {
        let si = |max: f64| -> (&'static str, f64) {
            match max {
                m if m >= 1e9 => ("G", 1e9),
                m if m >= 1e6 => ("M", 1e6),
                m if m >= 1e4 => ("k", 1e3),
                _ => ("", 1.0),
            }
        };
        match self {
            Unit::Fixed(l, s) => ((*l).to_owned(), *s),
            Unit::Rate(what) => {
                let (p, s) = si(max);
                (
                    format!("{}{what} per second", words(p)).trim().to_owned(),
                    s,
                )
            }
            Unit::Count(what) => {
                let (p, s) = si(max);
                (format!("{}{what}", words(p)), s)
            }
            Unit::Bytes => {
                let (p, s) = si(max);
                (format!("{p}B per second"), s)
            }
            Unit::Time => match max {
                m if m >= 1e9 => ("s".into(), 1e9),
                m if m >= 1e6 => ("ms".into(), 1e6),
                m if m >= 1e3 => ("µs".into(), 1e3),
                _ => ("ns".into(), 1.0),
            },
        }
    }
}

/// An SI prefix as words, for axis labels ("thousand events per second").
fn words(prefix: &str) -> &'static str {
    match prefix {
        "k" => "thousand ",
        "M" => "million ",
        "G" => "billion ",
        _ => "",
    }
}

/// Every source's series of `field`, labelled by source (with `suffix`).
fn by_source<'a>(ing: &'a Ingest, field: &str, suffix: &str) -> Vec<(String, &'a Columns)> {
    ing.sources
        .iter()
        .filter_map(|s| ing.get(s, field).map(|c| (format!("{s}{suffix}"), c)))
        .collect()
}

/// Keys of object field `field` across sources (`net_by_if` -> interfaces).
fn keys_of(ing: &Ingest, field: &str) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for s in &ing.sources {
        for f in ing.fields(s) {
            if let Some(rest) = f.strip_prefix(field).and_then(|r| r.strip_prefix('.')) {
                // A name may hold dots: a per-key object's counter is the
                // last part.
                let key = if field == "net_by_if" || field == "blk_by_dev" {
                    rest.rsplit_once('.').map_or(rest, |(k, _)| k)
                } else {
                    rest
                };
                if !keys.iter().any(|k| k == key) {
                    keys.push(key.to_owned());
                }
            }
        }
    }
    // (other) last.
    keys.sort_by_key(|k| k == OTHER);
    keys
}

/// Whether every line measured only zeros (no line: not measured at all).
fn all_zero(lines: &[(String, &Columns)]) -> bool {
    lines.iter().all(|(_, c)| c.max_value() == Some(0.0))
}

/// Names the keys (disks, interfaces) that were measured but idle: their
/// charts would be flat lines at 0.
fn idle_note(h: &mut String, what: &str, keys: &[&str]) {
    if !keys.is_empty() {
        let _ = write!(
            h,
            "<p class=\"note idle\">{what} measured at 0 in every bucket of every source (not \
             drawn): {}.</p>",
            esc(&keys.join(", "))
        );
    }
}

fn section(h: &mut String, title: &str, note: &str) {
    let _ = write!(h, "<h2>{}</h2>", esc(title));
    if !note.is_empty() {
        let _ = write!(h, "<p class=\"note\">{note}</p>");
    }
}

fn none(h: &mut String, what: &str) {
    let _ = write!(
        h,
        "<p class=\"note none\">No source measured {} in this episode (null in every row).</p>",
        esc(what)
    );
}

/// Fields drawn by the fixed groups (the rest go to "Other fields").
const GROUPED: &[&str] = &[
    "cpu_ns",
    "ctx_switches",
    "wakeups",
    "runq_delay_ns",
    "runq_delay_max_ns",
    "blk_read_bytes",
    "blk_write_bytes",
    "io_write_bytes",
    "blk_read_ops",
    "blk_write_ops",
    "blk_latency_ns_sum",
    BLK_MEAN,
    "blk_latency_max_ns",
    "net_tx_bytes",
    "net_rx_bytes",
    "net_tx_packets",
    "net_rx_packets",
    "kvm_exits",
    "kvm_userspace_exits",
];
const GROUPED_OBJECTS: &[&str] = &[
    "net_by_if",
    "blk_by_dev",
    "kvm_exit_reasons",
    "kvm_userspace_exit_reasons",
];

fn folded_note(ing: &Ingest, field: &str, what: &str) -> String {
    let mut notes = Vec::new();
    for s in &ing.sources {
        let n = ing.folded_count(s, field);
        if n > 0 {
            notes.push(format!(
                "{s}: {n}{} more {what} summed as {OTHER}",
                if n >= 10_000 { "+" } else { "" }
            ));
        }
    }
    if notes.is_empty() {
        String::new()
    } else {
        format!(
            "Only the first {} {what} of a source are drawn apart; {}.",
            super::ingest::MAX_KEYS,
            esc(&notes.join("; "))
        )
    }
}

fn charts(h: &mut String, f: &Canvas, ing: &Ingest, meta: &Meta) {
    section(h, "CPU", "");
    if !figure(
        h,
        f,
        "cpu",
        "CPU time (cpu_ns)",
        &Unit::Fixed("CPU time per second (cores)", 1e9),
        by_source(ing, "cpu_ns", ""),
    ) {
        none(h, "cpu_ns");
    }

    section(h, "Context switches and wakeups", "");
    let mut lines = by_source(ing, "ctx_switches", " switches");
    lines.extend(by_source(ing, "wakeups", " wakeups"));
    if !figure(
        h,
        f,
        "switches",
        "Context switches and wakeups (ctx_switches, wakeups)",
        &Unit::Rate("events"),
        lines,
    ) {
        none(h, "context switches or wakeups");
    }

    section(h, "Run-queue delay", "");
    let a = figure(
        h,
        f,
        "runq",
        "Run-queue delay (runq_delay_ns): time runnable threads waited for a CPU",
        &Unit::Fixed("ms waited per second", 1e6),
        by_source(ing, "runq_delay_ns", ""),
    );
    let b = figure(
        h,
        f,
        "runq_max",
        "Longest single run-queue delay per bucket (runq_delay_max_ns)",
        &Unit::Time,
        by_source(ing, "runq_delay_max_ns", " max"),
    );
    if !a && !b {
        none(h, "run-queue delay");
    }

    section(h, "Block I/O", "");
    let mut bytes = by_source(ing, "blk_read_bytes", " read");
    bytes.extend(by_source(ing, "blk_write_bytes", " write"));
    bytes.extend(by_source(
        ing,
        "io_write_bytes",
        " written (I/O accounting)",
    ));
    let mut ops = by_source(ing, "blk_read_ops", " read");
    ops.extend(by_source(ing, "blk_write_ops", " write"));
    let mut lat = by_source(ing, BLK_MEAN, " mean");
    lat.extend(by_source(ing, "blk_latency_max_ns", " max"));
    let any = [
        figure(
            h,
            f,
            "blk_bytes",
            "Block bytes (blk_read_bytes, blk_write_bytes, io_write_bytes)",
            &Unit::Bytes,
            bytes,
        ),
        figure(
            h,
            f,
            "blk_ops",
            "Block requests (blk_read_ops, blk_write_ops)",
            &Unit::Rate("requests"),
            ops,
        ),
        figure(
            h,
            f,
            "blk_latency",
            "Block request latency per bucket: mean (blk_latency_ns_sum / requests) and max (blk_latency_max_ns)",
            &Unit::Time,
            lat,
        ),
    ];
    let devs = keys_of(ing, "blk_by_dev");
    let note = folded_note(ing, "blk_by_dev", "disks");
    if !note.is_empty() {
        let _ = write!(h, "<p class=\"note\">{note}</p>");
    }
    let mut any_dev = false;
    let mut idle = Vec::new();
    for d in &devs {
        let [bytes, ops] = ["bytes", "ops"].map(|unit| {
            let mut lines = Vec::new();
            for dir in ["read", "write"] {
                lines.extend(by_source(
                    ing,
                    &format!("blk_by_dev.{d}.{dir}_{unit}"),
                    &format!(" {dir}"),
                ));
            }
            lines
        });
        if all_zero(&bytes) && all_zero(&ops) {
            any_dev |= !bytes.is_empty();
            idle.push(d.as_str());
            continue;
        }
        any_dev |= figure(
            h,
            f,
            &format!("blk_dev:{d}"),
            &format!("Disk {d}: bytes as QEMU counts them (blk_by_dev)"),
            &Unit::Bytes,
            bytes,
        );
        figure(
            h,
            f,
            &format!("blk_dev_ops:{d}"),
            &format!("Disk {d}: requests (blk_by_dev)"),
            &Unit::Rate("requests"),
            ops,
        );
    }
    idle_note(h, "Disks", &idle);
    if !any.iter().any(|x| *x) && !any_dev {
        none(h, "block I/O");
    }

    section(
        h,
        "Network",
        "Per vantage (net_by_if): a tap interface of the target, or `sockets` for its own IPv4/IPv6 sockets; tx is what the target sent.",
    );
    let mut total = Vec::new();
    for c in ["net_tx_bytes", "net_rx_bytes"] {
        total.extend(by_source(ing, c, &format!(" {}", &c[4..6])));
    }
    let any_total = figure(
        h,
        f,
        "net_total",
        "Network bytes, all vantages (net_tx_bytes, net_rx_bytes)",
        &Unit::Bytes,
        total,
    );
    let note = folded_note(ing, "net_by_if", "interfaces");
    if !note.is_empty() {
        let _ = write!(h, "<p class=\"note\">{note}</p>");
    }
    let ifs = keys_of(ing, "net_by_if");
    let mut idle = Vec::new();
    for i in &ifs {
        let [bytes, pkts] = ["bytes", "packets"].map(|unit| {
            let mut lines = Vec::new();
            for dir in ["tx", "rx"] {
                lines.extend(by_source(
                    ing,
                    &format!("net_by_if.{i}.{dir}_{unit}"),
                    &format!(" {dir}"),
                ));
            }
            lines
        });
        if all_zero(&bytes) && all_zero(&pkts) {
            idle.push(i.as_str());
            continue;
        }
        figure(
            h,
            f,
            &format!("net_bytes:{i}"),
            &format!("Interface {i}: bytes"),
            &Unit::Bytes,
            bytes,
        );
        figure(
            h,
            f,
            &format!("net_packets:{i}"),
            &format!("Interface {i}: packets"),
            &Unit::Rate("packets"),
            pkts,
        );
    }
    idle_note(h, "Vantages", &idle);
    if !any_total && ifs.is_empty() {
        none(h, "network traffic");
    }

    section(h, "KVM exits", "");
    let mut lines = by_source(ing, "kvm_exits", " VM exits");
    lines.extend(by_source(ing, "kvm_userspace_exits", " returns to QEMU"));
    let mut any = figure(
        h,
        f,
        "kvm",
        "VM exits (kvm_exits) and returns of KVM_RUN to QEMU (kvm_userspace_exits)",
        &Unit::Rate("exits"),
        lines,
    );
    for (field, title) in [
        ("kvm_exit_reasons", "VM exits by reason (kvm_exit_reasons)"),
        (
            "kvm_userspace_exit_reasons",
            "Returns to QEMU by reason (kvm_userspace_exit_reasons)",
        ),
    ] {
        let note = folded_note(ing, field, "reasons");
        if !note.is_empty() {
            let _ = write!(h, "<p class=\"note\">{note}</p>");
        }
        let mut lines = Vec::new();
        for s in &ing.sources {
            let multi = ing.sources.len() > 1;
            for r in keys_of(ing, field) {
                if let Some(c) = ing.get(s, &format!("{field}.{r}")) {
                    let label = if multi { format!("{s} {r}") } else { r.clone() };
                    lines.push((label, c));
                }
            }
        }
        any |= figure(h, f, field, title, &Unit::Rate("exits"), lines);
    }
    if !any {
        let why = meta
            .families
            .iter()
            .find(|f| f.family == "kvm")
            .and_then(|f| f.note.as_deref())
            .unwrap_or("");
        none(h, "KVM exits");
        if !why.is_empty() {
            let _ = write!(h, "<p class=\"note\">kvm family: {}</p>", esc(why));
        }
    }

    // Every other field of every source.
    section(
        h,
        "Other fields",
        "Every other field some source measured (perf's counters, the threads, migrations, \
         page faults, the probes' own event counts...), one chart per field.",
    );
    let mut others: Vec<String> = Vec::new();
    for s in &ing.sources {
        for fld in ing.fields(s) {
            let top = fld.split('.').next().unwrap_or(fld);
            if GROUPED.contains(&fld) || GROUPED_OBJECTS.contains(&top) {
                continue;
            }
            if !others.iter().any(|o| o == fld) {
                others.push(fld.to_owned());
            }
        }
    }
    for fld in &others {
        let plain = summary::is_max_field(fld.rsplit('.').next().unwrap_or(fld));
        let unit = match (plain, fld.ends_with("_ns")) {
            (true, true) => Unit::Time,
            (true, false) => Unit::Count("count"),
            (false, true) => Unit::Fixed("ms per second", 1e6),
            (false, false) => Unit::Rate("count"),
        };
        figure(
            h,
            f,
            &format!("other:{fld}"),
            fld,
            &unit,
            by_source(ing, fld, ""),
        );
    }
    if others.is_empty() {
        let _ = write!(h, "<p class=\"note\">No other fields.</p>");
    }
    if !ing.dropped_series.is_empty() {
        let list: Vec<String> = ing.dropped_series.iter().take(50).cloned().collect();
        let _ = write!(
            h,
            "<p class=\"note\">{} field(s) not drawn (over {} per source): {}</p>",
            ing.dropped_series.len(),
            super::ingest::MAX_SERIES,
            esc(&list.join(", "))
        );
    }
    let skipped = f.budget.skipped.borrow().clone();
    if !skipped.is_empty() {
        let _ = write!(
            h,
            "<p class=\"note\" id=\"not-drawn\">{} chart(s) not drawn (the page draws at most {MAX_CHARTS} charts and {MAX_LINES} lines): {}</p>",
            skipped.len(),
            esc(&clip(&skipped.join(", "), 4000))
        );
    }
    if ing.bad_rows > 0 {
        let _ = write!(
            h,
            "<p class=\"note\">{} row(s) without t_mono_ns not drawn.</p>",
            ing.bad_rows
        );
    }
}

fn heat_maps(h: &mut String, f: &Canvas, ing: &Ingest) {
    section(
        h,
        "Histograms over time",
        "The log2 histograms as heat-maps: time across, the log2 bucket up (a row counts \
         delays or latencies from its label to twice that), the colour the number in that cell \
         (log scale, darker is more).",
    );
    let mut any = false;
    for (field, title, what) in [
        (
            "runq_delay_hist_log2",
            "Run-queue delays (runq_delay_hist_log2)",
            "delay",
        ),
        (
            "blk_latency_hist_log2",
            "Block request latencies (blk_latency_hist_log2)",
            "latency",
        ),
    ] {
        for s in &ing.sources {
            if let Some(heat) = ing.heat(s, field) {
                let _ = write!(
                    h,
                    "<figure data-chart=\"heat:{}:{}\"><h3>{} — {}</h3>{}",
                    esc(s),
                    field,
                    esc(title),
                    esc(s),
                    svg::heat_key(heat)
                );
                h.push_str(&svg::heat_map(&f.frame, heat, what));
                if heat.overflow > 0 {
                    let _ = write!(
                        h,
                        "<p class=\"note\">{} counts past element 63 not drawn.</p>",
                        heat.overflow
                    );
                }
                h.push_str("</figure>\n");
                any = true;
            }
        }
    }
    if !any {
        none(h, "a histogram with any sample");
    }
}

fn totals_table(h: &mut String, t: &summary::EpisodeTotals) {
    section(
        h,
        "Totals",
        "What <code>cis490 summary</code> prints: each field summed over the rows, levels \
         (threads) and maxima (*_max_ns) as their maximum, a histogram as its number of \
         samples; - where a source does not measure the field.",
    );
    h.push_str("<table class=\"totals\"><tr><th>field</th>");
    for c in &t.sources {
        let _ = write!(
            h,
            "<th data-source=\"{}\">{} ({} rows)</th>",
            esc(&c.source),
            esc(&c.source),
            c.rows
        );
    }
    h.push_str("</tr>");
    for f in &t.fields {
        let _ = write!(h, "<tr data-field=\"{}\"><td>{}</td>", esc(f), esc(f));
        for c in &t.sources {
            let v = c.totals.get(f).cloned().unwrap_or(Value::Null);
            let shown = v.as_f64().map_or("-".into(), |x| summary::human(f, x));
            let _ = write!(
                h,
                "<td class=\"n\" data-source=\"{}\" data-value=\"{}\">{}</td>",
                esc(&c.source),
                esc(&v.to_string()),
                esc(&shown)
            );
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>\n");
}

fn timeline(h: &mut String, f: &Canvas, ing: &Ingest, events: &Events) {
    section(
        h,
        "Timeline",
        "Threads of the target (a bar from its start to its exit; threads there before the \
         trace start at 0), QEMU's events over QMP and the tracer's own events.",
    );
    let t_of = |e: &Value| {
        e["t_mono_ns"]
            .as_f64()
            .map(|t| ((t - ing.start_ns) / 1e9).max(0.0))
    };
    let mut qemu = Lane {
        name: "QEMU (QMP)".into(),
        bar: None,
        marks: Vec::new(),
    };
    let mut tracer = Lane {
        name: "tracer".into(),
        bar: None,
        marks: Vec::new(),
    };
    let mut qemu_list = Vec::new();
    // tid -> (name, start, end, renames)
    let mut threads: Vec<(u64, String, Option<f64>, Option<f64>)> = Vec::new();
    let mut more_marks = 0u64;
    let mut more_threads = 0u64;
    let mut add_mark = |lane: &mut Lane, t: f64, s: String| {
        if lane.marks.len() < MAX_MARKS {
            lane.marks.push((t, s));
        } else {
            more_marks += 1;
        }
    };
    for e in &events.lines {
        let Some(t) = t_of(e) else { continue };
        let name = e["event"].as_str().unwrap_or("?");
        match name {
            "probe" => {}
            "qmp" => {
                let what = e["qmp_event"]
                    .as_str()
                    .or(e["qmp_error"].as_str().map(|_| "qmp_error"))
                    .unwrap_or("?")
                    .to_owned();
                if qemu_list.len() < MAX_LIST {
                    let data = if e["qmp_error"].is_null() {
                        e["data"].to_string()
                    } else {
                        text(&e["qmp_error"])
                    };
                    qemu_list.push((t, what.clone(), data));
                }
                add_mark(&mut qemu, t, what);
            }
            "thread_started" | "thread_exited" | "thread_renamed" | "exec" => {
                let Some(tid) = e["tid"].as_u64() else {
                    continue;
                };
                let comm = e["comm"].as_str().unwrap_or("?").to_owned();
                let i = match threads.iter().position(|th| th.0 == tid) {
                    Some(i) => i,
                    None if threads.len() < MAX_THREADS => {
                        threads.push((tid, comm.clone(), None, None));
                        threads.len() - 1
                    }
                    None => {
                        if name == "thread_started" {
                            more_threads += 1;
                        }
                        continue;
                    }
                };
                let th = &mut threads[i];
                match name {
                    "thread_started" => th.2 = Some(t),
                    "thread_exited" => th.3 = Some(t),
                    _ => th.1 = comm,
                }
            }
            other => {
                let label = match other {
                    "tap_attached" => format!("tap {}", text(&e["name"])),
                    "drops" => format!("drops {}", text(&e["dropped_records"])),
                    "finished" => format!("finished: {}", text(&e["reason"])),
                    o => o.to_owned(),
                };
                add_mark(&mut tracer, t, label);
            }
        }
    }
    let mut lanes = vec![qemu, tracer];
    for (tid, comm, start, end) in &threads {
        lanes.push(Lane {
            name: format!("{comm} {tid}"),
            bar: Some((start.unwrap_or(0.0), end.unwrap_or(ing.span_s))),
            marks: Vec::new(),
        });
    }
    h.push_str("<figure data-chart=\"timeline\">");
    h.push_str(&svg::timeline(&f.frame, &lanes));
    h.push_str("</figure>");
    let mut notes = Vec::new();
    if more_threads > 0 {
        notes.push(format!(
            "{more_threads} more threads started (only the first {MAX_THREADS} have lanes)"
        ));
    }
    if more_marks > 0 {
        notes.push(format!("{more_marks} more events not drawn"));
    }
    if events.more > 0 {
        notes.push(format!(
            "{} events past the first {} not read",
            events.more,
            super::ingest::MAX_EVENTS
        ));
    }
    if events.bad > 0 {
        notes.push(format!(
            "{} lines of events.jsonl not JSON objects",
            events.bad
        ));
    }
    if !notes.is_empty() {
        let _ = write!(h, "<p class=\"note\">{}.</p>", esc(&notes.join("; ")));
    }
    if !qemu_list.is_empty() {
        h.push_str("<h3>QEMU events</h3><table class=\"qmp\"><tr><th>t (s)</th><th>event</th><th>data</th></tr>");
        for (t, what, data) in &qemu_list {
            let _ = write!(
                h,
                "<tr><td class=\"n\">{t:.3}</td><td>{}</td><td>{}</td></tr>",
                esc(what),
                esc(&clip(data, 200))
            );
        }
        h.push_str("</table>");
    }
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn utc_times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(
            utc((951_782_400 + 3_661) * 1_000_000_000),
            "2000-02-29 01:01:01 UTC"
        );
        assert_eq!(utc(1_735_689_599_999_999_999), "2024-12-31 23:59:59 UTC");
    }
}
