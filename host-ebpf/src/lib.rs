//! What every kind's kernel object shares: the filter maps, the ring buffer, the drop
//! counter, and the record header. Each kind's programs are one binary in `src/bin/`
//! (its own object, so its maps exist only when it is loaded); on any target other
//! than `bpfel-unknown-none` this crate is empty, so workspace-wide `cargo check` and
//! `clippy` keep working.
#![no_std]

#[cfg(target_arch = "bpf")]
pub mod common;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any reachable panic path, so this is never executed.
    loop {}
}
