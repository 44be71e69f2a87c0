//! `io-uring`: an io_uring whose kernel SQPOLL thread joins this process.

use std::io;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use serde::Serialize;

use crate::report::write_json_atomic;

/// An io_uring with a kernel submission-queue thread: io_uring_setup(2) with
/// IORING_SETUP_SQPOLL makes the kernel create a thread ("iou-sqp-PID") in this
/// process's thread group, without clone(2). Holds the ring --hold-ms, closes it and
/// writes {"kind":"io-uring", "pid"} to --out.
#[derive(Args, Debug)]
pub struct IoUringArgs {
    /// How long the ring (and its kernel thread) lives, ms.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    hold_ms: u64,
    /// Where the report goes.
    #[arg(long, value_name = "PATH")]
    out: PathBuf,
}

pub fn cmd_io_uring(a: &IoUringArgs) -> Result<()> {
    /// `struct io_uring_params` (include/uapi/linux/io_uring.h): 120 bytes.
    #[repr(C)]
    struct Params {
        sq_entries: u32,
        cq_entries: u32,
        flags: u32,
        sq_thread_cpu: u32,
        sq_thread_idle: u32,
        features: u32,
        wq_fd: u32,
        resv: [u32; 3],
        offsets: [u64; 10],
    }
    const IORING_SETUP_SQPOLL: u32 = 1 << 1;
    let mut p = Params {
        sq_entries: 0,
        cq_entries: 0,
        flags: IORING_SETUP_SQPOLL,
        sq_thread_cpu: 0,
        sq_thread_idle: 1000,
        features: 0,
        wq_fd: 0,
        resv: [0; 3],
        offsets: [0; 10],
    };
    // SAFETY: io_uring_setup reads and writes `p`, a valid io_uring_params.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 8u32, &raw mut p) };
    if fd < 0 {
        bail!("io_uring_setup(SQPOLL): {}", io::Error::last_os_error());
    }
    thread::sleep(Duration::from_millis(a.hold_ms));
    // SAFETY: the ring's fd, closed once.
    unsafe { libc::close(fd as i32) };
    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
    }
    write_json_atomic(
        &a.out,
        &Report {
            kind: "io-uring",
            pid: std::process::id(),
        },
    )
}
