//! `cis490-agent`: runs in the guest (started by its init), writes one JSON
//! line per interval to `/dev/virtio-ports/cis490.guest.agent` and reads
//! the interval from the host's lines on the same port. Without a host (the
//! port absent, or nobody connected on the host side) it keeps sampling and
//! counts the lines it could not write.

use std::{
    fs::{File, OpenOptions},
    io::{ErrorKind, Read as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use cis490_agent::{
    collect::Collector,
    protocol::{
        DEFAULT_INTERVAL_MS, HostLine, MAX_INTERVAL_MS, MAX_LINE_BYTES, MIN_INTERVAL_MS, PORT_NAME,
    },
};

const USAGE: &str = "usage: cis490-agent [--port PATH|-] [--interval-ms N] [--count N]

Writes one JSON line per interval (docs/agent-protocol.md) with the guest's
CPU time, memory, processes, network, disk and TCP counters.

  --port PATH       where to write (default /dev/virtio-ports/cis490.guest.agent;
                    - is stdout)
  --interval-ms N   until the host sends one (default 1000; 50..60000)
  --count N         stop after N lines (default: run forever)

Examples:
  cis490-agent                       # in the guest, started by its init
  cis490-agent --port - --count 1    # one line on stdout";

struct Args {
    port: Option<PathBuf>,
    interval_ms: u64,
    count: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        port: Some(Path::new("/dev/virtio-ports").join(PORT_NAME)),
        interval_ms: DEFAULT_INTERVAL_MS,
        count: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--port" => {
                let v = value()?;
                args.port = (v != "-").then(|| PathBuf::from(v));
            }
            "--interval-ms" => {
                let v = value()?;
                args.interval_ms = v
                    .parse()
                    .ok()
                    .filter(|n| (MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(n))
                    .ok_or(format!(
                        "--interval-ms {v}: give {MIN_INTERVAL_MS}..{MAX_INTERVAL_MS}"
                    ))?;
            }
            "--count" => {
                let v = value()?;
                args.count = Some(
                    v.parse()
                        .map_err(|_| format!("--count {v}: not a number"))?,
                );
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            _ => return Err(format!("unknown argument {a}\n{USAGE}")),
        }
    }
    Ok(args)
}

/// The port, opened without blocking: a write with no host connected
/// fails at once (EAGAIN) instead of stalling the agent. Without udev (a
/// busybox initramfs) there is no `/dev/virtio-ports/NAME` link: the port
/// is then found by its name in `/sys/class/virtio-ports/*/name`.
fn open_port(path: &Path) -> Option<File> {
    let open = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
            .ok()
    };
    if let Some(f) = open(path) {
        return Some(f);
    }
    let name = path.file_name()?;
    std::fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_to_string(e.path().join("name"))
                .is_ok_and(|n| n.trim_end() == name.to_string_lossy())
        })
        .and_then(|e| open(&Path::new("/dev").join(e.file_name())))
}

/// Reads what the host wrote (without blocking) and returns its last
/// valid interval. `pending` holds a partial line, at most MAX_LINE_BYTES.
fn read_host(port: &mut File, pending: &mut Vec<u8>) -> Option<u64> {
    let mut buf = [0u8; 4096];
    let mut interval = None;
    loop {
        match port.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                for &b in &buf[..n] {
                    if b == b'\n' {
                        if let Ok(h) = serde_json::from_slice::<HostLine>(pending) {
                            interval = Some(h.interval_ms.clamp(MIN_INTERVAL_MS, MAX_INTERVAL_MS));
                        }
                        pending.clear();
                    } else if pending.len() < MAX_LINE_BYTES {
                        pending.push(b);
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    interval
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let mut collector = Collector::new(Path::new("/proc"), Path::new("/sys/block"));
    let mut interval = Duration::from_millis(args.interval_ms);
    let mut port: Option<File> = None;
    let mut host_pending = Vec::new();
    let mut next = Instant::now();
    let mut written = 0u64;
    loop {
        if let Some(path) = &args.port {
            if port.is_none() {
                port = open_port(path);
            }
            if let Some(p) = &mut port
                && let Some(ms) = read_host(p, &mut host_pending)
            {
                interval = Duration::from_millis(ms);
            }
        }
        let line = collector.collect();
        let mut text = serde_json::to_vec(&line).expect("an AgentLine serializes");
        text.push(b'\n');
        let ok = match &args.port {
            None => std::io::stdout().write_all(&text).is_ok(),
            // One write: the port takes a line below its buffer size whole
            // or not at all (EAGAIN when no host is connected).
            Some(_) => match &mut port {
                Some(p) => match p.write(&text) {
                    Ok(n) => n == text.len(),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => false,
                    Err(_) => {
                        // The port went away (device removed): reopen later.
                        port = None;
                        false
                    }
                },
                None => false,
            },
        };
        if ok {
            collector.written();
        } else {
            collector.unsent();
        }
        written += 1;
        if args.count.is_some_and(|c| written >= c) {
            break;
        }
        next += interval;
        let now = Instant::now();
        if next < now {
            // Late (a stalled guest): start the grid again from now.
            next = now;
        }
        std::thread::sleep(next - now);
    }
}
