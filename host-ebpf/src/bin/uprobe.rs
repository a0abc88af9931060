//! The `uprobe` kind: one program the host attaches at every site of the probe points
//! the plugins name (USDT probes, function entries and returns, kernel functions where
//! the kernel has kprobes). The attach cookie selects the site's entry in `SITES`: its
//! point and how to read its arguments (decoded by the host from the USDT note or the
//! calling convention), as libbpf's `usdt.bpf.h` does.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use core::{
        ffi::c_void,
        ptr::{read_volatile, write_volatile},
    };

    use aya_ebpf::{
        helpers::{
            bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
            generated::{bpf_get_attach_cookie, bpf_get_current_task, bpf_probe_read_kernel_str, bpf_probe_read_user_str},
        },
        macros::{map, uprobe},
        maps::HashMap,
        programs::ProbeContext,
    };
    use wasmtap_ebpf::common::{CONFIG, current_cgroup_wanted, family_wanted, fill_header, member, reserve, submit};
    use wasmtap_events::uprobe::{ArgSpec, MAX_ARGS, MAX_SITES, NO_STRING, Site, TEXT_LEN, UprobeRecord, arg};

    #[map(name = "SITES")]
    static SITES: HashMap<u64, Site> = HashMap::with_max_entries(MAX_SITES, 0);

    // Member offsets, set by the host from the kernel's BTF.
    #[unsafe(no_mangle)]
    static TASK_TGID: u32 = 0;
    #[unsafe(no_mangle)]
    static TASK_REAL_PARENT: u32 = 0;

    #[uprobe]
    pub fn wt_uprobe(ctx: ProbeContext) -> u32 {
        // SAFETY: the helper only reads the cookie of the link that ran the program.
        let cookie = unsafe { bpf_get_attach_cookie(ctx.regs.cast::<c_void>()) };
        let Some(site) = (unsafe { SITES.get(&cookie) }) else { return 0 };
        let Some(config) = CONFIG.get(0) else { return 0 };
        let pid_tgid = bpf_get_current_pid_tgid();
        let pid = (pid_tgid >> 32) as u32;
        // SAFETY: the helper has no preconditions.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        let parent: *const u8 = member::<usize>(task, &TASK_REAL_PARENT) as *const u8;
        let parent_pid = if parent.is_null() { 0 } else { member::<u32>(parent, &TASK_TGID) };
        if !family_wanted(config, pid, parent_pid, current_cgroup_wanted) {
            return 0;
        }
        let Some(mut entry) = reserve::<UprobeRecord>() else { return 0 };
        let r = entry.as_mut_ptr();
        // SAFETY: `r` is the reserved record; every field is written below (the ring
        // buffer's memory holds older records: `text` is cleared before the copy).
        unsafe {
            fill_header(&raw mut (*r).header, pid_tgid, bpf_ktime_get_ns());
            (*r).probe = site.probe;
            (*r).parent_pid = parent_pid;
            for i in 0..MAX_ARGS {
                (*r).args[i] = read_arg(&ctx, &site.args[i]);
            }
            let text = (*r).text.as_mut_ptr();
            for i in 0..TEXT_LEN / 8 {
                write_volatile(text.cast::<u64>().add(i), 0);
            }
            let string_arg = read_volatile(&site.string_arg);
            let mut len = 0;
            if (string_arg as usize) < MAX_ARGS {
                let src = (*r).args[string_arg as usize] as *const c_void;
                let copied = if site.kernel != 0 {
                    bpf_probe_read_kernel_str(text.cast(), TEXT_LEN as u32, src)
                } else {
                    bpf_probe_read_user_str(text.cast(), TEXT_LEN as u32, src)
                };
                // The helpers count the NUL they write.
                if copied > 1 {
                    len = (copied - 1) as u32;
                }
            }
            (*r).text_len = len;
            (*r).text_arg = if (string_arg as usize) < MAX_ARGS { string_arg } else { NO_STRING };
        }
        submit(entry, config);
        0
    }

    /// Offset of the last register in x86-64's `struct pt_regs` (`ss`).
    const PT_REGS_LAST: u16 = 160;

    /// One argument as its spec says, sign-extended or zero-extended from its size.
    #[inline(always)]
    fn read_arg(ctx: &ProbeContext, spec: &ArgSpec) -> u64 {
        let how = spec.how;
        if how == arg::NONE {
            return 0;
        }
        let mut value = if how == arg::IMMEDIATE {
            spec.value as u64
        } else {
            let reg = spec.reg.min(PT_REGS_LAST) as usize;
            // SAFETY: `bpf_probe_read_kernel` checks the address; the offset is within
            // `pt_regs` (clamped to its last register).
            let reg = unsafe { bpf_probe_read_kernel(ctx.regs.cast::<u8>().add(reg).cast::<u64>()) }.unwrap_or_default();
            if how == arg::MEMORY {
                // SAFETY: `bpf_probe_read_user` checks the address.
                unsafe { bpf_probe_read_user((reg.wrapping_add(spec.value as u64)) as *const u64) }.unwrap_or_default()
            } else {
                reg
            }
        };
        let shift = (spec.shift & 63) as u32;
        value <<= shift;
        if spec.signed != 0 { ((value as i64) >> shift) as u64 } else { value >> shift }
    }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
