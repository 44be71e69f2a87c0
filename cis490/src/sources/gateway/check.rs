//! `cis490 check`'s comparison of the gateway with the eBPF tap counters of
//! the same VM: the frames the VM writes into its tap are the frames it
//! sends onto the bridge, so where both vantages exist their totals agree,
//! up to the frames in flight between the two at the episode's ends (and
//! frames the gateway interface does not see: VM-to-VM frames bridged
//! between two ports of a bridge that is not promiscuous, which the check
//! then reports as a disagreement).

use crate::row::{Measures, SourceKind};

/// Allowed difference: this share of the larger total...
pub const RELATIVE: f64 = 0.02;
/// ...or at least this many frames...
pub const ABSOLUTE_FRAMES: u64 = 64;
/// ...or bytes (64 full-size frames).
pub const ABSOLUTE_BYTES: u64 = 64 * 1514;

/// Frames and bytes out of and into the VM, summed over an episode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frames {
    pub out_frames: u64,
    pub out_bytes: u64,
    pub in_frames: u64,
    pub in_bytes: u64,
}

/// Adds a row's frames: the gateway's `gw_*`, or the eBPF row's tap
/// interfaces (`net_by_if` without `sockets`; tx is what the VM sent).
/// `acc` stays `None` while no row had any (no tap, no gateway).
pub fn add_row(acc: &mut Option<Frames>, source: SourceKind, m: &Measures) {
    let f = match source {
        SourceKind::Gateway => {
            let g = &m.gw;
            match (
                g.gw_out_frames,
                g.gw_out_bytes,
                g.gw_in_frames,
                g.gw_in_bytes,
            ) {
                (Some(a), Some(b), Some(c), Some(d)) => Frames {
                    out_frames: a,
                    out_bytes: b,
                    in_frames: c,
                    in_bytes: d,
                },
                _ => return,
            }
        }
        SourceKind::Ebpf => {
            let Some(by_if) = &m.net_by_if else { return };
            let mut taps = by_if
                .iter()
                .filter(|(k, _)| k.as_str() != "sockets")
                .peekable();
            if taps.peek().is_none() {
                return;
            }
            taps.fold(Frames::default(), |a, (_, c)| Frames {
                out_frames: a.out_frames.saturating_add(c.tx_packets),
                out_bytes: a.out_bytes.saturating_add(c.tx_bytes),
                in_frames: a.in_frames.saturating_add(c.rx_packets),
                in_bytes: a.in_bytes.saturating_add(c.rx_bytes),
            })
        }
        _ => return,
    };
    let a = acc.get_or_insert_with(Frames::default);
    a.out_frames = a.out_frames.saturating_add(f.out_frames);
    a.out_bytes = a.out_bytes.saturating_add(f.out_bytes);
    a.in_frames = a.in_frames.saturating_add(f.in_frames);
    a.in_bytes = a.in_bytes.saturating_add(f.in_bytes);
}

/// The four comparisons: whether each passes, and what it says.
pub fn compare(taps: &Frames, gateway: &Frames) -> Vec<(bool, String)> {
    [
        (
            "frames out",
            taps.out_frames,
            gateway.out_frames,
            ABSOLUTE_FRAMES,
        ),
        (
            "bytes out",
            taps.out_bytes,
            gateway.out_bytes,
            ABSOLUTE_BYTES,
        ),
        (
            "frames in",
            taps.in_frames,
            gateway.in_frames,
            ABSOLUTE_FRAMES,
        ),
        ("bytes in", taps.in_bytes, gateway.in_bytes, ABSOLUTE_BYTES),
    ]
    .into_iter()
    .map(|(what, t, g, abs)| {
        let allowed = abs.max((t.max(g) as f64 * RELATIVE) as u64);
        (
            t.abs_diff(g) <= allowed,
            format!("{what}: ebpf taps {t} vs gateway {g} (allowed {allowed})"),
        )
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::NetCounters;

    #[test]
    fn taps_and_gateway_rows_add_up_and_compare() {
        let mut taps = None;
        let mut m = Measures::default();
        add_row(&mut taps, SourceKind::Ebpf, &m);
        assert_eq!(taps, None, "no net_by_if: nothing");
        let c = NetCounters {
            tx_bytes: 100_000,
            rx_bytes: 5_000,
            tx_packets: 1_000,
            rx_packets: 50,
        };
        m.set_net(Some(
            [("tap0".to_owned(), c), ("sockets".to_owned(), c)].into(),
        ));
        add_row(&mut taps, SourceKind::Ebpf, &m);
        add_row(&mut taps, SourceKind::Ebpf, &m);
        let taps = taps.unwrap();
        assert_eq!((taps.out_frames, taps.in_bytes), (2_000, 10_000));
        let mut gw = None;
        let mut g = Measures::default();
        g.gw.gw_out_frames = Some(2_000 + 64);
        g.gw.gw_out_bytes = Some(200_000);
        g.gw.gw_in_frames = Some(100);
        g.gw.gw_in_bytes = Some(10_000);
        add_row(&mut gw, SourceKind::Gateway, &g);
        let r = compare(&taps, &gw.unwrap());
        assert!(r.iter().all(|(ok, _)| *ok), "{r:?}");
        g.gw.gw_out_frames = Some(2_000 + 65);
        let mut gw = None;
        add_row(&mut gw, SourceKind::Gateway, &g);
        let r = compare(&taps, &gw.unwrap());
        assert!(!r[0].0 && r[1..].iter().all(|(ok, _)| *ok), "{r:?}");
        // Only the gateway and the eBPF taps take part.
        let mut none = None;
        add_row(&mut none, SourceKind::Proc, &m);
        assert_eq!(none, None);
    }
}
