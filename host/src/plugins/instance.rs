//! One plugin instance: its Store and bindings, and the calls the host makes into it,
//! each under an epoch deadline.

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow};
use wasmtime::Store;

use super::{
    engine::PluginEngine,
    host::{HostInfo, Manifest, Plugin, PluginState, WitEventKind},
    worker::PluginSpec,
};
use crate::sinks::MetricSink;

pub struct Instance {
    store: Store<PluginState>,
    bindings: Plugin,
}

/// Creates a fresh Store (memory limit, deadline trap), instantiates and runs `init`.
pub fn instantiate(engine: &PluginEngine, spec: &PluginSpec, sink: &Arc<MetricSink>) -> anyhow::Result<(Instance, Manifest)> {
    let state = PluginState::new(&spec.name, &spec.namespace, sink.clone(), spec.limits.memory_bytes);
    let mut store = Store::new(engine.engine(), state);
    store.limiter(|s| &mut s.limiter);
    store.epoch_deadline_trap();
    let deadline = PluginEngine::ticks(Duration::from_millis(spec.limits.call_deadline_ms));
    store.set_epoch_deadline(deadline);
    let bindings = spec.pre.instantiate(&mut store).map_err(anyhow::Error::from).context("instantiating")?;
    let host = HostInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        arch: std::env::consts::ARCH.into(),
        instance: spec.name.clone(),
    };
    store.set_epoch_deadline(deadline);
    let manifest = bindings
        .wasmtap_plugin_handler()
        .call_init(&mut store, &host, &spec.config)
        .map_err(anyhow::Error::from)
        .context("init trapped")?
        .map_err(|e| anyhow!("init refused: {e}"))?;
    Ok((Instance { store, bindings }, manifest))
}

impl Instance {
    /// Hands the plugin one batch of syscall records.
    pub fn on_batch(&mut self, deadline: Duration, records: &[u8], dropped: u64) -> anyhow::Result<()> {
        self.store.set_epoch_deadline(PluginEngine::ticks(deadline));
        self.bindings
            .wasmtap_plugin_handler()
            .call_on_batch(&mut self.store, WitEventKind::Syscall, wasmtap_events::SyscallRecord::SIZE as u32, records, dropped)
            .map_err(anyhow::Error::from)
            .context("on-batch trapped")
    }

    /// Lets the plugin flush; `now` is the monotonic clock.
    pub fn tick(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
            .unwrap_or_default();
        self.store.set_epoch_deadline(PluginEngine::ticks(deadline));
        self.bindings
            .wasmtap_plugin_handler()
            .call_tick(&mut self.store, now)
            .map_err(anyhow::Error::from)
            .context("tick trapped")
    }

    /// Linear memory the instance has grown to.
    pub fn memory_bytes(&self) -> usize {
        self.store.data().limiter.current_bytes
    }
}
