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

/// The requests in the eBPF rows' latency histograms, all rows.
fn latencies_counted(ep: &Episode) -> u64 {
    ep.rows("ebpf")
        .iter()
        .flat_map(|row| {
            row["blk_latency_hist_log2"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
        })
        .sum()
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
    let (mut wl, out_json) = dio_workload(
        &dir,
        &["--write-mb", "32", "--read-mb", "16", "--scattered"],
    );
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
    // What the kernel's I/O accounting says the target wrote, from both
    // vantages: its threads' own (eBPF) and /proc/PID/io (the oracle).
    let (iw, pw, pr) = (
        ep.sum("ebpf", "io_write_bytes"),
        ep.sum("proc", "io_write_bytes"),
        ep.sum("proc", "blk_read_bytes"),
    );
    eprintln!("io_write_bytes: ebpf {iw}, /proc/PID/io (the oracle) {pw}; the oracle read {pr}");
    // Direct writes are accounted as they are issued: the same bytes
    // (the report written after the truth's last reading: a page or two).
    assert!(
        iw >= io("write_bytes") && iw <= io("write_bytes") + 65536,
        "io_write_bytes {iw} vs /proc/self/io {}",
        io("write_bytes")
    );
    assert!(
        iw.abs_diff(pw) <= 65536,
        "io_write_bytes ebpf {iw} vs /proc/PID/io {pw}"
    );
    assert!(
        ep.rows("proc")
            .iter()
            .all(|row| row["blk_write_bytes"].is_null())
    );
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
            ew.abs_diff(iw) <= 65536,
            "blk_write_bytes {ew} vs io_write_bytes {iw}"
        );
    } else {
        assert!(ew >= w && ew <= w + slack, "blk_write_bytes {ew} vs {w}");
        assert!(er >= r && er <= r + slack, "blk_read_bytes {er} vs {r}");
        assert!(
            ew.abs_diff(iw) <= slack && er.abs_diff(pr) <= slack,
            "blk_write_bytes {ew} vs io_write_bytes {iw}; blk_read_bytes ebpf {er} vs /proc {pr}"
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
    let hist = latencies_counted(&ep);
    let missed = ep.meta["ebpf"]["block_missed_completions"]
        .as_u64()
        .unwrap();
    // Why a completion can be missed: the kernel skips a program run that
    // would nest on its own CPU, and counts it per program.
    let nested = &ep.meta["ebpf"]["recursion_misses"];
    eprintln!("missed completions {missed}; programs' skipped nested runs {nested}");
    assert!(
        nested["block_rq_complete"].is_u64() && nested["block_rq_issue"].is_u64(),
        "{nested}"
    );
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

/// Buffered writes: the target dirties pages that the kernel's flusher
/// threads write back later, in their own context. `io_write_bytes` counts
/// them where the target dirtied them (eBPF: each of its threads'
/// `ioac.write_bytes`, read at every boundary; the oracle: `/proc/PID/io`),
/// while `blk_write_bytes` (requests the target issues) holds only its
/// direct writes. The truth is the workload's own `/proc/self/io` around
/// its writes and its clock around the buffered ones.
#[test]
fn buffered_writes_count_in_io_write_bytes_where_they_are_dirtied() {
    require_root();
    let dir = scratch("buffered");
    let (buffered, direct) = (48 * MIB, 8 * MIB);
    let (mut wl, out_json) = dio_workload(
        &dir,
        &[
            "--buffered-mb",
            "48",
            "--buffered-pause-ms",
            "1500",
            "--write-mb",
            "8",
            "--read-mb",
            "0",
        ],
    );
    let pid = wl.id() as i32;
    let trace = start_trace(
        &dir,
        &["--target-pid", &pid.to_string(), "--interval-ms", "50"],
    );
    kill(pid, libc::SIGUSR1);
    assert!(wl.wait().unwrap().success());
    let ep = Episode::from_output(&wait_output(trace, T));
    let truth = report(&out_json);
    let io = |k: &str| {
        truth["proc_io_after"][k].as_u64().unwrap() - truth["proc_io_before"][k].as_u64().unwrap()
    };
    let accounted = io("write_bytes");
    eprintln!(
        "/proc/self/io write_bytes grew by {accounted}: {buffered} buffered + {direct} direct"
    );
    // A metadata block or so of the workload's own on top (as in the direct
    // test: at most 64 KiB).
    assert!(
        (buffered + direct..=buffered + direct + 65536).contains(&accounted),
        "{truth}"
    );

    // Totals. After its second reading of /proc/self/io the workload writes
    // its report (a page or two, dirtied): in the episode, not in the truth.
    let ei = ep.sum("ebpf", "io_write_bytes");
    let pi = ep.sum("proc", "io_write_bytes");
    eprintln!("io_write_bytes: ebpf {ei}, /proc {pi}");
    assert!(
        (accounted..=accounted + 65536).contains(&ei),
        "ebpf io_write_bytes {ei} vs the workload's {accounted}"
    );
    assert!(pi.abs_diff(ei) <= 65536, "/proc {pi} vs ebpf {ei}");
    // The flusher's writeback of the 48 MiB is not the target's requests:
    // its own are the direct writes and their metadata.
    let ew = ep.sum("ebpf", "blk_write_bytes");
    eprintln!("blk_write_bytes: ebpf {ew}");
    assert!(
        (direct..=direct + 65536).contains(&ew),
        "ebpf blk_write_bytes {ew} vs the {direct} B written directly"
    );
    // The oracle's /proc/PID/io write_bytes is accounting, not requests.
    assert!(
        ep.rows("proc")
            .iter()
            .all(|r| r["blk_write_bytes"].is_null())
    );

    // Per bucket: the buffered bytes are in the rows whose buckets overlap
    // the workload's buffered writes (plus one bucket: a row is stamped
    // just before its counters are read), and the rows of the pause after
    // them hold none.
    let (start, end) = (
        truth["buffered_start_mono_ns"].as_u64().unwrap(),
        truth["buffered_end_mono_ns"].as_u64().unwrap(),
    );
    let interval = 50_000_000;
    let span = |r: &serde_json::Value| {
        let t = r["t_mono_ns"].as_u64().unwrap();
        (t - r["interval_ns"].as_u64().unwrap(), t)
    };
    let rows = ep.rows("ebpf");
    let during: u64 = rows
        .iter()
        .filter(|r| {
            let (a, b) = span(r);
            b > start && a <= end + interval
        })
        .map(|r| r["io_write_bytes"].as_u64().unwrap())
        .sum();
    let pause: Vec<u64> = rows
        .iter()
        .filter(|r| {
            let (a, b) = span(r);
            a > end + interval && b < end + 1_200_000_000
        })
        .map(|r| r["io_write_bytes"].as_u64().unwrap())
        .collect();
    eprintln!(
        "buffered writes over {} ms: {during} B in their buckets; the pause's {} rows: {pause:?}",
        (end - start) / 1_000_000,
        pause.len()
    );
    assert!(
        (buffered..=buffered + 65536).contains(&during),
        "{during} B in the buffered writes' buckets for {buffered}"
    );
    assert!(
        pause.len() >= 10 && pause.iter().all(|&b| b == 0),
        "{pause:?}"
    );
    assert_check_passes(&episode_dir(&dir));
}

/// A request whose completion the probes never got (the kernel skips a
/// program that would run nested on its own CPU, for one) is found by the
/// reader's scan of `REQS` and counted in a row about two seconds after its
/// issue, not at the episode's end (it was before: 3 s later, at QEMU's
/// exit, in one run of issue 20's). The test plays that request: it adds
/// an issued 1 MiB write of the target's that never completes to the
/// running tracer's own `REQS` map (the kernel's map, as the probes would
/// have left it), issued 2.5 s before.
#[test]
fn a_request_never_seen_completing_is_counted_within_seconds() {
    require_root();
    let dir = scratch("missed-completion");
    let trace = start_trace(&dir, &["--", "sleep", "6"]);
    let tracer = trace.id() as i32;
    let held = bpf::held_by(tracer);
    let maps = bpf::objects().maps;
    let find = |name: &str| {
        let ids: Vec<u32> = maps
            .iter()
            .filter(|(id, n)| n.as_str() == name && held.maps.contains(id))
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(ids.len(), 1, "the tracer's {name} maps: {ids:?}");
        aya::maps::MapData::from_id(ids[0]).unwrap()
    };
    let targets: aya::maps::HashMap<_, u32, u32> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(find("TARGETS"))).unwrap();
    let slots: Vec<u32> = targets.iter().map(|e| e.unwrap().1).collect();
    assert_eq!(slots.len(), 1, "one target: {slots:?}");
    let mut reqs: aya::maps::HashMap<_, u64, [u8; 48]> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(find("REQS"))).unwrap();
    // `ReqStart`: ts_ns, done_bytes, issued_bytes, bio (u64); op, issued,
    // slot, reserved (u32). Key: an address no request has.
    let issued_at = mono_now_ns() - 2_500_000_000;
    let mut v = Vec::with_capacity(48);
    for x in [issued_at, 0, MIB, 0] {
        v.extend_from_slice(&x.to_ne_bytes());
    }
    for x in [cis490_common::block::REQ_OP_WRITE, 1, slots[0], 0] {
        v.extend_from_slice(&x.to_ne_bytes());
    }
    let injected = mono_now_ns();
    reqs.insert(0x1000u64, <[u8; 48]>::try_from(v).unwrap(), 0)
        .unwrap();
    let ep = Episode::from_output(&wait_output(trace, T));

    let rows = ep.rows("ebpf");
    let with: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["blk_write_bytes"].as_u64() != Some(0))
        .collect();
    eprintln!(
        "{} rows; with writes: {:?}",
        rows.len(),
        with.iter().map(|r| &r["seq"]).collect::<Vec<_>>()
    );
    assert_eq!(with.len(), 1, "one row has the request");
    let row = with[0];
    assert_eq!(row["blk_write_bytes"], MIB);
    assert_eq!(row["blk_write_ops"], 1);
    // No latency is known for it: not in the histogram.
    let hist: u64 = row["blk_latency_hist_log2"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(hist, 0, "{row}");
    assert_eq!(ep.meta["ebpf"]["block_missed_completions"], 1);
    // Counted at the reader's next scan (every 250 ms), in the bucket it
    // ends: at most the scan period and a bucket (100 ms) after the
    // injection, plus a bucket of slack for a late boundary.
    let end = row["t_mono_ns"].as_u64().unwrap();
    let after_ms = end.saturating_sub(injected) / 1_000_000;
    eprintln!("counted in the bucket ending {after_ms} ms after the injection");
    assert!(
        end > injected && after_ms <= 450,
        "counted {after_ms} ms after the injection"
    );
    assert!(
        rows.last().unwrap()["t_mono_ns"].as_u64().unwrap() > end + 3_000_000_000,
        "not at the episode's end"
    );
}

/// A target that reaps a child gets the child's whole lifetime of I/O
/// added to its `/proc/PID/io` at that moment (the kernel folds it in).
/// The /proc oracle's I/O fields are `null` in that bucket (with the count
/// in `meta.json`), not the child's 16 MiB; the eBPF rows count the
/// target's own threads only; `check` passes. (Before: the oracle put the
/// 16 MiB in the bucket of the reaping and `check` failed on it.)
#[test]
fn a_childs_io_folded_in_at_reaping_is_kept_out_of_the_proc_rows() {
    require_root();
    let dir = scratch("reaped-child");
    let script = format!(
        "dd if=/dev/zero of={} bs=1M count=16 oflag=direct 2>/dev/null; sleep 0.5",
        dir.join("child.bin").display()
    );
    let out = run_with_timeout(trace_cmd(&dir).args(["--", "sh", "-c", &script]), T);
    let ep = Episode::from_output(&out);
    let proc_rows = ep.rows("proc");
    let nulls = proc_rows
        .iter()
        .filter(|r| r["io_write_bytes"].is_null() && !r["cpu_ns"].is_null())
        .count() as u64;
    let reaped = ep.meta["proc"]["children_reaped_buckets"].as_u64().unwrap();
    let (ei, pi) = (
        ep.sum("ebpf", "io_write_bytes"),
        ep.sum("proc", "io_write_bytes"),
    );
    eprintln!("io_write_bytes: ebpf {ei}, /proc {pi}; {nulls} /proc rows null, meta says {reaped}");
    assert!(
        reaped >= 1 && nulls == reaped,
        "{nulls} null rows, {reaped} in meta"
    );
    assert!(
        proc_rows
            .iter()
            .all(|r| r["blk_read_bytes"].is_null() == r["io_write_bytes"].is_null())
    );
    // The shell writes nothing itself.
    assert!(ei < 65536 && pi < 65536, "ebpf {ei}, /proc {pi}");
    assert_check_passes(&ep.dir);
}

/// A loop device of the test's own over a sparse file, detached when
/// dropped: a whole block device nothing else writes, so its
/// `/sys/block/loopN/stat` counts the target's requests alone.
struct LoopDev {
    dev: std::fs::File,
    path: String,
    sys: std::path::PathBuf,
}

/// The unified cgroup hierarchy's mount point, when the memory and io
/// controllers are on it (a cgroup can then be charged writeback).
fn unified_with_memory_and_io() -> Option<std::path::PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mnt = mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(std::path::PathBuf::from))?
    })?;
    let controllers = std::fs::read_to_string(mnt.join("cgroup.controllers")).ok()?;
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    (has("memory") && has("io")).then_some(mnt)
}

/// Bytes written by the cgroup at `dir`, over every device (`io.stat`'s
/// `wbytes`: the kernel's own count of the write bios charged to it).
fn cgroup_wbytes(dir: &std::path::Path) -> u64 {
    std::fs::read_to_string(dir.join("io.stat"))
        .unwrap()
        .split_whitespace()
        .filter_map(|kv| kv.strip_prefix("wbytes="))
        .map(|v| v.parse::<u64>().unwrap())
        .sum()
}

/// The flusher's writeback of the pages a target dirtied is the target's
/// when the target has a cgroup (v2) of its own with the memory and io
/// controllers: the kernel charges those bios to that cgroup. A process
/// alone in a new cgroup writes 16 MiB through the page cache and pauses
/// 4 s; meanwhile the test (outside the cgroup) runs `sync`, so the
/// flusher writes them. eBPF's `blk_write_bytes` = the cgroup's own
/// `io.stat` `wbytes` growth (± 64 KiB), at least the 16 MiB, all in the
/// buckets up to the end of the `sync` (one bucket of slack). Where the
/// controllers are not on cgroup v2 (this host: cgroup v1), `meta.json`
/// says why no cgroup is used, and the writeback is not counted (the
/// process's own requests: under 64 KiB).
#[test]
fn writeback_charged_to_the_targets_own_cgroup_counts_as_its_writes() {
    require_root();
    let dir = scratch("wb-cgroup");
    let (mut wl, out_json) = dio_workload(
        &dir,
        &[
            "--buffered-mb",
            "16",
            "--buffered-pause-ms",
            "4000",
            "--write-mb",
            "0",
            "--read-mb",
            "0",
        ],
    );
    let pid = wl.id();
    let cgroup = unified_with_memory_and_io().map(|mnt| {
        std::fs::write(mnt.join("cgroup.subtree_control"), "+memory +io").unwrap();
        let name = format!("cis490-wb-{pid}");
        let dir = mnt.join(&name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        (format!("/{name}"), dir)
    });
    eprintln!("the target's own cgroup: {cgroup:?}");
    let before = cgroup.as_ref().map(|(_, d)| cgroup_wbytes(d));
    let trace = start_trace(
        &dir,
        &["--target-pid", &pid.to_string(), "--interval-ms", "100"],
    );
    kill(pid as i32, libc::SIGUSR1);
    // Once its 16 MiB are dirtied (its own accounting), the flusher writes
    // them back for `sync`, in the process's pause.
    let deadline = std::time::Instant::now() + T;
    while proc_io_write_bytes(pid) < 16 * MIB {
        assert!(
            std::time::Instant::now() < deadline,
            "the writes never came"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("sync").status().unwrap().success());
    let synced = mono_now_ns();
    assert!(wl.wait().unwrap().success());
    let ep = Episode::from_output(&wait_output(trace, T));
    let truth = report(&out_json);
    assert!(
        truth["buffered_end_mono_ns"].as_u64().unwrap() + 4_000_000_000 > synced,
        "the sync ended after the process's pause (so its writeback may be after the last row): {truth}"
    );
    let written = ep.sum("ebpf", "blk_write_bytes");
    let info = &ep.meta["ebpf"];
    match (&cgroup, before) {
        (Some((path, cg_dir)), Some(before)) => {
            let charged = cgroup_wbytes(cg_dir) - before;
            eprintln!("blk_write_bytes: ebpf {written}, the cgroup's io.stat wbytes {charged}");
            assert_eq!(info["block_cgroup"], path.as_str(), "{info}");
            assert!(charged >= 16 * MIB, "io.stat wbytes grew by {charged}");
            assert!(
                written.abs_diff(charged) <= 65536,
                "ebpf blk_write_bytes {written} vs the cgroup's {charged}"
            );
            let by_sync: u64 = ep
                .rows("ebpf")
                .iter()
                .filter(|r| r["t_mono_ns"].as_u64().unwrap() <= synced + 100_000_000)
                .map(|r| r["blk_write_bytes"].as_u64().unwrap_or(0))
                .sum();
            assert!(
                by_sync >= 16 * MIB,
                "only {by_sync} B of the writeback in the buckets up to the sync's end"
            );
            let _ = std::fs::remove_dir(cg_dir);
        }
        _ => {
            eprintln!("blk_write_bytes: ebpf {written}; {info}");
            assert!(info["block_cgroup"].is_null(), "{info}");
            let note = info["block_cgroup_note"].as_str().unwrap();
            assert!(note.contains("cgroup"), "{note}");
            assert!(
                written <= 65536,
                "ebpf blk_write_bytes {written}: the writeback counted without a cgroup"
            );
        }
    }
    assert_check_passes(&ep.dir);
}

/// `write_bytes` of `/proc/PID/io`.
fn proc_io_write_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes: "))
        .map_or(0, |v| v.trim().parse().unwrap())
}

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

impl LoopDev {
    fn new(backing: &std::path::Path, bytes: u64) -> LoopDev {
        use std::os::fd::AsRawFd;
        let rw = |p: &str| std::fs::OpenOptions::new().read(true).write(true).open(p);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(backing)
            .unwrap();
        file.set_len(bytes).unwrap();
        let ctl = rw("/dev/loop-control").expect("open /dev/loop-control");
        for _ in 0..20 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument.
            let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
            assert!(
                n >= 0,
                "LOOP_CTL_GET_FREE: {}",
                std::io::Error::last_os_error()
            );
            let path = format!("/dev/loop{n}");
            let Ok(dev) = rw(&path) else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            // SAFETY: LOOP_SET_FD takes the backing file's fd.
            if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD, file.as_raw_fd()) } == 0 {
                let sys = std::path::PathBuf::from(format!("/sys/block/loop{n}"));
                return LoopDev { dev, path, sys };
            }
            // Taken meanwhile (EBUSY): ask again.
        }
        panic!("no free loop device");
    }

    /// `/sys/block/loopN/stat`, every field.
    fn stat(&self) -> Vec<u64> {
        std::fs::read_to_string(self.sys.join("stat"))
            .unwrap()
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: LOOP_CLR_FD takes no argument.
        unsafe { libc::ioctl(self.dev.as_raw_fd(), LOOP_CLR_FD, 0) };
    }
}

/// Requests the I/O scheduler merges, and requests the block probes do not
/// count (flushes, discards) between those they do, at the same request
/// addresses: four threads write 16 MiB of a loop device of the test's own
/// in interleaved 4 KiB pieces (neighbours in flight at once, for
/// mq-deadline to merge), each with an fdatasync every 64 pieces, while a
/// fifth discards 16 MiB beside them 256 KiB at a time, over and over; then
/// 4 MiB are read back. Nothing else writes that device, so its own
/// `/sys/block/loopN/stat` is the truth for every request: the target's
/// written bytes and write requests exactly, its read bytes exactly (the
/// workload's own count), and no flush or discard in either. Before the
/// fix, a request merged into another stayed in the probes' request table,
/// and a flush or discard that later took its address was counted as that
/// request (`block_rq_merge` now drops it; a request that is not a read or
/// write drops any entry at its address).
fn merges_flushes_and_discards(block_probes: &str, expected_path: &str) {
    require_root();
    let dir = scratch(&format!("blkdev-{block_probes}"));
    let lo = LoopDev::new(&dir.join("disk.img"), 40 * MIB);
    let set = std::fs::write(lo.sys.join("queue/scheduler"), "mq-deadline");
    let sched = std::fs::read_to_string(lo.sys.join("queue/scheduler")).unwrap();
    assert!(
        set.is_ok() && sched.contains("[mq-deadline]"),
        "{}: cannot select mq-deadline ({set:?}): {sched}",
        lo.path
    );
    let discard_max: u64 = std::fs::read_to_string(lo.sys.join("queue/discard_max_bytes"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let discard_mb = if discard_max > 0 { "16" } else { "0" };
    let out = dir.join("blkdev.json");
    let mut wl = Command::new(bin("cis490-workload"))
        .args(["blkdev", "--device", &lo.path, "--threads", "4"])
        .args(["--write-mb", "16", "--chunk-kb", "4", "--fsync-every", "64"])
        .args([
            "--discard-mb",
            discard_mb,
            "--discard-kb",
            "256",
            "--read-mb",
            "4",
        ])
        .arg("--wait-signal")
        .arg("--out")
        .arg(&out)
        .spawn()
        .unwrap();
    wait_for_file(&out.with_extension("json.ready"), T);
    let pid = wl.id() as i32;
    let before = lo.stat();
    let trace = start_trace(
        &dir,
        &[
            "--target-pid",
            &pid.to_string(),
            "--block-probes",
            block_probes,
        ],
    );
    kill(pid, libc::SIGUSR1);
    assert!(wl.wait().unwrap().success());
    let ep = Episode::from_output(&wait_output(trace, T));
    let after = lo.stat();
    drop(lo);
    let d = |i: usize| after[i] - before[i];
    let truth = report(&out);
    assert_eq!(family(&ep, "block")["path"], expected_path);
    let t = |k: &str| truth[k].as_u64().unwrap();
    let (ew, wo, er, ro) = (
        ep.sum("ebpf", "blk_write_bytes"),
        ep.sum("ebpf", "blk_write_ops"),
        ep.sum("ebpf", "blk_read_bytes"),
        ep.sum("ebpf", "blk_read_ops"),
    );
    let merged = &ep.meta["ebpf"]["block_requests_merged"];
    let missed = ep.meta["ebpf"]["block_missed_completions"]
        .as_u64()
        .unwrap();
    eprintln!(
        "{block_probes}: the workload: {truth}\n\
         the device: {} writes ({} merged), {} B written; {} reads ({} merged), {} B read; \
         {} discards, {} B; {} flushes\n\
         ebpf: {wo} writes, {ew} B; {ro} reads, {er} B; {merged} merged away; \
         {missed} missed completions",
        d(4),
        d(5),
        d(6) * 512,
        d(0),
        d(1),
        d(2) * 512,
        d(11),
        d(13) * 512,
        d(15)
    );
    assert_eq!(t("write_bytes"), 16 * MIB);
    assert_eq!(d(6) * 512, t("write_bytes"), "the device's own count");
    assert_eq!(ew, t("write_bytes"), "blk_write_bytes");
    // The device counts the empty write that carries each fdatasync's
    // flush as a write request (where it has a write cache: it flushes);
    // the rows count requests with data only, on either path.
    let empty = if d(15) > 0 { t("fsyncs") } else { 0 };
    assert_eq!(
        wo + empty,
        d(4),
        "blk_write_ops + the {empty} fdatasyncs' empty writes against the device's writes"
    );
    assert_eq!(er, t("read_bytes"), "blk_read_bytes");
    assert!(
        ro <= d(0) && er <= d(2) * 512,
        "reads: {ro} requests, {er} B, against the device's {} and {} B",
        d(0),
        d(2) * 512
    );
    assert!(t("fsyncs") > 0 && d(15) > 0, "no flush: {truth}");
    if discard_max > 0 {
        assert!(t("discards") >= 64 && d(11) > 0, "no discard: {truth}");
    }
    let hist = latencies_counted(&ep);
    assert!(
        missed <= 2 && hist + missed == wo + ro,
        "{hist} latencies for {} requests, {missed} missed completions",
        wo + ro
    );
    assert!(
        merged.as_u64().is_some_and(|m| m <= d(1) + d(5)),
        "{merged} merged away, more than the device's {} merges",
        d(1) + d(5)
    );
    assert_check_passes(&ep.dir);
}

#[test]
fn merges_flushes_and_discards_through_block_io_start_and_done() {
    if !kernel_has_tracepoint("block_io_start") {
        eprintln!("this kernel has no block_io_start: the block_rq test covers it");
        return;
    }
    merges_flushes_and_discards("io", "block_io");
}

#[test]
fn merges_flushes_and_discards_through_the_older_block_rq_tracepoints() {
    merges_flushes_and_discards("rq", "block_rq");
}
