//! The `process` kind: fork, exec and exit of processes, from BTF tracepoints.
//!
//! Kernel struct members are read at offsets the host finds in the running kernel's BTF
//! and writes into the globals below before loading (Rust eBPF programs get no CO-RE
//! relocations). Threads are not processes: a fork that creates a thread, and the exit
//! of a thread that leaves others running, are not recorded.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use core::ptr::{read_volatile, write_volatile};

    use aya_ebpf::{
        helpers::{
            bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel_buf,
            generated::{bpf_get_current_task, bpf_probe_read_kernel_str},
        },
        macros::btf_tracepoint,
        programs::BtfTracePointContext,
    };
    use wasmtap_ebpf::common::{CONFIG, fill_header, member, reserve, submit, wanted};
    use wasmtap_events::process::{FILENAME_LEN, ProcessRecord, event};

    // Member offsets, set by the host from the kernel's BTF (see `offsets` in the
    // layout crate for the names). Read volatile so the compiler keeps the load the
    // loader patches.
    #[unsafe(no_mangle)]
    static TASK_PID: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_TGID: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_REAL_PARENT: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_GROUP_LEADER: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_START_TIME: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_EXIT_CODE: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_COMM: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_SIGNAL: u32 = 0;
    #[unsafe(no_mangle)]
    static SIGNAL_LIVE: u32 = 0;
    #[unsafe(no_mangle)]
    static BPRM_FILENAME: u32 = 0;

    #[btf_tracepoint(function = "sched_process_fork")]
    pub fn wt_process_fork(ctx: BtfTracePointContext) -> i32 {
        // sched_process_fork(struct task_struct *parent, struct task_struct *child)
        let child: *const u8 = ctx.arg(1);
        let (pid, tgid) = (member::<u32>(child, &TASK_PID), member::<u32>(child, &TASK_TGID));
        if pid != tgid {
            return 0; // a new thread, not a process
        }
        record(event::FORK, |r| {
            // SAFETY: `r` is the reserved record `record` hands out.
            unsafe { (*r).child_pid = tgid };
        });
        0
    }

    #[btf_tracepoint(function = "sched_process_exec")]
    pub fn wt_process_exec(ctx: BtfTracePointContext) -> i32 {
        // sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
        let bprm: *const u8 = ctx.arg(2);
        let filename: *const u8 = member::<usize>(bprm, &BPRM_FILENAME) as *const u8;
        record(event::EXEC, |r| {
            // SAFETY: `r` is the reserved record, `filename` the field's full length; the
            // helper checks the source address and NUL-terminates.
            unsafe { bpf_probe_read_kernel_str((*r).filename.as_mut_ptr().cast(), FILENAME_LEN as u32, filename.cast()) };
        });
        0
    }

    #[btf_tracepoint(function = "sched_process_exit")]
    pub fn wt_process_exit(ctx: BtfTracePointContext) -> i32 {
        // sched_process_exit(struct task_struct *p[, bool group_dead]): the second
        // argument only exists since 6.16, so read what it says from the task: do_exit
        // has counted this thread out of `signal->live` before the tracepoint.
        let task: *const u8 = ctx.arg(0);
        let signal: *const u8 = member::<usize>(task, &TASK_SIGNAL) as *const u8;
        if member::<i32>(signal, &SIGNAL_LIVE) != 0 {
            return 0; // other threads of the process live on
        }
        let code = member::<i32>(task, &TASK_EXIT_CODE);
        let leader: *const u8 = member::<usize>(task, &TASK_GROUP_LEADER) as *const u8;
        let started = member::<u64>(leader, &TASK_START_TIME);
        record(event::EXIT, |r| {
            // SAFETY: `r` is the reserved record; its header was just written. The
            // leader (a zombie until the process is reaped) names the process, not the
            // thread that happened to exit last.
            unsafe {
                let _ = bpf_probe_read_kernel_buf(leader.add(read_volatile(&TASK_COMM) as usize), &mut (*r).header.comm);
                (*r).exit_code = (code >> 8) & 0xff;
                (*r).signal = (code & 0x7f) as u32;
                (*r).lifetime_ns = if started == 0 { 0 } else { (*r).header.ts_ns.saturating_sub(started) };
            }
        });
        0
    }

    /// Writes one record about the current task if the filters want it; `fill` sets the
    /// event's own fields on the otherwise zeroed record.
    #[inline(always)]
    fn record(kind: u32, fill: impl FnOnce(*mut ProcessRecord)) {
        let Some(config) = CONFIG.get(0) else { return };
        let pid_tgid = bpf_get_current_pid_tgid();
        if !wanted(config, (pid_tgid >> 32) as u32, kind) {
            return;
        }
        let Some(mut entry) = reserve::<ProcessRecord>() else { return };
        let r = entry.as_mut_ptr();
        // SAFETY: the current task is valid for the program's run.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        let parent: *const u8 = member::<usize>(task, &TASK_REAL_PARENT) as *const u8;
        // SAFETY: `r` points at a reserved, writable `ProcessRecord` in the ring buffer;
        // every field is written before submit (zeros by volatile stores: runs of zero
        // stores the compiler merges into `memset` do not link for BPF).
        unsafe {
            // SAFETY: the helper has no preconditions.
            fill_header(&raw mut (*r).header, pid_tgid, bpf_ktime_get_ns());
            (*r).event = kind;
            (*r).ppid = member::<u32>(parent, &TASK_TGID);
            (*r).uid = bpf_get_current_uid_gid() as u32;
            write_volatile(&raw mut (*r).child_pid, 0);
            write_volatile(&raw mut (*r).exit_code, 0);
            write_volatile(&raw mut (*r).signal, 0);
            write_volatile(&raw mut (*r).lifetime_ns, 0);
            let words = (*r).filename.as_mut_ptr().cast::<u64>();
            for i in 0..FILENAME_LEN / 8 {
                write_volatile(words.add(i), 0);
            }
        }
        fill(r);
        submit(entry, config);
    }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
