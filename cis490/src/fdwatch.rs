//! Registering owned file descriptors with the event loop.

use std::{io, os::fd::AsRawFd};

use tokio::io::{Interest, unix::AsyncFd};

/// Wraps `inner` so the event loop wakes when its fd is readable.
///
/// Only for types that own their fd for their whole life (an `OwnedFd`, an
/// aya map or logger): that is what keeps the registration sound.
pub fn readable<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its fd, which stays open and unchanged until the
    // AsyncFd (which owns `inner`) is dropped.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }.map_err(io::Error::from)
}
