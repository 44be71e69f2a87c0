//! What `cis490 trace` really writes, against the JSON Schemas shipped in
//! `docs/`: every line of every `telemetry-*.jsonl` file against
//! `row.schema.json`, every `events.jsonl` line against
//! `event.schema.json`, every `labels.jsonl` line against
//! `label.schema.json`. Two episodes between them fill every kind of field
//! this machine can measure: a QEMU guest (disk, a tap in a network
//! namespace, QMP, its guest agent, phase labels; all five sources) and the
//! tiny KVM VMM
//! (the KVM exit reason maps).

use std::{collections::BTreeSet, fs, path::Path, time::Duration};

use cis490_tests::{
    guest::{GuestJson, GuestNet, create_disk},
    *,
};
use serde_json::Value;

struct Schemas {
    row: jsonschema::Validator,
    event: jsonschema::Validator,
    label: jsonschema::Validator,
}

fn compile(name: &str, text: &str) -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{name}: {e}"));
    jsonschema::meta::validate(&schema).unwrap_or_else(|e| panic!("{name}: {e}"));
    jsonschema::draft202012::new(&schema).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn schemas() -> Schemas {
    Schemas {
        row: compile(
            "row.schema.json",
            include_str!("../../docs/row.schema.json"),
        ),
        event: compile(
            "event.schema.json",
            include_str!("../../docs/event.schema.json"),
        ),
        label: compile(
            "label.schema.json",
            include_str!("../../docs/label.schema.json"),
        ),
    }
}

fn errors(v: &jsonschema::Validator, line: &Value) -> Vec<String> {
    v.iter_errors(line)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// Every line of `path` validated; returns the lines.
fn validate_file(v: &jsonschema::Validator, path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let line: Value = serde_json::from_str(l)
            .unwrap_or_else(|e| panic!("{}:{}: not JSON ({e}): {l}", path.display(), i + 1));
        let errs = errors(v, &line);
        assert!(
            errs.is_empty(),
            "{}:{} does not match its schema: {errs:?}\n{l}",
            path.display(),
            i + 1
        );
        lines.push(line);
    }
    lines
}

/// What one validated episode held.
#[derive(Default)]
struct Seen {
    sources: BTreeSet<String>,
    rows: usize,
    events: usize,
    labels: usize,
    /// Fields that were not null in at least one row.
    non_null: BTreeSet<String>,
}

/// Validates every line of the episode in `dir`; `cis490 check` must pass
/// too.
fn validate_episode(s: &Schemas, dir: &Path) -> Seen {
    let mut seen = Seen::default();
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("telemetry-") && n.ends_with(".jsonl"))
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no telemetry files in {}", dir.display());
    for f in files {
        let rows = validate_file(&s.row, &f);
        assert!(!rows.is_empty(), "{} is empty", f.display());
        for r in &rows {
            seen.sources
                .insert(r["source"].as_str().unwrap().to_owned());
            for (k, v) in r.as_object().unwrap() {
                if !v.is_null() {
                    seen.non_null.insert(k.clone());
                }
            }
        }
        seen.rows += rows.len();
    }
    seen.events = validate_file(&s.event, &dir.join("events.jsonl")).len();
    seen.labels = validate_file(&s.label, &dir.join("labels.jsonl")).len();
    let check = std::process::Command::new(bin("cis490"))
        .arg("check")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "cis490 check:\n{}",
        String::from_utf8_lossy(&check.stdout)
    );
    eprintln!(
        "{}: {} rows of {:?}, {} events, {} labels valid; never null somewhere: {}",
        dir.display(),
        seen.rows,
        seen.sources,
        seen.events,
        seen.labels,
        seen.non_null.len()
    );
    seen
}

/// The schemas are not vacuous: a real row with a wrong type, a missing
/// field or an unknown one fails, and so do broken event and label lines.
fn assert_rejects_broken_lines(s: &Schemas, dir: &Path) {
    let first = |name: &str| -> Value {
        let text = fs::read_to_string(dir.join(name)).unwrap();
        serde_json::from_str(text.lines().next().expect(name)).unwrap()
    };
    let row = first("telemetry-ebpf.jsonl");
    assert!(s.row.is_valid(&row));
    let mut wrong_type = row.clone();
    wrong_type["cpu_ns"] = "1000".into();
    let mut missing = row.clone();
    missing.as_object_mut().unwrap().remove("threads");
    let mut unknown = row.clone();
    unknown["cpu_ms"] = 1.into();
    for (what, bad) in [
        ("wrong type", wrong_type),
        ("missing field", missing),
        ("unknown field", unknown),
    ] {
        assert!(!s.row.is_valid(&bad), "{what} accepted: {bad}");
    }
    let mut event = first("events.jsonl");
    event.as_object_mut().unwrap().remove("t_mono_ns");
    assert!(
        !s.event.is_valid(&event),
        "event without t_mono_ns accepted"
    );
    let mut label = first("labels.jsonl");
    label["label"] = "not a label".into();
    assert!(!s.label.is_valid(&label), "bad label accepted");
}

/// `cis490 check` is not vacuous about CPU time either: a copy of a real
/// episode with one eBPF bucket raised by 10 s (more than the bucket lasted
/// times the CPUs) fails, naming that bucket; the original passes. Raised
/// by 80 ms instead (the case a review found passing), it fails too.
fn assert_check_names_an_impossible_bucket(dir: &Path, copy: &Path) {
    assert_check_passes(dir);
    fs::create_dir_all(copy).unwrap();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let file = copy.join("telemetry-ebpf.jsonl");
    let text = fs::read_to_string(&file).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut row: Value = serde_json::from_str(&lines[1]).unwrap();
    let raised = row["cpu_ns"].as_u64().expect("cpu_ns measured") + 10_000_000_000;
    row["cpu_ns"] = raised.into();
    lines[1] = row.to_string();
    fs::write(&file, lines.join("\n") + "\n").unwrap();
    let (ok, text) = check_episode(copy);
    assert!(!ok, "a bucket with 10 s more CPU passed:\n{text}");
    assert!(
        text.contains(&format!("seq 1 holds {raised} ns of CPU in")),
        "{text}"
    );
    // Raised by 80 ms, within the bucket's cap: the running totals name it
    // (allowed at a bucket end: 20 ms, the tracer's read spread plus a tick
    // on each CPU, the exit tail; 2% of the running total only once that
    // is more than 1 s), at the bucket end furthest past its allowance.
    let mut row: Value = serde_json::from_str(&lines[1]).unwrap();
    row["cpu_ns"] = (row["cpu_ns"].as_u64().unwrap() - 10_000_000_000 + 80_000_000).into();
    lines[1] = row.to_string();
    fs::write(&file, lines.join("\n") + "\n").unwrap();
    let (ok, text) = check_episode(copy);
    assert!(!ok, "a bucket with 80 ms more CPU passed:\n{text}");
    assert!(
        text.lines().any(|l| l.starts_with("FAIL  cpu_ns: ebpf ")
            && l.contains(" by the end of seq ")
            && l.contains(" (running totals, allowed ")),
        "{text}"
    );
}

/// Nor about a bucket's count landing in another bucket: a copy of a real
/// episode whose eBPF rows have the CPU time of the second half's buckets
/// moved into the first half's (each bucket still under its cap, the total
/// unchanged, so the totals still agree) fails at the bucket ends between,
/// naming `cpu_ns` and the running totals; the original passes, its
/// running totals compared (`read_spread_max_ns` recorded: the spread of
/// the tracer's reads at one boundary, under a bucket's length).
fn assert_check_names_a_moved_bucket(dir: &Path, copy: &Path) {
    let (ok, text) = check_episode(dir);
    assert!(ok, "{text}");
    assert!(
        text.lines().any(
            |l| l.starts_with("ok    cpu_ns: ebpf ") && l.contains("(running totals, allowed ")
        ),
        "the running totals were not compared:\n{text}"
    );
    let meta: Value = serde_json::from_slice(&fs::read(dir.join("meta.json")).unwrap()).unwrap();
    let spread = meta["read_spread_max_ns"]
        .as_u64()
        .expect("read_spread_max_ns");
    let interval = meta["interval_ns"].as_u64().unwrap();
    assert!(
        spread > 0 && spread < interval,
        "read_spread_max_ns {spread}"
    );
    let cpus = meta["host"]["cpus"].as_u64().unwrap();
    // Under the episode's own name, as `check` wants it.
    let copy = &copy.join(dir.file_name().unwrap());
    fs::create_dir_all(copy).unwrap();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let file = copy.join("telemetry-ebpf.jsonl");
    let mut rows: Vec<Value> = fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let cpu = |r: &Value| r["cpu_ns"].as_u64().expect("cpu_ns measured");
    let total_before: u64 = rows.iter().map(cpu).sum();
    let half = rows.len() / 2;
    // What `check` allows a bucket: (its length + 100 ms) times the CPUs;
    // each first-half bucket takes up to nine tenths of that, from the
    // second half's buckets, the last first.
    let room: u64 = rows[..half]
        .iter()
        .map(|r| {
            ((r["interval_ns"].as_u64().unwrap() + 100_000_000) * cpus * 9 / 10)
                .saturating_sub(cpu(r))
        })
        .sum();
    let mut moved = 0;
    for r in rows[half..].iter_mut().rev() {
        let take = cpu(r).min(room - moved);
        r["cpu_ns"] = (cpu(r) - take).into();
        moved += take;
    }
    let mut left = moved;
    for r in &mut rows[..half] {
        let cap = (r["interval_ns"].as_u64().unwrap() + 100_000_000) * cpus * 9 / 10;
        let add = cap.saturating_sub(cpu(r)).min(left);
        r["cpu_ns"] = (cpu(r) + add).into();
        left -= add;
    }
    assert_eq!(left, 0);
    assert_eq!(rows.iter().map(cpu).sum::<u64>(), total_before);
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    fs::write(&file, text).unwrap();
    let (ok, text) = check_episode(copy);
    assert!(
        !ok,
        "{moved} ns of CPU moved between buckets passed:\n{text}"
    );
    let fails: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL  "))
        .collect();
    assert!(
        !fails.is_empty()
            && fails.iter().all(|l| {
                l.starts_with("cpu_ns: ebpf ")
                    && l.contains(" by the end of seq ")
                    && l.contains("(running totals, allowed ")
            }),
        "{text}"
    );
}

/// Nor about QMP's block bytes: the QEMU episode's guest disk is a raw
/// image opened with O_DIRECT (`meta.json` `qmp.disks` says so), so a copy
/// with every QMP `blk_write_bytes` set to 0 fails, naming the field; the
/// original compared them (its line is in the output).
fn assert_check_holds_qmp_to_the_host(dir: &Path, copy: &Path) {
    let (ok, text) = check_episode(dir);
    assert!(ok, "{text}");
    assert!(
        text.contains("blk_write_bytes: ebpf ") && text.contains(" vs qmp "),
        "QMP's writes were not compared:\n{text}"
    );
    fs::create_dir_all(copy).unwrap();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let file = copy.join("telemetry-qmp.jsonl");
    let rows: Vec<String> = fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| {
            let mut row: Value = serde_json::from_str(l).unwrap();
            if row["blk_write_bytes"].is_u64() {
                row["blk_write_bytes"] = 0.into();
            }
            row.to_string()
        })
        .collect();
    fs::write(&file, rows.join("\n") + "\n").unwrap();
    let (ok, text) = check_episode(copy);
    assert!(!ok, "QMP's writes set to 0 passed:\n{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("FAIL  blk_write_bytes: ebpf ") && l.contains(" vs qmp 0 ")),
        "{text}"
    );
}

#[test]
fn every_line_of_real_episodes_matches_the_schemas() {
    require_root();
    let s = schemas();

    // 1. A QEMU guest: disk I/O, traffic through its tap, QMP, two labels.
    let g = GuestJson::from_env().unwrap();
    let dir = scratch("schema-qemu");
    let mut net = GuestNet::start(&dir, "sch", "c490sc0", 98, 5556);
    let disk = dir.join("disk.img");
    create_disk(&disk, 16).unwrap();
    // wait_ms: time for the guest agent's first lines to go out before the
    // workload (as tests/guest_agent.rs gives it); without it a fast boot
    // can end before the agent's port is up.
    let mut launch = g.launch(format!(
        "{} cis490.wait_ms=3000 cis490.disk_write_mb=4 cis490.disk_read_mb=4 \
         cis490.sleep_ms=300",
        net.params(300_000)
    ));
    launch.disk = Some(disk);
    let (_, qmp) = net.wire(&mut launch, &dir);
    let agent = dir.join("agent.sock");
    launch.agent = Some(agent.clone());
    let argv = net.argv(&g.guest, &launch);
    let out = run_with_timeout(
        trace_cmd(&dir)
            .arg("--qmp")
            .arg(&qmp)
            .arg("--guest-agent")
            .arg(&agent)
            .args(["--label", "boot@0", "--label", "workload@1"])
            .args(["--duration", "170", "--"])
            .args(&argv),
        Duration::from_secs(200),
    );
    let ep = Episode::from_output(&out);
    assert!(net.sink.wait().unwrap().success());
    assert_eq!(ep.meta["end_reason"], "target_exited");
    assert!(ep.meta["qmp"]["error"].is_null(), "QMP: {}", ep.meta["qmp"]);
    let qemu = validate_episode(&s, &ep.dir);
    assert_eq!(
        qemu.sources,
        ["ebpf", "guest", "perf", "proc", "qmp"]
            .map(String::from)
            .into_iter()
            .collect(),
        "every source wrote rows"
    );
    assert_eq!(qemu.labels, 2);
    assert!(qemu.events > 0);
    // The object-valued fields and histograms were really exercised.
    for field in [
        "net_by_if",
        "blk_by_dev",
        "runq_delay_hist_log2",
        "blk_latency_hist_log2",
        "page_faults_minor",
        "threads",
        "guest_cpu_user_ns",
        "guest_disk_write_bytes",
        "guest_lines",
    ] {
        assert!(
            qemu.non_null.contains(field),
            "{field} was null in every row"
        );
    }
    assert_rejects_broken_lines(&s, &ep.dir);
    assert_check_names_an_impossible_bucket(&ep.dir, &dir.join("corrupt"));
    assert_check_names_a_moved_bucket(&ep.dir, &dir.join("corrupt-moved"));
    assert_check_holds_qmp_to_the_host(&ep.dir, &dir.join("corrupt-qmp"));

    // 2. The tiny KVM VMM: the KVM exit maps.
    let dir = scratch("schema-kvm");
    let out = run_with_timeout(
        trace_cmd(&dir)
            .args(["--label", "vmm@0", "--"])
            .arg(bin("cis490-workload"))
            .args(["kvm", "--io-exits", "300", "--out"])
            .arg(dir.join("kvm.json")),
        Duration::from_secs(60),
    );
    let ep = Episode::from_output(&out);
    let kvm = validate_episode(&s, &ep.dir);
    assert!(
        kvm.non_null.contains("kvm_userspace_exit_reasons"),
        "kvm_userspace_exit_reasons was null in every row"
    );
    let all: BTreeSet<_> = qemu.non_null.union(&kvm.non_null).collect();
    let never: Vec<_> = row_fields()
        .into_iter()
        .filter(|f| !all.contains(f))
        .collect();
    eprintln!("null in every row of both episodes (not measurable here): {never:?}");
}

/// Every field of a row, from the schema.
fn row_fields() -> Vec<String> {
    let schema: Value = serde_json::from_str(include_str!("../../docs/row.schema.json")).unwrap();
    schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}
