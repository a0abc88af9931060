//! Attaching a loaded program at one site through a perf event of the uprobe or kprobe
//! PMU, with a BPF link that carries the site's cookie. aya's own uprobe attach cannot
//! set the USDT semaphore's `ref_ctr_offset`, so this asks the kernel directly.

use std::{
    ffi::CStr,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use anyhow::Context as _;

/// Which PMU a site's perf event belongs to.
pub enum Pmu<'a> {
    /// An instruction in a binary: its path, the file offset, and the file offset of
    /// the USDT semaphore (0: none) the kernel increments while the probe is attached.
    Uprobe { path: &'a CStr, offset: u64, ref_ctr_offset: u64 },
    /// A kernel function.
    Kprobe { function: &'a CStr },
}

impl Pmu<'_> {
    fn name(&self) -> &'static str {
        match self {
            Pmu::Uprobe { .. } => "uprobe",
            Pmu::Kprobe { .. } => "kprobe",
        }
    }

    /// The PMU's perf type, or why the kernel has none.
    pub fn perf_type(name: &str) -> anyhow::Result<u32> {
        let path = format!("/sys/bus/event_source/devices/{name}/type");
        let text = std::fs::read_to_string(&path).with_context(|| format!("this kernel has no {name} PMU ({path} is missing)"))?;
        text.trim().parse().with_context(|| format!("{path} holds {:?}, not a number", text.trim()))
    }
}

/// `struct perf_event_attr` up to `config2` (`PERF_ATTR_SIZE_VER1`); the kernel reads
/// the rest as zero.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
}

/// The `link_create` member of `union bpf_attr` for a perf event link.
#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    bpf_cookie: u64,
}

const BPF_LINK_CREATE: libc::c_long = 28;
const CAP_SYS_ADMIN: u32 = 21;
const BPF_PERF_EVENT: u32 = 41;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// A program attached at one site: the BPF link, which holds the perf event. Dropping
/// it detaches the program and, for a USDT probe with a semaphore, lets the kernel
/// decrement it.
pub struct SiteLink {
    _link: OwnedFd,
}

/// Attaches `program` at the site `pmu` names, as an entry probe or a return probe,
/// with `cookie` for the program to find its site by. System-wide: the perf event is
/// opened for every process (pid -1) on CPU 0, which for uprobes and kprobes runs the
/// program on whichever CPU hits the site.
pub fn attach(program: BorrowedFd<'_>, pmu: &Pmu, retprobe: bool, cookie: u64) -> anyhow::Result<SiteLink> {
    let mut attr =
        PerfEventAttr { kind: Pmu::perf_type(pmu.name())?, size: size_of::<PerfEventAttr>() as u32, config: u64::from(retprobe), ..Default::default() };
    match *pmu {
        Pmu::Uprobe { path, offset, ref_ctr_offset } => {
            anyhow::ensure!(ref_ctr_offset >> 32 == 0, "a semaphore offset past 4 GiB");
            attr.config |= ref_ctr_offset << 32;
            attr.config1 = path.as_ptr() as u64;
            attr.config2 = offset;
        }
        Pmu::Kprobe { function } => attr.config1 = function.as_ptr() as u64,
    }
    // SAFETY: the syscall reads `attr` (and the C string `config1` points at, borrowed
    // by `pmu` for the call) and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, &attr as *const PerfEventAttr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC) };
    if fd < 0 {
        let error = std::io::Error::last_os_error();
        let denied = matches!(error.raw_os_error(), Some(libc::EACCES | libc::EPERM));
        if denied && matches!(pmu, Pmu::Uprobe { .. }) && !crate::probes::system::has_cap(CAP_SYS_ADMIN) {
            // Linux grants uprobe perf events to CAP_SYS_ADMIN only (commit ba677dbe77af,
            // "perf: Revert to requiring CAP_SYS_ADMIN for uprobes"); kprobes need CAP_PERFMON.
            return Err(error).context(
                "perf_event_open refused the uprobe: the kernel grants uprobes only to CAP_SYS_ADMIN, which the daemon dropped\n  \
                 fix: add \"sys_admin\" to capabilities_keep in the config (and, under the systemd unit, CAP_SYS_ADMIN to \
                 CapabilityBoundingSet and AmbientCapabilities)",
            );
        }
        return Err(error).context("perf_event_open refused the probe");
    }
    // SAFETY: `fd` is a new descriptor this process owns from here on.
    let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let link =
        LinkCreate { prog_fd: program.as_raw_fd() as u32, target_fd: event.as_raw_fd() as u32, attach_type: BPF_PERF_EVENT, flags: 0, bpf_cookie: cookie };
    // SAFETY: BPF_LINK_CREATE reads `size_of::<LinkCreate>()` bytes of `link` (the rest
    // of `union bpf_attr` counts as zero) and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, &link as *const LinkCreate, size_of::<LinkCreate>()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("the kernel refused to link the program to the probe's perf event");
    }
    // SAFETY: as above. The event, opened enabled, is kept by the link: its own fd
    // closes here (one descriptor per site).
    Ok(SiteLink { _link: unsafe { OwnedFd::from_raw_fd(fd as i32) } })
}
