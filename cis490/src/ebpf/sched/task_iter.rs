//! The BPF task iterator behind the scheduler counters: its link (limited
//! to the target's threads where the kernel can filter by pid, Linux 6.1+)
//! and one run of it. aya 0.14 attaches iterators without the pid filter
//! and gives no access to the link's fd, which a run needs each time, so
//! these two `bpf(2)` commands are made here.

use std::{
    io::{self, Read as _},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;

/// `union bpf_attr`, as large as any kernel's and zeroed beyond what is set
/// (the kernel accepts a larger size if the tail is zero).
#[repr(C, align(8))]
struct Attr([u8; 160]);

impl Attr {
    fn new() -> Self {
        Attr([0; 160])
    }
    fn put_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<OwnedFd> {
    // SAFETY: bpf(2) with a zeroed attr of the size passed; it returns a new fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Creates the iterator's link for a loaded `iter/task` program; with
/// `pid`, the kernel visits only the threads of that process.
pub fn link(prog: BorrowedFd<'_>, pid: Option<u32>) -> io::Result<OwnedFd> {
    // union bpf_iter_link_info { struct { __u32 tid; __u32 pid; __u32 pid_fd; } task; }
    let info: [u32; 3] = [0, pid.unwrap_or(0), 0];
    let mut attr = Attr::new();
    // link_create: prog_fd, target_fd, attach_type, flags, then iter_info
    // (a pointer) and iter_info_len.
    attr.put_u32(0, prog.as_raw_fd() as u32);
    attr.put_u32(8, BPF_TRACE_ITER);
    if pid.is_some() {
        attr.put_u64(16, info.as_ptr() as u64);
        attr.put_u32(24, std::mem::size_of_val(&info) as u32);
    }
    bpf(BPF_LINK_CREATE, &mut attr)
}

/// Runs the iterator once over every task it visits (the program writes
/// its results into a map; it prints nothing).
pub fn run(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, link.as_raw_fd() as u32);
    let fd = bpf(BPF_ITER_CREATE, &mut attr)?;
    let mut f = std::fs::File::from(fd);
    let mut buf = [0u8; 64];
    while f.read(&mut buf)? > 0 {}
    Ok(())
}
