//! `faults`: a known number of minor page faults.

use std::io;
use std::path::PathBuf;
use std::thread;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use crate::report::write_json_atomic;

/// Page faults: T threads each map --pages anonymous pages (no transparent huge pages:
/// MADV_NOHUGEPAGE) and write one byte to each (one minor fault per page), then exit; the
/// main thread joins them.
///
/// Report: {"kind":"faults", "pid", "threads", "pages", "touched", "minflt", "majflt"}:
/// `touched` is threads x pages (the faults the work itself must take), `minflt` and
/// `majflt` are getrusage(RUSAGE_SELF) after the join (every thread, exited ones included,
/// and the faults of starting the program), the process's own count.
#[derive(Args, Debug)]
pub struct FaultsArgs {
    /// Threads, each faulting its own mapping.
    #[arg(long, value_name = "T", default_value_t = 4)]
    threads: u32,
    /// Pages each thread maps and touches.
    #[arg(long, value_name = "N", default_value_t = 20_000)]
    pages: u64,
    /// Where the report goes.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

pub fn cmd_faults(a: &FaultsArgs) -> Result<()> {
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        threads: u32,
        pages: u64,
        touched: u64,
        minflt: u64,
        majflt: u64,
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let len = page * a.pages as usize;
    let mut handles = Vec::new();
    for i in 0..a.threads {
        handles.push(
            thread::Builder::new()
                .name(format!("faulter-{i}"))
                .spawn(move || -> Result<u64> {
                    // SAFETY: a new private anonymous mapping; nothing else refers to it.
                    let p = unsafe {
                        libc::mmap(
                            std::ptr::null_mut(),
                            len,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                            -1,
                            0,
                        )
                    };
                    if p == libc::MAP_FAILED {
                        bail!("mmap: {}", io::Error::last_os_error());
                    }
                    // Small pages only: with transparent huge pages one fault
                    // would map 512 of them.
                    // (EINVAL: a kernel without huge pages, small pages anyway.)
                    // SAFETY: advice on the mapping made above.
                    if unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) } != 0 {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EINVAL) {
                            bail!("madvise(MADV_NOHUGEPAGE): {e}");
                        }
                    }
                    let mut touched = 0;
                    for off in (0..len).step_by(page) {
                        // SAFETY: inside the mapping just made, writable.
                        unsafe { std::ptr::write_volatile(p.cast::<u8>().add(off), 1) };
                        touched += 1;
                    }
                    // SAFETY: the mapping made above, no longer used.
                    unsafe { libc::munmap(p, len) };
                    Ok(touched)
                })
                .with_context(|| format!("cannot start thread faulter-{i}"))?,
        );
    }
    let mut touched = 0;
    for h in handles {
        touched += h
            .join()
            .map_err(|_| anyhow::anyhow!("a faulter panicked"))??;
    }
    // SAFETY: `struct rusage` is plain integers and timevals, for which all-zero is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage; getrusage only writes into it.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        bail!("getrusage: {}", io::Error::last_os_error());
    }
    write_json_atomic(
        &a.out,
        &Report {
            kind: "faults",
            pid: std::process::id(),
            threads: a.threads,
            pages: a.pages,
            touched,
            minflt: ru.ru_minflt as u64,
            majflt: ru.ru_majflt as u64,
        },
    )
}
