//! Bad input: a clear one-line error on stderr, a non-zero exit, and no
//! done.marker anywhere.

use std::{fs, path::Path, time::Duration};

use cis490_tests::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn missing_pid() {
    require_root();
    let dir = scratch("err-pid");
    let out = run_with_timeout(trace_cmd(&dir).args(["--target-pid", "4194305"]), T);
    assert_eq!(
        one_line_error(&out, &dir.join("data")),
        "error: no process with pid 4194305"
    );
    assert!(
        !dir.join("data").exists(),
        "an episode directory was created for a bad pid"
    );
}

#[test]
fn command_that_cannot_start() {
    require_root();
    let dir = scratch("err-cmd");
    let out = run_with_timeout(
        trace_cmd(&dir).args(["--", "cis490-no-such-command", "x"]),
        T,
    );
    assert_eq!(
        one_line_error(&out, &dir.join("data")),
        "error: cannot start 'cis490-no-such-command': command not found in PATH"
    );
    // Found but not executable by exec: the error comes from the child.
    let script = dir.join("bad-interpreter");
    fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = run_with_timeout(trace_cmd(&dir).arg("--").arg(&script), T);
    let line = one_line_error(&out, &dir.join("data"));
    assert!(
        line.starts_with("error: cannot start '") && line.contains("No such file"),
        "{line}"
    );
    // That one failed after the episode directory existed: it says so.
    let ep = fs::read_dir(dir.join("data/episodes"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let meta: serde_json::Value =
        serde_json::from_slice(&fs::read(ep.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["status"], "failed");
    assert!(meta["error"].as_str().unwrap().contains("cannot start"));
}

#[test]
fn non_root_is_told_which_capabilities() {
    require_root();
    let dir = scratch("err-caps");
    fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    // setpriv (util-linux) drops to nobody; changing uid clears the capabilities.
    let out = run_with_timeout(
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin("cis490"))
            .args(["trace", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--", "true"]),
        T,
    );
    let line = one_line_error(&out, &dir.join("data"));
    assert!(
        line.contains("CAP_BPF") && line.contains("CAP_PERFMON") && line.contains("root"),
        "{line}"
    );
}

#[test]
fn unwritable_data_dir() {
    require_root();
    let dir = scratch("err-data");
    let file = dir.join("a-file");
    fs::write(&file, b"").unwrap();
    let out = run_with_timeout(
        std::process::Command::new(bin("cis490"))
            .arg("trace")
            .arg("--data-dir")
            .arg(file.join("sub"))
            .args(["--", "true"]),
        T,
    );
    let line = one_line_error(&out, &file);
    assert!(
        line.starts_with("error: cannot create episode directory"),
        "{line}"
    );
}

/// Writes a minimal valid BTF blob holding only `int`: a "kernel" without
/// task_struct or any tracepoint.
fn tiny_btf(path: &Path) {
    let strings = b"\0int\0";
    let mut types = Vec::new();
    types.extend_from_slice(&1u32.to_le_bytes()); // name_off -> "int"
    types.extend_from_slice(&(1u32 << 24).to_le_bytes()); // kind INT, vlen 0
    types.extend_from_slice(&4u32.to_le_bytes()); // size
    types.extend_from_slice(&(32u32 | (1 << 24)).to_le_bytes()); // 32 bits, signed
    let mut blob = Vec::new();
    blob.extend_from_slice(&0xEB9F_u16.to_le_bytes());
    blob.push(1); // version
    blob.push(0); // flags
    blob.extend_from_slice(&24u32.to_le_bytes()); // hdr_len
    blob.extend_from_slice(&0u32.to_le_bytes()); // type_off
    blob.extend_from_slice(&(types.len() as u32).to_le_bytes());
    blob.extend_from_slice(&(types.len() as u32).to_le_bytes()); // str_off
    blob.extend_from_slice(&(strings.len() as u32).to_le_bytes());
    blob.extend_from_slice(&types);
    blob.extend_from_slice(strings);
    fs::write(path, blob).unwrap();
}

#[test]
fn kernel_without_btf_or_tracepoints() {
    require_root();
    let dir = scratch("err-btf");
    let out = run_with_timeout(
        trace_cmd(&dir).args(["--btf", "/nonexistent/vmlinux", "--", "true"]),
        T,
    );
    let line = one_line_error(&out, &dir.join("data"));
    assert!(
        line.contains("CONFIG_DEBUG_INFO_BTF") && line.contains("/nonexistent/vmlinux"),
        "{line}"
    );

    let btf = dir.join("vmlinux-without-tracepoints");
    tiny_btf(&btf);
    let out = run_with_timeout(
        trace_cmd(&dir).arg("--btf").arg(&btf).args(["--", "true"]),
        T,
    );
    let line = one_line_error(&out, &dir.join("data"));
    assert!(
        line.starts_with(
            "error: this kernel lacks the tracepoints cis490 needs: sched_switch, sched_wakeup"
        ),
        "{line}"
    );
}

#[test]
fn bad_arguments() {
    require_root();
    let dir = scratch("err-args");
    for (args, says) in [
        (
            &["--interval-ms", "0", "--", "true"][..],
            "--interval-ms must be at least 1",
        ),
        (
            &["--duration", "0", "--", "true"],
            "must be more than 0 seconds",
        ),
        (
            &["--sources", "ebpf,pcap", "--", "true"],
            "unknown source 'pcap'",
        ),
        (&[][..], "give exactly one target"),
    ] {
        let out = run_with_timeout(trace_cmd(&dir).args(args), T);
        let line = one_line_error(&out, &dir.join("data"));
        eprintln!("{args:?}: {line}");
        assert!(line.contains(says), "{args:?}: {line}");
    }
    // What would have been half-done silently before: a QMP source with no
    // socket (all-null rows), a label after the end (never written).
    for (args, says) in [
        (
            &["--sources", "ebpf,qmp", "--", "true"][..],
            "give --qmp SOCKET",
        ),
        (
            &["--label", "detonate@100", "--duration", "1", "--", "true"][..],
            "comes after --duration",
        ),
        (
            &["--episode-file", "/nonexistent/dir/ep", "--", "true"][..],
            "the directory /nonexistent/dir does not exist",
        ),
        (
            &["--episode-file", "/tmp", "--", "true"][..],
            "is a directory",
        ),
    ] {
        let out = run_with_timeout(default_trace_cmd(&dir).args(args), T);
        let line = one_line_error(&out, &dir.join("data"));
        assert!(line.contains(says), "{args:?}: {line}");
    }
}

/// A relative --data-dir: the episode directory on stdout and in meta.json
/// is absolute, and the working directory is recorded.
#[test]
fn a_relative_data_dir_gives_absolute_paths() {
    require_root();
    let dir = scratch("err-reldir");
    let out = run_with_timeout(
        std::process::Command::new(bin("cis490"))
            .current_dir(&dir)
            .args(["trace", "--data-dir", "rel", "--progress-secs", "0"])
            .args(["--sources", "proc", "--duration", "0.3", "--", "sleep", "1"]),
        T,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap();
    assert!(last.starts_with('/'), "episode path not absolute: {last}");
    assert!(
        std::path::Path::new(last).starts_with(dir.join("rel/episodes")),
        "{last}"
    );
    let meta = read_meta(std::path::Path::new(last));
    assert_eq!(
        meta["working_directory"].as_str().unwrap(),
        dir.to_str().unwrap()
    );
}

/// Inside a PID namespace of its own (a container), the pids cis490 is
/// given are not the kernel's: it refuses with one line instead of writing
/// rows of zeros and nulls.
#[test]
fn a_tracer_in_its_own_pid_namespace_refuses() {
    require_root();
    let dir = scratch("err-pidns");
    let unshare = which_unshare();
    let mut cmd = std::process::Command::new(unshare);
    cmd.args(["--pid", "--fork", "--mount-proc"])
        .arg(bin("cis490"))
        .arg("trace")
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--progress-secs", "0", "--sources", "ebpf", "--", "true"]);
    let out = run_with_timeout(&mut cmd, T);
    let line = one_line_error(&out, &dir.join("data"));
    assert!(line.contains("PID namespace of its own"), "{line}");
}

/// `unshare` (util-linux, or busybox's applet in the VMs).
fn which_unshare() -> std::path::PathBuf {
    for p in ["/usr/bin/unshare", "/bin/unshare", "/usr/sbin/unshare"] {
        if std::path::Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("no unshare binary: this test needs util-linux's (or busybox's) unshare");
}

/// A mistyped --qmp path is said at once (not after QMP's 30 s window), with
/// its cause once, and ends in a `qmp_error` event and meta.json's
/// `qmp.error`.
#[test]
fn a_mistyped_qmp_path_is_said_at_once_with_its_cause_once() {
    require_root();
    let dir = scratch("err-qmp-path");
    let out = run_with_timeout(
        default_trace_cmd(&dir)
            .args(["--qmp", "/nonexistent/qmp.sock", "--duration", "1"])
            .args(["--", "sleep", "5"]),
        T,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("/nonexistent/qmp.sock"))
        .collect();
    assert!(!said.is_empty(), "the bad path was never named:\n{stderr}");
    let first = said[0];
    assert!(first.contains("nothing at that path"), "{first}");
    assert_eq!(
        first.matches("No such file or directory").count(),
        1,
        "the cause twice: {first}"
    );
    let ep = Episode::from_output(&out);
    assert!(ep.events.iter().any(|e| e.get("qmp_error").is_some()));
    assert!(ep.meta["qmp"]["error"].is_string(), "{}", ep.meta["qmp"]);
    // Every bucket said so, and check fails the episode, naming why.
    let rows = ep.rows("qmp").len() as u64;
    assert!(rows > 0);
    assert_eq!(ep.meta["qmp"]["buckets_without_data"].as_u64(), Some(rows));
    assert!(
        stderr.contains(&format!("QMP: {rows} of {rows} buckets have no QMP data")),
        "{stderr}"
    );
    assert_check_fails_qmp_never_connected(&ep.dir);
}
