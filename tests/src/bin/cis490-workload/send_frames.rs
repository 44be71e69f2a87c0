//! `send-frames`: Ethernet frames sent out of an interface through an AF_PACKET socket.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::fdutil::owned_fd;
use crate::frames::{HOST_SRC_MAC, ethernet_frame, set_frame_seq};
use crate::report::write_json_atomic;

/// Send N Ethernet frames of S bytes out of interface NAME through an AF_PACKET socket.
///
/// The host-side peer of `tap`: a frame sent on the host side of a tap is delivered to the
/// process holding the tap fd. Opens an AF_PACKET SOCK_RAW socket (protocol 0, so it
/// receives nothing), binds it to NAME and calls send() N times with a frame of exactly S
/// bytes: dst ff:ff:ff:ff:ff:ff, src 02:00:00:00:00:02, ethertype 0x88b5, the frame's
/// index (u32, big-endian), zero padding. The interface must be up (else ENETDOWN, an
/// error). A successful send() means the frame was handed to the device's queue; the
/// device may still drop it (tx_dropped) if the reader does not keep up, so pace with
/// --interval-us if that matters. Report: {"kind":"send-frames", "pid", "ifname",
/// "ifindex", "frame_size", "frames_sent", "bytes_sent", "send_calls", "wall_ns"}.
#[derive(Args, Debug)]
pub struct SendFramesArgs {
    /// Interface to send on (e.g. the host side of a tap); it must be up.
    #[arg(long, value_name = "NAME")]
    ifname: String,
    /// Number of frames to send.
    #[arg(long, value_name = "N")]
    frames: u64,
    /// Size of each frame, in bytes, Ethernet header included (no FCS); at most the
    /// interface's MTU + 14.
    #[arg(long, value_name = "S", value_parser = clap::value_parser!(u64).range(60..=65535))]
    size: u64,
    /// Sleep this many microseconds between two frames (0: back to back).
    #[arg(long, value_name = "US", default_value_t = 0)]
    interval_us: u64,
    /// Where to write the JSON report.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

pub fn cmd_send_frames(a: &SendFramesArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        ifname: String,
        ifindex: u32,
        frame_size: u64,
        frames_sent: u64,
        bytes_sent: u64,
        send_calls: u64,
        wall_ns: u64,
    }
    let cname = std::ffi::CString::new(a.ifname.as_str())
        .with_context(|| format!("bad interface name {:?}", a.ifname))?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {}: {}", a.ifname, io::Error::last_os_error());
    }
    // Protocol 0: the socket can send but receives nothing.
    // SAFETY: plain socket() call with constant arguments; it touches no memory.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!(
            "socket(AF_PACKET, SOCK_RAW): {}",
            io::Error::last_os_error()
        );
    }
    let sock = owned_fd(fd);
    // SAFETY: sockaddr_ll is plain integers and byte arrays, for which all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as libc::c_ushort;
    sll.sll_protocol = 0;
    sll.sll_ifindex = ifindex as libc::c_int;
    // SAFETY: `sll` is an initialised sockaddr_ll and the length passed is exactly its size;
    // bind only reads it.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&raw const sll).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "bind AF_PACKET socket to {}: {}",
            a.ifname,
            io::Error::last_os_error()
        );
    }

    let start = Instant::now();
    let (mut frames_sent, mut bytes_sent, mut send_calls) = (0u64, 0u64, 0u64);
    let mut frame = ethernet_frame(HOST_SRC_MAC, 0, a.size as usize);
    for i in 0..a.frames {
        if i > 0 && a.interval_us > 0 {
            thread::sleep(Duration::from_micros(a.interval_us));
        }
        set_frame_seq(&mut frame, i as u32);
        // SAFETY: `frame` is a valid buffer of exactly the length passed, outliving the call;
        // send only reads it.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                frame.as_ptr().cast::<libc::c_void>(),
                frame.len(),
                0,
            )
        };
        send_calls += 1;
        if n < 0 {
            let err = io::Error::last_os_error();
            bail!("send frame {i} on {}: {err}", a.ifname);
        }
        if n as usize != frame.len() {
            bail!(
                "short send of frame {i} on {}: {n} of {} bytes",
                a.ifname,
                frame.len()
            );
        }
        frames_sent += 1;
        bytes_sent += n as u64;
    }
    let wall_ns = start.elapsed().as_nanos() as u64;
    drop(sock);

    let report = Report {
        kind: "send-frames",
        pid: std::process::id(),
        ifname: a.ifname.clone(),
        ifindex,
        frame_size: a.size,
        frames_sent,
        bytes_sent,
        send_calls,
        wall_ns,
    };
    write_json_atomic(&a.out, &report)
}
