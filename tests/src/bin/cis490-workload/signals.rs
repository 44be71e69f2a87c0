//! SIGUSR1 as the start signal: blocking it, waiting for it, and the ready file that says the
//! workload waits.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde::Serialize;

use crate::report::{with_suffix, write_json_atomic};

/// Blocks SIGUSR1 in the calling thread (and so in every thread it starts later), so that it
/// stays pending until `wait_for_sigusr1` collects it. Call before starting any thread.
pub fn block_sigusr1() -> Result<libc::sigset_t> {
    // SAFETY: sigset_t is a plain bit array, for which all-zero is valid; it is initialised
    // properly by sigemptyset right below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t; SIGUSR1 is a valid signal number.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1)
    };
    if rc != 0 {
        bail!("sigaddset: {}", io::Error::last_os_error());
    }
    // SAFETY: `set` is an initialised sigset_t; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        bail!("pthread_sigmask: {}", io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

/// Waits until SIGUSR1 (blocked by `block_sigusr1`) is delivered; `timeout` None waits forever.
pub fn wait_for_sigusr1(set: &libc::sigset_t, timeout: Option<Duration>) -> Result<()> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ts = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            }
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |ts| ts as *const libc::timespec);
        // SAFETY: `set` is an initialised sigset_t and `ts_ptr` is null (wait forever) or
        // points to `ts`, a valid timespec; both outlive the call. A null siginfo pointer is
        // allowed.
        let rc = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), ts_ptr) };
        if rc == libc::SIGUSR1 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match (rc, err.raw_os_error(), timeout) {
            (-1, Some(libc::EINTR), _) => continue,
            (-1, Some(libc::EAGAIN), Some(t)) => bail!("no SIGUSR1 within {} ms", t.as_millis()),
            (-1, _, _) => bail!("sigtimedwait: {err}"),
            (sig, _, _) => bail!("sigtimedwait returned unexpected signal {sig}"),
        }
    }
}

/// Writes PATH.ready and waits for SIGUSR1 (blocked first, so an early signal stays pending).
pub fn ready_then_wait(out: &Path, timeout_ms: u64) -> Result<()> {
    ready_then_wait_with(out, timeout_ms, || ())
}

/// [`ready_then_wait`], running `before_wait` between the two and returning
/// what it returns.
pub fn ready_then_wait_with<T>(
    out: &Path,
    timeout_ms: u64,
    before_wait: impl FnOnce() -> T,
) -> Result<T> {
    #[derive(Serialize)]
    struct Ready {
        kind: &'static str,
        pid: u32,
    }
    let set = block_sigusr1()?;
    write_json_atomic(
        &with_suffix(out, ".ready"),
        &Ready {
            kind: "ready",
            pid: std::process::id(),
        },
    )?;
    let value = before_wait();
    let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms));
    wait_for_sigusr1(&set, timeout)?;
    Ok(value)
}
