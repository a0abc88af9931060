//! The host side of the WIT contract: generated bindings, and the sink imports
//! implemented on each plugin's Store state. Handles a plugin holds index only its own
//! tables, so one plugin cannot reach another's series.

use std::sync::Arc;

use wasmtime::{ResourceLimiter, component::bindgen};

use crate::sinks::{
    MetricFamily, MetricSink, Series,
    logs::{Level, LogSink},
    metrics::{FamilySpec, MetricKind},
};

bindgen!({
    path: "../wit",
    world: "plugin",
    imports: { default: trappable },
});

pub use exports::wasmtap::plugin::handler::Guest as Handler;
pub use wasmtap::plugin::types::{EventKind as WitEventKind, HostInfo, Manifest};
use wasmtap::plugin::{logs, metrics, names};

/// Everything one plugin instance's Store holds.
pub struct PluginState {
    namespace: String,
    sink: Arc<MetricSink>,
    families: Vec<Arc<MetricFamily>>,
    series: Vec<(Arc<Series>, u32)>,
    logs: LogSink,
    pub limiter: MemoryLimiter,
}

impl PluginState {
    pub fn new(instance: &str, namespace: &str, sink: Arc<MetricSink>, memory_bytes: usize) -> Self {
        Self {
            namespace: namespace.to_owned(),
            sink,
            families: Vec::new(),
            series: Vec::new(),
            logs: LogSink::new(instance),
            limiter: MemoryLimiter { max_bytes: memory_bytes, current_bytes: 0 },
        }
    }

    fn series(&self, handle: u32) -> wasmtime::Result<&(Arc<Series>, u32)> {
        self.series.get(handle as usize).ok_or_else(|| wasmtime::format_err!("plugin used unknown series handle {handle}"))
    }
}

/// Caps linear memory per instance and remembers how much it holds.
pub struct MemoryLimiter {
    max_bytes: usize,
    pub current_bytes: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            return Ok(false);
        }
        self.current_bytes = self.current_bytes.max(desired);
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl wasmtap::plugin::types::Host for PluginState {}

impl metrics::Host for PluginState {
    fn declare_family(&mut self, desc: metrics::FamilyDesc) -> wasmtime::Result<Result<metrics::Family, String>> {
        let kind = match desc.kind {
            metrics::MetricKind::Counter => MetricKind::Counter,
            metrics::MetricKind::Gauge => MetricKind::Gauge,
            metrics::MetricKind::Histogram => MetricKind::Histogram,
        };
        let spec = FamilySpec { name: desc.name, help: desc.help, kind, label_names: desc.label_names, buckets: desc.buckets };
        Ok(self.sink.declare(&self.namespace, spec).map(|family| {
            match self.families.iter().position(|f| Arc::ptr_eq(f, &family)) {
                Some(i) => i as u32,
                None => {
                    self.families.push(family);
                    self.families.len() as u32 - 1
                }
            }
        }))
    }

    fn intern_series(&mut self, family: metrics::Family, label_values: Vec<String>) -> wasmtime::Result<Result<metrics::Series, String>> {
        let f = self.families.get(family as usize).ok_or_else(|| wasmtime::format_err!("plugin used unknown family handle {family}"))?;
        Ok(f.series(&label_values).map(|series| {
            match self.series.iter().position(|(s, _)| Arc::ptr_eq(s, &series)) {
                Some(i) => i as u32,
                None => {
                    self.series.push((series, family));
                    self.series.len() as u32 - 1
                }
            }
        }))
    }

    fn counter_add(&mut self, series: metrics::Series, value: u64) -> wasmtime::Result<()> {
        Ok(self.series(series)?.0.counter_add(value)?)
    }

    fn gauge_set(&mut self, series: metrics::Series, value: f64) -> wasmtime::Result<()> {
        Ok(self.series(series)?.0.gauge_set(value)?)
    }

    fn gauge_add(&mut self, series: metrics::Series, value: f64) -> wasmtime::Result<()> {
        Ok(self.series(series)?.0.gauge_add(value)?)
    }

    fn histogram_observe(&mut self, series: metrics::Series, value: f64) -> wasmtime::Result<()> {
        let (s, family) = self.series(series)?;
        Ok(s.histogram_observe(self.families[*family as usize].buckets(), value)?)
    }

    fn histogram_merge(&mut self, series: metrics::Series, bucket_counts: Vec<u64>, sum: f64) -> wasmtime::Result<()> {
        Ok(self.series(series)?.0.histogram_merge(&bucket_counts, sum)?)
    }
}

impl logs::Host for PluginState {
    fn log(&mut self, level: logs::Level, message: String, fields: Vec<(String, String)>) -> wasmtime::Result<()> {
        let level = match level {
            logs::Level::Trace => Level::Trace,
            logs::Level::Debug => Level::Debug,
            logs::Level::Info => Level::Info,
            logs::Level::Warn => Level::Warn,
            logs::Level::Error => Level::Error,
        };
        self.logs.log(level, &message, &fields);
        Ok(())
    }
}

impl names::Host for PluginState {
    fn syscall_name(&mut self, syscall_nr: u32) -> wasmtime::Result<Option<String>> {
        Ok(crate::names::syscall_name(syscall_nr).map(str::to_owned))
    }

    fn errno_name(&mut self, errno: u16) -> wasmtime::Result<Option<String>> {
        Ok(crate::names::errno_name(errno).map(str::to_owned))
    }
}
