//! `wasmtap replay`: runs one plugin over a recording, without root or probes: the
//! plugin is loaded as the daemon loads it (same budgets, same WASI subset), each
//! recorded batch goes through the same routing (the plugin's own filters), and its
//! ticks fall on the recording's clock, so a replay is deterministic. Prints the
//! plugin's metrics (Prometheus text); its log records go to stderr as JSON lines.

use std::{
    path::PathBuf,
    sync::{Arc, mpsc::sync_channel},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use prometheus_client::{encoding::prometheus_text, registry::Registry};
use wasmtap_events::RecordHeader;

use super::Reader;
use crate::{
    config::Config,
    enrich::Enricher,
    events::{Batch, Router, Subscriber},
    plugins::{
        self, HostServices, PluginEngine,
        engine::Compiler,
        instance::instantiate,
        worker::{MIN_TICK, Work, subscriptions},
    },
    sinks::{MetricSink, SelfMetrics, logs::LogOutputs},
};

pub struct Options {
    pub recording: PathBuf,
    /// A `[[plugin]]` section (TOML): name, `path` or `bundled`, config, limits.
    pub plugin: String,
}

pub struct Outcome {
    /// The plugin's metrics, Prometheus text.
    pub metrics: String,
    pub batches: u64,
    pub records: u64,
    /// Compiling and linking the component; instantiating it and its `init`.
    pub load: Duration,
    pub init: Duration,
    /// Time inside the plugin's `on-batch` calls.
    pub in_batches: Duration,
}

/// Most ticks replayed for one gap in the recording.
const MAX_CATCH_UP: u64 = 10_000;

pub fn replay(options: &Options) -> anyhow::Result<Outcome> {
    let mut reader = Reader::open(&options.recording)?;
    let plugin = Config::parse("")?.plugin(&options.plugin, None)?;
    let sink = Arc::new(MetricSink::default());
    let metrics = SelfMetrics::default();
    let services = HostServices {
        engine: Arc::new(PluginEngine::new(None, Compiler::InProcess)?),
        sink: sink.clone(),
        metrics: metrics.clone(),
        enricher: Arc::new(Enricher::new()),
        logs: LogOutputs::stderr_json(&reader.header.node),
        recorder: None,
    };
    let started = Instant::now();
    let spec = plugins::prepare(&services, &plugin, None, None)?;
    let load = started.elapsed();
    let started = Instant::now();
    let (mut instance, manifest) = instantiate(&spec)?;
    let init = started.elapsed();
    let mut in_batches = Duration::ZERO;
    let deadline = Duration::from_millis(spec.budget.limits.call_deadline_ms);
    // Routed as live: one subscriber per kind, its filters compiled the same way.
    let (queue, batches) = sync_channel(crate::probes::KINDS.len());
    let subscribers: Vec<Arc<Subscriber>> = subscriptions(&manifest, &spec.budget)?
        .into_iter()
        .map(|(kind, filters)| Arc::new(Subscriber::new(&plugin.name, kind, filters, None, queue.clone(), metrics.plugin(&plugin.name))))
        .collect();
    let router = Router::default();
    router.set(subscribers, Vec::new());
    let tick_every = (manifest.tick_interval_ms > 0).then(|| (u64::from(manifest.tick_interval_ms) * 1_000_000).max(MIN_TICK.as_nanos() as u64));
    let (mut next_tick, mut last_ts) = (None, 0u64);
    let (mut delivered_batches, mut delivered_records) = (0, 0);
    while let Some(frame) = reader.next_frame()? {
        // The recording's clock (the probes' monotonic time) drives the ticks.
        if let Some(first) = frame.records.get(..size_of::<RecordHeader>()).map(|h| u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))) {
            last_ts = last_ts.max(first);
            if let Some(every) = tick_every {
                let next = next_tick.get_or_insert(first.saturating_add(every));
                // A gap of more than MAX_CATCH_UP ticks (a pause, or a damaged file) is
                // skipped to its last tick rather than ticked through.
                if first.saturating_sub(*next) / every > MAX_CATCH_UP {
                    *next = first - (first - *next) % every;
                }
                while *next <= first {
                    instance.tick_at(deadline, *next)?;
                    *next = next.saturating_add(every);
                    if *next == u64::MAX {
                        break;
                    }
                }
            }
        }
        router.dispatch(&Batch { kind: frame.kind, records: Arc::new(frame.records) });
        for work in batches.try_iter() {
            let Work::Batch(batch) = work else { continue };
            let started = Instant::now();
            instance.on_batch(deadline, batch.kind, &batch.records, frame.dropped).context("replaying a batch")?;
            in_batches += started.elapsed();
            delivered_batches += 1;
            delivered_records += batch.len() as u64;
        }
    }
    // A last tick, as a plugin gets when the daemon stops.
    if tick_every.is_some() {
        instance.tick_at(deadline, next_tick.unwrap_or(last_ts))?;
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(sink));
    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry)?;
    Ok(Outcome { metrics: text, batches: delivered_batches, records: delivered_records, load, init, in_batches })
}
