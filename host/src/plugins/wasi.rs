//! A capability-free WASI 0.2 subset, so plugins built with ordinary std (`println!`,
//! `HashMap::new()`, panics) and components from other languages run unchanged.
//!
//! The rule: a plugin gets an empty environment and argument list, a closed stdin,
//! clocks (waiting on one returns at once), randomness (64 KiB per call), and
//! stdout/stderr that go to its log sink (under its log budget).
//! It gets no filesystem, sockets or any other authority: a component that imports
//! anything outside `ALLOWED` (or the `wasmtap:plugin` imports) is refused at load with
//! an error naming the import.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime::{
    Engine,
    component::{Component, HasData, HasSelf, Linker, Resource, ResourceTable, types::ComponentItem},
};
use wasmtime_wasi::{
    WasiCtx, WasiCtxBuilder,
    cli::{IsTerminal, StdoutStream, WasiCli, WasiCliCtxView},
    clocks::{WasiClocks, WasiClocksCtxView},
    p2::{
        DynPollable, OutputStream, Pollable, StreamResult,
        bindings::{
            cli,
            clocks::{self, monotonic_clock},
            random,
            sync::io,
        },
    },
    random::{WasiRandom, WasiRandomCtx},
};

use super::host::PluginState;
use crate::{
    budget::{Reason, Refusal},
    sinks::logs::{Level, LogSink, MAX_MESSAGE_BYTES, sanitize},
};

/// The WASI interfaces a plugin may import (any 0.2.x version).
pub const ALLOWED: &[&str] = &[
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:io/error",
    "wasi:io/poll",
    "wasi:io/streams",
    "wasi:clocks/monotonic-clock",
    "wasi:clocks/wall-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
];

/// Refuses a component that imports anything but the allowed WASI subset and the
/// wasmtap contract, naming the first such import.
pub fn check_imports(engine: &Engine, component: &Component) -> Result<(), Refusal> {
    for (name, import) in component.component_type().imports(engine) {
        let base = name.split('@').next().unwrap_or(name);
        let allowed = matches!(import.ty, ComponentItem::ComponentInstance(_)) && (ALLOWED.contains(&base) || base.starts_with("wasmtap:plugin/"));
        if !allowed {
            return Err(Refusal::new(
                Reason::Import,
                format!(
                    "the component imports `{}`, which plugins do not get: plugins may import only the wasmtap:plugin \
                     interfaces and WASI's cli (empty environment, stdout/stderr to the log), clocks, random and io",
                    sanitize(name, 128)
                ),
            ));
        }
    }
    Ok(())
}

/// Adds the allowed interfaces to the linker.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> anyhow::Result<()> {
    fn cli_view(s: &mut PluginState) -> WasiCliCtxView<'_> {
        let (ctx, table) = s.wasi();
        WasiCliCtxView { ctx: ctx.cli(), table }
    }
    fn clocks_view(s: &mut PluginState) -> WasiClocksCtxView<'_> {
        let (ctx, table) = s.wasi();
        WasiClocksCtxView { ctx: ctx.clocks(), table }
    }
    fn random_view(s: &mut PluginState) -> &mut WasiRandomCtx {
        s.wasi().0.random()
    }
    fn table(s: &mut PluginState) -> &mut ResourceTable {
        s.wasi().1
    }
    type Io = HasSelf<ResourceTable>;
    type S = PluginState;
    io::error::add_to_linker::<S, Io>(linker, table)?;
    io::poll::add_to_linker::<S, Io>(linker, table)?;
    io::streams::add_to_linker::<S, Io>(linker, table)?;
    clocks::wall_clock::add_to_linker::<S, WasiClocks>(linker, clocks_view)?;
    clocks::monotonic_clock::add_to_linker::<S, Immediate>(linker, |s| ImmediateClock(clocks_view(s)))?;
    random::random::add_to_linker::<S, WasiRandom>(linker, random_view)?;
    random::insecure::add_to_linker::<S, WasiRandom>(linker, random_view)?;
    random::insecure_seed::add_to_linker::<S, WasiRandom>(linker, random_view)?;
    cli::environment::add_to_linker::<S, WasiCli>(linker, cli_view)?;
    cli::exit::add_to_linker::<S, WasiCli>(linker, cli_view)?;
    cli::stdin::add_to_linker::<S, WasiCli>(linker, cli_view)?;
    cli::stdout::add_to_linker::<S, WasiCli>(linker, cli_view)?;
    cli::stderr::add_to_linker::<S, WasiCli>(linker, cli_view)?;
    cli::terminal_input::add_to_linker::<S, WasiCli>(linker, cli_view)?;
    cli::terminal_output::add_to_linker::<S, WasiCli>(linker, cli_view)?;
    cli::terminal_stdin::add_to_linker::<S, WasiCli>(linker, cli_view)?;
    cli::terminal_stdout::add_to_linker::<S, WasiCli>(linker, cli_view)?;
    cli::terminal_stderr::add_to_linker::<S, WasiCli>(linker, cli_view)?;
    Ok(())
}

/// The monotonic clock, except that waiting on it returns at once: a plugin's call is
/// bounded by its epoch deadline, which does not run while the host blocks for it, so a
/// `sleep` must not block the worker.
struct ImmediateClock<'a>(WasiClocksCtxView<'a>);

struct Immediate;

impl HasData for Immediate {
    type Data<'a> = ImmediateClock<'a>;
}

impl monotonic_clock::Host for ImmediateClock<'_> {
    fn now(&mut self) -> wasmtime::Result<monotonic_clock::Instant> {
        self.0.now()
    }

    fn resolution(&mut self) -> wasmtime::Result<monotonic_clock::Duration> {
        self.0.resolution()
    }

    fn subscribe_instant(&mut self, _when: monotonic_clock::Instant) -> wasmtime::Result<Resource<DynPollable>> {
        self.0.subscribe_duration(0)
    }

    fn subscribe_duration(&mut self, _duration: monotonic_clock::Duration) -> wasmtime::Result<Resource<DynPollable>> {
        self.0.subscribe_duration(0)
    }
}

/// Handles (streams, pollables) one instance may hold in its WASI table.
pub const MAX_WASI_HANDLES: usize = 256;
/// Bytes one `wasi:random` call may ask for.
const MAX_RANDOM_BYTES: u64 = 64 << 10;

/// A WASI context with no authority, and its stdout and stderr (which go to `logs`).
pub fn context(logs: &LogSink) -> (WasiCtx, [GuestOutput; 2]) {
    let outputs = [GuestOutput::new(logs.clone(), Level::Info), GuestOutput::new(logs.clone(), Level::Warn)];
    let ctx = WasiCtxBuilder::new()
        .stdout(outputs[0].clone())
        .stderr(outputs[1].clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .max_random_size(MAX_RANDOM_BYTES)
        .build();
    (ctx, outputs)
}

/// stdout or stderr of a plugin: cut into lines, each one log record. Bytes beyond the
/// log budget are dropped (and counted by the sink), never an error: Rust's `println!`
/// panics when a write fails.
#[derive(Clone)]
pub struct GuestOutput {
    logs: LogSink,
    level: Level,
    line: Arc<Mutex<Vec<u8>>>,
}

impl GuestOutput {
    fn new(logs: LogSink, level: Level) -> Self {
        Self { logs, level, line: Arc::default() }
    }

    fn push(&self, bytes: &[u8]) {
        let mut line = self.line.lock().expect("guest output");
        for &b in bytes {
            if b == b'\n' || line.len() >= MAX_MESSAGE_BYTES {
                self.emit(&mut line);
            }
            if b != b'\n' {
                line.push(b);
            }
        }
    }

    /// Logs what is left of an unfinished line (after each call into the plugin).
    pub fn finish(&self) {
        self.emit(&mut self.line.lock().expect("guest output"));
    }

    fn emit(&self, line: &mut Vec<u8>) {
        if !line.is_empty() {
            self.logs.log(self.level, String::from_utf8_lossy(line).into_owned(), Vec::new());
            line.clear();
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    /// Lines are written whole: `eprintln!` flushes after each piece of a line.
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(MAX_MESSAGE_BYTES)
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>, b: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        self.push(b);
        std::task::Poll::Ready(Ok(b.len()))
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
