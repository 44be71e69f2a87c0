//! Phase labels and the control socket.
//!
//! An orchestrator marks phases (`boot`, `idle`, `detonate`, `teardown`)
//! either up front (`--label NAME@SECONDS`) or live, over a unix socket
//! (`--control PATH`) that speaks one command per line:
//!
//! ```text
//! label NAME      -> ok <t_mono_ns>     (writes a line to labels.jsonl)
//! ping            -> ok <t_mono_ns>
//! stop            -> ok <t_mono_ns>     (ends tracing, like SIGTERM)
//! anything else   -> error <why>
//! ```

use std::{path::Path, time::Duration};

use anyhow::{Result, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

/// Longest label name accepted.
pub const MAX_LABEL: usize = 64;

/// Checks a label name: 1 to 64 characters of `[A-Za-z0-9_.:-]`.
pub fn check_label(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_LABEL {
        return Err(format!(
            "a label is 1 to {MAX_LABEL} characters, not {}",
            name.len()
        ));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "_.:-".contains(*c)))
    {
        Some(c) => Err(format!(
            "a label is made of letters, digits and _ . : -, not {c:?}"
        )),
        None => Ok(()),
    }
}

/// Parses `NAME@SECONDS` (`--label detonate@30`).
pub fn parse_label_at(spec: &str) -> Result<(String, Duration), String> {
    let (name, secs) = spec
        .rsplit_once('@')
        .ok_or_else(|| format!("'{spec}' is not NAME@SECONDS"))?;
    check_label(name)?;
    let secs: f64 = secs
        .parse()
        .map_err(|_| format!("'{secs}' in '{spec}' is not a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("'{spec}': the time must be zero or more seconds"));
    }
    Ok((name.to_owned(), Duration::from_secs_f64(secs)))
}

/// A command read from the control socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Label(String),
    Ping,
    Stop,
}

/// Parses one control line.
pub fn parse_command(line: &str) -> Result<Command, String> {
    let line = line.trim();
    let (verb, arg) = line
        .split_once(char::is_whitespace)
        .map_or((line, ""), |(v, a)| (v, a.trim()));
    match (verb, arg) {
        ("label", name) => check_label(name).map(|()| Command::Label(name.to_owned())),
        ("ping", "") => Ok(Command::Ping),
        ("stop", "") => Ok(Command::Stop),
        ("", _) => Err("empty command".into()),
        (v, _) => Err(format!("unknown command '{v}' (label NAME, ping, stop)")),
    }
}

/// A command with the way to answer it (the reply line, without newline).
pub type Request = (Command, oneshot::Sender<String>);

/// Accepts connections on `path` and forwards their commands to the event
/// loop; removes the socket file when dropped.
pub struct ControlSocket {
    path: std::path::PathBuf,
    pub requests: mpsc::Receiver<Request>,
}

/// Longest command line read.
const MAX_LINE: usize = 4096;

/// Checks that `path` can hold a control socket only this user can reach:
/// its directory exists and no other user can replace what is in it (not
/// writable by group or others unless sticky, owned by root or this user),
/// and nothing but a socket is at the path. Called before anything of an
/// episode exists, so a bad path is one error and no episode.
pub fn check_path(path: &Path) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
    let name = path.display();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let meta = std::fs::metadata(dir)
        .map_err(|e| anyhow::anyhow!("--control {name}: directory {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        bail!("--control {name}: {} is not a directory", dir.display());
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mode = meta.mode();
    if meta.uid() != 0 && meta.uid() != me {
        bail!(
            "--control {name}: directory {} belongs to uid {}, who could replace the socket; \
             use a directory of root's or your own (e.g. /run)",
            dir.display(),
            meta.uid()
        );
    }
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        bail!(
            "--control {name}: directory {} is writable by other users (mode {:o}) and not \
             sticky, so they could replace the socket; use a directory only you can write \
             (e.g. /run)",
            dir.display(),
            mode & 0o7777
        );
    }
    if let Ok(m) = std::fs::symlink_metadata(path)
        && !m.file_type().is_socket()
    {
        bail!("--control {name}: the path exists and is not a socket");
    }
    Ok(())
}

/// Listens on a unix socket at `path` (`flag` names the option, for
/// errors), mode 0600 whatever the umask (created under a umask of 0177,
/// then set again); a socket left at the path by an earlier run is
/// replaced. The path is checked as [`check_path`] does.
pub fn listen_private(path: &Path, flag: &str) -> Result<UnixListener> {
    check_path(path)
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().replacen("--control", flag, 1)))?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt as _;
        if !meta.file_type().is_socket() {
            bail!(
                "{flag} {}: the path exists and is not a socket",
                path.display()
            );
        }
        // A socket left by an earlier run.
        std::fs::remove_file(path)?;
    }
    // SAFETY: umask has no preconditions; restored right after.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener =
        bound.map_err(|e| anyhow::anyhow!("{flag} {}: cannot listen: {e}", path.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| anyhow::anyhow!("{flag} {}: cannot set mode 0600: {e}", path.display()))?;
    Ok(listener)
}

/// Whether a peer with `uid` may use the control socket: root, or the
/// tracer's own user.
pub fn may_connect(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

impl ControlSocket {
    /// Listens on `path`, mode 0600 whatever the umask (created under a
    /// umask of 0177, then set again), and takes commands only from root
    /// or the tracer's own user (each connection's peer credentials).
    pub fn bind(path: &Path) -> Result<Self> {
        let listener = listen_private(path, "--control")?;
        let (tx, requests) = mpsc::channel(64);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                match stream.peer_cred() {
                    Ok(c) if may_connect(c.uid()) => {
                        tokio::spawn(serve(stream, tx.clone()));
                    }
                    Ok(c) => {
                        log::warn!(
                            "control socket: refused a connection from uid {} (pid {:?}): \
                             only root and the tracer's user may use it",
                            c.uid(),
                            c.pid()
                        );
                        let _ = stream
                            .write_all(
                                b"error permission denied: only root and the tracer's user\n",
                            )
                            .await;
                    }
                    Err(e) => log::warn!("control socket: no peer credentials: {e}"),
                }
            }
        });
        Ok(Self {
            path: path.to_owned(),
            requests,
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One connection: a command per line, a reply per line.
async fn serve(stream: UnixStream, tx: mpsc::Sender<Request>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(MAX_LINE as u64 * 1024));
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) if line.len() > MAX_LINE => {
                let _ = write.write_all(b"error line too long\n").await;
                return;
            }
            Ok(_) => {}
        }
        let reply = match parse_command(&line) {
            Err(e) => format!("error {e}"),
            Ok(cmd) => {
                let (otx, orx) = oneshot::channel();
                if tx.send((cmd, otx)).await.is_err() {
                    return;
                }
                orx.await
                    .unwrap_or_else(|_| "error tracing has ended".into())
            }
        };
        if write
            .write_all(format!("{reply}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked() {
        assert!(check_label("detonate").is_ok());
        assert!(check_label("phase-2.b:x_y").is_ok());
        assert!(check_label("").is_err());
        assert!(check_label("has space").is_err());
        assert!(check_label(&"x".repeat(65)).is_err());
        assert!(check_label("ünï").is_err());
    }

    #[test]
    fn label_at_seconds() {
        assert_eq!(
            parse_label_at("boot@0").unwrap(),
            ("boot".into(), Duration::ZERO)
        );
        assert_eq!(
            parse_label_at("detonate@1.5").unwrap(),
            ("detonate".into(), Duration::from_millis(1500))
        );
        assert!(parse_label_at("detonate").is_err());
        assert!(parse_label_at("x@-1").is_err());
        assert!(parse_label_at("x@soon").is_err());
        assert!(parse_label_at("a b@1").is_err());
    }

    #[test]
    fn commands() {
        assert_eq!(
            parse_command("label idle\n"),
            Ok(Command::Label("idle".into()))
        );
        assert_eq!(parse_command("  ping "), Ok(Command::Ping));
        assert_eq!(parse_command("stop"), Ok(Command::Stop));
        assert!(parse_command("label").is_err());
        assert!(parse_command("label two words").is_err());
        assert!(
            parse_command("reboot")
                .unwrap_err()
                .contains("unknown command")
        );
        assert!(parse_command("").is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn socket_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let mut sock = ControlSocket::bind(&path).unwrap();
        let client = tokio::spawn({
            let path = path.clone();
            async move {
                let s = UnixStream::connect(&path).await.unwrap();
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                let mut replies = Vec::new();
                for cmd in ["label boot\n", "bogus\n", "ping\n"] {
                    w.write_all(cmd.as_bytes()).await.unwrap();
                    let mut line = String::new();
                    r.read_line(&mut line).await.unwrap();
                    replies.push(line.trim().to_owned());
                }
                replies
            }
        });
        for _ in 0..2 {
            let (cmd, reply) = sock.requests.recv().await.unwrap();
            reply.send(format!("ok {cmd:?}")).unwrap();
        }
        let replies = client.await.unwrap();
        assert_eq!(replies[0], r#"ok Label("boot")"#);
        assert!(replies[1].starts_with("error unknown command"));
        assert_eq!(replies[2], "ok Ping");
        drop(sock);
        assert!(!path.exists(), "socket file removed");
        // A regular file in the way is refused.
        std::fs::write(&path, b"").unwrap();
        assert!(ControlSocket::bind(&path).is_err());
    }

    #[test]
    fn paths_other_users_could_replace_are_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_path(&open.join("c.sock")).unwrap_err().to_string();
        assert!(e.contains("writable by other users"), "{e}");
        // Sticky, like /tmp: others cannot remove or rename what is ours.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_path(&open.join("c.sock")).unwrap();
        let e = check_path(&dir.path().join("missing/c.sock"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
        check_path(&dir.path().join("c.sock")).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_socket_is_0600_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        // SAFETY: umask has no preconditions; restored below.
        let old = unsafe { libc::umask(0) };
        let sock = ControlSocket::bind(&path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let _sock = sock.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        assert!(may_connect(0));
        // SAFETY: geteuid has no preconditions.
        assert!(may_connect(unsafe { libc::geteuid() }));
    }
}
