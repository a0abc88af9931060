//! wasmtap kernel programs. Built for `bpfel-unknown-none` by `host/build.rs` (aya-build)
//! and embedded in the `wasmtap` binary; on any other target this is an empty program so
//! workspace-wide `cargo check`/`clippy` keep working.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod syscalls;

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any reachable panic path, so this is never executed.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
