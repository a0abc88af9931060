//! syscall-latency: a histogram of syscall latency in seconds by `comm` and `syscall`,
//! and a counter of failed syscalls by `comm`, `syscall` and `errno`.
//!
//! Config (all optional): `pids` (integers), `cgroups` (cgroup v2 ids), `comms` and
//! `syscalls` (names) narrow the subscription; by default every process is observed.
//! `container_label = true` adds a `container` label: the container id of the task's
//! cgroup, or its cgroup path outside containers (looked up for each new series).

use std::collections::HashMap;

use wasmtap_sdk::{
    Config, CounterVec, Filter, HistogramVec, HostApi, HostInfo, Manifest, Plugin, Record as _, Subscription, SyscallBatch, SyscallRecord, Wit, export_plugin,
    names,
    names::{errno_label, syscall_label},
};

/// Per-thread-name, per-syscall (per-cgroup, when labelled) key: the raw comm (one
/// integer, so comparing keys is a few integer compares, not a byte loop; formatted
/// only for a new series), and the syscall number in the low 32 bits of the second
/// beside the cgroup's index in `Cgroups` (0 when unlabelled). Two fields, not three:
/// a third cost the per-event loop ~6 ns (a fifth of the plugin's time per event).
type Key = (u128, u64);

/// The cgroups seen, numbered from 1 for the key.
#[derive(Default)]
struct Cgroups {
    ids: Vec<u64>,
    index: HashMap<u64, u64>,
    last: (u64, u64),
}

/// Cgroups numbered; past it, the rest share `OTHER_CGROUPS` (labelled "other"), so a
/// user making cgroups in a loop cannot grow the table without bound.
const MAX_CGROUPS: usize = 65_536;
const OTHER_CGROUPS: u64 = u32::MAX as u64;

impl Cgroups {
    fn number(&mut self, id: u64) -> u64 {
        if self.last.0 == id && self.last.1 != 0 {
            return self.last.1;
        }
        let n = match self.index.get(&id) {
            Some(&n) => n,
            None if self.ids.len() >= MAX_CGROUPS => OTHER_CGROUPS,
            None => {
                self.ids.push(id);
                self.index.insert(id, self.ids.len() as u64);
                self.ids.len() as u64
            }
        };
        self.last = (id, n);
        n
    }

    /// The container label of number `n`.
    fn label(&self, n: u64) -> String {
        if n == OTHER_CGROUPS { "other".into() } else { names::container_label(self.ids[n as usize - 1]) }
    }
}

/// The plugin's state. Generic over the host so the benchmark can run the very same
/// aggregation natively; as a plugin it talks to the real host through [`Wit`].
pub struct SyscallLatency<H: HostApi + Clone = Wit> {
    latency: HistogramVec<Key, H>,
    errors: CounterVec<(Key, u16), H>,
    /// Whether keys and labels carry the container.
    container_label: bool,
    cgroups: Cgroups,
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
            cgroups: Cgroups::default(),
        })
    }

    /// Aggregates one batch and flushes it to the host.
    pub fn observe(&mut self, records: &[SyscallRecord]) {
        let host = self.latency.host().clone();
        let Self { latency, errors, container_label, cgroups } = self;
        for r in records {
            let cgroup = if *container_label { cgroups.number(r.header.cgroup_id) << 32 } else { 0 };
            let key = (u128::from_le_bytes(r.header.comm), r.syscall_nr as u64 | cgroup);
            let labels = |&(comm, packed): &Key| {
                let mut labels = vec![comm_label(&comm), syscall_label(&host, packed as u32)];
                if packed >> 32 != 0 {
                    labels.push(cgroups.label(packed >> 32));
                }
                labels.extend(VARIANT_LABEL.map(|(_, value)| value.to_owned()));
                labels
            };
            latency.observe(key, r.latency_ns, labels);
            if let Some(errno) = r.errno() {
                errors.add((key, errno), 1, |(key, errno)| {
                    let mut labels = labels(key);
                    labels.push(errno_label(&host, *errno));
                    labels
                });
            }
        }
        latency.flush();
        errors.flush();
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
