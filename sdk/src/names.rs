//! Names for the numbers in records (resolved by the host for its architecture), with
//! numeric fallbacks so a label is never empty.

use crate::bindings::wasmtap::plugin::names;

/// The syscall's name, e.g. "getppid", or "syscall_<nr>" when the host does not know it.
pub fn syscall_label(nr: u32) -> String {
    names::syscall_name(nr).unwrap_or_else(|| format!("syscall_{nr}"))
}

/// The errno's symbolic name, e.g. "ENOENT", or its number when the host does not know it.
pub fn errno_label(errno: u16) -> String {
    names::errno_name(errno).unwrap_or_else(|| errno.to_string())
}
