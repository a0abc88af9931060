//! The `tcp` kind: connection lifecycle from `inet_sock_set_state`, retransmits from
//! `tcp_retransmit_skb` (BTF tracepoints).
//!
//! A connection is tracked per socket from the moment this side opens it (SYN sent, in
//! the connecting task's context: that task is the record's header) or completes a
//! passive open (in softirq context: no task, so the header carries the listening
//! socket's cgroup and pid 0). Filters are checked there, so a socket nobody wants
//! costs one map lookup per later state change or send. Its close reads the
//! retransmit count off the `tcp_sock`; members are read at offsets the host finds in
//! the kernel's BTF. Bytes are what the application sent and read on the socket
//! (`sock_send_length`, `sock_recv_length`), added up per tracked connection with
//! atomic adds (threads may share a socket).
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// The atomic add intrinsic: `AtomicU64::fetch_add` does not build for BPF.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics), allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod programs {
    use core::{
        intrinsics::{AtomicOrdering, atomic_xadd},
        ptr::{read_volatile, write_volatile},
    };

    use aya_ebpf::{
        helpers::{
            bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_buf,
            generated::{bpf_get_current_cgroup_id, bpf_get_current_comm},
        },
        macros::{btf_tracepoint, map},
        maps::LruHashMap,
        programs::BtfTracePointContext,
    };
    use wasmtap_ebpf::common::{CONFIG, cgroup_id, cgroup_wanted, current_cgroup_wanted, member, reserve, selected, submit, who_wanted};
    use wasmtap_events::tcp::{TcpRecord, direction, event};

    #[unsafe(no_mangle)]
    static SK_PROTOCOL: u32 = 0;
    #[unsafe(no_mangle)]
    static SK_FAMILY: u32 = 0;
    #[unsafe(no_mangle)]
    static SK_NUM: u32 = 0;
    #[unsafe(no_mangle)]
    static SK_DPORT: u32 = 0;
    #[unsafe(no_mangle)]
    static SK_DADDR: u32 = 0;
    #[unsafe(no_mangle)]
    static SK_RCV_SADDR: u32 = 0;
    #[unsafe(no_mangle)]
    static SK_V6_DADDR: u32 = 0;
    #[unsafe(no_mangle)]
    static SK_V6_RCV_SADDR: u32 = 0;
    #[unsafe(no_mangle)]
    static SK_CGROUP: u32 = 0;
    #[unsafe(no_mangle)]
    static TP_TOTAL_RETRANS: u32 = 0;

    // Kernel TCP states (include/net/tcp_states.h).
    const ESTABLISHED: i32 = 1;
    const SYN_SENT: i32 = 2;
    const SYN_RECV: i32 = 3;
    const CLOSE: i32 = 7;
    const IPPROTO_TCP: u16 = 6;
    const AF_INET6: u16 = 10;
    const MSG_PEEK: i32 = 2;

    /// A tracked connection: who it belongs to, and since when.
    #[derive(Clone, Copy)]
    #[repr(C)]
    struct Conn {
        /// When the SYN was sent (outbound), or 0.
        syn_ns: u64,
        /// When it was established, or 0 (not yet).
        established_ns: u64,
        cgroup_id: u64,
        pid: u32,
        tid: u32,
        /// The task's comm, as two words (copied word by word: byte arrays become
        /// `memset`/`memmove` calls, which do not link for BPF).
        comm: [u64; 2],
        direction: u16,
        local_port: u16,
        remote_port: u16,
        _pad: u16,
        /// Bytes the application sent and read on the socket.
        sent: u64,
        received: u64,
    }

    impl Conn {
        /// Tracks `sk` as this connection; the map's entry, if it could be made.
        /// `pid_tgid` as `bpf_get_current_pid_tgid` has it; `current_comm`: take the
        /// current task's comm, else zeros. Written field by field (zeros by volatile
        /// stores: a zeroed struct literal becomes a `memset`, which does not link).
        #[inline(always)]
        fn track(sk: *const u8, syn_ns: u64, established_ns: u64, cgroup_id: u64, pid_tgid: u64, current_comm: bool, direction: u16) -> Option<*mut Conn> {
            let mut conn = core::mem::MaybeUninit::<Conn>::uninit();
            let c = conn.as_mut_ptr();
            // SAFETY: every field of the local is written before it is read; the helper
            // writes (or on failure zeroes) exactly the 16 bytes of `comm`.
            unsafe {
                write_volatile(&raw mut (*c).syn_ns, syn_ns);
                write_volatile(&raw mut (*c).established_ns, established_ns);
                write_volatile(&raw mut (*c).cgroup_id, cgroup_id);
                write_volatile(&raw mut (*c).pid, (pid_tgid >> 32) as u32);
                write_volatile(&raw mut (*c).tid, pid_tgid as u32);
                let comm = (&raw mut (*c).comm).cast::<u64>();
                if current_comm {
                    bpf_get_current_comm(comm.cast(), 16);
                } else {
                    write_volatile(comm, 0);
                    write_volatile(comm.add(1), 0);
                }
                write_volatile(&raw mut (*c).direction, direction);
                write_volatile(&raw mut (*c).local_port, member::<u16>(sk, &SK_NUM));
                write_volatile(&raw mut (*c).remote_port, u16::from_be(member::<u16>(sk, &SK_DPORT)));
                write_volatile(&raw mut (*c)._pad, 0);
                write_volatile(&raw mut (*c).sent, 0);
                write_volatile(&raw mut (*c).received, 0);
                CONNS.insert(&(sk as u64), &*c, 0).ok()?;
            }
            CONNS.get_ptr_mut(&(sk as u64))
        }
    }

    /// Tracked connections by socket address (LRU: a socket freed without reaching
    /// CLOSE while tracked is evicted in time).
    #[map(name = "CONNS")]
    static CONNS: LruHashMap<u64, Conn> = LruHashMap::with_max_entries(65536, 0);

    #[btf_tracepoint(function = "inet_sock_set_state")]
    pub fn wt_tcp_state(ctx: BtfTracePointContext) -> i32 {
        // inet_sock_set_state(const struct sock *sk, const int oldstate, const int newstate)
        let sk: *const u8 = ctx.arg(0);
        if member::<u16>(sk, &SK_PROTOCOL) != IPPROTO_TCP {
            return 0;
        }
        let (old, new) = (ctx.arg::<u64>(1) as i32, ctx.arg::<u64>(2) as i32);
        match (old, new) {
            (_, SYN_SENT) => outbound(sk),
            (SYN_SENT, ESTABLISHED) => connected(sk),
            (SYN_RECV, ESTABLISHED) => accepted(sk),
            (_, CLOSE) => closed(sk, old),
            _ => {}
        }
        0
    }

    #[btf_tracepoint(function = "sock_send_length")]
    pub fn wt_tcp_send(ctx: BtfTracePointContext) -> i32 {
        // sock_send_length(struct sock *sk, int ret, int flags)
        count(ctx.arg(0), ctx.arg::<u64>(1) as i32, false);
        0
    }

    #[btf_tracepoint(function = "sock_recv_length")]
    pub fn wt_tcp_recv(ctx: BtfTracePointContext) -> i32 {
        // sock_recv_length(struct sock *sk, int ret, int flags): a MSG_PEEK reads nothing.
        if ctx.arg::<u64>(2) as i32 & MSG_PEEK == 0 {
            count(ctx.arg(0), ctx.arg::<u64>(1) as i32, true);
        }
        0
    }

    /// Adds a send's or receive's `ret` bytes to `sk`'s connection, if it is tracked.
    #[inline(always)]
    fn count(sk: *const u8, ret: i32, received: bool) {
        if ret <= 0 {
            return;
        }
        let Some(conn) = CONNS.get_ptr_mut(&(sk as u64)) else { return };
        // SAFETY: a pointer into the map's value for this socket; the atomic add is one
        // BPF instruction.
        unsafe {
            let counter = if received { &raw mut (*conn).received } else { &raw mut (*conn).sent };
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, ret as u64);
        }
    }

    #[btf_tracepoint(function = "tcp_retransmit_skb")]
    pub fn wt_tcp_retransmit(ctx: BtfTracePointContext) -> i32 {
        // tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb, int err)
        // (6.17 and later, where failed attempts fire too): only what went out counts.
        if ctx.arg::<u64>(2) as i32 == 0 {
            retransmitted(ctx.arg(0));
        }
        0
    }

    #[btf_tracepoint(function = "tcp_retransmit_skb")]
    pub fn wt_tcp_retransmit_any(ctx: BtfTracePointContext) -> i32 {
        // tcp_retransmit_skb(const struct sock *sk, const struct sk_buff *skb) before
        // 6.17, which fires for retransmits that went out only.
        retransmitted(ctx.arg(0));
        0
    }

    #[inline(always)]
    fn retransmitted(sk: *const u8) {
        if let Some(conn) = CONNS.get_ptr(&(sk as u64)) {
            emit(sk, conn, event::RETRANSMIT, 0, false);
        }
    }

    /// This side sent a SYN (the connecting task is current): tracked if wanted.
    fn outbound(sk: *const u8) {
        let Some(config) = CONFIG.get(0) else { return };
        let pid_tgid = bpf_get_current_pid_tgid();
        if !who_wanted(config, (pid_tgid >> 32) as u32, current_cgroup_wanted) {
            return;
        }
        // SAFETY: the helpers have no preconditions.
        let (now, cgroup_id) = unsafe { (bpf_ktime_get_ns(), bpf_get_current_cgroup_id()) };
        let _ = Conn::track(sk, now, 0, cgroup_id, pid_tgid, true, direction::OUTBOUND);
    }

    /// The SYN was answered: the connect latency.
    fn connected(sk: *const u8) {
        let Some(conn) = CONNS.get_ptr_mut(&(sk as u64)) else { return };
        // SAFETY: a pointer into the map's value for this socket; the helper has no
        // preconditions.
        let latency = unsafe {
            (*conn).local_port = member::<u16>(sk, &SK_NUM);
            (*conn).established_ns = bpf_ktime_get_ns();
            (*conn).established_ns.saturating_sub((*conn).syn_ns)
        };
        emit(sk, conn, event::CONNECT, latency, false);
    }

    /// A passive open completed (softirq: no task): tracked under the listening
    /// socket's cgroup if wanted.
    fn accepted(sk: *const u8) {
        if CONNS.get_ptr(&(sk as u64)).is_some() {
            return connected(sk); // a simultaneous open: this side sent a SYN too
        }
        let Some(config) = CONFIG.get(0) else { return };
        // (No cgroup is the root cgroup: its id reads as 0.)
        let cgroup: *const u8 = member::<usize>(sk, &SK_CGROUP) as *const u8;
        if !who_wanted(config, 0, || !cgroup.is_null() && cgroup_wanted(cgroup)) {
            return;
        }
        // SAFETY: the helper has no preconditions.
        if let Some(conn) = Conn::track(sk, 0, unsafe { bpf_ktime_get_ns() }, cgroup_id(cgroup), 0, false, direction::INBOUND) {
            emit(sk, conn, event::ACCEPT, 0, false);
        }
    }

    /// The socket reached CLOSE: the connection's end (or a failed connect).
    fn closed(sk: *const u8, old: i32) {
        let Some(conn) = CONNS.get_ptr(&(sk as u64)) else { return };
        // SAFETY: a pointer into the map's value for this socket (deleted only below);
        // the helper has no preconditions.
        let (syn_ns, established_ns, now) = unsafe { ((*conn).syn_ns, (*conn).established_ns, bpf_ktime_get_ns()) };
        if established_ns != 0 {
            emit(sk, conn, event::CLOSE, now.saturating_sub(established_ns), true);
        } else if old == SYN_SENT {
            emit(sk, conn, event::CONNECT_FAILED, now.saturating_sub(syn_ns), false);
        }
        let _ = CONNS.remove(&(sk as u64));
    }

    /// Writes one record about `sk` for `conn` (its map entry), if the selector filter
    /// wants `what`.
    #[inline(always)]
    fn emit(sk: *const u8, conn: *const Conn, what: u32, duration_ns: u64, counts: bool) {
        let Some(config) = CONFIG.get(0) else { return };
        if !selected(config, what) {
            return;
        }
        let Some(mut entry) = reserve::<TcpRecord>() else { return };
        let r = entry.as_mut_ptr();
        let family = member::<u16>(sk, &SK_FAMILY);
        // SAFETY: `r` points at a reserved, writable `TcpRecord`; every field is written
        // before submit (zeros by volatile stores, which never become a `memset`). The
        // helpers check the kernel addresses they read.
        unsafe {
            (*r).header.ts_ns = bpf_ktime_get_ns();
            (*r).header.cgroup_id = (*conn).cgroup_id;
            (*r).header.pid = (*conn).pid;
            (*r).header.tid = (*conn).tid;
            let comm = (*r).header.comm.as_mut_ptr().cast::<u64>();
            write_volatile(comm, (*conn).comm[0]);
            write_volatile(comm.add(1), (*conn).comm[1]);
            (*r).event = what;
            (*r).family = family;
            (*r).direction = (*conn).direction;
            // The port is bound after SYN_SENT is set: read it here until it is known.
            (*r).local_port = if (*conn).local_port != 0 { (*conn).local_port } else { member::<u16>(sk, &SK_NUM) };
            (*r).remote_port = (*conn).remote_port;
            (*r).duration_ns = duration_ns;
            if counts {
                (*r).retransmits = member::<u32>(sk, &TP_TOTAL_RETRANS);
                (*r).bytes_sent = (*conn).sent;
                (*r).bytes_received = (*conn).received;
            } else {
                write_volatile(&raw mut (*r).retransmits, 0);
                write_volatile(&raw mut (*r).bytes_sent, 0);
                write_volatile(&raw mut (*r).bytes_received, 0);
            }
            if family == AF_INET6 {
                let _ = bpf_probe_read_kernel_buf(sk.add(read_volatile(&SK_V6_RCV_SADDR) as usize), &mut (*r).local_addr);
                let _ = bpf_probe_read_kernel_buf(sk.add(read_volatile(&SK_V6_DADDR) as usize), &mut (*r).remote_addr);
            } else {
                let (local, remote) = ((*r).local_addr.as_mut_ptr().cast::<u32>(), (*r).remote_addr.as_mut_ptr().cast::<u32>());
                write_volatile(local, member::<u32>(sk, &SK_RCV_SADDR));
                write_volatile(remote, member::<u32>(sk, &SK_DADDR));
                for i in 1..4 {
                    write_volatile(local.add(i), 0);
                    write_volatile(remote.add(i), 0);
                }
            }
        }
        submit(entry, config);
    }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
