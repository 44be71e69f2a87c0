//! File descriptors: polling with a deadline, ioctl results, owning a new fd.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::clock::NS_PER_MS;

/// `deadline` for a timeout in ms where 0 means "never".
pub fn deadline_after(timeout_ms: u64) -> Option<Instant> {
    (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms))
}

/// Waits until `fd` is readable (or has an error or hangup to report) or `deadline` passes.
/// Returns false at the deadline; also false when interrupted by a signal, so callers loop
/// until their deadline.
pub fn poll_readable(fd: RawFd, deadline: Option<Instant>) -> Result<bool> {
    let timeout_ms: libc::c_int = match deadline {
        None => -1,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            // Rounded up, so that a sub-millisecond remainder does not become a busy loop.
            left.as_nanos()
                .div_ceil(NS_PER_MS as u128)
                .min(i32::MAX as u128) as libc::c_int
        }
    };
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid, writable pollfd and the count passed is 1; poll only writes
    // its `revents`.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            return Ok(false);
        }
        bail!("poll: {err}");
    }
    Ok(rc > 0)
}

/// The result of an ioctl() that returns 0 or a new fd on success and -1 with errno on error.
pub fn ioctl_result(rc: libc::c_int, what: &str) -> Result<libc::c_int> {
    if rc < 0 {
        bail!("{what}: {}", io::Error::last_os_error());
    }
    Ok(rc)
}

/// Takes ownership of a file descriptor a syscall just returned.
pub fn owned_fd(fd: libc::c_int) -> OwnedFd {
    assert!(fd >= 0, "owned_fd({fd})");
    // SAFETY: the caller got `fd` from a successful syscall that created it, and nothing
    // else owns or closes it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
