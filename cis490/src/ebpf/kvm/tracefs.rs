//! tracefs, for the classic tracepoints (`kvm:kvm_exit`): found where it is
//! mounted, or mounted at `/sys/kernel/tracing` (a fresh boot here has it
//! unmounted) in a mount namespace of the tracer's own, so the mount goes
//! away with the tracer however it ends (SIGKILL included) and nobody else
//! ever sees it.

use std::path::{Path, PathBuf};

const MOUNTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

fn looks_mounted(p: &Path) -> bool {
    p.join("events").is_dir()
}

/// Where tracefs is, mounting it if needed; `Err` says why it is not there.
/// The second value says whether this call mounted it.
///
/// The mount is made in a new mount namespace of the calling thread (the
/// tracer's main thread; threads it starts later inherit it), with every
/// mount in it private so nothing propagates back. The kernel drops the
/// namespace, and the mount with it, when the tracer exits. Processes forked
/// before (a spawned command) stay where they were. The price: mounts made
/// elsewhere after this point are not seen by the tracer.
pub fn ensure() -> Result<(PathBuf, bool), String> {
    let target = Path::new(MOUNTS[0]);
    if looks_mounted(target) {
        return Ok((target.to_path_buf(), false));
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    // SAFETY: unshare(2) and mount(2) with NUL-terminated strings; they
    // change only this thread's mount namespace.
    let private = unsafe {
        libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::mount(
                std::ptr::null(),
                c("/").as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
    };
    if !private {
        return Err(format!(
            "tracefs is not mounted and no private mount namespace could be made to mount it in: {}",
            std::io::Error::last_os_error()
        ));
    }
    // Where debugfs is mounted, looking into its tracing/ automounts tracefs:
    // only now, in the private namespace.
    let debug = Path::new(MOUNTS[1]);
    if looks_mounted(debug) {
        return Ok((debug.to_path_buf(), false));
    }
    let (src, dir, fstype) = (c("nodev"), c(MOUNTS[0]), c("tracefs"));
    // SAFETY: mount(2) with NUL-terminated strings and no data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dir.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "tracefs is not mounted and mounting it at {} failed: {}",
            MOUNTS[0],
            std::io::Error::last_os_error()
        ));
    }
    if !looks_mounted(target) {
        return Err(format!(
            "mounted tracefs at {} but it has no events/",
            MOUNTS[0]
        ));
    }
    log::info!(
        "mounted tracefs at {} (in the tracer's own mount namespace)",
        MOUNTS[0]
    );
    Ok((target.to_path_buf(), true))
}

/// The byte offset of `field` in a tracepoint's `format` file.
pub fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()?;
        if name != field {
            return None;
        }
        rest.split(';')
            .find_map(|kv| kv.trim().strip_prefix("offset:"))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KVM_EXIT: &str = "name: kvm_exit
ID: 1234
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned int exit_reason;\toffset:8;\tsize:4;\tsigned:0;
\tfield:unsigned long guest_rip;\toffset:16;\tsize:8;\tsigned:0;
\tfield:u32 isa;\toffset:24;\tsize:4;\tsigned:0;
\tfield:char comm[16];\toffset:28;\tsize:16;\tsigned:0;
";

    #[test]
    fn finds_field_offsets() {
        assert_eq!(field_offset(KVM_EXIT, "exit_reason"), Some(8));
        assert_eq!(field_offset(KVM_EXIT, "isa"), Some(24));
        assert_eq!(field_offset(KVM_EXIT, "common_pid"), Some(4));
        assert_eq!(field_offset(KVM_EXIT, "reason"), None);
        assert_eq!(field_offset(KVM_EXIT, "comm[16]"), Some(28));
    }
}
