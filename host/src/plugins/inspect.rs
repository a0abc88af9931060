//! `wasmtap plugin check FILE.wasm`: validates a component offline, as the daemon
//! would load it, and says what it found: size against `component_bytes`, the WIT
//! version it was built against, each import (allowed, with what in a plugin's source
//! pulls it in and what it does here, or refused, with the std feature behind it), and,
//! in a dry run of `init` with the given config, the kinds it subscribes to, its tick and
//! the metric families it declares.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use prometheus_client::{encoding::prometheus_text, registry::Registry};
use wasmtime::component::types::ComponentItem;

use super::{HostServices, PluginEngine, engine::Compiler, instance::instantiate, registry::hash, wasi::ALLOWED};
use crate::{
    config::{Config, PluginLimits},
    enrich::Enricher,
    recording::wit_version,
    sinks::{MetricSink, SelfMetrics, logs::LogOutputs},
};

/// What a plugin's source does to import a WASI interface, and what the host gives it.
const IMPORT_CAUSES: &[(&str, &str)] = &[
    ("wasi:cli/stdout", "println!/print! (Python: print): each line becomes an info log record, under log_bytes_per_second"),
    ("wasi:cli/stderr", "eprintln!, a panic's message (Python: tracebacks): each line becomes a warn log record"),
    ("wasi:cli/stdin", "std::io::stdin: always at its end"),
    ("wasi:cli/environment", "std::env::var/args (and std's start-up): an empty environment and no arguments"),
    ("wasi:cli/exit", "std::process::exit: ends the call like a trap"),
    ("wasi:cli/terminal-", "std's terminal checks: never a terminal"),
    ("wasi:random/", "HashMap::new() (its random hash seed), rand: host randomness, at most 64 KiB per call"),
    ("wasi:clocks/", "Instant, SystemTime: the host's clocks (a sleep returns at once: a call cannot block)"),
    ("wasi:io/", "the streams and polls behind stdout/stderr and the clocks"),
    ("wasmtap:plugin/", "the wasmtap contract"),
];

/// What pulls in an interface plugins do not get.
const REFUSED_CAUSES: &[(&str, &str)] = &[
    ("wasi:filesystem/", "std::fs (File::open, read_to_string, create_dir, …) or std::env::current_dir: plugins get no filesystem"),
    ("wasi:sockets/", "std::net (TcpStream, UdpSocket, ToSocketAddrs): plugins get no network"),
    ("wasi:http/", "an HTTP client: plugins get no network"),
];

/// The report, and whether the component would load and initialise.
pub fn check(path: &Path, config_lines: &[String]) -> anyhow::Result<(String, bool)> {
    let mut out = String::new();
    let mut ok = true;
    let limits = PluginLimits::default();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    out.push_str(&format!("{}\n", path.display()));
    let size = format!("{:.1} KiB", bytes.len() as f64 / 1024.0);
    if bytes.len() > limits.component_bytes {
        problem(&mut out, &mut ok, format!("size {size}: over the default component_bytes ({} bytes); raise it for this plugin", limits.component_bytes));
    } else {
        out.push_str(&format!("  size {size} (component_bytes: {} bytes)\n", limits.component_bytes));
    }
    let engine = PluginEngine::new(None, Compiler::InProcess)?;
    let started = std::time::Instant::now();
    let component = match engine.compile(&bytes, &hash(&bytes), &limits) {
        Ok(component) => component,
        Err(e) => {
            problem(&mut out, &mut ok, format!("not loadable: {e}"));
            return Ok((out, false));
        }
    };
    out.push_str(&format!("  compiled in {} ms\n", started.elapsed().as_millis()));

    // The WIT contract it was built against.
    let host = wit_version();
    let ty = component.component_type();
    let built = ty.exports(engine.engine()).find_map(|(name, _)| name.strip_prefix("wasmtap:plugin/handler@").map(str::to_owned));
    match built {
        None => problem(&mut out, &mut ok, "exports no wasmtap:plugin/handler: not a wasmtap plugin (build it with wasmtap-sdk's export_plugin!)".into()),
        Some(version) if compatible(&version, host) => out.push_str(&format!("  WIT wasmtap:plugin@{version}: this host offers {host}, compatible\n")),
        Some(version) => problem(&mut out, &mut ok, format!("WIT wasmtap:plugin@{version}: this host offers {host}; rebuild against wasmtap-sdk for {host}")),
    }

    out.push_str("  imports:\n");
    for (name, item) in ty.imports(engine.engine()) {
        let base = name.split('@').next().unwrap_or(name);
        let instance = matches!(item.ty, ComponentItem::ComponentInstance(_));
        let allowed = instance && (ALLOWED.contains(&base) || base.starts_with("wasmtap:plugin/"));
        if allowed {
            let cause = IMPORT_CAUSES.iter().find(|(prefix, _)| base.starts_with(prefix)).map_or("", |(_, c)| c);
            out.push_str(&format!("    ok      {name}: {cause}\n"));
        } else {
            let cause = REFUSED_CAUSES.iter().find(|(prefix, _)| base.starts_with(prefix)).map_or("not offered to plugins", |(_, c)| c);
            problem(&mut out, &mut ok, format!("refused import {name}: pulled in by {cause}; the daemon refuses to load the component"));
        }
    }
    if !ok {
        return Ok((out, false));
    }

    // A dry run of init, with the daemon's budgets, on a host of its own.
    let name = path.file_stem().map_or("plugin".into(), |s| s.to_string_lossy().replace('_', "-"));
    let section = crate::cli::section(Some(&name), Some(path.to_path_buf()), None, config_lines);
    let plugin = Config::parse("")?.plugin(&section, None)?;
    let sink = Arc::new(MetricSink::default());
    let services = HostServices {
        engine: Arc::new(engine),
        sink: sink.clone(),
        metrics: SelfMetrics::default(),
        enricher: Arc::new(Enricher::new()),
        logs: LogOutputs::stderr_json("check"),
        recorder: None,
    };
    let started = std::time::Instant::now();
    let initialised = super::prepare(&services, &plugin, None, None).and_then(|spec| {
        let (instance, manifest) = instantiate(&spec)?;
        let subscriptions = super::worker::subscriptions(&manifest, &spec.budget)?;
        Ok((manifest, subscriptions, instance.memory_bytes()))
    });
    match initialised {
        Err(e) => problem(&mut out, &mut ok, format!("init (dry run, config {config_lines:?}): {e:#}")),
        Ok((manifest, subscriptions, memory)) => {
            out.push_str(&format!("  init (dry run) took {} ms, instance memory {} KiB\n", started.elapsed().as_millis(), memory / 1024));
            for (kind, filters) in subscriptions {
                let all = filters.iter().any(|f| f.is_all());
                out.push_str(&format!("    subscribes to {}{}\n", kind.name, if all { " (every event)" } else { " (filtered)" }));
            }
            if manifest.tick_interval_ms > 0 {
                out.push_str(&format!("    ticks every {} ms\n", manifest.tick_interval_ms));
            }
            let mut registry = Registry::default();
            registry.register_collector(Box::new(sink));
            let mut text = String::new();
            prometheus_text::encode(&mut text, &registry)?;
            for line in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
                out.push_str(&format!("    declares {line}\n"));
            }
        }
    }
    Ok((out, ok))
}

fn problem(out: &mut String, ok: &mut bool, text: String) {
    *ok = false;
    out.push_str(&format!("  PROBLEM {text}\n"));
}

/// Whether a plugin built against WIT `built` loads on a host offering `host`: the same
/// 0.x minor, and a patch no newer than the host's.
fn compatible(built: &str, host: &str) -> bool {
    let parts = |v: &str| v.split('.').map(|p| p.parse::<u32>().ok()).collect::<Option<Vec<_>>>();
    match (parts(built), parts(host)) {
        (Some(b), Some(h)) if b.len() == 3 && h.len() == 3 => b[0] == h[0] && b[1] == h[1] && b[2] <= h[2],
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wit_versions_of_the_same_minor_up_to_the_hosts_patch_are_compatible() {
        assert!(compatible("0.2.0", "0.2.6"));
        assert!(compatible("0.2.6", "0.2.6"));
        assert!(!compatible("0.2.7", "0.2.6"));
        assert!(!compatible("0.3.0", "0.2.6"));
        assert!(!compatible("x", "0.2.6"));
    }
}
