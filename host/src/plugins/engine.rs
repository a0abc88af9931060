//! The wasmtime engine shared by all plugins: epoch ticker for call deadlines, bounded
//! compilation (in a child process, over pipes: no file anyone else could swap), and
//! the trusted on-disk cache of precompiled components ([`super::cache`]).

use std::{
    collections::VecDeque,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    io::{Read as _, Write as _},
    path::PathBuf,
    process::{Command, Stdio},
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
    cache::ArtifactCache,
    host::{Plugin, PluginPre, PluginState},
    wasi,
};
use crate::{
    budget::{Reason, Refusal},
    config::PluginLimits,
    sinks::logs::sanitize,
};

/// Granularity of call deadlines: a call is interrupted within one tick after its
/// deadline. The ticker's wakeups are a fixed cost (measured ~3.5 ns per event at
/// 1.2 M events/s with 10 ms), so ticks are no finer than deadlines need.
pub const EPOCH_TICK: Duration = Duration::from_millis(25);

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
    cache: Option<ArtifactCache>,
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

/// `wasmtap compile-plugin`: compiles the component on stdin to stdout under
/// `max_memory` bytes of address space. Runs in the child process.
pub fn compile_stream(max_memory: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, setrlimit};
    setrlimit(Resource::RLIMIT_AS, max_memory, max_memory).context("setting the compile memory limit")?;
    let mut bytes = Vec::new();
    std::io::stdin().read_to_end(&mut bytes).context("reading the component")?;
    let compiled = Engine::new(&engine_config())?.precompile_component(&bytes)?;
    std::io::stdout().write_all(&compiled).context("writing the compiled component")
}

impl PluginEngine {
    /// `cache`: where precompiled components are kept (see [`super::cache`]), and how
    /// many bytes of them at most.
    pub fn new(cache: Option<(PathBuf, u64)>, compiler: Compiler) -> anyhow::Result<Self> {
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
        let cache = cache.and_then(|(dir, max_bytes)| ArtifactCache::open(dir, max_bytes));
        Ok(Self { engine, cache, compiler, stop, recent: Mutex::default() })
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
        let Compiler::Child(exe) = &self.compiler else {
            return Component::new(&self.engine, bytes).map_err(|e| CompileError::Invalid(e.into()));
        };
        if let Some(artifact) = self.cache.as_ref().and_then(|c| c.load(key, limits.compile_memory_bytes)) {
            // SAFETY: the artifact comes from a directory and file only this user (or
            // root) can write (checked just now), where only `compile_stream` output for
            // this engine configuration is stored, under a key covering the source bytes
            // and engine settings.
            match unsafe { Component::deserialize(&self.engine, &artifact) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::warn!("discarding cached {key}: {e:#}"),
            }
        }
        let artifact = self.compile_in_child(exe, bytes, limits)?;
        // SAFETY: `compile_stream` output with this engine's configuration, read from
        // the pipe of the child this process started.
        let component = unsafe { Component::deserialize(&self.engine, &artifact) }.map_err(|e| CompileError::Invalid(e.into()))?;
        if let Some(cache) = &self.cache {
            cache.store(key, &artifact);
        }
        Ok(component)
    }

    fn compile_in_child(&self, exe: &std::path::Path, bytes: &[u8], limits: &PluginLimits) -> Result<Vec<u8>, CompileError> {
        let io = |what: &str, e: std::io::Error| CompileError::Invalid(anyhow::anyhow!("{what}: {e}"));
        let mut child = Command::new(exe)
            .arg("compile-plugin")
            .arg(limits.compile_memory_bytes.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| io("starting the compiler process", e))?;
        // Feed and drain the pipes on their own threads (the child blocks on a full
        // one); its output cannot exceed its address space, its stderr is cut at 4 KiB.
        let (mut stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let max_output = limits.compile_memory_bytes;
        let output = stdout.map(|pipe| {
            thread::spawn(move || {
                let mut artifact = Vec::new();
                pipe.take(max_output).read_to_end(&mut artifact).map(|_| artifact)
            })
        });
        let stderr = stderr.map(|pipe| {
            thread::spawn(move || {
                let mut kept = String::new();
                let mut pipe = pipe;
                let _ = (&mut pipe).take(4096).read_to_string(&mut kept);
                let _ = std::io::copy(&mut pipe, &mut std::io::sink());
                kept
            })
        });
        let input = bytes.to_vec();
        let feeder = stdin.take().map(|mut pipe| thread::spawn(move || pipe.write_all(&input)));
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
        let _ = feeder.map(thread::JoinHandle::join);
        let artifact = output.and_then(|t| t.join().ok());
        if status.success()
            && let Some(Ok(artifact)) = artifact
        {
            return Ok(artifact);
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
