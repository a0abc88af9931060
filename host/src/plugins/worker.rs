//! One worker thread per plugin: owns its Store, takes batches from its bounded queue,
//! calls the plugin with a deadline, and restarts it with backoff when it traps.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc::{Receiver, RecvTimeoutError, sync_channel},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use serde::Serialize;

use super::{
    engine::PluginEngine,
    host::{Manifest, PluginPre, PluginState, WitEventKind},
    instance::{Instance, instantiate},
};
use crate::{
    config::PluginLimits,
    events::{Batch, EventFilter, EventKind, Subscriber},
    names,
    sinks::{MetricSink, self_metrics::PluginCounters},
};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Everything needed to (re)create a plugin instance.
pub struct PluginSpec {
    pub name: String,
    pub namespace: String,
    pub config: Vec<(String, String)>,
    pub limits: PluginLimits,
    pub pre: PluginPre<PluginState>,
}

/// What `/status` shows of a plugin.
#[derive(Debug, Clone, Serialize)]
pub struct PluginStatus {
    pub name: String,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A started plugin: its subscription (for the router) and its worker thread.
pub struct PluginHandle {
    pub subscriber: Arc<Subscriber>,
    pub status: Arc<Mutex<PluginStatus>>,
    thread: thread::JoinHandle<()>,
}

impl PluginHandle {
    /// Waits for the worker to finish its queue and its final tick. The queue closes
    /// when the router lets go of the subscriber.
    pub fn join(self) {
        drop(self.subscriber);
        let _ = self.thread.join();
    }
}

/// The manifest's syscall subscriptions as host filters (syscall names resolved).
fn syscall_filters(manifest: &Manifest) -> anyhow::Result<Vec<EventFilter>> {
    manifest
        .subscriptions
        .iter()
        .filter(|s| s.kind == WitEventKind::Syscall)
        .map(|s| {
            let syscalls = s
                .filter
                .syscalls
                .iter()
                .map(|name| names::syscall_number(name).ok_or_else(|| anyhow!("unknown syscall name {name:?} in the manifest")))
                .collect::<anyhow::Result<_>>()?;
            Ok(EventFilter {
                pids: s.filter.pids.iter().copied().collect(),
                cgroups: s.filter.cgroups.iter().copied().collect(),
                syscalls,
            })
        })
        .collect()
}

/// Instantiates and initialises the plugin, then hands it to its own worker thread.
pub fn start(engine: Arc<PluginEngine>, spec: PluginSpec, sink: Arc<MetricSink>, counters: PluginCounters) -> anyhow::Result<PluginHandle> {
    let (instance, manifest) = instantiate(&engine, &spec, &sink)?;
    let filters = syscall_filters(&manifest)?;
    let (queue, rx) = sync_channel(spec.limits.queue_batches);
    let subscriber = Arc::new(Subscriber {
        plugin: spec.name.clone(),
        kind: EventKind::Syscall,
        filters,
        queue,
        pending_dropped: Arc::default(),
        counters: counters.clone(),
    });
    let status = Arc::new(Mutex::new(PluginStatus { name: spec.name.clone(), state: "running", last_error: None }));
    let tick = (manifest.tick_interval_ms > 0).then(|| Duration::from_millis(manifest.tick_interval_ms.into()));
    let worker = Worker {
        engine,
        sink,
        spec,
        instance: Some(instance),
        counters,
        pending_dropped: subscriber.pending_dropped.clone(),
        status: status.clone(),
        tick,
        backoff: FIRST_BACKOFF,
        restart_at: Instant::now(),
    };
    let thread = thread::Builder::new()
        .name(format!("plugin-{}", worker.spec.name))
        .spawn(move || worker.run(rx))
        .context("spawning the plugin worker")?;
    Ok(PluginHandle { subscriber, status, thread })
}

struct Worker {
    engine: Arc<PluginEngine>,
    sink: Arc<MetricSink>,
    spec: PluginSpec,
    /// `None` while the plugin is down after a fault.
    instance: Option<Instance>,
    counters: PluginCounters,
    pending_dropped: Arc<AtomicU64>,
    status: Arc<Mutex<PluginStatus>>,
    tick: Option<Duration>,
    backoff: Duration,
    restart_at: Instant,
}

impl Worker {
    fn run(mut self, rx: Receiver<Batch>) {
        loop {
            let next = match self.tick {
                Some(every) => rx.recv_timeout(every),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match next {
                Ok(batch) => self.deliver(&batch),
                Err(RecvTimeoutError::Timeout) => self.call_tick(),
                Err(RecvTimeoutError::Disconnected) => {
                    self.call_tick();
                    self.set_status("stopped", None);
                    return;
                }
            }
        }
    }

    fn deliver(&mut self, batch: &Batch) {
        let n = batch.len() as u64;
        let deadline = self.deadline();
        let counters = self.counters.clone();
        let pending_dropped = self.pending_dropped.clone();
        let Some(instance) = self.live_instance() else {
            pending_dropped.fetch_add(n, Relaxed);
            counters.dropped.inc_by(n);
            return;
        };
        let dropped = pending_dropped.swap(0, Relaxed);
        let started = Instant::now();
        let result = instance.on_batch(deadline, &batch.records, dropped);
        counters.busy_seconds.inc_by(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => {
                counters.events.inc_by(n);
                counters.batches.inc();
                counters.memory_bytes.set(instance.memory_bytes() as i64);
                self.backoff = FIRST_BACKOFF;
            }
            Err(e) => {
                // The batch died with the instance: count it, and tell the next one.
                pending_dropped.fetch_add(n, Relaxed);
                counters.dropped.inc_by(n);
                self.fault(e);
            }
        }
    }

    fn call_tick(&mut self) {
        let deadline = self.deadline();
        let Some(instance) = self.live_instance() else { return };
        let started = Instant::now();
        let result = instance.tick(deadline);
        self.counters.busy_seconds.inc_by(started.elapsed().as_secs_f64());
        if let Err(e) = result {
            self.fault(e);
        }
    }

    fn deadline(&self) -> Duration {
        Duration::from_millis(self.spec.limits.call_deadline_ms)
    }

    /// The running instance, restarting a faulted one once its backoff has passed.
    fn live_instance(&mut self) -> Option<&mut Instance> {
        if self.instance.is_none() && Instant::now() >= self.restart_at {
            match instantiate(&self.engine, &self.spec, &self.sink) {
                Ok((instance, _manifest)) => {
                    self.counters.restarts.inc();
                    tracing::info!(plugin = %self.spec.name, "plugin restarted");
                    self.set_status("running", None);
                    self.instance = Some(instance);
                }
                Err(e) => self.fault(e.context("restart failed")),
            }
        }
        self.instance.as_mut()
    }

    /// Quarantines the instance: it is dropped, and recreated after a growing backoff.
    fn fault(&mut self, error: anyhow::Error) {
        self.counters.traps.inc();
        self.instance = None;
        self.restart_at = Instant::now() + self.backoff;
        tracing::error!(plugin = %self.spec.name, "plugin faulted: {error:#}; restarting in {:?}", self.backoff);
        self.set_status("restarting", Some(format!("{error:#}")));
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    fn set_status(&self, state: &'static str, error: Option<String>) {
        let mut status = self.status.lock().expect("status lock");
        status.state = state;
        if error.is_some() {
            status.last_error = error;
        }
    }
}
