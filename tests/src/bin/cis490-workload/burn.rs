//! Burning CPU: pure computation measured by the thread's own CPU clock.

use std::hint::black_box;

use crate::clock::{NS_PER_MS, thread_cpu_ns};

/// Pure computation, `iters` steps of a multiply-rotate mix that the optimiser cannot skip.
pub fn spin(iters: u64) -> u64 {
    let mut x = black_box(0x9E37_79B9_7F4A_7C15_u64);
    for i in 0..iters {
        x = black_box(x.rotate_left(7) ^ i).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    }
    black_box(x)
}

/// Busy-loops until the calling thread's CPU clock reaches `target_ns`; returns the clock then.
///
/// The clock is read about once per millisecond of work (the chunk size adapts to the measured
/// speed), and more often in the last 2 ms so the target is overshot by only microseconds.
/// Time spent preempted does not count, since the thread CPU clock only runs on-CPU.
pub fn burn_until_thread_cpu(target_ns: u64) -> u64 {
    let mut iters_per_ms: u64 = 100_000; // first guess; corrected after the first chunk
    let mut now = thread_cpu_ns();
    while now < target_ns {
        // Whole milliseconds while far from the target, then halve the remaining distance
        // (never below 10 us) so a chunk that runs slower than estimated overshoots little.
        let remaining = target_ns - now;
        let step_ns = if remaining > 2 * NS_PER_MS {
            NS_PER_MS
        } else {
            (remaining / 2).max(10_000)
        };
        let iters = (iters_per_ms * step_ns / NS_PER_MS).max(1);
        spin(iters);
        let after = thread_cpu_ns();
        // Keep the estimate within sane bounds even if a chunk is measured badly.
        if let Some(rate) = iters
            .saturating_mul(NS_PER_MS)
            .checked_div(after.saturating_sub(now))
        {
            iters_per_ms = rate.clamp(1_000, 1_000_000_000);
        }
        now = after;
    }
    now
}

/// Burns `ns` more nanoseconds of the calling thread's CPU time.
pub fn burn_for_ns(ns: u64) -> u64 {
    burn_until_thread_cpu(thread_cpu_ns() + ns)
}
