//! The report of synthetic episodes: what it shows, and its size bound
//! under the worst input an episode can hold.

use std::{fmt::Write as _, fs, path::Path};

use serde_json::{Value, json};

use super::*;
use crate::{
    episode::{DONE, EVENTS, LABELS, META},
    row::{BlkCounters, Measures, NetCounters, Row, SourceKind},
};

const ID: &str = "01TESTREPORT";

/// Writes an episode of `rows` buckets of `interval_ns` with every source
/// and every field filled from `m(source, seq)`.
fn write_episode(
    dir: &Path,
    rows: u64,
    interval_ns: u64,
    m: impl Fn(SourceKind, u64) -> Measures,
    labels: &[(&str, u64)],
    events: &[Value],
) {
    // As in real episodes, the guest and gateway sources fill only their
    // own fields, and the host-side sources none of those.
    let own_fields = |kind: SourceKind, m: Measures| match kind {
        SourceKind::Guest => Measures {
            guest: m.guest,
            ..Default::default()
        },
        SourceKind::Gateway => Measures {
            gw: m.gw,
            ..Default::default()
        },
        _ => Measures {
            guest: Default::default(),
            gw: Default::default(),
            ..m
        },
    };
    let start = 1_000_000_000u64;
    let mut sources = Vec::new();
    for kind in SourceKind::ALL {
        let mut text = String::new();
        for seq in 0..rows {
            // Every 97th bucket is merged (twice as long).
            let t = start + (seq + 1) * interval_ns;
            let row = Row {
                episode_id: ID.into(),
                source: kind,
                available_in_deployment: false,
                t_mono_ns: t,
                t_wall_ns: t + 1_700_000_000_000_000_000,
                interval_ns,
                seq,
                m: own_fields(kind, m(kind, seq)),
            };
            writeln!(text, "{}", serde_json::to_string(&row).unwrap()).unwrap();
        }
        fs::write(dir.join(kind.file_name()), text).unwrap();
        sources.push(json!({"source": kind.name(), "file": kind.file_name(), "available_in_deployment": false, "rows": rows}));
    }
    let end = start + rows * interval_ns;
    let meta = json!({
        "schema_version": 1, "id": ID, "status": "complete", "error": null,
        "host": {"hostname": "h<o>st", "kernel_release": "6.1.0", "kernel_version": "x", "cpus": 2},
        "target": {"pid": 42, "mode": "spawn", "comm": "qemu<&>", "exe": "/bin/q", "cmdline": ["qemu", "-name", "<b>x</b>"]},
        "interval_ns": interval_ns,
        "start": {"t_mono_ns": start, "t_wall_ns": 1_700_000_000_000_000_000u64},
        "end": {"t_mono_ns": end, "t_wall_ns": 1_700_000_000_000_000_000u64 + end},
        "end_reason": "target_exited", "sources": sources,
        "families": [{"family": "sched", "active": true, "path": "tp_btf+iter", "note": null},
                     {"family": "kvm", "active": false, "path": null, "note": "no <kvm>"}],
        "probes": [{"family": "sched", "program": "sched_switch", "tracepoint": "sched_switch", "kind": "tp_btf",
                    "required": true, "state": "attached", "error": null},
                   {"family": "kvm", "program": "kvm_exit", "tracepoint": "kvm_exit", "kind": "trace_point:kvm",
                    "required": false, "state": "missing", "error": "no kvm"}],
        "ebpf": {"dropped_events": 3, "map_errors": 0, "records_undecodable": 0, "slice_mismatches": 0},
        "skipped_boundaries": 0, "labels": labels.len()
    });
    fs::write(dir.join(META), meta.to_string()).unwrap();
    let mut l = String::new();
    for (name, at) in labels {
        writeln!(
            l,
            "{}",
            json!({"t_mono_ns": start + at, "t_wall_ns": 1, "seq": 0, "label": name, "via": "cli"})
        )
        .unwrap();
    }
    fs::write(dir.join(LABELS), l).unwrap();
    let ev: String = events.iter().map(|e| format!("{e}\n")).collect();
    fs::write(dir.join(EVENTS), ev).unwrap();
    fs::write(dir.join(DONE), "").unwrap();
}

fn episode_dir(base: &Path) -> std::path::PathBuf {
    let dir = base.join(ID);
    fs::create_dir(&dir).unwrap();
    dir
}

/// Every field filled, with noise so no two neighbouring buckets agree
/// (every pixel column draws its min and its max), `keys` interfaces,
/// disks and exit reasons per row, and full 64-element histograms.
fn worst(kind: SourceKind, seq: u64, keys: u64) -> Measures {
    let n = |k: u64| {
        seq.wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(k.wrapping_mul(1_442_695_040_888_963_407))
            >> 40
    };
    let names = |p: &'static str| (0..keys).map(move |i| format!("{p}{}<{i}>", seq % 3 * keys + i));
    let net = NetCounters {
        tx_bytes: n(1),
        rx_bytes: n(2),
        tx_packets: n(3),
        rx_packets: n(4),
    };
    let blk = BlkCounters {
        read_bytes: n(5),
        write_bytes: n(6),
        read_ops: n(7),
        write_ops: n(8),
    };
    let hist: Vec<u64> = (0..64).map(|i| n(i + 20) % 1000).collect();
    Measures {
        cpu_ns: Some(n(9)),
        ctx_switches_voluntary: Some(n(10)),
        ctx_switches_involuntary: Some(n(11)),
        ctx_switches: Some(n(12)),
        runq_delay_ns: Some(n(13)),
        threads: Some(n(14) % 100),
        wakeups: Some(n(15)),
        migrations: Some(n(16)),
        runq_delay_max_ns: Some(n(17)),
        runq_delay_hist_log2: Some(hist.clone()),
        events: Some(n(18)),
        dropped_events: Some(u64::from(seq.is_multiple_of(50))),
        blk_read_ops: Some(n(19)),
        blk_write_ops: Some(n(90)),
        blk_read_bytes: Some(n(91)),
        blk_write_bytes: Some(n(92)),
        io_write_bytes: Some(n(111)),
        blk_latency_ns_sum: Some(n(93)),
        blk_latency_max_ns: Some(n(94)),
        blk_latency_hist_log2: Some(hist),
        net_tx_bytes: Some(n(95)),
        net_rx_bytes: Some(n(96)),
        net_tx_packets: Some(n(97)),
        net_rx_packets: Some(n(98)),
        net_by_if: Some(names("tap").map(|k| (k, net)).collect()),
        kvm_exits: Some(n(99)),
        kvm_exit_reasons: Some(names("R").map(|k| (k, n(100))).collect()),
        kvm_userspace_exits: Some(n(101)),
        kvm_userspace_exit_reasons: Some(names("U").map(|k| (k, n(102))).collect()),
        blk_by_dev: Some(names("vd").map(|k| (k, blk)).collect()),
        page_faults_minor: Some(n(103)),
        page_faults_major: Some(n(104)),
        cycles: Some(n(105) + kind as u64),
        instructions: Some(n(106)),
        cache_references: Some(n(107)),
        cache_misses: Some(n(108)),
        branch_misses: Some(n(109)),
        guest: crate::sources::guest::GuestMeasures::every(n(110)),
        gw: crate::sources::gateway::GatewayMeasures::full(n(110)),
    }
}

#[test]
fn an_adversarial_episode_stays_under_the_bound() {
    // Every field of every source filled with noise, 12 interfaces, disks
    // and exit reasons per row (renamed every bucket), full histograms, a
    // thousand labels and thousands of thread and QEMU events: the worst
    // page an episode can make. More rows than pixel columns only repeat
    // columns, so 4 per column are enough to fill every one.
    let base = tempfile::tempdir().unwrap();
    let dir = episode_dir(base.path());
    let rows = (svg::COLUMNS * 4) as u64;
    let labels: Vec<(String, u64)> = (0..1000)
        .map(|i| (format!("phase-{i}"), i * rows * 1_000_000 / 1000))
        .collect();
    let mut events = Vec::new();
    for i in 0..5000u64 {
        let t = 1_000_000_000 + i * rows * 1_000_000 / 5000;
        events.push(json!({"t_mono_ns": t, "t_wall_ns": t, "seq": 0, "event": "thread_started", "tid": 1000 + i, "parent_tid": 1, "comm": format!("worker<{i}>")}));
        events.push(json!({"t_mono_ns": t, "t_wall_ns": t, "seq": 0, "event": "qmp", "qmp_event": "BLOCK_IO_ERROR", "data": {"device": "x".repeat(500)}}));
        events.push(json!({"t_mono_ns": t, "t_wall_ns": t, "seq": 0, "event": "drops", "dropped_records": 1}));
    }
    let label_refs: Vec<(&str, u64)> = labels.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    write_episode(
        &dir,
        rows,
        1_000_000,
        |k, s| worst(k, s, 12),
        &label_refs,
        &events,
    );
    let html = render(&dir).unwrap();
    if let Some(p) = std::env::var_os("CIS490_REPORT_DUMP") {
        fs::write(p, &html).unwrap();
    }
    eprintln!(
        "adversarial report: {} bytes ({:.2} MiB) for {rows} rows x 4 sources",
        html.len(),
        html.len() as f64 / (1 << 20) as f64
    );
    assert!(
        html.len() < MAX_PAGE_BYTES,
        "{} bytes over the stated {MAX_PAGE_BYTES}",
        html.len()
    );
    // It is all there, folded where it must be, and says so.
    assert!(html.contains("(other)"));
    assert!(html.contains("more interfaces summed as (other)"));
    assert!(html.contains("more threads started"));
    assert!(
        html.contains("id=\"not-drawn\""),
        "every source with every field: over the line budget"
    );
    assert!(html.contains("and 800 more"), "phase list capped");
    assert!(!html.contains("<b>x</b>"), "the command line is escaped");
    assert!(!html.contains("worker<"), "thread names are escaped");
}

#[test]
fn the_report_shows_every_group_phases_marks_and_totals() {
    let base = tempfile::tempdir().unwrap();
    let dir = episode_dir(base.path());
    let events = [
        json!({"t_mono_ns": 1_100_000_000u64, "t_wall_ns": 1, "seq": 0, "event": "thread_started", "tid": 7, "parent_tid": 1, "comm": "CPU 0/TCG"}),
        json!({"t_mono_ns": 1_400_000_000u64, "t_wall_ns": 1, "seq": 3, "event": "qmp", "qmp_event": "SHUTDOWN", "data": {"guest": true}}),
    ];
    write_episode(
        &dir,
        50,
        10_000_000,
        |k, s| {
            let mut m = worst(k, s, 2);
            if k == SourceKind::Qmp {
                // QMP measures only its fields; the others are null.
                m = Measures {
                    blk_by_dev: m.blk_by_dev,
                    ..Default::default()
                };
                m.set_blk_by_dev(m.blk_by_dev.clone());
            }
            if s == 20 {
                m.cpu_ns = None;
            }
            m
        },
        &[("boot", 0), ("detonate", 200_000_000)],
        &events,
    );
    let html = render(&dir).unwrap();
    for want in [
        "data-chart=\"cpu\"",
        "data-chart=\"switches\"",
        "data-chart=\"runq\"",
        "data-chart=\"runq_max\"",
        "data-chart=\"blk_bytes\"",
        "data-chart=\"blk_latency\"",
        "data-chart=\"kvm_exit_reasons\"",
        "data-chart=\"heat:ebpf:runq_delay_hist_log2\"",
        "data-chart=\"other:cycles\"",
        "data-chart=\"timeline\"",
        "data-series=\"qmp read\"",
        "time since start (s)",
        "CPU time per second (cores)",
        ">detonate</text>",
        "SHUTDOWN",
        "CPU 0/TCG 7",
        "id=\"verdict\"",
    ] {
        assert!(html.contains(want), "missing {want}");
    }
    // Self-contained: no scripts, no external resources.
    for bad in ["<script", "src=", "http://", "https://", "url("] {
        assert!(!html.contains(bad), "{bad} in the page");
    }
    // Drops (every 50th bucket: seq 0) are marked.
    assert!(html.contains("fill=\"#D55E00\" stroke=\"#D55E00\""));
    // QMP's cpu_ns is null in every row: no qmp line in the CPU chart.
    let cpu = &html[html.find("data-chart=\"cpu\"").unwrap()..];
    let cpu = &cpu[..cpu.find("</figure>").unwrap()];
    assert!(cpu.contains("data-series=\"ebpf\"") && !cpu.contains("data-series=\"qmp\""));
    // The totals table is summary's.
    let t = summary::episode_totals(&dir, &mut |_, _| {}).unwrap();
    for c in &t.sources {
        for (f, v) in &c.totals {
            let cell = format!(
                "data-source=\"{}\" data-value=\"{}\"",
                c.source,
                svg::esc(&v.to_string())
            );
            let row = format!("<tr data-field=\"{}\">", svg::esc(f));
            let at = html.find(&row).unwrap_or_else(|| panic!("no row {f}"));
            let end = html[at..].find("</tr>").unwrap() + at;
            assert!(html[at..end].contains(&cell), "{f} {}: {cell}", c.source);
        }
    }
}
