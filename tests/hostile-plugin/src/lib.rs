//! A hostile plugin for the isolation tests: `mode` (from the plugin's config) picks the
//! attack. Every mode subscribes to all syscalls (of `comm`, if given), so it runs under
//! load beside the healthy plugin. The `enrich-*` modes are the enrichment benchmark's
//! plugin; `stateful`, `init-fail` and `restore-fail` are the hot-swap tests' builds. Built by `tests/build.rs`; never bundled.
// Only the Wasm build exports (and so uses) the plugin; natively it is all dead code.
#![cfg_attr(not(target_family = "wasm"), allow(dead_code))]

use std::collections::HashMap;

use wasmtap_sdk::{
    Config, Filter, HostInfo, Manifest, Plugin, Record as _, Subscription, SyscallBatch, SyscallRecord, UprobeBatch, enrich, export_plugin,
    logs::{self, Level},
    metrics::{self, FamilyDesc, MetricKind},
};

/// Enrichment lookups per batch in the `enrich-*` modes.
const LOOKUPS: u64 = 1000;

struct Hostile {
    mode: String,
    batches: u64,
    series: Option<metrics::Series>,
    family: Option<metrics::Family>,
    /// Handles kept alive on purpose (handle-bomb).
    hoard: Vec<metrics::Series>,
    token: String,
    /// Records seen, kept in the guest and carried across a replace (stateful).
    count: u64,
}

fn desc(name: &str, help: String, kind: MetricKind, labels: &[&str], buckets: Vec<f64>) -> FamilyDesc {
    FamilyDesc { name: name.into(), help, kind, label_names: labels.iter().map(|s| s.to_string()).collect(), buckets }
}

fn all() -> Subscription {
    Subscription { kind: SyscallRecord::KIND.into(), filter: Filter::default() }
}

impl Plugin for Hostile {
    fn init(_: &HostInfo, config: &Config) -> Result<(Self, Manifest), String> {
        let mode: String = config.get("mode")?.unwrap_or_default();
        let token: String = config.get("token")?.unwrap_or_default();
        let mut subscriptions = vec![all()];
        let filter = &mut subscriptions[0].filter;
        filter.comms = config.get::<String>("comm")?.into_iter().collect();
        filter.pids = config.get::<u32>("pid")?.into_iter().collect();
        if let Some(syscall) = config.get::<String>("syscall")? {
            filter.params = vec![("syscalls".into(), vec![syscall])];
        }
        let mut tick_interval_ms = 0;
        let mut family = None;
        let mut series = None;
        match mode.as_str() {
            "bucket-bomb" => {
                let buckets = (0..100_000).map(f64::from).collect();
                let refused = metrics::declare_family(&desc("bomb", "h".into(), MetricKind::Histogram, &["a"], buckets)).unwrap_err();
                logs::log(Level::Info, "bucket bomb refused", &[("error".into(), refused)]);
            }
            "help-bomb" => {
                metrics::declare_family(&desc("bomb", "h".repeat(20 << 20), MetricKind::Gauge, &[], vec![])).unwrap_err();
            }
            "help-injection" => {
                let help = "x\n# EOF\nforged_total 424242".to_owned();
                metrics::declare_family(&desc("inject", help, MetricKind::Counter, &[], vec![])).unwrap_err();
            }
            "dup-labels" => {
                metrics::declare_family(&desc("dup", "h".into(), MetricKind::Counter, &["a", "a"], vec![])).unwrap_err();
            }
            "derived-names" => {
                metrics::declare_family(&desc("lat", "h".into(), MetricKind::Histogram, &[], vec![1.0])).unwrap();
                metrics::declare_family(&desc("lat_count", "h".into(), MetricKind::Gauge, &[], vec![])).unwrap_err();
            }
            "enrich-process" | "enrich-cgroup" => {
                let f = metrics::declare_family(&desc("lookups", "h".into(), MetricKind::Counter, &[], vec![]))?;
                series = Some(f.series(&[])?);
            }
            "enrich-peek" => family = Some(metrics::declare_family(&desc("answers", "h".into(), MetricKind::Counter, &["about"], vec![]))?),
            "wide-labels" | "series-bomb" | "handle-bomb" => {
                family = Some(metrics::declare_family(&desc("wide", "h".into(), MetricKind::Counter, &["v"], vec![]))?);
            }
            "counter-overflow" => {
                let f = metrics::declare_family(&desc("big", "h".into(), MetricKind::Counter, &[], vec![]))?;
                series = Some(f.series(&[])?);
            }
            "non-finite" => {
                let f = metrics::declare_family(&desc("level", "h".into(), MetricKind::Gauge, &[], vec![]))?;
                series = Some(f.series(&[])?);
            }
            "ticks" => {
                let f = metrics::declare_family(&desc("ticks", "h".into(), MetricKind::Counter, &[], vec![]))?;
                series = Some(f.series(&[])?);
                tick_interval_ms = 100;
            }
            "std" => {
                // Ordinary std: a randomly seeded HashMap, clocks, stdout.
                let mut seen = HashMap::new();
                seen.insert("now", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs());
                println!("std works: {} entries, env {:?}", seen.len(), std::env::vars().count());
                let f = metrics::declare_family(&desc("std_ok", "h".into(), MetricKind::Gauge, &[], vec![]))?;
                series = Some(f.series(&[])?);
                series.as_ref().unwrap().gauge_set(std::env::vars().count() as f64 + 1.0);
            }
            #[cfg(feature = "fs")]
            "fs" => {
                let _ = std::fs::read_to_string("/etc/passwd");
            }
            "filter-bomb" => subscriptions = (0..20_000).map(|_| all()).collect(),
            "pids" => {
                let n: u32 = config.get("count")?.unwrap_or(5000);
                let pids = (0..n).map(|i| 3_000_000 + i).collect();
                subscriptions = vec![Subscription { kind: SyscallRecord::KIND.into(), filter: Filter { pids, ..Filter::default() } }];
            }
            // Not hostile: subscribes to the probe points `probes` names (for the
            // uprobe kind's refusals).
            "probes" => {
                let params = vec![("probes".into(), config.list("probes")?)];
                subscriptions = vec![Subscription { kind: "uprobe".into(), filter: Filter { params, ..Filter::default() } }];
                family = Some(metrics::declare_family(&desc("hits", "h".into(), MetricKind::Counter, &["probe", "what"], vec![]))?);
            }
            "huge-error" => return Err("E".repeat(20 << 20)),
            "init-fail" => return Err("init refused on purpose".into()),
            "stateful" => {
                series = Some(metrics::declare_family(&desc("guest_records", "h".into(), MetricKind::Gauge, &[], vec![]))?.series(&[])?);
            }
            _ => {}
        }
        let state = Self { mode, batches: 0, series, family, hoard: Vec::new(), token, count: 0 };
        Ok((state, Manifest { subscriptions, tick_interval_ms }))
    }

    /// The "probes" mode: per point id, its hits and the sums of its first two arguments.
    fn on_uprobe(&mut self, batch: UprobeBatch<'_>) {
        let mut sums: HashMap<(u32, &str), u64> = HashMap::new();
        for r in batch.records() {
            *sums.entry((r.probe, "hits")).or_default() += 1;
            *sums.entry((r.probe, "arg0")).or_default() += r.args[0];
            *sums.entry((r.probe, "arg1")).or_default() += r.args[1];
        }
        if let Some(family) = &self.family {
            for ((probe, what), sum) in sums {
                if let Ok(series) = family.series(&[probe.to_string(), what.into()]) {
                    series.counter_add(sum);
                }
            }
        }
    }

    fn on_syscalls(&mut self, batch: SyscallBatch<'_>) {
        self.batches += 1;
        match self.mode.as_str() {
            // A tenant's plugin asking about its own cgroup, and about init (outside it).
            "enrich-peek" => {
                let Some(r) = batch.records().first() else { return };
                let family = self.family.as_ref().unwrap();
                for (about, answered) in [("own", enrich::cgroup(r.header.cgroup_id).is_some()), ("init", enrich::process(1, 0).is_some())] {
                    let series = family.series(&[about.into()]).unwrap();
                    series.counter_add(u64::from(answered));
                }
            }
            // Not an attack: the benchmark's measure of a cached enrichment lookup.
            "enrich-process" | "enrich-cgroup" => {
                let Some(r) = batch.records().first() else { return };
                for _ in 0..LOOKUPS {
                    if self.mode == "enrich-process" {
                        std::hint::black_box(enrich::process(r.header.pid, r.header.ts_ns));
                    } else {
                        std::hint::black_box(enrich::cgroup(r.header.cgroup_id));
                    }
                }
                self.series.as_ref().unwrap().counter_add(LOOKUPS);
            }
            "wide-labels" => {
                let _ = self.family.as_ref().unwrap().series(&["w".repeat(4096)]);
            }
            "series-bomb" => {
                for i in 0..1000 {
                    let value = format!("{:0>200}", self.batches * 1000 + i);
                    if self.family.as_ref().unwrap().series(&[value]).is_err() {
                        break;
                    }
                }
            }
            "counter-overflow" => self.series.as_ref().unwrap().counter_add(u64::MAX),
            "non-finite" => self.series.as_ref().unwrap().gauge_set(f64::INFINITY),
            // The same series over and over, every handle kept: the handle table is bounded.
            "handle-bomb" => {
                for _ in 0..1000 {
                    match self.family.as_ref().unwrap().series(&["same".into()]) {
                        Ok(handle) => self.hoard.push(handle),
                        Err(_) => break,
                    }
                }
            }
            "log-flood" => {
                let big = "f".repeat(4000);
                for _ in 0..100 {
                    logs::log(Level::Info, &big, &[("k".into(), "v".repeat(1000))]);
                }
            }
            // Not an attack: the log export tests' records, one per event, numbered.
            "log-each" => {
                for r in batch.records() {
                    self.count += 1;
                    let fields = [("n".into(), self.count.to_string()), ("syscall".into(), r.syscall_nr.to_string()), ("token".into(), self.token.clone())];
                    logs::log(Level::Info, "event seen", &fields);
                }
            }
            "log-injection" => {
                logs::log(Level::Warn, "hello\nFORGED-LINE wasmtap: all good", &[("x\ny".into(), "a\nFORGED-FIELD".into())]);
                println!("stdout\n\nFORGED-STDOUT");
            }
            "trap-storm" if self.batches.is_multiple_of(2) => panic!("storm {}", self.token),
            "panic" => panic!("hostile panic {}", self.token),
            "slow" => {
                let start = std::time::Instant::now();
                while start.elapsed() < std::time::Duration::from_millis(400) {
                    std::hint::spin_loop();
                }
            }
            // Blocking in the host would escape the call deadline: the clock returns at once.
            "sleep" => std::thread::sleep(std::time::Duration::from_secs(3600)),
            "stateful" => {
                self.count += batch.records().len() as u64;
                self.series.as_ref().unwrap().gauge_set(self.count as f64);
            }
            "memory-bomb" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                }
            }
            _ => {}
        }
    }

    fn tick(&mut self, _now_ns: u64) {
        if self.mode == "ticks" {
            self.series.as_ref().unwrap().counter_add(1);
        }
    }

    fn snapshot(&mut self) -> Option<Vec<u8>> {
        (self.mode == "stateful").then(|| self.count.to_le_bytes().to_vec())
    }

    fn restore(&mut self, state: Vec<u8>) -> Result<(), String> {
        if self.mode == "restore-fail" {
            return Err("restore refused on purpose".into());
        }
        if self.mode == "stateful" {
            let bytes: [u8; 8] = state.try_into().map_err(|_| "a stateful snapshot is 8 bytes")?;
            self.count = u64::from_le_bytes(bytes);
            self.series.as_ref().unwrap().gauge_set(self.count as f64);
        }
        Ok(())
    }
}

export_plugin!(Hostile);
