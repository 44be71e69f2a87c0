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
