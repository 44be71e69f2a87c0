//! `exec`: execve from a thread that is not the main one.

use std::ffi::OsString;
use std::io;
use std::thread;

use anyhow::{Context, Result, anyhow};
use clap::Args;

use crate::burn::{burn_for_ns, spin};
use crate::clock::NS_PER_MS;

/// Burn CPU in several threads, then execve PROGRAM from one that is not the main thread.
///
/// Starts --threads N threads: "execer" burns --burn-ms of its own CPU clock, then calls
/// execv(PROGRAM, [PROGRAM, ARGS...]) while the main thread (blocked in join) and N-1
/// "spinner-K" threads (burning CPU without end) are still alive. The kernel kills them
/// (de_thread), the execer takes over the process id, and PROGRAM runs in the same process:
/// its CLOCK_PROCESS_CPUTIME_ID and getrusage(RUSAGE_SELF) still include everything done
/// before the exec, by every thread. Writes no report (PROGRAM does); if execv fails, an
/// error (exit code 2). PROGRAM is a path (no PATH search).
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Threads besides the main one: the execer and N-1 spinners.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    threads: u32,
    /// CPU time the execer burns before it calls execv, in ms of its own thread CPU clock.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    burn_ms: u64,
    /// PROGRAM and its arguments.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    argv: Vec<OsString>,
}

pub fn cmd_exec(a: &ExecArgs) -> Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let argv = a
        .argv
        .iter()
        .map(|s| std::ffi::CString::new(s.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .context("an argument contains a NUL byte")?;
    for i in 0..a.threads - 1 {
        thread::Builder::new()
            .name(format!("spinner-{i}"))
            .spawn(|| {
                loop {
                    spin(1_000_000);
                }
            })
            .with_context(|| format!("cannot start thread spinner-{i}"))?;
    }
    let burn_ns = a.burn_ms * NS_PER_MS;
    let execer = thread::Builder::new()
        .name("execer".to_string())
        .spawn(move || -> Result<()> {
            burn_for_ns(burn_ns);
            let mut ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
            ptrs.push(std::ptr::null());
            // SAFETY: a NUL-terminated path and a NULL-terminated argv of C strings that
            // outlive the call; execv returns only on failure.
            unsafe { libc::execv(ptrs[0], ptrs.as_ptr()) };
            Err(anyhow!(
                "cannot exec {}: {}",
                argv[0].to_string_lossy(),
                io::Error::last_os_error()
            ))
        })
        .context("cannot start thread execer")?;
    // Returns only if execv failed.
    execer
        .join()
        .map_err(|_| anyhow!("the execer thread panicked"))?
}
