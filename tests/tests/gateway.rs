//! The gateway collector against a packet capture of the same interface.
//!
//! The lab in miniature: a network namespace `gw` holding a bridge whose
//! own addresses are the gateway (a DNS resolver and TCP servers run there,
//! as the lab's host routes and resolves for `br-malware`), and two veth
//! "VMs" on the bridge, each in its own namespace. The traced VM (vm1)
//! talks to the gateway in every way the gateway fields count (TCP to many
//! ports, most refused, so RSTs come back; DNS over UDP and TCP, some names
//! answered NXDOMAIN; pings both ways; bulk transfers; IPv6; ARP) while the
//! other VM (vm2) talks too. tcpdump captures the bridge meanwhile; the
//! test recomputes every gateway field from that capture with its own pcap
//! reader and frame parser (below) and asserts the totals are equal and
//! each bucket equal wherever the capture's timestamps put its frames in
//! one bucket (bounded by the frames near a boundary otherwise).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    process::{Child, Command, Stdio},
    thread::{self, JoinHandle},
    time::Duration,
};

use cis490_tests::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const VM1_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x90, 0x00, 0x01];
const VM2_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x90, 0x00, 0x02];
const GW4: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 1);
const GW6: Ipv6Addr = Ipv6Addr::new(0xfd90, 0, 0, 0, 0, 0, 0, 1);
const BRIDGE: &str = "c490br";
/// Bucket width of the traces (longer under software emulation, where
/// everything is tens of times slower).
fn interval_ms() -> u64 {
    if software_emulated() { 1000 } else { 200 }
}
/// How far a capture timestamp may be from the instant the kernel program
/// counted the frame, before (the capture stamps a received frame at the
/// veth, before the bridge) and after (the tracer reads its counters a
/// little after the boundary's clock reading, having sampled its other
/// sources first).
const EARLY_NS: u64 = 5_000_000;
fn late_ns() -> u64 {
    if software_emulated() {
        400_000_000
    } else {
        50_000_000
    }
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The test's lab: the gateway namespace with the bridge, and the VMs.
struct Lab {
    gw: Netns,
    vm1: Netns,
    vm2: Netns,
}

fn quiet_ipv6(ns: &Netns) {
    // No router solicitations nor duplicate address detection: fewer
    // frames of the kernel's own near the test's boundaries.
    ns.sh(
        "for c in all default; do sysctl -q -w net.ipv6.conf.$c.router_solicitations=0 \
         net.ipv6.conf.$c.dad_transmits=0 net.ipv6.conf.$c.accept_dad=0; done",
    );
}

fn lab(tag: &str) -> Lab {
    let lab = Lab {
        gw: Netns::new(&format!("{tag}-gw")),
        vm1: Netns::new(&format!("{tag}-v1")),
        vm2: Netns::new(&format!("{tag}-v2")),
    };
    for ns in [&lab.gw, &lab.vm1, &lab.vm2] {
        quiet_ipv6(ns);
        ns.ip(&["link", "set", "lo", "up"]);
    }
    let gw = &lab.gw;
    gw.ip(&["link", "add", BRIDGE, "type", "bridge"]);
    gw.ip(&["addr", "add", "10.90.0.1/24", "dev", BRIDGE]);
    gw.ip(&["addr", "add", "fd90::1/64", "dev", BRIDGE, "nodad"]);
    gw.ip(&["link", "set", BRIDGE, "up"]);
    for (vm, mac, n) in [(&lab.vm1, VM1_MAC, 2), (&lab.vm2, VM2_MAC, 3)] {
        let port = format!("c490p{n}");
        gw.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &vm.0,
        ]);
        gw.ip(&["link", "set", &port, "master", BRIDGE, "up"]);
        vm.ip(&["link", "set", "eth0", "address", &mac_str(mac)]);
        vm.ip(&["addr", "add", &format!("10.90.0.{n}/24"), "dev", "eth0"]);
        vm.ip(&[
            "addr",
            "add",
            &format!("fd90::{n}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        vm.ip(&["link", "set", "eth0", "up"]);
    }
    // Let the links' own first frames (MLD reports) pass.
    thread::sleep(Duration::from_millis(1500));
    lab
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<R: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> R + Send + 'static,
) -> JoinHandle<R> {
    let path = format!("/var/run/netns/{}", ns.0);
    thread::spawn(move || {
        let fd = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on an open namespace file, for this thread only.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

fn run_in<R: Send + 'static>(ns: &Netns, f: impl FnOnce() -> R + Send + 'static) -> R {
    in_netns(ns, f).join().expect("netns thread")
}

// ---------------------------------------------------------------- servers

/// A DNS answer to `q`: the question echoed, QR set, rcode 3 (NXDOMAIN)
/// when the first label starts with "nx", else 0 with no records.
fn dns_answer(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 13 {
        return None;
    }
    let mut a = q.to_vec();
    let nx = q[12] >= 2 && q.get(13..15) == Some(b"nx");
    a[2] = 0x80 | (q[2] & 0x01);
    a[3] = if nx { 3 } else { 0 };
    Some(a)
}

/// The gateway's services: a DNS resolver on UDP (IPv4 and IPv6) and TCP,
/// a bulk sink on TCP 7001 (both families) and listeners on 7200..7220
/// that accept and close. Threads that live as long as the test process.
fn serve(gw: &Netns) {
    run_in(gw, || {
        for addr in [SocketAddr::from((GW4, 53)), SocketAddr::from((GW6, 53))] {
            let s = UdpSocket::bind(addr).unwrap();
            thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while let Ok((n, from)) = s.recv_from(&mut buf) {
                    if let Some(a) = dns_answer(&buf[..n]) {
                        let _ = s.send_to(&a, from);
                    }
                }
            });
        }
        let dns_tcp = TcpListener::bind((GW4, 53)).unwrap();
        thread::spawn(move || {
            for c in dns_tcp.incoming().flatten() {
                let mut c = c;
                let mut len = [0u8; 2];
                while c.read_exact(&mut len).is_ok() {
                    let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                    if c.read_exact(&mut q).is_err() {
                        break;
                    }
                    if let Some(a) = dns_answer(&q) {
                        let mut out = (a.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&a);
                        let _ = c.write_all(&out);
                    }
                }
            }
        });
        for addr in [SocketAddr::from((GW4, 7001)), SocketAddr::from((GW6, 7001))] {
            let l = TcpListener::bind(addr).unwrap();
            thread::spawn(move || {
                for c in l.incoming().flatten() {
                    thread::spawn(move || {
                        let mut c = c;
                        let _ = std::io::copy(&mut c, &mut std::io::sink());
                    });
                }
            });
        }
        for port in 7200..7220 {
            let l = TcpListener::bind((GW4, port)).unwrap();
            thread::spawn(move || {
                for c in l.incoming().flatten() {
                    drop(c);
                }
            });
        }
    });
}

// ---------------------------------------------------------------- clients

fn dns_name(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// UDP DNS queries to `server`, one answer awaited each; returns how many
/// were answered NXDOMAIN.
fn dns_udp(server: IpAddr, names: &[String]) -> usize {
    let bind: SocketAddr = match server {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(bind).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut nx = 0;
    for name in names {
        s.send_to(&dns_name(name), (server, 53)).unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = s.recv_from(&mut buf).expect("DNS answer");
        assert!(n >= 12);
        nx += (buf[3] & 0xf == 3) as usize;
    }
    nx
}

/// One TCP DNS query per connection.
fn dns_tcp(names: &[String]) {
    for name in names {
        let mut c = TcpStream::connect((GW4, 53)).unwrap();
        let q = dns_name(name);
        let mut out = (q.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(&q);
        c.write_all(&out).unwrap();
        let mut len = [0u8; 2];
        c.read_exact(&mut len).unwrap();
        let mut a = vec![0u8; u16::from_be_bytes(len) as usize];
        c.read_exact(&mut a).unwrap();
    }
}

/// Connects to each port; returns (accepted, refused).
fn connect_ports(ports: impl Iterator<Item = u16>) -> (usize, usize) {
    let (mut ok, mut refused) = (0, 0);
    for p in ports {
        match TcpStream::connect_timeout(&SocketAddr::from((GW4, p)), Duration::from_secs(2)) {
            Ok(c) => {
                ok += 1;
                let _ = c.shutdown(Shutdown::Both);
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
            Err(e) => panic!("connect to port {p}: {e}"),
        }
    }
    (ok, refused)
}

fn bulk(to: SocketAddr, bytes: usize) {
    let mut c = TcpStream::connect(to).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        c.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// `count` ICMP (or ICMPv6) echo requests to `to` through a raw socket,
/// each reply awaited.
fn ping(to: IpAddr, count: u16) {
    let (domain, proto, req, rep) = match to {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8u8, 0u8),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128, 129),
    };
    // SAFETY: plain socket calls on a socket owned here.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_RAW, proto);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let (sa, len): (libc::sockaddr_storage, u32) = {
            let mut ss: libc::sockaddr_storage = std::mem::zeroed();
            match to {
                IpAddr::V4(a) => {
                    let sin = &mut *(&raw mut ss).cast::<libc::sockaddr_in>();
                    sin.sin_family = libc::AF_INET as u16;
                    sin.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
                    (ss, std::mem::size_of::<libc::sockaddr_in>() as u32)
                }
                IpAddr::V6(a) => {
                    let sin6 = &mut *(&raw mut ss).cast::<libc::sockaddr_in6>();
                    sin6.sin6_family = libc::AF_INET6 as u16;
                    sin6.sin6_addr.s6_addr = a.octets();
                    (ss, std::mem::size_of::<libc::sockaddr_in6>() as u32)
                }
            }
        };
        for seq in 0..count {
            let mut p = vec![req, 0, 0, 0, 0x49, 0x90, (seq >> 8) as u8, seq as u8];
            p.extend_from_slice(&[0xab; 56]);
            if domain == libc::AF_INET {
                let c = checksum(&p);
                p[2..4].copy_from_slice(&c.to_be_bytes());
            }
            let n = libc::sendto(
                fd,
                p.as_ptr().cast(),
                p.len(),
                0,
                (&raw const sa).cast(),
                len,
            );
            assert_eq!(n as usize, p.len(), "{}", std::io::Error::last_os_error());
            // The reply (IPv4 raw sockets get the IP header too).
            loop {
                let mut buf = [0u8; 1500];
                let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                assert!(n > 0, "no echo reply: {}", std::io::Error::last_os_error());
                let icmp = if domain == libc::AF_INET {
                    &buf[((buf[0] & 0xf) as usize * 4)..n as usize]
                } else {
                    &buf[..n as usize]
                };
                if icmp[0] == rep && icmp[6..8] == [(seq >> 8) as u8, seq as u8] {
                    break;
                }
            }
        }
        libc::close(fd);
    }
}

// ---------------------------------------------------------------- capture

/// tcpdump on the bridge, and its stderr once it ends.
struct Capture {
    child: Child,
    stderr: std::sync::mpsc::Receiver<String>,
}

/// tcpdump on the bridge, writing `file` (the first 256 bytes of each
/// frame, and its length), with a 64 MiB buffer; returns once it listens.
fn start_capture(gw: &Netns, file: &Path) -> Capture {
    let mut c = gw
        .cmd(&cis490_tests::capture::tcpdump())
        .args([
            "-i", BRIDGE, "-n", "-U", "-s", "256", "-B", "65536", "-Z", "root",
        ])
        .args(["--immediate-mode", "--time-stamp-precision", "nano", "-w"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tcpdump");
    // "listening on ..." on stderr once the capture runs.
    let mut err = c.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 512];
        let mut told = false;
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if !told && String::from_utf8_lossy(&all).contains("listening on") {
                told = true;
                let _ = tx.send(String::new());
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&all).into_owned());
    });
    let first = rx.recv_timeout(T).expect("tcpdump did not start");
    assert!(first.is_empty(), "tcpdump: {first}");
    Capture {
        child: c,
        stderr: rx,
    }
}

/// Stops tcpdump and checks it lost nothing.
fn stop_capture(mut c: Capture) {
    kill(c.child.id() as i32, libc::SIGINT);
    let st = c.child.wait().unwrap();
    let err = c.stderr.recv_timeout(T).unwrap_or_default();
    assert!(st.success(), "tcpdump: {st:?}: {err}");
    assert!(
        err.lines()
            .any(|l| l.trim() == "0 packets dropped by kernel"),
        "tcpdump lost frames: {err}"
    );
}

/// A frame of a pcap file.
struct Frame {
    ts_ns: u64,
    orig_len: u32,
    data: Vec<u8>,
}

/// Reads a classic pcap file (microsecond or nanosecond timestamps,
/// little-endian, Ethernet).
fn read_pcap(path: &Path) -> Vec<Frame> {
    let b = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(b.len() >= 24, "{}: no pcap header", path.display());
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let scale = match u32_at(0) {
        0xa1b2_c3d4 => 1000,
        0xa1b2_3c4d => 1,
        m => panic!(
            "{}: not a little-endian pcap file (magic {m:#x})",
            path.display()
        ),
    };
    assert_eq!(u32_at(20), 1, "link type Ethernet");
    let mut frames = Vec::new();
    let mut i = 24;
    while i + 16 <= b.len() {
        let (sec, frac, incl, orig) = (u32_at(i), u32_at(i + 4), u32_at(i + 8), u32_at(i + 12));
        let data = b[i + 16..i + 16 + incl as usize].to_vec();
        frames.push(Frame {
            ts_ns: sec as u64 * 1_000_000_000 + frac as u64 * scale,
            orig_len: orig,
            data,
        });
        i += 16 + incl as usize;
    }
    assert_eq!(i, b.len(), "{}: truncated record", path.display());
    frames
}

/// A 5-tuple from the VM's side: protocol, local and remote address, local
/// and remote port.
type Flow = (u8, [u8; 16], [u8; 16], u16, u16);

/// What the gateway fields count of one frame, recomputed from its bytes
/// (the rules of docs/data-model.md, written again here).
#[derive(Default)]
struct Counted {
    /// Additive fields: name -> count.
    n: BTreeMap<&'static str, u64>,
    flow: Option<Flow>,
    remote_ip: Option<[u8; 16]>,
    remote_port: Option<u16>,
}

fn be16(d: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*d.get(i)?, *d.get(i + 1)?]))
}

/// The frame seen from the VM with MAC addresses `macs` (every frame,
/// by the capture's direction, when empty: not used here), or `None` when
/// it is not the VM's.
fn count_frame(f: &Frame, macs: &[[u8; 6]]) -> Option<Counted> {
    let d = &f.data;
    let out = if macs.iter().any(|m| d.get(6..12) == Some(m)) {
        true
    } else if macs.iter().any(|m| d.get(0..6) == Some(m)) {
        false
    } else {
        return None;
    };
    let mut c = Counted::default();
    let mut add = |k: &'static str| *c.n.entry(k).or_default() += 1;
    let len = f.orig_len as u64;
    if out {
        add("gw_out_frames");
        *c.n.entry("gw_out_bytes").or_default() += len;
    } else {
        add("gw_in_frames");
        *c.n.entry("gw_in_bytes").or_default() += len;
    }
    let bucket = 63 - len.max(1).leading_zeros() as usize;
    *c.n.entry(HIST[bucket]).or_default() += 1;
    let mut add = |k: &'static str| *c.n.entry(k).or_default() += 1;
    let ethertype = be16(d, 12)?;
    // (proto, local, remote, l4 offset or 0, l4 length)
    let (proto, src, dst, l4, l4len) = match ethertype {
        0x0800 => {
            add("gw_ipv4_frames");
            let ihl = (d[14] & 0xf) as usize * 4;
            let total = be16(d, 16)? as usize;
            let frag = be16(d, 20)? & 0x1fff;
            let mut s = [0u8; 16];
            let mut t = [0u8; 16];
            s[10..12].copy_from_slice(&[0xff, 0xff]);
            t[10..12].copy_from_slice(&[0xff, 0xff]);
            s[12..].copy_from_slice(&d[26..30]);
            t[12..].copy_from_slice(&d[30..34]);
            let off = if frag == 0 { 14 + ihl } else { 0 };
            (d[23], s, t, off, total.saturating_sub(ihl))
        }
        0x86dd => {
            add("gw_ipv6_frames");
            let s: [u8; 16] = d[22..38].try_into().unwrap();
            let t: [u8; 16] = d[38..54].try_into().unwrap();
            (d[20], s, t, 54, be16(d, 18)? as usize)
        }
        0x0806 => {
            add("gw_arp_frames");
            return Some(c);
        }
        _ => {
            add("gw_other_frames");
            return Some(c);
        }
    };
    match proto {
        6 => add("gw_tcp_frames"),
        17 => add("gw_udp_frames"),
        1 | 58 => add("gw_icmp_frames"),
        _ => {}
    }
    let (local, remote) = if out { (src, dst) } else { (dst, src) };
    if out {
        c.remote_ip = Some(remote);
    }
    if l4 == 0 || (proto != 6 && proto != 17) {
        return Some(c);
    }
    let (sport, dport) = (be16(d, l4)?, be16(d, l4 + 2)?);
    let (lp, rp) = if out { (sport, dport) } else { (dport, sport) };
    c.flow = Some((proto, local, remote, lp, rp));
    if out {
        c.remote_port = Some(rp);
    }
    if proto == 6 {
        let doff = (d[l4 + 12] >> 4) as usize * 4;
        let flags = d[l4 + 13];
        let (syn, ack, rst, fin) = (
            flags & 2 != 0,
            flags & 16 != 0,
            flags & 4 != 0,
            flags & 1 != 0,
        );
        if syn && !ack && out {
            add("gw_tcp_syn");
        }
        if syn && ack && !out {
            add("gw_tcp_synack_in");
        }
        if rst {
            add(if out {
                "gw_tcp_rst_out"
            } else {
                "gw_tcp_rst_in"
            });
        }
        if fin {
            add("gw_tcp_fin");
        }
        let payload = l4len.saturating_sub(doff);
        if out && dport == 53 && payload > 0 {
            add("gw_dns_queries");
        } else if !out && sport == 53 && payload >= 6 {
            let (f0, f1) = (d[l4 + doff + 4], d[l4 + doff + 5]);
            if f0 & 0x80 != 0 && f1 & 0xf == 3 {
                add("gw_dns_nxdomain");
            }
        }
    } else {
        let ulen = be16(d, l4 + 4)? as usize;
        if out && dport == 53 {
            add("gw_dns_queries");
        } else if !out && sport == 53 && ulen >= 12 {
            let (f0, f1) = (d[l4 + 10], d[l4 + 11]);
            if f0 & 0x80 != 0 && f1 & 0xf == 3 {
                add("gw_dns_nxdomain");
            }
        }
    }
    Some(c)
}

const HIST: [&str; 32] = [
    "h0", "h1", "h2", "h3", "h4", "h5", "h6", "h7", "h8", "h9", "h10", "h11", "h12", "h13", "h14",
    "h15", "h16", "h17", "h18", "h19", "h20", "h21", "h22", "h23", "h24", "h25", "h26", "h27",
    "h28", "h29", "h30", "h31",
];

/// The additive fields compared, as in the rows.
const FIELDS: [&str; 19] = [
    "gw_out_frames",
    "gw_out_bytes",
    "gw_in_frames",
    "gw_in_bytes",
    "gw_ipv4_frames",
    "gw_ipv6_frames",
    "gw_arp_frames",
    "gw_other_frames",
    "gw_tcp_frames",
    "gw_udp_frames",
    "gw_icmp_frames",
    "gw_tcp_syn",
    "gw_tcp_synack_in",
    "gw_tcp_rst_in",
    "gw_tcp_rst_out",
    "gw_tcp_fin",
    "gw_dns_queries",
    "gw_dns_nxdomain",
    "gw_new_flows",
];

/// A row's value of `field` (a histogram element for `hN`).
fn row_value(row: &Value, field: &str) -> u64 {
    if let Some(i) = field.strip_prefix('h') {
        let i: usize = i.parse().unwrap();
        return row["gw_frame_size_hist_log2"]
            .as_array()
            .expect("histogram")
            .get(i)
            .and_then(Value::as_u64)
            .unwrap_or(0);
    }
    row[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a count in {row}"))
}

/// The capture's VM frames, each with what it counts (new flows marked in
/// capture order).
fn counted_frames(frames: &[Frame], macs: &[[u8; 6]]) -> Vec<(u64, Counted)> {
    let mut seen = BTreeSet::new();
    frames
        .iter()
        .filter_map(|f| {
            let mut c = count_frame(f, macs)?;
            if let Some(flow) = c.flow
                && seen.insert(flow)
            {
                c.n.insert("gw_new_flows", 1);
            }
            Some((f.ts_ns, c))
        })
        .collect()
}

/// Lower and upper bounds of each field over the frames of (from, to]:
/// certain ones, and possible ones given the timing uncertainty.
struct Bounds {
    lo: BTreeMap<&'static str, u64>,
    hi: BTreeMap<&'static str, u64>,
    ips: (usize, usize),
    ports: (usize, usize),
    ambiguous: usize,
}

fn bounds(frames: &[(u64, Counted)], from: u64, to: u64) -> Bounds {
    let mut b = Bounds {
        lo: BTreeMap::new(),
        hi: BTreeMap::new(),
        ips: (0, 0),
        ports: (0, 0),
        ambiguous: 0,
    };
    let (mut ips, mut ports) = (
        (BTreeSet::new(), BTreeSet::new()),
        (BTreeSet::new(), BTreeSet::new()),
    );
    for (ts, c) in frames {
        let possible = *ts + EARLY_NS > from && *ts <= to + late_ns();
        let certain = *ts > from + late_ns() && *ts + EARLY_NS <= to;
        if !possible {
            continue;
        }
        if !certain {
            b.ambiguous += 1;
        }
        for (k, v) in &c.n {
            *b.hi.entry(k).or_default() += v;
            if certain {
                *b.lo.entry(k).or_default() += v;
            }
        }
        if let Some(ip) = c.remote_ip {
            ips.1.insert(ip);
            if certain {
                ips.0.insert(ip);
            }
        }
        if let Some(p) = c.remote_port {
            ports.1.insert(p);
            if certain {
                ports.0.insert(p);
            }
        }
    }
    b.ips = (ips.0.len(), ips.1.len());
    b.ports = (ports.0.len(), ports.1.len());
    b
}

/// Every gateway field of every row (and the totals) against the capture.
/// Returns (buckets with frames, of them compared exactly).
fn compare(ep: &Episode, capture: &[Frame], macs: &[[u8; 6]]) -> (usize, usize) {
    let frames = counted_frames(capture, macs);
    let rows = ep.rows("gateway");
    assert!(!rows.is_empty());
    let start = ep.meta["start"]["t_wall_ns"].as_u64().unwrap();
    let mut from = start;
    let (mut busy, mut exact) = (0, 0);
    let mut report = String::new();
    let fields: Vec<&str> = FIELDS.iter().copied().chain(HIST).collect();
    for row in rows {
        let to = row["t_wall_ns"].as_u64().unwrap();
        let b = bounds(&frames, from, to);
        let seq = row["seq"].as_u64().unwrap();
        for f in &fields {
            let (lo, hi) = (
                b.lo.get(f).copied().unwrap_or(0),
                b.hi.get(f).copied().unwrap_or(0),
            );
            let got = row_value(row, f);
            assert!(
                lo <= got && got <= hi,
                "bucket {seq}: {f} = {got}, the capture says {lo}..={hi} ({} frames near its \
                 edges)",
                b.ambiguous
            );
        }
        for (f, (lo, hi)) in [("gw_remote_ips", b.ips), ("gw_remote_ports", b.ports)] {
            let got = row[f].as_u64().unwrap() as usize;
            assert!(
                lo <= got && got <= hi,
                "bucket {seq}: {f} = {got}, capture {lo}..={hi}"
            );
        }
        assert_eq!(row["gw_distinct_overflow"], 0, "bucket {seq}");
        assert_eq!(row["dropped_events"], 0, "bucket {seq}");
        assert_eq!(
            row["events"].as_u64(),
            Some(row_value(row, "gw_out_frames") + row_value(row, "gw_in_frames"))
        );
        if b.hi.get("gw_out_frames").copied().unwrap_or(0)
            + b.hi.get("gw_in_frames").copied().unwrap_or(0)
            > 0
        {
            busy += 1;
            if b.ambiguous == 0 {
                exact += 1;
            }
        }
        report += &format!(
            "bucket {seq}: out {} in {} (capture: {} frames near the edges)\n",
            row["gw_out_frames"], row["gw_in_frames"], b.ambiguous
        );
        from = to;
    }
    eprint!("{report}");
    // The totals: only the episode's two ends are uncertain.
    let end = rows.last().unwrap()["t_wall_ns"].as_u64().unwrap();
    let b = bounds(&frames, start, end);
    for f in &fields {
        let got: u64 = rows.iter().map(|r| row_value(r, f)).sum();
        let (lo, hi) = (
            b.lo.get(f).copied().unwrap_or(0),
            b.hi.get(f).copied().unwrap_or(0),
        );
        if b.ambiguous == 0 {
            assert_eq!(got, lo, "total {f}");
        } else {
            assert!(
                lo <= got && got <= hi,
                "total {f} = {got}, capture {lo}..={hi}"
            );
        }
    }
    eprintln!(
        "totals: {} frames of the VM near the episode's start or end ({})",
        b.ambiguous,
        if b.ambiguous == 0 {
            "compared exactly"
        } else {
            "compared within bounds"
        }
    );
    (busy, exact)
}

/// `cis490 trace --gateway-if BRIDGE EXTRA...` in the gateway's namespace
/// (`ip netns exec`), or from the host's with `--gateway-netns`.
fn trace_gateway(lab: &Lab, dir: &Path, extra: &[&str]) -> Child {
    trace_gateway_from(lab, dir, false, extra)
}

fn trace_gateway_from(lab: &Lab, dir: &Path, from_host: bool, extra: &[&str]) -> Child {
    let mut c = if from_host {
        let mut c = Command::new(bin("cis490"));
        c.args(["trace", "--gateway-netns", &lab.gw.0]);
        c
    } else {
        let mut c = lab.gw.cmd(&bin("cis490"));
        c.arg("trace");
        c
    };
    c.arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--progress-secs", "0", "--sources", "ebpf"])
        .args(["--interval-ms", &interval_ms().to_string()])
        .args(["--gateway-if", BRIDGE])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn cis490");
    // Started, or failed: then its error, not a timeout.
    let t0 = std::time::Instant::now();
    loop {
        if started_episode(&dir.join("data")).is_some() {
            return child;
        }
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "cis490 trace ended before it started tracing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(t0.elapsed() < T, "trace did not start within {T:?}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn end_trace(child: Child) -> Episode {
    kill(child.id() as i32, libc::SIGINT);
    let out = wait_output(child, T);
    assert!(
        out.status.success(),
        "cis490 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Episode::from_output(&out)
}

/// The classifiers attached to the bridge right now: TCX programs (by
/// aya's query) and netlink filters (by `tc filter show`).
fn attached(gw: &Netns) -> (Vec<String>, String) {
    let tcx = run_in(gw, || {
        use aya::programs::{SchedClassifier, TcAttachType};
        let mut names = Vec::new();
        for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
            if let Ok((_, progs)) = SchedClassifier::query_tcx(BRIDGE, hook) {
                for p in progs {
                    names.push(p.name_as_str().unwrap_or("?").to_owned());
                }
            }
        }
        names
    });
    let tc = tc_bin();
    let mut out = String::new();
    for hook in ["ingress", "egress"] {
        out += &gw.sh(&format!("{tc} filter show dev {BRIDGE} {hook}"));
    }
    out += &gw.sh(&format!("{tc} qdisc show dev {BRIDGE}"));
    (tcx, out)
}

/// iproute2's `tc` (not busybox's applet, first on the VMs' PATH, which
/// knows no clsact): /usr/sbin/tc here, /usr/bin/tc in the VMs.
fn tc_bin() -> &'static str {
    ["/usr/sbin/tc", "/sbin/tc", "/usr/bin/tc"]
        .into_iter()
        .find(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_file()))
        .expect("iproute2's tc")
}

/// vm1's traffic, in phases a bucket or two apart.
fn mono_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn sleep_until_mono(t: u64) {
    thread::sleep(Duration::from_nanos(t.saturating_sub(mono_now())));
}

/// Sleeps until a quarter of a bucket past `late_ns()` after a bucket
/// boundary of the trace (the grid from its `started` event) at least
/// `late_ns()` away, so that a short phase then falls in one bucket, clear
/// of both its edges and of the stragglers of the phase before; returns
/// when that bucket's late window ends (for the next phase to wait for):
/// one bucket compared exactly whatever the machine's speed. (A row's end
/// is stamped when the tracer reads it, after the nominal boundary: with
/// the phase 10 ms past the late window, 4 of its 20 frames were near an
/// edge once in a clean-clone run on 2026-12-07, and no bucket was exact;
/// at a quarter of a bucket, 6 of 6 runs had it exact.)
fn into_a_bucket(ep_dir: &Path) -> u64 {
    let text = fs::read_to_string(ep_dir.join("events.jsonl")).unwrap();
    let started: Value = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|e| e["event"] == "started")
        .expect("started event");
    let start = started["t_mono_ns"].as_u64().unwrap();
    let interval = started["interval_ns"].as_u64().unwrap();
    let now = mono_now();
    let mut next = start + ((now - start) / interval + 1) * interval;
    if next - now < late_ns() {
        next += interval;
    }
    sleep_until_mono(next + late_ns() + interval / 4);
    next + interval + late_ns() + 10_000_000
}

fn vm1_traffic(lab: &Lab, ep_dir: &Path) {
    let pause = || thread::sleep(Duration::from_millis(interval_ms() * 3 / 4));
    let (ok, refused) = run_in(&lab.vm1, || connect_ports((7200..7220).chain(7300..7340)));
    assert_eq!((ok, refused), (20, 40));
    pause();
    let names: Vec<String> = (0..30)
        .map(|i| {
            if i % 3 == 0 {
                format!("nx{i}.lab")
            } else {
                format!("host{i}.lab")
            }
        })
        .collect();
    let nx = run_in(&lab.vm1, move || dns_udp(IpAddr::V4(GW4), &names));
    assert_eq!(nx, 10);
    pause();
    let names6: Vec<String> = ["a.lab", "nxb.lab", "c.lab", "nxd.lab", "e.lab"]
        .map(String::from)
        .to_vec();
    assert_eq!(
        run_in(&lab.vm1, move || dns_udp(IpAddr::V6(GW6), &names6)),
        2
    );
    run_in(&lab.vm1, || {
        dns_tcp(&["t1.lab".into(), "nxt2.lab".into(), "t3.lab".into()])
    });
    pause();
    // Ten pings inside one bucket, nothing else of vm1's near it.
    let after = into_a_bucket(ep_dir);
    run_in(&lab.vm1, || ping(IpAddr::V4(GW4), 10));
    sleep_until_mono(after);
    run_in(&lab.vm1, || ping(IpAddr::V6(GW6), 5));
    // And pings from the gateway to the VM.
    run_in(&lab.gw, || ping(IpAddr::V4(Ipv4Addr::new(10, 90, 0, 2)), 5));
    pause();
    // ARP again: the VM forgets the gateway.
    lab.vm1.ip(&["neigh", "flush", "dev", "eth0"]);
    run_in(&lab.vm1, || bulk((GW4, 7001).into(), 2 << 20));
    pause();
    run_in(&lab.vm1, || bulk((GW6, 7001).into(), 256 << 10));
}

/// The other VM, busy at the same time: none of its frames may count.
fn vm2_traffic(lab: &Lab) -> JoinHandle<()> {
    in_netns(&lab.vm2, || {
        for round in 0..6 {
            let names: Vec<String> = (0..5).map(|i| format!("nx{round}{i}.other")).collect();
            dns_udp(IpAddr::V4(GW4), &names);
            connect_ports(7300..7310);
            bulk((GW4, 7001).into(), 256 << 10);
            ping(IpAddr::V6(GW6), 2);
            thread::sleep(Duration::from_millis(100));
        }
    })
}

#[test]
fn gateway_fields_equal_a_capture_of_the_bridge() {
    require_root();
    let dir = scratch("gateway");
    let lab = lab("gw");
    serve(&lab.gw);
    let pcap = dir.join("bridge.pcap");
    let capture = start_capture(&lab.gw, &pcap);
    let trace = trace_gateway(
        &lab,
        &dir,
        &[
            "--gateway-mac",
            &mac_str(VM1_MAC),
            "--gateway-pcap",
            "--",
            "sleep",
            "600",
        ],
    );
    let (tcx, _) = attached(&lab.gw);
    // Quiet edges: nothing of the test's own within a bucket of the start
    // and the end.
    thread::sleep(Duration::from_millis(interval_ms() * 2));
    let other = vm2_traffic(&lab);
    vm1_traffic(&lab, &episode_dir(&dir));
    other.join().unwrap();
    thread::sleep(Duration::from_millis(interval_ms() * 3));
    let ep = end_trace(trace);
    thread::sleep(Duration::from_millis(300));
    stop_capture(capture);
    assert!(ep.is_done());

    let gw = &ep.meta["gateway"];
    assert_eq!(gw["interface"], BRIDGE);
    assert_eq!(gw["mac_origin"], "cli");
    assert_eq!(gw["counts_every_frame"], false);
    assert_eq!(gw["macs"], serde_json::json!([mac_str(VM1_MAC)]));
    let src = ep.meta["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == "gateway")
        .expect("gateway in meta.json sources");
    assert_eq!(src["available_in_deployment"], true);
    if gw["attach"] == "tcx" {
        tcx.iter()
            .for_each(|n| assert!(n.starts_with("gw_"), "{n}"));
        assert_eq!(
            tcx.len(),
            2,
            "both classifiers attached while tracing: {tcx:?}"
        );
    }
    // Detached: nothing of ours is left on the bridge.
    let (tcx, tc) = attached(&lab.gw);
    assert!(tcx.is_empty(), "TCX programs left: {tcx:?}");
    assert!(
        !tc.contains("gw_") && !tc.contains("clsact"),
        "left on the bridge:\n{tc}"
    );

    // Rows: the envelope, null in the other sources.
    for r in ep.rows("gateway") {
        assert_eq!(r["source"], "gateway");
        assert_eq!(r["available_in_deployment"], true);
        assert!(r["cpu_ns"].is_null() && r["net_tx_bytes"].is_null());
    }
    for r in ep.rows("ebpf") {
        assert!(r["gw_out_frames"].is_null() && r["gw_frame_size_hist_log2"].is_null());
    }

    let frames = read_pcap(&pcap);
    let (busy, exact) = compare(&ep, &frames, &[VM1_MAC]);
    eprintln!("{busy} buckets with frames of vm1, {exact} of them without a frame near an edge");
    assert!(busy >= 4, "the traffic spans several buckets ({busy})");
    assert!(exact >= 1, "at least one bucket compared exactly");
    // What the test sent shows (the capture agrees, above; these say the
    // traffic was what the test meant).
    let sum = |f: &str| ep.sum("gateway", f);
    assert!(sum("gw_tcp_rst_in") >= 40, "refused connections");
    // 60 connections, two bulk transfers, three DNS queries over TCP.
    assert!(sum("gw_tcp_syn") >= 60 + 2 + 3);
    assert_eq!(sum("gw_dns_nxdomain"), 10 + 2 + 1);
    assert_eq!(sum("gw_dns_queries"), 30 + 5 + 3);
    assert!(sum("gw_arp_frames") >= 2 && sum("gw_ipv6_frames") > 0);
    assert!(sum("gw_out_bytes") > 2 << 20);
    // vm2's frames are on the bridge but not counted.
    let vm2 = frames
        .iter()
        .filter(|f| f.data.get(6..12) == Some(&VM2_MAC))
        .count();
    assert!(vm2 > 100, "vm2 talked ({vm2} frames)");

    // gateway.pcap: the same frames as tcpdump's of vm1, their first
    // 256 bytes, all of them (no drops).
    let mine = read_pcap(&ep.dir.join("gateway.pcap"));
    let frames_total = sum("gw_out_frames") + sum("gw_in_frames");
    assert_eq!(gw["pcap"]["dropped"], 0);
    assert_eq!(mine.len() as u64, gw["pcap"]["records"].as_u64().unwrap());
    let start = ep.meta["start"]["t_wall_ns"].as_u64().unwrap();
    let in_episode: Vec<&Frame> = mine.iter().filter(|f| f.ts_ns > start).collect();
    assert_eq!(in_episode.len() as u64, frames_total);
    let key = |f: &Frame| (f.orig_len, f.data[..f.data.len().min(256)].to_vec());
    let theirs: Vec<_> = frames
        .iter()
        .filter(|f| count_frame(f, &[VM1_MAC]).is_some())
        .map(key)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for f in &in_episode {
        assert!(f.data.len() <= 256);
        assert_eq!(f.data.len() as u32, f.orig_len.min(256));
        assert!(
            theirs.binary_search(&key(f)).is_ok(),
            "a frame of gateway.pcap tcpdump did not see"
        );
    }
    // And tcpdump reads it.
    let out = Command::new(cis490_tests::capture::tcpdump())
        .args(["-n", "-Z", "root", "-r"])
        .arg(ep.dir.join("gateway.pcap"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        mine.len()
    );
}

/// The clsact path (kernels before 6.6 take it): a clsact qdisc that was
/// there is kept, one the tracer added is removed, and no filter is left;
/// the VM's MAC comes from `mac=` in the command line.
#[test]
fn clsact_attach_leaves_the_bridge_as_it_was() {
    require_root();
    let dir = scratch("gateway-clsact");
    let lab = lab("gc");
    serve(&lab.gw);
    for pre_existing in [false, true] {
        if pre_existing {
            lab.gw
                .sh(&format!("{} qdisc add dev {BRIDGE} clsact", tc_bin()));
        }
        let _ = fs::remove_dir_all(dir.join("data"));
        let pcap = dir.join("bridge.pcap");
        let _ = fs::remove_file(&pcap);
        let capture = start_capture(&lab.gw, &pcap);
        let mac_arg = format!("virtio-net-pci,netdev=n0,mac={}", mac_str(VM1_MAC));
        // From the host's namespace, the bridge's named.
        let trace = trace_gateway_from(
            &lab,
            &dir,
            true,
            &[
                "--gateway-attach",
                "clsact",
                "--",
                "sh",
                "-c",
                "exec sleep 600",
                &mac_arg,
            ],
        );
        let (_, tc) = attached(&lab.gw);
        assert!(
            tc.contains("gw_ingress") && tc.contains("gw_egress"),
            "{tc}"
        );
        thread::sleep(Duration::from_millis(interval_ms() * 2));
        let other = vm2_traffic(&lab);
        let (ok, refused) = run_in(&lab.vm1, || connect_ports((7200..7205).chain(7300..7310)));
        assert_eq!((ok, refused), (5, 10));
        run_in(&lab.vm1, || ping(IpAddr::V4(GW4), 3));
        run_in(&lab.vm1, || bulk((GW4, 7001).into(), 512 << 10));
        other.join().unwrap();
        thread::sleep(Duration::from_millis(interval_ms() * 3));
        let ep = end_trace(trace);
        thread::sleep(Duration::from_millis(300));
        stop_capture(capture);
        let gw = &ep.meta["gateway"];
        assert_eq!(gw["attach"], "clsact");
        assert_eq!(gw["netns"], lab.gw.0.as_str());
        assert_eq!(gw["added_clsact"], !pre_existing);
        assert_eq!(gw["mac_origin"], "command_line");
        assert_eq!(gw["macs"], serde_json::json!([mac_str(VM1_MAC)]));
        compare(&ep, &read_pcap(&pcap), &[VM1_MAC]);
        let (_, tc) = attached(&lab.gw);
        assert!(!tc.contains("gw_"), "filters left:\n{tc}");
        assert_eq!(tc.contains("clsact"), pre_existing, "clsact qdisc:\n{tc}");
    }
}

/// No MAC known: every frame on the bridge counts (ingress as out), and
/// meta.json says so.
#[test]
fn without_a_mac_every_frame_counts() {
    require_root();
    let dir = scratch("gateway-all");
    let lab = lab("ga");
    serve(&lab.gw);
    let pcap = dir.join("bridge.pcap");
    let capture = start_capture(&lab.gw, &pcap);
    let trace = trace_gateway(&lab, &dir, &["--", "sleep", "600"]);
    thread::sleep(Duration::from_millis(interval_ms() * 2));
    let other = vm2_traffic(&lab);
    run_in(&lab.vm1, || connect_ports(7300..7320));
    other.join().unwrap();
    thread::sleep(Duration::from_millis(interval_ms() * 3));
    let ep = end_trace(trace);
    thread::sleep(Duration::from_millis(300));
    stop_capture(capture);
    let gw = &ep.meta["gateway"];
    assert_eq!(gw["counts_every_frame"], true);
    assert_eq!(gw["mac_origin"], "none");
    let start = ep.meta["start"]["t_wall_ns"].as_u64().unwrap();
    let end = ep.rows("gateway").last().unwrap()["t_wall_ns"]
        .as_u64()
        .unwrap();
    let frames = read_pcap(&pcap);
    let certain = frames
        .iter()
        .filter(|f| f.ts_ns > start + late_ns() && f.ts_ns + EARLY_NS <= end)
        .count() as u64;
    let possible = frames
        .iter()
        .filter(|f| f.ts_ns + EARLY_NS > start && f.ts_ns <= end + late_ns())
        .count() as u64;
    let got = ep.sum("gateway", "events");
    assert!(
        certain <= got && got <= possible,
        "every frame: {got}, capture {certain}..={possible}"
    );
    // Both VMs' frames: far more than vm1's alone.
    assert!(got > 6 * 5 * 2, "{got}");
}

/// Through a server (`cis490 trace --server`), the gateway collector is the
/// episode's own: every frame on the bridge counted (held to the capture as
/// above), its classifiers gone from the bridge when the episode ends, the
/// server still running.
#[test]
fn a_served_episode_counts_the_bridge_too() {
    require_root();
    let dir = scratch("gateway-served");
    let lab = lab("gs");
    serve(&lab.gw);
    let server = Server::start(&dir, &[]);
    let pcap = dir.join("bridge.pcap");
    let capture = start_capture(&lab.gw, &pcap);
    let data = dir.join("data");
    let mut c = server.trace(&dir);
    c.args(["--gateway-netns", &lab.gw.0])
        .args(["--sources", "ebpf"])
        .args(["--interval-ms", &interval_ms().to_string()])
        .args(["--gateway-if", BRIDGE, "--", "sleep", "600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let trace = c.spawn().unwrap();
    wait_trace_started(&data, T);
    let (tcx, tc) = attached(&lab.gw);
    assert!(
        !tcx.is_empty() || tc.contains("gw_ingress"),
        "no classifier on the bridge: {tcx:?} {tc}"
    );
    thread::sleep(Duration::from_millis(interval_ms() * 2));
    let other = vm2_traffic(&lab);
    run_in(&lab.vm1, || connect_ports(7300..7320));
    other.join().unwrap();
    thread::sleep(Duration::from_millis(interval_ms() * 3));
    let ep = end_trace(trace);
    thread::sleep(Duration::from_millis(300));
    stop_capture(capture);
    assert_eq!(ep.meta["gateway"]["counts_every_frame"], true);
    let start = ep.meta["start"]["t_wall_ns"].as_u64().unwrap();
    let end = ep.rows("gateway").last().unwrap()["t_wall_ns"]
        .as_u64()
        .unwrap();
    let frames = read_pcap(&pcap);
    let certain = frames
        .iter()
        .filter(|f| f.ts_ns > start + late_ns() && f.ts_ns + EARLY_NS <= end)
        .count() as u64;
    let possible = frames
        .iter()
        .filter(|f| f.ts_ns + EARLY_NS > start && f.ts_ns <= end + late_ns())
        .count() as u64;
    let got = ep.sum("gateway", "events");
    assert!(
        certain <= got && got <= possible,
        "every frame: {got}, capture {certain}..={possible}"
    );
    assert!(got > 6 * 5 * 2, "{got}");
    // The episode's classifiers went with it; the server runs on.
    let (tcx, tc) = attached(&lab.gw);
    assert!(
        tcx.is_empty() && !tc.contains("gw_"),
        "left on the bridge: {tcx:?} {tc}"
    );
    assert!(server.child.as_ref().is_some());
    let out = server.stop(libc::SIGTERM);
    assert!(out.status.success());
}

/// Every way the tracer can end leaves the bridge as it was: an abort on a
/// second signal undoes the clsact path (the target ignores SIGTERM, so the
/// tracer is still finishing when the second signal comes), and a SIGKILL
/// takes TCX links with it (kernels 6.6+; the clsact path's netlink filters
/// outlive a SIGKILL, as documented, and are removed here).
#[test]
fn aborted_and_killed_tracers_leave_nothing_behind() {
    require_root();
    let dir = scratch("gateway-abort");
    let lab = lab("gk");
    let stubborn = ["--", "sh", "-c", "trap '' TERM; exec sleep 600"];
    // A second SIGINT while finishing: exit 130, filters and qdisc gone.
    let mut args = vec!["--gateway-attach", "clsact"];
    args.extend(stubborn);
    let trace = trace_gateway_from(&lab, &dir, true, &args);
    let (_, tc) = attached(&lab.gw);
    assert!(tc.contains("gw_ingress") && tc.contains("clsact"), "{tc}");
    let ep_dir = episode_dir(&dir);
    let target: i32 = Episode::read(&ep_dir).meta["target"]["pid"]
        .as_i64()
        .unwrap() as i32;
    kill(trace.id() as i32, libc::SIGINT);
    // The tracer waits up to 5 s for the target after its SIGTERM.
    thread::sleep(Duration::from_millis(1500));
    kill(trace.id() as i32, libc::SIGINT);
    let out = wait_output(trace, T);
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, tc) = attached(&lab.gw);
    assert!(
        !tc.contains("gw_") && !tc.contains("clsact"),
        "left after the abort:\n{tc}"
    );
    // SAFETY: kill(2); the target may be gone already (the abort kills it).
    unsafe { libc::kill(target, libc::SIGKILL) };

    // SIGKILL.
    let _ = fs::remove_dir_all(dir.join("data"));
    let trace = trace_gateway(&lab, &dir, &["--", "sleep", "600"]);
    let ep = Episode::read(&episode_dir(&dir));
    let target = ep.meta["target"]["pid"].as_i64().unwrap() as i32;
    // meta.json names the attach mode only at the end: ask the kernel.
    let (tcx, tc) = attached(&lab.gw);
    let mode = if tcx.is_empty() { "clsact" } else { "tcx" };
    assert!(mode == "tcx" || tc.contains("gw_ingress"), "{tc}");
    kill(trace.id() as i32, libc::SIGKILL);
    let _ = wait_output(trace, T);
    unsafe { libc::kill(target, libc::SIGKILL) };
    thread::sleep(Duration::from_millis(200));
    let (tcx, tc) = attached(&lab.gw);
    if mode == "tcx" {
        assert!(
            tcx.is_empty() && !tc.contains("gw_"),
            "left after SIGKILL: {tcx:?}\n{tc}"
        );
    } else {
        assert_eq!(mode, "clsact");
        assert!(
            tc.contains("gw_ingress"),
            "the netlink filters outlive a SIGKILL:\n{tc}"
        );
        lab.gw
            .sh(&format!("{} qdisc del dev {BRIDGE} clsact", tc_bin()));
    }
}

/// Bad gateway options: one `error:` line each, a non-zero exit, no
/// episode marked done.
#[test]
fn bad_gateway_options_get_one_error_line() {
    require_root();
    let dir = scratch("gateway-errors");
    let data = dir.join("data");
    for (args, says) in [
        (
            vec!["--gateway-if", "c490nosuch0"],
            "--gateway-if c490nosuch0: no such interface",
        ),
        (
            vec!["--gateway-if", "lo", "--gateway-mac", "52:54:00:zz:00:01"],
            "is not a MAC address",
        ),
        (
            vec!["--gateway-mac", "52:54:00:00:00:01"],
            "required arguments were not provided",
        ),
        (
            vec![
                "--gateway-if",
                "lo",
                "--gateway-pcap",
                "--gateway-snaplen",
                "4096",
            ],
            "--gateway-snaplen must be 1..=1024",
        ),
        (
            vec!["--gateway-if", "lo", "--gateway-netns", "c490-no-such-ns"],
            "--gateway-netns /var/run/netns/c490-no-such-ns: cannot open",
        ),
        (vec!["--sources", "ebpf,gateway"], "give --gateway-if IFACE"),
    ] {
        let out = run_with_timeout(
            default_trace_cmd(&dir)
                .args(&args)
                .args(["--", "sleep", "5"]),
            T,
        );
        let line = one_line_error(&out, &data);
        assert!(line.contains(says), "{args:?}: {line}");
    }
}

/// `--gateway-pcap` on a flood the ring buffer cannot hold in one bucket:
/// the frames it could not write are counted (`dropped_events`, meta.json
/// `pcap.dropped`), and written + dropped = every frame counted.
#[test]
fn pcap_frames_the_ring_buffer_cannot_hold_are_counted() {
    require_root();
    let dir = scratch("gateway-drops");
    let lab = lab("gd");
    let trace = trace_gateway(
        &lab,
        &dir,
        &[
            "--gateway-mac",
            &mac_str(VM1_MAC),
            "--gateway-pcap",
            "--gateway-snaplen",
            "1024",
            "--",
            "sleep",
            "600",
        ],
    );
    // 20000 datagrams at once: 20000 records of 1 KiB do not fit in 4 MiB.
    run_in(&lab.vm1, || {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        for _ in 0..20_000 {
            s.send_to(&[0u8; 64], (GW4, 9)).unwrap();
        }
    });
    thread::sleep(Duration::from_millis(500));
    let ep = end_trace(trace);
    let gw = &ep.meta["gateway"];
    let (records, dropped) = (
        gw["pcap"]["records"].as_u64().unwrap(),
        gw["pcap"]["dropped"].as_u64().unwrap(),
    );
    assert!(dropped > 0, "the flood overflowed nothing: {gw}");
    assert_eq!(gw["pcap"]["undecodable"], 0);
    // Every frame since the classifiers attached: written or dropped.
    assert_eq!(records + dropped, gw["frames"].as_u64().unwrap(), "{gw}");
    assert_eq!(
        read_pcap(&ep.dir.join("gateway.pcap")).len() as u64,
        records
    );
    // The rows' drops: those of the buckets (not before the baseline).
    let rows_dropped = ep.sum("gateway", "dropped_events");
    assert!(
        rows_dropped > 0 && rows_dropped <= dropped,
        "{rows_dropped} of {dropped}"
    );
    assert!(ep.sum("gateway", "gw_out_frames") >= 20_000);
}
