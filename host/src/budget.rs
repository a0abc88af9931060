//! Budgets: what one plugin, and the tenant it belongs to, may make the host hold or do.
//!
//! A plugin's `Budget` lives as long as the plugin (not one instance of it), so a
//! restart refills nothing. Every charge goes to the plugin and then to its tenant;
//! past either limit the call is refused, counted in
//! `wasmtap_plugin_refusals_total{plugin,reason}`, and said once in the log per reason.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use crate::{
    config::{Overflow, PluginLimits, TenantQuota},
    events::CgroupScope,
    sinks::{SelfMetrics, logs::sanitize},
};

/// Why the host refused something a plugin asked for (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    MetricBytes,
    Series,
    Families,
    Buckets,
    Labels,
    LabelBytes,
    Help,
    InvalidMetric,
    Namespace,
    Overflow,
    NonFinite,
    LogBytes,
    Memory,
    Cpu,
    Subscriptions,
    FilterEntries,
    ComponentBytes,
    CompileTime,
    Import,
    /// Metric family and series handles a plugin holds at once.
    Handles,
    /// A write through a handle to a series that was removed.
    RemovedSeries,
}

impl Reason {
    pub const ALL: [Reason; 21] = [
        Reason::MetricBytes,
        Reason::Series,
        Reason::Families,
        Reason::Buckets,
        Reason::Labels,
        Reason::LabelBytes,
        Reason::Help,
        Reason::InvalidMetric,
        Reason::Namespace,
        Reason::Overflow,
        Reason::NonFinite,
        Reason::LogBytes,
        Reason::Memory,
        Reason::Cpu,
        Reason::Subscriptions,
        Reason::FilterEntries,
        Reason::ComponentBytes,
        Reason::CompileTime,
        Reason::Import,
        Reason::Handles,
        Reason::RemovedSeries,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::MetricBytes => "metric_bytes",
            Reason::Series => "series",
            Reason::Families => "families",
            Reason::Buckets => "buckets",
            Reason::Labels => "labels",
            Reason::LabelBytes => "label_bytes",
            Reason::Help => "help",
            Reason::InvalidMetric => "invalid_metric",
            Reason::Namespace => "namespace",
            Reason::Overflow => "overflow",
            Reason::NonFinite => "non_finite",
            Reason::LogBytes => "log_bytes",
            Reason::Memory => "memory",
            Reason::Cpu => "cpu",
            Reason::Subscriptions => "subscriptions",
            Reason::FilterEntries => "filter_entries",
            Reason::ComponentBytes => "component_bytes",
            Reason::CompileTime => "compile_time",
            Reason::Import => "import",
            Reason::Handles => "handles",
            Reason::RemovedSeries => "removed_series",
        }
    }
}

/// A refused request: why, and a message for the plugin (or the operator).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

/// A limit on an amount held (bytes, series), charged and released atomically.
#[derive(Debug)]
struct Quota {
    limit: u64,
    used: AtomicU64,
}

impl Quota {
    fn new(limit: u64) -> Self {
        Self { limit, used: AtomicU64::new(0) }
    }

    /// Takes `n` if it fits.
    fn try_charge(&self, n: u64) -> bool {
        self.used.fetch_update(Relaxed, Relaxed, |used| used.checked_add(n).filter(|&v| v <= self.limit)).is_ok()
    }

    fn release(&self, n: u64) {
        let _ = self.used.fetch_update(Relaxed, Relaxed, |used| Some(used.saturating_sub(n)));
    }

    fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    fn limit(&self) -> u64 {
        self.limit
    }
}

/// Bytes per second with a burst of four seconds' worth.
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    burst: f64,
    per_second: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(per_second: u64) -> Self {
        let burst = per_second as f64 * 4.0;
        Self { tokens: burst, burst, per_second: per_second as f64, last: Instant::now() }
    }

    fn give_back(&mut self, n: usize) {
        self.tokens = (self.tokens + n as f64).min(self.burst);
    }

    fn try_take(&mut self, n: usize) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * self.per_second).min(self.burst);
        self.last = now;
        if self.tokens < n as f64 {
            return false;
        }
        self.tokens -= n as f64;
        true
    }

    /// The largest single record that can ever pass.
    fn burst(&self) -> usize {
        self.burst as usize
    }
}

/// CPU time spent per period, against a share.
#[derive(Debug)]
struct CpuWindow {
    allowed: Duration,
    period: Duration,
    started: Instant,
    spent: Duration,
}

/// One tenant: its cgroup scope and the quotas all its plugins share.
#[derive(Debug)]
pub struct TenantBudget {
    pub name: String,
    pub namespace: String,
    pub scope: Arc<CgroupScope>,
    memory: Quota,
    series: Quota,
    metric_bytes: Quota,
    log: Mutex<TokenBucket>,
    cpu: Mutex<CpuWindow>,
}

impl TenantBudget {
    pub fn new(name: &str, namespace: String, scope: Arc<CgroupScope>, quota: &TenantQuota) -> Self {
        let period = Duration::from_millis(quota.cpu_period_ms);
        Self {
            name: name.to_owned(),
            namespace,
            scope,
            memory: Quota::new(quota.memory_bytes as u64),
            series: Quota::new(quota.series as u64),
            metric_bytes: Quota::new(quota.metric_bytes as u64),
            log: Mutex::new(TokenBucket::new(quota.log_bytes_per_second)),
            cpu: Mutex::new(CpuWindow { allowed: period * quota.cpu_percent / 100, period, started: Instant::now(), spent: Duration::ZERO }),
        }
    }

    fn quota(&self, reason: Reason) -> Option<&Quota> {
        match reason {
            Reason::Memory => Some(&self.memory),
            Reason::Series => Some(&self.series),
            Reason::MetricBytes => Some(&self.metric_bytes),
            _ => None,
        }
    }

    /// Who owns the tenant's namespace claim.
    pub fn owner(&self) -> String {
        format!("tenant {}", self.name)
    }
}

/// The quotas of what a plugin holds in the metric sink, which outlive its builds.
const SHARED: [Reason; 3] = [Reason::Series, Reason::Families, Reason::MetricBytes];

/// What a replacing build reserved of the running build's usage.
#[derive(Debug, Clone, Copy)]
pub struct Reserved([u64; 3]);

/// One plugin's budget; shared by every instance of it and by its sinks.
#[derive(Debug)]
pub struct Budget {
    pub plugin: String,
    pub limits: PluginLimits,
    pub tenant: Option<Arc<TenantBudget>>,
    memory: Quota,
    series: Quota,
    families: Quota,
    metric_bytes: Quota,
    log: Mutex<TokenBucket>,
    metrics: SelfMetrics,
    /// Reasons already said in the log (each is said once).
    said: Mutex<HashSet<Reason>>,
    /// Overflow policies by family name (the plugin's `family_overflow`).
    family_overflow: BTreeMap<String, Overflow>,
    /// Families whose overflow was said in the log (each is said once).
    overflowed: Mutex<HashSet<String>>,
}

impl Budget {
    pub fn new(plugin: &str, limits: PluginLimits, tenant: Option<Arc<TenantBudget>>, metrics: &SelfMetrics) -> Self {
        Self {
            plugin: plugin.to_owned(),
            limits,
            tenant,
            memory: Quota::new(limits.memory_bytes as u64),
            series: Quota::new(limits.series as u64),
            families: Quota::new(limits.families as u64),
            metric_bytes: Quota::new(limits.metric_bytes as u64),
            log: Mutex::new(TokenBucket::new(limits.log_bytes_per_second)),
            metrics: metrics.clone(),
            said: Mutex::default(),
            family_overflow: BTreeMap::new(),
            overflowed: Mutex::default(),
        }
    }

    /// With per-family overflow policies (see `PluginConfig::family_overflow`).
    pub fn with_family_overflow(mut self, family_overflow: BTreeMap<String, Overflow>) -> Self {
        self.family_overflow = family_overflow;
        self
    }

    /// The overflow policy of the family the plugin declared as `family`.
    pub fn overflow_of(&self, family: &str) -> Overflow {
        self.family_overflow.get(family).copied().unwrap_or(self.limits.series_overflow)
    }

    /// Counts a new label set of `family` (full name) that got no series of its own,
    /// and says once per family why and where its values go.
    pub fn series_refused(&self, family: &str, why: &Refusal, overflow: Overflow) {
        self.metrics.series_refused(&self.plugin, family).inc();
        if self.overflowed.lock().expect("overflowed").insert(family.to_owned()) {
            let whereto = match overflow {
                Overflow::Other => "from now on new label sets are counted in its series whose labels are all \"__other__\"",
                Overflow::Refuse => "from now on new label sets are refused (series_overflow = \"refuse\")",
            };
            tracing::warn!(
                plugin = %self.plugin,
                family,
                "metric family full ({}): {whereto} (said once per family; wasmtap_plugin_series_refused_total counts every one)",
                sanitize(&why.message, 256)
            );
        }
    }

    /// A budget with the given limits and no self-metrics (tests, benches).
    pub fn unmetered(plugin: &str, limits: PluginLimits) -> Self {
        Self::new(plugin, limits, None, &SelfMetrics::default())
    }

    fn quota(&self, reason: Reason) -> Option<&Quota> {
        match reason {
            Reason::Memory => Some(&self.memory),
            Reason::Series => Some(&self.series),
            Reason::Families => Some(&self.families),
            Reason::MetricBytes => Some(&self.metric_bytes),
            _ => None,
        }
    }

    /// Charges `n` of `reason`'s quota to the plugin and its tenant, or refuses (and
    /// counts the refusal).
    pub fn charge(&self, reason: Reason, n: u64) -> Result<(), Refusal> {
        self.try_charge(reason, n).map_err(|refusal| self.refuse(refusal))
    }

    /// `charge`, but a refusal is only returned, not counted.
    pub fn try_charge(&self, reason: Reason, n: u64) -> Result<(), Refusal> {
        let mine = self.quota(reason).expect("a quota kind");
        if !mine.try_charge(n) {
            return Err(Refusal::new(reason, format!("over the plugin's {} budget ({} of {} used)", reason.label(), mine.used(), mine.limit())));
        }
        if let Some(tenant) = &self.tenant
            && let Some(theirs) = tenant.quota(reason)
            && !theirs.try_charge(n)
        {
            mine.release(n);
            return Err(Refusal::new(reason, format!("over tenant {}'s {} quota ({} of {} used)", tenant.name, reason.label(), theirs.used(), theirs.limit())));
        }
        Ok(())
    }

    /// Charges what exists already (series carried across a swap), even past a limit.
    pub fn force_charge(&self, reason: Reason, n: u64) {
        let quotas = [self.quota(reason), self.tenant.as_ref().and_then(|t| t.quota(reason))];
        for q in quotas.into_iter().flatten() {
            q.used.fetch_add(n, Relaxed);
        }
    }

    /// The metric quotas a plugin's builds share: what the running build holds counts
    /// against the build that replaces it from the start (its `init` cannot add a whole
    /// second quota). Returns what was reserved, for [`Budget::take_over`].
    pub fn reserve(&self, old: &Budget) -> Reserved {
        Reserved(SHARED.map(|reason| {
            let n = old.quota(reason).expect("a quota").used();
            self.quota(reason).expect("a quota").used.fetch_add(n, Relaxed);
            n
        }))
    }

    /// At the commit of a replace: the reservation ends, and what `old` still holds in
    /// the metric sink (the families and series stay) is charged here instead. Only the
    /// plugin's quotas move; its tenant's already count it.
    pub fn take_over(&self, old: &Budget, reserved: Reserved) {
        for (reason, n) in SHARED.into_iter().zip(reserved.0) {
            let (mine, theirs) = (self.quota(reason).expect("a quota"), old.quota(reason).expect("a quota"));
            mine.release(n);
            mine.used.fetch_add(theirs.used.swap(0, Relaxed), Relaxed);
        }
    }

    pub fn release(&self, reason: Reason, n: u64) {
        if let Some(q) = self.quota(reason) {
            q.release(n);
        }
        if let Some(q) = self.tenant.as_ref().and_then(|t| t.quota(reason)) {
            q.release(n);
        }
    }

    pub fn used(&self, reason: Reason) -> u64 {
        self.quota(reason).map_or(0, Quota::used)
    }

    /// Takes `n` log bytes from the plugin's and its tenant's allowance.
    pub fn take_log_bytes(&self, n: usize) -> Result<(), Refusal> {
        if !self.log.lock().expect("log budget").try_take(n) {
            return Err(self.refuse(Refusal::new(Reason::LogBytes, "over the plugin's log_bytes_per_second budget")));
        }
        if let Some(tenant) = &self.tenant
            && !tenant.log.lock().expect("log budget").try_take(n)
        {
            self.log.lock().expect("log budget").give_back(n);
            return Err(self.refuse(Refusal::new(Reason::LogBytes, format!("over tenant {}'s log quota", tenant.name))));
        }
        Ok(())
    }

    /// The largest log record that can pass at all.
    pub fn log_burst(&self) -> usize {
        self.log.lock().expect("log budget").burst()
    }

    /// Whether the tenant's CPU share is spent (refusal counted): checked before every
    /// call into one of its plugins.
    pub fn cpu_exhausted(&self) -> bool {
        let Some(tenant) = &self.tenant else { return false };
        let exhausted = {
            let mut cpu = tenant.cpu.lock().expect("cpu window");
            let periods = (cpu.started.elapsed().as_nanos() / cpu.period.as_nanos().max(1)) as u32;
            if periods > 0 {
                // A call that ran past the share is paid off in the periods after it,
                // so the share holds on average, not just per period.
                let (period, allowed) = (cpu.period, cpu.allowed);
                cpu.started += period * periods;
                cpu.spent = cpu.spent.saturating_sub(allowed.saturating_mul(periods));
            }
            cpu.spent >= cpu.allowed
        };
        if exhausted {
            self.refuse(Refusal::new(Reason::Cpu, format!("tenant {}'s CPU share for this period is spent", tenant.name)));
        }
        exhausted
    }

    /// Adds time spent in the plugin's calls to its tenant's period.
    pub fn spend_cpu(&self, spent: Duration) {
        if let Some(tenant) = &self.tenant {
            tenant.cpu.lock().expect("cpu window").spent += spent;
        }
    }

    /// Counts a refusal, says it once per reason in the log, and hands it back.
    pub fn refuse(&self, refusal: Refusal) -> Refusal {
        self.metrics.refusals(&self.plugin, refusal.reason.label()).inc();
        if self.said.lock().expect("said").insert(refusal.reason) {
            tracing::warn!(
                plugin = %self.plugin,
                reason = refusal.reason.label(),
                "plugin refused: {} (said once per reason; wasmtap_plugin_refusals_total counts every one)",
                sanitize(&refusal.message, 512)
            );
        }
        refusal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_refuse_past_the_limit_and_release() {
        let q = Quota::new(10);
        assert!(q.try_charge(6));
        assert!(!q.try_charge(5));
        q.release(6);
        assert!(q.try_charge(10));
        assert!(!q.try_charge(1));
    }

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let mut b = TokenBucket::new(100);
        assert!(b.try_take(400));
        assert!(!b.try_take(10));
    }

    #[test]
    fn tenant_quota_is_shared_and_rolled_back() {
        let metrics = SelfMetrics::default();
        let quota = TenantQuota { series: 3, ..Default::default() };
        let tenant = Arc::new(TenantBudget::new("t", "t".into(), Arc::new(CgroupScope::root_for_tests()), &quota));
        let a = Budget::new("a", PluginLimits::default(), Some(tenant.clone()), &metrics);
        let b = Budget::new("b", PluginLimits { series: 2, ..Default::default() }, Some(tenant), &metrics);
        a.charge(Reason::Series, 2).unwrap();
        assert!(b.charge(Reason::Series, 2).unwrap_err().message.contains("tenant t"));
        assert_eq!(b.used(Reason::Series), 0, "the plugin's charge is rolled back");
        b.charge(Reason::Series, 1).unwrap();
        assert!(b.charge(Reason::Series, 1).is_err());
    }
}
