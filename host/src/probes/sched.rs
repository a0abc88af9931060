//! The `sched` kind: run-queue waits (`sched_wakeup`, `sched_wakeup_new` and
//! `sched_switch` BTF tracepoints), with a kernel-side `min_wait_ns` so short waits
//! never reach the ring buffer.

use wasmtap_events::{
    Record as _, SchedRecord,
    sched::{SELECTOR_OFFSET, THRESHOLD_OFFSET, offsets, reason},
};

use super::{
    btf::KernelBtf,
    kind::{Flavour, Globals, KindSpec, Point, Threshold},
};

pub static KIND: KindSpec = KindSpec {
    name: SchedRecord::KIND,
    object: aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wasmtap-sched")),
    record_size: SchedRecord::SIZE,
    selector_offset: SELECTOR_OFFSET,
    selector_param: "reasons",
    parse_selector: |name| match name {
        "wakeup" => Some(reason::WAKEUP),
        "preempted" => Some(reason::PREEMPTED),
        _ => None,
    },
    threshold: Some(Threshold { param: "min_wait_ns", offset: THRESHOLD_OFFSET }),
    flavours: &[Flavour {
        name: "tp_btf",
        programs: &[
            ("wt_sched_wakeup", Point::Btf("sched_wakeup")),
            ("wt_sched_wakeup_new", Point::Btf("sched_wakeup_new")),
            ("wt_sched_switch", Point::Btf("sched_switch")),
        ],
    }],
    globals,
};

fn globals(btf: Option<&KernelBtf>) -> anyhow::Result<Globals> {
    let btf = btf.ok_or_else(|| anyhow::anyhow!("the sched kind reads kernel structs and needs the kernel's BTF (/sys/kernel/btf/vmlinux)"))?;
    let task = |names: &[&str]| btf.member_offset("task_struct", names);
    Ok(vec![
        (offsets::TASK_PID, task(&["pid"])?),
        (offsets::TASK_TGID, task(&["tgid"])?),
        (offsets::TASK_COMM, task(&["comm"])?),
        (offsets::TASK_CGROUPS, task(&["cgroups"])?),
        (offsets::CSS_SET_DFL_CGRP, btf.member_offset("css_set", &["dfl_cgrp"])?),
        (offsets::CGROUP_KN, btf.member_offset("cgroup", &["kn"])?),
        (offsets::KERNFS_NODE_ID, btf.member_offset("kernfs_node", &["id"])?),
        (offsets::KERNFS_NODE_PARENT, btf.member_offset("kernfs_node", &["__parent", "parent"])?),
    ])
}
