//! Clocks and the kernel's accounting of this process: CPU clocks, getrusage, thread ids.

use std::io;
use std::thread;
use std::time::Instant;

use serde::Serialize;

pub const NS_PER_MS: u64 = 1_000_000;

/// `clock_gettime(clock)` in ns (a failure, which would mean a bad clock id, panics).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call; clock_gettime only
    // writes into it.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        panic!(
            "clock_gettime({clock}) failed: {}",
            io::Error::last_os_error()
        );
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// On-CPU time of the calling thread since it was created, in ns.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// On-CPU time of the whole process (all threads, exited ones included), in ns.
pub fn process_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// Kernel thread id of the calling thread.
pub fn gettid() -> i32 {
    // SAFETY: gettid takes no arguments, touches no memory and cannot fail.
    unsafe { libc::gettid() }
}

#[derive(Serialize, Debug, Clone, Copy)]
pub struct Rusage {
    pub nvcsw: u64,
    pub nivcsw: u64,
    pub utime_ns: u64,
    pub stime_ns: u64,
}

pub fn timeval_ns(tv: libc::timeval) -> u64 {
    tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1_000
}

/// `getrusage(who)`: `libc::RUSAGE_THREAD` for the calling thread, `libc::RUSAGE_SELF` for the
/// whole process (exited threads included).
pub fn rusage(who: libc::c_int) -> Rusage {
    // SAFETY: `struct rusage` is plain integers and timevals, for which all-zero is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage that outlives the call; getrusage only writes
    // into it.
    let rc = unsafe { libc::getrusage(who, &mut ru) };
    if rc != 0 {
        panic!("getrusage({who}) failed: {}", io::Error::last_os_error());
    }
    Rusage {
        nvcsw: ru.ru_nvcsw as u64,
        nivcsw: ru.ru_nivcsw as u64,
        utime_ns: timeval_ns(ru.ru_utime),
        stime_ns: timeval_ns(ru.ru_stime),
    }
}

pub fn sleep_until(deadline: Instant) {
    thread::sleep(deadline.saturating_duration_since(Instant::now()));
}

pub fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}
