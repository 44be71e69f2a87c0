//! The connection to QEMU's chardev socket, on its own thread: connects
//! (retrying while QEMU starts, and again after every hang-up), tells the
//! agent its interval, splits what arrives into lines (capped), skips lines
//! past the flood cap, parses and validates the rest and queues them with
//! the host's clock pair. The event loop takes the queue at every boundary.
//! A peer that floods, stalls or hangs up costs this thread, never the loop.

use std::{
    collections::VecDeque,
    io::{ErrorKind, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use cis490_agent::protocol::{AgentLine, HostLine, MAX_LINE_BYTES};
use serde::Serialize;

use super::lines::{Piece, Splitter};
pub use super::validate::{BadReason, parse};
use crate::clock::ClockPair;

/// At most this many lines (good or bad) are read per bucket; the rest are
/// skipped unread and counted.
pub const FLOOD_CAP: u32 = 32;
/// At most this many bad lines per bucket are described in events.jsonl;
/// all are counted.
pub const BAD_EVENTS_CAP: usize = 8;
/// At most this many connection events per bucket (a peer that connects
/// and hangs up in a loop).
const CONN_EVENTS_CAP: usize = 8;
/// The longest error text kept of a bad line.
const DETAIL_CAP: usize = 200;
/// How often a missing socket is tried again, and how long a read waits
/// before the thread checks whether tracing ended.
const RETRY: Duration = Duration::from_millis(100);

/// A bad line, as events.jsonl describes it.
#[derive(Clone, Debug, Serialize)]
pub struct BadLine {
    #[serde(skip)]
    pub at: ClockPair,
    pub reason: BadReason,
    pub bytes: u64,
    pub detail: String,
}

/// A connection change.
#[derive(Clone, Debug)]
pub struct ConnEvent {
    pub at: ClockPair,
    pub connected: bool,
    pub why: Option<String>,
}

/// A parsed, valid line, its length and when it arrived.
pub struct Arrived {
    pub at: ClockPair,
    pub line: AgentLine,
    pub bytes: u64,
}

/// Totals over the whole trace, for meta.json.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct ReaderTotals {
    pub connections: u64,
    pub bytes: u64,
    /// Lines that parsed and validated (the event loop may still reject a
    /// few: counters going back, absurd deltas).
    pub lines_parsed: u64,
    pub bad_lines: u64,
    pub skipped_lines: u64,
    /// The largest line held, bytes (at most the cap).
    pub longest_line_held: u64,
    pub last_error: Option<String>,
}

/// What the thread hands to the event loop.
#[derive(Default)]
pub struct Shared {
    pub arrived: VecDeque<Arrived>,
    /// Lines read (or skipped) since the last take: the flood cap's count.
    pub lines_this_bucket: u32,
    pub bad: u64,
    pub skipped: u64,
    pub bad_events: Vec<BadLine>,
    pub bad_unlisted: u64,
    pub conn_events: Vec<ConnEvent>,
    pub conn_unlisted: u64,
    pub totals: ReaderTotals,
}

impl Shared {
    pub fn bad_line(&mut self, at: ClockPair, reason: BadReason, bytes: u64, detail: String) {
        self.bad += 1;
        self.totals.bad_lines += 1;
        if self.bad_events.len() < BAD_EVENTS_CAP {
            let detail = detail.chars().take(DETAIL_CAP).collect();
            self.bad_events.push(BadLine {
                at,
                reason,
                bytes,
                detail,
            });
        } else {
            self.bad_unlisted += 1;
        }
    }

    fn conn(&mut self, connected: bool, why: Option<String>) {
        if connected {
            self.totals.connections += 1;
        }
        if self.conn_events.len() < CONN_EVENTS_CAP {
            self.conn_events.push(ConnEvent {
                at: ClockPair::now(),
                connected,
                why,
            });
        } else {
            self.conn_unlisted += 1;
        }
    }
}

/// The thread's handle.
pub struct Reader {
    pub shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    /// Starts the thread; `interval_ms` is what the agent is asked for.
    pub fn start(socket: PathBuf, interval_ms: u64) -> std::io::Result<Self> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (shared.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("guest-agent".into())
            .spawn(move || run(&socket, interval_ms, &s, &st))?;
        Ok(Self {
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread (it notices within [`RETRY`]).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    // A panic elsewhere while holding it leaves counts that are still counts.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(socket: &std::path::Path, interval_ms: u64, shared: &Mutex<Shared>, stop: &AtomicBool) {
    let mut said = false;
    let mut hello = serde_json::to_vec(&HostLine { interval_ms }).unwrap_or_default();
    hello.push(b'\n');
    while !stop.load(Ordering::Relaxed) {
        let stream = match UnixStream::connect(socket) {
            Ok(s) => s,
            Err(e) => {
                let e = format!("cannot connect to {}: {e}", socket.display());
                // Said at once (a mistyped path should not cost a silent
                // trace), once: after a hang-up (QEMU exiting) it is normal.
                if !said {
                    log::warn!("guest agent: {e}; retrying every {} ms", RETRY.as_millis());
                    said = true;
                }
                lock(shared).totals.last_error = Some(e);
                std::thread::sleep(RETRY);
                continue;
            }
        };
        said = true;
        lock(shared).conn(true, None);
        log::info!("guest agent: connected to {}", socket.display());
        let why = serve(stream, &hello, shared, stop);
        if let Some(why) = why {
            log::info!("guest agent: {why}; reconnecting");
            let mut s = lock(shared);
            s.totals.last_error = Some(why.clone());
            s.conn(false, Some(why));
            drop(s);
            std::thread::sleep(RETRY);
        }
    }
}

/// Reads one connection until it ends (the reason) or tracing stops (None).
fn serve(
    mut stream: UnixStream,
    hello: &[u8],
    shared: &Mutex<Shared>,
    stop: &AtomicBool,
) -> Option<String> {
    let _ = stream.set_read_timeout(Some(RETRY));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    // QEMU holds it until the guest opens its port; a peer that never reads
    // costs at most the write timeout, once.
    if let Err(e) = stream.write_all(hello) {
        log::debug!("guest agent: cannot send the interval: {e}");
    }
    let mut splitter = Splitter::new(MAX_LINE_BYTES);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let n = match stream.read(&mut buf) {
            Ok(0) => {
                if let Some(n) = splitter.take_partial() {
                    lock(shared).bad_line(
                        ClockPair::now(),
                        BadReason::Cut,
                        n,
                        "the peer hung up before the newline".into(),
                    );
                }
                return Some("the peer hung up".into());
            }
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Some(format!("read error: {e}")),
        };
        lock(shared).totals.bytes += n as u64;
        splitter.feed(&buf[..n], |piece| take_piece(piece, shared));
        let held = splitter.held() as u64;
        let mut s = lock(shared);
        s.totals.longest_line_held = s.totals.longest_line_held.max(held);
    }
}

/// Counts, skips, or parses and queues one line.
fn take_piece(piece: Piece<'_>, shared: &Mutex<Shared>) {
    // The cap first, before any parsing: a flood costs a count.
    {
        let mut s = lock(shared);
        if s.lines_this_bucket >= FLOOD_CAP || s.arrived.len() >= 2 * FLOOD_CAP as usize {
            s.skipped += 1;
            s.totals.skipped_lines += 1;
            return;
        }
        s.lines_this_bucket += 1;
    }
    let parsed = match piece {
        Piece::TooLong(n) => Err((
            BadReason::TooLong,
            n,
            format!("a line of {n} bytes (at most {MAX_LINE_BYTES})"),
        )),
        Piece::Line(l) => parse(l)
            .map(|line| (line, l.len() as u64))
            .map_err(|(r, d)| (r, l.len() as u64, d)),
    };
    let mut s = lock(shared);
    // Stamped under the lock: a line the event loop has not taken at a
    // boundary carries a later stamp than that boundary.
    let at = ClockPair::now();
    match parsed {
        Ok((line, bytes)) => {
            s.totals.lines_parsed += 1;
            s.arrived.push_back(Arrived { at, line, bytes });
        }
        Err((reason, bytes, detail)) => s.bad_line(at, reason, bytes, detail),
    }
}
