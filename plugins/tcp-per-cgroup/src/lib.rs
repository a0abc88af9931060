//! tcp-per-cgroup: TCP behaviour per container (or cgroup path outside containers) and
//! service port, from the `tcp` kind:
//!
//! - `connections_total{direction,port}`: connections made ("out") and accepted ("in");
//! - `connect_seconds{port}`: connect latency (SYN sent to established);
//! - `connect_failures_total{port}`: connects refused or timed out;
//! - `sent_bytes_total`, `received_bytes_total{direction,port}`: counted when a
//!   connection closes (bytes the application wrote to it and read from it);
//! - `retransmits_total{direction,port}`: segments (and SYNs) sent again;
//! - `connection_seconds{direction,port}`: how long connections lasted.
//!
//! `port` is the service's: the remote port of a connection this side made, the local
//! port of one it accepted (the other end's is ephemeral). At most `max_ports` ports
//! (default 64) get their own label, the first ones a connection was established on
//! (a failed connect takes none); the rest count as `port="other"`, so a port scan
//! cannot blow up the series. Config (all optional): `max_ports`, and `pids`, `cgroups`,
//! `comms` to narrow the subscription (a pid filter never matches accepted connections,
//! which belong to no task).

use wasmtap_sdk::{
    Config, CounterVec, Filter, HistogramVec, HostApi, HostInfo, Manifest, Plugin, Record as _, Subscription, TcpBatch, TcpRecord, Wit, export_plugin, names,
    tcp::{direction, event},
};

/// (cgroup id, direction, port label: a port, or 0 for "other").
type Key = (u64, u16, u16);

pub struct TcpPerCgroup<H: HostApi + Clone = Wit> {
    connections: CounterVec<Key, H>,
    connect: HistogramVec<Key, H>,
    failures: CounterVec<Key, H>,
    sent: CounterVec<Key, H>,
    received: CounterVec<Key, H>,
    retransmits: CounterVec<Key, H>,
    lifetime: HistogramVec<Key, H>,
    /// Ports with a label of their own, at most `max_ports`.
    ports: Vec<u16>,
    max_ports: usize,
}

fn labels(&(cgroup, dir, port): &Key) -> Vec<String> {
    let container = names::container_label(cgroup);
    let dir = if dir == direction::INBOUND { "in" } else { "out" };
    let port = if port == 0 { "other".to_owned() } else { port.to_string() };
    vec![container, dir.into(), port]
}

/// Without the direction (families where it is always "out").
fn labels_out(key: &Key) -> Vec<String> {
    let mut l = labels(key);
    l.remove(1);
    l
}

impl<H: HostApi + Clone> TcpPerCgroup<H> {
    pub fn new(host: H, max_ports: usize) -> Result<Self, String> {
        let all = ["container", "direction", "port"];
        let out = ["container", "port"];
        let pow2 = |from: u32, to: u32| (from..=to).map(|shift| 1u64 << shift).collect::<Vec<_>>();
        Ok(Self {
            connections: CounterVec::declare(host.clone(), "connections", "TCP connections made (out) and accepted (in).", &all)?,
            connect: HistogramVec::declare(host.clone(), "connect_seconds", "TCP connect latency: SYN sent to established.", &out, pow2(12, 33), 1e-9)?,
            failures: CounterVec::declare(host.clone(), "connect_failures", "TCP connects refused or timed out.", &out)?,
            sent: CounterVec::declare(host.clone(), "sent_bytes", "Bytes the application wrote to its connections, counted when one closes.", &all)?,
            received: CounterVec::declare(host.clone(), "received_bytes", "Bytes the application read from its connections, counted when one closes.", &all)?,
            retransmits: CounterVec::declare(host.clone(), "retransmits", "TCP segments (and SYNs) retransmitted.", &all)?,
            lifetime: HistogramVec::declare(host, "connection_seconds", "How long TCP connections lasted.", &all, pow2(16, 40), 1e-9)?,
            ports: Vec::new(),
            max_ports,
        })
    }

    /// The port label of a record: the service's port, or 0 ("other") past
    /// `max_ports`. Only an established connection takes a port a label of its own.
    fn port(&mut self, r: &TcpRecord) -> u16 {
        let port = if r.direction == direction::INBOUND { r.local_port } else { r.remote_port };
        if self.ports.contains(&port) {
            return port;
        }
        let established = matches!(r.event, event::CONNECT | event::ACCEPT);
        if established && self.ports.len() < self.max_ports && port != 0 {
            self.ports.push(port);
            return port;
        }
        0
    }

    /// Aggregates one batch and flushes it to the host.
    pub fn observe(&mut self, records: &[TcpRecord]) {
        for r in records {
            let key = (r.header.cgroup_id, r.direction, self.port(r));
            match r.event {
                event::CONNECT => {
                    self.connections.add(key, 1, labels);
                    self.connect.observe(key, r.duration_ns, labels_out);
                }
                event::ACCEPT => self.connections.add(key, 1, labels),
                event::CONNECT_FAILED => self.failures.add(key, 1, labels_out),
                event::RETRANSMIT => self.retransmits.add(key, 1, labels),
                event::CLOSE => {
                    self.sent.add(key, r.bytes_sent, labels);
                    self.received.add(key, r.bytes_received, labels);
                    self.lifetime.observe(key, r.duration_ns, labels);
                }
                _ => {}
            }
        }
        self.connections.flush();
        self.connect.flush();
        self.failures.flush();
        self.sent.flush();
        self.received.flush();
        self.retransmits.flush();
        self.lifetime.flush();
    }
}

impl Plugin for TcpPerCgroup {
    fn init(_host: &HostInfo, config: &Config) -> Result<(Self, Manifest), String> {
        let max_ports = config.get::<u64>("max_ports")?.unwrap_or(64) as usize;
        let filter = Filter { pids: config.list("pids")?, cgroups: config.list("cgroups")?, comms: config.list("comms")?, params: Vec::new() };
        let subscriptions = vec![Subscription { kind: TcpRecord::KIND.into(), filter }];
        Ok((Self::new(Wit, max_ports)?, Manifest { subscriptions, tick_interval_ms: 0 }))
    }

    fn on_tcp(&mut self, batch: TcpBatch<'_>) {
        self.observe(batch.records());
    }
}

export_plugin!(TcpPerCgroup);
