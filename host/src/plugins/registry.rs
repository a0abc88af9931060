//! The live plugin registry: the running set of plugins, changed one step at a time
//! (load, replace, unload) or to match a desired set (start-up, SIGHUP). Each change
//! updates the router, the kernel filters and attachments, and the status report.
//!
//! Replace protocol (no event lost or counted twice):
//! 1. compile the new build (or take it from the cache), instantiate it and run `init`;
//!    metric families it declares differently from the running build are staged;
//! 2. widen the kernel filters to both builds' subscriptions (add before remove);
//! 3. switch the router between two batches: from here batches queue for the new build;
//! 4. the old build handles every batch it was given, ticks a last time and, when both
//!    builds export `state`, takes a snapshot, which the new build `restore`s;
//! 5. commit: the staged families replace the live ones (series carried over), the old
//!    build stops, the new one starts on its queue, and the kernel filters narrow.
//!
//! A failure in 1 leaves everything as it was; a failure in 4 switches the router back
//! and hands the old build the batches queued for the new one, before any newer ones.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, mpsc::sync_channel},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::{
    HostServices, PluginHandle,
    worker::{self, Handoff, Verdict, Work},
};
use crate::{
    budget::{Budget, TenantBudget},
    config::{Config, PluginConfig},
    events::{CgroupScope, Router, Subscriber, route::Observer},
    probes::attached::Attached,
    server::AppState,
    sinks::{logs::sanitize, metrics::Staging, metrics::namespace_for},
};

/// How long a replace waits for the old build to finish its queue and hand over, past
/// its `shutdown_ms`.
const HANDOFF_SLACK: Duration = Duration::from_secs(5);

/// What the admin API shows of a plugin.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    pub name: String,
    pub state: String,
    /// Content hash (sha256) of the build.
    pub version: String,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub kinds: Vec<&'static str>,
    pub events: u64,
    pub dropped: u64,
    pub faults: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Microseconds from the replace request that started this build to its first batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_us: Option<u64>,
}

/// What applying a desired set did.
#[derive(Debug, Default, Serialize)]
pub struct Applied {
    pub loaded: Vec<String>,
    pub replaced: Vec<String>,
    pub unloaded: Vec<String>,
    pub unchanged: Vec<String>,
    /// (plugin, error) for changes that failed (the plugin's previous state stands).
    pub failed: Vec<(String, String)>,
}

struct Running {
    config: PluginConfig,
    budget: Arc<Budget>,
    handle: PluginHandle,
}

struct Inner {
    running: Vec<Running>,
    /// Configured plugins that could not start: (config, error).
    failed: Vec<(PluginConfig, String)>,
    attached: Attached,
}

pub struct Registry {
    services: HostServices,
    state: Arc<AppState>,
    router: Arc<Router>,
    tenants: HashMap<String, Result<Arc<TenantBudget>, String>>,
    inner: Mutex<Option<Inner>>,
}

impl Registry {
    pub fn new(services: HostServices, state: Arc<AppState>, router: Arc<Router>, attached: Attached, config: &Config) -> Self {
        let tenants = open_tenants(config, &services);
        let inner = Inner { running: Vec::new(), failed: Vec::new(), attached };
        Self { services, state, router, tenants, inner: Mutex::new(Some(inner)) }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> anyhow::Result<T>) -> anyhow::Result<T> {
        let mut inner = self.inner.lock().expect("registry lock");
        let inner = inner.as_mut().ok_or_else(|| anyhow!("the daemon is shutting down"))?;
        let result = f(inner);
        self.publish(inner);
        result
    }

    /// Makes the running set `desired`: loads what is new, unloads what is gone,
    /// replaces what changed (its config or its component's bytes). Blocking.
    pub fn apply(&self, desired: &[PluginConfig]) -> anyhow::Result<Applied> {
        self.with(|inner| {
            let mut applied = Applied::default();
            let gone: Vec<String> = inner.running.iter().map(|r| r.config.name.clone()).filter(|n| !desired.iter().any(|d| &d.name == n)).collect();
            for name in gone {
                self.unload_in(inner, &name)?;
                applied.unloaded.push(name);
            }
            inner.failed.retain(|(c, _)| desired.iter().any(|d| d.name == c.name));
            for config in desired {
                let name = config.name.clone();
                let result = match inner.running.iter().find(|r| r.config.name == name) {
                    None => self.load_in(inner, config, true).map(|_| &mut applied.loaded),
                    Some(r) if r.config == *config && version_of(config).is_ok_and(|v| v == r.handle.version) => Ok(&mut applied.unchanged),
                    Some(_) => self.replace_in(inner, config).map(|_| &mut applied.replaced),
                };
                match result {
                    Ok(list) => list.push(name),
                    Err(e) => applied.failed.push((name, format!("{e:#}"))),
                }
            }
            Ok(applied)
        })
    }

    pub fn load(&self, config: &PluginConfig) -> anyhow::Result<PluginInfo> {
        self.with(|inner| {
            if inner.running.iter().any(|r| r.config.name == config.name) {
                bail!("plugin {:?} is already running; replace it or unload it first", config.name);
            }
            self.load_in(inner, config, false)?;
            Ok(info_of(inner, &config.name).expect("just loaded"))
        })
    }

    pub fn replace(&self, config: &PluginConfig) -> anyhow::Result<PluginInfo> {
        self.with(|inner| {
            self.replace_in(inner, config)?;
            Ok(info_of(inner, &config.name).expect("just replaced"))
        })
    }

    pub fn unload(&self, name: &str) -> anyhow::Result<()> {
        self.with(|inner| self.unload_in(inner, name))
    }

    /// The running build's config of `name`, to derive a replacement from.
    pub fn config_of(&self, name: &str) -> Option<PluginConfig> {
        let inner = self.inner.lock().expect("registry lock");
        inner.as_ref()?.running.iter().find(|r| r.config.name == name).map(|r| r.config.clone())
    }

    pub fn list(&self) -> Vec<PluginInfo> {
        let inner = self.inner.lock().expect("registry lock");
        let Some(inner) = inner.as_ref() else { return Vec::new() };
        let mut list: Vec<PluginInfo> = inner.running.iter().filter_map(|r| info_of(inner, &r.config.name)).collect();
        list.extend(inner.failed.iter().map(|(c, e)| PluginInfo {
            name: c.name.clone(),
            state: "failed".into(),
            version: version_of(c).unwrap_or_default(),
            source: source_of(c),
            tenant: c.tenant.clone(),
            kinds: Vec::new(),
            events: 0,
            dropped: 0,
            faults: 0,
            last_error: Some(e.clone()),
            swap_us: None,
        }));
        list
    }

    /// Stops everything in order: probes detached and drained, then each plugin
    /// finishes its queue (within its shutdown time, all at once) and ticks a last time.
    pub fn shutdown(&self) {
        let Some(inner) = self.inner.lock().expect("registry lock").take() else { return };
        inner.attached.shutdown();
        inner.running.iter().for_each(|r| r.handle.begin_shutdown());
        self.router.set(Vec::new(), Vec::new());
        inner.running.into_iter().for_each(|r| r.handle.join());
    }

    fn tenant(&self, config: &PluginConfig) -> anyhow::Result<Option<Arc<TenantBudget>>> {
        match &config.tenant {
            None => Ok(None),
            Some(name) => match self.tenants.get(name) {
                Some(Ok(t)) => Ok(Some(t.clone())),
                Some(Err(e)) => Err(anyhow!("{e}")),
                None => Err(anyhow!("no tenant {name:?}")),
            },
        }
    }

    /// `configured`: the plugin is in the desired set (a failure is kept and shown, and
    /// retried on the next apply); otherwise only the caller hears of a failure.
    fn load_in(&self, inner: &mut Inner, config: &PluginConfig, configured: bool) -> anyhow::Result<()> {
        inner.failed.retain(|(c, _)| c.name != config.name);
        let started = self.tenant(config).and_then(|tenant| {
            let scope = tenant.as_ref().map(|t| t.scope.clone());
            let spec = super::prepare(&self.services, config, tenant, None)?;
            let budget = spec.budget.clone();
            Ok((worker::start(spec, self.services.metrics.plugin(&config.name), scope)?, budget))
        });
        match started {
            Ok((handle, budget)) => {
                let kinds: Vec<_> = handle.subscribers.iter().map(|s| s.kind.name).collect();
                tracing::info!(plugin = %config.name, version = %handle.version, ?kinds, "plugin started");
                inner.running.push(Running { config: config.clone(), budget, handle });
                self.reroute(inner);
                Ok(())
            }
            Err(e) => {
                let error = sanitize(&format!("{e:#}"), super::instance::MAX_ERROR_BYTES);
                tracing::error!("plugin {:?} not started: {error}", config.name);
                if configured {
                    inner.failed.push((config.clone(), error.clone()));
                }
                Err(anyhow!(error))
            }
        }
    }

    fn unload_in(&self, inner: &mut Inner, name: &str) -> anyhow::Result<()> {
        if let Some(i) = inner.failed.iter().position(|(c, _)| c.name == name) {
            inner.failed.remove(i);
            return Ok(());
        }
        let i = inner.running.iter().position(|r| r.config.name == name).ok_or_else(|| anyhow!("no plugin {name:?} is loaded"))?;
        let running = inner.running.remove(i);
        // Out of the routes first (its queue then ends), then the kernel narrows.
        self.reroute(inner);
        running.handle.join();
        tracing::info!(plugin = %name, "plugin unloaded");
        Ok(())
    }

    fn replace_in(&self, inner: &mut Inner, config: &PluginConfig) -> anyhow::Result<()> {
        let requested = Instant::now();
        let i = inner.running.iter().position(|r| r.config.name == config.name).ok_or_else(|| anyhow!("no plugin {:?} is loaded", config.name))?;
        let tenant = self.tenant(config)?;
        let scope: Option<Arc<CgroupScope>> = tenant.as_ref().map(|t| t.scope.clone());
        let staging = Arc::new(Staging::default());
        let spec = super::prepare(&self.services, config, tenant, Some(staging.clone()))?;
        let new_budget = spec.budget.clone();
        let staged = match worker::stage(spec, self.services.metrics.plugin(&config.name), scope) {
            Ok(staged) => staged,
            Err(e) => {
                self.services.sink.discard(&staging, &new_budget);
                return Err(e.context("the new build did not start; the running build is untouched"));
            }
        };

        // Add before remove: the kernel records for both builds while they overlap.
        let mut both = self.subscribers(inner);
        both.extend(staged.subscribers.iter().cloned());
        inner.attached.sync(&both, self.enrichment(inner) || staged.spec.uses_enrichment);

        let old_budget = inner.running[i].budget.clone();
        let (ready_tx, ready) = sync_channel(1);
        let (verdict, verdict_rx) = sync_channel(1);
        let snapshot = staged.instance.is_stateful();
        // Until the verdict, what the old build would get is also held aside: an abort
        // hands it back (what the new build got was chosen by the new filters).
        let (hold, held) = sync_channel(old_budget.limits.queue_batches);
        let shadows: Vec<Arc<Subscriber>> = inner.running[i].handle.subscribers.iter().map(|s| Arc::new(s.shadow(hold.clone()))).collect();
        drop(hold);
        let mut routes: Vec<Arc<Subscriber>> = self.subscribers(inner).into_iter().filter(|s| s.plugin != config.name).collect();
        routes.extend(staged.subscribers.iter().cloned());
        routes.extend(shadows.iter().cloned());
        self.router.set(routes, self.observers(inner, staged.spec.uses_enrichment));
        // What the kernel holds now is the new build's first batch, waiting when it starts.
        staged.subscribers.iter().for_each(|s| inner.attached.drain_now(s.kind));
        let handed = inner.running[i].handle.hand_off(Handoff { snapshot, ready: ready_tx, verdict: verdict_rx }).and_then(|()| {
            let wait = Duration::from_millis(old_budget.limits.shutdown_ms) + HANDOFF_SLACK;
            ready.recv_timeout(wait).map_err(|_| anyhow!("the running build did not hand over within {wait:?}"))?
        });
        let mut staged = staged;
        let restored = handed.and_then(|state| match state {
            Some(bytes) if snapshot => {
                let deadline = Duration::from_millis(staged.spec.budget.limits.call_deadline_ms);
                staged.instance.restore(deadline, &bytes)
            }
            _ => Ok(()),
        });
        if let Err(e) = restored {
            // Back to the old build, with what was held for it first.
            self.reroute(inner);
            let back = held.try_iter().filter_map(|w| if let Work::Batch(b) = w { Some(b) } else { None }).collect();
            inner.running[i].handle.subscribers.iter().zip(&shadows).for_each(|(old, shadow)| old.adopt_drops(shadow));
            let _ = verdict.send(Verdict::Abort(back));
            self.services.sink.discard(&staging, &new_budget);
            return Err(e.context("the replace was aborted; the running build carries on"));
        }

        self.services.sink.commit(&staging, &old_budget, &new_budget);
        new_budget.adopt(&old_budget);
        let _ = verdict.send(Verdict::Commit);
        let handle = staged.start(Some(requested))?;
        handle.counters.replaces.inc();
        let old = std::mem::replace(&mut inner.running[i], Running { config: config.clone(), budget: new_budget, handle });
        tracing::info!(plugin = %config.name, from = %old.handle.version, to = %inner.running[i].handle.version, "plugin replaced");
        old.handle.retire();
        self.reroute(inner);
        Ok(())
    }

    fn subscribers(&self, inner: &Inner) -> Vec<Arc<Subscriber>> {
        inner.running.iter().flat_map(|r| r.handle.subscribers.iter().cloned()).collect()
    }

    fn enrichment(&self, inner: &Inner) -> bool {
        inner.running.iter().any(|r| r.handle.uses_enrichment)
    }

    fn observers(&self, inner: &Inner, also_enrichment: bool) -> Vec<Arc<dyn Observer>> {
        if self.enrichment(inner) || also_enrichment { vec![self.services.enricher.clone() as Arc<dyn Observer>] } else { Vec::new() }
    }

    /// Routes to the running set, then fits the kernel to it.
    fn reroute(&self, inner: &mut Inner) {
        self.router.set(self.subscribers(inner), self.observers(inner, false));
        self.sync_kernel(inner);
    }

    fn sync_kernel(&self, inner: &mut Inner) {
        let (subscribers, enrichment) = (self.subscribers(inner), self.enrichment(inner));
        inner.attached.sync(&subscribers, enrichment);
    }

    fn publish(&self, inner: &Inner) {
        let (probes, probe_errors) = inner.attached.status();
        let mut report = self.state.report.write().expect("report");
        report.probes = probes;
        report.probe_errors = probe_errors;
        report.plugins = inner.running.iter().map(|r| r.handle.status.clone()).collect();
        report.failed_plugins = inner.failed.iter().map(|(c, e)| (c.name.clone(), e.clone())).collect();
    }
}

fn info_of(inner: &Inner, name: &str) -> Option<PluginInfo> {
    let r = inner.running.iter().find(|r| r.config.name == name)?;
    let status = r.handle.status.lock().expect("status lock").clone();
    Some(PluginInfo {
        name: status.name,
        state: status.state.into(),
        version: r.handle.version.clone(),
        source: source_of(&r.config),
        tenant: status.tenant,
        kinds: r.handle.subscribers.iter().map(|s| s.kind.name).collect(),
        events: r.handle.counters.events.get(),
        dropped: r.handle.counters.dropped.get(),
        faults: status.faults,
        last_error: status.last_error,
        swap_us: status.swap_us,
    })
}

fn source_of(config: &PluginConfig) -> String {
    match (&config.bundled, &config.path) {
        (Some(name), _) => format!("bundled:{name}"),
        (None, Some(path)) => path.display().to_string(),
        (None, None) => String::new(),
    }
}

/// The content hash of a configured plugin's component.
pub fn version_of(config: &PluginConfig) -> anyhow::Result<String> {
    Ok(hash(&super::component_bytes(config)?))
}

pub fn hash(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Opens each tenant's scope and claims its namespace (its own: no plugin outside it may
/// nest there). A tenant whose scope or namespace is unusable is reported, and its
/// plugins do not start.
fn open_tenants(config: &Config, services: &HostServices) -> HashMap<String, Result<Arc<TenantBudget>, String>> {
    config
        .tenants
        .iter()
        .map(|t| {
            let tenant = CgroupScope::open(&t.cgroup)
                .with_context(|| format!("tenant {}: cgroup {}", t.name, t.cgroup.display()))
                .and_then(|scope| {
                    let namespace = t.namespace.clone().unwrap_or_else(|| namespace_for(&t.name));
                    let tenant = Arc::new(TenantBudget::new(&t.name, namespace, Arc::new(scope), &t.quota));
                    services.sink.claim(&tenant.namespace, &tenant.owner(), None).map_err(|e| anyhow!("tenant {}: {e}", t.name))?;
                    tracing::info!(tenant = %t.name, scope = %tenant.scope.dir().display(), "tenant scope");
                    Ok(tenant)
                })
                .map_err(|e| {
                    tracing::error!("{e:#}");
                    format!("{e:#}")
                });
            (t.name.clone(), tenant)
        })
        .collect()
}
