//! `blkdev`: concurrent direct I/O on a whole block device, with flushes
//! and discards: what the I/O scheduler merges, and requests the block
//! probes must not count (flushes, discards) beside ones they must.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::dio::AlignedBuf;
use crate::report::emit_report;
use crate::signals::ready_then_wait;

/// Concurrent direct I/O on a whole block device that nothing else uses (a loop device), with
/// flushes and discards beside it.
///
/// Opens --device with O_DIRECT. With --wait-signal, writes PATH.ready and waits for SIGUSR1.
/// Then --threads writer threads write the first --write-mb MiB of the device in --chunk-kb
/// pieces, interleaved (thread t writes chunks t, t + T, t + 2T, ...), so neighbouring pieces
/// are in flight from different threads at once and the I/O scheduler can merge them; each
/// writer calls fdatasync() (a flush request) after every --fsync-every of its pieces. Meanwhile
/// one thread discards (ioctl BLKDISCARD) the --discard-mb MiB after the written area,
/// --discard-kb at a time, over and over until the writers are done (at least once over the
/// whole area). Then one thread reads the first --read-mb MiB back in --chunk-kb pieces.
///
/// Report: {"kind":"blkdev", "pid", "device", "write_bytes", "write_calls", "read_bytes",
/// "read_calls", "discards", "discard_bytes", "fsyncs"}: what the process asked of the device.
#[derive(Args, Debug)]
pub struct BlkdevArgs {
    /// The whole block device (its size must hold --write-mb + --discard-mb). Its contents are
    /// overwritten.
    #[arg(long, value_name = "PATH")]
    device: PathBuf,
    /// Writer threads.
    #[arg(long, value_name = "T", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: u64,
    /// MiB to write, from offset 0.
    #[arg(long, value_name = "W", default_value_t = 16, value_parser = clap::value_parser!(u64).range(0..=4096))]
    write_mb: u64,
    /// Size of each write and read, KiB: a multiple of 4, at most 1024, dividing 1024.
    #[arg(long, value_name = "KB", default_value_t = 4, value_parser = parse_chunk_kb)]
    chunk_kb: u64,
    /// Each writer calls fdatasync() after this many of its writes (0: never).
    #[arg(long, value_name = "N", default_value_t = 64)]
    fsync_every: u64,
    /// MiB to discard, right after the written area.
    #[arg(long, value_name = "D", default_value_t = 16, value_parser = clap::value_parser!(u64).range(0..=4096))]
    discard_mb: u64,
    /// Size of each discard, KiB (a multiple of 4 dividing 1024 * D).
    #[arg(long, value_name = "KB", default_value_t = 256, value_parser = parse_chunk_kb)]
    discard_kb: u64,
    /// MiB to read back after the writes, from offset 0 (at most --write-mb).
    #[arg(long, value_name = "R", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=4096))]
    read_mb: u64,
    /// Write PATH.ready and wait for SIGUSR1 before any I/O.
    #[arg(long, requires = "out")]
    wait_signal: bool,
    /// With --wait-signal: give up (error, exit code 2) if no SIGUSR1 arrives within this
    /// many ms; 0 waits forever.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    timeout_ms: u64,
    /// Where to write the JSON report (stdout if omitted); the ready file is PATH.ready.
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

fn parse_chunk_kb(s: &str) -> Result<u64, String> {
    let kb: u64 = s.parse().map_err(|e| format!("{e}"))?;
    if kb == 0 || !kb.is_multiple_of(4) || !1024u64.is_multiple_of(kb) {
        return Err("must be a multiple of 4 that divides 1024".to_string());
    }
    Ok(kb)
}

/// `BLKGETSIZE64`: the device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKDISCARD`: discards the range `[start, len]` (two u64).
const BLKDISCARD: libc::c_ulong = 0x1277;
const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

pub fn cmd_blkdev(a: &BlkdevArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        device: String,
        write_bytes: u64,
        write_calls: u64,
        read_bytes: u64,
        read_calls: u64,
        discards: u64,
        discard_bytes: u64,
        fsyncs: u64,
    }
    if a.read_mb > a.write_mb {
        bail!(
            "--read-mb {} is more than --write-mb {}",
            a.read_mb,
            a.write_mb
        );
    }
    let dev = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&a.device)
            .with_context(|| format!("cannot open {} with O_DIRECT", a.device.display()))?,
    );
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 into `size`.
    if unsafe { libc::ioctl(dev.as_raw_fd(), BLKGETSIZE64, &mut size) } != 0 {
        bail!(
            "{} is not a block device: BLKGETSIZE64: {}",
            a.device.display(),
            std::io::Error::last_os_error()
        );
    }
    let (write_bytes, discard_bytes) = (a.write_mb * MIB, a.discard_mb * MIB);
    if write_bytes + discard_bytes > size {
        bail!(
            "{} holds {size} bytes, less than --write-mb + --discard-mb",
            a.device.display()
        );
    }
    let chunk = a.chunk_kb * KIB;
    if discard_bytes % (a.discard_kb * KIB) != 0 {
        bail!("--discard-kb must divide --discard-mb");
    }
    if let Some(out) = a.out.as_deref().filter(|_| a.wait_signal) {
        ready_then_wait(out, a.timeout_ms)?;
    }

    let writers_done = Arc::new(AtomicBool::new(false));
    let discards = Arc::new(AtomicU64::new(0));
    let discarder = {
        let (dev, done, discards) = (dev.clone(), writers_done.clone(), discards.clone());
        let step = a.discard_kb * KIB;
        thread::spawn(move || -> Result<()> {
            if discard_bytes == 0 {
                return Ok(());
            }
            loop {
                let mut off = 0;
                while off < discard_bytes {
                    let range = [write_bytes + off, step];
                    // SAFETY: BLKDISCARD reads two u64 from `range`.
                    if unsafe { libc::ioctl(dev.as_raw_fd(), BLKDISCARD, range.as_ptr()) } != 0 {
                        bail!("BLKDISCARD: {}", std::io::Error::last_os_error());
                    }
                    discards.fetch_add(1, Ordering::Relaxed);
                    off += step;
                }
                if done.load(Ordering::Relaxed) {
                    return Ok(());
                }
                thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let chunks = write_bytes / chunk;
    let writers: Vec<_> = (0..a.threads)
        .map(|t| {
            let (dev, threads, every) = (dev.clone(), a.threads, a.fsync_every);
            thread::spawn(move || -> Result<(u64, u64)> {
                let mut buf = AlignedBuf::new(chunk as usize, 4096)?;
                buf.as_mut_slice().fill(0x3c ^ t as u8);
                let (mut calls, mut fsyncs) = (0u64, 0u64);
                let mut i = t;
                while i < chunks {
                    let off = i * chunk;
                    let n = dev
                        .write_at(buf.as_slice(), off)
                        .with_context(|| format!("O_DIRECT write at {off}"))?;
                    if n as u64 != chunk {
                        bail!("short O_DIRECT write at {off}: {n} of {chunk} bytes");
                    }
                    calls += 1;
                    if every > 0 && calls.is_multiple_of(every) {
                        dev.sync_data().context("fdatasync")?;
                        fsyncs += 1;
                    }
                    i += threads;
                }
                Ok((calls, fsyncs))
            })
        })
        .collect();
    let (mut write_calls, mut fsyncs) = (0, 0);
    for w in writers {
        let (c, f) = w.join().expect("a writer panicked")?;
        write_calls += c;
        fsyncs += f;
    }
    writers_done.store(true, Ordering::Relaxed);
    discarder.join().expect("the discarder panicked")?;

    let read_bytes = a.read_mb * MIB;
    let mut buf = AlignedBuf::new(chunk as usize, 4096)?;
    let (mut off, mut read_calls) = (0, 0u64);
    while off < read_bytes {
        let n = dev
            .read_at(buf.as_mut_slice(), off)
            .with_context(|| format!("O_DIRECT read at {off}"))?;
        if n as u64 != chunk {
            bail!("short O_DIRECT read at {off}: {n} of {chunk} bytes");
        }
        read_calls += 1;
        off += chunk;
    }
    let discards = discards.load(Ordering::Relaxed);
    emit_report(
        a.out.as_deref(),
        &Report {
            kind: "blkdev",
            pid: std::process::id(),
            device: a.device.display().to_string(),
            write_bytes,
            write_calls,
            read_bytes,
            read_calls,
            discards,
            discard_bytes: discards * a.discard_kb * KIB,
            fsyncs,
        },
    )
}
