//! `/proc/PID/net/dev`: the interface counters of the target's network
//! namespace (the same counters as `/sys/class/net/<if>/statistics`, read
//! in the right namespace). For a tap, the host's *rx* is what the target
//! sent: the oracle reports them from the target's side.

use std::collections::BTreeMap;

use crate::row::NetCounters;

/// Interface -> counters from the target's side (tx: frames it wrote into
/// the tap, which the host received).
pub fn parse_net_dev(s: &str) -> BTreeMap<String, NetCounters> {
    let mut out = BTreeMap::new();
    for line in s.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let v: Vec<u64> = rest
            .split_ascii_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        if v.len() < 10 {
            continue;
        }
        // Receive: bytes packets errs drop fifo frame compressed multicast;
        // transmit: bytes packets ...
        out.insert(
            name.trim().to_owned(),
            NetCounters {
                tx_bytes: v[0],
                tx_packets: v[1],
                rx_bytes: v[8],
                rx_packets: v[9],
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_directions() {
        let s = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0
  tap0: 1514000    1000    0    0    0     0          0         0    64000      500    0    0    0     0       0          0
";
        let m = parse_net_dev(s);
        assert_eq!(
            m["tap0"],
            NetCounters {
                tx_bytes: 1_514_000,
                tx_packets: 1000,
                rx_bytes: 64_000,
                rx_packets: 500
            }
        );
        assert_eq!(m.len(), 2);
    }
}
