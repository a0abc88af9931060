//! The host calls the SDK's helpers make, behind a trait so the same aggregation code
//! can also run natively against an in-process host (the plugin-boundary benchmark
//! compares the two). Plugins use the default, [`Wit`]: the component's imports.

use crate::bindings::wasmtap::plugin::{metrics, names};
pub use metrics::{FamilyDesc, MetricKind};

/// What the SDK needs from the host.
pub trait HostApi {
    fn declare_family(&self, desc: &FamilyDesc) -> Result<u32, String>;
    fn intern_series(&self, family: u32, label_values: &[String]) -> Result<u32, String>;
    fn counter_add(&self, series: u32, value: u64);
    fn histogram_merge(&self, series: u32, bucket_counts: &[u64], sum: f64);
    fn syscall_name(&self, nr: u32) -> Option<String>;
    fn errno_name(&self, errno: u16) -> Option<String>;
}

/// The real host, through the component's WIT imports.
#[derive(Debug, Default, Clone, Copy)]
pub struct Wit;

impl HostApi for Wit {
    fn declare_family(&self, desc: &FamilyDesc) -> Result<u32, String> {
        metrics::declare_family(desc)
    }

    fn intern_series(&self, family: u32, label_values: &[String]) -> Result<u32, String> {
        metrics::intern_series(family, label_values)
    }

    fn counter_add(&self, series: u32, value: u64) {
        metrics::counter_add(series, value)
    }

    fn histogram_merge(&self, series: u32, bucket_counts: &[u64], sum: f64) {
        metrics::histogram_merge(series, bucket_counts, sum)
    }

    fn syscall_name(&self, nr: u32) -> Option<String> {
        names::syscall_name(nr)
    }

    fn errno_name(&self, errno: u16) -> Option<String> {
        names::errno_name(errno)
    }
}
