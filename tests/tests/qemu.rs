//! A real `qemu-system-x86_64` guest (Debian kernel, busybox initramfs,
//! built by `cargo xtask guest`) does known disk and network work; it must
//! show up in the QEMU process's rows. The tap and the peer that answers the
//! guest live in a network namespace made for the test.

use std::{fs, time::Duration};

use cis490_tests::{
    guest::{GuestJson, GuestNet, console_values, create_disk},
    *,
};

const MIB: u64 = 1 << 20;

fn by_if(ep: &Episode, source: &str, name: &str, field: &str) -> u64 {
    ep.rows(source)
        .iter()
        .filter_map(|r| r["net_by_if"][name][field].as_u64())
        .sum()
}

/// Reads what QEMU reads at start-up (its libraries, firmware, the guest's
/// kernel and initramfs) so none of it is a block read during the test.
fn warm_page_cache(g: &GuestJson) {
    let _ = std::process::Command::new(&g.guest.qemu)
        .arg("--version")
        .output();
    let _ = fs::read(&g.guest.kernel);
    let _ = fs::read(&g.guest.initrd);
    for dir in [
        "/usr/share/qemu",
        "/usr/share/seabios",
        "/usr/lib/ipxe/qemu",
    ] {
        for f in fs::read_dir(dir).into_iter().flatten().flatten() {
            let _ = fs::read(f.path());
        }
    }
}

/// Boots the guest on a fresh 64 MiB disk (QEMU's `cache` mode, `none`
/// when `None`) with its network (`send` bytes to the peer) and `params`,
/// traced by the test sources with `--qmp`, until QEMU exits; the episode
/// and what the guest said on its console (a failed step fails the test).
fn traced_guest(
    g: &GuestJson,
    dir: &std::path::Path,
    net: &mut GuestNet,
    send: u64,
    params: &str,
    cache: Option<&'static str>,
) -> (Episode, std::collections::BTreeMap<String, String>) {
    let disk = dir.join("disk.img");
    create_disk(&disk, 64).unwrap();
    let mut launch = g.launch(format!("{} {params}", net.params(send)));
    launch.disk = Some(disk);
    launch.disk_cache = cache;
    let (console, qmp) = net.wire(&mut launch, dir);
    let argv = net.argv(&g.guest, &launch);
    let out = run_with_timeout(
        trace_cmd(dir)
            .arg("--qmp")
            .arg(&qmp)
            .args(["--duration", "170", "--"])
            .args(&argv),
        Duration::from_secs(200),
    );
    let ep = Episode::from_output(&out);
    assert!(net.sink.wait().unwrap().success());
    (ep, guest_said(g, &console))
}

/// What the guest reported on its console (`key=value` lines); a failed
/// step fails the test.
fn guest_said(
    g: &GuestJson,
    console: &std::path::Path,
) -> std::collections::BTreeMap<String, String> {
    let console = fs::read_to_string(console).unwrap();
    let guest = console_values(&console);
    eprintln!("accel {}; guest said {guest:?}", g.accel);
    assert!(
        !guest.contains_key("error"),
        "the guest failed a step:\n{console}"
    );
    guest
}

#[test]
fn guest_disk_and_network_work_shows_in_the_qemu_rows() {
    require_root();
    let g = GuestJson::from_env().unwrap();
    let dir = scratch("qemu");
    let tap = "c490vm0";
    let mut net = GuestNet::start(&dir, "vm", tap, 99, 5555);

    // Reads of QEMU's own files at start-up would be block reads of the QEMU
    // process too: warm the page cache first, so the rows hold the guest's I/O.
    warm_page_cache(&g);
    let (write_mb, read_mb, send) = (16u64, 16u64, 2_000_000u64);
    let (ep, guest) = traced_guest(
        &g,
        &dir,
        &mut net,
        send,
        &format!(
            "cis490.disk_write_mb={write_mb} cis490.disk_read_mb={read_mb} cis490.sleep_ms=600"
        ),
        None,
    );
    assert_eq!(
        guest.get("disk_write_bytes").map(String::as_str),
        Some(&*(write_mb * MIB).to_string())
    );
    assert_eq!(
        guest.get("net_sent_bytes").map(String::as_str),
        Some(&*send.to_string())
    );
    assert_eq!(
        report(&net.sink_out)["bytes"].as_u64(),
        Some(send),
        "the peer got every byte"
    );
    assert_eq!(ep.meta["end_reason"], "target_exited");
    assert!(ep.events_named("tap_attached").any(|e| e["name"] == tap));

    // Disk: with cache=none the guest's direct I/O is QEMU's direct I/O on
    // the image file: the same bytes, writes within 0.5% above (+0.024%
    // seen: 4 KiB), reads within 5% above (the guest's partition scan and
    // whatever of QEMU's own files the page cache no longer held on a busy
    // machine: +0.16% to +2.2% seen); the kernel's I/O accounting of the
    // writes (`io_write_bytes`, eBPF and the oracle's /proc/PID/io) and the
    // oracle's reads within 0.5% (0.073% seen).
    let (w, r) = ((write_mb * MIB) as f64, (read_mb * MIB) as f64);
    let (ew, er) = (
        ep.sum("ebpf", "blk_write_bytes") as f64,
        ep.sum("ebpf", "blk_read_bytes") as f64,
    );
    eprintln!("ebpf wrote {ew} read {er}; the guest {w} {r}");
    assert!(ew >= w && ew <= w * 1.005, "blk_write_bytes {ew} vs {w}");
    assert!(er >= r && er <= r * 1.05, "blk_read_bytes {er} vs {r}");
    // The kernel's I/O accounting of QEMU's threads: the same direct
    // writes, from both vantages.
    let iw = ep.sum("ebpf", "io_write_bytes") as f64;
    assert_close("io_write_bytes ebpf vs blk_write_bytes", iw, ew, 0.005);
    assert_close(
        "io_write_bytes ebpf vs /proc",
        iw,
        ep.sum("proc", "io_write_bytes") as f64,
        0.005,
    );
    assert_close(
        "blk_read_bytes ebpf vs /proc",
        er,
        ep.sum("proc", "blk_read_bytes") as f64,
        0.005,
    );
    assert!(
        ep.sum("ebpf", "blk_write_ops") >= write_mb,
        "1 MiB guest writes make at least 16 requests"
    );

    // Network: the payload plus framing. Every frame the guest sends for
    // this connection carries 66 bytes of headers (14 Ethernet + 20 IPv4 +
    // 32 TCP with the timestamp option); the SYN 8 more, and an ARP request
    // (42 bytes) or two may go out too. How many frames depends on how the
    // guest's nc chunks its writes (or on TSO), so the check is per frame:
    // tx bytes = payload + 66 x tx frames, give or take 256 bytes.
    let tx = by_if(&ep, "ebpf", tap, "tx_bytes");
    let frames = by_if(&ep, "ebpf", tap, "tx_packets");
    let expected = send + 66 * frames;
    eprintln!(
        "tap tx {tx} bytes in {frames} frames; payload {send}; payload + 66/frame = {expected}"
    );
    assert!(
        tx.abs_diff(expected) <= 256,
        "tap tx {tx} vs payload + framing {expected}"
    );
    assert_close(
        "tap tx vs what the guest sent, framed",
        tx as f64,
        expected as f64,
        0.001,
    );
    // What came back (ACKs) is small but not nothing.
    assert!(by_if(&ep, "ebpf", tap, "rx_packets") > 0);
    // The interface statistics: within one frame (a frame in flight at the
    // oracle's last read; 1514 bytes at most).
    for (field, one_frame) in [
        ("tx_bytes", 1514),
        ("rx_bytes", 1514),
        ("tx_packets", 1),
        ("rx_packets", 1),
    ] {
        let (e, p) = (
            by_if(&ep, "ebpf", tap, field),
            by_if(&ep, "proc", tap, field),
        );
        eprintln!("tap {field}: ebpf {e}, interface statistics {p}");
        assert!(
            e.abs_diff(p) <= one_frame,
            "tap {field}: ebpf {e} vs the interface statistics {p}: more than one frame apart"
        );
    }

    // CPU: QEMU's threads, both sources within 2%.
    assert_close(
        "cpu_ns ebpf vs /proc",
        ep.sum("ebpf", "cpu_ns") as f64,
        ep.sum("proc", "cpu_ns") as f64,
        0.02,
    );
    assert!(
        ep.max("ebpf", "threads") >= 2,
        "QEMU runs a vCPU thread beside its main loop"
    );
    // Software emulation runs no KVM guest: no exits to count.
    if g.accel == "tcg" {
        assert!(
            ep.rows("ebpf")
                .iter()
                .all(|r| r["kvm_userspace_exits"].is_null())
        );
    } else {
        assert!(ep.sum("ebpf", "kvm_userspace_exits") > 0);
    }
    assert_eq!(ep.sum("ebpf", "dropped_events"), 0);

    // QMP: QEMU's own count of the guest's disk requests. Writes are the
    // guest's 16 MiB exactly; reads add the 12800 bytes the guest kernel
    // reads at boot (its partition scan). The host sees the same bytes
    // as QEMU's direct I/O on the image (ebpf, /proc), plus a few KiB of its
    // own: writes within 0.5% (+0.024% seen), reads within 5% (+0.085% to
    // +0.5% seen; see the disk check above).
    let qmp_dev = |f: &str| -> u64 {
        ep.rows("qmp")
            .iter()
            .filter_map(|r| r["blk_by_dev"]["virtio0"][f].as_u64())
            .sum()
    };
    assert_eq!(
        qmp_dev("write_bytes"),
        write_mb * MIB,
        "QMP virtio0 write bytes"
    );
    let qr = qmp_dev("read_bytes");
    assert!(
        qr >= read_mb * MIB && qr <= read_mb * MIB + 65536,
        "QMP virtio0 read bytes {qr}"
    );
    assert_close(
        "blk_write_bytes ebpf vs QMP",
        ew,
        ep.sum("qmp", "blk_write_bytes") as f64,
        0.005,
    );
    assert_close(
        "blk_read_bytes ebpf vs QMP",
        er,
        ep.sum("qmp", "blk_read_bytes") as f64,
        0.05,
    );
    // QMP events land in events.jsonl: the guest powered off.
    let shutdown = ep
        .events_named("qmp")
        .find(|e| e["qmp_event"] == "SHUTDOWN");
    assert!(shutdown.is_some(), "no SHUTDOWN event in events.jsonl");
    // QEMU exited mid-episode: the episode is complete, every source has
    // every bucket, and QMP's rows after it closed are null, not 0.
    assert!(ep.is_done());
    let last = ep.rows("qmp").last().unwrap();
    assert!(last["blk_write_bytes"].is_null(), "{last}");
    assert_check_passes(&ep.dir);
}

/// A QMP socket that accepts but never answers (or answers garbage) is a
/// clear event and warning, never a hang: the trace goes on without QMP.
/// QEMU's default disk cache (`cache=writeback`): the guest's writes are
/// QEMU's buffered writes to its image, which the kernel's flusher threads
/// write back later, in their own context. `blk_write_bytes` (requests QEMU
/// issues) misses them; `io_write_bytes` has them as QEMU dirtied them.
#[test]
fn a_guest_on_a_writeback_cached_disk_shows_its_writes_in_io_write_bytes() {
    require_root();
    let g = GuestJson::from_env().unwrap();
    let dir = scratch("qemu-writeback");
    let mut net = GuestNet::start(&dir, "vmwb", "c490wb0", 98, 5556);
    warm_page_cache(&g);
    let write_mb = 24u64;
    let (ep, guest) = traced_guest(
        &g,
        &dir,
        &mut net,
        1000,
        &format!("cis490.disk_write_mb={write_mb} cis490.disk_read_mb=0 cis490.sleep_ms=600"),
        Some("writeback"),
    );
    let w = write_mb * MIB;
    assert_eq!(
        guest.get("disk_write_bytes").map(String::as_str),
        Some(&*w.to_string())
    );
    let (iw, pw, bw, qw) = (
        ep.sum("ebpf", "io_write_bytes"),
        ep.sum("proc", "io_write_bytes"),
        ep.sum("ebpf", "blk_write_bytes"),
        ep.sum("qmp", "blk_write_bytes"),
    );
    eprintln!(
        "the guest wrote {w}: io_write_bytes ebpf {iw}, /proc {pw}; blk_write_bytes ebpf {bw}, QMP {qw}"
    );
    // The guest's writes, as QEMU wrote them to its image (the same bytes:
    // a raw image), within 0.5% above.
    assert!(
        iw >= w && iw as f64 <= w as f64 * 1.005,
        "io_write_bytes {iw} vs the guest's {w}"
    );
    assert_close("io_write_bytes ebpf vs /proc", iw as f64, pw as f64, 0.005);
    assert!(qw >= w, "QMP saw {qw} of the guest's {w}");
    // While the guest runs, the writes are not QEMU's requests (nothing in
    // the guest flushes; the kernel's flusher would write them back after
    // 30 s): `blk_write_bytes` has at most a small part of them before the
    // guest's shutdown, `io_write_bytes` has them all. QEMU flushes its
    // image as it exits, itself: `blk_write_bytes` gets them then (seen:
    // all of it in the bucket of QEMU's exit).
    let shutdown = ep
        .events_named("qmp")
        .find(|e| e["qmp_event"] == "SHUTDOWN")
        .and_then(|e| e["seq"].as_u64())
        .expect("a SHUTDOWN event with its bucket");
    let before = |field: &str| -> u64 {
        ep.rows("ebpf")
            .iter()
            .filter(|r| r["seq"].as_u64().unwrap() < shutdown)
            .map(|r| r[field].as_u64().unwrap())
            .sum()
    };
    let (iw_before, bw_before) = (before("io_write_bytes"), before("blk_write_bytes"));
    eprintln!(
        "before the shutdown (bucket {shutdown}): io_write_bytes {iw_before}, blk_write_bytes {bw_before}"
    );
    assert!(
        iw_before >= w,
        "io_write_bytes {iw_before} before the shutdown"
    );
    assert!(
        bw_before < w / 4,
        "blk_write_bytes {bw_before} before the shutdown: the flusher's writes counted as QEMU's?"
    );
    assert!(bw >= w, "QEMU's flush at exit: blk_write_bytes {bw}");
    assert_check_passes(&episode_dir(&dir));
}

#[test]
fn a_qmp_socket_that_never_answers_or_talks_garbage_is_reported_not_hung_on() {
    require_root();
    for (name, reply) in [
        ("silent", None),
        ("garbage", Some(&b"{\"QMP\": {\"version\": \n"[..])),
    ] {
        let dir = scratch(&format!("qmp-{name}"));
        let sock = dir.join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming().flatten() {
                if let Some(bytes) = reply {
                    use std::io::Write as _;
                    let _ = (&conn).write_all(bytes);
                }
                held.push(conn);
            }
        });
        let t0 = std::time::Instant::now();
        let out = run_with_timeout(
            trace_cmd(&dir)
                .arg("--qmp")
                .arg(&sock)
                .args(["--", "sleep", "1.5"]),
            Duration::from_secs(60),
        );
        let ep = Episode::from_output(&out);
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{name}: took {:?}",
            t0.elapsed()
        );
        assert!(ep.is_done());
        let err = ep
            .events_named("qmp")
            .find(|e| e.get("qmp_error").is_some());
        assert!(err.is_some(), "{name}: no qmp_error event");
        assert!(
            ep.meta["qmp"]["error"].as_str().is_some(),
            "{name}: {}",
            ep.meta["qmp"]
        );
        assert!(ep.rows("qmp").iter().all(|r| r["blk_read_bytes"].is_null()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("QMP source off"), "{name}: {stderr}");
    }
}

/// A link in the root network namespace, deleted on drop.
struct RootLink(&'static str);

impl RootLink {
    /// Runs `script` with `sh -c` and checks it worked.
    fn sh(script: &str) {
        let st = std::process::Command::new("sh")
            .args(["-c", script])
            .status()
            .unwrap();
        assert!(st.success(), "{script}");
    }

    /// Creates the link `name` with the `ip` command `create` (a leftover of
    /// the same name deleted first), IPv6 off.
    fn add(name: &'static str, create: &str) -> RootLink {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        Self::sh(create);
        let link = RootLink(name);
        Self::sh(&format!("sysctl -q -w net.ipv6.conf.{name}.disable_ipv6=1"));
        link
    }
}

impl Drop for RootLink {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", self.0])
            .status();
    }
}

/// The runs of a per-bucket series: groups of buckets with bytes, apart by
/// at least `gap` empty buckets; (first bucket, sum) of each.
fn runs(values: &[u64], gap: usize) -> Vec<(usize, u64)> {
    let mut out: Vec<(usize, u64)> = Vec::new();
    let mut last = None;
    for (i, &v) in values.iter().enumerate() {
        if v == 0 {
            continue;
        }
        match (last, out.last_mut()) {
            (Some(l), Some(run)) if i - l <= gap => run.1 += v,
            _ => out.push((i, v)),
        }
        last = Some(i);
    }
    out
}

/// The lab's way (README, "Tracing a VM your lab started"): the lab starts
/// QEMU itself, its tap on a bridge in the root network namespace, a
/// `cache=none` disk and a QMP socket for cis490; `cis490 trace
/// --target-pid QEMU --qmp SOCKET` with the default sources attaches while
/// the guest boots. The guest then writes its disk in three phases 1.5 s
/// apart (4, 8 and 2 MiB; its own count of each on the console), sends
/// 1 MB to a peer on the bridge, and powers off; 1500 frames are sent into
/// the tap meanwhile, while the guest works.
///
/// - Block bytes in the buckets where they happened: the eBPF rows'
///   `blk_write_bytes` make exactly three runs of buckets (apart by at
///   least 0.5 s of empty buckets), each the guest's phase, in order, plus
///   at most 64 KiB of QEMU's own; and the QMP rows (QEMU's own count of
///   the guest's requests) make the same three runs, exactly.
/// - Tap frames in the buckets where the tun counters (the /proc oracle)
///   count them: eBPF's rx and tx so far differ from the oracle's by at
///   most 8 frames at every bucket's end (the two are read one after the
///   other at each boundary, and up to 298 frames in a 100 ms bucket were
///   seen here while the guest's peer acknowledges its stream: rx 1 to 3
///   and tx 0 to 3 frames apart in 14 runs), and by none in total; rx
///   holds every frame sent.
#[test]
fn a_vm_the_lab_started_is_traced_by_pid_with_disk_and_tap_in_their_buckets() {
    require_root();
    let g = GuestJson::from_env().unwrap();
    let dir = scratch("qemu-lab");
    let (bridge, tap, port) = ("c490labbr", "c490lab0", 5557u16);
    let _bridge = RootLink::add(bridge, &format!("ip link add {bridge} type bridge"));
    RootLink::sh(&format!(
        "ip addr add 10.97.0.1/24 dev {bridge} && ip link set {bridge} up"
    ));
    let _tap = RootLink::add(tap, &format!("ip tuntap add dev {tap} mode tap"));
    RootLink::sh(&format!("ip link set {tap} master {bridge} up"));
    let (mut sink, sink_out) = cis490_tests::guest::start_sink(
        std::process::Command::new(bin("cis490-workload")),
        &dir,
        port,
    );
    warm_page_cache(&g);

    // The lab's QEMU, started first.
    let phases = [4u64, 8, 2];
    let send = 1_000_000u64;
    let disk = dir.join("disk.img");
    create_disk(&disk, 64).unwrap();
    let mut launch = g.launch(format!(
        "cis490.ip=10.97.0.2/24 cis490.wait_ms=3000 cis490.write_phases={} \
         cis490.phase_gap_ms=1500 cis490.send=10.97.0.1:{port}:{send} cis490.sleep_ms=1000",
        phases.map(|p| p.to_string()).join(",")
    ));
    launch.disk = Some(disk);
    launch.nic = Some(format!(
        "tap,ifname={tap},script=no,downscript=no,model=virtio-net-pci"
    ));
    let console = dir.join("console.log");
    launch.console = Some(console.clone());
    let qmp = dir.join("cis490-qmp.sock");
    launch.qmp = Some(qmp.clone());
    let mut qemu = cis490_tests::guest::qemu_command(&g.guest, &launch)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();

    // cis490, attached to it by pid.
    let trace = default_trace_cmd(&dir)
        .args(["--target-pid", &qemu.id().to_string()])
        .arg("--qmp")
        .arg(&qmp)
        .args(["--duration", "170"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let episode = {
        let t0 = std::time::Instant::now();
        loop {
            let eps = fs::read_dir(dir.join("data/episodes"));
            if let Some(e) = eps.into_iter().flatten().flatten().next() {
                break e.path();
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "no episode");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for_event(
        &episode,
        "tap_attached",
        |e| e["name"] == tap,
        Duration::from_secs(30),
    );
    // Frames into the tap once the guest's network is up (QEMU reads them
    // from then on), while it works.
    let t0 = std::time::Instant::now();
    while !fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("ip=10.97.0.2")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "the guest never set its address"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let frames_out = dir.join("frames.json");
    let frames = run_with_timeout(
        std::process::Command::new(bin("cis490-workload"))
            .args([
                "send-frames",
                "--ifname",
                tap,
                "--frames",
                "1500",
                "--size",
                "600",
            ])
            .args(["--interval-us", "3000", "--out"])
            .arg(&frames_out),
        Duration::from_secs(60),
    );
    assert!(
        frames.status.success(),
        "{}",
        String::from_utf8_lossy(&frames.stderr)
    );
    let out = wait_output(trace, Duration::from_secs(200));
    let _ = qemu.wait();
    assert!(sink.wait().unwrap().success());
    let ep = Episode::from_output(&out);
    let guest = guest_said(&g, &console);
    for (i, mb) in phases.iter().enumerate() {
        assert_eq!(
            guest
                .get(&format!("phase{i}_write_bytes"))
                .map(String::as_str),
            Some(&*(mb * MIB).to_string()),
            "the guest's phase {i}"
        );
    }
    assert_eq!(
        report(&sink_out)["bytes"].as_u64(),
        Some(send),
        "the peer got every byte"
    );
    assert_eq!(ep.meta["end_reason"], "target_exited");

    // Disk: three runs, in the buckets where the guest wrote.
    let series = |source: &str, f: &dyn Fn(&serde_json::Value) -> Option<u64>| -> Vec<u64> {
        ep.rows(source).iter().map(|r| f(r).unwrap_or(0)).collect()
    };
    let ebpf_w = series("ebpf", &|r| r["blk_write_bytes"].as_u64());
    let qmp_w = series("qmp", &|r| {
        r["blk_by_dev"]["virtio0"]["write_bytes"].as_u64()
    });
    let (ebpf_runs, qmp_runs) = (runs(&ebpf_w, 5), runs(&qmp_w, 5));
    eprintln!("write runs (first bucket, bytes): ebpf {ebpf_runs:?}, QMP {qmp_runs:?}");
    let big = |r: &[(usize, u64)]| -> Vec<(usize, u64)> {
        r.iter().copied().filter(|&(_, b)| b >= MIB).collect()
    };
    let ebpf_big = big(&ebpf_runs);
    assert_eq!(
        ebpf_big.len(),
        phases.len(),
        "eBPF write runs {ebpf_runs:?}"
    );
    let qmp_big = big(&qmp_runs);
    assert_eq!(qmp_runs, qmp_big, "QMP: writes outside the guest's phases");
    assert_eq!(qmp_big.len(), phases.len(), "QMP write runs {qmp_runs:?}");
    for (i, mb) in phases.iter().enumerate() {
        let want = mb * MIB;
        let (e, q) = (ebpf_big[i], qmp_big[i]);
        assert!(
            e.1 >= want && e.1 <= want + 64 * 1024,
            "phase {i}: eBPF {} bytes from bucket {} vs the guest's {want}",
            e.1,
            e.0
        );
        assert_eq!(q.1, want, "phase {i}: QMP from bucket {}", q.0);
        assert!(
            e.0.abs_diff(q.0) <= 1,
            "phase {i}: eBPF from bucket {}, QMP from {}",
            e.0,
            q.0
        );
    }
    let other: u64 = ebpf_runs.iter().filter(|r| r.1 < MIB).map(|r| r.1).sum();
    assert!(
        other <= 64 * 1024,
        "eBPF writes outside the phases: {other}"
    );

    // Tap: bucket by bucket as the tun counters count.
    let sent = report(&frames_out)["frames_sent"].as_u64().unwrap();
    for field in ["rx_packets", "tx_packets", "rx_bytes", "tx_bytes"] {
        let e = series("ebpf", &|r| r["net_by_if"][tap][field].as_u64());
        let p = series("proc", &|r| r["net_by_if"][tap][field].as_u64());
        let frame = if field.ends_with("bytes") { 1514 } else { 1 };
        let (mut ce, mut cp, mut worst) = (0i64, 0i64, 0i64);
        for (a, b) in e.iter().zip(&p) {
            ce += *a as i64;
            cp += *b as i64;
            worst = worst.max((ce - cp).abs());
        }
        eprintln!(
            "tap {field}: ebpf {ce}, tun counters {cp}; at most {worst} apart at a bucket's end; \
             at most {} in a bucket",
            e.iter().max().unwrap_or(&0)
        );
        assert!(
            worst <= 8 * frame,
            "tap {field}: eBPF and the tun counters {worst} apart at a bucket's end"
        );
        assert_eq!(ce, cp, "tap {field} in total: eBPF vs the tun counters");
        if field == "rx_packets" {
            assert!(
                ce as u64 >= sent,
                "rx {ce} frames of the {sent} sent into the tap"
            );
        }
    }
    assert_check_passes(&ep.dir);
}
