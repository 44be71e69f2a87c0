//! Phase labels: fixed ones from the command line and live ones over the
//! control socket, on the shared clock; `stop` ends a complete episode.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    time::Duration,
};

use cis490_tests::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn labels_from_the_command_line_and_the_control_socket() {
    require_root();
    let dir = scratch("control");
    let sock = dir.join("ctl.sock");
    let trace = start_trace(
        &dir,
        &[
            "--label",
            "boot@0",
            "--label",
            "idle@0.4",
            "--control",
            sock.to_str().unwrap(),
            "--",
            "sleep",
            "30",
        ],
    );
    wait_for_file(&sock, T);
    std::thread::sleep(Duration::from_millis(600));
    let stream = UnixStream::connect(&sock).unwrap();
    stream.set_read_timeout(Some(T)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut ask = |line: &str| {
        (&stream).write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        reply.trim().to_owned()
    };
    let detonate = ask("label detonate");
    assert!(detonate.starts_with("ok "), "{detonate}");
    assert!(ask("ping").starts_with("ok "));
    assert!(ask("label two words").starts_with("error "));
    assert!(ask("reboot").starts_with("error unknown command"));
    assert!(ask("stop").starts_with("ok "));
    let ep = Episode::from_output(&wait_output(trace, T));
    assert!(ep.is_done());
    assert_eq!(ep.meta["end_reason"], "control");
    assert!(!sock.exists(), "the control socket is removed at the end");

    let labels: Vec<serde_json::Value> = std::fs::read_to_string(ep.dir.join("labels.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = labels
        .iter()
        .map(|l| l["label"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["boot", "idle", "detonate"]);
    assert_eq!(labels[2]["via"], "control");
    // The reply carried the label's own clock.
    assert_eq!(format!("ok {}", labels[2]["t_mono_ns"]), detonate);
    // Timed labels fall where they were asked (+- a bucket), on the rows'
    // clock: idle is 400 ms after the start.
    let start = ep.meta["start"]["t_mono_ns"].as_u64().unwrap();
    let idle = labels[1]["t_mono_ns"].as_u64().unwrap() - start;
    assert!(
        (400_000_000..600_000_000).contains(&idle),
        "idle at +{idle} ns"
    );
    for l in &labels {
        let seq = l["seq"].as_u64().unwrap() as usize;
        let row = &ep.rows("ebpf")[seq];
        let end = row["t_mono_ns"].as_u64().unwrap();
        let begin = end - row["interval_ns"].as_u64().unwrap();
        let t = l["t_mono_ns"].as_u64().unwrap();
        assert!(t > begin && t <= end, "label {l} not in bucket {seq}");
    }
    assert_eq!(ep.meta["labels"], 3);
}

#[test]
fn a_bad_label_is_a_clear_error() {
    require_root();
    let dir = scratch("control-err");
    let out = run_with_timeout(
        trace_cmd(&dir).args(["--label", "detonate", "--", "true"]),
        T,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not NAME@SECONDS"), "{stderr}");
}

/// Sends `stop` on `sock` from a forked child that drops to user `uid`
/// first; what happened: "ok", "error" (the tracer answered an error),
/// "refused" (connect denied: EACCES or EPERM), "closed" (no answer),
/// "connect failed" (any other connect error, or refused for a second).
fn stop_as(sock: &std::path::Path, uid: u32) -> &'static str {
    use std::os::unix::ffi::OsStrExt as _;
    let path = sock.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid; the path fits (asserted).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    assert!(path.len() < addr.sun_path.len());
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    // SAFETY: the child only makes system calls (no allocation, no locks)
    // and ends with _exit; the parent waits for it.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        unsafe {
            if libc::setgid(uid) != 0 || libc::setuid(uid) != 0 {
                libc::_exit(9);
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            // Denied (EACCES, EPERM) is the answer; a listener that is
            // momentarily not accepting (ECONNREFUSED, EAGAIN: seen once in
            // an emulated guest) is tried again for up to a second.
            let mut tries = 0;
            let fd = loop {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if libc::connect(fd, (&raw const addr).cast(), len) == 0 {
                    break fd;
                }
                let e = *libc::__errno_location();
                libc::close(fd);
                if e == libc::EACCES || e == libc::EPERM {
                    libc::_exit(2);
                }
                tries += 1;
                if tries > 20 || (e != libc::ECONNREFUSED && e != libc::EAGAIN) {
                    libc::_exit(4);
                }
                libc::usleep(50_000);
            };
            let tv = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            libc::write(fd, b"stop\n".as_ptr().cast(), 5);
            let mut buf = [0u8; 64];
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            libc::_exit(if n >= 2 && &buf[..2] == b"ok" {
                0
            } else if n > 0 {
                1
            } else {
                3
            });
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    match libc::WEXITSTATUS(status) {
        0 => "ok",
        1 => "error",
        2 => "refused",
        3 => "closed",
        4 => "connect failed",
        c => panic!("control client child failed ({c})"),
    }
}

#[test]
fn only_root_and_the_tracer_user_may_use_the_control_socket() {
    require_root();
    let dir = scratch("control-perm");
    // Another user must be able to reach the directory to try.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let sock = dir.join("ctl.sock");
    // Under umask 0 the socket would be 0777 if cis490 left its mode to
    // the umask.
    let trace = {
        use std::os::unix::process::CommandExt as _;
        let mut c = trace_cmd(&dir);
        c.args(["--control", sock.to_str().unwrap(), "--duration", "20"])
            .args(["--", "sleep", "30"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        // SAFETY: umask is async-signal-safe.
        unsafe {
            c.pre_exec(|| {
                libc::umask(0);
                Ok(())
            })
        };
        c.spawn().unwrap()
    };
    wait_for_file(&sock, T);
    let mode = {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode, 0o600, "control socket mode {mode:o} under umask 0");
    // Mode 0600 keeps other users from connecting at all; the peer check
    // stands behind it (the socket's mode is not honoured everywhere).
    assert_eq!(
        stop_as(&sock, 65534),
        "refused",
        "mode 0600 let another user in"
    );
    // The peer check behind the mode: with the socket opened up by hand,
    // another user connects and is answered with an error, not obeyed.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    assert_eq!(stop_as(&sock, 65534), "error", "another user's stop");
    std::thread::sleep(Duration::from_millis(300));
    assert!(sock.exists(), "the trace ended on another user's stop");
    // Root's stop is taken.
    assert_eq!(stop_as(&sock, 0), "ok", "root's stop");
    let ep = Episode::from_output(&wait_output(trace, T));
    assert!(ep.is_done());
    assert_eq!(ep.meta["end_reason"], "control");
}

#[test]
fn a_control_path_others_could_replace_is_refused_before_any_episode() {
    require_root();
    let dir = scratch("control-open");
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let out = run_with_timeout(
        trace_cmd(&dir)
            .args(["--control", open.join("c.sock").to_str().unwrap()])
            .args(["--", "true"]),
        T,
    );
    assert!(!out.status.success());
    let err = one_line_error(&out, &dir.join("data"));
    assert!(err.contains("writable by other users"), "{err}");
    assert!(
        !dir.join("data/episodes").exists()
            || std::fs::read_dir(dir.join("data/episodes"))
                .unwrap()
                .count()
                == 0,
        "an episode directory was made for a refused --control"
    );
}
