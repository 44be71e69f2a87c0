//! The packet capture the gateway test holds the gateway collector
//! against: Debian's `tcpdump`, installed by `cargo xtask test`
//! (xtask/src/capture.rs), which names it through [`TCPDUMP_ENV`].

use std::path::PathBuf;

/// Env var through which `cargo xtask test` names tcpdump.
pub const TCPDUMP_ENV: &str = "CIS490_TCPDUMP";

/// tcpdump: `$CIS490_TCPDUMP`, else `tcpdump` on the PATH (or in
/// /usr/bin, /usr/sbin); panics with what to do when there is none.
pub fn tcpdump() -> PathBuf {
    if let Some(p) = std::env::var_os(TCPDUMP_ENV) {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join("tcpdump"))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "tcpdump is missing: the gateway test captures the bridge with it; run the \
                 tests with `cargo xtask test` (it installs tcpdump with apt) or \
                 `apt-get install tcpdump`"
            )
        })
}
