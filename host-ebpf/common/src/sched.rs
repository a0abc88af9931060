//! The `sched` kind: run-queue waits, the time a runnable task waited for a CPU.

use core::mem::{offset_of, size_of};

use crate::{Record, RecordHeader};

/// Values of [`SchedRecord::reason`] (the kind's selector): why the task was runnable.
pub mod reason {
    /// It was woken up (or is new) and waited to run.
    pub const WAKEUP: u32 = 1;
    /// It was taken off the CPU while still runnable: preempted by another task, or its
    /// cgroup ran out of CPU quota (throttled; then the wait is the throttled interval).
    pub const PREEMPTED: u32 = 2;
}

/// One run-queue wait of at least the subscriptions' `min_wait_ns`, written at
/// `sched_switch` when the task that waited gets the CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedRecord {
    /// The task that waited (not the one running the program); `ts_ns` is when it got
    /// the CPU.
    pub header: RecordHeader,
    /// How long it was runnable without running, nanoseconds.
    pub wait_ns: u64,
    /// One of [`reason`].
    pub reason: u32,
    /// The CPU it got.
    pub cpu: u32,
}

const _: () = assert!(size_of::<SchedRecord>() == 56);
const _: () = assert!(offset_of!(SchedRecord, header) == 0);

// SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
unsafe impl Record for SchedRecord {
    const KIND: &'static str = "sched";
}

/// Where the host finds the selector (the reason) in a record.
pub const SELECTOR_OFFSET: usize = offset_of!(SchedRecord, reason);
/// Where the host finds the value `min_wait_ns` applies to.
pub const THRESHOLD_OFFSET: usize = offset_of!(SchedRecord, wait_ns);

/// Member offsets the sched programs read from kernel structs (set by the host from the
/// kernel's BTF): the waiting task is not the current one, so its ids, name and cgroup
/// come from its `task_struct`.
pub mod offsets {
    pub const TASK_PID: &str = "TASK_PID";
    pub const TASK_TGID: &str = "TASK_TGID";
    pub const TASK_COMM: &str = "TASK_COMM";
    pub const TASK_CGROUPS: &str = "TASK_CGROUPS";
    pub const CSS_SET_DFL_CGRP: &str = "CSS_SET_DFL_CGRP";
    pub const CGROUP_KN: &str = "CGROUP_KN";
    pub const KERNFS_NODE_ID: &str = "KERNFS_NODE_ID";
    pub const KERNFS_NODE_PARENT: &str = "KERNFS_NODE_PARENT";
}
