//! One plugin instance: its Store and bindings, and the calls the host makes into it,
//! each under an epoch deadline.

use std::time::Duration;

use anyhow::{Context as _, anyhow};
use wasmtime::Store;

use super::{
    engine::PluginEngine,
    host::{HostInfo, Manifest, Plugin, PluginState, StateExport},
    worker::PluginSpec,
};
use crate::{probes::Kind, sinks::logs::sanitize};

/// Longest error text kept from a plugin (its `init` refusal, a trap): it ends up in
/// logs and in `/status`.
pub const MAX_ERROR_BYTES: usize = 1024;

pub struct Instance {
    store: Store<PluginState>,
    bindings: Plugin,
    /// The optional `state` export (carried across a replace).
    state: Option<StateExport>,
}

/// Creates a fresh Store (memory budget, deadline trap), instantiates and runs `init`.
pub fn instantiate(spec: &PluginSpec) -> anyhow::Result<(Instance, Manifest)> {
    let state = PluginState::new(&spec.namespace, spec.sink.clone(), spec.budget.clone(), spec.enricher.clone(), spec.logs.clone(), spec.staging.clone());
    let mut store = Store::new(spec.engine.engine(), state);
    store.limiter(|s| &mut s.limiter);
    store.epoch_deadline_trap();
    let deadline = PluginEngine::ticks(Duration::from_millis(spec.budget.limits.call_deadline_ms));
    store.set_epoch_deadline(deadline);
    let instantiated = spec.pre.instance_pre().instantiate(&mut store).and_then(|raw| {
        let bindings = Plugin::new(&mut store, &raw)?;
        let state = spec.state.as_ref().map(|indices| indices.load(&mut store, &raw)).transpose()?;
        Ok((bindings, state))
    });
    let (bindings, state) = match instantiated {
        Ok(parts) => parts,
        Err(e) => return Err(explain(store.data(), e).context("instantiating")),
    };
    let mut instance = Instance { store, bindings, state };
    instance.store.data_mut().begin_call();
    let host = HostInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        arch: std::env::consts::ARCH.into(),
        instance: spec.name.clone(),
        kinds: crate::probes::KINDS.iter().map(|k| k.name.to_owned()).collect(),
    };
    instance.store.set_epoch_deadline(deadline);
    let result = instance.bindings.wasmtap_plugin_handler().call_init(&mut instance.store, &host, &spec.config);
    let manifest = instance.finish(result).context("init trapped")?.map_err(|e| anyhow!("init refused: {}", sanitize(&e, MAX_ERROR_BYTES)))?;
    Ok((instance, manifest))
}

/// A trap's cause (without the wasm backtrace), after what the plugin last said was
/// wrong (a panic message) or why its memory could not grow; bounded and escaped.
fn explain(state: &PluginState, error: wasmtime::Error) -> anyhow::Error {
    let error = anyhow::Error::from(error);
    tracing::debug!("plugin trap with its wasm backtrace: {error:?}");
    let cause = error.root_cause();
    let text = match state.fault_hint() {
        Some(hint) => format!("{hint} ({cause})"),
        None => cause.to_string(),
    };
    anyhow!(sanitize(&text, MAX_ERROR_BYTES))
}

impl Instance {
    /// After a call: flush the plugin's unfinished output lines; explain a trap.
    fn finish<T>(&mut self, result: wasmtime::Result<T>) -> anyhow::Result<T> {
        self.store.data().finish_output();
        result.map_err(|e| explain(self.store.data(), e))
    }

    /// Hands the plugin one batch of records of `kind`.
    pub fn on_batch(&mut self, deadline: Duration, kind: Kind, records: &[u8], dropped: u64) -> anyhow::Result<()> {
        self.store.set_epoch_deadline(PluginEngine::ticks(deadline));
        self.store.data_mut().begin_call();
        let result = self.bindings.wasmtap_plugin_handler().call_on_batch(&mut self.store, kind.name, kind.record_size as u32, records, dropped);
        self.finish(result).context("on-batch trapped")
    }

    /// Lets the plugin flush; `now` is the monotonic clock.
    pub fn tick(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let now =
            nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64).unwrap_or_default();
        self.tick_at(deadline, now)
    }

    /// A tick at `now` (monotonic nanoseconds, the clock of record timestamps): a
    /// replay's ticks follow the recording's clock.
    pub fn tick_at(&mut self, deadline: Duration, now: u64) -> anyhow::Result<()> {
        self.store.set_epoch_deadline(PluginEngine::ticks(deadline));
        self.store.data_mut().begin_call();
        let result = self.bindings.wasmtap_plugin_handler().call_tick(&mut self.store, now);
        self.finish(result).context("tick trapped")
    }

    /// The build is no longer being swapped in: what it declares from now on is live.
    pub fn end_staging(&mut self) {
        self.store.data_mut().end_staging();
    }

    /// Whether the build exports the `state` interface.
    pub fn is_stateful(&self) -> bool {
        self.state.is_some()
    }

    /// The state to carry into the next build (none without the `state` export).
    pub fn snapshot(&mut self, deadline: Duration) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(state) = self.state.clone() else { return Ok(None) };
        self.store.set_epoch_deadline(PluginEngine::ticks(deadline));
        self.store.data_mut().begin_call();
        let result = state.call_snapshot(&mut self.store);
        self.finish(result).context("snapshot trapped")
    }

    /// Hands the previous build's state to this one.
    pub fn restore(&mut self, deadline: Duration, bytes: &[u8]) -> anyhow::Result<()> {
        let Some(state) = self.state.clone() else { return Ok(()) };
        self.store.set_epoch_deadline(PluginEngine::ticks(deadline));
        self.store.data_mut().begin_call();
        let result = state.call_restore(&mut self.store, bytes);
        self.finish(result).context("restore trapped")?.map_err(|e| anyhow!("restore refused: {}", sanitize(&e, MAX_ERROR_BYTES)))
    }

    /// Linear memory and tables the instance holds.
    pub fn memory_bytes(&self) -> usize {
        self.store.data().limiter.held
    }
}
