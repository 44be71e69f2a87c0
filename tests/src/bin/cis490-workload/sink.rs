//! `sink`: count received TCP or UDP bytes.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

use crate::fdutil::{deadline_after, poll_readable};
use crate::report::{write_json_atomic, write_ready};

/// Receive network traffic on port P and count it (TCP by default, or --udp).
///
/// Binds 0.0.0.0:P (P 0 picks a free port), then writes PATH.ready
/// ({"kind":"ready","pid","port"}) once it is listening. TCP: accepts one connection and
/// reads it to EOF (64 KiB read() calls). UDP: receives datagrams until --bytes B were
/// received (if given) or the timeout. Either way --timeout-ms (counted from the ready
/// file; 0 waits forever) ends the wait: that is normal for UDP without --bytes and sets
/// "timed_out" otherwise.
///
/// Report: {"kind":"sink", "pid", "port", "protocol":"tcp"|"udp", "bytes",
/// "connections" (tcp) or "datagrams" (udp), "read_calls", "elapsed_ns" (from accept / the
/// first datagram to EOF / the last datagram), "timed_out"}.
#[derive(Args, Debug)]
pub struct SinkArgs {
    /// Port to listen on, on 0.0.0.0 (0: any free port, given in the ready file and report).
    #[arg(long, value_name = "P")]
    port: u16,
    /// Receive UDP datagrams instead of one TCP connection.
    #[arg(long)]
    udp: bool,
    /// With --udp: stop once this many bytes (UDP payload) were received.
    #[arg(long, value_name = "B", requires = "udp")]
    bytes: Option<u64>,
    /// Stop waiting this many ms after the ready file was written; 0 waits forever.
    #[arg(long, value_name = "T", default_value_t = 30_000)]
    timeout_ms: u64,
    /// Where to write the JSON report; the ready file is PATH.ready.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

pub fn cmd_sink(a: &SinkArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Ready {
        kind: &'static str,
        pid: u32,
        port: u16,
    }
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        port: u16,
        protocol: &'static str,
        bytes: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        connections: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        datagrams: Option<u64>,
        read_calls: u64,
        elapsed_ns: u64,
        timed_out: bool,
    }
    let pid = std::process::id();
    let mut buf = vec![0u8; 65536];
    let (mut bytes, mut read_calls, mut count) = (0u64, 0u64, 0u64);
    let mut timed_out = false;
    let mut first: Option<Instant> = None;
    let mut last: Option<Instant> = None;

    let port = if a.udp {
        let sock = std::net::UdpSocket::bind(("0.0.0.0", a.port))
            .with_context(|| format!("cannot bind UDP 0.0.0.0:{}", a.port))?;
        let port = sock.local_addr().context("getsockname")?.port();
        write_ready(
            &a.out,
            &Ready {
                kind: "ready",
                pid,
                port,
            },
        )?;
        let deadline = deadline_after(a.timeout_ms);
        while a.bytes.is_none_or(|b| bytes < b) {
            if !poll_readable(sock.as_raw_fd(), deadline)? {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    // The normal end without --bytes.
                    timed_out = a.bytes.is_some();
                    break;
                }
                continue;
            }
            let n = sock.recv(&mut buf).context("recv")?;
            read_calls += 1;
            let now = Instant::now();
            first.get_or_insert(now);
            last = Some(now);
            count += 1;
            bytes += n as u64;
        }
        port
    } else {
        let listener = std::net::TcpListener::bind(("0.0.0.0", a.port))
            .with_context(|| format!("cannot listen on TCP 0.0.0.0:{}", a.port))?;
        let port = listener.local_addr().context("getsockname")?.port();
        write_ready(
            &a.out,
            &Ready {
                kind: "ready",
                pid,
                port,
            },
        )?;
        let deadline = deadline_after(a.timeout_ms);
        let stream = loop {
            if poll_readable(listener.as_raw_fd(), deadline)? {
                break Some(listener.accept().context("accept")?.0);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break None;
            }
        };
        match stream {
            None => timed_out = true,
            Some(mut stream) => {
                count = 1;
                first = Some(Instant::now());
                loop {
                    if !poll_readable(stream.as_raw_fd(), deadline)? {
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            timed_out = true;
                            break;
                        }
                        continue;
                    }
                    let n = stream.read(&mut buf).context("read from TCP connection")?;
                    read_calls += 1;
                    last = Some(Instant::now());
                    if n == 0 {
                        break;
                    }
                    bytes += n as u64;
                }
            }
        }
        port
    };
    drop(buf);

    let elapsed_ns = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_nanos() as u64,
        _ => 0,
    };
    let report = Report {
        kind: "sink",
        pid,
        port,
        protocol: if a.udp { "udp" } else { "tcp" },
        bytes,
        connections: (!a.udp).then_some(count),
        datagrams: a.udp.then_some(count),
        read_calls,
        elapsed_ns,
        timed_out,
    };
    write_json_atomic(&a.out, &report)
}
