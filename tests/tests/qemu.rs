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
    let console = fs::read_to_string(&console).unwrap();
    let guest = console_values(&console);
    eprintln!("accel {}; guest said {guest:?}", g.accel);
    assert!(
        !guest.contains_key("error"),
        "the guest failed a step:\n{console}"
    );
    (ep, guest)
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
