//! What `/healthz` and `/status` report: each probe and plugin, and what failed.

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
}

#[derive(Debug, Default)]
pub struct Report {
    pub probes: Vec<ProbeStatus>,
    /// (probe, error) for probes that could not be attached.
    pub probe_errors: Vec<(&'static str, String)>,
    /// Live status of each started plugin (its worker updates it).
    pub plugins: Vec<Arc<Mutex<PluginStatus>>>,
    /// (plugin, error) for plugins that could not be started.
    pub failed_plugins: Vec<(String, String)>,
}

impl Report {
    /// One line per problem; empty when everything runs.
    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self.probe_errors.iter().map(|(name, e)| format!("probe {name}: {e}")).collect();
        problems.extend(self.failed_plugins.iter().map(|(name, e)| format!("plugin {name}: {e}")));
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
            "probes": self.probes,
            "probe_errors": self.probe_errors.iter().map(|(name, e)| json!({ "name": name, "error": e })).collect::<Vec<_>>(),
            "plugins": plugins,
        })
    }
}
