//! The clock pair and the bucket boundaries shared by every source.
//!
//! Buckets are laid on a fixed grid `t0 + k * interval` of CLOCK_MONOTONIC
//! (the clock `bpf_ktime_get_ns` reads), so they do not drift. At each
//! boundary the coordinator takes one [`ClockPair`] and every source stamps
//! its row with it: rows of all sources join on `seq` and on the clock pair.
//! When the process wakes up late past one or more grid points, one longer
//! bucket covers them (its `interval_ns` says so) and the skipped grid points
//! are counted, so `seq` stays contiguous and sums stay exact.

use std::collections::VecDeque;

/// CLOCK_MONOTONIC and CLOCK_REALTIME read together, ns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockPair {
    pub mono_ns: u64,
    pub wall_ns: u64,
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_MONOTONIC now, ns (the same clock as `bpf_ktime_get_ns`).
pub fn mono_now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

impl ClockPair {
    pub fn now() -> Self {
        let mono_ns = mono_now_ns();
        let wall_ns = clock_ns(libc::CLOCK_REALTIME);
        Self { mono_ns, wall_ns }
    }

    /// The wall time of a monotonic timestamp, using this pair's offset.
    pub fn wall_of(&self, mono_ns: u64) -> u64 {
        (self.wall_ns as i128 + mono_ns as i128 - self.mono_ns as i128).max(0) as u64
    }
}

/// A closed bucket: what every source stamps on its row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tick {
    pub seq: u64,
    pub end: ClockPair,
    pub interval_ns: u64,
}

/// How many recent boundaries are kept to place late records.
const HISTORY: usize = 4096;

/// The bucket grid of one episode.
#[derive(Debug)]
pub struct BucketClock {
    start: ClockPair,
    interval_ns: u64,
    /// Next boundary's grid index (boundary `k` is at `t0 + k * interval`).
    next_k: u64,
    /// Sequence number of the bucket now open.
    seq: u64,
    /// End of the last closed bucket (the start at first).
    last_end: ClockPair,
    /// Grid points passed without a row of their own.
    skipped: u64,
    /// `(seq, end_mono)` of recently closed buckets, oldest first.
    history: VecDeque<(u64, u64)>,
}

impl BucketClock {
    pub fn new(start: ClockPair, interval_ns: u64) -> Self {
        assert!(interval_ns > 0, "bucket interval must be positive");
        Self {
            start,
            interval_ns,
            next_k: 1,
            seq: 0,
            last_end: start,
            skipped: 0,
            history: VecDeque::new(),
        }
    }

    pub fn start(&self) -> ClockPair {
        self.start
    }

    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    /// Grid points that passed without a row of their own (late wake-ups).
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Rows closed so far.
    pub fn closed(&self) -> u64 {
        self.seq
    }

    /// CLOCK_MONOTONIC time of the next grid boundary.
    pub fn next_deadline_ns(&self) -> u64 {
        self.start.mono_ns + self.next_k * self.interval_ns
    }

    /// Closes the open bucket at `now` (normally just after the deadline;
    /// earlier for the final, partial bucket).
    pub fn close(&mut self, now: ClockPair) -> Tick {
        let now = ClockPair {
            mono_ns: now.mono_ns.max(self.last_end.mono_ns),
            ..now
        };
        let tick = Tick {
            seq: self.seq,
            end: now,
            interval_ns: now.mono_ns - self.last_end.mono_ns,
        };
        // The next deadline is the first grid point after `now`.
        let elapsed = now.mono_ns - self.start.mono_ns;
        let k_after = elapsed / self.interval_ns + 1;
        if k_after > self.next_k + 1 {
            self.skipped += k_after - self.next_k - 1;
        }
        self.next_k = k_after.max(self.next_k);
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((self.seq, now.mono_ns));
        self.seq += 1;
        self.last_end = now;
        tick
    }

    /// The bucket a monotonic timestamp falls in: `(start, end]` of a closed
    /// bucket, or the open one. A record that arrives after its bucket was
    /// closed (late) still gets the bucket it happened in, as long as that
    /// bucket is among the last `HISTORY`; older ones get the oldest kept.
    /// `None` before the episode started.
    pub fn seq_of(&self, mono_ns: u64) -> Option<u64> {
        if mono_ns <= self.start.mono_ns {
            return None;
        }
        if mono_ns > self.last_end.mono_ns {
            return Some(self.seq);
        }
        // First closed bucket whose end is >= mono_ns.
        let i = self.history.partition_point(|&(_, end)| end < mono_ns);
        Some(self.history.get(i).map_or(self.seq, |&(seq, _)| seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(mono: u64) -> ClockPair {
        ClockPair {
            mono_ns: mono,
            wall_ns: mono + 1_000_000,
        }
    }

    #[test]
    fn ticks_follow_the_grid() {
        let mut c = BucketClock::new(pair(1000), 100);
        assert_eq!(c.next_deadline_ns(), 1100);
        let t = c.close(pair(1103));
        assert_eq!((t.seq, t.interval_ns, t.end.mono_ns), (0, 103, 1103));
        // The next boundary stays on the grid, not 100 after the late wake-up.
        assert_eq!(c.next_deadline_ns(), 1200);
        let t = c.close(pair(1200));
        assert_eq!((t.seq, t.interval_ns), (1, 97));
        assert_eq!(c.next_deadline_ns(), 1300);
        assert_eq!(c.skipped(), 0);
    }

    #[test]
    fn a_late_wakeup_makes_one_long_bucket_and_counts_skips() {
        let mut c = BucketClock::new(pair(0), 100);
        let t = c.close(pair(350)); // boundaries 100, 200, 300 passed
        assert_eq!((t.seq, t.interval_ns), (0, 350));
        assert_eq!(c.skipped(), 2);
        assert_eq!(c.next_deadline_ns(), 400);
        let t = c.close(pair(400));
        assert_eq!((t.seq, t.interval_ns), (1, 50));
        assert_eq!(c.closed(), 2);
    }

    #[test]
    fn intervals_sum_to_the_episode_length() {
        let mut c = BucketClock::new(pair(10), 7);
        let mut sum = 0;
        for now in [17, 24, 33, 38, 50, 52] {
            sum += c.close(pair(now)).interval_ns;
        }
        assert_eq!(sum, 52 - 10);
    }

    #[test]
    fn empty_buckets_still_tick_and_a_final_partial_bucket_is_short() {
        let mut c = BucketClock::new(pair(0), 100);
        for k in 1..=3 {
            let t = c.close(pair(k * 100));
            assert_eq!(t.interval_ns, 100);
        }
        let t = c.close(pair(342)); // the target exited mid-bucket
        assert_eq!((t.seq, t.interval_ns), (3, 42));
    }

    #[test]
    fn a_clock_that_goes_backwards_gives_an_empty_bucket() {
        let mut c = BucketClock::new(pair(100), 100);
        c.close(pair(200));
        let t = c.close(pair(150));
        assert_eq!((t.interval_ns, t.end.mono_ns), (0, 200));
    }

    #[test]
    fn boundaries_belong_to_the_bucket_they_end() {
        let mut c = BucketClock::new(pair(0), 100);
        c.close(pair(100));
        c.close(pair(200));
        assert_eq!(c.seq_of(0), None);
        assert_eq!(c.seq_of(1), Some(0));
        assert_eq!(c.seq_of(100), Some(0));
        assert_eq!(c.seq_of(101), Some(1));
        assert_eq!(c.seq_of(200), Some(1));
        assert_eq!(c.seq_of(201), Some(2)); // the open bucket
    }

    #[test]
    fn late_records_land_in_the_bucket_they_happened_in() {
        let mut c = BucketClock::new(pair(0), 10);
        for k in 1..=50 {
            c.close(pair(k * 10));
        }
        // A record stamped at 125 arrives after bucket 12 closed.
        assert_eq!(c.seq_of(125), Some(12));
        assert_eq!(c.seq_of(500), Some(49));
    }

    #[test]
    fn records_older_than_the_history_get_the_oldest_kept_bucket() {
        let mut c = BucketClock::new(pair(0), 1);
        for k in 1..=(HISTORY as u64 + 10) {
            c.close(pair(k));
        }
        assert_eq!(c.seq_of(3), Some(10));
    }

    #[test]
    fn wall_of_uses_the_pair_offset() {
        let p = pair(5_000);
        assert_eq!(p.wall_of(6_000), 1_006_000);
        assert_eq!(p.wall_of(4_000), 1_004_000);
    }
}
