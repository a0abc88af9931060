//! Least privilege: before the daemon starts any thread (capabilities are per thread,
//! and threads inherit them), every capability it does not need for the rest of its
//! life leaves the bounding, permitted, effective, inheritable and ambient sets, and
//! NoNewPrivs is set, so nothing it runs (the compiler child) can gain any back.
//!
//! What it keeps by default is what attaching a probe needs, at start-up and later (a
//! plugin loaded or swapped in at run time may subscribe to a kind nobody used yet):
//! `CAP_BPF` (programs, maps, ring buffers) and `CAP_PERFMON` (tracing programs and
//! reading kernel memory). Everything else the daemon touches is root's own files (the
//! uid stays 0) or readable by anyone (`/proc/PID/{stat,status,cgroup,cmdline}`).
//! Add what a deployment needs with `capabilities_keep` / `--capabilities-keep`:
//! `sys_ptrace` for enrichment to report executables (the kernel guards
//! `/proc/PID/exe` with a ptrace access check; without it plugins get the path a
//! process was exec'd by), `sys_admin` for the uprobe kind (the kernel grants uprobes
//! only to it), on kernels before 5.8 (no `CAP_BPF`) or where tracefs must be mounted,
//! `net_bind_service` to listen on a port below 1024.

use anyhow::{Context as _, bail};
use caps::{CapSet, Capability, CapsHashSet};

/// The default `capabilities_keep`.
pub const DEFAULT_KEEP: &[&str] = &["bpf", "perfmon"];

/// Parses capability names (`bpf`, `cap_bpf`, `CAP_BPF`).
pub fn parse(names: &[String]) -> anyhow::Result<CapsHashSet> {
    names
        .iter()
        .map(|name| {
            let upper = name.to_ascii_uppercase();
            let full = if upper.starts_with("CAP_") { upper } else { format!("CAP_{upper}") };
            full.parse::<Capability>()
                .map_err(|_| anyhow::anyhow!("unknown capability {:?} (e.g. bpf, perfmon, sys_admin)", crate::sinks::logs::sanitize(name, 32)))
        })
        .collect()
}

/// Keeps only `keep` (of what the process has) in every set, clears the ambient and
/// inheritable sets, and sets NoNewPrivs. Must run before any other thread exists.
pub fn drop_all_but(keep: &CapsHashSet) -> anyhow::Result<()> {
    let permitted = caps::read(None, CapSet::Permitted).context("reading the permitted capabilities")?;
    let kept: CapsHashSet = permitted.intersection(keep).copied().collect();
    // The bounding set first: dropping from it takes CAP_SETPCAP, which goes next.
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::read(None, CapSet::Bounding).context("reading the bounding set")? {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).with_context(|| format!("dropping {cap} from the bounding set"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).context("clearing the ambient capabilities")?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).context("clearing the inheritable capabilities")?;
    caps::set(None, CapSet::Effective, &kept).context("setting the effective capabilities")?;
    caps::set(None, CapSet::Permitted, &kept).context("setting the permitted capabilities")?;
    nix::sys::prctl::set_no_new_privs().context("setting NoNewPrivs")?;
    let effective = caps::read(None, CapSet::Effective)?;
    if effective != kept {
        bail!("capabilities still held after dropping: {effective:?}");
    }
    let mut names: Vec<String> = kept.iter().map(|c| c.to_string().to_lowercase()).collect();
    names.sort();
    tracing::info!(kept = %names.join(","), "capabilities dropped; NoNewPrivs set");
    Ok(())
}

/// Drops every capability (the compiler child needs none).
pub fn drop_everything() -> anyhow::Result<()> {
    for set in [CapSet::Ambient, CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::clear(None, set).with_context(|| format!("clearing the {set:?} capabilities"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names_parse_in_any_spelling() {
        let set = parse(&["bpf".into(), "CAP_PERFMON".into(), "cap_sys_admin".into()]).unwrap();
        assert_eq!(set, [Capability::CAP_BPF, Capability::CAP_PERFMON, Capability::CAP_SYS_ADMIN].into_iter().collect());
        assert!(parse(&["bpff".into()]).unwrap_err().to_string().contains("unknown capability"));
    }
}
