//! process-churn: process lifecycle per container (or cgroup path outside containers):
//! forks, execs by executable, exits by exit code (or terminating signal), and a
//! histogram of process lifetimes.
//!
//! The container comes from enrichment (the host parses the cgroup path), looked up
//! once per cgroup; the executable from enrichment (its real path) while the process
//! lives when the exec is handled, else the path it was exec'd by (which may be a
//! symlink or relative): a process that execs and exits within one drain interval is
//! labelled by the latter. Config (optional): `pids`, `cgroups`, `comms` narrow the
//! subscription.

use rustc_hash::FxHashMap;
use wasmtap_sdk::{
    Config, CounterVec, Filter, HistogramVec, HostInfo, Manifest, Plugin, ProcessBatch, ProcessRecord, Record as _, Subscription, Wit, enrich, export_plugin,
    names, process::event,
};

/// Cgroups whose label is remembered; the table is cleared when it fills.
const MAX_CGROUPS: usize = 4096;

pub struct ProcessChurn {
    forks: CounterVec<u64>,
    execs: CounterVec<(u64, String)>,
    exits: CounterVec<(u64, i64)>,
    lifetime: HistogramVec<u64>,
    /// cgroup id → container label.
    containers: FxHashMap<u64, String>,
}

/// Lifetime bounds in nanoseconds: 1 ms to one day.
fn lifetime_bounds_ns() -> Vec<u64> {
    [1e-3, 1e-2, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 600.0, 3600.0, 86400.0].iter().map(|s| (s * 1e9) as u64).collect()
}

/// An exit's `code` label: the exit status, or `signal_<n>` when a signal ended it.
fn code_label(code: &i64) -> String {
    if *code < 0 { format!("signal_{}", -code) } else { code.to_string() }
}

impl ProcessChurn {
    /// The container label of a cgroup; "unknown" (asked again next time) while the
    /// host cannot tell.
    fn container(&mut self, cgroup_id: u64) -> String {
        if let Some(label) = self.containers.get(&cgroup_id) {
            return label.clone();
        }
        let Some(label) = names::container_of(cgroup_id) else { return "unknown".into() };
        if self.containers.len() >= MAX_CGROUPS {
            self.containers.clear();
        }
        self.containers.insert(cgroup_id, label.clone());
        label
    }

    fn observe(&mut self, r: &ProcessRecord) {
        let cgroup = r.header.cgroup_id;
        let container = self.container(cgroup);
        match r.event {
            event::FORK => self.forks.add(cgroup, 1, |_| vec![container]),
            event::EXEC => {
                let exe = enrich::process(r.header.pid, r.header.ts_ns)
                    .and_then(|p| p.exe)
                    .unwrap_or_else(|| String::from_utf8_lossy(r.filename_bytes()).into_owned());
                self.execs.add((cgroup, exe), 1, |(_, exe)| vec![container, exe.clone()]);
            }
            event::EXIT => {
                let code = if r.signal != 0 { -i64::from(r.signal) } else { i64::from(r.exit_code) };
                self.exits.add((cgroup, code), 1, |(_, code)| vec![container.clone(), code_label(code)]);
                self.lifetime.observe(cgroup, r.lifetime_ns, |_| vec![container]);
            }
            _ => {}
        }
    }
}

impl Plugin for ProcessChurn {
    fn init(_host: &HostInfo, config: &Config) -> Result<(Self, Manifest), String> {
        let filter = Filter { pids: config.list("pids")?, cgroups: config.list("cgroups")?, comms: config.list("comms")?, params: Vec::new() };
        let subscriptions = vec![Subscription { kind: ProcessRecord::KIND.into(), filter }];
        let plugin = Self {
            forks: CounterVec::declare(Wit, "forks", "New processes (not threads), by the container they started in.", &["container"])?,
            execs: CounterVec::declare(Wit, "execs", "Successful execs, by container and executable.", &["container", "exe"])?,
            exits: CounterVec::declare(Wit, "exits", "Processes that ended, by container and exit code (signal_<n> when killed).", &["container", "code"])?,
            lifetime: HistogramVec::declare(Wit, "lifetime_seconds", "How long processes lived, by container.", &["container"], lifetime_bounds_ns(), 1e-9)?,
            containers: FxHashMap::default(),
        };
        Ok((plugin, Manifest { subscriptions, tick_interval_ms: 0 }))
    }

    fn on_process(&mut self, batch: ProcessBatch<'_>) {
        for r in batch.records() {
            self.observe(r);
        }
        self.forks.flush();
        self.execs.flush();
        self.exits.flush();
        self.lifetime.flush();
    }
}

export_plugin!(ProcessChurn);
