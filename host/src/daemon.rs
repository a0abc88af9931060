//! `wasmtap run`: wires probes → reader → plugins → sinks → server, and shuts them
//! down in that order on SIGINT/SIGTERM.

use std::sync::Arc;

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    events::{EventFilter, Reader, Router},
    plugins::{self, PluginEngine, PluginHandle},
    probes::{SyscallProbe, syscalls::Attach},
    server::{self, AppState},
    sinks::{MetricSink, SelfMetrics},
};

pub async fn run(config: Config) -> anyhow::Result<()> {
    // Before anything can report healthy, so a SIGTERM always takes the orderly path.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| {
        format!("cannot listen on {}\n  fix: pass a free address with --listen, or set `listen` in the config", config.listen)
    })?;
    let mut registry = Registry::default();
    let self_metrics = SelfMetrics::register(&mut registry);
    let sink = Arc::new(MetricSink::default());
    registry.register_collector(Box::new(sink.clone()));

    // Plugins first: their manifests decide what the probes record.
    let cache_dir = config.cache_dir.clone().or_else(plugins::engine::default_cache_dir);
    let engine = Arc::new(PluginEngine::new(cache_dir)?);
    let mut handles: Vec<PluginHandle> = Vec::new();
    let mut failed: Vec<(String, String)> = Vec::new();
    for plugin in &config.plugins {
        match plugins::start(&engine, plugin, config.plugin_defaults, &sink, &self_metrics) {
            Ok(handle) => {
                tracing::info!(plugin = %plugin.name, filters = ?handle.subscriber.filters, "plugin started");
                handles.push(handle);
            }
            Err(e) => {
                tracing::error!("plugin {:?} not started: {e:#}", plugin.name);
                failed.push((plugin.name.clone(), format!("{e:#}")));
            }
        }
    }
    let router = Arc::new(Router::new(handles.iter().map(|h| h.subscriber.clone()).collect()));

    let stop_reader = CancellationToken::new();
    let mut probe_error = None;
    let mut probe = None;
    let mut reader = None;
    let subscribers = router.subscribers();
    match EventFilter::union(subscribers.iter().flat_map(|s| &s.filters)) {
        None => tracing::warn!("no plugin subscribed to syscall events; the syscall probe stays detached"),
        Some(filter) => match SyscallProbe::start(&config.probes, &filter) {
            Ok((p, stream)) => {
                tracing::info!(attach = ?p.attach_kind(), ?filter, "syscall probe attached");
                reader = Some(
                    Reader {
                        stream,
                        router: router.clone(),
                        counters: self_metrics.probe("syscalls"),
                        interval: std::time::Duration::from_millis(config.probes.drain_interval_ms),
                    }
                    .spawn(stop_reader.clone())?,
                );
                probe = Some(p);
            }
            Err(e) => {
                tracing::error!("syscall probe not attached: {e:#}");
                probe_error = Some(format!("{e:#}"));
            }
        },
    }
    drop(subscribers);

    let probe_status = probe.as_ref().map(|p: &SyscallProbe| {
        json!({
            "name": "syscalls",
            "attach": match p.attach_kind() { Attach::BtfTracepoint => "tp_btf", Attach::Tracepoint => "tracepoint" },
            "program_ids": p.program_ids(),
        })
    });
    let plugin_status: Vec<_> = handles.iter().map(|h| h.status.clone()).collect();
    let failed = Arc::new(failed);
    let health = {
        let (plugin_status, failed, probe_error) = (plugin_status.clone(), failed.clone(), probe_error.clone());
        move || {
            let mut problems: Vec<String> = probe_error.iter().map(|e| format!("probe syscalls: {e}")).collect();
            problems.extend(failed.iter().map(|(name, e)| format!("plugin {name}: {e}")));
            for status in &plugin_status {
                let s = status.lock().expect("status lock");
                if s.state != "running" {
                    problems.push(format!("plugin {}: {}", s.name, s.state));
                }
            }
            problems
        }
    };
    let status = {
        let failed = failed.clone();
        move || {
            let mut plugins: Vec<_> = plugin_status.iter().map(|s| json!(*s.lock().expect("status lock"))).collect();
            plugins.extend(failed.iter().map(|(name, e)| json!({ "name": name, "state": "failed", "last_error": e })));
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "probes": probe_status.iter().collect::<Vec<_>>(),
                "probe_error": probe_error,
                "plugins": plugins,
            })
        }
    };
    let state = Arc::new(AppState { registry, health: Box::new(health), status: Box::new(status) });
    let stop_server = CancellationToken::new();
    let server = tokio::spawn(server::serve(listener, state, stop_server.clone()));
    tracing::info!(listen = %config.listen, "serving /metrics, /healthz, /status");

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
    }

    // Detach the probes, drain what they wrote, let plugins finish their queues and
    // flush, then stop serving.
    drop(probe);
    stop_reader.cancel();
    if let Some(reader) = reader {
        let _ = tokio::task::spawn_blocking(move || reader.join()).await;
    }
    router.set(Vec::new());
    drop(router);
    tokio::task::spawn_blocking(move || handles.into_iter().for_each(PluginHandle::join)).await?;
    stop_server.cancel();
    let _ = server.await;
    tracing::info!("stopped");
    Ok(())
}
