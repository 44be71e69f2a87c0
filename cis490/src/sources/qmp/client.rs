//! A small QEMU Machine Protocol (QMP) client over QEMU's unix socket
//! (`-qmp unix:PATH,server=on,wait=off`).
//!
//! QMP is line-oriented JSON: QEMU greets (`{"QMP": {...}}`), the client
//! sends `qmp_capabilities`, then each `{"execute": ..., "id": N}` gets one
//! `{"return": ...}` or `{"error": ...}` carrying the same `id`, with
//! asynchronous `{"event": ...}` lines interleaved anywhere.
//!
//! - [`parse_message`] is pure and never panics (it is what the fuzz target
//!   drives).
//! - [`QmpClient`] bounds every wait with a deadline (a silent peer is a
//!   [`QmpError::Timeout`], never a hang), bounds the line length it buffers
//!   ([`MAX_LINE`]), queues the events that arrive while it waits for a reply
//!   (bounded by [`MAX_QUEUED_EVENTS`]), and matches replies by `id`, so a
//!   late reply to a command that timed out is recognised and skipped.
//! - All its state lives in the client, not in the futures: a call dropped
//!   at an `.await` (a timeout) leaves it consistent and usable.
//!
//! It needs only tokio's `net` and `time` features (no `io-util`): reads and
//! writes are non-blocking `recv`/`send` on the socket, waiting for
//! readiness through tokio. Writes use `MSG_NOSIGNAL`, so a peer that has
//! exited is an `EPIPE` error (reported as [`QmpError::Closed`]), never a
//! `SIGPIPE`.

use std::{
    collections::VecDeque,
    fmt, io,
    os::fd::{AsRawFd as _, RawFd},
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::{
    io::Interest,
    net::UnixStream,
    time::{Instant, timeout_at},
};

/// The longest line the client buffers (1 MiB). A longer line is reported
/// as a [`ParseError`] and skipped up to its newline, without buffering it.
pub const MAX_LINE: usize = 1 << 20;

/// Events queued beyond this are dropped, oldest first (and counted in
/// [`QmpClient::dropped_events`]).
pub const MAX_QUEUED_EVENTS: usize = 4096;

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

/// How much of an offending line a [`ParseError`] quotes.
const EXCERPT_CHARS: usize = 120;

// ---- Messages ----------------------------------------------------------

/// QEMU's version, from the greeting.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVersion {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
    /// The distribution's package string (`Debian 1:7.2+dfsg-7+deb12u18`),
    /// empty if QEMU gave none.
    pub package: String,
}

impl QemuVersion {
    /// True if this version is at least `major.minor`.
    pub fn at_least(&self, major: u64, minor: u64) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl fmt::Display for QemuVersion {
    /// `7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)`, or `7.2.22` without a package.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package)?;
        }
        Ok(())
    }
}

/// An asynchronous QMP event (`STOP`, `RESUME`, `SHUTDOWN`, `RESET`,
/// `BLOCK_IO_ERROR`, ...).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    /// The event name.
    pub event: String,
    /// The event's `data` member; `null` when QEMU sent none.
    pub data: Value,
    /// QEMU's wall-clock timestamp: seconds since the Unix epoch...
    pub timestamp_s: i64,
    /// ...and microseconds within that second.
    pub timestamp_us: i64,
}

impl QmpEvent {
    /// QEMU's timestamp as ns since the Unix epoch (`None` if negative or
    /// out of range).
    pub fn t_wall_ns(&self) -> Option<u64> {
        let s = u64::try_from(self.timestamp_s).ok()?;
        let us = u64::try_from(self.timestamp_us).ok()?;
        s.checked_mul(1_000_000_000)?
            .checked_add(us.checked_mul(1_000)?)
    }
}

/// One line from QEMU.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// `{"QMP": {"version": ..., "capabilities": [...]}}`
    Greeting {
        version: QemuVersion,
        capabilities: Vec<String>,
    },
    /// `{"return": VALUE, "id": ID?}`
    Return { value: Value, id: Option<Value> },
    /// `{"error": {"class": ..., "desc": ...}, "id": ID?}`
    Error {
        class: String,
        desc: String,
        id: Option<Value>,
    },
    /// `{"event": NAME, "data": ..., "timestamp": {"seconds": S, "microseconds": US}}`
    Event(QmpEvent),
}

impl Message {
    /// A short description for logs (`return (id 3)`, `event SHUTDOWN`).
    pub fn describe(&self) -> String {
        let id = |id: &Option<Value>| {
            id.as_ref()
                .map(|i| format!(" (id {i})"))
                .unwrap_or_default()
        };
        match self {
            Message::Greeting { version, .. } => format!("greeting (QEMU {version})"),
            Message::Return { id: i, .. } => format!("return{}", id(i)),
            Message::Error { class, id: i, .. } => format!("error {class}{}", id(i)),
            Message::Event(e) => format!("event {}", e.event),
        }
    }
}

/// Why a line is not a QMP message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    msg: String,
}

impl ParseError {
    fn new(what: impl fmt::Display, line: &str) -> Self {
        Self {
            msg: format!("{what}: {}", excerpt(line)),
        }
    }

    fn bare(what: impl Into<String>) -> Self {
        Self { msg: what.into() }
    }

    /// The message (what was wrong, and the start of the line).
    pub fn message(&self) -> &str {
        &self.msg
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed QMP message: {}", self.msg)
    }
}

impl std::error::Error for ParseError {}

/// The first `n` characters of `s`.
fn prefix(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or(s, |(cut, _)| &s[..cut])
}

/// The first [`EXCERPT_CHARS`] characters of `line`, quoted.
fn excerpt(line: &str) -> String {
    let head = prefix(line, EXCERPT_CHARS);
    if head.len() < line.len() {
        format!("{head:?}... ({} bytes)", line.len())
    } else {
        format!("{line:?}")
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The message keys, in the order they are recognised.
const MESSAGE_KEYS: [&str; 4] = ["QMP", "return", "error", "event"];

/// Parses one line from QEMU (without or with its line terminator). Pure;
/// never panics; anything that is not one of the four message shapes
/// (invalid or truncated JSON, not an object, an unknown or ambiguous shape,
/// a member of the wrong type, a line over [`MAX_LINE`]) is a [`ParseError`]
/// saying what was wrong.
pub fn parse_message(line: &str) -> Result<Message, ParseError> {
    if line.len() > MAX_LINE {
        return Err(ParseError::new(
            format_args!(
                "line of {} bytes is over the {MAX_LINE} byte limit",
                line.len()
            ),
            line,
        ));
    }
    let text = line.trim();
    if text.is_empty() {
        return Err(ParseError::bare("empty line"));
    }
    // serde_json limits nesting (128 levels): deep input is an error, not a
    // stack overflow.
    let v: Value = serde_json::from_str(text)
        .map_err(|e| ParseError::new(format_args!("invalid JSON ({e})"), line))?;
    let Value::Object(obj) = v else {
        return Err(ParseError::new(
            format_args!("not a JSON object but {}", kind_of(&v)),
            line,
        ));
    };
    let present: Vec<&str> = MESSAGE_KEYS
        .into_iter()
        .filter(|k| obj.contains_key(*k))
        .collect();
    match present.as_slice() {
        [] => {
            let keys: Vec<&str> = obj.keys().take(8).map(|k| prefix(k, 32)).collect();
            Err(ParseError::new(
                format_args!("unknown message (none of QMP, return, error, event; keys {keys:?})"),
                line,
            ))
        }
        ["QMP"] => parse_greeting(&obj, line),
        ["return"] => Ok(Message::Return {
            value: obj["return"].clone(),
            id: obj.get("id").cloned(),
        }),
        ["error"] => parse_error(&obj, line),
        ["event"] => parse_event(&obj, line).map(Message::Event),
        many => Err(ParseError::new(
            format_args!("ambiguous message (has {many:?})"),
            line,
        )),
    }
}

fn member<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    ctx: &str,
    line: &str,
) -> Result<&'a Value, ParseError> {
    obj.get(key)
        .ok_or_else(|| ParseError::new(format_args!("{ctx} has no '{key}'"), line))
}

fn object<'a>(v: &'a Value, ctx: &str, line: &str) -> Result<&'a Map<String, Value>, ParseError> {
    v.as_object().ok_or_else(|| {
        ParseError::new(
            format_args!("{ctx} is {} instead of an object", kind_of(v)),
            line,
        )
    })
}

fn string<'a>(v: &'a Value, ctx: &str, line: &str) -> Result<&'a str, ParseError> {
    v.as_str().ok_or_else(|| {
        ParseError::new(
            format_args!("{ctx} is {} instead of a string", kind_of(v)),
            line,
        )
    })
}

fn parse_greeting(obj: &Map<String, Value>, line: &str) -> Result<Message, ParseError> {
    let qmp = object(&obj["QMP"], "greeting 'QMP'", line)?;
    let version = object(
        member(qmp, "version", "greeting", line)?,
        "greeting 'version'",
        line,
    )?;
    let qemu = object(
        member(version, "qemu", "greeting 'version'", line)?,
        "greeting 'version.qemu'",
        line,
    )?;
    let num = |k: &str| -> Result<u64, ParseError> {
        let v = member(qemu, k, "greeting 'version.qemu'", line)?;
        v.as_u64().ok_or_else(|| {
            ParseError::new(
                format_args!(
                    "greeting 'version.qemu.{k}' is {} instead of an unsigned integer",
                    kind_of(v)
                ),
                line,
            )
        })
    };
    let (major, minor, micro) = (num("major")?, num("minor")?, num("micro")?);
    let package = match version.get("package") {
        None | Some(Value::Null) => String::new(),
        Some(p) => string(p, "greeting 'version.package'", line)?.to_owned(),
    };
    let capabilities = match qmp.get("capabilities") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(caps)) => caps
            .iter()
            .map(|c| string(c, "a greeting capability", line).map(str::to_owned))
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ParseError::new(
                format_args!(
                    "greeting 'capabilities' is {} instead of an array",
                    kind_of(other)
                ),
                line,
            ));
        }
    };
    Ok(Message::Greeting {
        version: QemuVersion {
            major,
            minor,
            micro,
            package,
        },
        capabilities,
    })
}

fn parse_error(obj: &Map<String, Value>, line: &str) -> Result<Message, ParseError> {
    let err = object(&obj["error"], "'error'", line)?;
    let class = string(
        member(err, "class", "'error'", line)?,
        "'error.class'",
        line,
    )?;
    let desc = string(member(err, "desc", "'error'", line)?, "'error.desc'", line)?;
    Ok(Message::Error {
        class: class.to_owned(),
        desc: desc.to_owned(),
        id: obj.get("id").cloned(),
    })
}

fn parse_event(obj: &Map<String, Value>, line: &str) -> Result<QmpEvent, ParseError> {
    let event = string(&obj["event"], "'event'", line)?;
    let ts = object(
        member(obj, "timestamp", "event", line)?,
        "event 'timestamp'",
        line,
    )?;
    let int = |k: &str| -> Result<i64, ParseError> {
        let v = member(ts, k, "event 'timestamp'", line)?;
        v.as_i64().ok_or_else(|| {
            ParseError::new(
                format_args!(
                    "event 'timestamp.{k}' is {} instead of an integer",
                    kind_of(v)
                ),
                line,
            )
        })
    };
    Ok(QmpEvent {
        event: event.to_owned(),
        data: obj.get("data").cloned().unwrap_or(Value::Null),
        timestamp_s: int("seconds")?,
        timestamp_us: int("microseconds")?,
    })
}

// ---- Errors ---------------------------------------------------------------

/// Why a QMP call failed.
#[derive(Debug)]
pub enum QmpError {
    /// Connecting, reading or writing failed (other than the peer closing).
    Io(io::Error),
    /// No answer within the timeout.
    Timeout,
    /// QEMU closed the socket (or exited). The client stays closed.
    Closed,
    /// QEMU sent a line that is not a QMP message (skipped; the client
    /// stays usable).
    Parse(ParseError),
    /// A well-formed message that makes no sense here (e.g. no greeting).
    Protocol(String),
    /// QEMU answered the command with `{"error": {"class", "desc"}}`.
    Command { class: String, desc: String },
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QmpError::Io(e) => write!(f, "QMP socket error: {e}"),
            QmpError::Timeout => write!(f, "QMP timeout: QEMU did not answer in time"),
            QmpError::Closed => write!(f, "QMP socket closed by QEMU"),
            QmpError::Parse(e) => write!(f, "{e}"),
            QmpError::Protocol(m) => write!(f, "QMP protocol error: {m}"),
            QmpError::Command { class, desc } => write!(f, "QMP command failed: {class}: {desc}"),
        }
    }
}

// No `source()`: every variant's message already holds its cause, and an
// error chain (`{:#}`) would print it twice.
impl std::error::Error for QmpError {}

impl From<ParseError> for QmpError {
    fn from(e: ParseError) -> Self {
        QmpError::Parse(e)
    }
}

/// True for the errors that mean the peer has gone.
fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
    )
}

// ---- Line buffer ------------------------------------------------------------

/// Splits a byte stream into lines of at most `max` bytes. Memory is bounded
/// by `max` plus one read: an over-long line is reported once and its bytes
/// are dropped up to the next newline. (`pub(crate)`, as [`decode_line`]:
/// the `qmp` fuzz target in `fuzz/` drives both.)
#[derive(Debug)]
pub(crate) struct LineBuf {
    buf: Vec<u8>,
    /// `buf[..scanned]` holds no newline.
    scanned: usize,
    /// Inside an over-long line: drop bytes up to the next newline.
    discarding: bool,
    max: usize,
}

impl LineBuf {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            scanned: 0,
            discarding: false,
            max,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line (without `\n`), an error for an over-long
    /// line, or `None` when more bytes are needed.
    pub(crate) fn next_line(&mut self) -> Option<Result<Vec<u8>, ParseError>> {
        loop {
            let nl = self.buf[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|p| self.scanned + p);
            match nl {
                Some(pos) => {
                    let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                    self.scanned = 0;
                    line.pop();
                    if self.discarding {
                        // The tail of an over-long line, already reported.
                        self.discarding = false;
                        continue;
                    }
                    if line.len() > self.max {
                        // Arrived in one read: report it like any over-long line.
                        return Some(Err(ParseError::bare(format!(
                            "line of {} bytes is over the {} byte limit (skipped)",
                            line.len(),
                            self.max
                        ))));
                    }
                    return Some(Ok(line));
                }
                None if self.discarding => {
                    self.buf.clear();
                    self.scanned = 0;
                    return None;
                }
                None if self.buf.len() > self.max => {
                    let n = self.buf.len();
                    // Free it: the discarded tail arrives a read at a time.
                    self.buf = Vec::new();
                    self.scanned = 0;
                    self.discarding = true;
                    return Some(Err(ParseError::bare(format!(
                        "line over the {} byte limit ({n} bytes without a newline; skipped up to the next newline)",
                        self.max
                    ))));
                }
                None => {
                    self.scanned = self.buf.len();
                    return None;
                }
            }
        }
    }
}

/// Decodes one line from the socket.
pub(crate) fn decode_line(
    line: Result<Vec<u8>, ParseError>,
) -> Option<Result<Message, ParseError>> {
    let bytes = match line {
        Ok(b) => b,
        Err(e) => return Some(Err(e)),
    };
    let text = match std::str::from_utf8(&bytes) {
        Ok(t) => t,
        Err(e) => {
            return Some(Err(ParseError::new(
                format_args!("not UTF-8 ({e})"),
                &String::from_utf8_lossy(&bytes),
            )));
        }
    };
    if text.trim().is_empty() {
        return None;
    }
    Some(parse_message(text))
}

// ---- Raw non-blocking socket calls -------------------------------------------

fn raw_recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes; `fd` is the
    // open socket owned by the caller's `UnixStream`.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn raw_send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes; `fd` is the
    // open socket owned by the caller's `UnixStream`. MSG_NOSIGNAL: no
    // SIGPIPE if QEMU has gone.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

// ---- Client -------------------------------------------------------------------

/// A QMP connection in command mode (after `qmp_capabilities`).
#[derive(Debug)]
pub struct QmpClient {
    stream: UnixStream,
    lines: LineBuf,
    chunk: Box<[u8]>,
    /// Bytes of a request not yet sent (a write cut short by a timeout is
    /// finished before the next request).
    wbuf: Vec<u8>,
    next_id: u64,
    events: VecDeque<QmpEvent>,
    dropped_events: u64,
    events_received: u64,
    version: QemuVersion,
    capabilities: Vec<String>,
    /// The peer closed its end (EOF or reset): complete lines still buffered
    /// are delivered, then every call is `Closed`.
    eof: bool,
    /// Writing is no longer possible (the peer has gone, or an I/O error).
    broken: bool,
}

impl QmpClient {
    /// The process at the other end of the socket (its credentials, as the
    /// kernel recorded them when QEMU created the socket), if known.
    pub fn peer_pid(&self) -> Option<i32> {
        self.stream.peer_cred().ok().and_then(|c| c.pid())
    }

    /// Connects to QEMU's QMP socket, reads the greeting and enters command
    /// mode (`qmp_capabilities`), all within `timeout`.
    pub async fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = match timeout_at(deadline, UnixStream::connect(path.as_ref())).await {
            Err(_) => return Err(QmpError::Timeout),
            Ok(Err(e)) => return Err(QmpError::Io(e)),
            Ok(Ok(s)) => s,
        };
        let mut client = QmpClient {
            stream,
            lines: LineBuf::new(MAX_LINE),
            chunk: vec![0u8; READ_CHUNK].into_boxed_slice(),
            wbuf: Vec::new(),
            next_id: 1,
            events: VecDeque::new(),
            dropped_events: 0,
            events_received: 0,
            version: QemuVersion::default(),
            capabilities: Vec::new(),
            eof: false,
            broken: false,
        };
        match client.read_message(deadline).await? {
            Message::Greeting {
                version,
                capabilities,
            } => {
                client.version = version;
                client.capabilities = capabilities;
            }
            other => {
                return Err(QmpError::Protocol(format!(
                    "expected the QMP greeting, got {}",
                    other.describe()
                )));
            }
        }
        client
            .execute_until("qmp_capabilities", None, deadline)
            .await?;
        Ok(client)
    }

    /// QEMU's version (from the greeting).
    pub fn version(&self) -> &QemuVersion {
        &self.version
    }

    /// The capabilities QEMU offered in its greeting (none are enabled).
    pub fn capabilities(&self) -> &[String] {
        &self.capabilities
    }

    /// True once QEMU has closed the socket (or it failed): every command is
    /// then [`QmpError::Closed`]; queued events can still be taken.
    pub fn is_closed(&self) -> bool {
        self.broken || self.eof
    }

    /// Events dropped because the queue was full ([`MAX_QUEUED_EVENTS`]).
    pub fn dropped_events(&self) -> u64 {
        self.dropped_events
    }

    /// Runs `command` (with `arguments` if given) and returns its `return`
    /// value, within `timeout`. Events that arrive first are queued; replies
    /// to earlier commands that timed out are skipped.
    pub async fn execute(
        &mut self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.execute_until(command, args, Instant::now() + timeout)
            .await
    }

    /// [`execute`](Self::execute) with an absolute deadline.
    pub async fn execute_until(
        &mut self,
        command: &str,
        args: Option<Value>,
        deadline: Instant,
    ) -> Result<Value, QmpError> {
        if self.broken || self.eof {
            // Deliver what was already received (a SHUTDOWN) before saying so.
            self.drain_buffered();
            return Err(QmpError::Closed);
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut req = Map::new();
        req.insert("execute".into(), Value::from(command));
        if let Some(a) = args {
            req.insert("arguments".into(), a);
        }
        req.insert("id".into(), Value::from(id));
        let mut bytes = Value::Object(req).to_string().into_bytes();
        bytes.push(b'\n');
        self.wbuf.extend_from_slice(&bytes);
        self.flush(deadline).await?;
        let want = Value::from(id);
        loop {
            match self.read_message(deadline).await? {
                Message::Event(e) => self.queue_event(e),
                Message::Return {
                    value,
                    id: Some(got),
                } if got == want => return Ok(value),
                Message::Error {
                    class,
                    desc,
                    id: Some(got),
                } if got == want => {
                    return Err(QmpError::Command { class, desc });
                }
                other => log::debug!(
                    "QMP: skipping {} while waiting for '{command}' (id {id})",
                    other.describe()
                ),
            }
        }
    }

    /// The events queued so far, oldest first.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Reads whatever QEMU sends for up to `wait` without sending a command,
    /// queueing events; returns how many events arrived. `wait` may be zero
    /// (take what is already readable). `Err(Closed)` when QEMU has closed
    /// the socket (the events before that are queued); a malformed line is
    /// `Err(Parse)` (the client stays usable).
    pub async fn poll_events(&mut self, wait: Duration) -> Result<u64, QmpError> {
        let deadline = Instant::now() + wait;
        let before = self.events_received;
        loop {
            match self.read_message(deadline).await {
                Ok(Message::Event(e)) => self.queue_event(e),
                Ok(other) => log::debug!("QMP: skipping {} (no command pending)", other.describe()),
                Err(QmpError::Timeout) => return Ok(self.events_received - before),
                Err(e) => return Err(e),
            }
        }
    }

    fn queue_event(&mut self, e: QmpEvent) {
        self.events_received += 1;
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
            self.dropped_events += 1;
            if self.dropped_events == 1 {
                log::warn!(
                    "QMP: event queue full ({MAX_QUEUED_EVENTS}); dropping the oldest events"
                );
            }
        }
        self.events.push_back(e);
    }

    /// Queues the events among the complete lines already received (used
    /// once the socket is known to be closed).
    fn drain_buffered(&mut self) {
        // What is still in the socket's receive queue, without waiting.
        if !self.eof {
            let fd = self.stream.as_raw_fd();
            loop {
                match raw_recv(fd, &mut self.chunk) {
                    Ok(0) => {
                        self.eof = true;
                        break;
                    }
                    Ok(n) => self.lines.push(&self.chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        if is_disconnect(&e) {
                            self.eof = true;
                        }
                        break;
                    }
                }
            }
        }
        while let Some(line) = self.lines.next_line() {
            match decode_line(line) {
                Some(Ok(Message::Event(e))) => self.queue_event(e),
                Some(Ok(other)) => {
                    log::debug!("QMP: skipping {} (socket closed)", other.describe())
                }
                Some(Err(e)) => log::debug!("QMP: skipping a malformed line (socket closed): {e}"),
                None => {}
            }
        }
    }

    /// The peer has gone or the socket failed: no more requests; what it
    /// sent before is still delivered.
    fn write_failed(&mut self, e: io::Error) -> QmpError {
        self.broken = true;
        self.wbuf.clear();
        self.drain_buffered();
        if is_disconnect(&e) {
            QmpError::Closed
        } else {
            QmpError::Io(e)
        }
    }

    /// Sends `wbuf` by `deadline`.
    async fn flush(&mut self, deadline: Instant) -> Result<(), QmpError> {
        let fd = self.stream.as_raw_fd();
        while !self.wbuf.is_empty() {
            // Try at once (tokio's readiness may not be known yet), then
            // wait for writability.
            let sent = match raw_send(fd, &self.wbuf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match timeout_at(deadline, self.stream.writable()).await {
                        Err(_) => return Err(QmpError::Timeout),
                        Ok(Err(e)) => return Err(self.write_failed(e)),
                        Ok(Ok(())) => {}
                    }
                    // try_io clears tokio's readiness on WouldBlock.
                    let wbuf = &self.wbuf;
                    self.stream
                        .try_io(Interest::WRITABLE, || raw_send(fd, wbuf))
                }
                r => r,
            };
            match sent {
                Ok(n) => {
                    self.wbuf.drain(..n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(self.write_failed(e)),
            }
        }
        Ok(())
    }

    /// The next message by `deadline`. Complete lines already buffered come
    /// first, even after EOF.
    async fn read_message(&mut self, deadline: Instant) -> Result<Message, QmpError> {
        loop {
            while let Some(line) = self.lines.next_line() {
                if let Some(msg) = decode_line(line) {
                    return msg.map_err(QmpError::Parse);
                }
            }
            if self.eof || self.broken {
                return Err(QmpError::Closed);
            }
            self.fill(deadline).await?;
        }
    }

    /// Reads at least one chunk (or notes EOF) by `deadline`.
    async fn fill(&mut self, deadline: Instant) -> Result<(), QmpError> {
        let fd = self.stream.as_raw_fd();
        let mut got = raw_recv(fd, &mut self.chunk);
        loop {
            match got {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(n) => {
                    self.lines.push(&self.chunk[..n]);
                    return Ok(());
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) if is_disconnect(&e) => {
                    self.eof = true;
                    return Ok(());
                }
                Err(e) => {
                    self.broken = true;
                    return Err(QmpError::Io(e));
                }
            }
            match timeout_at(deadline, self.stream.readable()).await {
                Err(_) => return Err(QmpError::Timeout),
                Ok(Err(e)) => {
                    self.broken = true;
                    return Err(QmpError::Io(e));
                }
                Ok(Ok(())) => {}
            }
            let chunk = &mut self.chunk;
            got = self
                .stream
                .try_io(Interest::READABLE, || raw_recv(fd, chunk));
        }
    }
}

// ---- Test support: a scripted fake QEMU ---------------------------------------

/// A fake QMP server for tests: a std thread with a blocking listener, so it
/// shares no code with the client under test.
#[cfg(test)]
pub(crate) mod fake {
    use std::{
        io::{BufRead as _, BufReader, Read as _, Write as _},
        os::unix::net::{UnixListener, UnixStream},
        path::PathBuf,
        sync::{Arc, Mutex},
        thread,
    };

    use serde_json::Value;

    pub const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Fake 1"}, "capabilities": ["oob"]}}"#;

    /// What the server does.
    pub enum Act {
        /// Send this line (a newline is added).
        Line(String),
        /// Send these raw bytes.
        Raw(Vec<u8>),
        /// Close the connection.
        Close,
        /// Stop answering (hold the connection open until the client goes).
        Hang,
    }

    /// An event line.
    pub fn event(name: &str, data: Option<&str>) -> Act {
        let data = data
            .map(|d| format!(r#", "data": {d}"#))
            .unwrap_or_default();
        Act::Line(format!(
            r#"{{"timestamp": {{"seconds": 1700000000, "microseconds": 5}}, "event": "{name}"{data}}}"#
        ))
    }

    /// A return line for `req`.
    pub fn ret(req: &Value, value: &str) -> Act {
        Act::Line(format!(r#"{{"return": {value}, "id": {}}}"#, req["id"]))
    }

    /// An error line for `req`.
    pub fn err(req: &Value, class: &str, desc: &str) -> Act {
        Act::Line(format!(
            r#"{{"id": {}, "error": {{"class": "{class}", "desc": "{desc}"}}}}"#,
            req["id"]
        ))
    }

    pub struct Server {
        pub path: PathBuf,
        /// Every request received, in order.
        pub requests: Arc<Mutex<Vec<Value>>>,
        _dir: tempfile::TempDir,
    }

    /// Serves one connection: sends `on_connect`, then answers each request
    /// line with `handler(request)` (`qmp_capabilities` is answered with
    /// `{}` unless the handler is given it: it sees every request).
    pub fn serve(
        on_connect: Vec<Act>,
        mut handler: impl FnMut(&Value) -> Vec<Act> + Send + 'static,
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        thread::spawn(move || {
            let Ok((mut sock, _)) = listener.accept() else {
                return;
            };
            let mut reader = BufReader::new(sock.try_clone().unwrap());
            // Performs `acts`; false when the connection must end.
            let run = |acts: Vec<Act>, sock: &mut UnixStream| -> bool {
                for a in acts {
                    let sent = match a {
                        Act::Line(l) => sock.write_all(format!("{l}\r\n").as_bytes()),
                        Act::Raw(b) => sock.write_all(&b),
                        Act::Close => return false,
                        Act::Hang => {
                            // Read and ignore until the client goes away.
                            let mut b = [0u8; 4096];
                            while matches!(sock.read(&mut b), Ok(n) if n > 0) {}
                            return false;
                        }
                    };
                    if sent.is_err() {
                        return false;
                    }
                }
                true
            };
            if !run(on_connect, &mut sock) {
                return;
            }
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                seen.lock().unwrap().push(req.clone());
                let acts = if req["execute"] == "qmp_capabilities" {
                    vec![ret(&req, "{}")]
                } else {
                    handler(&req)
                };
                if !run(acts, &mut sock) {
                    return;
                }
            }
        });
        Server {
            path,
            requests,
            _dir: dir,
        }
    }

    /// The standard start: greeting, then `qmp_capabilities` answered.
    pub fn greeting() -> Vec<Act> {
        vec![Act::Line(GREETING.to_owned())]
    }
}

#[cfg(test)]
mod tests {
    use super::{
        fake::{Act, GREETING, err, event, greeting, ret, serve},
        *,
    };
    use serde_json::json;

    // ---- Parser ------------------------------------------------------------

    #[test]
    fn parses_the_greeting() {
        let m = parse_message(GREETING).unwrap();
        assert_eq!(
            m,
            Message::Greeting {
                version: QemuVersion {
                    major: 7,
                    minor: 2,
                    micro: 22,
                    package: "Fake 1".into()
                },
                capabilities: vec!["oob".into()],
            }
        );
        let Message::Greeting { version, .. } = m else {
            unreachable!()
        };
        assert_eq!(version.to_string(), "7.2.22 (Fake 1)");
        assert!(version.at_least(7, 1) && !version.at_least(7, 3) && !version.at_least(8, 0));
        // No package, no capabilities: still a greeting.
        let m = parse_message(r#"{"QMP":{"version":{"qemu":{"major":9,"minor":0,"micro":1}}}}"#)
            .unwrap();
        let Message::Greeting {
            version,
            capabilities,
        } = m
        else {
            panic!("{m:?}")
        };
        assert_eq!(
            (version.to_string(), capabilities.len()),
            ("9.0.1".to_owned(), 0)
        );
    }

    #[test]
    fn parses_returns_with_and_without_id() {
        assert_eq!(
            parse_message("{\"return\": {}}\r\n").unwrap(),
            Message::Return {
                value: json!({}),
                id: None
            }
        );
        assert_eq!(
            parse_message(r#"{"return": [{"device": "virtio0"}], "id": 7}"#).unwrap(),
            Message::Return {
                value: json!([{"device": "virtio0"}]),
                id: Some(json!(7))
            }
        );
        // Any JSON value may be returned, and any id echoed.
        assert_eq!(
            parse_message(r#"{"id": "x", "return": null}"#).unwrap(),
            Message::Return {
                value: Value::Null,
                id: Some(json!("x"))
            }
        );
    }

    #[test]
    fn parses_errors() {
        assert_eq!(
            parse_message(r#"{"id": 3, "error": {"class": "CommandNotFound", "desc": "The command query-stats has not been found"}}"#).unwrap(),
            Message::Error {
                class: "CommandNotFound".into(),
                desc: "The command query-stats has not been found".into(),
                id: Some(json!(3))
            }
        );
        let e = parse_message(r#"{"error": {"desc": "no class"}}"#).unwrap_err();
        assert!(e.message().contains("no 'class'"), "{e}");
        let e = parse_message(r#"{"error": "GenericError"}"#).unwrap_err();
        assert!(e.message().contains("instead of an object"), "{e}");
    }

    #[test]
    fn parses_events() {
        let m = parse_message(
            r#"{"timestamp": {"seconds": 1795883966, "microseconds": 562771}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}"#,
        )
        .unwrap();
        let Message::Event(e) = m else {
            panic!("{m:?}")
        };
        assert_eq!(e.event, "SHUTDOWN");
        assert_eq!(e.data["reason"], "host-qmp-quit");
        assert_eq!((e.timestamp_s, e.timestamp_us), (1795883966, 562771));
        assert_eq!(e.t_wall_ns(), Some(1_795_883_966_562_771_000));
        // STOP has no data: null.
        let m =
            parse_message(r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#)
                .unwrap();
        let Message::Event(e) = m else {
            panic!("{m:?}")
        };
        assert_eq!((e.event.as_str(), &e.data), ("STOP", &Value::Null));
        // Without a timestamp it is not a QMP event.
        let e = parse_message(r#"{"event": "STOP"}"#).unwrap_err();
        assert!(e.message().contains("no 'timestamp'"), "{e}");
        let e =
            parse_message(r#"{"event": "STOP", "timestamp": {"seconds": 1.5, "microseconds": 2}}"#)
                .unwrap_err();
        assert!(e.message().contains("timestamp.seconds"), "{e}");
    }

    #[test]
    fn rejects_truncated_and_non_object_and_unknown_shapes() {
        for (line, want) in [
            (r#"{"return": {"status": "runn"#, "invalid JSON"),
            (
                r#"{"QMP": {"version": {"qemu": {"micro": 22"#,
                "invalid JSON",
            ),
            ("", "empty line"),
            ("   \r", "empty line"),
            ("[1, 2]", "not a JSON object but an array"),
            ("\"return\"", "not a JSON object but a string"),
            ("42", "not a JSON object but a number"),
            ("null", "not a JSON object but null"),
            (r#"{"execute": "quit"}"#, "unknown message"),
            (r#"{"return": {}, "event": "STOP"}"#, "ambiguous"),
            (r#"{"return": {}} trailing"#, "invalid JSON"),
            (
                r#"{"QMP": {"version": {"qemu": {"major": -1, "minor": 0, "micro": 0}}}}"#,
                "unsigned",
            ),
            (
                r#"{"QMP": {"version": {"qemu": {"major": 7, "minor": 0, "micro": 0}}, "capabilities": [1]}}"#,
                "capability",
            ),
            (
                r#"{"event": 5, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
                "'event' is a number",
            ),
        ] {
            let e = parse_message(line).expect_err(line);
            assert!(e.message().contains(want), "{line:?}: {e}");
        }
    }

    #[test]
    fn huge_and_deep_lines_are_errors() {
        let huge = format!(r#"{{"return": "{}"}}"#, "a".repeat(MAX_LINE));
        let e = parse_message(&huge).unwrap_err();
        assert!(e.message().contains("byte limit"), "{e}");
        assert!(
            e.to_string().len() < 400,
            "the error quotes only an excerpt"
        );
        // Just under the limit is fine.
        let big = format!(r#"{{"return": "{}"}}"#, "a".repeat(MAX_LINE - 20));
        assert!(matches!(parse_message(&big), Ok(Message::Return { .. })));
        // Deep nesting: serde_json's recursion limit, not a stack overflow.
        let deep = format!(
            r#"{{"return": {}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let e = parse_message(&deep).unwrap_err();
        assert!(e.message().contains("invalid JSON"), "{e}");
        // Unknown shape with a huge key: the message stays short.
        let e = parse_message(&format!(r#"{{"{}": 1}}"#, "k".repeat(100_000))).unwrap_err();
        assert!(
            e.message().contains("unknown message") && e.message().len() < 1024,
            "{}",
            e.message().len()
        );
        // Multi-byte characters: the excerpt is cut at a char boundary.
        let e = parse_message(&"é".repeat(500)).unwrap_err();
        assert!(e.message().contains("..."), "{e}");
    }

    /// xorshift64*: deterministic pseudo-random bytes for the no-panic loop.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let seeds = [
            GREETING,
            r#"{"return": [{"device": "virtio0", "stats": {"rd_bytes": 512}}], "id": 1}"#,
            r#"{"id": 3, "error": {"class": "GenericError", "desc": "x"}}"#,
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESET", "data": {"guest": true}}"#,
        ];
        let alphabet = br#"{}[]":,.-+eE0123456789 \ntrufalsnQMPreturnerroreventid"#;
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut parsed = [0usize; 2];
        for i in 0..60_000 {
            let mut bytes: Vec<u8> = if i % 3 == 0 {
                (0..rng.below(64)).map(|_| rng.next() as u8).collect()
            } else {
                seeds[rng.below(seeds.len())].as_bytes().to_vec()
            };
            if i % 3 != 0 {
                for _ in 0..=rng.below(4) {
                    let len = bytes.len();
                    match rng.below(4) {
                        0 if len > 0 => bytes.truncate(rng.below(len)),
                        1 if len > 0 => bytes[rng.below(len)] = alphabet[rng.below(alphabet.len())],
                        2 => bytes.insert(rng.below(len + 1), alphabet[rng.below(alphabet.len())]),
                        _ if len > 0 => {
                            bytes.remove(rng.below(len));
                        }
                        _ => {}
                    }
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            parsed[parse_message(&text).is_ok() as usize] += 1;
        }
        // The loop must exercise both outcomes to mean anything.
        assert!(
            parsed[0] > 1000 && parsed[1] > 1000,
            "errors/ok: {parsed:?}"
        );
    }

    #[test]
    fn line_buffer_bounds_long_lines_and_recovers() {
        let mut lb = LineBuf::new(16);
        lb.push(b"{\"a\":1}\n{\"b\"");
        assert_eq!(lb.next_line().unwrap().unwrap(), b"{\"a\":1}");
        assert!(lb.next_line().is_none());
        lb.push(b":2}\n");
        assert_eq!(lb.next_line().unwrap().unwrap(), b"{\"b\":2}");
        // 40 bytes without a newline: one error, then the bytes are dropped.
        lb.push(&[b'x'; 40]);
        assert!(lb.next_line().unwrap().is_err());
        assert!(lb.buf.is_empty(), "an over-long line is not kept");
        lb.push(&[b'x'; 40]);
        assert!(lb.next_line().is_none(), "reported once");
        assert!(lb.buf.len() <= 40);
        lb.push(b"xx\nok\n");
        assert_eq!(
            lb.next_line().unwrap().unwrap(),
            b"ok",
            "the next line after it is intact"
        );
        // An over-long line arriving in one piece with its newline.
        lb.push(&[b'y'; 20]);
        lb.push(b"\nfine\n");
        assert!(lb.next_line().unwrap().is_err());
        assert_eq!(lb.next_line().unwrap().unwrap(), b"fine");
        assert!(lb.next_line().is_none());
    }

    // ---- Client against a fake server --------------------------------------

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn handshake_and_a_command() {
        let srv = serve(greeting(), |req| match req["execute"].as_str() {
            Some("query-status") => vec![ret(req, r#"{"status": "running", "running": true}"#)],
            _ => vec![err(req, "CommandNotFound", "no")],
        });
        let mut c = QmpClient::connect(&srv.path, T).await.unwrap();
        assert_eq!(c.version().to_string(), "7.2.22 (Fake 1)");
        assert_eq!(c.capabilities(), ["oob"]);
        let v = c.execute("query-status", None, T).await.unwrap();
        assert_eq!(v["status"], "running");
        let reqs = srv.requests.lock().unwrap().clone();
        assert_eq!(reqs[0], json!({"execute": "qmp_capabilities", "id": 1}));
        assert_eq!(reqs[1], json!({"execute": "query-status", "id": 2}));
        // Arguments are sent as given.
        let _ = c
            .execute("query-stats", Some(json!({"target": "vcpu"})), T)
            .await;
        assert_eq!(
            srv.requests.lock().unwrap()[2],
            json!({"execute": "query-stats", "arguments": {"target": "vcpu"}, "id": 3})
        );
    }

    #[tokio::test]
    async fn events_before_the_reply_are_queued() {
        let srv = serve(
            {
                let mut g = greeting();
                // An event before qmp_capabilities' reply, too.
                g.push(event("RESUME", None));
                g
            },
            |req| {
                vec![
                    event("STOP", None),
                    // A stale reply (another id) must be skipped, not returned.
                    Act::Line(r#"{"return": {"stale": true}, "id": 999}"#.into()),
                    event(
                        "BLOCK_IO_ERROR",
                        Some(r#"{"device": "virtio0", "operation": "write"}"#),
                    ),
                    ret(req, r#"{"answer": 42}"#),
                    event("RESET", Some(r#"{"guest": true}"#)),
                ]
            },
        );
        let mut c = QmpClient::connect(&srv.path, T).await.unwrap();
        let v = c.execute("anything", None, T).await.unwrap();
        assert_eq!(v, json!({"answer": 42}));
        let names: Vec<String> = c.take_events().into_iter().map(|e| e.event).collect();
        assert_eq!(names, ["RESUME", "STOP", "BLOCK_IO_ERROR"]);
        assert!(c.take_events().is_empty(), "taken once");
        // The event after the reply comes with poll_events.
        let n = c.poll_events(Duration::from_millis(500)).await.unwrap();
        assert_eq!(n, 1);
        let ev = c.take_events();
        assert_eq!(ev[0].event, "RESET");
        assert_eq!(ev[0].data, json!({"guest": true}));
        assert_eq!((ev[0].timestamp_s, ev[0].timestamp_us), (1_700_000_000, 5));
    }

    #[tokio::test]
    async fn an_error_reply_is_a_command_error() {
        let srv = serve(greeting(), |req| {
            vec![err(
                req,
                "CommandNotFound",
                "The command query-stats has not been found",
            )]
        });
        let mut c = QmpClient::connect(&srv.path, T).await.unwrap();
        match c
            .execute("query-stats", Some(json!({"target": "vcpu"})), T)
            .await
        {
            Err(QmpError::Command { class, desc }) => {
                assert_eq!(class, "CommandNotFound");
                assert!(desc.contains("query-stats"));
            }
            other => panic!("{other:?}"),
        }
        // Still usable.
        assert!(matches!(
            c.execute("x", None, T).await,
            Err(QmpError::Command { .. })
        ));
    }

    #[tokio::test]
    async fn a_silent_server_is_a_timeout_not_a_hang() {
        // Never greets.
        let srv = serve(vec![Act::Hang], |_| vec![]);
        let t0 = std::time::Instant::now();
        let r = QmpClient::connect(&srv.path, Duration::from_millis(300)).await;
        assert!(matches!(r, Err(QmpError::Timeout)), "{r:?}");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(290) && took < Duration::from_secs(2),
            "{took:?}"
        );

        // Greets, then never answers a command.
        let srv = serve(greeting(), |_| vec![Act::Hang]);
        let mut c = QmpClient::connect(&srv.path, T).await.unwrap();
        let t0 = std::time::Instant::now();
        let r = c
            .execute("query-blockstats", None, Duration::from_millis(300))
            .await;
        assert!(matches!(r, Err(QmpError::Timeout)), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        assert!(!c.is_closed(), "a timeout does not close the client");
        // poll_events on a silent socket returns after `wait`, with nothing.
        assert_eq!(c.poll_events(Duration::from_millis(100)).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_late_reply_after_a_timeout_is_skipped() {
        // The first command is answered only when the second arrives.
        let srv = serve(greeting(), {
            let mut held: Option<Value> = None;
            move |req| match held.take() {
                None => {
                    held = Some(req.clone());
                    vec![]
                }
                Some(first) => vec![ret(&first, r#""first""#), ret(req, r#""second""#)],
            }
        });
        let mut c = QmpClient::connect(&srv.path, T).await.unwrap();
        let r = c.execute("one", None, Duration::from_millis(200)).await;
        assert!(matches!(r, Err(QmpError::Timeout)), "{r:?}");
        assert_eq!(c.execute("two", None, T).await.unwrap(), json!("second"));
    }

    #[tokio::test]
    async fn a_closing_server_is_closed() {
        // Closes right after the handshake, with an event first.
        let srv = serve(greeting(), |_| {
            vec![
                event(
                    "SHUTDOWN",
                    Some(r#"{"guest": true, "reason": "guest-shutdown"}"#),
                ),
                Act::Close,
            ]
        });
        let mut c = QmpClient::connect(&srv.path, T).await.unwrap();
        let r = c.execute("query-blockstats", None, T).await;
        assert!(matches!(r, Err(QmpError::Closed)), "{r:?}");
        assert!(c.is_closed());
        assert_eq!(
            c.take_events()[0].event,
            "SHUTDOWN",
            "the event before the close is kept"
        );
        // Every later call is Closed at once.
        let t0 = std::time::Instant::now();
        assert!(matches!(
            c.execute("x", None, T).await,
            Err(QmpError::Closed)
        ));
        assert!(matches!(c.poll_events(T).await, Err(QmpError::Closed)));
        assert!(t0.elapsed() < Duration::from_secs(1));

        // Closes before greeting.
        let srv = serve(vec![Act::Close], |_| vec![]);
        let r = QmpClient::connect(&srv.path, T).await;
        assert!(matches!(r, Err(QmpError::Closed)), "{r:?}");

        // Closes with half a line: still Closed, not Parse.
        let srv = serve(greeting(), |_| {
            vec![Act::Raw(br#"{"return": {"#.to_vec()), Act::Close]
        });
        let mut c = QmpClient::connect(&srv.path, T).await.unwrap();
        let r = c.execute("x", None, T).await;
        assert!(matches!(r, Err(QmpError::Closed)), "{r:?}");
    }

    #[tokio::test]
    async fn sending_to_a_gone_server_is_closed_and_keeps_its_events() {
        // The server answers `quit`, sends SHUTDOWN and closes; the client
        // only notices when it next sends (EPIPE) or reads (EOF).
        let srv = serve(greeting(), |req| {
            vec![ret(req, "{}"), event("SHUTDOWN", None), Act::Close]
        });
        let mut c = QmpClient::connect(&srv.path, T).await.unwrap();
        c.execute("quit", None, T).await.unwrap();
        // Give the server time to close.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let r = c.execute("query-blockstats", None, T).await;
        assert!(matches!(r, Err(QmpError::Closed)), "{r:?}");
        assert_eq!(
            c.take_events()
                .iter()
                .map(|e| e.event.as_str())
                .collect::<Vec<_>>(),
            ["SHUTDOWN"]
        );
    }

    #[tokio::test]
    async fn garbage_is_a_parse_error_and_the_client_recovers() {
        let srv = serve(greeting(), |req| match req["execute"].as_str() {
            Some("garbage") => vec![Act::Line("this is not json".into())],
            Some("binary") => vec![Act::Raw(b"\xff\xfe{\"return\n".to_vec())],
            Some("array") => vec![Act::Line("[1,2,3]".into())],
            _ => vec![ret(req, r#""fine""#)],
        });
        let mut c = QmpClient::connect(&srv.path, T).await.unwrap();
        for (cmd, want) in [
            ("garbage", "invalid JSON"),
            ("binary", "not UTF-8"),
            ("array", "not a JSON object"),
        ] {
            match c.execute(cmd, None, T).await {
                Err(QmpError::Parse(e)) => assert!(e.message().contains(want), "{cmd}: {e}"),
                other => panic!("{cmd}: {other:?}"),
            }
            assert_eq!(
                c.execute("ok", None, T).await.unwrap(),
                json!("fine"),
                "after {cmd}"
            );
        }
    }

    #[tokio::test]
    async fn an_endless_line_is_bounded() {
        // 3 MiB without a newline, then a good reply.
        let srv = serve(greeting(), |req| {
            vec![
                Act::Raw(vec![b'x'; 3 << 20]),
                Act::Raw(b"\n".to_vec()),
                ret(req, "1"),
            ]
        });
        let mut c = QmpClient::connect(&srv.path, T).await.unwrap();
        match c.execute("flood", None, T).await {
            Err(QmpError::Parse(e)) => assert!(e.message().contains("byte limit"), "{e}"),
            other => panic!("{other:?}"),
        }
        // Bounded: at most one over-long line plus a read (Vec growth may double it).
        let cap = c.lines.buf.capacity();
        assert!(cap <= 2 * (MAX_LINE + READ_CHUNK), "{cap}");
        // The reply after the flood is still found.
        let r = c.poll_events(Duration::from_millis(300)).await;
        assert!(r.is_ok(), "{r:?}");
    }

    #[tokio::test]
    async fn no_socket_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let r = QmpClient::connect(dir.path().join("nope.sock"), T).await;
        match r {
            Err(QmpError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::NotFound),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_server_that_does_not_greet_properly_is_a_protocol_error() {
        let srv = serve(vec![Act::Line(r#"{"return": {}}"#.into())], |_| vec![]);
        let r = QmpClient::connect(&srv.path, T).await;
        assert!(
            matches!(r, Err(QmpError::Protocol(ref m)) if m.contains("greeting")),
            "{r:?}"
        );
    }
}
