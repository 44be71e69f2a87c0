//! The guest agent in a real QEMU guest (Debian kernel, busybox initramfs
//! with `/bin/cis490-agent` started by its init, built by `cargo xtask
//! guest`): the guest writes N bytes to its disk, sends M bytes over its NIC
//! and starts K processes. The guest source's totals match the guest's own
//! counters (bytes exactly, the K processes listed) and the host-side
//! sources of the same episode within stated tolerances.

use std::{fs, time::Duration};

use cis490_tests::{
    guest::{GuestJson, GuestNet, console_values, create_disk},
    *,
};

const MIB: u64 = 1 << 20;

fn sum_if(ep: &Episode, source: &str, path: &[&str]) -> u64 {
    ep.rows(source)
        .iter()
        .filter_map(|r| path.iter().fold(r, |v, k| &v[*k]).as_u64())
        .sum()
}

#[test]
fn the_guest_source_matches_the_guests_own_counters_and_the_host() {
    require_root();
    let g = GuestJson::from_env().unwrap();
    let dir = scratch("guest-agent");
    let tap = "c490ga0";
    let mut net = GuestNet::start(&dir, "ga", tap, 98, 5556);
    let disk = dir.join("disk.img");
    create_disk(&disk, 32).unwrap();
    let (write_mb, send, procs) = (8u64, 1_000_000u64, 4usize);
    // wait_ms: the agent's first lines go out before the workload starts.
    let mut launch = g.launch(format!(
        "{} cis490.wait_ms=3000 cis490.procs={procs} cis490.disk_write_mb={write_mb} \
         cis490.sleep_ms=2000",
        net.params(send)
    ));
    launch.disk = Some(disk.clone());
    let (console, qmp) = net.wire(&mut launch, &dir);
    let agent = dir.join("agent.sock");
    launch.agent = Some(agent.clone());
    let argv = net.argv(&g.guest, &launch);
    let out = run_with_timeout(
        trace_cmd(&dir)
            .arg("--qmp")
            .arg(&qmp)
            .arg("--guest-agent")
            .arg(&agent)
            .args(["--duration", "170", "--"])
            .args(&argv),
        Duration::from_secs(200),
    );
    let ep = Episode::from_output(&out);
    assert!(net.sink.wait().unwrap().success());
    let console = fs::read_to_string(&console).unwrap();
    let said = console_values(&console);
    eprintln!("accel {}; guest said {said:?}", g.accel);
    assert!(
        !said.contains_key("error"),
        "the guest failed a step:\n{console}"
    );
    let num = |k: &str| -> u64 {
        said.get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("the guest did not report {k}:\n{console}"))
    };
    assert_eq!(num("disk_write_bytes"), write_mb * MIB);
    assert_eq!(num("net_sent_bytes"), send);
    let disk_truth = num("vda_write_bytes_after") - num("vda_write_bytes_before");
    let tx_truth = num("eth0_tx_bytes_after") - num("eth0_tx_bytes_before");
    assert_eq!(
        disk_truth,
        write_mb * MIB,
        "the guest wrote only the dd's bytes"
    );

    let rows = ep.rows("guest");
    assert_eq!(rows.len(), ep.rows("ebpf").len());
    assert!(rows.iter().all(|r| r["available_in_deployment"] == true));
    let lines = ep.sum("guest", "guest_lines");
    eprintln!(
        "guest source: {lines} lines in {} buckets, {} bad, {} skipped",
        rows.len(),
        ep.sum("guest", "guest_bad_lines"),
        ep.sum("guest", "guest_skipped_lines")
    );
    assert!(lines >= 20, "{lines} agent lines");
    assert_eq!(ep.sum("guest", "guest_bad_lines"), 0);
    assert_eq!(ep.sum("guest", "guest_skipped_lines"), 0);
    // Before the guest booted, no line: null, not zero.
    assert!(rows[0]["guest_cpu_user_ns"].is_null() && rows[0]["guest_procs"].is_null());

    // Ground truth: the guest's own block and interface counters around the
    // workload, exactly (the agent reads the same counters; nothing else
    // writes to vda or, with IPv6 off, sends on eth0 outside the workload).
    let gdisk = ep.sum("guest", "guest_disk_write_bytes");
    let gtx = ep.sum("guest", "guest_net_tx_bytes");
    eprintln!(
        "guest source: disk write {gdisk}, net tx {gtx}; guest truth {disk_truth}, {tx_truth}"
    );
    assert_eq!(gdisk, disk_truth);
    assert_eq!(gtx, tx_truth);

    // The K processes, listed with their pids.
    let pids: Vec<u64> = said["proc_pids"]
        .split(',')
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), procs);
    for pid in &pids {
        assert!(
            ep.events_named("guest_exec")
                .any(|e| e["pid"] == *pid && e["comm"] == "sleep"),
            "no guest_exec of sleep pid {pid}; the guest_exec events of {pids:?}: {:?}",
            ep.events_named("guest_exec")
                .filter(|e| e["pid"].as_u64().is_some_and(|p| pids.contains(&p)))
                .collect::<Vec<_>>()
        );
    }
    assert!(ep.sum("guest", "guest_execs") >= procs as u64);
    assert!(ep.max("guest", "guest_procs") > procs as u64);
    assert!(ep.max("guest", "guest_mem_used_bytes") > 0);
    assert!(ep.sum("guest", "guest_cpu_user_ns") + ep.sum("guest", "guest_cpu_system_ns") > 0);

    // Against the host-side sources of the same episode. Disk: QEMU counts
    // the guest's requests to virtio0 (QMP): the same bytes, within 64 KiB.
    let qmp_w = sum_if(&ep, "qmp", &["blk_by_dev", "virtio0", "write_bytes"]);
    eprintln!("QMP virtio0 write bytes {qmp_w}");
    assert!(
        gdisk.abs_diff(qmp_w) <= 65536,
        "guest {gdisk} vs QMP {qmp_w}"
    );
    // Network: the frames the guest sent are what QEMU wrote to the tap
    // (eBPF's tap counters from the target's side): within two full frames
    // (3028 bytes; the tap also counts from before the agent's first line).
    let tap_tx = sum_if(&ep, "ebpf", &["net_by_if", tap, "tx_bytes"]);
    eprintln!("eBPF tap tx bytes {tap_tx}");
    assert!(gtx.abs_diff(tap_tx) <= 3028, "guest {gtx} vs tap {tap_tx}");
    assert_eq!(ep.meta["guest_agent"]["connections"], 1);
    assert_check_passes(&ep.dir);
}
