//! What the target holds open: tap interfaces (from the `iff:` line that
//! `/proc/PID/fdinfo/N` shows for a tun/tap fd) and a KVM VM (an fd on
//! `anon_inode:kvm-vm`); and where a tap lives (its index in the target's
//! network namespace).

use std::{
    ffi::CString,
    fs, io,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
};

/// A tap interface of the target, named as in its network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tap {
    pub name: String,
    pub ifindex: u32,
    /// Inode number of the network namespace it lives in.
    pub netns_inum: u32,
}

/// The interface name in a tun/tap fd's fdinfo.
pub fn parse_fdinfo_iff(fdinfo: &str) -> Option<&str> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("iff:"))
        .map(str::trim)
        .filter(|n| !n.is_empty())
}

/// What the target's open fds say about it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Interface names of its tun/tap fds (sorted, no duplicates).
    pub taps: Vec<String>,
    /// Whether it holds a KVM VM.
    pub kvm_vm: bool,
}

/// Scans `/proc/PID/fd` and the fdinfo of tun/tap fds.
pub fn holdings(pid: i32) -> io::Result<Holdings> {
    let mut h = Holdings::default();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        let Ok(link) = fs::read_link(entry.path()) else {
            continue;
        };
        let link = link.to_string_lossy();
        if link == "anon_inode:kvm-vm" {
            h.kvm_vm = true;
        } else if link == "/dev/net/tun" {
            let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
            if let Some(name) = fs::read_to_string(info)
                .ok()
                .as_deref()
                .and_then(parse_fdinfo_iff)
            {
                h.taps.push(name.to_owned());
            }
        }
    }
    h.taps.sort();
    h.taps.dedup();
    Ok(h)
}

/// Inode number of the network namespace of `pid`.
pub fn netns_inum(pid: i32) -> io::Result<u32> {
    Ok(fs::metadata(format!("/proc/{pid}/ns/net"))?.ino() as u32)
}

/// Index of interface `name` in the network namespace of `pid`: asked with
/// SIOCGIFINDEX from a socket made inside that namespace, by a short-lived
/// thread that enters it (a namespace switch affects only that thread).
pub fn ifindex_in(pid: i32, name: &str) -> io::Result<u32> {
    let ns = fs::File::open(format!("/proc/{pid}/ns/net"))?;
    let same = netns_inum(pid)? == fs::metadata("/proc/self/ns/net")?.ino() as u32;
    let name = CString::new(name).map_err(|_| io::Error::other("NUL in interface name"))?;
    let lookup = move || -> io::Result<u32> {
        if !same {
            // SAFETY: setns on an open namespace fd, for this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: if_nametoindex with a NUL-terminated name; it opens its
        // own socket in the calling thread's (now the target's) namespace.
        match unsafe { libc::if_nametoindex(name.as_ptr()) } {
            0 => Err(io::Error::last_os_error()),
            i => Ok(i),
        }
    };
    if same {
        return lookup();
    }
    std::thread::spawn(lookup)
        .join()
        .map_err(|_| io::Error::other("ifindex lookup panicked"))?
}

/// The target's taps with their namespace and index. Taps that vanish
/// between the scan and the lookup are skipped.
pub fn resolve(pid: i32, names: &[String]) -> io::Result<Vec<Tap>> {
    let netns_inum = netns_inum(pid)?;
    Ok(names
        .iter()
        .filter_map(|name| {
            let ifindex = ifindex_in(pid, name)
                .map_err(|e| log::debug!("tap {name} of {pid}: {e}"))
                .ok()?;
            Some(Tap {
                name: name.clone(),
                ifindex,
                netns_inum,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_iff() {
        let tun = "pos:\t0\nflags:\t0104002\nmnt_id:\t25\nino:\t1034\niff:\ttap0\n";
        assert_eq!(parse_fdinfo_iff(tun), Some("tap0"));
        assert_eq!(parse_fdinfo_iff("pos:\t0\nflags:\t02\n"), None);
        assert_eq!(parse_fdinfo_iff("iff:\t\n"), None);
    }

    #[test]
    fn this_process_holds_no_tap_and_loopback_resolves() {
        let pid = std::process::id() as i32;
        let h = holdings(pid).unwrap();
        assert!(h.taps.is_empty() && !h.kvm_vm);
        assert_eq!(ifindex_in(pid, "lo").unwrap(), 1);
        assert!(ifindex_in(pid, "cis490-nope0").is_err());
        assert!(netns_inum(pid).unwrap() > 0);
    }
}
