//! The `sched` kind: run-queue waits (runnable → running), from BTF tracepoints.
//!
//! A task becomes runnable when it is woken (`sched_wakeup`, `sched_wakeup_new`) or
//! taken off the CPU while still runnable (`sched_switch` with the previous task
//! preempted, or throttled: its cgroup ran out of CPU quota, told by the task's flag on
//! 6.18+ and by its run queue's throttle count before). The time is kept per thread id,
//! and when `sched_switch` gives the task the CPU, a wait of at least `min_wait_ns` is
//! recorded. Filters are checked when the task becomes runnable, so a filtered-out task
//! costs one lookup at `sched_switch`. Entries are rewritten in place (and marked taken
//! when the task runs), not inserted and deleted per switch, which cost more (as in the
//! syscall kind). The task is not the current one in either place: its ids, name and
//! cgroup are read from its `task_struct` at offsets the host finds in the kernel's BTF.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use core::ptr::{read_volatile, write_volatile};

    use aya_ebpf::{
        helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel_buf, generated::bpf_get_smp_processor_id},
        macros::{btf_tracepoint, map},
        maps::LruHashMap,
        programs::BtfTracePointContext,
    };
    use wasmtap_ebpf::common::{CONFIG, cgroup_id, cgroup_wanted, member, reserve, submit, wanted_by};
    use wasmtap_events::sched::{SchedRecord, reason, throttle_by};

    #[unsafe(no_mangle)]
    static TASK_PID: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_TGID: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_COMM: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_CGROUPS: u32 = 0;
    #[unsafe(no_mangle)]
    static CSS_SET_DFL_CGRP: u32 = 0;
    #[unsafe(no_mangle)]
    static THROTTLE_BY: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_THROTTLED: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_SE_CFS_RQ: u32 = 0;
    #[unsafe(no_mangle)]
    static CFS_RQ_THROTTLE_COUNT: u32 = 0;

    /// Since when a thread has been runnable, and why.
    #[derive(Clone, Copy)]
    #[repr(C)]
    struct Runnable {
        since_ns: u64,
        reason: u32,
        _pad: u32,
    }

    /// Runnable threads by thread id (LRU: a thread that exits while runnable, or was
    /// never switched in while the probe ran, is evicted in time).
    #[map(name = "RUNNABLE")]
    static RUNNABLE: LruHashMap<u32, Runnable> = LruHashMap::with_max_entries(65536, 0);

    /// The task's cgroup v2 cgroup.
    #[inline(always)]
    fn cgroup_of(task: *const u8) -> *const u8 {
        let css_set: *const u8 = member::<usize>(task, &TASK_CGROUPS) as *const u8;
        member::<usize>(css_set, &CSS_SET_DFL_CGRP) as *const u8
    }

    /// Whether `task`, leaving the CPU runnable, leaves because its cgroup is throttled.
    #[inline(always)]
    fn throttled(task: *const u8) -> bool {
        // SAFETY: plain u32 globals.
        match unsafe { read_volatile(&THROTTLE_BY) } {
            throttle_by::TASK => member::<u8>(task, &TASK_THROTTLED) != 0,
            throttle_by::CFS_RQ => {
                let cfs_rq: *const u8 = member::<usize>(task, &TASK_SE_CFS_RQ) as *const u8;
                !cfs_rq.is_null() && member::<i32>(cfs_rq, &CFS_RQ_THROTTLE_COUNT) > 0
            }
            _ => false,
        }
    }

    #[btf_tracepoint(function = "sched_wakeup")]
    pub fn wt_sched_wakeup(ctx: BtfTracePointContext) -> i32 {
        // sched_wakeup(struct task_struct *p)
        runnable(ctx.arg(0), reason::WAKEUP);
        0
    }

    #[btf_tracepoint(function = "sched_wakeup_new")]
    pub fn wt_sched_wakeup_new(ctx: BtfTracePointContext) -> i32 {
        // sched_wakeup_new(struct task_struct *p)
        runnable(ctx.arg(0), reason::WAKEUP);
        0
    }

    #[btf_tracepoint(function = "sched_switch")]
    pub fn wt_sched_switch(ctx: BtfTracePointContext) -> i32 {
        // sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next,
        //              unsigned int prev_state): prev_state 0 is TASK_RUNNING.
        let (preempt, prev_state) = (ctx.arg::<u64>(0) as u8, ctx.arg::<u64>(3) as u32);
        if preempt != 0 || prev_state == 0 {
            let prev: *const u8 = ctx.arg(1);
            runnable(prev, if throttled(prev) { reason::THROTTLED } else { reason::PREEMPTED });
        }
        running(ctx.arg(2));
        0
    }

    /// `task` became runnable now, for `why`: remembered if the filters want it.
    #[inline(always)]
    fn runnable(task: *const u8, why: u32) {
        let Some(config) = CONFIG.get(0) else { return };
        let tid = member::<u32>(task, &TASK_PID);
        if tid == 0 {
            return; // an idle task
        }
        if !wanted_by(config, member::<u32>(task, &TASK_TGID), why, || cgroup_wanted(cgroup_of(task))) {
            return;
        }
        // SAFETY: the helper has no preconditions.
        let since_ns = unsafe { bpf_ktime_get_ns() };
        match RUNNABLE.get_ptr_mut(&tid) {
            // SAFETY: a pointer into the map's value for this thread.
            Some(entry) => unsafe {
                (*entry).since_ns = since_ns;
                (*entry).reason = why;
            },
            None => drop(RUNNABLE.insert(&tid, &Runnable { since_ns, reason: why, _pad: 0 }, 0)),
        }
    }

    /// `task` got the CPU: its wait is recorded if it is long enough.
    #[inline(always)]
    fn running(task: *const u8) {
        let tid = member::<u32>(task, &TASK_PID);
        let Some(entry) = RUNNABLE.get_ptr_mut(&tid) else { return };
        // SAFETY: a pointer into the map's value for this thread. Marked as taken with a
        // store in place (a delete per switch cost more).
        let (since_ns, reason) = unsafe { ((*entry).since_ns, (*entry).reason) };
        // SAFETY: as above; volatile, so it stays one store.
        unsafe { write_volatile(&raw mut (*entry).since_ns, 0) };
        if since_ns == 0 {
            return; // not runnable since it last ran
        }
        let Some(config) = CONFIG.get(0) else { return };
        // SAFETY: the helper has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        let wait_ns = now.saturating_sub(since_ns);
        if wait_ns < config.min_value {
            return;
        }
        let Some(mut entry) = reserve::<SchedRecord>() else { return };
        let r = entry.as_mut_ptr();
        // SAFETY: `r` points at a reserved, writable `SchedRecord` in the ring buffer;
        // every field is written before submit (`comm` in full by the helper, which
        // zero-fills it on failure). The helpers have no preconditions.
        unsafe {
            (*r).header.ts_ns = now;
            (*r).header.cgroup_id = cgroup_id(cgroup_of(task));
            (*r).header.pid = member::<u32>(task, &TASK_TGID);
            (*r).header.tid = tid;
            let _ = bpf_probe_read_kernel_buf(task.add(read_volatile(&TASK_COMM) as usize), &mut (*r).header.comm);
            (*r).wait_ns = wait_ns;
            (*r).reason = reason;
            (*r).cpu = bpf_get_smp_processor_id();
        }
        submit(entry, config);
    }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
