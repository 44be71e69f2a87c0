//! Attaching the gateway classifiers to an interface and detaching them.
//!
//! Kernels 6.6 and later: TCX links (`bpf_link`s). They need no qdisc and
//! belong to the tracer's file descriptors, so the kernel detaches them
//! whenever the tracer ends, even on SIGKILL. Older kernels: the `clsact`
//! qdisc (added when missing, removed again only if this tracer added it)
//! and netlink `bpf` filters, which outlive a process: they are removed on
//! every exit path the tracer controls ([`Attachment`]'s `Drop`, and
//! [`emergency_detach`] before the abort on a second signal).

use std::{
    ffi::CString,
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
    },
    util::KernelVersion,
};
use cis490_common::gateway::{GW_EGRESS, GW_INGRESS};
use serde::Serialize;

/// How the classifiers are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    /// TCX links (6.6+).
    Tcx,
    /// `clsact` qdisc and netlink filters.
    Clsact,
}

/// `--gateway-attach`: how to attach.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachChoice {
    /// TCX on 6.6 and later, else clsact.
    #[default]
    Auto,
    Tcx,
    Clsact,
}

/// The classifiers attached to one interface; detached on drop.
pub struct Attachment {
    pub iface: String,
    pub ifindex: u32,
    pub mode: AttachMode,
    /// Whether this tracer added the `clsact` qdisc (and removes it).
    pub added_clsact: bool,
    links: Vec<SchedClassifierLink>,
    netns: Option<PathBuf>,
}

/// What [`emergency_detach`] must undo (netlink filters only: TCX links go
/// with the process).
struct Pending {
    iface: String,
    ifindex: u32,
    added_clsact: bool,
    netns: Option<PathBuf>,
}

/// Runs `f` with this thread in the network namespace at `netns` (a path,
/// or a name of `ip netns`), then back in its own; `None`: here.
pub fn in_netns<T>(netns: Option<&Path>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let Some(ns) = netns else { return f() };
    let path = netns_path(ns);
    let own = File::open("/proc/thread-self/ns/net")
        .context("cannot open this thread's network namespace")?;
    let there = File::open(&path)
        .with_context(|| format!("--gateway-netns {}: cannot open", path.display()))?;
    // SAFETY: setns with open namespace files, for this thread only.
    if unsafe { libc::setns(there.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "--gateway-netns {}: cannot enter: {}",
            path.display(),
            io::Error::last_os_error()
        );
    }
    let r = f();
    // SAFETY: as above; back where the thread was.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        // Never go on in the wrong namespace.
        panic!(
            "cannot return to the tracer's network namespace: {}",
            io::Error::last_os_error()
        );
    }
    r
}

/// A namespace path, or `/var/run/netns/NAME` for a bare name.
pub fn netns_path(ns: &Path) -> PathBuf {
    if ns.components().count() == 1 && !ns.is_absolute() {
        Path::new("/var/run/netns").join(ns)
    } else {
        ns.to_owned()
    }
}

static PENDING: Mutex<Option<Pending>> = Mutex::new(None);

/// The interface's index, or one clear error.
pub fn ifindex(iface: &str) -> Result<u32> {
    let c = CString::new(iface).map_err(|_| anyhow!("--gateway-if: bad interface name"))?;
    // SAFETY: a valid NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!(
            "--gateway-if {iface}: no such interface in the tracer's network namespace ({})",
            io::Error::last_os_error()
        );
    }
    Ok(i)
}

impl Attachment {
    /// Loads and attaches both classifiers of `ebpf` to `iface` (of the
    /// network namespace `netns`, else the tracer's).
    pub fn attach(
        ebpf: &mut Ebpf,
        iface: &str,
        choice: AttachChoice,
        netns: Option<&Path>,
    ) -> Result<Self> {
        in_netns(netns, || Self::attach_here(ebpf, iface, choice, netns))
    }

    fn attach_here(
        ebpf: &mut Ebpf,
        iface: &str,
        choice: AttachChoice,
        netns: Option<&Path>,
    ) -> Result<Self> {
        let ifindex = ifindex(iface)?;
        let mode = match choice {
            AttachChoice::Tcx => AttachMode::Tcx,
            AttachChoice::Clsact => AttachMode::Clsact,
            AttachChoice::Auto
                if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) =>
            {
                AttachMode::Tcx
            }
            AttachChoice::Auto => AttachMode::Clsact,
        };
        let mut added_clsact = false;
        if mode == AttachMode::Clsact {
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => added_clsact = true,
                Err(e) if is_eexist(&e) => {}
                Err(e) => bail!("cannot add the clsact qdisc to {iface}: {e}"),
            }
            *PENDING.lock().unwrap_or_else(|e| e.into_inner()) = Some(Pending {
                iface: iface.to_owned(),
                ifindex,
                added_clsact,
                netns: netns.map(Path::to_owned),
            });
        }
        let mut this = Self {
            iface: iface.to_owned(),
            ifindex,
            mode,
            added_clsact,
            links: Vec::new(),
            netns: netns.map(Path::to_owned),
        };
        for (name, hook) in [
            (GW_INGRESS, TcAttachType::Ingress),
            (GW_EGRESS, TcAttachType::Egress),
        ] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} not in the eBPF object"))?
                .try_into()
                .with_context(|| format!("program {name}"))?;
            prog.load()
                .map_err(|e| anyhow!("cannot load {name}: {e:#}"))?;
            let options = match mode {
                AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
                AttachMode::Clsact => TcAttachOptions::Netlink(NlOptions::default()),
            };
            let id = prog
                .attach_with_options(iface, hook, options)
                .map_err(|e| anyhow!("cannot attach {name} to {iface}: {e:#}"))?;
            let link = prog
                .take_link(id)
                .map_err(|e| anyhow!("link of {name}: {e:#}"))?;
            this.links.push(link);
        }
        Ok(this)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        // Dropping a link detaches it (a TCX link closes, a netlink filter
        // is deleted, in the interface's namespace).
        let (links, added, ifindex) = (
            std::mem::take(&mut self.links),
            self.added_clsact,
            self.ifindex,
        );
        let r = in_netns(self.netns.as_deref(), || {
            drop(links);
            if added {
                del_clsact(ifindex)?;
            }
            Ok(())
        });
        if let Err(e) = r {
            log::warn!("cannot remove the clsact qdisc of {}: {e:#}", self.iface);
        }
        *PENDING.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Removes what the gateway attached with netlink, for an exit that skips
/// destructors (the abort on a second signal).
pub fn emergency_detach() {
    let pending = PENDING.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(p) = pending {
        let _ = in_netns(p.netns.as_deref(), || {
            if p.added_clsact {
                // The qdisc takes its filters with it.
                let _ = del_clsact(p.ifindex);
            } else {
                for (name, hook) in [
                    (GW_INGRESS, TcAttachType::Ingress),
                    (GW_EGRESS, TcAttachType::Egress),
                ] {
                    let _ = tc::qdisc_detach_program(&p.iface, hook, name);
                }
            }
            Ok(())
        });
    }
}

fn is_eexist(e: &tc::TcError) -> bool {
    let mut src: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::EEXIST)
        {
            return true;
        }
        src = s.source();
    }
    e.to_string().contains("File exists")
}

/// `tc qdisc del dev IFINDEX clsact`, over rtnetlink (aya has no call for
/// it).
pub fn del_clsact(ifindex: u32) -> io::Result<()> {
    const RTM_DELQDISC: u16 = 37;
    const TCA_KIND: u16 = 1;
    const TC_H_CLSACT: u32 = 0xffff_fff1;
    const CLSACT_HANDLE: u32 = 0xffff_0000;
    #[repr(C)]
    struct Req {
        nh: libc::nlmsghdr,
        // struct tcmsg
        family: u8,
        pad1: u8,
        pad2: u16,
        ifindex: i32,
        handle: u32,
        parent: u32,
        info: u32,
        // struct rtattr + "clsact\0", padded to 4
        rta_len: u16,
        rta_type: u16,
        kind: [u8; 8],
    }
    let req = Req {
        nh: libc::nlmsghdr {
            nlmsg_len: std::mem::size_of::<Req>() as u32,
            nlmsg_type: RTM_DELQDISC,
            nlmsg_flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            nlmsg_seq: 1,
            nlmsg_pid: 0,
        },
        family: libc::AF_UNSPEC as u8,
        pad1: 0,
        pad2: 0,
        ifindex: ifindex as i32,
        handle: CLSACT_HANDLE,
        parent: TC_H_CLSACT,
        info: 0,
        rta_len: 4 + 7,
        rta_type: TCA_KIND,
        kind: *b"clsact\0\0",
    };
    // SAFETY: plain socket calls on a socket owned here; `req` and `buf`
    // outlive them.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let result = (|| {
            let n = libc::send(fd, (&raw const req).cast(), std::mem::size_of::<Req>(), 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut buf = [0u8; 1024];
            let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let hdr = std::mem::size_of::<libc::nlmsghdr>();
            if (n as usize) < hdr + 4 {
                return Err(io::Error::other("short netlink answer"));
            }
            let ty = u16::from_ne_bytes([buf[4], buf[5]]);
            if ty == libc::NLMSG_ERROR as u16 {
                let err = i32::from_ne_bytes(buf[hdr..hdr + 4].try_into().expect("4 bytes"));
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(-err));
                }
            }
            Ok(())
        })();
        libc::close(fd);
        result
    }
}
