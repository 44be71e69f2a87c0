//! Targets at the edges (docs/reliability.md): a pid reused during the run,
//! a target that execs (also from a thread that is not the main one),
//! hundreds of short threads, a zombie, pid 1, kernel threads. Needs root.

use std::{
    fs,
    process::{Command, Stdio},
    time::Duration,
};

use cis490_tests::*;

const T: Duration = Duration::from_secs(60);

/// Totals `cis490 check` compares where a source cannot follow these
/// targets (each test says why), and the sources that cannot.
const KNOWN_DIFFERENCES: &[(&str, &[&str])] = &[
    ("ctx_switches", &["proc", "perf"]),
    ("migrations", &["proc", "perf"]),
    ("cpu_ns", &["perf"]),
];

/// The target (A: 1 thread x 300 ms after SIGUSR1, then exit) exits while
/// the tracer is frozen (SIGSTOP); its pid is then reused by a new process
/// (B: 1 thread x 400 ms), which runs both while the tracer is frozen and
/// after it resumes. B is not traced: the episode ends with target_exited,
/// its CPU is A's work within 2% (B's would add 130%), and no thread of B
/// shows up in events.jsonl.
#[test]
fn a_reused_pid_is_not_traced() {
    require_root();
    let dir = scratch("pid-reuse");
    for attempt in 0..5 {
        let a_json = dir.join(format!("a{attempt}.json"));
        let mut a = Command::new(bin("cis490-workload"))
            .args(["wait-signal", "--threads", "1", "--burn-ms", "300", "--out"])
            .arg(&a_json)
            .spawn()
            .unwrap();
        wait_for_file(&a_json.with_extension("json.ready"), T);
        let pid = a.id() as i32;
        let tdir = dir.join(format!("t{attempt}"));
        let trace = start_trace(
            &tdir,
            &[
                "--target-pid",
                &pid.to_string(),
                "--duration",
                "60",
                "--interval-ms",
                "20",
            ],
        );
        let tracer = trace.id() as i32;
        kill(tracer, libc::SIGSTOP);
        kill(pid, libc::SIGUSR1);
        // Reaping A frees its pid.
        let a_exit = wait_rusage(&mut a);
        let b_json = dir.join(format!("b{attempt}.json"));
        let b = spawn_with_pid(
            pid,
            Command::new(bin("cis490-workload"))
                .args(["cpu", "--threads", "1", "--burn-ms", "400", "--out"])
                .arg(&b_json),
        );
        let Some(mut b) = b else {
            eprintln!("attempt {attempt}: pid {pid} taken by another process");
            kill(tracer, libc::SIGCONT);
            let _ = wait_output(trace, T);
            continue;
        };
        // B burns for a while before the tracer looks again, and goes on
        // burning while it finishes.
        std::thread::sleep(Duration::from_millis(200));
        kill(tracer, libc::SIGCONT);
        let out = wait_output(trace, T);
        assert!(b.wait().unwrap().success());
        let b_cpu = report(&b_json)["process_cpu_ns"].as_f64().unwrap();
        assert!(b_cpu > 3.5e8, "B burned only {b_cpu} ns");
        let ep = Episode::from_output(&out);
        assert_eq!(ep.meta["end_reason"], "target_exited");
        let truth = report(&a_json);
        let before = truth["cpu_ns_before_signal"].as_f64().unwrap();
        assert_cpu_vs_truth(
            "ebpf cpu_ns vs A's work (B must not count)",
            ep.sum("ebpf", "cpu_ns") as f64,
            a_exit.cpu_ns as f64 - before,
            truth["process_cpu_ns"].as_f64().unwrap() - before,
            0.02,
        );
        for e in &ep.events {
            assert!(
                !(e["tid"] == pid && (e["event"] == "thread_started" || e["event"] == "exec")),
                "B shows up in events.jsonl: {e}"
            );
        }
        assert_eq!(ep.rows("ebpf").last().unwrap()["threads"], 0);
        return;
    }
    panic!("could not get the pid reused in 5 attempts");
}

/// A spawned shell burns CPU, then execs the workload's `exec`, whose
/// thread "execer" (not the main thread) execs the workload's `cpu` while
/// two other threads spin: two execs, the second killing every other
/// thread and moving the execer to the process id. The process stays
/// traced: both `exec` events, meta.json names the final program, rows
/// continue after the execs, and cpu_ns is the final program's
/// CLOCK_PROCESS_CPUTIME_ID at its exit stamp (which keeps everything the
/// process did since the shell started), to 1 ms below and its exit and
/// 50 µs per exited thread above.
#[test]
fn a_target_that_execs_keeps_being_traced() {
    require_root();
    let dir = scratch("exec");
    let out_json = dir.join("cpu.json");
    let wl = bin("cis490-workload");
    let script = r#"i=0; while [ $i -lt 150000 ]; do i=$((i+1)); done
exec "$0" exec --threads 3 --burn-ms 200 -- "$0" --exit-stamp "$2" cpu --threads 2 --burn-ms 300 --out "$1""#;
    let stamp_json = dir.join("exit.json");
    let out = run_with_timeout(
        trace_cmd(&dir)
            .args(["--interval-ms", "20", "--", "sh", "-c", script])
            .arg(&wl)
            .arg(&out_json)
            .arg(&stamp_json),
        T,
    );
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);
    let pid = ep.meta["target"]["pid"].as_u64().unwrap();
    assert_eq!(ep.meta["end_reason"], "target_exited");
    assert_eq!(ep.meta["target_exit"]["code"], 0);
    // The released command's own execve of sh, then the two.
    let execs: Vec<_> = ep.events_named("exec").collect();
    assert_eq!(execs.len(), 3, "{execs:?}");
    assert_eq!(execs[0]["comm"], "sh");
    assert_eq!(execs[1]["old_tid"], pid);
    assert_ne!(
        execs[2]["old_tid"], pid,
        "the last exec came from the main thread"
    );
    for e in &execs {
        assert_eq!(e["tid"], pid);
    }
    for e in &execs[1..] {
        assert_eq!(e["comm"], "cis490-workload");
    }
    assert_eq!(ep.meta["target"]["comm"], "cis490-workload");
    assert!(
        ep.meta["target"]["exe"]
            .as_str()
            .unwrap()
            .ends_with("/cis490-workload")
    );
    // The spinners and the old main thread were killed by the exec.
    let killed = ep
        .events_named("thread_exited")
        .filter(|e| e["comm"].as_str().unwrap().starts_with("spinner-"))
        .count();
    assert_eq!(killed, 2);
    let last_exec = execs[2]["seq"].as_u64().unwrap();
    let after: u64 = ep
        .rows("ebpf")
        .iter()
        .filter(|r| r["seq"].as_u64().unwrap() > last_exec)
        .map(|r| r["cpu_ns"].as_u64().unwrap())
        .sum();
    assert!(after > 500_000_000, "only {after} ns of CPU after the exec");
    // The process CPU clock keeps everything since the shell started; the
    // final program reads it as its last act (its exit stamp).
    let exited = ep.events_named("thread_exited").count() as u64;
    assert_traced_cpu_vs_stamp(
        "ebpf cpu_ns vs the process CPU clock",
        ep.sum("ebpf", "cpu_ns"),
        ExitUsage::from_stamp(&stamp_json).cpu_ns,
        exited * per_exited_thread_ns(),
    );
    assert!(truth["process_cpu_ns"].as_u64().unwrap() > 500_000_000);
    assert_eq!(ep.rows("ebpf").last().unwrap()["threads"], 0);
    assert_switches_match_rusage(&ep, &truth, exited);
    eprintln!(
        "slice mismatches {}, map errors {}",
        ep.meta["ebpf"]["slice_mismatches"], ep.meta["ebpf"]["map_errors"]
    );
    assert_eq!(ep.meta["ebpf"]["map_errors"], 0);
    // The /proc oracle cannot tell that the execer took the main thread's
    // id (the kernel gives it the main thread's start time too): it counts
    // the execer's switches before the exec twice, so its per-thread
    // fields may differ. perf's task-clock runs while a thread is on a CPU,
    // time stolen by the hypervisor included, which the scheduler's clock
    // (eBPF, /proc, the process CPU clock) leaves out: a few % more on this
    // VM when both CPUs are busy. Everything else must agree.
    let tolerated = assert_check_passes_but(&ep.dir, KNOWN_DIFFERENCES);
    eprintln!("check: tolerated {tolerated:?}");
}

/// 400 threads started and ended during the run (200 at once, 200 more
/// 300 ms later, 5 ms of CPU each): cpu_ns the process's own clock at its
/// exit stamp (plus its exit and a stated allowance per exited thread), every start
/// and exit in events.jsonl (or counted as dropped), no thread left at the
/// end, no kernel map error.
#[test]
fn hundreds_of_threads_come_and_go() {
    require_root();
    let dir = scratch("many-threads");
    let out_json = dir.join("cpu.json");
    let stamp_json = dir.join("exit.json");
    let n = 200u64;
    let out = run_with_timeout(
        trace_cmd(&dir)
            .arg("--")
            .arg(bin("cis490-workload"))
            .arg("--exit-stamp")
            .arg(&stamp_json)
            .args(["cpu", "--threads", &n.to_string(), "--burn-ms", "5"])
            .args(["--late-threads", &n.to_string(), "--late-delay-ms", "300"])
            .arg("--out")
            .arg(&out_json),
        T,
    );
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);
    // The kernel folds an exiting thread's CPU time into the process's
    // before the thread's last moments (its final switch-out), which only
    // the tracer sees: a few us per thread natively (see loss.rs), about
    // 0.1-0.3 ms under software emulation, where 400 exits add up to ~3%.
    // So: at least the process's own clock at its exit stamp (less what
    // comes before the tracer's baseline), at most that + its exit + an
    // allowance per exited thread (`per_exited_thread_ns`: 50 us natively,
    // 1 ms under emulation).
    let ebpf = ep.sum("ebpf", "cpu_ns");
    let stamp = ExitUsage::from_stamp(&stamp_json).cpu_ns;
    assert!(truth["process_cpu_ns"].as_u64().unwrap() <= stamp);
    assert_traced_cpu_vs_stamp(
        "ebpf cpu_ns vs the process's own clock",
        ebpf,
        stamp,
        2 * n * per_exited_thread_ns(),
    );
    eprintln!(
        "{:.0} ns per exited thread above the exit stamp",
        (ebpf as f64 - stamp as f64) / (2 * n) as f64
    );
    let started = ep.events_named("thread_started").count() as u64;
    let exited = ep.events_named("thread_exited").count() as u64;
    let dropped = ep.meta["ebpf"]["dropped_events"].as_u64().unwrap();
    assert_eq!(
        started + exited + dropped,
        2 * 2 * n + 1,
        "{started} + {exited} + {dropped}"
    );
    assert_eq!(ep.meta["ebpf"]["map_errors"], 0);
    assert_eq!(ep.rows("ebpf").last().unwrap()["threads"], 0);
    assert_switches_match_rusage(&ep, &truth, 2 * n + 1);
    // The oracle cannot see threads born and dead between two polls, and
    // perf's counters count a new thread's first placement differently: their per-thread switch and
    // migration totals fall short here; perf's CPU time as above, and its
    // buckets can hold more CPU than they lasted (1008 ms in 115 ms on 2
    // CPUs once; docs/data-model.md). Under
    // software emulation /proc's process-wide CPU time misses the exiting
    // threads' last moments as the process's total does (above), beyond
    // the check's 2%. Everything else must agree.
    let mut known = KNOWN_DIFFERENCES.to_vec();
    if software_emulated() {
        known.push(("cpu_ns", &["proc", "perf"]));
    }
    let tolerated = assert_check_passes_but(&ep.dir, &known);
    eprintln!("check: tolerated {tolerated:?}");
    // The tracer reads at SCHED_FIFO (`--priority`), ahead of the 200
    // runnable threads: natively the reads at one boundary took 10-25 ms in
    // 11 runs, none skipped (at the normal policy 268-565 ms in 9 runs, 4 to
    // 8 boundaries skipped, and once a bucket held the CPU time of the next
    // ones: 499 ms in 112 ms on 2 CPUs). In the emulated guests the reads'
    // own work is slower: 28 to 111 ms in 32 runs, none skipped.
    let spread = ep.meta["read_spread_max_ns"].as_u64().unwrap();
    let skipped = ep.meta["skipped_boundaries"].as_u64().unwrap();
    eprintln!("reads at one boundary took up to {spread} ns; {skipped} boundaries skipped");
    assert_eq!(ep.meta["tracer_scheduling"]["policy"], "SCHED_FIFO");
    if software_emulated() {
        assert!(
            spread <= 250_000_000,
            "reads at one boundary took {spread} ns"
        );
    } else {
        assert!(
            spread <= 50_000_000,
            "reads at one boundary took {spread} ns"
        );
        assert_eq!(skipped, 0, "boundaries skipped");
    }
    eprintln!(
        "{started} starts, {exited} exits, {dropped} dropped; peak {} threads in a bucket",
        ep.max("ebpf", "threads")
    );
}

/// A zombie (exited, not reaped by its parent) is refused with one clear
/// line, before any episode is created.
#[test]
fn a_zombie_target_is_refused() {
    require_root();
    let dir = scratch("zombie");
    let mut z = Command::new("true").spawn().unwrap();
    let pid = z.id() as i32;
    for _ in 0..500 {
        if proc_state(pid) == Some('Z') {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(proc_state(pid), Some('Z'));
    let out = run_with_timeout(trace_cmd(&dir).args(["--target-pid", &pid.to_string()]), T);
    let line = one_line_error(&out, &dir.join("data"));
    assert_eq!(
        line,
        format!(
            "error: pid {pid} (true) has exited: a zombie its parent has not reaped, nothing to trace"
        )
    );
    assert!(!dir.join("data").exists());
    z.wait().unwrap();
}

/// A process whose main thread exited while another thread runs shows as
/// a zombie in /proc/PID/stat, but it is alive: it is traced (the survivor
/// burns 300 ms once the tracer has started), until it really ends.
#[test]
fn a_live_process_with_a_zombie_main_thread_is_traced() {
    require_root();
    let dir = scratch("zombie-main");
    let out_json = dir.join("main-exits.json");
    let mut wl = Command::new(bin("cis490-workload"))
        .args(["main-exits", "--burn-ms", "300", "--out"])
        .arg(&out_json)
        .spawn()
        .unwrap();
    wait_for_file(&out_json.with_extension("json.ready"), T);
    let pid = wl.id() as i32;
    for _ in 0..500 {
        if proc_state(pid) == Some('Z') {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(proc_state(pid), Some('Z'), "the main thread did not exit");
    // The survivor burns only once the tracer has taken its baseline (a
    // fixed 1.5 s sleep instead was too short in 4 of 12 runs in the
    // emulated guests, where attaching took 0.75 to 1.56 s).
    let trace = start_trace(&dir, &["--target-pid", &pid.to_string()]);
    kill(pid, libc::SIGUSR1);
    let out = wait_output(trace, T);
    let exit = wait_rusage(&mut wl);
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);
    assert_eq!(ep.meta["end_reason"], "target_exited");
    // The tracer attached while the survivor waited: eBPF holds what the
    // process ran from its clock's reading before that wait (waking up
    // included: under software emulation that alone took up to ~5 ms of
    // CPU here, code run for the first time) to its exit.
    let get = |k: &str| truth[k].as_u64().unwrap();
    let since = get("cpu_ns_before_wait");
    let measured = ep.sum("ebpf", "cpu_ns");
    assert!(get("process_cpu_ns") - get("cpu_ns_before_burn") >= 300_000_000);
    assert_traced_cpu_vs_stamp(
        "ebpf cpu_ns vs the process CPU clock since before the wait",
        measured,
        get("process_cpu_ns") - since,
        0,
    );
    // wait4's total also holds the report's writing and the exit up to
    // where the kernel folded the survivor into the process's total; eBPF
    // adds only what the survivor ran after that, to its final switch-out.
    // That thread's exit ends the process (its parent is notified).
    // Measured: eBPF 2 to 35 µs above natively (with both CPUs busy too;
    // +15 to +27 µs in 3 runs since the survivor waits for a signal),
    // -3.7 to +3.6 ms under software emulation in 44 runs with the tracer
    // at SCHED_FIFO (0.03 to 2.1 ms above at the normal policy, with a
    // sleep). Allowed: 100 µs natively, 10 ms emulated; below, as for the
    // exit stamp.
    let reaped = exit.cpu_ns - since;
    let above = if software_emulated() {
        10_000_000
    } else {
        100_000
    };
    assert_within(
        "ebpf cpu_ns vs wait4's total since before the wait",
        measured,
        reaped,
        unseen_before_baseline_ns(reaped),
        above,
    );
    // The /proc oracle keeps a thread's last-seen counts: what the last
    // thread did after the oracle's last read before the process ended is
    // lost to it (seen: 93 switches of a survivor preempted often on a busy
    // machine). eBPF and perf are still held to each other.
    let tolerated = assert_check_passes_but(&ep.dir, &[("ctx_switches", &["proc"])]);
    eprintln!("check: tolerated {tolerated:?}");
}

/// pid 1 is traced like any other process: a complete, valid episode.
#[test]
fn pid_1_is_traced_like_any_other_process() {
    require_root();
    let dir = scratch("pid1");
    let out = run_with_timeout(
        trace_cmd(&dir).args(["--target-pid", "1", "--duration", "1"]),
        T,
    );
    let ep = Episode::from_output(&out);
    assert!(ep.is_done());
    assert_eq!(ep.meta["target"]["pid"], 1);
    assert_eq!(ep.meta["end_reason"], "duration");
    for s in ["ebpf", "proc"] {
        let n = ep.rows(s).len();
        assert!((9..=12).contains(&n), "{n} {s} rows for 1 s");
    }
    assert!(ep.max("proc", "threads") >= 1);
    // The sandbox this was written in hides its pid 1 from the kernel's
    // task iterators (no `iter/task` run visits it, with or without a pid
    // filter), so the live threads' counters cannot be read there: the
    // tracer must then say so and write `null`, never a wrong number.
    let sched = ep.meta["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["family"] == "sched")
        .unwrap()
        .clone();
    let blind = sched["note"]
        .as_str()
        .is_some_and(|n| n.contains("task iterator shows none"));
    eprintln!("sched family: {sched}");
    for r in ep.rows("ebpf") {
        if blind {
            assert!(r["threads"].is_null() && r["cpu_ns"].is_null(), "{r}");
        } else {
            assert!(r["threads"].as_u64().unwrap() >= 1, "{r}");
        }
    }
    assert_check_passes(&ep.dir);
}

/// Kernel threads are refused with one clear line naming the thread, and
/// no episode: kthreadd (pid 2) and another one found in /proc.
#[test]
fn kernel_threads_are_refused() {
    require_root();
    let dir = scratch("kthread");
    let other = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&p| p > 2)
        .find(|&p| {
            // PF_KTHREAD in the flags (field 9) of /proc/PID/stat.
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(6)?
                        .parse::<u64>()
                        .ok()
                })
                .is_some_and(|f| f & 0x0020_0000 != 0)
        })
        .expect("no kernel thread besides kthreadd");
    for pid in [2, other] {
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        let out = run_with_timeout(
            trace_cmd(&dir)
                .args(["--target-pid", &pid.to_string()])
                .stdin(Stdio::null()),
            T,
        );
        let line = one_line_error(&out, &dir.join("data"));
        assert_eq!(
            line,
            format!(
                "error: pid {pid} ({}) is a kernel thread: cis490 traces user processes",
                comm.trim()
            )
        );
        assert!(!dir.join("data").exists());
    }
}

/// A thread the kernel creates in the target's thread group without
/// clone(2) (io_uring's submission-queue thread: no `sched_process_fork`)
/// is in `events.jsonl` like every other thread: started, named, exited.
#[test]
fn threads_the_kernel_creates_for_the_target_are_in_the_events() {
    require_root();
    let dir = scratch("io-uring");
    let out_json = dir.join("io-uring.json");
    let out = run_with_timeout(
        trace_cmd(&dir)
            .arg("--")
            .arg(bin("cis490-workload"))
            .args(["io-uring", "--hold-ms", "400", "--out"])
            .arg(&out_json),
        Duration::from_secs(60),
    );
    let ep = Episode::from_output(&out);
    assert!(ep.is_done());
    let _ = report(&out_json);
    let renamed: Vec<u64> = ep
        .events_named("thread_renamed")
        .filter(|e| e["comm"].as_str().is_some_and(|c| c.starts_with("iou-sqp")))
        .map(|e| e["tid"].as_u64().unwrap())
        .collect();
    assert_eq!(renamed.len(), 1, "no iou-sqp thread named: {:?}", ep.events);
    let tid = renamed[0];
    let started: Vec<&serde_json::Value> = ep
        .events_named("thread_started")
        .filter(|e| e["tid"].as_u64() == Some(tid))
        .collect();
    assert_eq!(
        started.len(),
        1,
        "the io_uring thread {tid} has no thread_started"
    );
    assert_eq!(
        started[0]["parent_tid"].as_u64(),
        Some(ep.meta["target"]["pid"].as_u64().unwrap())
    );
    assert!(
        ep.events_named("thread_exited")
            .any(|e| e["tid"].as_u64() == Some(tid)),
        "the io_uring thread {tid} never exited"
    );
}

/// A minute of thread churn (8 threads started and joined every 10 ms, each
/// 100 µs of CPU and one 200 µs sleep: some 48000 threads, most of them
/// born and gone between two polls of /proc), traced with the default
/// sources: every source against the process's own totals, and `cis490
/// check` passing with nothing tolerated. Switches: eBPF's are the
/// process's getrusage; the /proc oracle's at most those and at least
/// those less the exited threads' own (their `thread_exited` lines). CPU:
/// eBPF's at least the process's total at its exit and at most that plus
/// the exited threads' CPU on their way out (`meta.json`
/// `ebpf.exit_path_cpu_ns`); the /proc oracle's within a tick per read of
/// the process's total.
#[test]
fn a_minute_of_thread_churn_agrees_with_the_process_totals() {
    require_root();
    let dir = scratch("churn");
    let out_json = dir.join("churn.json");
    // Under software emulation a thread's start and end take far longer:
    // 20 s there.
    let seconds = if software_emulated() { 20 } else { 60 };
    let out = run_with_timeout(
        default_trace_cmd(&dir)
            .arg("--")
            .arg(bin("cis490-workload"))
            .args(["churn", "--seconds", &seconds.to_string(), "--out"])
            .arg(&out_json),
        Duration::from_secs(seconds + 120),
    );
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);
    let threads = truth["threads"].as_u64().unwrap();
    let exits: Vec<_> = ep.events_named("thread_exited").collect();
    let dropped = ep.meta["ebpf"]["dropped_events"].as_u64().unwrap();
    eprintln!(
        "{threads} threads; {} thread_exited lines, {dropped} records dropped",
        exits.len()
    );
    assert!(threads >= 8 * 100 * seconds / 4, "only {threads} threads");
    assert_eq!(exits.len() as u64 + dropped, threads + 1);
    assert_switches_match_rusage(&ep, &truth, threads + 1);

    // The /proc oracle: never above the process's switches, and short of
    // them by at most what the exited threads did.
    let own = |e: &serde_json::Value| {
        e["ctx_switches_voluntary"].as_u64().unwrap()
            + e["ctx_switches_involuntary"].as_u64().unwrap()
    };
    let exited_switches: u64 = exits.iter().map(|e| own(e)).sum();
    let r = |k: &str| truth["rusage_self"][k].as_u64().unwrap();
    let rusage = r("nvcsw") + r("nivcsw");
    let proc = ep.sum("proc", "ctx_switches");
    eprintln!(
        "switches: getrusage {rusage}, ebpf {}, /proc {proc} (the exited threads' own: \
         {exited_switches})",
        ep.sum("ebpf", "ctx_switches")
    );
    // The exited threads' own are read as each begins to exit; switches
    // later in its exit path, before the kernel folds it into the process's
    // totals (waits for the address space's lock as 8 threads exit at once,
    // preemptions), are in getrusage only. Natively the margin is wide;
    // under software emulation /proc fell short by 764 more than the
    // exited threads' own of 35871 (2.1%) once: 5% allowed there.
    let slack = if software_emulated() { rusage / 20 } else { 5 };
    assert!(
        proc <= rusage + 5 && proc + exited_switches + slack >= rusage,
        "/proc switches {proc}: getrusage {rusage}, the exited threads' own {exited_switches} \
         (+ {slack})"
    );

    // CPU against the process's total at its exit (wait4).
    let total = ExitUsage::from_meta(&ep).cpu_ns;
    let ebpf = ep.sum("ebpf", "cpu_ns");
    let way_out = ep.meta["ebpf"]["exit_path_cpu_ns"].as_u64().unwrap();
    eprintln!(
        "cpu: process {total}, ebpf {ebpf} ({:+.0} ns per exited thread; their way out {:.0} ns \
         each), /proc {}",
        (ebpf as f64 - total as f64) / threads as f64,
        way_out as f64 / threads as f64,
        ep.sum("proc", "cpu_ns")
    );
    assert!(
        ebpf + unseen_before_baseline_ns(total) >= total && ebpf <= total + way_out,
        "ebpf cpu_ns {ebpf}: the process's {total}, their way out {way_out}"
    );
    assert!(way_out > 0);
    assert_close(
        "/proc cpu_ns vs the process's total",
        ep.sum("proc", "cpu_ns") as f64,
        total as f64,
        0.02,
    );
    assert_check_passes(&ep.dir);
}
