//! `dio`: direct (O_DIRECT) block I/O of a known size.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::report::emit_report;
use crate::signals::ready_then_wait;

/// Direct (O_DIRECT) block I/O of a known size, with the kernel's /proc/self/io accounting.
///
/// Setup (not part of the measured phase): creates or truncates --file, preallocates it
/// with max(W, R) MiB of zeros written with ordinary buffered writes, fsync()s it and drops
/// it from the page cache (posix_fadvise DONTNEED). Because the blocks are then allocated
/// and written, the direct writes below overwrite them in place and cause no filesystem
/// metadata I/O (no allocation, no unwritten-extent conversion).
///
/// With --wait-signal, then writes PATH.ready ({"kind":"ready","pid"}) and waits for
/// SIGUSR1 (at most --timeout-ms). Then sleeps --start-delay-ms.
///
/// Direct phase: reads /proc/self/io; with --buffered-mb B, writes B MiB with ordinary
/// buffered writes into a new file PATH.buffered (any old one removed first), without
/// fsync, then pauses --buffered-pause-ms; opens the file with O_DIRECT, writes W MiB from
/// offset 0 with pwrite() in blocks of --block-kb from a 4096-aligned buffer (with
/// --scattered: pwritev() of every other 4 KiB page of a buffer twice as large), calls
/// fdatasync() once, reads R MiB from offset 0 with pread() (preadv()) in the same blocks, and reads
/// /proc/self/io again. Nothing else in the process does file I/O in between, so
/// write_bytes in /proc/self/io grows by exactly (B +) W MiB and read_bytes by R MiB
/// (buffered writes are accounted as their pages are dirtied, direct reads when their bios
/// are submitted, direct writes when issued).
///
/// Report: {"kind":"dio", "pid", "file", "block_bytes", "prealloc_bytes", "write_bytes",
/// "read_bytes", "buffered_bytes", "buffered_start_mono_ns" and "buffered_end_mono_ns"
/// (CLOCK_MONOTONIC around the buffered writes), "write_calls", "read_calls", "write_ns" (the
/// pwrite() calls), "fdatasync_ns",
/// "read_ns" (the pread() calls), "proc_io_before":{...}, "proc_io_after":{...}}, where
/// proc_io_* hold every field of /proc/self/io (rchar, wchar, syscr, syscw, read_bytes,
/// write_bytes, cancelled_write_bytes). Without --out the report goes to stdout. The file
/// is left in place (the caller removes it).
#[derive(Args, Debug)]
pub struct DioArgs {
    /// File to create (or truncate) and use, on a block-device filesystem (ext4, xfs, btrfs)
    /// that supports O_DIRECT. (tmpfs accepts O_DIRECT on recent kernels but does no block
    /// I/O, so read_bytes / write_bytes would not grow.) Left in place afterwards.
    #[arg(long, value_name = "PATH")]
    file: PathBuf,
    /// MiB to write with O_DIRECT, from offset 0.
    #[arg(long, value_name = "W", value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    write_mb: u64,
    /// MiB to read back with O_DIRECT, from offset 0 (after the writes).
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    read_mb: u64,
    /// Size of each pwrite()/pread() in KiB: a multiple of 4, at most 65536. The last call
    /// is shorter if it does not divide the total.
    #[arg(long, value_name = "KB", default_value_t = 1024, value_parser = parse_block_kb)]
    block_kb: u64,
    /// Each call's buffer is every other 4 KiB page of one twice its size (pwritev()/preadv(),
    /// one iovec per page), so no two of its pages are physically adjacent and each is a
    /// segment of its own: a call of more pages than the device's max_segments is split
    /// into several requests whatever memory the buffer got. --block-kb at most 4096 then.
    #[arg(long)]
    scattered: bool,
    /// MiB to write with ordinary buffered writes (no fsync) into PATH.buffered, a new file,
    /// before the direct writes.
    #[arg(long, value_name = "B", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1 << 20))]
    buffered_mb: u64,
    /// Idle sleep after the buffered writes, before the direct ones.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    buffered_pause_ms: u64,
    /// Idle sleep before the direct phase (after the preallocation and any signal wait).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    start_delay_ms: u64,
    /// Idle sleep after the direct phase, before exiting, so a poller (the /proc oracle)
    /// sees the final counts.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    linger_ms: u64,
    /// After preallocating, write PATH.ready and wait for SIGUSR1 before the direct phase.
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

fn parse_block_kb(s: &str) -> Result<u64, String> {
    let kb: u64 = s.parse().map_err(|e| format!("{e}"))?;
    if kb == 0 || !kb.is_multiple_of(4) || kb > 65536 {
        return Err("must be a multiple of 4 between 4 and 65536".to_string());
    }
    Ok(kb)
}

/// A zero-initialised heap buffer whose address is a multiple of `align` (for O_DIRECT).
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize, align: usize) -> Result<Self> {
        let layout = Layout::from_size_align(len.max(1), align)
            .with_context(|| format!("bad buffer layout ({len} bytes, align {align})"))?;
        // SAFETY: `layout` has a non-zero size (at least 1 byte, see above).
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr)
            .with_context(|| format!("cannot allocate an aligned buffer of {len} bytes"))?;
        Ok(AlignedBuf { ptr, layout })
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed) bytes owned by `self`,
        // borrowed immutably for as long as `self` is.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by alloc_zeroed with exactly this `layout` and is freed
        // only here.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

const MIB: u64 = 1 << 20;

/// Alignment of the O_DIRECT buffer, offsets and sizes: the largest common logical block size.
const DIO_ALIGN: usize = 4096;

/// The most iovecs one pwritev()/preadv() takes (Linux's UIO_MAXIOV).
const IOV_MAX: u64 = 1024;

/// Every "name: value" line of /proc/self/io, in file order.
fn proc_self_io() -> Result<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string("/proc/self/io").context("read /proc/self/io")?;
    let mut map = serde_json::Map::new();
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value: u64 = value
            .trim()
            .parse()
            .with_context(|| format!("bad line in /proc/self/io: {line:?}"))?;
        map.insert(name.trim().to_string(), value.into());
    }
    for name in ["read_bytes", "write_bytes"] {
        if !map.contains_key(name) {
            bail!("no {name} in /proc/self/io (kernel without CONFIG_TASK_IO_ACCOUNTING?)");
        }
    }
    Ok(map)
}

/// Creates `path` with `bytes` of zeros (buffered writes), fsync()s it and drops its pages.
fn preallocate(path: &Path, bytes: u64) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let zeros = vec![0u8; MIB as usize];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(MIB) as usize;
        f.write_all(&zeros[..n])
            .with_context(|| format!("cannot preallocate {}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all()
        .with_context(|| format!("fsync {}", path.display()))?;
    // SAFETY: `f` is an open file descriptor; offset 0 with length 0 means the whole file.
    // posix_fadvise reads no memory.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!(
            "posix_fadvise(DONTNEED) {}: {}",
            path.display(),
            io::Error::from_raw_os_error(rc)
        );
    }
    Ok(())
}

pub fn cmd_dio(a: &DioArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        file: String,
        block_bytes: u64,
        prealloc_bytes: u64,
        write_bytes: u64,
        read_bytes: u64,
        buffered_bytes: u64,
        buffered_start_mono_ns: u64,
        buffered_end_mono_ns: u64,
        write_calls: u64,
        read_calls: u64,
        write_ns: u64,
        fdatasync_ns: u64,
        read_ns: u64,
        proc_io_before: serde_json::Map<String, serde_json::Value>,
        proc_io_after: serde_json::Map<String, serde_json::Value>,
    }
    let write_bytes = a.write_mb * MIB;
    let read_bytes = a.read_mb * MIB;
    let block = a.block_kb * 1024;
    if a.scattered && block / DIO_ALIGN as u64 > IOV_MAX {
        bail!("--scattered takes at most {} KiB per call", IOV_MAX * 4);
    }
    let prealloc_bytes = write_bytes.max(read_bytes);

    preallocate(&a.file, prealloc_bytes)?;
    if a.wait_signal {
        let out = a.out.as_deref().context("--wait-signal needs --out")?;
        ready_then_wait(out, a.timeout_ms)?;
    }
    thread::sleep(Duration::from_millis(a.start_delay_ms));

    // Everything the direct phase needs is set up before the first /proc/self/io reading.
    let stride = if a.scattered { 2 } else { 1 };
    let mut buf = AlignedBuf::new(stride * block as usize, DIO_ALIGN)?;
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 251) as u8 ^ 0xa5;
    }
    // --scattered: one iovec per 4 KiB page, every other page of `buf`.
    let base = buf.ptr.as_ptr();
    let pages: Vec<libc::iovec> = (0..block as usize / DIO_ALIGN)
        .map(|i| libc::iovec {
            // SAFETY: page 2i lies inside `buf`, which is 2 * block bytes long.
            iov_base: unsafe { base.add(2 * i * DIO_ALIGN) }.cast(),
            iov_len: DIO_ALIGN,
        })
        .collect();
    // The first `n` bytes of the call's buffer, written (`write`) or read at `off`.
    let scattered_io = |fd: i32, write: bool, n: usize, off: u64| -> io::Result<usize> {
        let iov = &pages[..n.div_ceil(DIO_ALIGN)];
        let cnt = iov.len() as libc::c_int;
        // SAFETY: each iovec covers one page of `buf`, alive and not otherwise borrowed
        // during the call; n is a multiple of DIO_ALIGN (sizes are whole KiB, multiples of 4).
        let rc = unsafe {
            if write {
                libc::pwritev(fd, iov.as_ptr(), cnt, off as libc::off_t)
            } else {
                libc::preadv(fd, iov.as_ptr(), cnt, off as libc::off_t)
            }
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc as usize)
        }
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&a.file)
        .with_context(|| format!("cannot open {} with O_DIRECT", a.file.display()))?;

    let buffered_path = {
        let mut p = a.file.clone().into_os_string();
        p.push(".buffered");
        PathBuf::from(p)
    };
    let buffered_bytes = a.buffered_mb * MIB;
    if buffered_bytes > 0 {
        // A new file: ext4 flushes a file truncated over old data at close, in the
        // closing thread, which would make these writes direct in effect.
        match std::fs::remove_file(&buffered_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("remove {}", buffered_path.display()));
            }
            _ => {}
        }
    }
    let zeros = vec![0x5au8; MIB as usize];

    let proc_io_before = proc_self_io()?;
    let buffered_start_mono_ns = crate::clock::clock_ns(libc::CLOCK_MONOTONIC);
    if buffered_bytes > 0 {
        let mut f = std::fs::File::create_new(&buffered_path)
            .with_context(|| format!("cannot create {}", buffered_path.display()))?;
        for _ in 0..a.buffered_mb {
            f.write_all(&zeros)
                .with_context(|| format!("buffered write to {}", buffered_path.display()))?;
        }
    }
    let buffered_end_mono_ns = crate::clock::clock_ns(libc::CLOCK_MONOTONIC);
    if buffered_bytes > 0 {
        thread::sleep(Duration::from_millis(a.buffered_pause_ms));
    }
    let start = Instant::now();
    let (mut off, mut write_calls) = (0u64, 0u64);
    while off < write_bytes {
        let n = (write_bytes - off).min(block) as usize;
        let done = if a.scattered {
            scattered_io(file.as_raw_fd(), true, n, off)
        } else {
            file.write_at(&buf.as_slice()[..n], off)
        }
        .with_context(|| format!("O_DIRECT pwrite of {n} bytes at offset {off}"))?;
        write_calls += 1;
        if done != n {
            bail!("short O_DIRECT write at offset {off}: {done} of {n} bytes");
        }
        off += n as u64;
    }
    let write_ns = start.elapsed().as_nanos() as u64;
    let start = Instant::now();
    file.sync_data()
        .with_context(|| format!("fdatasync {}", a.file.display()))?;
    let fdatasync_ns = start.elapsed().as_nanos() as u64;

    let start = Instant::now();
    let (mut off, mut read_calls) = (0u64, 0u64);
    while off < read_bytes {
        let n = (read_bytes - off).min(block) as usize;
        let done = if a.scattered {
            scattered_io(file.as_raw_fd(), false, n, off)
        } else {
            file.read_at(&mut buf.as_mut_slice()[..n], off)
        }
        .with_context(|| format!("O_DIRECT pread of {n} bytes at offset {off}"))?;
        read_calls += 1;
        if done != n {
            bail!("short O_DIRECT read at offset {off}: {done} of {n} bytes");
        }
        off += n as u64;
    }
    let read_ns = start.elapsed().as_nanos() as u64;
    let proc_io_after = proc_self_io()?;
    drop(file);

    let report = Report {
        kind: "dio",
        pid: std::process::id(),
        file: a.file.display().to_string(),
        block_bytes: block,
        prealloc_bytes,
        write_bytes,
        read_bytes,
        buffered_bytes,
        buffered_start_mono_ns,
        buffered_end_mono_ns,
        write_calls,
        read_calls,
        write_ns,
        fdatasync_ns,
        read_ns,
        proc_io_before,
        proc_io_after,
    };
    thread::sleep(Duration::from_millis(a.linger_ms));
    emit_report(a.out.as_deref(), &report)
}
