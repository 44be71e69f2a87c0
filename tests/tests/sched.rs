//! Scheduler telemetry against ground truth and the /proc oracle, on real
//! workloads traced by the real binary. Needs root.

use std::{process::Command, time::Duration};

use cis490_tests::*;

const T: Duration = Duration::from_secs(60);

/// 2 threads x 800 ms of CPU, traced from exec: eBPF cpu_ns within the
/// workload's own CLOCK_PROCESS_CPUTIME_ID at its exit stamp less 1 ms
/// (`unseen_before_baseline_ns`) and that plus its exit (2 ms,
/// `exit_tail_ns`): -0.06% to +0.13% natively; within 2% of the /proc
/// oracle. A busy process beside it (not traced) must not count.
#[test]
fn cpu_time_matches_ground_truth_and_oracle() {
    require_root();
    let dir = scratch("cpu");
    let out_json = dir.join("cpu.json");
    let stamp_json = dir.join("exit.json");
    // Noise: another process burning CPU at the same time, not traced.
    let mut noise = Command::new(bin("cis490-workload"))
        .args(["cpu", "--threads", "1", "--burn-ms", "1500", "--out"])
        .arg(dir.join("noise.json"))
        .spawn()
        .unwrap();
    let out = run_with_timeout(
        trace_cmd(&dir)
            .arg("--")
            .arg(bin("cis490-workload"))
            .arg("--exit-stamp")
            .arg(&stamp_json)
            .args([
                "cpu",
                "--threads",
                "2",
                "--burn-ms",
                "800",
                "--linger-ms",
                "250",
                "--out",
            ])
            .arg(&out_json),
        T,
    );
    noise.wait().unwrap();
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);
    assert!(ep.is_done());
    assert_eq!(ep.meta["status"], "complete");
    assert_eq!(ep.meta["end_reason"], "target_exited");

    // Ground truth: the workload's own clock, read as its last act before
    // its exit (`--exit-stamp`); eBPF covers that and the exit after it
    // (well under a millisecond natively, tens of ms under software
    // emulation in a VM: `exit_tail_ns`).
    let exit = ExitUsage::from_stamp(&stamp_json);
    eprintln!(
        "exit stamp {exit:?}; meta.json target_rusage {:?}",
        ExitUsage::from_meta(&ep)
    );
    let burn = truth["burn_cpu_ns"].as_f64().unwrap();
    assert!(burn > 1.5e9, "the workload burned {burn} ns");
    assert_traced_cpu_vs_stamp(
        "ebpf cpu_ns vs ground truth",
        ep.sum("ebpf", "cpu_ns"),
        exit.cpu_ns,
        0,
    );
    let ebpf = ep.sum("ebpf", "cpu_ns") as f64;
    let proc = ep.sum("proc", "cpu_ns") as f64;
    assert_close("ebpf cpu_ns vs /proc oracle", ebpf, proc, 0.02);
    // Threads: main + 2 burners at the peak, in both sources.
    assert_eq!(
        ep.max("ebpf", "threads"),
        truth["max_threads_alive"].as_u64().unwrap()
    );
    assert_eq!(
        ep.max("proc", "threads"),
        truth["max_threads_alive"].as_u64().unwrap()
    );
    // Context switches: the kernel's own counts for the whole process at its
    // exit, the workload's getrusage before its report (a lower bound: its
    // exit is still to come), and the oracle. The burners linger 250 ms
    // before exiting so the oracle (which keeps an exited thread's last-seen
    // counts) sees them nearly whole. A thread's final switch-out comes
    // after the kernel folded it into the process's totals: the tracer
    // leaves it out, as they do (the main thread's is in its process's
    // total at exit, and in the tracer's).
    //
    // What a thread does after the oracle's last poll (its wake-up from the
    // linger, its exit) only the tracer sees: natively a few µs, under
    // software emulation ms of waiting for a CPU, a preemption or a
    // migration. So the per-thread counters are compared with the oracle
    // where it sees every thread, the buckets before the first of the
    // workload's threads exits; over the whole episode the tracer sees at
    // least what the oracle saw.
    let tids: Vec<&serde_json::Value> = truth["threads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["tid"])
        .collect();
    let first_exit = ep
        .events_named("thread_exited")
        .filter(|e| tids.contains(&&e["tid"]))
        .map(|e| e["seq"].as_u64().unwrap() as usize)
        .min()
        .expect("no thread_exited event for the burners");
    let seen = |source: &str, field: &str| -> u64 {
        ep.rows(source)[..first_exit]
            .iter()
            .map(|r| r[field].as_u64().unwrap())
            .sum()
    };
    let rusage = &truth["rusage_self"];
    for (field, key, x) in [
        ("ctx_switches_involuntary", "nivcsw", exit.nivcsw),
        ("ctx_switches_voluntary", "nvcsw", exit.nvcsw),
    ] {
        let (e, p, r) = (
            ep.sum("ebpf", field),
            ep.sum("proc", field),
            rusage[key].as_u64().unwrap(),
        );
        eprintln!("{field}: ebpf {e}, at exit {x}, getrusage before the report {r}, /proc {p}");
        // Under software emulation an exiting thread's last switch can be
        // missing from the episode (its final switch-out, where the probes
        // take an exited thread's final counters, after the last row, or
        // not delivered to BPF): seen in TCG VMs, 136 involuntary switches
        // of 137, and 111 of 112. Natively none may be missing.
        let late = if software_emulated() { 2 } else { 0 };
        assert!(
            e + late >= x && e <= x + 5,
            "{field}: ebpf {e} vs the process's total at exit {x} (at most {late} missing)"
        );
        assert!(
            e + late >= r,
            "{field}: ebpf {e} vs getrusage {r} (at most {late} missing)"
        );
        let (es, ps) = (seen("ebpf", field), seen("proc", field));
        assert!(
            es.abs_diff(ps) <= 5,
            "{field} before the first thread exit: ebpf {es} vs /proc {ps}"
        );
        assert!(e + 5 >= p, "{field}: ebpf {e} vs /proc {p}");
    }
    assert!(ep.sum("ebpf", "ctx_switches_involuntary") > 0);
    // Run-queue delay and migrations: the same kernel counters as /proc.
    assert_close(
        "runq_delay_ns ebpf vs /proc before the first thread exit",
        seen("ebpf", "runq_delay_ns") as f64,
        seen("proc", "runq_delay_ns") as f64,
        0.02,
    );
    let (e, p) = (
        ep.sum("ebpf", "runq_delay_ns") as f64,
        ep.sum("proc", "runq_delay_ns") as f64,
    );
    eprintln!(
        "runq_delay_ns ebpf vs /proc, whole episode: {e} vs {p} ({:+.3}%)",
        (e - p) / p * 100.0
    );
    assert!(e >= p * 0.98, "runq_delay_ns: ebpf {e} vs /proc {p}");
    let (es, ps) = (seen("ebpf", "migrations"), seen("proc", "migrations"));
    assert!(
        es.abs_diff(ps) <= 1,
        "migrations before the first thread exit: ebpf {es} vs /proc {ps}"
    );
    let (e, p) = (ep.sum("ebpf", "migrations"), ep.sum("proc", "migrations"));
    assert!(e + 1 >= p, "migrations: ebpf {e} vs /proc {p}");
    // Nothing lost.
    assert_eq!(ep.sum("ebpf", "dropped_events"), 0);
    // Bucket by bucket: never more CPU than the machine has in the bucket
    // (a slice counted both as running and as done would break this). The
    // tracer reads its counters a moment after the bucket's clock pair; that
    // moment is microseconds natively, but under software emulation the
    // emulator's own scheduling stretches it to tens of ms now and then,
    // which moves that much CPU across a boundary: not checked there.
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let rows = if software_emulated() {
        eprintln!(
            "per-bucket CPU bound not checked: this VM runs under software emulation (the \
             counters are read up to tens of ms after the bucket's end)"
        );
        &[][..]
    } else {
        ep.rows("ebpf")
    };
    for r in rows {
        let (cpu, iv) = (
            r["cpu_ns"].as_u64().unwrap(),
            r["interval_ns"].as_u64().unwrap(),
        );
        assert!(
            cpu <= iv * cpus + 100_000,
            "bucket {} has {cpu} ns of CPU in {iv} ns",
            r["seq"]
        );
    }
    // Rows of both sources share seq and clock pair, bucket by bucket.
    let (er, pr) = (ep.rows("ebpf"), ep.rows("proc"));
    assert_eq!(er.len(), pr.len());
    for (a, b) in er.iter().zip(pr) {
        for k in ["seq", "t_mono_ns", "t_wall_ns", "interval_ns"] {
            assert_eq!(a[k], b[k], "{k}");
        }
    }
}

/// meta.json `target_rusage` (the tracer's `wait4` of a spawned command)
/// against the command's own totals taken as its last act before exiting
/// (`--exit-stamp`): CPU at least the stamp (less the µs its resolution
/// drops) and at most the stamp plus the exit (`exit_tail_ns`); context
/// switches at least the stamp's and at most 2 more (the exit's own; 8
/// under software emulation, below).
#[test]
fn target_rusage_is_the_process_total_at_exit() {
    require_root();
    let dir = scratch("rusage");
    let stamp_json = dir.join("exit.json");
    let out = run_with_timeout(
        trace_cmd(&dir)
            .arg("--")
            .arg(bin("cis490-workload"))
            .arg("--exit-stamp")
            .arg(&stamp_json)
            .args(["cpu", "--threads", "2", "--burn-ms", "300", "--out"])
            .arg(dir.join("cpu.json")),
        T,
    );
    let ep = Episode::from_output(&out);
    let meta = ExitUsage::from_meta(&ep);
    let stamp = ExitUsage::from_stamp(&stamp_json);
    eprintln!("target_rusage {meta:?}; the workload's exit stamp {stamp:?}");
    // rusage's utime and stime are whole µs each: up to 2 µs below.
    assert_cpu_vs_stamp(
        "meta.json target_rusage.cpu_ns",
        meta.cpu_ns,
        stamp.cpu_ns,
        2_000,
        0,
    );
    // Under software emulation the exit takes up to 100 ms, and the
    // tracer, at SCHED_FIFO (`--priority`), preempts an exiting thread on
    // its CPU whenever it wakes there meanwhile (the threads' exit records,
    // a bucket boundary): 3 involuntary switches more than the stamp's seen
    // once in the 6.1 guest.
    let exit_switches = if software_emulated() { 8 } else { 2 };
    for (what, m, s) in [
        ("nvcsw", meta.nvcsw, stamp.nvcsw),
        ("nivcsw", meta.nivcsw, stamp.nivcsw),
    ] {
        assert!(
            m >= s && m <= s + exit_switches,
            "target_rusage.{what} {m} vs the workload's own {s} at its exit stamp \
             (at most {exit_switches} more)"
        );
    }
    // Every field the data model lists, from the same wait4.
    for k in ["minflt", "majflt"] {
        assert!(
            ep.meta["target_rusage"][k].is_u64(),
            "{k}: {}",
            ep.meta["target_rusage"]
        );
    }
}

/// Threads created after attach are counted (cpu, thread count, lifecycle
/// events), and the per-thread names arrive in events.jsonl.
#[test]
fn threads_started_after_attach_are_counted() {
    require_root();
    let dir = scratch("late");
    let out_json = dir.join("late.json");
    let stamp_json = dir.join("exit.json");
    let out = run_with_timeout(
        trace_cmd(&dir)
            .args(["--interval-ms", "20", "--"])
            .arg(bin("cis490-workload"))
            .arg("--exit-stamp")
            .arg(&stamp_json)
            .args([
                "cpu",
                "--threads",
                "1",
                "--burn-ms",
                "300",
                "--late-threads",
                "2",
            ])
            .args(["--late-delay-ms", "150", "--start-delay-ms", "200", "--out"])
            .arg(&out_json),
        T,
    );
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);
    // The workload's own clock at its exit stamp, plus its exit, plus a
    // little per exited thread (see cpu_time_matches_ground_truth_and_oracle).
    let exited = truth["threads"].as_array().unwrap().len() as u64;
    assert_traced_cpu_vs_stamp(
        "ebpf cpu_ns vs ground truth",
        ep.sum("ebpf", "cpu_ns"),
        ExitUsage::from_stamp(&stamp_json).cpu_ns,
        exited * per_exited_thread_ns(),
    );
    assert_eq!(
        ep.max("ebpf", "threads"),
        truth["max_threads_alive"].as_u64().unwrap()
    );
    // Every thread the workload reports was announced, with its name.
    for t in truth["threads"].as_array().unwrap() {
        let tid = &t["tid"];
        assert!(
            ep.events_named("thread_started").any(|e| &e["tid"] == tid),
            "no thread_started for {t}"
        );
        assert!(
            ep.events_named("thread_exited").any(|e| &e["tid"] == tid),
            "no thread_exited for {t}"
        );
        assert!(
            ep.events_named("thread_renamed")
                .any(|e| &e["tid"] == tid && e["comm"] == t["name"]),
            "no thread_renamed to {} for {tid}",
            t["name"]
        );
    }
    // The late threads' work shows up after they started: the bucket of the
    // first late thread's start has a thread count of 3 or more.
    let late_tid = truth["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["late"] == true)
        .unwrap()["tid"]
        .clone();
    let started = ep
        .events_named("thread_started")
        .find(|e| e["tid"] == late_tid)
        .unwrap();
    let seq = started["seq"].as_u64().unwrap();
    let row = &ep.rows("ebpf")[seq as usize];
    assert_eq!(row["seq"].as_u64(), Some(seq));
    assert!(
        row["threads"].as_u64().unwrap() >= 3,
        "threads at the late start: {row}"
    );
    // At the end every thread is gone.
    assert_eq!(ep.rows("ebpf").last().unwrap()["threads"], 0);
    // Every bucket's CPU time where it was spent, the exits' too: a thread
    // preempted on its way out (three burners on two CPUs) once left a
    // 20 ms bucket with no CPU time and the next with two buckets' (eBPF 0
    // and 60 ms where /proc had 40 and 20), which `check`'s running totals
    // name.
    assert_check_passes(&ep.dir);
}

/// N round trips over pipes, each side blocking every round: at least 2N
/// voluntary switches, agreeing with the workload's rusage and the oracle.
#[test]
fn pipe_pingpong_voluntary_switches() {
    require_root();
    let dir = scratch("pingpong");
    let out_json = dir.join("pp.json");
    let n = 3000u64;
    let out = run_with_timeout(
        trace_cmd(&dir)
            .arg("--")
            .arg(bin("cis490-workload"))
            .args([
                "pingpong",
                "--handshake",
                "--linger-ms",
                "300",
                "--round-trips",
                &n.to_string(),
            ])
            .arg("--out")
            .arg(&out_json),
        T,
    );
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);
    let vol = ep.sum("ebpf", "ctx_switches_voluntary");
    assert!(
        vol >= 2 * n,
        "ebpf voluntary switches {vol} < 2N = {}",
        2 * n
    );
    let rusage = truth["rusage_self"]["nvcsw"].as_u64().unwrap();
    assert!(rusage >= 2 * n, "workload rusage {rusage} < 2N");
    // The tracer also sees what the main thread does after the workload
    // measures (its report, its exit and final switch-out): a handful more.
    // The other threads' final switch-outs are not counted, as in rusage.
    assert!(
        vol >= rusage && vol <= rusage + 10,
        "ebpf {vol} vs rusage {rusage}"
    );
    // The oracle keeps an exited thread's last-seen counts; the workload's
    // threads linger 300 ms (more than a poll) after their last round, so
    // the oracle sees them whole.
    let proc = ep.sum("proc", "ctx_switches_voluntary");
    assert!(vol.abs_diff(proc) <= 10, "ebpf {vol} vs /proc {proc}");
    // Every switch of a blocked thread is later a wakeup.
    assert!(ep.sum("ebpf", "wakeups") >= 2 * n);
}

/// Attach to a running process (--target-pid): only work after attach
/// counts, and the whole process is covered.
#[test]
fn attach_to_a_running_process() {
    require_root();
    let dir = scratch("attach");
    let out_json = dir.join("ws.json");
    let mut wl = Command::new(bin("cis490-workload"))
        .args(["wait-signal", "--threads", "2", "--burn-ms", "600", "--out"])
        .arg(&out_json)
        .spawn()
        .unwrap();
    let ready = out_json.with_extension("json.ready");
    wait_for_file(&ready, T);
    let pid = wl.id() as i32;
    let trace = start_trace(
        &dir,
        &["--target-pid", &pid.to_string(), "--duration", "30"],
    );
    // Let a few buckets pass with the single waiting thread.
    std::thread::sleep(Duration::from_millis(350));
    kill(pid, libc::SIGUSR1);
    let out = wait_output(trace, T);
    let exit = wait_rusage(&mut wl);
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);
    assert_eq!(ep.meta["target"]["mode"], "attach");
    assert_eq!(ep.meta["end_reason"], "target_exited");
    // Work after attach: from the workload's clock as it began to wait for
    // the signal (`cpu_ns_before_signal`, read before the tracer attached)
    // to the process's total at its exit (wait4); the workload's own clock
    // before its report is a lower bound (see
    // cpu_time_matches_ground_truth_and_oracle). Natively within 1 ms of
    // that (0.08% of the 1.2 s; wait4's µs resolution and the waiting
    // thread's wake-up); 2% under software emulation.
    let before = truth["cpu_ns_before_signal"].as_u64().unwrap();
    let ebpf = ep.sum("ebpf", "cpu_ns");
    let after = exit.cpu_ns - before;
    let allowed = if software_emulated() {
        after / 50
    } else {
        1_000_000
    };
    eprintln!(
        "ebpf cpu_ns vs work after attach (wait4's total at exit - the clock before the wait): {ebpf} vs {after} ({:+} ns, allowed ±{allowed})",
        ebpf as i64 - after as i64
    );
    assert!(
        ebpf.abs_diff(after) <= allowed,
        "ebpf cpu_ns {ebpf} vs the work after attach {after}: more than {allowed} ns apart"
    );
    let own = truth["process_cpu_ns"].as_u64().unwrap() - before;
    assert!(
        ebpf + allowed >= own,
        "ebpf cpu_ns {ebpf} < the workload's own {own} - {allowed} ns"
    );
    assert_close(
        "ebpf cpu_ns vs /proc",
        ep.sum("ebpf", "cpu_ns") as f64,
        ep.sum("proc", "cpu_ns") as f64,
        0.02,
    );
    // The process had 1 thread at attach, then 3.
    assert_eq!(ep.rows("ebpf")[0]["threads"], 1);
    assert_eq!(ep.max("ebpf", "threads"), 3);
}

/// A target that exits mid-trace (threads still running) leaves a complete
/// episode well before --duration.
#[test]
fn target_exit_mid_trace_completes_the_episode() {
    require_root();
    let dir = scratch("exit");
    let t0 = std::time::Instant::now();
    let out = run_with_timeout(
        trace_cmd(&dir)
            .args(["--duration", "30", "--"])
            .arg(bin("cis490-workload"))
            .args(["exit-after", "--ms", "400", "--threads", "3", "--out"])
            .arg(dir.join("exit.json")),
        T,
    );
    // Well before --duration (tracer start-up included: about 1 s natively,
    // several under software emulation).
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t0.elapsed()
    );
    let ep = Episode::from_output(&out);
    let truth = report(&dir.join("exit.json"));
    assert!(ep.is_done());
    assert_eq!(ep.meta["status"], "complete");
    assert_eq!(ep.meta["end_reason"], "target_exited");
    assert_eq!(ep.meta["target_exit"]["code"], 0);
    assert_eq!(ep.events_named("target_exited").count(), 1);
    assert_eq!(ep.events.last().unwrap()["event"], "finished");
    assert_eq!(ep.max("ebpf", "threads"), 4);
    assert_eq!(ep.rows("ebpf").last().unwrap()["threads"], 0);
    // The sleepers woke every ms (3 threads x ~400 wakeups natively): every
    // sleep they finished ended in a wakeup.
    let sleeps = truth["sleeps"].as_u64().unwrap();
    let wakeups = ep.sum("ebpf", "wakeups");
    assert!(sleeps >= 100, "the sleepers finished only {sleeps} sleeps");
    assert!(wakeups >= sleeps, "{wakeups} wakeups for {sleeps} sleeps");
    // The rows cover the target's life (0.4 s and its start-up), and end
    // with it: at most a bucket after the target_exited event.
    let rows = ep.rows("ebpf");
    let end = rows.last().unwrap()["t_mono_ns"].as_u64().unwrap();
    let start = end
        - rows
            .iter()
            .map(|r| r["interval_ns"].as_u64().unwrap())
            .sum::<u64>();
    let exited = ep.events_named("target_exited").next().unwrap()["t_mono_ns"]
        .as_u64()
        .unwrap();
    assert!(
        exited - start >= 400_000_000,
        "the target lived {} ns",
        exited - start
    );
    assert!(
        end >= exited && end - exited <= ep.meta["interval_ns"].as_u64().unwrap(),
        "rows end {} ns after the target's exit",
        end as i128 - exited as i128
    );
}

/// --duration ends the trace and stops a spawned command that is still
/// running; SIGTERM to the tracer ends it cleanly too.
#[test]
fn duration_and_signals_end_the_trace_cleanly() {
    require_root();
    let dir = scratch("duration");
    let t0 = std::time::Instant::now();
    let out = run_with_timeout(
        trace_cmd(&dir).args(["--duration", "0.5", "--", "sleep", "30"]),
        T,
    );
    // Ended by --duration, long before the command would have (tracer
    // start-up included: about 1 s natively, several under emulation).
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t0.elapsed()
    );
    let ep = Episode::from_output(&out);
    assert!(ep.is_done());
    assert_eq!(ep.meta["end_reason"], "duration");
    assert_eq!(ep.events_named("target_terminated").count(), 1);
    let secs: f64 = ep
        .rows("ebpf")
        .iter()
        .map(|r| r["interval_ns"].as_f64().unwrap())
        .sum::<f64>()
        / 1e9;
    assert!((0.45..0.7).contains(&secs), "rows cover {secs} s");

    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let dir = scratch("sigterm");
    let trace = start_trace(&dir, &["--target-pid", &sleeper.id().to_string()]);
    kill(trace.id() as i32, libc::SIGTERM);
    let out = wait_output(trace, T);
    let ep = Episode::from_output(&out);
    assert!(ep.is_done());
    assert_eq!(ep.meta["end_reason"], "signal");
    assert!(ep.events_named("signal").any(|e| e["signal"] == "SIGTERM"));
    // An attached process is left alone.
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "the attached process was killed"
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

/// Run-queue delay against an independent reference: a single-threaded
/// workload sleeps 500 times until an absolute deadline and measures each
/// wake-to-run delay itself (`woke - deadline`), while two untraced
/// threads at nice -10 keep both CPUs busy, so each wakeup waits on the
/// run queue. Each of its delays holds the kernel's run-queue wait
/// (`sched_info.run_delay`, which the tracer reads) plus the timer's expiry
/// and the return to user space; so, natively:
/// - the sum: at most the workload's sum plus what its preemptions
///   (involuntary switches, which it cannot time) waited, at least the
///   workload's sum less 100 µs per wakeup of overhead (leaving out its
///   longest 1%, which can be late off the run queue: a late timer
///   interrupt, the hypervisor's steal);
/// - the histogram: one delay per switch-in, at least one per wakeup; at
///   each power of two `2^k`, no more delays at or above `2^k` than the
///   workload measured (plus the preemptions), no fewer than it measured
///   at or above `2^k` + 100 µs (less 1% of the wakeups);
/// - the maximum: at most the workload's longest, unless a preemption's
///   wait was longer, at least the workload's longest (but its 1% longest)
///   less 100 µs.
#[test]
fn run_queue_delay_matches_the_workloads_own_wake_to_run_delays() {
    use std::os::unix::process::CommandExt as _;
    require_root();
    let dir = scratch("runq");
    let out_json = dir.join("wakeups.json");
    let mut hog = Command::new(bin("cis490-workload"));
    hog.args(["cpu", "--threads", "2", "--burn-ms", "30000", "--out"])
        .arg(dir.join("hog.json"));
    // SAFETY: setpriority in the child before exec; async-signal-safe.
    unsafe {
        hog.pre_exec(|| {
            libc::setpriority(libc::PRIO_PROCESS, 0, -10);
            Ok(())
        });
    }
    let mut hog = hog.spawn().unwrap();
    let out = run_with_timeout(
        trace_cmd(&dir)
            .arg("--")
            .arg(bin("cis490-workload"))
            .args(["wakeups", "--count", "500", "--period-us", "2000", "--out"])
            .arg(&out_json),
        T,
    );
    hog.kill().unwrap();
    hog.wait().unwrap();
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);
    let delays: Vec<u64> = truth["delays_ns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let (n, user_sum, user_max) = (
        delays.len() as u64,
        truth["sum_ns"].as_u64().unwrap(),
        truth["max_ns"].as_u64().unwrap(),
    );
    let ebpf_sum = ep.sum("ebpf", "runq_delay_ns");
    let ebpf_max = ep.max("ebpf", "runq_delay_max_ns");
    let preempted = ep.sum("ebpf", "ctx_switches_involuntary");
    let mut hist = [0u64; 64];
    for r in ep.rows("ebpf") {
        for (i, v) in r["runq_delay_hist_log2"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            hist[i] += v.as_u64().unwrap();
        }
    }
    let samples: u64 = hist.iter().sum();
    eprintln!(
        "{n} wakeups: the workload's delays sum {user_sum} ns, max {user_max}; ebpf runq_delay sum \
         {ebpf_sum}, max {ebpf_max}, {samples} delays in its histogram; {preempted} involuntary \
         switches; {} sleeps that never left the CPU; /proc {}",
        truth["not_slept"],
        ep.sum("proc", "runq_delay_ns")
    );
    let hist_text: Vec<String> = hist
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, c)| format!("2^{i}: {c}"))
        .collect();
    eprintln!("ebpf histogram {hist_text:?}");
    // Under software emulation a timer's expiry and the return to user
    // space take far longer, and the emulator's own scheduling delays more
    // wakeups: 5 ms of overhead and 5% of the wakeups allowed there.
    let overhead = if software_emulated() {
        5_000_000
    } else {
        100_000
    };
    // What the workload cannot time: the waits after its preemptions, each
    // at most a scheduler slice behind the hogs (bounded here by the
    // longest delay it measured, plus a slice: see below). Under software
    // emulation, with the VM matrix's two guests side by side on these
    // cores, those waits were mostly 33 to 67 ms (the histogram's 2^25) and
    // one 0.54 s or more (the emulator's own stall) in each of 3 failed
    // runs on 6.1: 80 ms a preemption allowed there. Natively 10 ms was
    // enough until a clean-clone run on 2026-12-07 (a noisier machine) had
    // one wait of 17.3 ms after its one preemption (the /proc oracle, the
    // kernel's own schedstat, agreed to the nanosecond): 30 ms allowed.
    let slice = if software_emulated() {
        80_000_000
    } else {
        30_000_000
    };
    let unseen = preempted * (user_max + slice);
    // A wakeup can also be late off the run queue: a timer interrupt
    // delivered late, or the hypervisor running something else (this
    // machine is a VM with steal time; seen: one wakeup 556 ms late, 198 ms
    // of it on the run queue, and 2 of 500 more than 100 µs late with less
    // on the run queue). Up to 1% of the wakeups may be; the lower bounds
    // leave out the workload's longest 1% (5% under emulation).
    let late_elsewhere = if software_emulated() { n / 20 } else { n / 100 };
    let mut sorted = delays.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let user_sum_rest: u64 = sorted[late_elsewhere as usize..].iter().sum();
    let user_max_rest = sorted[late_elsewhere as usize];
    assert!(
        ebpf_sum <= user_sum + unseen && ebpf_sum + n * overhead >= user_sum_rest,
        "ebpf runq_delay_ns {ebpf_sum} vs the workload's own {user_sum} (at most + {unseen} for \
         {preempted} preemptions; at least its sum without its longest {late_elsewhere}, \
         {user_sum_rest}, - {overhead} per wakeup)"
    );
    // A sleep whose deadline passed before the thread left its CPU never
    // waited on the run queue, so it has no delay: the workload counts those
    // (its voluntary switches did not grow across the sleep). Seen: 499
    // delays for 500 wakeups and no preemption, in two full runs.
    let not_slept = truth["not_slept"].as_u64().unwrap();
    assert!(
        samples + not_slept >= n && samples + not_slept <= n + preempted + 10,
        "{samples} delays in the histogram for {n} wakeups ({not_slept} of them never slept) \
         and {preempted} preemptions"
    );
    for k in 0..64usize {
        let t = 1u64 << k;
        let ebpf_at_least: u64 = hist[k..].iter().sum();
        let user_at_least = delays.iter().filter(|d| **d >= t).count() as u64;
        let user_clearly = delays.iter().filter(|d| **d >= t + overhead).count() as u64;
        assert!(
            ebpf_at_least <= user_at_least + preempted + 10
                && ebpf_at_least + late_elsewhere >= user_clearly,
            "delays >= 2^{k} ns: ebpf {ebpf_at_least}; the workload {user_at_least} (>= 2^{k} + \
             {overhead}: {user_clearly})"
        );
    }
    assert!(
        ebpf_max + overhead >= user_max_rest && (ebpf_max <= user_max || preempted > 0),
        "ebpf max {ebpf_max} vs the workload's longest {user_max} (without its longest \
         {late_elsewhere}: {user_max_rest})"
    );
}

/// The running-slice record (`CpuSlice`), which `sched_switch` rewrites at
/// each switch-in of a target thread while the task iterator may copy it
/// from another CPU. A thread with 1 s of CPU ping-pongs with a fresh one
/// on one CPU for 3 s (under emulation 0.5 s after 0.5 s) at 1 ms buckets (about half a
/// million switch-ins on the host, 3000 copies): a torn copy that paired the fresh thread's id
/// with the old one's base would put 1 s into one bucket. No bucket may
/// hold more CPU than it lasted times the CPUs, plus 10 ms natively (a
/// running thread's count may lag by up to a scheduler tick, 10 ms at the
/// slowest HZ, caught up at its switch-out) and 100 ms under software
/// emulation (the VM matrix, two emulated kernels side by side on these
/// cores, gave 18 ms in a 2 ms bucket: the tracer reads the threads later
/// than it stamps a row's end there, as the next test measures), a tenth of what
/// one torn copy would add;
/// the total stays within 2% (+20 ms) of the process's own CPU clock.
#[test]
fn no_bucket_holds_more_cpu_than_it_lasted() {
    require_root();
    let dir = scratch("slice-seq");
    let out_json = dir.join("storm.json");
    // Under emulation a lighter run: the VM matrix runs its kernels side by
    // side on these cores, and while this one ran at full strength the other
    // guest's run-queue test failed in 2 of 3 matrix runs.
    let (burn_ms, for_ms) = if software_emulated() {
        ("500", "500")
    } else {
        ("1000", "3000")
    };
    let out = run_with_timeout(
        default_trace_cmd(&dir)
            .args(["--sources", "ebpf", "--interval-ms", "1", "--"])
            .arg(bin("cis490-workload"))
            .args([
                "storm",
                "--round-trips",
                "1000000000",
                "--burn-first-ms",
                burn_ms,
                "--for-ms",
                for_ms,
            ])
            .arg("--out")
            .arg(&out_json),
        Duration::from_secs(120),
    );
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let rows = ep.rows("ebpf");
    let mut worst = (0u64, 0u64);
    for r in rows {
        let (Some(cpu), Some(len)) = (r["cpu_ns"].as_u64(), r["interval_ns"].as_u64()) else {
            continue;
        };
        let slack = if software_emulated() {
            100_000_000
        } else {
            10_000_000
        };
        let cap = len * cpus + slack;
        assert!(
            cpu <= cap,
            "bucket {} holds {cpu} ns of CPU in {len} ns on {cpus} CPUs",
            r["seq"]
        );
        if cpu * worst.1.max(1) > worst.0 * len.max(1) {
            worst = (cpu, len);
        }
    }
    let total = ep.sum("ebpf", "cpu_ns");
    let own = truth["process_cpu_ns"].as_u64().unwrap();
    eprintln!(
        "{} rows, {} round trips; CPU {total} ns vs the process's {own}; fullest bucket {} ns in {} ns; torn slice reads {}",
        rows.len(),
        truth["round_trips"],
        worst.0,
        worst.1,
        ep.meta["ebpf"]["torn_slice_reads"]
    );
    assert!(
        total.abs_diff(own) <= own / 50 + 20_000_000,
        "ebpf {total} vs process {own}"
    );
    assert!(truth["round_trips"].as_u64().unwrap() > 0);
}

/// The fastest context-switch storm a process makes here, counted exactly:
/// two pairs of threads, one pair pinned to each CPU, hand their CPU to
/// each other with `sched_yield` for 2 s (one switch per call, no wakeup;
/// about 2.7M switches/s untraced on this machine, 2026-12-07; at least 1M
/// switches, 20000 under emulation). Every switch
/// is in the eBPF rows as the kernel's own process totals count it
/// (`getrusage` at the end of the work, `assert_switches_match_rusage`),
/// none is dropped, no bucket holds more switches than its CPUs can make
/// (a switch takes at least 100 ns), and the CPU time is within 2%
/// (+20 ms) of the process's own clock.
#[test]
fn a_yield_storm_of_millions_of_switches_a_second_is_counted_exactly() {
    require_root();
    let dir = scratch("yields");
    let out_json = dir.join("yields.json");
    let out = run_with_timeout(
        default_trace_cmd(&dir)
            .args(["--sources", "ebpf", "--"])
            .arg(bin("cis490-workload"))
            .args(["storm", "--via", "yield", "--pairs", "2"])
            .args(["--round-trips", "1000000000", "--for-ms", "2000", "--out"])
            .arg(&out_json),
        Duration::from_secs(120),
    );
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let switches = ep.sum("ebpf", "ctx_switches");
    let wall_ns = truth["wall_ns"].as_u64().unwrap();
    eprintln!(
        "{} round trips in {wall_ns} ns: {switches} switches in the rows ({:.0}/s)",
        truth["round_trips"],
        switches as f64 / (wall_ns as f64 / 1e9)
    );
    // Natively 1.6M to 2.1M switches a second (3 runs); under emulation
    // 46k to 74k (one run in each guest, 2026-12-07).
    let least = if software_emulated() {
        20_000
    } else {
        1_000_000
    };
    let made = truth["rusage_self"]["nivcsw"].as_u64().unwrap();
    assert!(
        made >= least,
        "the storm made too few switches to test anything: {made} (at least {least})"
    );
    // Two pairs of threads and the main thread exit.
    assert_switches_match_rusage(&ep, &truth, 5);
    assert_eq!(ep.sum("ebpf", "dropped_events"), 0);
    for r in ep.rows("ebpf") {
        let (Some(n), Some(len)) = (r["ctx_switches"].as_u64(), r["interval_ns"].as_u64()) else {
            continue;
        };
        assert!(
            n <= len * cpus / 100,
            "bucket {} holds {n} switches in {len} ns on {cpus} CPUs",
            r["seq"]
        );
    }
    let total = ep.sum("ebpf", "cpu_ns");
    let own = truth["process_cpu_ns"].as_u64().unwrap();
    assert!(
        total.abs_diff(own) <= own / 50 + 20_000_000,
        "ebpf CPU {total} vs the process's {own}"
    );
}

/// A thread that never blocks is counted per bucket as its own CPU clock
/// counts it. The kernel adds a running thread's time to its runtime only at
/// ticks (4 ms at HZ=250): at each boundary the iterator adds the time since
/// the kernel last did, on the clock the runtime advances on (so neither a
/// tick's lag nor the IRQ and steal time the kernel leaves out, however long
/// the thread stays on its CPU). Truth: the thread's CLOCK_THREAD_CPUTIME_ID
/// sampled every 2 ms, interpolated at each row's two ends (reading it brings
/// the runtime up to date, so samples every 100 µs would hide a missing
/// running part: measured here, without it the buckets were off by a median
/// 0.55 ms and only 81% within 1 ms; with it, a median 3 µs and a 95th
/// percentile of 76 µs). At 5 ms buckets: the median bucket within 0.25 ms,
/// 95% of them within 1 ms and every one within 5 ms (the tracer reads the
/// threads a moment after it stamps a row's end, later when the machine is
/// busy; 0.5 ms for 95% held until a clean-clone run on 2026-12-07, a
/// noisier machine, had a 95th percentile of 0.56 ms). Under emulation the tracer's reads come later still (at 10 ms
/// buckets, medians of 46 to 129 µs and 95th percentiles of 1.2 to 4.4 ms in
/// five runs; with the VM matrix's two guests side by side, as CI runs them,
/// medians of 61 to 788 µs in four runs, 2026-12-07): the median within
/// 2 ms, every bucket within 20 ms.
#[test]
fn a_thread_that_never_blocks_is_counted_per_bucket_as_its_own_clock() {
    require_root();
    let dir = scratch("spin");
    let out_json = dir.join("spin.json");
    let emulated = software_emulated();
    let (interval, median, far) = if emulated {
        ("10", 2_000_000u64, 20_000_000u64)
    } else {
        ("5", 250_000, 5_000_000)
    };
    let close = 1_000_000u64;
    let out = run_with_timeout(
        default_trace_cmd(&dir)
            .args(["--sources", "ebpf", "--interval-ms", interval, "--"])
            .arg(bin("cis490-workload"))
            .args(["spin", "--ms", "3000", "--sample-us", "2000", "--out"])
            .arg(&out_json),
        Duration::from_secs(120),
    );
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);
    let samples: Vec<(u64, u64)> = truth["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s[0].as_u64().unwrap(), s[1].as_u64().unwrap()))
        .collect();
    // The thread's CPU clock at `t` (CLOCK_MONOTONIC), between two samples.
    let cpu_at = |t: u64| -> Option<f64> {
        let i = samples.partition_point(|s| s.0 <= t);
        if i == 0 || i == samples.len() {
            return None;
        }
        let ((t0, c0), (t1, c1)) = (samples[i - 1], samples[i]);
        Some(c0 as f64 + (c1 - c0) as f64 * (t - t0) as f64 / (t1 - t0).max(1) as f64)
    };
    let mut errors = Vec::new();
    for r in ep.rows("ebpf") {
        let (end, len) = (
            r["t_mono_ns"].as_u64().unwrap(),
            r["interval_ns"].as_u64().unwrap(),
        );
        let (Some(a), Some(b)) = (cpu_at(end - len), cpu_at(end)) else {
            continue;
        };
        let cpu = r["cpu_ns"].as_u64().expect("cpu_ns measured") as f64;
        errors.push(((cpu - (b - a)).abs() as u64, r["seq"].as_u64().unwrap()));
    }
    assert!(
        errors.len() >= 200,
        "{} buckets inside the run",
        errors.len()
    );
    errors.sort();
    let pct = |p: usize| errors[(errors.len() - 1) * p / 100].0;
    let within = errors.iter().filter(|e| e.0 <= close).count();
    eprintln!(
        "{} buckets: |ebpf - own clock| median {} ns, 95th {} ns, max {} ns (seq {}); {} within {close} ns",
        errors.len(),
        pct(50),
        pct(95),
        errors.last().unwrap().0,
        errors.last().unwrap().1,
        within
    );
    assert!(pct(50) <= median, "median bucket off by {} ns", pct(50));
    assert!(
        emulated || within * 100 >= errors.len() * 95,
        "{within} of {} buckets within {close} ns",
        errors.len()
    );
    assert!(
        errors.last().unwrap().0 <= far,
        "bucket {} off by {} ns",
        errors.last().unwrap().1,
        errors.last().unwrap().0
    );
}

/// Fields 19 (nice), 40 (rt_priority) and 41 (policy) of a
/// `/proc/PID/stat` line.
fn scheduling_of(stat: &str) -> (i64, i64, i64) {
    let field = |n| {
        stat_field(stat, n)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("field {n} of {stat:?}"))
    };
    (field(19), field(40), field(41))
}

/// `--priority`: by default the thread that closes buckets (the tracer's
/// main thread) runs at SCHED_FIFO 1 and a spawned target at the normal
/// policy; `--priority normal` leaves the tracer as started; without
/// CAP_SYS_NICE the trace still completes, with one warning and the reason
/// in `meta.json`. Each side read from `/proc` by the target itself.
#[test]
fn the_bucket_reader_runs_realtime_and_its_target_does_not() {
    require_root();
    // sh is the target; its parent is the tracer.
    let probe = "cat /proc/self/stat > \"$0/target\"; cat /proc/$PPID/stat > \"$0/tracer\"";
    let run = |name: &str, wrap: &[&str], extra: &[&str]| {
        let dir = scratch(name);
        let mut cmd = if wrap.is_empty() {
            default_trace_cmd(&dir)
        } else {
            let inner = default_trace_cmd(&dir);
            let mut c = Command::new(wrap[0]);
            c.args(&wrap[1..])
                .arg(inner.get_program())
                .args(inner.get_args());
            c
        };
        cmd.args(["--sources", "ebpf"])
            .args(extra)
            .args(["--", "sh", "-c", probe])
            .arg(&dir);
        let out = run_with_timeout(&mut cmd, T);
        let ep = Episode::from_output(&out);
        assert_eq!(ep.meta["status"], "complete");
        let read = |f: &str| scheduling_of(&std::fs::read_to_string(dir.join(f)).unwrap());
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (
            read("tracer"),
            read("target"),
            ep.meta["tracer_scheduling"].clone(),
            stderr,
        )
    };
    const OTHER: i64 = 0;
    const FIFO: i64 = 1;

    let (tracer, target, meta, _) = run("prio-default", &[], &[]);
    eprintln!("default: tracer (nice, rt, policy) {tracer:?}, target {target:?}; {meta}");
    assert_eq!(tracer, (0, 1, FIFO));
    assert_eq!(target, (0, 0, OTHER));
    assert_eq!(meta["asked"], "realtime");
    assert_eq!(meta["policy"], "SCHED_FIFO");
    assert_eq!(meta["rt_priority"], 1);
    assert_eq!(meta["error"], serde_json::Value::Null);

    let (tracer, target, meta, _) = run("prio-normal", &[], &["--priority", "normal"]);
    eprintln!("normal: tracer {tracer:?}, target {target:?}; {meta}");
    assert_eq!(tracer, (0, 0, OTHER));
    assert_eq!(target, (0, 0, OTHER));
    assert_eq!(meta["asked"], "normal");
    assert_eq!(meta["policy"], "SCHED_OTHER");

    // Root without CAP_SYS_NICE (and a zero RLIMIT_RTPRIO): refused.
    let no_nice = [
        "setpriv",
        "--bounding-set",
        "-sys_nice",
        "--inh-caps",
        "-sys_nice",
    ];
    let (tracer, target, meta, stderr) = run("prio-refused", &no_nice, &[]);
    eprintln!("refused: tracer {tracer:?}, target {target:?}; {meta}");
    assert_eq!(tracer, (0, 0, OTHER));
    assert_eq!(target, (0, 0, OTHER));
    assert_eq!(meta["policy"], "SCHED_OTHER");
    let why = meta["error"].as_str().expect("the reason in meta.json");
    assert!(why.contains("Operation not permitted"), "{why}");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("cannot run at SCHED_FIFO"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
}
