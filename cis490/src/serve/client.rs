//! `cis490 trace --server SOCKET ...`: one episode through a server, which
//! behaves for its caller like the standalone command. The client checks
//! the options as the standalone command would, forks a command itself (its
//! environment, its working directory) and holds it before `execve` until
//! the server traces it, forwards SIGINT/SIGTERM, reports how its command
//! ended, and prints the episode directory the server wrote.

use std::{
    os::unix::net::UnixStream as StdUnixStream,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
    signal::unix::{SignalKind, signal},
};

use super::protocol::{ToClient, ToServer};
use crate::{
    cli::TraceArgs,
    target::{RemoteExit, Target},
};

/// Runs one episode through the server at `socket`; returns the episode
/// directory. `raw` are the `cis490 trace` arguments as given.
pub fn run(args: TraceArgs, raw: Vec<String>, socket: &Path) -> Result<PathBuf> {
    crate::trace::stop_signals(libc::SIG_BLOCK);
    let cfg = args.into_config(Vec::new());
    cfg.validate()?;
    let stream = StdUnixStream::connect(socket).map_err(|e| {
        anyhow!(
            "cannot reach the cis490 server at {}: {e} (is `cis490 serve --control {}` running?)",
            socket.display(),
            socket.display()
        )
    })?;
    // Fork before any thread exists (the runtime is created below).
    let mut target = match cfg.target_pid {
        Some(_) => None,
        None => Some(Target::spawn(&cfg.command)?),
    };
    let pid = target
        .as_ref()
        .map_or_else(|| cfg.target_pid.unwrap_or(0), Target::pid);
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let request = ToServer::Trace {
        args: raw,
        cwd,
        pid,
        spawned: target.is_some(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the event loop")?;
    let result = rt.block_on(talk(stream, request, target.as_mut()));
    if let Some(t) = &mut target {
        // Ended by the server (or it exits now: never released).
        t.end_spawned(std::time::Duration::from_secs(5));
    }
    result
}

async fn talk(
    stream: StdUnixStream,
    request: ToServer,
    mut target: Option<&mut Target>,
) -> Result<PathBuf> {
    stream.set_nonblocking(true)?;
    let stream = UnixStream::from_std(stream)?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    crate::trace::stop_signals(libc::SIG_UNBLOCK);
    let send = |msg: &ToServer| {
        let mut line = serde_json::to_vec(msg).expect("a message serialises");
        line.push(b'\n');
        line
    };
    if let Err(e) = write.write_all(&send(&request)).await {
        // A server that refused the client said why before closing.
        if let Ok(Some(line)) = lines.next_line().await
            && let Ok(ToClient::Error { error }) = serde_json::from_str(&line)
        {
            bail!("{error}");
        }
        // (As a message: a broken pipe here is the server's, not a reader
        // of ours that went away.)
        bail!("cannot send the request to the server: {e}");
    }
    let exited = match target.as_deref() {
        Some(t) => Some(crate::fdwatch::readable(t.pidfd().try_clone()?)?),
        None => None,
    };
    let mut exit_sent = false;
    let mut signalled = false;
    loop {
        tokio::select! {
            // The server's messages first: a `Done` already received ends
            // the episode before any news of the command is sent.
            biased;
            line = lines.next_line() => {
                let Some(line) = line.map_err(|e| anyhow!("reading from the server: {e}"))? else {
                    bail!("the cis490 server closed the connection before the episode ended (was it killed?)");
                };
                let msg: ToClient = serde_json::from_str(&line)
                    .with_context(|| format!("a message from the server that is not one: {line}"))?;
                match msg {
                    ToClient::Release => {
                        if let Some(t) = target.as_deref_mut()
                            && let Err(e) = t.release()
                        {
                            let error = format!("{e:#}");
                            if let Err(e) = write.write_all(&send(&ToServer::ExecFailed { error })).await {
                                return after_failed_write(&mut lines, e).await;
                            }
                        }
                    }
                    ToClient::Log { line } => eprintln!("{line}"),
                    ToClient::Done { episode } => return Ok(episode),
                    ToClient::Error { error } => return Err(anyhow!("{error}")),
                }
            }
            _ = int.recv() => {
                if stop(&mut write, "SIGINT", &mut signalled, &send).await? {
                    abort(&mut lines, target.as_deref()).await;
                }
            }
            _ = term.recv() => {
                if stop(&mut write, "SIGTERM", &mut signalled, &send).await? {
                    abort(&mut lines, target.as_deref()).await;
                }
            }
            r = async { exited.as_ref().unwrap().readable().await }, if exited.is_some() && !exit_sent => {
                r?.retain_ready();
                exit_sent = true;
                if let Some(t) = target.as_deref()
                    && let Some(status) = t.exit_status()
                {
                    let exit = RemoteExit { status, usage: t.exit_usage() };
                    if let Err(e) = write.write_all(&send(&ToServer::Exited { exit })).await {
                        return after_failed_write(&mut lines, e).await;
                    }
                }
            }
        }
    }
}

/// A message to the server could not be written: the server may have ended
/// the episode and closed the connection meanwhile (the command's exit, say,
/// raced with the episode's end), and then its last messages wait unread.
/// They decide; only without a `Done` is this an error.
async fn after_failed_write(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    e: std::io::Error,
) -> Result<PathBuf> {
    while let Ok(Some(line)) = lines.next_line().await {
        match serde_json::from_str(&line) {
            Ok(ToClient::Done { episode }) => return Ok(episode),
            Ok(ToClient::Error { error }) => bail!("{error}"),
            Ok(ToClient::Log { line }) => eprintln!("{line}"),
            _ => {}
        }
    }
    bail!("cannot reach the server: {e}")
}

/// The first signal asks the server to finish the episode; a second one
/// asks it to abort the episode (true).
async fn stop(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    signal: &str,
    signalled: &mut bool,
    send: &impl Fn(&ToServer) -> Vec<u8>,
) -> Result<bool> {
    if *signalled {
        let _ = write.write_all(&send(&ToServer::Abort)).await;
        return Ok(true);
    }
    *signalled = true;
    write
        .write_all(&send(&ToServer::Stop {
            signal: signal.to_owned(),
        }))
        .await
        .map_err(|e| anyhow!("cannot tell the server to stop: {e}"))?;
    Ok(false)
}

/// The abort, as the standalone command's: the server ends the episode
/// where it stands (no done.marker) and kills the command; the client
/// waits for its word (up to 1 s; the command is killed here too then),
/// says so and exits 130.
async fn abort(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    target: Option<&Target>,
) -> ! {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), lines.next_line()).await;
    if let Some(fd) = target.and_then(Target::killer) {
        let _ = crate::target::pidfd_send_signal(&fd, libc::SIGKILL);
    }
    eprintln!("error: second signal while finishing: aborted, the episode has no done.marker");
    std::process::exit(130);
}
