//! One function per fuzz target. Each feeds the input to the code the way
//! the tracer does and asserts what must hold for every input.

use std::collections::BTreeMap;

use cis490_common::{
    COMM_LEN, DecodeError, LifecycleKind, LifecycleRecord, RecordKind, ThreadTotals,
    kvm::{self, ISA_SVM, ISA_VMX, KVM_REASON_SLOTS, OTHER_SLOT, USERSPACE_SLOTS},
    log2_bucket,
    record::record_kind,
};

use crate::{
    proc_source::{self as proc, io_bytes, net_dev},
    qmp_source::{
        self,
        client::{self as qmp, LineBuf, MAX_LINE, Message},
    },
    row::{BlkCounters, Measures},
    taps,
};

// ---- record ----------------------------------------------------------------

const RECORD_LEN: usize = size_of::<LifecycleRecord>();

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

/// `r` encoded field by field, little-endian (what the decoder expects).
fn encode(r: &LifecycleRecord) -> [u8; RECORD_LEN] {
    let mut out = [0u8; RECORD_LEN];
    out[0..4].copy_from_slice(&r.kind.to_le_bytes());
    out[4..8].copy_from_slice(&r.what.to_le_bytes());
    out[8..16].copy_from_slice(&r.ts_ns.to_le_bytes());
    out[16..20].copy_from_slice(&r.tid.to_le_bytes());
    out[20..24].copy_from_slice(&r.aux.to_le_bytes());
    out[24..24 + COMM_LEN].copy_from_slice(&r.comm);
    out[24 + COMM_LEN..28 + COMM_LEN].copy_from_slice(&r.slot.to_le_bytes());
    out[28 + COMM_LEN..32 + COMM_LEN].copy_from_slice(&r.reserved.to_le_bytes());
    let t = &r.totals;
    for (i, v) in [t.cpu_ns, t.voluntary, t.involuntary, t.migrations]
        .into_iter()
        .enumerate()
    {
        let at = 32 + COMM_LEN + 8 * i;
        out[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// `r` as the eBPF side writes it: its in-memory layout.
fn memory_bytes(r: &LifecycleRecord) -> [u8; RECORD_LEN] {
    let mut out = [0u8; RECORD_LEN];
    // SAFETY: LifecycleRecord is #[repr(C)] without padding (asserted in
    // cis490-common), so all RECORD_LEN bytes are initialised.
    unsafe {
        core::ptr::copy_nonoverlapping(
            (r as *const LifecycleRecord).cast::<u8>(),
            out.as_mut_ptr(),
            RECORD_LEN,
        );
    }
    out
}

/// A ring-buffer record, decoded as `RecordStream::drain` does; then the
/// shared helpers of cis490-common on the same bytes.
///
/// Properties: a decoded record re-encodes to exactly the bytes it was
/// decoded from (both field by field and as the in-memory layout the eBPF
/// side writes); every error names what is wrong with the input;
/// `decode(encode(x)) == x` for a valid record made from the input; the
/// histogram bucket of a value bounds it; KVM reason slots are in range and
/// map back to their code (a VMX one to its basic reason).
pub fn record(data: &[u8]) {
    let decoded = record_kind(data).and_then(|k| match k {
        RecordKind::Lifecycle => LifecycleRecord::try_from(data),
    });
    match decoded {
        Ok(r) => {
            assert!(data.len() >= RECORD_LEN);
            assert_eq!(encode(&r), data[..RECORD_LEN]);
            assert_eq!(memory_bytes(&r), data[..RECORD_LEN]);
            assert!(r.lifecycle().is_ok());
            let comm = r.comm_bytes();
            assert!(!comm.contains(&0) && r.comm.starts_with(comm));
            // What the tracer writes into events.jsonl (event.rs).
            let _ = String::from_utf8_lossy(comm);
        }
        Err(DecodeError::Short { need, got }) => {
            assert_eq!(got, data.len());
            assert!(got < need && need <= RECORD_LEN);
        }
        Err(DecodeError::UnknownKind(k)) => assert_eq!(k, le32(data)),
        Err(DecodeError::UnknownLifecycle(w)) => {
            assert_eq!(le32(data), RecordKind::Lifecycle as u32);
            assert_eq!(w, le32(&data[4..]));
        }
    }
    if let Err(e) = decoded {
        let _ = e.to_string();
    }

    // decode(encode(x)) == x, for a valid record built from the input.
    let mut b = [0u8; RECORD_LEN];
    let n = data.len().min(RECORD_LEN);
    b[..n].copy_from_slice(&data[..n]);
    let x = LifecycleRecord {
        kind: RecordKind::Lifecycle as u32,
        what: [
            LifecycleKind::ThreadStart,
            LifecycleKind::ThreadExit,
            LifecycleKind::Exec,
            LifecycleKind::Rename,
        ][usize::from(b[4] % 4)] as u32,
        ts_ns: u64::from_le_bytes(b[8..16].try_into().unwrap()),
        tid: le32(&b[16..]),
        aux: le32(&b[20..]),
        comm: b[24..24 + COMM_LEN].try_into().unwrap(),
        slot: le32(&b[24 + COMM_LEN..]),
        reserved: le32(&b[28 + COMM_LEN..]),
        totals: ThreadTotals {
            cpu_ns: le64(&b[32 + COMM_LEN..]),
            voluntary: le64(&b[40 + COMM_LEN..]),
            involuntary: le64(&b[48 + COMM_LEN..]),
            migrations: le64(&b[56 + COMM_LEN..]),
        },
    };
    let bytes = encode(&x);
    assert_eq!(memory_bytes(&x), bytes);
    assert_eq!(LifecycleRecord::try_from(&bytes[..]), Ok(x));
    assert_eq!(record_kind(&bytes), Ok(RecordKind::Lifecycle));

    for c in data.chunks_exact(8) {
        let v = u64::from_le_bytes(c.try_into().unwrap());
        let i = log2_bucket(v);
        assert!(i < 64);
        assert!(v >> i <= 1, "{v} above bucket {i}");
        assert!(i == 0 || v >> i == 1, "{v} below bucket {i}");
    }
    for c in data.chunks_exact(4) {
        let code = le32(c);
        for isa in [ISA_VMX, ISA_SVM, code] {
            let slot = kvm::reason_slot(code, isa);
            assert!(slot < KVM_REASON_SLOTS);
            if slot != OTHER_SLOT {
                // A VMX exit is counted by its basic reason (the low 16
                // bits), whatever its flag bits.
                let (isa, basic) = if isa == ISA_SVM {
                    (ISA_SVM, code)
                } else {
                    (ISA_VMX, code & 0xffff)
                };
                assert_eq!(kvm::slot_reason(slot, isa), Some(basic));
            }
        }
        assert!(kvm::userspace_slot(code, code as i32) < USERSPACE_SLOTS);
    }
}

// ---- proc ------------------------------------------------------------------

/// The input as the text of a /proc file, given to every /proc parser (as
/// `Reader::read_with` does: lossy UTF-8), and what the proc source computes
/// from their results.
///
/// Properties: a parsed stat line's comm is what lies between the first `(`
/// and the last `)`, and a stat line written from the parsed fields parses
/// back to them; a parsed schedstat is exactly three numbers; an fdinfo
/// interface name is trimmed and not empty; every row built from parsed
/// values serializes and reads back equal.
pub fn proc_files(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let s: &str = &text;
    let mut m = Measures::default();

    if let Ok(st) = proc::parse_stat(s) {
        let open = s.find('(').unwrap();
        let close = s.rfind(')').unwrap();
        assert_eq!(st.comm, &s[open + 1..close]);
        assert_eq!(Ok(st.pid), s[..open].trim().parse::<i32>());
        let line = format!(
            "{} ({}) {} 1 1 1 0 -1 4194560 {} {} {} {} {} {} {} {} 20 0 {} 0 {} 123 456\n",
            st.pid,
            st.comm,
            st.state,
            st.minflt,
            st.cminflt,
            st.majflt,
            st.cmajflt,
            st.utime,
            st.stime,
            st.cutime,
            st.cstime,
            st.num_threads,
            st.start_time
        );
        assert_eq!(proc::parse_stat(&line).ok(), Some(st), "{line:?}");
        for clk in [0, 1, 100, u64::MAX] {
            let _ = proc::ticks_to_ns(st.utime.saturating_add(st.stime), clk);
        }
        m.cpu_ns = Some(proc::ticks_to_ns(st.utime, 100));
        m.threads = Some(st.num_threads);
        m.page_faults_minor = Some(st.minflt);
        m.page_faults_major = Some(st.majflt);
    }
    if let Ok(c) = proc::parse_status_ctxt(s) {
        m.ctx_switches_voluntary = Some(c.voluntary);
        m.ctx_switches_involuntary = Some(c.involuntary);
        m.set_ctx_total();
    }
    if let Ok(st) = proc::parse_schedstat(s) {
        let f: Vec<&str> = s.split_ascii_whitespace().collect();
        assert_eq!(f.len(), 3);
        // Each field is trimmed (Unicode whitespace, e.g. \x0b, which
        // split_ascii_whitespace keeps) before it is parsed.
        assert_eq!(f[1].trim().parse::<u64>().ok(), Some(st.run_delay_ns));
        m.runq_delay_ns = Some(st.run_delay_ns);
    }
    if let Ok(n) = proc::parse_sched_migrations(s) {
        m.migrations = Some(n);
    }
    if let Ok(io) = io_bytes::parse_io(s) {
        m.blk_read_bytes = Some(io.read_bytes);
        m.blk_write_bytes = Some(io.write_bytes);
    }
    let taps = net_dev::parse_net_dev(s);
    if !taps.is_empty() {
        m.set_net(Some(taps));
    }
    if let Some(name) = taps::parse_fdinfo_iff(s) {
        assert!(!name.is_empty() && name == name.trim() && !name.contains('\n'));
    }
    let json = serde_json::to_string(&m).unwrap();
    assert_eq!(serde_json::from_str::<Measures>(&json).unwrap(), m);
}

// ---- qmp -------------------------------------------------------------------

/// The line limits the stream is split with: a small one, so that the
/// fuzzer reaches the over-long-line paths, and one that real replies (a
/// `query-blockstats` of one disk is 2 KiB) fit in.
const SMALL_MAX_LINE: usize = 64;
const FUZZ_MAX_LINE: usize = 16 * 1024;

/// The input as one QMP line, and as a byte stream from QEMU split into
/// lines as the client does (in one read and in small reads), each decoded,
/// and the replies interpreted as the QMP source does (blockstats, vCPU
/// stats, rows).
///
/// Properties: an error message stays short (it quotes an excerpt, not the
/// line); a message parses the same with a line terminator; the lines (and
/// the number of over-long-line errors) do not depend on how the stream is
/// cut into reads, and no line exceeds the limit; a disk's delta against
/// itself is zero and against nothing is itself.
pub fn qmp_stream(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match qmp::parse_message(&text) {
        Ok(m) => {
            if text.len() < MAX_LINE {
                assert_eq!(qmp::parse_message(&format!("{text}\r\n")).as_ref(), Ok(&m));
            }
        }
        Err(e) => assert!(
            e.message().len() < 4096,
            "error message of {} bytes",
            e.message().len()
        ),
    }

    let chunk = 1 + data.len() % 17;
    let mut lines = Vec::new();
    for max in [SMALL_MAX_LINE, FUZZ_MAX_LINE] {
        let whole = split_lines(data, data.len().max(1), max);
        assert_eq!(split_lines(data, chunk, max), whole);
        assert_eq!(split_lines(data, 1, max), whole);
        lines = whole.0;
    }

    let mut blk_prev: Option<BTreeMap<String, BlkCounters>> = None;
    for line in lines {
        let Some(Ok(msg)) = qmp::decode_line(Ok(line)) else {
            continue;
        };
        let _ = msg.describe();
        match &msg {
            Message::Greeting { version, .. } => {
                let _ = version.to_string();
                let _ = version.at_least(7, 1);
            }
            Message::Return { value, .. } => {
                if let Ok(cur) = qmp_source::parse_blockstats(value) {
                    let zero = qmp_source::blk_delta(&cur, &cur);
                    assert!(zero.values().all(|c| *c == BlkCounters::default()));
                    assert_eq!(qmp_source::blk_delta(&BTreeMap::new(), &cur), cur);
                    if let Some(prev) = &blk_prev {
                        let mut m = Measures::default();
                        m.set_blk_by_dev(Some(qmp_source::blk_delta(prev, &cur)));
                        let _ = serde_json::to_string(&m).unwrap();
                    }
                    blk_prev = Some(cur);
                }
                let _ = qmp_source::sum_kvm_exits(value);
                // `query-block`: every disk it lists had a medium and a name.
                if let Ok(disks) = qmp_source::parse_block(value) {
                    assert!(disks.iter().all(|d| !d.name.is_empty()));
                    let _ = serde_json::to_string(&disks).unwrap();
                }
            }
            Message::Event(e) => {
                let _ = e.t_wall_ns();
                let _ = serde_json::to_string(e).unwrap();
            }
            Message::Error { .. } => {}
        }
    }
}

/// The complete lines of `data` read `chunk` bytes at a time by a line
/// buffer of limit `max`, and the number of over-long-line errors.
fn split_lines(data: &[u8], chunk: usize, max: usize) -> (Vec<Vec<u8>>, usize) {
    let mut buf = LineBuf::new(max);
    let (mut lines, mut errors) = (Vec::new(), 0);
    for c in data.chunks(chunk) {
        buf.push(c);
        while let Some(line) = buf.next_line() {
            match line {
                Ok(l) => {
                    assert!(l.len() <= max && !l.contains(&b'\n'));
                    lines.push(l);
                }
                Err(_) => errors += 1,
            }
        }
    }
    (lines, errors)
}

// ---- guest -----------------------------------------------------------------

/// The guest source's splitter at a small cap (so the fuzzer reaches it).
const GUEST_SMALL_CAP: usize = 64;

/// What the splitter made of a stream: lines, over-long lengths, and the
/// bytes of the unfinished line at the end.
type Split = (Vec<Vec<u8>>, Vec<u64>, Option<u64>);

fn guest_split(data: &[u8], chunk: usize, cap: usize) -> Split {
    use crate::guest_lines::{Piece, Splitter};
    let mut s = Splitter::new(cap);
    let (mut lines, mut long) = (Vec::new(), Vec::new());
    for c in data.chunks(chunk) {
        s.feed(c, |p| match p {
            Piece::Line(l) => {
                assert!(l.len() <= cap && !l.contains(&b'\n'));
                lines.push(l.to_vec());
            }
            Piece::TooLong(n) => {
                assert!(n as usize > cap);
                long.push(n);
            }
        });
        assert!(s.held() <= cap, "the splitter holds {} bytes", s.held());
    }
    (lines, long, s.take_partial())
}

/// Bytes from a guest agent's port, as the guest source reads them. The
/// pieces (lines, over-long lines with their lengths, the unfinished tail)
/// do not depend on how the stream is cut into reads, never exceed the cap
/// held, and account for every byte; every line either parses into an
/// agent line within the protocol's bounds, which serializes and parses
/// back equal, or is rejected with a reason and a bounded message.
pub fn guest_stream(data: &[u8]) {
    use cis490_agent::protocol::MAX_LINE_BYTES;

    use crate::guest_validate::{BadReason, parse};
    let chunk = 1 + data.len() % 17;
    let mut lines = Vec::new();
    for cap in [GUEST_SMALL_CAP, MAX_LINE_BYTES] {
        let whole = guest_split(data, data.len().max(1), cap);
        assert_eq!(guest_split(data, chunk, cap), whole);
        assert_eq!(guest_split(data, 1, cap), whole);
        let (l, long, partial) = &whole;
        let newlines = data.iter().filter(|b| **b == b'\n').count();
        assert_eq!(l.len() + long.len(), newlines);
        let bytes: u64 = l.iter().map(|x| x.len() as u64).sum::<u64>()
            + long.iter().sum::<u64>()
            + partial.unwrap_or(0)
            + newlines as u64;
        assert_eq!(bytes, data.len() as u64, "every byte accounted for");
        lines = whole.0;
    }
    for line in lines {
        match parse(&line) {
            Ok(l) => {
                assert!(l.validate().is_ok());
                let text = serde_json::to_vec(&l).unwrap();
                assert_eq!(parse(&text).ok().as_ref(), Some(&l));
            }
            Err((reason, msg)) => {
                assert!(matches!(
                    reason,
                    BadReason::NotJson | BadReason::WrongShape | BadReason::Invalid
                ));
                assert!(msg.len() < 4096, "a message of {} bytes", msg.len());
            }
        }
    }
}
