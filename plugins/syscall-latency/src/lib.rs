//! syscall-latency: a histogram of syscall latency in seconds by `comm` and `syscall`,
//! and a counter of failed syscalls by `comm`, `syscall` and `errno`.
//!
//! Config (all optional, comma-separated): `pids`, `cgroups`, `syscalls` (names) narrow
//! the subscription; by default every process is observed.

use wasmtap_sdk::{
    Config, CounterVec, EventKind, Filter, HistogramVec, HostApi, HostInfo, Manifest, Plugin, Subscription,
    SyscallBatch, SyscallRecord, Wit, export_plugin,
    names::{errno_label, syscall_label},
};

/// Per-thread-name, per-syscall key. The comm stays raw (as one integer, so comparing
/// keys is two integer compares, not a byte loop) and is only formatted for a new series.
type Key = (u128, u32);

/// The plugin's state. Generic over the host so the benchmark can run the very same
/// aggregation natively; as a plugin it talks to the real host through [`Wit`].
pub struct SyscallLatency<H: HostApi + Clone = Wit> {
    latency: HistogramVec<Key, H>,
    errors: CounterVec<(Key, u16), H>,
}

/// Upper bounds in nanoseconds: powers of two from 128 ns to ~8.6 s.
pub fn latency_bounds_ns() -> Vec<u64> {
    (7..=33).map(|shift| 1u64 << shift).collect()
}

fn comm_label(comm: &u128) -> String {
    let comm = comm.to_le_bytes();
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..len]).into_owned()
}

impl<H: HostApi + Clone> SyscallLatency<H> {
    pub fn new(host: H) -> Result<Self, String> {
        Ok(Self {
            latency: HistogramVec::declare(
                host.clone(),
                "seconds",
                "Latency of completed system calls.",
                &["comm", "syscall"],
                latency_bounds_ns(),
                1e-9,
            )?,
            errors: CounterVec::declare(host, "errors", "System calls that returned an error.", &["comm", "syscall", "errno"])?,
        })
    }

    /// Aggregates one batch and flushes it to the host.
    pub fn observe(&mut self, records: &[SyscallRecord]) {
        let host = self.latency.host().clone();
        for r in records {
            let key = (u128::from_le_bytes(r.comm), r.syscall_nr);
            self.latency.observe(key, r.latency_ns, |(comm, nr)| vec![comm_label(comm), syscall_label(&host, *nr)]);
            if let Some(errno) = r.errno() {
                self.errors.add((key, errno), 1, |((comm, nr), errno)| {
                    vec![comm_label(comm), syscall_label(&host, *nr), errno_label(&host, *errno)]
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
            syscalls: config.list("syscalls")?,
        };
        let manifest = Manifest { subscriptions: vec![Subscription { kind: EventKind::Syscall, filter }], tick_interval_ms: 0 };
        Ok((Self::new(Wit)?, manifest))
    }

    fn on_syscalls(&mut self, batch: SyscallBatch<'_>) {
        self.observe(batch.records());
    }
}

export_plugin!(SyscallLatency);
