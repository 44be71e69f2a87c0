//! What a `cis490 trace --server` client and the server say to each other
//! on the server's socket: one JSON object per line, each direction a
//! typed message enum.
//!
//! ```text
//! client -> server  {"type":"trace","args":[...],"cwd":"/lab","pid":1234,"spawned":true}
//! server -> client  {"type":"release"}                      (spawned: execve now)
//! client -> server  {"type":"exited","exit":{...}}          (spawned: it ended)
//! client -> server  {"type":"stop","signal":"SIGINT"}       (the client got a signal)
//! server -> client  {"type":"done","episode":"/lab/data/episodes/01..."}
//!                or {"type":"error","error":"..."}
//! ```
//!
//! A client that closes its end (dies) ends its episode (`client_gone`).

use std::{
    io::{self, BufRead as _, Read as _},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use crate::target::RemoteExit;

/// The longest line either side accepts.
pub const MAX_LINE: usize = 1 << 20;

/// From a client to the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToServer {
    /// The first message: run an episode. `args` are `cis490 trace`'s
    /// arguments as the client got them; `pid` its target (`spawned`: a
    /// command the client forked and holds before `execve`).
    Trace {
        args: Vec<String>,
        cwd: PathBuf,
        pid: i32,
        spawned: bool,
    },
    /// The client got SIGINT or SIGTERM: finish the episode.
    Stop { signal: String },
    /// The client got a second signal while the episode was finishing:
    /// abort it at once, with no done.marker (as the standalone command
    /// does).
    Abort,
    /// The client's command ended (the client is its parent).
    Exited { exit: RemoteExit },
    /// The client's command could not `execve`.
    ExecFailed { error: String },
}

/// From the server to a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToClient {
    /// Tracing runs: let the held command `execve`.
    Release,
    /// A line the episode logged (a warning, progress): the client prints
    /// it on its stderr, as the standalone command would.
    Log { line: String },
    /// The episode is complete.
    Done { episode: PathBuf },
    /// The episode failed, or was never started.
    Error { error: String },
}

/// Writes one message as a line.
pub fn send<T: Serialize>(w: &mut impl io::Write, msg: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(msg).map_err(io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()
}

/// Reads one message; `None` at end of stream. A line over [`MAX_LINE`] or
/// one that is not a message is an error naming what is wrong.
pub fn recv<T: for<'de> Deserialize<'de>>(r: &mut impl io::BufRead) -> io::Result<Option<T>> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_LINE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a line of more than {MAX_LINE} bytes"),
        ));
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not a message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::{ExitStatus, ExitUsage};

    #[test]
    fn messages_round_trip_one_per_line() {
        let msgs = [
            ToServer::Trace {
                args: vec!["--duration".into(), "1".into()],
                cwd: "/lab".into(),
                pid: 42,
                spawned: true,
            },
            ToServer::Stop {
                signal: "SIGINT".into(),
            },
            ToServer::Abort,
            ToServer::Exited {
                exit: RemoteExit {
                    status: ExitStatus::Code(3),
                    usage: Some(ExitUsage {
                        cpu_ns: 1,
                        utime_ns: 1,
                        stime_ns: 0,
                        nvcsw: 2,
                        nivcsw: 3,
                        minflt: 4,
                        majflt: 5,
                    }),
                },
            },
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            send(&mut buf, m).unwrap();
        }
        assert_eq!(buf.iter().filter(|&&b| b == b'\n').count(), msgs.len());
        let mut r = io::Cursor::new(buf);
        for m in &msgs {
            assert_eq!(recv::<ToServer>(&mut r).unwrap().as_ref(), Some(m));
        }
        assert_eq!(recv::<ToServer>(&mut r).unwrap(), None);
    }

    #[test]
    fn bad_lines_are_errors_that_say_why() {
        let mut r = io::Cursor::new(b"{\"type\":\"launch\"}\n".to_vec());
        let e = recv::<ToServer>(&mut r).unwrap_err().to_string();
        assert!(e.contains("not a message"), "{e}");
        let mut long = vec![b'x'; MAX_LINE + 10];
        long.push(b'\n');
        let e = recv::<ToServer>(&mut io::Cursor::new(long))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than"), "{e}");
    }
}
