//! The plugin metric sink: families and series owned by the host.
//!
//! Plugins declare families and intern label sets into series once, then flush
//! pre-aggregated deltas. Because the host owns the series, a restarted or swapped
//! plugin that declares the same family keeps adding to the same counters.
//! Each plugin's families live under a namespace it owns (`<namespace>_<name>`), and
//! every family and series is charged to the plugin's budget, so one plugin can neither
//! write into another's metrics, nor make the scrape invalid, nor grow it without bound.

use std::{
    collections::HashMap,
    fmt,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
};

use crate::{
    budget::{Budget, Reason, Refusal},
    config::Overflow,
    sinks::logs::sanitize,
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

/// All plugin families and the namespaces that own them; registered once as a
/// prometheus-client collector.
#[derive(Debug, Default)]
pub struct MetricSink {
    families: RwLock<Vec<Arc<MetricFamily>>>,
    claims: Mutex<Vec<Claim>>,
}

/// A namespace and who owns it. Namespaces are prefix-free (neither is the other plus
/// `_…`), so no family of one can ever render a sample name of another; a tenant's
/// claim is the one exception, for its own plugins' namespaces below it.
#[derive(Debug)]
struct Claim {
    namespace: String,
    owner: String,
}

#[derive(Debug)]
pub struct MetricFamily {
    namespace: String,
    name: String,
    spec: FamilySpec,
    /// Every name this family's exposition uses (family name and sample names).
    sample_names: Vec<String>,
    series: RwLock<SeriesTable>,
    /// Room for the overflow series is charged when the family is declared (policy
    /// `other`), so that making it never takes the plugin or its tenant past a quota;
    /// true until the overflow series is made.
    overflow_reserved: AtomicBool,
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
    /// Removed from its family: what is still written through another handle to it is
    /// refused (counted), not kept where no scrape sees it.
    removed: AtomicBool,
    /// A gauge was set or added to (a new build's value wins over the old one's).
    set: AtomicBool,
}

#[derive(Debug)]
enum SeriesValue {
    Counter(AtomicU64),
    /// f64 bits.
    Gauge(AtomicU64),
    /// One lock per merge, not one atomic add per bucket: a merge touches many buckets
    /// (about 10 ns an event off the plugin-boundary bench, at ~400 series per batch).
    Histogram(Mutex<HistogramValue>),
}

#[derive(Debug)]
struct HistogramValue {
    /// Non-cumulative counts per bucket, the last one for `+Inf`.
    buckets: Box<[u64]>,
    /// Observations so far; kept so that adding can refuse before any bucket (or the
    /// cumulative count the exposition sums) would pass `u64::MAX`.
    count: u64,
    sum: f64,
}

impl HistogramValue {
    /// Adds `total` observations summing to `delta_sum`, placed by `place`; refused
    /// (unchanged) if the count would pass `u64::MAX` or the sum stop being finite.
    fn add(&mut self, total: u64, delta_sum: f64, place: impl FnOnce(&mut [u64])) -> Result<(), Reason> {
        let count = self.count.checked_add(total).ok_or(Reason::Overflow)?;
        let sum = self.sum + delta_sum;
        if !sum.is_finite() {
            return Err(Reason::NonFinite);
        }
        (self.count, self.sum) = (count, sum);
        place(&mut self.buckets);
        Ok(())
    }
}

/// Every label value of a full family's overflow series.
pub const OVERFLOW_VALUE: &str = "__other__";

/// The reserved namespace of the daemon's own metrics.
pub const RESERVED_NAMESPACE: &str = "wasmtap";
const MAX_NAME_BYTES: usize = 128;

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME_BYTES
        && matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Turns an instance name into a metric namespace: `syscall-latency` → `syscall_latency`.
pub fn namespace_for(instance: &str) -> String {
    let ns: String = instance.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    if ns.starts_with(|c: char| c.is_ascii_digit()) { format!("_{ns}") } else { ns }
}

/// Whether `ns` may be a namespace at all (valid name prefix, not the reserved one).
pub fn check_namespace(ns: &str) -> Result<(), String> {
    if !valid_name(ns) || ns.len() > 64 || ns.ends_with('_') {
        return Err(format!("namespace {ns:?} is invalid: use [a-zA-Z_][a-zA-Z0-9_]*, at most 64 bytes, not ending in _"));
    }
    if clashes(ns, RESERVED_NAMESPACE) {
        return Err(format!("namespace {ns:?} is reserved for the daemon's own metrics (wasmtap_*)"));
    }
    Ok(())
}

/// Whether two namespaces could produce the same metric name.
fn clashes(a: &str, b: &str) -> bool {
    let nested = |outer: &str, inner: &str| inner.strip_prefix(outer).is_some_and(|rest| rest.is_empty() || rest.starts_with('_'));
    nested(a, b) || nested(b, a)
}

/// Adds `delta` to an f64 cell unless the result would not be finite.
fn add_f64(cell: &AtomicU64, delta: f64) -> Result<(), Reason> {
    cell.fetch_update(Relaxed, Relaxed, |bits| Some((f64::from_bits(bits) + delta).to_bits()).filter(|b| f64::from_bits(*b).is_finite()))
        .map(drop)
        .map_err(|_| Reason::NonFinite)
}

fn add_u64(cell: &AtomicU64, n: u64) -> Result<(), Reason> {
    cell.fetch_update(Relaxed, Relaxed, |v| v.checked_add(n)).map(drop).map_err(|_| Reason::Overflow)
}

/// Approximate bytes a family's descriptor takes (held and per scrape).
fn family_cost(name: &str, spec: &FamilySpec) -> u64 {
    (2 * (name.len() + spec.help.len()) + 64 + 8 * spec.buckets.len() + spec.label_names.iter().map(|l| l.len() + 24).sum::<usize>()) as u64
}

/// Approximate bytes a series takes: the lines it adds to every scrape (each repeats the
/// labels) plus what the host holds for it.
fn series_cost(name: &str, spec: &FamilySpec, values: &[String]) -> u64 {
    let labels: usize = spec.label_names.iter().zip(values).map(|(k, v)| k.len() + v.len() + 4).sum();
    let lines = match spec.kind {
        MetricKind::Counter | MetricKind::Gauge => 1,
        MetricKind::Histogram => spec.buckets.len() + 3,
    };
    (lines * (name.len() + labels + 48) + 2 * labels + 96 + 8 * lines) as u64
}

/// The labels of a family's overflow series.
fn overflow_values(spec: &FamilySpec) -> Vec<String> {
    vec![OVERFLOW_VALUE.to_owned(); spec.label_names.len()]
}

/// Charges room for a family's overflow series (see `MetricFamily::overflow_reserved`).
fn reserve_overflow(name: &str, spec: &FamilySpec, budget: &Budget) -> Result<(), Refusal> {
    budget.charge(Reason::Series, 1)?;
    budget.charge(Reason::MetricBytes, series_cost(name, spec, &overflow_values(spec))).inspect_err(|_| budget.release(Reason::Series, 1))
}

/// Why a series operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SeriesError {
    /// The plugin used a series wrongly (a bug in it): the call traps.
    #[error("{0}")]
    Misuse(&'static str),
    /// The value was refused (it would overflow, or is not finite); counted, not a trap.
    #[error("refused: {}", .0.label())]
    Refused(Reason),
}

impl MetricSink {
    /// Gives `namespace` to `owner`, unless another owner's namespace clashes with it.
    /// `parent` is the owner of the one claim it may nest in (its tenant's).
    pub fn claim(&self, namespace: &str, owner: &str, parent: Option<&str>) -> Result<(), String> {
        check_namespace(namespace)?;
        let mut claims = self.claims.lock().expect("claims");
        if let Some(other) = claims.iter().find(|c| c.owner != owner && Some(c.owner.as_str()) != parent && clashes(&c.namespace, namespace)) {
            return Err(format!(
                "namespace {namespace:?} clashes with {:?}, owned by {}: metric names of one could be those of the other",
                other.namespace, other.owner
            ));
        }
        if !claims.iter().any(|c| c.owner == owner && c.namespace == namespace) {
            claims.push(Claim { namespace: namespace.to_owned(), owner: owner.to_owned() });
        }
        Ok(())
    }

    /// Declares (or finds the identical existing) family `<namespace>_<spec.name>`,
    /// charging the plugin's budget for it. A build being swapped in passes its
    /// `staging`: a family it declares differently from the live one is made apart
    /// (unseen by scrapes) and takes the live one's place, series and all, when the swap
    /// commits ([`MetricSink::commit`]).
    pub fn declare(&self, namespace: &str, spec: FamilySpec, budget: &Budget, staging: Option<&Staging>) -> Result<Arc<MetricFamily>, Refusal> {
        let refuse = |reason, message: String| Err(budget.refuse(Refusal::new(reason, message)));
        let limits = &budget.limits;
        if !valid_name(&spec.name) {
            return refuse(Reason::InvalidMetric, format!("invalid metric name {:?}: use [a-zA-Z_][a-zA-Z0-9_]*, at most 128 bytes", sanitize(&spec.name, 64)));
        }
        if spec.kind == MetricKind::Counter && spec.name.ends_with("_total") {
            return refuse(Reason::InvalidMetric, format!("counter {:?}: leave off `_total`, the host adds it", spec.name));
        }
        if spec.help.len() > limits.help_bytes {
            return refuse(Reason::Help, format!("help text of {} bytes; the limit is {} (help_bytes)", spec.help.len(), limits.help_bytes));
        }
        // Both exposition formats escape help differently (and prometheus-client writes
        // it as given), so accept only text that needs no escaping in either.
        if spec.help.chars().any(|c| c.is_control() || c == '\\' || c == '"') {
            return refuse(Reason::Help, "help text may not contain control characters, `\\` or `\"`".into());
        }
        if spec.label_names.len() > limits.labels {
            return refuse(Reason::Labels, format!("{} label names; the limit is {} (labels)", spec.label_names.len(), limits.labels));
        }
        for (i, label) in spec.label_names.iter().enumerate() {
            if !valid_name(label) || label.len() > 64 || label.starts_with("__") {
                return refuse(Reason::InvalidMetric, format!("invalid label name {:?}", sanitize(label, 64)));
            }
            if spec.label_names[..i].contains(label) {
                return refuse(Reason::InvalidMetric, format!("label name {label:?} appears twice"));
            }
            if spec.kind == MetricKind::Histogram && label == "le" {
                return refuse(Reason::InvalidMetric, "histograms cannot use the label name \"le\"".into());
            }
        }
        if spec.kind == MetricKind::Histogram {
            if spec.buckets.len() > limits.buckets {
                return refuse(Reason::Buckets, format!("{} buckets; the limit is {} (buckets)", spec.buckets.len(), limits.buckets));
            }
            if spec.buckets.is_empty() || spec.buckets.iter().any(|b| !b.is_finite()) || spec.buckets.windows(2).any(|w| w[0] >= w[1]) {
                return refuse(Reason::InvalidMetric, "histogram buckets must be finite, non-empty and strictly increasing".into());
            }
        }
        let name = format!("{namespace}_{}", spec.name);
        let sample_names = match spec.kind {
            MetricKind::Counter => vec![name.clone(), format!("{name}_total")],
            MetricKind::Gauge => vec![name.clone()],
            MetricKind::Histogram => ["", "_bucket", "_count", "_sum"].iter().map(|s| format!("{name}{s}")).collect(),
        };
        let mut families = self.families.write().expect("metric sink lock");
        let mut staged = staging.map(|s| s.0.lock().expect("staging lock"));
        if let Some((_, new)) = staged.as_ref().and_then(|s| s.iter().find(|(_, new)| new.name == name)) {
            return if new.spec == spec { Ok(new.clone()) } else { refuse(Reason::InvalidMetric, format!("metric {name} is already declared differently")) };
        }
        let live = families.iter().find(|f| f.name == name).cloned();
        match &live {
            Some(live) if live.namespace == namespace && live.spec == spec && staged.is_none() => {
                return Ok(live.clone());
            }
            Some(live) if live.namespace != namespace || staged.is_none() => {
                return refuse(Reason::InvalidMetric, format!("metric {name} is already declared differently"));
            }
            _ => {}
        }
        // Against every other family, live or staged (what a staged one replaces aside).
        let others = families.iter().filter(|f| f.name != name).chain(staged.iter().flat_map(|s| s.iter().map(|(_, new)| new)));
        if let Some(other) = others.clone().find(|f| f.sample_names.iter().any(|n| sample_names.contains(n))) {
            return refuse(Reason::InvalidMetric, format!("metric {name}'s sample names clash with those of {}", other.name));
        }
        budget.charge(Reason::Families, 1)?;
        let cost = family_cost(&name, &spec);
        if let Err(e) = budget.charge(Reason::MetricBytes, cost) {
            budget.release(Reason::Families, 1);
            return Err(e);
        }
        // (A family without labels has one series, its own overflow.)
        let reserve = budget.overflow_of(&spec.name) == Overflow::Other && !spec.label_names.is_empty();
        if reserve && live.is_some() {
            // Replacing a live family whose reserve the old build holds (and gives back
            // at the commit): the new build's may not fail where the old one's fit.
            budget.force_charge(Reason::Series, 1);
            budget.force_charge(Reason::MetricBytes, series_cost(&name, &spec, &overflow_values(&spec)));
        } else if reserve && let Err(e) = reserve_overflow(&name, &spec, budget) {
            budget.release(Reason::Families, 1);
            budget.release(Reason::MetricBytes, cost);
            return Err(e);
        }
        let overflow_reserved = AtomicBool::new(reserve);
        let family = Arc::new(MetricFamily { namespace: namespace.to_owned(), name, spec, sample_names, series: RwLock::default(), overflow_reserved });
        match staged.as_mut() {
            Some(staged) => staged.push((live, family.clone())),
            None => families.push(family.clone()),
        }
        Ok(family)
    }

    /// Makes a build's staged families live: each takes the place of the live family of
    /// its name (if any), carrying its series across (see [`MetricFamily::migrate`]).
    /// Called once the build it replaces (charged to `old_budget`) has made its last
    /// write, and before the new one handles its first batch.
    pub fn commit(&self, staging: &Staging, old_budget: Option<&Budget>, new_budget: &Budget) {
        let staged = std::mem::take(&mut *staging.0.lock().expect("staging lock"));
        let mut families = self.families.write().expect("metric sink lock");
        for (live, new) in staged {
            let old_budget = old_budget.unwrap_or(new_budget);
            match live.and_then(|live| families.iter().position(|f| Arc::ptr_eq(f, &live))) {
                Some(i) if families[i].spec == new.spec => {
                    new.take_series(&families[i], old_budget, new_budget);
                    families[i] = new;
                }
                Some(i) => {
                    new.migrate(&families[i], old_budget, new_budget);
                    families[i] = new;
                }
                None => families.push(new),
            }
        }
    }

    /// Forgets a build's staged families (it did not start), giving back their charges.
    pub fn discard(&self, staging: &Staging, budget: &Budget) {
        for (_, new) in std::mem::take(&mut *staging.0.lock().expect("staging lock")) {
            new.release_all(budget);
        }
    }

    /// Removes every family of `namespace` (an unloaded plugin's) and its claim, giving
    /// back their charges.
    pub fn remove_namespace(&self, namespace: &str, budget: &Budget) {
        let mut families = self.families.write().expect("metric sink lock");
        families.retain(|f| {
            let keep = f.namespace != namespace;
            if !keep {
                f.release_all(budget);
            }
            keep
        });
        self.claims.lock().expect("claims").retain(|c| c.namespace != namespace);
    }

    /// Gives up `owner`'s claim of `namespace` (a plugin that did not load).
    pub fn release_claim(&self, namespace: &str, owner: &str) {
        self.claims.lock().expect("claims").retain(|c| c.namespace != namespace || c.owner != owner);
    }
}

/// What a build declared before it started (at load, or while it is swapped in):
/// (the live family of the name, if any; the staged one). Unseen by scrapes until
/// committed.
#[derive(Debug, Default)]
pub struct Staging(Mutex<Vec<StagedFamily>>);

type StagedFamily = (Option<Arc<MetricFamily>>, Arc<MetricFamily>);

impl MetricFamily {
    /// Takes over `old`'s series when a swap changes a family's definition, so that no
    /// series Prometheus already knows goes down (no fake counter reset):
    /// - labels are matched by name; a label the new definition adds reads "" (which
    ///   Prometheus treats as absent, so the series keeps its identity); series that a
    ///   removed label told apart are summed into one;
    /// - each old histogram bucket's count moves to the first new bucket whose bound
    ///   covers it: buckets both layouts share keep their exact cumulative counts, and
    ///   `_count` and `_sum` carry over exactly;
    /// - a changed kind renders other sample names (`_total`, `_bucket`…), so nothing is
    ///   carried: the new family starts at zero.
    ///
    /// `old`'s charges leave `old_budget`; the carried series are charged to `new_budget`
    /// even past its limits (they exist already; new ones are refused until it is back
    /// under them).
    fn migrate(&self, old: &MetricFamily, old_budget: &Budget, new_budget: &Budget) {
        let old_series = old.release_all(old_budget);
        if old.spec.kind != self.spec.kind {
            return;
        }
        let label_map: Vec<Option<usize>> = self.spec.label_names.iter().map(|n| old.spec.label_names.iter().position(|o| o == n)).collect();
        let bucket_map: Vec<usize> = old.spec.buckets.iter().map(|&b| self.spec.buckets.partition_point(|&n| n < b)).chain([self.spec.buckets.len()]).collect();
        for series in old_series {
            let values: Vec<String> = label_map.iter().map(|i| i.map_or_else(String::new, |i| series.labels[i].1.clone())).collect();
            let target = self.intern(&values, new_budget, true).expect("forced interning");
            target.fold_in_mapped(&series, Some(&bucket_map));
        }
        self.settle_overflow_reserve(new_budget);
    }

    /// Takes over the series of `live`, a family with the same definition, keeping their
    /// charges (moved with the rest of the old build's usage): the build that declared
    /// this family keeps the series it made (folding in the old values), and the old
    /// build's other series move over as they are. Costs what the new build made, not
    /// the family's size.
    fn take_series(&self, live: &MetricFamily, old_budget: &Budget, new_budget: &Budget) {
        let moved = std::mem::take(&mut *live.series.write().expect("series lock"));
        let mut table = self.series.write().expect("series lock");
        let made = std::mem::replace(&mut *table, moved);
        for series in made.list {
            let values: Vec<String> = series.labels.iter().map(|(_, v)| v.clone()).collect();
            match table.index.get(&values) {
                Some(&i) => {
                    let old = std::mem::replace(&mut table.list[i], series.clone());
                    series.fold_in(&old);
                    old.removed.store(true, Relaxed);
                    old_budget.release(Reason::Series, 1);
                    old_budget.release(Reason::MetricBytes, series_cost(&self.name, &self.spec, &values));
                }
                None => {
                    let i = table.list.len();
                    table.index.insert(values, i);
                    table.list.push(series);
                }
            }
        }
        old_budget.release(Reason::Families, 1);
        old_budget.release(Reason::MetricBytes, family_cost(&live.name, &live.spec));
        live.release_overflow_reserve(old_budget);
        drop(table);
        self.settle_overflow_reserve(new_budget);
    }

    /// An overflow series carried over from the build before is this family's: the
    /// room kept for one is given back.
    fn settle_overflow_reserve(&self, budget: &Budget) {
        if self.series.read().expect("series lock").index.contains_key(&overflow_values(&self.spec)) {
            self.release_overflow_reserve(budget);
        }
    }

    /// Gives back the room kept for the overflow series, if it was never made.
    fn release_overflow_reserve(&self, budget: &Budget) {
        if self.overflow_reserved.swap(false, Relaxed) {
            budget.release(Reason::Series, 1);
            budget.release(Reason::MetricBytes, series_cost(&self.name, &self.spec, &overflow_values(&self.spec)));
        }
    }

    /// Empties the family, giving back to `budget` what it and its series were charged.
    fn release_all(&self, budget: &Budget) -> Vec<Arc<Series>> {
        let table = std::mem::take(&mut *self.series.write().expect("series lock"));
        for s in &table.list {
            s.removed.store(true, Relaxed);
            let values: Vec<String> = s.labels.iter().map(|(_, v)| v.clone()).collect();
            budget.release(Reason::MetricBytes, series_cost(&self.name, &self.spec, &values));
        }
        budget.release(Reason::Series, table.list.len() as u64);
        budget.release(Reason::Families, 1);
        budget.release(Reason::MetricBytes, family_cost(&self.name, &self.spec));
        self.release_overflow_reserve(budget);
        table.list
    }

    /// Interns one label set, charging the plugin's budget for a new one. When no
    /// series may be added, the family's overflow policy says what the label set gets
    /// (its `__other__` series, or a refusal); either way it is counted.
    pub fn series(&self, values: &[String], budget: &Budget) -> Result<Arc<Series>, Refusal> {
        if values.len() != self.spec.label_names.len() {
            let message = format!("{}: {} label values for {} labels", self.name, values.len(), self.spec.label_names.len());
            return Err(budget.refuse(Refusal::new(Reason::InvalidMetric, message)));
        }
        {
            let table = self.series.read().expect("series lock");
            if let Some(&i) = table.index.get(values) {
                return Ok(table.list[i].clone());
            }
        }
        if let Some(v) = values.iter().find(|v| v.len() > budget.limits.label_value_bytes) {
            let message = format!("{}: a label value of {} bytes; the limit is {} (label_value_bytes)", self.name, v.len(), budget.limits.label_value_bytes);
            return Err(budget.refuse(Refusal::new(Reason::LabelBytes, message)));
        }
        self.intern(values, budget, false).or_else(|full| {
            let overflow = budget.overflow_of(&self.spec.name);
            budget.series_refused(&self.name, &full, overflow);
            match overflow {
                Overflow::Other => Ok(self.overflow_series(budget)),
                Overflow::Refuse => Err(budget.refuse(full)),
            }
        })
    }

    /// The overflow series, made on the room reserved for it (or, for a family declared
    /// under another policy, past the budget: one per family).
    fn overflow_series(&self, budget: &Budget) -> Arc<Series> {
        let values = overflow_values(&self.spec);
        if let Some(&i) = self.series.read().expect("series lock").index.get(&values) {
            return self.series.read().expect("series lock").list[i].clone();
        }
        // The reserve becomes the series' charge.
        self.release_overflow_reserve(budget);
        self.intern(&values, budget, true).expect("forced interning")
    }

    /// The series of `values`, made (and charged; `forced`: even past the limits) if new.
    /// A refusal is returned uncounted.
    fn intern(&self, values: &[String], budget: &Budget, forced: bool) -> Result<Arc<Series>, Refusal> {
        let mut table = self.series.write().expect("series lock");
        if let Some(&i) = table.index.get(values) {
            return Ok(table.list[i].clone());
        }
        let cost = series_cost(&self.name, &self.spec, values);
        if forced {
            budget.force_charge(Reason::Series, 1);
            budget.force_charge(Reason::MetricBytes, cost);
        } else {
            budget.try_charge(Reason::Series, 1)?;
            if let Err(e) = budget.try_charge(Reason::MetricBytes, cost) {
                budget.release(Reason::Series, 1);
                return Err(e);
            }
        }
        let value = match self.spec.kind {
            MetricKind::Counter => SeriesValue::Counter(AtomicU64::new(0)),
            MetricKind::Gauge => SeriesValue::Gauge(AtomicU64::new(0f64.to_bits())),
            MetricKind::Histogram => {
                SeriesValue::Histogram(Mutex::new(HistogramValue { buckets: vec![0; self.spec.buckets.len() + 1].into(), count: 0, sum: 0.0 }))
            }
        };
        let labels = self.spec.label_names.iter().cloned().zip(values.iter().cloned()).collect();
        let series = Arc::new(Series { labels, value, removed: AtomicBool::new(false), set: AtomicBool::new(false) });
        let i = table.list.len();
        table.index.insert(values.to_vec(), i);
        table.list.push(series.clone());
        Ok(series)
    }

    /// Deletes `series` from the family (and from `/metrics`), giving back what it was
    /// charged. Asking for its labels again starts a new series from zero. The
    /// overflow series stays (other label sets count in it): only the handle goes.
    pub fn remove(&self, series: &Arc<Series>, budget: &Budget) {
        if series.is_overflow() {
            return; // shared by every label set that overflowed: only the handle goes
        }
        let values: Vec<String> = series.labels.iter().map(|(_, v)| v.clone()).collect();
        let mut table = self.series.write().expect("series lock");
        let Some(&i) = table.index.get(&values) else { return };
        if !Arc::ptr_eq(&table.list[i], series) {
            return; // already removed, and the labels interned anew since
        }
        table.index.remove(&values);
        table.list.swap_remove(i).removed.store(true, Relaxed);
        if let Some(moved) = table.list.get(i) {
            let moved: Vec<String> = moved.labels.iter().map(|(_, v)| v.clone()).collect();
            table.index.insert(moved, i);
        }
        budget.release(Reason::Series, 1);
        budget.release(Reason::MetricBytes, series_cost(&self.name, &self.spec, &values));
    }
}

impl Series {
    /// Whether this is a full family's overflow series (every label value
    /// `__other__`).
    pub fn is_overflow(&self) -> bool {
        !self.labels.is_empty() && self.labels.iter().all(|(_, v)| v == OVERFLOW_VALUE)
    }

    /// Adds `old`'s value (same kind; histograms through `bucket_map`, old bucket → new
    /// bucket), for a swap. Counts and sums saturate, never wrap or go down; a gauge
    /// keeps its own value if the new build set it, else takes (adds) the old one.
    fn fold_in_mapped(&self, old: &Series, bucket_map: Option<&[usize]>) {
        let add = |cell: &AtomicU64, n: u64| {
            let _ = cell.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_add(n)));
        };
        let add_float = |cell: &AtomicU64, x: f64| {
            let _ = cell.fetch_update(Relaxed, Relaxed, |v| Some((f64::from_bits(v) + x).clamp(f64::MIN, f64::MAX).to_bits()));
        };
        match (&old.value, &self.value) {
            (SeriesValue::Counter(from), SeriesValue::Counter(to)) => add(to, from.load(Relaxed)),
            (SeriesValue::Gauge(from), SeriesValue::Gauge(to)) if !self.set.load(Relaxed) => add_float(to, f64::from_bits(from.load(Relaxed))),
            (SeriesValue::Histogram(from), SeriesValue::Histogram(to)) => {
                let from = from.lock().expect("histogram lock");
                let mut to = to.lock().expect("histogram lock");
                for (i, &n) in from.buckets.iter().enumerate() {
                    let cell = &mut to.buckets[bucket_map.map_or(i, |m| m[i])];
                    *cell = cell.saturating_add(n);
                }
                to.count = to.count.saturating_add(from.count);
                to.sum = (to.sum + from.sum).clamp(f64::MIN, f64::MAX);
            }
            _ => {}
        }
    }

    fn fold_in(&self, old: &Series) {
        self.fold_in_mapped(old, None);
    }

    /// Whether the series was removed from its family.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Relaxed)
    }

    /// Adds to a counter; refused (value unchanged) if it would pass `u64::MAX`.
    pub fn counter_add(&self, n: u64) -> Result<(), SeriesError> {
        match &self.value {
            SeriesValue::Counter(c) => add_u64(c, n).map_err(SeriesError::Refused),
            _ => Err(SeriesError::Misuse("counter-add on a series that is not a counter")),
        }
    }

    pub fn gauge_set(&self, v: f64) -> Result<(), SeriesError> {
        match &self.value {
            SeriesValue::Gauge(_) if !v.is_finite() => Err(SeriesError::Refused(Reason::NonFinite)),
            SeriesValue::Gauge(g) => {
                g.store(v.to_bits(), Relaxed);
                self.set.store(true, Relaxed);
                Ok(())
            }
            _ => Err(SeriesError::Misuse("gauge-set on a series that is not a gauge")),
        }
    }

    pub fn gauge_add(&self, v: f64) -> Result<(), SeriesError> {
        match &self.value {
            SeriesValue::Gauge(g) => {
                self.set.store(true, Relaxed);
                add_f64(g, v).map_err(SeriesError::Refused)
            }
            _ => Err(SeriesError::Misuse("gauge-add on a series that is not a gauge")),
        }
    }

    /// Adds one observation; `bounds` are the family's buckets.
    pub fn histogram_observe(&self, bounds: &[f64], v: f64) -> Result<(), SeriesError> {
        let SeriesValue::Histogram(h) = &self.value else {
            return Err(SeriesError::Misuse("histogram-observe on a series that is not a histogram"));
        };
        if v.is_nan() {
            return Err(SeriesError::Refused(Reason::NonFinite));
        }
        let bucket = bounds.partition_point(|&b| b < v);
        h.lock().expect("histogram lock").add(1, v, |buckets| buckets[bucket] += 1).map_err(SeriesError::Refused)
    }

    /// Merges pre-aggregated, non-cumulative bucket counts (one extra for `+Inf`).
    pub fn histogram_merge(&self, counts: &[u64], delta_sum: f64) -> Result<(), SeriesError> {
        let SeriesValue::Histogram(h) = &self.value else {
            return Err(SeriesError::Misuse("histogram-merge on a series that is not a histogram"));
        };
        let mut h = h.lock().expect("histogram lock");
        if counts.len() != h.buckets.len() {
            return Err(SeriesError::Misuse("histogram-merge needs one count per bucket plus one for +Inf"));
        }
        let total = counts.iter().try_fold(0u64, |acc, &n| acc.checked_add(n)).ok_or(SeriesError::Refused(Reason::Overflow))?;
        // Each bucket stays within the count, which stays within u64::MAX.
        h.add(total, delta_sum, |buckets| buckets.iter_mut().zip(counts).for_each(|(cell, &n)| *cell += n)).map_err(SeriesError::Refused)
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
                SeriesValue::Counter(c) => metric.encode_counter::<NoLabelSet, u64, u64>(&c.load(Relaxed), None)?,
                SeriesValue::Gauge(g) => metric.encode_gauge(&f64::from_bits(g.load(Relaxed)))?,
                SeriesValue::Histogram(h) => {
                    let (counts, sum) = {
                        let h = h.lock().expect("histogram lock");
                        let counts: Vec<(f64, u64)> = self.spec.buckets.iter().copied().chain([f64::INFINITY]).zip(h.buckets.iter().copied()).collect();
                        (counts, h.sum)
                    };
                    // Never past u64::MAX: the adds that feed the buckets keep their
                    // total within it.
                    let count = counts.iter().fold(0u64, |total, (_, n)| total.saturating_add(*n));
                    metric.encode_histogram::<NoLabelSet>(sum, count, &counts, None)?
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
    use prometheus_client::{
        encoding::{prometheus_text, text},
        registry::Registry,
    };

    use super::*;
    use crate::config::PluginLimits;

    fn spec(name: &str, kind: MetricKind, buckets: Vec<f64>) -> FamilySpec {
        FamilySpec { name: name.into(), help: "h".into(), kind, label_names: vec!["a".into()], buckets }
    }

    fn budget() -> Budget {
        Budget::unmetered("p", PluginLimits::default())
    }

    fn scrape(sink: &Arc<MetricSink>, openmetrics: bool) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(sink.clone()));
        let mut out = String::new();
        if openmetrics { text::encode(&mut out, &registry) } else { prometheus_text::encode(&mut out, &registry) }.unwrap();
        out
    }

    #[test]
    fn merged_histogram_encodes_exact_cumulative_counts() {
        let sink = Arc::new(MetricSink::default());
        let b = budget();
        let h = sink.declare("ns", spec("lat_seconds", MetricKind::Histogram, vec![0.1, 1.0]), &b, None).unwrap();
        let s = h.series(&["x".into()], &b).unwrap();
        s.histogram_merge(&[3, 0, 2], 7.5).unwrap();
        s.histogram_merge(&[1, 1, 0], 0.5).unwrap();
        let text = scrape(&sink, false);
        assert!(text.contains("ns_lat_seconds_bucket{a=\"x\",le=\"0.1\"} 4\n"), "{text}");
        assert!(text.contains("ns_lat_seconds_bucket{a=\"x\",le=\"1\"} 5\n"), "{text}");
        assert!(text.contains("ns_lat_seconds_bucket{a=\"x\",le=\"+Inf\"} 7\n"), "{text}");
        assert!(text.contains("ns_lat_seconds_count{a=\"x\"} 7\n"), "{text}");
        assert!(text.contains("ns_lat_seconds_sum{a=\"x\"} 8.0\n"), "{text}");
    }

    #[test]
    fn same_declaration_shares_series_and_conflicts_fail() {
        let sink = MetricSink::default();
        let bu = budget();
        let a = sink.declare("ns", spec("errors", MetricKind::Counter, vec![]), &bu, None).unwrap();
        let b = sink.declare("ns", spec("errors", MetricKind::Counter, vec![]), &bu, None).unwrap();
        a.series(&["x".into()], &bu).unwrap().counter_add(2).unwrap();
        b.series(&["x".into()], &bu).unwrap().counter_add(3).unwrap();
        let SeriesValue::Counter(c) = &a.series(&["x".into()], &bu).unwrap().value else { panic!() };
        assert_eq!(c.load(Relaxed), 5);
        let reason = |r: Result<Arc<MetricFamily>, Refusal>| r.unwrap_err().reason;
        assert_eq!(reason(sink.declare("ns", spec("errors", MetricKind::Gauge, vec![]), &bu, None)), Reason::InvalidMetric);
        assert_eq!(reason(sink.declare("ns", spec("errors_total", MetricKind::Counter, vec![]), &bu, None)), Reason::InvalidMetric);
        // A gauge named like the counter's sample would render a second `ns_errors_total`.
        assert_eq!(reason(sink.declare("ns", spec("errors_total", MetricKind::Gauge, vec![]), &bu, None)), Reason::InvalidMetric);
        let h = sink.declare("ns", spec("lat", MetricKind::Histogram, vec![1.0]), &bu, None).unwrap();
        assert_eq!(reason(sink.declare("ns", spec("lat_count", MetricKind::Gauge, vec![]), &bu, None)), Reason::InvalidMetric);
        assert_eq!(reason(sink.declare("ns", spec("bad-name", MetricKind::Gauge, vec![]), &bu, None)), Reason::InvalidMetric);
        assert_eq!(reason(sink.declare("ns", spec("h", MetricKind::Histogram, vec![1.0, 1.0]), &bu, None)), Reason::InvalidMetric);
        let dup = FamilySpec { label_names: vec!["a".into(), "a".into()], ..spec("d", MetricKind::Gauge, vec![]) };
        assert_eq!(reason(sink.declare("ns", dup, &bu, None)), Reason::InvalidMetric);
        assert!(a.series(&[], &bu).is_err());
        assert!(matches!(a.series(&["x".into()], &bu).unwrap().gauge_set(1.0), Err(SeriesError::Misuse(_))));
        assert!(matches!(h.series(&["x".into()], &bu).unwrap().counter_add(1), Err(SeriesError::Misuse(_))));
    }

    #[test]
    fn budgets_hold() {
        let sink = MetricSink::default();
        let limits =
            PluginLimits { families: 2, series: 2, buckets: 4, help_bytes: 10, label_value_bytes: 8, series_overflow: Overflow::Refuse, ..Default::default() };
        let b = Budget::unmetered("p", limits);
        let f = sink.declare("ns", spec("a", MetricKind::Gauge, vec![]), &b, None).unwrap();
        let many = (1..=5).map(f64::from).collect();
        assert_eq!(sink.declare("ns", spec("h", MetricKind::Histogram, many), &b, None).unwrap_err().reason, Reason::Buckets);
        let long_help = FamilySpec { help: "x".repeat(11), ..spec("b", MetricKind::Gauge, vec![]) };
        assert_eq!(sink.declare("ns", long_help, &b, None).unwrap_err().reason, Reason::Help);
        sink.declare("ns", spec("b", MetricKind::Gauge, vec![]), &b, None).unwrap();
        assert_eq!(sink.declare("ns", spec("c", MetricKind::Gauge, vec![]), &b, None).unwrap_err().reason, Reason::Families);
        assert_eq!(f.series(&["123456789".into()], &b).unwrap_err().reason, Reason::LabelBytes);
        f.series(&["1".into()], &b).unwrap();
        f.series(&["2".into()], &b).unwrap();
        f.series(&["1".into()], &b).unwrap();
        assert_eq!(f.series(&["3".into()], &b).unwrap_err().reason, Reason::Series);

        let small = Budget::unmetered("q", PluginLimits { metric_bytes: 1000, series_overflow: Overflow::Refuse, ..Default::default() });
        let g = sink.declare("q", spec("g", MetricKind::Gauge, vec![]), &small, None).unwrap();
        let refused = (0..100).map(|i| g.series(&[format!("{i:0>100}")], &small)).find_map(Result::err).unwrap();
        assert_eq!(refused.reason, Reason::MetricBytes);
        assert!(small.used(Reason::MetricBytes) <= 1000);
    }

    #[test]
    fn a_full_family_counts_new_label_sets_in_its_overflow_series() {
        let (sink, metrics) = (MetricSink::default(), crate::sinks::SelfMetrics::default());
        // Room for one overflow series ("a"'s) is kept from the start.
        let limits = PluginLimits { series: 3, ..Default::default() };
        let b = Budget::new("p", limits, None, &metrics).with_family_overflow([("strict".to_owned(), Overflow::Refuse)].into());
        let f = sink.declare("ns", spec("a", MetricKind::Counter, vec![]), &b, None).unwrap();
        let strict = sink.declare("ns", spec("strict", MetricKind::Counter, vec![]), &b, None).unwrap();
        f.series(&["1".into()], &b).unwrap().counter_add(1).unwrap();
        f.series(&["2".into()], &b).unwrap().counter_add(1).unwrap();
        // Full: the next label sets share one series, made past the budget.
        f.series(&["3".into()], &b).unwrap().counter_add(5).unwrap();
        let other = f.series(&["4".into()], &b).unwrap();
        other.counter_add(7).unwrap();
        assert_eq!(other.labels, [("a".to_owned(), OVERFLOW_VALUE.to_owned())]);
        let SeriesValue::Counter(c) = &other.value else { panic!() };
        assert_eq!(c.load(Relaxed), 12);
        assert_eq!((b.used(Reason::Series), metrics.series_refused("p", "ns_a").get()), (3, 2));
        // A family whose policy is `refuse` gets no series.
        assert_eq!(strict.series(&["1".into()], &b).unwrap_err().reason, Reason::Series);
        assert_eq!(metrics.series_refused("p", "ns_strict").get(), 1);
    }

    #[test]
    fn the_overflow_reserve_survives_remove_and_settles_across_a_swap() {
        let sink = MetricSink::default();
        let limits = PluginLimits { series: 3, ..Default::default() };
        let old = Budget::unmetered("p", limits);
        let f = sink.declare("ns", spec("a", MetricKind::Counter, vec![]), &old, None).unwrap();
        f.series(&["1".into()], &old).unwrap();
        f.series(&["2".into()], &old).unwrap();
        let other = f.series(&["3".into()], &old).unwrap();
        assert!(other.is_overflow());
        assert_eq!(old.used(Reason::Series), 3, "made on its reserve");
        // Shared: removing it drops only the handle.
        f.remove(&other, &old);
        assert!(Arc::ptr_eq(&f.series(&["4".into()], &old).unwrap(), &other));
        assert_eq!(old.used(Reason::Series), 3);
        // A new build at the limit declares the family again (not refused), and once the
        // old build's overflow series is its own, its reserve is given back.
        let new = Budget::unmetered("p", limits);
        let reserved = new.reserve(&old);
        let staging = Staging::default();
        sink.declare("ns", spec("a", MetricKind::Counter, vec![]), &new, Some(&staging)).unwrap();
        sink.commit(&staging, Some(&old), &new);
        new.take_over(&old, reserved);
        assert_eq!((old.used(Reason::Series), new.used(Reason::Series)), (0, 3));
    }

    #[test]
    fn help_that_would_need_escaping_is_refused() {
        let sink = MetricSink::default();
        let b = budget();
        for help in ["x\n# EOF", "a\\b", "say \"hi\"", "nul\0"] {
            let bad = FamilySpec { help: help.into(), ..spec("g", MetricKind::Gauge, vec![]) };
            assert_eq!(sink.declare("ns", bad, &b, None).unwrap_err().reason, Reason::Help, "{help:?}");
        }
    }

    #[test]
    fn values_never_overflow_or_render_non_finite() {
        let sink = Arc::new(MetricSink::default());
        let b = budget();
        let c = sink.declare("ns", spec("c", MetricKind::Counter, vec![]), &b, None).unwrap().series(&["x".into()], &b).unwrap();
        c.counter_add(u64::MAX).unwrap();
        assert!(matches!(c.counter_add(1), Err(SeriesError::Refused(Reason::Overflow))));
        let g = sink.declare("ns", spec("g", MetricKind::Gauge, vec![]), &b, None).unwrap().series(&["x".into()], &b).unwrap();
        assert!(matches!(g.gauge_set(f64::INFINITY), Err(SeriesError::Refused(Reason::NonFinite))));
        assert!(matches!(g.gauge_set(f64::NAN), Err(SeriesError::Refused(Reason::NonFinite))));
        g.gauge_set(f64::MAX).unwrap();
        assert!(matches!(g.gauge_add(f64::MAX), Err(SeriesError::Refused(Reason::NonFinite))));
        let h = sink.declare("ns", spec("h", MetricKind::Histogram, vec![1.0]), &b, None).unwrap().series(&["x".into()], &b).unwrap();
        h.histogram_merge(&[u64::MAX - 1, 0], 1.0).unwrap();
        assert!(matches!(h.histogram_merge(&[1, 1], 1.0), Err(SeriesError::Refused(Reason::Overflow))));
        h.histogram_merge(&[0, 1], 1.0).unwrap();
        for openmetrics in [false, true] {
            let text = scrape(&sink, openmetrics);
            assert!(!text.contains("inf") && !text.contains("NaN"), "{text}");
            assert!(text.contains(&format!("ns_h_count{{a=\"x\"}} {}", u64::MAX)), "{text}");
        }
    }

    #[test]
    fn a_swap_carries_series_into_a_changed_definition() {
        let sink = Arc::new(MetricSink::default());
        let (old, new) = (budget(), budget());
        let lat = |labels: &[&str], buckets: Vec<f64>| FamilySpec {
            label_names: labels.iter().map(|s| s.to_string()).collect(),
            ..spec("lat", MetricKind::Histogram, buckets)
        };
        let live = sink.declare("ns", lat(&["a", "b"], vec![1.0, 2.0, 4.0]), &old, None).unwrap();
        live.series(&["x".into(), "1".into()], &old).unwrap().histogram_merge(&[1, 2, 3, 4], 20.0).unwrap();
        live.series(&["x".into(), "2".into()], &old).unwrap().histogram_merge(&[1, 0, 0, 1], 9.0).unwrap();
        let errors = sink.declare("ns", spec("errors", MetricKind::Counter, vec![]), &old, None).unwrap();
        errors.series(&["x".into()], &old).unwrap().counter_add(5).unwrap();

        // The new build drops label `b`, adds `c`, keeps bound 2, turns 1 and 4 into 3;
        // `errors` becomes a gauge. What the old build holds counts against it from the start.
        let reserved = new.reserve(&old);
        let staging = Staging::default();
        let staged = sink.declare("ns", lat(&["a", "c"], vec![2.0, 3.0]), &new, Some(&staging)).unwrap();
        sink.declare("ns", spec("errors", MetricKind::Gauge, vec![]), &new, Some(&staging)).unwrap();
        let clash = sink.declare("ns", spec("lat_count", MetricKind::Gauge, vec![]), &new, Some(&staging));
        assert_eq!(clash.unwrap_err().reason, Reason::InvalidMetric, "staged families clash with each other too");
        assert!(!scrape(&sink, false).contains("c=\"\""), "staged families stay out of sight until the commit");
        sink.commit(&staging, Some(&old), &new);
        new.take_over(&old, reserved);

        let text = scrape(&sink, false);
        // x/1 and x/2 summed; each old bucket in the first new bucket covering it.
        assert!(text.contains("ns_lat_bucket{a=\"x\",c=\"\",le=\"2\"} 4\n"), "{text}");
        assert!(text.contains("ns_lat_bucket{a=\"x\",c=\"\",le=\"3\"} 4\n"), "{text}");
        assert!(text.contains("ns_lat_bucket{a=\"x\",c=\"\",le=\"+Inf\"} 12\n"), "{text}");
        assert!(text.contains("ns_lat_count{a=\"x\",c=\"\"} 12\n"), "{text}");
        assert!(text.contains("ns_lat_sum{a=\"x\",c=\"\"} 29.0\n"), "{text}");
        assert!(!text.contains("ns_errors_total") && !text.contains("ns_errors{"), "a changed kind starts over: {text}");
        // One carried series, and room for each family's overflow series.
        assert_eq!((old.used(Reason::Series), new.used(Reason::Series)), (0, 1 + 2), "charges moved to the new build");
        assert_eq!(new.used(Reason::Families), 2);
        assert!(staged.series(&["x".into(), "".into()], &new).is_ok());
        // Adding a label keeps identities (the new one reads ""), so the counts go on.
        let staging = Staging::default();
        let widened = sink.declare("ns", lat(&["a", "c", "d"], vec![2.0, 3.0]), &new, Some(&staging)).unwrap();
        sink.commit(&staging, Some(&new), &new);
        widened.series(&["x".into(), "".into(), "".into()], &new).unwrap().histogram_merge(&[1, 0, 0], 1.0).unwrap();
        assert!(scrape(&sink, false).contains("ns_lat_count{a=\"x\",c=\"\",d=\"\"} 13\n"));
    }

    #[test]
    fn namespaces_are_owned() {
        let sink = MetricSink::default();
        sink.claim("syscall_latency", "syscall-latency", None).unwrap();
        sink.claim("syscall_latency", "syscall-latency", None).unwrap();
        assert!(sink.claim("syscall_latency", "syscall_latency", None).unwrap_err().contains("clashes"));
        assert!(sink.claim("syscall", "syscall", None).unwrap_err().contains("clashes"));
        assert!(sink.claim("syscall_latency_x", "x", None).unwrap_err().contains("clashes"));
        sink.claim("syscalls", "syscalls", None).unwrap();
        assert!(sink.claim("wasmtap", "w", None).unwrap_err().contains("reserved"));
        assert!(sink.claim("wasmtap_x", "w", None).unwrap_err().contains("reserved"));
        sink.claim("team_a", "tenant team-a", None).unwrap();
        sink.claim("team_a_calls", "calls", Some("tenant team-a")).unwrap();
        assert!(sink.claim("team_a_other", "other", None).unwrap_err().contains("clashes"));
        // Nesting is allowed by owner, not by a namespace that happens to be equal.
        assert!(sink.claim("team_a_x", "x", Some("tenant team_a")).unwrap_err().contains("clashes"));
    }
}
