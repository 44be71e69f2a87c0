//! Privilege check before anything is loaded or written: loading and
//! attaching tracing programs needs CAP_BPF and CAP_PERFMON (kernel >= 5.8),
//! or CAP_SYS_ADMIN.

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The effective capability set of this process as a 64-bit mask.
fn effective_caps() -> std::io::Result<u64> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a v3 header writes two CapData structs.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(data[0].effective as u64 | (data[1].effective as u64) << 32)
}

/// Which of the needed capabilities a mask lacks (empty when it is enough).
pub fn missing(mask: u64) -> Vec<&'static str> {
    let has = |cap: u32| mask & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Vec::new();
    }
    let mut out = Vec::new();
    if !has(CAP_BPF) {
        out.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) {
        out.push("CAP_PERFMON");
    }
    out
}

/// Fails with a one-line message naming the missing capabilities.
pub fn require_tracing_caps() -> anyhow::Result<()> {
    let mask = effective_caps().map_err(|e| anyhow::anyhow!("cannot read capabilities: {e}"))?;
    let lacking = missing(mask);
    if lacking.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "cis490 trace needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) to load eBPF programs; \
         this process lacks {}: run it as root (sudo cis490 trace ...)",
        lacking.join(" and ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_is_missing() {
        assert_eq!(missing(0), ["CAP_BPF", "CAP_PERFMON"]);
        assert_eq!(missing(1 << CAP_BPF), ["CAP_PERFMON"]);
        assert!(missing(1 << CAP_BPF | 1 << CAP_PERFMON).is_empty());
        assert!(missing(1 << CAP_SYS_ADMIN).is_empty());
    }

    #[test]
    fn reads_this_process_caps() {
        // Whatever we run as, the syscall works and root has everything.
        let mask = effective_caps().unwrap();
        if unsafe { libc::geteuid() } == 0 {
            assert!(missing(mask).is_empty(), "root lacks caps: {mask:#x}");
        }
    }
}
