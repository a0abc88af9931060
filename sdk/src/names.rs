//! Labels for the numbers in records (names resolved by the host for its
//! architecture), with numeric fallbacks so a label is never empty.

use crate::host::HostApi;

/// The syscall's name, e.g. "getppid", or "syscall_<nr>" when the host does not know it.
pub fn syscall_label(host: &impl HostApi, nr: u32) -> String {
    host.syscall_name(nr).unwrap_or_else(|| format!("syscall_{nr}"))
}

/// The errno's symbolic name, e.g. "ENOENT", or its number when the host does not know it.
pub fn errno_label(host: &impl HostApi, errno: u16) -> String {
    host.errno_name(errno).unwrap_or_else(|| errno.to_string())
}

/// The container id of cgroup `cgroup_id` (from enrichment), or its path outside
/// containers; None when the host knows neither (the cgroup is gone).
pub fn container_of(cgroup_id: u64) -> Option<String> {
    crate::enrich::cgroup(cgroup_id).map(|cgroup| cgroup.container_id.unwrap_or(cgroup.path))
}

/// [`container_of`] as a label: "unknown" when the host knows neither.
pub fn container_label(cgroup_id: u64) -> String {
    container_of(cgroup_id).unwrap_or_else(|| "unknown".into())
}
