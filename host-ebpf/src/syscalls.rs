//! `raw_syscalls` probes: one `SyscallRecord` per completed syscall.
//!
//! Two attach flavours share the logic: BTF tracepoints (`tp_btf`, cheapest, preferred)
//! and classic tracepoints (fallback for kernels without BTF).
//!
//! Cost decisions (each measured on the traced getppid loop of `./dev bench`):
//! - filters are checked at entry, so a filtered-out syscall costs one array lookup and
//!   never touches the start map or the ring buffer;
//! - start timestamps live in an LRU hash keyed by thread id and are rewritten in place,
//!   not inserted and deleted per syscall (`bpf_map_update_elem` + `delete` per call cost
//!   more than the in-place store); LRU reclaims the slots of exited threads;
//! - records are submitted with `BPF_RB_NO_WAKEUP`; the reader drains on a timer, and a
//!   record only forces a wakeup once the buffer is past `ProbeConfig::wakeup_bytes`.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm},
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
};
use wasmtap_events::{
    COMM_LEN, FILTER_CGROUPS, FILTER_PIDS, FILTER_SYSCALLS, MAX_CGROUP_DEPTH, MAX_FILTER_ENTRIES, MAX_SYSCALLS, ProbeConfig,
    SyscallRecord, SyscallStart, counter,
};

/// Records for the host. The size is a placeholder; the host sets it at load time.
#[map(name = "SYSCALL_EVENTS")]
static SYSCALL_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

#[map(name = "CONFIG")]
static CONFIG: Array<ProbeConfig> = Array::with_max_entries(1, 0);

#[map(name = "PID_FILTER")]
static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[map(name = "CGROUP_FILTER")]
static CGROUP_FILTER: HashMap<u64, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[map(name = "SYSCALL_FILTER")]
static SYSCALL_FILTER: Array<u8> = Array::with_max_entries(MAX_SYSCALLS, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

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

#[inline(always)]
fn on_enter(syscall_nr: u64) {
    let Some(config) = CONFIG.get(0) else { return };
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    if pid == config.ignore_pid {
        return;
    }
    let filters = config.filters;
    if filters != 0 && !wanted(filters, pid, syscall_nr) {
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
fn wanted(filters: u32, pid: u32, syscall_nr: u64) -> bool {
    if filters & FILTER_SYSCALLS != 0 {
        if syscall_nr >= MAX_SYSCALLS as u64 {
            return false;
        }
        match SYSCALL_FILTER.get(syscall_nr as u32) {
            Some(&1) => {}
            _ => return false,
        }
    }
    // SAFETY: the value is only tested for presence, never read.
    if filters & FILTER_PIDS != 0 && unsafe { PID_FILTER.get(&pid) }.is_none() {
        return false;
    }
    if filters & FILTER_CGROUPS != 0 && !cgroup_wanted() {
        return false;
    }
    true
}

/// Whether the task's cgroup or one of its ancestors is in `CGROUP_FILTER` (a tenant's
/// scope is a subtree, which may gain cgroups at any time).
#[inline(always)]
fn cgroup_wanted() -> bool {
    // SAFETY: the helper has no preconditions.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is only tested for presence, never read.
    if unsafe { CGROUP_FILTER.get(&cgroup) }.is_some() {
        return true;
    }
    for level in 1..=MAX_CGROUP_DEPTH {
        // SAFETY: the helper has no preconditions; it returns 0 past the task's depth.
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 || ancestor == cgroup {
            return false;
        }
        // SAFETY: presence only.
        if unsafe { CGROUP_FILTER.get(&ancestor) }.is_some() {
            return true;
        }
    }
    false
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

    let Some(mut entry) = SYSCALL_EVENTS.reserve::<SyscallRecord>(0) else {
        if let Some(full) = COUNTERS.get_ptr_mut(counter::RINGBUF_FULL) {
            // SAFETY: per-CPU slot, and tracing programs do not nest on one CPU here.
            unsafe { *full += 1 };
        }
        return;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points at a reserved, writable `SyscallRecord` in the ring buffer;
    // every field is written before submit.
    unsafe {
        (*record).ts_ns = now;
        (*record).latency_ns = now.wrapping_sub(started);
        (*record).cgroup_id = bpf_get_current_cgroup_id();
        (*record).ret = ret;
        (*record).pid = (pid_tgid >> 32) as u32;
        (*record).tid = tid;
        (*record).syscall_nr = syscall_nr as u32;
        (*record).reserved = 0;
        // On failure the helper zero-fills `comm` itself.
        bpf_get_current_comm((*record).comm.as_mut_ptr().cast(), COMM_LEN as u32);
    }
    let flags = if SYSCALL_EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= config.wakeup_bytes {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags as u64);
}
