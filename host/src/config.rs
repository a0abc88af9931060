//! Daemon configuration: TOML, with an embedded default (`host/default.toml`).

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::sinks::{
    logs::sanitize,
    metrics::{check_namespace, namespace_for},
};

/// The configuration used when `--config` is not given.
pub const DEFAULT_CONFIG: &str = include_str!("../default.toml");

/// Plugins one daemon runs (each has its own thread, queue and budgets), and tenants.
pub const MAX_PLUGINS: usize = 256;
const MAX_TENANTS: usize = 256;

/// Largest config file read (plugin sections given at run time are bounded by the
/// admin API's body limit).
const MAX_CONFIG_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default)]
    pub probes: ProbeSettings,
    #[serde(default)]
    pub plugin_defaults: PluginLimits,
    /// Where precompiled plugin components are cached; defaults to
    /// `/var/cache/wasmtap` for root, `$XDG_CACHE_HOME/wasmtap` otherwise.
    /// Must be the daemon user's and writable by no one else (made 0700), below
    /// directories only root or that user can write; otherwise plugins are compiled in
    /// memory (and the log says why). A non-root daemon with capabilities or set-id
    /// uses no disk cache.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// Bytes of precompiled components the cache keeps (least recently used go first).
    #[serde(default = "default_cache_max_bytes")]
    pub cache_max_bytes: u64,
    /// The admin API's Unix socket; defaults to `/run/wasmtap/admin.sock` for root,
    /// `$XDG_RUNTIME_DIR/wasmtap/admin.sock` (or `/tmp/wasmtap-UID/admin.sock`) otherwise.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    /// Capabilities kept once the daemon runs (every other one is dropped, and
    /// NoNewPrivs set): names like `bpf`, `perfmon`, `sys_admin`.
    #[serde(default = "default_capabilities_keep")]
    pub capabilities_keep: Vec<String>,
    #[serde(default, rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantConfig>,
    #[serde(default)]
    pub logs: LogSettings,
}

/// Where the admin socket is when the config does not say.
pub fn default_admin_socket() -> PathBuf {
    let uid = nix::unistd::geteuid();
    let dir = if uid.is_root() {
        PathBuf::from("/run/wasmtap")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR").map_or_else(|| PathBuf::from(format!("/tmp/wasmtap-{uid}")), |d| PathBuf::from(d).join("wasmtap"))
    };
    dir.join("admin.sock")
}

fn default_capabilities_keep() -> Vec<String> {
    crate::privileges::DEFAULT_KEEP.iter().map(|&c| c.to_owned()).collect()
}

fn default_cache_max_bytes() -> u64 {
    1 << 30
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9568))
}

/// Bounds of the public HTTP server (`listen`), which any local user can reach.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Connections at once; past it a new one takes the place of the longest idle.
    /// Lowered to fit the open-file limit (less 256 for the rest of the daemon).
    pub max_connections: usize,
    /// Requests answered at once; more get 503 (like node_exporter's
    /// `--web.max-requests`).
    pub max_requests: usize,
    /// Time to send a request head, and the longest a kept-alive connection may wait
    /// idle for its next one.
    pub header_timeout_ms: u64,
    /// Longest a connection may stay open, whatever it does.
    pub connection_max_ms: u64,
    /// TLS and basic auth (a TOML file with the exporter toolkit's keys, see
    /// `server::web`); none: plain HTTP, no auth.
    pub web_config: Option<PathBuf>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self { max_connections: 512, max_requests: 40, header_timeout_ms: 10_000, connection_max_ms: 120_000, web_config: None }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeSettings {
    pub drain_interval_ms: u64,
    pub ring_buffer_bytes: u32,
    pub wakeup_percent: u32,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self { drain_interval_ms: 10, ring_buffer_bytes: 16 << 20, wakeup_percent: 50 }
    }
}

/// Where plugin log records go (`[logs]` and its `[[logs.output]]`s). With no output
/// they go to the daemon's own log. Read at start; a SIGHUP does not change them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// The node name records carry; default: the host name.
    pub node: Option<String>,
    #[serde(default, rename = "output")]
    pub outputs: Vec<LogOutputConfig>,
}

impl LogSettings {
    pub fn node(&self) -> String {
        self.node.clone().unwrap_or_else(|| nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "unknown".into()))
    }

    fn check(&self) -> anyhow::Result<()> {
        if let Some(node) = &self.node
            && (node.is_empty() || node.len() > 255 || node.chars().any(char::is_control))
        {
            bail!("logs.node must be 1 to 255 characters, no control characters");
        }
        if self.outputs.len() > 8 {
            bail!("at most 8 [[logs.output]]s, got {}", self.outputs.len());
        }
        let mut names = HashSet::new();
        for output in &self.outputs {
            let name = output.name();
            output.check().with_context(|| format!("[[logs.output]] {name:?}"))?;
            if !names.insert(name.clone()) {
                bail!("two [[logs.output]]s are named {name:?}: give each its own `name`");
            }
        }
        Ok(())
    }
}

/// Kinds of log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogOutputKind {
    /// JSON lines to stdout (`path = "-"`) or a file.
    JsonLines,
    /// RFC 5424 over TCP, octet-counted (`address`).
    Syslog,
    /// Loki's push API (`url`).
    Loki,
    /// OTLP logs over HTTP, protobuf (`url`).
    Otlp,
}

impl LogOutputKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::JsonLines => "json-lines",
            Self::Syslog => "syslog",
            Self::Loki => "loki",
            Self::Otlp => "otlp",
        }
    }
}

/// One `[[logs.output]]`. Each has its own bounded buffer: past `buffer_records` or
/// `buffer_bytes` (say, while its receiver is down) records are dropped and counted in
/// `wasmtap_log_dropped_records_total{output,reason="buffer_full"}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogOutputConfig {
    pub kind: LogOutputKind,
    /// The `output` label of its self-metrics; default: the kind.
    pub name: Option<String>,
    /// json-lines: a file (appended to; reopened when moved away), or "-" for stdout.
    pub path: Option<PathBuf>,
    /// syslog: host:port of a TCP receiver.
    pub address: Option<String>,
    /// loki, otlp: the endpoint (http://).
    pub url: Option<String>,
    /// loki, otlp: extra request headers (e.g. `X-Scope-OrgID`, `Authorization`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// loki: static stream labels added to every stream (e.g. `cluster`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// syslog: the facility name.
    #[serde(default = "default_facility")]
    pub facility: String,
    /// syslog: the SD-ID of the host's structured-data element (name@enterprise-number;
    /// the default uses 32473, the number RFC 5612 sets aside for examples).
    #[serde(default = "default_sd_id")]
    pub sd_id: String,
    /// Records below this level are not sent here.
    #[serde(default = "default_min_level")]
    pub min_level: crate::sinks::logs::Level,
    #[serde(default = "default_buffer_records")]
    pub buffer_records: usize,
    #[serde(default = "default_buffer_bytes")]
    pub buffer_bytes: usize,
    #[serde(default = "default_batch_records")]
    pub batch_records: usize,
    /// Longest a record waits for its batch to fill.
    #[serde(default = "default_batch_wait_ms")]
    pub batch_wait_ms: u64,
    /// Connect, write and answer timeout.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Longest wait between retries (the wait doubles from 100 ms).
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_facility() -> String {
    "local0".into()
}
fn default_sd_id() -> String {
    "wasmtap@32473".into()
}
fn default_min_level() -> crate::sinks::logs::Level {
    crate::sinks::logs::Level::Info
}
fn default_buffer_records() -> usize {
    10_000
}
fn default_buffer_bytes() -> usize {
    16 << 20
}
fn default_batch_records() -> usize {
    500
}
fn default_batch_wait_ms() -> u64 {
    1000
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_max_backoff_ms() -> u64 {
    30_000
}

impl LogOutputConfig {
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.kind.name().to_owned())
    }

    /// Where it sends, for the log.
    pub fn destination(&self) -> String {
        [self.path.as_ref().map(|p| p.display().to_string()), self.address.clone(), self.url.clone()].into_iter().flatten().next().unwrap_or_default()
    }

    fn check(&self) -> anyhow::Result<()> {
        check_name("log output", &self.name())?;
        let (needs, given) = match self.kind {
            LogOutputKind::JsonLines => ("path", self.path.is_some()),
            LogOutputKind::Syslog => ("address", self.address.is_some()),
            LogOutputKind::Loki | LogOutputKind::Otlp => ("url", self.url.is_some()),
        };
        if !given {
            bail!("a {} output needs `{needs}`", self.kind.name());
        }
        let stray = [
            ("path", self.path.is_some() && needs != "path"),
            ("address", self.address.is_some() && needs != "address"),
            ("url", self.url.is_some() && needs != "url"),
        ]
        .into_iter()
        .chain([("labels", !self.labels.is_empty() && self.kind != LogOutputKind::Loki)])
        .chain([("headers", !self.headers.is_empty() && needs != "url")])
        .find(|(_, set)| *set);
        if let Some((key, _)) = stray {
            bail!("`{key}` does not apply to a {} output", self.kind.name());
        }
        if let Some(path) = &self.path
            && path.as_os_str() != "-"
            && !path.is_absolute()
        {
            bail!("`path` must be absolute (or \"-\" for stdout), got {}", sanitize(&path.display().to_string(), 64));
        }
        if self.headers.len() > 16 || self.labels.len() > 16 {
            bail!("at most 16 headers and 16 labels");
        }
        if let Some(name) = self.headers.keys().find(|k| ["host", "content-type", "content-length"].contains(&k.to_ascii_lowercase().as_str())) {
            bail!("header {:?} is set by wasmtap itself", sanitize(name, 64));
        }
        for name in self.labels.keys() {
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') || name.as_bytes()[0].is_ascii_digit() {
                bail!("label name {:?} is not a Loki label name ([a-zA-Z_][a-zA-Z0-9_]*)", sanitize(name, 64));
            }
        }
        crate::sinks::logs::check_output_parts(self)?;
        within("buffer_records", self.buffer_records, 1..=1_000_000)?;
        within("buffer_bytes", self.buffer_bytes, 4096..=1 << 30)?;
        within("batch_records", self.batch_records, 1..=self.buffer_records.min(10_000))?;
        within("batch_wait_ms", self.batch_wait_ms, 1..=60_000)?;
        within("timeout_ms", self.timeout_ms, 100..=300_000)?;
        within("max_backoff_ms", self.max_backoff_ms, 100..=3_600_000)?;
        Ok(())
    }
}

/// What one plugin may use of the host. `[plugin_defaults]` sets them for every plugin;
/// any key may be repeated in a `[[plugin]]` section to override it for that plugin.
/// Past a limit the host refuses the call and counts it in
/// `wasmtap_plugin_refusals_total{plugin,reason}`; the plugin and everyone else go on.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginLimits {
    /// All linear memories and tables of an instance together (tables count 8 bytes per
    /// element).
    pub memory_bytes: usize,
    /// Longest a single call into the plugin may run before it is interrupted.
    pub call_deadline_ms: u64,
    /// Batches that may wait for the plugin before new ones are dropped.
    pub queue_batches: usize,
    /// Host bytes its metric families and series may take: what they hold plus what
    /// they add to every scrape (names, help, label values, bucket lines).
    pub metric_bytes: usize,
    /// Series in all its families.
    pub series: usize,
    /// What a new label set gets once the plugin's series (or metric bytes, or its
    /// tenant's) are used up; `family_overflow` in a `[[plugin]]` section sets it per
    /// family.
    pub series_overflow: Overflow,
    /// Metric families.
    pub families: usize,
    /// Buckets per histogram family.
    pub buckets: usize,
    /// Label names per family.
    pub labels: usize,
    /// Length of one label value, in bytes.
    pub label_value_bytes: usize,
    /// Length of a family's help text, in bytes.
    pub help_bytes: usize,
    /// Log bytes (messages, fields, stdout and stderr) per second; bursts may reach four
    /// seconds' worth. The allowance belongs to the plugin, not to an instance: a
    /// restart does not refill it.
    pub log_bytes_per_second: u64,
    /// Subscriptions in its manifest.
    pub subscriptions: usize,
    /// Filter entries (pids, cgroups, syscalls) over all its subscriptions.
    pub filter_entries: usize,
    /// Size of the component file.
    pub component_bytes: usize,
    /// Longest compiling the component may take (compiled in a child process).
    pub compile_timeout_ms: u64,
    /// Address space the compiling child process may use.
    pub compile_memory_bytes: u64,
    /// On shutdown, how long the plugin may take to finish its queue and final tick;
    /// what is still queued then is counted as dropped.
    pub shutdown_ms: u64,
    /// Faults within `fault_window_ms` after which the plugin is quarantined (no more
    /// restarts until the daemon restarts).
    pub max_faults: u32,
    pub fault_window_ms: u64,
}

/// `value` within `range`, or an error naming `key`.
fn within<T: PartialOrd + std::fmt::Display>(key: &str, value: T, range: std::ops::RangeInclusive<T>) -> anyhow::Result<()> {
    if !range.contains(&value) {
        bail!("{key} must be within {}..={}, got {value}", range.start(), range.end());
    }
    Ok(())
}

impl PluginLimits {
    /// Every limit within what the host can honour: queues are allocated up front and
    /// each limit is a bound on host memory, so none may be unbounded.
    fn check(&self) -> anyhow::Result<()> {
        within("memory_bytes", self.memory_bytes, 64 << 10..=16 << 30)?;
        within("call_deadline_ms", self.call_deadline_ms, 1..=60_000)?;
        within("queue_batches", self.queue_batches, 1..=4096)?;
        within("metric_bytes", self.metric_bytes, 4096..=1 << 30)?;
        within("series", self.series, 1..=1_000_000)?;
        within("families", self.families, 1..=4096)?;
        within("buckets", self.buckets, 1..=1024)?;
        within("labels", self.labels, 0..=64)?;
        within("label_value_bytes", self.label_value_bytes, 1..=64 << 10)?;
        within("help_bytes", self.help_bytes, 0..=64 << 10)?;
        within("log_bytes_per_second", self.log_bytes_per_second, 0..=64 << 20)?;
        within("subscriptions", self.subscriptions, 1..=64)?;
        within("filter_entries", self.filter_entries, 0..=65_536)?;
        within("component_bytes", self.component_bytes, 8..=1 << 30)?;
        within("compile_timeout_ms", self.compile_timeout_ms, 1..=600_000)?;
        within("compile_memory_bytes", self.compile_memory_bytes, 64 << 20..=64 << 30)?;
        within("shutdown_ms", self.shutdown_ms, 1..=60_000)?;
        within("max_faults", self.max_faults, 1..=1000)?;
        within("fault_window_ms", self.fault_window_ms, 1..=86_400_000)
    }
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            call_deadline_ms: 500,
            queue_batches: 128,
            metric_bytes: 8 << 20,
            series: 10_000,
            series_overflow: Overflow::Other,
            families: 64,
            buckets: 64,
            labels: 16,
            label_value_bytes: 256,
            help_bytes: 512,
            log_bytes_per_second: 16 << 10,
            subscriptions: 16,
            filter_entries: 4096,
            component_bytes: 32 << 20,
            compile_timeout_ms: 60_000,
            compile_memory_bytes: 4 << 30,
            shutdown_ms: 2_000,
            max_faults: 5,
            fault_window_ms: 60_000,
        }
    }
}

/// What a family does with a new label set when no series may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// It is counted in the family's one overflow series, whose every label value is
    /// `__other__`: nothing goes unseen (a process started after the family filled up
    /// still counts), and the refusal is counted in
    /// `wasmtap_plugin_series_refused_total{plugin,family}`.
    Other,
    /// The plugin's request is refused (its values are not counted anywhere), and the
    /// refusal is counted as above.
    Refuse,
}

// No `deny_unknown_fields`: keys that are not fields land in `overrides`, where
// `PluginLimits` (which does deny them) reports any unknown one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PluginConfig {
    /// Instance name: labels its self-metrics and log records, and (with `-` → `_`)
    /// is its metric namespace unless `namespace` is set.
    pub name: String,
    /// A plugin built into the binary (see `wasmtap plugins`).
    #[serde(default)]
    pub bundled: Option<String>,
    /// A component file on disk.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Metric namespace the plugin owns: every family it declares is `<namespace>_<name>`.
    /// Claimed at load; one that clashes with another's (or `wasmtap`) fails the plugin.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The `[[tenant]]` this plugin belongs to.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Passed to the plugin's `init` as a tree, TOML types kept.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
    /// `series_overflow` per family (by the name the plugin declares, without the
    /// namespace), e.g. `family_overflow = { seconds = "refuse" }`.
    #[serde(default)]
    pub family_overflow: BTreeMap<String, Overflow>,
    /// Limit overrides (any `PluginLimits` key); resolved by `Config::parse`.
    #[serde(flatten)]
    overrides: toml::Table,
    #[serde(skip)]
    pub limits: PluginLimits,
}

/// One node of a plugin's config tree (the WIT `config-value`, without the bindings).
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigNode {
    String(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
    Datetime(String),
    Array(Vec<u32>),
    Table(Vec<(String, u32)>),
}

/// A tenant: a cgroup v2 subtree whose events its plugins see (and nothing else), a
/// metric namespace its plugins' namespaces live in, and quotas its plugins share.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// The tenant's cgroup v2 directory (absolute, or relative to the cgroup v2 mount).
    /// Its plugins receive only events of tasks in this cgroup or below it.
    pub cgroup: PathBuf,
    /// Namespace prefix of its plugins' metrics; defaults to the name (`-` → `_`).
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub quota: TenantQuota,
}

/// What all of a tenant's plugins together may use.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantQuota {
    /// Linear memories and tables of all its plugin instances.
    pub memory_bytes: usize,
    /// Series in all its plugins' families.
    pub series: usize,
    /// Host metric bytes of all its plugins (see `PluginLimits::metric_bytes`).
    pub metric_bytes: usize,
    /// Log bytes per second of all its plugins.
    pub log_bytes_per_second: u64,
    /// CPU its plugins' calls may take per `cpu_period_ms`, in percent of one CPU.
    /// Batches that arrive once the share is spent are dropped (and counted) until the
    /// next period.
    pub cpu_percent: u32,
    pub cpu_period_ms: u64,
}

impl Default for TenantQuota {
    fn default() -> Self {
        Self { memory_bytes: 256 << 20, series: 20_000, metric_bytes: 16 << 20, log_bytes_per_second: 32 << 10, cpu_percent: 50, cpu_period_ms: 1_000 }
    }
}

impl PluginConfig {
    /// A plugin section with the default limits, as a test or bench would write it.
    pub fn bundled(name: &str, bundled: &str) -> Self {
        Self {
            name: name.into(),
            bundled: Some(bundled.into()),
            path: None,
            namespace: None,
            tenant: None,
            config: BTreeMap::new(),
            family_overflow: BTreeMap::new(),
            overrides: toml::Table::new(),
            limits: PluginLimits::default(),
        }
    }

    /// The plugin's config as the strings `init` receives.
    /// The plugin's `config` table as the flat tree `init` takes: element 0 is the
    /// root table; arrays and tables refer to their children by index.
    pub fn config_tree(&self) -> Vec<ConfigNode> {
        fn add(nodes: &mut Vec<ConfigNode>, value: &toml::Value) -> u32 {
            let at = nodes.len();
            nodes.push(ConfigNode::Boolean(false)); // placeholder until the children are in
            let node = match value {
                toml::Value::String(s) => ConfigNode::String(s.clone()),
                toml::Value::Integer(i) => ConfigNode::Integer(*i),
                toml::Value::Float(f) => ConfigNode::Float(*f),
                toml::Value::Boolean(b) => ConfigNode::Boolean(*b),
                toml::Value::Datetime(d) => ConfigNode::Datetime(d.to_string()),
                toml::Value::Array(items) => ConfigNode::Array(items.iter().map(|v| add(nodes, v)).collect()),
                toml::Value::Table(table) => ConfigNode::Table(table.iter().map(|(k, v)| (k.clone(), add(nodes, v))).collect()),
            };
            nodes[at] = node;
            at as u32
        }
        let mut nodes = Vec::new();
        let root = toml::Value::Table(self.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        add(&mut nodes, &root);
        nodes
    }

    /// The metric namespace the plugin owns: its own (or its name's), below its
    /// tenant's.
    pub fn namespace_within(&self, tenant_namespace: Option<&str>) -> String {
        let own = self.namespace.clone().unwrap_or_else(|| namespace_for(&self.name));
        match tenant_namespace {
            Some(tenant) => format!("{tenant}_{own}"),
            None => own,
        }
    }

    /// The section as TOML again, every limit spelled out.
    fn to_table(&self) -> anyhow::Result<toml::Table> {
        let mut table = toml::Table::try_from(self.limits)?;
        table.insert("name".into(), self.name.clone().into());
        let optional = [("bundled", self.bundled.clone()), ("path", self.path.as_ref().map(|p| p.display().to_string()))];
        for (key, value) in optional.into_iter().chain([("namespace", self.namespace.clone()), ("tenant", self.tenant.clone())]) {
            if let Some(value) = value {
                table.insert(key.into(), value.into());
            }
        }
        table.insert("config".into(), toml::Value::Table(self.config.clone().into_iter().collect()));
        table.insert("family_overflow".into(), toml::Value::try_from(&self.family_overflow)?);
        Ok(table)
    }

    /// The defaults with this section's overrides applied; unknown keys are errors.
    fn resolve_limits(&mut self, defaults: PluginLimits) -> anyhow::Result<()> {
        let mut table = toml::Table::try_from(defaults)?;
        table.extend(std::mem::take(&mut self.overrides));
        self.limits = table.try_into().map_err(|e: toml::de::Error| anyhow::anyhow!("{}", sanitize(e.message().trim(), 200)))?;
        Ok(())
    }
}

/// A name an operator gives (plugin, tenant): shown in labels and logs, so kept plain.
fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        bail!("{what} name {name:?} is not allowed: use 1 to 64 of A-Z a-z 0-9 - _ .");
    }
    Ok(())
}

impl Config {
    /// Parses and validates; errors name the offending key, or the line and column
    /// with a short excerpt.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut config: Self = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        let defaults = config.plugin_defaults;
        defaults.check().context("plugin_defaults")?;
        for plugin in &mut config.plugins {
            let name = sanitize(&plugin.name, 64);
            plugin.resolve_limits(defaults).with_context(|| format!("plugin {name:?}"))?;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        match path {
            None => Self::parse(DEFAULT_CONFIG).context("the embedded default config"),
            Some(path) => {
                let bytes = read_regular_file(path, MAX_CONFIG_BYTES).context("cannot read the config")?;
                if bytes.len() > MAX_CONFIG_BYTES {
                    bail!("config {} is larger than {MAX_CONFIG_BYTES} bytes", path.display());
                }
                let text =
                    String::from_utf8(bytes).map_err(|e| anyhow::anyhow!("config {} is not UTF-8 (byte {})", path.display(), e.utf8_error().valid_up_to()))?;
                Self::parse(&text).with_context(|| format!("invalid config {}", path.display()))
            }
        }
    }

    /// `wasmtap check-config`: everything `load` checks, and that each plugin's
    /// component is there (a bundled name, or a regular file within `component_bytes`
    /// that starts like a component), without compiling or loading anything.
    pub fn check(path: &Path) -> anyhow::Result<String> {
        let config = Self::load(Some(path))?;
        crate::server::web::Web::load(config.server.web_config.as_deref())?;
        for plugin in &config.plugins {
            plugin.check_source().with_context(|| format!("plugin {:?}", plugin.name))?;
        }
        Ok(format!("{}: valid, {} plugin(s), {} tenant(s)", path.display(), config.plugins.len(), config.tenants.len()))
    }

    /// A plugin section given at run time (admin API): TOML with the keys of a
    /// `[[plugin]]` section. With `base` (the running plugin's), only the keys given
    /// change (not `name`); `bundled` or `path` replaces both.
    pub fn plugin(&self, text: &str, base: Option<&PluginConfig>) -> anyhow::Result<PluginConfig> {
        let changes: toml::Table = toml::from_str(text).map_err(|e| toml_error(text, &e)).context("not a TOML plugin section")?;
        if base.is_some() && changes.contains_key("name") {
            bail!("a replace keeps the plugin's name; `name` cannot change");
        }
        let mut table = base.map(PluginConfig::to_table).transpose()?.unwrap_or_default();
        if changes.contains_key("bundled") || changes.contains_key("path") {
            table.remove("bundled");
            table.remove("path");
        }
        table.extend(changes);
        let mut plugin: PluginConfig = table.try_into().map_err(|e: toml::de::Error| anyhow::anyhow!("{}", sanitize(e.message().trim(), 200)))?;
        let name = sanitize(&plugin.name, 64);
        plugin.resolve_limits(self.plugin_defaults).with_context(|| format!("plugin {name:?}"))?;
        self.validate_plugin(&plugin)?;
        Ok(plugin)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.logs.check()?;
        let p = &self.probes;
        within("probes.drain_interval_ms", p.drain_interval_ms, 1..=1000)?;
        if !p.ring_buffer_bytes.is_power_of_two() || !(4096..=1 << 30).contains(&p.ring_buffer_bytes) {
            bail!("probes.ring_buffer_bytes must be a power of two within 4096..=1073741824, got {}", p.ring_buffer_bytes);
        }
        within("probes.wakeup_percent", p.wakeup_percent, 1..=100)?;
        let w = &self.server;
        within("server.max_connections", w.max_connections, 1..=65_536)?;
        within("server.max_requests", w.max_requests, 1..=1024)?;
        within("server.header_timeout_ms", w.header_timeout_ms, 100..=600_000)?;
        within("server.connection_max_ms", w.connection_max_ms, 1000..=86_400_000)?;
        within("cache_max_bytes", self.cache_max_bytes, 1 << 20..=1 << 40)?;
        crate::privileges::parse(&self.capabilities_keep).context("capabilities_keep")?;
        for (key, path) in [("cache_dir", &self.cache_dir), ("admin_socket", &self.admin_socket), ("server.web_config", &self.server.web_config)] {
            if let Some(path) = path
                && (!path.is_absolute() || path.as_os_str().len() > 100)
            {
                bail!("{key} must be an absolute path of at most 100 bytes, got {}", sanitize(&path.display().to_string(), 64));
            }
        }
        // Namespaces, each with who owns it: no two may clash (see `MetricSink::claim`),
        // or one plugin's samples could be counted as another's. Each check looks up
        // its `_`-prefixes and the names it prefixes, so a long config stays fast.
        let mut owners: BTreeMap<String, String> = BTreeMap::new();
        let mut own = |namespace: String, owner: String, parent: Option<&str>| -> anyhow::Result<()> {
            check_namespace(&namespace).map_err(|e| anyhow::anyhow!("{owner}: {e}"))?;
            let prefixes = namespace.match_indices('_').map(|(i, _)| &namespace[..i]).chain([namespace.as_str()]);
            let below = owners.range(format!("{namespace}_")..format!("{namespace}`")).map(|(_, o)| o);
            if let Some(other) = prefixes.filter_map(|p| owners.get(p)).chain(below).find(|o| Some(o.as_str()) != parent) {
                bail!("{owner} and {other} would own clashing metric namespaces ({namespace:?}): set `namespace` for one of them");
            }
            owners.insert(namespace, owner);
            Ok(())
        };
        if self.plugins.len() > MAX_PLUGINS || self.tenants.len() > MAX_TENANTS {
            bail!("at most {MAX_PLUGINS} plugins and {MAX_TENANTS} tenants, got {} and {}", self.plugins.len(), self.tenants.len());
        }
        let mut names = HashSet::new();
        for tenant in &self.tenants {
            check_name("tenant", &tenant.name)?;
            if !names.insert(&tenant.name) {
                bail!("tenant name {:?} is used twice", tenant.name);
            }
            if tenant.cgroup.components().any(|c| matches!(c, std::path::Component::ParentDir)) || tenant.cgroup.as_os_str().len() > 4096 {
                bail!("tenant {:?}: cgroup may not contain `..`", tenant.name);
            }
            tenant.quota.check().with_context(|| format!("tenant {:?}: quota", tenant.name))?;
            own(tenant.namespace(), format!("tenant {:?}", tenant.name), None)?;
        }
        let mut names = HashSet::new();
        for plugin in &self.plugins {
            if !names.insert(&plugin.name) {
                bail!("plugin name {:?} is used twice", plugin.name);
            }
            self.validate_plugin(plugin)?;
            let tenant = plugin.tenant.as_ref().and_then(|t| self.tenants.iter().find(|x| &x.name == t));
            let parent = tenant.map(|t| format!("tenant {:?}", t.name));
            own(plugin.namespace_within(tenant.map(TenantConfig::namespace).as_deref()), format!("plugin {:?}", plugin.name), parent.as_deref())?;
        }
        Ok(())
    }

    fn validate_plugin(&self, plugin: &PluginConfig) -> anyhow::Result<()> {
        check_name("plugin", &plugin.name)?;
        if plugin.bundled.is_some() == plugin.path.is_some() {
            bail!("plugin {:?}: set exactly one of `bundled` or `path`", plugin.name);
        }
        if let Some(tenant) = &plugin.tenant
            && !self.tenants.iter().any(|t| &t.name == tenant)
        {
            bail!("plugin {:?}: no [[tenant]] named {:?}", plugin.name, sanitize(tenant, 64));
        }
        if let Some(namespace) = &plugin.namespace {
            check_namespace(namespace).map_err(|e| anyhow::anyhow!("plugin {:?}: {e}", plugin.name))?;
        }
        plugin.limits.check().with_context(|| format!("plugin {:?}", plugin.name))?;
        if plugin.family_overflow.len() > plugin.limits.families {
            bail!("plugin {:?}: family_overflow names more families than `families` allows", plugin.name);
        }
        Ok(())
    }
}

impl TenantConfig {
    /// Its namespace: the one set, or its name's.
    pub fn namespace(&self) -> String {
        self.namespace.clone().unwrap_or_else(|| namespace_for(&self.name))
    }
}

impl TenantQuota {
    fn check(&self) -> anyhow::Result<()> {
        within("memory_bytes", self.memory_bytes, 64 << 10..=256 << 30)?;
        within("series", self.series, 1..=10_000_000)?;
        within("metric_bytes", self.metric_bytes, 4096..=16 << 30)?;
        within("log_bytes_per_second", self.log_bytes_per_second, 0..=1 << 30)?;
        within("cpu_percent", self.cpu_percent, 1..=100 * 1024)?;
        within("cpu_period_ms", self.cpu_period_ms, 1..=60_000)
    }
}

impl PluginConfig {
    /// The component is there: a bundled name, or a regular file within
    /// `component_bytes` that starts with the component header.
    fn check_source(&self) -> anyhow::Result<()> {
        if let Some(name) = &self.bundled
            && crate::plugins::bundled::get(name).is_none()
        {
            bail!("no bundled plugin {:?}; bundled: {}", sanitize(name, 64), crate::plugins::bundled::names().collect::<Vec<_>>().join(", "));
        }
        if let Some(path) = &self.path {
            let head = read_regular_file(path, 8)?;
            // `\0asm`, then the component layer's version (0x0d, 0x00) and layer (0x01, 0x00).
            if head.len() < 8 || head[..4] != *b"\0asm" || head[6..8] != [1, 0] {
                bail!("{} is not a WebAssembly component (a core module, or not Wasm at all?)", path.display());
            }
            let size = std::fs::metadata(path)?.len();
            if size > self.limits.component_bytes as u64 {
                bail!("{} has {size} bytes; the limit is {} (component_bytes)", path.display(), self.limits.component_bytes);
            }
        }
        Ok(())
    }
}

/// A TOML error as one line: position, message and a short excerpt (never a whole
/// line, which may be megabytes long).
fn toml_error(text: &str, e: &toml::de::Error) -> anyhow::Error {
    let message = sanitize(e.message().trim(), 200);
    let Some(span) = e.span() else { return anyhow::anyhow!("{message}") };
    // (toml's spans are char boundaries; `get` keeps a wrong one from panicking)
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    let excerpt: String = text.get(start..).unwrap_or_default().chars().take_while(|c| *c != '\n').take(40).collect();
    let at = if excerpt.trim().is_empty() { String::new() } else { format!(" (at `{}`)", sanitize(&excerpt, 80)) };
    anyhow::anyhow!("line {line}, column {column}: {message}{at}")
}

/// Reads at most `max` bytes and one more of a regular file (a FIFO, device or
/// directory is refused at once, never read or waited on).
pub fn read_regular_file(path: &Path, max: usize) -> anyhow::Result<Vec<u8>> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    // Non-blocking, so that a FIFO at the path cannot hold the open.
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(nix::libc::O_NONBLOCK).open(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        bail!("{} is not a regular file", path.display());
    }
    let mut bytes = Vec::new();
    file.take(max as u64 + 1).read_to_end(&mut bytes).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_loads_the_bundled_plugins() {
        let c = Config::load(None).unwrap();
        let bundled: Vec<_> = c.plugins.iter().map(|p| p.bundled.as_deref()).collect();
        assert_eq!(bundled, [Some("syscall-latency"), Some("process-churn"), Some("cpu-throttle"), Some("tcp-per-cgroup")]);
        assert_eq!(c.probes.drain_interval_ms, 10);
        // default.toml documents every limit with its default value.
        assert_eq!(c.plugin_defaults, PluginLimits::default());
        assert_eq!(c.plugins[0].limits, PluginLimits::default());
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let err = |t: &str| format!("{:#}", Config::parse(t).unwrap_err());
        assert!(err("lisen = 1").contains("unknown field `lisen`"));
        assert!(err("[probes]\nring_buffer_bytes = 1000").contains("power of two"));
        assert!(err("[[plugin]]\nname = \"a\"").contains("exactly one of"));
        assert!(err("[[plugin]]\nname=\"a\"\nbundled=\"x\"\n[[plugin]]\nname=\"a\"\nbundled=\"x\"").contains("used twice"));
        assert!(err("[[plugin]]\nname=\"a\\u0000b\"\nbundled=\"x\"").contains("is not allowed"));
        assert!(err("[[plugin]]\nname=\"\"\nbundled=\"x\"").contains("is not allowed"));
        assert!(err("[[plugin]]\nname=\"a\"\nbundled=\"x\"\nmemory_byte=1").contains("unknown field `memory_byte`"));
        assert!(err("[[plugin]]\nname=\"a\"\nbundled=\"x\"\ntenant=\"t\"").contains("no [[tenant]]"));
    }

    #[test]
    fn bad_log_outputs_say_what_is_wrong() {
        let err = |t: &str| format!("{:#}", Config::parse(t).unwrap_err());
        let output = |body: &str| format!("[[logs.output]]\n{body}");
        assert!(err(&output("kind = \"syslog\"")).contains("needs `address`"));
        assert!(err(&output("kind = \"loki\"\nurl = \"https://x/loki/api/v1/push\"")).contains("https is not supported"));
        assert!(err(&output("kind = \"otlp\"\nurl = \"http://x/v1/logs\"\npath = \"/tmp/x\"")).contains("`path` does not apply"));
        assert!(err(&output("kind = \"json-lines\"\npath = \"rel\"")).contains("must be absolute"));
        assert!(err(&output("kind = \"syslog\"\naddress = \"h:1\"\nfacility = \"kern\"")).contains("unknown syslog facility"));
        assert!(err(&output("kind = \"syslog\"\naddress = \"h:1\"\nsd_id = \"nope\"")).contains("name@enterprise-number"));
        assert!(err(&output("kind = \"loki\"\nurl = \"http://x/\"\nlabels = { \"a-b\" = \"c\" }")).contains("not a Loki label name"));
        assert!(err(&output("kind = \"kafka\"")).contains("unknown variant `kafka`"));
        assert!(
            err(&format!("{}\n{}", output("kind = \"json-lines\"\npath = \"-\""), output("kind = \"json-lines\"\npath = \"/x\"")))
                .contains("give each its own `name`")
        );
        let c = Config::parse(&output("kind = \"otlp\"\nurl = \"http://collector:4318/v1/logs\"")).unwrap();
        assert_eq!((c.logs.outputs[0].buffer_records, c.logs.outputs[0].min_level), (10_000, crate::sinks::logs::Level::Info));
    }

    #[test]
    fn plugin_config_keeps_its_toml_types() {
        let c = Config::parse(
            "[plugin_defaults]\nseries = 7\n[[plugin]]\nname=\"a\"\nbundled=\"x\"\nhelp_bytes = 9\nconfig = { pids = [1, 2], mode = \"fast\", n = 3 }",
        )
        .unwrap();
        assert_eq!((c.plugins[0].limits.series, c.plugins[0].limits.help_bytes, c.plugins[0].limits.buckets), (7, 9, 64));
        use ConfigNode::*;
        assert_eq!(
            c.plugins[0].config_tree(),
            vec![
                Table(vec![("mode".into(), 1), ("n".into(), 2), ("pids".into(), 3)]),
                String("fast".into()),
                Integer(3),
                Array(vec![4, 5]),
                Integer(1),
                Integer(2),
            ]
        );
    }
}
