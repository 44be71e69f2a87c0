//! What the bench reads about a process: its CPU time now (precise, from
//! every thread's `schedstat`), the run time of the BPF programs it holds
//! (`/proc/PID/fdinfo`, filled while `kernel.bpf_stats_enabled` is 1), and
//! its `wait4` resource usage when it ends. Plus the guard that turns BPF
//! statistics on for the bench and always back off.

use std::{
    fs,
    process::Child,
    sync::atomic::{AtomicU8, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// CPU time of all live threads of `pid`, ns (`se.sum_exec_runtime`, the
/// first field of `/proc/PID/task/TID/schedstat`). Exact to the nanosecond,
/// unlike `/proc/PID/stat` (clock ticks).
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU time of the whole process `pid` (every thread, exited ones
/// included), ns: its process CPU clock (`CLOCK_PROCESS_CPUTIME_ID` of
/// another process, `MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)`), which
/// the kernel lets any process read. `None` once it is gone.
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    let clock = ((!(pid as libc::clockid_t)) << 3) | 2;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into `ts`.
    let r = unsafe { libc::clock_gettime(clock, &mut ts) };
    (r == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Run time and run count summed over the BPF programs a process holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BpfRun {
    pub programs: u32,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

impl BpfRun {
    /// Two sets of programs together.
    pub fn plus(self, other: BpfRun) -> BpfRun {
        BpfRun {
            programs: self.programs + other.programs,
            run_time_ns: self.run_time_ns + other.run_time_ns,
            run_cnt: self.run_cnt + other.run_cnt,
        }
    }

    pub fn since(self, before: BpfRun) -> BpfRun {
        BpfRun {
            programs: self.programs,
            run_time_ns: self.run_time_ns.saturating_sub(before.run_time_ns),
            run_cnt: self.run_cnt.saturating_sub(before.run_cnt),
        }
    }
}

/// Sums `run_time_ns` and `run_cnt` over every BPF program fd of `pid`
/// (`/proc/PID/fdinfo/N` of a program has `prog_id`, `run_time_ns`,
/// `run_cnt`). Programs held only through a link fd are counted through
/// the program fd the loader keeps (aya and bpftrace both keep it).
pub fn bpf_run(pid: u32) -> BpfRun {
    bpf_run_where(pid, |_| true)
}

/// [`bpf_run`] over the programs whose `prog_type` (fdinfo's number, e.g.
/// 3 for a TC classifier) `keep` accepts.
pub fn bpf_run_where(pid: u32, keep: impl Fn(u64) -> bool) -> BpfRun {
    let mut r = BpfRun::default();
    let mut seen = std::collections::BTreeSet::new();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return r;
    };
    for fd in fds.flatten() {
        let Ok(text) = fs::read_to_string(fd.path()) else {
            continue;
        };
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(t), Some(c)) =
            (field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
        else {
            continue;
        };
        if !field("prog_type:").is_some_and(&keep) {
            continue;
        }
        if seen.insert(id) {
            r.programs += 1;
            r.run_time_ns += t;
            r.run_cnt += c;
        }
    }
    r
}

/// `kernel.bpf_stats_enabled` set to 1 while this lives; the old value is
/// put back on drop (also when the bench fails or panics) and on SIGINT/
/// SIGTERM (see [`restore_on_signal`]).
pub struct BpfStats {
    old: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// The value to restore from a signal handler ('0' or '1').
static OLD_STATS: AtomicU8 = AtomicU8::new(b'0');

impl BpfStats {
    pub fn enable() -> Result<BpfStats> {
        let old = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("cannot read {BPF_STATS}"))?
            .trim()
            .to_owned();
        if old == "1" {
            OLD_STATS.store(b'1', Ordering::Relaxed);
        }
        fs::write(BPF_STATS, "1").with_context(|| format!("cannot write {BPF_STATS}"))?;
        Ok(BpfStats { old })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = fs::write(BPF_STATS, &self.old) {
            eprintln!(
                "bench: warning: cannot restore {BPF_STATS} to {}: {e}",
                self.old
            );
        }
    }
}

/// On SIGINT/SIGTERM (the bench interrupted), turns BPF statistics off
/// before dying, so an interrupted bench never leaves them on.
pub fn restore_on_signal() {
    extern "C" fn handler(sig: libc::c_int) {
        // Only async-signal-safe calls: open, write, close, _exit.
        let old = [OLD_STATS.load(Ordering::Relaxed)];
        // SAFETY: a NUL-terminated path and a 1-byte buffer.
        unsafe {
            let fd = libc::open(
                c"/proc/sys/kernel/bpf_stats_enabled".as_ptr(),
                libc::O_WRONLY,
            );
            if fd >= 0 {
                libc::write(fd, old.as_ptr().cast(), 1);
                libc::close(fd);
            }
            libc::_exit(128 + sig);
        }
    }
    // SAFETY: installing a handler that only makes async-signal-safe calls.
    unsafe {
        libc::signal(libc::SIGINT, handler as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, handler as *const () as libc::sighandler_t);
    }
}

/// A memory line of `/proc/WHO/status` (`WHO`: a pid, or `self`), KiB:
/// `VmRSS` (resident now), `VmHWM` (its peak).
pub fn status_kib(who: &str, key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{who}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// This process's own peak resident memory, KiB (`VmHWM`): what the
/// kernel carries into a child's `ru_maxrss` across `execve`.
pub fn own_peak_rss_kib() -> Option<u64> {
    status_kib("self", "VmHWM")
}

/// How a child process ended and what it used (`wait4`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// Exit code, or 128 + signal.
    pub code: i32,
    pub user_ns: u64,
    pub sys_ns: u64,
    pub max_rss_kib: u64,
}

/// Waits (at most `timeout`) for a child to end and returns its `wait4`
/// usage; kills it (SIGKILL) at the timeout and fails.
pub fn wait_usage(child: &mut Child, timeout: Duration) -> Result<Usage> {
    let pid = child.id() as libc::pid_t;
    let t0 = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: a zeroed rusage for wait4 to fill.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child, writing into the two locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                128 + libc::WTERMSIG(status)
            };
            return Ok(Usage {
                code,
                user_ns: ns(ru.ru_utime),
                sys_ns: ns(ru.ru_stime),
                max_rss_kib: ru.ru_maxrss as u64,
            });
        }
        if r < 0 {
            bail!("wait4({pid}): {}", std::io::Error::last_os_error());
        }
        if t0.elapsed() > timeout {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let mut status = 0;
            // SAFETY: reaping it.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            bail!("process {pid} did not end within {timeout:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Sends a signal to a process.
pub fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    // SAFETY: kill(2) with a pid and a signal number.
    if unsafe { libc::kill(pid as libc::pid_t, sig) } != 0 {
        bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The one-minute load average.
pub fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The median of some values (mean of the middle two for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 1.0]), Some(1.0));
    }

    #[test]
    fn own_cpu_time_grows() {
        let me = std::process::id();
        let (a, p) = (cpu_ns(me), process_cpu_ns(me).unwrap());
        // Spin until this process's own CPU clock shows 10 ms more (on a
        // busy machine 20 ms of wall time may give less than that), then
        // both readings must have seen it.
        let t = Instant::now();
        let grown =
            || cpu_ns(me) >= a + 10_000_000 && process_cpu_ns(me).unwrap() >= p + 10_000_000;
        while !grown() && t.elapsed() < Duration::from_secs(10) {}
        assert!(grown(), "10 ms of CPU not seen by both readings in 10 s");
    }
}
