//! The traced process: attach to a running one or spawn a command gated
//! before `execve`, watch for its exit (pidfd), list its threads, and guard
//! against pid reuse.

use std::{
    ffi::{CString, OsStr, OsString},
    fs, io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Serialize;

/// How the target was found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// An existing process (`--target-pid`).
    #[default]
    Attach,
    /// A command cis490 started (`-- COMMAND`).
    Spawn,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Attach => "attach",
            Mode::Spawn => "spawn",
        }
    }
}

/// What meta.json records about the target.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TargetInfo {
    pub pid: i32,
    pub mode: Mode,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Vec<String>,
    /// Process start time (clock ticks after boot, `/proc/PID/stat` field 22).
    pub starttime: u64,
}

/// How the target process came to be traced.
pub struct Target {
    pid: i32,
    pidfd: OwnedFd,
    starttime: u64,
    spawned: Option<Spawned>,
    /// A command spawned by a client of a server (`cis490 trace --server`).
    remote: Option<Remote>,
}

/// A command a `cis490 trace --server` client forked and holds before
/// `execve`: the client releases it and reaps it, and reports how it ended.
pub struct Remote {
    /// Tells the client to release the command.
    pub release: Option<Box<dyn FnOnce() -> Result<()> + Send>>,
    /// How it ended, once the client reported it.
    pub exit: std::sync::Arc<std::sync::Mutex<Option<RemoteExit>>>,
}

/// How a client's command ended, as the client (its parent) saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RemoteExit {
    pub status: ExitStatus,
    pub usage: Option<ExitUsage>,
}

/// A child forked by us, waiting on a pipe before `execve`.
struct Spawned {
    /// Write end of the gate pipe; writing one byte releases the child.
    gate: Option<OwnedFd>,
    /// Read end of the CLOEXEC error pipe: EOF means `execve` succeeded,
    /// otherwise the child wrote its errno.
    exec_err: Option<OwnedFd>,
    program: String,
    reaped: bool,
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success returns a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `/proc/PID/stat` of `pid`; `NotFound` when there is no such process.
fn read_stat(pid: i32) -> io::Result<procfs::process::Stat> {
    let to_io = |e: procfs::ProcError| match e {
        procfs::ProcError::NotFound(_) => {
            io::Error::new(io::ErrorKind::NotFound, "no such process")
        }
        other => io::Error::other(other.to_string()),
    };
    procfs::process::Process::new(pid)
        .map_err(to_io)?
        .stat()
        .map_err(to_io)
}

/// The start time of process `pid` (clock ticks after boot), the pid-reuse
/// guard; `NotFound` when there is no such process.
fn read_starttime(pid: i32) -> io::Result<u64> {
    Ok(read_stat(pid)?.starttime)
}

/// `PF_KTHREAD` in the flags of `/proc/PID/stat`.
const PF_KTHREAD: u32 = 0x0020_0000;

/// Whether every thread of process `pid` has exited (zombie or dead). The
/// thread-group leader alone can be a zombie while other threads run (its
/// main thread called `pthread_exit`): that process is alive.
fn all_threads_exited(pid: i32) -> bool {
    let exited = |tid: u32| {
        fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')')?.1.trim_start().chars().next())
            .is_none_or(|state| state == 'Z' || state == 'X')
    };
    thread_ids(pid).map_or(true, |tids| tids.into_iter().all(exited))
}

/// Thread ids of process `pid` (from `/proc/PID/task`).
/// Sends `sig` to the process behind `pidfd` (never to a reused pid).
pub fn pidfd_send_signal(pidfd: &OwnedFd, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: pidfd_send_signal on an open pidfd with no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            0usize,
            0u32,
        )
    };
    if rc != 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The thread ids of process `pid` (`/proc/PID/task`, through `procfs`):
/// the one place a one-shot listing of a process's threads is made (the
/// /proc source lists them every bucket with its own bounded reader).
pub fn thread_ids(pid: i32) -> io::Result<Vec<u32>> {
    let to_io = |e: procfs::ProcError| match e {
        procfs::ProcError::NotFound(_) => {
            io::Error::new(io::ErrorKind::NotFound, format!("no process {pid}"))
        }
        e => io::Error::other(e.to_string()),
    };
    let tasks = procfs::process::Process::new(pid)
        .and_then(|p| p.tasks())
        .map_err(to_io)?;
    Ok(tasks.flatten().map(|t| t.tid as u32).collect())
}

/// Finds an executable the way `execvp` would.
fn resolve_program(program: &OsStr) -> Result<PathBuf> {
    let shown = program.to_string_lossy();
    let is_exec = |p: &Path| {
        let c = CString::new(p.as_os_str().as_bytes()).ok();
        // SAFETY: access() with a valid NUL-terminated path.
        p.is_file() && c.is_some_and(|c| unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0)
    };
    if program.as_bytes().contains(&b'/') {
        let p = PathBuf::from(program);
        if !p.exists() {
            bail!("cannot start '{shown}': no such file");
        }
        if !is_exec(&p) {
            bail!("cannot start '{shown}': not an executable file");
        }
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| is_exec(p))
        .ok_or_else(|| anyhow!("cannot start '{shown}': command not found in PATH"))
}

fn pipe(flags: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Target {
    /// A running process. Fails with a one-line reason if there is none.
    pub fn attach(pid: i32) -> Result<Self> {
        if pid <= 0 {
            bail!("invalid pid {pid}: must be a positive process id");
        }
        if pid as u32 == std::process::id() {
            bail!("refusing to trace cis490 itself (pid {pid})");
        }
        let stat = read_stat(pid).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => anyhow!("no process with pid {pid}"),
            _ => anyhow!("cannot read /proc/{pid}/stat: {e}"),
        })?;
        if stat.flags & PF_KTHREAD != 0 {
            bail!(
                "pid {pid} ({}) is a kernel thread: cis490 traces user processes",
                stat.comm
            );
        }
        if matches!(stat.state, 'Z' | 'X') && all_threads_exited(pid) {
            bail!(
                "pid {pid} ({}) has exited: a zombie its parent has not reaped, nothing to trace",
                stat.comm
            );
        }
        let starttime = stat.starttime;
        let pidfd = pidfd_open(pid).map_err(|e| anyhow!("cannot watch pid {pid}: {e}"))?;
        Ok(Self {
            pid,
            pidfd,
            starttime,
            spawned: None,
            remote: None,
        })
    }

    /// A command a client of a server forked and holds before `execve`
    /// (pid `pid`): released through `remote.release`, its end reported by
    /// the client.
    pub fn adopt(pid: i32, remote: Remote) -> Result<Self> {
        let mut t = Self::attach(pid)?;
        t.remote = Some(remote);
        Ok(t)
    }

    /// How a client's command ended, waiting up to 2 s for the client's
    /// report (it comes as soon as the client sees the exit).
    fn remote_exit(&self) -> Option<RemoteExit> {
        let r = self.remote.as_ref()?;
        let t0 = std::time::Instant::now();
        loop {
            if let Some(e) = *r
                .exit
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
            {
                return Some(e);
            }
            if t0.elapsed() > std::time::Duration::from_secs(2) {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Forks a child that will `execve` `argv` once [`Target::release`] is
    /// called, so the tracer can attach to its pid first and see it from its
    /// first instruction. Call before any other thread is started.
    pub fn spawn(argv: &[OsString]) -> Result<Self> {
        let program = argv
            .first()
            .ok_or_else(|| anyhow!("no command given after --"))?;
        let path = resolve_program(program)?;
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| anyhow!("command path contains a NUL byte"))?;
        let c_args = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| anyhow!("a command argument contains a NUL byte"))?;
        let mut c_argv: Vec<*const libc::c_char> = c_args.iter().map(|a| a.as_ptr()).collect();
        c_argv.push(std::ptr::null());

        let (gate_r, gate_w) = pipe(libc::O_CLOEXEC)?;
        let (err_r, err_w) = pipe(libc::O_CLOEXEC)?;
        // SAFETY: getpid has no preconditions.
        let tracer = unsafe { libc::getpid() };
        // SAFETY: between fork and execve the child calls only
        // async-signal-safe functions (prctl, getppid, read, write, close,
        // execv, _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            bail!("fork failed: {}", io::Error::last_os_error());
        }
        if pid == 0 {
            unsafe {
                // The command never outlives the tracer, even a tracer that
                // is killed: the kernel sends it SIGKILL when the tracer's
                // forking (main) thread exits. (Cleared by execve of a
                // set-user-ID program.) Checked after: the tracer may be
                // gone already.
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                );
                if libc::getppid() != tracer {
                    libc::_exit(126);
                }
                libc::close(gate_w.as_raw_fd());
                libc::close(err_r.as_raw_fd());
                let mut b = 0u8;
                let n = libc::read(gate_r.as_raw_fd(), (&raw mut b).cast(), 1);
                if n != 1 {
                    // The tracer went away without releasing us.
                    libc::_exit(126);
                }
                libc::close(gate_r.as_raw_fd());
                // The tracer blocks SIGINT/SIGTERM while it sets up; the
                // command starts with every signal unblocked.
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                libc::execv(c_path.as_ptr(), c_argv.as_ptr());
                let errno = *libc::__errno_location();
                libc::write(err_w.as_raw_fd(), (&raw const errno).cast(), 4);
                libc::_exit(127);
            }
        }
        drop(gate_r);
        drop(err_w);
        let pidfd = pidfd_open(pid).context("pidfd_open of the spawned command")?;
        let starttime = read_starttime(pid).context("reading the spawned command's stat")?;
        Ok(Self {
            pid,
            pidfd,
            starttime,
            remote: None,
            spawned: Some(Spawned {
                gate: Some(gate_w),
                exec_err: Some(err_r),
                program: program.to_string_lossy().into_owned(),
                reaped: false,
            }),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the target is a command started for this trace (here, or
    /// by a server's client).
    pub fn is_spawned(&self) -> bool {
        self.spawned.is_some() || self.remote.is_some()
    }

    /// A file descriptor that becomes readable when the process exits.
    pub fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    /// Lets a spawned child `execve` and reports whether that worked.
    /// A no-op for an attached process.
    pub fn release(&mut self) -> Result<()> {
        if let Some(release) = self.remote.as_mut().and_then(|r| r.release.take()) {
            return release();
        }
        let Some(sp) = self.spawned.as_mut() else {
            return Ok(());
        };
        if let Some(gate) = sp.gate.take() {
            let one = 1u8;
            // SAFETY: writing one byte from a valid buffer to our pipe.
            let n = unsafe { libc::write(gate.as_raw_fd(), (&raw const one).cast(), 1) };
            if n != 1 {
                bail!(
                    "cannot release the spawned command: {}",
                    io::Error::last_os_error()
                );
            }
        }
        if let Some(err) = sp.exec_err.take() {
            let mut errno = [0u8; 4];
            // SAFETY: reading into a valid 4-byte buffer; blocks until the
            // child execs (EOF, CLOEXEC) or writes its errno.
            let n = unsafe { libc::read(err.as_raw_fd(), errno.as_mut_ptr().cast(), 4) };
            if n == 4 {
                let e = io::Error::from_raw_os_error(i32::from_ne_bytes(errno));
                self.reap();
                bail!("cannot start '{}': {e}", sp_program(&self.spawned));
            }
        }
        Ok(())
    }

    /// Fails if the pid now names another process than the one we opened.
    pub fn check_same_process(&self) -> Result<()> {
        match read_starttime(self.pid) {
            Ok(st) if st == self.starttime => Ok(()),
            Ok(_) => bail!("pid {} was reused by another process", self.pid),
            Err(_) => bail!("process {} exited", self.pid),
        }
    }

    /// Whether the process has exited (pidfd readable), without blocking.
    pub fn has_exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd with a zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    /// The exit status of a spawned child that has exited, without reaping
    /// it (the /proc oracle still reads the zombie's final counters).
    pub fn exit_status(&self) -> Option<ExitStatus> {
        if self.remote.is_some() {
            return self.remote_exit().map(|e| e.status);
        }
        self.spawned.as_ref()?;
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child's pidfd with a valid siginfo.
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
            )
        };
        // SAFETY: si_pid/si_status are valid for SIGCHLD-style siginfo.
        if rc != 0 || unsafe { info.si_pid() } == 0 {
            return None;
        }
        let status = unsafe { info.si_status() };
        Some(match info.si_code {
            libc::CLD_EXITED => ExitStatus::Code(status),
            _ => ExitStatus::Signal(status),
        })
    }

    /// The kernel's totals for a spawned child that has exited, without
    /// reaping it: `waitid(WNOWAIT)` with a `struct rusage` (the glibc
    /// wrapper has no such argument), which is `getrusage` of the whole
    /// process, every thread included. Ground truth that ends where the
    /// process ends, unlike anything the process can measure itself.
    pub fn exit_usage(&self) -> Option<ExitUsage> {
        if self.remote.is_some() {
            return self.remote_exit().and_then(|e| e.usage);
        }
        self.spawned.as_ref()?;
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: the raw waitid(2) syscall on our own child's pidfd, with a
        // valid siginfo and rusage to fill.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_waitid,
                libc::P_PIDFD,
                self.pidfd.as_raw_fd() as libc::c_long,
                &mut info as *mut libc::siginfo_t,
                (libc::WEXITED | libc::WNOWAIT | libc::WNOHANG) as libc::c_long,
                &mut ru as *mut libc::rusage,
            )
        };
        // SAFETY: si_pid is valid for SIGCHLD-style siginfo.
        if rc != 0 || unsafe { info.si_pid() } == 0 {
            return None;
        }
        let ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000;
        Some(ExitUsage {
            cpu_ns: ns(ru.ru_utime) + ns(ru.ru_stime),
            utime_ns: ns(ru.ru_utime),
            stime_ns: ns(ru.ru_stime),
            nvcsw: ru.ru_nvcsw as u64,
            nivcsw: ru.ru_nivcsw as u64,
            minflt: ru.ru_minflt as u64,
            majflt: ru.ru_majflt as u64,
        })
    }

    /// Sends `sig` to the process (spawned children only).
    pub fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        pidfd_send_signal(&self.pidfd, sig)
    }

    /// A handle that can kill a spawned command later, from another task
    /// (`None` when tracing a process the tracer did not start).
    pub fn killer(&self) -> Option<OwnedFd> {
        self.is_spawned()
            .then(|| self.pidfd.try_clone().ok())
            .flatten()
    }

    /// Ends a spawned command that is still running when the trace fails:
    /// SIGTERM, SIGKILL after `grace`, then reaps it. One never released
    /// is let go (it exits without running the command). A no-op for an
    /// attached process.
    pub fn end_spawned(&mut self, grace: std::time::Duration) {
        let never_released = match (&mut self.spawned, &mut self.remote) {
            (Some(sp), _) => sp.gate.take().is_some(),
            // The client lets an unreleased command go when it hears the
            // end of the episode.
            (None, Some(r)) => r.release.take().is_some(),
            (None, None) => return,
        };
        let t0 = std::time::Instant::now();
        if !never_released && !self.has_exited() {
            let _ = self.signal(libc::SIGTERM);
            while !self.has_exited() && t0.elapsed() < grace {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if !self.has_exited() {
                let _ = self.signal(libc::SIGKILL);
            }
        }
        // Exits promptly now (SIGKILL, or a closed gate).
        while !self.has_exited() && t0.elapsed() < grace + std::time::Duration::from_secs(1) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        self.reap();
    }

    /// Reaps a spawned child that has exited (no-op otherwise).
    pub fn reap(&mut self) {
        let Some(sp) = self.spawned.as_mut() else {
            return;
        };
        if sp.reaped {
            return;
        }
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: as in exit_status, but consuming the zombie.
        let rc = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            )
        };
        if rc == 0 && unsafe { info.si_pid() } != 0 {
            sp.reaped = true;
        }
    }

    /// What meta.json records about the target.
    pub fn info(&self, argv: Option<&[OsString]>) -> TargetInfo {
        let proc = procfs::process::Process::new(self.pid).ok();
        let comm = proc
            .as_ref()
            .and_then(|p| p.stat().ok())
            .map(|s| s.comm)
            .unwrap_or_default();
        let exe = proc
            .as_ref()
            .and_then(|p| p.exe().ok())
            .map(|p| p.display().to_string());
        let cmdline = match argv {
            Some(a) => a.iter().map(|s| s.to_string_lossy().into_owned()).collect(),
            None => proc
                .as_ref()
                .and_then(|p| p.cmdline().ok())
                .unwrap_or_default(),
        };
        TargetInfo {
            pid: self.pid,
            mode: if self.is_spawned() {
                Mode::Spawn
            } else {
                Mode::Attach
            },
            comm,
            exe,
            cmdline,
            starttime: self.starttime,
        }
    }
}

fn sp_program(sp: &Option<Spawned>) -> &str {
    sp.as_ref().map_or("", |s| s.program.as_str())
}

impl Drop for Target {
    fn drop(&mut self) {
        // A spawned child that was never released exits on its own when the
        // gate closes (read returns 0); reap it if it is already gone.
        if let Some(sp) = self.spawned.as_mut() {
            sp.gate.take();
        }
        self.reap();
    }
}

/// A spawned command's resource usage at its exit, as the kernel totals it
/// for the whole process (`wait4`'s rusage: every thread, µs resolution).
/// A thread's counts are folded into the process's total as it exits, just
/// before its final switch-out, which is therefore not in them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ExitUsage {
    /// `utime_ns + stime_ns`: the threads' total runtime.
    pub cpu_ns: u64,
    pub utime_ns: u64,
    pub stime_ns: u64,
    /// Voluntary context switches.
    pub nvcsw: u64,
    /// Involuntary context switches.
    pub nivcsw: u64,
    pub minflt: u64,
    pub majflt: u64,
}

/// How a spawned command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_to_a_missing_pid_is_a_clear_error() {
        // pid_max is at most 2^22 on Linux.
        let err = Target::attach(4_194_305).err().unwrap().to_string();
        assert_eq!(err, "no process with pid 4194305");
        assert!(Target::attach(0).is_err());
        // kthreadd is pid 2 on Linux.
        let e = Target::attach(2).err().unwrap().to_string();
        assert!(e.contains("kernel thread"), "{e}");
        assert!(Target::attach(std::process::id() as i32).is_err());
    }

    #[test]
    fn unknown_commands_are_clear_errors() {
        let e = resolve_program(OsStr::new("cis490-no-such-command")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot start 'cis490-no-such-command': command not found in PATH"
        );
        let e = resolve_program(OsStr::new("/nonexistent/x")).unwrap_err();
        assert_eq!(e.to_string(), "cannot start '/nonexistent/x': no such file");
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        fs::write(&plain, b"#!/bin/sh\n").unwrap();
        let e = resolve_program(plain.as_os_str()).unwrap_err();
        assert!(e.to_string().contains("not an executable"), "{e}");
        assert!(resolve_program(OsStr::new("true")).is_ok());
    }

    #[test]
    fn spawn_is_gated_until_release() {
        let argv: Vec<OsString> = ["sh", "-c", "exit 7"].iter().map(OsString::from).collect();
        let mut t = Target::spawn(&argv).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!t.has_exited(), "child ran before release");
        // Still our fork, not yet sh: comm is the test binary's.
        assert_eq!(t.info(None).mode, Mode::Spawn);
        t.release().unwrap();
        for _ in 0..200 {
            if t.has_exited() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(t.exit_status(), Some(ExitStatus::Code(7)));
        // Not reaped yet: the zombie's /proc entry is still there.
        assert!(Path::new(&format!("/proc/{}/stat", t.pid())).exists());
        t.reap();
        assert!(!Path::new(&format!("/proc/{}/stat", t.pid())).exists());
    }

    #[test]
    fn a_zombie_is_refused() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        for _ in 0..500 {
            if read_stat(pid).is_ok_and(|s| s.state == 'Z') {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let e = Target::attach(pid).err().unwrap().to_string();
        assert_eq!(
            e,
            format!(
                "pid {pid} (true) has exited: a zombie its parent has not reaped, nothing to trace"
            )
        );
        child.wait().unwrap();
        // This process has live threads. (A live process whose main thread
        // exited: tests/tests/targets.rs.)
        assert!(!all_threads_exited(std::process::id() as i32));
    }

    #[test]
    fn a_spawned_command_that_ignores_sigterm_is_ended() {
        let argv: Vec<OsString> = ["sh", "-c", "trap '' TERM; while :; do sleep 1; done"]
            .iter()
            .map(OsString::from)
            .collect();
        let mut t = Target::spawn(&argv).unwrap();
        t.release().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        let t0 = std::time::Instant::now();
        t.end_spawned(std::time::Duration::from_millis(300));
        assert!(t.has_exited());
        assert!(t0.elapsed() >= std::time::Duration::from_millis(300));
        assert_eq!(t.exit_status(), None, "reaped: no status left to read");
        assert!(!Path::new(&format!("/proc/{}/stat", t.pid())).exists());
        // One never released is let go at once.
        let mut t = Target::spawn(&argv).unwrap();
        let t0 = std::time::Instant::now();
        t.end_spawned(std::time::Duration::from_secs(5));
        assert!(t0.elapsed() < std::time::Duration::from_secs(1));
        assert!(!Path::new(&format!("/proc/{}/stat", t.pid())).exists());
    }

    #[test]
    fn threads_of_this_process_are_listed() {
        let tids = thread_ids(std::process::id() as i32).unwrap();
        assert!(tids.contains(&(std::process::id())));
    }
}
