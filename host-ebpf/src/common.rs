//! Maps and helpers every kind's object has. The host programs the filter maps and
//! `CONFIG` from the union of the plugins' subscriptions to the kind.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm},
    },
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
    selected(config, selector) && who_wanted(config, pid, cgroup_wanted)
}

/// Whether `selector` passes the selector filter.
#[inline(always)]
pub fn selected(config: &ProbeConfig, selector: u32) -> bool {
    if config.filters & FILTER_SELECTORS == 0 {
        return true;
    }
    selector < MAX_SELECTORS && matches!(SELECTOR_FILTER.get(selector), Some(&1))
}

/// Whether process `pid` (and its cgroup, see [`wanted_by`]) passes the pid and cgroup
/// filters, and is not the daemon.
#[inline(always)]
pub fn who_wanted(config: &ProbeConfig, pid: u32, cgroup_wanted: impl FnOnce() -> bool) -> bool {
    family_wanted(config, pid, 0, cgroup_wanted)
}

/// [`who_wanted`], where the pid filter also passes a process whose parent `parent`
/// (0: none) is in it (the `uprobe` kind: a server and its workers).
#[inline(always)]
pub fn family_wanted(config: &ProbeConfig, pid: u32, parent: u32, cgroup_wanted: impl FnOnce() -> bool) -> bool {
    if pid == config.ignore_pid {
        return false;
    }
    let filters = config.filters;
    // SAFETY: the values are only tested for presence, never read.
    let in_filter = |pid: u32| unsafe { PID_FILTER.get(&pid) }.is_some();
    if filters & FILTER_PIDS != 0 && !in_filter(pid) && (parent == 0 || !in_filter(parent)) {
        return false;
    }
    filters & FILTER_CGROUPS == 0 || cgroup_wanted()
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
pub fn current_cgroup_wanted() -> bool {
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

/// Reads a `T` at `offset` (a global the host sets from the kernel's BTF) bytes into
/// kernel struct `base`; the default value if it cannot be read.
#[inline(always)]
pub fn member<T: Default>(base: *const u8, offset: &'static u32) -> T {
    // SAFETY: the global is a plain u32; `bpf_probe_read_kernel` checks the address.
    unsafe { bpf_probe_read_kernel(base.add(read_volatile(offset) as usize).cast::<T>()) }.unwrap_or_default()
}

// Offsets in `struct cgroup` and `struct kernfs_node` (`wasmtap_events::cgroup_offsets`),
// for the cgroup of a task or socket that is not the current task's.
#[unsafe(no_mangle)]
static CGROUP_KN: u32 = 0;
#[unsafe(no_mangle)]
static CGROUP_LEVEL: u32 = 0;
#[unsafe(no_mangle)]
static CGROUP_ANCESTORS: u32 = 0;
#[unsafe(no_mangle)]
static KERNFS_NODE_ID: u32 = 0;

/// A cgroup's id (its kernfs node's), 0 if unreadable.
#[inline(always)]
pub fn cgroup_id(cgroup: *const u8) -> u64 {
    let node: *const u8 = member::<usize>(cgroup, &CGROUP_KN) as *const u8;
    if node.is_null() { 0 } else { member::<u64>(node, &KERNFS_NODE_ID) }
}

/// Whether `cgroup` or one of its ancestors at levels 1 to `MAX_CGROUP_DEPTH` below
/// the root is in the cgroup filter: the levels the filter looks through for the
/// current task (`bpf_get_current_ancestor_cgroup_id`).
#[inline(always)]
pub fn cgroup_wanted(cgroup: *const u8) -> bool {
    if cgroup_in_filter(cgroup_id(cgroup)) {
        return true;
    }
    let level = member::<i32>(cgroup, &CGROUP_LEVEL);
    for l in 1..=MAX_CGROUP_DEPTH {
        if l >= level {
            return false; // the cgroup itself, checked above
        }
        // SAFETY: the global is a plain u32; `bpf_probe_read_kernel` checks the address.
        let ancestor = unsafe { bpf_probe_read_kernel(cgroup.add(read_volatile(&CGROUP_ANCESTORS) as usize + l as usize * size_of::<usize>()).cast::<usize>()) }
            .unwrap_or_default() as *const u8;
        if !ancestor.is_null() && cgroup_in_filter(cgroup_id(ancestor)) {
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
