//! The Parquet dataset against the episodes it came from: two real episodes
//! with different keys (a tap workload in a network namespace, a KVM VMM)
//! exported and read back with DuckDB and pyarrow; exported twice, byte for
//! byte; a half-written episode refused; shipped to a local S3 server
//! (moto), the shipper killed mid-upload and run again.
//!
//! Needs the Python of `cargo xtask test` (`CIS490_PYTHON`: a venv with
//! duckdb, duckdb-ext-httpfs, pyarrow and moto[server]).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use cis490_tests::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);
const KEYED: [&str; 4] = [
    "net_by_if",
    "blk_by_dev",
    "kvm_exit_reasons",
    "kvm_userspace_exit_reasons",
];
const HISTS: [&str; 3] = [
    "runq_delay_hist_log2",
    "blk_latency_hist_log2",
    "gw_frame_size_hist_log2",
];
const ENVELOPE: [&str; 7] = [
    "episode_id",
    "source",
    "available_in_deployment",
    "t_mono_ns",
    "t_wall_ns",
    "interval_ns",
    "seq",
];

fn python() -> PathBuf {
    let p = std::env::var_os("CIS490_PYTHON").unwrap_or_else(|| {
        panic!(
            "CIS490_PYTHON is not set: run this test through `cargo xtask test` (or `cargo xtask \
             integration-test local`), which makes a venv with duckdb, duckdb-ext-httpfs, pyarrow \
             and moto[server] (xtask/src/pyenv.rs) and points CIS490_PYTHON at its python"
        )
    });
    let p = PathBuf::from(p);
    assert!(p.exists(), "CIS490_PYTHON={} does not exist", p.display());
    p
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py/read_dataset.py")
}

/// Runs read_dataset.py and parses its JSON.
fn read_dataset(args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = Command::new(python())
        .arg(script())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "read_dataset.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("read_dataset.py prints JSON")
}

fn cis490(args: &[&str]) -> Output {
    run_with_timeout(Command::new(bin("cis490")).args(args), T)
}

/// Episode A: a tap workload in a namespace (net_by_if has its tap),
/// traced by pid, tagged and labelled.
fn tap_episode(dir: &Path, ns: &Netns) -> Episode {
    let name = "c490d0";
    let out = dir.join("tap.json");
    let mut wl = ns
        .cmd(&bin("cis490-workload"))
        .args([
            "tap",
            "--name",
            name,
            "--wait-signal",
            "--frames",
            "1500",
            "--size",
            "700",
        ])
        .args(["--linger-ms", "300", "--out"])
        .arg(&out)
        .spawn()
        .unwrap();
    wait_for_file(&out.with_extension("json.ready"), T);
    ns.sh(&format!("sysctl -q -w net.ipv6.conf.{name}.disable_ipv6=1"));
    ns.ip(&["link", "set", name, "up"]);
    let pid = wl.id() as i32;
    let trace = start_trace(
        dir,
        &[
            "--target-pid",
            &pid.to_string(),
            "--duration",
            "60",
            "--interval-ms",
            "20",
            "--tag",
            "sample=sha256:aaaa",
            "--tag",
            "vm=tap-vm",
            "--label",
            "boot@0",
        ],
    );
    wait_for_event(&episode_dir(dir), "tap_attached", |e| e["name"] == name, T);
    kill(pid, libc::SIGUSR1);
    assert!(wl.wait().unwrap().success());
    let ep = Episode::from_output(&wait_output(trace, T));
    let truth = report(&out);
    assert_eq!(truth["frames_written"].as_u64(), Some(1500));
    ep
}

/// Episode B: the KVM VMM (kvm_*_reasons keys, no tap), spawned, with two
/// phases.
fn kvm_episode(dir: &Path) -> Episode {
    let out = run_with_timeout(
        trace_cmd(dir)
            .args([
                "--interval-ms",
                "20",
                "--tag",
                "sample=sha256:bbbb",
                "--tag",
                "vm=kvm-vmm",
            ])
            .args(["--label", "boot@0", "--label", "detonate@0.1", "--"])
            .arg(bin("cis490-workload"))
            .args(["kvm", "--io-exits", "40000", "--out"])
            .arg(dir.join("kvm.json")),
        T,
    );
    Episode::from_output(&out)
}

/// A child process killed (SIGKILL) and reaped on drop, also when the test
/// fails.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A trace still running: its directory has no done.marker. Returns the
/// tracer, the target and the directory; dropping the tracer kills it
/// (SIGKILL), which leaves the episode half-written for good.
fn running_episode(dir: &Path, known: &[&Path]) -> (KillOnDrop, KillOnDrop, PathBuf) {
    let target = KillOnDrop(Command::new("sleep").arg("120").spawn().unwrap());
    let tracer = KillOnDrop(
        trace_cmd(dir)
            .args([
                "--target-pid",
                &target.0.id().to_string(),
                "--tag",
                "sample=half",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    loop {
        let new = std::fs::read_dir(dir.join("data/episodes"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                !known.contains(&p.as_path())
                    && std::fs::read_to_string(p.join("events.jsonl"))
                        .is_ok_and(|t| t.contains("\"event\":\"started\""))
            });
        if let Some(p) = new {
            return (tracer, target, p);
        }
        assert!(t0.elapsed() < T, "the third trace did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Per-source totals of the JSONL rows: field -> sum over the rows that
/// measured it (None: no row did).
fn jsonl_totals(ep: &Episode, source: &str) -> BTreeMap<String, Option<u64>> {
    let mut out: BTreeMap<String, Option<u64>> = BTreeMap::new();
    for r in ep.rows(source) {
        for (k, v) in r.as_object().unwrap() {
            if ENVELOPE.contains(&k.as_str())
                || KEYED.contains(&k.as_str())
                || HISTS.contains(&k.as_str())
            {
                continue;
            }
            let slot = out.entry(k.clone()).or_insert(None);
            if let Some(x) = v.as_u64() {
                *slot = Some(slot.unwrap_or(0) + x);
            }
        }
    }
    out
}

/// A keyed object summed over the rows, per key and counter.
fn jsonl_keyed(ep: &Episode, source: &str, field: &str) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for r in ep.rows(source) {
        for (k, v) in r[field].as_object().into_iter().flatten() {
            let e = out.entry(k.clone()).or_default();
            let counters: Vec<(String, u64)> = match v {
                Value::Object(m) => m
                    .iter()
                    .map(|(c, n)| (c.clone(), n.as_u64().unwrap()))
                    .collect(),
                n => vec![("count".into(), n.as_u64().unwrap())],
            };
            for (c, n) in counters {
                *e.entry(c).or_default() += n;
            }
        }
    }
    out
}

/// DuckDB's totals and side tables against the JSONL, exactly.
fn check_duckdb(report: &Value, eps: &[&Episode], what: &str) {
    for ep in eps {
        let id = ep.meta["id"].as_str().unwrap();
        for source in ep.rows.keys() {
            let db = &report["totals"][source][id];
            assert_eq!(
                db["rows"].as_u64(),
                Some(ep.rows(source).len() as u64),
                "{what} {source} rows"
            );
            for (field, want) in jsonl_totals(ep, source) {
                assert_eq!(
                    db[&field].as_u64(),
                    want,
                    "{what}: {source} {field} of {id}: {db}"
                );
            }
            for t in KEYED {
                let want = jsonl_keyed(ep, source, t);
                let got: BTreeMap<String, BTreeMap<String, u64>> =
                    serde_json::from_value(report["side"][t][source][id].clone())
                        .unwrap_or_default();
                assert_eq!(got, want, "{what}: side table {t} of {source} {id}");
            }
        }
    }
}

/// pyarrow's whole tables against the JSONL, row by row: every column of
/// every row, the histograms as lists, the keyed objects rebuilt from their
/// long tables.
fn check_pyarrow(tables: &Value, eps: &[&Episode]) {
    for ep in eps {
        let id = ep.meta["id"].as_str().unwrap();
        for (source, rows) in &ep.rows {
            let mut got: Vec<&Value> = tables["telemetry"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["episode_id"] == id && r["source"] == source.as_str())
                .collect();
            got.sort_by_key(|r| r["seq"].as_u64());
            assert_eq!(got.len(), rows.len(), "{source} {id}");
            for (g, want) in got.iter().zip(rows) {
                let seq = want["seq"].as_u64().unwrap();
                for (k, v) in want.as_object().unwrap() {
                    if KEYED.contains(&k.as_str()) {
                        let n = v.as_object().map(|m| m.len() as u64);
                        assert_eq!(
                            g[format!("{k}_entries")].as_u64(),
                            n,
                            "{source} {k} seq {seq}"
                        );
                        // The object, rebuilt from the long table.
                        let mut obj = serde_json::Map::new();
                        for e in tables[k].as_array().unwrap().iter().filter(|e| {
                            e["episode_id"] == id
                                && e["source"] == source.as_str()
                                && e["seq"] == seq
                        }) {
                            let mut e = e.as_object().unwrap().clone();
                            for drop in ["episode_id", "seq", "source", "date", "host"] {
                                e.remove(drop);
                            }
                            let key_col = ["interface", "device", "reason"]
                                .into_iter()
                                .find(|c| e.contains_key(*c))
                                .unwrap();
                            let key = e.remove(key_col).unwrap().as_str().unwrap().to_owned();
                            let val = match e.remove("count") {
                                Some(c) => c,
                                None => Value::Object(e),
                            };
                            obj.insert(key, val);
                        }
                        let want_obj = v.as_object().cloned().unwrap_or_default();
                        assert_eq!(obj, want_obj, "{source} {k} seq {seq}");
                    } else if k == "source" {
                        assert_eq!(&g[k], v, "partition source");
                    } else {
                        assert_eq!(&g[k], v, "{source} {k} seq {seq} of {id}");
                    }
                }
                assert!(g.get("net_by_if").is_none(), "no object column");
            }
        }
        // episodes: one row, tags as a map; labels and events, every line.
        let e: Vec<&Value> = tables["episodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["episode_id"] == id)
            .collect();
        assert_eq!(e.len(), 1);
        let tags: BTreeMap<String, String> = e[0]["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| {
                (
                    kv[0].as_str().unwrap().to_owned(),
                    kv[1].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let want: BTreeMap<String, String> =
            serde_json::from_value(ep.meta["tags"].clone()).unwrap();
        assert_eq!(tags, want);
        let meta: Value = serde_json::from_str(e[0]["meta_json"].as_str().unwrap()).unwrap();
        assert_eq!(meta, ep.meta);
        let labels_jsonl = std::fs::read_to_string(ep.dir.join("labels.jsonl")).unwrap();
        let n_labels = tables["labels"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["episode_id"] == id)
            .count();
        assert_eq!(n_labels, labels_jsonl.lines().count(), "labels of {id}");
        let n_events = tables["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["episode_id"] == id)
            .count();
        assert_eq!(n_events, ep.events.len(), "events of {id}");
    }
}

/// The moto S3 server on a free local port; killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(python())
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < T, "moto did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const AWS_ENV: [(&str, &str); 3] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
];

fn ship_cmd(data: &Path, to: &str, endpoint: &str) -> Command {
    let mut c = Command::new(bin("cis490"));
    c.args(["ship", "--data-dir"])
        .arg(data)
        .args(["--to", to, "--endpoint", endpoint]);
    c.envs(AWS_ENV).env("HOME", data); // no profile files of the machine
    c
}

#[test]
fn export_read_back_and_ship_to_s3() {
    require_root();
    python();
    let dir = scratch("dataset");
    let data = dir.join("data");
    let ns = Netns::new("ds");
    let a = tap_episode(&dir, &ns);
    let b = kvm_episode(&dir);
    let (a_dir, b_dir) = (a.dir.clone(), b.dir.clone());
    assert_ne!(
        a.rows("ebpf")
            .iter()
            .find_map(|r| r["net_by_if"]
                .as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>())),
        b.rows("ebpf")
            .iter()
            .find_map(|r| r["net_by_if"]
                .as_object()
                .map(|m| m.keys().cloned().collect::<Vec<_>>())),
        "the two episodes have different interfaces"
    );
    let eps = [&a, &b];

    // A half-written episode: refused by export (one error line, nothing
    // written), skipped by ship.
    let (tracer, target, half) = running_episode(&dir, &[&a_dir, &b_dir]);
    let refused = dir.join("refused");
    let out = cis490(&[
        "export",
        a_dir.to_str().unwrap(),
        half.to_str().unwrap(),
        "--to",
        refused.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains("not a complete episode"), "{stderr}");
    assert!(!refused.exists(), "nothing written");

    // Export both, twice into fresh directories, and once more in place.
    let (x1, x2) = (dir.join("x1"), dir.join("x2"));
    for x in [&x1, &x2] {
        let out = cis490(&[
            "export",
            a_dir.to_str().unwrap(),
            b_dir.to_str().unwrap(),
            "--to",
            x.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = cis490(&[
        "export",
        a_dir.to_str().unwrap(),
        b_dir.to_str().unwrap(),
        "--to",
        x1.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .matches("(0 new or changed)")
            .count()
            == 2
    );
    let r1 = read_dataset(&["local", x1.to_str().unwrap()], &[]);
    let r2 = read_dataset(&["local", x2.to_str().unwrap()], &[]);
    let files = r1["files"].as_object().unwrap();
    // 3 sources x (telemetry + 4 side tables) + episodes, events, labels.
    assert_eq!(files.len(), 2 * (3 * 5 + 3), "{:?}", files.keys());
    assert_eq!(
        r1["files"], r2["files"],
        "exporting twice gives the same bytes"
    );
    let a_id = a.meta["id"].as_str().unwrap();
    let host = r1["duckdb"]["episodes"][0]["host"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        files
            .keys()
            .any(|k| k.starts_with("net_by_if/source=ebpf/date=")
                && k.ends_with(&format!("/host={host}/{a_id}.parquet")))
    );

    // One schema per table, whatever the interfaces and keys.
    for (t, schemas) in r1["file_schemas"].as_object().unwrap() {
        assert_eq!(schemas.as_array().unwrap().len(), 1, "{t}: {schemas}");
    }
    let cols: Vec<&str> = r1["duckdb"]["schemas"]["telemetry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[0].as_str().unwrap())
        .collect();
    for c in [
        "cpu_ns",
        "net_by_if_entries",
        "runq_delay_hist_log2",
        "source",
        "date",
        "host",
    ] {
        assert!(cols.contains(&c), "telemetry has {c}: {cols:?}");
    }
    assert!(!cols.contains(&"net_by_if"), "{cols:?}");

    check_duckdb(&r1["duckdb"], &eps, "local");
    check_pyarrow(&r1["pyarrow"], &eps);
    // The worked example: per-phase CPU and network per sample, the query
    // of docs/data-model.md as it stands there.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let py_text = std::fs::read_to_string(script()).unwrap();
    let query = py_text
        .split("PER_PHASE = \"\"\"")
        .nth(1)
        .unwrap()
        .split("\"\"\"")
        .next()
        .unwrap();
    let doc = std::fs::read_to_string(root.join("docs/data-model.md")).unwrap();
    assert!(
        doc.contains(&format!("```sql\n{};\n```", query.trim())),
        "docs/data-model.md shows the per-phase query the test runs"
    );
    let phases = r1["duckdb"]["per_phase"].as_array().unwrap();
    eprintln!("per phase: {phases:?}");
    let cpu = |sample: &str| -> u64 {
        phases
            .iter()
            .filter(|p| p["sample"] == sample)
            .map(|p| p["cpu_ns"].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(
        cpu("sha256:aaaa"),
        a.sum("ebpf", "cpu_ns"),
        "phases partition episode A's rows"
    );
    assert_eq!(
        cpu("sha256:bbbb"),
        b.sum("ebpf", "cpu_ns"),
        "phases partition episode B's rows"
    );
    let a_tx: u64 = phases
        .iter()
        .filter(|p| p["sample"] == "sha256:aaaa")
        .map(|p| p["net_tx_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(a_tx, a.sum("ebpf", "net_tx_bytes"));
    assert!(
        phases
            .iter()
            .any(|p| p["sample"] == "sha256:bbbb" && p["phase"] == "detonate"),
        "{phases:?}"
    );

    // Ship: kill the shipper after its first upload, run it again.
    let moto = Moto::start();
    let env: Vec<(&str, &str)> = AWS_ENV.to_vec();
    read_dataset(&["mkbucket", &moto.endpoint, "lab"], &env);
    let to = "s3://lab/v1";
    let mut first = ship_cmd(&data, to, &moto.endpoint)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        let put = l.contains(": put ");
        seen.push(l);
        if put {
            kill(first.id() as i32, libc::SIGKILL);
            break;
        }
    }
    let status = first.wait().unwrap();
    assert!(!status.success(), "killed mid-upload; stderr: {seen:?}");
    let mid = read_dataset(&["s3", &moto.endpoint, "lab", "v1"], &env);
    let mid_objects = mid["objects"].as_object().unwrap();
    eprintln!(
        "after the kill: {} objects, manifests {:?}",
        mid_objects.len(),
        mid["manifests"].as_object().unwrap().keys()
    );
    assert!(
        mid_objects
            .keys()
            .any(|k| k.ends_with(&format!("{a_id}.parquet"))),
        "{seen:?}"
    );
    assert!(
        !mid_objects.contains_key(&format!("manifests/{a_id}.json")),
        "killed before A's manifest: {seen:?}"
    );

    let second = ship_cmd(&data, to, &moto.endpoint).output().unwrap();
    let err2 = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{err2}");
    assert!(err2.contains("kept "), "the second run resumed: {err2}");
    assert!(err2.contains("skipped: not complete"), "{err2}");
    let third = ship_cmd(&data, to, &moto.endpoint).output().unwrap();
    let err3 = String::from_utf8_lossy(&third.stderr);
    assert!(
        third.status.success() && err3.matches("already shipped").count() == 2,
        "{err3}"
    );

    let end = read_dataset(&["s3", &moto.endpoint, "lab", "v1"], &env);
    let objects = end["objects"].as_object().unwrap();
    let manifests = end["manifests"].as_object().unwrap();
    let half_id = half.file_name().unwrap().to_str().unwrap();
    assert_eq!(
        manifests.keys().cloned().collect::<BTreeSet<_>>(),
        [a_id, b.meta["id"].as_str().unwrap()]
            .iter()
            .map(|i| format!("manifests/{i}.json"))
            .collect::<BTreeSet<_>>()
    );
    assert!(
        !objects.keys().any(|k| k.contains(half_id)),
        "the half-written episode was never shipped"
    );
    // Each episode once, complete, each object what export writes, listed
    // in its manifest with its SHA-256.
    let mut listed = BTreeMap::new();
    for m in manifests.values() {
        for f in m["files"].as_array().unwrap() {
            listed.insert(f["key"].as_str().unwrap().to_owned(), json!(f["sha256"]));
        }
    }
    let data_objects: serde_json::Map<String, Value> = objects
        .iter()
        .filter(|(k, _)| !k.starts_with("manifests/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(
        Value::Object(data_objects.clone()),
        r1["files"],
        "the bucket holds exactly the exported files"
    );
    assert_eq!(
        Value::Object(listed.into_iter().collect()),
        Value::Object(data_objects)
    );
    // DuckDB over S3 (httpfs), through the manifests.
    check_duckdb(&end["duckdb"], &eps, "s3");

    // --delete-local: both shipped episodes verified and deleted, the
    // half-written one kept.
    let del = ship_cmd(&data, to, &moto.endpoint)
        .arg("--delete-local")
        .output()
        .unwrap();
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    assert!(!a_dir.exists() && !b_dir.exists());
    assert!(half.exists());
    drop(tracer);
    drop(target);
    drop(moto);
    let _ = std::fs::remove_dir_all(&dir);
}
