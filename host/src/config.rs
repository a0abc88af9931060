//! Daemon configuration: TOML, with an embedded default (`host/default.toml`).

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

/// The configuration used when `--config` is not given.
pub const DEFAULT_CONFIG: &str = include_str!("../default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub probes: ProbeSettings,
    #[serde(default)]
    pub plugin_defaults: PluginLimits,
    /// Where precompiled plugin components are cached; defaults to
    /// `/var/cache/wasmtap` for root, `$XDG_CACHE_HOME/wasmtap` otherwise.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// The admin API's Unix socket; defaults to `/run/wasmtap/admin.sock` for root,
    /// `$XDG_RUNTIME_DIR/wasmtap/admin.sock` (or `/tmp/wasmtap-UID/admin.sock`) otherwise.
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
    #[serde(default, rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<TenantConfig>,
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

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9568))
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

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory_bytes: 64 << 20,
            call_deadline_ms: 500,
            queue_batches: 128,
            metric_bytes: 8 << 20,
            series: 10_000,
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
        Self {
            memory_bytes: 256 << 20,
            series: 20_000,
            metric_bytes: 16 << 20,
            log_bytes_per_second: 32 << 10,
            cpu_percent: 50,
            cpu_period_ms: 1_000,
        }
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
        Ok(table)
    }

    /// The defaults with this section's overrides applied; unknown keys are errors.
    fn resolve_limits(&mut self, defaults: PluginLimits) -> anyhow::Result<()> {
        let mut table = toml::Table::try_from(defaults)?;
        table.extend(std::mem::take(&mut self.overrides));
        self.limits = table.try_into()?;
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
    /// Parses and validates; errors name the offending key.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut config: Self = toml::from_str(text)?;
        let defaults = config.plugin_defaults;
        for plugin in &mut config.plugins {
            let name = plugin.name.clone();
            plugin.resolve_limits(defaults).with_context(|| format!("plugin {name:?}"))?;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Self> {
        match path {
            None => Self::parse(DEFAULT_CONFIG).context("the embedded default config"),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config {}", path.display()))?;
                Self::parse(&text).with_context(|| format!("invalid config {}", path.display()))
            }
        }
    }

    /// A plugin section given at run time (admin API): TOML with the keys of a
    /// `[[plugin]]` section. With `base` (the running plugin's), only the keys given
    /// change (not `name`); `bundled` or `path` replaces both.
    pub fn plugin(&self, text: &str, base: Option<&PluginConfig>) -> anyhow::Result<PluginConfig> {
        let changes: toml::Table = toml::from_str(text).context("not a TOML plugin section")?;
        if base.is_some() && changes.contains_key("name") {
            bail!("a replace keeps the plugin's name; `name` cannot change");
        }
        let mut table = base.map(PluginConfig::to_table).transpose()?.unwrap_or_default();
        if changes.contains_key("bundled") || changes.contains_key("path") {
            table.remove("bundled");
            table.remove("path");
        }
        table.extend(changes);
        let mut plugin: PluginConfig = table.try_into()?;
        let name = plugin.name.clone();
        plugin.resolve_limits(self.plugin_defaults).with_context(|| format!("plugin {name:?}"))?;
        self.validate_plugin(&plugin)?;
        Ok(plugin)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let p = &self.probes;
        if !(1..=1000).contains(&p.drain_interval_ms) {
            bail!("probes.drain_interval_ms must be within 1..=1000, got {}", p.drain_interval_ms);
        }
        if !p.ring_buffer_bytes.is_power_of_two() || p.ring_buffer_bytes < 4096 {
            bail!("probes.ring_buffer_bytes must be a power of two of at least 4096, got {}", p.ring_buffer_bytes);
        }
        if !(1..=100).contains(&p.wakeup_percent) {
            bail!("probes.wakeup_percent must be within 1..=100, got {}", p.wakeup_percent);
        }
        let mut tenants = HashSet::new();
        for tenant in &self.tenants {
            check_name("tenant", &tenant.name)?;
            if !tenants.insert(tenant.name.as_str()) {
                bail!("tenant name {:?} is used twice", tenant.name);
            }
            let q = &tenant.quota;
            if !(1..=60_000).contains(&q.cpu_period_ms) || !(1..=100 * 1024).contains(&q.cpu_percent) {
                bail!("tenant {:?}: quota.cpu_period_ms must be within 1..=60000 and quota.cpu_percent within 1..=102400", tenant.name);
            }
        }
        let mut seen = HashSet::new();
        for plugin in &self.plugins {
            if !seen.insert(&plugin.name) {
                bail!("plugin name {:?} is used twice", plugin.name);
            }
            self.validate_plugin(plugin)?;
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
            bail!("plugin {:?}: no [[tenant]] named {tenant:?}", plugin.name);
        }
        let l = &plugin.limits;
        if l.queue_batches == 0 || l.call_deadline_ms == 0 || l.memory_bytes < 65536 || l.shutdown_ms == 0 || l.max_faults == 0 {
            bail!("plugin {:?}: queue_batches, call_deadline_ms, shutdown_ms and max_faults must be > 0, memory_bytes >= 65536", plugin.name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_loads_the_bundled_plugins() {
        let c = Config::load(None).unwrap();
        let bundled: Vec<_> = c.plugins.iter().map(|p| p.bundled.as_deref()).collect();
        assert_eq!(bundled, [Some("syscall-latency"), Some("process-churn")]);
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
    fn plugin_config_keeps_its_toml_types() {
        let c = Config::parse("[plugin_defaults]\nseries = 7\n[[plugin]]\nname=\"a\"\nbundled=\"x\"\nhelp_bytes = 9\nconfig = { pids = [1, 2], mode = \"fast\", n = 3 }").unwrap();
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
