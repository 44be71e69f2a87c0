//! The network probe family (programs in `cis490-ebpf/src/net.rs`): the
//! target's tap interfaces (by interface, in softirq context) and its own
//! IPv4/IPv6 sockets (in process context, Linux 6.3+).

use super::{Attacher, FamilyStatus, KernelFacts, OffsetSpec, ProbeKind::TpBtf, ProbeSpec};

pub const FAMILY: &str = "net";

pub const TAP_OFFSETS: &[OffsetSpec] = &[
    OffsetSpec {
        global: "SKB_LEN_OFFSET",
        ty: "sk_buff",
        path: "len",
    },
    OffsetSpec {
        global: "SKB_DATA_OFFSET",
        ty: "sk_buff",
        path: "data",
    },
    OffsetSpec {
        global: "SKB_HEAD_OFFSET",
        ty: "sk_buff",
        path: "head",
    },
    OffsetSpec {
        global: "SKB_MAC_HEADER_OFFSET",
        ty: "sk_buff",
        path: "mac_header",
    },
    OffsetSpec {
        global: "SKB_DEV_OFFSET",
        ty: "sk_buff",
        path: "dev",
    },
    OffsetSpec {
        global: "NETDEV_IFINDEX_OFFSET",
        ty: "net_device",
        path: "ifindex",
    },
    OffsetSpec {
        global: "NETDEV_NET_OFFSET",
        ty: "net_device",
        path: "nd_net.net",
    },
    OffsetSpec {
        global: "NET_INUM_OFFSET",
        ty: "net",
        path: "ns.inum",
    },
];
pub const SOCK_OFFSETS: &[OffsetSpec] = &[OffsetSpec {
    global: "SOCK_FAMILY_OFFSET",
    ty: "sock",
    path: "__sk_common.skc_family",
}];
pub const OFFSETS: &[OffsetSpec] = &{
    let mut all = [TAP_OFFSETS[0]; TAP_OFFSETS.len() + SOCK_OFFSETS.len()];
    let mut i = 0;
    while i < TAP_OFFSETS.len() {
        all[i] = TAP_OFFSETS[i];
        i += 1;
    }
    all[i] = SOCK_OFFSETS[0];
    all
};

const fn tp(program: &'static str) -> ProbeSpec {
    ProbeSpec {
        program,
        tracepoint: program,
        kind: TpBtf,
        required: false,
    }
}

pub(super) const TAPS: &[ProbeSpec] = &[tp("netif_receive_skb"), tp("net_dev_xmit")];
pub(super) const SOCKETS: &[ProbeSpec] = &[tp("sock_send_length"), tp("sock_recv_length")];

/// Which vantages can work on this kernel.
#[derive(Clone, Debug)]
pub struct NetPlan {
    pub taps: Result<(), String>,
    pub sockets: Result<(), String>,
}

pub fn plan(facts: &KernelFacts) -> NetPlan {
    let tracepoints =
        |specs: &[ProbeSpec]| match specs.iter().find(|s| !facts.has_tracepoint(s.tracepoint)) {
            Some(s) => Err(format!("this kernel has no {} tracepoint", s.tracepoint)),
            None => Ok(()),
        };
    NetPlan {
        taps: facts
            .have_offsets(TAP_OFFSETS)
            .and_then(|()| tracepoints(TAPS)),
        sockets: facts
            .have_offsets(SOCK_OFFSETS)
            .and_then(|()| tracepoints(SOCKETS)),
    }
}

/// Attaches one vantage; `Ok` when all its programs attached.
fn vantage(
    a: &mut Attacher<'_>,
    specs: &[ProbeSpec],
    plan: &Result<(), String>,
) -> Result<(), String> {
    match plan {
        Err(why) => {
            for s in specs {
                a.skip(FAMILY, s, why);
            }
            Err(why.clone())
        }
        Ok(()) => match specs.iter().filter(|s| !a.attach(FAMILY, s)).count() {
            0 => Ok(()),
            _ => Err(format!("{} did not attach", specs[0].program)),
        },
    }
}

pub fn attach(a: &mut Attacher<'_>, plan: &NetPlan) -> FamilyStatus {
    let taps = vantage(a, TAPS, &plan.taps);
    let sockets = vantage(a, SOCKETS, &plan.sockets);
    let path = match (&taps, &sockets) {
        (Ok(()), Ok(())) => Some("taps+sockets"),
        (Ok(()), Err(_)) => Some("taps"),
        (Err(_), Ok(())) => Some("sockets"),
        (Err(_), Err(_)) => None,
    };
    let note = [
        taps.err().map(|e| format!("taps: {e}")),
        sockets.err().map(|e| format!("sockets: {e}")),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>();
    FamilyStatus {
        family: FAMILY,
        active: path.is_some(),
        path,
        note: (!note.is_empty()).then(|| note.join("; ")),
    }
}

/// Whether the tap vantage attached.
pub fn taps_active(status: &FamilyStatus) -> bool {
    matches!(status.path, Some("taps" | "taps+sockets"))
}

/// Whether the socket vantage attached.
pub fn sockets_active(status: &FamilyStatus) -> bool {
    matches!(status.path, Some("sockets" | "taps+sockets"))
}
