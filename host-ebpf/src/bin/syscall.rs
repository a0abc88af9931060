//! The `syscall` kind: one `SyscallRecord` per completed syscall, from `raw_syscalls`.
//!
//! Two attach flavours share the logic: BTF tracepoints (`tp_btf`, cheapest, preferred)
//! and classic tracepoints (fallback for kernels without BTF).
//!
//! Cost decisions (each measured on the traced getppid loop of `./dev bench`):
//! - filters are checked at entry, so a filtered-out syscall costs one array lookup and
//!   never touches the start map or the ring buffer;
//! - start timestamps live in an LRU hash keyed by thread id and are rewritten in place,
//!   not inserted and deleted per syscall (`bpf_map_update_elem` + `delete` per call cost
//!   more than the in-place store);
//! - a thread's entry is deleted when the thread exits (`sched_process_exit`): `exit`
//!   and `exit_group` never reach `sys_exit`, and a later thread that reuses the id
//!   must not pair its first `sys_exit` (its return from fork) with the dead thread's
//!   entry; likewise when a non-leader thread execs and takes the leader's id
//!   (`sched_process_exec`), for the id it leaves;
//! - records are submitted with `BPF_RB_NO_WAKEUP` (see `common::submit`).
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
        macros::{btf_tracepoint, map, tracepoint},
        maps::LruHashMap,
        programs::{BtfTracePointContext, TracePointContext},
    };
    use wasmtap_ebpf::common::{CONFIG, fill_header, reserve, submit, wanted};
    use wasmtap_events::syscall::{SyscallRecord, SyscallStart};

    /// Syscall entry per thread id.
    #[map(name = "STARTS")]
    static STARTS: LruHashMap<u32, SyscallStart> = LruHashMap::with_max_entries(65536, 0);

    #[btf_tracepoint(function = "sys_enter")]
    pub fn wt_sys_enter(ctx: BtfTracePointContext) -> i32 {
        // sys_enter(struct pt_regs *regs, long id)
        on_enter(ctx.arg::<i64>(1) as u64);
        0
    }

    #[btf_tracepoint(function = "sys_exit")]
    pub fn wt_sys_exit(ctx: BtfTracePointContext) -> i32 {
        // sys_exit(struct pt_regs *regs, long ret)
        on_exit(ctx.arg::<i64>(1));
        0
    }

    #[btf_tracepoint(function = "sched_process_exit")]
    pub fn wt_sys_task_exit(_ctx: BtfTracePointContext) -> i32 {
        forget_thread();
        0
    }

    #[btf_tracepoint(function = "sched_process_exec")]
    pub fn wt_sys_task_exec(ctx: BtfTracePointContext) -> i32 {
        // sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
        forget_exec_thread(ctx.arg::<u64>(1) as u32);
        0
    }

    #[tracepoint(category = "raw_syscalls", name = "sys_enter")]
    pub fn wt_sys_enter_tp(ctx: TracePointContext) -> u32 {
        // format: common header (8 bytes), long id, unsigned long args[6]
        // SAFETY: offset 8 is `id` in the raw_syscalls:sys_enter format on 64-bit kernels.
        if let Ok(id) = unsafe { ctx.read_at::<i64>(8) } {
            on_enter(id as u64);
        }
        0
    }

    #[tracepoint(category = "raw_syscalls", name = "sys_exit")]
    pub fn wt_sys_exit_tp(ctx: TracePointContext) -> u32 {
        // format: common header (8 bytes), long id, long ret
        // SAFETY: offset 16 is `ret` in the raw_syscalls:sys_exit format on 64-bit kernels.
        if let Ok(ret) = unsafe { ctx.read_at::<i64>(16) } {
            on_exit(ret);
        }
        0
    }

    #[tracepoint(category = "sched", name = "sched_process_exit")]
    pub fn wt_sys_task_exit_tp(_ctx: TracePointContext) -> u32 {
        forget_thread();
        0
    }

    #[tracepoint(category = "sched", name = "sched_process_exec")]
    pub fn wt_sys_task_exec_tp(ctx: TracePointContext) -> u32 {
        // format: common header (8 bytes), __data_loc filename (4), pid (4), old_pid (4)
        // SAFETY: offset 16 is `old_pid` in the sched:sched_process_exec format.
        if let Ok(old_pid) = unsafe { ctx.read_at::<u32>(16) } {
            forget_exec_thread(old_pid);
        }
        0
    }

    #[inline(always)]
    fn on_enter(syscall_nr: u64) {
        let Some(config) = CONFIG.get(0) else { return };
        let pid_tgid = bpf_get_current_pid_tgid();
        if !wanted(config, (pid_tgid >> 32) as u32, syscall_nr as u32) {
            return;
        }
        let tid = pid_tgid as u32;
        // SAFETY: the helper has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        match STARTS.get_ptr_mut(&tid) {
            // SAFETY: the pointer is the map's value for this thread; only this thread writes it.
            Some(start) => unsafe {
                (*start).ts_ns = now;
                (*start).syscall_nr = syscall_nr;
            },
            None => {
                let start = SyscallStart { ts_ns: now, syscall_nr };
                // A full LRU map evicts the oldest thread; nothing to report here.
                let _ = STARTS.insert(&tid, &start, 0);
            }
        }
    }

    #[inline(always)]
    fn on_exit(ret: i64) {
        let pid_tgid = bpf_get_current_pid_tgid();
        let tid = pid_tgid as u32;
        let Some(start) = STARTS.get_ptr_mut(&tid) else { return };
        // SAFETY: the pointer is this thread's map value; only this thread writes it.
        let (started, syscall_nr) = unsafe { ((*start).ts_ns, (*start).syscall_nr) };
        if started == 0 {
            return; // entered before the probes were attached, or filtered out
        }
        // SAFETY: as above.
        unsafe { (*start).ts_ns = 0 };
        let Some(config) = CONFIG.get(0) else { return };
        // SAFETY: the helper has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        let Some(mut entry) = reserve::<SyscallRecord>() else { return };
        let record = entry.as_mut_ptr();
        // SAFETY: `record` points at a reserved, writable `SyscallRecord` in the ring
        // buffer; every field is written before submit.
        unsafe {
            fill_header(&raw mut (*record).header, pid_tgid, now);
            (*record).latency_ns = now.wrapping_sub(started);
            (*record).ret = ret;
            (*record).syscall_nr = syscall_nr as u32;
            (*record).reserved = 0;
        }
        submit(entry, config);
    }

    /// A thread other than the leader exec'd: it now has the leader's id, and its own
    /// (its execve's entry) must not wait for a later thread that reuses the id.
    #[inline(always)]
    fn forget_exec_thread(old_tid: u32) {
        if old_tid != bpf_get_current_pid_tgid() as u32 {
            let _ = STARTS.remove(&old_tid);
        }
    }

    /// The current thread is exiting: its entry (for `exit` or `exit_group`, which never
    /// return) must not outlive it.
    #[inline(always)]
    fn forget_thread() {
        let tid = bpf_get_current_pid_tgid() as u32;
        let _ = STARTS.remove(&tid);
    }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
