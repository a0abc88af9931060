//! The live plugin registry: the running set of plugins, changed one step at a time
//! (load, replace, unload) through the admin API, or by an edit of the config file
//! (start-up, SIGHUP). Each change updates the router, the kernel filters and
//! attachments, and the status report. Changes run one at a time; reading the list
//! does not wait for one (compiling a plugin can take seconds).
//!
//! Replace protocol (no event lost or counted twice):
//! 1. compile the new build (or take it from the cache), instantiate it and run `init`;
//!    the metric families it declares are staged, unseen by scrapes;
//! 2. widen the kernel filters to both builds' subscriptions (add before remove);
//! 3. switch the router between two batches: from here batches queue for the new build
//!    (and what the old build's own filters select is held aside until the verdict);
//! 4. the old build handles every batch it was given, ticks a last time and, when both
//!    builds export `state`, takes a snapshot, which the new build `restore`s;
//! 5. commit: the staged families replace the live ones (series carried over), the old
//!    build stops, the new one starts on its queue, and the kernel filters narrow.
//!
//! A failure in 1 leaves everything as it was; a failure of `restore` in 4 switches the
//! router back and hands the old build the batches held for it, before any newer ones.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, mpsc::sync_channel},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::{
    HostServices, PluginHandle, PluginSpec,
    worker::{self, Handoff, Verdict, Work},
};
use crate::{
    budget::{Budget, TenantBudget},
    config::{Config, MAX_PLUGINS, PluginConfig},
    events::{CgroupScope, Router, Subscriber, route::Observer},
    probes::attached::Attached,
    server::AppState,
    sinks::{logs::sanitize, metrics::Staging},
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
    /// In a replace's answer: whether the old build's state was carried over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_handoff: Option<String>,
}

/// What applying a config file did.
#[derive(Debug, Default, Serialize)]
pub struct Applied {
    pub loaded: Vec<String>,
    pub replaced: Vec<String>,
    pub unloaded: Vec<String>,
    /// (plugin, error) for changes that failed (the plugin's previous state stands).
    pub failed: Vec<(String, String)>,
}

struct Running {
    config: PluginConfig,
    namespace: String,
    budget: Arc<Budget>,
    handle: PluginHandle,
}

struct Inner {
    running: Vec<Running>,
    /// Configured plugins that could not start: (config, version, error).
    failed: Vec<(PluginConfig, String, String)>,
    /// The config file's plugins as last applied, with their component's version.
    file: Vec<(PluginConfig, String)>,
    attached: Attached,
}

pub struct Registry {
    services: HostServices,
    state: Arc<AppState>,
    router: Arc<Router>,
    tenants: HashMap<String, Result<Arc<TenantBudget>, String>>,
    /// Held for a whole change, so changes run one at a time.
    changes: Mutex<()>,
    /// Held briefly; `None` once shut down.
    inner: Mutex<Option<Inner>>,
}

impl Registry {
    pub fn new(services: HostServices, state: Arc<AppState>, router: Arc<Router>, attached: Attached, config: &Config) -> Self {
        let tenants = open_tenants(config, &services);
        let inner = Inner { running: Vec::new(), failed: Vec::new(), file: Vec::new(), attached };
        Self { services, state, router, tenants, changes: Mutex::new(()), inner: Mutex::new(Some(inner)) }
    }

    fn inner(&self) -> anyhow::Result<MutexGuard<'_, Option<Inner>>> {
        let inner = self.inner.lock().expect("registry lock");
        if inner.is_none() {
            bail!("the daemon is shutting down");
        }
        Ok(inner)
    }

    /// Runs `f` on the state, then publishes it to the status report.
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> anyhow::Result<T> {
        let mut guard = self.inner()?;
        let inner = guard.as_mut().expect("checked");
        let result = f(inner);
        self.publish(inner);
        Ok(result)
    }

    /// Applies an edit of the config file: plugins added to it are loaded, plugins
    /// removed from it unloaded, plugins whose section or component bytes changed
    /// replaced. Plugins it did not change are left alone (also when the admin API
    /// changed them), except that those that failed to start are tried again.
    pub fn apply_file(&self, desired: &[PluginConfig]) -> anyhow::Result<Applied> {
        let _change = self.changes.lock().expect("changes lock");
        let (previous, failed) = self.with(|inner| (std::mem::take(&mut inner.file), inner.failed.iter().map(|(c, ..)| c.name.clone()).collect::<Vec<_>>()))?;
        let mut applied = Applied::default();
        let mut file = Vec::new();
        for (old, _) in previous.iter().filter(|(old, _)| !desired.iter().any(|d| d.name == old.name)) {
            match self.unload_now(&old.name) {
                Ok(()) => applied.unloaded.push(old.name.clone()),
                Err(e) => applied.failed.push((old.name.clone(), format!("{e:#}"))),
            }
        }
        for config in desired {
            // Read and hashed here only to compare with the last apply; a new entry's
            // version comes from its load.
            let before = previous.iter().find(|(c, _)| c.name == config.name);
            let version = before.map(|_| version_of(config).unwrap_or_default());
            let changed = before.zip(version.as_ref()).is_none_or(|((c, v), version)| c != config || v != version);
            let running = self.with(|inner| inner.running.iter().any(|r| r.config.name == config.name))?;
            let result = match (changed, running) {
                (true, true) => self.replace_now(config).map(|_| Some(&mut applied.replaced)),
                (true, false) => self.load_now(config, true).map(|()| Some(&mut applied.loaded)),
                (false, false) if failed.contains(&config.name) => self.load_now(config, true).map(|()| Some(&mut applied.loaded)),
                (false, _) => Ok(None),
            };
            match result {
                Ok(list) => list.into_iter().for_each(|l| l.push(config.name.clone())),
                Err(e) => applied.failed.push((config.name.clone(), format!("{e:#}"))),
            }
            let version = match version {
                Some(version) => version,
                None => self.with(|inner| {
                    let running = inner.running.iter().find(|r| r.config.name == config.name).map(|r| r.handle.version.clone());
                    running.or_else(|| inner.failed.iter().find(|(c, ..)| c.name == config.name).map(|(_, v, _)| v.clone())).unwrap_or_default()
                })?,
            };
            file.push((config.clone(), version));
        }
        self.with(|inner| {
            inner.failed.retain(|(c, ..)| desired.iter().any(|d| d.name == c.name));
            inner.file = file;
        })?;
        Ok(applied)
    }

    pub fn load(&self, config: &PluginConfig) -> anyhow::Result<PluginInfo> {
        let _change = self.changes.lock().expect("changes lock");
        let (running, count) = self.with(|inner| (inner.running.iter().any(|r| r.config.name == config.name), inner.running.len()))?;
        if running {
            bail!("plugin {:?} is already running; replace it or unload it first", config.name);
        }
        if count >= MAX_PLUGINS {
            bail!("{count} plugins run already, the most one daemon runs; unload one first");
        }
        self.load_now(config, false)?;
        self.info(&config.name)
    }

    pub fn replace(&self, config: &PluginConfig) -> anyhow::Result<PluginInfo> {
        let _change = self.changes.lock().expect("changes lock");
        let handoff = self.replace_now(config)?;
        let mut info = self.info(&config.name)?;
        info.state_handoff = Some(handoff);
        Ok(info)
    }

    pub fn unload(&self, name: &str) -> anyhow::Result<()> {
        let _change = self.changes.lock().expect("changes lock");
        self.unload_now(name)
    }

    /// The running build's config of `name`, to derive a replacement from.
    pub fn config_of(&self, name: &str) -> Option<PluginConfig> {
        let inner = self.inner.lock().expect("registry lock");
        inner.as_ref()?.running.iter().find(|r| r.config.name == name).map(|r| r.config.clone())
    }

    pub fn list(&self) -> Vec<PluginInfo> {
        let inner = self.inner.lock().expect("registry lock");
        let Some(inner) = inner.as_ref() else { return Vec::new() };
        let mut list: Vec<PluginInfo> = inner.running.iter().map(info_of).collect();
        list.extend(inner.failed.iter().map(|(c, version, e)| PluginInfo {
            name: c.name.clone(),
            state: "failed".into(),
            version: version.clone(),
            source: source_of(c),
            tenant: c.tenant.clone(),
            kinds: Vec::new(),
            events: 0,
            dropped: 0,
            faults: 0,
            last_error: Some(e.clone()),
            swap_us: None,
            state_handoff: None,
        }));
        list
    }

    fn info(&self, name: &str) -> anyhow::Result<PluginInfo> {
        let inner = self.inner()?;
        inner.as_ref().and_then(|i| i.running.iter().find(|r| r.config.name == name)).map(info_of).ok_or_else(|| anyhow!("plugin {name:?} is gone"))
    }

    /// Stops everything in order (after the change under way): probes detached and
    /// drained, then each plugin finishes its queue (within its shutdown time, all at
    /// once) and ticks a last time.
    pub fn shutdown(&self) {
        let _change = self.changes.lock().expect("changes lock");
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

    /// Compiles and prepares a build, its declarations staged (outside the state lock).
    fn prepare(&self, config: &PluginConfig) -> anyhow::Result<(PluginSpec, Arc<Staging>, Option<Arc<CgroupScope>>)> {
        let tenant = self.tenant(config)?;
        let scope = tenant.as_ref().map(|t| t.scope.clone());
        let staging = Arc::new(Staging::default());
        let spec = super::prepare(&self.services, config, tenant, Some(staging.clone()))?;
        Ok((spec, staging, scope))
    }

    /// `configured`: the plugin is in the config file (a failure is kept and shown,
    /// and tried again on the next reload); otherwise only the caller hears of it.
    fn load_now(&self, config: &PluginConfig, configured: bool) -> anyhow::Result<()> {
        let namespace = self.tenant(config).ok().map(|t| super::namespace_of(config, t.as_deref()));
        let started = self.prepare(config).and_then(|(spec, staging, scope)| {
            let budget = spec.budget.clone();
            let staged = worker::stage(spec, self.services.metrics.plugin(&config.name), scope);
            let staged = staged.inspect_err(|_| self.services.sink.discard(&staging, &budget))?;
            self.services.sink.commit(&staging, None, &budget);
            let namespace = staged.namespace.clone();
            Ok((staged.start(None), budget, namespace))
        });
        // Read outside the state lock (a component may be large), and only when kept.
        let failed_version = (configured && started.is_err()).then(|| version_of(config).unwrap_or_default());
        self.with(|inner| {
            inner.failed.retain(|(c, ..)| c.name != config.name);
            match started {
                Ok((handle, budget, namespace)) => {
                    let kinds: Vec<_> = handle.subscribers.iter().map(|s| s.kind.name).collect();
                    tracing::info!(plugin = %config.name, version = %handle.version, ?kinds, "plugin started");
                    inner.running.push(Running { config: config.clone(), namespace, budget, handle });
                    self.reroute(inner);
                    Ok(())
                }
                Err(e) => {
                    if let Some(namespace) = &namespace {
                        self.services.sink.release_claim(namespace, &config.name);
                    }
                    let error = sanitize(&format!("{e:#}"), super::instance::MAX_ERROR_BYTES);
                    tracing::error!("plugin {:?} not started: {error}", config.name);
                    if let Some(version) = failed_version {
                        inner.failed.push((config.clone(), version, error.clone()));
                    }
                    Err(anyhow!(error))
                }
            }
        })?
    }

    fn unload_now(&self, name: &str) -> anyhow::Result<()> {
        let running = self.with(|inner| {
            if let Some(i) = inner.failed.iter().position(|(c, ..)| c.name == name) {
                inner.failed.remove(i);
                return anyhow::Ok(None);
            }
            let i = inner.running.iter().position(|r| r.config.name == name).ok_or_else(|| anyhow!("no plugin {name:?} is loaded"))?;
            let running = inner.running.remove(i);
            // Out of the routes first (its queue then ends), then the kernel narrows.
            self.reroute(inner);
            Ok(Some(running))
        })??;
        if let Some(running) = running {
            running.handle.join();
            // Its metrics go with it (they go stale in Prometheus), and so do its claim
            // and its self-metric series: a name that never comes back costs nothing.
            self.services.sink.remove_namespace(&running.namespace, &running.budget);
            self.services.metrics.forget_plugin(name);
            tracing::info!(plugin = %name, "plugin unloaded");
        }
        Ok(())
    }

    /// Replaces a running plugin; says whether its state was carried over.
    fn replace_now(&self, config: &PluginConfig) -> anyhow::Result<String> {
        let requested = Instant::now();
        let (old_budget, old_namespace, old_queue, old_subscribers) = self.with(|inner| {
            let r = inner.running.iter().find(|r| r.config.name == config.name).ok_or_else(|| anyhow!("no plugin {:?} is loaded", config.name))?;
            if r.config.tenant != config.tenant {
                bail!("a replace cannot move a plugin to another tenant: unload it and load it again");
            }
            Ok((r.budget.clone(), r.namespace.clone(), r.handle.queue(), r.handle.subscribers.clone()))
        })??;
        let (spec, staging, scope) = self.prepare(config)?;
        if spec.namespace != old_namespace {
            self.services.sink.discard(&staging, &spec.budget);
            bail!("a replace cannot change a plugin's metric namespace ({old_namespace}): unload it and load it again");
        }
        let new_budget = spec.budget.clone();
        let reserved = new_budget.reserve(&old_budget);
        let staged = worker::stage(spec, self.services.metrics.plugin(&config.name), scope)
            .inspect_err(|_| self.services.sink.discard(&staging, &new_budget))
            .context("the new build did not start; the running build is untouched")?;

        // Until the verdict, what the old build would get is also held aside: an abort
        // hands it back (what the new build got was chosen by the new filters).
        let (hold, held) = sync_channel(old_budget.limits.queue_batches);
        let shadows: Vec<Arc<Subscriber>> = old_subscribers.iter().map(|s| Arc::new(s.shadow(hold.clone()))).collect();
        drop(hold);
        let uses_enrichment = staged.uses_enrichment;
        self.with(|inner| {
            // Add before remove: the kernel records for both builds while they overlap.
            let mut both = self.subscribers(inner);
            both.extend(staged.subscribers.iter().cloned());
            inner.attached.sync(&both, self.enrichment(inner) || uses_enrichment);
            let mut routes: Vec<Arc<Subscriber>> = self.subscribers(inner).into_iter().filter(|s| s.plugin != config.name).collect();
            routes.extend(staged.subscribers.iter().cloned());
            routes.extend(shadows.iter().cloned());
            self.router.set(routes, self.observers(inner, uses_enrichment));
        })?;

        let (ready_tx, ready) = sync_channel(1);
        let (verdict, verdict_rx) = sync_channel(1);
        let snapshot = staged.stateful;
        let wait = Duration::from_millis(old_budget.limits.shutdown_ms) + HANDOFF_SLACK;
        let handed = old_queue
            .send(Work::Handoff(Handoff { snapshot, ready: ready_tx, verdict: verdict_rx }))
            .map_err(|_| anyhow!("the running build's worker is gone"))
            .and_then(|()| ready.recv_timeout(wait).map_err(|_| anyhow!("the running build did not hand over within {wait:?}")));
        let mut state_handoff = "none".to_owned();
        let restored = handed.and_then(|handed| match handed {
            Ok(Some(bytes)) => {
                state_handoff = format!("carried ({} bytes)", bytes.len());
                staged.restore(bytes)
            }
            Ok(None) => Ok(()),
            Err(why) => {
                // The old build is down: replacing it is the fix, so go on without state.
                tracing::warn!(plugin = %config.name, "replaced without its state: {why}");
                state_handoff = format!("lost: {why}");
                Ok(())
            }
        });
        if let Err(e) = restored {
            // Back to the old build, with what was held for it first.
            self.with(|inner| self.reroute(inner))?;
            let back = held.try_iter().filter_map(|w| if let Work::Batch(b) = w { Some(b) } else { None }).collect();
            old_subscribers.iter().zip(&shadows).for_each(|(old, shadow)| old.adopt_drops(shadow));
            let _ = verdict.send(Verdict::Abort(back));
            self.services.sink.discard(&staging, &new_budget);
            return Err(e.context("the replace was aborted; the running build carries on"));
        }

        self.services.sink.commit(&staging, Some(&old_budget), &new_budget);
        new_budget.take_over(&old_budget, reserved);
        let _ = verdict.send(Verdict::Commit);
        self.with(|inner| {
            // What the kernel holds now is the new build's first batch, waiting as it starts.
            staged.subscribers.iter().for_each(|s| inner.attached.drain_now(s.kind));
            let i = inner.running.iter().position(|r| r.config.name == config.name).expect("changes run one at a time");
            let old = inner.running.remove(i);
            let handle = staged.start(Some(requested));
            handle.counters.replaces.inc();
            tracing::info!(plugin = %config.name, from = %old.handle.version, to = %handle.version, state = %state_handoff, "plugin replaced");
            inner.running.insert(i, Running { config: config.clone(), namespace: old.namespace.clone(), budget: new_budget, handle });
            self.reroute(inner);
            old.handle.join();
        })?;
        Ok(state_handoff)
    }

    fn subscribers(&self, inner: &Inner) -> Vec<Arc<Subscriber>> {
        inner.running.iter().flat_map(|r| r.handle.subscribers.iter().cloned()).collect()
    }

    fn enrichment(&self, inner: &Inner) -> bool {
        inner.running.iter().any(|r| r.handle.uses_enrichment)
    }

    fn observers(&self, inner: &Inner, also_enrichment: bool) -> Vec<Arc<dyn Observer>> {
        let enricher = (self.enrichment(inner) || also_enrichment).then(|| self.services.enricher.clone() as Arc<dyn Observer>);
        let recorder = self.services.recorder.clone().map(|r| r as Arc<dyn Observer>);
        enricher.into_iter().chain(recorder).collect()
    }

    /// Routes to the running set, then fits the kernel to it.
    fn reroute(&self, inner: &mut Inner) {
        let subscribers = self.subscribers(inner);
        self.router.set(subscribers.clone(), self.observers(inner, false));
        inner.attached.sync(&subscribers, self.enrichment(inner));
    }

    fn publish(&self, inner: &Inner) {
        let (probes, probe_errors) = inner.attached.status();
        let mut report = self.state.report.write().expect("report");
        report.probes = probes;
        report.probe_errors = probe_errors;
        report.plugins = inner.running.iter().map(|r| r.handle.status.clone()).collect();
        report.failed_plugins = inner.failed.iter().map(|(c, _, e)| (c.name.clone(), e.clone())).collect();
    }
}

fn info_of(r: &Running) -> PluginInfo {
    let status = r.handle.status.lock().expect("status lock").clone();
    PluginInfo {
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
        state_handoff: None,
    }
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
                    let namespace = t.namespace();
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
