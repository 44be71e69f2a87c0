//! The perf source (perf_event counters of the whole target) against the
//! eBPF source and ground truth.

use std::time::Duration;

use cis490_tests::*;

#[test]
fn perf_counters_agree_with_ebpf_and_ground_truth() {
    require_root();
    let dir = scratch("perf");
    let out_json = dir.join("cpu.json");
    let steal_before = steal_ns();
    let out = run_with_timeout(
        trace_cmd(&dir)
            .arg("--")
            .arg(bin("cis490-workload"))
            .args([
                "cpu",
                "--threads",
                "2",
                "--burn-ms",
                "1500",
                "--late-threads",
                "1",
            ])
            .args(["--late-delay-ms", "300", "--linger-ms", "200", "--out"])
            .arg(&out_json),
        Duration::from_secs(60),
    );
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);
    let info = &ep.meta["perf"];
    assert_eq!(info["events"]["task-clock"], "counting", "{info}");
    // Threads started after the counters were opened are inherited.
    let steal = steal_ns() - steal_before;
    // task-clock runs on the perf clock, which keeps counting while the
    // hypervisor steals the CPU; the scheduler's runtime (the process CPU
    // clock, eBPF) does not (CONFIG_PARAVIRT_TIME_ACCOUNTING). So perf may
    // be above by up to the machine's steal time during the run, on top of
    // the 2% tolerance (seen: +4.4% with another VM busy on this host).
    // Ground truth: the process's total at its exit (meta.json
    // `target_rusage`); the workload's own clock before its report is a
    // lower bound (see sched.rs, cpu_time_matches_ground_truth_and_oracle).
    let perf_cpu = ep.sum("perf", "cpu_ns") as f64;
    for (what, other) in [
        (
            "perf cpu_ns vs ground truth (the process's total at exit)",
            ExitUsage::from_meta(&ep).cpu_ns as f64,
        ),
        ("perf cpu_ns vs ebpf", ep.sum("ebpf", "cpu_ns") as f64),
    ] {
        // Under software emulation (a TCG VM) task-clock also ran above the
        // scheduler's runtime, by up to 2.2% seen (the switch path, where
        // the tracer's own programs run, is slow there, and the two clocks
        // stop at different points of it): 3% more allowed there, above only.
        let emulated = if software_emulated() { 0.03 } else { 0.0 };
        let (lo, hi) = (other * 0.98, other * (1.02 + emulated) + steal as f64);
        eprintln!(
            "{what}: {perf_cpu} vs {other} ({:+.3}%; steal during the run {steal} ns)",
            (perf_cpu - other) / other * 100.0
        );
        assert!(
            perf_cpu >= lo && perf_cpu <= hi,
            "{what}: {perf_cpu} not in [{lo}, {hi}] (2%, plus {steal} ns of steal above)"
        );
    }
    let own = truth["process_cpu_ns"].as_f64().unwrap();
    assert!(
        perf_cpu >= own * 0.98,
        "perf cpu_ns {perf_cpu} < the workload's own clock {own} - 2%"
    );
    let (p, e) = (
        ep.sum("perf", "ctx_switches") as f64,
        ep.sum("ebpf", "ctx_switches") as f64,
    );
    assert_close("perf ctx_switches vs ebpf", p, e, 0.02);
    // The same kernel counting, except that perf stops counting a thread
    // when its perf context is torn down at exit, before its final
    // switch-out: a migration in between (it happened once in many runs
    // natively, more often under software emulation) is seen by eBPF only.
    // At most one per exited thread (3 here). And perf counts a migration
    // at the thread's next switch-in, the scheduler's `nr_migrations` (eBPF)
    // when the thread is moved: a runnable thread moved before eBPF's
    // baseline read and switched in after perf's (read next) is perf's only.
    // At most one per thread counted at the baseline (the main thread and 2
    // workers). Seen once on 6.12 under emulation: perf 11, ebpf 10.
    let (pm, em) = (ep.sum("perf", "migrations"), ep.sum("ebpf", "migrations"));
    assert!(
        pm <= em + 3 && em <= pm + 3,
        "migrations: perf {pm}, ebpf {em} (either may exceed the other by one per thread, 3)"
    );
    // Page faults: perf's software event and the whole-process counts of
    // /proc/PID/stat, the same kernel accounting.
    let (pf, of) = (
        ep.sum("perf", "page_faults_minor"),
        ep.sum("proc", "page_faults_minor"),
    );
    assert!(
        pf > 0 && pf.abs_diff(of) <= 5 + of / 50,
        "minor faults: perf {pf}, /proc {of}"
    );
    // Hardware counters: counted where the machine has a PMU, else null
    // (never 0), with the reason in meta.json.
    let cycles = info["events"]["cycles"].as_str().unwrap();
    if cycles == "counting" {
        eprintln!("hardware counters present: checking cycles and instructions");
        assert!(ep.sum("perf", "cycles") > 0 && ep.sum("perf", "instructions") > 0);
    } else {
        eprintln!("no hardware counters here ({cycles}): checking they are null");
        for f in [
            "cycles",
            "instructions",
            "cache_references",
            "cache_misses",
            "branch_misses",
        ] {
            assert!(
                ep.rows("perf").iter().all(|r| r[f].is_null()),
                "{f} is not null"
            );
        }
        assert!(cycles.contains("not supported"), "{cycles}");
    }
}
