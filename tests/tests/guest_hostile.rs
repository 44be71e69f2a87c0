//! The guest source against a hostile peer: this test plays QEMU's chardev
//! socket (it listens where `--guest-agent` connects) and sends what a
//! compromised guest could: garbage of every kind, a 100 MB line, 100k
//! lines per second, nothing for 10 s, a hang-up in the middle of a line
//! and a new connection. The tracer's memory stays bounded, every line is
//! counted (accepted, bad or skipped), the counters are exactly the good
//! lines' deltas, and `cis490 check` passes.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    process::Stdio,
    time::{Duration, Instant},
};

use cis490_agent::protocol::{AgentLine, CpuTimes, Disk, Exec, NetIf, VERSION};
use cis490_tests::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
/// The tracer's peak resident memory may grow by at most this much while
/// the peer is hostile (its line buffer is 64 KiB, its queue at most 64
/// parsed lines; a buffered 100 MB line would add 100 MB).
const HWM_GROWTH_BOUND_KIB: u64 = 16 * 1024;
/// And stay below this in all (the tracer, its eBPF maps and every source).
const HWM_BOUND_KIB: u64 = 96 * 1024;

/// A good line: cumulative counters that are `k` steps along.
fn good(k: u64) -> AgentLine {
    AgentLine {
        v: VERSION,
        seq: k,
        boot_id: "hostile-test-boot".into(),
        guest_mono_ns: k * 1_000_000,
        guest_wall_ns: 1_700_000_000_000_000_000 + k,
        cpu: CpuTimes {
            user_ns: 1_000_000 * k,
            system_ns: 500_000 * k,
            idle_ns: 10_000_000 * k,
            iowait_ns: 1000 * k,
        },
        procs: 7,
        net: [(
            "eth0".to_owned(),
            NetIf {
                tx_bytes: 100 * k,
                rx_bytes: 50 * k,
                ..Default::default()
            },
        )]
        .into(),
        disks: [(
            "vda".to_owned(),
            Disk {
                write_bytes: 4096 * k,
                ..Default::default()
            },
        )]
        .into(),
        ..Default::default()
    }
}

fn text(l: &AgentLine) -> Vec<u8> {
    let mut t = serde_json::to_vec(l).unwrap();
    t.push(b'\n');
    t
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM")
}

fn accept(listener: &UnixListener) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let t0 = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(t0.elapsed() < T, "the tracer did not connect");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Lines sent, and those of them the tracer must count as bad.
#[derive(Default)]
struct Sent {
    sent: u64,
    bad: u64,
}

/// Sends one line, then waits 50 ms: two lines a 100 ms bucket, far under
/// the flood cap of 32 even when the tracer wakes up a second late (a
/// loaded or emulated machine), so no bad line is skipped unread.
fn send(p: &mut UnixStream, bytes: &[u8], is_bad: bool, n: &mut Sent) {
    p.write_all(bytes).unwrap();
    n.sent += 1;
    n.bad += u64::from(is_bad);
    std::thread::sleep(Duration::from_millis(50));
}

fn sum(rows: &[Value], field: &str) -> u64 {
    rows.iter().filter_map(|r| r[field].as_u64()).sum()
}

#[test]
fn a_hostile_peer_costs_only_counted_lines() {
    require_root();
    let dir = scratch("guest-hostile");
    let sock = dir.join("ga.sock");
    let ctl = dir.join("ctl.sock");
    let tracer = default_trace_cmd(&dir)
        .args(["--interval-ms", "100", "--guest-agent"])
        .arg(&sock)
        .arg("--control")
        .arg(&ctl)
        .args(["--", "sleep", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = tracer.id();
    wait_trace_started(&dir.join("data"), T);
    // QEMU is late: the tracer retries until the socket is there.
    std::thread::sleep(Duration::from_millis(300));
    let listener = UnixListener::bind(&sock).unwrap();
    let mut peer = accept(&listener);
    let mut hello = String::new();
    BufReader::new(peer.try_clone().unwrap())
        .read_line(&mut hello)
        .unwrap();
    assert_eq!(hello, "{\"interval_ms\":100}\n");

    let mut n = Sent::default();
    let mut k = 0u64;

    // Good lines, the first with three started processes.
    let mut first = good(k);
    first.execs = (0..3)
        .map(|i| Exec {
            pid: 500 + i,
            ppid: 1,
            comm: format!("evil{i}"),
        })
        .collect();
    send(&mut peer, &text(&first), false, &mut n);
    for _ in 0..4 {
        k += 1;
        send(&mut peer, &text(&good(k)), false, &mut n);
    }
    let chain1 = k; // steps counted in the first chain of deltas
    let hwm_before = vm_hwm_kib(pid);

    // Garbage, one line of each kind (50 ms apart: under the flood cap).
    let mut wrong_type = serde_json::to_value(good(k + 1)).unwrap();
    wrong_type["procs"] = "seven".into();
    let mut negative = serde_json::to_value(good(k + 1)).unwrap();
    negative["cpu"]["user_ns"] = (-5).into();
    let mut over = serde_json::to_value(good(k + 1)).unwrap();
    over["disks"]["vda"]["write_bytes"] = (u64::MAX).into();
    let mut unknown = serde_json::to_value(good(k + 1)).unwrap();
    unknown["rootkit"] = true.into();
    let mut version = good(k + 1);
    version.v = 9;
    let mut many_execs = good(k + 1);
    many_execs.execs = (0..65)
        .map(|i| Exec {
            pid: i,
            ppid: 1,
            comm: "x".into(),
        })
        .collect();
    let mut jump = good(k + 1);
    jump.cpu.user_ns = 1 << 61; // valid, but no guest runs that fast
    let garbage: Vec<Vec<u8>> = vec![
        b"hello, tracer\n".to_vec(),
        b"\xff\xfe\x00\x01 binary\n".to_vec(),
        b"{\"v\":1,\"seq\":\n".to_vec(),
        b"[1,2,3]\n".to_vec(),
        b"\n".to_vec(),
        format!("{wrong_type}\n").into_bytes(),
        format!("{negative}\n").into_bytes(),
        format!("{over}\n").into_bytes(),
        format!("{unknown}\n").into_bytes(),
        text(&version),
        text(&many_execs),
        text(&jump),
    ];
    for g in &garbage {
        send(&mut peer, g, true, &mut n);
    }
    // A counter going back: bad, and the next good line starts a new chain.
    let mut back = good(k + 1);
    back.cpu.user_ns = 0;
    send(&mut peer, &text(&back), true, &mut n);
    k += 10;
    let chain2_start = k;
    send(&mut peer, &text(&good(k)), false, &mut n);

    // A 100 MB line, then a good one.
    std::thread::sleep(Duration::from_millis(150));
    let chunk = vec![b'x'; 1 << 20];
    for _ in 0..100 {
        peer.write_all(&chunk).unwrap();
    }
    send(&mut peer, b"\n", true, &mut n);
    std::thread::sleep(Duration::from_millis(150));
    k += 1;
    send(&mut peer, &text(&good(k)), false, &mut n);

    // 100k lines per second for 2 s: batches of 100 every ms, the counters
    // one step along per batch.
    let flood_start = Instant::now();
    let mut flooded = 0u64;
    while flood_start.elapsed() < Duration::from_secs(2) {
        k += 1;
        let batch = text(&good(k)).repeat(100);
        peer.write_all(&batch).unwrap();
        flooded += 100;
        let due = Duration::from_micros(flooded * 10);
        if let Some(wait) = due.checked_sub(flood_start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let flood_secs = flood_start.elapsed().as_secs_f64();
    n.sent += flooded;
    // The sender blocks when the tracer does not read: the rate reached is
    // the rate the tracer kept up with (not held under software emulation,
    // where the sender itself cannot reach it).
    if !software_emulated() {
        assert!(
            flooded as f64 / flood_secs >= 75_000.0,
            "the flood reached only {:.0} lines/s",
            flooded as f64 / flood_secs
        );
    }
    eprintln!(
        "flood: {flooded} lines in {flood_secs:.2} s ({:.0} lines/s)",
        flooded as f64 / flood_secs
    );
    std::thread::sleep(Duration::from_millis(300));
    k += 1;
    send(&mut peer, &text(&good(k)), false, &mut n);

    // Nothing for 10 s.
    let stall_from = mono_now_ns();
    std::thread::sleep(Duration::from_secs(10));
    let stall_to = mono_now_ns();

    // A hang-up in the middle of a line, then QEMU takes a new connection.
    peer.write_all(b"{\"v\":1,\"seq\":99").unwrap();
    n.sent += 1;
    n.bad += 1;
    drop(peer);
    let mut peer = accept(&listener);
    for _ in 0..3 {
        k += 1;
        send(&mut peer, &text(&good(k)), false, &mut n);
    }
    std::thread::sleep(Duration::from_millis(300));
    let hwm_after = vm_hwm_kib(pid);

    let mut c = UnixStream::connect(&ctl).unwrap();
    c.write_all(b"stop\n").unwrap();
    let ep = Episode::from_output(&wait_output(tracer, T));
    drop(peer);
    eprintln!("tracer VmHWM: {hwm_before} KiB before the hostile phases, {hwm_after} KiB after");
    eprintln!(
        "tracer: {}; skipped boundaries {}",
        ep.meta["tracer"], ep.meta["skipped_boundaries"]
    );
    assert!(
        hwm_after <= hwm_before + HWM_GROWTH_BOUND_KIB && hwm_after <= HWM_BOUND_KIB,
        "VmHWM grew from {hwm_before} to {hwm_after} KiB"
    );

    let rows = ep.rows("guest");
    assert_eq!(rows.len(), ep.rows("ebpf").len());
    assert!(
        rows.iter()
            .all(|r| r["source"] == "guest" && r["available_in_deployment"] == true)
    );
    let Sent { sent, bad } = n;
    let (lines, bad_lines, skipped) = (
        sum(rows, "guest_lines"),
        sum(rows, "guest_bad_lines"),
        sum(rows, "guest_skipped_lines"),
    );
    eprintln!("sent {sent}: {lines} accepted, {bad_lines} bad, {skipped} skipped");
    assert_eq!(bad_lines, bad, "every bad line counted as bad");
    assert_eq!(lines + bad_lines + skipped, sent, "every line counted");
    assert!(skipped > 0, "the flood was capped");
    for r in rows {
        let read = r["guest_lines"].as_u64().unwrap() + r["guest_bad_lines"].as_u64().unwrap();
        assert!(read <= 64, "a bucket read {read} lines: {r}");
        assert!(!r["guest_lines"].is_null() && !r["guest_skipped_lines"].is_null());
        if r["guest_lines"] == 0 {
            for f in ["guest_cpu_user_ns", "guest_procs", "guest_disk_write_bytes"] {
                assert!(r[f].is_null(), "{f} without a line: {r}");
            }
        }
    }
    // The counters are the good lines' deltas, exactly, skipped lines
    // included (their growth shows in the next accepted line).
    let steps = chain1 + (k - chain2_start);
    assert_eq!(sum(rows, "guest_cpu_user_ns"), steps * 1_000_000);
    assert_eq!(sum(rows, "guest_disk_write_bytes"), steps * 4096);
    assert_eq!(sum(rows, "guest_net_tx_bytes"), steps * 100);
    assert_eq!(ep.max("guest", "guest_procs"), 7);
    // The stall: every bucket inside it has no line and null measures.
    let inside: Vec<&Value> = rows
        .iter()
        .filter(|r| {
            let t = r["t_mono_ns"].as_u64().unwrap();
            t > stall_from + 300_000_000 && t < stall_to
        })
        .collect();
    // (Buckets, or merged buckets where the tracer woke up late.)
    let covered: u64 = inside
        .iter()
        .filter_map(|r| r["interval_ns"].as_u64())
        .sum();
    assert!(
        covered >= 9_000_000_000,
        "the stall's rows cover {covered} ns"
    );
    assert!(
        inside
            .iter()
            .all(|r| r["guest_lines"] == 0 && r["guest_cpu_user_ns"].is_null())
    );

    // Events: each bad line described or counted, the execs, the
    // connections.
    let described = ep.events_named("guest_bad_line").count() as u64;
    let unlisted: u64 = ep
        .events_named("guest_bad_lines_unlisted")
        .filter_map(|e| e["count"].as_u64())
        .sum();
    assert_eq!(described + unlisted, bad);
    let reasons: Vec<&str> = ep
        .events_named("guest_bad_line")
        .filter_map(|e| e["reason"].as_str())
        .collect();
    for r in [
        "not_json",
        "wrong_shape",
        "invalid",
        "absurd",
        "counter_went_back",
        "too_long",
        "cut",
    ] {
        assert!(
            reasons.contains(&r),
            "no bad line of reason {r}: {reasons:?}"
        );
    }
    let too_long = ep
        .events_named("guest_bad_line")
        .find(|e| e["reason"] == "too_long")
        .unwrap();
    assert_eq!(too_long["bytes"], 100u64 << 20);
    let execs: Vec<&str> = ep
        .events_named("guest_exec")
        .filter_map(|e| e["comm"].as_str())
        .collect();
    assert_eq!(execs, ["evil0", "evil1", "evil2"]);
    assert_eq!(sum(rows, "guest_execs"), 3);
    assert_eq!(ep.events_named("guest_connected").count(), 2);
    assert_eq!(ep.events_named("guest_disconnected").count(), 1);
    assert!(ep.events_named("guest_flood").count() > 0);
    let meta = &ep.meta["guest_agent"];
    assert_eq!(meta["connections"], 2);
    assert_eq!(meta["longest_line_held"], 64 * 1024);
    assert_check_passes(&ep.dir);
}

/// A socket nobody ever serves: the trace goes on and completes, the guest
/// rows are all `null` but their line counts (0), the failure is an event,
/// a warning and meta.json's error, and `cis490 check` fails naming it.
#[test]
fn a_guest_agent_socket_that_never_answers_is_reported() {
    require_root();
    let dir = scratch("guest-never");
    let sock = dir.join("nobody.sock");
    let out = run_with_timeout(
        default_trace_cmd(&dir)
            .arg("--guest-agent")
            .arg(&sock)
            .args(["--", "sleep", "1"]),
        T,
    );
    let ep = Episode::from_output(&out);
    assert!(ep.is_done());
    let rows = ep.rows("guest");
    assert!(!rows.is_empty());
    for r in rows {
        assert_eq!(r["guest_lines"], 0);
        assert!(r["guest_cpu_user_ns"].is_null() && r["guest_mem_used_bytes"].is_null());
    }
    let never: Vec<&Value> = ep.events_named("guest_never_connected").collect();
    assert_eq!(never.len(), 1);
    assert!(never[0]["error"].as_str().unwrap().contains("nobody.sock"));
    assert!(ep.meta["guest_agent"]["error"].is_string());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("guest agent"), "{stderr}");
    let (ok, text) = check_episode(&ep.dir);
    assert!(
        !ok && text.contains("guest agent source was asked for but never connected"),
        "{text}"
    );
}
