//! The daemon's own metrics (`wasmtap_*`): per probe and per plugin.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex, atomic::AtomicU64},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    probe: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabels {
    plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    plugin: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutputLabels {
    output: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutputDropLabels {
    output: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    plugin: String,
    family: String,
}

/// Families registered once; handles are taken per probe / plugin. Clones share them.
#[derive(Debug, Default, Clone)]
pub struct SelfMetrics {
    probe_records: Family<ProbeLabels, Counter>,
    probe_kernel_drops: Family<ProbeLabels, Counter>,
    probe_malformed: Family<ProbeLabels, Counter>,
    plugin_events: Family<PluginLabels, Counter>,
    plugin_dropped: Family<PluginLabels, Counter>,
    plugin_batches: Family<PluginLabels, Counter>,
    plugin_busy: Family<PluginLabels, Counter<f64, AtomicU64>>,
    plugin_traps: Family<PluginLabels, Counter>,
    plugin_restarts: Family<PluginLabels, Counter>,
    plugin_replaces: Family<PluginLabels, Counter>,
    plugin_memory: Family<PluginLabels, Gauge>,
    plugin_metric_bytes: Family<PluginLabels, Gauge>,
    plugin_series: Family<PluginLabels, Gauge>,
    plugin_quarantined: Family<PluginLabels, Gauge>,
    plugin_refusals: Family<RefusalLabels, Counter>,
    plugin_series_refused: Family<FamilyLabels, Counter>,
    log_delivered: Family<OutputLabels, Counter>,
    log_dropped: Family<OutputDropLabels, Counter>,
    log_send_errors: Family<OutputLabels, Counter>,
    log_buffered: Family<OutputLabels, Gauge>,
    /// Which families each plugin has a `plugin_series_refused` series for.
    refused_families: Arc<Mutex<HashMap<String, BTreeSet<String>>>>,
}

/// One probe's counters.
#[derive(Clone, Debug)]
pub struct ProbeCounters {
    /// Records read from the probe's ring buffer.
    pub records: Counter,
    /// Records the kernel could not write because the ring buffer was full.
    pub kernel_drops: Counter,
    /// Records of a size the kind's layout does not have (not delivered).
    pub malformed: Counter,
}

/// One log output's counters.
#[derive(Clone, Debug)]
pub struct OutputCounters {
    pub delivered: Counter,
    pub buffer_full: Counter,
    pub rejected: Counter,
    pub shutdown: Counter,
    pub send_errors: Counter,
    pub buffered: Gauge,
}

/// One plugin's counters.
#[derive(Clone, Debug)]
pub struct PluginCounters {
    pub events: Counter,
    pub dropped: Counter,
    pub batches: Counter,
    pub busy_seconds: Counter<f64, AtomicU64>,
    pub traps: Counter,
    pub restarts: Counter,
    pub replaces: Counter,
    pub memory_bytes: Gauge,
    pub metric_bytes: Gauge,
    pub series: Gauge,
    pub quarantined: Gauge,
}

impl SelfMetrics {
    /// Registers every family under `wasmtap_`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("wasmtap");
        r.register("probe_records", "Records read from a probe's ring buffer.", m.probe_records.clone());
        r.register("probe_kernel_drops", "Records lost in the kernel because a probe's ring buffer was full.", m.probe_kernel_drops.clone());
        r.register(
            "probe_malformed_records",
            "Records of a size the kind's layout does not have; not delivered (a kernel/host build mismatch).",
            m.probe_malformed.clone(),
        );
        r.register("plugin_events", "Events delivered to a plugin.", m.plugin_events.clone());
        r.register("plugin_dropped_events", "Events dropped for a plugin because its queue was full or it was down.", m.plugin_dropped.clone());
        r.register("plugin_batches", "Batches delivered to a plugin.", m.plugin_batches.clone());
        r.register("plugin_busy_seconds", "Time spent inside a plugin's calls.", m.plugin_busy.clone());
        r.register("plugin_traps", "Calls into a plugin that trapped.", m.plugin_traps.clone());
        r.register("plugin_restarts", "Times a plugin was re-instantiated after a fault.", m.plugin_restarts.clone());
        r.register("plugin_replaces", "Times a plugin was replaced by a new build or config (admin API, SIGHUP).", m.plugin_replaces.clone());
        r.register("plugin_memory_bytes", "Linear memory and tables a plugin's instance holds.", m.plugin_memory.clone());
        r.register("plugin_metric_bytes", "Host bytes a plugin's metric families and series take.", m.plugin_metric_bytes.clone());
        r.register("plugin_series", "Series in a plugin's metric families.", m.plugin_series.clone());
        r.register("plugin_quarantined", "1 when a plugin faulted too often and is no longer restarted.", m.plugin_quarantined.clone());
        r.register(
            "plugin_refusals",
            "Requests of a plugin the host refused, by reason (a budget, or an invalid or overflowing value).",
            m.plugin_refusals.clone(),
        );
        r.register(
            "plugin_series_refused",
            "New label sets of a full family that got no series of their own (counted in its __other__ series, or refused, as its overflow policy says).",
            m.plugin_series_refused.clone(),
        );
        r.register("log_records", "Plugin log records a log output delivered.", m.log_delivered.clone());
        r.register(
            "log_dropped_records",
            "Plugin log records a log output did not deliver, by reason: buffer_full (its buffer was at its bound), rejected (the receiver refused them), shutdown (still held when the daemon stopped).",
            m.log_dropped.clone(),
        );
        r.register("log_send_errors", "Failed attempts of a log output to deliver a batch (each is retried with backoff).", m.log_send_errors.clone());
        r.register("log_buffered_records", "Plugin log records waiting in a log output's buffer.", m.log_buffered.clone());
        m
    }

    /// One log output's counters.
    pub fn log_output(&self, output: &str) -> OutputCounters {
        let l = OutputLabels { output: output.to_owned() };
        let dropped = |reason| self.log_dropped.get_or_create(&OutputDropLabels { output: output.to_owned(), reason }).clone();
        OutputCounters {
            delivered: self.log_delivered.get_or_create(&l).clone(),
            buffer_full: dropped("buffer_full"),
            rejected: dropped("rejected"),
            shutdown: dropped("shutdown"),
            send_errors: self.log_send_errors.get_or_create(&l).clone(),
            buffered: self.log_buffered.get_or_create(&l).clone(),
        }
    }

    pub fn probe(&self, probe: &str) -> ProbeCounters {
        let l = ProbeLabels { probe: probe.to_owned() };
        ProbeCounters {
            records: self.probe_records.get_or_create(&l).clone(),
            kernel_drops: self.probe_kernel_drops.get_or_create(&l).clone(),
            malformed: self.probe_malformed.get_or_create(&l).clone(),
        }
    }

    pub fn plugin(&self, plugin: &str) -> PluginCounters {
        let l = PluginLabels { plugin: plugin.to_owned() };
        PluginCounters {
            events: self.plugin_events.get_or_create(&l).clone(),
            dropped: self.plugin_dropped.get_or_create(&l).clone(),
            batches: self.plugin_batches.get_or_create(&l).clone(),
            busy_seconds: self.plugin_busy.get_or_create(&l).clone(),
            traps: self.plugin_traps.get_or_create(&l).clone(),
            restarts: self.plugin_restarts.get_or_create(&l).clone(),
            replaces: self.plugin_replaces.get_or_create(&l).clone(),
            memory_bytes: self.plugin_memory.get_or_create(&l).clone(),
            metric_bytes: self.plugin_metric_bytes.get_or_create(&l).clone(),
            series: self.plugin_series.get_or_create(&l).clone(),
            quarantined: self.plugin_quarantined.get_or_create(&l).clone(),
        }
    }

    /// Drops an unloaded plugin's series (its name may never come back).
    pub fn forget_plugin(&self, plugin: &str) {
        let l = PluginLabels { plugin: plugin.to_owned() };
        for family in [&self.plugin_events, &self.plugin_dropped, &self.plugin_batches, &self.plugin_traps, &self.plugin_restarts, &self.plugin_replaces] {
            family.remove(&l);
        }
        self.plugin_busy.remove(&l);
        for family in [&self.plugin_memory, &self.plugin_metric_bytes, &self.plugin_series, &self.plugin_quarantined] {
            family.remove(&l);
        }
        for reason in crate::budget::Reason::ALL {
            self.plugin_refusals.remove(&RefusalLabels { plugin: plugin.to_owned(), reason: reason.label() });
        }
        for family in self.refused_families.lock().expect("refused families").remove(plugin).unwrap_or_default() {
            self.plugin_series_refused.remove(&FamilyLabels { plugin: plugin.to_owned(), family });
        }
    }

    /// The counter of a plugin's family's label sets that got no series of their own.
    pub fn series_refused(&self, plugin: &str, family: &str) -> Counter {
        self.refused_families.lock().expect("refused families").entry(plugin.to_owned()).or_default().insert(family.to_owned());
        self.plugin_series_refused.get_or_create(&FamilyLabels { plugin: plugin.to_owned(), family: family.to_owned() }).clone()
    }

    /// The refusal counter of one plugin and reason.
    pub fn refusals(&self, plugin: &str, reason: &'static str) -> Counter {
        self.plugin_refusals.get_or_create(&RefusalLabels { plugin: plugin.to_owned(), reason }).clone()
    }
}
