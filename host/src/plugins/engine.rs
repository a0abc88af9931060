//! The wasmtime engine shared by all plugins: epoch ticker for call deadlines, and an
//! on-disk cache of precompiled components.

use std::{
    hash::{DefaultHasher, Hash as _, Hasher as _},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    thread,
    time::Duration,
};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};
use wasmtime::{
    Config, Engine,
    component::{Component, Linker},
};

use super::host::{Plugin, PluginPre, PluginState};

/// Granularity of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

pub struct PluginEngine {
    engine: Engine,
    cache_dir: Option<PathBuf>,
    stop: Arc<AtomicBool>,
}

impl PluginEngine {
    pub fn new(cache_dir: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config.wasm_component_model(true).epoch_interruption(true).cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&config)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (ticker, stop_ticker) = (engine.weak(), stop.clone());
        thread::Builder::new().name("wasmtap-epoch".into()).spawn(move || {
            while !stop_ticker.load(Relaxed) {
                thread::sleep(EPOCH_TICK);
                match ticker.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })?;
        let cache_dir = cache_dir.filter(|dir| match std::fs::create_dir_all(dir) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("plugin cache {} unusable ({e}); compiling without a cache", dir.display());
                false
            }
        });
        Ok(Self { engine, cache_dir, stop })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Epoch ticks that make up `deadline`.
    pub fn ticks(deadline: Duration) -> u64 {
        (deadline.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
    }

    /// Compiles `bytes`, or loads the precompiled artifact from the cache.
    pub fn compile(&self, bytes: &[u8]) -> anyhow::Result<Component> {
        let Some(dir) = &self.cache_dir else {
            return Ok(Component::new(&self.engine, bytes)?);
        };
        let mut compat = DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut compat);
        let key = format!("{:x}-{:016x}", Sha256::digest(bytes), compat.finish());
        let path = dir.join(format!("{key}.cwasm"));
        if path.is_file() {
            // SAFETY: files in the cache dir are only ever written below, from
            // `precompile_component` output of this engine configuration, and renamed
            // into place whole; the key covers the source bytes and engine settings.
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::warn!("discarding cached {}: {e:#}", path.display()),
            }
        }
        let compiled = self.engine.precompile_component(bytes)?;
        let tmp = dir.join(format!("{key}.{}.tmp", std::process::id()));
        if let Err(e) = std::fs::write(&tmp, &compiled).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::warn!("cannot cache a compiled plugin in {}: {e}", dir.display());
        }
        // SAFETY: `compiled` was produced by this engine just above.
        Ok(unsafe { Component::deserialize(&self.engine, &compiled) }?)
    }

    /// Links the host imports; every other import (the WASI interfaces a guest's std
    /// pulls in) traps when called, so plugins get no filesystem, network, env or clock.
    pub fn prepare(&self, component: &Component) -> anyhow::Result<PluginPre<PluginState>> {
        let mut linker = Linker::new(&self.engine);
        Plugin::add_to_linker::<PluginState, wasmtime::component::HasSelf<PluginState>>(&mut linker, |s| s)?;
        linker.define_unknown_imports_as_traps(component)?;
        let pre = linker.instantiate_pre(component).map_err(anyhow::Error::from).context("linking the plugin")?;
        Ok(PluginPre::new(pre)?)
    }
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// Default cache location: /var/cache/wasmtap for root, the XDG cache otherwise.
pub fn default_cache_dir() -> Option<PathBuf> {
    if nix::unistd::geteuid().is_root() {
        return Some(PathBuf::from("/var/cache/wasmtap"));
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("wasmtap"))
}
