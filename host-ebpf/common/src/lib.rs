//! Record layouts that cross the kernel/user boundary.
//!
//! This crate is the single definition of every event layout: the kernel programs
//! (`host-ebpf`) write these structs into ring buffers, the host (`wasmtap`) reads them
//! and forwards the raw bytes to plugins, and the plugin SDK (`wasmtap-sdk`) reads them
//! back inside the Wasm guest. Changing a layout breaks the plugin ABI: the size
//! assertions below fail the build, and the WIT package version must be bumped with it.
#![no_std]

use core::mem::size_of;

/// Length of a task's `comm` as the kernel stores it (`TASK_COMM_LEN`), NUL padded.
pub const COMM_LEN: usize = 16;

/// Highest syscall number (exclusive) the syscall filter map can hold.
pub const MAX_SYSCALLS: u32 = 1024;

/// Entries the pid and cgroup filter maps hold; a larger union is not pushed into the
/// kernel (that dimension is left open there, and the host routes exactly).
pub const MAX_FILTER_ENTRIES: u32 = 4096;

/// cgroup levels below the root that the cgroup filter looks through: a task matches
/// when its cgroup, or one of its ancestors up to this depth, is in the filter.
pub const MAX_CGROUP_DEPTH: i32 = 8;

/// One completed system call, written at `raw_syscalls:sys_exit`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallRecord {
    /// Monotonic clock (`bpf_ktime_get_ns`) at syscall exit, in nanoseconds.
    pub ts_ns: u64,
    /// Time from syscall entry to exit, in nanoseconds.
    pub latency_ns: u64,
    /// cgroup v2 id of the calling task.
    pub cgroup_id: u64,
    /// Raw return value; `-4095..=-1` is `-errno`.
    pub ret: i64,
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id (the kernel's pid).
    pub tid: u32,
    /// Syscall number on the host architecture.
    pub syscall_nr: u32,
    /// Always 0. (The uid was here; `bpf_get_current_uid_gid` cost ~20 ns per syscall,
    /// measured, for a field no plugin used. Kept so the layout stays 64 bytes.)
    pub reserved: u32,
    /// Task name, NUL padded.
    pub comm: [u8; COMM_LEN],
}

const _: () = assert!(size_of::<SyscallRecord>() == 64);

impl SyscallRecord {
    /// Size of one record in a batch, in bytes.
    pub const SIZE: usize = size_of::<Self>();

    /// The errno this syscall failed with, if it failed.
    #[inline]
    pub fn errno(&self) -> Option<u16> {
        (-4095..=-1).contains(&self.ret).then(|| (-self.ret) as u16)
    }

    /// `comm` up to its first NUL.
    #[inline]
    pub fn comm_bytes(&self) -> &[u8] {
        let len = self.comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
        &self.comm[..len]
    }

    /// The record's bytes, as they sit in a batch.
    #[inline]
    pub fn as_bytes(&self) -> &[u8; Self::SIZE] {
        // SAFETY: repr(C) integers with no padding (size asserted above), so every byte
        // is initialised; the array has alignment 1 and the same size.
        unsafe { &*(self as *const Self).cast::<[u8; Self::SIZE]>() }
    }

    /// Reads a record from the start of `bytes` (which need not be aligned).
    #[inline]
    pub fn read(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < Self::SIZE {
            return None;
        }
        // SAFETY: length checked above; the struct is plain integers, valid for any bits.
        Some(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

/// Where a syscall entry was seen; kept per thread between `sys_enter` and `sys_exit`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SyscallStart {
    /// `bpf_ktime_get_ns` at entry; 0 when no syscall is in flight.
    pub ts_ns: u64,
    /// Syscall number seen at entry.
    pub syscall_nr: u64,
}

/// Kernel-side filter switches, one element of the `CONFIG` array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Bit set of `FILTER_*`: which filter maps are consulted. A clear bit means "all".
    pub filters: u32,
    /// Process id whose syscalls are never recorded (the daemon itself), 0 for none.
    pub ignore_pid: u32,
    /// Ring buffer fill level in bytes past which a record wakes the reader up at once.
    pub wakeup_bytes: u64,
}

const _: () = assert!(size_of::<ProbeConfig>() == 16);

/// `ProbeConfig::filters`: only pids present in `PID_FILTER` are recorded.
pub const FILTER_PIDS: u32 = 1 << 0;
/// `ProbeConfig::filters`: only tasks whose cgroup (or an ancestor of it) is present in
/// `CGROUP_FILTER` are recorded.
pub const FILTER_CGROUPS: u32 = 1 << 1;
/// `ProbeConfig::filters`: only syscalls whose `SYSCALL_FILTER` slot is 1 are recorded.
pub const FILTER_SYSCALLS: u32 = 1 << 2;

/// Indexes of the per-CPU `COUNTERS` array map.
pub mod counter {
    /// Records lost because the ring buffer was full.
    pub const RINGBUF_FULL: u32 = 0;
    /// Number of counters.
    pub const LEN: u32 = 1;
}

/// Names of the maps in the kernel object, shared so the host cannot misspell them.
pub mod maps {
    pub const SYSCALL_EVENTS: &str = "SYSCALL_EVENTS";
    pub const CONFIG: &str = "CONFIG";
    pub const PID_FILTER: &str = "PID_FILTER";
    pub const CGROUP_FILTER: &str = "CGROUP_FILTER";
    pub const SYSCALL_FILTER: &str = "SYSCALL_FILTER";
    pub const COUNTERS: &str = "COUNTERS";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C) structs of integers with no implicit padding (sizes asserted above).
    unsafe impl aya::Pod for super::SyscallRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProbeConfig {}
}
