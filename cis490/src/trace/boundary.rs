//! The wake-up at each bucket boundary: a timerfd armed at the boundary's
//! `CLOCK_MONOTONIC` time, nanosecond-exact, instead of the event loop's own
//! timers, which round every deadline up to the next millisecond (at
//! `--interval-ms 1` that alone made the loop miss about a third of the
//! boundaries of an idle target).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use tokio::io::unix::AsyncFd;

use crate::fdwatch;

/// A timer that wakes the event loop at a given `CLOCK_MONOTONIC` time.
pub struct BoundaryTimer {
    fd: AsyncFd<OwnedFd>,
    /// The time it is armed for, ns; 0 when not armed.
    armed_ns: u64,
}

impl BoundaryTimer {
    pub fn new() -> io::Result<BoundaryTimer> {
        // SAFETY: timerfd_create returns a new fd or -1.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd, owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(BoundaryTimer {
            fd: fdwatch::readable(fd)?,
            armed_ns: 0,
        })
    }

    /// Waits until `CLOCK_MONOTONIC` reaches `mono_ns` (at once if it has).
    /// Cancel-safe: dropped before it returns, the timer stays armed, and
    /// the next call for the same time waits for the same expiry.
    pub async fn wait_until(&mut self, mono_ns: u64) -> io::Result<()> {
        if self.armed_ns != mono_ns {
            self.arm(mono_ns)?;
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            // SAFETY: a read of 8 bytes into a buffer of 8 on the timerfd.
            let n = unsafe {
                libc::read(
                    guard.get_inner().as_raw_fd(),
                    expirations.as_mut_ptr().cast(),
                    expirations.len(),
                )
            };
            if n == 8 {
                self.armed_ns = 0;
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err);
            }
            guard.clear_ready();
        }
    }

    /// Arms the timer (absolute time, one shot); a new time replaces the
    /// old and clears an expiry not read yet.
    fn arm(&mut self, mono_ns: u64) -> io::Result<()> {
        // A zero it_value disarms: the earliest real deadline is 1 ns.
        let at = mono_ns.max(1);
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (at / 1_000_000_000) as libc::time_t,
                tv_nsec: (at % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: timerfd_settime on our timerfd with a valid itimerspec.
        let rc = unsafe {
            libc::timerfd_settime(
                self.fd.get_ref().as_raw_fd(),
                libc::TFD_TIMER_ABSTIME,
                &spec,
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed_ns = mono_ns;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::BoundaryTimer;
    use crate::clock::mono_now_ns;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn wakes_at_the_deadline_not_a_millisecond_later() {
        rt().block_on(async {
            let mut t = BoundaryTimer::new().unwrap();
            let mut lates = Vec::new();
            for _ in 0..50 {
                // 300 µs ahead: the event loop's own timers would round it
                // up to the next millisecond.
                let at = mono_now_ns() + 300_000;
                t.wait_until(at).await.unwrap();
                let now = mono_now_ns();
                assert!(now >= at, "woke {} ns early", at - now);
                lates.push(now - at);
            }
            lates.sort_unstable();
            // Half of the wake-ups within 200 µs of the deadline (a loaded
            // machine can delay a few by whole time slices).
            assert!(lates[25] < 200_000, "median lateness {} ns", lates[25]);
        });
    }

    #[test]
    fn a_deadline_in_the_past_returns_at_once() {
        rt().block_on(async {
            let mut t = BoundaryTimer::new().unwrap();
            let start = mono_now_ns();
            t.wait_until(start - 5_000_000).await.unwrap();
            t.wait_until(1).await.unwrap();
            assert!(mono_now_ns() - start < 100_000_000);
        });
    }

    #[test]
    fn a_wait_dropped_before_its_deadline_keeps_the_timer_armed() {
        rt().block_on(async {
            let mut t = BoundaryTimer::new().unwrap();
            let at = mono_now_ns() + 20_000_000;
            // Dropped at once, as when another branch of the event loop
            // wins: the same deadline is then waited for, not re-armed
            // later or lost.
            let dropped =
                tokio::time::timeout(std::time::Duration::from_millis(1), t.wait_until(at)).await;
            assert!(dropped.is_err());
            t.wait_until(at).await.unwrap();
            assert!(mono_now_ns() >= at);
            // A new, later deadline replaces an old one.
            let later = mono_now_ns() + 5_000_000;
            t.wait_until(later).await.unwrap();
            assert!(mono_now_ns() >= later);
        });
    }
}
