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
    fs,
    io::{BufRead as _, BufReader},
    iter::Peekable,
};

use anyhow::Result;

use super::{Exited, Report, Scan, TOLERANCES, allowed, explained};
use crate::{meta::Meta, row::Row};

const N: usize = TOLERANCES.len();

/// One row of a source, as this check needs it: `seq` and each
/// [`TOLERANCES`] entry.
struct Values {
    seq: u64,
    v: [Option<u64>; N],
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
    why: String,
}

/// Two sources' running totals of one field.
struct Pair {
    a: usize,
    b: usize,
    field: usize,
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

/// What one source can have counted at a bucket's end that the other
/// counts in the next bucket: the later-read one's bucket and the
/// earlier-read one's next bucket both hold it (which one was read first
/// is not known, so the larger of the two ways), and, for CPU time, no
/// more than every CPU running for the tracer's longest spread of reads.
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
    let cpu_window = meta
        .read_spread_max_ns
        .map(|w| w.saturating_mul(meta.host.cpus as u64));
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
                    pairs.push(Pair {
                        a,
                        b,
                        field,
                        x: 0,
                        y: 0,
                        ends: 0,
                        over: 0,
                        nearest: None,
                        pending: None,
                    });
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
        let next: Vec<Option<[Option<u64>; N]>> =
            readers.iter_mut().map(|r| r.peek().map(|v| v.v)).collect();
        let seq = now[0].seq;
        for p in &mut pairs {
            let t = &TOLERANCES[p.field];
            let (Some(va), Some(vb)) = (now[p.a].v[p.field], now[p.b].v[p.field]) else {
                continue;
            };
            p.x = p.x.saturating_add(va);
            p.y = p.y.saturating_add(vb);
            // The previous bucket end both measured was not the last.
            if let Some(n) = p.pending.take() {
                p.commit(n);
            }
            let after = |s: usize| next[s].and_then(|v| v[p.field]).unwrap_or(0);
            let gap = gap(t.field, (va, vb), (after(p.a), after(p.b)), cpu_window);
            let tolerance = allowed(p.x, p.y, t.relative, t.absolute);
            let blind = exited.blind_spot_until(t.field, seq.saturating_add(1));
            let (known, why) = explained(
                t.field,
                (sources[p.a].0, p.x),
                (sources[p.b].0, p.y),
                meta,
                blind,
            );
            let allowed = tolerance.saturating_add(gap).saturating_add(known);
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
        let (field, a, b) = (TOLERANCES[p.field].field, sources[p.a].0, sources[p.b].0);
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
