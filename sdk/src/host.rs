//! The host calls the SDK's helpers make, behind a trait so the same aggregation code
//! can also run natively against an in-process host (the plugin-boundary benchmark
//! compares the two). Plugins use the default, [`Wit`]: the component's imports.

use crate::{host_names as names, metrics};
pub use metrics::{FamilyDesc, MetricKind};

/// What the SDK needs from the host.
pub trait HostApi {
    /// A handle to a declared family.
    type Family;
    /// A handle to one series.
    type Series;
    fn declare_family(&self, desc: &FamilyDesc) -> Result<Self::Family, String>;
    fn series(&self, family: &Self::Family, label_values: &[String]) -> Result<Self::Series, String>;
    fn counter_add(&self, series: &Self::Series, value: u64);
    fn gauge_set(&self, series: &Self::Series, value: f64);
    fn histogram_merge(&self, series: &Self::Series, bucket_counts: &[u64], sum: f64);
    /// Merges many histogram deltas at once: series i takes `bucket_counts[i * buckets..]`
    /// (`buckets` counts, `+Inf` included) and `sums[i]`.
    fn merge_histograms(&self, series: &[&Self::Series], buckets: usize, bucket_counts: &[u64], sums: &[f64]) {
        for ((s, counts), &sum) in series.iter().zip(bucket_counts.chunks_exact(buckets)).zip(sums) {
            self.histogram_merge(s, counts, sum);
        }
    }
    /// Adds `values[i]` to counter `series[i]`, at once.
    fn add_counters(&self, series: &[&Self::Series], values: &[u64]) {
        series.iter().zip(values).for_each(|(s, &v)| self.counter_add(s, v));
    }
    /// Whether `series` is its family's overflow series (a full family's answer to
    /// every new label set).
    fn is_overflow(&self, _series: &Self::Series) -> bool {
        false
    }
    /// Deletes the series from the host's exposition.
    fn remove_series(&self, series: Self::Series);
    fn syscall_name(&self, nr: u32) -> Option<String>;
    fn errno_name(&self, errno: u16) -> Option<String>;
}

/// The real host, through the component's WIT imports.
#[derive(Debug, Default, Clone, Copy)]
pub struct Wit;

impl HostApi for Wit {
    type Family = metrics::Family;
    type Series = metrics::Series;

    fn declare_family(&self, desc: &FamilyDesc) -> Result<metrics::Family, String> {
        metrics::declare_family(desc)
    }

    fn series(&self, family: &metrics::Family, label_values: &[String]) -> Result<metrics::Series, String> {
        family.series(label_values)
    }

    fn counter_add(&self, series: &metrics::Series, value: u64) {
        series.counter_add(value)
    }

    fn gauge_set(&self, series: &metrics::Series, value: f64) {
        series.gauge_set(value)
    }

    fn histogram_merge(&self, series: &metrics::Series, bucket_counts: &[u64], sum: f64) {
        series.histogram_merge(bucket_counts, sum)
    }

    fn merge_histograms(&self, series: &[&metrics::Series], _buckets: usize, bucket_counts: &[u64], sums: &[f64]) {
        metrics::merge_histograms(series, bucket_counts, sums)
    }

    fn add_counters(&self, series: &[&metrics::Series], values: &[u64]) {
        metrics::add_counters(series, values)
    }

    fn is_overflow(&self, series: &metrics::Series) -> bool {
        series.is_overflow()
    }

    fn remove_series(&self, series: metrics::Series) {
        metrics::Series::remove(series)
    }

    fn syscall_name(&self, nr: u32) -> Option<String> {
        names::syscall_name(nr)
    }

    fn errno_name(&self, errno: u16) -> Option<String> {
        names::errno_name(errno)
    }
}
