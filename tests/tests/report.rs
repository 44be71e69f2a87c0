//! `cis490 report`: the page of a real episode (a QEMU guest's with phases,
//! and a 1 ms one) checked against the episode itself (axes, every series
//! a source measured and none it did not, phases, threads, QEMU events,
//! the totals table equal to `cis490 summary --json`), then opened in
//! headless Chromium: the screenshot must show drawn charts.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use cis490_tests::{
    browser,
    guest::{GuestJson, GuestNet, create_disk},
    *,
};
use serde_json::Value;

/// The page-size bound `cis490 report --help` and the README state.
const MAX_PAGE_BYTES: usize = 8 << 20;
/// Pixel columns of a line chart (cis490/src/report/svg.rs).
const COLUMNS: usize = 900;

/// Runs `cis490 report EP [-o OUT]`, returns the page's path and text.
fn report_of(ep: &Path, out: Option<&Path>) -> (PathBuf, String) {
    let mut c = Command::new(bin("cis490"));
    c.arg("report").arg(ep);
    if let Some(o) = out {
        c.arg("-o").arg(o);
    }
    let o = run_with_timeout(&mut c, Duration::from_secs(300));
    assert!(
        o.status.success(),
        "cis490 report failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let path = PathBuf::from(
        stdout
            .lines()
            .last()
            .expect("report printed no path")
            .trim(),
    );
    assert_eq!(
        path,
        out.map_or_else(|| ep.join("report.html"), Path::to_path_buf),
        "the page is where it was asked to be"
    );
    let html = fs::read_to_string(&path).unwrap();
    (path, html)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The figure `id` of the page (its HTML up to `</figure>`).
fn figure<'a>(html: &'a str, id: &str) -> Option<&'a str> {
    let at = html.find(&format!("<figure data-chart=\"{}\">", esc(id)))?;
    let end = html[at..].find("</figure>")? + at;
    Some(&html[at..end])
}

/// Labels of the lines a figure draws.
fn series(fig: &str) -> BTreeSet<String> {
    fig.split("data-series=\"")
        .skip(1)
        .map(|s| s[..s.find('"').unwrap()].replace("&amp;", "&"))
        .collect()
}

/// Whether any row of `source` has a number at `path` (dotted).
fn measured(ep: &Episode, source: &str, path: &str) -> bool {
    ep.rows(source).iter().any(|r| {
        path.split('.')
            .try_fold(r, |v, k| v.get(k))
            .is_some_and(Value::is_number)
    })
}

/// The value a totals cell shows, parsed back (`2.500 s`, `1.5 us`, `12`).
fn shown_value(text: &str) -> f64 {
    let (num, unit) = text.split_once(' ').unwrap_or((text, ""));
    let n: f64 = num.parse().unwrap_or_else(|_| panic!("cell {text:?}"));
    n * match unit {
        "s" => 1e9,
        "ms" => 1e6,
        "us" => 1e3,
        _ => 1.0,
    }
}

/// What every report must show of its episode.
fn check_page(ep: &Episode, html: &str) {
    assert!(
        html.len() < MAX_PAGE_BYTES,
        "page of {} bytes over the stated bound",
        html.len()
    );
    // Self-contained: no scripts, nothing fetched.
    for bad in [
        "<script", "src=", "http:", "https:", "url(", "@import", "<link",
    ] {
        assert!(!html.contains(bad), "{bad} in the page");
    }

    // Axes: every line chart has a time axis and a y axis with its unit.
    let charts = html.matches("<svg class=\"chart\"").count();
    assert!(charts >= 8, "{charts} line charts");
    let svgs = html.matches("<svg class=\"chart").count();
    assert_eq!(html.matches("time since start (s)</text>").count(), svgs);
    // (The timeline's lanes are named instead.)
    assert_eq!(html.matches("class=\"axis-y\"").count(), svgs - 1);

    // Every series a source measured has its line; none it did not.
    let sources: Vec<&str> = ep.meta["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["source"].as_str().unwrap())
        .collect();
    let groups: &[(&str, &str, &str)] = &[
        ("cpu", "cpu_ns", ""),
        ("switches", "ctx_switches", " switches"),
        ("switches", "wakeups", " wakeups"),
        ("runq", "runq_delay_ns", ""),
        ("runq_max", "runq_delay_max_ns", " max"),
        ("blk_bytes", "blk_read_bytes", " read"),
        ("blk_bytes", "blk_write_bytes", " write"),
        ("blk_bytes", "io_write_bytes", " written (I/O accounting)"),
        ("blk_ops", "blk_read_ops", " read"),
        ("blk_ops", "blk_write_ops", " write"),
        ("blk_latency", "blk_latency_max_ns", " max"),
        ("net_total", "net_tx_bytes", " tx"),
        ("net_total", "net_rx_bytes", " rx"),
        ("kvm", "kvm_exits", " VM exits"),
        ("kvm", "kvm_userspace_exits", " returns to QEMU"),
        ("other:threads", "threads", ""),
        ("other:migrations", "migrations", ""),
        ("other:page_faults_minor", "page_faults_minor", ""),
        ("other:events", "events", ""),
    ];
    let mut drawn = 0;
    for (chart, field, suffix) in groups {
        let fig = figure(html, chart).unwrap_or("");
        let lines = series(fig);
        for s in &sources {
            let label = format!("{s}{suffix}");
            assert_eq!(
                lines.contains(&label),
                measured(ep, s, field),
                "chart {chart}: line {label:?} iff {s} measured {field} (lines {lines:?})"
            );
            drawn += usize::from(lines.contains(&label));
        }
    }
    assert!(drawn >= 10, "only {drawn} lines of the main groups");
    // Per interface, per disk.
    let mut ifs = BTreeSet::new();
    let mut devs = BTreeSet::new();
    for s in &sources {
        for r in ep.rows(s) {
            ifs.extend(
                r["net_by_if"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k.clone()),
            );
            devs.extend(
                r["blk_by_dev"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k.clone()),
            );
        }
    }
    // A disk or vantage measured at 0 throughout is named, not charted.
    let idle = |path: &dyn Fn(&str) -> Vec<String>, key: &str| {
        sources.iter().all(|s| {
            path(key).iter().all(|p| {
                ep.rows(s).iter().all(|r| {
                    p.split('.')
                        .try_fold(r, |v, k| v.get(k))
                        .is_none_or(|v| v.as_u64().is_none_or(|n| n == 0))
                })
            })
        })
    };
    let idle_note = html
        .split("<p class=\"note idle\">")
        .skip(1)
        .map(|s| &s[..s.find("</p>").unwrap()])
        .collect::<String>();
    let if_paths = |i: &str| {
        ["tx_bytes", "rx_bytes", "tx_packets", "rx_packets"]
            .map(|c| format!("net_by_if.{i}.{c}"))
            .to_vec()
    };
    for i in &ifs {
        let fig = figure(html, &format!("net_bytes:{i}"));
        if idle(&if_paths, i) {
            assert!(
                fig.is_none() && idle_note.contains(&esc(i)),
                "idle vantage {i}"
            );
            continue;
        }
        let lines = series(fig.unwrap_or(""));
        for s in &sources {
            for dir in ["tx", "rx"] {
                assert_eq!(
                    lines.contains(&format!("{s} {dir}")),
                    measured(ep, s, &format!("net_by_if.{i}.{dir}_bytes")),
                    "interface {i}: {s} {dir} ({lines:?})"
                );
            }
        }
    }
    let dev_paths = |d: &str| {
        ["read_bytes", "write_bytes", "read_ops", "write_ops"]
            .map(|c| format!("blk_by_dev.{d}.{c}"))
            .to_vec()
    };
    for d in &devs {
        let fig = figure(html, &format!("blk_dev:{d}"));
        if idle(&dev_paths, d) {
            assert!(
                fig.is_none() && idle_note.contains(&esc(d)),
                "idle disk {d}"
            );
            continue;
        }
        let lines = series(fig.unwrap_or(""));
        for s in &sources {
            assert_eq!(
                lines.contains(&format!("{s} write")),
                measured(ep, s, &format!("blk_by_dev.{d}.write_bytes")),
                "disk {d}: {s} ({lines:?})"
            );
        }
    }
    // The log2 histograms as heat-maps, where a row has a sample.
    for f in ["runq_delay_hist_log2", "blk_latency_hist_log2"] {
        let any = ep.rows("ebpf").iter().any(|r| {
            r[f].as_array()
                .is_some_and(|a| a.iter().any(|n| n.as_u64() > Some(0)))
        });
        assert_eq!(
            html.contains(&format!("data-chart=\"heat:ebpf:{f}\"")),
            any,
            "heat-map of {f}"
        );
    }

    // Phases: each label a band with its name on the CPU chart.
    let labels = fs::read_to_string(ep.dir.join("labels.jsonl")).unwrap();
    let cpu = figure(html, "cpu").expect("a CPU chart");
    for l in labels.lines() {
        let l: Value = serde_json::from_str(l).unwrap();
        let name = l["label"].as_str().unwrap();
        assert!(
            cpu.contains(&format!(">{}</text>", esc(name))),
            "phase {name}"
        );
    }
    assert_eq!(
        cpu.matches("<g class=\"phase\">").count(),
        labels.lines().count()
    );

    // Threads: one lane (a bar) per thread with a lifecycle event (up to 40).
    let tids: BTreeSet<u64> = ep
        .events
        .iter()
        .filter(|e| {
            ["thread_started", "thread_exited", "thread_renamed", "exec"]
                .contains(&e["event"].as_str().unwrap_or(""))
        })
        .filter_map(|e| e["tid"].as_u64())
        .collect();
    let timeline = figure(html, "timeline").expect("a timeline");
    assert_eq!(
        timeline.matches("fill=\"#56B4E9\"").count(),
        tids.len().min(40),
        "thread lanes"
    );

    // The header: target, kernel and `cis490 check`'s verdict.
    assert!(html.contains(&format!("pid {} <b>", ep.meta["target"]["pid"])));
    assert!(html.contains(&esc(ep.meta["host"]["kernel_release"].as_str().unwrap())));
    let check = Command::new(bin("cis490"))
        .arg("check")
        .arg(&ep.dir)
        .output()
        .unwrap();
    assert_eq!(
        html.contains("id=\"verdict\">valid</span>"),
        check.status.success(),
        "verdict vs cis490 check:\n{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // The totals table is `cis490 summary --json`'s, and its cells show it.
    let out = Command::new(bin("cis490"))
        .args(["summary", "--json"])
        .arg(&ep.dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let fields = summary["fields"].as_array().unwrap();
    assert!(fields.len() > 20);
    let mut cells = 0;
    for col in summary["sources"].as_array().unwrap() {
        let src = col["source"].as_str().unwrap();
        assert_eq!(col["rows"].as_u64().unwrap() as usize, ep.rows(src).len());
        for f in fields {
            let f = f.as_str().unwrap();
            let v = &col["totals"][f];
            let row_at = html
                .find(&format!("<tr data-field=\"{}\">", esc(f)))
                .unwrap_or_else(|| panic!("no totals row {f}"));
            let row = &html[row_at..row_at + html[row_at..].find("</tr>").unwrap()];
            let key = format!("data-source=\"{src}\" data-value=\"");
            let cell = &row[row
                .find(&key)
                .unwrap_or_else(|| panic!("{f}: no {src} cell"))
                + key.len()..];
            let value = &cell[..cell.find('"').unwrap()];
            let text = &cell[cell.find('>').unwrap() + 1..cell.find("</td>").unwrap()];
            let parsed: Value = serde_json::from_str(value).unwrap();
            assert_eq!(&parsed, v, "{f} {src}: page vs summary --json");
            match v.as_f64() {
                None => assert_eq!(text, "-", "{f} {src}: null shows as -"),
                Some(x) => {
                    let shown = shown_value(text);
                    // Three decimals of s or ms, one of us, whole counts.
                    let tol = if text.ends_with(" s") {
                        5e5
                    } else if text.ends_with(" ms") {
                        500.0
                    } else if text.ends_with(" us") {
                        50.0
                    } else {
                        0.5
                    };
                    assert!(
                        (shown - x).abs() <= tol,
                        "{f} {src}: shows {text}, total {x}"
                    );
                }
            }
            cells += 1;
        }
    }
    assert!(cells > 40, "{cells} cells");
    // And the totals are the episode's: summed from the rows here.
    for s in &sources {
        if measured(ep, s, "cpu_ns") {
            let total = summary["sources"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["source"] == *s)
                .unwrap()["totals"]["cpu_ns"]
                .as_u64();
            assert_eq!(total, Some(ep.sum(s, "cpu_ns")), "{s} cpu_ns total");
        }
    }
}

/// Decoded RGB(A) pixels of a PNG: (width, height, bytes per pixel, data).
fn decode_png(path: &Path) -> (usize, usize, usize, Vec<u8>) {
    let decoder = png::Decoder::new(fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let bpp = match info.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => panic!("screenshot colour type {other:?}"),
    };
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, bpp, buf)
}

/// Opens the page in headless Chromium: no console errors, the DOM has
/// every line, and the screenshot shows drawn charts.
fn check_in_browser(page: &Path, html: &str, dir: &Path) {
    let profile = dir.join("chromium-profile");
    let _ = fs::remove_dir_all(&profile);
    fs::create_dir_all(&profile).unwrap();
    let dom = browser::dump_dom(page, &profile);
    let dom_text = String::from_utf8_lossy(&dom.stdout);
    let log = String::from_utf8_lossy(&dom.stderr);
    for bad in ["Uncaught", "Refused to", "CONSOLE"] {
        assert!(!log.contains(bad), "browser log has {bad}:\n{log}");
    }
    assert_eq!(
        dom_text.matches("class=\"series\"").count(),
        html.matches("class=\"series\"").count(),
        "the browser parsed every line"
    );
    let png_path = dir.join("report.png");
    let _ = fs::remove_file(&png_path);
    browser::screenshot(page, &png_path, 1400, 3000, &profile);
    let (w, h, bpp, px) = decode_png(&png_path);
    assert_eq!((w, h), (1400, 3000));
    let mut non_white = 0usize;
    let mut coloured = 0usize;
    let mut bands_with_ink = 0;
    for band in 0..(h / 200) {
        let mut ink = 0;
        for y in band * 200..(band + 1) * 200 {
            for x in 0..w {
                let p = &px[(y * w + x) * bpp..(y * w + x) * bpp + 3];
                if p.iter().any(|c| *c < 235) {
                    non_white += 1;
                    ink += 1;
                }
                let (mx, mn) = (*p.iter().max().unwrap(), *p.iter().min().unwrap());
                if mx - mn > 60 {
                    coloured += 1;
                }
            }
        }
        bands_with_ink += usize::from(ink > 2000);
    }
    let share = non_white as f64 / (w * h) as f64;
    eprintln!(
        "screenshot {w}x{h}: {:.1}% not white, {coloured} coloured pixels, {bands_with_ink} of {} bands drawn",
        share * 100.0,
        h / 200
    );
    assert!(
        share > 0.03,
        "the page looks blank: {:.2}% not white",
        share * 100.0
    );
    assert!(
        coloured > 5000,
        "no chart lines drawn: {coloured} coloured pixels"
    );
    assert!(
        bands_with_ink >= 12,
        "only {bands_with_ink} of 15 bands of the page have content"
    );
}

#[test]
fn the_report_of_a_qemu_guest_shows_every_source_phase_and_event() {
    require_root();
    let g = GuestJson::from_env().unwrap();
    let _ = browser::chromium();
    let dir = scratch("report-qemu");
    let mut net = GuestNet::start(&dir, "rep", "c490rep0", 99, 5555);
    let disk = dir.join("disk.img");
    create_disk(&disk, 32).unwrap();
    let mut launch = g.launch(format!(
        "{} cis490.disk_write_mb=8 cis490.disk_read_mb=8 cis490.sleep_ms=500",
        net.params(1_000_000)
    ));
    launch.disk = Some(disk);
    let (_, qmp) = net.wire(&mut launch, &dir);
    let argv = net.argv(&g.guest, &launch);
    let out = run_with_timeout(
        trace_cmd(&dir)
            .arg("--qmp")
            .arg(&qmp)
            .args([
                "--label",
                "boot@0",
                "--label",
                "guest.work@2",
                "--label",
                "late@4",
            ])
            .args(["--duration", "170", "--"])
            .args(&argv),
        Duration::from_secs(200),
    );
    let _ = net.sink.kill();
    let _ = net.sink.wait();
    let ep = Episode::from_output(&out);
    assert!(ep.is_done());
    assert!(ep.events_named("qmp").any(|e| e["qmp_event"] == "SHUTDOWN"));

    let (page, html) = report_of(&ep.dir, None);
    check_page(&ep, &html);
    // Sources this episode must show: all four, and the tap.
    for s in ["ebpf", "proc", "perf", "qmp"] {
        assert!(
            series(figure(&html, "blk_bytes").unwrap_or(""))
                .iter()
                .any(|l| l.starts_with(s))
                || s == "perf",
            "{s} in the block chart"
        );
    }
    assert!(
        figure(&html, &format!("net_bytes:{}", net.tap)).is_some(),
        "the tap's chart"
    );
    assert!(
        figure(&html, "blk_dev:virtio0").is_some(),
        "QMP's disk chart"
    );
    let timeline = figure(&html, "timeline").unwrap();
    assert!(
        timeline.contains("<title>SHUTDOWN at "),
        "QEMU's SHUTDOWN on the timeline"
    );
    eprintln!("report of the QEMU episode: {} KiB", html.len() / 1024);
    check_in_browser(&page, &html, &dir);
}

#[test]
fn the_report_of_a_1ms_episode_keeps_every_spike() {
    require_root();
    let _ = browser::chromium();
    let dir = scratch("report-1ms");
    let out = run_with_timeout(
        trace_cmd(&dir)
            .args([
                "--interval-ms",
                "1",
                "--label",
                "start@0",
                "--label",
                "mid@1.5",
                "--",
            ])
            .arg(bin("cis490-workload"))
            // Idle gaps of 1.5 s between the phases: at 1 ms a busy host
            // merges boundaries (seen: 583 rows of the 3 s demo with its
            // 0.5 s gaps), an idle target far fewer, so the episode has more
            // rows than the chart has columns however busy the host is.
            .args(["demo", "--gap-ms", "1500"]),
        Duration::from_secs(120),
    );
    let ep = Episode::from_output(&out);
    let rows = ep.rows("ebpf");
    assert!(
        rows.len() > COLUMNS,
        "{} rows: more than the chart's columns",
        rows.len()
    );
    let page_path = dir.join("elsewhere.html");
    let (page, html) = report_of(&ep.dir, Some(&page_path));
    check_page(&ep, &html);

    // Downsampled: at most one vertex (and one vertical) per pixel column...
    let cpu = figure(&html, "cpu").unwrap();
    let at = cpu.find("data-series=\"ebpf\" d=\"").unwrap() + "data-series=\"ebpf\" d=\"".len();
    let d = &cpu[at..at + cpu[at..].find('"').unwrap()];
    let vertices = d.matches(['M', 'L']).count();
    assert!(
        vertices <= COLUMNS,
        "{vertices} vertices for {} rows",
        rows.len()
    );
    // ...and the busiest bucket is still drawn: the line reaches the height
    // of the largest cpu_ns / interval_ns of the rows.
    let peak = rows
        .iter()
        .filter_map(|r| Some(r["cpu_ns"].as_f64()? / r["interval_ns"].as_f64()?))
        .fold(0.0, f64::max);
    let attr = |name: &str| -> f64 {
        let k = format!("{name}=\"");
        let s = &cpu[cpu.find(&k).unwrap() + k.len()..];
        s[..s.find('"').unwrap()].parse().unwrap()
    };
    let (top, height, y_top) = (
        attr("data-plot-top"),
        attr("data-plot-height"),
        attr("data-y-top"),
    );
    let want = (top + height - peak / y_top * height).round();
    let ys: Vec<f64> = d
        .split(['M', 'L', 'V'])
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.split(' ').next_back()?.parse().ok())
        .collect();
    let highest = ys.iter().copied().fold(f64::INFINITY, f64::min);
    eprintln!(
        "{} rows, {vertices} vertices; peak {peak:.3} cores -> y {want}, line reaches y {highest}",
        rows.len()
    );
    assert!(
        (highest - want).abs() <= 1.0,
        "the peak is drawn at y {highest}, expected {want}"
    );
    check_in_browser(&page, &html, &dir);
}
