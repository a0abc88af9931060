//! Kernel probes: the embedded eBPF object, attached as the merged subscriptions need,
//! with its filter maps programmed from userspace. One module per probe family.

pub mod syscalls;
pub mod system;

pub use syscalls::{SyscallProbe, SyscallStream};

/// The kernel programs, built by `host/build.rs` from `host-ebpf/`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wasmtap-ebpf"));

/// Turns a kernel refusal into an error that says how to fix it.
fn explain(err: impl std::error::Error + Send + Sync + 'static, what: &str) -> anyhow::Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    let mut errno = None;
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            errno = io.raw_os_error();
        }
        source = e.source();
    }
    let fix = match errno {
        Some(e) if e == nix::errno::Errno::EPERM as i32 || e == nix::errno::Errno::EACCES as i32 => {
            "\n  fix: run wasmtap as root (or grant CAP_BPF and CAP_PERFMON); `wasmtap check` lists what is missing"
        }
        Some(e) if e == nix::errno::Errno::ENOENT as i32 => {
            "\n  fix: mount tracefs (mount -t tracefs tracefs /sys/kernel/tracing), or run as root and wasmtap mounts it"
        }
        _ => "",
    };
    anyhow::Error::new(err).context(format!("{what}{fix}"))
}
