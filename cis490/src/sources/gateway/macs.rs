//! The traced VM's NIC MAC addresses: given (`--gateway-mac`), or read from
//! QEMU's command line (`mac=` of its `-device`/`-net nic` options).

use std::fmt;

use anyhow::{Result, bail};

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl serde::Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    /// `aa:bb:cc:dd:ee:ff` (or with `-`), hex digits in either case.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a MAC address (want aa:bb:cc:dd:ee:ff)");
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut m = [0u8; 6];
        for (b, p) in m.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        Ok(Mac(m))
    }
}

/// Where the MAC addresses came from (meta.json).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MacOrigin {
    /// `--gateway-mac`.
    Cli,
    /// QEMU's `query-rx-filter` over QMP.
    Qmp,
    /// `mac=` in QEMU's command line.
    CommandLine,
    /// None known: every frame on the interface is counted.
    None,
}

/// The `mac=` values of a QEMU command line (bounded: at most `max`;
/// values that do not parse are skipped and counted).
pub fn from_command_line<S: AsRef<str>>(argv: &[S], max: usize) -> (Vec<Mac>, usize) {
    let mut macs = Vec::new();
    let mut bad = 0;
    for arg in argv {
        for opt in arg.as_ref().split(',') {
            if let Some(v) = opt.strip_prefix("mac=") {
                match v.parse::<Mac>() {
                    Ok(m) if !macs.contains(&m) && macs.len() < max => macs.push(m),
                    Ok(_) => {}
                    Err(_) => bad += 1,
                }
            }
        }
    }
    (macs, bad)
}

/// The VM's NIC addresses from QEMU's `query-rx-filter` over its QMP
/// socket, within `timeout` (the connection is closed again: QEMU serves one
/// client at a time, and the qmp source connects next).
pub async fn from_qmp(path: &std::path::Path, timeout: std::time::Duration) -> Result<Vec<Mac>> {
    let mut c = crate::sources::qmp::client::QmpClient::connect(path, timeout)
        .await
        .map_err(|e| anyhow::anyhow!("QMP {}: {e}", path.display()))?;
    let answer = c
        .execute("query-rx-filter", None, timeout)
        .await
        .map_err(|e| anyhow::anyhow!("QMP query-rx-filter: {e}"))?;
    from_rx_filter(&answer, MAX_MACS)
}

const MAX_MACS: usize = cis490_common::gateway::MAX_MACS as usize;

/// The `main-mac` of every NIC in a `query-rx-filter` answer (untrusted:
/// bounded by `max`, malformed entries skipped).
pub fn from_rx_filter(answer: &serde_json::Value, max: usize) -> Result<Vec<Mac>> {
    let Some(list) = answer.as_array() else {
        bail!("query-rx-filter did not return a list");
    };
    let mut macs = Vec::new();
    for nic in list.iter().take(1024) {
        if let Some(m) = nic
            .get("main-mac")
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse::<Mac>().ok())
            && !macs.contains(&m)
            && macs.len() < max
        {
            macs.push(m);
        }
    }
    Ok(macs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_print() {
        let m: Mac = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0xab, 0xcd, 0x0f]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!("52-54-00-ab-cd-0f".parse::<Mac>().unwrap(), m);
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:1",
            "5:54:00:ab:cd:0f",
            "zz:54:00:ab:cd:0f",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn command_line_macs() {
        let argv = [
            "qemu-system-x86_64",
            "-netdev",
            "tap,id=n0,ifname=tap0",
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
            "-device",
            "e1000,mac=bogus",
            "-nic",
            "tap,mac=52:54:00:12:34:57,model=virtio",
            "-device",
            "virtio-net-pci,mac=52:54:00:12:34:56",
        ];
        let (macs, bad) = from_command_line(&argv, 16);
        assert_eq!(
            macs.iter().map(Mac::to_string).collect::<Vec<_>>(),
            ["52:54:00:12:34:56", "52:54:00:12:34:57"]
        );
        assert_eq!(bad, 1);
        assert_eq!(from_command_line(&argv, 1).0.len(), 1);
    }

    #[test]
    fn rx_filter_macs() {
        let v = serde_json::json!([
            {"name": "net0", "main-mac": "52:54:00:12:34:56"},
            {"name": "net1", "main-mac": 5},
            {"name": "net2"}
        ]);
        assert_eq!(
            from_rx_filter(&v, 16).unwrap(),
            vec![Mac([0x52, 0x54, 0, 0x12, 0x34, 0x56])]
        );
        assert!(from_rx_filter(&serde_json::json!({}), 16).is_err());
    }

    #[tokio::test]
    async fn macs_from_a_qmp_server() {
        use crate::sources::qmp::client::fake::{err, greeting, ret, serve};
        let srv = serve(greeting(), |req| match req["execute"].as_str() {
            Some("query-rx-filter") => vec![ret(
                req,
                r#"[{"name": "net0", "main-mac": "52:54:00:12:34:56"}, {"name": "net1", "main-mac": "52:54:00:12:34:57"}]"#,
            )],
            _ => vec![err(req, "CommandNotFound", "no")],
        });
        let t = std::time::Duration::from_secs(5);
        let macs = from_qmp(&srv.path, t).await.unwrap();
        assert_eq!(
            macs.iter().map(Mac::to_string).collect::<Vec<_>>(),
            ["52:54:00:12:34:56", "52:54:00:12:34:57"]
        );
        // No socket: an error (the caller falls back to the command line).
        let gone = srv.path.with_file_name("none.sock");
        assert!(from_qmp(&gone, t).await.is_err());
    }
}
