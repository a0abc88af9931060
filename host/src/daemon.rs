//! `wasmtap run`: serves first (liveness answers while plugins compile), then wires
//! plugins → probes → reader, and shuts them down in order on SIGINT/SIGTERM.

use std::{sync::Arc, thread::JoinHandle, time::Duration};

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{
    budget::TenantBudget,
    config::{Config, TenantConfig},
    events::{CgroupScope, EventFilter, Reader, Router, Subscriber},
    plugins::{self, PluginEngine, PluginHandle, engine::Compiler},
    probes::{SyscallProbe, syscalls::Attach},
    server::{self, AppState, status::ProbeStatus},
    sinks::{MetricSink, SelfMetrics, metrics::namespace_for},
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
    let state = Arc::new(AppState::new(registry));
    let stop_server = CancellationToken::new();
    let server = tokio::spawn(server::serve(listener, state.clone(), stop_server.clone()));
    tracing::info!(listen = %config.listen, "serving /metrics, /healthz, /readyz, /status");

    // Plugins first: their manifests decide what the probes record. Compiling and
    // calling into plugins blocks, so it runs off the async workers.
    let handles = {
        let (config, sink, metrics, state) = (config.clone(), sink.clone(), self_metrics.clone(), state.clone());
        tokio::task::spawn_blocking(move || start_plugins(&config, &sink, &metrics, &state)).await??
    };
    let router = Arc::new(Router::new(handles.iter().map(|h| h.subscriber.clone()).collect()));
    let stop_reader = CancellationToken::new();
    let probe = start_syscall_probe(&config, &router, &self_metrics, &stop_reader, &state)?;
    state.report.write().expect("report").starting = false;
    tracing::info!("ready");

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
    }

    // Detach the probes, drain what they wrote, let plugins finish their queues (each
    // within its shutdown time, all at once) and flush, then stop serving.
    if let Some((probe, reader)) = probe {
        drop(probe);
        stop_reader.cancel();
        let _ = tokio::task::spawn_blocking(move || reader.join()).await;
    }
    handles.iter().for_each(PluginHandle::begin_shutdown);
    router.set(Vec::new());
    drop(router);
    tokio::task::spawn_blocking(move || handles.into_iter().for_each(PluginHandle::join)).await?;
    stop_server.cancel();
    let _ = server.await;
    tracing::info!("stopped");
    Ok(())
}

/// Opens each tenant's scope and claims its namespace (its own: no plugin outside it may
/// nest there). A tenant whose scope or namespace is unusable is reported, and its
/// plugins are not started.
fn open_tenants(tenants: &[TenantConfig], sink: &MetricSink) -> Vec<(String, anyhow::Result<Arc<TenantBudget>>)> {
    tenants
        .iter()
        .map(|t| {
            let tenant = CgroupScope::open(&t.cgroup)
                .with_context(|| format!("tenant {}: cgroup {}", t.name, t.cgroup.display()))
                .and_then(|scope| {
                    let namespace = t.namespace.clone().unwrap_or_else(|| namespace_for(&t.name));
                    let tenant = Arc::new(TenantBudget::new(&t.name, namespace, Arc::new(scope), &t.quota));
                    sink.claim(&tenant.namespace, &tenant.owner(), None).map_err(|e| anyhow::anyhow!("tenant {}: {e}", t.name))?;
                    tracing::info!(tenant = %t.name, scope = %tenant.scope.dir().display(), "tenant scope");
                    Ok(tenant)
                });
            if let Err(e) = &tenant {
                tracing::error!("{e:#}");
            }
            (t.name.clone(), tenant)
        })
        .collect()
}

/// Starts every configured plugin; one that fails is reported and skipped.
fn start_plugins(config: &Config, sink: &Arc<MetricSink>, metrics: &SelfMetrics, state: &AppState) -> anyhow::Result<Vec<PluginHandle>> {
    let cache_dir = config.cache_dir.clone().or_else(plugins::engine::default_cache_dir);
    let exe = std::env::current_exe().context("locating wasmtap's own executable (it compiles plugins in a child process)")?;
    let engine = Arc::new(PluginEngine::new(cache_dir, Compiler::Child(exe))?);
    let tenants = open_tenants(&config.tenants, sink);
    let mut handles = Vec::new();
    for plugin in &config.plugins {
        let tenant = match &plugin.tenant {
            None => Ok(None),
            Some(name) => match tenants.iter().find(|(n, _)| n == name).map(|(_, t)| t) {
                Some(Ok(t)) => Ok(Some(t.clone())),
                Some(Err(e)) => Err(anyhow::anyhow!("{e:#}")),
                None => Err(anyhow::anyhow!("no tenant {name:?}")),
            },
        };
        match tenant.and_then(|tenant| plugins::start(&engine, plugin, tenant, sink, metrics)) {
            Ok(handle) => {
                tracing::info!(plugin = %plugin.name, filters = handle.subscriber.filters.len(), "plugin started");
                state.report.write().expect("report").plugins.push(handle.status.clone());
                handles.push(handle);
            }
            Err(e) => {
                let error = crate::sinks::logs::sanitize(&format!("{e:#}"), plugins::instance::MAX_ERROR_BYTES);
                tracing::error!("plugin {:?} not started: {error}", plugin.name);
                state.report.write().expect("report").failed_plugins.push((plugin.name.clone(), error));
            }
        }
    }
    Ok(handles)
}

/// What the kernel must record for one subscriber's filter: a tenant's plugin records
/// its tenant's scope (the kernel matches a cgroup and every cgroup below it), whatever
/// cgroups it names; the host narrows to those. (Checking each named id against the
/// scope here could wait for a subtree walk per unknown id at start-up.)
fn kernel_filters(sub: &Subscriber) -> impl Iterator<Item = EventFilter> + '_ {
    sub.filters.iter().map(|f| match &sub.scope {
        Some(scope) => EventFilter { cgroups: [scope.root_id()].into(), ..f.clone() },
        None => f.clone(),
    })
}

/// Attaches the syscall probe with the union of the plugins' filters and starts its
/// reader; `None` when nobody subscribed or the probe could not attach (reported).
fn start_syscall_probe(
    config: &Config,
    router: &Arc<Router>,
    metrics: &SelfMetrics,
    stop: &CancellationToken,
    state: &AppState,
) -> anyhow::Result<Option<(SyscallProbe, JoinHandle<()>)>> {
    let subscribers = router.subscribers();
    let filters: Vec<EventFilter> = subscribers.iter().flat_map(|s| kernel_filters(s)).collect();
    let Some(filter) = EventFilter::union(&filters) else {
        tracing::warn!("no plugin subscribed to syscall events; the syscall probe stays detached");
        return Ok(None);
    };
    let (probe, stream) = match SyscallProbe::start(&config.probes, &filter) {
        Ok(started) => started,
        Err(e) => {
            tracing::error!("syscall probe not attached: {e:#}");
            state.report.write().expect("report").probe_errors.push(("syscalls", format!("{e:#}")));
            return Ok(None);
        }
    };
    tracing::info!(attach = ?probe.attach_kind(), widened = ?probe.widened(), "syscall probe attached");
    state.report.write().expect("report").probes.push(ProbeStatus {
        name: "syscalls",
        attach: match probe.attach_kind() {
            Attach::BtfTracepoint => "tp_btf",
            Attach::Tracepoint => "tracepoint",
        },
        program_ids: probe.program_ids(),
        widened: probe.widened(),
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
