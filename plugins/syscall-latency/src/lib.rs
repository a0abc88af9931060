//! syscall-latency: a histogram of syscall latency in seconds by `comm` and `syscall`,
//! and a counter of failed syscalls by `comm`, `syscall` and `errno`.
//!
//! Config (all optional): `pids` (integers), `cgroups` (cgroup v2 ids), `comms` and
//! `syscalls` (names) narrow the subscription; by default every process is observed.
//! `container_label = true` adds a `container` label: the container id of the task's
//! cgroup, or its cgroup path outside containers (looked up for each new series).

use wasmtap_sdk::{
    Config, CounterVec, Filter, HistogramVec, HostApi, HostInfo, Manifest, Plugin, Record as _, Subscription, SyscallBatch, SyscallRecord, Wit, export_plugin,
    names,
    names::{errno_label, syscall_label},
};

/// Per-thread-name, per-syscall (per-cgroup, when labelled) key. The comm stays raw
/// (as one integer, so comparing keys is a few integer compares, not a byte loop) and
/// is only formatted for a new series.
type Key = (u128, u32, u64);

/// The plugin's state. Generic over the host so the benchmark can run the very same
/// aggregation natively; as a plugin it talks to the real host through [`Wit`].
pub struct SyscallLatency<H: HostApi + Clone = Wit> {
    latency: HistogramVec<Key, H>,
    errors: CounterVec<(Key, u16), H>,
    /// Whether keys and labels carry the container.
    container_label: bool,
}

/// Upper bounds in nanoseconds: powers of two from 128 ns to ~8.6 s (the `variant`
/// build: powers of four from 256 ns).
pub fn latency_bounds_ns() -> Vec<u64> {
    let step = if cfg!(feature = "variant") { 2 } else { 1 };
    (7 + step - 1..=33).step_by(step).map(|shift| 1u64 << shift).collect()
}

/// The `variant` build's extra label (name, value).
const VARIANT_LABEL: Option<(&str, &str)> = if cfg!(feature = "variant") { Some(("build", "variant")) } else { None };

fn comm_label(comm: &u128) -> String {
    let comm = comm.to_le_bytes();
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..len]).into_owned()
}

impl<H: HostApi + Clone> SyscallLatency<H> {
    pub fn new(host: H, container_label: bool) -> Result<Self, String> {
        let mut labels = vec!["comm", "syscall"];
        labels.extend(container_label.then_some("container"));
        labels.extend(VARIANT_LABEL.map(|(name, _)| name));
        let error_labels = [labels.as_slice(), &["errno"]].concat();
        Ok(Self {
            latency: HistogramVec::declare(host.clone(), "seconds", "Latency of completed system calls.", &labels, latency_bounds_ns(), 1e-9)?,
            errors: CounterVec::declare(host, "errors", "System calls that returned an error.", &error_labels)?,
            container_label,
        })
    }

    /// Aggregates one batch and flushes it to the host.
    pub fn observe(&mut self, records: &[SyscallRecord]) {
        let host = self.latency.host().clone();
        let labelled = self.container_label;
        let labels = |(comm, nr, cgroup): &Key| {
            let mut labels = vec![comm_label(comm), syscall_label(&host, *nr)];
            if labelled {
                labels.push(names::container_label(*cgroup));
            }
            labels.extend(VARIANT_LABEL.map(|(_, value)| value.to_owned()));
            labels
        };
        for r in records {
            let cgroup = if labelled { r.header.cgroup_id } else { 0 };
            let key = (u128::from_le_bytes(r.header.comm), r.syscall_nr, cgroup);
            self.latency.observe(key, r.latency_ns, labels);
            if let Some(errno) = r.errno() {
                self.errors.add((key, errno), 1, |(key, errno)| {
                    let mut labels = labels(key);
                    labels.push(errno_label(&host, *errno));
                    labels
                });
            }
        }
        self.latency.flush();
        self.errors.flush();
    }
}

impl Plugin for SyscallLatency {
    fn init(_host: &HostInfo, config: &Config) -> Result<(Self, Manifest), String> {
        let filter = Filter {
            pids: config.list("pids")?,
            cgroups: config.list("cgroups")?,
            comms: config.list("comms")?,
            params: vec![("syscalls".into(), config.list("syscalls")?)],
        };
        let subscriptions = vec![Subscription { kind: SyscallRecord::KIND.into(), filter }];
        let container_label = config.get("container_label")?.unwrap_or(false);
        Ok((Self::new(Wit, container_label)?, Manifest { subscriptions, tick_interval_ms: 0 }))
    }

    fn on_syscalls(&mut self, batch: SyscallBatch<'_>) {
        self.observe(batch.records());
    }
}

export_plugin!(SyscallLatency);
