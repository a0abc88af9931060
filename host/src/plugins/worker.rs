//! One worker thread per plugin: owns its Store, takes batches from its bounded queue,
//! calls the plugin with a deadline, and supervises it: a fault drops the instance and
//! restarts it after a backoff that grows while faults keep coming and resets only after
//! a quiet `fault_window_ms`; `max_faults` within that window quarantines the plugin.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
        mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use serde::Serialize;

use super::{
    engine::PluginEngine,
    host::{ConfigValue, Manifest, PluginPre, PluginState, StateIndices},
    instance::{Instance, instantiate},
};
use crate::{
    budget::{Budget, Reason, Refusal},
    enrich::Enricher,
    events::{Batch, CgroupScope, EventFilter, Subscriber, filter::MAX_FILTERS},
    probes::{self, Kind},
    sinks::{
        MetricSink, SelfMetrics,
        logs::{LogOutputs, sanitize},
        metrics::Staging,
        self_metrics::PluginCounters,
    },
};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The shortest tick interval a manifest gets.
pub const MIN_TICK: Duration = Duration::from_millis(10);
/// At most one fault line per plugin this often (the rest are counted in it).
const FAULT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Everything needed to (re)create a plugin instance.
pub struct PluginSpec {
    pub name: String,
    pub namespace: String,
    pub config: Vec<ConfigValue>,
    pub budget: Arc<Budget>,
    pub pre: PluginPre<PluginState>,
    pub engine: Arc<PluginEngine>,
    pub sink: Arc<MetricSink>,
    pub enricher: Arc<Enricher>,
    pub logs: Arc<LogOutputs>,
    /// Whether the component imports the enrichment interface (then the host observes
    /// process events to keep its answers right).
    pub uses_enrichment: bool,
    /// The component's content hash (sha256, hex): which build this is.
    pub version: String,
    /// Where to find its optional `state` export.
    pub state: Option<StateIndices>,
    /// Set while the build is being swapped in: its differing metric declarations wait
    /// here for the commit.
    pub staging: Option<Arc<Staging>>,
}

/// What a plugin's queue carries: batches, in order, and at most one handoff marker,
/// after the last batch routed to it before a replace.
pub enum Work {
    Batch(Batch),
    Handoff(Handoff),
}

/// The old build's part in a replace: it finishes every batch before the marker, ticks
/// a last time, hands over its state, and waits for the verdict.
pub struct Handoff {
    /// Whether to take a snapshot (the new build exports `state`).
    pub snapshot: bool,
    pub ready: SyncSender<HandedOver>,
    pub verdict: Receiver<Verdict>,
}

/// What the old build handed over: its state (none without the `state` export, or when
/// it keeps none), or why it has none to give (it was down, or faulted in its last tick
/// or in `snapshot`: it is restarting, its state is gone either way).
pub type HandedOver = Result<Option<Vec<u8>>, String>;

pub enum Verdict {
    /// The new build took over: the old one stops.
    Commit,
    /// The replace failed: the old build runs on, first with the batches its own
    /// filters selected meanwhile (held aside for it).
    Abort(Vec<Batch>),
}

/// What `/status` shows of a plugin.
#[derive(Debug, Clone, Serialize)]
pub struct PluginStatus {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// running, restarting, quarantined, stopped, replaced (or failed: never started).
    pub state: &'static str,
    /// Content hash of the running build.
    pub version: String,
    /// For a build that replaced another: microseconds from the replace request to its
    /// first batch handled.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_us: Option<u64>,
    pub faults: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A started plugin: its subscriptions (for the router) and its worker thread.
pub struct PluginHandle {
    /// One per kind it subscribed to, sharing its queue.
    pub subscribers: Vec<Arc<Subscriber>>,
    pub status: Arc<Mutex<PluginStatus>>,
    pub uses_enrichment: bool,
    pub version: String,
    pub counters: PluginCounters,
    /// The plugin's queue (for the handoff marker).
    queue: SyncSender<Work>,
    shutdown: Arc<OnceLock<Instant>>,
    thread: thread::JoinHandle<()>,
}

impl PluginHandle {
    /// Starts the plugin's shutdown clock: from now it has `shutdown_ms` to finish its
    /// queue; what is left then is counted as dropped.
    pub fn begin_shutdown(&self) {
        let _ = self.shutdown.set(Instant::now());
    }

    /// Waits for the worker to finish its queue (within its shutdown time) and its final
    /// tick. The queue closes when the router lets go of the subscriber.
    pub fn join(self) {
        self.begin_shutdown();
        drop(self.subscribers);
        drop(self.queue);
        let _ = self.thread.join();
    }

    /// The queue, to put the handoff marker behind the batches already in it.
    pub fn queue(&self) -> SyncSender<Work> {
        self.queue.clone()
    }
}

/// A plugin instantiated and initialised, with its subscriptions and queue, on its
/// worker thread, which waits to be started: a replace routes batches to it, restores
/// state into it, and starts (or drops) it. The thread exists before the start so that
/// starting is a wakeup, not a thread creation (a new thread waits its turn behind every
/// busy one; a woken one does not).
pub struct Staged {
    /// Its subscriptions; until it starts, their drops are counted apart (a replace
    /// that aborts lost nothing of the old build's).
    pub subscribers: Vec<Arc<Subscriber>>,
    pub uses_enrichment: bool,
    /// Whether it exports the `state` interface.
    pub stateful: bool,
    pub namespace: String,
    version: String,
    queue: SyncSender<Work>,
    counters: PluginCounters,
    status: Arc<Mutex<PluginStatus>>,
    shutdown: Arc<OnceLock<Instant>>,
    control: SyncSender<Control>,
    thread: thread::JoinHandle<()>,
}

/// What a staged worker is told before it runs.
enum Control {
    Restore(Vec<u8>, SyncSender<anyhow::Result<()>>),
    /// Run; the instant of the replace request, if one brought it.
    Start(Option<Instant>),
}

/// The manifest's subscriptions as host filters per kind, within the plugin's
/// subscription and filter-entry budgets.
pub fn subscriptions(manifest: &Manifest, budget: &Budget) -> anyhow::Result<Vec<(Kind, Vec<EventFilter>)>> {
    let limits = &budget.limits;
    let max = limits.subscriptions.min(MAX_FILTERS);
    let count = manifest.subscriptions.len();
    if count > max {
        let refusal = Refusal::new(Reason::Subscriptions, format!("the manifest has {count} subscriptions; the limit is {max} (subscriptions)"));
        return Err(budget.refuse(refusal).into());
    }
    let entries: usize = manifest
        .subscriptions
        .iter()
        .map(|s| s.filter.pids.len() + s.filter.cgroups.len() + s.filter.comms.len() + s.filter.params.iter().map(|(_, v)| v.len()).sum::<usize>())
        .sum();
    if entries > limits.filter_entries {
        let refusal = Refusal::new(
            Reason::FilterEntries,
            format!("the manifest's filters have {entries} entries; the limit is {} (filter_entries)", limits.filter_entries),
        );
        return Err(budget.refuse(refusal).into());
    }
    let mut by_kind: Vec<(Kind, Vec<EventFilter>)> = Vec::new();
    for s in &manifest.subscriptions {
        let kind = probes::kind(&s.kind).ok_or_else(|| {
            let offered: Vec<_> = probes::KINDS.iter().map(|k| k.name).collect();
            anyhow!("the manifest subscribes to event kind {:?}, which this host does not offer (it offers {})", sanitize(&s.kind, 64), offered.join(", "))
        })?;
        // Probe points act on every process of the node (a trap at each hit, semaphores
        // raised, kernel memory read): operators' plugins only.
        if kind.attaches_points()
            && let Some(tenant) = &budget.tenant
        {
            anyhow::bail!(
                "the {} kind is not offered to tenants' plugins (this one is tenant {}'s): its probes act on every process of the node",
                kind.name,
                tenant.name
            );
        }
        let f = &s.filter;
        let filter = kind.parse_filter(&f.pids, &f.cgroups, &f.comms, &f.params)?;
        match by_kind.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, filters)) => filters.push(filter),
            None => by_kind.push((kind, vec![filter])),
        }
    }
    Ok(by_kind)
}

/// Instantiates and initialises the plugin, makes its subscriptions and queue, and its
/// worker thread, waiting to be started.
pub fn stage(spec: PluginSpec, counters: PluginCounters, scope: Option<Arc<CgroupScope>>) -> anyhow::Result<Staged> {
    let (instance, manifest) = instantiate(&spec)?;
    let (queue, rx) = sync_channel(spec.budget.limits.queue_batches);
    let subscribers: Vec<Arc<Subscriber>> = subscriptions(&manifest, &spec.budget)?
        .into_iter()
        .map(|(kind, filters)| Arc::new(Subscriber::new(&spec.name, kind, filters, scope.clone(), queue.clone(), SelfMetrics::default().plugin(&spec.name))))
        .collect();
    let tick = (manifest.tick_interval_ms > 0).then(|| Duration::from_millis(manifest.tick_interval_ms.into()).max(MIN_TICK));
    let status = Arc::new(Mutex::new(PluginStatus {
        name: spec.name.clone(),
        tenant: spec.budget.tenant.as_ref().map(|t| t.name.clone()),
        state: "running",
        version: spec.version.clone(),
        swap_us: None,
        faults: 0,
        last_error: None,
    }));
    let shutdown = Arc::new(OnceLock::new());
    let (uses_enrichment, stateful, namespace, version) = (spec.uses_enrichment, instance.is_stateful(), spec.namespace.clone(), spec.version.clone());
    let mut worker = Worker {
        spec,
        instance: Some(instance),
        counters: counters.clone(),
        pending_dropped: subscribers.iter().map(|s| (s.kind, s.pending_dropped.clone())).collect(),
        status: status.clone(),
        tick,
        shutdown: shutdown.clone(),
        supervisor: Supervisor::default(),
        requested: None,
    };
    let (control, orders) = sync_channel(1);
    let thread = thread::Builder::new()
        .name(format!("plugin-{}", worker.spec.name))
        .spawn(move || {
            while let Ok(order) = orders.recv() {
                match order {
                    Control::Restore(bytes, reply) => {
                        let deadline = worker.deadline();
                        let instance = worker.instance.as_mut().expect("a staged instance");
                        let _ = reply.send(instance.restore(deadline, &bytes));
                    }
                    Control::Start(requested) => {
                        worker.spec.staging = None; // restarts declare like any instance
                        worker.instance.as_mut().expect("a staged instance").end_staging();
                        worker.requested = requested;
                        return worker.run(rx);
                    }
                }
            }
            // Dropped unstarted: the instance goes with the thread.
        })
        .context("spawning the plugin worker")?;
    Ok(Staged { subscribers, uses_enrichment, stateful, namespace, version, queue, counters, status, shutdown, control, thread })
}

impl Staged {
    /// Hands the previous build's state to it.
    pub fn restore(&self, state: Vec<u8>) -> anyhow::Result<()> {
        let (reply, answer) = sync_channel(1);
        self.control.send(Control::Restore(state, reply)).map_err(|_| anyhow!("the new build's worker is gone"))?;
        answer.recv().map_err(|_| anyhow!("the new build's worker is gone"))?
    }

    /// Starts it; `requested`: when the replace that brought it was asked for.
    pub fn start(self, requested: Option<Instant>) -> PluginHandle {
        let Staged { subscribers, uses_enrichment, version, queue, counters, status, shutdown, control, thread, .. } = self;
        // Records dropped while it waited count now, and its drops from here on.
        let subscribers: Vec<Arc<Subscriber>> = subscribers.iter().map(|s| Arc::new(s.with_counters(counters.clone()))).collect();
        counters.dropped.inc_by(subscribers.iter().map(|s| s.pending_dropped.load(Relaxed)).sum());
        counters.quarantined.set(0);
        let _ = control.send(Control::Start(requested));
        PluginHandle { subscribers, status, uses_enrichment, version, counters, queue, shutdown, thread }
    }
}

/// Fault history of one plugin.
struct Supervisor {
    recent: VecDeque<Instant>,
    backoff: Duration,
    last_fault: Option<Instant>,
    restart_at: Instant,
    quarantined: bool,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self {
            recent: VecDeque::new(),
            backoff: FIRST_BACKOFF,
            last_fault: None,
            restart_at: Instant::now(),
            quarantined: false,
            last_logged: None,
            unlogged: 0,
        }
    }
}

struct Worker {
    spec: PluginSpec,
    /// `None` while the plugin is down after a fault.
    instance: Option<Instance>,
    counters: PluginCounters,
    /// Records dropped per kind since the plugin's last batch of that kind.
    pending_dropped: Vec<(Kind, Arc<AtomicU64>)>,
    status: Arc<Mutex<PluginStatus>>,
    tick: Option<Duration>,
    shutdown: Arc<OnceLock<Instant>>,
    supervisor: Supervisor,
    /// Until its first batch: when the replace that brought it was asked for.
    requested: Option<Instant>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Work>) {
        let mut next_tick = self.tick.map(|every| Instant::now() + every);
        let mut unprocessed = 0u64;
        loop {
            let next = match next_tick {
                Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
            };
            match next {
                Ok(Work::Batch(batch)) if self.out_of_shutdown_time() => {
                    unprocessed += batch.len() as u64;
                    self.drop_batch(batch.kind, batch.len() as u64);
                }
                Ok(Work::Batch(batch)) => self.deliver(&batch),
                Ok(Work::Handoff(handoff)) => match self.hand_off(handoff) {
                    Some(batches) => batches.iter().for_each(|b| self.deliver(b)),
                    None => {
                        self.set_status("replaced", None);
                        return;
                    }
                },
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // On schedule even while batches keep coming.
            if let (Some(at), Some(every)) = (next_tick, self.tick)
                && Instant::now() >= at
            {
                self.call_tick();
                next_tick = Some((at + every).max(Instant::now()));
            }
        }
        self.final_tick();
        if unprocessed > 0 {
            tracing::warn!(plugin = %self.spec.name, unprocessed, "plugin ran out of shutdown time (shutdown_ms); its last events were dropped");
        }
        if !self.supervisor.quarantined {
            self.set_status("stopped", None);
        }
    }

    /// The old build's side of a replace: a final tick, the snapshot, then the verdict.
    /// The batches to handle first if the replace was aborted; `None` once committed.
    fn hand_off(&mut self, handoff: Handoff) -> Option<Vec<Batch>> {
        let was_up = self.instance.is_some();
        self.final_tick();
        let deadline = self.deadline();
        let handed: HandedOver = match self.instance.as_mut() {
            Some(instance) if handoff.snapshot => {
                let started = Instant::now();
                let result = instance.snapshot(deadline);
                self.spent(started.elapsed());
                result.map_err(|e| {
                    let message = format!("its snapshot failed: {e:#}");
                    self.fault(e);
                    message
                })
            }
            Some(_) => Ok(None),
            None if !handoff.snapshot => Ok(None),
            None if was_up => Err(format!("its last tick failed: {}", self.status.lock().expect("status lock").last_error.clone().unwrap_or_default())),
            None => Err("it was down (restarting or quarantined)".into()),
        };
        let _ = handoff.ready.send(handed);
        match handoff.verdict.recv() {
            Ok(Verdict::Commit) => None,
            Ok(Verdict::Abort(batches)) => Some(batches),
            Err(_) => Some(Vec::new()), // the replace went away undecided: run on
        }
    }

    fn out_of_shutdown_time(&self) -> bool {
        self.shutdown.get().is_some_and(|at| at.elapsed() >= Duration::from_millis(self.spec.budget.limits.shutdown_ms))
    }

    fn pending(&self, kind: Kind) -> &AtomicU64 {
        &self.pending_dropped.iter().find(|(k, _)| *k == kind).expect("a batch of a kind the plugin subscribed to").1
    }

    fn drop_batch(&self, kind: Kind, n: u64) {
        self.pending(kind).fetch_add(n, Relaxed);
        self.counters.dropped.inc_by(n);
    }

    fn deliver(&mut self, batch: &Batch) {
        let n = batch.len() as u64;
        if self.spec.budget.cpu_exhausted() {
            return self.drop_batch(batch.kind, n);
        }
        let deadline = self.deadline();
        // Reset only once the plugin has seen it: a trap must not lose the count.
        let dropped = self.pending(batch.kind).load(Relaxed);
        let Some(instance) = self.live_instance() else { return self.drop_batch(batch.kind, n) };
        let started = Instant::now();
        let result = instance.on_batch(deadline, batch.kind, &batch.records, dropped);
        let memory = instance.memory_bytes();
        self.spent(started.elapsed());
        match result {
            Ok(()) => {
                if let Some(requested) = self.requested.take() {
                    self.status.lock().expect("status lock").swap_us = Some(requested.elapsed().as_micros() as u64);
                }
                self.pending(batch.kind).fetch_sub(dropped, Relaxed);
                self.counters.events.inc_by(n);
                self.counters.batches.inc();
                self.counters.memory_bytes.set(memory as i64);
                self.counters.metric_bytes.set(self.spec.budget.used(Reason::MetricBytes) as i64);
                self.counters.series.set(self.spec.budget.used(Reason::Series) as i64);
            }
            Err(e) => {
                // The batch died with the instance: count it, and tell the next one.
                self.drop_batch(batch.kind, n);
                self.fault(e);
            }
        }
    }

    fn spent(&self, time: Duration) {
        self.counters.busy_seconds.inc_by(time.as_secs_f64());
        self.spec.budget.spend_cpu(time);
    }

    fn call_tick(&mut self) {
        if self.spec.budget.cpu_exhausted() || self.live_instance().is_none() {
            return;
        }
        self.final_tick();
    }

    /// A tick of the instance as it is (none is restarted for it), past the tenant's CPU
    /// share (still within the call deadline): the last one before the instance goes, so
    /// that nothing it aggregated is lost.
    fn final_tick(&mut self) {
        let deadline = self.deadline();
        let Some(instance) = self.instance.as_mut() else { return };
        let started = Instant::now();
        let result = instance.tick(deadline);
        self.spent(started.elapsed());
        if let Err(e) = result {
            self.fault(e);
        }
    }

    fn deadline(&self) -> Duration {
        Duration::from_millis(self.spec.budget.limits.call_deadline_ms)
    }

    /// The running instance, restarting a faulted one once its backoff has passed.
    fn live_instance(&mut self) -> Option<&mut Instance> {
        if self.instance.is_none() && !self.supervisor.quarantined && Instant::now() >= self.supervisor.restart_at {
            match instantiate(&self.spec) {
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

    /// Drops the faulted instance; restarts it after a backoff, or quarantines it.
    fn fault(&mut self, error: anyhow::Error) {
        let now = Instant::now();
        let limits = &self.spec.budget.limits;
        let window = Duration::from_millis(limits.fault_window_ms);
        let s = &mut self.supervisor;
        self.counters.traps.inc();
        self.instance = None;
        if s.last_fault.is_some_and(|at| now.duration_since(at) >= window) {
            s.backoff = FIRST_BACKOFF; // quiet for a whole window: start over
        }
        s.last_fault = Some(now);
        s.recent.push_back(now);
        while s.recent.front().is_some_and(|&at| now.duration_since(at) > window) {
            s.recent.pop_front();
        }
        let error = format!("{error:#}");
        if s.recent.len() >= limits.max_faults as usize {
            s.quarantined = true;
            self.counters.quarantined.set(1);
            tracing::error!(
                plugin = %self.spec.name,
                "plugin quarantined after {} faults within {window:?}; it stays down until the daemon restarts. Last fault: {error}",
                s.recent.len()
            );
            self.set_status("quarantined", Some(error));
            return;
        }
        s.restart_at = now + s.backoff;
        if s.last_logged.is_none_or(|at| now.duration_since(at) >= FAULT_LOG_INTERVAL) {
            let suppressed = std::mem::take(&mut s.unlogged);
            tracing::error!(plugin = %self.spec.name, suppressed, "plugin faulted: {error}; restarting in {:?}", s.backoff);
            s.last_logged = Some(now);
        } else {
            s.unlogged += 1;
        }
        s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
        self.set_status("restarting", Some(error));
    }

    fn set_status(&self, state: &'static str, error: Option<String>) {
        let mut status = self.status.lock().expect("status lock");
        status.state = state;
        if error.is_some() {
            status.faults += 1;
            status.last_error = error;
        }
    }
}
