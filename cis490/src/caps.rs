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

/// The inode number of the kernel's initial PID namespace
/// (`PROC_PID_INIT_INO`, fixed in the kernel's ABI).
const INIT_PID_NS_INO: u64 = 0xEFFF_FFFC;

/// Fails with one line when the tracer runs in a PID namespace of its own
/// (a container without the host's PID namespace): the probes see the
/// kernel's own thread ids, which the pids the tracer is given there are
/// not, so every eBPF field would be wrong (`0`, or `null` with a
/// misleading note) without any sign.
pub fn require_init_pid_namespace() -> anyhow::Result<()> {
    let link = match std::fs::read_link("/proc/self/ns/pid") {
        Ok(l) => l,
        // No namespace files (very old kernels): nothing to compare.
        Err(e) => {
            log::debug!("cannot read /proc/self/ns/pid: {e}");
            return Ok(());
        }
    };
    let text = link.to_string_lossy();
    let ino = text
        .strip_prefix("pid:[")
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|n| n.parse::<u64>().ok());
    match ino {
        Some(INIT_PID_NS_INO) | None => Ok(()),
        Some(_) => anyhow::bail!(
            "cis490 runs in a PID namespace of its own ({text}), where process ids are not \
             the kernel's, so its probes could not find the target: run it in the host's PID \
             namespace (outside the container, or a container started with --pid=host)"
        ),
    }
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
