//! `kvm`: a tiny real-mode KVM guest that makes a known number of port-I/O exits.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::Serialize;

use crate::fdutil::{ioctl_result, owned_fd};
use crate::report::emit_report;

/// A minimal KVM guest that makes N port-I/O exits, then halts.
///
/// Raw ioctls on /dev/kvm (API version 12): one VM with 2 pages of memory at guest
/// physical 0x1000, one vCPU in 16-bit real mode (cs base 0, ip 0x1000) running
///
///     mov cx, N ; jcxz done ; again: out 0x10, al ; dec cx ; jnz again ; done: hlt
///
/// so the guest makes exactly N KVM_EXIT_IO exits (port 0x10, out, 1 byte, al=0x2a) and
/// one KVM_EXIT_HLT (no in-kernel irqchip is created, so hlt exits to user space). KVM_RUN
/// is called in a loop on the main thread; every exit is counted by exit_reason. Any other
/// exit (or an I/O exit that is not exactly the guest's `out`) stops the guest.
///
/// A SIGALRM timer bounds the whole run: if the guest has not halted within --timeout-ms,
/// KVM_RUN is interrupted and the run stops.
///
/// Report: {"kind":"kvm", "pid", "io_exits", "hlt_exits", "other_exits":{"KVM_EXIT_...":
/// n}, "kvm_runs" (KVM_RUN calls), "stop_reason" ("hlt", or what stopped it),
/// "final_rip", "final_rcx", "vcpu_mmap_size", "run_ns"}. If the guest did not halt
/// cleanly, the report is still written (to --out, or stdout without it) and then the
/// workload fails (one-line error, exit code 2).
#[derive(Args, Debug)]
pub struct KvmArgs {
    /// Number of port-I/O exits the guest makes before it halts (0 to 65535).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16))]
    io_exits: u16,
    /// Stop the guest (and fail) if it has not halted within this many ms.
    #[arg(long, value_name = "MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
    /// Where to write the JSON report (stdout if omitted).
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
}

/// The KVM user-space API for x86_64 (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/
/// kvm.h): only what `cmd_kvm` needs, with sizes and offsets checked against the UAPI.
mod kvm_sys {
    use libc::c_ulong;

    const KVMIO: u64 = 0xae;
    const IOC_NONE: u64 = 0;
    const IOC_WRITE: u64 = 1;
    const IOC_READ: u64 = 2;

    /// `_IOC(dir, KVMIO, nr, size)`.
    const fn ioc(dir: u64, nr: u64, size: usize) -> c_ulong {
        ((dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr) as c_ulong
    }

    pub const API_VERSION: i32 = 12;
    pub const KVM_GET_API_VERSION: c_ulong = ioc(IOC_NONE, 0x00, 0);
    pub const KVM_CREATE_VM: c_ulong = ioc(IOC_NONE, 0x01, 0);
    pub const KVM_GET_VCPU_MMAP_SIZE: c_ulong = ioc(IOC_NONE, 0x04, 0);
    pub const KVM_CREATE_VCPU: c_ulong = ioc(IOC_NONE, 0x41, 0);
    pub const KVM_SET_USER_MEMORY_REGION: c_ulong =
        ioc(IOC_WRITE, 0x46, size_of::<UserspaceMemoryRegion>());
    pub const KVM_SET_TSS_ADDR: c_ulong = ioc(IOC_NONE, 0x47, 0);
    pub const KVM_RUN: c_ulong = ioc(IOC_NONE, 0x80, 0);
    pub const KVM_GET_REGS: c_ulong = ioc(IOC_READ, 0x81, size_of::<Regs>());
    pub const KVM_SET_REGS: c_ulong = ioc(IOC_WRITE, 0x82, size_of::<Regs>());
    pub const KVM_GET_SREGS: c_ulong = ioc(IOC_READ, 0x83, size_of::<Sregs>());
    pub const KVM_SET_SREGS: c_ulong = ioc(IOC_WRITE, 0x84, size_of::<Sregs>());

    // The values <linux/kvm.h> gives on x86_64.
    const _: () = assert!(KVM_GET_API_VERSION == 0xae00);
    const _: () = assert!(KVM_CREATE_VM == 0xae01);
    const _: () = assert!(KVM_GET_VCPU_MMAP_SIZE == 0xae04);
    const _: () = assert!(KVM_CREATE_VCPU == 0xae41);
    const _: () = assert!(KVM_SET_USER_MEMORY_REGION == 0x4020_ae46);
    const _: () = assert!(KVM_SET_TSS_ADDR == 0xae47);
    const _: () = assert!(KVM_RUN == 0xae80);
    const _: () = assert!(KVM_GET_REGS == 0x8090_ae81);
    const _: () = assert!(KVM_SET_REGS == 0x4090_ae82);
    const _: () = assert!(KVM_GET_SREGS == 0x8138_ae83);
    const _: () = assert!(KVM_SET_SREGS == 0x4138_ae84);

    pub const KVM_EXIT_IO: u32 = 2;
    pub const KVM_EXIT_HLT: u32 = 5;
    pub const KVM_EXIT_FAIL_ENTRY: u32 = 9;
    pub const KVM_EXIT_INTR: u32 = 10;
    pub const KVM_EXIT_INTERNAL_ERROR: u32 = 17;
    pub const KVM_EXIT_IO_OUT: u8 = 1;

    /// Names of the exit reasons in <linux/kvm.h> (index = value); later ones print as
    /// numbers.
    #[rustfmt::skip]
    const EXIT_NAMES: [&str; 41] = [
        "UNKNOWN", "EXCEPTION", "IO", "HYPERCALL", "DEBUG", "HLT", "MMIO", "IRQ_WINDOW_OPEN",
        "SHUTDOWN", "FAIL_ENTRY", "INTR", "SET_TPR", "TPR_ACCESS", "S390_SIEIC", "S390_RESET",
        "DCR", "NMI", "INTERNAL_ERROR", "OSI", "PAPR_HCALL", "S390_UCONTROL", "WATCHDOG",
        "S390_TSCH", "EPR", "SYSTEM_EVENT", "S390_STSI", "IOAPIC_EOI", "HYPERV", "ARM_NISV",
        "X86_RDMSR", "X86_WRMSR", "DIRTY_RING_FULL", "AP_RESET_HOLD", "X86_BUS_LOCK", "XEN",
        "RISCV_SBI", "RISCV_CSR", "NOTIFY", "LOONGARCH_IOCSR", "MEMORY_FAULT", "TDX",
    ];

    pub fn exit_name(reason: u32) -> String {
        match EXIT_NAMES.get(reason as usize) {
            Some(name) => format!("KVM_EXIT_{name}"),
            None => format!("KVM_EXIT_{reason}"),
        }
    }

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug)]
    pub struct UserspaceMemoryRegion {
        pub slot: u32,
        pub flags: u32,
        pub guest_phys_addr: u64,
        pub memory_size: u64,
        pub userspace_addr: u64,
    }
    const _: () = assert!(size_of::<UserspaceMemoryRegion>() == 32);

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug)]
    pub struct Regs {
        pub rax: u64,
        pub rbx: u64,
        pub rcx: u64,
        pub rdx: u64,
        pub rsi: u64,
        pub rdi: u64,
        pub rsp: u64,
        pub rbp: u64,
        pub r8: u64,
        pub r9: u64,
        pub r10: u64,
        pub r11: u64,
        pub r12: u64,
        pub r13: u64,
        pub r14: u64,
        pub r15: u64,
        pub rip: u64,
        pub rflags: u64,
    }
    const _: () = assert!(size_of::<Regs>() == 144);

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug)]
    pub struct Segment {
        pub base: u64,
        pub limit: u32,
        pub selector: u16,
        pub type_: u8,
        pub present: u8,
        pub dpl: u8,
        pub db: u8,
        pub s: u8,
        pub l: u8,
        pub g: u8,
        pub avl: u8,
        pub unusable: u8,
        pub padding: u8,
    }
    const _: () = assert!(size_of::<Segment>() == 24);

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug)]
    pub struct Dtable {
        pub base: u64,
        pub limit: u16,
        pub padding: [u16; 3],
    }
    const _: () = assert!(size_of::<Dtable>() == 16);

    #[repr(C)]
    #[derive(Default, Clone, Copy, Debug)]
    pub struct Sregs {
        pub cs: Segment,
        pub ds: Segment,
        pub es: Segment,
        pub fs: Segment,
        pub gs: Segment,
        pub ss: Segment,
        pub tr: Segment,
        pub ldt: Segment,
        pub gdt: Dtable,
        pub idt: Dtable,
        pub cr0: u64,
        pub cr2: u64,
        pub cr3: u64,
        pub cr4: u64,
        pub cr8: u64,
        pub efer: u64,
        pub apic_base: u64,
        /// KVM_NR_INTERRUPTS (256) bits.
        pub interrupt_bitmap: [u64; 4],
    }
    const _: () = assert!(size_of::<Sregs>() == 312);
    const _: () = assert!(std::mem::offset_of!(Sregs, gdt) == 192);
    const _: () = assert!(std::mem::offset_of!(Sregs, cr0) == 224);

    /// The fixed head of `struct kvm_run` (the mmap()ed vCPU area); the exit union follows.
    #[repr(C)]
    pub struct RunHeader {
        pub request_interrupt_window: u8,
        pub immediate_exit: u8,
        pub padding1: [u8; 6],
        pub exit_reason: u32,
        pub ready_for_interrupt_injection: u8,
        pub if_flag: u8,
        pub flags: u16,
        pub cr8: u64,
        pub apic_base: u64,
    }
    const _: () = assert!(std::mem::offset_of!(RunHeader, exit_reason) == 8);
    const _: () = assert!(size_of::<RunHeader>() == 32);
    /// Offset of the exit union in `struct kvm_run`.
    pub const RUN_UNION_OFFSET: usize = 32;

    /// `kvm_run.io` (KVM_EXIT_IO); the data is at `data_offset` from the start of kvm_run.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct RunIo {
        pub direction: u8,
        pub size: u8,
        pub port: u16,
        pub count: u32,
        pub data_offset: u64,
    }
    const _: () = assert!(size_of::<RunIo>() == 16);

    /// `kvm_run.fail_entry` (KVM_EXIT_FAIL_ENTRY).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct RunFailEntry {
        pub hardware_entry_failure_reason: u64,
        pub cpu: u32,
    }

    /// The first field of `kvm_run.internal` (KVM_EXIT_INTERNAL_ERROR).
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct RunInternal {
        pub suberror: u32,
    }
}

/// Guest physical address of the guest's memory, where its code starts.
const GUEST_BASE: u64 = 0x1000;

const GUEST_PAGES: usize = 2;

const GUEST_IO_PORT: u16 = 0x10;

const GUEST_AL: u8 = 0x2a;

/// The guest's 16-bit code: `io_exits` times `out 0x10, al`, then `hlt`.
fn guest_code(io_exits: u16) -> Vec<u8> {
    let [lo, hi] = io_exits.to_le_bytes();
    vec![
        0xb9,
        lo,
        hi, // 0: mov cx, imm16
        0xe3,
        0x05, // 3: jcxz +5 (to 10: hlt)
        0xe6,
        GUEST_IO_PORT as u8, // 5: out imm8, al
        0x49,                // 7: dec cx
        0x75,
        0xfb, // 8: jnz -5 (to 5: out)
        0xf4, // 10: hlt
    ]
}

/// Guest rip after the `hlt` (which is the last byte of the code).
const GUEST_RIP_AFTER_HLT: u64 = GUEST_BASE + 11;

/// An mmap()ed region, unmapped on drop.
struct Mapping {
    ptr: NonNull<libc::c_void>,
    len: usize,
}

impl Mapping {
    /// mmap(NULL, len, PROT_READ|PROT_WRITE, flags, fd, 0).
    fn new(len: usize, flags: libc::c_int, fd: RawFd, what: &str) -> Result<Self> {
        // SAFETY: a fresh mapping at an address the kernel chooses; nothing in this process
        // is overwritten. `fd` is -1 for anonymous mappings or an open fd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mmap {what} ({len} bytes): {}", io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr).context("mmap returned NULL")?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping made by `Mapping::new` and unmapped only here;
        // no references into it outlive `self`.
        unsafe { libc::munmap(self.ptr.as_ptr(), self.len) };
    }
}

/// Set by the SIGALRM handler when the guest's time is up.
static KVM_TIMED_OUT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigalrm(_sig: libc::c_int) {
    KVM_TIMED_OUT.store(true, Ordering::SeqCst);
}

/// Arms ITIMER_REAL to raise SIGALRM after `after` and then every 100 ms (so a KVM_RUN entered
/// just after one signal is still interrupted by the next), with a handler installed without
/// SA_RESTART so that KVM_RUN returns EINTR. `None` disarms the timer.
fn kvm_alarm(after: Option<Duration>) -> Result<()> {
    if after.is_some() {
        // SAFETY: sigaction is plain data (a handler address, a sigset and flags), for which
        // all-zero is valid; the fields that matter are set below.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigalrm as extern "C" fn(libc::c_int) as libc::sighandler_t;
        sa.sa_flags = 0;
        // SAFETY: `sa` is a valid sigaction whose handler only stores to an atomic (which is
        // async-signal-safe); a null old-action pointer is allowed.
        let rc = unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            bail!("sigaction(SIGALRM): {}", io::Error::last_os_error());
        }
    }
    let tv = |d: Duration| libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: d.subsec_micros() as libc::suseconds_t,
    };
    let zero = Duration::ZERO;
    let timer = libc::itimerval {
        it_value: tv(after.map_or(zero, |d| d.max(Duration::from_micros(1)))),
        it_interval: tv(after.map_or(zero, |_| Duration::from_millis(100))),
    };
    // SAFETY: `timer` is a valid itimerval that outlives the call; a null old-value pointer is
    // allowed.
    let rc = unsafe { libc::setitimer(libc::ITIMER_REAL, &timer, std::ptr::null_mut()) };
    if rc != 0 {
        bail!("setitimer: {}", io::Error::last_os_error());
    }
    Ok(())
}

pub fn cmd_kvm(a: &KvmArgs) -> Result<()> {
    use kvm_sys::*;

    #[derive(Serialize)]
    struct Report {
        kind: &'static str,
        pid: u32,
        io_exits: u64,
        hlt_exits: u64,
        other_exits: BTreeMap<String, u64>,
        kvm_runs: u64,
        stop_reason: String,
        final_rip: Option<u64>,
        final_rcx: Option<u64>,
        vcpu_mmap_size: usize,
        run_ns: u64,
    }

    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("cannot open /dev/kvm")?;
    // SAFETY: KVM_GET_API_VERSION takes no argument and touches no memory.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    let version = ioctl_result(version, "KVM_GET_API_VERSION")?;
    if version != API_VERSION {
        bail!("KVM API version {version}, expected {API_VERSION}");
    }
    // SAFETY: KVM_CREATE_VM takes the machine type (0: default) and touches no memory.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
    let vm = owned_fd(ioctl_result(vm, "KVM_CREATE_VM")?);
    // Needed on Intel hosts without "unrestricted guest" to run real-mode code; harmless
    // elsewhere. Three pages just below 4 GiB, outside the guest's memory.
    // SAFETY: KVM_SET_TSS_ADDR takes a guest physical address by value; no memory is touched.
    let rc = unsafe {
        libc::ioctl(
            vm.as_raw_fd(),
            KVM_SET_TSS_ADDR,
            0xfffb_d000 as libc::c_ulong,
        )
    };
    ioctl_result(rc, "KVM_SET_TSS_ADDR")?;

    let mem_len = GUEST_PAGES * 4096;
    let mem = Mapping::new(
        mem_len,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        -1,
        "guest memory",
    )?;
    let code = guest_code(a.io_exits);
    // SAFETY: `mem` is a fresh, writable mapping of `mem_len` bytes, more than `code.len()`,
    // and nothing else refers to it yet.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), mem.ptr.as_ptr().cast::<u8>(), code.len())
    };
    let region = UserspaceMemoryRegion {
        slot: 0,
        flags: 0,
        guest_phys_addr: GUEST_BASE,
        memory_size: mem_len as u64,
        userspace_addr: mem.ptr.as_ptr() as u64,
    };
    // SAFETY: KVM_SET_USER_MEMORY_REGION reads a kvm_userspace_memory_region; `region` has
    // its exact layout (checked in kvm_sys) and outlives the call. The memory it names stays
    // mapped until after the VM fd is closed (`mem` is dropped after `vm`, see the end).
    let rc = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_SET_USER_MEMORY_REGION, &region) };
    ioctl_result(rc, "KVM_SET_USER_MEMORY_REGION")?;

    // SAFETY: KVM_GET_VCPU_MMAP_SIZE takes no argument and touches no memory.
    let run_size = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_VCPU_MMAP_SIZE, 0) };
    let run_size = ioctl_result(run_size, "KVM_GET_VCPU_MMAP_SIZE")? as usize;
    if run_size < RUN_UNION_OFFSET + 256 {
        bail!("KVM_GET_VCPU_MMAP_SIZE returned only {run_size} bytes");
    }
    // SAFETY: KVM_CREATE_VCPU takes the vCPU id by value and touches no memory.
    let vcpu = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CREATE_VCPU, 0) };
    let vcpu = owned_fd(ioctl_result(vcpu, "KVM_CREATE_VCPU")?);
    let run = Mapping::new(run_size, libc::MAP_SHARED, vcpu.as_raw_fd(), "kvm_run")?;
    let run_ptr = run.ptr.as_ptr().cast::<u8>();

    let mut sregs = Sregs::default();
    // SAFETY: KVM_GET_SREGS writes a kvm_sregs; `sregs` has its exact layout and outlives
    // the call.
    let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_SREGS, &mut sregs) };
    ioctl_result(rc, "KVM_GET_SREGS")?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    // SAFETY: KVM_SET_SREGS reads a kvm_sregs; `sregs` has its exact layout and outlives it.
    let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_SET_SREGS, &sregs) };
    ioctl_result(rc, "KVM_SET_SREGS")?;
    let regs = Regs {
        rip: GUEST_BASE,
        rax: GUEST_AL as u64,
        rflags: 0x2, // bit 1 is reserved and always set
        ..Regs::default()
    };
    // SAFETY: KVM_SET_REGS reads a kvm_regs; `regs` has its exact layout and outlives it.
    let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_SET_REGS, &regs) };
    ioctl_result(rc, "KVM_SET_REGS")?;

    let (mut io_exits, mut hlt_exits, mut kvm_runs) = (0u64, 0u64, 0u64);
    let mut other_exits: BTreeMap<String, u64> = BTreeMap::new();
    KVM_TIMED_OUT.store(false, Ordering::SeqCst);
    kvm_alarm(Some(Duration::from_millis(a.timeout_ms)))?;
    let start = Instant::now();
    let stop_reason: Result<String> = loop {
        if KVM_TIMED_OUT.load(Ordering::SeqCst) {
            break Ok(format!(
                "timeout: the guest did not halt within {} ms",
                a.timeout_ms
            ));
        }
        // SAFETY: KVM_RUN takes no argument; it writes only into the vCPU's kvm_run area,
        // which `run` keeps mapped.
        let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_RUN, 0) };
        kvm_runs += 1;
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                *other_exits.entry(exit_name(KVM_EXIT_INTR)).or_insert(0) += 1;
                continue;
            }
            break Err(anyhow!("KVM_RUN: {err}"));
        }
        // SAFETY: `run_ptr` points to the kvm_run area of `run_size` bytes (checked to be
        // larger than the header and the union read below), which the kernel updated before
        // KVM_RUN returned; volatile reads because the kernel, not Rust, writes it.
        let exit_reason = unsafe {
            std::ptr::read_volatile(&raw const (*run_ptr.cast::<RunHeader>()).exit_reason)
        };
        match exit_reason {
            KVM_EXIT_IO => {
                // SAFETY: as above; the io member of the union is at RUN_UNION_OFFSET.
                let io = unsafe {
                    std::ptr::read_volatile(run_ptr.add(RUN_UNION_OFFSET).cast::<RunIo>())
                };
                let data_end =
                    (io.data_offset as usize).saturating_add(io.size as usize * io.count as usize);
                let data = if io.size == 1 && io.count == 1 && data_end <= run_size {
                    // SAFETY: the byte at data_offset lies inside the kvm_run area (checked).
                    Some(unsafe { std::ptr::read_volatile(run_ptr.add(io.data_offset as usize)) })
                } else {
                    None
                };
                let expected = io.direction == KVM_EXIT_IO_OUT
                    && io.port == GUEST_IO_PORT
                    && data == Some(GUEST_AL);
                if !expected {
                    *other_exits.entry(exit_name(exit_reason)).or_insert(0) += 1;
                    break Ok(format!(
                        "unexpected KVM_EXIT_IO: direction {} port {:#x} size {} count {} data {:?}",
                        io.direction, io.port, io.size, io.count, data
                    ));
                }
                io_exits += 1;
            }
            KVM_EXIT_HLT => {
                hlt_exits += 1;
                break Ok("hlt".to_string());
            }
            other => {
                *other_exits.entry(exit_name(other)).or_insert(0) += 1;
                let detail = match other {
                    KVM_EXIT_FAIL_ENTRY => {
                        // SAFETY: as above; fail_entry is at RUN_UNION_OFFSET.
                        let f = unsafe {
                            std::ptr::read_volatile(
                                run_ptr.add(RUN_UNION_OFFSET).cast::<RunFailEntry>(),
                            )
                        };
                        format!(
                            " (hardware_entry_failure_reason {:#x})",
                            f.hardware_entry_failure_reason
                        )
                    }
                    KVM_EXIT_INTERNAL_ERROR => {
                        // SAFETY: as above; internal is at RUN_UNION_OFFSET.
                        let i = unsafe {
                            std::ptr::read_volatile(
                                run_ptr.add(RUN_UNION_OFFSET).cast::<RunInternal>(),
                            )
                        };
                        format!(" (suberror {})", i.suberror)
                    }
                    _ => String::new(),
                };
                break Ok(format!("unexpected exit {}{detail}", exit_name(other)));
            }
        }
    };
    let run_ns = start.elapsed().as_nanos() as u64;
    kvm_alarm(None)?;
    let stop_reason = stop_reason?;

    let mut regs = Regs::default();
    // SAFETY: KVM_GET_REGS writes a kvm_regs; `regs` has its exact layout and outlives it.
    let rc = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_REGS, &mut regs) };
    let (final_rip, final_rcx) = match ioctl_result(rc, "KVM_GET_REGS") {
        Ok(_) => (Some(regs.rip), Some(regs.rcx)),
        Err(_) => (None, None),
    };
    // The vCPU and VM go before the memory they use.
    drop(run);
    drop(vcpu);
    drop(vm);
    drop(mem);

    let halted = stop_reason == "hlt";
    let report = Report {
        kind: "kvm",
        pid: std::process::id(),
        io_exits,
        hlt_exits,
        other_exits,
        kvm_runs,
        stop_reason: stop_reason.clone(),
        final_rip,
        final_rcx,
        vcpu_mmap_size: run_size,
        run_ns,
    };
    emit_report(a.out.as_deref(), &report)?;
    if !halted {
        bail!("guest stopped after {io_exits} I/O exits: {stop_reason}");
    }
    if final_rip != Some(GUEST_RIP_AFTER_HLT) || final_rcx.map(|c| c & 0xffff) != Some(0) {
        bail!(
            "guest halted in an unexpected state: rip {final_rip:#x?}, rcx {final_rcx:#x?} \
             (expected rip {GUEST_RIP_AFTER_HLT:#x}, cx 0)"
        );
    }
    Ok(())
}
