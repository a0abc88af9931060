//! The host's interfaces with the generated bindings' names and signatures, served
//! natively by this thread's [`super::TestHost`]: what `metrics`, `logs`, `names` and
//! `enrich` are outside a Wasm build.

use std::{cell::RefCell, collections::HashMap, rc::Rc};

use crate::bindings::wasmtap::plugin as wit;

thread_local! {
    pub(super) static HOST: RefCell<Option<Rc<RefCell<State>>>> = const { RefCell::new(None) };
}

/// Runs `f` on this thread's test host.
fn with<T>(f: impl FnOnce(&mut State) -> T) -> T {
    let host = HOST
        .with(|h| h.borrow().clone())
        .expect("a wasmtap host call outside Wasm with no test host: create a wasmtap_sdk::testkit::TestHost on this thread first (it serves the calls)");
    f(&mut host.borrow_mut())
}

/// What the test host has seen.
#[derive(Default)]
pub struct State {
    pub families: Vec<wit::metrics::FamilyDesc>,
    pub series: Vec<SeriesState>,
    pub logs: Vec<super::LogEntry>,
    /// (family name, label values) of each removed series, in order.
    pub removed: Vec<(String, Vec<String>)>,
    pub syscall_names: HashMap<u32, String>,
    pub errno_names: HashMap<u16, String>,
    pub cgroups: HashMap<u64, wit::enrich::CgroupInfo>,
    pub processes: HashMap<u32, wit::enrich::ProcessInfo>,
}

pub struct SeriesState {
    pub family: usize,
    pub labels: Vec<String>,
    pub value: super::Value,
    pub removed: bool,
}

pub mod metrics {
    pub use super::wit::metrics::{FamilyDesc, MetricKind};
    use super::{SeriesState, State, with};
    use crate::testkit::Value;

    /// A declared family (its index in the test host).
    #[derive(Debug)]
    pub struct Family(usize);

    /// One series (its index in the test host).
    #[derive(Debug)]
    pub struct Series(usize);

    /// Declares a family; refused (as the host would) when the name is taken or the
    /// histogram bounds do not increase.
    pub fn declare_family(desc: &FamilyDesc) -> Result<Family, String> {
        with(|s| {
            if s.families.iter().any(|f| f.name == desc.name) {
                return Err(format!("family {} is declared twice", desc.name));
            }
            if desc.kind == MetricKind::Histogram && !desc.buckets.windows(2).all(|w| w[0] < w[1]) {
                return Err(format!("family {}: bucket bounds must increase", desc.name));
            }
            s.families.push(desc.clone());
            Ok(Family(s.families.len() - 1))
        })
    }

    impl Family {
        /// The series of `label_values` (one per label name), made on first use.
        pub fn series(&self, label_values: &[String]) -> Result<Series, String> {
            with(|s| {
                let desc = &s.families[self.0];
                if label_values.len() != desc.label_names.len() {
                    return Err(format!("family {} has {} labels, got {} values", desc.name, desc.label_names.len(), label_values.len()));
                }
                if let Some(i) = s.series.iter().position(|x| x.family == self.0 && !x.removed && x.labels == label_values) {
                    return Ok(Series(i));
                }
                let value = match desc.kind {
                    MetricKind::Counter => Value::Counter(0),
                    MetricKind::Gauge => Value::Gauge(0.0),
                    MetricKind::Histogram => Value::Histogram { counts: vec![0; desc.buckets.len() + 1], sum: 0.0 },
                };
                s.series.push(SeriesState { family: self.0, labels: label_values.to_vec(), value, removed: false });
                Ok(Series(s.series.len() - 1))
            })
        }
    }

    fn update(series: &Series, f: impl FnOnce(&mut Value, &FamilyDesc)) {
        with(|s: &mut State| {
            let State { series: all, families, .. } = s;
            let x = &mut all[series.0];
            f(&mut x.value, &families[x.family]);
        })
    }

    impl Series {
        pub fn counter_add(&self, value: u64) {
            update(self, |v, _| {
                if let Value::Counter(n) = v {
                    *n = n.saturating_add(value);
                }
            })
        }

        pub fn gauge_set(&self, value: f64) {
            update(self, |v, _| {
                if let Value::Gauge(g) = v {
                    *g = value;
                }
            })
        }

        pub fn gauge_add(&self, value: f64) {
            update(self, |v, _| {
                if let Value::Gauge(g) = v {
                    *g += value;
                }
            })
        }

        pub fn histogram_observe(&self, value: f64) {
            update(self, |v, desc| {
                if let Value::Histogram { counts, sum } = v {
                    counts[desc.buckets.partition_point(|&b| b < value)] += 1;
                    *sum += value;
                }
            })
        }

        pub fn histogram_merge(&self, bucket_counts: &[u64], delta: f64) {
            update(self, |v, _| {
                if let Value::Histogram { counts, sum } = v {
                    assert_eq!(bucket_counts.len(), counts.len(), "histogram_merge: one count per bucket, +Inf included");
                    counts.iter_mut().zip(bucket_counts).for_each(|(c, d)| *c += d);
                    *sum += delta;
                }
            })
        }

        /// The test host has no series limit: never the overflow series.
        pub fn is_overflow(&self) -> bool {
            false
        }

        pub fn remove(series: Series) {
            with(|s| {
                let x = &mut s.series[series.0];
                x.removed = true;
                let removed = (s.families[x.family].name.clone(), x.labels.clone());
                s.removed.push(removed);
            })
        }
    }

    pub fn merge_histograms(series: &[&Series], bucket_counts: &[u64], sums: &[f64]) {
        let buckets = if series.is_empty() { 1 } else { bucket_counts.len() / series.len() };
        for ((s, counts), &sum) in series.iter().zip(bucket_counts.chunks_exact(buckets)).zip(sums) {
            s.histogram_merge(counts, sum);
        }
    }

    pub fn add_counters(series: &[&Series], values: &[u64]) {
        series.iter().zip(values).for_each(|(s, &v)| s.counter_add(v));
    }
}

pub mod logs {
    pub use super::wit::logs::Level;
    use super::with;

    pub fn log(level: Level, message: &str, fields: &[(String, String)]) {
        with(|s| s.logs.push(crate::testkit::LogEntry { level, message: message.to_owned(), fields: fields.to_vec() }))
    }
}

pub mod names {
    use super::with;

    pub fn syscall_name(syscall_nr: u32) -> Option<String> {
        with(|s| s.syscall_names.get(&syscall_nr).cloned())
    }

    pub fn errno_name(errno: u16) -> Option<String> {
        with(|s| s.errno_names.get(&errno).cloned())
    }
}

pub mod enrich {
    pub use super::wit::enrich::{CgroupInfo, NodeInfo, ProcessInfo};
    use super::with;

    pub fn process(pid: u32, _seen_ns: u64) -> Option<ProcessInfo> {
        with(|s| s.processes.get(&pid).cloned())
    }

    pub fn cmdline(_pid: u32, _seen_ns: u64) -> Option<Vec<String>> {
        None
    }

    pub fn cgroup(cgroup_id: u64) -> Option<CgroupInfo> {
        with(|s| s.cgroups.get(&cgroup_id).cloned())
    }

    pub fn node() -> NodeInfo {
        NodeInfo { hostname: "test-node".into(), kernel_release: "test".into() }
    }
}
