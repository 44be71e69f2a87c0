//! What the target holds open: tap interfaces (from the `iff:` line that
//! `/proc/PID/fdinfo/N` shows for a tun/tap fd) and a KVM VM (an fd on
//! `anon_inode:kvm-vm`); and where a tap lives (its index in the target's
//! network namespace).

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
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
    /// Its tun/tap fds: (fd number, interface name), sorted.
    pub tap_fds: Vec<(i32, String)>,
    /// The interfaces of those fds with where they live, from the fds
    /// themselves ([`Resolver::resolve`]; sorted, no duplicates).
    pub tap_ifs: Vec<Tap>,
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
            let Some(fd) = entry.file_name().to_str().and_then(|f| f.parse().ok()) else {
                continue;
            };
            let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok();
            if let Some(name) = info.as_deref().and_then(parse_fdinfo_iff) {
                h.tap_fds.push((fd, name.to_owned()));
            }
        }
    }
    h.tap_fds.sort();
    Ok(h)
}

/// `TUNGETDEVNETNS` (`_IO('T', 227)`, Linux 5.2+): a new fd of the network
/// namespace a tun/tap fd's interface lives in.
const TUNGETDEVNETNS: libc::c_ulong = 0x54e3;

/// Where the target's taps live, from its tun/tap fds themselves: a tap
/// lives in the network namespace where it was created, which need not be
/// the target's, and a name can be taken again (a tap re-created after a
/// NIC hot-plug, an interface of the same name in another namespace). Per
/// namespace it keeps the namespace, a socket made in it (for interface
/// indexes) and its `/proc/net/dev` (for the /proc oracle).
#[derive(Debug, Default)]
pub struct Resolver {
    spaces: std::collections::BTreeMap<u32, Space>,
}

#[derive(Debug)]
struct Space {
    /// Kept so the namespace outlives its interfaces' counting.
    _netns: OwnedFd,
    sock: OwnedFd,
    net_dev: fs::File,
}

impl Resolver {
    /// The interfaces of tun/tap fds `fds` (fd number, name) of process
    /// `pid`, each where it lives: the fd is copied from the process
    /// (`pidfd_getfd`) and asked for its interface's namespace
    /// (`TUNGETDEVNETNS`). Where that fails (no such fd any more, an old
    /// kernel), the name is looked up in the process's own namespace.
    pub fn resolve(&mut self, pid: i32, fds: &[(i32, String)]) -> Vec<Tap> {
        let pidfd = pidfd_open(pid);
        let mut taps: Vec<Tap> = fds
            .iter()
            .filter_map(|(fd, name)| {
                let found = pidfd
                    .as_ref()
                    .map_err(|e| io::Error::new(e.kind(), format!("pidfd_open: {e}")))
                    .and_then(|p| self.of_fd(p, *fd, name));
                match found {
                    Ok(tap) => Some(tap),
                    Err(e) => {
                        log::debug!("tap {name} (fd {fd} of {pid}): {e}; by name instead");
                        by_name(pid, name)
                            .map_err(|e| log::debug!("tap {name} of {pid}: {e}"))
                            .ok()
                    }
                }
            })
            .collect();
        taps.sort_by_key(|t| (t.netns_inum, t.ifindex, t.name.clone()));
        taps.dedup();
        taps
    }

    fn of_fd(&mut self, pidfd: &OwnedFd, fd: i32, name: &str) -> io::Result<Tap> {
        // SAFETY: pidfd_getfd on an open pidfd; the result is a new fd we own.
        let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
        if copy < 0 {
            return Err(io::Error::other(format!(
                "pidfd_getfd: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: a new fd, owned from here on.
        let copy = unsafe { OwnedFd::from_raw_fd(copy as i32) };
        // SAFETY: an ioctl without argument on a tun/tap fd; it returns a
        // new fd or -1.
        let ns = unsafe { libc::ioctl(copy.as_raw_fd(), TUNGETDEVNETNS as _) };
        if ns < 0 {
            return Err(io::Error::other(format!(
                "TUNGETDEVNETNS: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: a new fd, owned from here on.
        let ns = unsafe { fs::File::from_raw_fd(ns) };
        let inum = ns.metadata()?.ino() as u32;
        let space = match self.spaces.entry(inum) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => e.insert(Space::enter(ns.into())?),
        };
        Ok(Tap {
            name: name.to_owned(),
            ifindex: ifindex_by_socket(&space.sock, name)?,
            netns_inum: inum,
        })
    }

    /// The `/proc/net/dev` of network namespace `inum`, if a tap of the
    /// target was found there, read now.
    pub fn net_dev(&self, inum: u32) -> Option<io::Result<String>> {
        use std::os::unix::fs::FileExt as _;
        let space = self.spaces.get(&inum)?;
        let mut text = Vec::with_capacity(4096);
        let mut buf = [0u8; 4096];
        loop {
            match space.net_dev.read_at(&mut buf, text.len() as u64) {
                Ok(0) => break,
                Ok(n) => text.extend_from_slice(&buf[..n]),
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(String::from_utf8_lossy(&text).into_owned()))
    }
}

impl Space {
    /// A socket and `/proc/net/dev` of namespace `netns`, made by a
    /// short-lived thread that enters it (a namespace switch affects only
    /// that thread; both stay bound to the namespace).
    fn enter(netns: OwnedFd) -> io::Result<Space> {
        let raw = netns.as_raw_fd();
        let (sock, net_dev) = std::thread::spawn(move || -> io::Result<(OwnedFd, fs::File)> {
            // SAFETY: setns on an open namespace fd (alive: the caller
            // holds it until the join), for this thread only.
            if unsafe { libc::setns(raw, libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: socket() returns a new fd or -1.
            let s =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            if s < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a new fd, owned from here on.
            let sock = unsafe { OwnedFd::from_raw_fd(s) };
            Ok((sock, fs::File::open("/proc/thread-self/net/dev")?))
        })
        .join()
        .map_err(|_| io::Error::other("entering a network namespace panicked"))??;
        Ok(Space {
            _netns: netns,
            sock,
            net_dev,
        })
    }
}

/// `pidfd_open(pid)`.
fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The index of interface `name` in the namespace `sock` was made in
/// (`SIOCGIFINDEX`).
fn ifindex_by_socket(sock: &OwnedFd, name: &str) -> io::Result<u32> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::other(format!("bad interface name {name:?}")));
    }
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFINDEX reads the name and writes the index into `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFINDEX as _, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled the index member of the union.
    Ok(unsafe { req.ifr_ifru.ifru_ifindex } as u32)
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

/// Tap `name` of process `pid` taken to live in the process's own network
/// namespace (when its fd cannot say where it lives).
fn by_name(pid: i32, name: &str) -> io::Result<Tap> {
    Ok(Tap {
        name: name.to_owned(),
        ifindex: ifindex_in(pid, name)?,
        netns_inum: netns_inum(pid)?,
    })
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
        assert!(h.tap_fds.is_empty() && !h.kvm_vm);
        assert_eq!(ifindex_in(pid, "lo").unwrap(), 1);
        assert!(ifindex_in(pid, "cis490-nope0").is_err());
        assert!(netns_inum(pid).unwrap() > 0);
    }
}
