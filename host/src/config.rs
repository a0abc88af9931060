//! Daemon configuration: TOML, with an embedded default (`host/default.toml`).

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf};

use anyhow::{Context as _, bail};
use serde::Deserialize;

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
    #[serde(default, rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9568))
}

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginLimits {
    /// Linear memory a plugin instance may grow to.
    pub memory_bytes: usize,
    /// Longest a single call into the plugin may run before it is interrupted.
    pub call_deadline_ms: u64,
    /// Batches that may wait for the plugin before new ones are dropped.
    pub queue_batches: usize,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self { memory_bytes: 64 << 20, call_deadline_ms: 500, queue_batches: 128 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Instance name: labels its self-metrics and log records, and (with `-` → `_`)
    /// prefixes its metric families unless `namespace` is set.
    pub name: String,
    /// A plugin built into the binary (see `wasmtap plugins`).
    #[serde(default)]
    pub bundled: Option<String>,
    /// A component file on disk.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub memory_bytes: Option<usize>,
    #[serde(default)]
    pub call_deadline_ms: Option<u64>,
    #[serde(default)]
    pub queue_batches: Option<usize>,
    /// Passed to the plugin's `init` as key/value strings (lists are comma-joined).
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
}

impl PluginConfig {
    pub fn limits(&self, defaults: PluginLimits) -> PluginLimits {
        PluginLimits {
            memory_bytes: self.memory_bytes.unwrap_or(defaults.memory_bytes),
            call_deadline_ms: self.call_deadline_ms.unwrap_or(defaults.call_deadline_ms),
            queue_batches: self.queue_batches.unwrap_or(defaults.queue_batches),
        }
    }

    /// The plugin's config as the strings `init` receives.
    pub fn init_config(&self) -> Vec<(String, String)> {
        fn text(v: &toml::Value) -> String {
            match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
                other => other.to_string(),
            }
        }
        self.config.iter().map(|(k, v)| (k.clone(), text(v))).collect()
    }
}

impl Config {
    /// Parses and validates; errors name the offending key.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let config: Self = toml::from_str(text)?;
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
        let mut seen = std::collections::HashSet::new();
        for plugin in &self.plugins {
            if !seen.insert(&plugin.name) {
                bail!("plugin name {:?} is used twice", plugin.name);
            }
            if plugin.bundled.is_some() == plugin.path.is_some() {
                bail!("plugin {:?}: set exactly one of `bundled` or `path`", plugin.name);
            }
            let limits = plugin.limits(self.plugin_defaults);
            if limits.queue_batches == 0 || limits.call_deadline_ms == 0 || limits.memory_bytes < 65536 {
                bail!("plugin {:?}: queue_batches and call_deadline_ms must be > 0, memory_bytes >= 65536", plugin.name);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_loads_the_bundled_plugin() {
        let c = Config::load(None).unwrap();
        assert_eq!(c.plugins.len(), 1);
        assert_eq!(c.plugins[0].bundled.as_deref(), Some("syscall-latency"));
        assert_eq!(c.probes.drain_interval_ms, 10);
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let err = |t: &str| format!("{:#}", Config::parse(t).unwrap_err());
        assert!(err("lisen = 1").contains("unknown field `lisen`"));
        assert!(err("[probes]\nring_buffer_bytes = 1000").contains("power of two"));
        assert!(err("[[plugin]]\nname = \"a\"").contains("exactly one of"));
        assert!(err("[[plugin]]\nname=\"a\"\nbundled=\"x\"\n[[plugin]]\nname=\"a\"\nbundled=\"x\"").contains("used twice"));
    }

    #[test]
    fn plugin_config_becomes_strings() {
        let c = Config::parse("[[plugin]]\nname=\"a\"\nbundled=\"x\"\nconfig = { pids = [1, 2], mode = \"fast\", n = 3 }").unwrap();
        assert_eq!(
            c.plugins[0].init_config(),
            vec![("mode".into(), "fast".into()), ("n".into(), "3".into()), ("pids".into(), "1,2".into())]
        );
    }
}
