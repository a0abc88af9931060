//! Testing a real [`Plugin`] natively, with `cargo test` in the plugin's own crate.
//!
//! Outside a Wasm build, the host interfaces a plugin calls (`metrics`, `logs`, `names`,
//! `enrich`, and so [`Wit`](crate::Wit) and every helper) are served by the
//! [`TestHost`] of the calling thread, which records what the plugin declared, set,
//! logged and removed. Records are built with [`RecordExt`]; a recording made by
//! `wasmtap record` can be fed in with [`TestHost::replay`].
//!
//! ```no_run
//! use wasmtap_sdk::{testkit::*, *};
//! # struct MyPlugin;
//! # impl Plugin for MyPlugin { fn init(_: &HostInfo, _: &Config) -> Result<(Self, Manifest), String> { unimplemented!() } }
//! let host = TestHost::new();
//! host.name_syscall(39, "getpid");
//! let mut plugin = host.init::<MyPlugin>("comms = [\"app\"]").unwrap();
//! host.deliver(&mut plugin, &[SyscallRecord { syscall_nr: 39, latency_ns: 300, ..Default::default() }.pid(7).comm("app")]);
//! assert_eq!(host.counter("calls", &["app", "getpid"]), Some(1));
//! ```

pub mod imports;

use std::{cell::RefCell, path::Path, rc::Rc};

use imports::{HOST, State};

use crate::{Config, ConfigValue, HostInfo, Plugin, Record, RecordHeader, logs::Level};

/// A series' value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Counter(u64),
    Gauge(f64),
    /// Per-bucket counts (not cumulative; the last is `+Inf`) and the sum.
    Histogram {
        counts: Vec<u64>,
        sum: f64,
    },
}

/// One log record a plugin wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct LogEntry {
    pub level: Level,
    pub message: String,
    pub fields: Vec<(String, String)>,
}

/// A histogram series' state.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// Per-bucket counts (not cumulative; the last is `+Inf`).
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum: f64,
}

/// The host of this thread's plugin calls, while it lives.
pub struct TestHost {
    state: Rc<RefCell<State>>,
    /// The kinds the plugin's manifest subscribes to (set by `init`).
    kinds: RefCell<Vec<String>>,
}

impl Default for TestHost {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        HOST.with(|h| {
            let mut host = h.borrow_mut();
            if host.as_ref().is_some_and(|s| Rc::ptr_eq(s, &self.state)) {
                *host = None;
            }
        });
    }
}

impl TestHost {
    /// A fresh host, serving this thread's calls (replacing any before it).
    pub fn new() -> Self {
        let state = Rc::new(RefCell::new(State::default()));
        HOST.with(|h| *h.borrow_mut() = Some(state.clone()));
        Self { state, kinds: RefCell::default() }
    }

    /// Answers `names::syscall_name(nr)` with `name` (else none, as for a number the
    /// host does not know).
    pub fn name_syscall(&self, nr: u32, name: &str) {
        self.state.borrow_mut().syscall_names.insert(nr, name.into());
    }

    pub fn name_errno(&self, errno: u16, name: &str) {
        self.state.borrow_mut().errno_names.insert(errno, name.into());
    }

    /// Answers `enrich::cgroup(info.id)`.
    pub fn add_cgroup(&self, info: crate::enrich::CgroupInfo) {
        self.state.borrow_mut().cgroups.insert(info.id, info);
    }

    /// Answers `enrich::process(info.pid, _)`.
    pub fn add_process(&self, info: crate::enrich::ProcessInfo) {
        self.state.borrow_mut().processes.insert(info.pid, info);
    }

    /// Runs the plugin's `init` with `config` (the `[plugin.config]` table, as TOML).
    pub fn init<P: Plugin>(&self, config: &str) -> Result<P, String> {
        let table: toml::Table = config.parse().map_err(|e| format!("test config: {e}"))?;
        let host = HostInfo { version: "test".into(), arch: std::env::consts::ARCH.into(), instance: "test".into(), kinds: Vec::new() };
        let (plugin, manifest) = P::init(&host, &Config::new(config_tree(&toml::Value::Table(table))))?;
        *self.kinds.borrow_mut() = manifest.subscriptions.iter().map(|s| s.kind.clone()).collect();
        Ok(plugin)
    }

    /// Hands the plugin one batch of `records`.
    pub fn deliver<P: Plugin, R: Record>(&self, plugin: &mut P, records: &[R]) {
        let bytes: Vec<u8> = records.iter().flat_map(|r| r.as_bytes().to_vec()).collect();
        crate::dispatch(plugin, R::KIND, R::SIZE as u32, &bytes, 0);
    }

    pub fn tick<P: Plugin>(&self, plugin: &mut P, now_ns: u64) {
        plugin.tick(now_ns);
    }

    /// Feeds the batches of a `wasmtap record` recording of the kinds the plugin
    /// subscribed to (as recorded: the plugin's own filters are not applied, so record
    /// with the filters it would use), then ticks once; the number of records handed on.
    pub fn replay<P: Plugin>(&self, plugin: &mut P, path: &Path) -> Result<u64, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let frames = recording::frames(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        let (mut records, mut last_ts) = (0, 0);
        for frame in frames {
            if !self.kinds.borrow().contains(&frame.kind) {
                continue;
            }
            crate::dispatch(plugin, &frame.kind, frame.record_size, frame.records, frame.dropped);
            records += (frame.records.len() / frame.record_size.max(1) as usize) as u64;
            last_ts = last_ts.max(frame.records.get(..8).map_or(0, |t| u64::from_le_bytes(t.try_into().expect("8 bytes"))));
        }
        plugin.tick(last_ts);
        Ok(records)
    }

    fn find(&self, family: &str, labels: &[&str]) -> Option<Value> {
        let state = self.state.borrow();
        let f = state.families.iter().position(|d| d.name == family)?;
        state.series.iter().find(|s| s.family == f && !s.removed && s.labels.iter().eq(labels.iter())).map(|s| s.value.clone())
    }

    /// The counter of `family` (as declared, without `_total`) and `labels`.
    pub fn counter(&self, family: &str, labels: &[&str]) -> Option<u64> {
        match self.find(family, labels)? {
            Value::Counter(n) => Some(n),
            _ => None,
        }
    }

    pub fn gauge(&self, family: &str, labels: &[&str]) -> Option<f64> {
        match self.find(family, labels)? {
            Value::Gauge(g) => Some(g),
            _ => None,
        }
    }

    pub fn histogram(&self, family: &str, labels: &[&str]) -> Option<Histogram> {
        match self.find(family, labels)? {
            Value::Histogram { counts, sum } => Some(Histogram { count: counts.iter().sum(), counts, sum }),
            _ => None,
        }
    }

    /// The label values of `family`'s live series, in the order they were made.
    pub fn series(&self, family: &str) -> Vec<Vec<String>> {
        let state = self.state.borrow();
        let Some(f) = state.families.iter().position(|d| d.name == family) else { return Vec::new() };
        state.series.iter().filter(|s| s.family == f && !s.removed).map(|s| s.labels.clone()).collect()
    }

    /// The families declared, by name.
    pub fn families(&self) -> Vec<String> {
        self.state.borrow().families.iter().map(|f| f.name.clone()).collect()
    }

    /// Every log record written, in order (stdout/stderr lines are not included: they
    /// go to the test's own output).
    pub fn logs(&self) -> Vec<LogEntry> {
        self.state.borrow().logs.clone()
    }

    /// (family, label values) of every series removed, in order.
    pub fn removed(&self) -> Vec<(String, Vec<String>)> {
        self.state.borrow().removed.clone()
    }
}

/// Builder methods on every record kind's header, for test records:
/// `SyscallRecord { syscall_nr: 39, ..Default::default() }.pid(7).comm("app")`.
pub trait RecordExt: Record {
    fn pid(mut self, pid: u32) -> Self {
        self.header_mut().pid = pid;
        self.header_mut().tid = pid;
        self
    }

    fn tid(mut self, tid: u32) -> Self {
        self.header_mut().tid = tid;
        self
    }

    /// The task name (cut to 15 bytes, as the kernel keeps it).
    fn comm(mut self, comm: &str) -> Self {
        self.header_mut().comm = comm_bytes(comm);
        self
    }

    fn cgroup(mut self, cgroup_id: u64) -> Self {
        self.header_mut().cgroup_id = cgroup_id;
        self
    }

    /// The record's monotonic time, nanoseconds.
    fn at(mut self, ts_ns: u64) -> Self {
        self.header_mut().ts_ns = ts_ns;
        self
    }

    fn with_header(mut self, header: RecordHeader) -> Self {
        *self.header_mut() = header;
        self
    }
}

impl<R: Record> RecordExt for R {}

/// A task name as records hold it: NUL padded, at most 15 bytes.
pub fn comm_bytes(comm: &str) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let n = comm.len().min(15);
    bytes[..n].copy_from_slice(&comm.as_bytes()[..n]);
    bytes
}

/// A TOML value as the host sends config: a flat tree, element 0 the root.
fn config_tree(root: &toml::Value) -> Vec<ConfigValue> {
    fn add(nodes: &mut Vec<ConfigValue>, value: &toml::Value) -> u32 {
        let at = nodes.len();
        nodes.push(ConfigValue::Boolean(false)); // placeholder until the children are in
        let node = match value {
            toml::Value::String(s) => ConfigValue::String(s.clone()),
            toml::Value::Integer(i) => ConfigValue::Integer(*i),
            toml::Value::Float(f) => ConfigValue::Float(*f),
            toml::Value::Boolean(b) => ConfigValue::Boolean(*b),
            toml::Value::Datetime(d) => ConfigValue::Datetime(d.to_string()),
            toml::Value::Array(items) => ConfigValue::Array(items.iter().map(|v| add(nodes, v)).collect()),
            toml::Value::Table(table) => ConfigValue::Table(table.iter().map(|(k, v)| (k.clone(), add(nodes, v))).collect()),
        };
        nodes[at] = node;
        at as u32
    }
    let mut nodes = Vec::new();
    add(&mut nodes, root);
    nodes
}

/// Reading `wasmtap record` files (format version 1; see the host's
/// `recording` module).
mod recording {
    pub struct Frame<'a> {
        pub kind: String,
        pub record_size: u32,
        pub records: &'a [u8],
        pub dropped: u64,
    }

    pub fn frames(bytes: &[u8]) -> Result<Vec<Frame<'_>>, String> {
        let rest = bytes.strip_prefix(b"wasmtap-recording 1\n").ok_or("not a wasmtap recording (version 1)")?;
        let end = rest.iter().position(|&b| b == b'\n').ok_or("no header line")?;
        let header = std::str::from_utf8(&rest[..end]).map_err(|_| "the header is not UTF-8")?;
        let kinds = kind_names(header).ok_or("the header names no kinds")?;
        let mut at = &rest[end + 1..];
        let mut frames = Vec::new();
        while !at.is_empty() {
            let head = at.get(..18).ok_or("the recording ends inside a frame")?;
            let index = u16::from_le_bytes([head[0], head[1]]) as usize;
            let record_size = u32::from_le_bytes(head[2..6].try_into().expect("4 bytes"));
            let count = u32::from_le_bytes(head[6..10].try_into().expect("4 bytes")) as usize;
            let dropped = u64::from_le_bytes(head[10..18].try_into().expect("8 bytes"));
            let len = count * record_size as usize;
            let records = at.get(18..18 + len).ok_or("the recording ends inside a frame")?;
            let kind = kinds.get(index).ok_or("a frame names a kind the header does not have")?.clone();
            frames.push(Frame { kind, record_size, records, dropped });
            at = &at[18 + len..];
        }
        Ok(frames)
    }

    /// The `name`s of the header's `kinds`, in order (a small scan: the SDK has no JSON
    /// parser, and the host writes this header itself).
    fn kind_names(header: &str) -> Option<Vec<String>> {
        let kinds = &header[header.find("\"kinds\":[")? + 9..];
        let kinds = &kinds[..kinds.find(']')?];
        Some(kinds.split("\"name\":\"").skip(1).filter_map(|s| s.split('"').next()).map(str::to_owned).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CounterVec, Filter, HistogramVec, Manifest, Subscription, SyscallBatch, SyscallRecord, Wit, names};

    /// A small plugin written as an author would.
    struct Calls {
        calls: CounterVec<(u128, u32)>,
        latency: HistogramVec<u32>,
    }

    impl Plugin for Calls {
        fn init(_: &HostInfo, config: &Config) -> Result<(Self, Manifest), String> {
            let calls = CounterVec::declare(Wit, "calls", "Calls.", &["comm", "syscall"])?;
            let latency = HistogramVec::declare(Wit, "seconds", "Latency.", &["syscall"], vec![1000, 10_000], 1e-9)?;
            let filter = Filter { comms: config.list("comms")?, ..Filter::default() };
            Ok((Self { calls, latency }, Manifest { subscriptions: vec![Subscription { kind: "syscall".into(), filter }], tick_interval_ms: 0 }))
        }

        fn on_syscalls(&mut self, batch: SyscallBatch<'_>) {
            for r in batch.records() {
                let key = (u128::from_le_bytes(r.header.comm), r.syscall_nr);
                self.calls.add(key, 1, |(comm, nr)| {
                    vec![String::from_utf8_lossy(&comm.to_le_bytes()).trim_end_matches('\0').into(), names::syscall_label(&Wit, *nr)]
                });
                self.latency.observe(r.syscall_nr, r.latency_ns, |nr| vec![nr.to_string()]);
                if r.errno().is_some() {
                    crate::logs::log(Level::Warn, "failed", &[("nr".into(), r.syscall_nr.to_string())]);
                }
            }
            self.calls.flush();
            self.latency.flush();
        }

        fn tick(&mut self, _now_ns: u64) {
            self.calls.remove(&(u128::from_le_bytes(comm_bytes("gone")), 1));
        }
    }

    #[test]
    fn a_real_plugin_runs_natively_against_the_test_host() {
        let host = TestHost::new();
        host.name_syscall(39, "getpid");
        let mut plugin = host.init::<Calls>("comms = [\"app\"]").unwrap();
        let call = |nr, latency_ns, comm: &str| SyscallRecord { syscall_nr: nr, latency_ns, ..Default::default() }.pid(7).comm(comm);
        host.deliver(&mut plugin, &[call(39, 500, "app"), call(39, 5000, "app"), call(1, 50_000, "gone")]);
        host.deliver(&mut plugin, &[SyscallRecord { ret: -2, ..call(39, 20, "app") }]);
        assert_eq!(host.counter("calls", &["app", "getpid"]), Some(3));
        assert_eq!(host.counter("calls", &["gone", "syscall_1"]), Some(1));
        assert_eq!(host.histogram("seconds", &["39"]), Some(Histogram { counts: vec![2, 1, 0], count: 3, sum: 5520.0 * 1e-9 }));
        assert_eq!(host.logs(), [LogEntry { level: Level::Warn, message: "failed".into(), fields: vec![("nr".into(), "39".into())] }]);
        host.tick(&mut plugin, 1);
        assert_eq!(host.removed(), [("calls".to_owned(), vec!["gone".to_owned(), "syscall_1".to_owned()])]);
        assert_eq!(host.series("calls"), [vec!["app".to_owned(), "getpid".to_owned()]]);
        assert_eq!(host.families(), ["calls", "seconds"]);
    }

    #[test]
    fn a_recording_feeds_the_kinds_the_plugin_subscribed_to() {
        let record = |nr| SyscallRecord { syscall_nr: nr, latency_ns: 100, ..Default::default() }.comm("app");
        let mut file = b"wasmtap-recording 1\n{\"wasmtap\":\"0.1.0\",\"wit\":\"0.2.6\",\"node\":\"n\",\"started_unix_ns\":0,\"kinds\":[{\"name\":\"process\",\"record_size\":80},{\"name\":\"syscall\",\"record_size\":64}]}\n".to_vec();
        for (index, records) in [(1u16, vec![record(3), record(3)]), (0, vec![]), (1, vec![record(4)])] {
            file.extend_from_slice(&index.to_le_bytes());
            file.extend_from_slice(&64u32.to_le_bytes());
            file.extend_from_slice(&(records.len() as u32).to_le_bytes());
            file.extend_from_slice(&0u64.to_le_bytes());
            records.iter().for_each(|r| file.extend_from_slice(r.as_bytes()));
        }
        let path = std::env::temp_dir().join(format!("wasmtap-sdk-testkit-{}.wtrec", std::process::id()));
        std::fs::write(&path, &file).unwrap();
        let host = TestHost::new();
        let mut plugin = host.init::<Calls>("").unwrap();
        assert_eq!(host.replay(&mut plugin, &path), Ok(3));
        assert_eq!(host.counter("calls", &["app", "syscall_3"]), Some(2));
        std::fs::write(&path, &file[..file.len() - 5]).unwrap();
        assert_eq!(host.replay(&mut plugin, &path).unwrap_err(), format!("{}: the recording ends inside a frame", path.display()));
        std::fs::remove_file(&path).unwrap();
    }
}
