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
