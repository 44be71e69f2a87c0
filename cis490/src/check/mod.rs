//! `cis490 check EPISODE`: validates an episode directory against the
//! documented schema and the sources against each other. Exits non-zero
//! with one line per problem.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead as _, BufReader},
    path::Path,
};

use anyhow::{Result, bail};
use serde_json::Value;

mod running;

use crate::{
    episode::{DONE, EVENTS, LABELS, META},
    meta::{Meta, Status},
    row::{Measures, NetCounters, Row, SourceKind},
};

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: Vec<String>,
    pub problems: Vec<String>,
}

impl Report {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if ok {
            self.passed.push(what.into());
        } else {
            self.problems.push(what.into());
        }
    }
}

/// The keys every row carries (the envelope and every measure).
pub fn row_keys() -> BTreeSet<String> {
    let row = Row {
        episode_id: String::new(),
        source: SourceKind::Ebpf,
        available_in_deployment: false,
        t_mono_ns: 0,
        t_wall_ns: 0,
        interval_ns: 0,
        seq: 0,
        m: Measures::default(),
    };
    match serde_json::to_value(&row) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => BTreeSet::new(),
    }
}

/// The schemas of `events.jsonl` and `labels.jsonl` lines (the documented
/// contract, embedded).
const EVENT_SCHEMA: &str = include_str!("../../../docs/event.schema.json");
const LABEL_SCHEMA: &str = include_str!("../../../docs/label.schema.json");

fn read_jsonl(path: &Path) -> Result<Vec<(usize, Result<Value, String>)>> {
    let text = fs::read_to_string(path)?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, serde_json::from_str(l).map_err(|e| e.to_string())))
        .collect())
}

/// Adds a row's value to a field's total (`None` while no row measured
/// it), saturating at `u64::MAX` (rows of a malformed file can get there).
fn add_total(acc: &mut Option<u64>, v: Option<u64>) {
    if let Some(v) = v {
        *acc = Some(acc.unwrap_or(0).saturating_add(v));
    }
}

/// What the check keeps of one source's rows.
struct Scan {
    /// The source's file.
    path: std::path::PathBuf,
    /// `(seq, t_mono_ns, t_wall_ns)` of each row.
    clocks: Vec<(u64, u64, u64)>,
    /// Per entry of [`TOLERANCES`], the source's total.
    totals: Vec<Option<u64>>,
    /// Per row, bit `i` set where entry `i` of [`TOLERANCES`] is null.
    nulls: Vec<u8>,
    /// The VM's frames, for the gateway-vs-taps comparison.
    frames: Option<crate::sources::gateway::check::Frames>,
    /// Per tap of the target: its counters summed over the rows of
    /// `net_by_if` (eBPF and /proc, for their comparison).
    taps: BTreeMap<String, NetCounters>,
}

/// Allowed difference between the eBPF and /proc tap counters of one tap:
/// this share of the larger total, or at least this many frames, or bytes
/// (as many full-size frames): the two read at the same boundary, a moment
/// apart, so a tap busy at the episode's ends differs by what passed then.
const TAP_RELATIVE: f64 = 0.02;
const TAP_ABSOLUTE_FRAMES: u64 = 64;
const TAP_ABSOLUTE_BYTES: u64 = 64 * 1514;

/// How far totals `x` and `y` may be apart: `relative` of the larger, and
/// at least `absolute`.
fn allowed(x: u64, y: u64, relative: f64, absolute: u64) -> u64 {
    absolute.max((x.max(y) as f64 * relative) as u64)
}

/// Adds a row's taps (`net_by_if` without the `sockets` vantage).
fn add_taps(acc: &mut BTreeMap<String, NetCounters>, m: &Measures) {
    for (name, c) in m.net_by_if.iter().flatten() {
        if name != "sockets" {
            acc.entry(name.clone()).or_default().add(c);
        }
    }
}

/// What a bucket's CPU time may be at most: its length plus
/// [`CPU_SLACK_NS`], times the machine's CPUs.
fn cpu_cap(interval_ns: u64, cpus: u64) -> u64 {
    interval_ns
        .saturating_add(CPU_SLACK_NS)
        .saturating_mul(cpus)
}

/// How much longer than its length a bucket's CPU time may be counted, on
/// each CPU: the tracer reads the counters a moment after it stamps a
/// bucket's end, so a bucket can hold what every CPU ran until then and the
/// next one less, and the /proc oracle's is read in clock ticks. Under
/// software emulation that moment was up to 55 ms later than the one before
/// (303 ms of CPU in a 96 ms bucket on 2 CPUs, in the 6.1 guest,
/// `defaults::page_faults_agree_with_the_process_own_count`).
const CPU_SLACK_NS: u64 = 100_000_000;

/// Bits of the [`TOLERANCES`] entries that `a` measured in row `i` and `b`
/// did not (a row `b` lacks counts as not measured).
fn lone_bits(a: &Scan, b: &Scan, i: usize) -> u8 {
    const ALL: u8 = (1u16 << TOLERANCES.len()).wrapping_sub(1) as u8;
    !a.nulls[i] & b.nulls.get(i).copied().unwrap_or(ALL) & ALL
}

/// Per ordered pair of sources `(a, b)`, per entry of [`TOLERANCES`]: the
/// sum of `a`'s values in the rows where `b` has that field `null`. Each
/// source's file is read again at most once, and only when such a row
/// exists (rows are numbered as the first read numbered them: those that
/// parse).
fn lone_sums(by_source: &BTreeMap<String, Scan>) -> Result<BTreeMap<(&str, &str), Vec<u64>>> {
    let mut out = BTreeMap::new();
    for (a, sa) in by_source {
        let others: Vec<(&str, &Scan)> = by_source
            .iter()
            .filter(|(b, _)| *b != a)
            .map(|(b, sb)| (b.as_str(), sb))
            .collect();
        let lone = |i: usize| others.iter().any(|(_, sb)| lone_bits(sa, sb, i) != 0);
        if !(0..sa.nulls.len()).any(lone) {
            continue;
        }
        let mut sums = vec![vec![0u64; TOLERANCES.len()]; others.len()];
        let lines = BufReader::new(fs::File::open(&sa.path)?).lines();
        let rows = lines.filter_map(|l| serde_json::from_str::<Row>(&l.ok()?).ok());
        for (i, row) in rows.enumerate().take(sa.nulls.len()) {
            for ((_, sb), sum) in others.iter().zip(sums.iter_mut()) {
                let bits = lone_bits(sa, sb, i);
                for (ti, t) in TOLERANCES.iter().enumerate() {
                    if bits >> ti & 1 == 1 {
                        sum[ti] = sum[ti].saturating_add((t.get)(&row.m).unwrap_or(0));
                    }
                }
            }
        }
        for ((b, _), sum) in others.into_iter().zip(sums) {
            out.insert((a.as_str(), b), sum);
        }
    }
    Ok(out)
}

/// Two sources' totals of entry `ti` of [`TOLERANCES`] over the buckets
/// where both measured it, and how many of the rows that is: a bucket one
/// source could not measure (the /proc oracle's last one when the target's
/// parent reaped it first, its I/O where the target reaped a child) is left
/// out of both (`lone`: [`lone_sums`]). `None` when no bucket has both.
fn common_totals(
    (a, sa): (&str, &Scan),
    (b, sb): (&str, &Scan),
    ti: usize,
    lone: &BTreeMap<(&str, &str), Vec<u64>>,
) -> Option<(u64, u64, usize)> {
    let (x, y) = (sa.totals[ti]?, sb.totals[ti]?);
    let bit = 1u8 << ti;
    let rows = sa.nulls.len().min(sb.nulls.len());
    let both = (0..rows)
        .filter(|&i| (sa.nulls[i] | sb.nulls[i]) & bit == 0)
        .count();
    if both == 0 {
        return None;
    }
    let less = |p: (&str, &str)| lone.get(&p).map_or(0, |s| s[ti]);
    Some((
        x.saturating_sub(less((a, b))),
        y.saturating_sub(less((b, a))),
        both,
    ))
}

/// What the target's exited threads did over their lives, from their
/// `thread_exited` lines: the most the /proc oracle, which reads each
/// thread's own counters when it polls, can have missed of them (a thread
/// that exited between two polls, or the tail after its last poll).
#[derive(Default)]
struct Exited {
    threads: u64,
    switches: u64,
    migrations: u64,
}

impl Exited {
    fn of<'a>(lines: impl Iterator<Item = &'a Value>) -> Self {
        let mut e = Self::default();
        for v in lines.filter(|v| v["event"] == "thread_exited") {
            let n = |k: &str| v[k].as_u64().unwrap_or(0);
            e.threads += 1;
            e.switches = e
                .switches
                .saturating_add(n("ctx_switches_voluntary"))
                .saturating_add(n("ctx_switches_involuntary"));
            e.migrations = e.migrations.saturating_add(n("migrations"));
        }
        e
    }

    /// The /proc oracle may be this much below another source on `field`.
    fn blind_spot(&self, field: &str) -> Option<u64> {
        match field {
            "ctx_switches" => Some(self.switches),
            "migrations" => Some(self.migrations),
            _ => None,
        }
    }
}

/// How much more than their tolerance two sources' totals of a field may
/// differ for reasons the episode states ([`explained`]); its `Display` is
/// the words for it (empty, or ", of which ...").
#[derive(Clone, Copy, Debug)]
struct Explained {
    /// perf's task-clock while the hypervisor stole the CPU.
    steal: u64,
    /// The exited threads' CPU on their way out (eBPF above).
    tail: u64,
    /// The /proc oracle's blind spot (below), and the exited threads it is
    /// theirs.
    blind: u64,
    threads: u64,
}

impl Explained {
    fn ns(self) -> u64 {
        self.steal
            .saturating_add(self.tail)
            .saturating_add(self.blind)
    }
}

impl std::fmt::Display for Explained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Explained {
            tail,
            blind,
            threads,
            ..
        } = *self;
        if blind > 0 {
            write!(
                f,
                ", of which {blind} the /proc oracle's blind spot: the {threads} exited threads' own"
            )
        } else if tail > 0 {
            write!(
                f,
                ", of which {tail} the exited threads' CPU on their way out"
            )
        } else {
            Ok(())
        }
    }
}

/// How much more than its tolerance two sources' totals of `field` (`x`
/// of `a`, `y` of `b`) may differ for reasons the episode states.
/// `blind`: the exited threads so far and what they did of `field` (the
/// /proc oracle's blind spot), where it applies.
fn explained(
    field: &str,
    (a, x): (&str, u64),
    (b, y): (&str, u64),
    meta: &Meta,
    blind: Option<(u64, u64)>,
) -> Explained {
    // The named source's total and the other's, if it is one of the two.
    let side = |name: &str| match name {
        _ if name == a => Some((x, y)),
        _ if name == b => Some((y, x)),
        _ => None,
    };
    let above = |name: &str| side(name).is_some_and(|(s, o)| s > o);
    let below = |name: &str| side(name).is_some_and(|(s, o)| s < o);
    // perf's task-clock keeps counting while the hypervisor steals the
    // CPU; the scheduler's runtime does not.
    let steal = if field == "cpu_ns" && above("perf") {
        meta.host_steal_ns.unwrap_or(0)
    } else {
        0
    };
    // eBPF counts each exited thread to its final switch-out; the
    // process's totals stop where the kernel folded the thread into them,
    // on its way out.
    let tail = if field == "cpu_ns" && above("ebpf") {
        meta.ebpf.exit_path_cpu_ns
    } else {
        0
    };
    // The /proc oracle's blind spot: what a thread did after its last
    // poll, up to its exit.
    let (threads, blind) = match blind {
        Some((threads, n)) if below("proc") && n > 0 => (threads, n),
        _ => (0, 0),
    };
    Explained {
        steal,
        tail,
        blind,
        threads,
    }
}

/// QMP's block bytes against eBPF's, where they are the same I/O: every
/// guest disk (as `query-block` listed them when the QMP source connected,
/// `meta.json` `qmp.disks`) a raw image QEMU opened with O_DIRECT
/// (`cache=none`). Each direction holds the bound that must hold there: the
/// host never writes more than the guest asked (it may write less: a
/// guest's write-zeroes can be served without writing data) and never reads
/// less (it also reads QEMU's own files). 1% or 1 MiB.
fn qmp_against_the_host(
    r: &mut Report,
    meta: &Meta,
    by_source: &BTreeMap<String, Scan>,
    lone: &BTreeMap<(&str, &str), Vec<u64>>,
) {
    let (Some(q), Some(e)) = (by_source.get("qmp"), by_source.get("ebpf")) else {
        return;
    };
    let disks: Vec<&Value> = meta
        .qmp
        .as_ref()
        .and_then(|m| m.get("disks"))
        .and_then(Value::as_array)
        .map(|d| d.iter().collect())
        .unwrap_or_default();
    let unlike: Vec<String> = disks
        .iter()
        .filter(|d| !(d["driver"] == "raw" && d["direct"] == true))
        .map(|d| format!("{} ({}, direct {})", d["name"], d["driver"], d["direct"]))
        .collect();
    if disks.is_empty() || !unlike.is_empty() {
        r.check(
            true,
            if disks.is_empty() {
                "blk_*: qmp not held to ebpf (the guest's disks are not known)".to_owned()
            } else {
                format!(
                    "blk_*: qmp not held to ebpf (not a raw image opened with O_DIRECT: {})",
                    unlike.join(", ")
                )
            },
        );
        return;
    }
    for (field, host_at_most) in [("blk_write_bytes", true), ("blk_read_bytes", false)] {
        let Some(ti) = TOLERANCES.iter().position(|t| t.field == field) else {
            continue;
        };
        let Some((guest, host, both)) = common_totals(("qmp", q), ("ebpf", e), ti, lone) else {
            continue;
        };
        let allowed = allowed(guest, host, 0.01, 1 << 20);
        let (ok, bound) = if host_at_most {
            (host <= guest.saturating_add(allowed), "at most")
        } else {
            (host.saturating_add(allowed) >= guest, "at least")
        };
        r.check(
            ok,
            format!(
                "{field}: ebpf {host} vs qmp {guest} over {both} buckets (the host {bound} the \
                 guest's, allowed {allowed}: raw images opened with O_DIRECT)"
            ),
        );
    }
}

/// How far two sources may be apart on a total: a relative share plus an
/// absolute floor (one clock tick, a few switches per thread, a request).
struct Tolerance {
    field: &'static str,
    get: fn(&Measures) -> Option<u64>,
    relative: f64,
    absolute: u64,
    /// Sources left out of the comparison because they measure the field
    /// in another scope.
    except: &'static [&'static str],
}

/// QMP counts the guest's own devices: not QEMU's reads of its kernel,
/// firmware and libraries, and (unless the disk is `cache=none`) not what
/// the host's page cache turns guest I/O into. Its block totals are a
/// different quantity from the process's, so they are not held to them.
const GUEST_SCOPE: &[&str] = &["qmp"];

const TOLERANCES: &[Tolerance] = &[
    Tolerance {
        field: "cpu_ns",
        get: |m| m.cpu_ns,
        relative: 0.02,
        absolute: 20_000_000,
        except: &[],
    },
    Tolerance {
        field: "ctx_switches",
        get: |m| m.ctx_switches,
        relative: 0.05,
        absolute: 50,
        except: &[],
    },
    Tolerance {
        field: "migrations",
        get: |m| m.migrations,
        relative: 0.05,
        absolute: 10,
        except: &[],
    },
    Tolerance {
        field: "blk_read_bytes",
        get: |m| m.blk_read_bytes,
        relative: 0.05,
        absolute: 4 << 20,
        except: GUEST_SCOPE,
    },
    Tolerance {
        field: "blk_write_bytes",
        get: |m| m.blk_write_bytes,
        relative: 0.05,
        absolute: 4 << 20,
        except: GUEST_SCOPE,
    },
    Tolerance {
        field: "io_write_bytes",
        get: |m| m.io_write_bytes,
        relative: 0.05,
        absolute: 4 << 20,
        except: &[],
    },
    Tolerance {
        field: "page_faults_minor",
        get: |m| m.page_faults_minor,
        relative: 0.05,
        absolute: 50,
        except: &[],
    },
];

/// Validates `dir`; `Err` only when it cannot be read at all.
pub fn check(dir: &Path) -> Result<Report> {
    let mut r = Report::default();
    if !dir.join(META).exists() {
        bail!(
            "{} is not an episode directory (no meta.json)",
            dir.display()
        );
    }
    let meta: Meta = match serde_json::from_slice(&fs::read(dir.join(META))?) {
        Ok(v) => v,
        Err(e) => {
            r.check(false, format!("meta.json does not parse: {e}"));
            return Ok(r);
        }
    };
    let done = dir.join(DONE).exists();
    let status = meta.status.name();
    let why = match meta.status {
        Status::Running => "the tracer never finished it (killed, or still running)".to_owned(),
        Status::Failed => format!("the trace failed: {}", meta.error.as_deref().unwrap_or("?")),
        Status::Complete => String::new(),
    };
    r.check(
        done,
        if done {
            "done.marker present".to_owned()
        } else {
            format!("incomplete: no done.marker ({status}: {why})")
        },
    );
    r.check(
        meta.status == Status::Complete,
        format!(
            "meta.json status is {status}{}",
            if why.is_empty() {
                String::new()
            } else {
                format!(": {why}")
            }
        ),
    );
    if let Some(why) = meta
        .qmp
        .as_ref()
        .and_then(|q| q.get("error"))
        .and_then(|e| e.as_str())
    {
        r.check(
            false,
            format!("qmp: the QMP source was asked for but never connected: {why}"),
        );
    }
    if let Some(why) = meta.guest_agent.as_ref().and_then(|g| g.error.as_deref()) {
        r.check(
            false,
            format!("guest: the guest agent source was asked for but never connected: {why}"),
        );
    }
    let id = meta.id.clone();
    r.check(
        dir.file_name().is_some_and(|n| n == id.as_str()),
        format!("directory name is the episode id {id}"),
    );

    let mut exited = Exited::default();
    for (name, file, schema) in [
        ("events", EVENTS, EVENT_SCHEMA),
        ("labels", LABELS, LABEL_SCHEMA),
    ] {
        let schema: Value = serde_json::from_str(schema).expect("the embedded schema parses");
        let validator =
            jsonschema::draft202012::new(&schema).expect("the embedded schema compiles");
        match read_jsonl(&dir.join(file)) {
            Err(e) => r.check(false, format!("{file}: {e}")),
            Ok(lines) => {
                // Each line parses and fits its schema (the first problem
                // of a line is named).
                if name == "events" {
                    exited = Exited::of(lines.iter().filter_map(|(_, l)| l.as_ref().ok()));
                }
                let bad: Vec<String> = lines
                    .iter()
                    .filter_map(|(n, l)| match l {
                        Err(e) => Some(format!("{file}:{n}: {e}")),
                        Ok(v) => validator.iter_errors(v).next().map(|e| {
                            format!("{file}:{n}: not a valid line ({}: {e})", e.instance_path())
                        }),
                    })
                    .collect();
                r.check(
                    bad.is_empty(),
                    if bad.is_empty() {
                        format!("{name}: {} lines parse", lines.len())
                    } else {
                        bad.join("; ")
                    },
                );
            }
        }
    }

    let keys = row_keys();
    let start = meta.start.map(|c| c.t_mono_ns);
    let cpus = meta.host.cpus as u64;
    // Per source, streamed (an hour at 1 ms is 3.6M rows a source): each
    // row's clock triple for the alignment check and the totals the
    // tolerances compare, never the rows themselves.
    let mut by_source: BTreeMap<String, Scan> = BTreeMap::new();
    for s in &meta.sources {
        let (name, file) = (s.source.name(), s.file.as_str());
        let f = match fs::File::open(dir.join(file)) {
            Ok(f) => f,
            Err(e) => {
                r.check(false, format!("{file}: {e}"));
                continue;
            }
        };
        let mut scan = Scan {
            path: dir.join(file),
            clocks: Vec::new(),
            totals: vec![None; TOLERANCES.len()],
            nulls: Vec::new(),
            frames: None,
            taps: BTreeMap::new(),
        };
        let mut problems = Vec::new();
        let mut more = 0usize;
        let mut problem = |p: String| {
            if problems.len() < 3 {
                problems.push(p);
            } else {
                more += 1;
            }
        };
        let mut prev = start;
        let mut order_ok = true;
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let n = i + 1;
            let line = match line {
                Ok(l) => l,
                Err(e) => {
                    problem(format!("{file}:{n}: {e}"));
                    break;
                }
            };
            let v: Value = match serde_json::from_str(&line) {
                Ok(v) => v,
                Err(e) => {
                    problem(format!("{file}:{n}: not JSON: {e}"));
                    continue;
                }
            };
            let got: BTreeSet<&String> = v
                .as_object()
                .map(|m| m.keys().collect())
                .unwrap_or_default();
            if !got.iter().copied().eq(keys.iter()) {
                let missing: Vec<_> = keys.iter().filter(|k| !got.contains(k)).collect();
                let extra: Vec<_> = got.iter().filter(|k| !keys.contains(**k)).collect();
                problem(format!(
                    "{file}:{n}: fields differ from the schema (missing {missing:?}, unknown {extra:?})"
                ));
            }
            let row = match serde_json::from_value::<Row>(v) {
                Ok(row) => row,
                Err(e) => {
                    problem(format!("{file}:{n}: a field has the wrong type: {e}"));
                    continue;
                }
            };
            let idx = scan.clocks.len();
            scan.clocks.push((row.seq, row.t_mono_ns, row.t_wall_ns));
            let cap = cpu_cap(row.interval_ns, cpus);
            if let Some(cpu) = row.m.cpu_ns
                && cpus > 0
                && cpu > cap
            {
                problem(format!(
                    "{file}: seq {} holds {cpu} ns of CPU in {} ns on {cpus} CPUs (at most {cap})",
                    row.seq, row.interval_ns
                ));
            }
            let mut nulls = 0u8;
            for (i, (t, acc)) in TOLERANCES.iter().zip(scan.totals.iter_mut()).enumerate() {
                let v = (t.get)(&row.m);
                nulls |= u8::from(v.is_none()) << i;
                add_total(acc, v);
            }
            scan.nulls.push(nulls);
            crate::sources::gateway::check::add_row(&mut scan.frames, row.source, &row.m);
            if matches!(row.source, SourceKind::Ebpf | SourceKind::Proc) {
                add_taps(&mut scan.taps, &row.m);
            }
            if !order_ok {
                continue;
            }
            if row.seq != idx as u64 {
                problem(format!(
                    "{file}: row {} has seq {} (gap or reorder)",
                    idx + 1,
                    row.seq
                ));
                order_ok = false;
                continue;
            }
            if row.source.name() != name || row.episode_id != id {
                problem(format!(
                    "{file}: row {} has source {} / episode {}",
                    idx + 1,
                    row.source.name(),
                    row.episode_id
                ));
                order_ok = false;
                continue;
            }
            if let Some(p) = prev {
                if row.t_mono_ns <= p && idx > 0 {
                    problem(format!(
                        "{file}: t_mono_ns not strictly increasing at seq {}",
                        row.seq
                    ));
                    order_ok = false;
                    continue;
                }
                if row.interval_ns != row.t_mono_ns.saturating_sub(p) {
                    problem(format!(
                        "{file}: interval_ns of seq {} is not the time since the previous row",
                        row.seq
                    ));
                    order_ok = false;
                    continue;
                }
            }
            prev = Some(row.t_mono_ns);
        }
        let rows = scan.clocks.len();
        let expected_rows = s.rows as usize;
        if rows != expected_rows {
            problem(format!(
                "{file}: {rows} rows, meta.json says {expected_rows}"
            ));
        }
        if more > 0 {
            problems.push(format!("and {more} more problem(s) in {file}"));
        }
        r.check(
            problems.is_empty(),
            if problems.is_empty() {
                format!("{name}: {rows} rows valid")
            } else {
                problems.join("; ")
            },
        );
        by_source.insert(name.to_owned(), scan);
    }

    // Buckets aligned across sources.
    let mut sources = by_source.iter();
    if let Some((first, scan)) = sources.next() {
        for (other, oscan) in sources {
            r.check(
                scan.clocks == oscan.clocks,
                format!("{first} and {other}: buckets aligned (seq and clock pair)"),
            );
        }
    }

    // Totals of shared fields agree, over the buckets both sources measured.
    let names: Vec<&String> = by_source.keys().collect();
    let lone = lone_sums(&by_source)?;
    for (ti, t) in TOLERANCES.iter().enumerate() {
        for (i, a) in names.iter().enumerate() {
            for b in &names[i + 1..] {
                if t.except.contains(&a.as_str()) || t.except.contains(&b.as_str()) {
                    continue;
                }
                let Some((x, y, both)) = common_totals(
                    (a.as_str(), &by_source[*a]),
                    (b.as_str(), &by_source[*b]),
                    ti,
                    &lone,
                ) else {
                    continue;
                };
                let rows = by_source[*a].nulls.len();
                let over = if both < rows {
                    format!(" over the {both} of {rows} buckets both measured")
                } else {
                    String::new()
                };
                let blind = exited.blind_spot(t.field).map(|n| (exited.threads, n));
                let why = explained(t.field, (a, x), (b, y), &meta, blind);
                let known = why.ns();
                let allowed = allowed(x, y, t.relative, t.absolute).saturating_add(known);
                r.check(
                    x.abs_diff(y) <= allowed,
                    format!(
                        "{}: {a} {x} vs {b} {y}{over} (allowed {allowed}{why})",
                        t.field
                    ),
                );
            }
        }
    }
    // The same, at every bucket end.
    let sources: Vec<(&str, &Scan)> = by_source.iter().map(|(n, s)| (n.as_str(), s)).collect();
    running::check(&mut r, &meta, &sources, &exited)?;
    qmp_against_the_host(&mut r, &meta, &by_source, &lone);
    // Each tap's counters: eBPF against /proc (the tap's own counters).
    // Sent: what the host received from the target; received: what the
    // target read from the tap (docs/data-model.md). The two are read at
    // the same boundary a moment apart: traffic then is in one and not yet
    // in the other. (At every bucket end too: `running`.)
    if let (Some(e), Some(p)) = (by_source.get("ebpf"), by_source.get("proc")) {
        for (tap, ec) in &e.taps {
            let Some(pc) = p.taps.get(tap) else {
                continue;
            };
            for (what, get, abs) in running::TAP_COUNTERS {
                let (x, y) = (get(ec), get(pc));
                let allowed = allowed(x, y, TAP_RELATIVE, abs);
                r.check(
                    x.abs_diff(y) <= allowed,
                    format!("net_by_if.{tap}.{what}: ebpf {x} vs proc {y} (allowed {allowed})"),
                );
            }
        }
    }
    // The gateway against the eBPF tap counters of the same VM.
    let frames = |s: &str| by_source.get(s).and_then(|s| s.frames);
    if let (Some(taps), Some(gw)) = (frames("ebpf"), frames("gateway")) {
        for (ok, what) in crate::sources::gateway::check::compare(&taps, &gw) {
            r.check(ok, format!("gateway vs ebpf taps, {what}"));
        }
    }
    Ok(r)
}

pub fn run(dir: &Path) -> Result<()> {
    let report = check(dir)?;
    for p in &report.passed {
        println!("ok    {p}");
    }
    for p in &report.problems {
        println!("FAIL  {p}");
    }
    if report.problems.is_empty() {
        println!("{}: valid ({} checks)", dir.display(), report.passed.len());
        Ok(())
    } else {
        bail!(
            "{}: {} problem(s); first: {}",
            dir.display(),
            report.problems.len(),
            report.problems[0]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_keys_include_every_field() {
        let k = row_keys();
        for f in [
            "episode_id",
            "seq",
            "cpu_ns",
            "net_by_if",
            "kvm_exits",
            "blk_by_dev",
            "cycles",
        ] {
            assert!(k.contains(f), "{f}");
        }
    }

    fn write_episode(dir: &Path, rows: &[Value], done: bool) {
        let id = dir.file_name().unwrap().to_str().unwrap();
        let meta = serde_json::json!({"id": id, "status": if done {"complete"} else {"running"},
            "start": {"t_mono_ns": 1000}, "sources": [{"source": "ebpf", "file": "telemetry-ebpf.jsonl", "rows": rows.len()}]});
        fs::write(dir.join(META), meta.to_string()).unwrap();
        fs::write(
            dir.join(EVENTS),
            "{\"t_mono_ns\":1000,\"t_wall_ns\":1,\"seq\":null,\"event\":\"started\",\"pid\":1,\"mode\":\"spawn\",\"interval_ns\":100}\n",
        )
        .unwrap();
        fs::write(dir.join(LABELS), "").unwrap();
        let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
        fs::write(dir.join("telemetry-ebpf.jsonl"), text).unwrap();
        if done {
            fs::write(dir.join(DONE), "").unwrap();
        }
    }

    fn row(id: &str, seq: u64, t: u64, interval: u64) -> Value {
        let mut v = serde_json::to_value(Row {
            episode_id: id.into(),
            source: SourceKind::Ebpf,
            available_in_deployment: false,
            t_mono_ns: t,
            t_wall_ns: t + 5,
            interval_ns: interval,
            seq,
            m: Measures {
                cpu_ns: Some(1),
                ..Default::default()
            },
        })
        .unwrap();
        v["cpu_ns"] = 1.into();
        v
    }

    /// One bucket per source, each with `field` set to the given total
    /// (every other measure null), and `host_steal_ns` in meta.json.
    fn write_sources(dir: &Path, field: &str, totals: &[(SourceKind, u64)], steal: Option<u64>) {
        let rows: Vec<(SourceKind, Vec<Option<u64>>)> =
            totals.iter().map(|&(s, v)| (s, vec![Some(v)])).collect();
        write_rows(dir, field, &rows, steal);
    }

    /// Per source, one bucket per value with `field` set to it (`None`:
    /// null; every other measure null), and `host_steal_ns` in meta.json.
    fn write_rows(
        dir: &Path,
        field: &str,
        sources: &[(SourceKind, Vec<Option<u64>>)],
        steal: Option<u64>,
    ) {
        let id = dir.file_name().unwrap().to_str().unwrap();
        let list: Vec<Value> = sources
            .iter()
            .map(|(s, values)| {
                serde_json::json!({"source": s.name(), "file": format!("telemetry-{}.jsonl", s.name()), "rows": values.len()})
            })
            .collect();
        let mut meta = serde_json::json!({"id": id, "status": "complete",
            "start": {"t_mono_ns": 1000}, "sources": list});
        if let Some(steal) = steal {
            meta["host_steal_ns"] = steal.into();
        }
        fs::write(dir.join(META), meta.to_string()).unwrap();
        fs::write(
            dir.join(EVENTS),
            "{\"t_mono_ns\":1000,\"t_wall_ns\":1,\"seq\":null,\"event\":\"started\",\"pid\":1,\"mode\":\"spawn\",\"interval_ns\":100}\n",
        )
        .unwrap();
        fs::write(dir.join(LABELS), "").unwrap();
        fs::write(dir.join(DONE), "").unwrap();
        for (source, values) in sources {
            let mut text = String::new();
            for (seq, value) in values.iter().enumerate() {
                let mut v = serde_json::to_value(Row {
                    episode_id: id.into(),
                    source: *source,
                    available_in_deployment: false,
                    t_mono_ns: 1100 + 100 * seq as u64,
                    t_wall_ns: 1105 + 100 * seq as u64,
                    interval_ns: 100,
                    seq: seq as u64,
                    m: Measures::default(),
                })
                .unwrap();
                v[field] = (*value).into();
                text.push_str(&format!("{v}\n"));
            }
            fs::write(dir.join(format!("telemetry-{}.jsonl", source.name())), text).unwrap();
        }
    }

    /// The problems `check` finds in an episode of `totals` for `field`.
    fn problems_with(field: &str, totals: &[(SourceKind, u64)], steal: Option<u64>) -> Vec<String> {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("01TOL");
        fs::create_dir(&dir).unwrap();
        write_sources(&dir, field, totals, steal);
        let r = check(&dir).unwrap();
        assert!(
            r.passed.iter().any(|p| p.contains("rows valid")),
            "the episode itself must be valid: {:?} {:?}",
            r.passed,
            r.problems
        );
        r.problems
    }

    /// The tolerance table as docs/architecture.md states it (`cis490
    /// check`): a change to `TOLERANCES` must be a change there and here.
    const STATED: &[(&str, f64, u64, &[&str])] = &[
        ("cpu_ns", 0.02, 20_000_000, &[]),
        ("ctx_switches", 0.05, 50, &[]),
        ("migrations", 0.05, 10, &[]),
        ("blk_read_bytes", 0.05, 4 << 20, &["qmp"]),
        ("blk_write_bytes", 0.05, 4 << 20, &["qmp"]),
        ("io_write_bytes", 0.05, 4 << 20, &[]),
        ("page_faults_minor", 0.05, 50, &[]),
    ];

    /// A bucket one source could not measure (null: the /proc oracle's
    /// last one when the target's parent reaped it before the last sample,
    /// its I/O where the target reaped a child) is left out of both totals:
    /// the rest is compared, and says so.
    #[test]
    fn totals_are_compared_over_the_buckets_both_sources_measured() {
        use SourceKind::{Ebpf, Proc};
        for field in ["cpu_ns", "blk_read_bytes", "io_write_bytes"] {
            let base = tempfile::tempdir().unwrap();
            let dir = base.path().join("01GONE");
            fs::create_dir(&dir).unwrap();
            // The last bucket: 80 ms (or MiB) that /proc could not read.
            let big = 80u64 << 20;
            let rows = [
                (Ebpf, vec![Some(10 << 20), Some(big)]),
                (Proc, vec![Some(10 << 20), None]),
            ];
            write_rows(&dir, field, &rows, None);
            let r = check(&dir).unwrap();
            assert!(r.problems.is_empty(), "{field}: {:?}", r.problems);
            let want = format!(
                "{field}: ebpf {} vs proc {} over the 1 of 2 buckets both measured",
                10 << 20,
                10 << 20
            );
            assert!(
                r.passed.iter().any(|p| p.starts_with(&want)),
                "{want}: {:?}",
                r.passed
            );
            // A difference in the buckets both measured is still found.
            let rows = [
                (Ebpf, vec![Some(100 << 20), Some(big)]),
                (Proc, vec![Some(10 << 20), None]),
            ];
            write_rows(&dir, field, &rows, None);
            let r = check(&dir).unwrap();
            assert_eq!(r.problems.len(), 1, "{field}: {:?}", r.problems);
            assert!(
                r.problems[0].contains("over the 1 of 2 buckets"),
                "{:?}",
                r.problems
            );
            // No bucket with both: nothing to compare.
            let rows = [(Ebpf, vec![Some(big), None]), (Proc, vec![None, Some(1)])];
            write_rows(&dir, field, &rows, None);
            let r = check(&dir).unwrap();
            assert!(r.problems.is_empty(), "{field}: {:?}", r.problems);
            assert!(
                !r.passed
                    .iter()
                    .any(|p| p.starts_with(&format!("{field}: ebpf")))
            );
        }
    }

    /// No bucket holds more CPU time than it lasted times the machine's CPUs
    /// (plus the stated slack): one row raised by a second is named, one at
    /// the cap is not; without the CPU count nothing is claimed.
    #[test]
    fn a_bucket_with_more_cpu_than_it_lasted_is_named() {
        use SourceKind::{Ebpf, Proc};
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("01CPUS");
        fs::create_dir(&dir).unwrap();
        // Buckets of 100 ns (write_rows): on 2 CPUs, at most (100 ns + slack) x 2.
        let cap = cpu_cap(100, 2);
        assert_eq!(cap, (100 + CPU_SLACK_NS) * 2);
        let over = cap + 1_000_000_000;
        let rows = [
            (Ebpf, vec![Some(cap), Some(over)]),
            (Proc, vec![Some(cap), Some(over)]),
        ];
        write_rows(&dir, "cpu_ns", &rows, None);
        let set_cpus = |cpus: u64| {
            let mut meta: Value =
                serde_json::from_slice(&fs::read(dir.join(META)).unwrap()).unwrap();
            meta["host"] = serde_json::json!({"cpus": cpus});
            fs::write(dir.join(META), meta.to_string()).unwrap();
        };
        set_cpus(2);
        let r = check(&dir).unwrap();
        let want = format!("seq 1 holds {over} ns of CPU in 100 ns on 2 CPUs (at most {cap})");
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
        for (p, source) in r.problems.iter().zip(["ebpf", "proc"]) {
            assert!(
                p.contains(&format!("telemetry-{source}.jsonl: {want}")),
                "{p}"
            );
        }
        // Unknown CPU count: no claim.
        set_cpus(0);
        assert!(check(&dir).unwrap().problems.is_empty());
    }

    #[test]
    fn the_tolerance_table_is_the_stated_one() {
        let got: Vec<_> = TOLERANCES
            .iter()
            .map(|t| (t.field, t.relative, t.absolute, t.except))
            .collect();
        let want: Vec<_> = STATED.iter().map(|&(f, r, a, e)| (f, r, a, e)).collect();
        assert_eq!(got, want);
    }

    /// The largest gap `d` above `base` that the stated rule allows: at
    /// most the absolute floor or the relative share of the larger side
    /// (`base + d`), whichever is more.
    fn largest_gap(base: u64, relative: f64, absolute: u64) -> u64 {
        let allows = |d: u64| d <= absolute.max(((base + d) as f64 * relative) as u64);
        let mut d = absolute.max((base as f64 * relative / (1.0 - relative)) as u64);
        while allows(d + 1) {
            d += 1;
        }
        while !allows(d) {
            d -= 1;
        }
        d
    }

    /// Every comparison of the table, at its edges: two sources apart by
    /// exactly the allowance pass, one more fails with a line naming the
    /// field and both totals; both the absolute floor (small totals) and
    /// the relative share (large ones).
    #[test]
    fn each_comparison_passes_at_its_allowance_and_fails_one_past_it() {
        for &(field, relative, absolute, _) in STATED {
            for base in [1_000u64, 10_000_000_000] {
                let allowed = largest_gap(base, relative, absolute);
                let hi = base + allowed;
                let ok = problems_with(
                    field,
                    &[(SourceKind::Ebpf, hi), (SourceKind::Proc, base)],
                    None,
                );
                assert!(
                    ok.is_empty(),
                    "{field} {hi} vs {base} (allowed {allowed}): {ok:?}"
                );
                // One past the allowance, either side above.
                for (e, p) in [(hi + 1, base), (base, hi + 1)] {
                    let bad =
                        problems_with(field, &[(SourceKind::Ebpf, e), (SourceKind::Proc, p)], None);
                    let line = format!("{field}: ebpf {e} vs proc {p}");
                    assert!(
                        bad.len() == 1 && bad[0].starts_with(&line),
                        "{field} {e} vs {p} must fail (allowed about {allowed}): {bad:?}"
                    );
                }
            }
        }
    }

    /// Sources that measure a field in another scope are left out of its
    /// comparison; a source whose field is null everywhere is not compared.
    #[test]
    fn out_of_scope_and_unmeasured_sources_are_not_compared() {
        for &(field, _, _, except) in STATED {
            for &other in except {
                let other = SourceKind::ALL
                    .into_iter()
                    .find(|s| s.name() == other)
                    .unwrap();
                let p = problems_with(field, &[(SourceKind::Ebpf, 1 << 40), (other, 1)], None);
                assert!(p.is_empty(), "{field} vs {}: {p:?}", other.name());
            }
        }
        // blk bytes: QMP is out of scope, but ebpf and proc are still held
        // to each other in the same episode.
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("01TOL");
        fs::create_dir(&dir).unwrap();
        write_sources(
            &dir,
            "blk_read_bytes",
            &[
                (SourceKind::Ebpf, 100 << 20),
                (SourceKind::Proc, 200 << 20),
                (SourceKind::Qmp, 1),
            ],
            None,
        );
        let r = check(&dir).unwrap();
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(
            r.problems[0].starts_with("blk_read_bytes: ebpf"),
            "{:?}",
            r.problems
        );
        // A field one source does not measure (null in every row).
        let mut v = serde_json::to_value(Row {
            episode_id: "01TOL".into(),
            source: SourceKind::Proc,
            available_in_deployment: false,
            t_mono_ns: 1100,
            t_wall_ns: 1105,
            interval_ns: 100,
            seq: 0,
            m: Measures::default(),
        })
        .unwrap();
        v["cpu_ns"] = Value::Null;
        write_sources(
            &dir,
            "cpu_ns",
            &[(SourceKind::Ebpf, 1 << 40), (SourceKind::Proc, 0)],
            None,
        );
        fs::write(dir.join("telemetry-proc.jsonl"), format!("{v}\n")).unwrap();
        let r = check(&dir).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);
    }

    /// perf's task-clock may be above the scheduler's clock by the host's
    /// steal time on top of the allowance, and only above, only for cpu_ns.
    #[test]
    fn the_proc_oracle_may_miss_the_exited_threads_switches_and_no_more() {
        use SourceKind::{Ebpf, Proc};
        let exit = |tid: u64, v: u64, i: u64, m: u64| {
            format!(
                "{{\"t_mono_ns\":1150,\"t_wall_ns\":2,\"seq\":0,\"event\":\"thread_exited\",\"tid\":{tid},\"comm\":\"w\",\"cpu_ns\":5,\"ctx_switches_voluntary\":{v},\"ctx_switches_involuntary\":{i},\"migrations\":{m}}}\n"
            )
        };
        // eBPF 10000 switches, /proc 9000: 1000 below, 500 allowed (5%).
        for (field, exits, ebpf, proc, pass) in [
            // The exited threads did 480 + 30 = 510 more: enough.
            (
                "ctx_switches",
                exit(7, 400, 20, 0) + &exit(8, 80, 10, 0),
                10_000,
                9_000,
                true,
            ),
            // 499: one short.
            (
                "ctx_switches",
                exit(7, 400, 20, 0) + &exit(8, 70, 9, 0),
                10_000,
                9_000,
                false,
            ),
            // /proc above eBPF: thread exits explain nothing.
            (
                "ctx_switches",
                exit(7, 4000, 0, 0),
                9_000,
                10_000 + 600,
                false,
            ),
            // Migrations: 50 allowed (5%), 70 below, the exits' 20 more.
            ("migrations", exit(7, 0, 0, 20), 1_000, 930, true),
            ("migrations", exit(7, 0, 0, 19), 1_000, 930, false),
            // Other fields get no allowance.
            (
                "cpu_ns",
                exit(7, 1 << 40, 0, 1 << 40),
                10_000_000_000,
                9_000_000_000,
                false,
            ),
        ] {
            let base = tempfile::tempdir().unwrap();
            let dir = base.path().join("01EXIT");
            fs::create_dir(&dir).unwrap();
            write_sources(&dir, field, &[(Ebpf, ebpf), (Proc, proc)], None);
            let mut events = fs::read_to_string(dir.join(EVENTS)).unwrap();
            events.push_str(&exits);
            fs::write(dir.join(EVENTS), events).unwrap();
            let r = check(&dir).unwrap();
            assert!(
                r.passed.iter().any(|p| p.contains("lines parse")),
                "{:?}",
                r.problems
            );
            assert_eq!(
                r.problems.is_empty(),
                pass,
                "{field} ebpf {ebpf} proc {proc}: {:?} {:?}",
                r.problems,
                r.passed
            );
            if pass {
                assert!(
                    r.passed
                        .iter()
                        .any(|p| p.contains("the /proc oracle's blind spot: the ")),
                    "{:?}",
                    r.passed
                );
            }
        }
    }

    /// An episode of one field's rows per source, with `meta.json` patched.
    fn check_rows(
        field: &str,
        sources: &[(SourceKind, Vec<Option<u64>>)],
        patch: impl FnOnce(&mut Value),
    ) -> Report {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("01RUN");
        fs::create_dir(&dir).unwrap();
        write_rows(&dir, field, sources, None);
        let mut meta: Value = serde_json::from_slice(&fs::read(dir.join(META)).unwrap()).unwrap();
        patch(&mut meta);
        fs::write(dir.join(META), meta.to_string()).unwrap();
        check(&dir).unwrap()
    }

    #[test]
    fn a_count_moved_to_another_bucket_is_named_though_the_totals_agree() {
        use SourceKind::{Ebpf, Proc};
        let ms = |v: u64| Some(v * 1_000_000);
        // CPU: /proc has 80 ms of bucket 6's in bucket 3; totals equal.
        let ebpf: Vec<_> = (0..10).map(|_| ms(100)).collect();
        let mut proc = ebpf.clone();
        proc[3] = ms(180);
        proc[6] = ms(20);
        let cpu = [(Ebpf, ebpf), (Proc, proc)];
        // The tracer's reads spread over 10 ms at most, plus a tick (10
        // ms), on 2 CPUs: 40 ms of CPU can be counted a bucket early.
        // Allowed at the end of seq 3: 20 ms (the floor) + 40 ms; 80 ms
        // apart.
        let r = check_rows("cpu_ns", &cpu, |m| {
            m["read_spread_max_ns"] = 10_000_000.into();
            m["host"] = serde_json::json!({"cpus": 2});
        });
        assert!(
            r.passed
                .iter()
                .any(|p| p.starts_with("cpu_ns: ebpf 1000000000 vs proc 1000000000 (allowed")),
            "{:?}",
            r.passed
        );
        assert_eq!(
            r.problems,
            [
                "cpu_ns: ebpf 400000000 vs proc 480000000 by the end of seq 3 (running totals, \
              allowed 60000000: the totals' tolerance 20000000 + 40000000 that one source can \
              count before the other at that boundary); 3 of the 9 bucket ends before the last over"
            ]
        );
        // An episode that does not say how far the reads spread: a whole
        // next bucket may have been counted early (100 ms), and that hides it.
        let r = check_rows("cpu_ns", &cpu, |_| {});
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        // Counts: a move of more than a bucket's worth is named (switches:
        // 1000 of buckets 7 to 9 in bucket 2), one of less is not.
        let ebpf: Vec<_> = (0..10).map(|_| Some(400)).collect();
        for (moved, named) in [(1000, true), (300, false)] {
            let mut proc = ebpf.clone();
            proc[2] = Some(400 + moved);
            let mut left = moved;
            for v in proc[7..].iter_mut().rev() {
                let take = left.min(400);
                *v = Some(400 - take);
                left -= take;
            }
            let r = check_rows(
                "ctx_switches",
                &[(Ebpf, ebpf.clone()), (Proc, proc)],
                |_| {},
            );
            let expected: &[&str] = if named {
                &[
                    "ctx_switches: ebpf 3200 vs proc 4000 by the end of seq 7 (running totals, \
                   allowed 400: the totals' tolerance 200 + 200 that one source can count \
                   before the other at that boundary); 7 of the 9 bucket ends before the last over",
                ]
            } else {
                &[]
            };
            assert_eq!(r.problems, expected, "moved {moved}");
        }
    }

    #[test]
    fn qmp_block_bytes_are_held_to_the_hosts_for_raw_images_opened_with_o_direct() {
        use SourceKind::{Ebpf, Qmp};
        let direct = serde_json::json!([{"name": "virtio0", "driver": "raw", "direct": true}]);
        let qcow2 = serde_json::json!([{"name": "virtio0", "driver": "qcow2", "direct": true},
            {"name": "virtio1", "driver": "raw", "direct": true}]);
        const MIB: u64 = 1 << 20;
        for (field, disks, ebpf, qmp, pass) in [
            // The host wrote what the guest asked, 4 KiB more.
            (
                "blk_write_bytes",
                Some(&direct),
                40 * MIB + 4096,
                40 * MIB,
                true,
            ),
            // QMP's writes zeroed: the host wrote 4 MiB the guest never asked for.
            ("blk_write_bytes", Some(&direct), 4 * MIB, 0, false),
            // The host wrote less (write-zeroes served without data): allowed.
            ("blk_write_bytes", Some(&direct), 20 * MIB, 40 * MIB, true),
            // Reads: the host also reads QEMU's own files ...
            ("blk_read_bytes", Some(&direct), 50 * MIB, 40 * MIB, true),
            // ... but never less than the guest read.
            ("blk_read_bytes", Some(&direct), 30 * MIB, 40 * MIB, false),
            // Not a raw image opened with O_DIRECT, or not known: not held.
            ("blk_write_bytes", Some(&qcow2), 4 * MIB, 0, true),
            ("blk_write_bytes", None, 4 * MIB, 0, true),
        ] {
            let base = tempfile::tempdir().unwrap();
            let dir = base.path().join("01QMP");
            fs::create_dir(&dir).unwrap();
            write_sources(&dir, field, &[(Ebpf, ebpf), (Qmp, qmp)], None);
            let mut meta: Value =
                serde_json::from_slice(&fs::read(dir.join(META)).unwrap()).unwrap();
            if let Some(d) = disks {
                meta["qmp"] = serde_json::json!({"disks": d});
            }
            fs::write(dir.join(META), meta.to_string()).unwrap();
            let r = check(&dir).unwrap();
            assert_eq!(
                r.problems.is_empty(),
                pass,
                "{field} ebpf {ebpf} qmp {qmp} {disks:?}: {:?} {:?}",
                r.problems,
                r.passed
            );
            let said = r
                .passed
                .iter()
                .chain(&r.problems)
                .find(|l| l.contains(" vs qmp ") || l.contains("qmp not held"));
            let said = said.map(String::as_str).unwrap_or("");
            match disks {
                Some(d) if d == &direct => assert!(
                    said.starts_with(&format!("{field}: ebpf {ebpf} vs qmp {qmp} over 1 buckets")),
                    "{said}"
                ),
                Some(_) => assert!(
                    said.contains("not held to ebpf (not a raw image opened with O_DIRECT: \"virtio0\" (\"qcow2\""),
                    "{said}"
                ),
                None => assert!(said.contains("the guest's disks are not known"), "{said}"),
            }
        }
    }

    #[test]
    fn perf_cpu_above_gets_the_steal_time_and_nothing_else_does() {
        let (base, steal) = (10_000_000_000u64, 300_000_000u64);
        // perf above: allowance + steal passes ...
        let allows = |d: u64| d <= 20_000_000u64.max(((base + d) as f64 * 0.02) as u64) + steal;
        let mut d = 0;
        while allows(d + 1_000) {
            d += 1_000;
        }
        while allows(d + 1) {
            d += 1;
        }
        let hi = base + d;
        let p = problems_with(
            "cpu_ns",
            &[(SourceKind::Ebpf, base), (SourceKind::Perf, hi)],
            Some(steal),
        );
        assert!(p.is_empty(), "{p:?}");
        // ... one more fails.
        let p = problems_with(
            "cpu_ns",
            &[(SourceKind::Ebpf, base), (SourceKind::Perf, hi + 1)],
            Some(steal),
        );
        assert_eq!(p.len(), 1, "{p:?}");
        // perf below by the same: no steal allowance.
        let lo = base - (hi - base);
        let p = problems_with(
            "cpu_ns",
            &[(SourceKind::Ebpf, base), (SourceKind::Perf, lo)],
            Some(steal),
        );
        assert_eq!(p.len(), 1, "{p:?}");
        // Between two scheduler-clock sources: no steal allowance either.
        let p = problems_with(
            "cpu_ns",
            &[(SourceKind::Ebpf, base), (SourceKind::Proc, hi)],
            Some(steal),
        );
        assert_eq!(p.len(), 1, "{p:?}");
        // Nor for another field: 60 switches above (allowed 53) with a steal of 300 ms.
        let p = problems_with(
            "ctx_switches",
            &[(SourceKind::Ebpf, 1000), (SourceKind::Perf, 1060)],
            Some(steal),
        );
        assert_eq!(p.len(), 1, "{p:?}");
    }

    /// `run` (what `cis490 check` returns, hence its exit status) is `Ok`
    /// exactly when no check failed, and names the first problem.
    #[test]
    fn run_fails_exactly_when_a_check_fails() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("01RUN");
        fs::create_dir(&dir).unwrap();
        write_sources(
            &dir,
            "cpu_ns",
            &[(SourceKind::Ebpf, 1000), (SourceKind::Proc, 1000)],
            None,
        );
        run(&dir).unwrap();
        write_sources(
            &dir,
            "cpu_ns",
            &[(SourceKind::Ebpf, 1000), (SourceKind::Proc, 1_000_000_000)],
            None,
        );
        let e = run(&dir).unwrap_err().to_string();
        assert!(
            e.contains("1 problem(s); first: cpu_ns: ebpf 1000 vs proc 1000000000"),
            "{e}"
        );
        let _ = fs::remove_file(dir.join(DONE));
        let e = run(&dir).unwrap_err().to_string();
        assert!(
            e.contains("2 problem(s)") && e.contains("incomplete"),
            "{e}"
        );
        let e = run(base.path()).unwrap_err().to_string();
        assert!(e.contains("not an episode directory"), "{e}");
    }

    /// Each tap's bytes and frames, sent and received: eBPF against /proc,
    /// at the allowance and one past it; `sockets` not compared.
    #[test]
    fn tap_counters_are_held_to_the_taps_own() {
        // Each side: (tx bytes, tx frames, rx bytes, rx frames).
        let run = |e: [u64; 4], p: [u64; 4]| {
            let base = tempfile::tempdir().unwrap();
            let dir = base.path().join("01TAP");
            fs::create_dir(&dir).unwrap();
            write_sources(
                &dir,
                "cpu_ns",
                &[(SourceKind::Ebpf, 1), (SourceKind::Proc, 1)],
                None,
            );
            for (source, [tb, tn, rb, rn]) in [(SourceKind::Ebpf, e), (SourceKind::Proc, p)] {
                let f = dir.join(format!("telemetry-{}.jsonl", source.name()));
                let mut v: Value =
                    serde_json::from_str(fs::read_to_string(&f).unwrap().trim()).unwrap();
                let c = serde_json::json!({"tx_bytes": tb, "rx_bytes": rb, "tx_packets": tn, "rx_packets": rn});
                let other = serde_json::json!({"tx_bytes": 7 * tb, "rx_bytes": 1, "tx_packets": 1, "rx_packets": 1});
                v["net_by_if"] = serde_json::json!({"tap0": c, "sockets": other});
                fs::write(&f, format!("{v}\n")).unwrap();
            }
            check(&dir).unwrap().problems
        };
        let quiet = [500, 5];
        let both = |tx: [u64; 2]| [tx[0], tx[1], quiet[0], quiet[1]];
        // 2% of 10 MB, 64 frames: both within.
        assert_eq!(
            run(both([10_000_000, 10_000]), both([9_800_000, 9_936])),
            Vec::<String>::new()
        );
        let p = run(both([10_000_000, 10_000]), both([9_799_999, 10_000]));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("net_by_if.tap0.tx_bytes: ebpf 10000000 vs proc 9799999"),
            "{p:?}"
        );
        let p = run(both([1000, 100]), both([1000, 35]));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("net_by_if.tap0.tx_packets"), "{p:?}");
        // Received, the same rule.
        let rx = |b: u64, n: u64| [1000, 10, b, n];
        assert_eq!(
            run(rx(10_000_000, 10_000), rx(9_800_000, 9_936)),
            Vec::<String>::new()
        );
        let p = run(rx(10_000_000, 10_000), rx(9_799_999, 9_936));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("net_by_if.tap0.rx_bytes: ebpf 10000000 vs proc 9799999"),
            "{p:?}"
        );
        let p = run(rx(1000, 100), rx(1000, 35));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("net_by_if.tap0.rx_packets"), "{p:?}");
    }

    #[test]
    fn tap_frames_moved_to_another_bucket_are_named() {
        use SourceKind::{Ebpf, Proc};
        // 10 buckets of 100 frames read; /proc has 250 of the last three
        // buckets' in bucket 1, the totals equal.
        let ebpf = [100u64; 10];
        let mut proc = ebpf;
        proc[1] = 350;
        proc[7] = 50;
        proc[8] = 0;
        proc[9] = 0;
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("01TAPS");
        fs::create_dir(&dir).unwrap();
        let none = vec![None; 10];
        write_rows(&dir, "cpu_ns", &[(Ebpf, none.clone()), (Proc, none)], None);
        for (source, frames) in [(Ebpf, ebpf), (Proc, proc)] {
            let f = dir.join(format!("telemetry-{}.jsonl", source.name()));
            let text: String = fs::read_to_string(&f)
                .unwrap()
                .lines()
                .zip(frames)
                .map(|(l, n)| {
                    let mut v: Value = serde_json::from_str(l).unwrap();
                    v["net_by_if"] = serde_json::json!({"tap0": {"tx_bytes": 0,
                        "tx_packets": 0, "rx_bytes": 1000 * n, "rx_packets": n}});
                    format!("{v}\n")
                })
                .collect();
            fs::write(&f, text).unwrap();
        }
        let r = check(&dir).unwrap();
        assert!(
            r.passed
                .iter()
                .any(|p| p.starts_with("net_by_if.tap0.rx_packets: ebpf 1000 vs proc 1000 (")),
            "{:?}",
            r.passed
        );
        // Furthest past its allowance at the end of seq 7: 800 vs 1000,
        // allowed 64 frames + the 50 that /proc's bucket 7 and eBPF's
        // bucket 8 could both hold.
        assert!(
            r.problems.iter().any(|p| p.starts_with(
                "net_by_if.tap0.rx_packets: ebpf 800 vs proc 1000 by the end of seq 7 (running \
                 totals, allowed 114: the totals' tolerance 64 + 50 that one source can count \
                 before the other at that boundary); 8 of the 9 bucket ends before the last over"
            )),
            "{:?}",
            r.problems
        );
        assert!(
            r.problems
                .iter()
                .any(|p| p.starts_with("net_by_if.tap0.rx_bytes: ebpf ")),
            "{:?}",
            r.problems
        );
        assert_eq!(r.problems.len(), 2, "{:?}", r.problems);
    }

    #[test]
    fn totals_saturate_instead_of_overflowing() {
        // Rows summing past u64::MAX made `cis490 check` panic ("attempt to add
        // with overflow") in debug builds. Found by reading the code.
        let mut acc = None;
        add_total(&mut acc, Some(u64::MAX));
        add_total(&mut acc, None);
        add_total(&mut acc, Some(1));
        assert_eq!(acc, Some(u64::MAX));
        let mut none = None;
        add_total(&mut none, None);
        assert_eq!(none, None);
    }

    /// Lines of events.jsonl and labels.jsonl are held to their schemas: a
    /// line that is JSON but not an event or a label is named.
    #[test]
    fn event_and_label_lines_that_break_their_schema_are_named() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("01TEST");
        fs::create_dir(&dir).unwrap();
        let good = [row("01TEST", 0, 1100, 100), row("01TEST", 1, 1200, 100)];
        write_episode(&dir, &good, true);
        assert!(check(&dir).unwrap().problems.is_empty());
        let events = fs::read_to_string(dir.join(EVENTS)).unwrap();
        fs::write(dir.join(EVENTS), format!("{events}{{\"junk\":1}}\n")).unwrap();
        fs::write(
            dir.join(LABELS),
            "{\"t_mono_ns\":1150,\"t_wall_ns\":1,\"seq\":0,\"label\":\"boot\",\"via\":\"cli\"}\n\
             {\"t_mono_ns\":-1,\"t_wall_ns\":1,\"seq\":0,\"label\":\"x\",\"via\":\"cli\"}\n",
        )
        .unwrap();
        let r = check(&dir).unwrap();
        let all = r.problems.join("; ");
        assert!(all.contains("events.jsonl:2: not a valid line"), "{all}");
        assert!(all.contains("labels.jsonl:2: not a valid line"), "{all}");
        assert!(!all.contains("labels.jsonl:1"), "{all}");
    }

    #[test]
    fn a_good_episode_passes_and_each_defect_is_named() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("01TEST");
        fs::create_dir(&dir).unwrap();
        let good = [row("01TEST", 0, 1100, 100), row("01TEST", 1, 1200, 100)];
        write_episode(&dir, &good, true);
        let r = check(&dir).unwrap();
        assert!(r.problems.is_empty(), "{:?}", r.problems);

        let cases: Vec<(Vec<Value>, bool, &str)> = vec![
            (good.to_vec(), false, "no done.marker"),
            (
                vec![good[0].clone(), row("01TEST", 2, 1200, 100)],
                true,
                "gap",
            ),
            (
                vec![good[0].clone(), row("01TEST", 1, 1100, 0)],
                true,
                "strictly increasing",
            ),
            (
                vec![good[0].clone(), row("01TEST", 1, 1250, 100)],
                true,
                "interval_ns",
            ),
            (
                vec![good[0].clone(), {
                    let mut v = good[1].clone();
                    v.as_object_mut().unwrap().remove("wakeups");
                    v
                }],
                true,
                "missing",
            ),
            (
                vec![good[0].clone(), {
                    let mut v = good[1].clone();
                    v["cpu_ns"] = "lots".into();
                    v
                }],
                true,
                "wrong type",
            ),
        ];
        // A guest agent source that never connected fails the episode.
        write_episode(&dir, &good, true);
        let mut meta: Value = serde_json::from_slice(&fs::read(dir.join(META)).unwrap()).unwrap();
        let info = crate::sources::guest::GuestInfo {
            socket: "/run/ga.sock".into(),
            agent_interval_ms: 100,
            line_cap_bytes: 65536,
            flood_cap_lines_per_bucket: 32,
            lines: 0,
            lines_rejected_as_deltas: 0,
            reader: Default::default(),
            error: Some("cannot connect to /run/ga.sock: No such file or directory".into()),
        };
        meta["guest_agent"] = serde_json::to_value(&info).unwrap();
        fs::write(dir.join(META), meta.to_string()).unwrap();
        let r = check(&dir).unwrap();
        assert!(
            r.problems
                .iter()
                .any(|p| p.contains("guest agent source was asked for but never connected")),
            "{:?}",
            r.problems
        );
        meta["guest_agent"]["error"] = Value::Null;
        fs::write(dir.join(META), meta.to_string()).unwrap();
        assert!(check(&dir).unwrap().problems.is_empty());

        for (rows, done, expect) in cases {
            let _ = fs::remove_file(dir.join(DONE));
            write_episode(&dir, &rows, done);
            let r = check(&dir).unwrap();
            assert!(
                r.problems.iter().any(|p| p.contains(expect)),
                "expected '{expect}' in {:?}",
                r.problems
            );
        }
    }
}
