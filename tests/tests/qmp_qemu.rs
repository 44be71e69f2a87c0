//! The QMP source against a real QEMU (`qemu-system-x86_64` under TCG):
//! block statistics, query-stats and quit with no guest; QEMU killed; and a
//! booted guest's disk I/O counted exactly. They start QEMU, so they live
//! here rather than among cis490's unit tests (which only talk to a fake QMP
//! server).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant as StdInstant},
};

use cis490::{
    row::{BlkCounters, Measures},
    sources::qmp::{
        QmpInfo, QmpSource,
        client::{QmpClient, QmpError, QmpEvent},
    },
};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(5);

// ---- Against a real QEMU ------------------------------------------------

/// Set to skip the tests that run `qemu-system-x86_64`.
const SKIP_ENV: &str = "CIS490_SKIP_QEMU_TESTS";
/// The QEMU binary (default: `qemu-system-x86_64` on PATH).
const QEMU_ENV: &str = "CIS490_QEMU";

struct Qemu {
    child: Child,
    dir: tempfile::TempDir,
}

impl Qemu {
    /// QEMU with `-machine q35 -accel tcg -nodefaults`, a QMP socket
    /// for the source (`qmp.sock`) and one for the test (`ctl.sock`),
    /// and `extra` arguments; `None` if the skip variable is set.
    fn spawn(extra: &[&str], dir: tempfile::TempDir) -> Option<Qemu> {
        if std::env::var_os(SKIP_ENV).is_some() {
            eprintln!("{SKIP_ENV} set: skipping a QEMU test");
            return None;
        }
        let bin = std::env::var(QEMU_ENV).unwrap_or_else(|_| "qemu-system-x86_64".into());
        let qmp = |name: &str| {
            format!(
                "unix:{},server=on,wait=off",
                dir.path().join(name).display()
            )
        };
        let log = fs::File::create(dir.path().join("qemu.log")).unwrap();
        let child = Command::new(&bin)
            .args([
                "-machine",
                "q35",
                "-accel",
                "tcg",
                "-display",
                "none",
                "-nodefaults",
            ])
            .args(["-qmp", &qmp("qmp.sock"), "-qmp", &qmp("ctl.sock")])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {bin}: {e} (set {SKIP_ENV}=1 to skip the QEMU tests, or {QEMU_ENV})"
                )
            });
        Some(Qemu { child, dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.path("qemu.log")).unwrap_or_default()
    }

    /// Waits for a QMP socket to appear (QEMU creates it at start-up).
    async fn socket(&mut self, name: &str) -> PathBuf {
        let p = self.path(name);
        let t0 = StdInstant::now();
        while !p.exists() {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("QEMU exited ({st}) before creating {name}:\n{}", self.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no {name} after 20 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
    }

    /// Waits up to `limit` for QEMU to exit.
    async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let t0 = StdInstant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(t0.elapsed() < limit, "QEMU still running after {limit:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A zero-filled raw image of `mib` MiB in `dir`.
fn raw_image(dir: &Path, mib: usize) -> PathBuf {
    let p = dir.join("disk.img");
    fs::write(&p, vec![0u8; mib << 20]).unwrap();
    p
}

fn drive(img: &Path) -> String {
    format!("file={},format=raw,if=virtio", img.display())
}

/// Samples until the source says closed; returns the rows and the
/// longest sample() call.
async fn sample_until_closed(s: &mut QmpSource, limit: Duration) -> (Vec<Measures>, Duration) {
    let t0 = StdInstant::now();
    let (mut rows, mut longest) = (Vec::new(), Duration::ZERO);
    while !s.info().closed {
        assert!(
            t0.elapsed() < limit,
            "the source did not see QEMU close within {limit:?}"
        );
        let t = StdInstant::now();
        rows.push(s.sample(Duration::from_secs(2)).await);
        longest = longest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (rows, longest)
}

#[tokio::test]
async fn real_qemu_blockstats_query_stats_and_quit() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), 8);
    let Some(mut q) = Qemu::spawn(&["-m", "128", "-drive", &drive(&img)], dir) else {
        return;
    };
    let sock = q.socket("qmp.sock").await;
    let ctl_sock = q.socket("ctl.sock").await;
    let mut s = QmpSource::connect(&sock, T).await.unwrap();
    let mut ctl = QmpClient::connect(&ctl_sock, T).await.unwrap();

    // What this QEMU says, for the record.
    let version = ctl.version().clone();
    let stats = ctl
        .execute("query-stats", Some(json!({"target": "vcpu"})), T)
        .await;
    let kvm = ctl.execute("query-kvm", None, T).await.unwrap();
    let raw = ctl.execute("query-blockstats", None, T).await.unwrap();
    eprintln!("QEMU {version}; query-kvm {kvm}; query-stats vcpu -> {stats:?}");
    assert_eq!(kvm["enabled"], false, "this test runs QEMU under TCG");
    let info = s.info();
    eprintln!("{info:?}");
    assert_eq!(info.qemu_version, Some(version.to_string()));
    assert_eq!(info.blockstats, "ok");
    if version.at_least(7, 1) {
        // 7.1+: query-stats exists; TCG gives no vCPU statistics.
        assert_eq!(stats.unwrap(), json!([]), "query-stats under TCG");
        assert!(info.vcpu_stats.contains("TCG"), "{}", info.vcpu_stats);
    } else {
        assert!(
            matches!(stats, Err(QmpError::Command { ref class, .. }) if class == "CommandNotFound"),
            "{stats:?}"
        );
        assert!(
            info.vcpu_stats.contains("before 7.1"),
            "{}",
            info.vcpu_stats
        );
    }
    let names: Vec<&str> = raw
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["virtio0"], "{raw}");

    let t = StdInstant::now();
    let m = s.sample(T).await;
    let took = t.elapsed();
    eprintln!("a sample took {took:?}: {:?}", m.blk_by_dev);
    assert!(
        m.blk_by_dev.as_ref().unwrap().contains_key("virtio0"),
        "{m:?}"
    );
    assert!(m.blk_read_bytes.is_some() && m.blk_write_bytes.is_some());
    assert_eq!(
        (m.kvm_exits, m.net_tx_bytes, m.net_rx_bytes),
        (None, None, None)
    );
    assert_eq!(s.info().errors, 0);

    // quit: QEMU says SHUTDOWN, answers, closes both sockets, exits.
    match ctl.execute("quit", None, T).await {
        Ok(_) | Err(QmpError::Closed) => {}
        Err(e) => panic!("quit: {e}"),
    }
    let (rows, longest) = sample_until_closed(&mut s, Duration::from_secs(10)).await;
    eprintln!(
        "{} samples until closed, the longest {longest:?}",
        rows.len()
    );
    assert!(longest < Duration::from_secs(2), "{longest:?}");
    assert_eq!(
        rows.last().unwrap(),
        &Measures::default(),
        "the bucket that saw the close"
    );
    assert_eq!(s.sample(T).await, Measures::default());
    let info = s.info();
    assert!(info.closed);
    assert_eq!(info.errors, 0, "{info:?}");
    let ev = s.take_events();
    eprintln!("events: {ev:?}");
    let shutdown = ev
        .iter()
        .find(|e| e.event == "SHUTDOWN")
        .expect("SHUTDOWN kept");
    assert_eq!(shutdown.data["reason"], "host-qmp-quit");
    assert!(q.wait_exit(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn real_qemu_killed_is_an_unannounced_close() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), 1);
    let Some(mut q) = Qemu::spawn(&["-m", "128", "-drive", &drive(&img)], dir) else {
        return;
    };
    let sock = q.socket("qmp.sock").await;
    let mut s = QmpSource::connect(&sock, T).await.unwrap();
    assert!(s.sample(T).await.blk_by_dev.is_some());
    q.child.kill().unwrap();
    q.child.wait().unwrap();
    let t = StdInstant::now();
    assert_eq!(s.sample(T).await, Measures::default());
    assert!(t.elapsed() < Duration::from_secs(1));
    let info = s.info();
    assert!(info.closed);
    assert_eq!(info.errors, 1, "no SHUTDOWN before the close");
    assert!(s.take_events().iter().all(|e| e.event != "SHUTDOWN"));
}

/// The project's test guest (`cargo xtask guest`): `CIS490_GUEST_JSON`,
/// else `$HOME/.cache/cis490/guest/guest.json`.
fn guest_json() -> Value {
    let path = std::env::var_os("CIS490_GUEST_JSON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/cis490/guest/guest.json")
        });
    let text = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (build the guest with `cargo xtask guest`)",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap()
}

/// What one boot of the test guest showed through a `QmpSource`.
struct GuestRun {
    /// `virtio0` growth from connect to the close.
    total: BlkCounters,
    /// The same up to the first sample after the console said `booted`.
    at_booted: Option<BlkCounters>,
    console: String,
    info: QmpInfo,
    events: Vec<QmpEvent>,
}

/// Boots the test guest with `params` and a 64 MiB disk, samples it
/// until QEMU closes the socket (the guest powers off); `None` if the
/// QEMU tests are skipped.
async fn boot_guest(params: &str) -> Option<GuestRun> {
    let g = guest_json();
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), 64);
    let console = dir.path().join("console.log");
    let serial = format!("file:{}", console.display());
    let append = format!("console=ttyS0 panic=-1 quiet {params}");
    let args = [
        "-m",
        "256",
        "-no-reboot",
        "-serial",
        &serial,
        "-kernel",
        g["kernel"].as_str().unwrap(),
        "-initrd",
        g["initrd"].as_str().unwrap(),
        "-append",
        &append,
        "-drive",
        &drive(&img),
    ];
    let mut q = Qemu::spawn(&args, dir)?;
    let sock = q.socket("qmp.sock").await;
    let t0 = StdInstant::now();
    let mut s = QmpSource::connect(&sock, T).await.unwrap();
    let (mut total, mut at_booted, mut booted_after) = (BlkCounters::default(), None, None);
    let mut longest = Duration::ZERO;
    while !s.info().closed {
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "the guest did not power off"
        );
        // Console first: a sample taken after `booted` is seen includes
        // everything up to it.
        let booted = at_booted.is_none()
            && fs::read_to_string(&console)
                .unwrap_or_default()
                .contains("cis490-guest: booted");
        let t = StdInstant::now();
        let m = s.sample(Duration::from_secs(2)).await;
        longest = longest.max(t.elapsed());
        if let Some(d) = m.blk_by_dev.as_ref().and_then(|b| b.get("virtio0")) {
            total.read_bytes += d.read_bytes;
            total.write_bytes += d.write_bytes;
            total.read_ops += d.read_ops;
            total.write_ops += d.write_ops;
        }
        if booted {
            at_booted = Some(total);
            booted_after = Some(t0.elapsed());
        }
        // The guest's disk work takes well under a second after
        // `booted`: watch the console closely until then.
        let pause = if at_booted.is_none() { 2 } else { 20 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    let run = GuestRun {
        total,
        at_booted,
        console: fs::read_to_string(&console).unwrap(),
        info: s.info(),
        events: s.take_events(),
    };
    eprintln!(
        "guest [{params}]: booted after {booted_after:?}, QEMU closed after {:?}; longest sample {longest:?}\n\
         virtio0 from connect to close: {:?}\nvirtio0 at `booted`: {:?}\n{:?}\nevents {:?}",
        t0.elapsed(),
        run.total,
        run.at_booted,
        run.info,
        run.events
    );
    assert!(q.wait_exit(Duration::from_secs(10)).await.success());
    assert_eq!(run.info.errors, 0, "{:?}", run.info);
    let shutdown = run
        .events
        .iter()
        .find(|e| e.event == "SHUTDOWN")
        .expect("the guest's SHUTDOWN");
    assert_eq!(shutdown.data["reason"], "guest-shutdown");
    Some(run)
}

/// The guest writes 4 MiB to /dev/vda then reads 4 MiB back (direct
/// I/O) and powers off: QMP's counters for the disk grow by exactly
/// that, and the source ends with the guest's SHUTDOWN. (Under TCG the
/// whole disk work takes about 100 ms after `booted`.)
#[tokio::test]
async fn real_guest_disk_io_is_counted_exactly() {
    const MIB4: u64 = 4 << 20;
    // The guest idles 500 ms before powering off: what QEMU counts
    // between the last sample and its exit cannot be asked for.
    let Some(run) =
        boot_guest("cis490.disk_write_mb=4 cis490.disk_read_mb=4 cis490.sleep_ms=500").await
    else {
        return;
    };
    assert!(
        run.console
            .contains("cis490-guest: disk_write_bytes=4194304")
            && run
                .console
                .contains("cis490-guest: disk_read_bytes=4194304"),
        "{}",
        run.console
    );
    // Only the dd writes: the whole run's writes are exactly 4 MiB.
    assert_eq!(run.total.write_bytes, MIB4, "{:?}", run.total);
    // Reads: the firmware's and the kernel's partition scan (before
    // `booted`), then the dd's 4 MiB, which starts after the writes end.
    let boot_reads = match run.at_booted {
        Some(b) if b.write_bytes < MIB4 => b.read_bytes,
        raced => {
            // The writes ended before the sample at `booted`: measure
            // the boot's reads in a boot without the workload.
            eprintln!("the sample at `booted` came late ({raced:?}): a reference boot");
            boot_guest("cis490.sleep_ms=500")
                .await
                .unwrap()
                .total
                .read_bytes
        }
    };
    assert_eq!(
        run.total.read_bytes - boot_reads,
        MIB4,
        "{:?} - boot reads {boot_reads}",
        run.total
    );
}

// ---- The QMP socket must be the target's ---------------------------------

/// Another process's QMP socket (here: a QEMU the tracer does not trace)
/// is refused with one line naming both pids, and no done.marker: its rows
/// would be that VM's, not the target's.
#[tokio::test(flavor = "current_thread")]
async fn another_processs_qmp_socket_is_refused() {
    cis490_tests::require_root();
    let Some(mut q) = Qemu::spawn(&["-m", "64"], tempfile::tempdir().unwrap()) else {
        return;
    };
    let sock = q.socket("qmp.sock").await;
    let dir = cis490_tests::scratch("qmp-other");
    let out = cis490_tests::run_with_timeout(
        cis490_tests::default_trace_cmd(&dir)
            .arg("--qmp")
            .arg(&sock)
            .args(["--duration", "5", "--", "sleep", "10"]),
        Duration::from_secs(60),
    );
    let line = cis490_tests::one_line_error_after_start(&out, &dir.join("data"));
    let qemu = q.child.id();
    assert!(
        line.contains(&format!("served by pid {qemu}, not by the traced pid")),
        "{line}"
    );
}

/// A target that wraps QEMU (a shell that started it): the error names
/// QEMU's pid, to trace it instead.
#[tokio::test(flavor = "current_thread")]
async fn a_wrapper_of_qemu_is_named_with_qemus_pid() {
    cis490_tests::require_root();
    if std::env::var_os(SKIP_ENV).is_some() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("qmp.sock");
    let bin = std::env::var(QEMU_ENV).unwrap_or_else(|_| "qemu-system-x86_64".into());
    // The shell stays QEMU's parent (it has more to do after QEMU).
    let mut shell = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{bin} -machine q35 -accel tcg -display none -nodefaults -m 64 \
             -qmp unix:{},server=on,wait=off; echo exited",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = StdInstant::now();
    while !sock.exists() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir = cis490_tests::scratch("qmp-wrapper");
    let out = cis490_tests::run_with_timeout(
        cis490_tests::default_trace_cmd(&dir)
            .args(["--target-pid", &shell.id().to_string(), "--qmp"])
            .arg(&sock)
            .args(["--duration", "5"]),
        Duration::from_secs(60),
    );
    let _ = Command::new("pkill")
        .args(["-P", &shell.id().to_string()])
        .status();
    let _ = shell.kill();
    let _ = shell.wait();
    let line = cis490_tests::one_line_error_after_start(&out, &dir.join("data"));
    assert!(
        line.contains(&format!("a child of the traced pid {}", shell.id()))
            && line.contains("the target is a wrapper of QEMU; trace QEMU itself (--target-pid "),
        "{line}"
    );
}

/// A QMP socket another client holds (the lab's orchestration, or a second
/// tracer): QEMU serves one client per socket, so cis490's connection is
/// refused at once (EAGAIN); the message says why and what to do (a `-qmp`
/// socket of cis490's own), its cause once, and the episode's QMP rows are
/// null with `check` failing it, as for any QMP source that never connected.
#[tokio::test(flavor = "current_thread")]
async fn a_qmp_socket_another_client_holds_is_said_busy_with_the_remedy() {
    cis490_tests::require_root();
    let Some(mut q) = Qemu::spawn(&["-m", "64"], tempfile::tempdir().unwrap()) else {
        return;
    };
    let sock = q.socket("qmp.sock").await;
    // The other client: connected, greeted, holding the socket.
    let mut holder = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    holder.set_read_timeout(Some(T)).unwrap();
    let mut greeting = [0u8; 256];
    let n = std::io::Read::read(&mut holder, &mut greeting).unwrap();
    assert!(
        String::from_utf8_lossy(&greeting[..n]).contains("\"QMP\""),
        "no QMP greeting"
    );
    let dir = cis490_tests::scratch("qmp-busy");
    let out = cis490_tests::run_with_timeout(
        cis490_tests::default_trace_cmd(&dir)
            .args(["--target-pid", &q.child.id().to_string(), "--qmp"])
            .arg(&sock)
            .args(["--duration", "2"]),
        Duration::from_secs(60),
    );
    drop(holder);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("the socket is busy"))
        .collect();
    assert!(!said.is_empty(), "busy never said:\n{stderr}");
    eprintln!("said: {}", said[0]);
    assert!(
        said[0].contains("give cis490 a -qmp socket of its own, QEMU accepts several"),
        "{}",
        said[0]
    );
    assert_eq!(
        said[0].matches("Resource temporarily unavailable").count(),
        1,
        "the cause not once: {}",
        said[0]
    );
    let ep = cis490_tests::Episode::from_output(&out);
    assert!(ep.is_done());
    assert!(
        ep.rows("qmp")
            .iter()
            .all(|r| r["blk_write_bytes"].is_null())
    );
    cis490_tests::assert_check_fails_qmp_never_connected(&ep.dir);
}
