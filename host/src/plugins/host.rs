//! The host side of the WIT contract: generated bindings, and the sink imports
//! implemented on each plugin's Store state. Handles a plugin holds index only its own
//! tables, so one plugin cannot reach another's series; everything it makes the host
//! hold is charged to its budget.

use std::sync::Arc;

use wasmtime::{
    ResourceLimiter,
    component::{Resource, ResourceTable, bindgen},
};
use wasmtime_wasi::WasiCtx;

use super::wasi::{self, GuestOutput};

use crate::{
    budget::{Budget, Reason, Refusal},
    enrich::{CgroupFacts, Enricher, ProcessFacts},
    sinks::{
        MetricFamily, MetricSink, Series,
        logs::{Level, LogOutputs, LogSink},
        metrics::{FamilySpec, MetricKind, SeriesError, Staging},
    },
};

bindgen!({
    path: "../wit",
    world: "plugin",
    imports: { default: trappable },
    with: {
        "wasmtap:plugin/metrics.family": FamilyHandle,
        "wasmtap:plugin/metrics.series": SeriesHandle,
    },
});

/// The optional `state` export: the same contract seen through the world that exports
/// it, used only to look that export up (its imports are the ones above).
mod stateful {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "stateful-plugin",
        imports: { default: trappable },
        with: {
            "wasmtap:plugin/types": super::wasmtap::plugin::types,
            "wasmtap:plugin/metrics": super::wasmtap::plugin::metrics,
            "wasmtap:plugin/logs": super::wasmtap::plugin::logs,
            "wasmtap:plugin/names": super::wasmtap::plugin::names,
            "wasmtap:plugin/enrich": super::wasmtap::plugin::enrich,
        },
    });
}

pub use exports::wasmtap::plugin::handler::Guest as Handler;
pub use stateful::exports::wasmtap::plugin::state::{Guest as StateExport, GuestIndices as StateIndices};
pub use wasmtap::plugin::types::{ConfigValue, HostInfo, Manifest};
use wasmtap::plugin::{enrich, logs, metrics, names};

/// Everything one plugin instance's Store holds.
pub struct PluginState {
    namespace: String,
    sink: Arc<MetricSink>,
    /// Set while the instance is a build being swapped in (see `MetricSink::declare`).
    staging: Option<Arc<Staging>>,
    budget: Arc<Budget>,
    /// Metric family and series handles (apart from the WASI handles, so neither can
    /// crowd out the other), at most `series + families` of them.
    handles: ResourceTable,
    handle_count: usize,
    enricher: Arc<Enricher>,
    logs: LogSink,
    pub limiter: MemoryLimiter,
    wasi: WasiCtx,
    table: ResourceTable,
    outputs: [GuestOutput; 2],
}

impl PluginState {
    pub fn new(
        namespace: &str,
        sink: Arc<MetricSink>,
        budget: Arc<Budget>,
        enricher: Arc<Enricher>,
        outputs: Arc<LogOutputs>,
        staging: Option<Arc<Staging>>,
    ) -> Self {
        let logs = LogSink::new(budget.clone(), outputs);
        let (wasi, outputs) = wasi::context(&logs);
        Self {
            namespace: namespace.to_owned(),
            sink,
            staging,
            handles: ResourceTable::new(),
            handle_count: 0,
            enricher,
            logs,
            limiter: MemoryLimiter { budget: budget.clone(), held: 0, pending: 0, refused: None },
            budget,
            wasi,
            table: {
                let mut table = ResourceTable::new();
                table.set_max_capacity(wasi::MAX_WASI_HANDLES);
                table
            },
            outputs,
        }
    }

    pub fn end_staging(&mut self) {
        self.staging = None;
    }

    /// The WASI context and the resource table its handles live in.
    pub fn wasi(&mut self) -> (&mut WasiCtx, &mut ResourceTable) {
        (&mut self.wasi, &mut self.table)
    }

    /// After a call: logs what the plugin left of a stdout/stderr line.
    pub fn finish_output(&self) {
        self.outputs.iter().for_each(GuestOutput::finish);
    }

    /// Before a call: forget the previous call's hints.
    pub fn begin_call(&mut self) {
        self.limiter.refused = None;
        self.logs.clear_last_problem();
    }

    /// Why the memory could not grow, or what the plugin said was wrong during the call
    /// (a panic message, say): shown with a fault.
    pub fn fault_hint(&self) -> Option<String> {
        self.limiter.refused.clone().or_else(|| self.logs.last_problem().map(|said| format!("the plugin said: {said}")))
    }

    /// A refused value is counted and the call returns normally; misuse traps.
    fn apply(&self, result: Result<(), SeriesError>) -> wasmtime::Result<()> {
        match result {
            Ok(()) => Ok(()),
            Err(SeriesError::Refused(reason)) => {
                self.budget.refuse(Refusal::new(reason, format!("a metric value was refused ({})", reason.label())));
                Ok(())
            }
            Err(e @ SeriesError::Misuse(_)) => Err(e.into()),
        }
    }
}

/// Charges every linear memory and table of an instance to the plugin's (and its
/// tenant's) memory budget, so the cap holds for the whole instance, not each memory;
/// released when the instance is dropped.
pub struct MemoryLimiter {
    budget: Arc<Budget>,
    /// Bytes of memories and tables the instance holds.
    pub held: usize,
    /// Charged for a growth wasmtime may still fail (past a declared maximum); refunded
    /// by `*_grow_failed`.
    pending: usize,
    /// Why the last growth was refused, for the fault report.
    pub refused: Option<String>,
}

/// What a table element is charged (a pointer-sized slot).
const TABLE_ELEMENT_BYTES: usize = 8;

impl MemoryLimiter {
    fn grow(&mut self, what: &str, current: usize, desired: usize) -> bool {
        let delta = desired.saturating_sub(current);
        match self.budget.charge(Reason::Memory, delta as u64) {
            Ok(()) => {
                self.held += delta;
                self.pending = delta;
                true
            }
            Err(refusal) => {
                self.refused = Some(format!("out of memory: growing a {what} from {current} to {desired} bytes was refused, {refusal}"));
                false
            }
        }
    }
}

impl MemoryLimiter {
    fn refund(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        self.held -= pending;
        self.budget.release(Reason::Memory, pending as u64);
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(self.grow("linear memory", current, desired))
    }

    fn memory_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.refund();
        Ok(())
    }

    fn table_growing(&mut self, current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(self.grow("table", current.saturating_mul(TABLE_ELEMENT_BYTES), desired.saturating_mul(TABLE_ELEMENT_BYTES)))
    }

    fn table_grow_failed(&mut self, _error: wasmtime::Error) -> wasmtime::Result<()> {
        self.refund();
        Ok(())
    }

    /// Instance metadata is not charged, so keep the number of core instances bounded
    /// (a Rust component has a handful, a componentize-py one a few dozen).
    fn instances(&self) -> usize {
        256
    }

    fn tables(&self) -> usize {
        100
    }

    /// Generous: the byte total above is the bound that matters.
    fn memories(&self) -> usize {
        64
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        self.budget.release(Reason::Memory, self.held as u64);
    }
}

impl wasmtap::plugin::types::Host for PluginState {}

/// A family handle as a plugin holds it.
pub struct FamilyHandle(Arc<MetricFamily>);

/// A series handle as a plugin holds it.
pub struct SeriesHandle {
    series: Arc<Series>,
    family: Arc<MetricFamily>,
}

impl PluginState {
    /// Whether the plugin may hold one more metric handle; refused (and counted) if not.
    /// Checked before a family or series is made, so a refused handle costs nothing.
    fn room_for_handle(&self) -> Result<(), String> {
        let limit = self.budget.limits.series + self.budget.limits.families;
        if self.handle_count < limit {
            return Ok(());
        }
        let message = format!("the plugin holds {limit} metric handles (series + families); drop unused ones");
        Err(self.budget.refuse(Refusal::new(Reason::Handles, message)).to_string())
    }

    fn handle<T: Send + 'static>(&mut self, value: T) -> wasmtime::Result<Resource<T>> {
        self.handle_count += 1;
        Ok(self.handles.push(value)?)
    }

    /// Writes through a series handle; a series removed meanwhile (through another
    /// handle) takes no more values: refused and counted, not kept out of sight.
    fn write(&self, handle: &Resource<SeriesHandle>, write: impl FnOnce(&SeriesHandle) -> Result<(), SeriesError>) -> wasmtime::Result<()> {
        self.write_to(self.handles.get(handle)?, write)
    }

    /// `write` for a handle already looked up.
    fn write_to(&self, s: &SeriesHandle, write: impl FnOnce(&SeriesHandle) -> Result<(), SeriesError>) -> wasmtime::Result<()> {
        if s.series.is_removed() {
            self.budget.refuse(Refusal::new(Reason::RemovedSeries, "a value was written to a removed series".to_owned()));
            return Ok(());
        }
        self.apply(write(s))
    }
}

impl metrics::Host for PluginState {
    fn declare_family(&mut self, desc: metrics::FamilyDesc) -> wasmtime::Result<Result<Resource<FamilyHandle>, String>> {
        let kind = match desc.kind {
            metrics::MetricKind::Counter => MetricKind::Counter,
            metrics::MetricKind::Gauge => MetricKind::Gauge,
            metrics::MetricKind::Histogram => MetricKind::Histogram,
        };
        let spec = FamilySpec { name: desc.name, help: desc.help, kind, label_names: desc.label_names, buckets: desc.buckets };
        if let Err(e) = self.room_for_handle() {
            return Ok(Err(e));
        }
        match self.sink.declare(&self.namespace, spec, &self.budget, self.staging.as_deref()) {
            Ok(family) => Ok(Ok(self.handle(FamilyHandle(family))?)),
            Err(refusal) => Ok(Err(refusal.to_string())),
        }
    }

    fn merge_histograms(&mut self, series: Vec<Resource<SeriesHandle>>, bucket_counts: Vec<u64>, sums: Vec<f64>) -> wasmtime::Result<()> {
        if sums.len() != series.len() {
            return Err(SeriesError::Misuse("merge-histograms needs one sum per series").into());
        }
        let mut counts = bucket_counts.as_slice();
        for (handle, sum) in series.iter().zip(sums) {
            let s = self.handles.get(handle)?;
            // The family's bucket count, plus `+Inf` (any other kind of series traps below).
            let Some((mine, rest)) = counts.split_at_checked(s.family.buckets().len() + 1) else {
                return Err(SeriesError::Misuse("merge-histograms got fewer bucket counts than its series have buckets").into());
            };
            counts = rest;
            self.write_to(s, |s| s.series.histogram_merge(mine, sum))?;
        }
        if !counts.is_empty() {
            return Err(SeriesError::Misuse("merge-histograms got more bucket counts than its series have buckets").into());
        }
        Ok(())
    }

    fn add_counters(&mut self, series: Vec<Resource<SeriesHandle>>, values: Vec<u64>) -> wasmtime::Result<()> {
        if values.len() != series.len() {
            return Err(SeriesError::Misuse("add-counters needs one value per series").into());
        }
        series.iter().zip(values).try_for_each(|(handle, value)| self.write(handle, |s| s.series.counter_add(value)))
    }
}

impl metrics::HostFamily for PluginState {
    fn series(&mut self, family: Resource<FamilyHandle>, label_values: Vec<String>) -> wasmtime::Result<Result<Resource<SeriesHandle>, String>> {
        let family = self.handles.get(&family)?.0.clone();
        if let Err(e) = self.room_for_handle() {
            return Ok(Err(e));
        }
        match family.series(&label_values, &self.budget) {
            Ok(series) => Ok(Ok(self.handle(SeriesHandle { series, family })?)),
            Err(refusal) => Ok(Err(refusal.to_string())),
        }
    }

    fn drop(&mut self, family: Resource<FamilyHandle>) -> wasmtime::Result<()> {
        self.handles.delete(family)?;
        self.handle_count -= 1;
        Ok(())
    }
}

impl metrics::HostSeries for PluginState {
    fn counter_add(&mut self, series: Resource<SeriesHandle>, value: u64) -> wasmtime::Result<()> {
        self.write(&series, |s| s.series.counter_add(value))
    }

    fn gauge_set(&mut self, series: Resource<SeriesHandle>, value: f64) -> wasmtime::Result<()> {
        self.write(&series, |s| s.series.gauge_set(value))
    }

    fn gauge_add(&mut self, series: Resource<SeriesHandle>, value: f64) -> wasmtime::Result<()> {
        self.write(&series, |s| s.series.gauge_add(value))
    }

    fn histogram_observe(&mut self, series: Resource<SeriesHandle>, value: f64) -> wasmtime::Result<()> {
        self.write(&series, |s| s.series.histogram_observe(s.family.buckets(), value))
    }

    fn histogram_merge(&mut self, series: Resource<SeriesHandle>, bucket_counts: Vec<u64>, sum: f64) -> wasmtime::Result<()> {
        self.write(&series, |s| s.series.histogram_merge(&bucket_counts, sum))
    }

    fn is_overflow(&mut self, series: Resource<SeriesHandle>) -> wasmtime::Result<bool> {
        Ok(self.handles.get(&series)?.series.is_overflow())
    }

    fn remove(&mut self, series: Resource<SeriesHandle>) -> wasmtime::Result<()> {
        let s = self.handles.delete(series)?;
        self.handle_count -= 1;
        s.family.remove(&s.series, &self.budget);
        Ok(())
    }

    fn drop(&mut self, series: Resource<SeriesHandle>) -> wasmtime::Result<()> {
        self.handles.delete(series)?;
        self.handle_count -= 1;
        Ok(())
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
        self.logs.log(level, message, fields);
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

fn cgroup_info(facts: &CgroupFacts) -> enrich::CgroupInfo {
    enrich::CgroupInfo { id: facts.id, path: facts.path.clone(), container_id: facts.container_id.clone(), pod_uid: facts.pod_uid.clone() }
}

fn process_info(facts: &ProcessFacts) -> enrich::ProcessInfo {
    enrich::ProcessInfo {
        pid: facts.pid,
        ppid: facts.ppid,
        uid: facts.uid,
        user: facts.user.clone(),
        comm: facts.comm.clone(),
        exe: facts.exe.clone(),
        cgroup: facts.cgroup.as_deref().map(cgroup_info),
    }
}

impl PluginState {
    /// Whether a tenant's plugin may learn about cgroup `id` (one outside its scope is
    /// another tenant's business).
    fn may_see(&self, id: u64) -> bool {
        self.budget.tenant.as_ref().is_none_or(|t| t.scope.contains(id))
    }

    /// A process's facts, if the plugin may see the process (a tenant's plugin: one in
    /// its scope).
    fn visible_process(&self, pid: u32, seen_ns: u64) -> Option<Arc<ProcessFacts>> {
        let facts = self.enricher.process(pid, seen_ns)?;
        (self.budget.tenant.is_none() || facts.cgroup.as_ref().is_some_and(|c| self.may_see(c.id))).then_some(facts)
    }
}

impl enrich::Host for PluginState {
    fn process(&mut self, pid: u32, seen_ns: u64) -> wasmtime::Result<Option<enrich::ProcessInfo>> {
        Ok(self.visible_process(pid, seen_ns).as_deref().map(process_info))
    }

    fn cmdline(&mut self, pid: u32, seen_ns: u64) -> wasmtime::Result<Option<Vec<String>>> {
        Ok(self.visible_process(pid, seen_ns).map(|f| f.cmdline.clone()))
    }

    fn cgroup(&mut self, cgroup_id: u64) -> wasmtime::Result<Option<enrich::CgroupInfo>> {
        if !self.may_see(cgroup_id) {
            return Ok(None);
        }
        Ok(self.enricher.cgroup(cgroup_id).as_deref().map(cgroup_info))
    }

    fn node(&mut self) -> wasmtime::Result<enrich::NodeInfo> {
        let node = self.enricher.node();
        Ok(enrich::NodeInfo { hostname: node.hostname.clone(), kernel_release: node.kernel_release.clone() })
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::prometheus_text, registry::Registry};

    use super::{metrics::Host as _, metrics::HostFamily as _, *};
    use crate::config::PluginLimits;

    #[test]
    fn many_deltas_in_one_call_land_like_one_call_each() {
        let sink = Arc::new(MetricSink::default());
        let budget = Arc::new(Budget::unmetered("p", PluginLimits::default()));
        let mut state = PluginState::new("ns", sink.clone(), budget, Arc::new(Enricher::new()), LogOutputs::daemon_log(), None);
        let declare = |state: &mut PluginState, name: &str, kind, buckets: Vec<f64>| {
            let desc = metrics::FamilyDesc { name: name.into(), help: "h".into(), kind, label_names: vec!["a".into()], buckets };
            let family = state.declare_family(desc).unwrap().unwrap();
            let mut series = |v: &str| state.series(Resource::new_borrow(family.rep()), vec![v.into()]).unwrap().unwrap();
            (series("x"), series("y"))
        };
        let (hx, hy) = declare(&mut state, "lat_seconds", metrics::MetricKind::Histogram, vec![0.1, 1.0]);
        let (cx, cy) = declare(&mut state, "errors", metrics::MetricKind::Counter, vec![]);
        let borrow = |r: &Resource<SeriesHandle>| Resource::<SeriesHandle>::new_borrow(r.rep());
        state.merge_histograms(vec![borrow(&hx), borrow(&hy)], vec![1, 0, 2, 0, 4, 0], vec![2.5, 1.0]).unwrap();
        state.add_counters(vec![borrow(&cx), borrow(&cy)], vec![3, 5]).unwrap();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(sink.clone()));
        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry).unwrap();
        for line in [
            "ns_lat_seconds_bucket{a=\"x\",le=\"0.1\"} 1\n",
            "ns_lat_seconds_count{a=\"x\"} 3\n",
            "ns_lat_seconds_bucket{a=\"y\",le=\"1\"} 4\n",
            "ns_lat_seconds_count{a=\"y\"} 4\n",
            "ns_errors_total{a=\"x\"} 3\n",
            "ns_errors_total{a=\"y\"} 5\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        // Lengths that do not add up are the plugin's bug: the call traps.
        assert!(state.merge_histograms(vec![borrow(&hx)], vec![1, 0], vec![0.0]).is_err());
        assert!(state.merge_histograms(vec![borrow(&hx)], vec![1, 0, 0, 1], vec![0.0]).is_err());
        assert!(state.merge_histograms(vec![borrow(&hx), borrow(&hy)], vec![0; 6], vec![0.0]).is_err());
        assert!(state.add_counters(vec![borrow(&cx)], vec![]).is_err());
        assert!(state.merge_histograms(vec![borrow(&cx)], vec![1], vec![0.0]).is_err(), "a counter is no histogram");
    }
}
