//! What a real trace's meta.json says about the probes, summarised for
//! progress output and the run summaries of the host run
//! ([`crate::integration`]) and the VM runner ([`crate::vm`]).

use serde_json::Value;

/// What a real trace's meta.json says about the probes.
#[derive(Clone, Debug, Default)]
pub struct ProbeSummary {
    pub kernel: String,
    /// (tracepoint, kind: `tp_btf` or `tracepoint`), attached.
    pub attached: Vec<(String, String)>,
    /// (tracepoint, state, why), for probes that are missing or failed.
    pub broken: Vec<(String, String, String)>,
    /// (family, active, path, note).
    pub families: Vec<(String, bool, Option<String>, Option<String>)>,
}

impl ProbeSummary {
    pub fn from_meta(meta: &Value) -> Self {
        let s = |v: &Value| v.as_str().map(str::to_owned);
        let mut out = ProbeSummary {
            kernel: s(&meta["host"]["kernel_release"]).unwrap_or_default(),
            ..Self::default()
        };
        for p in meta["probes"].as_array().into_iter().flatten() {
            let tp = s(&p["tracepoint"]).unwrap_or_default();
            let kind = p["kind"].as_str();
            let (kind, name) = match (kind.and_then(|k| k.strip_prefix("trace_point:")), kind) {
                (Some(cat), _) => ("tracepoint", format!("{cat}:{tp}")),
                (None, Some("iter")) => ("iter", format!("iter/{tp}")),
                _ => ("tp_btf", tp),
            };
            match p["state"].as_str() {
                Some("attached") => out.attached.push((name, kind.to_owned())),
                Some(st @ ("missing" | "failed")) => {
                    out.broken
                        .push((name, st.to_owned(), s(&p["error"]).unwrap_or_default()))
                }
                _ => {}
            }
        }
        for f in meta["families"].as_array().into_iter().flatten() {
            out.families.push((
                s(&f["family"]).unwrap_or_default(),
                f["active"].as_bool().unwrap_or(false),
                s(&f["path"]),
                s(&f["note"]),
            ));
        }
        out
    }

    /// Each family's path: `sched tp_btf+sched_info`, `kvm off`.
    pub fn paths(&self) -> Vec<String> {
        self.families
            .iter()
            .map(|(f, active, path, _)| match (active, path) {
                (true, Some(p)) => format!("{f} {p}"),
                _ => format!("{f} off"),
            })
            .collect()
    }

    /// Every family that took a fallback path or is (partly) off, and why.
    pub fn fallbacks(&self) -> Vec<String> {
        self.families
            .iter()
            .filter_map(|(f, active, path, note)| {
                let fallback = path.as_deref() == Some("block_rq");
                (note.is_some() || fallback || !active).then(|| {
                    format!(
                        "{f}: {}{}",
                        if *active {
                            path.clone().unwrap_or_default()
                        } else {
                            "off".into()
                        },
                        note.as_ref().map(|n| format!(" ({n})")).unwrap_or_default()
                    )
                })
            })
            .collect()
    }

    pub fn attached_line(&self) -> String {
        let by = |kind: &str| {
            self.attached
                .iter()
                .filter(|(_, k)| k == kind)
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
        };
        let (btf, classic, iters) = (by("tp_btf"), by("tracepoint"), by("iter"));
        let mut s = format!(
            "{} attached: BTF raw tracepoints ({}): {}",
            self.attached.len(),
            btf.len(),
            btf.join(" ")
        );
        if !iters.is_empty() {
            s.push_str(&format!(
                "; BPF iterators ({}): {}",
                iters.len(),
                iters.join(" ")
            ));
        }
        if !classic.is_empty() {
            s.push_str(&format!(
                "; classic tracepoints ({}): {}",
                classic.len(),
                classic.join(" ")
            ));
        }
        s
    }

    /// Human-readable lines for progress output.
    pub fn lines(&self) -> Vec<String> {
        let mut v = vec![
            format!("probes: {}", self.attached_line()),
            format!("families: {}", self.paths().join(", ")),
        ];
        for f in self.fallbacks() {
            v.push(format!("fallback: {f}"));
        }
        for (n, st, why) in &self.broken {
            v.push(format!("not attached: {n}: {st}: {why}"));
        }
        v
    }

    pub fn json(&self) -> Value {
        serde_json::json!({
            "kernel": self.kernel,
            "attached": self.attached.iter().map(|(n, k)| serde_json::json!({"tracepoint": n, "kind": k})).collect::<Vec<_>>(),
            "not_attached": self.broken.iter().map(|(n, s, w)| serde_json::json!({"tracepoint": n, "state": s, "error": w})).collect::<Vec<_>>(),
            "families": self.families.iter().map(|(f, a, p, n)| serde_json::json!({"family": f, "active": a, "path": p, "note": n})).collect::<Vec<_>>(),
            "paths": self.paths(),
            "fallbacks": self.fallbacks(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_summary_names_paths_and_fallbacks() {
        let meta = serde_json::json!({
            "host": {"kernel_release": "6.1.0-56-amd64"},
            "probes": [
                {"tracepoint": "sched_switch", "kind": "tp_btf", "state": "attached"},
                {"tracepoint": "task", "kind": "iter", "state": "attached"},
                {"tracepoint": "kvm_exit", "kind": "trace_point:kvm", "state": "skipped"},
                {"tracepoint": "kvm_userspace_exit", "kind": "trace_point:kvm", "state": "attached"},
                {"tracepoint": "sock_send_length", "kind": "tp_btf", "state": "missing", "error": "no btf_trace_sock_send_length"},
            ],
            "families": [
                {"family": "sched", "active": true, "path": "tp_btf+sched_info", "note": null},
                {"family": "block", "active": true, "path": "block_rq", "note": null},
                {"family": "kvm", "active": false, "path": null, "note": "no kvm"},
            ],
        });
        let s = ProbeSummary::from_meta(&meta);
        assert_eq!(s.attached.len(), 3);
        assert_eq!(s.attached[1], ("iter/task".into(), "iter".into()));
        assert_eq!(s.attached[2].0, "kvm:kvm_userspace_exit");
        assert_eq!(
            s.paths(),
            ["sched tp_btf+sched_info", "block block_rq", "kvm off"]
        );
        assert_eq!(s.fallbacks(), ["block: block_rq", "kvm: off (no kvm)"]);
        assert!(
            s.attached_line()
                .contains("classic tracepoints (1): kvm:kvm_userspace_exit")
        );
        assert!(s.attached_line().contains("BPF iterators (1): iter/task"));
        assert_eq!(s.broken.len(), 1);
    }
}
