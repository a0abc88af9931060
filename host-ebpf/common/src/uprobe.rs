//! The `uprobe` kind: user-space probe points (USDT probes, function entries and
//! returns, offsets in a binary) and, on kernels with kprobes, kernel functions. A
//! subscription names its points; the host attaches one program at each point's sites
//! and tells them apart by the attach cookie.

use core::mem::{offset_of, size_of};

use crate::{Record, RecordHeader};

/// Arguments a record carries (the x86-64 calling convention's register arguments;
/// USDT probes with more are cut to these).
pub const MAX_ARGS: usize = 6;
/// Bytes of the one string a point may copy (NUL included, so at most 255 of text).
pub const TEXT_LEN: usize = 256;
/// Sites (one probe point can have several) attached at once, per daemon: each holds
/// one file descriptor.
pub const MAX_SITES: u32 = 1024;
/// `Site::string_arg` of a point that copies no string.
pub const NO_STRING: u32 = u32::MAX;

/// One hit of a probe point.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UprobeRecord {
    /// The task that hit the point.
    pub header: RecordHeader,
    /// The point, as [`probe_id`] of the text the subscription named it by.
    pub probe: u32,
    /// Process id of the task's parent (a subscription's `pids` match a process and
    /// its direct children: a server and its workers).
    pub parent_pid: u32,
    /// The point's arguments: a USDT probe's as its note specifies them (sign-extended
    /// when signed), a function's from the argument registers, a return probe's
    /// return value as `args[0]`. Arguments a point lacks read 0.
    pub args: [u64; MAX_ARGS],
    /// Bytes of `text` (without the NUL); 255 when the string may have been cut.
    pub text_len: u32,
    /// Which argument `text` was copied from, or [`NO_STRING`].
    pub text_arg: u32,
    /// The string the point's `str=N` argument pointed to, NUL padded.
    pub text: [u8; TEXT_LEN],
}

impl Default for UprobeRecord {
    fn default() -> Self {
        Self { header: RecordHeader::default(), probe: 0, parent_pid: 0, args: [0; MAX_ARGS], text_len: 0, text_arg: NO_STRING, text: [0; TEXT_LEN] }
    }
}

const _: () = assert!(size_of::<UprobeRecord>() == 360);
const _: () = assert!(offset_of!(UprobeRecord, header) == 0);

// SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
unsafe impl Record for UprobeRecord {
    const KIND: &'static str = "uprobe";
}

impl UprobeRecord {
    /// The copied string, if the point copies one.
    pub fn text(&self) -> Option<&[u8]> {
        (self.text_arg != NO_STRING).then(|| &self.text[..(self.text_len as usize).min(TEXT_LEN)])
    }
}

/// Where the host finds the selector (the probe id) in a record.
pub const SELECTOR_OFFSET: usize = offset_of!(UprobeRecord, probe);
/// Where the host finds the parent's pid, which the pid filter also matches.
pub const PARENT_PID_OFFSET: usize = offset_of!(UprobeRecord, parent_pid);

/// The id of a probe point named by `text` (e.g.
/// `"usdt:/usr/bin/postgres:postgresql:query__start:str=0"`): FNV-1a, so a plugin
/// computes the ids of its own points. The host refuses a point whose id another point
/// already has.
pub const fn probe_id(text: &str) -> u32 {
    let bytes = text.as_bytes();
    let mut hash: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u32;
        hash = hash.wrapping_mul(0x0100_0193);
        i += 1;
    }
    hash
}

/// How one argument is read at a site (the host decodes it from the USDT note or the
/// calling convention).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArgSpec {
    /// The immediate value, or the offset added to the register before reading memory.
    pub value: i64,
    /// Offset of the register in `struct pt_regs`.
    pub reg: u16,
    /// One of [`arg`].
    pub how: u8,
    /// Bits to shift left then right to keep the argument's size (64 - 8 × bytes).
    pub shift: u8,
    /// 1 when the argument is signed (sign-extended), 0 otherwise.
    pub signed: u8,
    pub _pad: [u8; 3],
}

/// Values of [`ArgSpec::how`].
pub mod arg {
    /// No such argument: reads 0.
    pub const NONE: u8 = 0;
    /// The register's value.
    pub const REG: u8 = 1;
    /// Memory at the register's value plus `value`.
    pub const MEMORY: u8 = 2;
    /// `value` itself.
    pub const IMMEDIATE: u8 = 3;
}

/// One attached site: which point it belongs to and how to read its arguments. The
/// `SITES` map holds one per attach cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Site {
    pub probe: u32,
    /// Argument whose value points at the string to copy, or [`NO_STRING`].
    pub string_arg: u32,
    /// 1 when the string is in kernel memory (a kprobe), 0 for user memory.
    pub kernel: u32,
    pub _pad: u32,
    pub args: [ArgSpec; MAX_ARGS],
}

const _: () = assert!(size_of::<Site>() == 16 + 16 * MAX_ARGS);

/// Names of the `uprobe` object's own map and globals.
pub mod names {
    pub const SITES: &str = "SITES";
    pub const TASK_TGID: &str = "TASK_TGID";
    pub const TASK_REAL_PARENT: &str = "TASK_REAL_PARENT";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C) structs of integers with no implicit padding (sizes asserted).
    unsafe impl aya::Pod for super::Site {}
}
