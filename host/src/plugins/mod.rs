//! Plugins: the wasmtime engine and compile cache, the host side of the WIT contract
//! (with a capability-free WASI subset), and one supervised worker per plugin instance.

pub mod bundled;
pub mod engine;
pub mod host;
pub mod instance;
pub mod wasi;
pub mod worker;

use std::sync::Arc;

use anyhow::Context as _;

pub use engine::PluginEngine;
pub use worker::{PluginHandle, PluginSpec, PluginStatus};

use crate::{
    budget::{Budget, Reason, Refusal, TenantBudget},
    config::PluginConfig,
    sinks::{MetricSink, SelfMetrics, metrics::namespace_for},
};

/// Loads, compiles, instantiates and initialises one configured plugin.
pub fn start(
    engine: &Arc<PluginEngine>,
    config: &PluginConfig,
    tenant: Option<Arc<TenantBudget>>,
    sink: &Arc<MetricSink>,
    metrics: &SelfMetrics,
) -> anyhow::Result<PluginHandle> {
    let scope = tenant.as_ref().map(|t| t.scope.clone());
    let spec = prepare(engine, config, tenant, sink, metrics)?;
    worker::start(spec, metrics.plugin(&config.name), scope)
}

/// Claims the plugin's namespace, then loads and compiles it, linked and ready to
/// instantiate.
pub fn prepare(
    engine: &Arc<PluginEngine>,
    config: &PluginConfig,
    tenant: Option<Arc<TenantBudget>>,
    sink: &Arc<MetricSink>,
    metrics: &SelfMetrics,
) -> anyhow::Result<PluginSpec> {
    let own = config.namespace.clone().unwrap_or_else(|| namespace_for(&config.name));
    let namespace = match &tenant {
        Some(tenant) => format!("{}_{own}", tenant.namespace),
        None => own,
    };
    let parent = tenant.as_ref().map(|t| t.owner());
    let budget = Arc::new(Budget::new(&config.name, config.limits, tenant, metrics));
    if let Err(e) = sink.claim(&namespace, &config.name, parent.as_deref()) {
        return Err(budget.refuse(Refusal::new(Reason::Namespace, e)).into());
    }
    let bytes: std::borrow::Cow<'static, [u8]> = match (&config.bundled, &config.path) {
        (Some(name), _) => bundled::get(name)
            .with_context(|| format!("no bundled plugin {name:?}; bundled: {}", bundled::names().collect::<Vec<_>>().join(", ")))?
            .into(),
        (None, Some(path)) => read_bounded(path, config.limits.component_bytes)?.into(),
        (None, None) => anyhow::bail!("neither `bundled` nor `path` set"),
    };
    let component = engine.compile(&bytes, &config.limits).map_err(|e| match e {
        engine::CompileError::Refused(refusal) => anyhow::Error::from(budget.refuse(refusal)),
        engine::CompileError::Invalid(e) => e.context("not a valid wasmtap plugin component"),
    })?;
    wasi::check_imports(engine.engine(), &component).map_err(|refusal| budget.refuse(refusal))?;
    let pre = engine.prepare(&component).context("the component does not fit the wasmtap:plugin world")?;
    Ok(PluginSpec { name: config.name.clone(), namespace, config: config.init_config(), budget, pre, engine: engine.clone(), sink: sink.clone() })
}

/// Reads a component file, refusing one larger than `max` without reading it whole.
fn read_bounded(path: &std::path::Path, max: usize) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(max as u64 + 1).read_to_end(&mut bytes).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(bytes) // one byte over `max` is enough for `compile` to refuse it with the reason
}
