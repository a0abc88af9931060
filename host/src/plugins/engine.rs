//! The wasmtime engine shared by all plugins: epoch ticker for call deadlines, bounded
//! compilation (in a child process), and an on-disk cache of precompiled components.

use std::{
    hash::{DefaultHasher, Hash as _, Hasher as _},
    io::Read as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use wasmtime::{
    Config, Engine,
    component::{Component, Linker},
};

use super::{
    host::{Plugin, PluginPre, PluginState},
    wasi,
};
use crate::{
    budget::{Reason, Refusal},
    config::PluginLimits,
    sinks::logs::sanitize,
};

/// Granularity of call deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Where components are compiled.
#[derive(Debug, Clone)]
pub enum Compiler {
    /// In a child process (this executable's `compile-plugin`) under an address-space
    /// limit and a deadline, so a component built to be expensive to compile can cost
    /// neither the daemon's memory nor its start-up: the daemon's choice.
    Child(PathBuf),
    /// In this process, without limits: for tests and benchmarks of trusted plugins.
    InProcess,
}

pub struct PluginEngine {
    engine: Engine,
    cache_dir: Option<PathBuf>,
    compiler: Compiler,
    stop: Arc<AtomicBool>,
    /// The last few components compiled or loaded, by cache key: a replace that goes
    /// back and forth between builds (or restarts one) skips the disk.
    recent: Mutex<VecDeque<(String, Component)>>,
}

/// Components kept in memory (each holds its compiled code).
const RECENT_COMPONENTS: usize = 4;

/// The engine settings; the compiling child must use the very same ones.
fn engine_config() -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true).epoch_interruption(true).cranelift_opt_level(wasmtime::OptLevel::Speed);
    config
}

/// `wasmtap compile-plugin`: compiles `input` into `output` under `max_memory` bytes of
/// address space. Runs in the child process.
pub fn compile_to_file(input: &Path, output: &Path, max_memory: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, setrlimit};
    setrlimit(Resource::RLIMIT_AS, max_memory, max_memory).context("setting the compile memory limit")?;
    let bytes = std::fs::read(input).with_context(|| format!("reading {}", input.display()))?;
    let compiled = Engine::new(&engine_config())?.precompile_component(&bytes)?;
    std::fs::write(output, compiled).with_context(|| format!("writing {}", output.display()))
}

impl PluginEngine {
    pub fn new(cache_dir: Option<PathBuf>, compiler: Compiler) -> anyhow::Result<Self> {
        let engine = Engine::new(&engine_config())?;
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
        Ok(Self { engine, cache_dir, compiler, stop, recent: Mutex::default() })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Epoch ticks that make up `deadline`.
    pub fn ticks(deadline: Duration) -> u64 {
        (deadline.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
    }

    /// Compiles `bytes` (or loads the precompiled artifact from the cache), within the
    /// plugin's size, time and memory limits.
    /// `sha256`: the bytes' hash (hex), which the caller has already.
    pub fn compile(&self, bytes: &[u8], sha256: &str, limits: &PluginLimits) -> Result<Component, CompileError> {
        if bytes.len() > limits.component_bytes {
            return Err(CompileError::Refused(Refusal::new(
                Reason::ComponentBytes,
                format!("the component has {} bytes; the limit is {} (component_bytes)", bytes.len(), limits.component_bytes),
            )));
        }
        let mut compat = DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut compat);
        let key = format!("{sha256}-{:016x}", compat.finish());
        if let Some((_, component)) = self.recent.lock().expect("recent").iter().find(|(k, _)| *k == key) {
            return Ok(component.clone());
        }
        let component = self.compile_uncached(bytes, limits, &key)?;
        let mut recent = self.recent.lock().expect("recent");
        if recent.len() == RECENT_COMPONENTS {
            recent.pop_front();
        }
        recent.push_back((key, component.clone()));
        Ok(component)
    }

    fn compile_uncached(&self, bytes: &[u8], limits: &PluginLimits, key: &str) -> Result<Component, CompileError> {
        let cached = self.cache_dir.as_ref().map(|dir| dir.join(format!("{key}.cwasm")));
        if let Some(path) = cached.as_ref().filter(|p| p.is_file()) {
            // SAFETY: files in the cache dir are only ever written by `compile_to_file`
            // (this engine configuration) and renamed into place whole; the key covers
            // the source bytes and engine settings.
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::warn!("discarding cached {}: {e:#}", path.display()),
            }
        }
        let Compiler::Child(exe) = &self.compiler else {
            return Component::new(&self.engine, bytes).map_err(|e| CompileError::Invalid(e.into()));
        };
        // The cache dir is the daemon's own; without one, a fresh directory only this
        // user can enter, so nobody can swap the artifact before it is loaded.
        let (dir, private) = match &self.cache_dir {
            Some(dir) => (dir.clone(), false),
            None => (private_dir().map_err(|e| CompileError::Invalid(anyhow::anyhow!("making a private compile directory: {e}")))?, true),
        };
        let tmp = |ext: &str| dir.join(format!("{key}.{}.{ext}", std::process::id()));
        let (input, output) = (tmp("wasm"), tmp("cwasm.tmp"));
        let result = self.compile_in_child(exe, bytes, &input, &output, limits);
        let _ = std::fs::remove_file(&input);
        let loaded = result.and_then(|()| {
            // SAFETY: `output` was just written by `compile_to_file` with this engine's
            // configuration, in a file only this process names.
            unsafe { Component::deserialize_file(&self.engine, &output) }.map_err(|e| CompileError::Invalid(e.into()))
        });
        match (&loaded, &cached) {
            (Ok(_), Some(path)) => {
                if let Err(e) = std::fs::rename(&output, path) {
                    tracing::warn!("cannot cache a compiled plugin in {}: {e}", dir.display());
                }
            }
            _ => drop(std::fs::remove_file(&output)),
        }
        if private {
            let _ = std::fs::remove_dir_all(&dir);
        }
        loaded
    }

    fn compile_in_child(&self, exe: &Path, bytes: &[u8], input: &Path, output: &Path, limits: &PluginLimits) -> Result<(), CompileError> {
        let io = |what: &str, e: std::io::Error| CompileError::Invalid(anyhow::anyhow!("{what}: {e}"));
        std::fs::write(input, bytes).map_err(|e| io("writing the component for the compiler", e))?;
        let mut child = Command::new(exe)
            .arg("compile-plugin")
            .arg(input)
            .arg(output)
            .arg(limits.compile_memory_bytes.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io("starting the compiler process", e))?;
        // Read stderr as it comes (the child would block on a full pipe), keeping 4 KiB.
        let stderr = child.stderr.take().map(|pipe| {
            thread::spawn(move || {
                let mut kept = String::new();
                let mut pipe = pipe;
                let _ = (&mut pipe).take(4096).read_to_string(&mut kept);
                let _ = std::io::copy(&mut pipe, &mut std::io::sink());
                kept
            })
        });
        let deadline = Instant::now() + Duration::from_millis(limits.compile_timeout_ms);
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| io("waiting for the compiler", e))? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CompileError::Refused(Refusal::new(
                    Reason::CompileTime,
                    format!("compiling took longer than {} ms (compile_timeout_ms)", limits.compile_timeout_ms),
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if status.success() {
            return Ok(());
        }
        let stderr = stderr.and_then(|t| t.join().ok()).unwrap_or_default();
        Err(CompileError::Invalid(anyhow::anyhow!(
            "compiling failed ({status}): {}{}",
            sanitize(stderr.trim(), 1024),
            if stderr.contains("memory allocation") || stderr.contains("out of memory") {
                format!(" (compile_memory_bytes is {})", limits.compile_memory_bytes)
            } else {
                String::new()
            }
        )))
    }

    /// Links the host imports and the capability-free WASI subset (check the component
    /// with `wasi::check_imports` first, for an error that names a refused import).
    pub fn prepare(&self, component: &Component) -> anyhow::Result<PluginPre<PluginState>> {
        let mut linker = Linker::new(&self.engine);
        Plugin::add_to_linker::<PluginState, wasmtime::component::HasSelf<PluginState>>(&mut linker, |s| s)?;
        wasi::add_to_linker(&mut linker)?;
        let pre = linker.instantiate_pre(component).map_err(anyhow::Error::from).context("linking the plugin")?;
        Ok(PluginPre::new(pre)?)
    }
}

/// Why a component could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// Past a budget (size, time).
    #[error(transparent)]
    Refused(Refusal),
    /// Not a valid component, or the compiler failed.
    #[error("{0:#}")]
    Invalid(anyhow::Error),
}

impl Drop for PluginEngine {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// A new directory under the temp dir that only this user can enter.
fn private_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt as _;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let dir = std::env::temp_dir().join(format!("wasmtap-compile-{}-{nanos}", std::process::id()));
    // `create` fails if it exists: a directory someone made in advance is never used.
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
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
