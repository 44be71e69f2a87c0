//! What the agent reads in the guest: pure parsers of `/proc` and `/sys`
//! text (unit-tested on captured text), and [`Collector`], which reads the
//! files and remembers the processes it has seen.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    io::Read,
    path::{Path, PathBuf},
};

use crate::protocol::{
    AgentLine, CpuTimes, Disk, Exec, MAX_DEVICES, MAX_EXECS, MAX_NAME_BYTES, MAX_VALUE, Memory,
    NetIf, VERSION,
};

/// `/proc/stat`'s aggregate `cpu` line in ns (`ticks_per_s` is `USER_HZ`).
pub fn parse_cpu(stat: &str, ticks_per_s: u64) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let t: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| t.get(i).copied().unwrap_or(0);
    let ns = |ticks: u64| (ticks as u128 * 1_000_000_000 / ticks_per_s.max(1) as u128) as u64;
    Some(CpuTimes {
        user_ns: ns(at(0).saturating_add(at(1))),
        system_ns: ns(at(2).saturating_add(at(5)).saturating_add(at(6))),
        idle_ns: ns(at(3)),
        iowait_ns: ns(at(4)),
    })
}

/// `/proc/meminfo`: used (`MemTotal - MemAvailable`) and available, bytes.
pub fn parse_meminfo(text: &str) -> Option<Memory> {
    let kib = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
            .map(|k| k.saturating_mul(1024))
    };
    let total = kib("MemTotal")?;
    let available = kib("MemAvailable")?;
    Some(Memory {
        used_bytes: total.saturating_sub(available),
        available_bytes: available,
    })
}

/// `/proc/net/dev`: counters per interface, `lo` left out.
pub fn parse_net_dev(text: &str) -> BTreeMap<String, NetIf> {
    let mut out = BTreeMap::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name == "lo" || name.is_empty() || name.len() > MAX_NAME_BYTES {
            continue;
        }
        let f: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if f.len() < 10 || out.len() >= MAX_DEVICES {
            continue;
        }
        out.insert(
            name.to_owned(),
            NetIf {
                rx_bytes: f[0],
                rx_packets: f[1],
                tx_bytes: f[8],
                tx_packets: f[9],
            },
        );
    }
    out
}

/// `/sys/block/DEV/stat` (the kernel's `Documentation/block/stat.rst`).
pub fn parse_block_stat(text: &str) -> Option<Disk> {
    let f: Vec<u64> = text
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if f.len() < 7 {
        return None;
    }
    Some(Disk {
        read_ios: f[0],
        read_bytes: f[2].saturating_mul(512),
        write_ios: f[4],
        write_bytes: f[6].saturating_mul(512),
    })
}

/// Sockets in `/proc/net/tcp` (or `tcp6`) that are not listening (state
/// `0A`).
pub fn count_tcp_conns(text: &str) -> u64 {
    text.lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(3).is_some_and(|st| st != "0A"))
        .count() as u64
}

/// What the agent needs of `/proc/PID/stat`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub comm: String,
    pub ppid: u32,
    /// `PF_KTHREAD` is set in its flags.
    pub kernel_thread: bool,
}

/// `/proc/PID/stat`: the command name sits between the first `(` and the
/// last `)`, so a name with spaces or parentheses does not shift the fields.
pub fn parse_pid_stat(text: &str) -> Option<ProcStat> {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm: String = text
        .get(open + 1..close)?
        .chars()
        .take(MAX_NAME_BYTES)
        .collect();
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // rest[0] is the state, rest[1] the ppid, rest[6] the flags.
    let ppid = rest.get(1)?.parse().ok()?;
    let flags: u64 = rest.get(6)?.parse().ok()?;
    Some(ProcStat {
        comm,
        ppid,
        kernel_thread: flags & PF_KTHREAD != 0,
    })
}

/// How long a forked process may keep its parent's name before it is
/// listed with it. Under TCG a guest busy with its workload can take well
/// over one 100 ms interval between a `fork` and its `execve`.
pub const YOUNG_LIMIT_NS: u64 = 2_000_000_000;

/// A new process whose name may not be final when first seen: it had its
/// parent's name (forked, its `execve` not yet done), or a name that is not
/// its `argv[0]` (busybox re-executes itself as `/proc/self/exe`, named
/// `exe` until it names itself after the applet). It is listed at the first
/// scan that finds the same name as the scan before, other than the
/// parent's; or, gone, with the last name seen; or after `YOUNG_LIMIT_NS`
/// (a subshell that never execs) with the name it has then.
struct Young {
    /// `comm` is the name the last scan saw.
    exec: Exec,
    parent_comm: String,
    /// When first seen (monotonic ns).
    since: u64,
}

/// `comm` is what the kernel makes of `argv[0]`: its last path component,
/// cut to 15 bytes. `cmdline` is `/proc/PID/cmdline` (NUL-separated).
pub fn comm_is_argv0(comm: &str, cmdline: &str) -> bool {
    let argv0 = cmdline.split('\0').next().unwrap_or("");
    let base = argv0.rsplit('/').next().unwrap_or("").as_bytes();
    !comm.is_empty() && &base[..base.len().min(15)] == comm.as_bytes()
}

/// The guest's state between two lines.
pub struct Collector {
    root: PathBuf,
    sys_block: PathBuf,
    ticks_per_s: u64,
    /// Processes seen (user-space and kernel threads, so a kernel thread is
    /// read once).
    seen: HashSet<u32>,
    /// Pids that were kernel threads when seen.
    kernel: HashSet<u32>,
    first_scan: bool,
    /// Started processes not yet written (kept until a line is written).
    pending: Vec<Exec>,
    /// New processes whose name may still change (see [`Young`]).
    young: HashMap<u32, Young>,
    young_limit_ns: u64,
    pending_left_out: u64,
    seq: u64,
    pub unsent_lines: u64,
}

impl Collector {
    /// Reads `/proc` and `/sys/block` (other roots: for tests).
    pub fn new(proc_root: &Path, sys_block: &Path) -> Self {
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Self {
            root: proc_root.to_owned(),
            sys_block: sys_block.to_owned(),
            ticks_per_s: if hz > 0 { hz as u64 } else { 100 },
            seen: HashSet::new(),
            kernel: HashSet::new(),
            first_scan: true,
            pending: Vec::new(),
            young: HashMap::new(),
            young_limit_ns: YOUNG_LIMIT_NS,
            pending_left_out: 0,
            seq: 0,
            unsent_lines: 0,
        }
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.root.join(rel)).unwrap_or_default()
    }

    /// The first 4 KiB of a file (a guest process's `cmdline` can be long).
    fn read_capped(&self, rel: &str) -> String {
        let mut buf = Vec::new();
        if let Ok(f) = fs::File::open(self.root.join(rel)) {
            let _ = f.take(4096).read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Scans `/proc` for processes: returns the user-space processes alive
    /// and queues those not seen before (none on the first scan: they were
    /// there when the agent started).
    fn scan_processes(&mut self) -> u64 {
        let now = clock_ns(libc::CLOCK_MONOTONIC);
        let mut alive = HashSet::new();
        let mut user = 0;
        for entry in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            alive.insert(pid);
            if self.seen.contains(&pid) {
                if !self.kernel.contains(&pid) {
                    user += 1;
                }
                continue;
            }
            let Some(st) = parse_pid_stat(&self.read(&format!("{pid}/stat"))) else {
                // Gone between the listing and the read.
                continue;
            };
            if let Some(y) = self.young.get_mut(&pid) {
                user += 1;
                // Listed once its name holds from one scan to the next and
                // is not its parent's, or at the limit.
                let settled = st.comm == y.exec.comm && st.comm != y.parent_comm;
                if settled || now.saturating_sub(y.since) >= self.young_limit_ns {
                    let mut e = self.young.remove(&pid).expect("just found").exec;
                    e.comm = st.comm;
                    self.seen.insert(pid);
                    self.queue(e);
                } else {
                    y.exec.comm = st.comm;
                }
                continue;
            }
            if st.kernel_thread {
                self.seen.insert(pid);
                self.kernel.insert(pid);
                continue;
            }
            user += 1;
            if self.first_scan {
                self.seen.insert(pid);
                continue;
            }
            let parent_comm = parse_pid_stat(&self.read(&format!("{}/stat", st.ppid)))
                .map(|p| p.comm)
                .unwrap_or_default();
            let e = Exec {
                pid,
                ppid: st.ppid,
                comm: st.comm,
            };
            let plain = e.comm != parent_comm
                && comm_is_argv0(&e.comm, &self.read_capped(&format!("{pid}/cmdline")));
            if plain || self.young.len() >= MAX_EXECS {
                self.seen.insert(pid);
                self.queue(e);
            } else {
                self.young.insert(
                    pid,
                    Young {
                        exec: e,
                        parent_comm,
                        since: now,
                    },
                );
            }
        }
        // A young process gone before the next scan: it started; its last
        // name is the one it had.
        let gone: Vec<Exec> = self
            .young
            .extract_if(|p, _| !alive.contains(p))
            .map(|(_, y)| y.exec)
            .collect();
        for e in gone {
            self.queue(e);
        }
        // A pid that is gone may come back as a new process.
        self.seen.retain(|p| alive.contains(p));
        self.kernel.retain(|p| alive.contains(p));
        self.first_scan = false;
        user
    }

    fn queue(&mut self, e: Exec) {
        if self.pending.len() < MAX_EXECS {
            self.pending.push(e);
        } else {
            self.pending_left_out += 1;
        }
    }

    /// One line: everything read now. `written` must be called if it was
    /// written, `unsent` if not.
    pub fn collect(&mut self) -> AgentLine {
        let procs = self.scan_processes();
        let mut disks = BTreeMap::new();
        let mut names: Vec<String> = fs::read_dir(&self.sys_block)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with("loop") && !n.starts_with("ram"))
            .filter(|n| n.len() <= MAX_NAME_BYTES)
            .collect();
        names.sort();
        for name in names.into_iter().take(MAX_DEVICES) {
            let text =
                fs::read_to_string(self.sys_block.join(&name).join("stat")).unwrap_or_default();
            if let Some(d) = parse_block_stat(&text) {
                disks.insert(name, d);
            }
        }
        let cap = |v: u64| v.min(MAX_VALUE);
        let (mono, wall) = (
            clock_ns(libc::CLOCK_MONOTONIC),
            clock_ns(libc::CLOCK_REALTIME),
        );
        let line = AgentLine {
            v: VERSION,
            seq: self.seq,
            boot_id: self
                .read("sys/kernel/random/boot_id")
                .trim()
                .chars()
                .take(64)
                .collect(),
            guest_mono_ns: cap(mono),
            guest_wall_ns: cap(wall),
            cpu: parse_cpu(&self.read("stat"), self.ticks_per_s).unwrap_or_default(),
            mem: parse_meminfo(&self.read("meminfo")).unwrap_or_default(),
            procs,
            execs: self.pending.clone(),
            execs_left_out: self.pending_left_out,
            net: parse_net_dev(&self.read("net/dev")),
            disks,
            tcp_conns: count_tcp_conns(&self.read("net/tcp"))
                + count_tcp_conns(&self.read("net/tcp6")),
            unsent_lines: self.unsent_lines,
        };
        self.seq += 1;
        line
    }

    /// The last collected line was written: its execs are delivered.
    pub fn written(&mut self) {
        self.pending.clear();
        self.pending_left_out = 0;
    }

    /// The last collected line could not be written: its execs stay queued.
    pub fn unsent(&mut self) {
        self.unsent_lines += 1;
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec.max(0) as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_line_in_ns() {
        let stat = "cpu  100 5 30 4000 7 1 2 9 0 0\ncpu0 50 2 15 2000 3 0 1 4 0 0\nintr 1\n";
        let c = parse_cpu(stat, 100).unwrap();
        assert_eq!(c.user_ns, 1_050_000_000);
        assert_eq!(c.system_ns, 330_000_000);
        assert_eq!(c.idle_ns, 40_000_000_000);
        assert_eq!(c.iowait_ns, 70_000_000);
        assert_eq!(parse_cpu("cpu0 1 2 3\n", 100), None);
        assert_eq!(parse_cpu("cpu  1 x 3\n", 100), None);
    }

    #[test]
    fn meminfo_used_and_available() {
        let t = "MemTotal:        2000 kB\nMemFree:  10 kB\nMemAvailable:    1500 kB\n";
        let m = parse_meminfo(t).unwrap();
        assert_eq!((m.used_bytes, m.available_bytes), (500 * 1024, 1500 * 1024));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn net_dev_without_lo() {
        let t = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\n  \
eth0: 1234567    890    0    0    0     0          0         0  7654321     456    0    0    0     0       0          0\n";
        let n = parse_net_dev(t);
        assert_eq!(n.len(), 1);
        let e = n["eth0"];
        assert_eq!(
            (e.rx_bytes, e.rx_packets, e.tx_bytes, e.tx_packets),
            (1_234_567, 890, 7_654_321, 456)
        );
    }

    #[test]
    fn block_stat_in_bytes() {
        let t = "    1200      3   40960   100    300    0   204800   500    0   600   700    0 0 0 0 0 0\n";
        let d = parse_block_stat(t).unwrap();
        assert_eq!(
            (d.read_ios, d.read_bytes, d.write_ios, d.write_bytes),
            (1200, 40960 * 512, 300, 204_800 * 512)
        );
        assert_eq!(parse_block_stat("1 2 3"), None);
    }

    #[test]
    fn tcp_conns_skip_listeners() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue\n   \
0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n   \
1: 0100007F:8AE2 0100007F:0016 01 00000000:00000000 00:00000000 00000000\n   \
2: 0100007F:8AE4 0100007F:0016 06 00000000:00000000 00:00000000 00000000\n";
        assert_eq!(count_tcp_conns(t), 2);
        assert_eq!(count_tcp_conns(""), 0);
    }

    #[test]
    fn comm_against_argv0() {
        assert!(comm_is_argv0("sleep", "sleep\u{0}3\u{0}"));
        assert!(comm_is_argv0("sleep", "/bin/sleep\u{0}"));
        assert!(comm_is_argv0(
            "a_very_long_pro",
            "/x/a_very_long_program\u{0}"
        ));
        assert!(!comm_is_argv0("exe", "sleep\u{0}3\u{0}"));
        assert!(!comm_is_argv0("bash", "-bash\u{0}"));
        assert!(!comm_is_argv0("", ""));
    }

    #[test]
    fn pid_stat_with_a_hostile_comm() {
        let s = parse_pid_stat("42 (a) b (c) S 7 42 42 0 -1 4194560 100 0 0 0").unwrap();
        assert_eq!(
            s,
            ProcStat {
                comm: "a) b (c".into(),
                ppid: 7,
                kernel_thread: false
            }
        );
        let k = parse_pid_stat("2 (kthreadd) S 0 0 0 0 -1 2129984 0 0").unwrap();
        assert!(k.kernel_thread);
        assert_eq!(parse_pid_stat("42 (x S 7"), None);
    }

    #[test]
    fn the_collector_reports_new_processes_once_and_keeps_unsent_ones() {
        let dir = std::env::temp_dir().join(format!("cis490-agent-test-{}", std::process::id()));
        let proc_root = dir.join("proc");
        let block = dir.join("block");
        let _ = fs::remove_dir_all(&dir);
        let add = |pid: u32, comm: &str, flags: u64| {
            fs::create_dir_all(proc_root.join(pid.to_string())).unwrap();
            fs::write(
                proc_root.join(format!("{pid}/stat")),
                format!("{pid} ({comm}) S 1 {pid} {pid} 0 -1 {flags} 0 0"),
            )
            .unwrap();
            fs::write(
                proc_root.join(format!("{pid}/cmdline")),
                format!("/bin/{comm}\u{0}"),
            )
            .unwrap();
        };
        let argv = |pid: u32, cmdline: &str| {
            fs::write(proc_root.join(format!("{pid}/cmdline")), cmdline).unwrap();
        };
        add(1, "init", 0);
        add(2, "kthreadd", 0x0020_0000);
        fs::create_dir_all(block.join("vda")).unwrap();
        fs::write(block.join("vda/stat"), "1 0 8 0 2 0 16 0 0 0 0").unwrap();
        fs::create_dir_all(block.join("loop0")).unwrap();
        let mut c = Collector::new(&proc_root, &block);
        let first = c.collect();
        assert_eq!((first.procs, first.execs.len(), first.seq), (1, 0, 0));
        assert_eq!(first.disks.keys().collect::<Vec<_>>(), ["vda"]);
        assert_eq!(first.disks["vda"].write_bytes, 16 * 512);
        c.written();
        add(50, "sleep", 0);
        add(51, "kworker/0:1", 0x0020_0000);
        let second = c.collect();
        assert_eq!(second.procs, 2);
        assert_eq!(
            second.execs,
            vec![Exec {
                pid: 50,
                ppid: 1,
                comm: "sleep".into()
            }]
        );
        c.unsent();
        let third = c.collect();
        assert_eq!(third.execs.len(), 1, "an unsent exec is sent again");
        assert_eq!(third.unsent_lines, 1);
        c.written();
        assert!(c.collect().execs.is_empty());
        c.written();
        let names = |l: &AgentLine| -> Vec<(u32, String)> {
            let mut v: Vec<_> = l.execs.iter().map(|e| (e.pid, e.comm.clone())).collect();
            v.sort();
            v
        };
        // Forked but not yet exec'd (the parent's name): it waits until a
        // name other than the parent's holds from one scan to the next; one
        // gone before that is listed with the name it had.
        add(60, "init", 0);
        add(61, "init", 0);
        let fourth = c.collect();
        assert!(fourth.execs.is_empty(), "{:?}", fourth.execs);
        assert_eq!(fourth.procs, 4, "a waiting process is counted alive");
        c.written();
        add(60, "sleep", 0);
        fs::remove_dir_all(proc_root.join("61")).unwrap();
        assert_eq!(names(&c.collect()), [(61, "init".into())]);
        c.written();
        assert_eq!(names(&c.collect()), [(60, "sleep".into())]);
        c.written();
        // busybox re-executing itself: `exe` (not its argv[0]) until it
        // names itself after the applet.
        add(63, "exe", 0);
        argv(63, "sleep\u{0}3\u{0}");
        assert!(c.collect().execs.is_empty());
        c.written();
        add(63, "sleep", 0);
        assert!(c.collect().execs.is_empty());
        c.written();
        assert_eq!(names(&c.collect()), [(63, "sleep".into())]);
        c.written();
        // A script: named after itself, argv[0] its interpreter; listed
        // one scan later.
        add(64, "job.sh", 0);
        argv(64, "/bin/sh\u{0}/opt/job.sh\u{0}");
        assert!(c.collect().execs.is_empty());
        c.written();
        assert_eq!(names(&c.collect()), [(64, "job.sh".into())]);
        c.written();
        // Its parent's name still, scan after scan (a subshell): listed
        // with it at the limit.
        add(62, "init", 0);
        assert!(c.collect().execs.is_empty());
        c.written();
        assert!(c.collect().execs.is_empty());
        c.written();
        c.young_limit_ns = 0;
        assert_eq!(names(&c.collect()), [(62, "init".into())]);
        c.written();
        assert!(c.collect().execs.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
