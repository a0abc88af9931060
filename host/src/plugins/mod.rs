//! Plugins: the wasmtime engine and compile cache, the host side of the WIT contract
//! (with a capability-free WASI subset), and one supervised worker per plugin instance.

pub mod bundled;
pub mod cache;
pub mod engine;
pub mod host;
pub mod inspect;
pub mod instance;
pub mod registry;
pub mod scaffold;
pub mod wasi;
pub mod worker;

use std::sync::Arc;

use anyhow::Context as _;

pub use engine::PluginEngine;
use host::ConfigValue;
pub use worker::{PluginHandle, PluginSpec, PluginStatus};

use crate::{
    budget::{Budget, Reason, Refusal, TenantBudget},
    config::{ConfigNode, PluginConfig},
    enrich::Enricher,
    recording::record::Recorder,
    sinks::{MetricSink, SelfMetrics, logs::LogOutputs, metrics::Staging},
};

/// What every plugin shares from the host.
#[derive(Clone)]
pub struct HostServices {
    pub engine: Arc<PluginEngine>,
    pub sink: Arc<MetricSink>,
    pub metrics: SelfMetrics,
    pub enricher: Arc<Enricher>,
    pub logs: Arc<LogOutputs>,
    /// `wasmtap run --record`: sees every batch the plugins get.
    pub recorder: Option<Arc<Recorder>>,
}

/// Claims the plugin's namespace, then loads and compiles it, linked and ready to
/// instantiate. `staging`: the build is to replace a running one.
pub fn prepare(host: &HostServices, config: &PluginConfig, tenant: Option<Arc<TenantBudget>>, staging: Option<Arc<Staging>>) -> anyhow::Result<PluginSpec> {
    let HostServices { engine, sink, metrics, enricher, logs, .. } = host;
    let namespace = namespace_of(config, tenant.as_deref());
    let parent = tenant.as_ref().map(|t| t.owner());
    let budget = Arc::new(Budget::new(&config.name, config.limits, tenant, metrics).with_family_overflow(config.family_overflow.clone()));
    if let Err(e) = sink.claim(&namespace, &config.name, parent.as_deref()) {
        return Err(budget.refuse(Refusal::new(Reason::Namespace, e)).into());
    }
    let bytes = component_bytes(config)?;
    let version = registry::hash(&bytes);
    let component = engine.compile(&bytes, &version, &config.limits).map_err(|e| match e {
        engine::CompileError::Refused(refusal) => anyhow::Error::from(budget.refuse(refusal)),
        engine::CompileError::Invalid(e) => e.context("not a valid wasmtap plugin component"),
    })?;
    wasi::check_imports(engine.engine(), &component).map_err(|refusal| budget.refuse(refusal))?;
    let uses_enrichment = component.component_type().imports(engine.engine()).any(|(name, _)| name.starts_with("wasmtap:plugin/enrich@"));
    let pre = engine.prepare(&component).context("the component does not fit the wasmtap:plugin world")?;
    let state = host::StateIndices::new(pre.instance_pre()).ok();
    Ok(PluginSpec {
        name: config.name.clone(),
        namespace,
        config: config.config_tree().into_iter().map(config_value).collect(),
        budget,
        pre,
        engine: engine.clone(),
        sink: sink.clone(),
        enricher: enricher.clone(),
        logs: logs.clone(),
        uses_enrichment,
        version,
        state,
        staging,
    })
}

/// The metric namespace a plugin owns (see `PluginConfig::namespace_within`).
pub fn namespace_of(config: &PluginConfig, tenant: Option<&TenantBudget>) -> String {
    config.namespace_within(tenant.map(|t| t.namespace.as_str()))
}

/// The component a plugin config names (at most `component_bytes` and one more byte).
pub fn component_bytes(config: &PluginConfig) -> anyhow::Result<std::borrow::Cow<'static, [u8]>> {
    Ok(match (&config.bundled, &config.path) {
        (Some(name), _) => {
            bundled::get(name).with_context(|| format!("no bundled plugin {name:?}; bundled: {}", bundled::names().collect::<Vec<_>>().join(", ")))?.into()
        }
        (None, Some(path)) => crate::config::read_regular_file(path, config.limits.component_bytes)?.into(),
        (None, None) => anyhow::bail!("neither `bundled` nor `path` set"),
    })
}

fn config_value(node: ConfigNode) -> ConfigValue {
    match node {
        ConfigNode::String(s) => ConfigValue::String(s),
        ConfigNode::Integer(i) => ConfigValue::Integer(i),
        ConfigNode::Float(f) => ConfigValue::Float(f),
        ConfigNode::Boolean(b) => ConfigValue::Boolean(b),
        ConfigNode::Datetime(d) => ConfigValue::Datetime(d),
        ConfigNode::Array(items) => ConfigValue::Array(items),
        ConfigNode::Table(entries) => ConfigValue::Table(entries),
    }
}
