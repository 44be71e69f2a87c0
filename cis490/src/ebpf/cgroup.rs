//! A target's own cgroup (v2), whose I/O the block programs count as the
//! target's whoever submits it (`CGROUP_SLOTS`): above all the flusher's
//! writeback of the pages the target dirtied, which the kernel charges to
//! the cgroup that dirtied them (CONFIG_CGROUP_WRITEBACK, with the memory
//! and io controllers on the unified hierarchy).
//!
//! Used only when that cgroup is the target's alone: not the root, and
//! every process in it the target (a lab's VM in its own scope, as libvirt
//! and systemd-run make them). A cgroup shared with others (a login
//! session, the tracer's own) would bring their writeback into the rows.

use std::{os::unix::fs::MetadataExt as _, path::PathBuf};

/// The target's own cgroup, as the programs know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnCgroup {
    /// Its path in the cgroup (v2) hierarchy, as `/proc/PID/cgroup` says.
    pub path: String,
    /// Its id (its directory's inode number): what the programs read from
    /// a bio's `bi_blkg`.
    pub id: u64,
}

/// Thread group `tgid`'s own cgroup, or why its I/O is not counted by
/// cgroup (one line, for meta.json).
pub fn own_cgroup(tgid: u32) -> Result<OwnCgroup, String> {
    let mount =
        cgroup2_mount(&read("/proc/self/mountinfo")?).ok_or("no cgroup v2 hierarchy is mounted")?;
    let path = unified_path(&read(&format!("/proc/{tgid}/cgroup"))?)
        .ok_or("the target is in no cgroup v2 (its controllers are on cgroup v1)")?;
    if path == "/" {
        return Err("the target is in the root cgroup, not one of its own".into());
    }
    let dir = mount.join(path.trim_start_matches('/'));
    let controllers = read(&dir.join("cgroup.controllers").to_string_lossy())?;
    let missing: Vec<&str> = ["memory", "io"]
        .into_iter()
        .filter(|c| !controllers.split_whitespace().any(|x| x == *c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "its cgroup {path} has no {} controller (writeback is charged to a cgroup only \
             with both memory and io)",
            missing.join(" or ")
        ));
    }
    let procs = read(&dir.join("cgroup.procs").to_string_lossy())?;
    let others = procs
        .split_whitespace()
        .filter(|p| p.parse::<u32>().ok() != Some(tgid))
        .count();
    if others > 0 {
        return Err(format!(
            "its cgroup {path} holds {others} other process(es): their writeback would be \
             counted as the target's"
        ));
    }
    let id = std::fs::metadata(&dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .ino();
    Ok(OwnCgroup { path, id })
}

fn read(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))
}

/// Where the unified hierarchy is mounted (`/proc/self/mountinfo`: the
/// mount point is field 5, the file system type follows the ` - `).
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// The unified hierarchy's line of `/proc/PID/cgroup` (`0::PATH`).
fn unified_path(cgroup: &str) -> Option<String> {
    cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unified_hierarchy_is_found_in_mountinfo_and_proc_cgroup() {
        let mountinfo = "\
24 30 0:22 / /sys rw,nosuid - sysfs sysfs rw
35 24 0:30 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
40 24 0:35 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("35 24 0:30 / /x ro - tmpfs tmpfs ro\n"), None);
        let hybrid = "12:memory:/user.slice\n1:name=systemd:/user.slice/s.scope\n0::/machine.slice/vm1.scope\n";
        assert_eq!(
            unified_path(hybrid).as_deref(),
            Some("/machine.slice/vm1.scope")
        );
        assert_eq!(unified_path("12:memory:/a\n"), None);
    }
}
