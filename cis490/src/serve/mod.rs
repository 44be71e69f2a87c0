//! `cis490 serve`: one tracer process, one loaded set of programs, any
//! number of episodes at once, one per `cis490 trace --server` client.
//!
//! The server loads and attaches the probes once, with per-target maps
//! sized for `--max-targets` ([`crate::ebpf::Targets`]). Each client's
//! episode runs on a thread of its own, through the same phases as a
//! standalone trace ([`crate::trace::run_served`]), holding a [`Lease`]: its
//! target's slot, freed when the episode ends. One dispatcher thread reads
//! the shared ring buffer and hands each episode its target's lifecycle
//! records. The protocol is in [`protocol`]; the client side in [`client`].

pub mod client;
pub mod protocol;

use std::{
    collections::HashMap,
    io::BufReader,
    os::{fd::AsRawFd as _, unix::net::UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::maps::{MapData, RingBuf};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use self::protocol::{ToClient, ToServer, recv, send};
use crate::{
    caps,
    cli::{ServeArgs, TraceArgs},
    control,
    ebpf::{KernelFacts, Options, Plan, Probes, Record, Slot},
    target::{Remote, RemoteExit, Target},
    trace::Stop,
};

std::thread_local! {
    /// The connection of the client whose episode this thread runs.
    static CLIENT: std::cell::RefCell<Option<UnixStream>> = const { std::cell::RefCell::new(None) };
}

/// The process's logger: what a server's episode thread logs also goes to
/// that episode's client (which prints it on its stderr), and everything to
/// `inner` (the process's stderr).
pub struct Logger {
    inner: env_logger::Logger,
}

impl Logger {
    pub fn new(inner: env_logger::Logger) -> Self {
        Self { inner }
    }

    /// Installs it as the process's logger.
    pub fn install(self) {
        let level = self.inner.filter();
        if log::set_boxed_logger(Box::new(self)).is_ok() {
            log::set_max_level(level);
        }
    }
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        self.inner.enabled(m)
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.inner.matches(r) {
            return;
        }
        self.inner.log(r);
        // Not while the thread is being torn down.
        let _ = CLIENT.try_with(|c| {
            if let Ok(mut c) = c.try_borrow_mut()
                && let Some(stream) = c.as_mut()
            {
                let line = format!("[{} {:<5}] {}", utc_millis(), r.level(), r.args());
                // A client that went away is not an error of the log's.
                let _ = send(stream, &ToClient::Log { line });
            }
        });
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Now as `YYYY-MM-DDThh:mm:ss.mmmZ`, as the standalone command's log lines
/// begin.
fn utc_millis() -> String {
    let ns = crate::clock::ClockPair::now().wall_ns;
    let (secs, ms) = (ns / 1_000_000_000, ns / 1_000_000 % 1000);
    let (date, time) = (
        crate::dataset::utc_date(secs),
        crate::dataset::utc_time(secs),
    );
    format!("{date}T{time}.{ms:03}Z")
}

/// What every episode of a server shares: the loaded probes, the kernel
/// facts, the load-time options, and the routes of the lifecycle records.
pub struct Shared {
    probes: Probes,
    facts: KernelFacts,
    options: Options,
    btf: PathBuf,
    data_dir: PathBuf,
    routes: Arc<Mutex<HashMap<u32, UnboundedSender<Record>>>>,
    /// Episodes waiting for the dispatcher to have routed every record
    /// the ring buffer holds (each told on its channel).
    flushes: Flushes,
    dispatcher: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

type Flushes = Arc<Mutex<Vec<std::sync::mpsc::SyncSender<()>>>>;

impl Shared {
    pub fn facts(&self) -> &KernelFacts {
        &self.facts
    }

    /// Fails when `--max-targets` targets are traced already.
    fn check_room(&self) -> Result<()> {
        let targets = self
            .probes
            .targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if targets.len() >= self.options.targets as usize {
            bail!(
                "the server traces {} targets already, its most (cis490 serve --max-targets {})",
                targets.len(),
                self.options.targets
            );
        }
        Ok(())
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.dispatcher.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
    }
}

/// An episode's hold on a server's probes: its target's slot (taken back
/// when dropped) and the route of its records.
pub struct Lease {
    shared: Arc<Shared>,
    slot: Slot,
}

impl Lease {
    /// Traces thread group `tgid` from now on, in a free slot; its records
    /// come through the receiver.
    pub fn take(shared: Arc<Shared>, tgid: u32) -> Result<(Self, UnboundedReceiver<Record>)> {
        let (tx, rx) = unbounded_channel();
        let slot = {
            // The route before any record of the slot can exist.
            let mut routes = shared.routes.lock().unwrap_or_else(PoisonError::into_inner);
            shared.check_room()?;
            let mut targets = shared
                .probes
                .targets
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let slot = targets.add(tgid)?;
            routes.insert(slot.index(), tx);
            slot
        };
        Ok((Self { shared, slot }, rx))
    }

    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// Waits until the dispatcher has routed every record the ring buffer
    /// holds now, so that the episode's last records are in its receiver
    /// (as a standalone trace drains the ring buffer itself at its end).
    pub fn flush_records(&self) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.shared
            .flushes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tx);
        if rx.recv_timeout(Duration::from_secs(2)).is_err() {
            log::warn!(
                "the record dispatcher did not answer within 2 s: the episode's last \
                 lifecycle records may come after its end (counted in the server's log)"
            );
        }
    }

    pub fn probes(&self) -> &Probes {
        &self.shared.probes
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let removed = self
            .shared
            .probes
            .targets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(self.slot);
        if let Err(e) = removed {
            log::warn!("cannot free target slot {}: {e:#}", self.slot.index());
        }
        self.shared
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.slot.index());
    }
}

/// Reads the ring buffer for every episode until `stop`, handing each
/// record to its slot's episode. Records of a slot nobody holds (its
/// episode just ended) and records that do not decode are counted.
fn dispatch(
    mut ring: RingBuf<MapData>,
    routes: Arc<Mutex<HashMap<u32, UnboundedSender<Record>>>>,
    flushes: Flushes,
    stop: Arc<AtomicBool>,
) {
    let (mut unrouted, mut undecodable) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) {
        // Those who asked before this drain are told after it.
        let waiting = std::mem::take(&mut *flushes.lock().unwrap_or_else(PoisonError::into_inner));
        while let Some(item) = ring.next() {
            match crate::ebpf::decode_record(&item) {
                Ok(r) => {
                    let routes = routes.lock().unwrap_or_else(PoisonError::into_inner);
                    match routes.get(&r.slot()) {
                        Some(tx) if tx.send(r).is_ok() => {}
                        _ => unrouted += 1,
                    }
                }
                Err(e) => {
                    undecodable += 1;
                    if undecodable.is_power_of_two() {
                        log::warn!("undecodable ring-buffer record ({e}); {undecodable} so far");
                    }
                }
            }
        }
        for w in waiting {
            let _ = w.send(());
        }
        let mut pfd = libc::pollfd {
            fd: ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd. A flush (once at each
        // episode's end) waits for this timeout at most.
        unsafe { libc::poll(&mut pfd, 1, 50) };
    }
    if unrouted > 0 {
        log::info!("{unrouted} lifecycle records came after their episode ended");
    }
}

/// Episodes running now, to tell them when the server stops.
#[derive(Default)]
struct Running {
    next: u64,
    stops: HashMap<u64, UnboundedSender<Stop>>,
    /// The signal the server got, once it is stopping: an episode
    /// registered after it is told at once.
    stopping: Option<&'static str>,
}

/// Runs the server until SIGINT or SIGTERM, which finish every running
/// episode; then detaches everything.
pub fn run(args: ServeArgs) -> Result<()> {
    // Episode threads would each get a malloc arena of their own, whose
    // freed memory glibc keeps: a few arenas for all of them.
    // SAFETY: mallopt with a valid parameter, before any other thread.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    caps::require_tracing_caps()?;
    caps::require_init_pid_namespace()?;
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let options = args.probe_options();
    let facts = KernelFacts::probe(&args.probes.btf)?;
    let plan = Plan::new(&facts, options);
    let probes = Probes::load_and_attach(None, &facts, &plan)?;
    for f in &probes.families {
        if !f.active {
            log::warn!(
                "{} telemetry off: {}",
                f.family,
                f.note.as_deref().unwrap_or("?")
            );
        }
    }
    let routes = Arc::new(Mutex::new(HashMap::new()));
    let flushes = Flushes::default();
    let stop = Arc::new(AtomicBool::new(false));
    let ring = probes.records_ring()?;
    let dispatcher = {
        let (routes, flushes, stop) = (routes.clone(), flushes.clone(), stop.clone());
        std::thread::Builder::new()
            .name("records".into())
            .spawn(move || dispatch(ring, routes, flushes, stop))
            .context("cannot start the record dispatcher")?
    };
    let shared = Arc::new(Shared {
        probes,
        facts,
        options,
        btf: args.probes.btf.clone(),
        data_dir: cwd.join(&args.data_dir),
        routes,
        flushes,
        dispatcher: Some((stop, dispatcher)),
    });
    let running = Arc::new(Mutex::new(Running::default()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the event loop")?;
    let control = args.control.clone();
    let threads = rt.block_on(accept(&control, &shared, &running))?;
    // Socket gone: no new client; every episode told to finish.
    let _ = std::fs::remove_file(&control);
    let n = threads.len();
    for t in threads {
        let _ = t.join();
    }
    drop(shared);
    log::info!("server stopped after {n} client(s); programs detached");
    Ok(())
}

/// Takes clients until a signal; returns their threads, every running
/// episode told to finish.
async fn accept(
    path: &Path,
    shared: &Arc<Shared>,
    running: &Arc<Mutex<Running>>,
) -> Result<Vec<JoinHandle<()>>> {
    use tokio::signal::unix::{SignalKind, signal};
    let listener = control::listen_private(path, "--control")?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    log::info!(
        "serving on {} (at most {} targets at once)",
        path.display(),
        shared.options.targets
    );
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let signal = loop {
        tokio::select! {
            _ = int.recv() => break "SIGINT",
            _ = term.recv() => break "SIGTERM",
            r = listener.accept() => {
                let (stream, _) = match r {
                    Ok(s) => s,
                    Err(e) => {
                        log::warn!("accept: {e}");
                        continue;
                    }
                };
                let cred = stream.peer_cred();
                let mut stream = stream.into_std()?;
                stream.set_nonblocking(false)?;
                match cred {
                    Ok(c) if control::may_connect(c.uid()) => {}
                    refused => {
                        let who = refused.map_or_else(|e| format!("unknown ({e})"), |c| format!("uid {}", c.uid()));
                        log::warn!("refused a client: {who}");
                        let _ = send(&mut stream, &ToClient::Error {
                            error: format!("permission denied: {who} may not use this server (only root and the server's user)"),
                        });
                        continue;
                    }
                }
                threads.retain(|t| !t.is_finished());
                let (shared, running) = (shared.clone(), running.clone());
                let t = std::thread::Builder::new()
                    .name("episode".into())
                    .spawn(move || client(shared, running, stream))
                    .context("cannot start an episode thread")?;
                threads.push(t);
            }
        }
    };
    drop(listener);
    let mut running = running.lock().unwrap_or_else(PoisonError::into_inner);
    running.stopping = Some(signal);
    log::info!(
        "{signal}: finishing {} running episode(s)",
        running.stops.len()
    );
    for tx in running.stops.values() {
        let _ = tx.send(Stop::Signal(signal));
    }
    Ok(threads)
}

/// One client: its episode, then the result on its connection.
fn client(shared: Arc<Shared>, running: Arc<Mutex<Running>>, stream: UnixStream) {
    let mut reply = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            log::warn!("client connection: {e}");
            return;
        }
    };
    // What this thread logs from now on goes to the client too.
    CLIENT.with(|c| *c.borrow_mut() = stream.try_clone().ok());
    let result = episode(&shared, &running, stream);
    CLIENT.with(|c| *c.borrow_mut() = None);
    let msg = match result {
        Ok(dir) => {
            log::info!("episode done: {}", dir.display());
            ToClient::Done { episode: dir }
        }
        Err(e) => {
            log::warn!("episode failed: {e:#}");
            ToClient::Error {
                error: format!("{e:#}"),
            }
        }
    };
    // A client that went away does not read it.
    let _ = send(&mut reply, &msg);
    let _ = reply.shutdown(std::net::Shutdown::Both);
    // The episode's memory back to the system, not kept by the allocator.
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe { libc::malloc_trim(0) };
}

/// Reads a client's request, checks it, and runs its episode.
fn episode(
    shared: &Arc<Shared>,
    running: &Arc<Mutex<Running>>,
    stream: UnixStream,
) -> Result<PathBuf> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let request = recv::<ToServer>(&mut reader).context("reading the client's request")?;
    let Some(ToServer::Trace {
        args,
        cwd,
        pid,
        spawned,
    }) = request
    else {
        bail!("the client's first message must be a trace request");
    };
    stream.set_read_timeout(None)?;
    let targs = TraceArgs::parse_args(&args).map_err(|e| anyhow!("{e}"))?;
    check_load_options(shared, &targs, &args)?;
    let mut argv: Vec<String> = ["cis490", "trace"].map(String::from).to_vec();
    argv.extend(args.iter().cloned());
    let mut cfg = targs.into_config(argv);
    if !gave(&args, "--data-dir") {
        cfg.data_dir = shared.data_dir.clone();
    }
    if spawned == cfg.command.is_empty() || (!spawned && cfg.target_pid != Some(pid)) {
        bail!("the request's target does not match its arguments");
    }
    // A full server says so before it makes an episode (Lease::take checks
    // again, under its lock).
    shared.check_room()?;
    log::info!(
        "client: {} pid {pid}",
        if spawned { "spawned" } else { "attach to" }
    );
    let (tx, rx) = unbounded_channel();
    let id = {
        let mut r = running.lock().unwrap_or_else(PoisonError::into_inner);
        r.next += 1;
        let id = r.next;
        r.stops.insert(id, tx.clone());
        if let Some(signal) = r.stopping {
            let _ = tx.send(Stop::Signal(signal));
        }
        id
    };
    let exit: Arc<Mutex<Option<RemoteExit>>> = Arc::default();
    let listen = {
        let exit = exit.clone();
        std::thread::Builder::new()
            .name("client".into())
            .spawn(move || listen(reader, tx, exit))
            .context("cannot start the client reader")?
    };
    let target = if spawned {
        let mut w = stream.try_clone()?;
        let release = Box::new(move || {
            send(&mut w, &ToClient::Release).context("cannot tell the client to start its command")
        });
        Target::adopt(
            pid,
            Remote {
                release: Some(release),
                exit,
            },
        )
    } else {
        Target::attach(pid)
    };
    let result = target.and_then(|t| crate::trace::run_served(cfg, &cwd, t, shared.clone(), rx));
    running
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .stops
        .remove(&id);
    // The reader ends when the client closes (after the result).
    drop(listen);
    result
}

/// The load-time options are the server's: a client asking for others is
/// told so.
fn check_load_options(shared: &Shared, t: &TraceArgs, args: &[String]) -> Result<()> {
    let (o, ringbuf_kib, t) = (&shared.options, t.ringbuf_kib, &t.probes);
    if t.wakeups && !o.wakeups {
        bail!("the server does not count wakeups: start it with `cis490 serve --wakeups`");
    }
    if gave(args, "--block-probes") && t.block_probes != o.block {
        bail!(
            "--block-probes is the server's (here {:?}): give it to `cis490 serve`",
            o.block
        );
    }
    if gave(args, "--ringbuf-kib") && ringbuf_kib * 1024 != o.ringbuf_bytes {
        bail!(
            "--ringbuf-kib is the server's (here {}): give it to `cis490 serve`",
            o.ringbuf_bytes / 1024
        );
    }
    if gave(args, "--btf") && t.btf != shared.btf {
        bail!(
            "--btf is the server's (here {}): give it to `cis490 serve`",
            shared.btf.display()
        );
    }
    Ok(())
}

/// Whether the client's arguments give FLAG (`--flag V` or `--flag=V`)
/// before its command.
fn gave(args: &[String], flag: &str) -> bool {
    args.iter().take_while(|a| *a != "--").any(|a| {
        a.strip_prefix(flag)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
    })
}

/// Reads a client's messages during its episode: a signal it got or its
/// going away stop the episode; its command's end is kept for meta.json.
fn listen(
    mut reader: BufReader<UnixStream>,
    stops: UnboundedSender<Stop>,
    exit: Arc<Mutex<Option<RemoteExit>>>,
) {
    loop {
        match recv::<ToServer>(&mut reader) {
            Ok(Some(ToServer::Stop { signal })) => {
                let _ = stops.send(Stop::Signal(if signal == "SIGINT" {
                    "SIGINT"
                } else {
                    "SIGTERM"
                }));
            }
            Ok(Some(ToServer::Abort)) => {
                let _ = stops.send(Stop::Abort);
            }
            Ok(Some(ToServer::Exited { exit: e })) => {
                *exit.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
            }
            Ok(Some(ToServer::ExecFailed { error })) => {
                let _ = stops.send(Stop::ExecFailed(error));
            }
            Ok(Some(ToServer::Trace { .. })) => {
                log::warn!("client: a second trace request on one connection, ignored");
            }
            Ok(None) | Err(_) => {
                let _ = stops.send(Stop::ClientGone);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::gave;

    #[test]
    fn a_flag_counts_before_the_command_only() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(gave(&args(&["--btf", "/x", "--", "true"]), "--btf"));
        assert!(gave(&args(&["--btf=/x"]), "--btf"));
        assert!(!gave(&args(&["--btf-x", "1"]), "--btf"));
        assert!(!gave(
            &args(&["--", "cmd", "--data-dir", "d"]),
            "--data-dir"
        ));
    }
}
