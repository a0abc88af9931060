//! Kernel probes: one kernel object per event kind, loaded only when a plugin
//! subscribes to the kind, with its filter maps programmed from the union of the
//! subscriptions and its programs attached (best flavour the kernel offers first).
//!
//! Adding a kind: its kernel program (`host-ebpf/src/bin/`), its layout module in
//! `wasmtap-events`, a descriptor module here, and one line in [`KINDS`].

pub mod attached;
pub mod btf;
pub mod kind;
pub mod process;
pub mod sched;
pub mod syscall;
pub mod system;
pub mod tcp;
pub mod uprobe;

pub use kind::{Kind, KindSpec, Probe, ProbeStream};

/// Every kind this host offers, by name.
pub static KINDS: &[Kind] = &[&syscall::KIND, &process::KIND, &sched::KIND, &tcp::KIND, &uprobe::KIND];

/// The kind called `name`.
pub fn kind(name: &str) -> Option<Kind> {
    KINDS.iter().copied().find(|k| k.name == name)
}

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
