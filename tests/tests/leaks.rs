//! Nothing of cis490 stays in the kernel after it exits, however it exits
//! (docs/reliability.md): no BPF program, map or link, no tracefs mount or
//! tracing state, no perf state. Needs root.
//!
//! The kernel's lists of BPF objects are compared before, during and after
//! a trace: the ids the tracer held (from /proc/PID/fdinfo, read while it
//! runs) must all be gone after it exits, and no cis490 object created
//! since the test started may be left that no live process holds (other
//! tracers may run at the same time on this machine: theirs are held).

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use cis490_tests::{bpf::Held, *};

const T: Duration = Duration::from_secs(60);

/// What tracing and perf look like from outside: the tracefs files a tool
/// could leave changed (dynamic probes, enabled events, the tracer, trace
/// instances), pinned BPF objects, and the perf sysctls.
fn kernel_state() -> BTreeMap<String, String> {
    let mut s = BTreeMap::new();
    let root = Path::new("/sys/kernel/tracing");
    for f in [
        "kprobe_events",
        "uprobe_events",
        "dynamic_events",
        "set_event",
        "current_tracer",
        "tracing_on",
        "set_ftrace_filter",
    ] {
        if let Ok(v) = fs::read_to_string(root.join(f)) {
            s.insert(format!("tracefs/{f}"), v);
        }
    }
    let list = |dir: &str| {
        let mut names: Vec<String> = fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names.join(" ")
    };
    s.insert(
        "tracefs/instances".into(),
        list("/sys/kernel/tracing/instances"),
    );
    s.insert("bpffs".into(), list("/sys/fs/bpf"));
    for f in [
        "perf_event_paranoid",
        "perf_event_mlock_kb",
        "perf_event_max_stack",
    ] {
        if let Ok(v) = fs::read_to_string(format!("/proc/sys/kernel/{f}")) {
            s.insert(f.into(), v);
        }
    }
    s.insert("mounts".into(), mounts_of("thread-self"));
    s
}

/// The tracing-related mounts (tracefs, debugfs, bpffs) of a process's
/// mount namespace, sorted, as "MOUNTPOINT FSTYPE" lines. (Other mounts
/// come and go with the tests other engineers run on this machine at the
/// same time: network namespaces, tmpfs.)
fn mounts_of(pid: &str) -> String {
    let text = fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    let mut m: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let fstype = *f.get(sep + 1)?;
            if !matches!(fstype, "tracefs" | "debugfs" | "bpf") {
                return None;
            }
            Some(format!("{} {fstype}", f.get(4)?))
        })
        .collect();
    m.sort();
    m.join("\n")
}

/// What a tracer held, and how many of its programs are cis490's (by name).
struct Seen {
    held: Held,
    names: BTreeMap<u32, String>,
}

impl Seen {
    fn new() -> Seen {
        Seen {
            held: Held::default(),
            names: BTreeMap::new(),
        }
    }

    /// Adds what `pid` holds now.
    fn look(&mut self, pid: i32) {
        let h = bpf::held_by(pid);
        if h.progs.iter().any(|p| !self.names.contains_key(p)) {
            for (id, (name, _)) in bpf::objects().progs {
                if h.progs.contains(&id) {
                    self.names.insert(id, name);
                }
            }
        }
        self.held.extend(&h);
    }

    /// The tracer held programs, maps and links of its own (the test saw
    /// the run, not an empty process).
    #[track_caller]
    fn assert_something(&self) {
        let names = bpf::cis490_program_names();
        let ours = self.names.values().filter(|n| names.contains(*n)).count();
        let h = &self.held;
        assert!(
            ours >= 10 && h.maps.len() >= 10 && h.links.len() >= 10,
            "the tracer held too little ({ours} of cis490's programs): {h:?}"
        );
    }
}

/// Collects what the tracer holds while it runs, until it exits.
fn watch_holdings(trace: &mut Child) -> Seen {
    let pid = trace.id() as i32;
    let mut seen = Seen::new();
    while trace.try_wait().unwrap().is_none() {
        seen.look(pid);
        std::thread::sleep(Duration::from_millis(20));
    }
    seen
}

/// After the tracer exited: everything it held goes (freed by the kernel
/// when its last fd closes; freeing is deferred, so poll up to 10 s), and
/// no cis490 object is left that nobody holds.
#[track_caller]
fn assert_nothing_left(
    what: &str,
    held: &Held,
    before: &bpf::Objects,
    state: &BTreeMap<String, String>,
) {
    let t0 = Instant::now();
    loop {
        let left = bpf::still_loaded(held);
        let orphans = bpf::orphans_since(before);
        if left.is_empty() && orphans.is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: left in the kernel 10 s after exit: {left:?}; unheld: {orphans:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        &kernel_state(),
        state,
        "{what}: tracing, perf or tracing-mount state changed"
    );
    eprintln!(
        "{what}: {} programs, {} maps, {} links, {} perf fds held while tracing; all gone after {:?}",
        held.progs.len(),
        held.maps.len(),
        held.links.len(),
        held.perf_events,
        t0.elapsed()
    );
}

/// Also checks that the check sees a leak: one of the tracer's maps is
/// pinned (in a bpffs of the test's) while it runs, which keeps it in the
/// kernel after the tracer exits; both detectors must name it until the pin
/// is removed.
#[test]
fn nothing_left_after_a_normal_exit() {
    require_root();
    private_mounts();
    let dir = scratch("leak-normal");
    let state = kernel_state();
    let before = bpf::objects();
    let mut trace = trace_cmd(&dir)
        .args(["--duration", "1.5", "--", "sleep", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = trace.id() as i32;
    let mut seen = Seen::new();
    let bpffs = dir.join("bpffs");
    fs::create_dir_all(&bpffs).unwrap();
    let mut pinned = None;
    while trace.try_wait().unwrap().is_none() {
        seen.look(pid);
        if pinned.is_none()
            && let Some((id, _)) = bpf::objects()
                .maps
                .into_iter()
                .find(|(id, name)| name == "TARGET_GONE" && seen.held.maps.contains(id))
        {
            let st = Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&bpffs)
                .status()
                .unwrap();
            assert!(st.success(), "mount bpffs");
            let map = aya::maps::MapData::from_id(id).unwrap();
            map.pin(bpffs.join("target_gone")).unwrap();
            pinned = Some(id);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let ep = Episode::from_output(&trace.wait_with_output().unwrap());
    assert!(ep.is_done());
    seen.assert_something();
    assert!(
        seen.held.perf_events > 0,
        "no perf counters held: {:?}",
        seen.held
    );
    let id = pinned.expect("the tracer's TARGET_GONE map was never seen");
    let expected = format!("map {id} (TARGET_GONE)");
    let t0 = Instant::now();
    loop {
        let (left, orphans) = (bpf::still_loaded(&seen.held), bpf::orphans_since(&before));
        if left == [expected.clone()] && orphans == [expected.clone()] {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the pinned map is not what is left: {left:?}; unheld: {orphans:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    fs::remove_file(bpffs.join("target_gone")).unwrap();
    // SAFETY: umount2 with a NUL-terminated path.
    let c = std::ffi::CString::new(bpffs.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::umount2(c.as_ptr(), 0) }, 0);
    assert_nothing_left("normal exit", &seen.held, &before, &state);
}

/// Two error exits: the data directory fills up mid-run (a 256 KiB tmpfs),
/// and a command that cannot be executed (its error comes after the probes
/// were attached).
#[test]
fn nothing_left_after_an_error_exit() {
    require_root();
    private_mounts();
    let dir = scratch("leak-error");
    let data = dir.join("data");
    let fs_guard = Tmpfs::mount(&data, "256k", false);
    let state = kernel_state();
    let before = bpf::objects();
    let mut trace = trace_cmd(&dir)
        .args(["--interval-ms", "10", "--", "sleep", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = watch_holdings(&mut trace);
    let out = trace.wait_with_output().unwrap();
    let line = one_line_error(&out, &data);
    assert!(line.contains("No space left on device"), "{line}");
    seen.assert_something();
    assert_nothing_left("disk full", &seen.held, &before, &state);
    drop(fs_guard);

    let state = kernel_state();
    let before = bpf::objects();
    let script = dir.join("bad-interpreter");
    fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = run_with_timeout(trace_cmd(&dir).arg("--").arg(&script), T);
    let line = one_line_error(&out, &dir.join("data"));
    assert!(line.starts_with("error: cannot start"), "{line}");
    let eps: Vec<_> = fs::read_dir(dir.join("data/episodes"))
        .unwrap()
        .flatten()
        .collect();
    let meta = read_meta(&eps[0].path());
    assert!(
        meta["probes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["state"] == "attached"),
        "the probes were not attached before the error"
    );
    assert_nothing_left("exec failure", &Held::default(), &before, &state);
}

#[test]
fn nothing_left_after_sigkill() {
    require_root();
    let dir = scratch("leak-kill");
    let state = kernel_state();
    let before = bpf::objects();
    let mut trace = start_trace(&dir, &["--", "sleep", "60"]);
    let pid = trace.id() as i32;
    let mut seen = Seen::new();
    for _ in 0..10 {
        seen.look(pid);
        std::thread::sleep(Duration::from_millis(30));
    }
    seen.assert_something();
    kill(pid, libc::SIGKILL);
    trace.wait().unwrap();
    assert!(done_markers(&dir.join("data")) == 0);
    assert_nothing_left("SIGKILL", &seen.held, &before, &state);
}

/// Where tracefs is not mounted (here: a private mount namespace with it
/// unmounted), the tracer mounts it for itself in a mount namespace of its
/// own, so the mount is gone when the tracer is, even after SIGKILL; the
/// namespace it was started in never sees it.
#[test]
fn a_tracefs_mount_of_the_tracer_goes_with_it() {
    require_root();
    for kill_it in [false, true] {
        let dir = scratch(&format!("tracefs-{kill_it}"));
        let data = dir.join("data");
        let script = r#"
for m in /sys/kernel/tracing /sys/kernel/debug/tracing /sys/kernel/debug; do
    while umount "$m" 2>/dev/null; do :; done
done
echo before=$(grep -c ' - tracefs ' /proc/self/mountinfo)
"$0" trace --data-dir "$1" --progress-secs 0 --duration "$2" -- sleep 60 &
echo $! > "$1.pid"
wait $!
echo rc=$?
echo after=$(grep -c ' - tracefs ' /proc/self/mountinfo)
"#;
        let host_mounts = mounts_of("thread-self");
        let sh = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", script])
            .arg(bin("cis490"))
            .arg(&data)
            .arg(if kill_it { "60" } else { "1.5" })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pid_file = dir.join("data.pid");
        wait_for_file(&pid_file, T);
        std::thread::sleep(Duration::from_millis(50));
        let tracer: i32 = fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        wait_trace_started(&data, T);
        let theirs = mounts_of(&tracer.to_string());
        assert!(
            theirs.contains("/sys/kernel/tracing tracefs"),
            "the tracer has no tracefs mount:\n{theirs}"
        );
        let sh_mounts = mounts_of(&sh.id().to_string());
        assert!(
            !sh_mounts.contains("tracefs"),
            "tracefs leaked into the namespace:\n{sh_mounts}"
        );
        if kill_it {
            kill(tracer, libc::SIGKILL);
        }
        let out = wait_output(sh, T);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("before=0"), "{text}");
        assert!(text.contains("after=0"), "tracefs left mounted:\n{text}");
        let rc = if kill_it { "rc=137" } else { "rc=0" };
        assert!(
            text.contains(rc),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            mounts_of("thread-self"),
            host_mounts,
            "the test's own mounts changed"
        );
        if !kill_it {
            let ep = episode_dir(&dir);
            let meta = read_meta(&ep);
            let kvm = meta["families"]
                .as_array()
                .unwrap()
                .iter()
                .find(|f| f["family"] == "kvm")
                .unwrap();
            assert!(
                kvm["note"]
                    .as_str()
                    .unwrap_or("")
                    .contains("mounted tracefs"),
                "{kvm}"
            );
        }
    }
}
