//! The `tcp` kind: connects (with their latency), accepts, closes (with the
//! connection's duration, bytes and retransmits) and retransmits, from the
//! `inet_sock_set_state` and `tcp_retransmit_skb` BTF tracepoints, and bytes from
//! `sock_send_length`/`sock_recv_length`.

use wasmtap_events::{
    Record as _, TcpRecord,
    tcp::{SELECTOR_OFFSET, event, offsets},
};

use super::{
    btf::KernelBtf,
    kind::{Flavour, Globals, KindSpec, Point, Selectors},
};

pub static KIND: KindSpec = KindSpec {
    name: TcpRecord::KIND,
    object: aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wasmtap-tcp")),
    record_size: TcpRecord::SIZE,
    selector_offset: SELECTOR_OFFSET,
    selector_param: "events",
    selectors: Selectors::Named(|name| match name {
        "connect" => Some(event::CONNECT),
        "accept" => Some(event::ACCEPT),
        "close" => Some(event::CLOSE),
        "retransmit" => Some(event::RETRANSMIT),
        "connect_failed" => Some(event::CONNECT_FAILED),
        _ => None,
    }),
    threshold: None,
    parent_pid_offset: None,
    // Best first: retransmit failures told apart (6.17+), then without them, then
    // without the send/recv tracepoints (before 6.3: bytes read as 0).
    flavours: &[
        Flavour {
            name: "tp_btf",
            programs: &[
                ("wt_tcp_state", Point::Btf("inet_sock_set_state")),
                ("wt_tcp_send", Point::Btf("sock_send_length")),
                ("wt_tcp_recv", Point::Btf("sock_recv_length")),
                ("wt_tcp_retransmit", Point::Btf("tcp_retransmit_skb")),
            ],
        },
        Flavour {
            name: "tp_btf (retransmit failures not told apart)",
            programs: &[
                ("wt_tcp_state", Point::Btf("inet_sock_set_state")),
                ("wt_tcp_send", Point::Btf("sock_send_length")),
                ("wt_tcp_recv", Point::Btf("sock_recv_length")),
                ("wt_tcp_retransmit_any", Point::Btf("tcp_retransmit_skb")),
            ],
        },
        Flavour {
            name: "tp_btf (no byte counts: sock_send_length needs Linux 6.3)",
            programs: &[("wt_tcp_state", Point::Btf("inet_sock_set_state")), ("wt_tcp_retransmit_any", Point::Btf("tcp_retransmit_skb"))],
        },
    ],
    globals,
};

fn globals(btf: Option<&KernelBtf>) -> anyhow::Result<Globals> {
    let btf = btf.ok_or_else(|| anyhow::anyhow!("the tcp kind reads kernel structs and needs the kernel's BTF (/sys/kernel/btf/vmlinux)"))?;
    // `struct sock` starts with its `sock_common`, and a `tcp_sock` with its `sock`.
    let common = |names: &[&str]| btf.member_offset("sock_common", names);
    let cgroup = btf.member_offset("sock", &["sk_cgrp_data"])? + btf.member_offset("sock_cgroup_data", &["cgroup"])?;
    Ok([
        (offsets::SK_PROTOCOL, btf.member_offset("sock", &["sk_protocol"])?),
        (offsets::SK_FAMILY, common(&["skc_family"])?),
        (offsets::SK_NUM, common(&["skc_num"])?),
        (offsets::SK_DPORT, common(&["skc_dport"])?),
        (offsets::SK_DADDR, common(&["skc_daddr"])?),
        (offsets::SK_RCV_SADDR, common(&["skc_rcv_saddr"])?),
        (offsets::SK_V6_DADDR, common(&["skc_v6_daddr"])?),
        (offsets::SK_V6_RCV_SADDR, common(&["skc_v6_rcv_saddr"])?),
        (offsets::SK_CGROUP, cgroup),
        (offsets::TP_TOTAL_RETRANS, btf.member_offset("tcp_sock", &["total_retrans"])?),
    ]
    .into_iter()
    .chain(btf.cgroup_offsets()?)
    .collect())
}
