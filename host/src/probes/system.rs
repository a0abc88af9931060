//! What the probes need from the system: tracefs, bpffs, privileges. Mounted when we
//! may, reported with the fix when we may not.

use std::path::Path;

use anyhow::Context as _;
use nix::mount::{MsFlags, mount};

pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const BPFFS: &str = "/sys/fs/bpf";

/// Whether `path` is the root of a mount of filesystem type `fstype`.
pub fn is_mounted(path: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        // Lines are "device mountpoint fstype options dump pass".
        mounts.lines().any(|l| {
            let mut f = l.split_whitespace().skip(1);
            f.next() == Some(path) && f.next() == Some(fstype)
        })
    })
}

/// Mounts `fstype` at `path` unless it already is.
pub fn ensure_mounted(path: &str, fstype: &str) -> anyhow::Result<bool> {
    if is_mounted(path, fstype) {
        return Ok(false);
    }
    if !Path::new(path).is_dir() {
        anyhow::bail!("{path} does not exist; this kernel lacks {fstype} support");
    }
    mount(Some(fstype), path, Some(fstype), MsFlags::empty(), None::<&str>)
        .with_context(|| format!("cannot mount {fstype} at {path}\n  fix: mount -t {fstype} {fstype} {path}   (or run wasmtap as root)"))?;
    Ok(true)
}

/// Effective capabilities of this process (`CapEff` in /proc/self/status).
pub fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_owned())))
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .unwrap_or(0)
}

pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

pub fn has_cap(cap: u32) -> bool {
    effective_caps() & (1 << cap) != 0
}
