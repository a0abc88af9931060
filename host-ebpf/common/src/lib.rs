//! Record layouts that cross the kernel/user boundary.
//!
//! This crate is the single definition of every event layout: the kernel programs
//! (`host-ebpf`) write these structs into ring buffers, the host (`wasmtap`) reads them
//! and forwards the raw bytes to plugins, and the plugin SDK (`wasmtap-sdk`) reads them
//! back inside the Wasm guest. One module per event kind.
//!
//! Layout rules (the plugin ABI; `wit/wasmtap.wit` documents each layout and a host
//! test ties that prose to these structs):
//! - every record starts with a [`RecordHeader`], so the host filters, scopes and routes
//!   any kind the same way;
//! - a layout only ever grows at the end, and a field added later reads 0 for "not
//!   provided": a reader that knows a shorter (older) layout reads its prefix, one that
//!   knows a longer (newer) layout zero-fills what the host did not send.
#![no_std]

pub mod process;
pub mod sched;
pub mod syscall;
pub mod tcp;
pub mod uprobe;

use core::mem::size_of;

pub use process::ProcessRecord;
pub use sched::SchedRecord;
pub use syscall::SyscallRecord;
pub use tcp::TcpRecord;
pub use uprobe::UprobeRecord;

/// Length of a task's `comm` as the kernel stores it (`TASK_COMM_LEN`), NUL padded.
pub const COMM_LEN: usize = 16;

/// Entries the pid and cgroup filter maps hold; a larger union is not pushed into the
/// kernel (that dimension is left open there, and the host routes exactly).
pub const MAX_FILTER_ENTRIES: u32 = 4096;

/// Highest selector (exclusive) the selector filter map can hold. A kind's selector is
/// the one number its records are filtered on besides pid and cgroup: the syscall
/// number, the process event.
pub const MAX_SELECTORS: u32 = 1024;

/// cgroup levels below the root that the cgroup filter looks through: a task matches
/// when its cgroup, or one of its ancestors up to this depth, is in the filter.
pub const MAX_CGROUP_DEPTH: i32 = 8;

/// The first 40 bytes of every record: who and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordHeader {
    /// Monotonic clock (`bpf_ktime_get_ns`) when the record was written, nanoseconds.
    pub ts_ns: u64,
    /// cgroup v2 id of the task.
    pub cgroup_id: u64,
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    /// Task name, NUL padded.
    pub comm: [u8; COMM_LEN],
}

const _: () = assert!(size_of::<RecordHeader>() == 40);

impl RecordHeader {
    /// `comm` up to its first NUL.
    #[inline]
    pub fn comm_bytes(&self) -> &[u8] {
        let len = self.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        &self.comm[..len]
    }
}

/// A fixed C layout that can be viewed as bytes and read back from any byte slice.
///
/// # Safety
/// Implementors are `repr(C)`, made of integers (and arrays of them) with no padding,
/// so every byte is initialised and every bit pattern is a valid value.
pub unsafe trait Record: Copy + Default + 'static {
    /// Kind name, as plugins subscribe to it.
    const KIND: &'static str;
    /// Size of one record in bytes.
    const SIZE: usize = size_of::<Self>();

    /// The header every record starts with.
    #[inline]
    fn header(&self) -> &RecordHeader {
        // SAFETY: every record type starts with a `RecordHeader` (asserted per kind).
        unsafe { &*(self as *const Self).cast::<RecordHeader>() }
    }

    /// The header, to change (building records for a test).
    #[inline]
    fn header_mut(&mut self) -> &mut RecordHeader {
        // SAFETY: every record type starts with a `RecordHeader` (asserted per kind).
        unsafe { &mut *(self as *mut Self).cast::<RecordHeader>() }
    }

    /// The record's bytes, as they sit in a batch.
    #[inline]
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: the trait's contract: no padding, every byte initialised.
        unsafe { core::slice::from_raw_parts((self as *const Self).cast::<u8>(), Self::SIZE) }
    }

    /// Reads a record from `bytes`, which need not be aligned. A shorter slice (an older
    /// host's layout) leaves the missing tail zero; a longer one (a newer host's) has its
    /// extra bytes ignored.
    #[inline]
    fn read(bytes: &[u8]) -> Self {
        let mut record = Self::default();
        let len = bytes.len().min(Self::SIZE);
        // SAFETY: at most `SIZE` bytes into a `Self`; any bit pattern is valid.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut record as *mut Self).cast::<u8>(), len) };
        record
    }
}

/// Kernel-side filter switches, one element of the `CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Bit set of `FILTER_*`: which filter maps are consulted. A clear bit means "all".
    pub filters: u32,
    /// Process id whose events are never recorded (the daemon itself), 0 for none.
    pub ignore_pid: u32,
    /// Ring buffer fill level in bytes past which a record wakes the reader up at once.
    pub wakeup_bytes: u64,
    /// The kind's threshold (e.g. `min_wait_ns` of the sched kind): smaller values are
    /// not recorded. 0 for kinds without one.
    pub min_value: u64,
}

const _: () = assert!(size_of::<ProbeConfig>() == 24);

/// `ProbeConfig::filters`: only pids present in `PID_FILTER` are recorded.
pub const FILTER_PIDS: u32 = 1 << 0;
/// `ProbeConfig::filters`: only tasks whose cgroup (or an ancestor of it) is present in
/// `CGROUP_FILTER` are recorded.
pub const FILTER_CGROUPS: u32 = 1 << 1;
/// `ProbeConfig::filters`: only selectors whose `SELECTOR_FILTER` slot is 1 are recorded.
pub const FILTER_SELECTORS: u32 = 1 << 2;

/// Indexes of the per-CPU `COUNTERS` array map.
pub mod counter {
    /// Records lost because the ring buffer was full.
    pub const RINGBUF_FULL: u32 = 0;
    /// Number of counters.
    pub const LEN: u32 = 1;
}

/// Member offsets the shared cgroup helpers read (for a task, or a socket, that is
/// not the current task): globals in every object that uses them, set by the host from
/// the kernel's BTF.
pub mod cgroup_offsets {
    pub const CGROUP_KN: &str = "CGROUP_KN";
    pub const CGROUP_LEVEL: &str = "CGROUP_LEVEL";
    pub const CGROUP_ANCESTORS: &str = "CGROUP_ANCESTORS";
    pub const KERNFS_NODE_ID: &str = "KERNFS_NODE_ID";
}

/// Names of the maps every kind's kernel object has, shared so the host cannot
/// misspell them.
pub mod maps {
    pub const EVENTS: &str = "EVENTS";
    pub const CONFIG: &str = "CONFIG";
    pub const PID_FILTER: &str = "PID_FILTER";
    pub const CGROUP_FILTER: &str = "CGROUP_FILTER";
    pub const SELECTOR_FILTER: &str = "SELECTOR_FILTER";
    pub const COUNTERS: &str = "COUNTERS";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C) structs of integers with no implicit padding (sizes asserted).
    unsafe impl aya::Pod for super::ProbeConfig {}
}
