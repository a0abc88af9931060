//! The plugin metric sink: families and series owned by the host.
//!
//! Plugins declare families and intern label sets into series once, then flush
//! pre-aggregated deltas. Because the host owns the series, a restarted or swapped
//! plugin that declares the same family keeps adding to the same counters.
//! Each plugin's families live under its namespace (`<namespace>_<name>`), and the
//! quotas below keep one plugin from exhausting the scrape for everyone.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, NoLabelSet},
    metrics::MetricType,
};

/// What kind of values a family holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// A family as a plugin declares it (name without namespace).
#[derive(Debug, Clone, PartialEq)]
pub struct FamilySpec {
    pub name: String,
    pub help: String,
    pub kind: MetricKind,
    pub label_names: Vec<String>,
    pub buckets: Vec<f64>,
}

/// Per-namespace quotas.
#[derive(Debug, Clone, Copy)]
pub struct SinkLimits {
    pub families_per_namespace: usize,
    pub series_per_family: usize,
}

impl Default for SinkLimits {
    fn default() -> Self {
        Self { families_per_namespace: 64, series_per_family: 10_000 }
    }
}

/// All plugin families; registered once as a prometheus-client collector.
#[derive(Debug, Default)]
pub struct MetricSink {
    families: RwLock<Vec<Arc<MetricFamily>>>,
    limits: SinkLimits,
}

#[derive(Debug)]
pub struct MetricFamily {
    namespace: String,
    name: String,
    spec: FamilySpec,
    series: RwLock<SeriesTable>,
    max_series: usize,
}

#[derive(Debug, Default)]
struct SeriesTable {
    index: HashMap<Vec<String>, usize>,
    list: Vec<Arc<Series>>,
}

/// One label set of a family and its value.
#[derive(Debug)]
pub struct Series {
    labels: Vec<(String, String)>,
    value: SeriesValue,
}

#[derive(Debug)]
enum SeriesValue {
    Counter(AtomicU64),
    /// f64 bits.
    Gauge(AtomicU64),
    Histogram {
        /// Non-cumulative counts per bucket, the last one for `+Inf`.
        buckets: Box<[AtomicU64]>,
        /// f64 bits.
        sum: AtomicU64,
    },
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Turns an instance name into a metric namespace: `syscall-latency` → `syscall_latency`.
pub fn namespace_for(instance: &str) -> String {
    let ns: String = instance.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    if ns.starts_with(|c: char| c.is_ascii_digit()) { format!("_{ns}") } else { ns }
}

fn add_f64(cell: &AtomicU64, delta: f64) {
    let _ = cell.fetch_update(Relaxed, Relaxed, |bits| Some((f64::from_bits(bits) + delta).to_bits()));
}

impl MetricSink {
    pub fn new(limits: SinkLimits) -> Self {
        Self { families: RwLock::default(), limits }
    }

    /// Declares (or finds the identical existing) family `<namespace>_<spec.name>`.
    pub fn declare(&self, namespace: &str, spec: FamilySpec) -> Result<Arc<MetricFamily>, String> {
        if !valid_name(&spec.name) {
            return Err(format!("invalid metric name {:?}: use [a-zA-Z_][a-zA-Z0-9_]*", spec.name));
        }
        if spec.kind == MetricKind::Counter && spec.name.ends_with("_total") {
            return Err(format!("counter {:?}: leave off `_total`, the host adds it", spec.name));
        }
        for label in &spec.label_names {
            if !valid_name(label) || label.starts_with("__") {
                return Err(format!("invalid label name {label:?}"));
            }
            if spec.kind == MetricKind::Histogram && label == "le" {
                return Err("histograms cannot use the label name \"le\"".into());
            }
        }
        if spec.kind == MetricKind::Histogram
            && (spec.buckets.is_empty()
                || spec.buckets.iter().any(|b| !b.is_finite())
                || spec.buckets.windows(2).any(|w| w[0] >= w[1]))
        {
            return Err("histogram buckets must be finite, non-empty and strictly increasing".into());
        }
        let name = format!("{namespace}_{}", spec.name);
        let mut families = self.families.write().expect("metric sink lock");
        if let Some(existing) = families.iter().find(|f| f.name == name) {
            return if existing.namespace == namespace && existing.spec == spec {
                Ok(existing.clone())
            } else {
                Err(format!("metric {name} is already declared differently"))
            };
        }
        if families.iter().filter(|f| f.namespace == namespace).count() >= self.limits.families_per_namespace {
            return Err(format!("namespace {namespace} is at its limit of {} families", self.limits.families_per_namespace));
        }
        let family = Arc::new(MetricFamily {
            namespace: namespace.to_owned(),
            name,
            spec,
            series: RwLock::default(),
            max_series: self.limits.series_per_family,
        });
        families.push(family.clone());
        Ok(family)
    }
}

impl MetricFamily {
    /// Interns one label set.
    pub fn series(&self, values: &[String]) -> Result<Arc<Series>, String> {
        if values.len() != self.spec.label_names.len() {
            return Err(format!(
                "{}: {} label values for {} labels",
                self.name,
                values.len(),
                self.spec.label_names.len()
            ));
        }
        {
            let table = self.series.read().expect("series lock");
            if let Some(&i) = table.index.get(values) {
                return Ok(table.list[i].clone());
            }
        }
        let mut table = self.series.write().expect("series lock");
        if let Some(&i) = table.index.get(values) {
            return Ok(table.list[i].clone());
        }
        if table.list.len() >= self.max_series {
            return Err(format!("{} is at its limit of {} series", self.name, self.max_series));
        }
        let value = match self.spec.kind {
            MetricKind::Counter => SeriesValue::Counter(AtomicU64::new(0)),
            MetricKind::Gauge => SeriesValue::Gauge(AtomicU64::new(0f64.to_bits())),
            MetricKind::Histogram => SeriesValue::Histogram {
                buckets: (0..=self.spec.buckets.len()).map(|_| AtomicU64::new(0)).collect(),
                sum: AtomicU64::new(0f64.to_bits()),
            },
        };
        let labels = self.spec.label_names.iter().cloned().zip(values.iter().cloned()).collect();
        let series = Arc::new(Series { labels, value });
        let i = table.list.len();
        table.index.insert(values.to_vec(), i);
        table.list.push(series.clone());
        Ok(series)
    }
}

/// A series operation that does not fit the series' kind or shape.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MisuseError(&'static str);

impl Series {
    pub fn counter_add(&self, n: u64) -> Result<(), MisuseError> {
        match &self.value {
            SeriesValue::Counter(c) => {
                c.fetch_add(n, Relaxed);
                Ok(())
            }
            _ => Err(MisuseError("counter-add on a series that is not a counter")),
        }
    }

    pub fn gauge_set(&self, v: f64) -> Result<(), MisuseError> {
        match &self.value {
            SeriesValue::Gauge(g) => {
                g.store(v.to_bits(), Relaxed);
                Ok(())
            }
            _ => Err(MisuseError("gauge-set on a series that is not a gauge")),
        }
    }

    pub fn gauge_add(&self, v: f64) -> Result<(), MisuseError> {
        match &self.value {
            SeriesValue::Gauge(g) => {
                add_f64(g, v);
                Ok(())
            }
            _ => Err(MisuseError("gauge-add on a series that is not a gauge")),
        }
    }

    /// Adds one observation; `bounds` are the family's buckets.
    pub fn histogram_observe(&self, bounds: &[f64], v: f64) -> Result<(), MisuseError> {
        let SeriesValue::Histogram { buckets, sum } = &self.value else {
            return Err(MisuseError("histogram-observe on a series that is not a histogram"));
        };
        buckets[bounds.partition_point(|&b| b < v)].fetch_add(1, Relaxed);
        add_f64(sum, v);
        Ok(())
    }

    /// Merges pre-aggregated, non-cumulative bucket counts (one extra for `+Inf`).
    pub fn histogram_merge(&self, counts: &[u64], delta_sum: f64) -> Result<(), MisuseError> {
        let SeriesValue::Histogram { buckets, sum } = &self.value else {
            return Err(MisuseError("histogram-merge on a series that is not a histogram"));
        };
        if counts.len() != buckets.len() {
            return Err(MisuseError("histogram-merge needs one count per bucket plus one for +Inf"));
        }
        for (cell, &n) in buckets.iter().zip(counts) {
            if n != 0 {
                cell.fetch_add(n, Relaxed);
            }
        }
        add_f64(sum, delta_sum);
        Ok(())
    }
}

impl MetricFamily {
    pub fn buckets(&self) -> &[f64] {
        &self.spec.buckets
    }

    fn encode(&self, encoder: &mut DescriptorEncoder<'_>) -> fmt::Result {
        let series: Vec<Arc<Series>> = self.series.read().expect("series lock").list.clone();
        let metric_type = match self.spec.kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Gauge => MetricType::Gauge,
            MetricKind::Histogram => MetricType::Histogram,
        };
        let mut family = encoder.encode_descriptor(&self.name, &self.spec.help, None, metric_type)?;
        for s in &series {
            let mut metric = family.encode_family(&s.labels)?;
            match &s.value {
                SeriesValue::Counter(c) => {
                    metric.encode_counter::<NoLabelSet, u64, u64>(&c.load(Relaxed), None)?
                }
                SeriesValue::Gauge(g) => metric.encode_gauge(&f64::from_bits(g.load(Relaxed)))?,
                SeriesValue::Histogram { buckets, sum } => {
                    let counts: Vec<(f64, u64)> = self
                        .spec
                        .buckets
                        .iter()
                        .copied()
                        .chain([f64::INFINITY])
                        .zip(buckets.iter().map(|b| b.load(Relaxed)))
                        .collect();
                    let count = counts.iter().map(|(_, n)| n).sum();
                    metric.encode_histogram::<NoLabelSet>(f64::from_bits(sum.load(Relaxed)), count, &counts, None)?
                }
            }
        }
        Ok(())
    }
}

impl Collector for MetricSink {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let families = self.families.read().expect("metric sink lock").clone();
        families.iter().try_for_each(|f| f.encode(&mut encoder))
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::prometheus_text, registry::Registry};

    use super::*;

    fn spec(name: &str, kind: MetricKind, buckets: Vec<f64>) -> FamilySpec {
        FamilySpec { name: name.into(), help: "h".into(), kind, label_names: vec!["a".into()], buckets }
    }

    #[test]
    fn merged_histogram_encodes_exact_cumulative_counts() {
        let sink = Arc::new(MetricSink::default());
        let h = sink.declare("ns", spec("lat_seconds", MetricKind::Histogram, vec![0.1, 1.0])).unwrap();
        let s = h.series(&["x".into()]).unwrap();
        s.histogram_merge(&[3, 0, 2], 7.5).unwrap();
        s.histogram_merge(&[1, 1, 0], 0.5).unwrap();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(sink.clone()));
        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("ns_lat_seconds_bucket{a=\"x\",le=\"0.1\"} 4\n"), "{text}");
        assert!(text.contains("ns_lat_seconds_bucket{a=\"x\",le=\"1\"} 5\n"), "{text}");
        assert!(text.contains("ns_lat_seconds_bucket{a=\"x\",le=\"+Inf\"} 7\n"), "{text}");
        assert!(text.contains("ns_lat_seconds_count{a=\"x\"} 7\n"), "{text}");
        assert!(text.contains("ns_lat_seconds_sum{a=\"x\"} 8.0\n"), "{text}");
    }

    #[test]
    fn same_declaration_shares_series_and_conflicts_fail() {
        let sink = MetricSink::default();
        let a = sink.declare("ns", spec("errors", MetricKind::Counter, vec![])).unwrap();
        let b = sink.declare("ns", spec("errors", MetricKind::Counter, vec![])).unwrap();
        a.series(&["x".into()]).unwrap().counter_add(2).unwrap();
        b.series(&["x".into()]).unwrap().counter_add(3).unwrap();
        let SeriesValue::Counter(c) = &a.series(&["x".into()]).unwrap().value else { panic!() };
        assert_eq!(c.load(Relaxed), 5);
        assert!(sink.declare("ns", spec("errors", MetricKind::Gauge, vec![])).is_err());
        assert!(sink.declare("ns", spec("errors_total", MetricKind::Counter, vec![])).is_err());
        assert!(sink.declare("ns", spec("bad-name", MetricKind::Gauge, vec![])).is_err());
        assert!(sink.declare("ns", spec("h", MetricKind::Histogram, vec![1.0, 1.0])).is_err());
        assert!(a.series(&[]).is_err());
        assert!(a.series(&["x".into()]).unwrap().gauge_set(1.0).is_err());
    }

    #[test]
    fn quotas_hold() {
        let sink = MetricSink::new(SinkLimits { families_per_namespace: 1, series_per_family: 2 });
        let f = sink.declare("ns", spec("a", MetricKind::Gauge, vec![])).unwrap();
        assert!(sink.declare("ns", spec("b", MetricKind::Gauge, vec![])).unwrap_err().contains("limit"));
        assert!(sink.declare("other", spec("b", MetricKind::Gauge, vec![])).is_ok());
        f.series(&["1".into()]).unwrap();
        f.series(&["2".into()]).unwrap();
        f.series(&["1".into()]).unwrap();
        assert!(f.series(&["3".into()]).unwrap_err().contains("limit"));
    }
}
