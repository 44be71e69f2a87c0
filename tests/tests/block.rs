//! Block I/O against ground truth: O_DIRECT writes and reads of known size
//! by the target, with another process doing direct I/O at the same time.

use std::{process::Command, time::Duration};

use cis490_tests::*;

const MIB: u64 = 1 << 20;

/// The largest block request of the device that holds `path`.
fn max_request_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).unwrap().dev();
    let sys = format!("/sys/dev/block/{}:{}", libc::major(dev), libc::minor(dev));
    // A partition's queue is its disk's.
    let kb = ["queue/max_sectors_kb", "../queue/max_sectors_kb"]
        .iter()
        .find_map(|q| std::fs::read_to_string(format!("{sys}/{q}")).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(4096);
    kb * 1024
}
const T: Duration = Duration::from_secs(90);

/// The whole disk that holds `path` (`/sys/dev/block/MAJ:MIN`, a
/// partition's parent): its `stat` counts every request of the device.
fn disk_sysfs(path: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).unwrap().dev();
    let sys = std::fs::canonicalize(format!(
        "/sys/dev/block/{}:{}",
        libc::major(dev),
        libc::minor(dev)
    ))
    .unwrap();
    if sys.join("partition").exists() {
        sys.parent().unwrap().to_path_buf()
    } else {
        sys
    }
}

/// `/sys/block/DEV/stat`: (reads completed, sectors read, writes
/// completed, sectors written), in the kernel's own count of the device.
fn disk_stat(disk: &std::path::Path) -> [u64; 4] {
    let text = std::fs::read_to_string(disk.join("stat")).unwrap();
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    [f[0], f[2], f[4], f[6]]
}

/// The target writes 32 MiB and reads 16 MiB with O_DIRECT (its file was
/// preallocated before tracing, so no filesystem metadata I/O is due) while
/// an untraced process does 24 + 24 MiB of its own. The target's 1 MiB
/// calls are each 256 pages no two of which are physically adjacent
/// (`--scattered`), so on a disk that takes fewer segments per request
/// (virtio-blk: 254) every call's bio is split: the front, a new bio, must
/// count as the target's too (on the `block_rq` path it never passes
/// `block_bio_queue`; without an I/O scheduler nothing else attributed it,
/// and only 8 KiB of each call was counted). Whether a contiguous buffer's
/// calls split depends on the memory they got. Requests are held to
/// the workload's own calls and the disk's `/sys/block/DEV/stat`, and each
/// must have its latency in the histogram (no missed completion natively).
fn direct_io(block_probes: &str, expected_path: &str) {
    require_root();
    let dir = scratch(&format!("dio-{block_probes}"));
    let out_json = dir.join("dio.json");
    let mut wl = Command::new(bin("cis490-workload"))
        .args([
            "dio",
            "--write-mb",
            "32",
            "--read-mb",
            "16",
            "--wait-signal",
            "--linger-ms",
            "250",
            "--scattered",
            "--file",
        ])
        .arg(dir.join("target.bin"))
        .arg("--out")
        .arg(&out_json)
        .spawn()
        .unwrap();
    wait_for_file(&out_json.with_extension("json.ready"), T);
    let pid = wl.id() as i32;
    let disk = disk_sysfs(&dir);
    let stat_before = disk_stat(&disk);
    let trace = start_trace(
        &dir,
        &[
            "--target-pid",
            &pid.to_string(),
            "--block-probes",
            block_probes,
        ],
    );
    let mut noise = Command::new(bin("cis490-workload"))
        .args(["dio", "--write-mb", "24", "--read-mb", "24", "--file"])
        .arg(dir.join("noise.bin"))
        .arg("--out")
        .arg(dir.join("noise.json"))
        .spawn()
        .unwrap();
    kill(pid, libc::SIGUSR1);
    assert!(wl.wait().unwrap().success());
    assert!(noise.wait().unwrap().success());
    let ep = Episode::from_output(&wait_output(trace, T));
    let stat_after = disk_stat(&disk);
    let truth = report(&out_json);
    let family = ep.meta["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["family"] == "block")
        .unwrap();
    assert_eq!(family["path"], expected_path, "{family}");
    assert_eq!(family["active"], true);

    let (w, r) = (
        truth["write_bytes"].as_u64().unwrap(),
        truth["read_bytes"].as_u64().unwrap(),
    );
    assert_eq!((w, r), (32 * MIB, 16 * MIB));
    let io = |k: &str| {
        truth["proc_io_after"][k].as_u64().unwrap() - truth["proc_io_before"][k].as_u64().unwrap()
    };
    // What the kernel accounted to the process in /proc/PID/io: the direct
    // I/O (and at times one 4 KiB metadata block of its own).
    assert!(
        io("write_bytes") >= w && io("write_bytes") <= w + 65536,
        "{truth}"
    );
    assert_eq!(io("read_bytes"), r);

    // One request of slack: the block layer may merge a neighbour's I/O into
    // one of the target's requests (or the target's into the neighbour's),
    // and a request is attributed whole. The largest request is the device's
    // max_sectors_kb (4 MiB here).
    let slack = max_request_bytes(&dir);
    eprintln!("one request of slack: {slack} bytes");
    let (ew, er) = (
        ep.sum("ebpf", "blk_write_bytes"),
        ep.sum("ebpf", "blk_read_bytes"),
    );
    eprintln!("ebpf wrote {ew} read {er}; truth {w} {r}; the noise did 48 MiB more of each");
    let (pw, pr) = (
        ep.sum("proc", "blk_write_bytes"),
        ep.sum("proc", "blk_read_bytes"),
    );
    eprintln!("/proc/PID/io (the oracle) wrote {pw} read {pr}");
    if expected_path == "block_io" {
        // block_io_start fires as the target submits, before any merge:
        // reads exactly, writes + the filesystem's metadata block(s) of
        // the file (4 KiB here; up to 64 KiB allowed, as for /proc/PID/io
        // above); the oracle's /proc/PID/io reads the same, and writes the
        // same give or take that metadata (seen: with and without it).
        assert_eq!(er, r, "blk_read_bytes");
        assert!(ew >= w && ew <= w + 65536, "blk_write_bytes {ew} vs {w}");
        assert_eq!(er, pr, "blk_read_bytes ebpf vs /proc/PID/io");
        assert!(
            ew.abs_diff(pw) <= 65536,
            "blk_write_bytes ebpf {ew} vs /proc/PID/io {pw}"
        );
    } else {
        assert!(ew >= w && ew <= w + slack, "blk_write_bytes {ew} vs {w}");
        assert!(er >= r && er <= r + slack, "blk_read_bytes {er} vs {r}");
        assert!(
            ew.abs_diff(pw) <= slack && er.abs_diff(pr) <= slack,
            "ebpf {ew}/{er} vs /proc {pw}/{pr}"
        );
    }

    // Requests against the workload's own calls (1 MiB each): each call is
    // at least one request, and at most as many as the device splits it
    // into (its max_sectors_kb and max_segments of 4 KiB pages), plus its
    // fdatasync's flush and a metadata write or two.
    let (wo, ro) = (
        ep.sum("ebpf", "blk_write_ops"),
        ep.sum("ebpf", "blk_read_ops"),
    );
    let (wc, rc, block) = (
        truth["write_calls"].as_u64().unwrap(),
        truth["read_calls"].as_u64().unwrap(),
        truth["block_bytes"].as_u64().unwrap(),
    );
    assert_eq!((wc, rc), (32, 16), "{truth}");
    let queue = |f: &str| -> u64 {
        std::fs::read_to_string(disk.join("queue").join(f))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let per_call = block
        .div_ceil(queue("max_sectors_kb") * 1024)
        .max(block.div_ceil(4096 * queue("max_segments")));
    eprintln!(
        "requests: {wo} writes for {wc} calls, {ro} reads for {rc} calls (at most {per_call} per call); \
         the whole disk: {:?} (reads, sectors read, writes, sectors written)",
        [0, 1, 2, 3].map(|i| stat_after[i] - stat_before[i])
    );
    assert!(
        (wc..=wc * per_call + 3).contains(&wo),
        "{wo} write requests for {wc} calls"
    );
    assert!(
        (rc..=rc * per_call).contains(&ro),
        "{ro} read requests for {rc} calls"
    );
    // The kernel's own count of the device's completed requests and
    // sectors (every process's: the noise's, the machine's) bounds the
    // target's from above.
    assert!(
        ro <= stat_after[0] - stat_before[0] && er <= (stat_after[1] - stat_before[1]) * 512,
        "target reads {ro} requests / {er} B vs the disk's {:?}",
        [stat_before, stat_after]
    );
    assert!(
        wo <= stat_after[2] - stat_before[2] && ew <= (stat_after[3] - stat_before[3]) * 512,
        "target writes {wo} requests / {ew} B vs the disk's {:?}",
        [stat_before, stat_after]
    );
    // Every request counted once in the latency histogram, at its
    // completion; a request whose completion the probe did not get is
    // counted when found, without a latency (`block_missed_completions`).
    // Usually none; seen here natively: 2 of 98 requests in one run of
    // about six (the block_io path, with the neighbour's I/O beside it).
    // At most 2 allowed: a tracer that missed completions wholesale fails.
    let hist: u64 = ep
        .rows("ebpf")
        .iter()
        .flat_map(|row| {
            row["blk_latency_hist_log2"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
        })
        .sum();
    let missed = ep.meta["ebpf"]["block_missed_completions"]
        .as_u64()
        .unwrap();
    let may_miss = 2;
    assert!(
        missed <= may_miss && hist + missed == wo + ro,
        "{hist} latencies for {} requests, {missed} missed completions (at most {may_miss})",
        wo + ro
    );
    let lat = ep.sum("ebpf", "blk_latency_ns_sum");
    let max = ep.max("ebpf", "blk_latency_max_ns");
    assert!(
        lat > 0 && max > 0 && max <= lat,
        "latency sum {lat}, max {max}"
    );
    // The oracle cannot see requests or latency.
    assert!(
        ep.rows("proc")
            .iter()
            .all(|row| row["blk_write_ops"].is_null() && row["blk_latency_max_ns"].is_null())
    );
}

#[test]
fn direct_io_through_block_io_start_and_done() {
    if kernel_has_tracepoint("block_io_start") && kernel_has_tracepoint("block_io_done") {
        direct_io("io", "block_io");
        return;
    }
    // Before Linux 6.5: asked for, the block_io path is refused with a note
    // and the block fields are null (not 0); by default the family falls
    // back to block_rq, which must then measure as exactly.
    eprintln!("this kernel has no block_io_start/block_io_done: checking the fallback");
    require_root();
    let dir = scratch("dio-io-missing");
    let ep = Episode::from_output(&run_with_timeout(
        trace_cmd(&dir).args(["--block-probes", "io", "--", "sleep", "0.3"]),
        T,
    ));
    let block = family(&ep, "block");
    assert_eq!(block["active"], false, "{block}");
    assert!(
        block["note"].as_str().unwrap().contains("block_io_start"),
        "{block}"
    );
    assert!(
        ep.rows("ebpf")
            .iter()
            .all(|r| r["blk_write_bytes"].is_null())
    );
    assert_eq!(ep.meta["status"], "complete");
    direct_io("auto", "block_rq");
}

#[test]
fn direct_io_through_the_older_block_rq_tracepoints() {
    direct_io("rq", "block_rq");
}
