//! The `sched` kind: run-queue waits (`sched_wakeup`, `sched_wakeup_new` and
//! `sched_switch` BTF tracepoints), with a kernel-side `min_wait_ns` so short waits
//! never reach the ring buffer.

use wasmtap_events::{
    Record as _, SchedRecord,
    sched::{SELECTOR_OFFSET, THRESHOLD_OFFSET, offsets, reason, throttle_by},
};

use super::{
    btf::KernelBtf,
    kind::{Flavour, Globals, KindSpec, Point, Selectors, Threshold},
};

pub static KIND: KindSpec = KindSpec {
    name: SchedRecord::KIND,
    object: aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wasmtap-sched")),
    record_size: SchedRecord::SIZE,
    selector_offset: SELECTOR_OFFSET,
    selector_param: "reasons",
    selectors: Selectors::Named(|name| match name {
        "wakeup" => Some(reason::WAKEUP),
        "preempted" => Some(reason::PREEMPTED),
        "throttled" => Some(reason::THROTTLED),
        _ => None,
    }),
    threshold: Some(Threshold { param: "min_wait_ns", offset: THRESHOLD_OFFSET }),
    parent_pid_offset: None,
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
    // How a throttled task is told: its own flag (6.18+), else its run queue's count;
    // without either, waits are only ever "wakeup" or "preempted".
    let by_cfs_rq = || -> anyhow::Result<(u32, u32)> {
        Ok((task(&["se"])? + btf.member_offset("sched_entity", &["cfs_rq"])?, btf.member_offset("cfs_rq", &["throttle_count"])?))
    };
    let throttle = match (task(&["throttled"]), by_cfs_rq()) {
        (Ok(flag), _) => vec![(offsets::THROTTLE_BY, throttle_by::TASK), (offsets::TASK_THROTTLED, flag)],
        (Err(_), Ok((cfs_rq, count))) => {
            vec![(offsets::THROTTLE_BY, throttle_by::CFS_RQ), (offsets::TASK_SE_CFS_RQ, cfs_rq), (offsets::CFS_RQ_THROTTLE_COUNT, count)]
        }
        (Err(_), Err(e)) => {
            tracing::warn!("the sched kind cannot tell throttled tasks on this kernel ({e:#}); their waits are reported as preempted");
            vec![(offsets::THROTTLE_BY, throttle_by::NONE)]
        }
    };
    Ok(throttle
        .into_iter()
        .chain([
            (offsets::TASK_PID, task(&["pid"])?),
            (offsets::TASK_TGID, task(&["tgid"])?),
            (offsets::TASK_COMM, task(&["comm"])?),
            (offsets::TASK_CGROUPS, task(&["cgroups"])?),
            (offsets::CSS_SET_DFL_CGRP, btf.member_offset("css_set", &["dfl_cgrp"])?),
        ])
        .chain(btf.cgroup_offsets()?)
        .collect())
}
