//! KVM against ground truth: a tiny VMM whose real-mode guest makes a known
//! number of port I/O exits to it, then halts.

use std::time::Duration;

use cis490_tests::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn reasons(ep: &Episode, field: &str) -> serde_json::Map<String, Value> {
    let mut out = serde_json::Map::new();
    for r in ep.rows("ebpf") {
        for (k, v) in r[field].as_object().into_iter().flatten() {
            let n = out.get(k).and_then(Value::as_u64).unwrap_or(0) + v.as_u64().unwrap();
            out.insert(k.clone(), n.into());
        }
    }
    out
}

#[test]
fn kvm_exits_match_what_the_vmm_saw() {
    require_root();
    let dir = scratch("kvm");
    let out_json = dir.join("kvm.json");
    let out = run_with_timeout(
        trace_cmd(&dir)
            .arg("--")
            .arg(bin("cis490-workload"))
            .args(["kvm", "--io-exits", "2000", "--out"])
            .arg(&out_json),
        T,
    );
    let ep = Episode::from_output(&out);
    let truth = report(&out_json);
    let runs = truth["kvm_runs"].as_u64().unwrap();
    assert_eq!(truth["io_exits"].as_u64(), Some(2000));
    let family = ep.meta["families"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["family"] == "kvm")
        .unwrap()
        .clone();
    eprintln!("kvm family: {family}");

    // Every return of KVM_RUN to the VMM, by reason, exactly.
    assert_eq!(ep.sum("ebpf", "kvm_userspace_exits"), runs);
    let user = reasons(&ep, "kvm_userspace_exit_reasons");
    assert_eq!(
        user.get("KVM_EXIT_IO").and_then(Value::as_u64),
        Some(2000),
        "{user:?}"
    );
    assert_eq!(
        user.get("KVM_EXIT_HLT").and_then(Value::as_u64),
        Some(1),
        "{user:?}"
    );

    // Hardware exits: where the backend reports them, at least one per
    // return to userspace; elsewhere (kvm_pvm here) null, with the reason.
    let path = family["path"].as_str().unwrap();
    if path.contains("kvm_exit+") {
        assert!(ep.sum("ebpf", "kvm_exits") >= runs);
        assert!(reasons(&ep, "kvm_exit_reasons").contains_key("IO_INSTRUCTION"));
    } else {
        assert!(ep.rows("ebpf").iter().all(|r| r["kvm_exits"].is_null()));
        assert!(
            family["note"].as_str().unwrap().contains("kvm_exit"),
            "{family}"
        );
    }
    // The oracle cannot see VM exits.
    assert!(
        ep.rows("proc")
            .iter()
            .all(|r| r["kvm_userspace_exits"].is_null())
    );

    // A target without a VM: null, not 0.
    let out = run_with_timeout(trace_cmd(&dir).args(["--", "sleep", "0.3"]), T);
    let ep = Episode::from_output(&out);
    assert!(
        ep.rows("ebpf")
            .iter()
            .all(|r| r["kvm_userspace_exits"].is_null() && r["kvm_exits"].is_null())
    );
}
