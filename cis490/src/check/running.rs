//! Per bucket: two sources that measure the same quantity agree at every
//! bucket end, not only over the whole episode.
//!
//! Rows hold what happened in each bucket, so their running totals (the
//! sums of the rows up to a bucket) are what each source had counted when
//! the tracer read it at that bucket's end. Two exact sources differ there
//! only by what one of them counted before the other's read: the tracer
//! reads its sources one after another at each boundary. That is at most
//! what the later-read source has in the bucket and the earlier-read one in
//! the next (the same events, counted on the two sides of the boundary),
//! and, for CPU time, at most the tracer's longest spread of reads at one
//! boundary (`meta.json` `read_spread_max_ns`) on every CPU. So at each
//! bucket end the running totals must agree within the totals' tolerance
//! (applied to the running totals) plus that, plus the differences the
//! episode itself explains (the exited threads' tails, the /proc oracle's
//! blind spot up to that bucket, steal time). A bucket's count moved to
//! another bucket, or one raised, is named even where the episode's totals
//! still agree.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    iter::Peekable,
};

use anyhow::Result;

use super::{
    Exited, Explained, Report, Scan, TAP_ABSOLUTE_BYTES, TAP_ABSOLUTE_FRAMES, TAP_RELATIVE,
    TOLERANCES, allowed, explained,
};
use crate::{
    meta::Meta,
    row::{NetCounters, Row},
};

const N: usize = TOLERANCES.len();

/// One row of a source, as this check needs it: `seq`, each
/// [`TOLERANCES`] entry, and the taps' counters (`net_by_if` but
/// `sockets`).
struct Values {
    seq: u64,
    v: [Option<u64>; N],
    taps: Option<BTreeMap<String, NetCounters>>,
}

/// What a pair of sources compares.
enum Field {
    /// Entry `i` of [`TOLERANCES`].
    Table(usize),
    /// One counter of a tap that both count (eBPF and /proc: the tap's own
    /// counters), as [`TAP_COUNTERS`] lists them.
    Tap { name: String, counter: usize },
}

/// One of a tap's counters: its name, its value, the absolute floor of its
/// tolerance.
pub(super) type TapCounter = (&'static str, fn(&NetCounters) -> u64, u64);

/// A tap's counters.
pub(super) const TAP_COUNTERS: [TapCounter; 4] = [
    ("tx_bytes", |c| c.tx_bytes, TAP_ABSOLUTE_BYTES),
    ("tx_packets", |c| c.tx_packets, TAP_ABSOLUTE_FRAMES),
    ("rx_bytes", |c| c.rx_bytes, TAP_ABSOLUTE_BYTES),
    ("rx_packets", |c| c.rx_packets, TAP_ABSOLUTE_FRAMES),
];

impl Field {
    /// The row's value; a tap missing from a row's `net_by_if` (not known
    /// yet) counts 0 there.
    fn of(&self, v: &Values) -> Option<u64> {
        match self {
            Field::Table(i) => v.v[*i],
            Field::Tap { name, counter } => v
                .taps
                .as_ref()
                .map(|t| t.get(name).map_or(0, TAP_COUNTERS[*counter].1)),
        }
    }

    /// How it is named in the lines (as in the totals' lines).
    fn label(&self) -> String {
        match self {
            Field::Table(i) => TOLERANCES[*i].field.to_owned(),
            Field::Tap { name, counter } => {
                format!("net_by_if.{name}.{}", TAP_COUNTERS[*counter].0)
            }
        }
    }

    /// The totals' tolerance: share and floor.
    fn tolerance(&self) -> (f64, u64) {
        match self {
            Field::Table(i) => (TOLERANCES[*i].relative, TOLERANCES[*i].absolute),
            Field::Tap { counter, .. } => (TAP_RELATIVE, TAP_COUNTERS[*counter].2),
        }
    }
}

type Rows = Peekable<Box<dyn Iterator<Item = Values>>>;

/// A source's rows read again (those that parse, as the first read
/// numbered them).
fn rows(scan: &Scan) -> Result<Rows> {
    let lines = BufReader::new(fs::File::open(&scan.path)?).lines();
    let it: Box<dyn Iterator<Item = Values>> = Box::new(
        lines
            .filter_map(|l| serde_json::from_str::<Row>(&l.ok()?).ok())
            .map(|row| Values {
                seq: row.seq,
                v: std::array::from_fn(|i| (TOLERANCES[i].get)(&row.m)),
                taps: row.m.net_by_if.map(|mut t| {
                    t.remove("sockets");
                    t
                }),
            }),
    );
    Ok(it.peekable())
}

/// The bucket end where a pair came closest to (or went furthest past)
/// its allowance.
struct Nearest {
    ratio: f64,
    seq: u64,
    x: u64,
    y: u64,
    allowed: u64,
    tolerance: u64,
    gap: u64,
    why: Explained,
}

/// Two sources' running totals of one field.
struct Pair {
    a: usize,
    b: usize,
    field: Field,
    /// `field`'s name in the lines.
    label: String,
    x: u64,
    y: u64,
    ends: u64,
    over: u64,
    nearest: Option<Nearest>,
    /// The latest bucket end both measured, counted once a later one shows
    /// it was not the last.
    pending: Option<Nearest>,
}

impl Pair {
    fn commit(&mut self, n: Nearest) {
        self.ends += 1;
        if n.x.abs_diff(n.y) > n.allowed {
            self.over += 1;
        }
        if self.nearest.as_ref().is_none_or(|m| n.ratio > m.ratio) {
            self.nearest = Some(n);
        }
    }
}

/// One scheduler tick at the coarsest rate (HZ=100), ns: the /proc
/// oracle's CPU time (the process's `utime + stime`) leaves out what each
/// running thread ran since its last tick, which eBPF and perf count.
const TICK_NS: u64 = 10_000_000;

/// What one source can have counted at a bucket's end that the other
/// counts in the next bucket: the later-read one's bucket and the
/// earlier-read one's next bucket both hold it (which one was read first
/// is not known, so the larger of the two ways), and, for CPU time, no
/// more than every CPU running for the tracer's longest spread of reads
/// and a tick ([`TICK_NS`]).
fn gap(field: &str, (a, b): (u64, u64), next: (u64, u64), cpu_window: Option<u64>) -> u64 {
    let g = b.min(next.0).max(a.min(next.1));
    match cpu_window {
        Some(w) if field == "cpu_ns" => g.min(w),
        _ => g,
    }
}

/// Adds one check line per pair of sources and shared field: the running
/// totals at every bucket end both sources measured but the last one
/// (there they are the totals, compared on their own). Does nothing when the
/// sources' buckets are not aligned (that is a problem of its own).
pub(super) fn check(
    r: &mut Report,
    meta: &Meta,
    sources: &[(&str, &Scan)],
    exited: &Exited,
) -> Result<()> {
    if sources.windows(2).any(|w| w[0].1.clocks != w[1].1.clocks) {
        return Ok(());
    }
    let cpu_window = meta.read_spread_max_ns.map(|w| {
        w.saturating_add(TICK_NS)
            .saturating_mul(meta.host.cpus as u64)
    });
    let pair = |a, b, field: Field| Pair {
        a,
        b,
        label: field.label(),
        field,
        x: 0,
        y: 0,
        ends: 0,
        over: 0,
        nearest: None,
        pending: None,
    };
    let mut pairs = Vec::new();
    for (field, t) in TOLERANCES.iter().enumerate() {
        for a in 0..sources.len() {
            for b in a + 1..sources.len() {
                let (na, nb) = (sources[a].0, sources[b].0);
                if t.except.contains(&na) || t.except.contains(&nb) {
                    continue;
                }
                let measured = |s: &Scan| s.totals[field].is_some();
                if measured(sources[a].1) && measured(sources[b].1) {
                    pairs.push(pair(a, b, Field::Table(field)));
                }
            }
        }
    }
    // Each tap that eBPF and the /proc oracle both count.
    let at = |name: &str| sources.iter().position(|(n, _)| *n == name);
    if let (Some(e), Some(p)) = (at("ebpf"), at("proc")) {
        let (a, b) = (e.min(p), e.max(p));
        for name in sources[e].1.taps.keys() {
            if sources[p].1.taps.contains_key(name) {
                for counter in 0..TAP_COUNTERS.len() {
                    let name = name.clone();
                    pairs.push(pair(a, b, Field::Tap { name, counter }));
                }
            }
        }
    }
    if pairs.is_empty() {
        return Ok(());
    }
    let mut readers = sources
        .iter()
        .map(|(_, s)| rows(s))
        .collect::<Result<Vec<_>>>()?;
    loop {
        let now: Vec<Option<Values>> = readers.iter_mut().map(Iterator::next).collect();
        if now.iter().any(Option::is_none) {
            break;
        }
        let now: Vec<Values> = now.into_iter().flatten().collect();
        let seq = now[0].seq;
        for p in &mut pairs {
            let (Some(va), Some(vb)) = (p.field.of(&now[p.a]), p.field.of(&now[p.b])) else {
                continue;
            };
            p.x = p.x.saturating_add(va);
            p.y = p.y.saturating_add(vb);
            // The previous bucket end both measured was not the last.
            if let Some(n) = p.pending.take() {
                p.commit(n);
            }
            let field = &p.field;
            let mut after = |s: usize| readers[s].peek().and_then(|v| field.of(v)).unwrap_or(0);
            let next = (after(p.a), after(p.b));
            let gap = gap(&p.label, (va, vb), next, cpu_window);
            let (relative, absolute) = p.field.tolerance();
            let tolerance = allowed(p.x, p.y, relative, absolute);
            // The exited threads' own switches and migrations bound what
            // the /proc oracle missed of them, but only the lines of the
            // whole episode: a line holds a thread's counters as it began
            // to exit, and its switches on its way out (many under
            // emulation) can be missed before a later thread's line comes.
            let blind = exited.blind_spot(&p.label).map(|n| (exited.threads, n));
            let why = explained(
                &p.label,
                (sources[p.a].0, p.x),
                (sources[p.b].0, p.y),
                meta,
                blind,
            );
            let allowed = tolerance.saturating_add(gap).saturating_add(why.ns());
            p.pending = Some(Nearest {
                ratio: p.x.abs_diff(p.y) as f64 / allowed.max(1) as f64,
                seq,
                x: p.x,
                y: p.y,
                allowed,
                tolerance,
                gap,
                why,
            });
        }
    }
    // The last bucket end both measured (left pending) is the totals'
    // comparison, made on its own.
    for p in pairs {
        let Some(n) = p.nearest else { continue };
        let (field, a, b) = (&p.label, sources[p.a].0, sources[p.b].0);
        let Nearest {
            seq,
            x,
            y,
            allowed,
            tolerance,
            gap,
            why,
            ..
        } = n;
        let ends = p.ends;
        r.check(
            p.over == 0,
            if p.over == 0 {
                format!(
                    "{field}: {a} {x} vs {b} {y} by the end of seq {seq}, the nearest to its \
                     allowance of {ends} bucket ends before the last (running totals, allowed \
                     {allowed})"
                )
            } else {
                format!(
                    "{field}: {a} {x} vs {b} {y} by the end of seq {seq} (running totals, \
                     allowed {allowed}: the totals' tolerance {tolerance} + {gap} that one \
                     source can count before the other at that boundary{why}); {} of the {ends} \
                     bucket ends before the last over",
                    p.over
                )
            },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::gap;

    #[test]
    fn what_one_source_counts_before_the_other_is_bounded_both_ways() {
        // a read first: b's bucket and a's next bucket hold the same events.
        assert_eq!(gap("ctx_switches", (10, 30), (25, 0), None), 25);
        // b read first.
        assert_eq!(gap("ctx_switches", (30, 10), (0, 25), None), 25);
        // Nothing in the next bucket: nothing counted early.
        assert_eq!(gap("ctx_switches", (30, 10), (0, 0), None), 0);
        // CPU time: also at most the window of reads on every CPU.
        assert_eq!(gap("cpu_ns", (90, 100), (80, 0), Some(40)), 40);
        assert_eq!(gap("cpu_ns", (90, 100), (30, 0), Some(40)), 30);
        assert_eq!(gap("migrations", (90, 100), (80, 0), Some(40)), 80);
    }
}
