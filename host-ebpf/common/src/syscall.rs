//! The `syscall` kind: one record per completed system call.

use core::mem::{offset_of, size_of};

use crate::{Record, RecordHeader};

/// One completed system call, written at `raw_syscalls:sys_exit`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallRecord {
    /// `ts_ns` is the syscall's exit.
    pub header: RecordHeader,
    /// Time from syscall entry to exit, in nanoseconds.
    pub latency_ns: u64,
    /// Raw return value; `-4095..=-1` is `-errno`.
    pub ret: i64,
    /// Syscall number on the host architecture.
    pub syscall_nr: u32,
    /// Always 0. (A uid here cost ~20 ns per syscall, measured, for a field no plugin
    /// used; enrichment answers it per process instead.)
    pub reserved: u32,
}

const _: () = assert!(size_of::<SyscallRecord>() == 64);
const _: () = assert!(offset_of!(SyscallRecord, header) == 0);

// SAFETY: repr(C), integers only, no padding (size asserted above).
unsafe impl Record for SyscallRecord {
    const KIND: &'static str = "syscall";
}

/// Where the host finds the selector (the syscall number) in a record.
pub const SELECTOR_OFFSET: usize = offset_of!(SyscallRecord, syscall_nr);

impl SyscallRecord {
    /// The errno this syscall failed with, if it failed.
    #[inline]
    pub fn errno(&self) -> Option<u16> {
        (-4095..=-1).contains(&self.ret).then(|| (-self.ret) as u16)
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
