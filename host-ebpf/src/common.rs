//! Maps and helpers every kind's object has. The host programs the filter maps and
//! `CONFIG` from the union of the plugins' subscriptions to the kind.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf, ring_buf::RingBufEntry},
};
use wasmtap_events::{
    COMM_LEN, FILTER_CGROUPS, FILTER_PIDS, FILTER_SELECTORS, MAX_CGROUP_DEPTH, MAX_FILTER_ENTRIES, MAX_SELECTORS, ProbeConfig, RecordHeader, counter,
};

/// Records for the host. The size is a placeholder; the host sets it at load time.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 22, 0);

#[map(name = "CONFIG")]
pub static CONFIG: Array<ProbeConfig> = Array::with_max_entries(1, 0);

#[map(name = "PID_FILTER")]
static PID_FILTER: HashMap<u32, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[map(name = "CGROUP_FILTER")]
static CGROUP_FILTER: HashMap<u64, u8> = HashMap::with_max_entries(MAX_FILTER_ENTRIES, 0);

#[map(name = "SELECTOR_FILTER")]
static SELECTOR_FILTER: Array<u8> = Array::with_max_entries(MAX_SELECTORS, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// Whether an event of the current task, process `pid`, with `selector` passes the
/// kernel filters.
#[inline(always)]
pub fn wanted(config: &ProbeConfig, pid: u32, selector: u32) -> bool {
    wanted_by(config, pid, selector, current_cgroup_wanted)
}

/// Whether an event of process `pid` with `selector` passes the kernel filters;
/// `cgroup_wanted` says whether the task's cgroup does (only asked when cgroups are
/// filtered: finding a task's cgroup costs).
#[inline(always)]
pub fn wanted_by(config: &ProbeConfig, pid: u32, selector: u32, cgroup_wanted: impl FnOnce() -> bool) -> bool {
    if pid == config.ignore_pid {
        return false;
    }
    let filters = config.filters;
    if filters == 0 {
        return true;
    }
    if filters & FILTER_SELECTORS != 0 {
        if selector >= MAX_SELECTORS {
            return false;
        }
        match SELECTOR_FILTER.get(selector) {
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

/// Whether cgroup `id` is in `CGROUP_FILTER`.
#[inline(always)]
pub fn cgroup_in_filter(id: u64) -> bool {
    // SAFETY: the value is only tested for presence, never read.
    unsafe { CGROUP_FILTER.get(&id) }.is_some()
}

/// Whether the current task's cgroup or one of its ancestors is in `CGROUP_FILTER` (a
/// tenant's scope is a subtree, which may gain cgroups at any time).
#[inline(always)]
fn current_cgroup_wanted() -> bool {
    // SAFETY: the helper has no preconditions.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    if cgroup_in_filter(cgroup) {
        return true;
    }
    for level in 1..=MAX_CGROUP_DEPTH {
        // SAFETY: the helper has no preconditions; it returns 0 past the task's depth.
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 || ancestor == cgroup {
            return false;
        }
        if cgroup_in_filter(ancestor) {
            return true;
        }
    }
    false
}

/// Reserves one record of type `T` in the ring buffer; a full buffer is counted.
#[inline(always)]
pub fn reserve<T: 'static>() -> Option<RingBufEntry<T>> {
    let entry = EVENTS.reserve::<T>(0);
    if entry.is_none()
        && let Some(full) = COUNTERS.get_ptr_mut(counter::RINGBUF_FULL)
    {
        // SAFETY: per-CPU slot, and tracing programs do not nest on one CPU here.
        unsafe { *full += 1 };
    }
    entry
}

/// Writes the header of a record about the current task, written at `now`.
///
/// # Safety
/// `header` points at a writable header in a reserved ring buffer record.
#[inline(always)]
pub unsafe fn fill_header(header: *mut RecordHeader, pid_tgid: u64, now: u64) {
    // SAFETY: per the function's contract; the helpers have no preconditions, and on
    // failure `bpf_get_current_comm` zero-fills `comm` itself.
    unsafe {
        (*header).ts_ns = now;
        (*header).cgroup_id = bpf_get_current_cgroup_id();
        (*header).pid = (pid_tgid >> 32) as u32;
        (*header).tid = pid_tgid as u32;
        bpf_get_current_comm((*header).comm.as_mut_ptr().cast(), COMM_LEN as u32);
    }
}

/// Submits a record without waking the reader (it drains on a timer), unless the
/// buffer is past the wake-up level.
#[inline(always)]
pub fn submit<T>(entry: RingBufEntry<T>, config: &ProbeConfig) {
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= config.wakeup_bytes { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    entry.submit(flags as u64);
}
