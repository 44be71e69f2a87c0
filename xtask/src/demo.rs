//! `cargo xtask demo`: trace a real QEMU guest doing disk and network work
//! (the bundled default), or, where QEMU cannot be had, the bundled
//! scheduler workload; then print the episode's per-source summary and
//! write its report page (`cis490 report`).

use std::{
    ffi::OsString,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use cis490_tests::{
    Netns,
    guest::{GuestJson, console_values, create_disk, qemu_argv},
};

use crate::{guest, run};

const TAP: &str = "c490demo0";
/// The bridge the tap is on: the gateway source's interface.
const BRIDGE: &str = "c490demobr";
/// The guest NIC's address, on QEMU's command line (`mac=`), so the gateway
/// source knows the guest's frames.
const GUEST_MAC: &str = "52:54:00:99:00:02";
const SEND_BYTES: u64 = 8_000_000;
const DISK_MB: u64 = 64;

/// Runs `cis490 trace ARGS`, returns the episode directory.
fn trace(bin: &Path, data_dir: &Path, extra: &[OsString], argv: &[OsString]) -> Result<String> {
    let out = Command::new(bin.join("cis490"))
        .arg("trace")
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .arg("--")
        .args(argv)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cis490")?;
    if !out.status.success() {
        bail!("cis490 trace failed");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(stdout
        .lines()
        .last()
        .context("cis490 printed no episode path")?
        .trim()
        .to_owned())
}

pub fn run_demo(bin: &Path, data_dir: &Path) -> Result<()> {
    let episode = match guest::prepare() {
        Ok((g, accel, _)) => qemu(
            bin,
            data_dir,
            &GuestJson {
                guest: g,
                accel: accel.to_owned(),
            },
        )?,
        Err(e) => {
            eprintln!("demo: no QEMU guest here ({e:#}); tracing the bundled workload instead");
            eprintln!("demo: tracing cis490-workload demo (about 3 s)...");
            trace(
                bin,
                data_dir,
                &[],
                &[bin.join("cis490-workload").into(), "demo".into()],
            )?
        }
    };
    println!("episode: {episode}");
    run(Command::new(bin.join("cis490"))
        .arg("summary")
        .arg(&episode))?;
    // The page of the episode (its path is the last line cis490 prints).
    let out = Command::new(bin.join("cis490"))
        .arg("report")
        .arg(&episode)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cis490 report")?;
    if !out.status.success() {
        bail!("cis490 report failed");
    }
    let page = String::from_utf8_lossy(&out.stdout);
    println!(
        "report: {} (open it in a browser: one self-contained file)",
        page.lines().last().unwrap_or("?").trim()
    );
    Ok(())
}

/// The guest writes and reads 64 MiB on its virtio disk (direct I/O,
/// `cache=none`) and sends 8 MB over TCP through a tap to a peer, both in a
/// network namespace made for the demo. QEMU serves QMP and the guest
/// agent's virtio-serial port, and the demo asks for perf's per-thread
/// counters too (not a default source), so the episode holds every
/// host-side source (ebpf, proc, perf, qmp), the guest's own view (guest,
/// from the agent its init starts), the gateway's rows (the tap is on a
/// bridge, as in the lab) and the guest's phase labels.
fn qemu(bin: &Path, data_dir: &Path, g: &GuestJson) -> Result<String> {
    let ns = Netns::new("demo");
    // The lab's shape: the guest's tap on a bridge whose own address is
    // the guest's peer (the gateway), watched by the gateway source.
    ns.ip(&["link", "add", BRIDGE, "type", "bridge"]);
    ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap"]);
    for dev in [BRIDGE, TAP] {
        ns.sh(&format!("sysctl -q -w net.ipv6.conf.{dev}.disable_ipv6=1"));
    }
    ns.ip(&["link", "set", TAP, "master", BRIDGE]);
    ns.ip(&["addr", "add", "10.99.0.1/24", "dev", BRIDGE]);
    ns.ip(&["link", "set", BRIDGE, "up"]);
    ns.ip(&["link", "set", TAP, "up"]);
    let work = guest::cache_dir().join("demo");
    fs::create_dir_all(&work)?;
    let sink_out = work.join("sink.json");
    let _ = fs::remove_file(sink_out.with_extension("json.ready"));
    let mut sink = ns
        .cmd(&bin.join("cis490-workload"))
        .args(["sink", "--port", "5555", "--timeout-ms", "300000", "--out"])
        .arg(&sink_out)
        .spawn()
        .context("cannot start the network peer")?;
    cis490_tests::wait_for_file(
        &sink_out.with_extension("json.ready"),
        std::time::Duration::from_secs(30),
    );

    let disk = work.join("disk.img");
    create_disk(&disk, 2 * DISK_MB as usize)?;
    let console = work.join("console.log");
    let _ = fs::remove_file(&console);
    let mut launch = g.launch(format!(
        "cis490.ip=10.99.0.2/24 cis490.disk_write_mb={DISK_MB} cis490.disk_read_mb={DISK_MB} \
         cis490.send=10.99.0.1:5555:{SEND_BYTES} cis490.sleep_ms=1000"
    ));
    launch.disk = Some(disk.clone());
    launch.nic = Some(format!(
        "tap,ifname={TAP},script=no,downscript=no,model=virtio-net-pci,mac={GUEST_MAC}"
    ));
    launch.console = Some(console.clone());
    let qmp = work.join("qmp.sock");
    let _ = fs::remove_file(&qmp);
    launch.qmp = Some(qmp.clone());
    // The guest agent's virtio-serial port: the inside view (guest source).
    let agent = work.join("agent.sock");
    let _ = fs::remove_file(&agent);
    launch.agent = Some(agent.clone());
    let mut argv: Vec<OsString> = ["ip", "netns", "exec", &ns.0].map(OsString::from).to_vec();
    argv.extend(qemu_argv(&g.guest, &launch));
    eprintln!(
        "demo: tracing a QEMU guest ({}, {}): {DISK_MB} MiB written and read on its disk, {SEND_BYTES} bytes sent over its tap",
        g.guest.kernel_version, g.accel
    );
    let control = work.join("control.sock");
    let _ = fs::remove_file(&control);
    let phases = mark_phases(console.clone(), control.clone());
    let episode = trace(
        bin,
        data_dir,
        &[
            "--sources".into(),
            "ebpf,proc,perf".into(),
            "--qmp".into(),
            qmp.into(),
            "--guest-agent".into(),
            agent.into(),
            "--control".into(),
            control.into(),
            "--label".into(),
            "boot@0".into(),
            "--gateway-if".into(),
            BRIDGE.into(),
            "--gateway-netns".into(),
            ns.0.clone().into(),
        ],
        &argv,
    );
    let marked = phases.join().unwrap_or_default();
    println!("phases marked live over the control socket: {marked:?}");
    let _ = sink.kill();
    let _ = sink.wait();
    let _ = fs::remove_file(&disk);
    let episode = episode?;
    let said = console_values(&fs::read_to_string(&console).unwrap_or_default());
    println!("guest reported (ground truth): {said:?}");
    if let Ok(text) = fs::read_to_string(&sink_out)
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
    {
        println!("the peer received {} bytes", v["bytes"]);
    }
    Ok(episode)
}

/// Marks phases live, as an orchestrator would: watches the guest's console
/// and sends `label NAME` on the tracer's control socket when the guest
/// says it booted (`workload`) and when it is done (`teardown`). Returns
/// the labels the tracer acknowledged.
fn mark_phases(console: PathBuf, control: PathBuf) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut marked = Vec::new();
        for (line, label) in [
            ("cis490-guest: booted", "workload"),
            ("cis490-guest: done", "teardown"),
        ] {
            while !fs::read_to_string(&console).is_ok_and(|c| c.contains(line)) {
                if Instant::now() > deadline {
                    return marked;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let Ok(mut s) = UnixStream::connect(&control) else {
                return marked;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reply = String::new();
            if writeln!(s, "label {label}").is_ok()
                && BufReader::new(&s).read_line(&mut reply).is_ok()
                && reply.starts_with("ok")
            {
                marked.push(label.to_owned());
            }
        }
        marked
    })
}
