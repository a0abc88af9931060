//! The `syscall` kind: one record per completed system call (`raw_syscalls`).

use wasmtap_events::{Record as _, SyscallRecord, syscall::SELECTOR_OFFSET};

use super::kind::{Flavour, KindSpec, Point, Selectors};

pub static KIND: KindSpec = KindSpec {
    name: SyscallRecord::KIND,
    object: aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wasmtap-syscall")),
    record_size: SyscallRecord::SIZE,
    selector_offset: SELECTOR_OFFSET,
    selector_param: "syscalls",
    selectors: Selectors::Named(crate::names::syscall_number),
    threshold: None,
    parent_pid_offset: None,
    flavours: &[
        Flavour {
            name: "tp_btf",
            programs: &[
                ("wt_sys_enter", Point::Btf("sys_enter")),
                ("wt_sys_exit", Point::Btf("sys_exit")),
                ("wt_sys_task_exit", Point::Btf("sched_process_exit")),
                ("wt_sys_task_exec", Point::Btf("sched_process_exec")),
            ],
        },
        Flavour {
            name: "tracepoint",
            programs: &[
                ("wt_sys_enter_tp", Point::Tracepoint("raw_syscalls", "sys_enter")),
                ("wt_sys_exit_tp", Point::Tracepoint("raw_syscalls", "sys_exit")),
                ("wt_sys_task_exit_tp", Point::Tracepoint("sched", "sched_process_exit")),
                ("wt_sys_task_exec_tp", Point::Tracepoint("sched", "sched_process_exec")),
            ],
        },
    ],
    globals: |_| Ok(Vec::new()),
};
