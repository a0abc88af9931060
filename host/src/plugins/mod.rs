//! Plugins: the wasmtime engine and compile cache, the host side of the WIT contract,
//! and one worker per plugin instance.

pub mod bundled;
pub mod engine;
pub mod host;
pub mod instance;
pub mod worker;

use std::sync::Arc;

use anyhow::Context as _;

pub use engine::PluginEngine;
pub use worker::{PluginHandle, PluginSpec, PluginStatus};

use crate::{
    config::{PluginConfig, PluginLimits},
    sinks::{MetricSink, SelfMetrics, metrics::namespace_for},
};

/// Loads, compiles, instantiates and initialises one configured plugin.
pub fn start(engine: &Arc<PluginEngine>, config: &PluginConfig, defaults: PluginLimits, sink: &Arc<MetricSink>, metrics: &SelfMetrics) -> anyhow::Result<PluginHandle> {
    let spec = prepare(engine, config, defaults)?;
    worker::start(engine.clone(), spec, sink.clone(), metrics.plugin(&config.name))
}

/// Loads and compiles a configured plugin, linked and ready to instantiate.
pub fn prepare(engine: &PluginEngine, config: &PluginConfig, defaults: PluginLimits) -> anyhow::Result<PluginSpec> {
    let bytes: std::borrow::Cow<'static, [u8]> = match (&config.bundled, &config.path) {
        (Some(name), _) => bundled::get(name)
            .with_context(|| format!("no bundled plugin {name:?}; bundled: {}", bundled::names().collect::<Vec<_>>().join(", ")))?
            .into(),
        (None, Some(path)) => std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?.into(),
        (None, None) => anyhow::bail!("neither `bundled` nor `path` set"),
    };
    let component = engine.compile(&bytes).context("not a valid wasmtap plugin component")?;
    let pre = engine.prepare(&component).context("the component does not fit the wasmtap:plugin world")?;
    Ok(PluginSpec {
        name: config.name.clone(),
        namespace: config.namespace.clone().unwrap_or_else(|| namespace_for(&config.name)),
        config: config.init_config(),
        limits: config.limits(defaults),
        pre,
    })
}
