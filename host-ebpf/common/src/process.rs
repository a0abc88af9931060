//! The `process` kind: process lifecycle (fork, exec, exit).

use core::mem::{offset_of, size_of};

use crate::{Record, RecordHeader};

/// Longest exec filename a record carries, NUL included; longer ones are cut.
pub const FILENAME_LEN: usize = 256;

/// Values of [`ProcessRecord::event`] (the kind's selector).
pub mod event {
    /// A new process (not a thread): the header is the parent, `child_pid` the child.
    pub const FORK: u32 = 1;
    /// A successful exec: the header is the process after it, `filename` what it ran.
    pub const EXEC: u32 = 2;
    /// The last thread of a process exited: `exit_code`, `signal`, `lifetime_ns`.
    pub const EXIT: u32 = 3;
}

/// One process lifecycle event, written at the `sched_process_fork`, `_exec` and
/// `_exit` BTF tracepoints.
///
/// Layout history: 0.2.0 defined the first 64 bytes; 0.2.1 appended `lifetime_ns` and
/// `filename`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessRecord {
    /// The process the event is about (for a fork, the parent).
    pub header: RecordHeader,
    /// One of [`event`].
    pub event: u32,
    /// Parent process id (tgid of the real parent).
    pub ppid: u32,
    /// Real user id.
    pub uid: u32,
    /// Fork: the child's process id; 0 otherwise.
    pub child_pid: u32,
    /// Exit: the exit status (0–255) the process passed to exit; 0 when killed. (The
    /// header's comm is then the process's main thread's.)
    pub exit_code: i32,
    /// Exit: the signal that terminated the process, 0 when it exited by itself.
    pub signal: u32,
    /// Exit: time since the process started, nanoseconds. (0.2.1)
    pub lifetime_ns: u64,
    /// Exec: the path passed to exec, NUL terminated, cut to fit. (0.2.1)
    pub filename: [u8; FILENAME_LEN],
}

const _: () = assert!(size_of::<ProcessRecord>() == 328);
const _: () = assert!(offset_of!(ProcessRecord, header) == 0);

/// Size of the 0.2.0 layout, which ended after `signal`.
pub const SIZE_0_2_0: usize = offset_of!(ProcessRecord, lifetime_ns);

impl Default for ProcessRecord {
    fn default() -> Self {
        Self { header: RecordHeader::default(), event: 0, ppid: 0, uid: 0, child_pid: 0, exit_code: 0, signal: 0, lifetime_ns: 0, filename: [0; FILENAME_LEN] }
    }
}

// SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
unsafe impl Record for ProcessRecord {
    const KIND: &'static str = "process";
}

/// Where the host finds the selector (the event) in a record.
pub const SELECTOR_OFFSET: usize = offset_of!(ProcessRecord, event);

impl ProcessRecord {
    /// `filename` up to its first NUL.
    #[inline]
    pub fn filename_bytes(&self) -> &[u8] {
        let len = self.filename.iter().position(|&b| b == 0).unwrap_or(FILENAME_LEN);
        &self.filename[..len]
    }
}

/// Member offsets the process programs read from kernel structs; the host finds them
/// in the kernel's BTF and writes them into the object's globals before loading.
pub mod offsets {
    /// Global names in the kernel object.
    pub const TASK_PID: &str = "TASK_PID";
    pub const TASK_TGID: &str = "TASK_TGID";
    pub const TASK_REAL_PARENT: &str = "TASK_REAL_PARENT";
    pub const TASK_GROUP_LEADER: &str = "TASK_GROUP_LEADER";
    pub const TASK_START_TIME: &str = "TASK_START_TIME";
    pub const TASK_EXIT_CODE: &str = "TASK_EXIT_CODE";
    pub const TASK_COMM: &str = "TASK_COMM";
    pub const TASK_SIGNAL: &str = "TASK_SIGNAL";
    pub const SIGNAL_LIVE: &str = "SIGNAL_LIVE";
    pub const BPRM_FILENAME: &str = "BPRM_FILENAME";
}
