//! The guest source against a peer on a real unix socket (this test plays
//! QEMU's chardev), and its delta rules on hand-made lines.

use std::{io::Write as _, os::unix::net::UnixListener, time::Duration};

use cis490_agent::protocol::{AgentLine, NetIf, VERSION};

use super::*;

fn line(seq: u64, user_ns: u64, tx: u64) -> AgentLine {
    AgentLine {
        v: VERSION,
        seq,
        boot_id: "b1".into(),
        cpu: CpuTimes {
            user_ns,
            ..Default::default()
        },
        net: [(
            "eth0".to_owned(),
            NetIf {
                tx_bytes: tx,
                ..Default::default()
            },
        )]
        .into(),
        ..Default::default()
    }
}

fn arrived(l: AgentLine, s: u64) -> Arrived {
    Arrived {
        at: ClockPair {
            mono_ns: s * 1_000_000_000,
            wall_ns: 0,
        },
        line: l,
        bytes: 100,
    }
}

#[test]
fn deltas_reboots_and_untrusted_counters() {
    let p = Prev::of(&arrived(line(0, 100, 1000), 1));
    let Ok(Step::Delta(d)) = step(&p, &arrived(line(1, 150, 1500), 2)) else {
        panic!()
    };
    assert_eq!((d.cpu_user, d.net_tx), (50, 500));
    let mut back = line(1, 90, 1500);
    assert_eq!(
        step(&p, &arrived(back.clone(), 2)).unwrap_err().0,
        BadReason::CounterWentBack
    );
    back.boot_id = "b2".into();
    assert_eq!(step(&p, &arrived(back, 2)), Ok(Step::Reboot));
    // 11 s of host time (1 s + the slack) allow 11 * 64 GiB.
    let ok = 1000 + 11 * (64u64 << 30);
    assert!(step(&p, &arrived(line(1, 100, ok), 2)).is_ok());
    assert_eq!(
        step(&p, &arrived(line(1, 100, ok + 1), 2)).unwrap_err().0,
        BadReason::Absurd
    );
    assert_eq!(
        step(
            &p,
            &arrived(line(1, 100 + 11 * 1024 * 1_000_000_000 + 1, 1000), 2)
        )
        .unwrap_err()
        .0,
        BadReason::Absurd
    );
    // A new interface starts from its own counters.
    let mut more = line(1, 100, 1000);
    more.net.insert(
        "eth1".into(),
        NetIf {
            tx_bytes: 7,
            ..Default::default()
        },
    );
    assert_eq!(
        step(&p, &arrived(more, 2)),
        Ok(Step::Delta(Delta::default()))
    );
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..200 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn a_peer_on_the_socket_baseline_deltas_bad_lines_and_a_hang_up() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ga.sock");
    // The source starts before the socket exists (QEMU not up yet).
    let mut src = GuestSource::start(&sock, Duration::from_millis(100)).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let listener = UnixListener::bind(&sock).unwrap();
    let (mut peer, _) = listener.accept().unwrap();
    let mut hello = [0u8; 20];
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = std::io::Read::read(&mut peer, &mut hello).unwrap();
    assert_eq!(&hello[..n], b"{\"interval_ms\":100}\n");
    let send = |p: &mut std::os::unix::net::UnixStream, l: &AgentLine| {
        let mut t = serde_json::to_vec(l).unwrap();
        t.push(b'\n');
        p.write_all(&t).unwrap();
    };
    send(&mut peer, &line(0, 100, 1000));
    peer.write_all(b"{not json\n[1,2]\n").unwrap();
    let mut first = line(1, 150, 1500);
    first.execs.push(cis490_agent::protocol::Exec {
        pid: 9,
        ppid: 1,
        comm: "sh".into(),
    });
    send(&mut peer, &first);
    let lines = |s: &GuestSource| s.reader.shared.lock().unwrap().arrived.len();
    wait_for("two lines", || lines(&src) == 2);
    let m = src.sample(ClockPair::now()).guest;
    assert_eq!(m.guest_lines, Some(2));
    assert_eq!(m.guest_bad_lines, Some(2));
    assert_eq!(m.guest_skipped_lines, Some(0));
    assert_eq!(m.guest_cpu_user_ns, Some(50));
    assert_eq!(m.guest_net_tx_bytes, Some(500));
    assert_eq!(m.guest_execs, Some(1));
    let names: Vec<String> = src
        .take_events()
        .iter()
        .map(|(_, e)| {
            serde_json::to_value(e).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        names,
        [
            "guest_connected",
            "guest_bad_line",
            "guest_bad_line",
            "guest_exec"
        ]
    );
    // Nothing arrives: null fields, zero counts.
    let m = src.sample(ClockPair::now()).guest;
    assert_eq!(
        (m.guest_lines, m.guest_cpu_user_ns, m.guest_procs),
        (Some(0), None, None)
    );
    // A hang-up in the middle of a line: counted as cut, then reconnected.
    peer.write_all(b"{\"v\":1,").unwrap();
    drop(peer);
    let (mut peer, _) = listener.accept().unwrap();
    send(&mut peer, &line(2, 170, 1600));
    wait_for("the line after the reconnect", || lines(&src) == 1);
    let m = src.sample(ClockPair::now()).guest;
    assert_eq!((m.guest_lines, m.guest_bad_lines), (Some(1), Some(1)));
    assert_eq!(
        m.guest_cpu_user_ns,
        Some(20),
        "deltas continue across a reconnect"
    );
    let names: Vec<String> = src
        .take_events()
        .iter()
        .map(|(_, e)| {
            serde_json::to_value(e).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        names,
        ["guest_bad_line", "guest_disconnected", "guest_connected"]
    );
    src.stop(ClockPair::now());
    let info = src.info();
    assert_eq!(
        (info.lines, info.reader.bad_lines, info.reader.connections),
        (3, 3, 2)
    );
}
