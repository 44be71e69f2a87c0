//! `cis490 trace`: validate, attach or spawn, load the probes, then one event
//! loop that closes a bucket on every grid boundary (one row per source),
//! streams lifecycle records into `events.jsonl`, and stops on the target's
//! exit, the duration, or SIGINT/SIGTERM. The episode is marked done only
//! when everything was written.

//!
//! Its parts: [`phases`] (one trace from attach to the last row, in named
//! phases), [`sources`] (sampling every source at a boundary), [`outputs`]
//! (the episode's open files).

mod outputs;
mod phases;
pub mod priority;
mod sources;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    caps,
    ebpf::{self as probes, KernelFacts},
    episode::EpisodeDir,
    meta::{EbpfTotals, Host, Meta, Status},
    row::SourceKind,
    target::Target,
};

/// Everything `cis490 trace` was asked to do.
#[derive(Clone, Debug)]
pub struct TraceConfig {
    pub target_pid: Option<i32>,
    pub command: Vec<OsString>,
    pub duration: Option<Duration>,
    pub interval: Duration,
    pub data_dir: PathBuf,
    pub sources: Vec<SourceKind>,
    pub btf: PathBuf,
    pub progress: Option<Duration>,
    pub probe_options: probes::Options,
    /// Phase labels at fixed times after the start (`--label NAME@SECS`).
    pub labels: Vec<(String, Duration)>,
    /// `--tag KEY=VALUE` pairs, for meta.json.
    pub tags: Vec<(String, String)>,
    /// The control socket to listen on (`--control PATH`).
    pub control: Option<PathBuf>,
    /// QEMU's QMP socket (`--qmp PATH`).
    pub qmp: Option<PathBuf>,
    /// QEMU's chardev socket of the guest agent's port (`--guest-agent PATH`).
    pub guest_agent: Option<PathBuf>,
    /// Where to write the episode directory's path once it exists
    /// (`--episode-file PATH`).
    pub episode_file: Option<PathBuf>,
    /// How the thread that closes buckets is scheduled (`--priority`).
    pub priority: priority::Priority,
    /// The gateway collector (`--gateway-if` and co).
    pub gateway: Option<crate::sources::gateway::GatewayConfig>,
    /// This process's own argv, for meta.json.
    pub argv: Vec<String>,
}

impl TraceConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.target_pid.is_some() != self.command.is_empty() {
            bail!("give exactly one target: --target-pid PID or -- COMMAND [ARGS...]");
        }
        if self.interval < Duration::from_millis(1) {
            bail!("--interval-ms must be at least 1");
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            bail!("--duration must be positive");
        }
        if self.sources.is_empty() {
            bail!("--sources must name at least one source");
        }
        if let Some(path) = &self.control {
            crate::control::check_path(path)?;
        }
        if let Some(path) = &self.episode_file {
            check_episode_file(path)?;
        }
        if self.sources.contains(&SourceKind::Qmp) && self.qmp.is_none() {
            bail!("the qmp source needs QEMU's QMP socket: give --qmp SOCKET");
        }
        if self.sources.contains(&SourceKind::Gateway) && self.gateway.is_none() {
            bail!("the gateway source needs an interface: give --gateway-if IFACE");
        }
        if let Some(g) = &self.gateway {
            g.validate()?;
        }
        if self.sources.contains(&SourceKind::Guest) && self.guest_agent.is_none() {
            bail!("the guest source needs the agent's chardev socket: give --guest-agent SOCKET");
        }
        if let Some(limit) = self.duration {
            for (name, at) in &self.labels {
                if *at > limit {
                    bail!(
                        "--label {name}@{} comes after --duration {} s: it would never be written",
                        at.as_secs_f64(),
                        limit.as_secs_f64()
                    );
                }
            }
        }
        crate::meta::tag_map(&self.tags).map_err(anyhow::Error::msg)?;
        Ok(())
    }
}

/// Refuses an `--episode-file` that cannot be written, before anything
/// starts: its directory must exist, and it must not be a directory.
fn check_episode_file(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!(
            "--episode-file {}: the directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    if path.is_dir() {
        bail!("--episode-file {} is a directory", path.display());
    }
    Ok(())
}

/// SIGINT and SIGTERM, blocked from the start of a trace until the event
/// loop handles them, so a signal during setup still ends in a complete
/// episode instead of killing the tracer.
pub(crate) fn stop_signals(how: libc::c_int) {
    // SAFETY: a sigset built with sigemptyset/sigaddset, for this thread
    // (no other thread exists yet when blocking).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Runs a trace; returns the episode directory.
pub fn run(mut cfg: TraceConfig) -> Result<PathBuf> {
    stop_signals(libc::SIG_BLOCK);
    cfg.validate()?;
    // Paths on stdout and in meta.json are absolute: a relative --data-dir
    // means nothing to a reader in another directory.
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    cfg.data_dir = cwd.join(&cfg.data_dir);
    caps::require_tracing_caps()?;
    caps::require_init_pid_namespace()?;
    let facts = KernelFacts::probe(&cfg.btf)?;
    // Fork before any thread exists (the runtime is created below).
    let target = match cfg.target_pid {
        Some(pid) => Target::attach(pid)?,
        None => Target::spawn(&cfg.command)?,
    };
    let stops = || Ok(phases::Stops::Signals(phases::Signals::handle()?));
    episode(
        &cfg,
        &cwd,
        &facts,
        target,
        phases::Backend::Standalone,
        stops,
    )
}

/// Runs one episode of a server (`cis490 serve`) for a client: `cfg` as
/// the client gave it (validated here; relative paths are the client's,
/// under `cwd`), told to stop by `stops`. Returns the episode directory.
pub(crate) fn run_served(
    mut cfg: TraceConfig,
    cwd: &Path,
    target: Target,
    shared: std::sync::Arc<crate::serve::Shared>,
    stops: tokio::sync::mpsc::UnboundedReceiver<phases::Stop>,
) -> Result<PathBuf> {
    // Every path as the client meant it, before it is checked.
    cfg.data_dir = cwd.join(&cfg.data_dir);
    for p in [
        &mut cfg.control,
        &mut cfg.qmp,
        &mut cfg.guest_agent,
        &mut cfg.episode_file,
    ]
    .into_iter()
    .flatten()
    {
        *p = cwd.join(&*p);
    }
    cfg.validate()?;
    let facts = shared.facts().clone();
    let backend = phases::Backend::Served(shared);
    episode(&cfg, cwd, &facts, target, backend, move || {
        Ok(phases::Stops::Served(stops))
    })
}

pub(crate) use phases::Stop;

/// One episode, from its directory to `done.marker`.
fn episode(
    cfg: &TraceConfig,
    cwd: &Path,
    facts: &KernelFacts,
    mut target: Target,
    backend: phases::Backend,
    stops: impl FnOnce() -> Result<phases::Stops>,
) -> Result<PathBuf> {
    let episode = EpisodeDir::create(&cfg.data_dir)?;
    let argv = (!cfg.command.is_empty()).then_some(cfg.command.as_slice());
    let mut meta = Meta {
        schema_version: 1,
        id: episode.id().to_owned(),
        status: Status::Running,
        error: None,
        cis490_version: env!("CARGO_PKG_VERSION").into(),
        command_line: cfg.argv.clone(),
        working_directory: cwd.to_owned(),
        host: Host::current(),
        target: target.info(argv),
        interval_ns: cfg.interval.as_nanos() as u64,
        duration_limit_s: cfg.duration.map(|d| d.as_secs_f64()),
        start: None,
        end: None,
        end_reason: None,
        target_exit: None,
        target_rusage: None,
        sources: Vec::new(),
        kernel: Some(facts.clone()),
        probes: Vec::new(),
        families: Vec::new(),
        ebpf: EbpfTotals {
            ringbuf_bytes: cfg.probe_options.ringbuf_bytes,
            ..Default::default()
        },
        skipped_boundaries: 0,
        read_spread_max_ns: None,
        // This thread runs the event loop (a current-thread runtime), in a
        // server too (one thread per episode).
        tracer_scheduling: Some(priority::apply(cfg.priority)),
        perf: None,
        perf_error: None,
        proc: None,
        tracer: None,
        qmp: None,
        guest_agent: None,
        control_socket: cfg.control.as_ref().map(|p| p.display().to_string()),
        labels: 0,
        tags: crate::meta::tag_map(&cfg.tags).map_err(anyhow::Error::msg)?,
        host_steal_ns: None,
        gateway: None,
    };
    episode.write_meta(&meta)?;
    log::info!("episode {} -> {}", episode.id(), episode.path().display());
    if let Some(path) = &cfg.episode_file {
        let line = format!("{}\n", episode.path().display());
        crate::episode::write_atomic(&cwd.join(path), line.as_bytes())
            .with_context(|| format!("cannot write the episode path to {}", path.display()))?;
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the event loop")?;
    let result = rt.block_on(trace(
        cfg,
        facts,
        &mut target,
        &episode,
        &mut meta,
        backend,
        stops,
    ));
    match result {
        Ok(()) => {
            meta.status = Status::Complete;
            episode.write_meta(&meta)?;
            episode.mark_done()?;
            Ok(episode.path().to_owned())
        }
        Err(e) => {
            // A spawned command does not outlive a failed trace.
            target.end_spawned(Duration::from_secs(5));
            meta.status = Status::Failed;
            meta.error = Some(format!("{e:#}"));
            if let Err(w) = episode.write_meta(&meta) {
                log::warn!("{w:#}");
            }
            Err(e)
        }
    }
}

/// One trace, phase by phase (see [`phases`]).
async fn trace(
    cfg: &TraceConfig,
    facts: &KernelFacts,
    target: &mut Target,
    episode: &EpisodeDir,
    meta: &mut Meta,
    backend: phases::Backend,
    stops: impl FnOnce() -> Result<phases::Stops>,
) -> Result<()> {
    // SIGINT/SIGTERM handled from here on: a signal during setup still
    // ends in a complete episode.
    let mut stops = stops()?;
    // A served episode's abort kills a command the trace started, as the
    // standalone command's does.
    let killer = target.killer();
    let mut run = phases::Run::attach(cfg, facts, target, episode, meta, backend).await?;
    let mut grid = run.begin().await?;
    let reason = run.event_loop(&mut grid, &mut stops).await?;
    match stops {
        phases::Stops::Signals(s) => run.finish(grid, reason, Some(s)).await,
        // A served episode's client asks for an abort on its second
        // signal: the finishing is dropped where it stands, so no
        // done.marker is written.
        phases::Stops::Served(rx) => tokio::select! {
            // The abort first whenever both are ready.
            biased;
            () = phases::abort_asked(rx) => {
                if let Some(fd) = &killer {
                    let _ = crate::target::pidfd_send_signal(fd, libc::SIGKILL);
                }
                Err(anyhow::anyhow!(phases::ABORTED))
            }
            r = run.finish(grid, reason, None) => r,
        },
    }
}
