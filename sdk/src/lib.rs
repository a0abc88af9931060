//! The Rust SDK for wasmtap plugins.
//!
//! A plugin implements [`Plugin`] and calls [`export_plugin!`]; the SDK supplies the
//! WIT bindings, zero-copy typed views over each batch ([`SyscallBatch`],
//! [`ProcessBatch`], [`SchedBatch`], [`TcpBatch`], [`UprobeBatch`]), the typed configuration ([`Config`]), enrichment ([`enrich`]), and
//! metric helpers that aggregate in the guest and flush one delta per series per batch
//! ([`HistogramVec`], [`CounterVec`], [`GaugeVec`]).
//!
//! ```no_run
//! use wasmtap_sdk::*;
//!
//! /// Counts calls per syscall number.
//! struct Calls(CounterVec<u32>);
//!
//! impl Plugin for Calls {
//!     fn init(_: &HostInfo, _: &Config) -> Result<(Self, Manifest), String> {
//!         let calls = CounterVec::declare(Wit, "calls", "System calls.", &["nr"])?;
//!         let subscriptions = vec![Subscription { kind: SyscallRecord::KIND.into(), filter: Filter::default() }];
//!         Ok((Self(calls), Manifest { subscriptions, tick_interval_ms: 0 }))
//!     }
//!
//!     fn on_syscalls(&mut self, batch: SyscallBatch<'_>) {
//!         for r in batch.records() {
//!             self.0.add(r.syscall_nr, 1, |nr| vec![nr.to_string()]);
//!         }
//!         self.0.flush(); // one host call per touched series
//!     }
//! }
//!
//! export_plugin!(Calls);
//! ```

pub mod aggregate;
pub mod batch;
pub mod config;
pub mod host;
pub mod names;

pub use aggregate::{CounterVec, GaugeVec, HistogramVec};
pub use batch::{Batch, ProcessBatch, SchedBatch, SyscallBatch, TcpBatch, UprobeBatch};
pub use config::{Config, FromConfig};
pub use host::{HostApi, Wit};
pub use wasmtap_events::{ProcessRecord, Record, RecordHeader, SchedRecord, SyscallRecord, TcpRecord, UprobeRecord, process, sched, tcp, uprobe};

/// Bindings generated from `wit/` (the one contract with the host).
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        // Every SDK plugin exports `state`; one that keeps no state answers "none".
        world: "stateful-plugin",
        pub_export_macro: true,
        export_macro_name: "export_handler",
        default_bindings_module: "wasmtap_sdk::bindings",
    });
}

pub use bindings::wasmtap::plugin::types::{ConfigValue, Filter, HostInfo, Manifest, Subscription};
// The host's interfaces: the component's imports in a Wasm build; natively (an author's
// `cargo test`), the same names served by the thread's `testkit::TestHost`.
#[cfg(target_family = "wasm")]
use bindings::wasmtap::plugin::names as host_names;
#[cfg(target_family = "wasm")]
pub use bindings::wasmtap::plugin::{enrich, logs, metrics};
#[cfg(not(target_family = "wasm"))]
use testkit::imports::names as host_names;
#[cfg(not(target_family = "wasm"))]
pub use testkit::imports::{enrich, logs, metrics};
#[cfg(not(target_family = "wasm"))]
pub mod testkit;

impl Default for Filter {
    /// Everything of the kind.
    fn default() -> Self {
        Self { pids: Vec::new(), cgroups: Vec::new(), comms: Vec::new(), params: Vec::new() }
    }
}

/// A wasmtap plugin: state created by `init`, fed batches, flushed on `tick`.
pub trait Plugin: Sized + 'static {
    /// Builds the plugin from its host configuration and declares what it subscribes to.
    fn init(host: &HostInfo, config: &Config) -> Result<(Self, Manifest), String>;

    /// Handles one batch of `syscall` records.
    fn on_syscalls(&mut self, _batch: SyscallBatch<'_>) {}

    /// Handles one batch of `process` records.
    fn on_process(&mut self, _batch: ProcessBatch<'_>) {}

    /// Handles one batch of `sched` records (run-queue waits).
    fn on_sched(&mut self, _batch: SchedBatch<'_>) {}

    /// Handles one batch of `tcp` records (connection events).
    fn on_tcp(&mut self, _batch: TcpBatch<'_>) {}

    /// Handles one batch of `uprobe` records (hits of the probe points the plugin
    /// named; `uprobe::probe_id` of a point's text tells them apart).
    fn on_uprobe(&mut self, _batch: UprobeBatch<'_>) {}

    /// Handles a batch of a kind this SDK has no typed view for (raw records,
    /// `record_size` bytes apart).
    fn on_other(&mut self, _kind: &str, _record_size: u32, _records: &[u8], _dropped: u64) {}

    /// Periodic (and final) flush; see the manifest's `tick-interval-ms`.
    fn tick(&mut self, _now_ns: u64) {}

    /// State to carry into the build that replaces this one (after the last batch and
    /// the final tick). `None`, the default, carries nothing.
    fn snapshot(&mut self) -> Option<Vec<u8>> {
        None
    }

    /// Takes over what the replaced build's [`Plugin::snapshot`] returned, after
    /// `init` and before the first batch. An error aborts the replace (the old build
    /// keeps running). The default ignores the state.
    fn restore(&mut self, _state: Vec<u8>) -> Result<(), String> {
        Ok(())
    }
}

/// Writes a log record through the host's log sink.
pub fn log(level: logs::Level, message: &str) {
    logs::log(level, message, &[]);
}

/// Sends panic messages to the host's log sink (at error level), where the operator
/// sees them and the host shows the last one as the reason for the fault. Installed by
/// [`export_plugin!`] before `init`.
pub fn report_panics() {
    std::panic::set_hook(Box::new(|info| logs::log(logs::Level::Error, &format!("panic: {info}"), &[])));
}

/// Hands a batch to the plugin's method for its kind (used by [`export_plugin!`]).
#[doc(hidden)]
pub fn dispatch<P: Plugin>(plugin: &mut P, kind: &str, record_size: u32, records: &[u8], dropped: u64) {
    match kind {
        SyscallRecord::KIND => plugin.on_syscalls(SyscallBatch::new(records, record_size, dropped)),
        ProcessRecord::KIND => plugin.on_process(ProcessBatch::new(records, record_size, dropped)),
        SchedRecord::KIND => plugin.on_sched(SchedBatch::new(records, record_size, dropped)),
        TcpRecord::KIND => plugin.on_tcp(TcpBatch::new(records, record_size, dropped)),
        UprobeRecord::KIND => plugin.on_uprobe(UprobeBatch::new(records, record_size, dropped)),
        other => plugin.on_other(other, record_size, records, dropped),
    }
}

/// Exports a [`Plugin`] implementation as the component's `handler`.
#[macro_export]
#[rustfmt::skip] // rustfmt cannot parse `export_handler!(… with_types_in …)` and mangles it
macro_rules! export_plugin {
    ($plugin:ty) => {
        // Component exports only mean something in a Wasm build; natively (tests,
        // benchmarks) the plugin is a plain Rust library.
        #[cfg(target_family = "wasm")]
        const _: () = {
            ::std::thread_local! {
                static STATE: ::core::cell::RefCell<Option<$plugin>> =
                    const { ::core::cell::RefCell::new(None) };
            }

            struct Export;

            impl $crate::bindings::exports::wasmtap::plugin::handler::Guest for Export {
                fn init(host: $crate::HostInfo, config: ::std::vec::Vec<$crate::ConfigValue>) -> Result<$crate::Manifest, ::std::string::String> {
                    $crate::report_panics();
                    let config = $crate::Config::new(config);
                    let (plugin, manifest) = <$plugin as $crate::Plugin>::init(&host, &config)?;
                    STATE.with(|s| *s.borrow_mut() = Some(plugin));
                    Ok(manifest)
                }

                fn on_batch(kind: ::std::string::String, record_size: u32, records: ::std::vec::Vec<u8>, dropped: u64) {
                    STATE.with(|s| {
                        let mut state = s.borrow_mut();
                        let plugin = state.as_mut().expect("on-batch before init");
                        $crate::dispatch(plugin, &kind, record_size, &records, dropped);
                    })
                }

                fn tick(now_ns: u64) {
                    STATE.with(|s| {
                        if let Some(plugin) = s.borrow_mut().as_mut() {
                            $crate::Plugin::tick(plugin, now_ns);
                        }
                    })
                }
            }

            impl $crate::bindings::exports::wasmtap::plugin::state::Guest for Export {
                fn snapshot() -> Option<::std::vec::Vec<u8>> {
                    STATE.with(|s| s.borrow_mut().as_mut().and_then($crate::Plugin::snapshot))
                }

                fn restore(state: ::std::vec::Vec<u8>) -> Result<(), ::std::string::String> {
                    STATE.with(|s| match s.borrow_mut().as_mut() {
                        Some(plugin) => $crate::Plugin::restore(plugin, state),
                        None => Err("restore before init".into()),
                    })
                }
            }

            $crate::bindings::export_handler!(Export with_types_in $crate::bindings);
        };
    };
}
