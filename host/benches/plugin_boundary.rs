//! Plugin boundary: events/s through the bundled syscall-latency plugin in wasmtime,
//! fed synthetic batches the way the reader feeds it, beside the very same aggregation
//! code compiled natively against the same host sink. Prints; asserts nothing.
//!
//! cargo bench -p wasmtap --bench plugin_boundary

use std::{
    cell::RefCell,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use syscall_latency::SyscallLatency;
use wasmtap::{
    budget::Budget,
    config::{PluginConfig, PluginLimits},
    enrich::Enricher,
    plugins::{
        self, HostServices, PluginEngine,
        engine::Compiler,
        host::{
            FamilyHandle, PluginState, SeriesHandle,
            wasmtap::plugin::{metrics as wit, metrics::Host as _, metrics::HostFamily as _, metrics::HostSeries as _, names::Host as _},
        },
        instance::instantiate,
    },
    probes::syscall::KIND,
    sinks::{MetricSink, SelfMetrics, logs::LogOutputs, metrics::namespace_for},
};
use wasmtap_events::{Record as _, RecordHeader, SyscallRecord};
use wasmtap_sdk::{
    HostApi,
    host::{FamilyDesc, MetricKind},
};
use wasmtime::component::Resource;

const BATCH: usize = 4096;
const RUN: Duration = Duration::from_secs(3);

/// Synthetic batches: 16 comms × 24 syscalls, latencies spread over the buckets,
/// one in eight calls failing.
fn batches() -> Vec<Vec<u8>> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..16)
        .map(|_| {
            let mut bytes = Vec::with_capacity(BATCH * SyscallRecord::SIZE);
            for _ in 0..BATCH {
                let r = next();
                let mut comm = [0u8; 16];
                comm[..8].copy_from_slice(format!("proc-{:03}", r % 16).as_bytes());
                let record = SyscallRecord {
                    header: RecordHeader { pid: 1000 + (r % 16) as u32, comm, ..Default::default() },
                    latency_ns: 100 + (r >> 8) % (1 << ((r >> 40) % 24)),
                    ret: if r % 8 == 0 { -2 } else { 0 },
                    syscall_nr: ((r >> 20) % 24) as u32,
                    reserved: 0,
                };
                bytes.extend_from_slice(record.as_bytes());
            }
            bytes
        })
        .collect()
}

/// Runs `f` over the batches for `RUN`; returns events per second.
fn measure(batches: &[Vec<u8>], mut f: impl FnMut(&[u8])) -> f64 {
    for b in batches {
        f(b); // warm up: series interned, code paged in
    }
    let started = Instant::now();
    let mut events = 0usize;
    while started.elapsed() < RUN {
        for b in batches {
            f(b);
            events += b.len() / SyscallRecord::SIZE;
        }
    }
    events as f64 / started.elapsed().as_secs_f64()
}

/// The host's own sink implementation, called in process (no Wasm boundary).
#[derive(Clone)]
struct NativeHost(Rc<RefCell<PluginState>>);

impl HostApi for NativeHost {
    /// Handles are the host's resource reps, as a component would hold them.
    type Family = u32;
    type Series = u32;

    fn declare_family(&self, d: &FamilyDesc) -> Result<u32, String> {
        let kind = match d.kind {
            MetricKind::Counter => wit::MetricKind::Counter,
            MetricKind::Gauge => wit::MetricKind::Gauge,
            MetricKind::Histogram => wit::MetricKind::Histogram,
        };
        let desc = wit::FamilyDesc { name: d.name.clone(), help: d.help.clone(), kind, label_names: d.label_names.clone(), buckets: d.buckets.clone() };
        self.0.borrow_mut().declare_family(desc).unwrap().map(|f| f.rep())
    }
    fn series(&self, family: &u32, values: &[String]) -> Result<u32, String> {
        self.0.borrow_mut().series(Resource::<FamilyHandle>::new_borrow(*family), values.to_vec()).unwrap().map(|s| s.rep())
    }
    fn counter_add(&self, series: &u32, value: u64) {
        self.0.borrow_mut().counter_add(Resource::<SeriesHandle>::new_borrow(*series), value).unwrap()
    }
    fn gauge_set(&self, series: &u32, value: f64) {
        self.0.borrow_mut().gauge_set(Resource::<SeriesHandle>::new_borrow(*series), value).unwrap()
    }
    fn histogram_merge(&self, series: &u32, counts: &[u64], sum: f64) {
        self.0.borrow_mut().histogram_merge(Resource::<SeriesHandle>::new_borrow(*series), counts.to_vec(), sum).unwrap()
    }
    fn remove_series(&self, series: u32) {
        self.0.borrow_mut().remove(Resource::<SeriesHandle>::new_own(series)).unwrap()
    }
    fn syscall_name(&self, nr: u32) -> Option<String> {
        self.0.borrow_mut().syscall_name(nr).unwrap()
    }
    fn errno_name(&self, errno: u16) -> Option<String> {
        self.0.borrow_mut().errno_name(errno).unwrap()
    }
}

fn main() {
    let batches = batches();
    // Every budget on, at its default.
    let services = HostServices {
        engine: Arc::new(PluginEngine::new(None, Compiler::InProcess).expect("engine")),
        sink: Arc::new(MetricSink::default()),
        metrics: SelfMetrics::default(),
        enricher: Arc::new(Enricher::new()),
        logs: LogOutputs::daemon_log(),
        recorder: None,
    };
    let config = PluginConfig::bundled("syscall-latency", "syscall-latency");
    let spec = plugins::prepare(&services, &config, None, None).expect("plugin");
    let (mut instance, _) = instantiate(&spec).expect("instantiate");
    let deadline = Duration::from_secs(1);
    let wasm = measure(&batches, |b| instance.on_batch(deadline, &KIND, b, 0).expect("on-batch"));

    let native_sink = Arc::new(MetricSink::default());
    let budget = Arc::new(Budget::unmetered("native", PluginLimits::default()));
    let state = PluginState::new(&namespace_for("syscall-latency"), native_sink, budget, services.enricher.clone(), services.logs.clone(), None);
    let mut plugin = SyscallLatency::new(NativeHost(Rc::new(RefCell::new(state))), false).expect("native plugin");
    let native = measure(&batches, |b| {
        let records: Vec<SyscallRecord> = b.chunks_exact(SyscallRecord::SIZE).map(SyscallRecord::read).collect();
        plugin.observe(&records);
    });

    println!("plugin boundary: syscall-latency aggregation, batches of {BATCH} records, {}s each", RUN.as_secs());
    println!("  wasm (wasmtime, component, list<u8> batch) {:>12.0} events/s  {:>6.1} ns/event", wasm, 1e9 / wasm);
    println!("  native (same code, in process)             {:>12.0} events/s  {:>6.1} ns/event", native, 1e9 / native);
    println!("  wasm / native time per event: {:.2}x   (target <= 3x)", native / wasm);
}
