//! cis490's eBPF programs. One module per probe family; each program is a thin
//! `#[btf_tracepoint]` wrapper around a `try_*` function returning `Result`.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

mod block;
mod gateway;
mod kvm;
mod maps;
mod net;
mod sched;
mod target;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
