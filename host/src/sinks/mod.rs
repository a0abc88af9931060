//! Where plugin output goes: the metric registry the host owns and serves, and the log
//! stream. Plus the daemon's own metrics.

pub mod logs;
pub mod metrics;
pub mod self_metrics;

pub use metrics::{MetricFamily, MetricSink, Series};
pub use self_metrics::SelfMetrics;
