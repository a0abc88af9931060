//! The `tcp` kind: TCP connection lifecycle (connect, accept, close with its byte
//! counts) and retransmits.

use core::mem::{offset_of, size_of};

use crate::{Record, RecordHeader};

/// Values of [`TcpRecord::event`] (the kind's selector).
pub mod event {
    /// An active open completed: `duration_ns` is the connect latency (SYN sent to
    /// established).
    pub const CONNECT: u32 = 1;
    /// A passive open completed (the handshake of a connection to a listener).
    pub const ACCEPT: u32 = 2;
    /// An established connection closed: `duration_ns` since it was established, and
    /// its byte and retransmit counts.
    pub const CLOSE: u32 = 3;
    /// A segment was retransmitted (a SYN too).
    pub const RETRANSMIT: u32 = 4;
    /// An active open failed (refused, timed out): `duration_ns` since the SYN.
    pub const CONNECT_FAILED: u32 = 5;
}

/// Values of [`TcpRecord::direction`].
pub mod direction {
    /// This side connected.
    pub const OUTBOUND: u16 = 1;
    /// This side accepted.
    pub const INBOUND: u16 = 2;
}

/// One TCP connection event, written at the `inet_sock_set_state` and
/// `tcp_retransmit_skb` BTF tracepoints (bytes counted at `sock_send_length` and
/// `sock_recv_length`). The header is the task that connected (for a
/// connection this side accepted: the listening socket's cgroup, with pid 0 and no
/// comm, as the handshake completes in no task's context).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpRecord {
    pub header: RecordHeader,
    /// One of [`event`].
    pub event: u32,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u16,
    /// One of [`direction`].
    pub direction: u16,
    /// Local port.
    pub local_port: u16,
    /// Remote port.
    pub remote_port: u16,
    /// Close: segments retransmitted over the connection's life.
    pub retransmits: u32,
    /// Connect, connect failed: since the SYN; close: since established; nanoseconds.
    pub duration_ns: u64,
    /// Close: bytes the application sent on the connection through the socket calls
    /// (`send`, `write`, ...; `sendfile` from Linux 6.5); 0 before 6.3.
    pub bytes_sent: u64,
    /// Close: bytes the application read from it until the close.
    pub bytes_received: u64,
    /// Local address: IPv4 in the first 4 bytes (network order), or IPv6.
    pub local_addr: [u8; 16],
    /// Remote address, likewise.
    pub remote_addr: [u8; 16],
}

const _: () = assert!(size_of::<TcpRecord>() == 112);
const _: () = assert!(offset_of!(TcpRecord, header) == 0);

// SAFETY: repr(C), integers and byte arrays only, no padding (size asserted above).
unsafe impl Record for TcpRecord {
    const KIND: &'static str = "tcp";
}

/// Where the host finds the selector (the event) in a record.
pub const SELECTOR_OFFSET: usize = offset_of!(TcpRecord, event);

/// Member offsets the tcp programs read (set by the host from the kernel's BTF).
pub mod offsets {
    pub const SK_PROTOCOL: &str = "SK_PROTOCOL";
    pub const SK_FAMILY: &str = "SK_FAMILY";
    pub const SK_NUM: &str = "SK_NUM";
    pub const SK_DPORT: &str = "SK_DPORT";
    pub const SK_DADDR: &str = "SK_DADDR";
    pub const SK_RCV_SADDR: &str = "SK_RCV_SADDR";
    pub const SK_V6_DADDR: &str = "SK_V6_DADDR";
    pub const SK_V6_RCV_SADDR: &str = "SK_V6_RCV_SADDR";
    pub const SK_CGROUP: &str = "SK_CGROUP";
    pub const TP_TOTAL_RETRANS: &str = "TP_TOTAL_RETRANS";
}
