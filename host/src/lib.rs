//! wasmtap: kernel eBPF probes streamed in batches into sandboxed WebAssembly plugins.
//!
//! The modules follow the pipeline: `probes` → `events` → `plugins` → `sinks` → `server`;
//! `enrich` answers plugins' questions about processes and cgroups.

pub mod budget;
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod enrich;
pub mod events;
pub mod names;
pub mod plugins;
pub mod privileges;
pub mod probes;
pub mod recording;
pub mod server;
pub mod sinks;
