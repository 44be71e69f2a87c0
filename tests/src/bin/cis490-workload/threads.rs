//! Worker threads: their own accounting, how many run at once, starting and joining them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, Scope, ScopedJoinHandle};

use anyhow::{Context, Result, anyhow};
use serde::Serialize;

use crate::clock::{gettid, rusage, thread_cpu_ns};

/// One thread's own accounting, taken by the thread itself at the end of its work.
#[derive(Serialize, Debug)]
pub struct ThreadStats {
    pub name: String,
    pub tid: i32,
    /// CLOCK_THREAD_CPUTIME_ID.
    pub cpu_ns: u64,
    /// getrusage(RUSAGE_THREAD).
    pub nvcsw: u64,
    pub nivcsw: u64,
    pub utime_ns: u64,
    pub stime_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub late: Option<bool>,
}

impl ThreadStats {
    pub fn current(late: Option<bool>) -> Self {
        let cpu_ns = thread_cpu_ns();
        let ru = rusage(libc::RUSAGE_THREAD);
        ThreadStats {
            name: thread::current().name().unwrap_or("?").to_string(),
            tid: gettid(),
            cpu_ns,
            nvcsw: ru.nvcsw,
            nivcsw: ru.nivcsw,
            utime_ns: ru.utime_ns,
            stime_ns: ru.stime_ns,
            late,
        }
    }
}

/// Counts threads running workload code at once, the main thread included.
pub struct Alive {
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Alive {
    pub fn new() -> Self {
        Alive {
            now: AtomicUsize::new(1),
            max: AtomicUsize::new(1),
        }
    }
    pub fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
    }
    pub fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
    pub fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

pub fn spawn_named<'s, T: Send + 's>(
    scope: &'s Scope<'s, '_>,
    name: String,
    f: impl FnOnce() -> T + Send + 's,
) -> Result<ScopedJoinHandle<'s, T>> {
    thread::Builder::new()
        .name(name.clone())
        .spawn_scoped(scope, f)
        .with_context(|| format!("cannot start thread {name}"))
}

pub fn join<T>(h: ScopedJoinHandle<'_, T>) -> Result<T> {
    h.join().map_err(|_| anyhow!("a worker thread panicked"))
}
