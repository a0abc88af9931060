//! What `/readyz` and `/status` report: each probe and plugin, and what failed. The
//! report is live: start-up fills it in, and each plugin's worker updates its entry.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::json;

use crate::plugins::PluginStatus;

/// An attached probe, as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeStatus {
    pub name: &'static str,
    /// How it is attached, e.g. "tp_btf".
    pub attach: &'static str,
    /// Kernel ids of its loaded programs.
    pub program_ids: Vec<u32>,
    /// Filter dimensions the kernel does not narrow because the plugins' union did not
    /// fit its map (the host still routes each record exactly).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub widened: Vec<&'static str>,
}

#[derive(Debug)]
pub struct Report {
    /// Until start-up (plugins and probes) is done.
    pub starting: bool,
    pub probes: Vec<ProbeStatus>,
    /// (probe, error) for probes that could not be attached.
    pub probe_errors: Vec<(&'static str, String)>,
    /// Live status of each started plugin (its worker updates it).
    pub plugins: Vec<Arc<Mutex<PluginStatus>>>,
    /// (plugin, error) for plugins that could not be started.
    pub failed_plugins: Vec<(String, String)>,
}

impl Default for Report {
    fn default() -> Self {
        Self { starting: true, probes: Vec::new(), probe_errors: Vec::new(), plugins: Vec::new(), failed_plugins: Vec::new() }
    }
}

impl Report {
    /// Problems of the daemon itself (start-up not done, a probe that is not attached):
    /// what makes it not ready. Empty when ready.
    pub fn not_ready(&self) -> Vec<String> {
        let mut problems: Vec<String> = self.probe_errors.iter().map(|(name, e)| format!("probe {name}: {e}")).collect();
        if self.starting {
            problems.push("starting: plugins are being loaded".into());
        }
        problems
    }

    /// One line per plugin that is not running.
    pub fn plugin_problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self.failed_plugins.iter().map(|(name, e)| format!("plugin {name}: failed: {e}")).collect();
        for status in &self.plugins {
            let s = status.lock().expect("status lock");
            if s.state != "running" {
                problems.push(format!("plugin {}: {}", s.name, s.state));
            }
        }
        problems
    }

    /// The `/status` document.
    pub fn to_json(&self) -> serde_json::Value {
        let mut plugins: Vec<_> = self.plugins.iter().map(|s| json!(*s.lock().expect("status lock"))).collect();
        plugins.extend(self.failed_plugins.iter().map(|(name, e)| json!({ "name": name, "state": "failed", "last_error": e })));
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "ready": self.not_ready().is_empty(),
            "probes": self.probes,
            "probe_errors": self.probe_errors.iter().map(|(name, e)| json!({ "name": name, "error": e })).collect::<Vec<_>>(),
            "plugins": plugins,
        })
    }
}
