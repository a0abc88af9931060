//! `wasmtap run`: serves first (liveness answers while plugins compile), then starts
//! the configured plugins through the live registry (which attaches what they subscribe
//! to), serves the admin API, applies the config again on SIGHUP, and shuts down in
//! order on SIGINT/SIGTERM.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use prometheus_client::registry::Registry as MetricRegistry;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Config, default_admin_socket},
    enrich::Enricher,
    events::Router,
    plugins::{HostServices, PluginEngine, engine::Compiler, registry::Registry},
    probes::attached::Attached,
    recording::record::Recorder,
    server::{
        self, AppState,
        admin::{self, Overrides},
    },
    sinks::{MetricSink, SelfMetrics, logs::LogOutputs},
};

/// Runs `config` until SIGINT/SIGTERM. `config_path` is re-read on SIGHUP (none: the
/// embedded default, which never changes); `overrides` (the command line's) win over it.
pub async fn run(config: Config, config_path: Option<PathBuf>, overrides: Overrides, record: Option<(PathBuf, u64)>) -> anyhow::Result<()> {
    // Before anything can report healthy, so a SIGTERM always takes the orderly path.
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut web = crate::server::web::Web::load(config.server.web_config.as_deref())?;
    let (tls, auth) = (web.tls.is_some(), web.auth.is_some());
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}\n  fix: pass a free address with --listen, or set `listen` in the config", config.listen))?;
    let mut metric_registry = MetricRegistry::default();
    let self_metrics = SelfMetrics::register(&mut metric_registry);
    let sink = Arc::new(MetricSink::default());
    metric_registry.register_collector(Box::new(sink.clone()));
    let state = Arc::new(AppState::new(metric_registry, config.server.clone(), web.auth.take()));
    let stop_server = CancellationToken::new();
    let server = tokio::spawn(server::serve(listener, web.tls, state.clone(), stop_server.clone()));
    tracing::info!(listen = %config.listen, tls, basic_auth = auth, "serving /metrics, /healthz, /readyz, /status");

    let cache_dir = crate::plugins::cache::location(config.cache_dir.clone()).inspect_err(|why| {
        tracing::warn!("no plugin cache, compiling in memory: {why}");
    });
    let exe = std::env::current_exe().context("locating wasmtap's own executable (it compiles plugins in a child process)")?;
    let enricher = Arc::new(Enricher::new());
    let logs = LogOutputs::start(&config.logs, &self_metrics)?;
    let recorder = match &record {
        Some((path, max_bytes)) => {
            tracing::info!(path = %path.display(), max_bytes, "recording every batch the plugins get");
            Some(Recorder::start(path, crate::probes::KINDS, *max_bytes)?)
        }
        None => None,
    };
    let services = HostServices {
        engine: Arc::new(PluginEngine::new(cache_dir.ok().map(|dir| (dir, config.cache_max_bytes)), Compiler::Child(exe))?),
        sink: sink.clone(),
        metrics: self_metrics.clone(),
        enricher: enricher.clone(),
        logs: logs.clone(),
        recorder: recorder.clone(),
    };
    let router = Arc::new(Router::default());
    let attached = Attached::new(config.probes.clone(), router.clone(), self_metrics.clone(), enricher)?;
    let registry = Arc::new(Registry::new(services, state.clone(), router, attached, &config));
    // Compiling and calling into plugins blocks: off the async workers.
    {
        let (registry, plugins) = (registry.clone(), config.plugins.clone());
        tokio::task::spawn_blocking(move || registry.apply_file(&plugins)).await??;
    }
    state.report.write().expect("report").starting = false;

    let socket = config.admin_socket.clone().unwrap_or_else(default_admin_socket);
    let admin = Arc::new(admin::Admin {
        registry: registry.clone(),
        path: config_path,
        overrides,
        config: std::sync::RwLock::new(config),
        reloading: std::sync::Mutex::default(),
    });
    let stop_admin = CancellationToken::new();
    let admin_server = match admin::bind(&socket) {
        Ok(listener) => {
            tracing::info!(socket = %socket.display(), "admin API");
            Some(tokio::spawn(admin::serve(listener, socket, admin.clone(), stop_admin.clone())))
        }
        Err(e) => {
            tracing::error!("admin API not served (plugins cannot be changed at run time): {e:#}");
            None
        }
    };
    tracing::info!("ready");

    loop {
        tokio::select! {
            _ = sighup.recv() => {
                tracing::info!("SIGHUP: re-reading the config");
                // Off the signal loop: a SIGTERM meanwhile is taken at once (shutdown
                // then waits for the change under way).
                let admin = admin.clone();
                tokio::task::spawn_blocking(move || match admin::reload(&admin) {
                    Ok(applied) => applied.failed.iter().for_each(|(plugin, e)| tracing::error!(%plugin, "not applied: {e}")),
                    Err(e) => tracing::error!("config not reloaded, nothing changed: {e:#}"),
                });
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break }
        }
    }

    // Detach the probes, drain what they wrote, let plugins finish their queues (each
    // within its shutdown time, all at once) and flush, then stop serving.
    stop_admin.cancel();
    if let Some(admin_server) = admin_server {
        let _ = admin_server.await;
    }
    tokio::task::spawn_blocking(move || registry.shutdown()).await?;
    logs.shutdown().await;
    if let Some(recorder) = recorder {
        match recorder.finish() {
            Ok(summary) => tracing::info!(bytes = summary.bytes, dropped = summary.dropped, records = ?summary.records, "recording written"),
            Err(e) => tracing::error!("the recording is incomplete: {e:#}"),
        }
    }
    stop_server.cancel();
    let _ = server.await;
    tracing::info!("stopped");
    Ok(())
}
