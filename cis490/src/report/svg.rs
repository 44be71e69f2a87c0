//! SVG written directly: line charts, heat-maps and a timeline on one time
//! axis. Every text that comes from an episode (interface, device, thread
//! and label names, commands) goes through [`esc`].

use std::fmt::Write as _;

use super::series::{Columns, Heat};

/// Escapes text for HTML and SVG (element content and quoted attributes).
/// Control characters, which XML forbids, become U+FFFD.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => out.push('\u{fffd}'),
            '\u{7f}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// At most `max` characters of `s` (an ellipsis marks a cut).
pub fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Chart geometry, shared by every chart so their time axes line up.
pub const WIDTH: f64 = 1000.0;
pub const LEFT: f64 = 78.0;
pub const RIGHT: f64 = 22.0;
// PLOT_W is COLUMNS: one pixel per column, at integer x.
pub const PLOT_W: f64 = WIDTH - LEFT - RIGHT;
/// Pixel columns of a line chart (one per pixel of the plot).
pub const COLUMNS: usize = 900;
/// Columns of a heat-map.
pub const HEAT_COLUMNS: usize = 150;
const TOP: f64 = 22.0;
const PLOT_H: f64 = 170.0;
const BOTTOM: f64 = 40.0;

/// Colours that stay apart in greyscale (Okabe-Ito, by falling
/// luminance), combined with dash patterns and marker shapes.
const COLOURS: [&str; 8] = [
    "#000000", "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#7f7f7f",
];
const DASHES: [&str; 5] = ["", "7 3", "2 2", "10 3 2 3", "4 4"];
const MARKERS: usize = 5;

/// How the `i`-th series of a chart is drawn.
#[derive(Debug, Clone, Copy)]
pub struct Style(pub usize);

impl Style {
    fn colour(self) -> &'static str {
        COLOURS[self.0 % COLOURS.len()]
    }
    fn dash(self) -> &'static str {
        DASHES[self.0 % DASHES.len()]
    }
    fn marker(self) -> usize {
        self.0 % MARKERS
    }
}

/// A marker shape centred on (x, y).
fn marker(out: &mut String, kind: usize, x: f64, y: f64, colour: &str) {
    let _ = match kind {
        0 => write!(
            out,
            r##"<circle cx="{x:.1}" cy="{y:.1}" r="3.2" fill="{colour}"/>"##
        ),
        1 => write!(
            out,
            r##"<rect x="{:.1}" y="{:.1}" width="6" height="6" fill="white" stroke="{colour}" stroke-width="1.5"/>"##,
            x - 3.0,
            y - 3.0
        ),
        2 => write!(
            out,
            r##"<path d="M{x:.1} {:.1}l4 7h-8z" fill="{colour}"/>"##,
            y - 4.0
        ),
        3 => write!(
            out,
            r##"<path d="M{x:.1} {:.1}l4 4l-4 4l-4-4z" fill="white" stroke="{colour}" stroke-width="1.5"/>"##,
            y - 4.0
        ),
        _ => write!(
            out,
            r##"<path d="M{:.1} {y:.1}h8M{x:.1} {:.1}v8" stroke="{colour}" stroke-width="2"/>"##,
            x - 4.0,
            y - 4.0
        ),
    };
}

/// A small legend swatch (line sample with its dash and marker).
pub fn swatch(style: Style) -> String {
    let mut s = String::from(r##"<svg width="38" height="12" viewBox="0 0 38 12">"##);
    let _ = write!(
        s,
        r##"<path d="M1 6h36" stroke="{}" stroke-width="2" stroke-dasharray="{}" fill="none"/>"##,
        style.colour(),
        style.dash()
    );
    marker(&mut s, style.marker(), 19.0, 6.0, style.colour());
    s.push_str("</svg>");
    s
}

/// A "nice" step (1, 2 or 5 times a power of ten) giving about `n` ticks
/// over `range`.
pub fn nice_step(range: f64, n: f64) -> f64 {
    if range.is_nan() || range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    let raw = range / n;
    let p = 10f64.powf(raw.log10().floor());
    let m = raw / p;
    let k = if m <= 1.0 {
        1.0
    } else if m <= 2.0 {
        2.0
    } else if m <= 5.0 {
        5.0
    } else {
        10.0
    };
    k * p
}

/// A tick label: few digits, no trailing zeros.
pub fn tick_label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

/// What every chart shares: the time span, phases and marked buckets.
#[derive(Debug, Clone, Default)]
pub struct Frame {
    pub span_s: f64,
    /// Phase name and its start, s (sorted).
    pub phases: Vec<(String, f64)>,
    /// Columns (of [`COLUMNS`]) with a bucket that lost ring-buffer records.
    pub drop_cols: Vec<usize>,
    /// Columns with a bucket longer than the interval (merged buckets).
    pub merged_cols: Vec<usize>,
}

impl Frame {
    fn x(&self, t_s: f64) -> f64 {
        LEFT + (t_s / self.span_s).clamp(0.0, 1.0) * PLOT_W
    }

    fn col_x(&self, c: usize, n: usize) -> f64 {
        LEFT + (c as f64 / n as f64 * PLOT_W).floor()
    }

    /// Phase bands, the time axis and its grid, for a plot of `plot_h`.
    fn background(&self, out: &mut String, plot_h: f64) {
        let bottom = TOP + plot_h;
        for (i, (name, t)) in self.phases.iter().enumerate() {
            let x0 = self.x(*t);
            let x1 = self
                .phases
                .get(i + 1)
                .map_or(LEFT + PLOT_W, |(_, t)| self.x(*t));
            let shade = if i % 2 == 0 { "#e4e4e4" } else { "#f2f2f2" };
            let near_end = x0 > LEFT + PLOT_W - 80.0;
            let anchor = if near_end {
                r#" text-anchor="end""#
            } else {
                ""
            };
            let _ = write!(
                out,
                r##"<g class="phase"><rect x="{x0:.0}" y="{TOP}" width="{:.0}" height="{plot_h:.0}" fill="{shade}"/><path d="M{x0:.0} {TOP}v{plot_h:.0}" stroke="#666" stroke-dasharray="3 2"/><text x="{:.0}" y="{:.0}" font-size="10"{anchor}>{}</text></g>"##,
                (x1 - x0).max(0.0),
                // A band that starts near the right edge is named to the
                // left of its start.
                if near_end { x0 - 2.0 } else { x0 + 2.0 },
                TOP + 10.0,
                esc(&clip(name, 24))
            );
        }
        let step = nice_step(self.span_s, 10.0);
        let mut t = 0.0;
        let mut ticks = String::new();
        while t <= self.span_s + step * 1e-9 {
            let x = self.x(t);
            let _ = write!(
                ticks,
                r##"<path d="M{x:.1} {TOP}v{plot_h}" stroke="#ccc" stroke-width="0.5"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"##,
                bottom + 14.0,
                tick_label(t, step)
            );
            t += step;
        }
        out.push_str(&ticks);
        let _ = write!(
            out,
            r##"<path d="M{LEFT} {bottom}h{PLOT_W}" stroke="black"/><text class="axis-x" x="{:.1}" y="{:.1}" font-size="11" text-anchor="middle">time since start (s)</text>"##,
            LEFT + PLOT_W / 2.0,
            bottom + 30.0
        );
    }

    /// Ticks above the plot at buckets that lost records or were merged.
    fn bucket_marks(&self, out: &mut String) {
        for (cols, colour, shape) in [
            (&self.drop_cols, "#D55E00", "l3-6h-6z"),
            (&self.merged_cols, "#0072B2", "v-6"),
        ] {
            if cols.is_empty() {
                continue;
            }
            let mut d = String::new();
            for c in cols {
                let x = self.col_x(*c, COLUMNS);
                let _ = write!(d, "M{x:.1} {TOP}{shape}");
            }
            let _ = write!(
                out,
                r##"<path d="{d}" fill="{colour}" stroke="{colour}" stroke-width="1.5"/>"##
            );
        }
    }
}

/// One line of a chart.
pub struct Line<'a> {
    pub label: String,
    pub data: &'a Columns,
    pub style: Style,
}

/// A line chart: every series on the frame's time axis, values divided by
/// `scale` and labelled `unit`.
pub fn line_chart(frame: &Frame, unit: &str, scale: f64, lines: &[Line]) -> String {
    let height = TOP + PLOT_H + BOTTOM;
    let max = lines
        .iter()
        .filter_map(|l| l.data.max_value())
        .fold(0.0f64, f64::max)
        / scale;
    let step = nice_step(if max > 0.0 { max } else { 1.0 }, 4.0);
    let top = (max / step).ceil().max(1.0) * step;
    // The plot's geometry and scale, for readers of the page (the tests).
    let mut out = format!(
        r##"<svg class="chart" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img" data-plot-top="{TOP}" data-plot-height="{PLOT_H}" data-y-top="{top}" data-y-scale="{scale}">"##
    );
    frame.background(&mut out, PLOT_H);
    let y = |v: f64| TOP + PLOT_H - (v / scale / top).clamp(-0.02, 1.0) * PLOT_H;
    let mut v = 0.0;
    while v <= top + step * 1e-9 {
        let yy = TOP + PLOT_H - v / top * PLOT_H;
        let _ = write!(
            out,
            r##"<path d="M{LEFT} {yy:.1}h{PLOT_W}" stroke="#ddd" stroke-width="0.5"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            LEFT - 4.0,
            yy + 4.0,
            tick_label(v, step)
        );
        v += step;
    }
    let _ = write!(
        out,
        r##"<path d="M{LEFT} {TOP}v{PLOT_H}" stroke="black"/><text class="axis-y" transform="translate(14 {:.1}) rotate(-90)" font-size="11" text-anchor="middle">{}</text>"##,
        TOP + PLOT_H / 2.0,
        esc(unit)
    );
    for l in lines {
        let (colour, dash) = (l.style.colour(), l.style.dash());
        let mut d = String::new();
        let mut pen_down = false;
        let mut marks = Vec::new();
        let mut next_mark = 0.0;
        for (c, mm) in l.data.points() {
            let x = frame.col_x(c, l.data.len());
            match mm {
                None => pen_down = false,
                Some((lo, hi)) => {
                    // Whole pixels: a chart's resolution, and half the bytes.
                    let (ylo, yhi) = (y(lo).round(), y(hi).round());
                    let cmd = if pen_down { 'L' } else { 'M' };
                    let _ = write!(d, "{cmd}{x:.0} {ylo:.0}");
                    if ylo != yhi {
                        let _ = write!(d, "V{yhi:.0}");
                    }
                    pen_down = true;
                    if x >= next_mark {
                        marks.push((x, yhi));
                        next_mark = x + 110.0;
                    }
                }
            }
        }
        let _ = write!(
            out,
            r##"<path class="series" data-series="{}" d="{d}" fill="none" stroke="{colour}" stroke-width="1.6" stroke-dasharray="{dash}" stroke-linejoin="round"/>"##,
            esc(&l.label)
        );
        for (x, yy) in marks {
            marker(&mut out, l.style.marker(), x, yy, colour);
        }
    }
    frame.bucket_marks(&mut out);
    out.push_str("</svg>");
    out
}

/// Heat-map levels: light to dark, so more is darker in greyscale too.
const HEAT: [&str; 6] = [
    "#ffffcc", "#c7e9b4", "#7fcdbb", "#41b6c4", "#225ea8", "#081d58",
];

/// A log2 nanosecond bucket's lower bound, for people.
pub fn log2_ns_label(i: usize) -> String {
    let v = if i == 0 { 0.0 } else { 2f64.powi(i as i32) };
    match v {
        v if v >= 1e9 => format!("{:.3} s", v / 1e9),
        v if v >= 1e6 => format!("{:.0} ms", v / 1e6),
        v if v >= 1e3 => format!("{:.0} µs", v / 1e3),
        v => format!("{v:.0} ns"),
    }
}

/// The count range of heat level `k` of `HEAT.len()` up to `max`
/// (log-spaced), as its lower bound.
fn level_floor(k: usize, max: u64) -> f64 {
    (max as f64).powf(k as f64 / HEAT.len() as f64)
}

fn level(n: u64, max: u64) -> usize {
    if max <= 1 {
        return HEAT.len() - 1;
    }
    let f = (n as f64).ln() / (max as f64).ln();
    ((f * HEAT.len() as f64) as usize).min(HEAT.len() - 1)
}

/// A heat-map of a log2 histogram field: time across, log2 bucket up,
/// colour the count (log scale).
pub fn heat_map(frame: &Frame, heat: &Heat, what: &str) -> String {
    let Some((lo, hi)) = heat.used_rows() else {
        return String::new();
    };
    let rows = hi - lo + 1;
    let row_h = (PLOT_H / rows as f64).min(18.0);
    let plot_h = row_h * rows as f64;
    let height = TOP + plot_h + BOTTOM;
    let mut out = format!(
        r##"<svg class="chart heat" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img">"##
    );
    frame.background(&mut out, plot_h);
    let max = heat.max_count();
    let n = heat.cells.len();
    let cw = PLOT_W / n as f64;
    // One path per level; a run of equal cells in a row is one rectangle.
    let mut paths = vec![String::new(); HEAT.len()];
    for r in lo..=hi {
        let yy = TOP + plot_h - (r - lo + 1) as f64 * row_h;
        let mut c = 0;
        while c < n {
            let cnt = heat.cells[c][r];
            if cnt == 0 {
                c += 1;
                continue;
            }
            let k = level(cnt, max);
            let start = c;
            while c < n && heat.cells[c][r] > 0 && level(heat.cells[c][r], max) == k {
                c += 1;
            }
            let x = LEFT + start as f64 * cw;
            let _ = write!(
                paths[k],
                "M{x:.1} {yy:.1}h{:.1}v{row_h:.1}h{:.1}z",
                (c - start) as f64 * cw,
                -((c - start) as f64 * cw)
            );
        }
    }
    for (k, d) in paths.iter().enumerate() {
        if !d.is_empty() {
            let _ = write!(out, r##"<path d="{d}" fill="{}"/>"##, HEAT[k]);
        }
    }
    let every = rows.div_ceil(8).max(1);
    for r in (lo..=hi).step_by(every) {
        let yy = TOP + plot_h - (r - lo) as f64 * row_h - row_h / 2.0 + 4.0;
        let _ = write!(
            out,
            r##"<text x="{:.1}" y="{yy:.1}" font-size="10" text-anchor="end">{}</text>"##,
            LEFT - 4.0,
            log2_ns_label(r)
        );
    }
    let _ = write!(
        out,
        r##"<path d="M{LEFT} {TOP}v{plot_h}" stroke="black"/><text class="axis-y" transform="translate(14 {:.1}) rotate(-90)" font-size="11" text-anchor="middle">{} (log2 buckets)</text>"##,
        TOP + plot_h / 2.0,
        esc(what)
    );
    frame.bucket_marks(&mut out);
    out.push_str("</svg>");
    out
}

/// The heat-map's colour key as HTML.
pub fn heat_key(heat: &Heat) -> String {
    let max = heat.max_count();
    let mut s = String::from(r##"<div class="legend">count per cell:"##);
    for (k, c) in HEAT.iter().enumerate() {
        let from = level_floor(k, max).ceil().max(1.0);
        let _ = write!(
            s,
            r##"<span><svg width="14" height="12"><rect width="14" height="12" fill="{c}" stroke="#999"/></svg> ≥ {from:.0}</span>"##
        );
    }
    s.push_str("</div>");
    s
}

/// One lane of the timeline.
pub struct Lane {
    pub name: String,
    /// A bar over [from, to] s (a thread's life), if any.
    pub bar: Option<(f64, f64)>,
    /// Points in time with a short text.
    pub marks: Vec<(f64, String)>,
}

/// The timeline: one lane per row on the frame's time axis.
pub fn timeline(frame: &Frame, lanes: &[Lane]) -> String {
    const LANE_H: f64 = 17.0;
    let plot_h = LANE_H * lanes.len().max(1) as f64;
    let height = TOP + plot_h + BOTTOM;
    let mut out = format!(
        r##"<svg class="chart timeline" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img">"##
    );
    frame.background(&mut out, plot_h);
    for (i, lane) in lanes.iter().enumerate() {
        let yy = TOP + i as f64 * LANE_H;
        let _ = write!(
            out,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" text-anchor="end">{}</text>"##,
            LEFT - 4.0,
            yy + 12.0,
            esc(&clip(&lane.name, 14))
        );
        if let Some((a, b)) = lane.bar {
            let (x0, x1) = (frame.x(a), frame.x(b));
            let _ = write!(
                out,
                r##"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="9" fill="#56B4E9" stroke="#0072B2"/>"##,
                yy + 4.0,
                (x1 - x0).max(1.0)
            );
        }
        let mut last_text = f64::NEG_INFINITY;
        for (t, text) in &lane.marks {
            let x = frame.x(*t);
            // Every mark is named on hover; the text beside it only where
            // there is room.
            let _ = write!(out, "<g><title>{} at {t:.3} s</title>", esc(text));
            marker(&mut out, 3, x, yy + 8.5, "#D55E00");
            out.push_str("</g>");
            if x - last_text > 70.0 {
                let _ = write!(
                    out,
                    r##"<text x="{:.1}" y="{:.1}" font-size="10">{}</text>"##,
                    x + 6.0,
                    yy + 12.0,
                    esc(&clip(text, 14))
                );
                last_text = x;
            }
        }
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untrusted_names_are_escaped() {
        let evil = r##"tap"><script>alert(1)</script><x y='1' & z"##;
        let e = esc(evil);
        assert!(!e.contains('<') && !e.contains('>') && !e.contains('"') && !e.contains('\''));
        assert_eq!(
            e,
            "tap&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;&lt;x y=&#39;1&#39; &amp; z"
        );
        assert_eq!(esc("a\u{1}b\u{7f}"), "a\u{fffd}b\u{fffd}");
        // Through a chart: a series label, a phase name and a lane name.
        let mut c = Columns::new(COLUMNS, 1.0);
        c.add(0.5, Some(1.0));
        let frame = Frame {
            span_s: 1.0,
            phases: vec![(evil.into(), 0.1)],
            ..Default::default()
        };
        let svg = line_chart(
            &frame,
            evil,
            1.0,
            &[Line {
                label: evil.into(),
                data: &c,
                style: Style(0),
            }],
        ) + &timeline(
            &frame,
            &[Lane {
                name: evil.into(),
                bar: None,
                marks: vec![(0.2, evil.into())],
            }],
        );
        assert!(!svg.contains("<script"), "{svg}");
        assert!(!svg.contains("'1'"), "{svg}");
    }

    #[test]
    fn nice_ticks() {
        assert_eq!(nice_step(10.0, 10.0), 1.0);
        assert_eq!(nice_step(37.0, 10.0), 5.0);
        assert_eq!(nice_step(0.9, 4.0), 0.5);
        assert_eq!(tick_label(2.5, 0.5), "2.5");
        assert_eq!(tick_label(20.0, 10.0), "20");
        assert_eq!(log2_ns_label(10), "1 µs");
        assert_eq!(clip("abcdef", 4), "abc…");
    }

    #[test]
    fn a_spike_is_drawn_at_full_height() {
        let mut c = Columns::new(COLUMNS, 100.0);
        for i in 0..100_000 {
            c.add(
                i as f64 / 1000.0,
                Some(if i == 77_777 { 100.0 } else { 1.0 }),
            );
        }
        let frame = Frame {
            span_s: 100.0,
            ..Default::default()
        };
        let svg = line_chart(
            &frame,
            "u",
            1.0,
            &[Line {
                label: "s".into(),
                data: &c,
                style: Style(0),
            }],
        );
        // The top of the plot (y = TOP) is reached by the spike's column.
        assert!(svg.contains(&format!("V{TOP:.0}")), "{svg}");
    }
}
