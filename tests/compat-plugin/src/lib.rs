//! A plugin frozen at WIT 0.2.0: built against `wit/` here (never edited), with its own
//! copy of the 0.2.0 record layouts, not the SDK. It counts the syscalls of one comm
//! by number, and the exits of that comm's processes by exit code, reading each record
//! at the host's stride (the host's `process` record has grown since 0.2.0). Built by
//! `tests/build.rs`; the compatibility test runs it in the current host.

wit_bindgen::generate!({ path: "wit", world: "plugin" });

use std::{cell::RefCell, collections::HashMap};

use exports::wasmtap::plugin::handler::Guest;
use wasmtap::plugin::{
    metrics::{self, FamilyDesc, MetricKind},
    types::{ConfigValue, Filter, HostInfo, Manifest, Subscription},
};

/// 0.2.0 layouts: the header is 40 bytes; `syscall-nr` at 56; `event` at 40 and
/// `exit-code` at 56 in a 64-byte process record.
const SYSCALL_NR: usize = 56;
const EVENT: usize = 40;
const EXIT_CODE: usize = 56;
const EXIT: u32 = 3;

struct State {
    calls: metrics::Family,
    exits: metrics::Family,
    series: HashMap<(bool, i64), metrics::Series>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

fn u32_at(record: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(record[at..at + 4].try_into().unwrap())
}

struct Plugin;

impl Guest for Plugin {
    fn init(_host: HostInfo, config: Vec<ConfigValue>) -> Result<Manifest, String> {
        let comm = match config.first() {
            Some(ConfigValue::Table(entries)) => entries.iter().find(|(k, _)| k == "comm").and_then(|(_, at)| match &config[*at as usize] {
                ConfigValue::String(s) => Some(s.clone()),
                _ => None,
            }),
            _ => None,
        }
        .ok_or("config needs comm = \"...\"")?;
        let family = |name: &str, label: &str| {
            metrics::declare_family(&FamilyDesc {
                name: name.into(),
                help: "Compatibility fixture.".into(),
                kind: MetricKind::Counter,
                label_names: vec![label.into()],
                buckets: vec![],
            })
        };
        STATE.with(|s| -> Result<(), String> {
            *s.borrow_mut() = Some(State { calls: family("calls", "nr")?, exits: family("exits", "code")?, series: HashMap::new() });
            Ok(())
        })?;
        let filter = |params: Vec<(String, Vec<String>)>| Filter { pids: vec![], cgroups: vec![], comms: vec![comm.clone()], params };
        Ok(Manifest {
            subscriptions: vec![
                Subscription { kind: "syscall".into(), filter: filter(vec![]) },
                Subscription { kind: "process".into(), filter: filter(vec![("events".into(), vec!["exit".into()])]) },
            ],
            tick_interval_ms: 0,
        })
    }

    fn on_batch(kind: String, record_size: u32, records: Vec<u8>, _dropped: u64) {
        STATE.with(|s| {
            let mut state = s.borrow_mut();
            let state = state.as_mut().unwrap();
            for record in records.chunks_exact(record_size as usize) {
                let key = match kind.as_str() {
                    "syscall" => (false, i64::from(u32_at(record, SYSCALL_NR))),
                    "process" if u32_at(record, EVENT) == EXIT => (true, i64::from(u32_at(record, EXIT_CODE) as i32)),
                    _ => continue,
                };
                let family = if key.0 { &state.exits } else { &state.calls };
                let series = state.series.entry(key).or_insert_with(|| family.series(&[key.1.to_string()]).unwrap());
                series.counter_add(1);
            }
        })
    }

    fn tick(_now_ns: u64) {}
}

export!(Plugin);
