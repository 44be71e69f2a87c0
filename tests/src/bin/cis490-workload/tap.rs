//! `tap`: Ethernet frames written into and read from a tap device.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::clock::clock_ns;
use crate::fdutil::{ioctl_result, poll_readable};
use crate::frames::{TAP_SRC_MAC, ethernet_frame, set_frame_seq};
use crate::report::{write_json_atomic, write_ready};
use crate::signals::{block_sigusr1, wait_for_sigusr1};

/// Create a tap device, write N Ethernet frames into it, then read frames the host sends.
///
/// Opens /dev/net/tun and creates tap NAME (IFF_TAP | IFF_NO_PI, not persistent) in the
/// process's own network namespace (choose it with `ip netns exec NS cis490-workload ...`).
/// The interface is not configured here: with --wait-signal, PATH.ready
/// ({"kind":"ready","pid","name"}) is written once the tap exists and the workload waits
/// for SIGUSR1 (at most --signal-timeout-ms) so the caller can bring it up (`ip link set
/// NAME up`) and start a tracer.
///
/// Then writes N frames of exactly S bytes into the tap fd (one write() each): dst
/// ff:ff:ff:ff:ff:ff, src 02:00:00:00:00:01, ethertype 0x88b5 (IEEE local experimental),
/// then the frame's index (u32, big-endian) and zero padding. The host receives these on
/// NAME: they count as rx_packets / rx_bytes in /sys/class/net/NAME/statistics (and are
/// then dropped, as no protocol handles 0x88b5). Writing to a tap that is down fails with
/// EIO, which is an error (exit code 2).
///
/// Then reads frames from the tap fd (poll() + read(), one frame per read) until M frames
/// were read or --timeout-ms passed. These are frames the host transmitted on NAME
/// (tx_packets / tx_bytes there), e.g. from `cis490-workload send-frames`, but also
/// anything the host's stack sends, such as IPv6 neighbour discovery and MLD when the
/// link comes up; frames_read_by_ethertype tells them apart (disable IPv6 on NAME to avoid
/// them).
///
/// Report: {"kind":"tap", "pid", "name" (as the kernel named it), "frame_size",
/// "frames_written", "bytes_written", "frames_read", "bytes_read",
/// "frames_read_by_ethertype":{"0x88b5":n,...}, "read_timed_out", "write_ns", "read_ns"}.
/// Then, after --linger-ms, the fd is closed and the tap disappears with the process.
#[derive(Args, Debug)]
pub struct TapArgs {
    /// Name of the tap device to create (at most 15 bytes; a "%d" in it lets the kernel pick
    /// a number, and the report gives the name it chose).
    #[arg(long, value_name = "NAME")]
    name: String,
    /// Number of frames to write into the tap (received by the host on NAME).
    #[arg(long, value_name = "N")]
    frames: u64,
    /// Size of each frame written, in bytes, Ethernet header included (no FCS).
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(60..=65535))]
    size: u64,
    /// Number of frames to read from the tap (sent by the host on NAME) after writing.
    #[arg(long, value_name = "M", default_value_t = 0)]
    read_frames: u64,
    /// Wait this long after writing before the first read: frames sent meanwhile wait in
    /// the tap's queue (and past its length, are dropped by it).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    read_after_ms: u64,
    /// Write PATH.ready once the tap exists and wait for SIGUSR1 before writing frames.
    #[arg(long)]
    wait_signal: bool,
    /// With --wait-signal: give up (error, exit code 2) if no SIGUSR1 arrives within this
    /// many ms; 0 waits forever.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    signal_timeout_ms: u64,
    /// Stop reading after this many ms (counted from the first read attempt) even if fewer
    /// than M frames arrived; the report then says "read_timed_out": true.
    #[arg(long, value_name = "T", default_value_t = 10_000)]
    timeout_ms: u64,
    /// After writing the report, keep the tap (fd open) this long before closing it and
    /// exiting, so the caller can read the interface's statistics once it sees the report.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    linger_ms: u64,
    /// Where to write the JSON report; the ready file is PATH.ready.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
    /// Create the tap in the network namespace at this path (e.g. /run/netns/NS) instead of
    /// the process's own: a thread that enters it opens /dev/net/tun (a tap lives where its
    /// /dev/net/tun was opened); the process stays where it is.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// After K of the N frames, wait --recreate-pause-ms, close the tap (the interface goes)
    /// and create it again under the same name (a new interface, as QEMU does on a NIC
    /// hot-plug), bring it up itself, and wait --recreate-pause-ms again before writing the
    /// rest.
    #[arg(long, value_name = "K")]
    recreate_at: Option<u64>,
    /// With --recreate-at: the wait before the old tap is closed and after the new one is up.
    #[arg(long, value_name = "MS", default_value_t = 800)]
    recreate_pause_ms: u64,
}

/// Runs `f` in a thread that entered the network namespace at `netns` (or in this thread
/// when `None`): what it opens stays bound to that namespace.
fn in_netns<T: Send + 'static>(
    netns: Option<&std::path::Path>,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let Some(path) = netns else {
        return f();
    };
    let ns = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    thread::spawn(move || {
        // SAFETY: setns on an open namespace fd, for this thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
}

/// Sets IFF_UP on interface `name` of the calling thread's network namespace; returns its
/// index.
fn bring_up(name: &str) -> Result<u32> {
    // SAFETY: socket() returns a new fd or -1.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: a new fd, owned from here on.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(s) };
    // SAFETY: an all-zero ifreq is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, c) in ifr.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *c as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS / SIOCGIFINDEX read the name and read or write the
    // union of `ifr`, a struct ifreq.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) };
    ioctl_result(rc, &format!("SIOCGIFFLAGS {name}"))?;
    // SAFETY: the kernel filled the flags member.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &mut ifr) };
    ioctl_result(rc, &format!("SIOCSIFFLAGS {name} up"))?;
    // SAFETY: as above.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX as _, &mut ifr) };
    ioctl_result(rc, &format!("SIOCGIFINDEX {name}"))?;
    // SAFETY: the kernel filled the index member.
    Ok(unsafe { ifr.ifr_ifru.ifru_ifindex } as u32)
}

/// `struct ifreq` as TUNSETIFF uses it: the interface name, then `short ifr_flags` at the
/// start of the 24-byte union.
#[repr(C)]
struct IfreqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfreqFlags>() == 40);
const _: () = assert!(std::mem::size_of::<IfreqFlags>() == std::mem::size_of::<libc::ifreq>());
const _: () = assert!(std::mem::offset_of!(IfreqFlags, flags) == 16);
// _IOW('T', 202, int)
const _: () = assert!(libc::TUNSETIFF == 0x4004_54ca);

/// Opens /dev/net/tun and creates the (non-persistent) tap `name`; returns the fd and the
/// name the kernel gave the device.
fn create_tap(name: &str) -> Result<(std::fs::File, String)> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['\0', '/']) {
        bail!(
            "bad interface name {name:?} (1 to {} bytes, no '/')",
            libc::IFNAMSIZ - 1
        );
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .context("cannot open /dev/net/tun")?;
    let mut ifr = IfreqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    ifr.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; `ifr` has its exact size and layout
    // (checked above), is NUL-terminated in `name`, and outlives the call.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    ioctl_result(rc, &format!("TUNSETIFF (create tap {name})"))?;
    let len = ifr
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(ifr.name.len());
    Ok((tun, String::from_utf8_lossy(&ifr.name[..len]).into_owned()))
}

pub fn cmd_tap(a: &TapArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Ready<'a> {
        kind: &'static str,
        pid: u32,
        name: &'a str,
    }
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        name: String,
        frame_size: u64,
        frames_written: u64,
        bytes_written: u64,
        frames_read: u64,
        bytes_read: u64,
        /// Frames read, by ethertype ("0x88b5", "0x86dd", ...; "short" below 14 bytes).
        frames_read_by_ethertype: BTreeMap<String, u64>,
        read_timed_out: bool,
        write_ns: u64,
        read_ns: u64,
        /// CLOCK_MONOTONIC when reading began and ended (after --read-after-ms).
        read_start_mono_ns: u64,
        read_end_mono_ns: u64,
        /// With --recreate-at: the index of the tap made again.
        recreated_ifindexes: Vec<u32>,
    }
    // Blocked before anything else, so that a SIGUSR1 sent as soon as the tap shows up stays
    // pending instead of killing the process.
    let sigset = if a.wait_signal {
        Some(block_sigusr1()?)
    } else {
        None
    };
    let netns = a.netns.clone();
    let wanted = a.name.clone();
    let (mut tap, name) = in_netns(netns.as_deref(), move || create_tap(&wanted))?;
    let mut ifindexes = Vec::new();
    if let Some(set) = &sigset {
        write_ready(
            &a.out,
            &Ready {
                kind: "ready",
                pid: std::process::id(),
                name: &name,
            },
        )?;
        let timeout = (a.signal_timeout_ms > 0).then(|| Duration::from_millis(a.signal_timeout_ms));
        wait_for_sigusr1(set, timeout)?;
    }

    let start = Instant::now();
    let (mut frames_written, mut bytes_written) = (0u64, 0u64);
    let mut frame = ethernet_frame(TAP_SRC_MAC, 0, a.size as usize);
    for i in 0..a.frames {
        if a.recreate_at == Some(i) {
            // Kept a while first, so a poller sees the old interface's last counts.
            thread::sleep(Duration::from_millis(a.recreate_pause_ms));
            drop(tap);
            let (again, pause) = (name.clone(), a.recreate_pause_ms);
            let (new_tap, new_name, ifindex) = in_netns(netns.as_deref(), move || {
                let (t, n) = create_tap(&again)?;
                let ifindex = bring_up(&n)?;
                Ok((t, n, ifindex))
            })?;
            if new_name != name {
                bail!("the tap came back as {new_name}, not {name}");
            }
            tap = new_tap;
            ifindexes.push(ifindex);
            thread::sleep(Duration::from_millis(pause));
        }
        set_frame_seq(&mut frame, i as u32);
        let n = match tap.write(&frame) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                bail!("write frame {i} into tap {name}: {e} (is the interface up?)")
            }
            Err(e) => bail!("write frame {i} into tap {name}: {e}"),
        };
        if n != frame.len() {
            bail!(
                "short write of frame {i} into tap {name}: {n} of {} bytes",
                frame.len()
            );
        }
        frames_written += 1;
        bytes_written += n as u64;
    }
    let write_ns = start.elapsed().as_nanos() as u64;

    thread::sleep(Duration::from_millis(a.read_after_ms));
    let read_start_mono_ns = clock_ns(libc::CLOCK_MONOTONIC);
    let start = Instant::now();
    let deadline = Some(start + Duration::from_millis(a.timeout_ms));
    let (mut frames_read, mut bytes_read) = (0u64, 0u64);
    let mut by_type = BTreeMap::new();
    let mut read_timed_out = false;
    let mut buf = vec![0u8; 65536];
    while frames_read < a.read_frames {
        if !poll_readable(tap.as_raw_fd(), deadline)? {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                read_timed_out = true;
                break;
            }
            continue;
        }
        let n = tap
            .read(&mut buf)
            .with_context(|| format!("read from tap {name}"))?;
        frames_read += 1;
        bytes_read += n as u64;
        let key = match buf[..n] {
            [_, _, _, _, _, _, _, _, _, _, _, _, hi, lo, ..] => {
                format!("{:#06x}", u16::from_be_bytes([hi, lo]))
            }
            _ => "short".to_string(),
        };
        *by_type.entry(key).or_insert(0u64) += 1;
    }
    let read_ns = start.elapsed().as_nanos() as u64;
    let read_end_mono_ns = clock_ns(libc::CLOCK_MONOTONIC);

    let report = Report {
        kind: "tap",
        pid: std::process::id(),
        name,
        frame_size: a.size,
        frames_written,
        bytes_written,
        frames_read,
        bytes_read,
        frames_read_by_ethertype: by_type,
        read_timed_out,
        write_ns,
        read_ns,
        read_start_mono_ns,
        read_end_mono_ns,
        recreated_ifindexes: ifindexes,
    };
    write_json_atomic(&a.out, &report)?;
    thread::sleep(Duration::from_millis(a.linger_ms));
    drop(tap);
    Ok(())
}
