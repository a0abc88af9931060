//! The `sched` kind: run-queue waits, the time a runnable task waited for a CPU.

use core::mem::{offset_of, size_of};

use crate::{Record, RecordHeader};

/// Values of [`SchedRecord::reason`] (the kind's selector): why the task was runnable.
pub mod reason {
    /// It was woken up (or is new) and waited to run.
    pub const WAKEUP: u32 = 1;
    /// It was taken off the CPU while still runnable, preempted by another task.
    pub const PREEMPTED: u32 = 2;
    /// It was taken off the CPU because its cgroup ran out of CPU quota (CFS bandwidth
    /// throttling): the wait is its throttled interval (and what waiting for a CPU
    /// followed).
    pub const THROTTLED: u32 = 3;
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
/// come from its `task_struct` (and the cgroup's, `crate::cgroup_offsets`).
pub mod offsets {
    pub const TASK_PID: &str = "TASK_PID";
    pub const TASK_TGID: &str = "TASK_TGID";
    pub const TASK_COMM: &str = "TASK_COMM";
    pub const TASK_CGROUPS: &str = "TASK_CGROUPS";
    pub const CSS_SET_DFL_CGRP: &str = "CSS_SET_DFL_CGRP";
    /// How a throttled task is told: one of [`super::throttle_by`].
    pub const THROTTLE_BY: &str = "THROTTLE_BY";
    /// `task_struct.throttled` (Linux 6.18 and later), for `throttle_by::TASK`.
    pub const TASK_THROTTLED: &str = "TASK_THROTTLED";
    /// `task_struct.se.cfs_rq` and `cfs_rq.throttle_count`, for `throttle_by::CFS_RQ`.
    pub const TASK_SE_CFS_RQ: &str = "TASK_SE_CFS_RQ";
    pub const CFS_RQ_THROTTLE_COUNT: &str = "CFS_RQ_THROTTLE_COUNT";
}

/// Values of the `THROTTLE_BY` global: where the program reads whether the task leaving
/// the CPU is being throttled.
pub mod throttle_by {
    /// The kernel has neither: no wait is reported as throttled.
    pub const NONE: u32 = 0;
    /// The task's own flag (the task-based throttling of Linux 6.18).
    pub const TASK: u32 = 1;
    /// Its run queue's (or an ancestor's) throttle count (kernels before 6.18).
    pub const CFS_RQ: u32 = 2;
}
