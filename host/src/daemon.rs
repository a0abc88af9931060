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
    enrich::Enricher,
    events::{CgroupScope, EventFilter, Reader, Router, Subscriber, route::Observer},
    plugins::{self, HostServices, PluginEngine, PluginHandle, engine::Compiler},
    probes::{self, Probe, process},
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
    let cache_dir = config.cache_dir.clone().or_else(plugins::engine::default_cache_dir);
    let exe = std::env::current_exe().context("locating wasmtap's own executable (it compiles plugins in a child process)")?;
    let enricher = Arc::new(Enricher::new());
    let services = HostServices {
        engine: Arc::new(PluginEngine::new(cache_dir, Compiler::Child(exe))?),
        sink: sink.clone(),
        metrics: self_metrics.clone(),
        enricher: enricher.clone(),
    };
    let (handles, enrichment) = {
        let (config, services, state) = (config.clone(), services.clone(), state.clone());
        tokio::task::spawn_blocking(move || start_plugins(&config, &services, &state)).await?
    };
    let mut observers: Vec<Arc<dyn Observer>> = Vec::new();
    if enrichment {
        observers.push(enricher.clone());
    }
    let router = Arc::new(Router::new(handles.iter().flat_map(|h| h.subscribers.iter().cloned()).collect(), observers));
    let stop_readers = CancellationToken::new();
    let (probes, reader) = start_probes(&config, &router, enrichment.then_some(&*enricher), &self_metrics, &stop_readers, &state);
    state.report.write().expect("report").starting = false;
    tracing::info!("ready");

    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = sigint.recv() => tracing::info!("SIGINT: shutting down"),
    }

    // Detach the probes, drain what they wrote, let plugins finish their queues (each
    // within its shutdown time, all at once) and flush, then stop serving.
    drop(probes);
    stop_readers.cancel();
    if let Some(reader) = reader {
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

/// Starts every configured plugin; one that fails is reported and skipped. Also says
/// whether any started plugin uses enrichment.
fn start_plugins(config: &Config, services: &HostServices, state: &AppState) -> (Vec<PluginHandle>, bool) {
    let tenants = open_tenants(&config.tenants, &services.sink);
    let mut handles = Vec::new();
    let mut enrichment = false;
    for plugin in &config.plugins {
        let tenant = match &plugin.tenant {
            None => Ok(None),
            Some(name) => match tenants.iter().find(|(n, _)| n == name).map(|(_, t)| t) {
                Some(Ok(t)) => Ok(Some(t.clone())),
                Some(Err(e)) => Err(anyhow::anyhow!("{e:#}")),
                None => Err(anyhow::anyhow!("no tenant {name:?}")),
            },
        };
        match tenant.and_then(|tenant| plugins::start(services, plugin, tenant)) {
            Ok((handle, uses_enrichment)) => {
                let kinds: Vec<_> = handle.subscribers.iter().map(|s| s.kind.name).collect();
                tracing::info!(plugin = %plugin.name, ?kinds, uses_enrichment, "plugin started");
                enrichment |= uses_enrichment;
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
    (handles, enrichment)
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

/// Loads and attaches each kind somebody subscribed to (the union of their filters in
/// the kernel), and starts the reader of their ring buffers. A kind that cannot attach
/// is reported and the others run on. Enrichment, when used, observes every process
/// event.
fn start_probes(
    config: &Config,
    router: &Arc<Router>,
    enricher: Option<&Enricher>,
    metrics: &SelfMetrics,
    stop: &CancellationToken,
    state: &AppState,
) -> (Vec<Probe>, Option<JoinHandle<()>>) {
    let subscribers = router.subscribers();
    let (mut probes, mut readers) = (Vec::new(), Vec::new());
    for &kind in probes::KINDS {
        let mut filters: Vec<EventFilter> = subscribers.iter().filter(|s| s.kind == kind).flat_map(|s| kernel_filters(s)).collect();
        if enricher.is_some() && kind == &process::KIND {
            filters.push(EventFilter::default());
        }
        let Some(filter) = EventFilter::union(&filters) else {
            tracing::info!(kind = kind.name, "nobody subscribed: the kind's probe is not loaded");
            continue;
        };
        let (probe, stream) = match Probe::start(kind, &config.probes, &filter) {
            Ok(started) => started,
            Err(e) => {
                tracing::error!(kind = kind.name, "probe not attached: {e:#}");
                state.report.write().expect("report").probe_errors.push((kind.name, format!("{e:#}")));
                continue;
            }
        };
        tracing::info!(kind = kind.name, attach = probe.attach_kind(), widened = ?probe.widened(), "probe attached");
        state.report.write().expect("report").probes.push(ProbeStatus {
            name: kind.name,
            attach: probe.attach_kind(),
            program_ids: probe.program_ids(),
            widened: probe.widened(),
        });
        readers.push(Reader { stream, router: router.clone(), counters: metrics.probe(kind.name), interval: Duration::from_millis(config.probes.drain_interval_ms) });
        probes.push(probe);
    }
    let tracked = probes.iter().any(|p| p.kind == &process::KIND);
    if readers.is_empty() {
        return (probes, None);
    }
    match Reader::spawn_all(readers, stop.clone()) {
        Ok(reader) => {
            if tracked && let Some(enricher) = enricher {
                enricher.start_tracking();
            }
            (probes, Some(reader))
        }
        Err(e) => {
            tracing::error!("reader not started, no events are read: {e:#}");
            state.report.write().expect("report").probe_errors.push(("reader", format!("{e:#}")));
            (probes, None)
        }
    }
}
