//! `wasmtap run`: wires probes → reader → plugins → sinks → server, and shuts them
//! down in that order on SIGINT/SIGTERM.

use std::{sync::Arc, thread::JoinHandle, time::Duration};

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    events::{EventFilter, Reader, Router},
    plugins::{self, PluginEngine, PluginHandle},
    probes::{SyscallProbe, syscalls::Attach},
    server::{
        self, AppState,
        status::{ProbeStatus, Report},
    },
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
    let mut report = Report::default();

    // Plugins first: their manifests decide what the probes record.
    let handles = start_plugins(&config, &sink, &self_metrics, &mut report)?;
    let router = Arc::new(Router::new(handles.iter().map(|h| h.subscriber.clone()).collect()));
    let stop_reader = CancellationToken::new();
    let probe = start_syscall_probe(&config, &router, &self_metrics, &stop_reader, &mut report)?;

    let stop_server = CancellationToken::new();
    let state = Arc::new(AppState { registry, report });
    let server = tokio::spawn(server::serve(listener, state, stop_server.clone()));
    tracing::info!(listen = %config.listen, "serving /metrics, /healthz, /status");

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
    }

    // Detach the probes, drain what they wrote, let plugins finish their queues and
    // flush, then stop serving.
    if let Some((probe, reader)) = probe {
        drop(probe);
        stop_reader.cancel();
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

/// Starts every configured plugin; one that fails is reported and skipped.
fn start_plugins(config: &Config, sink: &Arc<MetricSink>, metrics: &SelfMetrics, report: &mut Report) -> anyhow::Result<Vec<PluginHandle>> {
    let cache_dir = config.cache_dir.clone().or_else(plugins::engine::default_cache_dir);
    let engine = Arc::new(PluginEngine::new(cache_dir)?);
    let mut handles = Vec::new();
    for plugin in &config.plugins {
        match plugins::start(&engine, plugin, config.plugin_defaults, sink, metrics) {
            Ok(handle) => {
                tracing::info!(plugin = %plugin.name, filters = ?handle.subscriber.filters, "plugin started");
                report.plugins.push(handle.status.clone());
                handles.push(handle);
            }
            Err(e) => {
                tracing::error!("plugin {:?} not started: {e:#}", plugin.name);
                report.failed_plugins.push((plugin.name.clone(), format!("{e:#}")));
            }
        }
    }
    Ok(handles)
}

/// Attaches the syscall probe with the union of the plugins' filters and starts its
/// reader; `None` when nobody subscribed or the probe could not attach (reported).
fn start_syscall_probe(
    config: &Config,
    router: &Arc<Router>,
    metrics: &SelfMetrics,
    stop: &CancellationToken,
    report: &mut Report,
) -> anyhow::Result<Option<(SyscallProbe, JoinHandle<()>)>> {
    let Some(filter) = EventFilter::union(router.subscribers().iter().flat_map(|s| &s.filters)) else {
        tracing::warn!("no plugin subscribed to syscall events; the syscall probe stays detached");
        return Ok(None);
    };
    let (probe, stream) = match SyscallProbe::start(&config.probes, &filter) {
        Ok(started) => started,
        Err(e) => {
            tracing::error!("syscall probe not attached: {e:#}");
            report.probe_errors.push(("syscalls", format!("{e:#}")));
            return Ok(None);
        }
    };
    tracing::info!(attach = ?probe.attach_kind(), ?filter, "syscall probe attached");
    report.probes.push(ProbeStatus {
        name: "syscalls",
        attach: match probe.attach_kind() {
            Attach::BtfTracepoint => "tp_btf",
            Attach::Tracepoint => "tracepoint",
        },
        program_ids: probe.program_ids(),
    });
    let reader = Reader {
        stream,
        router: router.clone(),
        counters: metrics.probe("syscalls"),
        interval: Duration::from_millis(config.probes.drain_interval_ms),
    }
    .spawn(stop.clone())?;
    Ok(Some((probe, reader)))
}
