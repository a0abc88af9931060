//! The `process` kind: fork, exec and exit of processes (`sched_process_*` BTF
//! tracepoints), reading task members at offsets from the kernel's BTF.

use wasmtap_events::{
    ProcessRecord, Record as _,
    process::{SELECTOR_OFFSET, event, offsets},
};

use super::{
    btf::KernelBtf,
    kind::{Flavour, Globals, KindSpec, Point, Selectors},
};

pub static KIND: KindSpec = KindSpec {
    name: ProcessRecord::KIND,
    object: aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wasmtap-process")),
    record_size: ProcessRecord::SIZE,
    selector_offset: SELECTOR_OFFSET,
    selector_param: "events",
    selectors: Selectors::Named(|name| match name {
        "fork" => Some(event::FORK),
        "exec" => Some(event::EXEC),
        "exit" => Some(event::EXIT),
        _ => None,
    }),
    threshold: None,
    parent_pid_offset: None,
    flavours: &[Flavour {
        name: "tp_btf",
        programs: &[
            ("wt_process_fork", Point::Btf("sched_process_fork")),
            ("wt_process_exec", Point::Btf("sched_process_exec")),
            ("wt_process_exit", Point::Btf("sched_process_exit")),
        ],
    }],
    globals,
};

fn globals(btf: Option<&KernelBtf>) -> anyhow::Result<Globals> {
    let btf = btf.ok_or_else(|| anyhow::anyhow!("the process kind reads kernel structs and needs the kernel's BTF (/sys/kernel/btf/vmlinux)"))?;
    let task = |names: &[&str]| btf.member_offset("task_struct", names);
    Ok(vec![
        (offsets::TASK_PID, task(&["pid"])?),
        (offsets::TASK_TGID, task(&["tgid"])?),
        (offsets::TASK_REAL_PARENT, task(&["real_parent"])?),
        (offsets::TASK_GROUP_LEADER, task(&["group_leader"])?),
        (offsets::TASK_START_TIME, task(&["start_time", "real_start_time"])?),
        (offsets::TASK_EXIT_CODE, task(&["exit_code"])?),
        (offsets::TASK_COMM, task(&["comm"])?),
        (offsets::TASK_SIGNAL, task(&["signal"])?),
        (offsets::SIGNAL_LIVE, btf.member_offset("signal_struct", &["live"])?),
        (offsets::BPRM_FILENAME, btf.member_offset("linux_binprm", &["filename"])?),
    ])
}
